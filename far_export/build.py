"""`far-export build`: checkpoint -> static ONNX graphs -> validation -> TensorRT plans -> manifest.

Everything is written into a temporary sibling of the output directory and renamed
over it at the end, so a failed or interrupted build leaves an existing engine
directory as it was. Each stage prints one line with its time.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from far_export import __version__
from far_export.export import (
    PRECISIONS,
    ExportError,
    GraphIO,
    GraphShapes,
    export_graph,
    fp32_islands,
    graph_modules,
    graph_specs,
)
from far_export.validate import (
    E2E_TOLERANCES,
    TOLERANCES,
    LoopSettings,
    Recorder,
    ValidationError,
    check,
    compare,
    error_stats,
    ort_runner,
    ort_session,
    random_feeds,
    sample_loop,
    settings_dict,
    torch_runner,
    upcast_bf16,
)
from runtime.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    GraphSpec,
    Manifest,
    ModelInfo,
    load_manifest,
    sha256_file,
)
from training.config import FARConfig


class BuildError(RuntimeError):
    """Bad build options or output path, or a build stage that failed."""


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"
    batch: int = 8
    cfg_guidance: bool | None = None  # None: guided when the checkpoint's default cfg != 1
    num_iter: int | None = None  # masked backbone: AR steps Q is sized for; None: the checkpoint's
    validate: bool = True  # per-graph checks against PyTorch
    end_to_end: bool = True  # the whole loop against the reference sampler
    seed: int = 0
    engines: bool = True  # build TensorRT plans where tensorrt and a GPU exist
    require_engines: bool = False  # no tensorrt / GPU is an error instead of a note
    workspace_gb: float = 4.0
    opt_level: int = 3  # TensorRT builder_optimization_level (0..5)

    def check(self) -> BuildOptions:
        if self.precision not in PRECISIONS:
            raise BuildError(f"unknown precision {self.precision!r}; choose from {', '.join(PRECISIONS)}")
        if self.batch < 1:
            raise BuildError(f"--batch must be >= 1, got {self.batch}")
        if self.num_iter is not None and self.num_iter < 1:
            raise BuildError(f"--num-iter must be >= 1, got {self.num_iter}")
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be in 0..5, got {self.opt_level}")
        if self.workspace_gb <= 0:
            raise BuildError(f"--workspace-gb must be > 0, got {self.workspace_gb}")
        return self


Log = Callable[[str], None]


@contextmanager
def stage(log: Log, what: str) -> Iterator[dict[str, Any]]:
    """Prints `what ... done (1.2s)`; the body may add a note with info['note']."""
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    yield info
    note = f": {info['note']}" if info.get("note") else ""
    log(f"{what}{note} ({time.perf_counter() - t0:.1f}s)")


def check_output_path(out: Path, checkpoint_dir: Path | None = None) -> None:
    """The output must be new, empty or an engine directory (it is replaced whole), and writable."""
    if out.exists() and not out.is_dir():
        raise BuildError(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise BuildError(f"--out {out} is a non-empty directory without {MANIFEST}: not an engine directory to "
                         f"replace; choose a new or empty directory")
    if checkpoint_dir is not None:
        o, c = out.resolve(), Path(checkpoint_dir).resolve()
        if o == c or o in c.parents:
            raise BuildError(f"--out {out} would replace the checkpoint directory {checkpoint_dir}")
    parent = out.parent if str(out.parent) else Path(".")
    for p in (parent, *parent.parents):  # the first existing ancestor must be writable
        if p.exists():
            if not p.is_dir():
                raise BuildError(f"--out {out}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise BuildError(f"--out {out}: {p} is not writable")
            break


def model_info(cfg: FARConfig, shapes: GraphShapes) -> ModelInfo:
    return ModelInfo(
        backbone=cfg.backbone, head=cfg.head, img_size=cfg.img_size, grid=cfg.grid, seq_len=cfg.seq_len,
        token_dim=cfg.token_dim, latent_channels=cfg.vae.embed_dim, patch_size=cfg.patch_size,
        latent_scale=cfg.latent_scale, num_classes=cfg.num_classes, num_iter=shapes.num_iter,
        max_query=shapes.max_query, width=cfg.width, depth=cfg.depth, num_heads=cfg.num_heads,
        head_dim=cfg.head_dim, shortcut_levels=cfg.shortcut_levels, diffusion_steps=cfg.diffusion_steps,
        head_steps=cfg.resolved_head_steps, cfg=cfg.cfg if shapes.guided else 1.0, cfg_schedule=cfg.cfg_schedule,
        temperature=cfg.temperature,
    )


def build(checkpoint_dir: str | Path, out_dir: str | Path, options: BuildOptions | None = None,
          log: Log = print) -> Manifest:
    """Build an engine directory from a checkpoint directory; returns the manifest written."""
    opts = (options or BuildOptions()).check()
    out = Path(out_dir)
    check_output_path(out, Path(checkpoint_dir))
    if opts.require_engines:  # fail before a long export, not after it
        from far_export.tensorrt import TensorRTUnavailable, detect_device

        try:
            detect_device()
        except TensorRTUnavailable as e:
            raise BuildError(f"--require-engines: TensorRT plans cannot be built here: {e}") from None

    from training.checkpoint import checkpoint_sha256, load_checkpoint, replace_dir
    from training.config import DiTConfig

    with stage(log, f"load checkpoint {checkpoint_dir}") as st:
        ckpt = load_checkpoint(checkpoint_dir)
        cfg = ckpt.cfg
        if isinstance(cfg, DiTConfig):
            raise BuildError(f"{checkpoint_dir} is a DiT checkpoint: far-export builds FAR and MAR engines only; "
                             f"sample it with `python training/sample.py --checkpoint {checkpoint_dir}`")
        ckpt_sha = checkpoint_sha256(checkpoint_dir)
        st["note"] = f"{cfg.backbone} backbone, {cfg.head} head, {sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.1f}M params"
    guided = cfg.cfg != 1.0 if opts.cfg_guidance is None else opts.cfg_guidance
    try:
        shapes = GraphShapes.for_config(cfg, opts.batch, guided, opts.num_iter)
    except ExportError as e:
        raise BuildError(str(e)) from None
    specs = graph_specs(cfg, shapes, opts.precision)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        manifest = _build_into(tmp, out, ckpt, ckpt_sha, shapes, specs, opts, log)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out} ({opts.precision}, batch {shapes.batch}, cfg guidance {'on' if guided else 'off'})")
    return manifest


def _build_into(tmp: Path, out: Path, ckpt: Any, ckpt_sha: str, shapes: GraphShapes, specs: dict[str, GraphIO],
                opts: BuildOptions, log: Log) -> Manifest:
    cfg: FARConfig = ckpt.cfg
    precision = opts.precision
    graph_precision = {name: precision for name in specs}
    modules = graph_modules(ckpt.model, ckpt.vae, shapes.guided, precision)  # what the graphs compute
    # the reference: the fp32 model (what the checkpoint means); per-precision tolerances bound the difference
    refs = modules if precision == "fp32" else graph_modules(ckpt.model, ckpt.vae, shapes.guided, "fp32")
    feeds = {name: random_feeds(cfg, io_) for name, io_ in specs.items()}
    for name, io_ in specs.items():
        with stage(log, f"export {io_.file}") as st:
            export_graph(modules[name], io_, tmp / io_.file, feeds[name][0])
            st["note"] = f"{(tmp / io_.file).stat().st_size / 1e6:.1f} MB"

    validation: dict[str, Any] = {}
    if opts.validate or opts.end_to_end:
        import onnxruntime as ort

        validation["backend"] = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
        validation["reference"] = "PyTorch fp32 modules (per graph); fp32 reference sampler (end to end)"
        validation["tolerance"] = {"graph": vars(TOLERANCES[precision]), "end_to_end": vars(E2E_TOLERANCES[precision]),
                                   "relative_to": "max(1, max|reference|)"}
        sessions = {}
        for name, io_ in specs.items():
            sessions[name], how = _session_for(tmp / io_.file, precision)
            if how:
                validation.setdefault("notes", {})[name] = how
        graphs_v: dict[str, Any] = {}
        validation["graphs"] = graphs_v
        if opts.validate:
            for name, io_ in specs.items():
                with stage(log, f"validate {io_.file} on random inputs") as st:
                    try:
                        res = compare(name, io_, ort_runner(sessions[name], io_), torch_runner(refs[name], io_),
                                      feeds[name], io_.tolerances[precision], "random")
                    except ValidationError:
                        if name != "vae_decoder" or precision == "fp32":
                            raise
                        # the VAE may run fp32 entirely when the reduced precision does not hold
                        graph_precision[name] = "fp32"
                        modules[name] = graph_modules(ckpt.model, ckpt.vae, shapes.guided, precision, "fp32")[name]
                        export_graph(modules[name], io_, tmp / io_.file, feeds[name][0])
                        sessions[name], _ = _session_for(tmp / io_.file, "fp32")
                        res = compare(name, io_, ort_runner(sessions[name], io_), torch_runner(refs[name], io_),
                                      feeds[name], io_.tolerances["fp32"], "random")
                    graphs_v[name] = {"random": res}
                    st["note"] = _worst(res)
        validation["graphs"] = graphs_v

    def make_manifest(validation: dict[str, Any]) -> Manifest:
        graphs = {
            name: GraphSpec(
                file=io_.file, sha256=sha256_file(tmp / io_.file), inputs=io_.inputs, outputs=io_.outputs,
                precision=graph_precision[name],
                fp32_islands=fp32_islands(name, cfg) if graph_precision[name] != "fp32" else (),
            )
            for name, io_ in specs.items()
        }
        return Manifest(
            schema_version=SCHEMA_VERSION, producer=f"far-export {__version__}",
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), checkpoint_sha256=ckpt_sha,
            precision=precision, batch=shapes.batch, cfg_guidance=shapes.guided, model=model_info(cfg, shapes),
            graphs=graphs, validation=validation,
        )

    manifest = make_manifest(validation)
    manifest.save(tmp)  # provisional: the runtime's pipeline reads it in the end-to-end check
    if opts.end_to_end:
        graphs_v_real, e2e = _end_to_end(tmp, cfg, ckpt, shapes, specs, sessions, refs, opts, graph_precision, log)
        for name, res in graphs_v_real.items():
            validation["graphs"].setdefault(name, {})["real"] = res
        validation["end_to_end"] = e2e
    if validation:
        validation["passed"] = True
        manifest = manifest.replace(validation=validation)
    manifest.save(tmp)
    if opts.engines or opts.require_engines:
        manifest = _engines(tmp, out, manifest, opts, log)
    return load_manifest(tmp)  # re-read: what the runtime will see


BF16_NOTE = ("ONNX Runtime on CPU has no bf16 kernels for this graph: validated with its bf16 weights and casts "
             "upcast to fp32 (same graph, activations in fp32)")


def _session_for(path: Path, precision: str) -> tuple[Any, str | None]:
    """An ORT session for the graph, and a note on how it is validated when not as it is."""
    try:
        return ort_session(path), None
    except ValidationError:
        if precision != "bf16":
            raise
    return ort_session(upcast_bf16(path), name=f"{path.name} (upcast to fp32)"), BF16_NOTE


def _worst(res: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} max {v['max']:.2g} p99 {v['p99']:.2g}" for k, v in res.items())


def _end_to_end(tmp: Path, cfg: FARConfig, ckpt: Any, shapes: GraphShapes, specs: dict[str, GraphIO], sessions: dict[str, Any],
                refs: dict[str, Any], opts: BuildOptions, graph_precision: dict[str, str],
                log: Log) -> tuple[dict[str, Any], dict[str, Any]]:
    import torch

    from training.sample import SamplingSettings, decode_tokens, sample_tokens

    labels = [i % cfg.num_classes for i in range(shapes.batch)]
    s = SamplingSettings.resolve(cfg, seed=opts.seed, num_iter=shapes.num_iter)
    s = dataclasses.replace(s, cfg=cfg.cfg if shapes.guided else 1.0)
    loop = s
    runners = {name: ort_runner(sessions[name], io_) for name, io_ in specs.items()}
    rec = Recorder()
    with stage(log, f"end to end: sample {len(labels)} image{'s' * (len(labels) != 1)} through the graphs (seed {opts.seed})"), \
            _bar("graphs") as bar:
        tokens = sample_loop(cfg, shapes, specs, runners, labels, loop, record=rec, progress=bar)
        image = runners["vae_decoder"]({"tokens": tokens})["image"]
    with stage(log, "end to end: PyTorch reference sampler") as st, _bar("reference") as bar:
        torch.manual_seed(0)
        ref_tokens = sample_tokens(ckpt.model, labels, s, progress=bar)
        ref_image = decode_tokens(cfg, ckpt.vae, ref_tokens)
        tok = error_stats(tokens, ref_tokens)
        img = error_stats(image, ref_image)
        st["note"] = f"tokens max {tok['max']:.2g}, image max {img['max']:.2g} mean {img['mean']:.2g}"
    e2e = {"labels": labels, "settings": settings_dict(loop), "tokens": tok, "image": img}
    real: dict[str, Any] = {}
    with stage(log, "validate graphs on real inputs (recorded while sampling)") as st:
        rec.calls["vae_decoder"] = [{"tokens": tokens}]  # the reference's tokens are covered by the image check
        for name, io_ in specs.items():
            tol = io_.tolerances[graph_precision[name]]
            real[name] = compare(name, io_, runners[name], torch_runner(refs[name], io_), rec.picks(name), tol, "real")
        st["note"] = "; ".join(f"{n}: {_worst(r)}" for n, r in real.items())
    check(img, E2E_TOLERANCES[opts.precision], "end to end: the image sampled through the graphs")
    with stage(log, "end to end: the runtime (runtime.pipeline, ONNX Runtime) against the reference") as st:
        e2e["runtime"] = _runtime_check(tmp, labels, loop, ref_tokens, ref_image, opts.precision)
        r = e2e["runtime"]
        st["note"] = r.get("skipped") or f"tokens max {r['tokens']['max']:.2g}, image max {r['image']['max']:.2g}"
    e2e["passed"] = True
    return real, e2e


def _runtime_check(tmp: Path, labels: list[int], loop: LoopSettings, ref_tokens: np.ndarray, ref_image: np.ndarray,
                   precision: str) -> dict[str, Any]:
    """The lean runtime's own loop over this directory must sample the reference's image too."""
    if precision == "bf16":
        return {"skipped": "ONNX Runtime on CPU cannot run bf16 graphs"}
    try:
        from runtime.pipeline import Pipeline
    except ImportError as e:
        return {"skipped": f"runtime.pipeline is not importable ({e})"}
    pipe = Pipeline.load(tmp, backend="ort", spin=False)
    try:
        s = pipe.settings(head_steps=loop.head_steps, cfg=loop.cfg, cfg_schedule=loop.cfg_schedule,
                          temperature=loop.temperature, num_iter=loop.num_iter, seed=loop.seed)
        tokens = pipe.sample_tokens(labels, s)
        image = pipe.decode(tokens)
    finally:
        pipe.close()
    res = {"tokens": error_stats(tokens, ref_tokens), "image": error_stats(image, ref_image)}
    check(res["image"], E2E_TOLERANCES[precision], "end to end: the image sampled by runtime.pipeline")
    return res


@contextmanager
def _bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for the long sampling stages (only on a terminal)."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit="step", leave=False, disable=not sys.stderr.isatty()) as bar:
        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


def _engines(tmp: Path, out: Path, manifest: Manifest, opts: BuildOptions, log: Log) -> Manifest:
    from far_export.tensorrt import EngineSettings, TensorRTUnavailable, compile_engines

    settings = EngineSettings(workspace_gb=opts.workspace_gb, opt_level=opts.opt_level)
    try:
        return compile_engines(tmp, manifest, settings, previous=out if out.is_dir() else None, log=log)
    except TensorRTUnavailable as e:
        if opts.require_engines:
            raise BuildError(f"TensorRT plans were not built: {e}") from None
        log(f"TensorRT plans were not built: {e} (ONNX graphs validated with ONNX Runtime; "
            f"build them on the device with far-export compile)")
        return manifest

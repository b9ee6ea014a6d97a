"""`far-export build`: checkpoint -> static ONNX graphs -> validation -> TensorRT plans -> manifest.

Everything is written into a temporary sibling of the output directory and renamed
over it at the end, so a failed or interrupted build leaves an existing engine
directory as it was. Each stage prints one line with its time.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
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
    ENCODER_VARIANTS,
    PRECISIONS,
    ExportError,
    GraphIO,
    GraphShapes,
    export_graph,
    fp32_islands,
    graph_modules,
    graph_specs,
)
from far_export.shared_weights import share_weights
from far_export.validate import (
    E2E_TOLERANCES,
    TOLERANCES,
    SessionBackend,
    ValidationError,
    as_run_on_cpu,
    check,
    compare,
    error_stats,
    ort_runner,
    ort_session,
    random_feeds,
    torch_runner,
    upcast_bf16,
)
from runtime.backends import RecordingBackend
from runtime.errors import MAX_BATCH, FarError, artifact_ancestor, writable_ancestor
from runtime.files import pid_alive
from runtime.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    SHARED_WEIGHTS_FILE,
    GraphSpec,
    Manifest,
    ModelInfo,
    SharedWeights,
    is_variant,
    load_manifest,
    sha256_file,
)
from training.config import FARConfig

MAX_ENCODER_VARIANTS = 16


class BuildError(FarError, RuntimeError):
    """Bad build options or output path, or a build stage that failed."""


@dataclass(frozen=True)
class BuildOptions:
    precision: str = "fp32"
    batch: int = 8
    cfg_guidance: bool | None = None  # None: guided when the checkpoint's default cfg != 1
    num_iter: int | None = None  # masked backbone: AR steps Q is sized for; None: the checkpoint's
    encoder_variants: int = ENCODER_VARIANTS  # masked backbone: encoder variants on known tokens (0: none)
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
        if not 1 <= self.batch <= MAX_BATCH:
            raise BuildError(f"--batch must be in [1, {MAX_BATCH}], got {self.batch}")
        if not 0 <= self.seed < 2**63:
            raise BuildError(f"--seed must be a non-negative integer below 2^63, got {self.seed}")
        if self.num_iter is not None and self.num_iter < 1:
            raise BuildError(f"--num-iter must be >= 1, got {self.num_iter}")
        if not 0 <= self.encoder_variants <= MAX_ENCODER_VARIANTS:
            raise BuildError(
                f"--encoder-variants must be in [0, {MAX_ENCODER_VARIANTS}], got {self.encoder_variants}"
            )
        if not 0 <= self.opt_level <= 5:
            raise BuildError(f"--opt-level must be in 0..5, got {self.opt_level}")
        if not (math.isfinite(self.workspace_gb) and 0 < self.workspace_gb <= 1024):
            raise BuildError(f"--workspace-gb must be a number in (0, 1024], got {self.workspace_gb}")
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
        raise BuildError(
            f"--out {out} is a non-empty directory without {MANIFEST}: not an engine directory to "
            f"replace; choose a new or empty directory"
        )
    if out.is_dir() and (out / MANIFEST).is_file():
        foreign = sorted(set(os.listdir(out)) - build_files(out))
        if foreign:
            raise BuildError(
                f"--out {out} holds {foreign[0]!r}, which no build wrote, and a rebuild replaces the whole "
                f"directory: move it out first, or choose another --out"
            )
    if checkpoint_dir is not None:
        o, c = out.resolve(), Path(checkpoint_dir).resolve()
        if o == c or o in c.parents:
            raise BuildError(f"--out {out} would replace the checkpoint directory {checkpoint_dir}")
    found = artifact_ancestor(out.resolve().parent)
    if found:
        raise BuildError(
            f"--out {out} is inside the {found[0]} directory {found[1]}: its next rebuild would delete "
            f"the engines; write outside it"
        )
    writable_ancestor(out.resolve().parent, "--out", out, BuildError)


def build_files(out: Path) -> set[str]:
    """The names a build writes into an engine directory: the manifest and the graph, external-data, plan
    and timing-cache files it lists (by suffix where the manifest cannot be read)."""
    try:
        m = load_manifest(out, verify=False)
    except FarError:
        suffixes = (".onnx", ".data", ".weights", ".plan", ".cache", MANIFEST)
        return {n for n in os.listdir(out) if n.endswith(suffixes)}
    names = {MANIFEST, *(g.file for g in m.graphs.values()), *(e.file for e in m.engines.values())}
    names |= {f"{g.file}.data" for g in m.graphs.values()}
    if m.shared_weights is not None:
        names.add(m.shared_weights.file)
    if m.timing_cache:
        names.add(m.timing_cache)
    return names


@contextmanager
def build_temp(out: Path) -> Iterator[Path]:
    """A temporary directory beside `out` to build into, removed when the block raises. SIGTERM and SIGHUP
    (what timeout, CI and systemd send) from before it exists to the end of the block: remove it, say so
    in one line and exit as the signal would (128 + its number). SIGINT raises KeyboardInterrupt, which
    removes it like any exception.

    The handler does not raise: an exception raised inside Python code that C++ called (an onnx or
    onnxruntime module import, a nanobind callback) aborts the process instead of unwinding, with a
    traceback and no cleanup. It writes with os.write, since the code it interrupted may hold stderr."""
    made: list[Path] = []

    def stop(signum: int, frame: Any) -> None:
        for tmp in made:
            shutil.rmtree(tmp, ignore_errors=True)
        message = (
            f"Error: build interrupted by {signal.Signals(signum).name}: its temporary files were removed "
            f"and no half-written output was left; run it again\n"
        )
        os.write(2, message.encode())
        os._exit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n) and main]
    old = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        made.append(Path(tempfile.mkdtemp(prefix=f".{out.name}.build-{os.getpid()}-", dir=out.parent)))
        try:
            yield made[0]
        except BaseException:
            shutil.rmtree(made[0], ignore_errors=True)
            raise
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT, SIGTERM and SIGHUP until the block is done (where the platform can)."""
    wanted = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def sweep_stale(out: Path) -> None:
    """Remove the temporary directories that killed builds of `out` left (SIGKILL, power loss): those named
    `.NAME.build-PID-*` or `.NAME.old-PID` whose process is gone."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.(build-(\d+)-.+|old-(\d+))", tmp.name)
        if not m or not tmp.is_dir() or tmp.is_symlink():
            continue
        pid = int(m.group(2) or m.group(3))
        if pid_alive(pid) or (m.group(3) and not out.exists()):  # an .old- copy is the only one left: keep it
            continue
        shutil.rmtree(tmp, ignore_errors=True)


def model_info(cfg: FARConfig, shapes: GraphShapes) -> ModelInfo:
    return ModelInfo(
        backbone=cfg.backbone,
        head=cfg.head,
        img_size=cfg.img_size,
        grid=cfg.grid,
        seq_len=cfg.seq_len,
        token_dim=cfg.token_dim,
        latent_channels=cfg.vae.embed_dim,
        patch_size=cfg.patch_size,
        latent_scale=cfg.latent_scale,
        num_classes=cfg.num_classes,
        num_iter=shapes.num_iter,
        max_query=shapes.max_query,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        shortcut_levels=cfg.shortcut_levels,
        diffusion_steps=cfg.diffusion_steps,
        head_steps=cfg.resolved_head_steps,
        cfg=cfg.cfg if shapes.guided else 1.0,
        cfg_schedule=cfg.cfg_schedule,
        temperature=cfg.temperature,
    )


def build(
    checkpoint_dir: str | Path, out_dir: str | Path, options: BuildOptions | None = None, log: Log = print
) -> Manifest:
    """Build an engine directory from a checkpoint directory; returns the manifest written."""
    opts = (options or BuildOptions()).check()
    out = Path(out_dir)
    check_output_path(out, Path(checkpoint_dir))
    sweep_stale(out)
    if opts.require_engines:  # fail before a long export, not after it
        why = tensorrt_missing()
        if why:
            raise BuildError(f"--require-engines: TensorRT plans cannot be built here: {why}")

    from runtime.files import replace_dir
    from training.checkpoint import checkpoint_sha256, load_checkpoint
    from training.config import DiTConfig

    with stage(log, f"load checkpoint {checkpoint_dir}") as st:
        ckpt = load_checkpoint(checkpoint_dir)
        cfg = ckpt.cfg
        if isinstance(cfg, DiTConfig):
            raise BuildError(
                f"{checkpoint_dir} is a DiT checkpoint: far-export builds FAR and MAR engines only; "
                f"sample it with `python training/sample.py --checkpoint {checkpoint_dir}`"
            )
        ckpt_sha = checkpoint_sha256(checkpoint_dir)
        st["note"] = (
            f"{cfg.backbone} backbone, {cfg.head} head, "
            f"{sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.1f}M params"
        )
    guided = cfg.cfg != 1.0 if opts.cfg_guidance is None else opts.cfg_guidance
    try:
        shapes = GraphShapes.for_config(cfg, opts.batch, guided, opts.num_iter, opts.encoder_variants)
    except ExportError as e:
        raise BuildError(str(e)) from None
    specs = graph_specs(cfg, shapes, opts.precision)

    with build_temp(out) as tmp:
        manifest = _build_into(tmp, out, ckpt, ckpt_sha, shapes, specs, opts, log)
        with signals_held():  # between its two renames the old output is aside: no signal may stop it
            replace_dir(tmp, out)
    log(f"wrote {out} ({opts.precision}, batch {shapes.batch}, cfg guidance {'on' if guided else 'off'})")
    return manifest


def _build_into(
    tmp: Path,
    out: Path,
    ckpt: Any,
    ckpt_sha: str,
    shapes: GraphShapes,
    specs: dict[str, GraphIO],
    opts: BuildOptions,
    log: Log,
) -> Manifest:
    cfg: FARConfig = ckpt.cfg
    precision = opts.precision
    graph_precision = {name: "fp32" if name == "update" else precision for name in specs}
    notes: dict[str, str] = {}
    if precision == "int8" and cfg.head == "mar":
        graph_precision["head"] = "fp32"
        notes["head"] = MAR_INT8_NOTE
    variants = shapes.variant_names
    # what the graphs compute
    modules = graph_modules(ckpt.model, ckpt.vae, shapes.guided, precision, variants=variants)
    # the reference: the fp32 model (what the checkpoint means); per-precision tolerances bound the difference
    refs = (
        modules
        if precision in ("fp32", "int8")
        else graph_modules(ckpt.model, ckpt.vae, shapes.guided, "fp32", variants=variants)
    )
    feeds = {name: random_feeds(cfg, io_) for name, io_ in specs.items()}
    for name, io_ in specs.items():
        with stage(log, f"export {io_.file}") as st:
            export_graph(modules[name], io_, tmp / io_.file, feeds[name][0])
            st["note"] = f"{(tmp / io_.file).stat().st_size / 1e6:.1f} MB"
    fp32_dir = tmp / ".fp32"  # int8: the fp32 graphs a failed quantized graph falls back to (removed below)
    held_out = (
        _quantize(tmp, fp32_dir, ckpt_sha, cfg, shapes, specs, graph_precision, opts, log)
        if precision == "int8"
        else {}
    )

    validation: dict[str, Any] = {}
    if opts.validate or opts.end_to_end:
        import onnxruntime as ort

        validation["backend"] = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
        validation["reference"] = "PyTorch fp32 modules (per graph); fp32 reference sampler (end to end)"
        validation["tolerance"] = {
            "graph": vars(TOLERANCES[precision]),
            "end_to_end": vars(E2E_TOLERANCES[precision]),
            "relative_to": "max(1, max|reference|)",
        }
        sessions, upcast = {}, set()  # upcast: bf16 graphs that ORT on CPU runs upcast to fp32
        for name, io_ in specs.items():
            sessions[name], how = _session_for(tmp / io_.file, precision)
            if how:
                notes[name] = how
                upcast.add(name)
        graphs_v: dict[str, Any] = {}
        validation["graphs"] = graphs_v
        if opts.validate:
            for name, io_ in specs.items():
                gp = graph_precision[name]
                # an int8 graph's activation ranges are calibrated on real inputs: random ones (other scales)
                # would be clipped, so it is validated on real inputs of images not used for calibration
                label = "real (held-out)" if gp == "int8" else "random"
                vfeeds = held_out[name] if gp == "int8" else feeds[name]
                with stage(log, f"validate {io_.file} on {label} inputs") as st:
                    try:
                        res = compare(
                            name,
                            io_,
                            ort_runner(sessions[name], io_),
                            torch_runner(refs[name], io_),
                            vfeeds,
                            io_.tolerances[gp],
                            label,
                        )
                    except ValidationError as e:
                        if gp == "fp32" or (name != "vae_decoder" and gp != "int8"):
                            raise
                        # the reduced-precision graph does not hold: this graph runs fp32 entirely
                        graph_precision[name] = "fp32"
                        if gp == "int8":
                            shutil.copyfile(fp32_dir / io_.file, tmp / io_.file)
                            notes[name] = f"int8 failed validation, falls back to fp32: {e}"
                        else:
                            modules[name] = graph_modules(
                                ckpt.model, ckpt.vae, shapes.guided, precision, "fp32", variants
                            )[name]
                            export_graph(modules[name], io_, tmp / io_.file, feeds[name][0])
                            notes.pop(name, None)
                        sessions[name], _ = _session_for(tmp / io_.file, "fp32")
                        upcast.discard(name)
                        res = compare(
                            name,
                            io_,
                            ort_runner(sessions[name], io_),
                            torch_runner(refs[name], io_),
                            feeds[name],
                            io_.tolerances["fp32"],
                            "random",
                        )
                        label = "random"
                        st["note"] = "falls back to fp32; "
                    graphs_v[name] = {label: res}
                    st["note"] = st.get("note", "") + _worst(res)
    shutil.rmtree(fp32_dir, ignore_errors=True)
    if notes:
        validation["notes"] = notes

    shared = _share_backbone_weights(tmp, specs, log)
    manifest = _manifest(tmp, ckpt_sha, cfg, shapes, specs, graph_precision, precision, validation)
    manifest = manifest.replace(shared_weights=shared)
    if opts.end_to_end:
        graphs_v_real, e2e = _end_to_end(
            tmp, manifest, cfg, ckpt, shapes, specs, sessions, upcast, refs, opts, graph_precision, log
        )
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


def _manifest(
    tmp: Path,
    ckpt_sha: str,
    cfg: FARConfig,
    shapes: GraphShapes,
    specs: dict[str, GraphIO],
    graph_precision: dict[str, str],
    precision: str,
    validation: dict[str, Any],
) -> Manifest:
    graphs = {
        name: GraphSpec(
            file=io_.file,
            sha256=sha256_file(tmp / io_.file),
            inputs=io_.inputs,
            outputs=io_.outputs,
            precision=graph_precision[name],
            fp32_islands=fp32_islands(name, cfg, graph_precision[name])
            if graph_precision[name] != "fp32"
            else (),
            known_capacity=io_.known_capacity,
        )
        for name, io_ in specs.items()
    }
    return Manifest(
        schema_version=SCHEMA_VERSION,
        producer=f"far-export {__version__}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        checkpoint_sha256=ckpt_sha,
        precision=precision,
        batch=shapes.batch,
        cfg_guidance=shapes.guided,
        model=model_info(cfg, shapes),
        graphs=graphs,
        validation=validation,
    )


def _share_backbone_weights(tmp: Path, specs: dict[str, GraphIO], log: Log) -> SharedWeights:
    """The backbone and its encoder variants read one weights file (far_export/shared_weights.py)."""
    files = {n: io_.file for n, io_ in specs.items() if n == "backbone" or is_variant(n)}
    with stage(log, f"share the weights of {', '.join(files)}") as st:
        size, tensors = share_weights(tmp, files)
        st["note"] = f"{SHARED_WEIGHTS_FILE}: {size / 1e6:.1f} MB"
    return SharedWeights(
        file=SHARED_WEIGHTS_FILE,
        sha256=sha256_file(tmp / SHARED_WEIGHTS_FILE),
        graphs=tuple(files),
        tensors=tensors,
    )


MAR_INT8_NOTE = (
    "the MAR head network stays fp32 in an int8 build (an island: its DDPM posterior needs eps to "
    "~1e-4 relative, see far_export/export.py)"
)


def with_backbone_feeds(
    calls: dict[str, list[dict[str, Any]]], limit: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """`calls` (recorded inputs per graph) where the full backbone also gets every encoder variant's inputs
    without `known`: they are valid inputs of it, and the loop may never call the full backbone when the
    variants cover every step. At most `limit` backbone feeds, spread evenly."""
    from far_export.quantize import spread

    feeds = list(calls.get("backbone", []))
    for name, fs in calls.items():
        if is_variant(name):
            feeds += [{k: v for k, v in f.items() if k != "known"} for f in fs]
    if limit:
        feeds = [feeds[i] for i in sorted(spread(len(feeds), limit))]
    return {**calls, "backbone": feeds} if feeds else calls


def tensorrt_missing() -> str | None:
    """Why TensorRT plans cannot be built here (tensorrt or a GPU missing), or None."""
    from far_export.tensorrt import TensorRTUnavailable, detect_device

    try:
        detect_device()
    except TensorRTUnavailable as e:
        return str(e)
    return None


def _quantize(
    tmp: Path,
    fp32_dir: Path,
    ckpt_sha: str,
    cfg: FARConfig,
    shapes: GraphShapes,
    specs: dict[str, GraphIO],
    graph_precision: dict[str, str],
    opts: BuildOptions,
    log: Log,
) -> dict[str, list[dict[str, Any]]]:
    """Quantize the int8 graphs in place (fp32 copies kept in fp32_dir), calibrated on the inputs the fp32
    graphs were fed while the runtime's loop sampled CALIBRATION_IMAGES images; returns per graph three
    recorded inputs of one more batch (other seeds), the held-out set the quantized graphs are
    validated on."""
    from far_export.quantize import CALIBRATION_IMAGES, MAX_FEEDS, calibration_feeds, quantize_graph
    from runtime.pipeline import steps_per_batch

    sessions = {name: ort_session(tmp / io_.file) for name, io_ in specs.items()}
    fp32 = _manifest(tmp, ckpt_sha, cfg, shapes, specs, dict.fromkeys(specs, "fp32"), "fp32", {})
    steps = steps_per_batch(fp32, shapes.num_iter, cfg.resolved_head_steps)
    batches = max(1, math.ceil(CALIBRATION_IMAGES / shapes.batch))
    seed = opts.seed + 1  # not the end-to-end check's seed
    with stage(
        log, f"int8: record calibration inputs ({batches * shapes.batch} images through the fp32 graphs)"
    ):
        calib = calibration_feeds(SessionBackend(tmp, fp32, sessions), tmp, fp32, steps, seed)
        calib = with_backbone_feeds(calib, MAX_FEEDS)
    with stage(log, "int8: record held-out validation inputs (one more batch)"):
        held = calibration_feeds(
            SessionBackend(tmp, fp32, sessions), tmp, fp32, steps, seed + batches, images=shapes.batch
        )
        held = {g: [f[0], f[len(f) // 2], f[-1]] for g, f in with_backbone_feeds(held).items()}
    fp32_dir.mkdir()
    # TensorRT takes symmetric int8 only: where plans will be built, activations are s8 (zero point 0);
    # elsewhere u8, ONNX Runtime's faster x86 kernels (far_export/quantize.py)
    activations = "s8" if (opts.engines or opts.require_engines) and tensorrt_missing() is None else "u8"
    for name, io_ in specs.items():
        if graph_precision[name] != "int8":
            continue
        with stage(log, f"int8: quantize {io_.file}") as st:
            shutil.copyfile(tmp / io_.file, fp32_dir / io_.file)
            q = quantize_graph(fp32_dir / io_.file, tmp / io_.file, calib[name], activations=activations)
            kept = f", kept fp32: {', '.join(q.kept_fp32)}" if q.kept_fp32 else ""
            st["note"] = f"{q.quantized} weight nodes int8 on {len(calib[name])} recorded inputs{kept}"
    return held


INT8_E2E_IMAGES = 16  # E2E_TOLERANCES["int8"] was measured on 16 images
REAL_CHECK_CALLS = 8  # per graph, of the first batch: the mar-mnist fp16 head failed only at t = 999 calls

BF16_NOTE = (
    "ONNX Runtime on CPU has no bf16 kernels for this graph: validated with its bf16 weights and casts "
    "upcast to fp32 (same graph, activations in fp32)"
)


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


def _end_to_end(
    tmp: Path,
    manifest: Manifest,
    cfg: FARConfig,
    ckpt: Any,
    shapes: GraphShapes,
    specs: dict[str, GraphIO],
    sessions: dict[str, Any],
    upcast: set[str],
    refs: dict[str, Any],
    opts: BuildOptions,
    graph_precision: dict[str, str],
    log: Log,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The runtime's own loop over the build's sessions against the reference sampler, then every graph
    on the inputs that loop fed it (up to REAL_CHECK_CALLS calls of each graph, evenly spaced over the
    first batch: every AR step of the backbone, the head's steps across the schedule)."""
    from far_export.quantize import spread
    from runtime.pipeline import Pipeline, steps_per_batch
    from training.sample import SamplingSettings, decode_tokens, sample_tokens

    # int8's error is a distribution over images (the loop samples a few tokens differently and a stroke
    # moves in some), so its bound is checked on at least INT8_E2E_IMAGES, not on a batch of one
    n = shapes.batch * (math.ceil(INT8_E2E_IMAGES / shapes.batch) if opts.precision == "int8" else 1)
    labels = [i % cfg.num_classes for i in range(n)]
    s = SamplingSettings.resolve(cfg, seed=opts.seed, num_iter=shapes.num_iter)
    s = dataclasses.replace(s, cfg=cfg.cfg if shapes.guided else 1.0)
    calls = steps_per_batch(manifest, shapes.num_iter, s.head_steps)  # per graph, in one batch
    checked = {g: spread(k, REAL_CHECK_CALLS) for g, k in calls.items()}
    backend = RecordingBackend(
        SessionBackend(tmp, as_run_on_cpu(manifest, upcast), sessions),
        keep=lambda graph, i: i in checked[graph],
    )
    pipe = Pipeline(tmp, backend.inner.manifest, backend)
    with (
        stage(
            log,
            f"end to end: sample {n} image{'s' * (n != 1)} with runtime.pipeline over the graphs "
            f"(seed {opts.seed})",
        ),
        _bar("graphs") as bar,
    ):
        B = shapes.batch
        tokens = np.concatenate(
            [pipe.sample_tokens(labels[i : i + B], s, first_index=i, progress=bar) for i in range(0, n, B)]
        )
        image = np.concatenate([pipe.decode(tokens[i : i + B]) for i in range(0, n, B)])
    with stage(log, "end to end: PyTorch reference sampler") as st, _bar("reference") as bar:
        ref_tokens = sample_tokens(ckpt.model, labels, s, progress=bar)
        ref_image = decode_tokens(cfg, ckpt.vae, ref_tokens)
        tok = error_stats(tokens, ref_tokens)
        img = error_stats(image, ref_image)
        st["note"] = f"tokens max {tok['max']:.2g}, image max {img['max']:.2g} mean {img['mean']:.2g}"
    e2e = {"labels": labels, "settings": dataclasses.asdict(s), "tokens": tok, "image": img}
    real: dict[str, Any] = {}
    recorded = with_backbone_feeds(backend.calls)
    with stage(log, "validate graphs on real inputs (recorded while sampling)") as st:
        for name, io_ in specs.items():
            tol = io_.tolerances[graph_precision[name]]
            real[name] = compare(
                name,
                io_,
                ort_runner(sessions[name], io_),
                torch_runner(refs[name], io_),
                recorded[name],
                tol,
                "real",
            )
        st["note"] = "; ".join(f"{n}: {_worst(r)}" for n, r in real.items())
    check(
        img,
        E2E_TOLERANCES[opts.precision],
        "end to end: the image sampled by runtime.pipeline over the graphs",
    )
    e2e["passed"] = True
    return real, e2e


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
        checked = (
            "validated with ONNX Runtime" if opts.validate or opts.end_to_end else "exported, not validated"
        )
        log(
            f"TensorRT plans were not built: {e} (ONNX graphs {checked}; build them on the device with "
            f"far-export compile)"
        )
        return manifest

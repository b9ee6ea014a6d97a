"""`far-export build`: checkpoint -> static ONNX graphs -> validation -> manifest -> TensorRT plans.

`build` reads as its stages, each a function over one `_Build` state: export every graph (each described
once in far_export/graphs.py) -> int8: quantize -> validate each graph against PyTorch (one whose record
allows it ships its fp32 export when it fails) -> manifest (the backbone's shared weights included) -> end
to end: the runtime's loop against the reference sampler, and every graph on the inputs it fed -> engines.
Everything is written into a temporary sibling of the output directory (runtime/files.py: build_temp) and
renamed over it at the end, so a failed or interrupted build leaves an existing engine directory as it was.
Each stage prints one line with its time.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from far_export import __version__
from far_export.export import ExportError, export_graph
from far_export.feeds import Feed, run_loop, spread, with_backbone_feeds
from far_export.graphs import BuildGraph, GraphShapes, build_graphs, model_info
from far_export.shared_weights import share_weights
from far_export.tolerances import E2E_TOLERANCES, TOLERANCES
from far_export.validate import (
    SessionBackend,
    ValidationError,
    as_run_on_cpu,
    check,
    check_graph,
    cpu_session,
    error_stats,
    ort_session,
    random_feeds,
)
from runtime.errors import FarError
from runtime.files import build_temp, check_build_output, replace_dir, signals_held, sweep_stale
from runtime.limits import ENCODER_VARIANTS, MAX_BATCH, MAX_ENCODER_VARIANTS
from runtime.manifest import (
    PRECISIONS,
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
from runtime.schedule import SamplingSettings


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


def tensorrt_missing() -> str | None:
    """Why TensorRT plans cannot be built here (tensorrt or a GPU missing), or None."""
    from far_export.tensorrt import TensorRTUnavailable, detect_device

    try:
        detect_device()
    except TensorRTUnavailable as e:
        return str(e)
    return None


BF16_NEEDS_A_GPU = (
    "bf16: this engine directory runs on a GPU only, with TensorRT (far-export compile, then --backend trt) "
    "or ONNX Runtime's CUDA provider (--providers cuda); ONNX Runtime on a CPU has no bf16 kernels"
)


def build(
    checkpoint_dir: str | Path, out_dir: str | Path, options: BuildOptions | None = None, log: Log = print
) -> Manifest:
    """Build an engine directory from a checkpoint directory; returns the manifest written."""
    opts = (options or BuildOptions()).check()
    out = Path(out_dir)
    check_build_output(out, Path(checkpoint_dir), BuildError)
    sweep_stale(out)
    if opts.require_engines:  # fail before a long export, not after it
        why = tensorrt_missing()
        if why:
            raise BuildError(f"--require-engines: TensorRT plans cannot be built here: {why}")

    from training.checkpoint import checkpoint_sha256, load_checkpoint
    from training.config import DiTConfig

    with stage(log, f"load checkpoint {checkpoint_dir}") as info:
        ckpt = load_checkpoint(checkpoint_dir)
        cfg = ckpt.cfg
        if isinstance(cfg, DiTConfig):
            raise BuildError(
                f"{checkpoint_dir} is a DiT checkpoint: far-export builds FAR and MAR engines only; "
                f"sample it with `python training/sample.py --checkpoint {checkpoint_dir}`"
            )
        ckpt_sha = checkpoint_sha256(checkpoint_dir)
        info["note"] = (
            f"{cfg.backbone} backbone, {cfg.head} head, "
            f"{sum(p.numel() for p in ckpt.model.parameters()) / 1e6:.1f}M params"
        )
    guided = cfg.cfg != 1.0 if opts.cfg_guidance is None else opts.cfg_guidance
    try:
        shapes = GraphShapes.for_config(cfg, opts.batch, guided, opts.num_iter, opts.encoder_variants)
    except ExportError as e:
        raise BuildError(str(e)) from None
    graphs = build_graphs(ckpt.model, ckpt.vae, shapes, opts.precision)

    with build_temp(out, BuildError) as tmp:
        st = _Build(tmp, out, opts, log, ckpt, ckpt_sha, shapes, model_info(cfg, shapes), graphs)
        manifest = _build_into(st)
        with signals_held():  # one rename on Linux; elsewhere a death between two is undone by recover_old
            replace_dir(tmp, out)
    log(f"wrote {out} ({opts.precision}, batch {shapes.batch}, cfg guidance {'on' if guided else 'off'})")
    if opts.precision == "bf16":
        log(BF16_NEEDS_A_GPU)
    return manifest


@dataclass
class _Build:
    """What the stages share: where they write, the graphs they build and what they found on the way."""

    tmp: Path  # the staged engine directory
    out: Path
    opts: BuildOptions
    log: Log
    ckpt: Any  # training.checkpoint.Checkpoint: the fp32 model and VAE
    ckpt_sha: str
    shapes: GraphShapes
    info: ModelInfo  # the manifest's model
    graphs: dict[str, BuildGraph]  # replaced by its fp32 record when a graph falls back
    feeds: dict[str, list[Feed]] = field(default_factory=dict)  # random inputs per graph
    held_out: dict[str, list[Feed]] = field(default_factory=dict)  # int8: real inputs, not calibrated on
    sessions: dict[str, Any] = field(default_factory=dict)  # ONNX Runtime on CPU, per graph
    upcast: dict[str, str] = field(default_factory=dict)  # bf16 graphs run upcast to fp32 there, and why
    validation: dict[str, Any] = field(default_factory=dict)

    @property
    def fp32_dir(self) -> Path:
        """int8: the fp32 exports a quantized graph falls back to (removed before the manifest)."""
        return self.tmp / ".fp32"

    @property
    def notes(self) -> dict[str, str]:
        """Per graph, why it runs or is checked otherwise than the build asked."""
        notes = {n: g.note or self.upcast.get(n) for n, g in self.graphs.items()}
        return {n: note for n, note in notes.items() if note}


def _build_into(st: _Build) -> Manifest:
    _export(st)
    if st.opts.precision == "int8":
        _quantize(st)
    if st.opts.validate or st.opts.end_to_end:
        _open_sessions(st)
    if st.opts.validate:
        _validate(st)
    shutil.rmtree(st.fp32_dir, ignore_errors=True)
    if st.notes:
        st.validation["notes"] = st.notes
    manifest = _manifest(st)
    if st.opts.end_to_end:
        _end_to_end(st, manifest)
    if st.validation:
        st.validation["passed"] = True
        manifest = manifest.replace(validation=st.validation)
    manifest.save(st.tmp)
    if st.opts.engines or st.opts.require_engines:
        _engines(st, manifest)
    return load_manifest(st.tmp)  # re-read: what the runtime will see


# ----------------------------------------------------------------------------
# Export and quantize
# ----------------------------------------------------------------------------


def _export(st: _Build) -> None:
    st.feeds = {name: random_feeds(st.info, g.spec) for name, g in st.graphs.items()}
    for name, g in st.graphs.items():
        with stage(st.log, f"export {g.file}") as info:
            export_graph(g.module, g.spec, st.tmp / g.file, st.feeds[name][0])
            info["note"] = f"{(st.tmp / g.file).stat().st_size / 1e6:.1f} MB"


def _quantize(st: _Build) -> None:
    """Quantize the int8 graphs in place (their fp32 exports kept in fp32_dir), calibrated on the inputs the
    fp32 graphs were fed while the runtime's loop sampled CALIBRATION_IMAGES images; the inputs of one more
    batch (other seeds), three per graph, become the held-out set the quantized graphs are validated on."""
    from far_export.quantize import CALIBRATION_IMAGES, MAX_FEEDS, calibration_sets, quantize_graph
    from runtime.pipeline import steps_per_batch

    tmp, B = st.tmp, st.shapes.batch
    sessions = {name: ort_session(tmp / g.file) for name, g in st.graphs.items()}
    fp32 = _manifest_of(st, {n: g.spec for n, g in st.graphs.items()}, fp32=True)
    steps = steps_per_batch(fp32, st.shapes.num_iter, st.info.head_steps)
    images = max(1, math.ceil(CALIBRATION_IMAGES / B)) * B
    with stage(
        st.log,
        f"int8: record calibration inputs ({images} images through the fp32 graphs) and held-out "
        f"validation inputs (one more batch)",
    ):
        backend = SessionBackend(tmp, fp32, sessions)
        seed = st.opts.seed + 1  # not the end-to-end check's seed
        calib, held = calibration_sets(backend, tmp, fp32, steps, seed, images, held_out_images=B)
        calib = with_backbone_feeds(calib, MAX_FEEDS)
        st.held_out = {g: [f[0], f[len(f) // 2], f[-1]] for g, f in with_backbone_feeds(held).items()}
    st.fp32_dir.mkdir()
    # TensorRT takes symmetric int8 only: where plans will be built, activations are s8 (zero point 0);
    # elsewhere u8, ONNX Runtime's faster x86 kernels (far_export/quantize.py)
    engines = (st.opts.engines or st.opts.require_engines) and tensorrt_missing() is None
    activations = "s8" if engines else "u8"
    for name, g in st.graphs.items():
        if g.precision != "int8":
            continue
        with stage(st.log, f"int8: quantize {g.file}") as info:
            shutil.copyfile(tmp / g.file, st.fp32_dir / g.file)
            q = quantize_graph(st.fp32_dir / g.file, tmp / g.file, calib[name], activations=activations)
            kept = f", kept fp32: {', '.join(q.kept_fp32)}" if q.kept_fp32 else ""
            info["note"] = f"{q.quantized} weight nodes int8 on {len(calib[name])} recorded inputs{kept}"


# ----------------------------------------------------------------------------
# Validate, with the fallback each record allows
# ----------------------------------------------------------------------------


def _open_sessions(st: _Build) -> None:
    import onnxruntime as ort

    p = st.opts.precision
    st.validation["backend"] = f"onnxruntime {ort.__version__} (CPUExecutionProvider)"
    st.validation["reference"] = "PyTorch fp32 modules (per graph); fp32 reference sampler (end to end)"
    st.validation["tolerance"] = {
        "graph": vars(TOLERANCES[p]),
        "end_to_end": vars(E2E_TOLERANCES[p]),
        "relative_to": "max(1, max|reference|)",
    }
    for name, g in st.graphs.items():
        st.sessions[name], how = cpu_session(st.tmp / g.file, g.precision)
        if how:
            st.upcast[name] = how
    st.validation["graphs"] = {}


def _validate(st: _Build) -> None:
    """Each graph on its own inputs: random ones, or for an int8 graph real held-out ones (its activation
    ranges are calibrated on real inputs: random ones, at other scales, would be clipped)."""
    for name in list(st.graphs):
        g = st.graphs[name]
        label = "real (held-out)" if g.precision == "int8" else "random"
        feeds = st.held_out[name] if g.precision == "int8" else st.feeds[name]
        with stage(st.log, f"validate {g.file} on {label} inputs") as info:
            try:
                res = check_graph(g, st.sessions[name], feeds, label)
            except ValidationError as e:
                if not g.falls_back:
                    raise
                g = _fall_back(st, g, e)
                label = "random"
                res = check_graph(g, st.sessions[name], st.feeds[name], label)
                info["note"] = f"falls back to fp32 ({e}); "
            st.validation["graphs"][name] = {label: res}
            info["note"] = info.get("note", "") + _worst(res)


def _fall_back(st: _Build, g: BuildGraph, why: ValidationError) -> BuildGraph:
    """The graph ships as its fp32 export: the copy kept before quantization, else the reference's export."""
    kept = st.fp32_dir / g.file
    fp32 = g.as_fp32(f"{g.precision} failed validation, falls back to fp32: {why}")
    if kept.exists():
        shutil.copyfile(kept, st.tmp / g.file)
    else:
        export_graph(fp32.module, fp32.spec, st.tmp / g.file, st.feeds[g.name][0])
    st.graphs[g.name] = fp32
    st.sessions[g.name], _ = cpu_session(st.tmp / g.file, "fp32")
    st.upcast.pop(g.name, None)
    return fp32


def _worst(res: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} max {v['max']:.2g} p99 {v['p99']:.2g}" for k, v in res.items())


# ----------------------------------------------------------------------------
# Manifest
# ----------------------------------------------------------------------------


def _manifest(st: _Build) -> Manifest:
    shared = _share_backbone_weights(st)
    manifest = _manifest_of(st, {n: g.spec for n, g in st.graphs.items()}, validation=st.validation)
    return manifest.replace(shared_weights=shared)


def _manifest_of(
    st: _Build, specs: dict[str, GraphSpec], fp32: bool = False, validation: dict[str, Any] | None = None
) -> Manifest:
    """The manifest of the graphs in st.tmp (`fp32`: read as the fp32 build they were exported as)."""
    graphs = {
        name: dataclasses.replace(
            s,
            sha256=sha256_file(st.tmp / s.file),
            **({"precision": "fp32", "fp32_islands": ()} if fp32 else {}),
        )
        for name, s in specs.items()
    }
    return Manifest(
        schema_version=SCHEMA_VERSION,
        producer=f"far-export {__version__}",
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        checkpoint_sha256=st.ckpt_sha,
        precision="fp32" if fp32 else st.opts.precision,
        batch=st.shapes.batch,
        cfg_guidance=st.shapes.guided,
        model=st.info,
        graphs=graphs,
        validation=validation or {},
    )


def _share_backbone_weights(st: _Build) -> SharedWeights:
    """The backbone and its encoder variants read one weights file (far_export/shared_weights.py)."""
    files = {n: g.file for n, g in st.graphs.items() if n == "backbone" or is_variant(n)}
    with stage(st.log, f"share the weights of {', '.join(files)}") as info:
        size, tensors = share_weights(st.tmp, files)
        info["note"] = f"{SHARED_WEIGHTS_FILE}: {size / 1e6:.1f} MB"
    return SharedWeights(
        file=SHARED_WEIGHTS_FILE,
        sha256=sha256_file(st.tmp / SHARED_WEIGHTS_FILE),
        graphs=tuple(files),
        tensors=tensors,
    )


# ----------------------------------------------------------------------------
# End to end, and every graph on the inputs the loop fed it
# ----------------------------------------------------------------------------

INT8_E2E_IMAGES = 16  # E2E_TOLERANCES["int8"] bounds a distribution over images: at least 16 of them
REAL_CHECK_CALLS = 8  # per graph, of the first batch: the head's steps across the schedule (t = T included)


def _end_to_end(st: _Build, manifest: Manifest) -> None:
    """The runtime's own loop over the build's sessions against the reference sampler, then every graph
    on the inputs that loop fed it (up to REAL_CHECK_CALLS calls of each graph, evenly spaced over the
    first batch: every AR step of the backbone, the head's steps across the schedule)."""
    from runtime.pipeline import steps_per_batch
    from training.sample import decode_tokens, sample_tokens

    B, cfg = st.shapes.batch, st.ckpt.cfg
    # int8's error is a distribution over images (the loop samples a few tokens differently and a stroke
    # moves in some), so its bound is checked on at least INT8_E2E_IMAGES, not on a batch of one
    n = B * (math.ceil(INT8_E2E_IMAGES / B) if st.opts.precision == "int8" else 1)
    labels = [i % cfg.num_classes for i in range(n)]
    s = SamplingSettings.resolve(st.info, seed=st.opts.seed)
    calls = steps_per_batch(manifest, st.shapes.num_iter, s.head_steps)  # per graph, in one batch
    checked = {g: spread(k, REAL_CHECK_CALLS) for g, k in calls.items()}
    cpu = as_run_on_cpu(manifest, set(st.upcast))
    with (
        stage(
            st.log,
            f"end to end: sample {n} image{'s' * (n != 1)} with runtime.pipeline over the graphs "
            f"(seed {st.opts.seed})",
        ),
        _bar("graphs") as bar,
    ):
        run = run_loop(
            st.tmp,
            cpu,
            SessionBackend(st.tmp, cpu, st.sessions),
            [(labels[i : i + B], s, i) for i in range(0, n, B)],
            keep=lambda graph, i: i in checked[graph],
            progress=bar,
        )
    with stage(st.log, "end to end: PyTorch reference sampler") as info, _bar("reference") as bar:
        ref_tokens = sample_tokens(st.ckpt.model, labels, s, progress=bar)
        ref_image = decode_tokens(cfg, st.ckpt.vae, ref_tokens)
        tok = error_stats(run.tokens, ref_tokens)
        img = error_stats(run.images, ref_image)
        info["note"] = f"tokens max {tok['max']:.2g}, image max {img['max']:.2g} mean {img['mean']:.2g}"
    e2e = {"labels": labels, "settings": dataclasses.asdict(s), "tokens": tok, "image": img}
    recorded = with_backbone_feeds(run.calls)
    with stage(st.log, "validate graphs on real inputs (recorded while sampling)") as info:
        real = {
            name: check_graph(g, st.sessions[name], recorded[name], "real") for name, g in st.graphs.items()
        }
        info["note"] = "; ".join(f"{n}: {_worst(r)}" for n, r in real.items())
    for name, res in real.items():
        st.validation["graphs"].setdefault(name, {})["real"] = res
    check(
        img,
        E2E_TOLERANCES[st.opts.precision],
        "end to end: the image sampled by runtime.pipeline over the graphs",
    )
    e2e["passed"] = True
    st.validation["end_to_end"] = e2e


@contextmanager
def _bar(desc: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr for the long sampling stages (only on a terminal)."""
    from tqdm import tqdm

    with tqdm(desc=desc, unit="step", leave=False, disable=not sys.stderr.isatty()) as bar:

        def update(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        yield update


# ----------------------------------------------------------------------------
# TensorRT plans
# ----------------------------------------------------------------------------


def _engines(st: _Build, manifest: Manifest) -> None:
    from far_export.tensorrt import EngineSettings, TensorRTUnavailable, compile_engines

    opts = st.opts
    settings = EngineSettings(workspace_gb=opts.workspace_gb, opt_level=opts.opt_level)
    try:
        compile_engines(st.tmp, manifest, settings, previous=st.out if st.out.is_dir() else None, log=st.log)
    except TensorRTUnavailable as e:
        if opts.require_engines:
            raise BuildError(f"TensorRT plans were not built: {e}") from None
        checked = (
            "validated with ONNX Runtime" if opts.validate or opts.end_to_end else "exported, not validated"
        )
        st.log(
            f"TensorRT plans were not built: {e} (ONNX graphs {checked}; build them on the device with "
            f"far-export compile)"
        )

"""TensorRT plans from the ONNX graphs of an engine directory: thin, typed, import-lazy.

Imports neither torch nor `training`, so `far-export compile` runs on a device (a
Jetson with JetPack's TensorRT) from an engine directory exported elsewhere.

Precision lives in the ONNX graphs: every network is built strongly typed
(`NetworkDefinitionCreationFlag.STRONGLY_TYPED`), which TensorRT 10.3 (JetPack 6)
through 11.x support and which needs no precision builder flags (TensorRT 11 has
none). Each plan has a build key = sha256(graph sha256 + settings + TensorRT version +
GPU): a plan whose key is unchanged is reused, not rebuilt. The GPU is read by the
runtime's one probe (`runtime/device.py`), which the TensorRT backend uses too.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from far_export.tolerances import PLAN_TOLERANCES, describe_error, error_stats, within
from runtime.device import DeviceError, DeviceInfo, describe, import_tensorrt, probe
from runtime.errors import FarError
from runtime.files import write_atomic
from runtime.manifest import (
    EngineSpec,
    GraphSpec,
    Manifest,
    ManifestError,
    ModelInfo,
    load_manifest,
    sha256_file,
)


class TensorRTUnavailable(FarError, RuntimeError):
    """tensorrt or a CUDA GPU is missing: plans cannot be built here."""


class EngineBuildError(FarError, RuntimeError):
    """TensorRT failed to parse a graph or to build or validate a plan."""


@dataclass(frozen=True)
class EngineSettings:
    workspace_gb: float = 4.0  # builder memory pool limit
    opt_level: int = 3  # builder_optimization_level, 0..5
    timing_cache: bool = True

    def check(self) -> EngineSettings:
        if not (math.isfinite(self.workspace_gb) and 0 < self.workspace_gb <= 1024):
            raise EngineBuildError(f"--workspace-gb must be a number in (0, 1024], got {self.workspace_gb}")
        if not 0 <= self.opt_level <= 5:
            raise EngineBuildError(f"builder optimisation level must be in 0..5, got {self.opt_level}")
        return self

    def key_fields(self) -> dict[str, Any]:
        return asdict(self)


def detect_device() -> DeviceInfo:
    """TensorRT version and GPU 0 (runtime/device.py's probe); TensorRTUnavailable when either is missing."""
    try:
        return probe()
    except DeviceError as e:
        raise TensorRTUnavailable(str(e)) from None


def _import_tensorrt() -> Any:
    try:
        return import_tensorrt()
    except DeviceError as e:
        raise TensorRTUnavailable(str(e)) from None


def build_key(onnx_sha256: str, settings: EngineSettings, device: DeviceInfo) -> str:
    """What a plan depends on: the graph, the builder settings, TensorRT and the GPU (not the driver)."""
    gpu = {k: getattr(device, k) for k in ("tensorrt_version", "gpu_name", "compute_capability", "sm_count")}
    payload = {"onnx": onnx_sha256, "settings": settings.key_fields(), "device": gpu}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_name(graph: str, device: DeviceInfo) -> str:
    """Plans carry the TensorRT version in their name (they load only there)."""
    return f"{graph}.trt{device.tensorrt_version}.plan"


def build_plan(
    onnx_path: Path,
    plan_path: Path,
    settings: EngineSettings,
    cache_path: Path | None,
    log: Callable[[str], None] = print,
) -> None:
    """Parse one ONNX graph into a strongly typed network and serialize its plan."""
    trt = _import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):  # deprecated in 10, gone in 11
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineBuildError(f"TensorRT cannot parse {onnx_path.name}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(settings.workspace_gb * (1 << 30)))
    config.builder_optimization_level = settings.opt_level
    if settings.timing_cache and cache_path is not None:
        attach_timing_cache(config, cache_path.read_bytes() if cache_path.is_file() else b"", log)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build a plan from {onnx_path.name} (see its log above)")
    write_atomic(plan_path, bytes(plan))
    if settings.timing_cache and cache_path is not None:
        cache = config.get_timing_cache()  # updated by the build; None if TensorRT kept none
        if cache is not None:
            write_atomic(cache_path, bytes(cache.serialize()))


def timing_cache_name(device: DeviceInfo) -> str:
    """Timing caches are keyed by TensorRT version and compute capability: one from elsewhere is not
    offered."""
    return f"timing.trt{device.tensorrt_version}.sm{device.compute_capability}.cache"


def timing_cache_choice(had_blob: bool, accepted: bool) -> str:
    """What to do after `set_timing_cache` answered `accepted` for a cache made from a previous blob or not:
    "use" it, start a "fresh" one (TensorRT refused the old one: another device or version), or "fail"."""
    if accepted:
        return "use"
    return "fresh" if had_blob else "fail"


def attach_timing_cache(config: Any, blob: bytes, log: Callable[[str], None] = print) -> Any:
    """Attach a timing cache made from `blob` (b"": empty) to a builder config. `set_timing_cache` returns
    False for a cache from another device or TensorRT version (ignore_mismatch=False): then a fresh one."""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # a truncated or foreign file: TensorRT may raise instead of returning None
        cache = None
    accepted = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
    choice = timing_cache_choice(bool(blob), accepted)
    if choice == "fresh":
        log(
            "timing cache: TensorRT refused the stored one (another GPU or TensorRT version); "
            "starting a fresh one"
        )
        cache = config.create_timing_cache(b"")
        accepted = cache is not None and bool(config.set_timing_cache(cache, ignore_mismatch=False))
        choice = timing_cache_choice(False, accepted)
    if choice == "fail":
        raise EngineBuildError("TensorRT refused even an empty timing cache (see its log above)")
    return cache


def plan_validation_missing() -> str | None:
    """What plan validation needs and is not installed here (None: all there)."""
    import importlib.util

    missing = [m for m in ("onnxruntime", "onnx") if importlib.util.find_spec(m) is None]
    return ", ".join(missing) or None


def validate_plan(
    onnx_path: Path, plan_path: Path, graph: str, spec: GraphSpec, model: ModelInfo, count: int = 2
) -> dict[str, Any]:
    """Run the plan (TensorRT, through runtime/trt.py's run_plan: the backend's own CUDA calls, no
    polygraphy, whose CUDA wrapper does not find pip's libcudart) and the graph (ONNX Runtime on CPU; bf16
    graphs upcast to fp32) on the same valid random inputs; EngineBuildError when an output differs beyond
    the precision's PLAN_TOLERANCES (far_export/tolerances.py, the scheme every comparison uses)."""
    import numpy as np
    import onnxruntime as ort

    from far_export.feeds import example_inputs, upcast_bf16
    from runtime.backends import BackendError
    from runtime.trt import run_plan

    tol = PLAN_TOLERANCES[spec.precision]
    source = upcast_bf16(onnx_path) if spec.precision == "bf16" else str(onnx_path)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    rng = np.random.Generator(np.random.PCG64(1234))
    plan = plan_path.read_bytes()
    worst: dict[str, float] = {}
    for _ in range(count):
        feed = example_inputs(model, spec, rng)  # bf16 inputs: bf16-exact float32
        ref = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))
        try:
            got = run_plan(plan, feed)
        except (BackendError, DeviceError) as e:
            raise EngineBuildError(f"running the TensorRT plan of the {graph} graph failed: {e}") from None
        for t in spec.outputs:
            stats = error_stats(np.asarray(got[t.name], np.float32), np.asarray(ref[t.name], np.float32))
            if not within(stats, tol):
                raise EngineBuildError(
                    f"the TensorRT plan of the {graph} graph differs from ONNX Runtime in "
                    f"{t.name}: {describe_error(stats, tol)}"
                )
            worst[t.name] = max(worst.get(t.name, 0.0), stats["max"] / stats["scale"])
    return {
        "tolerance": asdict(tol),
        "inputs": count,
        "passed": True,
        "max_rel_error": worst,
        "compared_with": "onnxruntime CPU",
    }


def asymmetric_int8(path: Path) -> bool:
    """Whether a QDQ graph quantizes activations to uint8 (a zero point that is not int8 0): TensorRT
    takes symmetric int8 only (Developer Guide, "Working with Quantized Types": zero point must be 0)."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits:
            zp = numpy_helper.to_array(inits[n.input[2]])
            if zp.dtype != np.int8 or zp.any():
                return True
    return False


def compile_engines(
    directory: str | Path,
    manifest: Manifest,
    settings: EngineSettings | None = None,
    previous: str | Path | None = None,
    validate: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """Build (or reuse) a plan per graph of `directory`; returns the manifest with its engines, saved.

    `previous`: an older engine directory whose plans may be reused when their build key matches."""
    import time

    settings = settings or EngineSettings()
    directory = Path(directory)
    device = detect_device()  # first: without TensorRT a build goes on without plans
    if manifest.precision == "int8":
        u8 = [
            g
            for g, spec in manifest.graphs.items()
            if spec.precision == "int8" and asymmetric_int8(directory / spec.file)
        ]
        if u8:
            raise EngineBuildError(
                f"the int8 graph {u8[0]!r} has uint8 (asymmetric) activations, which TensorRT cannot build: "
                "rebuild the directory on this machine with far-export build --precision int8 (TensorRT "
                "present: symmetric int8), or use --precision fp16"
            )
    log(f"device: {describe(device)}")
    if validate:
        missing = plan_validation_missing()
        if missing:
            log(
                f"plan validation skipped: {missing} not installed here "
                "(pip install onnx onnxruntime, or onnxruntime-gpu; "
                "on Jetson from its wheel index)"
            )
            validate = False
    cache_path = directory / timing_cache_name(device) if settings.timing_cache else None
    if cache_path is not None and previous is not None and not cache_path.exists():
        old_cache = Path(previous) / cache_path.name
        if old_cache.is_file():
            shutil.copy2(old_cache, cache_path)
    old = _old_engines(previous)
    engines: dict[str, EngineSpec] = {}
    staged: list[tuple[Path, Path]] = []  # new plans are moved into place only when every graph succeeded
    try:
        for name, g in manifest.graphs.items():
            key = build_key(manifest.content_sha256(name), settings, device)
            plan = directory / plan_name(name, device)
            t0 = time.perf_counter()
            prev = old.get(name)
            reused = _reuse(prev, key, Path(previous) if previous else directory, plan)
            if reused:
                target, checks = plan, dict((prev.settings if prev else {}).get("validation", {}))
            else:
                target = plan.with_name(plan.name + ".new")
                staged.append((target, plan))
                build_plan(directory / g.file, target, settings, cache_path, log)
                checks = (
                    validate_plan(directory / g.file, target, name, g, manifest.model) if validate else {}
                )
            engines[name] = EngineSpec(
                file=plan.name,
                sha256=sha256_file(target),
                tensorrt_version=device.tensorrt_version,
                gpu_name=device.gpu_name,
                compute_capability=device.compute_capability,
                onnx_sha256=g.sha256,
                build_key=key,
                settings={**settings.key_fields(), "strongly_typed": True, "validation": checks},
                sm_count=device.sm_count,
                total_memory_mb=device.total_memory_mb,
            )
            log(
                f"{'reuse' if reused else 'build'} TensorRT plan {plan.name} "
                f"({time.perf_counter() - t0:.1f}s)"
            )
    except BaseException:
        for src, _ in staged:
            src.unlink(missing_ok=True)
        raise
    for src, dst in staged:
        src.replace(dst)
    new = manifest.replace(
        engines=engines, timing_cache=cache_path.name if cache_path and cache_path.exists() else None
    )
    new.save(directory)
    return new


def _old_engines(previous: str | Path | None) -> dict[str, EngineSpec]:
    if previous is None:
        return {}
    try:
        return load_manifest(previous, verify=False).engines
    except (ManifestError, OSError):  # an unreadable old directory just means nothing to reuse
        return {}


def _reuse(old: EngineSpec | None, key: str, old_dir: Path, plan: Path) -> bool:
    if old is None or old.build_key != key:
        return False
    src = old_dir / old.file
    if not src.is_file() or sha256_file(src) != old.sha256:
        return False
    if src.resolve() != plan.resolve():
        shutil.copy2(src, plan)
    return True


def compile_directory(
    directory: str | Path,
    settings: EngineSettings | None = None,
    validate: bool = True,
    log: Callable[[str], None] = print,
) -> Manifest:
    """`far-export compile`: plans for the graphs already in an engine directory (no torch)."""
    manifest = load_manifest(directory)
    return compile_engines(directory, manifest, settings, previous=directory, validate=validate, log=log)

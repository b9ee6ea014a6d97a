"""TensorRT plans from the ONNX graphs of an engine directory: thin, typed, import-lazy.

Imports neither torch nor `training`, so `far-export compile` runs on a device (a
Jetson with JetPack's TensorRT) from an engine directory exported elsewhere.

Precision lives in the ONNX graphs: every network is built strongly typed
(`NetworkDefinitionCreationFlag.STRONGLY_TYPED`), which TensorRT 10.3 (JetPack 6)
through 11.x support and which needs no precision builder flags (TensorRT 11 has
none). Each plan has a build key = sha256(graph sha256 + settings + TensorRT version +
GPU): a plan whose key is unchanged is reused, not rebuilt.
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

from runtime.errors import FarError
from runtime.manifest import (
    EngineSpec,
    GraphSpec,
    Manifest,
    ManifestError,
    ModelInfo,
    load_manifest,
    sha256_file,
)

TIMING_CACHE = "timing.cache"


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


@dataclass(frozen=True)
class Device:
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "9.0"


def _import_tensorrt() -> Any:
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable(f"the tensorrt Python package is not installed ({e.msg})") from None
    except Exception as e:  # PyPI's stub wheels raise while trying to fetch the real libraries
        raise TensorRTUnavailable(f"tensorrt cannot be imported ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not hasattr(trt, "Builder"):
        raise TensorRTUnavailable("the installed tensorrt package is a stub without its libraries")
    return trt


def detect_device() -> Device:
    """TensorRT version, GPU name and compute capability; TensorRTUnavailable when any is missing."""
    trt = _import_tensorrt()
    name, cc = _gpu()
    return Device(tensorrt_version=str(trt.__version__), gpu_name=name, compute_capability=cc)


def _gpu() -> tuple[str, str]:
    """(GPU name, "major.minor") of device 0: cuda-python where installed, else the driver's libcuda."""
    try:
        from cuda.bindings import runtime as cudart  # cuda-python >= 12.6
    except ImportError:
        try:
            from cuda import cudart  # older cuda-python
        except ImportError:
            return _gpu_driver()
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count < 1:
        raise TensorRTUnavailable("no CUDA GPU is visible")
    err, prop = cudart.cudaGetDeviceProperties(0)
    if int(err) != 0:
        raise TensorRTUnavailable(f"cannot query the CUDA GPU (cudaError {int(err)})")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    return name.split("\x00")[0].strip(), f"{prop.major}.{prop.minor}"


def _gpu_driver() -> tuple[str, str]:
    """The same through the CUDA driver API (libcuda, present wherever the driver is, Jetson included)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise TensorRTUnavailable("no CUDA driver (libcuda.so.1) is installed") from None
    dev, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    name = ctypes.create_string_buffer(256)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGet(ctypes.byref(dev), 0) != 0:
        raise TensorRTUnavailable("no CUDA GPU is visible (cuInit/cuDeviceGet failed)")
    cuda.cuDeviceGetName(name, 256, dev)
    cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)  # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR
    cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)  # ..._MINOR
    return name.value.decode(errors="replace"), f"{major.value}.{minor.value}"


def build_key(onnx_sha256: str, settings: EngineSettings, device: Device) -> str:
    payload = {"onnx": onnx_sha256, "settings": settings.key_fields(), "device": asdict(device)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def plan_name(graph: str, device: Device) -> str:
    """Plans carry the TensorRT version in their name (they load only there)."""
    return f"{graph}.trt{device.tensorrt_version}.plan"


def build_plan(onnx_path: Path, plan_path: Path, settings: EngineSettings, cache_path: Path | None) -> None:
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
    cache = None
    if settings.timing_cache and cache_path is not None:
        blob = cache_path.read_bytes() if cache_path.is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(f"TensorRT failed to build a plan from {onnx_path.name} (see its log above)")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    tmp.write_bytes(bytes(plan))
    tmp.replace(plan_path)
    if cache is not None and cache_path is not None:
        cache_tmp = cache_path.with_name(cache_path.name + ".tmp")
        cache_tmp.write_bytes(bytes(config.get_timing_cache().serialize()))  # updated by the build
        cache_tmp.replace(cache_path)


def validate_plan(onnx_path: Path, plan_path: Path, graph: str, spec: GraphSpec, model: ModelInfo,
                  atol: float, rtol: float, count: int = 2) -> dict[str, Any]:
    """Run the plan (TensorRT) and the graph (ONNX Runtime on CPU; bf16 graphs upcast to fp32) on the same
    valid random inputs with polygraphy's runners and comparator; EngineBuildError when they disagree."""
    import numpy as np
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator, CompareFunc

    from far_export.feeds import example_inputs, upcast_bf16

    source = upcast_bf16(onnx_path) if spec.precision == "bf16" else str(onnx_path)
    runners = [
        OnnxrtRunner(SessionFromOnnx(source, providers=["CPUExecutionProvider"])),
        TrtRunner(EngineFromBytes(plan_path.read_bytes())),
    ]
    rng = np.random.Generator(np.random.PCG64(1234))
    feeds = [example_inputs(model, spec, rng) for _ in range(count)]
    results = Comparator.run(runners, data_loader=feeds)
    ok = Comparator.compare_accuracy(results, compare_func=CompareFunc.simple(atol=atol, rtol=rtol))
    if not bool(ok):
        raise EngineBuildError(f"the TensorRT plan of the {graph} graph differs from ONNX Runtime beyond "
                               f"atol {atol} / rtol {rtol} (see polygraphy's report above)")
    return {"atol": atol, "rtol": rtol, "inputs": count, "passed": True, "compared_with": "onnxruntime CPU (polygraphy)"}


PLAN_TOLERANCE = {"fp32": (1e-3, 1e-3), "fp16": (5e-2, 5e-2), "bf16": (1e-1, 1e-1)}


def compile_engines(
    directory: str | Path, manifest: Manifest, settings: EngineSettings | None = None,
    previous: str | Path | None = None, validate: bool = True, log: Callable[[str], None] = print,
) -> Manifest:
    """Build (or reuse) a plan per graph of `directory`; returns the manifest with its engines, saved.

    `previous`: an older engine directory whose plans may be reused when their build key matches."""
    import time

    settings = settings or EngineSettings()
    directory = Path(directory)
    device = detect_device()
    cache_path = directory / TIMING_CACHE if settings.timing_cache else None
    if cache_path is not None and previous is not None and not cache_path.exists():
        old_cache = Path(previous) / TIMING_CACHE
        if old_cache.is_file():
            shutil.copy2(old_cache, cache_path)
    old = _old_engines(previous)
    engines: dict[str, EngineSpec] = {}
    staged: list[tuple[Path, Path]] = []  # new plans are moved into place only when every graph succeeded
    try:
        for name, g in manifest.graphs.items():
            key = build_key(g.sha256, settings, device)
            plan = directory / plan_name(name, device)
            t0 = time.perf_counter()
            prev = old.get(name)
            reused = _reuse(prev, key, Path(previous) if previous else directory, plan)
            if reused:
                target, checks = plan, dict((prev.settings if prev else {}).get("validation", {}))
            else:
                target = plan.with_name(plan.name + ".new")
                staged.append((target, plan))
                build_plan(directory / g.file, target, settings, cache_path)
                checks = {}
                if validate:
                    atol, rtol = PLAN_TOLERANCE.get(g.precision, (1e-3, 1e-3))
                    checks = validate_plan(directory / g.file, target, name, g, manifest.model, atol, rtol)
            engines[name] = EngineSpec(
                file=plan.name, sha256=sha256_file(target), tensorrt_version=device.tensorrt_version,
                gpu_name=device.gpu_name, compute_capability=device.compute_capability, onnx_sha256=g.sha256,
                build_key=key, settings={**settings.key_fields(), "strongly_typed": True, "validation": checks},
            )
            log(f"{'reuse' if reused else 'build'} TensorRT plan {plan.name} ({time.perf_counter() - t0:.1f}s)")
    except BaseException:
        for src, _ in staged:
            src.unlink(missing_ok=True)
        raise
    for src, dst in staged:
        src.replace(dst)
    new = manifest.replace(engines=engines, timing_cache=cache_path.name if cache_path and cache_path.exists() else None)
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


def compile_directory(directory: str | Path, settings: EngineSettings | None = None, validate: bool = True,
                      log: Callable[[str], None] = print) -> Manifest:
    """`far-export compile`: plans for the graphs already in an engine directory (no torch)."""
    manifest = load_manifest(directory)
    return compile_engines(directory, manifest, settings, previous=directory, validate=validate, log=log)

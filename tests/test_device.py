"""The GPU half's logic that runs without a GPU: the one CUDA/TensorRT probe (error names, GPU names, which
module a plan was built for), the timing-cache decision, ONNX Runtime's GPU provider options, bench's
memory note and the install extras. The CUDA calls themselves run in scripts/gpu_check.sh on a GPU."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from far_export.tensorrt import EngineBuildError, attach_timing_cache, timing_cache_choice, timing_cache_name
from runtime.device import DeviceError, DeviceInfo, check, cuda_version, gpu_name, plan_mismatch, probe_gpu
from runtime.manifest import EngineSpec
from runtime.ort import ORT_TRT_CACHE, gpu_session_config, provider_options
from runtime.trt import EngineMismatchError, check_engine

ROOT = Path(__file__).resolve().parent.parent
AGX = DeviceInfo("10.3.0", "Orin", "8.7", sm_count=16, total_memory_mb=62_841, integrated=True)
NX = replace(AGX, sm_count=8, total_memory_mb=15_389)  # Orin NX 16GB: the same name and sm 8.7


class _Runtime:
    """The cuda-python calls probe_gpu makes, answering what a machine would (their real signatures:
    each returns (cudaError_t, value); cudaGetErrorName returns (cudaError_t, bytes))."""

    NAMES = {0: b"cudaSuccess", 35: b"cudaErrorInsufficientDriver", 100: b"cudaErrorNoDevice"}

    def __init__(self, count_error: int = 0, count: int = 1, driver: int = 12020, runtime: int = 12060):
        self.count_error, self.count, self.driver, self.runtime = count_error, count, driver, runtime

    def cudaGetErrorName(self, err):
        return 0, self.NAMES[int(err)]

    def cudaGetDeviceCount(self):
        return self.count_error, self.count

    def cudaGetDeviceProperties(self, i):
        return 0, SimpleNamespace(
            name=b"Orin\x00\x00junk",
            major=8,
            minor=7,
            multiProcessorCount=16,
            totalGlobalMem=62_841 << 20,
            integrated=1,
        )

    def cudaDriverGetVersion(self):
        return 0, self.driver

    def cudaRuntimeGetVersion(self):
        return 0, self.runtime


def test_cuda_errors_are_reported_by_name_with_the_fix():
    # cuda-python 13 on JetPack 6's driver (CUDA 12.2)
    with pytest.raises(
        DeviceError,
        match=r"cudaErrorInsufficientDriver; the driver supports CUDA 12.2, the "
        r"installed cuda-python is CUDA 13.0: pip install 'cuda-python>=12,<13'",
    ):
        probe_gpu(_Runtime(count_error=35, runtime=13000))
    with pytest.raises(DeviceError, match="cudaErrorInsufficientDriver; no NVIDIA driver is loaded"):
        probe_gpu(_Runtime(count_error=35, driver=0))
    with pytest.raises(DeviceError, match="cudaErrorNoDevice; no CUDA GPU is visible"):
        probe_gpu(_Runtime(count_error=100))
    with pytest.raises(DeviceError, match="CUDA reports no GPU"):
        probe_gpu(_Runtime(count=0))
    assert check(_Runtime(), (0, 7), "x") == 7 and check(_Runtime(), (0,), "x") is None


def test_real_cuda_bindings_without_a_gpu_name_the_error():
    """The installed cuda-python (scripts/test.sh installs 12.x) on this machine: a real CUDA error name."""
    try:
        from runtime.device import import_cudart, stream_handle

        rt = import_cudart()
    except DeviceError as e:
        pytest.skip(str(e))
    if int(rt.cudaGetDeviceCount()[0]) == 0:
        pytest.skip("a CUDA GPU is usable here: the probe succeeds (scripts/gpu_check.sh)")
    with pytest.raises(DeviceError, match=r"CUDA cudaGetDeviceCount failed: cudaError\w+;") as e:
        probe_gpu(rt)
    assert "\n" not in str(e.value) and "no CUDA GPU is visible" != str(e.value)
    assert stream_handle(rt.cudaStream_t(0)) == 0  # the default stream, by the bindings' documented accessor


def test_probe_reads_the_facts_that_tell_jetson_modules_apart():
    d = probe_gpu(_Runtime(), "10.3.0")
    assert d == DeviceInfo("10.3.0", "Orin", "8.7", 16, 62_841, True, "12.2", "12.6")
    assert gpu_name(b"NVIDIA H200\x00") == gpu_name(" NVIDIA H200 ") == "NVIDIA H200"
    assert cuda_version(12020) == "12.2" and cuda_version(13000) == "13.0"


def _spec(d: DeviceInfo) -> EngineSpec:
    return EngineSpec(
        file="backbone.trt10.3.0.plan",
        sha256="0" * 64,
        tensorrt_version=d.tensorrt_version,
        gpu_name=d.gpu_name,
        compute_capability=d.compute_capability,
        onnx_sha256="1" * 64,
        build_key="2" * 64,
        sm_count=d.sm_count,
        total_memory_mb=d.total_memory_mb,
    )


def test_a_plan_built_on_an_orin_agx_is_refused_on_an_orin_nx():
    check_engine("backbone", _spec(AGX), replace(AGX, total_memory_mb=62_700))  # same module, other boot
    with pytest.raises(
        EngineMismatchError, match=r"built for a Orin with 16 SMs, this one has 8 .*far-export compile"
    ):
        check_engine("backbone", _spec(AGX), NX)
    assert "62841 MB, this one has 31000 MB" in plan_mismatch(AGX, replace(AGX, total_memory_mb=31_000))
    old = replace(AGX, sm_count=0, total_memory_mb=0)  # a manifest written before these fields
    assert plan_mismatch(old, NX) is None


def test_engine_entries_without_the_new_fields_still_load():
    """Manifest.from_dict builds each engine as EngineSpec(**entry): an entry written before sm_count and
    total_memory_mb reads with 0 for both, which plan_mismatch does not compare."""
    entry = {k: v for k, v in _spec(AGX).__dict__.items() if k not in ("sm_count", "total_memory_mb")}
    old = EngineSpec(**json.loads(json.dumps(entry)))
    assert (old.sm_count, old.total_memory_mb) == (0, 0)
    check_engine("backbone", old, NX)


class _Config:
    """IBuilderConfig's timing-cache methods as TensorRT 10/11 document them: set_timing_cache returns False
    for a cache serialized on another device or TensorRT version when ignore_mismatch is False."""

    def __init__(self, foreign: bytes = b"other-gpu"):
        self.foreign, self.attached = foreign, None

    def create_timing_cache(self, blob: bytes):
        return SimpleNamespace(blob=bytes(blob))

    def set_timing_cache(self, cache, ignore_mismatch: bool) -> bool:
        assert ignore_mismatch is False
        if cache.blob == self.foreign:
            return False
        self.attached = cache
        return True


def test_a_timing_cache_from_another_device_is_replaced_by_a_fresh_one():
    assert [timing_cache_choice(b, a) for b, a in ((True, True), (True, False), (False, False))] == [
        "use",
        "fresh",
        "fail",
    ]
    lines: list[str] = []
    cfg = _Config()
    assert attach_timing_cache(cfg, b"this-gpu", lines.append).blob == b"this-gpu" and not lines
    assert attach_timing_cache(cfg, b"other-gpu", lines.append).blob == b"" and "fresh" in lines[0]
    with pytest.raises(EngineBuildError, match="refused even an empty timing cache"):
        attach_timing_cache(_Config(foreign=b""), b"", lines.append)
    assert timing_cache_name(AGX) == "timing.trt10.3.0.sm8.7.cache"


def test_gpu_providers_refuse_cpu_fallback_and_cache_tensorrt_engines(tmp_path):
    import onnxruntime as ort

    assert gpu_session_config(["CPUExecutionProvider"]) == {}
    assert gpu_session_config(["CUDAExecutionProvider", "CPUExecutionProvider"]) == {}  # CPU asked for too
    entries = gpu_session_config(["TensorrtExecutionProvider", "CUDAExecutionProvider"])
    opts = ort.SessionOptions()
    for k, v in entries.items():
        opts.add_session_config_entry(k, v)
    assert opts.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    trt, cuda = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider"], tmp_path)
    assert trt["trt_engine_cache_enable"] == trt["trt_timing_cache_enable"] == "True"
    assert trt["trt_engine_cache_path"] == trt["trt_timing_cache_path"] == str(tmp_path / ORT_TRT_CACHE)
    assert cuda == {}


def test_bench_says_jetson_device_memory_is_system_ram():
    from runtime.bench import BenchResult

    stages = {k: 1.0 for k in ("backbone", "head", "update", "vae", "loop", "prepare", "wall")}
    r = BenchResult(
        "e",
        "trt",
        {"backbone": "masked", "head": "shortcut"},
        {},
        1,
        1,
        stages,
        stages,
        {k: 0.1 for k in stages if k != "wall"},
        0.1,
        1.0,
        {"p50": 1, "p95": 1, "mean": 1, "min": 1},
        {"backbone": 1, "head": 1},
        100.0,
        device_mem_mb=900.0,
        device_mem_shared=True,
    )
    assert "system RAM in use 900 MB (integrated GPU" in r.summary()
    assert "device memory in use 900 MB" in replace(r, device_mem_shared=False).summary()


def _extras() -> dict[str, list[str]]:
    if sys.version_info >= (3, 11):
        import tomllib  # novermin (3.11+; tomli on 3.10)
    else:
        import tomli as tomllib
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(reqs: list[str], machine: str | None = None) -> set[str]:
    """The distributions `reqs` installs (on `machine`: its platform markers evaluated; None: all)."""
    from packaging.requirements import Requirement

    out = set()
    for r in map(Requirement, reqs):
        if machine is None or r.marker is None or r.marker.evaluate({"platform_machine": machine}):
            out.add(r.name.lower())
    return out


def test_no_extra_installs_both_onnxruntime_variants_and_jetson_resolves_on_jetpack():
    extras = _extras()
    for name, reqs in extras.items():
        for machine in ("x86_64", "aarch64"):
            assert not {"onnxruntime", "onnxruntime-gpu"} <= _names(reqs, machine), (name, machine)
    # PyPI has no aarch64 onnxruntime-gpu: the GPU extras take it on x86-64 only
    assert "onnxruntime-gpu" not in _names(extras["gpu"], "aarch64") | _names(extras["cuda13"], "aarch64")
    assert any(r.startswith("tensorrt-cu12>=10.3,<11") for r in extras["gpu"])  # ORT's TensorRT EP links 10
    assert "onnxruntime" not in _names(extras["export"])  # so [export,gpu] installs one variant
    # JetPack 6: tensorrt comes from apt, onnxruntime-gpu from the Jetson wheel index, CUDA 12 bindings
    assert not _names(extras["jetson"]) & {"tensorrt", "onnxruntime-gpu", "onnxruntime"}
    assert any(r.replace(" ", "").startswith("cuda-python>=12.6,<13") for r in extras["gpu"])
    assert "cuda-python>=12.6,<12.7" in extras["jetson"]  # JetPack 6.1/6.2's CUDA, not an SBSA 12.9 build
    assert any(r.replace(" ", "").startswith("cuda-python>=13") for r in extras["cuda13"])


def test_ort_backend_builds_gpu_session_options_and_leaves_cpu_as_it_was(tmp_path, monkeypatch):
    """The SessionOptions and provider options OrtBackend itself builds (sessions are made per graph, later:
    onnxruntime here has no GPU providers, so only their availability is pretended)."""
    import onnxruntime as ort

    from runtime.ort import OrtBackend

    monkeypatch.setattr(
        ort,
        "get_available_providers",
        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
    )
    called = []
    monkeypatch.setattr(ort, "preload_dlls", lambda: called.append("preload"), raising=False)
    fp16 = SimpleNamespace(precision="fp16", shared_weights=None)  # what OrtBackend reads of a manifest
    gpu = OrtBackend(tmp_path, fp16, providers="tensorrt,cuda")
    assert called == ["preload"]  # onnxruntime-gpu's CUDA / cuDNN before the first GPU session
    assert gpu._opts.get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    assert gpu._provider_options[0]["trt_engine_cache_path"] == str(tmp_path / ORT_TRT_CACHE)
    assert gpu._provider_options[0]["trt_fp16_enable"] == "True"
    assert (tmp_path / ORT_TRT_CACHE).is_dir() and gpu._provider_options[1] == {}
    cpu = OrtBackend(tmp_path, SimpleNamespace(precision="fp32", shared_weights=None), providers="cpu")
    assert cpu._provider_options is None
    assert cpu._opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="does not have configuration with key"):
        cpu._opts.get_session_config_entry("session.disable_cpu_ep_fallback")

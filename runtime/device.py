"""One probe of the NVIDIA stack: TensorRT, the CUDA runtime bindings and GPU 0.

The builder (`far_export/tensorrt.py`) records what `probe()` finds in each plan's
EngineSpec; the TensorRT backend (`runtime/trt.py`) probes again and refuses a plan
built for anything else. The GPU's name alone does not tell Jetson modules apart
(every Orin reports "Orin", sm 8.7), so the SM count and the total memory are
recorded too.

CUDA runtime bindings: `cuda.bindings.runtime` (cuda-bindings >= 12.6, and the only
spelling in 13), else `from cuda import cudart` (cuda-python < 12.6). A failing CUDA
call is reported with its error name (`cudaGetErrorName`), e.g.
`cudaErrorInsufficientDriver` when cuda-python 13 meets JetPack 6's driver.
numpy-free, torch-free; imports tensorrt and the bindings only when called.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runtime.errors import FarError

# What to do about the errors a user meets first (the rest are named and left to the CUDA docs).
_HINTS = {
    "cudaErrorInsufficientDriver": "no NVIDIA driver is loaded, or it is older than the CUDA of the "
    "installed cuda-python (install the cuda-python of the driver's CUDA major)",
    "cudaErrorNoDevice": "no CUDA GPU is visible (check nvidia-smi / CUDA_VISIBLE_DEVICES)",
    "cudaErrorDevicesUnavailable": "the GPU is busy or in exclusive-process mode",
}


# Strongly typed networks, DataType.BF16/INT64, ExecutionContextAllocationStrategy: TensorRT 10 (JetPack 6.1
# ships 10.3; JetPack 6.0 ships 8.6, which has none of them).
MIN_TENSORRT = (10, 3)


class DeviceError(FarError, RuntimeError):
    """TensorRT, the CUDA bindings or a usable GPU is missing (one line, with the CUDA error name)."""


@dataclass(frozen=True)
class DeviceInfo:
    """What a TensorRT plan is built for, and what the runtime checks it against."""

    tensorrt_version: str
    gpu_name: str  # normalised by gpu_name()
    compute_capability: str  # "8.7"
    sm_count: int = 0  # multiprocessors: tells an Orin AGX (16) from NX (8) and Nano (4 / 8)
    total_memory_mb: int = 0
    integrated: bool = False  # Jetson: "device" memory is the system RAM, shared with the CPU
    driver_cuda: str = ""  # the CUDA version the driver supports, "12.2"
    runtime_cuda: str = ""  # the CUDA version of the runtime bindings, "12.6"


def gpu_name(raw: bytes | str) -> str:
    """The one normalisation of a GPU name: decoded, cut at the first NUL, stripped."""
    name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return name.split("\x00")[0].strip()


def cuda_version(v: int) -> str:
    """CUDA's integer version (12020) as "12.2"."""
    return f"{v // 1000}.{v % 1000 // 10}"


def import_tensorrt() -> Any:
    """The tensorrt module, or DeviceError saying why not (missing, PyPI download stub, no libraries)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise DeviceError(f"the tensorrt Python package is not installed ({e.msg})") from None
    except Exception as e:  # PyPI's stub wheels raise while trying to fetch the real libraries
        first = str(e).splitlines()[0] if str(e) else ""
        raise DeviceError(f"tensorrt cannot be imported ({type(e).__name__}: {first})") from None
    if not hasattr(trt, "Runtime"):
        raise DeviceError("the installed tensorrt package is a stub without its libraries")
    version = str(getattr(trt, "__version__", "0"))
    if int(version.split(".")[0] or 0) < MIN_TENSORRT[0]:
        raise DeviceError(
            f"TensorRT {version} is too old: far-export needs TensorRT >= {'.'.join(map(str, MIN_TENSORRT))} "
            "(strongly typed networks; JetPack >= 6.1 on Jetson, pip install 'far-export[gpu]' elsewhere)"
        )
    return trt


def import_cudart() -> Any:
    """The CUDA runtime bindings: cuda.bindings.runtime (cuda-bindings 12.6+, 13), else cuda.cudart
    (older)."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise DeviceError(
                "cuda-python is not installed (pip install 'far-export[gpu]', or [jetson])"
            ) from None
    return cudart


def error_name(rt: Any, err: Any) -> str:
    """cudaGetErrorName of a cudaError_t, e.g. "cudaErrorInsufficientDriver"."""
    try:
        result = rt.cudaGetErrorName(err)
        name = result[1] if isinstance(result, tuple) else result
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # an enum member from older bindings still carries its name
        return str(getattr(err, "name", f"cudaError {int(err)}"))


def check(rt: Any, result: Any, what: str) -> Any:
    """The value(s) of a cuda-python call's (err, *values) result; DeviceError naming the error otherwise."""
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        name = error_name(rt, err)
        hint = _HINTS.get(name)
        raise DeviceError(f"CUDA {what} failed: {name}" + (f"; {hint}" if hint else ""))
    return rest[0] if len(rest) == 1 else (tuple(rest) if rest else None)


def probe_gpu(rt: Any, tensorrt_version: str = "") -> DeviceInfo:
    """GPU 0 through the runtime bindings `rt` (import_cudart())."""
    driver = int(check(rt, rt.cudaDriverGetVersion(), "cudaDriverGetVersion"))  # 0: no driver loaded
    runtime = int(check(rt, rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    try:
        count = check(rt, rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    except DeviceError as e:
        if "cudaErrorInsufficientDriver" not in str(e):
            raise
        if driver == 0:
            raise DeviceError(
                "CUDA cudaGetDeviceCount failed: cudaErrorInsufficientDriver; no NVIDIA driver is "
                "loaded (libcuda): not a GPU machine, or the driver is not installed"
            ) from None
        raise DeviceError(
            f"CUDA cudaGetDeviceCount failed: cudaErrorInsufficientDriver; the driver supports CUDA "
            f"{cuda_version(driver)}, the installed cuda-python is CUDA {cuda_version(runtime)}: "
            f"pip install 'cuda-python>={driver // 1000},<{driver // 1000 + 1}' (far-export[gpu] / [jetson] "
            "for CUDA 12, [cuda13] for 13)"
        ) from None
    if count < 1:
        raise DeviceError(f"CUDA reports no GPU; {_HINTS['cudaErrorNoDevice']}")
    prop = check(rt, rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
    return DeviceInfo(
        tensorrt_version=tensorrt_version,
        gpu_name=gpu_name(prop.name),
        compute_capability=f"{prop.major}.{prop.minor}",
        sm_count=int(prop.multiProcessorCount),
        total_memory_mb=int(prop.totalGlobalMem) // 2**20,
        integrated=bool(prop.integrated),
        driver_cuda=cuda_version(driver),
        runtime_cuda=cuda_version(runtime),
    )


def probe() -> DeviceInfo:
    """TensorRT's version and GPU 0; DeviceError (one line) when either is missing."""
    trt = import_tensorrt()
    return probe_gpu(import_cudart(), str(trt.__version__))


def stream_handle(stream: Any) -> int:
    """The cudaStream_t handle as an int, for TensorRT's execute_async_v3. cuda-bindings 12.9.1 / 13.0
    deprecate `int(stream)` for cuda.bindings.utils.get_cuda_native_handle; older bindings have no utils
    module and `int()` is their documented way (their getPtr() is the address of the handle, not the
    handle)."""
    try:
        from cuda.bindings.utils import get_cuda_native_handle
    except ImportError:
        return int(stream)
    return int(get_cuda_native_handle(stream))


def plan_mismatch(built: DeviceInfo, here: DeviceInfo) -> str | None:
    """Why a plan built for `built` must not run `here` (None: it may). Fields an old manifest did not
    record (0 / "") are not compared."""
    if built.tensorrt_version != here.tensorrt_version:
        return f"was built with TensorRT {built.tensorrt_version}, this is {here.tensorrt_version}"
    if built.compute_capability != here.compute_capability or built.gpu_name != here.gpu_name:
        return (
            f"was built for {built.gpu_name} (sm {built.compute_capability}), this GPU is {here.gpu_name} "
            f"(sm {here.compute_capability})"
        )
    if built.sm_count and here.sm_count and built.sm_count != here.sm_count:
        return (
            f"was built for a {built.gpu_name} with {built.sm_count} SMs, this one has {here.sm_count} "
            "(another module of the same family)"
        )
    if (
        built.total_memory_mb
        and here.total_memory_mb
        and abs(built.total_memory_mb - here.total_memory_mb) > (built.total_memory_mb // 20)
    ):
        return (
            f"was built for a {built.gpu_name} with {built.total_memory_mb} MB, this one has "
            f"{here.total_memory_mb} MB (another module of the same family)"
        )
    return None


def describe(d: DeviceInfo) -> str:
    """One line: GPU, SMs, memory, CUDA versions."""
    kind = "shared with the CPU (integrated GPU)" if d.integrated else "device memory"
    mem = f"{d.total_memory_mb} MB {kind}"
    return (
        f"{d.gpu_name} (sm {d.compute_capability}, {d.sm_count} SMs, {mem}); CUDA driver {d.driver_cuda}, "
        f"runtime {d.runtime_cuda}" + (f"; TensorRT {d.tensorrt_version}" if d.tensorrt_version else "")
    )

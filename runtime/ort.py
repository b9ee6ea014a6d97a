"""The ONNX Runtime backend: sessions over an engine directory's graphs, bound once by IO binding over
OrtValues that share the numpy buffers (CPU), or device memory bound by address (the CUDA and TensorRT
providers); the providers' names, options and libraries.

onnxruntime is imported when a backend is opened (`runtime.backends.open_backend("ort", ...)`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import (
    GPU_PROVIDERS,
    PROVIDERS,
    Backend,
    BackendError,
    Call,
    Graph,
)
from runtime.errors import first_line
from runtime.files import utf8_path
from runtime.manifest import GraphSpec, Manifest
from runtime.shared_weights import ONNX_BFLOAT16, SharedInitializers

ROW_ALIGN = 256  # TensorRT's setTensorAddress: "at least 256-byte alignment" (NvInferRuntime.h)


def resolve_providers(providers: Sequence[str] | str | None) -> list[str]:
    """'cpu' / 'cuda,cpu' / ['CUDAExecutionProvider'] -> ONNX Runtime provider names, in order."""
    if providers is None:
        return ["CPUExecutionProvider"]
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p.strip()]
    out = []
    for p in providers:
        p = p.strip()
        full = PROVIDERS.get(p.lower(), p)
        if not full.endswith("ExecutionProvider"):
            raise BackendError(
                f"unknown ONNX Runtime provider {p!r}: use {', '.join(sorted(set(PROVIDERS)))}"
            )
        out.append(full)
    if not out:
        raise BackendError("no ONNX Runtime provider given: use e.g. --providers cpu or --providers cuda")
    return out


class OrtCall(Call):
    def __init__(self, session: Any, binding: Any, keep: list[Any], file: str):
        self._run = session.run_with_iobinding
        self._binding = binding
        self._keep = keep  # the OrtValues (and through them the numpy buffers) the binding points at
        self._file = file

    def run(self) -> None:
        try:
            self._run(self._binding)
        except Exception as e:  # onnxruntime's Fail / InvalidArgument / RuntimeException
            raise BackendError(
                f"ONNX Runtime failed running {self._file}: {first_line(e)} (a manifest that does not match "
                "its graphs, or the device out of memory: rebuild the directory, or free memory)"
            ) from None


class OrtDeviceMemory:
    """Buffers in memory that ONNX Runtime allocates on `device` ("cuda" under a GPU provider), each with the
    host mirror `empty` returns: the host writes the mirror and uploads, the graphs read and write the device
    memory (views by address), and only what is downloaded comes back. On "cpu" it keeps the same discipline
    in separate host memory, so any machine can prove that a loop uploads and downloads what it must."""

    def __init__(self, ort: Any, device: str, provider: str = "CPUExecutionProvider"):
        self._ort, self.device, self._provider = ort, device, provider
        self._buffers: list[tuple[int, np.ndarray, Any]] = []  # (host address, mirror, OrtValue)

    def empty(self, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        if str(dtype) == "bfloat16":
            raise BackendError(
                "bf16 tensors cannot live in ONNX Runtime device buffers here (numpy has no bfloat16); "
                "use --backend trt for bf16 engines"
            )
        mirror = np.zeros(tuple(shape), dtype=np.dtype(dtype))
        try:
            value = self._ort.OrtValue.ortvalue_from_shape_and_type(
                list(mirror.shape), mirror.dtype.type, self.device, 0
            )
        except Exception as e:  # onnxruntime raises RuntimeError and its own types
            raise BackendError(
                f"{self._provider} was asked for but ONNX Runtime cannot allocate {self.device} memory "
                f"({first_line(e)}): install onnxruntime-gpu with a working CUDA, or use --providers cpu"
            ) from None
        value.update_inplace(mirror)
        self._buffers.append((int(mirror.ctypes.data), mirror, value))
        return mirror

    def rows(self, n: int, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        """Backend.rows: rows ROW_ALIGN bytes apart in one buffer (the TensorRT EP takes device addresses
        under TensorRT's rule, 256-byte aligned; ONNX Runtime's CUDA allocations are)."""
        dtype = np.dtype(dtype)
        stride = -(-max(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, 1) // ROW_ALIGN) * ROW_ALIGN
        flat = self.empty((n * stride,), np.uint8)
        inner = np.empty(tuple(shape), dtype).strides
        return np.lib.stride_tricks.as_strided(flat.view(dtype), (n, *shape), (stride, *inner))

    def _find(self, a: np.ndarray) -> tuple[np.ndarray, Any, int]:
        ptr = int(a.ctypes.data)
        for host, mirror, value in self._buffers:
            if host <= ptr < host + max(mirror.nbytes, 1):
                return mirror, value, ptr - host
        raise BackendError("a buffer bound to a device graph must be (a view of) one from empty() or rows()")

    def address(self, a: np.ndarray) -> int:
        mirror, value, offset = self._find(a)
        if not a.flags.c_contiguous or offset + a.nbytes > mirror.nbytes:
            raise BackendError("a buffer bound to a device graph must be contiguous")
        return int(value.data_ptr()) + offset

    def upload(self, arrays: Sequence[np.ndarray]) -> None:
        for a in arrays:  # whole buffers: ONNX Runtime copies an OrtValue in and out whole
            mirror, value, _ = self._find(a)
            value.update_inplace(mirror)

    def download(self, arrays: Sequence[np.ndarray]) -> None:
        for a in arrays:
            mirror, value, _ = self._find(a)
            mirror[...] = value.numpy()


class OrtGraph(Graph):
    def __init__(
        self, ort: Any, session: Any, spec: GraphSpec, path: Path, memory: OrtDeviceMemory | None = None
    ):
        self._ort, self.session, self.spec, self._memory = ort, session, spec, memory
        _check_session_io(session, spec, path)

    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Call:
        self.check_buffers(inputs, outputs)
        binding = self.session.io_binding()
        if self._memory is not None:  # device memory, bound by address (views of the tables too)
            mem = self._memory
            for name, a in inputs.items():
                binding.bind_input(name, mem.device, 0, a.dtype.type, list(a.shape), mem.address(a))
            for name, a in outputs.items():
                binding.bind_output(name, mem.device, 0, a.dtype.type, list(a.shape), mem.address(a))
            return OrtCall(self.session, binding, [], self.spec.file)
        dtypes = {t.name: t.dtype for t in (*self.spec.inputs, *self.spec.outputs)}
        keep = []
        for names, bind in ((inputs, binding.bind_ortvalue_input), (outputs, binding.bind_ortvalue_output)):
            for name, array in names.items():
                value = self._ortvalue(array, dtypes[name])
                bind(name, value)
                keep.append(value)
        return OrtCall(self.session, binding, keep, self.spec.file)

    def _ortvalue(self, array: np.ndarray, dtype: str) -> Any:
        """An OrtValue over the numpy memory (shared, not copied, on CPU)."""
        if dtype == "bfloat16":
            return self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, ONNX_BFLOAT16)
        return self._ort.OrtValue.ortvalue_from_numpy(array)


def _check_session_io(session: Any, spec: GraphSpec, path: Path) -> None:
    """The graph file's inputs and outputs are the manifest's (names, static shapes)."""
    for kind, declared, actual in (
        ("inputs", spec.inputs, session.get_inputs()),
        ("outputs", spec.outputs, session.get_outputs()),
    ):
        want = {t.name: t.shape for t in declared}
        got = {a.name: tuple(a.shape) for a in actual}
        if set(want) != set(got):
            raise BackendError(
                f"{path.name}: graph {kind} {sorted(got)} differ from the manifest's {sorted(want)}"
            )
        for name, shape in want.items():
            if got[name] != shape:
                raise BackendError(
                    f"{path.name}: {name} has shape {list(got[name])}, the manifest says {list(shape)}"
                )


ORT_TRT_CACHE = "ort-trt-cache"  # inside the engine directory: the TensorRT EP's engines and timing cache


def gpu_session_config(providers: Sequence[str]) -> dict[str, str]:
    """Session config entries for GPU providers: with CUDA / TensorRT EP, a node that would silently run on
    the CPU EP is an error at session creation instead (ONNX Runtime's session.disable_cpu_ep_fallback).
    Only when the CPU EP was not asked for too: 'cuda,cpu' means the user accepts CPU nodes."""
    gpu = any(p in GPU_PROVIDERS for p in providers)
    return {"session.disable_cpu_ep_fallback": "1"} if gpu and "CPUExecutionProvider" not in providers else {}


def provider_options(
    providers: Sequence[str], directory: Path, precision: str = "fp32"
) -> list[dict[str, str]]:
    """One options dict per provider. The TensorRT EP caches its engines and timing cache inside the engine
    directory (without them it rebuilds every session: minutes on an Orin), and runs an fp16 directory's
    graphs with fp16 kernels (`trt_fp16_enable`: the EP builds weakly typed networks, fp32 kernels
    otherwise); the others take the defaults."""
    cache = str(Path(directory) / ORT_TRT_CACHE)
    trt = {
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": cache,
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": cache,
    }
    if precision == "fp16":
        trt["trt_fp16_enable"] = "True"
    return [dict(trt) if p == "TensorrtExecutionProvider" else {} for p in providers]


def load_gpu_libraries(ort: Any, providers: Sequence[str]) -> None:
    """Put pip's NVIDIA libraries where the GPU providers find them, before the first session: TensorRT's
    (`import tensorrt_libs`, which loads them; otherwise only LD_LIBRARY_PATH is searched), then the CUDA
    and cuDNN of onnxruntime-gpu's [cuda,cudnn] extras (`onnxruntime.preload_dlls()`, onnxruntime-gpu >=
    1.21). Where neither is installed (JetPack, a system CUDA) the loader finds the system's."""
    if "TensorrtExecutionProvider" in providers:
        try:
            import tensorrt_libs  # noqa: F401
        except ImportError:
            pass
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception:  # noqa: BLE001 - a missing optional package: session creation names the problem
            pass


class OrtBackend(Backend):
    """ONNX Runtime with the providers the user chose; a GPU provider that is asked for must be used."""

    name = "ort"

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        providers: Sequence[str] | str | None = None,
        threads: int | None = None,
        spin: bool = False,
        device_memory: str | None = None,
    ):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError(
                "onnxruntime is not installed: pip install 'far-export[ort]' (or [gpu])"
            ) from None
        self._ort = ort
        utf8_path(directory.absolute(), "the engine directory", BackendError)
        self.providers = resolve_providers(providers)
        available = ort.get_available_providers()
        missing = [p for p in self.providers if p not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime {ort.__version__} has no {missing[0]} (available: {', '.join(available)}); "
                + (
                    "install onnxruntime-gpu instead of onnxruntime"
                    if missing[0] in GPU_PROVIDERS
                    else "check --providers"
                )
            )
        if manifest.precision == "bf16" and not any(p in GPU_PROVIDERS for p in self.providers):
            raise BackendError(
                f"{directory} holds bf16 graphs, which need a GPU (ONNX Runtime's CPU provider has no bf16 "
                "kernels): run them with --backend trt or --providers cuda, or build with --precision fp32, "
                "fp16 or int8 for a CPU"
            )
        self._threads, self._spin = threads, spin
        self._opts = self._options()
        self._provider_options = None  # the CPU path as ONNX Runtime's defaults have it
        if any(p in GPU_PROVIDERS for p in self.providers):
            load_gpu_libraries(ort, self.providers)
            self._provider_options = provider_options(self.providers, directory, manifest.precision)
            if "TensorrtExecutionProvider" in self.providers:
                try:
                    (Path(directory) / ORT_TRT_CACHE).mkdir(exist_ok=True)
                except OSError as e:
                    raise BackendError(
                        f"cannot create the TensorRT EP cache {directory / ORT_TRT_CACHE} "
                        f"({e.strerror}); make the engine directory writable"
                    ) from None
        self.directory, self.manifest = directory, manifest
        self._graphs: dict[str, OrtGraph] = {}
        sw = manifest.shared_weights
        self._shared = SharedInitializers(ort, directory, sw) if sw is not None else None
        # Under a GPU provider the state lives in CUDA memory (bound by address, uploaded and downloaded by
        # the pipeline); on the CPU the graphs bind the numpy buffers themselves, unless `device_memory`
        # says where.
        if device_memory is None and self.providers[0] in GPU_PROVIDERS:
            device_memory = "cuda"
        self.memory = OrtDeviceMemory(ort, device_memory, self.providers[0]) if device_memory else None

    def _options(self) -> Any:
        ort = self._ort
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if self._threads:
            opts.intra_op_num_threads = self._threads
        if not self._spin:  # idle worker threads otherwise busy-wait, starving other work on a loaded machine
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in gpu_session_config(self.providers).items():
            opts.add_session_config_entry(key, value)
        return opts

    def _options_for(self, name: str) -> Any:
        """The session options of graph `name`: on the CPU, the backbone graphs get the one shared copy of
        their weights (runtime/shared_weights.py)."""
        if self._shared is None or not self._shared.covers(name) or self.memory is not None:
            return self._opts
        opts = self._options()
        self._shared.add_to(opts, name)
        return opts

    def empty(self, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        return self.memory.empty(shape, dtype) if self.memory else super().empty(shape, dtype)

    def rows(self, n: int, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        return self.memory.rows(n, shape, dtype) if self.memory else super().rows(n, shape, dtype)

    def upload(self, arrays: Sequence[np.ndarray]) -> None:
        if self.memory:
            self.memory.upload(arrays)

    def download(self, arrays: Sequence[np.ndarray]) -> None:
        if self.memory:
            self.memory.download(arrays)

    def graph(self, name: str) -> Graph:
        if name not in self._graphs:
            spec = self.manifest.graphs[name]
            path = self.directory / spec.file
            opts = self._options_for(name)
            try:
                session = self._ort.InferenceSession(
                    str(path),
                    sess_options=opts,
                    providers=self.providers,
                    provider_options=self._provider_options,
                )
            except Exception as e:  # onnxruntime raises its own exception types for invalid files
                if spec.precision == "bf16" and not any(p in GPU_PROVIDERS for p in self.providers):
                    raise BackendError(
                        f"ONNX Runtime on the CPU cannot run the bf16 graph {spec.file} ({first_line(e)}): "
                        f"a bf16 engine directory needs a GPU: TensorRT (--backend trt) or the CUDA provider "
                        f"(--providers cuda, onnxruntime-gpu); for a CPU, build fp32, fp16 or int8"
                    ) from None
                raise BackendError(
                    f"ONNX Runtime cannot load {path} ({first_line(e)}); rebuild with far-export build"
                ) from None
            used = session.get_providers()
            fell_back = [p for p in self.providers if p in GPU_PROVIDERS and p not in used]
            if fell_back:
                raise BackendError(
                    f"{fell_back[0]} was asked for but ONNX Runtime fell back to {', '.join(used)} "
                    f"for {spec.file} (CUDA/cuDNN or TensorRT libraries missing?); "
                    "refusing to run slowly: use --providers cpu"
                )
            self._graphs[name] = OrtGraph(self._ort, session, spec, path, self.memory)
        return self._graphs[name]

    def describe(self) -> str:
        where = f", state in {self.memory.device} memory" if self.memory else ""
        return f"onnxruntime {self._ort.__version__} [{', '.join(self.providers)}]{where}"


# ----------------------------------------------------------------------------
# Recording: the inputs a loop really feeds each graph

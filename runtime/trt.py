"""TensorRT backend: deserialized plans, device buffers allocated once, one stream, optional CUDA graphs.

Plans are not portable: each EngineSpec in the manifest names the TensorRT version,
GPU and compute capability it was built for, and a plan built for anything else is
refused with a one-line reason before TensorRT sees it. Device memory and copies go
through the CUDA Python bindings (`cuda-python`); host buffers are pinned, so a
bound call (copy in, enqueue, copy out) can be captured once as a CUDA graph and
replayed. No torch. Written to TensorRT's documented Python API (10.x and 11.x:
tensor-address API, `execute_async_v3`).

Imported lazily by `runtime.backends.open_backend("trt", ...)`; importing this
module needs numpy only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, Call, Graph, host_dtype
from runtime.device import (
    DeviceError,
    DeviceInfo,
    check,
    import_cudart,
    import_tensorrt,
    plan_mismatch,
    probe_gpu,
    stream_handle,
)
from runtime.manifest import GRAPHS, EngineSpec, Manifest, sha256_file


class EngineMismatchError(BackendError):
    """A TensorRT plan built for another TensorRT version or GPU."""


def built_for(spec: EngineSpec) -> DeviceInfo:
    """The device a plan was built for, as its manifest entry records it."""
    return DeviceInfo(spec.tensorrt_version, spec.gpu_name, spec.compute_capability, spec.sm_count,
                      spec.total_memory_mb)


def check_engine(graph: str, spec: EngineSpec, device: DeviceInfo) -> None:
    """Refuse a plan built for another TensorRT version, GPU, compute capability, SM count or memory size."""
    why = plan_mismatch(built_for(spec), device)
    if why:
        raise EngineMismatchError(f"{spec.file} ({graph}) {why}; rebuild the plans here with far-export compile")


def check_engines(manifest: Manifest, device: DeviceInfo) -> None:
    missing = [g for g in GRAPHS if g not in manifest.engines]
    if missing:
        raise BackendError(
            f"the manifest lists no TensorRT plan for {missing[0]!r}; build plans on this device with "
            "far-export compile, or use --backend ort"
        )
    for g in GRAPHS:
        check_engine(g, manifest.engines[g], device)


# ----------------------------------------------------------------------------
# CUDA through cuda-python (runtime/device.py imports and probes)
# ----------------------------------------------------------------------------


class _Cuda:
    """The few CUDA runtime calls the backend needs, each checked (errors by their CUDA name)."""

    def __init__(self) -> None:
        try:
            self.rt = import_cudart()
        except DeviceError as e:
            raise BackendError(f"{e}; use --backend ort") from None

    def check(self, result: Any, what: str) -> Any:
        try:
            return check(self.rt, result, what)
        except DeviceError as e:
            raise BackendError(str(e)) from None

    def device(self, tensorrt_version: str = "") -> DeviceInfo:
        try:
            return probe_gpu(self.rt, tensorrt_version)
        except DeviceError as e:
            raise BackendError(f"{e}; use --backend ort") from None

    def malloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def host_alloc(self, nbytes: int) -> int:
        return int(self.check(self.rt.cudaMallocHost(max(nbytes, 1)), "cudaMallocHost"))

    def free(self, ptr: int) -> None:
        self.rt.cudaFree(ptr)

    def free_host(self, ptr: int) -> None:
        self.rt.cudaFreeHost(ptr)

    def stream(self) -> Any:
        return self.check(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def copy_async(self, dst: int, src: int, nbytes: int, kind: Any, stream: Any) -> None:
        self.check(self.rt.cudaMemcpyAsync(dst, src, nbytes, kind, stream), "cudaMemcpyAsync")

    def sync(self, stream: Any) -> None:
        self.check(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")


def _host_pointer(a: np.ndarray) -> int:
    return int(a.ctypes.data)


# ----------------------------------------------------------------------------
# Graphs and calls
# ----------------------------------------------------------------------------


class TrtCall(Call):
    """Copy the bound host inputs in, enqueue, copy the outputs out, on the backend's stream.
    With CUDA graphs the whole sequence is captured on the first run and replayed after."""

    def __init__(self, graph: TrtGraph, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        be = graph.backend
        self._be, self._graph = be, graph
        self._addresses = {}
        self._h2d, self._d2h = [], []
        for name, a in inputs.items():
            dev = be.device_buffer(a)
            self._addresses[name] = dev
            self._h2d.append((dev, _host_pointer(a), a.nbytes))
        for name, a in outputs.items():
            dev = be.device_buffer(a)
            self._addresses[name] = dev
            self._d2h.append((_host_pointer(a), dev, a.nbytes))
        self._cuda_graph: Any = None
        self._exec: Any = None

    def _enqueue(self) -> None:
        be, cuda = self._be, self._be.cuda
        h2d, d2h = cuda.rt.cudaMemcpyKind.cudaMemcpyHostToDevice, cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for dst, src, n in self._h2d:
            cuda.copy_async(dst, src, n, h2d, be.stream)
        ctx = self._graph.context
        for name, addr in self._addresses.items():
            if not ctx.set_tensor_address(name, addr):
                raise BackendError(f"TensorRT refused the address of {name!r} in {self._graph.spec.file}")
        if not ctx.execute_async_v3(be.stream_handle):
            raise BackendError(f"TensorRT failed to enqueue {self._graph.spec.file}")
        for dst, src, n in self._d2h:
            cuda.copy_async(dst, src, n, d2h, be.stream)

    def run(self) -> None:
        be = self._be
        if not be.cuda_graph:
            self._enqueue()
            be.cuda.sync(be.stream)
            return
        rt = be.cuda.rt
        if self._exec is None:
            self._enqueue()  # one plain run first: TensorRT finishes deferred setup outside capture
            be.cuda.sync(be.stream)
            be.cuda.check(rt.cudaStreamBeginCapture(be.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeGlobal),
                          "cudaStreamBeginCapture")
            self._enqueue()
            self._cuda_graph = be.cuda.check(rt.cudaStreamEndCapture(be.stream), "cudaStreamEndCapture")
            self._exec = be.cuda.check(rt.cudaGraphInstantiate(self._cuda_graph, 0), "cudaGraphInstantiate")
        be.cuda.check(rt.cudaGraphLaunch(self._exec, be.stream), "cudaGraphLaunch")
        be.cuda.sync(be.stream)


class TrtGraph(Graph):
    def __init__(self, backend: TrtBackend, name: str, path: Path):
        self.backend, self.spec = backend, backend.manifest.graphs[name]
        trt = backend.trt
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read {path} ({e.strerror})") from None
        self.engine = backend.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {path}: corrupt, or built by another version")
        self.context = self.engine.create_execution_context()
        if self.context is None:  # TensorRT returns None (and logs why) when it cannot allocate the context
            raise BackendError(f"TensorRT could not create an execution context for {path.name} (out of device memory?)")
        io = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = {t.name: t for t in (*self.spec.inputs, *self.spec.outputs)}
        if io != set(want):
            raise BackendError(f"{path.name}: tensors {sorted(io)} differ from the manifest's {sorted(want)}")
        for name, t in want.items():
            shape = tuple(self.engine.get_tensor_shape(name))
            dt = self.engine.get_tensor_dtype(name)
            dtype = "bfloat16" if dt == trt.DataType.BF16 else np.dtype(trt.nptype(dt)).name
            if shape != t.shape or dtype != t.dtype:
                raise BackendError(f"{path.name}: {name} is {dtype}{list(shape)}, the manifest says {t.dtype}{list(t.shape)}")

    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Call:
        self.check_buffers(inputs, outputs)
        return TrtCall(self, inputs, outputs)


class TrtBackend(Backend):
    """The manifest's TensorRT plans on CUDA device 0."""

    name = "trt"

    def __init__(self, directory: Path, manifest: Manifest, cuda_graph: bool = False):
        self.directory, self.manifest, self.cuda_graph = directory, manifest, cuda_graph
        if any(g not in manifest.engines for g in GRAPHS):
            check_engines(manifest, DeviceInfo("", "", ""))  # raises the one-line "no plan" error
        try:
            self.trt = import_tensorrt()
        except DeviceError as e:
            raise BackendError(f"{e} (pip install 'far-export[gpu]', or JetPack's python3-libnvinfer); "
                               "use --backend ort") from None
        self.cuda = _Cuda()
        device = self.cuda.device(str(self.trt.__version__))
        check_engines(manifest, device)
        for g in GRAPHS:
            plan = directory / manifest.engines[g].file
            if not plan.is_file():
                raise BackendError(f"TensorRT plan {plan} ({g}) is missing; rebuild with far-export compile")
            if sha256_file(plan) != manifest.engines[g].sha256:
                raise BackendError(f"TensorRT plan {plan} ({g}) does not match its sha256 in the manifest: corrupt or replaced")
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.stream = self.cuda.stream()
        self.stream_handle = stream_handle(self.stream)
        self.device = device
        self._graphs: dict[str, TrtGraph] = {}
        self._device_buffers: dict[tuple[int, int], int] = {}  # (host pointer, nbytes) -> device pointer
        self._host: list[tuple[int, np.ndarray]] = []

    def graph(self, name: str) -> Graph:
        if name not in self._graphs:
            self._graphs[name] = TrtGraph(self, name, self.directory / self.manifest.engines[name].file)
        return self._graphs[name]

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        """Pinned host memory, zeroed, viewed as a numpy array (so copies can be captured in CUDA graphs)."""
        dtype = host_dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ptr = self.cuda.host_alloc(nbytes)
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        a = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(tuple(shape))
        a[...] = 0
        self._host.append((ptr, a))
        return a

    def device_buffer(self, host: np.ndarray) -> int:
        """One device buffer per bound host buffer, shared by every call that binds it."""
        key = (_host_pointer(host), host.nbytes)
        if key not in self._device_buffers:
            self._device_buffers[key] = self.cuda.malloc(host.nbytes)
        return self._device_buffers[key]

    def describe(self) -> str:
        d = self.device
        return f"TensorRT {d.tensorrt_version} on {d.gpu_name} (sm {d.compute_capability}, {d.sm_count} SMs)" + (
            ", CUDA graphs" if self.cuda_graph else "")

    def close(self) -> None:
        for ptr in self._device_buffers.values():
            self.cuda.free(ptr)
        self._device_buffers.clear()
        self._graphs.clear()
        for ptr, _ in self._host:
            self.cuda.free_host(ptr)
        self._host.clear()

"""TensorRT backend: deserialized plans, device buffers allocated once, one stream, optional CUDA graphs.

Plans are not portable: each EngineSpec in the manifest names the TensorRT version,
GPU, compute capability, SM count and memory it was built for, and a plan built for
anything else is refused with a one-line reason before TensorRT sees it. Device memory
and copies go through the CUDA Python bindings (`cuda-python`). Every buffer lives on
the device with a pinned host mirror: the pipeline's state stays on the device for a
whole batch (`upload` the tables once, `download` the image once), calls only enqueue,
and with `cuda_graph` the whole AR loop of a plan is captured once as one CUDA graph
and replayed with one launch per batch. No torch. Written to TensorRT's documented Python API (10.x and 11.x:
tensor-address API, `execute_async_v3`).

Imported lazily by `runtime.backends.open_backend("trt", ...)`; importing this
module needs numpy only.
"""

from __future__ import annotations

import ctypes
from collections.abc import Mapping, Sequence
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
from runtime.manifest import EngineSpec, Manifest, sha256_file


class EngineMismatchError(BackendError):
    """A TensorRT plan built for another TensorRT version or GPU."""


def built_for(spec: EngineSpec) -> DeviceInfo:
    """The device a plan was built for, as its manifest entry records it."""
    return DeviceInfo(
        spec.tensorrt_version, spec.gpu_name, spec.compute_capability, spec.sm_count, spec.total_memory_mb
    )


def check_engine(graph: str, spec: EngineSpec, device: DeviceInfo) -> None:
    """Refuse a plan built for another TensorRT version, GPU, compute capability, SM count or memory size."""
    why = plan_mismatch(built_for(spec), device)
    if why:
        raise EngineMismatchError(
            f"{spec.file} ({graph}) {why}; rebuild the plans here with far-export compile"
        )


def check_engines(manifest: Manifest, device: DeviceInfo) -> None:
    missing = [g for g in manifest.graphs if g not in manifest.engines]
    if missing:
        raise BackendError(
            f"the manifest lists no TensorRT plan for {missing[0]!r}; build plans on this device with "
            "far-export compile, or use --backend ort"
        )
    for g in manifest.graphs:
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
    """One enqueue of a plan on the backend's stream, its tensors at fixed device addresses. Asynchronous:
    what it writes stays on the device until `TrtBackend.download`."""

    def __init__(self, graph: TrtGraph, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        self._be, self._graph = graph.backend, graph
        self._addresses = {name: graph.backend.address(a) for name, a in (*inputs.items(), *outputs.items())}

    def run(self) -> None:
        ctx = self._graph.context
        for name, addr in self._addresses.items():  # a context serves every call bound to its plan
            if not ctx.set_tensor_address(name, addr):
                raise BackendError(f"TensorRT refused the address of {name!r} in {self._graph.spec.file}")
        if not ctx.execute_async_v3(self._be.stream_handle):
            raise BackendError(f"TensorRT failed to enqueue {self._graph.spec.file}")


class TrtSequence(Call):
    """Calls run in order on one stream; with CUDA graphs, captured once as one graph (after one plain run,
    so that TensorRT finishes its deferred setup outside the capture) and replayed with one launch."""

    def __init__(self, backend: TrtBackend, calls: list[Call]):
        self._be, self._calls = backend, calls
        self.graph: Any = None
        self.exec: Any = None

    def run(self) -> None:
        be = self._be
        if not be.cuda_graph:
            for call in self._calls:
                call.run()
            return
        if self.exec is None:
            self._capture()
        be.cuda.check(be.cuda.rt.cudaGraphLaunch(self.exec, be.stream), "cudaGraphLaunch")

    def _capture(self) -> None:
        be, rt = self._be, self._be.cuda.rt
        for call in self._calls:
            call.run()
        be.cuda.sync(be.stream)
        be.cuda.check(
            rt.cudaStreamBeginCapture(be.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        try:
            for call in self._calls:
                call.run()
        except BaseException:  # end the capture whatever happened, so the stream is usable again
            _, broken = rt.cudaStreamEndCapture(be.stream)
            if broken:
                rt.cudaGraphDestroy(broken)
            raise
        self.graph = be.cuda.check(rt.cudaStreamEndCapture(be.stream), "cudaStreamEndCapture")
        self.exec = be.cuda.check(rt.cudaGraphInstantiate(self.graph, 0), "cudaGraphInstantiate")

    def destroy(self) -> None:
        rt = self._be.cuda.rt
        if self.exec is not None:
            rt.cudaGraphExecDestroy(self.exec)
        if self.graph is not None:
            rt.cudaGraphDestroy(self.graph)
        self.exec = self.graph = None


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
            raise BackendError(
                f"TensorRT could not create an execution context for {path.name} (out of device memory?)"
            )
        io = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        want = {t.name: t for t in (*self.spec.inputs, *self.spec.outputs)}
        if io != set(want):
            raise BackendError(f"{path.name}: tensors {sorted(io)} differ from the manifest's {sorted(want)}")
        for name, t in want.items():
            shape = tuple(self.engine.get_tensor_shape(name))
            dt = self.engine.get_tensor_dtype(name)
            dtype = "bfloat16" if dt == trt.DataType.BF16 else np.dtype(trt.nptype(dt)).name
            if shape != t.shape or dtype != t.dtype:
                raise BackendError(
                    f"{path.name}: {name} is {dtype}{list(shape)}, the manifest says {t.dtype}{list(t.shape)}"
                )

    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Call:
        self.check_buffers(inputs, outputs)
        return TrtCall(self, inputs, outputs)


class TrtBackend(Backend):
    """The manifest's TensorRT plans on CUDA device 0."""

    name = "trt"

    def __init__(self, directory: Path, manifest: Manifest, cuda_graph: bool = False):
        self.directory, self.manifest, self.cuda_graph = directory, manifest, cuda_graph
        if any(g not in manifest.engines for g in manifest.graphs):
            check_engines(manifest, DeviceInfo("", "", ""))  # raises the one-line "no plan" error
        try:
            self.trt = import_tensorrt()
        except DeviceError as e:
            raise BackendError(
                f"{e} (pip install 'far-export[gpu]', or JetPack's python3-libnvinfer); use --backend ort"
            ) from None
        self.cuda = _Cuda()
        device = self.cuda.device(str(self.trt.__version__))
        check_engines(manifest, device)
        for g in manifest.graphs:
            plan = directory / manifest.engines[g].file
            if not plan.is_file():
                raise BackendError(f"TensorRT plan {plan} ({g}) is missing; rebuild with far-export compile")
            if sha256_file(plan) != manifest.engines[g].sha256:
                raise BackendError(
                    f"TensorRT plan {plan} ({g}) does not match its sha256 in the manifest: "
                    "corrupt or replaced"
                )
        self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
        self.stream = self.cuda.stream()
        self.stream_handle = stream_handle(self.stream)
        self.device = device
        self._graphs: dict[str, TrtGraph] = {}
        self._buffers: list[
            tuple[int, int, int, np.ndarray]
        ] = []  # (host ptr, nbytes, device ptr, host array)
        self._sequences: list[TrtSequence] = []

    @property
    def fuses_sequences(self) -> bool:  # type: ignore[override]
        return self.cuda_graph

    def graph(self, name: str) -> Graph:
        if name not in self._graphs:
            self._graphs[name] = TrtGraph(self, name, self.directory / self.manifest.engines[name].file)
        return self._graphs[name]

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        """A device buffer and its pinned host mirror (zeroed), returned as the mirror: the host writes there
        and `upload`s; the plans read and write the device side."""
        dtype = host_dtype(dtype)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        host = self.cuda.host_alloc(nbytes)
        try:
            dev = self.cuda.malloc(nbytes)
        except BackendError:
            self.cuda.free_host(host)
            raise
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(host)
        a = np.frombuffer(raw, dtype=np.uint8, count=nbytes).view(dtype).reshape(tuple(shape))
        a[...] = 0
        self._buffers.append((host, nbytes, dev, a))
        self.cuda.check(self.cuda.rt.cudaMemsetAsync(dev, 0, max(nbytes, 1), self.stream), "cudaMemsetAsync")
        return a

    def address(self, a: np.ndarray) -> int:
        """The device address of `a`, a buffer from `empty` or a contiguous view into one."""
        ptr = _host_pointer(a)
        for host, nbytes, dev, _ in self._buffers:
            if host <= ptr and ptr + a.nbytes <= host + nbytes:
                if not a.flags.c_contiguous:
                    raise BackendError("TensorRT binds contiguous buffers only")
                return dev + (ptr - host)
        raise BackendError("a buffer bound to a TensorRT plan must come from the backend's empty()")

    def _copies(self, arrays: Sequence[np.ndarray], kind: str) -> None:
        rt = self.cuda.rt
        for a in arrays:
            dev, host = self.address(a), _host_pointer(a)
            if kind == "up":
                self.cuda.copy_async(
                    dev, host, a.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
                )
            else:
                self.cuda.copy_async(
                    host, dev, a.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
                )

    def upload(self, arrays: Sequence[np.ndarray]) -> None:
        """Enqueue host -> device copies (pinned memory: asynchronous; the host leaves these buffers alone
        until the next download, which waits for the stream)."""
        self._copies(arrays, "up")

    def download(self, arrays: Sequence[np.ndarray]) -> None:
        self._copies(arrays, "down")
        self.cuda.sync(self.stream)

    def sequence(self, calls: Sequence[Call]) -> Call:
        seq = TrtSequence(self, list(calls))
        self._sequences.append(seq)
        return seq

    def describe(self) -> str:
        d = self.device
        return (
            f"TensorRT {d.tensorrt_version} on {d.gpu_name} (sm {d.compute_capability}, {d.sm_count} SMs)"
            + (", CUDA graphs" if self.cuda_graph else "")
        )

    def close(self) -> None:
        """CUDA graphs first, then the contexts and engines that their launches use, then the memory they
        point at, then the stream."""
        if self.stream is None:
            return
        self.cuda.sync(self.stream)
        for seq in self._sequences:
            seq.destroy()
        self._sequences.clear()
        self._graphs.clear()  # drops the execution contexts and engines
        for host, _, dev, _ in self._buffers:
            self.cuda.free(dev)
            self.cuda.free_host(host)
        self._buffers.clear()
        self.cuda.rt.cudaStreamDestroy(self.stream)
        self.stream = None

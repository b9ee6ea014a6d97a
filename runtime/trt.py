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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, BackendError, Call, Graph, from_bf16_bits, host_dtype, to_bf16_bits
from runtime.device import (
    DeviceError,
    DeviceInfo,
    check,
    error_name,
    import_cudart,
    import_tensorrt,
    plan_mismatch,
    probe_gpu,
    stream_handle,
)
from runtime.manifest import EngineSpec, Manifest, TensorSpec, sha256_file

ALIGN = 256  # setTensorAddress: "The pointer must have at least 256-byte alignment" (NvInferRuntime.h)


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
    """One enqueue of a plan on the backend's stream, on its own execution context whose tensor addresses are
    set once, at bind time. One context per call, sharing the backend's scratch memory (USER_MANAGED): a
    captured CUDA graph replays its contexts' state, so a context serves one captured call only (NVIDIA's
    guidance, NVIDIA/TensorRT#3798; trtexec and demo/Diffusion capture one enqueue per context).
    Asynchronous: what it writes stays on the device until `TrtBackend.download`."""

    def __init__(self, graph: TrtGraph, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]):
        be, trt = graph.backend, graph.backend.trt
        self._be, self._file = be, graph.spec.file
        ctx = graph.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if ctx is None:
            raise BackendError(f"TensorRT could not create an execution context for {self._file}")
        ctx.set_device_memory(be.scratch, be.scratch_bytes)
        for name, a in (*inputs.items(), *outputs.items()):
            address = be.address(a)
            if not ctx.set_tensor_address(name, address):  # NvInferRuntime.h: >= 256-byte aligned
                raise BackendError(
                    f"TensorRT refused the address {address:#x} of {name!r} in {self._file} "
                    f"({'not 256-byte aligned' if address % ALIGN else 'unknown tensor'})"
                )
        self.context: Any = ctx
        be._calls.append(self)

    def run(self) -> None:
        if self.context is None:
            raise BackendError("the TensorRT backend is closed")
        if not self.context.execute_async_v3(self._be.stream_handle):
            raise BackendError(f"TensorRT failed to enqueue {self._file}")


class TrtSequence(Call):
    """Calls run in order on one stream. With CUDA graphs, the first run enqueues them plainly (it computes
    that batch, and TensorRT does its deferred setup outside any capture), then captures them once as one
    graph, which every later run launches; the capture records and executes nothing (NVIDIA's
    demo/Diffusion does the same). A capture that fails falls back to plain enqueues, as trtexec does."""

    def __init__(self, backend: TrtBackend, calls: list[Call]):
        self._be, self._calls = backend, calls
        self.graph: Any = None
        self.exec: Any = None
        self.fallback: str | None = None  # why the calls are enqueued plainly

    def run(self) -> None:
        be = self._be
        if self.exec is not None:
            be.cuda.check(be.cuda.rt.cudaGraphLaunch(self.exec, be.stream), "cudaGraphLaunch")
            return
        for call in self._calls:
            call.run()
        if be.cuda_graph and self.fallback is None:
            self._capture()

    def _capture(self) -> None:
        be, rt = self._be, self._be.cuda.rt
        be.cuda.check(
            rt.cudaStreamBeginCapture(be.stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal),
            "cudaStreamBeginCapture",
        )
        why = None
        try:
            for call in self._calls:
                call.run()
        except BackendError as e:
            why = str(e)
        finally:  # end the capture whatever happened, so that the stream is usable again
            err, graph = rt.cudaStreamEndCapture(be.stream)
        if why is None and int(err) != 0:
            why = f"cudaStreamEndCapture failed: {error_name(rt, err)}"
        if why is None:
            err, exec_ = rt.cudaGraphInstantiate(graph, 0)
            if int(err) == 0:
                self.graph, self.exec = graph, exec_
                return
            why = f"cudaGraphInstantiate failed: {error_name(rt, err)}"
        if graph is not None:  # a graph that is not kept (cudaStreamEndCapture gives NULL when invalidated)
            rt.cudaGraphDestroy(graph)
        rt.cudaGetLastError()  # clear the capture's error (trtexec does too): the stream stays usable
        self.fallback = why
        be.notes.append(f"CUDA graph capture failed, running without: {self.fallback}")

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
        try:
            data = path.read_bytes()
        except OSError as e:
            raise BackendError(f"cannot read {path} ({e.strerror})") from None
        self.engine = backend.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise BackendError(f"TensorRT could not deserialize {path}: corrupt, or built by another version")
        check_io(self.engine, backend.trt, (*self.spec.inputs, *self.spec.outputs), path.name)

    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Call:
        self.check_buffers(inputs, outputs)
        return TrtCall(self, inputs, outputs)


def engine_dtype(trt: Any, dt: Any) -> str:
    """A TensorRT DataType as the manifest's dtype name."""
    return "bfloat16" if dt == getattr(trt.DataType, "BF16", None) else np.dtype(trt.nptype(dt)).name


def check_io(engine: Any, trt: Any, tensors: Sequence[TensorSpec], where: str) -> None:
    """The plan's I/O tensors are the manifest's (names, static shapes, dtypes)."""
    io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    want = {t.name: t for t in tensors}
    if io != set(want):
        raise BackendError(f"{where}: tensors {sorted(io)} differ from the manifest's {sorted(want)}")
    for name, t in want.items():
        shape, dtype = tuple(engine.get_tensor_shape(name)), engine_dtype(trt, engine.get_tensor_dtype(name))
        if shape != t.shape or dtype != t.dtype:
            raise BackendError(
                f"{where}: {name} is {dtype}{list(shape)}, the manifest says {t.dtype}{list(t.shape)}"
            )


@dataclass
class _Buffer:
    host: int  # pinned host mirror
    nbytes: int
    device: int
    array: np.ndarray  # the host mirror as the caller sees it


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
        self.device = device
        self.notes: list[str] = []  # what the backend fell back from (a failed CUDA graph capture)
        self._buffers: list[_Buffer] = []
        self._calls: list[TrtCall] = []
        self._sequences: list[TrtSequence] = []
        self.stream: Any = None
        self.scratch, self.scratch_bytes = 0, 0
        try:
            self.runtime = self.trt.Runtime(self.trt.Logger(self.trt.Logger.WARNING))
            self.stream = self.cuda.stream()
            self.stream_handle = stream_handle(self.stream)
            # every plan now, so that one scratch allocation fits the largest (each context's activations)
            self._graphs = {
                g: TrtGraph(self, g, directory / manifest.engines[g].file) for g in manifest.graphs
            }
            self.scratch_bytes = max(int(g.engine.device_memory_size_v2) for g in self._graphs.values())
            self.scratch = self.cuda.malloc(self.scratch_bytes)
        except BaseException:
            self.close()
            raise

    @property
    def fuses_sequences(self) -> bool:  # type: ignore[override]
        return self.cuda_graph

    def graph(self, name: str) -> Graph:
        return self._graphs[name]

    def empty(self, shape: Any, dtype: Any) -> np.ndarray:
        """A device buffer and its pinned host mirror (zeroed), returned as the mirror: the host writes there
        and `upload`s; the plans read and write the device side."""
        dtype = host_dtype(dtype)
        return self._allocate(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize, tuple(shape), dtype)

    def rows(self, n: int, shape: Sequence[int], dtype: Any) -> np.ndarray:
        """(n, *shape) whose rows start 256 bytes apart or more, so that each row can be bound on its own
        (setTensorAddress needs 256-byte aligned addresses); the whole is one allocation, one copy."""
        dtype = host_dtype(dtype)
        row = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        stride = -(-max(row, 1) // ALIGN) * ALIGN
        return self._allocate(n * stride, (n, *shape), dtype, stride)

    def _allocate(self, nbytes: int, shape: tuple, dtype: np.dtype, stride: int | None = None) -> np.ndarray:
        host = self.cuda.host_alloc(nbytes)
        try:
            dev = self.cuda.malloc(nbytes)
        except BackendError:
            self.cuda.free_host(host)
            raise
        raw = np.frombuffer((ctypes.c_byte * max(nbytes, 1)).from_address(host), np.uint8, count=nbytes)
        raw[:] = 0
        if stride is None:
            a = raw.view(dtype).reshape(shape)
        else:
            inner = np.empty(shape[1:], dtype).strides
            a = np.lib.stride_tricks.as_strided(raw.view(dtype), shape, (stride, *inner))
        self._buffers.append(_Buffer(host, nbytes, dev, a))
        self.cuda.check(self.cuda.rt.cudaMemsetAsync(dev, 0, max(nbytes, 1), self.stream), "cudaMemsetAsync")
        return a

    def _buffer(self, a: np.ndarray) -> tuple[_Buffer, int]:
        ptr = _host_pointer(a)
        for b in self._buffers:
            if b.host <= ptr < b.host + max(b.nbytes, 1):
                return b, ptr - b.host
        raise BackendError("a buffer bound to a TensorRT plan must come from the backend's empty() or rows()")

    def address(self, a: np.ndarray) -> int:
        """The device address of `a`, a buffer from `empty` / `rows` or a contiguous view into one."""
        b, offset = self._buffer(a)
        if not a.flags.c_contiguous or offset + a.nbytes > b.nbytes:
            raise BackendError("TensorRT binds contiguous buffers only")
        return b.device + offset

    def _copies(self, arrays: Sequence[np.ndarray], kind: str) -> None:
        """Whole allocations (a row table is one allocation with gaps between its rows)."""
        rt = self.cuda.rt
        for b in {id(b): b for b in (self._buffer(a)[0] for a in arrays)}.values():
            if kind == "up":
                self.cuda.copy_async(
                    b.device, b.host, b.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream
                )
            else:
                self.cuda.copy_async(
                    b.host, b.device, b.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream
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
        """In dependency order: wait for the stream; destroy the CUDA graphs; release the execution contexts
        and engines (they use the scratch memory and the stream); free the memory; destroy the stream.
        Host mirrors handed out before are dead afterwards: the Pipeline drops its references first."""
        if self.stream is not None:
            self.cuda.sync(self.stream)
        for seq in self._sequences:
            seq.destroy()
        self._sequences.clear()
        for call in self._calls:
            call.context = None
        self._calls.clear()
        self._graphs = {}
        if self.scratch:
            self.cuda.free(self.scratch)
            self.scratch = 0
        for b in self._buffers:
            self.cuda.free(b.device)
            self.cuda.free_host(b.host)
        self._buffers.clear()
        if self.stream is not None:
            self.cuda.rt.cudaStreamDestroy(self.stream)
            self.stream = None


# ----------------------------------------------------------------------------
# One plan, run once (far-export compile validates each plan with it)
# ----------------------------------------------------------------------------


def run_plan(plan: bytes, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a serialized plan once on GPU 0 on host inputs; its outputs as float32 / int numpy arrays (bf16 as
    float32). The same CUDA and TensorRT calls as the backend, without a manifest."""
    trt = import_tensorrt()
    cuda = _Cuda()
    engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan)
    if engine is None:
        raise BackendError("TensorRT could not deserialize the plan it just built")
    ctx = engine.create_execution_context()
    stream = cuda.stream()
    device: list[int] = []
    try:
        host: dict[str, np.ndarray] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine_dtype(trt, engine.get_tensor_dtype(name))
            shape = tuple(engine.get_tensor_shape(name))
            if name in feeds:
                a = np.asarray(feeds[name], np.float32) if dtype == "bfloat16" else feeds[name]
                host[name] = to_bf16_bits(a) if dtype == "bfloat16" else np.ascontiguousarray(a, dtype)
            else:
                host[name] = np.empty(shape, host_dtype(dtype))
            device.append(cuda.malloc(host[name].nbytes))
            if not ctx.set_tensor_address(name, device[-1]):
                raise BackendError(f"TensorRT refused the address of {name!r}")
        rt = cuda.rt
        for (name, a), dev in zip(host.items(), device, strict=True):
            if name in feeds:
                cuda.copy_async(
                    dev, _host_pointer(a), a.nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream
                )
        if not ctx.execute_async_v3(stream_handle(stream)):
            raise BackendError("TensorRT failed to enqueue the plan")
        for (name, a), dev in zip(host.items(), device, strict=True):
            if name not in feeds:
                cuda.copy_async(
                    _host_pointer(a), dev, a.nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream
                )
        cuda.sync(stream)
        out = {}
        for name, a in host.items():
            if name not in feeds:
                bf16 = engine_dtype(trt, engine.get_tensor_dtype(name)) == "bfloat16"
                out[name] = from_bf16_bits(a) if bf16 else a
        return out
    finally:
        cuda.sync(stream)
        del ctx
        for dev in device:
            cuda.free(dev)
        cuda.rt.cudaStreamDestroy(stream)

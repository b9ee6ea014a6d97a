"""A simulated CUDA device behind the `cuda.bindings.runtime` API (cuda-python 12.6+ / 13), for CPU CI.

Only the calls far-export makes, each with the real binding's name, argument order and result convention
((cudaError_t, *values) tuples), and the real enum types of the installed cuda-python where it is there
(tests/test_gpusim.py checks every function here against the real module's signature). What it models are
the documented rules a host program can break, each cited where it is enforced:

- memory: device pointers lie in a non-canonical x86-64 range, so host code that dereferences one faults
  instead of reading host memory; device blocks are 256-byte aligned and hold garbage until written;
  pinned host memory is real host memory; every copy and memset is checked against its kind and the live
  allocations' bounds.
- asynchrony: work queued on a stream runs only when the host synchronises (the legal schedule in which
  the GPU is as late as possible), so a missing synchronisation reads stale data.
- capture: between begin and end capture, work is recorded, not run; calls that are illegal during capture
  fail with the documented error and invalidate it; a launched graph replays what was recorded.

It cannot see kernel timing, real concurrency between streams, the driver's memory limits, or anything
the documentation leaves unspecified.
"""

from __future__ import annotations

import ctypes
import enum
import threading
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:  # the real enums and handle types: code under test then meets exactly what it meets on a GPU
    from cuda.bindings import runtime as _real
except ImportError:  # cuda-python < 12.6 or not installed
    _real = None

ALIGN = 256  # CUDA C++ Programming Guide, "Device Memory Accesses": allocations aligned to >= 256 bytes
DEVICE_BASE = 0x4000_0000_0000_0000  # non-canonical on x86-64: a host load from here faults


def _enum(name: str, members: dict[str, int]) -> Any:
    real = getattr(_real, name, None) if _real is not None else None
    return real if real is not None else enum.IntEnum(name, members)


cudaError_t = _enum(
    "cudaError_t",
    {
        "cudaSuccess": 0,
        "cudaErrorInvalidValue": 1,
        "cudaErrorMemoryAllocation": 2,
        "cudaErrorInsufficientDriver": 35,
        "cudaErrorNoDevice": 100,
        "cudaErrorInvalidResourceHandle": 400,
        "cudaErrorIllegalState": 401,
        "cudaErrorNotSupported": 801,
        "cudaErrorIllegalAddress": 700,
        "cudaErrorStreamCaptureUnsupported": 900,
        "cudaErrorStreamCaptureInvalidated": 901,
        "cudaErrorStreamCaptureWrongThread": 908,
        "cudaErrorCapturedEvent": 907,
    },
)
cudaMemcpyKind = _enum(
    "cudaMemcpyKind",
    {
        "cudaMemcpyHostToHost": 0,
        "cudaMemcpyHostToDevice": 1,
        "cudaMemcpyDeviceToHost": 2,
        "cudaMemcpyDeviceToDevice": 3,
        "cudaMemcpyDefault": 4,
    },
)
cudaStreamCaptureMode = _enum(
    "cudaStreamCaptureMode",
    {
        "cudaStreamCaptureModeGlobal": 0,
        "cudaStreamCaptureModeThreadLocal": 1,
        "cudaStreamCaptureModeRelaxed": 2,
    },
)
cudaStreamCaptureStatus = _enum(
    "cudaStreamCaptureStatus",
    {
        "cudaStreamCaptureStatusNone": 0,
        "cudaStreamCaptureStatusActive": 1,
        "cudaStreamCaptureStatusInvalidated": 2,
    },
)
E = cudaError_t
OK = E.cudaSuccess


def _handle(kind: str, value: int) -> Any:
    """A cudaStream_t / cudaGraph_t / cudaGraphExec_t of the real bindings (an int otherwise)."""
    cls = getattr(_real, kind, None) if _real is not None else None
    return cls(value) if cls is not None else value


def _int(h: Any) -> int:
    if _real is not None and not isinstance(h, int):
        from cuda.bindings.utils import get_cuda_native_handle

        return int(get_cuda_native_handle(h))
    return int(h or 0)


@dataclass
class DeviceProps:
    """What cudaGetDeviceProperties returns that far-export reads (cudaDeviceProp fields)."""

    name: bytes = b"NVIDIA H200"
    major: int = 9
    minor: int = 0
    multiProcessorCount: int = 132
    totalGlobalMem: int = 143_771_000_832
    integrated: int = 0


class CudaFault(Exception):
    """A simulated device-side fault (an illegal address at run time): sticky, reported by the next sync."""


@dataclass
class Stream:
    handle: int
    queue: list[Callable[[], None]] = field(default_factory=list)
    capture: list[Callable[[], None]] | None = None  # the ops recorded since begin capture
    capture_thread: int | None = None
    capture_mode: int = 0
    invalidated: bool = False


class SimCuda:
    """One simulated GPU, its memory, streams and graphs. `module()` is what `cuda.bindings.runtime` imports
    as; `trt` (tests/gpusim/trt.py) enqueues its engine runs through `enqueue`."""

    def __init__(
        self, props: DeviceProps | None = None, driver: int = 12060, runtime: int = 12090, seed: int = 0
    ):
        self.props, self.driver, self.runtime_version = props or DeviceProps(), driver, runtime
        self._device: dict[int, np.ndarray] = {}  # base -> bytes of a live cudaMalloc block
        self._pinned: dict[
            int, tuple[Any, int]
        ] = {}  # base -> (ctypes buffer, size) of a live cudaMallocHost
        self._freed_pinned: list[
            Any
        ] = []  # kept (poisoned) so that a use after free reads garbage, not a fault
        self._next = DEVICE_BASE
        self._streams: dict[int, Stream] = {0: Stream(0)}  # 0: the legacy default stream
        self._graphs: dict[int, list[Callable[[], None]]] = {}
        self._execs: dict[int, list[Callable[[], None]]] = {}
        self._ids = 0x1000
        self.last_error = OK
        self.sticky: CudaFault | None = None
        self.rng = np.random.default_rng(seed)
        self.calls: list[str] = []  # every API call by name, for tests that count launches
        self.lock = threading.RLock()

    # -- memory -------------------------------------------------------------------------------------------
    def device_view(self, ptr: int, nbytes: int) -> np.ndarray:
        """The bytes [ptr, ptr + nbytes) of one live device allocation; CudaFault otherwise."""
        for base, block in self._device.items():
            if base <= ptr and ptr + nbytes <= base + len(block):
                return block[ptr - base : ptr - base + nbytes]
        raise CudaFault(f"illegal address {ptr:#x} (+{nbytes} bytes): not inside a live cudaMalloc block")

    def is_device(self, ptr: int) -> bool:
        return ptr >= DEVICE_BASE

    def _host_range(self, ptr: int, nbytes: int) -> None:
        """Host memory: pinned blocks are checked against their bounds (other host memory cannot be)."""
        if self.is_device(ptr):
            raise CudaFault(f"{ptr:#x} is a device address used as host memory")
        for base, (_, size) in self._pinned.items():
            if base <= ptr < base + size and ptr + nbytes > base + size:
                raise CudaFault(f"host range {ptr:#x}+{nbytes} runs past its cudaMallocHost block")

    def malloc(self, nbytes: int) -> int:
        # cudaMalloc docstring (cuda-python): "suitably aligned for any kind of variable. The memory is not
        # cleared." Garbage, not zeros: a buffer read before it is written shows.
        base = self._next
        self._next += (max(nbytes, 1) + ALIGN - 1) // ALIGN * ALIGN + ALIGN
        self._device[base] = self.rng.integers(0, 256, max(nbytes, 1), dtype=np.uint8)
        return base

    # -- streams ------------------------------------------------------------------------------------------
    def stream(self, handle: Any) -> Stream | None:
        return self._streams.get(_int(handle))

    def enqueue(self, stream: Stream, op: Callable[[], None]) -> None:
        """Queue `op` on `stream`, or record it when the stream is capturing (Programming Guide, "CUDA
        Graphs / Creating a Graph Using Stream Capture": work is captured into the graph, not run)."""
        (stream.capture if stream.capture is not None else stream.queue).append(op)

    def run(self, stream: Stream) -> None:
        """Run what the stream has queued (at a synchronisation point)."""
        ops, stream.queue = stream.queue, []
        for op in ops:
            if self.sticky is not None:
                break
            try:
                op()
            except CudaFault as e:
                self.sticky = e

    def capturing(self) -> Stream | None:
        """The stream this thread is capturing on (ThreadLocal / Global modes), if any."""
        me = threading.get_ident()
        for s in self._streams.values():
            if s.capture is not None and s.capture_thread == me and s.capture_mode != 2:
                return s
        return None

    def prohibited(self, what: str) -> Any:
        """An API call that is unsafe during capture (cudaThreadExchangeStreamCaptureMode docstring:
        under Global or ThreadLocal mode "potentially unsafe API calls" such as cudaMalloc are prohibited;
        Programming Guide "Prohibited and Unhandled Operations": synchronising a capturing stream is invalid,
        and an invalid operation invalidates the capture). Returns the error to answer, or None."""
        s = self.capturing()
        if s is None:
            return None
        s.invalidated = True
        self.calls.append(f"prohibited during capture: {what}")
        return E.cudaErrorStreamCaptureUnsupported

    def module(self) -> types.ModuleType:
        return _module(self)


def _module(sim: SimCuda) -> types.ModuleType:
    """The functions of `cuda.bindings.runtime` over `sim` (names, arguments and results as the real ones)."""
    m = types.ModuleType("cuda.bindings.runtime")
    m.__file__ = __file__
    m.SIM = sim
    for name in ("cudaError_t", "cudaMemcpyKind", "cudaStreamCaptureMode", "cudaStreamCaptureStatus"):
        setattr(m, name, globals()[name])
    for cls in ("cudaStream_t", "cudaGraph_t", "cudaGraphExec_t"):
        if _real is not None:
            setattr(m, cls, getattr(_real, cls))

    def api(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        def wrapped(*args: Any) -> tuple:
            with sim.lock:
                sim.calls.append(fn.__name__)
                result = fn(*args)
                if result[0] != OK:
                    sim.last_error = result[0]
                return result

        wrapped.__name__, wrapped.__wrapped__ = fn.__name__, fn  # type: ignore[attr-defined]
        setattr(m, fn.__name__, wrapped)
        return wrapped

    @api
    def cudaGetErrorName(error: Any) -> tuple:
        return OK, E(int(error)).name.encode()

    @api
    def cudaGetLastError() -> tuple:
        # "Returns the last error that has been produced by any of the runtime calls in the same instance of
        # the CUDA Runtime library in the host thread and resets it to cudaSuccess" (cudaGetLastError)
        err, sim.last_error = sim.last_error, OK
        return (err,)

    @api
    def cudaDriverGetVersion() -> tuple:
        return OK, sim.driver

    @api
    def cudaRuntimeGetVersion() -> tuple:
        return OK, sim.runtime_version

    @api
    def cudaGetDeviceCount() -> tuple:
        return OK, 1

    @api
    def cudaGetDeviceProperties(device: int) -> tuple:
        if device != 0:
            return (E.cudaErrorInvalidValue, None)
        return OK, sim.props

    @api
    def cudaMalloc(size: int) -> tuple:
        err = sim.prohibited("cudaMalloc")
        if err is not None:
            return err, 0
        return OK, sim.malloc(int(size))

    @api
    def cudaMallocHost(size: int) -> tuple:
        err = sim.prohibited("cudaMallocHost")
        if err is not None:
            return err, 0
        buf = ctypes.create_string_buffer(int(size) + ALIGN)
        base = (ctypes.addressof(buf) + ALIGN - 1) // ALIGN * ALIGN  # page-locked memory is page aligned
        sim._pinned[base] = (buf, int(size))
        return OK, base

    @api
    def cudaFree(devPtr: int) -> tuple:
        # cudaFree synchronises the device before it frees ("API synchronization behavior", Runtime API)
        err = sim.prohibited("cudaFree")
        if err is not None:
            return (err,)
        for s in sim._streams.values():
            sim.run(s)
        if int(devPtr) not in sim._device:
            return (E.cudaErrorInvalidValue,)
        del sim._device[int(devPtr)]
        return (OK,)

    @api
    def cudaFreeHost(ptr: int) -> tuple:
        entry = sim._pinned.pop(int(ptr), None)
        if entry is None:
            return (E.cudaErrorInvalidValue,)
        buf, size = entry
        ctypes.memset(int(ptr), 0xFF, size)  # freed: what a stale numpy view still reads is NaN garbage
        sim._freed_pinned.append(buf)
        return (OK,)

    @api
    def cudaStreamCreate() -> tuple:
        sim._ids += 1
        sim._streams[sim._ids] = Stream(sim._ids)
        return OK, _handle("cudaStream_t", sim._ids)

    @api
    def cudaStreamDestroy(stream: Any) -> tuple:
        s = sim.stream(stream)
        if s is None or s.handle == 0:
            return (E.cudaErrorInvalidResourceHandle,)
        sim.run(s)  # "the stream's pending work completes before its resources are released"
        del sim._streams[s.handle]
        return (OK,)

    def _sync(s: Stream) -> tuple:
        sim.run(s)
        if sim.sticky is not None:  # device faults are sticky: every later call reports them
            return (E.cudaErrorIllegalAddress,)
        return (OK,)

    @api
    def cudaStreamSynchronize(stream: Any) -> tuple:
        s = sim.stream(stream)
        if s is None:
            return (E.cudaErrorInvalidResourceHandle,)
        if s.capture is not None:  # synchronising a capturing stream is invalid and invalidates the capture
            s.invalidated = True
            return (E.cudaErrorStreamCaptureUnsupported,)
        return _sync(s)

    @api
    def cudaDeviceSynchronize() -> tuple:
        err = sim.prohibited("cudaDeviceSynchronize")
        if err is not None:
            return (err,)
        for s in list(sim._streams.values()):
            result = _sync(s)
            if result[0] != OK:
                return result
        return (OK,)

    def _copy_op(dst: int, src: int, count: int, kind: Any) -> Callable[[], None]:
        k = cudaMemcpyKind(int(kind))
        if k == cudaMemcpyKind.cudaMemcpyHostToDevice:

            def op() -> None:
                sim._host_range(src, count)
                sim.device_view(dst, count)[:] = np.frombuffer(ctypes.string_at(src, count), np.uint8)
        elif k == cudaMemcpyKind.cudaMemcpyDeviceToHost:

            def op() -> None:
                sim._host_range(dst, count)
                ctypes.memmove(dst, sim.device_view(src, count).tobytes(), count)
        elif k == cudaMemcpyKind.cudaMemcpyDeviceToDevice:

            def op() -> None:
                sim.device_view(dst, count)[:] = sim.device_view(src, count).copy()
        else:
            raise ValueError(f"cudaMemcpyKind {k.name} is not simulated")
        return op

    def _check_copy(dst: int, src: int, count: int, kind: Any) -> Any:
        """Arguments the runtime rejects at the call (cudaMemcpy docstring: "Calling cudaMemcpy() with dst
        and src pointers that do not match the direction of the copy results in an undefined behavior";
        here an error, so it shows)."""
        k = cudaMemcpyKind(int(kind))
        want = {
            cudaMemcpyKind.cudaMemcpyHostToDevice: (True, False),
            cudaMemcpyKind.cudaMemcpyDeviceToHost: (False, True),
            cudaMemcpyKind.cudaMemcpyDeviceToDevice: (True, True),
        }.get(k)
        if want is None or (sim.is_device(dst), sim.is_device(src)) != want:
            return E.cudaErrorInvalidValue
        try:
            for ptr, is_dev in ((dst, want[0]), (src, want[1])):
                sim.device_view(ptr, count) if is_dev else sim._host_range(ptr, count)
        except CudaFault:
            return E.cudaErrorInvalidValue
        return None

    @api
    def cudaMemcpyAsync(dst: int, src: int, count: int, kind: Any, stream: Any) -> tuple:
        s = sim.stream(stream)
        dst, src, count = int(dst), int(src), int(count)
        err = _check_copy(dst, src, count, kind)
        if s is None or err is not None:
            return (err or E.cudaErrorInvalidResourceHandle,)
        sim.enqueue(s, _copy_op(dst, src, count, kind))
        return (OK,)

    @api
    def cudaMemcpy(dst: int, src: int, count: int, kind: Any) -> tuple:
        err = sim.prohibited("cudaMemcpy") or _check_copy(int(dst), int(src), int(count), kind)
        if err is not None:
            return (err,)
        s = sim._streams[0]  # synchronous: the legacy stream waits for all blocking streams
        for other in sim._streams.values():
            sim.run(other)
        sim.enqueue(s, _copy_op(int(dst), int(src), int(count), kind))
        return _sync(s)

    @api
    def cudaMemsetAsync(devPtr: int, value: int, count: int, stream: Any) -> tuple:
        s = sim.stream(stream)
        try:
            sim.device_view(int(devPtr), int(count))
        except CudaFault:
            return (E.cudaErrorInvalidValue,)
        if s is None:
            return (E.cudaErrorInvalidResourceHandle,)

        def op(ptr: int = int(devPtr), n: int = int(count), v: int = int(value) & 0xFF) -> None:
            sim.device_view(ptr, n)[:] = v

        sim.enqueue(s, op)
        return (OK,)

    @api
    def cudaStreamBeginCapture(stream: Any, mode: Any) -> tuple:
        s = sim.stream(stream)
        if s is None:
            return (E.cudaErrorInvalidResourceHandle,)
        if (
            s.handle == 0 or s.capture is not None
        ):  # "Capture may not be initiated if stream is cudaStreamLegacy"
            return (E.cudaErrorStreamCaptureUnsupported if s.handle == 0 else E.cudaErrorIllegalState,)
        s.capture, s.capture_thread, s.capture_mode, s.invalidated = (
            [],
            threading.get_ident(),
            int(mode),
            False,
        )
        return (OK,)

    @api
    def cudaStreamIsCapturing(stream: Any) -> tuple:
        s = sim.stream(stream)
        if s is None:
            return E.cudaErrorInvalidResourceHandle, None
        if s.capture is None:
            return OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusNone
        if s.invalidated:
            return OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusInvalidated
        return OK, cudaStreamCaptureStatus.cudaStreamCaptureStatusActive

    @api
    def cudaStreamEndCapture(stream: Any) -> tuple:
        # "If capture was invalidated, due to a violation of the rules of stream capture, then a NULL graph
        # will be returned." (cudaStreamEndCapture); not Relaxed: only from the thread that began it
        s = sim.stream(stream)
        if s is None or s.capture is None:
            return E.cudaErrorIllegalState, None
        if s.capture_mode != 2 and s.capture_thread != threading.get_ident():
            return E.cudaErrorStreamCaptureWrongThread, None
        ops, invalidated = s.capture, s.invalidated
        s.capture, s.capture_thread, s.invalidated = None, None, False
        if invalidated:
            return E.cudaErrorStreamCaptureInvalidated, None
        sim._ids += 1
        sim._graphs[sim._ids] = ops
        return OK, _handle("cudaGraph_t", sim._ids)

    @api
    def cudaGraphInstantiate(graph: Any, flags: int) -> tuple:
        ops = sim._graphs.get(_int(graph))
        if ops is None:
            return E.cudaErrorInvalidValue, None
        sim._ids += 1
        sim._execs[sim._ids] = list(ops)
        return OK, _handle("cudaGraphExec_t", sim._ids)

    @api
    def cudaGraphLaunch(graphExec: Any, stream: Any) -> tuple:
        ops, s = sim._execs.get(_int(graphExec)), sim.stream(stream)
        if ops is None or s is None:
            return (E.cudaErrorInvalidResourceHandle,)
        for op in ops:  # what was recorded, with the arguments it was recorded with
            sim.enqueue(s, op)
        return (OK,)

    @api
    def cudaGraphDestroy(graph: Any) -> tuple:
        return (OK,) if sim._graphs.pop(_int(graph), None) is not None else (E.cudaErrorInvalidValue,)

    @api
    def cudaGraphExecDestroy(graphExec: Any) -> tuple:
        return (OK,) if sim._execs.pop(_int(graphExec), None) is not None else (E.cudaErrorInvalidValue,)

    return m

"""Backends: run one engine-directory graph on host buffers that are bound once.

The AR loop (`runtime/loop.py`) is written once over this small interface:

    backend = open_backend("ort", directory, manifest, providers=["cpu"])
    buf = backend.empty((B, L, C), "float32")           # a host buffer the backend can bind
    call = backend.graph("vae_decoder").bind({"tokens": buf}, {"image": img})
    call.run()                                           # reads buf, writes img in place

A `Call` is prepared once per set of buffers; running it takes no arguments and
allocates nothing, so the loop writes inputs in place, runs, and reads outputs in
place. ONNX Runtime (`runtime/ort.py`) binds the numpy memory itself (IO binding over OrtValues that
share it); TensorRT (`runtime/trt.py`) stages it through pinned host memory.

numpy only at import time; onnxruntime is imported when an ORT backend is opened.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from runtime.errors import FarError
from runtime.manifest import GraphSpec, Manifest, TensorSpec

BACKENDS = ("ort", "trt")

# Short provider names accepted by --providers, and which ones need a GPU.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})


def host_dtype(dtype: str | np.dtype) -> np.dtype:
    """numpy dtype of a host buffer for a manifest dtype; numpy has no bfloat16, so its bits live
    in uint16."""
    return np.dtype(np.uint16) if str(dtype) == "bfloat16" else np.dtype(dtype)


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> the bits of the nearest bfloat16 (uint16), ties to even."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    return ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(
        np.uint16
    )


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


class BackendError(FarError, RuntimeError):
    """A backend that cannot be opened or a graph that does not match its manifest."""


class Call(ABC):
    """One prepared graph call over fixed host buffers."""

    @abstractmethod
    def run(self) -> None: ...


class Graph(ABC):
    """One graph of the engine directory, opened by a backend."""

    spec: GraphSpec

    @abstractmethod
    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Call:
        """Prepare a call reading `inputs` and writing `outputs` (buffers from `Backend.empty`)."""

    def check_buffers(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Every graph input and output bound once, with the manifest's shape and dtype, C-contiguous."""
        for kind, specs, arrays in (
            ("input", self.spec.inputs, inputs),
            ("output", self.spec.outputs, outputs),
        ):
            names = {t.name for t in specs}
            if set(arrays) != names:
                raise BackendError(f"{self.spec.file}: bind {kind}s {sorted(names)}, got {sorted(arrays)}")
            for t in specs:
                a = arrays[t.name]
                if a.shape != t.shape or a.dtype != host_dtype(t.dtype) or not a.flags.c_contiguous:
                    raise BackendError(
                        f"{self.spec.file}: {kind} {t.name!r} needs a contiguous "
                        f"{t.dtype}{list(t.shape)} buffer, got {a.dtype}{list(a.shape)}"
                    )


class Backend(ABC):
    """Opens the graphs of one engine directory."""

    name: str
    fuses_sequences = False  # `sequence` makes one launch of many calls: run it whole, not call by call

    @abstractmethod
    def graph(self, name: str) -> Graph: ...

    def empty(self, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        """A zeroed host buffer that this backend can bind (TensorRT: pinned memory)."""
        return np.zeros(tuple(shape), dtype=host_dtype(dtype))

    def rows(self, n: int, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        """A zeroed (n, *shape) table whose rows are bound one by one. A device backend starts each row at an
        address its graphs accept (TensorRT: 256-byte aligned), so the table need not be contiguous."""
        return self.empty((n, *shape), dtype)

    def upload(self, arrays: Sequence[np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Make the graphs see what the host wrote into these buffers (from `empty`). A no-op where the graphs
        read host memory; a device backend enqueues host -> device copies."""

    def download(self, arrays: Sequence[np.ndarray]) -> None:  # noqa: B027 - optional hook
        """Wait for every call enqueued so far and bring these buffers' contents back to the host."""

    def sequence(self, calls: Sequence[Call]) -> Call:
        """One call that runs `calls` in order (a device backend may capture it once as a CUDA graph)."""
        return CallSequence(calls)

    def describe(self) -> str:
        return self.name

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release device resources (a no-op for ONNX Runtime on CPU)."""


class CallSequence(Call):
    def __init__(self, calls: Sequence[Call]):
        self.calls = list(calls)

    def run(self) -> None:
        for call in self.calls:
            call.run()


# ----------------------------------------------------------------------------
# ONNX Runtime
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------


Keep = Callable[
    [str, int], bool
]  # (graph name, index of the call to that graph) -> keep a copy of its inputs


class RecordingBackend(Backend):
    """Wraps a backend and keeps copies of the inputs of the calls `keep` selects, taken when each call
    runs, and the order of runs, uploads and downloads. The build validates every graph on the inputs the
    runtime's own loop fed it this way; the tests prove with it that no data crosses to the host between
    the AR steps of a batch."""

    def __init__(self, inner: Backend, keep: Keep = lambda graph, index: True):
        self.inner, self.name, self.keep = inner, inner.name, keep
        self.binds: dict[str, int] = {}  # calls bound per graph
        self.counts: dict[str, int] = {}  # calls run per graph
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}  # the kept inputs per graph, in call order
        self.events: list[str] = []  # "run <graph>", "upload", "download", in order

    def graph(self, name: str) -> Graph:
        return _RecordingGraph(self, name, self.inner.graph(name))

    def empty(self, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        return self.inner.empty(shape, dtype)

    def rows(self, n: int, shape: Sequence[int], dtype: str | np.dtype) -> np.ndarray:
        return self.inner.rows(n, shape, dtype)

    def upload(self, arrays: Sequence[np.ndarray]) -> None:
        self.events.append("upload")
        self.inner.upload(arrays)

    def download(self, arrays: Sequence[np.ndarray]) -> None:
        self.events.append("download")
        self.inner.download(arrays)

    def describe(self) -> str:
        return self.inner.describe()

    def close(self) -> None:
        self.inner.close()

    def record(self, graph: str, inputs: Mapping[str, np.ndarray]) -> None:
        self.events.append(f"run {graph}")
        index = self.counts.get(graph, 0)
        self.counts[graph] = index + 1
        if self.keep(graph, index):
            self.calls.setdefault(graph, []).append({k: np.array(v, copy=True) for k, v in inputs.items()})


class _RecordingGraph(Graph):
    def __init__(self, backend: RecordingBackend, name: str, inner: Graph):
        self._backend, self._name, self._inner, self.spec = backend, name, inner, inner.spec

    def bind(self, inputs: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> Call:
        binds = self._backend.binds
        binds[self._name] = binds.get(self._name, 0) + 1
        return _RecordingCall(self._backend, self._name, dict(inputs), self._inner.bind(inputs, outputs))


class _RecordingCall(Call):
    def __init__(self, backend: RecordingBackend, graph: str, inputs: dict[str, np.ndarray], inner: Call):
        self._backend, self._graph, self._inputs, self._inner = backend, graph, inputs, inner

    def run(self) -> None:
        self._backend.record(self._graph, self._inputs)
        self._inner.run()


# ----------------------------------------------------------------------------
# Opening a backend
# ----------------------------------------------------------------------------


def open_backend(
    kind: str,
    directory: str | Path,
    manifest: Manifest,
    providers: Sequence[str] | str | None = None,
    threads: int | None = None,
    cuda_graph: bool = False,
    spin: bool = False,
) -> Backend:
    """'ort' (providers: cpu / cuda / tensorrt) or 'trt' (the manifest's TensorRT plans).

    ONNX Runtime's defaults: one intra-op thread per physical core (`threads` overrides), and idle threads
    that sleep instead of busy-waiting (`spin=True` lets them spin: a few percent faster on an idle
    machine, several times slower on a loaded one, where spinning threads fight for the cores)."""
    directory = Path(directory)
    if cuda_graph and kind != "trt":
        raise BackendError(
            "CUDA graphs (--cuda-graph) need the TensorRT backend: add --backend trt, or drop it"
        )
    if kind == "ort":
        from runtime.ort import OrtBackend

        return OrtBackend(directory, manifest, providers, threads, spin)
    if kind == "trt":
        from runtime.trt import TrtBackend

        return TrtBackend(directory, manifest, cuda_graph=cuda_graph)
    raise BackendError(f"unknown backend {kind!r}: use one of {', '.join(BACKENDS)}")


def tensor_nbytes(t: TensorSpec) -> int:
    return int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize

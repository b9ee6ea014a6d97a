"""A simulated `tensorrt` module of one release (8.6, 10.3, 11.0), over a simulated CUDA device (cuda.py).

Names: only those the release's Python bindings define (tests/gpusim/trt_names.json, extracted from
NVIDIA/TensorRT's sources by scripts/trt_binding_names.py, commits recorded there): a module attribute or
a member of a simulated class that the release lacks raises AttributeError, as on the device.

Behaviour, each rule from the documentation cited where it is enforced:
- a plan is a header (TensorRT version, compute capability) and the ONNX model; another release or GPU
  refuses it (deserialize_cuda_engine returns None);
- set_tensor_address returns False for a name that is not an I/O tensor or an address that is not 256-byte
  aligned;
- execute_async_v3 enqueues (or, on a capturing stream, records) one ONNX Runtime CPU run of the plan's
  graph that reads and writes the simulated device memory at the addresses bound at enqueue time;
- a context's first enqueue does deferred setup that cannot be captured; a captured enqueue reads the
  context's state at replay (one context per captured call).
Not modelled: kernel numerics (TF32, fp16 accumulation), the parser's op coverage, performance, and
TensorRT behaviour the documentation does not state.
"""

from __future__ import annotations

import enum
import json
import types
from pathlib import Path
from typing import Any

import numpy as np

from .cuda import ALIGN, CudaFault, SimCuda

NAMES = json.loads((Path(__file__).with_name("trt_names.json")).read_text())["releases"]
PLAN_MAGIC = b"far-gpusim-plan\n"
VERSIONS = {"8.6": "8.6.1", "10.3": "10.3.0", "11.0": "11.0.0"}

# NvInferRuntimeBase.h (10.3 and 11.0): enum class DataType
DATA_TYPES = {
    "FLOAT": 0,
    "HALF": 1,
    "INT8": 2,
    "INT32": 3,
    "BOOL": 4,
    "UINT8": 5,
    "FP8": 6,
    "BF16": 7,
    "INT64": 8,
}
NUMPY = {"FLOAT": np.float32, "HALF": np.float16, "INT8": np.int8, "INT32": np.int32, "BOOL": np.bool_,
         "UINT8": np.uint8, "INT64": np.int64}  # fmt: skip
ONNX_TYPES = {1: "FLOAT", 10: "HALF", 3: "INT8", 6: "INT32", 9: "BOOL", 2: "UINT8", 16: "BF16", 7: "INT64"}


class _Checked:
    """Public attributes only where the release's bindings define them."""

    _cls = ""
    _allowed: frozenset[str] = frozenset()

    def __getattribute__(self, name: str) -> Any:
        if not name.startswith("_") and name not in type(self)._allowed:
            raise AttributeError(f"'tensorrt.{type(self)._cls}' object has no attribute '{name}'")
        return object.__getattribute__(self, name)


def make_tensorrt(sim: SimCuda, release: str = "10.3") -> types.ModuleType:
    """The `tensorrt` module of `release` over `sim`."""
    names = NAMES[release]
    members = {k: frozenset(v) for k, v in names["classes"].items()}
    version = VERSIONS[release]
    m = types.ModuleType("tensorrt")
    m.__file__ = __file__
    m.SIM = sim

    def enum_of(name: str, values: dict[str, int]) -> Any:
        return enum.IntEnum(name, {k: v for k, v in values.items() if k in members.get(name, ())})

    DataType = enum_of("DataType", DATA_TYPES)
    Severity = enum_of("Severity", {"INTERNAL_ERROR": 0, "ERROR": 1, "WARNING": 2, "INFO": 3, "VERBOSE": 4})
    flag_values = {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1} if release != "11.0" else {"STRONGLY_TYPED": 0}
    CreationFlag = enum_of("NetworkDefinitionCreationFlag", flag_values)
    PoolType = enum_of("MemoryPoolType", {"WORKSPACE": 0})
    IOMode = enum_of("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})
    Strategy = enum_of(
        "ExecutionContextAllocationStrategy", {"STATIC": 0, "ON_PROFILE_CHANGE": 1, "USER_MANAGED": 2}
    )
    cc = f"{sim.props.major}.{sim.props.minor}"

    def cls(name: str, base: type = _Checked) -> Any:
        def deco(c: type) -> type:
            c._cls, c._allowed = name, members.get(name, frozenset())
            return c

        return deco

    @cls("Logger")
    class Logger(_Checked):
        def __init__(self, min_severity: Any = 2):
            self.min_severity = min_severity
            self._messages: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            self._messages.append(msg)

    for s in Severity:  # export_values(): trt.Logger.WARNING
        setattr(Logger, s.name, s)
    Logger.Severity = Severity

    @cls("IHostMemory")
    class IHostMemory(bytes, _Checked):
        @property
        def nbytes(self) -> int:
            return len(self)

    @cls("ITimingCache")
    class ITimingCache(_Checked):
        def __init__(self, blob: bytes):
            self._blob = blob

        def serialize(self) -> IHostMemory:
            return IHostMemory(_header(version, cc) + b"timing")

    @cls("INetworkDefinition")
    class INetworkDefinition(_Checked):
        def __init__(self, flags: int):
            self._flags, self._model = flags, None

    @cls("IBuilderConfig")
    class IBuilderConfig(_Checked):
        def __init__(self) -> None:
            self._pools: dict[Any, int] = {}
            self.builder_optimization_level = 3
            self._cache: ITimingCache | None = None

        def set_memory_pool_limit(self, pool: Any, size: int) -> None:
            self._pools[PoolType(int(pool))] = int(size)

        def create_timing_cache(self, serialized_timing_cache: bytes) -> ITimingCache:
            return ITimingCache(bytes(serialized_timing_cache))

        def set_timing_cache(self, cache: ITimingCache, ignore_mismatch: bool) -> bool:
            # IBuilderConfig::setTimingCache: a cache from another device or version is refused unless
            # ignoreMismatch
            ok = not cache._blob or cache._blob.startswith(_header(version, cc)) or ignore_mismatch
            if ok:
                self._cache = cache
            return ok

        def get_timing_cache(self) -> ITimingCache | None:
            return self._cache

    @cls("OnnxParser")
    class OnnxParser(_Checked):
        def __init__(self, network: INetworkDefinition, logger: Logger):
            self._network, self._errors = network, []

        def parse_from_file(self, model: str) -> bool:
            import onnx

            try:  # external data is resolved next to the file, as the real parser does
                proto = onnx.load(str(model))
                onnx.checker.check_model(proto)
            except Exception as e:
                self._errors.append(f"{type(e).__name__}: {e}")
                return False
            self._network._model = proto.SerializeToString()
            return True

        @property
        def num_errors(self) -> int:
            return len(self._errors)

        def get_error(self, index: int) -> str:
            return self._errors[index]

    @cls("Builder")
    class Builder(_Checked):
        def __init__(self, logger: Logger):
            self._logger = logger

        def create_network(self, flags: int = 0) -> INetworkDefinition:
            return INetworkDefinition(int(flags))

        def create_builder_config(self) -> IBuilderConfig:
            return IBuilderConfig()

        def build_serialized_network(self, network: INetworkDefinition, config: IBuilderConfig) -> Any:
            if network._model is None:
                return None
            return IHostMemory(_header(version, cc) + network._model)

    @cls("IExecutionContext")
    class IExecutionContext(_Checked):
        def __init__(self, engine: ICudaEngine, strategy: Any):
            self._engine, self._strategy = engine, int(strategy)
            self._addresses: dict[str, int] = {}
            self._memory: int | None = None
            if self._strategy != 2:  # STATIC: TensorRT allocates the context's memory itself
                self._memory = sim.malloc(engine.device_memory_size_v2)
            self._ran = False

        def set_tensor_address(self, name: str, memory: int) -> bool:
            # NvInferRuntime.h (10.3, 11.0) IExecutionContext::setTensorAddress: "Return false if the provided
            # name does not map to an input or output tensor." / "The pointer must have at least 256-byte
            # alignment."
            if name not in self._engine._io or int(memory) % ALIGN:
                return False
            self._addresses[name] = int(memory)
            return True

        def get_tensor_address(self, name: str) -> int:
            return self._addresses.get(name, 0)

        def set_device_memory(self, memory: int, size: int) -> None:
            # IExecutionContext::setDeviceMemoryV2: memory aligned as cudaMalloc's and at least
            # getDeviceMemorySizeV2() bytes (NvInferRuntime.h)
            if int(memory) % ALIGN or int(size) < self._engine.device_memory_size_v2:
                raise ValueError("set_device_memory: memory too small or not aligned")
            sim.device_view(int(memory), int(size))
            self._memory = int(memory)

        def execute_async_v3(self, stream_handle: int) -> bool:
            """IExecutionContext::enqueueV3: every input and output needs its address (setTensorAddress
            docs); a USER_MANAGED context needs its device memory set (createExecutionContext docs)."""
            stream = sim.stream(int(stream_handle))
            if stream is None or self._memory is None or set(self._addresses) != set(self._engine._io):
                return False
            if stream.capture is not None and not self._ran:
                # TensorRT Developer Guide, "Working with CUDA Graphs": enqueue once before capturing, so that
                # deferred setup (allocations, uploads) happens outside the capture; inside it, it is an
                # operation capture prohibits, which invalidates the capture
                stream.invalidated = True
                return False
            self._ran = True
            if stream.capture is not None:
                # captured: the graph runs the context with the state it has at replay (the developer guide:
                # a captured graph depends on its execution context; one context per captured graph,
                # NVIDIA/TensorRT#3798)
                sim.enqueue(stream, lambda: self._engine._run(self._addresses, self._memory))
            else:
                bound = dict(self._addresses)
                sim.enqueue(stream, lambda: self._engine._run(bound, self._memory))
            return True

    @cls("ICudaEngine")
    class ICudaEngine(_Checked):
        def __init__(self, model: bytes):
            import onnx
            import onnxruntime as ort

            proto = onnx.load_from_string(model)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.log_severity_level = 3
            self._session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
            inits = {i.name for i in proto.graph.initializer}
            self._io: dict[str, tuple[Any, tuple[int, ...], Any]] = {}
            for mode, values in ((IOMode.INPUT, proto.graph.input), (IOMode.OUTPUT, proto.graph.output)):
                for v in values:
                    if v.name in inits:
                        continue
                    t = v.type.tensor_type
                    dt = DataType[ONNX_TYPES[t.elem_type]]
                    self._io[v.name] = (mode, tuple(d.dim_value for d in t.shape.dim), dt)
            self._names = list(self._io)
            # activations: what the graph's largest intermediate needs, rounded to the alignment
            self._scratch = ALIGN * (1 + len(proto.graph.node))

        @property
        def num_io_tensors(self) -> int:
            return len(self._names)

        def get_tensor_name(self, index: int) -> str:
            return self._names[index]

        def get_tensor_shape(self, name: str) -> tuple[int, ...]:
            return self._io[name][1]

        def get_tensor_dtype(self, name: str) -> Any:
            return self._io[name][2]

        def get_tensor_mode(self, name: str) -> Any:
            return self._io[name][0] if name in self._io else IOMode.NONE

        @property
        def device_memory_size_v2(self) -> int:
            return self._scratch

        @property
        def device_memory_size(self) -> int:
            return self._scratch

        def create_execution_context(self, strategy: Any = 0) -> IExecutionContext:
            return IExecutionContext(self, strategy)

        def _run(self, addresses: dict[str, int], memory: int | None) -> None:
            """The plan's graph on ONNX Runtime (CPU), on the device memory at `addresses`."""
            feeds = {}
            for name, (mode, shape, dt) in self._io.items():
                if mode == IOMode.INPUT:
                    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY[dt.name]).itemsize
                    raw = sim.device_view(addresses[name], nbytes)
                    feeds[name] = raw.view(NUMPY[dt.name]).reshape(shape).copy()
            outs = self._session.run(None, feeds)
            scratch = sim.device_view(memory, self._scratch)
            scratch[:] = sim.rng.integers(0, 256, len(scratch), dtype=np.uint8)  # activations: clobbered
            outputs = [(n, s[2]) for n, s in self._io.items() if s[0] == IOMode.OUTPUT]
            for (name, dt), value in zip(outputs, outs, strict=True):  # the session's output order
                data = np.ascontiguousarray(value, dtype=NUMPY[dt.name]).view(np.uint8).reshape(-1)
                sim.device_view(addresses[name], len(data))[:] = data

    @cls("Runtime")
    class Runtime(_Checked):
        def __init__(self, logger: Logger):
            self._logger = logger

        def deserialize_cuda_engine(self, serialized_engine: bytes) -> ICudaEngine | None:
            # IRuntime::deserializeCudaEngine returns nullptr when it cannot deserialize; a plan is specific
            # to the TensorRT version and GPU it was built with (Developer Guide, "Engine Compatibility")
            data = bytes(serialized_engine)
            head = _header(version, cc)
            if not data.startswith(head):
                self._logger.log(
                    Severity.ERROR, "the plan was built by another TensorRT version or for another GPU"
                )
                return None
            try:
                return ICudaEngine(data[len(head) :])
            except Exception as e:  # noqa: BLE001 - TensorRT logs and returns nullptr
                self._logger.log(Severity.ERROR, f"deserialization failed: {e}")
                return None

    def nptype(trt_type: Any) -> Any:
        # tensorrt/__init__.py (bindings wheel): no numpy equivalent for fp8 and bfloat16
        name = DataType(int(trt_type)).name
        if name not in NUMPY:
            raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
        return NUMPY[name]

    provided = {
        "__version__": version,
        "Logger": Logger,
        "Builder": Builder,
        "Runtime": Runtime,
        "OnnxParser": OnnxParser,
        "DataType": DataType,
        "NetworkDefinitionCreationFlag": CreationFlag,
        "MemoryPoolType": PoolType,
        "TensorIOMode": IOMode,
        "ExecutionContextAllocationStrategy": Strategy,
        "nptype": nptype,
        "ICudaEngine": ICudaEngine,
        "IExecutionContext": IExecutionContext,
    }
    for name, value in provided.items():
        if name in names["module"]:
            setattr(m, name, value)
    return m


def _header(version: str, cc: str) -> bytes:
    return PLAN_MAGIC + json.dumps({"tensorrt": version, "compute_capability": cc}).encode() + b"\n"


__all__ = ["CudaFault", "make_tensorrt", "VERSIONS"]

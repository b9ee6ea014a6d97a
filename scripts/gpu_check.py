"""What scripts/gpu_check.sh checks in Python: one line per check, "ok: ...", "skipped: ... (why)" or
"FAILED: ...". Exit 1 only when a check that could run failed; a CPU-only machine exits 0.

    python scripts/gpu_check.py env       # driver, CUDA, which of tensorrt / onnxruntime-gpu /
                                          # cuda-bindings import
    python scripts/gpu_check.py stub      # runtime/trt.py's CUDA half with a stub engine (no TensorRT needed)
    python scripts/gpu_check.py timing    # PyTorch reference on CUDA: FAR vs MAR at batch 1/16/64

The stub engine has the execution-context interface runtime/trt.py uses (set_tensor_address,
execute_async_v3); its execute_async_v3 enqueues a device-to-device cudaMemcpyAsync from its input
to its output on the given stream. So the backend's device buffers and pinned mirrors, its uploads and
downloads, a sequence of calls whose intermediate never leaves the device, replays with fresh host
inputs and the capture of the whole sequence as one CUDA graph all run on a real GPU without TensorRT.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from runtime.backends import BackendError  # noqa: E402
from runtime.device import DeviceError, describe, import_cudart, probe_gpu  # noqa: E402
from runtime.manifest import GraphSpec, TensorSpec  # noqa: E402


def _say(status: str, what: str) -> None:
    print(f"{status}: {what}", flush=True)


def cuda_or_reason() -> tuple[Any, str | None]:
    """(runtime bindings, None) where a CUDA GPU is usable, else (None, why not)."""
    try:
        rt = import_cudart()
        probe_gpu(rt)
    except DeviceError as e:
        return None, str(e)
    return rt, None


# ----------------------------------------------------------------------------
# env
# ----------------------------------------------------------------------------


def env() -> bool:
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run(
            [smi, "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        _say("ok" if q.returncode == 0 else "skipped", f"nvidia-smi: {(q.stdout or q.stderr).strip()}")
    else:
        _say("skipped", "nvidia-smi: not installed (no NVIDIA driver, or a Jetson: see tegrastats)")
    for module in ("tensorrt", "onnxruntime", "cuda.bindings", "torch"):
        try:
            mod = __import__(module, fromlist=["__version__"])
            extra = ""
            if module == "onnxruntime":
                extra = f", providers {', '.join(mod.get_available_providers())}"
            if module == "torch":
                extra = f", CUDA {mod.version.cuda}, cuda available: {mod.cuda.is_available()}"
            _say("ok", f"import {module} {getattr(mod, '__version__', '?')}{extra}")
        except Exception as e:  # ImportError, or PyPI's tensorrt stub failing to fetch its libraries
            _say(
                "skipped", f"import {module}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
    rt, why = cuda_or_reason()
    if rt is None:
        _say("skipped", f"CUDA device: {why}")
    else:
        _say("ok", f"CUDA device: {describe(probe_gpu(rt))}")
    return True


# ----------------------------------------------------------------------------
# stub engine
# ----------------------------------------------------------------------------


class StubContext:
    """TensorRT's IExecutionContext as runtime/trt.py uses it, under TensorRT's documented address rule
    (setTensorAddress: 256-byte aligned, NvInferRuntime.h); 'inference' copies the input, shifted by one
    element, to the output on the GPU: a call run twice shows as a shift of two."""

    def __init__(self, backend: Any, src: str, dst: str, nbytes: int):
        self.backend, self.src, self.dst, self.nbytes = backend, src, dst, nbytes
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, memory: int, size: int) -> None:
        pass

    def set_tensor_address(self, name: str, address: int) -> bool:
        if name not in (self.src, self.dst) or address % 256:
            return False
        self.addresses[name] = address
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = self.backend.cuda
        assert stream_handle == self.backend.stream_handle
        cuda.copy_async(
            self.addresses[self.dst],
            self.addresses[self.src] + 4,
            self.nbytes - 4,
            cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            self.backend.stream,
        )
        return True


def stub_backend(cuda_graph: bool) -> Any:
    """runtime/trt.py's TrtBackend minus TensorRT: its CUDA half (buffers, stream, contexts per call, CUDA
    graphs) with stub graphs."""
    from types import SimpleNamespace

    from runtime.device import stream_handle
    from runtime.trt import TrtBackend, TrtGraph, _Cuda

    class StubEngine:
        def __init__(self, backend: Any, nbytes: int):
            self.backend, self.nbytes = backend, nbytes

        def create_execution_context(self, strategy: Any) -> StubContext:
            return StubContext(self.backend, "x", "y", self.nbytes)

    class StubGraph(TrtGraph):
        def __init__(self, backend: Any, shape: tuple[int, ...]):
            t = lambda n: TensorSpec(n, shape, "float32")  # noqa: E731
            self.backend = backend
            self.spec = GraphSpec(
                file="stub.plan", sha256="", inputs=(t("x"),), outputs=(t("y"),), precision="fp32"
            )
            self.engine = StubEngine(backend, int(np.prod(shape)) * 4)

    class StubBackend(TrtBackend):
        def __init__(self) -> None:
            self.cuda_graph, self.cuda = cuda_graph, _Cuda()
            self.trt = SimpleNamespace(ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED=2))
            self.device = self.cuda.device("stub")
            self.stream = self.cuda.stream()
            self.stream_handle = stream_handle(self.stream)
            self._graphs, self._buffers, self._sequences, self._calls, self.notes = {}, [], [], [], []
            self.scratch, self.scratch_bytes = 0, 0

        def stub_graph(self, shape: tuple[int, ...]) -> StubGraph:
            return StubGraph(self, shape)

    return StubBackend()


def _stub_run(be: Any, shape: tuple[int, ...], replays: int) -> str:
    """A ping-pong sequence x -> y -> x -> y (state carried between calls, as the AR loop's tokens are),
    bound once on row views of one `rows` table, replayed with fresh host inputs: y must be each new x
    shifted by 3 (one per call: a call run twice, or a stale replay, shifts otherwise), and x's device copy
    must not come back. Returns the figure of the run."""
    table = be.rows(2, shape, "float32")
    x, y = table[0], table[1]
    graph = be.stub_graph(shape)
    loop = be.sequence([graph.bind({"x": a}, {"y": b}) for a, b in ((x, y), (y, x), (x, y))])
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    for i in range(replays):
        fresh = rng.standard_normal(shape, dtype=np.float32)
        x[...] = fresh  # fresh host input, same pinned buffer
        be.upload([table])
        loop.run()
        be.download([table])
        if not np.array_equal(y.reshape(-1)[:-3], fresh.reshape(-1)[3:]):
            raise BackendError(f"run {i}: the output is not the new input shifted by 3 (a call ran twice?)")
    ms = (time.perf_counter() - t0) * 1e3 / replays
    flat = be.empty((2 * x.size,), "float32")
    try:
        view = flat[1 : 1 + x.size].reshape(shape)  # 4 bytes into an allocation: not 256-byte aligned
        graph.bind({"x": view}, {"y": y})
    except BackendError as e:
        if "not 256-byte aligned" not in str(e):
            raise
    else:
        raise BackendError("a view 4 bytes into a buffer was bound: TensorRT refuses unaligned addresses")
    return f"{ms:.3f} ms/run ({x.nbytes >> 10} KiB up and down); an unaligned view is refused"


def stub_check(replays: int = 5, shape: tuple[int, ...] = (16, 4096)) -> bool:
    """The stub ping-pong sequence, plainly enqueued and as one CUDA graph (first run plain, then captured
    and replayed)."""
    rt, why = cuda_or_reason()
    if rt is None:
        _say("skipped", f"TensorRT backend's CUDA half with a stub engine: no CUDA device ({why})")
        return True
    ok = True
    for cuda_graph in (False, True):
        mode = "one CUDA graph of 3 ping-pong calls" if cuda_graph else "plain enqueue of 3 ping-pong calls"
        what = f"stub engine, {mode}"
        be = stub_backend(cuda_graph)
        try:
            figure = _stub_run(be, shape, replays)
            _say("ok", f"{what}, {replays} runs: state carried, each call ran once, {figure}")
        except BackendError as e:
            ok = False
            _say("FAILED", f"{what}: {e}")
        finally:
            be.close()
    return ok


# ----------------------------------------------------------------------------
# PyTorch reference timing on CUDA
# ----------------------------------------------------------------------------


def timing(batches: tuple[int, ...] = (1, 16, 64)) -> bool:
    """The shipped MNIST checkpoints (not far-b: no weights ship for it): FAR (shortcut head, its default
    steps) vs MAR (100 diffusion steps) per image, eager, fp32 and bf16 autocast."""
    try:
        import torch
    except ImportError:
        _say("skipped", "FAR vs MAR timing: torch is not installed")
        return True
    if not torch.cuda.is_available():
        _say("skipped", "FAR vs MAR timing: torch sees no CUDA device")
        return True
    from training.checkpoint import load_checkpoint
    from training.sample import SamplingSettings, generate

    for name in ("far-mnist", "mar-mnist"):
        ckpt = load_checkpoint(ROOT / "checkpoints" / name)
        s = SamplingSettings.resolve(ckpt.cfg, seed=0)
        for bf16 in (False, True):
            row = []
            for b in batches:
                labels = [i % ckpt.cfg.num_classes for i in range(b)]
                generate(ckpt.model, ckpt.vae, labels[:1], s, device="cuda", bf16=bf16)  # warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                generate(ckpt.model, ckpt.vae, labels, s, device="cuda", bf16=bf16)
                torch.cuda.synchronize()
                row.append(f"batch {b}: {(time.perf_counter() - t0) * 1e3 / b:.1f} ms/image")
            _say(
                "ok",
                f"{name} ({ckpt.cfg.head} head, {s.head_steps} steps), {'bf16' if bf16 else 'fp32'}, "
                f"{torch.cuda.get_device_name()}: " + "; ".join(row),
            )
    return True


def main(argv: list[str]) -> int:
    checks = {"env": env, "stub": stub_check, "timing": timing}
    names = argv or ["env", "stub"]
    unknown = [n for n in names if n not in checks]
    if unknown:
        print(f"Error: unknown check {unknown[0]!r}; use {', '.join(checks)}", file=sys.stderr)
        return 2
    return 0 if all([checks[n]() for n in names]) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

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
    """TensorRT's IExecutionContext as runtime/trt.py uses it; 'inference' copies input to output on the
    GPU."""

    def __init__(self, backend: Any, src: str, dst: str, nbytes: int):
        self.backend, self.src, self.dst, self.nbytes = backend, src, dst, nbytes
        self.addresses: dict[str, int] = {}

    def set_tensor_address(self, name: str, address: int) -> bool:
        self.addresses[name] = address
        return name in (self.src, self.dst)

    def execute_async_v3(self, stream_handle: int) -> bool:
        cuda = self.backend.cuda
        assert stream_handle == self.backend.stream_handle
        cuda.copy_async(
            self.addresses[self.dst],
            self.addresses[self.src],
            self.nbytes,
            cuda.rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice,
            self.backend.stream,
        )
        return True


def stub_backend(cuda_graph: bool) -> Any:
    """runtime/trt.py's TrtBackend minus TensorRT: its CUDA half (buffers, stream, calls) with stub graphs."""
    from runtime.device import stream_handle
    from runtime.trt import TrtBackend, TrtGraph, _Cuda

    class StubGraph(TrtGraph):
        def __init__(self, backend: Any, shape: tuple[int, ...]):
            t = lambda n: TensorSpec(n, shape, "float32")  # noqa: E731
            self.backend = backend
            self.spec = GraphSpec(
                file="stub.plan", sha256="", inputs=(t("x"),), outputs=(t("y"),), precision="fp32"
            )
            self.context = StubContext(backend, "x", "y", int(np.prod(shape)) * 4)

    class StubBackend(TrtBackend):
        def __init__(self) -> None:
            self.cuda_graph, self.cuda = cuda_graph, _Cuda()
            self.device = self.cuda.device("stub")
            self.stream = self.cuda.stream()
            self.stream_handle = stream_handle(self.stream)
            self._graphs, self._buffers, self._sequences = {}, [], []

        def stub_graph(self, shape: tuple[int, ...]) -> StubGraph:
            return StubGraph(self, shape)

    return StubBackend()


def stub_check(replays: int = 5, shape: tuple[int, ...] = (16, 4096)) -> bool:
    """Two stub calls x -> y -> z bound once and run as one sequence (one CUDA graph with capture), replayed
    with fresh host inputs: z must equal each new x, and y (device-only state) must never come back."""
    rt, why = cuda_or_reason()
    if rt is None:
        _say("skipped", f"TensorRT backend's CUDA half with a stub engine: no CUDA device ({why})")
        return True
    ok = True
    for cuda_graph in (False, True):
        mode = "one CUDA graph of 2 calls, captured + replayed" if cuda_graph else "plain enqueue"
        what = f"stub engine, {mode}"
        be = stub_backend(cuda_graph)
        try:
            x, y, z = (be.empty(shape, "float32") for _ in range(3))
            graph = be.stub_graph(shape)
            loop = be.sequence([graph.bind({"x": x}, {"y": y}), graph.bind({"x": y}, {"y": z})])
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            for i in range(replays):
                x[...] = rng.standard_normal(shape, dtype=np.float32)  # fresh host input, same pinned buffer
                be.upload([x])
                loop.run()
                be.download([z])
                if not np.array_equal(x, z):
                    raise BackendError(f"run {i}: the output is not the new input (stale replay?)")
                if np.any(y):
                    raise BackendError(f"run {i}: the intermediate buffer came back to the host")
            ms = (time.perf_counter() - t0) * 1e3 / replays
            _say(
                "ok",
                f"{what}, {replays} runs: output == fresh input, intermediate stayed on the device, "
                f"{ms:.3f} ms/run ({x.nbytes >> 10} KiB up and down)",
            )
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

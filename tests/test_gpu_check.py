"""scripts/gpu_check.py / gpu_check.sh: on a CPU-only machine every check says what it skipped and why and
the script exits 0; on a GPU (marked `gpu`) the stub engine really runs runtime/trt.py's CUDA half."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_check  # noqa: E402

RT, NO_CUDA = gpu_check.cuda_or_reason()


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(RT is not None, reason="a CUDA device is present here: test_stub_engine_on_the_gpu runs")
def test_without_a_gpu_every_check_says_what_it_skipped():
    p = _run("env", "stub")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = p.stdout.strip().splitlines()
    assert all(line.split(":", 1)[0] in ("ok", "skipped") for line in lines), lines
    assert any(
        line.startswith("skipped: TensorRT backend's CUDA half with a stub engine: no CUDA device")
        for line in lines
    ), lines
    assert "Traceback" not in p.stderr


@pytest.mark.skipif(RT is not None, reason="a CUDA device is present here")
def test_shell_script_exits_0_on_cpu_and_names_each_skip():
    p = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "skipped: PyTorch reference on CUDA" in p.stdout or "ok: training/sample.py" in p.stdout
    assert "skipped: pytest -m 'gpu or tensorrt'" in p.stdout or "passed" in p.stdout
    assert p.stdout.strip().splitlines()[-1] == "summary: 0 check groups ran on a GPU, 3 skipped"
    strict = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--require-gpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert strict.returncode == 1 and "--require-gpu: no check could run on a GPU" in strict.stderr


def test_unknown_check_is_a_one_line_error():
    p = _run("nope")
    assert p.returncode == 2 and p.stderr.strip() == "Error: unknown check 'nope'; use env, stub, timing"


@pytest.mark.gpu
@pytest.mark.skipif(RT is None, reason=f"no CUDA device: {NO_CUDA}")
def test_stub_engine_on_the_gpu():
    """Pinned buffers bound once, replays with fresh host inputs, with and without CUDA-graph capture."""
    assert gpu_check.stub_check(replays=4, shape=(8, 256))


def test_stub_engine_on_the_simulated_gpu(monkeypatch):
    """The same check on tests/gpusim's CUDA rules (asynchrony, capture, bounds): it passes there, and a
    sequence whose first CUDA-graph run computes twice would fail its shift check."""
    import gpusim

    sim, _ = gpusim.install(monkeypatch, None)
    monkeypatch.setattr(gpu_check, "cuda_or_reason", lambda: (sim.module(), None))
    assert gpu_check.stub_check(replays=3, shape=(4, 64))
    assert sim.calls.count("cudaGraphLaunch") == 2  # runs 2 and 3; run 1 plain, then captured


def test_reference_sampler_refuses_cuda_without_it():
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a CUDA device here")
    p = subprocess.run(
        [
            sys.executable,
            str(ROOT / "training" / "sample.py"),
            "--checkpoint",
            str(ROOT / "checkpoints" / "far-mnist"),
            "--device",
            "cuda",
            "--out",
            "x.png",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("Error: --device cuda: torch sees no CUDA device")

"""What the sections of benchmarks/run.py share: settings, paths, interleaved timing, engine directories,
Markdown tables, plot helpers and the machine's description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
MODELS = {  # name -> checkpoint directory
    "FAR (masked, shortcut head)": ROOT / "checkpoints/far-mnist",
    "MAR (masked, diffusion head)": ROOT / "checkpoints/mar-mnist",
    "FAR (causal, shortcut head)": ROOT / "checkpoints/far-mnist-causal",
    "DiT (flow matching, all tokens at once)": ROOT / "checkpoints/dit-mnist",
}
FAR = MODELS["FAR (masked, shortcut head)"]
MAR = MODELS["MAR (masked, diffusion head)"]
DIT = MODELS["DiT (flow matching, all tokens at once)"]
ENGINES = ROOT / "engines/bench"  # engine directories built from the checkpoints, reused while up to date
RESULTS = ROOT / "benchmarks/results"  # the published results (tracked); a run writes elsewhere unless told
OUT = ROOT / "benchmarks/out"  # a run's default output folder (ignored by git)


@dataclass(frozen=True)
class Settings:
    """One run's choices, passed to every section."""

    quick: bool = False  # fewer settings and repetitions, batch 1 only
    threads: int = 1  # intra-op threads of both PyTorch and ONNX Runtime
    out: Path = OUT  # where this run's files go (the engines' quality scores among them)
    mar_b_runtime: bool = False  # mar-b: also MAR-100 through the runtime

    @property
    def reps(self) -> int:
        return 3 if self.quick else 5

    @property
    def batches(self) -> list[int]:
        return [1] if self.quick else [1, 16, 64]


def rel(path: Path) -> str:
    """`path` relative to the repository when it lies inside it (for tables and JSON)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# ----------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def alternate(sides: dict[str, Callable[[], object]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each side, the sides interleaved rep by rep after a warm-up."""
    for fn in sides.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(reps):
        for k, fn in sides.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------
# Engine directories and quality scores
# ----------------------------------------------------------------------------


def open_pipe(directory: Path, threads: int) -> Pipeline:
    """The runtime on ONNX Runtime CPU with `threads` threads that do not spin between calls (PyTorch
    runs in the same process, alternating)."""
    from runtime.pipeline import Pipeline

    return Pipeline.load(directory, backend="ort", threads=threads, spin=False)


def _code_time() -> float:
    """When the code that writes the graphs last changed: an engine directory built before is stale even
    for the same checkpoint."""
    return max(
        p.stat().st_mtime for d in ("far_export", "training", "runtime") for p in (ROOT / d).glob("*.py")
    )


def engine_dir(ckpt: Path, precision: str, batch: int) -> Path:
    """Build (or reuse) an engine directory for a checkpoint, precision and batch."""
    from far_export.build import BuildOptions, build
    from runtime.manifest import load_manifest
    from training.checkpoint import checkpoint_sha256

    out = ENGINES / f"{ckpt.name}-{precision}-b{batch}"
    try:
        m = load_manifest(out)
        if (
            m.checkpoint_sha256 == checkpoint_sha256(ckpt)
            and (out / "manifest.json").stat().st_mtime > _code_time()
        ):
            return out
    except Exception:  # missing or stale: rebuild
        pass
    build(
        ckpt,
        out,
        BuildOptions(precision=precision, batch=batch, end_to_end=False, engines=False),
        log=lambda s: print(f"    [build] {s}", flush=True),
    )
    return out


def quality_of(ckpt: Path) -> dict[str, dict]:
    """Rows of `python training/evaluate.py --checkpoint CKPT --json benchmarks/results/eval-NAME.json`,
    keyed by head steps (empty when that file is missing)."""
    f = RESULTS / f"eval-{ckpt.name}.json"
    if not f.is_file():
        return {}
    rows = json.loads(f.read_text()).get("rows", [])
    return {str(r["head_steps"]): r for r in rows}


# ----------------------------------------------------------------------------
# Tables, plots, machine
# ----------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (also printed)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n\n"
    print("\n" + text, flush=True)
    return text


def percent(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def dash(v: object) -> object:
    return "-" if v is None else v


def pyplot():
    """matplotlib.pyplot without a display, imported on first use (only plots need matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def machine() -> dict[str, str]:
    import onnxruntime
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }

"""`far-export bench`: how fast an engine directory generates, and where the time goes.

Warm-up runs first (sessions, allocators, CUDA graphs), then `runs` timed calls of
`Pipeline.stream` on one batch each. Reported: per-stage time per batch (backbone,
head, VAE decoder, the AR loop's own Python time, the per-batch preparation),
images/s, latency p50/p95 of a batch, and peak memory (host RSS; device memory in
use for TensorRT). numpy + the backend only.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import RequestError
from runtime.files import write_atomic
from runtime.loop import Timings
from runtime.pipeline import Pipeline


@dataclass(frozen=True)
class BenchOptions:
    backend: str = "ort"
    providers: str | None = None
    threads: int | None = None
    cuda_graph: bool = False
    batch: int | None = None  # images per generate call; default: the engine batch
    head_steps: int | None = None
    cfg: float | None = None
    num_iter: int | None = None
    warmup: int = 2
    runs: int = 10
    seed: int = 0

    def check(self) -> BenchOptions:
        if not (0 <= self.warmup <= 10_000 and 1 <= self.runs <= 100_000):
            raise RequestError(
                f"need 0 <= warmup <= 10000 and 1 <= runs <= 100000, got {self.warmup} and {self.runs}"
            )
        return self


@dataclass
class BenchResult:
    engine_dir: str
    backend: str
    model: dict[str, Any]
    settings: dict[str, Any]
    batch: int
    runs: int
    stages_ms: dict[str, float]  # per batch, mean over the timed runs
    stages_median_ms: dict[str, float]  # per batch, median over the timed runs (robust to preemption)
    shares: dict[str, float]  # of the wall time: mean stage / mean wall
    loop_share_median: float  # median over runs of loop / wall: the loop's own Python time
    images_per_s: float
    latency_ms: dict[str, float]  # per batch: p50, p95, mean, min
    calls_per_batch: dict[str, int]
    peak_rss_mb: float
    load_s: float | None = None  # Pipeline.load: manifest, sha256 checks, sessions, bound calls
    device_mem_mb: float | None = None
    device_mem_shared: bool = False  # an integrated GPU (Jetson): "device memory" is the system RAM
    host: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        st, sh = self.stages_ms, self.shares
        lines = [
            f"{self.engine_dir}: {self.model['backbone']} backbone, {self.model['head']} head, "
            f"{self.backend}",
            f"settings: batch {self.batch}, " + ", ".join(f"{k} {v}" for k, v in self.settings.items()),
            *self.padding_warning(),
            f"per batch ({self.runs} runs after warm-up):   mean     median   share of wall",
        ]
        med = self.stages_median_ms
        for k in ("backbone", "head", "update", "vae", "loop", "prepare", "wall"):
            share = f"  {100 * sh[k]:5.1f}%" if k in sh else ""
            lines.append(
                f"  {'loop Python' if k == 'loop' else k:<20} {st[k]:9.3f} ms {med[k]:9.3f} ms{share}"
            )
        lines.append(
            f"loop Python share of wall: {100 * sh['loop']:.2f}% (mean), "
            f"{100 * self.loop_share_median:.2f}% (median run)"
        )
        lat = self.latency_ms
        lines.append(
            f"latency per batch: p50 {lat['p50']:.2f} ms, p95 {lat['p95']:.2f} ms; "
            f"{self.images_per_s:.1f} images/s"
        )
        lines.append(
            f"calls per batch: {self.calls_per_batch['backbone']} backbone, "
            f"{self.calls_per_batch['head']} head, 1 VAE"
        )
        mem = f"peak host RSS {self.peak_rss_mb:.0f} MB"
        if self.load_s is not None:
            mem = f"load {self.load_s:.2f} s; " + mem
        if self.device_mem_mb is not None:
            mem += (
                f", system RAM in use {self.device_mem_mb:.0f} MB (integrated GPU: cudaMemGetInfo counts the "
                "RAM it shares with the CPU, every process included)"
                if self.device_mem_shared
                else f", device memory in use {self.device_mem_mb:.0f} MB"
            )
        lines.append(mem)
        return "\n".join(lines)

    def padding_warning(self) -> list[str]:
        """The engines compute their static batch whatever the request: a smaller batch is padded."""
        engine = self.model.get("engine_batch", self.batch)
        if self.batch >= engine:
            return []
        return [
            f"WARNING: batch {self.batch} on engines built for batch {engine}: every call computes "
            f"{engine} images ({engine - self.batch} padding), so these times are those of batch {engine}; "
            f"to measure batch {self.batch}, build with --batch {self.batch}"
        ]


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def _device_mem_mb(pipe: Pipeline) -> float | None:
    cuda = getattr(pipe.backend, "cuda", None)
    if cuda is None:
        return None
    free, total = cuda.check(cuda.rt.cudaMemGetInfo(), "cudaMemGetInfo")
    return (total - free) / 2**20


def bench(
    engine_dir: str | Path, opts: BenchOptions | None = None, pipe: Pipeline | None = None
) -> BenchResult:
    """Time `Pipeline.stream` on one batch per run; returns per-stage means and latency percentiles."""
    opts = (opts or BenchOptions()).check()
    load_s = None
    if pipe is None:
        t0 = time.perf_counter()
        pipe = Pipeline.load(
            engine_dir,
            backend=opts.backend,
            providers=opts.providers,
            threads=opts.threads,
            cuda_graph=opts.cuda_graph,
        )
        load_s = time.perf_counter() - t0
    batch = pipe.check_batch(opts.batch)
    m = pipe.model
    labels = [i % m.num_classes for i in range(batch)]
    s = pipe.settings(head_steps=opts.head_steps, cfg=opts.cfg, num_iter=opts.num_iter, seed=opts.seed)
    for i in range(opts.warmup):
        list(pipe.stream(labels, replace(s, seed=opts.seed + i), batch))
    timings: list[Timings] = []
    for i in range(opts.runs):
        list(pipe.stream(labels, replace(s, seed=opts.seed + opts.warmup + i), batch))
        timings.append(pipe.timings)
    stages = ("backbone", "head", "update", "vae", "loop", "prepare", "wall")
    per = {k: np.array([getattr(t, k) for t in timings]) * 1e3 for k in stages}
    mean = {k: float(v.mean()) for k, v in per.items()}
    median = {k: float(np.median(v)) for k, v in per.items()}
    wall = per["wall"]
    last = timings[-1]
    return BenchResult(
        engine_dir=str(engine_dir),
        backend=pipe.backend.describe(),
        model={
            "backbone": m.backbone,
            "head": m.head,
            "img_size": m.img_size,
            "seq_len": m.seq_len,
            "precision": pipe.manifest.precision,
            "engine_batch": pipe.B,
            "cfg_guidance": pipe.guided,
        },
        settings={
            "head_steps": s.head_steps,
            "cfg": s.cfg,
            "num_iter": s.num_iter if m.backbone == "masked" else m.seq_len,
        },
        batch=batch,
        runs=opts.runs,
        stages_ms=mean,
        stages_median_ms=median,
        shares={k: mean[k] / mean["wall"] for k in stages if k != "wall"},
        loop_share_median=float(np.median(per["loop"] / per["wall"])),
        images_per_s=float(batch / (wall.mean() / 1e3)),
        latency_ms={
            "p50": float(np.percentile(wall, 50)),
            "p95": float(np.percentile(wall, 95)),
            "mean": float(wall.mean()),
            "min": float(wall.min()),
        },
        calls_per_batch={"backbone": last.backbone_calls, "head": last.head_calls},
        peak_rss_mb=_peak_rss_mb(),
        load_s=load_s,
        device_mem_mb=_device_mem_mb(pipe),
        device_mem_shared=bool(getattr(getattr(pipe.backend, "device", None), "integrated", False)),
        host={
            "python": platform.python_version(),
            "machine": platform.machine(),
            "processor": platform.processor(),
        },
    )


def write_json(result: BenchResult, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(result.to_dict(), indent=2) + "\n")

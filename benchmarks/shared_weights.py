"""Engine directories with and without the shared backbone weights: disk, peak RSS of a sampling
process, time per image.

    python benchmarks/shared_weights.py --run after ENGINE_DIR --run before OLD_ENGINE_DIR OLD_SOURCE_TREE
        [--reps 3] [--threads 1] [--bench-runs 5]

Each `--run LABEL ENGINE_DIR [SOURCE_TREE]` names an engine directory and the source tree whose
far-export reads it (default: this one; an older checkout reads the directories it built). Per
repetition, the runs take turns (interleaved, so load from other processes falls on all of them): one
`far-export sample` process (its peak RSS from wait4) and one `far-export bench` process (time per
image). Prints medians and the ratios to the first run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def disk_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def _cli(source: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "PYTHONPATH": str(source)}
    return [sys.executable, "-m", "far_export.cli", *args], env


def sample_peak_rss(directory: Path, source: Path, threads: int, out: Path) -> int:
    """Peak RSS (bytes) of one `far-export sample` process over every class."""
    cmd, env = _cli(source, "sample", str(directory), "--threads", str(threads), "--out", str(out))
    p = subprocess.Popen(cmd, env=env, cwd=source, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode() if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"far-export sample {directory} failed: {err.strip().splitlines()[-1:]}")
    return usage.ru_maxrss * 1024  # Linux: KiB


def seconds_per_image(directory: Path, source: Path, threads: int, runs: int, out: Path) -> float:
    cmd, env = _cli(
        source, "bench", str(directory), "--threads", str(threads), "--runs", str(runs), "--json", str(out)
    )
    subprocess.run(cmd, env=env, cwd=source, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    return 1.0 / r["images_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", nargs="+", action="append", required=True, metavar="LABEL DIR [SRC]")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bench-runs", type=int, default=5)
    a = ap.parse_args()
    runs = []
    for r in a.run:
        if len(r) not in (2, 3):
            ap.error("--run takes LABEL ENGINE_DIR [SOURCE_TREE]")
        runs.append((r[0], Path(r[1]), Path(r[2]).resolve() if len(r) == 3 else REPO))
    rss: dict[str, list[int]] = {r[0]: [] for r in runs}
    spi: dict[str, list[float]] = {r[0]: [] for r in runs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(a.reps):
            for label, d, src in runs:
                rss[label].append(sample_peak_rss(d, src, a.threads, Path(tmp) / "grid.png"))
                spi[label].append(seconds_per_image(d, src, a.threads, a.bench_runs, Path(tmp) / "b.json"))
    first = runs[0][0]
    base_disk, base_rss = disk_bytes(runs[0][1]), statistics.median(rss[first])
    base_t = statistics.median(spi[first])
    print(f"{'run':<10} {'disk MB':>9} {'x':>6} {'peak RSS MB':>12} {'x':>6} {'ms/image':>9} {'x':>6}")
    for label, d, _ in runs:
        disk, m, t = disk_bytes(d), statistics.median(rss[label]), statistics.median(spi[label])
        print(
            f"{label:<10} {disk / 1e6:>9.1f} {disk / base_disk:>6.2f} {m / 1e6:>12.1f} {m / base_rss:>6.2f} "
            f"{t * 1e3:>9.2f} {t / base_t:>6.2f}"
        )
    print(f"medians of {a.reps} interleaved repetitions, {a.threads} thread(s)")


if __name__ == "__main__":
    main()

"""Peak resident memory of a `far-export sample` process (40 images, ONNX Runtime CPU)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import FAR, Settings, engine_dir, table

TITLE = "6. memory"
KEY = "memory"

_PEAK_RSS = """
import atexit, sys
out = sys.argv[1]
def _report():
    with open("/proc/self/status") as f:
        hwm = next(line.split()[1] for line in f if line.startswith("VmHWM"))
    with open(out, "w") as f:
        f.write(hwm)
atexit.register(_report)
sys.argv = ["far-export", *sys.argv[2:]]
from far_export.cli import main
main()
"""


def run(s: Settings) -> tuple[str, dict]:
    """`far-export sample` in its own process on the batch-8 engines (batch 1 with --quick, the engines the
    other sections built); the peak is the kernel's VmHWM at exit (the rusage of a child forked from this
    large process would count the parent's pages)."""
    batch = 1 if s.quick else 8
    d = engine_dir(FAR, "fp32", batch)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["sample", str(d), "--classes", "0-9", "--per-class", "4", "--out", f"{tmp}/grid.png"]
        subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, f"{tmp}/hwm", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak_mb = int(Path(f"{tmp}/hwm").read_text()) / 1024
    res = {
        "command": "far-export sample ENGINE --classes 0-9 --per-class 4",
        "engine_batch": batch,
        "peak_rss_mb": peak_mb,
    }
    return table(
        f"Peak memory of a `far-export sample` process (40 images, batch-{batch} engines, ONNX Runtime CPU)",
        ["command", "peak RSS (MB)"],
        [[f"`{res['command']}`", peak_mb]],
    ), res

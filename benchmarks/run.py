"""Benchmarks anyone can rerun: FAR vs MAR, runtime vs PyTorch, KV cache, precision, roofline, memory.

    python benchmarks/run.py [--quick] [--out DIR] [--sections ...] [--threads 1]
    python benchmarks/run.py --sections mar-b [--mar-b-runtime] --markdown benchmarks/results/MAR-B.md

Writes results.json, RESULTS.md and the plots into --out (default benchmarks/out/, ignored by git);
--json, --markdown and --plots put one of them elsewhere. The published results in benchmarks/results/
change only when a command names that folder. The mar-b section (MAR-B dims, random weights) is
opt-in: it runs only when --sections names it.

A script, not a test. Each comparison runs its sides in the same process, alternating, after a
warm-up, and reports medians and ratios. Engines are built from the shipped checkpoints into
engines/bench/ (reused when up to date). One file per section: benchmarks/far_vs_mar.py, kv_cache.py,
precision.py, roofline.py, memory.py, mar_b.py; what they share is in benchmarks/common.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import far_vs_mar, kv_cache, mar_b, memory, precision, roofline  # noqa: E402
from benchmarks.common import MODELS, OUT, Settings, machine, rel  # noqa: E402

SECTIONS = {  # --sections name -> module (TITLE, KEY, run(Settings), optionally plots), in run order
    "far-vs-mar": far_vs_mar,
    "kv-cache": kv_cache,
    "precision": precision,
    "roofline": roofline,
    "memory": memory,
    "mar-b": mar_b,
}
OPT_IN = ("mar-b",)  # minutes at MAR-B dims on one thread: run only when named in --sections
DEFAULT_SECTIONS = ",".join(x for x in SECTIONS if x not in OPT_IN)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer settings and repetitions, batch 1 only")
    ap.add_argument(
        "--out",
        type=Path,
        default=OUT,
        help=f"folder for results.json, RESULTS.md, the plots and the engines' scores (default {rel(OUT)})",
    )
    ap.add_argument("--json", type=Path, help="write all results as JSON (default OUT/results.json)")
    ap.add_argument("--plots", type=Path, help="write PNG plots into this folder (default OUT)")
    ap.add_argument("--markdown", type=Path, help="write the tables as Markdown (default OUT/RESULTS.md)")
    ap.add_argument(
        "--sections",
        default=DEFAULT_SECTIONS,
        help=f"comma list of sections to run (default: {DEFAULT_SECTIONS}; opt-in: {','.join(OPT_IN)})",
    )
    ap.add_argument(
        "--mar-b-runtime",
        action="store_true",
        help="mar-b: also MAR-100 through the runtime (builds a second far-b engine directory)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads for PyTorch and ONNX Runtime alike (default 1: stable on a shared machine)",
    )
    args = ap.parse_args(argv)
    args.chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(args.chosen) - set(SECTIONS))
    if unknown:
        ap.exit(2, f"Error: unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}\n")
    if args.threads < 1:
        ap.exit(2, f"Error: --threads must be at least 1, got {args.threads}\n")
    return args


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces the measurements (output paths aside)."""
    return (
        f"python benchmarks/run.py{' --quick' if args.quick else ''} --threads {args.threads}"
        + (f" --sections {args.sections}" if args.sections != DEFAULT_SECTIONS else "")
        + (" --mar-b-runtime" if args.mar_b_runtime else "")
    )


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    s = Settings(quick=args.quick, threads=args.threads, out=args.out, mar_b_runtime=args.mar_b_runtime)
    torch.set_num_threads(s.threads)
    missing = [str(p) for p in MODELS.values() if not p.is_dir()]
    if missing:
        print(f"note: missing checkpoints are skipped: {', '.join(missing)}")
    info = machine()
    md = [
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}; {s.threads} intra-op thread(s) for both PyTorch and "
        f"ONNX Runtime. Command: `{command(args)}`.\n"
    ]
    results: dict[str, object] = {"machine": info, "quick": s.quick}
    t0 = time.perf_counter()
    for name, section in SECTIONS.items():
        if name in args.chosen:
            print(f"== {section.TITLE}", flush=True)
            text, results[section.KEY] = section.run(s)
            md.append(text)
    results["seconds"] = time.perf_counter() - t0
    write_outputs(args, results, md)
    print(f"done in {results['seconds']:.0f}s")


def write_outputs(args: argparse.Namespace, results: dict[str, object], md: list[str]) -> None:
    json_path = args.json or args.out / "results.json"
    markdown = args.markdown or args.out / "RESULTS.md"
    for path, text in (
        (json_path, json.dumps(results, indent=2, default=float) + "\n"),
        (markdown, "\n".join(md)),
    ):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path}")
    if args.plots is None and importlib.util.find_spec("matplotlib") is None:
        print('note: no plots without matplotlib (pip install -e ".[plots]")')
        return
    for section in SECTIONS.values():
        if section.KEY in results and hasattr(section, "plots"):
            for p in section.plots(results[section.KEY], args.plots or args.out):
                print(f"wrote {p}")


if __name__ == "__main__":
    main()

"""Precision: FAR's fp32 / fp16 / int8 engines side by side per batch (interleaved, medians): ms per image,
speed-up over fp32, pixel difference from the fp32 engine's images, and the quality of each engine's own
samples (`training/evaluate.py` on the batch-64 engines)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.common import (
    FAR,
    RESULTS,
    ROOT,
    Settings,
    alternate,
    dash,
    engine_dir,
    open_pipe,
    percent,
    pyplot,
    rel,
    save,
    table,
)

TITLE = "4. precision"
KEY = "precision"
PRECISIONS = ("fp32", "fp16", "int8")
QUALITY_BATCH, QUALITY_PER_CLASS, QUALITY_K = 64, 100, 4  # the engines the quality columns score


def engine_quality(s: Settings, precision: str) -> dict:
    """The row of `training/evaluate.py` on the batch-64 `precision` engine directory (its own samples: 1,000
    images, K = 4), kept as eval-NAME-PRECISION-engine.json in the run's output folder (or, until a run
    writes one there, read from the published benchmarks/results/). A full run evaluates when that file is
    missing or older than the engine directory, so the columns score the engines this run times; --quick
    reads it as it is (empty row when it is missing)."""
    name = f"eval-{FAR.name}-{precision}-engine.json"
    f = next((d / name for d in (s.out, RESULTS) if (d / name).is_file()), s.out / name)
    if not s.quick:
        engine = engine_dir(FAR, precision, QUALITY_BATCH)
        if not f.is_file() or f.stat().st_mtime < (engine / "manifest.json").stat().st_mtime:
            f = s.out / name
            _evaluate(s, engine, f)
    rows = json.loads(f.read_text()).get("rows", []) if f.is_file() else []
    return rows[0] if rows else {}


def _evaluate(s: Settings, engine: Path, f: Path) -> None:
    from dataclasses import asdict, replace

    from runtime.files import write_atomic
    from training.evaluate import evaluate

    print(f"    evaluating the samples of {engine.name}", flush=True)
    report = evaluate(
        FAR,
        head_steps=[QUALITY_K],
        per_class=QUALITY_PER_CLASS,
        engine=engine,
        threads=s.threads,
        fid=False,
        progress=False,
        cache_dir=ROOT / "runs/cache",
    )
    report = replace(report, checkpoint=rel(FAR), engine=rel(engine))
    f.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(f, json.dumps(asdict(report), indent=2) + "\n")


def run(s: Settings) -> tuple[str, list[dict]]:
    results, rows = [], []
    for batch in s.batches:
        pipes = {p: open_pipe(engine_dir(FAR, p, batch), s.threads) for p in PRECISIONS}
        classes = [i % pipes["fp32"].model.num_classes for i in range(batch)]
        imgs = {p: pipe.generate(classes, seed=0).astype(np.int16) for p, pipe in pipes.items()}
        t = alternate(
            {
                p: (lambda pipe=pipe, classes=classes: pipe.generate(classes, seed=0))
                for p, pipe in pipes.items()
            },
            s.reps,
        )
        for p in PRECISIONS:
            diff = np.abs(imgs[p] - imgs["fp32"])
            q = engine_quality(s, p)
            r = {
                "batch": batch,
                "precision": p,
                "ms_per_image": t[p] / batch * 1e3,
                "speedup_vs_fp32": t["fp32"] / t[p],
                "max_pixel_diff": int(diff.max()),
                "mean_pixel_diff": float(diff.mean()),
                "accuracy": q.get("accuracy"),
                "frechet": q.get("frechet"),
            }
            results.append(r)
            rows.append(
                [
                    batch,
                    p,
                    r["ms_per_image"],
                    r["speedup_vs_fp32"],
                    r["max_pixel_diff"],
                    r["mean_pixel_diff"],
                    percent(r["accuracy"]),
                    dash(r["frechet"]),
                ]
            )
        for pipe in pipes.values():
            pipe.close()
    text = table(
        f"Precision: fp32 / fp16 / int8 engines, FAR K=default, ONNX Runtime CPU, {s.threads} thread(s)",
        [
            "batch",
            "graphs",
            "ms / image",
            "speed-up vs fp32",
            "max |pixel diff| vs fp32 (0-255)",
            "mean |pixel diff|",
            "class acc. (engine)",
            "Frechet (engine)",
        ],
        rows,
    )
    text += (
        "\nONNX Runtime's CPU provider has no fp16 kernels for most ops and casts to fp32, so fp16 here "
        "measures precision loss, not speed; fp16 speed needs a GPU (TensorRT or the CUDA provider). "
        "int8 runs ONNX Runtime's u8 x s8 kernels (QLinearMatMul, QGemm, QLinearConv) on the weight "
        "products. Quality columns: `training/evaluate.py` on the batch-64 engines' own samples (1,000 "
        "images, K = 4, seed 0), run by this command when an engine changed (kept in "
        f"{rel(s.out)}/eval-{FAR.name}-PRECISION-engine.json"
        + ("" if s.out == RESULTS else f"; where this run wrote none, those in {rel(RESULTS)}/ are read")
        + ").\n"
    )
    return text, results


def plots(rows: list[dict], out: Path) -> list[Path]:
    """Time per image against Frechet distance of the fp32 / fp16 / int8 engines, one point per batch
    (the quality of an engine's samples does not depend on the batch it was built for)."""
    rows = [r for r in rows if r.get("frechet") is not None]
    if not rows:
        return []
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for precision, marker in (("fp32", "o"), ("fp16", "s"), ("int8", "^")):
        pts = sorted((r for r in rows if r["precision"] == precision), key=lambda r: r["batch"])
        if not pts:
            continue
        ax.scatter(
            [r["ms_per_image"] for r in pts], [r["frechet"] for r in pts], marker=marker, label=precision
        )
        for r in pts:
            ax.annotate(
                f"b{r['batch']}", (r["ms_per_image"], r["frechet"]), textcoords="offset points", xytext=(3, 3)
            )
    ax.set(
        xlabel="ms per image (ONNX Runtime CPU; fp16 runs cast to fp32 there)",
        ylabel="Frechet distance of the engine's samples",
        title="FAR engines: time vs quality by precision",
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    return [save(fig, out / "precision_time_vs_quality.png")]

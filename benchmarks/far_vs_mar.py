"""FAR vs MAR vs DiT, runtime vs PyTorch: ms per image of each family at several head (or Euler) steps and
batches, every side timed in one interleaved round per repetition; quality columns from
benchmarks/results/eval-NAME.json (`training/evaluate.py --json`)."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

from benchmarks.common import (
    DIT,
    FAR,
    MAR,
    Settings,
    alternate,
    dash,
    engine_dir,
    open_pipe,
    percent,
    pyplot,
    quality_of,
    save,
    table,
)

TITLE = "1+2. FAR vs MAR vs DiT, runtime vs PyTorch"
KEY = "far_vs_mar"
DIT_STEPS = (4, 8, 16, 32, 64)  # the DiT's N Euler steps in the speed tables (evaluate.py measures up to 250)


def plans(quick: bool) -> list[tuple[Path, str, int]]:
    """(checkpoint, family, head or Euler steps) of every timed side."""
    far_k, mar_n, dit_n = ((1, 4), (100,), (8, 32)) if quick else ((1, 2, 4, 8), (25, 50, 100), DIT_STEPS)
    return [
        *((FAR, "FAR", k) for k in far_k),
        *((MAR, "MAR", n) for n in mar_n),
        *((DIT, "DiT", n) for n in dit_n),
    ]


def run(s: Settings) -> tuple[str, list[dict]]:
    from training.checkpoint import load_checkpoint

    todo = plans(s.quick)
    refs = {ckpt: load_checkpoint(ckpt) for ckpt, _, _ in todo if ckpt.is_dir()}
    for ckpt in {c for c, _, _ in todo} - set(refs):
        print(f"  skip {ckpt.name}: {ckpt} missing")
    todo = [p for p in todo if p[0] in refs]
    results = [row for batch in s.batches for row in _measure(s, todo, refs, batch)]
    return "".join(_table(results, batch) for batch in s.batches), results


def _measure(s: Settings, todo: list[tuple[Path, str, int]], refs: dict, batch: int) -> list[dict]:
    """Every side of every plan timed in one interleaved round per rep, so a change of load on this shared
    machine touches all models alike."""
    from training.sample import generate, resolve_settings

    sides: dict[tuple[str, int, str], Callable[[], object]] = {}
    loop_share: dict[tuple[str, int], list[float]] = {}
    pipes = []
    for ckpt, label, k in todo:
        ref = refs[ckpt]
        classes = [i % ref.cfg.num_classes for i in range(batch)]
        settings = resolve_settings(ref.cfg, seed=0, head_steps=k)
        if label != "DiT":  # DiTs are not exported: PyTorch reference only
            pipe = open_pipe(engine_dir(ckpt, "fp32", batch), s.threads)
            pipes.append(pipe)
            share = loop_share.setdefault((label, k), [])

            def run_rt(pipe=pipe, classes=classes, k=k, share=share):
                pipe.generate(classes, head_steps=k, seed=0)
                share.append(pipe.timings.loop / pipe.timings.wall)

            sides[(label, k, "runtime")] = run_rt

        def run_ref(ref=ref, classes=classes, settings=settings):
            generate(ref.model, ref.vae, classes, settings)

        sides[(label, k, "pytorch")] = run_ref
    t = alternate(sides, s.reps)
    for pipe in pipes:
        pipe.close()
    results = []
    for ckpt, label, k in todo:
        q = quality_of(ckpt).get(str(k), {})
        rt = t[(label, k, "runtime")] / batch if (label, k, "runtime") in t else None
        pt = t[(label, k, "pytorch")] / batch
        share = loop_share.get((label, k))
        results.append(
            {
                "model": label,
                "head_steps": k,
                "batch": batch,
                "runtime_s_per_image": rt,
                "pytorch_s_per_image": pt,
                "loop_python_share": statistics.median(share) if share else None,
                "accuracy": q.get("accuracy"),
                "frechet": q.get("frechet"),
            }
        )
        print(
            f"  {label} K={k} batch {batch}: runtime "
            + (f"{rt * 1e3:.2f} ms/img" if rt else "-")
            + f", pytorch {pt * 1e3:.2f} ms/img",
            flush=True,
        )
    return results


def _table(results: list[dict], batch: int) -> str:
    rows = [r for r in results if r["batch"] == batch]
    base = {
        side: next(
            (r[f"{side}_s_per_image"] for r in rows if r["model"] == "MAR" and r["head_steps"] == 100),
            None,
        )
        for side in ("runtime", "pytorch")
    }
    out = []
    for r in rows:
        rt, pt = r["runtime_s_per_image"], r["pytorch_s_per_image"]
        out.append(
            [
                r["model"],
                r["head_steps"],
                rt * 1e3 if rt else "-",
                pt * 1e3,
                pt / rt if rt else "-",
                (base["runtime"] / rt) if base["runtime"] and rt else "-",
                (base["pytorch"] / pt) if base["pytorch"] else "-",
                percent(r["loop_python_share"]),
                percent(r["accuracy"]),
                dash(r["frechet"]),
            ]
        )
    return table(
        f"FAR vs MAR vs DiT, batch {batch} (FAR and MAR: same masked backbone and AR steps; DiT: N Euler "
        "steps over all tokens, PyTorch only; ms per image)",
        [
            "model",
            "K / N",
            "runtime (ORT fp32)",
            "PyTorch",
            "runtime speed-up",
            "vs MAR-100 (runtime)",
            "vs MAR-100 (PyTorch)",
            "loop Python share",
            "class acc.",
            "Frechet",
        ],
        out,
    )


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def plots(results: list[dict], out: Path) -> list[Path]:
    return [_time_vs_steps(results, out), *_quality_vs_steps(out), *_quality_vs_time(results, out)]


def _time_vs_steps(results: list[dict], out: Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for batch in sorted({r["batch"] for r in results}):
        for model, marker in (("FAR", "o"), ("MAR", "s")):
            rows = sorted(
                (r for r in results if r["model"] == model and r["batch"] == batch),
                key=lambda r: r["head_steps"],
            )
            if rows:
                ax.plot(
                    [r["head_steps"] for r in rows],
                    [r["runtime_s_per_image"] * 1e3 for r in rows],
                    marker=marker,
                    label=f"{model} head, batch {batch}",
                )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="head steps per token (K for FAR, N for MAR)",
        ylabel="ms per image (runtime, ORT CPU)",
        title="Time per image vs head steps",
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save(fig, out / "time_vs_steps.png")


def _quality_vs_steps(out: Path) -> list[Path]:
    """Class accuracy and Frechet distance of FAR's and MAR's samples against head steps (from
    eval-NAME.json; no plot when neither file exists)."""
    quality = [(m, q) for m, ck in (("FAR", FAR), ("MAR", MAR)) for q in [quality_of(ck)] if q]
    if not quality:
        return []
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for model, q in quality:
        rows = sorted(q.values(), key=lambda r: r["head_steps"])
        steps = [r["head_steps"] for r in rows]
        axes[0].plot(steps, [100 * r["accuracy"] for r in rows], marker="o", label=f"{model} head")
        axes[1].plot(steps, [r["frechet"] for r in rows], marker="o", label=f"{model} head")
    axes[0].set(ylabel="class accuracy of samples (%)", title="Class accuracy vs head steps")
    axes[1].set(
        ylabel="Frechet distance to held-out digits (lower is better)",
        title="Frechet distance vs head steps",
    )
    for ax in axes:
        ax.set(xscale="log", xlabel="head steps per token")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    return [save(fig, out / "quality_vs_steps.png")]


def _quality_vs_time(results: list[dict], out: Path) -> list[Path]:
    """Frechet distance against PyTorch ms per image, one panel per batch, one line per family (FAR's K,
    MAR's and DiT's N beside each point): the trade-off a user deploying one of them chooses on."""
    rows = [r for r in results if r["frechet"] is not None]
    if not rows:
        return []
    batches = sorted({r["batch"] for r in rows})
    plt = pyplot()
    fig, axes = plt.subplots(1, len(batches), figsize=(5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for model, marker in (("FAR", "o"), ("MAR", "s"), ("DiT", "^")):
            pts = sorted(
                (r for r in rows if r["model"] == model and r["batch"] == batch),
                key=lambda r: r["head_steps"],
            )
            if not pts:
                continue
            x = [r["pytorch_s_per_image"] * 1e3 for r in pts]
            ax.plot(x, [r["frechet"] for r in pts], marker=marker, label=model)
            for r, xi in zip(pts, x):
                ax.annotate(
                    str(r["head_steps"]),
                    (xi, r["frechet"]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=7,
                )
        ax.set(
            xscale="log",
            xlabel="ms per image (PyTorch reference, CPU)",
            ylabel="Frechet distance (lower is better)",
            title=f"Quality vs time, batch {batch}",
        )
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    return [save(fig, out / "quality_vs_time.png")]

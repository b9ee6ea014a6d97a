"""Benchmarks anyone can rerun: FAR vs MAR, runtime vs PyTorch, KV cache, precision, roofline, memory.

    python benchmarks/run.py [--quick] [--json results.json] [--plots DIR] [--markdown FILE] [--sections ...]
    python benchmarks/run.py --sections mar-b [--mar-b-runtime] --markdown benchmarks/results/MAR-B.md

The mar-b section (MAR-B dims, random weights) is opt-in: it runs only when --sections names it.

A script, not a test. Each comparison runs its sides in the same process,
alternating, after a warm-up, and reports medians and ratios. Engines are built
from the shipped checkpoints into engines/bench/ (reused when up to date).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.flops import graph_flops  # noqa: E402
from runtime.manifest import is_variant, load_manifest  # noqa: E402
from runtime.pipeline import Pipeline, steps_per_batch  # noqa: E402

MODELS = {  # name -> checkpoint directory
    "FAR (masked, shortcut head)": ROOT / "checkpoints/far-mnist",
    "MAR (masked, diffusion head)": ROOT / "checkpoints/mar-mnist",
    "FAR (causal, shortcut head)": ROOT / "checkpoints/far-mnist-causal",
    "DiT (flow matching, all tokens at once)": ROOT / "checkpoints/dit-mnist",
}
DIT_STEPS = (4, 8, 16, 32, 64)  # the DiT's N Euler steps in the speed tables (evaluate.py measures up to 250)
ENGINES = ROOT / "engines/bench"
THREADS = 1  # intra-op threads of both PyTorch and ONNX Runtime (--threads)
RESULTS = ROOT / "benchmarks/results"
SECTIONS = ("far-vs-mar", "kv-cache", "precision", "roofline", "memory", "mar-b")  # --sections, in run order
OPT_IN = ("mar-b",)  # minutes at MAR-B dims on one thread: run only when named in --sections


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def median_time(fn: Callable[[], object], reps: int) -> float:
    return statistics.median(_timed(fn) for _ in range(reps))


def _timed(fn: Callable[[], object]) -> float:
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
            times[k].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def open_pipe(directory: Path) -> Pipeline:
    """The runtime on ONNX Runtime CPU with THREADS threads that do not spin between calls (PyTorch
    runs in the same process, alternating)."""
    return Pipeline.load(directory, backend="ort", threads=THREADS, spin=False)


def _code_time() -> float:
    """When the code that writes the graphs last changed: an engine directory built before is stale even
    for the same checkpoint."""
    return max(
        p.stat().st_mtime for d in ("far_export", "training", "runtime") for p in (ROOT / d).glob("*.py")
    )


def engine_dir(ckpt: Path, precision: str, batch: int) -> Path:
    """Build (or reuse) an engine directory for a checkpoint, precision and batch."""
    from far_export.build import BuildOptions, build
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


def table(title: str, header: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        return str(v)

    lines = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n\n"
    print("\n" + text, flush=True)
    return text


def quality_of(ckpt: Path) -> dict[str, dict]:
    """Rows of `python training/evaluate.py --checkpoint CKPT --json benchmarks/results/eval-NAME.json`,
    keyed by head steps (empty when that file is missing)."""
    f = RESULTS / f"eval-{ckpt.name}.json"
    if not f.is_file():
        return {}
    rows = json.loads(f.read_text()).get("rows", [])
    return {str(r["head_steps"]): r for r in rows}


# ----------------------------------------------------------------------------
# 1 + 2. FAR vs MAR, runtime vs PyTorch
# ----------------------------------------------------------------------------


def far_vs_mar(quick: bool, batches: list[int], reps: int) -> tuple[str, list[dict]]:
    from training.checkpoint import load_checkpoint
    from training.sample import generate, resolve_settings

    far, mar = MODELS["FAR (masked, shortcut head)"], MODELS["MAR (masked, diffusion head)"]
    dit = MODELS["DiT (flow matching, all tokens at once)"]
    plans = [(far, "FAR", k) for k in (1, 2, 4, 8)] + [
        (mar, "MAR", n) for n in ((25, 100) if quick else (25, 50, 100))
    ]
    plans += [(dit, "DiT", n) for n in (DIT_STEPS[1:4] if quick else DIT_STEPS)]
    results, text = [], ""
    refs = {ckpt: load_checkpoint(ckpt) for ckpt, _, _ in plans if ckpt.is_dir()}
    for ckpt in {c for c, _, _ in plans} - set(refs):
        print(f"  skip {ckpt.name}: {ckpt} missing")
    for batch in batches:
        # every side of every plan is timed in one interleaved round per rep, so a change of load on this
        # shared machine touches all models alike
        sides: dict[tuple[str, int, str], Callable[[], object]] = {}
        loop_share: dict[tuple[str, int], list[float]] = {}
        pipes = []
        for ckpt, label, k in plans:
            if ckpt not in refs:
                continue
            ref = refs[ckpt]
            classes = [i % ref.cfg.num_classes for i in range(batch)]
            s = resolve_settings(ref.cfg, seed=0, head_steps=k)
            if label != "DiT":  # no DiT export yet: PyTorch reference only
                pipe = open_pipe(engine_dir(ckpt, "fp32", batch))
                pipes.append(pipe)
                share = loop_share.setdefault((label, k), [])

                def run_rt(pipe=pipe, classes=classes, k=k, share=share):
                    pipe.generate(classes, head_steps=k, seed=0)
                    share.append(pipe.timings.loop / pipe.timings.wall)

                sides[(label, k, "runtime")] = run_rt

            def run_ref(ref=ref, classes=classes, s=s):
                generate(ref.model, ref.vae, classes, s)

            sides[(label, k, "pytorch")] = run_ref
        t = alternate(sides, reps)
        for ckpt, label, k in plans:
            if ckpt not in refs:
                continue
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
        for pipe in pipes:
            pipe.close()
    for batch in batches:
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
            rt = r["runtime_s_per_image"]
            out.append(
                [
                    r["model"],
                    r["head_steps"],
                    rt * 1e3 if rt else "-",
                    r["pytorch_s_per_image"] * 1e3,
                    r["pytorch_s_per_image"] / rt if rt else "-",
                    (base["runtime"] / rt) if base["runtime"] and rt else "-",
                    (base["pytorch"] / r["pytorch_s_per_image"]) if base["pytorch"] else "-",
                    "-" if r["loop_python_share"] is None else f"{100 * r['loop_python_share']:.1f}%",
                    "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
                    "-" if r["frechet"] is None else r["frechet"],
                ]
            )
        text += table(
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
    return text, results


# ----------------------------------------------------------------------------
# 3. KV cache
# ----------------------------------------------------------------------------


@torch.no_grad()
def _kv_cache_at(dims: str, L: int, quick: bool, reps: int) -> dict:
    from training.backbones import CausalBackbone
    from training.config import preset

    base = preset(dims)
    cfg = preset(
        dims, backbone="causal", img_size=int(L**0.5) * base.vae.stride * base.patch_size, num_iter=1
    )
    bb = CausalBackbone(cfg).eval()
    B, C = 1, cfg.token_dim
    tokens, prev = torch.randn(B, L, C), torch.randn(B, C)
    cls = bb.class_vector(torch.zeros(B, dtype=torch.long))
    cache = torch.zeros(bb.cache_shape(B))

    def cached(pos: int) -> None:
        bb.forward_step(prev, torch.tensor(pos), cls, cache, inplace=True)

    def recompute(pos: int) -> None:  # the prefix up to and including pos, no cache
        x = torch.cat([cls[:, None], bb.z_proj(tokens[:, :pos])], dim=1)
        x = bb.z_proj_ln(x + bb.pos_embed_learned[:, : pos + 1])
        for blk in bb.blocks:
            x = blk(x, bb.causal_bias[: pos + 1, : pos + 1])
        bb.norm(x[:, -1])

    # per-token cost, averaged over positions spread across the sequence
    t: dict[str, list[float]] = {"cached": [], "recompute": []}
    for p in np.linspace(0, L - 1, 4 if quick else 8).round().astype(int):
        m = alternate(
            {"cached": lambda p=p: cached(int(p)), "recompute": lambda p=p: recompute(int(p))}, reps
        )
        for k in t:
            t[k].append(m[k])
    c, r = float(np.mean(t["cached"])), float(np.mean(t["recompute"]))
    return {
        "dims": f"{dims} ({cfg.depth} blocks x {cfg.width})",
        "tokens": L,
        "cached_ms": c * 1e3,
        "recompute_ms": r * 1e3,
        "ratio": r / c,
    }


def kv_cache(quick: bool, reps: int) -> tuple[str, list[dict]]:
    """Per-token time of the causal backbone: one cached step vs recomputing the whole prefix."""
    results = [_kv_cache_at("mnist" if quick else "far-b", L, quick, reps) for L in (64, 256)]
    rows = [[r["dims"], r["tokens"], r["cached_ms"], r["recompute_ms"], r["ratio"]] for r in results]
    return table(
        "KV cache: causal backbone, ms per generated token, batch 1 (PyTorch, CPU)",
        ["backbone dims", "tokens", "cached step", "recompute prefix", "ratio"],
        rows,
    ), results


# ----------------------------------------------------------------------------
# 4. Precision
# ----------------------------------------------------------------------------


PRECISIONS = ("fp32", "fp16", "int8")


QUALITY_BATCH, QUALITY_PER_CLASS, QUALITY_K = 64, 100, 4  # the engines the quality columns score


def engine_quality(ckpt: Path, precision: str, score: bool) -> dict:
    """The row of `training/evaluate.py` on the batch-64 `precision` engine directory (its own samples: 1,000
    images, K = 4), kept in benchmarks/results/eval-NAME-PRECISION-engine.json. With `score` the evaluation
    runs when that file is missing or older than the engine directory, so the columns score the engines this
    run times; without it (--quick) the file is read as it is (empty row when it is missing)."""
    from dataclasses import asdict, replace

    from runtime.files import write_atomic
    from training.evaluate import evaluate

    f = RESULTS / f"eval-{ckpt.name}-{precision}-engine.json"
    if score:
        engine = engine_dir(ckpt, precision, QUALITY_BATCH)
        if not f.is_file() or f.stat().st_mtime < (engine / "manifest.json").stat().st_mtime:
            print(f"    evaluating the samples of {engine.name}", flush=True)
            report = evaluate(
                ckpt,
                head_steps=[QUALITY_K],
                per_class=QUALITY_PER_CLASS,
                engine=engine,
                threads=THREADS,
                fid=False,
                progress=False,
                cache_dir=ROOT / "runs/cache",
            )
            report = replace(report, checkpoint=_rel(ckpt), engine=_rel(engine))
            write_atomic(f, json.dumps(asdict(report), indent=2) + "\n")
    rows = json.loads(f.read_text()).get("rows", []) if f.is_file() else []
    return rows[0] if rows else {}


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def precision(batches: list[int], reps: int, score: bool) -> tuple[str, list[dict]]:
    """fp32 / fp16 / int8 engines of FAR side by side per batch (interleaved, medians): ms per image,
    speed-up over fp32, pixel difference from the fp32 engine's images, and quality of the engines'
    samples."""
    ckpt = MODELS["FAR (masked, shortcut head)"]
    results, rows = [], []
    for batch in batches:
        pipes = {p: open_pipe(engine_dir(ckpt, p, batch)) for p in PRECISIONS}
        classes = [i % pipes["fp32"].model.num_classes for i in range(batch)]
        imgs = {p: pipe.generate(classes, seed=0).astype(np.int16) for p, pipe in pipes.items()}
        t = alternate(
            {
                p: (lambda pipe=pipe, classes=classes: pipe.generate(classes, seed=0))
                for p, pipe in pipes.items()
            },
            reps,
        )
        for p in PRECISIONS:
            diff = np.abs(imgs[p] - imgs["fp32"])
            q = engine_quality(ckpt, p, score)
            results.append(
                {
                    "batch": batch,
                    "precision": p,
                    "ms_per_image": t[p] / batch * 1e3,
                    "speedup_vs_fp32": t["fp32"] / t[p],
                    "max_pixel_diff": int(diff.max()),
                    "mean_pixel_diff": float(diff.mean()),
                    "accuracy": q.get("accuracy"),
                    "frechet": q.get("frechet"),
                }
            )
            r = results[-1]
            rows.append(
                [
                    batch,
                    p,
                    r["ms_per_image"],
                    r["speedup_vs_fp32"],
                    r["max_pixel_diff"],
                    r["mean_pixel_diff"],
                    "-" if r["accuracy"] is None else f"{100 * r['accuracy']:.1f}%",
                    "-" if r["frechet"] is None else r["frechet"],
                ]
            )
        for pipe in pipes.values():
            pipe.close()
    text = table(
        f"Precision: fp32 / fp16 / int8 engines, FAR K=default, ONNX Runtime CPU, {THREADS} thread(s)",
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
        "benchmarks/results/eval-far-mnist-PRECISION-engine.json).\n"
    )
    return text, results


# ----------------------------------------------------------------------------
# 5. Against the limit
# ----------------------------------------------------------------------------


def matmul_peak(reps: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate (FLOP/s) on THREADS threads: the best of PyTorch's
    (MKL/oneDNN) and ONNX Runtime's (MLAS) square matmuls of a few sizes."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "matmul",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {"a": a.numpy(), "b": b.numpy()}
        for fn in (lambda a=a, b=b: a @ b, lambda sess=sess, feeds=feeds: sess.run(None, feeds)):
            for _ in range(3):
                fn()
            best = max(best, 2 * n**3 / min(_timed(fn) for _ in range(reps)))
    return best


def roofline(batches: list[int], reps: int) -> tuple[str, list[dict]]:
    ckpt = MODELS["FAR (masked, shortcut head)"]
    peak = matmul_peak()
    rows, results = [], []
    for batch in batches:
        d = engine_dir(ckpt, "fp32", batch)
        m = load_manifest(d)
        f = {g: graph_flops(d / spec.file) for g, spec in m.graphs.items()}
        k = m.model.head_steps
        calls = steps_per_batch(m, m.model.num_iter, k)  # the full backbone or an encoder variant per step
        backbone = sum(f[g] * n for g, n in calls.items() if g == "backbone" or is_variant(g))
        per_image = (backbone + f["head"] * calls["head"] + f["vae_decoder"]) / batch
        pipe = open_pipe(d)
        classes = [i % m.model.num_classes for i in range(batch)]
        t = (
            alternate({"run": lambda pipe=pipe, classes=classes: pipe.generate(classes, seed=0)}, reps)["run"]
            / batch
        )
        pipe.close()
        frac = per_image / t / peak
        results.append(
            {
                "batch": batch,
                "flops_per_image": per_image,
                "s_per_image": t,
                "peak_flops": peak,
                "fraction_of_peak": frac,
                "graph_flops": f,
            }
        )
        rows.append(
            [
                batch,
                per_image / 1e6,
                backbone / batch / 1e6,
                f["head"] * calls["head"] / batch / 1e6,
                f["vae_decoder"] / batch / 1e6,
                t * 1e3,
                per_image / t / 1e9,
                f"{100 * frac:.1f}%",
            ]
        )
    text = table(
        f"Against the limit: FAR (K={k}), ONNX Runtime fp32; measured matmul peak {peak / 1e9:.0f} GFLOP/s "
        f"on {THREADS} thread(s)",
        ["batch", "MFLOP / image", "backbone", "head", "VAE", "ms / image", "GFLOP/s achieved", "of peak"],
        rows,
    )
    return text, results


# ----------------------------------------------------------------------------
# 6. Peak memory of `far-export sample`
# ----------------------------------------------------------------------------


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


def sample_memory() -> tuple[str, dict]:
    """Peak resident memory of `far-export sample` in its own process (the kernel's VmHWM at exit; the
    rusage of a child forked from this large process would count the parent's pages)."""
    d = engine_dir(MODELS["FAR (masked, shortcut head)"], "fp32", 8)
    with tempfile.TemporaryDirectory() as tmp:
        args = ["sample", str(d), "--classes", "0-9", "--per-class", "4", "--out", f"{tmp}/grid.png"]
        subprocess.run(
            [sys.executable, "-c", _PEAK_RSS, f"{tmp}/hwm", *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        peak_mb = int(Path(f"{tmp}/hwm").read_text()) / 1024
    res = {"command": "far-export sample ENGINE --classes 0-9 --per-class 4", "peak_rss_mb": peak_mb}
    return table(
        "Peak memory of a `far-export sample` process (40 images, batch-8 engines, ONNX Runtime CPU)",
        ["command", "peak RSS (MB)"],
        [[f"`{res['command']}`", peak_mb]],
    ), res


# ----------------------------------------------------------------------------
# 7. MAR-B dims: FAR K=4 through the runtime vs MAR's gather encoder with its 100-step head
# ----------------------------------------------------------------------------

MARB_STEPS = 16  # masked AR steps (as the official-code comparison in issue 12)
MARB_CFG = 2.9  # MAR-B's guidance scale, linear schedule (any value != 1 doubles the batch)


def marb_checkpoint(head: str) -> Path:
    """A random-weight far-b checkpoint (MAR-B dims, KL-16 VAE; timing needs no training) with `head`
    ("shortcut" or "mar"), written under engines/bench/ and reused while its config is the same."""
    from benchmarks.export_far_b import random_far
    from training.checkpoint import save_checkpoint
    from training.config import load_checkpoint_config, preset

    cfg = preset("far-b", head=head, num_iter=MARB_STEPS, cfg=MARB_CFG)
    out = ENGINES / f"far-b-{head}-random"
    try:
        if load_checkpoint_config(out) == cfg:
            return out
    except Exception:  # missing or another config: write it
        pass
    print(f"    writing random-weight checkpoint {out}", flush=True)
    save_checkpoint(out, *random_far(cfg))
    return out


def mar_b(reps: int, runtime_mar: bool) -> tuple[str, dict]:
    """One image (batch 1, CFG on, fp32, MARB_STEPS AR steps) at MAR-B dims: A FAR K=4 through the runtime
    (ORT, encoder variants), B MAR-100 in PyTorch with MAR's gather encoder (exactly the known tokens each
    step, no pads) and MAR's DDPM head, C FAR K=4 in PyTorch (the reference sampler, full masked
    encoder), D (`runtime_mar`) MAR-100 through the runtime. Interleaved, one round per rep."""
    from runtime.images import to_uint8
    from training.checkpoint import load_checkpoint
    from training.sample import decode_tokens, generate, resolve_settings, sample_tokens

    far_ckpt, mar_ckpt = marb_checkpoint("shortcut"), marb_checkpoint("mar")
    far, mar = load_checkpoint(far_ckpt), load_checkpoint(mar_ckpt)
    s_far, s_mar = resolve_settings(far.cfg, seed=0), resolve_settings(mar.cfg, seed=0)  # K=4 / N=100
    labels = [0]
    pipes = {"A": open_pipe(engine_dir(far_ckpt, "fp32", 1))}
    if runtime_mar:
        pipes["D"] = open_pipe(engine_dir(mar_ckpt, "fp32", 1))
    sides: dict[str, Callable[[], object]] = {
        k: (lambda pipe=pipe: pipe.generate(labels, seed=0)) for k, pipe in pipes.items()
    }
    sides["B"] = lambda: to_uint8(
        decode_tokens(mar.cfg, mar.vae, sample_tokens(mar.model, labels, s_mar, gather_known=True))
    )
    sides["C"] = lambda: generate(far.model, far.vae, labels, s_far)
    t = alternate(sides, reps)
    shares = {k: _stage_shares(pipe) for k, pipe in pipes.items()}
    for pipe in pipes.values():
        pipe.close()
    names = {
        "A": "FAR K=4, runtime (ORT fp32, encoder variants)",
        "B": "MAR-100, PyTorch, gather encoder (known tokens only)",
        "C": "FAR K=4, PyTorch reference (full masked encoder)",
        "D": "MAR-100, runtime (ORT fp32, encoder variants)",
    }
    res = {
        "ar_steps": MARB_STEPS,
        "cfg": MARB_CFG,
        "batch": 1,
        "ms_per_image": {k: t[k] * 1e3 for k in sorted(t)},
        "runtime_stage_shares": shares,
        "ratio_B_over_A": t["B"] / t["A"],
        "ratio_C_over_A": t["C"] / t["A"],
    }
    if "D" in t:
        res["ratio_D_over_A"] = t["D"] / t["A"]
    rows = [
        [k, names[k], t[k] * 1e3, t["B"] / t[k], "-" if k not in shares else shares[k]] for k in sorted(t)
    ]
    text = table(
        f"MAR-B dims (width 768, 12+12 blocks, 256 tokens, buffer 64; head 1024 x 6), random weights: one "
        f"image, batch 1, CFG {MARB_CFG} on, fp32, {MARB_STEPS} AR steps, {THREADS} thread(s)",
        [
            "side",
            "what",
            "ms / image",
            "speed-up vs B (MAR-100 gather)",
            "runtime time in backbone / head / VAE",
        ],
        rows,
    )
    text += (
        f"\nFAR K=4 through the runtime is {res['ratio_B_over_A']:.2f}x faster than MAR's gather-based "
        "backbone with its 100-step head (issue 12's target: at least 3x).\n"
    )
    return text, res


def _stage_shares(pipe: Pipeline) -> str:
    """Backbone / head / VAE shares of the last generate's wall time."""
    tm = pipe.timings
    return " / ".join(f"{100 * getattr(tm, k) / tm.wall:.0f}%" for k in ("backbone", "head", "vae"))


# ----------------------------------------------------------------------------
# Plots
# ----------------------------------------------------------------------------


def plots(results: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
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
    fig.tight_layout()
    written.append(out / "time_vs_steps.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    quality = [
        (m, q)
        for m, ck in (
            ("FAR", MODELS["FAR (masked, shortcut head)"]),
            ("MAR", MODELS["MAR (masked, diffusion head)"]),
        )
        for q in [quality_of(ck)]
        if q
    ]
    if quality:
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
        fig.tight_layout()
        written.append(out / "quality_vs_steps.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    written += quality_vs_time(results, out)
    return written


def quality_vs_time(results: list[dict], out: Path) -> list[Path]:
    """Frechet distance against PyTorch ms per image, one panel per batch, one line per family (FAR's K,
    MAR's and DiT's N beside each point): the trade-off a user deploying one of them chooses on."""
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["frechet"] is not None]
    batches = sorted({r["batch"] for r in rows})
    if not rows:
        return []
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
    fig.tight_layout()
    path = out / "quality_vs_time.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


def precision_plot(rows: list[dict], out: Path) -> list[Path]:
    """Time per image against Frechet distance of the fp32 / fp16 / int8 engines, one point per batch
    (the quality of an engine's samples does not depend on the batch it was built for)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("frechet") is not None]
    if not rows:
        return []
    out.mkdir(parents=True, exist_ok=True)
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
    fig.tight_layout()
    path = out / "precision_time_vs_quality.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return [path]


# ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    import onnxruntime

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer settings and repetitions (a few minutes)")
    ap.add_argument("--json", type=Path, help="write all results as JSON")
    ap.add_argument("--plots", type=Path, help="write PNG plots into this folder")
    ap.add_argument("--markdown", type=Path, help="write the tables as Markdown")
    default_sections = ",".join(x for x in SECTIONS if x not in OPT_IN)
    ap.add_argument(
        "--sections",
        default=default_sections,
        help=f"comma list of sections to run (default: {default_sections}; opt-in: {','.join(OPT_IN)})",
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
    args = ap.parse_args()
    global THREADS
    THREADS = args.threads
    torch.set_num_threads(args.threads)
    missing = [str(p) for p in MODELS.values() if not p.is_dir()]
    if missing:
        print(f"note: missing checkpoints are skipped: {', '.join(missing)}")
    reps = 3 if args.quick else 5
    batches = [1, 16] if args.quick else [1, 16, 64]
    info = machine()
    md = [
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, torch {info['torch']}, "
        f"onnxruntime {info['onnxruntime']}; {args.threads} intra-op thread(s) for both PyTorch and "
        "ONNX Runtime. "
        f"Command: `python benchmarks/run.py{' --quick' if args.quick else ''} --threads {args.threads}"
        + (f" --sections {args.sections}" if args.sections != default_sections else "")
        + (" --mar-b-runtime" if args.mar_b_runtime else "")
        + "`.\n"
    ]
    results: dict[str, object] = {"machine": info, "quick": args.quick}
    t0 = time.perf_counter()
    sections = {
        "far-vs-mar": (
            "1+2. FAR vs MAR vs DiT, runtime vs PyTorch",
            "far_vs_mar",
            lambda: far_vs_mar(args.quick, batches, reps),
        ),
        "kv-cache": ("3. KV cache", "kv_cache", lambda: kv_cache(args.quick, reps)),
        "precision": ("4. precision", "precision", lambda: precision(batches, reps, not args.quick)),
        "roofline": (
            "5. against the limit",
            "roofline",
            lambda: roofline([1, 64] if not args.quick else [1, 16], reps),
        ),
        "memory": ("6. memory", "memory", sample_memory),
        "mar-b": (
            "7. MAR-B dims: FAR K=4 (runtime) vs MAR-100 with the gather encoder",
            "mar_b",
            lambda: mar_b(2, args.mar_b_runtime),
        ),
    }
    chosen = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        sys.exit(f"Error: unknown section(s) {', '.join(unknown)}: choose from {', '.join(SECTIONS)}")
    for name in SECTIONS:
        if name in chosen:
            title, key, fn = sections[name]
            print(f"== {title}", flush=True)
            text, results[key] = fn()
            md.append(text)
    results["seconds"] = time.perf_counter() - t0
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=float) + "\n")
    if args.plots and "far_vs_mar" in results:
        for p in plots(results["far_vs_mar"], args.plots):
            print(f"wrote {p}")
    if args.plots and "precision" in results:
        for p in precision_plot(results["precision"], args.plots):
            print(f"wrote {p}")
    if args.markdown:
        args.markdown.write_text("\n".join(md))
    print(f"done in {results['seconds']:.0f}s")


if __name__ == "__main__":
    main()

"""The masked backbone step: full graph vs the encoder variants (known tokens only), per AR step.

    python benchmarks/encoder_variants.py [--preset far-b] [--batch 1] [--num-iter 64] [--reps 2] [--ort]

Random weights of the preset (far-b: MAR-B dims), CFG doubling on. For each graph a build would
export (the full backbone and `backbone_k{c}` for the capacities the schedule runs) it times one step
at the largest known count that graph serves, in PyTorch eager (the modules the graphs are exported
from) and, with --ort, in ONNX Runtime CPU on the exported fp32 graphs (exported into a temporary
directory). The whole schedule's backbone time is the per-step time of each graph times the steps
that run it, with and without the variants. One thread (torch and ORT) unless --threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def step_feed(
    L: int, C: int, B: int, Q: int, known: int, capacity: int | None, rng: np.random.Generator
) -> dict:
    """Inputs of a step that knows `known` tokens (the last `known` of a random order), as the runtime
    fills them."""
    from runtime.schedule import ARStep

    mask = np.ones((B, L), np.float32)
    query = np.zeros((B, Q), np.int64)
    table = np.zeros((B, capacity or 1), np.int64)
    for b in range(B):
        order = rng.permutation(L)
        have = np.sort(order[L - known :])
        mask[b, have] = 0.0
        step = ARStep(L - known, max(1, L - known - Q), False)
        pos = np.sort(order[step.unknown_after : step.unknown_before])
        query[b, : len(pos)], query[b, len(pos) :] = pos, pos[0]
        if capacity:
            table[b, :known], table[b, known:] = have, order[0]
    feed = {
        "tokens": rng.standard_normal((B, L, C)).astype(np.float32),
        "mask": mask,
        "labels": np.zeros((B,), np.int64),
        "query": query,
    }
    if capacity:
        feed["known"] = table
    return feed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="far-b")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--num-iter", type=int, default=None, help="AR steps (default: the preset's)")
    ap.add_argument("--reps", type=int, default=2, help="timed runs per graph (median), after one warm-up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ort", action="store_true", help="also export the graphs and time ONNX Runtime")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    import torch

    from far_export.export import export_graph
    from far_export.graphs import GraphShapes, graph_modules, graph_specs
    from far_export.validate import ort_session, torch_runner
    from runtime.schedule import encoder_capacity, masked_schedule
    from training.config import preset
    from training.model import FAR
    from training.vae import AutoencoderKL

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = preset(args.preset, **({"num_iter": args.num_iter} if args.num_iter else {}))
    model, vae = FAR(cfg).eval(), AutoencoderKL(cfg.vae).eval()
    shapes = GraphShapes.for_config(cfg, args.batch, guided=True)
    specs = {n: io_ for n, io_ in graph_specs(cfg, shapes).items() if n.startswith("backbone")}
    mods = graph_modules(model, vae, True, variants=shapes.variant_names)
    L, B, Q = cfg.seq_len, args.batch, shapes.max_query
    caps = shapes.encoder_capacities
    schedule = masked_schedule(L, shapes.num_iter)
    known = [L - s.unknown_before for s in schedule]
    runs = {"backbone": len(schedule)}  # without variants: every step runs the full backbone
    served = {"backbone": max(known)}
    for s, k in zip(schedule, known):
        c = encoder_capacity(s, L, caps)
        name = "backbone" if c is None else f"backbone_k{c}"
        runs[f"with:{name}"] = runs.get(f"with:{name}", 0) + 1
        served[name] = max(served.get(name, 0), k)
    rng = np.random.Generator(np.random.PCG64(0))
    feeds = {}
    for name, io_ in specs.items():
        feeds[name] = step_feed(L, cfg.token_dim, B, Q, served[name], io_.known_capacity or None, rng)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    result: dict = {"preset": args.preset, "batch": B, "num_iter": shapes.num_iter, "capacities": caps}
    result["steps_per_graph_with_variants"] = {k[5:]: v for k, v in runs.items() if k.startswith("with:")}
    per_step: dict[str, dict[str, float]] = {"torch": {}}
    for name, io_ in specs.items():
        run = torch_runner(mods[name], io_)
        per_step["torch"][name] = timed(lambda run=run, f=feeds[name]: run(f))
        print(f"torch {name}: {per_step['torch'][name] * 1e3:.1f} ms (known {served[name]})", flush=True)
    if args.ort:
        per_step["ort"] = {}
        with tempfile.TemporaryDirectory(prefix="enc-variants-") as tmp:
            for name, io_ in specs.items():
                path = export_graph(mods[name], io_, Path(tmp) / io_.file, feeds[name])
                sess = ort_session(path, threads=args.threads)
                out = [o.name for o in io_.outputs]
                per_step["ort"][name] = timed(lambda s=sess, f=feeds[name], o=out: s.run(o, f))
                print(f"ort {name}: {per_step['ort'][name] * 1e3:.1f} ms", flush=True)
                del sess
                path.unlink()
    for kind, t in per_step.items():
        full = t["backbone"] * len(schedule)
        with_v = sum(t[k[5:]] * n for k, n in runs.items() if k.startswith("with:"))
        result[kind] = {
            "per_step_ms": {k: v * 1e3 for k, v in t.items()},
            "schedule_backbone_s_without": full,
            "schedule_backbone_s_with": with_v,
            "speedup": full / with_v,
        }
        print(f"{kind}: whole schedule backbone {full:.2f} s -> {with_v:.2f} s ({full / with_v:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

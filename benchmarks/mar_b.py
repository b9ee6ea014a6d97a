"""MAR-B dims (random weights): FAR K=4 through the runtime vs MAR's gather encoder with its 100-step head,
one image at batch 1. Minutes on one thread, so benchmarks/run.py runs it only when --sections names it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.common import ENGINES, Settings, alternate, engine_dir, open_pipe, table

if TYPE_CHECKING:
    from runtime.pipeline import Timings

TITLE = "7. MAR-B dims: FAR K=4 (runtime) vs MAR-100 with the gather encoder"
KEY = "mar_b"
STEPS = 16  # masked AR steps
CFG = 2.9  # MAR-B's guidance scale, linear schedule (any value != 1 doubles the batch)
REPS = 2
TARGET = 3.0  # the speed-up over B this comparison is held to

SIDES = {
    "A": "FAR K=4, runtime (ORT fp32, encoder variants)",
    "B": "MAR-100, PyTorch, gather encoder (known tokens only)",
    "C": "FAR K=4, PyTorch reference (full masked encoder)",
    "D": "MAR-100, runtime (ORT fp32, encoder variants)",
}


def checkpoint(head: str) -> Path:
    """A random-weight far-b checkpoint (MAR-B dims, KL-16 VAE; timing needs no training) with `head`
    ("shortcut" or "mar"), written under engines/bench/ and reused while its config is the same."""
    from benchmarks.export_far_b import random_far
    from training.checkpoint import save_checkpoint
    from training.config import load_checkpoint_config, preset

    cfg = preset("far-b", head=head, num_iter=STEPS, cfg=CFG)
    out = ENGINES / f"far-b-{head}-random"
    try:
        if load_checkpoint_config(out) == cfg:
            return out
    except Exception:  # missing or another config: write it
        pass
    print(f"    writing random-weight checkpoint {out}", flush=True)
    save_checkpoint(out, *random_far(cfg))
    return out


def run(s: Settings) -> tuple[str, dict]:
    """One image (batch 1, guidance on, fp32, STEPS AR steps) at MAR-B dims: A FAR K=4 through the runtime
    (ORT, encoder variants), B MAR-100 in PyTorch with MAR's gather encoder (exactly the known tokens each
    step, no pads) and MAR's DDPM head, C FAR K=4 in PyTorch (the reference sampler, full masked
    encoder), D (--mar-b-runtime) MAR-100 through the runtime. Interleaved, one round per rep."""
    from runtime.images import to_uint8
    from training.checkpoint import load_checkpoint
    from training.sample import decode_tokens, generate, resolve_settings, sample_tokens

    far_ckpt, mar_ckpt = checkpoint("shortcut"), checkpoint("mar")
    far, mar = load_checkpoint(far_ckpt), load_checkpoint(mar_ckpt)
    s_far, s_mar = resolve_settings(far.cfg, seed=0), resolve_settings(mar.cfg, seed=0)  # K=4 / N=100
    labels = [0]
    pipes = {"A": open_pipe(engine_dir(far_ckpt, "fp32", 1), s.threads)}
    if s.mar_b_runtime:
        pipes["D"] = open_pipe(engine_dir(mar_ckpt, "fp32", 1), s.threads)
    sides: dict[str, Callable[[], object]] = {
        k: (lambda pipe=pipe: pipe.generate(labels, seed=0)) for k, pipe in pipes.items()
    }
    sides["B"] = lambda: to_uint8(
        decode_tokens(mar.cfg, mar.vae, sample_tokens(mar.model, labels, s_mar, gather_known=True))
    )
    sides["C"] = lambda: generate(far.model, far.vae, labels, s_far)
    t = alternate(sides, REPS)
    shares = {k: _stage_shares(pipe.timings) for k, pipe in pipes.items()}
    for pipe in pipes.values():
        pipe.close()
    res = {
        "ar_steps": STEPS,
        "cfg": CFG,
        "batch": 1,
        "ms_per_image": {k: t[k] * 1e3 for k in sorted(t)},
        "runtime_stage_shares": shares,
        "ratio_B_over_A": t["B"] / t["A"],
        "ratio_C_over_A": t["C"] / t["A"],
    }
    if "D" in t:
        res["ratio_D_over_A"] = t["D"] / t["A"]
    rows = [
        [k, SIDES[k], t[k] * 1e3, t["B"] / t[k], "-" if k not in shares else shares[k]] for k in sorted(t)
    ]
    text = table(
        f"MAR-B dims (width 768, 12+12 blocks, 256 tokens, buffer 64; head 1024 x 6), random weights: one "
        f"image, batch 1, CFG {CFG} on, fp32, {STEPS} AR steps, {s.threads} thread(s)",
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
        f"backbone with its 100-step head (target: at least {TARGET:g}x).\n"
    )
    return text, res


def _stage_shares(tm: Timings) -> str:
    """Backbone / head / VAE shares of the last generate's wall time."""
    return " / ".join(f"{100 * getattr(tm, k) / tm.wall:.0f}%" for k in ("backbone", "head", "vae"))

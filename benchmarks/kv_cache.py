"""KV cache: per-token time of the causal backbone (PyTorch, random weights), one cached step vs
recomputing the whole prefix, averaged over positions spread across the sequence."""

from __future__ import annotations

import numpy as np
import torch

from benchmarks.common import Settings, alternate, table

TITLE = "3. KV cache"
KEY = "kv_cache"


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


def run(s: Settings) -> tuple[str, list[dict]]:
    """At MAR-B dims (mnist dims with --quick), 64 and 256 tokens."""
    results = [_kv_cache_at("mnist" if s.quick else "far-b", L, s.quick, s.reps) for L in (64, 256)]
    rows = [[r["dims"], r["tokens"], r["cached_ms"], r["recompute_ms"], r["ratio"]] for r in results]
    return table(
        "KV cache: causal backbone, ms per generated token, batch 1 (PyTorch, CPU)",
        ["backbone dims", "tokens", "cached step", "recompute prefix", "ratio"],
        rows,
    ), results

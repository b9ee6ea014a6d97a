"""Stage 2 for a DiT (`model.preset = "dit-..."`): flow matching on the cached latents.

`training/train.py` calls `train_dit` in place of `train_far` when the model section
describes a DiT; everything else (the VAE stage or `vae.init`, the latent cache and
its scale, the optimizer, EMA, resume state, checkpoint directory) is shared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from training.config import DiTConfig
from training.data import latent_scale
from training.distributed import Context
from training.dit import DiT
from training.model import patchify
from training.run_checks import TrainingError
from training.run_config import RunConfig
from training.train import Log, Stage, _init_from, build_cache, run_stage
from training.vae import AutoencoderKL


def train_dit(
    run: RunConfig, cfg: DiTConfig, vae: AutoencoderKL, out: Path, ctx: Context, log: Log, resume: bool
) -> Path:
    from training.checkpoint import save_checkpoint

    cache = build_cache(run, cfg, vae, out, ctx)
    if cache.num_classes > cfg.num_classes:
        raise TrainingError(
            f"the data has {cache.num_classes} classes but model.num_classes = {cfg.num_classes}"
        )
    scale = latent_scale(cache)
    cfg = cfg.replace(latent_scale=scale)
    torch.manual_seed(run.train.seed)
    model = DiT(cfg)
    if run.train.init:
        _init_from(model, Path(run.train.init))
    vae = vae.cpu().eval()
    params = sum(p.numel() for p in model.parameters())
    log(stage="dit", step=0, latent_scale=scale, params=params)
    if ctx.main:
        print(
            f"[dit] width {cfg.width} x {cfg.depth} blocks, {params / 1e6:.2f}M params, "
            f"latent_scale {scale:.4f}, {len(cache)} cached latents",
            file=sys.stderr,
        )

    def batch_fn(idx, g):
        idx_t = torch.as_tensor(idx)
        tokens = patchify(cache.sample(idx_t, generator=g) * scale, cfg)
        return tokens.to(ctx.device), cache.labels[idx_t].to(ctx.device)

    ckpt_dir = out / "checkpoint"

    def export(ema, step):
        info = {"step": step, "run": str(out), "config": run.to_dict()}
        save_checkpoint(
            ckpt_dir, _cpu_copy(ema), vae, extra_files={"train_info.json": json.dumps(info, indent=2)}
        )

    def sample_grid(ema, step):
        from runtime.images import _save_png, make_grid
        from training.sample import generate, resolve_settings

        rows = min(run.train.sample_classes, cfg.num_classes)
        labels = [c for c in range(rows) for _ in range(run.train.sample_per_class)]
        images = generate(_cpu_copy(ema), vae, labels, resolve_settings(cfg, seed=0))
        (out / "samples").mkdir(exist_ok=True)
        _save_png(make_grid(images, rows=rows), out / "samples" / f"step_{step:06d}.png")

    remedy = "start over in a new --out" + (
        f", or start from the last exported weights with train.init={ckpt_dir}" if ckpt_dir.is_dir() else ""
    )
    stage = Stage(
        "dit",
        model,
        lambda m, tokens, labels: m.loss(tokens, labels),
        batch_fn,
        len(cache),
        run.train,
        out / "train_state.pt",
        remedy,
        export,
        sample_grid,
    )
    run_stage(stage, ctx, log, resume)
    return ckpt_dir


def _cpu_copy(model: DiT) -> DiT:
    m = DiT(model.cfg)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return m.eval()

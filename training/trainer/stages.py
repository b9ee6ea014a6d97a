"""The two stages of a run: the VAE on images, then FAR (or the DiT baseline) on the latent cache,
optionally from the weights of a checkpoint (fine-tuning)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from runtime.files import write_atomic
from training.checkpoint import (
    MODEL_FILE,
    CheckpointError,
    build_model,
    load_into,
    load_safetensors,
    save_checkpoint,
    save_tensors,
)
from training.config import ConfigError, ModelConfig
from training.data import (
    DataError,
    DataSpec,
    LatentCache,
    encode_dataset,
    fingerprint,
    latent_scale,
    load_dataset,
    stack_images,
)
from training.model import patchify
from training.trainer.distributed import Context
from training.trainer.loop import Log, Stage, run_stage
from training.trainer.run_checks import TrainingError, check_batches, init_from_other_head
from training.trainer.run_config import RunConfig
from training.vae import AutoencoderKL

# ----------------------------------------------------------------------------
# Stage 1: the VAE
# ----------------------------------------------------------------------------


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """(summed L1 reconstruction + kl_weight * KL to N(0, I)) per image, divided by the pixel count
    (so gradients have a sane scale for clipping), averaged over the batch."""
    rec, kl = vae(images)
    per_image = (rec.float() - images).abs().sum(dim=(1, 2, 3)) + kl_weight * kl.float()
    return per_image.mean() / images[0].numel()


def train_vae(
    run: RunConfig, cfg: ModelConfig, out: Path, ctx: Context, log: Log, resume: bool
) -> AutoencoderKL:
    vdir = out / "vae"
    final = vdir / "vae.safetensors"
    torch.manual_seed(run.vae.seed)
    vae = AutoencoderKL(cfg.vae)
    state = vdir / "train_state.pt"
    done = vdir / "done"
    if done.is_file() and final.is_file():
        return load_weights(vae, final, f"remove {vdir} to train the VAE again, or give a VAE with vae.init")
    if ctx.main:
        vdir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    ds = load_dataset(DataSpec(run.data.source, cfg.img_size, run.data.hflip), "train")
    check_batches(run, len(ds), "images")
    every_class = np.linspace(0, len(ds) - 1, min(16, len(ds))).astype(int).tolist()
    fixed, _ = stack_images(ds, every_class)  # the images of the reconstruction grids

    def batch_fn(idx, g):
        # None: a file that went bad during the run (warned)
        imgs = [img for img, _ in (ds[i] for i in idx) if img is not None]
        if not imgs:
            raise DataError(
                f"no image of a training batch could be decoded (see the warnings): remove the corrupt "
                f"files from {run.data.source}, then continue with --resume"
            )
        return (torch.stack(imgs).to(ctx.device),)

    def export(ema, step):
        save_tensors(ema.state_dict(), final)

    def recon_grid(ema, step):
        from runtime.images import make_grid, save_image, to_uint8

        with torch.no_grad():
            rec, _ = ema(fixed.to(ctx.device), sample=False)
        pair = torch.cat([fixed, rec.float().cpu()]) * 0.5 + 0.5
        grid = make_grid(to_uint8(pair.clamp(0, 1).numpy()), rows=2)
        save_image(grid, vdir / f"recon_{step:06d}.png")

    remedy = "start over in a new --out" + (
        f", or train FAR on the VAE exported so far with vae.init={final}" if final.is_file() else ""
    )
    stage = Stage(
        "vae",
        vae,
        lambda m, x: vae_loss(m, x, run.vae.kl_weight),
        batch_fn,
        len(ds),
        run.vae,
        state,
        remedy,
        export,
        recon_grid,
    )
    if ctx.main:
        print(
            f"[vae] training {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params "
            f"on {len(ds)} images",
            file=sys.stderr,
        )
    run_stage(stage, ctx, log, resume)
    ctx.barrier()
    if ctx.main:
        write_atomic(done, "ok\n")
    return load_weights(vae, final, f"remove {vdir} to train the VAE again")  # the EMA weights


def load_weights(module: nn.Module, path: Path, remedy: str) -> Any:
    """Weights from a safetensors file into `module`; a damaged or mismatched file is a TrainingError."""
    try:
        load_into(module, load_safetensors(path), str(path))
    except CheckpointError as e:
        raise TrainingError(f"{e}: {remedy}") from None
    return module


# ----------------------------------------------------------------------------
# Stage 2: FAR (or the DiT baseline) on cached latents
# ----------------------------------------------------------------------------


def build_cache(run: RunConfig, cfg: ModelConfig, vae: AutoencoderKL, out: Path, ctx: Context) -> LatentCache:
    """The VAE's posterior moments of the data set, encoded once (again when the VAE or the data change)."""
    path = out / "latents.safetensors"
    spec = DataSpec(run.data.source, cfg.img_size, run.data.hflip)
    source = fingerprint(vae, spec)
    if ctx.main and _cache_source(path) != source:
        cache = encode_dataset(
            vae.to(ctx.device), load_dataset(spec, "train"), flips=run.data.hflip, device=ctx.device
        )
        cache.source = source
        cache.save(path)
    ctx.barrier()
    return LatentCache.load(path)


def _cache_source(path: Path) -> str | None:
    """The fingerprint of the cache in `path`; None when there is none (or it is damaged: it is rebuilt)."""
    if not path.exists():
        return None
    try:
        return LatentCache.load(path).source
    except DataError as e:
        print(f"warning: {e}: encoding the data again", file=sys.stderr)
        return None


def train_far(
    run: RunConfig,
    cfg: ModelConfig,
    vae: AutoencoderKL,
    out: Path,
    ctx: Context,
    log: Log,
    resume: bool,
) -> Path:
    """Stage 2: FAR (or, for a DiT config, the DiT baseline of `training/dit.py`: flow matching over the
    whole grid) on the cached latents, with the same data, optimizer, EMA, resume state and checkpoint."""
    from training.sample import generate, resolve_settings

    cache = build_cache(run, cfg, vae, out, ctx)
    check_batches(run, len(cache), "latents")
    if cache.num_classes > cfg.num_classes:
        raise TrainingError(
            f"the data has {cache.num_classes} classes but model.num_classes = {cfg.num_classes}"
        )
    scale = latent_scale(cache)
    cfg = cfg.replace(latent_scale=scale)
    torch.manual_seed(run.train.seed)
    model = build_model(cfg)
    name = cfg.kind
    if run.train.init:
        report = init_from(model, Path(run.train.init))
        if ctx.main:
            print(f"[{name}] train.init: {report}", file=sys.stderr)
    vae = vae.cpu().eval()
    state_path = out / "train_state.pt"
    params = sum(p.numel() for p in model.parameters())
    if not (resume and state_path.exists()):  # a resumed run logged its start already
        log(stage=name, step=0, latent_scale=scale, params=params)
    if ctx.main:
        print(
            f"[{name}] {cfg.summary}, {params / 1e6:.2f}M params, latent_scale {scale:.4f}, "
            f"{len(cache)} cached latents",
            file=sys.stderr,
        )

    def batch_fn(idx, g):
        idx_t = torch.as_tensor(idx)
        z = cache.sample(idx_t, generator=g)  # (b, c, h, w)
        tokens = patchify(z * scale, cfg)
        return tokens.to(ctx.device), cache.labels[idx_t].to(ctx.device)

    def loss_fn(m, tokens, labels, ema=None):  # ema: the shortcut head's self-consistency teacher
        return m.loss(tokens, labels) if ema is None else m.loss(tokens, labels, teacher=ema.head)

    ckpt_dir = out / "checkpoint"

    def export(ema, step):
        info = {"step": step, "run": str(out), "config": run.to_dict()}
        save_checkpoint(
            ckpt_dir, cpu_copy(ema), vae, extra_files={"train_info.json": json.dumps(info, indent=2)}
        )

    def sample_grid(ema, step):
        from runtime.images import make_grid, save_image

        o = run.train
        rows = min(o.sample_classes, cfg.num_classes)
        labels = [c for c in range(rows) for _ in range(o.sample_per_class)]
        images = generate(cpu_copy(ema), vae, labels, resolve_settings(cfg, seed=0))
        (out / "samples").mkdir(exist_ok=True)
        save_image(make_grid(images, rows=rows), out / "samples" / f"step_{step:06d}.png")

    remedy = "start over in a new --out" + (
        f", or start from the last exported weights with train.init={ckpt_dir}" if ckpt_dir.is_dir() else ""
    )
    stage = Stage(
        name,
        model,
        loss_fn,
        batch_fn,
        len(cache),
        run.train,
        state_path,
        remedy,
        export,
        sample_grid,
        ema_teacher=cfg.ema_teacher,
    )
    run_stage(stage, ctx, log, resume)
    return ckpt_dir


def init_from(model: nn.Module, path: Path) -> str:
    """Fine-tuning: FAR (or DiT) weights from a checkpoint directory; returns a one-line report.

    The backbone must match the config exactly. The head too when the directory's head is the same
    kind; from another head (e.g. a MAR import, `far-export import-mar`, into a shortcut FAR) the
    tensors whose names and shapes match are loaded (the AdaLN MLP: time/cond embeddings, input
    projection, residual blocks) and the rest stays freshly initialised (the shortcut's d_embed, the
    final linear layer: MAR's predicts 2C channels, noise and variance)."""
    file = path / MODEL_FILE
    try:
        sd = load_safetensors(file)
        src_head = init_from_other_head(model, path)
        if src_head is None:  # the same kind of model and head: every tensor
            load_into(model, sd, str(file))
            return f"loaded all {len(sd)} tensors of {path}"
        back = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        load_into(model.backbone, back, f"{file} (backbone)")
    except (CheckpointError, ConfigError) as e:
        raise TrainingError(f"train.init: {e}") from None
    own = model.head.state_dict()
    head = {
        k: sd[f"head.{k}"] for k, v in own.items() if f"head.{k}" in sd and sd[f"head.{k}"].shape == v.shape
    }
    model.head.load_state_dict(head, strict=False)
    fresh = sorted(set(own) - set(head))
    return (
        f"backbone ({len(back)} tensors) from {path}; {src_head} head -> {model.cfg.head} head: "
        f"{len(head)} tensors loaded, {len(fresh)} fresh ({', '.join(fresh)})"
    )


def cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy of a FAR or DiT (what checkpoints and sample grids use)."""
    m = type(model)(model.cfg)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return m.eval()

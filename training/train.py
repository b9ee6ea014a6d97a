"""Train the VAE and FAR: `python training/train.py --config training/configs/mnist.toml`.

Two stages in one run directory:

1. VAE (reconstruction + KL) on images, unless `vae.init` names a VAE to use
   (a checkpoint directory, a `vae.safetensors`, or MAR's `kl16.ckpt`).
2. FAR on cached latents: the VAE encodes the dataset once (posterior moments),
   the latent scale is 1 / std of the latents, FAR trains on posterior samples.

Any config key can be overridden: `--set train.lr=3e-4 model.cfg=3.0` (TOML values).
Scale out with `torchrun --nproc_per_node N training/train.py ...` (DDP: nccl on GPU,
gloo on CPU); `--resume` continues a run at the same step, optimizer, EMA and data order.

Run directory:
    config.toml         the resolved config          log.jsonl     one JSON object per log line
    vae/                VAE stage: vae.safetensors, train_state.pt, recon grids
    latents.safetensors the latent cache             samples/      sample grids during training
    checkpoint/         config.json + model.safetensors (EMA) + vae.safetensors: what far-export reads
    train_state.pt      FAR resume state (online weights, EMA, optimizer, step)

This file is the loop (`run_stage`), its two stages and the CLI. Around it: training/run_config.py
(the TOML config and its overrides), training/run_checks.py (everything checked before any work),
training/distributed.py (DDP), training/optim.py (AdamW groups, LR schedule, EMA).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from runtime.errors import FarError
from runtime.files import WriteError, atomic_path, write_atomic, write_failure
from runtime.locks import locked_dir
from training.checkpoint import save_checkpoint, save_tensors
from training.config import ConfigError, DiTConfig, FARConfig
from training.data import (
    DataError,
    DataSpec,
    LatentCache,
    encode_dataset,
    fingerprint,
    latent_scale,
    load_dataset,
)
from training.distributed import Context, batch_indices, ddp_objective, params_checksum, setup_context
from training.model import FAR, patchify
from training.optim import ema_update, lr_at, param_groups
from training.run_checks import (
    RUN_OPTIONS,
    TrainingError,
    check_batches,
    check_run,
    init_head_kind,
    is_run,
    load_state,
    shape_differences,
)
from training.run_config import OptimConfig, RunConfig, dump_toml, load_run_config
from training.vae import AutoencoderKL

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mnist.toml"


def step_seed(seed: int, step: int, rank: int) -> int:
    """Every step's randomness is a function of (seed, step, rank): resume continues it exactly."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


class Log:
    """JSONL log (rank 0 only)."""

    def __init__(self, path: Path, ctx: Context):
        self.path, self.ctx = path, ctx

    def __call__(self, **record: Any) -> None:
        if self.ctx.main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise WriteError(write_failure(self.path, e)) from None


# ----------------------------------------------------------------------------
# The training loop shared by both stages
# ----------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    model: nn.Module
    loss_fn: Any  # (model, *batch) -> scalar loss
    batch_fn: Any  # (indices, generator) -> tuple of tensors on device
    num_rows: int
    opt: OptimConfig
    state_path: Path
    remedy: str  # what to do when state_path is damaged
    export_fn: Any  # (ema, step) -> None: write the exported weights
    sample_fn: Any = None  # (ema, step) -> None
    ema_teacher: bool = False  # pass the EMA to loss_fn (the shortcut head's self-consistency teacher)


def run_stage(stage: Stage, ctx: Context, log: Log, resume: bool) -> None:
    from tqdm import tqdm

    o = stage.opt
    model = stage.model.to(ctx.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optim = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    step = 0
    if resume and stage.state_path.exists():
        state = load_state(stage.state_path, stage.name, stage.remedy)
        diff = shape_differences(model.state_dict(), state["model"])
        if diff:
            raise TrainingError(
                f"{stage.state_path} was trained with other model dims ({diff}): resume with the "
                f"run's own model settings, or start a new run in another --out"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if ctx.main:
            print(f"[{stage.name}] resumed at step {step} from {stage.state_path}", file=sys.stderr)
    if step >= o.steps:
        return

    objective = ddp_objective(model, stage.loss_fn, ctx)
    autocast = ctx.device.type == "cuda" and o.amp

    def save(at: int) -> None:
        if ctx.main:
            stage.export_fn(ema, at)
            with (
                atomic_path(stage.state_path) as tmp,
                open(tmp, "wb") as f,
            ):  # a failed write: OSError, not torch's
                torch.save(
                    {
                        "stage": stage.name,
                        "step": at,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optim.state_dict(),
                        "world_size": ctx.world,
                    },
                    f,
                )
        ctx.barrier()

    def check_sync(at: int) -> None:
        if not ctx.distributed:
            return
        sums = [None] * ctx.world
        dist.all_gather_object(sums, (params_checksum(model), params_checksum(ema)))
        spread = max(abs(s[0] - sums[0][0]) + abs(s[1] - sums[0][1]) for s in sums)
        log(stage=stage.name, step=at, sync_checksums=[s[0] for s in sums], sync_spread=spread)
        if spread > 1e-6 * (1 + abs(sums[0][0])):
            raise TrainingError(f"[{stage.name}] DDP ranks diverged at step {at}: checksums {sums}")

    last_good = step
    per_rank = o.batch_size // ctx.world
    if per_rank < 1:
        raise TrainingError(f"batch_size {o.batch_size} is smaller than the number of processes {ctx.world}")
    bar = tqdm(
        total=o.steps, initial=step, desc=stage.name, unit="step", disable=not ctx.main, dynamic_ncols=True
    )
    t0, seen, window = time.time(), 0, []
    try:
        while step < o.steps:
            torch.manual_seed(step_seed(o.seed, step, ctx.rank))
            g = torch.Generator().manual_seed(step_seed(o.seed + 1, step, ctx.rank))
            idx = batch_indices(stage.num_rows, step, o.batch_size, ctx, o.seed)
            batch = stage.batch_fn(idx, g)
            lr = lr_at(step, o)
            for group in optim.param_groups:
                group["lr"] = lr
            model.train()
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = objective(*batch, ema) if stage.ema_teacher else objective(*batch)
            if not torch.isfinite(loss.detach()):
                raise TrainingError(
                    f"[{stage.name}] loss is {loss.item()} at step {step}: stopped; the last good checkpoint "
                    f"(step {last_good}) is kept in {stage.state_path.parent}. Try a lower lr or grad_clip."
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf")
            )
            optim.step()
            ema_update(ema, model, o.ema_decay, step)
            step += 1
            seen += per_rank * ctx.world
            window.append(loss.item())
            bar.update(1)
            if step % o.log_every == 0 or step == o.steps:
                dt = time.time() - t0
                rate = seen / max(dt, 1e-9)
                mean_loss = float(np.mean(window))
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.2e}")
                log(
                    stage=stage.name,
                    step=step,
                    loss=mean_loss,
                    lr=lr,
                    grad_norm=float(gnorm),
                    images_per_s=rate,
                    time=time.time(),
                )
                t0, seen, window = time.time(), 0, []
            if o.check_sync_every and step % o.check_sync_every == 0:
                check_sync(step)
            if o.save_every and step % o.save_every == 0 and step < o.steps:
                save(step)
                last_good = step
            if stage.sample_fn and o.sample_every and step % o.sample_every == 0 and ctx.main:
                _try_sample(stage, ema, step)
    except KeyboardInterrupt:
        bar.close()
        if ctx.main:
            print(f"\n[{stage.name}] interrupted at step {step}: saving", file=sys.stderr)
        save(step)
        raise
    except BaseException:
        bar.close()  # the error message starts on a line of its own
        raise
    bar.close()
    check_sync(step)
    save(step)
    if stage.sample_fn and ctx.main:
        _try_sample(stage, ema, step)


def _try_sample(stage: Stage, ema: nn.Module, step: int) -> None:
    """Sample grids are a by-product: a failure is reported, never the end of a training run."""
    try:
        stage.sample_fn(ema, step)
    except Exception as e:  # noqa: BLE001 - any failure of the sampler
        print(
            f"\n[{stage.name}] warning: sample grid at step {step} failed: {type(e).__name__}: {e}",
            file=sys.stderr,
        )


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
    run: RunConfig, cfg: FARConfig, out: Path, ctx: Context, log: Log, resume: bool
) -> AutoencoderKL:

    vdir = out / "vae"
    final = vdir / "vae.safetensors"
    torch.manual_seed(run.vae.seed)
    vae = AutoencoderKL(cfg.vae)
    state = vdir / "train_state.pt"
    done = vdir / "done"
    if done.is_file() and final.is_file():
        return _load_weights(vae, final, f"remove {vdir} to train the VAE again, or give a VAE with vae.init")
    if ctx.main:
        vdir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    ds = load_dataset(DataSpec(run.data.source, cfg.img_size, run.data.hflip), "train")
    from training.data import stack_images

    check_batches(run, len(ds), "images")
    fixed, _ = stack_images(
        ds, np.linspace(0, len(ds) - 1, min(16, len(ds))).astype(int).tolist()
    )  # all classes

    def batch_fn(idx, g):
        imgs = [
            img for img, _ in (ds[i] for i in idx) if img is not None
        ]  # None: a file that went bad (warned)
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
    return _load_weights(vae, final, f"remove {vdir} to train the VAE again")  # the EMA weights


def _load_weights(module: nn.Module, path: Path, remedy: str) -> Any:
    """Weights from a safetensors file into `module`; a damaged or mismatched file is a TrainingError."""
    from training.checkpoint import CheckpointError, _load_into, _load_safetensors

    try:
        _load_into(module, _load_safetensors(path), str(path))
    except CheckpointError as e:
        raise TrainingError(f"{e}: {remedy}") from None
    return module


# ----------------------------------------------------------------------------
# Stage 2: FAR (or the DiT baseline) on cached latents
# ----------------------------------------------------------------------------


def build_cache(run: RunConfig, cfg: FARConfig, vae: AutoencoderKL, out: Path, ctx: Context) -> LatentCache:
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
    cfg: FARConfig | DiTConfig,
    vae: AutoencoderKL,
    out: Path,
    ctx: Context,
    log: Log,
    resume: bool,
) -> Path:
    """Stage 2: FAR (or, for a DiT config, the DiT baseline of `training/dit.py`: flow matching over the
    whole grid) on the cached latents, with the same data, optimizer, EMA, resume state and checkpoint."""
    from training.checkpoint import build_model
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
    name = "far" if isinstance(model, FAR) else "dit"
    if run.train.init:
        report = _init_from(model, Path(run.train.init))
        if ctx.main:
            print(f"[{name}] train.init: {report}", file=sys.stderr)
    vae = vae.cpu().eval()
    state_path = out / "train_state.pt"
    params = sum(p.numel() for p in model.parameters())
    if not (resume and state_path.exists()):  # a resumed run logged its start already
        log(stage=name, step=0, latent_scale=scale, params=params)
    if ctx.main:
        what = (
            f"{cfg.backbone} backbone + {cfg.head} head"
            if name == "far"
            else f"width {cfg.width} x {cfg.depth} blocks"
        )
        print(
            f"[{name}] {what}, {params / 1e6:.2f}M params, latent_scale {scale:.4f}, "
            f"{len(cache)} cached latents",
            file=sys.stderr,
        )

    def batch_fn(idx, g):
        idx_t = torch.as_tensor(idx)
        z = cache.sample(idx_t, generator=g)  # (b, c, h, w)
        tokens = patchify(z * scale, cfg)
        return tokens.to(ctx.device), cache.labels[idx_t].to(ctx.device)

    def loss_fn(m, tokens, labels, ema=None):
        if name == "dit":
            return m.loss(tokens, labels)
        teacher = ema.head if (ema is not None and cfg.teacher == "ema") else None
        return m.loss(tokens, labels, teacher=teacher)

    ckpt_dir = out / "checkpoint"

    def export(ema, step):
        info = {"step": step, "run": str(out), "config": run.to_dict()}
        save_checkpoint(
            ckpt_dir, _cpu_copy(ema), vae, extra_files={"train_info.json": json.dumps(info, indent=2)}
        )

    def sample_grid(ema, step):
        from runtime.images import make_grid, save_image

        o = run.train
        rows = min(o.sample_classes, cfg.num_classes)
        labels = [c for c in range(rows) for _ in range(o.sample_per_class)]
        images = generate(_cpu_copy(ema), vae, labels, resolve_settings(cfg, seed=0))
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
        ema_teacher=name == "far" and cfg.head == "shortcut",
    )
    run_stage(stage, ctx, log, resume)
    return ckpt_dir


def _init_from(model: FAR, path: Path) -> str:
    """Fine-tuning: FAR weights from a checkpoint directory; returns a one-line report.

    The backbone must match the config exactly. The head too when the directory's head is the same
    kind; from another head (e.g. a MAR import, `far-export import-mar`, into a shortcut FAR) the
    tensors whose names and shapes match are loaded (the AdaLN MLP: time/cond embeddings, input
    projection, residual blocks) and the rest stays freshly initialised (the shortcut's d_embed, the
    final linear layer: MAR's predicts 2C channels, noise and variance)."""
    from training.checkpoint import MODEL_FILE, CheckpointError, _load_into, _load_safetensors

    try:
        sd = _load_safetensors(path / MODEL_FILE)
        if not isinstance(model, FAR):  # a DiT: the same kind of model, every tensor
            _load_into(model, sd, str(path / MODEL_FILE))
            return f"loaded all {len(sd)} tensors of {path}"
        src_head = init_head_kind(model, path)
        if src_head == model.cfg.head:
            _load_into(model, sd, str(path / MODEL_FILE))
            return f"loaded all {len(sd)} tensors of {path}"
        back = {k[len("backbone.") :]: v for k, v in sd.items() if k.startswith("backbone.")}
        _load_into(model.backbone, back, f"{path / MODEL_FILE} (backbone)")
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


def _cpu_copy(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy of a FAR or DiT (what checkpoints and sample grids use)."""
    m = type(model)(model.cfg)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return m.eval()


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def train(run: RunConfig, out: Path, resume: bool = False, options: dict[str, Any] | None = None) -> Path:
    """Both stages (or FAR alone on `vae.init`); returns the exported checkpoint directory.
    `options` (the CLI's run-time options, e.g. threads) are stored in RUN/run.json for --resume."""
    ctx = setup_context(run.device)
    held = ExitStack()
    try:
        if ctx.device.type == "cpu" and ctx.distributed and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // ctx.world))
        cfg, given_vae = check_run(run, out, resume)
        ctx.barrier()  # every rank checked the directory before rank 0 writes into it
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(locked_dir(out, "the run directory", TrainingError))  # one process per run
            write_atomic(out / "config.toml", dump_toml(run.to_dict()))
            if options is not None:
                write_atomic(out / RUN_OPTIONS, json.dumps(options, indent=2) + "\n")
        ctx.barrier()
        log = Log(out / "log.jsonl", ctx)
        t0 = time.time()
        vae = given_vae if given_vae is not None else train_vae(run, cfg, out, ctx, log, resume)
        t1 = time.time()
        ckpt = train_far(run, cfg, vae, out, ctx, log, resume)
        log(stage="done", vae_seconds=t1 - t0, far_seconds=time.time() - t1, world_size=ctx.world)
        return ckpt
    finally:
        held.close()
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def run_options(out: Path) -> dict[str, Any]:
    """The run-time options stored with a run ({} when there are none or the file is unreadable)."""
    path = out / RUN_OPTIONS
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring {path} ({e}): pass the run-time options (--threads) again", stacklevel=2)
        return {}
    return options if isinstance(options, dict) else {}


def set_threads(threads: int | None, given: bool = True) -> None:
    """torch's CPU threads: 1 .. this machine's CPUs (a stored value above them, from a run started on
    a bigger machine, is lowered with a note)."""
    if threads is None:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if type(threads) is not int or threads < 1 or (given and threads > cpus):
        raise ConfigError(f"--threads must be an int in [1, {cpus}] (this machine's CPUs), got {threads!r}")
    if threads > cpus:
        print(
            f"note: the run used --threads {threads}; this machine has {cpus} CPUs: using {cpus}",
            file=sys.stderr,
        )
    torch.set_num_threads(min(threads, cpus))


def _interrupt_on_signals() -> None:
    """Ctrl-C and `kill` (SIGTERM) save a checkpoint; background jobs start with SIGINT ignored."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, handler)


def _cli():
    import click

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--config",
        "config_path",
        type=click.Path(),
        default=None,
        help=f"TOML run config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])}).",
    )
    @click.option("--out", default=None, help="Run directory (default: runs/<config name>).")
    @click.option("--steps", type=int, default=None, help="FAR training steps (train.steps).")
    @click.option("--vae-steps", type=int, default=None, help="VAE training steps (vae.steps).")
    @click.option("--data", default=None, help="'mnist' or an ImageFolder directory (data.source).")
    @click.option(
        "--vae",
        "vae_init",
        default=None,
        help="Use this VAE instead of training one: checkpoint dir, vae.safetensors or MAR kl16.ckpt.",
    )
    @click.option("--preset", default=None, help="Model preset (model.preset).")
    @click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
    @click.option(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per process (1 is robust on a busy machine); "
        "--resume reuses the first run's.",
    )
    @click.option(
        "--set",
        "sets",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override any config key, e.g. train.lr=3e-4.",
    )
    @click.argument("overrides", nargs=-1)
    def main(config_path, out, steps, vae_steps, data, vae_init, preset, resume, threads, sets, overrides):
        """Train the VAE (unless --vae is given) and FAR; KEY=VALUE arguments override config keys."""
        _interrupt_on_signals()
        warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
        out_dir = Path(out) if out else None
        try:
            saved = out_dir / "config.toml" if out_dir else None
            if resume and saved is not None and saved.is_file() and config_path is None:
                path = saved  # resume from the run's own resolved config
            else:
                path = Path(config_path) if config_path else DEFAULT_CONFIG
            out_dir = out_dir or Path("runs") / path.stem
            options = {"threads": threads}
            if resume and threads is None:
                options = {**options, **run_options(out_dir)}  # the first run's options, unless given again
                if options.get("threads") is not None:
                    click.echo(
                        f"resuming with --threads {options['threads']} (from {out_dir / RUN_OPTIONS})",
                        err=True,
                    )
            set_threads(options.get("threads"), given=threads is not None)
            extra = list(sets) + list(overrides)
            for flag, key in (
                (steps, "train.steps"),
                (vae_steps, "vae.steps"),
                (data, "data.source"),
                (vae_init, "vae.init"),
                (preset, "model.preset"),
            ):
                if flag is not None:
                    extra.append(f"{key}={json.dumps(flag)}")
            run = load_run_config(path, extra)
            t0 = time.time()
            ckpt = train(run, out_dir, resume, options)
        except WriteError as e:  # a full disk, a file size limit: nothing half-written is left
            then = "continue with --resume" if out_dir is not None and is_run(out_dir) else "run again"
            raise click.ClickException(f"{e}, then {then}") from None
        except FarError as e:  # bad input: one line; anything else is a bug and keeps its traceback
            raise click.ClickException(str(e)) from None
        except OSError as e:
            if e.filename is None:
                raise
            raise click.ClickException(f"{e.filename}: {e.strerror or e}") from None
        except KeyboardInterrupt:
            click.echo(
                f"interrupted: the last checkpoint and resume state are in {out_dir} "
                "(continue with --resume)",
                err=True,
            )
            sys.exit(130)
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"checkpoint: {ckpt} ({time.time() - t0:.0f} s)")

    return main


def main() -> None:
    """`far-train` (a console script) and `python training/train.py`."""
    _cli()()


if __name__ == "__main__":
    main()

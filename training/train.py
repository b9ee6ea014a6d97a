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
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

if __package__ in (None, ""):  # `python training/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from training.config import (
    DIT_PRESETS,
    PRESETS,
    ConfigError,
    DiTConfig,
    FARConfig,
    VAEConfig,
    model_config_from_dict,
)
from training.data import (
    DataError,
    DataSpec,
    LatentCache,
    encode_dataset,
    fingerprint,
    latent_scale,
    load_dataset,
)
from training.model import FAR, patchify
from training.vae import AutoencoderKL

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "mnist.toml"


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory, bad VAE file)."""


# ----------------------------------------------------------------------------
# Run configuration (TOML sections -> frozen dataclasses)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OptimConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch (split over DDP ranks)
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "constant" | "cosine" (after warmup)
    warmup_steps: int = 100
    min_lr: float = 0.0
    weight_decay: float = 0.02
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 3.0
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 50
    sample_every: int = 1000  # sample / reconstruction grids (0: never)
    save_every: int = 1000  # checkpoint + resume state (also at the end and on Ctrl-C)
    check_sync_every: int = 0  # DDP only: compare parameter checksums across ranks (0: at the end only)
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)


@dataclass(frozen=True)
class VAEStageConfig(OptimConfig):
    init: str = ""  # existing VAE (dir / .safetensors / MAR .ckpt); empty: train one
    kl_weight: float = 1e-3  # on summed KL vs summed L1 reconstruction (per image)
    steps: int = 2000
    lr: float = 1e-3


@dataclass(frozen=True)
class FARStageConfig(OptimConfig):
    steps: int = 8000
    sample_classes: int = 10  # rows of the sample grids
    sample_per_class: int = 8
    init: str = ""  # start from this checkpoint directory's FAR weights (fine-tuning); empty: random init


@dataclass(frozen=True)
class DataConfig:
    source: str = "mnist"  # "mnist" or an ImageFolder directory
    hflip: bool = False


@dataclass(frozen=True)
class RunConfig:
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "mnist"})
    data: DataConfig = field(default_factory=DataConfig)
    vae: VAEStageConfig = field(default_factory=VAEStageConfig)
    train: FARStageConfig = field(default_factory=FARStageConfig)
    device: str = "auto"  # "auto" | "cpu" | "cuda"

    def far_config(self, **changes: Any) -> FARConfig | DiTConfig:
        m = dict(self.model)
        name = m.pop("preset", "mnist")
        presets = {**PRESETS, **DIT_PRESETS}
        if name not in presets:
            raise ConfigError(f"unknown model.preset {name!r}; choose from {', '.join(presets)}")
        base = presets[name].to_dict()
        vae = m.pop("vae", None)
        if isinstance(vae, str):
            from training.config import VAE_PRESETS

            if vae not in VAE_PRESETS:
                raise ConfigError(f"unknown model.vae preset {vae!r}; choose from {', '.join(VAE_PRESETS)}")
            base["vae"] = dataclasses.asdict(VAE_PRESETS[vae])
        elif isinstance(vae, dict):
            base["vae"] = {**base["vae"], **vae}
        base.update(m)
        base.update(changes)
        return model_config_from_dict(base)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": dict(self.model), "data": dataclasses.asdict(self.data),
                "vae": dataclasses.asdict(self.vae), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        d = dict(d)
        unknown = sorted(set(d) - {"device", "model", "data", "vae", "train"})
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(unknown)}")
        cfg = cls(
            model=dict(d.get("model", {"preset": "mnist"})),
            data=_section(DataConfig, d.get("data", {}), "data"),
            vae=_section(VAEStageConfig, d.get("vae", {}), "vae"),
            train=_section(FARStageConfig, d.get("train", {}), "train"),
            device=str(d.get("device", "auto")),
        )
        for stage in (cfg.vae, cfg.train):
            if stage.lr_schedule not in ("constant", "cosine"):
                raise ConfigError(f"lr_schedule must be 'constant' or 'cosine', got {stage.lr_schedule!r}")
            if stage.steps < 0 or stage.batch_size < 1:
                raise ConfigError("steps must be >= 0 and batch_size >= 1")
        cfg.far_config()  # validates the model section
        return cfg


def _section(cls: type, d: Any, name: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(f'{name}.{k}' for k in unknown)}")
    out = {}
    for k, v in d.items():
        default = getattr(cls(), k)
        if isinstance(default, tuple):
            v = tuple(v) if isinstance(v, (list, tuple)) else v
        elif isinstance(default, bool):
            if not isinstance(v, bool):
                raise ConfigError(f"{name}.{k} must be true or false, got {v!r}")
        elif isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if type(v) is not type(default) and not (isinstance(default, tuple) and isinstance(v, tuple)):
            raise ConfigError(f"{name}.{k} must be {type(default).__name__}, got {v!r}")
        out[k] = v
    return cls(**out)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); values are TOML (bare words become strings)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"override {text!r} has no key")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return path, value


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a TOML config and apply `section.key=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a table")
        node[keys[-1]] = value
    return RunConfig.from_dict(raw)


def dump_toml(d: dict[str, Any]) -> str:
    """The resolved config as TOML (scalars, lists and nested tables)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        raise TypeError(f"cannot write {v!r} as TOML")

    lines: list[str] = []

    def table(name: str, t: dict[str, Any]) -> None:  # its scalars first, then its sub-tables
        if name:
            lines.append(f"\n[{name}]")
        lines.extend(f"{k} = {val(v)}" for k, v in t.items() if not isinstance(v, dict))
        for k, v in t.items():
            if isinstance(v, dict):
                table(f"{name}.{k}" if name else k, v)

    table("", d)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------
# Distributed context
# ----------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_context(device: str) -> Context:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError("device 'cuda' requested but torch sees no GPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group(backend=backend)
        return Context(torch.device(device), rank, world)
    return Context(torch.device(device))


# ----------------------------------------------------------------------------
# Optimisation helpers
# ----------------------------------------------------------------------------


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """MAR's add_weight_decay: no decay on biases and 1-d parameters (norms), decay elsewhere."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, o: OptimConfig) -> float:
    """Linear warmup, then constant or half-cosine down to min_lr."""
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    if o.lr_schedule == "constant":
        return o.lr
    progress = (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps)
    return o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int) -> None:
    """EMA with a warmup of the decay ((1 + step) / (10 + step)) so early EMAs track the weights."""
    d = min(decay, (1 + step) / (10 + step))
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - d)


def step_seed(seed: int, step: int, rank: int) -> int:
    """Every step's randomness is a function of (seed, step, rank): resume continues it exactly."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


def batch_indices(n: int, step: int, batch: int, ctx: Context, seed: int) -> list[int]:
    """This rank's rows for global step `step`: epochs of a DistributedSampler permutation (drop_last)."""
    from torch.utils.data import DistributedSampler

    per_rank = batch // ctx.world
    sampler = DistributedSampler(range(n), num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed,
                                 drop_last=True)
    per_epoch = max(1, len(sampler) // per_rank)
    epoch, k = divmod(step, per_epoch)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return order[k * per_rank : (k + 1) * per_rank]


def params_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _Objective(nn.Module):
    """Wraps a loss function so DDP sees a forward() (gradients are all-reduced in backward)."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *batch):
        return self.fn(self.model, *batch)


class Log:
    """JSONL log (rank 0 only)."""

    def __init__(self, path: Path, ctx: Context):
        self.path, self.ctx = path, ctx

    def __call__(self, **record: Any) -> None:
        if self.ctx.main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


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
    if resume and stage.state_path.is_file():
        state = torch.load(stage.state_path, map_location=ctx.device, weights_only=True)
        if state.get("stage") != stage.name:
            raise TrainingError(f"{stage.state_path} holds a {state.get('stage')!r} stage, not {stage.name!r}")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if ctx.main:
            print(f"[{stage.name}] resumed at step {step} from {stage.state_path}", file=sys.stderr)
    if step >= o.steps:
        return

    if ctx.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        objective: nn.Module = DDP(_Objective(model, stage.loss_fn), device_ids=ids)
    else:
        objective = _Objective(model, stage.loss_fn)
    autocast = ctx.device.type == "cuda" and o.amp

    def save(at: int) -> None:
        if ctx.main:
            stage.export_fn(ema, at)
            atomic_torch_save({"stage": stage.name, "step": at, "model": model.state_dict(), "ema": ema.state_dict(),
                               "optimizer": optim.state_dict(), "world_size": ctx.world}, stage.state_path)
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
    bar = tqdm(total=o.steps, initial=step, desc=stage.name, unit="step", disable=not ctx.main, dynamic_ncols=True)
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
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf"))
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
                log(stage=stage.name, step=step, loss=mean_loss, lr=lr, grad_norm=float(gnorm), images_per_s=rate,
                    time=time.time())
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
        print(f"\n[{stage.name}] warning: sample grid at step {step} failed: {type(e).__name__}: {e}", file=sys.stderr)


# ----------------------------------------------------------------------------
# Stage 1: the VAE
# ----------------------------------------------------------------------------


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, kl_weight: float) -> torch.Tensor:
    """(summed L1 reconstruction + kl_weight * KL to N(0, I)) per image, divided by the pixel count
    (so gradients have a sane scale for clipping), averaged over the batch."""
    rec, kl = vae(images)
    per_image = (rec.float() - images).abs().sum(dim=(1, 2, 3)) + kl_weight * kl.float()
    return per_image.mean() / images[0].numel()


def load_vae_file(path: Path, vae_cfg: VAEConfig) -> tuple[AutoencoderKL, VAEConfig]:
    """A given VAE: a checkpoint dir (its config's VAE), a vae.safetensors, or MAR's kl16.ckpt."""
    from training.checkpoint import (
        CONFIG_FILE,
        VAE_FILE,
        CheckpointError,
        _load_into,
        _load_safetensors,
        load_mar_vae,
    )

    try:
        if path.is_dir():
            if (path / CONFIG_FILE).is_file():
                vae_cfg = FARConfig.load(path / CONFIG_FILE).vae
            path = path / VAE_FILE
        vae = AutoencoderKL(vae_cfg)
        if path.suffix == ".safetensors":
            _load_into(vae, _load_safetensors(path), str(path))
        else:
            load_mar_vae(path, vae)
    except (CheckpointError, ConfigError) as e:
        raise TrainingError(f"vae.init: {e}") from None
    return vae, vae_cfg


def train_vae(run: RunConfig, cfg: FARConfig, out: Path, ctx: Context, log: Log, resume: bool) -> AutoencoderKL:
    from safetensors.torch import load_file, save_file

    vdir = out / "vae"
    final = vdir / "vae.safetensors"
    torch.manual_seed(run.vae.seed)
    vae = AutoencoderKL(cfg.vae)
    state = vdir / "train_state.pt"
    done = vdir / "done"
    if done.is_file() and final.is_file():
        vae.load_state_dict(load_file(str(final)))
        return vae
    if ctx.main:
        vdir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    ds = load_dataset(DataSpec(run.data.source, cfg.img_size, run.data.hflip), "train")
    from training.data import stack_images

    fixed, _ = stack_images(ds, np.linspace(0, len(ds) - 1, min(16, len(ds))).astype(int).tolist())  # all classes

    def batch_fn(idx, g):
        imgs = [ds[i][0] for i in idx]
        return (torch.stack(imgs).to(ctx.device),)

    def export(ema, step):
        tmp = final.with_name(final.name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp))
        os.replace(tmp, final)

    def recon_grid(ema, step):
        from runtime.images import _save_png, make_grid, to_uint8

        with torch.no_grad():
            rec, _ = ema(fixed.to(ctx.device), sample=False)
        pair = torch.cat([fixed, rec.float().cpu()]) * 0.5 + 0.5
        grid = make_grid(to_uint8(pair.clamp(0, 1).numpy()), rows=2)
        _save_png(grid, vdir / f"recon_{step:06d}.png")

    stage = Stage("vae", vae, lambda m, x: vae_loss(m, x, run.vae.kl_weight), batch_fn, len(ds), run.vae, state,
                  export, recon_grid)
    if ctx.main:
        print(f"[vae] training {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params on {len(ds)} images",
              file=sys.stderr)
    run_stage(stage, ctx, log, resume)
    ctx.barrier()
    if ctx.main:
        done.write_text("ok\n")
    vae.load_state_dict(load_file(str(final)))  # the EMA weights
    return vae


# ----------------------------------------------------------------------------
# Stage 2: FAR on cached latents
# ----------------------------------------------------------------------------


def build_cache(run: RunConfig, cfg: FARConfig, vae: AutoencoderKL, out: Path, ctx: Context) -> LatentCache:
    path = out / "latents.safetensors"
    spec = DataSpec(run.data.source, cfg.img_size, run.data.hflip)
    source = fingerprint(vae, spec)
    if ctx.main and (not path.is_file() or LatentCache.load(path).source != source):
        cache = encode_dataset(vae.to(ctx.device), load_dataset(spec, "train"), flips=run.data.hflip, device=ctx.device)
        cache.source = source
        cache.save(path)
    ctx.barrier()
    return LatentCache.load(path)


def train_far(run: RunConfig, cfg: FARConfig, vae: AutoencoderKL, out: Path, ctx: Context, log: Log,
              resume: bool) -> Path:
    from training.checkpoint import save_checkpoint

    cache = build_cache(run, cfg, vae, out, ctx)
    if cache.num_classes > cfg.num_classes:
        raise TrainingError(f"the data has {cache.num_classes} classes but model.num_classes = {cfg.num_classes}")
    scale = latent_scale(cache)
    cfg = cfg.replace(latent_scale=scale)
    torch.manual_seed(run.train.seed)
    model = FAR(cfg)
    if run.train.init:
        _init_from(model, Path(run.train.init))
    vae = vae.cpu().eval()
    log(stage="far", step=0, latent_scale=scale, params=sum(p.numel() for p in model.parameters()))
    if ctx.main:
        print(f"[far] {cfg.backbone} backbone + {cfg.head} head, "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, latent_scale {scale:.4f}, "
              f"{len(cache)} cached latents", file=sys.stderr)

    def batch_fn(idx, g):
        idx_t = torch.as_tensor(idx)
        z = cache.sample(idx_t, generator=g)  # (b, c, h, w)
        tokens = patchify(z * scale, cfg)
        return tokens.to(ctx.device), cache.labels[idx_t].to(ctx.device)

    def loss_fn(m, tokens, labels, ema=None):
        teacher = ema.head if (ema is not None and cfg.teacher == "ema") else None
        return m.loss(tokens, labels, teacher=teacher)

    ckpt_dir = out / "checkpoint"

    def export(ema, step):
        info = {"step": step, "run": str(out), "config": run.to_dict()}
        save_checkpoint(ckpt_dir, _cpu_copy(ema), vae, extra_files={"train_info.json": json.dumps(info, indent=2)})

    def sample_grid(ema, step):
        from runtime.images import _save_png, make_grid
        from training.sample import SamplingSettings, generate

        o = run.train
        rows = min(o.sample_classes, cfg.num_classes)
        labels = [c for c in range(rows) for _ in range(o.sample_per_class)]
        m = _cpu_copy(ema).eval()
        images = generate(m, vae, labels, SamplingSettings.resolve(cfg, seed=0))
        (out / "samples").mkdir(exist_ok=True)
        _save_png(make_grid(images, rows=rows), out / "samples" / f"step_{step:06d}.png")

    stage = Stage("far", model, loss_fn, batch_fn, len(cache), run.train, out / "train_state.pt", export,
                  sample_grid, ema_teacher=cfg.head == "shortcut")
    run_stage(stage, ctx, log, resume)
    return ckpt_dir


def _init_from(model: FAR, path: Path) -> None:
    """Fine-tuning: FAR weights from a checkpoint directory whose architecture matches the config."""
    from training.checkpoint import MODEL_FILE, CheckpointError, _load_into, _load_safetensors

    try:
        _load_into(model, _load_safetensors(path / MODEL_FILE), str(path / MODEL_FILE))
    except CheckpointError as e:
        raise TrainingError(f"train.init: {e}") from None


def _cpu_copy(model: FAR) -> FAR:
    m = FAR(model.cfg)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return m.eval()


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


def train(run: RunConfig, out: Path, resume: bool = False) -> Path:
    """Both stages (or FAR alone on `vae.init`); returns the exported checkpoint directory."""
    ctx = setup_context(run.device)
    try:
        if ctx.device.type == "cpu" and ctx.distributed and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // ctx.world))
        saved = out / "config.toml"
        has_state = (out / "train_state.pt").is_file() or (out / "vae" / "train_state.pt").is_file()
        if has_state and not resume:
            raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            tmp = saved.with_name("config.toml.tmp")
            tmp.write_text(dump_toml(run.to_dict()))
            os.replace(tmp, saved)
        ctx.barrier()
        log = Log(out / "log.jsonl", ctx)
        cfg = run.far_config()
        t0 = time.time()
        if run.vae.init:
            vae, vae_cfg = load_vae_file(Path(run.vae.init), cfg.vae)
            cfg = cfg.replace(vae=vae_cfg)
        else:
            vae = train_vae(run, cfg, out, ctx, log, resume)
        t1 = time.time()
        if isinstance(cfg, DiTConfig):  # the third model kind: a diffusion transformer on the same latents
            from training.dit_train import train_dit

            ckpt = train_dit(run, cfg, vae, out, ctx, log, resume)
        else:
            ckpt = train_far(run, cfg, vae, out, ctx, log, resume)
        log(stage="done", vae_seconds=t1 - t0, far_seconds=time.time() - t1, world_size=ctx.world)
        return ckpt
    finally:
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


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
    @click.option("--config", "config_path", type=click.Path(), default=None,
                  help=f"TOML run config (default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[2])}).")
    @click.option("--out", default=None, help="Run directory (default: runs/<config name>).")
    @click.option("--steps", type=int, default=None, help="FAR training steps (train.steps).")
    @click.option("--vae-steps", type=int, default=None, help="VAE training steps (vae.steps).")
    @click.option("--data", default=None, help="'mnist' or an ImageFolder directory (data.source).")
    @click.option("--vae", "vae_init", default=None,
                  help="Use this VAE instead of training one: checkpoint dir, vae.safetensors or MAR kl16.ckpt.")
    @click.option("--preset", default=None, help="Model preset (model.preset).")
    @click.option("--resume", is_flag=True, help="Continue the run in --out from its last checkpoint.")
    @click.option("--threads", type=int, default=None, help="torch CPU threads per process (1 is robust on a busy machine).")
    @click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. train.lr=3e-4.")
    @click.argument("overrides", nargs=-1)
    def main(config_path, out, steps, vae_steps, data, vae_init, preset, resume, threads, sets, overrides):
        """Train the VAE (unless --vae is given) and FAR; KEY=VALUE arguments override config keys."""
        if threads:
            torch.set_num_threads(threads)
        _interrupt_on_signals()
        warnings.formatwarning = lambda msg, *a, **k: f"warning: {msg}\n"
        try:
            out_dir = Path(out) if out else None
            saved = out_dir / "config.toml" if out_dir else None
            if resume and saved is not None and saved.is_file() and config_path is None:
                path = saved  # resume from the run's own resolved config
            else:
                path = Path(config_path) if config_path else DEFAULT_CONFIG
            extra = list(sets) + list(overrides)
            for flag, key in ((steps, "train.steps"), (vae_steps, "vae.steps"), (data, "data.source"),
                              (vae_init, "vae.init"), (preset, "model.preset")):
                if flag is not None:
                    extra.append(f"{key}={json.dumps(flag)}")
            run = load_run_config(path, extra)
            out_dir = out_dir or Path("runs") / path.stem
            t0 = time.time()
            ckpt = train(run, out_dir, resume)
        except (ConfigError, DataError, TrainingError, OSError) as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo(f"interrupted: the last checkpoint and resume state are in {out_dir} (continue with --resume)",
                       err=True)
            sys.exit(130)
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"checkpoint: {ckpt} ({time.time() - t0:.0f} s)")

    return main


if __name__ == "__main__":
    _cli()()

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
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib  # novermin (3.11+; tomli below on 3.10)
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
from training.files import RunFileError, read_text, torch_save_atomic, write_atomic, write_text_atomic
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
        elif vae is not None:
            raise ConfigError(f"model.vae must be a VAE preset name or a table of VAE keys, got {vae!r}")
        base.update(m)
        base.update(changes)
        try:
            return model_config_from_dict(base)
        except ConfigError as e:
            raise ConfigError(f"[model] {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "model": dict(self.model), "data": dataclasses.asdict(self.data),
                "vae": dataclasses.asdict(self.vae), "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A checked run config: every key known, every value of its type and in its range
        (non-finite numbers nowhere), the model section a valid FARConfig."""
        d = dict(d)
        unknown = sorted(set(d) - {"device", "model", "data", "vae", "train"})
        if unknown:
            raise ConfigError(f"unknown config section(s): {', '.join(unknown)}; the sections are "
                              "device, [model], [data], [vae], [train]")
        _check_finite(d, "")
        model = d.get("model", {"preset": "mnist"})
        if not isinstance(model, dict):
            raise ConfigError(f"[model] must be a table (preset = ..., width = ...), got {model!r}")
        device = d.get("device", "auto")
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ConfigError(f"device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\", got {device!r}")
        cfg = cls(
            model=dict(model),
            data=_section(DataConfig, d.get("data", {}), "data"),
            vae=_section(VAEStageConfig, d.get("vae", {}), "vae"),
            train=_section(FARStageConfig, d.get("train", {}), "train"),
            device=device,
        )
        if not cfg.data.source:
            raise ConfigError("data.source must be \"mnist\" or an ImageFolder directory, got an empty string")
        _check_stage(cfg.vae, "vae")
        _check_stage(cfg.train, "train")
        if cfg.vae.kl_weight < 0:
            raise ConfigError(f"vae.kl_weight must be >= 0, got {cfg.vae.kl_weight}")
        for key in ("sample_classes", "sample_per_class"):
            if not 1 <= getattr(cfg.train, key) <= MAX_SAMPLE_ROWS:
                raise ConfigError(f"train.{key} must be in [1, {MAX_SAMPLE_ROWS}], got {getattr(cfg.train, key)}")
        cfg.far_config()  # validates the model section
        return cfg


MAX_SAMPLE_ROWS = 100  # rows / columns of a sample grid


def _check_finite(d: dict[str, Any], prefix: str) -> None:
    """No NaN or infinity anywhere in a (nested) config table."""
    for k, v in d.items():
        items = v if isinstance(v, (list, tuple)) else [v]
        if isinstance(v, dict):
            _check_finite(v, f"{prefix}{k}.")
        elif any(isinstance(x, float) and not math.isfinite(x) for x in items):
            raise ConfigError(f"{prefix}{k} must be a finite number, got {v!r}")


def _check_stage(o: OptimConfig, name: str) -> None:
    """The optimisation settings of a stage are in range (NaN fails every comparison below)."""
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"{name}.{key} must be {what}, got {getattr(o, key)!r}")

    need(o.lr_schedule in ("constant", "cosine"), "lr_schedule", "\"constant\" or \"cosine\"")
    for key in ("steps", "batch_size", "log_every"):
        need(getattr(o, key) >= 1, key, "an int >= 1")
    for key in ("warmup_steps", "sample_every", "save_every", "check_sync_every"):
        need(getattr(o, key) >= 0, key, f"an int >= 0{' (0: never)' if key != 'warmup_steps' else ''}")
    need(0 <= o.seed < 2**63, "seed", "an int in [0, 2**63)")
    need(o.lr >= 0, "lr", "a number >= 0")
    need(0 <= o.min_lr <= o.lr, "min_lr", f"in [0, lr = {o.lr}]")
    need(o.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(o.grad_clip >= 0, "grad_clip", "a number >= 0 (0: no clipping)")
    need(0 <= o.ema_decay < 1, "ema_decay", "in [0, 1)")
    need(len(o.betas) == 2 and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1
                                   for b in o.betas), "betas", "two numbers in [0, 1), e.g. [0.9, 0.95]")


def _section(cls: type, d: Any, name: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"[{name}] must be a table, got {d!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(f'{name}.{k}' for k in unknown)}; "
                          f"[{name}] keys are {', '.join(known)}")
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
        if not path.exists():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = tomllib.loads(read_text(path, "config file"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[:i + 1])} is a value, not a table")
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
    """MAR's add_weight_decay (util/misc.py): no decay on biases, 1-d parameters (norms) and MAR's
    diffusion head (MAR exempts every `diffloss` parameter); decay elsewhere.

    The shortcut head keeps decay on its matrices: the shipped far-mnist was trained and measured so,
    and MAR's exemption is a choice for its own head, not a property of AdaLN MLPs."""
    mar_head = isinstance(model, FAR) and model.cfg.head == "mar"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or (mar_head and name.startswith("head."))
        (no_decay if exempt else decay).append(p)
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


STATE_KEYS = ("stage", "step", "model", "ema", "optimizer")


def load_state(path: Path, stage: str, remedy: str, mmap: bool = False) -> dict[str, Any]:
    """A stage's resume state (weights_only); a damaged or foreign file is a one-line TrainingError
    that names the file and `remedy` (what to do instead)."""
    if not path.is_file():
        raise TrainingError(f"{path} is not a regular file: {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types (EOFError, zip, unpickling) on damaged files
        from training.checkpoint import _load_reason

        raise TrainingError(f"{path} is damaged ({_load_reason(e)}) and cannot be resumed: {remedy}") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise TrainingError(f"{path} is not a resume state (keys {', '.join(STATE_KEYS)} expected): {remedy}")
    if state["stage"] != stage:
        raise TrainingError(f"{path} holds a {state['stage']!r} stage, not {stage!r}: {remedy}")
    if type(state["step"]) is not int or state["step"] < 0:
        raise TrainingError(f"{path} has no valid step (got {state['step']!r}): {remedy}")
    return state


def shape_differences(own: dict[str, Any], saved: dict[str, Any], first: int = 3) -> str:
    """'' if the two state dicts (name -> tensor or shape) have the same keys and shapes, else the first
    few differences in one line: 'backbone.x: saved (4, 32), config (4, 64); 2 more'."""
    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    diffs = [f"{k}: saved {shape(saved[k])}, config {shape(own[k])}"
             for k in own if k in saved and shape(own[k]) != shape(saved[k])]
    diffs += [f"{k}: not in the saved weights" for k in own if k not in saved]
    diffs += [f"{k}: saved, not in the config's model" for k in saved if k not in own]
    if not diffs:
        return ""
    more = f"; {len(diffs) - first} more" if len(diffs) > first else ""
    return "; ".join(diffs[:first]) + more


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
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                from training.files import write_failure

                raise RunFileError(write_failure(self.path, e)) from None


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
            raise TrainingError(f"{stage.state_path} was trained with other model dims ({diff}): resume with the "
                                f"run's own model settings, or start a new run in another --out")
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
            torch_save_atomic({"stage": stage.name, "step": at, "model": model.state_dict(), "ema": ema.state_dict(),
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

    if not path.exists():
        raise TrainingError(f"vae.init: {path} does not exist: give a checkpoint directory, a vae.safetensors "
                            f"or MAR's kl16.ckpt")
    if not path.is_dir() and not path.is_file():
        raise TrainingError(f"vae.init: {path} is not a regular file (a FIFO, socket or device): give a checkpoint "
                            f"directory, a vae.safetensors or MAR's kl16.ckpt")
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
    from safetensors.torch import save_file

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

    _check_batches(run, len(ds), "images")
    fixed, _ = stack_images(ds, np.linspace(0, len(ds) - 1, min(16, len(ds))).astype(int).tolist())  # all classes

    def batch_fn(idx, g):
        imgs = [img for img, _ in (ds[i] for i in idx) if img is not None]  # None: a file that went bad (warned)
        if not imgs:
            raise DataError(f"no image of a training batch could be decoded (see the warnings): remove the corrupt "
                            f"files from {run.data.source}, then continue with --resume")
        return (torch.stack(imgs).to(ctx.device),)

    def export(ema, step):
        weights = {k: v.detach().contiguous().cpu() for k, v in ema.state_dict().items()}
        write_atomic(final, lambda tmp: save_file(weights, str(tmp)))

    def recon_grid(ema, step):
        from runtime.images import _save_png, make_grid, to_uint8

        with torch.no_grad():
            rec, _ = ema(fixed.to(ctx.device), sample=False)
        pair = torch.cat([fixed, rec.float().cpu()]) * 0.5 + 0.5
        grid = make_grid(to_uint8(pair.clamp(0, 1).numpy()), rows=2)
        _save_png(grid, vdir / f"recon_{step:06d}.png")

    remedy = ("start over in a new --out" + (f", or train FAR on the VAE exported so far with vae.init={final}"
                                            if final.is_file() else ""))
    stage = Stage("vae", vae, lambda m, x: vae_loss(m, x, run.vae.kl_weight), batch_fn, len(ds), run.vae, state,
                  remedy, export, recon_grid)
    if ctx.main:
        print(f"[vae] training {sum(p.numel() for p in vae.parameters()) / 1e6:.2f}M params on {len(ds)} images",
              file=sys.stderr)
    run_stage(stage, ctx, log, resume)
    ctx.barrier()
    if ctx.main:
        write_text_atomic(done, "ok\n")
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
# Stage 2: FAR on cached latents
# ----------------------------------------------------------------------------


def build_cache(run: RunConfig, cfg: FARConfig, vae: AutoencoderKL, out: Path, ctx: Context) -> LatentCache:
    path = out / "latents.safetensors"
    spec = DataSpec(run.data.source, cfg.img_size, run.data.hflip)
    source = fingerprint(vae, spec)
    if ctx.main and _cache_source(path) != source:
        cache = encode_dataset(vae.to(ctx.device), load_dataset(spec, "train"), flips=run.data.hflip, device=ctx.device)
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


def train_far(run: RunConfig, cfg: FARConfig, vae: AutoencoderKL, out: Path, ctx: Context, log: Log,
              resume: bool) -> Path:
    from training.checkpoint import save_checkpoint

    cache = build_cache(run, cfg, vae, out, ctx)
    _check_batches(run, len(cache), "latents")
    if cache.num_classes > cfg.num_classes:
        raise TrainingError(f"the data has {cache.num_classes} classes but model.num_classes = {cfg.num_classes}")
    scale = latent_scale(cache)
    cfg = cfg.replace(latent_scale=scale)
    torch.manual_seed(run.train.seed)
    model = FAR(cfg)
    if run.train.init:
        report = _init_from(model, Path(run.train.init))
        if ctx.main:
            print(f"[far] train.init: {report}", file=sys.stderr)
    vae = vae.cpu().eval()
    state_path = out / "train_state.pt"
    if not (resume and state_path.exists()):  # a resumed run logged its start already
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
        from safetensors import SafetensorError

        from training.files import write_failure

        info = {"step": step, "run": str(out), "config": run.to_dict()}
        try:
            save_checkpoint(ckpt_dir, _cpu_copy(ema), vae, extra_files={"train_info.json": json.dumps(info, indent=2)})
        except (OSError, SafetensorError) as e:  # save_checkpoint removed its temporary directory
            raise RunFileError(write_failure(ckpt_dir, e)) from None

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

    remedy = ("start over in a new --out" + (f", or start from the last exported weights with train.init={ckpt_dir}"
                                            if ckpt_dir.is_dir() else ""))
    stage = Stage("far", model, loss_fn, batch_fn, len(cache), run.train, state_path, remedy, export,
                  sample_grid, ema_teacher=cfg.head == "shortcut")
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
        src_head = _init_head_kind(model, path)
        if src_head == model.cfg.head:
            _load_into(model, sd, str(path / MODEL_FILE))
            return f"loaded all {len(sd)} tensors of {path}"
        back = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
        _load_into(model.backbone, back, f"{path / MODEL_FILE} (backbone)")
    except (CheckpointError, ConfigError) as e:
        raise TrainingError(f"train.init: {e}") from None
    own = model.head.state_dict()
    head = {k: sd[f"head.{k}"] for k, v in own.items() if f"head.{k}" in sd and sd[f"head.{k}"].shape == v.shape}
    model.head.load_state_dict(head, strict=False)
    fresh = sorted(set(own) - set(head))
    return (f"backbone ({len(back)} tensors) from {path}; {src_head} head -> {model.cfg.head} head: "
            f"{len(head)} tensors loaded, {len(fresh)} fresh ({', '.join(fresh)})")


def _init_head_kind(model: FAR, path: Path) -> str:
    """The head kind of the checkpoint directory `path` (the model's own when its config does not say)."""
    from training.checkpoint import CONFIG_FILE

    return FARConfig.load(path / CONFIG_FILE).head if (path / CONFIG_FILE).is_file() else model.cfg.head


def _cpu_copy(model: FAR) -> FAR:
    m = FAR(model.cfg)
    m.load_state_dict({k: v.detach().float().cpu() for k, v in model.state_dict().items()})
    return m.eval()


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------


MAX_DIFFUSION_STEPS = 100_000  # MAR trains with 1000; the head's schedule table is built on the host
RUN_OPTIONS = "run.json"  # run-time options of the CLI (threads), reused by --resume
RUN_FILES = ("config.toml", RUN_OPTIONS, "log.jsonl", "latents.safetensors", "train_state.pt", "vae/train_state.pt",
             "vae/vae.safetensors", "vae/done")  # the files a run writes


def is_run(out: Path) -> bool:
    """Whether `out` holds a training run (its resolved config.toml, written first)."""
    return (out / "config.toml").is_file()


def check_out(out: Path, resume: bool) -> None:
    """The run directory can be used: a directory (or nothing yet), not inside a checkpoint or engine
    directory; --resume needs a run there, a new run needs it empty or holding an unfinished start."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory: choose another --out")
    for d in [out.resolve(), *out.resolve().parents]:
        if (d / "manifest.json").is_file() or ((d / "config.json").is_file() and (d / "model.safetensors").is_file()):
            raise TrainingError(f"--out {out} is inside the checkpoint or engine directory {d}: choose a run "
                                f"directory elsewhere (e.g. runs/NAME)")
        if d.name in ("checkpoints", "engines") and (d.parent / "pyproject.toml").is_file():
            raise TrainingError(f"--out {out} is inside the project's shipped {d.name}/ folder: choose a run "
                                f"directory elsewhere (e.g. runs/NAME)")
    for name in RUN_FILES:  # a FIFO there would block the run's open(); a directory would fail late
        if (out / name).exists() and not (out / name).is_file():
            raise TrainingError(f"{out / name} is not a regular file (a directory, FIFO or device): remove it, "
                                f"or start over in a new --out")
    state_files = [p for p in (out / "train_state.pt", out / "vae" / "train_state.pt") if p.exists()]
    if resume and not is_run(out):
        raise TrainingError(f"--resume: {out} holds no run (no config.toml): check the --out path, or leave out "
                            f"--resume to start a new run there")
    if not resume and state_files:
        raise TrainingError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    if not resume and out.is_dir() and not is_run(out) and any(out.iterdir()):
        raise TrainingError(f"--out {out} is a directory that holds other files and no run: choose a new or "
                            f"empty directory")


def check_run(run: RunConfig, out: Path, resume: bool) -> tuple[FARConfig | DiTConfig, AutoencoderKL | None]:
    """Everything that can be checked before any work: the run directory, the data, the given VAE and
    init weights, the model's memory, and (with resume) that the saved states fit the config.
    Returns the model config (with vae.init's VAE config) and the given VAE, if any."""
    from training.checkpoint import build_model
    from training.data import class_folders, mnist_csv_path

    check_out(out, resume)
    cfg = run.far_config()
    if run.data.source == "mnist":
        mnist_csv_path()
        if cfg.img_size < 28:
            raise TrainingError(f"the mnist digits are 28x28: model.img_size must be >= 28, got {cfg.img_size} "
                                f"(or train on an ImageFolder with --data)")
        classes = 10
    else:
        classes = len(class_folders(Path(run.data.source)))
    if classes > cfg.num_classes:
        raise TrainingError(f"the data has {classes} classes but model.num_classes = {cfg.num_classes}: "
                            f"set model.num_classes={classes}")
    given = None
    if run.vae.init:
        given, vae_cfg = load_vae_file(Path(run.vae.init), cfg.vae)
        cfg = cfg.replace(vae=vae_cfg)
    if isinstance(cfg, FARConfig) and cfg.head == "mar" and cfg.diffusion_steps > MAX_DIFFUSION_STEPS:
        raise TrainingError(f"model.diffusion_steps {cfg.diffusion_steps} is beyond {MAX_DIFFUSION_STEPS} "
                            f"(MAR uses 1000): choose fewer")
    try:
        with torch.device("meta"):  # shapes only, no memory
            model, vae = build_model(cfg), AutoencoderKL(cfg.vae)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise TrainingError(f"the model dims cannot be built ({str(e).splitlines()[0]}): choose smaller ones") from None
    _check_memory(model, vae, run, cfg)
    if run.train.init:
        _check_init(model, Path(run.train.init))
    if resume:
        _check_saved(model, vae, run, out)
    return cfg, given


def _check_memory(model: FAR, vae: AutoencoderKL, run: RunConfig, cfg: FARConfig) -> None:
    """Weights, EMA, gradients and AdamW's two moments (5 fp32 copies) of both networks must fit."""
    n_far = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    n_vae = sum(t.numel() for t in [*vae.parameters(), *vae.buffers()])
    need = 4 * (5 * n_far + (n_vae if run.vae.init else 5 * n_vae))
    avail = _available_memory(run.device)
    if avail is not None and need > avail:
        raise TrainingError(f"the model ({n_far / 1e6:.0f}M FAR + {n_vae / 1e6:.0f}M VAE parameters) needs "
                            f"~{need / 1e9:.1f} GB to train (weights, EMA, optimizer), more than the "
                            f"{avail / 1e9:.1f} GB available: choose smaller model dims")


def _available_memory(device: str) -> int | None:
    """Bytes free for training: the GPU's free memory, or MemAvailable of /proc/meminfo (None: unknown)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _safetensors_shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from a safetensors file's header (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise TrainingError(f"{what}: {path} is missing or not a regular file")
    try:
        with safe_open(str(path), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"{what}: {path} is not a readable safetensors file ({e})") from None


def _check_init(model: FAR, path: Path) -> None:
    from training.checkpoint import MODEL_FILE

    if not path.is_dir():
        raise TrainingError(f"train.init: {path} is not a checkpoint directory (config.json + {MODEL_FILE} + "
                            f"vae.safetensors): give one, e.g. RUN/checkpoint")
    want, saved = model.state_dict(), _safetensors_shapes(path / MODEL_FILE, "train.init")
    if isinstance(model, FAR) and _init_head_kind(model, path) != model.cfg.head:  # another head: only the
        # backbone must match (_init_from)
        want = {k: v for k, v in want.items() if k.startswith("backbone.")}
        saved = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    diff = shape_differences(want, saved)
    if diff:
        raise TrainingError(f"train.init: {path / MODEL_FILE} does not match the model config ({diff}): set the "
                            f"model.* keys of the checkpoint's config.json, or drop train.init")


def _check_saved(model: FAR, vae: AutoencoderKL, run: RunConfig, out: Path) -> None:
    """--resume: the saved states load and have the config's shapes (a changed model dim is named here,
    not as a size-mismatch traceback after the VAE stage)."""
    redo = "resume with the run's own model settings (no model.* or --preset changes), or start a new run in another --out"
    checks = [(out / "train_state.pt", "far", model)]
    vdir = out / "vae"
    if not run.vae.init:
        if (vdir / "done").is_file() and (vdir / "vae.safetensors").is_file():
            diff = shape_differences(vae.state_dict(), _safetensors_shapes(vdir / "vae.safetensors", "the run's VAE"))
            if diff:
                raise TrainingError(f"{vdir / 'vae.safetensors'} has other dims than the config's VAE ({diff}): {redo}")
        else:
            checks.append((vdir / "train_state.pt", "vae", vae))
    for path, stage, module in checks:
        if path.exists():
            state = load_state(path, stage, "start over in a new --out", mmap=True)
            diff = shape_differences(module.state_dict(), state["model"])
            if diff:
                raise TrainingError(f"{path} was trained with other model dims ({diff}): {redo}")


def _check_batches(run: RunConfig, rows: int, what: str) -> None:
    """A batch larger than the data would silently be the whole data set (and may not fit in memory)."""
    stages = ((run.vae, "vae"), (run.train, "train")) if what == "images" else ((run.train, "train"),)
    for o, name in stages:
        if o.batch_size > rows:
            raise TrainingError(f"{name}.batch_size {o.batch_size} is larger than the {rows} training {what} "
                                f"of {run.data.source}: set {name}.batch_size={rows} or less")


def train(run: RunConfig, out: Path, resume: bool = False, options: dict[str, Any] | None = None) -> Path:
    """Both stages (or FAR alone on `vae.init`); returns the exported checkpoint directory.
    `options` (the CLI's run-time options, e.g. threads) are stored in RUN/run.json for --resume."""
    ctx = setup_context(run.device)
    try:
        if ctx.device.type == "cpu" and ctx.distributed and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // ctx.world))
        cfg, given_vae = check_run(run, out, resume)
        ctx.barrier()  # every rank checked the directory before rank 0 writes into it
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(out / "config.toml", dump_toml(run.to_dict()))
            if options is not None:
                write_text_atomic(out / RUN_OPTIONS, json.dumps(options, indent=2) + "\n")
        ctx.barrier()
        log = Log(out / "log.jsonl", ctx)
        t0 = time.time()
        vae = given_vae if given_vae is not None else train_vae(run, cfg, out, ctx, log, resume)
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
        print(f"note: the run used --threads {threads}; this machine has {cpus} CPUs: using {cpus}", file=sys.stderr)
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
    @click.option("--threads", type=int, default=None,
                  help="torch CPU threads per process (1 is robust on a busy machine); --resume reuses the first run's.")
    @click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. train.lr=3e-4.")
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
                    click.echo(f"resuming with --threads {options['threads']} (from {out_dir / RUN_OPTIONS})", err=True)
            set_threads(options.get("threads"), given=threads is not None)
            extra = list(sets) + list(overrides)
            for flag, key in ((steps, "train.steps"), (vae_steps, "vae.steps"), (data, "data.source"),
                              (vae_init, "vae.init"), (preset, "model.preset")):
                if flag is not None:
                    extra.append(f"{key}={json.dumps(flag)}")
            run = load_run_config(path, extra)
            t0 = time.time()
            ckpt = train(run, out_dir, resume, options)
        except (ConfigError, DataError, TrainingError, RunFileError) as e:
            raise click.ClickException(str(e)) from None
        except OSError as e:
            raise click.ClickException(f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")) from None
        except KeyboardInterrupt:
            click.echo(f"interrupted: the last checkpoint and resume state are in {out_dir} (continue with --resume)",
                       err=True)
            sys.exit(130)
        if int(os.environ.get("RANK", "0")) == 0:
            click.echo(f"checkpoint: {ckpt} ({time.time() - t0:.0f} s)")

    return main


if __name__ == "__main__":
    _cli()()

"""The run config: TOML sections -> frozen dataclasses, `section.key=value` overrides, and the
resolved config written back as TOML (RUN/config.toml)."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib  # novermin (3.11+; tomli below on 3.10)
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from runtime.files import read_regular
from training.config import (
    DIT_PRESETS,
    PRESETS,
    ConfigError,
    DiTConfig,
    FARConfig,
    checked_fields,
    model_config_from_dict,
)


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
        return {
            "device": self.device,
            "model": dict(self.model),
            "data": dataclasses.asdict(self.data),
            "vae": dataclasses.asdict(self.vae),
            "train": dataclasses.asdict(self.train),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """A checked run config: every key known, every value of its type and in its range
        (non-finite numbers nowhere), the model section a valid FARConfig."""
        d = dict(d)
        unknown = sorted(set(d) - {"device", "model", "data", "vae", "train"})
        if unknown:
            raise ConfigError(
                f"unknown config section(s): {', '.join(unknown)}; the sections are "
                "device, [model], [data], [vae], [train]"
            )
        _check_finite(d, "")
        model = d.get("model", {"preset": "mnist"})
        if not isinstance(model, dict):
            raise ConfigError(f"[model] must be a table (preset = ..., width = ...), got {model!r}")
        device = d.get("device", "auto")
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ConfigError(f'device must be "auto", "cpu", "cuda" or "cuda:N", got {device!r}')
        cfg = cls(
            model=dict(model),
            data=_section(DataConfig, d.get("data", {}), "data"),
            vae=_section(VAEStageConfig, d.get("vae", {}), "vae"),
            train=_section(FARStageConfig, d.get("train", {}), "train"),
            device=device,
        )
        if not cfg.data.source:
            raise ConfigError('data.source must be "mnist" or an ImageFolder directory, got an empty string')
        _check_stage(cfg.vae, "vae")
        _check_stage(cfg.train, "train")
        if cfg.vae.kl_weight < 0:
            raise ConfigError(f"vae.kl_weight must be >= 0, got {cfg.vae.kl_weight}")
        for key in ("sample_classes", "sample_per_class"):
            if not 1 <= getattr(cfg.train, key) <= MAX_SAMPLE_ROWS:
                raise ConfigError(
                    f"train.{key} must be in [1, {MAX_SAMPLE_ROWS}], got {getattr(cfg.train, key)}"
                )
        cfg.far_config()  # validates the model section
        return cfg


MAX_SAMPLE_ROWS = 100  # rows / columns of a sample grid
MAX_STEPS = (
    10**9
)  # steps, batch sizes and intervals of a stage: far above any real run (a mistyped 1e20 is refused)


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

    need(o.lr_schedule in ("constant", "cosine"), "lr_schedule", '"constant" or "cosine"')
    for key in ("steps", "batch_size", "log_every"):
        need(1 <= getattr(o, key) <= MAX_STEPS, key, f"an int in [1, {MAX_STEPS}]")
    for key in ("warmup_steps", "sample_every", "save_every", "check_sync_every"):
        never = " (0: never)" if key != "warmup_steps" else ""
        need(0 <= getattr(o, key) <= MAX_STEPS, key, f"an int in [0, {MAX_STEPS}]{never}")
    need(0 <= o.seed < 2**63, "seed", "an int in [0, 2**63)")
    need(o.lr >= 0, "lr", "a number >= 0")
    need(0 <= o.min_lr <= o.lr, "min_lr", f"in [0, lr = {o.lr}]")
    need(o.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(o.grad_clip >= 0, "grad_clip", "a number >= 0 (0: no clipping)")
    need(0 <= o.ema_decay < 1, "ema_decay", "in [0, 1)")
    need(
        len(o.betas) == 2
        and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in o.betas),
        "betas",
        "two numbers in [0, 1), e.g. [0.9, 0.95]",
    )


def _section(cls: type, d: Any, name: str) -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"[{name}] must be a table, got {d!r}")
    return cls(**checked_fields(cls, d, f"{name}.", list_keys=True))


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
            raw = tomllib.loads(read_regular(path, ConfigError, "give a TOML run config").decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start})"
            ) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML ({e})") from None
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} is a value, not a table")
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

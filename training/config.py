"""Model configuration: small frozen dataclasses, presets, and their JSON form.

A checkpoint directory stores `config.json` = `FARConfig.to_dict()`, so loading a
checkpoint needs no architecture flags: `FARConfig.from_dict(json.load(f))`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from runtime.errors import FarError, first_line, sampling_numbers
from runtime.files import directory, read_regular
from runtime.limits import MODEL_LIMITS
from runtime.schedule import CFG_SCHEDULES, check_head_steps

CONFIG_VERSION = 1


class ConfigError(FarError, ValueError):
    """An invalid model configuration (unknown key, impossible dims)."""


MAX_MLP_RATIO = 64.0  # MLP width / model width: real models use 4; larger would overflow the sizes


# ----------------------------------------------------------------------------
# VAE (LDM AutoencoderKL layout, MAR's KL-16 names)
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class VAEConfig:
    embed_dim: int = 16  # latent channels
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)  # encoder only (as LDM/MAR's KL-16)
    resolution: int = 256  # image side the attention resolutions refer to
    in_channels: int = 3
    out_ch: int = 3
    num_groups: int = 32

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        if min(self.embed_dim, self.ch, self.num_res_blocks, self.num_groups, self.resolution) < 1:
            raise ConfigError("vae: embed_dim, ch, num_res_blocks, num_groups and resolution must be >= 1")
        if (
            max(self.embed_dim, self.ch * max(self.ch_mult or (1,)), self.resolution) > 16384
            or self.num_res_blocks > 64
            or len(self.ch_mult) > 12
        ):
            raise ConfigError(
                "vae: dims larger than any VAE this code builds (channels, resolution <= 16384, "
                "num_res_blocks <= 64, at most 12 levels): fix config.json"
            )
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ConfigError("vae: ch_mult must be a non-empty tuple of positive ints")
        for mult in self.ch_mult:
            if (self.ch * mult) % self.num_groups:
                raise ConfigError(
                    f"vae: channels {self.ch * mult} not divisible by num_groups={self.num_groups}"
                )
        if self.resolution % self.stride:
            raise ConfigError(f"vae: resolution {self.resolution} not divisible by stride {self.stride}")


VAE_PRESETS: dict[str, VAEConfig] = {
    # MAR's KL-16 (66.5M parameters, 16x downsampling, 16 latent channels).
    "kl16": VAEConfig(),
    # A small VAE for 32x32 images: 8x downsampling to a 4x4 grid of 8 channels.
    "small32": VAEConfig(
        embed_dim=8, ch=32, ch_mult=(1, 2, 2, 4), num_res_blocks=1, attn_resolutions=(4,), resolution=32
    ),
    # Tests only.
    "tiny": VAEConfig(
        embed_dim=4,
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        resolution=16,
        num_groups=4,
    ),
}


# ----------------------------------------------------------------------------
# FAR: backbone + head + sampling defaults
# ----------------------------------------------------------------------------

BACKBONES = ("masked", "causal")
HEADS = ("shortcut", "mar")


class LatentModelConfig:
    """What FAR and DiT configs share: the latent token grid (what patchify and the VAE decoder step
    read), the JSON form, and the few facts that training and evaluation ask of either kind instead of
    testing which one they have."""

    kind: ClassVar[str]  # config.json's "kind" (FAR's config.json has none)
    img_size: int
    patch_size: int
    width: int
    num_heads: int
    vae: VAEConfig

    @property
    def grid(self) -> int:
        """Tokens per image side."""
        return self.img_size // self.vae.stride // self.patch_size

    @property
    def seq_len(self) -> int:
        return self.grid**2

    @property
    def token_dim(self) -> int:
        return self.vae.embed_dim * self.patch_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    def replace(self: _Config, **changes: Any) -> _Config:
        """A copy with `changes`, checked (each kind's `validate`)."""
        return dataclasses.replace(self, **changes).validate()

    def save(self, path: str | Path) -> None:
        """config.json: each kind's `to_dict`."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    # -- what differs between the kinds: each kind also has `summary` (the network in a few words),
    # `parts` ((backbone, head) as reports name them) and `sweep_steps` (the sampling step counts an
    # evaluation compares by default)
    @property
    def ema_teacher(self) -> bool:
        """Whether the training loss takes the EMA model as its teacher (the shortcut head's
        self-consistency targets)."""
        return False

    @property
    def no_decay_prefixes(self) -> tuple[str, ...]:
        """Parameter-name prefixes trained without weight decay (besides biases and 1-d parameters)."""
        return ()


_Config = TypeVar("_Config", bound=LatentModelConfig)


def _vae_from(value: Any) -> VAEConfig:
    """config.json's "vae": an object of VAEConfig keys or a preset name."""
    if isinstance(value, str):
        if value not in VAE_PRESETS:
            raise ConfigError(f"unknown vae preset {value!r}; choose from {', '.join(VAE_PRESETS)}")
        value = dataclasses.asdict(VAE_PRESETS[value])
    if not isinstance(value, dict):
        raise ConfigError(f"config key vae must be an object or a preset name, got {value!r}")
    return _build(VAEConfig, value, "vae.")


@dataclass(frozen=True)
class FARConfig(LatentModelConfig):
    backbone: str = "masked"  # "masked" (MAR-style, bidirectional) | "causal" (GPT-style, KV cache)
    head: str = "shortcut"  # "shortcut" (FAR) | "mar" (MAR's diffusion head)
    img_size: int = 256
    patch_size: int = 1  # latent patches per token side
    num_classes: int = 1000
    width: int = 768  # encoder_embed_dim == decoder_embed_dim
    enc_depth: int = 12
    dec_depth: int = 12  # masked only; the causal backbone uses enc_depth + dec_depth blocks
    num_heads: int = 12
    mlp_ratio: float = 4.0
    buffer_size: int = 64
    head_width: int = 1024
    head_depth: int = 6
    latent_scale: float = 0.2325  # VAE latents are multiplied by this before tokenisation
    # training
    class_dropout: float = 0.1
    attn_dropout: float = 0.1
    proj_dropout: float = 0.1
    mask_ratio_min: float = 0.7
    head_batch_mul: int = 4  # MAR's diffusion_batch_mul
    shortcut_levels: int = 8  # step sizes d = 2^-l for l in [0, levels): K = 1 .. 128
    bootstrap_fraction: float = 0.25  # share of each head batch trained on self-consistency
    teacher: str = "ema"  # "ema" | "online": weights that produce self-consistency targets
    diffusion_steps: int = 1000  # MAR head: training timesteps (cosine schedule)
    diffusion_clip_x0: float = 0.0  # MAR head sampling: clamp the predicted x0 to +-this (0: off, as MAR)
    # sampling defaults (all overridable at run time)
    num_iter: int = 64  # masked AR steps (the causal backbone takes one step per token)
    head_steps: int = 0  # K: shortcut Euler steps or MAR denoising steps; 0 = the head's default (4 / 100)
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    temperature: float = 1.0
    vae: VAEConfig = field(default_factory=VAEConfig)

    kind: ClassVar[str] = "far"

    # -- derived ---------------------------------------------------------------
    @property
    def depth(self) -> int:
        return self.enc_depth + self.dec_depth

    @property
    def resolved_head_steps(self) -> int:
        """The default K at sampling time: head_steps, or the head's own default when it is 0
        (4 Euler steps for the shortcut head, MAR's 100 denoising steps for the diffusion head)."""
        return self.head_steps or (4 if self.head == "shortcut" else 100)

    @property
    def num_ar_steps(self) -> int:
        return self.num_iter if self.backbone == "masked" else self.seq_len

    @property
    def summary(self) -> str:
        return f"{self.backbone} backbone + {self.head} head"

    @property
    def parts(self) -> tuple[str, str]:
        return self.backbone, self.head

    @property
    def sweep_steps(self) -> list[int]:
        return default_head_steps(self.head, self.shortcut_levels)

    @property
    def ema_teacher(self) -> bool:
        return self.head == "shortcut" and self.teacher == "ema"

    @property
    def no_decay_prefixes(self) -> tuple[str, ...]:
        return ("head.",) if self.head == "mar" else ()  # MAR exempts every diffusion-head parameter

    # -- checks and serialisation ---------------------------------------------
    def validate(self) -> FARConfig:
        self.vae.validate()
        for f in dataclasses.fields(
            self
        ):  # NaN or inf would pass the range checks below and sample black images
            v = getattr(self, f.name)
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(
                    f"{f.name} must be a finite number, got {v}: set it in config.json (e.g. {f.default})"
                )
        sampling_numbers(self.cfg, self.temperature, ConfigError)
        big = {
            k: getattr(self, k)
            for k in (
                "img_size",
                "width",
                "head_width",
                "num_classes",
                "buffer_size",
                "diffusion_steps",
                "enc_depth",
                "dec_depth",
                "head_depth",
                "num_iter",
            )
        }
        for k, v in big.items():
            if v > MODEL_LIMITS[k]:
                raise ConfigError(
                    f"{k} {v} is larger than any model this code builds (limit {MODEL_LIMITS[k]}): fix it"
                )
        if self.shortcut_levels > 16:
            raise ConfigError(f"shortcut_levels must be <= 16 (K up to 2^15), got {self.shortcut_levels}")
        if self.backbone not in BACKBONES:
            raise ConfigError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.head not in HEADS:
            raise ConfigError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ConfigError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {self.cfg_schedule!r}")
        if self.teacher not in ("ema", "online"):
            raise ConfigError(f"teacher must be 'ema' or 'online', got {self.teacher!r}")
        if min(self.width, self.enc_depth, self.num_heads, self.head_width, self.head_depth) < 1:
            raise ConfigError("width, depths, heads and head dims must be >= 1")
        if self.diffusion_clip_x0 < 0:
            raise ConfigError(f"diffusion_clip_x0 must be >= 0 (0: off), got {self.diffusion_clip_x0}")
        if (
            min(self.img_size, self.patch_size, self.head_batch_mul, self.diffusion_steps) < 1
            or self.dec_depth < 0
        ):
            raise ConfigError(
                "img_size, patch_size, head_batch_mul, diffusion_steps must be >= 1, dec_depth >= 0"
            )
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO or self.buffer_size < 0:
            raise ConfigError(f"mlp_ratio must be in (0, {MAX_MLP_RATIO}] and buffer_size >= 0")
        if self.img_size % (self.vae.stride * self.patch_size):
            raise ConfigError(
                f"img_size {self.img_size} not divisible by vae stride {self.vae.stride} "
                f"x patch {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ConfigError(f"width {self.width} not divisible by num_heads {self.num_heads}")
        if self.backbone == "masked" and (self.dec_depth < 1 or self.buffer_size < 1):
            raise ConfigError(
                "the masked backbone needs dec_depth >= 1 and buffer_size >= 1 (the class token's slots)"
            )
        if self.num_classes < 1:
            raise ConfigError("num_classes must be >= 1")
        if not 1 <= self.num_iter <= self.seq_len:
            raise ConfigError(f"num_iter must be in [1, seq_len={self.seq_len}], got {self.num_iter}")
        if self.shortcut_levels < 1 or self.head_steps < 0:
            raise ConfigError("shortcut_levels must be >= 1 and head_steps >= 0 (0: the head's default)")
        try:
            check_head_steps(self.head, self.resolved_head_steps, self.shortcut_levels, self.diffusion_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if not 0 <= self.attn_dropout < 1 or not 0 <= self.proj_dropout < 1:
            raise ConfigError("attn_dropout and proj_dropout must be in [0, 1)")
        if not 0 <= self.bootstrap_fraction < 1 or not 0 <= self.class_dropout < 1:
            raise ConfigError("bootstrap_fraction and class_dropout must be in [0, 1)")
        if not 0 < self.mask_ratio_min <= 1:
            raise ConfigError("mask_ratio_min must be in (0, 1]")
        if self.latent_scale <= 0 or self.temperature <= 0:
            raise ConfigError("latent_scale and temperature must be > 0")
        return self

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["config_version"] = CONFIG_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FARConfig:
        d = dict(d)
        version = d.pop("config_version", CONFIG_VERSION)
        if type(version) is not int:
            raise ConfigError(f"config_version must be an int, got {version!r}")
        if version > CONFIG_VERSION:
            raise ConfigError(
                f"config_version {version} is newer than this code ({CONFIG_VERSION}): upgrade far-export"
            )
        vae = _vae_from(d.pop("vae", {}))
        return cls(vae=vae, **checked_fields(cls, d, "")).validate()

    @classmethod
    def load(cls, path: str | Path) -> FARConfig:
        return cls.from_dict(_read_json_object(Path(path)))


def _read_json_object(path: Path) -> dict[str, Any]:
    data = read_regular(
        path, ConfigError, "a checkpoint directory holds config.json"
    )  # never blocks on a FIFO
    try:
        raw = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise ConfigError(f"{path} is not valid JSON ({first_line(e)}): restore it from the run") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return raw


def load_checkpoint_config(checkpoint_dir: str | Path, error: type[FarError] = ConfigError) -> ModelConfig:
    """The config.json of a checkpoint directory (FAR or DiT), checked (torch-free: the CLIs call it before
    importing torch)."""
    path = directory(
        checkpoint_dir,
        "checkpoint directory",
        error,
        "give a directory with config.json, model.safetensors and vae.safetensors",
    )
    try:
        return load_model_config(path / "config.json")
    except ConfigError as e:
        where = str(path / "config.json")
        raise error(str(e) if where in str(e) else f"{where}: {e}") from None


def checked_fields(cls: type, d: dict[str, Any], prefix: str, list_keys: bool = False) -> dict[str, Any]:
    """Keyword arguments for the dataclass `cls` from a JSON or TOML table: every key known (`list_keys`:
    the error lists the known ones), every value of its default's kind (lists become tuples, ints become
    floats where a float is expected, a bool is never an int). The one checker of config.json and of
    the training run config's sections."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        keys = f"; [{prefix.rstrip('.')}] keys are {', '.join(known)}" if list_keys else ""
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in unknown)}{keys}")
    out = {}
    for k, v in d.items():
        default = known[k].default
        if default is not dataclasses.MISSING:
            v = _as_kind(v, default)
            if not _same_kind(v, default):
                kind = "true or false" if isinstance(default, bool) else type(default).__name__
                raise ConfigError(f"config key {prefix}{k} must be {kind}, got {v!r}")
        out[k] = v
    return out


def _as_kind(v: Any, default: Any) -> Any:
    """JSON/TOML lists as tuples; an int where the default is a float as a float (JSON writes 2.0 as 2)."""
    if isinstance(v, list):
        v = tuple(v)
    if isinstance(default, tuple) and default and isinstance(v, tuple):
        return tuple(_as_kind(x, default[0]) for x in v)
    if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


def _same_kind(v: Any, default: Any) -> bool:
    """Whether a JSON value fits a field whose default is `default` (bool is not an int here)."""
    if isinstance(default, tuple):
        return (
            isinstance(v, tuple) and all(_same_kind(x, default[0]) for x in v)
            if default
            else isinstance(v, tuple)
        )
    return type(v) is type(default)


def _build(cls: type, d: dict[str, Any], prefix: str) -> Any:
    try:
        return cls(**checked_fields(cls, d, prefix))
    except TypeError as e:
        raise ConfigError(f"invalid {prefix.rstrip('.')} config: {e}") from None


# ----------------------------------------------------------------------------
# Presets
# ----------------------------------------------------------------------------

PRESETS: dict[str, FARConfig] = {
    # Tests: trains and exports in seconds.
    "tiny": FARConfig(
        img_size=16,
        num_classes=4,
        width=32,
        enc_depth=1,
        dec_depth=1,
        num_heads=2,
        buffer_size=2,
        head_width=32,
        head_depth=2,
        latent_scale=1.0,
        num_iter=4,
        head_steps=2,
        cfg=2.0,
        vae=VAE_PRESETS["tiny"],
    ),
    # The shipped MNIST model: 32x32 digits, 4x4 tokens of 8 channels; trains on 2 CPU cores.
    "mnist": FARConfig(
        img_size=32,
        num_classes=10,
        width=128,
        enc_depth=3,
        dec_depth=3,
        num_heads=4,
        buffer_size=4,
        head_width=128,
        head_depth=3,
        latent_scale=1.0,
        num_iter=8,
        head_steps=4,
        cfg=2.0,
        attn_dropout=0.0,
        proj_dropout=0.0,
        vae=VAE_PRESETS["small32"],
    ),
    # MAR-B/L/H dims on ImageNet 256 with KL-16 (256 tokens of 16 channels).
    "far-b": FARConfig(width=768, enc_depth=12, dec_depth=12, num_heads=12, head_width=1024, head_depth=6),
    "far-l": FARConfig(width=1024, enc_depth=16, dec_depth=16, num_heads=16, head_width=1280, head_depth=8),
    "far-h": FARConfig(width=1280, enc_depth=20, dec_depth=20, num_heads=16, head_width=1536, head_depth=12),
}


def preset(name: str, **changes: Any) -> FARConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name].replace(**changes)


# ----------------------------------------------------------------------------
# DiT: a diffusion transformer that denoises all tokens at once (the FAR paper's third system)
# ----------------------------------------------------------------------------

MODEL_KINDS = ("far", "dit")


@dataclass(frozen=True)
class DiTConfig(LatentModelConfig):
    """DiT (Peebles & Xie, arXiv 2212.09748) over the same latent tokens as FAR, trained with flow
    matching (t = 0 noise, t = 1 data, velocity = data - noise: the shortcut head's convention) and
    sampled with N Euler steps over the whole token grid. `config.json` says `"kind": "dit"`."""

    img_size: int = 256
    patch_size: int = 1  # latent patches per token side (as FARConfig: tokens are patchify()'s rows)
    num_classes: int = 1000
    width: int = 1152  # DiT's hidden_size
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    latent_scale: float = 0.2325
    class_dropout: float = 0.1  # training: share of labels replaced by the null class (CFG)
    # sampling defaults (overridable at run time)
    sample_steps: int = 32  # N Euler steps over the whole grid
    cfg: float = 1.0  # constant over the steps (no AR schedule to follow)
    temperature: float = 1.0
    vae: VAEConfig = field(default_factory=VAEConfig)

    kind: ClassVar[str] = "dit"

    @property
    def summary(self) -> str:
        return f"width {self.width} x {self.depth} blocks"

    @property
    def parts(self) -> tuple[str, str]:
        return "dit", "euler"

    @property
    def sweep_steps(self) -> list[int]:
        return list(DIT_STEPS)

    def validate(self) -> DiTConfig:
        self.vae.validate()
        if min(self.img_size, self.patch_size, self.num_classes, self.width, self.depth, self.num_heads) < 1:
            raise ConfigError("dit: img_size, patch_size, num_classes, width, depth, num_heads must be >= 1")
        if self.img_size % (self.vae.stride * self.patch_size):
            raise ConfigError(
                f"img_size {self.img_size} not divisible by vae stride {self.vae.stride} "
                f"x patch {self.patch_size}"
            )
        if self.width % self.num_heads or (self.width // self.num_heads) % 2 or self.width % 4:
            raise ConfigError(
                f"dit: width {self.width} must be divisible by 4 and by num_heads {self.num_heads}"
            )
        if not 0 < self.mlp_ratio <= MAX_MLP_RATIO:
            raise ConfigError(f"dit: mlp_ratio must be in (0, {MAX_MLP_RATIO}], got {self.mlp_ratio}")
        if self.latent_scale <= 0 or self.temperature <= 0:
            raise ConfigError("dit: latent_scale and temperature must be > 0")
        if not 0 <= self.class_dropout < 1:
            raise ConfigError("dit: class_dropout must be in [0, 1)")
        try:
            check_euler_steps(self.sample_steps)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "dit", **dataclasses.asdict(self), "config_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiTConfig:
        d = dict(d)
        if d.pop("kind", "dit") != "dit":
            raise ConfigError("DiTConfig.from_dict needs kind 'dit'")
        d.pop("config_version", None)
        vae = _vae_from(d.pop("vae", {}))
        return cls(vae=vae, **checked_fields(cls, d, "")).validate()


ModelConfig = FARConfig | DiTConfig  # what a checkpoint's config.json describes


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    """A checkpoint's config.json object: `"kind": "dit"` is a DiT, anything else (no kind) FAR."""
    kind = d.get("kind", "far")
    if kind not in MODEL_KINDS:
        raise ConfigError(f"config key kind must be one of {MODEL_KINDS}, got {kind!r}")
    if kind == "dit":
        return DiTConfig.from_dict(d)
    return FARConfig.from_dict({k: v for k, v in d.items() if k != "kind"})


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a config.json (FAR or DiT) with the same one-line errors as FARConfig.load."""
    return model_config_from_dict(_read_json_object(Path(path)))


DIT_STEPS = (4, 8, 16, 32, 64, 128, 250)  # the Euler step counts an evaluation of a DiT compares


def default_head_steps(head: str, levels: int) -> list[int]:
    """The head step counts an evaluation of FAR compares: every shortcut step size, or MAR's 25/50/100."""
    return [2**i for i in range(levels)] if head == "shortcut" else [25, 50, 100]


def check_euler_steps(steps: int) -> None:
    if not 1 <= steps <= 1000:
        raise ValueError(f"DiT sampling steps must be in [1, 1000], got {steps}")


DIT_PRESETS: dict[str, DiTConfig] = {
    # Tests.
    "dit-tiny": DiTConfig(
        img_size=16,
        num_classes=4,
        width=32,
        depth=2,
        num_heads=2,
        latent_scale=1.0,
        sample_steps=4,
        cfg=2.0,
        vae=VAE_PRESETS["tiny"],
    ),
    # MNIST: 5 blocks of width 128 = 1.57M parameters, the far-mnist backbone + head's 1.57M.
    "dit-mnist": DiTConfig(
        img_size=32,
        num_classes=10,
        width=128,
        depth=5,
        num_heads=4,
        latent_scale=1.0,
        sample_steps=32,
        cfg=2.0,
        vae=VAE_PRESETS["small32"],
    ),
    # DiT-B and DiT-XL dims on ImageNet 256 with KL-16: 256 tokens of 16 channels, as DiT-*/2 on SD's VAE.
    "dit-b": DiTConfig(width=768, depth=12, num_heads=12),
    "dit-xl": DiTConfig(width=1152, depth=28, num_heads=16),
}

"""MAR's released weights -> a checkpoint directory that `far-export build` and training/sample.py take.

MAR (LTH14/mar) saves `checkpoint-last.pth` = {"model", "model_ema", "optimizer", "epoch", "scaler",
"args": argparse.Namespace} and its VAE as `kl16.ckpt` = {"model": state dict}. The architecture is
read from the saved args where present and from the tensor shapes otherwise: MAR-B/L/H become the
far-b/l/h dims with head="mar", and other dims are taken from the shapes (the attention head count is
the one thing shapes do not tell: it comes from the size name, or from `num_heads`).

Files are opened with torch.load(weights_only=True) and only argparse.Namespace allowed
(training.checkpoint.read_mar_file).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from runtime.files import artifact_ancestor
from training.checkpoint import (
    CONFIG_FILE,
    CheckpointError,
    load_into,
    mar_model_state_dict,
    mar_to_far_state_dict,
    mar_vae_state_dict,
    read_mar_file,
    save_checkpoint,
)
from training.config import PRESETS, VAE_PRESETS, ConfigError, FARConfig, VAEConfig
from training.model import FAR
from training.vae import AutoencoderKL

IMPORT_INFO_FILE = "import_info.json"

# MAR's `--model` names -> our presets of the same dims.
MAR_SIZES = {"mar_base": "far-b", "mar_large": "far-l", "mar_huge": "far-h"}

# MAR's README evaluation commands (ImageNet 256x256, FID-50K 2.31 / 1.78 / 1.55): --num_iter 256
# --num_sampling_steps 100 --cfg_schedule linear --temperature 1.0, and a CFG scale per size.
MAR_README_SAMPLING = {
    size: {"cfg": cfg, "cfg_schedule": "linear", "temperature": 1.0, "num_iter": 256, "head_steps": 100}
    for size, cfg in (("mar_base", 2.9), ("mar_large", 3.0), ("mar_huge", 3.2))
}

# MAR's training args -> our config fields (training only; they matter when fine-tuning from the import).
_TRAINING_ARGS = {
    "label_drop_prob": "class_dropout",
    "attn_dropout": "attn_dropout",
    "proj_dropout": "proj_dropout",
    "mask_ratio_min": "mask_ratio_min",
    "diffusion_batch_mul": "head_batch_mul",
}


@dataclass(frozen=True)
class MARImportOptions:
    weights: str = "ema"  # "ema": the file's model_ema (what MAR evaluates), "online": its model
    num_heads: int | None = None  # attention heads, for dims that are not MAR-B/L/H
    # sampling defaults written to config.json (None: MAR's README values, else the saved args')
    cfg: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    num_iter: int | None = None
    head_steps: int | None = None
    force: bool = False  # replace an existing checkpoint directory at `out` (its weights, train_info.json)

    def check(self) -> MARImportOptions:
        if self.weights not in ("ema", "online"):
            raise ConfigError(f"weights must be 'ema' or 'online', got {self.weights!r}")
        if self.num_heads is not None and self.num_heads < 1:
            raise ConfigError(f"num_heads must be >= 1, got {self.num_heads}")
        return self

    @property
    def entry(self) -> str:
        return "model_ema" if self.weights == "ema" else "model"


@dataclass(frozen=True)
class MARImport:
    path: Path
    cfg: FARConfig
    size: str | None  # "mar_base" | "mar_large" | "mar_huge" | None (other dims)
    entry: str  # the file entry the weights came from

    def summary(self) -> str:
        c = self.cfg
        name = (
            f"{self.size} -> {MAR_SIZES[self.size]} dims"
            if self.size
            else f"width {c.width}, depth {c.enc_depth}+{c.dec_depth}"
        )
        return (
            f"wrote {self.path}: {name}, MAR head {c.head_width}x{c.head_depth}, '{self.entry}' weights; "
            f"sampling cfg {c.cfg:g} ({c.cfg_schedule}), num_iter {c.num_iter}, "
            f"{c.resolved_head_steps} denoising steps, temperature {c.temperature:g}"
        )


# ----------------------------------------------------------------------------
# Architecture from args and shapes
# ----------------------------------------------------------------------------


def _count(sd: dict[str, torch.Tensor], prefix: str) -> int:
    """Number of numbered sub-modules `prefix.N.` in a state dict."""
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


_MAR_KEYS = (
    "z_proj.weight",
    "encoder_pos_embed_learned",
    "diffusion_pos_embed_learned",
    "class_emb.weight",
    "encoder_blocks.0.mlp.fc1.weight",
    "diffloss.net.input_proj.weight",
    "diffloss.net.final_layer.linear.weight",
)


def infer_vae_config(sd: dict[str, torch.Tensor], what: str) -> VAEConfig:
    """The VAE preset whose tensor names and shapes are those of `sd` (LDM/MAR KL names)."""
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    for cfg in VAE_PRESETS.values():
        with torch.device("meta"):
            own = AutoencoderKL(cfg).state_dict()
        if shapes == {k: tuple(v.shape) for k, v in own.items()}:
            return cfg
    hint = "" if "encoder.conv_in.weight" in sd else " (no encoder.conv_in.weight: is this a VAE file?)"
    raise CheckpointError(
        f"{what}: the VAE weights match none of the known layouts "
        f"({', '.join(VAE_PRESETS)}){hint}; pass MAR's kl16.ckpt"
    )


def infer_mar_config(
    sd: dict[str, torch.Tensor],
    args: argparse.Namespace | None,
    vae: VAEConfig,
    opts: MARImportOptions,
    what: str,
) -> tuple[FARConfig, str | None]:
    """FARConfig (masked backbone, MAR head) for a MAR state dict in MAR's names, and MAR's size name."""
    missing = [k for k in _MAR_KEYS if k not in sd]
    if missing:
        raise CheckpointError(
            f"{what} is not a MAR model: no '{missing[0]}' "
            "(MAR's state dicts hold z_proj, encoder_blocks.*, decoder_blocks.*, diffloss.net.*)"
        )
    a = vars(args) if args is not None else {}
    width, token_dim = sd["z_proj.weight"].shape
    seq_len = sd["diffusion_pos_embed_learned"].shape[1]
    dims = {
        "width": width,
        "enc_depth": _count(sd, "encoder_blocks"),
        "dec_depth": _count(sd, "decoder_blocks"),
        "mlp_ratio": sd["encoder_blocks.0.mlp.fc1.weight"].shape[0] / width,
        "num_classes": sd["class_emb.weight"].shape[0],
        "buffer_size": sd["encoder_pos_embed_learned"].shape[1] - seq_len,
        "head_width": sd["diffloss.net.input_proj.weight"].shape[0],
        "head_depth": _count(sd, "diffloss.net.res_blocks"),
    }
    if sd["diffloss.net.final_layer.linear.weight"].shape[0] != 2 * token_dim:
        raise CheckpointError(
            f"{what}: diffloss.net.final_layer outputs "
            f"{sd['diffloss.net.final_layer.linear.weight'].shape[0]} channels, MAR's head "
            f"2 x {token_dim} (learned sigma); not a MAR diffusion head"
        )
    size = a.get("model")
    if size is not None and size not in MAR_SIZES and opts.num_heads is None:
        raise CheckpointError(
            f"{what}: unknown MAR model size args.model={size!r}; MAR's are "
            f"{', '.join(MAR_SIZES)} (pass --num-heads to import other dims)"
        )
    if size is None:  # no saved args: the size whose dims the shapes have
        size = next(
            (
                s
                for s, p in MAR_SIZES.items()
                if all(getattr(PRESETS[p], k) == dims[k] for k in ("width", "enc_depth", "dec_depth"))
            ),
            None,
        )
    size = size if size in MAR_SIZES else None
    if size:
        p = PRESETS[MAR_SIZES[size]]
        for k in ("width", "enc_depth", "dec_depth", "mlp_ratio"):
            if getattr(p, k) != dims[k]:
                raise CheckpointError(
                    f"{what}: args.model={size!r} has {k} {getattr(p, k)} but the weights "
                    f"have {dims[k]}; the file's args and weights disagree"
                )
        num_heads = p.num_heads
        if opts.num_heads not in (None, num_heads):
            raise CheckpointError(
                f"{what}: {size} has {num_heads} attention heads, not --num-heads {opts.num_heads}"
            )
    elif opts.num_heads is None:
        raise CheckpointError(
            f"{what}: width {width} with {dims['enc_depth']}+{dims['dec_depth']} blocks is not "
            "MAR-B/L/H; pass --num-heads (attention heads are not in the weights)"
        )
    else:
        num_heads = opts.num_heads
    # MAR's args, where saved, must agree with the shapes
    checks = {
        "diffloss_w": dims["head_width"],
        "diffloss_d": dims["head_depth"],
        "class_num": dims["num_classes"],
        "buffer_size": dims["buffer_size"],
        "vae_embed_dim": vae.embed_dim,
        "vae_stride": vae.stride,
    }
    for k, have in checks.items():
        if k in a and a[k] != have:
            raise CheckpointError(f"{what}: args.{k} = {a[k]!r} but the weights/VAE have {have}")
    saved = {k: _saved_int(k, a[k]) for k in ("patch_size", "img_size") if a.get(k) is not None}
    patch = saved.get("patch_size") or round((token_dim / vae.embed_dim) ** 0.5)
    if vae.embed_dim * patch**2 != token_dim:
        raise CheckpointError(
            f"{what}: tokens of {token_dim} channels do not fit the VAE's {vae.embed_dim} "
            f"latent channels x patch {patch}^2; is this the VAE the model was trained with?"
        )
    grid = round(seq_len**0.5)
    img_size = saved.get("img_size") or grid * vae.stride * patch
    if grid**2 != seq_len or img_size != grid * vae.stride * patch:
        raise CheckpointError(
            f"{what}: {seq_len} tokens do not match img_size {img_size} / (vae stride "
            f"{vae.stride} x patch {patch})"
        )
    training = {ours: a[theirs] for theirs, ours in _TRAINING_ARGS.items() if theirs in a}
    sampling = _sampling_defaults(size, a, opts)
    try:
        cfg = FARConfig(
            backbone="masked",
            head="mar",
            img_size=img_size,
            patch_size=patch,
            num_heads=num_heads,
            vae=vae,
            **dims,
            **training,
        ).replace(**sampling)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{what}: {e}") from None
    return cfg, size


def _saved_int(name: str, value: Any) -> int:
    """An integer MAR saved as an int or a decimal string ("100"); anything else is a CheckpointError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, str))
        or not re.fullmatch(r"\d{1,9}", str(value))
    ):
        raise CheckpointError(
            f"the checkpoint's saved args have {name} = {value!r}: not a whole number; "
            f"pass the value with its flag (e.g. --head-steps 100)"
        )
    return int(value)


def _sampling_defaults(size: str | None, a: dict[str, Any], opts: MARImportOptions) -> dict[str, Any]:
    """MAR's README values for MAR-B/L/H, else the saved args' (MAR's flags of the same names), then the
    caller's overrides."""
    if size:
        out: dict[str, Any] = dict(MAR_README_SAMPLING[size])
    else:
        out = {k: a[k] for k in ("cfg", "cfg_schedule", "temperature", "num_iter") if k in a}
        if "num_sampling_steps" in a:
            out["head_steps"] = _saved_int("num_sampling_steps", a["num_sampling_steps"])  # a string ("100")
    for k in ("cfg", "cfg_schedule", "temperature", "num_iter", "head_steps"):
        if getattr(opts, k) is not None:
            out[k] = getattr(opts, k)
    if "cfg" in out:
        out["cfg"] = float(out["cfg"])
    if "temperature" in out:
        out["temperature"] = float(out["temperature"])
    return out


# ----------------------------------------------------------------------------
# The command's library function
# ----------------------------------------------------------------------------


def import_mar(
    model_path: str | Path, vae_path: str | Path, out: str | Path, opts: MARImportOptions | None = None
) -> MARImport:
    """Read MAR's checkpoint and kl16.ckpt, infer the config, write `out` atomically."""
    opts = (opts or MARImportOptions()).check()
    out = Path(out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG_FILE).is_file())):
        raise CheckpointError(f"{out} exists and is not a checkpoint directory; choose another --out")
    if out.is_dir() and (out / CONFIG_FILE).is_file() and not opts.force:
        raise CheckpointError(
            f"--out {out} is an existing checkpoint: importing would replace its weights; "
            f"choose another --out or pass --force to replace it"
        )
    found = artifact_ancestor(out.resolve().parent)
    if found:
        raise CheckpointError(
            f"--out {out} is inside the {found[0]} directory {found[1]}: a rebuild would delete it; "
            f"write outside it"
        )
    obj = read_mar_file(model_path)
    if "model" not in obj and "model_ema" not in obj:
        raise CheckpointError(
            f"{model_path} is not a MAR checkpoint: no 'model' or 'model_ema' entry (found: "
            f"{', '.join(map(str, sorted(obj, key=str))) or 'nothing'})"
        )
    if opts.entry not in obj or obj[opts.entry] is None:
        other = "--online" if opts.weights == "ema" else "the default (EMA)"
        raise CheckpointError(
            f"{model_path} has no '{opts.entry}' weights; pass {other} to import the others"
        )
    sd = mar_model_state_dict(obj, model_path, opts.entry)
    args = obj.get("args")
    if args is not None and not isinstance(args, argparse.Namespace):
        raise CheckpointError(
            f"{model_path}: 'args' is a {type(args).__name__}, not MAR's argparse.Namespace"
        )
    vae_sd = mar_vae_state_dict(read_mar_file(vae_path), vae_path)
    vae_cfg = infer_vae_config(vae_sd, str(vae_path))
    cfg, size = infer_mar_config(sd, args, vae_cfg, opts, f"{model_path} ['{opts.entry}']")
    model, vae = FAR(cfg), AutoencoderKL(vae_cfg)
    load_into(model, mar_to_far_state_dict(sd), f"{model_path} ['{opts.entry}']")
    load_into(vae, vae_sd, str(vae_path))
    info = {
        "source": str(Path(model_path).resolve()),
        "weights": opts.entry,
        "vae": str(Path(vae_path).resolve()),
        "mar_size": size,
        "mar_args": {
            k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
            for k, v in sorted(vars(args).items())
        }
        if args is not None
        else None,
        "sampling_from": "MAR README" if size else ("saved args" if args is not None else "defaults"),
    }
    path = save_checkpoint(
        out, model.eval(), vae.eval(), extra_files={IMPORT_INFO_FILE: json.dumps(info, indent=2)}
    )
    return MARImport(path, cfg, size, opts.entry)

"""Checkpoint directories (config.json + model.safetensors + vae.safetensors) and MAR's files.

Weights are never unpickled: our own files are safetensors, and MAR's `.pth`/`.ckpt`
files are opened with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError as SafetensorsError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from runtime.errors import FarError, first_line
from runtime.files import atomic_path, regular_file
from training.config import DiTConfig, FARConfig, ModelConfig, load_checkpoint_config
from training.dit import DiT
from training.model import FAR
from training.vae import AutoencoderKL

CONFIG_FILE, MODEL_FILE, VAE_FILE = "config.json", "model.safetensors", "vae.safetensors"


class CheckpointError(FarError, RuntimeError):
    """A missing, corrupt or mismatched checkpoint file."""


@dataclass
class Checkpoint:
    cfg: ModelConfig
    model: FAR | DiT
    vae: AutoencoderKL
    path: Path | None = None


def save_checkpoint(
    path: str | Path, model: FAR | DiT, vae: AutoencoderKL, extra_files: dict[str, str] | None = None
) -> Path:
    """Write a checkpoint directory atomically: into a temporary sibling, then rename over `path`
    (a failed write leaves the old directory and no temporary one: a WriteError)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, errors=(SafetensorsError,)) as tmp:
        tmp.mkdir()
        model.cfg.save(tmp / CONFIG_FILE)
        save_file(_contiguous(model.state_dict()), str(tmp / MODEL_FILE))
        save_file(_contiguous(vae.state_dict()), str(tmp / VAE_FILE))
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return path


def save_tensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> Path:
    """One safetensors file, written atomically with the usual permissions (a failed write: a WriteError)."""
    with atomic_path(path, errors=(SafetensorsError,)) as tmp:
        save_file(_contiguous(tensors), str(tmp), metadata=metadata)
    return path


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a missing, unreadable or corrupt file: one CheckpointError line."""
    regular_file(
        path, CheckpointError, f"a checkpoint directory holds {CONFIG_FILE}, {MODEL_FILE}, {VAE_FILE}"
    )
    try:
        return load_file(str(path))
    except PermissionError:
        raise CheckpointError(
            f"{path} cannot be read (permission denied): fix its permissions (chmod u+r)"
        ) from None
    except (SafetensorsError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({first_line(e)}); re-export or re-download it"
        ) from None


def stored_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, without reading the weights."""
    regular_file(
        path, CheckpointError, f"a checkpoint directory holds {CONFIG_FILE}, {MODEL_FILE}, {VAE_FILE}"
    )
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorsError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({first_line(e)}); re-export or re-download it"
        ) from None


def _check_shapes(cfg: ModelConfig, path: Path) -> None:
    """The config must describe the stored weights before any memory is allocated for it: a config.json with
    huge dims would otherwise exhaust memory building the model (the model is built on the meta device
    here)."""
    with torch.device("meta"):
        own = {"model": build_model(cfg).state_dict(), "vae": AutoencoderKL(cfg.vae).state_dict()}
    for what, file in (("model", MODEL_FILE), ("vae", VAE_FILE)):
        stored = stored_shapes(path / file)
        expected = {k: tuple(v.shape) for k, v in own[what].items()}
        if stored != expected:
            _mismatch(str(path / file), expected, stored)


def _mismatch(what: str, own: dict[str, tuple[int, ...]], stored: dict[str, tuple[int, ...]]) -> None:
    missing = sorted(set(own) - set(stored))
    unexpected = sorted(set(stored) - set(own))
    wrong = sorted(k for k in set(own) & set(stored) if own[k] != stored[k])
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {keys[0]})")
        raise CheckpointError(f"{what} does not match its config: {', '.join(parts)}")


def load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], what: str) -> None:
    """`sd` into `module`; other names or shapes, integer weights where floats belong (load_state_dict would
    cast them silently) and NaN/Inf weights (a diverged run) are one CheckpointError line about `what`."""
    own = module.state_dict()
    _mismatch(what, {k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()})
    for k, v in sd.items():
        if own[k].is_floating_point() and not v.is_floating_point():
            raise CheckpointError(f"{what}: {k} is {v.dtype}, not a float tensor: re-export the checkpoint")
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise CheckpointError(
                f"{what}: {k} holds NaN or Inf (a diverged run?): retrain, or use an earlier checkpoint"
            )
    module.load_state_dict(sd)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a checkpoint directory; the config inside fully describes the model."""
    cfg = load_checkpoint_config(path, CheckpointError)
    path = Path(path)
    _check_shapes(cfg, path)
    model, vae = build_model(cfg), AutoencoderKL(cfg.vae)
    load_into(model, load_safetensors(path / MODEL_FILE), str(path / MODEL_FILE))
    load_into(vae, load_safetensors(path / VAE_FILE), str(path / VAE_FILE))
    return Checkpoint(cfg, model.to(device).eval(), vae.to(device).eval(), path)


def build_model(cfg: ModelConfig) -> FAR | DiT:
    """The network a config describes: a DiT for a DiTConfig, else FAR."""
    return DiT(cfg) if isinstance(cfg, DiTConfig) else FAR(cfg)


def checkpoint_sha256(path: str | Path) -> str:
    """One digest over the checkpoint's config and weights (what an engine directory was built from)."""
    h = hashlib.sha256()
    for name in (CONFIG_FILE, MODEL_FILE, VAE_FILE):
        h.update(name.encode())
        with open(regular_file(Path(path) / name, CheckpointError), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------
# MAR's official files
# ----------------------------------------------------------------------------


INFLATION_SLACK = 16 * 2**20  # bytes a torch.save archive may hold beyond its file size


def _check_inflation(path: Path) -> None:
    """torch.save writes a zip archive whose members are stored, not compressed: members that would
    inflate well beyond the file (a crafted, deflated data.pkl) are refused before torch reads any."""
    if not zipfile.is_zipfile(path):
        return  # the legacy format: a plain pickle stream, as large as the file
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as z:
            total = sum(i.file_size for i in z.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is a damaged archive ({e}): download it again") from None
    if total > size + INFLATION_SLACK:
        raise CheckpointError(
            f"{path} would inflate to {total / 1e9:.2f} GB from {size / 1e6:.1f} MB: not a file torch.save "
            "wrote (its archives are not compressed); refusing to read it"
        )


def read_mar_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    path = regular_file(path, CheckpointError)  # a directory or a FIFO named as such
    _check_inflation(path)
    try:
        # MAR's main_mar.py saves its argparse.Namespace beside the weights: a plain attribute bag,
        # whose values still pass the weights-only unpickler's checks.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(
            f"{path} could not be loaded safely (weights_only=True): {load_reason(e)}"
        ) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a dict")
    return obj


def load_reason(e: Exception) -> str:
    """The informative line of torch.load's (multi-line, ANSI-coloured) error."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", ln).strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln] or [type(e).__name__]
    for ln in lines:  # the unpickler's own reason ("Unsupported operand 120"), not torch's advice
        if "Unsupported" in ln:
            return ln.split(". Please use")[0].removeprefix("WeightsUnpickler error: ")
    if lines[0].startswith("Weights only load failed"):
        return "not a file torch.save wrote (damaged or foreign)"
    return lines[0]


def _tensors(sd: object, what: str) -> dict[str, torch.Tensor]:
    """`sd` if it is a state dict (names -> tensors), else a one-line CheckpointError."""
    if not isinstance(sd, dict) or not sd:
        raise CheckpointError(f"{what} holds no state dict (got {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{what} is not a state dict: entry {bad[0]!r} is not a named tensor")
    return sd


def mar_to_far_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """MAR's flat names -> ours: `diffloss.net.*` -> `head.net.*`, everything else -> `backbone.*`."""
    out = {}
    for k, v in sd.items():
        if k.startswith("diffloss."):
            if k.startswith("diffloss.net."):
                out["head." + k[len("diffloss.") :]] = v
            # MAR's diffloss also stores no other tensors we need
        else:
            out["backbone." + k] = v
    return out


def mar_model_state_dict(obj: dict, path: str | Path, key: str = "model_ema") -> dict[str, torch.Tensor]:
    """The `key` entry ("model_ema" or "model") of a loaded MAR checkpoint, in MAR's flat names."""
    if key not in obj:
        raise CheckpointError(
            f"{path} has no '{key}' entry (found: {', '.join(map(str, sorted(obj, key=str)))})"
        )
    return _tensors(obj[key], f"{path} ['{key}']")


def load_mar_model(path: str | Path, cfg: FARConfig, key: str = "model_ema") -> FAR:
    """MAR's `checkpoint-last.pth` ({"model", "model_ema", ...}) into a FAR with a MAR head."""
    if cfg.head != "mar" or cfg.backbone != "masked":
        raise CheckpointError("MAR checkpoints need a config with backbone='masked' and head='mar'")
    sd = mar_model_state_dict(read_mar_file(path), path, key)
    model = FAR(cfg)
    load_into(model, mar_to_far_state_dict(sd), str(path))
    return model


def mar_vae_state_dict(obj: dict, path: str | Path) -> dict[str, torch.Tensor]:
    """The VAE weights of a loaded `kl16.ckpt` ({"model": state dict}; LDM's {"state_dict": ...} too),
    without LDM's loss/discriminator tensors."""
    entry = "model" if "model" in obj else "state_dict" if "state_dict" in obj else None
    sd = _tensors(obj[entry] if entry else obj, f"{path}" + (f" ['{entry}']" if entry else ""))
    return {k: v for k, v in sd.items() if not k.startswith("loss.")}


def load_mar_vae(path: str | Path, vae: AutoencoderKL) -> AutoencoderKL:
    """MAR's `kl16.ckpt` into `vae`; loss/discriminator keys are ignored."""
    load_into(vae, mar_vae_state_dict(read_mar_file(path), path), str(path))
    return vae

"""Shared fixtures: tiny, deterministic models and checkpoint directories.

`tiny_model(...)` and the `tiny_checkpoint` fixture give a FAR of the "tiny" preset
whose weights are randomised (including the AdaLN-zero layers, which are zero at
init and would make every head output 0), so that tests comparing two code paths
compare real, non-trivial numbers.

    def test_x(tiny_checkpoint, tmp_path):
        ckpt_dir = tiny_checkpoint(tmp_path / "ckpt", backbone="causal", head="mar")
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from training.checkpoint import save_checkpoint
from training.config import FARConfig, preset
from training.model import FAR
from training.vae import AutoencoderKL


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add N(0, std^2) noise to every parameter (deterministic for a seed), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)
    return module


def tiny_config(backbone: str = "masked", head: str = "shortcut", **changes: Any) -> FARConfig:
    return preset("tiny", backbone=backbone, head=head, **changes)


def tiny_model(
    backbone: str = "masked", head: str = "shortcut", seed: int = 0, **changes: Any
) -> tuple[FAR, AutoencoderKL]:
    """A tiny FAR and its VAE in eval mode, randomly initialised from `seed`."""
    cfg = tiny_config(backbone, head, **changes)
    torch.manual_seed(seed)
    model, vae = FAR(cfg), AutoencoderKL(cfg.vae)
    randomize_(model, seed)
    randomize_(vae, seed + 1)
    return model.eval(), vae.eval()


def make_tiny_checkpoint(
    path: str | Path, backbone: str = "masked", head: str = "shortcut", seed: int = 0, **changes: Any
) -> Path:
    """Write a tiny checkpoint directory (config.json + model.safetensors + vae.safetensors) at `path`.
    Like save_checkpoint, it replaces `path` whole: give it a fresh sub-directory, not tmp_path itself."""
    model, vae = tiny_model(backbone, head, seed, **changes)
    return save_checkpoint(path, model, vae)


def to_mar_names(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our FAR state dict -> MAR's flat names (backbone at top level, head under diffloss.net)."""
    out = {}
    for k, v in sd.items():
        if k.startswith("backbone."):
            out[k[len("backbone.") :]] = v.clone()
        else:
            assert k.startswith("head.net.")
            out["diffloss." + k[len("head.") :]] = v.clone()
    return out


@pytest.fixture
def one_thread() -> Any:
    """Tiny models run faster on one torch thread, and stay robust on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_checkpoint() -> Callable[..., Path]:
    """Factory:
    `tiny_checkpoint(dir, backbone="masked", head="shortcut", seed=0, **config_changes) -> dir`."""
    return make_tiny_checkpoint

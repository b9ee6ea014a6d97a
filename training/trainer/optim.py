"""Optimisation helpers: AdamW parameter groups, the learning-rate schedule, the EMA update."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from training.config import LatentModelConfig
from training.trainer.run_config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """MAR's add_weight_decay (util/misc.py): no decay on biases, 1-d parameters (norms) and MAR's
    diffusion head (MAR exempts every `diffloss` parameter); decay elsewhere.

    The shortcut head keeps decay on its matrices: MAR's exemption is a choice for its own head, not a
    property of AdaLN MLPs."""
    cfg = getattr(model, "cfg", None)  # FAR's or DiT's config; the VAE has no exemptions
    exempt_prefixes = cfg.no_decay_prefixes if isinstance(cfg, LatentModelConfig) else ()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or name.startswith(exempt_prefixes)
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

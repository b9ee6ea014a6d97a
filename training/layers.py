"""Normalisation layers with fp32 statistics.

In an fp16 graph the mean/variance of a LayerNorm or GroupNorm overflow long before
the activations do. These subclasses compute the statistics in fp32 and cast back,
so `model.half()` exports an fp16 graph with fp32 islands exactly where needed.
In fp32 they are the plain torch layers (same parameter names, same numbers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def softmax32(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax computed in fp32, returned in the input's dtype."""
    return torch.softmax(x.float(), dim=dim).to(x.dtype)

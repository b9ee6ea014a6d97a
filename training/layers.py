"""Normalisation layers with fp32 statistics, and a GELU that exports in a form ONNX Runtime fuses.

In an fp16 graph the mean/variance of a LayerNorm or GroupNorm overflow long before
the activations do. These subclasses compute the statistics in fp32 and cast back,
so `model.half()` exports an fp16 graph with fp32 islands exactly where needed.
In fp32 they are the plain torch layers (same parameter names, same numbers).
"""

from __future__ import annotations

import math

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


class GELU(nn.GELU):
    """Exact GELU. Exported, it is written x * (1 + erf(x / sqrt 2)) * 0.5: the exporter's own
    0.5 * (1 + erf) * x is a pattern ONNX Runtime's GeluFusion does not match, which left five
    elementwise passes (Div, Erf, Add, Mul, Mul; ~12% of the far-mnist backbone on CPU) where one
    fused Gelu runs. TensorRT fuses either form. Eager PyTorch keeps its one-kernel F.gelu."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if exporting():
            return x * (1.0 + torch.erf(x / math.sqrt(2.0))) * 0.5
        return F.gelu(x)


def exporting() -> bool:
    """True while torch.onnx.export traces: a layer may then write the form the graph runtimes fuse."""
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.6
    return bool(is_exporting and is_exporting())

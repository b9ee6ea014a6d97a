"""DiT (Peebles & Xie, arXiv 2212.09748; facebookresearch/DiT `models.py`) over FAR's latent tokens.

The FAR paper's third system: a transformer that denoises all tokens of an image at
once, N times, instead of FAR's autoregressive steps with a small per-token head.
Same latent tokens as FAR (`training.model.patchify` of the scaled VAE latents), so
a DiT and a FAR trained on one latent cache decode through the same VAE step.

DiT's layers, by their names: `x_embedder` (its PatchEmbed: a conv with kernel =
stride = p over the latent is a linear over the patchified tokens), fixed 2-d sin-cos
`pos_embed`, `t_embedder`, `y_embedder` (a null class for CFG, label dropout when
training), `blocks` with adaLN-Zero, `final_layer`. Two changes from DiT, both the
project's conventions: flow matching instead of DDPM (x_t = (1 - t) * noise + t * data,
velocity = data - noise, t = 0 is noise; the shortcut head's convention), so there is
no learned sigma; and CFG mixes every channel (DiT's `forward_with_cfg` guides only
the first 3 of its 4 channels, a quirk of its released code).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from training.backbones import Attention, Mlp
from training.config import DiTConfig
from training.heads import FinalLayer, TimestepEmbedder, modulate
from training.layers import LayerNorm


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """DiT's (MAE's) fixed 2-d sin-cos embedding (grid * grid, dim) for raster-ordered tokens: the first
    half encodes the column, the second half the row (DiT's meshgrid order)."""

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
    return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, D); label `num_classes` is the null class (CFG's unconditional rows)."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """adaLN-Zero: shift/scale before attention and MLP, gates after; all six start at zero."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, 0.0, 0.0)
        self.norm2 = LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), 0.0)
        self.mlp.act = nn.GELU(approximate="tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), c (B, 1, D)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), 0.0)
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        D, C = cfg.width, cfg.token_dim
        self.x_embedder = nn.Linear(C, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D)
        pos = torch.from_numpy(sincos_pos_embed(D, cfg.grid)).float()[None]
        self.register_buffer("pos_embed", pos, persistent=False)  # fixed: recomputed, not stored
        self.blocks = nn.ModuleList(DiTBlock(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, C)
        self._init_weights()

    def _init_weights(self) -> None:
        """DiT's initialize_weights."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for lin in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) tokens at flow time t (B,) in [0, 1]; labels (B,) (num_classes: null)
        -> v (B, L, C)."""
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        c = (self.t_embedder(t * 1000.0) + self.y_embedder(labels))[:, None]  # (B, 1, D)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c)

    def loss(self, x1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Flow matching on data tokens x1 (B, L, C): t ~ U[0, 1) per image, labels dropped to the null
        class with probability class_dropout."""
        B = x1.shape[0]
        drop = torch.rand(B, device=x1.device) < self.cfg.class_dropout
        labels = torch.where(drop, torch.full_like(labels, self.cfg.num_classes), labels)
        t = torch.rand(B, device=x1.device)
        x0 = torch.randn_like(x1)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1
        v = self.velocity(x_t, t, labels)
        return ((v.float() - (x1 - x0)) ** 2).mean()

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        d: torch.Tensor,
        labels: torch.Tensor,
        cfg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One Euler step over all tokens: x (B, L, C), t and d (1,), labels (B,) -> x + d * v.
        With cfg (1,) the network runs on [x; x] with [labels; null] and mixes v_u + cfg * (v_c - v_u).
        The network runs in its weights' dtype; t, the CFG mix and the update stay in x's dtype."""
        dtype = self.x_embedder.weight.dtype
        B = x.shape[0]
        if cfg is not None:
            xx = torch.cat([x, x])
            labels = torch.cat([labels, torch.full_like(labels, self.cfg.num_classes)])
        else:
            xx = x
        v = self.velocity(xx.to(dtype), t.float().expand(xx.shape[0]), labels).to(x.dtype)
        if cfg is not None:
            v_cond, v_uncond = v[:B], v[B:]
            v = v_uncond + cfg.to(v.dtype) * (v_cond - v_uncond)
        return x + d.to(x.dtype) * v


class DiTStep(nn.Module):
    """The exported denoiser graph: x (B, L, C), t (1,), d (1,), labels (B,) int64, cfg (1,) -> next x."""

    def __init__(self, model: DiT, cfg_guidance: bool):
        super().__init__()
        self.model, self.guided = model, cfg_guidance

    def forward(self, x, t, d, labels, cfg=None):
        return self.model.step(x.float(), t, d, labels, cfg if self.guided else None).float()

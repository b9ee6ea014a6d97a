"""FAR = backbone + head (+ the VAE, kept apart): the training loss and the sampling steps.

The three `*Step` modules are exactly what the exported graphs compute, and the
reference sampler (`training/sample.py`) calls the same modules, so "the graph
equals PyTorch" and "the runtime equals the reference" test the same functions.
Graph inputs and outputs are fp32 (int64 for indices) whatever the precision
inside, except the causal KV cache, which stays in the model's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from training.backbones import CausalBackbone, MaskedBackbone, build_backbone
from training.config import FARConfig
from training.heads import DiffusionHead, ShortcutHead, build_head
from training.vae import AutoencoderKL, VAEDecodeToImage


class FAR(nn.Module):
    def __init__(self, cfg: FARConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.backbone = build_backbone(cfg)
        self.head = build_head(cfg)

    # -- training ---------------------------------------------------------------
    def random_mask(self, batch: int, device: torch.device) -> torch.Tensor:
        """MAR's training mask (B, L), 1 = unknown: a random order per image, and one mask ratio per
        batch from a normal(1, 0.25) truncated to [mask_ratio_min, 1]."""
        L = self.cfg.seq_len
        while True:
            ratio = 1.0 - abs(torch.randn(()).item()) * 0.25
            if ratio >= self.cfg.mask_ratio_min:
                break
        num_masked = math.ceil(L * ratio)
        order = torch.rand(batch, L, device=device).argsort(dim=1)
        ranks = order.argsort(dim=1)  # rank of each position in its image's order
        return (ranks < num_masked).float()

    def loss(
        self, tokens: torch.Tensor, labels: torch.Tensor, teacher: nn.Module | None = None
    ) -> torch.Tensor:
        """tokens (B, L, C) scaled latents; labels (B,). Teacher: a head producing the shortcut's
        self-consistency targets (the EMA head, or None for the online weights)."""
        cfg = self.cfg
        B, L, C = tokens.shape
        drop = torch.rand(B, device=tokens.device) < cfg.class_dropout
        class_vec = self.backbone.class_vector(labels, drop)
        if isinstance(self.backbone, MaskedBackbone):
            weight = self.random_mask(B, tokens.device)
            z = self.backbone(tokens, weight, class_vec)
        else:
            weight = torch.ones(B, L, device=tokens.device)
            z = self.backbone(tokens, class_vec)
        # MAR's diffusion_batch_mul: every token's head loss is drawn head_batch_mul times
        mul = cfg.head_batch_mul
        target = tokens.reshape(B * L, C).repeat(mul, 1)
        z = z.reshape(B * L, -1).repeat(mul, 1)
        weight = weight.reshape(B * L).repeat(mul)
        if isinstance(self.head, ShortcutHead):
            per_row = self.head.loss(target, z, teacher)
        else:
            per_row = self.head.loss(target, z)
        return (per_row * weight).sum() / weight.sum()


# ----------------------------------------------------------------------------
# Sampling steps (= the exported graphs)
# ----------------------------------------------------------------------------


class MaskedBackboneStep(nn.Module):
    """tokens (B, L, C), mask (B, L) 1 = unknown, labels (B,) int64, query (B, Q) int64
    [, known (B, c) int64] -> z (2*B*Q, D) [cond rows, then uncond rows] with CFG, (B*Q, D) without.

    With `known` (the positions of every known token, padded with unknown positions) it is an encoder
    variant: the encoder runs on those c slots only (MaskedBackbone.forward_known), same z."""

    def __init__(self, model: FAR, cfg_guidance: bool):
        super().__init__()
        assert isinstance(model.backbone, MaskedBackbone)
        self.backbone, self.guided = model.backbone, cfg_guidance

    def forward(self, tokens, mask, labels, query, known=None):
        dtype = self.backbone.z_proj.weight.dtype
        class_vec = self.backbone.class_vector(labels)
        if self.guided:
            B = tokens.shape[0]
            tokens, mask, query = (
                torch.cat([tokens, tokens]),
                torch.cat([mask, mask]),
                torch.cat([query, query]),
            )
            known = None if known is None else torch.cat([known, known])
            class_vec = torch.cat([class_vec, self.backbone.null_vector(B).to(class_vec.dtype)])
        tokens, mask = tokens.to(dtype), mask.to(dtype)
        if known is None:
            z = self.backbone(tokens, mask, class_vec, query)  # (B', Q, D)
        else:
            z = self.backbone.forward_known(tokens, mask, class_vec, known, query)
        return z.reshape(-1, z.shape[-1]).float()


class CausalBackboneStep(nn.Module):
    """prev_token (B, C), pos (1,) int64, labels (B,) int64, cache (depth, 2, B', H, L, hd)
    -> z (B', D), new cache; B' = 2B with CFG (cond rows first). `inplace`: the eager form of
    `CausalBackbone.forward_step`, which writes into `cache` (the reference sampler's own buffer)."""

    def __init__(self, model: FAR, cfg_guidance: bool, inplace: bool = False):
        super().__init__()
        assert isinstance(model.backbone, CausalBackbone)
        self.backbone, self.guided, self.inplace = model.backbone, cfg_guidance, inplace

    def forward(self, prev_token, pos, labels, cache):
        dtype = self.backbone.z_proj.weight.dtype
        class_vec = self.backbone.class_vector(labels)
        if self.guided:
            prev_token = torch.cat([prev_token, prev_token])
            class_vec = torch.cat([class_vec, self.backbone.null_vector(labels.shape[0]).to(class_vec.dtype)])
        z, cache = self.backbone.forward_step(
            prev_token.to(dtype), pos.reshape(()), class_vec, cache, self.inplace
        )
        return z.float(), cache


class ShortcutHeadStep(nn.Module):
    """x (N, C), t (1,), d (1,), z (N', D), cfg (1,) -> next x (N, C); N' = 2N with CFG."""

    def __init__(self, model: FAR, cfg_guidance: bool):
        super().__init__()
        assert isinstance(model.head, ShortcutHead)
        self.head, self.guided = model.head, cfg_guidance

    def forward(self, x, t, d, z, cfg=None):
        # x stays fp32: the network runs in the head's dtype, the Euler update in fp32
        return self.head.step(x.float(), t, d, z, cfg if self.guided else None).float()


class DiffusionHeadStep(nn.Module):
    """x (N, C), t (1,), z (N', D), cfg (1,), coef (6,), noise (N, C) -> next x (N, C)."""

    def __init__(self, model: FAR, cfg_guidance: bool):
        super().__init__()
        assert isinstance(model.head, DiffusionHead)
        self.head, self.guided = model.head, cfg_guidance

    def forward(self, x, t, z, cfg, coef, noise):
        # x stays fp32: the network runs in the head's dtype, the posterior in fp32
        return self.head.step(x.float(), t, z, coef, noise.float(), cfg if self.guided else None).float()


class TokenUpdateStep(nn.Module):
    """tokens (B, L, C), mask (B, L), x (B*Q, C) the head's output, query (B, Q) int64 positions, n (1,) int64
    -> tokens with rows q < n of x written at their positions, mask 0 there.

    The scatter of one AR step as a graph, so that the runtime's state stays where the graphs run. Written
    as a one-hot product rather than ScatterND: padded rows (q >= n, repeating a real position) are
    weighted 0 and can never overwrite a real token, and the result is exact (one term of weight 1)."""

    def forward(self, tokens, mask, x, query, n):
        B, L, C = tokens.shape
        Q = query.shape[1]
        valid = torch.arange(Q, device=query.device) < n  # (Q,)
        onehot = (
            (query[:, :, None] == torch.arange(L, device=query.device)) & valid[None, :, None]
        ).float()  # (B, Q, L)
        written = onehot.sum(1).clamp(max=1.0)  # (B, L)
        update = torch.einsum("bql,bqc->blc", onehot, x.float().reshape(B, Q, C))  # (B, L, C)
        keep = 1.0 - written
        return tokens * keep[:, :, None] + update, mask * keep


class VAEDecoderStep(nn.Module):
    """tokens (B, L, C) scaled latent tokens -> image (B, 3, H, W) in [0, 1]."""

    def __init__(self, cfg: FARConfig, vae: AutoencoderKL):
        super().__init__()
        self.cfg = cfg
        self.decode = VAEDecodeToImage(vae, cfg.latent_scale)

    def forward(self, tokens):
        dtype = self.decode.vae.post_quant_conv.weight.dtype
        return self.decode(unpatchify(tokens, self.cfg).to(dtype)).float()


def backbone_step(model: FAR, cfg_guidance: bool) -> nn.Module:
    cls = MaskedBackboneStep if model.cfg.backbone == "masked" else CausalBackboneStep
    return cls(model, cfg_guidance)


def head_step(model: FAR, cfg_guidance: bool) -> nn.Module:
    cls = ShortcutHeadStep if model.cfg.head == "shortcut" else DiffusionHeadStep
    return cls(model, cfg_guidance)


# ----------------------------------------------------------------------------
# Latent image <-> token sequence
# ----------------------------------------------------------------------------


def patchify(latents: torch.Tensor, cfg: FARConfig) -> torch.Tensor:
    """(B, c, h, w) -> (B, L, C) in raster order, C = c * p * p (MAR's layout)."""
    B, c, h, w = latents.shape
    p = cfg.patch_size
    x = latents.reshape(B, c, h // p, p, w // p, p)
    x = torch.einsum("nchpwq->nhwcpq", x)
    return x.reshape(B, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: torch.Tensor, cfg: FARConfig) -> torch.Tensor:
    """(B, L, C) -> (B, c, h, w), the inverse of patchify."""
    B = tokens.shape[0]
    p, g, c = cfg.patch_size, cfg.grid, cfg.vae.embed_dim
    x = tokens.reshape(B, g, g, c, p, p)
    x = torch.einsum("nhwcpq->nchpwq", x)
    return x.reshape(B, c, g * p, g * p)

"""KL-regularised VAE in the LDM `AutoencoderKL` layout with MAR's KL-16 parameter names.

A state dict of MAR's `kl16.ckpt` (`torch.load(...)["model"]`) loads into
`AutoencoderKL(VAE_PRESETS["kl16"])` unchanged. Images are in [-1, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.config import VAEConfig
from training.layers import GroupNorm, softmax32

# ----------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------


def _norm(channels: int, groups: int) -> nn.Module:
    return GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = _norm(out_channels, groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; logits and softmax in fp32."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        k = self.k(h).reshape(B, C, H * W)  # (B, C, HW)
        v = self.v(h).reshape(B, C, H * W)  # (B, C, HW)
        # logits in fp32 (an fp32 island in fp16 graphs: q.k sums C products before the scaling)
        w = softmax32(torch.bmm(q.float(), k.float()) * C**-0.5, dim=2).to(v.dtype)  # (B, HW_q, HW_k)
        h = torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as LDM


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: `block`, `attn` and an optional `downsample`/`upsample` (LDM names)."""


# ----------------------------------------------------------------------------
# Encoder / Decoder
# ----------------------------------------------------------------------------


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.num_groups, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, 1, 1)
        in_mult = (1, *cfg.ch_mult)
        res = cfg.resolution
        self.down = nn.ModuleList()
        for i, mult in enumerate(cfg.ch_mult):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_mult[i], ch * mult
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
                if res in cfg.attn_resolutions:
                    level.attn.append(AttnBlock(block_in, g))
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(block_in)
                res //= 2
            self.down.append(level)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 2 * cfg.embed_dim, 3, 1, 1)  # double_z: mean and logvar

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if i != len(self.down) - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch, n = cfg.num_groups, cfg.ch, len(cfg.ch_mult)
        block_in = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.embed_dim, block_in, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, g)
        self.mid.attn_1 = AttnBlock(block_in, g)
        self.mid.block_2 = ResnetBlock(block_in, block_in, g)
        levels = []
        for i in reversed(range(n)):
            level = _Level()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * cfg.ch_mult[i]
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(block_in, block_out, g))
                block_in = block_out
            if i != 0:
                level.upsample = Upsample(block_in)
            levels.insert(0, level)  # up[0] is the finest level, as LDM
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.out_ch, 3, 1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(len(self.up))):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------
# AutoencoderKL
# ----------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.embed_dim, 2 * cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.embed_dim, 1)

    def encode_moments(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (B, 3, H, W) in [-1, 1] -> posterior mean and logvar (B, C, h, w)."""
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, h, w) -> image (B, 3, H, W), nominally in [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction and per-image KL to N(0, I) (B,)."""
        mean, logvar = self.encode_moments(x)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        kl = 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])
        return self.decode(z), kl


class VAEDecodeToImage(nn.Module):
    """What the exported VAE graph computes: scaled latent tokens' image grid -> image in [0, 1]."""

    def __init__(self, vae: AutoencoderKL, latent_scale: float):
        super().__init__()
        self.vae, self.latent_scale = vae, latent_scale

    def forward(self, latents: torch.Tensor) -> torch.Tensor:  # (B, C, h, w) scaled latents
        img = self.vae.decode(latents / self.latent_scale)
        return ((img + 1) * 0.5).clamp(0, 1)

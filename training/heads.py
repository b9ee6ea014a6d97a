"""Per-token heads: condition z (from the backbone) -> a continuous token.

- `ShortcutHead` (FAR): flow matching plus shortcut self-consistency; samples a token
  in K = 1..128 Euler steps, K chosen at sampling time.
- `DiffusionHead` (MAR's DiffLoss, the baseline): epsilon prediction with learned
  variance, cosine schedule, respaced sampling with N steps.

Both wrap MAR's `SimpleMLPAdaLN` (parameter names `net.*`, as MAR's `diffloss.net.*`)
and expose `step(...)`: one sampling step on rows (N, C), with classifier-free
guidance when z holds cond and uncond halves (2N, D), cond first. That one step is
what the exported head graph computes; the sampler calls it K (or N) times.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from runtime.schedule import cosine_betas, diffusion_coefficients
from training.config import FARConfig
from training.layers import LayerNorm

# ----------------------------------------------------------------------------
# MAR's SimpleMLPAdaLN
# ----------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, hidden)
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.in_ln = LayerNorm(channels, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(channels, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 3 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(self.in_ln(x), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, channels: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(channels, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(channels, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(channels, 2 * channels))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nn.Module):
    """x (N, C_in), t (N,), c (N, D) [, level (N,)] -> (N, C_out). `d_embed` (the shortcut's
    step-size embedding) exists only when num_levels > 0, so the MAR head keeps MAR's names."""

    def __init__(self, in_ch: int, width: int, out_ch: int, z_ch: int, depth: int, num_levels: int = 0):
        super().__init__()
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(z_ch, width)
        if num_levels:
            self.d_embed = nn.Embedding(num_levels, width)
        self.input_proj = nn.Linear(in_ch, width)
        self.res_blocks = nn.ModuleList(ResBlock(width) for _ in range(depth))
        self.final_layer = FinalLayer(width, out_ch)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        if hasattr(self, "d_embed"):
            nn.init.normal_(self.d_embed.weight, std=0.02)
        # AdaLN-Zero: every block starts as the identity, the output as zero
        for block in self.res_blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x, t, c, level=None):
        x = self.input_proj(x)
        y = self.time_embed(t) + self.cond_embed(c)
        if level is not None:
            y = y + self.d_embed(level)
        for block in self.res_blocks:
            x = block(x, y)
        return self.final_layer(x, y)


def _cfg_pair(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """With cond/uncond z (2N, D), run the network on [x; x]."""
    guided = z.shape[0] == 2 * x.shape[0]
    return (torch.cat([x, x]) if guided else x), guided


# ----------------------------------------------------------------------------
# Shortcut head (FAR)
# ----------------------------------------------------------------------------


class ShortcutHead(nn.Module):
    """Flow convention: x_t = (1 - t) * noise + t * data, velocity v = data - noise, t = 0 is noise.
    Step sizes d = 2^-level, level in [0, levels): level 0 is one step of size 1."""

    def __init__(self, cfg: FARConfig):
        super().__init__()
        self.levels = cfg.shortcut_levels
        self.bootstrap_fraction = cfg.bootstrap_fraction
        self.net = SimpleMLPAdaLN(
            cfg.token_dim,
            cfg.head_width,
            cfg.token_dim,
            cfg.width,
            cfg.head_depth,
            num_levels=cfg.shortcut_levels,
        )

    def velocity(
        self, x: torch.Tensor, t: torch.Tensor, level: torch.Tensor, z: torch.Tensor
    ) -> torch.Tensor:
        return self.net(x, t * 1000.0, z, level)

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        d: torch.Tensor,
        z: torch.Tensor,
        cfg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One Euler step. x (N, C); t, d (1,); z (N, D) or (2N, D) with cfg (1,) -> x + d * v.
        The network runs in its weights' dtype; t, the CFG mix and the update stay in x's dtype
        (fp32 x: an fp32 island in fp16/bf16 graphs, where t * 1000 and x + d * v would round)."""
        dtype = self.net.input_proj.weight.dtype
        xx, guided = _cfg_pair(x, z)
        M = xx.shape[0]
        level = torch.round(-torch.log2(d.float())).long().clamp(0, self.levels - 1).expand(M)
        v = self.velocity(xx.to(dtype), t.float().expand(M), level, z.to(dtype)).to(x.dtype)
        if guided:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg.to(v.dtype) * (v_cond - v_uncond)
        return x + d.to(x.dtype) * v

    def loss(self, x1: torch.Tensor, z: torch.Tensor, teacher: ShortcutHead | None = None) -> torch.Tensor:
        """Per-row loss (M,) on data tokens x1 (M, C) with conditions z (M, D)."""
        x_t, t, level, target = shortcut_targets(
            x1, z.detach(), teacher or self, self.levels, self.bootstrap_fraction
        )
        v = self.velocity(x_t, t, level, z)
        return ((v - target) ** 2).mean(dim=-1)


def shortcut_targets(
    x1: torch.Tensor, z: torch.Tensor, teacher: ShortcutHead, levels: int, bootstrap_fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training inputs and velocity targets for the shortcut head (Frans et al., 2410.12557).

    The first `bootstrap_fraction` of the rows learn self-consistency (one step of
    size 2d equals two steps of size d, the two steps taken by the no-grad teacher);
    the rest learn plain flow matching at the finest level. Returns x_t, t, level, v.
    """
    M = x1.shape[0]
    nb = int(M * bootstrap_fraction) if levels > 1 else 0
    dev = x1.device
    # 1) step sizes: bootstrap rows at a random coarse level, flow rows at the finest one
    level = torch.cat(
        [
            torch.randint(0, max(levels - 1, 1), (nb,), device=dev),  # (nb = 0 when levels = 1)
            torch.full((M - nb,), levels - 1, device=dev, dtype=torch.long),
        ]
    )
    d = torch.pow(2.0, -level.float())  # (M,)
    # 2) times: bootstrap rows on their step's grid (t + d <= 1), flow rows uniform in [0, 1)
    u = torch.rand(M, device=dev)
    t = torch.where(torch.arange(M, device=dev) < nb, torch.floor(u / d) * d, u)
    x0 = torch.randn_like(x1)
    x_t = (1 - t[:, None]) * x0 + t[:, None] * x1
    # 3) bootstrap targets: the mean velocity of two half steps by the teacher
    with torch.no_grad():
        xb, tb, hb, zb = x_t[:nb], t[:nb], level[:nb] + 1, z[:nb]
        half = (d[:nb] / 2)[:, None]
        v1 = teacher.velocity(xb, tb, hb, zb)
        v2 = teacher.velocity(xb + half * v1, tb + half[:, 0], hb, zb)
        v_boot = (v1 + v2) / 2
    # 4) flow-matching targets
    v_flow = (x1 - x0)[nb:]
    # 5) merge
    return x_t, t, level, torch.cat([v_boot, v_flow]).detach()


# ----------------------------------------------------------------------------
# MAR diffusion head (DiffLoss)
# ----------------------------------------------------------------------------


def _normal_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    def cdf(v):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))

    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


class DiffusionHead(nn.Module):
    """MAR's DiffLoss: eps prediction + learned-range variance (hybrid loss), cosine betas."""

    def __init__(self, cfg: FARConfig):
        super().__init__()
        self.channels = cfg.token_dim
        self.num_timesteps = cfg.diffusion_steps
        self.clip_x0 = cfg.diffusion_clip_x0
        self.net = SimpleMLPAdaLN(cfg.token_dim, cfg.head_width, 2 * cfg.token_dim, cfg.width, cfg.head_depth)
        betas = cosine_betas(cfg.diffusion_steps)
        ac = np.cumprod(1.0 - betas)
        table = np.concatenate(
            [diffusion_coefficients(betas), np.sqrt(ac)[:, None], np.sqrt(1 - ac)[:, None]], axis=1
        )
        self.register_buffer("coef", torch.tensor(table, dtype=torch.float32), persistent=False)  # (T, 8)

    def _posterior(self, x_t, eps, var_values, c, clip_x0: float = 0.0):
        """Mean and log-variance of p(x_{t-1} | x_t); c (.., 6) coefficients. clip_x0 > 0 clamps the
        predicted x0: with the cosine schedule 1/sqrt(alpha_bar) reaches ~2e4 at t = T-1, and a respaced
        sampler (25-100 steps) multiplies an undertrained head's eps error at that step by ~600."""
        x0 = c[..., 0:1] * x_t - c[..., 1:2] * eps
        if clip_x0 > 0:
            x0 = x0.clamp(-clip_x0, clip_x0)
        mean = c[..., 2:3] * x0 + c[..., 3:4] * x_t
        frac = (var_values + 1) / 2
        logvar = frac * c[..., 5:6] + (1 - frac) * c[..., 4:5]
        return mean, logvar

    def loss(self, x_start: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Per-row hybrid loss (M,): eps MSE + variational bound with the mean frozen (improved DDPM)."""
        M, C = x_start.shape
        t = torch.randint(0, self.num_timesteps, (M,), device=x_start.device)
        c = self.coef[t]  # (M, 8)
        noise = torch.randn_like(x_start)
        x_t = c[:, 6:7] * x_start + c[:, 7:8] * noise
        eps, var_values = self.net(x_t, t, z).split(C, dim=-1)
        mse = ((noise - eps) ** 2).mean(dim=-1)
        true_mean = c[:, 2:3] * x_start + c[:, 3:4] * x_t
        true_logvar = c[:, 4:5].expand_as(x_t)
        mean, logvar = self._posterior(x_t, eps.detach(), var_values, c)
        kl = _normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=-1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x_start, mean, 0.5 * logvar).mean(dim=-1) / math.log(2.0)
        return mse + torch.where(t == 0, nll, kl)

    def step(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        z: torch.Tensor,
        coef: torch.Tensor,
        noise: torch.Tensor,
        cfg: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One denoising step. x, noise (N, C) (noise already times temperature, zero at the last
        step); t (1,) original timestep; coef (6,) from runtime.schedule.ddpm_sampling_schedule."""
        dtype = self.net.input_proj.weight.dtype
        xx, guided = _cfg_pair(x, z)
        M = xx.shape[0]
        eps, var_values = (
            self.net(xx.to(dtype), t.expand(M), z.to(dtype)).float().split(self.channels, dim=-1)
        )
        if guided:
            eps_cond, eps_uncond = eps.chunk(2)
            eps = eps_uncond + cfg.to(eps.dtype) * (eps_cond - eps_uncond)
            var_values = var_values[: x.shape[0]]  # MAR keeps the cond half's variance
        # fp32 posterior (an fp32 island in fp16 graphs): 1/sqrt(alpha_bar) reaches ~1e4 at large t
        mean, logvar = self._posterior(x.float(), eps.float(), var_values.float(), coef.float(), self.clip_x0)
        return mean + torch.exp(0.5 * logvar) * noise.float()


def build_head(cfg: FARConfig) -> ShortcutHead | DiffusionHead:
    return ShortcutHead(cfg) if cfg.head == "shortcut" else DiffusionHead(cfg)

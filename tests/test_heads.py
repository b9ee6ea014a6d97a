"""The heads: shortcut Euler steps and targets, MAR's diffusion schedule and steps, CFG."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import tiny_model
from numerics import FP32, assert_close_to_scale

from runtime.schedule import (
    check_head_steps,
    cosine_betas,
    ddpm_sampling_schedule,
    diffusion_coefficients,
    respaced_timesteps,
    shortcut_times,
)
from training.heads import DiffusionHead, ShortcutHead, shortcut_targets
from training.model import head_step

torch.set_num_threads(1)


# ----------------------------------------------------------------------------
# Shortcut head
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("K", [1, 2, 4, 8, 16, 32, 64, 128])
def test_shortcut_k_euler_steps(K: int) -> None:
    """Protects: K = 2^l steps of size 1/K at times k/K, each at the trained level l = log2 K."""
    check_head_steps("shortcut", K, shortcut_levels=8, diffusion_steps=1000)
    times = shortcut_times(K)
    np.testing.assert_allclose(times, np.arange(K) / K)
    assert times[-1] + 1.0 / K == pytest.approx(1.0)

    model, _ = tiny_model("masked", "shortcut", seed=1)
    head: ShortcutHead = model.head
    step = head_step(model, False)
    N, C, D = 3, model.cfg.token_dim, model.cfg.width
    z = torch.randn(N, D)
    x = x_ref = torch.randn(N, C)
    d = torch.tensor([1.0 / K])
    level = torch.full((N,), int(math.log2(K)))
    with torch.no_grad():
        for t in times:
            x = step(x, torch.tensor([t], dtype=torch.float32), d, z)
            tt = torch.full((N,), float(t))
            x_ref = x_ref + (1.0 / K) * head.velocity(x_ref, tt, level, z)
    assert_close_to_scale(x, x_ref, FP32, "K Euler steps")


@pytest.mark.parametrize("K", [0, 3, 6, 100, 256, -1])
def test_shortcut_invalid_k_rejected(K: int) -> None:
    with pytest.raises(ValueError, match="power of two from 1 to 128"):
        check_head_steps("shortcut", K, shortcut_levels=8, diffusion_steps=1000)


def test_shortcut_step_uses_level_of_d() -> None:
    """Protects: step size d selects the embedding d_embed[log2(1/d)] (a different level changes v)."""
    model, _ = tiny_model("masked", "shortcut", seed=2)
    head = model.head
    N, C, D = 2, model.cfg.token_dim, model.cfg.width
    x, z, t = torch.randn(N, C), torch.randn(N, D), torch.tensor([0.25])
    with torch.no_grad():
        for level in range(model.cfg.shortcut_levels):
            d = 2.0**-level
            out = head.step(x, t, torch.tensor([d]), z)
            v = head.velocity(x, t.expand(N), torch.full((N,), level), z)
            assert_close_to_scale(out, x + d * v, FP32, f"step at level {level}")


def _targets(head: ShortcutHead, x1, z, seed: int, frac: float = 0.5):
    torch.manual_seed(seed)
    return shortcut_targets(x1, z, head, head.levels, frac)


def test_shortcut_targets_bootstrap_and_flow_rows() -> None:
    """Protects the shortcut loss: bootstrap targets = mean of two teacher half steps,
    flow targets = x1 - x0, bootstrap times on their step's grid with t + d <= 1."""
    model, _ = tiny_model("masked", "shortcut", seed=3)
    head: ShortcutHead = model.head
    levels = head.levels
    M, C, D = 64, model.cfg.token_dim, model.cfg.width
    g = torch.Generator().manual_seed(0)
    x1, z = torch.randn(M, C, generator=g), torch.randn(M, D, generator=g)
    x_t, t, level, target = _targets(head, x1, z, seed=11)
    nb = M // 2

    # replay the random draws of shortcut_targets in its order: level, t, x0
    torch.manual_seed(11)
    lvl_b = torch.randint(0, levels - 1, (nb,))
    u = torch.rand(M)
    x0 = torch.randn_like(x1)

    assert torch.equal(level[:nb], lvl_b)
    assert (level[nb:] == levels - 1).all()  # flow rows at the finest level d = 1/128
    d = 2.0 ** -level[:nb].double()
    tb = t[:nb].double()
    assert (tb + d <= 1.0).all() and (tb >= 0).all()
    assert torch.equal(torch.floor(tb / d) * d, tb)  # on the grid of their step size
    torch.testing.assert_close(t[nb:], u[nb:])
    torch.testing.assert_close(x_t, (1 - t[:, None]) * x0 + t[:, None] * x1)

    # 4) flow rows: v = x1 - x0
    assert_close_to_scale(target[nb:], (x1 - x0)[nb:], FP32, "flow targets")
    # 3) bootstrap rows: one step of size 2h = two teacher steps of size h = d/2 at level + 1
    with torch.no_grad():
        h = (d / 2).float()[:, None]
        hl = level[:nb] + 1
        v1 = head.velocity(x_t[:nb], t[:nb], hl, z[:nb])
        v2 = head.velocity(x_t[:nb] + h * v1, t[:nb] + h[:, 0], hl, z[:nb])
        x_two = x_t[:nb] + h * v1 + h * v2  # two half steps
    assert v1.abs().mean() > 1e-2 and (v1 - v2).abs().mean() > 1e-4  # non-trivial teacher
    assert_close_to_scale(target[:nb], (v1 + v2) / 2, FP32, "bootstrap targets")
    # ... i.e. the big step with the target velocity lands where the two half steps land
    assert_close_to_scale(x_t[:nb] + (2 * h) * target[:nb], x_two, FP32, "one big step vs two half steps")


def test_shortcut_targets_use_the_teacher() -> None:
    """Protects: bootstrap targets come from the teacher's weights (EMA), not the online head."""
    online, _ = tiny_model("masked", "shortcut", seed=4)
    teacher, _ = tiny_model("masked", "shortcut", seed=5)
    M, C, D = 32, online.cfg.token_dim, online.cfg.width
    x1, z = torch.randn(M, C), torch.randn(M, D)
    torch.manual_seed(0)
    a = shortcut_targets(x1, z, online.head, 8, 0.5)[3]
    torch.manual_seed(0)
    b = shortcut_targets(x1, z, teacher.head, 8, 0.5)[3]
    assert (a[:16] - b[:16]).abs().max() > 1e-3  # bootstrap rows differ
    torch.testing.assert_close(a[16:], b[16:])  # flow rows do not depend on any network


def test_shortcut_loss_trains() -> None:
    """Protects: the shortcut loss is finite, has gradients, and a few Adam steps lower it."""
    model, _ = tiny_model("masked", "shortcut", seed=6)
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, model.cfg.seq_len, model.cfg.token_dim, generator=g)
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(15):
        loss = model.loss(tokens, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


# ----------------------------------------------------------------------------
# MAR diffusion head
# ----------------------------------------------------------------------------


def mar_space_timesteps(num_timesteps: int, section_counts: str) -> set[int]:
    """MAR's diffusion/respace.py space_timesteps (non-DDIM branch), verbatim logic."""
    counts = [int(x) for x in section_counts.split(",")]
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        taken_steps = []
        for _ in range(section_count):
            taken_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        all_steps += taken_steps
        start_idx += size
    return set(all_steps)


@pytest.mark.parametrize("n", ["100", "25", "50", "1", "250", "1000"])
def test_respaced_timesteps_match_mar(n: str) -> None:
    expect = sorted(mar_space_timesteps(1000, n))
    got = respaced_timesteps(1000, int(n))
    assert got.tolist() == expect
    assert len(got) == int(n)
    ts, coef = ddpm_sampling_schedule(1000, int(n))
    assert ts.tolist() == expect[::-1] and coef.shape == (int(n), 6)


def mar_spaced_diffusion(num_steps: int) -> tuple[list[int], np.ndarray]:
    """MAR's create_diffusion(str(num_steps), noise_schedule="cosine"): SpacedDiffusion's timestep_map
    and the GaussianDiffusion coefficients of its respaced betas (DDPM_COEF_NAMES order)."""
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    betas = np.array([min(1 - alpha_bar((i + 1) / 1000) / alpha_bar(i / 1000), 0.999) for i in range(1000)])
    use = mar_space_timesteps(1000, str(num_steps))
    last, new_betas, timestep_map = 1.0, [], []
    for i, a in enumerate(np.cumprod(1.0 - betas)):
        if i in use:
            new_betas.append(1 - a / last)
            last = a
            timestep_map.append(i)
    b = np.array(new_betas)
    acp = np.cumprod(1.0 - b)
    acp_prev = np.append(1.0, acp[:-1])
    post_var = b * (1.0 - acp_prev) / (1.0 - acp)
    coef = np.stack(
        [
            np.sqrt(1.0 / acp),
            np.sqrt(1.0 / acp - 1),
            b * np.sqrt(acp_prev) / (1.0 - acp),
            (1.0 - acp_prev) * np.sqrt(1.0 - b) / (1.0 - acp),
            np.log(np.append(post_var[1], post_var[1:])),
            np.log(b),
        ],
        axis=1,
    )
    return timestep_map, coef


@pytest.mark.parametrize("n", [2, 25, 50, 100, 1000])
def test_sampling_coefficients_match_mar_spaced_diffusion(n: int) -> None:
    """Protects the MAR head's sampling: step j uses original timestep timestep_map[-1-j] and the
    respaced GaussianDiffusion's coefficients (p_mean_variance with learned-range variance)."""
    timestep_map, coef = mar_spaced_diffusion(n)
    ts, got = ddpm_sampling_schedule(1000, n)
    assert ts.tolist() == timestep_map[::-1]
    np.testing.assert_allclose(got, coef[::-1], rtol=1e-12, atol=0)


def test_cosine_betas_and_coefficients_are_ddpms() -> None:
    """Protects the improved-DDPM cosine schedule and the posterior coefficients (DDPM eqs. 6-7)."""
    betas = cosine_betas(1000)
    assert betas.shape == (1000,) and (betas > 0).all() and betas.max() == pytest.approx(0.999)
    assert (np.diff(betas) >= 0).all()
    ac = np.cumprod(1 - betas)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ac[499] == pytest.approx(f(500) / f(0), rel=1e-9)
    c = diffusion_coefficients(betas)
    assert np.isfinite(c).all()
    ac_prev = np.append(1.0, ac[:-1])
    # x0 from (x_t, eps): x_t = sqrt(ac) x0 + sqrt(1-ac) eps
    x0, eps = 0.7, -1.3
    x_t = np.sqrt(ac) * x0 + np.sqrt(1 - ac) * eps
    np.testing.assert_allclose(c[:, 0] * x_t - c[:, 1] * eps, x0, atol=1e-9)
    # posterior mean coefficients sum to the right scale: for x_t = sqrt(a_t) x_{t-1}, mean is consistent
    np.testing.assert_allclose(c[:, 2], betas * np.sqrt(ac_prev) / (1 - ac))
    np.testing.assert_allclose(c[:, 3], (1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac))
    post_var = betas * (1 - ac_prev) / (1 - ac)
    np.testing.assert_allclose(np.exp(c[1:, 4]), post_var[1:])
    assert c[0, 4] == pytest.approx(math.log(post_var[1]))  # clipped at t = 0
    np.testing.assert_allclose(c[:, 5], np.log(betas))
    # respaced: 100 steps keep alphas_cumprod at the kept timesteps
    ts, rc = ddpm_sampling_schedule(1000, 100)
    ac_kept = 1.0 / rc[:, 0] ** 2
    np.testing.assert_allclose(ac_kept, ac[ts], rtol=1e-9)
    assert np.isfinite(rc).all() and (np.diff(ts) < 0).all() and ts[-1] == 0


def test_diffusion_head_step_is_mar_p_sample() -> None:
    """Protects: one head step = MAR's p_sample (learned-range variance, no clipping)."""
    model, _ = tiny_model("masked", "mar", seed=7)
    head: DiffusionHead = model.head
    N, C, D = 5, model.cfg.token_dim, model.cfg.width
    ts, coef = ddpm_sampling_schedule(1000, 25)
    j = 10
    x, z, noise = torch.randn(N, C), torch.randn(N, D), torch.randn(N, C)
    with torch.no_grad():
        out = head.step(x, torch.tensor([int(ts[j])]), z, torch.tensor(coef[j], dtype=torch.float32), noise)
        eps, var = head.net(x, torch.full((N,), int(ts[j])), z).split(C, dim=-1)
    c = coef[j]
    x0 = c[0] * x - c[1] * eps
    mean = c[2] * x0 + c[3] * x
    frac = (var + 1) / 2
    logvar = frac * c[5] + (1 - frac) * c[4]
    assert_close_to_scale(out, mean + torch.exp(0.5 * logvar) * noise, FP32, "DDPM step")
    assert var.abs().mean() > 1e-3


def test_diffusion_loss_is_mar_training_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """Protects the MAR head's loss: guided-diffusion's training_losses (MSE on eps + VLB with the
    mean frozen, LEARNED_RANGE variance, t = 0 decoder NLL), written here in float64 numpy."""
    model, _ = tiny_model("masked", "mar", seed=14)
    head: DiffusionHead = model.head
    M, C, D = 12, model.cfg.token_dim, model.cfg.width
    g = torch.Generator().manual_seed(0)
    x_start, z = torch.rand(M, C, generator=g) * 2 - 1, torch.randn(M, D, generator=g)
    t = torch.tensor([0, 0, 1, 5, 100, 500, 900, 999, 0, 3, 250, 998])
    noise = torch.randn(M, C, generator=g)
    monkeypatch.setattr(torch, "randint", lambda *a, **k: t)
    monkeypatch.setattr(torch, "randn_like", lambda x: noise)
    got = head.loss(x_start, z).detach().double().numpy()
    with torch.no_grad():  # the network's own outputs, then everything else in float64
        c32 = head.coef[t]
        x_t32 = c32[:, 6:7] * x_start + c32[:, 7:8] * noise
        eps, var = (a.double().numpy() for a in head.net(x_t32, t, z).split(C, dim=-1))

    betas = cosine_betas(1000)
    ac = np.cumprod(1 - betas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1 - ac_prev) / (1 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:]))
    tt = t.numpy()
    col = lambda a: a[tt][:, None]  # noqa: E731
    xs, nz, xt = x_start.double().numpy(), noise.double().numpy(), x_t32.double().numpy()
    mse = ((nz - eps) ** 2).mean(1)
    true_mean = (
        col(betas * np.sqrt(ac_prev) / (1 - ac)) * xs
        + col((1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)) * xt
    )
    true_logvar = col(post_logvar)
    frac = (var + 1) / 2
    logvar = frac * col(np.log(betas)) + (1 - frac) * col(post_logvar)
    pred_x0 = col(np.sqrt(1 / ac)) * xt - col(np.sqrt(1 / ac - 1)) * eps
    mean = (
        col(betas * np.sqrt(ac_prev) / (1 - ac)) * pred_x0
        + col((1 - ac_prev) * np.sqrt(1 - betas) / (1 - ac)) * xt
    )
    kl = 0.5 * (
        -1 + logvar - true_logvar + np.exp(true_logvar - logvar) + (true_mean - mean) ** 2 * np.exp(-logvar)
    )
    approx_cdf = lambda v: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))  # noqa: E731
    inv_std = np.exp(-0.5 * logvar)
    cdf_plus, cdf_min = (
        approx_cdf(inv_std * (xs - mean + 1 / 255)),
        approx_cdf(inv_std * (xs - mean - 1 / 255)),
    )
    log_probs = np.where(
        xs < -0.999,
        np.log(np.maximum(cdf_plus, 1e-12)),
        np.where(
            xs > 0.999, np.log(np.maximum(1 - cdf_min, 1e-12)), np.log(np.maximum(cdf_plus - cdf_min, 1e-12))
        ),
    )
    vb = np.where(tt == 0, -log_probs.mean(1) / np.log(2), kl.mean(1) / np.log(2))
    np.testing.assert_allclose(got, mse + vb, rtol=2e-4, atol=1e-5)
    assert (vb[tt == 0] > 0.1).all() and (vb[tt != 0] >= 0).all()


def test_diffusion_head_loss_finite_and_trains() -> None:
    model, _ = tiny_model("masked", "mar", seed=8)
    model.train()
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(4, model.cfg.seq_len, model.cfg.token_dim, generator=g) * 0.5
    labels = torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(15):
        loss = model.loss(tokens, labels)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])


def test_diffusion_head_loss_finite_at_every_timestep(monkeypatch: pytest.MonkeyPatch) -> None:
    """Protects the hybrid loss: eps MSE + VLB is finite at all 1000 timesteps (t = 0: decoder NLL)."""
    model, _ = tiny_model("masked", "mar", seed=9)
    head = model.head
    M, C, D = 1000, model.cfg.token_dim, model.cfg.width
    monkeypatch.setattr(torch, "randint", lambda lo, hi, size, device=None: torch.arange(M) % hi)
    torch.manual_seed(0)
    x0, z = torch.randn(M, C) * 0.3, torch.randn(M, D)
    loss = head.loss(x0, z)
    assert loss.shape == (M,) and torch.isfinite(loss).all()
    assert (loss >= 0).all()  # MSE, KL and the t = 0 NLL (of a probability <= 1) are all >= 0


@pytest.mark.parametrize("n", [1, 2, 100])
def test_diffusion_step_counts_valid(n: int) -> None:
    check_head_steps("mar", n, 8, 1000)
    ts, coef = ddpm_sampling_schedule(1000, n)
    assert len(ts) == n and np.isfinite(coef).all()


@pytest.mark.parametrize("n", [0, 1001])
def test_diffusion_step_counts_invalid(n: int) -> None:
    with pytest.raises(ValueError, match="MAR head steps"):
        check_head_steps("mar", n, 8, 1000)


# ----------------------------------------------------------------------------
# CFG
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("head_kind", ["shortcut", "mar"])
def test_cfg_one_equals_unguided_step(head_kind: str) -> None:
    """Protects: with guidance scale 1 the guided graph gives the unguided step (within 1e-6)."""
    model, _ = tiny_model("masked", head_kind, seed=10)
    N, C, D = 4, model.cfg.token_dim, model.cfg.width
    x, z_c, z_u = torch.randn(N, C), torch.randn(N, D), torch.randn(N, D)
    one = torch.tensor([1.0])
    with torch.no_grad():
        if head_kind == "shortcut":
            t, d = torch.tensor([0.25]), torch.tensor([0.25])
            guided = head_step(model, True)(x, t, d, torch.cat([z_c, z_u]), one)
            plain = head_step(model, False)(x, t, d, z_c)
            scaled = head_step(model, True)(x, t, d, torch.cat([z_c, z_u]), torch.tensor([3.0]))
        else:
            ts, coef = ddpm_sampling_schedule(1000, 10)
            t, cf, noise = (
                torch.tensor([int(ts[3])]),
                torch.tensor(coef[3], dtype=torch.float32),
                torch.randn(N, C),
            )
            guided = head_step(model, True)(x, t, torch.cat([z_c, z_u]), one, cf, noise)
            plain = head_step(model, False)(x, t, z_c, None, cf, noise)
            scaled = head_step(model, True)(x, t, torch.cat([z_c, z_u]), torch.tensor([3.0]), cf, noise)
    assert_close_to_scale(guided, plain, FP32, "CFG scale 1 vs unguided")
    assert (scaled - plain).abs().max() > 1e-4  # guidance does something at scale 3


def test_cfg_mixes_cond_and_uncond() -> None:
    """Protects the CFG formula: v = v_u + s (v_c - v_u) on the shortcut head."""
    model, _ = tiny_model("masked", "shortcut", seed=11)
    head = model.head
    N, C, D = 3, model.cfg.token_dim, model.cfg.width
    x, z_c, z_u = torch.randn(N, C), torch.randn(N, D), torch.randn(N, D)
    t, d, s = torch.tensor([0.5]), torch.tensor([0.5]), 2.5
    with torch.no_grad():
        out = head.step(x, t, d, torch.cat([z_c, z_u]), torch.tensor([s]))
        lv = torch.ones(N, dtype=torch.long)
        v_c = head.velocity(x, t.expand(N), lv, z_c)
        v_u = head.velocity(x, t.expand(N), lv, z_u)
    assert_close_to_scale(out, x + 0.5 * (v_u + s * (v_c - v_u)), FP32, "CFG mix")


@pytest.mark.parametrize("head_kind", ["shortcut", "mar"])
def test_fp16_head_steps_run(head_kind: str) -> None:
    """Protects model.half() head steps (fp32 I/O, fp32 posterior): finite and within 1% of fp32."""
    model, _ = tiny_model("masked", head_kind, seed=12)
    N, C, D = 4, model.cfg.token_dim, model.cfg.width
    x, z = torch.randn(N, C), torch.randn(2 * N, D)
    with torch.no_grad():
        if head_kind == "shortcut":
            args = (x, torch.tensor([0.25]), torch.tensor([0.25]), z, torch.tensor([2.0]))
        else:
            ts, coef = ddpm_sampling_schedule(1000, 25)
            args = (
                x,
                torch.tensor([int(ts[0])]),
                z,
                torch.tensor([2.0]),
                torch.tensor(coef[0], dtype=torch.float32),
                torch.randn(N, C),
            )
        ref = head_step(model, True)(*args)
        try:
            out = head_step(model.half(), True)(*args)
        except RuntimeError as e:  # pragma: no cover - depends on the torch build's CPU kernels
            pytest.skip(f"fp16 on CPU is not supported by this torch build: {e}")
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert_close_to_scale(out, ref, 1e-2, "fp16 head step")


@pytest.mark.parametrize(("levels", "fraction"), [(1, 0.25), (8, 0.0), (2, 0.5)])
def test_shortcut_loss_edge_configs(levels: int, fraction: float) -> None:
    """Protects: one level (plain flow matching) and no bootstrap rows train without errors."""
    model, _ = tiny_model(
        "masked", "shortcut", shortcut_levels=levels, bootstrap_fraction=fraction, head_steps=1
    )
    torch.manual_seed(0)
    loss = model.loss(torch.randn(2, model.cfg.seq_len, model.cfg.token_dim), torch.tensor([0, 1]))
    assert torch.isfinite(loss)
    level = shortcut_targets(torch.randn(16, 4), torch.randn(16, 32), model.head, levels, fraction)[2]
    assert (level[int(16 * fraction) if levels > 1 else 0 :] == levels - 1).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_shortcut_step_keeps_x_in_fp32(dtype: torch.dtype) -> None:
    """Protects the fp32 island of the Euler update: with d = 1/128 an fp16/bf16 network's error is
    scaled by d, so the step stays within 1e-4 of fp32 (rounding x itself to fp16 would cost ~1e-3)."""
    model, _ = tiny_model("masked", "shortcut", seed=13)
    N, C, D = 4, model.cfg.token_dim, model.cfg.width
    x, z = torch.randn(N, C) * 3, torch.randn(2 * N, D)
    args = (x, torch.tensor([127 / 128]), torch.tensor([1 / 128]), z, torch.tensor([2.0]))
    with torch.no_grad():
        ref = head_step(model, True)(*args)
        try:
            out = head_step(model.to(dtype), True)(*args)
        except RuntimeError as e:  # pragma: no cover - depends on the torch build's CPU kernels
            pytest.skip(f"{dtype} on CPU is not supported by this torch build: {e}")
    assert_close_to_scale(out, ref, 1e-5, f"{dtype} Euler step")  # scale ~10: ~1e-4 absolute

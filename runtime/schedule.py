"""Sampling schedules and the randomness contract, in numpy only.

This is the single place for the math that the PyTorch reference sampler
(`training/sample.py`) and the lean runtime must share exactly: the masked
backbone's reveal schedule, the CFG schedule, the shortcut head's step times, the
MAR head's respaced DDPM coefficients, and the order in which random numbers are
drawn. (`training` imports this numpy-only module; the runtime imports nothing
from `training`.)

Randomness contract
-------------------
Image i of a request (its index in the request, counting from 0) draws from its
own generator ``numpy.random.Generator(numpy.random.PCG64([seed, i]))``, so an
image depends on (seed, i, its class, the settings) and not on the batch size or
on how the request is split into batches. Each image draws, in this order:

1. masked backbone only: ``order = rng.permutation(L)``, its token reveal order.
2. for each AR step, for the ``n`` tokens predicted at that step, taken in
   ascending token position:
   - shortcut head: ``x = temperature * rng.standard_normal((n, C))``, then K
     deterministic Euler steps;
   - MAR head: ``x = rng.standard_normal((n, C))``, then before each of the N
     denoising steps except the last, ``rng.standard_normal((n, C))``.

Draws are float64 and cast to float32 before use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from runtime.errors import RequestError, exact_int, sampling_numbers

CFG_SCHEDULES = ("linear", "constant")


class SamplingModel(Protocol):
    """What resolving a request needs of a model: a checkpoint's FARConfig or a manifest's ModelInfo."""

    backbone: str
    head: str
    seq_len: int
    shortcut_levels: int
    diffusion_steps: int
    cfg: float
    cfg_schedule: str
    temperature: float
    num_iter: int

    @property
    def resolved_head_steps(self) -> int: ...


@dataclass(frozen=True)
class SamplingSettings:
    """The resolved settings of one request, shared by the reference sampler, the build's
    end-to-end check and the runtime."""

    head_steps: int  # K: shortcut Euler steps or MAR denoising steps per token
    cfg: float
    cfg_schedule: str  # linear | constant
    temperature: float
    num_iter: int  # masked backbone AR steps
    seed: int = 0

    @classmethod
    def resolve(
        cls,
        model: SamplingModel,
        /,
        seed: int = 0,
        head_steps: int | None = None,
        cfg: float | None = None,
        cfg_schedule: str | None = None,
        temperature: float | None = None,
        num_iter: int | None = None,
    ) -> SamplingSettings:
        """The one resolver: the model's defaults (from its config or manifest), overridden by what the
        request gives, every value checked (RequestError). `model` is positional-only, so `cfg=` is the
        guidance scale."""
        cfg, temperature = sampling_numbers(
            model.cfg if cfg is None else cfg, model.temperature if temperature is None else temperature
        )
        if cfg_schedule is not None and not isinstance(cfg_schedule, str):
            raise RequestError(f"cfg_schedule must be a name, got {cfg_schedule!r}")
        s = cls(
            head_steps=model.resolved_head_steps
            if head_steps is None
            else exact_int("head_steps", head_steps),
            cfg=cfg,
            cfg_schedule=cfg_schedule or model.cfg_schedule,
            temperature=temperature,
            num_iter=model.num_iter if num_iter is None else exact_int("num_iter", num_iter),
            seed=exact_int("seed", seed),
        )
        if not 0 <= s.seed < 2**63:
            raise RequestError(f"seed must be in [0, 2^63), got {s.seed}")
        check_head_steps(model.head, s.head_steps, model.shortcut_levels, model.diffusion_steps)
        if s.cfg_schedule not in CFG_SCHEDULES:
            raise RequestError(f"unknown cfg schedule {s.cfg_schedule!r}: use {' or '.join(CFG_SCHEDULES)}")
        if model.backbone == "masked" and not 1 <= s.num_iter <= model.seq_len:
            raise RequestError(f"num_iter must be in [1, {model.seq_len}], got {s.num_iter}")
        return s


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image `index` of a request (see the randomness contract)."""
    return np.random.Generator(np.random.PCG64([int(seed), int(index)]))


# ----------------------------------------------------------------------------
# AR schedules
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ARStep:
    """One autoregressive step: tokens still unknown before (`known_before` is L - that) and after it."""

    unknown_before: int
    unknown_after: int  # MAR's mask_len: at the last step this is >= 1 but every token is predicted
    last: bool

    @property
    def num_pred(self) -> int:
        return self.unknown_before if self.last else self.unknown_before - self.unknown_after


def masked_schedule(seq_len: int, num_iter: int) -> list[ARStep]:
    """MAR's cosine schedule: after step s, floor(L * cos(pi/2 * (s+1)/num_iter)) tokens stay unknown,
    at least one is revealed per step and at least one stays unknown until the last step."""
    steps, unknown = [], seq_len
    for s in range(num_iter):
        target = math.floor(seq_len * np.cos(math.pi / 2.0 * (s + 1) / num_iter))
        after = max(1, min(unknown - 1, target))
        steps.append(ARStep(unknown, after, s == num_iter - 1))
        unknown = after
    return steps


def causal_schedule(seq_len: int) -> list[ARStep]:
    """Raster order, one token per step."""
    return [ARStep(seq_len - s, seq_len - s - 1, s == seq_len - 1) for s in range(seq_len)]


def max_tokens_per_step(seq_len: int, num_iter: int) -> int:
    return max(step.num_pred for step in masked_schedule(seq_len, num_iter))


def masked_positions(order: np.ndarray, step: ARStep) -> np.ndarray:
    """Token positions predicted at `step` for one image's reveal order, ascending."""
    lo = 0 if step.last else step.unknown_after
    return np.sort(order[lo : step.unknown_before])


def known_positions(order: np.ndarray, step: ARStep) -> np.ndarray:
    """Token positions known at the start of `step` (order[unknown_before:]), ascending."""
    return np.sort(order[step.unknown_before :])


def encoder_capacities(seq_len: int, variants: int, num_iter: int) -> tuple[int, ...]:
    """Known-token capacities of the masked backbone's encoder variants, fitted to the num_iter schedule: at
    most `variants` of its steps' known counts (at least 1), chosen so that the rows the encoder runs over the
    whole schedule are fewest, a step running the smallest capacity that holds its known tokens and the full
    backbone (seq_len rows) past the largest. Ascending; each is a step's known count, so each is used.

    An exact dynamic programme over the distinct counts (at most num_iter): rows[v][j] is the fewest
    encoder rows of the steps with the j smallest counts when v capacities hold them, the largest at the
    j-th count."""
    known = [max(1, seq_len - step.unknown_before) for step in masked_schedule(seq_len, num_iter)]
    counts = sorted({k for k in known if k < seq_len})  # below L: an unknown token is left to pad with
    # held[j]: how many steps know at most the j-th smallest count (held[0] = 0)
    held = [0, *np.searchsorted(sorted(known), counts, side="right").tolist()]
    m, inf = len(counts), float("inf")
    rows = [[0.0] + [inf] * m] + [[inf] * (m + 1) for _ in range(variants)]
    prev = [[0] * (m + 1) for _ in range(variants + 1)]
    for v in range(1, variants + 1):
        for j in range(1, m + 1):
            for i in range(j):  # the capacity below holds the steps up to the i-th count, this one the rest
                r = rows[v - 1][i] + counts[j - 1] * (held[j] - held[i])
                if r < rows[v][j]:
                    rows[v][j], prev[v][j] = r, i

    def total(v: int, j: int) -> tuple[float, int]:  # the steps past the largest capacity run L rows
        return rows[v][j] + seq_len * (len(known) - held[j]), v

    v, j = min(
        ((v, j) for v in range(variants + 1) for j in range(m + 1) if rows[v][j] < inf),
        key=lambda vj: total(*vj),
    )
    caps = []
    while v > 0:
        caps.append(counts[j - 1])
        v, j = v - 1, prev[v][j]
    return tuple(sorted(caps))


def encoder_capacity(step: ARStep, seq_len: int, capacities: tuple[int, ...]) -> int | None:
    """The smallest capacity that holds the tokens known at `step`, None when none does (the full
    backbone runs). A step always has an unknown token to pad with (unknown_before >= 1)."""
    known = seq_len - step.unknown_before
    return next((c for c in sorted(capacities) if c >= known), None)


def cfg_scale(cfg: float, schedule: str, seq_len: int, step: ARStep) -> float:
    """MAR's CFG schedule (after MUSE): linear in the share of tokens known after the step."""
    if schedule == "constant":
        return float(cfg)
    if schedule == "linear":
        return float(1.0 + (cfg - 1.0) * (seq_len - step.unknown_after) / seq_len)
    raise RequestError(f"unknown cfg schedule {schedule!r}: use {' or '.join(CFG_SCHEDULES)}")


# ----------------------------------------------------------------------------
# Head step schedules
# ----------------------------------------------------------------------------


def check_head_steps(head: str, steps: int, shortcut_levels: int, diffusion_steps: int) -> None:
    """Shortcut: K a power of two with a trained step size; MAR: 1 <= N <= training steps."""
    if head == "shortcut":
        max_k = 2 ** (shortcut_levels - 1)
        if steps < 1 or steps > max_k or steps & (steps - 1):
            raise RequestError(f"head steps must be a power of two from 1 to {max_k}, got {steps}")
    elif not 1 <= steps <= diffusion_steps:
        raise RequestError(f"MAR head steps must be in [1, {diffusion_steps}], got {steps}")


def shortcut_times(steps: int) -> np.ndarray:
    """Flow time of each Euler step: t_k = k / K (t = 0 is noise, t = 1 data), step size d = 1 / K."""
    return np.arange(steps, dtype=np.float64) / steps


DDPM_COEF_NAMES = (
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "posterior_log_variance_clipped",
    "log_betas",
)


def cosine_betas(num_steps: int, max_beta: float = 0.999) -> np.ndarray:
    """The improved-DDPM cosine schedule that MAR's diffusion head uses."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    return np.array(
        [
            min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta)
            for i in range(num_steps)
        ],
        dtype=np.float64,
    )


def respaced_timesteps(num_train_steps: int, num_steps: int) -> np.ndarray:
    """Which of the training timesteps a sampler with `num_steps` steps uses (MAR's space_timesteps)."""
    stride = 1.0 if num_steps <= 1 else (num_train_steps - 1) / (num_steps - 1)
    taken, cur = set(), 0.0
    for _ in range(num_steps):  # accumulate as MAR does, so rounding ties fall the same way
        taken.add(round(cur))
        cur += stride
    return np.array(sorted(taken))


def diffusion_coefficients(betas: np.ndarray) -> np.ndarray:
    """Per-timestep coefficients (T, 6) in DDPM_COEF_NAMES order, float64."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    ac_prev = np.append(1.0, ac[:-1])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    post_logvar = np.log(np.append(post_var[1], post_var[1:])) if len(betas) > 1 else np.log(betas)
    return np.stack(
        [
            np.sqrt(1.0 / ac),
            np.sqrt(1.0 / ac - 1.0),
            betas * np.sqrt(ac_prev) / (1.0 - ac),
            (1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
            post_logvar,
            np.log(betas),
        ],
        axis=1,
    )


def ddpm_sampling_schedule(num_train_steps: int, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Respaced sampling: (timesteps in sampling order (N,), coefficients (N, 6)), float64.

    The respaced betas are recomputed from the kept alphas_cumprod, and the network is
    called with the original timestep (MAR/DiT's SpacedDiffusion)."""
    ac = np.cumprod(1.0 - cosine_betas(num_train_steps))
    kept = respaced_timesteps(num_train_steps, num_steps)
    last, betas = 1.0, []
    for t in kept:
        betas.append(1.0 - ac[t] / last)
        last = ac[t]
    coef = diffusion_coefficients(np.array(betas))
    return kept[::-1].copy(), coef[::-1].copy()

"""runtime/schedule.py: MAR's reveal schedule, the CFG schedule and the randomness contract."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from runtime.schedule import (
    causal_schedule,
    cfg_scale,
    encoder_capacities,
    encoder_capacity,
    image_rng,
    known_positions,
    masked_positions,
    masked_schedule,
    max_tokens_per_step,
    shortcut_times,
)


def mar_sample_loop_masks(seq_len: int, num_iter: int, order: np.ndarray) -> list[np.ndarray]:
    """MAR's sample_tokens loop (models/mar.py), numpy: for each step, the positions it predicts,
    and mask_len (tokens left unknown) for its CFG schedule."""
    mask = np.ones(seq_len)
    out = []
    for step in range(num_iter):
        mask_ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        mask_len = np.array([np.floor(seq_len * mask_ratio)])
        mask_len = np.maximum(np.array([1.0]), np.minimum(np.sum(mask, axis=-1, keepdims=True) - 1, mask_len))
        mask_next = np.zeros(seq_len, dtype=bool)
        mask_next[order[: int(mask_len[0])]] = True  # mask_by_order
        if step >= num_iter - 1:
            mask_to_pred = mask.astype(bool)
        else:
            mask_to_pred = np.logical_xor(mask.astype(bool), mask_next)
        mask = mask_next.astype(float)
        out.append((np.nonzero(mask_to_pred)[0], int(mask_len[0])))
    return out


CASES = [(256, 64), (256, 256), (256, 1), (256, 8), (64, 4), (16, 8), (16, 16), (4, 4), (1, 1), (100, 37)]


@pytest.mark.parametrize(("L", "n"), CASES)
def test_masked_schedule_matches_mar(L: int, n: int) -> None:
    order = np.random.default_rng(L * 1000 + n).permutation(L)
    steps = masked_schedule(L, n)
    ref = mar_sample_loop_masks(L, n, order)
    assert len(steps) == n
    for step, (pred, mask_len) in zip(steps, ref):
        np.testing.assert_array_equal(masked_positions(order, step), pred)
        assert step.unknown_after == mask_len
        assert step.num_pred == len(pred)


@pytest.mark.parametrize(("L", "n"), CASES + [(L, n) for L in (2, 3, 9, 49, 64) for n in range(1, L + 1)])
def test_masked_schedule_counts(L: int, n: int) -> None:
    """Every step predicts >= 1 token, every token once; Q is the largest count."""
    steps = masked_schedule(L, n)
    counts = [s.num_pred for s in steps]
    assert sum(counts) == L and min(counts) >= 1
    assert steps[-1].last and not any(s.last for s in steps[:-1])
    assert max_tokens_per_step(L, n) == max(counts)
    order = np.random.default_rng(0).permutation(L)
    seen = np.concatenate([masked_positions(order, s) for s in steps])
    assert sorted(seen.tolist()) == list(range(L))


def test_mar_default_schedule_numbers() -> None:
    """256 tokens in 64 steps (MAR's ImageNet default): first and last counts, Q."""
    counts = [s.num_pred for s in masked_schedule(256, 64)]
    assert counts[0] == 1 and counts[-1] == 6 and max(counts) == 7
    assert max_tokens_per_step(256, 64) == 7
    assert [s.num_pred for s in masked_schedule(16, 4)] == [2, 3, 5, 6]  # 16 -> 14 -> 11 -> 6 -> 0


def test_causal_schedule() -> None:
    steps = causal_schedule(5)
    assert [s.num_pred for s in steps] == [1] * 5
    assert [s.unknown_after for s in steps] == [4, 3, 2, 1, 0]
    assert steps[-1].last


def test_cfg_schedules() -> None:
    """MAR's linear schedule: 1 + (cfg - 1) * (L - mask_len) / L with mask_len clamped to >= 1."""
    L, cfg = 256, 3.0
    steps = masked_schedule(L, 64)
    ref = mar_sample_loop_masks(L, 64, np.arange(L))
    for step, (_, mask_len) in zip(steps, ref):
        assert cfg_scale(cfg, "linear", L, step) == pytest.approx(
            1 + (cfg - 1) * (L - mask_len) / L, abs=1e-12
        )
        assert cfg_scale(cfg, "constant", L, step) == cfg
    lin = [cfg_scale(cfg, "linear", L, s) for s in steps]
    assert lin[0] == pytest.approx(1 + 2 * (256 - 255) / 256)
    assert lin[-1] == pytest.approx(1 + 2 * 255 / 256)
    assert all(a <= b for a, b in zip(lin, lin[1:]))
    # causal: linear in the tokens known after the step
    cs = causal_schedule(4)
    assert [cfg_scale(3.0, "linear", 4, s) for s in cs] == [1.5, 2.0, 2.5, 3.0]
    assert cfg_scale(1.0, "linear", 4, cs[0]) == 1.0
    with pytest.raises(ValueError, match="unknown cfg schedule"):
        cfg_scale(2.0, "cosine", 4, cs[0])


def test_shortcut_times_take_k_equal_steps_from_noise_to_data() -> None:
    """K Euler steps of size d = 1/K start at t = 0 (noise), end at t = 1 (data), and so carry a straight
    flow x_t = (1 - t) x0 + t x1 (constant velocity x1 - x0) exactly from x0 to x1."""
    x0, x1 = np.array([3.0, -1.0]), np.array([0.5, 2.0])
    for k in (1, 2, 4, 128):
        t = shortcut_times(k)
        assert len(t) == k and t[0] == 0.0
        np.testing.assert_allclose(np.diff(np.append(t, 1.0)), 1.0 / k, rtol=0, atol=1e-15)
        x = x0.copy()
        for _ in t:
            x += (x1 - x0) / k
        np.testing.assert_allclose(x, x1, rtol=0, atol=1e-12)


def test_image_rng_contract() -> None:
    """Image i draws from PCG64([seed, i]): independent of other images and reproducible."""
    a = image_rng(7, 3).standard_normal(4)
    b = np.random.Generator(np.random.PCG64([7, 3])).standard_normal(4)
    np.testing.assert_array_equal(a, b)  # exact: the random stream is the contract
    assert not np.allclose(image_rng(7, 3).standard_normal(4), image_rng(7, 4).standard_normal(4))
    assert not np.allclose(image_rng(7, 3).standard_normal(4), image_rng(8, 3).standard_normal(4))
    # pinned numbers: a change of the generator, its seeding or numpy's draw algorithms shows up here
    rng = image_rng(0, 0)
    assert rng.permutation(8).tolist() == [2, 4, 3, 6, 5, 0, 1, 7]
    np.testing.assert_allclose(
        rng.standard_normal(3), [-0.535669373161111, 0.36159505490948474, 1.3040000451301372], rtol=1e-12
    )
    np.testing.assert_allclose(
        image_rng(7, 3).standard_normal(3),
        [-1.667279001670178, 0.06387511169027424, 1.4946322078314938],
        rtol=1e-12,
    )


def _encoder_rows(L: int, num_iter: int, caps: tuple[int, ...]) -> int:
    """Known-token rows the encoder runs over a schedule: each step's capacity, L where the full backbone
    runs."""
    return sum(encoder_capacity(s, L, caps) or L for s in masked_schedule(L, num_iter))


def test_encoder_capacities_and_the_variant_each_step_runs():
    """Protects the variant choice: at most N capacities, each a step's known count, with the fewest encoder
    rows over the schedule of any such choice (brute force); a step runs the smallest capacity that holds
    its known tokens (L - unknown_before), the full backbone past the largest."""
    assert encoder_capacities(256, 3, 16) == (31, 94, 182)  # MAR-B's 16 steps: 1802 rows, L/4 L/2 3L/4 1984
    assert _encoder_rows(256, 16, (31, 94, 182)) == 1802 and _encoder_rows(256, 16, (64, 128, 192)) == 1984
    assert encoder_capacities(16, 0, 8) == () and encoder_capacities(1, 3, 1) == ()  # L = 1: no pad
    for L, num_iter, n in [(16, 8, 1), (16, 8, 3), (64, 16, 3), (64, 16, 5), (50, 7, 2), (3, 3, 3)]:
        caps = encoder_capacities(L, n, num_iter)
        known = {max(1, L - s.unknown_before) for s in masked_schedule(L, num_iter)} - {L}
        assert len(caps) <= n and set(caps) <= known and caps == tuple(sorted(caps))
        best = min(
            _encoder_rows(L, num_iter, c)
            for k in range(n + 1)
            for c in itertools.combinations(sorted(known), k)
        )
        assert _encoder_rows(L, num_iter, caps) == best, (L, num_iter, n)
    steps = masked_schedule(16, 8)
    known = [16 - s.unknown_before for s in steps]
    assert known == [0, 1, 2, 3, 5, 8, 10, 13]
    assert encoder_capacities(16, 3, 8) == (2, 5, 10)
    assert [encoder_capacity(s, 16, (2, 5, 10)) for s in steps] == [2, 2, 2, 5, 5, 10, 10, None]
    order = np.random.Generator(np.random.PCG64(0)).permutation(16)
    for s in steps:  # the known positions are the reveal order's tail, disjoint from what the step predicts
        have = known_positions(order, s)
        assert len(have) == 16 - s.unknown_before and not set(have) & set(masked_positions(order, s))
        assert order[0] not in have  # the pad every known table uses is unknown at every step

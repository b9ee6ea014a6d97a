"""The runtime equals the PyTorch reference sampler: same seed and settings, same tokens and same PNG.

Protects the randomness contract (runtime/schedule.py) and the AR loop: both
backbones x both heads, fp32 graphs on ONNX Runtime, engines built with
far_export.build from tiny random-weight checkpoints.

Token tolerance: GRAPH_FP32 (1e-4) relative to max(1, max|reference|) (tests/numerics.py). With a
shortcut head the tokens are O(1), so this is 1e-4 absolute. A random-weight MAR head predicts noise
unrelated to x_t, so its first denoising step (x0 = x_t / sqrt(alphabar_999) - ...)
gives tokens of order 1e5; fp32 rounding alone then differs by ~1e-2 absolute,
~2e-7 relative, so the relative form is the meaningful one. Those tokens saturate
the decoded image, so the MAR-head PNG check is weak; the VAE path is covered by
the shortcut-head cases.
"""

from __future__ import annotations

import numpy as np
import pytest
from numerics import GRAPH_FP32, assert_close_to_scale
from PIL import Image
from runtime_engines import built_engines

from runtime.images import write_outputs
from runtime.pipeline import Pipeline

torch = pytest.importorskip("torch")

from training.checkpoint import load_checkpoint  # noqa: E402
from training.sample import SamplingSettings, generate, sample_tokens  # noqa: E402

PIXEL_TOL = 2
COMBOS = [("masked", "shortcut"), ("masked", "mar"), ("causal", "shortcut"), ("causal", "mar")]
# The causal backbone takes one AR step per token: 2x2 latent patches give 16 tokens instead of
# 64, which keeps the PyTorch reference loop fast (and puts patchify in the VAE graph).
CHANGES = {"masked": {}, "causal": {"patch_size": 2}}


def _read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("backbone,head", COMBOS)
def test_tokens_and_png_equal_reference(tmp_path_factory, tmp_path, backbone, head):
    ckpt_dir, engine_dir = built_engines(tmp_path_factory, backbone, head, **CHANGES[backbone])
    ckpt = load_checkpoint(ckpt_dir)
    pipe = Pipeline.load(engine_dir)
    k = 3 if head == "mar" else 2
    # guided; and (once) cfg 1 on guided graphs against the reference's unguided step
    for cfg in (2.0, 1.0) if (backbone, head) == ("masked", "shortcut") else (2.0,):
        s = SamplingSettings.resolve(ckpt.cfg, seed=7, head_steps=k, cfg=cfg, temperature=0.9)
        ps = pipe.settings(head_steps=k, cfg=cfg, temperature=0.9, seed=7)
        # a full engine batch starting at image 5, and a padded one (1 image of 2) at image 6
        for labels, first in (([1, 3], 5), ([2], 6)):
            ref = sample_tokens(ckpt.model, labels, s, first_index=first)
            got = pipe.sample_tokens(labels, ps, first_index=first)
            assert got.shape == ref.shape == (len(labels), ckpt.cfg.seq_len, ckpt.cfg.token_dim)
            assert_close_to_scale(got, ref, GRAPH_FP32, f"tokens of {labels} at cfg {cfg}")

    # the PNG: 3 images through batch-2 engines (2 chunks, the last padded) vs the reference in one batch
    s = SamplingSettings.resolve(ckpt.cfg, seed=3, head_steps=k)
    labels = [0, 1, 3]
    ref_images = generate(ckpt.model, ckpt.vae, labels, s, batch=3)
    images = pipe.generate(labels, head_steps=k, seed=3)
    assert images.dtype == np.uint8 and images.shape == ref_images.shape == (3, 16, 16, 3)
    write_outputs(ref_images, labels, 3, str(tmp_path / "ref.png"), None)
    write_outputs(images, labels, 3, str(tmp_path / "rt.png"), None)
    diff = np.abs(_read_png(tmp_path / "rt.png") - _read_png(tmp_path / "ref.png")).max()
    assert diff <= PIXEL_TOL, diff


@pytest.mark.slow  # one more build (~8 s); the no-CFG graph layout
def test_unguided_graphs_equal_reference(tmp_path_factory):
    """Engines built without CFG (no cfg input, N' = N) serve cfg 1 and equal the reference."""
    ckpt_dir, engine_dir = built_engines(tmp_path_factory, "causal", "shortcut", guided=False, patch_size=2)
    ckpt = load_checkpoint(ckpt_dir)
    pipe = Pipeline.load(engine_dir)
    assert not pipe.manifest.cfg_guidance
    s = SamplingSettings.resolve(ckpt.cfg, seed=2, cfg=1.0)
    ref = sample_tokens(ckpt.model, [0, 1], s)
    got = pipe.sample_tokens([0, 1], pipe.settings(cfg=1.0, seed=2))
    assert_close_to_scale(got, ref, GRAPH_FP32, "tokens of unguided graphs")


# Measured on the tiny random model (seeds 0-2, 4 images each): max 1, mean 0.06 levels.
FP16_MAX_PIXEL = 8
FP16_MEAN_PIXEL = 1.0
FP16_TOKEN_REL = 2e-2


def test_fp16_graphs_bounded_difference(tmp_path_factory):
    """fp16 graphs (fp32 islands for norms/softmax) give an image within a stated bound of fp32's."""
    _, e32 = built_engines(tmp_path_factory, "masked", "shortcut", "fp32")
    _, e16 = built_engines(tmp_path_factory, "masked", "shortcut", "fp16")
    p32, p16 = Pipeline.load(e32), Pipeline.load(e16)
    assert p16.manifest.precision == "fp16"
    labels = [0, 1, 2, 3]
    for seed in (0, 1):
        a = p32.generate(labels, seed=seed).astype(np.int16)
        b = p16.generate(labels, seed=seed).astype(np.int16)
        diff = np.abs(a - b)
        assert diff.max() <= FP16_MAX_PIXEL and diff.mean() <= FP16_MEAN_PIXEL, (diff.max(), diff.mean())
    s = p32.settings(seed=0)
    t32, t16 = p32.sample_tokens([0, 1], s), p16.sample_tokens([0, 1], s)
    assert_close_to_scale(t16, t32, FP16_TOKEN_REL, "fp16 tokens")

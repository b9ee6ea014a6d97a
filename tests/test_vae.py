"""training/vae.py: the LDM AutoencoderKL layout with MAR's KL-16 names and sizes."""

from __future__ import annotations

import gc

import pytest
import torch
from conftest import randomize_
from numerics import FP16_MODULE, FP32, assert_close_to_scale

from training.backbones import count_params
from training.config import VAE_PRESETS, preset
from training.layers import GroupNorm, LayerNorm
from training.model import VAEDecoderStep, patchify, unpatchify
from training.vae import AutoencoderKL

torch.set_num_threads(1)


def test_kl16_has_mar_size_and_key_names() -> None:
    """Protects loading MAR's kl16.ckpt: 66.5M parameters and LDM/MAR key names and shapes."""
    vae = AutoencoderKL(VAE_PRESETS["kl16"])
    sd = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    n = count_params(vae)
    del vae
    gc.collect()
    assert abs(n - 66.5e6) / 66.5e6 < 0.002, n
    expected = {
        "encoder.conv_in.weight": (128, 3, 3, 3),
        "encoder.down.0.block.0.norm1.weight": (128,),
        "encoder.down.0.downsample.conv.weight": (128, 128, 3, 3),
        "encoder.down.2.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "encoder.down.4.block.1.conv2.weight": (512, 512, 3, 3),
        "encoder.down.4.attn.1.q.weight": (512, 512, 1, 1),  # attention at resolution 16
        "encoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "encoder.norm_out.bias": (512,),
        "encoder.conv_out.weight": (32, 512, 3, 3),  # double_z
        "quant_conv.weight": (32, 32, 1, 1),
        "post_quant_conv.weight": (16, 16, 1, 1),
        "decoder.conv_in.weight": (512, 16, 3, 3),
        "decoder.mid.block_2.conv1.weight": (512, 512, 3, 3),
        "decoder.up.4.block.2.conv2.weight": (512, 512, 3, 3),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.0.block.2.norm2.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, k
    assert not any(k.startswith("encoder.down.3.attn") or ".up." in k and ".attn." in k for k in sd)
    assert "decoder.up.0.upsample.conv.weight" not in sd and "encoder.down.4.downsample.conv.weight" not in sd


@pytest.mark.parametrize("name", ["tiny", "small32"])
def test_small_vaes_encode_decode_shapes(name: str) -> None:
    cfg = VAE_PRESETS[name]
    torch.manual_seed(0)
    vae = randomize_(AutoencoderKL(cfg), 0).eval()
    x = torch.rand(2, 3, cfg.resolution, cfg.resolution) * 2 - 1
    with torch.no_grad():
        mean, logvar = vae.encode_moments(x)
        h = cfg.resolution // cfg.stride
        assert mean.shape == logvar.shape == (2, cfg.embed_dim, h, h)
        assert logvar.min() >= -30 and logvar.max() <= 20
        rec, kl = vae(x, sample=False)
        assert rec.shape == x.shape and kl.shape == (2,) and (kl >= 0).all()
        assert_close_to_scale(rec, vae.decode(mean), FP32, "reconstruction")


def test_decoder_step_scales_latents_and_maps_to_unit_range() -> None:
    """Protects VAEDecoderStep: tokens / latent_scale -> decode -> (img + 1) / 2 clipped to [0, 1]."""
    cfg = preset("tiny", latent_scale=0.5)
    torch.manual_seed(0)
    vae = randomize_(AutoencoderKL(cfg.vae), 1).eval()
    latents = torch.randn(2, cfg.vae.embed_dim, cfg.grid, cfg.grid)
    tokens = patchify(latents, cfg)
    assert tokens.shape == (2, cfg.seq_len, cfg.token_dim)
    torch.testing.assert_close(unpatchify(tokens, cfg), latents)
    with torch.no_grad():
        img = VAEDecoderStep(cfg, vae)(tokens)
        ref = ((vae.decode(latents / 0.5) + 1) / 2).clamp(0, 1)
    assert img.shape == (2, 3, cfg.img_size, cfg.img_size) and img.dtype == torch.float32
    assert_close_to_scale(img, ref, FP32, "decoder step image")
    assert 0 <= img.min() and img.max() <= 1


def test_patchify_is_mar_layout() -> None:
    """MAR's patchify: (B, c, h, w) -> (B, h/p * w/p, c*p*p), channel-major inside a patch."""
    cfg = preset("tiny", patch_size=2)
    x = torch.arange(2 * 4 * 8 * 8, dtype=torch.float32).reshape(2, 4, 8, 8)
    t = patchify(x, cfg)
    assert t.shape == (2, 16, 16)
    # token (0, 1) = patch rows 0-1, cols 2-3; element (c, p, q)
    assert t[0, 1].tolist() == [
        x[0, c, p, 2 + q].item() for c in range(4) for p in range(2) for q in range(2)
    ]
    torch.testing.assert_close(unpatchify(t, cfg), x)


def test_fp32_norms_equal_torch_norms_and_survive_fp16() -> None:
    """Protects the fp32 islands: same numbers as torch's layers in fp32, no overflow in fp16."""
    x = torch.randn(2, 8, 4, 4) * 3 + 1
    gn, ref = GroupNorm(4, 8, eps=1e-6), torch.nn.GroupNorm(4, 8, eps=1e-6)
    randomize_(gn, 0)
    ref.load_state_dict(gn.state_dict())
    assert_close_to_scale(gn(x), ref(x), FP32, "GroupNorm")
    ln, lref = LayerNorm(8, eps=1e-6), torch.nn.LayerNorm(8, eps=1e-6)
    assert_close_to_scale(ln(x.transpose(1, -1)), lref(x.transpose(1, -1)), FP32, "LayerNorm")
    big = (torch.randn(2, 8) * 3000).half()  # squares overflow fp16 (max 65504)
    out = LayerNorm(8, eps=1e-6).half()(big)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


def test_fp16_vae_attention_does_not_overflow() -> None:
    """Protects the VAE attention's fp32 island: q.k of 16 channels of 70 each (78400 > fp16's 65504)
    gives inf - inf = NaN in a pure fp16 softmax; the fp16 decoder stays finite and near fp32."""
    torch.manual_seed(0)
    vae = randomize_(AutoencoderKL(VAE_PRESETS["tiny"]), 2).eval()
    attn = vae.decoder.mid.attn_1
    with torch.no_grad():
        for conv in (attn.q, attn.k):
            conv.weight.zero_()
            conv.bias.fill_(70.0)
        z = torch.randn(1, 4, 8, 8)
        ref = vae.decode(z)
        try:
            out = vae.half().decode(z.half())
        except RuntimeError as e:  # pragma: no cover - depends on the torch build's CPU kernels
            pytest.skip(f"fp16 conv on CPU is not supported by this torch build: {e}")
    assert torch.isfinite(out).all()
    assert_close_to_scale(out, ref, FP16_MODULE, "fp16 decoder")

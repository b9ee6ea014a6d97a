"""DiT (the third model kind): shapes, adaLN-Zero init, CFG, training, sampling contract, checkpoints,
evaluate."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file

from training import classifier as C
from training import evaluate as E
from training.checkpoint import load_checkpoint, save_checkpoint
from training.config import DIT_PRESETS, PRESETS, ConfigError, DiTConfig, FARConfig, model_config_from_dict
from training.dit import DiT, DiTStep, sincos_pos_embed
from training.sample import generate, resolve_settings, sample_tokens
from training.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_dit(seed: int = 0, randomize: bool = True, **changes) -> DiT:
    torch.manual_seed(seed)
    model = DiT(DIT_PRESETS["dit-tiny"].replace(**changes))
    if randomize:  # adaLN-Zero makes an untrained DiT output 0: give the comparisons real numbers
        randomize_(model, seed)
    return model.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def test_forward_shapes():
    m = tiny_dit()
    cfg = m.cfg
    B, L, C = 3, cfg.seq_len, cfg.token_dim
    assert (L, C) == (64, 4)  # 16 px / VAE stride 2 = 8x8 tokens of 4 channels
    x = torch.randn(B, L, C)
    assert m.velocity(x, torch.rand(B), torch.tensor([0, 1, cfg.num_classes])).shape == (B, L, C)
    one = torch.tensor([0.25])
    assert DiTStep(m, True)(x, one, one, torch.tensor([0, 1, 2]), torch.tensor([2.0])).shape == (B, L, C)
    assert m.pos_embed.shape == (1, L, cfg.width) and "pos_embed" not in m.state_dict()  # fixed, recomputed


def test_sincos_pos_embed_matches_dit_order():
    emb = sincos_pos_embed(8, 3)  # token i = row * 3 + col: first half encodes the column, second the row
    assert emb.shape == (9, 8)
    np.testing.assert_allclose(emb[1, :4], [np.sin(1), np.sin(1e-2), np.cos(1), np.cos(1e-2)], rtol=1e-12)
    np.testing.assert_allclose(emb[1, 4:], [0, 0, 1, 1])
    np.testing.assert_allclose(emb[3, 4:], emb[1, :4])


def test_adaln_zero_init_outputs_zero_and_blocks_are_identity():
    m = tiny_dit(randomize=False)
    x = torch.randn(2, m.cfg.seq_len, m.cfg.token_dim)
    assert torch.count_nonzero(m.velocity(x, torch.rand(2), torch.tensor([1, 2]))) == 0
    h = torch.randn(2, m.cfg.seq_len, m.cfg.width)
    c = torch.randn(2, 1, m.cfg.width)
    assert torch.equal(m.blocks[0](h, c), h)


def test_cfg_doubling_equals_two_separate_passes():
    m = tiny_dit()
    x = torch.randn(2, m.cfg.seq_len, m.cfg.token_dim)
    labels = torch.tensor([1, 3])
    t, d, cfg = torch.tensor([0.3]), torch.tensor([0.125]), torch.tensor([2.5])
    with torch.no_grad():
        guided = m.step(x, t, d, labels, cfg)
        v_c = m.velocity(x, t.expand(2), labels)
        v_u = m.velocity(x, t.expand(2), torch.full_like(labels, m.cfg.num_classes))
        plain = m.step(x, t, d, labels)
    assert rel_err(guided - x, d * (v_u + 2.5 * (v_c - v_u))) < 1e-5
    assert rel_err(plain - x, d * v_c) < 1e-5
    assert rel_err(v_c, v_u) > 1e-3  # the class matters, so the test above can fail


def test_a_few_training_steps_reduce_the_loss():
    m = tiny_dit(randomize=False).train()
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 1, m.cfg.token_dim, generator=g).expand(-1, m.cfg.seq_len, -1).contiguous()
    labels = torch.arange(8) % m.cfg.num_classes

    def held_loss() -> float:
        torch.manual_seed(123)
        with torch.no_grad():
            return float(np.mean([m.loss(x1, labels).item() for _ in range(8)]))

    before = held_loss()
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    for step in range(40):
        torch.manual_seed(step)
        loss = m.loss(x1, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_loss() < 0.7 * before


def test_sampling_is_deterministic_and_independent_of_batching():
    m = tiny_dit()
    labels = [0, 1, 2, 3, 1]
    s = resolve_settings(m.cfg, seed=7, head_steps=3, cfg=2.0)
    whole = sample_tokens(m, labels, s)
    assert np.array_equal(whole, sample_tokens(m, labels, s))
    parts = np.concatenate([sample_tokens(m, labels[:2], s), sample_tokens(m, labels[2:], s, first_index=2)])
    assert np.abs(parts - whole).max() <= 1e-5 * np.abs(whole).max()
    other = sample_tokens(m, labels, resolve_settings(m.cfg, seed=8, head_steps=3, cfg=2.0))
    assert np.abs(other - whole).max() > 1e-2


def test_sampling_draws_the_contract_noise():
    """Zero velocity (adaLN-Zero at init): the tokens are exactly temperature * the image's first draw."""
    m = tiny_dit(randomize=False)
    s = resolve_settings(m.cfg, seed=3, head_steps=2, temperature=0.5)
    got = sample_tokens(m, [0, 1], s)
    for i in range(2):
        rng = np.random.Generator(np.random.PCG64([3, i]))
        want = (0.5 * rng.standard_normal((m.cfg.seq_len, m.cfg.token_dim))).astype(np.float32)
        np.testing.assert_array_equal(got[i], want)


def test_sampling_settings_reject_what_does_not_apply():
    cfg = DIT_PRESETS["dit-tiny"]
    assert resolve_settings(cfg).head_steps == cfg.sample_steps == 4
    with pytest.raises(ValueError, match="cfg_schedule must be 'constant'"):
        resolve_settings(cfg, cfg_schedule="linear")
    with pytest.raises(ValueError, match="num_iter does not apply"):
        resolve_settings(cfg, num_iter=2)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        resolve_settings(cfg, head_steps=0)


def test_config_kind_and_presets():
    d = DIT_PRESETS["dit-mnist"].to_dict()
    assert d["kind"] == "dit" and isinstance(model_config_from_dict(d), DiTConfig)
    assert isinstance(model_config_from_dict(PRESETS["tiny"].to_dict()), FARConfig)
    with pytest.raises(ConfigError, match="kind must be one of"):
        model_config_from_dict({**d, "kind": "gan"})
    with pytest.raises(ConfigError, match="unknown config key"):
        model_config_from_dict({**d, "backbone": "masked"})
    with pytest.raises(ConfigError, match="divisible"):
        DIT_PRESETS["dit-tiny"].replace(width=30)
    assert (DIT_PRESETS["dit-b"].width, DIT_PRESETS["dit-b"].depth) == (768, 12)
    assert (DIT_PRESETS["dit-xl"].width, DIT_PRESETS["dit-xl"].depth, DIT_PRESETS["dit-xl"].num_heads) == (
        1152,
        28,
        16,
    )
    # dit-mnist is the size of far-mnist's backbone + head (1.57M parameters)
    from training.model import FAR

    far = FAR(PRESETS["mnist"])
    dit = DiT(DIT_PRESETS["dit-mnist"])
    n_far, n_dit = (sum(p.numel() for p in x.parameters()) for x in (far, dit))
    assert abs(n_dit - n_far) / n_far < 0.02


def test_checkpoint_round_trip(tmp_path):
    m = tiny_dit()
    vae = AutoencoderKL(m.cfg.vae)
    path = save_checkpoint(tmp_path / "ck", m, vae)
    assert json.loads((path / "config.json").read_text())["kind"] == "dit"
    ck = load_checkpoint(path)
    assert isinstance(ck.model, DiT) and ck.cfg == m.cfg
    ref = m.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in ck.model.state_dict().items())
    s = resolve_settings(ck.cfg, seed=1)
    assert np.array_equal(generate(ck.model, ck.vae, [0, 1], s), generate(m, vae, [0, 1], s))


@pytest.mark.skipif(importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed")
def test_evaluate_runs_on_a_tiny_dit_checkpoint(tmp_path):
    m = tiny_dit(img_size=32, num_classes=10, patch_size=2)
    ck = save_checkpoint(tmp_path / "ck", m, AutoencoderKL(m.cfg.vae))
    torch.manual_seed(0)
    (tmp_path / "cache" / "mnist").mkdir(parents=True)
    save_file(C.DigitClassifier().state_dict(), str(tmp_path / "cache" / "mnist" / C.CLASSIFIER_FILE))
    report = E.evaluate(
        ck, head_steps=[1, 2], per_class=2, batch=10, cache_dir=tmp_path / "cache", fid=False, progress=False
    )
    assert [r.head_steps for r in report.rows] == [1, 2] and report.family == "DiT"
    assert "| Euler steps N | class accuracy |" in report.table()
    table = E.side_by_side([report])
    assert "| DiT | N = 1 |" in table and "| DiT | N = 2 |" in table


def test_train_runs_the_dit_stage(tmp_path):
    """train.py's stages with model.preset = dit-tiny: VAE, latent cache, DiT, checkpoint directory."""
    from test_data import write_image_folder
    from test_train import tiny_overrides

    from training.trainer.run import train
    from training.trainer.run_config import load_run_config

    data = write_image_folder(tmp_path / "data", classes=2, per_class=4, size=16)
    over = [o for o in tiny_overrides(data) if o != "model.preset=tiny"]
    run = load_run_config(None, [*over, 'model.preset="dit-tiny"', "train.steps=3"])
    ck = load_checkpoint(train(run, tmp_path / "run"))
    assert isinstance(ck.model, DiT) and ck.cfg.num_classes == 2
    assert [json.loads(ln)["stage"] for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()][
        -2:
    ] == ["dit", "done"]


def test_far_export_refuses_a_dit_checkpoint_in_one_line(tmp_path):
    from far_export.build import BuildError, build

    m = tiny_dit()
    ck = save_checkpoint(tmp_path / "ck", m, AutoencoderKL(m.cfg.vae))
    with pytest.raises(BuildError, match="is a DiT checkpoint: far-export builds FAR and MAR engines only"):
        build(ck, tmp_path / "engine")
    assert not (tmp_path / "engine").exists()

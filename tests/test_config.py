"""training/config.py: presets, JSON round trip, one-line ConfigErrors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.config import CONFIG_VERSION, PRESETS, VAE_PRESETS, ConfigError, FARConfig, VAEConfig, preset


def test_presets_validate_and_have_mar_dims() -> None:
    for name, cfg in PRESETS.items():
        assert cfg.validate() is cfg, name
    dims = {
        n: (
            PRESETS[n].width,
            PRESETS[n].enc_depth,
            PRESETS[n].dec_depth,
            PRESETS[n].num_heads,
            PRESETS[n].head_depth,
            PRESETS[n].head_width,
        )
        for n in ("far-b", "far-l", "far-h")
    }
    assert dims == {
        "far-b": (768, 12, 12, 12, 6, 1024),
        "far-l": (1024, 16, 16, 16, 8, 1280),
        "far-h": (1280, 20, 20, 16, 12, 1536),
    }
    big = PRESETS["far-b"]
    assert (big.seq_len, big.token_dim, big.latent_scale, big.buffer_size) == (256, 16, 0.2325, 64)
    assert VAE_PRESETS["kl16"].stride == 16 and VAE_PRESETS["small32"].stride == 8
    mnist = PRESETS["mnist"]
    assert (mnist.img_size, mnist.num_classes, mnist.seq_len) == (32, 10, 16)


def test_round_trip(tmp_path: Path) -> None:
    cfg = preset("tiny", backbone="causal", head="mar", cfg=3.5)
    cfg.save(tmp_path / "config.json")
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["config_version"] == CONFIG_VERSION and raw["vae"]["ch_mult"] == [1, 2]
    back = FARConfig.load(tmp_path / "config.json")
    assert back == cfg and isinstance(back.vae.ch_mult, tuple)


def test_vae_may_name_a_preset() -> None:
    d = PRESETS["tiny"].to_dict()
    d["vae"] = "tiny"
    assert FARConfig.from_dict(d).vae == VAE_PRESETS["tiny"]


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"widht": 32}, "unknown config key.*widht"),
        ({"vae": {**PRESETS["tiny"].to_dict()["vae"], "chh": 3}}, r"unknown config key.*vae\.chh"),
        ({"width": 33}, "width 33 not divisible by num_heads 2"),
        ({"img_size": 17}, "img_size 17 not divisible"),
        ({"backbone": "rnn"}, "backbone must be one of"),
        ({"head": "gan"}, "head must be one of"),
        ({"num_iter": 65}, r"num_iter must be in \[1, seq_len=64\]"),
        ({"cfg_schedule": "cosine"}, "cfg_schedule"),
        ({"teacher": "student"}, "teacher"),
        ({"num_classes": 0}, "num_classes"),
        ({"bootstrap_fraction": 1.5}, "bootstrap_fraction"),
        ({"config_version": CONFIG_VERSION + 1}, "newer than this code"),
        ({"config_version": "2"}, "config_version must be an int"),
        ({"vae": {**PRESETS["tiny"].to_dict()["vae"], "ch": 6}}, "not divisible by num_groups"),
        ({"num_heads": 0}, "heads and head dims must be >= 1"),
        ({"patch_size": 0}, "patch_size"),
        ({"vae": {**PRESETS["tiny"].to_dict()["vae"], "num_groups": 0}}, "num_groups"),
        ({"buffer_size": 0}, "buffer_size >= 1"),
        ({"dec_depth": 0}, "dec_depth >= 1"),
        ({"head_steps": 3}, "power of two from 1 to 128"),
        ({"head": "mar", "head_steps": 1001}, "MAR head steps"),
        ({"attn_dropout": 1.0}, "attn_dropout"),
    ],
)
def test_invalid_configs_raise_one_line_config_error(change: dict, match: str) -> None:
    d = PRESETS["tiny"].to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=match) as e:
        FARConfig.from_dict(d)
    _one_line(e)


def test_causal_backbone_needs_no_decoder_or_buffer() -> None:
    cfg = preset("tiny", backbone="causal", dec_depth=0, buffer_size=0)
    assert cfg.depth == cfg.enc_depth


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is missing") as e:
        FARConfig.load(tmp_path / "nope.json")
    _one_line(e)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON") as e:
        FARConfig.load(tmp_path / "bad.json")
    _one_line(e)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="JSON object"):
        FARConfig.load(tmp_path / "list.json")


def test_preset_errors() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'far-xl'"):
        preset("far-xl")
    with pytest.raises(ConfigError, match="num_heads"):
        preset("tiny", num_heads=5)
    with pytest.raises(ConfigError):
        VAEConfig(embed_dim=0).validate()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"width": "32"}, "config key width must be int, got '32'"),
        ({"width": 32.0}, "config key width must be int"),
        ({"enc_depth": True}, "config key enc_depth must be int"),
        ({"backbone": 1}, "config key backbone must be str"),
        ({"vae": "huge"}, "unknown vae preset 'huge'"),
        ({"vae": [1, 2]}, "config key vae must be an object"),
        (
            {"vae": {**PRESETS["tiny"].to_dict()["vae"], "ch_mult": [1, "2"]}},
            "config key vae.ch_mult must be tuple",
        ),
    ],
)
def test_wrong_types_raise_config_error(change: dict, match: str) -> None:
    """Protects: a hand-edited config.json with a wrong type fails with a ConfigError, not a TypeError."""
    d = PRESETS["tiny"].to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=match) as e:
        FARConfig.from_dict(d)
    _one_line(e)


def test_json_ints_for_float_fields() -> None:
    d = PRESETS["tiny"].to_dict()
    d.update(cfg=3, temperature=1)
    cfg = FARConfig.from_dict(d)
    assert cfg.cfg == 3.0 and isinstance(cfg.cfg, float) and isinstance(cfg.temperature, float)


def test_head_steps_zero_means_the_heads_default() -> None:
    """K defaults per head: 4 shortcut Euler steps, MAR's 100 denoising steps; an explicit K wins."""
    assert preset("far-b").resolved_head_steps == 4
    assert preset("far-b", head="mar").resolved_head_steps == 100
    assert preset("far-b", head="mar", head_steps=50).resolved_head_steps == 50
    with pytest.raises(ConfigError, match="head_steps >= 0"):
        preset("far-b", head_steps=-1)

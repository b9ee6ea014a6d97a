"""training/checkpoint.py: our checkpoint directories and MAR's official file formats."""

from __future__ import annotations

import argparse
import json
import pickle
from pathlib import Path

import pytest
import torch
from conftest import randomize_, tiny_model, to_mar_names
from safetensors import safe_open

import training.checkpoint as ck
from training.checkpoint import (
    CheckpointError,
    checkpoint_sha256,
    load_checkpoint,
    load_mar_model,
    load_mar_vae,
    save_checkpoint,
)
from training.config import VAE_PRESETS
from training.model import backbone_step, head_step
from training.vae import AutoencoderKL

torch.set_num_threads(1)


def _outputs(model, vae) -> list[torch.Tensor]:
    """Backbone step, head step and VAE decoder outputs on fixed inputs."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    B, L, C = 2, cfg.seq_len, cfg.token_dim
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        if cfg.backbone == "masked":
            mask = (torch.rand(B, L, generator=g) > 0.5).float()
            z = backbone_step(model, True)(
                torch.randn(B, L, C, generator=g), mask, labels, torch.tensor([[0, 5], [7, 9]])
            )
        else:
            cache = torch.randn(model.backbone.cache_shape(2 * B), generator=g)
            z = backbone_step(model, True)(torch.randn(B, C, generator=g), torch.tensor([3]), labels, cache)[
                0
            ]
        N = z.shape[0] // 2
        x = torch.randn(N, C, generator=g)
        if cfg.head == "shortcut":
            h = head_step(model, True)(x, torch.tensor([0.5]), torch.tensor([0.25]), z, torch.tensor([2.0]))
        else:
            h = head_step(model, True)(
                x,
                torch.tensor([500]),
                z,
                torch.tensor([2.0]),
                torch.rand(6, generator=g),
                torch.randn(N, C, generator=g),
            )
        img = vae.decode(torch.randn(1, cfg.vae.embed_dim, cfg.grid, cfg.grid, generator=g))
    return [z, h, img]


# ----------------------------------------------------------------------------
# Our checkpoint directory
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(("backbone", "head"), [("masked", "shortcut"), ("causal", "mar")])
def test_round_trip_without_pickle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backbone: str, head: str
) -> None:
    """Protects the checkpoint contract: config.json + safetensors, self-describing, loaded without pickle."""
    model, vae = tiny_model(backbone, head, seed=1)
    path = save_checkpoint(tmp_path / "ckpt", model, vae)
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "vae.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary leftovers
    assert json.loads((path / "config.json").read_text())["backbone"] == backbone
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.state_dict())

    def no_pickle(*a, **k):
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    monkeypatch.setattr(torch, "load", no_pickle)
    ckpt = load_checkpoint(path)
    monkeypatch.undo()
    assert ckpt.cfg == model.cfg and ckpt.path == path and not ckpt.model.training
    for a, b in zip(_outputs(model, vae), _outputs(ckpt.model, ckpt.vae)):
        assert torch.equal(a, b)


def test_save_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Protects: a failed save leaves the previous checkpoint intact and no temporary directory."""
    model, vae = tiny_model(seed=2)
    path = save_checkpoint(tmp_path / "ckpt", model, vae)
    digest = checkpoint_sha256(path)
    assert digest == checkpoint_sha256(path) and len(digest) == 64
    other, _ = tiny_model(seed=3)

    calls = []

    def failing_save(sd, filename):
        calls.append(filename)
        if filename.endswith("vae.safetensors"):
            raise OSError("disk full")
        return real_save(sd, filename)

    real_save = ck.save_file
    monkeypatch.setattr(ck, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, other, vae)
    monkeypatch.undo()
    assert len(calls) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    assert checkpoint_sha256(path) == digest
    save_checkpoint(path, other, vae)
    assert checkpoint_sha256(path) != digest
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_saved_files_have_the_usual_permissions(tmp_path: Path) -> None:
    """Protects: checkpoint and safetensors files are 0666 less the umask (safetensors alone writes 0600),
    so another user of the machine can read a shipped checkpoint."""
    import os

    old = os.umask(0o022)
    try:
        model, vae = tiny_model()
        path = save_checkpoint(tmp_path / "ckpt", model, vae, extra_files={"train_info.json": "{}"})
        single = ck.save_tensors({"w": torch.ones(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in [*path.iterdir(), single]} == {
        "config.json": 0o644,
        "model.safetensors": 0o644,
        "vae.safetensors": 0o644,
        "train_info.json": 0o644,
        "w.safetensors": 0o644,
    }


def _one_line_error(path: Path, match: str) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _edit_config(path: Path, **changes) -> None:
    d = json.loads((path / "config.json").read_text())
    d.update(changes)
    (path / "config.json").write_text(json.dumps(d))


def test_checkpoint_errors(tmp_path: Path, tiny_checkpoint) -> None:
    """Protects: each broken checkpoint gives one CheckpointError line naming the problem."""
    _one_line_error(tmp_path / "nothing", "does not exist")

    p = tiny_checkpoint(tmp_path / "a")
    (p / "vae.safetensors").unlink()
    _one_line_error(p, "vae.safetensors is missing")

    p = tiny_checkpoint(tmp_path / "b")
    (p / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    _one_line_error(p, "model.safetensors is not a readable safetensors file")

    p = tiny_checkpoint(tmp_path / "b2")
    data = (p / "model.safetensors").read_bytes()
    (p / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    _one_line_error(p, "model.safetensors is not a readable safetensors file")

    p = tiny_checkpoint(tmp_path / "c")
    _edit_config(p, dropout_rate=0.1)
    _one_line_error(p, "config.json: unknown config key.*dropout_rate")

    p = tiny_checkpoint(tmp_path / "d")
    _edit_config(p, width=33)
    _one_line_error(p, "config.json: width 33 not divisible by num_heads 2")

    p = tiny_checkpoint(tmp_path / "e")
    _edit_config(p, config_version=99)
    _one_line_error(p, "config_version 99 is newer than this code")

    p = tiny_checkpoint(tmp_path / "f")
    (p / "config.json").write_text("{")
    _one_line_error(p, "not valid JSON")

    p = tiny_checkpoint(tmp_path / "g")
    (p / "config.json").unlink()
    _one_line_error(p, "config.json is missing")

    p = tiny_checkpoint(tmp_path / "h")
    _edit_config(p, width=64)  # valid config, weights of another width
    _one_line_error(p, r"model.safetensors does not match its config: .*wrong shape")

    p = tiny_checkpoint(tmp_path / "i")
    _edit_config(p, head="mar")  # another head's names
    _one_line_error(p, r"does not match its config: .*unexpected \(e.g. head.net.d_embed.weight\)")

    for name, bad, message in (
        ("j", lambda t: t.to(torch.int32), r"model.safetensors: .* is torch.int32, not a float tensor"),
        ("k", lambda t: t.index_fill(0, torch.tensor([0]), float("nan")), r"model.safetensors: .*NaN or Inf"),
    ):
        p = tiny_checkpoint(tmp_path / name)
        weights = ck.load_safetensors(p / "model.safetensors")
        first = next(k for k, v in weights.items() if v.is_floating_point())
        weights[first] = bad(weights[first])
        ck.save_tensors(weights, p / "model.safetensors")
        _one_line_error(p, message)


# ----------------------------------------------------------------------------
# MAR's files
# ----------------------------------------------------------------------------


def test_mar_names_are_mars() -> None:
    model, _ = tiny_model("masked", "mar")
    names = set(to_mar_names(model.state_dict()))
    for k in (
        "class_emb.weight",
        "fake_latent",
        "z_proj.weight",
        "z_proj_ln.weight",
        "encoder_pos_embed_learned",
        "encoder_blocks.0.attn.qkv.weight",
        "encoder_blocks.0.mlp.fc2.bias",
        "encoder_norm.weight",
        "decoder_embed.weight",
        "mask_token",
        "decoder_pos_embed_learned",
        "decoder_blocks.0.norm2.bias",
        "decoder_norm.weight",
        "diffusion_pos_embed_learned",
        "diffloss.net.time_embed.mlp.0.weight",
        "diffloss.net.cond_embed.weight",
        "diffloss.net.input_proj.weight",
        "diffloss.net.res_blocks.1.adaLN_modulation.1.weight",
        "diffloss.net.final_layer.linear.weight",
        "diffloss.net.final_layer.adaLN_modulation.1.bias",
    ):
        assert k in names, k


def test_load_mar_checkpoint_and_kl16(tmp_path: Path) -> None:
    """Protects the MAR loaders: checkpoint-last.pth's model_ema and kl16.ckpt's model load with
    weights_only=True and give the same outputs as the model that was saved."""
    ema, vae = tiny_model("masked", "mar", seed=4)
    online, _ = tiny_model("masked", "mar", seed=5)
    torch.save(
        {
            "model": to_mar_names(online.state_dict()),
            "model_ema": to_mar_names(ema.state_dict()),
            "epoch": 399,
            "args": argparse.Namespace(
                model="mar_base", diffloss_d=6, cfg=2.9
            ),  # MAR's main_mar.py saves its args
        },
        tmp_path / "checkpoint-last.pth",
    )
    vsd = vae.state_dict()
    torch.save({"model": {**vsd, "loss.logvar": torch.zeros(())}}, tmp_path / "kl16.ckpt")

    loaded = load_mar_model(tmp_path / "checkpoint-last.pth", ema.cfg)
    loaded_vae = load_mar_vae(tmp_path / "kl16.ckpt", AutoencoderKL(vae.cfg))
    loaded.eval()
    for a, b in zip(_outputs(ema, vae), _outputs(loaded, loaded_vae.eval())):
        assert torch.equal(a, b)
    online_loaded = load_mar_model(tmp_path / "checkpoint-last.pth", ema.cfg, key="model")
    assert torch.equal(online_loaded.backbone.z_proj.weight, online.backbone.z_proj.weight)


def test_load_mar_kl16_preset_shapes(tmp_path: Path) -> None:
    """A small VAE config saved as {'model': sd} loads; a VAE of other dims is refused in one line."""
    vae = randomize_(AutoencoderKL(VAE_PRESETS["tiny"]), 0)
    torch.save({"model": vae.state_dict()}, tmp_path / "kl.ckpt")
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_mar_vae(tmp_path / "kl.ckpt", AutoencoderKL(VAE_PRESETS["small32"]))


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_mar_loaders_refuse_pickled_objects(tmp_path: Path) -> None:
    """Protects weights_only=True: a .pth holding a non-tensor object is refused, never executed."""
    model, vae = tiny_model("masked", "mar")
    torch.save({"model_ema": to_mar_names(model.state_dict()), "hook": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="could not be loaded safely") as e:
        load_mar_model(tmp_path / "evil.pth", model.cfg)
    assert "\n" not in str(e.value)
    torch.save({"model": vae.state_dict(), "x": Evil()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_mar_vae(tmp_path / "evil.ckpt", AutoencoderKL(vae.cfg))


def test_mar_loader_errors(tmp_path: Path) -> None:
    model, _ = tiny_model("masked", "mar")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_mar_model(tmp_path / "none.pth", model.cfg)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="could not be loaded safely"):
        load_mar_model(tmp_path / "junk.pth", model.cfg)
    torch.save({"model": to_mar_names(model.state_dict())}, tmp_path / "no_ema.pth")
    with pytest.raises(CheckpointError, match="has no 'model_ema' entry"):
        load_mar_model(tmp_path / "no_ema.pth", model.cfg)
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(CheckpointError, match="does not hold a dict"):
        load_mar_model(tmp_path / "list.pth", model.cfg)
    shortcut, _ = tiny_model("masked", "shortcut")
    torch.save({"model_ema": {}}, tmp_path / "empty.pth")
    with pytest.raises(CheckpointError, match="head='mar'"):
        load_mar_model(tmp_path / "empty.pth", shortcut.cfg)


def test_mar_loader_entry_errors(tmp_path: Path) -> None:
    """MAR saves model_ema=None when trained without EMA; a weird entry gives one line, not a traceback."""
    model, vae = tiny_model("masked", "mar")
    torch.save({"model": to_mar_names(model.state_dict()), "model_ema": None}, tmp_path / "noema.pth")
    with pytest.raises(CheckpointError, match=r"\['model_ema'\] holds no state dict \(got NoneType\)"):
        load_mar_model(tmp_path / "noema.pth", model.cfg)
    torch.save({"model": {"encoder.conv_in.weight": 3}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="'encoder.conv_in.weight' is not a named tensor"):
        load_mar_vae(tmp_path / "bad.ckpt", AutoencoderKL(vae.cfg))
    torch.save({"state_dict": vae.state_dict(), "global_step": 10}, tmp_path / "ldm.ckpt")  # LDM's format
    loaded = load_mar_vae(tmp_path / "ldm.ckpt", AutoencoderKL(vae.cfg))
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)

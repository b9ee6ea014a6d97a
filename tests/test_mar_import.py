"""`far-export import-mar`: MAR's official files -> checkpoint directory -> engines -> samples.

Protects: the architecture inferred from MAR's saved args and tensor shapes (a real MAR-B/L/H maps to
far-b/l/h exactly, with MAR's README sampling defaults); the round trip file -> command -> checkpoint
directory -> `far-export build` -> `far-export sample` equal to the reference sampler; EMA by default;
one-line errors on bad files; fine-tuning a shortcut FAR from the import (train.init).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import randomize_, tiny_model, to_mar_names
from PIL import Image

from far_export.cli import cli
from training.checkpoint import CheckpointError, load_checkpoint
from training.config import PRESETS, VAE_PRESETS, preset
from training.mar_import import MARImportOptions, import_mar, infer_mar_config, infer_vae_config
from training.model import FAR
from training.vae import AutoencoderKL

pytestmark = pytest.mark.usefixtures("one_thread")
BIN = Path(sys.executable).parent


def mar_args(**changes) -> argparse.Namespace:
    """The args MAR's main_mar.py saves (its README's MAR-B training command), with `changes`."""
    a = dict(
        model="mar_base",
        img_size=256,
        vae_path="pretrained_models/vae/kl16.ckpt",
        vae_embed_dim=16,
        vae_stride=16,
        patch_size=1,
        num_iter=64,
        num_images=50000,
        cfg=1.0,
        cfg_schedule="linear",
        label_drop_prob=0.1,
        weight_decay=0.02,
        blr=1e-4,
        lr=8e-4,
        ema_rate=0.9999,
        mask_ratio_min=0.7,
        grad_clip=3.0,
        attn_dropout=0.1,
        proj_dropout=0.1,
        buffer_size=64,
        diffloss_d=6,
        diffloss_w=1024,
        num_sampling_steps="100",
        diffusion_batch_mul=4,
        temperature=1.0,
        class_num=1000,
        epochs=400,
    )
    a.update(changes)
    return argparse.Namespace(**{k: v for k, v in a.items() if v is not None})


def tiny_args(**changes) -> argparse.Namespace:
    """MAR's args for the tiny dims: no size name (MAR's args name only B/L/H), --num-heads 2 instead."""
    tiny = dict(
        model=None,
        img_size=16,
        vae_embed_dim=4,
        vae_stride=2,
        buffer_size=2,
        diffloss_d=2,
        diffloss_w=32,
        class_num=4,
        num_iter=4,
        cfg=2.0,
        num_sampling_steps="5",
    )
    return mar_args(**{**tiny, **changes})


def write_mar_files(d: Path, **entries) -> tuple[Path, Path, FAR, FAR]:
    """checkpoint-last.pth ({'model', 'model_ema', 'optimizer', 'epoch', 'scaler', 'args'}) and kl16.ckpt
    ({'model': VAE + LDM loss tensors}) at tiny dims, as MAR's save_model writes them. `entries` replace
    the checkpoint's (`...` drops one)."""
    d.mkdir(parents=True, exist_ok=True)
    ema, vae = tiny_model("masked", "mar", seed=4)
    online, _ = tiny_model("masked", "mar", seed=5)
    opt = torch.optim.AdamW(online.parameters(), lr=1e-4)
    obj = {
        "model": to_mar_names(online.state_dict()),
        "model_ema": to_mar_names(ema.state_dict()),
        "optimizer": opt.state_dict(),
        "epoch": 399,
        "scaler": {"scale": 65536.0, "_growth_tracker": 0},
        "args": tiny_args(),
    }
    obj.update(entries)
    torch.save({k: v for k, v in obj.items() if v is not ...}, d / "checkpoint-last.pth")
    torch.save({"model": {**vae.state_dict(), "loss.logvar": torch.zeros(())}}, d / "kl16.ckpt")
    return d / "checkpoint-last.pth", d / "kl16.ckpt", ema, online


# ----------------------------------------------------------------------------
# Inference: MAR-B/L/H are far-b/l/h
# ----------------------------------------------------------------------------


def _meta_mar(name: str) -> dict[str, torch.Tensor]:
    """A MAR state dict of a preset's real dims, on the meta device (shapes only, no memory)."""
    with torch.device("meta"):
        return to_mar_names(FAR(preset(name, head="mar")).state_dict())


@pytest.mark.parametrize(
    ("size", "name", "cfg"),
    [("mar_base", "far-b", 2.9), ("mar_large", "far-l", 3.0), ("mar_huge", "far-h", 3.2)],
)
def test_real_mar_sizes_map_to_presets(size, name, cfg):
    """A real MAR-B/L/H (its shapes, with or without its saved args) is far-b/l/h with head 'mar' and MAR's
    README sampling: cfg 2.9/3.0/3.2 linear, 256 AR steps, 100 denoising steps, temperature 1."""
    sd = _meta_mar(name)
    with torch.device("meta"):
        kl16 = AutoencoderKL(VAE_PRESETS["kl16"]).state_dict()
    vae = infer_vae_config(kl16, "kl16.ckpt")
    assert vae == VAE_PRESETS["kl16"]
    want = PRESETS[name].replace(
        head="mar", cfg=cfg, cfg_schedule="linear", num_iter=256, head_steps=100, temperature=1.0
    )
    p = PRESETS[name]
    args = mar_args(model=size, diffloss_d=p.head_depth, diffloss_w=p.head_width)
    with_args, got_size = infer_mar_config(sd, args, vae, MARImportOptions(), "x.pth")
    assert (
        got_size == size and with_args == want
    )  # MAR's training args equal our preset's (dropouts, batch mul...)
    shapes_only, got_size = infer_mar_config(sd, None, vae, MARImportOptions(), "x.pth")
    assert got_size == size and shapes_only == want


def test_sampling_overrides_and_args_defaults():
    sd = _meta_mar("far-b")
    vae = VAE_PRESETS["kl16"]
    cfg, _ = infer_mar_config(sd, None, vae, MARImportOptions(cfg=1.0, temperature=0.95, num_iter=64), "x")
    assert (cfg.cfg, cfg.temperature, cfg.num_iter, cfg.head_steps) == (1.0, 0.95, 64, 100)
    # other dims: sampling defaults from the saved args (MAR's flags of the same names)
    tiny = to_mar_names(tiny_model("masked", "mar")[0].state_dict())
    cfg, size = infer_mar_config(tiny, tiny_args(), VAE_PRESETS["tiny"], MARImportOptions(num_heads=2), "x")
    assert size is None and (cfg.cfg, cfg.num_iter, cfg.head_steps, cfg.num_heads) == (2.0, 4, 5, 2)
    assert cfg.replace(cfg=2.0, num_iter=4, head_steps=5) == cfg  # valid as written
    for k in ("width", "enc_depth", "dec_depth", "buffer_size", "head_width", "head_depth", "num_classes"):
        assert getattr(cfg, k) == getattr(PRESETS["tiny"], k), k


# ----------------------------------------------------------------------------
# The round trip through the real CLIs
# ----------------------------------------------------------------------------


def _cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "far-export"), *map(str, args)], capture_output=True, text=True, timeout=300
    )


def test_round_trip_file_to_engines_to_samples(tmp_path):
    """file -> `far-export import-mar` -> checkpoint dir -> `far-export build` -> `far-export sample`: the
    PNGs equal the reference sampler's pictures, the runtime's tokens equal training/sample.py's."""
    from runtime.pipeline import Pipeline
    from training.sample import SamplingSettings, generate, sample_tokens

    pth, kl, ema, _ = write_mar_files(tmp_path / "mar")
    ckpt = tmp_path / "imported"
    r = _cli("import-mar", pth, "--vae", kl, "--out", ckpt, "--num-heads", "2")
    assert r.returncode == 0, r.stderr
    assert "'model_ema' weights" in r.stdout and "cfg 2 (linear), num_iter 4, 5 denoising steps" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["imported", "mar"]  # no temporary leftovers
    info = json.loads((ckpt / "import_info.json").read_text())
    assert info["weights"] == "model_ema" and info["mar_args"]["diffloss_w"] == 32

    loaded = load_checkpoint(ckpt)
    assert loaded.cfg == preset(
        "tiny", head="mar", num_iter=4, head_steps=5, cfg=2.0, latent_scale=0.2325, mlp_ratio=4.0
    )
    ref_sd = ema.state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in loaded.model.state_dict().items())  # the EMA, exactly

    engines = tmp_path / "engines"
    r = _cli(
        "build", ckpt, "--out", engines, "--batch", "2", "--no-engines", "--no-validate", "--no-end-to-end"
    )
    assert r.returncode == 0, r.stderr
    r = _cli(
        "sample", engines, "--classes", "0,3", "--seed", "7", "--out-dir", tmp_path / "png", "--threads", "1"
    )
    assert r.returncode == 0, r.stderr

    labels = [0, 3]
    s = SamplingSettings.resolve(loaded.cfg, seed=7)
    ref_images = generate(loaded.model, loaded.vae, labels, s)
    got = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted((tmp_path / "png").iterdir())])
    assert got.shape == ref_images.shape == (2, 16, 16, 3)
    assert np.abs(got.astype(np.int16) - ref_images.astype(np.int16)).max() <= 2
    ref = sample_tokens(loaded.model, labels, s)
    with Pipeline.load(engines, threads=1) as pipe:
        tokens = pipe.sample_tokens(labels, pipe.settings(seed=7))
    assert np.abs(tokens - ref).max() <= 1e-4 * np.abs(ref).max()


def test_online_weights_on_request(tmp_path):
    pth, kl, _, online = write_mar_files(tmp_path / "mar")
    out = import_mar(pth, kl, tmp_path / "ckpt", MARImportOptions(weights="online", num_heads=2))
    assert out.entry == "model"
    got = load_checkpoint(out.path).model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in online.state_dict().items())


def test_existing_checkpoint_replaced_only_with_force(tmp_path):
    """A second import over a checkpoint is refused (weights and train_info.json kept); --force replaces."""
    pth, kl, _, online = write_mar_files(tmp_path / "mar")
    out = import_mar(pth, kl, tmp_path / "ckpt", MARImportOptions(num_heads=2)).path
    (out / "train_info.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _cli("import-mar", pth, "--vae", kl, "--out", out, "--num-heads", "2", "--online")
    assert r.returncode != 0 and "is an existing checkpoint" in r.stderr and "--force" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _cli("import-mar", pth, "--vae", kl, "--out", out, "--num-heads", "2", "--online", "--force")
    assert r.returncode == 0, r.stderr
    got = load_checkpoint(out).model.state_dict()
    assert all(torch.equal(v, got[k]) for k, v in online.state_dict().items())
    _error(pth, kl, out / "nested", "is inside the checkpoint directory")


# ----------------------------------------------------------------------------
# Bad input: one line naming the file and the problem
# ----------------------------------------------------------------------------


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _error(pth: Path, kl: Path, out: Path, match: str, **opts) -> None:
    with pytest.raises(CheckpointError, match=match) as e:
        import_mar(pth, kl, out, MARImportOptions(**{"num_heads": 2, **opts}))
    assert "\n" not in str(e.value)
    assert not out.exists() and not any(p.name.startswith(f".{out.name}") for p in out.parent.iterdir())


def test_bad_files(tmp_path):
    pth, kl, ema, _ = write_mar_files(tmp_path / "ok")
    out = tmp_path / "out"
    _error(tmp_path / "none.pth", kl, out, r"none.pth does not exist")
    _error(pth, tmp_path / "none.ckpt", out, r"none.ckpt does not exist")
    _error(tmp_path, kl, out, r"is a directory, not a file")
    os.mkfifo(tmp_path / "fifo.pth")
    _error(tmp_path / "fifo.pth", kl, out, r"fifo.pth is not a regular file")
    for bad in ("abc", "1e9", 5.5):
        p, k, _, _ = write_mar_files(tmp_path / f"steps-{bad}", args=tiny_args(num_sampling_steps=bad))
        _error(p, k, out, rf"saved args have num_sampling_steps = {bad!r}: not a whole number")
    for name, bad in (("patch_size", "one"), ("img_size", 16.5)):
        p, k, _, _ = write_mar_files(tmp_path / f"{name}-{bad}", args=tiny_args(**{name: bad}))
        _error(p, k, out, rf"saved args have {name} = {bad!r}: not a whole number")
    p, k, _, _ = write_mar_files(tmp_path / "patch-str", args=tiny_args(patch_size="1"))  # as a string: fine
    import_mar(p, k, tmp_path / "patch-str-out", MARImportOptions(num_heads=2))
    assert (tmp_path / "patch-str-out" / "config.json").is_file()
    _error(kl, kl, out, r"kl16.ckpt has no 'model_ema' weights; pass --online")  # VAE given as the model
    _error(kl, kl, out, r"kl16.ckpt \['model'\] is not a MAR model: no 'z_proj.weight'", weights="online")
    _error(pth, pth, out, r"checkpoint-last.pth: the VAE weights match none of the known layouts")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pth")
    _error(
        tmp_path / "other.pth",
        kl,
        out,
        r"other.pth is not a MAR checkpoint: no 'model' or 'model_ema' entry "
        r"\(found: state_dict\)",
    )
    torch.save({"model_ema": to_mar_names(ema.state_dict()), "hook": Evil()}, tmp_path / "evil.pth")
    _error(tmp_path / "evil.pth", kl, out, r"evil.pth could not be loaded safely \(weights_only=True\)")
    bomb = tmp_path / "bomb.pth"  # a torch.save archive whose data.pkl is deflated: 64 MB from ~64 KB
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z, z.open("bomb/data.pkl", "w") as f:
        for _ in range(64):
            f.write(bytes(2**20))
    _error(bomb, kl, out, r"bomb.pth would inflate to 0.07 GB from 0.1 MB: not a file torch.save wrote")
    p, k, _, _ = write_mar_files(tmp_path / "none-ema", model_ema=None)  # MAR trained without EMA
    _error(p, k, out, r"has no 'model_ema' weights; pass --online")
    p, k, _, _ = write_mar_files(tmp_path / "dict-args", args={"model": "mar_base"})
    _error(p, k, out, r"'args' is a dict, not MAR's argparse.Namespace")
    p, k, _, _ = write_mar_files(tmp_path / "giant", args=tiny_args(model="mar_giant"))
    _error(
        p,
        k,
        out,
        r"unknown MAR model size args.model='mar_giant'; MAR's are mar_base, mar_large, mar_huge",
        num_heads=None,
    )
    p, k, _, _ = write_mar_files(tmp_path / "b", args=mar_args())  # says MAR-B, holds tiny weights
    _error(p, k, out, r"args.model='mar_base' has width 768 but the weights have 32")
    p, k, _, _ = write_mar_files(tmp_path / "w", args=tiny_args(diffloss_w=1024))
    _error(p, k, out, r"args.diffloss_w = 1024 but the weights/VAE have 32")
    p, k, _, _ = write_mar_files(tmp_path / "no-heads", args=...)  # a release file without args
    _error(p, k, out, r"width 32 with 1\+1 blocks is not MAR-B/L/H; pass --num-heads", num_heads=None)
    # weights of the right names and another VAE: the VAE file is refused before any output exists
    torch.save(
        {"model": randomize_(AutoencoderKL(VAE_PRESETS["small32"])).state_dict()}, tmp_path / "small.ckpt"
    )
    _error(pth, tmp_path / "small.ckpt", out, r"args.vae_embed_dim = 4 but the weights/VAE have 8")
    _error(p, tmp_path / "small.ckpt", out, r"tokens of 4 channels do not fit the VAE's 8 latent channels")
    (out.parent / "notes").mkdir()
    (out.parent / "notes" / "a.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="notes exists and is not a checkpoint directory"):
        import_mar(pth, kl, out.parent / "notes", MARImportOptions(num_heads=2))
    assert (out.parent / "notes" / "a.txt").read_text() == "keep me"


def test_cli_errors_are_one_line(tmp_path):
    pth, kl, _, _ = write_mar_files(tmp_path / "mar")
    for args, match in [
        (
            [pth, "--vae", kl, "--out", tmp_path / "o"],
            "pass --num-heads (attention heads are not in the weights)",
        ),
        ([tmp_path / "x.pth", "--vae", kl, "--out", tmp_path / "o"], "x.pth does not exist"),
    ]:
        r = CliRunner().invoke(cli, ["import-mar", *map(str, args)])
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        lines = [ln for ln in r.output.splitlines() if ln.startswith("Error:")]
        assert len(lines) == 1 and match in lines[0], r.output
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------
# Fine-tuning a shortcut FAR from MAR
# ----------------------------------------------------------------------------


def test_fine_tune_shortcut_far_from_mar(tmp_path):
    """train.init = an imported MAR: the whole backbone and the head's matching tensors are MAR's, the
    shortcut's d_embed and final linear layer are fresh (lr 0, one step: the export is the init)."""
    from test_data import write_image_folder
    from test_train import tiny_overrides

    from training.trainer.run import train
    from training.trainer.run_config import load_run_config

    pth, kl, ema, _ = write_mar_files(tmp_path / "mar")
    mar = import_mar(pth, kl, tmp_path / "imported", MARImportOptions(num_heads=2)).path
    data = write_image_folder(tmp_path / "data", classes=2, per_class=4, size=16)
    init = [
        f"vae.init={json.dumps(str(mar))}",
        f"train.init={json.dumps(str(mar))}",
        "train.steps=1",
        "train.lr=0.0",
        "model.num_classes=4",
        'model.head="shortcut"',
    ]
    ft = load_checkpoint(train(load_run_config(None, tiny_overrides(data) + init), tmp_path / "run"))
    assert ft.cfg.head == "shortcut"
    got, ref = ft.model.state_dict(), to_mar_names(ema.state_dict())
    for k, v in got.items():
        mar_name = k[len("backbone.") :] if k.startswith("backbone.") else "diffloss." + k[len("head.") :]
        fresh = k in (
            "head.net.d_embed.weight",
            "head.net.final_layer.linear.weight",
            "head.net.final_layer.linear.bias",
        )
        assert (mar_name in ref and torch.equal(v, ref[mar_name])) != fresh, k


@pytest.mark.parametrize("head", ["mar", "shortcut"])
def test_weight_decay_as_mar(head):
    """MAR's add_weight_decay exempts every diffloss parameter: so does ours for the MAR head. The shortcut
    head keeps decay on its matrices (the recipe the shipped far-mnist was trained with)."""
    from training.trainer.optim import param_groups

    model = FAR(preset("tiny", head=head))
    no_decay, decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    head_matrices = {n for n, p in model.named_parameters() if n.startswith("head.") and p.ndim > 1}
    backbone_matrices = {n for n, p in model.named_parameters() if n.startswith("backbone.") and p.ndim > 1}
    assert backbone_matrices <= decayed and head_matrices
    assert (decayed & head_matrices) == (set() if head == "mar" else head_matrices)
    assert len(no_decay["params"]) + len(decay["params"]) == len(names)

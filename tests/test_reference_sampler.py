"""training/sample.py: the PyTorch reference sampler and its CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import tiny_model
from numerics import FP32, assert_close_to_scale
from PIL import Image

from runtime.images import make_grid
from runtime.schedule import masked_positions, masked_schedule
from training.model import backbone_step, head_step
from training.sample import SamplingSettings, _cli, generate, sample_tokens

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parent.parent

# fast settings per head: shortcut K = 2, MAR head 4 denoising steps
FAST = {"shortcut": {"head_steps": 2}, "mar": {"head_steps": 4}}


@pytest.mark.parametrize("backbone", ["masked", "causal"])
@pytest.mark.parametrize("head", ["shortcut", "mar"])
def test_every_backbone_and_head_samples(backbone: str, head: str) -> None:
    """Protects: both backbones x both heads give deterministic uint8 images of the right shape."""
    model, vae = tiny_model(backbone, head, seed=1)
    s = SamplingSettings.resolve(model.cfg, seed=3, cfg=2.0, **FAST[head])
    images = generate(model, vae, [0, 3], s)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    assert images.std() > 1.0  # not a constant picture
    again = generate(model, vae, [0, 3], s)
    np.testing.assert_array_equal(images, again)  # exact: the same computation twice in one process
    other = generate(model, vae, [0, 3], SamplingSettings.resolve(model.cfg, seed=4, cfg=2.0, **FAST[head]))
    assert not np.array_equal(images, other)


@pytest.mark.parametrize(
    ("backbone", "head"), [("masked", "shortcut"), ("causal", "shortcut"), ("masked", "mar")]
)
def test_image_does_not_depend_on_batching(backbone: str, head: str) -> None:
    """Protects the PCG64([seed, i]) contract: image i is the same in any batch size or chunking."""
    model, _ = tiny_model(backbone, head, seed=2)
    s = SamplingSettings.resolve(model.cfg, seed=5, **FAST[head])
    labels = [0, 1, 2, 3, 1]
    whole = sample_tokens(model, labels, s)
    assert whole.shape == (5, model.cfg.seq_len, model.cfg.token_dim) and whole.dtype == np.float32
    chunks = np.concatenate(
        [sample_tokens(model, labels[i : i + 2], s, first_index=i) for i in range(0, 5, 2)]
    )
    # random weights make the MAR head's x0 predictions large (~4e4): compare relative to the scale
    assert_close_to_scale(chunks, whole, FP32, "tokens sampled in chunks of 2")
    single = sample_tokens(model, [labels[3]], s, first_index=3)
    assert_close_to_scale(single[0], whole[3], FP32, "image 3 sampled alone")
    assert not np.allclose(whole[1], whole[4])  # same class, other index: another image


@pytest.mark.parametrize("head", ["shortcut", "mar"])
def test_gather_known_samples_the_same_tokens(head: str) -> None:
    """Protects the MAR reference of benchmarks/run.py's mar-b section: sampling with the encoder on
    exactly the known tokens (MAR's gather; the first step with none known) gives the tokens of the
    full masked encoder, and the sampler really takes the gathered path (it calls forward_known with
    no pads: none at all on the first step)."""
    model, _ = tiny_model("masked", head, seed=4)
    s = SamplingSettings.resolve(model.cfg, seed=1, cfg=2.0, **FAST[head])
    counts: list[int] = []  # slots per call of the real forward_known
    real = model.backbone.forward_known

    def counted(tokens, mask, class_vec, known, query=None):
        counts.append(known.shape[1])
        return real(tokens, mask, class_vec, known, query)

    model.backbone.forward_known = counted
    gathered = sample_tokens(model, [1, 2], s, gather_known=True)
    del model.backbone.forward_known
    L = model.cfg.seq_len
    assert counts == [L - st.unknown_before for st in masked_schedule(L, s.num_iter)]
    assert_close_to_scale(gathered, sample_tokens(model, [1, 2], s), FP32, "gathered vs full encoder")


def test_masked_shortcut_follows_the_documented_draw_order() -> None:
    """Protects the randomness contract that the runtime reimplements: a loop written from the
    docstring of runtime/schedule.py (permutation, then temperature * normal per step, positions
    ascending, K Euler steps, CFG doubling) gives the sampler's tokens."""
    model, _ = tiny_model("masked", "shortcut", seed=3)
    cfg = model.cfg
    L, C, K, T, seed, scale = cfg.seq_len, cfg.token_dim, 4, 0.9, 11, 2.5
    s = SamplingSettings.resolve(
        cfg, seed=seed, head_steps=K, cfg=scale, cfg_schedule="constant", temperature=T
    )
    labels = [2, 0]
    got = sample_tokens(model, labels, s, first_index=7)

    rngs = [np.random.Generator(np.random.PCG64([seed, 7 + b])) for b in range(2)]
    orders = [r.permutation(L) for r in rngs]
    tokens, mask = torch.zeros(2, L, C), torch.ones(2, L)
    bstep, hstep = backbone_step(model, True), head_step(model, True)
    with torch.no_grad():
        for step in masked_schedule(L, cfg.num_iter):
            for b in range(2):
                pos = masked_positions(orders[b], step)
                query = torch.as_tensor(pos)[None]
                z = bstep(tokens[b : b + 1], mask[b : b + 1], torch.tensor([labels[b]]), query)
                x = torch.as_tensor((T * rngs[b].standard_normal((len(pos), C))).astype(np.float32))
                for k in range(K):
                    x = hstep(x, torch.tensor([k / K]), torch.tensor([1 / K]), z, torch.tensor([scale]))
                tokens[b, pos], mask[b, pos] = x, 0.0
    assert_close_to_scale(got, tokens, FP32, "tokens of the documented loop")


def test_settings_resolve_and_reject() -> None:
    model, _ = tiny_model("masked", "shortcut")
    s = SamplingSettings.resolve(model.cfg)
    assert (s.head_steps, s.cfg, s.num_iter, s.seed) == (2, 2.0, 4, 0)
    s = SamplingSettings.resolve(model.cfg, seed=9, cfg=1.0, head_steps=None, temperature=0.5)
    assert (s.cfg, s.head_steps, s.temperature, s.seed) == (1.0, 2, 0.5, 9)
    with pytest.raises(ValueError, match="power of two"):
        SamplingSettings.resolve(model.cfg, head_steps=3)
    with pytest.raises(ValueError, match="num_iter"):
        SamplingSettings.resolve(model.cfg, num_iter=65)


def test_cfg_one_runs_unguided_and_guidance_changes_images() -> None:
    model, vae = tiny_model("masked", "shortcut", seed=4)
    base = SamplingSettings.resolve(model.cfg, seed=1, cfg=1.0)
    guided = SamplingSettings.resolve(model.cfg, seed=1, cfg=4.0)
    a = sample_tokens(model, [1], base)
    b = sample_tokens(model, [1], guided)
    assert np.abs(a - b).max() > 1e-3


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _run_cli(args: list[str]):
    return CliRunner().invoke(_cli(), args, catch_exceptions=False)


def test_cli_grid_and_files(tmp_path: Path, tiny_checkpoint) -> None:
    """Protects the shared sampling flags: --out grid (one row per class), --out-dir <index>_class<k>.png,
    the same pixels as generate()."""
    ckpt = tiny_checkpoint(tmp_path / "ckpt", seed=5)
    args = [
        "--checkpoint",
        str(ckpt),
        "--classes",
        "1-3",
        "--per-class",
        "2",
        "--head-steps",
        "2",
        "--cfg",
        "2.0",
        "--temperature",
        "0.9",
        "--seed",
        "4",
    ]
    r = _run_cli(
        [*args, "--out", str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "imgs"), "--batch", "4"]
    )
    assert r.exit_code == 0, r.output
    assert "wrote 6 images" in r.output
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * 18 + 2, 2 * 18 + 2, 3)  # 3 class rows, 2 per row, 2 px padding
    names = sorted(p.name for p in (tmp_path / "imgs").iterdir())
    assert names == [
        "00000_class1.png",
        "00001_class1.png",
        "00002_class2.png",
        "00003_class2.png",
        "00004_class3.png",
        "00005_class3.png",
    ]

    from training.checkpoint import load_checkpoint

    c = load_checkpoint(ckpt)
    s = SamplingSettings.resolve(c.cfg, seed=4, head_steps=2, cfg=2.0, temperature=0.9)
    images = generate(c.model, c.vae, [1, 1, 2, 2, 3, 3], s)
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "imgs" / "00003_class2.png")), images[3])
    np.testing.assert_array_equal(grid, make_grid(images, rows=3))
    # row r of the grid holds class r's images
    np.testing.assert_array_equal(grid[2 + 18 : 2 + 18 + 16, 2 + 18 : 2 + 18 + 16], images[3])


def test_cli_errors_are_one_line(tmp_path: Path, tiny_checkpoint) -> None:
    ckpt = str(tiny_checkpoint(tmp_path / "ckpt"))
    out = ["--out", str(tmp_path / "g.png")]
    cases = [
        (
            ["--checkpoint", ckpt, "--classes", "2-7", *out],
            "class id 4 is out of range: this model has classes 0..3",
        ),
        (["--checkpoint", str(tmp_path / "missing"), *out], "does not exist"),
        (["--checkpoint", ckpt, "--classes", "0-3", "--head-steps", "3", *out], "power of two from 1 to 128"),
        (["--checkpoint", ckpt, "--classes", "a-b", *out], "is not a list like"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(_cli(), args)
        assert r.exit_code == 1, (args, r.output)
        assert msg in r.output and "Traceback" not in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1, r.output
        assert r.exception is None or isinstance(r.exception, SystemExit)
    r = CliRunner().invoke(_cli(), ["--checkpoint", ckpt])
    assert r.exit_code == 2 and "--out" in r.output
    assert not (tmp_path / "g.png").exists()


def _subprocess(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def test_script_entry_points(tmp_path: Path, tiny_checkpoint) -> None:
    """Protects `python training/sample.py ...` from the repo root and `import training.sample`."""
    r = _subprocess(["-c", "import training.sample"], REPO)
    assert r.returncode == 0, r.stderr
    r = _subprocess(["training/sample.py", "--help"], REPO)
    assert r.returncode == 0 and "--checkpoint" in r.stdout and "--head-steps" in r.stdout, r.stderr
    r = _subprocess(["training/sample.py", "--checkpoint", str(tmp_path / "nope"), "--out", "x.png"], REPO)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("Error: checkpoint directory")


def test_parse_classes() -> None:
    from runtime.images import parse_classes, request_labels

    assert parse_classes("0-9", 10) == list(range(10))
    assert parse_classes("1,3, 7", 10) == [1, 3, 7]
    assert parse_classes("0-2,5", 10) == [0, 1, 2, 5]
    assert request_labels([2, 5], 3) == [2, 2, 2, 5, 5, 5]
    for spec, msg in [
        ("5-2", "runs backwards"),
        ("x", "is not a list like"),
        ("10", "class id 10 is out of range"),
        ("", "is not a list like"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_classes(spec, 10)
    with pytest.raises(ValueError, match="per-class"):
        request_labels([1], 0)

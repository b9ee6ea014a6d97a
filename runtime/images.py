"""Requests and pictures shared by both samplers: class lists, image indices, grids, PNG files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from runtime.errors import RequestError
from runtime.files import check_output_dir, check_output_file, write_atomic
from runtime.limits import MAX_GRID_IMAGES, MAX_IMAGES


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """'0-9' / '1,3,7' / '0-2,5' -> class ids, each checked against num_classes before any list is made."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise RequestError(f"--classes {spec!r} is not a list like '0-9' or '1,3,7'")
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if hi < lo:
            raise RequestError(f"--classes range {part.strip()!r} runs backwards: write it as '{hi}-{lo}'")
        if hi >= num_classes:
            bad = max(lo, num_classes)  # the first id of the range that does not exist
            raise RequestError(f"class id {bad} is out of range: this model has classes 0..{num_classes - 1}")
        if len(out) + hi - lo + 1 > MAX_IMAGES:
            raise RequestError(f"--classes {spec!r} names more than {MAX_IMAGES} classes: name fewer")
        out.extend(range(lo, hi + 1))
    if not out:
        raise RequestError(f"--classes {spec!r} names no class")
    return out


def request_labels(classes: list[int], per_class: int) -> list[int]:
    """Image i of a request has class labels[i]: per_class images of each class, class by class."""
    if per_class < 1:
        raise RequestError(f"--per-class must be >= 1, got {per_class}")
    if len(classes) * per_class > MAX_IMAGES:
        raise RequestError(
            f"{len(classes)} classes x --per-class {per_class} = {len(classes) * per_class} images is "
            f"more than one request's limit of {MAX_IMAGES}: split it into several runs"
        )
    return [c for c in classes for _ in range(per_class)]


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8."""
    return (np.clip(images, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: np.ndarray, rows: int, pad: int = 2) -> np.ndarray:
    """(B, H, W, 3) uint8 -> one picture with `rows` rows (one per class), filled row by row."""
    B, H, W, _ = images.shape
    cols = -(-B // rows)
    grid = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        grid[y : y + H, x : x + W] = img
    return grid


IMAGE_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".gif": "GIF",
    ".ppm": "PPM",
}


def image_format(path: Path, flag: str = "--out") -> str:
    """The Pillow format an output's extension names; unknown extensions are refused up front."""
    from PIL import features

    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None or (fmt == "WEBP" and not features.check("webp")):
        known = ", ".join(e for e, f in IMAGE_FORMATS.items() if f != "WEBP" or features.check("webp"))
        raise RequestError(
            f"{flag} {path}: unknown image extension {path.suffix or '(none)'!r}; use one of {known}"
        )
    return fmt


def save_image(array: np.ndarray, path: Path, fmt: str = "PNG") -> None:
    """Encode in memory, then write atomically (a reader never sees half a picture)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    write_atomic(path, buf.getvalue())


IMAGE_NAME = re.compile(r"\d{5,}_class\d+\.png")  # what ImageWriter writes into --out-dir


def earlier_images(d: Path) -> list[Path]:
    """The images an earlier run wrote into the directory d (none if d does not exist)."""
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if IMAGE_NAME.fullmatch(p.name))


def class_ranges(classes: list[int]) -> str:
    """[0, 1, 2, 3, 7] -> '0-3,7' (the --classes syntax)."""
    parts: list[str] = []
    i = 0
    while i < len(classes):
        j = i
        while j + 1 < len(classes) and classes[j + 1] == classes[j] + 1:
            j += 1
        parts.append(str(classes[i]) if i == j else f"{classes[i]}-{classes[j]}")
        i = j + 1
    return ",".join(parts)


class ImageWriter:
    """Writes a request's images batch by batch: each one into `out_dir` (`<index>_class<k>.png`) as soon as
    its batch is done; the grid (`out`, one row per class) at the end. Every output is checked when the
    writer is made, before any image is generated. An `out_dir` that holds an earlier run's images is
    refused (the two runs would mix), unless `overwrite`: then those images are removed when this run's
    first batch is ready."""

    def __init__(
        self, labels: list[int], rows: int, out: str | None, out_dir: str | None, overwrite: bool = False
    ):
        self.labels, self.rows = labels, rows
        self.out = check_output_file(out, "--out") if out else None
        self.fmt = image_format(self.out) if self.out else "PNG"
        self.out_dir = check_output_dir(out_dir, "--out-dir") if out_dir else None
        if self.out and len(labels) > MAX_GRID_IMAGES:
            raise RequestError(
                f"a grid of {len(labels)} images is more than {MAX_GRID_IMAGES} (it is held in memory "
                f"whole): write them one by one with --out-dir"
            )
        self._earlier = earlier_images(self.out_dir) if self.out_dir else []
        if self._earlier and not overwrite:
            raise RequestError(
                f"--out-dir {self.out_dir} already holds {len(self._earlier)} images of an earlier run "
                f"({self._earlier[0].name}, ...): give a new or empty directory, or --overwrite to "
                "replace them"
            )
        self._grid: list[np.ndarray] = []
        self.count, self.first_path = 0, None

    def add(self, images: np.ndarray) -> None:
        """The next images of the request, (n, H, W, 3) uint8, in order."""
        if self.out_dir:
            for p in self._earlier:  # --overwrite: the earlier run's images go, none mixes with this run's
                p.unlink(missing_ok=True)
            self._earlier = []
            for img in images:
                p = self.out_dir / f"{self.count:05d}_class{self.labels[self.count]}.png"
                save_image(img, p)
                self.first_path = self.first_path or p
                self.count += 1
        if self.out:
            self._grid.append(images)

    def close(self) -> str:
        """Write the grid; a one-line summary of what was written."""
        n = sum(len(g) for g in self._grid) if self.out else self.count
        if self.out:
            save_image(make_grid(np.concatenate(self._grid), self.rows), self.out, self.fmt)
        files = (1 if self.out else 0) + self.count
        first = self.out or self.first_path
        return f"wrote {n} images: {first}" + (f" (+{files - 1} files)" if files > 1 else "")

    @property
    def grid_caption(self) -> str | None:
        """What the grid shows, in one line (None without a grid)."""
        if not self.out:
            return None
        classes = list(dict.fromkeys(self.labels))
        cols = -(-len(self.labels) // self.rows)
        each = f"the {cols} images of each class" if cols > 1 else "one image per class"
        return (
            f"{self.out.name}: one row per class ({class_ranges(classes)}, top to bottom), "
            f"{each} left to right in index order"
        )


def write_outputs(
    images: np.ndarray, labels: list[int], rows: int, out: str | None, out_dir: str | None
) -> str:
    """Write the grid (`out`) and/or one PNG per image (`out_dir`); a one-line summary."""
    writer = ImageWriter(labels, rows, out, out_dir)
    writer.add(images)
    return writer.close()

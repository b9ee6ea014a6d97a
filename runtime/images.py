"""Requests and pictures shared by both samplers: class lists, image indices, grids, PNG files."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

from runtime.manifest import write_atomic


def parse_classes(spec: str, num_classes: int) -> list[int]:
    """'0-9' / '1,3,7' / '0-2,5' -> class ids, each checked against num_classes."""
    out: list[int] = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"--classes {spec!r} is not a list like '0-9' or '1,3,7'")
        lo = int(m.group(1))
        hi = int(m.group(2) or lo)
        if hi < lo:
            raise ValueError(f"--classes range {part.strip()!r} runs backwards: write it as '{hi}-{lo}'")
        out.extend(range(lo, hi + 1))
    if not out:
        raise ValueError(f"--classes {spec!r} names no class")
    bad = [c for c in out if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class id {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    return out


def request_labels(classes: list[int], per_class: int) -> list[int]:
    """Image i of a request has class labels[i]: per_class images of each class, class by class."""
    if per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {per_class}")
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


def _save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    write_atomic(path, buf.getvalue())


def write_outputs(images: np.ndarray, labels: list[int], rows: int, out: str | None, out_dir: str | None) -> list[Path]:
    """Write the grid (`out`) and/or one PNG per image (`out_dir`, named `<index>_class<k>.png`)."""
    written = []
    if out:
        _save_png(make_grid(images, rows), Path(out))
        written.append(Path(out))
    if out_dir:
        for i, (img, k) in enumerate(zip(images, labels)):
            p = Path(out_dir) / f"{i:05d}_class{k}.png"
            _save_png(img, p)
            written.append(p)
    return written

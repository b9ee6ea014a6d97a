"""The sampling flags shared by `python training/sample.py` and `far-export sample`.

Both CLIs decorate their command with `sampling_options`, so the same flags (and
defaults: None means "the model's default from its config/manifest") give the
same picture from the PyTorch reference and from the runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import click


@dataclass(frozen=True)
class SampleRequest:
    classes: str = "0-9"
    per_class: int = 1
    head_steps: int | None = None
    cfg: float | None = None
    cfg_schedule: str | None = None
    temperature: float | None = None
    num_iter: int | None = None
    seed: int = 0
    batch: int | None = None
    out: str | None = None
    out_dir: str | None = None


def sampling_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option("--classes", default="0-9", show_default=True, help="Class ids: '0-9', '1,3,7', '0-2,5'."),
        click.option("--per-class", default=1, show_default=True, type=click.IntRange(min=1), help="Images per class (one grid row per class)."),
        click.option("--head-steps", "-k", type=click.IntRange(min=1), default=None, help="Head steps K per token (shortcut: power of two <= 128; MAR head: denoising steps). Default: the model's."),
        click.option("--cfg", type=float, default=None, help="Classifier-free guidance scale. Default: the model's."),
        click.option("--cfg-schedule", type=click.Choice(["linear", "constant"]), default=None, help="CFG schedule over AR steps. Default: the model's."),
        click.option("--temperature", type=click.FloatRange(min=0, min_open=True), default=None, help="Sampling temperature. Default: the model's."),
        click.option("--num-iter", type=click.IntRange(min=1), default=None, help="Masked backbone: AR steps. Default: the model's (engines fix it at build time)."),
        click.option("--seed", default=0, show_default=True, type=int, help="Image i draws from PCG64([seed, i])."),
        click.option("--batch", type=click.IntRange(min=1), default=None, help="Images per forward pass. Default: all (reference) / the engine batch (runtime)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write a grid PNG, one row per class."),
        click.option("--out-dir", type=click.Path(file_okay=False), default=None, help="Write one PNG per image: <index>_class<k>.png."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def request_from_kwargs(kwargs: dict[str, Any]) -> SampleRequest:
    req = SampleRequest(**{k: kwargs.pop(k) for k in list(kwargs) if k in SampleRequest.__dataclass_fields__})
    if not req.out and not req.out_dir:
        raise click.UsageError("give --out grid.png and/or --out-dir DIR")
    return req

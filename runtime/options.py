"""The sampling flags of every command that samples, each defined once (SAMPLING_FLAGS), and the CLIs'
one-line error handling.

`python training/sample.py` and `far-export sample` decorate their command with `sampling_options`, so
the same flags (and defaults: None means "the model's default from its config/manifest") give the same
picture from the PyTorch reference and from the runtime; `far-export bench` and `serve` take the subsets
they use through `sampling_flags(...)`.
"""

from __future__ import annotations

import errno
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import click

from runtime.errors import FarError, first_line
from runtime.limits import MAX_BATCH, MAX_CFG, MAX_TEMPERATURE
from runtime.schedule import CFG_SCHEDULES


class FiniteFloat(click.ParamType):
    """A float flag that refuses NaN and +-inf (they would turn every image black), with optional bounds."""

    name = "float"

    def __init__(self, min: float | None = None, min_open: bool = False, max: float | None = None):
        self.min, self.min_open, self.max = min, min_open, max

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            x = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(x):
            self.fail(f"{value!r} is not a finite number: give a value like 1.0 or 2.5", param, ctx)
        lo = self.min
        if lo is not None and (x <= lo if self.min_open else x < lo):
            self.fail(f"{value} must be {'>' if self.min_open else '>='} {lo}", param, ctx)
        if self.max is not None and x > self.max:
            self.fail(f"{value} must be <= {self.max}", param, ctx)
        return x


SEED = click.IntRange(min=0, max=2**63 - 1)  # PCG64([seed, i]) takes non-negative seeds
BATCH = click.IntRange(min=1, max=MAX_BATCH)
THREADS = click.IntRange(min=1, max=1024)


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
    overwrite: bool = False


SAMPLING_FLAGS: dict[str, Callable[[Callable[..., Any]], Callable[..., Any]]] = {  # name -> click option
    "classes": click.option(
        "--classes", default="0-9", show_default=True, help="Class ids: '0-9', '1,3,7', '0-2,5'."
    ),
    "per_class": click.option(
        "--per-class",
        default=1,
        show_default=True,
        type=click.IntRange(min=1),
        help="Images per class (one grid row per class).",
    ),
    "head_steps": click.option(
        "--head-steps",
        "-k",
        type=click.IntRange(min=1),
        default=None,
        help="Head steps K per token (shortcut: power of two <= 128; MAR head: denoising steps). "
        "Default: the model's.",
    ),
    "cfg": click.option(
        "--cfg",
        type=FiniteFloat(min=-MAX_CFG, max=MAX_CFG),
        default=None,
        help="Classifier-free guidance scale. Default: the model's.",
    ),
    "cfg_schedule": click.option(
        "--cfg-schedule",
        type=click.Choice(CFG_SCHEDULES),
        default=None,
        help="CFG schedule over AR steps. Default: the model's.",
    ),
    "temperature": click.option(
        "--temperature",
        type=FiniteFloat(min=0, min_open=True, max=MAX_TEMPERATURE),
        default=None,
        help="Sampling temperature. Default: the model's.",
    ),
    "num_iter": click.option(
        "--num-iter",
        type=click.IntRange(min=1),
        default=None,
        help="Masked backbone: AR steps. Default: the model's (engines fix it at build time).",
    ),
    "seed": click.option(
        "--seed", default=0, show_default=True, type=SEED, help="Image i draws from PCG64([seed, i])."
    ),
    "batch": click.option(
        "--batch",
        type=BATCH,
        default=None,
        help="Images per forward pass. Default: 64 (reference) / the engine batch (runtime).",
    ),
    "out": click.option(
        "--out",
        type=click.Path(),
        default=None,
        help="Write a grid picture, one row per class, in the format its extension names "
        "(.png, .jpg, .webp, ...).",
    ),
    "out_dir": click.option(
        "--out-dir",
        type=click.Path(),
        default=None,
        help="Write one PNG per image: <index>_class<k>.png, into a directory that holds no earlier run's "
        "images (or give --overwrite).",
    ),
    "overwrite": click.option(
        "--overwrite",
        is_flag=True,
        help="Let --out-dir replace the images an earlier run wrote there (removed once this run's first "
        "images are ready).",
    ),
}


Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def flags(*decorators: Decorator) -> Decorator:
    """One decorator adding click options in the order given (as if stacked top to bottom)."""

    def add(f: Callable[..., Any]) -> Callable[..., Any]:
        for d in reversed(decorators):
            f = d(f)
        return f

    return add


def sampling_flags(*names: str) -> Decorator:
    """The named SAMPLING_FLAGS, in this order: each flag is defined once, here, for every command that takes
    it (far-export sample, bench, serve and training/sample.py)."""
    return flags(*(SAMPLING_FLAGS[name] for name in names))


sampling_options = sampling_flags(*SAMPLING_FLAGS)  # a whole request: far-export sample, training/sample.py


def request_from_kwargs(kwargs: dict[str, Any]) -> SampleRequest:
    req = SampleRequest(**{k: kwargs.pop(k) for k in list(kwargs) if k in SampleRequest.__dataclass_fields__})
    if not req.out and not req.out_dir:
        raise click.UsageError("give --out grid.png and/or --out-dir DIR")
    return req


class Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread (where Python runs every handler, whatever thread the
    kernel delivered the signal to), so that `finally` blocks and atomic writes remove their temporaries."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextmanager
def signals_raise() -> Iterator[None]:
    """Within the block SIGTERM and SIGHUP raise Terminated (their default would end the process at once,
    leaving temporary files behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated(signum)

    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    old = {sig: signal.signal(sig, stop) for sig in wanted}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def one_line_errors(stopped: str = "nothing was left half-written") -> Iterator[None]:
    """Bad input (a FarError, or an OSError about a named file) becomes one `Error: ...` line and exit 1;
    SIGTERM and SIGHUP one line and exit 128 + the signal's number, temporaries removed; anything else is
    a bug and keeps its traceback. `stopped`: what an interrupted command leaves (said after Ctrl-C and
    the signals)."""
    try:
        with signals_raise():
            yield
    except click.ClickException:
        raise
    except Terminated as e:
        name = signal.Signals(e.signum).name
        click.echo(f"Error: stopped by {name}; {stopped}", err=True)
        sys.exit(128 + e.signum)
    except KeyboardInterrupt:
        raise click.ClickException(f"interrupted; {stopped}") from None
    except FarError as e:
        raise click.ClickException(first_line(e)) from None
    except MemoryError:
        raise click.ClickException("out of memory: use a smaller --batch or fewer images") from None
    except OSError as e:
        if e.filename is None and e.errno != errno.ENOSPC:
            raise
        raise click.ClickException(os_error_line(e)) from None


def os_error_line(e: OSError) -> str:
    """An OSError about a file as one line with what to do."""
    where = f" ({e.filename})" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device{where}: free some space and run again (nothing was replaced)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: fix the permissions or choose another path"
    if e.errno == errno.EROFS:
        return f"read-only file system{where}: choose a writable path"
    return f"{e.strerror or type(e).__name__}{where}: check the path"

"""The project's error base class and the checks of the numbers every request and config gives.

Every error that bad input can cause derives from `FarError` (ManifestError, RequestError,
BackendError, ConfigError, CheckpointError, BuildError, ExportError, ValidationError, ...);
each keeps its older builtin base (RuntimeError/ValueError) for callers that catch those.
The CLIs print a FarError as one `Error: ...` line; anything else is a bug and shows its
traceback. stdlib only.
"""

from __future__ import annotations

import math
import sys
from typing import Any

from runtime.limits import MAX_CFG, MAX_TEMPERATURE


class FarError(Exception):
    """Bad input or a failed step, explained in one line that names the problem and the fix."""


class RequestError(FarError, ValueError):
    """A generation request the engines cannot serve: class id, batch, K, num_iter, CFG, outputs."""


class InputFileError(FarError, OSError):
    """A file or directory we read that is missing, unreadable or not a regular file."""


def first_line(e: BaseException) -> str:
    """The first line of an error's message (or its type's name)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ----------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------


def finite(name: str, value: Any, error: type[FarError] = RequestError, bound: float = 1e30) -> float:
    """`value` as a finite float with |value| <= bound, or a one-line error naming `name` (NaN and +-inf
    guide nothing; values that overflow float32 become inf inside the graphs)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise error(f"{name} must be a finite number, got {value}: give a value like 1.0 or 2.5")
    if abs(value) > bound:
        raise error(f"{name} {value} is out of range: use a value within +-{bound:g}")
    return float(value)


def exact_int(name: str, value: Any, error: type[FarError] = RequestError) -> int:
    """`value` as an int when it is exactly an integer (Python or numpy; not a bool, float or string), else a
    one-line error naming `name` (3.7 must not quietly become 3, nor "37" the classes 3 and 7)."""
    if isinstance(value, bool) or not isinstance(value, (int, np_integer())):
        raise error(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


def np_integer() -> tuple[type, ...]:
    """numpy's integer scalar type when numpy is already imported (this module stays stdlib only)."""
    np = sys.modules.get("numpy")
    return (np.integer,) if np is not None else ()


def sampling_numbers(cfg: Any, temperature: Any, error: type[FarError] = RequestError) -> tuple[float, float]:
    """The guidance scale and temperature of a request or a config: finite, in range, temperature > 0."""
    c = finite("cfg (guidance scale)", cfg, error, MAX_CFG)
    t = finite("temperature", temperature, error, MAX_TEMPERATURE)
    if not t > 0:
        raise error(f"temperature must be > 0, got {t}")
    return c, t

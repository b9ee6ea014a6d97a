"""The project's error base class and the checks every input and output goes through.

Every error that bad input can cause derives from `FarError` (ManifestError, RequestError,
BackendError, ConfigError, CheckpointError, BuildError, ExportError, ValidationError, ...);
each keeps its older builtin base (RuntimeError/ValueError) for callers that catch those.
The CLIs print a FarError as one `Error: ...` line; anything else is a bug and shows its
traceback. stdlib only.
"""

from __future__ import annotations

import math
import os
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any


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


# Limits of one request or build: far above any real use, low enough to refuse before memory runs out.
MAX_BATCH = 4096  # images per graph call
MAX_IMAGES = 1_000_000  # images per sampling request (generated and written batch by batch)
MAX_GRID_IMAGES = 4096  # a grid picture is held in memory whole


# ----------------------------------------------------------------------------
# Numbers
# ----------------------------------------------------------------------------


MAX_CFG = 1000.0  # |guidance scale|: float32 buffers hold it, and no real sampler goes near it
MAX_TEMPERATURE = 100.0


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


# ----------------------------------------------------------------------------
# Files we read: only regular files, with a reason that says what is wrong
# ----------------------------------------------------------------------------


def regular_file(path: str | Path, error: type[FarError] = InputFileError, fix: str = "") -> Path:
    """`path` if it is a readable regular file; else `error` saying why (missing, a directory, a FIFO or
    device that would block a read, permission denied)."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path} is missing{tail}") from None
    except PermissionError:
        raise error(
            f"{path} cannot be read (permission denied): fix the permissions of its directory"
        ) from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror}){tail}") from None
    if stat.S_ISDIR(st.st_mode):
        raise error(f"{path} is a directory, not a file{tail}")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{path} is not a regular file (a FIFO, socket or device): replace it with the real file")
    if not os.access(path, os.R_OK):
        raise error(f"{path} cannot be read (permission denied): fix its permissions (chmod u+r)")
    return path


def read_regular(path: str | Path, error: type[FarError] = InputFileError, fix: str = "") -> bytes:
    """The bytes of a regular file (see `regular_file`); OSError while reading becomes `error`."""
    path = regular_file(path, error, fix)
    try:
        return path.read_bytes()
    except PermissionError:
        raise error(f"{path} cannot be read (permission denied): fix its permissions (chmod u+r)") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror}){'; ' + fix if fix else ''}") from None


def directory(path: str | Path, what: str, error: type[FarError] = InputFileError, fix: str = "") -> Path:
    """`path` if it is a readable directory; else `error`: missing, a file, or unreadable."""
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist{tail}") from None
    except OSError as e:
        raise error(
            f"{what} {path} cannot be read ({e.strerror}): check the path and its permissions"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise error(f"{what} {path} is a file, not a directory{tail}")
    if not os.access(path, os.R_OK | os.X_OK):
        raise error(f"{what} {path} cannot be read (permission denied): fix its permissions (chmod u+rx)")
    return path


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, symlinks resolved, lies inside `root` (resolved)."""
    p, r = path.resolve(), root.resolve()
    return p == r or r in p.parents


# ----------------------------------------------------------------------------
# Files we write: never into an engine or checkpoint directory, never over a directory
# ----------------------------------------------------------------------------


def artifact_dir(d: Path) -> str | None:
    """'engine' or 'checkpoint' when `d` is such a directory (its files must never be overwritten)."""
    try:
        if (d / "manifest.json").exists():
            return "engine"
        if (d / "config.json").exists() and (d / "model.safetensors").exists():
            return "checkpoint"
    except OSError:
        return None
    return None


def artifact_ancestor(d: Path) -> tuple[str, Path] | None:
    """(kind, directory) for the first of `d` (resolved) and its ancestors that is an engine or checkpoint
    directory: nothing may be written anywhere under one (a rebuild replaces the whole directory)."""
    for p in (d, *d.parents):
        kind = artifact_dir(p)
        if kind:
            return kind, p
    return None


def check_output_file(path: str | Path, flag: str, error: type[FarError] = RequestError) -> Path:
    """Refuse, before any work, an output file that would replace a directory or a special file, land in an
    engine or checkpoint directory, or sit under a path that cannot be created or written."""
    path = Path(path)
    if (
        len(os.fsencode(path.name)) > 200
    ):  # the temporary sibling adds a few characters; most file systems stop at 255
        raise error(f"{flag} {path.name[:20]}...: the file name is too long; use a shorter one")
    if path.is_dir():
        raise error(f"{flag} {path} is a directory: give a file name")
    if path.exists() and not path.is_file():
        raise error(f"{flag} {path} is not a regular file: give another file name")
    parent = path.resolve().parent
    found = artifact_ancestor(parent)
    if found:
        kind, d = found
        raise error(
            f"{flag} {path} is inside the {kind} directory {d}: a rebuild would delete it; write outside it"
        )
    writable_ancestor(parent, flag, path, error)
    return path


def probe_write(d: Path, flag: str, path: Path, error: type[FarError]) -> None:
    """Create and remove a file in an existing directory `d`: a write that would fail at the end fails now."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".far-probe-", dir=d)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise error(f"{flag} {path}: cannot write in {d} ({e.strerror}); choose another place") from None


def check_output_dir(path: str | Path, flag: str, error: type[FarError] = RequestError) -> Path:
    """The same for a directory that receives new files."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise error(f"{flag} {path} is a file, not a directory: give a directory")
    found = artifact_ancestor(path.resolve())
    if found:
        kind, d = found
        where = "is" if d == path.resolve() else f"is inside {d},"
        raise error(
            f"{flag} {path} {where} {'an' if kind == 'engine' else 'a'} {kind} directory: write elsewhere"
        )
    writable_ancestor(path.resolve(), flag, path, error)
    return path


def writable_ancestor(d: Path, flag: str, path: Path, error: type[FarError]) -> None:
    """The first existing one of d and its ancestors must be a writable directory."""
    for p in (d, *d.parents):
        if p.exists():
            if not p.is_dir():
                raise error(f"{flag} {path}: {p} is a file, not a directory")
            if not os.access(p, os.W_OK | os.X_OK):
                raise error(f"{flag} {path}: {p} is not writable; choose another place")
            probe_write(p, flag, path, error)
            return

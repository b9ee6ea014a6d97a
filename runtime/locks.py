"""A directory one process at a time works in (a training run), held with an advisory lock on the
directory itself (flock on its file descriptor): no lock file is left behind, and the kernel releases the
lock when the process ends however it ends (SIGKILL included). stdlib only; where there is no flock
(Windows) nothing is locked."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import FarError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]


@contextmanager
def locked_dir(path: str | Path, what: str, error: type[FarError]) -> Iterator[None]:
    """Hold `path` (an existing directory) for this process; `error` in one line when another process holds
    it."""
    path = Path(path)
    try:
        fd = lock(path, block=False)
    except BlockingIOError:
        raise error(
            f"{what} {path} is in use by another process: wait for it to finish or stop it first"
        ) from None
    except OSError as e:
        raise error(f"{what} {path} cannot be opened ({e.strerror})") from None
    try:
        yield
    finally:
        os.close(fd)  # releases the lock


def lock(path: Path, block: bool = True) -> int:
    """An exclusive flock on the directory `path`, held until the returned descriptor is closed
    (BlockingIOError when not `block` and another process holds it)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_within(path: Path, seconds: float) -> int | None:
    """`lock(path)` if it can be had within `seconds`, else None (a lock others hold briefly, such as the
    parent an engine directory is built in: a training run holds its run directory for hours)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return lock(path, block=False)
        except BlockingIOError:
            if time.monotonic() > deadline:
                return None
            time.sleep(0.02)
        except OSError:  # cannot be opened: the build's own checks name that
            return None


def held(path: Path) -> bool:
    """Whether another process holds the directory `path` (False when it cannot be opened)."""
    try:
        os.close(lock(path, block=False))
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False

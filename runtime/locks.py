"""A directory one process at a time works in (a training run), held with an advisory lock on the
directory itself (flock on its file descriptor): no lock file is left behind, and the kernel releases the
lock when the process ends however it ends (SIGKILL included). stdlib only."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import FarError


@contextmanager
def locked_dir(path: str | Path, what: str, error: type[FarError]) -> Iterator[None]:
    """Hold `path` (an existing directory) for this process; `error` in one line when another process holds
    it."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise error(f"{what} {path} cannot be opened ({e.strerror})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise error(
                f"{what} {path} is in use by another process: wait for it to finish or stop it first"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock

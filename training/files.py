"""Run-directory files: writes that go through a temporary name and clean it up when they fail,
with a one-line reason (a full disk is named as such), and reads of regular files only (a FIFO
or a directory given as a file is refused, never opened)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path


class RunFileError(RuntimeError):
    """A run file that cannot be written or read (full disk, not a regular file)."""


def write_failure(path: Path, e: BaseException) -> str:
    """A one-line reason for a failed write of `path`: ENOSPC and EFBIG say what to do."""
    code = getattr(e, "errno", None)
    text = str(e)
    if code == errno.ENOSPC or "os error 28" in text or code == errno.EDQUOT or "os error 122" in text:
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 1e6:.1f} MB free)"
        except OSError:
            free = ""
        return (f"cannot write {path}: the disk is full{free}; free some space (or choose an --out on "
                f"another disk), then continue with --resume")
    if code == errno.EFBIG or "os error 27" in text:
        return f"cannot write {path}: file size limit exceeded (ulimit -f); raise the limit, then continue with --resume"
    return f"cannot write {path}: {getattr(e, 'strerror', None) or text}"


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(tmp)` fills `PATH.tmp`, which then replaces `path`: readers never see half a file.
    On any failure the temporary file is removed; OS and serialisation errors become RunFileError."""
    from safetensors import SafetensorError

    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, (OSError, SafetensorError)):
            raise RunFileError(write_failure(path, e)) from None
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    return write_atomic(path, lambda tmp: tmp.write_text(text))


def torch_save_atomic(obj: object, path: Path) -> Path:
    """torch.save through a Python file object, so that a failed write raises OSError (with its errno),
    not torch's 'unexpected pos' RuntimeError."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return write_atomic(path, write)


def check_regular_file(path: Path, what: str) -> Path:
    """`path` if it is a regular file (after symlinks); a one-line RunFileError otherwise."""
    if not path.exists():
        raise RunFileError(f"{what} {path} does not exist")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a FIFO, socket or device)"
        raise RunFileError(f"{what} {path} is {kind}: give a regular file")
    return path


def read_text(path: Path, what: str) -> str:
    """A regular file's UTF-8 text, or a one-line RunFileError."""
    check_regular_file(path, what)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RunFileError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise RunFileError(f"cannot read {what} {path}: {e.strerror}") from None

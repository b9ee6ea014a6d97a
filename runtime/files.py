"""Files and directories we write: through a temporary sibling that replaces the target only when it
is complete (readers never see half a file, a failed write leaves nothing behind), with the usual
permissions (0666 / 0777 less the umask, never mkstemp's 0600), and a one-line WriteError that says
what went wrong (a full disk named as such). stdlib only: the runtime, the exporter and training use it.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import secrets
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.errors import FarError


class WriteError(FarError, OSError):
    """A file or directory that cannot be written (full disk, file size limit, permissions)."""


def write_failure(path: Path, e: BaseException) -> str:
    """A one-line reason for a failed write of `path`: a full disk and a file size limit say what to do.
    (Some writers, e.g. safetensors, carry the OS error only in their text: 'os error 28'.)"""
    code = getattr(e, "errno", None)
    text = str(e)
    if code in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in text or "os error 122" in text:
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 1e6:.1f} MB free)"
        except OSError:
            free = ""
        return f"cannot write {path}: the disk is full{free}; free some space or write to another disk"
    if code == errno.EFBIG or "os error 27" in text:
        return f"cannot write {path}: file size limit exceeded (ulimit -f); raise the limit"
    return f"cannot write {path}: {getattr(e, 'strerror', None) or text}"


def usual_mode(is_dir: bool) -> int:
    """The mode a plain open() or mkdir() would give: 0666 (files) or 0777 (directories) less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if is_dir else 0o666) & ~umask


@contextmanager
def atomic_path(path: str | Path, errors: tuple[type[BaseException], ...] = ()) -> Iterator[Path]:
    """Yields a temporary sibling of `path` (`.NAME.XXXXXXXX.tmp`, not created yet) for the caller to
    write a file or make a directory at. On success it gets the usual permissions and replaces `path`
    (a directory through `replace_dir`); on any failure it is removed. OSError, and the `errors` given
    (a writer's own error types), become a WriteError naming `path`."""
    path = Path(path)
    sweep_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        if tmp.is_dir() and not tmp.is_symlink():
            replace_dir(tmp, path)
        else:
            os.chmod(tmp, usual_mode(False))
            os.replace(tmp, path)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, (OSError, *errors)) and not isinstance(e, FarError):
            raise WriteError(write_failure(path, e)) from None
        raise


def sweep_stale_temporaries(path: Path) -> None:
    """Remove the temporary siblings of `path` (`.NAME.PID-XXXXXXXX.tmp`) that a killed writer left (SIGKILL,
    power loss): those whose process is gone. A live writer's, and anything else, stay."""
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.tmp", tmp.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(tmp)


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (another user's counts as alive: it is not ours to judge)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """`data` (text as UTF-8) written to `path` through a temporary sibling (see `atomic_path`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the complete directory `src` (e.g. a mkdtemp one) over `dst`, it and the files and folders in
    it with the usual permissions (mkdtemp makes 0700, safetensors writes 0600). An existing `dst` is
    swapped with `src` in one rename (Linux renameat2 RENAME_EXCHANGE), so a signal or a kill at any
    point leaves `dst` whole, old or new; the old one, then at `src`'s name, is removed after. Where the
    exchange is not supported, `dst` is moved aside first and removed only after."""
    _usual_permissions(src)
    if dst.exists() and exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)
        return
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` (same file system) in one atomic rename; False where the kernel, the C
    library or the file system cannot (then nothing changed)."""
    if sys.platform != "linux":
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):  # glibc < 2.28, musl
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _usual_permissions(d: Path) -> None:
    """`d` and everything below it (symlinks left alone): 0777 / 0666 less the umask."""
    dir_mode, file_mode = usual_mode(True), usual_mode(False)
    d.chmod(dir_mode)
    for root, dirs, files in os.walk(d):
        for name in dirs + files:
            p = Path(root) / name
            if not p.is_symlink():
                p.chmod(dir_mode if p.is_dir() else file_mode)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)

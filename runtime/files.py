"""Files and directories: the checks of what we read (regular files only, with a reason) and of where we
write (never into an engine or checkpoint directory, never over a directory), atomic writes (through a
temporary sibling that replaces the target only when complete, with the usual permissions, 0666 / 0777 less
the umask, never mkstemp's 0600, and a one-line WriteError that names a full disk as such), and the staged
directory a build writes into beside its output (and the checks of that output), with the signals that must
not leave it half-written. stdlib only (an engine directory's file list is read with runtime/manifest.py):
the runtime, the exporter and training use it.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from runtime.errors import FarError, RequestError
from runtime.locks import held, lock, lock_within


class InputFileError(FarError, OSError):
    """A file or directory we read that is missing, unreadable or not a regular file."""


class WriteError(FarError, OSError):
    """A file or directory that cannot be written (full disk, file size limit, permissions)."""


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
    short_name(path, flag, error)
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


def short_name(path: Path, flag: str, error: type[FarError]) -> None:
    """Refuse a name whose temporary sibling (`.NAME.build-PID-XXXXXXXX`, `.NAME.PID-XXXXXXXX.tmp`: up to 24
    bytes more) would pass the 255 bytes most file systems allow a name."""
    if len(os.fsencode(path.name)) > 255 - 24:
        raise error(
            f"{flag} {path.name[:20]}...: the name is too long; use a shorter one (at most 231 bytes)"
        )


def utf8_path(path: Path, flag: str, error: type[FarError]) -> None:
    """Refuse a path that is not valid UTF-8 (bytes a file system accepts): ONNX Runtime and safetensors take
    paths as UTF-8 text and cannot open it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise error(
            f"{flag} {path}: the path is not valid UTF-8, which ONNX Runtime and safetensors cannot open; "
            "rename it"
        ) from None


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
    dangling(path, flag, error)
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


def dangling(path: Path, flag: str, error: type[FarError]) -> None:
    """Refuse a symlink to nothing (writing through it would fail only at the end)."""
    if path.is_symlink() and not path.exists():
        raise error(
            f"{flag} {path} is a symlink to {os.readlink(path)}, which does not exist: create it first"
        )


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


# ----------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------


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
    power loss): those whose process is gone. A live writer's, and anything else, stay. An interrupted
    directory replace is finished (`recover_old`)."""
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.*.tmp"))
    except OSError:
        return
    for tmp in candidates:
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.(\d+)-[0-9a-f]{{8}}\.tmp", tmp.name)
        if m and not pid_alive(int(m.group(1))):
            _remove(tmp)
    recover_old(path)


def recover_old(path: Path) -> None:
    """`.NAME.old-PID`, left by a process that died inside `replace_dir`'s fallback (no RENAME_EXCHANGE):
    renamed back to `path` when `path` is missing (the process died between the two renames: it is the only
    copy), removed when `path` is there (it died after the second)."""
    try:
        candidates = list(path.parent.glob(f".{glob.escape(path.name)}.old-*"))
    except OSError:
        return
    for old in candidates:
        m = re.fullmatch(rf"\.{re.escape(path.name)}\.old-(\d+)", old.name)
        if m and not pid_alive(int(m.group(1))):
            finish_replace(old, path)


def finish_replace(old: Path, path: Path) -> None:
    """The end of an interrupted fallback replace: `old` back at `path` when that is missing, else removed."""
    if not old.is_dir() or old.is_symlink():
        return
    if path.exists() or path.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(old, path)


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
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")  # the name finish_replace knows
    try:
        if dst.exists():
            os.replace(dst, old)
        os.replace(src, dst)
    finally:  # an exception in the window (a signal's) puts the old one back; after it, the old one goes
        finish_replace(old, dst)


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


# ----------------------------------------------------------------------------
# A build's staged directory, and the signals that must not leave it half-written
# ----------------------------------------------------------------------------


@contextmanager
def build_temp(out: Path, error: type[FarError]) -> Iterator[Path]:
    """A temporary directory beside `out` to build into, removed when the block raises, and held (flock) while
    the block runs: a build of the same `out` in another process is refused with `error`. SIGTERM and SIGHUP
    (what timeout, CI and systemd send) from before it exists to the end of the block: remove it, say so
    in one line and exit as the signal would (128 + its number). SIGINT raises KeyboardInterrupt, which
    removes it like any exception.

    The handler does not raise: an exception raised inside Python code that C++ called (an onnx or
    onnxruntime module import, a nanobind callback) aborts the process instead of unwinding, with a
    traceback and no cleanup. It writes with os.write, since the code it interrupted may hold stderr."""
    made: list[Path] = []

    def stop(signum: int, frame: Any) -> None:
        for tmp in made:
            shutil.rmtree(tmp, ignore_errors=True)
        finish_replace(out.with_name(f".{out.name}.old-{os.getpid()}"), out)  # inside replace_dir's fallback
        message = (
            f"Error: build interrupted by {signal.Signals(signum).name}: its temporary files were removed "
            f"and no half-written output was left; run it again\n"
        )
        os.write(2, message.encode())
        os._exit(128 + signum)

    main = threading.current_thread() is threading.main_thread()
    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n) and main]
    old = {sig: signal.signal(sig, stop) for sig in wanted}
    held_fd = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        parent = lock_within(out.parent, 5.0)  # one build at a time looks for others and claims its own
        try:
            for other in out.parent.glob(f".{glob.escape(out.name)}.build-*"):
                if held(other):
                    raise error(
                        f"--out {out} is being built by another process (its files: {other.name}): wait for "
                        "it to finish or choose another --out"
                    )
            made.append(Path(tempfile.mkdtemp(prefix=f".{out.name}.build-{os.getpid()}-", dir=out.parent)))
            held_fd = lock(made[0])
        finally:
            if parent is not None:
                os.close(parent)
        try:
            yield made[0]
        except BaseException:
            shutil.rmtree(made[0], ignore_errors=True)
            raise
    finally:
        if held_fd is not None:
            os.close(held_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)


@contextmanager
def signals_held() -> Iterator[None]:
    """Delay SIGINT, SIGTERM and SIGHUP until the block is done (where the platform can)."""
    wanted = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def sweep_stale(out: Path) -> None:
    """Remove the temporary directories that killed builds of `out` left (SIGKILL, power loss): those named
    `.NAME.build-PID-*` whose process is gone; an interrupted replace is finished (`recover_old`)."""
    for tmp in out.parent.glob(f".{glob.escape(out.name)}.build-*"):
        m = re.fullmatch(rf"\.{re.escape(out.name)}\.build-(\d+)-.+", tmp.name)
        if m and tmp.is_dir() and not tmp.is_symlink() and not pid_alive(int(m.group(1))):
            shutil.rmtree(tmp, ignore_errors=True)
    recover_old(out)


def check_build_output(out: Path, checkpoint_dir: Path | None, error: type[FarError]) -> None:
    """A build's --out must be new, empty or an engine directory holding only what builds write (it is
    replaced whole), not the checkpoint's directory or inside an engine or checkpoint directory, and
    writable."""
    from runtime.manifest import MANIFEST as manifest  # the manifest module writes through this one

    short_name(out, "--out", error)
    utf8_path(out.absolute(), "--out", error)
    dangling(out, "--out", error)
    if out.is_symlink():
        raise error(f"--out {out} is a symlink: a build replaces the directory itself; pass {out.resolve()}")
    if out.is_dir() and os.path.ismount(out):
        raise error(
            f"--out {out} is a mount point, which a build cannot replace: choose a directory inside it"
        )
    if out.exists() and not out.is_dir():
        raise error(f"--out {out} is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / manifest).is_file():
        raise error(
            f"--out {out} is a non-empty directory without {manifest}: not an engine directory to "
            f"replace; choose a new or empty directory"
        )
    if out.is_dir() and (out / manifest).is_file():
        foreign = sorted(set(os.listdir(out)) - build_files(out))
        if foreign:
            raise error(
                f"--out {out} holds {foreign[0]!r}, which no build wrote, and a rebuild replaces the whole "
                f"directory: move it out first, or choose another --out"
            )
    if checkpoint_dir is not None:
        o, c = out.resolve(), Path(checkpoint_dir).resolve()
        if o == c or o in c.parents:
            raise error(f"--out {out} would replace the checkpoint directory {checkpoint_dir}")
    found = artifact_ancestor(out.resolve().parent)
    if found:
        raise error(
            f"--out {out} is inside the {found[0]} directory {found[1]}: its next rebuild would delete "
            f"the engines; write outside it"
        )
    writable_ancestor(out.resolve().parent, "--out", out, error)


def build_files(out: Path) -> set[str]:
    """The names a build writes into an engine directory: the manifest and the graph, external-data, plan
    and timing-cache files it lists (by suffix where the manifest cannot be read)."""
    from runtime.manifest import MANIFEST, load_manifest

    try:
        m = load_manifest(out, verify=False)
    except FarError:
        suffixes = (".onnx", ".data", ".weights", ".plan", ".cache", MANIFEST)
        return {n for n in os.listdir(out) if n.endswith(suffixes)}
    names = {MANIFEST, *(g.file for g in m.graphs.values()), *(e.file for e in m.engines.values())}
    names |= {f"{g.file}.data" for g in m.graphs.values()}
    if m.shared_weights is not None:
        names.add(m.shared_weights.file)
    if m.timing_cache:
        names.add(m.timing_cache)
    return names

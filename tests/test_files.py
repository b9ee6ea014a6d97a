"""runtime/files.py, the one place for writes: a temporary sibling replaces the target only when complete,
nothing is left behind on failure, permissions are the usual ones (0666 / 0777 less the umask, never
0600), and a failed write is one WriteError line that names the file (a full disk as such)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from runtime.errors import FarError
from runtime.files import WriteError, atomic_path, replace_dir, write_atomic

UMASK = 0o027  # not the common 022: the modes below come from the umask, not from a constant


@pytest.fixture
def umask():
    old = os.umask(UMASK)
    yield
    os.umask(old)


def mode(p: Path) -> int:
    return p.stat().st_mode & 0o777


def test_write_atomic_text_and_bytes_with_the_usual_mode(tmp_path, umask):
    write_atomic(tmp_path / "a.json", "{}\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    write_atomic(tmp_path / "a.json", "new")  # replaces
    assert (tmp_path / "a.json").read_text() == "new" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.bin") == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]  # no temporary file left


def test_a_file_made_0600_by_its_writer_gets_the_usual_mode(tmp_path, umask):
    with atomic_path(tmp_path / "w.safetensors") as tmp:
        os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY, 0o600))  # as safetensors' writer does
    assert mode(tmp_path / "w.safetensors") == 0o640


@pytest.mark.parametrize("failure", ["os", "bug", "interrupt"])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path, failure):
    target = tmp_path / "state.pt"
    target.write_text("old")
    raised = {
        "os": OSError(errno.EACCES, "Permission denied"),
        "bug": ValueError("shape"),
        "interrupt": KeyboardInterrupt(),
    }[failure]
    with pytest.raises((WriteError, ValueError, KeyboardInterrupt)) as e:
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise raised
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["state.pt"]
    if failure == "os":  # OS errors become one line naming the file; anything else stays what it is
        assert isinstance(e.value, FarError) and str(e.value) == f"cannot write {target}: Permission denied"
    else:
        assert e.value is raised


def test_a_full_disk_is_named_as_such(tmp_path):
    with pytest.raises(
        WriteError, match=r"cannot write .*x\.bin: the disk is full \([\d.]+ MB free\); free some"
    ):
        with atomic_path(tmp_path / "x.bin") as tmp:
            tmp.write_bytes(b"1")
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WriteError, match="file size limit exceeded"):  # a writer that only has the text
        with atomic_path(tmp_path / "x.bin", errors=(RuntimeError,)):
            raise RuntimeError("I/O error: File too large (os error 27)")
    assert list(tmp_path.iterdir()) == []


def test_a_directory_replaces_the_old_one_whole_with_the_usual_modes(tmp_path, umask):
    old = tmp_path / "ckpt"
    old.mkdir()
    (old / "stale.txt").write_text("old")
    with atomic_path(old) as tmp:
        tmp.mkdir()
        (tmp / "sub").mkdir(mode=0o700)
        os.close(os.open(tmp / "model.safetensors", os.O_CREAT | os.O_WRONLY, 0o600))
    assert sorted(p.name for p in old.iterdir()) == ["model.safetensors", "sub"]
    assert mode(old) == mode(old / "sub") == 0o750 and mode(old / "model.safetensors") == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # neither the temporary nor the old one is left


def test_replace_dir_of_a_mkdtemp_directory(tmp_path, umask):
    import tempfile

    src = Path(tempfile.mkdtemp(dir=tmp_path))
    (src / "f").write_text("x")
    assert mode(src) == 0o700
    replace_dir(src, tmp_path / "out")
    assert mode(tmp_path / "out") == 0o750 and (tmp_path / "out" / "f").read_text() == "x"


_KILLED_IN_THE_WINDOW = """
import os, shutil, signal, sys
from pathlib import Path
from runtime import files

src, dst = Path(sys.argv[1]), Path(sys.argv[2])
real_replace = os.replace


def replace_then_term(a, b):  # the old two-rename replace: SIGTERM lands right after its first rename
    real_replace(a, b)
    os.kill(os.getpid(), signal.SIGTERM)


def term_before_cleanup(*a, **k):  # after the swap, before the old copy is removed
    os.kill(os.getpid(), signal.SIGTERM)


os.replace = replace_then_term
shutil.rmtree = term_before_cleanup
files.replace_dir(src, dst)
"""


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="renameat2 RENAME_EXCHANGE is Linux's")
def test_a_sigterm_inside_the_replace_never_loses_the_directory(tmp_path):
    """A real SIGTERM (default action: the process dies at once) delivered at every step of replacing a
    directory: the target is always there whole, old or new, never missing."""
    import signal
    import subprocess
    import sys

    old, new = tmp_path / "eng", tmp_path / ".eng.build-1-x"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_THE_WINDOW, str(new), str(old)], cwd=repo, capture_output=True
    )
    assert r.returncode == -signal.SIGTERM, r.stderr
    assert (old / "manifest.json").read_text() == "new"


_KILLED_IN_THE_FALLBACK = """
import os, signal, sys
from pathlib import Path
from runtime import files

src, dst, how = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
files.exchange = lambda a, b: False  # a kernel or file system without RENAME_EXCHANGE
real_replace = os.replace
calls = []


def replace_then_stop(a, b):  # the first of the two renames, then a stop before the second
    real_replace(a, b)
    calls.append(b)
    if len(calls) == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise KeyboardInterrupt


os.replace = replace_then_stop
if how == "handler":
    with files.build_temp(dst, OSError) as tmp:  # its SIGTERM handler, as a build has it
        (tmp / "manifest.json").write_text("new")
        os.replace = lambda a, b: (real_replace(a, b), os.kill(os.getpid(), signal.SIGTERM))
        files.replace_dir(tmp, dst)
else:
    files.replace_dir(src, dst)
"""


@pytest.mark.parametrize("how", ["kill", "raise", "handler"])
def test_a_stop_inside_the_fallback_replace_never_loses_the_directory(tmp_path, how):
    """Where the exchange is not supported a directory is replaced in two renames, the old one aside as
    `.NAME.old-PID` between them. Stopped there: by SIGKILL, the next write or build of NAME puts it back; by
    an exception (SIGINT's), replace_dir puts it back itself; by SIGTERM in a build, its handler does."""
    import subprocess
    import sys

    from runtime.files import sweep_stale, sweep_stale_temporaries

    old, new = tmp_path / "eng", tmp_path / ".eng.build-1-x"
    old.mkdir()
    (old / "manifest.json").write_text("old")
    new.mkdir()
    (new / "manifest.json").write_text("new")
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", _KILLED_IN_THE_FALLBACK, str(new), str(old), how],
        cwd=repo,
        capture_output=True,
    )
    assert r.returncode != 0, r.stderr
    left = {p.name for p in tmp_path.iterdir()} - {new.name}
    if how == "kill":
        assert not old.exists() and len(left) == 1 and left.pop().startswith(".eng.old-")
        for sweep in (sweep_stale_temporaries, sweep_stale):  # the next checkpoint save, the next build
            sweep(old)
            assert [p.name for p in tmp_path.iterdir() if p.name != new.name] == ["eng"]
    else:
        assert left == {"eng"}, r.stderr
    assert (old / "manifest.json").read_text() == "old"


def test_a_killed_writers_temporary_is_swept_by_the_next_write(tmp_path):
    """SIGKILL leaves `.NAME.PID-XXXXXXXX.tmp` (a file or a whole checkpoint directory): the next write of
    NAME removes it when its process is gone; a live writer's temporary and other files stay."""
    import subprocess
    import sys

    target = tmp_path / "ckpt"
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    dead = int(child.stdout)  # that process has ended
    stale = tmp_path / f".ckpt.{dead}-0123abcd.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 1000)
    live = tmp_path / f".ckpt.{os.getpid()}-89abcdef.tmp"
    live.write_text("being written")
    other = tmp_path / ".ckpt.notes.tmp"
    other.write_text("not ours")
    write_atomic(target, "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


def test_sigterm_during_a_cli_write_removes_its_temporary(tmp_path):
    """`far-export`'s CLIs turn SIGTERM into one line and exit 143, and the write in progress removes its
    temporary (the default action would end the process with it left behind)."""
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal, sys, time\n"
        "from runtime.files import atomic_path\n"
        "from runtime.options import one_line_errors\n"
        "with one_line_errors():\n"
        "    with atomic_path(sys.argv[1]) as tmp:\n"
        "        tmp.write_text('half')\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(30)\n"
    )
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "g.png")], cwd=repo, capture_output=True, text=True
    )
    assert r.returncode == 128 + signal.SIGTERM, r.stderr
    assert r.stderr.strip() == "Error: stopped by SIGTERM; nothing was left half-written"
    assert list(tmp_path.iterdir()) == []


def test_output_checks_take_non_utf8_names(tmp_path):
    """A name with bytes that are not UTF-8 (a surrogate-escaped str, as os.listdir gives it) is checked,
    not a UnicodeEncodeError; a too-long one is refused in one line."""
    from runtime.errors import RequestError
    from runtime.files import check_output_file

    name = os.fsdecode(b"caf\xe9.png")
    assert check_output_file(tmp_path / name, "--out") == tmp_path / name
    with pytest.raises(RequestError, match="the name is too long"):
        check_output_file(tmp_path / (os.fsdecode(b"\xe9") * 232), "--out")

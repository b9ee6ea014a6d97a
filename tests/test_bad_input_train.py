"""Bad input to `python training/train.py`, run as a user would (a subprocess): every case ends in one
`Error: ...` line that names the problem and the fix, a non-zero exit, no traceback, and no file that
existed before is changed. Config, path and resume-state cases fail before any work: the VAE stage
never starts. Tiny preset, a few steps, on a tiny ImageFolder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from runtime.files import WriteError
from training.checkpoint import load_checkpoint
from training.config import ConfigError
from training.data import DataError, ImageFolder
from training.trainer.run import set_threads
from training.trainer.run_checks import TrainingError, check_run
from training.trainer.run_config import load_run_config

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import write_image_folder  # noqa: E402
from test_train import tiny_overrides  # noqa: E402


def cli(*args: str, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    """The CLI as a user runs it, on one thread unless args say otherwise."""
    threads = [] if "--threads" in args else ["--threads", "1"]
    return subprocess.run(
        [sys.executable, str(ROOT / "training" / "train.py"), *threads, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        **kw,
    )


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under roots (what must not change)."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")) if root.is_dir() else [root]:
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_one_error(r: subprocess.CompletedProcess, *match: str) -> str:
    text = r.stdout + r.stderr
    assert r.returncode != 0, text
    assert "Traceback" not in text, text
    errors = [ln for ln in text.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1, text
    for m in match:
        assert m in errors[0], text
    return errors[0]


def assert_no_work(r: subprocess.CompletedProcess, out: Path) -> None:
    """Refused before any work: no stage started, no run directory made."""
    assert "[vae]" not in r.stderr and "[far]" not in r.stderr and "caching latents" not in r.stderr, r.stderr
    assert not (out / "vae").exists() and not (out / "latents.safetensors").exists()


USER_ERRORS = (ConfigError, DataError, WriteError, TrainingError)


def refused(
    via_cli: bool,
    out: Path,
    overrides: list[str],
    *match: str,
    config: Path | None = None,
    resume: bool = False,
    timeout: int = 120,
) -> str:
    """A case refused before any work: via the CLI (a subprocess), or in-process through the same
    checks (`load_run_config` + `check_run`) for the variants of a kind the CLI already covers."""
    if via_cli:
        args = [
            "--out",
            str(out),
            *(["--resume"] if resume else []),
            *(["--config", str(config)] if config else []),
        ]
        r = cli(*args, *overrides, timeout=timeout)
        line = assert_one_error(r, *match)
        assert_no_work(r, out)
        return line
    with pytest.raises(USER_ERRORS) as e:
        check_run(load_run_config(config, overrides), out, resume)
    for m in match:
        assert m in str(e.value)
    return str(e.value)


@pytest.fixture
def folder(tmp_path) -> Path:
    return write_image_folder(tmp_path / "data", classes=2, per_class=4, size=16)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """One finished tiny run (VAE 2 + FAR 2 steps) with --threads 1; tests copy it before touching it."""
    tmp = tmp_path_factory.mktemp("base")
    data = write_image_folder(tmp / "data", classes=2, per_class=4, size=16)
    out = tmp / "run"
    r = cli("--out", str(out), *tiny_overrides(data, far_steps=2, vae_steps=2))
    assert r.returncode == 0, r.stderr
    return out


def copy_run(base: Path, dst: Path) -> Path:
    shutil.copytree(base, dst)
    return dst


# ----------------------------------------------------------------------------
# The run config: refused before any work
# ----------------------------------------------------------------------------


CONFIG_CASES = [
    (["train.lr=nan"], "train.lr must be a finite number, got nan"),
    (["train.lr=-1"], "train.lr must be a number >= 0"),
    (["vae.lr=inf"], "vae.lr must be a finite number"),
    (["model.cfg=nan"], "model.cfg must be a finite number"),
    (["train.betas=[0.9, nan]"], "train.betas must be a finite number"),
    (["train.betas=[0.9, 1.5]"], "train.betas must be two numbers in [0, 1)"),
    (["train.betas=[0.9]"], "train.betas must be two numbers"),
    (["train.ema_decay=1.0"], "train.ema_decay must be in [0, 1)"),
    (["train.weight_decay=-0.1"], "train.weight_decay must be a number >= 0"),
    (["train.min_lr=1.0"], "train.min_lr must be in [0, lr"),
    (['train.steps="abc"'], "train.steps must be int, got 'abc'"),
    (["train.steps=1.5"], "train.steps must be int, got 1.5"),
    (["train.steps=0"], "train.steps must be an int in [1, 1000000000]"),
    (["train.steps=99999999999999999999"], "train.steps must be an int in [1, 1000000000]"),
    (["vae.batch_size=-4"], "vae.batch_size must be an int in [1, 1000000000]"),
    (["train.log_every=0"], "train.log_every must be an int in [1, 1000000000]"),
    (["train.save_every=-1"], "train.save_every must be an int in [0, 1000000000]"),
    (["vae.save_every=10000000000"], "vae.save_every must be an int in [0, 1000000000]"),
    (["train.seed=-1"], "train.seed must be an int in [0, 2**63)"),
    (["train.amp=1"], "train.amp must be true or false"),
    (["train.sample_per_class=1000000000"], "train.sample_per_class must be in [1, 100]"),
    (["train.nope=1"], "unknown config key(s): train.nope; [train] keys are steps"),
    (["extra.key=1"], "unknown config section(s): extra"),
    (["train.lr.x=1"], "train.lr must be float"),
    (['model="x"'], "[model] must be a table"),
    (["model.vae=5"], "model.vae must be a VAE preset name or a table"),
    (["model.nope=1"], "[model] unknown config key(s): nope"),
    (["model.width=7"], "[model] width 7 not divisible"),
    (["model.num_classes=1"], "the data has 2 classes but model.num_classes = 1"),
    (['device="tpu"'], "device must be"),
    (['data.source=""'], "data.source must be"),
    (
        ["model.width=16384", "model.enc_depth=256"],
        "GB to train",
    ),  # within the config's limits, not in memory
    (
        ["model.width=4611686018427387904"],
        "width 4611686018427387904 is larger than any model this code builds",
    ),
    (
        ['model.head="mar"', "model.diffusion_steps=1000000000"],
        "diffusion_steps 1000000000 is larger than any model this code builds",
    ),
    (['train.lr_schedule="step"'], "train.lr_schedule must be"),
]


@pytest.mark.parametrize("overrides, match", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_bad_config_value(folder, tmp_path, overrides, match):
    """The whole table in-process (one torch import); the CLI path of a few of them below."""
    with pytest.raises((ConfigError, TrainingError), match=re.escape(match)):
        check_run(load_run_config(None, tiny_overrides(folder) + overrides), tmp_path / "r", resume=False)
    assert not (tmp_path / "r").exists()


CLI_CASES = [
    c
    for c in CONFIG_CASES
    if c[0][0] in ("train.lr=nan", "train.lr=-1", 'train.steps="abc"', "model.width=16384")
]


def test_a_key_set_by_a_flag_and_an_override_is_refused(folder, tmp_path):
    """`--steps 2` and `train.steps=abc` both set train.steps: neither silently wins."""
    out = tmp_path / "r"
    r = cli("--out", str(out), "--steps", "2", "--set", "train.steps=abc")
    assert_one_error(r, "--steps 2 and train.steps=abc both set train.steps: give one of them")
    assert_no_work(r, out)


def test_out_that_is_not_utf8_is_refused_before_any_work(folder, tmp_path):
    """A name the file system takes but safetensors cannot open is refused before latents are cached."""
    out = tmp_path / os.fsdecode(b"run\xff")
    r = cli("--out", str(out), *tiny_overrides(folder))
    assert_one_error(r, "is not valid UTF-8", "rename it")
    assert_no_work(r, out)
    assert not out.exists()


@pytest.mark.parametrize("overrides, match", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_config_value_is_refused_before_any_work(folder, tmp_path, overrides, match):
    out = tmp_path / "r"
    before = snapshot(tmp_path)
    r = cli("--out", str(out), *tiny_overrides(folder), *overrides)
    assert_one_error(r, match)
    assert_no_work(r, out)
    assert not out.exists() and snapshot(tmp_path) == before


def test_bad_threads(folder, tmp_path):
    r = cli("--threads", "-1", "--out", str(tmp_path / "r"), *tiny_overrides(folder))
    assert_one_error(r, "--threads must be an int in [1, ", "got -1")
    assert not (tmp_path / "r").exists()
    for threads in (0, 100000):
        with pytest.raises(
            ConfigError, match=re.escape(f"--threads must be an int in [1, {len(os.sched_getaffinity(0))}]")
        ):
            set_threads(threads)


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@pytest.mark.parametrize(
    "kind, match",
    [
        ("directory", "is a directory, not a file"),
        ("fifo", "is not a regular file"),
        ("latin1", "is not UTF-8 text"),
        ("bad_toml", "is not valid TOML"),
        ("missing", "not found"),
    ],
)
def test_bad_config_file(folder, tmp_path, kind, match):
    path = tmp_path / "c.toml"
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        _fifo(path)  # opening it would block forever: it must never be opened
    elif kind == "latin1":
        path.write_bytes("[train]\nsteps = 2 # caf\xe9\n".encode("latin-1"))
    elif kind == "bad_toml":
        path.write_text("[train\nsteps = 2\n")
    refused(kind == "fifo", tmp_path / "r", tiny_overrides(folder), str(path), match, config=path, timeout=60)
    assert not (tmp_path / "r").exists()


# ----------------------------------------------------------------------------
# Paths: --out, --data, --vae, train.init
# ----------------------------------------------------------------------------


def test_out_that_is_a_file(folder, tmp_path):
    out = tmp_path / "f"
    out.write_text("mine")
    r = cli("--out", str(out), *tiny_overrides(folder))
    assert_one_error(r, f"--out {out} is a file")
    assert out.read_text() == "mine"


@pytest.mark.parametrize("where", ["shipped", "shipped_inside", "checkpoint", "engine", "foreign"])
def test_out_never_writes_into_checkpoints_engines_or_foreign_dirs(folder, tmp_path, tiny_checkpoint, where):
    if where == "shipped":
        out = ROOT / "checkpoints" / "new-run"
    elif where == "shipped_inside":
        out = next(p for p in sorted((ROOT / "checkpoints").iterdir()) if p.is_dir()) / "run"
    elif where == "checkpoint":
        out = tiny_checkpoint(tmp_path / "ckpt")
    elif where == "engine":
        (tmp_path / "eng").mkdir()
        (tmp_path / "eng" / "manifest.json").write_text("{}")
        out = tmp_path / "eng"
    else:
        (tmp_path / "mine").mkdir()
        (tmp_path / "mine" / "notes.txt").write_text("keep")
        out = tmp_path / "mine"
    before = snapshot(ROOT / "checkpoints", tmp_path)
    refused(where == "shipped", out, tiny_overrides(folder), "choose")
    assert snapshot(ROOT / "checkpoints", tmp_path) == before
    assert where in ("checkpoint", "engine", "foreign") or not out.exists()


@pytest.mark.parametrize(
    "kind, match",
    [
        ("empty", "has no class folders"),
        ("file", "is not a directory"),
        ("missing", "does not exist"),
    ],
)
def test_bad_data_dir(tmp_path, kind, match):
    data = tmp_path / "d"
    if kind == "empty":
        data.mkdir()
    elif kind == "file":
        data.write_text("x")
    refused(kind == "empty", tmp_path / "r", tiny_overrides(data), str(data), match)


def test_mnist_with_a_preset_too_small_for_it(tmp_path):
    refused(False, tmp_path / "r", ['model.preset="tiny"', "train.steps=1"], "model.img_size must be >= 28")


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "does not exist"),
        ("junk", "is not a readable safetensors file"),
        ("fifo", "is not a regular file"),
    ],
)
def test_bad_vae_file(folder, tmp_path, kind, match):
    path = tmp_path / "vae.safetensors"
    if kind == "junk":
        path.write_bytes(b"\x00" * 100)
    elif kind == "fifo":
        _fifo(path)
    before = snapshot(tmp_path)
    overrides = [*tiny_overrides(folder), f"vae.init={json.dumps(str(path))}"]
    refused(kind == "junk", tmp_path / "r", overrides, "vae.init", str(path), match, timeout=60)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing", "is not a checkpoint directory"),
        ("file", "is not a checkpoint directory"),
        ("no_weights", "is missing or not a regular file"),
        ("other_dims", "does not match the model config"),
    ],
)
def test_bad_train_init(folder, tmp_path, tiny_checkpoint, kind, match):
    init = tmp_path / "init"
    if kind == "file":
        init.write_text("x")
    elif kind == "no_weights":
        init.mkdir()
    elif kind == "other_dims":
        tiny_checkpoint(init, num_classes=2, width=64, num_heads=2)
    overrides = [*tiny_overrides(folder), f"train.init={json.dumps(str(init))}"]
    line = refused(kind == "other_dims", tmp_path / "r", overrides, "train.init", match)
    if kind == "other_dims":
        assert "saved (" in line and "config (" in line  # names the differing dims


# ----------------------------------------------------------------------------
# Resume
# ----------------------------------------------------------------------------


def test_resume_without_a_run_is_an_error(folder, tmp_path):
    (tmp_path / "typo").mkdir()
    for out in (tmp_path / "typo", tmp_path / "missing"):
        refused(
            out.name == "typo",
            out,
            tiny_overrides(folder),
            f"--resume: {out} holds no run",
            "leave out --resume",
            resume=True,
        )
    assert not (tmp_path / "missing").exists() and not any((tmp_path / "typo").iterdir())


@pytest.mark.parametrize("damage", ["truncated", "empty", "junk", "directory"])
def test_damaged_resume_state(base_run, tmp_path, damage):
    out = copy_run(base_run, tmp_path / "run")
    state = out / "train_state.pt"
    data = state.read_bytes()
    if damage == "directory":
        state.unlink()
        state.mkdir()
    else:
        state.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "junk": b"junk" * 100}[damage])
    before = snapshot(out)
    if damage in ("truncated", "empty"):
        r = cli("--out", str(out), "--resume", "train.steps=4")
        assert_one_error(r, str(state), "start over in a new --out")
    else:
        with pytest.raises(TrainingError, match=re.escape(str(state))):
            check_run(load_run_config(out / "config.toml"), out, resume=True)
    assert snapshot(out) == before


@pytest.mark.parametrize("name", ["log.jsonl", "latents.safetensors"])
def test_run_file_that_is_a_fifo_is_refused(base_run, tmp_path, name):
    out = copy_run(base_run, tmp_path / "run")
    (out / name).unlink()
    _fifo(out / name)  # appending to it would block forever
    with pytest.raises(TrainingError, match=re.escape(f"{out / name} is not a regular file")):
        check_run(load_run_config(out / "config.toml"), out, resume=True)


def test_resume_with_other_model_dims_names_them(base_run, tmp_path):
    out = copy_run(base_run, tmp_path / "run")
    before = snapshot(out)
    r = cli("--out", str(out), "--resume", "model.width=64", "model.head_width=48")
    line = assert_one_error(
        r,
        "train_state.pt was trained with other model dims",
        "saved (",
        "config (",
        "resume with the run's own model settings",
    )
    assert "64" in line and "more" in line
    assert_no_work(r, tmp_path / "nothing")
    assert snapshot(out) == before


def test_resume_reuses_threads_and_logs_one_start(base_run, tmp_path):
    out = copy_run(base_run, tmp_path / "run")
    assert json.loads((out / "run.json").read_text())["threads"] == 1
    r = subprocess.run(
        [sys.executable, str(ROOT / "training" / "train.py"), "--out", str(out), "--resume", "train.steps=3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr
    assert f"resuming with --threads 1 (from {out / 'run.json'})" in r.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if x.get("stage") == "far" and "latent_scale" in x] == [0]
    assert [x["step"] for x in log if x.get("stage") == "far" and "loss" in x] == [1, 2, 3]


_HOLD_RUN = """
import sys
from runtime.locks import locked_dir
from training.trainer.run_checks import TrainingError
with locked_dir(sys.argv[1], "the run directory", TrainingError):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_a_run_in_use_by_another_process_is_refused(base_run, tmp_path):
    """A second `--resume` while another process works in the run: one line, nothing written (no second
    log, no race on the checkpoint)."""
    out = copy_run(base_run, tmp_path / "run")
    before = snapshot(out)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_RUN, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT
    )
    try:
        assert holder.stdout.readline().strip() == b"held"
        r = cli("--out", str(out), "--resume", "train.steps=3")
        assert_one_error(r, f"the run directory {out} is in use by another process")
        assert snapshot(out) == before
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    r = cli("--out", str(out), "--resume", "train.steps=3")  # free again once the other process ends
    assert r.returncode == 0, r.stderr


# ----------------------------------------------------------------------------
# Corrupt images
# ----------------------------------------------------------------------------


def _encoded(fmt: str, seed: int = 0) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_corrupt_images_are_skipped_with_a_warning_naming_each(folder, tmp_path):
    jpg, png = _encoded("JPEG"), _encoded("PNG")
    bad = {
        folder / "class0" / "truncated.jpg": jpg[: len(jpg) // 2],
        folder / "class0" / "truncated.png": png[: len(png) // 2],
        folder / "class1" / "zero.png": b"",
        folder / "class1" / "text.jpg": b"not an image at all",
    }
    for path, data in bad.items():
        path.write_bytes(data)
    out = tmp_path / "r"
    r = cli("--out", str(out), *tiny_overrides(folder, far_steps=1, vae_steps=1))
    assert r.returncode == 0, r.stderr
    for path in bad:
        assert f"warning: skipping unreadable image {path}" in r.stderr, r.stderr
    load_checkpoint(out / "checkpoint")


@pytest.mark.parametrize(
    "kind, match",
    [
        ("all_corrupt", "holds no readable images"),
        ("empty_class", "class folder"),
    ],
)
def test_unusable_image_folder(folder, tmp_path, kind, match):
    if kind == "all_corrupt":
        for p in folder.rglob("*.png"):
            p.write_bytes(p.read_bytes()[:40])
    else:
        (folder / "class2").mkdir()
        (folder / "class2" / "x.png").write_bytes(b"")
    if kind == "all_corrupt":
        r = cli("--out", str(tmp_path / "r"), *tiny_overrides(folder), "model.num_classes=3")
        assert_one_error(r, str(folder), match)
    else:
        with pytest.raises(DataError, match=match):
            ImageFolder(folder, 16)


# ----------------------------------------------------------------------------
# Writes that fail: a full disk, a file size limit
# ----------------------------------------------------------------------------


def _far_only(data: Path, vae: Path, steps: int = 4) -> list[str]:
    return [*tiny_overrides(data, far_steps=steps), f"vae.init={json.dumps(str(vae))}", "train.save_every=2"]


@pytest.fixture(scope="module")
def far_ref(tmp_path_factory) -> tuple[Path, Path]:
    """FAR alone (2 steps, one save) on a given VAE, on a roomy disk: the sizes of what a run writes."""
    from conftest import make_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("far_ref")
    vae = make_tiny_checkpoint(tmp / "vae")
    data = write_image_folder(tmp / "data", classes=2, per_class=4, size=16)
    assert cli("--out", str(tmp / "ref"), *_far_only(data, vae, steps=2)).returncode == 0
    return tmp / "ref", vae


def _leftovers(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".checkpoint.")]


def test_full_disk_during_a_save_loses_nothing(folder, tmp_path, far_ref):
    """A real ENOSPC: the run directory on a tmpfs sized to hold one save but not the second.
    Needs root (mount); the RLIMIT_FSIZE test below runs everywhere."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    ref, vae = far_ref
    used = sum(p.stat().st_size for p in ref.rglob("*") if p.is_file())
    state = (ref / "train_state.pt").stat().st_size
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    size = used + used - state + state // 2 + 64 * 1024  # the second save's state write cannot finish
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        out = mnt / "run"
        r = cli("--out", str(out), *_far_only(folder, vae))
        line = assert_one_error(r, "the disk is full", str(out))
        assert "continue with --resume" in line
        assert _leftovers(out) == []
        saved = torch.load(out / "train_state.pt", weights_only=True)
        assert saved["step"] == 2  # the first save is intact
        load_checkpoint(out / "checkpoint")
    finally:
        subprocess.run(["umount", str(mnt)])


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_during_a_save_removes_the_temp_file(folder, tmp_path, far_ref):
    """The OS refuses the write of train_state.pt (RLIMIT_FSIZE -> EFBIG, as ENOSPC would): the temporary
    file is removed and the message says what to do; the checkpoint exported just before is complete."""
    ref, vae = far_ref
    state = (ref / "train_state.pt").stat().st_size
    others = max(p.stat().st_size for p in ref.rglob("*") if p.is_file() and p.name != "train_state.pt")
    assert others < state // 2
    out = tmp_path / "r"
    r = cli("--out", str(out), *_far_only(folder, vae), preexec_fn=_limit_file_size(state // 2))
    assert_one_error(r, f"cannot write {out / 'train_state.pt'}: file size limit exceeded")
    assert _leftovers(out) == [] and not (out / "train_state.pt").exists()
    assert json.loads((out / "checkpoint" / "train_info.json").read_text())["step"] == 2
    load_checkpoint(out / "checkpoint")

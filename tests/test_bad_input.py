"""The bad-input suite: every case runs a CLI as a user would (a subprocess) and must end in exactly one
`Error: ...` line, a non-zero exit, no traceback, and no change to anything that existed before (engine
and checkpoint directories and the working directory are hashed before and after).

Protects the guarantees of README's "Errors" list: non-finite numbers refused where they enter (flags,
config.json, manifest), outputs checked before any work and never written into an engine or checkpoint
directory, impossible sizes refused up front, the manifest validated as data (types, ranges, names, plain
file names inside the directory), only regular files read (a FIFO never hangs a command), clear messages
for files that are not what they should be, and builds that leave no temporary directory behind.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_engines import built_engines

pytest.importorskip("torch")

REPO = Path(__file__).resolve().parents[1]
_EXE = Path(sys.executable).parent / "far-export"
FAR = [str(_EXE)] if _EXE.exists() else [sys.executable, "-c", "from far_export.cli import main; main()"]
SAMPLE = [sys.executable, str(REPO / "training" / "sample.py")]
EVALUATE = [sys.executable, str(REPO / "training" / "evaluate.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """(checkpoint dir, engine dir): tiny masked/shortcut model, batch 2, CFG on; built once."""
    return built_engines(tmp_path_factory, "masked", "shortcut")


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (hidden ones too) -> its kind and content hash; symlinks are not followed."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = f"link:{os.readlink(p)}"
            elif stat.S_ISREG(st.st_mode):
                out[rel] = "file:" + hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                out[rel] = f"mode:{stat.S_IFMT(st.st_mode)}"
    return out


def run(cmd: list[Any], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=ENV
    )


def expect_error(cmd: list[Any], match: str, cwd: Path, watch: list[Path], timeout: float = 300) -> str:
    """Run cmd; one `Error:` line containing `match`, exit != 0, no traceback, nothing under `watch`
    changed."""
    before = {p: snapshot(p) for p in watch}
    r = run(cmd, cwd, timeout)
    out = r.stdout + "\n" + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("Error:")]
    assert r.returncode != 0, out
    assert len(errors) == 1, out
    assert match in errors[0], out
    assert "Traceback" not in out, out
    for p, snap in before.items():
        assert snapshot(p) == snap, f"{p} changed: {out}"
    return errors[0]


@pytest.fixture
def ws(built, tmp_path) -> dict[str, Path]:
    """The shared engine and checkpoint directories, and a working directory with a file and a directory."""
    ckpt, eng = built
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    return {"ckpt": ckpt, "eng": eng, "tmp": tmp_path}


def _fill(args: list[str], ws: dict[str, Path]) -> list[str]:
    return [a.format(eng=ws["eng"], ckpt=ws["ckpt"]) for a in args]


# ----------------------------------------------------------------------------
# far-export sample / bench / compile: flags (numpy + onnxruntime, no torch)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args,match",
    [
        (["--cfg", "nan"], "not a finite number"),
        (["--cfg", "inf"], "not a finite number"),
        (["--cfg", "-inf"], "not a finite number"),
        (["--temperature", "inf"], "not a finite number"),
        (["--temperature", "nan"], "not a finite number"),
        (["--out", "{eng}/manifest.json"], "inside the engine directory"),
        (["--out", "{eng}/backbone.png"], "inside the engine directory"),
        (["--out", "{ckpt}/grid.png"], "inside the checkpoint directory"),
        (["--out-dir", "{eng}"], "is an engine directory"),
        (["--out-dir", "{ckpt}"], "is a checkpoint directory"),
        (["--out-dir", "{eng}/samples"], "is inside {eng}, an engine directory"),
        (["--out-dir", "{ckpt}/x/y"], "is inside {ckpt}, a checkpoint directory"),
        (["--out", "{eng}/sub/g.png"], "is inside the engine directory {eng}"),
        (["--out", "{ckpt}/sub/g.png"], "is inside the checkpoint directory {ckpt}"),
        (["--out", "x.txt"], "unknown image extension '.txt'"),
        (["--out", "grid"], "unknown image extension"),
        (["--out", "afile/x.png"], "is a file, not a directory"),
        (["--out", "adir"], "is a directory: give a file name"),
        (["--out-dir", "afile"], "is a file, not a directory"),
        (["--out", "x.png", "--per-class", "1000000000"], "more than one request's limit"),
        (
            ["--out", "x.png", "--classes", "0-9999999999"],
            "class id 4 is out of range: this model has classes 0..3",
        ),
        (["--out", "x.png", "--per-class", "2000"], "write them one by one with --out-dir"),
        (["--out", "x.png", "--seed", "-1"], "Invalid value for '--seed'"),
        (["--out", "x.png", "--batch", "0"], "Invalid value for '--batch'"),
        (["--out", "x.png", "--batch", "999999999"], "Invalid value for '--batch'"),
        (["--out", "x.png", "--threads", "0"], "Invalid value for '--threads'"),
        (["--out", "x.png", "--threads", "-1"], "Invalid value for '--threads'"),
        (["--out", "x.png", "--threads", "999999"], "Invalid value for '--threads'"),
        (["--out", "x.png", "-k", "999999"], "head steps must be a power of two"),
        (["--out", "x.png", "--num-iter", "999999999"], "num_iter must be in [1, 64]"),
        (["--out", "x.png", "--per-class", "0"], "Invalid value for '--per-class'"),
    ],
)
def test_sample_flags(ws, args, match):
    cmd = [*FAR, "sample", ws["eng"], "--classes", "0-3", "--threads", "1", *_fill(args, ws)]
    if "--out" not in args and "--out-dir" not in args:
        cmd += ["--out", "x.png"]
    expect_error(
        cmd, match.format(eng=ws["eng"], ckpt=ws["ckpt"]), ws["tmp"], [ws["eng"], ws["ckpt"], ws["tmp"]]
    )


@pytest.mark.skipif(
    not Path("/proc").is_dir(), reason="needs /proc (Linux): a directory nothing can be written in"
)
def test_sample_unwritable_out_fails_before_work(ws):
    expect_error(
        [*FAR, "sample", ws["eng"], "--classes", "0-3", "--out", "/proc/x.png"],
        "cannot write in /proc",
        ws["tmp"],
        [ws["eng"], ws["tmp"]],
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (["--cfg", "nan"], "not a finite number"),
        (["--cfg", "inf"], "not a finite number"),
        (["--json", "{eng}/manifest.json"], "inside the engine directory"),
        (["--json", "{eng}/sub/b.json"], "inside the engine directory"),
        (["--json", "{ckpt}/sub/b.json"], "inside the checkpoint directory"),
        (["--json", "adir"], "is a directory"),
        (["--runs", "0"], "Invalid value for '--runs'"),
        (["--warmup", "999999999"], "Invalid value for '--warmup'"),
        (["--runs", "999999999"], "Invalid value for '--runs'"),
        (["--batch", "999999999"], "Invalid value for '--batch'"),
        (["--head-steps", "999999"], "head steps must be a power of two"),
        (["--seed", "-1"], "Invalid value for '--seed'"),
    ],
)
def test_bench_flags(ws, args, match):
    expect_error(
        [*FAR, "bench", ws["eng"], "--runs", "1", "--warmup", "0", "--threads", "1", *_fill(args, ws)],
        match,
        ws["tmp"],
        [ws["eng"], ws["ckpt"], ws["tmp"]],
    )


@pytest.mark.parametrize(
    "args,match",
    [
        (["--workspace-gb", "nan"], "not a finite number"),
        (["--workspace-gb", "inf"], "not a finite number"),
        (["--workspace-gb", "0"], "Invalid value for '--workspace-gb'"),
        (["--opt-level", "9"], "Invalid value for '--opt-level'"),
    ],
)
def test_compile_flags(ws, args, match):
    expect_error([*FAR, "compile", ws["eng"], *args], match, ws["tmp"], [ws["eng"], ws["tmp"]])


# ----------------------------------------------------------------------------
# Engine directories and manifests as data
# ----------------------------------------------------------------------------


def _copy_engine(ws: dict[str, Path], edit: Callable[[dict], Any] | None = None) -> Path:
    eng = ws["tmp"] / "eng"
    shutil.copytree(ws["eng"], eng)
    if edit is not None:
        d = json.loads((eng / "manifest.json").read_text())
        d = edit(d) or d
        (eng / "manifest.json").write_text(json.dumps(d))  # allow_nan: NaN / Infinity written as JSON allows
    return eng


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(d: dict) -> None:
        *parents, last = path.split(".")
        for k in parents:
            d = d[int(k)] if isinstance(d, list) else d[k]
        d[last] = value

    return edit


@pytest.mark.parametrize(
    "command,edit,match",
    [
        ("sample", _set("model.num_classes", "ten"), "model.num_classes must be an integer"),
        ("sample", _set("model.head_steps", None), "model.head_steps must be an integer"),
        ("sample", _set("graphs", "x"), "graphs must be an object"),
        ("sample", _set("batch", 1e12), "batch must be an integer"),
        ("inspect", _set("model.num_classes", 0), "model.num_classes must be in [1,"),
        ("inspect", _set("batch", 10**12), "batch must be in [1, 4096]"),
        ("inspect", _set("batch", -4), "batch must be in [1, 4096]"),
        ("sample", _set("model.cfg", float("nan")), "model.cfg must be a finite number"),
        ("inspect", _set("model.temperature", float("inf")), "model.temperature must be a finite number"),
        (
            "sample",
            _set("graphs.head.file", "/etc/passwd"),
            "must be a plain file name inside the engine directory",
        ),
        (
            "inspect",
            _set("graphs.head.file", "../x/head.onnx"),
            "must be a plain file name inside the engine directory",
        ),
    ],
)
def test_manifest_fields_named_in_the_issue(ws, command, edit, match):
    eng = _copy_engine(ws, edit)
    extra = ["--classes", "0", "--out", "x.png"] if command == "sample" else []
    expect_error([*FAR, command, eng, *extra], match, ws["tmp"], [ws["tmp"]])


def test_manifest_that_does_not_match_its_graphs(ws):
    """model.num_classes larger than the graphs' class table: the class passes the manifest's range check
    and ONNX Runtime's out-of-bounds error becomes one line naming the graph."""
    eng = _copy_engine(ws, _set("model.num_classes", 1000))
    cmd = [*FAR, "sample", eng, "--classes", "999", "--out", "x.png"]
    expect_error(cmd, "ONNX Runtime failed running backbone", ws["tmp"], [ws["tmp"]])


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: [d], "must hold a JSON object, got list"),
        (_set("model", None), "model must be an object"),
        (_set("model.backbone", "rnn"), "model.backbone must be one of masked, causal"),
        (_set("model.img_size", 10**9), "model.img_size must be in"),
        (_set("model.seq_len", 17), "seq_len 17 is not grid^2"),
        (_set("model.latent_scale", -1.0), "latent_scale must be > 0"),
        (_set("model.cfg", "2"), "model.cfg must be a number"),
        (_set("cfg_guidance", "yes"), "cfg_guidance must be true or false"),
        (_set("precision", "fp8"), "precision must be one of fp32, fp16, bf16, int8"),
        (_set("schema_version", 0), "schema_version must be >= 1"),
        (_set("schema_version", 1), "manifest schema 1 is older than this runtime's (4); rebuild"),
        (_set("graphs.evil", {}), "unknown graph 'evil'"),
        (_set("engines", {"../../evil": {}}), "'../../evil' is not a graph of the manifest"),
        (_set("graphs.backbone_k4", {}), "graphs.backbone_k4.file must be a plain file name"),
        (_set("engines", {"head": {"file": "../head.plan"}}), "engines.head.file must be a plain file name"),
        (_set("timing_cache", "../timing.cache"), "timing_cache must be a plain file name"),
        (_set("shared_weights.file", "../backbone.weights"), "shared_weights.file must be a plain file name"),
        (_set("shared_weights.graphs", ["evil"]), "shared_weights.graphs must name graphs of the manifest"),
        (_set("shared_weights.tensors.backbone", {"w": [0, -1, "float32", []]}), "must be [offset, length"),
        (_set("graphs.head.inputs", "x"), "graphs.head.inputs must be a list"),
        (_set("graphs.head.inputs.0.shape", [-1, 4]), "shape must list dimensions in [1,"),
        (_set("graphs.head.inputs.0.shape", [2**19, 2**19]), "buffer would take"),
        (_set("graphs.head.inputs.0.dtype", "float128"), "dtype must be one of"),
        (_set("validation", []), "validation must be an object"),
        (_set("validation.graphs", "x"), "validation is malformed"),
        (_set("validation.end_to_end", {"settings": 3}), "validation is malformed"),
        (_set("validation.deep", functools.reduce(lambda a, _: [a], range(900), 0)), "nests deeper than 16"),
        (_set("validation.nan", [float("nan")]), "validation holds NaN or Infinity"),
    ],
)
def test_manifest_validated_as_data(ws, edit, match):
    eng = _copy_engine(ws, edit)
    expect_error([*FAR, "inspect", eng], match, ws["tmp"], [ws["tmp"]])


def test_compile_refuses_crafted_graph_names(ws):
    """Plan files are named from the graph keys: a crafted key could write outside the directory."""
    eng = _copy_engine(ws, lambda d: d["graphs"].__setitem__("../../evil", d["graphs"]["head"]))
    expect_error([*FAR, "compile", eng], "unknown graph '../../evil'", ws["tmp"], [ws["tmp"]])


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        (b"[" * 100000, "is not valid JSON"),
        (b'{"schema_version": 4}', "manifest field graphs is missing"),
    ],
)
def test_unreadable_manifests(ws, content, match):
    eng = _copy_engine(ws)
    (eng / "manifest.json").write_bytes(content)
    expect_error([*FAR, "inspect", eng], match, ws["tmp"], [ws["tmp"]])


def test_engine_directory_kinds(ws):
    w = [ws["tmp"]]
    expect_error(
        [*FAR, "sample", ws["tmp"] / "afile", "--out", "x.png"],
        "afile is a file, not a directory",
        ws["tmp"],
        w,
    )
    expect_error([*FAR, "inspect", ws["tmp"] / "none"], "does not exist", ws["tmp"], w)
    expect_error([*FAR, "inspect", ws["tmp"] / "adir"], "manifest.json is missing", ws["tmp"], w)


def test_fifo_manifest_does_not_hang(ws):
    eng = _copy_engine(ws)
    (eng / "manifest.json").unlink()
    os.mkfifo(eng / "manifest.json")
    expect_error([*FAR, "inspect", eng], "not a regular file", ws["tmp"], [ws["tmp"]], timeout=60)


def test_graph_symlink_out_of_the_directory(ws):
    eng = _copy_engine(ws)
    outside = ws["tmp"] / "outside.onnx"
    shutil.move(eng / "head.onnx", outside)
    (eng / "head.onnx").symlink_to(outside)  # same bytes, same sha256: only the location is wrong
    expect_error(
        [*FAR, "sample", eng, "--classes", "0", "--out", "x.png"],
        "points outside the engine directory",
        ws["tmp"],
        [ws["tmp"]],
    )


def test_graph_file_that_is_a_directory(ws):
    eng = _copy_engine(ws)
    (eng / "head.onnx").unlink()
    (eng / "head.onnx").mkdir()
    expect_error([*FAR, "inspect", eng], "is a directory, not a file", ws["tmp"], [ws["tmp"]])


# ----------------------------------------------------------------------------
# Outputs that work: the format the extension names, one file per image streamed
# ----------------------------------------------------------------------------


def test_output_format_follows_the_extension(ws):
    t = ws["tmp"]
    r = run(
        [
            *FAR,
            "sample",
            ws["eng"],
            "--classes",
            "0-3",
            "--threads",
            "1",
            "--out",
            "g.jpg",
            "--out-dir",
            "each",
            "--batch",
            "1",
        ],
        t,
    )
    assert r.returncode == 0, r.stderr
    assert (t / "g.jpg").read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG, not PNG bytes under a .jpg name
    assert sorted(p.name for p in (t / "each").iterdir()) == [f"{i:05d}_class{i}.png" for i in range(4)]


# ----------------------------------------------------------------------------
# Checkpoints: config.json as data, files that are not what they should be (build, sample.py, evaluate.py)
# ----------------------------------------------------------------------------


def _copy_ckpt(ws: dict[str, Path], **config: Any) -> Path:
    ckpt = ws["tmp"] / "ckpt"
    shutil.copytree(ws["ckpt"], ckpt)
    if config:
        d = json.loads((ckpt / "config.json").read_text())
        d.update(config)
        (ckpt / "config.json").write_text(json.dumps(d))
    return ckpt


@pytest.mark.parametrize(
    "config,flags,match",
    [
        ({"cfg": float("nan")}, ["--no-validate"], "cfg must be a finite number"),
        ({"temperature": float("inf")}, ["--no-validate"], "temperature must be a finite number"),
        ({"cfg": float("nan")}, [], "cfg must be a finite number"),  # not blamed on a graph that differs
        ({"latent_scale": float("-inf")}, [], "latent_scale must be a finite number"),
        ({"width": 10**6}, [], "width 1000000 is larger than any model"),
        ({"num_classes": "ten"}, [], "num_classes must be int"),
        ({"vae": [1]}, [], "vae must be an object or a preset name"),
        ({"mlp_ratio": 1e308}, [], "mlp_ratio must be in (0, 64.0]"),
    ],
)
def test_build_refuses_bad_configs(ws, config, flags, match):
    ckpt = _copy_ckpt(ws, **config)
    expect_error([*FAR, "build", ckpt, "--out", "out", "--no-engines", *flags], match, ws["tmp"], [ws["tmp"]])


@pytest.mark.parametrize(
    "args,match",
    [
        (["--seed", "-1"], "Invalid value for '--seed'"),
        (["--workspace-gb", "nan"], "not a finite number"),
        (["--batch", "999999999"], "Invalid value for '--batch'"),
        (["--num-iter", "0"], "Invalid value for '--num-iter'"),
        (["--encoder-variants", "17"], "Invalid value for '--encoder-variants'"),
        (["--encoder-variants", "-1"], "Invalid value for '--encoder-variants'"),
        (["--out", "{ckpt}"], "not an engine directory to replace"),
        (["--out", "{ckpt}/engine"], "is inside the checkpoint directory"),
        (["--out", "{eng}/sub/engine"], "is inside the engine directory"),
    ],
)
def test_build_flags_fail_before_work(ws, args, match):
    expect_error(
        [
            *FAR,
            "build",
            ws["ckpt"],
            "--no-engines",
            *_fill(args, ws),
            *(["--out", "o"] * ("--out" not in args)),
        ],
        match,
        ws["tmp"],
        [ws["tmp"], ws["ckpt"], ws["eng"]],
    )


def test_build_out_kinds_fail_before_work(ws):
    """An --out a build could not rename its staged directory onto fails up front, not after the build."""
    t = ws["tmp"]
    (t / "dangling").symlink_to(t / "nowhere")
    (t / "alink").symlink_to(t / "adir")
    cases = [
        ("dangling", "is a symlink to", "which does not exist"),
        ("alink", "is a symlink: a build replaces the directory itself", f"pass {t / 'adir'}"),
        ("e" * 232, "the name is too long", "at most 231 bytes"),
        (os.fsdecode(b"e\xff"), "is not valid UTF-8", "rename it"),
    ]
    for out, *match in cases:
        line = expect_error(
            [*FAR, "build", ws["ckpt"], "--no-engines", "--out", out], match[0], t, [t, ws["ckpt"]]
        )
        assert all(m in line for m in match), line


@pytest.mark.skipif(not os.path.ismount("/dev/shm"), reason="needs a mount point (/dev/shm)")
def test_build_refuses_a_mount_point(ws):
    expect_error(
        [*FAR, "build", ws["ckpt"], "--no-engines", "--out", "/dev/shm"],
        "is a mount point, which a build cannot replace",
        ws["tmp"],
        [ws["tmp"], ws["ckpt"]],
    )


def test_sample_output_kinds_fail_before_work(ws):
    """A dangling --out-dir fails before the first batch; an engine directory whose path is not UTF-8
    (ONNX Runtime cannot open it) is named in one line."""
    t = ws["tmp"]
    (t / "gone").symlink_to(t / "nowhere")

    def sample(eng: Path, *args: str) -> list[Any]:
        return [*FAR, "sample", eng, "--classes", "0-3", "--threads", "1", *args]

    expect_error(sample(ws["eng"], "--out-dir", "gone"), "which does not exist", t, [t])
    odd = t / os.fsdecode(b"eng\xff")
    shutil.copytree(ws["eng"], odd)
    expect_error(sample(odd, "--out", "x.png"), "is not valid UTF-8", t, [t])


def test_build_never_deletes_files_it_did_not_write(ws):
    """A rebuild replaces the whole engine directory: one holding a user's file is refused, naming it."""
    eng = ws["tmp"] / "eng"
    shutil.copytree(ws["eng"], eng)
    (eng / "notes.txt").write_text("mine")
    expect_error(
        [*FAR, "build", ws["ckpt"], "--out", eng, "--no-engines"],
        "holds 'notes.txt', which no build wrote",
        ws["tmp"],
        [ws["tmp"], ws["ckpt"]],
    )


_HOLD_A_BUILD = """
import sys, time
from pathlib import Path
from runtime.files import build_temp

with build_temp(Path(sys.argv[1]), RuntimeError) as tmp:
    print(tmp.name, flush=True)
    time.sleep(120)
"""


def test_a_second_build_of_one_out_is_refused_while_the_first_runs(ws):
    """A build holds its staged directory (flock) until it is done: another build of the same --out is
    refused in one line; once the first is gone (SIGKILL), the next build sweeps its files and succeeds."""
    out = ws["tmp"] / "eng"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_A_BUILD, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True, env=ENV
    )
    try:
        staged = holder.stdout.readline().strip()
        assert staged.startswith(".eng.build-"), staged
        expect_error(
            [*FAR, "build", ws["ckpt"], "--no-engines", "--out", out],
            f"--out {out} is being built by another process (its files: {staged})",
            ws["tmp"],
            [ws["tmp"], ws["ckpt"]],
        )
    finally:
        holder.kill()
        holder.wait()
    r = run([*FAR, "build", ws["ckpt"], "--no-engines", "--out", out], ws["tmp"])
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in ws["tmp"].iterdir()) == ["adir", "afile", "eng"]


def test_build_checkpoint_kinds(ws):
    t = ws["tmp"]
    expect_error([*FAR, "build", t / "afile", "--out", "o"], "afile is a file, not a directory", t, [t])
    ckpt = _copy_ckpt(ws)
    (ckpt / "config.json").unlink()
    os.mkfifo(ckpt / "config.json")
    expect_error([*FAR, "build", ckpt, "--out", "o"], "config.json is not a regular file", t, [t], timeout=60)
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").write_bytes(b"\xff\xfe")
    expect_error([*FAR, "build", ckpt, "--out", "o"], "config.json is not valid JSON", t, [t])


def test_build_weights_file_kinds(ws):
    """Needs torch in the child (the weights are read after the config); one run covers the directory case."""
    ckpt = _copy_ckpt(ws)
    (ckpt / "vae.safetensors").unlink()
    (ckpt / "vae.safetensors").mkdir()
    expect_error(
        [*FAR, "build", ckpt, "--out", "o", "--no-engines"],
        "vae.safetensors is a directory, not a file",
        ws["tmp"],
        [ws["tmp"]],
    )
    shutil.rmtree(ckpt)
    ckpt = _copy_ckpt(
        ws, width=8192, head_width=8192
    )  # ~10 GB of weights if built: checked on the meta device
    expect_error(
        [*FAR, "build", ckpt, "--out", "o", "--no-engines"],
        "model.safetensors does not match its config",
        ws["tmp"],
        [ws["tmp"]],
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_weights_say_permission_denied(ws):
    ckpt = _copy_ckpt(ws)
    (ckpt / "vae.safetensors").chmod(0)
    expect_error(
        [*FAR, "build", ckpt, "--out", "o", "--no-engines"], "permission denied", ws["tmp"], [ws["tmp"]]
    )


def test_reference_sampler_refuses_before_work(ws):
    t, ckpt = ws["tmp"], ws["ckpt"]
    expect_error(
        [*SAMPLE, "--checkpoint", ckpt, "--classes", "0-3", "--out", ckpt / "config.json"],
        "inside the checkpoint directory",
        t,
        [t, ckpt],
    )
    expect_error(
        [
            *SAMPLE,
            "--checkpoint",
            _copy_ckpt(ws, temperature=float("inf")),
            "--classes",
            "0",
            "--out",
            "x.png",
        ],
        "temperature must be a finite number",
        t,
        [t, ckpt],
    )


def test_reference_sampler_flags(ws):
    t = ws["tmp"]
    expect_error(
        [*SAMPLE, "--checkpoint", ws["ckpt"], "--cfg", "nan", "--out", "x.png"], "not a finite number", t, [t]
    )


def test_evaluate_checks_its_output_first(ws):
    t, ckpt = ws["tmp"], ws["ckpt"]
    expect_error(
        [*EVALUATE, "--checkpoint", ckpt, "--json", ckpt / "report.json"],
        "inside the checkpoint directory",
        t,
        [t, ckpt],
    )
    expect_error(
        [*EVALUATE, "--checkpoint", ckpt, "--cache-dir", ckpt / "cache"],
        "is inside",
        t,
        [t, ckpt],
    )
    expect_error(
        [*EVALUATE, "--checkpoint", ckpt, "--cache-dir", "afile"], "is a file, not a directory", t, [t]
    )


def test_reference_sampler_refuses_out_dir_inside_artifacts(ws):
    t, ckpt = ws["tmp"], ws["ckpt"]
    expect_error(
        [*SAMPLE, "--checkpoint", ckpt, "--classes", "0-3", "--out-dir", ckpt / "x"],
        "a checkpoint directory",
        t,
        [t, ckpt],
    )


# ----------------------------------------------------------------------------
# Interrupted builds leave no temporary directory
# ----------------------------------------------------------------------------


def _start_build(ckpt: Path, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [*FAR, "build", str(ckpt), "--out", "out", "--no-engines", "--batch", "1"],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_temp(cwd: Path, proc: subprocess.Popen, timeout: float = 240) -> list[Path]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = list(cwd.glob(".out.build-*"))
        if found:
            return found
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the build never created its temporary directory")


def _terminate_and_check(proc: subprocess.Popen, cwd: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    errors = [ln for ln in (out + err).splitlines() if ln.startswith("Error:")]
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    assert len(errors) == 1 and "interrupted by SIGTERM" in errors[0], out + err
    assert "Traceback" not in err
    assert not list(cwd.glob(".out.*"))


def test_killed_builds_leave_nothing_behind(ws):
    """SIGKILL leaves a temporary directory that the next build sweeps (its pid is gone); SIGTERM cleans up
    at once, exits with one Error line, and leaves an existing output as it was."""
    t = ws["tmp"]
    shutil.copytree(ws["eng"], t / "out")
    before = snapshot(t / "out")
    ckpt = _copy_ckpt(ws)

    killed = _start_build(ckpt, t)
    stale = _wait_for_temp(t, killed)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert all(p.exists() for p in stale)

    term = _start_build(ckpt, t)
    deadline = time.monotonic() + 240
    while any(p.exists() for p in stale):  # swept before the new build makes its own
        assert term.poll() is None and time.monotonic() < deadline, term.communicate()
        time.sleep(0.02)
    _wait_for_temp(t, term)
    _terminate_and_check(term, t)  # at once: onnx and onnxruntime are being imported, from C++ callbacks too

    later = _start_build(ckpt, t)
    end = time.monotonic() + 240
    while not list(t.glob(".out.build-*/*.onnx")):  # a graph is written: the next one is being exported
        assert later.poll() is None and time.monotonic() < end, later.communicate()
        time.sleep(0.02)
    _terminate_and_check(later, t)
    assert snapshot(t / "out") == before

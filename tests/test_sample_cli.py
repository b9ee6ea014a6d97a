"""`far-export sample` and `far-export bench`: same flags and pictures as training/sample.py, one-line errors.

Protects: the grid/out-dir layout and the PNG against the reference CLI; every bad
input exits 1 with `Error: <one line>` and no traceback; bench's report and JSON.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_engines import built_engines

from far_export.cli import cli

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    return built_engines(tmp_path_factory, "masked", "shortcut")


def _invoke(*args: str):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_grid_and_out_dir_equal_reference_cli(built, tmp_path):
    from training.sample import _cli as reference_cli

    ckpt, engines = built
    flags = ["--classes", "0-3", "--per-class", "2", "--seed", "3", "--head-steps", "2", "--cfg", "1.5"]
    ref = CliRunner().invoke(
        reference_cli(),
        [
            "--checkpoint",
            str(ckpt),
            *flags,
            "--out",
            str(tmp_path / "ref.png"),
            "--out-dir",
            str(tmp_path / "ref"),
        ],
    )
    assert ref.exit_code == 0, ref.output
    r = _invoke("sample", engines, *flags, "--out", tmp_path / "rt.png", "--out-dir", tmp_path / "rt")
    assert r.exit_code == 0, r.output
    assert "wrote 8 images" in r.output
    a, b = _png(tmp_path / "rt.png"), _png(tmp_path / "ref.png")
    assert a.shape == b.shape == (4 * 18 + 2, 2 * 18 + 2, 3)  # one row per class, 16 px images, 2 px padding
    assert np.abs(a - b).max() <= 2
    names = sorted(p.name for p in (tmp_path / "rt").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ref").iterdir())
    assert names[:3] == ["00000_class0.png", "00001_class0.png", "00002_class1.png"]


def test_needs_an_output(built):
    r = _invoke("sample", built[1])
    assert r.exit_code == 2 and "give --out grid.png and/or --out-dir DIR" in r.output


def _expect_error(result, match: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a click error, not a crash
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1 and match in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    "args,match",
    [
        (["--classes", "0-9"], "class id 4 is out of range: this model has classes 0..3"),
        (["--classes", "0-3", "--batch", "3"], "batch 3 is larger than the engines were built for (2)"),
        (["--classes", "0-3", "-k", "3"], "head steps must be a power of two"),
        (["--classes", "0-3", "--backend", "trt"], "lists no TensorRT plan"),
        (["--classes", "0-3", "--providers", "nope"], "unknown ONNX Runtime provider"),
    ],
)
def test_bad_requests(built, tmp_path, args, match):
    _expect_error(_invoke("sample", built[1], *args, "--out", tmp_path / "x.png"), match)
    assert not (tmp_path / "x.png").exists()


def test_bad_engine_directories(built, tmp_path):
    _expect_error(_invoke("sample", tmp_path / "none", "--out", tmp_path / "x.png"), "does not exist")
    bad = tmp_path / "bad"
    shutil.copytree(built[1], bad)
    man = json.loads((bad / "manifest.json").read_text())
    (bad / "manifest.json").write_text(json.dumps({**man, "schema_version": 99}))
    _expect_error(
        _invoke("sample", bad, "--classes", "0", "--out", tmp_path / "x.png"), "newer than this runtime"
    )
    (bad / "manifest.json").write_text(json.dumps(man))
    (bad / "vae_decoder.onnx").write_bytes(b"not a graph")
    _expect_error(
        _invoke("sample", bad, "--classes", "0", "--out", tmp_path / "x.png"), "does not match its sha256"
    )
    assert not (tmp_path / "x.png").exists()


def test_out_dir_of_an_earlier_run_is_refused_unless_overwrite(built, tmp_path):
    """Two runs into one --out-dir never mix: the second is refused in one line before any work, and with
    --overwrite it leaves exactly its own images (other files stay)."""
    out = tmp_path / "samples"
    first = ["--classes", "0-3", "--head-steps", "2", "--out-dir", out]
    assert _invoke("sample", built[1], *first).exit_code == 0
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = ["sample", built[1], "--classes", "0-1", "--head-steps", "2", "--seed", "5", "--out-dir", out]
    _expect_error(_invoke(*again), "already holds 4 images of an earlier run (00000_class0.png, ...)")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    r = _invoke(*again, "--overwrite")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in out.iterdir()) == ["00000_class0.png", "00001_class1.png", "notes.txt"]
    assert (out / "00000_class0.png").read_bytes() != before["00000_class0.png"]  # seed 5's, not seed 0's


def test_progress_counts_images_and_the_grid_is_captioned(built, tmp_path):
    r = _invoke(
        "sample", built[1], "--classes", "1-3", "--per-class", "2", "-k", "2", "--out", tmp_path / "g.png"
    )
    assert r.exit_code == 0, r.output
    assert re.search(r"sampling: +\d+%\|.*\| \d/6 img", r.output), r.output  # images, not AR steps
    assert "step" not in r.output
    caption = "g.png: one row per class (1-3, top to bottom), the 2 images of each class left to right"
    assert caption in r.output


def test_bf16_directory_on_the_cpu_says_it_needs_a_gpu(built, tmp_path):
    """ONNX Runtime's CPU provider has no bf16 kernels: the runtime says so from the manifest, before any
    session (a bf16 build's graphs would fail there with ONNX Runtime's NOT_IMPLEMENTED)."""
    bf16 = tmp_path / "bf16"
    shutil.copytree(built[1], bf16)
    man = json.loads((bf16 / "manifest.json").read_text())
    (bf16 / "manifest.json").write_text(json.dumps({**man, "precision": "bf16"}))
    r = _invoke("sample", bf16, "--classes", "0", "--out", tmp_path / "x.png")
    _expect_error(r, "holds bf16 graphs, which need a GPU (ONNX Runtime's CPU provider has no bf16 kernels)")
    assert "--backend trt or --providers cuda" in r.output and not (tmp_path / "x.png").exists()


def test_console_script_exit_code_without_traceback(built, tmp_path):
    exe = Path(sys.executable).parent / "far-export"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-c", "from far_export.cli import main; main()"]
    r = subprocess.run(
        [*cmd, "sample", str(built[1]), "--classes", "7", "--out", str(tmp_path / "x.png")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert (
        r.stderr.strip().splitlines()[-1] == "Error: class id 7 is out of range: this model has classes 0..3"
    )
    assert "Traceback" not in r.stderr


def test_bench_reports_stages_and_json(built, tmp_path):
    out = tmp_path / "bench.json"
    r = _invoke("bench", built[1], "--warmup", "1", "--runs", "3", "--batch", "1", "--json", out)
    assert r.exit_code == 0, r.output
    for word in ("backbone", "head", "vae", "loop Python", "p50", "p95", "images/s", "peak host RSS"):
        assert word in r.output
    d = json.loads(out.read_text())
    assert d["batch"] == 1 and d["runs"] == 3
    st = d["stages_ms"]
    parts = st["backbone"] + st["head"] + st["vae"] + st["loop"] + st["prepare"]
    assert 0 < parts <= st["wall"] * 1.001
    assert d["latency_ms"]["p50"] <= d["latency_ms"]["p95"]
    assert d["calls_per_batch"] == {"backbone": 4, "head": 8}  # tiny: num_iter 4, K 2
    assert d["peak_rss_mb"] > 0
    # the engines were built for batch 2: batch 1 is padded, and bench says so
    assert "WARNING: batch 1 on engines built for batch 2" in r.output and "build with --batch 1" in r.output


def test_bench_bad_batch(built):
    _expect_error(_invoke("bench", built[1], "--batch", "5", "--runs", "1"), "larger than the engines")

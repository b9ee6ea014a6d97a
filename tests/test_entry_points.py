"""The console scripts pyproject.toml declares, and the README's `python training/*.py` forms: each starts
and shows its help from any directory, with the package installed and no sys.path edits in the scripts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib  # novermin (3.11+)
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = {
    "far-export": "far_export.cli:main",
    "far-train": "training.train:main",
    "far-sample": "training.sample:main",
    "far-evaluate": "training.evaluate:main",
}


def test_pyproject_declares_the_console_scripts():
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"] == SCRIPTS


@pytest.mark.parametrize("name", SCRIPTS)
def test_console_script_help(name, tmp_path):
    exe = Path(sys.executable).parent / name
    if not exe.is_file():
        pytest.skip(
            f"{name} is not installed beside {sys.executable}: pip install -e . (scripts/test.sh does)"
        )
    r = subprocess.run([str(exe), "--help"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: {name} ") and "--help" in r.stdout, r.stdout


@pytest.mark.parametrize("script", ["train", "sample", "evaluate"])
def test_python_training_script_help(script, tmp_path):
    """`python training/X.py` as README writes it, run from elsewhere too (the script's own folder is
    then first on sys.path: the installed package must still be the one imported)."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "training" / f"{script}.py"), "--help"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"Usage: {script}.py ") and "--help" in r.stdout, r.stdout

"""The runtime runs on a device without torch: generation in a subprocess where `import torch` fails.

A `sitecustomize.py` on PYTHONPATH installs a meta-path finder that refuses torch
(and, for the library test, `training` and `far_export` too, which the runtime must
never import). The images must equal those generated in this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import built_engines

from runtime.pipeline import Pipeline

pytest.importorskip("torch")  # building the engines needs it; the subprocess must not

REPO = Path(__file__).resolve().parent.parent

BLOCKER = """
import importlib.abc, os, sys

BLOCKED = tuple(os.environ["FAR_BLOCK_IMPORTS"].split(","))


class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the runtime must not import it")
        return None


sys.meta_path.insert(0, Blocker())
"""


def _env(tmp_path: Path, blocked: str) -> dict[str, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(REPO)])
    env["FAR_BLOCK_IMPORTS"] = blocked
    return env


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return built_engines(tmp_path_factory, "masked", "shortcut")[1]


def test_blocker_works(tmp_path):
    r = subprocess.run(
        [sys.executable, "-c", "import torch"], env=_env(tmp_path, "torch"), capture_output=True, text=True
    )
    assert r.returncode != 0 and "torch is blocked" in r.stderr


def test_pipeline_generates_without_torch_training_far_export(engines, tmp_path):
    out = tmp_path / "images.npy"
    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        from runtime.pipeline import Pipeline
        pipe = Pipeline.load({str(engines)!r})
        images = pipe.generate([0, 1, 2], head_steps=2, seed=11)
        np.save({str(out)!r}, images)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "training", "far_export"))
        print(json.dumps(loaded))
    """)
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=_env(tmp_path, "torch,training,far_export"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == []
    here = Pipeline.load(engines).generate([0, 1, 2], head_steps=2, seed=11)
    assert np.array_equal(np.load(out), here)  # exact: the same graphs, ORT build, threads and machine


def test_cli_sample_without_torch(engines, tmp_path):
    """`far-export sample` (far_export.cli imports no torch) writes the grid with torch blocked."""
    grid = tmp_path / "grid.png"
    code = "from far_export.cli import main; main()"
    r = subprocess.run(
        [sys.executable, "-c", code, "sample", str(engines), "--classes", "0-3", "--out", str(grid)],
        env=_env(tmp_path, "torch,training"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert grid.is_file() and "wrote 4 images" in r.stdout

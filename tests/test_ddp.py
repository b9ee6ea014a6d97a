"""torchrun with 2 gloo processes on CPU: both stages train under DDP and the ranks stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from training.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import write_image_folder  # noqa: E402
from test_train import tiny_overrides  # noqa: E402


@pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo"
)
def test_two_gloo_ranks_stay_in_sync(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=2, per_class=4, size=16)
    out = tmp_path / "run"
    args = tiny_overrides(data, far_steps=3, vae_steps=2) + [
        "vae.check_sync_every=1",
        "train.check_sync_every=1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes",
            "1",
            "--nproc_per_node",
            "2",
            str(ROOT / "training" / "train.py"),
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    syncs = [rec for rec in log if "sync_spread" in rec]
    # every step of both stages (plus the final check) compared the two ranks' weights
    assert [(rec["stage"], rec["step"]) for rec in syncs] == [
        ("vae", 1),
        ("vae", 2),
        ("vae", 2),
        ("far", 1),
        ("far", 2),
        ("far", 3),
        ("far", 3),
    ]
    for rec in syncs:
        a, b = rec["sync_checksums"]
        assert a == b and rec["sync_spread"] == 0.0
    # the global batch of 4 was split into 2 per rank; the result is an ordinary checkpoint
    done = [rec for rec in log if rec.get("stage") == "done"]
    assert done and done[0]["world_size"] == 2
    assert load_checkpoint(out / "checkpoint").cfg.num_classes == 2

"""A training run: both stages in one run directory (held by one process), and the run-time options
(torch's CPU threads) that a run stores for --resume."""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from runtime.files import write_atomic
from runtime.locks import locked_dir
from training.config import ConfigError
from training.trainer.distributed import Context, setup_context
from training.trainer.loop import Log
from training.trainer.run_checks import RUN_OPTIONS, TrainingError, check_run
from training.trainer.run_config import RunConfig, dump_toml
from training.trainer.stages import train_far, train_vae


def train(run: RunConfig, out: Path, resume: bool = False, options: dict[str, Any] | None = None) -> Path:
    """Both stages (or FAR alone on `vae.init`); returns the exported checkpoint directory.
    `options` (the CLI's run-time options, e.g. threads) are stored in RUN/run.json for --resume."""
    ctx = setup_context(run.device)
    held = ExitStack()
    try:
        if ctx.device.type == "cpu" and ctx.distributed and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(max(1, torch.get_num_threads() // ctx.world))
        cfg, given_vae = check_run(run, out, resume)
        ctx.barrier()  # every rank checked the directory before rank 0 writes into it
        if ctx.main:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(locked_dir(out, "the run directory", TrainingError))  # one process per run
            write_atomic(out / "config.toml", dump_toml(run.to_dict()))
            if options is not None:
                write_atomic(out / RUN_OPTIONS, json.dumps(options, indent=2) + "\n")
            print(start_line(ctx), file=sys.stderr)
        ctx.barrier()
        log = Log(out / "log.jsonl", ctx)
        t0 = time.time()
        vae = given_vae if given_vae is not None else train_vae(run, cfg, out, ctx, log, resume)
        t1 = time.time()
        ckpt = train_far(run, cfg, vae, out, ctx, log, resume)
        log(stage="done", vae_seconds=t1 - t0, far_seconds=time.time() - t1, world_size=ctx.world)
        return ckpt
    finally:
        held.close()
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start_line(ctx: Context) -> str:
    """Where the run computes: the device, torch's CPU threads per process and the process count."""
    procs = f" in each of {ctx.world} processes" if ctx.distributed else ""
    return f"training on {ctx.device}, {torch.get_num_threads()} CPU threads{procs} (--threads sets them)"


def run_options(out: Path) -> dict[str, Any]:
    """The run-time options stored with a run ({} when there are none or the file is unreadable)."""
    path = out / RUN_OPTIONS
    if not path.is_file():
        return {}
    try:
        options = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        warnings.warn(f"ignoring {path} ({e}): pass the run-time options (--threads) again", stacklevel=2)
        return {}
    return options if isinstance(options, dict) else {}


def set_threads(threads: int | None, given: bool = True) -> None:
    """torch's CPU threads: 1 .. this machine's CPUs (a stored value above them, from a run started on
    a bigger machine, is lowered with a note)."""
    if threads is None:
        return
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if type(threads) is not int or threads < 1 or (given and threads > cpus):
        raise ConfigError(f"--threads must be an int in [1, {cpus}] (this machine's CPUs), got {threads!r}")
    if threads > cpus:
        print(
            f"note: the run used --threads {threads}; this machine has {cpus} CPUs: using {cpus}",
            file=sys.stderr,
        )
    torch.set_num_threads(min(threads, cpus))

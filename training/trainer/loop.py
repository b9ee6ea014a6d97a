"""The optimisation loop both training stages share: AdamW, the LR schedule, EMA, gradient clipping,
resume state, periodic saves and sample grids, DDP sync checks, and a save on Ctrl-C, SIGTERM or SIGHUP."""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from runtime.files import WriteError, atomic_path, write_failure
from runtime.options import Terminated
from training.trainer.distributed import Context, batch_indices, ddp_objective, params_checksum
from training.trainer.optim import ema_update, lr_at, param_groups
from training.trainer.run_checks import TrainingError, load_state, shape_differences
from training.trainer.run_config import OptimConfig


def step_seed(seed: int, step: int, rank: int) -> int:
    """Every step's randomness is a function of (seed, step, rank): resume continues it exactly."""
    return (seed * 1_000_003 + step * 7_919 + rank * 104_729) % (2**63)


class Log:
    """JSONL log (rank 0 only)."""

    def __init__(self, path: Path, ctx: Context):
        self.path, self.ctx = path, ctx

    def __call__(self, **record: Any) -> None:
        if self.ctx.main:
            try:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as e:
                raise WriteError(write_failure(self.path, e)) from None


@dataclass
class Stage:
    name: str
    model: nn.Module
    loss_fn: Any  # (model, *batch) -> scalar loss
    batch_fn: Any  # (indices, generator) -> tuple of tensors on device
    num_rows: int
    opt: OptimConfig
    state_path: Path
    remedy: str  # what to do when state_path is damaged
    export_fn: Any  # (ema, step) -> None: write the exported weights
    sample_fn: Any = None  # (ema, step) -> None
    ema_teacher: bool = False  # pass the EMA to loss_fn (the shortcut head's self-consistency teacher)


def run_stage(stage: Stage, ctx: Context, log: Log, resume: bool) -> None:
    from tqdm import tqdm

    o = stage.opt
    model = stage.model.to(ctx.device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optim = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas))
    step = 0
    if resume and stage.state_path.exists():
        state = load_state(stage.state_path, stage.name, stage.remedy)
        diff = shape_differences(model.state_dict(), state["model"])
        if diff:
            raise TrainingError(
                f"{stage.state_path} was trained with other model dims ({diff}): resume with the "
                f"run's own model settings, or start a new run in another --out"
            )
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optim.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if ctx.main:
            print(f"[{stage.name}] resumed at step {step} from {stage.state_path}", file=sys.stderr)
    if step >= o.steps:
        return

    objective = ddp_objective(model, stage.loss_fn, ctx)
    autocast = ctx.device.type == "cuda" and o.amp

    def save(at: int) -> None:
        if ctx.main:
            stage.export_fn(ema, at)
            with (
                atomic_path(stage.state_path) as tmp,
                open(tmp, "wb") as f,
            ):  # a failed write: OSError, not torch's
                torch.save(
                    {
                        "stage": stage.name,
                        "step": at,
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optim.state_dict(),
                        "world_size": ctx.world,
                    },
                    f,
                )
        ctx.barrier()

    def check_sync(at: int) -> None:
        if not ctx.distributed:
            return
        sums = [None] * ctx.world
        dist.all_gather_object(sums, (params_checksum(model), params_checksum(ema)))
        spread = max(abs(s[0] - sums[0][0]) + abs(s[1] - sums[0][1]) for s in sums)
        log(stage=stage.name, step=at, sync_checksums=[s[0] for s in sums], sync_spread=spread)
        if spread > 1e-6 * (1 + abs(sums[0][0])):
            raise TrainingError(f"[{stage.name}] DDP ranks diverged at step {at}: checksums {sums}")

    last_good = step
    per_rank = o.batch_size // ctx.world
    if per_rank < 1:
        raise TrainingError(f"batch_size {o.batch_size} is smaller than the number of processes {ctx.world}")
    bar = tqdm(
        total=o.steps, initial=step, desc=stage.name, unit="step", disable=not ctx.main, dynamic_ncols=True
    )
    t0, seen, window = time.time(), 0, []
    try:
        while step < o.steps:
            torch.manual_seed(step_seed(o.seed, step, ctx.rank))
            g = torch.Generator().manual_seed(step_seed(o.seed + 1, step, ctx.rank))
            idx = batch_indices(stage.num_rows, step, o.batch_size, ctx, o.seed)
            batch = stage.batch_fn(idx, g)
            lr = lr_at(step, o)
            for group in optim.param_groups:
                group["lr"] = lr
            model.train()
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = objective(*batch, ema) if stage.ema_teacher else objective(*batch)
            if not torch.isfinite(loss.detach()):
                raise TrainingError(
                    f"[{stage.name}] loss is {loss.item()} at step {step}: stopped; the last good checkpoint "
                    f"(step {last_good}) is kept in {stage.state_path.parent}. Try a lower lr or grad_clip."
                )
            optim.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(
                model.parameters(), o.grad_clip if o.grad_clip > 0 else float("inf")
            )
            optim.step()
            ema_update(ema, model, o.ema_decay, step)
            step += 1
            seen += per_rank * ctx.world
            window.append(loss.item())
            bar.update(1)
            if step % o.log_every == 0 or step == o.steps:
                dt = time.time() - t0
                rate = seen / max(dt, 1e-9)
                mean_loss = float(np.mean(window))
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}", lr=f"{lr:.2e}")
                log(
                    stage=stage.name,
                    step=step,
                    loss=mean_loss,
                    lr=lr,
                    grad_norm=float(gnorm),
                    images_per_s=rate,
                    time=time.time(),
                )
                t0, seen, window = time.time(), 0, []
            if o.check_sync_every and step % o.check_sync_every == 0:
                check_sync(step)
            if o.save_every and step % o.save_every == 0 and step < o.steps:
                save(step)
                last_good = step
            if stage.sample_fn and o.sample_every and step % o.sample_every == 0 and ctx.main:
                _try_sample(stage, ema, step)
    except (KeyboardInterrupt, Terminated):  # Ctrl-C, SIGTERM, SIGHUP: keep the work done so far
        bar.close()
        if ctx.main:
            print(f"\n[{stage.name}] interrupted at step {step}: saving", file=sys.stderr)
        save(step)
        raise
    except BaseException:
        bar.close()  # the error message starts on a line of its own
        raise
    bar.close()
    check_sync(step)
    save(step)
    if stage.sample_fn and ctx.main:
        _try_sample(stage, ema, step)


def _try_sample(stage: Stage, ema: nn.Module, step: int) -> None:
    """Sample grids are a by-product: a failure is reported, never the end of a training run."""
    try:
        stage.sample_fn(ema, step)
    except Exception as e:  # noqa: BLE001 - any failure of the sampler
        print(
            f"\n[{stage.name}] warning: sample grid at step {step} failed: {type(e).__name__}: {e}",
            file=sys.stderr,
        )

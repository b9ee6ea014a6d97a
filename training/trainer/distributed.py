"""DDP: the process context (rank, world, device), this rank's rows of a global batch, and the
wrapper that lets DDP all-reduce the gradients of a loss function."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.config import ConfigError


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def setup_context(device: str) -> Context:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f'device = {device!r} but torch sees no GPU: set device="cpu" (or "auto")')
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group(backend=backend)
        return Context(torch.device(device), rank, world)
    return Context(torch.device(device))


def batch_indices(n: int, step: int, batch: int, ctx: Context, seed: int) -> list[int]:
    """This rank's rows for global step `step`: epochs of a DistributedSampler permutation (drop_last)."""
    from torch.utils.data import DistributedSampler

    per_rank = batch // ctx.world
    sampler = DistributedSampler(
        range(n), num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True
    )
    per_epoch = max(1, len(sampler) // per_rank)
    epoch, k = divmod(step, per_epoch)
    sampler.set_epoch(epoch)
    order = list(sampler)
    return order[k * per_rank : (k + 1) * per_rank]


def params_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() + p.detach().double().abs().sum() for p in model.parameters()))


class _Objective(nn.Module):
    """Wraps a loss function so DDP sees a forward() (gradients are all-reduced in backward)."""

    def __init__(self, model: nn.Module, fn):
        super().__init__()
        self.model = model
        self.fn = fn

    def forward(self, *batch):
        return self.fn(self.model, *batch)


def ddp_objective(model: nn.Module, loss_fn, ctx: Context) -> nn.Module:
    """`loss_fn(model, *batch)` as a module; under DDP its backward all-reduces the gradients."""
    objective = _Objective(model, loss_fn)
    if not ctx.distributed:
        return objective
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(objective, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)

"""Validation: every graph against PyTorch (ONNX Runtime on CPU), then the whole sampling loop.

1. Per graph, on fixed random inputs and on real inputs (recorded while the graphs
   sample with the checkpoint's weights): max, mean and p99 absolute error of each
   output against the fp32 PyTorch module (what the checkpoint means; for fp16/bf16
   graphs the tolerance bounds export error plus rounding). Errors are measured
   relative to the output's scale, max(1, max|reference|), and must stay within the
   graph's tolerance for the precision; otherwise `ValidationError` names the graph,
   the output and the numbers.
2. End to end: the full AR loop through the graphs (`sample_loop` here, and the lean
   runtime's `runtime.pipeline`, see far_export/build.py) against the PyTorch reference
   sampler (`training.sample.sample_tokens`, fp32) for one seed: tokens and image.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from far_export.export import E2E_TOLERANCES, TOLERANCES, GraphIO, GraphShapes, Tolerance, to_torch  # noqa: F401
from far_export.feeds import example_inputs, upcast_bf16  # noqa: F401 (re-exported)
from runtime.errors import FarError
from runtime.schedule import (
    SamplingSettings,
    causal_schedule,
    cfg_scale,
    ddpm_sampling_schedule,
    image_rng,
    masked_positions,
    masked_schedule,
    shortcut_times,
)
from training.config import FARConfig


class ValidationError(FarError, RuntimeError):
    """A graph (or the whole loop) differs from PyTorch by more than the precision's tolerance."""


Runner = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def error_stats(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise ValidationError(f"shape {got.shape} differs from the reference's {ref.shape}")
    err = np.abs(got - ref)
    if not np.all(np.isfinite(got)):
        return {"max": float("inf"), "mean": float("inf"), "p99": float("inf"), "scale": 1.0}
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    return {"max": float(err.max(initial=0.0)), "mean": float(err.mean()) if err.size else 0.0,
            "p99": float(np.percentile(err, 99)) if err.size else 0.0, "scale": scale}


def check(stats: dict[str, float], tol: Tolerance, what: str) -> None:
    s = stats["scale"]
    if not stats["max"] <= tol.max_abs * s or not stats["p99"] <= tol.p99_abs * s:
        raise ValidationError(
            f"{what} differs from PyTorch: max abs error {stats['max']:.3g} (p99 {stats['p99']:.3g}, "
            f"mean {stats['mean']:.3g}) > tolerance {tol.max_abs:g} (p99 {tol.p99_abs:g}) x scale {s:.3g}"
        )


# ----------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------


def ort_session(path: str | Path | bytes, threads: int = 0, name: str | None = None) -> Any:
    """A CPU ONNX Runtime session; a graph it cannot run raises ValidationError in one line."""
    import onnxruntime as ort

    name = name or (Path(path).name if not isinstance(path, bytes) else "graph")

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # idle ORT threads spin by default and starve the PyTorch reference that runs between graph calls
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        src = path if isinstance(path, bytes) else str(path)
        return ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types (Fail, NotImplemented, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValidationError(f"ONNX Runtime cannot load {name}: {first}") from None


def ort_runner(session: Any, io_: GraphIO) -> Runner:
    names = [s.name for s in io_.outputs]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {s.name: feeds[s.name] for s in io_.inputs})))

    return run


def torch_runner(module: nn.Module, io_: GraphIO) -> Runner:
    """The torch module as a graph runner; float inputs are cast to the module's dtype (an fp32 reference
    of an fp16 graph takes the fp16 KV cache as fp32)."""
    names = [s.name for s in io_.outputs]
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def arg(a: np.ndarray, spec_dtype: str) -> torch.Tensor:
        t = to_torch(a, spec_dtype)
        return t.to(dtype) if t.is_floating_point() and spec_dtype != "float32" else t

    @torch.no_grad()
    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = module(*(arg(feeds[s.name], s.dtype) for s in io_.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().numpy() for n, o in zip(names, out)}

    return run


def compare(name: str, io_: GraphIO, graph: Runner, reference: Runner, feeds: list[dict[str, np.ndarray]],
            tol: Tolerance, label: str) -> dict[str, dict[str, float]]:
    """Worst error over `feeds` per output; raises ValidationError on the first output out of tolerance."""
    worst: dict[str, dict[str, float]] = {}
    for feed in feeds:
        got, ref = graph(feed), reference(feed)
        for spec in io_.outputs:
            try:
                st = error_stats(got[spec.name], ref[spec.name])
            except ValidationError as e:
                raise ValidationError(f"{name} graph, output {spec.name!r} ({label} inputs): {e}") from None
            check(st, tol, f"{name} graph, output {spec.name!r} ({label} inputs)")
            w = worst.setdefault(spec.name, st)
            if st["max"] > w["max"]:
                worst[spec.name] = st
    return worst


def random_feeds(cfg: FARConfig, io_: GraphIO, count: int = 2, seed: int = 1234) -> list[dict[str, np.ndarray]]:
    rng = np.random.Generator(np.random.PCG64(seed))
    return [example_inputs(cfg, io_, rng) for _ in range(count)]


# ----------------------------------------------------------------------------
# The sampling loop over graph runners (numpy; the randomness contract of runtime/schedule.py)
# ----------------------------------------------------------------------------


LoopSettings = SamplingSettings


def sample_loop(cfg: FARConfig, shapes: GraphShapes, specs: dict[str, GraphIO], run: dict[str, Runner],
                labels: list[int], s: LoopSettings,
                record: Callable[[str, dict[str, np.ndarray]], None] | None = None,
                progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Tokens (B, L, C) float32 through the backbone and head runners; `record(graph, feeds)` sees every call."""
    B, L, C, Q = shapes.batch, cfg.seq_len, cfg.token_dim, shapes.max_query
    if len(labels) != B:
        raise ValueError(f"the graphs take {B} labels per call, got {len(labels)}")
    rngs = [image_rng(s.seed, i) for i in range(B)]
    labels_a = np.asarray(labels, dtype=np.int64)
    cfg_in = shapes.guided and any(t.name == "cfg" for t in specs["head"].inputs)

    def call(graph: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if record:
            record(graph, feeds)
        return run[graph](feeds)

    def head(z: np.ndarray, n: int, cfg_iter: float) -> np.ndarray:  # -> (B, n, C)
        x = np.zeros((B, Q, C), np.float32)
        scale = s.temperature if cfg.head == "shortcut" else 1.0
        for b, r in enumerate(rngs):
            x[b, :n] = scale * r.standard_normal((n, C))
        x = x.reshape(B * Q, C)
        extra = {"cfg": np.array([cfg_iter], np.float32)} if cfg_in else {}
        if cfg.head == "shortcut":
            d = np.array([1.0 / s.head_steps], np.float32)
            for t in shortcut_times(s.head_steps):
                x = call("head", {"x": x, "t": np.array([t], np.float32), "d": d, "z": z, **extra})["x_next"]
        else:
            times, coef = ddpm_sampling_schedule(cfg.diffusion_steps, s.head_steps)
            for j, t in enumerate(times):
                noise = np.zeros((B, Q, C), np.float32)
                if j < len(times) - 1:
                    for b, r in enumerate(rngs):
                        noise[b, :n] = s.temperature * r.standard_normal((n, C))
                x = call("head", {"x": x, "t": np.array([t], np.float32), "z": z, **extra,
                                  "coef": coef[j].astype(np.float32), "noise": noise.reshape(B * Q, C)})["x_next"]
        return x.reshape(B, Q, C)[:, :n]

    tokens = np.zeros((B, L, C), np.float32)
    if cfg.backbone == "masked":
        orders = [r.permutation(L) for r in rngs]
        mask = np.ones((B, L), np.float32)
        schedule = masked_schedule(L, s.num_iter)
        for i, step in enumerate(schedule):
            n = step.num_pred
            if n > Q:
                raise ValueError(f"num_iter {s.num_iter} predicts {n} tokens in a step; the graphs hold {Q}")
            pos = np.stack([masked_positions(o, step) for o in orders])  # (B, n)
            query = np.concatenate([pos, np.repeat(pos[:, :1], Q - n, axis=1)], axis=1)  # padded (B, Q)
            z = call("backbone", {"tokens": tokens.copy(), "mask": mask.copy(), "labels": labels_a, "query": query})["z"]
            x = head(z, n, cfg_scale(s.cfg, s.cfg_schedule, L, step))
            rows = np.arange(B)[:, None]
            tokens[rows, pos] = x
            mask[rows, pos] = 0.0
            if progress:
                progress(i + 1, len(schedule))
    else:
        cache_spec = next(t for t in specs["backbone"].inputs if t.name == "cache")
        cache = np.zeros(cache_spec.shape, np.float32 if cache_spec.dtype == "bfloat16" else cache_spec.dtype)
        prev = np.zeros((B, C), np.float32)
        schedule = causal_schedule(L)
        for i, step in enumerate(schedule):
            out = call("backbone", {"prev_token": prev, "pos": np.array([i], np.int64), "labels": labels_a,
                                    "cache": cache})
            cache = out["cache_out"].astype(cache.dtype)
            prev = head(out["z"], 1, cfg_scale(s.cfg, s.cfg_schedule, L, step))[:, 0]
            tokens[:, i] = prev
            if progress:
                progress(i + 1, len(schedule))
    return tokens


class Recorder:
    """Keeps a few real graph inputs seen during sampling: the first, a middle and the last call per graph."""

    def __init__(self) -> None:
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}

    def __call__(self, graph: str, feeds: dict[str, np.ndarray]) -> None:
        self.calls.setdefault(graph, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

    def picks(self, graph: str) -> list[dict[str, np.ndarray]]:
        calls = self.calls.get(graph, [])
        idx = sorted({0, len(calls) // 2, len(calls) - 1}) if calls else []
        return [calls[i] for i in idx]


def settings_dict(s: LoopSettings) -> dict[str, Any]:
    return asdict(s)

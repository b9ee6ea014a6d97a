"""The inputs the build and `far-export compile` (which runs where there is no torch) feed graphs: valid
random ones, and the ones the runtime's own loop really feeds them (`run_loop`: the inputs of int8
calibration, of the end-to-end check and of the real-input checks); bf16 rounding in numpy, and a bf16 graph
upcast to fp32 so that ONNX Runtime on CPU (no bf16 kernels) can run it. Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.backends import Backend, Keep, RecordingBackend, from_bf16_bits, to_bf16_bits
from runtime.manifest import GraphSpec, Manifest, ModelInfo, is_variant
from runtime.pipeline import Pipeline, Progress
from runtime.schedule import SamplingSettings, ddpm_sampling_schedule

Feed = dict[str, np.ndarray]  # one call's inputs, by name


def example_inputs(model: ModelInfo, graph: GraphSpec, rng: np.random.Generator) -> Feed:
    """Valid random inputs for one graph (labels in range, d a trained step size, ...)."""
    L = model.seq_len
    out: Feed = {}
    for spec in graph.inputs:
        shape, n = spec.shape, spec.name
        if n == "labels":
            a = rng.integers(0, model.num_classes, shape)
        elif n == "query":
            a = np.stack([np.sort(rng.permutation(L)[: shape[1]]) for _ in range(shape[0])])
        elif n == "n":  # tokens predicted at a step: 1..Q
            q = next(t.shape[1] for t in graph.inputs if t.name == "query")
            a = rng.integers(1, q + 1, shape)
        elif n == "pos":
            a = rng.integers(0, L, shape)
        elif n == "mask":
            a = (rng.random(shape) < 0.5).astype(np.float32)
        elif n == "known":  # an encoder variant: a mask with at most c known tokens and their positions
            a, out["mask"] = known_slots(L, shape, rng)
        elif n == "t":
            a = (
                rng.random(shape)
                if model.head == "shortcut"
                else rng.integers(0, model.diffusion_steps, shape)
            )
        elif n == "d":
            a = np.full(shape, 2.0 ** -int(rng.integers(0, model.shortcut_levels)))
        elif n == "cfg":
            a = np.full(shape, 1.0 + 3.0 * rng.random())
        elif n == "coef":
            _, coef = ddpm_sampling_schedule(model.diffusion_steps, 8)
            a = coef[int(rng.integers(0, len(coef)))]
        elif n == "cache":
            a = rng.standard_normal(shape)
            # keys/values of positions not yet written are never read; zero the tail like a fresh cache
            p = int(rng.integers(1, L))
            a[..., p:, :] = 0.0
        elif n == "z":
            a = rng.standard_normal(shape)
        else:  # tokens, prev_token, x, noise
            a = rng.standard_normal(shape)
        out[n] = _as_dtype(np.asarray(a), spec.dtype)
    return out


def known_slots(
    seq_len: int, shape: tuple[int, ...], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """(known (B, c) int64, mask (B, L) float32) of an encoder variant: per image 0..c known tokens
    (mask 0) at random positions, their positions in random slots, the other slots padded with unknown
    positions (at least one token is unknown, as at every AR step)."""
    B, c = shape
    known = np.zeros(shape, np.int64)
    mask = np.ones((B, seq_len), np.float32)
    for b in range(B):
        order = rng.permutation(seq_len)
        k = int(rng.integers(0, min(c, seq_len - 1) + 1))
        mask[b, order[:k]] = 0.0
        slots = np.concatenate([order[:k], rng.choice(order[k:], c - k)])
        known[b] = rng.permutation(slots)
    return known, mask


def _as_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # numpy has no bfloat16: keep float32 values that are exactly bf16
        return to_bf16_values(a.astype(np.float32))
    return a.astype(dtype)


def to_bf16_values(a: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest bfloat16, ties to even (still float32; numpy has no bfloat16)."""
    return from_bf16_bits(to_bf16_bits(a))


def upcast_bf16(path: str | Path) -> bytes:
    """The graph at `path` with every bfloat16 tensor made float32: its bf16 weights (exact in fp32) and
    casts to bf16 become fp32. ONNX Runtime on CPU has no bf16 kernels for most ops; this runs the same
    graph structure with the same rounded weights, activations in fp32 (validation of bf16 graphs on CPU)."""
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load(str(path))
    bf16, f32 = TensorProto.BFLOAT16, TensorProto.FLOAT

    def fix_tensor(t: TensorProto) -> None:
        if t.data_type == bf16:
            arr = numpy_helper.to_array(t).astype(np.float32)  # onnx returns ml_dtypes bfloat16
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def fix_graph(g: Any) -> None:
        for t in g.initializer:
            fix_tensor(t)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if vi.type.tensor_type.elem_type == bf16:
                vi.type.tensor_type.elem_type = f32
        for node in g.node:
            for a in node.attribute:
                if a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == bf16:
                    a.i = f32
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(model.graph)
    return model.SerializeToString()


# ----------------------------------------------------------------------------
# The inputs the runtime's loop feeds each graph
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoopRun:
    """What `run_loop` sampled, and the inputs it recorded."""

    tokens: np.ndarray  # (n, L, C) float32
    images: np.ndarray  # (n, 3, H, W) float32 in [0, 1]
    calls: dict[str, list[Feed]]  # per graph, the inputs of the calls `keep` selected, in call order


def run_loop(
    directory: Path,
    manifest: Manifest,
    backend: Backend,
    batches: Sequence[tuple[Sequence[int], SamplingSettings, int]],
    keep: Keep,
    progress: Progress | None = None,
) -> LoopRun:
    """The runtime's own loop (`runtime.pipeline.Pipeline` over `backend`) samples each engine batch
    (labels, settings, the index of its first image) and decodes it; the inputs of the calls `keep` selects
    (graph, index of the call over the whole run) are recorded on the way (`RecordingBackend`). The one
    way the build goes through the runtime: int8 calibration, the end-to-end check and the real-input checks
    all sample with it."""
    recording = RecordingBackend(backend, keep)
    pipe = Pipeline(directory, manifest, recording)
    tokens = [pipe.sample_tokens(labels, s, first_index=i, progress=progress) for labels, s, i in batches]
    images = [pipe.decode(t) for t in tokens]
    return LoopRun(np.concatenate(tokens), np.concatenate(images), recording.calls)


def spread(calls: int, picks: int) -> set[int]:
    """`picks` of `calls` call indices, evenly spaced, first and last included. The spacing is then never a
    whole number of loops, so every AR step is sampled (every k-th call would keep only each batch's first
    step when k is a multiple of the calls per batch)."""
    return {int(i) for i in np.linspace(0, calls - 1, min(calls, picks)).round()}


def with_backbone_feeds(calls: dict[str, list[Feed]], limit: int | None = None) -> dict[str, list[Feed]]:
    """`calls` (recorded inputs per graph) where the full backbone also gets every encoder variant's inputs
    without `known`: they are valid inputs of it, and the loop may never call the full backbone when the
    variants cover every step. At most `limit` backbone feeds, spread evenly."""
    feeds = list(calls.get("backbone", []))
    for name, fs in calls.items():
        if is_variant(name):
            feeds += [{k: v for k, v in f.items() if k != "known"} for f in fs]
    if limit:
        feeds = [feeds[i] for i in sorted(spread(len(feeds), limit))]
    return {**calls, "backbone": feeds} if feeds else calls

"""Torch-free helpers shared by the exporter's validation and `far-export compile` (which runs where
there is no torch): valid random inputs for a graph, bf16 rounding in numpy, and a bf16 graph
upcast to fp32 so that ONNX Runtime on CPU (no bf16 kernels) can run it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from runtime.backends import from_bf16_bits, to_bf16_bits
from runtime.manifest import TensorSpec
from runtime.schedule import ddpm_sampling_schedule


class ModelLike(Protocol):
    """What input generation needs of a model: a FARConfig or a manifest's ModelInfo."""

    seq_len: int
    num_classes: int
    head: str
    diffusion_steps: int
    shortcut_levels: int


class GraphLike(Protocol):
    """A graph's inputs: far_export.export.GraphIO or a manifest's GraphSpec."""

    inputs: tuple[TensorSpec, ...]


def example_inputs(cfg: ModelLike, io_: GraphLike, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Valid random inputs for one graph (labels in range, d a trained step size, ...)."""
    L = cfg.seq_len
    out: dict[str, np.ndarray] = {}
    for spec in io_.inputs:
        shape, n = spec.shape, spec.name
        if n == "labels":
            a = rng.integers(0, cfg.num_classes, shape)
        elif n == "query":
            a = np.stack([np.sort(rng.permutation(L)[: shape[1]]) for _ in range(shape[0])])
        elif n == "n":  # tokens predicted at a step: 1..Q
            q = next(t.shape[1] for t in io_.inputs if t.name == "query")
            a = rng.integers(1, q + 1, shape)
        elif n == "pos":
            a = rng.integers(0, L, shape)
        elif n == "mask":
            a = (rng.random(shape) < 0.5).astype(np.float32)
        elif n == "known":  # an encoder variant: a mask with at most c known tokens and their positions
            a, out["mask"] = known_slots(L, shape, rng)
        elif n == "t":
            a = rng.random(shape) if cfg.head == "shortcut" else rng.integers(0, cfg.diffusion_steps, shape)
        elif n == "d":
            a = np.full(shape, 2.0 ** -int(rng.integers(0, cfg.shortcut_levels)))
        elif n == "cfg":
            a = np.full(shape, 1.0 + 3.0 * rng.random())
        elif n == "coef":
            _, coef = ddpm_sampling_schedule(cfg.diffusion_steps, 8)
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

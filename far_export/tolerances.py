"""How close is close enough: one tolerance scheme for every comparison the build and compile make.

Errors are measured relative to the reference's scale, max(1, max|reference|), so the same bound
holds on any x86-64 CPU (AVX2, AVX-512, MKL or MLAS) and on GPUs. numpy only: `far-export compile`
(no torch) checks TensorRT plans with the same scheme as the build checks graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Tolerance:
    """Bounds on |got - reference| / max(1, max|reference|): its max, 99th percentile and mean."""

    max_abs: float
    p99_abs: float
    mean_abs: float | None = None  # None: not bounded


# Per graph output against the fp32 torch module: kernels and summation order (fp32), plus rounding
# (fp16/bf16).
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, p99_abs=1e-4),
    "fp16": Tolerance(max_abs=5e-2, p99_abs=1e-2),
    "bf16": Tolerance(max_abs=1e-1, p99_abs=3e-2),
    # int8 (QDQ, weights per channel, activations calibrated): far-mnist's graphs on held-out real inputs,
    # relative to scale, max / p99: backbone z 0.060 / 0.029, head x_next 0.017 / 0.012,
    # VAE image 0.28 / 0.038
    "int8": Tolerance(max_abs=0.4, p99_abs=0.1),
}
# End to end against the fp32 reference sampler: decoded image in [0, 1].
E2E_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-3, p99_abs=1e-4),
    "fp16": Tolerance(max_abs=0.1, p99_abs=0.02),
    "bf16": Tolerance(max_abs=0.2, p99_abs=0.05),
    # int8: the loop samples a few tokens differently and a stroke moves in some images, so max and p99 are
    # bounded by how far samples drift, not by rounding; the mean is the stable measure. 16 images, seed 0:
    # far-mnist image max 0.55, p99 0.18, mean 0.010; far-mnist-causal (raster order: an early token moves
    # every later one) max 0.92, p99 0.35, mean 0.016. Bounds: the range, 1.7x and 2.5x the worst.
    # Quality of the int8 engines' samples (class accuracy, Frechet) is measured apart: README "INT8".
    "int8": Tolerance(max_abs=1.0, p99_abs=0.6, mean_abs=0.04),
}
# A TensorRT plan against its ONNX graph on ONNX Runtime (CPU; bf16 graphs upcast to fp32). TensorRT runs
# fp32 matmuls in TF32 on Ampere and later (10-bit mantissa), hence fp32's bound above the graph table's.
PLAN_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(max_abs=1e-2, p99_abs=2e-3),
    "fp16": Tolerance(max_abs=5e-2, p99_abs=1e-2),
    "bf16": Tolerance(max_abs=1e-1, p99_abs=3e-2),
    "int8": Tolerance(max_abs=1e-1, p99_abs=3e-2),
}


def error_stats(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """max, mean and p99 of |got - ref|, and the reference's scale max(1, max|ref|)."""
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.shape != ref.shape:
        raise ValueError(f"shape {got.shape} differs from the reference's {ref.shape}")
    err = np.abs(got - ref)
    if not np.all(np.isfinite(got)):
        return {"max": float("inf"), "mean": float("inf"), "p99": float("inf"), "scale": 1.0}
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    return {
        "max": float(err.max(initial=0.0)),
        "mean": float(err.mean()) if err.size else 0.0,
        "p99": float(np.percentile(err, 99)) if err.size else 0.0,
        "scale": scale,
    }


def within(stats: dict[str, float], tol: Tolerance) -> bool:
    s = stats["scale"]
    return (
        stats["max"] <= tol.max_abs * s
        and stats["p99"] <= tol.p99_abs * s
        and (tol.mean_abs is None or stats["mean"] <= tol.mean_abs * s)
    )


def describe_error(stats: dict[str, float], tol: Tolerance) -> str:
    mean = f", mean {tol.mean_abs:g}" if tol.mean_abs is not None else ""
    return (
        f"max abs error {stats['max']:.3g} (p99 {stats['p99']:.3g}, mean {stats['mean']:.3g}) > tolerance "
        f"{tol.max_abs:g} (p99 {tol.p99_abs:g}{mean}) x scale {stats['scale']:.3g}"
    )

"""How the tests compare floating-point results: the one place tolerances are chosen.

Two code paths that compute the same math in fp32 differ by rounding: other kernels
(MKL or oneDNN vs ONNX Runtime's MLAS, ATen's AVX-512 / AVX2 / scalar `default` code,
picked per CPU), other summation orders (batch size, chunking, thread count, fused
ops). That error scales with the magnitude of the numbers that went in, not with each
output element: a small element computed from large ones (the MAR head's
x0 = c0 * x - c1 * eps with c1 ~ 2e4) carries their absolute error. An element-wise
`rtol` on such a tensor passes on one CPU and fails on another. So every comparison
of two computations is made relative to the tensor's scale:

    max|got - ref| <= rel * max(1, max|ref|)

the measure of the build's own validation (far_export/validate.py, error_stats/check).

Tolerances (`rel`):
- `FP32` = 1e-5: the same fp32 math along two paths in PyTorch (batching, chunking, KV
  cache vs full recomputation, masked vs gathered attention). Measured <= 3e-7 x scale on
  AMD EPYC under ATEN_CPU_CAPABILITY=default / avx2 / avx512 (the first failure on an
  AVX-512 Xeon was 3.4e-3 on a scale of ~4e4, i.e. 1e-7 x scale).
- `GRAPH_FP32` = 1e-4: an fp32 ONNX graph in ONNX Runtime (MLAS, fused ops, any thread
  count) against the PyTorch module; far_export.tolerances.TOLERANCES["fp32"] gives p99 1e-4
  and max 1e-3 for checkpoints of any depth.
- Reduced precision (fp16/bf16) is bounded by its rounding, not by kernels:
  far_export.tolerances.TOLERANCES (per graph: fp16 5e-2, bf16 1e-1 x scale) and the looser
  per-test bounds where a test runs a whole fp16 module (`FP16_MODULE` = 5e-2 x scale).
- End-to-end images: float images in [0, 1] against the fp32 reference sampler,
  far_export.tolerances.E2E_TOLERANCES (fp32 1e-3, fp16 0.1, bf16 0.2 max abs); uint8 images
  of two fp32 paths may differ by a rounding level where a value sits on x.5 (<= 1, or
  <= 2 where the loop itself differs: ORT vs PyTorch).

Exact equality stays where exactness is the contract, with a comment saying so: the
random streams (PCG64 draws, orders, positions), integer outputs, weights and files
written and read back, and the same computation run twice in one process on one
machine (determinism).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FP32 = 1e-5
GRAPH_FP32 = 1e-4
FP16_MODULE = 5e-2


def _array(x: Any) -> np.ndarray:
    if hasattr(
        x, "detach"
    ):  # a torch tensor (this module does not import torch: the runtime's tests run without)
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def scale_error(got: Any, ref: Any) -> tuple[float, float, tuple[int, ...]]:
    """(max|got - ref|, max(1, max|ref|), index of the largest error)."""
    g, r = _array(got), _array(ref)
    assert g.shape == r.shape, f"shape {g.shape} differs from the reference's {r.shape}"
    if not np.isfinite(g).all():
        return float("inf"), 1.0, tuple(int(i) for i in np.argwhere(~np.isfinite(g))[0])
    err = np.abs(g - r)
    where = tuple(int(i) for i in np.unravel_index(int(err.argmax()), err.shape)) if err.size else ()
    return float(err.max(initial=0.0)), max(1.0, float(np.abs(r).max(initial=0.0))), where


def assert_close_to_scale(got: Any, ref: Any, rel: float = FP32, what: str = "result") -> None:
    """max|got - ref| <= rel * max(1, max|ref|); the message gives the error, the scale and where."""
    err, scale, where = scale_error(got, ref)
    assert err <= rel * scale, (
        f"{what}: max abs error {err:.3g} at {list(where)} (got {_array(got)[where]:.6g}, "
        f"ref {_array(ref)[where]:.6g}) > {rel:g} x scale {scale:.3g}"
    )

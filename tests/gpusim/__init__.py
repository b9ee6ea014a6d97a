"""A simulator of the GPU stack for CPU CI: `cuda.bindings.runtime` (cuda.py) and `tensorrt` (trt.py).

    sim, trt = gpusim.install(monkeypatch, release="10.3")   # then runtime/trt.py and far_export/tensorrt.py
                                                              # import the simulated modules

Test doubles that enforce the documented rules of the real APIs (each rule cites its source where it is
enforced), never shaped to the code under test. What they cannot see: README, "GPU simulator".
"""

from __future__ import annotations

import sys
import types
from typing import Any

from .cuda import DeviceProps, SimCuda
from .trt import VERSIONS, make_tensorrt

__all__ = ["DeviceProps", "SimCuda", "VERSIONS", "install"]


def install(
    monkeypatch: Any, release: str | None = "10.3", props: DeviceProps | None = None
) -> tuple[SimCuda, Any]:
    """Put a simulated GPU (and TensorRT `release`, or none) where `import tensorrt` and
    `from cuda.bindings import runtime` find them, for the duration of the test."""
    sim = SimCuda(props)
    rt = sim.module()
    try:
        import cuda.bindings as bindings
    except ImportError:  # no cuda-python: packages of our own (the real enum types are then missing too)
        cuda_pkg = types.ModuleType("cuda")
        bindings = types.ModuleType("cuda.bindings")
        cuda_pkg.bindings = bindings
        monkeypatch.setitem(sys.modules, "cuda", cuda_pkg)
        monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", rt)
    monkeypatch.setattr(bindings, "runtime", rt, raising=False)
    trt = make_tensorrt(sim, release) if release else None
    monkeypatch.setitem(sys.modules, "tensorrt", trt)  # None: `import tensorrt` raises ImportError
    return sim, trt

"""`far-export budget`: what an engine directory costs per image, and the fastest any device could run it.

    budget = engine_budget("engines/far-mnist")          # the manifest's sampling defaults
    print(format_budget(budget))

Per graph, counted from the ONNX graphs' static shapes: weight bytes, intermediate-tensor bytes, input and
output bytes, and FLOPs per call (MatMul, Gemm and Conv at 2 FLOPs per multiply-add: nearly all of FAR's
work; elementwise ops, norms and softmax are left out, so the count is a slight under-estimate); calls
per image from the runtime's own schedule. Per device (far_export/devices.py: published peak throughput
per precision and memory bandwidth, each with its source), two lower bounds on the time per image:

- compute: each graph's FLOPs at the device's dense tensor peak for the precision the graph runs at;
- memory: each call reads its graph's weights and its inputs and writes its outputs at least once (the
  intermediate tensors may stay on chip in a fused engine, so they are left out of the bound).

A real engine is slower than the larger of the two: the bounds say which one limits it and how far a
faster implementation could go. "Fits" compares the directory's weights (a weights file shared by the
backbone graphs counted once) plus the largest graph's intermediate tensors with the device's memory
(on a Jetson the CPU, the operating system and the application share it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import shape_inference

from far_export.devices import DEVICES, Device
from runtime.files import directory
from runtime.manifest import graph_path, load_manifest
from runtime.pipeline import steps_per_batch
from runtime.schedule import SamplingSettings


def _bytes(dtype: int, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(dtype).itemsize


@dataclass(frozen=True)
class GraphCost:
    """One call of one graph."""

    name: str
    precision: str
    flops: int
    weight_bytes: int
    activation_bytes: int  # every intermediate tensor, each counted once (an upper bound on what is live)
    io_bytes: int  # graph inputs and outputs
    calls_per_image: float


def graph_cost(
    path: str | Path, name: str = "", precision: str = "", calls_per_image: float = 0.0
) -> tuple[GraphCost, dict[tuple[str, int], int]]:
    """The cost of one call of the graph at `path`, and its weights keyed by where they are stored
    ((external file, offset), or (graph file, index) when inline): a shared weights file counts once."""
    model = onnx.load(str(path), load_external_data=False)
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    g = inferred.graph
    types: dict[str, tuple[int, tuple[int, ...]]] = {}
    for vi in [*g.value_info, *g.input, *g.output]:
        t = vi.type.tensor_type
        if all(d.HasField("dim_value") for d in t.shape.dim):
            types[vi.name] = (t.elem_type, tuple(d.dim_value for d in t.shape.dim))
    here = Path(path).resolve()
    weights: dict[tuple[str, int], int] = {}
    for i, init in enumerate(g.initializer):
        types[init.name] = (init.data_type, tuple(init.dims))
        where = {e.key: e.value for e in init.external_data}
        if "location" in where:
            key = (str(here.parent / where["location"]), int(where.get("offset", 0)))
        else:
            key = (str(here), i)
        weights[key] = _bytes(init.data_type, tuple(init.dims))
    io = {v.name for v in [*g.input, *g.output]}
    inits = {i.name for i in g.initializer}
    for node in g.node:  # constants are weights too
        if node.op_type == "Constant" and node.output[0] in types:
            weights[(str(here), -len(weights) - 1)] = _bytes(*types[node.output[0]])
            inits.add(node.output[0])
    activations = sum(_bytes(*types[v.name]) for v in g.value_info if v.name in types and v.name not in inits)
    cost = GraphCost(
        name=name or Path(path).stem,
        precision=precision,
        flops=_flops(g.node, {k: s for k, (_, s) in types.items()}),
        weight_bytes=sum(weights.values()),
        activation_bytes=activations,
        io_bytes=sum(_bytes(*types[n]) for n in io if n in types),
        calls_per_image=calls_per_image,
    )
    return cost, weights


def _flops(nodes: Any, shapes: dict[str, tuple[int, ...]]) -> int:
    """MatMul, Gemm and Conv (2 FLOPs per multiply-add; Loop/If bodies are not descended into)."""
    total = 0
    for node in nodes:
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            if a is None:
                continue
            k = a[-1]
            if node.op_type == "Gemm" and any(at.name == "transA" and at.i for at in node.attribute):
                k = a[0]
            total += 2 * int(np.prod(out, dtype=np.int64)) * k
        elif node.op_type == "Conv":
            w = shapes.get(node.input[1])
            if w is not None:  # out (B, Cout, H, W); weight (Cout, Cin / groups, kh, kw)
                total += 2 * int(np.prod(out, dtype=np.int64)) * int(np.prod(w[1:], dtype=np.int64))
    return total


def graph_flops(path: str | Path) -> int:
    """FLOPs of one call of the graph at `path`."""
    return graph_cost(path)[0].flops


@dataclass(frozen=True)
class DeviceBound:
    device: Device
    compute_s: float  # per image
    memory_s: float
    fits: bool
    memory_share: float  # the engines' bytes over the device's memory

    @property
    def bound_s(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def limit(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class Budget:
    directory: str
    precision: str
    batch: int
    settings: SamplingSettings
    graphs: tuple[GraphCost, ...]  # the graphs the loop calls with these settings, then the others
    weight_bytes: int  # the directory's, shared weights once
    peak_activation_bytes: int
    devices: tuple[DeviceBound, ...]

    @property
    def flops_per_image(self) -> float:
        return sum(g.flops * g.calls_per_image for g in self.graphs)

    @property
    def traffic_per_image(self) -> float:
        return sum((g.weight_bytes + g.io_bytes) * g.calls_per_image for g in self.graphs)

    @property
    def memory_bytes(self) -> int:
        return self.weight_bytes + self.peak_activation_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "precision": self.precision,
            "batch": self.batch,
            "settings": asdict(self.settings),
            "graphs": [asdict(g) for g in self.graphs],
            "weight_bytes": self.weight_bytes,
            "peak_activation_bytes": self.peak_activation_bytes,
            "flops_per_image": self.flops_per_image,
            "traffic_bytes_per_image": self.traffic_per_image,
            "devices": [
                {
                    "name": b.device.name,
                    "compute_bound_ms": b.compute_s * 1e3,
                    "memory_bound_ms": b.memory_s * 1e3,
                    "limit": b.limit,
                    "fits": b.fits,
                    "memory_share": b.memory_share,
                }
                for b in self.devices
            ],
        }


def engine_budget(
    engine_dir: str | Path,
    head_steps: int | None = None,
    num_iter: int | None = None,
    devices: tuple[Device, ...] = DEVICES,
) -> Budget:
    """The budget of `engine_dir` under the manifest's sampling defaults, or the given K / num_iter."""
    d = directory(engine_dir, "engine directory", fix="give a directory made by far-export build")
    m = load_manifest(d, verify=False)
    s = SamplingSettings.resolve(m.model, head_steps=head_steps, num_iter=num_iter)
    calls = steps_per_batch(m, s.num_iter, s.head_steps)
    costs, weights = [], {}
    for name, spec in sorted(m.graphs.items(), key=lambda kv: (calls.get(kv[0], 0) == 0, kv[0])):
        cost, w = graph_cost(graph_path(d, spec.file, name), name, spec.precision, calls[name] / m.batch)
        costs.append(cost)
        weights.update(w)
    weight_bytes = sum(weights.values())
    peak = max(c.activation_bytes + c.io_bytes for c in costs)
    b = Budget(str(d), m.precision, m.batch, s, tuple(costs), weight_bytes, peak, ())
    bounds = []
    for dev in devices:
        compute = sum(c.flops * c.calls_per_image / dev.peak(c.precision) for c in costs)
        share = b.memory_bytes / dev.memory
        bounds.append(DeviceBound(dev, compute, b.traffic_per_image / dev.bandwidth, share < 1.0, share))
    return dataclasses.replace(b, devices=tuple(bounds))


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


def format_budget(b: Budget) -> str:
    s = b.settings
    lines = [
        f"{b.directory}: {b.precision}, batch {b.batch}, num_iter {s.num_iter}, head steps {s.head_steps}",
        "",
        f"{'graph':<14}{'precision':<11}{'weights':>11}{'activations':>13}{'I/O':>11}"
        f"{'MFLOP/call':>12}{'calls/image':>13}",
    ]
    for g in b.graphs:
        lines.append(
            f"{g.name:<14}{g.precision:<11}{_mb(g.weight_bytes):>11}{_mb(g.activation_bytes):>13}"
            f"{_mb(g.io_bytes):>11}{g.flops / 1e6:>12.2f}{g.calls_per_image:>13.3g}"
        )
    lines += [
        "",
        f"per image: {b.flops_per_image / 1e9:.3f} GFLOP, {_mb(b.traffic_per_image)} read and written at "
        f"least (weights once per call, shared by the batch of {b.batch})",
        f"memory: {_mb(b.weight_bytes)} of weights (shared ones once) + {_mb(b.peak_activation_bytes)} for "
        f"the "
        f"largest graph's tensors",
        "",
        f"{'device':<26}{'memory':>9}{'engines use':>13}{'compute bound':>15}{'memory bound':>14}"
        "  bound per image",
    ]
    for d in b.devices:
        use = f"{d.memory_share:.1%}" if d.fits else f"{d.memory_share:.1f}x: no fit"
        lines.append(
            f"{d.device.name:<26}{d.device.memory / 1e9:>6.1f} GB{use:>13}{_time(d.compute_s):>15}"
            f"{_time(d.memory_s):>14}  {_time(d.bound_s)} ({d.limit}; {1 / d.bound_s:,.0f} images/s at most)"
        )
    lines.append("")
    lines.append("Lower bounds from published peaks (far_export/devices.py names each source): real engines")
    lines[-1] += " are slower."
    return "\n".join(lines)

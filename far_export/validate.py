"""Validation: every graph against PyTorch (ONNX Runtime on CPU), then the whole sampling loop.

1. Per graph (`check_graph`, on a far_export/graphs.py record), on fixed random inputs and on real inputs
   (recorded while the graphs sample with the checkpoint's weights): max, mean and p99 absolute error of
   each output against the fp32 PyTorch module (what the checkpoint means; for fp16/bf16 graphs the
   tolerance bounds export error plus rounding). Errors are measured relative to the output's scale,
   max(1, max|reference|), and must stay within the graph's tolerance; otherwise `ValidationError` names
   the graph, the output and the numbers.
2. End to end: the lean runtime's own loop (`runtime.pipeline.Pipeline`) over the build's ONNX Runtime
   sessions (`SessionBackend`) against the PyTorch reference sampler (`training.sample.sample_tokens`,
   fp32) for one seed: tokens and image. The inputs the loop feeds each graph are recorded on the way
   (far_export/feeds.py: run_loop) and serve as the "real inputs" of step 1 (see far_export/build.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from far_export.export import to_torch
from far_export.feeds import Feed, example_inputs, upcast_bf16
from far_export.graphs import BuildGraph
from far_export.tolerances import Tolerance, describe_error, error_stats, within
from runtime.backends import Backend
from runtime.errors import FarError, first_line
from runtime.manifest import GraphSpec, Manifest, ModelInfo, TensorSpec
from runtime.ort import OrtGraph


class ValidationError(FarError, RuntimeError):
    """A graph (or the whole loop) differs from PyTorch by more than the precision's tolerance."""


Runner = Callable[[Feed], Feed]


# ----------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------


def check(stats: dict[str, float], tol: Tolerance, what: str) -> None:
    if not within(stats, tol):
        raise ValidationError(f"{what} differs from PyTorch: {describe_error(stats, tol)}")


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
        raise ValidationError(f"ONNX Runtime cannot load {name}: {first_line(e)}") from None


BF16_NOTE = (
    "ONNX Runtime on CPU has no bf16 kernels for this graph: validated with its bf16 weights and casts "
    "upcast to fp32 (same graph, activations in fp32)"
)


def cpu_session(path: Path, precision: str) -> tuple[Any, str | None]:
    """An ORT session for the graph at `path`, and a note on how it is validated when not as it is: a bf16
    graph that ONNX Runtime on CPU cannot run is upcast to fp32 (far_export/feeds.py: upcast_bf16)."""
    try:
        return ort_session(path), None
    except ValidationError:
        if precision != "bf16":
            raise
    return ort_session(upcast_bf16(path), name=f"{path.name} (upcast to fp32)"), BF16_NOTE


def ort_runner(session: Any, spec: GraphSpec) -> Runner:
    names = [s.name for s in spec.outputs]

    def run(feeds: Feed) -> Feed:
        return dict(zip(names, session.run(names, {s.name: feeds[s.name] for s in spec.inputs})))

    return run


def torch_runner(module: nn.Module, spec: GraphSpec) -> Runner:
    """The torch module as a graph runner; float inputs are cast to the module's dtype (an fp32 reference
    of an fp16 graph takes the fp16 KV cache as fp32)."""
    names = [s.name for s in spec.outputs]
    dtype = next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)

    def arg(a: np.ndarray, spec_dtype: str) -> torch.Tensor:
        t = to_torch(a, spec_dtype)
        return t.to(dtype) if t.is_floating_point() and spec_dtype != "float32" else t

    @torch.no_grad()
    def run(feeds: Feed) -> Feed:
        out = module(*(arg(feeds[s.name], s.dtype) for s in spec.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {n: o.float().numpy() for n, o in zip(names, out)}

    return run


def compare(
    name: str,
    spec: GraphSpec,
    graph: Runner,
    reference: Runner,
    feeds: list[Feed],
    tol: Tolerance,
    label: str,
) -> dict[str, dict[str, float]]:
    """Worst error over `feeds` per output; raises ValidationError on the first output out of tolerance."""
    worst: dict[str, dict[str, float]] = {}
    for feed in feeds:
        got, ref = graph(feed), reference(feed)
        for out in spec.outputs:
            try:
                st = error_stats(got[out.name], ref[out.name])
            except ValueError as e:  # shapes that differ
                raise ValidationError(f"{name} graph, output {out.name!r} ({label} inputs): {e}") from None
            check(st, tol, f"{name} graph, output {out.name!r} ({label} inputs)")
            w = worst.setdefault(out.name, st)
            if st["max"] > w["max"]:
                worst[out.name] = st
    return worst


def check_graph(
    graph: BuildGraph, session: Any, feeds: list[Feed], label: str
) -> dict[str, dict[str, float]]:
    """A graph's rule: its session against its fp32 reference module on `feeds`, within its tolerance; the
    worst error per output, or ValidationError."""
    spec = graph.spec
    return compare(
        graph.name,
        spec,
        ort_runner(session, spec),
        torch_runner(graph.reference, spec),
        feeds,
        graph.tolerance,
        label,
    )


def random_feeds(model: ModelInfo, spec: GraphSpec, count: int = 2, seed: int = 1234) -> list[Feed]:
    """`count` valid random inputs of the graph, the same for the same seed."""
    rng = np.random.Generator(np.random.PCG64(seed))
    return [example_inputs(model, spec, rng) for _ in range(count)]


# ----------------------------------------------------------------------------
# The build's sessions as a runtime backend
# ----------------------------------------------------------------------------


class SessionBackend(Backend):
    """The build's own ONNX Runtime sessions as a runtime backend, so that the end-to-end check runs
    the runtime's loop (`runtime.pipeline.Pipeline`) over exactly the sessions validated per graph."""

    name = "ort"

    def __init__(self, directory: Path, manifest: Manifest, sessions: dict[str, Any]):
        import onnxruntime as ort

        self._ort, self.directory, self.manifest, self._sessions = ort, directory, manifest, sessions
        self._graphs: dict[str, OrtGraph] = {}

    def graph(self, name: str) -> OrtGraph:
        if name not in self._graphs:
            spec = self.manifest.graphs[name]
            self._graphs[name] = OrtGraph(self._ort, self._sessions[name], spec, self.directory / spec.file)
        return self._graphs[name]

    def describe(self) -> str:
        return f"onnxruntime {self._ort.__version__} (the build's sessions)"


def as_run_on_cpu(manifest: Manifest, upcast: set[str]) -> Manifest:
    """The manifest as the CPU validation runs it: the graphs in `upcast` (bf16 graphs upcast to fp32,
    see far_export/feeds.py) take and return float32 where the graph itself has bfloat16."""

    def f32(t: TensorSpec) -> TensorSpec:
        return TensorSpec(t.name, t.shape, "float32") if t.dtype == "bfloat16" else t

    graphs = {
        name: dataclasses.replace(g, inputs=tuple(map(f32, g.inputs)), outputs=tuple(map(f32, g.outputs)))
        if name in upcast
        else g
        for name, g in manifest.graphs.items()
    }
    return manifest.replace(graphs=graphs)

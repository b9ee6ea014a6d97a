"""PyTorch -> static ONNX: one graph's torch module exported with the static shapes of its contract.

What each graph is (its I/O, module, precision, tolerance) is described in far_export/graphs.py; this
module only exports and checks that the file has exactly the contract's inputs and outputs.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), opset 18. It traces with
`torch.export` (no Python-bool capture of tensors), gives fully static shapes when no `dynamic_shapes` are
passed, and matches PyTorch to ~1e-6 on every graph; the legacy TorchScript exporter is deprecated and
warns on every call.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from runtime.errors import FarError, first_line
from runtime.manifest import GraphSpec

OPSET = 18

EXTERNAL_DATA_BYTES = 1_800_000_000  # above this a graph's weights go to `<file>.data` (protobuf's 2 GB)


class ExportError(FarError, RuntimeError):
    """A graph could not be exported (unsupported op, bad options)."""


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    """A graph input as the torch tensor its module takes (bf16 values as bfloat16)."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(torch.bfloat16) if dtype == "bfloat16" else t


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines and warnings; a build prints its own stage lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_graph(module: nn.Module, spec: GraphSpec, path: str | Path, inputs: dict[str, np.ndarray]) -> Path:
    """Export `module` with the static shapes of `spec` to `path` (one file while under 2 GB)."""
    path = Path(path)
    args = tuple(to_torch(inputs[s.name], s.dtype) for s in spec.inputs)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                input_names=[s.name for s in spec.inputs],
                output_names=[s.name for s in spec.outputs],
            )
            program.save(str(path), external_data=nbytes > EXTERNAL_DATA_BYTES)
    except Exception as e:  # the exporter raises many types; name the graph and the first line
        raise ExportError(f"exporting {spec.file} failed: {type(e).__name__}: {first_line(e)}") from e
    _check_io(path, spec)
    return path


def _check_io(path: Path, spec: GraphSpec) -> None:
    """The exported graph must have exactly the contract's names, static shapes and dtypes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            out.append((v.name, dims, _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))))
        return out

    want_in = [(s.name, s.shape, s.dtype) for s in spec.inputs]
    want_out = [(s.name, s.shape, s.dtype) for s in spec.outputs]
    for kind, got, want in (
        ("inputs", describe(model.graph.input), want_in),
        ("outputs", describe(model.graph.output), want_out),
    ):
        if got != want:
            raise ExportError(f"{spec.file}: the graph's {kind} are {got}, the contract says {want}")


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}

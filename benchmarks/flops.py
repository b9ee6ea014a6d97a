"""Count the multiply-add FLOPs of an ONNX graph from its static shapes.

Counts MatMul / Gemm / Conv (2 FLOPs per multiply-add), which is where all but a
sliver of FAR's work lies; elementwise ops, norms and softmax are left out, so the
count is a slight under-estimate, and the achieved fraction computed from it a
conservative figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import shape_inference


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def graph_flops(path: str | Path) -> int:
    """FLOPs of one run of the graph (MatMul, Gemm and Conv; Loop/If bodies not descended into)."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = _shapes(model)
    total = 0
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm"):
            a = shapes.get(node.input[0])
            out = shapes.get(node.output[0])
            if a is None or out is None:
                continue
            k = a[-1]
            if node.op_type == "Gemm":
                trans_a = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[0] if trans_a else a[-1]
            total += 2 * int(np.prod(out)) * k
        elif node.op_type == "Conv":
            w, out = shapes.get(node.input[1]), shapes.get(node.output[0])
            if w is None or out is None:
                continue
            # out (B, Cout, H, W); weight (Cout, Cin/groups, kh, kw)
            total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))
    return total

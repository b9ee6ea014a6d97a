"""One copy of the backbone's weights for the backbone graph and its encoder variants.

Every encoder variant `backbone_k{c}` is the backbone's module exported with one more input, so its
weights are the backbone's. After export, `share_weights` moves every large initializer of those graphs
into one file, `backbone.weights` (ONNX external data), writing each distinct tensor once (keyed by dtype,
shape and content, so only equal tensors are shared) and pointing every graph at it. The `.onnx` files
keep only the graph and small constants; the manifest records the weights file's sha256
(runtime/manifest.py `shared_weights`), and the ONNX Runtime backend hands the sessions one in-memory copy
(runtime/shared_weights.py).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from runtime.files import write_atomic
from runtime.manifest import SHARED_WEIGHTS_FILE

MIN_SHARED_BYTES = 1024  # smaller initializers stay inside their graph
ALIGN = 64  # each tensor starts on a 64-byte boundary of the weights file


def _raw(init) -> bytes:
    from onnx import numpy_helper

    if init.HasField("raw_data"):
        return init.raw_data
    return np.ascontiguousarray(numpy_helper.to_array(init)).tobytes()  # little-endian on x86-64 / aarch64


def share_weights(
    directory: Path, files: dict[str, str], weights_file: str = SHARED_WEIGHTS_FILE
) -> tuple[int, dict[str, dict[str, tuple[int, int, str, tuple[int, ...]]]]]:
    """Rewrite the graphs `files` (name -> file) of `directory` to read their large initializers from one
    shared `weights_file`. Returns its size in bytes and, per graph, initializer name -> (offset, length,
    numpy dtype, shape): what the runtime maps without the onnx package. Files are replaced atomically."""
    import onnx
    from onnx import helper
    from onnx.external_data_helper import set_external_data

    directory = Path(directory)
    models = {name: onnx.load(str(directory / f)) for name, f in files.items()}
    index: dict[str, dict[str, tuple[int, int, str, tuple[int, ...]]]] = {}
    chunks: list[bytes] = []
    where: dict[tuple[int, tuple[int, ...], bytes], tuple[int, int]] = {}
    size = 0
    for name, model in models.items():
        index[name] = {}
        for init in model.graph.initializer:
            raw = _raw(init)
            if len(raw) < MIN_SHARED_BYTES:
                continue
            key = (init.data_type, tuple(init.dims), hashlib.sha256(raw).digest())
            if key not in where:
                pad = -size % ALIGN
                chunks.append(b"\0" * pad)
                size += pad
                where[key] = (size, len(raw))
                chunks.append(raw)
                size += len(raw)
            offset, length = where[key]
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)).name
            index[name][init.name] = (offset, length, dtype, tuple(init.dims))
            for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                init.ClearField(f)
            init.raw_data = b"\0"  # set_external_data asks for a raw_data field; the data goes next
            set_external_data(init, location=weights_file, offset=offset, length=length)
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
    write_atomic(directory / weights_file, b"".join(chunks))
    for name, model in models.items():
        f = files[name]
        write_atomic(directory / f, model.SerializeToString())
        stale = directory / f"{f}.data"  # the exporter's own external data (graphs over 1.8 GB)
        if stale.exists():
            os.remove(stale)
    return size, index

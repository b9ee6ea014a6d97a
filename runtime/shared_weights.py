"""One in-memory copy of the backbone's weights for every ONNX Runtime session that reads them.

The backbone graph and its encoder variants reference one weights file (manifest `shared_weights`,
far_export/shared_weights.py). Opened one by one, each session would read its own copy of it; here the
file is read once, every tensor of it becomes one OrtValue over that buffer (no copy on the CPU), and
each session is given those OrtValues in place of its initializers (`SessionOptions.add_initializer`, which
uses the caller's buffer; `add_external_initializers` would copy it). ONNX Runtime's CPU MatMul would still
pack a private copy of every weight matrix per session (prepacking), so sessions that share weights run
with prepacking off (`session.disable_prepacking`). numpy and onnxruntime only.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from runtime.manifest import REBUILD, ManifestError, SharedWeights

ONNX_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16; numpy has no bfloat16, its bits live in uint16


class SharedInitializers:
    def __init__(self, ort: Any, directory: Path, spec: SharedWeights):
        self._ort, self.spec = ort, spec
        self._buffer: np.ndarray | None = None
        self._path = Path(directory) / spec.file
        self._values: dict[tuple[int, int, str, tuple[int, ...]], Any] = {}

    def covers(self, graph: str) -> bool:
        return graph in self.spec.graphs

    def _value(self, entry: tuple[int, int, str, tuple[int, ...]]) -> Any:
        if entry not in self._values:
            if self._buffer is None:
                self._buffer = np.fromfile(self._path, dtype=np.uint8)
            offset, length, dtype, shape = entry
            host = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
            if offset + length > self._buffer.nbytes or length != math.prod(shape) * host.itemsize:
                raise ManifestError(
                    f"manifest shared_weights: a {dtype}{list(shape)} tensor at {offset}+{length} is not in "
                    f"{self._path} ({self._buffer.nbytes} bytes); {REBUILD}"
                )
            a = self._buffer[offset : offset + length].view(host).reshape(shape)
            self._values[entry] = (
                self._ort.OrtValue.ortvalue_from_numpy_with_onnx_type(a, ONNX_BFLOAT16)
                if dtype == "bfloat16"
                else self._ort.OrtValue.ortvalue_from_numpy(a)
            )
        return self._values[entry]

    def add_to(self, opts: Any, graph: str) -> None:
        """Give the session options of `graph` the shared OrtValues for its initializers."""
        for name, entry in self.spec.tensors[graph].items():
            opts.add_initializer(name, self._value(entry))
        opts.add_session_config_entry("session.disable_prepacking", "1")

"""The Triton Inference Server Python-backend model: the runtime's `Pipeline` behind dynamic batching.

`far-export serve` writes a model repository whose `model.py` is

    from runtime.triton_model import TritonPythonModel

A request carries `class` (INT64, shape [n, 1]), `seed` (INT64 [n, 1]) and optionally `index`
(INT64 [n, 1]; default 0..n-1), so row r is image index[r] of `far-export sample --seed seed[r]`.
Triton joins requests into batches of at most the engine batch; every row draws from its own
(seed, index) (`Pipeline.generate_rows`), so batching changes nothing but speed. Responses: `image`
(UINT8 [n, H, W, 3]) and, when the optional input `png` (BOOL [n, 1]) is true, `png` (UINT8 [n, M]:
PNG files, zero-padded). The sampling settings are fixed per served model by the `parameters` of
config.pbtxt (a batch runs one plan). A bad request gets an error response naming the problem; the
others in its batch are still served. A cancelled request (over gRPC, the client cancels the call or its
deadline passes; Triton's HTTP endpoint does not cancel on disconnect) stops being worked on at the next
AR step once every request of its batch is cancelled; the server log then says "far: cancelled, batch
stopped after AR step k of n".

numpy only: never imports torch, training or far_export. `triton_python_backend_utils` exists only
inside Triton's Python backend stub.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import FarError, first_line


class _Cancelled(Exception):
    pass


def _row_input(pb_utils: Any, request: Any, name: str) -> np.ndarray | None:
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        return None
    a = np.from_dlpack(t)  # not as_numpy(): see png_rows
    if a.dtype != np.int64:
        raise FarError(f"input {name!r} must be INT64, got {a.dtype}")
    if a.ndim != 2 or a.shape[1] != 1:
        raise FarError(f"input {name!r} must have shape [n, 1], got {list(a.shape)}")
    return a[:, 0]


def parse_request(pb_utils: Any, request: Any, num_classes: int) -> tuple[list[int], list[int], list[int]]:
    """(classes, seeds, indices) of one request, or a FarError naming what is wrong."""
    classes = _row_input(pb_utils, request, "class")
    seeds = _row_input(pb_utils, request, "seed")
    if classes is None or seeds is None:
        raise FarError("a request needs the inputs 'class' and 'seed' (INT64, shape [n, 1])")
    n = len(classes)
    indices = _row_input(pb_utils, request, "index")
    if indices is None:
        indices = np.arange(n, dtype=np.int64)
    if len(seeds) != n or len(indices) != n:
        raise FarError(f"'class' has {n} rows but 'seed' {len(seeds)} and 'index' {len(indices)}")
    bad = [int(c) for c in classes if not 0 <= c < num_classes]
    if bad:
        raise FarError(f"class {bad[0]} is out of range: this model has classes 0..{num_classes - 1}")
    for name, a in (("seed", seeds), ("index", indices)):
        if (a < 0).any():
            raise FarError(f"{name} {int(a[a < 0][0])} is negative: give an integer >= 0")
    return [int(c) for c in classes], [int(s) for s in seeds], [int(i) for i in indices]


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def png_rows(images: np.ndarray) -> np.ndarray:
    """(n, H, W, 3) uint8 -> (n, M) uint8: row r is the PNG file of image r, zero-padded to the longest
    (a PNG reader stops at its IEND chunk). Not BYTES: the stub of nvidia-pytriton 0.7.0 is built for
    numpy 1 and, under numpy 2, gives numpy-made tensors a wrong size and reads a tensor of several rows
    as copies of its first (`as_numpy`); tensors therefore cross as DLPack, which has no BYTES."""
    files = [png_bytes(im) for im in images]
    out = np.zeros((len(files), max(len(f) for f in files)), np.uint8)
    for r, f in enumerate(files):
        out[r, : len(f)] = np.frombuffer(f, np.uint8)
    return out


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        import triton_python_backend_utils as pb_utils

        from runtime.pipeline import Pipeline

        self.pb = pb_utils
        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine = Path(p["engine_dir"])
        if not engine.is_absolute():
            engine = Path(args["model_repository"]) / args["model_version"] / engine
        threads = int(p["threads"]) if p.get("threads") else None
        self.pipe = Pipeline.load(
            engine, backend=p.get("backend", "ort"), providers=p.get("providers") or None, threads=threads
        )
        settings = json.loads(p.get("settings", "{}"))
        self.settings = self.pipe.settings(**settings)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = self.pb
        responses: list[Any] = [None] * len(requests)
        rows: list[tuple[int, int, int, int]] = []  # (request, class, seed, index)
        for r, request in enumerate(requests):
            try:
                classes, seeds, indices = parse_request(pb, request, self.pipe.model.num_classes)
            except FarError as e:
                responses[r] = pb.InferenceResponse(
                    error=pb.TritonError(first_line(e), pb.TritonError.INVALID_ARG)
                )
                continue
            rows += [(r, c, s, i) for c, s, i in zip(classes, seeds, indices)]
        images: dict[int, list[np.ndarray]] = {}
        B = self.pipe.B
        for first in range(0, len(rows), B):
            chunk = rows[first : first + B]
            owners = {r for r, *_ in chunk}

            def stop_when_cancelled(done: int, total: int, owners: set[int] = owners) -> None:
                if all(requests[r].is_cancelled() for r in owners):
                    raise _Cancelled(done, total)

            try:
                stop_when_cancelled(0, 0)  # rows of requests cancelled in an earlier chunk or in the queue
                out = self.pipe.generate_rows(
                    [c for _, c, _, _ in chunk],
                    [s for _, _, s, _ in chunk],
                    [i for _, _, _, i in chunk],
                    self.settings,
                    progress=stop_when_cancelled,
                )
            except _Cancelled as stopped:
                done, total = stopped.args
                if total:  # the server log says how far a cancelled batch ran
                    pb.Logger.log_info(f"far: cancelled, batch stopped after AR step {done} of {total}")
                for r in owners:
                    responses[r] = pb.InferenceResponse(
                        error=pb.TritonError("cancelled", pb.TritonError.CANCELLED)
                    )
                continue
            for (r, *_), image in zip(chunk, out):
                images.setdefault(r, []).append(image)
        for r, request in enumerate(requests):
            if responses[r] is not None:
                continue
            if request.is_cancelled():
                responses[r] = pb.InferenceResponse(
                    error=pb.TritonError("cancelled", pb.TritonError.CANCELLED)
                )
                continue
            batch = np.ascontiguousarray(np.stack(images[r]))
            tensors = [pb.Tensor.from_dlpack("image", batch)]
            want_png = pb.get_input_tensor_by_name(request, "png")
            if want_png is not None and np.from_dlpack(want_png).any():
                tensors.append(pb.Tensor.from_dlpack("png", png_rows(batch)))
            responses[r] = pb.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.pipe.close()

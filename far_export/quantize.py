"""INT8: QDQ graphs from the fp32 graphs, calibrated on real inputs.

Tool: ONNX Runtime's static quantizer (`onnxruntime.quantization.quantize_static`, QuantFormat.QDQ). It
writes explicit QuantizeLinear/DequantizeLinear pairs, the form TensorRT builds INT8 layers from and that
ONNX Runtime on CPU fuses into int8 kernels (QLinearMatMul, QGemm, QLinearConv); it takes an explicit node
list, per-channel weights and a calibration data reader, so nothing of the calibration math is written
here. NVIDIA ModelOpt needs CUDA for most of its ONNX path; it is not used.

What is quantized (`weight_nodes`): only the nodes that multiply by a weight, MatMul with a constant B,
Gemm and Conv, weights int8 per output channel (symmetric), activations uint8 (asymmetric: the u8 x s8
kernels are ONNX Runtime's fastest on x86). For MatMul and Gemm only the inputs carry Q/DQ, the outputs stay
fp32 (`OpTypesToExcludeOutputQuantization`, the placement NVIDIA recommends for TensorRT): a quantized output
costs a Quantize + Dequantize pass per product, and the Dequantize duplicated per consumer splits the GELU
that ONNX Runtime otherwise fuses. A Conv's output is quantized: ONNX Runtime has int8 products with an fp32
output for MatMul and Gemm (MatMulIntegerToFloat, QGemm) but not for Conv, which fuses into QLinearConv only
as DQ -> Conv -> Q; without the Q every convolution runs fp32 on dequantized weights. Everything else stays
fp32 between the pairs, which keeps the islands of the fp16 builds in higher precision and more:
LayerNorm/GroupNorm statistics, attention (QK^T, mask bias, softmax, AV: activation x activation products
are not weight nodes), GELU/SiLU, residual adds, the shortcut head's timestep embedding (`KEEP_FP32`), and
the MAR head entirely (its posterior needs eps to ~1e-4 relative; far_export/graphs.py keeps that graph
fp32). TensorRT takes only symmetric (zero-point 0) activations: a build where TensorRT is present quantizes
them "s8" (far_export/build.py), and `far-export compile` refuses a u8 directory in one line.

Weights take 7 bits with u8 activations (`reduce_range`): on x86 CPUs without VNNI (AVX2, AVX-512F) ONNX
Runtime's u8 x s8 kernels multiply with VPMADDUBSW, whose int16 sum of two products saturates; the
quantization guide (onnxruntime.ai/docs/performance/model-optimizations/quantization.html, "data type
selection") names reduce_range as the fix. A VNNI machine does not saturate, but an engine built there may
run on one that does.

Calibration (`calibration_sets`): the fp32 graphs sample the checkpoint's classes through the runtime's own
loop (far_export/feeds.py: run_loop); the inputs each graph was fed become the calibration set, and those of
the images after it the held-out set the quantized graphs are validated on. MinMax ranges (Percentile and
Entropy are there to compare: `METHODS`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from far_export.feeds import Feed, run_loop, spread
from runtime.backends import Backend
from runtime.errors import FarError, first_line
from runtime.manifest import Manifest
from runtime.schedule import SamplingSettings

QUANTIZED_OPS = ("MatMul", "Gemm", "Conv")
# Patterns of weight (initializer) names whose nodes stay fp32 even though they are weight nodes.
KEEP_FP32 = ("time_embed",)  # the shortcut head's timestep MLP (an fp16 island: the sinusoid feeds it)
ACTIVATIONS = "u8"  # "u8" (ONNX Runtime CPU) or "s8" (symmetric: TensorRT)
CALIBRATION_IMAGES = 64  # images sampled for calibration (whole engine batches, at least one)
MAX_FEEDS = 64  # calibration feeds kept per graph, spread over the calls
METHODS = ("minmax", "percentile", "entropy")


class QuantizeError(FarError, RuntimeError):
    """ONNX Runtime's quantizer failed on a graph."""


@dataclass(frozen=True)
class Quantized:
    """What `quantize_graph` did: nodes quantized and the weight nodes kept fp32."""

    quantized: int
    kept_fp32: tuple[str, ...]


def weight_nodes(model: Any, keep_fp32: tuple[str, ...] = KEEP_FP32) -> tuple[list[str], list[str]]:
    """(names of the nodes to quantize, names of the weight nodes kept fp32 by `keep_fp32`)."""
    inits = {t.name for t in model.graph.initializer}
    take, keep = [], []
    for n in model.graph.node:
        weighted = n.op_type in ("Gemm", "Conv") or (n.op_type == "MatMul" and n.input[1] in inits)
        if not weighted:
            continue
        (keep if any(p in n.input[1] for p in keep_fp32) else take).append(n.name)  # by the weight's name
    return take, keep


@contextmanager
def _quiet() -> Iterator[None]:
    """The quantizer logs a pre-processing hint on every call; the build prints its own lines."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def quantize_graph(
    src: Path,
    dst: Path,
    feeds: list[dict[str, np.ndarray]],
    method: str = "minmax",
    activations: str = ACTIVATIONS,
) -> Quantized:
    """Write the QDQ int8 form of the fp32 graph `src` to `dst`, activations calibrated on `feeds`:
    "u8" (asymmetric, ONNX Runtime on x86) or "s8" (symmetric, what TensorRT takes)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    if method not in methods:
        raise QuantizeError(f"unknown calibration method {method!r}; choose from {', '.join(METHODS)}")
    if not feeds:
        raise QuantizeError(f"no calibration inputs for {src.name}")
    try:
        with _quiet(), tempfile.TemporaryDirectory() as work:
            # ONNX Runtime's recommended pre-processing: shape inference and its basic (standard-op) fusions,
            # e.g. MatMul + bias Add -> Gemm, so that the bias is quantized with the product (QGemm)
            pre = Path(work) / "pre.onnx"
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
            take, keep = weight_nodes(onnx.load(str(pre), load_external_data=False))
            symmetric = activations == "s8"
            quantize_static(
                str(pre),
                str(dst),
                Reader(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=not symmetric,  # 7-bit weights: see the docstring (u8 x s8 saturation)
                activation_type=QuantType.QInt8 if symmetric else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=take,
                calibrate_method=methods[method],
                calibration_providers=["CPUExecutionProvider"],
                extra_options={
                    "ActivationSymmetric": symmetric,
                    "WeightSymmetric": True,
                    "OpTypesToExcludeOutputQuantization": ["Gemm", "MatMul"],  # not Conv: see the docstring
                },
            )
    except Exception as e:  # the quantizer raises many types; name the graph and the first line
        raise QuantizeError(f"quantizing {src.name} failed: {type(e).__name__}: {first_line(e)}") from e
    return Quantized(quantized=len(take), kept_fp32=tuple(keep))


def calibration_feeds(
    backend: Backend,
    directory: Path,
    manifest: Manifest,
    steps_per_batch: dict[str, int],
    seed: int,
    images: int = CALIBRATION_IMAGES,
) -> dict[str, list[Feed]]:
    """The calibration inputs alone (`calibration_sets` without held-out images)."""
    return calibration_sets(backend, directory, manifest, steps_per_batch, seed, images)[0]


def calibration_sets(
    backend: Backend,
    directory: Path,
    manifest: Manifest,
    steps_per_batch: dict[str, int],
    seed: int,
    images: int = CALIBRATION_IMAGES,
    held_out_images: int = 0,
) -> tuple[dict[str, list[Feed]], dict[str, list[Feed]]]:
    """(calibration inputs, held-out inputs) per graph, recorded in one run of the runtime's loop over
    `backend` (the fp32 graphs): it samples `images` images of all classes (class i % num_classes, seeds
    seed, seed + 1, ... per batch), then `held_out_images` more on the next seeds; of each part at most
    MAX_FEEDS inputs per graph, spread evenly over its calls. The amount is counted in images, not calls: a
    graph that runs once a batch (the VAE) is calibrated on one call of a batch-64 build, which holds the
    same 64 images as 64 calls of a batch-1 build (more batches of a large build widen the MinMax ranges)."""
    B = manifest.batch
    batches = max(1, math.ceil(images / B))
    held = math.ceil(held_out_images / B)
    calib = {g: spread(batches * n, MAX_FEEDS) for g, n in steps_per_batch.items()}
    after = {g: {batches * n + i for i in spread(held * n, MAX_FEEDS)} for g, n in steps_per_batch.items()}
    n: dict[str, int] = {}  # calibration inputs kept per graph: they come before the held-out ones

    def keep(graph: str, i: int) -> bool:
        if i in calib[graph]:
            n[graph] = n.get(graph, 0) + 1
            return True
        return i in after[graph]

    labels = [i % manifest.model.num_classes for i in range(B)]
    run = run_loop(
        directory,
        manifest,
        backend,
        [(labels, SamplingSettings.resolve(manifest.model, seed=seed + b), 0) for b in range(batches + held)],
        keep,
    )
    return (
        {g: fs[: n[g]] for g, fs in run.calls.items() if n.get(g)},
        {g: fs[n.get(g, 0) :] for g, fs in run.calls.items() if len(fs) > n.get(g, 0)},
    )

"""`far-export build --precision int8`: QDQ graphs, per-channel int8 weights, per-graph fallback, sampling.

Protects: the int8 graphs carry explicit QuantizeLinear/DequantizeLinear with int8 weights quantized per
output channel (only the weight products: the AR update never); a quantized graph that fails validation is
shipped fp32 with the manifest saying so and why; `far-export sample` runs an int8 engine and its image stays
close to the fp32 engine's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_checkpoint
from PIL import Image

from far_export.cli import cli
from runtime.manifest import load_manifest

onnx = pytest.importorskip("onnx")


def _invoke(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(checkpoint, fp32 engine, int8 engine) of one tiny masked/shortcut checkpoint, batch 2."""
    root = tmp_path_factory.mktemp("int8")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    for p, engines in (("fp32", "--no-engines"), ("int8", "--engines")):  # int8 as users build it
        res = _invoke("build", ckpt, "--out", root / p, "--precision", p, "--batch", "2", engines)
        assert res.exit_code == 0, res.output
    return ckpt, root / "fp32", root / "int8"


def _qdq(path: Path) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Op counts of Q/DQ nodes, and (weight dtype, number of scales) of each DequantizeLinear on a weight."""
    from onnx import numpy_helper

    m = onnx.load(str(path))
    inits = {t.name: t for t in m.graph.initializer}
    ops = {op: sum(n.op_type == op for n in m.graph.node) for op in ("QuantizeLinear", "DequantizeLinear")}
    weights = []
    for n in m.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w = numpy_helper.to_array(inits[n.input[0]])
            weights.append((w.dtype, numpy_helper.to_array(inits[n.input[1]]).size, w.shape))
    return ops, weights


def test_int8_build_writes_qdq_graphs_with_per_channel_int8_weights(engines):
    _, _, out = engines
    m = load_manifest(out)
    assert m.precision == "int8" and m.validation["passed"] and m.validation["end_to_end"]["passed"]
    assert m.graphs["update"].precision == "fp32"
    ops, weights = _qdq(out / m.graphs["update"].file)
    assert ops == {"QuantizeLinear": 0, "DequantizeLinear": 0}  # the AR scatter only moves values
    quantized = [g for g in ("backbone", "head", "vae_decoder") if m.graphs[g].precision == "int8"]
    assert "backbone" in quantized  # the graph int8 is for; the others may fall back (then with a note)
    for g in ("backbone", "head", "vae_decoder"):
        ops, weights = _qdq(out / m.graphs[g].file)
        if g in quantized:
            assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0, g
            w8 = [w for w in weights if w[0] == np.int8]
            assert w8, f"{g}: no int8 weights"
            # per output channel: one scale per output channel of every (2-D or conv) int8 weight
            assert all(n > 1 and n in shape for _, n, shape in w8), (g, w8)
            assert "LayerNorm" in " ".join(m.graphs[g].fp32_islands) or g == "vae_decoder"
        else:
            assert ops["QuantizeLinear"] == 0 and "falls back to fp32" in m.validation["notes"][g]
    assert m.validation["graphs"]["backbone"]["real (held-out)"]["z"]["max"] >= 0
    assert m.encoder_variants and all(  # the encoder variants are the backbone's graph: the same islands
        m.graphs[v].fp32_islands == m.graphs["backbone"].fp32_islands for v in m.encoder_variants.values()
    )


def test_weight_products_carry_qdq_where_onnx_runtime_fuses_them(engines):
    """MatMul/Gemm: Q/DQ on their inputs only, none on their outputs (TensorRT's recommended placement; such a
    pair cost a Q + DQ pass and split the GELU that ONNX Runtime fuses). Conv: on its output too, since ONNX
    Runtime runs a convolution int8 only as DQ -> Conv -> Q (QLinearConv); without the Q it ran fp32 on
    dequantized weights. Every activation pair feeds a weight product or follows a convolution."""
    _, _, out = engines
    convs = 0
    for g in ("backbone", "head", "vae_decoder"):
        m = onnx.load(str(out / load_manifest(out).graphs[g].file))
        inits = {t.name for t in m.graph.initializer}
        producer = {o: n for n in m.graph.node for o in n.output}
        consumers: dict[str, list[str]] = {}
        for n in m.graph.node:
            for i in n.input:
                consumers.setdefault(i, []).append(n.op_type)
        for n in m.graph.node:
            src = producer.get(n.input[0]) if n.input else None
            if n.op_type == "QuantizeLinear":
                assert src is None or src.op_type not in ("Gemm", "MatMul"), (g, n.name)
            elif n.op_type == "DequantizeLinear" and n.input[0] not in inits:  # an activation, not a weight
                before = producer.get(src.input[0]) if src is not None else None  # what the Q quantized
                after_conv = before is not None and before.op_type == "Conv"
                assert after_conv or {"Gemm", "MatMul", "Conv"} & set(consumers[n.output[0]]), (g, n.name)
            elif n.op_type == "Conv" and src is not None and src.op_type == "DequantizeLinear":
                assert consumers[n.output[0]] == ["QuantizeLinear"], (g, n.name)
                convs += 1
    assert convs > 0  # the VAE decoder's convolutions are quantized


def test_a_quantized_graph_that_fails_validation_ships_fp32_with_a_note(engines, tmp_path, monkeypatch):
    import far_export.validate as validate_mod
    from far_export.tolerances import TOLERANCES
    from far_export.validate import ValidationError

    real_compare = validate_mod.compare

    def compare(name, io_, graph, ref, feeds, tol, label):
        if name == "backbone" and tol == TOLERANCES["int8"]:
            raise ValidationError("backbone graph, output 'z' (real (held-out) inputs) differs from PyTorch")
        return real_compare(name, io_, graph, ref, feeds, tol, label)

    monkeypatch.setattr(validate_mod, "compare", compare)
    ckpt, fp32, _ = engines
    res = _invoke(
        "build", ckpt, "--out", tmp_path / "e", "--precision", "int8", "--batch", "2", "--no-engines"
    )
    assert res.exit_code == 0, res.output
    m = load_manifest(tmp_path / "e")
    assert m.graphs["backbone"].precision == "fp32" and m.graphs["backbone"].fp32_islands == ()
    assert "int8 failed validation, falls back to fp32" in m.validation["notes"]["backbone"]
    assert _qdq(tmp_path / "e" / "backbone.onnx")[0]["QuantizeLinear"] == 0
    assert (
        m.graphs["backbone"].sha256 == load_manifest(fp32).graphs["backbone"].sha256
    )  # the fp32 export itself
    assert not (tmp_path / "e" / ".fp32").exists()


def test_sample_runs_an_int8_engine_close_to_the_fp32_engine(engines, tmp_path):
    """Same seed, same classes. Bound on the mean pixel error: 0.02 of the [0, 1] range, ~2x far-mnist's
    measured int8 end-to-end mean (0.009, far_export/tolerances.py); a few pixels may move further where the
    AR sampling diverges (far-mnist's max: 0.54), so the max is bounded loosely (half the range)."""
    _, fp32, int8 = engines
    imgs = {}
    for name, d in (("fp32", fp32), ("int8", int8)):
        res = _invoke(
            "sample",
            d,
            "--classes",
            "0-3",
            "--per-class",
            "1",
            "--seed",
            "3",
            "--threads",
            "1",
            "--out",
            tmp_path / f"{name}.png",
        )
        assert res.exit_code == 0, res.output
        imgs[name] = np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")).astype(np.float64) / 255
    diff = np.abs(imgs["int8"] - imgs["fp32"])
    assert diff.mean() < 0.02 and diff.max() < 0.5, (diff.mean(), diff.max())


def test_calibration_records_every_ar_step(engines):
    """The calibration inputs come from every AR step of the loop, not only from each batch's first step
    (a stride that was a multiple of the steps per batch calibrated batch-1 backbones on inputs without a
    known token: they failed validation on later steps)."""
    from far_export.quantize import MAX_FEEDS, calibration_feeds, spread
    from runtime.backends import open_backend
    from runtime.pipeline import steps_per_batch

    assert {i % 8 for i in spread(64 * 8, MAX_FEEDS)} == set(range(8))
    assert spread(5, MAX_FEEDS) == set(range(5)) and spread(1, MAX_FEEDS) == {0}
    _, fp32, _ = engines
    m = load_manifest(fp32)
    steps = m.model.num_iter
    backend = open_backend("ort", fp32, m, threads=1)
    try:
        feeds = calibration_feeds(backend, fp32, m, steps_per_batch(m, steps, 1), 0)
    finally:
        backend.close()
    backbones = [g for g in feeds if g.startswith("backbone")]  # the full graph and the encoder variants
    assert all(len(feeds[g]) <= MAX_FEEDS for g in backbones)
    known = {int((f["mask"] == 0).sum()) for g in backbones for f in feeds[g]}  # known tokens at that step
    assert len(known) == steps, known


def test_u8_int8_directory_is_refused_by_compile_and_s8_graphs_are_symmetric(engines, tmp_path, monkeypatch):
    """TensorRT takes symmetric int8 only: `compile` of this (u8, built without TensorRT) directory stops in
    one line before building anything, and the s8 graphs a TensorRT machine's build writes have zero points
    0."""
    import shutil

    import gpusim

    from far_export.feeds import example_inputs
    from far_export.quantize import quantize_graph
    from far_export.tensorrt import asymmetric_int8

    _, fp32, int8 = engines
    copy = tmp_path / "int8"
    shutil.copytree(int8, copy)
    gpusim.install(monkeypatch, "10.3")
    r = _invoke("compile", copy)
    assert r.exit_code == 1 and "uint8 (asymmetric) activations" in r.output.strip().splitlines()[-1]
    assert not list(copy.glob("*.plan"))
    m = load_manifest(fp32)
    spec = m.graphs["head"]  # its weights are inside its .onnx (the backbones share backbone.weights)
    rng = np.random.default_rng(0)
    feeds = [example_inputs(m.model, spec, rng) for _ in range(4)]
    out = tmp_path / "s8.onnx"
    quantize_graph(fp32 / spec.file, out, feeds, activations="s8")
    assert asymmetric_int8(int8 / load_manifest(int8).graphs["head"].file)
    assert not asymmetric_int8(out)

"""far_export.graphs / far_export.export / far_export.validate: the graph contract, static export,
validation errors, the runtime loop."""

from __future__ import annotations

import onnx
import pytest
import torch
from conftest import tiny_model
from numerics import FP32, GRAPH_FP32, assert_close_to_scale

from far_export.export import ExportError, export_graph
from far_export.graphs import TORCH_DTYPES, GraphShapes, graph_modules, graph_specs, model_info
from far_export.tolerances import TOLERANCES
from far_export.validate import (
    ValidationError,
    compare,
    ort_runner,
    ort_session,
    random_feeds,
    torch_runner,
    upcast_bf16,
)
from runtime.backends import Backend, Call, Graph
from runtime.manifest import SCHEMA_VERSION, GraphSpec, Manifest
from runtime.pipeline import Pipeline
from runtime.schedule import max_tokens_per_step
from training.sample import SamplingSettings, sample_tokens


def _shape(specs, name):
    return {t.name: (t.shape, t.dtype) for t in (*specs[name].inputs, *specs[name].outputs)}


def test_graph_specs_follow_the_io_contract():
    """Names, static shapes and dtypes of the three graphs as the engine-directory contract says."""
    model, _ = tiny_model()
    cfg = model.cfg
    shapes = GraphShapes.for_config(cfg, batch=3, guided=True)
    Q = max_tokens_per_step(cfg.seq_len, cfg.num_iter)
    assert shapes.max_query == Q and shapes.num_iter == cfg.num_iter
    specs = graph_specs(cfg, shapes, "fp16")
    L, C, D = cfg.seq_len, cfg.token_dim, cfg.width
    assert _shape(specs, "backbone") == {
        "tokens": ((3, L, C), "float32"),
        "mask": ((3, L), "float32"),
        "labels": ((3,), "int64"),
        "query": ((3, Q), "int64"),
        "z": ((2 * 3 * Q, D), "float32"),
    }
    # encoder variants: the backbone's I/O plus the known positions; L = 64 in 4 steps knowing 0, 5, 19 and 40
    # tokens -> 3 variants of 5, 19 and 40 slots (the first step runs the 5-slot one on pads)
    assert shapes.encoder_capacities == (5, 19, 40)
    for c in shapes.encoder_capacities:
        assert _shape(specs, f"backbone_k{c}") == {**_shape(specs, "backbone"), "known": ((3, c), "int64")}
        assert (
            specs[f"backbone_k{c}"].known_capacity == c
            and specs[f"backbone_k{c}"].file == f"backbone_k{c}.onnx"
        )
    assert GraphShapes.for_config(cfg, 3, True, encoder_variants=0).encoder_capacities == ()
    # 2 AR steps know 0 and 19 tokens: a variant each, fitted to them
    assert GraphShapes.for_config(cfg, 3, True, num_iter=2).encoder_capacities == (1, 19)
    assert [t.name for t in specs["head"].inputs] == ["x", "t", "d", "z", "cfg"]
    assert _shape(specs, "vae_decoder")["image"] == ((3, 3, cfg.img_size, cfg.img_size), "float32")

    causal, _ = tiny_model(backbone="causal", head="mar")
    cs = GraphShapes.for_config(causal.cfg, batch=2, guided=False)
    assert cs.max_query == 1
    specs = graph_specs(causal.cfg, cs, "fp16")
    cache = (causal.cfg.depth, 2, 2, causal.cfg.num_heads, L, causal.cfg.head_dim)
    assert _shape(specs, "backbone")["cache"] == (cache, "float16")  # the KV cache stays in the graph's dtype
    assert _shape(specs, "backbone")["cache_out"] == (cache, "float16")
    assert [t.name for t in specs["head"].inputs] == ["x", "t", "z", "coef", "noise"]  # no cfg input unguided


def test_bad_shapes_and_precision_raise_typed_errors():
    model, _ = tiny_model()
    with pytest.raises(ExportError, match="batch must be >= 1"):
        GraphShapes.for_config(model.cfg, batch=0, guided=True)
    with pytest.raises(ExportError, match="num_iter"):
        GraphShapes.for_config(model.cfg, batch=1, guided=True, num_iter=model.cfg.seq_len + 1)
    with pytest.raises(ExportError, match="unknown precision 'fp8'"):
        graph_specs(model.cfg, GraphShapes.for_config(model.cfg, 1, True), "fp8")


@pytest.mark.parametrize("backbone,head,guided", [("masked", "shortcut", True), ("causal", "mar", False)])
def test_exported_graphs_are_static_and_match_pytorch(tmp_path, backbone, head, guided):
    """Every graph exports with fully static shapes, no data-dependent ops, and equals its torch module."""
    model, vae = tiny_model(backbone, head)
    shapes = GraphShapes.for_config(model.cfg, batch=2, guided=guided)
    specs = graph_specs(model.cfg, shapes)
    modules = graph_modules(model, vae, guided, variants=shapes.variant_names)
    for name, io_ in specs.items():
        feeds = random_feeds(model_info(model.cfg, shapes), io_)
        path = export_graph(modules[name], io_, tmp_path / io_.file, feeds[0])
        proto = onnx.load(str(path))
        assert proto.opset_import[0].version >= 18
        assert not {"NonZero", "Loop", "If"} & {n.op_type for n in proto.graph.node}, name
        for v in (*proto.graph.input, *proto.graph.output):
            assert all(d.HasField("dim_value") for d in v.type.tensor_type.shape.dim), (name, v.name)
        res = compare(
            name,
            io_,
            ort_runner(ort_session(path), io_),
            torch_runner(modules[name], io_),
            feeds,
            TOLERANCES["fp32"],
            "random",
        )
        for out, st in res.items():
            assert st["max"] <= GRAPH_FP32 * st["scale"], (name, out, st)


def test_validation_error_names_graph_output_and_difference():
    model, vae = tiny_model()
    shapes = GraphShapes.for_config(model.cfg, batch=1, guided=True)
    io_ = graph_specs(model.cfg, shapes)["head"]
    ref = torch_runner(graph_modules(model, vae, True)["head"], io_)

    def off_by_a_bit(feeds):
        return {"x_next": ref(feeds)["x_next"] + 0.25}

    with pytest.raises(
        ValidationError, match=r"head graph, output 'x_next' \(random inputs\).*max abs error 0\.25"
    ):
        compare(
            "head",
            io_,
            off_by_a_bit,
            ref,
            random_feeds(model_info(model.cfg, shapes), io_),
            TOLERANCES["fp32"],
            "random",
        )


class _TorchBackend(Backend):
    """The torch step modules behind the graphs, as a runtime backend (no export involved)."""

    name = "torch"

    def __init__(self, manifest, runners):
        self.manifest, self.runners = manifest, runners

    def graph(self, name):
        return _TorchGraph(self.manifest.graphs[name], self.runners[name])


class _TorchGraph(Graph):
    def __init__(self, spec, runner):
        self.spec, self.runner = spec, runner

    def bind(self, inputs, outputs):
        self.check_buffers(inputs, outputs)
        runner = self.runner

        class _Run(Call):
            def run(self):
                for name, value in runner(inputs).items():
                    outputs[name][...] = value

        return _Run()


@pytest.mark.parametrize("backbone,head", [("masked", "shortcut"), ("causal", "mar")])
def test_runtime_loop_over_torch_graph_modules_equals_reference_sampler(backbone, head):
    """The runtime's loop (padded queries, per-image draws, scatter, KV-cache ping-pong) over the torch step
    modules is the reference sampler's loop: checked apart from export."""
    model, vae = tiny_model(backbone, head)
    cfg = model.cfg
    shapes = GraphShapes.for_config(cfg, batch=3, guided=True)
    specs = graph_specs(cfg, shapes)
    mods = graph_modules(model, vae, True, variants=shapes.variant_names)
    graphs = {
        n: GraphSpec(io_.file, "-", io_.inputs, io_.outputs, "fp32", known_capacity=io_.known_capacity)
        for n, io_ in specs.items()
    }
    manifest = Manifest(
        SCHEMA_VERSION, "test", "-", "-", "fp32", shapes.batch, True, model_info(cfg, shapes), graphs
    )
    pipe = Pipeline(
        None, manifest, _TorchBackend(manifest, {n: torch_runner(mods[n], io_) for n, io_ in specs.items()})
    )
    s = SamplingSettings.resolve(cfg, seed=5)
    got = pipe.sample_tokens([0, 1, 3], s)
    ref = sample_tokens(model, [0, 1, 3], s)
    assert_close_to_scale(got, ref, FP32, "runtime loop over torch modules vs reference sampler")


def test_bf16_graph_runs_upcast_on_cpu(tmp_path):
    """ORT CPU lacks bf16 kernels; the upcast graph (same structure, bf16 weights) matches torch's bf16
    head."""
    model, vae = tiny_model()
    shapes = GraphShapes.for_config(model.cfg, batch=1, guided=True)
    io_ = graph_specs(model.cfg, shapes, "bf16")["head"]
    mod = graph_modules(model, vae, True, "bf16")["head"]
    assert mod.head.net.input_proj.weight.dtype == torch.bfloat16
    feeds = random_feeds(model_info(model.cfg, shapes), io_)
    path = export_graph(mod, io_, tmp_path / "head.onnx", feeds[0])
    assert any(t.data_type == onnx.TensorProto.BFLOAT16 for t in onnx.load(str(path)).graph.initializer)
    sess = ort_session(upcast_bf16(path), name="head (upcast)")
    compare("head", io_, ort_runner(sess, io_), torch_runner(mod, io_), feeds, TOLERANCES["bf16"], "random")


@pytest.mark.slow
def test_far_b_preset_exports_and_validates(tmp_path):
    """far-b (MAR-B dims, 207.9M parameters, random weights) exports and validates on CPU
    (~6 min, ~3.5 GB)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "far_b.json"
    subprocess.run(
        [sys.executable, str(root / "benchmarks" / "export_far_b.py"), "--json", str(out)],
        check=True,
        cwd=root,
    )
    res = json.loads(out.read_text())
    assert res["params_million"] == pytest.approx(207.9, abs=0.1)
    assert res["end_to_end_image_max"] < 1e-3
    variants = {"backbone_k20", "backbone_k75", "backbone_k159"}  # L = 256, 4 steps: one per known count
    assert set(res["validation"]) == {"backbone", *variants, "head", "update", "vae_decoder"}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_reduced_precision_keeps_the_mar_head_network_fp32(precision):
    """Protects the MAR head's fp32 island: at t ~ T the posterior multiplies eps by ~2e4, so the network
    must keep the checkpoint's fp32 weights exactly (rounding them to fp16 and back cost mar-mnist 0.075 x
    scale in its head graph); the backbone runs in the reduced precision."""
    model, vae = tiny_model("masked", "mar", diffusion_clip_x0=5.0)
    mods = graph_modules(model, vae, True, precision)
    net = mods["head"].step.head.net
    ref = dict(model.head.net.named_parameters())
    for name, p in net.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, ref[name]), name  # exact: a copy, not a round trip
    assert next(mods["backbone"].parameters()).dtype == TORCH_DTYPES[precision]
    assert model.head.net.input_proj.weight.dtype == torch.float32  # the checkpoint's model is untouched


def test_onnx_runtime_fuses_the_backbone_gelu(tmp_path):
    """The MLP's GELU reaches ONNX Runtime in a form its GeluFusion matches: one Gelu per block, no Erf.
    fp32 only: ORT's CPU provider fuses float GELU, not fp16 (which it runs cast to fp32 anyway). And
    attention's q, k and v are three products: no Split of a fused qkv (a copy per block)."""
    precision = "fp32"
    import onnxruntime as ort

    model, vae = tiny_model("masked", "shortcut")
    shapes = GraphShapes.for_config(model.cfg, batch=1, guided=False)
    io_ = graph_specs(model.cfg, shapes, precision)["backbone"]
    module = graph_modules(model, vae, False, precision)["backbone"]
    path = export_graph(module, io_, tmp_path / io_.file, random_feeds(model_info(model.cfg, shapes), io_)[0])
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED  # portable fusions only
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]
    blocks = model.cfg.enc_depth + model.cfg.dec_depth
    assert ops.count("Gelu") == blocks and "Erf" not in ops, sorted(set(ops))
    assert "Split" not in ops, sorted(set(ops))


def test_bad_encoder_variants_raise_typed_errors():
    """The library refuses what the CLI's range refuses: a negative count or more than the build allows."""
    from far_export.build import BuildError, BuildOptions

    model, _ = tiny_model()
    with pytest.raises(ExportError, match="encoder variants must be >= 0"):
        GraphShapes.for_config(model.cfg, 1, True, encoder_variants=-1)
    with pytest.raises(BuildError, match=r"--encoder-variants must be in \[0, 16\], got 17"):
        BuildOptions(encoder_variants=17).check()

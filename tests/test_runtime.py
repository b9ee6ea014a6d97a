"""The lean runtime's API and its refusals: engine directories, requests, providers, TensorRT plans.

Every bad input must end in one typed exception with a one-line message (the CLI
turns it into `Error: ...`, exit 1). Engines: the tiny masked/shortcut model built
once with far_export.build (tests/runtime_engines.py).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from runtime_engines import built_engines

from runtime.backends import BackendError
from runtime.manifest import SCHEMA_VERSION, EngineSpec, ManifestError, load_manifest, sha256_file
from runtime.ort import resolve_providers
from runtime.pipeline import Pipeline, RequestError, backbone_graph
from runtime.schedule import masked_schedule
from runtime.trt import DeviceInfo, EngineMismatchError, check_engine, check_engines

pytest.importorskip("torch")  # the engines are built from a checkpoint


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return built_engines(tmp_path_factory, "masked", "shortcut")[1]


@pytest.fixture(scope="module")
def pipe(engines) -> Pipeline:
    return Pipeline.load(engines)


@pytest.fixture
def copy(engines, tmp_path) -> Path:
    out = tmp_path / "engines"
    shutil.copytree(engines, out)
    return out


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert msg and "\n" not in msg, msg
    return msg


# ----------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------


def test_generate_shapes_and_determinism(pipe):
    a = pipe.generate([0, 1, 2], seed=5)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, pipe.generate([0, 1, 2], seed=5))  # exact: the same session, the same inputs
    assert not np.array_equal(a, pipe.generate([0, 1, 2], seed=6))


def test_image_depends_on_seed_index_class_not_batching(pipe):
    """Image i draws from PCG64([seed, i]): the same whatever the batch or the other images."""
    full = pipe.generate([3, 1, 2], seed=1)
    one_by_one = pipe.generate([3, 1, 2], seed=1, batch=1)
    other = pipe.generate([0, 1], seed=1)
    # other batch sizes sum in another order: a pixel on a rounding edge may move by one level
    # (tests/numerics.py)
    assert np.abs(full.astype(int) - one_by_one).max() <= 1
    assert np.abs(full[1].astype(int) - other[1]).max() <= 1


def test_progress_counts_ar_steps(pipe):
    seen = []
    pipe.generate([0, 1, 2], seed=0, progress=lambda done, total: seen.append((done, total)))
    steps = pipe.model.num_iter
    assert seen[-1] == (2 * steps, 2 * steps) and len(seen) == 2 * steps  # 3 images = 2 batches of 2
    assert [d for d, _ in seen] == list(range(1, 2 * steps + 1))


def test_calls_bound_once_per_plan_and_timed(engines):
    """A setting's calls are bound on its first use; generating again binds nothing and runs one backbone
    call per AR step and K head calls per backbone call."""
    from runtime.backends import RecordingBackend, open_backend

    manifest = load_manifest(engines)
    backend = RecordingBackend(open_backend("ort", engines, manifest), keep=lambda graph, i: False)
    pipe = Pipeline(engines, manifest, backend)
    pipe.generate([0], seed=0, head_steps=4)
    binds = dict(backend.binds)
    pipe.generate([1], seed=1, head_steps=4)
    assert backend.binds == binds
    steps = pipe.model.num_iter
    # tiny: L = 64, 4 steps know 0, 5, 19, 40 tokens -> encoder variants of 5, 5, 19 and 40 slots
    assert backend.counts == {
        "backbone_k5": 2 * 2,
        "backbone_k19": 2,
        "backbone_k40": 2,
        "head": 2 * 4 * steps,
        "update": 2 * steps,
        "vae_decoder": 2,
    }
    t = pipe.timings
    assert t.images == 1 and t.batches == 1
    assert t.backbone_calls == steps and t.head_calls == 4 * steps
    assert 0 < t.backbone + t.head + t.vae + t.loop + t.prepare <= t.wall


@pytest.mark.parametrize("backbone,head", [("masked", "shortcut"), ("causal", "mar")])
def test_nothing_crosses_to_the_host_between_ar_steps(tmp_path_factory, backbone, head):
    """Per batch: one upload of the tables and the state, then only graph calls (backbone, K heads, update per
    step), then the VAE and one download of the image. On a GPU the state stays on the device."""
    from runtime.backends import RecordingBackend, open_backend

    engines = built_engines(tmp_path_factory, backbone, head)[1]
    manifest = load_manifest(engines)
    backend = RecordingBackend(open_backend("ort", engines, manifest), keep=lambda graph, i: False)
    pipe = Pipeline(engines, manifest, backend)
    s = pipe.settings()
    backend.events.clear()
    pipe.generate([0, 1, 2], head_steps=s.head_steps)  # two batches of 2
    if backbone == "masked":
        backbones = [backbone_graph(manifest, step) for step in masked_schedule(64, pipe.model.num_iter)]
        assert backbones == ["backbone_k5", "backbone_k5", "backbone_k19", "backbone_k40"]
    else:
        backbones = ["backbone"] * pipe.model.seq_len
    steps = [[f"run {b}", *["run head"] * s.head_steps, "run update"] for b in backbones]
    batch = ["upload", *sum(steps, []), "run vae_decoder", "download"]
    assert backend.events == batch * 2


def test_encoder_variants_get_every_known_position_and_pads_that_are_unknown(engines):
    """Per step the known table lists exactly the tokens known before it (mask 0 in the state the step reads)
    and pads with unknown positions; a request with more steps than the build runs the full backbone where
    no variant holds its known tokens."""
    from runtime.backends import RecordingBackend, open_backend

    manifest = load_manifest(engines)
    backend = RecordingBackend(open_backend("ort", engines, manifest))
    pipe = Pipeline(engines, manifest, backend)
    pipe.generate([0, 3], seed=2, num_iter=8)
    for name in manifest.encoder_variants.values():
        for feed in backend.calls[name]:
            for mask, known in zip(feed["mask"], feed["known"]):
                have = set(np.flatnonzero(mask == 0))
                assert set(known[mask[known] == 0]) == have and len(have) == (mask[known] == 0).sum()
                assert len(have) <= len(known) and (mask[known] == 1).sum() == len(known) - len(have)
    graphs = [backbone_graph(manifest, step) for step in masked_schedule(64, 8)]
    assert backend.counts["backbone"] == graphs.count("backbone") >= 1  # steps past 48 known tokens
    assert {g for g in graphs if g != "backbone"} == set(manifest.encoder_variants.values())


def test_engines_without_encoder_variants_give_the_same_images(tmp_path_factory, pipe):
    """--encoder-variants 0: the full backbone at every step, and the same images up to float rounding."""
    plain = built_engines(tmp_path_factory, "masked", "shortcut", encoder_variants=0)[1]
    manifest = load_manifest(plain)
    assert set(manifest.graphs) == {"backbone", "head", "update", "vae_decoder"}
    with Pipeline.load(plain) as other:
        a, b = other.generate([0, 1, 2], seed=4), pipe.generate([0, 1, 2], seed=4)
    assert np.abs(a.astype(int) - b).max() <= 1  # uint8: a rounding level where a value sits on x.5


@pytest.mark.parametrize("backbone,head", [("masked", "mar"), ("causal", "shortcut")])
def test_state_in_separate_device_memory_gives_the_same_images(tmp_path_factory, backbone, head):
    """ONNX Runtime with the state in memory apart from the host buffers (as under the CUDA provider, here
    in CPU memory): the graphs see only what the loop uploads and the host only what it downloads, and the
    images and tokens are the same as with the host buffers bound directly."""
    from runtime.ort import OrtBackend

    engines = built_engines(tmp_path_factory, backbone, head)[1]
    manifest = load_manifest(engines)
    host = Pipeline(engines, manifest, OrtBackend(engines, manifest))
    apart = Pipeline(engines, manifest, OrtBackend(engines, manifest, device_memory="cpu"))
    assert "state in cpu memory" in apart.backend.describe()
    assert np.array_equal(apart.generate([0, 1, 2], seed=3), host.generate([0, 1, 2], seed=3))
    s = host.settings(seed=4)
    assert np.array_equal(apart.sample_tokens([1, 0], s), host.sample_tokens([1, 0], s))
    tokens = host.sample_tokens([2], s)
    assert np.array_equal(apart.decode(tokens), host.decode(tokens))


def test_defaults_come_from_manifest(pipe):
    s = pipe.settings()
    m = pipe.model
    assert (s.head_steps, s.cfg, s.cfg_schedule, s.temperature, s.num_iter) == (
        m.head_steps,
        m.cfg,
        m.cfg_schedule,
        m.temperature,
        m.num_iter,
    )


def test_more_ar_steps_fit_the_static_query(pipe):
    """num_iter above the built one predicts fewer tokens per step, so it fits Q."""
    assert pipe.generate([0], num_iter=pipe.model.num_iter + 2).shape == (1, 16, 16, 3)


# ----------------------------------------------------------------------------
# bad requests
# ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"classes": [0, 4]}, "class id 4 is out of range"),
        ({"classes": [-1]}, "class id -1 is out of range"),
        ({"classes": []}, "no class"),
        ({"batch": 3}, "batch 3 is larger than the engines were built for \\(2\\)"),
        ({"batch": 0}, "batch must be >= 1"),
        ({"head_steps": 3}, "power of two"),
        ({"head_steps": 0}, "power of two"),
        ({"head_steps": 256}, "power of two from 1 to 128"),
        ({"temperature": 0.0}, "temperature must be > 0"),
        ({"cfg_schedule": "cosine"}, "unknown cfg schedule"),
        ({"num_iter": 1}, "engines query at most"),
    ],
)
def test_bad_requests_are_one_line_errors(pipe, kwargs, match):
    kwargs = {"classes": [0], **kwargs}
    with pytest.raises(RequestError, match=match) as e:
        pipe.generate(**kwargs)
    _one_line(e)


def test_sample_tokens_refuses_more_than_the_engine_batch(pipe):
    with pytest.raises(RequestError, match="larger than the engines"):
        pipe.sample_tokens([0, 1, 2], pipe.settings())


# ----------------------------------------------------------------------------
# bad engine directories
# ----------------------------------------------------------------------------


def _edit_manifest(directory: Path, fn) -> None:
    path = directory / "manifest.json"
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def test_missing_directory(tmp_path):
    with pytest.raises(ManifestError, match="does not exist") as e:
        Pipeline.load(tmp_path / "nope")
    _one_line(e)


def test_directory_without_manifest(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json is missing") as e:
        Pipeline.load(tmp_path)
    _one_line(e)


def test_invalid_json_manifest(copy):
    (copy / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON") as e:
        Pipeline.load(copy)
    _one_line(e)


def test_newer_schema(copy):
    _edit_manifest(copy, lambda d: d.update(schema_version=SCHEMA_VERSION + 1))
    with pytest.raises(ManifestError, match="newer than this runtime") as e:
        Pipeline.load(copy)
    _one_line(e)


def test_manifest_missing_fields(copy):
    _edit_manifest(copy, lambda d: d["model"].pop("seq_len"))
    with pytest.raises(ManifestError, match="manifest field model.seq_len is missing") as e:
        Pipeline.load(copy)
    _one_line(e)


def _rename_variant(d):
    d["graphs"]["backbone_k20"] = d["graphs"].pop("backbone_k5")
    sw = d.get("shared_weights")
    if sw:  # the shared weights' index names the graph too: rename it there, so the capacity check speaks
        sw["graphs"] = ["backbone_k20" if g == "backbone_k5" else g for g in sw["graphs"]]
        sw["tensors"]["backbone_k20"] = sw["tensors"].pop("backbone_k5")


def _variant_input(d):
    d["graphs"]["backbone_k5"]["inputs"][-1]["shape"] = [2, 6]


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d["graphs"]["backbone_k5"].update(known_capacity=4), "known_capacity 4 is not"),
        (lambda d: d["graphs"]["backbone_k5"].update(known_capacity="5"), "known_capacity must be an"),
        (lambda d: d["graphs"]["head"].update(known_capacity=4), "head.known_capacity must be 0"),
        (_rename_variant, "known_capacity 5 is not the name's 20"),
        (_variant_input, "inputs are not the backbone's"),
        (lambda d: d["graphs"].update(backbone_k8x=d["graphs"]["head"]), "unknown graph 'backbone_k8x'"),
        (lambda d: d["model"].update(backbone="causal"), "causal backbone has no encoder variants"),
        (lambda d: d["engines"].update(backbone_k4={}), "'backbone_k4' is not a graph"),
    ],
)
def test_encoder_variant_fields_are_checked_as_data(copy, edit, match):
    """Protects the schema-3 fields: a variant's capacity, name and inputs must agree, only masked backbones
    have variants; a bad manifest is one line."""
    _edit_manifest(copy, edit)
    with pytest.raises(ManifestError, match=match) as e:
        Pipeline.load(copy)
    _one_line(e)


def test_incomplete_directory(copy):
    (copy / "head.onnx").unlink()
    with pytest.raises(ManifestError, match="head.onnx .* is missing") as e:
        Pipeline.load(copy)
    _one_line(e)


def test_corrupt_graph_detected_by_sha256(copy):
    with open(copy / "backbone.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(ManifestError, match="does not match its sha256") as e:
        Pipeline.load(copy)
    _one_line(e)


def test_corrupt_graph_with_matching_sha256(copy):
    """A truncated graph whose manifest was rewritten to match: ONNX Runtime refuses it, one line."""
    f = copy / "head.onnx"
    f.write_bytes(f.read_bytes()[:200])
    _edit_manifest(copy, lambda d: d["graphs"]["head"].update(sha256=sha256_file(f)))
    with pytest.raises(BackendError, match="ONNX Runtime cannot load") as e:
        Pipeline.load(copy)
    _one_line(e)


def test_a_bf16_graph_on_the_cpu_says_it_needs_a_gpu(copy):
    """ONNX Runtime's CPU provider has no bf16 kernels for most ops: opening a bf16 graph there says that
    the directory needs a GPU (TensorRT or the CUDA provider), not 'rebuild' (rebuilding fails alike)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, [2])
    y = helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2])
    graph = helper.make_graph([helper.make_node("Sub", ["x", "x"], ["y"])], "bf16", [x], [y])
    f = copy / "head.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(f))
    _edit_manifest(copy, lambda d: d["graphs"]["head"].update(sha256=sha256_file(f), precision="bf16"))
    with pytest.raises(BackendError, match="bf16 engine directory needs a GPU: TensorRT") as e:
        Pipeline.load(copy)
    assert "--providers cuda" in _one_line(e)


def test_graph_shapes_differ_from_manifest(copy):
    def grow(d):
        d["graphs"]["vae_decoder"]["inputs"][0]["shape"][0] = 4

    _edit_manifest(copy, grow)
    with pytest.raises(BackendError, match="tokens has shape") as e:
        Pipeline.load(copy)
    _one_line(e)


# ----------------------------------------------------------------------------
# providers and TensorRT plans
# ----------------------------------------------------------------------------


def test_resolve_providers():
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers("cuda,cpu") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(["TensorrtExecutionProvider"]) == ["TensorrtExecutionProvider"]
    with pytest.raises(BackendError, match="unknown ONNX Runtime provider"):
        resolve_providers("gpu")


def test_gpu_provider_missing_is_an_error(engines):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    with pytest.raises(BackendError, match="has no CUDAExecutionProvider") as e:
        Pipeline.load(engines, providers="cuda")
    _one_line(e)


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider':UserWarning")
def test_silent_cpu_fallback_is_an_error(engines, monkeypatch):
    """onnxruntime-gpu without working CUDA builds a CPU session; the runtime must refuse it."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", *available])
    with pytest.raises(
        BackendError,
        match="CUDAExecutionProvider was asked for but ONNX Runtime (fell back to|"
        "cannot allocate cuda memory)",
    ) as e:
        Pipeline.load(engines, providers="cuda,cpu")
    _one_line(e)


def _engine_spec(**kw) -> EngineSpec:
    base = dict(
        file="backbone.trt10.3.0.plan",
        sha256="0" * 64,
        tensorrt_version="10.3.0",
        gpu_name="Orin",
        compute_capability="8.7",
        onnx_sha256="1" * 64,
        build_key="2" * 64,
    )
    return EngineSpec(**{**base, **kw})


def test_plan_for_another_tensorrt_version_or_gpu_is_refused():
    here = DeviceInfo("10.3.0", "Orin", "8.7")
    check_engine("backbone", _engine_spec(), here)  # the same: accepted
    with pytest.raises(EngineMismatchError, match="built with TensorRT 10.3.0, this is 11.0.0") as e:
        check_engine("backbone", _engine_spec(), DeviceInfo("11.0.0", "Orin", "8.7"))
    _one_line(e)
    with pytest.raises(
        EngineMismatchError, match=r"built for Orin \(sm 8.7\), this GPU is NVIDIA H100 \(sm 9.0\)"
    ) as e:
        check_engine("backbone", _engine_spec(), DeviceInfo("10.3.0", "NVIDIA H100", "9.0"))
    _one_line(e)


def test_trt_backend_without_plans(pipe, engines):
    with pytest.raises(BackendError, match="lists no TensorRT plan") as e:
        check_engines(pipe.manifest, DeviceInfo("10.3.0", "Orin", "8.7"))
    _one_line(e)
    with pytest.raises(BackendError, match="lists no TensorRT plan"):
        Pipeline.load(engines, backend="trt")


def test_trt_backend_without_tensorrt(copy):
    """Plans listed but no TensorRT here: a one-line reason, not an ImportError."""
    try:
        import tensorrt  # noqa: F401

        pytest.skip("tensorrt is importable here")
    except Exception:
        pass
    man = load_manifest(copy)
    plans = {g: replace(_engine_spec(), file=f"{g}.plan") for g in man.graphs}
    man.replace(engines=plans).save(copy)
    with pytest.raises(BackendError, match="tensorrt") as e:
        Pipeline.load(copy, backend="trt")
    _one_line(e)


def _fake_tensorrt(monkeypatch, version: str, gpu: bytes, major: int, minor: int) -> None:
    """Stand-ins for the tensorrt and cuda-python modules: only a version and a device to compare."""
    import sys
    import types
    from types import SimpleNamespace

    trt = types.ModuleType("tensorrt")
    trt.__version__, trt.Runtime = version, object
    rt = types.ModuleType("cuda.bindings.runtime")
    rt.cudaGetDeviceCount = lambda: (0, 1)
    rt.cudaGetDeviceProperties = lambda i: (
        0,
        SimpleNamespace(
            name=gpu,
            major=major,
            minor=minor,
            multiProcessorCount=16,
            totalGlobalMem=62_000 << 20,
            integrated=1,
        ),
    )
    rt.cudaDriverGetVersion = lambda: (0, 12020)
    rt.cudaRuntimeGetVersion = lambda: (0, 12060)
    cuda, bindings = types.ModuleType("cuda"), types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, rt
    for name, mod in (
        ("tensorrt", trt),
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", rt),
    ):
        monkeypatch.setitem(sys.modules, name, mod)


@pytest.mark.parametrize(
    "version,gpu,cc,match",
    [
        ("11.0.0", b"Orin", (8, 7), "built with TensorRT 10.3.0, this is 11.0.0"),
        (
            "10.3.0",
            b"NVIDIA H100 80GB HBM3",
            (9, 0),
            r"built for Orin \(sm 8.7\), this GPU is NVIDIA H100 80GB HBM3 \(sm 9.0\)",
        ),
    ],
)
def test_trt_backend_refuses_mismatched_plans(copy, monkeypatch, version, gpu, cc, match):
    """Through Pipeline.load and the CLI: the mismatch is found from the manifest, before any plan is read."""
    man = load_manifest(copy)
    man.replace(engines={g: replace(_engine_spec(), file=f"{g}.plan") for g in man.graphs}).save(copy)
    _fake_tensorrt(monkeypatch, version, gpu, *cc)
    with pytest.raises(EngineMismatchError, match=match) as e:
        Pipeline.load(copy, backend="trt")
    _one_line(e)
    from click.testing import CliRunner

    from far_export.cli import cli

    r = CliRunner().invoke(cli, ["sample", str(copy), "--classes", "0", "--backend", "trt", "--out", "x.png"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1].startswith("Error: backbone.plan (backbone) was built")


def _tensorrt_or_skip() -> None:
    try:
        import tensorrt as trt
    except Exception as e:  # ImportError, or PyPI's stub wheel failing to fetch its libraries
        pytest.skip(
            f"TensorRT cannot be installed here (PyPI's wheels are download stubs): {type(e).__name__}"
        )
    if not hasattr(trt, "Runtime"):
        pytest.skip("the tensorrt package here is a stub without its libraries")
    try:
        from runtime.trt import _Cuda

        _Cuda().device()
    except BackendError as e:
        pytest.skip(f"no usable CUDA GPU: {e}")


@pytest.mark.gpu
@pytest.mark.tensorrt
@pytest.mark.parametrize("cuda_graph", [False, True])
def test_trt_backend_equals_ort(copy, cuda_graph):
    _tensorrt_or_skip()
    from far_export.tensorrt import EngineSettings, compile_directory

    compile_directory(copy, EngineSettings(), validate=False, log=lambda s: None)
    ort_images = Pipeline.load(copy).generate([0, 1, 2], seed=4)
    trt = Pipeline.load(copy, backend="trt", cuda_graph=cuda_graph)
    try:
        images = trt.generate([0, 1, 2], seed=4)
        assert np.abs(images.astype(int) - ort_images).max() <= 2
    finally:
        trt.close()

"""The TensorRT backend's whole path on the simulated GPU stack (tests/gpusim): `far-export compile` and
`far-export sample --backend trt`, with and without CUDA graphs, give ONNX Runtime's images; and the
simulator's own rules, so that a rule that stops holding fails here rather than hiding a defect.

Protects: row tables bound at 256-byte aligned addresses; one execution context per bound call; a CUDA graph
captured after the first batch, which runs once; a failed capture falling back to plain enqueues; closing
drops the buffers before freeing them; TensorRT 8.6 and u8 int8 graphs refused in one line.
"""

from __future__ import annotations

import inspect
import shutil

import gpusim
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from runtime_engines import built_engines

from far_export.cli import cli
from runtime.backends import BackendError
from runtime.errors import RequestError
from runtime.loop import Loop
from runtime.pipeline import Pipeline

KINDS = [("masked", "shortcut"), ("masked", "mar"), ("causal", "shortcut")]


def _cli(*args: object):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module", params=KINDS, ids=lambda k: "+".join(k))
def compiled(request, tmp_path_factory):
    """(engine dir with TensorRT 10.3 plans for the simulated H200, ORT images of classes 0,1,2 seed 3)."""
    _, engines = built_engines(tmp_path_factory, *request.param)
    out = tmp_path_factory.mktemp("sim") / "engines"
    shutil.copytree(engines, out)
    ort = np.asarray(Pipeline.load(out).generate([0, 1, 2], seed=3))
    mp = pytest.MonkeyPatch()
    try:
        gpusim.install(mp, "10.3")
        r = _cli("compile", out, "--workspace-gb", "1")
        assert r.exit_code == 0, r.output
    finally:
        mp.undo()
    return out, ort


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["plain", "cuda-graph"])
def test_sample_with_tensorrt_equals_onnx_runtime(compiled, cuda_graph, monkeypatch, tmp_path):
    """Three images through a batch-2 engine: two batches, so a CUDA graph's first batch (plain run, then
    capture) and its second (one launch) are both compared."""
    out, ort = compiled
    sim, _ = gpusim.install(monkeypatch, "10.3")
    args = ["sample", out, "--classes", "0,1,2", "--seed", "3", "--backend", "trt", "--out-dir", tmp_path]
    r = _cli(*args, *(["--cuda-graph"] if cuda_graph else []))
    assert r.exit_code == 0, r.output
    files = sorted(tmp_path.glob("*.png"))
    images = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert images.shape == ort.shape
    assert np.abs(images.astype(int) - ort).max() <= 2
    assert sim.calls.count("cudaGraphLaunch") == (1 if cuda_graph else 0)  # batch 2 only
    assert sim.calls.count("cudaStreamBeginCapture") == (1 if cuda_graph else 0)


def test_every_bound_address_is_aligned_and_each_call_has_its_context(compiled, monkeypatch):
    out, _ = compiled
    gpusim.install(monkeypatch, "11.0")  # plans of another TensorRT: refused from the manifest
    with pytest.raises(BackendError, match="built with TensorRT 10.3.0, this is 11.0.0"):
        Pipeline.load(out, backend="trt")
    sim, _ = gpusim.install(monkeypatch, "10.3")
    pipe = Pipeline.load(out, backend="trt")
    try:
        calls = pipe.backend._calls
        contexts = {id(c.context) for c in calls}
        assert len(contexts) == len(calls)  # one execution context per bound call
        for c in calls:
            for name in c.context._addresses:
                assert c.context.get_tensor_address(name) % 256 == 0
    finally:
        pipe.close()
    assert not sim._device and not sim._pinned  # every allocation freed


def test_failed_capture_falls_back_to_plain_enqueues(compiled, monkeypatch):
    out, ort = compiled
    gpusim.install(monkeypatch, "10.3")
    import cuda.bindings.runtime as imported  # the simulated module

    def refuse(graph, flags):  # e.g. a node type the driver cannot instantiate
        return imported.cudaError_t.cudaErrorNotSupported, None

    monkeypatch.setattr(imported, "cudaGraphInstantiate", refuse)
    with Pipeline.load(out, backend="trt", cuda_graph=True) as pipe:
        images = pipe.generate([0, 1, 2], seed=3)
        assert any("capture failed" in n for n in pipe.backend.notes)
    assert np.abs(images.astype(int) - ort).max() <= 2
    assert imported.cudaGetLastError()[0] == 0  # the capture's error was cleared


def test_closed_pipeline_drops_its_buffers_and_refuses_requests(compiled, monkeypatch):
    out, _ = compiled
    gpusim.install(monkeypatch, "10.3")
    pipe = Pipeline.load(out, backend="trt")
    images = pipe.generate([0], seed=1)
    pipe.close()
    assert pipe.image is None  # not a view of freed pinned memory
    assert images.max() > 0 and np.isfinite(images).all()  # returned images are copies
    with pytest.raises(RequestError, match="closed"):
        pipe.generate([0])
    pipe.close()  # twice is harmless


def test_failure_inside_pipeline_init_releases_the_device(compiled, monkeypatch):
    out, _ = compiled
    sim, _ = gpusim.install(monkeypatch, "10.3")

    def broken(self, s):
        raise BackendError("a graph that does not match its manifest")

    monkeypatch.setattr(Loop, "plan", broken)
    with pytest.raises(BackendError):
        Pipeline.load(out, backend="trt")
    assert not sim._device and not sim._pinned and set(sim._streams) == {0}


def test_cuda_graph_without_tensorrt_is_a_one_line_error(compiled):
    out, _ = compiled
    r = _cli("sample", out, "--classes", "0", "--cuda-graph", "--out", "x.png")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "--backend trt" in r.output.strip().splitlines()[-1]


def test_tensorrt_8_6_is_refused_in_one_line(compiled, monkeypatch):
    """JetPack 6.0's TensorRT: no STRONGLY_TYPED, no BF16 / INT64 (the simulated 8.6 bindings lack them)."""
    out, _ = compiled
    _, trt = gpusim.install(monkeypatch, "8.6")
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    for args in (["compile", out], ["sample", out, "--classes", "0", "--backend", "trt", "--out", "x.png"]):
        r = _cli(*args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "TensorRT 8.6.1 is too old" in r.output and "JetPack >= 6.1" in r.output


# ----------------------------------------------------------------------------
# The simulator's rules (each cites its source in tests/gpusim)
# ----------------------------------------------------------------------------


def test_simulated_calls_match_the_real_bindings():
    real = pytest.importorskip("cuda.bindings.runtime")
    sim = gpusim.SimCuda().module()
    for name in dir(sim):
        if (
            name.startswith("cuda")
            and callable(getattr(sim, name))
            and not isinstance(getattr(sim, name), type)
        ):
            fn = getattr(real, name)
            want = fn.__doc__.split("\n")[0]  # "cudaMemcpyAsync(dst, src, size_t count, kind: ..., stream)"
            params = [
                p.split(":")[0].split()[-1] for p in want[want.index("(") + 1 : -1].split(",") if p.strip()
            ]
            assert list(inspect.signature(getattr(sim, name).__wrapped__).parameters) == params, name


def test_device_memory_rules(monkeypatch):
    sim, _ = gpusim.install(monkeypatch, None)
    from cuda.bindings import runtime as rt

    H2D, D2H = rt.cudaMemcpyKind.cudaMemcpyHostToDevice, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    _, dev = rt.cudaMalloc(100)
    _, stream = rt.cudaStreamCreate()
    assert dev % 256 == 0 and sim.device_view(dev, 100).any()  # aligned, not zeroed
    host = np.arange(25, dtype=np.float32)
    back = np.zeros(25, np.float32)
    assert rt.cudaMemcpyAsync(dev, dev, 100, H2D, stream)[0] != 0  # a device pointer as host memory
    assert rt.cudaMemcpyAsync(dev + 64, host.ctypes.data, 100, H2D, stream)[0] != 0  # past the block
    assert rt.cudaMemcpyAsync(dev, host.ctypes.data, 100, H2D, stream)[0] == 0
    assert rt.cudaMemcpyAsync(back.ctypes.data, dev, 100, D2H, stream)[0] == 0
    assert not back.any()  # queued, not run: nothing has synchronised
    assert rt.cudaStreamSynchronize(stream)[0] == 0
    assert (back == host).all()


def test_capture_records_without_running_and_illegal_calls_invalidate(monkeypatch):
    sim, _ = gpusim.install(monkeypatch, None)
    from cuda.bindings import runtime as rt

    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    _, dev = rt.cudaMalloc(256)
    _, stream = rt.cudaStreamCreate()
    assert rt.cudaStreamBeginCapture(stream, mode)[0] == 0
    assert rt.cudaMemsetAsync(dev, 7, 256, stream)[0] == 0
    err, graph = rt.cudaStreamEndCapture(stream)
    assert err == 0 and not (sim.device_view(dev, 256) == 7).all()  # recorded, not run
    _, exec_ = rt.cudaGraphInstantiate(graph, 0)
    rt.cudaGraphLaunch(exec_, stream)
    rt.cudaStreamSynchronize(stream)
    assert (sim.device_view(dev, 256) == 7).all()  # the launch replays it
    rt.cudaStreamBeginCapture(stream, mode)
    assert rt.cudaMalloc(16)[0] != 0  # prohibited during capture
    err, graph = rt.cudaStreamEndCapture(stream)
    assert err == rt.cudaError_t.cudaErrorStreamCaptureInvalidated and graph is None


def test_tensorrt_names_follow_each_release(monkeypatch):
    sim, trt10 = gpusim.install(monkeypatch, "10.3")
    trt11 = gpusim.trt.make_tensorrt(sim, "11.0")
    assert hasattr(trt10.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    assert not hasattr(trt11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")  # removed in 11
    assert "device_memory_size" in trt10.ICudaEngine._allowed  # deprecated in 10.1, removed in 11
    assert "device_memory_size" not in trt11.ICudaEngine._allowed
    assert "device_memory_size_v2" in trt11.ICudaEngine._allowed


@pytest.mark.parametrize(
    "name",
    [
        "far-mnist",
        pytest.param("mar-mnist", marks=pytest.mark.slow),  # the tiny kinds above cover MAR and causal
        pytest.param("far-mnist-causal", marks=pytest.mark.slow),
    ],
)
def test_shipped_checkpoints_on_simulated_tensorrt(name, monkeypatch, tmp_path):
    """The shipped checkpoints (batch 2, no validation: test_build covers it) compiled and sampled with a
    CUDA graph on TensorRT 11.0 rules give ONNX Runtime's images."""
    from pathlib import Path

    out = tmp_path / name
    ckpt = Path(__file__).resolve().parent.parent / "checkpoints" / name
    r = _cli("build", ckpt, "--out", out, "--batch", "2", "--no-engines", "--no-validate")
    assert r.exit_code == 0, r.output
    ort = np.asarray(Pipeline.load(out).generate([0, 1, 2], seed=5))
    gpusim.install(monkeypatch, "11.0")
    r = _cli("compile", out, "--no-validate")
    assert r.exit_code == 0, r.output
    with Pipeline.load(out, backend="trt", cuda_graph=True) as pipe:
        images = pipe.generate([0, 1, 2], seed=5)
    assert np.abs(images.astype(int) - ort).max() <= 2

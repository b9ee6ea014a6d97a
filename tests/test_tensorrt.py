"""far_export.tensorrt: build keys, the reason plans are not built, and (where TensorRT and a GPU exist)
strongly typed plans validated against ONNX Runtime and reused when nothing changed."""

from __future__ import annotations

from dataclasses import replace

import gpusim
import pytest
from conftest import make_tiny_checkpoint

from far_export.tensorrt import (
    EngineBuildError,
    EngineSettings,
    TensorRTUnavailable,
    build_key,
    compile_directory,
    detect_device,
    plan_name,
)
from runtime.device import DeviceInfo
from runtime.manifest import load_manifest


def _trt_reason() -> str | None:
    try:
        detect_device()
    except TensorRTUnavailable as e:
        return str(e)
    return None


TRT_MISSING = _trt_reason()
DEV = DeviceInfo(
    tensorrt_version="10.3.0",
    gpu_name="Orin",
    compute_capability="8.7",
    sm_count=16,
    total_memory_mb=62_000,
    integrated=True,
    driver_cuda="12.2",
    runtime_cuda="12.6",
)


def test_build_key_changes_only_with_graph_settings_or_device():
    s = EngineSettings()
    key = build_key("a" * 64, s, DEV)
    assert key == build_key("a" * 64, EngineSettings(), DEV)
    assert key != build_key("b" * 64, s, DEV)
    assert key != build_key("a" * 64, EngineSettings(opt_level=5), DEV)
    assert key != build_key("a" * 64, EngineSettings(workspace_gb=1.0), DEV)
    assert key != build_key("a" * 64, s, replace(DEV, gpu_name="H200", compute_capability="9.0"))
    assert key != build_key("a" * 64, s, replace(DEV, tensorrt_version="11.0.0"))
    assert key != build_key("a" * 64, s, replace(DEV, sm_count=8))  # an Orin NX, not the AGX
    assert key == build_key("a" * 64, s, replace(DEV, driver_cuda="12.6"))  # a driver update: plans stay
    assert plan_name("head", DEV) == "head.trt10.3.0.plan"


def test_settings_are_checked():
    with pytest.raises(EngineBuildError, match="0..5"):
        EngineSettings(opt_level=7).check()
    with pytest.raises(EngineBuildError, match="workspace"):
        EngineSettings(workspace_gb=0).check()


@pytest.mark.skipif(TRT_MISSING is None, reason="tensorrt and a GPU are present here")
def test_missing_tensorrt_is_a_typed_one_line_reason():
    assert TRT_MISSING and "\n" not in TRT_MISSING
    with pytest.raises(TensorRTUnavailable):
        detect_device()


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.skipif(TRT_MISSING is not None, reason=f"TensorRT plans cannot be built here: {TRT_MISSING}")
def test_compile_builds_validates_and_reuses_plans(tmp_path):
    from far_export.build import BuildOptions, build

    ckpt = make_tiny_checkpoint(tmp_path / "ckpt")
    out = tmp_path / "engines"
    build(ckpt, out, BuildOptions(batch=2, engines=False, end_to_end=False), log=lambda s: None)
    lines: list[str] = []
    m = compile_directory(out, EngineSettings(workspace_gb=1.0), log=lines.append)
    dev = detect_device()
    assert set(m.engines) == set(m.graphs)
    for name, e in m.engines.items():
        assert (out / e.file).is_file() and e.onnx_sha256 == m.graphs[name].sha256
        assert (e.tensorrt_version, e.gpu_name, e.compute_capability) == (
            dev.tensorrt_version,
            dev.gpu_name,
            dev.compute_capability,
        )
        assert e.settings["strongly_typed"] and e.settings["validation"]["passed"]
    assert load_manifest(out).engines == m.engines
    plans = [line for line in lines if "TensorRT plan" in line]
    assert len(plans) == len(m.graphs) and all(line.startswith("build ") for line in plans), lines
    lines.clear()
    compile_directory(out, EngineSettings(workspace_gb=1.0), log=lines.append)
    plans = [line for line in lines if "TensorRT plan" in line]
    # same graphs, same settings: no rebuild (every graph: 4 + the encoder variants)
    assert len(plans) == len(m.graphs) and all(line.startswith("reuse ") for line in plans), lines


# ----------------------------------------------------------------------------
# The orchestration (keys, reuse, staging, validation, manifest) on the simulated GPU and TensorRT
# (tests/gpusim): the real build_plan / validate_plan calls, run everywhere
# ----------------------------------------------------------------------------


@pytest.fixture
def fake_trt(monkeypatch):
    """A simulated H200 with TensorRT 10.3; counts plan builds and validations by graph."""
    import far_export.tensorrt as trt_mod

    sim, _ = gpusim.install(monkeypatch, "10.3")
    calls: dict[str, list[str]] = {"build": [], "validate": [], "fail": []}
    build_plan, validate_plan = trt_mod.build_plan, trt_mod.validate_plan

    def counted_build(onnx_path, *args, **kwargs):
        calls["build"].append(onnx_path.name)
        return build_plan(onnx_path, *args, **kwargs)

    def counted_validate(onnx_path, plan_path, graph, *args, **kwargs):
        calls["validate"].append(graph)
        if graph in calls["fail"]:  # a plan whose kernels differ: what the simulator's cannot
            raise EngineBuildError(f"the TensorRT plan of the {graph} graph differs from ONNX Runtime")
        return validate_plan(onnx_path, plan_path, graph, *args, **kwargs)

    monkeypatch.setattr(trt_mod, "build_plan", counted_build)
    monkeypatch.setattr(trt_mod, "validate_plan", counted_validate)
    return calls


@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    from far_export.build import BuildOptions, build

    root = tmp_path_factory.mktemp("trt")
    ckpt = make_tiny_checkpoint(root / "ckpt")
    out = root / "engines"
    build(
        ckpt, out, BuildOptions(batch=1, engines=False, validate=False, end_to_end=False), log=lambda s: None
    )
    return out


def test_compile_records_engines_reuses_and_rebuilds_on_change(engine_dir, fake_trt):
    import shutil

    out = engine_dir.parent / "compile1"
    shutil.copytree(engine_dir, out)
    m = compile_directory(out, EngineSettings(workspace_gb=1.0))
    assert set(m.engines) == set(m.graphs) and m.timing_cache == "timing.trt10.3.0.sm9.0.cache"
    for name, e in m.engines.items():
        assert e.file == f"{name}.trt10.3.0.plan" and (out / e.file).is_file()
        assert (e.gpu_name, e.compute_capability, e.onnx_sha256) == (
            "NVIDIA H200",
            "9.0",
            m.graphs[name].sha256,
        )
        assert (e.sm_count, e.total_memory_mb) == (132, 137_110)  # tells an Orin AGX from an NX
        assert e.settings["validation"]["passed"] and e.settings["validation"]["inputs"] == 2
    assert load_manifest(out).engines == m.engines
    assert len(fake_trt["build"]) == len(m.graphs)
    compile_directory(out, EngineSettings(workspace_gb=1.0))
    assert len(fake_trt["build"]) == len(m.graphs)  # unchanged key: nothing rebuilt
    compile_directory(out, EngineSettings(workspace_gb=2.0))
    assert len(fake_trt["build"]) == 2 * len(m.graphs)  # new settings: every plan rebuilt
    assert not list(out.glob("*.new"))


def test_failed_plan_validation_leaves_plans_and_manifest_as_they_were(engine_dir, fake_trt):
    import shutil

    out = engine_dir.parent / "compile2"
    shutil.copytree(engine_dir, out)
    compile_directory(out, EngineSettings(workspace_gb=1.0))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    fake_trt["fail"] = ["head"]
    with pytest.raises(EngineBuildError, match="head graph"):
        compile_directory(out, EngineSettings(workspace_gb=3.0))
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith("timing.")} == {
        k: v for k, v in before.items() if not k.startswith("timing.")
    }


def test_build_with_engines_reuses_plans_of_the_previous_build(engine_dir, fake_trt, tmp_path):
    from far_export.build import BuildOptions, build

    ckpt = engine_dir.parent / "ckpt"
    out = tmp_path / "eng"
    opts = BuildOptions(batch=1, validate=False, end_to_end=False, require_engines=True)
    lines: list[str] = []
    m = build(ckpt, out, opts, log=lines.append)
    assert set(m.engines) == set(m.graphs) and len(fake_trt["build"]) == len(m.graphs)
    build(ckpt, out, opts, log=lines.append)  # same graphs (the export is deterministic), same settings
    assert len(fake_trt["build"]) == len(m.graphs)
    assert sum(line.startswith("reuse TensorRT plan") for line in lines) == len(m.graphs)


def test_compile_without_onnxruntime_says_it_skips_plan_validation(
    engine_dir, fake_trt, monkeypatch, tmp_path
):
    import shutil
    import sys

    out = tmp_path / "compile3"
    shutil.copytree(engine_dir, out)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # importlib.util.find_spec: not installed
    lines: list[str] = []
    m = compile_directory(out, EngineSettings(workspace_gb=1.0), log=lines.append)
    skipped = [
        line for line in lines if line.startswith("plan validation skipped: onnxruntime not installed")
    ]
    assert len(skipped) == 1 and fake_trt["validate"] == [], lines
    assert all(e.settings["validation"] == {} for e in m.engines.values())

"""far_export.tensorrt: build keys, the reason plans are not built, and (where TensorRT and a GPU exist)
strongly typed plans validated against ONNX Runtime and reused when nothing changed."""

from __future__ import annotations

import pytest
from conftest import make_tiny_checkpoint

from far_export.tensorrt import (
    Device,
    EngineBuildError,
    EngineSettings,
    TensorRTUnavailable,
    build_key,
    compile_directory,
    detect_device,
    plan_name,
)
from runtime.manifest import load_manifest


def _trt_reason() -> str | None:
    try:
        detect_device()
    except TensorRTUnavailable as e:
        return str(e)
    return None


TRT_MISSING = _trt_reason()
DEV = Device(tensorrt_version="10.3.0", gpu_name="Orin", compute_capability="8.7")


def test_build_key_changes_only_with_graph_settings_or_device():
    s = EngineSettings()
    key = build_key("a" * 64, s, DEV)
    assert key == build_key("a" * 64, EngineSettings(), DEV)
    assert key != build_key("b" * 64, s, DEV)
    assert key != build_key("a" * 64, EngineSettings(opt_level=5), DEV)
    assert key != build_key("a" * 64, EngineSettings(workspace_gb=1.0), DEV)
    assert key != build_key("a" * 64, s, Device("10.3.0", "H200", "9.0"))
    assert key != build_key("a" * 64, s, Device("11.0.0", "Orin", "8.7"))
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
            dev.tensorrt_version, dev.gpu_name, dev.compute_capability)
        assert e.settings["strongly_typed"] and e.settings["validation"]["passed"]
    assert load_manifest(out).engines == m.engines
    assert all(line.startswith("build ") for line in lines)
    lines.clear()
    compile_directory(out, EngineSettings(workspace_gb=1.0), log=lines.append)
    assert all(line.startswith("reuse ") for line in lines), lines  # same graphs, same settings: no rebuild

"""One copy of the backbone's weights: the backbone and its encoder variants read one weights file, the
ONNX Runtime sessions one in-memory copy of it, and a changed or older directory is refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from runtime_engines import built_engines

from runtime.manifest import SHARED_WEIGHTS_FILE, ManifestError, load_manifest
from runtime.ort import OrtBackend


def _copy(engines, tmp_path):
    d = tmp_path / "engines"
    shutil.copytree(engines, d)
    return d


def test_one_weights_file_for_backbone_and_variants(tmp_path_factory):
    _, engines = built_engines(tmp_path_factory, "masked", "shortcut")
    m = load_manifest(engines)
    sw = m.shared_weights
    assert sw is not None and sw.file == SHARED_WEIGHTS_FILE
    assert set(sw.graphs) == {"backbone", *m.encoder_variants.values()} and len(sw.graphs) >= 2
    weights = (engines / SHARED_WEIGHTS_FILE).stat().st_size
    backbone = sum(t[1] for t in sw.tensors["backbone"].values())
    entries = {e for t in sw.tensors.values() for e in t.values()}
    # each distinct tensor once, 64-byte aligned: the backbone's weights plus the few constants the
    # exporter made differently for the variants (the tiny preset: 43 KB of 128 KB), not 4 copies
    assert sum(e[1] for e in entries) <= weights < sum(e[1] for e in entries) + 64 * len(entries)
    assert weights < 1.5 * backbone
    for name in sw.graphs:
        # the variants' parameters are the backbone's, stored once (same offsets)
        assert sum(e[1] for e in sw.tensors[name].values() if e in set(sw.tensors["backbone"].values())) > (
            0.6 * backbone
        )
        # the graph file itself holds no large initializer
        model = onnx.load(str(engines / m.graphs[name].file), load_external_data=False)
        inline = [i for i in model.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL]
        assert all(len(i.raw_data) < 1024 for i in inline)


def test_sessions_get_the_shared_buffer(tmp_path_factory):
    """The sessions' initializers are OrtValues over one buffer read once from the weights file, and the
    graphs compute the same as ONNX Runtime loading the external data itself."""
    import onnxruntime as ort

    _, engines = built_engines(tmp_path_factory, "masked", "shortcut")
    m = load_manifest(engines)
    backend = OrtBackend(engines, m, threads=1)
    names = list(m.shared_weights.graphs)
    graphs = {n: backend.graph(n) for n in names}
    shared = backend._shared
    assert shared is not None and shared._buffer is not None
    assert shared._buffer.nbytes == (engines / SHARED_WEIGHTS_FILE).stat().st_size
    # one OrtValue per distinct tensor, however many graphs use it
    assert len(shared._values) == len({e for t in m.shared_weights.tensors.values() for e in t.values()})
    rng = np.random.default_rng(0)
    for n in names:
        spec = m.graphs[n]
        feeds = {}
        for t in spec.inputs:
            if t.dtype == "int64":
                hi = m.model.seq_len if t.name in ("query", "known") else m.model.num_classes
                feeds[t.name] = rng.integers(0, hi, t.shape).astype(np.int64)
            else:
                feeds[t.name] = rng.random(t.shape, dtype=np.float32)
        got = graphs[n].session.run(None, feeds)[0]
        plain = ort.InferenceSession(str(engines / spec.file), providers=["CPUExecutionProvider"])
        want = plain.run(None, feeds)[0]
        scale = max(1.0, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 1e-5 * scale


def test_changed_weights_file_is_refused(tmp_path_factory, tmp_path):
    _, engines = built_engines(tmp_path_factory, "masked", "shortcut")
    d = _copy(engines, tmp_path)
    with open(d / SHARED_WEIGHTS_FILE, "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ManifestError, match="weights file .* does not match its sha256"):
        load_manifest(d)
    (d / SHARED_WEIGHTS_FILE).unlink()
    with pytest.raises(ManifestError, match="missing; rebuild"):
        load_manifest(d)


def test_older_schema_is_refused_with_rebuild(tmp_path_factory, tmp_path):
    _, engines = built_engines(tmp_path_factory, "masked", "shortcut")
    d = _copy(engines, tmp_path)
    raw = json.loads((d / "manifest.json").read_text())
    raw["schema_version"] = 3
    del raw["shared_weights"]
    (d / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ManifestError, match="schema 3 is older .*rebuild with far-export build"):
        load_manifest(d)


def test_tensor_outside_the_weights_file_is_refused(tmp_path_factory, tmp_path):
    _, engines = built_engines(tmp_path_factory, "masked", "shortcut")
    d = _copy(engines, tmp_path)
    raw = json.loads((d / "manifest.json").read_text())
    name, entry = next(iter(raw["shared_weights"]["tensors"]["backbone"].items()))
    raw["shared_weights"]["tensors"]["backbone"][name] = [1 << 30, *entry[1:]]
    (d / "manifest.json").write_text(json.dumps(raw))
    backend = OrtBackend(d, load_manifest(d), threads=1)
    with pytest.raises(ManifestError, match="is not in .*backbone.weights"):
        backend.graph("backbone")


def test_plans_are_keyed_on_the_shared_weights(tmp_path_factory):
    """A backbone .onnx file is the same for every checkpoint of one architecture once its weights are in
    backbone.weights: what a TensorRT plan is keyed on (far_export/tensorrt.py build_key) includes them."""
    import dataclasses

    _, engines = built_engines(tmp_path_factory, "masked", "shortcut")
    m = load_manifest(engines)
    other = m.replace(shared_weights=dataclasses.replace(m.shared_weights, sha256="0" * 64))
    for name in m.graphs:
        shared = name in m.shared_weights.graphs
        assert (m.content_sha256(name) != other.content_sha256(name)) == shared
        assert (m.content_sha256(name) == m.graphs[name].sha256) != shared

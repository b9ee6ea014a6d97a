"""`far-export budget`: the counts against hand-computed ones, on a real torch.onnx export and on the tiny
engine directory."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import numpy_helper
from runtime_engines import built_engines

from far_export.budget import engine_budget, graph_cost
from far_export.cli import cli
from far_export.devices import DEVICES, Device


class LinearConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(8, 16)
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), self.conv(y)


def test_counts_of_a_hand_computed_graph(tmp_path):
    path = tmp_path / "g.onnx"
    x, y = torch.zeros(2, 5, 8), torch.zeros(1, 3, 6, 6)
    torch.onnx.export(LinearConv().eval(), (x, y), str(path), opset_version=18, dynamo=True)
    cost, _ = graph_cost(path)
    linear = 2 * (2 * 5) * 8 * 16  # 2 FLOPs x rows x in x out
    conv = 2 * (4 * 6 * 6) * (3 * 3 * 3)  # 2 FLOPs x output elements x (Cin x kh x kw)
    assert cost.flops == linear + conv
    assert cost.weight_bytes == 4 * (8 * 16 + 16 + 4 * 3 * 3 * 3 + 4)
    assert cost.io_bytes == 4 * (2 * 5 * 8 + 3 * 6 * 6 + 2 * 5 * 16 + 4 * 6 * 6)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    return built_engines(tmp_path_factory, "masked", "shortcut")[1]


def test_engine_directory_budget(engines):
    """Tiny masked model, batch 2, num_iter 4, K = 2: per image 4 / 2 backbone calls (over the variants),
    4 x 2 / 2 head calls, 4 / 2 updates, 1 / 2 VAE decodes; the shared backbone weights count once."""
    unit = Device(
        "unit", memory=1e9, bandwidth=1e9, peaks=dict.fromkeys(("fp32", "fp16", "bf16", "int8"), 1e9)
    )
    b = engine_budget(engines, devices=(unit,))
    calls = {g.name: g.calls_per_image for g in b.graphs}
    backbones = sum(v for k, v in calls.items() if k.startswith("backbone"))
    assert (backbones, calls["head"], calls["update"], calls["vae_decoder"]) == (2, 4, 2, 0.5)

    # what the directory holds: the shared weights file once, and each graph's own (inline) tensors
    held = (engines / "backbone.weights").stat().st_size
    for g in b.graphs:
        model = onnx.load(str(engines / f"{g.name}.onnx"), load_external_data=False)
        held += sum(
            numpy_helper.to_array(i).nbytes
            for i in model.graph.initializer
            if i.data_location != onnx.TensorProto.EXTERNAL
        )
        held += sum(
            numpy_helper.to_array(n.attribute[0].t).nbytes
            for n in model.graph.node
            if n.op_type == "Constant"
        )
    assert b.weight_bytes == held
    assert b.weight_bytes < sum(g.weight_bytes for g in b.graphs)  # the variants share the backbone's

    (d,) = b.devices
    assert d.compute_s == pytest.approx(b.flops_per_image / 1e9)
    assert d.memory_s == pytest.approx(b.traffic_per_image / 1e9)
    assert d.fits and d.memory_share == pytest.approx(b.memory_bytes / 1e9)


def test_budget_cli(engines, tmp_path):
    r = CliRunner().invoke(cli, ["budget", str(engines), "--head-steps", "1"])
    assert r.exit_code == 0, r.output
    for device in DEVICES:
        assert device.name in r.output
    r = CliRunner().invoke(cli, ["budget", str(engines), "--json"])
    d = json.loads(r.output)
    assert d["settings"]["head_steps"] == 2 and len(d["devices"]) == len(DEVICES)
    assert np.isfinite([x["memory_bound_ms"] for x in d["devices"]]).all()
    r = CliRunner().invoke(cli, ["budget", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli, ["budget", str(engines), "--head-steps", "99"])
    assert r.exit_code == 1 and "Traceback" not in r.output

"""K shortcut head steps as K calls of the one-step head graph vs one graph that unrolls all K.

    python benchmarks/fused_head.py [--checkpoint checkpoints/far-mnist] [-k 4] [--batch 1] [--reps 5]

Whether a fused head would pay (the build exports the one-step graph; the runtime calls it K times):
both graphs are exported from the checkpoint's own `ShortcutHeadStep` (training/model.py) with the
build's exporter settings at the build's head shapes (batch images x Q rows, CFG doubling on), the fused
one with t_k = k/K and d = 1/K as constants. ONNX Runtime CPU, one thread, the two taking turns
(interleaved) for `--reps` rounds of `--calls` timed K-step runs each; prints the medians, their ratio
and the largest difference between the two outputs relative to max(1, max|x|).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import onnxruntime as ort
    import torch
    from torch import nn

    from far_export.export import OPSET, _quiet, export_graph
    from far_export.graphs import GraphShapes, graph_specs, model_info
    from far_export.validate import random_feeds
    from training.checkpoint import load_checkpoint
    from training.model import ShortcutHeadStep

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="checkpoints/far-mnist")
    ap.add_argument("-k", "--head-steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--calls", type=int, default=200)
    a = ap.parse_args()
    K = a.head_steps
    ckpt = load_checkpoint(a.checkpoint)
    cfg = ckpt.cfg
    if cfg.head != "shortcut":
        raise SystemExit(f"{a.checkpoint} has a {cfg.head} head; the fused graph is for the shortcut head")
    shapes = GraphShapes.for_config(cfg, a.batch, guided=True)
    io_ = graph_specs(cfg, shapes)["head"]
    step = ShortcutHeadStep(ckpt.model, True).eval()

    class Fused(nn.Module):
        def __init__(self):
            super().__init__()
            self.step = step

        def forward(self, x, z, cfg_scale):
            d = torch.full((1,), 1.0 / K)
            for k in range(K):
                x = self.step(x, torch.full((1,), k / K), d, z, cfg_scale)
            return x

    feed = random_feeds(model_info(cfg, shapes), io_, count=1)[0]
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    with tempfile.TemporaryDirectory() as tmp:
        one = export_graph(step, io_, Path(tmp) / "head.onnx", feed)
        fused_path = Path(tmp) / f"head_k{K}.onnx"
        args = tuple(torch.from_numpy(feed[n]) for n in ("x", "z", "cfg"))
        with _quiet(), torch.no_grad():
            torch.onnx.export(
                Fused().eval(),
                args,
                dynamo=True,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                input_names=["x", "z", "cfg"],
                output_names=["x_next"],
            ).save(str(fused_path))
        s1 = ort.InferenceSession(str(one), opts, providers=["CPUExecutionProvider"])
        sk = ort.InferenceSession(str(fused_path), opts, providers=["CPUExecutionProvider"])

    def k_calls() -> np.ndarray:
        x = feed["x"]
        for k in range(K):
            f = {**feed, "x": x, "t": np.array([k / K], np.float32), "d": np.array([1.0 / K], np.float32)}
            x = s1.run(None, f)[0]
        return x

    def fused() -> np.ndarray:
        return sk.run(None, {"x": feed["x"], "z": feed["z"], "cfg": feed["cfg"]})[0]

    ref, got = k_calls(), fused()
    diff = float(np.abs(ref - got).max()) / max(1.0, float(np.abs(ref).max()))
    times: dict[str, list[float]] = {"K calls": [], "fused": []}
    for _ in range(a.reps):
        for name, fn in (("K calls", k_calls), ("fused", fused)):
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            times[name].append((time.perf_counter() - t0) / a.calls)
    m1, mk = statistics.median(times["K calls"]), statistics.median(times["fused"])
    N = io_.inputs[0].shape[0]
    print(f"{a.checkpoint}: K={K}, batch {a.batch} ({N} head rows, CFG doubling), ONNX Runtime CPU 1 thread")
    print(f"  {K} calls of head.onnx: {m1 * 1e3:.3f} ms; one call of head_k{K}.onnx: {mk * 1e3:.3f} ms")
    print(f"  fused speed-up {m1 / mk:.2f}x; max |difference| {diff:.1e} x max(1, max|x|)")
    print(f"  medians of {a.reps} interleaved rounds of {a.calls} K-step runs")


if __name__ == "__main__":
    main()

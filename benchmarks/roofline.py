"""Against the limit: the FLOPs FAR's fp32 graphs execute per image (far_export/budget.py) over the time
the runtime takes, as a fraction of this machine's measured matrix-multiply rate."""

from __future__ import annotations

from benchmarks.common import FAR, Settings, alternate, engine_dir, open_pipe, table, timed
from far_export.budget import graph_flops

TITLE = "5. against the limit"
KEY = "roofline"


def matmul_peak(threads: int, reps: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate (FLOP/s) on `threads` threads: the best of PyTorch's
    (MKL/oneDNN) and ONNX Runtime's (MLAS) square matmuls of a few sizes."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["a", "b"], ["c"])],
            "matmul",
            [helper.make_tensor_value_info(k, TensorProto.FLOAT, [n, n]) for k in ("a", "b")],
            [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        feeds = {"a": a.numpy(), "b": b.numpy()}
        for fn in (lambda a=a, b=b: a @ b, lambda sess=sess, feeds=feeds: sess.run(None, feeds)):
            for _ in range(3):
                fn()
            best = max(best, 2 * n**3 / min(timed(fn) for _ in range(reps)))
    return best


def run(s: Settings) -> tuple[str, list[dict]]:
    from runtime.manifest import is_variant, load_manifest
    from runtime.pipeline import steps_per_batch

    peak = matmul_peak(s.threads, reps=3 if s.quick else 10)
    rows, results = [], []
    for batch in [1] if s.quick else [1, 64]:
        d = engine_dir(FAR, "fp32", batch)
        m = load_manifest(d)
        f = {g: graph_flops(d / spec.file) for g, spec in m.graphs.items()}
        k = m.model.head_steps
        calls = steps_per_batch(m, m.model.num_iter, k)  # the full backbone or an encoder variant per step
        backbone = sum(f[g] * n for g, n in calls.items() if g == "backbone" or is_variant(g))
        per_image = (backbone + f["head"] * calls["head"] + f["vae_decoder"]) / batch
        pipe = open_pipe(d, s.threads)
        classes = [i % m.model.num_classes for i in range(batch)]

        def generate(pipe=pipe, classes=classes) -> None:
            pipe.generate(classes, seed=0)

        t = alternate({"run": generate}, s.reps)["run"] / batch
        pipe.close()
        frac = per_image / t / peak
        results.append(
            {
                "batch": batch,
                "flops_per_image": per_image,
                "s_per_image": t,
                "peak_flops": peak,
                "fraction_of_peak": frac,
                "graph_flops": f,
            }
        )
        rows.append(
            [
                batch,
                per_image / 1e6,
                backbone / batch / 1e6,
                f["head"] * calls["head"] / batch / 1e6,
                f["vae_decoder"] / batch / 1e6,
                t * 1e3,
                per_image / t / 1e9,
                f"{100 * frac:.1f}%",
            ]
        )
    return table(
        f"Against the limit: FAR (K={k}), ONNX Runtime fp32; measured matmul peak {peak / 1e9:.0f} GFLOP/s "
        f"on {s.threads} thread(s)",
        ["batch", "MFLOP / image", "backbone", "head", "VAE", "ms / image", "GFLOP/s achieved", "of peak"],
        rows,
    ), results

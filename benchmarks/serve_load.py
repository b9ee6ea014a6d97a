"""Load benchmark of `far-export serve`: 1, 8 and 32 concurrent clients through a real tritonserver vs
`Pipeline.generate` in this process on the same engines, in one run.

    python benchmarks/serve_load.py ENGINE_DIR [--requests 32] [--threads 2]

Each client is its own process (spawned) sending one-image requests (class, seed, index) over HTTP;
client c's j-th request is image c * requests + j of seed 0, so every served image is compared with the
direct one. Prints images/s, p50 and p99 latency, the mean batch Triton formed (its statistics), the
ratio to the direct batched throughput, and whether every image was equal.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from far_export.serve import MODEL, ServeOptions, TritonProcess, free_port, write_repository  # noqa: E402
from runtime.pipeline import Pipeline  # noqa: E402


def _client(url: str, keys: list[tuple[int, int]], out: mp.Queue, ready: mp.Queue, go: Any) -> None:
    ready.put(None)
    go.wait()  # every client started and imported: the clock starts with the first request
    latencies, images = [], []
    for cls, index in keys:
        body = {
            "inputs": [
                {"name": "class", "shape": [1, 1], "datatype": "INT64", "data": [cls]},
                {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [0]},
                {"name": "index", "shape": [1, 1], "datatype": "INT64", "data": [index]},
            ],
            "outputs": [{"name": "image"}],
        }
        req = urllib.request.Request(
            f"{url}/v2/models/{MODEL}/infer", json.dumps(body).encode(), method="POST"
        )
        t0 = time.perf_counter()
        with urllib.request.urlopen(req, timeout=600) as r:
            o = json.loads(r.read())["outputs"][0]
        latencies.append(time.perf_counter() - t0)
        images.append((index, np.asarray(o["data"], np.uint8).reshape(o["shape"])[0]))
    out.put((latencies, images))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine_dir")
    ap.add_argument("--requests", type=int, default=32, help="requests per client")
    ap.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads, both sides")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--queue-delay-us", type=int, default=ServeOptions.queue_delay_us)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    total = max(clients) * args.requests

    pipe = Pipeline.load(args.engine_dir, threads=args.threads)
    num_classes = pipe.model.num_classes
    labels = [i % num_classes for i in range(total)]
    pipe.generate(labels[: pipe.B])  # warm-up
    t0 = time.perf_counter()
    direct = pipe.generate(labels, seed=0)
    direct_rate = total / (time.perf_counter() - t0)
    pipe.close()
    print(f"direct Pipeline.generate, batch {pipe.B}: {direct_rate:.2f} images/s ({total} images)")

    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        repo = write_repository(
            args.engine_dir,
            Path(tmp) / "repo",
            ServeOptions(threads=args.threads, queue_delay_us=args.queue_delay_us),
            copy=False,
        )
        with TritonProcess(repo, "127.0.0.1", free_port()) as server:
            server.wait_ready(300)
            print("clients  images/s  ratio  p50_ms  p99_ms  mean_batch  equal")
            for n in clients:
                count = args.requests
                before = server.statistics()["model_stats"][0]
                q: mp.Queue = ctx.Queue()
                ready: mp.Queue = ctx.Queue()
                go = ctx.Event()
                procs = []
                for c in range(n):
                    keys = [(labels[c * count + j], c * count + j) for j in range(count)]
                    procs.append(ctx.Process(target=_client, args=(server.url, keys, q, ready, go)))
                for p in procs:
                    p.start()
                for _ in procs:
                    ready.get(timeout=600)
                t0 = time.perf_counter()
                go.set()
                results = [q.get(timeout=3600) for _ in procs]
                wall = time.perf_counter() - t0
                for p in procs:
                    p.join(60)
                after = server.statistics()["model_stats"][0]
                lat = np.array([x for r, _ in results for x in r]) * 1000
                equal = all(np.array_equal(im, direct[i]) for _, ims in results for i, im in ims)
                execs = after["execution_count"] - before["execution_count"]
                infs = after["inference_count"] - before["inference_count"]
                rate = n * count / wall
                print(
                    f"{n:7d}  {rate:8.2f}  {rate / direct_rate:5.2f}  {np.percentile(lat, 50):6.0f}  "
                    f"{np.percentile(lat, 99):6.0f}  {infs / max(execs, 1):10.2f}  {equal}"
                )


if __name__ == "__main__":
    main()

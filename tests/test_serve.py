"""`far-export serve`: a real tritonserver (the nvidia-pytriton wheel's) on a free loopback port, serving the
tiny batch-2 engines through the Python backend. One server for the module; every wait is bounded."""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib.util
import io
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from runtime_engines import built_engines

from far_export.serve import MODEL, ServeOptions, TritonProcess, free_port, write_repository
from runtime.errors import RequestError
from runtime.pipeline import Pipeline

pytestmark = pytest.mark.skipif(
    shutil.which("tritonserver") is None and importlib.util.find_spec("pytriton") is None,
    reason="no tritonserver: install the serve extra (scripts/test.sh does)",
)


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Path:
    return built_engines(tmp_path_factory, "masked", "shortcut")[1]


# PATH as a user has it who runs .venv/bin/far-export without activating the environment: its python3 is
# another interpreter (the Python backend's stub finds its own by PATH).
ENV_OUTSIDE = {
    **os.environ,
    "PATH": os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and Path(p) != Path(sys.executable).parent
    ),
}


@pytest.fixture(scope="module")
def server(engines, tmp_path_factory):
    repo = write_repository(engines, tmp_path_factory.mktemp("serve") / "repo", ServeOptions(threads=1))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", ENV_OUTSIDE["PATH"])
        s = TritonProcess(repo, "127.0.0.1", free_port())
    with s:
        s.wait_ready(timeout=120)
        yield s


def infer(url: str, classes, seeds, indices=None, timeout: float = 60.0) -> tuple[int, dict]:
    n = len(classes)
    inputs = [
        {"name": "class", "shape": [n, 1], "datatype": "INT64", "data": list(classes)},
        {"name": "seed", "shape": [n, 1], "datatype": "INT64", "data": list(seeds)},
    ]
    if indices is not None:
        inputs.append({"name": "index", "shape": [n, 1], "datatype": "INT64", "data": list(indices)})
    body = json.dumps({"inputs": inputs, "outputs": [{"name": "image"}]}).encode()
    req = urllib.request.Request(f"{url}/v2/models/{MODEL}/infer", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def image_of(response: dict) -> np.ndarray:
    out = next(o for o in response["outputs"] if o["name"] == "image")
    return np.asarray(out["data"], dtype=np.uint8).reshape(out["shape"])


def test_rows_do_not_depend_on_their_batch(engines):
    """Row (class, seed, index) gives the image generate gives it, in any batch and whatever shares it."""
    with Pipeline.load(engines, threads=1) as pipe:
        s = pipe.settings()
        direct = pipe.generate([3, 1, 2], seed=11)  # images 0, 1, 2 of seed 11
        alone = pipe.generate_rows([1], [11], [1], s)
        mixed = pipe.generate_rows([2, 2], [11, 4], [2, 9], s)
        other = pipe.generate([0] * 9 + [2], seed=4)[9]  # image 9 of seed 4, class 2
        assert np.array_equal(alone[0], direct[1])
        assert np.array_equal(mixed[0], direct[2])
        assert np.array_equal(mixed[1], other)
        with pytest.raises(RequestError, match="seed -1"):
            pipe.generate_rows([1], [-1], [0], s)
        with pytest.raises(RequestError, match="one of each"):
            pipe.generate_rows([1, 2], [0], [0, 1], s)


def test_images_equal_sample(server, engines):
    with Pipeline.load(engines, threads=1) as pipe:
        direct = pipe.generate([3, 2, 1], seed=7)
    status, r = infer(server.url, [3, 2], [7, 7])  # index defaults to 0..n-1
    assert status == 200, r
    assert np.array_equal(image_of(r), direct[:2])
    status, r = infer(server.url, [1], [7], [2])
    assert status == 200, r
    assert np.array_equal(image_of(r)[0], direct[2])


def test_png_output(server):
    n = 2
    body = {
        "inputs": [
            {"name": "class", "shape": [n, 1], "datatype": "INT64", "data": [1, 3]},
            {"name": "seed", "shape": [n, 1], "datatype": "INT64", "data": [5, 5]},
            {"name": "png", "shape": [n, 1], "datatype": "BOOL", "data": [True, True]},
        ]
    }
    req = urllib.request.Request(
        f"{server.url}/v2/models/{MODEL}/infer", data=json.dumps(body).encode(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        response = json.loads(r.read())
    out = next(o for o in response["outputs"] if o["name"] == "png")
    files = np.asarray(out["data"], dtype=np.uint8).reshape(out["shape"])
    images = image_of(response)
    for f, im in zip(files, images):
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(f.tobytes())).convert("RGB")), im)


def test_concurrent_clients_are_batched_and_unchanged(server, engines):
    rows = [(c % 4, 100 + c, c) for c in range(8)]
    with Pipeline.load(engines, threads=1) as pipe:
        s = pipe.settings()
        direct = [pipe.generate_rows([c], [seed], [i], s)[0] for c, seed, i in rows]
    before = server.statistics()["model_stats"][0]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda row: infer(server.url, [row[0]], [row[1]], [row[2]]), rows))
    for (status, r), want in zip(results, direct):
        assert status == 200, r
        assert np.array_equal(image_of(r)[0], want)
    after = server.statistics()["model_stats"][0]
    executions = after["execution_count"] - before["execution_count"]
    inferences = after["inference_count"] - before["inference_count"]
    assert inferences == 8
    assert executions < 8, "Triton formed no batch of more than one request"


@pytest.mark.parametrize(
    "classes, seeds, indices, match",
    [
        ([10], [0], None, "class 10 is out of range"),
        ([1], [-3], None, "seed -3 is negative"),
        ([1], [0], [-1], "index -1 is negative"),
    ],
)
def test_bad_requests_name_the_problem(server, classes, seeds, indices, match):
    status, r = infer(server.url, classes, seeds, indices)
    assert status == 400 and match in r["error"], r


def test_wrong_dtype_and_missing_input(server):
    body = json.dumps(
        {"inputs": [{"name": "class", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]}
    ).encode()
    req = urllib.request.Request(f"{server.url}/v2/models/{MODEL}/infer", data=body, method="POST")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 400
    assert "class" in json.loads(e.value.read())["error"]
    status, r = infer(server.url, [1], [0])  # and it still serves
    assert status == 200


def test_bad_and_good_requests_in_one_batch(server):
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(infer, server.url, [c], [0]) for c in (1, 99, 2, 99)]
        results = [f.result(timeout=60) for f in futures]
    assert [s for s, _ in results] == [200, 400, 200, 400]


def test_a_full_queue_rejects_instead_of_growing(engines, tmp_path):
    """With room for one waiting request, a burst of 32 gets 503 "Exceeds maximum queue size" for most of
    them; the admitted ones are served."""
    repo = write_repository(engines, tmp_path / "repo", ServeOptions(threads=1, max_queue=1))
    with TritonProcess(repo, "127.0.0.1", free_port()) as s:
        s.wait_ready(timeout=120)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(lambda i: infer(s.url, [i % 4], [i]), range(32)))
    statuses = [status for status, _ in results]
    assert set(statuses) == {200, 503}, statuses
    rejected = [body for status, body in results if status == 503]
    assert all("Exceeds maximum queue size" in body["error"] for body in rejected), rejected[0]


def grpc_infer_inputs(grpcclient, cls: int, seed: int) -> list:
    inputs = [grpcclient.InferInput(name, [1, 1], "INT64") for name in ("class", "seed")]
    for i, v in zip(inputs, (cls, seed)):
        i.set_data_from_numpy(np.array([[v]], np.int64))
    return inputs


# The tiny model's most AR steps (one per token of its 64) and 64 head steps: about 1 s a request here, so
# a cancel lands mid-run.
SLOW = {"num_iter": 64, "head_steps": 64}
STOPPED = re.compile(r"far: cancelled, batch stopped after AR step (\d+) of (\d+)")


def test_grpc_cancel_stops_the_model_mid_run_and_it_serves_on(engines, tmp_path):
    """Requests given up a quarter into their run. Cancelled over gRPC, or past a gRPC deadline: the model
    stops after an AR step before its last (its line in the server log) and Triton's statistics show the
    request took under half a full one. A client that drops its HTTP connection cancels nothing: the
    model never sees it cancelled. The next request is served bit for bit."""
    import tritonclient.grpc as grpcclient

    with Pipeline.load(engines, threads=1) as pipe:
        direct = pipe.generate_rows([1, 3], [0, 5], [0, 0], pipe.settings(**SLOW))
    repo = write_repository(engines, tmp_path / "repo", ServeOptions(threads=1, settings=SLOW))
    port = free_port()
    with TritonProcess(repo, "127.0.0.1", port) as s, contextlib.ExitStack() as stack:
        s.wait_ready(timeout=120)
        client = grpcclient.InferenceServerClient(s.grpc_address)
        stack.callback(client.close)

        def took(ask, lines: int) -> tuple[int, list[tuple[str, str]]]:
            """ask(); Triton's duration of the one request it made (ns) and the model's new log lines
            (waiting for `lines` of them: they travel from the model's process to the server's log)."""
            st = s.statistics()["model_stats"][0]["inference_stats"]
            count = st["success"]["count"] + st["fail"]["count"]
            ns = st["success"]["ns"] + st["fail"]["ns"]
            before = len(STOPPED.findall(s.log_text()))
            ask()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                st = s.statistics()["model_stats"][0]["inference_stats"]
                if st["success"]["count"] + st["fail"]["count"] > count:
                    break
                time.sleep(0.05)
            assert st["success"]["count"] + st["fail"]["count"] == count + 1, st
            time.sleep(0.2)
            while len(STOPPED.findall(s.log_text())) < before + lines and time.monotonic() < deadline:
                time.sleep(0.05)
            return st["success"]["ns"] + st["fail"]["ns"] - ns, STOPPED.findall(s.log_text())[before:]

        def full_run(cls: int, seed: int, want: np.ndarray) -> None:
            r = client.infer(MODEL, grpc_infer_inputs(grpcclient, cls, seed), client_timeout=60)
            assert np.array_equal(r.as_numpy("image")[0], want)

        full, stopped = took(lambda: full_run(1, 0, direct[0]), 0)
        assert stopped == []

        def cancel() -> None:
            answers: queue.Queue = queue.Queue()
            call = client.async_infer(
                MODEL, grpc_infer_inputs(grpcclient, 2, 0), callback=lambda result, error: answers.put(error)
            )
            time.sleep(full / 4 / 1e9)
            call.cancel()
            assert "cancelled" in str(answers.get(timeout=30)).lower()

        def past_deadline() -> None:
            with pytest.raises(grpcclient.InferenceServerException, match="Deadline Exceeded"):
                client.infer(MODEL, grpc_infer_inputs(grpcclient, 2, 1), client_timeout=full / 4 / 1e9)

        for ask in (cancel, past_deadline):
            ns, stopped = took(ask, 1)
            assert len(stopped) == 1, s.log_text()[-2000:]
            step, total = map(int, stopped[0])
            assert total == SLOW["num_iter"] and 1 <= step < total, (ask.__name__, stopped)
            assert ns < full / 2, (ask.__name__, ns, full)

        def hang_up_http() -> None:
            body = json.dumps(
                {
                    "inputs": [
                        {"name": n, "shape": [1, 1], "datatype": "INT64", "data": [2]}
                        for n in ("class", "seed")
                    ]
                }
            ).encode()
            head = f"POST /v2/models/{MODEL}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(head.encode() + body)
                time.sleep(full / 4 / 1e9)

        assert took(hang_up_http, 0)[1] == []  # all 64 steps asked is_cancelled() and none heard yes

        assert took(lambda: full_run(3, 5, direct[1]), 0)[1] == []
        assert len(STOPPED.findall(s.log_text())) == 2  # the two given up over gRPC, nothing since


def test_cli_serve_stops_on_sigterm_and_leaves_nothing(engines, tmp_path):
    import tritonclient.grpc as grpcclient

    port, grpc_port = free_port(), free_port()
    exe = Path(sys.executable).parent / "far-export"
    proc = subprocess.Popen(
        [
            str(exe),
            "serve",
            str(engines),
            "--port",
            str(port),
            "--grpc-port",
            str(grpc_port),
            "--threads",
            "1",
        ],
        env=ENV_OUTSIDE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()  # bounded by the server's own ready timeout
        assert f"http://127.0.0.1:{port}/v2/models/far, gRPC at 127.0.0.1:{grpc_port}" in line, line
        status, r = infer(f"http://127.0.0.1:{port}", [3], [1])
        assert status == 200
        with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            answer = client.infer(MODEL, grpc_infer_inputs(grpcclient, 3, 1), client_timeout=60)
        assert np.array_equal(answer.as_numpy("image"), image_of(r))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the port is free again
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "held"; a listener is
            try:
                s.bind(("127.0.0.1", port))
                break
            except OSError:
                time.sleep(0.2)
    else:
        pytest.fail(f"port {port} still held")
    out = subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True, text=True)
    assert out.stdout.strip() == "", f"processes left: {out.stdout}"


def test_repository_only_and_bad_input(engines, tmp_path):
    from click.testing import CliRunner

    from far_export.cli import cli

    r = CliRunner().invoke(cli, ["serve", str(engines), "--repository-only", str(tmp_path / "repo")])
    assert r.exit_code == 0, r.output
    config = (tmp_path / "repo" / MODEL / "config.pbtxt").read_text()
    assert "max_batch_size: 2" in config and "max_queue_size: 64" in config
    assert (tmp_path / "repo" / MODEL / "1" / "engine" / "manifest.json").is_file()
    r = CliRunner().invoke(cli, ["serve", str(engines), "--repository-only", str(tmp_path / "repo")])
    assert r.exit_code == 1 and "exists" in r.output
    r = CliRunner().invoke(cli, ["serve", str(tmp_path / "nope")])
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output


def test_cli_serve_exits_1_when_the_model_process_dies(engines):
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "far-export"), "serve", str(engines), "--port", str(free_port())],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        line = proc.stdout.readline()
        assert "serving" in line and re.search(r"gRPC at 127\.0\.0\.1:\d+ ", line), line
        server = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        stubs = subprocess.run(["pgrep", "-P", server[0]], capture_output=True, text=True).stdout.split()
        os.kill(int(stubs[0]), signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        out = proc.stdout.read()
        assert "the model process" in out and "died" in out and "Traceback" not in out
        assert not Path(f"/proc/{server[0]}").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

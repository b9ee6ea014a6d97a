"""`far-export serve`: an engine directory behind Triton Inference Server.

    repo = write_repository("engines/far-mnist", "repo", ServeOptions())   # for an existing Triton
    with TritonProcess(repo, host="127.0.0.1", port=8000) as server:       # or run one here
        server.wait_ready()

The repository holds one Python-backend model (`far`, runtime/triton_model.py) with dynamic batching up
to the engine batch, a short queue delay and a bounded queue. The tritonserver is the one on PATH (NGC
containers, JetPack) or else the binary inside the `nvidia-pytriton` wheel (the `serve` extra). The
process is owned: stopping (or any failure) terminates it and waits for it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import FarError
from runtime.files import check_output_dir, directory
from runtime.manifest import load_manifest

MODEL = "far"


class ServeError(FarError, RuntimeError):
    """The server cannot be started or stopped serving."""


@dataclass(frozen=True)
class ServeOptions:
    backend: str = "ort"
    providers: str = "cpu"
    threads: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # head_steps, cfg, temperature, num_iter, ...
    # how long a request waits for others to join its batch: clients that send again once answered
    # arrive milliseconds apart, and a batch costs the same for 1 row as for the engine batch
    queue_delay_us: int = 30_000
    max_queue: int = 64


def model_config(manifest: Any, engine_dir: str, opts: ServeOptions) -> str:
    m = manifest.model
    params = {
        "engine_dir": engine_dir,
        "backend": opts.backend,
        "providers": opts.providers,
        "threads": "" if opts.threads is None else str(opts.threads),
        "settings": json.dumps(opts.settings),
    }
    parameters = "\n".join(
        f'parameters {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()
    )
    return f"""name: "{MODEL}"
backend: "python"
max_batch_size: {manifest.batch}
input [
  {{ name: "class" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "seed" data_type: TYPE_INT64 dims: [ 1 ] }},
  {{ name: "index" data_type: TYPE_INT64 dims: [ 1 ] optional: true }},
  {{ name: "png" data_type: TYPE_BOOL dims: [ 1 ] optional: true }}
]
output [
  {{ name: "image" data_type: TYPE_UINT8 dims: [ {m.img_size}, {m.img_size}, 3 ] }},
  {{ name: "png" data_type: TYPE_UINT8 dims: [ -1 ] }}
]
dynamic_batching {{
  max_queue_delay_microseconds: {opts.queue_delay_us}
  default_queue_policy {{ max_queue_size: {opts.max_queue} }}
}}
instance_group [ {{ count: 1 kind: KIND_CPU }} ]
{parameters}
"""


MODEL_PY = "from runtime.triton_model import TritonPythonModel  # noqa: F401\n"


def write_repository(engine_dir: str | Path, out: str | Path, opts: ServeOptions, copy: bool = True) -> Path:
    """A Triton model repository at `out` (written under a temporary name, then renamed). With `copy` the
    engine directory goes inside it (`far/1/engine`: a self-contained repository for a container), else
    config.pbtxt names its absolute path."""
    engine_dir = directory(engine_dir, "engine directory", fix="give a directory made by far-export build")
    manifest = load_manifest(engine_dir, verify=False)
    out = Path(out)
    if out.exists():
        raise ServeError(f"--repository-only {out} exists: give a new directory")
    check_output_dir(out, "--repository-only", ServeError)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        version = tmp / MODEL / "1"
        version.mkdir(parents=True)
        if copy:
            shutil.copytree(engine_dir, version / "engine")
            where = "engine"
        else:
            where = str(engine_dir.resolve())
        (version / "model.py").write_text(MODEL_PY)
        (tmp / MODEL / "config.pbtxt").write_text(model_config(manifest, where, opts))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def find_tritonserver() -> tuple[Path, Path | None]:
    """(tritonserver, the nvidia-pytriton wheel's tritonserver folder, or None for one on PATH with its own
    backends)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return Path(on_path), None
    spec = importlib.util.find_spec("pytriton")  # located, not imported: it wants numpy<2
    if spec is None or spec.origin is None:
        raise ServeError(
            "no tritonserver on PATH and no nvidia-pytriton wheel: pip install -e '.[serve]' "
            "(or run inside an NGC Triton container)"
        )
    root = Path(spec.origin).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    if not binary.is_file():
        raise ServeError(f"{binary} is missing: reinstall nvidia-pytriton (pip install -e '.[serve]')")
    return binary, root


def wheel_backends(root: Path, into: Path) -> Path:
    """A backend folder for the wheel's tritonserver: its Python backend plus the stub built for this
    interpreter's Python version (the wheel keeps one stub per version aside)."""
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(
            f"nvidia-pytriton has no Python backend stub for Python {version}: use Python 3.10-3.13"
        )
    python = into / "python"
    python.mkdir(parents=True)
    for f in (root / "backends" / "python").iterdir():
        if f.is_file():
            (python / f.name).symlink_to(f)
    (python / stub.name).symlink_to(stub)
    return into


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    """The Python backend's stub embeds libpython in isolated mode (environment variables such as
    PYTHONPATH are ignored) and takes its prefix, so its standard library and site-packages, from the
    `python3` it finds on PATH. Point both at this interpreter: its LIBDIR first on LD_LIBRARY_PATH, its
    bin directory (a virtual environment's, where far-export is installed) first on PATH."""
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, env.get("LD_LIBRARY_PATH", "")) if p)
    bindir = Path(sys.executable).parent
    python3 = bindir / "python3"
    # a virtual environment's python3 reads its pyvenv.cfg, whether it is a link or a copy (--copies)
    in_venv = sys.prefix != sys.base_prefix and bindir.parent == Path(sys.prefix)
    if not (python3.exists() and (in_venv or python3.resolve() == Path(sys.executable).resolve())):
        raise ServeError(
            f"{bindir} has no python3 that is this interpreter ({sys.executable}), and Triton's Python "
            f"backend finds its interpreter as python3 on PATH: run far-export from a virtual environment"
        )
    env["PATH"] = os.pathsep.join(p for p in (str(bindir), env.get("PATH", "")) if p)
    return env


class TritonProcess:
    """A tritonserver this process owns: started on `host`, stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, repository: Path, host: str = "127.0.0.1", port: int = 8000, grpc_port: int = 0):
        binary, wheel = find_tritonserver()
        self.workdir = tempfile.TemporaryDirectory(prefix="far-triton-")
        self.url = f"http://{host}:{port}"
        self.grpc_port = grpc_port or free_port(host)
        self.grpc_address = f"{host}:{self.grpc_port}"  # what tritonclient.grpc's client takes
        cmd = [
            str(binary),
            f"--model-repository={repository}",
            f"--http-address={host}",
            f"--http-port={port}",
            f"--grpc-address={host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=false",
            "--exit-on-error=true",
            "--log-verbose=0",
        ]
        if wheel is not None:
            cmd.append(f"--backend-directory={wheel_backends(wheel, Path(self.workdir.name) / 'backends')}")
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            cmd, env=_env(), stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _get(self, path: str, timeout: float = 2.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return 0, b""

    def ready(self) -> bool:
        return self._get(f"/v2/models/{MODEL}/ready")[0] == 200

    def log_text(self) -> str:
        """What the server (and its model's `pb_utils.Logger`) has written so far. Read by offset: the file
        position is shared with the server, which writes at it."""
        chunks: list[bytes] = []
        while chunk := os.pread(self.log.fileno(), 1 << 16, sum(map(len, chunks))):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    def log_tail(self) -> str:
        lines = [line.strip() for line in self.log_text().splitlines() if line.strip()]
        errors = [line for line in lines if " E" in line[:3] or "error" in line.lower()]
        return (errors or lines or ["(no output)"])[-1]

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServeError(f"tritonserver exited with {self.proc.returncode}: {self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise ServeError(f"model {MODEL!r} not ready after {timeout:.0f} s: {self.log_tail()}")

    def children(self) -> set[int]:
        """The server's child processes (its Python backend stubs, one per model instance)."""
        kids: set[int] = set()
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(fields[1]) == self.proc.pid and fields[0] != "Z":  # state, ppid: a dead stub is a zombie
                kids.add(int(stat.parent.name))
        return kids

    def statistics(self) -> dict[str, Any]:
        status, body = self._get(f"/v2/models/{MODEL}/stats")
        if status != 200:
            raise ServeError(f"statistics endpoint answered {status}")
        return json.loads(body)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM (Triton drains the in-flight requests), then SIGKILL after `timeout`; the return code."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its Python stubs
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # stubs left in the group (a stub outliving its server)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.log.close()
        self.workdir.cleanup()
        return self.proc.returncode

    def __enter__(self) -> TritonProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    engine_dir: str | Path,
    opts: ServeOptions,
    host: str,
    port: int,
    log: Any = print,
    grpc_port: int = 0,
    poll: float = 1.0,
) -> int:
    """Run tritonserver on the engines until SIGINT/SIGTERM (HTTP on `port`, gRPC on `grpc_port`, 0: a free
    one); 0 after a clean stop. The model becoming unready or the server exiting is a ServeError."""
    with tempfile.TemporaryDirectory(prefix="far-serve-") as tmp:
        repo = write_repository(engine_dir, Path(tmp) / "repository", opts, copy=False)
        stop = []

        def on_signal(signum: int, frame: Any) -> None:
            stop.append(signum)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            with TritonProcess(repo, host, port, grpc_port) as server:
                server.wait_ready()
                stubs = server.children()
                log(
                    f"serving {engine_dir} at {server.url}/v2/models/{MODEL}, gRPC at {server.grpc_address} "
                    f"(Ctrl-C stops)"
                )
                while not stop:
                    dead = stubs - server.children()
                    if dead:  # Triton keeps the model "ready" and answers every request with an error
                        raise ServeError(
                            f"the model process (pid {min(dead)}) died; restart far-export serve "
                            f"(tritonserver's last line: {server.log_tail()})"
                        )
                    if server.proc.poll() is not None:
                        raise ServeError(
                            f"tritonserver exited with {server.proc.returncode}: {server.log_tail()}"
                        )
                    if not server.ready():
                        raise ServeError(f"model {MODEL!r} stopped being ready: {server.log_tail()}")
                    time.sleep(poll)
                log("stopping: draining requests")
        finally:
            for s, h in old.items():
                signal.signal(s, h)
    return 0


def check_settings(engine_dir: str | Path, opts: ServeOptions) -> None:
    """The served settings against the engines (the manifest and runtime's resolver), before any server."""
    from runtime.pipeline import Pipeline

    engine_dir = directory(engine_dir, "engine directory", fix="give a directory made by far-export build")
    with Pipeline.load(engine_dir, backend=opts.backend, providers=opts.providers, threads=1) as pipe:
        pipe.settings(**opts.settings)

"""The engine directory contract: `manifest.json` beside the ONNX graphs and optional TensorRT plans.

Written by `far_export` (build, compile), read by the runtime. The manifest is the
only thing the runtime reads to know the model. numpy/stdlib only.

Graph names: "backbone", "head", "vae_decoder".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
GRAPHS = ("backbone", "head", "vae_decoder")


class ManifestError(RuntimeError):
    """A missing, invalid, newer-schema or inconsistent engine directory."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # static
    dtype: str  # numpy dtype name: float32, float16, int64, ...


@dataclass(frozen=True)
class GraphSpec:
    file: str
    sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # what runs inside: fp32 | fp16 | bf16
    fp32_islands: tuple[str, ...] = ()  # ops kept in fp32 inside a reduced-precision graph


@dataclass(frozen=True)
class EngineSpec:
    """A TensorRT plan and what it was built for (plans are not portable across GPUs or versions)."""

    file: str
    sha256: str
    tensorrt_version: str
    gpu_name: str
    compute_capability: str  # "8.7"
    onnx_sha256: str  # the graph it was built from
    build_key: str  # sha256 of graph + settings: rebuild only when it changes
    settings: dict[str, Any] = field(default_factory=dict)
    # Tell modules of one family apart (every Orin is "Orin", sm 8.7); 0 in manifests written before them.
    sm_count: int = 0
    total_memory_mb: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """The runtime part of the model config: everything the AR loop needs."""

    backbone: str  # masked | causal
    head: str  # shortcut | mar
    img_size: int
    grid: int  # tokens per side
    seq_len: int
    token_dim: int  # C
    latent_channels: int
    patch_size: int
    latent_scale: float
    num_classes: int
    num_iter: int  # masked AR steps the backbone graph was sized for
    max_query: int  # Q: tokens queried per backbone step (padded), 1 for causal
    width: int  # D
    depth: int
    num_heads: int
    head_dim: int
    shortcut_levels: int
    diffusion_steps: int
    # sampling defaults
    head_steps: int
    cfg: float
    cfg_schedule: str
    temperature: float


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    producer: str  # "far-export 0.1.0"
    created: str  # ISO time
    checkpoint_sha256: str
    precision: str
    batch: int  # images per call the graphs were built for
    cfg_guidance: bool  # graphs double the batch for classifier-free guidance
    model: ModelInfo
    graphs: dict[str, GraphSpec]
    validation: dict[str, Any] = field(default_factory=dict)
    engines: dict[str, EngineSpec] = field(default_factory=dict)
    timing_cache: str | None = None

    # -- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Manifest:
        try:
            version = d["schema_version"]
            if not isinstance(version, int):
                raise ManifestError(f"schema_version must be an int, got {version!r}")
            if version > SCHEMA_VERSION:
                raise ManifestError(
                    f"manifest schema {version} is newer than this runtime's ({SCHEMA_VERSION}): upgrade far-export"
                )
            graphs = {k: _graph(v) for k, v in d["graphs"].items()}
            missing = [g for g in GRAPHS if g not in graphs]
            if missing:
                raise ManifestError(f"manifest lists no {missing[0]!r} graph; rebuild with far-export build")
            return cls(
                schema_version=version,
                producer=d["producer"],
                created=d["created"],
                checkpoint_sha256=d["checkpoint_sha256"],
                precision=d["precision"],
                batch=int(d["batch"]),
                cfg_guidance=bool(d["cfg_guidance"]),
                model=ModelInfo(**d["model"]),
                graphs=graphs,
                validation=d.get("validation", {}),
                engines={k: EngineSpec(**v) for k, v in d.get("engines", {}).items()},
                timing_cache=d.get("timing_cache"),
            )
        except ManifestError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ManifestError(f"invalid manifest ({type(e).__name__}: {e}); rebuild with far-export build") from None

    def save(self, directory: str | Path) -> Path:
        return write_atomic(Path(directory) / MANIFEST, json.dumps(self.to_dict(), indent=2) + "\n")

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=d["name"], shape=tuple(int(s) for s in d["shape"]), dtype=str(d["dtype"]))


def _graph(d: dict[str, Any]) -> GraphSpec:
    return GraphSpec(
        file=d["file"],
        sha256=d["sha256"],
        inputs=tuple(_tensor(t) for t in d["inputs"]),
        outputs=tuple(_tensor(t) for t in d["outputs"]),
        precision=d["precision"],
        fp32_islands=tuple(d.get("fp32_islands", ())),
    )


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: Path, data: str | bytes) -> Path:
    """Write to a temporary sibling, then rename over `path`: readers never see half a file.
    The file gets the usual permissions (0666 less the umask), not mkstemp's 0600."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory's manifest; with `verify`, check every graph's sha256."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ManifestError(f"engine directory {directory} does not exist; build it with far-export build")
    if not path.is_file():
        raise ManifestError(f"{path} is missing: not an engine directory (build one with far-export build)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{path} is not valid JSON ({e}); rebuild with far-export build") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path} must hold a JSON object")
    manifest = Manifest.from_dict(raw)
    if verify:
        for name, g in manifest.graphs.items():
            f = directory / g.file
            if not f.is_file():
                raise ManifestError(f"graph file {f} ({name}) is missing; rebuild with far-export build")
            if sha256_file(f) != g.sha256:
                raise ManifestError(f"graph file {f} ({name}) does not match its sha256 in the manifest: corrupt or replaced")
    return manifest

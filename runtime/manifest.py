"""The engine directory contract: `manifest.json` beside the ONNX graphs and optional TensorRT plans.

Written by `far_export` (build, compile), read by the runtime. The manifest is the
only thing the runtime reads to know the model. numpy/stdlib only.

Graph names: "backbone", "head", "update", "vae_decoder", and for a masked backbone optional encoder
variants "backbone_k{c}": the backbone with one more input, `known (B, c) int64`, whose encoder runs on
c known-token slots only (`known_capacity` = c); the runtime picks per AR step the smallest that holds
the step's known tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.errors import FarError, first_line, sampling_numbers
from runtime.files import directory as check_directory
from runtime.files import inside, read_regular, regular_file, write_atomic
from runtime.limits import MAX_BATCH, MODEL_LIMITS
from runtime.schedule import CFG_SCHEDULES, check_head_steps

# 2: the "update" graph (the AR step scatter); 3: encoder variants; 4: one shared backbone weights file
SCHEMA_VERSION = 4
SHARED_WEIGHTS_FILE = "backbone.weights"  # ONNX external data of the backbone and its encoder variants
MANIFEST = "manifest.json"
# What runs inside the graphs of a build (int8: QDQ graphs); the one list, far_export's included.
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
GRAPHS = ("backbone", "head", "update", "vae_decoder")  # every engine directory has these
_VARIANT = re.compile(r"backbone_k([1-9][0-9]{0,6})")


def variant_name(capacity: int) -> str:
    """The graph name of the masked backbone's encoder variant with `capacity` known-token slots."""
    return f"backbone_k{capacity}"


def is_variant(name: str) -> bool:
    return _VARIANT.fullmatch(name) is not None


class ManifestError(FarError, RuntimeError):
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
    precision: str  # what runs inside: fp32 | fp16 | bf16 | int8 (QDQ)
    fp32_islands: tuple[str, ...] = ()  # ops kept in fp32 inside a reduced-precision graph
    known_capacity: int = 0  # encoder variants: known-token slots of the encoder (0: every position)


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
class SharedWeights:
    """The one weights file the backbone graph and its encoder variants read their initializers from."""

    file: str
    sha256: str
    graphs: tuple[str, ...]  # the graphs that reference it
    # per graph: initializer name -> (offset, length, numpy dtype, shape) in the file
    tensors: dict[str, dict[str, tuple[int, int, str, tuple[int, ...]]]] = field(default_factory=dict)


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

    @property
    def resolved_head_steps(self) -> int:
        """The default K (already resolved at build time: the manifest never holds 0)."""
        return self.head_steps


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
    shared_weights: SharedWeights | None = None

    # -- (de)serialisation -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Check every field as data (types, ranges, allowed names, plain file names) and build the manifest;
        ManifestError with the field's name otherwise."""
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest must be a JSON object, got {type(d).__name__}; {REBUILD}")
        version = _field(d, "schema_version", int)
        if version > SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema {version} is newer than this runtime's ({SCHEMA_VERSION}): "
                "upgrade far-export"
            )
        if version < 1:
            raise ManifestError(f"manifest schema_version must be >= 1, got {version}; {REBUILD}")
        if version < SCHEMA_VERSION:
            raise ManifestError(
                f"manifest schema {version} is older than this runtime's ({SCHEMA_VERSION}); {REBUILD}"
            )
        graphs_raw = _field(d, "graphs", dict)
        unknown = sorted(k for k in graphs_raw if k not in GRAPHS and not is_variant(k))
        if unknown:
            raise ManifestError(
                f"manifest graphs: unknown graph {unknown[0]!r} (known: {', '.join(GRAPHS)}, "
                f"backbone_k<capacity>); {REBUILD}"
            )
        missing = [g for g in GRAPHS if g not in graphs_raw]
        if missing:
            raise ManifestError(f"manifest lists no {missing[0]!r} graph; {REBUILD}")
        engines_raw = _field(d, "engines", dict, {})
        unknown = sorted(set(engines_raw) - set(graphs_raw))
        if unknown:
            raise ManifestError(
                f"manifest engines: {unknown[0]!r} is not a graph of the manifest "
                f"(graphs: {', '.join(graphs_raw)}); {REBUILD}"
            )
        timing_cache = d.get("timing_cache")
        m = cls(
            schema_version=version,
            producer=_field(d, "producer", str),
            created=_field(d, "created", str),
            checkpoint_sha256=_field(d, "checkpoint_sha256", str),
            precision=_choice(d, "precision", PRECISIONS),
            batch=_int(d, "batch", 1, MAX_BATCH),
            cfg_guidance=_field(d, "cfg_guidance", bool),
            model=_model(_field(d, "model", dict)),
            graphs={
                k: _graph(_field(graphs_raw, k, dict, where="graphs."), f"graphs.{k}") for k in graphs_raw
            },
            validation=_validation(_field(d, "validation", dict, {})),
            engines={
                k: _engine(_field(engines_raw, k, dict, where="engines."), f"engines.{k}")
                for k in engines_raw
            },
            timing_cache=None if timing_cache is None else _file_name(timing_cache, "timing_cache"),
            shared_weights=_shared_weights(d.get("shared_weights"), graphs_raw),
        )
        _check_sizes(m)
        _check_variants(m)
        return m

    @property
    def encoder_variants(self) -> dict[int, str]:
        """Known-token capacity -> graph name of the masked backbone's encoder variants, ascending."""
        return dict(sorted((g.known_capacity, n) for n, g in self.graphs.items() if is_variant(n)))

    def content_sha256(self, name: str) -> str:
        """What graph `name` computes: its file's sha256, and the shared weights' for a graph that reads
        them (its .onnx file alone is the same for any checkpoint of one architecture)."""
        g, sw = self.graphs[name], self.shared_weights
        if sw is None or name not in sw.graphs:
            return g.sha256
        return hashlib.sha256(f"{g.sha256}:{sw.sha256}".encode()).hexdigest()

    def save(self, directory: str | Path) -> Path:
        return write_atomic(
            Path(directory) / MANIFEST, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"
        )

    def replace(self, **changes: Any) -> Manifest:
        return dataclasses.replace(self, **changes)


REBUILD = "rebuild with far-export build"
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool")
WEIGHT_DTYPES = (*DTYPES, "int8", "uint8", "int16", "uint16", "float64")  # initializers (int8: QDQ weights)
MAX_DIM = 1 << 20  # any one static dimension
MAX_TENSOR_BYTES = 1 << 34  # 16 GiB: any one buffer the runtime would allocate
_MISSING = object()


def _field(d: dict[str, Any], key: str, kind: type, default: Any = _MISSING, where: str = "") -> Any:
    """d[key], which must be of type `kind` (bool is not an int, an int is a float)."""
    if key not in d:
        if default is not _MISSING:
            return default
        raise ManifestError(f"manifest field {where}{key} is missing; {REBUILD}")
    v = d[key]
    ok = (
        type(v) in (int, float)
        if kind is float
        else isinstance(v, kind) and not (kind is int and isinstance(v, bool))
    )
    if not ok:
        raise ManifestError(
            f"manifest field {where}{key} must be {_KINDS.get(kind, kind.__name__)}, got {v!r}; {REBUILD}"
        )
    if kind is float and not math.isfinite(v):
        raise ManifestError(f"manifest field {where}{key} must be a finite number, got {v}; {REBUILD}")
    return float(v) if kind is float else v


_KINDS = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "true or false",
    dict: "an object",
    list: "a list",
}


def _int(d: dict[str, Any], key: str, lo: int, hi: int, where: str = "") -> int:
    v = _field(d, key, int, where=where)
    if not lo <= v <= hi:
        raise ManifestError(f"manifest field {where}{key} must be in [{lo}, {hi}], got {v}; {REBUILD}")
    return v


def _choice(d: dict[str, Any], key: str, choices: tuple[str, ...], where: str = "") -> str:
    v = _field(d, key, str, where=where)
    if v not in choices:
        raise ManifestError(
            f"manifest field {where}{key} must be one of {', '.join(choices)}, got {v!r}; {REBUILD}"
        )
    return v


def _file_name(v: Any, where: str) -> str:
    """A plain file name inside the engine directory: no directories, no '..', not absolute, not hidden."""
    if not isinstance(v, str) or not v or v != Path(v).name or v.startswith(".") or "\\" in v or "\x00" in v:
        raise ManifestError(
            f"manifest field {where} must be a plain file name inside the engine directory, "
            f"got {v!r}; {REBUILD}"
        )
    return v


MODEL_CHOICES = {"backbone": ("masked", "causal"), "head": ("shortcut", "mar"), "cfg_schedule": CFG_SCHEDULES}


def _model(d: dict[str, Any]) -> ModelInfo:
    where = "model."
    known = {f.name for f in dataclasses.fields(ModelInfo)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ManifestError(f"manifest field model.{unknown[0]} is unknown; {REBUILD}")
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ModelInfo):
        if f.name in MODEL_CHOICES:
            values[f.name] = _choice(d, f.name, MODEL_CHOICES[f.name], where)
        elif f.type == "int":
            values[f.name] = _int(d, f.name, 1, MODEL_LIMITS[f.name], where)
        else:
            values[f.name] = _field(d, f.name, float, where=where)
    m = ModelInfo(**values)
    checks = [
        (m.seq_len == m.grid**2, f"seq_len {m.seq_len} is not grid^2 = {m.grid**2}"),
        (
            m.token_dim == m.latent_channels * m.patch_size**2,
            f"token_dim {m.token_dim} is not latent_channels x patch_size^2 = "
            f"{m.latent_channels * m.patch_size**2}",
        ),
        (m.num_iter <= m.seq_len, f"num_iter {m.num_iter} is more than seq_len {m.seq_len}"),
        (m.max_query <= m.seq_len, f"max_query {m.max_query} is more than seq_len {m.seq_len}"),
        (m.img_size % m.grid == 0, f"img_size {m.img_size} is not a multiple of grid {m.grid}"),
        (m.width == m.num_heads * m.head_dim, f"width {m.width} is not num_heads x head_dim"),
        (m.temperature > 0, f"temperature must be > 0, got {m.temperature}"),
        (m.latent_scale > 0, f"latent_scale must be > 0, got {m.latent_scale}"),
    ]
    for ok, what in checks:
        if not ok:
            raise ManifestError(f"manifest model: {what}; {REBUILD}")
    sampling_numbers(m.cfg, m.temperature, ManifestError)
    try:
        check_head_steps(m.head, m.head_steps, m.shortcut_levels, m.diffusion_steps)
    except ValueError as e:
        raise ManifestError(f"manifest model.head_steps: {e}; {REBUILD}") from None
    return m


def _tensor(d: Any, where: str) -> TensorSpec:
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field {where} must be an object, got {d!r}; {REBUILD}")
    shape = _field(d, "shape", list, where=where + ".")
    if any(type(s) is not int or not 1 <= s <= MAX_DIM for s in shape):
        raise ManifestError(
            f"manifest field {where}.shape must list dimensions in [1, {MAX_DIM}], got {shape}; {REBUILD}"
        )
    return TensorSpec(
        name=_field(d, "name", str, where=where + "."),
        shape=tuple(shape),
        dtype=_choice(d, "dtype", DTYPES, where + "."),
    )


def _tensors(d: dict[str, Any], key: str, where: str) -> tuple[TensorSpec, ...]:
    items = _field(d, key, list, where=where + ".")
    return tuple(_tensor(t, f"{where}.{key}[{i}]") for i, t in enumerate(items))


def _graph(d: dict[str, Any], where: str) -> GraphSpec:
    islands = _field(d, "fp32_islands", list, [], where + ".")
    if not all(isinstance(x, str) for x in islands):
        raise ManifestError(f"manifest field {where}.fp32_islands must list strings; {REBUILD}")
    return GraphSpec(
        file=_file_name(d.get("file"), where + ".file"),
        sha256=_field(d, "sha256", str, where=where + "."),
        inputs=_tensors(d, "inputs", where),
        outputs=_tensors(d, "outputs", where),
        precision=_choice(d, "precision", PRECISIONS, where + "."),
        fp32_islands=tuple(islands),
        known_capacity=_int({"known_capacity": 0, **d}, "known_capacity", 0, MAX_DIM, where + "."),
    )


def _engine(d: dict[str, Any], where: str) -> EngineSpec:
    w = where + "."
    return EngineSpec(
        file=_file_name(d.get("file"), w + "file"),
        sha256=_field(d, "sha256", str, where=w),
        tensorrt_version=_field(d, "tensorrt_version", str, where=w),
        gpu_name=_field(d, "gpu_name", str, where=w),
        compute_capability=_field(d, "compute_capability", str, where=w),
        onnx_sha256=_field(d, "onnx_sha256", str, where=w),
        build_key=_field(d, "build_key", str, where=w),
        settings=_field(d, "settings", dict, {}, where=w),
        # absent from plans recorded before they were: 0 = unknown, not compared
        sm_count=_int({"sm_count": 0, **d}, "sm_count", 0, 100_000, where=w),
        total_memory_mb=_int({"total_memory_mb": 0, **d}, "total_memory_mb", 0, 1 << 40, where=w),
    )


def _shared_weights(d: Any, graphs: dict[str, Any]) -> SharedWeights | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ManifestError(f"manifest field shared_weights must be an object; {REBUILD}")
    names = _field(d, "graphs", list, where="shared_weights.")
    unknown = [n for n in names if n not in graphs]
    if unknown or not names:
        raise ManifestError(
            f"manifest field shared_weights.graphs must name graphs of the manifest, got {names!r}; {REBUILD}"
        )
    raw = _field(d, "tensors", dict, where="shared_weights.")
    tensors: dict[str, dict[str, tuple[int, int, str, tuple[int, ...]]]] = {}
    for g in names:
        tensors[g] = {}
        for k, v in _field(raw, g, dict, where="shared_weights.tensors.").items():
            ok = (
                isinstance(v, list)
                and len(v) == 4
                and all(isinstance(x, int) and 0 <= x < 1 << 40 for x in v[:2])
                and v[2] in WEIGHT_DTYPES
                and isinstance(v[3], list)
                and all(isinstance(x, int) and 0 <= x <= MAX_DIM for x in v[3])
            )
            if not ok:
                raise ManifestError(
                    f"manifest field shared_weights.tensors.{g}.{k} must be [offset, length, dtype, shape]; "
                    f"{REBUILD}"
                )
            tensors[g][k] = (v[0], v[1], v[2], tuple(v[3]))
    return SharedWeights(
        file=_file_name(d.get("file"), "shared_weights.file"),
        sha256=_field(d, "sha256", str, where="shared_weights."),
        graphs=tuple(names),
        tensors=tensors,
    )


MAX_VALIDATION_DEPTH = 16  # a build writes 5 levels


def _validation(v: dict[str, Any]) -> dict[str, Any]:
    """The validation record as data of bounded nesting and finite numbers (inspect prints it as JSON)."""
    level, depth = [v], 0
    while level:
        depth += 1
        if depth > MAX_VALIDATION_DEPTH:
            raise ManifestError(
                f"validation nests deeper than {MAX_VALIDATION_DEPTH} levels (a build writes 5); {REBUILD}"
            )
        values = [c for x in level for c in (x.values() if isinstance(x, dict) else x)]
        if any(isinstance(c, float) and not math.isfinite(c) for c in values):
            raise ManifestError(f"validation holds NaN or Infinity, which JSON does not allow; {REBUILD}")
        level = [c for c in values if isinstance(c, (dict, list))]
    return v


def _check_sizes(m: Manifest) -> None:
    """No buffer the runtime allocates from the manifest may be absurd (a crafted `batch: 1e12`)."""
    mi = m.model
    rows = 2 * m.batch if m.cfg_guidance else m.batch
    sizes = {
        "tokens": m.batch * mi.seq_len * mi.token_dim * 4,
        "image": m.batch * 3 * mi.img_size**2 * 4,
        "head rows": rows * mi.max_query * mi.token_dim * 4,
    }
    for g in m.graphs.values():
        for t in (*g.inputs, *g.outputs):
            sizes[f"{g.file}:{t.name}"] = math.prod(t.shape) * 4
    for what, n in sizes.items():
        if n > MAX_TENSOR_BYTES:
            raise ManifestError(
                f"manifest: the {what} buffer would take {n / 2**30:.0f} GiB (limit "
                f"{MAX_TENSOR_BYTES / 2**30:.0f} GiB): batch or shapes are not sane; {REBUILD}"
            )


def _check_variants(m: Manifest) -> None:
    """Each encoder variant is the backbone graph plus `known (batch, c) int64`, c its name's capacity,
    1 <= c < seq_len, and only for a masked backbone; every other graph has capacity 0."""
    backbone = m.graphs["backbone"]
    for name, g in m.graphs.items():
        if not is_variant(name):
            if g.known_capacity:
                raise ManifestError(
                    f"manifest field graphs.{name}.known_capacity must be 0 (only backbone_k<c> graphs have "
                    f"one), got {g.known_capacity}; {REBUILD}"
                )
            continue
        c = int(name[len("backbone_k") :])
        known = TensorSpec("known", (m.batch, c), "int64")
        problems = [
            (m.model.backbone == "masked", f"the {m.model.backbone} backbone has no encoder variants"),
            (g.known_capacity == c, f"known_capacity {g.known_capacity} is not the name's {c}"),
            (c < m.model.seq_len, f"capacity {c} is not below seq_len {m.model.seq_len}"),
            (g.inputs == (*backbone.inputs, known), "inputs are not the backbone's + known (batch, c) int64"),
            (g.outputs == backbone.outputs, "outputs are not the backbone's"),
        ]
        for ok, what in problems:
            if not ok:
                raise ManifestError(f"manifest graphs.{name}: {what}; {REBUILD}")


# ----------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_manifest(directory: str | Path, verify: bool = True) -> Manifest:
    """Read and check an engine directory's manifest; every graph file must be a regular file inside the
    directory (symlinks resolved); with `verify`, its sha256 must match."""
    directory = check_directory(
        directory, "engine directory", ManifestError, "build it with far-export build"
    )
    path = directory / MANIFEST
    raw_bytes = read_regular(path, ManifestError, "not an engine directory (build one with far-export build)")
    try:
        raw = json.loads(raw_bytes.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int too long
        raise ManifestError(f"{path} is not valid JSON ({first_line(e)}); {REBUILD}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path} must hold a JSON object, got {type(raw).__name__}; {REBUILD}")
    manifest = Manifest.from_dict(raw)
    for name, g in manifest.graphs.items():
        f = graph_path(directory, g.file, name)
        if verify and sha256_file(f) != g.sha256:
            raise ManifestError(
                f"graph file {f} ({name}) does not match its sha256 in the manifest: corrupt or replaced"
            )
    sw = manifest.shared_weights
    if sw is not None:
        f = graph_path(directory, sw.file, "shared weights")
        if verify and sha256_file(f) != sw.sha256:
            raise ManifestError(
                f"weights file {f} does not match its sha256 in the manifest: corrupt or replaced; {REBUILD}"
            )
    return manifest


def graph_path(directory: Path, file: str, what: str) -> Path:
    """A file the manifest names: a regular file that stays inside the directory once symlinks are
    resolved."""
    f = directory / file
    if not inside(f, directory):
        raise ManifestError(f"graph file {f} ({what}) points outside the engine directory; {REBUILD}")
    if not f.exists():
        raise ManifestError(f"graph file {f} ({what}) is missing; {REBUILD}")
    return regular_file(f, ManifestError, REBUILD)

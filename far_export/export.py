"""PyTorch -> static ONNX graphs: each graph described as data, then exported.

`graph_specs()` is the one place that says what every graph takes and returns (names,
static shapes, dtypes: the graph I/O contract of the engine directory). The torch
modules behind them are the `*Step` modules of `training/model.py`, which the
reference sampler calls too, so "the graph equals PyTorch" checks the sampler's math.

Exporter: `torch.onnx.export(dynamo=True)` (torch.export + onnxscript), opset 18.
It traces with `torch.export` (no Python-bool capture of tensors), gives fully static
shapes when no `dynamic_shapes` are passed, and matches PyTorch to ~1e-6 on every
graph; the legacy TorchScript exporter is deprecated, warns on every call, and gave
a masked-backbone graph that was wrong by ~1.9 on the tiny preset.

Precision: fp32 graphs run the fp32 modules. fp16/bf16 graphs run `model.half()` /
`model.bfloat16()` copies; norm statistics, softmax and the MAR head's network stay fp32 inside
(training/layers.py), every float graph boundary stays fp32 except the causal KV cache.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from far_export.tolerances import TOLERANCES, Tolerance
from runtime.errors import FarError
from runtime.manifest import TensorSpec, is_variant, variant_name
from runtime.schedule import encoder_capacities, max_tokens_per_step
from training.config import FARConfig
from training.model import FAR, TokenUpdateStep, VAEDecoderStep, backbone_step, head_step
from training.vae import AutoencoderKL

OPSET = 18
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# int8 graphs are exported fp32, then quantized (far_export/quantize.py)
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
NUMPY_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}
ENCODER_VARIANTS = 3  # masked backbone: encoder variants a build exports by default (0: none)
# What stays fp32 inside a reduced-precision graph (training/layers.py, the models' explicit casts).
_ISLANDS = {
    "backbone": ("LayerNorm statistics", "attention logits + mask bias + softmax", "graph inputs/outputs"),
    "shortcut": ("LayerNorm statistics", "timestep sinusoid", "graph inputs/outputs"),
    "mar": (
        "diffusion head network (eps, variance)",
        "DDPM posterior (mean, variance, noise)",
        "graph inputs/outputs",
    ),
    "vae_decoder": ("GroupNorm statistics", "attention logits + softmax", "graph inputs/outputs"),
    "update": (),  # always fp32: it only moves values
}


# An int8 graph quantizes only its weight products (far_export/quantize.py); the rest is fp32.
_INT8_ISLANDS = {
    "backbone": (
        "LayerNorm",
        "attention (QK^T, mask bias, softmax, AV)",
        "GELU",
        "residual adds",
        "graph inputs/outputs",
    ),
    "shortcut": (
        "LayerNorm",
        "timestep embedding (sinusoid and MLP)",
        "SiLU",
        "adaLN modulation arithmetic",
        "Euler update",
        "graph inputs/outputs",
    ),
    "vae_decoder": (
        "GroupNorm",
        "attention logits + softmax",
        "SiLU",
        "residual adds",
        "graph inputs/outputs",
    ),
}


def fp32_islands(graph: str, cfg: FARConfig, precision: str = "fp16") -> tuple[str, ...]:
    """What runs in fp32 inside `graph` (an encoder variant: as the backbone) of a reduced-precision build."""
    table = _INT8_ISLANDS if precision == "int8" else _ISLANDS
    kind = cfg.head if graph == "head" else "backbone" if is_variant(graph) else graph
    return table.get(kind, ())


EXTERNAL_DATA_BYTES = 1_800_000_000  # above this a graph's weights go to `<file>.data` (protobuf's 2 GB)


class ExportError(FarError, RuntimeError):
    """A graph could not be exported (unsupported op, bad options)."""


@dataclass(frozen=True)
class GraphIO:
    """One graph as data: its name, the static inputs/outputs of the contract, and the tolerance per
    precision its outputs are validated with."""

    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    tolerances: dict[str, Tolerance] = field(default_factory=lambda: TOLERANCES)
    known_capacity: int = 0  # encoder variants of the masked backbone: known-token slots

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"


@dataclass(frozen=True)
class GraphShapes:
    """The build-time sizes every graph is fixed to."""

    batch: int  # B
    guided: bool  # CFG doubles the batch inside the graphs
    num_iter: int  # masked AR steps the query size Q is computed for
    max_query: int  # Q (1 for the causal backbone)
    encoder_capacities: tuple[int, ...] = ()  # masked backbone: known-token slots of each encoder variant

    @classmethod
    def for_config(
        cls,
        cfg: FARConfig,
        batch: int,
        guided: bool,
        num_iter: int | None = None,
        encoder_variants: int = ENCODER_VARIANTS,
    ) -> GraphShapes:
        """Sizes for `batch`; a masked backbone gets up to `encoder_variants` encoder variants fitted to the
        num_iter schedule (runtime/schedule.py encoder_capacities): each is run by a step of it, so every
        graph of a build is validated and calibrated on the inputs its own loop feeds it."""
        if batch < 1:
            raise ExportError(f"batch must be >= 1, got {batch}")
        if encoder_variants < 0:
            raise ExportError(f"encoder variants must be >= 0, got {encoder_variants}")
        n = cfg.num_iter if num_iter is None else num_iter
        if cfg.backbone != "masked":
            return cls(batch=batch, guided=guided, num_iter=n, max_query=1)
        if not 1 <= n <= cfg.seq_len:
            raise ExportError(f"num_iter must be in [1, seq_len={cfg.seq_len}], got {n}")
        return cls(
            batch=batch,
            guided=guided,
            num_iter=n,
            max_query=max_tokens_per_step(cfg.seq_len, n),
            encoder_capacities=encoder_capacities(cfg.seq_len, encoder_variants, n),
        )

    @property
    def variant_names(self) -> tuple[str, ...]:
        """The encoder variants' graph names (graph_modules' `variants`)."""
        return tuple(variant_name(c) for c in self.encoder_capacities)

    @property
    def rows(self) -> int:
        """N: head rows per call (every queried token of every image)."""
        return self.batch * self.max_query


def _t(name: str, shape: tuple[int, ...], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(int(s) for s in shape), dtype=dtype)


def graph_specs(cfg: FARConfig, shapes: GraphShapes, precision: str = "fp32") -> dict[str, GraphIO]:
    """The graph I/O contract for this model and these build sizes."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    B, L, C, D = shapes.batch, cfg.seq_len, cfg.token_dim, cfg.width
    g = 2 if shapes.guided else 1
    N = shapes.rows
    if cfg.backbone == "masked":
        Q = shapes.max_query
        backbone = GraphIO(
            "backbone",
            (
                _t("tokens", (B, L, C)),
                _t("mask", (B, L)),
                _t("labels", (B,), "int64"),
                _t("query", (B, Q), "int64"),
            ),
            (_t("z", (g * N, D)),),
        )
    else:
        cache = (cfg.depth, 2, g * B, cfg.num_heads, L, cfg.head_dim)
        cdt = NUMPY_NAMES[precision]
        backbone = GraphIO(
            "backbone",
            (
                _t("prev_token", (B, C)),
                _t("pos", (1,), "int64"),
                _t("labels", (B,), "int64"),
                _t("cache", cache, cdt),
            ),
            (_t("z", (g * B, D)), _t("cache_out", cache, cdt)),
        )
    cfg_in = (_t("cfg", (1,)),) if shapes.guided else ()
    if cfg.head == "shortcut":
        head_in = (_t("x", (N, C)), _t("t", (1,)), _t("d", (1,)), _t("z", (g * N, D)), *cfg_in)
    else:
        head_in = (
            _t("x", (N, C)),
            _t("t", (1,)),
            _t("z", (g * N, D)),
            *cfg_in,
            _t("coef", (6,)),
            _t("noise", (N, C)),
        )
    head = GraphIO("head", head_in, (_t("x_next", (N, C)),))
    Q = shapes.max_query
    update = GraphIO(
        "update",
        (
            _t("tokens", (B, L, C)),
            _t("mask", (B, L)),
            _t("x", (N, C)),
            _t("query", (B, Q), "int64"),
            _t("n", (1,), "int64"),
        ),
        (_t("tokens_out", (B, L, C)), _t("mask_out", (B, L))),
    )
    vae = GraphIO(
        "vae_decoder", (_t("tokens", (B, L, C)),), (_t("image", (B, 3, cfg.img_size, cfg.img_size)),)
    )
    variants = {
        variant_name(c): GraphIO(
            variant_name(c),
            (*backbone.inputs, _t("known", (B, c), "int64")),
            backbone.outputs,
            known_capacity=c,
        )
        for c in shapes.encoder_capacities
    }
    return {"backbone": backbone, **variants, "head": head, "update": update, "vae_decoder": vae}


# ----------------------------------------------------------------------------
# The torch modules behind the graphs
# ----------------------------------------------------------------------------


class _DiffusionHeadAlwaysCfg(nn.Module):
    """The MAR head step with the contract's argument order (cfg only when guided)."""

    def __init__(self, step: nn.Module, guided: bool):
        super().__init__()
        self.step, self.guided = step, guided

    def forward(self, x, t, z, *rest):
        if self.guided:
            cfg, coef, noise = rest
        else:
            (coef, noise), cfg = rest, None
        return self.step(x, t, z, cfg, coef, noise)


def graph_modules(
    model: FAR,
    vae: AutoencoderKL,
    guided: bool,
    precision: str = "fp32",
    vae_precision: str | None = None,
    variants: tuple[str, ...] = (),
) -> dict[str, nn.Module]:
    """The eval-mode torch modules that the graphs compute, in `precision` (copies when not fp32); the
    encoder `variants` (graph names) are the backbone's module given a `known` input."""
    dtype = TORCH_DTYPES[precision]
    vdtype = TORCH_DTYPES[vae_precision or precision]
    m = model if dtype == torch.float32 else copy.deepcopy(model)
    if m is not model:
        m.backbone.to(dtype)
        # The MAR head's network stays fp32, weights included (an island, see _ISLANDS): the posterior's
        # x0 = c0 * x - c1 * eps has c1 = sqrt(1/alpha_bar - 1) ~ 2e4 at t ~ T, so an fp16 eps (rounding ~5e-4
        # relative, from fp16 weights as much as from fp16 activations) moves x0 by ~10 there, across the x0
        # clamp. mar-mnist's fp16 head graph was off by 0.185 (0.075 x scale) in its first step, fp32 weights
        # in an fp32 network make it 5e-5 x scale. The head is small next to the backbone (mar-mnist: 0.35M
        # of 1.57M parameters).
        if model.cfg.head != "mar":
            m.head.to(dtype)
    v = vae if vdtype == torch.float32 else copy.deepcopy(vae).to(vdtype)
    head = head_step(m, guided)
    if model.cfg.head == "mar":
        head = _DiffusionHeadAlwaysCfg(head, guided)
    backbone = backbone_step(m, guided)
    mods = {
        "backbone": backbone,
        **dict.fromkeys(variants, backbone),
        "head": head,
        "update": TokenUpdateStep(),
        "vae_decoder": VAEDecoderStep(model.cfg, v),
    }
    return {k: mod.eval() for k, mod in mods.items()}


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------


def to_torch(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.to(torch.bfloat16) if dtype == "bfloat16" else t


# ----------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """The dynamo exporter prints progress lines and warnings; a build prints its own stage lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def export_graph(module: nn.Module, io_: GraphIO, path: str | Path, inputs: dict[str, np.ndarray]) -> Path:
    """Export `module` with the static shapes of `io_` to `path` (one file while under 2 GB)."""
    path = Path(path)
    args = tuple(to_torch(inputs[s.name], s.dtype) for s in io_.inputs)
    nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=OPSET,
                optimize=True,
                verbose=False,
                input_names=[s.name for s in io_.inputs],
                output_names=[s.name for s in io_.outputs],
            )
            program.save(str(path), external_data=nbytes > EXTERNAL_DATA_BYTES)
    except Exception as e:  # the exporter raises many types; name the graph and the first line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ExportError(f"exporting the {io_.name} graph failed: {type(e).__name__}: {msg}") from e
    _check_io(path, io_)
    return path


def _check_io(path: Path, io_: GraphIO) -> None:
    """The exported graph must have exactly the contract's names, static shapes and dtypes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[tuple[str, tuple[int, ...], str]]:
        out = []
        for v in values:
            tt = v.type.tensor_type
            dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim)
            out.append((v.name, dims, _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type))))
        return out

    want_in = [(s.name, s.shape, s.dtype) for s in io_.inputs]
    want_out = [(s.name, s.shape, s.dtype) for s in io_.outputs]
    for kind, got, want in (
        ("inputs", describe(model.graph.input), want_in),
        ("outputs", describe(model.graph.output), want_out),
    ):
        if got != want:
            raise ExportError(f"the {io_.name} graph's {kind} are {got}, the contract says {want}")


_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}

"""Each graph of a build, described once, as data.

`build_graphs()` makes one `BuildGraph` per graph from the checkpoint's networks, the build's sizes and its
precision: its name, its I/O contract (`graph_specs`: the manifest's `GraphSpec`, names, static shapes and
dtypes), the torch module it computes and the fp32 module it is checked against, the precision it really
runs at with its fp32 islands, its tolerance, and whether a failed check may ship its fp32 export instead.
The build (far_export/build.py) exports, quantizes, validates and lists exactly these records; adding a
precision, a graph or a fallback rule changes `_rules` or the tables here.

The torch modules are the `*Step` modules of `training/model.py`, which the reference sampler calls too,
so "the graph equals PyTorch" checks the sampler's math. Precision: fp32 graphs run the fp32 modules,
fp16/bf16 graphs `model.half()` / `model.bfloat16()` copies (norm statistics and softmax stay fp32 inside,
training/layers.py; every float graph boundary stays fp32 except the causal KV cache), int8 graphs are
exported fp32 and then quantized (far_export/quantize.py).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from far_export.export import ExportError
from far_export.tolerances import TOLERANCES, Tolerance
from runtime.limits import ENCODER_VARIANTS
from runtime.manifest import PRECISIONS, GraphSpec, ModelInfo, TensorSpec, is_variant, variant_name
from runtime.schedule import encoder_capacities, max_tokens_per_step
from training.config import FARConfig
from training.model import FAR, TokenUpdateStep, VAEDecoderStep, backbone_step, head_step
from training.vae import AutoencoderKL

# int8 graphs are exported fp32, then quantized
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.float32}
NUMPY_NAMES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "int8": "float32"}

# What stays fp32 inside a reduced-precision graph, by kind (training/layers.py, the models' explicit casts).
_ISLANDS = {
    "backbone": ("LayerNorm statistics", "attention logits + mask bias + softmax", "graph inputs/outputs"),
    "shortcut": ("LayerNorm statistics", "timestep sinusoid", "graph inputs/outputs"),
    "mar": (
        "diffusion head network (eps, variance)",
        "DDPM posterior (mean, variance, noise)",
        "graph inputs/outputs",
    ),
    "vae_decoder": ("GroupNorm statistics", "attention logits + softmax", "graph inputs/outputs"),
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
MAR_INT8_NOTE = (
    "the MAR head network stays fp32 in an int8 build (an island: its DDPM posterior needs eps to "
    "~1e-4 relative, see far_export/graphs.py)"
)


# ----------------------------------------------------------------------------
# Sizes and the I/O contract
# ----------------------------------------------------------------------------


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


def model_info(cfg: FARConfig, shapes: GraphShapes) -> ModelInfo:
    """The runtime's view of the model (the manifest's `model`): the checkpoint's config at the build's
    sizes; its default guidance scale is 1 when the graphs are built without guidance."""
    return ModelInfo(
        backbone=cfg.backbone,
        head=cfg.head,
        img_size=cfg.img_size,
        grid=cfg.grid,
        seq_len=cfg.seq_len,
        token_dim=cfg.token_dim,
        latent_channels=cfg.vae.embed_dim,
        patch_size=cfg.patch_size,
        latent_scale=cfg.latent_scale,
        num_classes=cfg.num_classes,
        num_iter=shapes.num_iter,
        max_query=shapes.max_query,
        width=cfg.width,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        head_dim=cfg.head_dim,
        shortcut_levels=cfg.shortcut_levels,
        diffusion_steps=cfg.diffusion_steps,
        head_steps=cfg.resolved_head_steps,
        cfg=cfg.cfg if shapes.guided else 1.0,
        cfg_schedule=cfg.cfg_schedule,
        temperature=cfg.temperature,
    )


def _t(name: str, shape: tuple[int, ...], dtype: str = "float32") -> TensorSpec:
    return TensorSpec(name=name, shape=tuple(int(s) for s in shape), dtype=dtype)


def graph_specs(cfg: FARConfig, shapes: GraphShapes, precision: str = "fp32") -> dict[str, GraphSpec]:
    """The graph I/O contract for this model, these build sizes and this precision: per graph its file, static
    inputs and outputs, the precision it runs at and its fp32 islands (`sha256` is filled in once written)."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown precision {precision!r}; choose from {', '.join(PRECISIONS)}")
    B, L, C, D = shapes.batch, cfg.seq_len, cfg.token_dim, cfg.width
    g = 2 if shapes.guided else 1
    N, Q = shapes.rows, shapes.max_query
    if cfg.backbone == "masked":
        backbone_in = (
            _t("tokens", (B, L, C)),
            _t("mask", (B, L)),
            _t("labels", (B,), "int64"),
            _t("query", (B, Q), "int64"),
        )
        backbone_out: tuple[TensorSpec, ...] = (_t("z", (g * N, D)),)
    else:
        cache = (cfg.depth, 2, g * B, cfg.num_heads, L, cfg.head_dim)
        cdt = NUMPY_NAMES[precision]
        backbone_in = (
            _t("prev_token", (B, C)),
            _t("pos", (1,), "int64"),
            _t("labels", (B,), "int64"),
            _t("cache", cache, cdt),
        )
        backbone_out = (_t("z", (g * B, D)), _t("cache_out", cache, cdt))
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
    update_in = (
        _t("tokens", (B, L, C)),
        _t("mask", (B, L)),
        _t("x", (N, C)),
        _t("query", (B, Q), "int64"),
        _t("n", (1,), "int64"),
    )
    io = {
        "backbone": (backbone_in, backbone_out, 0),
        **{
            variant_name(c): ((*backbone_in, _t("known", (B, c), "int64")), backbone_out, c)
            for c in shapes.encoder_capacities
        },
        "head": (head_in, (_t("x_next", (N, C)),), 0),
        "update": (update_in, (_t("tokens_out", (B, L, C)), _t("mask_out", (B, L))), 0),
        "vae_decoder": (
            (_t("tokens", (B, L, C)),),
            (_t("image", (B, 3, cfg.img_size, cfg.img_size)),),
            0,
        ),
    }
    specs = {}
    for name, (inputs, outputs, capacity) in io.items():
        runs_at = _rules(name, cfg, precision)[0]
        specs[name] = GraphSpec(
            file=f"{name}.onnx",
            sha256="",
            inputs=inputs,
            outputs=outputs,
            precision=runs_at,
            fp32_islands=fp32_islands(name, cfg, runs_at),
            known_capacity=capacity,
        )
    return specs


def _kind(name: str, cfg: FARConfig) -> str:
    """backbone (an encoder variant too), shortcut | mar (the head), update or vae_decoder."""
    return cfg.head if name == "head" else "backbone" if is_variant(name) else name


def _rules(name: str, cfg: FARConfig, precision: str) -> tuple[str, str | None, bool]:
    """Of graph `name` in a `precision` build: (the precision it runs at, why when that is not the build's,
    whether a failed check ships its fp32 export instead of stopping the build)."""
    kind = _kind(name, cfg)
    if kind == "update":  # it only moves values: fp32 in every build, nothing to fall back from
        return "fp32", None, False
    if kind == "mar" and precision == "int8":
        return "fp32", MAR_INT8_NOTE, False
    # a quantized graph may fail on real inputs, and a reduced-precision VAE on its conv stack
    return precision, None, precision == "int8" or (kind == "vae_decoder" and precision != "fp32")


def fp32_islands(graph: str, cfg: FARConfig, precision: str = "fp16") -> tuple[str, ...]:
    """What runs in fp32 inside `graph` (an encoder variant: as the backbone) when it runs at `precision`."""
    if precision == "fp32":
        return ()
    return (_INT8_ISLANDS if precision == "int8" else _ISLANDS).get(_kind(graph, cfg), ())


# ----------------------------------------------------------------------------
# The torch modules behind the graphs
# ----------------------------------------------------------------------------


class _DiffusionHeadInContractOrder(nn.Module):
    """The MAR head step with the contract's argument order (the guidance scale input only when guided)."""

    def __init__(self, step: nn.Module, guided: bool):
        super().__init__()
        self.step, self.guided = step, guided

    def forward(self, x, t, z, *rest):
        if self.guided:
            scale, coef, noise = rest
        else:
            (coef, noise), scale = rest, None
        return self.step(x, t, z, scale, coef, noise)


def graph_modules(
    model: FAR,
    vae: AutoencoderKL,
    guided: bool,
    precision: str = "fp32",
    variants: tuple[str, ...] = (),
) -> dict[str, nn.Module]:
    """The eval-mode torch modules that the graphs compute, in `precision` (copies when not fp32); the
    encoder `variants` (graph names) are the backbone's module given a `known` input."""
    dtype = TORCH_DTYPES[precision]
    m = model if dtype == torch.float32 else copy.deepcopy(model)
    if m is not model:
        m.backbone.to(dtype)
        # The MAR head's network stays fp32, weights included (an island, see _ISLANDS): the posterior's
        # x0 = c0 * x - c1 * eps has c1 = sqrt(1/alpha_bar - 1) ~ 2e4 at t ~ T, so an fp16 eps (rounding ~5e-4
        # relative, from fp16 weights as much as from fp16 activations) moves x0 by ~10 there, across the x0
        # clamp. The head is small next to the backbone (mar-mnist: 0.35M of 1.57M parameters).
        if model.cfg.head != "mar":
            m.head.to(dtype)
    v = vae if dtype == torch.float32 else copy.deepcopy(vae).to(dtype)
    head = head_step(m, guided)
    if model.cfg.head == "mar":
        head = _DiffusionHeadInContractOrder(head, guided)
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
# The records
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildGraph:
    """One graph of a build: everything the build exports, checks and lists about it."""

    name: str
    spec: GraphSpec  # file, I/O, the precision it runs at and its fp32 islands (sha256: once written)
    module: nn.Module  # what it computes (an int8 graph: the fp32 module it is quantized from)
    reference: nn.Module  # what it must equal: the fp32 module, the checkpoint's meaning
    tolerance: (
        Tolerance  # its outputs against `reference`, relative to their scale (far_export/tolerances.py)
    )
    falls_back: bool  # a failed check ships its fp32 export instead (False: the build stops)
    note: str | None = None  # why it runs as it does, when not as the build asked

    @property
    def file(self) -> str:
        return self.spec.file

    @property
    def precision(self) -> str:
        return self.spec.precision

    def as_fp32(self, note: str | None) -> BuildGraph:
        """This graph after a fallback: the fp32 module and its export, fp32's tolerance, no islands."""
        return dataclasses.replace(
            self,
            spec=dataclasses.replace(self.spec, precision="fp32", fp32_islands=()),
            module=self.reference,
            tolerance=TOLERANCES["fp32"],
            falls_back=False,
            note=note,
        )


def build_graphs(
    model: FAR, vae: AutoencoderKL, shapes: GraphShapes, precision: str
) -> dict[str, BuildGraph]:
    """The records of every graph of a `precision` build of `model` and `vae` at `shapes`, in export order."""
    cfg = model.cfg
    specs = graph_specs(cfg, shapes, precision)
    modules = graph_modules(model, vae, shapes.guided, precision, shapes.variant_names)
    refs = (
        modules
        if TORCH_DTYPES[precision] == torch.float32
        else graph_modules(model, vae, shapes.guided, "fp32", shapes.variant_names)
    )
    graphs = {}
    for name, spec in specs.items():
        _, note, falls_back = _rules(name, cfg, precision)
        graphs[name] = BuildGraph(
            name=name,
            spec=spec,
            module=modules[name],
            reference=refs[name],
            tolerance=TOLERANCES[spec.precision],
            falls_back=falls_back,
            note=note,
        )
    return graphs

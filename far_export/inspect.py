"""`far-export inspect`: an engine directory's manifest, readable (or as JSON)."""

from __future__ import annotations

import json
from pathlib import Path

from runtime.manifest import Manifest, ManifestError, TensorSpec, load_manifest


def _tensors(specs: tuple[TensorSpec, ...]) -> str:
    return ", ".join(f"{t.name} {t.dtype}[{','.join(map(str, t.shape))}]" for t in specs)


def _stats(d: dict) -> str:
    return f"max {d['max']:.2g} mean {d['mean']:.2g} p99 {d['p99']:.2g}"


def describe(directory: str | Path, as_json: bool = False) -> str:
    """The manifest of `directory` (graph files verified against their sha256) as text."""
    m = load_manifest(directory)
    if as_json:
        return json.dumps(m.to_dict(), indent=2)
    return "\n".join(lines(m, Path(directory)))


def lines(m: Manifest, directory: Path) -> list[str]:
    mi = m.model
    out = [
        f"{directory}: {m.producer}, schema {m.schema_version}, created {m.created}",
        f"  checkpoint sha256 {m.checkpoint_sha256[:16]}...",
        f"  precision {m.precision}, batch {m.batch}, "
        f"cfg guidance {'on (batch doubled inside)' if m.cfg_guidance else 'off'}",
        f"  model: {mi.backbone} backbone ({mi.depth} blocks, width {mi.width}, {mi.num_heads} heads), "
        f"{mi.head} head; {mi.img_size}x{mi.img_size} images, {mi.grid}x{mi.grid} tokens of "
        f"{mi.token_dim} channels, {mi.num_classes} classes",
        f"  schedule: {mi.num_iter} AR steps, up to {mi.max_query} tokens per step; "
        f"defaults: K={mi.head_steps}, cfg {mi.cfg} ({mi.cfg_schedule}), temperature {mi.temperature}",
        "  graphs:",
    ]
    for name, g in m.graphs.items():
        size = (directory / g.file).stat().st_size / 1e6 if (directory / g.file).exists() else 0.0
        islands = f"; fp32 islands: {', '.join(g.fp32_islands)}" if g.fp32_islands else ""
        variant = f"encoder on <= {g.known_capacity} known tokens, " if g.known_capacity else ""
        out += [
            f"    {name}: {g.file} ({variant}{size:.1f} MB, {g.precision}{islands})",
            f"      in:  {_tensors(g.inputs)}",
            f"      out: {_tensors(g.outputs)}",
        ]
    sw = m.shared_weights
    if sw is not None:
        f = directory / sw.file
        size = f.stat().st_size / 1e6 if f.exists() else 0.0
        out.append(f"  shared weights: {sw.file} ({size:.1f} MB, one copy for {', '.join(sw.graphs)})")
    try:
        out += _validation(m.validation)
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as e:  # hand-edited or foreign data
        raise ManifestError(
            f"manifest field validation is malformed ({type(e).__name__}: {e}); rebuild with far-export build"
        ) from None
    if m.engines:
        out.append("  TensorRT engines:")
        for name, e in m.engines.items():
            out.append(
                f"    {name}: {e.file} for TensorRT {e.tensorrt_version} on {e.gpu_name} "
                f"(sm {e.compute_capability}), key {e.build_key[:12]}"
            )
    else:
        out.append("  TensorRT engines: none (build them on the device: far-export compile DIR)")
    return out


def _validation(v: dict) -> list[str]:
    """The validation record's lines (the manifest keeps it as free-form data: checked here as it is read)."""
    out: list[str] = []
    if not v:
        return ["  validation: none recorded"]
    out.append(f"  validation ({v.get('backend', '?')}; {'passed' if v.get('passed') else 'NOT passed'}):")
    for name, res in v.get("graphs", {}).items():
        for kind, per_out in res.items():
            for o, st in per_out.items():
                out.append(f"    {name}.{o} ({kind} inputs): {_stats(st)}")
    e2e = v.get("end_to_end")
    if e2e:
        out.append(
            f"    end to end, runtime.pipeline vs reference sampler (seed {e2e['settings']['seed']}, "
            f"labels {e2e['labels']}): tokens {_stats(e2e['tokens'])}; image {_stats(e2e['image'])}"
        )
    for name, note in v.get("notes", {}).items():
        out.append(f"    note ({name}): {note}")
    return out

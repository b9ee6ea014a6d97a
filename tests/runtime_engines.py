"""Engine directories for the runtime tests, built once per pytest session with far_export.build.

    ckpt, engines = built_engines(tmp_path_factory, "masked", "shortcut")

Tiny preset, randomised weights (conftest.make_tiny_checkpoint), batch 2, CFG
guidance on (the tiny preset's default cfg is 2.0), no TensorRT. Builds skip the
exporter's own validation: the runtime tests compare against the reference
sampler themselves.
"""

from __future__ import annotations

from pathlib import Path

import pytest

_BUILT: dict[tuple, tuple[Path, Path]] = {}


def built_engines(
    tmp_path_factory: pytest.TempPathFactory,
    backbone: str = "masked",
    head: str = "shortcut",
    precision: str = "fp32",
    batch: int = 2,
    guided: bool = True,
    encoder_variants: int = 3,
    **changes,
) -> tuple[Path, Path]:
    """(checkpoint dir, engine dir), cached for the session; `changes` go to the tiny config."""
    key = (backbone, head, precision, batch, guided, encoder_variants, tuple(sorted(changes.items())))
    if key not in _BUILT:
        from conftest import make_tiny_checkpoint

        from far_export.build import BuildOptions, build

        root = tmp_path_factory.mktemp(f"rt-{backbone}-{head}-{precision}-b{batch}-e{encoder_variants}")
        ckpt = root / "ckpt"
        if not ckpt.exists():
            make_tiny_checkpoint(ckpt, backbone, head, seed=0, **changes)
        opts = BuildOptions(
            precision=precision,
            batch=batch,
            cfg_guidance=guided,
            validate=False,
            end_to_end=False,
            engines=False,
            encoder_variants=encoder_variants,
        )
        build(ckpt, root / "engines", opts, log=lambda s: None)
        _BUILT[key] = (ckpt, root / "engines")
    return _BUILT[key]

"""The limits of a model, a build and a request: far above any real use, low enough to refuse a crafted or
mistyped value before memory runs out. One table for the whole project: training/config.py checks a
checkpoint's config against it, runtime/manifest.py an engine directory's model, far_export a build's
options (stdlib only).
"""

from __future__ import annotations

# -- a request or a build ---------------------------------------------------------------------------------
MAX_BATCH = 4096  # images per graph call
MAX_IMAGES = 1_000_000  # images per sampling request (generated and written batch by batch)
MAX_GRID_IMAGES = 4096  # a grid picture is held in memory whole
MAX_CFG = 1000.0  # |guidance scale|: float32 buffers hold it, and no real sampler goes near it
MAX_TEMPERATURE = 100.0
ENCODER_VARIANTS = 3  # masked backbone: encoder variants a build exports by default (0: none)
MAX_ENCODER_VARIANTS = 16

# -- a model: the largest value of each size, by its name in FARConfig and in the manifest's ModelInfo ------
MODEL_LIMITS = {
    "img_size": 4096,
    "grid": 1024,  # tokens per side
    "seq_len": 1 << 20,
    "token_dim": 1 << 16,
    "latent_channels": 1 << 16,
    "patch_size": 1024,
    "num_classes": 1 << 20,
    "num_iter": 1 << 16,
    "max_query": 1 << 20,
    "width": 16384,
    "head_width": 16384,
    "buffer_size": 4096,
    "enc_depth": 256,
    "dec_depth": 256,
    "head_depth": 256,
    "depth": 1024,  # enc_depth + dec_depth
    "num_heads": 1024,
    "head_dim": 1 << 16,
    "shortcut_levels": 16,
    "diffusion_steps": 100_000,  # MAR trains with 1000; the head's schedule table is built on the host
    "head_steps": 100_000,
}

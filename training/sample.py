"""The PyTorch reference sampler: the autoregressive loop for both backbones and both heads.

Randomness follows the contract in `runtime/schedule.py` (image i draws from
PCG64([seed, i]), in a fixed order), so the lean runtime produces the same tokens
and the same PNG for the same seed and settings.

    python training/sample.py --checkpoint checkpoints/far-mnist --classes 0-9 --per-class 4 \
        --head-steps 4 --cfg 2.0 --seed 0 --out grid.png
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from runtime.errors import RequestError, sampling_numbers
from runtime.schedule import (
    SamplingSettings,
    causal_schedule,
    cfg_scale,
    ddpm_sampling_schedule,
    image_rng,
    known_positions,
    masked_positions,
    masked_schedule,
    shortcut_times,
)
from training.config import DiTConfig, ModelConfig, check_euler_steps
from training.dit import DiT, DiTStep
from training.model import FAR, CausalBackboneStep, MaskedBackboneStep, VAEDecoderStep, head_step
from training.vae import AutoencoderKL


def resolve_settings(model_cfg: ModelConfig, /, seed: int = 0, **overrides) -> SamplingSettings:
    """SamplingSettings.resolve (runtime/schedule.py) for a FAR config; for a DiT its own rules:
    head_steps is N, the Euler steps over the whole grid, with one CFG scale at every step and no AR steps."""
    cfg = model_cfg  # positional-only, so that `cfg=` (the guidance scale) can be an override
    if not isinstance(cfg, DiTConfig):
        return SamplingSettings.resolve(cfg, seed=seed, **overrides)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides.get("cfg_schedule", "constant") != "constant":
        raise RequestError("DiT uses one CFG scale at every step: cfg_schedule must be 'constant'")
    if "num_iter" in overrides:
        raise RequestError("DiT has no autoregressive steps: num_iter does not apply (use head_steps)")
    values = {"head_steps": cfg.sample_steps, "cfg": cfg.cfg, "temperature": cfg.temperature, **overrides}
    values["cfg"], values["temperature"] = sampling_numbers(
        values["cfg"], values["temperature"]
    )  # no NaN/inf
    s = SamplingSettings(seed=seed, **{**values, "cfg_schedule": "constant", "num_iter": 1})
    check_euler_steps(s.head_steps)
    return s


def _f32(a: np.ndarray | list | float) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float32))


class _Head:
    """Runs K (shortcut) or N (MAR) head steps on the rows of one AR step, drawing noise per contract."""

    def __init__(self, model: FAR, s: SamplingSettings, guided: bool):
        self.kind, self.s = model.cfg.head, s
        self.C = model.cfg.token_dim
        self.step = head_step(model, guided)
        if self.kind == "shortcut":
            self.times = shortcut_times(s.head_steps)
        else:
            self.times, self.coef = ddpm_sampling_schedule(model.cfg.diffusion_steps, s.head_steps)

    def __call__(
        self, z: torch.Tensor, rngs: list[np.random.Generator], n: int, cfg_iter: float
    ) -> torch.Tensor:
        s, C = self.s, self.C
        cfg_t = _f32([cfg_iter])
        if self.kind == "shortcut":
            x = _f32(np.concatenate([s.temperature * r.standard_normal((n, C)) for r in rngs]))
            d = _f32([1.0 / s.head_steps])
            for t in self.times:
                x = self.step(x, _f32([t]), d, z, cfg_t)
            return x
        x = _f32(np.concatenate([r.standard_normal((n, C)) for r in rngs]))
        last = len(self.times) - 1
        for j, t in enumerate(self.times):
            if j < last:
                noise = _f32(np.concatenate([s.temperature * r.standard_normal((n, C)) for r in rngs]))
            else:
                noise = torch.zeros_like(x)
            x = self.step(x, _f32([t]), z, cfg_t, _f32(self.coef[j]), noise)
        return x


@torch.no_grad()
def sample_tokens(
    model: FAR | DiT,
    labels: list[int],
    s: SamplingSettings,
    first_index: int = 0,
    progress: Callable[[int, int], None] | None = None,
    gather_known: bool = False,
) -> np.ndarray:
    """Generate token latents (B, L, C) float32 for images first_index .. first_index + B - 1.

    `gather_known` (masked backbone): the encoder runs on exactly the known tokens of each step
    (`MaskedBackbone.forward_known` without pads), as MAR's encoder does with its `nonzero` gather;
    the same tokens up to float rounding, at the encoder cost of the official code."""
    if isinstance(model, DiT):
        return sample_dit_tokens(model, labels, s, first_index, progress)
    cfg = model.cfg
    model.eval()
    B, L, C = len(labels), cfg.seq_len, cfg.token_dim
    guided = s.cfg != 1.0
    rngs = [image_rng(s.seed, first_index + i) for i in range(B)]
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    head = _Head(model, s, guided)
    tokens = torch.zeros(B, L, C)

    if cfg.backbone == "masked":
        bstep = MaskedBackboneStep(model, guided)
        orders = [r.permutation(L) for r in rngs]
        mask = torch.ones(B, L)
        schedule = masked_schedule(L, s.num_iter)
        for i, step in enumerate(schedule):
            pos = torch.as_tensor(np.stack([masked_positions(o, step) for o in orders]))  # (B, n)
            known = None
            if gather_known:  # every image knows L - unknown_before tokens: no pads
                known = torch.as_tensor(np.stack([known_positions(o, step) for o in orders]))
            z = bstep(tokens, mask, labels_t, pos, known)
            x = head(z, rngs, step.num_pred, cfg_scale(s.cfg, s.cfg_schedule, L, step))
            rows = torch.arange(B)[:, None]
            tokens[rows, pos] = x.reshape(B, step.num_pred, C).to(tokens.dtype)
            mask[rows, pos] = 0.0
            if progress:
                progress(i + 1, len(schedule))
    else:
        Bg = 2 * B if guided else B
        bstep = CausalBackboneStep(model, guided, inplace=True)  # the cache is this loop's own buffer
        cache = torch.zeros(model.backbone.cache_shape(Bg), dtype=model.backbone.z_proj.weight.dtype)
        prev = torch.zeros(B, C)
        schedule = causal_schedule(L)
        for i, step in enumerate(schedule):
            z, cache = bstep(prev, torch.tensor([i]), labels_t, cache)
            prev = head(z, rngs, 1, cfg_scale(s.cfg, s.cfg_schedule, L, step))
            tokens[:, i] = prev
            if progress:
                progress(i + 1, len(schedule))
    return tokens.cpu().numpy()


@torch.no_grad()
def sample_dit_tokens(
    model: DiT,
    labels: list[int],
    s: SamplingSettings,
    first_index: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """DiT: every token starts as temperature * noise (one (L, C) draw per image, the randomness
    contract), then N Euler steps at t_k = k / N over the whole grid."""
    cfg = model.cfg
    model.eval()
    guided = s.cfg != 1.0
    rngs = [image_rng(s.seed, first_index + i) for i in range(len(labels))]
    x = _f32(np.stack([s.temperature * r.standard_normal((cfg.seq_len, cfg.token_dim)) for r in rngs]))
    step = DiTStep(model, guided)
    labels_t, d, cfg_t = torch.as_tensor(labels, dtype=torch.long), _f32([1.0 / s.head_steps]), _f32([s.cfg])
    times = shortcut_times(s.head_steps)
    for i, t in enumerate(times):
        x = step(x, _f32([t]), d, labels_t, cfg_t)
        if progress:
            progress(i + 1, len(times))
    return x.numpy()


@torch.no_grad()
def decode_tokens(cfg: ModelConfig, vae: AutoencoderKL, tokens: np.ndarray) -> np.ndarray:
    """Token latents (B, L, C) -> images (B, 3, H, W) float32 in [0, 1]."""
    return VAEDecoderStep(cfg, vae.eval())(torch.as_tensor(tokens)).float().cpu().numpy()


def generate(
    model: FAR | DiT,
    vae: AutoencoderKL,
    labels: list[int],
    s: SamplingSettings,
    batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
    bf16: bool = False,
) -> np.ndarray:
    """Images (B, H, W, 3) uint8 for `labels`, in batches of `batch` (the result does not depend on it).
    `device` ("cuda") runs the loop there; `bf16` under torch.autocast (a timing aid: the reference
    is fp32)."""
    return np.concatenate(list(generate_batches(model, vae, labels, s, batch, progress, device, bf16)))


def generate_batches(
    model: FAR | DiT,
    vae: AutoencoderKL,
    labels: list[int],
    s: SamplingSettings,
    batch: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    device: str = "cpu",
    bf16: bool = False,
) -> Iterator[np.ndarray]:
    """`generate`, one batch (n, H, W, 3) uint8 at a time: a large request is written as it goes."""
    from runtime.images import to_uint8

    batch = batch or len(labels)
    model, vae = model.to(device), vae.to(device)
    dev = torch.device(device)
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        with dev, torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):  # new tensors on `device`
            tokens = sample_tokens(model, chunk, s, first_index=start)
            images = to_uint8(decode_tokens(model.cfg, vae, tokens))
        yield images
        if progress:
            progress(start + len(chunk), len(labels))


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------


def _cli():
    import click

    from runtime.images import ImageWriter, parse_classes, request_labels
    from runtime.options import one_line_errors, request_from_kwargs, sampling_options

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--checkpoint",
        required=True,
        type=click.Path(),
        help="Checkpoint directory (config.json + safetensors).",
    )
    @click.option("--device", default="cpu", show_default=True, help="torch device: cpu, cuda, cuda:1.")
    @click.option(
        "--bf16", is_flag=True, help="Run under torch.autocast(bfloat16) (timing; the reference is fp32)."
    )
    @sampling_options
    def main(checkpoint: str, device: str, bf16: bool, **kwargs) -> None:
        """Sample images with the PyTorch reference loop."""
        from tqdm import tqdm

        from training.checkpoint import load_checkpoint

        req = request_from_kwargs(kwargs)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise click.ClickException(
                f"--device {device}: torch sees no CUDA device (a CPU-only torch, or no GPU); "
                "use --device cpu"
            )
        torch.set_num_threads(max(1, torch.get_num_threads()))
        with one_line_errors():
            ckpt = load_checkpoint(checkpoint)
            classes = parse_classes(req.classes, ckpt.cfg.num_classes)
            labels = request_labels(classes, req.per_class)
            s = resolve_settings(
                ckpt.cfg,
                seed=req.seed,
                head_steps=req.head_steps,
                cfg=req.cfg,
                cfg_schedule=req.cfg_schedule,
                temperature=req.temperature,
                num_iter=req.num_iter,
            )
            writer = ImageWriter(
                labels, len(classes), req.out, req.out_dir, req.overwrite
            )  # bad outputs fail before any work
            with tqdm(total=len(labels), unit="img", desc="sampling") as bar:
                for images in generate_batches(
                    ckpt.model,
                    ckpt.vae,
                    labels,
                    s,
                    req.batch or 64,
                    progress=lambda done, total: bar.update(done - bar.n),
                    device=device,
                    bf16=bf16,
                ):
                    writer.add(images)
            click.echo(writer.close())
            if writer.grid_caption:
                click.echo(writer.grid_caption)

    return main


def main() -> None:
    """`far-sample` (a console script) and `python training/sample.py`."""
    _cli()()


if __name__ == "__main__":
    main()

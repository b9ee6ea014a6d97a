"""The checks before any work (the run directory, the data, the given VAE and init weights, the
model's memory, the saved states on --resume) and the resume-state reader they share with the loop."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.errors import FarError
from runtime.files import utf8_path
from runtime.limits import MODEL_LIMITS
from training.config import ConfigError, DiTConfig, FARConfig, VAEConfig
from training.model import FAR
from training.trainer.run_config import RunConfig
from training.vae import AutoencoderKL


class TrainingError(FarError, RuntimeError):
    """Training cannot go on (non-finite loss, unusable run directory, bad VAE file)."""


RUN_OPTIONS = "run.json"  # run-time options of the CLI (threads), reused by --resume
RUN_FILES = (
    "config.toml",
    RUN_OPTIONS,
    "log.jsonl",
    "latents.safetensors",
    "train_state.pt",
    "vae/train_state.pt",
    "vae/vae.safetensors",
    "vae/done",
)  # the files a run writes


def is_run(out: Path) -> bool:
    """Whether `out` holds a training run (its resolved config.toml, written first)."""
    return (out / "config.toml").is_file()


def check_out(out: Path, resume: bool) -> None:
    """The run directory can be used: a directory (or nothing yet), not inside a checkpoint or engine
    directory; --resume needs a run there, a new run needs it empty or holding an unfinished start."""
    utf8_path(out.absolute(), "--out", TrainingError)
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file, not a directory: choose another --out")
    for d in [out.resolve(), *out.resolve().parents]:
        if (d / "manifest.json").is_file() or (
            (d / "config.json").is_file() and (d / "model.safetensors").is_file()
        ):
            raise TrainingError(
                f"--out {out} is inside the checkpoint or engine directory {d}: choose a run "
                f"directory elsewhere (e.g. runs/NAME)"
            )
        if d.name in ("checkpoints", "engines") and (d.parent / "pyproject.toml").is_file():
            raise TrainingError(
                f"--out {out} is inside the project's shipped {d.name}/ folder: choose a run "
                f"directory elsewhere (e.g. runs/NAME)"
            )
    for name in RUN_FILES:  # a FIFO there would block the run's open(); a directory would fail late
        if (out / name).exists() and not (out / name).is_file():
            raise TrainingError(
                f"{out / name} is not a regular file (a directory, FIFO or device): remove it, "
                f"or start over in a new --out"
            )
    state_files = [p for p in (out / "train_state.pt", out / "vae" / "train_state.pt") if p.exists()]
    if resume and not is_run(out):
        raise TrainingError(
            f"--resume: {out} holds no run (no config.toml): check the --out path, or leave out "
            f"--resume to start a new run there"
        )
    if not resume and state_files:
        raise TrainingError(
            f"{out} already holds a run: pass --resume to continue it, or choose another --out"
        )
    if not resume and out.is_dir() and not is_run(out) and any(out.iterdir()):
        raise TrainingError(
            f"--out {out} is a directory that holds other files and no run: choose a new or empty directory"
        )


def check_run(run: RunConfig, out: Path, resume: bool) -> tuple[FARConfig | DiTConfig, AutoencoderKL | None]:
    """Everything that can be checked before any work: the run directory, the data, the given VAE and
    init weights, the model's memory, and (with resume) that the saved states fit the config.
    Returns the model config (with vae.init's VAE config) and the given VAE, if any."""
    from training.checkpoint import build_model
    from training.data import class_folders, mnist_csv_path

    check_out(out, resume)
    cfg = run.far_config()
    if run.data.source == "mnist":
        mnist_csv_path()
        if cfg.img_size < 28:
            raise TrainingError(
                f"the mnist digits are 28x28: model.img_size must be >= 28, got {cfg.img_size} "
                f"(or train on an ImageFolder with --data)"
            )
        classes = 10
    else:
        classes = len(class_folders(Path(run.data.source)))
    if classes > cfg.num_classes:
        raise TrainingError(
            f"the data has {classes} classes but model.num_classes = {cfg.num_classes}: "
            f"set model.num_classes={classes}"
        )
    given = None
    if run.vae.init:
        given, vae_cfg = load_vae_file(Path(run.vae.init), cfg.vae)
        cfg = cfg.replace(vae=vae_cfg)
    most = MODEL_LIMITS["diffusion_steps"]
    if isinstance(cfg, FARConfig) and cfg.head == "mar" and cfg.diffusion_steps > most:
        raise TrainingError(
            f"model.diffusion_steps {cfg.diffusion_steps} is beyond {most} (MAR uses 1000): choose fewer"
        )
    try:
        with torch.device("meta"):  # shapes only, no memory
            model, vae = build_model(cfg), AutoencoderKL(cfg.vae)
    except (RuntimeError, ValueError, OverflowError) as e:
        raise TrainingError(
            f"the model dims cannot be built ({str(e).splitlines()[0]}): choose smaller ones"
        ) from None
    _check_memory(model, vae, run, cfg)
    if run.train.init:
        _check_init(model, Path(run.train.init))
    if resume:
        _check_saved(model, vae, run, out)
    return cfg, given


def _check_memory(model: FAR, vae: AutoencoderKL, run: RunConfig, cfg: FARConfig) -> None:
    """Weights, EMA, gradients and AdamW's two moments (5 fp32 copies) of both networks must fit."""
    n_far = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    n_vae = sum(t.numel() for t in [*vae.parameters(), *vae.buffers()])
    need = 4 * (5 * n_far + (n_vae if run.vae.init else 5 * n_vae))
    avail = _available_memory(run.device)
    if avail is not None and need > avail:
        raise TrainingError(
            f"the model ({n_far / 1e6:.0f}M FAR + {n_vae / 1e6:.0f}M VAE parameters) needs "
            f"~{need / 1e9:.1f} GB to train (weights, EMA, optimizer), more than the "
            f"{avail / 1e9:.1f} GB available: choose smaller model dims"
        )


def _available_memory(device: str) -> int | None:
    """Bytes free for training: the GPU's free memory, or MemAvailable of /proc/meminfo (None: unknown)."""
    if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()):
        free, _ = torch.cuda.mem_get_info()
        return free
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _safetensors_shapes(path: Path, what: str) -> dict[str, tuple[int, ...]]:
    """name -> shape from a safetensors file's header (no tensor is read), as a TrainingError about `what`."""
    from training.checkpoint import CheckpointError, stored_shapes

    if not path.is_file():
        raise TrainingError(f"{what}: {path} is missing or not a regular file")
    try:
        return stored_shapes(path)
    except CheckpointError as e:
        raise TrainingError(f"{what}: {e}") from None


def init_from_other_head(model: nn.Module, path: Path) -> str | None:
    """The head kind of the checkpoint directory `path` when `model` is a FAR with another kind of head
    (then only the backbone must match: the head's matching tensors are loaded, the rest stays fresh);
    None when every tensor loads (the same kind of head, or a DiT)."""
    from training.checkpoint import CONFIG_FILE

    if model.cfg.kind != "far" or not (path / CONFIG_FILE).is_file():
        return None
    head = FARConfig.load(path / CONFIG_FILE).head
    return None if head == model.cfg.head else head


def _check_init(model: FAR, path: Path) -> None:
    from training.checkpoint import MODEL_FILE

    if not path.is_dir():
        raise TrainingError(
            f"train.init: {path} is not a checkpoint directory (config.json + {MODEL_FILE} + "
            f"vae.safetensors): give one, e.g. RUN/checkpoint"
        )
    want, saved = model.state_dict(), _safetensors_shapes(path / MODEL_FILE, "train.init")
    if init_from_other_head(model, path):  # only the backbone must match (trainer/stages.py: init_from)
        want = {k: v for k, v in want.items() if k.startswith("backbone.")}
        saved = {k: v for k, v in saved.items() if k.startswith("backbone.")}
    diff = shape_differences(want, saved)
    if diff:
        raise TrainingError(
            f"train.init: {path / MODEL_FILE} does not match the model config ({diff}): set the "
            f"model.* keys of the checkpoint's config.json, or drop train.init"
        )


def _check_saved(model: FAR, vae: AutoencoderKL, run: RunConfig, out: Path) -> None:
    """--resume: the saved states load and have the config's shapes (a changed model dim is named here,
    not as a size-mismatch traceback after the VAE stage)."""
    redo = (
        "resume with the run's own model settings (no model.* or --preset changes), "
        "or start a new run in another --out"
    )
    checks = [(out / "train_state.pt", "far", model)]
    vdir = out / "vae"
    if not run.vae.init:
        if (vdir / "done").is_file() and (vdir / "vae.safetensors").is_file():
            diff = shape_differences(
                vae.state_dict(), _safetensors_shapes(vdir / "vae.safetensors", "the run's VAE")
            )
            if diff:
                raise TrainingError(
                    f"{vdir / 'vae.safetensors'} has other dims than the config's VAE ({diff}): {redo}"
                )
        else:
            checks.append((vdir / "train_state.pt", "vae", vae))
    for path, stage, module in checks:
        if path.exists():
            state = load_state(path, stage, "start over in a new --out", mmap=True)
            diff = shape_differences(module.state_dict(), state["model"])
            if diff:
                raise TrainingError(f"{path} was trained with other model dims ({diff}): {redo}")


def check_batches(run: RunConfig, rows: int, what: str) -> None:
    """A batch larger than the data would silently be the whole data set (and may not fit in memory)."""
    stages = ((run.vae, "vae"), (run.train, "train")) if what == "images" else ((run.train, "train"),)
    for o, name in stages:
        if o.batch_size > rows:
            raise TrainingError(
                f"{name}.batch_size {o.batch_size} is larger than the {rows} training {what} "
                f"of {run.data.source}: set {name}.batch_size={rows} or less"
            )


STATE_KEYS = ("stage", "step", "model", "ema", "optimizer")


def load_state(path: Path, stage: str, remedy: str, mmap: bool = False) -> dict[str, Any]:
    """A stage's resume state (weights_only); a damaged or foreign file is a one-line TrainingError
    that names the file and `remedy` (what to do instead)."""
    if not path.is_file():
        raise TrainingError(f"{path} is not a regular file: {remedy}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types (EOFError, zip, unpickling) on damaged files
        from training.checkpoint import load_reason

        raise TrainingError(f"{path} is damaged ({load_reason(e)}) and cannot be resumed: {remedy}") from None
    if not isinstance(state, dict) or any(k not in state for k in STATE_KEYS):
        raise TrainingError(f"{path} is not a resume state (keys {', '.join(STATE_KEYS)} expected): {remedy}")
    if state["stage"] != stage:
        raise TrainingError(f"{path} holds a {state['stage']!r} stage, not {stage!r}: {remedy}")
    if type(state["step"]) is not int or state["step"] < 0:
        raise TrainingError(f"{path} has no valid step (got {state['step']!r}): {remedy}")
    return state


def shape_differences(own: dict[str, Any], saved: dict[str, Any], first: int = 3) -> str:
    """'' if the two state dicts (name -> tensor or shape) have the same keys and shapes, else the first
    few differences in one line: 'backbone.x: saved (4, 32), config (4, 64); 2 more'."""

    def shape(v: Any) -> tuple[int, ...]:
        return tuple(v.shape) if hasattr(v, "shape") else tuple(v)

    diffs = [
        f"{k}: saved {shape(saved[k])}, config {shape(own[k])}"
        for k in own
        if k in saved and shape(own[k]) != shape(saved[k])
    ]
    diffs += [f"{k}: not in the saved weights" for k in own if k not in saved]
    diffs += [f"{k}: saved, not in the config's model" for k in saved if k not in own]
    if not diffs:
        return ""
    more = f"; {len(diffs) - first} more" if len(diffs) > first else ""
    return "; ".join(diffs[:first]) + more


def load_vae_file(path: Path, vae_cfg: VAEConfig) -> tuple[AutoencoderKL, VAEConfig]:
    """A given VAE: a checkpoint dir (its config's VAE), a vae.safetensors, or MAR's kl16.ckpt."""
    from training.checkpoint import (
        CONFIG_FILE,
        VAE_FILE,
        CheckpointError,
        load_into,
        load_mar_vae,
        load_safetensors,
    )

    if not path.exists():
        raise TrainingError(
            f"vae.init: {path} does not exist: give a checkpoint directory, a vae.safetensors "
            f"or MAR's kl16.ckpt"
        )
    if not path.is_dir() and not path.is_file():
        raise TrainingError(
            f"vae.init: {path} is not a regular file (a FIFO, socket or device): give a checkpoint "
            f"directory, a vae.safetensors or MAR's kl16.ckpt"
        )
    try:
        if path.is_dir():
            if (path / CONFIG_FILE).is_file():
                vae_cfg = FARConfig.load(path / CONFIG_FILE).vae
            path = path / VAE_FILE
        vae = AutoencoderKL(vae_cfg)
        if path.suffix == ".safetensors":
            load_into(vae, load_safetensors(path), str(path))
        else:
            load_mar_vae(path, vae)
    except (CheckpointError, ConfigError) as e:
        raise TrainingError(f"vae.init: {e}") from None
    return vae, vae_cfg

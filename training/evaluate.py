"""Evaluate a checkpoint on the built-in MNIST digits, in-project (no Inception weights needed).

    python training/evaluate.py --checkpoint checkpoints/far-mnist --per-class 50
    python training/evaluate.py --checkpoint checkpoints/far-mnist --checkpoint checkpoints/mar-mnist \
        --checkpoint checkpoints/dit-mnist      # each table, then one side by side

1. A small digit classifier trained on the 4,500 training digits (cached beside the
   data cache: `<cache-dir>/mnist/classifier.safetensors`).
2. For each number of head steps (K = 1, 2, 4, ..., 128 for the shortcut head;
   25/50/100 for MAR's diffusion head; N = 4, 8, ..., 128, 250 Euler steps for a
   DiT): class-conditional samples, their class
   accuracy under the classifier, the Frechet distance between classifier features
   of the samples and of the 500 held-out real digits, and seconds per image.
3. The real-vs-real floor: the same distance between training and held-out digits,
   and what the VAE alone scores: its reconstructions of the held-out digits.

FID through torch-fidelity is added when the package (and its weights) are available.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runtime.errors import FarError
from training.data import mnist_split

CLASSIFIER_FILE = "classifier.safetensors"


class EvalError(FarError, RuntimeError):
    """Evaluation cannot run (no held-out data, bad checkpoint, bad settings)."""


# ----------------------------------------------------------------------------
# The digit classifier (its penultimate layer is the feature space)
# ----------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """(B, 3, 32, 32) images in [0, 1] -> logits (B, 10); features() -> (B, 64)."""

    def __init__(self, num_classes: int = 10, feat: int = 64):
        super().__init__()
        self.convs = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 16x16
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),  # 2x2
        )
        self.fc = nn.Linear(128 * 4, feat)
        self.out = nn.Linear(feat, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.mean(dim=1, keepdim=True) * 2 - 1  # grey, [-1, 1]
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def _shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Random translations by up to max_shift pixels (padding with the background)."""
    B, _, H, W = x.shape
    p = max_shift
    padded = F.pad(x, (p, p, p, p), value=0.0)
    dx, dy = torch.randint(0, 2 * p + 1, (2, B), generator=g)
    return torch.stack([padded[i, :, dy[i] : dy[i] + H, dx[i] : dx[i] + W] for i in range(B)])


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, epochs: int = 6, seed: int = 0
) -> DigitClassifier:
    """images (N, 3, 32, 32) in [0, 1]."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = DigitClassifier()
    opt = torch.optim.AdamW(clf.parameters(), lr=3e-3, weight_decay=1e-4)
    n, bs = len(labels), 64
    steps = epochs * (n // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for k in range(n // bs):
            idx = perm[k * bs : (k + 1) * bs]
            loss = F.cross_entropy(clf(_shift(images[idx], g)), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return clf.eval()


def load_or_train_classifier(
    cache_dir: Path, train_images: torch.Tensor, train_labels: torch.Tensor, quiet: bool = False
) -> DigitClassifier:
    from safetensors.torch import load_file

    from training.checkpoint import save_tensors

    path = cache_dir / "mnist" / CLASSIFIER_FILE
    clf = DigitClassifier()
    if path.is_file():
        try:
            clf.load_state_dict(load_file(str(path)))
            return clf.eval()
        except Exception:  # a stale or corrupt cache file: train again
            pass
    if not quiet:
        print(
            f"training the digit classifier on {len(train_labels)} images (cached at {path})", file=sys.stderr
        )
    clf = train_classifier(train_images, train_labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(clf.state_dict(), path)
    return clf


@torch.no_grad()
def classify(clf: DigitClassifier, images: torch.Tensor, batch: int = 500) -> tuple[np.ndarray, np.ndarray]:
    """images (N, 3, H, W) in [0, 1] -> predicted labels (N,), features (N, F) float64."""
    preds, feats = [], []
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        f = clf.features(x)
        preds.append(clf.out(f).argmax(-1))
        feats.append(f.double())
    return torch.cat(preds).numpy(), torch.cat(feats).numpy()


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, F) and b (M, F)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ----------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    head_steps: int
    accuracy: float
    frechet: float
    seconds_per_image: float
    fid: float | None = None


@dataclass(frozen=True)
class Report:
    checkpoint: str
    head: str
    backbone: str
    num_images: int
    cfg: float
    num_iter: int
    batch: int
    classifier_heldout_accuracy: float
    floor_frechet: float  # train vs held-out real digits
    vae_frechet: float  # VAE reconstructions of the held-out digits vs the held-out digits
    vae_accuracy: float
    rows: list[Row]
    engine: str | None = None  # samples of the runtime on this engine directory (else PyTorch's)

    @property
    def family(self) -> str:
        """FAR, MAR or DiT, as the side-by-side table names them."""
        if self.backbone == "dit":
            return "DiT"
        name = "MAR" if self.head == "mar" else "FAR"
        return name + (" (causal)" if self.backbone == "causal" else "")

    @property
    def steps_name(self) -> str:
        return "Euler steps N" if self.family == "DiT" else "head steps"

    def table(self) -> str:
        if self.backbone == "dit":
            model = "DiT, flow matching, N Euler steps over all tokens"
        else:
            model = f"{self.backbone} backbone, {self.head} head"
        lines = [
            f"checkpoint {self.checkpoint}: {model}; "
            f"{self.num_images} samples per row, cfg {self.cfg}, "
            + {"masked": f"num_iter {self.num_iter}, ", "causal": "one AR step per token, "}.get(
                self.backbone, ""
            )
            + f"batch {self.batch}"
            + (f"; samples by the runtime on {self.engine}" if self.engine else ""),
            f"classifier accuracy on the 500 held-out real digits: {self.classifier_heldout_accuracy:.1%}",
            "",
            f"| {self.steps_name} | class accuracy | Frechet distance | vs real floor | s/image |"
            + (" FID |" if self._fid else ""),
            "|---:|---:|---:|---:|---:|" + ("---:|" if self._fid else ""),
        ]
        for r in self.rows:
            fid = f" {r.fid:.2f} |" if self._fid else ""
            lines.append(
                f"| {r.head_steps} | {r.accuracy:.1%} | {r.frechet:.2f} | "
                f"{r.frechet / max(self.floor_frechet, 1e-12):.1f}x | {r.seconds_per_image:.4f} |{fid}"
            )
        fid = " - |" if self._fid else ""
        lines.append(
            f"| VAE reconstruction of held-out | {self.vae_accuracy:.1%} | {self.vae_frechet:.2f} | "
            f"{self.vae_frechet / max(self.floor_frechet, 1e-12):.1f}x | - |{fid}"
        )
        lines.append(f"| real (train vs held-out) | - | {self.floor_frechet:.2f} | 1.0x | - |{fid}")
        return "\n".join(lines)

    @property
    def _fid(self) -> bool:
        return any(r.fid is not None for r in self.rows)


DIT_STEPS = [4, 8, 16, 32, 64, 128, 250]


def default_head_steps(head: str, levels: int) -> list[int]:
    return [2**i for i in range(levels)] if head == "shortcut" else [25, 50, 100]


def side_by_side(reports: list[Report]) -> str:
    """One table over several checkpoints (FAR's K, MAR's steps, DiT's N), rows sorted by time per image."""
    lines = ["| model | steps | class accuracy | Frechet distance | s/image |", "|---|---|---:|---:|---:|"]
    letter = {"DiT": "N", "MAR": "steps"}
    rows = [
        (r.seconds_per_image, rep.family, letter.get(rep.family, "K"), r) for rep in reports for r in rep.rows
    ]
    for sec, family, letter, r in sorted(rows, key=lambda x: x[0]):
        lines.append(
            f"| {family} | {letter} = {r.head_steps} | {r.accuracy:.1%} | {r.frechet:.2f} | {sec:.4f} |"
        )
    return "\n".join(lines)


def _fid(samples: np.ndarray, real: np.ndarray) -> float | None:
    """torch-fidelity FID between two uint8 (N, H, W, 3) sets, or None where it cannot run."""
    import importlib.util

    if importlib.util.find_spec("torch_fidelity") is None:
        return None
    import tempfile

    from PIL import Image

    try:
        import torch_fidelity

        with tempfile.TemporaryDirectory() as tmp:
            for name, arr in (("a", samples), ("b", real)):
                d = Path(tmp) / name
                d.mkdir()
                for i, im in enumerate(arr):
                    Image.fromarray(im).save(d / f"{i:05d}.png")
            m = torch_fidelity.calculate_metrics(
                input1=str(Path(tmp) / "a"), input2=str(Path(tmp) / "b"), fid=True, verbose=False
            )
        return float(m["frechet_inception_distance"])
    except Exception as e:  # no weights offline, etc.
        print(
            f"torch-fidelity FID skipped: {str(e).splitlines()[0] if str(e) else type(e).__name__}",
            file=sys.stderr,
        )
        return None


def _engine_sampler(engine: str | Path, checkpoint: str | Path, threads: int | None) -> tuple[Any, int]:
    """(generate(labels, settings, batch) over the runtime on an engine directory built from `checkpoint`,
    the engine's batch: the most images per call)."""
    from runtime.pipeline import Pipeline
    from training.checkpoint import checkpoint_sha256

    pipe = Pipeline.load(engine, threads=threads)
    if pipe.manifest.checkpoint_sha256 != checkpoint_sha256(checkpoint):
        raise EvalError(
            f"--engine {engine} was not built from --checkpoint {checkpoint} (checkpoint sha256 differs); "
            f"pass the checkpoint it was built from or rebuild it"
        )

    def generate(labels: list[int], s: Any, batch: int) -> np.ndarray:
        return pipe.generate(
            labels,
            head_steps=s.head_steps,
            cfg=s.cfg,
            cfg_schedule=s.cfg_schedule,
            temperature=s.temperature,
            num_iter=s.num_iter,
            seed=s.seed,
            batch=min(batch, pipe.B),
        )

    return generate, pipe.B


def evaluate(
    checkpoint: str | Path,
    head_steps: list[int] | None = None,
    per_class: int = 50,
    seed: int = 0,
    batch: int = 100,
    cfg: float | None = None,
    num_iter: int | None = None,
    cache_dir: str | Path = "runs/cache",
    fid: bool = True,
    progress: bool = True,
    engine: str | Path | None = None,
    threads: int | None = None,
) -> Report:
    """Scores samples of the PyTorch reference sampler, or with `engine` those of the runtime on that engine
    directory (ONNX Runtime CPU, `threads` intra-op threads): what is deployed, at its precision."""
    from runtime.images import to_uint8
    from training.checkpoint import load_checkpoint
    from training.config import DiTConfig
    from training.sample import generate, resolve_settings

    ckpt = load_checkpoint(checkpoint)
    mc = ckpt.cfg
    if engine is not None:
        sampler, engine_batch = _engine_sampler(engine, checkpoint, threads)
        batch = min(batch, engine_batch)
    else:

        def sampler(labels: list[int], s: Any, batch: int) -> np.ndarray:
            return generate(ckpt.model, ckpt.vae, labels, s, batch=batch)

    if mc.num_classes != 10 or mc.img_size < 28:
        raise EvalError(
            f"evaluate.py measures MNIST models (10 classes, >= 28 px); {checkpoint} has "
            f"{mc.num_classes} classes at {mc.img_size} px"
        )
    if per_class < 2:
        raise EvalError("per_class must be >= 2 (the Frechet distance needs a covariance)")
    steps = head_steps or (
        DIT_STEPS if isinstance(mc, DiTConfig) else default_head_steps(mc.head, mc.shortcut_levels)
    )
    settings = [resolve_settings(mc, seed=seed, head_steps=k, cfg=cfg, num_iter=num_iter) for k in steps]
    train = mnist_split("train", mc.img_size)
    held = mnist_split("heldout", mc.img_size)
    train_x, held_x = (train.images + 1) / 2, (held.images + 1) / 2
    clf = load_or_train_classifier(Path(cache_dir), train_x, train.labels, quiet=not progress)
    held_pred, held_feat = classify(clf, held_x)
    _, train_feat = classify(clf, train_x)
    floor = frechet_distance(train_feat, held_feat)
    with (
        torch.no_grad()
    ):  # what the VAE alone loses: reconstructions (posterior means) of the held-out digits
        rec = torch.cat(
            [ckpt.vae(held.images[i : i + 100], sample=False)[0] for i in range(0, len(held), 100)]
        )
    rec_pred, rec_feat = classify(clf, ((rec.float() + 1) / 2).clamp(0, 1))
    dit = isinstance(mc, DiTConfig)
    head, backbone = ("euler", "dit") if dit else (mc.head, mc.backbone)
    labels = [c for c in range(10) for _ in range(per_class)]
    report_steps = "N" if dit else "K"
    rows = []
    real_u8 = to_uint8(held_x.numpy()) if fid else None
    for k, s in zip(steps, settings):
        t = time.perf_counter()
        images = sampler(labels, s, batch)  # (N, H, W, 3) uint8
        sec = (time.perf_counter() - t) / len(labels)
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
        pred, feat = classify(clf, x)
        row = Row(
            k,
            float((pred == np.asarray(labels)).mean()),
            frechet_distance(feat, held_feat),
            sec,
            _fid(images, real_u8) if fid else None,
        )
        rows.append(row)
        if progress:
            print(
                f"{report_steps}={k}: accuracy {row.accuracy:.1%}, Frechet {row.frechet:.2f}, "
                f"{sec:.4f} s/image",
                file=sys.stderr,
            )
    first = resolve_settings(mc, seed=seed, cfg=cfg, num_iter=num_iter)
    return Report(
        str(checkpoint),
        head,
        backbone,
        len(labels),
        first.cfg,
        first.num_iter,
        batch,
        float((held_pred == held.labels.numpy()).mean()),
        floor,
        frechet_distance(rec_feat, held_feat),
        float((rec_pred == held.labels.numpy()).mean()),
        rows,
        None if engine is None else str(engine),
    )


def _head_steps(ctx: object, param: object, value: str | None) -> list[int] | None:
    import click

    if not value:
        return None
    try:
        steps = [int(k) for k in value.split(",")]
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma list of integers like 1,2,4") from None
    if any(not 1 <= k <= 100_000 for k in steps):
        raise click.BadParameter(f"{value!r}: each K must be in [1, 100000]")
    return steps


def _cli():
    import click

    from runtime.files import check_output_dir, check_output_file, write_atomic
    from runtime.limits import MAX_CFG
    from runtime.options import BATCH, SEED, THREADS, FiniteFloat, one_line_errors

    @click.command(context_settings={"help_option_names": ["-h", "--help"]})
    @click.option(
        "--checkpoint",
        "checkpoints",
        required=True,
        multiple=True,
        type=click.Path(),
        help="Checkpoint directory; repeat it for one side-by-side table of several models.",
    )
    @click.option(
        "--head-steps",
        default=None,
        callback=_head_steps,
        help="Comma list of K (default: 1,2,4,...,128 for the shortcut head, 25,50,100 for MAR's, "
        "4,8,...,128,250 Euler steps for a DiT).",
    )
    @click.option(
        "--per-class",
        type=click.IntRange(2, 10_000),
        default=50,
        show_default=True,
        help="Samples per class and row.",
    )
    @click.option(
        "--cfg",
        type=FiniteFloat(min=-MAX_CFG, max=MAX_CFG),
        default=None,
        help="Guidance scale (default: the checkpoint's).",
    )
    @click.option(
        "--num-iter",
        type=click.IntRange(min=1),
        default=None,
        help="Masked AR steps (default: the checkpoint's).",
    )
    @click.option("--batch", type=BATCH, default=100, show_default=True, help="Images per sampling batch.")
    @click.option("--seed", type=SEED, default=0, show_default=True)
    @click.option(
        "--cache-dir", default="runs/cache", show_default=True, help="Where the classifier is cached."
    )
    @click.option(
        "--engine",
        type=click.Path(),
        default=None,
        help="Score the runtime's samples from this engine directory (built from --checkpoint) instead "
        "of PyTorch's: the quality of what is deployed, at its precision.",
    )
    @click.option(
        "--threads", type=THREADS, default=None, help="torch (and with --engine ONNX Runtime) CPU threads."
    )
    @click.option("--json", "json_out", default=None, help="Also write the report as JSON here.")
    @click.option("--no-fid", is_flag=True, help="Skip torch-fidelity even where installed.")
    def main(
        checkpoints,
        head_steps,
        per_class,
        cfg,
        num_iter,
        batch,
        seed,
        cache_dir,
        engine,
        threads,
        json_out,
        no_fid,
    ):
        """Class accuracy and classifier-feature Frechet distance of class-conditional samples."""
        if threads:
            torch.set_num_threads(threads)
        with one_line_errors():
            if json_out:
                check_output_file(json_out, "--json")  # before the evaluation, not after it
            check_output_dir(cache_dir, "--cache-dir", EvalError)
            if engine and len(checkpoints) > 1:
                raise click.UsageError("--engine scores one checkpoint's engines: give one --checkpoint")
            reports = [
                evaluate(
                    c,
                    head_steps,
                    per_class,
                    seed,
                    batch,
                    cfg,
                    num_iter,
                    cache_dir,
                    fid=not no_fid,
                    engine=engine,
                    threads=threads,
                )
                for c in checkpoints
            ]
            click.echo("\n\n".join(r.table() for r in reports))
            if len(reports) > 1:
                click.echo("\nSide by side, fastest first:\n\n" + side_by_side(reports))
            if json_out:
                data = asdict(reports[0]) if len(reports) == 1 else [asdict(r) for r in reports]
                Path(json_out).parent.mkdir(parents=True, exist_ok=True)
                write_atomic(Path(json_out), json.dumps(data, indent=2) + "\n")

    return main


def main() -> None:
    """`far-evaluate` (a console script) and `python training/evaluate.py`."""
    _cli()()


if __name__ == "__main__":
    main()

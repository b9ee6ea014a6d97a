"""Evaluate a checkpoint on the built-in MNIST digits, in-project (no Inception weights needed).

    python training/evaluate.py --checkpoint checkpoints/far-mnist --per-class 50
    python training/evaluate.py --checkpoint checkpoints/far-mnist --checkpoint checkpoints/mar-mnist \
        --checkpoint checkpoints/dit-mnist      # each table, then one side by side

1. The digit classifier of training/classifier.py (trained on the 4,500 training digits, cached).
2. For each number of sampling steps (K = 1, 2, 4, ..., 128 for the shortcut head; 25/50/100 for
   MAR's diffusion head; N = 4, 8, ..., 128, 250 Euler steps for a DiT): class-conditional samples,
   their class accuracy under the classifier, the Frechet distance between classifier features of the
   samples and of the 500 held-out real digits, and seconds per image.
3. Two floors with as many images as each row (the distance grows as the sample count shrinks, so a
   row is compared with floors of its own size): real training digits, and the VAE's reconstructions
   of held-out digits, each against the same 500 held-out digits.

FID through torch-fidelity is added when the package (and its weights) are available.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runtime.errors import FarError
from training.classifier import classify, load_or_train_classifier
from training.data import mnist_split


class EvalError(FarError, RuntimeError):
    """Evaluation cannot run (no held-out data, bad checkpoint, bad settings)."""


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets a (N, F) and b (M, F)."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    sqrt_s1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


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
    floor_frechet: float  # floor_images training digits vs the 500 held-out digits
    vae_frechet: float  # VAE reconstructions of vae_images held-out digits vs the 500 held-out digits
    vae_accuracy: float
    rows: list[Row]
    engine: str | None = None  # samples of the runtime on this engine directory (else PyTorch's)
    floor_images: int = 0  # as many as num_images where the data has them (450 training digits per class)
    vae_images: int = 0  # as many as num_images where the data has them (50 held-out digits per class)

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
            f"{self.num_images} samples per row (the floors: as many digits), cfg {self.cfg}, "
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
            f"| VAE reconstruction of held-out, {self.vae_images} digits | {self.vae_accuracy:.1%} | "
            f"{self.vae_frechet:.2f} | {self.vae_frechet / max(self.floor_frechet, 1e-12):.1f}x | - |{fid}"
        )
        lines.append(
            f"| real (train vs held-out), {self.floor_images} digits | - | {self.floor_frechet:.2f} | 1.0x "
            f"| - |{fid}"
        )
        return "\n".join(lines)

    @property
    def _fid(self) -> bool:
        return any(r.fid is not None for r in self.rows)


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
    """(batches(labels, settings, batch): the images of the runtime on an engine directory built from
    `checkpoint`, a batch at a time; the engine's batch: the most images per call)."""
    from runtime.pipeline import Pipeline
    from training.checkpoint import checkpoint_sha256

    pipe = Pipeline.load(engine, threads=threads)
    if pipe.manifest.checkpoint_sha256 != checkpoint_sha256(checkpoint):
        raise EvalError(
            f"--engine {engine} was not built from --checkpoint {checkpoint} (checkpoint sha256 differs); "
            f"pass the checkpoint it was built from or rebuild it"
        )

    def batches(labels: list[int], s: Any, batch: int) -> Iterator[np.ndarray]:
        return pipe.generate_batches(
            labels,
            head_steps=s.head_steps,
            cfg=s.cfg,
            cfg_schedule=s.cfg_schedule,
            temperature=s.temperature,
            num_iter=s.num_iter,
            seed=s.seed,
            batch=min(batch, pipe.B),
        )

    return batches, pipe.B


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices of up to `per_class` images of each class (a fixed random choice), class by class."""
    rng = np.random.default_rng(seed)
    return np.concatenate(
        [
            np.sort(rng.permutation(np.flatnonzero(labels == c))[:per_class])
            for c in range(int(labels.max()) + 1)
        ]
    )


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
    from tqdm import tqdm

    from runtime.images import to_uint8
    from training.checkpoint import load_checkpoint
    from training.sample import generate_batches, resolve_settings

    ckpt = load_checkpoint(checkpoint)
    mc = ckpt.cfg
    if engine is not None:
        sampler, engine_batch = _engine_sampler(engine, checkpoint, threads)
        batch = min(batch, engine_batch)
    else:

        def sampler(labels: list[int], s: Any, batch: int) -> Iterator[np.ndarray]:
            return generate_batches(ckpt.model, ckpt.vae, labels, s, batch)

    if mc.num_classes != 10 or mc.img_size < 28:
        raise EvalError(
            f"evaluate.py measures MNIST models (10 classes, >= 28 px); {checkpoint} has "
            f"{mc.num_classes} classes at {mc.img_size} px"
        )
    if per_class < 2:
        raise EvalError("per_class must be >= 2 (the Frechet distance needs a covariance)")
    steps = head_steps or mc.sweep_steps
    settings = [resolve_settings(mc, seed=seed, head_steps=k, cfg=cfg, num_iter=num_iter) for k in steps]
    train = mnist_split("train", mc.img_size)
    held = mnist_split("heldout", mc.img_size)
    train_x, held_x = (train.images + 1) / 2, (held.images + 1) / 2
    clf = load_or_train_classifier(Path(cache_dir), train_x, train.labels, quiet=not progress)
    held_pred, held_feat = classify(clf, held_x)
    # the floors, with as many digits as a row has samples: the distance grows as the count shrinks
    real = balanced_subset(train.labels.numpy(), per_class)
    _, train_feat = classify(clf, train_x[real])
    floor = frechet_distance(train_feat, held_feat)
    recon = balanced_subset(held.labels.numpy(), per_class)
    with torch.no_grad():  # what the VAE alone loses: reconstructions (posterior means) of held-out digits
        rec = torch.cat(
            [ckpt.vae(held.images[recon[i : i + 100]], sample=False)[0] for i in range(0, len(recon), 100)]
        )
    rec_pred, rec_feat = classify(clf, ((rec.float() + 1) / 2).clamp(0, 1))
    backbone, head = mc.parts
    labels = [c for c in range(10) for _ in range(per_class)]
    letter = "N" if backbone == "dit" else "K"
    rows = []
    real_u8 = to_uint8(held_x.numpy()) if fid else None
    for k, s in zip(steps, settings):
        t = time.perf_counter()
        with tqdm(
            total=len(labels), unit="img", desc=f"{letter}={k}", disable=not progress, leave=False
        ) as bar:
            chunks = []
            for chunk in sampler(labels, s, batch):  # (n, H, W, 3) uint8
                chunks.append(chunk)
                bar.update(len(chunk))
        images = np.concatenate(chunks)
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
                f"{letter}={k}: {len(labels)} images, accuracy {row.accuracy:.1%}, "
                f"Frechet {row.frechet:.2f}, {sec:.4f} s/image",
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
        float((rec_pred == held.labels.numpy()[recon]).mean()),
        rows,
        None if engine is None else str(engine),
        len(real),
        len(recon),
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

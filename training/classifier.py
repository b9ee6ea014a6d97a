"""The digit classifier that evaluation scores samples with: a small CNN trained on the 4,500 training
digits (class accuracy of conditional samples), whose penultimate layer is the feature space of the
Frechet distance. Trained once and cached (`<cache-dir>/mnist/classifier.safetensors`)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

CLASSIFIER_FILE = "classifier.safetensors"


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

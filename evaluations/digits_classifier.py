"""A small CNN trained on the embedded digits: class accuracy of samples, and demo features.

The demo cannot use the ImageNet Inception network (its weights cannot be downloaded here and it
means little on digits), so it scores samples with this classifier trained on the digits' own
train split: the share of samples classified as the class they were asked for, and 128-d
penultimate features for a Fréchet distance against held-out real digits. Reports say so.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.digits import NUM_CLASSES, as_tensor_batch
from utils.checkpoint import load_checkpoint, save_checkpoint


class DigitsClassifier(nn.Module):
    """Three conv blocks and two linear layers over 3x32x32 images in [-1,1]."""

    def __init__(self, num_classes: int = NUM_CLASSES, feature_dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # 16x16
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),  # 4x4
            nn.Flatten(), nn.Linear(64 * 16, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> (B, feature_dim); any H,W is resized to 32."""
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_classifier(epochs: int = 15, seed: int = 0, image_size: int = 32,
                     log=print) -> tuple[DigitsClassifier, float]:
    """Train on the digits train split with small shifts; returns (model, held-out accuracy)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = as_tensor_batch("train", image_size)
    xv, yv = as_tensor_batch("heldout", image_size)
    model = DigitsClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i: i + 64]
            dx, dy = torch.randint(-2, 3, (2,), generator=g).tolist()
            xb = torch.roll(x[b], shifts=(dx, dy), dims=(2, 3))  # small translations
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    acc = accuracy(model, xv, yv)
    log(f"digits classifier: held-out accuracy {acc:.4f} after {epochs} epochs")
    return model.eval(), acc


@torch.no_grad()
def predict(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model(images[i: i + batch_size]).argmax(-1) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def features(model: DigitsClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    model.eval()
    return torch.cat([model.features(images[i: i + batch_size]) for i in range(0, len(images), batch_size)])


def accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (predict(model, images) == labels).float().mean().item()


def load_or_train(path: str | Path, log=print) -> DigitsClassifier:
    """Load the classifier from `path`, or train it and save it there (atomically)."""
    path = Path(path)
    model = DigitsClassifier()
    if path.is_file():
        model.load_state_dict(load_checkpoint(path)["model"])
        return model.eval()
    model, acc = train_classifier(log=log)
    save_checkpoint({"model": model.state_dict(), "heldout_accuracy": acc}, path)
    return model


class FeaturesAndLogits(nn.Module):
    """The classifier as a `DomainBackend` module: images -> (128-d features, logits)."""

    def __init__(self, clf: DigitsClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.clf.features(x)
        return f, self.clf.head(f)


def digits_backend(clf: DigitsClassifier, name: str = "digits_classifier", device=None, batch_size: int = 256):
    """The demo's evaluator feature backend (`evaluations/c2i/features.py:DomainBackend`)."""
    from evaluations.c2i.features import DomainBackend

    return DomainBackend(FeaturesAndLogits(clf), name, batch_size=batch_size, device=device)

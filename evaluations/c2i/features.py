"""Feature backends and the streaming activation pass.

A backend maps a uint8 NHWC batch to three arrays, the tensors the ADM evaluator reads:
`pool` [B, D] (Inception `pool_3`, for FID and precision/recall), `spatial` [B, S] (the sFID
vector, or None when the backend has none) and `probs` [B, K] (class probabilities for the
Inception Score). Backends:

- `TorchInceptionBackend`: `InceptionV3ADM` (or any module with its output contract), GPU when
  available, float32 with TF32 off;
- `TFInceptionBackend` (`inception_tf.py`): the original graph through TensorFlow;
- `DomainBackend`: any torch module mapping images to (features, logits), for data sets where
  Inception means nothing (the demo's digits). Its numbers are not comparable with ADM numbers,
  which is why every report names the backend.

`compute_activations` preallocates the [N, D] outputs and fills them batch by batch, so the
activations of 50,000 images exist once, never as a list plus a concatenated copy.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from evaluations.c2i.inception_torch import spatial_features
from utils.logger import progress


@dataclass
class Activations:
    """Per-image features of one batch file, in file order."""

    pool: np.ndarray
    spatial: np.ndarray | None
    probs: np.ndarray


class FeatureBackend(Protocol):
    name: str  # what produced the numbers, printed in every report
    batch_size: int

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """uint8 [B, H, W, 3] -> (pool [B, D], spatial [B, S] or None, probs [B, K])."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class TorchInceptionBackend:
    """A torch module returning (pool, mixed_6/conv NHWC, bias-free logits) from uint8 NHWC."""

    def __init__(self, model: nn.Module, name: str = "torch", batch_size: int = 64,
                 device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.name = name
        self.batch_size = batch_size

    @torch.no_grad()
    def __call__(self, images: np.ndarray):
        x = torch.tensor(images, device=self.device)  # a copy: batches read from a file are read-only
        # TF32 convolutions drift by ~1e-3 from the float32 graph: keep them off,
        # scoped to this call rather than switched globally.
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            pool, mixed_6_conv, logits = self.model(x)
        probs = torch.softmax(logits.float(), dim=1)
        return (pool.float().cpu().numpy(), spatial_features(mixed_6_conv).float().cpu().numpy(),
                probs.cpu().numpy())


def _digits_preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the convention of the project's models."""
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1.0


class DomainBackend:
    """Any torch module `images -> (features, logits)` (a third output, if any, is the spatial
    feature map for sFID, [B, C, H, W], flattened channels last like ADM's)."""

    def __init__(self, model: nn.Module, name: str, batch_size: int = 256,
                 preprocess: Callable[[torch.Tensor], torch.Tensor] = _digits_preprocess,
                 device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self.model = model.to(self.device).eval()
        self.name = f"domain:{name}"
        self.batch_size = batch_size
        self.preprocess = preprocess

    @torch.no_grad()
    def __call__(self, images: np.ndarray):
        x = self.preprocess(torch.tensor(images, device=self.device))
        out = self.model(x)
        if not isinstance(out, (tuple, list)) or len(out) not in (2, 3):
            raise TypeError(f"a domain backend module must return (features, logits) or "
                            f"(features, logits, spatial), got {type(out).__name__}")
        feats, logits = out[0], out[1]
        spatial = None
        if len(out) == 3:
            spatial = out[2].permute(0, 2, 3, 1).reshape(len(x), -1).float().cpu().numpy()
        return (feats.reshape(len(x), -1).float().cpu().numpy(), spatial,
                torch.softmax(logits.float(), dim=1).cpu().numpy())


def compute_activations(backend: FeatureBackend, batches: Iterable[np.ndarray], num_images: int,
                        desc: str = "activations", show_progress: bool = True) -> Activations:
    """Run `backend` over `batches` (uint8 NHWC, `num_images` in all) into preallocated arrays."""
    pool = spatial = probs = None
    filled = 0
    bar = progress(total=num_images, desc=desc, unit="img", enabled=show_progress)
    for batch in batches:
        p, s, q = backend(batch)
        if pool is None:
            pool = np.empty((num_images, p.shape[1]), dtype=np.float32)
            spatial = None if s is None else np.empty((num_images, s.shape[1]), dtype=np.float32)
            probs = np.empty((num_images, q.shape[1]), dtype=np.float32)
        n = len(p)
        if filled + n > num_images:
            raise ValueError(f"more images than announced ({num_images})")
        pool[filled: filled + n] = p
        if spatial is not None:
            spatial[filled: filled + n] = s
        probs[filled: filled + n] = q
        filled += n
        bar.update(n)
    bar.close()
    if pool is None or filled != num_images:
        raise ValueError(f"expected {num_images} images, got {filled}")
    return Activations(pool, spatial, probs)

"""The embedded demo data set: scikit-learn's handwritten digits as a 10-class image data set.

1,797 real 8x8 greyscale scans (UCI optdigits) ship inside scikit-learn, so the demo and the tests
need no download. Images are upsampled (bicubic) to a chosen size, replicated to RGB, and split
into a fixed train / held-out part (stratified, seed 0: 1,438 / 359 images).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

NUM_CLASSES = 10
CLASS_NAMES = [str(i) for i in range(NUM_CLASSES)]
HELD_OUT_FRACTION = 0.2


def load_digits_arrays(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N,8,8) in 0..255, labels int64 (N,)) of the fixed `train` / `heldout` split."""
    from sklearn.datasets import load_digits

    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    data = load_digits()
    images = np.clip(np.round(data.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = data.target.astype(np.int64)
    if split == "all":
        return images, labels
    # Stratified split with a fixed permutation: the same images on every machine.
    rng = np.random.RandomState(0)
    heldout = np.zeros(len(labels), dtype=bool)
    for c in range(NUM_CLASSES):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        heldout[idx[: int(round(len(idx) * HELD_OUT_FRACTION))]] = True
    keep = heldout if split == "heldout" else ~heldout
    return images[keep], labels[keep]


def digit_to_pil(image8: np.ndarray, image_size: int) -> Image.Image:
    """One 8x8 uint8 digit -> RGB PIL image of `image_size` (white strokes on black, bicubic)."""
    img = Image.fromarray(image8, mode="L").resize((image_size, image_size), Image.BICUBIC)
    return img.convert("RGB")


class DigitsDataset(Dataset):
    """The digits as (PIL image or transformed tensor, label, index), like `ImageFolderSafe`."""

    classes = CLASS_NAMES
    class_to_idx = {c: i for i, c in enumerate(CLASS_NAMES)}

    def __init__(self, split: str = "train", image_size: int = 32, transform=None):
        self.images, self.labels = load_digits_arrays(split)
        self.image_size, self.transform = image_size, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = digit_to_pil(self.images[i], self.image_size)
        return (self.transform(img) if self.transform else img), int(self.labels[i]), i

    def uint8_array(self) -> np.ndarray:
        """All images as uint8 NHWC (the ADM `.npz` layout), e.g. a reference batch."""
        return np.stack([np.asarray(digit_to_pil(im, self.image_size)) for im in self.images])


def export_image_folder(root: str | Path, split: str = "train", image_size: int = 32) -> Path:
    """Write the split as an ImageNet-style class-folder tree of PNGs (`root/<digit>/<i>.png`)."""
    root = Path(root)
    images, labels = load_digits_arrays(split)
    for i, (im, y) in enumerate(zip(images, labels)):
        d = root / CLASS_NAMES[y]
        d.mkdir(parents=True, exist_ok=True)
        digit_to_pil(im, image_size).save(d / f"{i:05d}.png")
    return root


def as_tensor_batch(split: str = "train", image_size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole split as a float batch in [-1,1] (N,3,S,S) and labels (N,)."""
    ds = DigitsDataset(split, image_size)
    x = torch.from_numpy(ds.uint8_array()).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    return x, torch.from_numpy(ds.labels)

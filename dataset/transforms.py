"""Image transforms of the official pipeline: ADM centre / random crops, ten-crop, [-1,1] tensors.

`center_crop_arr` and `random_crop_arr` follow ADM (guided-diffusion `image_datasets.py`), as
LlamaGen's `dataset/augmentation.py` does: BOX-halve while the short side is at least twice the
target, BICUBIC-resize the short side to the target, then crop.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image
from torchvision import transforms


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM centre crop to `image_size` x `image_size`."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def random_crop_arr(pil_image: Image.Image, image_size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0, *, rng: random.Random) -> Image.Image:
    """ADM random crop: short side resized to a random size in [size/max, size/min], random crop.
    The draws come from `rng` (a seeded `random.Random`), never from the global `random`."""
    min_smaller = math.ceil(image_size / max_crop_frac)
    max_smaller = math.ceil(image_size / min_crop_frac)
    smaller = rng.randrange(min_smaller, max_smaller + 1)
    while min(*pil_image.size) >= 2 * smaller:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = smaller / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return Image.fromarray(arr[top: top + image_size, left: left + image_size])


def to_tensor_normalized(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3,H,W) in [-1,1] (ToTensor then Normalize(0.5, 0.5))."""
    arr = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float().div(255.0).sub(0.5).div(0.5)


def ten_crop_tensor(img: Image.Image, image_size: int, crop_range: float) -> torch.Tensor:
    """The `--ten-crop` branch of code extraction -> (10,3,S,S) in [-1,1].

    ADM centre crop to int(S * crop_range), then torchvision's TenCrop(S): the four corners and the
    centre, then the same five of the horizontal mirror.
    """
    crop_size = int(image_size * crop_range)
    img = center_crop_arr(img, crop_size)
    crops = transforms.TenCrop(image_size)(img)
    return torch.stack([to_tensor_normalized(c) for c in crops])


def center_crop_tensor(img: Image.Image, image_size: int) -> torch.Tensor:
    """The default branch of code extraction -> (1,3,S,S) in [-1,1]."""
    return to_tensor_normalized(center_crop_arr(img, image_size)).unsqueeze(0)


def with_flip(x: torch.Tensor) -> torch.Tensor:
    """(n,3,S,S) -> (2n,3,S,S): the views, then their horizontal mirrors (extraction's flip views)."""
    return torch.cat([x, torch.flip(x, dims=[-1])])

"""`--dataset NAME` -> an image data set: any class-folder tree, or the embedded digits."""
from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from dataset.digits import DigitsDataset
from dataset.image_folder import ImageFolderSafe

# `imagenet` keeps the official flag value; any class-folder tree works under it or `folder`.
IMAGE_DATASETS = ("imagenet", "folder", "digits")


def build_image_dataset(name: str, data_path: str | None, transform: Callable | None,
                        image_size: int, split: str = "train") -> Dataset:
    """Items are (image, label, index); corrupt folder images come back as {'corrupt': path}.

    Every returned data set has `class_to_idx` (folder name -> id), written beside codes and
    checkpoints so that codes, checkpoints and labels can be checked against each other.
    """
    if name in ("imagenet", "folder"):
        if not data_path:
            raise ValueError(f"--dataset {name} needs --data-path <root>/<class>/<image>")
        return ImageFolderSafe(data_path, transform=transform)
    if name == "digits":
        return DigitsDataset(split=split, image_size=image_size, transform=transform)
    raise ValueError(f"unknown --dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")

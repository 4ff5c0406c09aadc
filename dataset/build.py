"""`--dataset NAME` -> an image data set: any class-folder tree, or the embedded digits."""
from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset

from dataset.digits import DigitsDataset
from dataset.image_folder import ImageFolderSafe, class_map_for

# `imagenet` keeps the official flag value; any class-folder tree works under it or `folder`.
IMAGE_DATASETS = ("imagenet", "folder", "digits")
#: the `--class-map` help of every driver that reads a class-folder data set
CLASS_MAP_HELP = ("JSON file {folder name: class id} for a class-folder data set: every folder named, ids unique "
                  "and 0..n-1 (default: the sorted folder names get 0..n-1); keeps the ids of renamed folders")


def build_image_dataset(name: str, data_path: str | None, transform: Callable | None,
                        image_size: int, split: str = "train", class_map: str | None = None) -> Dataset:
    """Items are (image, label, index); corrupt folder images come back as {'corrupt': path}.

    Every returned data set has `class_to_idx` (folder name -> id), written beside codes and
    checkpoints so that codes, checkpoints and labels can be checked against each other. A folder
    data set takes its ids from the `class_map` file (`--class-map`, checked against the folders)
    when given, else from the sorted folder names.
    """
    if name in ("imagenet", "folder"):
        if not data_path:
            raise ValueError(f"--dataset {name} needs --data-path <root>/<class>/<image>")
        class_to_idx = class_map_for(data_path, class_map) if class_map else None
        return ImageFolderSafe(data_path, transform=transform, class_to_idx=class_to_idx)
    if class_map:
        raise ValueError(f"--class-map applies to class-folder data sets (--dataset folder or imagenet), not "
                         f"--dataset {name}, whose classes are fixed")
    if name == "digits":
        return DigitsDataset(split=split, image_size=image_size, transform=transform)
    raise ValueError(f"unknown --dataset {name!r}; known: {', '.join(IMAGE_DATASETS)}")

"""Class-folder image data sets that never crash mid-epoch on a bad file.

`ImageFolderSafe` lists `root/<class>/<image>` like torchvision's ImageFolder (classes sorted,
files sorted, label = class index), but a file that cannot be decoded yields `None` instead of an
exception. `collate_skip_corrupt` drops those items and returns the skipped paths with the batch, so
the driver can count them across DataLoader workers and report them at the end.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
CLASS_INDEX_FILE = "class_to_idx.json"


class DatasetError(ValueError):
    """A data set that cannot be used as given (empty folder, no classes, mismatched class map)."""


def find_classes(root: str | Path) -> dict[str, int]:
    """Folder name -> class id, over the sorted sub-folders of `root`."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"data path {root} is not a folder")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DatasetError(f"{root} has no class sub-folders (expected <root>/<class>/<image>)")
    return {c: i for i, c in enumerate(classes)}


def list_images(root: str | Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) for every image file, classes in id order, files sorted."""
    root = Path(root)
    samples = []
    for cls, idx in sorted(class_to_idx.items(), key=lambda kv: kv[1]):
        for p in sorted((root / cls).rglob("*")):
            if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS:
                samples.append((str(p), idx))
    if not samples:
        raise DatasetError(f"{root} has class folders but no images ({', '.join(IMG_EXTENSIONS)})")
    return samples


def load_rgb(path: str) -> Image.Image | None:
    """Decode an image to RGB, or None when the file is corrupt or unreadable."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
        return None


class ImageFolderSafe(Dataset):
    """`root/<class>/<image>` -> (transform(image), label, index); corrupt files give None."""

    def __init__(self, root: str | Path, transform: Callable | None = None,
                 class_to_idx: dict[str, int] | None = None):
        self.root = Path(root)
        self.class_to_idx = class_to_idx if class_to_idx is not None else find_classes(root)
        self.classes = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.samples = list_images(root, self.class_to_idx)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        img = load_rgb(path)
        if img is None:
            return {"corrupt": path, "index": i}
        return (self.transform(img) if self.transform else img), label, i


def collate_skip_corrupt(batch: list) -> dict:
    """Collate the good items; report corrupt ones by path. Works inside DataLoader workers."""
    good = [b for b in batch if not isinstance(b, dict)]
    skipped = [b["corrupt"] for b in batch if isinstance(b, dict)]
    out = {"skipped": skipped, "skipped_indices": [b.get("index") for b in batch if isinstance(b, dict)]}
    if good:
        x, y, idx = default_collate(good)
        out.update(images=x, labels=y, indices=idx)
    return out


@dataclass
class SkipCounter:
    """Counts the corrupt files a run skipped, to report them at the end."""

    paths: list[str] = field(default_factory=list)

    def add(self, skipped: list[str]) -> None:
        self.paths.extend(skipped)

    def __len__(self) -> int:
        return len(self.paths)

    def report(self) -> str:
        if not self.paths:
            return "no corrupt or unreadable images"
        shown = "\n  ".join(self.paths[:20])
        more = f"\n  ... and {len(self.paths) - 20} more" if len(self.paths) > 20 else ""
        return f"skipped {len(self.paths)} corrupt or unreadable image(s):\n  {shown}{more}"


def write_class_index(folder: str | Path, class_to_idx: dict[str, int]) -> Path:
    """Write the class map (folder name -> id) beside codes or a checkpoint."""
    from utils.checkpoint import save_json

    return save_json(Path(folder) / CLASS_INDEX_FILE, class_to_idx)


def read_class_index(folder: str | Path) -> dict[str, int] | None:
    path = Path(folder) / CLASS_INDEX_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def check_class_index(expected: dict[str, int], found: dict[str, int] | None, where: str) -> None:
    """Raise `DatasetError` when two class maps that must agree (codes, checkpoint, labels) differ."""
    if found is None or found == expected:
        return
    only_e = sorted(set(expected) - set(found))[:10]
    only_f = sorted(set(found) - set(expected))[:10]
    moved = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:10]
    raise DatasetError(
        f"class map mismatch at {where}: {len(expected)} vs {len(found)} classes; "
        f"only in one: {only_e}, only in the other: {only_f}, different ids: {moved}"
    )

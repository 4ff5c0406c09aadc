"""Class-folder image data sets that never crash mid-epoch on a bad file.

`ImageFolderSafe` lists `root/<class>/<image>` like torchvision's ImageFolder (classes sorted,
files sorted, label = class index, or the ids of a `--class-map` file), but a file that cannot be
decoded yields `None` instead of an exception. `collate_skip_corrupt` drops those items and returns
the skipped paths with the batch, so the driver can count them across DataLoader workers and report
them at the end.
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


def _no_duplicate_names(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """`json.loads` hook: a class map that names one folder twice is refused (JSON keeps the last)."""
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise DatasetError(f"names the folder {k!r} twice")
        out[k] = v
    return out


def load_class_map(path: str | Path) -> dict[str, int]:
    """Read a `--class-map` file: a JSON object {folder name: class id}, the ids unique and 0..n-1.

    It fixes the class ids of a class-folder data set independently of its folder names, so renamed
    folders keep their ids (without it the ids follow the sorted folder names). A `DatasetError`
    names the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"--class-map {path}: no such file (a JSON object {{\"folder name\": class id, ...}})")
    try:
        raw = json.loads(path.read_text(), object_pairs_hook=_no_duplicate_names)
    except DatasetError as e:
        raise DatasetError(f"--class-map {path} {e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"--class-map {path} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"--class-map {path} must be a non-empty JSON object {{\"folder name\": class id, ...}}")
    bad = [k for k, v in raw.items() if isinstance(v, bool) or not isinstance(v, int)]
    if bad:
        raise DatasetError(f"--class-map {path}: class ids must be integers, but {bad[0]!r} has {raw[bad[0]]!r}")
    by_id: dict[int, list[str]] = {}
    for name, idx in raw.items():
        by_id.setdefault(idx, []).append(name)
    shared = sorted((i, names) for i, names in by_id.items() if len(names) > 1)
    if shared:
        i, names = shared[0]
        raise DatasetError(f"--class-map {path}: class ids must be unique, but {', '.join(map(repr, names))} all "
                           f"have id {i}")
    n = len(raw)
    outside = sorted(i for i in by_id if not 0 <= i < n)
    if outside:
        missing = sorted(set(range(n)) - set(by_id))
        raise DatasetError(f"--class-map {path}: the ids of its {n} classes must be 0..{n - 1} without gaps, but "
                           f"it has {outside[:10]} and lacks {missing[:10]}")
    return dict(raw)


def check_class_map(class_to_idx: dict[str, int], root: str | Path, source: str | Path) -> None:
    """Every class folder of `root` must be named by the class map read from `source`, and every
    class it names must be a folder there (a typo would leave a class without images)."""
    folders = set(find_classes(root))
    unnamed = sorted(folders - set(class_to_idx))
    if unnamed:
        raise DatasetError(f"--class-map {source} does not name {len(unnamed)} class folder(s) of {root}: "
                           f"{unnamed[:10]}; every folder needs an id")
    absent = sorted(set(class_to_idx) - folders)
    if absent:
        raise DatasetError(f"--class-map {source} names {len(absent)} class(es) that {root} has no folder for: "
                           f"{absent[:10]}")


def class_map_for(root: str | Path, path: str | Path) -> dict[str, int]:
    """The `--class-map` file `path`, checked in itself and against the class folders of `root`."""
    class_to_idx = load_class_map(path)
    check_class_map(class_to_idx, root, path)
    return class_to_idx


def check_class_index(expected: dict[str, int], found: dict[str, int] | None, where: str,
                      hint: str = "") -> None:
    """Raise `DatasetError` when two class maps that must agree (codes, checkpoint, labels) differ;
    `hint` (e.g. how to pass the map) ends the message."""
    if found is None or found == expected:
        return
    only_e = sorted(set(expected) - set(found))[:10]
    only_f = sorted(set(found) - set(expected))[:10]
    moved = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])[:10]
    raise DatasetError(
        f"class map mismatch at {where}: {len(expected)} vs {len(found)} classes; "
        f"only in one: {only_e}, only in the other: {only_f}, different ids: {moved}" + (f"; {hint}" if hint else "")
    )

"""Pre-extracted code indices for GPT training, from any of three layouts.

The layout is detected from what is on disk (`CodeDataset.layout` says which was found):

* `packed` (what `autoregressive/train/extract_codes_c2i.py` writes by default; `dataset/code_shards.py`):
  `<code-path>/<dataset><S>_shards/shard_<j>.npz`, codes memory-mapped, a batch read shard by shard.
* `llamagen` (`--layout official`, and LlamaGen's own `extract_codes_c2i.py`):
  `<code-path>/<dataset><S>_codes/<k>.npy` int64 (1, num_aug, N) and
  `<code-path>/<dataset><S>_labels/<k>.npy` int64 (1,), k = the image's index in the class-folder
  data set. Our extraction also writes `codes_meta.json` (tokenizer identity, image size, crop
  setting, class map, skipped images) and `class_to_idx.json` into the codes folder.
* `class-folders` (RandAR's `imagenet-llamagen-adm-256_codes.tar`, read by ARPG's
  `INatLatentDataset` in hp-l33/ARPG `dataset/imagenet.py`): `<code-path>/<class id>/<name>.npy`
  of shape (num_aug, N), label = the folder name as an integer.

Item i is the i-th image present in data set index order in every layout, and its view is drawn from
(seed, epoch, i) alone, so the packed and per-image layouts of one extraction give the same batches.

Differences from the official reader (`dataset/imagenet.py:CustomDataset`), on purpose:
* the files actually present are used (the official hard-codes `0.npy .. 1281166.npy`), so corrupt
  images that extraction skipped leave gaps instead of crashes, and any data set size works;
* a random view (flip / crop) is drawn for every item whenever num_aug > 1. Officially that happens
  only when the word "flip" is in the path; without it the official item stays (1, num_aug, N) and
  training silently runs on num_aug*N-long sequences;
* every random draw is a counter-based hash of (seed, epoch, index) (`item_draws`), so an item is the
  same in any DataLoader worker and after a resume: call `set_epoch(epoch)` before each epoch.

Kept from the official reader: the `ten_crop/` -> `ten_crop_105/` sibling rule. When the codes folder
path with `ten_crop/` replaced by `ten_crop_105/` exists (code paths `..._ten_crop` and
`..._ten_crop_105`, e.g. crop ranges 1.1 and 1.05), each item takes its codes from the sibling with
probability 0.5 (20 views per image in all), when the sibling holds that image.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.code_shards import PackedCodes, shard_settings, shards_dir
from dataset.image_folder import DatasetError, check_class_index, read_class_index
from utils.splitmix import MASK64, splitmix64_np

META_FILE = "codes_meta.json"        # beside the codes: how they were made (written by extraction)
MANIFEST_FILE = "manifest.json"      # written last by a completed extraction run
META_FORMAT = 1


class CodesError(DatasetError):
    """Codes that cannot be used as asked: missing, another tokenizer, image size or class map."""


# ---------------------------------------------------------------------------------------------
# Paths and metadata
# ---------------------------------------------------------------------------------------------


def code_dirs(code_path: str | os.PathLike, dataset: str, image_size: int) -> tuple[Path, Path]:
    """(`<code-path>/<dataset><S>_codes`, `<code-path>/<dataset><S>_labels`), the official names."""
    root = os.path.normpath(os.fspath(code_path))
    return Path(f"{root}/{dataset}{image_size}_codes"), Path(f"{root}/{dataset}{image_size}_labels")


def ten_crop_sibling(codes_dir: str | os.PathLike) -> Path | None:
    """The official `feature_dir.replace('ten_crop/', 'ten_crop_105/')`, or None when it is the same path."""
    s = os.fspath(codes_dir)
    t = s.replace("ten_crop/", "ten_crop_105/")
    return Path(t) if t != s else None


def read_meta(codes_dir: str | os.PathLike) -> dict | None:
    """The extraction metadata of a codes folder, or None when there is none (official folders)."""
    path = Path(codes_dir) / META_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CodesError(f"cannot read the code metadata {path}: {e}") from e


def npy_indices(folder: Path) -> np.ndarray:
    """Sorted integer stems of the `<k>.npy` files in `folder` (temporary and other files ignored)."""
    out = []
    with os.scandir(folder) as it:
        for e in it:
            name = e.name
            if name.endswith(".npy") and name[:-4].isdigit():
                out.append(int(name[:-4]))
    return np.array(sorted(out), dtype=np.int64)


def _short_identity(identity: dict | None) -> str:
    if not identity:
        return "unknown tokenizer"
    cfg = identity.get("config", {})
    return (f"weights sha256 {identity.get('weights_sha256', '?')[:12]}, codebook "
            f"{cfg.get('codebook_size', '?')}x{cfg.get('codebook_embed_dim', '?')}, "
            f"ch_mult {cfg.get('encoder_ch_mult', '?')}, source {identity.get('source') or '?'}")


def check_codes_compatible(code_path: str | os.PathLike, dataset: str = "imagenet", image_size: int = 256, *,
                           tokenizer_identity: dict | None = None, codebook_size: int | None = None,
                           num_tokens: int | None = None, class_to_idx: dict[str, int] | None = None,
                           data: "CodeDataset | None" = None) -> dict:
    """Refuse codes that were not made for this use; return a description of what was found.

    Checks whatever is given: the tokenizer identity (`tokenizer.loading.tokenizer_identity`, compared
    by weights hash and config), the codebook size (the GPT's vocabulary), tokens per image, and the
    class map. Folders with our metadata are checked against it (image size, tokenizer, class map);
    folders without (official extraction, RandAR archive) are checked by their file shapes and code
    range, and a tokenizer identity cannot be verified there (the description says so).
    """
    if data is None:  # the caller may pass the data set it already opened
        data = CodeDataset(code_path, dataset=dataset, image_size=image_size)
    where = str(data.codes_dir)
    meta = data.meta
    if meta is not None:
        if tokenizer_identity is not None:
            found = meta.get("tokenizer", {})
            if (found.get("weights_sha256") != tokenizer_identity.get("weights_sha256")
                    or found.get("config") != tokenizer_identity.get("config")):
                raise CodesError(
                    f"the codes in {where} were made by another tokenizer:\n"
                    f"  codes:     {_short_identity(found)}\n  expected:  {_short_identity(tokenizer_identity)}")
        if codebook_size is not None:
            cb = meta.get("tokenizer", {}).get("config", {}).get("codebook_size")
            if cb != codebook_size:
                raise CodesError(f"the codes in {where} index a codebook of {cb} entries, "
                                 f"but {codebook_size} were asked for (--vocab-size)")
    elif codebook_size is not None:
        top = data.max_code_sample()
        if top >= codebook_size:
            raise CodesError(f"the codes in {where} contain index {top}, outside a codebook of "
                             f"{codebook_size} entries (--vocab-size)")
    if num_tokens is not None and data.num_tokens != num_tokens:
        raise CodesError(f"the codes in {where} have {data.num_tokens} tokens per image, but {num_tokens} "
                         f"were asked for (image size / downsampling)")
    if class_to_idx is not None and data.class_to_idx is not None:
        check_class_index(class_to_idx, data.class_to_idx, where)
    desc = data.describe()
    if meta is None and tokenizer_identity is not None:
        desc["warning"] = "no codes_meta.json: the tokenizer that made these codes cannot be verified"
    return desc


# ---------------------------------------------------------------------------------------------
# The data set
# ---------------------------------------------------------------------------------------------


def item_draws(seed: int, epoch: int, items: np.ndarray) -> np.ndarray:
    """Two uniforms in [0, 1) per item, (n, 2) float64: a pure function of (seed, epoch, item), the
    same in any process and whether items are read one at a time or a batch at once."""
    key = splitmix64_np(np.array([seed & MASK64], dtype=np.uint64))
    key = splitmix64_np(key + np.uint64((epoch * 0x2545F4914F6CDD1D) & MASK64))
    key = splitmix64_np(key + np.asarray(items, dtype=np.int64).astype(np.uint64))
    bits = splitmix64_np(key[:, None] + np.array([1, 2], dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class FileCodes:
    """The per-image layout (`<k>.npy` per image in a codes and a labels folder), read file by file."""

    def __init__(self, codes_dir: Path, labels_dir: Path):
        self.codes_dir, self.labels_dir = codes_dir, labels_dir
        # An image counts once both its code and its label file exist (an interrupted extraction
        # can leave a code without its label; corrupt images leave gaps).
        self.indices = np.intersect1d(npy_indices(codes_dir), npy_indices(labels_dir))

    def views(self, i: int) -> np.ndarray:
        """All views of item i as (num_aug, N)."""
        return _as_views(np.load(self.codes_dir / f"{int(self.indices[i])}.npy"), self.codes_dir, i)

    def gather(self, items: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = chosen_views(self, items, views)
        labels = np.array([int(np.load(self.labels_dir / f"{int(self.indices[i])}.npy").reshape(-1)[0])
                           for i in items], dtype=np.int64)
        return codes, labels


class ClassFolderCodes:
    """The RandAR/ARPG archive: `<root>/<class id>/<name>.npy` (num_aug, N), label = folder name."""

    def __init__(self, root: Path):
        names, labels = [], []
        for cls in class_id_folders(root):
            files = sorted(e.name for e in os.scandir(root / cls) if e.name.endswith(".npy") and e.is_file())
            names.extend(f"{cls}/{f}" for f in files)
            labels.extend([int(cls)] * len(files))
        self.root = root
        self.files = np.array([n.encode() for n in names], dtype=np.bytes_)  # compact: ~1.3M names on ImageNet
        self.labels = np.array(labels, dtype=np.int64)
        self.indices = np.arange(len(self.files), dtype=np.int64)

    def views(self, i: int) -> np.ndarray:
        return _as_views(np.load(self.root / self.files[i].decode()), self.root, i)

    def gather(self, items: np.ndarray, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        codes = chosen_views(self, items, views)
        return codes, self.labels[np.asarray(items, dtype=np.int64)]


class PackedStore(PackedCodes):
    """The packed layout (`dataset/code_shards.py`) with the reading interface of the other two."""

    def views(self, i: int) -> np.ndarray:
        return self.gather(np.array([i]))[0][0]


def chosen_views(store: "FileCodes | ClassFolderCodes", items: np.ndarray, views: np.ndarray) -> np.ndarray:
    """(n, N): view `views[j]` of item `items[j]`, read file by file (the per-file layouts)."""
    if not len(items):
        return np.zeros((0, 0), np.int64)
    return np.stack([store.views(int(i))[int(v)] for i, v in zip(items, views)])


def _as_views(arr: np.ndarray, where: Path, i: int) -> np.ndarray:
    if arr.ndim not in (2, 3):
        raise CodesError(f"code file of item {i} in {where} has shape {arr.shape}, expected (num_aug, N) "
                         f"or (1, num_aug, N)")
    return arr.reshape(-1, arr.shape[-1])


def class_id_folders(root: Path) -> list[str]:
    return sorted((d.name for d in root.iterdir() if d.is_dir() and d.name.isdigit()), key=int)


class CodeDataset(Dataset):
    """Items are (codes (N,) int64, label () int64), one randomly drawn view per image.

    `code_path` is the `--code-path` of extraction (packed shards or the official per-image layout,
    found through `dataset` and `image_size`) or the root of a RandAR/ARPG class-folder archive.
    `seed` and `set_epoch(epoch)` fix every random choice, so the same (seed, epoch, index) always
    gives the same view, whichever layout holds the codes. A DataLoader fetches a whole batch through
    `__getitems__`, which reads the packed layout shard by shard instead of item by item.
    """

    def __init__(self, code_path: str | os.PathLike, dataset: str = "imagenet", image_size: int = 256,
                 seed: int = 0):
        self.code_path = Path(code_path)
        self.dataset, self.image_size, self.seed, self.epoch = dataset, image_size, seed, 0
        self.codes_dir, self.labels_dir = code_dirs(code_path, dataset, image_size)
        self.shards_dir = shards_dir(code_path, dataset, image_size)
        self.sibling: FileCodes | PackedStore | None = None
        self.meta: dict | None = None
        self.class_to_idx: dict | None = None
        if self.shards_dir.is_dir():
            self.layout = "packed"
            self.codes_dir = self.shards_dir  # where codes_meta.json lives, for checks and messages
            self._open_extracted(lambda d: PackedStore(d, expect=shard_settings(read_meta(d))),
                                 self.shards_dir)
        elif self.codes_dir.is_dir():
            self.layout = "llamagen"
            if not self.labels_dir.is_dir():
                raise CodesError(f"{self.codes_dir} has no label folder {self.labels_dir}")
            self._open_extracted(lambda d: FileCodes(d, _labels_of(d)), self.codes_dir)
        elif self.code_path.is_dir() and class_id_folders(self.code_path):
            self.layout = "class-folders"
            self.store = ClassFolderCodes(self.code_path)
            # RandAR archives carry no class map; one written beside them is honoured.
            self.class_to_idx = read_class_index(self.code_path)
        else:
            raise CodesError(
                f"no codes found at {self.code_path}: expected {self.shards_dir.name}/ (packed), or "
                f"{self.codes_dir.name}/ and {self.labels_dir.name}/ (per-image) inside it "
                f"(extract_codes_c2i.py with --dataset {dataset} --image-size {image_size}), or "
                f"class-id folders of .npy files (RandAR/ARPG archive)")
        self.indices = self.store.indices
        if len(self) == 0:
            where = self.code_path if self.layout == "class-folders" else self.codes_dir
            raise CodesError(f"{where} holds no codes")
        self.num_aug, self.num_tokens = self._probe_shape()

    # Layout detection -----------------------------------------------------------------------

    def _open_extracted(self, open_store, folder: Path) -> None:
        """The codes of an extraction folder and, by the official rule, its ten-crop sibling."""
        self.meta = read_meta(folder)
        if self.meta is not None and self.meta.get("image_size") != self.image_size:
            raise CodesError(f"{folder} records image size {self.meta.get('image_size')}, not {self.image_size}")
        self.store = open_store(folder)
        self.class_to_idx = (self.meta or {}).get("class_to_idx") or read_class_index(folder)
        sib = ten_crop_sibling(folder)
        if sib is None or not sib.is_dir():
            return
        if self.layout == "llamagen":
            sib_labels = ten_crop_sibling(self.labels_dir)
            if sib_labels is None or not sib_labels.is_dir():
                raise CodesError(f"the ten-crop sibling {sib} has no label folder {sib_labels}")
        sib_meta = read_meta(sib)
        if self.meta is not None and sib_meta is not None:
            a, b = self.meta.get("tokenizer", {}), sib_meta.get("tokenizer", {})
            if a.get("weights_sha256") != b.get("weights_sha256"):
                raise CodesError(f"the ten-crop sibling {sib} was made by another tokenizer than "
                                 f"{folder}:\n  {_short_identity(b)}\n  {_short_identity(a)}")
            check_class_index(self.meta.get("class_to_idx") or {}, sib_meta.get("class_to_idx"), str(sib))
        self.sibling = open_store(sib)
        # Position in the sibling of each item's image, or -1 where the sibling lacks it.
        pos = np.searchsorted(self.sibling.indices, self.store.indices)
        pos = np.minimum(pos, max(len(self.sibling.indices) - 1, 0))
        found = (self.sibling.indices[pos] == self.store.indices) if len(self.sibling.indices) else \
            np.zeros(len(self.store.indices), bool)
        self.sibling_pos = np.where(found, pos, -1)

    def _probe_shape(self) -> tuple[int, int]:
        if self.meta is not None and "num_aug" in self.meta and "num_tokens" in self.meta:
            return int(self.meta["num_aug"]), int(self.meta["num_tokens"])
        arr = self.store.views(0)
        return arr.shape[0], arr.shape[1]

    # Reading --------------------------------------------------------------------------------

    def set_epoch(self, epoch: int) -> None:
        """Select the random views of `epoch` (call on every rank before each epoch, like a sampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The items of one batch, fetched together (what DataLoader calls when it exists)."""
        items = np.asarray(items, dtype=np.int64)
        u = item_draws(self.seed, self.epoch, items)
        # The official order of choices: the sibling folder first (p = 0.5), then the view.
        if self.sibling is not None:
            sib_pos = self.sibling_pos[items]
            from_sib = (sib_pos >= 0) & (u[:, 0] < 0.5)
        else:
            from_sib = np.zeros(len(items), dtype=bool)
        views = np.minimum((u[:, 1] * self.num_aug).astype(np.int64), self.num_aug - 1)
        codes = np.empty((len(items), self.num_tokens), dtype=np.int64)
        labels = np.empty(len(items), dtype=np.int64)
        for store, sel, where in ((self.store, ~from_sib, items), (self.sibling, from_sib, None)):
            if sel.any():
                pos = where[sel] if where is not None else sib_pos[sel]
                codes[sel], labels[sel] = store.gather(pos, views[sel])
        c, y = torch.from_numpy(codes), torch.from_numpy(labels)
        return list(zip(c.unbind(0), y.unbind(0)))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.__getitems__([i])[0]

    def image_index(self, i: int) -> int:
        """The data set index k of item i (its position in the archive for the class-folder layout)."""
        return int(self.indices[i])

    def max_code_sample(self, n: int = 16) -> int:
        """The largest code index over (up to) n evenly spaced images: a cheap range check."""
        picks = np.unique(np.linspace(0, len(self) - 1, num=min(n, len(self))).astype(np.int64))
        return max(int(self.store.views(int(i)).max()) for i in picks)

    def describe(self) -> dict[str, Any]:
        """What was found, for logs and checkpoints."""
        d: dict[str, Any] = {"layout": self.layout, "code_path": str(self.code_path), "num_files": len(self),
                             "num_aug": self.num_aug, "num_tokens": self.num_tokens,
                             "has_metadata": self.meta is not None}
        if self.layout != "class-folders":
            d["codes_dir"] = str(self.codes_dir)
        if self.layout == "packed":
            d["num_shards"] = len(self.store.shards)
        if self.sibling is not None:
            d["ten_crop_sibling"] = str(ten_crop_sibling(self.codes_dir))
            d["ten_crop_sibling_files"] = int((self.sibling_pos >= 0).sum())
        if self.meta is not None:
            tok = self.meta.get("tokenizer", {})
            d.update(tokenizer_sha256=tok.get("weights_sha256"), image_size=self.meta.get("image_size"),
                     ten_crop=self.meta.get("ten_crop"), crop_range=self.meta.get("crop_range"),
                     codebook_size=tok.get("config", {}).get("codebook_size"),
                     skipped_images=len(self.meta.get("skipped", [])))
        return d


def _labels_of(codes_dir: Path) -> Path:
    """The official labels folder beside a `<dataset><S>_codes` folder."""
    return codes_dir.with_name(codes_dir.name[: -len("_codes")] + "_labels")

"""Pre-extracted code indices for GPT training: the LlamaGen layout and the RandAR/ARPG archive layout.

Two layouts are read, detected from what is on disk (`CodeDataset.layout` says which was found):

* `llamagen` (what `autoregressive/train/extract_codes_c2i.py` and the official extraction write,
  LlamaGen's own `extract_codes_c2i.py`): `<code-path>/<dataset><S>_codes/<k>.npy` int64 (1, num_aug, N) and
  `<code-path>/<dataset><S>_labels/<k>.npy` int64 (1,), k = the image's index in the class-folder
  data set. Our extraction also writes `codes_meta.json` (tokenizer identity, image size, crop
  setting, class map, skipped images) and `class_to_idx.json` into the codes folder.
* `class-folders` (RandAR's `imagenet-llamagen-adm-256_codes.tar`, read by ARPG's
  `INatLatentDataset` in hp-l33/ARPG `dataset/imagenet.py`): `<code-path>/<class id>/<name>.npy`
  of shape (num_aug, N), label = the folder name as an integer.

Differences from the official reader (`dataset/imagenet.py:CustomDataset`), on purpose:
* the files actually present are used (the official hard-codes `0.npy .. 1281166.npy`), so corrupt
  images that extraction skipped leave gaps instead of crashes, and any data set size works;
* a random view (flip / crop) is drawn for every item whenever num_aug > 1. Officially that happens
  only when the word "flip" is in the path; without it the official item stays (1, num_aug, N) and
  training silently runs on num_aug*N-long sequences;
* every random draw comes from a `torch.Generator` seeded from (seed, epoch, index), so an item is
  the same in any DataLoader worker and after a resume: call `set_epoch(epoch)` before each epoch.

Kept from the official reader: the `ten_crop/` -> `ten_crop_105/` sibling rule. When the codes folder
path with `ten_crop/` replaced by `ten_crop_105/` exists (code paths `..._ten_crop` and
`..._ten_crop_105`, e.g. crop ranges 1.1 and 1.05), each item takes its codes from the sibling with
probability 0.5 (20 views per image in all), when the sibling holds that image.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from dataset.image_folder import DatasetError, check_class_index, read_class_index

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


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one item's random draws, a pure function of (seed, epoch, index)."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & ((1 << 63) - 1))


class CodeDataset(Dataset):
    """Items are (codes (N,) int64, label () int64), one randomly drawn view per image.

    `code_path` is the `--code-path` of extraction (llamagen layout, found through `dataset` and
    `image_size`) or the root of a RandAR/ARPG class-folder archive. `seed` and `set_epoch(epoch)`
    fix every random choice, so the same (seed, epoch, index) always gives the same view.
    """

    def __init__(self, code_path: str | os.PathLike, dataset: str = "imagenet", image_size: int = 256,
                 seed: int = 0):
        self.code_path = Path(code_path)
        self.dataset, self.image_size, self.seed, self.epoch = dataset, image_size, seed, 0
        self.codes_dir, self.labels_dir = code_dirs(code_path, dataset, image_size)
        self.sibling_dir: Path | None = None
        self.sibling_labels_dir: Path | None = None
        self.sibling_has: np.ndarray | None = None
        self.meta: dict | None = None
        if self.codes_dir.is_dir():
            self._init_llamagen()
        elif self.code_path.is_dir() and self._class_folders():
            self._init_class_folders()
        else:
            raise CodesError(
                f"no codes found at {self.code_path}: expected {self.codes_dir.name}/ and "
                f"{self.labels_dir.name}/ inside it (extract_codes_c2i.py with --dataset {dataset} "
                f"--image-size {image_size}), or class-id folders of .npy files (RandAR/ARPG archive)")
        if len(self) == 0:
            raise CodesError(f"{self.codes_dir if self.layout == 'llamagen' else self.code_path} holds no code files")
        self.num_aug, self.num_tokens = self._probe_shape()

    # Layout detection -----------------------------------------------------------------------

    def _init_llamagen(self) -> None:
        self.layout = "llamagen"
        if not self.labels_dir.is_dir():
            raise CodesError(f"{self.codes_dir} has no label folder {self.labels_dir}")
        self.meta = read_meta(self.codes_dir)
        if self.meta is not None and self.meta.get("image_size") != self.image_size:
            raise CodesError(f"{self.codes_dir} records image size {self.meta.get('image_size')}, "
                             f"not {self.image_size}")
        # An image counts once both its code and its label file exist (an interrupted extraction
        # can leave a code without its label; corrupt images leave gaps).
        self.indices = np.intersect1d(npy_indices(self.codes_dir), npy_indices(self.labels_dir))
        self.class_to_idx = (self.meta or {}).get("class_to_idx") or read_class_index(self.codes_dir)
        sib = ten_crop_sibling(self.codes_dir)
        if sib is not None and sib.is_dir():
            sib_labels = ten_crop_sibling(self.labels_dir)
            if sib_labels is None or not sib_labels.is_dir():
                raise CodesError(f"the ten-crop sibling {sib} has no label folder {sib_labels}")
            sib_meta = read_meta(sib)
            if self.meta is not None and sib_meta is not None:
                a, b = self.meta.get("tokenizer", {}), sib_meta.get("tokenizer", {})
                if a.get("weights_sha256") != b.get("weights_sha256"):
                    raise CodesError(f"the ten-crop sibling {sib} was made by another tokenizer than "
                                     f"{self.codes_dir}:\n  {_short_identity(b)}\n  {_short_identity(a)}")
                check_class_index(self.meta.get("class_to_idx") or {}, sib_meta.get("class_to_idx"), str(sib))
            present = np.intersect1d(npy_indices(sib), npy_indices(sib_labels))
            self.sibling_dir, self.sibling_labels_dir = sib, sib_labels
            self.sibling_has = np.isin(self.indices, present)

    def _class_folders(self) -> list[str]:
        return sorted((d.name for d in self.code_path.iterdir() if d.is_dir() and d.name.isdigit()), key=int)

    def _init_class_folders(self) -> None:
        self.layout = "class-folders"
        names, labels = [], []
        for cls in self._class_folders():
            files = sorted(e.name for e in os.scandir(self.code_path / cls)
                           if e.name.endswith(".npy") and e.is_file())
            names.extend(f"{cls}/{f}" for f in files)
            labels.extend([int(cls)] * len(files))
        self.files = np.array([n.encode() for n in names], dtype=np.bytes_)  # compact: ~1.3M names on ImageNet
        self.labels = np.array(labels, dtype=np.int64)
        # RandAR archives carry no class map; one written beside them is honoured.
        self.class_to_idx = read_class_index(self.code_path)

    def _probe_shape(self) -> tuple[int, int]:
        if self.meta is not None and "num_aug" in self.meta and "num_tokens" in self.meta:
            return int(self.meta["num_aug"]), int(self.meta["num_tokens"])
        arr = self._load_views(0, sibling=False)
        return arr.shape[0], arr.shape[1]

    # Reading --------------------------------------------------------------------------------

    def _load_views(self, i: int, sibling: bool) -> np.ndarray:
        """All views of item i as (num_aug, N)."""
        if self.layout == "llamagen":
            folder = self.sibling_dir if sibling else self.codes_dir
            arr = np.load(folder / f"{int(self.indices[i])}.npy")
        else:
            arr = np.load(self.code_path / self.files[i].decode())
        if arr.ndim not in (2, 3):
            raise CodesError(f"code file of item {i} has shape {arr.shape}, expected (num_aug, N) or (1, num_aug, N)")
        return arr.reshape(-1, arr.shape[-1])

    def _label(self, i: int, sibling: bool) -> int:
        if self.layout == "llamagen":
            folder = self.sibling_labels_dir if sibling else self.labels_dir
            return int(np.load(folder / f"{int(self.indices[i])}.npy").reshape(-1)[0])
        return int(self.labels[i])

    def set_epoch(self, epoch: int) -> None:
        """Select the random views of `epoch` (call on every rank before each epoch, like a sampler)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.indices) if self.layout == "llamagen" else len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = item_generator(self.seed, self.epoch, i)
        # Official order of draws: sibling folder first (p = 0.5), then the view.
        sibling = bool(self.sibling_has is not None and self.sibling_has[i]
                       and torch.rand(1, generator=g).item() < 0.5)
        views = self._load_views(i, sibling)
        view = int(torch.randint(0, views.shape[0], (1,), generator=g).item()) if views.shape[0] > 1 else 0
        codes = torch.from_numpy(np.ascontiguousarray(views[view]).astype(np.int64))  # (N,)
        return codes, torch.tensor(self._label(i, sibling), dtype=torch.int64)

    def image_index(self, i: int) -> int:
        """The data set index k of item i (llamagen layout), or i (class-folder layout)."""
        return int(self.indices[i]) if self.layout == "llamagen" else i

    def max_code_sample(self, n: int = 16) -> int:
        """The largest code index over (up to) n evenly spaced files: a cheap range check."""
        picks = np.unique(np.linspace(0, len(self) - 1, num=min(n, len(self))).astype(np.int64))
        return max(int(self._load_views(int(i), sibling=False).max()) for i in picks)

    def describe(self) -> dict[str, Any]:
        """What was found, for logs and checkpoints."""
        d: dict[str, Any] = {"layout": self.layout, "code_path": str(self.code_path), "num_files": len(self),
                             "num_aug": self.num_aug, "num_tokens": self.num_tokens,
                             "has_metadata": self.meta is not None}
        if self.layout == "llamagen":
            d["codes_dir"] = str(self.codes_dir)
            if self.sibling_dir is not None:
                d["ten_crop_sibling"] = str(self.sibling_dir)
                d["ten_crop_sibling_files"] = int(self.sibling_has.sum())
        if self.meta is not None:
            tok = self.meta.get("tokenizer", {})
            d.update(tokenizer_sha256=tok.get("weights_sha256"), image_size=self.meta.get("image_size"),
                     ten_crop=self.meta.get("ten_crop"), crop_range=self.meta.get("crop_range"),
                     codebook_size=tok.get("config", {}).get("codebook_size"),
                     skipped_images=len(self.meta.get("skipped", [])))
        return d

"""The packed code layout: a few hundred shard files instead of two `.npy` files per image.

`<code-path>/<dataset><S>_shards/shard_<j:06d>.npz` holds the images of index range
[j * shard_size, (j + 1) * shard_size) that were readable, in index order:
  `codes`   (n, num_aug, N) in the smallest unsigned type that holds the codebook (uint16 for 16384),
  `labels`  (n,) int64, `indices` (n,) int64 (the image's index in the class-folder data set),
  `settings` a JSON string: how the codes were made (tokenizer hash, sizes, views), the shard's
            range, and the images of the range that were skipped as unreadable.
Members are stored uncompressed, so a reader memory-maps `codes` and touches only the rows it reads.
Shard j depends only on j and the data, never on the number of ranks that wrote it. Beside the
shards: `codes_meta.json`, `class_to_idx.json`, and `manifest.json` (written last by a finished run).
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataset.image_folder import DatasetError
from utils.checkpoint import atomic_write
from utils.npz_stream import NpzWriter, npz_member_memmap

SHARDS_SUFFIX = "_shards"
SHARD_PATTERN = re.compile(r"^shard_(\d{6,})\.npz$")
DEFAULT_SHARD_SIZE = 4096  # images per shard: ~310 shards for ImageNet's 1.28M


def shards_dir(code_path: str | os.PathLike, dataset: str, image_size: int) -> Path:
    """`<code-path>/<dataset><S>_shards`, beside the official `_codes` / `_labels` folders."""
    return Path(f"{os.path.normpath(os.fspath(code_path))}/{dataset}{image_size}{SHARDS_SUFFIX}")


def code_dtype(codebook_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds every code of a `codebook_size` codebook."""
    for t in (np.uint8, np.uint16, np.uint32):
        if codebook_size - 1 <= np.iinfo(t).max:
            return np.dtype(t)
    return np.dtype(np.uint64)


# What every shard records of its folder's `codes_meta.json` (and must agree with it on).
SHARD_SETTING_KEYS = ("image_size", "num_aug", "num_tokens", "ten_crop", "crop_range", "flip", "shard_size",
                      "num_images")


def shard_settings(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings of a folder's `codes_meta.json` that each of its shards repeats."""
    if meta is None:
        return None
    out = {k: meta.get(k) for k in SHARD_SETTING_KEYS if k in meta}
    out["tokenizer_sha256"] = (meta.get("tokenizer") or {}).get("weights_sha256")
    return out


def shard_path(folder: Path, j: int) -> Path:
    return folder / f"shard_{j:06d}.npz"


def num_shards(num_images: int, shard_size: int) -> int:
    return -(-num_images // shard_size)


def shard_range(j: int, shard_size: int, num_images: int) -> range:
    """The data set indices shard j covers."""
    return range(j * shard_size, min((j + 1) * shard_size, num_images))


def finished_code_shards(folder: Path) -> dict[int, Path]:
    """Shard number -> file, for every complete shard in `folder` (temporaries are not matched)."""
    if not folder.is_dir():
        return {}
    out = {}
    with os.scandir(folder) as it:
        for e in it:
            m = SHARD_PATTERN.match(e.name)
            if m:
                out[int(m.group(1))] = folder / e.name
    return dict(sorted(out.items()))


def write_code_shard(folder: Path, j: int, codes: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                     settings: dict[str, Any]) -> Path:
    """Write shard j atomically (temporary file, fsync, rename): a killed run leaves no half shard."""
    def write(f) -> None:
        with NpzWriter(f) as w:
            w.add("codes", codes)
            w.add("labels", np.asarray(labels, dtype=np.int64))
            w.add("indices", np.asarray(indices, dtype=np.int64))
            w.add("settings", np.array(json.dumps(settings, sort_keys=True)))
    return atomic_write(shard_path(folder, j), write)


def read_shard_settings(path: Path) -> dict[str, Any]:
    """The settings JSON of one shard (reads only that member)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            return json.loads(str(f["settings"]))
    except (OSError, ValueError, KeyError) as e:
        raise DatasetError(f"cannot read the code shard {path}: {e}; delete it and rerun the extraction "
                           f"to rewrite it") from e


@dataclass
class ShardInfo:
    path: Path
    count: int            # images in the shard
    offset: int           # position of its first image among all the folder's images


class PackedCodes:
    """Read-only view of a shard folder: item i is the i-th present image in data set index order.

    Holds the source index of every image (8 bytes each) and memory-maps codes and labels per
    shard on first use in each process (DataLoader workers open their own maps).
    """

    def __init__(self, folder: Path, expect: dict[str, Any] | None = None):
        self.folder = Path(folder)
        self.shards: list[ShardInfo] = []
        parts: list[np.ndarray] = []
        self.skipped: list[dict] = []
        offset = 0
        for j, path in finished_code_shards(self.folder).items():
            settings = read_shard_settings(path)
            if expect is not None:
                differ = [k for k, v in expect.items() if settings.get(k) != v]
                if differ:
                    raise DatasetError(f"the code shard {path} was made with other settings ({', '.join(differ)}) "
                                       f"than {self.folder}'s codes_meta.json: delete it and rerun the extraction")
            idx = np.asarray(npz_member_memmap(path, "indices"))
            parts.append(np.array(idx, dtype=np.int64))
            self.shards.append(ShardInfo(path, len(idx), offset))
            self.skipped.extend(settings.get("skipped", []))
            offset += len(idx)
        self.indices = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        self._offsets = np.array([s.offset for s in self.shards] + [offset], dtype=np.int64)
        self._maps: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.indices)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_maps"] = {}  # maps are per process; never pickle their contents
        return state

    def _map(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        if self._pid != os.getpid():
            self._maps, self._pid = {}, os.getpid()
        if s not in self._maps:
            path = self.shards[s].path
            # Plain ndarray views of the maps: indexing them skips np.memmap's per-call bookkeeping.
            self._maps[s] = tuple(npz_member_memmap(path, m).view(np.ndarray) for m in ("codes", "labels"))
        return self._maps[s]

    def locate(self, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard number, row in shard) of each item."""
        s = np.searchsorted(self._offsets, items, side="right") - 1
        return s, items - self._offsets[s]

    def gather(self, items: np.ndarray, views: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Codes and labels of `items`: (n, N) of the given view per item, or (n, num_aug, N) when
        `views` is None; reads shard by shard, in row order within each."""
        items = np.asarray(items, dtype=np.int64)
        s, rows = self.locate(items)
        codes_out: np.ndarray | None = None
        labels_out = np.empty(len(items), dtype=np.int64)
        for shard in np.unique(s):
            sel = np.nonzero(s == shard)[0]
            codes, labels = self._map(int(shard))
            r = rows[sel]
            got = codes[r] if views is None else codes[r, views[sel]]
            if codes_out is None:
                codes_out = np.empty((len(items), *got.shape[1:]), dtype=got.dtype)
            codes_out[sel] = got
            labels_out[sel] = labels[r]
        if codes_out is None:
            codes_out = np.zeros((0, 0), dtype=np.int64)
        return codes_out, labels_out

    def shape(self) -> tuple[int, int]:
        """(num_aug, N) of the codes."""
        codes, _ = self._map(0)
        return int(codes.shape[1]), int(codes.shape[2])

    def max_code(self) -> int:
        """The largest code in the first and last shard: a cheap range check."""
        return max(int(np.max(self._map(s)[0])) for s in {0, len(self.shards) - 1} if self.shards[s].count)

"""Image shards of large runs (the DDP sampler and the tokenizer's reconstruction), written once.

- `to_uint8`: the official post-processing (bicubic resize on [-1,1] floats, `127.5x + 128`
  clamped and truncated to uint8, NHWC).
- Shards: each rank writes its finished batches as atomic `.npz` shards named by their first global
  index; a rerun keeps the finished ones. `pack_npz` joins them in index order into the ADM `.npz`
  (`arr_0` uint8 NHWC, plus `labels`), atomically, streaming one shard at a time (`utils/npz_stream.py`),
  with the settings written beside it; `write_rows` streams shard rows in any other order (the
  reconstruction's outputs, sorted by index and shuffled).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from utils.checkpoint import atomic_write, save_json, save_npz
from utils.cli import UserError
from utils.npz_stream import ArrayStream, NpzWriter, npz_member_memmap


def to_uint8(images: torch.Tensor, image_size_eval: int | None = None) -> np.ndarray:
    """Decoded images (B,3,H,W) in about [-1,1] -> uint8 (B,S,S,3), exactly as the official driver:
    bicubic resize (align_corners False) when the size differs, then clamp(127.5x + 128) truncated."""
    x = images.float()
    if image_size_eval is not None and image_size_eval != x.shape[-1]:
        x = F.interpolate(x, size=(image_size_eval, image_size_eval), mode="bicubic", align_corners=False)
    x = torch.clamp(127.5 * x + 128.0, 0, 255).permute(0, 2, 3, 1).to("cpu", dtype=torch.uint8)
    return x.numpy()


def shard_path(folder: Path, start: int) -> Path:
    return folder / f"shard_{start:08d}.npz"


def finished_shards(folder: Path) -> dict[int, Path]:
    """First global index -> shard file, for every complete shard in `folder`."""
    return {int(p.stem.split("_")[1]): p for p in sorted(folder.glob("shard_*.npz"))}


def write_shard(folder: Path, start: int, images: np.ndarray, labels: np.ndarray) -> Path:
    return save_npz(shard_path(folder, start), images=images, labels=labels)


def write_pngs(folder: Path, start: int, images: np.ndarray) -> None:
    """Images (B, H, W, 3) uint8 as `<folder>/<index:06d>.png`, each written atomically: the PNG
    folder the official LPD sampler writes for torch-fidelity (`fidelity --input1 <folder>`)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        atomic_write(folder / f"{start + i:06d}.png", lambda f: Image.fromarray(img).save(f, format="PNG"))


def shard_member(path: Path, name: str) -> np.ndarray:
    """Member `name` of a shard, memory-mapped (shards are stored, as `np.savez` writes them); a
    compressed shard from elsewhere is loaded whole, which is still one shard."""
    try:
        return npz_member_memmap(path, name)
    except ValueError:
        with np.load(path) as f:
            return f[name]


def write_rows(stream: ArrayStream, paths: Sequence[Path], name: str, lengths: Sequence[int],
               positions: np.ndarray, chunk_rows: int) -> None:
    """Write rows `positions` of the concatenation of the shards' member `name` (shard i holding
    `lengths[i]` rows), in that order, into `stream`, `chunk_rows` rows at a time.

    For outputs in another order than the shards' (sorted by index, shuffled), without holding the
    concatenation: each chunk is gathered shard by shard from the memory-mapped shards (a chunk's rows
    may come from many), mapped and unmapped in turn, so memory holds one chunk. A contiguous run is
    copied as a slice; scattered rows through one temporary of that shard's rows in the chunk."""
    starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    positions = np.asarray(positions, dtype=np.int64)
    chunk_rows = max(1, int(chunk_rows))
    buf = np.empty((min(chunk_rows, len(positions)), *stream.shape[1:]), stream.dtype)
    for a in range(0, len(positions), chunk_rows):
        pos = positions[a:a + chunk_rows]
        shard = np.searchsorted(starts, pos, side="right") - 1  # empty shards share a start: skipped
        row = pos - starts[shard]
        out = buf[:len(pos)]
        by_shard = np.argsort(shard, kind="stable")  # each group's destinations stay ascending
        for dst in np.split(by_shard, np.flatnonzero(np.diff(shard[by_shard])) + 1):
            src = row[dst]
            images = shard_member(paths[shard[dst[0]]], name)
            if dst[-1] - dst[0] == len(dst) - 1 and np.all(np.diff(src) == 1):
                out[dst[0]:dst[-1] + 1] = images[src[0]:src[-1] + 1]
            else:
                out[dst] = images[src]
            del images  # unmaps the shard before the next one is mapped
        stream.write(out)


def pack_npz(folder: Path, out_path: Path, total: int) -> Path:
    """Join the shards covering indices [0, total) in order into the ADM `.npz` (arr_0, labels).

    Streamed, so that 50k images at 512 px (39 GB) never sit in memory: a first pass reads only the
    shards' headers and small `labels` (gaps, counts, shapes), then `arr_0` is written shard by shard
    (each memory-mapped, the last one cut at `total`) through `NpzWriter`, atomically. The result is
    array-identical to `np.savez(out, arr_0=concat(images)[:total], labels=concat(labels)[:total])`."""
    shards = finished_shards(folder)
    paths, labels, dtypes, expected, frame = [], [], [], 0, None
    for start in sorted(shards):
        if start != expected:
            raise RuntimeError(f"sample shards in {folder} have a gap at index {expected}: rerun to finish")
        with np.load(shards[start]) as f:
            labels.append(f["labels"])  # small; `images` is not read here
        images = shard_member(shards[start], "images")
        if len(images) != len(labels[-1]):
            raise RuntimeError(f"{shards[start]}: {len(images)} images but {len(labels[-1])} labels")
        if frame is not None and images.shape[1:] != frame:
            raise RuntimeError(f"{shards[start]}: images of shape {images.shape[1:]}, the earlier shards' are {frame}")
        frame = images.shape[1:]
        dtypes.append(images.dtype)
        paths.append(shards[start])
        del images
        expected += len(labels[-1])
    if expected < total:
        raise RuntimeError(f"only {expected} of {total} samples are in {folder}: rerun to finish")
    if not paths:
        raise RuntimeError(f"no sample shards in {folder}")
    dtype = np.result_type(*dtypes)  # what np.concatenate of the shards gives
    lab = np.concatenate(labels)[:total]

    def write(f: BinaryIO) -> None:
        with NpzWriter(f) as npz:
            with npz.stream("arr_0", (total, *frame), dtype) as arr:
                done = 0
                for path in paths:
                    if done == total:
                        break
                    images = shard_member(path, "images")
                    take = min(len(images), total - done)
                    arr.write(images[:take].astype(dtype, copy=False))
                    done += take
                    del images  # unmaps the shard before the next one is mapped
            npz.add("labels", lab)

    return atomic_write(out_path, write)


class SettingsMismatch(UserError, RuntimeError):
    """A shard folder already holds shards made with other settings."""


def check_shard_folder(folder: Path, settings: dict, may_change: tuple[str, ...] = ()) -> None:
    """Refuse to resume a folder whose shards were made with other settings (read-only).

    Only finished shards matter: a folder with none (a refused or killed first run) takes any
    settings. The error names every key that differs, `may_change` aside."""
    settings_file = folder / "settings.json"
    if not (settings_file.is_file() and finished_shards(folder)):
        return
    old = json.loads(settings_file.read_text())
    differ = sorted(k for k in set(old) | set(settings) if k not in may_change and old.get(k) != settings.get(k))
    if differ:
        raise SettingsMismatch(f"{folder} holds shards made with other settings ({', '.join(differ)}); "
                               f"use another --sample-dir or remove it")


def claim_shard_folder(folder: Path, settings: dict, may_change: tuple[str, ...] = ()) -> None:
    """`check_shard_folder`, then record `settings` in `folder/settings.json` (creating the folder).

    Shards of two settings must never be packed together, so a rerun may only resume a folder whose
    shards were made with settings that agree on every key except `may_change`."""
    check_shard_folder(folder, settings, may_change)
    folder.mkdir(parents=True, exist_ok=True)
    save_json(folder / "settings.json", settings)

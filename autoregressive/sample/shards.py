"""The parts of large-scale sampling that do not depend on the strategy, written once.

- `sample_plan`: which class each global image index gets (N per class, class-balanced) and its seed,
  so the images are the same whatever the number of ranks or the batch size.
- `to_uint8`: the official post-processing (bicubic resize on [-1,1] floats, `127.5x + 128`
  clamped and truncated to uint8, NHWC).
- Shards: each rank writes its finished batches as atomic `.npz` shards named by their first global
  index; a rerun keeps the finished ones. `pack_npz` joins them in index order into the ADM `.npz`
  (`arr_0` uint8 NHWC, plus `labels`), atomically, with the settings written beside it.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from utils.checkpoint import atomic_write, save_json, save_npz


def sample_plan(num_classes: int, per_class: int, global_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels (N,), seeds (N,)) for N = num_classes * per_class images.

    Labels are class-balanced and interleaved (index i has class i % num_classes), so any prefix is
    nearly balanced; each seed is a hash of (global_seed, index), independent of ranks and batches.
    """
    n = num_classes * per_class
    labels = torch.arange(n) % num_classes
    return labels, image_seeds(global_seed, torch.arange(n))


def image_seeds(global_seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A 62-bit seed per image index (splitmix64 of global_seed and the index), as int64."""
    x = (indices.to(torch.int64) + (int(global_seed) * 0x9E3779B97F4A7C15 & 0x3FFFFFFFFFFFFFFF))
    return splitmix64(x) & 0x3FFFFFFFFFFFFFFF


_M1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64
_M2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB as a signed int64


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic), on any device."""
    x = x + (-0x61C8864680B583EB)  # 0x9E3779B97F4A7C15
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


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


def pack_npz(folder: Path, out_path: Path, total: int) -> Path:
    """Join the shards covering indices [0, total) in order into the ADM `.npz` (arr_0, labels)."""
    shards = finished_shards(folder)
    images, labels, expected = [], [], 0
    for start in sorted(shards):
        if start != expected:
            raise RuntimeError(f"sample shards in {folder} have a gap at index {expected}: rerun to finish")
        with np.load(shards[start]) as f:
            images.append(f["images"])
            labels.append(f["labels"])
        expected += len(labels[-1])
    if expected < total:
        raise RuntimeError(f"only {expected} of {total} samples are in {folder}: rerun to finish")
    arr = np.concatenate(images)[:total]
    lab = np.concatenate(labels)[:total]
    return save_npz(out_path, arr_0=arr, labels=lab)


class SettingsMismatch(RuntimeError):
    """A shard folder already holds shards made with other settings."""


def claim_shard_folder(folder: Path, settings: dict, may_change: tuple[str, ...] = ()) -> None:
    """Record `settings` in `folder/settings.json`, refusing a folder made with other settings.

    Shards of two settings must never be packed together, so a rerun may only resume a folder whose
    recorded settings agree on every key except `may_change`; the error names the keys that differ.
    """
    settings_file = folder / "settings.json"
    if settings_file.is_file():
        old = json.loads(settings_file.read_text())
        differ = sorted(k for k in set(old) | set(settings)
                        if k not in may_change and old.get(k) != settings.get(k))
        if differ:
            raise SettingsMismatch(f"{folder} holds shards made with other settings ({', '.join(differ)}); "
                                   f"use another --sample-dir or remove it")
    folder.mkdir(parents=True, exist_ok=True)
    save_json(settings_file, settings)

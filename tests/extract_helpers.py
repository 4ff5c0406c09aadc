"""Shared set-up for the code-extraction and code-reader tests: a random VQ-debug checkpoint, a
small class folder of real digit images, and the extraction flags."""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from autoregressive.train.extract_codes_c2i import build_parser
from dataset.digits import export_image_folder
from tokenizer.vq_model import VQ_models
from utils.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK = 64  # VQ-debug with a 64-entry codebook: 32 px -> 8 x 8 = 64 codes per view


def make_vq_ckpt(path: Path, seed: int = 0) -> Path:
    """A VQ-debug tokenizer with random weights, saved the way our tokenizer training saves it."""
    torch.manual_seed(seed)
    vq = VQ_models["VQ-debug"](codebook_size=CODEBOOK)
    return save_checkpoint({"model": vq.state_dict(), "vq_model": "VQ-debug", "vq_config": asdict(vq.config)}, path)


def make_image_folder(root: Path, classes: int = 3, per_class: int = 4, cache: Path | None = None) -> Path:
    """`root/<digit>/<i>.png`: the first `per_class` train digits of the first `classes` classes, 32 px."""
    full = cache if cache is not None else root.parent / f"{root.name}_all_digits"
    if not full.is_dir():
        export_image_folder(full, image_size=32)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for p in sorted((full / str(c)).glob("*.png"))[:per_class]:
            shutil.copy(p, root / str(c) / p.name)
    return root


def extract_flags(data_path: Path | None, code_path: Path, vq_ckpt: Path, *extra: str) -> list[str]:
    data = ["--data-path", str(data_path), "--dataset", "folder"] if data_path is not None else []
    return [*data, "--code-path", str(code_path), "--vq-model", "VQ-debug", "--vq-ckpt", str(vq_ckpt),
            "--codebook-size", str(CODEBOOK), "--image-size", "32", "--num-workers", "0", "--device", "cpu",
            *extra]


def extract_args(*a, **kw):
    return build_parser().parse_args(extract_flags(*a, **kw))


def read_extracted(code_path: Path, name: str = "folder32") -> dict[int, tuple[np.ndarray, int]]:
    """Image index -> (codes (num_aug, N) int64, label) of an extraction, in either layout."""
    out = {}
    shards = code_path / f"{name}_shards"
    if shards.is_dir():
        for p in sorted(shards.glob("shard_*.npz")):
            with np.load(p) as f:
                for c, y, k in zip(f["codes"], f["labels"], f["indices"]):
                    assert int(k) not in out, f"image {k} is in two shards"
                    out[int(k)] = (c.astype(np.int64), int(y))
        return out
    for p in (code_path / f"{name}_codes").glob("*.npy"):
        k = int(p.stem)
        codes = np.load(p)
        assert codes.dtype == np.int64 and codes.ndim == 3 and codes.shape[0] == 1
        out[k] = (codes[0], int(np.load(code_path / f"{name}_labels" / p.name).reshape(-1)[0]))
    return out

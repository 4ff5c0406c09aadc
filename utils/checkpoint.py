"""Checkpoint I/O, written once: atomic saves, safe loads, strict state-dict checks.

Every checkpoint in the project goes through `save_checkpoint` (temporary file in the same folder,
fsync, then `os.replace`, so a killed run never leaves a half-written file under the final name)
and `load_checkpoint` (`torch.load(..., weights_only=True)`, so a file from an untrusted source
cannot run code). The official LlamaGen training checkpoints pickle an `argparse.Namespace` under
`'args'`; that one class is allowed through an explicit allow-list of safe globals.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.cli import UserError

# Globals that official checkpoints pickle besides tensors. Nothing here can execute code on load.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: wrong method, wrong size, unreadable, or corrupt."""


def atomic_write(path: str | os.PathLike, write_fn) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write `obj` as indented JSON to `path` atomically."""
    data = json.dumps(obj, indent=1, sort_keys=True, default=str).encode()
    return atomic_write(path, lambda f: f.write(data))


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save` to `path` atomically (temporary file, fsync, rename)."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """`np.savez` to `path` atomically; `path` keeps its name (no `.npz` appended twice)."""
    return atomic_write(path, lambda f: np.savez(f, **arrays))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    """`np.save` to `path` atomically."""
    return atomic_write(path, lambda f: np.save(f, array))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """Load a checkpoint with `weights_only=True` (plus the `SAFE_GLOBALS` allow-list).

    `mmap=True` maps the tensors instead of reading them (a cheap look at a large file's keys and
    `args`; our checkpoints are all in torch's zip format, which mapping needs).
    Raises `CheckpointError` with the path and the reason when the file is missing or cannot be
    read safely, instead of falling back to unsafe unpickling.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - re-raised with context
        raise CheckpointError(
            f"cannot load {path} safely (weights_only=True): {type(e).__name__}: {e}"
        ) from e


def load_checkpoint_entries(path: str | os.PathLike, keys: tuple[str, ...]) -> dict[str, Any]:
    """The entries `keys` of a checkpoint dict (absent ones left out), for a driver that needs its
    records (args, class map) before loading the weights: a zip-format file is memory-mapped, so its
    tensors are never read; a legacy file is loaded whole (`load_checkpoint`, the same errors)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not memory-mappable (legacy format) or unreadable: load_checkpoint says which
        ckpt = load_checkpoint(path)
    if not isinstance(ckpt, Mapping):
        return {}
    return {k: ckpt[k] for k in keys if k in ckpt}


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(module: torch.nn.Module, skip: frozenset[str] | set[str] = frozenset()) -> str:
    """Hex SHA-256 of a module's weights (key names and float32 values, in key order), the keys in
    `skip` left out: what identifies a tokenizer beside the codes it made."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        if k in skip:
            continue
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def check_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    expected: Mapping[str, tuple[int, ...] | list[int] | torch.Size],
    what: str,
) -> None:
    """Raise `CheckpointError` unless `state_dict` has exactly the keys and shapes of `expected`.

    The message names every missing, unexpected and mis-shaped key (first 20 of each), so a
    checkpoint of another method or size is refused with the reason.
    """
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        (k, tuple(state_dict[k].shape), tuple(expected[k]))
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k])
    ]
    if not (missing or unexpected or misshaped):
        return
    lines = [f"{what}: the checkpoint does not match this model"]

    def block(title: str, items: list) -> None:
        if items:
            lines.append(f"  {len(items)} {title}:")
            lines.extend(f"    {x}" for x in items[:20])
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")

    block("missing keys", missing)
    block("unexpected keys", unexpected)
    block("mis-shaped keys (key, checkpoint shape, expected shape)", misshaped)
    raise CheckpointError("\n".join(lines))


def load_state_dict_strict(
    module: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], what: str
) -> None:
    """Check keys and shapes against `module`, then copy the tensors in (strictly)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    check_state_dict(state_dict, expected, what)
    # Stride-0 expanded views (e.g. the official `codebook_used` buffer) are copied, not aliased.
    module.load_state_dict({k: v.contiguous() for k, v in state_dict.items()}, strict=True)


def extract_weights(ckpt: Any, prefer_ema: bool = False, what: str = "checkpoint") -> dict:
    """Return the model weights of a checkpoint in any official layout.

    Layouts: `{'ema': ...}` (when `prefer_ema` and present), `{'model': ...}` (DDP training),
    `{'module': ...}` (DeepSpeed), `{'state_dict': ...}`, or a bare state dict (FSDP consolidated).
    """
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"{what}: expected a dict, got {type(ckpt).__name__}")
    if prefer_ema and isinstance(ckpt.get("ema"), Mapping):
        return dict(ckpt["ema"])
    for key in ("model", "module", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            return dict(ckpt[key])
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    raise CheckpointError(
        f"{what}: no weights found (looked for 'ema', 'model', 'module', 'state_dict' or a bare "
        f"state dict); top-level keys: {sorted(map(str, ckpt))[:20]}"
    )

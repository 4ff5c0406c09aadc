"""Loading GPT checkpoints strictly: official LlamaGen releases and our own training checkpoints.

Official layouts (as LlamaGen's `autoregressive/sample/sample_c2i_ddp.py` reads them): `{'model':
state_dict, ...}` for GPT-B/L/XL (DDP), the bare state dict for GPT-XXL/3B (FSDP `consolidated.pth`),
`'module'` (DeepSpeed) or `'state_dict'`.
The official training checkpoints and ours also carry `'args'` (an argparse.Namespace officially,
a dict for ours) naming the size (`gpt_model`) and the flags that shape the model; when present,
they build the model and must agree with what the caller asked for. A stray `freqs_cis` key (the
RoPE table, which some exports include) is dropped; everything else must match exactly, or
`CheckpointError` names the missing, unexpected and mis-shaped keys.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from typing import Any

import torch

from utils.checkpoint import CheckpointError, extract_weights, load_checkpoint, load_state_dict_strict

# Keys a checkpoint may hold that are not weights of the model: the RoPE table (recomputed).
DROPPED_KEYS = ("freqs_cis",)


def read_gpt_checkpoint(path: str | os.PathLike, prefer_ema: bool = False,
                        map_location: str | torch.device = "cpu") -> tuple[dict, dict | None]:
    """Read (weights, args) from a GPT checkpoint in any official layout or ours.

    `prefer_ema` takes `'ema'` when the file has it; by default `'model'`, as the official
    samplers do (no released file is documented as EMA). `args` is a plain dict or None.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    weights = extract_weights(ckpt, prefer_ema=prefer_ema, what=f"GPT checkpoint {path}")
    for k in DROPPED_KEYS:
        weights.pop(k, None)
    args = ckpt.get("args") if isinstance(ckpt, Mapping) else None
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return weights, (dict(args) if isinstance(args, Mapping) else None)


def gpt_kwargs_from_args(args: Mapping[str, Any]) -> dict:
    """The `GPTConfig` fields that a training run's flags fix (official flag names).

    `block_size = (image_size // downsample_size)^2`; the other sizes copy over when present.
    """
    out: dict[str, Any] = {}
    if "image_size" in args:
        out["block_size"] = (int(args["image_size"]) // int(args.get("downsample_size", 16))) ** 2
    for k in ("vocab_size", "num_classes", "cls_token_num"):
        if k in args:
            out[k] = args[k]
    return out


def load_weights_strict(model: torch.nn.Module, weights: Mapping[str, torch.Tensor], what: str) -> None:
    """Drop `DROPPED_KEYS`, then load exactly (keys and shapes), naming every mismatch."""
    weights = {k: v for k, v in weights.items() if k not in DROPPED_KEYS}
    load_state_dict_strict(model, weights, what=what)


def check_args_agree(args: Mapping[str, Any] | None, what: str, **expected: Any) -> None:
    """Refuse a checkpoint whose recorded flags contradict the requested ones (None = any)."""
    if not args:
        return
    for k, v in expected.items():
        if v is not None and k in args and args[k] != v:
            raise CheckpointError(f"{what} was trained with {k}={args[k]!r}, but {k}={v!r} was asked for")

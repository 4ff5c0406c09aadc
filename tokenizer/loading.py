"""Build a VQ tokenizer from a checkpoint: official releases and our own training checkpoints.

Official files (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`) hold `{'model': state_dict, ...}` under the
official key names; our tokenizer training also stores `'vq_config'` (the constructor arguments)
and `'vq_model'` (the size name), so a checkpoint says what it is. Loading is strict: a checkpoint
of another model or size is refused with the missing, unexpected and mis-shaped keys named.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

import torch

from tokenizer.vq_model import VQConfig, VQModel, VQ_models
from utils.checkpoint import (CheckpointError, extract_weights, load_checkpoint, load_state_dict_strict,
                              state_dict_sha256)


def build_vq(vq_model: str, codebook_size: int = 16384, codebook_embed_dim: int = 8,
             **kwargs: Any) -> VQModel:
    """A fresh tokenizer of a named size (`VQ-16`, `VQ-8`, `VQ-debug`)."""
    if vq_model not in VQ_models:
        raise ValueError(f"unknown --vq-model {vq_model!r}; known: {', '.join(VQ_models)}")
    return VQ_models[vq_model](codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim,
                               **kwargs)


def load_vq(path: str | os.PathLike, vq_model: str = "VQ-16", codebook_size: int = 16384,
            codebook_embed_dim: int = 8, prefer_ema: bool = False,
            map_location: str | torch.device = "cpu") -> VQModel:
    """Load a tokenizer checkpoint strictly and return the model in eval mode.

    When the checkpoint records its own configuration (ours do), that configuration builds the
    model and must agree with `vq_model` unless `vq_model` is None; otherwise (official files)
    the named size is built and every key and shape must match it.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    what = f"VQ checkpoint {path}"
    if isinstance(ckpt, dict) and "vq_config" in ckpt:
        saved_name = ckpt.get("vq_model", "?")
        if vq_model is not None and saved_name != vq_model:
            raise CheckpointError(
                f"{what} is a {saved_name} tokenizer, but --vq-model {vq_model} was asked for"
            )
        model = VQModel(VQConfig(**ckpt["vq_config"]))
    else:
        if vq_model is None:
            raise CheckpointError(f"{what} records no configuration; pass --vq-model")
        model = build_vq(vq_model, codebook_size, codebook_embed_dim)
    weights = extract_weights(ckpt, prefer_ema=prefer_ema, what=what)
    load_state_dict_strict(model, weights, what=f"{what} (as {vq_model or ckpt.get('vq_model')})")
    return model.eval()


def tokenizer_identity(model: VQModel, weights_hint: str = "") -> dict:
    """What identifies a tokenizer for code folders: its config and a hash of its weights.

    Codes from two tokenizers must never be mixed, so code extraction records this beside the codes
    and refuses to add codes to a folder whose identity differs.
    """
    usage = {k for k in model.state_dict() if k.endswith("codebook_used")}  # statistics, not the mapping
    return {"config": asdict(model.config), "weights_sha256": state_dict_sha256(model, usage),
            "source": weights_hint}

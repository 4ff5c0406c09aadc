"""The tokenizer registry: kind name -> TokenizerKind, beside the strategy registry.

A new kind is one file in `tokenizer/kinds/` plus one line here. The drivers use `size_names()`
as their `--vq-model` choices and `load_tokenizer` to load a checkpoint (the kind from a strategy's
`tokenizer_kind`, from `--vq-model`, or found in the file); on whatever tokenizer they hold,
`identity`, `codebook`, `code_length`, `encode` (and `encode_with_margins`), `decode` and
`check_codes` dispatch to its kind. Tokenizer training builds through `kind_of_size(...).build` and
records `kind.config` under `kind.config_key`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from dataset.codes import CodesError, read_meta
from tokenizer.kind import PatchNums, TokenizerKind
from tokenizer.kinds.llamagen_vq import LlamaGenVQ
from tokenizer.kinds.var_msvq import VarMSVQ
from utils.checkpoint import CheckpointError, load_checkpoint

TOKENIZER_KINDS: dict[str, TokenizerKind] = {
    "vq": LlamaGenVQ(),
    "msvq": VarMSVQ(),
}


def kind_names() -> list[str]:
    return list(TOKENIZER_KINDS)


def get_kind(name: str) -> TokenizerKind:
    """The kind registered under `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer kind {name!r}; known kinds: {', '.join(TOKENIZER_KINDS)}")
    return TOKENIZER_KINDS[name]


def size_names() -> list[str]:
    """Every `--vq-model` any registered kind builds."""
    return [size for kind in TOKENIZER_KINDS.values() for size in kind.sizes]


def kind_of_size(size: str) -> TokenizerKind:
    """The kind that builds the `--vq-model` size `size`."""
    for kind in TOKENIZER_KINDS.values():
        if size in kind.sizes:
            return kind
    raise ValueError(f"unknown --vq-model {size!r}; known: {', '.join(size_names())}")


def kind_of_model(model: nn.Module) -> TokenizerKind:
    """The kind of a built tokenizer."""
    for kind in TOKENIZER_KINDS.values():
        if kind.owns(model):
            return kind
    raise TypeError(f"{type(model).__name__} is no registered tokenizer kind ({', '.join(TOKENIZER_KINDS)})")


def detect_kind(ckpt: Any) -> TokenizerKind | None:
    """The kind whose tokenizer a loaded checkpoint holds, or None when no kind recognises it."""
    return next((kind for kind in TOKENIZER_KINDS.values() if kind.recognises(ckpt)), None)


def arch_flags() -> tuple[str, ...]:
    """The architecture flags of tokenizer training, over every kind (first seen first)."""
    return tuple(dict.fromkeys(flag for kind in TOKENIZER_KINDS.values() for flag in kind.arch_flags))


def recorded_architecture(ckpt: Any) -> dict[str, Any]:
    """The architecture flags (and `vq_model`) a tokenizer training checkpoint records."""
    out: dict[str, Any] = {}
    for kind in TOKENIZER_KINDS.values():
        out.update(kind.recorded_flags(ckpt))
    return out


def load_tokenizer(path: str | os.PathLike, size: str | None = None, *, kind: str | None = None,
                   codebook_size: int | None = None, codebook_embed_dim: int | None = None,
                   image_size: int | None = None, patch_nums: PatchNums = None, prefer_ema: bool = False,
                   downsample: int | None = None, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a tokenizer checkpoint strictly, in eval mode.

    The kind is `kind` (a strategy's `tokenizer_kind`), else the kind of the `--vq-model` `size`,
    else the one the file holds. When `size` chose the kind and the file holds another, the error
    names the `--vq-model` sizes to pass. `downsample` (the GPT's `--downsample-size`), when given,
    must be the tokenizer's downsampling factor.
    """
    if kind is not None:
        chosen = get_kind(kind)
        if size is not None and size not in chosen.sizes:
            raise ValueError(f"--vq-model {size} is not a size of {chosen.title} ({', '.join(chosen.sizes)})")
    elif size is not None:
        chosen = kind_of_size(size)
    else:
        found = detect_kind(load_checkpoint(path, map_location=map_location))
        if found is None:
            raise CheckpointError(f"{path} holds no tokenizer of a known kind ({', '.join(TOKENIZER_KINDS)}); "
                                  f"pass --vq-model")
        chosen = found
    try:
        model = chosen.load(path, size, codebook_size=codebook_size, codebook_embed_dim=codebook_embed_dim,
                            image_size=image_size, patch_nums=patch_nums, prefer_ema=prefer_ema,
                            map_location=map_location)
    except CheckpointError as e:
        if kind is None and size is not None:
            found = detect_kind(load_checkpoint(path, map_location=map_location))
            if found is not None and found is not chosen:
                raise CheckpointError(f"{path} is {found.title}, not a {size}: pass --vq-model "
                                      f"{' or '.join(found.sizes)}") from e
        raise
    if downsample is not None and model.downsample != downsample:
        raise ValueError(f"the tokenizer {path} downsamples by {model.downsample}, but --downsample-size is "
                         f"{downsample}")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# What the drivers do with a tokenizer, whatever its kind
# ---------------------------------------------------------------------------------------------


def identity(model: nn.Module, source: str = "") -> dict:
    """Config and weights hash of a tokenizer: what extraction records beside its codes."""
    return kind_of_model(model).identity(model, source)


def codebook(model: nn.Module) -> tuple[int, int]:
    """(codes in the codebook, code width) of a tokenizer: the GPT's vocabulary is the first."""
    return kind_of_model(model).codebook(model)


def code_length(model: nn.Module, image_size: int) -> int:
    """Codes per image of `image_size` px."""
    return kind_of_model(model).code_length(model, image_size)


def encode(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, S, S) in [-1, 1] -> codes (B, N) int64."""
    return kind_of_model(model).encode(model, images)


def has_margins(model: nn.Module) -> bool:
    """Whether `encode_with_margins` works for this tokenizer's kind (LlamaGen VQ: yes; VAR's
    multi-scale VQ, which picks its codes scale by scale on residuals: no)."""
    return kind_of_model(model).has_margins


def encode_with_margins(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (B, 3, S, S) in [-1, 1] -> (codes (B, N) int64, margins (B, N) float): with each code,
    the second-smallest minus smallest codebook distance in the quantiser's own computation (how far
    it is from a tie: a numerical difference smaller than that cannot change the code).
    NotImplementedError for a kind without `has_margins`."""
    return kind_of_model(model).encode_with_margins(model, images)


def decode(model: nn.Module, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Codes (B, N) -> images (B, 3, S, S) in about [-1, 1]."""
    return kind_of_model(model).decode(model, codes, grid)


def check_codes(model: nn.Module, codes_dir: str | os.PathLike, source: str = "") -> None:
    """Refuse codes another tokenizer made: the identity recorded in the folder's `codes_meta.json`
    must be this tokenizer's. A folder without that record (the official extraction layout) cannot
    be checked and passes."""
    codes_dir = Path(codes_dir)
    meta = read_meta(codes_dir) if codes_dir.is_dir() else None
    found = (meta or {}).get("tokenizer")
    if not found:
        return
    ours = identity(model, source)
    if found.get("weights_sha256") != ours["weights_sha256"] or found.get("config") != ours["config"]:
        raise CodesError(f"the codes in {codes_dir} were made by another tokenizer ({found.get('source') or '?'}, "
                         f"weights sha256 {str(found.get('weights_sha256'))[:12]}) than {source or 'this one'} "
                         f"(weights sha256 {ours['weights_sha256'][:12]}): extract them with this tokenizer")

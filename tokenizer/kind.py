"""What a tokenizer kind provides: everything the drivers ask of a tokenizer, whatever its model.

A kind is one family of tokenizers with its own model code and checkpoint layout: LlamaGen's VQ
(`tokenizer/kinds/llamagen_vq.py`) or VAR's multi-scale residual VQVAE
(`tokenizer/kinds/var_msvq.py`). It builds its sizes, loads checkpoints strictly, recognises its
own files, says what identifies a tokenizer beside the codes it made, and encodes images to codes
and decodes them back. Drivers reach kinds only through `tokenizer/registry.py` and never branch on
a tokenizer's class or kind name; a new kind is one file in `tokenizer/kinds/` plus one registry line.

Shared option names (the drivers' flags): `size` (`--vq-model`), `codebook_size`,
`codebook_embed_dim`, `image_size`, `patch_nums` (`--v-patch-nums` / VAR's `--pn`),
`codebook_l2_norm`, and the training options `dropout`, `commit_loss_beta`, `entropy_loss_ratio`.
A kind reads those that apply to it; each kind's docstrings say which it does not read.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn

from utils.checkpoint import CheckpointError

PatchNums = str | Sequence[int] | None


def weight_keys(ckpt: Any) -> set[str]:
    """The state-dict keys inside a loaded checkpoint of any layout (empty when it holds none)."""
    if not isinstance(ckpt, Mapping):
        return set()
    for key in ("model", "ema", "module", "state_dict"):
        if isinstance(ckpt.get(key), Mapping):
            return set(ckpt[key])
    return {k for k, v in ckpt.items() if isinstance(v, torch.Tensor)}


class TokenizerKind(ABC):
    """Base class of a tokenizer kind; see `tokenizer/registry.py`."""

    #: the registry key, and what a strategy's `tokenizer_kind` names.
    name: str = ""
    #: the kind in messages, e.g. "a LlamaGen VQ tokenizer".
    title: str = ""
    #: the model class of this kind's tokenizers.
    model_class: type[nn.Module] = nn.Module
    #: size name -> constructor: this kind's `--vq-model` choices.
    sizes: Mapping[str, Any] = {}
    #: the key under which our training checkpoints record the constructor arguments.
    config_key: str = ""
    #: the tokenizer-training flags (argparse dests) that fix this kind's architecture; recorded in
    #: `config_key`, taken from the checkpoint on resume.
    arch_flags: tuple[str, ...] = ()
    #: whether `encode_with_margins` gives each code's distance margin (a single nearest-code search).
    has_margins: bool = False
    #: how the official code reads a released tokenizer (what `autoregressive/export.py` writes):
    #: "model" = `{"model": state_dict}`, "flat" = the bare state dict.
    official_layout: str = "model"
    #: where the official code reads it, for messages and the README.
    official_reader: str = ""

    # -- building (tokenizer training, benchmarks) -----------------------------------------------

    @abstractmethod
    def build(self, size: str, *, codebook_size: int, codebook_embed_dim: int, image_size: int,
              patch_nums: PatchNums = None, codebook_l2_norm: bool = True, dropout: float = 0.0,
              commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0) -> nn.Module:
        """A fresh tokenizer of a named size for training; ValueError when the options do not fit."""

    @abstractmethod
    def build_recorded(self, config: Mapping[str, Any], *, image_size: int, dropout: float = 0.0,
                       commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0) -> nn.Module:
        """The tokenizer a training checkpoint recorded under `config_key`, with this run's training
        options; ValueError when it does not fit `image_size`."""

    @abstractmethod
    def build_release(self, codebook_size: int, patch_nums: PatchNums = None) -> nn.Module:
        """The released layout with random weights and `codebook_size` codes (what benchmarks time)."""

    @abstractmethod
    def config(self, model: nn.Module) -> dict:
        """The constructor arguments as plain JSON values: what training records under `config_key`."""

    @abstractmethod
    def flags_from_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The `arch_flags` values a recorded configuration stands for."""

    def recorded_flags(self, ckpt: Any) -> dict[str, Any]:
        """The architecture flags (and `vq_model`) a training checkpoint of this kind records; {}
        for any other checkpoint."""
        if not isinstance(ckpt, Mapping) or self.config_key not in ckpt:
            return {}
        size = {"vq_model": ckpt["vq_model"]} if "vq_model" in ckpt else {}
        return {**size, **self.flags_from_config(ckpt[self.config_key])}

    # -- loading ------------------------------------------------------------------------------------

    @abstractmethod
    def recognises(self, ckpt: Any) -> bool:
        """Whether a loaded checkpoint (official release or ours) holds a tokenizer of this kind."""

    @abstractmethod
    def load(self, path: str | os.PathLike, size: str | None = None, *, codebook_size: int | None = None,
             codebook_embed_dim: int | None = None, image_size: int | None = None,
             patch_nums: PatchNums = None, prefer_ema: bool = False,
             map_location: str | torch.device = "cpu") -> nn.Module:
        """Load a checkpoint strictly (`weights_only=True`), eval mode; CheckpointError naming the
        reason when it is not a tokenizer of this kind and size."""

    def official_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """`model`'s weights under the official key names: the inverse of `load`, which copies the
        official names in unchanged (our modules carry them), so the state dict itself."""
        return dict(model.state_dict())

    def official_notes(self, model: nn.Module) -> list[str]:
        """What the official class hard-codes and this tokenizer sets otherwise (widths, blocks, norm
        groups): the official code loads such a file only with those values changed, as the golden
        fixtures of tiny configurations do. Empty for the released layouts."""
        return []

    def owns(self, model: nn.Module) -> bool:
        """Whether `model` is a tokenizer of this kind."""
        return isinstance(model, self.model_class)

    # -- codes --------------------------------------------------------------------------------------

    @abstractmethod
    def identity(self, model: nn.Module, source: str = "") -> dict:
        """What code folders record about the tokenizer that made them: config and weights hash."""

    @abstractmethod
    def codebook(self, model: nn.Module) -> tuple[int, int]:
        """(codes in the codebook, code width)."""

    def check_codebook_flags(self, model: nn.Module, codebook_size: int, codebook_embed_dim: int,
                             what: str) -> None:
        """Refuse `--codebook-size` / `--codebook-embed-dim` that disagree with the loaded tokenizer."""
        size, dim = self.codebook(model)
        if (size, dim) != (codebook_size, codebook_embed_dim):
            raise CheckpointError(f"{what} has a {size} x {dim} codebook, but --codebook-size {codebook_size} "
                                  f"--codebook-embed-dim {codebook_embed_dim} were given")

    @abstractmethod
    def code_length(self, model: nn.Module, image_size: int) -> int:
        """Codes per image of `image_size` px: what extraction writes and the GPT trains on."""

    def encode(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, S, S) in [-1, 1] -> codes (B, N) int64."""
        return model.encode_to_indices(images)

    def encode_with_margins(self, model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, 3, S, S) in [-1, 1] -> (codes (B, N) int64 as `encode`, margins (B, N) float):
        each code's second-smallest minus smallest codebook distance, in the quantiser's own
        distance computation, i.e. how near the choice is to a tie. Only kinds with `has_margins`."""
        raise NotImplementedError(f"code distance margins are not computed for {self.title} (only for kinds "
                                  f"with a single nearest-code search, e.g. a LlamaGen VQ tokenizer)")

    def decode(self, model: nn.Module, codes: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Codes (B, N) -> images (B, 3, S, S) in about [-1, 1]; `grid` = the last code grid (h, w)."""
        return model.decode_indices(codes, grid=grid)

"""LlamaGen's VQ tokenizer as a registry kind: sizes VQ-16, VQ-8 and VQ-debug (ours, for the demo).

Model: `tokenizer/vq_model.py` (official: FoundationVision/LlamaGen
`tokenizer/tokenizer_image/vq_model.py`); loading: `tokenizer/loading.py`, for the released
`vq_ds16_c2i.pt` / `vq_ds8_c2i.pt` and our training checkpoints, which record `vq_config`.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from tokenizer.kind import PatchNums, TokenizerKind, weight_keys
from tokenizer.loading import build_vq, load_vq, tokenizer_identity
from tokenizer.vq_model import VQConfig, VQModel, VQ_models, config_dict


class LlamaGenVQ(TokenizerKind):
    """A single-scale VQ: one code per `downsample` x `downsample` pixels, raster order.
    `image_size` and `patch_nums` are not read (any multiple of the downsampling encodes)."""

    name = "vq"
    title = "a LlamaGen VQ tokenizer"
    model_class = VQModel
    sizes = VQ_models
    config_key = "vq_config"
    arch_flags = ("codebook_size", "codebook_embed_dim", "codebook_l2_norm")
    has_margins = True
    #: vq_ds16_c2i.pt / vq_ds8_c2i.pt hold `{"model": ...}`.
    official_reader = ("FoundationVision/LlamaGen tokenizer/tokenizer_image/reconstruction_vq_ddp.py and "
                       "autoregressive/sample/sample_c2i_ddp.py (checkpoint['model'])")
    #: what the official `VQModel` hard-codes (Encoder/Decoder `ch=128`, `num_res_blocks=2`).
    official_fixed = {"ch": 128, "num_res_blocks": 2}

    def build(self, size: str, *, codebook_size: int, codebook_embed_dim: int, image_size: int,
              patch_nums: PatchNums = None, codebook_l2_norm: bool = True, dropout: float = 0.0,
              commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0) -> VQModel:
        return build_vq(size, codebook_size, codebook_embed_dim, codebook_l2_norm=codebook_l2_norm,
                        commit_loss_beta=commit_loss_beta, entropy_loss_ratio=entropy_loss_ratio, dropout_p=dropout)

    def build_recorded(self, config: Mapping[str, Any], *, image_size: int, dropout: float = 0.0,
                       commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0) -> VQModel:
        return VQModel(VQConfig(**{**config, "commit_loss_beta": commit_loss_beta,
                                   "entropy_loss_ratio": entropy_loss_ratio, "dropout_p": dropout}))

    def build_release(self, codebook_size: int, patch_nums: PatchNums = None) -> VQModel:
        return build_vq("VQ-16", codebook_size)

    def config(self, model: VQModel) -> dict:
        return config_dict(model)

    def flags_from_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {k: config[k] for k in self.arch_flags}

    def recognises(self, ckpt: Any) -> bool:
        """Ours record `vq_config`; the releases have the usage buffer and `encoder.conv_blocks.*`."""
        keys = weight_keys(ckpt)
        return (isinstance(ckpt, Mapping) and self.config_key in ckpt) or "quantize.codebook_used" in keys \
            or any(k.startswith("encoder.conv_blocks.") for k in keys)

    def load(self, path: str | os.PathLike, size: str | None = None, *, codebook_size: int | None = None,
             codebook_embed_dim: int | None = None, image_size: int | None = None,
             patch_nums: PatchNums = None, prefer_ema: bool = False,
             map_location: str | torch.device = "cpu") -> VQModel:
        """`tokenizer.loading.load_vq`: a recorded configuration must agree with `size`; a release
        file is built as `size` with the codebook flags (default 16384 x 8)."""
        return load_vq(path, size, VQConfig.codebook_size if codebook_size is None else codebook_size,
                       VQConfig.codebook_embed_dim if codebook_embed_dim is None else codebook_embed_dim,
                       prefer_ema=prefer_ema, map_location=map_location)

    def official_notes(self, model: VQModel) -> list[str]:
        return [f"{k}={getattr(model.config, k)}: the official VQModel (tokenizer/tokenizer_image/vq_model.py) "
                f"hard-codes {k}={v}" for k, v in self.official_fixed.items() if getattr(model.config, k) != v]

    def identity(self, model: VQModel, source: str = "") -> dict:
        return tokenizer_identity(model, source)

    def codebook(self, model: VQModel) -> tuple[int, int]:
        return model.config.codebook_size, model.config.codebook_embed_dim

    def code_length(self, model: VQModel, image_size: int) -> int:
        return (image_size // model.downsample) ** 2

    def encode_with_margins(self, model: VQModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`VQModel.encode_to_indices_and_margins`: margins over the l2-normalised latent and codebook."""
        return model.encode_to_indices_and_margins(images)

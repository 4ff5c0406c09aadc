"""VAR's multi-scale residual VQVAE as a registry kind: sizes MSVQ-16 (the release layout) and
MSVQ-debug (ours, for the demo).

Model and loading: `tokenizer/msvq.py` (official: FoundationVision/VAR `models/vqvae.py`,
`models/quant.py`), for the released `vae_ch160v4096z32.pth` (a flat state dict) and our training
checkpoints, which record `msvq_config`. Codes are the per-scale ids concatenated, sum pn^2 per image.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from tokenizer.kind import PatchNums, TokenizerKind, weight_keys
from tokenizer.msvq import (CH_MULT, MSVQ_models, NUM_RES_BLOCKS, USAGE_BUFFER, MSVQConfig, MultiScaleVQVAE, build_msvq, build_msvq_named,
                            load_msvq, msvq_config_dict, msvq_identity, parse_patch_nums)


class VarMSVQ(TokenizerKind):
    """The scales (`patch_nums`) fix the image size: image = downsampling * last scale. Codes are
    picked by plain L2 as in the release, so `codebook_l2_norm` and `entropy_loss_ratio` are not
    read; loading reads no codebook flags (ours record them, the release is 4096 x 32)."""

    name = "msvq"
    title = "VAR's multi-scale VQVAE"
    model_class = MultiScaleVQVAE
    sizes = MSVQ_models
    config_key = "msvq_config"
    arch_flags = ("codebook_size", "codebook_embed_dim", "v_patch_nums")
    #: vae_ch160v4096z32.pth is a bare state dict: `vae.load_state_dict(torch.load(path), strict=True)`.
    official_layout = "flat"
    official_reader = "FoundationVision/VAR demo_sample.ipynb (vae.load_state_dict(torch.load(path)))"
    #: what the official `VQVAE` hard-codes (models/basic_vae.py: ch_mult, num_res_blocks, GroupNorm(32)).
    official_fixed = {"ch_mult": CH_MULT, "num_res_blocks": NUM_RES_BLOCKS, "norm_num_groups": 32}

    def build(self, size: str, *, codebook_size: int, codebook_embed_dim: int, image_size: int,
              patch_nums: PatchNums = None, codebook_l2_norm: bool = True, dropout: float = 0.0,
              commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0) -> MultiScaleVQVAE:
        return build_msvq_named(size, codebook_size, codebook_embed_dim, image_size, patch_nums,
                                dropout=dropout, beta=commit_loss_beta)

    def build_recorded(self, config: Mapping[str, Any], *, image_size: int, dropout: float = 0.0,
                       commit_loss_beta: float = 0.25, entropy_loss_ratio: float = 0.0) -> MultiScaleVQVAE:
        model = MultiScaleVQVAE(MSVQConfig(**{**config, "dropout": dropout, "beta": commit_loss_beta}))
        if model.config.image_size != image_size:
            raise ValueError(f"the checkpoint's tokenizer encodes {model.config.image_size} px images, "
                             f"not --image-size {image_size}")
        return model

    def build_release(self, codebook_size: int, patch_nums: PatchNums = None) -> MultiScaleVQVAE:
        nums = {} if patch_nums is None else {"v_patch_nums": parse_patch_nums(patch_nums)}
        return build_msvq(vocab_size=codebook_size, **nums)

    def config(self, model: MultiScaleVQVAE) -> dict:
        return msvq_config_dict(model)

    def flags_from_config(self, config: Mapping[str, Any]) -> dict[str, Any]:
        return {"codebook_size": config["vocab_size"], "codebook_embed_dim": config["z_channels"],
                "v_patch_nums": "_".join(str(p) for p in config["v_patch_nums"])}

    def recognises(self, ckpt: Any) -> bool:
        """Ours record `msvq_config`; the release has the per-scale usage buffer and `encoder.down.*`."""
        keys = weight_keys(ckpt)
        return (isinstance(ckpt, Mapping) and self.config_key in ckpt) or USAGE_BUFFER in keys \
            or any(k.startswith("encoder.down.") for k in keys)

    def load(self, path: str | os.PathLike, size: str | None = None, *, codebook_size: int | None = None,
             codebook_embed_dim: int | None = None, image_size: int | None = None,
             patch_nums: PatchNums = None, prefer_ema: bool = False,
             map_location: str | torch.device = "cpu") -> MultiScaleVQVAE:
        """`tokenizer.msvq.load_msvq`: our recorded configuration, or the release layout over
        `patch_nums` (default: the official list of `image_size`); frozen."""
        nums = parse_patch_nums(patch_nums) if patch_nums else None
        return load_msvq(path, patch_nums=nums, map_location=map_location, image_size=image_size,
                         prefer_ema=prefer_ema)

    def official_notes(self, model: MultiScaleVQVAE) -> list[str]:
        ours = {k: tuple(v) if isinstance(v, list) else v for k, v in vars(model.config).items()}
        return [f"{k}={ours[k]}: the official VQVAE (models/vqvae.py, models/basic_vae.py) hard-codes {k}={v}"
                for k, v in self.official_fixed.items() if ours[k] != v]

    def identity(self, model: MultiScaleVQVAE, source: str = "") -> dict:
        return msvq_identity(model, source)

    def codebook(self, model: MultiScaleVQVAE) -> tuple[int, int]:
        return model.config.vocab_size, model.config.z_channels

    def check_codebook_flags(self, model: MultiScaleVQVAE, codebook_size: int, codebook_embed_dim: int,
                             what: str) -> None:
        """Not read: the vocabulary and code width come from the checkpoint."""

    def code_length(self, model: MultiScaleVQVAE, image_size: int) -> int:
        return model.config.num_tokens  # sum pn^2: every scale's ids, concatenated

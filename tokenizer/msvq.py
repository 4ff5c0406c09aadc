"""VAR's multi-scale residual VQVAE (`var_vqvae`), with the official state_dict key names.

An image (B, 3, R, R) in [-1, 1] is encoded to ONE latent f (B, Cvae, h, w), h = w = R / 16, and
quantised by residual quantisation over `patch_nums` (e.g. 1,2,3,4,5,6,8,10,13,16): scale k takes
the part of f the coarser scales have not explained, area-downsampled to pn_k x pn_k, picks the
nearest code of one shared codebook per position, upsamples the codes back to h x w (bicubic) and
refines them with a phi convolution. Decoding sums those refinements and runs the decoder.
Written from the official code (FoundationVision/VAR `models/vqvae.py`,
`models/quant.py`, `models/basic_vae.py`), so `vae_ch160v4096z32.pth` loads as published.

Besides encode/decode this module builds VAR's teacher-forcing input (`ids_to_var_input`) and the
step-by-step accumulation sampling uses (`next_autoregressive_input`); the VAR transformer needs
them at train and sample time. Notation: B batch, C = Cvae code width, h = w = patch_nums[-1],
SN number of scales, L = sum pn^2 tokens, V vocabulary.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer.blocks import AttnBlock, Downsample, Normalize, ResnetBlock, Upsample
from utils.checkpoint import (CheckpointError, check_state_dict, extract_weights, load_checkpoint,
                              state_dict_sha256)

#: `--pn` aliases of the official `utils/arg_util.py`.
PATCH_NUMS = {
    "256": (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
    "512": (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
    "1024": (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64),
}
CH_MULT = (1, 1, 2, 2, 4)  # hard-coded officially (latent-diffusion vq-f16 layout): downsampling x16
NUM_RES_BLOCKS = 2
USAGE_BUFFER = "quantize.ema_vocab_hit_SV"  # usage statistics: first dim = number of scales


def parse_patch_nums(pn: str | Sequence[int]) -> tuple[int, ...]:
    """`'256'` / `'512'` / `'1024'` or `'1_2_3_4_6'` (official `--pn`), or a sequence of ints."""
    if isinstance(pn, str):
        if pn in PATCH_NUMS:
            return PATCH_NUMS[pn]
        try:
            out = tuple(int(p) for p in pn.replace("-", "_").split("_"))
        except ValueError:
            raise ValueError(f"--pn must be 256, 512, 1024 or sizes joined by '_' (e.g. 1_2_3_4_6), got {pn!r}") from None
    else:
        out = tuple(int(p) for p in pn)
    if not out or any(p <= 0 for p in out) or any(a >= b for a, b in zip(out, out[1:])):
        raise ValueError(f"patch_nums must be positive and strictly increasing, got {out}")
    return out


@dataclass
class MSVQConfig:
    """The official `VQVAE(...)` constructor arguments (names kept) plus the GroupNorm group count,
    which the official code hard-codes to 32 and the tiny golden fixtures set smaller."""

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    dropout: float = 0.0
    beta: float = 0.25
    using_znorm: bool = False
    quant_conv_ks: int = 3
    quant_resi: float = 0.5
    share_quant_resi: int = 4
    default_qresi_counts: int = 0
    v_patch_nums: tuple[int, ...] = field(default_factory=lambda: PATCH_NUMS["256"])
    norm_num_groups: int = 32
    ch_mult: tuple[int, ...] = CH_MULT  # ours: the official is fixed; smaller for the CPU demo
    num_res_blocks: int = NUM_RES_BLOCKS  # ours, as ch_mult

    def __post_init__(self) -> None:
        self.v_patch_nums = parse_patch_nums(self.v_patch_nums)
        self.ch_mult = tuple(int(m) for m in self.ch_mult)

    @classmethod
    def from_official(cls, config: dict, norm_num_groups: int = 32) -> "MSVQConfig":
        """From the official kwargs (`test_mode` is implied: the tokenizer is always frozen here)."""
        kw = {k: v for k, v in config.items() if k != "test_mode"}
        return cls(**kw, norm_num_groups=norm_num_groups)

    @property
    def image_size(self) -> int:
        return self.downsample * self.v_patch_nums[-1]

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self) -> int:
        return sum(p * p for p in self.v_patch_nums)

    @property
    def codebook_size(self) -> int:
        """The name the drivers read for every tokenizer's vocabulary."""
        return self.vocab_size


# ---------------------------------------------------------------------------------------------
# Encoder / decoder (models/basic_vae.py; blocks: tokenizer/blocks.py)
# ---------------------------------------------------------------------------------------------


def var_resnet_block(cin: int, cout: int, dropout: float, groups: int) -> ResnetBlock:
    """VAR's `ResnetBlock`: the shared block with `F.silu`, as `basic_vae.py` calls it."""
    return ResnetBlock(cin, cout, dropout, groups, act=F.silu)


def var_attn_block(channels: int, groups: int) -> AttnBlock:
    """VAR's `AttnBlock`: q, k, v from ONE 1x1 conv `qkv` (unlike taming's three convs)."""
    return AttnBlock(channels, groups, fused_qkv=True)


def _level(blocks: list[nn.Module], attns: list[nn.Module], resample: nn.Module | None) -> nn.Module:
    """One resolution level as the official `down.{l}` / `up.{l}` module: block, attn, (down|up)sample."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList(attns)
    if resample is not None:
        setattr(level, "downsample" if isinstance(resample, Downsample) else "upsample", resample)
    return level


class Encoder(nn.Module):
    """Image (B, 3, R, R) -> latent (B, z, R/f, R/f), f = 2^(len(ch_mult) - 1) (16 officially);
    attention at the lowest resolution and in the middle."""

    def __init__(self, ch: int, z_channels: int, dropout: float, groups: int,
                 ch_mult: Sequence[int] = CH_MULT, num_res_blocks: int = NUM_RES_BLOCKS):
        super().__init__()
        n = len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        self.down = nn.ModuleList()
        cin = ch
        for lvl, mult in enumerate(ch_mult):
            cout = ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(var_resnet_block(cin, cout, dropout, groups))
                cin = cout
                if lvl == n - 1:
                    attns.append(var_attn_block(cin, groups))
            self.down.append(_level(blocks, attns, Downsample(cin) if lvl != n - 1 else None))
        self.mid = nn.Module()
        self.mid.block_1 = var_resnet_block(cin, cin, dropout, groups)
        self.mid.attn_1 = var_attn_block(cin, groups)
        self.mid.block_2 = var_resnet_block(cin, cin, dropout, groups)
        self.norm_out = Normalize(cin, groups)
        self.conv_out = nn.Conv2d(cin, z_channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z, h, w) -> image (B, 3, fh, fw); `up.{l}` is stored by resolution level
    (l = len(ch_mult) - 1, the lowest resolution, runs first)."""

    def __init__(self, ch: int, z_channels: int, dropout: float, groups: int,
                 ch_mult: Sequence[int] = CH_MULT, num_res_blocks: int = NUM_RES_BLOCKS):
        super().__init__()
        n = len(ch_mult)
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, 1, 1)
        self.mid = nn.Module()
        self.mid.block_1 = var_resnet_block(cin, cin, dropout, groups)
        self.mid.attn_1 = var_attn_block(cin, groups)
        self.mid.block_2 = var_resnet_block(cin, cin, dropout, groups)
        levels = []
        for lvl in reversed(range(n)):
            cout = ch * ch_mult[lvl]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(var_resnet_block(cin, cout, dropout, groups))
                cin = cout
                if lvl == n - 1:
                    attns.append(var_attn_block(cin, groups))
            levels.insert(0, _level(blocks, attns, Upsample(cin) if lvl != 0 else None))
        self.up = nn.ModuleList(levels)
        self.norm_out = Normalize(cin, groups)
        self.conv_out = nn.Conv2d(cin, 3, 3, 1, 1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The output conv's weight: where the adaptive GAN weight of tokenizer training is measured."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[i](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# Residual quantiser (models/quant.py: VectorQuantizer2)
# ---------------------------------------------------------------------------------------------


class Phi(nn.Conv2d):
    """Refinement of an upsampled code map: `(1 - r) * h + r * conv3x3(h)`, r = |quant_resi|."""

    def __init__(self, channels: int, ratio: float):
        super().__init__(channels, channels, 3, 1, 1)
        self.ratio = abs(ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h.mul(1 - self.ratio) + super().forward(h).mul_(self.ratio)


class PhiShared(nn.Module):
    """`share_quant_resi=1`: one phi for every scale (key `quant_resi.qresi.*`)."""

    def __init__(self, phi: nn.Module):
        super().__init__()
        self.qresi = phi

    def pick(self, index: int) -> nn.Module:
        return self.qresi


class PhiPartiallyShared(nn.Module):
    """`share_quant_resi=K > 1`: K phis (`quant_resi.qresi_ls.{k}.*`) shared by nearby scales."""

    def __init__(self, phis: list[nn.Module]):
        super().__init__()
        self.qresi_ls = nn.ModuleList(phis)

    def pick(self, index: int) -> nn.Module:
        return self.qresi_ls[index]


class PhiNonShared(nn.ModuleList):
    """`share_quant_resi=0`: one phi per scale (`quant_resi.{k}.*`)."""

    def pick(self, index: int) -> nn.Module:
        return self[index]


def phi_ticks(k: int) -> np.ndarray:
    """The official tick positions in [0, 1] of K phis (numpy float64, as the official code)."""
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k) if k == 4 else np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_index_per_scale(num_phis: int, num_scales: int) -> list[int]:
    """Which phi scale si uses: the tick nearest to si / (SN - 1).

    Computed with numpy float64 exactly as officially: the ratio 0.5 is an exact tie between ticks
    1 and 2 of K = 4 that float64 rounding resolves to 2 (golden case `phi_index`).
    """
    if num_phis == 1:
        return [0] * num_scales
    ticks = phi_ticks(num_phis)
    return [int(np.argmin(np.abs(ticks - si / (num_scales - 1)))) for si in range(num_scales)]


class MultiScaleQuantizer(nn.Module):
    """Codebook (V, C), the phi convolutions and the usage buffer; every multi-scale loop lives here."""

    def __init__(self, cfg: MSVQConfig):
        super().__init__()
        self.vocab_size, self.Cvae, self.beta = cfg.vocab_size, cfg.z_channels, cfg.beta
        self.using_znorm = cfg.using_znorm
        self.patch_nums = cfg.v_patch_nums
        make = (lambda: Phi(cfg.z_channels, cfg.quant_resi)) if abs(cfg.quant_resi) > 1e-6 else nn.Identity
        if cfg.share_quant_resi == 0:
            n_phi = cfg.default_qresi_counts or len(self.patch_nums)
            self.quant_resi = PhiNonShared([make() for _ in range(n_phi)])
        elif cfg.share_quant_resi == 1:
            n_phi = 1
            self.quant_resi = PhiShared(make())
        else:
            n_phi = cfg.share_quant_resi
            self.quant_resi = PhiPartiallyShared([make() for _ in range(n_phi)])
        self.phi_index = phi_index_per_scale(n_phi, len(self.patch_nums))
        self.register_buffer("ema_vocab_hit_SV", torch.zeros(len(self.patch_nums), self.vocab_size))
        self.embedding = nn.Embedding(self.vocab_size, self.Cvae)

    @property
    def side(self) -> int:
        """h = w of the latent: the last scale's side."""
        return self.patch_nums[-1]

    def phi(self, si: int) -> nn.Module:
        return self.quant_resi.pick(self.phi_index[si])

    def _upsample_refine(self, si: int, h: torch.Tensor) -> torch.Tensor:
        """Code map of scale si (B, C, pn, pn) -> its contribution to f_hat (B, C, h, w)."""
        if si != len(self.patch_nums) - 1:
            h = F.interpolate(h, size=(self.side, self.side), mode="bicubic")
        return self.phi(si)(h)

    def lookup(self, idx: torch.Tensor, pn: int) -> torch.Tensor:
        """ids (B, pn*pn) row-major -> code map (B, C, pn, pn)."""
        return self.embedding(idx).transpose(1, 2).reshape(idx.shape[0], self.Cvae, pn, pn)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """Rows z (N, C) -> nearest code ids (N,): float32 `|z|^2 + |e|^2 - 2 z.e` (official order)."""
        e = self.embedding.weight.detach()
        if self.using_znorm:
            return torch.argmax(F.normalize(z, dim=-1) @ F.normalize(e.T, dim=0), dim=1)
        d = z.square().sum(1, keepdim=True) + e.square().sum(1)  # (N, V)
        return torch.argmin(d.addmm_(z, e.T, alpha=-2, beta=1), dim=1)

    def quantize_residual(self, f: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The encode loop on f (B, C, h, w): per scale its ids (B, pn*pn) and the cumulative f_hat."""
        b, c, h, w = f.shape
        if (h, w) != (self.side, self.side):
            raise ValueError(f"the latent is {h}x{w} but the last of patch_nums {self.patch_nums} is {self.side}")
        f_rest, f_hat = f.detach().clone(), torch.zeros_like(f)
        ids, f_hats = [], []
        last = len(self.patch_nums) - 1
        for si, pn in enumerate(self.patch_nums):
            z = F.interpolate(f_rest, size=(pn, pn), mode="area") if si != last else f_rest
            idx = self.nearest(z.permute(0, 2, 3, 1).reshape(-1, c)).view(b, pn * pn)  # row-major
            h_up = self._upsample_refine(si, self.lookup(idx, pn))
            f_hat = f_hat + h_up
            f_rest = f_rest - h_up
            ids.append(idx)
            f_hats.append(f_hat)
        return ids, f_hats

    def embed_to_fhat(self, ms_h: list[torch.Tensor], all_to_max_scale: bool = True) -> list[torch.Tensor]:
        """Code maps per scale (B, C, pn, pn) -> the cumulative f_hat after each scale (B, C, h, w).

        `all_to_max_scale=False` is the official "experimental" branch (upsample the running f_hat
        progressively instead of every code map to full size); kept for parity, unused otherwise.
        """
        out = []
        if all_to_max_scale:
            f_hat = ms_h[0].new_zeros(ms_h[0].shape[0], self.Cvae, self.side, self.side, dtype=torch.float32)
            for si, h in enumerate(ms_h):
                f_hat = f_hat + self._upsample_refine(si, h)
                out.append(f_hat)
        else:
            pn0 = self.patch_nums[0]
            f_hat = ms_h[0].new_zeros(ms_h[0].shape[0], self.Cvae, pn0, pn0, dtype=torch.float32)
            for si, (pn, h) in enumerate(zip(self.patch_nums, ms_h)):
                f_hat = F.interpolate(f_hat, size=(pn, pn), mode="bicubic") + self.phi(si)(h)
                out.append(f_hat)
        return out

    def ids_to_fhat(self, ids: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale ids -> the final f_hat (B, C, h, w)."""
        return self.embed_to_fhat([self.lookup(i, pn) for i, pn in zip(ids, self.patch_nums)])[-1]

    def ids_to_var_input(self, ids: list[torch.Tensor], prog_si: int = -1) -> torch.Tensor:
        """VAR's teacher-forcing input: for scales 2..SN the area-downsampled cumulative f_hat of
        the scales before, flattened row-major and concatenated, (B, L - pn_0^2, C) float32.

        `prog_si >= 0` (progressive training) stops after the input of scale prog_si (official).
        """
        b = ids[0].shape[0]
        f_hat = ids[0].new_zeros(b, self.Cvae, self.side, self.side, dtype=torch.float32)
        n_in = len(self.patch_nums) - 1 if prog_si < 0 else prog_si
        chunks = []
        for si in range(n_in):
            f_hat = f_hat + self._upsample_refine(si, self.lookup(ids[si], self.patch_nums[si]))
            pn = self.patch_nums[si + 1]
            chunks.append(F.interpolate(f_hat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2))
        if not chunks:
            return f_hat.new_zeros(b, 0, self.Cvae)
        return torch.cat(chunks, dim=1)  # (B, L - pn_0^2, C)

    def next_autoregressive_input(self, si: int, f_hat: torch.Tensor,
                                  h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampling step si: add scale si's code map h (B, C, pn, pn) to f_hat (out of place).

        Returns (new f_hat, the next scale's input (B, C, pn_{si+1}, pn_{si+1}), or f_hat itself
        after the last scale).
        """
        f_hat = f_hat + self._upsample_refine(si, h)
        if si == len(self.patch_nums) - 1:
            return f_hat, f_hat
        pn = self.patch_nums[si + 1]
        return f_hat, F.interpolate(f_hat, size=(pn, pn), mode="area")

    @property
    def n_e(self) -> int:
        """Codebook entries, under the name the shared tokenizer trainer's usage statistics read."""
        return self.vocab_size

    @property
    def l2_norm(self) -> bool:
        """Whether codes are picked by cosine similarity (`using_znorm`; False in the release)."""
        return self.using_znorm

    def forward(self, f: torch.Tensor):
        """VQVAE training (official `VectorQuantizer2.forward`, without its usage buffer update):
        f (B, C, h, w) -> (straight-through f_hat, (vq_loss, commit_loss, entropy_loss, usage),
        (None, None, ids (B, L))), the layout of the LlamaGen quantiser so the shared trainer and
        its `VQLoss` serve both tokenizers.

        The official loss `mean_si [beta |sg(f_hat_si) - f|^2 + |f_hat_si - sg(f)|^2]` is returned
        as its two terms: vq_loss = mean_si |f_hat_si - sg(f)|^2 (trains codebook and phi), commit_loss
        = beta mean_si |sg(f_hat_si) - f|^2 (trains the encoder); entropy_loss is 0 and usage the
        fraction of the codebook this batch picked. Runs in float32 (autocast off).
        """
        with torch.autocast(f.device.type, enabled=False):
            f32 = f.float()
            ids, f_hats = self.quantize_residual(f32)
            vq_loss = sum(F.mse_loss(fh, f32.detach()) for fh in f_hats) / len(f_hats)
            commit_loss = self.beta * sum(F.mse_loss(fh.detach(), f32) for fh in f_hats) / len(f_hats)
            f_hat = (f_hats[-1].detach() - f32.detach()) + f32
        all_ids = torch.cat(ids, dim=1)  # (B, L)
        usage = all_ids.unique().numel() / self.vocab_size
        return f_hat, (vq_loss, commit_loss, f32.new_zeros(()), usage), (None, None, all_ids)


# ---------------------------------------------------------------------------------------------
# The VQVAE
# ---------------------------------------------------------------------------------------------


class MultiScaleVQVAE(nn.Module):
    """Encoder, quant_conv, multi-scale quantiser, post_quant_conv, decoder (official keys)."""

    def __init__(self, config: MSVQConfig):
        super().__init__()
        self.config = config
        g = config.norm_num_groups
        layout = dict(ch_mult=config.ch_mult, num_res_blocks=config.num_res_blocks)
        self.encoder = Encoder(config.ch, config.z_channels, config.dropout, g, **layout)
        self.decoder = Decoder(config.ch, config.z_channels, config.dropout, g, **layout)
        self.quantize = MultiScaleQuantizer(config)
        ks = config.quant_conv_ks
        self.quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, 1, ks // 2)
        self.post_quant_conv = nn.Conv2d(config.z_channels, config.z_channels, ks, 1, ks // 2)

    @property
    def patch_nums(self) -> tuple[int, ...]:
        return self.config.v_patch_nums

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def downsample(self) -> int:
        return self.config.downsample

    def check_image(self, x: torch.Tensor) -> None:
        """Images must be (B, 3, R, R) with R = 16 * patch_nums[-1]."""
        r = self.config.image_size
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (r, r):
            raise ValueError(f"this VQVAE (patch_nums {self.patch_nums}) encodes (B, 3, {r}, {r}) images, "
                             f"got shape {tuple(x.shape)}")

    def encode_features(self, x: torch.Tensor) -> torch.Tensor:
        """Image (B, 3, R, R) -> f = quant_conv(encoder(x)) (B, C, h, w)."""
        self.check_image(x)
        return self.quant_conv(self.encoder(x))

    def img_to_ids(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Image -> ids of every scale, [(B, pn*pn)] (official `img_to_idxBl`)."""
        return self.quantize.quantize_residual(self.encode_features(x))[0]

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> the concatenated per-scale ids (B, L): what VAR trains on and code extraction stores."""
        return torch.cat(self.img_to_ids(x), dim=1)

    def split_ids(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Concatenated ids (B, L) -> per-scale ids [(B, pn*pn)]; refuses another length or range."""
        n = self.config.num_tokens
        if codes.dim() != 2 or codes.shape[1] != n:
            raise ValueError(f"multi-scale codes of patch_nums {self.patch_nums} are (B, {n}), "
                             f"got shape {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.vocab_size):
            raise ValueError(f"code ids must lie in [0, {self.vocab_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        return list(codes.split([p * p for p in self.patch_nums], dim=1))

    def fhat_to_img(self, f_hat: torch.Tensor) -> torch.Tensor:
        """f_hat (B, C, h, w) -> image (B, 3, R, R) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat)).clamp(-1, 1)

    def ids_to_img(self, ids: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """Per-scale ids (a list, or concatenated (B, L)) -> image in [-1, 1] (official `idxBl_to_img`)."""
        if isinstance(ids, torch.Tensor):
            ids = self.split_ids(ids)
        return self.fhat_to_img(self.quantize.ids_to_fhat(ids))

    def decode_indices(self, indices: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """The tokenizer interface the samplers call: concatenated ids (B, L) -> image in [-1, 1].
        `grid`, the raster grid of single-scale tokenizers, must be the last scale when given."""
        if grid is not None and tuple(grid) != (self.patch_nums[-1],) * 2:
            raise ValueError(f"grid {tuple(grid)} does not match the last scale {self.patch_nums[-1]} "
                             f"of patch_nums {self.patch_nums}")
        return self.ids_to_img(indices)

    def img_to_reconstructed_img(self, x: torch.Tensor) -> torch.Tensor:
        """Encode, quantise over every scale, decode the final f_hat; (B, 3, R, R) in [-1, 1]."""
        _, f_hats = self.quantize.quantize_residual(self.encode_features(x))
        return self.fhat_to_img(f_hats[-1])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """VQVAE training: image -> (reconstruction, (vq_loss, commit_loss, entropy_loss, usage)),
        no clamp (official `forward`); the loss terms as `MultiScaleQuantizer.forward`."""
        f_hat, losses, _ = self.quantize(self.encode_features(x))
        return self.decoder(self.post_quant_conv(f_hat)), losses


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def load_msvq_weights(model: MultiScaleVQVAE, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict load; the usage buffer alone may have another number of scales (the official
    `VQVAE.load_state_dict` then keeps the model's own, as the values are statistics only)."""
    sd = dict(state_dict)
    own = model.quantize.ema_vocab_hit_SV
    usage = sd.get(USAGE_BUFFER)
    if usage is not None and usage.dim() == 2 and usage.shape[1] == own.shape[1] and usage.shape[0] != own.shape[0]:
        sd[USAGE_BUFFER] = own.detach().clone()
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_state_dict(sd, expected, what)
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()}, strict=True)


def build_msvq(**config: Any) -> MultiScaleVQVAE:
    """A fresh multi-scale VQVAE; defaults = the released `vae_ch160v4096z32` (256 px patch_nums)."""
    return MultiScaleVQVAE(MSVQConfig(**config))


#: `--vq-model` sizes of the shared tokenizer trainer (`tokenizer/train_vq.py`), beside LlamaGen's
#: VQ-16 / VQ-8 / VQ-debug. `MSVQ-16` = the released layout (ch 160, x16, GroupNorm 32);
#: `MSVQ-debug` (ours) = a small x4 tokenizer for the CPU demo and the tests (32 px -> 8x8 latent).
#: Vocabulary and code width come from --codebook-size / --codebook-embed-dim (release: 4096 / 32).
MSVQ_models: dict[str, dict[str, Any]] = {
    "MSVQ-16": dict(ch=160),
    "MSVQ-debug": dict(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_num_groups=8),
}


def build_msvq_named(name: str, codebook_size: int, codebook_embed_dim: int, image_size: int,
                     patch_nums: str | Sequence[int] | None = None, **config: Any) -> MultiScaleVQVAE:
    """A fresh multi-scale VQVAE of a named size for training, for `image_size` px images.

    `patch_nums` None takes the official list of the image size (256 / 512 / 1024). Phi sharing
    is the release's 4 partially shared convs, or one per scale with fewer than 4 scales (so every
    phi is trained: DDP needs every parameter used). Refuses sizes that do not fit together.
    """
    if name not in MSVQ_models:
        raise ValueError(f"unknown multi-scale VQVAE size {name!r}; known: {', '.join(MSVQ_models)}")
    if patch_nums is None:
        if str(image_size) not in PATCH_NUMS:
            raise ValueError(f"no official patch_nums for {image_size} px: pass --v-patch-nums "
                             f"(e.g. 1_2_4_8 for an 8x8 latent)")
        patch_nums = PATCH_NUMS[str(image_size)]
    nums = parse_patch_nums(patch_nums)
    cfg = MSVQConfig(**{**MSVQ_models[name], "vocab_size": codebook_size, "z_channels": codebook_embed_dim,
                        "v_patch_nums": nums, "share_quant_resi": min(4, len(nums)), **config})
    if cfg.image_size != image_size:
        raise ValueError(f"{name} downsamples by {cfg.downsample}, so patch_nums {nums} (last scale "
                         f"{nums[-1]}) encode {cfg.image_size} px images, not {image_size} px; the last "
                         f"scale must be {image_size // cfg.downsample}")
    return MultiScaleVQVAE(cfg)


def msvq_config_dict(model: MultiScaleVQVAE) -> dict:
    """The configuration as plain JSON-like values (lists, not tuples): checkpoints and code folders."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(model.config).items()}


def msvq_identity(model: MultiScaleVQVAE, source: str = "") -> dict:
    """What identifies a multi-scale VQVAE for code folders (as `tokenizer.loading.tokenizer_identity`
    for LlamaGen's): its config (with the drivers' names `codebook_size` / `codebook_embed_dim` for
    vocabulary and code width) and a hash of its weights, the usage statistics left out."""
    config = {**msvq_config_dict(model), "kind": "msvq", "codebook_size": model.config.vocab_size,
              "codebook_embed_dim": model.config.z_channels}
    return {"config": config, "weights_sha256": state_dict_sha256(model, {USAGE_BUFFER}), "source": source}


def load_msvq(path: str | os.PathLike, patch_nums: Sequence[int] | None = None,
              map_location: str | torch.device = "cpu", image_size: int | None = None,
              prefer_ema: bool = False, **config: Any) -> MultiScaleVQVAE:
    """Load a multi-scale VQVAE strictly, frozen and in eval mode.

    The official `vae_ch160v4096z32.pth` is a flat state dict: it is built with the official
    constructor defaults (`ch=160, V=4096, Cvae=32`) and `patch_nums` (the release serves both the
    256 and 512 px lists). Our training checkpoints record `msvq_config`, which then builds the
    model and must agree with the requested `patch_nums`. A LlamaGen VQ checkpoint is refused.
    `image_size` (optional) picks the official patch_nums of a flat file when `patch_nums` is None
    and must fit the loaded model (image = downsampling * last scale). `prefer_ema` takes the
    checkpoint's EMA weights when it has them.
    """
    ckpt = load_checkpoint(path, map_location=map_location)
    what = f"multi-scale VQVAE checkpoint {path}"
    if isinstance(ckpt, dict) and "vq_config" in ckpt:
        raise CheckpointError(f"{what} is a LlamaGen VQ tokenizer ({ckpt.get('vq_model', '?')}); VAR needs "
                              f"its multi-scale VQVAE (e.g. vae_ch160v4096z32.pth)")
    if isinstance(ckpt, dict) and "msvq_config" in ckpt:
        cfg = MSVQConfig(**ckpt["msvq_config"])
        if patch_nums is not None and tuple(cfg.v_patch_nums) != tuple(patch_nums):
            raise CheckpointError(f"{what} was trained with patch_nums {cfg.v_patch_nums}, "
                                  f"but {tuple(patch_nums)} was asked for")
    else:
        if patch_nums is None and image_size is not None:
            if str(image_size) not in PATCH_NUMS:
                raise CheckpointError(f"{what} records no patch_nums and {image_size} px has no official "
                                      f"list: pass the patch_nums (--pn / --v-patch-nums)")
            patch_nums = PATCH_NUMS[str(image_size)]
        if patch_nums is not None:
            config["v_patch_nums"] = tuple(patch_nums)
        cfg = MSVQConfig(**config)
    if image_size is not None and cfg.image_size != image_size:
        raise CheckpointError(f"{what} encodes {cfg.image_size} px images (patch_nums {cfg.v_patch_nums}, "
                              f"downsampling {cfg.downsample}), not {image_size} px")
    weights = extract_weights(ckpt, prefer_ema=prefer_ema, what=what)
    if any(k == "quantize.codebook_used" or k.startswith("encoder.conv_blocks.") for k in weights):
        raise CheckpointError(f"{what} is a LlamaGen VQ tokenizer; VAR needs its multi-scale VQVAE "
                              f"(e.g. vae_ch160v4096z32.pth)")
    model = MultiScaleVQVAE(cfg)
    load_msvq_weights(model, weights, what)
    model.requires_grad_(False)
    return model.eval()


def msvq_checkpoint(model: MultiScaleVQVAE) -> dict:
    """What our tokenizer training saves for a multi-scale VQVAE: weights plus `msvq_config`."""
    return {"model": model.state_dict(), "msvq_config": msvq_config_dict(model)}

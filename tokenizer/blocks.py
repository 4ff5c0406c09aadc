"""The convolutional blocks both tokenizers are built from (taming-transformers' VQGAN blocks).

LlamaGen's VQ (FoundationVision/LlamaGen `tokenizer/tokenizer_image/vq_model.py`) and VAR's VQVAE
(FoundationVision/VAR `models/basic_vae.py`) use the same blocks under the same state-dict key
names. They differ in three details, each a parameter here so that both keep their official
numerics: the GroupNorm group count (`groups`, 32 in both releases, smaller in tiny fixtures), the
non-linearity (`act`: LlamaGen writes `x * sigmoid(x)`, VAR calls `F.silu`, which rounds
differently) and the attention layout (`fused_qkv`: VAR projects q, k, v with one 1x1 conv `qkv`
and runs an explicit softmax; LlamaGen has three convs `q`, `k`, `v`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def Normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with eps 1e-6 and affine weights (both official `Normalize`s)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


def swish(x: torch.Tensor) -> torch.Tensor:
    """LlamaGen's `nonlinearity`: `x * sigmoid(x)`, written out (not bit-equal to `F.silu`)."""
    return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    """`nin(x) + conv2(drop(act(norm2(conv1(act(norm1(x)))))))`; nin is a 1x1 conv when widths differ.

    Dropout with p = 0 is the identity (ATen returns its input and draws nothing), as VAR's
    `nn.Identity` for `dropout <= 1e-6`.
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, groups: int = 32,
                 act: Activation = swish):
        super().__init__()
        self.act = act
        self.norm1 = Normalize(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, 1, 1)
        self.norm2 = Normalize(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1, 1, 0) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = self.conv2(self.dropout(self.act(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, 1x1-conv projections, residual.

    `fused_qkv=False`: LlamaGen's layout (`q`, `k`, `v` convs), attention by
    `scaled_dot_product_attention` (scale c^-0.5). `fused_qkv=True`: VAR's layout (one `qkv` conv)
    and its explicit `softmax(q^T k * c^-0.5)`, kept as written for parity.
    """

    def __init__(self, channels: int, groups: int = 32, fused_qkv: bool = False):
        super().__init__()
        self.fused_qkv = fused_qkv
        self.norm = Normalize(channels, groups)
        if fused_qkv:
            self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        else:
            self.q = nn.Conv2d(channels, channels, 1)
            self.k = nn.Conv2d(channels, channels, 1)
            self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        if self.fused_qkv:
            q, k, v = self.qkv(y).reshape(b, 3, c, h * w).unbind(1)  # each (B, C, HW)
            attn = torch.bmm(q.transpose(1, 2), k).mul_(c ** -0.5).softmax(dim=2)  # (B, HW_q, HW_k)
            out = torch.bmm(v, attn.transpose(1, 2)).reshape(b, c, h, w)  # (B, C, HW_q)
        else:
            q = self.q(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
            k = self.k(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
            v = self.v(y).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
            out = F.scaled_dot_product_attention(q, k, v)  # scale c^-0.5, (B, HW, C)
            out = out.transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Zero-pad right and bottom by one, then a stride-2 3x3 conv without padding (both officials)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 2, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2, then a 3x3 conv (both officials)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))

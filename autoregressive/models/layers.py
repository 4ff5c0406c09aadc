"""Shared transformer layers of the LlamaGen GPT family, written once for every strategy.

RMSNorm -> 2-D RoPE -> attention (mask, KV cache) -> SwiGLU feed-forward -> DropPath -> block.
Numerics follow the official code (FoundationVision/LlamaGen
`autoregressive/models/gpt.py`): RMSNorm in float32 with eps 1e-5, RoPE applied in float32 to q
and k, fused `wqkv` without bias, SDPA with scale 1/sqrt(head_dim). PAR and NPP reuse these
blocks unchanged; ARPG and LPD reuse the norm, RoPE, feed-forward and the KV cache. Every model
of the project attends through `attention` (and builds its masks with `attention_bias`), the one
place that keeps SDPA on its fused kernels.

Notation: B batch, T sequence length (or G new elements in a decode step), D model width,
H heads, hd head width, L KV-cache length.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.kv_cache import SDPA_ALIGN, LayerKVCache, find_multiple


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """`(x * rsqrt(mean(x^2) + eps)) * weight`, the statistics computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


# ---------------------------------------------------------------------------------------------
# 2-D rotary position embedding
# ---------------------------------------------------------------------------------------------


def precompute_freqs_cis_2d(grid_size: int, head_dim: int, base: float = 10000.0,
                            cls_token_num: int = 1) -> torch.Tensor:
    """The LlamaGen 2-D RoPE table, shape (cls_token_num + grid_size^2, head_dim // 2, 2).

    Frequencies f_m = base^(-2m / (head_dim/2)), m = 0 .. head_dim/4 - 1 (float32). Cell (r, c),
    raster index p = r * grid_size + c, gets the head_dim/2 angles [r*f_0 .. r*f_{M-1},
    c*f_0 .. c*f_{M-1}] (row first); [..., 0] = cos, [..., 1] = sin. The first `cls_token_num`
    rows are zeros (cos = sin = 0): the rotation of a class token is the zero matrix, so its q and
    k are multiplied by 0 — an official quirk (`precompute_freqs_cis_2d`) that every logit depends on.
    """
    half = head_dim // 2
    freqs = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))  # (hd/4,)
    t = torch.arange(grid_size, dtype=torch.float32)
    angles = torch.outer(t, freqs)  # (grid, hd/4)
    grid_angles = torch.cat([
        angles[:, None, :].expand(-1, grid_size, -1),  # row angle of cell (r, c)
        angles[None, :, :].expand(grid_size, -1, -1),  # column angle of cell (r, c)
    ], dim=-1)  # (grid, grid, hd/2)
    table = torch.stack([torch.cos(grid_angles), torch.sin(grid_angles)], dim=-1)  # (grid, grid, hd/2, 2)
    table = table.flatten(0, 1)  # (grid^2, hd/2, 2), raster order
    return torch.cat([torch.zeros(cls_token_num, half, 2), table])  # (cls + grid^2, hd/2, 2)


class Float32RopeBuffer(nn.Module):
    """Base of the models that keep their RoPE table in a non-persistent `freqs_cis` buffer.

    The official table is a plain float32 attribute that `.to(bfloat16)` never touches; a buffer
    would be cast, so a dtype cast leaves the table float32 here while devices still follow.
    """

    def _apply(self, fn, recurse=True):
        table = self.freqs_cis
        super()._apply(fn, recurse)
        if self.freqs_cis.dtype != table.dtype:
            self.freqs_cis = table.to(self.freqs_cis.device)
        return self


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of x (B, T, H, hd) by the table rows of each element.

    `freqs_cis` is (T, hd/2, 2), one row per element shared by the batch, or (B, T, hd/2, 2) for
    per-sample positions (ARPG's random orders). Computed in float32, returned in x's dtype.
    """
    xs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    if freqs_cis.dim() == 3:
        freqs_cis = freqs_cis[None]  # (1, T, hd/2, 2)
    fc = freqs_cis[:, :, None].to(xs.device)  # (B|1, T, 1, hd/2, 2)
    cos, sin = fc[..., 0], fc[..., 1]
    out = torch.stack([xs[..., 0] * cos - xs[..., 1] * sin,
                       xs[..., 1] * cos + xs[..., 0] * sin], dim=-1)  # (B, T, H, hd/2, 2)
    return out.flatten(3).type_as(x)  # (B, T, H, hd)


# ---------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the attention's q, k, v get from input x: autocast's when it is on, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def attention_bias(mask: torch.Tensor, dtype: torch.dtype, width: int | None = None) -> torch.Tensor:
    """A boolean (True = attend) or additive mask (..., Q, S) -> the additive mask SDPA reads:
    0 where attended, -inf elsewhere, in `dtype`, `width` columns (default S; columns past S are
    hidden). Built once per step (or forward) and shared by every layer.

    The storage of each row is padded to a multiple of `SDPA_ALIGN` elements and the result is a
    view of its first `width` columns, which is what the memory-efficient kernel needs (SDPA would
    otherwise convert and pad the mask again in every layer; compiled code has failed with "attn_bias
    is not correctly aligned"). A row with no attended column gives zeros, as SDPA gives for a
    boolean mask (which it turns into this same additive mask); no decoding mask has such a row.
    """
    s = mask.shape[-1]
    width = s if width is None else width
    if width < s:
        raise ValueError(f"a mask of {s} columns cannot be narrowed to {width} here; slice it first")
    storage = torch.full((*mask.shape[:-1], find_multiple(width, SDPA_ALIGN)), float("-inf"), dtype=dtype,
                         device=mask.device)
    bias = storage[..., :width]
    if mask.dtype == torch.bool:
        bias[..., :s].masked_fill_(mask, 0.0)
    else:
        bias[..., :s].copy_(mask)
    return bias


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              is_causal: bool = False, dropout_p: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention` for every model: q (B, H, T, hd), k and v (B, H, S, hd)
    (cast to q's dtype) -> (B, H, T, hd).

    `mask` should come from `attention_bias` in q's dtype; any other mask (boolean, another dtype)
    is converted here, in every call. A head dim that is not a multiple of `SDPA_ALIGN` (GPT-3B's
    100) would send SDPA to the math kernel, which upcasts bf16 to float32: q, k, v are zero-padded
    to the next multiple and the output sliced back, with the scale given explicitly (default
    1/sqrt(hd) of the unpadded head dim), so the scores are the same dot products.
    """
    hd = q.shape[-1]
    scale = 1.0 / math.sqrt(hd) if scale is None else scale
    k, v = k.to(q.dtype), v.to(q.dtype)
    if mask is not None and mask.dtype != q.dtype:
        mask = attention_bias(mask, q.dtype)
    pad = find_multiple(hd, SDPA_ALIGN) - hd
    if pad:
        q, k, v = (F.pad(z, (0, pad)) for z in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None,
                                         dropout_p=dropout_p, scale=scale)  # (B, H, T, hd + pad)
    return out[..., :hd] if pad else out


class Attention(nn.Module):
    """Multi-head self-attention with a fused `wqkv` projection, 2-D RoPE and an optional KV cache.

    `n_kv_head < n_head` gives grouped-query attention (keys/values shared by n_head // n_kv_head
    query heads), as the official `ModelArgs.n_kv_head`; the released models use n_kv_head = n_head.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0):
        super().__init__()
        assert dim % n_head == 0, f"dim {dim} is not a multiple of n_head {n_head}"
        self.dim = dim
        self.n_head = n_head
        self.n_kv_head = n_kv_head or n_head
        assert n_head % self.n_kv_head == 0
        self.head_dim = dim // n_head
        self.wqkv = nn.Linear(dim, (n_head + 2 * self.n_kv_head) * self.head_dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.resid_dropout = nn.Dropout(resid_dropout_p)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D).

        Args:
            freqs_cis: RoPE rows of the T elements, (T, hd/2, 2) or (B, T, hd/2, 2).
            mask: additive mask from `attention_bias` (a boolean one, True = attend, is converted
                in every call) broadcastable to (B, H, T, S), S = T without a cache, S = L with
                one. None with `is_causal` = plain causal.
            kv_cache: when given, the new keys/values are written at the slots `cache_pos` (T,)
                and the attention reads the whole cache (hide unwritten slots with `mask`).
        """
        b, t, _ = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv_dim, kv_dim], dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim)  # (B, T, H, hd)
        k = k.view(b, t, self.n_kv_head, self.head_dim)  # (B, T, H_kv, hd)
        v = v.view(b, t, self.n_kv_head, self.head_dim)  # (B, T, H_kv, hd)
        q = apply_rotary_emb(q, freqs_cis)
        k = apply_rotary_emb(k, freqs_cis)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H|H_kv, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_pos, k, v)  # (B, H_kv, L, hd)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k = k.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(rep, dim=1)  # (B, H, S, hd)
        out = attention(q, k, v, mask, is_causal, self.attn_dropout_p if self.training else 0.0)  # (B, H, T, hd)
        out = out.transpose(1, 2).reshape(b, t, self.dim)  # (B, T, D)
        return self.resid_dropout(self.wo(out))


# ---------------------------------------------------------------------------------------------
# Feed-forward, drop-path, block
# ---------------------------------------------------------------------------------------------


def ffn_hidden_dim(dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None) -> int:
    """SwiGLU width: find_multiple(int(2 * 4 * dim / 3) [* multiplier], multiple_of)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return find_multiple(hidden, multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: `dropout(w2(silu(w1 x) * w3 x))`, no biases."""

    def __init__(self, dim: int, multiple_of: int = 256, ffn_dim_multiplier: float | None = None,
                 ffn_dropout_p: float = 0.0):
        super().__init__()
        hidden = ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier)
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_dropout = nn.Dropout(ffn_dropout_p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class DropPath(nn.Module):
    """Stochastic depth: zero a whole residual branch per sample with probability p (training).

    Kept samples are scaled by 1/(1-p). Draws from torch's default generator of x's device, the
    same stream as `nn.Dropout`, which the training driver seeds per rank.
    """

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)


class TransformerBlock(nn.Module):
    """Pre-norm block: `h = x + dp(attn(norm(x)))`, `out = h + dp(ffn(norm(h)))`."""

    def __init__(self, dim: int, n_head: int, n_kv_head: int | None = None, multiple_of: int = 256,
                 ffn_dim_multiplier: float | None = None, norm_eps: float = 1e-5,
                 attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0,
                 ffn_dropout_p: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(dim, n_head, n_kv_head, attn_dropout_p, resid_dropout_p)
        self.feed_forward = FeedForward(dim, multiple_of, ffn_dim_multiplier, ffn_dropout_p)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); the arguments as `Attention.forward`."""
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, mask, is_causal,
                                              kv_cache, cache_pos))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))

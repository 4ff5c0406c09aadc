"""ARPG: a decoder-decoder transformer with target-aware queries, with the official key names.

Written from the official code (hp-l33/ARPG `models/arpg.py`), on the shared
RMSNorm, SwiGLU feed-forward, 2-D RoPE and KV cache of `layers.py` / `kv_cache.py`, so that the
released checkpoints `arpg_300m.pt`, `arpg_700m.pt`, `arpg_1b.pt` (ARPG-L/XL/XXL) load strictly.

Two passes:
1. Self-decoder (n_layer/2 blocks, `layers.self_dec`): `[class token ; image tokens]`, each token with
   the RoPE of its own grid cell. The result is normed and projected once into one K/V pair
   (`layers.to_k`, `layers.to_v`; RoPE on K), shared by every cross block.
2. Cross-decoder (n_layer/2 blocks, `layers.cross_dec`): queries that all start as the `[MASK]`
   embedding; their attention query gets the RoPE of the *target* cell. They read the shared K/V,
   never each other. `head(norm(.))` gives the logits of each target.

One embedding table holds image tokens `[0, V)`, the mask token `V`, class c at `V + 1 + c`, the
null class at `V + C + 1` (= class id C, so labels use C for "no class", as the GPT does) and an
unused row `V + C + 2`.

Masks: teacher forcing (`forward`) is causal in both passes (query i sees the class and the tokens
0..i-1 of the order). Generation (`decode_step`) masks nothing but the cache slots not written yet:
tokens fed in one step see each other, as in the official inference.

Notation: B batch, L inputs, G queries, S cache slots, D width, H heads, hd head width, V vocab.
RoPE *rows* index the table: row 0 = class token (zeros), row 1 + p = grid cell p (raster index).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.gpt import official_c2i_kwargs
from autoregressive.models.kv_cache import KVCache, LayerKVCache
from autoregressive.models.layers import (FeedForward, Float32RopeBuffer, RMSNorm, apply_rotary_emb, attention,
                                         attention_bias, compute_dtype, precompute_freqs_cis_2d)


@dataclass
class ARPGConfig:
    """Constructor arguments, with the official `ModelArgs` names and defaults."""

    dim: int = 4096
    n_layer: int = 32  # self blocks + cross blocks, half each
    n_head: int = 32
    multiple_of: int = 256  # SwiGLU width rounds up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1  # on the input tokens (not on the queries)
    attn_dropout_p: float = 0.0  # on attention probabilities
    resid_dropout_p: float = 0.1  # after every attention `proj`
    ffn_dropout_p: float = 0.1  # after `w2`
    drop_path_rate: float = 0.0  # stored, unused, as in the official model
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for CFG (training)
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # image tokens N = grid^2
    # Ours, off in every official size: a learned absolute position embedding (`pos_embed`, 1 + N
    # rows: class slot, grid cells) added to each input token (its own cell) and each query (its
    # target cell). See `ARPG` for why tiny models need it.
    abs_pos_embed: bool = False

    @classmethod
    def from_official(cls, config: dict) -> "ARPGConfig":
        """From an official `ModelArgs` dict (e.g. a golden fixture's `config`)."""
        return cls(**official_c2i_kwargs(cls, config, "ARPG"))

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


# ---------------------------------------------------------------------------------------------
# Attention: self-attention with its own K/V, cross-attention on the shared K/V
# ---------------------------------------------------------------------------------------------


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
            dropout_p: float) -> torch.Tensor:
    """`layers.attention` over (B, H, T, hd) queries and (B, H, S, hd) keys/values -> (B, T, H * hd)."""
    out = attention(q, k, v, mask, is_causal, dropout_p)  # (B, H, T, hd)
    return out.transpose(1, 2).flatten(2)  # (B, T, D)


class SelfAttention(nn.Module):
    """Multi-head attention of the input tokens, separate `to_q/to_k/to_v` and `proj` (no bias)."""

    def __init__(self, dim: int, n_head: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0):
        super().__init__()
        assert dim % n_head == 0, f"dim {dim} is not a multiple of n_head {n_head}"
        self.n_head, self.head_dim = n_head, dim // n_head
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.proj_drop = nn.Dropout(resid_dropout_p)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D), rope (L | B x L, hd/2, 2) -> (B, L, D); the cache as `layers.Attention`."""
        b, n, _ = x.shape
        q, k, v = (f(x).view(b, n, self.n_head, self.head_dim) for f in (self.to_q, self.to_k, self.to_v))
        q, k = apply_rotary_emb(q, rope), apply_rotary_emb(k, rope)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))  # (B, H, L, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_pos, k, v)  # (B, H, S, hd)
        out = _attend(q, k, v, mask, is_causal, self.attn_dropout_p if self.training else 0.0)
        return self.proj_drop(self.proj(out))


class CrossAttention(nn.Module):
    """Queries attend to the shared K/V of the self-decoder: only `to_q` and `proj` of its own."""

    def __init__(self, dim: int, n_head: int, attn_dropout_p: float = 0.0, resid_dropout_p: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim = n_head, dim // n_head
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.attn_dropout_p = attn_dropout_p
        self.proj_drop = nn.Dropout(resid_dropout_p)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor,
                mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """x (B, G, D) queries with the RoPE of their targets; k, v (B, H, S, hd) -> (B, G, D)."""
        b, n, _ = x.shape
        q = apply_rotary_emb(self.to_q(x).view(b, n, self.n_head, self.head_dim), rope).transpose(1, 2)
        out = _attend(q, k, v, mask, is_causal, self.attn_dropout_p if self.training else 0.0)
        return self.proj_drop(self.proj(out))


class SelfDecoder(nn.Module):
    """Pre-norm block over the input tokens: `h = x + attn(norm(x))`, `out = h + ffn(norm(h))`."""

    def __init__(self, c: ARPGConfig):
        super().__init__()
        self.attn = SelfAttention(c.dim, c.n_head, c.attn_dropout_p, c.resid_dropout_p)
        self.ffn = FeedForward(c.dim, c.multiple_of, c.ffn_dim_multiplier, c.ffn_dropout_p)
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, mask: torch.Tensor | None = None,
                is_causal: bool = False, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, L, D) -> (B, L, D); the arguments as `SelfAttention.forward`."""
        h = x + self.attn(self.attn_norm(x), rope, mask, is_causal, kv_cache, cache_pos)
        return h + self.ffn(self.ffn_norm(h))


class CrossDecoder(nn.Module):
    """Pre-norm block over the queries, attending to the shared K/V."""

    def __init__(self, c: ARPGConfig):
        super().__init__()
        self.attn = CrossAttention(c.dim, c.n_head, c.attn_dropout_p, c.resid_dropout_p)
        self.ffn = FeedForward(c.dim, c.multiple_of, c.ffn_dim_multiplier, c.ffn_dropout_p)
        self.attn_norm = RMSNorm(c.dim, c.norm_eps)
        self.ffn_norm = RMSNorm(c.dim, c.norm_eps)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: torch.Tensor,
                mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """Queries q (B, G, D) -> (B, G, D); the arguments as `CrossAttention.forward`."""
        h = q + self.attn(self.attn_norm(q), k, v, rope, mask, is_causal)
        return h + self.ffn(self.ffn_norm(h))


class DecoderDecoder(nn.Module):
    """The two passes (official `layers`): self blocks, one shared K/V projection, cross blocks.

    With a cache, self block i uses cache layer i and the shared K/V uses layer n_layer/2.
    """

    def __init__(self, c: ARPGConfig):
        super().__init__()
        self.n_head = c.n_head
        self.self_dec = nn.ModuleList([SelfDecoder(c) for _ in range(c.n_layer // 2)])
        self.cross_dec = nn.ModuleList([CrossDecoder(c) for _ in range(c.n_layer // 2)])
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.to_k = nn.Linear(c.dim, c.dim, bias=False)
        self.to_v = nn.Linear(c.dim, c.dim, bias=False)

    def forward(self, x: torch.Tensor, q: torch.Tensor, input_rope: torch.Tensor, query_rope: torch.Tensor,
                self_mask: torch.Tensor | None = None, cross_mask: torch.Tensor | None = None,
                is_causal: bool = False, cache: KVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Inputs x (B, L, D), queries q (B, G, D) -> query states (B, G, D)."""
        for i, block in enumerate(self.self_dec):
            x = block(x, input_rope, self_mask, is_causal, cache.layer(i) if cache is not None else None,
                      cache_pos)  # (B, L, D)
        b, n, d = x.shape
        x = self.norm(x)
        k = apply_rotary_emb(self.to_k(x).view(b, n, self.n_head, -1), input_rope).transpose(1, 2)  # (B, H, L, hd)
        v = self.to_v(x).view(b, n, self.n_head, -1).transpose(1, 2)  # (B, H, L, hd)
        if cache is not None:
            k, v = cache.layer(len(self.self_dec)).update(cache_pos, k, v)  # (B, H, S, hd)
        for block in self.cross_dec:
            q = block(q, k, v, query_rope, cross_mask, is_causal)  # (B, G, D)
        return q


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class ARPG(Float32RopeBuffer):
    """ARPG c2i model (official class `Transformer`); see the module docstring.

    Positions, officially, are only relative: 2-D RoPE on q and k, and the class token's RoPE row
    is zero, so no key is anchored at a known cell. A query therefore cannot tell its absolute
    target cell (the first query's output does not depend on it at all); a large model can infer
    it from the spread of the visible cells, a tiny one cannot, and without "where" it also
    ignores the class. `abs_pos_embed` (ours, used by `ARPG-debug` only) adds a learned absolute
    embedding to tokens and queries; the official sizes keep the official computation and keys.
    """

    def __init__(self, config: ARPGConfig):
        super().__init__()
        c = self.config = config
        if c.cls_token_num != 1:
            raise ValueError("an ARPG model has exactly one class token (cls_token_num = 1)")
        if c.grid_size ** 2 != c.block_size:
            raise ValueError(f"block_size {c.block_size} is not a square grid")
        if c.n_layer % 2:
            raise ValueError(f"n_layer {c.n_layer} must be even (half self, half cross blocks)")
        self.num_classes = c.num_classes
        self.cls_token_num = c.cls_token_num
        self.mask_token_id = c.vocab_size
        self.none_conds_id = c.vocab_size + c.num_classes + 1
        self.embeddings = nn.Embedding(c.vocab_size + c.num_classes + 3, c.dim)
        self.embed_drop = nn.Dropout(c.token_dropout_p)
        self.layers = DecoderDecoder(c)
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.head = nn.Linear(c.dim, c.vocab_size, bias=False)
        # Non-persistent (absent from the state_dict, as the official plain attribute); kept float32.
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(
            c.grid_size, c.dim // c.n_head, c.rope_base, c.cls_token_num), persistent=False)
        # (1 + N, D), indexed by RoPE row; only with `abs_pos_embed` (absent from official checkpoints).
        self.pos_embed = nn.Parameter(torch.zeros(1 + c.block_size, c.dim)) if c.abs_pos_embed else None
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # Every Linear and the embedding table ~ N(0, 0.02); the head starts at zero (official).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=self.config.initializer_range)
        nn.init.zeros_(self.head.weight)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=self.config.initializer_range)

    # -- tokens -----------------------------------------------------------------------------------

    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Class labels (B,) in [0, C] (C = null class) -> embedding ids (B, 1): `V + 1 + label`."""
        return (labels + self.config.vocab_size + 1).unsqueeze(1)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class C with probability `class_dropout_prob`.

        Draws from torch's default generator of the labels' device (as the official
        `preprocess_condition` and `nn.Dropout`), which the training driver seeds per rank.
        """
        drop = torch.rand(labels.shape[0], device=labels.device) < self.config.class_dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def rope(self, rows: torch.Tensor) -> torch.Tensor:
        """RoPE table rows (L,) or (B, L) -> (L | B x L, hd/2, 2)."""
        return self.freqs_cis[rows]

    # -- the shared trunk -------------------------------------------------------------------------

    def forward_shared(self, input_ids: torch.Tensor, input_rows: torch.Tensor, query_rows: torch.Tensor,
                       self_mask: torch.Tensor | None = None, cross_mask: torch.Tensor | None = None,
                       is_causal: bool = False, cache: KVCache | None = None,
                       cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Input ids (B, L) with RoPE rows (L | B x L), queries for the RoPE rows `query_rows`
        (G | B x G) -> float32 logits (B, G, V), one row per query.

        Masks are boolean (True = attend), (L, L | S) for the self blocks and (G, L | S) for the
        cross blocks, each turned into one additive mask here for all its blocks (one for both
        when they are the same tensor); `is_causal` = top-left causal in both when no mask is given.
        """
        b = input_ids.shape[0]
        x = self.embed_drop(self.embeddings(input_ids))  # (B, L, D)
        dtype, same = compute_dtype(x), cross_mask is self_mask
        if self_mask is not None:
            self_mask = attention_bias(self_mask, dtype)
        if same:
            cross_mask = self_mask
        elif cross_mask is not None:
            cross_mask = attention_bias(cross_mask, dtype)
        g = query_rows.shape[-1]
        queries = self.embeddings.weight[self.mask_token_id].expand(b, g, -1)  # (B, G, D)
        if self.pos_embed is not None:
            x = x + self.pos_embed[input_rows]  # (B, L, D)
            queries = queries + self.pos_embed[query_rows]  # (B, G, D)
        q = self.layers(x, queries, self.rope(input_rows), self.rope(query_rows), self_mask, cross_mask,
                        is_causal, cache, cache_pos)  # (B, G, D)
        return self.head(self.norm(q)).float()  # (B, G, V)

    # -- teacher forcing --------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, orders: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training computation under given orders (causal masks in both passes).

        Args:
            idx: (B, N) raster codes; the first N - 1 of each order are fed after the class token.
            cond: (B,) class labels (C = null); dropped to C with `class_dropout_prob` in train mode.
            orders: (B, N) one permutation of the raster indices per sample (0-based).
            targets: (B, N) raster codes to predict (= idx); the loss is computed only when given.
        Returns:
            (logits (B, N, V) float32 in order layout — row t predicts position orders[:, t] —,
             mean cross-entropy or None).
        """
        if self.training and self.config.class_dropout_prob > 0:
            cond = self.drop_labels(cond)
        shuffled = idx.gather(1, orders)  # (B, N)
        input_ids = torch.cat([self.condition_ids(cond), shuffled[:, :-1]], dim=1)  # (B, N)
        rows = torch.cat([torch.zeros_like(orders[:, :1]), orders + 1], dim=1)  # (B, 1 + N)
        logits = self.forward_shared(input_ids, rows[:, :-1], rows[:, 1:], is_causal=True)  # (B, N, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.gather(1, orders).reshape(-1))
        return logits, loss

    # -- KV-cached generation ---------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed cache: one slice per self block plus one for the shared K/V; `max_len` slots
        (default 1 + N: the class token and every image token)."""
        c = self.config
        w = self.embeddings.weight
        return KVCache(c.n_layer // 2 + 1, batch_size, c.n_head, max_len or 1 + c.block_size,
                       c.dim // c.n_head, dtype=dtype or w.dtype, device=w.device)

    def decode_step(self, input_ids: torch.Tensor, input_rows: torch.Tensor, query_rows: torch.Tensor,
                    cache: KVCache, cache_pos: torch.Tensor) -> torch.Tensor:
        """Append inputs (B, L) at the consecutive cache slots `cache_pos` (L,) and predict the
        targets of `query_rows` (G | B x G) -> logits (B, G, V).

        Everything written so far (slots <= cache_pos[-1]) is visible to every new input and query:
        the official inference has no mask, so a group's tokens see each other.
        """
        slots = torch.arange(cache.max_len, device=cache_pos.device)
        mask = (slots <= cache_pos[-1])[None, :]  # (1, S)
        return self.forward_shared(input_ids, input_rows, query_rows, self_mask=mask, cross_mask=mask,
                                   cache=cache, cache_pos=cache_pos)


# ---------------------------------------------------------------------------------------------
# Sizes (the official `ARPG_models`; `ARPG-debug` is ours, for the tests and the CPU demo)
# ---------------------------------------------------------------------------------------------

ARPG_SIZES: dict[str, dict] = {
    "ARPG-L": dict(dim=1024, n_layer=24, n_head=16),  # 319,845,376 params (arpg_300m.pt)
    "ARPG-XL": dict(dim=1280, n_layer=36, n_head=20),  # 718,997,760 (arpg_700m.pt)
    "ARPG-XXL": dict(dim=1536, n_layer=48, n_head=24),  # 1,302,449,664 (arpg_1b.pt)
    # Tiny: with the official relative-only positions it learns neither where a target is nor,
    # hence, the class (chance-level digits in the demo); the absolute embedding fixes that.
    "ARPG-debug": dict(dim=128, n_layer=4, n_head=4, multiple_of=64, abs_pos_embed=True),
}


def build_arpg(gpt_model: str, **kwargs) -> ARPG:
    """A fresh ARPG model of a named size; `kwargs` are `ARPGConfig` fields."""
    if gpt_model not in ARPG_SIZES:
        raise ValueError(f"unknown ARPG --gpt-model {gpt_model!r}; known: {', '.join(ARPG_SIZES)}")
    return ARPG(ARPGConfig(**{**ARPG_SIZES[gpt_model], **kwargs}))

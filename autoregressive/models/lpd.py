"""The LPD model: a MAR-style ViT that predicts any group of grid cells from any set of known ones.

Written from the official code (mit-han-lab/lpd `models/lpd.py`, `models/block.py`),
with the official state_dict key names so that `lpd_l_256 ... lpd_xl_512` load strictly.
Every sequence element is one embedding passed through the input LayerNorm `z_proj_ln`:
- class slot: `class_emb[y] + pos_embed[0]` (`fake_latent` instead of the class: unconditional / CFG),
- context token of grid cell p: `token_emb[x_p] + pos_embed[p + 1]`,
- position query for cell p: `mask_token + pos_embed[p + 1]` (one shared learnable query token).
Blocks are timm-ViT pre-norm blocks (LayerNorm eps 1e-6, qkv with bias, GELU MLP x4, no RoPE).

Two paths, two methods:
- `forward(codes, labels, orders, group_sizes, targets)` — parallelised teacher forcing: the
  sequence `[class, context in order (all but the last group), queries for all N cells]` under
  the block mask of `group_attention_mask` (training, as the official `LPD.forward`);
- `decode_step(x, cache, slots, mask)` — embedded elements at KV-cache slots (sampling, `LPD.sample_tokens`);
  `autoregressive/strategies/lpd.py` drives it through the shared group decoding loop.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.kv_cache import KVCache, LayerKVCache
from autoregressive.models.layers import attention, attention_bias, compute_dtype


@dataclass
class LPDConfig:
    """Constructor arguments; `from_official` maps the official `LPD(...)` keyword names."""

    dim: int = 1024  # decoder_embed_dim
    n_layer: int = 24  # decoder_depth
    n_head: int = 16  # decoder_num_heads
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6  # the official factories' partial(nn.LayerNorm, eps=1e-6)
    num_classes: int = 1000  # class_num; no null row (`fake_latent` is the null class)
    vocab_size: int = 16384  # vqgan_vocab_size
    block_size: int = 256  # N = (img_size / vqgan_stride)^2
    label_drop_prob: float = 0.1
    attn_dropout: float = 0.1  # officially inert: the fused attention gets no dropout_p
    proj_dropout: float = 0.1  # after the attention projection and in both MLP layers

    @classmethod
    def from_official(cls, config: dict) -> "LPDConfig":
        """From the official constructor kwargs (a golden fixture's `config` or a key list's)."""
        norm = str(config.get("norm_layer", "eps=1e-06"))
        if "eps=1e-06" not in norm:
            raise ValueError(f"only the official LayerNorm eps 1e-6 is supported, got norm_layer {norm!r}")
        grid = int(config["img_size"]) // int(config.get("vqgan_stride", 16))
        return cls(dim=config["decoder_embed_dim"], n_layer=config["decoder_depth"],
                   n_head=config["decoder_num_heads"], mlp_ratio=float(config.get("mlp_ratio", 4.0)),
                   num_classes=config.get("class_num", 1000), vocab_size=config.get("vqgan_vocab_size", 16384),
                   block_size=grid * grid, label_drop_prob=config.get("label_drop_prob", 0.1),
                   attn_dropout=config.get("attn_dropout", 0.1), proj_dropout=config.get("proj_dropout", 0.1))

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


#: The official factories `lpd_l`, `lpd_xl`, `lpd_xxl` (the `--gpt-model` choices of `--strategy lpd`);
#: `LPD-debug` is ours, for the tests and the CPU demo.
LPD_SIZES: dict[str, dict] = {
    "LPD-L": dict(dim=1024, n_layer=24, n_head=16),
    "LPD-XL": dict(dim=1280, n_layer=36, n_head=20),
    "LPD-XXL": dict(dim=1536, n_layer=48, n_head=24),
    "LPD-debug": dict(dim=128, n_layer=4, n_head=4),
}


# ---------------------------------------------------------------------------------------------
# Blocks (timm ViT layout, official key names)
# ---------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """`proj(SDPA(q, k, v, mask))` with a fused biased `qkv`; optional KV cache (no RoPE)."""

    def __init__(self, dim: int, n_head: int, proj_drop: float = 0.0):
        super().__init__()
        self.n_head = n_head
        self.head_dim = dim // n_head
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D); `mask` additive (`layers.attention_bias`) over (T, T), or (T, L)
        with a cache."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_pos, k, v)  # (B, H, L, hd)
        out = attention(q, k, v, mask)  # (B, H, T, hd), scale 1/sqrt(hd) as the official fused attention
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, d)))


class Mlp(nn.Module):
    """`drop(fc2(drop(GELU(fc1 x))))`, exact (erf) GELU, hidden width mlp_ratio x dim."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`."""

    def __init__(self, dim: int, n_head: int, mlp_ratio: float, norm_eps: float, proj_drop: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, n_head, proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask, kv_cache, cache_pos)
        return x + self.mlp(self.norm2(x))


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------


def group_attention_mask(group_sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Training mask (T, T) bool, True = attend, T = 1 + 2N - g_K (the official `LPD.forward` mask).

    Group ids: class 0, context of group j (j < K) 2j, queries of group j 2j - 1. An element sees
    its own group (same id) and every context element (class included) of a smaller id.
    """
    sizes = [int(g) for g in group_sizes]
    ctx = torch.repeat_interleave(torch.arange(1, len(sizes), device=device) * 2,
                                  torch.tensor(sizes[:-1], device=device))
    qry = torch.repeat_interleave(torch.arange(1, len(sizes) + 1, device=device) * 2 - 1,
                                  torch.tensor(sizes, device=device))
    ids = torch.cat([torch.zeros(1, dtype=torch.long, device=device), ctx, qry])  # (T,)
    is_ctx = torch.arange(ids.numel(), device=device) < 1 + ctx.numel()
    return (ids[:, None] == ids[None, :]) | (is_ctx[None, :] & (ids[None, :] < ids[:, None]))


def block_causal_mask(block_sizes: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """(L, L) bool over consecutive blocks: a row sees every column up to the end of its block
    (the official `create_block_causal_mask([1] + group_sizes)` with True for 0, False for -inf)."""
    ends = torch.cumsum(torch.tensor([int(b) for b in block_sizes], device=device), 0)
    row_end = torch.repeat_interleave(ends, torch.tensor([int(b) for b in block_sizes], device=device))
    return torch.arange(int(ends[-1]), device=device)[None, :] < row_end[:, None]


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class LPD(nn.Module):
    """Locality-aware parallel decoding transformer. Logit row t predicts the token of `orders[:, t]`."""

    def __init__(self, config: LPDConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        d = config.dim
        # Official parameter order (state_dict keys in order).
        self.class_emb = nn.Embedding(config.num_classes, d)
        self.token_emb = nn.Embedding(config.vocab_size, d)
        self.fake_latent = nn.Parameter(torch.zeros(1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, config.block_size + 1, d))
        self.z_proj_ln = nn.LayerNorm(d, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList([Block(d, config.n_head, config.mlp_ratio, config.norm_eps, config.proj_dropout)
                                     for _ in range(config.n_layer)])
        self.norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """Official init: embeddings and learned tokens N(0, 0.02); Linear xavier-uniform, bias 0;
        LayerNorm weight 1, bias 0."""
        for p in (self.class_emb.weight, self.fake_latent, self.mask_token, self.pos_embed, self.token_emb.weight):
            nn.init.normal_(p, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    # -- embeddings ------------------------------------------------------------------------------

    def class_rows(self, labels: torch.Tensor | None, batch_size: int,
                   drop: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D) class embeddings; `fake_latent` where `drop` (B,) is True or when labels is None."""
        null = self.fake_latent.expand(batch_size, -1)
        if labels is None:
            return null
        rows = self.class_emb(labels)  # (B, D)
        if drop is not None:
            rows = torch.where(drop[:, None], null.to(rows.dtype), rows)
        return rows

    def embed_class(self, rows: torch.Tensor) -> torch.Tensor:
        """Class rows (B, D) -> the class slot (B, 1, D)."""
        return self.z_proj_ln(rows[:, None] + self.pos_embed[:, 0:1])

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Context elements: tokens (B, G) at raster positions (B, G) or (G,) -> (B, G, D)."""
        return self.z_proj_ln(self.token_emb(tokens) + self.pos_embed[0, positions + 1])

    def embed_queries(self, positions: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Position queries for raster positions (B, G) or (G,) -> (B, G, D)."""
        pos = self.pos_embed[0, positions + 1]  # (B, G, D) or (G, D)
        return self.z_proj_ln(self.mask_token + pos).expand(batch_size, -1, -1)

    # -- training --------------------------------------------------------------------------------

    def training_sequence(self, codes: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor,
                          group_sizes: Sequence[int], drop: torch.Tensor | None = None) -> torch.Tensor:
        """The block input (B, T, D): `[class, ctx(o_0 .. o_{N-g_K-1}), qry(o_0 .. o_{N-1})]`."""
        b, n = codes.shape
        n_ctx = n - int(group_sizes[-1])
        ctx_pos = orders[:, :n_ctx]  # (B, N - g_K)
        return torch.cat([
            self.embed_class(self.class_rows(labels, b, drop)),
            self.embed_tokens(codes.gather(1, ctx_pos), ctx_pos),
            self.embed_queries(orders, b),
        ], dim=1)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None, orders: torch.Tensor,
                group_sizes: Sequence[int], targets: torch.Tensor | None = None,
                drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher-forced pass over one schedule.

        Args:
            codes: (B, N) raster token ids; labels: (B,) class ids (None = unconditional).
            orders: (B, N) one permutation of the raster indices per sample.
            group_sizes: the schedule (sums to N); group j is predicted from groups < j.
            targets: (B, N) raster ids to score (normally `codes`); drop: (B,) bool label dropout.
        Returns:
            logits (B, N, V), row t for cell `orders[:, t]`; the mean cross-entropy or None.
        """
        x = self.training_sequence(codes, labels, orders, group_sizes, drop)  # (B, T, D)
        mask = attention_bias(group_attention_mask(group_sizes, device=x.device), compute_dtype(x))  # (T, T)
        for block in self.blocks:
            x = block(x, mask)
        logits = self.head(self.norm(x[:, -codes.shape[1]:]))  # (B, N, V)
        loss = None
        if targets is not None:
            tgt = targets.gather(1, orders)  # (B, N) in order-index order
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1))
        return logits, loss

    # -- sampling --------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A preallocated cache of `1 + N` slots (class + one per order index) by default."""
        w = self.head.weight
        return KVCache(len(self.blocks), batch_size, self.config.n_head,
                       max_len or self.config.block_size + 1, self.config.dim // self.config.n_head,
                       dtype=dtype or w.dtype, device=w.device)

    def decode_step(self, x: torch.Tensor, cache: KVCache, slots: torch.Tensor, mask: torch.Tensor,
                    num_out: int) -> torch.Tensor:
        """Embedded elements x (B, T, D) written at cache `slots` (T,), attending with `mask` (T, L')
        bool, L' <= L (the cache slots past L' are hidden) -> float32 logits (B, num_out, V) of the
        last `num_out` elements (the queries), for the CFG combine in float32 (as the other models)."""
        mask = attention_bias(mask, compute_dtype(x), cache.max_len)  # (T, L), one for every block
        for i, block in enumerate(self.blocks):
            x = block(x, mask, cache.layer(i), slots)
        return self.head(self.norm(x[:, -num_out:])).float()


# ---------------------------------------------------------------------------------------------
# Construction, position-embedding interpolation
# ---------------------------------------------------------------------------------------------


def build_lpd(gpt_model: str, **config) -> LPD:
    """An LPD of a named size; `config` sets any `LPDConfig` field, the size's own (dim, n_layer,
    n_head) included, as `build_gpt` and `build_arpg` let them (unknown keys: error)."""
    if gpt_model not in LPD_SIZES:
        raise ValueError(f"unknown LPD size {gpt_model!r}; known: {', '.join(LPD_SIZES)}")
    known = set(LPDConfig.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown LPD config keys: {unknown}")
    return LPD(LPDConfig(**{**LPD_SIZES[gpt_model], **config}))


def config_dict(model: LPD) -> dict:
    return asdict(model.config)


def interpolate_pos_embed(pos_embed: torch.Tensor, num_tokens: int, mode: str = "bicubic") -> torch.Tensor:
    """(1, 1 + n_old, D) -> (1, 1 + num_tokens, D): class row kept, the grid resized (official
    `interpolate_pos_embed`, used when a 512 px model starts from a 256 px checkpoint)."""
    old, new = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(num_tokens)
    if old * old != pos_embed.shape[1] - 1 or new * new != num_tokens:
        raise ValueError(f"pos_embed of {pos_embed.shape[1] - 1} cells -> {num_tokens}: both must be square grids")
    d = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].reshape(1, old, old, d).permute(0, 3, 1, 2)  # (1, D, old, old)
    grid = F.interpolate(grid.float(), size=(new, new), mode=mode).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, num_tokens, d)], dim=1)

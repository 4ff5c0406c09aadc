"""The VAR transformer (next-scale prediction), with the official state_dict key names.

A sequence of L = sum pn^2 tokens, scale after scale: token 0 is the class embedding plus
`pos_start`; the tokens of scale k > 1 are `word_embed` of the tokenizer's accumulated f_hat after
scales 1..k-1, area-downsampled to scale k (built by `tokenizer/msvq.py`). Every token gets a
level and an absolute position embedding; attention is block-causal over scales; the class
conditions every block and the head through AdaLN (per block, or shared: the d36 layout). Position
l predicts token l (no shift). Written from the official code
(FoundationVision/VAR `models/var.py`, `models/basic_var.py`), so `var_d16.pth ... var_d36.pth`
load as published.

Training is `forward(labels, x)` over the whole sequence with the block-causal mask; sampling is
`decode_step` once per scale (given its token indices) with an explicit preallocated `KVCache` (the new scale's keys/values
are written at its slots; its mask rows hide the later scales), which equals the full recompute.

Notation: B batch, L tokens, G tokens of one scale, C width, H heads, hd = C / H, V vocabulary,
Cvae the tokenizer's code width.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.kv_cache import KVCache, LayerKVCache
from autoregressive.models.layers import DropPath, attention, attention_bias, compute_dtype
from tokenizer.msvq import PATCH_NUMS, parse_patch_nums

#: `--gpt-model` names: the released depths (`models/__init__.py: build_vae_var` sizing rule) and VAR-debug.
VAR_SIZES: dict[str, int] = {"VAR-d16": 16, "VAR-d20": 20, "VAR-d24": 24, "VAR-d30": 30, "VAR-d36": 36,
                             "VAR-debug": 4}
#: Sizes off the official width rule: `VAR-debug` is ours, for the tests and the CPU demo
#: (the width and heads of GPT-debug).
VAR_WIDTHS: dict[str, dict[str, int]] = {"VAR-debug": dict(embed_dim=128, num_heads=4)}


@dataclass
class VARConfig:
    """The official `VAR(...)` arguments (names kept) plus the tokenizer sizes it needs.

    `embed_dim`, `num_heads` and `drop_path_rate` default to the official sizing rule:
    width = 64 * depth, heads = depth, drop_path = 0.1 * depth / 24.
    """

    depth: int = 16
    embed_dim: int | None = None
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float | None = None
    norm_eps: float = 1e-6
    shared_aln: bool = False
    cond_drop_rate: float = 0.1
    attn_l2_norm: bool = True
    patch_nums: tuple[int, ...] = field(default_factory=lambda: PATCH_NUMS["256"])
    num_classes: int = 1000
    vocab_size: int = 4096
    Cvae: int = 32
    token_dropout_p: float = 0.0  # dropout on the input embeddings (ours; the official has none)

    def __post_init__(self) -> None:
        self.patch_nums = parse_patch_nums(self.patch_nums)
        if self.embed_dim is None:
            self.embed_dim = 64 * self.depth
        if self.num_heads is None:
            self.num_heads = self.depth
        if self.drop_path_rate is None:
            self.drop_path_rate = 0.1 * self.depth / 24
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_official(cls, config: dict, vocab_size: int, Cvae: int) -> "VARConfig":
        """From the official constructor kwargs (fused-kernel switches dropped: numerics are equal)."""
        kw = {k: v for k, v in config.items() if k not in ("flash_if_available", "fused_if_available")}
        return cls(**kw, vocab_size=vocab_size, Cvae=Cvae)

    @property
    def L(self) -> int:
        return sum(p * p for p in self.patch_nums)

    @property
    def begin_ends(self) -> list[tuple[int, int]]:
        """(first, last + 1) token index of every scale."""
        out, cur = [], 0
        for p in self.patch_nums:
            out.append((cur, cur + p * p))
            cur += p * p
        return out


# ---------------------------------------------------------------------------------------------
# Blocks (models/basic_var.py)
# ---------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head attention with biased q and v, an unbiased k (the `zero_k_bias` buffer), and with
    `attn_l2_norm` cosine attention: `softmax(temp_h * <q/|q|, k/|k|>)`, temp_h = exp(min(
    scale_mul_h, log 100)) learned per head, SDPA scale 1 (else scale 0.25 / sqrt(hd))."""

    def __init__(self, dim: int, num_heads: int, attn_drop: float, proj_drop: float, attn_l2_norm: bool):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, num_heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(dim))
        self.v_bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, kv_cache: LayerKVCache | None = None,
                cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). `mask` is additive (0 / -inf, from `layers.attention_bias`),
        broadcastable to (B, H, T, S); with `kv_cache` the new keys/values go to slots `cache_pos`
        (T,) and S = L."""
        b, t, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x, self.mat_qkv.weight, bias).view(b, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, hd)
        if self.attn_l2_norm:
            temp = self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()  # (1, H, 1, 1)
            q = F.normalize(q, dim=-1).mul(temp)
            k = F.normalize(k, dim=-1)
        if kv_cache is not None:
            k, v = kv_cache.update(cache_pos, k, v)  # (B, H, L, hd); k cached already normalised
        out = attention(q, k, v, mask, dropout_p=self.attn_drop if self.training else 0.0,
                        scale=self.scale)  # (B, H, T, hd)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, t, c)))


class FFN(nn.Module):
    """`fc2(gelu_tanh(fc1(x)))`, hidden = mlp_ratio * C, biased."""

    def __init__(self, dim: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class AdaLNSelfAttn(nn.Module):
    """AdaLN block: `x += g1 * attn(LN(x)(1+s1)+b1)`, `x += g2 * ffn(LN(x)(1+s2)+b2)`; LN without
    affine. The six modulations (order gamma1, gamma2, scale1, scale2, shift1, shift2) come from
    `ada_lin(c)` per block, or, shared AdaLN, from `ada_gss + S(c)` with S computed once per forward."""

    def __init__(self, cfg: VARConfig, drop_path: float):
        super().__init__()
        c = cfg.embed_dim
        self.C = c
        self.drop_path = DropPath(drop_path)
        self.attn = SelfAttention(c, cfg.num_heads, cfg.attn_drop_rate, cfg.drop_rate, cfg.attn_l2_norm)
        self.ffn = FFN(c, round(c * cfg.mlp_ratio), cfg.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(c, eps=cfg.norm_eps, elementwise_affine=False)
        self.shared_aln = cfg.shared_aln
        if self.shared_aln:
            self.ada_gss = nn.Parameter(torch.randn(1, 1, 6, c) / c ** 0.5)
        else:
            self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None,
                kv_cache: LayerKVCache | None = None, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C); cond: the class embedding (B, C), or S(c) (B, 1, 6, C) with shared AdaLN."""
        if self.shared_aln:
            mods = self.ada_gss + cond  # (B, 1, 6, C)
        else:
            mods = self.ada_lin(cond).view(-1, 1, 6, self.C)  # (B, 1, 6, C)
        gamma1, gamma2, scale1, scale2, shift1, shift2 = mods.unbind(2)  # each (B, 1, C)
        h = self.attn(self.ln_wo_grad(x).mul(scale1 + 1).add(shift1), mask, kv_cache, cache_pos)
        x = x + self.drop_path(h.mul(gamma1))
        h = self.ffn(self.ln_wo_grad(x).mul(scale2 + 1).add(shift2))
        return x + self.drop_path(h.mul(gamma2))


class AdaLNBeforeHead(nn.Module):
    """`LN(x) * (1 + scale) + shift` with (scale, shift) = Linear(SiLU(c)) of the raw class embedding."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)  # each (B, 1, C)
        return self.ln_wo_grad(x).mul(scale + 1).add(shift)


class SharedAdaLin(nn.Linear):
    """The shared AdaLN projection, viewed (B, 1, 6, C)."""

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return super().forward(cond).view(-1, 1, 6, self.out_features // 6)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


class VAR(nn.Module):
    def __init__(self, config: VARConfig):
        super().__init__()
        cfg = self.config = config
        c, n_scales = cfg.embed_dim, len(cfg.patch_nums)
        self.num_classes, self.first_l = cfg.num_classes, cfg.patch_nums[0] ** 2
        self.begin_ends = cfg.begin_ends
        init_std = math.sqrt(1 / c / 3)
        # Input: start token, absolute positions of every scale, scale index of every token.
        self.pos_start = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.first_l, c), std=init_std))
        self.pos_1LC = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, cfg.L, c), std=init_std))
        level = torch.cat([torch.full((p * p,), i) for i, p in enumerate(cfg.patch_nums)])  # (L,)
        self.register_buffer("lvl_1L", level[None].contiguous())  # (1, L) int64
        # Block-causal mask: token i sees token j iff scale(i) >= scale(j).
        mask = torch.where(level[:, None] >= level[None, :], 0.0, -torch.inf)  # (L, L)
        self.register_buffer("attn_bias_for_masking", mask.reshape(1, 1, cfg.L, cfg.L).contiguous())
        self.word_embed = nn.Linear(cfg.Cvae, c)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, c)  # row num_classes = the null class
        nn.init.trunc_normal_(self.class_emb.weight, std=init_std)
        self.lvl_embed = nn.Embedding(n_scales, c)
        nn.init.trunc_normal_(self.lvl_embed.weight, std=init_std)
        self.token_drop = nn.Dropout(cfg.token_dropout_p)
        # Blocks.
        self.shared_ada_lin = (nn.Sequential(nn.SiLU(), SharedAdaLin(c, 6 * c)) if cfg.shared_aln
                               else nn.Identity())
        dpr = torch.linspace(0, cfg.drop_path_rate, cfg.depth, device="cpu").tolist()  # linearly increasing
        self.blocks = nn.ModuleList([AdaLNSelfAttn(cfg, dpr[i]) for i in range(cfg.depth)])
        # Head.
        self.head_nm = AdaLNBeforeHead(c, cfg.norm_eps)
        self.head = nn.Linear(c, cfg.vocab_size)

    # -- input embedding ------------------------------------------------------------------------

    def _embed(self, labels: torch.Tensor, x: torch.Tensor | None, begin: int,
               end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens begin..end-1 (B, end-begin, C) and the class embedding (B, C), in float32.

        `x` (B, end - max(begin, first_l), Cvae) are the next-scale inputs of the non-start tokens.
        """
        with torch.autocast(device_type=labels.device.type, enabled=False):
            cond = self.class_emb(labels)  # (B, C)
            parts = []
            if begin < self.first_l:
                parts.append(cond[:, None].expand(-1, self.first_l, -1) + self.pos_start)  # (B, first_l, C)
            if end > max(begin, self.first_l):
                parts.append(self.word_embed(x.to(self.word_embed.weight.dtype)))  # (B, T', C)
            h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            h = h + self.lvl_embed(self.lvl_1L[:, begin:end]) + self.pos_1LC[:, begin:end]
        return self.token_drop(h), cond

    def _blocks_and_head(self, h: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None,
                         cache: KVCache | None = None, cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Every block, then the head: float32 logits (B, T, V). `mask` (rows of the block-causal
        bias, at most as wide as the cache) becomes one additive mask for every block; with a
        cache it is as wide as the cache, the slots past the given rows hidden."""
        if mask is not None:
            mask = attention_bias(mask, compute_dtype(h), None if cache is None else cache.max_len)
        cond_blocks = self.shared_ada_lin(cond)  # (B, C), or (B, 1, 6, C) shared
        for i, block in enumerate(self.blocks):
            h = block(h, cond_blocks, mask, None if cache is None else cache.layer(i), cache_pos)
        # The head in float32 (official) unless the weights themselves were cast down.
        h = h.float() if self.head.weight.dtype == torch.float32 else h.to(self.head.weight.dtype)
        return self.head(self.head_nm(h, cond)).float()  # (B, T, V) float32

    # -- training -------------------------------------------------------------------------------

    def forward(self, labels: torch.Tensor, x: torch.Tensor, targets: torch.Tensor | None = None,
                prog_si: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Teacher forcing over every scale with the block-causal mask.

        Args:
            labels: (B,) class ids; in training mode each is replaced by the null class with
                probability `cond_drop_rate` (official; the official also does it in eval mode).
            x: (B, L' - first_l, Cvae) next-scale inputs (`MultiScaleQuantizer.ids_to_var_input`).
            targets: (B, L') token ids; when given, the mean cross-entropy is returned too.
            prog_si: progressive training: only scales 0..prog_si (L' = their tokens); -1 = all.
        Returns:
            (logits (B, L', V) float32, loss or None).
        """
        end = self.begin_ends[prog_si][1] if prog_si >= 0 else self.config.L
        if self.training and self.config.cond_drop_rate > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.cond_drop_rate
            labels = torch.where(drop, self.num_classes, labels)
        h, cond = self._embed(labels, x, 0, end)  # (B, L', C)
        logits = self._blocks_and_head(h, cond, self.attn_bias_for_masking[:, :, :end, :end])
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # -- sampling -------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for the whole sequence (L slots, rounded up as every `KVCache`) of
        `batch_size` rows (`max_len`: None or L)."""
        w = self.head.weight
        cfg = self.config
        if max_len not in (None, cfg.L):
            raise ValueError(f"a VAR cache holds every scale: max_len must be {cfg.L}, got {max_len}")
        return KVCache(cfg.depth, batch_size, cfg.num_heads, cfg.L, cfg.embed_dim // cfg.num_heads,
                       dtype=dtype or w.dtype, device=w.device)

    def scale_positions(self, si: int, device: torch.device | str | None = None) -> torch.Tensor:
        """The token indices of scale si (pn_si^2,) int64: what `decode_step` takes for that scale."""
        begin, end = self.begin_ends[si]
        return torch.arange(begin, end, device=self.head.weight.device if device is None else device)

    def decode_step(self, labels: torch.Tensor, x: torch.Tensor | None, cache: KVCache,
                    pos: torch.Tensor) -> torch.Tensor:
        """One scale from the cache of the scales before it: logits (B, G, V) float32.

        `pos` (G,) are the scale's token indices (`scale_positions(si)`), a tensor rather than the
        scale index so that one compiled graph serves every scale after the first (the token count
        G is a dynamic dimension; the position and level embeddings and the mask rows are gathered
        at `pos`). `labels` (B,) (both CFG halves when guided); `x` (B, G, Cvae) is the scale's
        input, None for the first scale (the class start tokens). The scale's keys/values are
        written at slots `pos`; its rows of the block-causal mask hide the later (unwritten) slots.
        """
        with torch.autocast(device_type=labels.device.type, enabled=False):
            cond = self.class_emb(labels)  # (B, C)
            if x is None:  # the first scale: the start tokens
                h = cond[:, None].expand(-1, self.first_l, -1) + self.pos_start  # (B, first_l, C)
            else:
                h = self.word_embed(x.to(self.word_embed.weight.dtype))  # (B, G, C)
            h = h + self.lvl_embed(self.lvl_1L[:, pos]) + self.pos_1LC[:, pos]
        h = self.token_drop(h)
        # The block-causal rows at `pos` over the L' slots read, from the levels (no slice of the
        # (L, L) bias: its end would guard L' <= L, and the last bucket is L rounded up); the
        # padding slots past L get a level above every scale, so they stay hidden.
        slots = torch.arange(cache.max_len, device=pos.device)
        slot_level = torch.where(slots < self.config.L, self.lvl_1L[0, slots.clamp(max=self.config.L - 1)],
                                 len(self.config.patch_nums))  # (L',)
        mask = (self.lvl_1L[0, pos][:, None] >= slot_level[None, :])[None, None]  # (1, 1, G, L') True = attend
        return self._blocks_and_head(h, cond, mask, cache, pos)

    # -- init -----------------------------------------------------------------------------------

    @torch.no_grad()
    def init_weights(self, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5, init_head: float = 0.02,
                     init_std: float = -1) -> None:
        """The official `VAR.init_weights` (training from scratch only; flags --aln --alng --hd --ini).

        Linear/Embedding weights trunc-normal(init_std, bounds +-2), biases 0 (init_std < 0:
        sqrt(1/(3C))); head weight *= init_head; AdaLN projections: scale/shift rows *= init_adaln,
        gamma rows *= init_adaln_gamma (so blocks start near identity); attn.proj and ffn.fc2
        weights / sqrt(2 depth).
        """
        c, depth = self.config.embed_dim, self.config.depth
        if init_std < 0:
            init_std = (1 / c / 3) ** 0.5
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * depth))
            block.ffn.fc2.weight.div_(math.sqrt(2 * depth))
            if block.shared_aln:
                block.ada_gss[:, :, 2:].mul_(init_adaln)
                block.ada_gss[:, :, :2].mul_(init_adaln_gamma)
            else:
                block.ada_lin[-1].weight[2 * c:].mul_(init_adaln)
                block.ada_lin[-1].weight[:2 * c].mul_(init_adaln_gamma)
                block.ada_lin[-1].bias.zero_()


def build_var(gpt_model: str | None = None, init: dict[str, float] | None = None, **config: Any) -> VAR:
    """A VAR of a released depth (`VAR-d16` ... `VAR-d36`) or of `depth=` given in `config`.

    `init` (the official --aln/--alng/--hd/--ini) runs `init_weights`, as the official
    `build_vae_var` does for training from scratch; None keeps the constructor's initialisation
    (enough when a checkpoint is loaded next).
    """
    if gpt_model is not None:
        if gpt_model not in VAR_SIZES:
            raise ValueError(f"unknown VAR size {gpt_model!r}; known: {', '.join(VAR_SIZES)}")
        depth = config.setdefault("depth", VAR_SIZES[gpt_model])
        if depth != VAR_SIZES[gpt_model]:
            raise ValueError(f"{gpt_model} has depth {VAR_SIZES[gpt_model]}, but depth={depth} was asked for")
        for k, v in VAR_WIDTHS.get(gpt_model, {}).items():
            config.setdefault(k, v)
    model = VAR(VARConfig(**config))
    if init is not None:
        model.init_weights(**init)
    return model


def config_dict(model: VAR) -> dict:
    """The constructor arguments of a model, for checkpoints."""
    return asdict(model.config)

"""PAR (Parallelized Autoregressive Visual Generation, arXiv 2412.15119) on the LlamaGen GPT.

The backbone is `gpt.Transformer` unchanged (same blocks, key names, class token, CFG). PAR adds
four things (official: YuqingWang1029/PAR `autoregressive/models/gpt.py`):

(a) S = n - 1 learnable transition tokens M_1..M_S, the one extra key
    `spe_tok_embeddings.special_embeddings.weight` (S, dim);
(b) the token order: the grid is cut into s x s regions (n = s^2); in-region offsets are visited in
    raster order and, for each offset, the n regions in raster order (`par_order`);
(c) the sequence `[class, zp_0 .. zp_{n-1}, M_1 .. M_S, zp_n .. zp_{N-2}]` whose RoPE table is the
    2-D table with the cells permuted into PAR order and zero rows (cos = sin = 0) for the class
    token and the M tokens, which zeroes their q and k (so an M token's attention is the uniform
    average of the values it sees — an official quirk every logit depends on);
(d) the attention mask: causal over the first n positions, then blocks of n positions that are
    bidirectional inside and causal between (`par_mask`); the block [n, 2n) holds zp_{n-1} and the
    M tokens.

Sequence slots ("positions"): class at 0, PAR token k < n at k + 1, M_j at n + j, PAR token k >= n
at k + S + 1. The RoPE table and the mask are indexed by slot, so a KV-cached decoding step feeds
elements at their slots exactly as training does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.gpt import GPT_SIZES, GPTConfig, Transformer
from autoregressive.models.kv_cache import KVCache
from autoregressive.models.layers import precompute_freqs_cis_2d


# ---------------------------------------------------------------------------------------------
# Order, schedule, RoPE table and mask as functions of (grid, n)
# ---------------------------------------------------------------------------------------------


def check_par_tokens(ar_token_num: int, spe_token_num: int) -> None:
    """n must be a perfect square >= 4 and S = n - 1 (the two flags of one PAR model)."""
    s = math.isqrt(ar_token_num) if ar_token_num > 0 else 0
    if ar_token_num < 4 or s * s != ar_token_num:
        raise ValueError(f"--ar-token-num must be a perfect square >= 4 (4 = PAR-4x, 16 = PAR-16x), "
                         f"got {ar_token_num}; one token per step is --strategy raster")
    if spe_token_num != ar_token_num - 1:
        raise ValueError(f"--spe-token-num must be --ar-token-num - 1 = {ar_token_num - 1} "
                         f"(the transition tokens M_1..M_(n-1)), got {spe_token_num}")


def check_par_shape(grid: int, ar_token_num: int, spe_token_num: int) -> None:
    """Refuse the (grid, n, S) that the official code cannot run, with the reason.

    n must be a perfect square s^2 >= 4 with s dividing the grid side, and S = n - 1: otherwise the
    mask blocks and the RoPE layout disagree (official: wrong outputs or a crash in `generate`).
    """
    check_par_tokens(ar_token_num, spe_token_num)
    s = math.isqrt(ar_token_num)
    if grid % s:
        raise ValueError(f"--ar-token-num {ar_token_num} cuts the grid into {s} x {s} regions, but the "
                         f"{grid} x {grid} token grid does not divide by {s} (choose --image-size / "
                         f"--downsample-size a multiple of {s})")


def par_order(grid: int, ar_token_num: int, device: torch.device | str | None = "cpu") -> torch.Tensor:
    """order (N,) int64: `order[k]` = raster index of PAR position k.

    PAR index k = ((r*R + c)*s + i)*s + j for region (i, j) and in-region offset (r, c), R = grid/s;
    raster p = (i*R + r)*grid + (j*R + c). Equals the official reshape (s, R, s, R) -> permute
    (r, c, i, j) -> flatten of `train_c2i.py`. Example grid 4, n 4: [0,2,8,10, 1,3,9,11, ...].
    """
    s = math.isqrt(ar_token_num)
    r = grid // s
    raster = torch.arange(grid * grid, device=device).view(s, r, s, r)  # [i, r, j, c]
    return raster.permute(1, 3, 0, 2).reshape(-1)  # [r, c, i, j] flattened


def par_group_sizes(num_tokens: int, ar_token_num: int) -> list[int]:
    """Tokens per decoding step: n single steps, then N/n - 1 steps of n (N/n + n - 1 steps)."""
    return [1] * ar_token_num + [ar_token_num] * (num_tokens // ar_token_num - 1)


def par_token_slots(k: torch.Tensor, ar_token_num: int, spe_token_num: int) -> torch.Tensor:
    """Sequence slot of PAR token k (tensor): k + 1 for the first n, k + S + 1 after the M tokens."""
    return torch.where(k < ar_token_num, k + 1, k + spe_token_num + 1)


def par_freqs_cis(grid: int, head_dim: int, base: float, ar_token_num: int, spe_token_num: int,
                  order: torch.Tensor) -> torch.Tensor:
    """The RoPE table by slot, (1 + N + S, head_dim/2, 2): `[0 (class); cells order[0..n-1];
    0 x S (M tokens); cells order[n..N-1]]` (official `precompute_freqs_cis_2d` of PAR)."""
    cells = precompute_freqs_cis_2d(grid, head_dim, base, cls_token_num=0)[order]  # (N, hd/2, 2), PAR order
    zero = cells.new_zeros(1, *cells.shape[1:])
    return torch.cat([zero, cells[:ar_token_num], zero.expand(spe_token_num, -1, -1),
                      cells[ar_token_num:]])  # (1 + N + S, hd/2, 2)


def par_mask(q_pos: torch.Tensor, k_len: int, ar_token_num: int, spe_token_num: int) -> torch.Tensor:
    """Boolean mask (Q, k_len), True = attend, for the elements at slots `q_pos` (Q,).

    allowed(q, k) = k <= q or k == 0 or (q >= n and k < n + (floor((q - n) / (S + 1)) + 1) (S + 1)):
    causal over slots < n, then blocks of S + 1 slots from slot n on, bidirectional inside.
    """
    n, b = ar_token_num, spe_token_num + 1
    k = torch.arange(k_len, device=q_pos.device)[None, :]  # (1, K)
    q = q_pos[:, None]  # (Q, 1)
    block_end = n + (torch.div(q - n, b, rounding_mode="floor") + 1) * b  # (Q, 1), first slot after q's block
    return (k <= q) | (k == 0) | ((q >= n) & (k < block_end))  # (Q, K)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------


@dataclass
class PARConfig(GPTConfig):
    """`GPTConfig` plus PAR's two official `ModelArgs` fields."""

    spe_token_num: int = 3  # S, the transition tokens M_1..M_S (= n - 1)
    ar_token_num: int = 4  # n, tokens per parallel step (s^2 regions)


class SpecialTokenEmbedding(nn.Module):
    """The S transition tokens; the attribute names give the official key
    `spe_tok_embeddings.special_embeddings.weight` (S, dim)."""

    def __init__(self, num: int, dim: int):
        super().__init__()
        self.special_embeddings = nn.Embedding(num, dim)

    def forward(self, batch: int) -> torch.Tensor:
        """-> (B, S, D), every row of the table in order."""
        return self.special_embeddings.weight[None].expand(batch, -1, -1)


class PARTransformer(Transformer):
    """The LlamaGen GPT trained and sampled in PAR order (module docstring)."""

    def __init__(self, config: PARConfig):
        check_par_shape(config.grid_size, config.ar_token_num, config.spe_token_num)
        super().__init__(config)
        c = config
        self.ar_token_num, self.spe_token_num = c.ar_token_num, c.spe_token_num
        self.spe_tok_embeddings = SpecialTokenEmbedding(c.spe_token_num, c.dim)
        nn.init.normal_(self.spe_tok_embeddings.special_embeddings.weight, std=c.initializer_range)
        order = par_order(c.grid_size, c.ar_token_num, device=self.freqs_cis.device)
        # Replaces the raster RoPE table (same non-persistent, float32-kept buffer), now by slot.
        self.freqs_cis = par_freqs_cis(c.grid_size, c.dim // c.n_head, c.rope_base, c.ar_token_num,
                                       c.spe_token_num, order)
        self.register_buffer("order", order, persistent=False)  # (N,) raster index of PAR position k
        slots = par_token_slots(torch.arange(c.block_size, device=order.device), c.ar_token_num, c.spe_token_num)
        # (N,) the sequence slot at which raster cell p's token is fed (by the decoding steps).
        self.register_buffer("slot_of_cell", torch.empty_like(order).scatter_(0, order, slots), persistent=False)

    @property
    def seq_len(self) -> int:
        """T = 1 + N + S - 1 = N + S sequence elements in training (the last token is never fed)."""
        return self.config.block_size + self.spe_token_num

    # -- teacher forcing --------------------------------------------------------------------------

    def sequence_logits(self, idx: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Logits of every slot of `[class, tok(zp_0..zp_{n-1}), M, tok(zp_n..zp_{N-2})]`.

        idx (B, N-1) = zp[:, :-1] (PAR order), cond (B,) -> (B, T, V) float32, T = N + S. Token
        dropout acts on the whole sequence (class and M tokens included), as officially.
        """
        n = self.ar_token_num
        tok = self.tok_embeddings(idx)  # (B, N-1, D)
        h = torch.cat([self.cls_embedding(cond), tok[:, :n], self.spe_tok_embeddings(idx.shape[0]),
                       tok[:, n:]], dim=1)  # (B, T, D)
        h = self.tok_dropout(h)
        t = h.shape[1]
        pos = torch.arange(t, device=h.device)
        return self.forward_embeddings(h, self.freqs_cis[:t], mask=self.group_mask(pos, t))  # (B, T, V)

    def forward(self, idx: torch.Tensor, cond: torch.Tensor,
                targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training call: idx (B, N-1) = zp[:, :-1], cond (B,), targets (B, N) = zp.

        Returns (logits (B, N, V) with row p predicting zp_p, mean cross-entropy or None). Rows
        0..n-1 are next-token predictions; rows n..2n-1 (zp_{n-1}, M_1..M_S) predict group 1;
        row p >= 2n (input zp_{p-n}) predicts zp_p. The last S slots are dropped, as officially.
        """
        logits = self.sequence_logits(idx, cond)[:, :self.config.block_size]  # (B, N, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    # -- KV-cached generation ---------------------------------------------------------------------

    def group_mask(self, pos: torch.Tensor, k_len: int) -> torch.Tensor:
        """PAR's mask rows (G, k_len) of the elements at slots `pos` (G,)."""
        return par_mask(pos, k_len, self.ar_token_num, self.spe_token_num)

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """Default length N: decoding feeds slots 0..N-1 only (class, every token but the last
        group's, the M tokens), so the official 1 + N is not needed (the cache rounds N up to a
        multiple of 8, as the official `setup_caches` rounds its length)."""
        return super().new_cache(batch_size, max_len or self.config.block_size, dtype)

    def decode_step(self, idx: torch.Tensor, cache: KVCache, input_pos: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens idx (B, G) at slots `input_pos` (G,) -> logits (B, G, V); default mask: PAR's."""
        if mask is None:
            mask = self.group_mask(input_pos, cache.max_len)
        return super().decode_step(idx, cache, input_pos, mask)

    def decode_transition(self, last: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The first parallel step: `[tok(zp_{n-1}), M_1..M_S]` at slots n..n+S.

        last (B, 1) = zp_{n-1} -> logits (B, n, V) predicting group 1 (zp_n .. zp_{2n-1}).
        """
        n = self.ar_token_num
        h = torch.cat([self.tok_embeddings(last), self.spe_tok_embeddings(last.shape[0])], dim=1)  # (B, n, D)
        h = self.tok_dropout(h)
        pos = torch.arange(n, n + self.spe_token_num + 1, device=h.device)  # (n,)
        return self.forward_embeddings(h, self.freqs_cis[pos], mask=self.group_mask(pos, cache.max_len),
                                       cache=cache, cache_pos=pos)  # (B, n, V)


def build_par(gpt_model: str, **kwargs) -> PARTransformer:
    """A fresh PAR model of a LlamaGen size; `kwargs` are `PARConfig` fields."""
    if gpt_model not in GPT_SIZES:
        raise ValueError(f"unknown --gpt-model {gpt_model!r}; known: {', '.join(GPT_SIZES)}")
    return PARTransformer(PARConfig(**{**GPT_SIZES[gpt_model], **kwargs}))

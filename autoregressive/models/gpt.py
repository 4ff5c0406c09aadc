"""The LlamaGen class-conditional GPT (c2i), with the official state_dict key names.

A Llama-style decoder over `[class token ; image tokens in raster order]`: RMSNorm, SwiGLU, 2-D
RoPE with a zero row for the class token, causal attention, no biases. Written from
the official code (FoundationVision/LlamaGen `autoregressive/models/gpt.py`),
so the released c2i checkpoints (GPT-B .. GPT-3B) load strictly. PAR and NPP reuse this class.

Three paths, three methods (no mode inferred from `None` arguments):
- `forward(idx, cond, targets)` — teacher forcing (training; eval parity with explicit positions);
- `prefill(cond, cache)` — the class token into a fresh `KVCache`;
- `decode_step(idx, cache, input_pos)` — new tokens at given cache slots, reading the cache.
The KV cache is an explicit object from `new_cache(...)`; nothing is written to the model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from autoregressive.models.kv_cache import KVCache
from autoregressive.models.layers import (Float32RopeBuffer, RMSNorm, TransformerBlock, attention_bias, compute_dtype,
                                         precompute_freqs_cis_2d)


@dataclass
class GPTConfig:
    """Constructor arguments, with the official `ModelArgs` names and defaults."""

    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None  # None = n_head (no grouped-query attention)
    multiple_of: int = 256  # SwiGLU width rounds up to a multiple of this
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1  # on the input sequence, class token included
    attn_dropout_p: float = 0.0  # on attention probabilities
    resid_dropout_p: float = 0.1  # after `wo`
    ffn_dropout_p: float = 0.1  # after `w2`
    drop_path_rate: float = 0.0  # stochastic depth, linear in depth from 0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1  # label dropout for CFG; > 0 adds the null row `num_classes`
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256  # image tokens N = grid^2; sizes the RoPE table only

    # Official ModelArgs fields that have no effect on a c2i model.
    _UNUSED_OFFICIAL = ("caption_dim", "max_batch_size", "max_seq_len")

    @classmethod
    def from_official(cls, config: dict) -> "GPTConfig":
        """From an official `dataclasses.asdict(ModelArgs)` (e.g. a golden fixture's `config`)."""
        return cls(**official_c2i_kwargs(cls, config, "GPT", cls._UNUSED_OFFICIAL))

    @property
    def grid_size(self) -> int:
        return math.isqrt(self.block_size)


def official_c2i_kwargs(config_cls: type, config: dict, what: str, unused: tuple[str, ...] = ()) -> dict:
    """The fields of a config dataclass from an official `ModelArgs` dict: a c2i `model_type` is
    required, the `unused` keys are dropped, any other unknown key is an error."""
    config = dict(config)
    model_type = config.pop("model_type", "c2i")
    if model_type != "c2i":
        raise ValueError(f"only class-conditional (c2i) {what} models are supported, got model_type {model_type!r}")
    for k in unused:
        config.pop(k, None)
    unknown = sorted(set(config) - {f.name for f in fields(config_cls)})
    if unknown:
        raise ValueError(f"unknown {what} config keys: {unknown}")
    return config


class LabelEmbedder(nn.Module):
    """Class embedding; row `num_classes` is the null class used for CFG and label dropout."""

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def drop_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Replace each label by the null class with probability `dropout_prob` (training only).

        Draws from torch's default generator of the labels' device (the stream `nn.Dropout`
        uses, seeded per rank by the training driver), as the official `token_drop`.
        """
        drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """labels (B,) -> (B, 1, D)."""
        if self.training and self.dropout_prob > 0:
            labels = self.drop_labels(labels)
        return self.embedding_table(labels).unsqueeze(1)  # (B, 1, D)


class Transformer(Float32RopeBuffer):
    """LlamaGen c2i GPT. Logit row t predicts image token z_t (row 0 reads the class token)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        if config.cls_token_num != 1:
            raise ValueError("a c2i GPT has exactly one class token (cls_token_num = 1)")
        if config.grid_size ** 2 != config.block_size:
            raise ValueError(f"block_size {config.block_size} is not a square grid")
        self.config = config
        c = config
        self.num_classes = c.num_classes
        self.cls_token_num = c.cls_token_num
        self.cls_embedding = LabelEmbedder(c.num_classes, c.dim, c.class_dropout_prob)
        self.tok_embeddings = nn.Embedding(c.vocab_size, c.dim)
        self.tok_dropout = nn.Dropout(c.token_dropout_p)
        dpr = [c.drop_path_rate * i / max(c.n_layer - 1, 1) for i in range(c.n_layer)]
        self.layers = nn.ModuleList([
            TransformerBlock(c.dim, c.n_head, c.n_kv_head, c.multiple_of, c.ffn_dim_multiplier,
                             c.norm_eps, c.attn_dropout_p, c.resid_dropout_p, c.ffn_dropout_p, dpr[i])
            for i in range(c.n_layer)
        ])
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.output = nn.Linear(c.dim, c.vocab_size, bias=False)
        # The RoPE table: a non-persistent buffer (follows .to(device), absent from the state_dict,
        # as the official plain attribute), row t for sequence element t.
        self.register_buffer("freqs_cis", precompute_freqs_cis_2d(
            c.grid_size, c.dim // c.n_head, c.rope_base, c.cls_token_num), persistent=False)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        std = self.config.initializer_range
        # Every Linear and Embedding ~ N(0, 0.02), no biases exist; RMSNorm weights stay 1.
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
        # Zero the head so that training starts from uniform predictions (official).
        nn.init.zeros_(self.output.weight)

    # -- the shared trunk -------------------------------------------------------------------------

    def forward_embeddings(self, h: torch.Tensor, freqs_cis: torch.Tensor,
                           mask: torch.Tensor | None = None, is_causal: bool = False,
                           cache: KVCache | None = None,
                           cache_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Input embeddings h (B, T, D) -> float32 logits (B, T, V) through every block.

        The hook that subclasses (PAR's special tokens) and strategies build on; `freqs_cis`,
        `mask`, `is_causal`, `cache`, `cache_pos` as in `layers.Attention.forward`, except that
        `mask` (boolean, True = attend) is turned into one additive mask here for every layer.
        """
        if mask is not None:
            mask = attention_bias(mask, compute_dtype(h))
        for i, layer in enumerate(self.layers):
            kv = cache.layer(i) if cache is not None else None
            h = layer(h, freqs_cis, mask, is_causal, kv, cache_pos)  # (B, T, D)
        return self.output(self.norm(h)).float()  # (B, T, V)

    # -- teacher forcing --------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, cond: torch.Tensor, targets: torch.Tensor | None = None,
                input_pos: torch.Tensor | None = None, mask: torch.Tensor | None = None):
        """Teacher-forced pass over `[class ; tok(idx)]`.

        Args:
            idx: (B, N-1) the image tokens fed (= z[:, :-1]).
            cond: (B,) class labels (`num_classes` = the null class).
            targets: (B, N) the tokens to predict (= z); the loss is computed only when given.
            input_pos: (T,) RoPE rows of the T = N sequence elements; default arange(T), which is
                what the official training call uses and what its eval call must be given.
            mask: optional attention mask (T, T) (True = attend); default causal.
        Returns:
            (logits (B, N, V) float32 with row t predicting z_t, loss or None).
        """
        h = torch.cat([self.cls_embedding(cond), self.tok_embeddings(idx)], dim=1)  # (B, T, D)
        h = self.tok_dropout(h)
        t = h.shape[1]
        if input_pos is None:
            input_pos = torch.arange(t, device=h.device)
        logits = self.forward_embeddings(h, self.freqs_cis[input_pos], mask=mask, is_causal=mask is None)
        logits = logits[:, self.cls_token_num - 1:]  # (B, N, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss

    # -- KV-cached generation ---------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        """A zeroed KV cache for `batch_size` rows and `max_len` slots (default: the whole
        sequence, cls_token_num + block_size), on the weights' device and in their dtype."""
        c = self.config
        w = self.tok_embeddings.weight
        return KVCache(c.n_layer, batch_size, c.n_kv_head or c.n_head,
                       max_len or self.cls_token_num + c.block_size, c.dim // c.n_head,
                       dtype=dtype or w.dtype, device=w.device)

    def prefill(self, cond: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Class token(s) at slots 0..cls_token_num-1: cond (B,) -> logits (B, 1, V) for z_0."""
        h = self.tok_dropout(self.cls_embedding(cond))  # (B, 1, D)
        pos = torch.arange(h.shape[1], device=h.device)
        logits = self.forward_embeddings(h, self.freqs_cis[pos], mask=cache.causal_mask(pos),
                                         cache=cache, cache_pos=pos)
        return logits[:, -1:]  # (B, 1, V)

    def decode_step(self, idx: torch.Tensor, cache: KVCache, input_pos: torch.Tensor,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
        """Feed tokens idx (B, G) at cache slots / RoPE rows `input_pos` (G,) -> logits (B, G, V).

        `mask` (G, L) or (B, 1, G, L), True = attend, defaults to the causal rows of `input_pos`
        (slot s visible to the element at slot p iff s <= p). Raster feeds z_t at slot t + 1 and
        reads the prediction of z_{t+1}; a group strategy passes its own block mask.
        """
        h = self.tok_dropout(self.tok_embeddings(idx))  # (B, G, D)
        if mask is None:
            mask = cache.causal_mask(input_pos)
        return self.forward_embeddings(h, self.freqs_cis[input_pos], mask=mask, cache=cache,
                                       cache_pos=input_pos)  # (B, G, V)


# ---------------------------------------------------------------------------------------------
# Sizes (LlamaGen's `GPT_models`; `GPT-debug` is ours, for the tests and the CPU demo)
# ---------------------------------------------------------------------------------------------

GPT_SIZES: dict[str, dict] = {
    "GPT-B": dict(n_layer=12, n_head=12, dim=768),  # 110,888,448 params at V=16384, 1000 classes
    "GPT-L": dict(n_layer=24, n_head=16, dim=1024),  # 342,910,976
    "GPT-XL": dict(n_layer=36, n_head=20, dim=1280),  # 774,699,520
    "GPT-XXL": dict(n_layer=48, n_head=24, dim=1536),  # 1,410,972,672
    "GPT-XXXL": dict(n_layer=48, n_head=40, dim=2560),  # 3,893,027,840
    "GPT-1B": dict(n_layer=22, n_head=32, dim=2048),  # 1,199,616,000
    "GPT-3B": dict(n_layer=24, n_head=32, dim=3200),  # 3,096,659,200 (head_dim 100)
    "GPT-7B": dict(n_layer=32, n_head=32, dim=4096),  # 6,614,589,440
    "GPT-debug": dict(n_layer=4, n_head=4, dim=128, multiple_of=64),
}


def build_gpt(gpt_model: str, **kwargs) -> Transformer:
    """A fresh GPT of a named size; `kwargs` are `GPTConfig` fields (vocab_size, block_size, ...)."""
    if gpt_model not in GPT_SIZES:
        raise ValueError(f"unknown --gpt-model {gpt_model!r}; known: {', '.join(GPT_SIZES)}")
    return Transformer(GPTConfig(**{**GPT_SIZES[gpt_model], **kwargs}))


def config_dict(model: Transformer) -> dict:
    """The constructor arguments as a plain dict (stored in our checkpoints)."""
    return asdict(model.config)

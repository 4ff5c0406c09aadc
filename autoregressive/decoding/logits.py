"""Logits processing, written once for every strategy: CFG, temperature, top-k, top-p, sampling.

Follows the official code (FoundationVision/LlamaGen
`autoregressive/models/generate.py:sample`, `top_k_top_p_filtering`), in this order:
1. classifier-free guidance on the raw logits, `uncond + (cond - uncond) * scale`, only when
   scale > 1 (both halves come from one forward over the batch `[cond ; null]`);
2. temperature: divide by max(temperature, 1e-5);
3. top-k: every logit below the k-th largest becomes -inf (ties with the k-th value survive);
4. top-p: sort descending, cumulative softmax, drop entries whose cumulative probability
   exceeds p, shifted right by one so that the most likely entry always stays;
5. softmax, then one draw per row from an explicit `torch.Generator` (greedy = argmax).
Every function takes logits (..., V) and treats all leading dimensions as independent rows, so a
group of G tokens per step (PAR, ARPG, LPD) is processed like G separate tokens, row-major.
"""
from __future__ import annotations

from typing import Protocol, Union

import torch
import torch.nn.functional as F


class RowSampler(Protocol):
    """A per-row random source (e.g. `autoregressive/decoding/row_rng.py:RowRNG`): one draw per row
    of probs (R, V) -> (R, 1) int64, so that an image does not depend on its batch-mates."""

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor: ...


Generator = Union[torch.Generator, RowSampler]


# ---------------------------------------------------------------------------------------------
# Classifier-free guidance
# ---------------------------------------------------------------------------------------------


def check_cfg_scale(cfg_scale: float) -> None:
    """Refuse a scale below 1. The official code silently samples without guidance for any
    scale <= 1; 1.0 is how guidance is switched off here, and anything below is an error."""
    if cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1.0 (1.0 = no guidance), got {cfg_scale}")


def cfg_enabled(cfg_scale: float) -> bool:
    """Whether the unconditional half runs at all: only for cfg_scale > 1.0 (official)."""
    return cfg_scale > 1.0


def cfg_labels(labels: torch.Tensor, num_classes: int, cfg_scale: float) -> torch.Tensor:
    """The batch one forward runs: `[labels ; null x B]` (2B,) with CFG, else labels (B,).

    The null class is the last embedding row, index `num_classes`.
    """
    if not cfg_enabled(cfg_scale):
        return labels
    return torch.cat([labels, torch.full_like(labels, num_classes)])  # (2B,)


def cfg_guided(step: int, cfg_interval: float) -> bool:
    """Whether step `step` is guided: step 0 is the prefill, step s the s-th decode step.

    Official rule (LlamaGen `generate`): decode step i = s - 1 turns guidance off for good once
    `cfg_interval > -1 and i > cfg_interval`; the prefill is always guided. With cfg_interval = c
    the first c + 2 steps are guided; -1 guides every step.
    """
    return not (cfg_interval > -1 and step - 1 > cfg_interval)


def combine_cfg(logits: torch.Tensor, cfg_scale: float, guided: bool = True,
                scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Logits of the batch `[cond ; uncond]` (2B, ..., V) -> (B, ..., V).

    Guided: `uncond + (cond - uncond) * s` with s = `scale` when given (a float, or a tensor of
    per-row / per-token scales broadcastable to the logits without their last dimension, e.g.
    (B | 1, G) for a group of G tokens), else `cfg_scale`; unguided (outside the cfg interval):
    the conditional half alone. Without CFG (cfg_scale <= 1) the batch is returned unchanged.
    """
    if not cfg_enabled(cfg_scale):
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    if not guided:
        return cond
    s = cfg_scale if scale is None else scale
    if isinstance(s, torch.Tensor):
        s = s.to(logits.dtype).unsqueeze(-1)  # one scale per row of the vocabulary axis
    return uncond + (cond - uncond) * s


# ---------------------------------------------------------------------------------------------
# Filtering and sampling
# ---------------------------------------------------------------------------------------------


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set the logits (..., V) that top-k (k > 0) or top-p (p < 1) removes to -inf (out of place)."""
    logits = logits.clone()
    if top_k > 0:
        k = min(max(top_k, 1), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
        logits.masked_fill_(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, sorted_idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (..., V)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()  # shift right: keep the first entry over p
        remove[..., 0] = False
        logits.masked_fill_(remove.scatter(-1, sorted_idx, remove), float("-inf"))
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                    top_p: float = 1.0) -> torch.Tensor:
    """(..., V) -> probabilities (..., V): temperature, then top-k / top-p, then softmax."""
    logits = logits.float() / max(temperature, 1e-5)
    if top_k > 0 or top_p < 1.0:
        logits = top_k_top_p_filter(logits, top_k, top_p)
    return F.softmax(logits, dim=-1)


def sample_from_logits(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0,
                       top_p: float = 1.0, generator: Generator | None = None,
                       greedy: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits (..., V).

    Returns (idx (...) int64, probs (..., V)). `greedy=True` or temperature 0 takes the argmax of
    the filtered distribution and draws nothing (probs are still those of 1e-5 temperature, as
    the official code computes them); otherwise one draw per row, rows in row-major order of the
    leading dimensions: `torch.multinomial` with a `torch.Generator`, or
    `generator.multinomial(probs (R, V))` for a `RowSampler` (one stream per row). Sampling needs
    an explicit generator: no draw ever comes from the global RNG.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    probs = logits_to_probs(logits, temperature, top_k, top_p)
    flat = probs.reshape(-1, probs.shape[-1])  # (R, V)
    if greedy or temperature == 0:
        idx = flat.argmax(dim=-1)
    elif generator is None:
        raise ValueError("sampling (temperature > 0) needs an explicit generator "
                         "(a torch.Generator or a per-row sampler); temperature 0 is greedy")
    elif isinstance(generator, torch.Generator):
        idx = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    else:
        idx = generator.multinomial(flat).squeeze(-1)
    return idx.reshape(probs.shape[:-1]), probs

"""The group decoding loop shared by every strategy that generates a permutation of the grid in groups.

Raster, PAR, ARPG and LPD all generate the N tokens of the grid in an order, a group at a time:
group g is predicted from the class and every token of groups < g. A schedule is data,
`(order, group_sizes)` (README, "Order and groups are data"); what differs between the
methods is only how one step turns "the tokens just sampled" plus "the positions to predict next"
into logits, which the strategy passes in as `step`. This loop owns the rest: CFG batching and
guidance (with a per-token scale for the schedules that ramp it), temperature / top-k / top-p,
seeded draws, and writing the sampled tokens back into raster layout.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

from autoregressive.decoding.logits import Generator, cfg_enabled, combine_cfg, sample_from_logits

#: step(g, prev_tokens, prev_positions, next_positions) -> logits (B', G_g, V), valid until the next
#: call (a step replayed from a CUDA graph, `fast_decode.py`, writes every step into one buffer).
#: prev_tokens (B', G_{g-1}) are the tokens sampled at step g - 1 (None at g = 0), already repeated
#: for both CFG halves; positions are raster indices, (G,) when the batch shares one order, else (B', G).
StepFn = Callable[[int, Union[torch.Tensor, None], Union[torch.Tensor, None], torch.Tensor], torch.Tensor]
#: cfg_scale_at(g, next_positions, order_index) -> a float, or a tensor broadcastable to (B, G_g)
#: of per-token scales; order_index (G,) are the indices in the order of the group's tokens.
CfgScaleFn = Callable[[int, torch.Tensor, torch.Tensor], Union[float, torch.Tensor, None]]


def check_schedule(order: torch.Tensor, group_sizes: Sequence[int], num_tokens: int) -> None:
    """The order lists distinct grid positions in [0, N) (per row when 2-D): all N of them when
    generating a whole image, only the unknown ones when editing; the groups must cover it."""
    m = order.shape[-1]
    if m > num_tokens or m == 0:
        raise ValueError(f"the order has {m} entries but the grid has {num_tokens} tokens")
    srt = order.sort(dim=-1).values
    if int(order.min()) < 0 or int(order.max()) >= num_tokens or bool((srt[..., 1:] == srt[..., :-1]).any()):
        raise ValueError(f"the order must list distinct grid positions in [0, {num_tokens})")
    if any(int(g) <= 0 for g in group_sizes):
        raise ValueError(f"group sizes must be positive, got {list(group_sizes)}")
    if sum(int(g) for g in group_sizes) != m:
        raise ValueError(f"group sizes sum to {sum(int(g) for g in group_sizes)}, "
                         f"but the order has {m} tokens")


@torch.no_grad()
def decode_in_groups(step: StepFn, order: torch.Tensor, group_sizes: Sequence[int], batch_size: int, *,
                     cfg_scale: float = 1.0, cfg_scale_at: CfgScaleFn | None = None,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                     generator: Generator | None = None, record_logits: list | None = None,
                     num_tokens: int | None = None) -> torch.Tensor:
    """Run a schedule and return (B, N) int64 token ids in raster layout.

    Args:
        step: the strategy's model call for one group (see `StepFn`).
        order: (N,) shared by the batch, or (B, N) one order per image; raster indices.
        group_sizes: tokens per step, summing to N.
        batch_size: B, the number of images (the step sees 2B rows with CFG).
        cfg_scale: the guidance scale (1 = no unconditional half); `cfg_scale_at` may override it
            per step or per token (None from it = this step unguided).
        num_tokens: the grid size N when the order covers only part of it (editing: the strategy's
            step feeds the known tokens as context at g = 0); those positions stay -1 here.
        record_logits: if a list, receives per step the (B, G, V) logits after CFG.
    """
    n = order.shape[-1] if num_tokens is None else num_tokens
    check_schedule(order, group_sizes, n)
    reps = 2 if cfg_enabled(cfg_scale) else 1
    device = order.device
    tokens = torch.full((batch_size, n), -1, dtype=torch.long, device=device)
    prev_tokens = prev_pos = None
    start = 0
    for g, size in enumerate(int(s) for s in group_sizes):
        idx = torch.arange(start, start + size, device=device)
        pos = order[..., start:start + size]  # (G,) or (B, G)
        step_pos = pos if pos.dim() == 1 else pos.repeat(reps, 1)
        logits = step(g, prev_tokens, prev_pos, step_pos)  # (B', G, V)
        scale = cfg_scale if cfg_scale_at is None else cfg_scale_at(g, pos, idx)
        # scale None: guidance switched off for this step (the conditional half alone)
        guided = combine_cfg(logits, cfg_scale, guided=scale is not None, scale=scale)  # (B, G, V)
        if record_logits is not None:  # a copy: a replayed CUDA graph reuses its output buffer
            record_logits.append(guided.clone())
        sampled, _ = sample_from_logits(guided, temperature, top_k, top_p, generator)  # (B, G)
        pos_b = pos.expand(batch_size, size) if pos.dim() == 1 else pos
        tokens.scatter_(1, pos_b, sampled)
        prev_tokens, prev_pos = sampled.repeat(reps, 1), step_pos
        start += size
    return tokens

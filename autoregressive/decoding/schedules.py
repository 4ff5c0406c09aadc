"""Step schedules: how many tokens each of S parallel decoding steps generates, for N tokens.

A schedule is data (README, "Order and groups are data"): `group_sizes(name, N, S)` returns S
positive ints summing to N, which `group_decode.decode_in_groups` runs with any order. Pure
functions, no torch, so that every parallel strategy (ARPG, LPD, ...) can share and extend them;
`decoding/orders.py` picks between these formulas, LPD's official table (`decoding/lpd_order.py`) and
an explicit list.

`arccos` and `cosine` are ARPG's (official: hp-l33/ARPG `models/arpg.py`,
`Transformer.generate`), the MaskGIT-style "fraction still masked after step s" curves, with the
official float64 arithmetic, truncation and clamps kept so that the group sizes are identical.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np

# mask ratio r(s, S): the fraction of the N tokens still unknown after step s (0-based), in float64,
# each evaluated in the official operation order (the truncation of N * r depends on the last bit).
MASK_RATIOS: dict[str, Callable[[int, int], float]] = {
    "arccos": lambda s, steps: float(np.arccos(1.0 * (s + 1) / steps) / (math.pi * 0.5)),
    "cosine": lambda s, steps: float(np.cos(math.pi / 2.0 * (s + 1) / steps)),
}


def schedule_names() -> list[str]:
    return list(MASK_RATIOS)


def check_steps(num_tokens: int, steps: int) -> None:
    """1 <= steps <= N: more steps than tokens would leave a step with nothing to generate (the
    official sampler crashes on it)."""
    if steps < 1:
        raise ValueError(f"the number of decoding steps must be >= 1, got {steps}")
    if steps > num_tokens:
        raise ValueError(f"--step {steps} is larger than the number of tokens to generate ({num_tokens}): "
                         f"every step must generate at least one token")


def check_group_sizes(group_sizes: Sequence[int], num_tokens: int, what: str = "group sizes") -> list[int]:
    """Positive integers summing to `num_tokens`; returns them as a list of ints."""
    sizes = [int(g) for g in group_sizes]
    if not sizes or any(g <= 0 for g in sizes) or any(g != s for g, s in zip(sizes, group_sizes)):
        raise ValueError(f"{what} must be positive integers, got {list(group_sizes)}")
    if sum(sizes) != num_tokens:
        raise ValueError(f"{what} sum to {sum(sizes)}, but the grid has {num_tokens} tokens")
    return sizes


def group_sizes(name: str, num_tokens: int, steps: int) -> list[int]:
    """Tokens per step for N = `num_tokens` tokens in S = `steps` steps under schedule `name`.

    Step s keeps `mask_len = max(1, min(N - known - 1, int(N * r(s, S))))` tokens unknown and
    generates the rest of what is unknown; the last step generates everything left.
    """
    if name not in MASK_RATIOS:
        raise ValueError(f"unknown step schedule {name!r}; known: {', '.join(MASK_RATIOS)}")
    check_steps(num_tokens, steps)
    ratio = MASK_RATIOS[name]
    sizes: list[int] = []
    known = 0
    for s in range(steps):
        mask_len = max(1, min(num_tokens - known - 1, int(num_tokens * ratio(s, steps))))
        size = num_tokens - known if s == steps - 1 else num_tokens - known - mask_len
        if size < 1:
            raise ValueError(f"schedule {name!r} leaves step {s} of {steps} empty for {num_tokens} tokens")
        sizes.append(size)
        known += size
    return sizes


def known_before(sizes: list[int]) -> list[int]:
    """Tokens already fixed before each step (exclusive cumulative sum)."""
    out, known = [], 0
    for g in sizes:
        out.append(known)
        known += g
    return out

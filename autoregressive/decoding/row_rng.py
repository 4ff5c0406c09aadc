"""Per-image random streams for sampling: images independent of batch composition and ranks.

A `torch.Generator` draws for a whole batch, so an image depends on which others share its batch.
`RowRNG` instead gives each row its own counter-based stream (splitmix64 of the row's seed and a
draw counter), computed on the device with integer ops: no host synchronisation, CUDA-graph safe.
"""
from __future__ import annotations

import torch

from utils.splitmix import GOLDEN_GAMMA, splitmix64, uniform53, wrap64 as _wrap64


def image_seeds(global_seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A 62-bit seed per image index (splitmix64 of global_seed and the index), as int64."""
    x = (indices.to(torch.int64) + (int(global_seed) * 0x9E3779B97F4A7C15 & 0x3FFFFFFFFFFFFFFF))
    return splitmix64(x) & 0x3FFFFFFFFFFFFFFF


class RowRNG:
    """One independent uniform stream per row, keyed by a 62-bit int64 seed per row."""

    def __init__(self, seeds: torch.Tensor):
        self.seeds = seeds.to(torch.int64)
        self.counter = 0

    def uniform(self, shape_tail: tuple[int, ...] = ()) -> torch.Tensor:
        """(B, *shape_tail) float64 uniforms in [0, 1); each call advances every row's stream."""
        n = 1
        for s in shape_tail:
            n *= s
        lanes = torch.arange(n, device=self.seeds.device, dtype=torch.int64)
        key = splitmix64(self.seeds[:, None] + _wrap64(self.counter * 0x2545F4914F6CDD1D))  # (B, 1)
        bits = splitmix64(key + lanes[None, :] * GOLDEN_GAMMA)  # (B, n)
        self.counter += 1
        u = uniform53(bits)
        return u.reshape(self.seeds.shape[0], *shape_tail)

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:
        """One draw per row from `probs` (B * G, V) by inverse CDF -> (B * G, 1) int64.

        G draws per image (a group decoding step), rows batch-major as `sample_from_logits`
        flattens (B, G, V); image b's draws come from its own stream, lanes 0..G-1 (G = 1 is
        the single-token case, lane 0).
        """
        cdf = probs.to(torch.float64).cumsum(-1)
        per_image, rest = divmod(probs.shape[0], self.seeds.shape[0])
        if rest or not per_image:
            raise ValueError(f"{probs.shape[0]} rows of probabilities for {self.seeds.shape[0]} image streams")
        u = self.uniform((per_image,)).reshape(-1) * cdf[:, -1]
        idx = torch.searchsorted(cdf, u[:, None], right=True)
        return idx.clamp_(max=probs.shape[-1] - 1)

    def select(self, rows: torch.Tensor) -> "RowRNG":
        """A view on a subset of rows sharing the counter position (for per-row bookkeeping)."""
        out = RowRNG(self.seeds[rows])
        out.counter = self.counter
        return out

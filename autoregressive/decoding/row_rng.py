"""Per-image random streams for sampling: images independent of batch composition and ranks.

A `torch.Generator` draws for a whole batch, so an image depends on which others share its batch.
`RowRNG` instead gives each row its own counter-based stream (splitmix64 of the row's seed and a
draw counter), computed on the device with integer ops: no host synchronisation, CUDA-graph safe.
"""
from __future__ import annotations

import torch


def image_seeds(global_seed: int, indices: torch.Tensor) -> torch.Tensor:
    """A 62-bit seed per image index (splitmix64 of global_seed and the index), as int64."""
    x = (indices.to(torch.int64) + (int(global_seed) * 0x9E3779B97F4A7C15 & 0x3FFFFFFFFFFFFFFF))
    return splitmix64(x) & 0x3FFFFFFFFFFFFFFF


_M1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64
_M2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB as a signed int64


def _srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic), on any device."""
    x = x + (-0x61C8864680B583EB)  # 0x9E3779B97F4A7C15
    x = (x ^ _srl(x, 30)) * _M1
    x = (x ^ _srl(x, 27)) * _M2
    return x ^ _srl(x, 31)


def _wrap64(x: int) -> int:
    """A Python int reduced to the signed int64 range (two's-complement wrap-around)."""
    x &= 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= (1 << 63) else x


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
        bits = splitmix64(key + lanes[None, :] * (-0x61C8864680B583EB))  # (B, n)
        self.counter += 1
        u = _srl(bits, 11).to(torch.float64) * (1.0 / (1 << 53))
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

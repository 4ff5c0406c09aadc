"""splitmix64 on int64 tensors: counter-based random bits, the same on any device and in any process.

Used where a draw must be a pure function of a key (an image index, a training item) rather than of
how many draws came before: per-image sampling streams and per-item view choices.
"""
from __future__ import annotations

import numpy as np
import torch

_M1 = -0x40A7B892E31B1A47  # 0xBF58476D1CE4E5B9 as a signed int64
_M2 = -0x6B2FB644ECCEEE15  # 0x94D049BB133111EB as a signed int64
GOLDEN_GAMMA = -0x61C8864680B583EB  # 0x9E3779B97F4A7C15 as a signed int64
MASK64 = 0xFFFFFFFFFFFFFFFF


def wrap64(x: int) -> int:
    """A Python int reduced to the signed int64 range (two's-complement wrap-around)."""
    x &= 0xFFFFFFFFFFFFFFFF
    return x - (1 << 64) if x >= (1 << 63) else x


def srl(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift on int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finaliser on int64 tensors (wrapping arithmetic), on any device."""
    x = x + GOLDEN_GAMMA
    x = (x ^ srl(x, 30)) * _M1
    x = (x ^ srl(x, 27)) * _M2
    return x ^ srl(x, 31)


def uniform53(bits: torch.Tensor) -> torch.Tensor:
    """int64 random bits -> float64 uniforms in [0, 1) from their top 53 bits."""
    return srl(bits, 11).to(torch.float64) * (1.0 / (1 << 53))


def splitmix64_np(x: np.ndarray) -> np.ndarray:
    """`splitmix64` on uint64 numpy arrays (unsigned arithmetic wraps), for host-side draws."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))

"""The strategy registry: `--strategy` name -> Strategy.

A new strategy is one file plus one line here; the drivers use `strategy_names()` as their
argparse `choices=` and `get_strategy(args.strategy)` to obtain it.
"""
from __future__ import annotations

from autoregressive.strategies.base import Strategy, TrainingBatch
from autoregressive.strategies.raster import RasterStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "raster": RasterStrategy,
}


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def get_strategy(name: str) -> Strategy:
    """The strategy registered under `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "Strategy", "TrainingBatch", "get_strategy", "strategy_names"]

"""The strategy registry: `--strategy` name -> Strategy.

A new strategy is one file plus one line here; the drivers use `strategy_names()` as their
argparse `choices=` and `get_strategy(args.strategy)` to obtain it.
"""
from __future__ import annotations

import argparse

from autoregressive.strategies.arpg import ArpgStrategy
from autoregressive.strategies.base import Strategy, TrainingBatch
from autoregressive.strategies.lpd import LpdStrategy
from autoregressive.strategies.npp import NppStrategy
from autoregressive.strategies.par import ParStrategy
from autoregressive.strategies.raster import RasterStrategy
from autoregressive.strategies.var import VarStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "raster": RasterStrategy,
    "npp": NppStrategy,
    "par": ParStrategy,
    "arpg": ArpgStrategy,
    "lpd": LpdStrategy,
    "var": VarStrategy,
}


def strategy_names() -> list[str]:
    return list(STRATEGIES)


def model_size_names() -> list[str]:
    """Every `--gpt-model` any registered strategy builds (each strategy checks its own)."""
    names: dict[str, None] = {}
    for cls in STRATEGIES.values():
        names.update(dict.fromkeys(cls.model_sizes))
    return list(names)


def add_strategy_arguments(parser: argparse.ArgumentParser) -> None:
    """Every registered strategy's own flags, one argument group per strategy."""
    for name, cls in STRATEGIES.items():
        cls.add_arguments(parser.add_argument_group(f"--strategy {name}"))


def get_strategy(name: str) -> Strategy:
    """The strategy registered under `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "Strategy", "TrainingBatch", "add_strategy_arguments", "get_strategy",
           "model_size_names", "strategy_names"]

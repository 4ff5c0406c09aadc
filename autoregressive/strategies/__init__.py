"""The strategy registry: `--strategy` name -> Strategy.

A new strategy is one file plus one line here; the drivers use `strategy_names()` as their
argparse `choices=` and `get_strategy(args.strategy)` to obtain it.
"""
from __future__ import annotations

import argparse
import sys

from autoregressive.strategies.arpg import ArpgStrategy
from autoregressive.strategies.base import Generation, Strategy, TrainingBatch
from autoregressive.strategies.lpd import LpdStrategy
from autoregressive.strategies.npp import NppStrategy
from autoregressive.strategies.par import ParStrategy
from autoregressive.strategies.raster import RasterStrategy
from autoregressive.strategies.var import VarStrategy
from utils.run import given_flags

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
    """Every registered strategy's own flags, one argument group per strategy (the drivers'
    `--help` lists them by strategy); `check_strategy_flags` refuses those of another strategy."""
    for name, cls in STRATEGIES.items():
        cls.add_arguments(parser.add_argument_group(f"--strategy {name}"))


def flag_owners() -> dict[str, tuple[str, str]]:
    """Argparse dest -> (owning strategy, the flag as typed) for every strategy's own flags."""
    owners = {}
    for name, cls in STRATEGIES.items():
        probe = argparse.ArgumentParser(add_help=False)
        cls.add_arguments(probe.add_argument_group(name))
        for action in probe._actions:
            owners[action.dest] = (name, action.option_strings[0])
    return owners


def check_strategy_flags(strategy: str, given: set[str]) -> None:
    """Refuse a flag given for another strategy than `strategy` (it would be silently ignored):
    ValueError naming the flag and its owner, e.g. `--ls is a flag of --strategy var`."""
    foreign = sorted((flag, owner) for dest, (owner, flag) in flag_owners().items()
                     if dest in given and owner != strategy)
    if foreign:
        listed = "; ".join(f"{flag} is a flag of --strategy {owner}" for flag, owner in foreign)
        raise ValueError(f"{listed}, not of --strategy {strategy}: drop it or choose that strategy")


def parse_driver_args(parser: argparse.ArgumentParser, argv: list[str] | None = None
                      ) -> tuple[argparse.Namespace, set[str]]:
    """Parse a driver's command line; returns the flags and the set of those given. A flag of
    another strategy than `--strategy` exits with status 2 and one `error:` line (argparse's)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    try:
        check_strategy_flags(args.strategy, given)
    except ValueError as e:
        parser.error(str(e))
    return args, given


def get_strategy(name: str) -> Strategy:
    """The strategy registered under `name`; an unknown name raises a ValueError listing the known ones."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


__all__ = ["STRATEGIES", "Generation", "Strategy", "TrainingBatch", "add_strategy_arguments", "check_strategy_flags",
           "flag_owners", "get_strategy", "model_size_names", "parse_driver_args", "strategy_names"]

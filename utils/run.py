"""Run folders and resuming, written once for both trainers (tokenizer and GPT).

- `given_flags`: which flags the user actually said (on the command line, or for an in-process
  call every value that differs from the parser's default).
- `take_from_checkpoint`: the one rule for the architecture of a resumed run. The checkpoint's
  recorded value wins; a flag the user gave with another value is an error naming both values.
- `run_folder`: a new `<results>/<NNN>-<name>` made by rank 0 and announced to every rank, or the
  folder of the run being resumed.
"""
from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from utils.training import new_run_dir


class ResumeConflict(ValueError):
    """A flag given on the command line contradicts the checkpoint being resumed."""


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None = None,
                args: argparse.Namespace | None = None) -> set[str]:
    """The argparse destinations the user gave.

    With `argv`: the flags that appear in it (a flag given at its default value counts as given).
    Without (a driver's `main` called in-process with a Namespace): every destination of `args`
    whose value differs from the parser's default.
    """
    if argv is not None:
        probe = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                kwargs: dict[str, Any] = {"dest": action.dest, "default": argparse.SUPPRESS}
                if action.nargs == 0:
                    kwargs.update(action="store_const", const=action.const)
                elif action.nargs is not None:
                    kwargs["nargs"] = action.nargs
                probe.add_argument(*action.option_strings, **kwargs)
        return set(vars(probe.parse_known_args(argv)[0]))
    if args is None:
        raise ValueError("given_flags needs argv or args")
    return {a.dest for a in parser._actions
            if a.option_strings and hasattr(args, a.dest) and getattr(args, a.dest) != a.default}


def flag_name(dest: str) -> str:
    """`code_path` -> `--code-path`."""
    return "--" + dest.replace("_", "-")


def take_from_checkpoint(args: argparse.Namespace, saved: Mapping[str, Any], flags: Iterable[str],
                         given: set[str], what: str) -> dict[str, Any]:
    """Set each of `flags` that the checkpoint records (`saved`) from it.

    A flag in `given` whose value differs from the recorded one raises `ResumeConflict` naming both
    values; a flag not given silently takes the recorded value. Returns the values taken (those
    that changed `args`), for the log.
    """
    taken = {}
    for key in flags:
        if key not in saved:
            continue
        value, recorded = getattr(args, key, None), saved[key]
        if value == recorded:
            continue
        if key in given:
            raise ResumeConflict(f"{flag_name(key)} {value!r} contradicts {what}, which was trained with "
                                 f"{flag_name(key)} {recorded!r}: drop the flag or pass {recorded!r}")
        setattr(args, key, recorded)
        taken[key] = recorded
    return taken


def run_folder(results_dir: str | Path, name: str, rank: int, world: int) -> Path:
    """A new `<results_dir>/<NNN>-<name>`, created by rank 0 and broadcast to the other ranks."""
    run_dir = new_run_dir(results_dir, name) if rank == 0 else None
    if world > 1:
        import torch.distributed as dist

        box = [str(run_dir) if run_dir is not None else None]
        dist.broadcast_object_list(box, src=0)
        run_dir = Path(box[0])
    return Path(run_dir)

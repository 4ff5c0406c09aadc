"""Run folders and resuming, written once for both trainers (tokenizer and GPT).

- `given_flags`: which flags the user actually said (on the command line, or for an in-process
  call every value that differs from the parser's default).
- `take_from_checkpoint`: the one rule for the architecture of a resumed run. The checkpoint's
  recorded value wins; a flag the user gave with another value is an error naming both values.
- `run_folder`: a new `<results>/<NNN>-<name>` made by rank 0 and announced to every rank.
- `resume_point`: the checkpoint `--resume RUN` continues from (the newest readable one).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from utils.checkpoint import CheckpointError, load_checkpoint
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


@dataclass
class ResumePoint:
    """Where `--resume RUN` continues: the newest readable checkpoint (None: the run stopped before
    its first one) and what was passed over on the way, for the log."""

    path: Path | None
    ckpt: dict | None
    warnings: list[str]


def resume_point(run_dir: str | Path, kind_of_run: Callable[[dict], str | None], what: str) -> ResumePoint:
    """The checkpoint `--resume run_dir` continues from, the same rule in both trainers.

    A folder that does not exist, or holds neither checkpoints nor a run log, is an error (a typo
    must not start a fresh run). A newest checkpoint that cannot be read (truncated, corrupt) is
    passed over with a warning for the next older one. `kind_of_run(ckpt)` returns None for a
    checkpoint of this trainer, else what it is instead (an error: another kind of run).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ValueError(f"--resume {run_dir}: no such folder; pass the run folder a previous run made "
                         f"(e.g. results/000-...), or drop --resume to start a new run")
    ckpts = sorted((run_dir / "checkpoints").glob("[0-9]" * 7 + ".pt"))
    if not ckpts:
        if not (run_dir / "log.txt").is_file():
            raise ValueError(f"--resume {run_dir}: not a {what} run folder (no checkpoints/, no log.txt)")
        return ResumePoint(None, None, [f"--resume {run_dir}: no checkpoint yet, starting from step 0"])
    warnings = []
    for path in reversed(ckpts):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            warnings.append(f"passing over the unreadable checkpoint {path} ({e})")
            continue
        other = kind_of_run(ckpt) if isinstance(ckpt, dict) else "not a checkpoint dict"
        if other is not None:
            raise ValueError(f"--resume {run_dir}: {path.name} is {other}, not a {what} checkpoint")
        if warnings:
            warnings.append(f"resuming from the newest readable checkpoint {path} instead")
        return ResumePoint(path, ckpt, warnings)
    raise CheckpointError(f"--resume {run_dir}: none of its {len(ckpts)} checkpoints can be read: "
                          + "; ".join(warnings))

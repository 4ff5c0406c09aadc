"""Rank-aware logging: the main rank logs to the console and a file, the others stay quiet.

Quiet ranks get a logger with a `NullHandler` (DiT's `create_logger`), never a patched `print`.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def create_logger(name: str, log_dir: str | Path | None = None, rank: int = 0) -> logging.Logger:
    """A logger that writes to stderr and `<log_dir>/log.txt` on rank 0, and nothing elsewhere."""
    logger = logging.getLogger(f"{name}.rank{rank}")
    logger.handlers.clear()
    logger.propagate = False
    if rank == 0:
        logger.setLevel(logging.INFO)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(Path(log_dir) / "log.txt"))
        for h in handlers:
            h.setFormatter(fmt)
            logger.addHandler(h)
    else:
        logger.addHandler(logging.NullHandler())
    return logger


def progress(iterable=None, *, enabled: bool = True, **kwargs):
    """A tqdm progress bar on the main rank (to stderr), the bare iterable elsewhere."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=not enabled, dynamic_ncols=True, **kwargs)

"""Write LPD locality-aware generation orders (JSON) for sampling: seeded, one order per image.

    python -m autoregressive.sample.lpd_orders --grid 16 --steps 20 --num-orders 50000 --out orders/res256_steps20.json
    bash scripts/autoregressive/lpd_orders.sh --grid 32 --steps 48 --num-orders 50000 --out orders/res512_steps48.json

Sample with them through `--strategy lpd --order FILE --steps N`. The generator itself is
`autoregressive/decoding/lpd_order.py`; this file only parses flags and writes the file.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Sequence

from autoregressive.decoding.lpd_order import OFFICIAL_REPULSION, generate_orders
from autoregressive.decoding.orders import STEP_SCHEDULES, parse_group_sizes, resolve_group_sizes, save_orders
from autoregressive.decoding.schedules import check_group_sizes
from utils.cli import run_cli


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m autoregressive.sample.lpd_orders --grid 16 --steps 20 --num-orders 50000 --out F`."""
    p = argparse.ArgumentParser(description="Write LPD locality-aware generation orders (JSON) for sampling.")
    p.add_argument("--grid", type=int, default=16, help="tokens per side (16 = 256 px, 32 = 512 px with VQ-16)")
    p.add_argument("--steps", type=int, default=None, help="decoding steps (group sizes from --sample-schedule)")
    p.add_argument("--group-sizes", type=str, default=None, help="JSON list of group sizes instead of --steps")
    p.add_argument("--sample-schedule", "--group-schedule", dest="sample_schedule", type=str, default="lpd",
                   choices=list(STEP_SCHEDULES), help="group sizes for --steps: lpd = the official table (default)")
    p.add_argument("--proximity-threshold", type=float, default=1.0, help="official default 1.0")
    p.add_argument("--repulsion-threshold", type=float, default=None,
                   help="default: the official setting for the grid / steps (2.0 at 16/20 and 16/32, 4.0 at 32/48), else 1.0")
    p.add_argument("--num-orders", type=int, default=50000, help="one order per image")
    p.add_argument("--seed", type=int, default=0, help="order i comes from SeedSequence([seed, i])")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--out", type=str, required=True, help="output .json")
    a = p.parse_args(argv)
    for flag in ("grid", "num_orders", "workers"):
        if getattr(a, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    n = a.grid * a.grid
    if a.group_sizes is not None:
        sizes = check_group_sizes(parse_group_sizes(a.group_sizes), n, what="--group-sizes")
    elif a.steps is None:
        raise ValueError("pass --steps N (group sizes from --sample-schedule) or --group-sizes JSON")
    else:
        sizes = resolve_group_sizes(n, a.steps, a.sample_schedule)
    rep = a.repulsion_threshold if a.repulsion_threshold is not None else OFFICIAL_REPULSION.get((a.grid, len(sizes)), 1.0)
    start = time.time()
    orders = generate_orders(sizes, a.grid, a.num_orders, seed=a.seed, proximity_threshold=a.proximity_threshold,
                             repulsion_threshold=rep, workers=a.workers)
    save_orders(a.out, orders, a.grid, sizes, proximity_threshold=a.proximity_threshold, repulsion_threshold=rep,
                seed=a.seed)
    print(f"wrote {len(orders)} orders ({len(sizes)} steps, repulsion {rep}) to {a.out} in {time.time() - start:.1f} s")
    return Path(a.out)


if __name__ == "__main__":
    run_cli(main)

"""Schedules as data for every strategy that can generate in any order (ARPG, LPD).

A schedule is `(order, group_sizes)` (README, "Order and groups are data"): `order` lists the
raster cells (row * grid + col) in generation order and step k generates the next
`group_sizes[k]` of them at once (`group_decode.decode_in_groups`). This module turns the
sampling flags into one, the same way for every strategy:

- group sizes: `--group-sizes` (an explicit JSON list), or `--steps` and a step schedule,
  `--sample-schedule arccos | cosine` (the formulas of `schedules.py`) or `lpd` (LPD's official
  table for the grid and step count, `lpd_order.py`);
- orders: `--order raster | random | lpd | FILE`, drawn from the sampler's random source: a per-row
  `RowRNG` gives every image its own order (an image does not depend on its batch-mates), a
  `torch.Generator` one order for the batch (the official ARPG sampler's behaviour); `lpd` runs
  the locality-aware generator seeded from that source, FILE picks a row of an order file;
- order files: JSON `{grid_size, group_sizes, <generator settings>, orders}` (ours) or the bare list
  of lists (the official LPD files), validated against the grid.

Each strategy keeps its own defaults (ARPG: random order, arccos; LPD: lpd order, lpd table), so a
plain command reproduces the official behaviour, and any combination runs on either model.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoregressive.decoding.logits import Generator
from autoregressive.decoding.lpd_order import GROUP_SIZES_LOOKUP, OFFICIAL_REPULSION, lookup_group_sizes, orders_for_seeds
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.decoding.schedules import check_group_sizes, check_steps, group_sizes, schedule_names
from utils.checkpoint import atomic_write

ORDERS = ("raster", "random", "lpd")  # or the path of an order file
STEP_SCHEDULES = (*schedule_names(), "lpd")
CFG_SCHEDULES = ("linear", "constant")  # the formulas are the strategies' own


def add_schedule_arguments(group: argparse._ArgumentGroup) -> None:
    """The sampling flags of the order-capable strategies (defaults: each strategy's own)."""
    group.add_argument("--order", type=str, default=None,
                       help="generation order: raster, random, lpd (locality-aware, generated per image from "
                            "its seed) or an order file (JSON from scripts/autoregressive/lpd_orders.sh, or the "
                            "official lpd_orders_generated/*.json); default: the strategy's (arpg random, lpd lpd)")
    group.add_argument("--sample-schedule", "--group-schedule", dest="sample_schedule", type=str, default=None,
                       choices=list(STEP_SCHEDULES),
                       help="tokens per step over --steps steps: arccos, cosine, or lpd (LPD's official table for "
                            "the grid); default: the strategy's (arpg arccos, lpd lpd)")
    group.add_argument("--group-sizes", type=str, default=None,
                       help="tokens per step as a JSON list summing to the token count (LPD's --group_sizes); "
                            "overrides --sample-schedule")
    group.add_argument("--proximity-threshold", type=float, default=1.0,
                       help="--order lpd: a cell qualifies when its generated neighbours' 1/distance sum reaches this")
    group.add_argument("--repulsion-threshold", type=float, default=None,
                       help="--order lpd: cells of one group lie farther apart than this (Chebyshev); default: "
                            "LPD's official setting (2.0 at 256 px / 20 and 32 steps, 4.0 at 512 px / 48), else 1.0")
    group.add_argument("--cfg-schedule", type=str, default="linear", choices=list(CFG_SCHEDULES),
                       help="linear ramps the CFG scale from ~1 to --cfg-scale with the tokens known; "
                            "constant uses --cfg-scale throughout")


# ---------------------------------------------------------------------------------------------
# Group sizes
# ---------------------------------------------------------------------------------------------


def parse_group_sizes(text: str) -> list[int]:
    """`--group-sizes` JSON text -> a list of ints (the sum is checked against the grid later)."""
    try:
        sizes = json.loads(text)
        if not isinstance(sizes, list):
            raise TypeError
        return [int(g) for g in sizes]
    except (ValueError, TypeError):
        raise ValueError(f"--group-sizes must be a JSON list of integers, got {text!r}") from None


def resolve_group_sizes(num_tokens: int, steps: int, schedule: str, *, grid_tokens: int | None = None) -> list[int]:
    """Group sizes for `num_tokens` tokens in `steps` steps under a step schedule.

    `lpd` is LPD's official table, which covers whole grids (`grid_tokens` = N, default
    `num_tokens`) at its step counts; one token per step needs no table, and editing (fewer
    tokens than the grid) uses the cosine curve the table follows.
    """
    grid_tokens = num_tokens if grid_tokens is None else grid_tokens
    check_steps(num_tokens, steps)
    if schedule in schedule_names():
        return group_sizes(schedule, num_tokens, steps)
    if schedule != "lpd":
        raise ValueError(f"unknown step schedule {schedule!r}; known: {', '.join(STEP_SCHEDULES)}")
    grid = math.isqrt(grid_tokens)
    sizes = lookup_group_sizes(grid, steps) if num_tokens == grid_tokens == grid * grid else None
    if sizes is None and steps == num_tokens:
        sizes = [1] * num_tokens
    if sizes is None and num_tokens < grid_tokens:
        sizes = group_sizes("cosine", num_tokens, steps)
    if sizes is None:
        known = sorted(GROUP_SIZES_LOOKUP.get(grid, {}))
        raise ValueError(f"no group sizes for {steps} steps over {num_tokens} tokens: LPD's official table has "
                         f"{known or 'no entries'} for a {grid}x{grid} grid; pass --group-sizes or "
                         f"--sample-schedule cosine (or arccos)")
    return sizes


# ---------------------------------------------------------------------------------------------
# Order files
# ---------------------------------------------------------------------------------------------


def save_orders(path: str | os.PathLike, orders: np.ndarray, grid_size: int, group_sizes: Sequence[int],
                **settings: float | int) -> None:
    """Write orders as JSON: `{grid_size, group_sizes, <settings>, orders}`, the official bare list
    of lists under `orders` (official files are only that list; `load_orders` reads both).

    The bytes are exactly `json.dumps(doc, separators=(",", ":"))`, but the rows of `orders`
    (R, N) non-negative integers are formatted by table lookup in blocks (`_order_rows_json`):
    50k orders of 1024 cells take about a second instead of ten.
    """
    orders = np.asarray(orders)
    if orders.ndim != 2 or orders.shape[1] == 0 or orders.dtype.kind not in "iu" or (orders.size and orders.min() < 0):
        raise ValueError(f"orders must be a (R, N >= 1) array of non-negative integers, got {orders.dtype} {orders.shape}")
    head = json.dumps({"grid_size": grid_size, "group_sizes": [int(g) for g in group_sizes], **settings},
                      separators=(",", ":"))

    def write(f) -> None:
        f.write(head[:-1].encode() + b',"orders":[')  # "orders" is the last key, as in the dict above
        for start in range(0, len(orders), 1024):
            rows = _order_rows_json(orders[start:start + 1024])
            f.write(rows if start + 1024 < len(orders) else rows[:-1])  # no comma after the last row
        f.write(b"]}")

    atomic_write(path, write)


def _order_rows_json(block: np.ndarray) -> bytes:
    """`[v,v,...,v],` per row of `block` (B, N) non-negative ints, as JSON writes them.

    Each value becomes the bytes `str(v) + ","` right-aligned in a fixed-width row of a lookup
    table, padded with zero bytes in front; gathering the table rows gives every order row at
    a fixed width, and dropping the zero bytes leaves the text.
    """
    b, n = block.shape
    top = int(block.max(initial=0)) + 1
    width = len(str(top - 1)) + 1
    table = np.zeros((top, width), dtype=np.uint8)
    for v in range(top):
        text = f"{v},".encode()
        table[v, width - len(text):] = np.frombuffer(text, dtype=np.uint8)
    out = np.empty((b, n * width + 2), dtype=np.uint8)  # "[" + the values + "],"
    out[:, 0] = ord("[")
    out[:, 1:-1] = table[block].reshape(b, n * width)
    out[:, -2] = ord("]")  # replaces the comma after the row's last value
    out[:, -1] = ord(",")
    return out[out != 0].tobytes()


def load_orders(path: str | os.PathLike, grid_size: int) -> tuple[np.ndarray, list[int] | None]:
    """Read an order file (ours or the official bare list) -> (orders (R, N), group sizes or None).

    Every order must be a permutation of the `grid_size`^2 raster indices, and the recorded grid
    and group sizes must fit that grid; anything else is a ValueError naming the file.
    """
    n = grid_size * grid_size
    doc = json.loads(Path(path).read_text())
    meta = doc if isinstance(doc, dict) else {}
    if meta and "orders" not in meta:
        raise ValueError(f"order file {path}: a JSON object must hold 'orders'")
    if meta.get("grid_size", grid_size) != grid_size:
        raise ValueError(f"order file {path} was made for a {meta['grid_size']}x{meta['grid_size']} grid, "
                         f"but the model's grid is {grid_size}x{grid_size}")
    try:
        orders = np.asarray(meta["orders"] if meta else doc, dtype=np.int64)
    except (ValueError, TypeError) as e:
        raise ValueError(f"order file {path}: orders must be equal-length lists of integers ({e})") from None
    if orders.ndim != 2 or orders.shape[0] == 0:
        raise ValueError(f"order file {path}: expected a non-empty list of orders, got shape {orders.shape}")
    if orders.shape[1] != n:
        raise ValueError(f"order file {path} holds orders of length {orders.shape[1]}, but the "
                         f"{grid_size}x{grid_size} grid has {n} tokens")
    bad = np.flatnonzero((np.sort(orders, axis=1) != np.arange(n)).any(axis=1))
    if bad.size:
        raise ValueError(f"order file {path}: order {int(bad[0])} is not a permutation of 0..{n - 1} "
                         f"(a cell repeated or out of range)")
    sizes = meta.get("group_sizes")
    if sizes is not None:
        sizes = check_group_sizes(sizes, n, what=f"the group sizes of order file {path}")
    return orders, sizes


# ---------------------------------------------------------------------------------------------
# Orders from a random source, and the schedule of a sampling run
# ---------------------------------------------------------------------------------------------


def uniforms(generator: Generator | None, batch_size: int, m: int, device: torch.device,
             what: str = "a random order") -> torch.Tensor:
    """(B, m) uniforms from a `RowRNG` (one stream per image), (1, m) from a `torch.Generator`."""
    if generator is None:
        raise ValueError(f"{what}: pass a generator (also for temperature 0)")
    if isinstance(generator, RowRNG):
        if generator.seeds.shape[0] != batch_size:
            raise ValueError(f"the per-row sampler has {generator.seeds.shape[0]} rows for {batch_size} images")
        return generator.uniform((m,)).to(device)
    if isinstance(generator, torch.Generator):
        return torch.rand(1, m, generator=generator, device=generator.device).to(device)
    raise TypeError(f"cannot draw {what} from a {type(generator).__name__}")


def random_order(positions: torch.Tensor, batch_size: int, generator: Generator | None) -> torch.Tensor:
    """A uniformly random order of `positions` (M,): (M,) shared by the batch from a torch.Generator
    (the official ARPG `rand(M).argsort()`), or (B, M), one per row, from a per-row sampler."""
    perm = uniforms(generator, batch_size, positions.shape[0], positions.device,
                    what="generating in a random order").argsort(dim=-1)  # (1 or B, M)
    order = positions[perm]
    return order[0] if isinstance(generator, torch.Generator) else order


@dataclass(frozen=True)
class PreparedOrders:
    """Locality-aware orders built on the host ahead of their sampling call (`Schedule.prepare_orders`)."""

    sizes: tuple[int, ...]  # the group sizes they were built for
    draws: torch.Tensor  # (B,) float64 on the host: each image's first uniform, which seeds its order
    orders: torch.Tensor  # (B, N) int64 on the host


@dataclass
class Schedule:
    """The order and group sizes one sampling run uses (see the module docstring)."""

    order: str = "random"  # raster | random | lpd | path of an order file
    step_schedule: str = "arccos"  # arccos | cosine | lpd
    group_sizes: list[int] | None = None  # --group-sizes
    proximity: float = 1.0
    repulsion: float | None = None  # None: LPD's official setting of the grid / steps, else 1.0
    file: tuple[np.ndarray, list[int] | None] | None = field(default=None, repr=False)  # (orders, sizes)

    def __post_init__(self) -> None:
        if self.step_schedule not in STEP_SCHEDULES:
            raise ValueError(f"unknown --sample-schedule {self.step_schedule!r}; known: {', '.join(STEP_SCHEDULES)}")
        if self.order not in ORDERS and not os.path.isfile(self.order):
            raise ValueError(f"--order must be one of {', '.join(ORDERS)} or an order file; {self.order!r} is neither")

    @classmethod
    def from_args(cls, args: argparse.Namespace, *, order: str, step_schedule: str) -> "Schedule":
        """The flags of `add_schedule_arguments` (missing or None: the given strategy defaults);
        with `--image-size` known, an order file is read and checked against the grid now."""
        text = getattr(args, "group_sizes", None)
        schedule = cls(order=getattr(args, "order", None) or order,
                       step_schedule=getattr(args, "sample_schedule", None) or step_schedule,
                       group_sizes=parse_group_sizes(text) if text is not None else None,
                       proximity=getattr(args, "proximity_threshold", 1.0),
                       repulsion=getattr(args, "repulsion_threshold", None))
        if hasattr(args, "image_size"):
            schedule.order_file((args.image_size // args.downsample_size) ** 2)
        return schedule

    def order_file(self, num_tokens: int) -> tuple[np.ndarray, list[int] | None] | None:
        """The order file's (orders, group sizes), read once and checked against the grid."""
        if self.order in ORDERS:
            return None
        if self.file is None or self.file[0].shape[1] != num_tokens:
            self.file = load_orders(self.order, math.isqrt(num_tokens))
        return self.file

    def sizes(self, num_tokens: int, steps: int | None, default_steps: int, *,
              grid_tokens: int | None = None) -> list[int]:
        """Group sizes for `num_tokens` tokens (all N of the grid, or the unknown ones when editing):
        `--group-sizes`; else, with no `--steps`, an order file's recorded sizes; else `--steps`
        (default `default_steps`) under the step schedule. A contradiction is a ValueError."""
        grid_tokens = num_tokens if grid_tokens is None else grid_tokens
        if self.group_sizes is not None:
            what = "--group-sizes" if num_tokens == grid_tokens else "--group-sizes (editing: over the unknown tokens)"
            sizes = check_group_sizes(self.group_sizes, num_tokens, what=what)
            if steps is not None and steps != len(sizes):
                raise ValueError(f"--steps {steps} contradicts --group-sizes, which has {len(sizes)} steps")
            return sizes
        file = self.order_file(grid_tokens)
        file_sizes = file[1] if file is not None and num_tokens == grid_tokens else None
        if steps is None and file_sizes is not None:
            return list(file_sizes)
        sizes = resolve_group_sizes(num_tokens, default_steps if steps is None else steps, self.step_schedule,
                                    grid_tokens=grid_tokens)
        if file_sizes is not None and file_sizes != sizes:
            raise ValueError(f"the order file {self.order} was generated for group sizes {file_sizes}, but --steps "
                             f"{steps} gives {sizes}: leave out --steps to use the file's")
        return sizes

    def orders(self, batch_size: int, sizes: Sequence[int], generator: Generator | None, device: torch.device,
               known: torch.Tensor | None = None, prepared: PreparedOrders | None = None) -> torch.Tensor:
        """The cells to generate in generation order: (M,) shared by the batch (raster, or any order
        from a torch.Generator) or (B, M) one per image (from a `RowRNG`).

        Without `known`, M = N = sum(sizes). `known` (N,) bool marks context cells (editing): the
        order then lists the M unknown cells (`lpd` grows from the known ones; a file row keeps
        its relative order of the unknown cells). `prepared` (`prepare_orders`): those orders,
        built ahead; the draw they came from is still taken from `generator` (its streams advance
        as when building here) and must be the one they were built from, else a ValueError.
        """
        if prepared is not None:
            return self._prepared_orders(prepared, batch_size, sizes, generator, device, known)
        n = sum(int(g) for g in sizes) if known is None else known.numel()
        cells = torch.arange(n, device=device) if known is None else (~known.to(device)).nonzero().squeeze(1)
        if self.order == "raster":
            return cells
        if self.order == "random":
            return random_order(cells, batch_size, generator)
        u = uniforms(generator, batch_size, 1, device, what=f"--order {self.order}")[:, 0]  # (1 or B,)
        if self.order == "lpd":
            out = self._lpd_orders(sizes, u, n, known).to(device)
        else:
            table = self.order_file(n)[0]  # (R, N) on the host; only the rows used move
            rows = (u * table.shape[0]).long().clamp_(max=table.shape[0] - 1).cpu().numpy()
            out = torch.from_numpy(table[rows]).to(device)  # (1 or B, N)
            if known is not None:
                out = out[~known.to(device)[out]].reshape(out.shape[0], -1)
        return out[0] if isinstance(generator, torch.Generator) else out

    def _lpd_orders(self, sizes: Sequence[int], u: torch.Tensor, n: int, known: torch.Tensor | None) -> torch.Tensor:
        """`--order lpd`: one order per uniform of `u` (1 or B,), (1 or B, M) int64 on the host."""
        grid = math.isqrt(n)
        repulsion = self.repulsion
        if repulsion is None:
            repulsion = OFFICIAL_REPULSION.get((grid, len(sizes)), 1.0)
        seeds = (u * 2.0 ** 53).long().tolist()
        return torch.from_numpy(orders_for_seeds(list(sizes), grid, seeds, proximity_threshold=self.proximity,
                                                 repulsion_threshold=repulsion,
                                                 known=None if known is None else known.cpu().numpy()))

    def prepare_orders(self, sizes: Sequence[int], seeds: torch.Tensor) -> PreparedOrders | None:
        """The orders `orders` would build for a whole grid and images drawing from `RowRNG(seeds)`,
        built now on the host (thread-safe: CPU ops only), so that a sampler can build a batch's
        orders while the previous batch decodes. None unless `--order lpd`: the other orders cost
        little (a file row, or a device-side random permutation)."""
        if self.order != "lpd":
            return None
        u = RowRNG(seeds.to("cpu")).uniform((1,))[:, 0]  # splitmix64: the same bits on any device
        n = sum(int(g) for g in sizes)
        return PreparedOrders(tuple(int(g) for g in sizes), u, self._lpd_orders(sizes, u, n, None))

    def _prepared_orders(self, prepared: PreparedOrders, batch_size: int, sizes: Sequence[int],
                         generator: Generator | None, device: torch.device, known: torch.Tensor | None) -> torch.Tensor:
        """`orders` with `prepared` orders: checked to be exactly those it would build here."""
        if known is not None or self.order != "lpd" or not isinstance(generator, RowRNG):
            raise ValueError("prepared orders serve `--order lpd` over the whole grid with per-image streams (RowRNG)")
        if prepared.sizes != tuple(int(g) for g in sizes) or prepared.orders.shape[0] != batch_size:
            raise ValueError(f"orders prepared for {prepared.orders.shape[0]} images and group sizes {list(prepared.sizes)} "
                             f"cannot serve {batch_size} images and {list(sizes)}")
        u = uniforms(generator, batch_size, 1, device, what="--order lpd")[:, 0]  # the draw building them takes
        if not torch.equal(u.cpu(), prepared.draws):
            raise ValueError("the prepared orders were built from other per-image streams than this call's")
        return prepared.orders.to(device)


# ---------------------------------------------------------------------------------------------
# Editing
# ---------------------------------------------------------------------------------------------


def check_known(known_tokens: torch.Tensor, known_mask: torch.Tensor, batch_size: int, num_tokens: int) -> torch.Tensor:
    """Editing inputs: `known_mask` a boolean (N,) or (grid, grid) with something left to generate,
    `known_tokens` (B, N); returns the mask as (N,)."""
    if known_mask.dtype != torch.bool or known_mask.numel() != num_tokens:
        grid = math.isqrt(num_tokens)
        raise ValueError(f"the mask must be a boolean tensor of {num_tokens} cells ({grid} x {grid} tokens), "
                         f"got {known_mask.dtype} of shape {tuple(known_mask.shape)}")
    if known_tokens.shape != (batch_size, num_tokens):
        raise ValueError(f"known_tokens must be (B, N) = ({batch_size}, {num_tokens}), got {tuple(known_tokens.shape)}")
    if bool(known_mask.all()):
        raise ValueError("the mask leaves nothing to generate: every token is known")
    return known_mask.reshape(num_tokens)

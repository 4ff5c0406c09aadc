"""LPD's locality-aware generation orders and its group-size tables (`specs/lpd.md` section 5).

A schedule is `(order, group_sizes)`: `order` lists the N = grid^2 raster indices (row * grid + col)
in generation order and step k generates the next `group_sizes[k]` of them in parallel. LPD picks
each group from cells next to what is already generated (proximity score >= threshold: the sum of
1/distance over generated 8-neighbours) while keeping the cells of one group apart (Chebyshev
distance > repulsion threshold); when too few qualify, the rest is farthest-point sampled from the
step's picks.

One vectorised implementation serves two random sources:
- `lpd_order_schedule(...)` draws exactly what the official `orders/lpd_order.py` draws from
  python `random` and numpy's global RNG (`random.choice`, one `random.shuffle` per step,
  `np.random.randint` when farthest-point sampling starts from nothing), so a seeded call
  reproduces the official function (the golden `order.pt`);
- `generate_orders(...)` gives order i its own numpy stream `SeedSequence([seed, i])`, processes
  many orders at once and splits them over processes: the same distribution as the official
  runner (which never seeds), but reproducible and independent of batching and worker count.
"""
from __future__ import annotations

import json
import math
import os
import random
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------
# Group-size tables
# ---------------------------------------------------------------------------------------------


def _rle(*runs: int | tuple[int, int]) -> list[int]:
    """Expand run-length entries: `v` is one group of v tokens, `(v, n)` is n groups of v tokens."""
    out: list[int] = []
    for r in runs:
        v, n = (r, 1) if isinstance(r, int) else r
        out.extend([v] * n)
    return out


#: The official `orders/group_sizes_lookup.json`: grid -> steps -> group sizes (16 = 256 px,
#: 32 = 512 px). The official training draws one entry of its grid per iteration (section 4.2).
GROUP_SIZES_LOOKUP: dict[int, dict[int, list[int]]] = {
    16: {
        256: _rle((1, 256)),
        128: _rle((1, 41), (2, 46), (3, 41)),
        64: _rle((1, 10), (2, 7), (3, 7), (4, 9), (5, 11), (6, 20)),
        32: _rle((1, 2), (2, 2), (3, 2), 4, (5, 2), (6, 2), (7, 2), (8, 2), (9, 2), (10, 3), (11, 4), (12, 8)),
        24: _rle(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, (11, 2), 12, 13, (14, 3), (15, 2), (16, 3), (17, 2)),
        20: _rle(1, 2, 4, 5, 7, 8, 10, 11, 12, 14, 15, 16, 17, (18, 2), (19, 2), (20, 3)),
        16: _rle(1, 4, 6, 8, 11, 13, 15, 17, 19, 20, 22, 23, (24, 3), 25),
        12: _rle(1, 7, 11, 15, 19, 22, 25, 28, 30, 32, (33, 2)),
        8: _rle(1, 15, 24, 32, 40, 45, 49, 50),
    },
    32: {
        1024: _rle((1, 1024)),
        512: _rle((1, 162), (2, 188), (3, 162)),
        256: _rle((1, 39), (2, 28), (3, 31), (4, 34), (5, 44), (6, 80)),
        224: _rle((1, 32), (2, 21), (3, 21), (4, 24), (5, 27), (6, 37), (7, 62)),
        192: _rle((1, 22), (2, 15), (3, 16), (4, 16), (5, 19), (6, 21), (7, 27), (8, 55), 10),
        160: _rle((1, 15), (2, 11), (3, 10), (4, 12), (5, 12), (6, 13), (7, 14), (8, 17), (9, 23), (10, 33)),
        128: _rle((1, 10), (2, 6), (3, 7), (4, 7), (5, 7), (6, 7), (7, 8), (8, 9), (9, 9), (10, 11), (11, 14),
                  (12, 26), (13, 7)),
        96: _rle((1, 5), (2, 4), (3, 4), (4, 4), (5, 3), (6, 4), (7, 4), (8, 5), (9, 4), (10, 4), (11, 6), (12, 5),
                 (13, 6), (14, 7), (15, 8), (16, 13), (17, 10)),
        80: _rle((1, 4), (2, 2), (3, 3), (4, 2), (5, 3), (6, 3), (7, 2), (8, 3), (9, 3), (10, 3), (11, 3), (12, 3),
                 (13, 3), (14, 4), (15, 4), (16, 4), (17, 6), (18, 6), (19, 7), (20, 12)),
        64: _rle((1, 2), (2, 2), (3, 2), 4, (5, 2), (6, 2), 7, (8, 2), (9, 2), (10, 2), 11, (12, 2), (13, 2), (14, 2),
                 (15, 2), (16, 2), (17, 2), (18, 3), (19, 2), (20, 3), (21, 3), (22, 3), (23, 5), (24, 6), (25, 8)),
        56: _rle((1, 2), 2, 3, (4, 2), 5, 6, 7, (8, 2), 9, 10, (11, 2), 12, 13, (14, 2), 15, (16, 2), 17, (18, 2),
                 (19, 2), 20, (21, 2), (22, 2), (23, 2), (24, 2), (25, 3), (26, 3), (27, 5), (28, 6), (29, 3)),
        48: _rle(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, (23, 2), 24, 25,
                 (26, 2), 27, (28, 2), (29, 2), (30, 2), (31, 2), (32, 3), (33, 7), 34),
        40: _rle(1, 2, 4, 6, 7, 9, 10, 12, 13, 15, 16, 18, 19, 20, 22, 23, 24, 26, 27, 28, 29, 30, 31, 32, 33, 34,
                 (35, 2), 36, (37, 2), (38, 2), (39, 3), (40, 4)),
        32: _rle(1, 4, 6, 9, 11, 13, 16, 18, 20, 23, 25, 27, 29, 31, 33, 35, 36, 38, 40, 41, 42, 44, 45, 46, 47,
                 (48, 2), (49, 2), (50, 3)),
    },
}

#: The official evaluation settings (`scripts/eval/*.sh`): (grid, steps) -> repulsion threshold
#: of the released order files (proximity threshold 1.0). XXL-256 at 20 steps used 3.0.
OFFICIAL_REPULSION = {(16, 20): 2.0, (16, 32): 2.0, (32, 48): 4.0}


def check_group_sizes(group_sizes: Sequence[int], num_tokens: int, what: str = "group sizes") -> list[int]:
    """Positive integers summing to `num_tokens`; returns them as a list of ints."""
    sizes = [int(g) for g in group_sizes]
    if not sizes or any(g <= 0 for g in sizes) or any(g != s for g, s in zip(sizes, group_sizes)):
        raise ValueError(f"{what} must be positive integers, got {list(group_sizes)}")
    if sum(sizes) != num_tokens:
        raise ValueError(f"{what} sum to {sum(sizes)}, but the grid has {num_tokens} tokens")
    return sizes


def lookup_group_sizes(grid_size: int, steps: int) -> list[int] | None:
    """The official table entry for a grid and a step count, or None when there is none."""
    entry = GROUP_SIZES_LOOKUP.get(grid_size, {}).get(steps)
    return list(entry) if entry is not None else None


def cosine_group_sizes(num_tokens: int, steps: int) -> list[int]:
    """Group sizes from the cosine curve `N (1 - cos(pi/2 * k / steps))` of tokens done after step k.

    For grids without an official table (the official tables follow a similar curve). The first
    group is always 1 (the order generator starts from one cell) and every group has >= 1 token.
    """
    if not 1 <= steps <= num_tokens:
        raise ValueError(f"steps must lie in [1, {num_tokens}], got {steps}")
    done = [0, 1]
    for k in range(2, steps + 1):
        target = round(num_tokens * (1 - math.cos(math.pi / 2 * k / steps)))
        done.append(min(max(target, done[-1] + 1), num_tokens - (steps - k)))
    return [b - a for a, b in zip(done[:-1], done[1:])]


def training_group_sizes(grid_size: int) -> list[list[int]]:
    """The schedules official training draws from (`group_sizes_{256,512}.json` = the lookup
    entries of the grid). Other grids: cosine schedules at N, N/2, N/4, ... steps (>= 4 steps)."""
    if grid_size in GROUP_SIZES_LOOKUP:
        return [list(v) for v in GROUP_SIZES_LOOKUP[grid_size].values()]
    n = grid_size * grid_size
    steps = sorted({n // 2 ** k for k in range(8) if n // 2 ** k >= min(4, n)}, reverse=True)
    return [cosine_group_sizes(n, s) for s in steps]


# ---------------------------------------------------------------------------------------------
# Random sources (see the module docstring)
# ---------------------------------------------------------------------------------------------


class _OfficialRNG:
    """python `random` + numpy RandomState, called exactly as the official code calls them (B = 1)."""

    def __init__(self, py_rng: random.Random, np_rng: np.random.RandomState):
        self.py, self.np = py_rng, np_rng

    def first(self, n: int) -> np.ndarray:
        return np.array([self.py.choice(range(n))])

    def tie_keys(self, unselected: np.ndarray) -> np.ndarray:
        """(1, N) keys: the position of each unselected cell (raster order) after one shuffle."""
        cells = np.flatnonzero(unselected[0])
        perm = list(range(len(cells)))
        self.py.shuffle(perm)  # same draws as shuffling the official candidate list
        keys = np.zeros(unselected.shape, dtype=np.int64)
        keys[0, cells[perm]] = np.arange(len(cells))
        return keys

    def fps_start(self, rows: np.ndarray, pool_sizes: np.ndarray) -> np.ndarray:
        return np.array([self.np.randint(int(p)) for p in pool_sizes])


class _PerOrderRNG:
    """One numpy Generator per order: order i depends on its own seed only."""

    def __init__(self, gens: list[np.random.Generator]):
        self.gens = gens

    def first(self, n: int) -> np.ndarray:
        return np.array([g.integers(n) for g in self.gens])

    def tie_keys(self, unselected: np.ndarray) -> np.ndarray:
        return np.stack([g.permutation(unselected.shape[1]) for g in self.gens])  # (B, N) random ranks

    def fps_start(self, rows: np.ndarray, pool_sizes: np.ndarray) -> np.ndarray:
        return np.array([self.gens[r].integers(int(p)) for r, p in zip(rows, pool_sizes)])


# ---------------------------------------------------------------------------------------------
# The generator (B orders at once)
# ---------------------------------------------------------------------------------------------


def _neighbour_table(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded-grid index of every cell, and the 8-neighbour offsets and weights 1/distance."""
    p = grid + 2
    r, c = np.divmod(np.arange(grid * grid), grid)
    pad_index = (r + 1) * p + (c + 1)
    offs, weights = [], []
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                offs.append(dr * p + dc)
                weights.append(1.0 / math.sqrt(dr * dr + dc * dc))  # 1 edge, 1/sqrt(2) diagonal
    return pad_index, np.array(offs), np.array(weights)


# Exact proximity score of a cell with e generated edge and d diagonal neighbours, by code 5e + d,
# and its rank in descending order of score (codes that cannot occur rank last).
_AB_VALUE = np.array([e + d / math.sqrt(2) if e <= 4 and d <= 4 else -1.0 for e in range(9) for d in range(5)])
_AB_RANK = np.argsort(np.argsort(-_AB_VALUE, kind="stable"), kind="stable")


def _schedule_batch(group_sizes: Sequence[int], grid: int, proximity: float, repulsion: float, rng,
                    batch: int, known: np.ndarray | None = None) -> np.ndarray:
    """`batch` locality-aware orders (B, M) int64 for one schedule; `rng` as `_OfficialRNG`.

    Without `known`, M = N and the order starts from one random cell (first group size 1).
    With `known` (N,) bool (editing), the known cells count as generated and M = N - #known.
    """
    n = grid * grid
    known = np.zeros(n, dtype=bool) if known is None else np.asarray(known, dtype=bool).reshape(n)
    n_known = int(known.sum())
    sizes = check_group_sizes(group_sizes, n - n_known)
    if not n_known and sizes[0] != 1:
        raise ValueError(f"the locality-aware order starts from one cell: the first group size must be 1, "
                         f"got {sizes[0]}")
    rows_all = np.arange(batch)
    cell_r, cell_c = (a.astype(np.int32) for a in np.divmod(np.arange(n), grid))
    pad_index, nb_off, nb_w = _neighbour_table(grid)
    # Repulsion: a cell within Chebyshev distance R of a pick of the same step is rejected.
    rep = min(math.floor(repulsion), grid - 1) if repulsion >= 0 else -1
    rp = grid + 2 * max(rep, 0)
    rep_index = (cell_r + max(rep, 0)) * rp + (cell_c + max(rep, 0))
    rep_off = np.array([dr * rp + dc for dr in range(-rep, rep + 1) for dc in range(-rep, rep + 1)], dtype=np.int64)

    # Proximity scores on the padded grid. Official draws: float sums accumulated in pick order,
    # exactly as the official loop adds them (its float rounding decides near-ties). Otherwise:
    # the exact score from the counts of generated edge (5 per) and diagonal (1 per) neighbours.
    float_scores = isinstance(rng, _OfficialRNG)
    score = np.zeros((batch, (grid + 2) ** 2)) if float_scores else np.zeros((batch, (grid + 2) ** 2), np.int16)
    step_add = nb_w if float_scores else np.where(nb_w == 1.0, 5, 1).astype(np.int16)
    selected = np.zeros((batch, n), dtype=bool)
    order = np.empty((batch, n - n_known), dtype=np.int64)

    def commit(picks: np.ndarray, start: int) -> None:
        """Append picks (B, g) in pick order; scores accumulate in that order, as officially."""
        order[:, start:start + picks.shape[1]] = picks
        selected[rows_all[:, None], picks] = True
        for k in range(picks.shape[1]):
            score[rows_all[:, None], pad_index[picks[:, k]][:, None] + nb_off] += step_add

    if n_known:  # context cells: generated before the first step, in raster order
        selected[:, known] = True
        for cell in np.flatnonzero(known):
            score[:, pad_index[cell] + nb_off] += step_add
        filled, rest = 0, sizes
    else:
        commit(rng.first(n)[:, None], 0)
        filled, rest = 1, sizes[1:]
    for g in rest:
        n_un = n - n_known - filled
        unsel = ~selected
        keys = rng.tie_keys(unsel)  # (B, N) distinct ranks in [0, N) per row
        if float_scores:
            value = score[:, pad_index]
            neg = np.where(unsel, -value, np.inf)
            _, level = np.unique(neg, return_inverse=True)  # dense rank of the exact float score
            level = level.reshape(neg.shape)
        else:
            value = _AB_VALUE[score[:, pad_index]]
            level = np.where(unsel, _AB_RANK[score[:, pad_index]], len(_AB_RANK))
        # Sort by score descending, ties by key: one stable radix sort when the packed key fits 16 bits.
        packed = level * n + keys
        packed = packed.astype(np.uint16) if packed.max() < 2 ** 16 else packed
        cand = np.argsort(packed, axis=-1, kind="stable")[:, :n_un]  # (B, n_un)
        cand_score = np.take_along_axis(value, cand, axis=1)
        n_hi = (cand_score >= proximity).sum(1)  # hi candidates form a prefix

        # Proximity pass: pop hi candidates in order, reject those a pick of this step repels.
        status = np.zeros((batch, n_un), dtype=np.int8)  # 0 not popped, 1 picked, 2 rejected
        picks = np.empty((batch, g), dtype=np.int64)
        count = np.zeros(batch, dtype=np.int64)
        blocked = np.zeros((batch, rp * rp), dtype=bool)
        for j in range(int(n_hi.max(initial=0))):
            rows = np.flatnonzero((j < n_hi) & (count < g))
            if rows.size == 0:
                break
            c = cand[rows, j]
            bad = blocked[rows, rep_index[c]] if rep >= 0 else np.zeros(rows.size, dtype=bool)
            status[rows, j] = np.where(bad, 2, 1)
            ok, c_ok = rows[~bad], c[~bad]
            picks[ok, count[ok]] = c_ok
            count[ok] += 1
            if rep >= 0 and ok.size:
                blocked[ok[:, None], rep_index[c_ok][:, None] + rep_off] = True

        # The rest: pool = lo + rejected + unpopped hi (each in candidate order), farthest-point sampled.
        need = g - count
        fill_rows = np.flatnonzero(need > 0)
        if fill_rows.size:
            pos = np.arange(n_un)
            category = np.where(pos >= n_hi[fill_rows, None], 0, np.where(status[fill_rows] == 2, 1, 2))
            category = np.where(status[fill_rows] == 1, 3, category)  # picked: not in the pool
            pool_rank = np.argsort(category * n_un + pos, axis=1, kind="stable")
            pool = np.take_along_axis(cand[fill_rows], pool_rank, axis=1)  # (F, n_un), pool first
            pool_size = n_un - count[fill_rows]
            _fill_from_pool(picks, fill_rows, count[fill_rows], need[fill_rows], pool, pool_size,
                            cell_r, cell_c, rng)
        commit(picks, filled)
        filled += g
    return order


def _fill_from_pool(picks: np.ndarray, rows: np.ndarray, count: np.ndarray, need: np.ndarray, pool: np.ndarray,
                    pool_size: np.ndarray, cell_r: np.ndarray, cell_c: np.ndarray, rng) -> None:
    """Complete each row's picks from its pool: all of it when it is not larger than the need,
    else farthest-point sampling from the row's picks of this step (argmax, first on ties)."""
    take_all = pool_size <= need
    for i in np.flatnonzero(take_all):
        picks[rows[i], count[i]:count[i] + need[i]] = pool[i, :need[i]]
    fps = np.flatnonzero(~take_all)
    if fps.size == 0:
        return
    rows, count, need, pool, pool_size = rows[fps], count[fps], need[fps], pool[fps], pool_size[fps]
    width = int(pool_size.max())
    pool = pool[:, :width]
    valid = np.arange(width)[None, :] < pool_size[:, None]
    pr, pc = cell_r[pool].astype(np.int32), cell_c[pool].astype(np.int32)  # (F, P)
    big = np.iinfo(np.int32).max
    # Squared distance to the step's picks (same argmax as the official Euclidean); -1 = padding,
    # which every np.minimum keeps at -1 since distances are >= 0.
    min_d2 = np.where(valid, big, -1).astype(np.int32)
    for k in range(int(count.max(initial=0))):
        has = k < count
        sel = np.where(has, picks[rows, np.minimum(k, picks.shape[1] - 1)], 0)  # garbage where not has
        d2 = (pr - cell_r[sel][:, None]) ** 2 + (pc - cell_c[sel][:, None]) ** 2
        np.minimum(min_d2, np.where(has[:, None], d2, big), out=min_d2)
    empty = np.flatnonzero(count == 0)
    start = rng.fps_start(rows[empty], pool_size[empty]) if empty.size else np.zeros(0, dtype=np.int64)
    first = np.full(rows.size, -1, dtype=np.int64)
    first[empty] = start
    for t in range(int(need.max())):
        live = np.flatnonzero(t < need)
        idx = np.where((t == 0) & (first[live] >= 0), first[live], min_d2[live].argmax(1))
        sel = pool[live, idx]
        picks[rows[live], count[live] + t] = sel
        if live.size == rows.size:  # every row still picking: work in place
            d2 = (pr - cell_r[sel][:, None]) ** 2 + (pc - cell_c[sel][:, None]) ** 2
            np.minimum(min_d2, d2, out=min_d2)
            min_d2[live, idx] = 0  # taken
        else:
            d2 = (pr[live] - cell_r[sel][:, None]) ** 2 + (pc[live] - cell_c[sel][:, None]) ** 2
            upd = np.minimum(min_d2[live], d2)
            upd[np.arange(live.size), idx] = 0  # taken
            min_d2[live] = upd


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def lpd_order_schedule(group_sizes: Sequence[int], grid_size: int = 16, proximity_threshold: float = 1.0,
                       repulsion_threshold: float = 1.0, *, py_rng: random.Random | None = None,
                       np_rng: np.random.RandomState | None = None) -> list[int]:
    """One order with the official random draws (default: the global `random` and `np.random`).

    `random.seed(s); np.random.seed(s)` before the call, or `py_rng=random.Random(s),
    np_rng=np.random.RandomState(s)`, reproduces the official `lpd_order_schedule` exactly.
    """
    rng = _OfficialRNG(py_rng if py_rng is not None else random._inst,
                       np_rng if np_rng is not None else np.random.mtrand._rand)
    return _schedule_batch(group_sizes, grid_size, proximity_threshold, repulsion_threshold, rng, 1)[0].tolist()


def orders_for_seeds(group_sizes: Sequence[int], grid_size: int, seeds: Sequence[int], *,
                     proximity_threshold: float = 1.0, repulsion_threshold: float = 1.0,
                     known: np.ndarray | None = None) -> np.ndarray:
    """One order per seed, (len(seeds), M) int64; order i depends on `seeds[i]` only.

    `known` (N,) bool: cells already given (editing); the orders then cover the M other cells,
    growing from the known ones, and `group_sizes` sums to M.
    """
    gens = [np.random.default_rng(np.random.SeedSequence([int(s) & (2 ** 63 - 1)])) for s in seeds]
    return _schedule_batch(group_sizes, grid_size, proximity_threshold, repulsion_threshold,
                           _PerOrderRNG(gens), len(gens), known)


def _chunk(args: tuple) -> np.ndarray:
    group_sizes, grid, seed, start, stop, prox, rep = args
    gens = [np.random.default_rng(np.random.SeedSequence([seed, i])) for i in range(start, stop)]
    return _schedule_batch(group_sizes, grid, prox, rep, _PerOrderRNG(gens), stop - start)


def generate_orders(group_sizes: Sequence[int], grid_size: int, num_orders: int, *, seed: int = 0,
                    proximity_threshold: float = 1.0, repulsion_threshold: float = 1.0, workers: int = 1,
                    chunk_size: int = 1000) -> np.ndarray:
    """`num_orders` orders (M, N) int64; order i comes from `SeedSequence([seed, i])` whatever
    `workers` and `chunk_size` are (vectorised over a chunk, chunks spread over processes)."""
    check_group_sizes(group_sizes, grid_size * grid_size)
    jobs = [(list(group_sizes), grid_size, seed, a, min(a + chunk_size, num_orders), proximity_threshold,
             repulsion_threshold) for a in range(0, num_orders, chunk_size)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(j) for j in jobs]
    return np.concatenate(parts) if parts else np.zeros((0, grid_size * grid_size), dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Order files
# ---------------------------------------------------------------------------------------------


def save_orders(path: str | os.PathLike, orders: np.ndarray, grid_size: int, group_sizes: Sequence[int],
                **settings: float | int) -> None:
    """Write orders as JSON: `{grid_size, group_sizes, <settings>, orders}`, the official bare list
    of lists under `orders` (official files are only that list; `load_orders` reads both)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"grid_size": grid_size, "group_sizes": [int(g) for g in group_sizes], **settings,
           "orders": orders.tolist()}
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, separators=(",", ":")))
    os.replace(tmp, path)


def load_orders(path: str | os.PathLike, grid_size: int) -> tuple[np.ndarray, list[int] | None]:
    """Read an order file (ours or the official bare list) -> (orders (M, N), group sizes or None).

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
    if not (np.sort(orders, axis=1) == np.arange(n)).all():
        bad = int(np.flatnonzero(~(np.sort(orders, axis=1) == np.arange(n)).all(1))[0])
        raise ValueError(f"order file {path}: order {bad} is not a permutation of 0..{n - 1}")
    sizes = meta.get("group_sizes")
    if sizes is not None:
        sizes = check_group_sizes(sizes, n, what=f"the group sizes of order file {path}")
    return orders, sizes


# ---------------------------------------------------------------------------------------------
# Command line: write an order file for sampling
# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> Path:
    """`python -m autoregressive.sample.lpd_order --grid 16 --steps 20 --num-orders 50000 --out F`."""
    import argparse
    import time

    p = argparse.ArgumentParser(description="Write LPD locality-aware generation orders (JSON) for sampling.")
    p.add_argument("--grid", type=int, default=16, help="tokens per side (16 = 256 px, 32 = 512 px with VQ-16)")
    p.add_argument("--steps", type=int, default=None, help="decoding steps: the official table's group sizes")
    p.add_argument("--group-sizes", type=str, default=None, help="JSON list of group sizes instead of --steps")
    p.add_argument("--group-schedule", type=str, default=None, choices=["cosine"],
                   help="group sizes for a --steps the official table lacks")
    p.add_argument("--proximity-threshold", type=float, default=1.0, help="official default 1.0")
    p.add_argument("--repulsion-threshold", type=float, default=None,
                   help="default: the official setting for the grid / steps (2.0 at 16/20 and 16/32, 4.0 at 32/48), else 1.0")
    p.add_argument("--num-orders", type=int, default=50000, help="one order per image")
    p.add_argument("--seed", type=int, default=0, help="order i comes from SeedSequence([seed, i])")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes")
    p.add_argument("--out", type=str, required=True, help="output .json")
    a = p.parse_args(argv)
    n = a.grid * a.grid
    if a.group_sizes is not None:
        sizes = check_group_sizes(json.loads(a.group_sizes), n, what="--group-sizes")
    elif a.steps is None:
        raise ValueError("pass --steps or --group-sizes")
    else:
        sizes = lookup_group_sizes(a.grid, a.steps)
        if sizes is None and a.group_schedule == "cosine":
            sizes = cosine_group_sizes(n, a.steps)
        if sizes is None:
            raise ValueError(f"the official table has no {a.steps}-step entry for a {a.grid}x{a.grid} grid "
                             f"(it has {sorted(GROUP_SIZES_LOOKUP.get(a.grid, {}))}); pass --group-sizes or "
                             f"--group-schedule cosine")
    rep = a.repulsion_threshold if a.repulsion_threshold is not None else OFFICIAL_REPULSION.get((a.grid, len(sizes)), 1.0)
    start = time.time()
    orders = generate_orders(sizes, a.grid, a.num_orders, seed=a.seed, proximity_threshold=a.proximity_threshold,
                             repulsion_threshold=rep, workers=a.workers)
    save_orders(a.out, orders, a.grid, sizes, proximity_threshold=a.proximity_threshold, repulsion_threshold=rep,
                seed=a.seed)
    print(f"wrote {len(orders)} orders ({len(sizes)} steps, repulsion {rep}) to {a.out} in {time.time() - start:.1f} s")
    return Path(a.out)


if __name__ == "__main__":
    main()

"""LPD's locality-aware generation orders and its group-size tables (official: mit-han-lab/lpd).

An order lists the N = grid^2 raster indices (row * grid + col) in generation order and step k
generates the next `group_sizes[k]` of them in parallel (`decoding/orders.py` turns the sampling
flags into such a schedule for every strategy). LPD picks each group from cells next to what is
already generated (proximity score >= threshold: the sum of 1/distance over generated
8-neighbours) while keeping the cells of one group apart (Chebyshev distance > repulsion
threshold); when too few qualify, the rest is farthest-point sampled from the step's picks.

One implementation, vectorised over a batch of orders, serves two random sources:
- `lpd_order_schedule(...)` draws exactly what the official `orders/lpd_order.py` draws from
  python `random` and numpy's global RNG (`random.choice`, one `random.shuffle` per step,
  `np.random.randint` when farthest-point sampling starts from nothing), so a seeded call
  reproduces the official function (the golden `order.pt`);
- `generate_orders(...)` gives order i its own numpy stream `SeedSequence([seed, i])`, processes
  many orders at once and splits them over processes: the same distribution as the official
  runner (which never seeds), but reproducible and independent of batching and worker count.
Per step, everything is a few passes over (B, N) arrays in small integer types: scores as
int8 codes, one radix sort of uint16 keys (score rank, random tie key), the repulsion pass
popping all rows' candidates together, and farthest-point sampling in int16 squared distances.
"""
from __future__ import annotations

import functools
import math
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from autoregressive.decoding import schedules
from autoregressive.decoding.schedules import check_group_sizes


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


def lookup_group_sizes(grid_size: int, steps: int) -> list[int] | None:
    """The official table entry for a grid and a step count, or None when there is none."""
    entry = GROUP_SIZES_LOOKUP.get(grid_size, {}).get(steps)
    return list(entry) if entry is not None else None


def training_group_sizes(grid_size: int) -> list[list[int]]:
    """The schedules official training draws from (`group_sizes_{256,512}.json` = the lookup
    entries of the grid). Other grids: cosine schedules at N, N/2, N/4, ... steps (>= 4 steps)."""
    if grid_size in GROUP_SIZES_LOOKUP:
        return [list(v) for v in GROUP_SIZES_LOOKUP[grid_size].values()]
    n = grid_size * grid_size
    steps = sorted({n // 2 ** k for k in range(8) if n // 2 ** k >= min(4, n)}, reverse=True)
    return [schedules.group_sizes("cosine", n, s) for s in steps]


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
        """(B, N) random ranks, one permutation per row (uint16 when N fits: the sort key stays small)."""
        n = unselected.shape[1]
        keys = np.empty(unselected.shape, dtype=np.uint16 if n <= 2 ** 16 else np.int64)
        for row, g in zip(keys, self.gens):
            row[...] = g.permutation(n)
        return keys

    def fps_start(self, rows: np.ndarray, pool_sizes: np.ndarray) -> np.ndarray:
        return np.array([self.gens[r].integers(int(p)) for r, p in zip(rows, pool_sizes)])


# ---------------------------------------------------------------------------------------------
# The generator (B orders at once)
# ---------------------------------------------------------------------------------------------

# Exact proximity score of a cell with e generated edge and d diagonal neighbours, by code 5e + d,
# and its rank in descending order of score (codes that cannot occur rank last).
_AB_VALUE = np.array([e + d / math.sqrt(2) if e <= 4 and d <= 4 else -1.0 for e in range(9) for d in range(5)])
_AB_RANK = np.argsort(np.argsort(-_AB_VALUE, kind="stable"), kind="stable")
_SELECTED = 64  # added to the code of a generated cell (codes stay below 64 + 25 in int8)
_RANK_OF_CODE = np.full(_SELECTED + 25, len(_AB_RANK))  # generated cells rank after every score
_RANK_OF_CODE[:len(_AB_RANK)] = _AB_RANK


@dataclass(frozen=True)
class _Grid:
    """Index tables of one grid and repulsion radius R (all vectorised steps index through them)."""

    n: int
    cell: np.dtype  # dtype of cell ids
    dist: np.dtype  # dtype of squared distances d (and of 2 d + 1, for farthest-point tie-breaking)
    cell_r: np.ndarray  # (N,) row of each cell
    cell_c: np.ndarray  # (N,) column
    pad_index: np.ndarray  # (N,) index in the score grid padded by 1 (no bounds checks)
    nb_off: np.ndarray  # (8,) neighbour offsets in the padded score grid
    nb_w: np.ndarray  # (8,) their weights 1/distance (official float scores)
    nb_code: np.ndarray  # (8,) their exact-score codes: 5 per edge, 1 per diagonal neighbour
    rep_index: np.ndarray  # (N,) index in the grid padded by R
    rep_off: np.ndarray  # (K,) offsets of the (2R+1)^2 cells a pick repels (empty when R < 0)
    rep_cells: int  # cells of the grid padded by R


@functools.lru_cache(maxsize=16)
def _grid(grid: int, rep: int) -> _Grid:
    n, p, rp = grid * grid, grid + 2, grid + 2 * max(rep, 0)
    r, c = np.divmod(np.arange(n), grid)
    offs = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if dr or dc]
    cell = np.dtype(np.int16 if n < 2 ** 15 else np.int32)
    dist = np.dtype(np.int16 if 4 * (grid - 1) ** 2 + 1 < 2 ** 15 else np.int32)
    return _Grid(
        n=n, cell=cell, dist=dist, cell_r=r.astype(dist), cell_c=c.astype(dist),
        pad_index=(r + 1) * p + (c + 1),
        nb_off=np.array([dr * p + dc for dr, dc in offs]),
        nb_w=np.array([1.0 / math.sqrt(dr * dr + dc * dc) for dr, dc in offs]),  # 1 edge, 1/sqrt(2) diagonal
        nb_code=np.array([5 if dr == 0 or dc == 0 else 1 for dr, dc in offs], dtype=np.int8),
        rep_index=(r + max(rep, 0)) * rp + (c + max(rep, 0)),
        rep_off=np.array([dr * rp + dc for dr in range(-rep, rep + 1) for dc in range(-rep, rep + 1)], dtype=np.int64),
        rep_cells=rp * rp)


def _schedule_batch(group_sizes: Sequence[int], grid: int, proximity: float, repulsion: float, rng,
                    batch: int, known: np.ndarray | None = None) -> np.ndarray:
    """`batch` locality-aware orders (B, M) int64 for one schedule; `rng` as `_OfficialRNG`.

    Without `known`, M = N: a first group of 1 is one random cell (as officially); a larger first
    group, with nothing generated yet, is farthest-point sampled from a random cell. With `known`
    (N,) bool (editing), the known cells count as generated and M = N - #known.
    """
    n = grid * grid
    known = np.zeros(n, dtype=bool) if known is None else np.asarray(known, dtype=bool).reshape(n)
    n_known = int(known.sum())
    sizes = check_group_sizes(group_sizes, n - n_known)
    # Repulsion: a cell within Chebyshev distance R of a pick of the same step is rejected.
    rep = min(math.floor(repulsion), grid - 1) if repulsion >= 0 else -1
    t = _grid(grid, rep)
    rows = np.arange(batch)

    # Proximity scores on the padded grid. Official draws: float sums accumulated in pick order,
    # exactly as the official loop adds them (its float rounding decides near-ties). Otherwise:
    # the exact score from the counts of generated edge (5 per) and diagonal (1 per) neighbours.
    float_scores = isinstance(rng, _OfficialRNG)
    score = np.zeros((batch, (grid + 2) ** 2), dtype=np.float64 if float_scores else np.int8)
    flat_score, pad_base = score.reshape(-1), rows[:, None] * score.shape[1]
    selected = np.zeros((batch, n), dtype=bool)
    order = np.empty((batch, n - n_known), dtype=np.int64)

    def generated(cells: np.ndarray) -> None:
        """Mark cells (B, k) generated, in that order, and add to their neighbours' scores."""
        selected[rows[:, None], cells] = True
        at = t.pad_index[cells] + pad_base  # (B, k)
        if float_scores:  # cell by cell, in the official order of float additions
            for k in range(cells.shape[1]):
                flat_score[at[:, k, None] + t.nb_off] += t.nb_w
        else:  # one neighbour offset at a time: its targets are distinct, so += counts each
            flat_score[at] += _SELECTED
            for off, code in zip(t.nb_off, t.nb_code):
                flat_score[at + off] += code

    def commit(picks: np.ndarray, start: int) -> None:
        order[:, start:start + picks.shape[1]] = picks
        generated(picks)

    if n_known:  # context cells: generated before the first step, in raster order
        generated(np.broadcast_to(np.flatnonzero(known), (batch, n_known)))
        filled, rest = 0, sizes
    elif sizes[0] == 1:
        commit(rng.first(n)[:, None], 0)
        filled, rest = 1, sizes[1:]
    else:
        filled, rest = 0, sizes
    for g in rest:
        n_un = n - n_known - filled
        cand, n_hi = _candidates(score, selected, n_un, proximity, float_scores, rng, t)
        commit(_group_picks(cand, n_hi, g, rows, t, rng), filled)
        filled += g
    return order


def _candidates(score: np.ndarray, selected: np.ndarray, n_un: int, proximity: float, float_scores: bool,
                rng, t: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """The unselected cells sorted by score (descending), ties by a fresh random key: (B, n_un)
    cell ids, and how many of them qualify (score >= proximity threshold; they come first)."""
    keys = rng.tie_keys(~selected)  # (B, N) distinct ranks per row
    n = t.n
    if float_scores:
        value = score[:, t.pad_index]
        _, level = np.unique(np.where(selected, np.inf, -value), return_inverse=True)  # dense rank
        packed = level.reshape(value.shape) * n + keys
        n_hi = np.count_nonzero(~selected & (value >= proximity), axis=1)
    else:
        # Exact scores: code 5e + d, plus _SELECTED once generated; the sort key is rank * N + key.
        code = np.take(score, t.pad_index, axis=1)  # (B, N) int8
        small = keys.dtype == np.uint16 and (len(_AB_RANK) + 1) * n <= 2 ** 16
        rank_key = (_RANK_OF_CODE * n).astype(np.uint16 if small else np.int64)
        packed = np.take(rank_key, code, mode="wrap")  # codes lie in the table: "wrap" skips the bounds check
        packed += keys
        # Qualifying codes are the best ranks: a prefix of the sort order.
        n_hi = np.count_nonzero(packed < int((_AB_VALUE >= proximity).sum()) * n, axis=1)
    # A stable (radix, for uint16) sort of distinct keys: score level first, then the tie key.
    cand = np.argsort(packed, axis=1, kind="stable")[:, :n_un].astype(t.cell)
    return cand, n_hi


def _group_picks(cand: np.ndarray, n_hi: np.ndarray, g: int, rows: np.ndarray, t: _Grid, rng) -> np.ndarray:
    """The g cells of one step per row, (B, g) in pick order: qualifying candidates in order, each
    kept unless a pick of this step repels it; the rest farthest-point sampled from the pool
    (the other candidates: non-qualifying, then repelled, each in candidate order)."""
    batch, n_un = cand.shape
    acc, count = _proximity_pass(cand, n_hi, g, t)  # (B, J) accepted flags, (B,) picks
    picks = np.empty((batch, g), dtype=t.cell)
    j = acc.shape[1]
    if j:
        first_acc = np.argsort(~acc, axis=1, kind="stable")[:, :min(g, j)]  # accepted positions first
        picks[:, :first_acc.shape[1]] = np.take_along_axis(cand, first_acc, axis=1)
    fill = np.flatnonzero(count < g)
    if fill.size == 0:
        return picks
    cand_f, count_f, need = cand[fill], count[fill], g - count[fill]
    lo = np.arange(n_un) >= n_hi[fill, None]  # (F, n_un) non-qualifying candidates
    if g == n_un:  # the last step: the pool is what is left, taken in pool order
        cat = (~lo).astype(np.uint8)  # 0 non-qualifying, 1 repelled, 2 accepted
        cat[:, :j] += acc[fill]
        more = np.take_along_axis(cand_f, np.argsort(cat, axis=1, kind="stable")[:, :int(need.max())], axis=1)
    else:
        more = _farthest_points(cand_f, lo, need, picks[fill], count_f, rows[fill], t, rng)
    k = np.arange(g) - count_f[:, None]  # (F, g): index into `more` from each row's count on
    picks[fill] = np.where(k >= 0, np.take_along_axis(more, np.maximum(k, 0), axis=1), picks[fill])
    return picks


def _proximity_pass(cand: np.ndarray, n_hi: np.ndarray, g: int, t: _Grid) -> tuple[np.ndarray, np.ndarray]:
    """Pop the qualifying candidates of every row in order: accept one unless an accepted one of
    this step lies within the repulsion radius, until g are accepted. -> (B, J) bool, (B,) counts."""
    batch = cand.shape[0]
    j_max = int(n_hi.max(initial=0))
    pos = np.arange(j_max)
    if t.rep_off.size == 0:  # no repulsion: the first g qualifying candidates
        count = np.minimum(n_hi, g)
        return pos < count[:, None], count
    # Each row owns a padded repulsion grid plus one always-blocked sentinel cell, which stands in
    # for the candidates after its qualifying ones.
    width = t.rep_cells + 1
    blocked = np.zeros(batch * width, dtype=bool)
    blocked[t.rep_cells::width] = True
    base = (np.arange(batch) * width)[:, None]
    # window[k]: the (2R+1, 2R+1) square of `blocked` whose first cell is k (a writable view), so
    # one fancy assignment blocks the squares of all picks; rep_off[0] leads from a cell to its corner.
    side, pitch, item = math.isqrt(t.rep_off.size), math.isqrt(t.rep_cells), blocked.itemsize
    window = np.lib.stride_tricks.as_strided(blocked, shape=(blocked.size - (side - 1) * (pitch + 1), side, side),
                                             strides=(item, pitch * item, item))
    at = np.where(pos >= n_hi[:, None], base + t.rep_cells, t.rep_index[cand[:, :j_max]] + base)  # (B, J)
    at_t = np.ascontiguousarray(at.T)  # (J, B)
    acc_t = np.zeros((j_max, batch), dtype=bool)
    count = np.zeros(batch, dtype=np.int64)
    live = np.arange(batch)  # the rows still popping; compacted when half of them are done
    n_hi_live, count_live = n_hi, count.copy()
    for j in range(j_max):
        at_j = at_t[j]
        ok = ~blocked[at_j]
        ok &= count_live < g
        acc_t[j, live] = ok
        count_live += ok
        hit = at_j[ok]
        if hit.size:
            window[hit + t.rep_off[0]] = True
        if j % 8 == 7:
            going = (count_live < g) & (n_hi_live > j + 1)
            n_going = int(np.count_nonzero(going))
            if n_going * 2 <= live.size:
                count[live] = count_live
                if n_going == 0:
                    break
                live, n_hi_live, count_live, at_t = live[going], n_hi_live[going], count_live[going], at_t[:, going]
    count[live] = count_live
    return acc_t.T, count


def _farthest_points(cand: np.ndarray, lo: np.ndarray, need: np.ndarray, picks: np.ndarray, count: np.ndarray,
                     rows: np.ndarray, t: _Grid, rng) -> np.ndarray:
    """`need` (F,) more cells per row, each the pool cell farthest (Euclidean) from the step's
    picks so far, the first in pool order on ties; a row without picks starts from a random one.

    Works in candidate order `cand` (F, M): the pool is the candidates that are not picks, in
    pool order the non-qualifying ones (`lo`) first, so ties prefer `lo`, then the lower index.
    -> (F, max need) cell ids.
    """
    pr, pc = np.divmod(cand.astype(t.dist, copy=False), math.isqrt(t.n))  # (F, M) rows, columns
    far = np.iinfo(t.dist).max // 2  # above any squared distance; 2 far + 1 still fits
    min_d2 = np.full(cand.shape, far, dtype=t.dist)  # squared distance to the nearest pick
    tmp = np.empty((2,) + cand.shape, dtype=t.dist)

    def nearer(d2: np.ndarray, r: np.ndarray, c: np.ndarray, cell: np.ndarray, tmp: np.ndarray) -> None:
        """d2 = min(d2, squared distance of (r, c) to `cell` (per row)), in place."""
        a, b = tmp
        np.subtract(r, t.cell_r[cell][:, None], out=a)
        np.multiply(a, a, out=a)
        np.subtract(c, t.cell_c[cell][:, None], out=b)
        np.multiply(b, b, out=b)
        a += b
        np.minimum(d2, a, out=d2)

    has = np.flatnonzero(count > 0)
    if has.size:  # the picks of the proximity pass (missing ones repeat the row's first); picks get 0
        k_max = int(count[has].max())
        src = np.where(np.arange(k_max) < count[has, None], np.arange(k_max), 0)
        from_picks = np.take_along_axis(picks[has], src, axis=1)  # (H, K)
        every = has.size == len(rows)
        d2, r, c = (min_d2, pr, pc) if every else (min_d2[has], pr[has], pc[has])
        for k in range(k_max):
            nearer(d2, r, c, from_picks[:, k], tmp[:, :len(has)])
        if not every:
            min_d2[has] = d2
    # No picks means no qualifying candidate: the pool is `cand` in order, all of it.
    empty = np.flatnonzero(count == 0)
    start = rng.fps_start(rows[empty], np.full(empty.size, cand.shape[1])) if empty.size else None

    out = np.zeros((len(rows), int(need.max())), dtype=t.cell)
    live, need_live, lo = np.arange(len(rows)), need, lo.astype(t.dist)
    for step in range(out.shape[1]):
        idx = (min_d2 * 2 + lo).argmax(axis=1)  # ties: non-qualifying first, then the lower index
        if step == 0 and start is not None:
            idx[empty] = start
        at = np.arange(live.size)
        sel = cand[at, idx]
        out[live, step] = sel
        nearer(min_d2, pr, pc, sel, tmp[:, :live.size])
        min_d2[at, idx] = 0  # taken
        going = need_live > step + 1
        if not going.all() and np.count_nonzero(going) * 2 <= live.size:
            live, need_live = live[going], need_live[going]
            cand, pr, pc, min_d2, lo = cand[going], pr[going], pc[going], min_d2[going], lo[going]
    return out


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
                    chunk_size: int = 500) -> np.ndarray:
    """`num_orders` orders (M, N) int64; order i comes from `SeedSequence([seed, i])` whatever
    `workers` and `chunk_size` are (vectorised over a chunk, chunks spread over processes).

    500 orders a chunk: at grid 32 the per-step (B, N) arrays still fit in cache (a little less
    time per order than 1000), and the processes finish within a short chunk of each other."""
    check_group_sizes(group_sizes, grid_size * grid_size)
    jobs = [(list(group_sizes), grid_size, seed, a, min(a + chunk_size, num_orders), proximity_threshold,
             repulsion_threshold) for a in range(0, num_orders, chunk_size)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(j) for j in jobs]
    return np.concatenate(parts) if parts else np.zeros((0, grid_size * grid_size), dtype=np.int64)

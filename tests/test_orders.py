"""The shared schedule module (`decoding/orders.py`): the flags live in the sampling driver once, group
sizes resolve the same way for every strategy, orders are drawn per image (or per batch from a
torch.Generator) for every `--order`, and order files are validated."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from autoregressive.sample.common import add_sampling_args
from autoregressive.decoding.lpd_order import GROUP_SIZES_LOOKUP, generate_orders, orders_for_seeds
from autoregressive.decoding.orders import Schedule, resolve_group_sizes, save_orders
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.decoding.schedules import group_sizes
from autoregressive.strategies import add_strategy_arguments, get_strategy

SHARED = ("--order", "--sample-schedule", "--group-schedule", "--group-sizes", "--proximity-threshold",
          "--repulsion-threshold", "--cfg-schedule")
CPU = torch.device("cpu")


def sampling_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    return p


def test_the_schedule_flags_are_the_drivers_not_a_strategys():
    strategies_only = argparse.ArgumentParser()
    add_strategy_arguments(strategies_only)
    assert not set(SHARED) & set(strategies_only._option_string_actions)
    p = sampling_parser()
    assert set(SHARED) <= set(p._option_string_actions)
    base = ["--gpt-ckpt", "g.pt", "--vq-ckpt", "v.pt", "--image-size", "256"]
    args = p.parse_args(base + ["--strategy", "arpg", "--order", "lpd", "--step", "20", "--cfg-schedule", "constant"])
    arpg = get_strategy("arpg")
    arpg.configure(args, training=False)
    assert (arpg.schedule.order, arpg.schedule.step_schedule, arpg.cfg_schedule) == ("lpd", "arccos", "constant")
    lpd = get_strategy("lpd")
    lpd.configure(p.parse_args(base + ["--strategy", "lpd", "--order", "random", "--steps", "32"]), training=False)
    assert lpd.schedule.order == "random" and lpd.schedule_sizes(256, 32) == GROUP_SIZES_LOOKUP[16][32]
    lpd.configure(p.parse_args(base + ["--strategy", "lpd", "--group-schedule", "arccos", "--steps", "7"]), training=False)
    assert lpd.schedule_sizes(256, 7) == group_sizes("arccos", 256, 7)  # the alias of --sample-schedule


def test_group_sizes_resolve_the_same_way_for_every_schedule():
    assert resolve_group_sizes(256, 64, "arccos") == group_sizes("arccos", 256, 64)
    assert resolve_group_sizes(256, 20, "lpd") == GROUP_SIZES_LOOKUP[16][20]
    assert resolve_group_sizes(64, 64, "lpd") == [1] * 64  # one per step needs no table
    assert resolve_group_sizes(40, 6, "lpd", grid_tokens=256) == group_sizes("cosine", 40, 6)  # editing
    with pytest.raises(ValueError, match="no group sizes for 7 steps over 64 tokens"):
        resolve_group_sizes(64, 7, "lpd")
    with pytest.raises(ValueError, match="--step 65 is larger than the number of tokens"):
        resolve_group_sizes(64, 65, "cosine")
    s = Schedule(group_sizes=[1, 2, 3])
    assert s.sizes(6, None, 64) == [1, 2, 3]
    with pytest.raises(ValueError, match="--steps 2 contradicts --group-sizes"):
        s.sizes(6, 2, 64)
    with pytest.raises(ValueError, match="sum to 6, but the grid has 7 tokens"):
        s.sizes(7, None, 64)
    with pytest.raises(ValueError, match="unknown --sample-schedule 'linear'"):
        Schedule(step_schedule="linear")


def test_orders_per_image_or_per_batch():
    sizes = GROUP_SIZES_LOOKUP[16][20]
    seeds = torch.tensor([3, 9, 4])
    assert torch.equal(Schedule(order="raster").orders(3, sizes, None, CPU), torch.arange(256))
    with pytest.raises(ValueError, match="random order: pass a generator"):
        Schedule(order="random").orders(3, sizes, None, CPU)
    # random: the official ARPG draw from a torch.Generator, one per image from a RowRNG
    shared = Schedule(order="random").orders(3, sizes, torch.Generator().manual_seed(0), CPU)
    assert torch.equal(shared, torch.rand(256, generator=torch.Generator().manual_seed(0)).argsort())
    for order in ("random", "lpd"):
        both = Schedule(order=order).orders(3, sizes, RowRNG(seeds), CPU)  # (3, 256)
        alone = Schedule(order=order).orders(1, sizes, RowRNG(seeds[1:2]), CPU)  # image 1 on its own
        assert both.shape == (3, 256) and torch.equal(both[1], alone[0]) and not torch.equal(both[0], both[2])
    # lpd: the generator seeded from the image's stream, at LPD's official repulsion for 16x16 / 20 steps
    u = RowRNG(seeds).uniform((1,))[:, 0]
    expect = orders_for_seeds(sizes, 16, (u * 2.0 ** 53).long().tolist(), repulsion_threshold=2.0)
    assert np.array_equal(Schedule(order="lpd").orders(3, sizes, RowRNG(seeds), CPU).numpy(), expect)
    assert Schedule(order="lpd").orders(3, sizes, torch.Generator().manual_seed(1), CPU).shape == (256,)


def test_order_files_give_rows_and_their_sizes(tmp_path):
    sizes = group_sizes("cosine", 16, 5)
    table = generate_orders(sizes, 4, 5, seed=2)
    save_orders(tmp_path / "o.json", table, 4, sizes, seed=2)
    s = Schedule(order=str(tmp_path / "o.json"))
    assert s.sizes(16, None, 64) == sizes  # the file's sizes without --steps
    with pytest.raises(ValueError, match="generated for group sizes .* leave out --steps"):
        s.sizes(16, 4, 64)
    rows = s.orders(4, sizes, RowRNG(torch.arange(4)), CPU).numpy()
    assert all(any(np.array_equal(r, t) for t in table) for r in rows)
    known = torch.zeros(16, dtype=torch.bool)
    known[:6] = True  # editing: the unknown cells, in the row's relative order
    edit = s.orders(4, [10], RowRNG(torch.arange(4)), CPU, known=known).numpy()
    assert np.array_equal(edit, np.stack([r[r >= 6] for r in rows]))
    # the same file checks on every strategy: ARPG refuses a file of another grid like LPD does
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"grid_size": 4, "orders": table.tolist()}))
    args = sampling_parser().parse_args(["--gpt-ckpt", "g", "--vq-ckpt", "v", "--image-size", "128", "--strategy",
                                         "arpg", "--order", str(bad)])
    with pytest.raises(ValueError, match="4x4 grid, but the model's grid is 8x8"):
        get_strategy("arpg").configure(args, training=False)

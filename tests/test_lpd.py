"""LPD beyond parity: the locality-aware orders obey their rules on the grid, KV-cached group decoding
equals a full recompute (also when editing), training under 2-process torchrun learns, and bad input
(order files, group sizes, unresolvable --steps) is refused clearly."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from autoregressive.models.lpd import LPD, LPDConfig
from autoregressive.decoding.lpd_order import GROUP_SIZES_LOOKUP, generate_orders, orders_for_seeds, training_group_sizes
from autoregressive.decoding.orders import Schedule, load_orders, save_orders
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.decoding.schedules import group_sizes
from autoregressive.strategies import get_strategy
from autoregressive.strategies.lpd import LpdStrategy, decode_lpd
from tests.test_train_c2i import losses, run, train_cmd, write_codes

# ---------------------------------------------------------------------------------------------
# Orders: checked on the grid, not by re-running the generator
# ---------------------------------------------------------------------------------------------


def cosine(num_tokens: int, steps: int) -> list[int]:
    return group_sizes("cosine", num_tokens, steps)


def proximity_scores(done: np.ndarray, grid: int) -> np.ndarray:
    """(N,) sum of 1/distance over generated 8-neighbours, from a (N,) generated mask."""
    g = done.reshape(grid, grid).astype(float)
    pad = np.pad(g, 1)
    s = np.zeros_like(g)
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            if dr or dc:
                s += pad[1 + dr:1 + dr + grid, 1 + dc:1 + dc + grid] / np.hypot(dr, dc)
    return s.reshape(-1)


def check_order_rules(order: np.ndarray, sizes: list[int], grid: int, prox: float, rep: float) -> None:
    """A permutation in groups of `sizes`; inside each group, the leading run of qualifying cells
    (score >= prox) that repel each other comes first, and a non-qualifying cell is taken only
    when every other qualifying cell is repelled by that run."""
    n = grid * grid
    assert sorted(order.tolist()) == list(range(n))
    r, c = np.divmod(order, grid)
    done = np.zeros(n, dtype=bool)
    start = 0
    for g in sizes:
        group = order[start:start + g]
        score = proximity_scores(done, grid)
        hi = (score >= prox - 1e-9) & ~done
        lead = []
        for cell in group:  # the proximity picks come first, pairwise farther apart than rep
            far = all(max(abs(cell // grid - p // grid), abs(cell % grid - p % grid)) > rep for p in lead)
            if not (hi[cell] and far):
                break
            lead.append(cell)
        if start > 0 and len(lead) < g:  # the rest was filled: every other qualifying cell was repelled
            others = np.flatnonzero(hi & ~np.isin(np.arange(n), lead))
            for cell in others:
                assert any(max(abs(cell // grid - p // grid), abs(cell % grid - p % grid)) <= rep for p in lead), \
                    f"qualifying cell {cell} skipped although no pick of its group repels it"
        if start > 0:
            assert len(lead) >= 1 or not hi.any(), "a group ignored every qualifying cell"
        done[group] = True
        start += g
    assert start == n and (r >= 0).all() and (c < grid).all()


@pytest.mark.parametrize("grid,sizes,prox,rep", [
    (16, GROUP_SIZES_LOOKUP[16][20], 1.0, 2.0),
    (8, cosine(64, 8), 1.0, 1.0),
    (8, cosine(64, 12), 1.5, 0.0),
])
def test_orders_respect_groups_proximity_and_repulsion(grid, sizes, prox, rep):
    orders = orders_for_seeds(sizes, grid, range(12), proximity_threshold=prox, repulsion_threshold=rep)
    assert orders.shape == (12, grid * grid)
    for o in orders:
        check_order_rules(o, sizes, grid, prox, rep)
    assert len({tuple(o) for o in orders}) == 12  # the seeds differ, so do the orders


def test_order_rule_check_can_fail():
    """The checker rejects a raster order (no repulsion) and a non-permutation."""
    sizes = cosine(64, 8)
    with pytest.raises(AssertionError):
        check_order_rules(np.arange(64), sizes, 8, 1.0, 1.0)
    with pytest.raises(AssertionError):
        check_order_rules(np.zeros(64, dtype=np.int64), sizes, 8, 1.0, 1.0)


def test_a_first_group_of_several_cells_is_farthest_point_sampled():
    """With nothing generated, no cell qualifies: the first group starts at a random cell and each
    next cell is the farthest from those already picked."""
    orders = orders_for_seeds([3] + [1] * 61, 8, range(6))
    r, c = np.divmod(np.arange(64), 8)
    for o in orders:
        assert sorted(o.tolist()) == list(range(64))
        d2 = np.stack([(r - r[p]) ** 2 + (c - c[p]) ** 2 for p in o[:3]])  # (3, N)
        assert d2[0, o[1]] == d2[0].max()
        assert d2[:2, o[2]].min() == d2[:2].min(0).max()
    assert len({int(o[0]) for o in orders}) > 1


def test_generated_orders_are_reproducible_whatever_the_batching(tmp_path):
    sizes = GROUP_SIZES_LOOKUP[16][32]
    a = generate_orders(sizes, 16, 30, seed=5, repulsion_threshold=2.0, chunk_size=30)
    b = generate_orders(sizes, 16, 30, seed=5, repulsion_threshold=2.0, chunk_size=7, workers=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, generate_orders(sizes, 16, 30, seed=6, repulsion_threshold=2.0))
    save_orders(tmp_path / "o.json", a, 16, sizes, seed=5)
    back, back_sizes = load_orders(tmp_path / "o.json", 16)
    assert np.array_equal(back, a) and back_sizes == sizes


@pytest.mark.parametrize("rows,cells", [(1, 1), (3, 256), (1025, 64), (2, 1024)])
def test_order_files_are_exactly_compact_json(tmp_path, rows, cells):
    # save_orders formats the rows itself (in blocks of 1024 rows): the bytes must be json.dumps's.
    rng = np.random.default_rng(rows)
    orders = np.stack([rng.permutation(cells) for _ in range(rows)]).astype(np.int16)
    settings = dict(proximity_threshold=1.0, repulsion_threshold=4.0, seed=3)
    save_orders(tmp_path / "o.json", orders, 16, [cells], **settings)
    doc = {"grid_size": 16, "group_sizes": [cells], **settings, "orders": orders.tolist()}
    assert (tmp_path / "o.json").read_text() == json.dumps(doc, separators=(",", ":"))
    with pytest.raises(ValueError, match="non-negative integers"):
        save_orders(tmp_path / "bad.json", -orders - 1, 16, [cells])


def test_editing_orders_grow_from_the_known_cells():
    known = np.zeros(64, dtype=bool)
    known[:24] = True  # the top three rows are given
    sizes = cosine(40, 6)
    orders = orders_for_seeds(sizes, 8, range(4), known=known)
    for o in orders:
        assert sorted(o.tolist()) == list(range(24, 64))
        assert (o[:sizes[0]] // 8 == 3).all()  # the first group touches the known rows


def test_tables_and_training_lists():
    for grid, table in GROUP_SIZES_LOOKUP.items():
        for steps, sizes in table.items():
            assert len(sizes) == steps and sum(sizes) == grid * grid and sizes[0] == 1
    assert len(training_group_sizes(16)) == 9 and len(training_group_sizes(32)) == 14
    assert training_group_sizes(8) == [cosine(64, s) for s in (64, 32, 16, 8, 4)]


# ---------------------------------------------------------------------------------------------
# KV-cached group decoding == full recompute
# ---------------------------------------------------------------------------------------------


def tiny_model(seed: int = 0) -> LPD:
    torch.manual_seed(seed)
    model = LPD(LPDConfig(dim=32, n_layer=2, n_head=4, num_classes=5, vocab_size=24, block_size=36,
                          attn_dropout=0.0, proj_dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_kv_cached_decoding_equals_full_recompute(cfg):
    model = tiny_model()
    sizes = [1, 2, 4, 8, 9, 12]
    orders = torch.stack([torch.randperm(36, generator=torch.Generator().manual_seed(s)) for s in range(3)])
    labels = torch.tensor([0, 3, 4])
    head: list[torch.Tensor] = []
    tokens = decode_lpd(model, labels, orders, sizes, cfg_scale=cfg, temperature=1.0,
                        generator=RowRNG(torch.arange(3) + 11), record_head=head)
    cached = torch.cat(head, dim=1)  # (B', N, V) in order-index order
    with torch.no_grad():
        full, _ = model(tokens, labels, orders, sizes)  # every group from the sampled tokens, no cache
        assert torch.allclose(cached[:3], full, atol=1e-5, rtol=1e-5)
        if cfg > 1:
            null, _ = model(tokens, labels, orders, sizes, drop=torch.ones(3, dtype=torch.bool))
            assert torch.allclose(cached[3:], null, atol=1e-5, rtol=1e-5)


def test_editing_keeps_known_tokens_and_equals_full_recompute():
    model = tiny_model(1)
    strategy = LpdStrategy()
    known_mask = torch.zeros(36, dtype=torch.bool)
    known_mask[:12] = True
    known_tokens = torch.randint(24, (2, 36), generator=torch.Generator().manual_seed(0))
    head: list[torch.Tensor] = []
    strategy_orders = strategy.schedule.orders(2, cosine(24, 4), RowRNG(torch.tensor([1, 2])), torch.device("cpu"),
                                               known=known_mask)
    sizes = cosine(24, 4)
    tokens = decode_lpd(model, torch.tensor([1, 2]), strategy_orders, sizes, known_tokens=known_tokens,
                        known_mask=known_mask, temperature=0.0, record_head=head)
    assert torch.equal(tokens[:, :12], known_tokens[:, :12]) and (tokens >= 0).all()
    full_order = torch.cat([torch.arange(12).expand(2, -1), strategy_orders], dim=1)
    with torch.no_grad():
        full, _ = model(tokens, torch.tensor([1, 2]), full_order, [12] + sizes)
    assert torch.allclose(torch.cat(head, dim=1), full[:, 12:], atol=1e-5, rtol=1e-5)
    out = strategy.edit(model, torch.tensor([1, 2]), known_tokens, known_mask, temperature=1.0,
                        generator=RowRNG(torch.tensor([3, 4])))
    assert torch.equal(out[:, :12], known_tokens[:, :12])


def test_generate_every_order_and_schedule():
    model = tiny_model(2)
    strategy = LpdStrategy()
    for order in ("lpd", "random", "raster"):
        strategy.schedule = Schedule(order=order, step_schedule="cosine")
        for steps in (6, 36):
            out = strategy.generate(model, torch.tensor([0, 1]), cfg_scale=2.0, steps=steps,
                                    generator=RowRNG(torch.tensor([5, 6])))
            again = strategy.generate(model, torch.tensor([0, 1]), cfg_scale=2.0, steps=steps,
                                      generator=RowRNG(torch.tensor([5, 6])))
            assert out.shape == (2, 36) and torch.equal(out, again) and (out >= 0).all()


@pytest.mark.parametrize("order,cfg", [("random", 1.0), ("random", 3.0), ("raster", 2.0)])
def test_other_orders_decode_as_a_full_recompute(order, cfg):
    """LPD with ARPG's random orders (one per image) or raster: the KV-cached steps equal one
    teacher-forced forward over the sampled tokens in that order."""
    model = tiny_model(3)
    strategy = LpdStrategy()
    strategy.schedule = Schedule(order=order, step_schedule="arccos")
    strategy.cfg_schedule = "constant"
    labels, seeds = torch.tensor([0, 4]), torch.tensor([7, 8])
    rec: list[torch.Tensor] = []
    tokens = strategy.generate(model, labels, cfg_scale=cfg, steps=5, temperature=1.0, generator=RowRNG(seeds),
                               record_logits=rec)
    sizes = strategy.schedule_sizes(36, 5)
    orders = strategy.schedule.orders(2, sizes, RowRNG(seeds), torch.device("cpu")).expand(2, -1)  # the same draw
    assert sizes[0] > 1 and [sorted(o.tolist()) for o in orders] == [list(range(36))] * 2
    with torch.no_grad():
        full, _ = model(tokens, labels, orders, sizes)
        if cfg > 1:
            null, _ = model(tokens, labels, orders, sizes, drop=torch.ones(2, dtype=torch.bool))
            full = null + (full - null) * cfg
    assert torch.allclose(torch.cat(rec, dim=1), full, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def sampling_args(**kw) -> argparse.Namespace:
    base = dict(image_size=256, downsample_size=16, steps=20, order="lpd", group_sizes=None, sample_schedule=None,
                proximity_threshold=1.0, repulsion_threshold=None, group_sizes_list=None, cfg_schedule="linear",
                cfg_interval=-1)
    return argparse.Namespace(**{**base, **kw})


def test_bad_order_files_are_refused(tmp_path):
    good = generate_orders(GROUP_SIZES_LOOKUP[16][20], 16, 3, seed=0)
    save_orders(tmp_path / "g8.json", generate_orders(cosine(64, 8), 8, 2), 8, cosine(64, 8))
    with pytest.raises(ValueError, match="8x8 grid, but the model's grid is 16x16"):
        LpdStrategy().configure(sampling_args(order=str(tmp_path / "g8.json")), training=False)
    (tmp_path / "short.json").write_text(json.dumps([list(range(10))]))
    with pytest.raises(ValueError, match="orders of length 10, but the 16x16 grid has 256 tokens"):
        LpdStrategy().configure(sampling_args(order=str(tmp_path / "short.json")), training=False)
    bad = good.copy()
    bad[1, 0] = bad[1, 1]
    (tmp_path / "dup.json").write_text(json.dumps(bad.tolist()))
    with pytest.raises(ValueError, match="order 1 is not a permutation"):
        LpdStrategy().configure(sampling_args(order=str(tmp_path / "dup.json")), training=False)
    (tmp_path / "sizes.json").write_text(json.dumps({"grid_size": 16, "group_sizes": [1, 2, 3], "orders": good.tolist()}))
    with pytest.raises(ValueError, match="sum to 6, but the grid has 256 tokens"):
        LpdStrategy().configure(sampling_args(order=str(tmp_path / "sizes.json")), training=False)
    save_orders(tmp_path / "s32.json", good, 16, GROUP_SIZES_LOOKUP[16][32])
    with pytest.raises(ValueError, match="generated for group sizes"):
        LpdStrategy().configure(sampling_args(order=str(tmp_path / "s32.json")), training=False)
    with pytest.raises(ValueError, match="neither"):
        LpdStrategy().configure(sampling_args(order=str(tmp_path / "missing.json")), training=False)
    (tmp_path / "ok.json").write_text(json.dumps(good.tolist()))  # the official bare list
    LpdStrategy().configure(sampling_args(order=str(tmp_path / "ok.json")), training=False)


def test_bad_group_sizes_and_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="sum to 255, but the grid has 256 tokens"):
        LpdStrategy().configure(sampling_args(group_sizes=json.dumps([1] * 255), steps=None), training=False)
    with pytest.raises(ValueError, match="positive integers"):
        LpdStrategy().configure(sampling_args(group_sizes=json.dumps([0, 256]), steps=None), training=False)
    (tmp_path / "list.json").write_text(json.dumps([[1, 2, 3]]))
    with pytest.raises(ValueError, match="--group-sizes-list"):
        LpdStrategy().configure(sampling_args(group_sizes_list=str(tmp_path / "list.json"), class_dropout_prob=0.1),
                                training=True)
    with pytest.raises(ValueError, match="no group sizes for 7 steps over 256 tokens.*--sample-schedule cosine"):
        LpdStrategy().configure(sampling_args(steps=7), training=False)
    with pytest.raises(ValueError, match="no group sizes for 5 steps over 64 tokens"):
        LpdStrategy().configure(sampling_args(image_size=128, steps=5), training=False)
    ok = LpdStrategy()
    ok.configure(sampling_args(image_size=128, steps=5, sample_schedule="cosine"), training=False)
    assert ok.schedule_sizes(64, 5) == cosine(64, 5)
    with pytest.raises(ValueError, match="must be a JSON list of integers"):
        LpdStrategy().configure(sampling_args(group_sizes="[1, 2"), training=False)
    with pytest.raises(ValueError, match="--steps 4 contradicts --group-sizes"):
        LpdStrategy().configure(sampling_args(group_sizes=json.dumps([1] * 256), steps=4), training=False)


def test_edit_command_with_an_lpd_model(tmp_path, monkeypatch):
    """`edit.py --strategy lpd` in-paints and out-paints with the shared schedule flags; the kept
    tokens stay (checked on the strategy call the command makes)."""
    from PIL import Image

    from autoregressive.models.lpd import build_lpd
    from autoregressive.sample import edit
    from tests.extract_helpers import make_vq_ckpt
    from utils.checkpoint import save_checkpoint

    vq = make_vq_ckpt(tmp_path / "vq.pt")  # VQ-debug, 64 codes, downsampling 4: 32 px -> 8 x 8 tokens
    torch.manual_seed(0)
    gpt = save_checkpoint({"model": build_lpd("LPD-debug", vocab_size=64, block_size=64, num_classes=10).state_dict(),
                           "args": {"strategy": "lpd", "gpt_model": "LPD-debug"}}, tmp_path / "lpd.pt")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    base = ["--strategy", "lpd", "--gpt-ckpt", str(gpt), "--vq-model", "VQ-debug", "--vq-ckpt", str(vq),
            "--codebook-size", "64", "--image-size", "32", "--downsample-size", "4", "--num-classes", "10",
            "--image", str(tmp_path / "in.png"), "--class-id", "3", "--num-samples", "2", "--device", "cpu",
            "--out", str(tmp_path / "out.png")]
    calls = []
    edit_fn = LpdStrategy.edit

    def spy(self, model, labels, known_tokens, known_mask, **kw):
        out = edit_fn(self, model, labels, known_tokens, known_mask, **kw)
        calls.append((known_tokens, known_mask, out, self.schedule.order))
        return out

    monkeypatch.setattr(LpdStrategy, "edit", spy)
    parser = edit.build_parser()
    out = edit.main(parser.parse_args(base + ["--box", "8,8,20,24", "--step", "4"]))  # 12 of 64 tokens
    edit.main(parser.parse_args(base + ["--outpaint-border", "1", "--order", "random"]))
    assert Image.open(out).size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # input, masked input, 2 results
    assert [c[3] for c in calls] == ["lpd", "random"]
    for known_tokens, known_mask, tokens, _ in calls:
        assert torch.equal(tokens[:, known_mask], known_tokens[:, known_mask]) and (tokens >= 0).all()
    assert int((~calls[0][1]).sum()) == 12 and int((~calls[1][1]).sum()) == 28


# ---------------------------------------------------------------------------------------------
# Training through the shared driver
# ---------------------------------------------------------------------------------------------


def test_two_ranks_learn(tmp_path):
    codes = write_codes(tmp_path / "codes")
    res = run(train_cmd(codes, tmp_path / "results", "--strategy", "lpd", "--gpt-model", "LPD-debug",
                        "--epochs", "4", "--log-every", "3", "--ckpt-every", "100", nproc=2))
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(res.stderr)
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.5, curve
    model = get_strategy("lpd").load_model(next((tmp_path / "results").iterdir()) / "checkpoints" / "0000024.pt",
                                           vocab_size=64, block_size=16, num_classes=10)
    assert isinstance(model, LPD) and model.config.dim == 128

"""LPD's orders off the critical path: built on the host ahead of their batch, and the same tokens.

`Strategy.prepare` builds a batch's host-side set-up (LPD: its locality-aware orders) before its
`generate` call; the DDP sampler runs it for batch b + 1 in a worker thread while batch b decodes
(`autoregressive/sample/common.py:prefetch`). The prepared orders are exactly those `generate` would
build (same tokens; prepared orders of other streams are refused), and the overlap is checked with
a spy: each `generate` call waits until the next batch's orders are built, which only a concurrent
prefetch can do (the waits time out, as a guard against a hang, only when it is missing).
"""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from autoregressive.decoding import orders as orders_module
from autoregressive.decoding.orders import PreparedOrders
from autoregressive.decoding.row_rng import RowRNG, image_seeds
from autoregressive.sample.common import prefetch
from autoregressive.strategies import parse_driver_args
from autoregressive.strategies.lpd import LpdStrategy
from tests.test_fast_decode import fixture_model

GUARD_S = 120  # a missing prefetch would hang the spies below; they give up after this long


def batch(b: int = 3, call: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.arange(b) * 3 + call) % 10, image_seeds(call, torch.arange(b))


def test_prepared_orders_give_the_tokens_generate_builds_itself(monkeypatch):
    strategy, model, _ = fixture_model("lpd")
    labels, seeds = batch()
    kw = dict(cfg_scale=2.0, temperature=1.0, top_k=20)
    want = strategy.generate(model, labels, generator=RowRNG(seeds), **kw)
    prepared = strategy.prepare(model, labels, seeds)
    assert isinstance(prepared, PreparedOrders) and prepared.orders.shape == (3, model.config.block_size)
    sizes = strategy.schedule_sizes(model.config.block_size, None)
    assert torch.equal(prepared.orders, strategy.schedule.orders(3, sizes, RowRNG(seeds), torch.device("cpu")))

    def no_host_orders(*a, **k):
        raise AssertionError("the orders were built again inside generate")

    monkeypatch.setattr(orders_module, "orders_for_seeds", no_host_orders)
    assert torch.equal(strategy.generate(model, labels, generator=RowRNG(seeds), prepared=prepared, **kw), want)
    assert torch.equal(strategy.generate(model, labels, generator=RowRNG(seeds), prepared=prepared, **kw), want)
    with pytest.raises(ValueError, match="other per-image streams"):
        strategy.generate(model, labels, generator=RowRNG(seeds + 1), prepared=prepared, **kw)
    with pytest.raises(ValueError, match="cannot serve 2 images"):
        strategy.generate(model, labels[:2], generator=RowRNG(seeds[:2]), prepared=prepared, **kw)


def test_other_orders_and_strategies_prepare_nothing():
    strategy, model, _ = fixture_model("lpd")
    strategy.schedule.order = "random"
    assert strategy.prepare(model, *batch()) is None
    raster, gpt, _ = fixture_model("raster")
    assert raster.prepare(gpt, *batch()) is None


def test_prefetch_prepares_the_next_item_while_the_caller_works_on_this_one():
    done: list[int] = []
    ready = threading.Condition()

    def prepare(item: int) -> str:
        with ready:
            done.append(item)
            ready.notify_all()
        return f"prepared {item} in {threading.current_thread().name}"

    items = [5, 6, 7]
    for k, (item, prepared) in enumerate(prefetch(items, prepare)):
        assert item == items[k] and prepared.startswith(f"prepared {item} in prepare")
        with ready:  # the caller's work on item k: the next item is prepared meanwhile
            assert ready.wait_for(lambda: len(done) >= min(k + 2, len(items)), timeout=GUARD_S)
    assert done == items and list(prefetch([], prepare)) == []

    def failing(item: int) -> int:
        if item == 6:
            raise RuntimeError("bad item 6")
        return item

    got = prefetch(items, failing)
    assert next(got) == (5, 5)
    with pytest.raises(RuntimeError, match="bad item 6"):
        next(got)


@pytest.fixture(scope="module")
def lpd_ckpts(tmp_path_factory):
    from autoregressive.models.lpd import build_lpd
    from tests.extract_helpers import make_vq_ckpt
    from utils.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("lpd_ckpts")
    make_vq_ckpt(d / "vq.pt")  # VQ-debug, 64 codes, downsampling 4: 32 px -> 8 x 8 tokens
    torch.manual_seed(0)
    gpt = build_lpd("LPD-debug", vocab_size=64, block_size=64, num_classes=10)
    for p in gpt.parameters():  # informative logits
        torch.nn.init.normal_(p, std=0.3)
    save_checkpoint({"model": gpt.state_dict(), "args": {"strategy": "lpd", "gpt_model": "LPD-debug"}}, d / "gpt.pt")
    return d


def sample_lpd(ckpts, folder):
    from autoregressive.sample import sample_c2i_ddp

    argv = ["--strategy", "lpd", "--gpt-ckpt", str(ckpts / "gpt.pt"), "--vq-ckpt", str(ckpts / "vq.pt"),
            "--vq-model", "VQ-debug", "--codebook-size", "64", "--image-size", "32", "--image-size-eval", "32",
            "--downsample-size", "4", "--num-classes", "10", "--steps", "8", "--sample-schedule", "cosine",
            "--cfg-scale", "2.0", "--num-fid-samples", "10", "--per-proc-batch-size", "4", "--device", "cpu",
            "--sample-dir", str(folder)]
    return sample_c2i_ddp.main(*parse_driver_args(sample_c2i_ddp.build_parser(), argv))


def test_ddp_sampler_builds_the_next_batch_orders_while_a_batch_decodes(lpd_ckpts, tmp_path, monkeypatch):
    """Three batches: each `generate` call gets its prepared orders and waits for the next batch's;
    the images equal a run whose `generate` builds its own orders."""
    prepare, generate = LpdStrategy.prepare, LpdStrategy.generate
    prepared_for: list[int] = []  # the first seed of each batch whose orders were built
    calls: list[dict] = []
    ready = threading.Condition()

    def prepare_spy(self, model, labels, seeds, **kw):
        out = prepare(self, model, labels, seeds, **kw)
        with ready:
            prepared_for.append(int(seeds[0]))
            ready.notify_all()
        return out

    def generate_spy(self, model, labels, **kw):
        k = len(calls)
        calls.append(kw)
        with ready:
            assert ready.wait_for(lambda: len(prepared_for) >= min(k + 2, 3), timeout=GUARD_S), \
                f"batch {k + 1}'s orders were not built while batch {k} decoded"
        return generate(self, model, labels, **kw)

    monkeypatch.setattr(LpdStrategy, "prepare", prepare_spy)
    monkeypatch.setattr(LpdStrategy, "generate", generate_spy)
    ahead = sample_lpd(lpd_ckpts, tmp_path / "ahead")
    assert len(calls) == 3 and all(isinstance(kw.get("prepared"), PreparedOrders) for kw in calls)
    assert prepared_for == [int(s) for s in image_seeds(0, torch.arange(0, 10, 4))]

    monkeypatch.setattr(LpdStrategy, "prepare", lambda self, *a, **k: None)  # generate builds them
    monkeypatch.setattr(LpdStrategy, "generate", generate)
    inline = sample_lpd(lpd_ckpts, tmp_path / "inline")
    with np.load(ahead) as a, np.load(inline) as b:
        assert a["arr_0"].shape == (10, 32, 32, 3) and np.array_equal(a["arr_0"], b["arr_0"])

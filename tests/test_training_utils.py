"""Shared training utilities: weight-decay groups, non-finite guard, resumable data order, run folders."""
import pytest
import torch

from utils.training import (NonFiniteGuard, NonFiniteLossError, ResumableDistributedSampler, autocast_context,
                            last_checkpoint, make_adamw, new_run_dir)


def test_decay_groups_follow_ndim():
    model = torch.nn.Sequential(torch.nn.Embedding(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    opt = make_adamw(model, lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.05 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 3  # norm w, norm b, linear b


def test_guard_skips_counts_and_stops():
    g = NonFiniteGuard(max_consecutive=3)
    assert g.check(torch.tensor(1.0), 0)
    assert not g.check(torch.tensor(float("nan")), 1)
    assert not g.check(torch.tensor(float("inf")), 2)
    assert g.check(torch.tensor(0.5), 3) and g.total == 2 and g.consecutive == 0
    g.check(torch.tensor(float("nan")), 4)
    g.check(torch.tensor(float("nan")), 5)
    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        g.check(torch.tensor(float("nan")), 6)


def test_sampler_resumes_mid_epoch_and_splits_ranks():
    full = ResumableDistributedSampler(23, rank=0, world_size=1, batch_size=4, seed=5)
    full.set_epoch(2)
    order = list(full)
    assert len(order) == 20 and len(set(order)) == 20
    resumed = ResumableDistributedSampler(23, rank=0, world_size=1, batch_size=4, seed=5)
    resumed.set_epoch(2, start_batch=3)
    assert list(resumed) == order[12:]
    r0 = ResumableDistributedSampler(23, rank=0, world_size=2, batch_size=4, seed=5)
    r1 = ResumableDistributedSampler(23, rank=1, world_size=2, batch_size=4, seed=5)
    r0.set_epoch(1), r1.set_epoch(1)
    assert not set(r0) & set(r1) and len(list(r0)) == 8
    with pytest.raises(ValueError, match="do not fill one batch"):
        ResumableDistributedSampler(3, 0, 1, batch_size=4)


def test_autocast_is_a_no_op_on_cpu_and_rejects_unknown():
    with autocast_context(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="unknown --mixed-precision"):
        autocast_context(torch.device("cpu"), "fp8")


def test_run_dirs_and_last_checkpoint(tmp_path):
    a = new_run_dir(tmp_path, "GPT-B")
    b = new_run_dir(tmp_path, "GPT-B")
    assert a.name == "000-GPT-B" and b.name == "001-GPT-B"
    assert last_checkpoint(a) is None
    (a / "checkpoints").mkdir()
    for s in (5, 10):
        (a / "checkpoints" / f"{s:07d}.pt").write_bytes(b"x")
    (a / "checkpoints" / ".0000015.pt.abc.tmp").write_bytes(b"half")
    assert last_checkpoint(a).name == "0000010.pt"


def test_scheduled_lr_follows_the_official_recipes():
    import math

    from utils.training import scheduled_lr

    # ARPG: warm-up over 100 epochs, then half-cosine from lr to min_lr at `epochs` (ARPG's `train_c2i.py`).
    arpg = dict(base_lr=4e-4, schedule="cosine", warmup_epochs=100, min_lr=1e-5, epochs=400)
    assert scheduled_lr(0, 10, **arpg) == 0.0
    assert math.isclose(scheduled_lr(500, 10, **arpg), 2e-4)  # epoch 50
    assert math.isclose(scheduled_lr(1000, 10, **arpg), 4e-4)  # end of the warm-up
    assert math.isclose(scheduled_lr(2500, 10, **arpg), 1e-5 + (4e-4 - 1e-5) * 0.5)  # half-way down
    assert math.isclose(scheduled_lr(4000, 10, **arpg), 1e-5)
    # LPD: warm-up 50, constant until epoch 400, cosine to min_lr at 450.
    lpd = dict(base_lr=1e-4, schedule="constant+cosine", warmup_epochs=50, min_lr=1e-5, epochs=450,
               decay_start_epoch=400)
    assert math.isclose(scheduled_lr(3000, 10, **lpd), 1e-4)
    assert math.isclose(scheduled_lr(4250, 10, **lpd), 1e-5 + 9e-5 * 0.5)
    # LlamaGen: constant.
    assert scheduled_lr(123, 10, 1e-4) == 1e-4
    with pytest.raises(ValueError, match="unknown --lr-schedule"):
        scheduled_lr(0, 10, 1e-4, "linear")

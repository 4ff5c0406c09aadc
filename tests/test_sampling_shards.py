"""Strategy-independent sampling pieces: label plan, per-image seeds and streams, uint8, shards."""
import numpy as np
import pytest
import torch

from autoregressive.decoding.row_rng import RowRNG, image_seeds
from autoregressive.sample.common import sample_plan
from utils.shards import SettingsMismatch, claim_shard_folder, finished_shards, pack_npz, to_uint8, write_shard


def test_plan_is_balanced_and_seeds_are_distinct():
    labels, seeds = sample_plan(num_classes=10, per_class=50, global_seed=0)
    assert torch.bincount(labels).tolist() == [50] * 10
    assert len(set(seeds.tolist())) == 500
    assert torch.equal(seeds[100:200], image_seeds(0, torch.arange(100, 200)))
    assert not torch.equal(seeds, sample_plan(10, 50, global_seed=1)[1])


def test_row_streams_do_not_depend_on_the_batch():
    seeds = image_seeds(3, torch.arange(64))
    probs = torch.softmax(torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), -1)
    whole = RowRNG(seeds)
    draws_whole = [whole.multinomial(probs) for _ in range(5)]
    part = RowRNG(seeds[16:48])
    draws_part = [part.multinomial(probs[16:48]) for _ in range(5)]
    for a, b in zip(draws_whole, draws_part):
        assert torch.equal(a[16:48], b)
    # the five draws of one row are not all equal (the counter advances)
    assert len({int(d[0]) for d in draws_whole}) > 1
    # thousands of draws (one per token of a 32x32 grid and more) keep working
    for _ in range(3000):
        whole.uniform()
    assert whole.multinomial(probs).shape == (64, 1)


def test_row_multinomial_follows_the_distribution_and_skips_zeros():
    probs = torch.tensor([0.5, 0.0, 0.25, 0.25]).repeat(20000, 1)
    d = RowRNG(image_seeds(0, torch.arange(20000))).multinomial(probs).squeeze(1)
    freq = torch.bincount(d, minlength=4).float() / len(d)
    assert freq[1] == 0
    assert torch.allclose(freq, torch.tensor([0.5, 0.0, 0.25, 0.25]), atol=0.015)


def test_to_uint8_matches_the_official_formula():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.99, 1.2]).view(1, 1, 1, 5).expand(1, 3, 5, 5)
    out = to_uint8(x)
    assert out.shape == (1, 5, 5, 3) and out.dtype == np.uint8
    # clamp(127.5x + 128) truncated: -1 -> 0.5 -> 0, 0 -> 128, 0.99 -> 254.225 -> 254, >1 -> 255
    assert out[0, 0, :, 0].tolist() == [0, 0, 128, 254, 255]
    assert to_uint8(torch.zeros(2, 3, 8, 8), image_size_eval=4).shape == (2, 4, 4, 3)


def test_shards_resume_and_pack(tmp_path):
    imgs = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    labels = np.arange(6) % 3
    write_shard(tmp_path, 0, imgs[:4], labels[:4])
    with pytest.raises(RuntimeError, match="only 4 of 6"):
        pack_npz(tmp_path, tmp_path / "out.npz", total=6)
    write_shard(tmp_path, 4, imgs[4:], labels[4:])
    assert sorted(finished_shards(tmp_path)) == [0, 4]
    out = pack_npz(tmp_path, tmp_path / "out.npz", total=5)
    with np.load(out) as f:
        assert f["arr_0"].shape == (5, 2, 2, 3) and np.array_equal(f["arr_0"], imgs[:5])
        assert f["labels"].tolist() == labels[:5].tolist()


def test_shard_folder_refuses_other_settings_and_names_them(tmp_path):
    claim_shard_folder(tmp_path / "s", {"cfg": 2.0, "seed": 0, "n": 10})
    # no shard yet: other settings simply take the folder over (a refused first run blocks nothing)
    claim_shard_folder(tmp_path / "s", {"cfg": 3.0, "seed": 0, "n": 10})
    claim_shard_folder(tmp_path / "s", {"cfg": 2.0, "seed": 0, "n": 10})
    write_shard(tmp_path / "s", 0, np.zeros((1, 2, 2, 3), np.uint8), np.zeros(1, np.int64))
    claim_shard_folder(tmp_path / "s", {"cfg": 2.0, "seed": 0, "n": 20}, may_change=("n",))
    with pytest.raises(SettingsMismatch, match=r"\(cfg, seed\)"):
        claim_shard_folder(tmp_path / "s", {"cfg": 1.5, "seed": 1, "n": 20})

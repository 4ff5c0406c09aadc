"""Reconstruction evaluation: PSNR/SSIM on known inputs, the ADM .npz files, resumable shards, and
the streamed packing of the shards (against the in-memory packer it replaced)."""
import math
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.digits import DigitsDataset
from tokenizer.loading import build_vq
from tokenizer.metrics import psnr, ssim
from tokenizer.reconstruction_vq_ddp import PER_IMAGE, get_parser, main, pack
from tests.test_npz_stream import record_stream_chunks
from tokenizer.vq_model import config_dict
from utils.checkpoint import save_checkpoint, save_npz
from utils.shards import finished_shards, shard_path


def test_psnr_known_values():
    x = np.random.default_rng(0).random((16, 16, 3))
    assert psnr(x, x) == math.inf
    assert math.isclose(psnr(np.full((8, 8, 3), 0.1), np.zeros((8, 8, 3))), 20.0, rel_tol=1e-12)
    noise = np.random.default_rng(1).normal(0, 0.05, x.shape)
    expected = 10 * math.log10(1.0 / np.mean(noise**2))
    assert math.isclose(psnr(x + noise, x), expected, rel_tol=1e-12)


def test_ssim_known_values():
    x = np.random.default_rng(0).random((16, 16, 3))
    assert math.isclose(ssim(x, x), 1.0, rel_tol=1e-12)
    # Constant images: no variance, SSIM = (2ab + C1) / (a^2 + b^2 + C1) with C1 = (0.01 R)^2.
    for r in (1.0, 2.0):
        c1 = (0.01 * r) ** 2
        got = ssim(np.full((10, 10), 0.2), np.full((10, 10), 0.6), data_range=r)
        assert math.isclose(got, (2 * 0.2 * 0.6 + c1) / (0.04 + 0.36 + c1), rel_tol=1e-12)
    noisy = np.clip(x + np.random.default_rng(1).normal(0, 0.1, x.shape), 0, 1)
    assert 0.0 < ssim(noisy, x, data_range=1.0) < ssim(noisy, x, data_range=2.0) < 1.0


@pytest.fixture(scope="module")
def vq_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = build_vq("VQ-debug", codebook_size=512, codebook_embed_dim=8)
    path = tmp_path_factory.mktemp("vq") / "0000000.pt"
    save_checkpoint({"model": model.state_dict(), "vq_model": "VQ-debug", "vq_config": config_dict(model)}, path)
    return path


def test_driver_writes_adm_npz_and_resumes(tmp_path, vq_ckpt, capsys):
    argv = ["--vq-ckpt", str(vq_ckpt), "--dataset", "digits", "--image-size", "32", "--image-size-eval", "32",
            "--sample-dir", str(tmp_path), "--per-proc-batch-size", "128", "--num-workers", "0", "--device", "cpu"]
    main(get_parser().parse_args(argv))
    out = capsys.readouterr().out
    assert "PSNR:" in out and "SSIM:" in out
    recon_npz = next(p for p in tmp_path.glob("VQ-*.npz"))
    # what the driver packed is what the in-memory packer writes from the same shards
    ref_out = pack_in_memory(recon_npz.with_suffix("") / "shards", 359, 0, tmp_path / "old-recon.npz",
                             tmp_path / "old-ref.npz", seed=0)
    assert_same_npz(recon_npz, tmp_path / "old-recon.npz")
    assert_same_npz(tmp_path / "val_digits-size-32.npz", tmp_path / "old-ref.npz")
    assert out.splitlines()[-1] == result_line(ref_out)
    assert recon_npz.with_name(recon_npz.stem + "_results.txt").read_text() == result_line(ref_out) + "\n"
    with np.load(recon_npz) as f:
        recon = f["arr_0"]
    with np.load(tmp_path / "val_digits-size-32.npz") as f:
        ref = f["arr_0"]
    real = DigitsDataset("heldout", 32).uint8_array()
    assert recon.shape == ref.shape == real.shape == (359, 32, 32, 3)
    assert recon.dtype == ref.dtype == np.uint8
    # The reference is the centre crops, shuffled (seeded): the same multiset of images, not the same order.
    key = lambda a: sorted(im.tobytes() for im in a)  # noqa: E731
    assert key(ref) == key(real) and not np.array_equal(ref, real)

    # Resume: drop the packed files and one shard; the rerun redoes only that shard, same output.
    shard_dir = next(p for p in tmp_path.iterdir() if p.is_dir()) / "shards"
    shards = sorted(shard_dir.glob("shard_*.npz"))
    assert len(shards) == 3
    kept = {p: p.stat().st_mtime_ns for p in shards[:2]}
    shards[2].unlink()
    recon_npz.unlink()
    main(get_parser().parse_args(argv))
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    with np.load(recon_npz) as f:
        assert np.array_equal(f["arr_0"], recon)


#################################################################################
#                       Streamed packing of the shards                          #
#################################################################################


def pack_in_memory(shard_dir: Path, total: int, skipped: int, recon_path: Path, ref_path: Path,
                   seed: int) -> dict[str, np.ndarray]:
    """The packer before streaming, as the reference: every shard loaded and concatenated, sorted by
    index, `np.savez` of the reconstructions and of the reference shuffled with `seed`."""
    parts = {k: [] for k in ("recon", "ref", "index", "psnr", "ssim", "ssim_range1")}
    for start, path in sorted(finished_shards(shard_dir).items()):
        with np.load(path) as f:
            for k in parts:
                parts[k].append(f[k])
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    order = np.argsort(out["index"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if len(out["index"]) + skipped != total or len(np.unique(out["index"])) != len(out["index"]):
        raise RuntimeError(f"{shard_dir}: {len(out['index'])} reconstructions + {skipped} skipped != {total} "
                           f"images; rerun to finish the missing shards")
    save_npz(recon_path, arr_0=out["recon"])
    perm = torch.randperm(len(out["ref"]), generator=torch.Generator().manual_seed(seed)).numpy()
    save_npz(ref_path, arr_0=out["ref"][perm])
    return out


def result_line(out: dict[str, np.ndarray]) -> str:
    """The driver's printed line (and results.txt), from the per-image arrays in index order."""
    return (f"PSNR: {out['psnr'].mean():.6f}, SSIM: {out['ssim'].mean():.6f} (official data_range=2), "
            f"SSIM: {out['ssim_range1'].mean():.6f} (data_range=1) over {len(out['psnr'])} images")


def assert_same_npz(a: Path, b: Path) -> None:
    with np.load(a) as x, np.load(b) as y:
        assert x.files == y.files == ["arr_0"]
        for k in x.files:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape and np.array_equal(x[k], y[k])
    with zipfile.ZipFile(a) as z:
        assert all(i.compress_type == zipfile.ZIP_STORED for i in z.infolist())


def write_rank_shards(folder: Path, n: int, batch: int, world: int, skip: set[int], size: int = 6,
                      seed: int = 0, shuffle_rows: tuple[int, ...] = ()) -> int:
    """Shards as the driver writes them: batch c (images [c*batch, (c+1)*batch)) on rank c % world,
    each rank's in turn (rank-interleaved indices), the `skip` images missing (their shards shorter,
    or empty); the rows of the batches in `shuffle_rows` out of index order. Returns the largest shard."""
    rng = np.random.default_rng(seed)
    largest = 0
    for rank in range(world):
        for c in range(rank, math.ceil(n / batch), world):
            index = np.array([i for i in range(c * batch, min((c + 1) * batch, n)) if i not in skip], np.int64)
            if c in shuffle_rows:
                index = rng.permutation(index)
            k = len(index)
            save_npz(shard_path(folder, c * batch),
                     recon=rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8),
                     ref=rng.integers(0, 256, (k, size, size, 3), dtype=np.uint8),
                     index=index, psnr=rng.random(k) * 40, ssim=rng.random(k), ssim_range1=rng.random(k),
                     skipped=np.array([f"bad_{i}.JPEG" for i in range(c * batch, min((c + 1) * batch, n))
                                       if i in skip], dtype=str))
            largest = max(largest, k)
    return largest


SKIP = {0, 5, 6, 7, 8, 9, 10, 11, 23, 40, 41}  # batch 1 (5..9 at batch 5) entirely, parts of others


@pytest.mark.parametrize("world,batch,seed", [(3, 5, 0), (2, 7, 1), (4, 8, 2)])
def test_streamed_pack_equals_the_in_memory_packer(tmp_path, world, batch, seed):
    n = 43  # the last batch is short
    write_rank_shards(tmp_path / "s", n, batch, world, SKIP, seed=seed, shuffle_rows=(2,))
    new = pack(tmp_path / "s", n, len(SKIP), tmp_path / "recon.npz", tmp_path / "ref.npz", seed)
    old = pack_in_memory(tmp_path / "s", n, len(SKIP), tmp_path / "old-recon.npz", tmp_path / "old-ref.npz", seed)
    assert_same_npz(tmp_path / "recon.npz", tmp_path / "old-recon.npz")
    assert_same_npz(tmp_path / "ref.npz", tmp_path / "old-ref.npz")
    assert sorted(new) == sorted(PER_IMAGE)
    for k in PER_IMAGE:
        assert new[k].dtype == old[k].dtype and np.array_equal(new[k], old[k])
    assert new["index"].tolist() == sorted(set(range(n)) - SKIP)
    assert result_line(new) == result_line(old)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic: no temporary file left


def test_streamed_pack_of_nothing_and_of_only_skipped_images(tmp_path):
    (tmp_path / "none").mkdir()
    for folder, total, skipped in (("none", 0, 0), ("all-skipped", 4, 4)):
        if folder == "all-skipped":
            write_rank_shards(tmp_path / folder, 4, 2, 2, {0, 1, 2, 3})
        new = pack(tmp_path / folder, total, skipped, tmp_path / "recon.npz", tmp_path / "ref.npz", 0)
        old = pack_in_memory(tmp_path / folder, total, skipped, tmp_path / "old-recon.npz",
                             tmp_path / "old-ref.npz", 0)
        assert_same_npz(tmp_path / "recon.npz", tmp_path / "old-recon.npz")
        assert_same_npz(tmp_path / "ref.npz", tmp_path / "old-ref.npz")
        assert all(np.array_equal(new[k], old[k]) and new[k].dtype == old[k].dtype for k in PER_IMAGE)


def test_streamed_pack_keeps_the_error_and_writes_nothing(tmp_path):
    write_rank_shards(tmp_path / "s", 20, 4, 2, {3})
    with pytest.raises(RuntimeError, match=r"19 reconstructions \+ 0 skipped != 20 images; rerun"):
        pack(tmp_path / "s", 20, 0, tmp_path / "recon.npz", tmp_path / "ref.npz", 0)
    shard_path(tmp_path / "s", 8).unlink()  # a missing shard
    with pytest.raises(RuntimeError, match=r"15 reconstructions \+ 1 skipped != 20 images; rerun"):
        pack(tmp_path / "s", 20, 1, tmp_path / "recon.npz", tmp_path / "ref.npz", 0)
    # a duplicated image (the count is right, the indices are not unique)
    with np.load(shard_path(tmp_path / "s", 4)) as f:
        dup = {k: f[k] for k in f.files}
    save_npz(shard_path(tmp_path / "s", 8), **dup)
    with pytest.raises(RuntimeError, match=r"19 reconstructions \+ 1 skipped != 20 images; rerun"):
        pack(tmp_path / "s", 20, 1, tmp_path / "recon.npz", tmp_path / "ref.npz", 0)
    assert not list(tmp_path.glob("*.npz")) and not list(tmp_path.glob(".*.tmp"))


def test_streamed_pack_writes_at_most_one_shard_of_rows_at_a_time(tmp_path, monkeypatch):
    n, size = 150, 8
    largest = write_rank_shards(tmp_path / "s", n, 9, 4, SKIP, size=size, shuffle_rows=(3, 10))
    row = size * size * 3
    chunks = record_stream_chunks(monkeypatch)
    pack(tmp_path / "s", n, len(SKIP), tmp_path / "recon.npz", tmp_path / "ref.npz", 0)
    count = n - len(SKIP)
    assert max(chunks) <= largest * row and sum(chunks) == 2 * count * row
    assert len(chunks) == 2 * math.ceil(count / largest)


def test_streamed_pack_peak_memory_is_about_one_shard(tmp_path):
    """tracemalloc sees numpy's allocations: the in-memory packer's peak is the whole set (twice),
    the streamed one's about one shard's rows (the chunk being gathered; the shards are memory-mapped)
    plus the per-image arrays."""
    n, batch, size = 384, 32, 128
    write_rank_shards(tmp_path / "s", n, batch, 4, set(), size=size)  # 1.5 MiB a shard, 18 MiB an array
    shard, whole = batch * size * size * 3, n * size * size * 3

    def peak(packer, name):
        tracemalloc.start()
        try:
            packer(tmp_path / "s", n, 0, tmp_path / f"{name}-recon.npz", tmp_path / f"{name}-ref.npz", 0)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    assert peak(pack_in_memory, "old") > 1.5 * whole  # the measurement does see the arrays
    assert peak(pack, "new") < 1.5 * shard

"""Reconstruction evaluation: PSNR/SSIM on known inputs, the ADM .npz files, resumable shards."""
import math

import numpy as np
import pytest
import torch

from dataset.digits import DigitsDataset
from tokenizer.loading import build_vq
from tokenizer.metrics import psnr, ssim
from tokenizer.reconstruction_vq_ddp import get_parser, main
from tokenizer.vq_model import config_dict
from utils.checkpoint import save_checkpoint


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

"""The DDP sampler: .npz shape, dtype and class balance; 1 and 2 ranks give the same images;
a rerun keeps finished shards; bad settings are refused."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.strategies import get_strategy
from tests.torchrun import torchrun
from tokenizer.vq_model import VQ_models
from utils.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    vq = VQ_models["VQ-debug"](codebook_size=64)
    save_checkpoint({"model": vq.state_dict(), "vq_model": "VQ-debug", "vq_config": asdict(vq.config)}, d / "vq.pt")
    gpt = get_strategy("raster").build_model("GPT-debug", vocab_size=64, block_size=16, num_classes=10)
    for p in gpt.parameters():  # random, informative logits (official init zeroes the head)
        torch.nn.init.normal_(p, std=0.3)
    args = {"strategy": "raster", "gpt_model": "GPT-debug", "image_size": 16, "downsample_size": 4,
            "vocab_size": 64, "num_classes": 10, "cls_token_num": 1}
    save_checkpoint({"model": gpt.state_dict(), "args": args}, d / "gpt.pt")
    return d


def run_sampler(ckpts, out, nproc=1, extra=()):
    cmd = ["autoregressive/sample/sample_c2i_ddp.py", "--gpt-ckpt", str(ckpts / "gpt.pt"),
           "--vq-ckpt", str(ckpts / "vq.pt"), "--vq-model", "VQ-debug", "--codebook-size", "64",
           "--image-size", "16", "--image-size-eval", "16", "--downsample-size", "4", "--num-classes", "10",
           "--cfg-scale", "2.0", "--top-k", "0", "--num-fid-samples", "30", "--per-proc-batch-size", "4",
           "--sample-dir", str(out), "--device", "cpu", *extra]
    if nproc > 1:
        cmd = [*torchrun(nproc), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    return res


def npz_of(out: Path) -> Path:
    files = list(out.glob("*.npz"))
    assert len(files) == 1, files
    return files[0]


def test_one_and_two_ranks_give_the_same_images(ckpts, tmp_path):
    r1 = run_sampler(ckpts, tmp_path / "one")
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_sampler(ckpts, tmp_path / "two", nproc=2)
    assert r2.returncode == 0, r2.stderr[-3000:]
    with np.load(npz_of(tmp_path / "one")) as a, np.load(npz_of(tmp_path / "two")) as b:
        assert a["arr_0"].shape == (30, 16, 16, 3) and a["arr_0"].dtype == np.uint8
        assert np.bincount(a["labels"], minlength=10).tolist() == [3] * 10
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
        assert len({a["arr_0"][i].tobytes() for i in range(30)}) > 20  # not all the same image
    assert (npz_of(tmp_path / "one").with_suffix(".json")).is_file()


def test_rerun_keeps_finished_shards_and_refuses_other_settings(ckpts, tmp_path):
    assert run_sampler(ckpts, tmp_path).returncode == 0
    folder = next(p for p in tmp_path.iterdir() if p.is_dir())
    shards = sorted(folder.glob("shard_*.npz"))
    assert len(shards) == 8
    first = np.load(npz_of(tmp_path))["arr_0"]
    shards[3].unlink()  # as if the run had died before this batch
    stamps = {p: p.stat().st_mtime_ns for p in shards if p.exists()}
    res = run_sampler(ckpts, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "7 already done" in res.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    assert np.array_equal(np.load(npz_of(tmp_path))["arr_0"], first)
    other = run_sampler(ckpts, tmp_path, extra=["--per-proc-batch-size", "5"])
    assert other.returncode != 0 and "per-proc-batch-size 4" in other.stderr


def test_bad_settings_are_clear_errors(ckpts, tmp_path):
    res = run_sampler(ckpts, tmp_path / "a", extra=["--cfg-scale", "0.5"])
    assert res.returncode != 0 and "cfg" in res.stderr.lower()
    res = run_sampler(ckpts, tmp_path / "b", extra=["--image-size", "32"])
    assert res.returncode != 0 and "block_size" in res.stderr
    res = run_sampler(ckpts, tmp_path / "c", extra=["--strategy", "nope"])
    assert res.returncode != 0 and "raster" in res.stderr


def test_single_image_sampler_writes_a_grid(ckpts, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "autoregressive/sample/sample_c2i.py", "--gpt-ckpt", str(ckpts / "gpt.pt"),
           "--vq-ckpt", str(ckpts / "vq.pt"), "--vq-model", "VQ-debug", "--codebook-size", "64",
           "--image-size", "16", "--downsample-size", "4", "--num-classes", "10", "--classes", "1", "2", "3",
           "--per-class", "2", "--cfg-scale", "1.5", "--top-k", "0", "--out", str(out), "--device", "cpu"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    from PIL import Image
    assert Image.open(out).size == (2 * 18 + 2, 3 * 18 + 2)


def test_save_png_writes_the_official_png_folder(ckpts, tmp_path):
    """--save-png also writes every image as <name>_png/<index>.png (LPD's torch-fidelity layout)."""
    from PIL import Image

    res = run_sampler(ckpts, tmp_path, extra=("--save-png",))
    assert res.returncode == 0, res.stderr[-3000:]
    npz = npz_of(tmp_path)
    pngs = sorted((tmp_path / f"{npz.stem}_png").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(30)]
    with np.load(npz) as f:
        assert np.array_equal(np.asarray(Image.open(pngs[7])), f["arr_0"][7])


def test_a_refused_run_writes_nothing_and_a_moved_folder_resumes(ckpts, tmp_path):
    """A run refused for a bad flag leaves no folder behind, so the corrected rerun starts; a sample
    folder moved elsewhere (with its checkpoint files moved too) resumes where it stopped."""
    bad = run_sampler(ckpts, tmp_path / "a", extra=["--cfg-scale", "0.5"])
    assert bad.returncode != 0 and not (tmp_path / "a").exists()
    assert run_sampler(ckpts, tmp_path / "a").returncode == 0
    folder = next(p for p in (tmp_path / "a").iterdir() if p.is_dir())
    first = np.load(npz_of(tmp_path / "a"))["arr_0"]
    for shard in sorted(folder.glob("shard_*.npz"))[4:]:
        shard.unlink()  # as if the run had died half way
    (tmp_path / "a").rename(tmp_path / "moved")
    (npz_of(tmp_path / "moved")).unlink()
    moved_ckpts = tmp_path / "ckpts"
    moved_ckpts.mkdir()
    for f in ("gpt.pt", "vq.pt"):
        (moved_ckpts / f).write_bytes((ckpts / f).read_bytes())
    res = run_sampler(moved_ckpts, tmp_path / "moved")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "4 already done" in res.stderr
    assert np.array_equal(np.load(npz_of(tmp_path / "moved"))["arr_0"], first)

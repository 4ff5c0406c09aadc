"""The GPT training driver: DDP on 2 CPU ranks learns; a killed run resumes to identical weights;
bad input is refused clearly."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils.checkpoint import load_checkpoint
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]


def write_codes(root: Path, n: int = 96, num_tokens: int = 16, vocab: int = 64) -> Path:
    """A learnable code folder in the official layout: class-dependent sequences, two views each."""
    rng = np.random.RandomState(0)
    (root / "digits16_codes").mkdir(parents=True)
    (root / "digits16_labels").mkdir(parents=True)
    for k in range(n):
        y = k % 10
        base = (y * 5 + np.arange(num_tokens)) % vocab
        views = np.stack([base, (base + rng.randint(0, 2, num_tokens)) % vocab])[None]
        np.save(root / "digits16_codes" / f"{k}.npy", views.astype(np.int64))
        np.save(root / "digits16_labels" / f"{k}.npy", np.array([y], dtype=np.int64))
    return root


def train_cmd(codes: Path, results: Path, *extra: str, nproc: int = 1) -> list[str]:
    args = ["autoregressive/train/train_c2i.py", "--code-path", str(codes), "--dataset", "digits",
            "--image-size", "16", "--downsample-size", "4", "--vocab-size", "64", "--num-classes", "10",
            "--gpt-model", "GPT-debug", "--global-batch-size", "16", "--lr", "1e-3", "--num-workers", "0",
            "--results-dir", str(results), "--device", "cpu", *extra]
    if nproc > 1:
        return [*torchrun(nproc), *args]
    return [sys.executable, *args]


def run(cmd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


def kill_after_checkpoint(cmd: list[str], results: Path, step: int) -> Path:
    """Start a training run, SIGKILL it as soon as its checkpoint of `step` exists (or when it has
    ended by itself); its run folder. No wall-clock limit: a slow machine only waits longer."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not list(results.glob(f"*/checkpoints/{step:07d}.pt")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return next(results.iterdir())


def losses(log: str) -> list[float]:
    return [float(line.split("train/loss ")[1].split(",")[0]) for line in log.splitlines() if "train/loss " in line]


def test_two_ranks_learn(tmp_path):
    codes = write_codes(tmp_path / "codes")
    res = run(train_cmd(codes, tmp_path / "results", "--epochs", "4", "--log-every", "3", "--ckpt-every", "100",
                        nproc=2))
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(res.stderr)
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.5, curve
    run_dir = next((tmp_path / "results").iterdir())
    ckpt = load_checkpoint(run_dir / "checkpoints" / "0000024.pt")
    assert ckpt["steps"] == 24 and len(ckpt["rng"]) == 2 and ckpt["args"]["strategy"] == "raster"
    assert (run_dir / "log.txt").read_text().count("train/loss") == len(curve)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    codes = write_codes(tmp_path / "codes")
    common = ("--epochs", "5", "--log-every", "5", "--ckpt-every", "6", "--dropout-p", "0.1")
    ref = run(train_cmd(codes, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr[-3000:]
    # Kill a second run with SIGKILL once its first checkpoint exists, then resume it.
    run_dir = kill_after_checkpoint(train_cmd(codes, tmp_path / "killed", *common), tmp_path / "killed", 6)
    done = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert done and "0000030.pt" not in done, done  # it really stopped midway
    res = run(train_cmd(codes, tmp_path / "killed", *common, "--resume", str(run_dir)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / done[-1]}" in res.stderr
    a = load_checkpoint(next((tmp_path / "ref").iterdir()) / "checkpoints" / "0000030.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "0000030.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["data_pos"] == b["data_pos"] == 30


def test_bad_input_is_refused(tmp_path):
    codes = write_codes(tmp_path / "codes")
    res = run(train_cmd(codes, tmp_path / "r", "--downsample-size", "2", "--max-steps", "1"))
    assert res.returncode != 0 and "tokens per image" in res.stderr
    res = run(train_cmd(codes, tmp_path / "r", "--image-size", "32", "--max-steps", "1"))
    assert res.returncode != 0 and "digits32_codes" in res.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written
    res = run(train_cmd(codes, tmp_path / "r", "--strategy", "nope"))
    assert res.returncode != 0 and "raster" in res.stderr
    res = run(train_cmd(codes, tmp_path / "r", "--max-steps", "2", "--ckpt-every", "2"))
    assert res.returncode == 0, res.stderr[-2000:]
    run_dir = next((tmp_path / "r").iterdir())
    res = run(train_cmd(codes, tmp_path / "r", "--resume", str(run_dir), "--gpt-model", "GPT-B",
                        "--max-steps", "3"))
    assert res.returncode != 0 and "--gpt-model 'GPT-B' contradicts the checkpoint" in res.stderr
    res = run(train_cmd(codes, tmp_path / "r", "--resume", str(run_dir), "--max-steps", "3"))
    assert res.returncode == 0 and "gpt_model=GPT-debug" in res.stderr, res.stderr[-2000:]


def test_fsdp_two_ranks_learn_and_resume_to_the_same_weights(tmp_path):
    """--data-parallel fsdp (FULL_SHARD, gloo): the loss falls; a run stopped at a checkpoint and
    resumed reaches the weights of the uninterrupted run; the checkpoint is the full, unsharded state."""
    codes = write_codes(tmp_path / "codes")
    common = ("--epochs", "3", "--log-every", "3", "--ckpt-every", "9", "--data-parallel", "fsdp",
              "--mixed-precision", "none", "--dropout-p", "0.0", "--token-dropout-p", "0.0")
    full = run(train_cmd(codes, tmp_path / "full", *common, nproc=2))
    assert full.returncode == 0, full.stderr[-3000:]
    assert "FSDP (fsdp)" in full.stderr
    curve = losses(full.stderr)
    assert curve[-1] < curve[0] - 0.3, curve
    part = run(train_cmd(codes, tmp_path / "part", *common, "--max-steps", "9", nproc=2))
    assert part.returncode == 0, part.stderr[-3000:]
    run_dir = next((tmp_path / "part").iterdir())
    resumed = run(train_cmd(codes, tmp_path / "part", *common, "--resume", str(run_dir), nproc=2))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_checkpoint(next((tmp_path / "full").iterdir()) / "checkpoints" / "0000018.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "0000018.pt")
    assert set(a["model"]) == set(b["model"]) and "tok_embeddings.weight" in a["model"]
    assert all(not hasattr(v, "full_tensor") for v in a["model"].values())  # plain tensors, unsharded
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # An FSDP optimizer state does not resume under DDP: a clear refusal.
    ddp = run(train_cmd(codes, tmp_path / "part", "--epochs", "3", "--resume", str(run_dir), "--mixed-precision", "none"))
    assert ddp.returncode != 0 and "--data-parallel fsdp" in ddp.stderr


def test_lr_schedule_is_followed_and_refused_where_the_strategy_owns_it(tmp_path):
    """--lr-schedule cosine --warmup-epochs 1: the logged lr is the scheduled one at every log step;
    NPP with --scheduler sets its own schedule, so a driver schedule beside it is refused."""
    from utils.training import scheduled_lr

    codes = write_codes(tmp_path / "codes")
    res = run(train_cmd(codes, tmp_path / "r", "--epochs", "3", "--log-every", "4", "--ckpt-every", "100",
                        "--lr-schedule", "cosine", "--warmup-epochs", "1", "--min-lr", "1e-5"))
    assert res.returncode == 0, res.stderr[-3000:]
    logged = {int(m.group(1)): float(m.group(2)) for m in
              re.finditer(r"\(step=(\d+)\).*?train/lr ([0-9.e-]+),", res.stderr)}
    assert sorted(logged) == [4, 8, 12, 16, 18], logged  # 6 steps per epoch, 18 in all: every 4 and the last
    for step, lr in logged.items():  # the lr used by step `step` (data position step - 1)
        expected = scheduled_lr(step - 1, 6, 1e-3, "cosine", 1, 1e-5, 3)
        assert abs(lr - expected) <= 1e-3 * expected, (step, lr, expected)  # logged to 4 digits
    bad = run(train_cmd(codes, tmp_path / "b", "--strategy", "npp", "--patch-level", "2", "--scheduler",
                        "--epochs", "2", "--lr-schedule", "cosine"))
    assert bad.returncode != 0 and "sets its own learning-rate schedule" in bad.stderr


def test_resume_refuses_a_typo_and_falls_back_over_a_truncated_checkpoint(tmp_path):
    """`--resume` of a folder that does not exist is an error (no fresh run is started there); a run
    whose newest checkpoint is truncated resumes from the newest readable one, with a warning."""
    codes = write_codes(tmp_path / "codes")
    common = ("--epochs", "1", "--max-steps", "4", "--ckpt-every", "2", "--log-every", "2")
    typo = tmp_path / "results" / "000-GPT-debg-raster"
    res = run(train_cmd(codes, tmp_path / "results", *common, "--resume", str(typo)))
    assert res.returncode != 0 and "no such folder" in res.stderr and not typo.exists()
    assert run(train_cmd(codes, tmp_path / "results", *common)).returncode == 0
    run_dir = next((tmp_path / "results").iterdir())
    newest = run_dir / "checkpoints" / "0000004.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a truncated file under the final name
    res = run(train_cmd(codes, tmp_path / "results", "--epochs", "1", "--max-steps", "6", "--ckpt-every", "2",
                        "--log-every", "2", "--resume", str(run_dir)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "passing over the unreadable checkpoint" in res.stderr and "0000002.pt instead" in res.stderr
    assert load_checkpoint(run_dir / "checkpoints" / "0000006.pt")["steps"] == 6


def test_a_model_that_cannot_be_built_is_refused_before_the_run_folder(tmp_path):
    codes = write_codes(tmp_path / "codes")
    res = run(train_cmd(codes, tmp_path / "results", "--max-steps", "1", "--gpt-model", "ARPG-debug"))
    assert res.returncode != 0 and "unknown --gpt-model 'ARPG-debug'" in res.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


def test_ddp_and_fsdp_start_from_the_same_weights_on_one_and_two_ranks(tmp_path):
    """From scratch, the first weights are a function of --global-seed alone: DDP and FSDP on 1 and
    2 gloo ranks agree. One step at --lr 0 leaves the weights at their initial values (AdamW's
    decoupled decay is lr x wd), so the step-1 checkpoint shows them."""
    codes = write_codes(tmp_path / "codes")
    common = ("--epochs", "1", "--max-steps", "1", "--lr", "0", "--global-seed", "5", "--mixed-precision", "none")
    weights = {}
    for mode, nproc in (("ddp", 1), ("ddp", 2), ("fsdp", 1), ("fsdp", 2)):
        results = tmp_path / f"{mode}{nproc}"
        cmd = train_cmd(codes, results, *common, "--data-parallel", mode, nproc=nproc)
        if nproc == 1 and mode == "fsdp":  # FSDP needs a process group: one torchrun rank
            cmd = [*torchrun(1), *cmd[1:]]
        res = run(cmd)
        assert res.returncode == 0, res.stderr[-3000:]
        weights[f"{mode} x{nproc}"] = load_checkpoint(next(results.iterdir()) / "checkpoints" / "0000001.pt")["model"]
    ref = weights.pop("ddp x1")
    for name, state in weights.items():
        assert set(state) == set(ref), name
        for k in ref:
            assert torch.equal(state[k], ref[k]), (name, k)

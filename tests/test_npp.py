"""NPP beyond the fixtures: the stage and learning rate at every step of real (DDP) training runs
follow the official rule and the loss falls; a run killed inside a stage resumes to identical
weights; KV-cached sampling equals full recompute; bad --patch-level values are refused."""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autoregressive.models.npp import patchify_embeddings, patchify_targets
from autoregressive.strategies import get_strategy
from autoregressive.strategies.npp_schedule import lr_multiplier, patch_schedule, training_flops_fraction
from tests.test_train_c2i import ROOT, kill_after_checkpoint, losses, run, train_cmd, write_codes
from utils.checkpoint import load_checkpoint

NPP = get_strategy("npp")
STEPS_PER_EPOCH = 6  # write_codes: 96 items, --global-batch-size 16


def spec_patch_size(step: int, patch_level: int, epochs: int, rate: float) -> int:
    """The official rule written out (`get_patch_size` of NPP's `train_c2i.py`): stage ends int(E r^i),
    first end > epoch wins."""
    sizes = {2: [4, 1], 3: [16, 4, 1], 4: [64, 16, 4, 1]}.get(patch_level, [1])
    ends = [int(epochs * rate ** i) for i in range(len(sizes))][::-1]
    epoch = step // STEPS_PER_EPOCH
    return next(p for p, end in zip(sizes, ends) if epoch < end)


def logged(log: str, name: str) -> list[float]:
    return [float(m) for m in re.findall(rf"train/{name} ([-+.\deE]+)", log)]


def npp_cmd(codes: Path, results: Path, *extra: str, nproc: int = 1) -> list[str]:
    return train_cmd(codes, results, "--strategy", "npp", *extra, nproc=nproc)


# ---------------------------------------------------------------------------------------------
# Training runs through the shared driver
# ---------------------------------------------------------------------------------------------


def test_two_ranks_follow_the_stages_and_learn(tmp_path):
    """Level 3 on the 4x4 grid: P = 16 (one patch: the class token predicts all codes), 4, then 1."""
    codes = write_codes(tmp_path / "codes")
    flags = dict(patch_level=3, epochs=8, rate=0.5)
    res = run(npp_cmd(codes, tmp_path / "results", "--patch-level", "3", "--epoch-rate", "0.5", "--epochs", "8",
                      "--scheduler", "--warmup-epochs", "1", "--decay-ratio", "0.2", "--end-lr", "1e-4",
                      "--log-every", "1", "--ckpt-every", "1000", nproc=2))
    assert res.returncode == 0, res.stderr[-3000:]
    sizes, lrs, curve = logged(res.stderr, "patch_size"), logged(res.stderr, "lr"), losses(res.stderr)
    total = 8 * STEPS_PER_EPOCH
    assert len(sizes) == len(lrs) == len(curve) == total
    # Logged at step s + 1 for the optimizer step s (data position s).
    assert sizes == [spec_patch_size(s, **flags) for s in range(total)]
    schedule = patch_schedule(3, 8, 0.5)
    expected_lr = [1e-3 * lr_multiplier(s, STEPS_PER_EPOCH, schedule, 1, 0.2, 1e-3, 1e-4) for s in range(total)]
    assert lrs == pytest.approx(expected_lr, rel=1e-3, abs=1e-12)
    assert [lrs[s] for s in (0, 12, 24)] == [0.0, 0.0, 0.0]  # every stage warms up from 0
    fine = curve[24:]  # the P = 1 stage: next-token loss
    assert sum(fine[-4:]) / 4 < sum(fine[:4]) / 4 - 0.3, fine
    assert curve[-1] < curve[0] - 1.0, curve
    ckpt = load_checkpoint(next((tmp_path / "results").iterdir()) / "checkpoints" / f"{total:07d}.pt")
    assert ckpt["args"]["strategy"] == "npp" and ckpt["args"]["patch_level"] == 3 and ckpt["data_pos"] == total


def test_killed_inside_a_stage_resumes_to_identical_weights(tmp_path):
    """Level 2 over 4 epochs: P = 4 for steps 0-11, P = 1 for 12-23; killed after the checkpoint at
    step 9 (epoch 1.5, inside the P = 4 stage, after its warmup), resumed to step 24."""
    codes = write_codes(tmp_path / "codes")
    common = ("--patch-level", "2", "--epochs", "4", "--scheduler", "--warmup-epochs", "1", "--log-every", "6",
              "--ckpt-every", "9", "--dropout-p", "0.1")
    ref = run(npp_cmd(codes, tmp_path / "ref", *common))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run_dir = kill_after_checkpoint(npp_cmd(codes, tmp_path / "killed", *common), tmp_path / "killed", 9)
    done = sorted(p.name for p in (run_dir / "checkpoints").glob("*.pt"))
    assert done and "0000024.pt" not in done, done  # it really stopped midway
    # A schedule flag contradicting the checkpoint is refused (the stages would move).
    bad = run(npp_cmd(codes, tmp_path / "killed", *common, "--resume", str(run_dir), "--patch-level", "3"))
    assert bad.returncode != 0 and "--patch-level 3 contradicts the checkpoint" in bad.stderr
    res = run(npp_cmd(codes, tmp_path / "killed", *common, "--resume", str(run_dir)))
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / done[-1]}" in res.stderr
    a = load_checkpoint(next((tmp_path / "ref").iterdir()) / "checkpoints" / "0000024.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "0000024.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["param_groups"][0]["lr"] == b["optimizer"]["param_groups"][0]["lr"]
    assert a["data_pos"] == b["data_pos"] == 24


def test_patch_level_that_does_not_divide_the_grid_is_refused(tmp_path):
    codes = write_codes(tmp_path / "codes")  # 16 px / 4 = a 4x4 grid: 8x8 patches (level 4) cannot fit
    res = run(npp_cmd(codes, tmp_path / "r", "--patch-level", "4", "--max-steps", "1"))
    assert res.returncode != 0
    assert "--patch-level 4 cannot train at --image-size 16" in res.stderr
    assert "8x8 tokens" in res.stderr and "4x4 token grid" in res.stderr
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize("level,image_size,message", [
    (4, 192, "8x8 tokens (patch size 64) do not divide the 12x12 token grid"),
    (2, 208, "2x2 tokens (patch size 4) do not divide the 13x13 token grid"),
    (5, 256, "--patch-level 5 is not supported"),
    (-1, 256, "--patch-level must be >= 0"),
])
def test_bad_patch_level_message(level, image_size, message):
    args = argparse.Namespace(image_size=image_size, downsample_size=16, patch_level=level, epochs=300,
                              epoch_rate=0.5, scheduler=False)
    with pytest.raises(ValueError, match=re.escape(message)):
        get_strategy("npp").configure(args, training=True)


# ---------------------------------------------------------------------------------------------
# Model pieces and sampling
# ---------------------------------------------------------------------------------------------


def tiny_npp(seed: int = 0):
    torch.manual_seed(seed)
    model = NPP.build_model("GPT-debug", vocab_size=32, block_size=64, num_classes=5)
    with torch.no_grad():
        model.output.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model


def test_patches_are_2d_blocks_in_coarse_raster_order():
    grid = torch.arange(64).view(1, 64)  # token r*8 + c
    targets = patchify_targets(grid, 2)  # (1, 16, 4)
    assert targets[0, 1].tolist() == [2, 3, 10, 11]  # coarse cell (0, 1)
    assert targets[0, 4].tolist() == [16, 17, 24, 25]  # coarse cell (1, 0)
    means = patchify_embeddings(grid[..., None].float(), 4)  # (1, 4, 1)
    assert means.flatten().tolist() == [13.5, 17.5, 45.5, 49.5]  # 8 * mean(r) + mean(c) per block


def test_patch_one_equals_next_token_training():
    """P = 1 is LlamaGen's teacher forcing: the raster model's forward on z[:, :-1]."""
    model = tiny_npp().eval()
    z, y = torch.randint(0, 32, (2, 64)), torch.tensor([1, 3])
    with torch.no_grad():
        logits, loss = model(z, y, 1, targets=z)
        ref_logits, ref_loss = super(type(model), model).forward(z[:, :-1], y, targets=z)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)


@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (3.0, -1), (2.0, 1)])
def test_kv_cached_sampling_equals_full_recompute(cfg_scale, cfg_interval):
    """Each step's guided logits equal the full teacher-forced pass over the final tokens."""
    model = tiny_npp(seed=2).train()
    model(torch.randint(0, 32, (2, 64)), torch.tensor([0, 1]), 16)  # a coarse-stage forward first
    model.eval()
    labels = torch.tensor([2, 4])
    recorded: list[torch.Tensor] = []
    with torch.no_grad():
        tokens = NPP.generate(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval, temperature=1.0,
                              top_k=8, generator=torch.Generator().manual_seed(5), record_logits=recorded)
        null = torch.full_like(labels, model.num_classes)
        cond_logits, _ = model(tokens, labels, 1)  # (B, N, V)
        uncond_logits, _ = model(tokens, null, 1)
    guided_steps = torch.arange(64) < (cfg_interval + 2 if cfg_interval >= 0 else 64)  # official cfg_interval
    if cfg_scale > 1.0:
        mixed = uncond_logits + cfg_scale * (cond_logits - uncond_logits)
        guided = torch.where(guided_steps[None, :, None], mixed, cond_logits)
    else:
        guided = cond_logits
    torch.testing.assert_close(torch.stack(recorded, dim=1), guided, atol=1e-4, rtol=1e-4)


def test_flops_fraction_of_the_published_settings():
    """Cost linear in the sequence length: L=2 -> 0.625, L=3 -> 0.578, L=4 -> 0.572, FSDP defaults
    -> 0.40 (r = 0.5 / 0.67)."""
    got = [training_flops_fraction(patch_schedule(level, 300, rate))
           for level, rate in ((2, 0.5), (3, 0.5), (4, 0.5), (4, 0.67), (1, 0.5))]
    assert got == pytest.approx([0.625, 0.578125, 0.5723, 0.3997, 1.0], abs=1e-3)


def test_bench_train_runs_and_counts_flops():
    """`bench/bench_train.py` with the smallest flags: raster beside every NPP stage, the analytic
    matmul FLOPs checked against FlopCounterMode (`--check-flops`)."""
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--gpt-model", "GPT-debug", "--image-size", "64",
           "--vocab-size", "64", "--num-classes", "10", "--batch-size", "2", "--iters", "1", "--check-flops"]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = {line.split("  ")[0].strip(): line for line in res.stdout.splitlines()[3:]}
    assert "(baseline)" in rows["raster"] and "FLOPs 1.000x" in rows["npp P=1"]
    ratio = float(re.search(r"FLOPs ([\d.]+)x", rows["npp P=4"]).group(1))
    assert 0.2 < ratio < 0.25  # 4x shorter sequences; attention (quadratic) shrinks 16x
    overall = float(re.search(r"FLOPs ([\d.]+)x", res.stdout.splitlines()[-1]).group(1))
    assert overall == pytest.approx(0.5 * ratio + 0.5, abs=2e-3)  # half of the 300 epochs at P = 4

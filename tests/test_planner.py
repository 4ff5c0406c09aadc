"""The run planner (`--estimate` of both trainers, `utils/planner.py`): the search, the projection,
and both trainers printing a plan on CPU without writing anything."""
from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_train_c2i import train_cmd, write_codes
from utils.planner import (GPU_COUNTS, Phase, PhaseTiming, Plan, batch_split, fits, largest_micro_batch, run_plan,
                           one_process, project)

ROOT = Path(__file__).resolve().parents[1]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)


def table(stdout: str) -> dict[int, str]:
    """GPU count -> its projection row."""
    rows = {}
    for line in stdout.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+ x \d+|--)", line)
        if m:
            rows[int(m.group(1))] = line
    return rows


@pytest.mark.parametrize("fit, limit", [(0, 16), (1, 16), (5, 16), (16, 16), (40, 16), (37, 100), (64, 100)])
def test_largest_micro_batch_doubles_then_bisects(fit, limit):
    tried = []

    def try_step(k: int) -> bool:
        tried.append(k)
        return k <= fit

    assert largest_micro_batch(try_step, limit) == min(fit, limit)
    doubling = min(fit.bit_length() + 1, limit.bit_length())  # 1, 2, 4, ... up to the first failure
    assert tried[:doubling] == [2 ** i for i in range(doubling)], tried
    assert len(tried) <= 2 * limit.bit_length() + 1


def test_an_out_of_memory_step_does_not_fit_and_is_cleaned_up():
    cleaned = []

    def step(k: int) -> None:
        if k > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    after = lambda: cleaned.append(True)  # noqa: E731
    assert fits(step, 3, torch.device("cpu"), after) and not cleaned
    assert not fits(step, 4, torch.device("cpu"), after) and cleaned == [True]
    assert largest_micro_batch(lambda k: fits(step, k, torch.device("cpu"), after), 64) == 3


def test_batch_split_keeps_the_micro_batch_and_accumulates_the_rest():
    assert batch_split(256, 1, 32, True) == (32, 8)
    assert batch_split(256, 8, 32, True) == (32, 1)
    assert batch_split(256, 16, 32, True) == (16, 1)  # the share is below the micro-batch
    assert batch_split(96, 2, 32, True) == (24, 2)  # 48 per GPU: the fewest micro-batches of <= 32
    assert batch_split(256, 3, 32, True) is None
    assert batch_split(128, 4, 8, False) == (32, 1)  # no accumulation: the whole share


def test_projection_is_linear_in_the_gpus_over_every_phase():
    """Wall time on G GPUs = sum over phases of (its steps there) x (seconds per step on one) / G."""
    def run_steps(first: bool):
        return lambda gpus: (10 if first else 30) if 64 % gpus == 0 else 0

    plan = Plan(title="t", parameters={"m": 1}, phases=[Phase("a", lambda: 0, run_steps(True)),
                                                        Phase("b", lambda: 0, run_steps(False))],
                global_batch=64, micro_batch=8, accumulation=8, can_accumulate=True, device=torch.device("cpu"),
                precision="float32", warmup=1, run_summary="")
    timings = [PhaseTiming("a", 2.0, 100.0), PhaseTiming("b", 4.0, 300.0)]
    rows = {r.gpus: r for r in project(plan, timings, largest=None)}
    assert sorted(rows) == list(GPU_COUNTS)
    for g in (1, 2, 4, 8, 16, 32, 64):
        assert rows[g].steps == 40 and rows[g].seconds == pytest.approx((10 * 2.0 + 30 * 4.0) / g)
        assert rows[g].tokens_per_s == pytest.approx((10 * 100 + 30 * 300) / rows[g].seconds)
    assert (rows[1].micro_batch, rows[1].accumulation) == (8, 8)
    assert (rows[8].micro_batch, rows[8].accumulation, rows[8].smaller_micro_batch) == (8, 1, False)
    assert (rows[16].micro_batch, rows[16].smaller_micro_batch) == (4, True)


def test_the_planner_refuses_torchrun(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="not torchrun"):
        with one_process("cpu", False):
            pass


def test_npp_is_timed_per_patch_stage():
    from autoregressive.strategies import get_strategy

    npp = get_strategy("npp")
    npp.configure(argparse.Namespace(image_size=256, downsample_size=16, patch_level=3, epochs=300, epoch_rate=0.5,
                                     scheduler=False), training=True)
    assert npp.cost_phases() == [("patch 16", 0), ("patch 4", 75), ("patch 1", 150)]
    assert get_strategy("raster").cost_phases() == [("", 0)]


def test_train_c2i_estimate_prints_the_plan_and_writes_nothing(tmp_path):
    codes = write_codes(tmp_path / "codes")
    (tmp_path / "cwd").mkdir()
    before = tree(tmp_path)
    cmd = train_cmd(codes, tmp_path / "results", "--epochs", "5", "--estimate", "--estimate-steps", "3")
    res = run([cmd[0], str(ROOT / cmd[1]), *cmd[2:]], tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "parameters: GPT-debug 870,912" in out
    assert re.search(r"measured [\d.]+ steps/s, [\d.,]+ samples/s, [\d.,]+ tokens/s", out), out
    assert "5 epochs x 6 steps per epoch at global batch 16 (96 code files) = 30 steps" in out
    assert "3 real optimizer step(s) per phase after 1 untimed warm-up step(s)" in out
    assert "peak RSS" in out and "linear data-parallel scaling" in out and "one GPU" in out
    rows = table(out)
    assert sorted(rows) == list(GPU_COUNTS), out
    assert re.search(r"^\s+1\s+16 x 1\s+30\s", rows[1]) and "does not divide" in rows[32], out
    assert tree(tmp_path) == before  # no run folder, log, checkpoint or metrics


def test_train_vq_estimate_times_both_phases_and_writes_nothing(tmp_path):
    (tmp_path / "cwd").mkdir()
    before = tree(tmp_path)
    cmd = [sys.executable, str(ROOT / "tokenizer" / "train_vq.py"), "--vq-model", "VQ-debug", "--codebook-size", "64",
           "--image-size", "32", "--num-workers", "0", "--perceptual-weight", "0", "--device", "cpu",
           "--mixed-precision", "none", "--dataset", "digits", "--global-batch-size", "8", "--max-steps", "100",
           "--disc-start", "41", "--results-dir", str(tmp_path / "results"), "--estimate", "--estimate-steps", "2"]
    res = run(cmd, tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert re.search(r"parameters: tokenizer [\d,]+, discriminator [\d,]+", out), out
    assert "measured [before --disc-start 41]" in out and "measured [discriminator on]" in out
    assert "--max-steps 100: 100 steps" in out and "no gradient accumulation" in out
    rows = table(out)
    assert sorted(rows) == list(GPU_COUNTS), out
    assert re.search(r"^\s+1\s+8 x 1\s+100\s", rows[1]) and re.search(r"^\s+8\s+1 x 1\*", rows[8]), out
    assert tree(tmp_path) == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA peak memory and the largest-micro-batch search "
                                                          "run on a GPU only")
def test_train_c2i_estimate_on_cuda_searches_the_largest_micro_batch(tmp_path):
    codes = write_codes(tmp_path / "codes")
    (tmp_path / "cwd").mkdir()
    before = tree(tmp_path)
    cmd = train_cmd(codes, tmp_path / "results", "--estimate", "--estimate-steps", "2", "--device", "cuda",
                    "--no-compile", "--gradient-accumulation-steps", "4")
    res = run([cmd[0], str(ROOT / cmd[1]), *cmd[2:]], tmp_path / "cwd")
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "torch.cuda.max_memory_allocated" in out and "micro-batch 4 x 4 accumulation" in out
    # GPT-debug fits the whole global batch: the search ends at its limit, one micro-batch per step
    assert "largest micro-batch per GPU that fits: 16" in out and "gradient accumulation 1 (micro-batch 16)" in out
    assert re.search(r"^\s+1\s+4 x 4 .*\s16 x 1$", table(out)[1]), out
    assert tree(tmp_path) == before


def fake_plan(fit: int, micro_batch: int = 16) -> Plan:
    """A plan whose steps run out of CUDA memory (simulated) above `fit` samples per micro-batch."""
    def step_at(k: int) -> int:
        if k > fit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return 10 * k

    phase = Phase("", lambda: step_at(micro_batch), lambda gpus: 100 if 64 % gpus == 0 else 0,
                  try_micro_batch=step_at)
    return Plan(title="fake", parameters={"m": 1}, phases=[phase], global_batch=64, micro_batch=micro_batch,
                accumulation=64 // micro_batch, can_accumulate=True, device=torch.device("cpu"), precision="float32",
                warmup=1, run_summary="100 steps")


def test_the_search_reports_the_largest_fit_and_its_accumulation():
    out = io.StringIO()
    rows = {r.gpus: r for r in run_plan(fake_plan(24), 2, out, search=True)}
    text = out.getvalue()
    assert "largest micro-batch per GPU that fits: 24" in text, text
    assert "gradient accumulation 4 (micro-batch 16) for the global batch 64 on one GPU" in text, text
    assert rows[1].fit_split == (16, 4) and rows[2].fit_split == (16, 2) and rows[4].fit_split == (16, 1)
    assert re.search(r"^\s+2\s+16 x 2 .*\s16 x 2$", table(text)[2]), text


def test_a_micro_batch_that_does_not_fit_is_reported_with_the_fix():
    out = io.StringIO()
    assert run_plan(fake_plan(12, micro_batch=32), 2, out, search=True) == []
    text = out.getvalue()
    assert "the micro-batch 32 does not fit on this GPU; the largest that fits is 12: pass " \
           "--gradient-accumulation-steps 8 (micro-batch 8)" in text, text

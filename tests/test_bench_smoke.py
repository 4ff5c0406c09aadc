"""Smoke test: `bench/bench_tokenizer.py` runs end to end with the smallest flags (no torch.compile).

A benchmark is not a test; this only checks the script still starts, times both modes and checks
channels_last against eager.
"""
import subprocess
import sys

from tests.golden import ROOT


def test_bench_tokenizer_runs():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_tokenizer.py"), "--vq-model", "VQ-debug", "--batch-size", "1",
           "--image-size", "16", "--iters", "1", "--modes", "eager", "channels_last"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "weights random" in lines[0]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == {"eager", "channels_last"}
    assert "codes 100.0%" in rows["channels_last"]


def test_bench_sample_runs_with_its_baselines():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_sample.py"), "--size", "debug", "--image-size", "64",
           "--vocab-size", "64", "--num-classes", "10", "--batch-sizes", "2", "--iters", "1", "--warmup", "0",
           "--cases", "raster", "raster-naive", "par-4x"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[2:] if line.split()}
    assert rows["raster"][3] == "16" and rows["raster-naive"][3] == "16"  # steps = tokens
    assert rows["par-4x"][3] == "7"  # N/n + n - 1 = 16/4 + 3
    assert "baselines" in r.stdout


def test_bench_eval_runs():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_eval.py"), "--backends", "domain", "tf",
           "--num-images", "8", "--batch-size", "4", "--stats-samples", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "tf: skipped" in r.stdout or "tf (" in r.stdout
    assert any(line.startswith("domain:digits_classifier") for line in r.stdout.splitlines())
    assert "at 50k" in r.stdout

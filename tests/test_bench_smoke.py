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

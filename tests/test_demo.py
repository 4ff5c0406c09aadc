"""The embedded demo end to end in its --quick mode: every output file is written, the table has one
row per demo run, every registered strategy, and a rerun reuses the finished stages (quality is not checked here)."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from autoregressive.demo import demo_runs, parse_args
from autoregressive.strategies import strategy_names

ROOT = Path(__file__).resolve().parents[1]


def test_demo_quick_end_to_end(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    cmd = [sys.executable, "-m", "autoregressive.demo", "--quick", "--out", str(out), "--device", "cpu"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]

    names = [r["label"] for r in demo_runs(strategy_names(), parse_args(["--quick"]))]
    assert {r["strategy"] for r in demo_runs(strategy_names(), parse_args(["--quick"]))} == set(strategy_names())
    for f in ["results.md", "results.csv", "quality_vs_speed.png", "reconstruction.png", "timings.json",
              *(f"grid_{n}.png" for n in names)]:
        assert (out / f).is_file(), f"missing {f}"
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["strategy"] for r in rows] == names
    for r in rows:
        assert 0.0 <= float(r["class_accuracy"]) <= 1.0 and float(r["images_per_s"]) > 0
        assert float(r["demo_fid"]) == float(r["demo_fid"])  # finite, not NaN
    md = (out / "results.md").read_text()
    assert "not Inception FID" in md and all(f"| {n} |" in md for n in names)

    # A rerun trains nothing again: every stage is reused.
    rerun = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    reused = json.loads((out / "timings.json").read_text())["reused"]
    assert all(reused.values()), reused
    assert "reusing the tokenizer" in rerun.stderr

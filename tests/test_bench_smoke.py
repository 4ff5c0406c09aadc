"""Smoke test: `bench/bench_tokenizer.py` runs end to end with the smallest flags (no torch.compile).

A benchmark is not a test; this only checks the script still starts, times both modes and checks
channels_last against eager.
"""
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

from tests.golden import ROOT


def test_bench_tokenizer_runs():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_tokenizer.py"), "--vq-model", "VQ-debug", "--batch-size", "1",
           "--image-size", "16", "--iters", "1", "--modes", "eager", "channels_last"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "weights random" in lines[0]
    rows = {line.split()[0]: line for line in lines[3:]}
    assert set(rows) == {"eager", "channels_last"}
    assert "codes 100.0%" in rows["channels_last"]


SAMPLE_SMALL = ["--size", "debug", "--image-size", "64", "--vocab-size", "64", "--num-classes", "10",
                "--batch-sizes", "2", "--iters", "1", "--warmup", "0"]


def run_bench_sample(*flags: str) -> str:
    cmd = [sys.executable, str(ROOT / "bench" / "bench_sample.py"), *SAMPLE_SMALL, *flags]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def sample_table(stdout: str) -> dict[str, dict[str, str]]:
    """The console table by case: {case: {header: cell}} (columns are separated by 2+ spaces)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("case "))
    head = re.split(r"\s{2,}", lines[at].strip())
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines[at + 1:]]
    return {cols[0]: dict(zip(head, cols)) for cols in rows if len(cols) == len(head)}


def test_bench_sample_runs_with_its_baselines():
    out = run_bench_sample("--cases", "raster", "raster-naive", "par-4x")
    rows = sample_table(out)
    assert set(rows) == {"raster", "raster-naive", "par-4x"}
    assert rows["raster"]["steps"] == "16" and rows["raster-naive"]["steps"] == "16"  # steps = tokens
    assert rows["par-4x"]["steps"] == "7"  # N/n + n - 1 = 16/4 + 3
    assert "falls back to eager on CPU" in out  # default paths eager + auto: measured once on CPU
    for row in rows.values():
        assert row["path"] == "eager" and row["batch"] == "2" and row["vs eager"] == "1.00x"
        assert row["floor ms/step"] == "n/a" and row["x floor"] == "n/a"  # no bandwidth known on CPU
        images_per_s, ms_per_step = float(row["images/s"]), float(row["ms/step"])
        assert abs(2 / images_per_s * 1e3 / int(row["steps"]) / ms_per_step - 1) < 0.02  # s per call / steps
    assert rows["raster"]["vs raster"] == "1.00x"
    assert "baselines" in out


def test_bench_sample_bandwidth_floor_and_results(tmp_path):
    results = tmp_path / "R.md"
    results.write_text("# Results\n")
    flags = ["--cases", "raster", "par-4x", "--bandwidth-gbps", "20", "--results", str(results)]
    out = run_bench_sample(*flags)
    assert "bandwidth 20 GB/s (from --bandwidth-gbps)" in out.splitlines()[0]
    rows = sample_table(out)
    assert set(rows) == {"raster", "par-4x"}
    for row in rows.values():
        floor, ms = float(row["floor ms/step"]), float(row["ms/step"])
        assert 0 < floor < ms
        assert abs(float(row["x floor"]) / (ms / floor) - 1) < 0.01  # printed to 3-4 digits
    text = results.read_text()
    assert text.startswith("# Results\n\n## ")
    command = " ".join(["python bench/bench_sample.py", *SAMPLE_SMALL, *flags])
    assert f"```sh\n{command}\n```" in text
    table = [line for line in text.splitlines() if line.startswith("|")]
    head = [c.strip() for c in table[0].strip("|").split("|")]
    assert head[:4] == ["case", "model", "path", "batch"] and "x floor" in head and "vs eager" in head
    body = {cells[0]: dict(zip(head, cells)) for cells in
            ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert set(body) == {"raster", "par-4x"}
    assert body["raster"]["floor ms/step"] == rows["raster"]["floor ms/step"]


def test_bench_sample_every_path_beside_eager(monkeypatch, capsys, tmp_path):
    """The multi-path loop, on CPU: the graph path is the emulated graph runner (fast_decode's CPU
    stand-in), measured beside eager with its own runner, its caches freed after each measurement."""
    import bench.bench_sample as bench
    from autoregressive.decoding.fast_decode import GraphedSteps, StepRunner

    made = []

    def make_runner(path, device):
        made.append(StepRunner() if path == "eager" else GraphedSteps(emulate=True))
        return made[-1]

    monkeypatch.setattr(bench, "make_runner", make_runner)
    args = bench.build_parser().parse_args([*SAMPLE_SMALL, "--cases", "raster", "par-4x", "--bandwidth-gbps", "20",
                                            "--decode-paths", "cuda-graphs", "eager",
                                            "--results", str(tmp_path / "R.md")])
    rows = bench.main(args)
    assert [(r["case"], r["path"]) for r in rows] == [
        ("raster", "eager"), ("raster", "cuda-graphs (emulated)"),  # eager first: the others compare with it
        ("par-4x", "eager"), ("par-4x", "cuda-graphs (emulated)")]
    eager, graphs = rows[0], rows[1]
    assert graphs["graphs"] > 0 and eager["graphs"] == 0
    assert graphs["graph_out_mb"] > 0 and eager["graph_out_mb"] == 0  # the graphs' shared output buffers
    assert graphs["vs_eager"] == pytest.approx(graphs["images_per_s"] / eager["images_per_s"])
    assert graphs["kv_bytes"] == eager["kv_bytes"] > 0  # the same cache prefixes either way
    assert graphs["floor_ms"] == pytest.approx((graphs["weight_bytes"] + graphs["kv_bytes"]) / 20e9 * 1e3)
    assert rows[3]["speedup_vs_raster"] == pytest.approx(rows[3]["images_per_s"] / graphs["images_per_s"])
    assert all(not getattr(r, "_steps", {}) for r in made)  # every runner reset after its measurement
    assert "cuda-graphs (emulated)" in capsys.readouterr().out
    command = next(line for line in (tmp_path / "R.md").read_text().splitlines() if line.startswith("python "))
    assert "--decode-paths cuda-graphs eager" in command and "--cases raster par-4x" in command  # rebuilt from args
    assert bench.build_parser().parse_args(shlex.split(command)[2:]) == args


def test_bench_sample_weight_bytes_and_bandwidth_table():
    from bench.bench_sample import largest_batch, peak_bandwidth, weight_bytes

    class Toy(torch.nn.Module):
        def __init__(self, tied: bool):
            super().__init__()
            self.tok = torch.nn.Embedding(100, 8)  # 800 weights: gathered, not read whole
            self.proj = torch.nn.Linear(8, 8)  # 72
            self.head = torch.nn.Linear(8, 100, bias=False)  # 800, or the embedding table when tied
            if tied:
                self.head.weight = self.tok.weight

    assert weight_bytes(Toy(tied=False)) == (72 + 800) * 4
    assert weight_bytes(Toy(tied=True)) == (72 + 800) * 4  # the tied table is read whole by the head
    assert weight_bytes(Toy(tied=False).to(torch.bfloat16)) == (72 + 800) * 2

    names = {"NVIDIA H100 80GB HBM3": 3350, "NVIDIA H100 PCIe": 2000, "NVIDIA H100 NVL": 3900, "NVIDIA H200": 4800,
             "NVIDIA A100-SXM4-80GB": 2039, "NVIDIA A100 80GB PCIe": 1935, "NVIDIA A100-PCIE-40GB": 1555,
             "NVIDIA A100-SXM4-40GB": 1555, "NVIDIA L40S": 864, "NVIDIA L4": 300, "NVIDIA A10": 600,
             "NVIDIA A10G": 600, "NVIDIA GeForce RTX 4090": 1008}
    assert {n: peak_bandwidth(n)[0] for n in names} == names
    assert peak_bandwidth("NVIDIA GH200 480GB") is None and peak_bandwidth("NVIDIA L40") is None

    fits = lambda b: {"batch": b} if b <= 40 else None  # noqa: E731
    assert largest_batch(fits, 4, {"batch": 4}, 2048) == (32, {"batch": 32})  # 64 does not fit
    assert largest_batch(fits, 4, {"batch": 4}, 16) == (16, {"batch": 16})  # --max-batch
    assert largest_batch(fits, 64, {"batch": 64}, 2048) == (64, {"batch": 64})


def test_bench_eval_runs():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_eval.py"), "--backends", "domain", "tf",
           "--num-images", "8", "--batch-size", "4", "--stats-samples", "64"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "tf: skipped" in r.stdout or "tf (" in r.stdout
    assert any(line.startswith("domain:digits_classifier") for line in r.stdout.splitlines())
    assert "at 50k" in r.stdout


def test_bench_pack_runs_and_appends_its_table(tmp_path):
    results = tmp_path / "R.md"
    flags = ["--num-images", "40", "--image-size", "8", "--shard-size", "7", "--total", "38",
             "--workdir", str(tmp_path), "--results", str(results)]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pack.py"), *flags], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines() if line.split()[:1] in (["in-memory"],
                                                                                                   ["streamed"])}
    assert set(rows) == {"in-memory", "streamed"} and all(float(v[1]) > 0 for v in rows.values())
    assert "outputs array-identical" in r.stdout
    assert list(tmp_path.iterdir()) == [results]  # the shards and outputs are removed
    text = results.read_text()
    assert text.startswith("## ") and f"```sh\npython bench/bench_pack.py {' '.join(flags)}\n```" in text
    assert "| streamed |" in text and "| in-memory |" in text
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_pack.py"), "--shard-size", "0"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "error: --shard-size must be >= 1" in r.stderr


def test_bench_codes_io_reads_both_layouts(tmp_path):
    results = tmp_path / "RESULTS.md"
    cmd = [sys.executable, str(ROOT / "bench" / "bench_codes_io.py"), "--num-images", "300", "--shard-size", "128",
           "--batch-size", "32", "--num-workers", "0", "--num-tokens", "16", "--workdir", str(tmp_path / "w"),
           "--results", str(results)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = [line.split("|")[1:-1] for line in r.stdout.splitlines() if line.startswith("| per-image") or
            line.startswith("| packed")]
    assert [(c[0].strip(), c[1].strip()) for c in rows] == [("per-image", "cold"), ("packed", "cold"),
                                                           ("per-image", "warm"), ("packed", "warm")]
    assert [c[2].strip() for c in rows[:2]] == ["600", "3"]  # files: 2 per image vs 3 shards
    assert all(float(c[6].replace(",", "")) > 0 for c in rows)
    assert "training input, per-image files vs packed shards" in results.read_text()
    assert list((tmp_path / "w").iterdir()) == []  # the codes it wrote are removed
def test_bench_extract_runs_and_appends(tmp_path):
    """`bench/bench_extract.py` at the smallest size: batch 1 is always measured first, every batch
    size's codes equal batch 1's, and `--results` appends a dated section with the command."""
    results = tmp_path / "R.md"
    results.write_text("# Results\n")
    flags = ["--vq-model", "VQ-debug", "--codebook-size", "64", "--image-size", "32", "--num-images", "3",
             "--batch-sizes", "2", "--results", str(results)]
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_extract.py"), *flags], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    rows = [line.split(" | ") for line in r.stdout.splitlines() if re.match(r"\| \d", line)]
    assert [row[0].strip("| ") for row in rows] == ["1", "2"]
    assert [row[1] for row in rows] == ["10", "20"]  # ten-crop views per forward
    assert rows[0][4] == "1.00x" and all(row[5] == "0 of 1920" for row in rows)  # 3 images x 10 views x 64
    assert "PIL transform excluded" in r.stdout and "smallest distance margin over all 1920 tokens" in r.stdout
    text = results.read_text()
    assert text.startswith("# Results\n\n## ") and "code extraction, batch 1 vs batch B" in text
    assert f"```sh\n{shlex.join(['python', 'bench/bench_extract.py', *flags])}\n```" in text


def test_gpu_check_without_a_gpu_prints_its_plan_and_every_command_parses():
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "no CUDA device here; nothing was run" in r.stdout
    commands = [shlex.split(line) for line in r.stdout.splitlines() if line.startswith("  ")]
    assert len(commands) == 5
    import bench.bench_sample as bench_sample
    import bench.bench_train as bench_train
    parsers = {"bench/bench_sample.py": bench_sample.build_parser(), "bench/bench_train.py": bench_train.build_parser()}
    for cmd in commands:
        if cmd[1] == "-m":  # the GPU-only tests
            assert all((ROOT / f).is_file() for f in cmd if f.startswith("tests/"))
            continue
        args = parsers[cmd[1]].parse_args(cmd[2:])  # every flag exists and takes its value
        assert args.device == "cuda"
    bad = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("gpu_check.sh: error: unknown argument --bogus")


def test_gpu_check_appends_one_dated_section_with_the_device(tmp_path):
    """The GPU branch, run with a stand-in python that reports a GPU and echoes each step."""
    fake = tmp_path / "python"
    fake.write_text('#!/usr/bin/env bash\nif [ "$1" = "-c" ]; then\n'
                    '  case "$2" in *get_device_properties*) echo "Fake GPU 80GB, 80 GiB";; esac; exit 0\nfi\n'
                    'printf "ran %s\\r 50%%|#####     |\\n" "$*"\nexit 0\n')
    fake.chmod(0o755)
    results = tmp_path / "RESULTS.md"
    results.write_text("# results\n")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--results", str(results)], capture_output=True,
                       text=True, cwd=ROOT, env={**os.environ, "PYTHON": str(fake)})
    assert r.returncode == 0, r.stdout + r.stderr
    text = results.read_text()
    assert text.count("\n## ") == 1 and "GPU check on Fake GPU 80GB, 80 GiB" in text and "0 step(s) failed" in text
    assert text.count("exit status 0") == 5 and "ran bench/bench_sample.py --device cuda --size XL" in text
    assert "50%|" not in text  # progress bars are dropped


def test_bench_sample_kernel_report():
    out = run_bench_sample("--cases", "raster", "--kernel-report", "--decode-paths", "eager")
    line = next(x for x in out.splitlines() if "attention kernels:" in x)
    assert line.startswith("raster") and "(head dim 32, float32, additive mask, cpu) x" in line  # one mask per step

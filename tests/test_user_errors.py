"""Every command-line entry point on a user's mistake: exit status 2, exactly one `error:` line
that names the flag or file, no traceback, and the file system exactly as it was.

Each case runs the entry point as a user would (a subprocess, from a scratch working folder, so
that default output folders such as `results/` would show up) and compares the whole tree of the
test's folder before and after. Some cases are then run corrected, and must succeed.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive.strategies import get_strategy
from dataset.image_folder import write_class_index
from tests.test_train_c2i import write_codes
from tokenizer.vq_model import VQ_models
from utils.checkpoint import save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A scratch folder with what the commands read: codes, a tiny GPT and VQ, an image, batches."""
    d = tmp_path_factory.mktemp("world")
    write_codes(d / "codes")
    torch.manual_seed(0)
    vq = VQ_models["VQ-debug"](codebook_size=64)
    save_checkpoint({"model": vq.state_dict(), "vq_model": "VQ-debug", "vq_config": asdict(vq.config)}, d / "vq.pt")
    gpt = get_strategy("raster").build_model("GPT-debug", vocab_size=64, block_size=16, num_classes=10)
    save_checkpoint({"model": gpt.state_dict(), "args": {"strategy": "raster", "gpt_model": "GPT-debug",
                                                         "image_size": 16, "downsample_size": 4, "vocab_size": 64,
                                                         "num_classes": 10, "cls_token_num": 1}}, d / "gpt.pt")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "image.png")
    (d / "broken.png").write_bytes(b"not a png")
    rng = np.random.RandomState(0)
    np.savez(d / "ref.npz", arr_0=rng.randint(0, 256, (8, 16, 16, 3)).astype(np.uint8))
    np.savez(d / "nchw.npz", arr_0=rng.randint(0, 256, (8, 3, 16, 16)).astype(np.uint8))
    np.savez(d / "float.npz", arr_0=rng.rand(8, 16, 16, 3).astype(np.float32))
    np.savez(d / "small.npz", arr_0=rng.randint(0, 256, (8, 8, 8, 3)).astype(np.uint8))
    (d / "gpt-run" / "checkpoints").mkdir(parents=True)  # a GPT run, for --resume of the wrong trainer
    save_checkpoint({"model": {}, "args": {"strategy": "raster"}, "data_pos": 0}, d / "gpt-run" / "checkpoints" / "0000001.pt")
    # class maps: a GPT that carries one, codes with one and a run trained on another, a class-folder
    # tree (folders a, b) and map files for it
    save_checkpoint({"model": gpt.state_dict(), "class_to_idx": {c: i for i, c in enumerate(DIGIT_NAMES)},
                     "args": {"strategy": "raster", "gpt_model": "GPT-debug", "image_size": 16, "downsample_size": 4,
                              "vocab_size": 64, "num_classes": 10, "cls_token_num": 1}}, d / "gpt-map.pt")
    write_codes(d / "codes-map")
    write_class_index(d / "codes-map" / "digits16_codes", {str(i): i for i in range(10)})
    save_checkpoint({"model": {}, "args": {"strategy": "raster"}, "data_pos": 0,
                     "class_to_idx": {c: i for i, c in enumerate(DIGIT_NAMES)}},
                    d / "gpt-run-map" / "checkpoints" / "0000001.pt")
    for c in ("a", "b"):
        (d / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(d / "imgs" / c / "0.png")
    (d / "map-a.json").write_text('{"a": 0}')
    (d / "map-gap.json").write_text('{"a": 0, "b": 2}')
    (d / "map-dup.json").write_text('{"a": 1, "b": 1}')
    (d / "cwd").mkdir()
    return d


TRAIN = ["autoregressive/train/train_c2i.py", "--code-path", "{w}/codes", "--dataset", "digits", "--image-size", "16",
         "--downsample-size", "4", "--vocab-size", "64", "--num-classes", "10", "--gpt-model", "GPT-debug",
         "--global-batch-size", "16", "--num-workers", "0", "--results-dir", "{w}/results", "--device", "cpu",
         "--max-steps", "1", "--no-compile", "--mixed-precision", "none"]
MODELS = ["--gpt-ckpt", "{w}/gpt.pt", "--vq-ckpt", "{w}/vq.pt", "--vq-model", "VQ-debug", "--codebook-size", "64",
          "--image-size", "16", "--image-size-eval", "16", "--downsample-size", "4", "--num-classes", "10",
          "--device", "cpu"]
SAMPLE = ["autoregressive/sample/sample_c2i_ddp.py", *MODELS, "--num-fid-samples", "8", "--per-proc-batch-size", "4",
          "--sample-dir", "{w}/samples"]
GRID = ["autoregressive/sample/sample_c2i.py", *MODELS, "--classes", "1", "2", "--out", "{w}/grid.png"]
EDIT = ["autoregressive/sample/edit.py", *MODELS, "--image", "{w}/image.png", "--class-id", "1", "--box", "0,0,8,8",
        "--out", "{w}/edit.png"]
ORDERS = ["-m", "autoregressive.sample.lpd_orders", "--grid", "4", "--out", "{w}/orders.json", "--workers", "1"]
VQTRAIN = ["tokenizer/train_vq.py", "--vq-model", "VQ-debug", "--codebook-size", "64", "--image-size", "32",
           "--num-workers", "0", "--perceptual-weight", "0", "--device", "cpu", "--mixed-precision", "none",
           "--dataset", "digits", "--global-batch-size", "8", "--max-steps", "1", "--results-dir", "{w}/vq-results"]
EXTRACT = ["autoregressive/train/extract_codes_c2i.py", "--dataset", "digits", "--image-size", "16", "--vq-model",
           "VQ-debug", "--codebook-size", "64", "--vq-ckpt", "{w}/vq.pt", "--code-path", "{w}/new-codes", "--num-workers",
           "0", "--device", "cpu", "--no-flip"]
RECON = ["tokenizer/reconstruction_vq_ddp.py", "--vq-ckpt", "{w}/vq.pt", "--vq-model", "VQ-debug", "--codebook-size",
         "64", "--dataset", "digits", "--image-size", "16", "--image-size-eval", "16", "--sample-dir", "{w}/recon",
         "--num-workers", "0", "--device", "cpu"]
FOLDER = ["--dataset", "folder", "--data-path", "{w}/imgs"]
WITH_MAP = {"{w}/gpt.pt": "{w}/gpt-map.pt"}


def swap(cmd: list[str], changes: dict[str, str]) -> list[str]:
    return [changes.get(a, a) for a in cmd]


EVAL = ["evaluations/c2i/evaluator.py", "--backend", "torch", "--weights", "{w}/inception.pth", "--is-split-size", "4"]

#: (id, command, text the single error line must contain)
CASES = [
    # GPT training
    ("train-foreign-flag", TRAIN + ["--strategy", "raster", "--ls", "0.3"], "--ls is a flag of --strategy var"),
    ("train-size-of-other-strategy", TRAIN + ["--gpt-model", "ARPG-debug"], "--gpt-model 'ARPG-debug'"),
    ("train-resume-typo", TRAIN + ["--resume", "{w}/results/000-typo"], "--resume"),
    ("train-accumulation", TRAIN + ["--gradient-accumulation-steps", "3"], "--global-batch-size 16"),
    ("train-no-codes", [a.replace("{w}/codes", "{w}/no-codes") for a in TRAIN], "no-codes"),
    ("train-alias-conflict", TRAIN + ["--strategy", "var", "--bs", "32"] + ["--global-batch-size", "16"], "--bs 32"),
    ("train-zero-epochs", TRAIN + ["--epochs", "0"], "--epochs must be >= 1"),
    ("train-zero-classes", TRAIN + ["--num-classes", "0"], "--num-classes"),
    ("train-image-size", TRAIN + ["--image-size", "18"], "--image-size 18"),
    ("train-vocabulary", TRAIN + ["--vocab-size", "32"], "32"),
    ("train-tokenizer-checkpoint", TRAIN + ["--gpt-ckpt", "{w}/vq.pt"], "--gpt-ckpt"),
    ("train-zero-log-every", TRAIN + ["--log-every", "0"], "--log-every"),
    ("train-estimate-zero-steps", TRAIN + ["--estimate", "--estimate-steps", "0"], "--estimate-steps"),
    ("train-estimate-resume", TRAIN + ["--estimate", "--resume", "{w}/gpt-run"], "--estimate plans a new run"),
    ("train-resume-other-class-map", swap(TRAIN, {"{w}/codes": "{w}/codes-map"}) + ["--resume", "{w}/gpt-run-map"],
     "class map mismatch"),
    # large-scale sampling
    ("sample-negative-cfg", SAMPLE + ["--cfg-scale", "-1"], "cfg_scale"),
    ("sample-zero-samples", SAMPLE + ["--num-fid-samples", "0"], "--num-fid-samples"),
    ("sample-image-size", SAMPLE + ["--image-size", "30"], "--image-size"),
    ("sample-zero-batch", SAMPLE + ["--per-proc-batch-size", "0"], "--per-proc-batch-size"),
    ("sample-missing-checkpoint", SAMPLE + ["--gpt-ckpt", "{w}/missing.pt"], "missing.pt"),
    ("sample-top-p", SAMPLE + ["--top-p", "0"], "--top-p"),
    ("sample-temperature", SAMPLE + ["--temperature", "-1"], "--temperature"),
    ("sample-foreign-flag", SAMPLE + ["--spe-token-num", "15"], "--spe-token-num is a flag of --strategy par"),
    ("sample-zero-classes", SAMPLE + ["--num-classes", "0"], "--num-classes"),
    ("sample-wrong-size", SAMPLE + ["--gpt-model", "GPT-B"], "GPT-B"),
    ("sample-wrong-strategy", SAMPLE + ["--strategy", "lpd"], "lpd"),
    ("sample-class-map-beyond-num-classes", swap(SAMPLE, WITH_MAP) + ["--num-classes", "5"], "does not cover"),
    # grid sampling and editing
    ("grid-zero-per-class", GRID + ["--per-class", "0"], "--per-class"),
    ("grid-class-out-of-range", GRID + ["--classes", "10"], "--classes 10"),
    ("grid-cfg", GRID + ["--cfg-scale", "0.5"], "cfg_scale"),
    ("grid-class-name-without-map", GRID + ["--classes", "dog"], "carries no class map"),
    ("grid-unknown-class-name", swap(GRID, WITH_MAP) + ["--classes", "sevn"], "did you mean 'seven'"),
    ("edit-unknown-class-name", swap(EDIT, WITH_MAP) + ["--strategy", "arpg", "--class-id", "cat"], "'cat'"),
    ("edit-raster-cannot", EDIT + ["--strategy", "raster"], "--strategy raster cannot edit"),
    ("edit-missing-image", EDIT + ["--strategy", "arpg", "--image", "{w}/missing.png"], "missing.png"),
    ("edit-broken-image", EDIT + ["--strategy", "arpg", "--image", "{w}/broken.png"], "broken.png"),
    ("edit-class-id", EDIT + ["--strategy", "arpg", "--class-id", "10"], "--class-id"),
    # order files
    ("orders-no-steps", ORDERS, "--steps"),
    ("orders-zero", ORDERS + ["--steps", "4", "--num-orders", "0"], "--num-orders"),
    ("orders-no-table", ORDERS + ["--steps", "7"], "--sample-schedule"),
    # evaluator: batches are checked before the (absent) weights
    ("eval-nchw", EVAL + ["{w}/ref.npz", "{w}/nchw.npz"], "NCHW"),
    ("eval-float", EVAL + ["{w}/ref.npz", "{w}/float.npz"], "uint8"),
    ("eval-missing", EVAL + ["{w}/nope.npz", "{w}/ref.npz"], "nope.npz"),
    ("eval-sizes-differ", EVAL + ["{w}/ref.npz", "{w}/small.npz"], "16x16"),
    ("eval-no-weights", EVAL + ["{w}/ref.npz", "{w}/ref.npz"], "inception.pth"),
    # tokenizer training, extraction, reconstruction
    ("vq-image-size", VQTRAIN + ["--image-size", "30"], "--image-size 30"),
    ("vq-resume-typo", VQTRAIN + ["--resume", "{w}/vq-results/000-typo"], "--resume"),
    ("vq-resume-and-ckpt", VQTRAIN + ["--resume", "{w}/vq-results", "--vq-ckpt", "{w}/vq.pt"], "--resume"),
    ("vq-resume-a-gpt-run", VQTRAIN + ["--resume", "{w}/gpt-run"], "train_c2i.py"),
    ("vq-finetune-without-ckpt", VQTRAIN + ["--finetune"], "--finetune"),
    ("vq-estimate-zero-steps", VQTRAIN + ["--estimate", "--estimate-steps", "0"], "--estimate-steps"),
    ("extract-missing-tokenizer", [a.replace("{w}/vq.pt", "{w}/missing-vq.pt") for a in EXTRACT], "missing-vq.pt"),
    ("extract-image-size", EXTRACT + ["--image-size", "18"], "--image-size 18"),
    ("extract-codebook", EXTRACT + ["--codebook-size", "512"], "--codebook-size"),
    ("extract-class-map-unnamed-folder", EXTRACT + FOLDER + ["--class-map", "{w}/map-a.json"], "does not name"),
    ("extract-class-map-gap", EXTRACT + FOLDER + ["--class-map", "{w}/map-gap.json"], "without gaps"),
    ("extract-class-map-of-digits", EXTRACT + ["--class-map", "{w}/map-a.json"], "--class-map"),
    ("vq-class-map-duplicate-ids", VQTRAIN + FOLDER + ["--class-map", "{w}/map-dup.json"], "must be unique"),
    ("recon-class-map-missing", RECON + FOLDER + ["--class-map", "{w}/nope.json"], "nope.json"),
    ("recon-split-of-a-folder", RECON + ["--dataset", "folder", "--data-path", "{w}", "--split", "train"], "--split"),
    ("recon-image-size", RECON + ["--image-size", "18"], "--image-size 18"),
    # downloads, presets, benches
    ("download-unknown", ["scripts/download_models.py", "nope.pt", "--dest", "{w}/models"], "nope.pt"),
    ("reproduce-unknown", ["-m", "autoregressive.reproduce", "llamagen", "NOPE", "--dry-run",
                           "--models-dir", "{w}/models", "--sample-dir", "{w}/samples"], "NOPE"),
    ("reproduce-nothing", ["-m", "autoregressive.reproduce"], "method"),
    ("reproduce-vq-without-data", ["-m", "autoregressive.reproduce", "vq", "VQ-16", "--models-dir", "{w}/models",
                                   "--sample-dir", "{w}/samples"], "--data-path"),
    # export to the official layout
    ("export-no-ema", ["scripts/export_official.py", "{w}/gpt.pt", "--out", "{w}/export.pt", "--ema"], "EMA"),
    ("export-not-ours", ["scripts/export_official.py", "{w}/ref.npz", "--out", "{w}/export.pt"], "ref.npz"),
    ("export-a-resume-stub", ["scripts/export_official.py", "{w}/gpt-run/checkpoints/0000001.pt", "--out",
                              "{w}/export.pt"], "train_c2i.py"),
    ("bench-sample-zero-batch", ["bench/bench_sample.py", "--batch-sizes", "0", "--cases", "raster"], "--batch-sizes"),
]


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under `root`: relative path -> (size, mtime in ns)."""
    return {str(p.relative_to(root)): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def run(world: Path, cmd: list[str], debug: bool = False) -> subprocess.CompletedProcess:
    argv = [a.replace("{w}", str(world)) for a in cmd]
    if not argv[0].startswith("-"):
        argv[0] = str(ROOT / argv[0])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("AR_DEBUG", None)
    if debug:
        env["AR_DEBUG"] = "1"
    return subprocess.run([sys.executable, *argv], cwd=world / "cwd", env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def refused(world) -> dict:
    """Every case run once, a few at a time (each is a fresh interpreter, mostly importing torch), with
    the file tree before and after all of them: a refused run must leave it unchanged."""
    before = tree(world)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2) + 1) as pool:
        results = dict(zip([c[0] for c in CASES], pool.map(lambda c: run(world, c[1]), CASES)))
    return {"results": results, "before": before, "after": tree(world)}


@pytest.mark.parametrize("name, cmd, names", CASES, ids=[c[0] for c in CASES])
def test_a_user_error_is_one_line_exit_2(refused, name, cmd, names):
    res = refused["results"][name]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert res.returncode == 2, f"exit {res.returncode}\n{res.stderr[-3000:]}"
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert names in errors[0], errors[0]


def test_refused_runs_write_nothing(refused):
    before, after = refused["before"], refused["after"]
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"the refused runs changed the file system: {changed[:20]}"


def test_there_are_enough_cases_over_every_kind_of_entry_point():
    scripts = {c[1][0] if not c[1][0].startswith("-") else c[1][1] for c in CASES}
    assert len(CASES) >= 30 and len(scripts) >= 9


def test_corrected_reruns_succeed(world):
    """The same commands with the mistake fixed run (and now write their outputs)."""
    ok = run(world, GRID + ["--per-class", "1", "--cfg-scale", "1.5"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (world / "grid.png").is_file()
    ok = run(world, ORDERS + ["--steps", "4", "--num-orders", "3", "--sample-schedule", "cosine"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert (world / "orders.json").is_file()
    ok = run(world, SAMPLE + ["--cfg-scale", "1.5"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert list((world / "samples").glob("*.npz"))
    ok = run(world, ["scripts/export_official.py", "{w}/gpt.pt", "--out", "{w}/export.pt"])
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert list(torch.load(world / "export.pt", weights_only=True)) == ["model"]


def test_debug_shows_the_traceback(world):
    res = run(world, GRID + ["--per-class", "0"], debug=True)
    assert res.returncode != 0 and "Traceback" in res.stderr and "--per-class" in res.stderr

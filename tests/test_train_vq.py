"""Tokenizer training: the loss falls, a killed run resumes to the same weights, LPIPS weights, torchrun."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dataset.digits import digit_to_pil, load_digits_arrays
from tests.torchrun import torchrun
from tokenizer.losses import PerceptualWeightsMissing
from tokenizer.train_vq import get_parser, main
from utils.checkpoint import CheckpointError, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--vq-model", "VQ-debug", "--codebook-size", "512", "--image-size", "32", "--num-workers", "0",
        "--perceptual-weight", "0", "--device", "cpu", "--mixed-precision", "none"]


def run(argv):
    parser = get_parser()
    args = parser.parse_args(argv)
    main(args, {k: parser.get_default(k) for k in vars(args)})


def only_run(results: Path) -> Path:
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


def env1():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory):
    """40 digits as a class-folder tree: 5 steps per epoch at batch 8, so runs cross epochs."""
    root = tmp_path_factory.mktemp("digits_folder")
    images, labels = load_digits_arrays("train")
    for i in range(40):
        d = root / str(labels[i])
        d.mkdir(exist_ok=True)
        digit_to_pil(images[i], 32).save(d / f"{i:03d}.png")
    return root


def test_reconstruction_loss_falls_on_digits(tmp_path):
    run(TINY + ["--dataset", "digits", "--global-batch-size", "16", "--max-steps", "30", "--log-every", "1",
                "--disc-start", "1000", "--ckpt-every", "1000", "--results-dir", str(tmp_path)])
    run_dir = only_run(tmp_path)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rec = [r["rec"] for r in rows]
    assert len(rec) == 30
    first, last = sum(rec[:5]) / 5, sum(rec[-5:]) / 5
    assert last < 0.7 * first, rec
    assert all(0 < r["codebook_usage"] <= 1 for r in rows)
    assert "rec" in (run_dir / "log.txt").read_text()
    ckpt = load_checkpoint(run_dir / "checkpoints" / "0000030.pt")
    assert {"model", "optimizer", "discriminator", "optimizer_disc", "steps", "args", "vq_model", "vq_config",
            "epoch", "batch_in_epoch", "rng"} <= set(ckpt)
    assert ckpt["steps"] == 30 and isinstance(ckpt["args"], dict) and ckpt["vq_model"] == "VQ-debug"


def test_killed_run_resumes_to_the_same_weights(tmp_path, small_folder):
    common = TINY + ["--dataset", "folder", "--data-path", str(small_folder), "--global-batch-size", "8",
                     "--max-steps", "12", "--ckpt-every", "3", "--log-every", "4", "--disc-start", "2",
                     "--ema", "--dead-code-restart", "4", "--dropout-p", "0.1"]
    torch.set_num_threads(1)
    run(common + ["--results-dir", str(tmp_path / "straight")])
    straight = load_checkpoint(only_run(tmp_path / "straight") / "checkpoints" / "0000012.pt")

    # A real interruption: SIGKILL as soon as the first checkpoint is on disk.
    cmd = [sys.executable, str(ROOT / "tokenizer" / "train_vq.py"), *common, "--results-dir", str(tmp_path / "cut")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env1(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while proc.poll() is None:  # no wall-clock limit: a slow machine only waits longer
        if (tmp_path / "cut").is_dir() and list((tmp_path / "cut").glob("*/checkpoints/0000003.pt")):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    cut_dir = only_run(tmp_path / "cut")
    done = sorted(p.name for p in (cut_dir / "checkpoints").glob("*.pt"))
    assert done and "0000012.pt" not in done, (done, err.decode()[-2000:])

    run(common + ["--resume", str(cut_dir)])
    resumed = load_checkpoint(cut_dir / "checkpoints" / "0000012.pt")
    assert resumed["steps"] == straight["steps"] == 12
    assert (resumed["epoch"], resumed["batch_in_epoch"]) == (straight["epoch"], straight["batch_in_epoch"]) == (2, 2)
    for key in ("model", "ema", "discriminator"):
        for name, t in straight[key].items():
            assert torch.equal(resumed[key][name], t), f"{key}.{name}"
    for name, t in straight["optimizer"]["state"][0].items():
        assert torch.equal(resumed["optimizer"]["state"][0][name], t)
    assert torch.equal(resumed["code_usage"]["last_used"], straight["code_usage"]["last_used"])


def test_missing_perceptual_weights_stop_with_instructions(tmp_path):
    i = TINY.index("--perceptual-weight")
    argv = TINY[:i] + TINY[i + 2:]  # the default perceptual weight 1.0
    argv += ["--dataset", "digits", "--global-batch-size", "8", "--max-steps", "1", "--results-dir", str(tmp_path),
             "--perceptual-ckpt", str(tmp_path / "lpips" / "vgg.pth"),
             "--perceptual-vgg-ckpt", str(tmp_path / "lpips" / "vgg16-397923af.pth")]
    with pytest.raises(PerceptualWeightsMissing) as e:
        run(argv)
    msg = str(e.value)
    for part in ("vgg.pth", "d507d7349b931f0638a25a48a722f98a", "https://download.pytorch.org/models/vgg16-397923af.pth",
                 str(tmp_path / "lpips" / "vgg.pth"), "--perceptual-weight 0", "--download-perceptual"):
        assert part in msg, part
    assert not any(tmp_path.glob("0*")), "no run folder is made for a run that cannot start"
    # A file that is there but not the published one is refused by its checksum.
    (tmp_path / "lpips").mkdir()
    torch.save({f"lin{k}.model.1.weight": torch.zeros(1, c, 1, 1) for k, c in enumerate((64, 128, 256, 512, 512))},
               tmp_path / "lpips" / "vgg.pth")
    (tmp_path / "lpips" / "vgg16-397923af.pth").write_bytes(b"not a checkpoint")
    with pytest.raises((PerceptualWeightsMissing, CheckpointError), match="md5"):
        run(argv)


def test_torchrun_two_ranks(tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun is not on PATH")
    cmd = [*torchrun(2), str(ROOT / "tokenizer" / "train_vq.py"),
           *TINY, "--dataset", "digits", "--global-batch-size", "8", "--max-steps", "2", "--log-every", "1",
           "--disc-start", "1", "--disc-adaptive-weight", "--results-dir", str(tmp_path)]
    res = subprocess.run(cmd, cwd=ROOT, env=env1(), capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    ckpt = load_checkpoint(only_run(tmp_path) / "checkpoints" / "0000002.pt")
    assert ckpt["steps"] == 2 and len(ckpt["rng"]) == 2

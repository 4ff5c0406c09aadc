"""The reproduce command: every preset row is valid for the sampler (or, for the tokenizers' rows, for
the reconstruction), and a run samples (reconstructs) with torchrun, evaluates, and prints the
published beside the measured numbers."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive import reproduce
from autoregressive.sample import sample_c2i_ddp
from autoregressive.strategies import strategy_names
from tests.test_sample_ddp import ckpts  # noqa: F401  (the tiny GPT + tokenizer fixture)
from tests.torchrun import free_port
from utils.download import get_checkpoint


ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("row", reproduce.load_presets(kind="gpt"), ids=lambda r: f"{r['method']}-{r['name']}")
def test_every_preset_row_is_a_valid_sampling_command(row, tmp_path):
    assert row["strategy"] in strategy_names()
    for flag in reproduce.FILE_FLAGS:
        get_checkpoint(row["sample_flags"][flag])  # a registry name (raises otherwise)
    assert get_checkpoint(row["reference"])["method"] == "aux"
    assert row["published"]["fid"] > 0
    files = {n: tmp_path / n for n in [row["sample_flags"][f] for f in reproduce.FILE_FLAGS] + [row["reference"]]}
    argv = reproduce.sample_argv(row, files, tmp_path, 32, 50000)
    args = sample_c2i_ddp.build_parser().parse_args(argv)  # every flag exists with a valid value
    assert args.strategy == row["strategy"] and args.num_fid_samples == 50000


@pytest.mark.parametrize("row", reproduce.load_presets(kind="vq"), ids=lambda r: f"{r['method']}-{r['name']}")
def test_every_vq_preset_row_is_a_valid_reconstruction_command(row, tmp_path):
    from tokenizer import reconstruction_vq_ddp

    entry = get_checkpoint(row["recon_flags"]["vq-ckpt"])
    assert entry["method"] == "llamagen_vq" and entry["model"] == row["recon_flags"]["vq-model"]
    assert row["published"]["fid"] > 0 and "reference" not in row  # rFID is measured against the run's own
    files = {row["recon_flags"]["vq-ckpt"]: tmp_path / "vq.pt"}
    argv = reproduce.recon_argv(row, files, tmp_path, 32, "/data/imagenet/val")
    args = reconstruction_vq_ddp.get_parser().parse_args(argv)  # every flag exists with a valid value
    assert args.vq_model == row["recon_flags"]["vq-model"] and args.dataset == "imagenet"
    assert args.image_size == args.image_size_eval == 256


def test_published_rfids_are_the_llamagen_readme_values():
    rfid = {r["name"]: r["published"]["fid"] for r in reproduce.load_presets(kind="vq")}
    assert rfid == {"VQ-16": 2.19, "VQ-8": 0.59}


def test_vq_dry_run_prints_the_download_reconstruction_and_evaluation(tmp_path):
    res = subprocess.run(["bash", "scripts/reproduce.sh", "vq", "VQ-16", "--dry-run", "--models-dir",
                          str(tmp_path / "m"), "--sample-dir", str(tmp_path / "s")],
                         cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = {line.split(":")[0]: line for line in res.stdout.splitlines()}
    assert "scripts/download_models.py vq_ds16_c2i.pt --dest" in lines["download"]
    recon = lines["reconstruct"]
    assert "torch.distributed.run --nproc_per_node=8" in recon and "tokenizer/reconstruction_vq_ddp.py" in recon
    assert f"--vq-ckpt {tmp_path / 'm' / 'vq_ds16_c2i.pt'}" in recon and "--vq-model VQ-16" in recon
    assert "--data-path /path/to/imagenet/val" in recon and "--data-path" in lines["note"]
    ref = tmp_path / "s" / "val_imagenet-size-256.npz"
    assert lines["evaluate"].split()[-4:-2] == [str(ref), str(
        tmp_path / "s" / "VQ-16-vq_ds16_c2i-imagenet-size-256-size-256-codebook-size-16384-dim-8-seed-0.npz")]
    assert not (tmp_path / "m").exists() and not (tmp_path / "s").exists()  # a dry run writes nothing


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="GPT-L-384"):
        reproduce.find_preset("llamagen", "GPT-Q-999")


class TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(16 * 16 * 3, 8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x):
        f = self.proj(x.flatten(1))
        return f, self.head(f)


def test_reproduce_end_to_end_with_torchrun(ckpts, tmp_path, capsys, monkeypatch):  # noqa: F811
    from evaluations.c2i.features import DomainBackend

    rng = np.random.RandomState(0)
    np.savez(tmp_path / "ref.npz", arr_0=rng.randint(0, 256, (40, 16, 16, 3), dtype=np.uint8))
    row = {"method": "tiny", "name": "debug", "strategy": "raster",
           "sample_flags": {"gpt-ckpt": "gpt.pt", "vq-ckpt": "vq.pt", "vq-model": "VQ-debug", "codebook-size": 64,
                            "image-size": 16, "image-size-eval": 16, "downsample-size": 4, "num-classes": 10,
                            "cfg-scale": 2.0, "device": "cpu"},
           "reference": "ref.npz", "published": {"fid": 1.0, "inception_score": 2.0}}
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"presets": [row]}))
    where = {"gpt.pt": ckpts / "gpt.pt", "vq.pt": ckpts / "vq.pt", "ref.npz": tmp_path / "ref.npz"}
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = reproduce.build_parser().parse_args(
        ["tiny", "debug", "--presets", str(presets), "--nproc-per-node", "2", "--num-fid-samples", "20",
         "--per-proc-batch-size", "5", "--sample-dir", str(tmp_path / "s"), "--is-split-size", "10",
         "--master-port", str(free_port())])
    report = reproduce.main(args, backend=DomainBackend(TinyFeatures(), "tiny", preprocess=lambda x: x.float() / 255,
                                                        device="cpu"),
                            download=lambda name, d: where[name])
    out = capsys.readouterr().out
    assert "| FID | 1.0 |" in out and "| Inception Score | 2.0 |" in out
    assert report["measured"]["num_samples"] == 20 and report["measured"]["fid"] > 0
    with np.load(report["npz"]) as npz:
        assert npz["arr_0"].shape == (20, 16, 16, 3)
    assert json.loads(open(report["npz"].replace(".npz", ".reproduce.json")).read())["measured"]["backend"] == "domain:tiny"


def test_reproduce_reconstruction_end_to_end_with_torchrun(ckpts, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A `vq` row on the tiny tokenizer and the digits' held-out split: torchrun reconstruction, rFID
    against the reconstruction's own reference batch, PSNR and SSIM, beside the published numbers."""
    from evaluations.c2i.features import DomainBackend

    row = {"kind": "vq", "method": "tinyvq", "name": "debug",
           "recon_flags": {"vq-model": "VQ-debug", "vq-ckpt": "vq.pt", "codebook-size": 64, "dataset": "digits",
                           "image-size": 16, "image-size-eval": 16, "device": "cpu", "num-workers": 0},
           "published": {"fid": 1.0, "psnr": 20.0, "ssim": None}}
    presets = tmp_path / "presets.json"
    presets.write_text(json.dumps({"presets": [row]}))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    args = reproduce.build_parser().parse_args(
        ["tinyvq", "debug", "--presets", str(presets), "--nproc-per-node", "2", "--per-proc-batch-size", "64",
         "--sample-dir", str(tmp_path / "s"), "--is-split-size", "10", "--master-port", str(free_port())])
    report = reproduce.main(args, backend=DomainBackend(TinyFeatures(), "tiny", preprocess=lambda x: x.float() / 255,
                                                        device="cpu"),
                            download=lambda name, d: ckpts / name)
    out = capsys.readouterr().out
    assert "| rFID | 1.0 |" in out and "| PSNR | 20.0 |" in out and "| SSIM (official data_range=2) | - |" in out
    measured = report["measured"]
    assert measured["fid"] > 0 and 0 < measured["psnr"] < 100 and 0 < measured["ssim"] <= 1
    with np.load(report["npz"]) as recon, np.load(tmp_path / "s" / "val_digits-size-16.npz") as ref:
        assert recon["arr_0"].shape == ref["arr_0"].shape == (measured["num_samples"], 16, 16, 3)
    saved = json.loads(open(report["npz"].replace(".npz", ".reproduce.json")).read())
    assert saved["measured"]["psnr"] == measured["psnr"] and "reconstruction_vq_ddp.py" in " ".join(saved["recon_cmd"])


def test_a_vq_row_needs_its_validation_images(tmp_path):
    args = reproduce.build_parser().parse_args(["vq", "VQ-16", "--models-dir", str(tmp_path / "m")])
    with pytest.raises(ValueError, match="--data-path"):
        reproduce.main(args, download=lambda name, d: pytest.fail("downloaded before the flags were checked"))
    args = reproduce.build_parser().parse_args(["llamagen", "GPT-B-256", "--dry-run", "--data-path", str(tmp_path)])
    with pytest.raises(ValueError, match="reconstruction presets"):
        reproduce.main(args)

"""The reproduce command: every preset row is valid for the sampler, and a run samples with torchrun,
evaluates, and prints the published beside the measured numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoregressive import reproduce
from autoregressive.sample import sample_c2i_ddp
from autoregressive.strategies import strategy_names
from tests.test_sample_ddp import ckpts  # noqa: F401  (the tiny GPT + tokenizer fixture)
from tests.torchrun import free_port
from utils.download import get_checkpoint


@pytest.mark.parametrize("row", reproduce.load_presets(), ids=lambda r: f"{r['method']}-{r['name']}")
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

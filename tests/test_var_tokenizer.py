"""VAR's multi-scale VQVAE through the shared tokenizer trainer (`tokenizer/train_vq.py --vq-model
MSVQ-*`): the loss falls on the digits, checkpoints load with `load_msvq` and as the `var`
strategy's tokenizer, an interrupted run resumes to the same weights, sizes that do not fit are
refused; and its multi-scale codes through `extract_codes_c2i.py` (tokenizer identity recorded,
codes of another tokenizer refused)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.strategies.var import VarStrategy
from autoregressive.train import extract_codes_c2i
from tokenizer.msvq import MultiScaleVQVAE, build_msvq_named, load_msvq, msvq_checkpoint
from tokenizer.train_vq import get_parser, main
from utils.checkpoint import load_checkpoint

TINY = ["--vq-model", "MSVQ-debug", "--codebook-size", "64", "--codebook-embed-dim", "8", "--v-patch-nums",
        "1_2_4_8", "--dataset", "digits", "--image-size", "32", "--num-workers", "0", "--perceptual-weight", "0",
        "--device", "cpu", "--mixed-precision", "none", "--lr", "1e-3", "--global-batch-size", "8"]


def run(argv: list[str]) -> None:
    parser = get_parser()
    args = parser.parse_args(argv)
    main(args, {k: parser.get_default(k) for k in vars(args)})


def only_run(results: Path) -> Path:
    runs = [p for p in results.iterdir() if p.is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """16 steps (the GAN on from step 9): the run folder."""
    results = tmp_path_factory.mktemp("msvq_run")
    torch.set_num_threads(2)
    run(TINY + ["--max-steps", "16", "--log-every", "1", "--ckpt-every", "8", "--disc-start", "9",
                "--results-dir", str(results)])
    return only_run(results)


def test_loss_falls_and_checkpoint_loads_as_var_tokenizer(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    rec = [r["rec"] for r in rows]
    assert len(rec) == 16 and sum(rec[-3:]) / 3 < 0.6 * sum(rec[:3]) / 3, rec
    assert all(r["vq"] > 0 and r["commit"] > 0 and 0 < r["codebook_usage"] <= 1 for r in rows)
    assert rows[-1]["gen_adv"] != 0 and rows[-1]["disc"] != 0  # the GAN losses count after --disc-start
    ckpt = load_checkpoint(trained / "checkpoints" / "0000016.pt")
    assert ckpt["vq_model"] == "MSVQ-debug" and "vq_config" not in ckpt
    assert ckpt["msvq_config"]["v_patch_nums"] == [1, 2, 4, 8]
    vq = load_msvq(trained / "checkpoints" / "0000016.pt")
    assert isinstance(vq, MultiScaleVQVAE) and vq.config.image_size == 32 and vq.vocab_size == 64
    assert torch.equal(vq.quantize.embedding.weight, ckpt["model"]["quantize.embedding.weight"])
    codes = vq.encode_to_indices(torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, 1 + 4 + 16 + 64) and int(codes.max()) < 64
    strategy = VarStrategy()
    args = argparse.Namespace(gpt_model="VAR-debug", depth=None, pn="1_2_4_8", image_size=32, downsample_size=4,
                              saln=False, anorm=True, ls=0.0, more_smooth=False, aln=0.5, alng=1e-5, hd=0.02,
                              ini=-1, wpe=None, vae_ckpt=None, vq_ckpt=str(trained / "checkpoints" / "0000016.pt"))
    strategy.configure(args)
    assert isinstance(strategy.load_tokenizer(args), MultiScaleVQVAE)


def test_interrupted_run_resumes_to_the_same_weights(trained, tmp_path):
    """A run stopped at its step-8 checkpoint and resumed with --resume ends where the straight one did."""
    cut = tmp_path / "cut"
    run(TINY + ["--max-steps", "8", "--log-every", "4", "--ckpt-every", "8", "--disc-start", "9",
                "--results-dir", str(cut)])
    run(TINY + ["--max-steps", "16", "--log-every", "4", "--ckpt-every", "8", "--disc-start", "9",
                "--results-dir", str(cut), "--resume", str(only_run(cut))])
    straight = load_checkpoint(trained / "checkpoints" / "0000016.pt")
    resumed = load_checkpoint(only_run(cut) / "checkpoints" / "0000016.pt")
    for part in ("model", "discriminator"):
        for k, v in straight[part].items():
            assert torch.equal(v, resumed[part][k]), f"{part}.{k}"


def test_sizes_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(SystemExit, match="the last scale must be 8"):
        run(TINY[:-2] + ["--global-batch-size", "8", "--v-patch-nums", "1_2_4", "--max-steps", "1",
                         "--results-dir", str(tmp_path)])
    with pytest.raises(ValueError, match="no official patch_nums for 32 px"):
        build_msvq_named("MSVQ-debug", 64, 8, 32)
    assert build_msvq_named("MSVQ-16", 4096, 32, 256).patch_nums == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


# ---------------------------------------------------------------------------------------------
# Code extraction
# ---------------------------------------------------------------------------------------------


def extract(argv: list[str]) -> dict:
    return extract_codes_c2i.main(extract_codes_c2i.build_parser().parse_args(argv))


def test_extraction_writes_multi_scale_codes_and_refuses_another_tokenizer(trained, tmp_path):
    from dataset.digits import digit_to_pil, load_digits_arrays

    images, labels = load_digits_arrays("train")
    folder = tmp_path / "folder"
    for i in range(6):
        (folder / str(labels[i])).mkdir(parents=True, exist_ok=True)
        digit_to_pil(images[i], 32).save(folder / str(labels[i]) / f"{i}.png")
    ckpt = trained / "checkpoints" / "0000016.pt"
    common = ["--dataset", "folder", "--data-path", str(folder), "--image-size", "32", "--vq-model", "MSVQ-debug",
              "--num-workers", "0", "--device", "cpu", "--no-flip"]
    manifest = extract(common + ["--vq-ckpt", str(ckpt), "--code-path", str(tmp_path / "codes")])
    assert manifest["complete"] and manifest["codes_present"] == 6
    codes_dir = tmp_path / "codes" / "folder32_codes"
    codes = np.load(codes_dir / "0.npy")
    assert codes.shape == (1, 1, 85) and codes.dtype == np.int64
    vq = load_msvq(ckpt)
    x = torch.from_numpy(np.asarray(digit_to_pil(images[0], 32), dtype=np.float32)).div(127.5).sub(1)
    assert np.array_equal(codes[0], vq.encode_to_indices(x.permute(2, 0, 1)[None]).numpy())
    meta = json.loads((codes_dir / "codes_meta.json").read_text())
    assert meta["num_tokens"] == 85 and meta["tokenizer"]["config"]["kind"] == "msvq"
    assert meta["tokenizer"]["config"]["codebook_size"] == 64

    other = tmp_path / "other.pt"
    torch.save(msvq_checkpoint(build_msvq_named("MSVQ-debug", 64, 8, 32, "1_2_4_8")), other)
    with pytest.raises(extract_codes_c2i.ExtractError, match="another|other settings"):
        extract(common + ["--vq-ckpt", str(other), "--code-path", str(tmp_path / "codes")])
    with pytest.raises(extract_codes_c2i.ExtractError, match="encodes 32 px"):
        extract(common[:5] + ["64"] + common[6:] + ["--vq-ckpt", str(ckpt), "--code-path", str(tmp_path / "c64")])

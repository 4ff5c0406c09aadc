"""VAR's multi-scale VQVAE through the shared tokenizer trainer (`tokenizer/train_vq.py --vq-model
MSVQ-*`): the loss falls on the digits, checkpoints load with `load_msvq` and as the `var`
strategy's tokenizer, an interrupted run resumes to the same weights, sizes that do not fit are
refused; and its multi-scale codes through `extract_codes_c2i.py` (tokenizer identity recorded,
codes of another tokenizer refused)."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from autoregressive.strategies.var import VarStrategy
from autoregressive.train import extract_codes_c2i
from tests.extract_helpers import read_extracted
from tokenizer.msvq import MultiScaleVQVAE, build_msvq_named, load_msvq, msvq_checkpoint
from tokenizer.registry import load_tokenizer
from tests.test_train_vq import only_run, run
from utils.checkpoint import CheckpointError, load_checkpoint

TINY = ["--vq-model", "MSVQ-debug", "--codebook-size", "64", "--codebook-embed-dim", "8", "--v-patch-nums",
        "1_2_4_8", "--dataset", "digits", "--image-size", "32", "--num-workers", "0", "--perceptual-weight", "0",
        "--device", "cpu", "--mixed-precision", "none", "--lr", "1e-3", "--global-batch-size", "8"]


STEPS = ["--max-steps", "12", "--ckpt-every", "6", "--disc-start", "12"]  # the GAN counts at the last step


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """12 steps (one thread: fast and steady on a shared machine): the run folder."""
    results = tmp_path_factory.mktemp("msvq_run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(TINY + STEPS + ["--log-every", "1", "--results-dir", str(results)])
        yield only_run(results)
    finally:
        torch.set_num_threads(threads)


def test_loss_falls_and_checkpoint_loads_as_var_tokenizer(trained):
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    rec = [r["rec"] for r in rows]
    assert len(rec) == 12 and sum(rec[8:11]) / 3 < 0.7 * sum(rec[:3]) / 3, rec
    assert all(r["vq"] > 0 and r["commit"] > 0 and 0 < r["codebook_usage"] <= 1 for r in rows)
    assert rows[-1]["gen_adv"] != 0 and rows[-1]["disc"] != 0 and rows[-2]["gen_adv"] == 0  # GAN from step 12
    ckpt = load_checkpoint(trained / "checkpoints" / "0000012.pt")
    assert ckpt["vq_model"] == "MSVQ-debug" and "vq_config" not in ckpt
    assert ckpt["msvq_config"]["v_patch_nums"] == [1, 2, 4, 8]
    vq = load_msvq(trained / "checkpoints" / "0000012.pt")
    assert isinstance(vq, MultiScaleVQVAE) and vq.config.image_size == 32 and vq.vocab_size == 64
    assert torch.equal(vq.quantize.embedding.weight, ckpt["model"]["quantize.embedding.weight"])
    codes = vq.encode_to_indices(torch.zeros(2, 3, 32, 32))
    assert codes.shape == (2, 1 + 4 + 16 + 64) and int(codes.max()) < 64
    strategy = VarStrategy()
    args = argparse.Namespace(gpt_model="VAR-debug", depth=None, pn="1_2_4_8", image_size=32, downsample_size=4,
                              saln=False, anorm=True, ls=0.0, more_smooth=False, aln=0.5, alng=1e-5, hd=0.02,
                              ini=-1, wpe=None, vae_ckpt=None, vq_ckpt=str(trained / "checkpoints" / "0000012.pt"))
    strategy.configure(args, training=False)
    tokenizer = load_tokenizer(strategy.tokenizer_path(args), kind=strategy.tokenizer_kind,
                               **strategy.tokenizer_options(args))
    strategy.use_tokenizer(tokenizer)
    assert isinstance(tokenizer, MultiScaleVQVAE) and strategy.tokenizer is tokenizer


def test_interrupted_run_resumes_to_the_same_weights(trained, tmp_path):
    """The run cut after its step-6 checkpoint and resumed with --resume ends where the straight one did."""
    cut = tmp_path / "001-MSVQ-debug"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(trained / "checkpoints" / "0000006.pt", cut / "checkpoints")
    run(TINY + STEPS + ["--log-every", "6", "--results-dir", str(tmp_path), "--resume", str(cut)])
    straight = load_checkpoint(trained / "checkpoints" / "0000012.pt")
    resumed = load_checkpoint(cut / "checkpoints" / "0000012.pt")
    for part in ("model", "discriminator", "optimizer"):
        flat_a, flat_b = _tensors(straight[part]), _tensors(resumed[part])
        assert flat_a.keys() == flat_b.keys()
        for k, v in flat_a.items():
            assert torch.equal(v, flat_b[k]), f"{part}.{k}"


def _tensors(tree, prefix: str = "") -> dict:
    """Every tensor of a nested state dict, by path."""
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _tensors(sub, f"{prefix}.{key}").items()}
    return {}


def test_sizes_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(ValueError, match="the last scale must be 8"):
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
    ckpt = trained / "checkpoints" / "0000012.pt"
    common = ["--dataset", "folder", "--data-path", str(folder), "--image-size", "32", "--vq-model", "MSVQ-debug",
              "--num-workers", "0", "--device", "cpu", "--no-flip"]
    manifest = extract(common + ["--vq-ckpt", str(ckpt), "--code-path", str(tmp_path / "codes")])
    assert manifest["complete"] and manifest["codes_present"] == 6
    codes_dir = tmp_path / "codes" / "folder32_shards"
    codes = read_extracted(tmp_path / "codes")[0][0]
    assert codes.shape == (1, 85)
    vq = load_msvq(ckpt)
    x = extract_codes_c2i.extraction_transform(digit_to_pil(images[0], 32).convert("RGB"), 32, False, 1.1)
    assert np.array_equal(codes, vq.encode_to_indices(x).numpy())
    meta = json.loads((codes_dir / "codes_meta.json").read_text())
    assert meta["num_tokens"] == 85 and meta["tokenizer"]["config"]["kind"] == "msvq"
    assert meta["tokenizer"]["config"]["codebook_size"] == 64

    other = tmp_path / "other.pt"
    torch.save(msvq_checkpoint(build_msvq_named("MSVQ-debug", 64, 8, 32, "1_2_4_8")), other)
    with pytest.raises(extract_codes_c2i.ExtractError, match="another|other settings"):
        extract(common + ["--vq-ckpt", str(other), "--code-path", str(tmp_path / "codes")])
    llamagen = [a if a != "MSVQ-debug" else "VQ-debug" for a in common]
    with pytest.raises(CheckpointError, match="is VAR's multi-scale VQVAE, not a VQ-debug: pass --vq-model MSVQ"):
        extract(llamagen + ["--vq-ckpt", str(ckpt), "--code-path", str(tmp_path / "c_llamagen")])
    with pytest.raises(CheckpointError, match="encodes 32 px images"):
        extract(common[:5] + ["64"] + common[6:] + ["--vq-ckpt", str(ckpt), "--code-path", str(tmp_path / "c64")])

"""The `var` strategy on tiny models: the per-scale KV cache equals the block-causal full recompute,
seeded sampling, bad input refused clearly, and a 2-rank torchrun training whose loss falls."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.models.var import VAR, build_var
from autoregressive.decoding.logits import combine_cfg
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.strategies.var import VarStrategy, lr_wd_factors
from tokenizer.msvq import build_msvq, load_msvq, msvq_checkpoint
from tokenizer.registry import load_tokenizer
from tokenizer.vq_model import VQ_models
from tests.test_train_c2i import losses, run
from tests.torchrun import torchrun
from utils.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
PN = (1, 2, 3)  # 48 px images, L = 14 tokens
TOK = dict(vocab_size=16, z_channels=4, ch=8, norm_num_groups=4)


def tiny_tokenizer(patch_nums=PN, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_msvq(**{**TOK, **over}, v_patch_nums=patch_nums).eval()


def tiny_var(shared_aln: bool = False, patch_nums=PN, vocab_size: int = 16) -> VAR:
    torch.manual_seed(1)
    model = build_var(depth=2, embed_dim=32, num_heads=2, drop_path_rate=0.0, shared_aln=shared_aln,
                      patch_nums=patch_nums, num_classes=5, vocab_size=vocab_size, Cvae=4,
                      init=dict(init_adaln_gamma=0.5))  # gammas of O(1): the blocks matter
    return model.eval()


def strategy_with(tokenizer) -> VarStrategy:
    s = VarStrategy()
    s.use_tokenizer(tokenizer)
    return s


# ---------------------------------------------------------------------------------------------
# KV cache == full recompute
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_aln", [False, True], ids=["adaln", "shared-adaln"])
def test_per_scale_kv_cache_equals_block_causal_recompute(shared_aln):
    model, tok = tiny_var(shared_aln), tiny_tokenizer()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (3, 14), generator=g)
    labels = torch.tensor([0, 4, 5])  # 5 = the null class
    x = tok.quantize.ids_to_var_input(tok.split_ids(codes))  # (3, 13, 4)
    with torch.no_grad():
        full, _ = model(labels, x)  # (3, 14, 16)
        cache = model.new_cache(3)
        cached = [model.decode_step(labels, None if si == 0 else x[:, b - 1:e - 1], cache, model.scale_positions(si))
                  for si, (b, e) in enumerate(model.begin_ends)]
    torch.testing.assert_close(torch.cat(cached, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_aln", [False, True], ids=["adaln", "shared-adaln"])
def test_generation_equals_full_recompute(shared_aln):
    """Greedy guided generation with the KV cache = a loop that reruns the whole sequence with the
    block-causal mask at every scale (later scales hold placeholder ids, which the mask hides)."""
    model, tok = tiny_var(shared_aln), tiny_tokenizer()
    strategy = strategy_with(tok)
    labels, cfg_scale, sn = torch.tensor([1, 3]), 3.0, len(PN)
    tokens, f_hat = strategy.sample(model, labels, cfg_scale=cfg_scale, temperature=0.0)
    ref = torch.zeros(2, 14, dtype=torch.long)
    both = torch.cat([labels, torch.full_like(labels, 5)])
    with torch.no_grad():
        for si, (b, e) in enumerate(model.begin_ends):
            x = tok.quantize.ids_to_var_input(tok.split_ids(ref.repeat(2, 1)))
            logits = model(both, x)[0][:, b:e]  # (4, G, V)
            scale = 1 + (cfg_scale - 1) * si / (sn - 1)  # the first scale unguided: cond half alone
            guided = combine_cfg(logits, scale) if si > 0 else logits[:2]
            ref[:, b:e] = guided.argmax(-1)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(f_hat, tok.quantize.ids_to_fhat(tok.split_ids(ref)))


def test_seeded_sampling_is_reproducible_and_more_smooth_decodes_soft_fhat():
    model, tok = tiny_var(), tiny_tokenizer()
    strategy = strategy_with(tok)
    labels = torch.tensor([0, 2, 4])

    def draw(seed, **kw):
        return strategy.generate(model, labels, cfg_scale=2.5, top_k=8, top_p=0.9,
                                 generator=torch.Generator().manual_seed(seed), **kw)

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    rows = strategy.generate(model, labels, cfg_scale=2.5, generator=RowRNG(torch.tensor([3, 4, 5])))
    rows_again = strategy.generate(model, labels[1:], cfg_scale=2.5, generator=RowRNG(torch.tensor([4, 5])))
    assert torch.equal(rows[1:], rows_again)  # per-image streams: independent of batch-mates
    smooth = strategy.generate_for_decoding(model, labels, cfg_scale=2.5, top_k=8, top_p=0.9, more_smooth=True,
                                            generator=torch.Generator().manual_seed(7))
    assert torch.equal(smooth.tokens, draw(7, more_smooth=True)) and smooth.latent is not None
    soft_img = strategy.decode_generation(tok, smooth, PN[-1])
    hard_img = tok.ids_to_img(smooth.tokens)
    assert soft_img.shape == (3, 3, 48, 48) and not torch.allclose(soft_img, hard_img)
    # The ids alone decode as ids, whichever generation came before: the strategy keeps no state.
    assert torch.equal(strategy.decode_tokens(tok, smooth.tokens, PN[-1]), hard_img)
    plain = strategy.generate_for_decoding(model, labels, cfg_scale=2.5, top_k=8, top_p=0.9,
                                           generator=torch.Generator().manual_seed(7))
    assert plain.latent is None and torch.equal(plain.tokens, a)
    assert torch.equal(strategy.decode_generation(tok, plain, PN[-1]), tok.ids_to_img(a))


def test_training_loss_is_token_mean_cross_entropy_with_label_smoothing():
    model, tok = tiny_var(), tiny_tokenizer()
    strategy = strategy_with(tok)
    strategy.label_smooth = 0.1
    codes, labels = torch.randint(0, 16, (2, 14)), torch.tensor([1, 2])
    loss = strategy.training_loss(model, codes, labels)
    logits, _ = model(labels, tok.quantize.ids_to_var_input(tok.split_ids(codes)))
    per_token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), codes, label_smoothing=0.1,
                                                  reduction="none")  # (B, L)
    torch.testing.assert_close(loss, (per_token / 14).sum(-1).mean())
    loss.backward()
    assert model.head.weight.grad is not None


def test_official_schedule():
    # warm-up from wp0, flat for 5% of the rest, then linear to wpe; weight decay cosine twd -> twde
    assert lr_wd_factors(0, 100, 10, 0.005, 0.1, "lin0", 0.05, 0.08) == (0.005, pytest.approx(0.05))
    assert lr_wd_factors(10, 100, 10, 0.005, 0.1, "lin0", 0.05, 0.08)[0] == 1.0
    assert lr_wd_factors(99, 100, 10, 0.005, 0.1, "lin0", 0.05, 0.08)[0] == pytest.approx(0.1, abs=0.02)
    assert lr_wd_factors(99, 100, 10, 0.005, 0.1, "lin0", 0.05, 0.08)[1] == pytest.approx(0.08)


# ---------------------------------------------------------------------------------------------
# Zero-shot editing: masked teacher forcing over the scales
# ---------------------------------------------------------------------------------------------


def test_finest_mask_is_pooled_to_every_scale():
    known = torch.tensor([[True, False, False]] * 3)  # 3x3 finest grid: regenerate the right two columns
    keep = VarStrategy.known_per_scale(known, PN)
    # scale 1: touches the known column; scale 2 (area windows cols [0,2), [1,3)): the right column is
    # all in the region; scale 3: the mask itself
    assert keep.tolist() == [True, True, False, True, False] + known.reshape(-1).tolist()
    explicit = torch.rand(14) < 0.5
    assert torch.equal(VarStrategy.known_per_scale(explicit, PN), explicit)


@pytest.mark.parametrize("case", ["coarse-known", "all-scales"])
def test_edit_keeps_known_tokens_and_equals_masked_teacher_forcing(case):
    """Greedy guided editing with the KV cache = a full recompute that teacher-forces the known
    tokens at every scale; the known tokens never change, also when sampling."""
    model, tok = tiny_var(), tiny_tokenizer()
    strategy = strategy_with(tok)
    g = torch.Generator().manual_seed(3)
    known_tokens = torch.randint(0, 16, (2, 14), generator=g)
    keep = torch.rand(14, generator=g) < 0.5
    if case == "coarse-known":
        keep[:5] = True  # scales 1 and 2 fully known: run as context only
    else:
        keep[0] = False
    labels, cfg_scale, sn = torch.tensor([1, 3]), 3.0, len(PN)
    seen: list[torch.Tensor] = []
    out = strategy.edit(model, labels, known_tokens, keep, cfg_scale=cfg_scale, temperature=0.0, record_logits=seen)
    ref, ref_logits = known_tokens.clone(), []
    both = torch.cat([labels, torch.full_like(labels, 5)])
    with torch.no_grad():
        for si, (b, e) in enumerate(model.begin_ends):
            x = tok.quantize.ids_to_var_input(tok.split_ids(ref.repeat(2, 1)))
            logits = model(both, x)[0][:, b:e]
            scale = 1 + (cfg_scale - 1) * si / (sn - 1)
            guided = combine_cfg(logits, scale) if si > 0 else logits[:2]
            ref[:, b:e] = torch.where(keep[b:e], ref[:, b:e], guided.argmax(-1))
            if not bool(keep[b:e].all()):
                ref_logits.append(guided[:, ~keep[b:e]])
    assert torch.equal(out, ref)
    assert len(seen) == len(ref_logits)
    for a, r in zip(seen, ref_logits):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    drawn = strategy.edit(model, labels, known_tokens, keep, cfg_scale=2.0, top_k=8,
                          generator=RowRNG(torch.tensor([5, 6])))
    assert torch.equal(drawn[:, keep], known_tokens[:, keep]) and int(drawn.min()) >= 0


def test_bad_edit_mask_is_refused():
    model, tok = tiny_var(), tiny_tokenizer()
    strategy = strategy_with(tok)
    labels, known = torch.tensor([1]), torch.zeros(1, 14, dtype=torch.long)
    for mask, what in ((torch.ones(9), "boolean"), (torch.ones(16, dtype=torch.bool), "9 cells"),
                       (torch.ones(3, 3, dtype=torch.bool), "nothing to generate")):
        with pytest.raises(ValueError, match=what):
            strategy.edit(model, labels, known, mask, temperature=0.0)
    regen_all = torch.zeros(9, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"\(B, L\) = \(1, 14\)"):
        strategy.edit(model, labels, known[:, :9], regen_all, temperature=0.0)
    with pytest.raises(ValueError, match="code ids must lie in"):
        strategy.edit(model, labels, known + 16, regen_all, temperature=0.0)
    assert strategy.edit(model, labels, known, regen_all, temperature=0.0).shape == (1, 14)


def test_edit_command_with_var(tmp_path):
    """`autoregressive/sample/edit.py --strategy var`: image in, row of results out."""
    from PIL import Image

    from autoregressive.sample import edit

    torch.save(msvq_checkpoint(tiny_tokenizer()), tmp_path / "msvq.pt")
    torch.save(build_var(depth=1, patch_nums=PN, num_classes=10, vocab_size=16, Cvae=4).state_dict(),
               tmp_path / "var.pth")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 50, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    argv = ["--strategy", "var", "--gpt-ckpt", str(tmp_path / "var.pth"), "--vq-ckpt", str(tmp_path / "msvq.pt"),
            "--image-size", "48", "--pn", "1_2_3", "--depth", "1", "--num-classes", "10", "--image",
            str(tmp_path / "in.png"), "--class-id", "3", "--box", "16,0,48,48", "--num-samples", "2",
            "--out", str(tmp_path / "out.png"), "--device", "cpu", "--precision", "none"]
    out = edit.main(edit.build_parser().parse_args(argv))
    assert Image.open(out).size[0] > 4 * 48


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def var_args(**over) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    VarStrategy.add_arguments(p.add_argument_group("var"))
    args = p.parse_args([])
    for k, v in {**dict(gpt_model="GPT-B", image_size=48, pn="1_2_3", downsample_size=16), **over}.items():
        setattr(args, k, v)
    return args


def test_llamagen_tokenizer_is_refused(tmp_path):
    vq = VQ_models["VQ-debug"](codebook_size=16, codebook_embed_dim=4)
    strategy = VarStrategy()
    with pytest.raises(TypeError, match="LlamaGen tokenizer cannot serve VAR"):
        strategy.use_tokenizer(vq)
    with pytest.raises(TypeError, match="multi-scale VQVAE"):
        strategy.decode_tokens(vq, torch.zeros(1, 14, dtype=torch.long), 3)
    torch.save({"model": vq.state_dict()}, tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="LlamaGen VQ tokenizer"):
        load_msvq(tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="LlamaGen VQ tokenizer"):
        load_tokenizer(tmp_path / "vq.pt", kind=VarStrategy.tokenizer_kind, patch_nums=PN)
    VarStrategy().configure(var_args(vae_ckpt=str(tmp_path / "absent.pt")), training=False)  # configure reads no file


@pytest.mark.parametrize("other", [dict(patch_nums=(1, 2, 4)), dict(vocab_size=32)],
                         ids=["patch_nums", "vocabulary"])
def test_var_checkpoint_with_other_tokenizer_is_refused(tmp_path, other):
    torch.save(tiny_var().state_dict(), tmp_path / "var.pth")  # official layout: a flat state dict
    strategy = strategy_with(tiny_tokenizer(**other))
    what = "tokens per image" if "patch_nums" in other else "vocabulary"
    with pytest.raises(CheckpointError, match=what):
        strategy.load_model(tmp_path / "var.pth", num_classes=5, embed_dim=32, num_heads=2, depth=2)
    ok = strategy_with(tiny_tokenizer())
    model = ok.load_model(tmp_path / "var.pth", num_classes=5, embed_dim=32, num_heads=2, depth=2)
    assert torch.equal(model.head.weight, tiny_var().head.weight)
    with pytest.raises(ValueError, match="patch_nums"):
        strategy_with(tiny_tokenizer((1, 2, 4))).sample(model, torch.tensor([0]), temperature=0.0)


def test_image_size_that_patch_nums_do_not_fit_is_refused():
    with pytest.raises(ValueError, match="does not fit patch_nums"):
        VarStrategy.resolve_patch_nums("1_2_3", 64)
    with pytest.raises(ValueError, match="does not fit patch_nums"):
        VarStrategy().configure(var_args(image_size=256, pn="512"), training=False)
    with pytest.raises(ValueError, match="no official patch_nums"):
        VarStrategy.resolve_patch_nums(None, 96)
    assert VarStrategy.resolve_patch_nums(None, 256) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    with pytest.raises(ValueError, match="encodes \\(B, 3, 48, 48\\) images"):
        tiny_tokenizer().encode_to_indices(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="VAR-d16 has depth 16"):
        VarStrategy().configure(var_args(gpt_model="VAR-d16", depth=20), training=False)


def test_sampling_driver_loads_var_and_its_tokenizer(tmp_path):
    """The shared sampler (`load_sampler` + `Sampler.images`, per-image RowRNG streams) with an
    official-layout VAR file and our VQVAE checkpoint; a LlamaGen-layout file as --vq-ckpt is refused."""
    from autoregressive.sample.common import add_sampling_args, load_sampler

    torch.save(msvq_checkpoint(tiny_tokenizer()), tmp_path / "msvq.pt")
    var = build_var(depth=1, patch_nums=PN, num_classes=10, vocab_size=16, Cvae=4)
    torch.save(var.state_dict(), tmp_path / "var.pth")
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    argv = ["--strategy", "var", "--gpt-ckpt", str(tmp_path / "var.pth"), "--vq-ckpt", str(tmp_path / "msvq.pt"),
            "--image-size", "48", "--pn", "1_2_3", "--depth", "1", "--num-classes", "10",
            "--cfg-scale", "2.5", "--top-k", "8", "--top-p", "0.96"]
    sampler = load_sampler(p.parse_args(argv), torch.device("cpu"))
    images = sampler.images(torch.tensor([1, 2]), torch.tensor([10, 11]))
    assert images.shape == (2, 3, 48, 48) and images.abs().max() <= 1
    torch.save({"model": VQ_models["VQ-debug"](codebook_size=16).state_dict()}, tmp_path / "vq.pt")
    argv[argv.index("--vq-ckpt") + 1] = str(tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="LlamaGen VQ tokenizer"):
        load_sampler(p.parse_args(argv), torch.device("cpu"))


# ---------------------------------------------------------------------------------------------
# Training through the shared driver
# ---------------------------------------------------------------------------------------------


def test_extracted_codes_train_on_two_ranks(tmp_path):
    """Multi-scale codes from `extract_codes_c2i.py` (a tiny folder, our VQVAE checkpoint), then
    torchrun, 2 CPU ranks, official flag names (--depth --tblr --bs --ep --wpe): the loss falls.
    Codes of another VQVAE are refused before training."""
    from autoregressive.train import extract_codes_c2i, train_c2i
    from dataset.digits import digit_to_pil, load_digits_arrays
    from dataset.codes import CodesError

    tok = tiny_tokenizer()
    torch.save(msvq_checkpoint(tok), tmp_path / "msvq.pt")
    images, labels = load_digits_arrays("train")
    folder = tmp_path / "folder"
    for i in range(40):
        (folder / f"c{labels[i]}").mkdir(parents=True, exist_ok=True)
        digit_to_pil(images[i], 48).save(folder / f"c{labels[i]}" / f"{i}.png")
    codes = tmp_path / "codes"
    extract_codes_c2i.main(extract_codes_c2i.build_parser().parse_args(
        ["--dataset", "folder", "--data-path", str(folder), "--image-size", "48", "--vq-model", "MSVQ-16",
         "--vq-ckpt", str(tmp_path / "msvq.pt"), "--code-path", str(codes), "--num-workers", "0", "--device", "cpu"]))
    from tests.extract_helpers import read_extracted
    assert read_extracted(codes, "folder48")[0][0].shape == (2, 14)  # image and mirror, 1 + 4 + 9 ids

    train = ["autoregressive/train/train_c2i.py", "--strategy", "var", "--code-path", str(codes),
           "--dataset", "folder", "--image-size", "48", "--pn", "1_2_3", "--vae-ckpt", str(tmp_path / "msvq.pt"),
           "--vocab-size", "16", "--num-classes", "10", "--depth", "2", "--alng", "1e-3",
           "--dropout-p", "0", "--token-dropout-p", "0", "--bs", "8", "--ep", "3", "--tblr", "0.1",
           "--wpe", "0.1", "--num-workers", "0", "--log-every", "3", "--ckpt-every", "100", "--device", "cpu"]
    # The driver refuses codes of another VQVAE before any folder exists.
    torch.save(msvq_checkpoint(tiny_tokenizer(ch=4)), tmp_path / "other.pt")
    other = [a if a != str(tmp_path / "msvq.pt") else str(tmp_path / "other.pt") for a in train[1:]]
    with pytest.raises(CodesError, match="another tokenizer"):
        train_c2i.main(train_c2i.build_parser().parse_args([*other, "--results-dir", str(tmp_path / "refused")]))
    assert not (tmp_path / "refused").exists()

    res = run([*torchrun(2), *train, "--results-dir", str(tmp_path / "results")])
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(res.stderr)
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.5, curve

    # Interrupted at step 5 and resumed: the same weights as the uninterrupted run above.
    first = next((tmp_path / "results").iterdir()) / "checkpoints"
    final = sorted(first.glob("*.pt"))[-1]
    part = [*train, "--results-dir", str(tmp_path / "part")]
    res = run([*torchrun(2), *part, "--max-steps", "5"])
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = next((tmp_path / "part").iterdir())
    res = run([*torchrun(2), *part, "--resume", str(run_dir)])
    assert res.returncode == 0, res.stderr[-3000:]
    a = torch.load(final, weights_only=True)["model"]
    b = torch.load(run_dir / "checkpoints" / final.name, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

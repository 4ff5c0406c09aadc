"""PAR beyond the fixtures: KV-cached group decoding equals a full masked recompute, the schedule,
the refusals of bad shapes and flags, and a 2-process torchrun training whose loss falls."""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from autoregressive.models.par import PARTransformer, build_par, par_group_sizes, par_mask, par_order
from autoregressive.decoding.logits import cfg_labels, combine_cfg, sample_from_logits
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.sample.sample_c2i import build_parser as sample_parser
from autoregressive.sample.sample_c2i import main as sample_main
from autoregressive.strategies import get_strategy
from autoregressive.strategies.par import ParStrategy
from autoregressive.train.train_c2i import build_parser
from tests.test_train_c2i import losses, run, train_cmd, write_codes
from tokenizer.vq_model import VQ_models
from utils.checkpoint import CheckpointError, save_checkpoint

TINY = dict(vocab_size=32, num_classes=5)


def tiny_par(n: int, grid: int, seed: int = 0) -> PARTransformer:
    torch.manual_seed(seed)
    model = build_par("GPT-debug", block_size=grid * grid, ar_token_num=n, spe_token_num=n - 1, **TINY)
    # The official init zeroes the head (uniform logits); make the predictions informative.
    with torch.no_grad():
        model.output.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def recompute_generate(model, labels, cfg_scale, cfg_interval, temperature, top_k, top_p, generator):
    """The reference: no cache; every step runs the whole training sequence through PAR's mask, with
    the tokens not generated yet filled with random ids (the mask must hide them), and reads the
    rows of the group it predicts (row p predicts zp_p)."""
    n, num_tokens = model.ar_token_num, model.config.block_size
    cond = cfg_labels(labels, model.num_classes, cfg_scale)
    reps = cond.shape[0] // labels.shape[0]
    zp = torch.randint(0, model.config.vocab_size, (labels.shape[0], num_tokens),
                       generator=torch.Generator().manual_seed(99))  # (B, N), PAR order
    step_logits, start = [], 0
    for g, size in enumerate(par_group_sizes(num_tokens, n)):
        logits = model.sequence_logits(zp[:, :-1].repeat(reps, 1), cond)[:, start:start + size]  # (B', G, V)
        guided = combine_cfg(logits, cfg_scale, ParStrategy.cfg_step_guided(g, n, cfg_interval))
        step_logits.append(guided)
        zp[:, start:start + size], _ = sample_from_logits(guided, temperature, top_k, top_p, generator)
        start += size
    raster = torch.empty_like(zp).scatter_(1, model.order.expand_as(zp), zp)
    return raster, torch.cat(step_logits, dim=1)


@pytest.mark.parametrize("n,grid", [(4, 4), (16, 8)])
@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (2.5, -1), (1.5, 2)])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.2, 12, 0.9)])
def test_kv_cached_group_decoding_equals_masked_recompute(n, grid, cfg_scale, cfg_interval, temperature,
                                                          top_k, top_p):
    model = tiny_par(n, grid)
    labels = torch.tensor([0, 3, 4])
    strategy = get_strategy("par")
    recorded: list[torch.Tensor] = []
    with torch.no_grad():
        tokens = strategy.generate(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                   temperature=temperature, top_k=top_k, top_p=top_p,
                                   generator=torch.Generator().manual_seed(7), record_logits=recorded)
        ref_tokens, ref_logits = recompute_generate(model, labels, cfg_scale, cfg_interval, temperature,
                                                    top_k, top_p, torch.Generator().manual_seed(7))
    assert tokens.shape == (3, grid * grid) and tokens.dtype == torch.long
    assert len(recorded) == ParStrategy.num_steps(grid * grid, n) == grid * grid // n + n - 1
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(torch.cat(recorded, dim=1), ref_logits, atol=1e-4, rtol=1e-4)


def test_schedule_order_and_mask():
    # Grid 4, n 4, as the official reshape / permute of PAR's `train_c2i.py` orders it.
    assert par_order(4, 4).tolist() == [0, 2, 8, 10, 1, 3, 9, 11, 4, 6, 12, 14, 5, 7, 13, 15]
    assert par_group_sizes(576, 4) == [1] * 4 + [4] * 143 and len(par_group_sizes(576, 4)) == 147
    assert len(par_group_sizes(576, 16)) == 51
    # Each group = the same in-region offset in every region: one cell per region.
    order = par_order(24, 16).view(-1, 16)  # (groups, n)
    region = (order // 24 // 6) * 4 + (order % 24) // 6
    assert torch.equal(region, torch.arange(16).expand_as(region))
    # n = 4: causal slots 0..3, then blocks [4, 8), [8, 12), ... bidirectional inside.
    m = par_mask(torch.arange(12), 12, 4, 3)
    assert torch.equal(m[:4, :4], torch.ones(4, 4).tril().bool())
    assert m[4, 7] and m[7, 4] and not m[7, 8] and m[8, 11] and m[11, 4] and not m[3, 4]


def test_generate_is_seeded_and_refuses_a_wrong_step_count():
    model = tiny_par(4, 4)
    strategy = get_strategy("par")
    labels = torch.tensor([0, 1, 2, 3])
    sample = lambda seed: strategy.generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(sample(1), sample(1)) and not torch.equal(sample(1), sample(2))
    with pytest.raises(ValueError, match="7 steps"):
        strategy.generate(model, labels, temperature=0.0, steps=16)


@pytest.mark.parametrize("flags,message", [
    (["--ar-token-num", "4", "--spe-token-num", "2"], "--spe-token-num must be --ar-token-num - 1 = 3"),
    (["--ar-token-num", "16", "--spe-token-num", "3"], "--spe-token-num must be --ar-token-num - 1 = 15"),
    (["--ar-token-num", "16", "--spe-token-num", "15", "--image-size", "96"], "does not divide by 4"),
    (["--ar-token-num", "2", "--spe-token-num", "1"], "perfect square >= 4"),
    (["--ar-token-num", "1", "--spe-token-num", "0"], "--strategy raster"),
])
def test_bad_flags_are_refused(flags, message):
    """The official flag names and defaults reach the strategy; bad values fail with the reason."""
    args = build_parser().parse_args(["--code-path", "x", "--strategy", "par", *flags])
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_strategy("par").configure(args, training=True)
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        grid = args.image_size // args.downsample_size
        build_par("GPT-debug", block_size=grid * grid, ar_token_num=args.ar_token_num,
                  spe_token_num=args.spe_token_num, **TINY)


def test_official_flag_defaults_and_model_mismatch():
    args = build_parser().parse_args(["--code-path", "x", "--strategy", "par"])
    assert (args.spe_token_num, args.ar_token_num) == (3, 4)  # PAR-4x, the official defaults
    strategy = get_strategy("par")
    strategy.configure(args, training=True)
    assert strategy.model_config(args) == {"spe_token_num": 3, "ar_token_num": 4}
    assert set(strategy.arch_flags) == {"spe_token_num", "ar_token_num"}
    codes = torch.randint(0, 32, (2, 64))
    with pytest.raises(ValueError, match="built with ar_token_num=16"):
        strategy.training_loss(tiny_par(16, 8).train(), codes, torch.tensor([0, 1]))


def test_two_ranks_learn_par_and_the_checkpoint_samples(tmp_path):
    codes = write_codes(tmp_path / "codes")  # 4 x 4 grid: 2 x 2 regions of 2 x 2
    res = run(train_cmd(codes, tmp_path / "results", "--strategy", "par", "--spe-token-num", "3",
                        "--ar-token-num", "4", "--epochs", "4", "--log-every", "3", "--ckpt-every", "100",
                        nproc=2))
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(res.stderr)
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.5, curve
    ckpt = next((tmp_path / "results").glob("*/checkpoints/0000024.pt"))
    # The checkpoint records the PAR flags; loading rebuilds a PAR-4x model that samples.
    strategy = get_strategy("par")
    with pytest.raises(CheckpointError, match="trained with spe_token_num=3, but spe_token_num=15"):
        strategy.load_model(ckpt, spe_token_num=15, ar_token_num=16, block_size=16)
    model = strategy.load_model(ckpt)
    assert isinstance(model, PARTransformer) and model.ar_token_num == 4
    tokens = strategy.generate(model, torch.tensor([0, 1]), cfg_scale=1.5, temperature=0.0)
    assert tokens.shape == (2, 16) and int(tokens.min()) >= 0


def test_row_streams_make_images_independent_of_their_batch():
    """Per-image streams (`RowRNG`, what the samplers use) draw G tokens per image per group step:
    an image is the same alone or beside others."""
    model = tiny_par(4, 4)
    strategy = get_strategy("par")
    together = strategy.generate(model, torch.tensor([1, 2, 3]), cfg_scale=2.0, top_k=8,
                                 generator=RowRNG(torch.tensor([10, 11, 12])))
    alone = strategy.generate(model, torch.tensor([2]), cfg_scale=2.0, top_k=8, generator=RowRNG(torch.tensor([11])))
    assert torch.equal(together[1:2], alone)


@pytest.mark.parametrize("layout", ["model", "module", "state_dict", "bare"])
def test_release_layouts_load_and_the_single_image_sampler_runs(tmp_path, layout):
    """A release file records no flags: --gpt-model and the PAR flags come from the command line
    (here PAR-16x), the weights from any official layout; sample_c2i.py draws a grid with them."""
    torch.manual_seed(0)
    vq = VQ_models["VQ-debug"](codebook_size=32)
    save_checkpoint({"model": vq.state_dict(), "vq_model": "VQ-debug", "vq_config": asdict(vq.config)},
                    tmp_path / "vq.pt")
    weights = tiny_par(16, 8).state_dict()
    save_checkpoint(weights if layout == "bare" else {layout: weights}, tmp_path / "PAR-debug-16x.pt")
    args = sample_parser().parse_args([
        "--strategy", "par", "--gpt-model", "GPT-debug", "--gpt-ckpt", str(tmp_path / "PAR-debug-16x.pt"),
        "--spe-token-num", "15", "--ar-token-num", "16", "--vq-ckpt", str(tmp_path / "vq.pt"),
        "--vq-model", "VQ-debug", "--codebook-size", "32", "--image-size", "32", "--image-size-eval", "32",
        "--downsample-size", "4", "--num-classes", "5", "--classes", "1", "4", "--cfg-scale", "1.5",
        "--out", str(tmp_path / "grid.png"), "--device", "cpu"])
    assert sample_main(args).is_file()
    args.ar_token_num, args.spe_token_num = 4, 3  # the defaults: the 15 M tokens do not fit
    with pytest.raises(CheckpointError, match="spe_tok_embeddings"):
        sample_main(args)

"""ARPG beyond the fixtures: KV-cached parallel decoding equals a full recompute, editing keeps the
known tokens, 2-rank training from a RandAR-layout code folder learns, bad input is refused."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.models.arpg import ARPG, ARPG_SIZES, ARPGConfig, build_arpg
from autoregressive.decoding.logits import cfg_labels, sample_from_logits
from autoregressive.decoding.lpd_order import generate_orders
from autoregressive.decoding.orders import random_order, save_orders
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.decoding.schedules import group_sizes
from autoregressive.strategies import get_strategy
from autoregressive.strategies.arpg import ArpgStrategy
from dataset.codes import CodeDataset
from tests.test_train_c2i import losses, run
from tests.torchrun import torchrun

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=32, block_size=16, num_classes=5)  # 4 x 4 grid


def tiny_model(seed: int = 0) -> ARPG:
    torch.manual_seed(seed)
    model = build_arpg("ARPG-debug", **TINY)
    # The official init zeroes the head (uniform logits); make the predictions informative.
    with torch.no_grad():
        model.head.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def recompute(model: ARPG, strategy: ArpgStrategy, labels, order, sizes, cfg_scale, temperature, top_k, top_p,
              generator):
    """The reference: no cache; every step runs everything fed so far through `forward_shared` with
    the block-causal inference mask (input j visible to input i iff step(j) <= step(i))."""
    b = labels.shape[0]
    cond = cfg_labels(labels, model.num_classes, cfg_scale)
    reps = cond.shape[0] // b
    order = (order.expand(b, -1) if order.dim() == 1 else order).repeat(reps, 1)  # (B', N)
    scales = strategy.cfg_scales(cfg_scale, sizes)
    fed = torch.empty(b, 0, dtype=torch.long)  # tokens in generation order
    step_of = [0]  # the step that feeds each input (class token: step 0)
    out, logs, start = torch.full((b, order.shape[1]), -1), [], 0
    for g, size in enumerate(sizes):
        ids = torch.cat([model.condition_ids(cond), fed.repeat(reps, 1)], dim=1)  # (B', 1 + start)
        rows = torch.cat([torch.zeros(cond.shape[0], 1, dtype=torch.long), order[:, :start] + 1], dim=1)
        steps = torch.tensor(step_of)
        mask = steps[None, :] <= steps[:, None]  # (L, L)
        logits = model.forward_shared(ids, rows, order[:, start:start + size] + 1, self_mask=mask)
        if reps == 2:
            c, u = logits.chunk(2)
            logits = u + (c - u) * scales[g]
        logs.append(logits)
        tok, _ = sample_from_logits(logits, temperature, top_k, top_p, generator)  # (B, G)
        out.scatter_(1, order[:b, start:start + size], tok)
        fed = torch.cat([fed, tok], dim=1)
        step_of += [g + 1] * size
        start += size
    return out, torch.cat(logs, dim=1)


@pytest.mark.parametrize("cfg_scale,cfg_schedule", [(1.0, "linear"), (3.0, "linear"), (2.0, "constant")])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.3, 8, 0.8)])
@pytest.mark.parametrize("per_row", [False, True])
def test_kv_cached_decoding_equals_recompute(cfg_scale, cfg_schedule, temperature, top_k, top_p, per_row):
    model = tiny_model()
    strategy = ArpgStrategy("cosine", cfg_schedule)
    labels = torch.tensor([0, 3, 4])

    def gen():
        return RowRNG(torch.tensor([5, 6, 7])) if per_row else torch.Generator().manual_seed(3)

    rec: list[torch.Tensor] = []
    with torch.no_grad():
        tokens = strategy.generate(model, labels, cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
                                   top_p=top_p, steps=5, generator=gen(), record_logits=rec)
        g = gen()
        order = random_order(torch.arange(16), 3, g)
        assert order.shape == ((3, 16) if per_row else (16,))
        ref, ref_logits = recompute(model, strategy, labels, order, group_sizes("cosine", 16, 5), cfg_scale,
                                    temperature, top_k, top_p, g)
    assert tokens.shape == (3, 16) and bool((tokens >= 0).all())
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(torch.cat(rec, dim=1), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("order", ["lpd", "file", "raster"])
def test_any_order_decodes_as_a_recompute(order, tmp_path):
    """ARPG under LPD's locality-aware orders, an order file or raster (through the shared
    flags, ARPG's default arccos steps: a first group of 3): the KV-cached decoding still equals the
    full recompute under that order."""
    sizes = group_sizes("arccos", 16, 5)
    if order == "file":
        save_orders(tmp_path / "o.json", generate_orders(sizes, 4, 6, seed=1), 4, sizes, seed=1)
        order = str(tmp_path / "o.json")
    assert sizes[0] == 3
    args = argparse.Namespace(order=order, sample_schedule=None, group_sizes=None, proximity_threshold=1.0,
                              repulsion_threshold=None, cfg_schedule="linear", cfg_interval=-1, image_size=16,
                              downsample_size=4, steps=5)
    strategy = ArpgStrategy()
    strategy.configure(args, training=False)
    model, labels, seeds = tiny_model(2), torch.tensor([0, 3]), torch.tensor([11, 12])
    rec: list[torch.Tensor] = []
    with torch.no_grad():
        tokens = strategy.generate(model, labels, cfg_scale=3.0, temperature=1.0, steps=5, generator=RowRNG(seeds),
                                   record_logits=rec)
        g = RowRNG(seeds)
        orders = strategy.schedule.orders(2, sizes, g, torch.device("cpu"))  # the same draws as generate
        ref, ref_logits = recompute(model, strategy, labels, orders, sizes, 3.0, 1.0, 0, 1.0, g)
    assert torch.equal(tokens, ref)
    torch.testing.assert_close(torch.cat(rec, dim=1), ref_logits, atol=1e-4, rtol=1e-4)
    if order == "raster":
        assert torch.equal(orders, torch.arange(16))
    else:
        assert orders.shape == (2, 16) and not torch.equal(orders[0], orders[1])
    if args.order.endswith(".json"):
        file_rows = {tuple(r) for r in generate_orders(sizes, 4, 6, seed=1).tolist()}
        assert all(tuple(r) in file_rows for r in orders.tolist())


def test_editing_keeps_known_tokens_and_reduces_to_generation():
    model = tiny_model(1)
    strategy = get_strategy("arpg")
    labels = torch.tensor([1, 2])
    known_tokens = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(0))
    for seed in range(3):
        known = torch.rand(4, 4, generator=torch.Generator().manual_seed(seed)) < 0.5
        out = strategy.edit(model, labels, known_tokens, known, cfg_scale=2.0, temperature=1.0, steps=3,
                            generator=RowRNG(torch.tensor([seed, seed + 9])))
        k = known.reshape(-1)
        assert torch.equal(out[:, k], known_tokens[:, k]) and bool((out[:, ~k] >= 0).all())
    # Nothing known: editing is generation.
    none = torch.zeros(16, dtype=torch.bool)
    a = strategy.edit(model, labels, known_tokens, none, cfg_scale=2.0, steps=4,
                      generator=torch.Generator().manual_seed(1))
    b = strategy.generate(model, labels, cfg_scale=2.0, steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def test_bad_input_is_refused():
    model = tiny_model()
    strategy = get_strategy("arpg")
    labels = torch.tensor([1])
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="--step 17 is larger than the number of tokens to generate \\(16\\)"):
        strategy.generate(model, labels, steps=17, generator=g)
    with pytest.raises(ValueError, match="random order: pass a generator"):
        strategy.generate(model, labels, temperature=0)
    with pytest.raises(ValueError, match="no cfg_interval"):
        strategy.generate(model, labels, cfg_interval=3, generator=g)
    tokens = torch.zeros(1, 16, dtype=torch.long)
    with pytest.raises(ValueError, match="mask must be a boolean tensor of 16 cells"):
        strategy.edit(model, labels, tokens, torch.ones(5, 5, dtype=torch.bool), generator=g)
    with pytest.raises(ValueError, match="nothing to generate"):
        strategy.edit(model, labels, tokens, torch.ones(4, 4, dtype=torch.bool), generator=g)
    known = torch.ones(16, dtype=torch.bool)
    known[:3] = False
    with pytest.raises(ValueError, match="--step 4 is larger than the number of tokens to generate \\(3\\)"):
        strategy.edit(model, labels, tokens, known, steps=4, generator=g)
    with pytest.raises(ValueError, match="unknown --sample-schedule"):
        ArpgStrategy("linear")
    # Through the drivers' flags: --step above the grid and --cfg-interval are refused by configure.
    args = argparse.Namespace(sample_schedule="arccos", cfg_schedule="linear", steps=300, image_size=256,
                              downsample_size=16, cfg_interval=-1)
    with pytest.raises(ValueError, match="--step 300 is larger"):
        ArpgStrategy().configure(args, training=False)
    with pytest.raises(NotImplementedError, match="cannot edit"):
        get_strategy("raster").edit(model, labels, tokens, known)


def write_randar_codes(root: Path, n: int = 96, num_tokens: int = 16, vocab: int = 64) -> Path:
    """RandAR/ARPG archive layout: `<root>/<class id>/<name>.npy` of shape (num_aug, N)."""
    rng = np.random.RandomState(0)
    for k in range(n):
        y = k % 10
        base = (y * 5 + np.arange(num_tokens)) % vocab
        views = np.stack([base, (base + rng.randint(0, 2, num_tokens)) % vocab])
        (root / str(y)).mkdir(parents=True, exist_ok=True)
        np.save(root / str(y) / f"img{k:04d}.npy", views.astype(np.int64))
    return root


def test_absolute_positions_only_in_the_debug_size():
    """Officially positions are relative only (zero class RoPE row): the first query, which sees
    just the class, predicts the same logits for every target cell. With `abs_pos_embed` (ours,
    ARPG-debug) they depend on the cell; the official sizes keep the official keys."""
    cfg = dict(dim=64, n_layer=2, n_head=4, multiple_of=64, **TINY)
    ids, rows, targets = torch.tensor([[TINY["vocab_size"] + 2]]), torch.zeros(1, dtype=torch.long), torch.arange(1, 17)
    for abs_pos, varies in ((False, False), (True, True)):
        torch.manual_seed(0)
        model = ARPG(ARPGConfig(**cfg, abs_pos_embed=abs_pos)).eval()
        with torch.no_grad():
            model.head.weight.normal_(0.0, 0.3)
            logits = model.forward_shared(ids, rows, targets)  # (1, 16, V): one row per target cell
        assert ("pos_embed" in model.state_dict()) == abs_pos
        assert torch.allclose(logits, logits[:, :1].expand_as(logits), atol=1e-5) != varies
    assert all(not ARPG_SIZES[name].get("abs_pos_embed") for name in ("ARPG-L", "ARPG-XL", "ARPG-XXL"))
    assert ARPG_SIZES["ARPG-debug"]["abs_pos_embed"]


def test_two_ranks_learn_from_randar_codes(tmp_path):
    codes = write_randar_codes(tmp_path / "codes")
    data = CodeDataset(codes)
    assert data.layout == "class-folders" and len(data) == 96 and (data.num_aug, data.num_tokens) == (2, 16)
    x, y = data[len(data) - 1]  # items are sorted by class folder
    assert x.shape == (16,) and int(y) == 9 and int(x[0]) == 45
    cmd = [*torchrun(2), "autoregressive/train/train_c2i.py", "--strategy", "arpg", "--gpt-model", "ARPG-debug",
           "--code-path", str(codes), "--image-size", "16", "--downsample-size", "4", "--vocab-size", "64",
           "--num-classes", "10", "--global-batch-size", "16", "--lr", "2e-3", "--num-workers", "0",
           "--epochs", "4", "--log-every", "3", "--ckpt-every", "100", "--results-dir", str(tmp_path / "res"),
           "--warmup-epochs", "0", "--device", "cpu"]
    res = run(cmd)
    assert res.returncode == 0, res.stderr[-3000:]
    curve = losses(res.stderr)
    assert len(curve) >= 4 and curve[-1] < curve[0] - 0.5, curve
    ckpt = torch.load(next((tmp_path / "res").glob("*/checkpoints/0000024.pt")), weights_only=True)
    assert ckpt["args"]["strategy"] == "arpg" and ckpt["codes"]["layout"] == "class-folders"
    # The checkpoint loads back strictly as the size it records.
    model = get_strategy("arpg").load_model(next((tmp_path / "res").glob("*/checkpoints/0000024.pt")))
    assert isinstance(model, ARPG) and model.config.block_size == 16


def test_edit_command_and_bad_masks(tmp_path):
    from PIL import Image

    from autoregressive.sample import edit
    from tests.extract_helpers import make_vq_ckpt
    from utils.checkpoint import save_checkpoint

    vq = make_vq_ckpt(tmp_path / "vq.pt")  # VQ-debug, 64 codes, downsampling 4: 32 px -> 8 x 8 tokens
    torch.manual_seed(0)
    model = build_arpg("ARPG-debug", vocab_size=64, block_size=64, num_classes=10)
    gpt = save_checkpoint({"model": model.state_dict()}, tmp_path / "arpg.pt")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "in.png")
    base = ["--gpt-model", "ARPG-debug", "--gpt-ckpt", str(gpt), "--vq-model", "VQ-debug", "--vq-ckpt", str(vq),
            "--codebook-size", "64", "--image-size", "32", "--downsample-size", "4", "--num-classes", "10",
            "--image", str(tmp_path / "in.png"), "--class-id", "3", "--num-samples", "2", "--device", "cpu",
            "--out", str(tmp_path / "out.png")]
    parser = edit.build_parser()
    out = edit.main(parser.parse_args(base + ["--box", "8,8,20,24", "--step", "4", "--top-p", "0.9"]))
    assert Image.open(out).size == (4 * 32 + 5 * 2, 32 + 2 * 2)  # input, masked input, 2 results
    assert edit.mask_from_box("8,8,20,24", 32, 4).sum() == 3 * 4
    assert torch.equal(edit.mask_from_border(1, 8)[1:7, 1:7], torch.zeros(6, 6, dtype=torch.bool))
    # A mask PNG of the image's size with one white block works; a wrong size or an empty mask is refused.
    m = np.zeros((40, 48), dtype=np.uint8)
    m[10:20, 10:20] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    assert edit.mask_from_png(tmp_path / "mask.png", (48, 40), 32, 4).any()
    Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="the mask .* is 32x32 pixels but the image is 48x40"):
        edit.main(parser.parse_args(base + ["--mask", str(tmp_path / "small.png")]))
    Image.fromarray(np.zeros((40, 48), dtype=np.uint8)).save(tmp_path / "empty.png")
    with pytest.raises(ValueError, match="the mask is empty"):
        edit.main(parser.parse_args(base + ["--mask", str(tmp_path / "empty.png")]))
    with pytest.raises(ValueError, match="--box 8,8,8,20 is empty"):
        edit.main(parser.parse_args(base + ["--box", "8,8,8,20"]))
    with pytest.raises(ValueError, match="--outpaint-border 4 must be >= 1 and leave an interior"):
        edit.main(parser.parse_args(base + ["--outpaint-border", "4"]))


def test_training_takes_the_official_lr_schedule_unless_told_otherwise():
    """No schedule flag given: ARPG's official recipe (100 warm-up epochs then a cosine). Any of its
    flags given: the recipe stays off and the flags are taken as given (no flag rewrites another)."""
    from autoregressive.train.train_c2i import build_parser, resolve_flags
    from utils.run import given_flags

    def resolved(*flags):
        parser, argv = build_parser(), ["--code-path", "x", "--strategy", "arpg", *flags]
        args = parser.parse_args(argv)
        resolve_flags(args, given_flags(parser, argv))
        return args.lr_schedule, args.warmup_epochs

    assert resolved("--gpt-model", "ARPG-debug") == ("cosine", 100.0)
    assert resolved("--warmup-epochs", "0") == ("constant", 0.0)
    assert resolved("--lr-schedule", "constant") == ("constant", None)
    assert resolved("--lr-schedule", "cosine", "--warmup-epochs", "5") == ("cosine", 5.0)

"""Parity of LPD with the official code on every `lpd` fixture (teacher-forced forward with its block
input and mask, KV-cached generation, the seeded locality-aware order, position-embedding
interpolation); the official key lists of every released size; a checkpoint of another size refused."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from autoregressive.models.lpd import (LPD, LPDConfig, block_causal_mask, build_lpd, group_attention_mask,
                                       interpolate_pos_embed)
from autoregressive.decoding.lpd_order import lookup_group_sizes, lpd_order_schedule
from autoregressive.strategies import get_strategy
from autoregressive.strategies.lpd import OFFICIAL_MODELS, decode_lpd
from tests.golden import (assert_close, assert_official_keys_exact, fixture_cases, get_case, official_key_files,
                          official_keys)
from utils.checkpoint import CheckpointError, check_state_dict, save_checkpoint

LPD_STRATEGY = get_strategy("lpd")


def build_fixture_model(fx: dict) -> LPD:
    model = LPD(LPDConfig.from_official(fx["config"]))
    LPD_STRATEGY.load_official(model, fx["state_dict"], what="fixture")
    return model.eval()


def check_forward(fx, inp, out, tol):
    model = build_fixture_model(fx)
    assert inp["training_mode"] == (inp["label_drop_prob"] == 1.0)  # the dropped case drops every label
    drop = torch.ones(inp["x"].shape[0], dtype=torch.bool) if inp["label_drop_prob"] == 1.0 else None
    sizes = inp["group_sizes"]
    x = model.training_sequence(inp["x"], inp["labels"], inp["orders"], sizes, drop)
    assert_close(x, out["block_input"], tol, "block input")
    assert_close(group_attention_mask(sizes), out["attn_mask"], tol, "attention mask")
    bounds = torch.tensor([0, 1] + list(np.cumsum(sizes) + 1))
    assert_close(bounds, out["group_sizes_cumsum"], tol, "group boundaries")
    logits, loss = model(inp["x"], inp["labels"], inp["orders"], sizes, targets=inp["x"], drop=drop)
    assert_close(logits, out["logits"], tol, "logits")
    assert_close(loss, out["loss"], tol, "loss")
    assert_close(inp["x"].gather(1, inp["orders"]), out["target_in_order"], tol, "targets in order")
    # The strategy's training batch feeds the same call (its own orders, schedule and drops).
    batch = LPD_STRATEGY.training_batch(inp["x"], inp["labels"], torch.Generator().manual_seed(0))
    batch.inputs.update(orders=inp["orders"], group_sizes=sizes, drop=drop)
    logits2, loss2 = model(**batch.inputs, targets=batch.targets)
    assert_close(loss2, out["loss"], tol, "training_batch loss")


def check_generate(fx, inp, out, tol):
    model = build_fixture_model(fx)
    assert inp["top_k"] == 1 and inp["bsz"] == inp["orders"].shape[0]
    assert torch.equal(block_causal_mask([1] + inp["group_sizes"]), inp["attn_mask"] == 0), "block-causal mask"
    guided, head = [], []
    tokens = decode_lpd(model, inp["labels"], inp["orders"], inp["group_sizes"], cfg_scale=inp["cfg"],
                        cfg_schedule=inp["cfg_schedule"], temperature=inp["temperature"], top_k=inp["top_k"],
                        top_p=inp["top_p"], generator=torch.Generator().manual_seed(0), record_logits=guided,
                        record_head=head)
    assert_close(tokens, out["tokens"], tol, "tokens")
    assert_close(tokens.gather(1, inp["orders"]), out["tokens_in_order"], tol, "tokens in order")
    assert_close(torch.cat(head, dim=1), out["head_logits"], tol, "head logits")
    assert_close(torch.cat(guided, dim=1), out["guided_logits"], tol, "guided logits")


def check_order(fx, inp, out, tol):
    assert inp["python_random_seed"] == inp["numpy_seed"]
    args = (inp["group_sizes"], inp["grid_size"], inp["proximity_threshold"], inp["repulsion_threshold"])
    order = lpd_order_schedule(*args, py_rng=random.Random(inp["python_random_seed"]),
                               np_rng=np.random.RandomState(inp["numpy_seed"]))
    assert_close(torch.tensor(order), out["order"], tol, "order")
    # The official calling convention: seed the global generators, then call.
    random.seed(inp["python_random_seed"])
    np.random.seed(inp["numpy_seed"])
    assert_close(torch.tensor(lpd_order_schedule(*args)), out["order"], tol, "order (global RNG)")
    if inp["group_sizes_source"] != "explicit":
        res, steps = inp["group_sizes_source"].split("/")
        grid = {"256 resolution": 16, "512 resolution": 32}[res]
        assert lookup_group_sizes(grid, int(steps.split()[0])) == inp["group_sizes"]


def check_interpolation(fx, inp, out, tol):
    new = interpolate_pos_embed(inp["pos_embed_checkpoint"], inp["new_seq_len"], mode=inp["mode"])
    assert_close(new, out["pos_embed"], tol, "interpolated pos_embed")
    # The loader applies it when a checkpoint's grid differs from the model's.
    width = inp["pos_embed_checkpoint"].shape[-1]  # the loader only reads the model's pos_embed shape
    model = LPD(LPDConfig(dim=width, n_layer=1, n_head=1, num_classes=10, vocab_size=32, block_size=inp["new_seq_len"]))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    weights["pos_embed"] = inp["pos_embed_checkpoint"]
    LPD_STRATEGY.load_official(model, weights, what="4x4 checkpoint")
    assert_close(model.pos_embed.detach(), out["pos_embed"], tol, "loaded pos_embed")


@pytest.mark.parametrize("path,case_name", fixture_cases("lpd"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    tol, inp, out = fx["tolerance"], case["inputs"], case["outputs"]
    with torch.no_grad():
        if case_name.startswith("train_forward"):
            check_forward(fx, inp, out, tol)
        elif case_name.startswith("generate_"):
            check_generate(fx, inp, out, tol)
        elif case_name.startswith("order_"):
            check_order(fx, inp, out, tol)
        elif case_name.startswith("interpolate_pos_embed"):
            check_interpolation(fx, inp, out, tol)
        else:
            pytest.fail(f"unknown lpd case {case_name!r}: add its check here")


def meta_model(spec: dict, size: str | None = None) -> LPD:
    cfg = LPDConfig.from_official(spec["config"])
    with torch.device("meta"):
        return build_lpd(size or OFFICIAL_MODELS[spec["factory"].rsplit(".", 1)[1]], vocab_size=cfg.vocab_size,
                         block_size=cfg.block_size, num_classes=cfg.num_classes)


@pytest.mark.parametrize("path", official_key_files("lpd"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    model = meta_model(spec)
    ours = LPDConfig.from_official(spec["config"])
    for k in ("dim", "n_layer", "n_head", "mlp_ratio", "norm_eps"):
        assert getattr(model.config, k) == getattr(ours, k), k
    assert_official_keys_exact(model, {**spec, "num_parameters": spec["num_params"]}, drop="norm.weight",
                               extra="blocks.99.attn.qkv.weight", reshape="head.weight")


@pytest.mark.parametrize("path", official_key_files("lpd"))
def test_checkpoint_of_another_size_is_refused(path):
    spec = official_keys(path)
    other = "LPD-XL" if "lpd_xl" not in spec["release"] else "LPD-L"
    fake = {k: torch.empty(v, device="meta") for k, v in spec["keys"].items()}
    ours = {k: tuple(v.shape) for k, v in meta_model(spec, other).state_dict().items()}
    with pytest.raises(CheckpointError) as e:
        check_state_dict(fake, ours, "official")
    assert "does not match" in str(e.value) and "blocks.0." in str(e.value)  # mis-shaped keys named


def test_load_model_refuses_another_size(tmp_path):
    """Our file records its size: asking for another one is refused before any weight is read;
    an unrecorded file of the wrong size fails the strict load, naming the mis-shaped keys."""
    model = build_lpd("LPD-debug", vocab_size=32, block_size=16, num_classes=10)
    recorded = save_checkpoint({"model": model.state_dict(), "args": {"strategy": "lpd", "gpt_model": "LPD-debug"}},
                               tmp_path / "ours.pt")
    with pytest.raises(CheckpointError, match="LPD-debug model, but --gpt-model LPD-L"):
        LPD_STRATEGY.load_model(recorded, "LPD-L", vocab_size=32, block_size=16, num_classes=10)
    loaded = LPD_STRATEGY.load_model(recorded, vocab_size=32, block_size=16, num_classes=10)
    assert torch.equal(loaded.head.weight, model.head.weight)
    bare = save_checkpoint({"model": model.state_dict()}, tmp_path / "bare.pt")
    small = LPDConfig(dim=64, n_layer=4, n_head=4, vocab_size=32, block_size=16, num_classes=10)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        LPD_STRATEGY.load_official(LPD(small), torch.load(bare, weights_only=True)["model"], what="bare")

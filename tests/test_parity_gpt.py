"""Parity of the LlamaGen GPT, its KV cache, the raster sampler and the logits processing with the
official code, on every `llamagen_gpt` fixture; official key lists of every released size."""
from __future__ import annotations

import pytest
import torch

from autoregressive.models.gpt import GPTConfig, Transformer, build_gpt
from autoregressive.decoding.logits import sample_from_logits
from autoregressive.strategies import get_strategy
from tests.golden import (kv_cached_logits, assert_close, assert_official_keys_exact, fixture_cases, get_case,
                          official_key_files, official_keys)

RASTER = get_strategy("raster")


def build_fixture_model(fx: dict) -> Transformer:
    model = Transformer(GPTConfig.from_official(fx["config"]))
    RASTER.load_official(model, fx["state_dict"], what="fixture")
    return model.eval()


def check_train_forward(fx, inp, out, tol):
    model = build_fixture_model(fx)
    logits, loss = model(inp["idx"], inp["cond_idx"], targets=inp["targets"], input_pos=inp["input_pos"])
    assert_close(logits, out["logits"], tol, "eval logits")
    assert_close(loss, out["loss"], tol, "eval loss")
    # The training-mode call (default positions, dropouts 0) with label dropout switched off.
    model.train()
    model.cls_embedding.dropout_prob = 0.0
    batch = RASTER.training_batch(inp["targets"], inp["cond_idx"])
    logits, loss = model(**batch.inputs, targets=batch.targets)
    assert_close(logits, out["logits"], tol, "train logits")
    assert_close(loss, out["loss"], tol, "train loss")


def check_kv_cache(fx, inp, out, tol):
    model = build_fixture_model(fx)
    assert_close(kv_cached_logits(model, inp), out["logits"], tol, "kv-cached logits")


def check_generate(fx, inp, out, tol):
    model = build_fixture_model(fx)
    assert inp["max_new_tokens"] == model.config.block_size and inp["sample_logits"]
    recorded: list[torch.Tensor] = []
    tokens = RASTER.generate(
        model, inp["cond"], cfg_scale=inp["cfg_scale"], cfg_interval=inp["cfg_interval"],
        temperature=inp["temperature"], top_k=inp["top_k"], top_p=inp["top_p"],
        generator=torch.Generator().manual_seed(2204), record_logits=recorded)
    assert_close(tokens, out["tokens"], tol, "tokens")
    assert_close(torch.stack(recorded, dim=1), out["step_logits"], tol, "step_logits")


def check_sample_filter(fx, inp, out, tol):
    idx, probs = sample_from_logits(inp["logits"], inp["temperature"], inp["top_k"], inp["top_p"],
                                    greedy=not inp["sample_logits"])
    assert_close(probs, out["probs"], tol, "probs")
    assert torch.equal(probs == 0, out["probs"] == 0), "filtered entries differ"
    assert_close(idx[:, None], out["idx"], tol, "idx")


@pytest.mark.parametrize("path,case_name", fixture_cases("llamagen_gpt"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    tol, inp, out = fx["tolerance"], case["inputs"], case["outputs"]
    with torch.no_grad():
        if case_name == "train_forward":
            check_train_forward(fx, inp, out, tol)
        elif case_name == "kv_cache_prefill_decode":
            check_kv_cache(fx, inp, out, tol)
        elif case_name.startswith("generate_"):
            check_generate(fx, inp, out, tol)
        elif case_name.startswith("sample_filter_"):
            check_sample_filter(fx, inp, out, tol)
        else:
            pytest.fail(f"unknown llamagen_gpt case {case_name!r}: add its check here")


@pytest.mark.parametrize("path", official_key_files("llamagen_c2i"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    cfg = spec["config"]
    with torch.device("meta"):
        model = build_gpt(spec["release"], vocab_size=cfg["vocab_size"], block_size=cfg["block_size"],
                          num_classes=cfg["num_classes"], cls_token_num=cfg["cls_token_num"])
    # Every architectural field of the official config is what our size table produced.
    ours_cfg = GPTConfig.from_official(cfg)
    for k in ("dim", "n_layer", "n_head", "multiple_of", "norm_eps", "rope_base", "class_dropout_prob"):
        assert getattr(model.config, k) == getattr(ours_cfg, k), k
    assert_official_keys_exact(model, spec, drop="norm.weight", extra="layers.99.attention.wqkv.weight",
                               reshape="output.weight")

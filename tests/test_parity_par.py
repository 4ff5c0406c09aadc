"""Parity of PAR (order, RoPE table, mask, training logits and loss, KV-cached steps, greedy CFG
generation, per-row sampling) with the official code on every `par` fixture; official key lists of
every released PAR checkpoint accepted exactly."""
from __future__ import annotations

import pytest
import torch

from autoregressive.models.par import PARConfig, PARTransformer, build_par, par_group_sizes, par_order
from autoregressive.decoding.logits import sample_from_logits
from autoregressive.strategies import get_strategy
from autoregressive.strategies.par import ParStrategy
from tests.golden import (assert_close, assert_official_keys_exact, fixture_cases, get_case, golden_dir,
                          load_fixture, official_key_files, official_keys)
from utils.checkpoint import CheckpointError

PAR = get_strategy("par")
SPE_KEY = "spe_tok_embeddings.special_embeddings.weight"


def build_fixture_model(fx: dict) -> PARTransformer:
    model = PARTransformer(PARConfig.from_official(fx["config"]))
    PAR.load_official(model, fx["state_dict"], what="fixture")
    return model.eval()


def check_order(fx, inp, out, tol):
    model = build_fixture_model(fx)
    grid, n = inp["grid"], inp["ar_token_num"]
    order = par_order(grid, n)
    assert_close(order, out["order"], tol, "order")
    assert_close(torch.argsort(order), out["inverse"], tol, "inverse")
    assert torch.equal(model.order, order)
    assert_close(model.freqs_cis, out["freqs_cis"], tol, "freqs_cis")
    t = out["train_mask"].shape[0]
    assert t == model.seq_len
    assert torch.equal(model.group_mask(torch.arange(t), t), out["train_mask"]), "train mask"
    lc = out["cache_mask"].shape[0]
    assert lc == out["cache_len"]
    assert torch.equal(model.group_mask(torch.arange(lc), lc), out["cache_mask"]), "cache mask"
    assert par_group_sizes(grid * grid, n) == out["step_sizes"].tolist()


def check_train_forward(fx, inp, out, tol):
    model = build_fixture_model(fx)
    # The strategy's reorder of the raster codes gives the official inputs and targets.
    strategy = ParStrategy(model.ar_token_num, model.spe_token_num)
    batch = strategy.training_batch(inp["z_raster"], inp["cond_idx"])
    assert torch.equal(batch.targets, inp["targets"]) and torch.equal(batch.inputs["idx"], inp["idx"])
    model.train()
    model.cls_embedding.dropout_prob = 0.0  # label dropout off, as the fixture's train-mode call
    logits, loss = model(**batch.inputs, targets=batch.targets)
    assert_close(logits, out["logits"], tol, "train logits")
    assert_close(loss, out["loss"], tol, "train loss")
    assert_close(strategy.training_loss(model, inp["z_raster"], inp["cond_idx"]), out["loss"], tol, "training_loss")
    model.eval()
    assert_close(model.sequence_logits(inp["idx"], inp["cond_idx"]), out["logits_all_eval"], tol, "eval logits")
    # The sequence entering layer 0: [class, zp_0..zp_{n-1}, M_1..M_S, zp_n..zp_{N-2}].
    seen = []
    hook = model.layers[0].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.sequence_logits(inp["idx"], inp["cond_idx"])
    hook.remove()
    assert_close(seen[0], out["block_input"], tol, "block_input")


def check_kv_cache_steps(fx, inp, out, tol):
    model = build_fixture_model(fx)
    n, zp = model.ar_token_num, inp["zp"]
    cache = model.new_cache(inp["max_batch_size"])
    pos = [p.long() for p in inp["step_input_pos"]]
    steps = [model.prefill(inp["cond_idx"], cache)]
    for t in range(1, n):
        assert torch.equal(model.slot_of_cell[model.order[t - 1:t]], pos[t])
        steps.append(model.decode_step(zp[:, t - 1:t], cache, pos[t]))
    # The official call passes zp_1..zp_{n-1} and keeps the last; ours takes zp_{n-1} alone.
    assert torch.equal(inp["step_idx"][n][:, -1:], zp[:, n - 1:n])
    steps.append(model.decode_transition(zp[:, n - 1:n], cache))
    for g in range(n + 1, len(pos)):
        j = g - n  # the group fed: PAR indices j n .. j n + n - 1
        assert torch.equal(model.slot_of_cell[model.order[j * n:(j + 1) * n]], pos[g])
        steps.append(model.decode_step(zp[:, j * n:(j + 1) * n], cache, pos[g]))
    assert [s.shape[1] for s in steps] == out["step_sizes"].tolist()
    assert_close(torch.cat(steps, dim=1), out["logits"], tol, "kv-cached logits")


def check_generate(fx, inp, out, tol):
    model = build_fixture_model(fx)
    assert inp["max_new_tokens"] == model.config.block_size and inp["sample_logits"]
    assert (inp["ar_token_num"], inp["spe_token_num"]) == (model.ar_token_num, model.spe_token_num)
    recorded: list[torch.Tensor] = []
    tokens = PAR.generate(
        model, inp["cond"], cfg_scale=inp["cfg_scale"], cfg_interval=inp["cfg_interval"],
        temperature=inp["temperature"], top_k=inp["top_k"], top_p=inp["top_p"],
        steps=len(out["step_sizes"]), generator=torch.Generator().manual_seed(2204), record_logits=recorded)
    assert_close(tokens, out["tokens_raster"], tol, "tokens (raster)")
    assert_close(tokens[:, model.order], out["tokens"], tol, "tokens (PAR order)")
    assert [r.shape[1] for r in recorded] == out["step_sizes"].tolist()
    assert_close(torch.cat(recorded, dim=1), out["step_logits"], tol, "step_logits")


def check_sample_multi(fx, inp, out, tol):
    rows = inp["logits"][:, -inp["spe_token_num"]:]  # sample_multi uses the last S rows
    idx, probs = sample_from_logits(rows, inp["temperature"], inp["top_k"], inp["top_p"],
                                    greedy=not inp["sample_logits"])
    assert_close(probs, out["probs"], tol, "probs")
    assert torch.equal(probs == 0, out["probs"] == 0), "filtered entries differ"
    assert_close(idx, out["idx"], tol, "idx")


CHECKS = {"order": check_order, "train_forward": check_train_forward, "kv_cache_steps": check_kv_cache_steps}


@pytest.mark.parametrize("path,case_name", fixture_cases("par"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    tol, inp, out = fx["tolerance"], case["inputs"], case["outputs"]
    with torch.no_grad():
        if case_name in CHECKS:
            CHECKS[case_name](fx, inp, out, tol)
        elif case_name.startswith("generate_"):
            check_generate(fx, inp, out, tol)
        elif case_name.startswith("sample_multi_filter_"):
            check_sample_multi(fx, inp, out, tol)
        else:
            pytest.fail(f"unknown par case {case_name!r}: add its check here")


def release_model(spec: dict, device: str = "meta") -> PARTransformer:
    cfg = spec["config"]
    with torch.device(device):
        return build_par(spec["constructor"].split("'")[1], vocab_size=cfg["vocab_size"],
                         block_size=cfg["block_size"], num_classes=cfg["num_classes"],
                         cls_token_num=cfg["cls_token_num"], spe_token_num=cfg["spe_token_num"],
                         ar_token_num=cfg["ar_token_num"])


@pytest.mark.parametrize("path", official_key_files("par_"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    model = release_model(spec)
    ours_cfg = PARConfig.from_official(spec["config"])
    for k in ("dim", "n_layer", "n_head", "multiple_of", "norm_eps", "rope_base", "class_dropout_prob",
              "spe_token_num", "ar_token_num"):
        assert getattr(model.config, k) == getattr(ours_cfg, k), k
    assert_official_keys_exact(model, spec, drop=SPE_KEY, extra="layers.99.attention.wqkv.weight",
                               reshape="output.weight")


def test_wrong_number_of_special_tokens_is_refused():
    """A PAR-16x state dict (15 M tokens) into a PAR-4x model: the strict loader names the key."""
    path = golden_dir() / "par" / "par_tiny_16x.pt"
    if not path.is_file():
        pytest.skip(f"no {path}")
    fx16 = load_fixture(str(path))
    assert fx16["config"]["ar_token_num"] == 16
    cfg4 = {**fx16["config"], "ar_token_num": 4, "spe_token_num": 3}
    model = PARTransformer(PARConfig.from_official(cfg4))
    with pytest.raises(CheckpointError, match=SPE_KEY.replace(".", r"\.")):
        PAR.load_official(model, fx16["state_dict"], what="PAR-16x weights")
    # A plain LlamaGen state dict lacks the M tokens: refused, naming the missing key.
    weights = {k: v for k, v in fx16["state_dict"].items() if k != SPE_KEY}
    with pytest.raises(CheckpointError, match=SPE_KEY.replace(".", r"\.")):
        PAR.load_official(PARTransformer(PARConfig.from_official(fx16["config"])), weights, what="LlamaGen weights")

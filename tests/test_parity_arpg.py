"""Parity of ARPG with the official code on every `arpg` fixture (training forward under given
orders, KV-cached generation with CFG schedules, step schedules, logits filtering, inpainting);
official key lists of ARPG-L/XL/XXL."""
from __future__ import annotations

import pytest
import torch

from autoregressive.models.arpg import ARPG, ARPGConfig, build_arpg
from autoregressive.decoding.logits import top_k_top_p_filter
from autoregressive.decoding.schedules import group_sizes, known_before
from autoregressive.strategies import get_strategy
from tests.golden import (assert_close, assert_official_keys_exact, fixture_cases, get_case,
                          official_key_files, official_keys)


def build_fixture_model(fx: dict) -> ARPG:
    model = ARPG(ARPGConfig.from_official(fx["config"]))
    get_strategy("arpg").load_official(model, fx["state_dict"], what="fixture")
    return model.eval()


def assert_filtered_close(actual: torch.Tensor, expected: torch.Tensor, tol: dict, what: str) -> None:
    """Filtered logits: the -inf pattern exactly, the finite values within the tolerance."""
    assert torch.equal(torch.isfinite(actual), torch.isfinite(expected)), f"{what}: filtered entries differ"
    keep = torch.isfinite(expected)
    assert_close(actual[keep], expected[keep], tol, what)


def strategy_for(inp: dict):
    return get_strategy("arpg").__class__(inp["sample_schedule"], inp["cfg_schedule"])


class Replay:
    """A row sampler that returns given tokens (B, N) in generation order, G per step, recording
    the probabilities it was asked to draw from (teacher forcing of a stochastic official run)."""

    def __init__(self, tokens_in_order: torch.Tensor):
        self.tokens, self.start, self.probs = tokens_in_order, 0, []

    def multinomial(self, probs: torch.Tensor) -> torch.Tensor:  # probs (B * G, V)
        b = self.tokens.shape[0]
        g = probs.shape[0] // b
        self.probs.append(probs.reshape(b, g, -1))
        out = self.tokens[:, self.start:self.start + g].reshape(-1, 1)
        self.start += g
        return out


def record_model_steps(model: ARPG) -> list:
    """Record (input ids, raw logits) of every `decode_step` the strategy makes."""
    calls = []
    inner = model.decode_step

    def wrapped(input_ids, *args, **kwargs):
        logits = inner(input_ids, *args, **kwargs)
        calls.append((input_ids, logits))
        return logits

    model.decode_step = wrapped
    return calls


# ---------------------------------------------------------------------------------------------


def check_forward(fx, inp, out, tol):
    model = build_fixture_model(fx).train()  # train mode = causal masks; every dropout is 0
    # The labels the official call ended up with: the dropped ones are the null class C.
    cond = torch.where(inp["label_dropped"], torch.full_like(inp["condition"], model.num_classes), inp["condition"])
    logits, loss = model(inp["input_ids"], cond, inp["orders"], targets=inp["targets"])
    assert_close(logits, out["logits"], tol, "logits")
    assert_close(loss, out["loss"], tol, "loss")
    assert_close(model.condition_ids(cond), out["condition_ids"], tol, "condition ids")
    assert_close(inp["targets"].gather(1, inp["orders"]), out["shuffled_targets"], tol, "shuffled targets")
    assert_close(model.freqs_cis, out["freqs_cis_table"], tol, "RoPE table")
    # The explicit RoPE rows and masks of the fixture give the same logits through the mask path.
    rows = out["rope_rows"]
    input_ids = torch.cat([model.condition_ids(cond), out["shuffled_targets"][:, :-1]], dim=1)
    explicit = model.forward_shared(input_ids, rows[:, :-1], rows[:, 1:], self_mask=out["self_attn_mask"],
                                    cross_mask=out["cross_attn_mask"])
    assert_close(explicit, out["logits"], tol, "logits with the fixture's rows and masks")
    # The strategy's training step draws orders from the generator and feeds the model the same way.
    arpg = get_strategy("arpg")
    batch = arpg.training_batch(inp["input_ids"], cond, torch.Generator().manual_seed(0))
    ref_logits, _ = model(inp["input_ids"], cond, batch.extras["orders"], targets=inp["targets"])
    assert torch.allclose(arpg.training_loss(model, inp["input_ids"], cond, torch.Generator().manual_seed(0)),
                          torch.nn.functional.cross_entropy(ref_logits.flatten(0, 1),
                                                            inp["targets"].gather(1, batch.extras["orders"]).flatten()))


def check_generate(fx, inp, out, tol):
    model = build_fixture_model(fx)
    strategy = strategy_for(inp)
    sizes = group_sizes(inp["sample_schedule"], inp["seq_len"], inp["num_iter"])
    assert sizes == list(inp["group_sizes"]) and torch.equal(torch.tensor(sizes), out["group_sizes"])
    assert_close(torch.tensor(strategy.cfg_scales(inp["guidance_scale"], sizes), dtype=torch.float64),
                 out["cfg_scales"], {"atol": 1e-12, "rtol": 0}, "cfg scales")
    steps = record_model_steps(model)
    guided: list[torch.Tensor] = []
    replay = None if inp["greedy"] else Replay(inp["tokens_sampled_in_order"])
    tokens = strategy.decode(model, inp["condition"], inp["orders"], sizes, cfg_scale=inp["guidance_scale"],
                             temperature=inp["temperature"], top_k=inp["top_k"], top_p=inp["top_p"],
                             generator=replay or torch.Generator().manual_seed(0), record_logits=guided)
    b = inp["condition"].shape[0]
    assert_close(torch.cat([ids[:b] for ids, _ in steps], dim=1), out["step_input_ids_cond"], tol, "step inputs")
    assert_close(torch.cat([lg for _, lg in steps], dim=1), out["step_logits"], tol, "step logits")
    filtered = top_k_top_p_filter(torch.cat(guided, dim=1) / max(inp["temperature"], 1e-5), inp["top_k"], inp["top_p"])
    assert_filtered_close(filtered, out["guided_logits"], tol, "guided logits")
    if inp["greedy"]:
        assert_close(tokens, out["tokens"], tol, "tokens")
        assert_close(tokens[:, inp["orders"]], out["tokens_in_order"], tol, "tokens in order")
    else:
        assert_close(torch.cat(replay.probs, dim=1), out["probs"], tol, "probs")
        assert_close(tokens, inp["tokens_sampled"], tol, "teacher-forced tokens")


def check_schedule(fx, inp, out, tol):
    if out.get("raises"):
        with pytest.raises(ValueError, match="larger than the number of tokens"):
            group_sizes(inp["sample_schedule"], inp["seq_len"], inp["num_iter"])
        return
    sizes = group_sizes(inp["sample_schedule"], inp["seq_len"], inp["num_iter"])
    assert_close(torch.tensor(sizes), out["group_sizes"], tol, "group sizes")
    assert_close(torch.tensor(known_before(sizes)), out["known_before"], tol, "known before")
    scales = strategy_for(inp).cfg_scales(inp["guidance_scale"], sizes)
    assert_close(torch.tensor(scales, dtype=torch.float64), out["cfg_scales"], tol, "cfg scales")


def check_sampling(fx, inp, out, tol):
    if out.get("raises"):
        # The official function fails on 3-D logits with top-p; ours filters the last dim, row by row.
        logits = torch.randn(*inp["shape"], generator=torch.Generator().manual_seed(0))
        ours = top_k_top_p_filter(logits, inp["top_k"], inp["top_p"])
        flat = top_k_top_p_filter(logits.reshape(-1, logits.shape[-1]), inp["top_k"], inp["top_p"])
        assert torch.equal(ours.reshape(flat.shape), flat)
        assert bool((torch.isinf(ours).sum(-1) > 0).all()), "top-p removed nothing"
        return
    filtered = top_k_top_p_filter(inp["logits"], inp["top_k"], inp["top_p"])
    assert_filtered_close(filtered, out["filtered"], tol, "filtered logits")
    assert torch.equal(torch.isfinite(filtered), out["kept"]), "kept mask"


def check_inpaint(fx, inp, out, tol):
    model = build_fixture_model(fx)
    strategy = strategy_for(inp)
    n_u = inp["unknown_order"].numel()
    sizes = group_sizes(inp["sample_schedule"], n_u, inp["num_iter"])
    assert_close(torch.tensor(sizes), out["group_sizes"], tol, "group sizes")
    assert_close(torch.tensor(strategy.cfg_scales(inp["guidance_scale"], sizes), dtype=torch.float64),
                 out["cfg_scales"], {"atol": 1e-12, "rtol": 0}, "cfg scales")
    known_mask = ~inp["unknown_mask"].reshape(-1)
    assert torch.equal(known_mask.nonzero().squeeze(1), inp["known_positions"])
    steps = record_model_steps(model)
    guided: list[torch.Tensor] = []
    tokens = strategy.decode(model, inp["condition"], inp["unknown_order"], sizes,
                             known_positions=inp["known_positions"], known_tokens=inp["known_tokens"],
                             cfg_scale=inp["guidance_scale"], temperature=inp["temperature"],
                             top_k=inp["top_k"], generator=torch.Generator().manual_seed(0), record_logits=guided)
    assert_close(tokens, out["tokens"], tol, "tokens")
    assert_close(torch.cat([lg for _, lg in steps], dim=1), out["step_logits"], tol, "step logits")
    filtered = top_k_top_p_filter(torch.cat(guided, dim=1) / max(inp["temperature"], 1e-5), inp["top_k"])
    assert_filtered_close(filtered, out["guided_logits"], tol, "guided logits")


CHECKS = {"forward": check_forward, "generate": check_generate, "schedule": check_schedule,
          "sampling": check_sampling, "inpaint": check_inpaint}


@pytest.mark.parametrize("path,case_name", fixture_cases("arpg"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    stem = path.rsplit("/", 1)[-1][:-3]
    if stem not in CHECKS:
        pytest.fail(f"unknown arpg fixture file {stem}.pt: add its check here")
    with torch.no_grad():
        CHECKS[stem](fx, case["inputs"], case["outputs"], fx["tolerance"])


@pytest.mark.parametrize("path", official_key_files("arpg_"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    cfg = spec["config"]
    with torch.device("meta"):
        model = build_arpg(spec["gpt_model"], vocab_size=cfg["vocab_size"], block_size=cfg["block_size"],
                           num_classes=cfg["num_classes"], cls_token_num=cfg["cls_token_num"])
    ours = ARPGConfig.from_official(cfg)
    for k in ("dim", "n_layer", "n_head", "multiple_of", "norm_eps", "rope_base", "class_dropout_prob",
              "token_dropout_p", "resid_dropout_p", "ffn_dropout_p"):
        assert getattr(model.config, k) == getattr(ours, k), k
    assert_official_keys_exact(model, {**spec, "num_parameters": spec["num_params"]}, drop="norm.weight",
                               extra="layers.cross_dec.99.attn.to_q.weight", reshape="head.weight")

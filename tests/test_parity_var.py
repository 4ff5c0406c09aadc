"""Parity of the VAR transformer, its per-scale KV-cached sampler and the `var` strategy with the
official code, on every `var` fixture (both AdaLN variants); official key lists of every release."""
from __future__ import annotations

import pytest
import torch

from autoregressive.models.var import VAR, VARConfig, build_var
from autoregressive.decoding.logits import sample_from_logits, top_k_top_p_filter
from autoregressive.strategies.var import VarStrategy, draw_labels
from tests.golden import (assert_close, assert_official_keys_exact, fixture_cases, get_case,
                          official_key_files, official_keys)
from tokenizer.msvq import MSVQConfig, MultiScaleVQVAE, load_msvq_weights


def build_fixture(fx: dict) -> tuple[VAR, VarStrategy]:
    vae = MultiScaleVQVAE(MSVQConfig.from_official(fx["vae_config"], norm_num_groups=fx["norm_num_groups"]))
    load_msvq_weights(vae, fx["vae_state_dict"], what="fixture tokenizer")
    strategy = VarStrategy()
    strategy.use_tokenizer(vae)
    model = VAR(VARConfig.from_official(fx["config"], vocab_size=vae.vocab_size, Cvae=vae.config.z_channels))
    strategy.load_official(model, fx["state_dict"], what="fixture")
    return model.eval(), strategy


def official_sampling_args(inp: dict) -> dict:
    """Official `autoregressive_infer_cfg` arguments -> ours: cfg c -> cfg_scale 1 + c, top_p 0 (off) -> 1."""
    return dict(cfg_scale=1.0 + inp["cfg"], top_k=inp["top_k"], top_p=inp["top_p"] or 1.0,
                more_smooth=inp["more_smooth"])


def check_sampling(model: VAR, strategy: VarStrategy, inp: dict, out: dict, tol: dict) -> None:
    gen = torch.Generator().manual_seed(inp["g_seed"])
    b, label = inp["B"], inp["label_B"]
    if label is None:
        labels = draw_labels(b, model.num_classes, gen)
    elif isinstance(label, int):
        labels = torch.full((b,), label)
    else:
        labels = label
    assert_close(labels, out["label_B_used"], tol, "labels")
    recorded: list[torch.Tensor] = []
    tokens, f_hat = strategy.sample(model, labels, generator=gen, record_logits=recorded,
                                    **official_sampling_args(inp))
    sizes = [p * p for p in model.config.patch_nums]
    for si, (ids, want) in enumerate(zip(tokens.split(sizes, dim=1), out["idx_Bl"])):
        assert_close(ids, want, tol, f"ids of scale {si}")
    assert_close(f_hat, out["f_hat"], tol, "f_hat")
    if "logits_BlV_cfg" in out:
        for si, (lg, want) in enumerate(zip(recorded, out["logits_BlV_cfg"])):
            assert_close(lg, want, tol, f"guided logits of scale {si}")
    if "img" in out:
        img = strategy.decode_tokens(strategy.tokenizer, tokens, model.config.patch_nums[-1])
        assert_close((img + 1) / 2, out["img"], tol, "image")


def check_case(fx: dict, name: str, inp: dict, out: dict, tol: dict) -> None:
    model, strategy = build_fixture(fx)
    quant = strategy.tokenizer.quantize
    if name == "forward_teacher_forcing":
        x = quant.ids_to_var_input(inp["gt_idx_Bl"])
        assert_close(x, inp["x_BLCv_wo_first_l"], tol, "teacher-forcing input")
        logits, _ = model(inp["label_B"], inp["x_BLCv_wo_first_l"])
        assert_close(logits, out["logits_BLV"], tol, "logits")
        batch = strategy.training_batch(torch.cat(inp["gt_idx_Bl"], 1), inp["label_B"])
        assert_close(model(**batch.inputs)[0], out["logits_BLV"], tol, "logits via training_batch")
    elif name == "forward_prog_si":
        si = inp["prog_si"]
        x = quant.ids_to_var_input(inp["gt_idx_Bl"], prog_si=si)
        assert_close(x, inp["x_BLCv_wo_first_l"], tol, "teacher-forcing input (prog_si)")
        logits, _ = model(inp["label_B"], x, prog_si=si)
        assert_close(logits, out["logits_BLV"], tol, "logits (prog_si)")
    elif name == "train_step_loss":
        assert inp["prog_si"] == -1
        codes = strategy.tokenizer.encode_to_indices(inp["inp_B3HW"])
        assert_close(codes, out["gt_BL"], tol, "gt_BL")
        strategy.label_smooth = inp["label_smooth"]
        loss = strategy.training_loss(model.train(), codes, inp["label_B"])
        assert_close(loss, out["loss"], tol, "loss")
    elif name.startswith("infer_"):
        check_sampling(model, strategy, inp, out, tol)
    elif name == "sample_with_top_k_top_p":
        logits, k, p = inp["logits_BlV"], inp["top_k"], inp["top_p"]
        filtered = top_k_top_p_filter(logits, k, p)
        assert torch.equal(torch.isfinite(filtered), out["keep_mask"]), "kept entries differ"
        assert_close(filtered, out["logits_after_inplace_masking"], tol, "masked logits")
        idx, _ = sample_from_logits(logits, 1.0, k, p, torch.Generator().manual_seed(inp["rng_seed"]))
        assert_close(idx[..., None], out["idx_Bl1"], tol, "sampled ids")
    else:
        pytest.fail(f"unknown var case {name!r}: add its check here")


@pytest.mark.parametrize("path,case_name", fixture_cases("var"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    with torch.no_grad():
        check_case(fx, case_name, case["inputs"], case["outputs"], fx["tolerance"])


@pytest.mark.parametrize("path", official_key_files("var_d"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    spec["num_parameters"] = spec["num_params"]  # the VAR key lists name the count `num_params`
    cfg, vae = spec["config"], spec["vae_config"]
    with torch.device("meta"):
        model = build_var(spec["release"].replace("var_d", "VAR-d"), shared_aln=cfg["shared_aln"],
                          patch_nums=cfg["patch_nums"], vocab_size=vae["vocab_size"], Cvae=vae["z_channels"])
    # The official sizing rule gives every architectural field of the release.
    ours = VARConfig.from_official(cfg, vocab_size=vae["vocab_size"], Cvae=vae["z_channels"])
    for k in ("depth", "embed_dim", "num_heads", "drop_path_rate", "attn_l2_norm", "cond_drop_rate", "norm_eps"):
        assert getattr(model.config, k) == pytest.approx(getattr(ours, k)), k
    assert model.config.L == spec["L"]
    assert_official_keys_exact(model, spec, drop="head.weight", extra="blocks.99.attn.q_bias",
                               reshape="pos_1LC")

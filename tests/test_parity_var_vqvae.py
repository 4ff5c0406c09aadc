"""Parity of VAR's multi-scale residual VQVAE (`tokenizer/msvq.py`) with the official code, on every
`var_vqvae` fixture; the official key list of `vae_ch160v4096z32.pth` accepted exactly."""
from __future__ import annotations

import pytest
import torch

from tokenizer.msvq import (MSVQConfig, MultiScaleVQVAE, build_msvq, load_msvq_weights, phi_index_per_scale,
                            phi_ticks)
from tests.golden import (assert_close, assert_official_keys_exact, fixture_cases, get_case,
                          official_key_files, official_keys)


def build_fixture_vqvae(fx: dict) -> MultiScaleVQVAE:
    cfg = MSVQConfig.from_official(fx["config"], norm_num_groups=fx["norm_num_groups"])
    model = MultiScaleVQVAE(cfg)
    load_msvq_weights(model, fx["state_dict"], what="fixture")
    return model.eval()


def assert_list_close(actual: list, expected: list, tol: dict, what: str) -> None:
    assert len(actual) == len(expected), f"{what}: {len(actual)} scales != {len(expected)}"
    for si, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, tol, f"{what}[{si}]")


def check_case(vae: MultiScaleVQVAE, name: str, inp: dict, out: dict, tol: dict) -> None:
    q = vae.quantize
    if name == "img_to_idxBl":
        x = inp["inp_img_no_grad"]
        assert_close(vae.encoder(x), out["z_enc"], tol, "z_enc")
        assert_close(vae.encode_features(x), out["f"], tol, "f")
        assert_list_close(vae.img_to_ids(x), out["idx_Bl"], tol, "idx_Bl")
        assert_close(vae.encode_to_indices(x), out["idx_BL"], tol, "idx_BL")
    elif name == "f_to_fhat":
        assert inp["to_fhat"]
        assert_list_close(q.quantize_residual(inp["f_BChw"])[1], out["f_hat_per_scale"], tol, "f_hat")
    elif name == "img_to_reconstructed_img":
        assert inp["last_one"]
        assert_close(vae.img_to_reconstructed_img(inp["x"]), out["img"], tol, "img")
    elif name == "idxBl_to_img":
        assert inp["same_shape"] and inp["last_one"]
        assert_close(vae.ids_to_img(inp["ms_idx_Bl"]), out["img"], tol, "img (list)")
        assert_close(vae.decode_indices(torch.cat(inp["ms_idx_Bl"], 1)), out["img"], tol, "img (concatenated)")
    elif name == "embed_to_fhat":
        assert_list_close(q.embed_to_fhat(inp["ms_h_BChw"], all_to_max_scale=True),
                          out["all_to_max_scale_True_last_one_False"], tol, "f_hat")
        assert_close(q.embed_to_fhat(inp["ms_h_BChw"], all_to_max_scale=False)[-1],
                     out["all_to_max_scale_False_last_one_True"], tol, "f_hat (progressive)")
    elif name == "idxBl_to_var_input":
        assert_close(q.ids_to_var_input(inp["gt_ms_idx_Bl"]), out["x_BLCv_wo_first_l"], tol, "var input")
    elif name == "get_next_autoregressive_input":
        hs = inp["ms_h_BChw"]
        f_hat = torch.zeros_like(out["f_hat_after_step"][0])
        for si, h in enumerate(hs):
            f_hat, nxt = q.next_autoregressive_input(si, f_hat, h)
            assert_close(f_hat, out["f_hat_after_step"][si], tol, f"f_hat step {si}")
            assert_close(nxt, out["next_token_map_after_step"][si], tol, f"next map step {si}")
    elif name == "phi_index":
        sn = inp["SN"]
        assert q.phi_index == list(out["phi_index_per_scale"])
        assert phi_index_per_scale(len(out["ticks"]), sn) == list(out["phi_index_per_scale"])
        assert phi_ticks(len(out["ticks"])).tolist() == list(out["ticks"])
    else:
        pytest.fail(f"unknown var_vqvae case {name!r}: add its check here")


@pytest.mark.parametrize("path,case_name", fixture_cases("var_vqvae"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    with torch.no_grad():
        check_case(build_fixture_vqvae(fx), case_name, case["inputs"], case["outputs"], fx["tolerance"])


@pytest.mark.parametrize("path", official_key_files("vae_ch160v4096z32"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    spec["num_parameters"] = spec["num_params"]  # the VAR key lists name the count `num_params`
    cfg = MSVQConfig.from_official(spec["config"])
    assert cfg.norm_num_groups == spec["hard_coded"]["GroupNorm_num_groups"]
    with torch.device("meta"):
        model = build_msvq(**{k: getattr(cfg, k) for k in ("vocab_size", "z_channels", "ch", "v_patch_nums")})
    assert model.downsample == spec["hard_coded"]["downsample"]
    assert_official_keys_exact(model, spec, drop="quantize.embedding.weight",
                               extra="quantize.quant_resi.qresi_ls.4.weight", reshape="quant_conv.weight")


def test_usage_buffer_of_other_scale_count_is_replaced():
    """The official loader keeps the model's own usage statistics when the number of scales differs
    (the 256 px release file serves the 512 px list); any other mismatch is refused."""
    cfg = dict(vocab_size=8, z_channels=4, ch=32, v_patch_nums=(1, 2))
    src, dst = build_msvq(**cfg), build_msvq(**{**cfg, "v_patch_nums": (1, 2, 3)})
    sd = src.state_dict()
    load_msvq_weights(dst, sd, "other scales")
    assert torch.equal(dst.quantize.embedding.weight, src.quantize.embedding.weight)
    bad = dict(sd)
    bad["quantize.embedding.weight"] = torch.zeros(9, 4)
    with pytest.raises(Exception, match="quantize.embedding.weight"):
        load_msvq_weights(dst, bad, "other vocabulary")

"""Parity of the LlamaGen VQ tokenizer with the official code, on every `llamagen_vq` fixture."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from dataset.transforms import ten_crop_tensor, with_flip
from tests.golden import (assert_close, assert_official_keys_exact, fixture_cases, get_case,
                          official_key_files, official_keys)
from tokenizer.vq_model import VQConfig, VQModel, VQ_models
from utils.checkpoint import load_state_dict_strict


def build_fixture_model(fx: dict) -> VQModel:
    model = VQModel(VQConfig(**fx["config"]))
    load_state_dict_strict(model, fx["state_dict"], what="fixture")
    return model.eval()


@pytest.mark.parametrize("path,case_name", fixture_cases("llamagen_vq"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    tol, inp, out = fx["tolerance"], case["inputs"], case["outputs"]
    model = build_fixture_model(fx)
    with torch.no_grad():
        if case_name == "encode":
            h = model.quant_conv(model.encoder(inp["x"]))
            quant, _, (_, _, idx) = model.encode(inp["x"])
            assert_close(h, out["h"], tol, "h")
            assert_close(quant, out["quant"], tol, "quant")
            assert_close(idx, out["indices"], tol, "indices")
        elif case_name == "decode":
            assert_close(model.decode(inp["quant"]), out["dec"], tol, "dec")
        elif case_name == "forward":
            assert_close(model(inp["x"])[0], out["dec"], tol, "dec")
        elif case_name == "decode_code":
            quant = model.quantize.get_codebook_entry(inp["code_b"], inp["shape"], inp["channel_first"])
            assert_close(quant, out["quant"], tol, "quant")
            assert_close(model.decode_code(inp["code_b"], inp["shape"]), out["dec"], tol, "dec")
            assert_close(model.decode_indices(inp["code_b"]), out["dec"], tol, "decode_indices")
        elif case_name == "extract_codes_flip":
            x_all = with_flip(inp["x"])
            codes = model.encode_to_indices(x_all).reshape(1, 2, -1)
            assert_close(codes, out["codes"], tol, "codes")
        elif case_name == "extract_codes_ten_crop":
            img = Image.fromarray(inp["image_hwc_uint8"].numpy())
            assert int(inp["image_size"] * inp["crop_range"]) == inp["crop_size"]
            crops = ten_crop_tensor(img, inp["image_size"], inp["crop_range"])
            assert_close(crops, out["crops"], tol, "crops")
            codes = model.encode_to_indices(crops).reshape(1, 10, -1)
            assert_close(codes, out["codes"], tol, "codes")
        elif case_name == "train_losses":
            model.train()
            dec, (vq_loss, commit_loss, entropy_loss, usage) = model(inp["x"])
            assert_close(dec, out["dec"], tol, "dec")
            assert_close(vq_loss, out["vq_loss"], tol, "vq_loss")
            assert_close(commit_loss, out["commit_loss"], tol, "commit_loss")
            assert_close(entropy_loss, out["entropy_loss"], tol, "entropy_loss")
            assert usage == pytest.approx(out["codebook_usage"], abs=1e-12)
        else:
            pytest.fail(f"unknown llamagen_vq case {case_name!r}: add its check here")


@pytest.mark.parametrize("path", official_key_files("llamagen_vq"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    cfg = spec["config"]
    name = "VQ-16" if cfg["encoder_ch_mult"] == [1, 1, 2, 2, 4] else "VQ-8"
    with torch.device("meta"):
        model = VQ_models[name](codebook_size=cfg["codebook_size"], codebook_embed_dim=cfg["codebook_embed_dim"])
    assert_official_keys_exact(model, spec, drop="quantize.embedding.weight", extra="extra.weight",
                               reshape="quant_conv.weight")

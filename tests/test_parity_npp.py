"""Parity of NPP with the official code on every `npp` fixture: patch aggregation, patch targets,
coarse RoPE, training logits and loss at every patch size, the KV cache after a coarse-stage
forward, raster generation, the stage schedule and the per-stage learning rates; official keys."""
from __future__ import annotations

import argparse
import math

import pytest
import torch

from autoregressive.models.gpt import GPTConfig
from autoregressive.models.npp import (NppTransformer, coarse_rope_rows, patchify_embeddings,
                                       patchify_targets)
from autoregressive.strategies import get_strategy
from autoregressive.strategies.npp_schedule import lr_multiplier, patch_schedule
from tests.golden import (kv_cached_logits, assert_close, assert_official_keys_exact, fixture_cases, get_case,
                          official_key_files, official_keys)


def build_fixture_model(fx: dict) -> NppTransformer:
    model = NppTransformer(GPTConfig.from_official(fx["config"]))
    get_strategy("npp").load_official(model, fx["state_dict"], what="fixture")
    return model


def check_train_forward(fx, inp, out, tol):
    model = build_fixture_model(fx).train()
    model.cls_embedding.dropout_prob = 0.0  # the fixture switched label dropout off
    z, y, p = inp["idx"], inp["cond_idx"], inp["patch_size"]
    k = math.isqrt(p)
    assert k == inp["p"] and inp["training_mode"] and not inp["label_dropout"]
    assert torch.equal(inp["targets"], z)
    emb = model.tok_embeddings(z)
    assert_close(patchify_embeddings(emb, k), out["patch_embeddings"], tol, "patch embeddings")
    assert_close(patchify_targets(z, k), out["patch_targets"], tol, "patch targets")
    grid = model.config.grid_size
    rows = torch.cat([torch.zeros(1, dtype=torch.long), coarse_rope_rows(grid, k)])
    assert_close(model.freqs_cis[rows], out["freqs_cis"], tol, "coarse RoPE table")
    h, _ = model.patch_inputs(z, y, p)
    assert_close(h, out["block_input"], tol, "block input")
    # Through the strategy, at a stage of this patch size.
    npp = get_strategy("npp")
    npp.patch_size = p
    batch = npp.training_batch(z, y)
    logits, loss = model(**batch.inputs, targets=batch.targets)
    assert_close(logits, out["logits"], tol, "logits")
    assert_close(loss, out["loss"], tol, "loss")
    # The official return value repeats each row P times: (B * n, P, V) for P > 1.
    shape = [*logits.shape] if p == 1 else [logits.shape[0] * logits.shape[1], p, logits.shape[2]]
    assert shape == list(out["returned_logits_shape"])


def check_kv_cache(fx, inp, out, tol):
    model = build_fixture_model(fx).train()
    # A coarse-stage training forward first: it must leave nothing behind that sampling reads.
    p = inp["preceded_by_training_forward_patch_size"]
    model(torch.zeros(inp["idx"].shape[0], model.config.block_size, dtype=torch.long), inp["cond_idx"], p)
    model.eval()
    assert_close(kv_cached_logits(model, inp), out["logits"], tol, "kv-cached logits")


def check_generate(fx, inp, out, tol):
    model = build_fixture_model(fx).eval()
    assert inp["max_new_tokens"] == model.config.block_size and inp["sample_logits"]
    recorded: list[torch.Tensor] = []
    tokens = get_strategy("npp").generate(
        model, inp["cond"], cfg_scale=inp["cfg_scale"], cfg_interval=inp["cfg_interval"],
        temperature=inp["temperature"], top_k=inp["top_k"], top_p=inp["top_p"],
        generator=torch.Generator().manual_seed(3304), record_logits=recorded)
    assert_close(tokens, out["tokens"], tol, "tokens")
    assert_close(torch.stack(recorded, dim=1), out["step_logits"], tol, "step_logits")


def check_patch_schedule(inp, out, tol):
    schedule = patch_schedule(inp["patch_level"], inp["epochs"], inp["epoch_rate"])
    assert_close(torch.tensor(schedule.patch_sizes), out["patch_sizes"], tol, "patch sizes")
    assert_close(torch.tensor(schedule.epoch_ends), out["epoch_range"], tol, "epoch range")
    per_epoch = torch.tensor([schedule.patch_size_at(e) for e in range(inp["epochs"])])
    assert_close(per_epoch, out["patch_size_per_epoch"], tol, "patch size per epoch")
    assert_close(torch.tensor([math.isqrt(p) for p in per_epoch.tolist()]), out["p_per_epoch"], tol, "p per epoch")


def check_lr_scheduler(inp, out, tol):
    schedule = patch_schedule(inp["patch_level"], inp["epochs"], inp["epoch_rate"])
    assert_close(torch.tensor(schedule.epoch_ends), out["epoch_range"], tol, "epoch range")
    spe = inp["dataset_len"] // inp["global_batch_size"]
    assert spe == inp["steps_per_epoch"] and inp["total_steps"] == inp["epochs"] * spe and inp["scheduler"]
    lr_args = dict(warmup_epochs=inp["warmup_epochs"], decay_ratio=inp["decay_ratio"], base_lr=inp["lr"],
                   end_lr=inp["end_lr"])
    mult = torch.tensor([lr_multiplier(t, spe, schedule, **lr_args) for t in range(inp["total_steps"])],
                        dtype=torch.float64)
    assert_close(mult, out["lr_multiplier"], tol, "lr multiplier")
    # Through the strategy's driver hook: the learning rate each optimizer step runs with.
    npp = get_strategy("npp")
    side = math.isqrt(schedule.patch_sizes[0])  # the schedule is grid-free: any grid its patches tile
    npp.configure(argparse.Namespace(image_size=16 * side, downsample_size=16, patch_level=inp["patch_level"],
                                     epochs=inp["epochs"], epoch_rate=inp["epoch_rate"], scheduler=True,
                                     lr=inp["lr"], end_lr=inp["end_lr"], warmup_epochs=inp["warmup_epochs"],
                                     decay_ratio=inp["decay_ratio"]), training=True)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=inp["lr"])
    lrs = []
    for t in range(inp["total_steps"]):
        npp.on_step(t, spe, opt)
        lrs.append(opt.param_groups[0]["lr"])
    assert_close(torch.tensor(lrs, dtype=torch.float64), out["lr"], tol, "lr")


@pytest.mark.parametrize("path,case_name", fixture_cases("npp"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    tol, inp, out = fx["tolerance"], case["inputs"], case["outputs"]
    with torch.no_grad():
        if case_name.startswith("npp_train_forward_"):
            check_train_forward(fx, inp, out, tol)
        elif case_name == "kv_cache_prefill_decode":
            check_kv_cache(fx, inp, out, tol)
        elif case_name.startswith("generate_"):
            check_generate(fx, inp, out, tol)
        elif case_name.startswith("patch_schedule_"):
            check_patch_schedule(inp, out, tol)
        elif case_name.startswith("lr_scheduler_"):
            check_lr_scheduler(inp, out, tol)
        else:
            pytest.fail(f"unknown npp case {case_name!r}: add its check here")


@pytest.mark.parametrize("path", official_key_files("npp_c2i"))
def test_official_keys_accepted_exactly(path):
    spec = official_keys(path)
    cfg = spec["config"]
    size = {"c2i_B_256": "GPT-B", "c2i_L_256": "GPT-L", "c2i_XL_256": "GPT-XL", "c2i_XXL_256": "GPT-XXL"}
    with torch.device("meta"):
        model = get_strategy("npp").build_model(size[spec["release"]], vocab_size=cfg["vocab_size"],
                                                block_size=cfg["block_size"], num_classes=cfg["num_classes"],
                                                cls_token_num=cfg["cls_token_num"])
    ours_cfg = GPTConfig.from_official(cfg)
    for k in ("dim", "n_layer", "n_head", "multiple_of", "norm_eps", "rope_base", "class_dropout_prob"):
        assert getattr(model.config, k) == getattr(ours_cfg, k), k
    assert_official_keys_exact(model, spec, drop="norm.weight", extra="layers.99.attention.wqkv.weight",
                               reshape="output.weight")

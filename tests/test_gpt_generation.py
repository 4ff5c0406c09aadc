"""KV-cached generation equals full recompute; shared layers; the errors users can run into."""
from __future__ import annotations

import argparse

import pytest
import torch

from autoregressive.models.gpt import GPT_SIZES, Transformer, build_gpt, config_dict
from autoregressive.models.layers import apply_rotary_emb, precompute_freqs_cis_2d
from autoregressive.decoding.logits import cfg_guided, cfg_labels, combine_cfg, sample_from_logits
from autoregressive.strategies import get_strategy, strategy_names
from utils.checkpoint import CheckpointError, save_checkpoint

RASTER = get_strategy("raster")
TINY = dict(vocab_size=32, block_size=16, num_classes=5)  # 4x4 grid


def tiny_model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = build_gpt("GPT-debug", **{**TINY, **overrides})
    # The official init zeroes the head (uniform logits); make the predictions informative.
    with torch.no_grad():
        model.output.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(seed + 1))
    return model.eval()


def recompute_generate(model, labels, cfg_scale, cfg_interval, temperature, top_k, top_p, generator):
    """The reference loop: no cache, the whole prefix through `forward` for every token."""
    cond = cfg_labels(labels, model.num_classes, cfg_scale)
    reps = cond.shape[0] // labels.shape[0]
    tokens = torch.empty(labels.shape[0], 0, dtype=torch.long)
    step_logits = []
    for t in range(model.config.block_size):
        logits, _ = model(tokens.repeat(reps, 1), cond)  # (B', t + 1, V)
        guided = combine_cfg(logits[:, -1], cfg_scale, cfg_guided(t, cfg_interval))
        step_logits.append(guided)
        tok, _ = sample_from_logits(guided, temperature, top_k, top_p, generator)
        tokens = torch.cat([tokens, tok[:, None]], dim=1)
    return tokens, torch.stack(step_logits, dim=1)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("cfg_scale,cfg_interval", [(1.0, -1), (2.5, -1), (1.5, 2)])
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, 0, 1.0), (1.0, 0, 1.0), (1.2, 12, 0.9)])
def test_kv_cache_generation_equals_recompute(batch, cfg_scale, cfg_interval, temperature, top_k, top_p):
    model = tiny_model()
    labels = torch.arange(batch) % model.num_classes
    recorded: list[torch.Tensor] = []
    with torch.no_grad():
        tokens = RASTER.generate(model, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                                 temperature=temperature, top_k=top_k, top_p=top_p,
                                 generator=torch.Generator().manual_seed(7), record_logits=recorded)
        ref_tokens, ref_logits = recompute_generate(model, labels, cfg_scale, cfg_interval, temperature,
                                                    top_k, top_p, torch.Generator().manual_seed(7))
    assert tokens.shape == (batch, 16) and tokens.dtype == torch.long
    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(torch.stack(recorded, dim=1), ref_logits, atol=1e-4, rtol=1e-4)


def test_seeded_generation_is_deterministic_and_seed_dependent():
    model = tiny_model()
    labels = torch.tensor([0, 1, 2, 3])
    run = lambda seed: RASTER.generate(model, labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))


@pytest.mark.parametrize("n_kv_head", [None, 2])
def test_group_decode_step_equals_forward(n_kv_head):
    """Several new tokens per step at arbitrary cache slots (PAR / LPD-style groups), with and
    without grouped-query attention."""
    model = tiny_model(n_kv_head=n_kv_head)
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (2, 16), generator=g)
    labels = torch.tensor([1, 4])
    with torch.no_grad():
        full, _ = model(codes[:, :-1], labels)  # (2, 16, V)
        cache = model.new_cache(2)
        rows = [model.prefill(labels, cache)]
        for lo, hi in [(0, 5), (5, 6), (6, 15)]:  # z_lo..z_{hi-1} at slots lo+1..hi
            rows.append(model.decode_step(codes[:, lo:hi], cache, torch.arange(lo + 1, hi + 1)))
    torch.testing.assert_close(torch.cat(rows, dim=1), full, atol=1e-5, rtol=1e-5)


def test_row_sampler_and_explicit_generator():
    """A per-row sampler (the sampling driver's RowRNG protocol) is used as is; sampling without
    any generator is refused rather than drawing from the global RNG."""

    class FirstRow:  # draws the first allowed token of each row, counting calls
        calls = 0

        def multinomial(self, probs):
            FirstRow.calls += 1
            return (probs > 0).float().argmax(-1, keepdim=True)

    model = tiny_model()
    tokens = RASTER.generate(model, torch.tensor([0, 1]), top_k=3, generator=FirstRow())
    assert tokens.shape == (2, 16) and FirstRow.calls == 16
    with pytest.raises(ValueError, match="generator"):
        RASTER.generate(model, torch.tensor([0]))


def test_bf16_weights_keep_a_float32_rope_table():
    model = tiny_model().to(torch.bfloat16)
    assert model.tok_embeddings.weight.dtype == torch.bfloat16 and model.freqs_cis.dtype == torch.float32
    tokens = RASTER.generate(model, torch.tensor([0, 2]), cfg_scale=2.0, temperature=0.0)
    assert tokens.shape == (2, 16)
    assert "freqs_cis" not in model.state_dict()


def test_rope_table_and_per_sample_rows():
    table = precompute_freqs_cis_2d(4, 16, cls_token_num=1)
    assert table.shape == (17, 8, 2)
    assert torch.all(table[0] == 0)
    f = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))  # hd/4 = 4 frequencies
    r, c = 2, 3
    torch.testing.assert_close(table[1 + r * 4 + c, :, 0], torch.cos(torch.cat([r * f, c * f])))
    x = torch.randn(2, 5, 3, 16)
    rows = torch.tensor([0, 3, 7, 1, 16])
    shared = apply_rotary_emb(x, table[rows])
    per_sample = apply_rotary_emb(x, table[rows][None].expand(2, -1, -1, -1))
    torch.testing.assert_close(shared, per_sample)
    assert torch.all(shared[:, 0] == 0)  # the class token's q/k are zeroed (official quirk)


def test_training_step_backward():
    model = tiny_model(token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1, drop_path_rate=0.1).train()
    codes = torch.randint(0, 32, (4, 16))
    loss = RASTER.training_loss(model, codes, torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(loss) and model.tok_embeddings.weight.grad is not None
    batch = RASTER.training_batch(codes, torch.tensor([0, 1, 2, 3]))
    assert torch.equal(batch.inputs["idx"], codes[:, :-1]) and torch.equal(batch.targets, codes)


def test_every_official_size_is_registered():
    assert {"GPT-B", "GPT-L", "GPT-XL", "GPT-XXL", "GPT-XXXL", "GPT-1B", "GPT-3B", "GPT-7B", "GPT-debug"} <= set(GPT_SIZES)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_unknown_strategy_lists_known_ones():
    with pytest.raises(ValueError) as e:
        get_strategy("zigzag")
    assert "zigzag" in str(e.value) and all(n in str(e.value) for n in strategy_names())


def test_unknown_model_size_lists_known_ones():
    with pytest.raises(ValueError, match="GPT-B"):
        RASTER.build_model("GPT-Q", **TINY)


@pytest.mark.parametrize("cfg_scale", [0.5, 0.0, -2.0])
def test_cfg_scale_below_one_is_refused(cfg_scale):
    with pytest.raises(ValueError, match="cfg_scale"):
        RASTER.generate(tiny_model(), torch.tensor([0]), cfg_scale=cfg_scale)


@pytest.mark.parametrize("labels", [[5], [0, -1], [1000]])
def test_class_id_out_of_range_is_refused(labels):
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        RASTER.generate(tiny_model(), torch.tensor(labels), cfg_scale=2.0, temperature=0.0)


def test_other_bad_generate_calls():
    model = tiny_model()
    with pytest.raises(ValueError, match="steps"):
        RASTER.generate(model, torch.tensor([0]), steps=8, temperature=0.0)
    with pytest.raises(ValueError, match="eval"):
        RASTER.generate(model.train(), torch.tensor([0]), temperature=0.0)


# ---------------------------------------------------------------------------------------------
# Checkpoint loading
# ---------------------------------------------------------------------------------------------


def test_official_layouts_load_strictly(tmp_path):
    model = tiny_model(seed=5)
    sd = model.state_dict()
    labels = torch.tensor([0, 3])
    ref = RASTER.generate(model, labels, cfg_scale=2.0, temperature=0.0)
    layouts = {
        "ddp": {"model": sd, "optimizer": {}, "steps": 10},
        "bare_with_freqs": {**sd, "freqs_cis": model.freqs_cis},  # FSDP export with a stray table
        "official_args": {"model": sd, "args": argparse.Namespace(gpt_model="GPT-debug", image_size=64,
                                                                  downsample_size=16, **TINY)},
        "ours": {"model": sd, "args": {"strategy": "raster", "gpt_model": "GPT-debug", "image_size": 64,
                                       "downsample_size": 16, **TINY}, "gpt_config": config_dict(model)},
    }
    for name, ckpt in layouts.items():
        save_checkpoint(ckpt, tmp_path / f"{name}.pt")
        loaded = RASTER.load_model(tmp_path / f"{name}.pt", "GPT-debug", **TINY)
        assert not loaded.training
        assert torch.equal(RASTER.generate(loaded, labels, cfg_scale=2.0, temperature=0.0), ref), name
    # A checkpoint that records its size needs no --gpt-model.
    assert isinstance(RASTER.load_model(tmp_path / "ours.pt"), Transformer)


def test_ema_selectable(tmp_path):
    a, b = tiny_model(seed=1).state_dict(), tiny_model(seed=2).state_dict()
    save_checkpoint({"model": a, "ema": b}, tmp_path / "c.pt")
    key = "output.weight"
    assert torch.equal(RASTER.load_model(tmp_path / "c.pt", "GPT-debug", **TINY).state_dict()[key], a[key])
    assert torch.equal(RASTER.load_model(tmp_path / "c.pt", "GPT-debug", prefer_ema=True, **TINY)
                       .state_dict()[key], b[key])


def test_wrong_size_checkpoint_is_refused_naming_keys(tmp_path):
    save_checkpoint({"model": tiny_model().state_dict()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError) as e:  # fewer layers: the extra layers are unexpected
        RASTER.load_model(tmp_path / "c.pt", "GPT-debug", n_layer=2, **TINY)
    assert "layers.2.attention.wqkv.weight" in str(e.value) and "unexpected" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # more layers: missing keys
        RASTER.load_model(tmp_path / "c.pt", "GPT-debug", n_layer=5, **TINY)
    assert "layers.4.feed_forward.w1.weight" in str(e.value) and "missing" in str(e.value)
    with pytest.raises(CheckpointError) as e:  # another vocabulary: mis-shaped keys
        RASTER.load_model(tmp_path / "c.pt", "GPT-debug", **{**TINY, "vocab_size": 64})
    assert "tok_embeddings.weight" in str(e.value) and "output.weight" in str(e.value)


def test_recorded_args_must_agree(tmp_path):
    args = {"strategy": "par", "gpt_model": "GPT-debug", "image_size": 64, "downsample_size": 16, **TINY}
    save_checkpoint({"model": tiny_model().state_dict(), "args": args}, tmp_path / "par.pt")
    with pytest.raises(CheckpointError, match="strategy"):
        RASTER.load_model(tmp_path / "par.pt")
    save_checkpoint({"model": tiny_model().state_dict(), "args": {**args, "strategy": "raster"}}, tmp_path / "r.pt")
    with pytest.raises(CheckpointError, match="gpt_model"):
        RASTER.load_model(tmp_path / "r.pt", "GPT-B")
    with pytest.raises(CheckpointError, match="vocab_size"):
        RASTER.load_model(tmp_path / "r.pt", vocab_size=16384)
    with pytest.raises(CheckpointError, match="gpt-model"):
        save_checkpoint({"model": tiny_model().state_dict()}, tmp_path / "bare.pt")
        RASTER.load_model(tmp_path / "bare.pt")

"""Every model's attention stays on SDPA's fused kernels (issue 21, items 1-4 and 10).

1. Cache and bucket lengths (the key lengths of every decoding step) are multiples of 8, as the
   official FoundationVision/LlamaGen `setup_caches` rounds its cache; the masks hide the extra slots.
2. A head dim that is not a multiple of 8 (GPT-3B's 100) is zero-padded around SDPA, exactly.
3. One additive attention mask per decoding step, in the step's dtype with 8-aligned rows, shared by
   every layer (SDPA would otherwise convert and pad a boolean mask in every layer).
4. Every strategy hands float32 logits to the CFG combine and the sampler, under bf16 weights too.
10. `build_lpd`, like `build_gpt` and `build_arpg`, lets its keyword arguments override the size table.

All on CPU: the lengths, strides and dtypes SDPA receives are what a GPU would receive.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from autoregressive.decoding import group_decode
from autoregressive.decoding.fast_decode import StepRunner
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.models import arpg as arpg_model, gpt as gpt_model, kv_cache, layers
from autoregressive.models import lpd as lpd_model, var as var_model
from autoregressive.models.arpg import build_arpg
from autoregressive.models.gpt import build_gpt
from autoregressive.models.kv_cache import KVCache, visible_slots
from autoregressive.models.layers import attention, attention_bias
from autoregressive.models.lpd import build_lpd
from autoregressive.models.par import build_par
from autoregressive.strategies import get_strategy
from autoregressive.strategies.var import VarStrategy
from tests.test_fast_decode import METHODS, fixture_model, generate
from tokenizer.msvq import PATCH_NUMS, build_msvq

#: The modules that hold a name of `layers.attention_bias` (the spy replaces every one of them).
BIAS_USERS = (layers, gpt_model, arpg_model, lpd_model, var_model)


class RecordingRunner(StepRunner):
    """The eager runner, noting the length of every cache it hands out and every cache a step reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lengths: list[int] = []

    def cache(self, model, rows: int, max_len: int | None = None) -> KVCache:
        cache = super().cache(model, rows, max_len)
        self.lengths.append(cache.max_len)
        return cache

    def __call__(self, fn, *args):
        self.lengths.extend(a.max_len for a in args if isinstance(a, KVCache))
        return super().__call__(fn, *args)


class SdpaCalls:
    """Every `F.scaled_dot_product_attention` call's key length, head dim and mask."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        original = F.scaled_dot_product_attention

        def spy(q, k, v, attn_mask=None, **kw):
            self.calls.append(dict(keys=k.shape[-2], head_dim=q.shape[-1], q_dtype=q.dtype, mask=attn_mask))
            return original(q, k, v, attn_mask=attn_mask, **kw)

        monkeypatch.setattr(F, "scaled_dot_product_attention", spy)

    def check_aligned(self, what: str) -> None:
        assert self.calls, f"{what}: no attention call seen"
        for c in self.calls:
            assert c["keys"] % 8 == 0, f"{what}: SDPA over {c['keys']} keys"
            assert c["head_dim"] % 8 == 0, f"{what}: SDPA with head dim {c['head_dim']}"
            m = c["mask"]
            if m is not None:
                assert m.dtype == c["q_dtype"], f"{what}: a {m.dtype} mask for {c['q_dtype']} queries"
                assert all(s % 8 == 0 for s in m.stride()[:-1]) and m.stride(-1) == 1, \
                    f"{what}: mask strides {m.stride()} (rows must be 8-aligned)"


def set_align(monkeypatch, n: int) -> None:
    """Every alignment at `n` (1 = the unaligned lengths, head dims and mask rows of before)."""
    monkeypatch.setattr(kv_cache, "SDPA_ALIGN", n)
    monkeypatch.setattr(layers, "SDPA_ALIGN", n)


# ---------------------------------------------------------------------------------------------
# 1. Key lengths
# ---------------------------------------------------------------------------------------------


def test_every_cache_and_bucket_length_is_a_multiple_of_8():
    for max_len in list(range(1, 300)) + [680, 1024, 2240]:
        cache = KVCache(1, 1, 1, max_len, 1, dtype=torch.float32, device="cpu")
        assert cache.max_len % 8 == 0 and max_len <= cache.max_len < max_len + 8
        seen = {cache.upto(w).max_len for w in range(1, cache.max_len + 1)}
        assert all(n % 8 == 0 for n in seen) and len(seen) <= 9, (max_len, sorted(seen))
        assert all(visible_slots(w, cache.max_len) >= w for w in range(1, cache.max_len + 1))
    # ARPG at 64 steps (229 slots) and LPD (257) at 256 px, the lengths of the issue:
    assert KVCache(1, 1, 1, 229, 1, dtype=torch.float32, device="cpu").max_len == 232
    assert KVCache(1, 1, 1, 257, 1, dtype=torch.float32, device="cpu").max_len == 264


def tiny(strategy: str, block_size: int, **over):
    """A one-layer model of `strategy` for a released grid (a cache's length depends on the grid and
    the schedule only, not on the model's width or depth)."""
    torch.manual_seed(0)
    common = dict(vocab_size=32, num_classes=4, block_size=block_size)
    if strategy in ("raster", "npp"):
        return build_gpt("GPT-debug", dim=32, n_head=2, n_layer=1, **common).eval()
    if strategy == "par":
        return build_par("GPT-debug", dim=32, n_head=2, n_layer=1, **common, **over).eval()
    if strategy == "arpg":
        return build_arpg("ARPG-debug", dim=32, n_head=2, n_layer=2, **common).eval()
    return build_lpd("LPD-debug", dim=32, n_head=2, n_layer=1, **common).eval()


#: (strategy, tokens of the released grids (256 px: 16 x 16, 384 px: 24 x 24, 512 px: 32 x 32),
#: the model's extra config, the strategy's step counts (None: its default)).
RELEASED = [
    ("raster", 256, {}, [None]), ("raster", 576, {}, [None]),
    ("npp", 256, {}, [None]),
    ("par", 256, dict(ar_token_num=4, spe_token_num=3), [None]),
    ("par", 576, dict(ar_token_num=4, spe_token_num=3), [None]),
    ("par", 576, dict(ar_token_num=16, spe_token_num=15), [None]),
    ("arpg", 256, {}, [64, 32]),
    ("lpd", 256, {}, [20, 32]), ("lpd", 1024, {}, [48]),
]


@pytest.mark.parametrize("method,tokens,over,steps", RELEASED,
                         ids=[f"{m}-{n}-{o.get('ar_token_num', '')}" for m, n, o, _ in RELEASED])
def test_released_grids_decode_over_8_aligned_keys(method, tokens, over, steps, monkeypatch):
    strategy = get_strategy(method)
    if method == "par":
        strategy.ar_token_num, strategy.spe_token_num = over["ar_token_num"], over["spe_token_num"]
    model = tiny(method, tokens, **over)
    runner = strategy.runner = RecordingRunner()
    sdpa = SdpaCalls(monkeypatch)
    for s in steps:
        kw = {} if s is None else dict(steps=s)
        strategy.generate(model, torch.tensor([1]), cfg_scale=2.0, temperature=0.0,
                          generator=torch.Generator().manual_seed(0), **kw)
    assert runner.lengths and all(n % 8 == 0 for n in runner.lengths), sorted(set(runner.lengths))
    sdpa.check_aligned(f"{method} at {tokens} tokens")


@pytest.mark.parametrize("pn", ["256", "512"])
def test_var_released_scales_decode_over_8_aligned_keys(pn, monkeypatch):
    torch.manual_seed(0)
    pns = PATCH_NUMS[pn]
    strategy = VarStrategy()
    strategy.use_tokenizer(build_msvq(vocab_size=16, z_channels=4, ch=8, norm_num_groups=4, v_patch_nums=pns).eval())
    model = var_model.build_var(depth=1, embed_dim=32, num_heads=2, patch_nums=pns, num_classes=4,
                                vocab_size=16, Cvae=4).eval()
    runner = strategy.runner = RecordingRunner()
    sdpa = SdpaCalls(monkeypatch)
    strategy.generate(model, torch.tensor([1]), cfg_scale=2.0, temperature=0.0)
    assert all(n % 8 == 0 for n in runner.lengths), sorted(set(runner.lengths))
    sdpa.check_aligned(f"var at patch_nums {pn}")


@pytest.mark.parametrize("method", METHODS)
def test_aligned_lengths_give_the_unaligned_tokens(method, monkeypatch):
    """The golden fixtures' models (grids 4 x 4 to 8 x 8, unaligned caches of 37 or 66 slots, say)
    sample the same tokens with every alignment off (the lengths of before) and on."""
    strategy, model, num_classes = fixture_model(method)
    got = {}
    for align in (1, 8):
        set_align(monkeypatch, align)
        strategy.runner = runner = RecordingRunner()
        got[align] = [generate(strategy, model, num_classes, 3, greedy, i) for i, greedy in enumerate((True, False))]
        if align == 1:
            assert any(n % 8 for n in runner.lengths) or method in ("raster", "npp")  # the fixtures do test it
        else:
            assert all(n % 8 == 0 for n in runner.lengths)
    for a, b in zip(got[1], got[8]):
        assert torch.equal(a, b), f"{method}: the 8-aligned lengths change the tokens"


# ---------------------------------------------------------------------------------------------
# 2. Head dims
# ---------------------------------------------------------------------------------------------


def test_attention_pads_an_unaligned_head_dim_exactly(monkeypatch):
    """Zero-padded q, k, v with the unpadded head dim's scale: the same dot products, so the same
    output as unpadded SDPA (float32, 1e-6), for the default scale and an explicit one (VAR's)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 100, generator=g) for n in (5, 24, 24))
    mask = torch.rand(5, 24, generator=g) > 0.3
    mask[:, 0] = True
    want = {scale: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale) for scale in (None, 0.3)}
    sdpa = SdpaCalls(monkeypatch)
    for scale in (None, 0.3):
        got = attention(q, k, v, attention_bias(mask, q.dtype), scale=scale)
        assert got.shape == (2, 3, 5, 100)
        torch.testing.assert_close(got, want[scale], rtol=0, atol=1e-6)
    assert [c["head_dim"] for c in sdpa.calls] == [104, 104]


def test_head_dim_100_gives_the_unpadded_logits(monkeypatch):
    """A tiny GPT with GPT-3B's head dim 100: teacher-forced and KV-cached logits are the same with
    the padding on and off (float32, 1e-6), and SDPA only ever sees head dim 104."""
    torch.manual_seed(0)
    model = build_gpt("GPT-debug", dim=200, n_head=2, n_layer=2, vocab_size=64, block_size=16, num_classes=10)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the official init zeroes the head
    model.eval()
    idx = torch.randint(0, 64, (2, 15))
    cond = torch.tensor([1, 7])

    def logits() -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            full, _ = model(idx, cond)
            cache = model.new_cache(2)
            steps = [model.prefill(cond, cache)]
            for t in range(15):
                steps.append(model.decode_step(idx[:, t:t + 1], cache, torch.tensor([t + 1])))
        return full, torch.cat(steps, dim=1)

    sdpa = SdpaCalls(monkeypatch)
    padded = logits()
    assert {c["head_dim"] for c in sdpa.calls} == {104}
    set_align(monkeypatch, 1)
    plain = logits()
    for a, b in zip(padded, plain):
        assert a.abs().max() > 0.05  # informative logits
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    torch.testing.assert_close(padded[0], padded[1], rtol=0, atol=1e-5)  # and the cache is the recompute


# ---------------------------------------------------------------------------------------------
# 3. One additive mask per step
# ---------------------------------------------------------------------------------------------


def test_attention_bias_is_additive_with_8_aligned_rows():
    mask = torch.tensor([[True, False, True], [False, False, False]])
    bias = attention_bias(mask, torch.bfloat16, width=13)
    assert bias.shape == (2, 13) and bias.dtype == torch.bfloat16 and bias.stride() == (16, 1)
    inf = float("-inf")
    assert bias[0, :3].tolist() == [0.0, inf, 0.0] and (bias[:, 3:] == inf).all() and (bias[1] == inf).all()
    assert torch.equal(attention_bias(bias[:, :3].float(), torch.bfloat16), bias[:, :3])  # additive in, same out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fully_masked_row_gives_zeros_not_nan(dtype):
    """As SDPA does for a boolean mask (which it turns into this additive one): no decoding mask has
    such a row (every element sees at least the class slot), but none may poison a step."""
    q, k, v = (torch.randn(1, 2, n, 16, dtype=dtype) for n in (3, 8, 8))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1] = False
    out = attention(q, k, v, attention_bias(mask, dtype))
    assert not out.isnan().any() and (out[:, :, 1] == 0).all()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_one_mask_per_step_shared_by_every_layer(method, dtype, monkeypatch):
    """Every step builds one mask (a spy on `attention_bias` everywhere it is imported), in the
    dtype of the step's queries, and every layer's SDPA call reads an additive mask of that dtype."""
    strategy, model, num_classes = fixture_model(method)
    model = model.to(dtype)
    built = []
    original = layers.attention_bias

    def spy(mask, dtype, width=None):
        built.append(dtype)
        return original(mask, dtype, width)

    for module in BIAS_USERS:
        if hasattr(module, "attention_bias"):
            monkeypatch.setattr(module, "attention_bias", spy)
    sdpa = SdpaCalls(monkeypatch)
    runner = strategy.runner = StepRunner()
    generate(strategy, model, num_classes, 2, False, 0)
    assert runner.steps_run > 0 and len(built) == runner.steps_run, \
        f"{method}: {len(built)} masks built or converted for {runner.steps_run} steps"
    assert len(sdpa.calls) > runner.steps_run  # several layers read each step's mask
    assert set(built) == {dtype}
    assert all(c["mask"] is not None and c["mask"].dtype == c["q_dtype"] == dtype for c in sdpa.calls)


# ---------------------------------------------------------------------------------------------
# 4. float32 logits before CFG
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_cfg_and_sampling_get_float32_logits_under_bf16_weights(method, monkeypatch):
    strategy, model, num_classes = fixture_model(method)
    model = model.to(torch.bfloat16)
    seen: list[tuple[str, torch.dtype]] = []
    combine, sample = group_decode.combine_cfg, group_decode.sample_from_logits

    def combine_spy(logits, *a, **kw):
        seen.append(("combine_cfg", logits.dtype))
        return combine(logits, *a, **kw)

    def sample_spy(logits, *a, **kw):
        seen.append(("sample_from_logits", logits.dtype))
        return sample(logits, *a, **kw)

    monkeypatch.setattr(group_decode, "combine_cfg", combine_spy)
    monkeypatch.setattr(group_decode, "sample_from_logits", sample_spy)
    labels = torch.tensor([1, 2]) % num_classes
    strategy.generate(model, labels, cfg_scale=2.0, temperature=1.0, generator=RowRNG(torch.tensor([3, 4])))
    assert {name for name, _ in seen} == {"combine_cfg", "sample_from_logits"}
    assert all(dtype == torch.float32 for _, dtype in seen), f"{method}: {sorted(set(seen))}"


# ---------------------------------------------------------------------------------------------
# 10. Builders: keyword arguments override the size table
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("build,name", [(build_gpt, "GPT-debug"), (build_arpg, "ARPG-debug"),
                                        (build_lpd, "LPD-debug")])
def test_builders_let_keyword_arguments_override_the_size(build, name):
    model = build(name, dim=64, n_layer=2, n_head=2, vocab_size=32, block_size=16, num_classes=4)
    c = model.config
    assert (c.dim, c.n_layer, c.n_head) == (64, 2, 2)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in build(
        name, vocab_size=32, block_size=16, num_classes=4).parameters())

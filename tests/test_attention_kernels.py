"""The attention kernel report: PyTorch's own choice for each real attention call, logged at the start of
training and on the first sampling batch (eager and fast paths), with a warning for math on CUDA."""
from __future__ import annotations

import logging
import torch
import torch.nn.functional as F

from autoregressive.decoding.fast_decode import GraphedSteps, StepRunner
from autoregressive.sample import common
from autoregressive.strategies import parse_driver_args
from tests.test_fast_path_fallback import MODELS
from tests.test_sample_ddp import ckpts  # noqa: F401  (the tiny raster GPT and VQ checkpoints)
from tests.test_train_c2i import train_cmd, run, write_codes
from utils.attention_kernels import AttentionCall, AttentionKernels, record_attention_kernels, recording


def test_records_pytorchs_choice_for_each_kind_of_call():
    q = torch.randn(2, 4, 8, 64)
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    original = F.scaled_dot_product_attention
    with record_attention_kernels() as kernels:
        assert recording()
        want = original(q, q, q, attn_mask=mask)
        assert torch.equal(F.scaled_dot_product_attention(q, q, q, attn_mask=mask), want)  # passed on unchanged
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
        F.scaled_dot_product_attention(q[..., :20], q[..., :20], q[..., :20], attn_mask=torch.zeros(8, 8))
    assert not recording() and F.scaled_dot_product_attention is original
    expect = torch._fused_sdp_choice(q, q, q, None, 0.0, True)  # what PyTorch itself would run
    name = {0: "math", 1: "flash", 2: "memory-efficient"}[int(expect)]
    calls = {(c.head_dim, c.mask): (c.kernel, n) for c, n in kernels.calls.items()}
    assert calls[(64, "causal")] == (name, 2) and calls[(64, "bool mask")][1] == 1
    assert calls[(20, "additive mask")][1] == 1
    assert all(c.device == "cpu" and c.dtype == "float32" for c in kernels.calls)
    assert kernels.summary().startswith(f"{name} (head dim 64, float32, causal, cpu) x2")
    assert kernels.math_on_cuda == []


def test_math_on_cuda_is_warned_about(caplog):
    kernels = AttentionKernels()
    kernels.calls[AttentionCall("cuda", "bfloat16", 100, "bool mask", "math")] += 24
    kernels.calls[AttentionCall("cuda", "bfloat16", 64, "causal", "flash")] += 24
    with caplog.at_level(logging.INFO):
        kernels.log(logging.getLogger("t"), "training forward")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "math attention kernel runs on CUDA (math (head dim 100, bfloat16" in warnings[0]


def test_training_logs_the_kernels_and_peak_memory(tmp_path):
    codes = write_codes(tmp_path / "codes")
    res = run(train_cmd(codes, tmp_path / "results", "--max-steps", "1", "--log-every", "1"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "attention kernels of the training forward: " in res.stderr
    line = next(x for x in res.stderr.splitlines() if "attention kernels of the training forward" in x)
    assert "(head dim 32, float32, causal, cpu) x" in line  # GPT-debug: causal self-attention, head dim 32
    step_line = next(x for x in res.stderr.splitlines() if "(step=0000001)" in x)
    assert "train/peak_mem_gib" in step_line


def test_sampling_reports_the_kernels_on_the_eager_and_the_fast_path(ckpts, tmp_path, monkeypatch, capsys):  # noqa: F811
    from autoregressive.sample import sample_c2i

    def grid(runner, name):
        monkeypatch.setattr(common, "make_runner", lambda path, device: runner)
        argv = ["--gpt-ckpt", str(ckpts / "gpt.pt"), "--vq-ckpt", str(ckpts / "vq.pt"), *MODELS, "--classes", "1",
                "2", "--cfg-scale", "1.5", "--out", str(tmp_path / name)]
        sample_c2i.main(*parse_driver_args(sample_c2i.build_parser(), argv))
        out = capsys.readouterr().out
        return next(x for x in out.splitlines() if x.startswith("attention kernels: ")), out

    eager, out = grid(StepRunner(), "eager.png")
    assert "peak RSS" in out
    fast, _ = grid(GraphedSteps(compile=True, emulate=True, compile_backend="eager"), "fast.png")
    gpt_calls = "(head dim 32, float32, additive mask, cpu) x"  # the tiny raster GPT's decoding steps (one mask per step)
    assert gpt_calls in eager
    # The compiled steps are traced and replayed unrecorded; one eager call per step function before
    # its capture shows their kernels all the same.
    assert gpt_calls in fast
    assert F.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"

"""`--decode-path auto` cannot strand a run, and `--verify-fast-path` catches a fast path that lies.

The fast path is the emulated graph runner (`GraphedSteps(emulate=True)`, see
`tests/test_fast_decode.py`) wrapped as `auto` wraps the compiled path on CUDA (`FallbackRunner`);
failures are injected into its capture, its compilation and its replay. A batch whose fast path
fails is decoded again eagerly and gives the eager tokens; an explicit fast path raises; a replay
that gives other logits is refused by `--verify-fast-path`.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive.decoding import fast_decode
from autoregressive.decoding.fast_decode import (FallbackRunner, FastPathFallback, FastPathMismatch, GraphedSteps,
                                                 StepRunner, make_runner)
from autoregressive.sample import common
from autoregressive.strategies import parse_driver_args
from tests.test_fast_decode import fixture_model, generate
from tests.test_sample_ddp import ckpts  # noqa: F401  (the tiny raster GPT and VQ checkpoints)
from utils.cli import USER_ERRORS

# (batch size, greedy?) per call: a repeated shape, then a new one
CALLS = [(3, False), (3, True), (2, False)]


def fast_runner(**kw) -> FallbackRunner:
    return FallbackRunner(GraphedSteps(emulate=True, **kw))


def warnings_of(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == fast_decode.__name__ and r.levelno == logging.WARNING]


def run_calls(strategy, model, num_classes: int, runner: StepRunner, calls=CALLS) -> list[torch.Tensor]:
    strategy.runner = runner
    return [runner.run(lambda: generate(strategy, model, num_classes, b, greedy, i))
            for i, (b, greedy) in enumerate(calls)]


def eager_calls(method: str = "raster", calls=CALLS):
    strategy, model, num_classes = fixture_model(method)
    return [generate(strategy, model, num_classes, b, greedy, i) for i, (b, greedy) in enumerate(calls)]


def test_auto_wraps_the_compiled_path_on_cuda_and_explicit_paths_are_bare():
    assert type(make_runner("auto", "cuda")) is FallbackRunner and make_runner("auto", "cuda").name == "compiled"
    assert type(make_runner("compiled", "cuda")) is GraphedSteps
    assert type(make_runner("cuda-graphs", "cuda")) is GraphedSteps
    assert type(make_runner("auto", "cpu")) is StepRunner


def test_a_healthy_fast_path_never_falls_back(caplog):
    strategy, model, num_classes = fixture_model("raster")
    runner = fast_runner()
    for got, want in zip(run_calls(strategy, model, num_classes, runner), eager_calls()):
        assert torch.equal(got, want)
    assert runner.fallback is None and runner.captures > 0 and runner.name == "cuda-graphs (emulated)"
    assert not warnings_of(caplog)


@pytest.mark.parametrize("method", ["raster", "lpd"])
def test_capture_failure_falls_back_once_and_gives_the_eager_tokens(method, monkeypatch, caplog):
    strategy, model, num_classes = fixture_model(method)
    want = eager_calls(method)

    def broken_capture(self, fn, args):
        raise RuntimeError("injected capture failure\nsecond line of the message")

    monkeypatch.setattr(GraphedSteps, "_capture", broken_capture)
    runner = fast_runner()
    got = run_calls(strategy, model, num_classes, runner)
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"{method}: call {i} differs from eager"
    [warning] = warnings_of(caplog)  # once, for the whole run
    assert "RuntimeError: injected capture failure" in warning.getMessage()
    assert "--decode-path eager" in warning.getMessage()
    error = "RuntimeError: injected capture failure second line of the message"
    assert runner.fallback == FastPathFallback(error, batches=len(CALLS))
    assert str(runner.fallback) == f"fast path fell back to eager: 3 batch(es), first error: {error}"
    assert runner.name.startswith("eager") and runner.fast._steps == {}  # freed, and not retried


def test_replay_failure_in_the_middle_of_a_batch_decodes_it_again_from_its_seeds(monkeypatch, caplog):
    """The failure comes after some tokens were drawn from the per-image streams: the rerun
    restarts them, so a sampled (not greedy) batch still gets the eager tokens."""
    strategy, model, num_classes = fixture_model("raster")
    calls = [(3, False), (3, False)]
    want = eager_calls(calls=calls)
    replay = fast_decode._CapturedStep.replay
    replays = []

    def failing_replay(self, args):
        replays.append(1)
        if len(replays) == 7:
            raise torch.cuda.OutOfMemoryError("injected replay failure")
        return replay(self, args)

    monkeypatch.setattr(fast_decode._CapturedStep, "replay", failing_replay)
    runner = fast_runner()
    for g, w in zip(run_calls(strategy, model, num_classes, runner, calls), want):
        assert torch.equal(g, w)
    assert len(replays) == 7  # nothing replayed after the failure
    assert runner.fallback.batches == 2 and runner.fallback.first_error.startswith("OutOfMemoryError: injected")
    assert len(warnings_of(caplog)) == 1


def test_compile_failure_falls_back(caplog):
    """A `torch.compile` backend that fails: the error surfaces from the first call of the
    compiled step, inside the capture."""
    def broken_backend(gm, example_inputs):
        raise RuntimeError("injected compile failure")

    torch._dynamo.reset()
    strategy, model, num_classes = fixture_model("raster")
    runner = fast_runner(compile=True, compile_backend=broken_backend)
    try:
        for g, w in zip(run_calls(strategy, model, num_classes, runner, CALLS[:2]), eager_calls(calls=CALLS[:2])):
            assert torch.equal(g, w)
    finally:
        torch._dynamo.reset()
    assert runner.fallback.batches == 2 and "injected compile failure" in runner.fallback.first_error
    assert len(warnings_of(caplog)) == 1


def test_an_explicit_fast_path_fails_loudly(monkeypatch):
    strategy, model, num_classes = fixture_model("raster")

    def broken_capture(self, fn, args):
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(GraphedSteps, "_capture", broken_capture)
    strategy.runner = runner = GraphedSteps(emulate=True)  # what --decode-path compiled|cuda-graphs gets
    with pytest.raises(RuntimeError, match="injected capture failure"):
        runner.run(lambda: generate(strategy, model, num_classes, 2, True, 0))
    assert runner.fallback is None


def test_an_error_the_fast_path_did_not_raise_propagates(caplog):
    strategy, model, num_classes = fixture_model("raster")
    runner = fast_runner()
    strategy.runner = runner

    def bad_batch():
        return strategy.generate(model, torch.tensor([1, 2]), cfg_scale=0.5)  # refused before any step

    with pytest.raises(ValueError):
        runner.run(bad_batch)
    assert runner.fallback is None and not warnings_of(caplog)
    assert torch.equal(runner.run(lambda: generate(strategy, model, num_classes, 2, True, 0)),
                       eager_calls(calls=[(2, True)])[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a real CUDA graph capture needs a GPU; none is present")
def test_gpu_failed_capture_leaves_cuda_usable_for_the_eager_loop(monkeypatch, caplog):
    """A real capture that fails inside `torch.cuda.graph` (a host synchronisation while the stream
    is capturing): the eager loop then runs on the same device and gives the eager tokens."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    strategy, model, num_classes = fixture_model("raster")
    model = model.cuda()
    want = [generate(strategy, model, num_classes, b, greedy, i) for i, (b, greedy) in enumerate(CALLS)]
    capture = GraphedSteps._capture

    def syncing_capture(self, fn, args):
        def syncing(*a):
            next(x for x in a if isinstance(x, torch.Tensor)).sum().item()  # fails while capturing
            return fn(*a)

        return capture(self, syncing, args)

    monkeypatch.setattr(GraphedSteps, "_capture", syncing_capture)
    runner = FallbackRunner(GraphedSteps())
    for g, w in zip(run_calls(strategy, model, num_classes, runner), want):
        assert torch.equal(g, w)
    assert runner.fallback.batches == len(CALLS) and len(warnings_of(caplog)) == 1


def test_fallbacks_of_several_ranks_merge():
    assert FastPathFallback.merge([None, None]) is None
    merged = FastPathFallback.merge([None, FastPathFallback("A: x", 3), FastPathFallback("B: y", 2)])
    assert merged == FastPathFallback("A: x", 5, ranks=2)
    assert str(merged) == "fast path fell back to eager on 2 ranks: 5 batch(es), first error: A: x"
    assert fast_decode.describe_error(ValueError()) == "ValueError"
    assert len(fast_decode.describe_error(RuntimeError("x" * 1000))) == 300


# ---------------------------------------------------------------------------------------------
# The sampling drivers, in process, with the emulated fast path standing in for `auto` on CUDA
# ---------------------------------------------------------------------------------------------


def emulate_auto(monkeypatch) -> None:
    """`make_runner` as on CUDA: `auto` -> the (emulated) fast path with the fallback, the
    explicit fast paths -> the bare (emulated) runner."""
    def fake(path: str, device) -> StepRunner:
        if path == "auto":
            return fast_runner()
        return StepRunner() if path == "eager" else GraphedSteps(emulate=True)

    monkeypatch.setattr(common, "make_runner", fake)


def break_capture(monkeypatch) -> None:
    def broken_capture(self, fn, args):
        raise RuntimeError("injected capture failure")

    monkeypatch.setattr(GraphedSteps, "_capture", broken_capture)


def corrupt_replay(monkeypatch) -> None:
    """A replay that gives other logits (every step's argmax moves to the next token id)."""
    replay = fast_decode._CapturedStep.replay

    def wrong_replay(self, args):
        return replay(self, args).roll(1, dims=-1)

    monkeypatch.setattr(fast_decode._CapturedStep, "replay", wrong_replay)


MODELS = ["--vq-model", "VQ-debug", "--codebook-size", "64", "--image-size", "16", "--downsample-size", "4",
          "--num-classes", "10", "--top-k", "0", "--device", "cpu"]


def grid_run(ckpts, out, *extra: str):
    from autoregressive.sample import sample_c2i

    argv = ["--gpt-ckpt", str(ckpts / "gpt.pt"), "--vq-ckpt", str(ckpts / "vq.pt"), *MODELS, "--classes", "1", "2",
            "3", "--per-class", "2", "--cfg-scale", "1.5", "--out", str(out), *extra]
    path = sample_c2i.main(*parse_driver_args(sample_c2i.build_parser(), argv))
    return np.asarray(Image.open(path))


# The reference images come from a healthy fast path (the eager tokens: `tests/test_fast_decode.py`):
# a run that starts on a fast path keeps its tokenizer in channels_last, which on CPU rounds a few
# pixels differently from the eager run's layout, whatever path the tokens then come from.


def test_sample_c2i_goes_on_eagerly_and_reports_the_fallback(ckpts, tmp_path, monkeypatch, capsys, caplog):  # noqa: F811
    emulate_auto(monkeypatch)
    want = grid_run(ckpts, tmp_path / "healthy.png")
    break_capture(monkeypatch)
    got = grid_run(ckpts, tmp_path / "auto.png")
    assert np.array_equal(got, want)
    out = capsys.readouterr().out
    assert "decode path eager (fell back from cuda-graphs (emulated)" in out
    assert "fast path fell back to eager: 1 batch(es), first error: RuntimeError: injected capture failure" in out
    assert len(warnings_of(caplog)) == 1
    with pytest.raises(RuntimeError, match="injected capture failure"):
        grid_run(ckpts, tmp_path / "explicit.png", "--decode-path", "cuda-graphs")


def test_verify_fast_path_passes_and_refuses(ckpts, tmp_path, monkeypatch, capsys):  # noqa: F811
    grid_run(ckpts, tmp_path / "eager.png", "--decode-path", "eager", "--verify-fast-path")
    assert "decode path is eager" in capsys.readouterr().out  # nothing to compare: said, and on it goes
    emulate_auto(monkeypatch)
    want = grid_run(ckpts, tmp_path / "unverified.png")
    assert np.array_equal(grid_run(ckpts, tmp_path / "auto.png", "--verify-fast-path"), want)
    assert "fast path verified on the first batch: tokens identical" in capsys.readouterr().out
    corrupt_replay(monkeypatch)
    with pytest.raises(FastPathMismatch, match=r"greedy tokens differ\); rerun with --decode-path eager") as e:
        grid_run(ckpts, tmp_path / "wrong.png", "--verify-fast-path")
    assert isinstance(e.value, USER_ERRORS)  # the drivers' one `error:` line, exit status 2
    assert not (tmp_path / "wrong.png").exists()
    assert "of 96 greedy tokens differ" in str(e.value)  # 6 images x 16 tokens
    grid_run(ckpts, tmp_path / "corrupt.png")  # without the flag the run does not compare


def test_verify_fast_path_after_a_failed_fast_path_goes_on_eagerly(ckpts, tmp_path, monkeypatch, capsys):  # noqa: F811
    emulate_auto(monkeypatch)
    want = grid_run(ckpts, tmp_path / "healthy.png")
    break_capture(monkeypatch)
    assert np.array_equal(grid_run(ckpts, tmp_path / "auto.png", "--verify-fast-path"), want)
    out = capsys.readouterr().out
    assert "nothing to compare" in out and "1 batch(es)" in out  # the verification's decode is not counted


def test_ddp_sampler_goes_on_eagerly_and_records_the_fallback(ckpts, tmp_path, monkeypatch, caplog):  # noqa: F811
    from autoregressive.sample import sample_c2i_ddp

    def sample(folder, *extra):
        argv = ["--gpt-ckpt", str(ckpts / "gpt.pt"), "--vq-ckpt", str(ckpts / "vq.pt"), *MODELS,
                "--image-size-eval", "16", "--cfg-scale", "2.0", "--num-fid-samples", "10",
                "--per-proc-batch-size", "4", "--sample-dir", str(tmp_path / folder), *extra]
        return sample_c2i_ddp.main(*parse_driver_args(sample_c2i_ddp.build_parser(), argv))

    emulate_auto(monkeypatch)
    healthy = sample("healthy")
    assert json.loads(healthy.with_suffix(".json").read_text())["fast_path_fallback"] is None
    break_capture(monkeypatch)
    auto = sample("auto", "--verify-fast-path")
    with np.load(healthy) as a, np.load(auto) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    record = json.loads(auto.with_suffix(".json").read_text())["fast_path_fallback"]
    assert record == {"first_error": "RuntimeError: injected capture failure", "batches": 3, "ranks": 1}
    assert "fast path fell back to eager: 3 batch(es)" in (auto.parent / auto.stem / "log.txt").read_text()
    assert len(warnings_of(caplog)) == 1
    assert sample("auto") == auto  # --verify-fast-path does not change the images: the folder resumes


def test_edit_verifies_and_falls_back(tmp_path, monkeypatch, capsys):
    """`edit.py` (LPD): `--verify-fast-path` compares its greedy edit; a failing fast path falls back."""
    from autoregressive.models.lpd import build_lpd
    from autoregressive.sample import edit
    from tests.extract_helpers import make_vq_ckpt
    from utils.checkpoint import save_checkpoint

    vq = make_vq_ckpt(tmp_path / "vq.pt")  # VQ-debug, 64 codes, downsampling 4: 32 px -> 8 x 8 tokens
    torch.manual_seed(0)
    gpt = save_checkpoint({"model": build_lpd("LPD-debug", vocab_size=64, block_size=64, num_classes=10).state_dict(),
                           "args": {"strategy": "lpd", "gpt_model": "LPD-debug"}}, tmp_path / "lpd.pt")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "in.png")

    def run(out: str, *extra: str) -> np.ndarray:
        argv = ["--strategy", "lpd", "--gpt-ckpt", str(gpt), "--vq-model", "VQ-debug", "--vq-ckpt", str(vq),
                "--codebook-size", "64", "--image-size", "32", "--downsample-size", "4", "--num-classes", "10",
                "--image", str(tmp_path / "in.png"), "--class-id", "3", "--num-samples", "2", "--device", "cpu",
                "--box", "8,8,20,24", "--out", str(tmp_path / out), *extra]
        return np.asarray(Image.open(edit.main(*parse_driver_args(edit.build_parser(), argv))))

    emulate_auto(monkeypatch)
    want = run("healthy.png", "--verify-fast-path")
    assert "fast path verified on the first batch: tokens identical" in capsys.readouterr().out
    break_capture(monkeypatch)
    assert np.array_equal(run("fallback.png", "--verify-fast-path"), want)
    assert "fast path fell back to eager: 1 batch(es)" in capsys.readouterr().out

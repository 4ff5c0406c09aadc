"""The fast decoding path (`autoregressive/decoding/fast_decode.py`) gives the eager path's tokens.

On CPU the graph runner is emulated: a step is "captured" once per shape and every later call
re-runs the function captured first on its static input buffers, which is what a replayed CUDA
graph does with addresses. So a step that read a per-call tensor outside its arguments, a cache
that leaked a previous batch, or a logits buffer consumed after the next step would change the
tokens here as they would on a GPU. The same checks run with real CUDA graphs and with
`torch.compile` when a GPU is present, and on CPU the compiled steps are traced with the `eager`
backend and `fullgraph=True`, which fails on any graph break.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil

import pytest
import torch

from autoregressive.decoding.fast_decode import GraphedSteps, StepRunner, make_runner
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.strategies import get_strategy
from tests.golden import load_fixture, golden_dir

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs and the compiled path need a GPU; none is present")


def fixture_model(method: str):
    """(strategy, model in eval mode, num_classes) built from a golden fixture's tiny model."""
    if method in ("raster", "npp", "par"):
        from tests import test_parity_gpt, test_parity_npp, test_parity_par
        builder, path = {"raster": (test_parity_gpt, "llamagen_gpt/gpt_tiny.pt"),
                         "npp": (test_parity_npp, "npp/npp_tiny.pt"),
                         "par": (test_parity_par, "par/par_tiny.pt")}[method]
        model = builder.build_fixture_model(load_fixture(str(golden_dir() / path)))
        return get_strategy(method), model.eval(), model.num_classes
    if method == "arpg":
        from tests.test_parity_arpg import build_fixture_model
        model = build_fixture_model(load_fixture(str(golden_dir() / "arpg/generate.pt")))
        return get_strategy("arpg"), model.eval(), model.num_classes
    if method == "lpd":
        from tests.test_parity_lpd import build_fixture_model
        model = build_fixture_model(load_fixture(str(golden_dir() / "lpd/generate.pt")))
        return get_strategy("lpd"), model.eval(), model.num_classes
    from tests.test_parity_var import build_fixture
    model, strategy = build_fixture(load_fixture(str(golden_dir() / "var/var_tiny.pt")))
    return strategy, model, model.num_classes


METHODS = ["raster", "npp", "par", "arpg", "lpd", "var"]
# (batch size, greedy?) of consecutive calls on one runner: a repeated shape replays the graphs
# captured by the first call with other labels; a new batch size captures its own.
CALLS = [(3, True), (3, False), (2, True), (3, True)]


def generate(strategy, model, num_classes: int, batch: int, greedy: bool, call: int) -> torch.Tensor:
    device = next(model.parameters()).device
    labels = (torch.arange(batch, device=device) * 3 + call) % num_classes
    seeds = torch.arange(batch, device=device) + 100 * call
    kw = dict(temperature=0.0) if greedy else dict(temperature=1.0, top_k=20, top_p=0.9)
    return strategy.generate(model, labels, cfg_scale=2.0, generator=RowRNG(seeds), **kw)


def assert_same_tokens_as_eager(method: str, runner: GraphedSteps, device: str = "cpu",
                                calls=CALLS) -> dict[str, int]:
    strategy, model, num_classes = fixture_model(method)
    model = model.to(device)
    if method == "var":
        strategy.tokenizer.to(device)
    eager = [generate(strategy, model, num_classes, b, greedy, i) for i, (b, greedy) in enumerate(calls)]
    strategy.runner = runner
    captures, graphs = [], []
    for i, (b, greedy) in enumerate(calls):
        fast = generate(strategy, model, num_classes, b, greedy, i)
        assert torch.equal(fast, eager[i]), f"{method}: call {i} (batch {b}, greedy {greedy}) differs from eager"
        captures.append(runner.captures)
        graphs.append(runner.compiled_graphs if runner.compile else {})
    if runner.compile:  # every graph is compiled by the first call: the other batch size reuses them
        assert graphs[0] == graphs[-1], f"{method}: later calls recompiled: {graphs}"
    assert captures[1] == captures[0] > 0, "the second call with the same shapes must replay, not capture"
    assert captures[2] > captures[1], "a new batch size captures its own graphs"
    assert captures[3] == captures[2]
    return graphs[-1]


@pytest.mark.parametrize("method", METHODS)
def test_emulated_graphs_give_the_eager_tokens(method):
    assert_same_tokens_as_eager(method, GraphedSteps(emulate=True))


#: Graphs compiled per step function over whole sampling runs of any batch sizes (of at least two
#: rows after CFG; an unguided batch of one adds a graph per function: dynamo specialises size 1).
#: The batch, token-count and cache-length dimensions are dynamic, so what remains is one graph per
#: distinct argument structure and per "one token or several": raster, NPP and LPD steps 1; PAR's
#: decode_step 2 (its first n - 1 single-token steps, then the n-token groups); ARPG 2 (step 0 feeds
#: the class token with 1-D RoPE rows, later steps per-row 2-D rows; a schedule with single-token
#: groups after step 0 would add a third); VAR 2 (the first scale's start token, then one graph
#: for every later scale, whose index travels as its token positions).
GRAPH_BOUNDS = {
    "raster": {"Transformer.prefill": 1, "Transformer.decode_step": 1},
    "npp": {"Transformer.prefill": 1, "Transformer.decode_step": 1},
    "par": {"Transformer.prefill": 1, "PARTransformer.decode_transition": 1, "PARTransformer.decode_step": 2},
    "arpg": {"ARPG.decode_step": 2},
    "lpd": {"LPD.decode_step": 1},
    "var": {"VAR.decode_step": 2},
}


def assert_graphs_bounded(method: str, graphs: dict[str, int]) -> None:
    bound = GRAPH_BOUNDS[method]
    assert set(graphs) == set(bound), f"{method}: compiled {sorted(graphs)}, expected {sorted(bound)}"
    over = {name: n for name, n in graphs.items() if not 0 < n <= bound[name]}
    assert not over, f"{method}: graphs per step function {graphs} exceed the bound {bound}"


@pytest.mark.parametrize("method", METHODS)
def test_compiled_steps_trace_without_graph_breaks(method):
    """Every step function traces as one graph (`fullgraph=True`) and the traced steps give the
    eager tokens; the `eager` backend keeps this cheap on CPU (inductor runs on the GPU test). Over
    the whole run a step function compiles at most its `GRAPH_BOUNDS` graphs, all in the first
    call: the later calls (a second batch size among them) recompile nothing."""
    torch._dynamo.reset()
    graphs = assert_same_tokens_as_eager(method, GraphedSteps(compile=True, emulate=True, compile_backend="eager"),
                                         calls=CALLS)
    assert_graphs_bounded(method, graphs)


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="inductor on CPU compiles C++ and no C++ compiler is installed")
def test_inductor_compiled_steps_give_the_eager_tokens():
    """The real backend on CPU (about 20 s for LPD; every strategy was checked the same way by
    hand, 30-60 s each): inductor's kernels write the cache prefixes in place and give the
    eager tokens exactly in float32."""
    torch._dynamo.reset()
    graphs = assert_same_tokens_as_eager("lpd", GraphedSteps(compile=True, emulate=True, compile_backend="inductor"))
    assert_graphs_bounded("lpd", graphs)


def test_edit_through_emulated_graphs():
    """Editing (known tokens as context) runs through the runner too and matches eager."""
    strategy, model, num_classes = fixture_model("lpd")
    n = model.config.block_size
    known_mask = torch.zeros(n, dtype=torch.bool)
    known_mask[: n // 2] = True
    known = torch.randint(0, model.config.vocab_size, (2, n), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 4])
    eager = strategy.edit(model, labels, known, known_mask, cfg_scale=2.0, temperature=1.0,
                          generator=RowRNG(torch.tensor([5, 6])))
    strategy.runner = GraphedSteps(emulate=True)
    for _ in range(2):
        fast = strategy.edit(model, labels, known, known_mask, cfg_scale=2.0, temperature=1.0,
                             generator=RowRNG(torch.tensor([5, 6])))
        assert torch.equal(fast, eager)


def test_recorded_logits_are_copies_not_the_replayed_buffer():
    """Without CFG a step's logits go to `record_logits` unchanged; they must survive the next step."""
    strategy, model, num_classes = fixture_model("raster")
    labels = torch.tensor([1, 2])
    want: list = []
    strategy.generate(model, labels, cfg_scale=1.0, temperature=0.0, record_logits=want)
    strategy.runner = GraphedSteps(emulate=True)
    got: list = []
    strategy.generate(model, labels, cfg_scale=1.0, temperature=0.0, record_logits=got)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_steps_read_a_prefix_of_the_cache():
    """A step attends over the slots written so far, rounded up to one of a few lengths (multiples
    of 8); the prefix is a view (writes land in the cache) and the same object each time (a graph
    may keep it)."""
    from autoregressive.models.kv_cache import KVCache, visible_slots

    assert [visible_slots(w, 264) for w in (1, 40, 41, 257, 264)] == [40, 40, 80, 264, 264]
    assert [visible_slots(w, 64) for w in (1, 8, 9, 63, 64)] == [8, 8, 16, 64, 64]
    assert [visible_slots(w, 16) for w in (1, 8, 9, 16)] == [8, 8, 16, 16]
    with pytest.raises(ValueError):
        visible_slots(0, 16)
    cache = KVCache(2, 3, 2, 16, 4, dtype=torch.float32, device="cpu")
    view = cache.upto(5)
    assert view.max_len == 8 and view is cache.upto(8) and cache.upto(16) is cache
    view.layer(1).update(torch.tensor([5]), torch.ones(3, 2, 1, 4), torch.ones(3, 2, 1, 4))
    assert cache.layer(1).k[:, :, 5].eq(1).all() and cache.layer(1).k.sum() == 3 * 2 * 4

    strategy, model, num_classes = fixture_model("raster")
    generate(strategy, model, num_classes, 2, True, 0)
    full = model.new_cache(4, max_len=model.config.block_size).nbytes  # slots: class + N - 1 tokens
    assert strategy.runner.steps_run == model.config.block_size
    assert 0.5 * full < strategy.runner.kv_bytes_per_step < full  # about half the cache on average


def test_runner_refuses_a_closure():
    runner = GraphedSteps(emulate=True)
    x = torch.zeros(2)

    def step(y):
        return y + x  # reads x, which a graph would keep from the first call

    with pytest.raises(TypeError, match="closure"):
        runner(step, torch.ones(2))


def test_make_runner_paths():
    assert type(make_runner("auto", "cpu")) is StepRunner
    assert type(make_runner("eager", "cpu")) is StepRunner
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_runner("cuda-graphs", "cpu")
    with pytest.raises(ValueError, match="unknown decode path"):
        make_runner("fast", "cpu")


def test_sampler_flag_reaches_the_strategy():
    """`--decode-path` is a sampling flag and `load_sampler` hands its runner to the strategy."""
    from autoregressive.sample.common import add_sampling_args

    p = argparse.ArgumentParser()
    add_sampling_args(p)
    args = p.parse_args(["--gpt-ckpt", "x", "--vq-ckpt", "y"])
    assert args.decode_path == "auto"
    args = p.parse_args(["--gpt-ckpt", "x", "--vq-ckpt", "y", "--decode-path", "eager"])
    assert args.decode_path == "eager"


# ---------------------------------------------------------------------------------------------
# GPU: real CUDA graphs, inductor, bf16 at a released size, and no host synchronisation
# ---------------------------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("path", ["cuda-graphs", "compiled"])
@pytest.mark.parametrize("method", METHODS)
def test_gpu_fast_path_gives_the_eager_float32_tokens(method, path):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch._dynamo.reset()
    assert_same_tokens_as_eager(method, make_runner(path, "cuda"), device="cuda")


@needs_cuda
def test_gpu_bf16_fast_path_agrees_with_eager_bf16_at_a_released_size():
    """GPT-L (343M) with random weights, CFG 4: under the eager path's greedy tokens as the prefix,
    the compiled bf16 path picks the same argmax on at least 99% of tokens (teacher-forced, so one
    flip does not change every later raster token). bf16 against float32 is a property of the
    precision, not of the path: with random weights it agrees on about 97% (measured on CPU)."""
    from autoregressive.models.gpt import build_gpt
    from tests.test_parity_arpg import Replay  # feeds given tokens back, recording each distribution

    torch.manual_seed(0)
    model = build_gpt("GPT-L", vocab_size=16384, block_size=256, num_classes=1000)
    torch.nn.init.normal_(model.output.weight, std=0.02)  # informative logits: the official init zeroes the head
    model = model.to("cuda", torch.bfloat16).eval()
    strategy = get_strategy("raster")
    labels = torch.arange(8, device="cuda") * 97 % 1000
    want = strategy.generate(model, labels, cfg_scale=4.0, temperature=0.0)
    assert torch.equal(strategy.generate(model, labels, cfg_scale=4.0, generator=Replay(want)), want)
    strategy.runner = make_runner("compiled", "cuda")
    forced = Replay(want)  # the eager tokens as the prefix; the argmax of each step's distribution
    strategy.generate(model, labels, cfg_scale=4.0, generator=forced)
    agree = (torch.cat([p.argmax(-1) for p in forced.probs], dim=1) == want).float().mean().item()
    assert agree >= 0.99, f"the compiled bf16 path picks the eager bf16 argmax on {agree:.1%} of tokens"


@needs_cuda
@pytest.mark.parametrize("method", ["raster", "lpd"])
def test_gpu_decoding_loop_does_not_synchronise(method, monkeypatch):
    """Once the graphs are captured, the decoding loop (every step, CFG, filtering, the per-image
    draws, writing the tokens back) runs without a host synchronisation. The set-up before it
    (orders, masks, the schedule check) may synchronise once per call: the error mode is switched
    on where the schedule check would run, right before the loop."""
    from autoregressive.sample import group_decode

    strategy, model, num_classes = fixture_model(method)
    model = model.cuda()
    strategy.runner = make_runner("cuda-graphs", "cuda")
    generate(strategy, model, num_classes, 4, False, 0)  # captures
    torch.cuda.synchronize()
    monkeypatch.setattr(group_decode, "check_schedule", lambda *a, **k: torch.cuda.set_sync_debug_mode("error"))
    try:
        generate(strategy, model, num_classes, 4, False, 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# What the persistent path keeps between steps and batches: outputs, streams, caches
# ---------------------------------------------------------------------------------------------


# a larger batch after a smaller one: its outputs outgrow the shared buffer
GROWING = [(2, True), (2, False), (3, True), (2, True)]


def test_graphs_of_one_step_function_share_one_output_buffer():
    """LPD's decode step has one output shape per group size and batch size: every graph writes a
    view at the start of one buffer (the same storage), and the tokens stay the eager ones."""
    runner = GraphedSteps(emulate=True)
    assert_same_tokens_as_eager("lpd", runner, calls=GROWING)
    outputs = [s.output for s in runner._steps.values()]
    assert len({tuple(o.shape) for o in outputs}) >= 2  # batch 2 and 3, with CFG
    assert len({o.untyped_storage().data_ptr() for o in outputs}) == 1
    assert all(o.data_ptr() == outputs[0].untyped_storage().data_ptr() for o in outputs)  # each at the start
    [buffer] = runner._outputs.values()
    assert max(o.numel() for o in outputs) <= buffer.numel() < 2 * max(o.numel() for o in outputs)
    assert runner.output_bytes == buffer.numel() * buffer.element_size()


class Toy(torch.nn.Module):
    """A step function whose output has as many rows as its input."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("w", torch.arange(1.0, 5.0))

    def step(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, None] * self.w  # (R, 4)


def test_a_larger_output_grows_the_buffer_and_moves_the_earlier_graphs_onto_it():
    toy, runner = Toy(), GraphedSteps(emulate=True)
    sizes = []
    for rows in (1, 2, 3, 9, 2, 1):  # outputs of 4, 8, 12, 36 elements: the buffer 4 -> 8 -> 16 -> 36
        x = torch.arange(float(rows)) + rows
        assert torch.equal(runner(toy.step, x), toy.step(x))  # replayed from the grown buffer
        sizes.append(runner.output_bytes // 4)
    assert sizes == [4, 8, 16, 36, 36, 36] and runner.captures == 4
    [buffer] = runner._outputs.values()
    assert all(s.output.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
               for s in runner._steps.values())


class FakeCuda:
    """Stand-ins for the `torch.cuda` calls of a real capture, recording what they were given, so
    that the capture path's bookkeeping runs on CPU (the "graph" body runs once, eagerly)."""

    def __init__(self, monkeypatch) -> None:
        self.streams, self.graphs = [], []
        fake = self

        class Stream:
            def __init__(self, device=None):
                fake.streams.append(self)

            def wait_stream(self, other):
                pass

        class Graph:
            def replay(self):
                pass

        @contextlib.contextmanager
        def graph(g, pool=None, stream=None):
            fake.graphs.append((g, pool, stream))
            yield

        current = Stream.__new__(Stream)  # the device's current stream: not made by the runner
        for name, value in {"Stream": Stream, "CUDAGraph": Graph, "graph": graph,
                            "current_stream": lambda device=None: current,
                            "stream": lambda s: contextlib.nullcontext(),
                            "graph_pool_handle": lambda: ("pool",)}.items():
            monkeypatch.setattr(torch.cuda, name, value)


def test_every_capture_runs_on_one_side_stream_made_once(monkeypatch):
    """Warm-ups and captures (re-captures into a grown buffer included) of a runner share one side
    stream, made on first use, and one memory pool."""
    fake = FakeCuda(monkeypatch)
    toy, runner = Toy(), GraphedSteps()
    monkeypatch.setattr(GraphedSteps, "_graph_device", lambda self, args: torch.device("cuda", 0))
    for rows in (1, 2, 3, 2):
        runner(toy.step, torch.ones(rows))
    assert runner.captures == 3 and runner.recaptures == 1 + 2  # the 1-row graph once, then both earlier ones
    assert len(fake.streams) == 1 and len(fake.graphs) == 3 + 3
    assert all(stream is fake.streams[0] and pool == ("pool",) for _, pool, stream in fake.graphs)
    assert runner._side_stream(torch.device("cuda", 0)) is fake.streams[0] and len(fake.streams) == 1
    runner.reset()  # graphs and buffers go; the stream stays
    runner(toy.step, torch.ones(2))
    assert len(fake.streams) == 1 and fake.graphs[-1][2] is fake.streams[0]


@pytest.mark.parametrize("method", ["raster", "lpd"])
def test_a_non_finite_value_left_in_a_persistent_cache_does_not_reach_the_next_batch(method):
    """A NaN in the last cache slot (hidden by the masks until the last step writes it) times a zero
    attention weight is still NaN: each call starts from a zeroed cache and gives the eager tokens."""
    strategy, model, num_classes = fixture_model(method)
    calls = [(3, False), (3, True)]
    eager = [generate(strategy, model, num_classes, b, greedy, i) for i, (b, greedy) in enumerate(calls)]
    strategy.runner = runner = GraphedSteps(emulate=True)
    assert torch.equal(generate(strategy, model, num_classes, *calls[0], 0), eager[0])
    [(_, cache)] = runner._caches.values()
    for layer in cache._layers:
        layer.k[:, :, -1] = float("nan")
        layer.v[:, :, -1] = float("inf")
    assert torch.equal(generate(strategy, model, num_classes, *calls[1], 1), eager[1])


@needs_cuda
def test_gpu_graphs_share_their_output_buffer_and_one_side_stream():
    """Real CUDA graphs: a grown output buffer re-captures the earlier graphs into it (recording
    only), and the tokens stay the eager ones."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    runner = make_runner("cuda-graphs", "cuda")
    assert_same_tokens_as_eager("lpd", runner, device="cuda", calls=GROWING)
    outputs = [s.output for s in runner._steps.values()]
    assert len({o.untyped_storage().data_ptr() for o in outputs}) == 1 and runner.recaptures > 0
    assert list(runner._side_streams) == [torch.device("cuda", 0)]

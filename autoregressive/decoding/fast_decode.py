"""How a sampling loop runs its model: eagerly, or replayed from one CUDA graph per step shape.

Every strategy's sampling loop calls its model through a `StepRunner` (`Strategy.runner`) and
takes its KV cache from it; nothing else about a strategy changes between the paths:

- `eager` (the reference, and the only path on CPU): a fresh zeroed cache per `generate` call,
  every step a plain call of the model.
- `cuda-graphs`: the caches persist across calls (one per model, batch rows and length, zeroed at
  the start of every call: slots not written yet are hidden by the attention masks, but a masked
  NaN or inf left by an earlier batch would still poison the weighted sum, NaN * 0 being NaN) and
  each distinct step — the same model function on inputs of the same shapes — is captured once as
  a CUDA graph with static input buffers and then only replayed: a step costs one graph launch
  instead of a few hundred kernel launches. Every graph of one step function writes its output
  into one shared buffer (`GraphedSteps` says how it grows), and every warm-up and capture runs
  on one side stream per runner and device.
- `compiled`: the same, with each step function compiled by `torch.compile` (inductor) before it
  is captured, which fuses the normalisation, RoPE and activation kernels. The batch, token-count
  and cache-length dimensions are marked dynamic before the first compilation and what varies
  per step is passed as tensors (VAR's scale as its token indices), so each step function
  compiles a bounded number of graphs (`CompiledStep.graphs`) whatever the batch sizes.

A captured step may only depend on its tensor arguments, the model's weights and the cache: the
graph bakes in the addresses of everything it touched. The runner therefore refuses closures,
and copies every tensor argument into the graph's static buffer before each replay. Sampling
(CFG, temperature, top-k/top-p, per-image streams) stays outside the graph, on the device
without host synchronisation (`autoregressive/decoding/logits.py`, `row_rng.py`).

`auto` on CUDA wraps the compiled path in a `FallbackRunner`: a batch whose fast path raises
(compilation, capture, replay) is decoded again eagerly and the run goes on eagerly, with one
warning; an explicitly chosen fast path raises as usual.
"""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TypeVar

import torch
import torch.nn as nn

from autoregressive.models.kv_cache import KVCache
from utils import attention_kernels
from utils.cli import UserError

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The `--decode-path` choices; `auto` is `compiled` on CUDA and `eager` elsewhere.
DECODE_PATHS = ("auto", "eager", "cuda-graphs", "compiled")
#: Compilations allowed per step function (a few are needed; dynamo's default of 8 would also do).
RECOMPILE_LIMIT = 64


class StepRunner:
    """The eager reference path: `runner(fn, *args)` is `fn(*args)`; a fresh cache per call."""

    name = "eager"

    def __init__(self) -> None:
        self.steps_run = 0
        self.kv_bytes_read = 0  # keys and values of the cache prefixes the steps attended over

    @property
    def kv_bytes_per_step(self) -> float:
        """Mean bytes of KV cache a step reads (the bench's bandwidth floor)."""
        return self.kv_bytes_read / max(self.steps_run, 1)

    def cache(self, model: nn.Module, rows: int, max_len: int | None = None) -> KVCache:
        """A KV cache of `rows` batch rows and `max_len` slots (None: the model's default)."""
        return model.new_cache(rows, max_len=max_len)

    def __call__(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        """Run one decoding step: `fn(*args)`. The returned logits are only valid until the next
        call (a replayed graph writes the next step's logits into the same buffer)."""
        self._count(args)
        return fn(*args)

    def _count(self, args: tuple) -> None:
        self.steps_run += 1
        self.kv_bytes_read += sum(a.nbytes for a in args if isinstance(a, KVCache))

    def reset(self) -> None:
        """Drop every persistent cache and captured graph (e.g. before measuring a new model)."""

    def run(self, batch: Callable[[], T], *, counted: bool = True) -> T:
        """Decode one whole batch: `batch()` is one `generate` / `edit` call through this runner.
        Here just the call; `FallbackRunner` decodes the batch again eagerly when its fast path fails
        (`counted`: whether that batch counts in its summary)."""
        return batch()

    @property
    def fallback(self) -> "FastPathFallback | None":
        """What fell back to the eager loop so far; None: nothing (always, on the plain paths)."""
        return None


class _CapturedStep:
    """One step function at one input signature: static input buffers, a graph, and its output: a
    view of the step function's shared output buffer (`GraphedSteps._output_view`)."""

    def __init__(self, fn: Callable[..., torch.Tensor], graph: "torch.cuda.CUDAGraph | None", static: list,
                 output: torch.Tensor, outputs_key: tuple):
        self.fn = fn
        self.graph = graph  # None: emulated (CPU tests)
        self.static = static  # the arguments the graph reads; tensors are the static buffers
        self.output = output
        self.outputs_key = outputs_key  # which shared output buffer `output` is a view of

    def replay(self, args: tuple) -> torch.Tensor:
        for buf, a in zip(self.static, args):
            if isinstance(a, torch.Tensor) and a.data_ptr() != buf.data_ptr():
                buf.copy_(a)
        if self.graph is not None:
            self.graph.replay()
        else:  # emulation: recompute from the static buffers into the same output view
            self.output.copy_(self.fn(*self.static))
        return self.output


def _step_identity(fn: Callable) -> tuple:
    """What makes two step functions the same captured program: the code, and the module bound."""
    func = getattr(fn, "__func__", fn)
    if set(getattr(func, "__code__").co_freevars) - {"__class__"}:  # `super()` alone adds a `__class__` cell
        raise TypeError(f"{getattr(func, '__qualname__', func)} is a closure: a captured step may only read its "
                        f"arguments (a graph would keep the first call's tensors); pass a bound method or a "
                        f"module-level function and every per-call tensor as an argument")
    owner = getattr(fn, "__self__", None)
    return (func.__code__, id(owner))


def _arg_key(a: Any) -> tuple:
    if isinstance(a, torch.Tensor):
        return ("tensor", tuple(a.shape), a.dtype, a.device)
    if isinstance(a, (KVCache, nn.Module)):
        return ("object", id(a))  # persistent: the caches live in the runner, models in the caller
    if a is None or isinstance(a, (bool, int, float, str)):
        return ("value", a)
    raise TypeError(f"a step argument must be a tensor, a KV cache, a module or a plain value, got {type(a).__name__}")


def mark_dynamic_dims(args: tuple) -> None:
    """Mark every dimension longer than 1 of the step's tensors (its tensor arguments and its KV
    caches' keys and values) as dynamic before dynamo first sees them: the batch rows, the token
    or group count and the cache prefix length then get a symbolic size from the first compilation
    on, so neither a second batch size nor a second group size or cache bucket recompiles. The
    marks are weak (`maybe_mark_dynamic`): a dimension the model pins (heads, widths) becomes a
    constant without an error, and, marked dynamic rather than automatic, equal sizes do not share
    one symbol (a batch of as many rows as heads is not pinned with them). Sizes 0 and 1 are still
    specialised by dynamo, so a step with one token (or one batch row) has its own graph."""
    for a in args:
        if isinstance(a, torch.Tensor):
            tensors: Iterable[torch.Tensor] = (a,)
        elif isinstance(a, KVCache):
            tensors = a.tensors()
        else:
            continue
        for t in tensors:
            for dim, size in enumerate(t.shape):
                if size > 1:
                    torch._dynamo.maybe_mark_dynamic(t, dim)


class CompiledStep:
    """A step function under `torch.compile(fullgraph=True)` with its dynamic dimensions marked up
    front (`mark_dynamic_dims`); `graphs` counts the graphs compiled for it (every recompilation)."""

    def __init__(self, fn: Callable[..., torch.Tensor], backend: str | Callable = "inductor"):
        self.name = getattr(fn, "__qualname__", type(fn).__name__)
        self.graphs = 0
        self._backend = torch._dynamo.lookup_backend(backend) if isinstance(backend, str) else backend
        self._compiled = torch.compile(fn, backend=self._count, fullgraph=True)

    def _count(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        self.graphs += 1
        return self._backend(gm, example_inputs)

    def __call__(self, *args: Any) -> torch.Tensor:
        mark_dynamic_dims(args)
        return self._compiled(*args)


class GraphedSteps(StepRunner):
    """Persistent caches and one captured graph per (step function, argument shapes).

    Output memory: the graphs of one step function (its code and the module it is bound to, per
    output dtype and device) never run at the same time and a step's output is only valid until
    the next call, so they all write into one flat buffer, each into a view of its own shape
    (`out_view.copy_(fn(*static))` inside the graph: a graph bakes in the address it writes). The
    buffer grows when a capture needs more: to the larger of that need and twice its size (at
    most twice the largest output; a few growths per step function), and every graph that wrote
    into the old buffer is captured again at once into the new one. Such a re-capture runs no
    warm-up: capturing only records kernels (nothing executes, so the cache and the static
    inputs are untouched), and every kernel it records was warmed up by the graph's first
    capture. Only the graph memory pool, shared by all graphs, holds their intermediates.

    Args:
        compile: compile each step function with `torch.compile` before capturing it.
        emulate: run on any device without CUDA graphs, replaying by re-running the function
            captured first on the static buffers (same address semantics; the CPU tests use it).
        compile_backend: `torch.compile` backend ("inductor"; the CPU tests use "eager" to check
            that every step traces without a graph break).
        warmup: eager calls before a first capture, at least one (they compile and initialise the
            kernels, and give the output's shape; a step rewrites the same cache slots with the
            same values, so repeating it is harmless).
    """

    def __init__(self, compile: bool = False, *, emulate: bool = False, compile_backend: str = "inductor",
                 warmup: int = 2):
        super().__init__()
        self.name = ("compiled" if compile else "cuda-graphs") + (" (emulated)" if emulate else "")
        self.compile = compile
        self.emulate = emulate
        self.compile_backend = compile_backend
        self.warmup = warmup
        self._side_streams: dict[torch.device, "torch.cuda.Stream"] = {}  # kept across `reset`
        self._capturing: tuple | None = None  # the identity of the step function being captured
        self.reset()

    def reset(self) -> None:
        self._caches: dict[tuple, tuple[nn.Module, KVCache]] = {}
        self._steps: dict[tuple, _CapturedStep] = {}
        self._compiled: dict[tuple, Callable] = {}
        self._outputs: dict[tuple, torch.Tensor] = {}  # (step identity, dtype, device) -> flat buffer
        self._pool = None
        self.captures = 0  # graphs captured so far (tests and the bench report it)
        self.recaptures = 0  # graphs captured again into a grown output buffer

    @property
    def output_bytes(self) -> int:
        """Bytes of the shared output buffers (one per step function): what the graphs' outputs hold."""
        return sum(b.numel() * b.element_size() for b in self._outputs.values())

    def cache(self, model: nn.Module, rows: int, max_len: int | None = None) -> KVCache:
        """The persistent cache of (model, rows, max_len, dtype), zeroed: each `generate` call takes
        it once, before its first step, so no value of an earlier batch (a NaN or inf in a slot the
        masks hide still poisons the attention sum) reaches this one. One fused fill, outside any
        graph (the cache's addresses stay those the graphs were captured with)."""
        key = (id(model), rows, max_len, next(model.parameters()).dtype)
        if key not in self._caches:  # the model is kept with its cache, so its id is not reused
            self._caches[key] = (model, model.new_cache(rows, max_len=max_len))
        else:
            torch._foreach_zero_(self._caches[key][1].tensors())
        return self._caches[key][1]

    def __call__(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        self._count(args)
        ident = _step_identity(fn)
        key = (ident, tuple(_arg_key(a) for a in args))
        step = self._steps.get(key)
        if step is None:
            if attention_kernels.recording():
                fn(*args)  # one eager step, so the attention kernel report sees the real calls
            self._capturing = ident  # whose output buffer the capture writes into
            try:
                with attention_kernels.suspended():  # compiled and captured code never holds the recorder
                    step = self._capture(self._compiled_fn(ident, fn), args)
            finally:
                self._capturing = None
            self._steps[key] = step
        return step.replay(args)

    def _compiled_fn(self, ident: tuple, fn: Callable) -> Callable:
        if not self.compile:
            return fn
        if ident not in self._compiled:
            # A few graphs per step function (`CompiledStep`); the raised limit is a safety margin.
            cfg = torch._dynamo.config
            cfg.recompile_limit = max(cfg.recompile_limit, RECOMPILE_LIMIT)
            self._compiled[ident] = CompiledStep(fn, self.compile_backend)
        return self._compiled[ident]

    def _side_stream(self, device: torch.device) -> "torch.cuda.Stream":
        """The stream every warm-up and capture on `device` runs on: created on first use, then kept
        for the runner's life (a capture must not run on the default stream: PyTorch's CUDA graphs
        notes; one stream, not one per capture, keeps the stream count and the allocator's
        per-stream bookkeeping flat)."""
        if device not in self._side_streams:
            self._side_streams[device] = torch.cuda.Stream(device)
        return self._side_streams[device]

    @property
    def compiled_graphs(self) -> dict[str, int]:
        """Graphs compiled so far per step function (its qualified name; functions of the same name
        on different modules add up)."""
        out: dict[str, int] = {}
        for step in self._compiled.values():
            if isinstance(step, CompiledStep):
                out[step.name] = out.get(step.name, 0) + step.graphs
        return out

    def _capture(self, fn: Callable[..., torch.Tensor], args: tuple) -> _CapturedStep:
        """Static copies of `args`, warm-up calls, and the graph writing `fn`'s output into a view of
        the shared output buffer of the step function being captured (`fn` may be its compiled form)."""
        ident = self._capturing if self._capturing is not None else _step_identity(fn)
        static = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        self.captures += 1
        if self.emulate:
            key, view = self._output_view(ident, fn(*static))
            return _CapturedStep(fn, None, static, view, key)
        device = self._graph_device(args)
        side = self._side_stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(max(self.warmup, 1)):
                out = fn(*static)
        torch.cuda.current_stream(device).wait_stream(side)
        key, view = self._output_view(ident, out)  # may grow the buffer and re-capture the others
        del out
        return _CapturedStep(fn, self._record(fn, static, view, device), static, view, key)

    @staticmethod
    def _graph_device(args: tuple) -> torch.device:
        """The CUDA device a step's tensor arguments live on (a graph needs one)."""
        device = next(a for a in args if isinstance(a, torch.Tensor)).device
        if device.type != "cuda":
            raise RuntimeError(f"CUDA graphs need a CUDA device, but the step runs on {device}")
        return device

    def _record(self, fn: Callable[..., torch.Tensor], static: list, view: torch.Tensor,
                device: torch.device) -> "torch.cuda.CUDAGraph":
        """Capture `view.copy_(fn(*static))` as a graph (no warm-up: the caller's job) on the side
        stream, its intermediates in the memory pool every graph shares (they never run at once)."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=self._side_stream(device)):
            view.copy_(fn(*static))
        return graph

    def _output_view(self, ident: tuple, out: torch.Tensor) -> tuple[tuple, torch.Tensor]:
        """(buffer key, a view shaped like `out` at the start of the shared output buffer of the step
        function `ident`), growing the buffer (and re-capturing its graphs) when it is too small."""
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"a captured step must return one tensor, got {type(out).__name__}")
        key = (ident, out.dtype, out.device)
        old = self._outputs.get(key)
        if old is None or old.numel() < out.numel():
            size = out.numel() if old is None else max(out.numel(), 2 * old.numel())
            self._outputs[key] = torch.empty(size, dtype=out.dtype, device=out.device)
            if old is not None:
                self._rebind(key)
        return key, self._outputs[key][: out.numel()].view(out.shape)

    def _rebind(self, key: tuple) -> None:
        """Point every step writing into the buffer `key` at the new buffer: a new view, and for a
        real graph a re-capture (recording only) that writes there."""
        buffer = self._outputs[key]
        for step in self._steps.values():
            if step.outputs_key != key:
                continue
            step.output = buffer[: step.output.numel()].view(step.output.shape)
            if step.graph is not None:
                step.graph = None  # the old graph's pool memory may serve the new one
                step.graph = self._record(step.fn, step.static, step.output, self._graph_device(step.static))
                self.recaptures += 1


@dataclass
class FastPathFallback:
    """A run's (or its ranks') fallback from the fast path to the eager loop, for its summary."""

    first_error: str  # "<exception type>: <its message>", on one line
    batches: int = 0  # batches decoded eagerly because of it (the failed one included)
    ranks: int = 1

    def __str__(self) -> str:
        where = f" on {self.ranks} ranks" if self.ranks > 1 else ""
        return f"fast path fell back to eager{where}: {self.batches} batch(es), first error: {self.first_error}"

    @staticmethod
    def merge(fallbacks: Iterable["FastPathFallback | None"]) -> "FastPathFallback | None":
        """The fallbacks of several ranks as one (None: no rank fell back); the first error is the
        lowest rank's."""
        seen = [f for f in fallbacks if f is not None]
        if not seen:
            return None
        return FastPathFallback(seen[0].first_error, sum(f.batches for f in seen), sum(f.ranks for f in seen))


def describe_error(error: BaseException, limit: int = 300) -> str:
    """`<type>: <message>` on one line, at most `limit` characters (compiler errors run long)."""
    message = " ".join(str(error).split())
    text = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


class FallbackRunner(StepRunner):
    """`--decode-path auto` on CUDA: the fast path, and the eager loop for the rest of the run once
    the fast path has raised.

    A step that fails (compiling, capturing, replaying, or allocating the fast path's caches) leaves
    its batch half decoded, so the fallback works on whole batches (`run`): the failed batch is
    decoded again eagerly from the start, its per-image streams restarting from their seeds (so it
    gets the eager path's tokens), and every later batch, of any shape, runs eagerly; a failing
    fast path is not retried (its graphs and caches are freed). The first error is logged once as
    a warning and kept in `fallback` for the run's summary.
    """

    def __init__(self, fast: GraphedSteps) -> None:
        super().__init__()
        self.fast = fast
        self._fallback: FastPathFallback | None = None
        self._error: Exception | None = None  # what the fast path raised during the current batch

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.fast.name if self._fallback is None else f"eager (fell back from {self.fast.name})"

    @property
    def captures(self) -> int:
        return self.fast.captures

    @property
    def output_bytes(self) -> int:
        return self.fast.output_bytes

    @property
    def fallback(self) -> FastPathFallback | None:
        return self._fallback

    def cache(self, model: nn.Module, rows: int, max_len: int | None = None) -> KVCache:
        if self._fallback is not None:
            return model.new_cache(rows, max_len=max_len)
        return self._on_fast_path(self.fast.cache, model, rows, max_len)

    def __call__(self, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        self._count(args)
        if self._fallback is not None:
            return fn(*args)
        return self._on_fast_path(self.fast, fn, *args)

    def _on_fast_path(self, call: Callable[..., T], *args: Any) -> T:
        try:
            return call(*args)
        except Exception as e:  # noted for `run`, which tells the fast path's failures from others
            self._error = e
            raise

    def reset(self) -> None:
        self.fast.reset()

    def run(self, batch: Callable[[], T], *, counted: bool = True) -> T:
        """`batch()` on the fast path; if the fast path raised, `batch()` again on the eager loop
        (an error the fast path did not raise propagates: the eager loop would raise it too)."""
        if self._fallback is None:
            self._error = None
            try:
                return batch()
            except Exception:
                if self._error is None:
                    raise
                error, self._error = describe_error(self._error), None  # no traceback keeps tensors
            self._fall_back(error)
        result = batch()
        if counted:
            self._fallback.batches += 1
        return result

    def _fall_back(self, error: str) -> None:
        self._fallback = FastPathFallback(error)
        self.fast.reset()  # its graphs, memory pool and persistent caches, for the eager loop
        gc.collect()
        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()
        path = "compiled" if self.fast.compile else "cuda-graphs"
        log.warning(f"the fast decode path ({self.fast.name}) failed: {error}; the batch is decoded again and "
                    f"the run goes on with the eager loop (--decode-path eager skips the fast path, "
                    f"--decode-path {path} stops at the error with its traceback)")


class FastPathMismatch(UserError, RuntimeError):
    """`--verify-fast-path`: the fast path's greedy tokens are not the eager loop's."""


def check_same_tokens(fast: torch.Tensor, eager: torch.Tensor, path: str, note: str = "") -> None:
    """Refuse (`FastPathMismatch`, naming how many tokens differ) unless the fast path `path` gave
    the eager loop's tokens; `note` is appended to the message."""
    differ = int((fast != eager).sum()) if fast.shape == eager.shape else eager.numel()
    if differ:
        raise FastPathMismatch(f"--verify-fast-path: the {path} decode path gives other tokens than the eager loop "
                               f"on the first batch ({differ} of {eager.numel()} greedy tokens differ); rerun with "
                               f"--decode-path eager{note}")


def make_runner(path: str, device: torch.device | str) -> StepRunner:
    """The runner of a `--decode-path` on `device`: `auto` is `compiled` on CUDA (falling back to
    eager if it fails: `FallbackRunner`), `eager` elsewhere; the graph paths need CUDA."""
    device = torch.device(device)
    if path not in DECODE_PATHS:
        raise ValueError(f"unknown decode path {path!r}; known: {', '.join(DECODE_PATHS)}")
    if path == "auto":
        return FallbackRunner(GraphedSteps(compile=True)) if device.type == "cuda" else StepRunner()
    if path == "eager":
        return StepRunner()
    if device.type != "cuda":
        raise ValueError(f"--decode-path {path} captures CUDA graphs and needs a CUDA device; "
                         f"on {device.type} use eager (or auto)")
    return GraphedSteps(compile=path == "compiled")

"""Sampling speed per strategy and decoding path: images/s, latency per image, ms per step beside
the memory-bandwidth floor, peak memory, against the eager path and the raster baselines.

    python bench/bench_sample.py                                   # CPU: every registered strategy
    python bench/bench_sample.py --device cuda --batch-sizes 1 64 --find-max-batch --results bench/RESULTS.md
    python bench/bench_sample.py --device cuda --cases raster lpd-20 --decode-paths eager cuda-graphs compiled
    python bench/bench_sample.py --size debug --image-size 64 --vocab-size 64 --num-classes 10  # quick, CPU

Weights are random (speed does not depend on them; the output says so); tokens only, the tokenizer
is not run. Each case builds its strategy's model at the size class `--size` (L: GPT-L for
raster / PAR / NPP, ARPG-L, LPD-L, VAR-d16; the sizes the papers compare) and times
`strategy.generate` with CFG on (both halves, `--cfg-scale`), temperature 1, no filtering, after
`--warmup` untimed calls. Sampling draws from per-image streams (`RowRNG`, seeds on the device), as
the sampling drivers do: `torch.multinomial` with a torch.Generator would synchronise with the host
at every step. Two baselines are measured in the same run: `raster` decoding of the same size
class (what every paper compares with) and `raster-naive`, the same model without a KV cache
(every step re-runs the whole prefix, eager only), which shows what the cache buys.

Decoding paths (`--decode-paths`, `autoregressive/decoding/fast_decode.py`): every case is measured
under each path in the same run, each measurement with a fresh runner whose caches and graphs are
freed afterwards. `auto` is `compiled` on CUDA and `eager` on CPU, so on CPU each distinct path is
measured once; the graph paths need CUDA. A graph path gets at least one warmup call (it compiles
and captures there). `vs eager` is a row's images/s over the eager path's at the same case and
batch; `vs raster` is over `raster`'s at the same path and batch.

Bandwidth floor: a step cannot take less than (weight bytes + KV-cache bytes) / peak bandwidth.
A step reads every parameter once except the `nn.Embedding` tables (it gathers a few rows of
those), and the KV cache prefix it attends over (`runner.kv_bytes_per_step`, keys and values,
averaged over the steps): the slots written so far, rounded up to one of a few lengths
(`models/kv_cache.py:visible_slots`) so that a step has few shapes. `x floor` is the measured
ms/step over that floor. The peak bandwidth is `--bandwidth-gbps`, else the vendor figure for the
CUDA device's name (`BANDWIDTH_GBPS`); the floor columns are n/a when neither is known (CPU
without the flag, an unlisted GPU). The header prints the bandwidth assumed and where it came from.

`--find-max-batch` (CUDA): per case and path, doubles the batch from the largest `--batch-sizes`
until out of memory or `--max-batch`, and reports the largest batch that ran, marked `*`.
`--results FILE` appends the run (date, device, command, settings, table) to a Markdown file.

Peak memory is `torch.cuda.max_memory_allocated` on CUDA (weights, caches, graph pools), reset
before each path's measurement, so the eager and the fast rows each show their own peak, and the
growth of the process's peak RSS on CPU (a coarse figure). `graph out MiB` is what the graph paths
keep for their steps' outputs: one buffer per step function, shared by all its graphs (0 on the
eager path). A case whose strategy is not registered is reported as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoregressive.decoding.fast_decode import DECODE_PATHS, make_runner  # noqa: E402
from autoregressive.decoding.logits import cfg_labels, combine_cfg, sample_from_logits  # noqa: E402
from autoregressive.decoding.row_rng import RowRNG, image_seeds  # noqa: E402
from autoregressive.sample.common import add_sampling_args  # noqa: E402
from autoregressive.strategies import STRATEGIES, get_strategy  # noqa: E402
from tokenizer.registry import get_kind  # noqa: E402
from utils.attention_kernels import record_attention_kernels  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.memory import peak_memory_bytes  # noqa: E402


@dataclass
class Case:
    """One benchmark row: a strategy, its model per size class, its flags and decoding steps."""

    label: str
    strategy: str
    sizes: dict[str, str]  # size class -> the strategy's --gpt-model name
    flags: dict = field(default_factory=dict)  # the strategy's own flags (argparse dests)
    steps: int | None = None
    vocab_size: int | None = None  # None: --vocab-size (VAR's tokenizer has its own, 4096)


CASES = [
    Case("raster", "raster", {"XL": "GPT-XL", "L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"}),
    Case("raster-naive", "raster", {"XL": "GPT-XL", "L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"}),
    Case("par-4x", "par", {"XL": "GPT-XL", "L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"},
         {"spe_token_num": 3, "ar_token_num": 4}),
    Case("par-16x", "par", {"XL": "GPT-XL", "L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"},
         {"spe_token_num": 15, "ar_token_num": 16}),
    Case("npp", "npp", {"XL": "GPT-XL", "L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"}),
    Case("arpg-32", "arpg", {"L": "ARPG-L", "debug": "ARPG-debug"}, steps=32),
    Case("arpg-64", "arpg", {"L": "ARPG-L", "debug": "ARPG-debug"}, steps=64),
    Case("lpd-20", "lpd", {"L": "LPD-L", "debug": "LPD-debug"}, steps=20),
    Case("lpd-32", "lpd", {"L": "LPD-L", "debug": "LPD-debug"}, steps=32),
    Case("var", "var", {"L": "VAR-d16", "B": "VAR-d16", "debug": "VAR-debug"}, vocab_size=4096),
]

#: Peak DRAM bandwidth in GB/s from the vendors' datasheets, by CUDA device name (first match wins).
BANDWIDTH_GBPS = [
    (r"H100.*NVL", 3900, "H100 NVL"),
    (r"H100.*PCIe", 2000, "H100 PCIe"),
    (r"H100", 3350, "H100 SXM"),
    (r"(?<!G)H200", 4800, "H200"),
    (r"A100.*(80GB.*PCIe|PCIe.*80GB)", 1935, "A100 80GB PCIe"),
    (r"A100.*80GB", 2039, "A100 80GB SXM"),
    (r"A100", 1555, "A100 40GB"),
    (r"L40S", 864, "L40S"),
    (r"\bL4\b", 300, "L4"),
    (r"\bA10G?\b", 600, "A10"),
    (r"RTX 4090", 1008, "RTX 4090"),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return peak_memory_bytes("cpu") / 2**20  # the process's peak RSS (utils/memory.py)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


def peak_bandwidth(name: str) -> tuple[float, str] | None:
    """(GB/s, the part it was read as) for a CUDA device name, or None when not in the table."""
    for pattern, gbps, label in BANDWIDTH_GBPS:
        if re.search(pattern, name, re.IGNORECASE):
            return gbps, label
    return None


def bandwidth(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str]:
    """(peak bandwidth in GB/s or None, where the figure comes from)."""
    if args.bandwidth_gbps is not None:
        return args.bandwidth_gbps, "from --bandwidth-gbps"
    if device.type != "cuda":
        return None, "unknown on CPU: pass --bandwidth-gbps for the floor columns"
    name = device_name(device)
    known = peak_bandwidth(name)
    if known is None:
        return None, f"unknown for {name!r}: pass --bandwidth-gbps for the floor columns"
    return known[0], f"vendor peak of the {known[1]}, matched from the device name {name!r}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the parameters one decoding step reads: all but the `nn.Embedding` tables, of which
    a step gathers a few rows (a table shared with another layer, e.g. a tied head, is counted)."""
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    used = {id(p) for m in model.modules() if not isinstance(m, nn.Embedding) for p in m.parameters(recurse=False)}
    return sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in tables or id(p) in used)


@torch.no_grad()
def generate_without_cache(model, labels: torch.Tensor, cfg_scale: float, generator: RowRNG) -> torch.Tensor:
    """Raster decoding with no KV cache: step t re-runs the model over the class token and z_<t."""
    n = model.config.block_size
    cond = cfg_labels(labels, model.num_classes, cfg_scale)
    reps = cond.shape[0] // labels.shape[0]
    tokens = torch.empty(labels.shape[0], n, dtype=torch.long, device=labels.device)
    for t in range(n):
        logits, _ = model(tokens[:, :t].repeat(reps, 1), cond)  # (B', 1 + t, V)
        guided = combine_cfg(logits[:, -1], cfg_scale)
        tokens[:, t], _ = sample_from_logits(guided, 1.0, 0, 1.0, generator)
    return tokens


def strategy_args(case: Case, size: str, bench_args: argparse.Namespace) -> argparse.Namespace:
    """What the samplers would pass to `strategy.configure`: their flags at the defaults (the
    strategy's own included), the shared sizes, and the case's values."""
    p = argparse.ArgumentParser()
    add_sampling_args(p)
    args = p.parse_args(["--gpt-ckpt", "-", "--vq-ckpt", "-"])
    for k in ("image_size", "downsample_size", "vocab_size", "num_classes", "cfg_scale"):
        setattr(args, k, getattr(bench_args, k))
    args.strategy, args.gpt_model, args.steps = case.strategy, case.sizes[size], case.steps
    for k, v in case.flags.items():
        setattr(args, k, v)
    return args


def build_case(case: Case, size: str, args: argparse.Namespace, device: torch.device):
    """(strategy, model, generate fn, decoding steps) for one case, or a reason it is skipped."""
    if case.strategy not in STRATEGIES:
        return f"strategy {case.strategy!r} is not registered"
    if size not in case.sizes:
        return f"no {size!r} size for {case.strategy}"
    strategy = get_strategy(case.strategy)
    sargs = strategy_args(case, size, args)
    strategy.configure(sargs, training=False)
    grid = args.image_size // args.downsample_size
    vocab = case.vocab_size or args.vocab_size
    if strategy.tokenizer_flag is not None:  # it generates with its tokenizer (VAR's next-scale inputs): a random one
        kind = get_kind(strategy.tokenizer_kind)
        strategy.use_tokenizer(kind.build_release(vocab, strategy.tokenizer_options(sargs).get("patch_nums")))
    model = strategy.build_model(case.sizes[size], vocab_size=vocab, block_size=grid * grid,
                                 num_classes=args.num_classes, **strategy.model_config(sargs))
    for p in model.parameters():  # informative logits (some official inits zero the head)
        torch.nn.init.normal_(p, std=0.02)
    dtype = torch.bfloat16 if (device.type == "cuda" and args.precision == "bf16") else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    if case.label == "raster-naive":
        def run(labels, rng):
            return generate_without_cache(model, labels, args.cfg_scale, rng)
        steps = grid * grid
    else:
        def run(labels, rng):
            return strategy.generate(model, labels, cfg_scale=args.cfg_scale, temperature=1.0,
                                     steps=case.steps, generator=rng)
        steps = strategy.decoding_steps(model, case.steps)
    return strategy, model, run, steps


def decode_paths(requested: list[str], device: torch.device) -> tuple[list[str], list[str]]:
    """The distinct paths `requested` resolve to on `device` (eager first: the others are compared
    with it), and a note on each that does not run as asked."""
    paths, notes = [], []
    for p in requested:
        try:
            resolved = make_runner(p, device).name
        except ValueError as e:
            notes.append(f"path {p}: skipped, {e}")
            continue
        if p == "auto" and device.type != "cuda":
            notes.append("path auto: the fast path falls back to eager on CPU (measured once, as eager)")
        if resolved not in paths:
            paths.append(resolved)
    return sorted(paths, key=lambda p: p != "eager"), notes


def release(strategy, device: torch.device) -> None:
    """Free the runner's persistent caches and graphs, and the allocator's cached blocks."""
    strategy.runner.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(e: BaseException | None) -> bool:
    """Out of device memory, here or in the errors it was raised from (a failed allocation can
    surface as a compiler error naming it, or as the graph capture's failure to end)."""
    while e is not None:
        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def measure(run, batch: int, args: argparse.Namespace, device: torch.device, warmup: int) -> dict:
    """Seconds per generate call (mean of --iters after `warmup` calls) and peak memory."""
    labels = torch.arange(batch, device=device) % args.num_classes
    rng = RowRNG(image_seeds(0, torch.arange(batch)).to(device))  # one stream per image, on the device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = peak_rss_mb()
    for _ in range(warmup):
        tokens = run(labels, rng)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        tokens = run(labels, rng)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.iters
    assert tokens.shape[0] == batch
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb() - rss0)
    return {"seconds": seconds, "images_per_s": batch / seconds, "latency_per_image": seconds / batch,
            "peak_mem_mb": mem, "tokens_sha": tokens_digest(tokens)}


def tokens_digest(tokens: torch.Tensor) -> str:
    """The first 10 hex digits of the sha256 of the last call's token ids (int64, row-major): equal
    digits across runs, paths or code versions mean the same tokens (the weights are seeded)."""
    return hashlib.sha256(tokens.to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()[:10]


def timed(strategy, run, path: str, batch: int, args: argparse.Namespace, device: torch.device) -> dict | None:
    """`measure` with a fresh runner of `path`, freed afterwards; None when the batch does not fit."""
    strategy.runner = make_runner(path, device)
    warmup = args.warmup if path == "eager" else max(args.warmup, 1)  # the first call compiles and captures
    result = None
    try:
        result = measure(run, batch, args, device, warmup)
        result["kv_bytes"] = strategy.runner.kv_bytes_per_step  # the cache prefixes the steps read
        result["graphs"] = getattr(strategy.runner, "captures", 0)  # graphs the path captured
        result["graph_out_mb"] = getattr(strategy.runner, "output_bytes", 0) / 2**20  # their shared outputs
    except RuntimeError as e:
        if not is_oom(e):
            raise
    finally:
        release(strategy, device)  # after the except block: the traceback no longer holds tensors
    return result


def kernel_report(strategy, run, args: argparse.Namespace, device: torch.device) -> str:
    """The attention kernels of one eager generate call at batch 2 (`utils/attention_kernels.py`)."""
    strategy.runner = make_runner("eager", device)
    labels = torch.arange(2, device=device) % args.num_classes
    try:
        with torch.no_grad(), record_attention_kernels() as kernels:
            run(labels, RowRNG(image_seeds(0, torch.arange(2)).to(device)))
    finally:
        release(strategy, device)
    warn = [c.describe() for c in kernels.math_on_cuda]
    return kernels.summary() + (f"  WARNING: math kernel on CUDA for {', '.join(warn)}" if warn else "")


def largest_batch(probe: Callable[[int], dict | None], batch: int, result: dict,
                  max_batch: int) -> tuple[int, dict]:
    """Double `batch` (which ran, giving `result`) while `probe(batch)` fits and stays within
    `max_batch`; returns the largest batch that ran and its result."""
    while batch * 2 <= max_batch:
        r = probe(batch * 2)
        if r is None:
            break
        batch, result = batch * 2, r
    return batch, result


def ratio(a: float, b: float | None) -> float | None:
    return a / b if b else None


def make_row(case: Case, model_name: str, path: str, batch: int, steps: int, r: dict, w_bytes: int,
             gbps: float | None, eager_ips: float | None, raster_ips: float | None, largest: bool = False) -> dict:
    ms_per_step = r["seconds"] / steps * 1e3
    floor_ms = (w_bytes + r["kv_bytes"]) / (gbps * 1e9) * 1e3 if gbps else None
    return {"case": case.label, "model": model_name, "path": path, "batch": batch, "largest_batch": largest,
            "steps": steps, **r, "ms_per_step": ms_per_step, "weight_bytes": w_bytes, "floor_ms": floor_ms,
            "x_floor": ratio(ms_per_step, floor_ms), "vs_eager": ratio(r["images_per_s"], eager_ips),
            "speedup_vs_raster": ratio(r["images_per_s"], raster_ips)}


def columns(device: torch.device) -> list[str]:
    mem = "peak MiB" if device.type == "cuda" else "peak RSS +MiB"
    return ["case", "model", "path", "batch", "steps", "images/s", "s/image", "ms/step", mem,
            "graph out MiB", "floor ms/step", "x floor", "vs eager", "vs raster", "tokens sha256"]


def cells(row: dict) -> list[str]:
    """A row's table cells, in `columns` order (no cell holds two spaces: the console table splits on them)."""
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    def times(v):
        return "n/a" if v is None else f"{v:.2f}x"

    x = row["x_floor"]
    return [row["case"], row["model"], row["path"], f"{row['batch']}{'*' if row['largest_batch'] else ''}",
            str(row["steps"]), f"{row['images_per_s']:.2f}", f"{row['latency_per_image']:.4g}",
            f"{row['ms_per_step']:.4g}", f"{row['peak_mem_mb']:.1f}", f"{row['graph_out_mb']:.1f}",
            num(row["floor_ms"], ".3g"),
            num(x, ".1f" if x is not None and x < 100 else ".0f"), times(row["vs_eager"]),
            times(row["speedup_vs_raster"]), row["tokens_sha"]]


WIDTHS = [14, 10, 11, 6, 5, 10, 9, 9, 13, 13, 13, 8, 8, 9, 13]


def console_line(values: list[str]) -> str:
    return "  ".join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(values, WIDTHS))).rstrip()


def legend(args: argparse.Namespace, find_max: bool) -> list[str]:
    lines = ["baselines: 'raster' (the same size class, KV cache) and 'raster-naive' (no KV cache, eager), "
             "measured above in this run",
             "floor ms/step: (parameter bytes read per step, nn.Embedding tables excluded, + the KV cache "
             "prefix a step attends over, mean over the steps) / peak bandwidth; x floor = ms/step / floor",
             "vs eager: images/s over the eager path's at the same case and batch; vs raster: over "
             "raster's at the same path and batch",
             "tokens sha256: digest of the last call's token ids (seeded weights and streams): equal digests, "
             "equal tokens"]
    if find_max:
        lines.append(f"N*: the largest batch that ran, doubling from {max(args.batch_sizes)} until out of "
                     f"memory or --max-batch {args.max_batch}")
    return lines


def command_line(args: argparse.Namespace, argv: list[str] | None) -> str:
    """The command that produced this run: `argv` as typed, else every flag of `args` that differs
    from its default (when `main` is called in-process)."""
    if argv is None:
        argv = []
        for action in build_parser()._actions:
            value = getattr(args, action.dest, action.default)
            if not action.option_strings or action.dest == "help" or value == action.default:
                continue
            if isinstance(action, argparse._StoreTrueAction):
                argv.append(action.option_strings[0])
            else:
                argv += [action.option_strings[0], *map(str, value if isinstance(value, list) else [value])]
    return shlex.join(["python", "bench/bench_sample.py", *argv])


def write_results(path: str, rows: list[dict], args: argparse.Namespace, argv: list[str] | None,
                  device: torch.device, settings: str, find_max: bool) -> None:
    """Append this run as a Markdown section to `path` (written to a temporary file, then renamed)."""
    head = columns(device)
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += ["| " + " | ".join(cells(r)) + " |" for r in rows]
    section = [f"## {datetime.date.today().isoformat()} — {device_name(device)}", "",
               "```sh", command_line(args, argv), "```", "", settings, "", *table, "",
               *[f"- {line}" for line in legend(args, find_max)], ""]
    old = Path(path).read_text() if Path(path).exists() else ""
    text = old + ("\n" if old and not old.endswith("\n\n") else "") + "\n".join(section)
    atomic_write(path, lambda f: f.write(text.encode()))


def bench_case(case: Case, args: argparse.Namespace, device: torch.device, paths: list[str],
               gbps: float | None, find_max: bool, ips: dict[tuple[str, str, int], float]) -> list[dict]:
    """Every row of one case: each path (eager only for `raster-naive`) at each batch, then with
    `find_max` the largest batch; records images/s in `ips` ((case, path, batch), probes included)."""
    try:
        built = build_case(case, args.size, args, device)
    except ValueError as e:  # e.g. more decoding steps than tokens at a small --image-size
        built = str(e)
    if isinstance(built, str):
        print(f"{case.label:14s}  skipped: {built}")
        return []
    strategy, model, run, steps = built
    w_bytes, model_name = weight_bytes(model), case.sizes[args.size]
    if args.kernel_report:
        print(f"{case.label:14s}  attention kernels: {kernel_report(strategy, run, args, device)}")
    naive = case.label == "raster-naive"
    rows = []

    def add_row(path: str, batch: int, r: dict, largest: bool = False) -> None:
        row = make_row(case, model_name, path, batch, steps, r, w_bytes, gbps,
                       ips.get((case.label, "eager", batch)), ips.get(("raster", path, batch)), largest)
        rows.append(row)
        print(console_line(cells(row)))

    def probe(path: str, batch: int) -> dict | None:
        r = timed(strategy, run, path, batch, args, device)
        if r is not None:
            ips[(case.label, path, batch)] = r["images_per_s"]
        return r

    for path in (["eager"] if naive else paths):
        best = None  # (batch, result) of the largest batch that ran
        for batch in args.batch_sizes:
            if naive and batch > args.naive_max_batch:
                continue
            r = probe(path, batch)
            if r is None:
                print(f"{case.label:14s}  {path}: batch {batch} out of memory")
                continue
            add_row(path, batch, r)
            if best is None or batch > best[0]:
                best = (batch, r)
        if find_max and not naive and best is not None:
            add_row(path, *largest_batch(lambda b: probe(path, b), *best, args.max_batch), largest=True)
    return rows


def main(args: argparse.Namespace, argv: list[str] | None = None) -> list[dict]:
    """Measure every selected case under every decoding path; returns the rows (also printed)."""
    for flag in ("batch_sizes", "iters", "max_batch", "naive_max_batch", "image_size", "downsample_size",
                 "vocab_size", "num_classes"):
        values = getattr(args, flag)
        if min(values if isinstance(values, list) else [values]) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {values}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    device = torch.device(args.device)
    torch.manual_seed(0)
    grid = args.image_size // args.downsample_size
    precision = "bf16" if device.type == "cuda" and args.precision == "bf16" else "fp32"
    gbps, gbps_source = bandwidth(args, device)
    paths, notes = decode_paths(args.decode_paths, device)
    settings = (f"weights random, tokens only; {args.image_size} px ({grid}x{grid} tokens), size class {args.size}, "
                f"CFG {args.cfg_scale} (both halves), {precision}, warmup {args.warmup}, iters {args.iters}; "
                f"bandwidth {'n/a' if gbps is None else f'{gbps:g} GB/s'} ({gbps_source}); "
                f"decoding paths {', '.join(paths) or 'none'}; torch {torch.__version__}")
    print(f"bench_sample: {settings}; device {device_name(device)}")
    for note in notes:
        print(note)
    find_max = args.find_max_batch and device.type == "cuda"
    if args.find_max_batch and not find_max:
        print("--find-max-batch: CUDA only, skipped")
    print(console_line(columns(device)))
    rows: list[dict] = []
    ips: dict[tuple[str, str, int], float] = {}
    for case in [c for c in CASES if c.label in args.cases]:
        if device.type == "cuda":
            torch._dynamo.reset()  # the previous case's compiled steps
        rows += bench_case(case, args, device, paths, gbps, find_max, ips)
        gc.collect()  # the case's model, now unreferenced
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for line in legend(args, find_max):
        print(line)
    if args.results:
        write_results(args.results, rows, args, argv, device, settings, find_max)
        print(f"appended to {args.results}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", nargs="+", default=[c.label for c in CASES], choices=[c.label for c in CASES],
                   help="rows to measure (raster first: the others are compared with it)")
    p.add_argument("--decode-paths", nargs="+", default=["eager", "auto"], choices=DECODE_PATHS,
                   help="decoding paths to measure each case under (auto: compiled on CUDA, eager on CPU)")
    p.add_argument("--size", default="L", choices=["XL", "L", "B", "debug"],
                   help="size class of every model (XL: the GPT-XL cases only, e.g. PAR-XL-4x)")
    p.add_argument("--kernel-report", action="store_true",
                   help="per case, the attention kernel PyTorch runs for the model's real calls (eager, batch 2)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--find-max-batch", action="store_true",
                   help="CUDA: also find and report the largest batch that fits, per case and path")
    p.add_argument("--max-batch", type=int, default=2048, help="where --find-max-batch stops doubling")
    p.add_argument("--naive-max-batch", type=int, default=8, help="largest batch for the no-cache baseline")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--downsample-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CUDA only; CPU runs fp32")
    p.add_argument("--bandwidth-gbps", type=float, default=None,
                   help="peak memory bandwidth for the floor (default: the CUDA device's vendor figure)")
    p.add_argument("--results", default=None, help="append the run as a Markdown section to this file")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args(), sys.argv[1:])

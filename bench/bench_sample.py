"""Sampling speed per strategy: steps, images/s, latency per image, peak memory, beside baselines.

    python bench/bench_sample.py                                   # CPU: every registered strategy
    python bench/bench_sample.py --device cuda --batch-sizes 1 64  # the released-size comparison
    python bench/bench_sample.py --cases raster par-4x par-16x --image-size 128 --batch-sizes 1 4

Weights are random (speed does not depend on them; the output says so); tokens only, the tokenizer
is not run. Each case builds its strategy's model at the size class `--size` (L: GPT-L for
raster / PAR / NPP, ARPG-L, LPD-L, VAR-d16; the sizes the papers compare) and times
`strategy.generate` with CFG on (both halves, `--cfg-scale`), temperature 1, no filtering, after
`--warmup` untimed calls. Two baselines are measured in the same run: `raster` decoding of the
same size class (what every paper compares with) and `raster-naive`, the same model without a KV
cache (every step re-runs the whole prefix), which shows what the cache buys. Peak memory is
`torch.cuda.max_memory_allocated` on CUDA and the growth of the process's peak RSS on CPU (a
coarse figure). A case whose strategy is not registered is reported as skipped.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoregressive.sample.logits import cfg_labels, combine_cfg, sample_from_logits  # noqa: E402
from autoregressive.strategies import STRATEGIES, add_strategy_arguments, get_strategy  # noqa: E402


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
    Case("raster", "raster", {"L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"}),
    Case("raster-naive", "raster", {"L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"}),
    Case("par-4x", "par", {"L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"},
         {"spe_token_num": 3, "ar_token_num": 4}),
    Case("par-16x", "par", {"L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"},
         {"spe_token_num": 15, "ar_token_num": 16}),
    Case("npp", "npp", {"L": "GPT-L", "B": "GPT-B", "debug": "GPT-debug"}),
    Case("arpg-32", "arpg", {"L": "ARPG-L", "debug": "ARPG-debug"}, steps=32),
    Case("arpg-64", "arpg", {"L": "ARPG-L", "debug": "ARPG-debug"}, steps=64),
    Case("lpd-20", "lpd", {"L": "LPD-L", "debug": "LPD-debug"}, steps=20),
    Case("lpd-32", "lpd", {"L": "LPD-L", "debug": "LPD-debug"}, steps=32),
    Case("var", "var", {"L": "VAR-d16", "B": "VAR-d16", "debug": "VAR-debug"}, vocab_size=4096),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def generate_without_cache(model, labels: torch.Tensor, cfg_scale: float, generator: torch.Generator) -> torch.Tensor:
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
    """What a driver would pass to `strategy.configure`: the shared sizes, the strategy's own flags
    at their defaults, and the case's values."""
    p = argparse.ArgumentParser()
    add_strategy_arguments(p)
    args = p.parse_args([])
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
    strategy.configure(sargs)
    grid = args.image_size // args.downsample_size
    vocab = case.vocab_size or args.vocab_size
    if case.strategy == "var":  # next-scale inputs come from the VQVAE's codebook: a random one
        from tokenizer.msvq import build_msvq
        strategy.use_tokenizer(build_msvq(vocab_size=vocab, patch_nums=tuple(strategy.patch_nums)))
    model = strategy.build_model(case.sizes[size], vocab_size=vocab, block_size=grid * grid,
                                 num_classes=args.num_classes, **strategy.model_config(sargs))
    for p in model.parameters():  # informative logits (some official inits zero the head)
        torch.nn.init.normal_(p, std=0.02)
    dtype = torch.bfloat16 if (device.type == "cuda" and args.precision == "bf16") else torch.float32
    model = model.to(device=device, dtype=dtype).eval()
    if case.label == "raster-naive":
        def run(labels, gen):
            return generate_without_cache(model, labels, args.cfg_scale, gen)
        steps = grid * grid
    else:
        def run(labels, gen):
            return strategy.generate(model, labels, cfg_scale=args.cfg_scale, temperature=1.0,
                                     steps=case.steps, generator=gen)
        steps = strategy.decoding_steps(model, case.steps)
    return strategy, model, run, steps


def measure(run, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds per generate call (mean of --iters after --warmup) and peak memory."""
    labels = torch.arange(batch, device=device) % args.num_classes
    gen = torch.Generator(device=device).manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = peak_rss_mb()
    for _ in range(args.warmup):
        tokens = run(labels, gen)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        tokens = run(labels, gen)
    sync(device)
    seconds = (time.perf_counter() - t0) / args.iters
    assert tokens.shape[0] == batch
    mem = (torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak_rss_mb() - rss0)
    return {"seconds": seconds, "images_per_s": batch / seconds, "latency_per_image": seconds / batch,
            "peak_mem_mb": mem}


def main(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    torch.manual_seed(0)
    grid = args.image_size // args.downsample_size
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench_sample: weights random, tokens only; {args.image_size} px ({grid}x{grid} tokens), "
          f"size class {args.size}, CFG {args.cfg_scale} (both halves), device {name}, "
          f"{'bf16' if device.type == 'cuda' and args.precision == 'bf16' else 'fp32'}")
    mem_label = "peak MiB" if device.type == "cuda" else "peak RSS +MiB"
    print(f"{'case':14s} {'model':10s} {'batch':>5s} {'steps':>5s} {'images/s':>10s} {'s/image':>9s} "
          f"{mem_label:>13s} {'vs raster':>9s}")
    rows, raster_speed = [], {}
    selected = [c for c in CASES if c.label in args.cases]
    for case in selected:
        try:
            built = build_case(case, args.size, args, device)
        except ValueError as e:  # e.g. more decoding steps than tokens at a small --image-size
            built = str(e)
        if isinstance(built, str):
            print(f"{case.label:14s} skipped: {built}")
            continue
        _, model, run, steps = built
        for batch in args.batch_sizes:
            if case.label == "raster-naive" and batch > args.naive_max_batch:
                continue
            r = measure(run, batch, args, device)
            if case.label == "raster":
                raster_speed[batch] = r["images_per_s"]
            ratio = r["images_per_s"] / raster_speed[batch] if batch in raster_speed else float("nan")
            row = {"case": case.label, "model": case.sizes[args.size], "batch": batch, "steps": steps,
                   **r, "speedup_vs_raster": ratio}
            rows.append(row)
            print(f"{case.label:14s} {row['model']:10s} {batch:5d} {steps:5d} {r['images_per_s']:10.2f} "
                  f"{r['latency_per_image']:9.4f} {r['peak_mem_mb']:13.1f} {ratio:8.2f}x")
        del model
    print("baselines: 'raster' (the same size class, KV cache) and 'raster-naive' (no KV cache), "
          "measured above in this run")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--cases", nargs="+", default=[c.label for c in CASES], choices=[c.label for c in CASES],
                   help="rows to measure (raster first: the others are compared with it)")
    p.add_argument("--size", default="L", choices=["L", "B", "debug"], help="size class of every model")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--naive-max-batch", type=int, default=8, help="largest batch for the no-cache baseline")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--downsample-size", type=int, default=16)
    p.add_argument("--vocab-size", type=int, default=16384)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--cfg-scale", type=float, default=1.5)
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="CUDA only; CPU runs fp32")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=2)
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())

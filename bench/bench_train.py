"""Training throughput and compute: raster (LlamaGen next-token) against NPP, same model, same run.

    python bench/bench_train.py                                        # GPT-B, 256 px, batch 4, CPU
    python bench/bench_train.py --device cuda --precision bf16 --batch-size 64 --compile
    python bench/bench_train.py --gpt-model GPT-debug --image-size 64 --vocab-size 64 --num-classes 10 --iters 2
    python bench/bench_train.py --patch-level 4 --epoch-rate 0.67      # the official FSDP defaults

One optimizer step = forward, loss, backward, gradient clipping and an AdamW step, as the training
driver does (`strategy.training_loss`); weights are random (speed does not depend on them). The
raster row is the baseline; NPP gets one row per patch stage of `--patch-level`, and a summary
weights each stage by its share of `--epochs` (`--epoch-rate`), which is where the paper's ~0.6x
training cost comes from. Each row runs `--warmup` untimed steps first (torch.compile happens there),
then `--iters` timed steps (the median is reported), synchronising CUDA before every clock read.

Figures:
- codes/s: image codes consumed per second (B * N per step, whatever the sequence length);
- GFLOP/step: analytic training FLOPs, 6 * T * W + 12 * n_layer * T^2 * dim per sequence of T
  positions (W = the weights of every matmul, embeddings excluded; attention counted as a full
  T x T square) — `--check-flops` compares the matmul part with torch's FlopCounterMode;
- PFLOP/epoch and h/epoch: one pass over `--dataset-size` images (ImageNet train by default) at
  that row's cost; for NPP's summary, averaged over the whole schedule.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoregressive.models.gpt import GPT_SIZES  # noqa: E402
from autoregressive.strategies import get_strategy  # noqa: E402
from autoregressive.strategies.npp_schedule import training_flops_fraction  # noqa: E402
from utils.training import make_adamw  # noqa: E402
from utils.cli import run_cli  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_weights(model: torch.nn.Module) -> int:
    """W: the parameters of every Linear (blocks and output head); embeddings and norms excluded."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def train_flops(model: torch.nn.Module, seq_len: int, batch: int) -> float:
    """Analytic FLOPs of one training step (forward + backward) over `batch` sequences of `seq_len`."""
    c = model.config
    return batch * (6 * seq_len * matmul_weights(model) + 12 * c.n_layer * seq_len ** 2 * c.dim)


def counted_matmul_flops(model, strategy, codes, labels) -> int:
    """torch's FlopCounterMode over one forward + backward (it counts the matmuls)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        strategy.training_loss(model, codes, labels).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def time_steps(model, strategy, codes, labels, args, device) -> float:
    """Median seconds per optimizer step over `--iters` steps after `--warmup` dropped steps."""
    optimizer = make_adamw(model, 1e-4, 5e-2, (0.9, 0.95), device.type)
    amp = (torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" else nullcontext())
    fn = torch.compile(model) if args.compile else model

    def step():
        with amp:
            loss = strategy.training_loss(fn, codes, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.iters):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(args: argparse.Namespace) -> None:
    # -- setup ------------------------------------------------------------------------------------
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    device = torch.device(args.device)
    grid = args.image_size // args.downsample_size
    n = grid * grid
    config = dict(vocab_size=args.vocab_size, block_size=n, num_classes=args.num_classes)
    raster, npp = get_strategy("raster"), get_strategy("npp")
    npp.configure(argparse.Namespace(image_size=args.image_size, downsample_size=args.downsample_size,
                                     patch_level=args.patch_level, epochs=args.epochs,
                                     epoch_rate=args.epoch_rate, scheduler=False), training=True)
    schedule = npp.schedule
    gen = torch.Generator().manual_seed(args.seed)
    codes = torch.randint(0, args.vocab_size, (args.batch_size, n), generator=gen).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=gen).to(device)
    torch.manual_seed(args.seed)
    npp_model = npp.build_model(args.gpt_model, **config).to(device).train()
    raster_model = raster.build_model(args.gpt_model, **config).to(device).train()
    raster_model.load_state_dict(npp_model.state_dict())  # the same weights: only the strategy differs
    n_params = sum(p.numel() for p in npp_model.parameters())
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"training bench: {args.gpt_model} ({n_params / 1e6:.1f}M params), {args.image_size} px -> "
          f"{grid}x{grid} codes, batch {args.batch_size}, weights random")
    print(f"device {device} ({device_name}), torch {torch.__version__}, precision {args.precision}, "
          f"compile {args.compile}, warm-up {args.warmup} (dropped), {args.iters} timed steps; "
          f"epoch = {args.dataset_size:,} images")
    print(f"{'row':<14} {'seq':>5} {'codes/s':>10} {'ms/step':>9} {'GFLOP/step':>11} {'PFLOP/epoch':>12} "
          f"{'h/epoch':>9}  vs raster")

    # -- rows: raster (baseline), then every NPP stage ---------------------------------------------
    rows = [("raster", raster, raster_model, None, n)]
    rows += [(f"npp P={p}", npp, npp_model, p, n // p) for p in schedule.patch_sizes]
    base = None
    per_patch: dict[int, tuple[float, float]] = {}
    for name, strategy, model, p, seq in rows:
        if p is not None:
            npp.patch_size = p
        if args.check_flops:
            counted = counted_matmul_flops(model, strategy, codes, labels)
            expected = args.batch_size * 6 * seq * matmul_weights(model)
            if counted != expected:
                raise SystemExit(f"{name}: FlopCounterMode counted {counted} matmul FLOPs, the formula {expected}")
        sec = time_steps(model, strategy, codes, labels, args, device)
        flops = train_flops(model, seq, args.batch_size)
        epoch_flops = flops / args.batch_size * args.dataset_size
        epoch_hours = sec / args.batch_size * args.dataset_size / 3600
        if base is None:
            base, vs = (epoch_flops, epoch_hours), "(baseline)"
        else:
            vs = f"FLOPs {epoch_flops / base[0]:.3f}x, time {epoch_hours / base[1]:.3f}x"
            per_patch[p] = (epoch_flops, epoch_hours)
        print(f"{name:<14} {seq:>5} {args.batch_size * n / sec:>10.1f} {sec * 1e3:>9.1f} {flops / 1e9:>11.2f} "
              f"{epoch_flops / 1e15:>12.4f} {epoch_hours:>9.3f}  {vs}")

    # -- NPP over its whole schedule, per epoch on average ----------------------------------------
    shares = [(p, (end - start) / args.epochs) for i, p in enumerate(schedule.patch_sizes)
              for start, end in [schedule.stage_bounds(i)]]
    avg_flops = sum(share * per_patch[p][0] for p, share in shares)
    avg_hours = sum(share * per_patch[p][1] for p, share in shares)
    stages = ", ".join(f"P={p} {share:.0%}" for p, share in shares)
    print(f"npp schedule (--patch-level {args.patch_level} --epoch-rate {args.epoch_rate}, {stages}): "
          f"{avg_flops / 1e15:.4f} PFLOP/epoch, {avg_hours:.3f} h/epoch on average = FLOPs "
          f"{avg_flops / base[0]:.3f}x, time {avg_hours / base[1]:.3f}x raster "
          f"(linear-in-length estimate {training_flops_fraction(schedule):.3f}x)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Model
    parser.add_argument("--gpt-model", choices=list(GPT_SIZES), default="GPT-B")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--downsample-size", type=int, default=16)
    parser.add_argument("--vocab-size", type=int, default=16384)
    parser.add_argument("--num-classes", type=int, default=1000)
    # NPP schedule (official defaults of train_c2i.py)
    parser.add_argument("--patch-level", type=int, default=2)
    parser.add_argument("--epoch-rate", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--dataset-size", type=int, default=IMAGENET_TRAIN, help="images per epoch")
    # Workload
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=3, help="timed optimizer steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row (dropped)")
    parser.add_argument("--seed", type=int, default=0)
    # Execution
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                        help="bf16 = torch.autocast(bfloat16) around the forward and loss")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (recompiles per patch size)")
    parser.add_argument("--check-flops", action="store_true",
                        help="check the analytic matmul FLOPs against torch's FlopCounterMode first")
    return parser


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())

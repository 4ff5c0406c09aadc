"""Plan a training run before launching it: time a few real steps in one process, project the rest.

`--estimate` of both trainers (`autoregressive/train/train_c2i.py`, `tokenizer/train_vq.py`) builds
the model, the data loader and the optimizer as the real run would and hands `run_plan` a `Plan`:
one real optimizer step per call (real batches, real loss, real update of an in-memory state that
is never saved) for each `Phase` of the run whose steps cost the same (NPP's patch stages, the
tokenizer's steps before and after the discriminator starts). The planner times them after untimed
warm-up steps, reads the peak memory, on CUDA searches the largest micro-batch that fits, and
prints the projected wall time on 1 to 64 GPUs. Nothing is written to disk.

The projection is plain data parallelism at the measured per-GPU micro-batch with perfect linear
scaling: G GPUs take G times the measured samples per second, gradient communication and input
stalls hidden. Real runs lose some of that, so the times are lower bounds.
"""
from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import torch
import torch.distributed as dist

from utils.distributed import DistInfo, init_distributed
from utils.memory import peak_memory_bytes

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Phase:
    """A stretch of the run whose steps cost the same.

    `step()` runs one real optimizer step and returns the tokens it consumed; `run_steps(gpus)` is
    the number of the run's optimizer steps in this phase on `gpus` GPUs (ValueError: the run
    cannot be launched there); `begin()` moves the in-memory state into the phase (e.g. NPP's
    stage); `try_micro_batch(k)` runs one step at micro-batch k, for the CUDA memory search."""

    name: str
    step: Callable[[], int]
    run_steps: Callable[[int], int]
    begin: Callable[[], None] | None = None
    try_micro_batch: Callable[[int], None] | None = None


@dataclass
class Plan:
    """What a trainer hands the planner (see the module docstring)."""

    title: str
    parameters: dict[str, int]
    phases: list[Phase]
    global_batch: int
    micro_batch: int  # per GPU, what the measured steps use
    accumulation: int  # micro-batches per optimizer step in the measured steps
    can_accumulate: bool  # the trainer has --gradient-accumulation-steps
    device: torch.device
    precision: str
    warmup: int  # untimed steps per phase (2 with torch.compile)
    run_summary: str  # how the run's total steps follow from its flags, on one GPU
    after_oom: Callable[[], None] = lambda: None  # drop gradients / scaler state a failed step left
    notes: list[str] = field(default_factory=list)


@dataclass
class PhaseTiming:
    """Seconds and tokens per optimizer step of one phase on this device (None: did not fit)."""

    name: str
    seconds_per_step: float | None
    tokens_per_step: float
    peak_memory: int | None = None  # CUDA only: bytes allocated at most during this phase


@dataclass
class Row:
    """One line of the projection table: the run on `gpus` GPUs (None fields: cannot run there)."""

    gpus: int
    micro_batch: int | None = None
    accumulation: int | None = None
    steps: int | None = None
    seconds: float | None = None
    tokens_per_s: float | None = None
    smaller_micro_batch: bool = False
    why_not: str = ""
    fit_split: tuple[int, int] | None = None  # CUDA: micro-batch x accumulation at the largest fit


# ---------------------------------------------------------------------------------------------
# One process, measurements
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_process(device: str | None, process_group: bool) -> Iterator[DistInfo]:
    """The planner's process: never torchrun (the projection covers the GPU counts); FSDP gets a
    1-rank process group of its own so that the model is wrapped as the real run wraps it."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("--estimate runs in one process: start it with python, not torchrun "
                         "(it projects the run over 1 to 64 GPUs itself)")
    info = init_distributed(device)
    started = False
    if process_group and not dist.is_initialized():
        dist.init_process_group("nccl" if info.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
        started = True
    try:
        yield info
    finally:
        if started:
            dist.destroy_process_group()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_phase(phase: Phase, steps: int, warmup: int, device: torch.device) -> PhaseTiming:
    """`warmup` untimed steps (allocation, torch.compile, DataLoader workers), then `steps` timed
    ones: mean seconds and tokens per step, and on CUDA the phase's peak allocated memory."""
    if phase.begin is not None:
        phase.begin()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        phase.step()
    sync(device)
    t0, tokens = time.perf_counter(), 0
    for _ in range(steps):
        tokens += phase.step()
    sync(device)
    elapsed = max(time.perf_counter() - t0, 1e-9)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return PhaseTiming(phase.name, elapsed / steps, tokens / steps, peak)


def fits(try_micro_batch: Callable[[int], None], k: int, device: torch.device, after_oom: Callable[[], None]) -> bool:
    """Whether one real step at micro-batch `k` runs without CUDA running out of memory."""
    ok = True
    try:
        try_micro_batch(k)
        sync(device)
    except torch.cuda.OutOfMemoryError:
        ok = False
    if not ok:  # outside the except block: the traceback's frames (and their tensors) are gone
        after_oom()
        gc.collect()
        torch.cuda.empty_cache()
    return ok


def largest_micro_batch(try_step: Callable[[int], bool], limit: int) -> int:
    """The largest k in [1, limit] with `try_step(k)` True (0 when even 1 fails), assuming that a
    micro-batch fits when a larger one does: doubling from 1, then bisection."""
    good, bad, k = 0, None, 1
    while k <= limit:
        if not try_step(k):
            bad = k
            break
        good, k = k, k * 2
    if bad is None:
        if good == limit:
            return good
        if try_step(limit):
            return limit
        bad = limit
    while bad - good > 1:
        mid = (good + bad) // 2
        if try_step(mid):
            good = mid
        else:
            bad = mid
    return good


# ---------------------------------------------------------------------------------------------
# Projection
# ---------------------------------------------------------------------------------------------


def batch_split(global_batch: int, gpus: int, micro_cap: int, can_accumulate: bool) -> tuple[int, int] | None:
    """(micro-batch, accumulation) of the global batch on `gpus` GPUs with micro-batches of at
    most `micro_cap` (the fewest micro-batches that do; without accumulation the whole per-GPU
    share); None when the global batch does not divide over the GPUs."""
    if global_batch % gpus:
        return None
    share = global_batch // gpus
    if not can_accumulate:
        return share, 1
    for accumulation in range(1, share + 1):
        if share % accumulation == 0 and share // accumulation <= micro_cap:
            return share // accumulation, accumulation
    return None  # micro_cap < 1


def project(plan: Plan, timings: list[PhaseTiming], largest: int | None,
            gpu_counts: tuple[int, ...] = GPU_COUNTS) -> list[Row]:
    """The run's steps, wall time and speed on each GPU count: every phase's steps there times its
    measured seconds per step on one GPU, divided by the GPU count (linear scaling)."""
    rows = []
    for gpus in gpu_counts:
        row = Row(gpus)
        rows.append(row)
        split = batch_split(plan.global_batch, gpus, plan.micro_batch, plan.can_accumulate)
        if split is None:
            row.why_not = f"global batch {plan.global_batch} does not divide over {gpus} GPUs"
            continue
        row.micro_batch, row.accumulation = split
        row.smaller_micro_batch = row.micro_batch < plan.micro_batch
        if largest is not None:
            row.fit_split = batch_split(plan.global_batch, gpus, largest, plan.can_accumulate)
        try:
            steps = [phase.run_steps(gpus) for phase in plan.phases]
        except ValueError as e:
            row.why_not = str(e).split(":")[0]
            continue
        row.steps = sum(steps)
        row.seconds = sum(n * t.seconds_per_step for n, t in zip(steps, timings)) / gpus
        tokens = sum(n * t.tokens_per_step for n, t in zip(steps, timings))
        row.tokens_per_s = tokens / row.seconds if row.seconds > 0 else None
    return rows


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def human_time(seconds: float) -> str:
    """12.3s, 14m 03s, 5h 12m, 3d 04h."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, s = divmod(int(round(seconds)), 60)
    hours, m = divmod(minutes, 60)
    days, h = divmod(hours, 24)
    if days:
        return f"{days}d {h:02d}h"
    if hours:
        return f"{hours}h {m:02d}m"
    return f"{m}m {s:02d}s"


def human_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def report(plan: Plan, timings: list[PhaseTiming], steps: int, memory: str, largest: int | None,
           rows: list[Row]) -> str:
    """The plan as text: parameters, memory, measured speed, the run's steps, the projection table."""
    where = "one GPU" if plan.device.type == "cuda" else f"one GPU (here the {plan.device.type.upper()})"
    lines = [f"run plan: {plan.title}",
             f"measured in one process on {plan.device} ({plan.precision}); the figures are for {where}: "
             f"micro-batch {plan.micro_batch} x {plan.accumulation} accumulation = global batch {plan.global_batch}"]
    lines.append("parameters: " + ", ".join(f"{name} {n:,}" for name, n in plan.parameters.items()))
    lines.append(f"peak memory: {memory}")
    lines.append(f"timing: {steps} real optimizer step(s) per phase after {plan.warmup} untimed warm-up step(s) "
                 f"(allocation, DataLoader start-up{', torch.compile' if plan.warmup > 1 else ''}); "
                 f"real data loader, loss and update, nothing saved")
    for t in timings:
        name = f" [{t.name}]" if t.name else ""
        samples = plan.global_batch / t.seconds_per_step
        mem = f", peak {human_bytes(t.peak_memory)}" if t.peak_memory is not None else ""
        lines.append(f"measured{name} {1 / t.seconds_per_step:.3g} steps/s, {human_rate(samples)} samples/s, "
                     f"{human_rate(t.tokens_per_step / t.seconds_per_step)} tokens/s{mem}")
    lines.append(f"run: {plan.run_summary}")
    if largest == 0:
        lines.append("largest micro-batch per GPU that fits: none (a micro-batch of 1 runs out of memory)")
    elif largest is not None:
        one = batch_split(plan.global_batch, 1, largest, plan.can_accumulate)
        implied = (f"gradient accumulation {one[1]} (micro-batch {one[0]}) for the global batch "
                   f"{plan.global_batch} on one GPU" if one and plan.can_accumulate else
                   "this trainer does not accumulate: each GPU takes global batch / GPUs")
        lines.append(f"largest micro-batch per GPU that fits: {largest} (doubling, then bisection, up to "
                     f"{plan.global_batch}): {implied}; per GPU count in the last column")
    else:
        lines.append("largest micro-batch per GPU: searched on CUDA only (run --estimate on the target GPU)")
    lines += [f"note: {n}" for n in plan.notes]
    lines.append("")
    lines.append("projection (linear data-parallel scaling at the same per-GPU micro-batch: G GPUs take G times "
                 "the measured samples/s; communication and input stalls assumed hidden, so the times are "
                 "lower bounds):")
    head = f"{'GPUs':>5} {'micro x accum':>14} {'steps':>12} {'steps/s':>9} {'tokens/s':>14} {'wall time':>10}"
    if largest is not None:
        head += f" {'fits: micro x accum':>20}"
    lines.append(head)
    for r in rows:
        if r.micro_batch is None or r.seconds is None:
            lines.append(f"{r.gpus:>5}  -- {r.why_not}")
            continue
        split = f"{r.micro_batch} x {r.accumulation}{'*' if r.smaller_micro_batch else ' '}"
        line = (f"{r.gpus:>5} {split:>14} {r.steps:>12,} {r.steps / r.seconds if r.seconds else 0:>9.3g} "
                f"{human_rate(r.tokens_per_s or 0):>14} {human_time(r.seconds):>10}")
        if largest is not None:
            fit = r.fit_split
            line += f" {f'{fit[0]} x {fit[1]}' if fit and fit[0] <= largest else 'does not fit':>20}"
        lines.append(line)
    if any(r.smaller_micro_batch for r in rows):
        how = ": --gradient-accumulation-steps k measures global batch / k" if plan.can_accumulate else ""
        lines.append(f"* the per-GPU micro-batch there is below the measured {plan.micro_batch}: the row assumes "
                     f"the same speed per sample (optimistic; measure at that micro-batch to be sure{how})")
    return "\n".join(lines)


def run_plan(plan: Plan, steps: int, out: TextIO | None = None, search: bool | None = None) -> list[Row]:
    """Time every phase that has steps in the run, search the largest micro-batch (`search`, default
    on CUDA, where running out of memory is an exception to catch), print the report to `out`
    (stdout); returns the projection rows (none when the requested micro-batch does not fit)."""
    if steps < 1:
        raise ValueError(f"--estimate-steps must be >= 1, got {steps}")
    out = out if out is not None else sys.stdout
    device = plan.device
    search = device.type == "cuda" if search is None else search
    phases = [p for p in plan.phases if p.run_steps(1) > 0] or plan.phases[:1]
    plan.phases = phases
    timings: list[PhaseTiming] = []
    too_big = None
    for phase in phases:
        try:
            timings.append(time_phase(phase, steps, plan.warmup, device))
        except torch.cuda.OutOfMemoryError:
            too_big = phase.name
            break
    if too_big is not None:  # outside the except block: release what the failed step held
        plan.after_oom()
        gc.collect()
        torch.cuda.empty_cache()
    largest = None
    if search:
        searched = max(timings, key=lambda t: t.peak_memory or 0).name if timings and too_big is None else too_big
        phase = next(p for p in phases if p.name == searched)
        if phase.try_micro_batch is not None:
            if phase.begin is not None:
                phase.begin()
            largest = largest_micro_batch(lambda k: fits(phase.try_micro_batch, k, device, plan.after_oom),
                                          plan.global_batch)
    if device.type == "cuda":
        memory = (f"{human_bytes(max(t.peak_memory or 0 for t in timings))} per GPU "
                  f"(torch.cuda.max_memory_allocated, the costliest phase)") if timings else "n/a"
    else:
        memory = (f"{human_bytes(peak_memory_bytes('cpu'))} (peak RSS of this process, ru_maxrss: a CPU run; "
                  f"includes Python and the data, not DataLoader workers)")
    if too_big is not None:
        fix = ""
        if largest:
            split = batch_split(plan.global_batch, 1, largest, plan.can_accumulate)
            fix = (f"; the largest that fits is {largest}"
                   + (f": pass --gradient-accumulation-steps {split[1]} (micro-batch {split[0]}) or more GPUs"
                      if plan.can_accumulate and split else ": spread the global batch over more GPUs"))
        elif largest == 0:
            fix = "; not even a micro-batch of 1 fits"
        print(f"run plan: {plan.title}\nthe micro-batch {plan.micro_batch} does not fit on this GPU"
              f"{f' (phase {too_big})' if too_big else ''}{fix}; nothing was timed", file=out)
        return []
    rows = project(plan, timings, largest)
    print(report(plan, timings, steps, memory, largest, rows), file=out, flush=True)
    return rows

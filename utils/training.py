"""Pieces of a training loop shared by every trainer: optimizer, precision, guards, data order, logs.

The GPT driver (every strategy) and the tokenizer driver build on these, so weight-decay groups,
autocast, non-finite handling, resumable data order and metric logging exist once.
"""
from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import Sampler


# ---------------------------------------------------------------------------------------------
# Optimizer and precision
# ---------------------------------------------------------------------------------------------


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
               device_type: str = "cpu") -> torch.optim.AdamW:
    """AdamW with decay on weights of ndim >= 2 (Linear, Embedding) and none on norms/biases,
    as LlamaGen's (nanoGPT's) `configure_optimizers`; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=(device_type == "cuda") or None)


PRECISIONS = {"none": None, "fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_context(device: torch.device, precision: str):
    """Autocast for bf16/fp16 on CUDA; a no-op on CPU (everything runs in float32 there)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown --mixed-precision {precision!r}; known: {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is active only for fp16 on CUDA (bf16 and fp32 need none)."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16" and device.type == "cuda"))


# ---------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------


class NonFiniteLossError(RuntimeError):
    pass


class NonFiniteGuard:
    """Skip steps whose loss is NaN/Inf, count them, and stop after `max_consecutive` in a row."""

    def __init__(self, max_consecutive: int = 10):
        self.max_consecutive = max_consecutive
        self.total = 0
        self.consecutive = 0

    def check(self, finite: bool | torch.Tensor, step: int) -> bool:
        """True when the step may proceed; False when it is skipped. `finite` is a flag or the loss
        itself; pass a flag agreed over ranks so that every rank skips the same steps."""
        if isinstance(finite, torch.Tensor):
            finite = bool(torch.isfinite(finite).all())
        if finite:
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive >= self.max_consecutive:
            raise NonFiniteLossError(
                f"the loss was not finite for {self.consecutive} steps in a row (last at step {step}, "
                f"{self.total} in total): lower --lr, use --mixed-precision bf16 instead of fp16, or "
                f"check the data"
            )
        return False

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.consecutive = int(state["total"]), int(state["consecutive"])


# ---------------------------------------------------------------------------------------------
# Data order that survives a restart
# ---------------------------------------------------------------------------------------------


class ResumableDistributedSampler(Sampler[int]):
    """DistributedSampler semantics (seeded shuffle per epoch, rank r takes r, r+W, ..., drop_last)
    that can start in the middle of an epoch, so a resumed run sees exactly the remaining batches."""

    def __init__(self, dataset_len: int, rank: int, world_size: int, batch_size: int,
                 seed: int = 0, shuffle: bool = True):
        self.n, self.rank, self.world = dataset_len, rank, world_size
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_per_rank = dataset_len // world_size  # drop_last over ranks
        self.batches_per_epoch = self.num_per_rank // batch_size  # drop_last batches
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{dataset_len} items over {world_size} rank(s) do not fill one batch of {batch_size} "
                f"per rank: lower --global-batch-size or add data"
            )
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        mine = order[: self.num_per_rank * self.world][self.rank:: self.world]
        mine = mine[: self.batches_per_epoch * self.batch_size]
        return iter(mine[self.start_batch * self.batch_size:].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


# ---------------------------------------------------------------------------------------------
# Metrics: console, log file, TensorBoard
# ---------------------------------------------------------------------------------------------


class MetricsWriter:
    """Writes scalars to the logger (console + `log.txt`) and to TensorBoard when it is installed."""

    def __init__(self, logger, log_dir: str | Path | None, enabled: bool = True):
        self.logger, self.tb = logger, None
        if enabled and log_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))
            except (ImportError, ModuleNotFoundError):
                self.logger.info("tensorboard is not installed: scalars go to the console and log.txt")

    def write(self, step: int, scalars: dict[str, float]) -> None:
        text = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in scalars.items())
        self.logger.info(f"(step={step:07d}) {text}")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Throughput:
    """Items per second between two reads, synchronising CUDA before reading the clock."""

    def __init__(self, device: torch.device):
        self.device, self.t0, self.count = device, time.perf_counter(), 0

    def add(self, n: int) -> None:
        self.count += n

    def read_and_reset(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        rate = self.count / max(t - self.t0, 1e-9)
        self.t0, self.count = t, 0
        return rate


# ---------------------------------------------------------------------------------------------
# Run folders and RNG state
# ---------------------------------------------------------------------------------------------


def new_run_dir(results_dir: str | Path, name: str) -> Path:
    """`<results>/<NNN>-<name>` with NNN one past the highest existing index (DiT/LlamaGen layout)."""
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    indices = [int(p.name.split("-", 1)[0]) for p in results_dir.iterdir()
               if p.is_dir() and p.name.split("-", 1)[0].isdigit()]
    run = results_dir / f"{(max(indices) + 1) if indices else 0:03d}-{name}"
    run.mkdir(parents=True)
    return run


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint `<run>/checkpoints/<steps:07d>.pt` (atomic writes mean every
    file under its final name is complete), or None."""
    ckpts = sorted((Path(run_dir) / "checkpoints").glob("[0-9]" * 7 + ".pt"))
    return ckpts[-1] if ckpts else None


def rng_state() -> dict:
    """This process's RNG states (CPU and, when present, the current CUDA device)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def gather_rng_states() -> list[dict]:
    """Every rank's RNG state, gathered on all ranks (rank 0 stores them in the checkpoint)."""
    from utils.distributed import all_gather_object

    return all_gather_object(rng_state())


LR_SCHEDULES = ("constant", "cosine", "constant+cosine")


def scheduled_lr(step: int, steps_per_epoch: int, base_lr: float, schedule: str = "constant",
                 warmup_epochs: float = 0.0, min_lr: float = 0.0, epochs: float = 1.0,
                 decay_start_epoch: float | None = None) -> float:
    """Learning rate of optimizer step `step` at the fractional epoch e = step / steps_per_epoch.

    Linear warm-up `base_lr * e / warmup_epochs` while e < warmup_epochs, then `constant`: base_lr;
    `cosine` (ARPG): half-cosine from base_lr to min_lr between the end of the warm-up and
    `epochs`; `constant+cosine` (LPD): base_lr until `decay_start_epoch`, then the half-cosine.
    A pure function of the step, so a resumed run continues the schedule exactly.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown --lr-schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")
    e = step / steps_per_epoch
    if e < warmup_epochs:
        return base_lr * e / warmup_epochs
    if schedule == "constant":
        return base_lr
    start = warmup_epochs if schedule == "cosine" or decay_start_epoch is None else max(decay_start_epoch,
                                                                                         warmup_epochs)
    if e < start:
        return base_lr
    progress = min((e - start) / max(epochs - start, 1e-12), 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

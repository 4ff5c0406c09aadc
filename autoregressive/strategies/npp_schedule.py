"""NPP's coarse-to-fine patch-size schedule and its per-stage learning-rate schedule, as pure functions.

Written from the official code (`autoregressive/train/train_c2i.py` of
PKU-YuanGroup/Next-Patch-Prediction, the inline stage code and `create_scheduler`). Both are
functions of the epoch / optimizer step only, so a run resumed from any step recomputes exactly
the stage and learning rate of the uninterrupted run (the official script restarts its LambdaLR at
step 0 on resume, as its checkpoints do not hold the scheduler; we do not).
"""
from __future__ import annotations

from dataclasses import dataclass

#: --patch-level -> the stage patch sizes, coarse to fine (any level <= 1 trains at P = 1 only).
PATCH_SIZES = {2: (4, 1), 3: (16, 4, 1), 4: (64, 16, 4, 1)}
MAX_PATCH_LEVEL = 4


@dataclass(frozen=True)
class PatchSchedule:
    """Stage i trains with patch size `patch_sizes[i]` for the epochs [ends[i-1], ends[i]) (ends[-1] = 0)."""

    patch_sizes: tuple[int, ...]
    epoch_ends: tuple[int, ...]

    def stage_at(self, epoch: int) -> int:
        """The stage of epoch `epoch` (0-based): the first whose end is > epoch (official `get_patch_size`)."""
        for i, end in enumerate(self.epoch_ends):
            if epoch < end:
                return i
        raise ValueError(f"epoch {epoch} is past the last stage (training ends at epoch {self.epoch_ends[-1]})")

    def patch_size_at(self, epoch: int) -> int:
        return self.patch_sizes[self.stage_at(epoch)]

    def stage_bounds(self, stage: int) -> tuple[int, int]:
        """[start, end) epochs of a stage."""
        return (self.epoch_ends[stage - 1] if stage > 0 else 0), self.epoch_ends[stage]


def patch_schedule(patch_level: int, epochs: int, epoch_rate: float) -> PatchSchedule:
    """The official stages: level L in 2..4 -> ends `[int(E * r^i) for i < L][::-1]`; level <= 1 -> [E].

    E = 300, r = 0.5, L = 4 -> P 64, 16, 4, 1 ending at epochs 37, 75, 150, 300.
    """
    if patch_level > MAX_PATCH_LEVEL:
        raise ValueError(f"--patch-level {patch_level} is not supported (at most {MAX_PATCH_LEVEL}: "
                         f"patch sizes 64, 16, 4, 1)")
    if patch_level < 0:
        raise ValueError(f"--patch-level must be >= 0 (0 or 1 = plain next-token training), got {patch_level}")
    if not 0.0 < epoch_rate <= 1.0:
        raise ValueError(f"--epoch-rate must lie in (0, 1], got {epoch_rate}")
    if epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {epochs}")
    if patch_level not in PATCH_SIZES:
        return PatchSchedule((1,), (int(epochs),))
    ends = [int(epochs * epoch_rate ** i) for i in range(patch_level)][::-1]
    return PatchSchedule(PATCH_SIZES[patch_level], tuple(ends))


def lr_multiplier(step: int, steps_per_epoch: int, schedule: PatchSchedule, warmup_epochs: float,
                  decay_ratio: float, base_lr: float, end_lr: float) -> float:
    """lr(step) / base_lr of the official `create_scheduler`: each patch stage is its own segment.

    For a stage of S steps starting at step s, u = step - s, W = warmup_epochs * steps_per_epoch,
    Dc = S * decay_ratio, C = S - W - Dc: u / max(1, W) while u < W (linear warmup from 0 at every
    stage start), 1 while u < W + C, then linear decay to end_lr over the last Dc steps.
    The arithmetic follows the official order of operations (exact in float64).
    """
    epoch = step // steps_per_epoch
    start_epoch, end_epoch = schedule.stage_bounds(schedule.stage_at(epoch))
    start = start_epoch * steps_per_epoch
    seg_steps = end_epoch * steps_per_epoch - start
    decay_steps = seg_steps * decay_ratio
    warmup_steps = warmup_epochs * steps_per_epoch
    constant_steps = seg_steps - warmup_steps - decay_steps
    if step < start + warmup_steps:
        return float(step - start) / float(max(1, warmup_steps))
    if step < start + warmup_steps + constant_steps:
        return 1.0
    progress = float(step - (start + warmup_steps + constant_steps)) / float(decay_steps)
    return (end_lr + (base_lr - end_lr) * max(0.0, 1.0 - progress)) / base_lr


def training_flops_fraction(schedule: PatchSchedule) -> float:
    """Training compute relative to next-token training for the same epochs (cost linear in the
    sequence length, as in NPP's ~0.6x claim): sum over stages of epochs / P, over E. L=2, r=0.5 -> 0.625."""
    total = sum((end - start) / p for p, (start, end) in
                zip(schedule.patch_sizes, (schedule.stage_bounds(i) for i in range(len(schedule.patch_sizes)))))
    return total / schedule.epoch_ends[-1]

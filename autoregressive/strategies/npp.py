"""`npp`: next-patch prediction (Pang et al. 2024), a coarse-to-fine training strategy over LlamaGen.

Only training differs from `raster` (official: PKU-YuanGroup/Next-Patch-Prediction): during the
first stages the code grid is cut into k x k patches whose token embeddings are averaged, and each
patch token predicts all codes of the next patch (`autoregressive/models/npp.py`); the patch size
shrinks stage by stage (`--patch-level`, `--epoch-rate`) down to P = 1, which is plain next-token
training. The model, its official checkpoints (LlamaGen layout) and sampling are the raster
strategy's, inherited unchanged: `--strategy npp` at sampling time is raster decoding with the
official settings.

The stage and the learning rate are pure functions of the training position, which the driver
passes to `on_step` before every optimizer step; a resumed run therefore continues inside a stage
exactly where it stopped.
"""
from __future__ import annotations

import argparse
from typing import Any

import torch

from autoregressive.models.npp import NppTransformer, build_npp_gpt, patch_side
from autoregressive.strategies.base import TrainingBatch
from autoregressive.strategies.raster import RasterStrategy
from autoregressive.strategies.npp_schedule import PatchSchedule, lr_multiplier, patch_schedule


class NppStrategy(RasterStrategy):
    name = "npp"
    official_reader = ("PKU-YuanGroup/Next-Patch-Prediction autoregressive/sample/sample_c2i_ddp.py "
                       "(checkpoint['model'])")
    #: taken from the checkpoint on resume (a contradicting one is an error), so that the resumed
    #: stages and learning rates are those of the interrupted run.
    schedule_flags = ("patch_level", "epoch_rate", "scheduler", "warmup_epochs", "decay_ratio", "end_lr",
                      "epochs", "lr")

    def __init__(self) -> None:
        self.schedule: PatchSchedule | None = None
        self.patch_size = 1  # the current stage's patch size, set by `on_step`
        self.lr_args: dict[str, float] | None = None  # None: constant --lr (no --scheduler)

    # -- flags ------------------------------------------------------------------------------------

    @classmethod
    def add_arguments(cls, group: argparse._ArgumentGroup) -> None:
        """The official NPP flags and defaults (`autoregressive/train/train_c2i.py` of
        PKU-YuanGroup/Next-Patch-Prediction). The FSDP script's (`train_c2i_fsdp.py`) defaults are
        `--patch-level 4 --epoch-rate 0.67`."""
        group.add_argument("--patch-level", type=int, default=2,
                           help="npp: number of patch stages (2: P=4,1; 3: 16,4,1; 4: 64,16,4,1; "
                                "0 or 1: next-token only)")
        group.add_argument("--epoch-rate", type=float, default=0.5,
                           help="npp: stage i ends at epoch int(epochs * rate^(L-1-i))")
        group.add_argument("--scheduler", action="store_true",
                           help="npp: per-stage warmup / constant / linear-decay learning rate "
                                "(default: constant --lr)")
        group.add_argument("--decay-ratio", type=float, default=0.2,
                           help="npp --scheduler: fraction of each stage decaying linearly to --end-lr")
        group.add_argument("--end-lr", type=float, default=1e-5,
                           help="npp --scheduler: learning rate at each stage end")

    def configure(self, args: argparse.Namespace, *, training: bool) -> None:
        """Training: build the stages and check that every stage's patches divide the token grid.

        The samplers have no `--epochs`: sampling is raster decoding, the patch flags play no role.
        """
        if not training:
            return
        grid = args.image_size // args.downsample_size
        schedule = patch_schedule(args.patch_level, args.epochs, args.epoch_rate)
        for p in schedule.patch_sizes:
            try:
                patch_side(p, grid)
            except ValueError as e:
                raise ValueError(f"--patch-level {args.patch_level} cannot train at --image-size "
                                 f"{args.image_size} / --downsample-size {args.downsample_size}: {e}; "
                                 f"use a lower --patch-level") from None
        self.schedule = schedule
        self.patch_size = schedule.patch_sizes[0]
        if args.scheduler:
            if args.decay_ratio < 0 or self.warmup_epochs(args) < 0 or args.decay_ratio > 1:
                raise ValueError("--warmup-epochs must be >= 0 and --decay-ratio in [0, 1]")
            self.lr_args = dict(warmup_epochs=self.warmup_epochs(args), decay_ratio=args.decay_ratio,
                                base_lr=args.lr, end_lr=args.end_lr)

    # -- model ------------------------------------------------------------------------------------

    def build_model(self, gpt_model: str, **config: Any) -> NppTransformer:
        return build_npp_gpt(gpt_model, **config)

    # -- training ---------------------------------------------------------------------------------

    @staticmethod
    def warmup_epochs(args: argparse.Namespace) -> int:
        """The driver's --warmup-epochs; NPP's official default (1) when it is not given."""
        w = getattr(args, "warmup_epochs", None)
        return 1 if w is None else int(w)

    def owns_lr(self) -> bool:
        return self.lr_args is not None

    def cost_phases(self) -> list[tuple[str, int]]:
        """One per patch stage: a coarser stage runs a shorter sequence, so its steps cost less."""
        if self.schedule is None:
            raise RuntimeError("NppStrategy.configure(args) must run before training")
        return [(f"patch {p}", self.schedule.stage_bounds(i)[0]) for i, p in enumerate(self.schedule.patch_sizes)]

    def on_step(self, step: int, steps_per_epoch: int, optimizer: torch.optim.Optimizer) -> dict[str, float]:
        """Set the patch size of the epoch `step // steps_per_epoch` and, with --scheduler, the
        learning rate of optimizer step `step` (step 0 of every stage uses lr 0, as official)."""
        if self.schedule is None:
            raise RuntimeError("NppStrategy.configure(args) must run before training")
        self.patch_size = self.schedule.patch_size_at(step // steps_per_epoch)
        out = {"patch_size": float(self.patch_size)}
        if self.lr_args is not None:
            lr = self.lr_args["base_lr"] * lr_multiplier(step, steps_per_epoch, self.schedule, **self.lr_args)
            for group in optimizer.param_groups:
                group["lr"] = lr
        return out

    def training_batch(self, codes: torch.Tensor, labels: torch.Tensor,
                       generator: torch.Generator | None = None) -> TrainingBatch:
        """The whole grid at the current patch size: `model(codes, cond, patch_size, targets=codes)`."""
        return TrainingBatch(inputs={"codes": codes, "cond": labels, "patch_size": self.patch_size},
                             targets=codes)

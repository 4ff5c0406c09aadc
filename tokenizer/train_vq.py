"""Train the LlamaGen VQ tokenizer with PyTorch DDP (official recipe: LlamaGen's `vq_train.py`).

Single process (CPU demo size, no perceptual loss):
    python tokenizer/train_vq.py --vq-model VQ-debug --codebook-size 512 --dataset digits \
        --image-size 32 --global-batch-size 16 --perceptual-weight 0 --disc-start 200 --max-steps 400
torchrun (what `scripts/tokenizer/train_vq.sh` runs), ImageNet at 256 px as published:
    bash scripts/tokenizer/train_vq.sh --data-path /data/imagenet/train --image-size 256 --vq-model VQ-16
VAR's multi-scale VQVAE (`tokenizer/msvq.py`; the official repository released no training code)
trains through the same losses with `--vq-model MSVQ-16` (the release: --codebook-size 4096
--codebook-embed-dim 32) or `MSVQ-debug`, and `--v-patch-nums` (default: the official list of the
image size); its checkpoints hold `msvq_config`. Every tokenizer is built and recorded through its
kind in `tokenizer/registry.py`, and its checkpoints load with `tokenizer.registry.load_tokenizer`:
    python tokenizer/train_vq.py --vq-model MSVQ-debug --codebook-size 512 --codebook-embed-dim 8 \
        --v-patch-nums 1_2_4_8 --dataset digits --image-size 32 --perceptual-weight 0 --max-steps 400
Resume the last complete checkpoint of a run folder (same data order, same weights as a run that
was never interrupted):
    bash scripts/tokenizer/train_vq.sh ... --resume results_tokenizer_image/000-VQ-16
Plan a run first (one process; times real steps, projects the wall time on 1-64 GPUs, writes nothing):
    python tokenizer/train_vq.py --data-path /data/imagenet/train --image-size 256 --vq-model VQ-16 --estimate

Per step: a generator update (reconstruction + LPIPS + GAN + codebook terms, `tokenizer/losses.py`)
then a discriminator update on the same reconstructions, each with its own Adam and grad clipping.
Checkpoints `<results>/<NNN>-<vq-model>/checkpoints/<steps:07d>.pt` hold the official keys
{model, optimizer, discriminator, optimizer_disc, steps, args[, ema]} plus vq_model, the kind's
configuration (vq_config / msvq_config), epoch, batch_in_epoch, the RNG states and the code-usage
statistics. `main` runs named steps: set-up, run folder, models, optimizers, data, resume, loop,
checkpoint, report.
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # `python tokenizer/train_vq.py` / torchrun: the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from dataset.build import CLASS_MAP_HELP, IMAGE_DATASETS, build_image_dataset
from dataset.image_folder import SkipCounter, check_class_index, collate_skip_corrupt
from dataset.transforms import random_crop_arr, to_tensor_normalized
from tokenizer.losses import (DISC_LOSSES, DISCRIMINATORS, GEN_LOSSES, LPIPS_LIN_DEFAULT, RECONSTRUCTION_LOSSES,
                              LossConfig, VQLoss, default_vgg16_path,
                              download_lpips_weights, load_lpips)
from tokenizer.registry import arch_flags, detect_kind, kind_of_model, kind_of_size, recorded_architecture, size_names
from utils.checkpoint import load_checkpoint, load_state_dict_strict, save_checkpoint
from utils.distributed import (DistInfo, all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed,
                               is_main_process)
from utils.ema import make_ema, requires_grad, update_ema
from utils.logger import create_logger, progress
from utils.memory import peak_memory_bytes
from utils.cli import run_cli
from utils.planner import Phase, Plan, one_process, run_plan
from utils.run import flag_name, given_flags, resume_point, run_folder, take_from_checkpoint
from utils.training import (NonFiniteGuard, ResumableDistributedSampler, autocast_context, gather_rng_states,
                            make_adamw, make_grad_scaler, set_rng_state)

# Flags that fix the architecture (`--vq-model` and each registered kind's own): on resume they
# come from the checkpoint (a given flag with another value is an error).
ARCH_FLAGS = ("vq_model",) + arch_flags()

#################################################################################
#                                    Helpers                                    #
#################################################################################


class AugmentedImages(Dataset):
    """Official train augmentation (ADM random crop with crop fraction in [0.8, 1], horizontal flip,
    [-1,1]) drawn from a generator seeded by (seed, epoch, index).

    The crops therefore depend on neither the number of DataLoader workers nor on where a run was
    resumed; `set_epoch` must be called before each epoch's iterator is created.
    """

    def __init__(self, base: Dataset, image_size: int, seed: int, min_crop_frac: float = 0.8):
        self.base, self.image_size, self.seed, self.min_crop_frac = base, image_size, seed, min_crop_frac
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        if isinstance(item, dict):  # a corrupt file, counted by collate_skip_corrupt
            return item
        img, label, index = item
        rng = random.Random((self.seed * 1_000_003 + self.epoch) * 10_000_019 + i)
        img = random_crop_arr(img, self.image_size, min_crop_frac=self.min_crop_frac, rng=rng)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_tensor_normalized(img), label, index


class CodeUsage:
    """Which codes the quantiser picks, summed over ranks; optional dead-code restart.

    A forward hook on `model.quantize` records the indices (and the encoder outputs, for restarts)
    of each training forward. `last_used[c]` is the last step code c was picked by any rank.
    """

    def __init__(self, quantize: torch.nn.Module, device: torch.device):
        self.quantize, self.n_e = quantize, quantize.n_e
        self.last_used = torch.zeros(self.n_e, dtype=torch.int64)
        self.window = torch.zeros(self.n_e, dtype=torch.int64)  # picks since the last log line
        self.device = device
        self._idx = self._z = None
        self.restarted = 0
        quantize.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output) -> None:
        if module.training:
            self._idx, self._z = output[2][2].detach(), inputs[0].detach()

    def update(self, step: int) -> None:
        counts = torch.bincount(self._idx.reshape(-1).cpu(), minlength=self.n_e).to(self.device)
        counts = all_reduce_sum(counts).cpu()
        self.last_used[counts > 0] = step
        self.window += counts

    def window_fraction(self) -> float:
        """Fraction of the codebook picked at least once since the last call (all ranks)."""
        frac = float((self.window > 0).float().mean())
        self.window.zero_()
        return frac

    @torch.no_grad()
    def restart_dead(self, step: int, after: int, seed: int, optimizer: torch.optim.Optimizer) -> int:
        """Re-initialise codes unused for `after` steps from random encoder outputs of this step.

        Rank 0 draws the rows (a generator seeded by (seed, step), so a resumed run draws the same)
        and broadcasts them; the codes' Adam moments are reset. Returns the number restarted.
        """
        dead = torch.nonzero(step - self.last_used >= after).flatten()
        if dead.numel() == 0:
            return 0
        weight = self.quantize.embedding.weight
        z = self._z.permute(0, 2, 3, 1).reshape(-1, weight.shape[1]).float()  # (B*h*w, C)
        if self.quantize.l2_norm:
            z = torch.nn.functional.normalize(z, p=2, dim=-1)
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        pick = torch.randint(0, z.shape[0], (dead.numel(),), generator=g)
        rows = z[pick.to(z.device)].to(weight.dtype)
        if dist.is_initialized():
            dist.broadcast(rows, src=0)
        weight[dead.to(weight.device)] = rows
        state = optimizer.state.get(weight, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                state[key][dead.to(weight.device)] = 0
        self.last_used[dead] = step
        self.restarted += dead.numel()
        return dead.numel()

    def state_dict(self) -> dict:
        return {"last_used": self.last_used.clone(), "window": self.window.clone(), "restarted": self.restarted}

    def load_state_dict(self, state: dict) -> None:
        self.last_used.copy_(state["last_used"])
        self.window.copy_(state["window"])
        self.restarted = int(state["restarted"])


def all_reduce_grads(module: torch.nn.Module) -> None:
    """Average the gradients of `module` over ranks (the discriminator is not DDP-wrapped: it runs
    twice per update and once inside the generator loss, which a single DDP forward cannot hold)."""
    if not dist.is_initialized():
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def build_perceptual(args, logger):
    """The LPIPS network, or None with --perceptual-weight 0; exits with download instructions
    when its weights are missing."""
    if args.perceptual_weight == 0:
        logger.warning("--perceptual-weight 0: training without the perceptual (LPIPS) loss, which "
                       "the official recipe uses with weight 1.0")
        return None
    lin_path = Path(args.perceptual_ckpt)
    vgg_path = Path(args.perceptual_vgg_ckpt) if args.perceptual_vgg_ckpt else default_vgg16_path()
    if args.download_perceptual and not (lin_path.is_file() and vgg_path.is_file()):
        if is_main_process():  # one download; the other ranks wait for it
            download_lpips_weights(lin_path, vgg_path)
        barrier()
    lpips = load_lpips(lin_path, vgg_path)  # missing or unreadable weights: a user error naming the files
    logger.info(f"LPIPS weights: lin {lin_path}, VGG16 {vgg_path}")
    return lpips


def take_architecture(args: argparse.Namespace, ckpt: dict, given: Container[str], what: str,
                      logger: logging.Logger) -> None:
    """The architecture flags come from the checkpoint: the kind's recorded configuration over the
    saved args (`utils.run.take_from_checkpoint`); a given flag that contradicts it is an error."""
    saved = ckpt.get("args") or {}
    if not isinstance(saved, dict):
        saved = vars(saved)  # an official checkpoint's argparse.Namespace
    saved = {**saved, **recorded_architecture(ckpt)}
    taken = take_from_checkpoint(args, saved, ARCH_FLAGS, given, what)  # a conflict: ResumeConflict, a user error
    for key, value in taken.items():
        logger.info(f"{flag_name(key)} {value} (from the checkpoint)")


def build_tokenizer(args: argparse.Namespace, ckpt: dict | None) -> torch.nn.Module:
    """A fresh tokenizer of the `--vq-model` size, or the configuration the checkpoint records, built
    by its registry kind. Every kind's forward returns (reconstruction, (vq_loss, commit_loss,
    entropy_loss, usage)), what `VQLoss` takes."""
    kind = kind_of_size(args.vq_model)
    train_opts = dict(dropout=args.dropout_p, commit_loss_beta=args.commit_loss_beta,
                      entropy_loss_ratio=args.entropy_loss_ratio)
    if ckpt is not None and kind.config_key in ckpt:
        return kind.build_recorded(ckpt[kind.config_key], image_size=args.image_size, **train_opts)
    return kind.build(args.vq_model, codebook_size=args.codebook_size, codebook_embed_dim=args.codebook_embed_dim,
                      image_size=args.image_size, patch_nums=args.v_patch_nums,
                      codebook_l2_norm=args.codebook_l2_norm, **train_opts)


def make_optimizer(params_module: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """Plain Adam as the official recipe (whose --weight-decay was parsed and never used); AdamW with
    decay on >= 2-D weights when --weight-decay > 0."""
    betas = (args.beta1, args.beta2)
    if args.weight_decay > 0:
        return make_adamw(params_module, args.lr, args.weight_decay, betas, device.type)
    return torch.optim.Adam(params_module.parameters(), lr=args.lr, betas=betas)


class Meter:
    """Loss terms summed since the last log line; `row` averages them over steps and ranks."""

    def __init__(self) -> None:
        self.running: dict[str, torch.Tensor] = {}
        self.steps, self.t0 = 0, time.perf_counter()

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            self.running[k] = self.running.get(k, 0.0) + v
        self.steps += 1

    def row(self, global_batch_size: int, active_codes: float) -> dict[str, float]:
        """The averages, the codebook fraction picked since the last row, speed; then starts over."""
        names = sorted(self.running)
        avg = all_reduce_mean(torch.stack([self.running[k] for k in names]) / self.steps).tolist()
        row = dict(zip(names, avg))
        dt = max(time.perf_counter() - self.t0, 1e-9)
        row.update(active_codes=active_codes, steps_per_sec=self.steps / dt,
                   images_per_sec=self.steps * global_batch_size / dt)
        self.running, self.steps, self.t0 = {}, 0, time.perf_counter()
        return row


#################################################################################
#                                 Training steps                                #
#################################################################################


@dataclass
class Run:
    """What every step shares: flags, ranks and device, per-rank batch, run folder, logger."""

    args: argparse.Namespace
    info: DistInfo
    batch_size: int
    logger: logging.Logger
    run_dir: Path | None = None
    ckpt_path: Path | None = None  # the checkpoint this run starts from (resume or --vq-ckpt)
    class_to_idx: dict[str, int] | None = None  # the data set's class map, saved with every checkpoint


@dataclass
class Models:
    """The tokenizer (`model`, DDP-wrapped and compiled once `wrap` ran; `raw` is never wrapped),
    its EMA, the discriminator, the losses, and the code-usage statistics."""

    model: torch.nn.Module
    raw: torch.nn.Module
    ema: torch.nn.Module | None
    discriminator: torch.nn.Module
    vq_loss: VQLoss
    usage: CodeUsage


@dataclass
class Optimizers:
    """One Adam and one GradScaler (active for fp16 only) each for the tokenizer and the discriminator."""

    optimizer: torch.optim.Optimizer
    optimizer_disc: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    scaler_disc: torch.amp.GradScaler


@dataclass
class Position:
    """Optimizer steps done and the data position (epoch, batches of it drawn): all a resume needs."""

    steps: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def set_up(args: argparse.Namespace) -> tuple[DistInfo, int]:
    """DDP (gloo on CPU, NCCL on GPU); refuses flags that cannot work together. Returns the
    distributed info and the per-rank batch."""
    info = init_distributed(args.device)
    if args.global_batch_size % info.world_size != 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} is not divisible by the "
                         f"{info.world_size} ranks")
    if args.resume and args.vq_ckpt:
        raise ValueError("pass either --resume RUN_DIR (continue that run) or --vq-ckpt FILE "
                         "(start a new run from a checkpoint), not both")
    if args.finetune and not args.vq_ckpt:
        raise ValueError("--finetune needs --vq-ckpt (the tokenizer to fine-tune)")
    return info, args.global_batch_size // info.world_size


def kind_of_run(ckpt: dict) -> str | None:
    """None for a tokenizer training checkpoint (one that records its tokenizer kind's config)."""
    if detect_kind(ckpt) is not None and "optimizer" in ckpt:
        return None
    if isinstance(ckpt.get("args"), dict) and "strategy" in ckpt["args"]:
        return "a GPT checkpoint (autoregressive/train/train_c2i.py)"
    return "not a checkpoint of train_vq.py"


def starting_checkpoint(args: argparse.Namespace, logger: logging.Logger) -> tuple[Path | None, dict | None]:
    """The newest readable checkpoint of the run being resumed (`utils.run.resume_point`, the rule
    both trainers share), or --vq-ckpt, loaded; (None, None) for a run from scratch."""
    if args.resume:
        point = resume_point(args.resume, kind_of_run, "train_vq.py")
        for note in point.warnings:
            logger.warning(note)
        return point.path, point.ckpt
    if args.vq_ckpt:
        return Path(args.vq_ckpt), load_checkpoint(args.vq_ckpt)
    return None, None


def open_run_folder(run: Run) -> None:
    """A new `<results>/<NNN>-<vq-model>` (rank 0 makes it), or the folder being resumed; the
    logger then writes `log.txt` there."""
    args, info = run.args, run.info
    name = args.vq_model.replace("/", "-")
    run.run_dir = Path(args.resume) if args.resume else run_folder(args.results_dir, name, info.rank, info.world_size)
    run.logger = create_logger("train_vq", run.run_dir, info.rank)
    run.logger.info(f"run folder {run.run_dir}; {info.world_size} rank(s) on {info.device}; args {vars(args)}")
    if args.codebook_weight != 1.0:
        run.logger.info(f"--codebook-weight {args.codebook_weight} multiplies vq + commit + entropy losses "
                        f"(the official code parses this flag and always uses 1.0)")


def build_models(run: Run, ckpt: dict | None, perceptual: torch.nn.Module | None) -> Models:
    """Tokenizer, EMA, discriminator, losses, usage statistics: the same init on every rank (seeded)."""
    args, device = run.args, run.info.device
    torch.manual_seed(args.global_seed)
    model = build_tokenizer(args, ckpt).to(device)
    if args.image_size % model.downsample != 0:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the "
                         f"{args.vq_model} downsampling factor {model.downsample}")
    ema = make_ema(model) if args.ema else None
    if args.disc_type not in DISCRIMINATORS:
        raise ValueError(f"--disc-type {args.disc_type} is not implemented; known: "
                         f"{', '.join(DISCRIMINATORS)}")
    discriminator = DISCRIMINATORS[args.disc_type]().to(device)
    if perceptual is not None:
        perceptual = perceptual.to(device).train(args.perceptual_dropout)
    vq_loss = VQLoss(LossConfig(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, disc_weight=args.disc_weight, disc_start=args.disc_start,
        disc_loss=args.disc_loss, gen_loss=args.gen_loss, disc_adaptive_weight=args.disc_adaptive_weight,
        codebook_weight=args.codebook_weight), discriminator, perceptual)
    run.logger.info(f"VQ parameters: {sum(p.numel() for p in model.parameters()):,}; "
                    f"discriminator parameters: {sum(p.numel() for p in discriminator.parameters()):,}")
    return Models(model, model, ema, discriminator, vq_loss, CodeUsage(model.quantize, device))


def build_optimizers(run: Run, models: Models) -> Optimizers:
    """Optimizers and gradient scalers (fp16 only)."""
    args, device = run.args, run.info.device
    return Optimizers(make_optimizer(models.raw, args, device), make_optimizer(models.discriminator, args, device),
                      make_grad_scaler(device, args.mixed_precision), make_grad_scaler(device, args.mixed_precision))


def build_data(run: Run) -> tuple[AugmentedImages, ResumableDistributedSampler]:
    """Per-item seeded augmentation, and a sampler that can start mid-epoch."""
    args, info = run.args, run.info
    base = build_image_dataset(args.dataset, args.data_path, None, args.image_size, split="train",
                               class_map=args.class_map)
    run.class_to_idx = dict(base.class_to_idx)
    dataset = AugmentedImages(base, args.image_size, args.global_seed)
    sampler = ResumableDistributedSampler(len(dataset), info.rank, info.world_size, run.batch_size,
                                          seed=args.global_seed)
    run.logger.info(f"data set {args.dataset}: {len(dataset):,} images, {sampler.batches_per_epoch} steps per "
                    f"epoch at {run.batch_size} per rank")
    return dataset, sampler


def check_resumed_classes(run: Run, ckpt: dict) -> None:
    """A run continued with its full state (not --finetune) must see the class map it was started
    with: the images are listed in class-id order, so another map changes the data order the run
    resumes in the middle of. Checkpoints from before the map was saved pass."""
    if run.args.finetune or not isinstance(ckpt.get("class_to_idx"), dict):
        return
    check_class_index(run.class_to_idx, ckpt["class_to_idx"], f"the checkpoint {run.ckpt_path} (the data "
                      f"set's order follows its class ids)", hint="pass the --class-map the run was started with")


def resume(run: Run, ckpt: dict, models: Models, opt: Optimizers, guard: NonFiniteGuard,
           batches_per_epoch: int) -> Position:
    """Load the checkpoint's weights; with --finetune only those (and the discriminator) at step 0,
    else every state: optimizers, scalers, usage statistics, position, this rank's RNG."""
    args, path, logger = run.args, run.ckpt_path, run.logger
    load_state_dict_strict(models.raw, ckpt["model"], what=f"VQ weights of {path}")
    if models.ema is not None:
        load_state_dict_strict(models.ema, ckpt["ema"] if "ema" in ckpt else ckpt["model"], what="VQ EMA")
    if args.finetune:
        if "discriminator" in ckpt:
            load_state_dict_strict(models.discriminator, ckpt["discriminator"], what="discriminator")
        logger.info(f"fine-tuning from {path} (weights only; fresh optimizers, step 0)")
        return Position()
    for key in ("optimizer", "discriminator", "optimizer_disc", "steps"):
        if key not in ckpt:
            raise ValueError(f"{path} has no '{key}': it is not a training checkpoint "
                             f"(use --finetune to start from its weights)")
    load_state_dict_strict(models.discriminator, ckpt["discriminator"], what="discriminator")
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.optimizer_disc.load_state_dict(ckpt["optimizer_disc"])
    steps = int(ckpt["steps"])
    if "epoch" in ckpt:
        pos = Position(steps, int(ckpt["epoch"]), int(ckpt["batch_in_epoch"]))
    else:  # an official checkpoint: the data position follows from the step count
        pos = Position(steps, *divmod(steps, batches_per_epoch))
    for key, obj in (("scaler", opt.scaler), ("scaler_disc", opt.scaler_disc), ("code_usage", models.usage),
                     ("nonfinite", guard)):
        if key in ckpt:
            obj.load_state_dict(ckpt[key])
    rngs, world = ckpt.get("rng"), run.info.world_size
    if rngs is not None and len(rngs) == world:
        set_rng_state(rngs[run.info.rank])
    elif rngs is not None:
        logger.warning(f"the checkpoint has RNG states of {len(rngs)} ranks, this run has {world}: "
                       f"dropout draws will differ from an uninterrupted run")
    logger.info(f"resumed {path}: step {pos.steps}, epoch {pos.epoch}, batch {pos.batch_in_epoch}")
    return pos


def wrap(run: Run, models: Models) -> None:
    """DDP when distributed (the discriminator's gradients are averaged by hand, see
    `all_reduce_grads`), then --compile; both in training mode."""
    model = models.raw
    if dist.is_initialized():
        device = run.info.device
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if run.args.compile:
        run.logger.info("compiling the model (may take several minutes)")
        model = torch.compile(model)
    models.model = model
    model.train()
    models.discriminator.train()


def epoch_loader(run: Run, dataset: AugmentedImages, sampler: ResumableDistributedSampler,
                 pos: Position) -> DataLoader:
    """The batches of `pos.epoch` from `pos.batch_in_epoch` on."""
    args = run.args
    sampler.set_epoch(pos.epoch, pos.batch_in_epoch)
    dataset.set_epoch(pos.epoch)
    # Its own generator: creating an iterator draws a worker base seed, which must not come from
    # the global RNG (a resumed run creates one more iterator than an uninterrupted one).
    return DataLoader(dataset, batch_size=run.batch_size, sampler=sampler, num_workers=args.num_workers,
                      collate_fn=collate_skip_corrupt, pin_memory=run.info.device.type == "cuda",
                      drop_last=True, generator=torch.Generator().manual_seed(args.global_seed + pos.epoch))


def train_step(run: Run, models: Models, opt: Optimizers, guard: NonFiniteGuard, x: torch.Tensor,
               step: int) -> dict[str, torch.Tensor] | None:
    """A generator update, then a discriminator update on the same (detached) reconstructions.
    Returns the loss terms to log, or None when the generator loss is not finite (update skipped)."""
    args, device = run.args, x.device
    # Generator update:
    requires_grad(models.discriminator, False)
    opt.optimizer.zero_grad(set_to_none=True)
    with autocast_context(device, args.mixed_precision):
        x_hat, codebook_losses = models.model(x)
        loss_g, terms = models.vq_loss.generator_loss(x, x_hat, codebook_losses, step,
                                                      last_layer=models.raw.decoder.last_layer)
    if not guard.check(all_reduce_mean(loss_g.detach()), step):
        run.logger.warning(f"step {step}: non-finite generator loss, update skipped")
        return None
    opt.scaler.scale(loss_g).backward()
    if args.max_grad_norm > 0:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(models.raw.parameters(), args.max_grad_norm)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    if models.ema is not None:
        update_ema(models.ema, models.raw, decay=args.ema_decay)

    # Discriminator update (on the same, detached reconstructions):
    requires_grad(models.discriminator, True)
    opt.optimizer_disc.zero_grad(set_to_none=True)
    with autocast_context(device, args.mixed_precision):
        loss_d, d_terms = models.vq_loss.discriminator_loss(x, x_hat, step)
    opt.scaler_disc.scale(loss_d).backward()
    all_reduce_grads(models.discriminator)
    if args.max_grad_norm > 0:
        opt.scaler_disc.unscale_(opt.optimizer_disc)
        torch.nn.utils.clip_grad_norm_(models.discriminator.parameters(), args.max_grad_norm)
    opt.scaler_disc.step(opt.optimizer_disc)
    opt.scaler_disc.update()
    terms.update(d_terms, loss_g=loss_g.detach().float(),
                 codebook_usage=torch.tensor(float(codebook_losses[3]), device=device))
    return terms


def track_codes(run: Run, models: Models, opt: Optimizers, steps: int) -> None:
    """Codebook usage over ranks, and the dead-code restart when --dead-code-restart is on."""
    args = run.args
    models.usage.update(steps)
    if args.dead_code_restart > 0:
        n = models.usage.restart_dead(steps, args.dead_code_restart, args.global_seed, opt.optimizer)
        if n:
            run.logger.info(f"step {steps}: restarted {n} codes unused for {args.dead_code_restart} steps")


def log_row(run: Run, meter: Meter, usage: CodeUsage, steps: int) -> None:
    """Loss terms, usage and speed (averaged over ranks) to the log and `metrics.jsonl`."""
    args = run.args
    row = meter.row(args.global_batch_size, usage.window_fraction())
    row["peak_mem_gib"] = peak_memory_bytes(run.info.device) / 2**30
    text = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
    run.logger.info(f"(step={steps:07d}) {text}")
    if run.info.rank == 0:
        with open(run.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": steps, **row}) + "\n")
    if row["codebook_usage"] < args.usage_warn_below:
        run.logger.warning(f"codebook usage {row['codebook_usage']:.1%} is below {args.usage_warn_below:.0%}: "
                           f"the codebook is collapsing (try --dead-code-restart N, a larger "
                           f"--entropy-loss-ratio or a lower --lr)")


def save(run: Run, models: Models, opt: Optimizers, guard: NonFiniteGuard, pos: Position) -> None:
    """Rank 0 writes `checkpoints/<steps:07d>.pt` (atomically; a copy under --cloud-save-path), then
    every rank waits: the official keys plus the kind's config, position, RNG and statistics."""
    args, raw = run.args, models.raw
    kind = kind_of_model(raw)
    rngs = gather_rng_states()
    if run.info.rank == 0:
        state = {
            "model": raw.state_dict(),
            "optimizer": opt.optimizer.state_dict(),
            "discriminator": models.discriminator.state_dict(),
            "optimizer_disc": opt.optimizer_disc.state_dict(),
            "steps": pos.steps,
            "args": dict(vars(args)),
            "vq_model": args.vq_model,
            kind.config_key: kind.config(raw),
            "epoch": pos.epoch,
            "batch_in_epoch": pos.batch_in_epoch,
            "rng": rngs,
            "scaler": opt.scaler.state_dict(),
            "scaler_disc": opt.scaler_disc.state_dict(),
            "code_usage": models.usage.state_dict(),
            "nonfinite": guard.state_dict(),
            "class_to_idx": run.class_to_idx,
        }
        if models.ema is not None:
            state["ema"] = models.ema.state_dict()
        path = save_checkpoint(state, run.run_dir / "checkpoints" / f"{pos.steps:07d}.pt")
        run.logger.info(f"saved checkpoint {path}")
        if args.cloud_save_path:
            copy = Path(args.cloud_save_path) / run.run_dir.name / "checkpoints" / path.name
            save_checkpoint(state, copy)
            run.logger.info(f"saved checkpoint copy {copy}")
    barrier()


def total_steps_of(args: argparse.Namespace, batches_per_epoch: int) -> int:
    """The optimizer steps of the whole run: `--epochs` epochs, or `--max-steps` when fewer."""
    total = args.epochs * batches_per_epoch
    return min(total, args.max_steps) if args.max_steps is not None else total


def train(run: Run, models: Models, opt: Optimizers, guard: NonFiniteGuard, dataset: AugmentedImages,
          sampler: ResumableDistributedSampler, pos: Position) -> SkipCounter:
    """The loop, from `pos` to the last step, with logging and checkpoints; returns this rank's
    corrupt-file count."""
    args, info = run.args, run.info
    total_steps = total_steps_of(args, sampler.batches_per_epoch)
    skips, meter = SkipCounter(), Meter()
    bar = progress(total=total_steps, initial=pos.steps, enabled=info.is_main, desc="train_vq")
    last_saved = pos.steps if run.ckpt_path is not None and not args.finetune else -1
    run.logger.info(f"training to step {total_steps} ({args.epochs} epochs of {sampler.batches_per_epoch} steps"
                    f"{f', --max-steps {args.max_steps}' if args.max_steps is not None else ''})")
    while pos.steps < total_steps and pos.epoch < args.epochs:
        if pos.batch_in_epoch >= sampler.batches_per_epoch:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            continue
        for batch in epoch_loader(run, dataset, sampler, pos):
            pos.batch_in_epoch += 1
            skips.add(batch["skipped"])
            have = torch.tensor(float("images" in batch), device=info.device)
            if all_reduce_sum(have).item() < info.world_size:  # some rank got only corrupt files
                continue
            x = batch["images"].to(info.device, non_blocking=True)
            terms = train_step(run, models, opt, guard, x, pos.steps + 1)  # the GAN schedule counts from 1
            if terms is None:
                continue
            pos.steps += 1
            bar.update(1)
            track_codes(run, models, opt, pos.steps)
            meter.add(terms)
            if pos.steps % args.log_every == 0 or pos.steps == total_steps:
                log_row(run, meter, models.usage, pos.steps)
            if pos.steps % args.ckpt_every == 0:
                save(run, models, opt, guard, pos)
                last_saved = pos.steps
            if pos.steps >= total_steps:
                break
    bar.close()
    if last_saved != pos.steps:
        save(run, models, opt, guard, pos)
    return skips


def report(run: Run, skips: SkipCounter, usage: CodeUsage, steps: int) -> None:
    """Corrupt files over all ranks, restarted codes, the last step."""
    all_skips = [None] * run.info.world_size
    if dist.is_initialized():
        dist.all_gather_object(all_skips, skips.paths)
    else:
        all_skips = [skips.paths]
    run.logger.info(SkipCounter([p for paths in all_skips for p in paths]).report())
    if usage.restarted:
        run.logger.info(f"{usage.restarted} dead codes restarted in total")
    run.logger.info(f"done at step {steps}")


#################################################################################
#                                  Training Loop                                #
#################################################################################


def estimate(args: argparse.Namespace) -> None:
    """`--estimate`: build the tokenizer, discriminator, losses, optimizers and data loader as a new
    run would, time real steps before and after `--disc-start` (the discriminator's forward joins
    the generator step there) in this process and print the run plan (`utils/planner.py`); writes
    nothing (except LPIPS weights that --download-perceptual is asked to fetch)."""
    if args.estimate_steps < 1:
        raise ValueError(f"--estimate-steps must be >= 1, got {args.estimate_steps}")
    if args.resume or args.vq_ckpt:
        raise ValueError("--estimate plans a new run: drop --resume / --vq-ckpt (give the architecture "
                         "flags instead; the weights do not change the timing)")
    with one_process(args.device, process_group=False):
        info, batch_size = set_up(args)
        run = Run(args, info, batch_size, create_logger("train_vq.estimate", None, 0))  # console only
        perceptual = build_perceptual(args, run.logger)
        if args.vq_model not in size_names():
            raise ValueError(f"unknown --vq-model {args.vq_model}")
        models = build_models(run, None, perceptual)
        opt = build_optimizers(run, models)
        dataset, sampler = build_data(run)
        torch.manual_seed(args.global_seed)  # main's per-rank seed on one rank
        if models.ema is not None:
            update_ema(models.ema, models.raw, decay=0.0)
        wrap(run, models)
        guard, pos, device = NonFiniteGuard(), Position(), info.device

        def images():  # the run's loader from its first batch on, epoch after epoch
            at = Position()
            while True:
                for batch in epoch_loader(run, dataset, sampler, at):
                    if "images" in batch:
                        yield batch["images"]
                at.epoch += 1

        stream = images()
        first = next(stream)

        def one_step(x: torch.Tensor, with_disc: bool) -> int:
            step = max(pos.steps + 1, args.disc_start) if with_disc else min(pos.steps + 1, args.disc_start - 1)
            x = x.to(device, non_blocking=True)
            if train_step(run, models, opt, guard, x, step) is None:
                return 0
            pos.steps += 1
            track_codes(run, models, opt, pos.steps)
            return models.usage._idx.numel()  # the codes of this batch (every scale for MSVQ)

        def run_steps(with_disc: bool):
            def count(gpus: int) -> int:
                if args.global_batch_size % gpus:
                    raise ValueError(f"global batch does not divide over {gpus} GPUs")
                share = args.global_batch_size // gpus  # what build_data's sampler takes on each of `gpus` ranks
                total = total_steps_of(args, ResumableDistributedSampler(len(dataset), 0, gpus, share).batches_per_epoch)
                before = min(total, max(args.disc_start - 1, 0))  # steps 1 .. disc_start - 1
                return total - before if with_disc else before
            return count

        def after_oom() -> None:
            opt.optimizer.zero_grad(set_to_none=True)
            opt.optimizer_disc.zero_grad(set_to_none=True)
            opt.scaler = make_grad_scaler(device, args.mixed_precision)
            opt.scaler_disc = make_grad_scaler(device, args.mixed_precision)

        phases = [Phase(name, (lambda d=with_disc: one_step(next(stream), d)), run_steps(with_disc),
                        try_micro_batch=(lambda k, d=with_disc: one_step(
                            first.repeat(-(-k // len(first)), 1, 1, 1)[:k], d)))
                  for name, with_disc in ((f"before --disc-start {args.disc_start}", False),
                                          ("discriminator on", True))]
        spe = sampler.batches_per_epoch
        total = total_steps_of(args, spe)
        summary = (f"{args.epochs} epochs x {spe:,} steps per epoch at global batch {args.global_batch_size} "
                   f"({len(dataset):,} images) = {args.epochs * spe:,} steps")
        if total < args.epochs * spe:
            summary += f"; --max-steps {args.max_steps}: {total:,} steps"
        precision = args.mixed_precision if device.type == "cuda" else "float32: CPU runs ignore --mixed-precision"
        plan = Plan(title=f"{args.vq_model} tokenizer, {args.image_size} px, codebook {args.codebook_size}",
                    parameters={"tokenizer": sum(p.numel() for p in models.raw.parameters()),
                                "discriminator": sum(p.numel() for p in models.discriminator.parameters())},
                    phases=phases, global_batch=args.global_batch_size, micro_batch=batch_size, accumulation=1,
                    can_accumulate=False, device=device, precision=precision, warmup=2 if args.compile else 1,
                    run_summary=summary, after_oom=after_oom,
                    notes=["train_vq.py has no gradient accumulation: on G GPUs each takes global batch / G "
                           "images per step; tokens are the codes of each image"])
        run_plan(plan, args.estimate_steps)


def main(args: argparse.Namespace, given: Container[str] | None = None) -> None:
    """Train (or with --estimate plan the run); `given` names the flags the user gave (None: those
    that differ from their defaults)."""
    given = given_flags(get_parser(), args=args) if given is None else given
    if args.estimate:
        return estimate(args)

    # Set-up, and the checkpoint to start from; LPIPS before any folder exists (it may stop the run):
    info, batch_size = set_up(args)
    run = Run(args, info, batch_size, create_logger("train_vq", None, info.rank))
    run.ckpt_path, ckpt = starting_checkpoint(args, run.logger)
    perceptual = build_perceptual(args, run.logger)
    if ckpt is not None:
        take_architecture(args, ckpt, given, f"the checkpoint {run.ckpt_path}", run.logger)
    if args.vq_model not in size_names():
        raise ValueError(f"unknown --vq-model {args.vq_model}")

    # Models, optimizers, data (each may refuse the flags), then the run folder:
    models = build_models(run, ckpt, perceptual)
    opt = build_optimizers(run, models)
    dataset, sampler = build_data(run)
    if ckpt is not None:
        check_resumed_classes(run, ckpt)
    open_run_folder(run)

    # Resume or fine-tune, then a per-rank seed for a fresh start (DiT):
    guard = NonFiniteGuard()
    pos = Position()
    if ckpt is not None:
        pos = resume(run, ckpt, models, opt, guard, sampler.batches_per_epoch)
        del ckpt
    if run.ckpt_path is None or args.finetune:
        torch.manual_seed(args.global_seed * info.world_size + info.rank)
        if models.ema is not None:
            update_ema(models.ema, models.raw, decay=0.0)

    # Training loop, then the report:
    wrap(run, models)
    skips = train(run, models, opt, guard, dataset, sampler, pos)
    report(run, skips, models.usage, pos.steps)
    cleanup()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model
    g = parser.add_argument_group("model")
    g.add_argument("--vq-model", type=str, choices=size_names(), default="VQ-16",
                   help="tokenizer size: LlamaGen's VQ-*, or VAR's multi-scale VQVAE MSVQ-*")
    g.add_argument("--v-patch-nums", type=str, default=None,
                   help="MSVQ-*: the scales, e.g. 1_2_4_8 or 256 (default: the official list of --image-size)")
    g.add_argument("--codebook-size", type=int, default=16384, help="codebook entries")
    g.add_argument("--codebook-embed-dim", type=int, default=8, help="code vector dimension")
    g.add_argument("--codebook-l2-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="l2-normalise codes and encoder outputs (official: always on; MSVQ-*: not used, "
                        "codes are picked by plain L2 as in the VAR release)")
    g.add_argument("--dropout-p", type=float, default=0.0, help="dropout in the encoder/decoder res blocks")
    # Losses
    g = parser.add_argument_group("losses")
    g.add_argument("--codebook-weight", type=float, default=1.0,
                   help="weight of vq + commit + entropy losses (official: parsed, always 1.0)")
    g.add_argument("--entropy-loss-ratio", type=float, default=0.0, help="entropy loss weight")
    g.add_argument("--commit-loss-beta", type=float, default=0.25, help="commitment loss weight")
    g.add_argument("--reconstruction-weight", type=float, default=1.0, help="pixel loss weight")
    g.add_argument("--reconstruction-loss", type=str, choices=list(RECONSTRUCTION_LOSSES), default="l2",
                   help="pixel loss")
    g.add_argument("--perceptual-weight", type=float, default=1.0,
                   help="LPIPS weight; 0 trains without LPIPS (needs no weight files)")
    g.add_argument("--perceptual-ckpt", type=str, default=str(LPIPS_LIN_DEFAULT),
                   help="LPIPS lin-layer weights (LlamaGen's vgg.pth, md5 d507d734...)")
    g.add_argument("--perceptual-vgg-ckpt", type=str, default=None,
                   help="torchvision VGG16 ImageNet weights vgg16-397923af.pth (default: "
                        "pretrained_models/, then torchvision's cache)")
    g.add_argument("--download-perceptual", action="store_true",
                   help="download missing LPIPS weight files (checksum-checked) before training")
    g.add_argument("--perceptual-dropout", action=argparse.BooleanOptionalAction, default=True,
                   help="LPIPS lin-layer dropout during training (official: on, by a train() call)")
    g.add_argument("--disc-weight", type=float, default=0.5, help="GAN loss weight once the discriminator starts")
    g.add_argument("--disc-start", type=int, default=20000, help="step from which the GAN losses count")
    g.add_argument("--disc-type", type=str, choices=["patchgan", "stylegan"], default="patchgan",
                   help="discriminator (stylegan is not implemented and is refused)")
    g.add_argument("--disc-loss", type=str, choices=list(DISC_LOSSES), default="hinge", help="discriminator loss")
    g.add_argument("--gen-loss", type=str, choices=list(GEN_LOSSES), default="hinge", help="generator GAN loss")
    g.add_argument("--disc-adaptive-weight", action="store_true",
                   help="scale the GAN loss by ||grad rec|| / ||grad gan|| on the decoder's last layer "
                        "(official: off, not exposed)")
    # Codebook health
    g = parser.add_argument_group("codebook usage")
    g.add_argument("--usage-warn-below", type=float, default=0.05,
                   help="warn when the codebook usage (official measure) falls below this fraction")
    g.add_argument("--dead-code-restart", type=int, default=0,
                   help="re-initialise codes unused for this many steps from encoder outputs (0: off)")
    # Data
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", type=str, choices=list(IMAGE_DATASETS), default="imagenet",
                   help="class-folder tree (imagenet/folder) or the embedded digits")
    g.add_argument("--data-path", type=str, default=None, help="<root>/<class>/<image> for folder data sets")
    g.add_argument("--class-map", type=str, default=None, help=CLASS_MAP_HELP)
    g.add_argument("--image-size", type=int, default=256, help="training crop size (official 256 or 512)")
    g.add_argument("--num-workers", type=int, default=16, help="DataLoader workers per rank")
    # Optimisation
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=40, help="epochs")
    g.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in total")
    g.add_argument("--lr", type=float, default=1e-4, help="constant learning rate (both optimizers)")
    g.add_argument("--weight-decay", type=float, default=0.0,
                   help="AdamW decay on >= 2-D weights; 0 = plain Adam (official: 5e-2 parsed, never used)")
    g.add_argument("--beta1", type=float, default=0.9, help="Adam beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="Adam beta2")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="grad-norm clip (0: off)")
    g.add_argument("--global-batch-size", type=int, default=128, help="images per step over all ranks")
    g.add_argument("--global-seed", type=int, default=0, help="seed of init, data order and augmentation")
    g.add_argument("--mixed-precision", type=str, choices=["none", "bf16", "fp16"], default="bf16",
                   help="autocast dtype on CUDA (CPU runs float32); GradScaler for fp16 only")
    g.add_argument("--compile", action="store_true", help="torch.compile the tokenizer")
    g.add_argument("--ema", action="store_true", help="keep an EMA of the tokenizer weights")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay")
    # Checkpoints and logging
    g = parser.add_argument_group("checkpoints and logging")
    g.add_argument("--results-dir", type=str, default="results_tokenizer_image", help="runs go in <dir>/<NNN>-<model>")
    g.add_argument("--cloud-save-path", type=str, default=None, help="also write each checkpoint here")
    g.add_argument("--vq-ckpt", type=str, default=None, help="resume from this checkpoint in a new run folder")
    g.add_argument("--resume", type=str, default=None, help="continue this run folder from its last checkpoint")
    g.add_argument("--finetune", action="store_true", help="with --vq-ckpt: load weights, restart at step 0")
    g.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    g.add_argument("--ckpt-every", type=int, default=5000, help="steps between checkpoints")
    g.add_argument("--device", type=str, choices=["cuda", "cpu"], default=None, help="default: CUDA if present")
    # Planning
    g = parser.add_argument_group("planning")
    g.add_argument("--estimate", action="store_true",
                   help="plan the run instead: build models and data loader as the run would, time real steps in "
                        "this one process, print parameters, peak memory, speed and the projected wall time on "
                        "1-64 GPUs (and on CUDA the largest per-GPU batch that fits); writes nothing")
    g.add_argument("--estimate-steps", type=int, default=20,
                   help="--estimate: timed steps per phase (before / after --disc-start), after 1 (2 with "
                        "--compile) untimed warm-up")
    return parser


if __name__ == "__main__":
    parser = get_parser()
    run_cli(main, parser.parse_args(), given_flags(parser, sys.argv[1:]))

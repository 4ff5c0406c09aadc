"""Train the LlamaGen VQ tokenizer with PyTorch DDP (official recipe: LlamaGen's `vq_train.py`).

Single process (CPU demo size, no perceptual loss):
    python tokenizer/train_vq.py --vq-model VQ-debug --codebook-size 512 --dataset digits \
        --image-size 32 --global-batch-size 16 --perceptual-weight 0 --disc-start 200 --max-steps 400
torchrun (what `scripts/tokenizer/train_vq.sh` runs), ImageNet at 256 px as published:
    bash scripts/tokenizer/train_vq.sh --data-path /data/imagenet/train --image-size 256 --vq-model VQ-16
VAR's multi-scale VQVAE (`tokenizer/msvq.py`; the official repository released no training code)
trains through the same losses with `--vq-model MSVQ-16` (the release: --codebook-size 4096
--codebook-embed-dim 32) or `MSVQ-debug`, and `--v-patch-nums` (default: the official list of the
image size); its checkpoints hold `msvq_config` and load with `tokenizer.msvq.load_msvq`:
    python tokenizer/train_vq.py --vq-model MSVQ-debug --codebook-size 512 --codebook-embed-dim 8 \
        --v-patch-nums 1_2_4_8 --dataset digits --image-size 32 --perceptual-weight 0 --max-steps 400
Resume the last complete checkpoint of a run folder (same data order, same weights as a run that
was never interrupted):
    bash scripts/tokenizer/train_vq.sh ... --resume results_tokenizer_image/000-VQ-16

Per step: a generator update (reconstruction + LPIPS + GAN + codebook terms, `tokenizer/losses.py`)
then a discriminator update on the same reconstructions, each with its own Adam and grad clipping.
Checkpoints `<results>/<NNN>-<vq-model>/checkpoints/<steps:07d>.pt` hold the official keys
{model, optimizer, discriminator, optimizer_disc, steps, args[, ema]} plus vq_model, vq_config,
epoch, batch_in_epoch, the RNG states and the code-usage statistics.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python tokenizer/train_vq.py` / torchrun: the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, Dataset

from dataset.build import IMAGE_DATASETS, build_image_dataset
from dataset.image_folder import SkipCounter, collate_skip_corrupt
from dataset.transforms import random_crop_arr, to_tensor_normalized
from tokenizer.losses import (DISC_LOSSES, DISCRIMINATORS, GEN_LOSSES, LPIPS_LIN_DEFAULT, RECONSTRUCTION_LOSSES,
                              LossConfig, PerceptualWeightsMissing, VQLoss, default_vgg16_path,
                              download_lpips_weights, load_lpips)
from tokenizer.loading import build_vq
from tokenizer.msvq import MSVQ_models, MSVQConfig, MultiScaleVQVAE, build_msvq_named, msvq_config_dict
from tokenizer.vq_model import VQConfig, VQModel, VQ_models, config_dict
from utils.checkpoint import CheckpointError, load_checkpoint, load_state_dict_strict, save_checkpoint
from utils.distributed import (all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed,
                               is_main_process)
from utils.ema import make_ema, requires_grad, update_ema
from utils.logger import create_logger, progress
from utils.training import (NonFiniteGuard, ResumableDistributedSampler, autocast_context, gather_rng_states,
                            last_checkpoint, make_adamw, make_grad_scaler, new_run_dir, set_rng_state)

# Flags that fix the architecture: on resume they come from the checkpoint (an explicit different
# value on the command line is an error).
ARCH_FLAGS = ("vq_model", "codebook_size", "codebook_embed_dim", "codebook_l2_norm", "v_patch_nums")

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
    try:
        lpips = load_lpips(lin_path, vgg_path)
    except (PerceptualWeightsMissing, CheckpointError) as e:
        raise SystemExit(f"error: {e}") from None
    logger.info(f"LPIPS weights: lin {lin_path}, VGG16 {vgg_path}")
    return lpips


def resolve_architecture(args, ckpt: dict, parser_defaults: dict, logger) -> None:
    """Take the architecture flags from the checkpoint; refuse an explicit conflicting value."""
    saved = ckpt.get("args") or {}
    if not isinstance(saved, dict):
        saved = vars(saved)  # an official checkpoint's argparse.Namespace
    if "vq_config" in ckpt:
        cfg = ckpt["vq_config"]
        saved = {**saved, "vq_model": ckpt.get("vq_model", saved.get("vq_model")),
                 "codebook_size": cfg["codebook_size"], "codebook_embed_dim": cfg["codebook_embed_dim"],
                 "codebook_l2_norm": cfg["codebook_l2_norm"]}
    if "msvq_config" in ckpt:  # VAR's multi-scale VQVAE
        cfg = ckpt["msvq_config"]
        saved = {**saved, "vq_model": ckpt.get("vq_model", saved.get("vq_model")),
                 "codebook_size": cfg["vocab_size"], "codebook_embed_dim": cfg["z_channels"],
                 "v_patch_nums": "_".join(str(p) for p in cfg["v_patch_nums"])}
    for key in ARCH_FLAGS:
        if key not in saved or saved[key] == getattr(args, key):
            continue
        if getattr(args, key) != parser_defaults.get(key):
            raise SystemExit(f"error: --{key.replace('_', '-')} {getattr(args, key)} conflicts with the "
                             f"checkpoint, trained with {saved[key]}; drop the flag or pass that value")
        logger.info(f"--{key.replace('_', '-')} {saved[key]} (from the checkpoint)")
        setattr(args, key, saved[key])


def build_model(args, ckpt: dict | None) -> VQModel | MultiScaleVQVAE:
    """A fresh tokenizer of the named size, or the checkpoint's recorded configuration: LlamaGen's
    VQ, or VAR's multi-scale VQVAE for the `MSVQ-*` sizes. Both return (reconstruction,
    (vq_loss, commit_loss, entropy_loss, usage)) from forward, what `VQLoss` takes."""
    if args.vq_model in MSVQ_models:
        saved = ckpt.get("msvq_config") if ckpt is not None else None
        try:
            if saved is not None:
                model = MultiScaleVQVAE(MSVQConfig(**{**saved, "dropout": args.dropout_p, "beta": args.commit_loss_beta}))
                if model.config.image_size != args.image_size:
                    raise ValueError(f"the checkpoint's tokenizer encodes {model.config.image_size} px images, "
                                     f"not --image-size {args.image_size}")
                return model
            return build_msvq_named(args.vq_model, args.codebook_size, args.codebook_embed_dim, args.image_size,
                                    args.v_patch_nums, dropout=args.dropout_p, beta=args.commit_loss_beta)
        except ValueError as e:
            raise SystemExit(f"error: {e}") from None
    train_opts = dict(commit_loss_beta=args.commit_loss_beta, entropy_loss_ratio=args.entropy_loss_ratio,
                      dropout_p=args.dropout_p)
    if ckpt is not None and "vq_config" in ckpt:
        return VQModel(VQConfig(**{**ckpt["vq_config"], **train_opts}))
    return build_vq(args.vq_model, args.codebook_size, args.codebook_embed_dim,
                    codebook_l2_norm=args.codebook_l2_norm, **train_opts)


def make_optimizer(params_module: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """Plain Adam as the official recipe (whose --weight-decay was parsed and never used); AdamW with
    decay on >= 2-D weights when --weight-decay > 0."""
    betas = (args.beta1, args.beta2)
    if args.weight_decay > 0:
        return make_adamw(params_module, args.lr, args.weight_decay, betas, device.type)
    return torch.optim.Adam(params_module.parameters(), lr=args.lr, betas=betas)


#################################################################################
#                                  Training Loop                                #
#################################################################################


def main(args, parser_defaults: dict | None = None):
    parser_defaults = parser_defaults or {}

    # Setup DDP (gloo on CPU, NCCL on GPU), seeds:
    info = init_distributed(args.device)
    device, rank, world = info.device, info.rank, info.world_size
    if args.global_batch_size % world != 0:
        raise SystemExit(f"error: --global-batch-size {args.global_batch_size} is not divisible by the "
                         f"{world} ranks")
    batch_size = args.global_batch_size // world
    if args.resume and args.vq_ckpt:
        raise SystemExit("error: pass either --resume RUN_DIR (continue that run) or --vq-ckpt FILE "
                         "(start a new run from a checkpoint), not both")
    if args.finetune and not args.vq_ckpt:
        raise SystemExit("error: --finetune needs --vq-ckpt (the tokenizer to fine-tune)")

    # Experiment folder: a new `<results>/<NNN>-<vq-model>`, or the run being resumed.
    ckpt_path = None
    if args.resume:
        run_dir = Path(args.resume)
        ckpt_path = last_checkpoint(run_dir)
        if ckpt_path is None:
            raise SystemExit(f"error: --resume {run_dir}: no checkpoint under {run_dir / 'checkpoints'}")
    elif args.vq_ckpt:
        ckpt_path = Path(args.vq_ckpt)
    ckpt = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    logger = create_logger("train_vq", None, rank)
    perceptual = build_perceptual(args, logger)  # before any folder is made: it may stop the run
    if ckpt is not None:
        resolve_architecture(args, ckpt, parser_defaults, logger)
    if args.vq_model not in VQ_models and args.vq_model not in MSVQ_models:
        raise SystemExit(f"error: unknown --vq-model {args.vq_model}")
    if not args.resume:
        run_dir = None
        if rank == 0:
            run_dir = new_run_dir(args.results_dir, args.vq_model.replace("/", "-"))
        if dist.is_initialized():
            box = [str(run_dir)]
            dist.broadcast_object_list(box, src=0)
            run_dir = Path(box[0])
    checkpoint_dir = run_dir / "checkpoints"
    logger = create_logger("train_vq", run_dir, rank)
    logger.info(f"run folder {run_dir}; {world} rank(s) on {device}; args {vars(args)}")
    if args.codebook_weight != 1.0:
        logger.info(f"--codebook-weight {args.codebook_weight} multiplies vq + commit + entropy losses "
                    f"(the official code parses this flag and always uses 1.0)")

    # Create model, EMA, discriminator and perceptual network (same init on every rank):
    torch.manual_seed(args.global_seed)
    model = build_model(args, ckpt).to(device)
    if args.image_size % model.downsample != 0:
        raise SystemExit(f"error: --image-size {args.image_size} is not a multiple of the "
                         f"{args.vq_model} downsampling factor {model.downsample}")
    ema = make_ema(model) if args.ema else None
    if args.disc_type not in DISCRIMINATORS:
        raise SystemExit(f"error: --disc-type {args.disc_type} is not implemented; known: "
                         f"{', '.join(DISCRIMINATORS)}")
    discriminator = DISCRIMINATORS[args.disc_type]().to(device)
    if perceptual is not None:
        perceptual = perceptual.to(device).train(args.perceptual_dropout)
    vq_loss = VQLoss(LossConfig(
        reconstruction_loss=args.reconstruction_loss, reconstruction_weight=args.reconstruction_weight,
        perceptual_weight=args.perceptual_weight, disc_weight=args.disc_weight, disc_start=args.disc_start,
        disc_loss=args.disc_loss, gen_loss=args.gen_loss, disc_adaptive_weight=args.disc_adaptive_weight,
        codebook_weight=args.codebook_weight), discriminator, perceptual)
    logger.info(f"VQ parameters: {sum(p.numel() for p in model.parameters()):,}; "
                f"discriminator parameters: {sum(p.numel() for p in discriminator.parameters()):,}")

    # Optimizers and gradient scalers (fp16 only):
    optimizer = make_optimizer(model, args, device)
    optimizer_disc = make_optimizer(discriminator, args, device)
    scaler, scaler_disc = make_grad_scaler(device, args.mixed_precision), make_grad_scaler(device, args.mixed_precision)

    # Data: per-item seeded augmentation, a sampler that can start mid-epoch.
    base = build_image_dataset(args.dataset, args.data_path, None, args.image_size, split="train")
    dataset = AugmentedImages(base, args.image_size, args.global_seed)
    sampler = ResumableDistributedSampler(len(dataset), rank, world, batch_size, seed=args.global_seed)
    logger.info(f"data set {args.dataset}: {len(dataset):,} images, {sampler.batches_per_epoch} steps per "
                f"epoch at {batch_size} per rank")

    # Resume or fine-tune:
    train_steps, start_epoch, start_batch = 0, 0, 0
    guard = NonFiniteGuard()
    usage = CodeUsage(model.quantize, device)
    if ckpt is not None:
        load_state_dict_strict(model, ckpt["model"], what=f"VQ weights of {ckpt_path}")
        if ema is not None:
            load_state_dict_strict(ema, ckpt["ema"] if "ema" in ckpt else ckpt["model"], what="VQ EMA")
        if args.finetune:
            if "discriminator" in ckpt:
                load_state_dict_strict(discriminator, ckpt["discriminator"], what="discriminator")
            logger.info(f"fine-tuning from {ckpt_path} (weights only; fresh optimizers, step 0)")
        else:
            for key in ("optimizer", "discriminator", "optimizer_disc", "steps"):
                if key not in ckpt:
                    raise SystemExit(f"error: {ckpt_path} has no '{key}': it is not a training checkpoint "
                                     f"(use --finetune to start from its weights)")
            load_state_dict_strict(discriminator, ckpt["discriminator"], what="discriminator")
            optimizer.load_state_dict(ckpt["optimizer"])
            optimizer_disc.load_state_dict(ckpt["optimizer_disc"])
            train_steps = int(ckpt["steps"])
            if "epoch" in ckpt:
                start_epoch, start_batch = int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
            else:  # an official checkpoint: the data position follows from the step count
                start_epoch, start_batch = divmod(train_steps, sampler.batches_per_epoch)
            for key, obj in (("scaler", scaler), ("scaler_disc", scaler_disc), ("code_usage", usage),
                             ("nonfinite", guard)):
                if key in ckpt:
                    obj.load_state_dict(ckpt[key])
            rngs = ckpt.get("rng")
            if rngs is not None and len(rngs) == world:
                set_rng_state(rngs[rank])
            elif rngs is not None:
                logger.warning(f"the checkpoint has RNG states of {len(rngs)} ranks, this run has {world}: "
                               f"dropout draws will differ from an uninterrupted run")
            logger.info(f"resumed {ckpt_path}: step {train_steps}, epoch {start_epoch}, batch {start_batch}")
        del ckpt
    if ckpt_path is None or args.finetune:
        torch.manual_seed(args.global_seed * world + rank)  # per-rank seed (DiT)
        if ema is not None:
            update_ema(ema, model, decay=0.0)

    # Wrap for DDP when distributed (the discriminator's gradients are averaged by hand, see
    # all_reduce_grads):
    raw_model = model
    if dist.is_initialized():
        model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        logger.info("compiling the model (may take several minutes)")
        model = torch.compile(model)
    model.train()
    discriminator.train()

    # Training loop:
    total_steps = args.epochs * sampler.batches_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    skips = SkipCounter()
    metrics_path = run_dir / "metrics.jsonl"
    running: dict[str, torch.Tensor] = {}
    log_steps, t0 = 0, time.perf_counter()
    bar = progress(total=total_steps, initial=train_steps, enabled=info.is_main, desc="train_vq")
    last_saved = train_steps if ckpt_path is not None and not args.finetune else -1

    def save(epoch: int, batch_in_epoch: int) -> None:
        rngs = gather_rng_states()
        if rank == 0:
            state = {
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "discriminator": discriminator.state_dict(),
                "optimizer_disc": optimizer_disc.state_dict(),
                "steps": train_steps,
                "args": dict(vars(args)),
                "vq_model": args.vq_model,
                **({"msvq_config": msvq_config_dict(raw_model)} if isinstance(raw_model, MultiScaleVQVAE)
                   else {"vq_config": config_dict(raw_model)}),
                "epoch": epoch,
                "batch_in_epoch": batch_in_epoch,
                "rng": rngs,
                "scaler": scaler.state_dict(),
                "scaler_disc": scaler_disc.state_dict(),
                "code_usage": usage.state_dict(),
                "nonfinite": guard.state_dict(),
            }
            if ema is not None:
                state["ema"] = ema.state_dict()
            path = save_checkpoint(state, checkpoint_dir / f"{train_steps:07d}.pt")
            logger.info(f"saved checkpoint {path}")
            if args.cloud_save_path:
                copy = Path(args.cloud_save_path) / run_dir.name / "checkpoints" / path.name
                save_checkpoint(state, copy)
                logger.info(f"saved checkpoint copy {copy}")
        barrier()

    logger.info(f"training to step {total_steps} ({args.epochs} epochs of {sampler.batches_per_epoch} steps"
                f"{f', --max-steps {args.max_steps}' if args.max_steps is not None else ''})")
    epoch, batch_in_epoch = start_epoch, start_batch
    while train_steps < total_steps and epoch < args.epochs:
        if batch_in_epoch >= sampler.batches_per_epoch:
            epoch, batch_in_epoch = epoch + 1, 0
            continue
        sampler.set_epoch(epoch, batch_in_epoch)
        dataset.set_epoch(epoch)
        # Its own generator: creating an iterator draws a worker base seed, which must not come
        # from the global RNG (a resumed run creates one more iterator than an uninterrupted one).
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=args.num_workers,
                            collate_fn=collate_skip_corrupt, pin_memory=device.type == "cuda",
                            drop_last=True, generator=torch.Generator().manual_seed(args.global_seed + epoch))
        for batch in loader:
            batch_in_epoch += 1
            skips.add(batch["skipped"])
            have = torch.tensor(float("images" in batch), device=device)
            if all_reduce_sum(have).item() < world:  # some rank got only corrupt files
                continue
            x = batch["images"].to(device, non_blocking=True)
            step = train_steps + 1  # the official GAN schedule counts from 1

            # Generator update:
            requires_grad(discriminator, False)
            optimizer.zero_grad(set_to_none=True)
            with autocast_context(device, args.mixed_precision):
                x_hat, codebook_losses = model(x)
                loss_g, terms = vq_loss.generator_loss(x, x_hat, codebook_losses, step,
                                                       last_layer=raw_model.decoder.last_layer)
            if not guard.check(all_reduce_mean(loss_g.detach()), step):
                logger.warning(f"step {step}: non-finite generator loss, update skipped")
                continue
            scaler.scale(loss_g).backward()
            if args.max_grad_norm > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            if ema is not None:
                update_ema(ema, raw_model, decay=args.ema_decay)

            # Discriminator update (on the same, detached reconstructions):
            requires_grad(discriminator, True)
            optimizer_disc.zero_grad(set_to_none=True)
            with autocast_context(device, args.mixed_precision):
                loss_d, d_terms = vq_loss.discriminator_loss(x, x_hat, step)
            scaler_disc.scale(loss_d).backward()
            all_reduce_grads(discriminator)
            if args.max_grad_norm > 0:
                scaler_disc.unscale_(optimizer_disc)
                torch.nn.utils.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
            scaler_disc.step(optimizer_disc)
            scaler_disc.update()
            train_steps += 1
            bar.update(1)

            # Codebook usage and dead-code restart:
            usage.update(train_steps)
            if args.dead_code_restart > 0:
                n = usage.restart_dead(train_steps, args.dead_code_restart, args.global_seed, optimizer)
                if n:
                    logger.info(f"step {train_steps}: restarted {n} codes unused for "
                                f"{args.dead_code_restart} steps")

            # Log loss terms, usage and speed (averaged over ranks):
            terms.update(d_terms, loss_g=loss_g.detach().float(), codebook_usage=torch.tensor(
                float(codebook_losses[3]), device=device))
            for k, v in terms.items():
                running[k] = running.get(k, 0.0) + v
            log_steps += 1
            if train_steps % args.log_every == 0 or train_steps == total_steps:
                names = sorted(running)
                avg = all_reduce_mean(torch.stack([running[k] for k in names]) / log_steps).tolist()
                row = dict(zip(names, avg))
                dt = time.perf_counter() - t0
                row.update(active_codes=usage.window_fraction(), steps_per_sec=log_steps / max(dt, 1e-9),
                           images_per_sec=log_steps * args.global_batch_size / max(dt, 1e-9))
                text = ", ".join(f"{k} {v:.4g}" for k, v in row.items())
                logger.info(f"(step={train_steps:07d}) {text}")
                if rank == 0:
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps({"step": train_steps, **row}) + "\n")
                if row["codebook_usage"] < args.usage_warn_below:
                    logger.warning(f"codebook usage {row['codebook_usage']:.1%} is below "
                                   f"{args.usage_warn_below:.0%}: the codebook is collapsing (try "
                                   f"--dead-code-restart N, a larger --entropy-loss-ratio or a lower --lr)")
                running, log_steps, t0 = {}, 0, time.perf_counter()

            # Save checkpoint:
            if train_steps % args.ckpt_every == 0:
                save(epoch, batch_in_epoch)
                last_saved = train_steps
            if train_steps >= total_steps:
                break
    bar.close()
    if last_saved != train_steps:
        save(epoch, batch_in_epoch)

    # Report:
    all_skips = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(all_skips, skips.paths)
    else:
        all_skips = [skips.paths]
    report = SkipCounter([p for paths in all_skips for p in paths])
    logger.info(report.report())
    if usage.restarted:
        logger.info(f"{usage.restarted} dead codes restarted in total")
    logger.info(f"done at step {train_steps}")
    cleanup()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # Model
    g = parser.add_argument_group("model")
    g.add_argument("--vq-model", type=str, choices=list(VQ_models) + list(MSVQ_models), default="VQ-16",
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
    return parser


if __name__ == "__main__":
    parser = get_parser()
    args = parser.parse_args()
    main(args, {k: parser.get_default(k) for k in vars(args)})

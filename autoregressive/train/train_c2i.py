"""Train a class-conditional GPT with any decoding strategy, on pre-extracted codes (DDP).

One process (CPU or one GPU):
    python autoregressive/train/train_c2i.py --strategy raster --code-path codes/imagenet_code_c2i_flip_ten_crop \
        --image-size 384 --gpt-model GPT-B
Several (torchrun; what scripts/autoregressive/train_c2i.sh runs):
    torchrun --nproc_per_node=8 autoregressive/train/train_c2i.py --strategy raster --code-path ... \
        --image-size 384 --gpt-model GPT-XL
Resume a killed run from its last complete checkpoint (same data order, same weights):
    python autoregressive/train/train_c2i.py ... --resume results/000-GPT-B-raster
Plan a run first (one process; times real steps, projects the wall time on 1-64 GPUs, writes nothing):
    python autoregressive/train/train_c2i.py --strategy raster --code-path ... --gpt-model GPT-B --estimate

The official LlamaGen flags (its `autoregressive/train/train_c2i.py`) keep their names and defaults; what
differs between strategies lives in `autoregressive/strategies/` (the `--strategy` registry).
"""
from __future__ import annotations

import argparse
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from torch.utils.data import DataLoader

from autoregressive.strategies import (add_strategy_arguments, check_strategy_flags, get_strategy, model_size_names,
                                      parse_driver_args, strategy_names)
from autoregressive.strategies.base import Strategy
from dataset.codes import CodeDataset, check_codes_compatible
from dataset.image_folder import check_class_index
from tokenizer.registry import check_codes, load_tokenizer
from utils.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from utils.cli import run_cli
from utils.distributed import all_reduce_mean, all_reduce_sum, barrier, cleanup, init_distributed
from utils.ema import make_ema, update_ema
from utils.attention_kernels import record_attention_kernels
from utils.logger import create_logger, progress
from utils.memory import peak_memory_bytes
from utils.planner import Phase, Plan, one_process, run_plan
from utils.parallel import (PARALLEL_MODES, clip_grad_norm, gradient_sync, is_sharded, load_optimizer_state,
                            model_state_dict, optimizer_state_dict, wrap_model)
from utils.training import (LR_SCHEDULES, MetricsWriter, NonFiniteGuard, ResumableDistributedSampler, Throughput,
                            autocast_context, gather_rng_states, make_adamw,
                            make_grad_scaler, scheduled_lr, set_rng_state)
from utils.run import given_flags, resume_point, run_folder, take_from_checkpoint

# The flags that fix the model's shape; a resumed run takes them from its checkpoint.
ARCH_FLAGS = ("strategy", "gpt_model", "vocab_size", "cls_token_num", "image_size", "downsample_size",
              "num_classes", "dropout_p", "token_dropout_p", "drop_path_rate", "class_dropout_prob")


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def model_kwargs(args: argparse.Namespace) -> dict:
    """GPTConfig fields from the official flags (resid and FFN dropout both take --dropout-p)."""
    grid = args.image_size // args.downsample_size
    return dict(vocab_size=args.vocab_size, block_size=grid * grid, num_classes=args.num_classes,
                cls_token_num=args.cls_token_num, resid_dropout_p=args.dropout_p,
                ffn_dropout_p=args.dropout_p, token_dropout_p=args.token_dropout_p,
                drop_path_rate=args.drop_path_rate, class_dropout_prob=args.class_dropout_prob)


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """The strategy's RNG for one step (random orders, group sizes): a function of (seed, rank, step),
    so a resumed run draws what the uninterrupted run drew."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rank) * 1_000_033 + step)


def arch_flags(strategy_name: str) -> tuple[str, ...]:
    """The flags that fix the model's shape (the shared ones and the strategy's own) and the
    strategy's training-schedule flags: all taken from the checkpoint on resume."""
    strategy = get_strategy(strategy_name)
    return ARCH_FLAGS + tuple(strategy.arch_flags) + tuple(strategy.schedule_flags)


def hand_over_tokenizer(strategy: Strategy, args: argparse.Namespace) -> torch.nn.Module | None:
    """A strategy that trains with its tokenizer (`tokenizer_flag`; VAR's next-scale inputs come from
    its VQVAE) gets it loaded through the tokenizer registry; the others train on codes alone."""
    path = strategy.tokenizer_path(args) if strategy.tokenizer_flag is not None else None
    if not path:
        return None
    tokenizer = load_tokenizer(path, kind=strategy.tokenizer_kind, downsample=args.downsample_size,
                               **strategy.tokenizer_options(args))
    strategy.use_tokenizer(tokenizer)
    return tokenizer


@dataclass
class TrainState:
    """What a training run carries from step to step, and what its checkpoints hold."""

    model: torch.nn.Module  # wrapped (DDP / FSDP, maybe compiled): what the loss runs through
    raw_model: torch.nn.Module  # unwrapped (FSDP: the sharded module itself), what is saved
    ema: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    guard: NonFiniteGuard
    steps: int = 0  # optimizer steps taken
    data_pos: int = 0  # optimizer-sized batches consumed, skipped ones included


# ---------------------------------------------------------------------------------------------
# The steps of a run
# ---------------------------------------------------------------------------------------------


def resolve_flags(args: argparse.Namespace, given: set[str]) -> None:
    """Before anything else: no flag of another strategy, the strategy's official aliases (VAR's
    --bs, --ep, ...), and its official training recipe when none of its flags was given."""
    check_strategy_flags(args.strategy, given)
    for flag in ("epochs", "global_batch_size", "gradient_accumulation_steps", "log_every", "ckpt_every",
                 "max_steps", "num_classes", "vocab_size", "image_size", "downsample_size", "cls_token_num",
                 "estimate_steps"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.image_size % args.downsample_size:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of --downsample-size "
                         f"{args.downsample_size}: the tokenizer's grid must be whole")
    if args.num_workers < 0:
        raise ValueError(f"--num-workers must be >= 0, got {args.num_workers}")
    cls = get_strategy(args.strategy)
    cls.apply_flag_aliases(args, given)
    if cls.training_recipe and not given & set(cls.training_recipe):
        for k, v in cls.training_recipe.items():
            setattr(args, k, v)


def open_data(args: argparse.Namespace, strategy, tokenizer: torch.nn.Module | None) -> tuple[CodeDataset, dict]:
    """The code folder, checked against the flags (and against the tokenizer a strategy trains
    with, whose codebook builds its inputs) before anything is written."""
    data = CodeDataset(args.code_path, dataset=args.dataset, image_size=args.image_size, seed=args.global_seed)
    if tokenizer is not None:
        check_codes(tokenizer, data.codes_dir, strategy.tokenizer_path(args))
    info = check_codes_compatible(args.code_path, args.dataset, args.image_size, data=data,
                                  codebook_size=args.vocab_size, num_tokens=strategy.code_length(args))
    if data.class_to_idx is not None and len(data.class_to_idx) > args.num_classes:
        raise ValueError(f"the codes have {len(data.class_to_idx)} classes but --num-classes is {args.num_classes}")
    return data, info


def kind_of_run(ckpt: dict) -> str | None:
    """None for a checkpoint this trainer wrote, else what it is."""
    args = ckpt.get("args")
    if isinstance(args, dict) and "strategy" in args and "data_pos" in ckpt:
        return None
    if "vq_config" in ckpt or "msvq_config" in ckpt:
        return "a tokenizer checkpoint (tokenizer/train_vq.py)"
    return "not a checkpoint of train_c2i.py"


def open_run(args: argparse.Namespace, rank: int, world: int) -> tuple[Path, Path | None, dict | None, list[str]]:
    """(run folder, checkpoint to resume or None, its contents, warnings for the log): `--resume
    RUN` continues that run from its newest readable checkpoint, `--gpt-ckpt FILE` continues the
    run that wrote FILE, otherwise a new `<results>/<NNN>-<model>-<strategy>` (made by rank 0)."""
    if args.resume:
        point = resume_point(args.resume, kind_of_run, "train_c2i.py")
        return Path(args.resume), point.path, point.ckpt, point.warnings
    if args.gpt_ckpt:
        path = Path(args.gpt_ckpt)
        ckpt = load_checkpoint(path)
        other = kind_of_run(ckpt) if isinstance(ckpt, dict) else "not a checkpoint dict"
        if other is not None:
            raise ValueError(f"--gpt-ckpt {path} is {other}: to continue a training run pass one of its "
                             f"checkpoints/*.pt (or --resume RUN)")
        return path.parent.parent, path, ckpt, []
    return run_folder(args.results_dir, f"{args.gpt_model}-{args.strategy}", rank, world), None, None, []


def take_run_settings(args: argparse.Namespace, given: set[str], ckpt: dict, path: Path, data: CodeDataset,
                      logger) -> None:
    """A resumed run keeps its architecture and schedule flags (a contradicting flag is an error);
    its class map was checked by `check_run_classes`."""
    saved = ckpt["args"]
    flags = arch_flags(saved.get("strategy", args.strategy))
    take_from_checkpoint(args, saved, flags, given, f"the checkpoint being resumed ({path})")
    logger.info("architecture flags taken from the checkpoint: " + ", ".join(f"{k}={getattr(args, k)}" for k in flags))
    logger.info(f"resuming from {path} (step {ckpt['steps']})")


def check_run_classes(args: argparse.Namespace, ckpt: dict | None, data: CodeDataset) -> None:
    """A resumed run must read codes with the class map it was trained on (the checkpoint's); checked
    before the run's log is opened, so a refused resume writes nothing."""
    if ckpt is not None and ckpt.get("class_to_idx") is not None:
        check_class_index(ckpt["class_to_idx"], data.class_to_idx, f"the codes under {args.code_path}",
                          hint="extract the codes with the --class-map the run was trained on")


def build_state(args: argparse.Namespace, strategy, ckpt: dict | None, path: Path | None, world: int,
                rank: int, device: torch.device, logger) -> TrainState:
    """Model (built, resumed, wrapped for DDP / FSDP, compiled), EMA, optimizer, scaler and the
    non-finite guard; a checkpoint restores them all, the RNG states and the data position.

    The initial weights come from `--global-seed` alone, the same on every rank whatever the world
    size: FSDP keeps each rank's shard of what that rank built, so rank-dependent initial weights
    would make the model a patchwork that changes with the number of ranks. The per-rank RNG
    (`seed * world + rank`: dropout, token dropout) is seeded after the build."""
    if args.ema and is_sharded(args.data_parallel):
        raise ValueError(f"--ema needs the unsharded weights on every rank: use --data-parallel ddp "
                         f"(the official FSDP script has no EMA either), not {args.data_parallel}")
    torch.manual_seed(args.global_seed)
    model = strategy.build_model(args.gpt_model, **model_kwargs(args), **strategy.model_config(args)).to(device)
    ema = make_ema(model) if args.ema else None
    torch.manual_seed(args.global_seed * world + rank)
    scaler = make_grad_scaler(device, args.mixed_precision)
    guard = NonFiniteGuard(args.max_nonfinite_steps)
    logger.info(f"{args.gpt_model} ({args.strategy}): {sum(p.numel() for p in model.parameters()):,} parameters")
    steps = data_pos = 0
    optimizer_state = None
    if ckpt is not None:
        strategy.load_official(model, ckpt["model"], what=f"resume checkpoint {path}")
        if ema is not None:
            strategy.load_official(ema, ckpt["ema"], what=f"resume checkpoint {path} (ema)")
        saved_parallel = ckpt["args"].get("data_parallel", "ddp")
        if is_sharded(saved_parallel) != is_sharded(args.data_parallel):
            raise CheckpointError(f"{path} was written with --data-parallel {saved_parallel}; its optimizer "
                                  f"state only resumes in the same family: pass --data-parallel {saved_parallel}")
        optimizer_state = ckpt["optimizer"]
        scaler.load_state_dict(ckpt["scaler"])
        guard.load_state_dict(ckpt["nonfinite"])
        steps, data_pos = int(ckpt["steps"]), int(ckpt["data_pos"])
        rng = ckpt.get("rng", [])
        if len(rng) == world:
            set_rng_state(rng[rank])
        else:
            logger.info(f"the checkpoint holds RNG states of {len(rng)} ranks, this run has {world}: "
                        f"dropout draws will differ from an uninterrupted run")

    raw_model = model
    model = wrap_model(model, args.data_parallel, world, device, args.mixed_precision, args.grad_precision)
    if is_sharded(args.data_parallel):
        raw_model = model  # sharded in place; its state dicts are gathered collectively
        logger.info(f"FSDP ({args.data_parallel}): every transformer block sharded over {world} rank(s)")
    optimizer = make_adamw(raw_model, args.lr, args.weight_decay, (args.beta1, args.beta2), device.type)
    if optimizer_state is not None:
        load_optimizer_state(model, optimizer, optimizer_state, args.data_parallel)
    if args.compile if args.compile is not None else device.type == "cuda":
        logger.info("compiling the model with torch.compile")
        model = torch.compile(model)
    return TrainState(model, raw_model, ema, optimizer, scaler, guard, steps, data_pos)


def report_attention(state: TrainState, args: argparse.Namespace, strategy, data: CodeDataset,
                     device: torch.device, logger) -> None:
    """Log which attention kernel the training forward runs (one forward of the uncompiled model on
    two items, every rank: FSDP gathers its weights); the RNG streams are left as they were."""
    codes, labels = (torch.stack(x).to(device) for x in zip(*data.__getitems__(list(range(min(2, len(data)))))))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
        with autocast_context(device, args.mixed_precision), record_attention_kernels() as kernels:
            strategy.training_loss(state.raw_model, codes, labels,
                                   generator=step_generator(args.global_seed, 0, 0, device))
    kernels.log(logger, "training forward")


def lr_setter(args: argparse.Namespace, strategy, steps_per_epoch: int):
    """The driver's learning-rate schedule as a function of the data position, or None when the
    rate stays constant or the strategy sets it itself (NPP --scheduler, VAR --wpe)."""
    if args.lr_schedule != "constant" and strategy.owns_lr():
        raise ValueError(f"--strategy {args.strategy} sets its own learning-rate schedule with the flags given "
                         f"(NPP --scheduler, VAR --wpe): drop --lr-schedule {args.lr_schedule}")
    # --warmup-epochs belongs to the strategy's own schedule when it has one (NPP's per-stage warm-up).
    if strategy.owns_lr() or (args.lr_schedule == "constant" and not (args.warmup_epochs or 0) > 0):
        return None

    def set_lr(optimizer: torch.optim.Optimizer, data_pos: int) -> None:
        lr = scheduled_lr(data_pos, steps_per_epoch, args.lr, args.lr_schedule, args.warmup_epochs or 0.0,
                          args.min_lr, args.epochs, args.lr_decay_start_epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr

    return set_lr


def save(state: TrainState, args: argparse.Namespace, data: CodeDataset, steps_per_epoch: int, run_dir: Path,
         rank: int, logger) -> None:
    """A complete checkpoint of the run (every rank takes part: FSDP gathers the weights)."""
    rng = gather_rng_states()
    model_state = model_state_dict(state.raw_model, args.data_parallel)  # collective under FSDP
    optimizer_state = optimizer_state_dict(state.raw_model, state.optimizer, args.data_parallel)
    if rank == 0:
        ckpt = {"model": model_state, "optimizer": optimizer_state, "scaler": state.scaler.state_dict(),
                "steps": state.steps, "data_pos": state.data_pos, "epoch": state.data_pos / steps_per_epoch,
                "args": vars(args), "rng": rng, "nonfinite": state.guard.state_dict(),
                "class_to_idx": data.class_to_idx, "codes": data.describe()}
        if state.ema is not None:
            ckpt["ema"] = state.ema.state_dict()
        path = save_checkpoint(ckpt, Path(run_dir) / "checkpoints" / f"{state.steps:07d}.pt")
        logger.info(f"saved checkpoint {path}")
    barrier()


def data_sampler(args: argparse.Namespace, data: CodeDataset, rank: int, world: int) -> ResumableDistributedSampler:
    """The run's data order on this rank; one of its "batches" is one optimizer step on this rank
    (global batch / world items), so `batches_per_epoch` is the run's steps per epoch."""
    return ResumableDistributedSampler(len(data), rank, world, args.global_batch_size // world, seed=args.global_seed)


def total_steps_of(args: argparse.Namespace, steps_per_epoch: int) -> int:
    """The optimizer steps of the whole run: `--epochs` epochs, or `--max-steps` when fewer."""
    total = args.epochs * steps_per_epoch
    return min(total, args.max_steps) if args.max_steps is not None else total


def epoch_loader(args: argparse.Namespace, data: CodeDataset, sampler: ResumableDistributedSampler, epoch: int,
                 start_batch: int, micro_batch: int, device: torch.device, loader_gen: torch.Generator):
    """The micro-batches of `epoch` from its optimizer-sized batch `start_batch` on."""
    sampler.set_epoch(epoch, start_batch)
    data.set_epoch(epoch)
    return iter(DataLoader(data, batch_size=micro_batch, sampler=sampler, num_workers=args.num_workers,
                           pin_memory=device.type == "cuda", drop_last=True, generator=loader_gen))


@dataclass
class StepResult:
    """One optimizer step: whether it was taken (False: a non-finite loss, skipped), the finite
    micro-batch losses and tokens, the gradient norm and the strategy's scalars."""

    taken: bool
    losses: list[torch.Tensor]
    tokens: int
    grad_norm: torch.Tensor | None
    stage_metrics: dict[str, float]


def train_step(state: TrainState, args: argparse.Namespace, strategy, batches, steps_per_epoch: int, set_lr,
               rank: int, device: torch.device, logger, accum: int | None = None) -> StepResult:
    """One optimizer step on the next `accum` (default --gradient-accumulation-steps) micro-batches
    of `batches`: the strategy's loss, backward, clipping, AdamW, EMA; a step whose loss is not
    finite on some rank is skipped by every rank (its micro-batches are consumed all the same)."""
    accum = accum or args.gradient_accumulation_steps
    model, optimizer = state.model, state.optimizer
    stage_metrics = strategy.on_step(state.data_pos, steps_per_epoch, optimizer)  # e.g. NPP's stage and lr
    if set_lr is not None:
        set_lr(optimizer, state.data_pos)
    finite, losses, tokens = True, [], 0
    for micro in range(accum):
        codes, labels = next(batches)
        codes, labels = codes.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if not finite:
            continue  # consume the rest of a skipped step's micro-batches
        gen = step_generator(args.global_seed, rank, state.data_pos * accum + micro, device)
        with gradient_sync(model, args.data_parallel, enabled=micro == accum - 1):
            with autocast_context(device, args.mixed_precision):
                loss = strategy.training_loss(model, codes, labels, generator=gen)
            # Every rank decides together, or DDP's gradient all-reduce would hang.
            finite = all_reduce_sum((~torch.isfinite(loss.detach())).float()).item() == 0
            if finite:
                state.scaler.scale(loss / accum).backward()
                losses.append(loss.detach())
                tokens += codes.numel()
    state.data_pos += 1
    if not state.guard.check(finite, state.steps):
        logger.info(f"step {state.steps}: non-finite loss, step skipped ({state.guard.total} so far)")
        optimizer.zero_grad(set_to_none=True)
        return StepResult(False, losses, tokens, None, stage_metrics)
    state.scaler.unscale_(optimizer)
    grad_norm = clip_grad_norm(state.raw_model, args.max_grad_norm)
    state.scaler.step(optimizer)
    state.scaler.update()
    optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        update_ema(state.ema, state.raw_model, decay=args.ema_decay)
    state.steps += 1
    return StepResult(True, losses, tokens, grad_norm, stage_metrics)


def train_loop(state: TrainState, args: argparse.Namespace, strategy, data: CodeDataset, micro_batch: int,
               run_dir: Path, rank: int, world: int, device: torch.device, logger) -> None:
    """Optimizer steps until `--epochs` (or `--max-steps`), logging and checkpointing on the way.

    `data_pos` counts the optimizer-sized batches consumed, skipped ones included, so a resumed run
    restarts exactly where the data stopped even after a non-finite step."""
    sampler = data_sampler(args, data, rank, world)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = total_steps_of(args, steps_per_epoch)
    logger.info(f"{len(data):,} code files ({data.layout} layout), {steps_per_epoch} steps per epoch, "
                f"{total_steps} steps in all")
    set_lr = lr_setter(args, strategy, steps_per_epoch)
    optimizer = state.optimizer
    metrics = MetricsWriter(logger, run_dir if rank == 0 else None, enabled=rank == 0)
    meter = Throughput(device)
    loader_gen = torch.Generator().manual_seed(args.global_seed)  # worker seeds, off the global RNG
    running_loss, running_n, grad_norm = torch.zeros((), device=device), 0, torch.zeros(())
    bar = progress(total=total_steps, initial=state.steps, enabled=rank == 0, desc="train", unit="step")
    state.model.train()
    while state.steps < total_steps and state.data_pos < args.epochs * steps_per_epoch:
        epoch, start_batch = divmod(state.data_pos, steps_per_epoch)
        loader = epoch_loader(args, data, sampler, epoch, start_batch, micro_batch, device, loader_gen)
        for _ in range(start_batch, steps_per_epoch):
            step = train_step(state, args, strategy, loader, steps_per_epoch, set_lr, rank, device, logger)
            for loss in step.losses:
                running_loss += loss
            running_n += len(step.losses)
            meter.add(step.tokens)
            if not step.taken:
                continue
            grad_norm = step.grad_norm
            bar.update(1)

            if state.steps % args.log_every == 0 or state.steps == total_steps:
                avg = all_reduce_mean(running_loss / max(running_n, 1)).item()
                tok_s = all_reduce_sum(torch.tensor(meter.read_and_reset(), device=device)).item()
                metrics.write(state.steps, {"train/loss": avg, "train/tokens_per_s": tok_s,
                                            "train/lr": optimizer.param_groups[0]["lr"],
                                            "train/grad_norm": float(grad_norm),
                                            "train/nonfinite_steps": state.guard.total,
                                            "train/epoch": state.data_pos / steps_per_epoch,
                                            "train/peak_mem_gib": peak_memory_bytes(device) / 2**30,
                                            **{f"train/{k}": v for k, v in step.stage_metrics.items()}})
                bar.set_postfix(loss=f"{avg:.4f}")
                running_loss.zero_()
                running_n = 0
            if state.steps % args.ckpt_every == 0 or state.steps == total_steps:
                save(state, args, data, steps_per_epoch, run_dir, rank, logger)
            if state.steps >= total_steps:
                break
    bar.close()
    metrics.close()


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def set_up(args: argparse.Namespace, rank: int, world: int, device: torch.device) -> int:
    """The per-rank micro-batch (the global batch must divide over ranks and accumulation steps),
    the per-rank seed, TF32 on CUDA."""
    if args.global_batch_size % (world * args.gradient_accumulation_steps) != 0:
        raise ValueError(f"--global-batch-size {args.global_batch_size} must divide by world size {world} "
                         f"x --gradient-accumulation-steps {args.gradient_accumulation_steps}")
    torch.manual_seed(args.global_seed * world + rank)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return args.global_batch_size // (world * args.gradient_accumulation_steps)


def open_inputs(args: argparse.Namespace) -> tuple[Strategy, CodeDataset, dict]:
    """The strategy (configured), its tokenizer when it trains with one, and the codes, all checked
    against the flags before anything is written."""
    strategy = get_strategy(args.strategy)
    strategy.configure(args, training=True)
    tokenizer = hand_over_tokenizer(strategy, args)
    data, codes_info = open_data(args, strategy, tokenizer)
    if not (args.resume or args.gpt_ckpt):  # a resumed run takes its architecture from its checkpoint first
        with torch.device("meta"):  # size, grid and strategy flags fit together, before any folder exists
            strategy.build_model(args.gpt_model, **model_kwargs(args), **strategy.model_config(args))
    return strategy, data, codes_info


def estimate(args: argparse.Namespace) -> None:
    """`--estimate`: build the model, data loader and optimizer as a new run would, time real steps
    of every cost phase in this process and print the run plan (`utils/planner.py`); writes nothing."""
    if args.resume or args.gpt_ckpt:
        raise ValueError("--estimate plans a new run: drop --resume / --gpt-ckpt (give the run's "
                         "architecture flags instead; the weights do not change the timing)")
    with one_process(args.device, is_sharded(args.data_parallel)) as info:
        device = info.device
        micro_batch = set_up(args, 0, 1, device)
        strategy, data, _ = open_inputs(args)
        logger = create_logger("train_c2i.estimate", None, 0)  # console only
        state = build_state(args, strategy, None, None, 1, 0, device, logger)
        report_attention(state, args, strategy, data, device, logger)
        sampler = data_sampler(args, data, 0, 1)
        steps_per_epoch = sampler.batches_per_epoch
        set_lr = lr_setter(args, strategy, steps_per_epoch)
        loader_gen = torch.Generator().manual_seed(args.global_seed)

        def batches():  # the run's loader from its first batch on, epoch after epoch
            for epoch in itertools.count():
                yield from epoch_loader(args, data, sampler, epoch, 0, micro_batch, device, loader_gen)

        stream = batches()
        first = next(stream)
        state.model.train()

        def step() -> int:
            return train_step(state, args, strategy, stream, steps_per_epoch, set_lr, 0, device, logger).tokens

        def try_micro_batch(k: int) -> None:  # the first batch tiled to k: memory depends on shapes only
            codes, labels = (t.repeat(-(-k // len(t)), *[1] * (t.dim() - 1))[:k] for t in first)
            train_step(state, args, strategy, iter([(codes, labels)]), steps_per_epoch, set_lr, 0, device,
                       logger, accum=1)

        def run_steps_between(start: int, end: int):
            def run_steps(gpus: int) -> int:
                if args.global_batch_size % gpus:
                    raise ValueError(f"global batch does not divide over {gpus} GPUs")
                spe = data_sampler(args, data, 0, gpus).batches_per_epoch
                total = total_steps_of(args, spe)
                return max(0, min(end * spe, total) - min(start * spe, total))
            return run_steps

        def begin_at(epoch: int):
            def begin() -> None:
                state.data_pos = epoch * steps_per_epoch  # the strategy's stage (and lr) of that epoch
            return begin

        def after_oom() -> None:
            state.optimizer.zero_grad(set_to_none=True)
            state.scaler = make_grad_scaler(device, args.mixed_precision)

        starts = strategy.cost_phases()
        ends = [e for _, e in starts[1:]] + [args.epochs]
        phases = [Phase(name, step, run_steps_between(start, end), begin_at(start), try_micro_batch)
                  for (name, start), end in zip(starts, ends)]
        total = total_steps_of(args, steps_per_epoch)
        summary = f"{args.epochs} epochs x {steps_per_epoch:,} steps per epoch at global batch " \
                  f"{args.global_batch_size} ({len(data):,} code files) = {args.epochs * steps_per_epoch:,} steps"
        if total < args.epochs * steps_per_epoch:
            summary += f"; --max-steps {args.max_steps}: {total:,} steps"
        notes = []
        if is_sharded(args.data_parallel):
            notes.append(f"--data-parallel {args.data_parallel}: measured on one rank, where nothing is sharded; "
                         f"over G GPUs each holds 1/G of the weights, gradients and optimizer state (less memory) "
                         f"and every step adds all-gathers and reduce-scatters (not modelled)")
        compiled = args.compile if args.compile is not None else device.type == "cuda"
        precision = args.mixed_precision if device.type == "cuda" else "float32: CPU runs ignore --mixed-precision"
        plan = Plan(title=f"{args.gpt_model} --strategy {args.strategy}, {args.image_size} px, "
                          f"{strategy.code_length(args)} codes per image",
                    parameters={args.gpt_model: sum(p.numel() for p in state.raw_model.parameters())},
                    phases=phases, global_batch=args.global_batch_size, micro_batch=micro_batch,
                    accumulation=args.gradient_accumulation_steps, can_accumulate=True, device=device,
                    precision=precision, warmup=2 if compiled else 1, run_summary=summary, after_oom=after_oom,
                    notes=notes)
        run_plan(plan, args.estimate_steps)


def main(args: argparse.Namespace, given: set[str] | None = None) -> Path | None:
    """Train (or with --estimate plan the run and return None); `given` names the flags the user
    gave (default: those that differ from the defaults)."""
    given = given if given is not None else given_flags(build_parser(), args=args)
    resolve_flags(args, given)
    if args.estimate:
        return estimate(args)

    # Setup DDP ------------------------------------------------------------------------------
    dist_info = init_distributed(args.device)
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    micro_batch = set_up(args, rank, world, device)

    # Data and strategy flags: checked before anything is written -----------------------------
    strategy, data, codes_info = open_inputs(args)

    # Experiment folder: a new run, or the run being resumed ---------------------------------
    run_dir, resume_path, ckpt, notes = open_run(args, rank, world)
    check_run_classes(args, ckpt, data)
    logger = create_logger("train_c2i", run_dir, rank)
    for note in notes:
        logger.warning(note)
    if codes_info.get("warning"):
        logger.info(f"codes: {codes_info['warning']}")
    if ckpt is not None:
        take_run_settings(args, given, ckpt, resume_path, data, logger)
        strategy = get_strategy(args.strategy)  # configured for the flags the checkpoint fixed
        strategy.configure(args, training=True)
        hand_over_tokenizer(strategy, args)
    logger.info(f"run folder {run_dir}; world size {world}; device {device}; micro-batch {micro_batch}")

    # Model, EMA, optimizer, loop ------------------------------------------------------------
    state = build_state(args, strategy, ckpt, resume_path, world, rank, device, logger)
    del ckpt
    report_attention(state, args, strategy, data, device, logger)
    train_loop(state, args, strategy, data, micro_batch, run_dir, rank, world, device, logger)
    logger.info(f"done: {state.steps} steps, {state.guard.total} non-finite step(s) skipped")
    cleanup()
    return Path(run_dir)


# ---------------------------------------------------------------------------------------------
# Flags (official names and defaults of LlamaGen's `autoregressive/train/train_c2i.py`)
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Strategy and model
    p.add_argument("--strategy", type=str, default="raster", choices=strategy_names(),
                   help="decoding strategy (what the model learns to predict)")
    p.add_argument("--gpt-model", type=str, default="GPT-B", choices=model_size_names(),
                   help="model size (each strategy has its own sizes)")
    p.add_argument("--gpt-ckpt", type=str, default=None, help="resume from this training checkpoint file")
    p.add_argument("--gpt-type", type=str, default="c2i", choices=["c2i"], help="class-conditional only")
    p.add_argument("--vocab-size", type=int, default=16384, help="codebook size of the tokenizer")
    p.add_argument("--cls-token-num", type=int, default=1, help="class tokens before the image tokens")
    p.add_argument("--dropout-p", type=float, default=0.1, help="residual and FFN dropout")
    p.add_argument("--token-dropout-p", type=float, default=0.1, help="dropout on the input embeddings")
    p.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth (does not change --dropout-p)")
    p.add_argument("--class-dropout-prob", type=float, default=0.1, help="label dropout for classifier-free guidance")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the weights (saved as 'ema')")
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per step")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile the model (default: on for CUDA, off on CPU)")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="do not compile")
    # Data
    p.add_argument("--code-path", type=str, required=True, help="folder written by extract_codes_c2i.py")
    p.add_argument("--dataset", type=str, default="imagenet", help="data set name in the code folder names")
    p.add_argument("--image-size", type=int, default=256, help="image size the codes were extracted at")
    p.add_argument("--downsample-size", type=int, default=16, help="tokenizer downsampling factor")
    p.add_argument("--num-classes", type=int, default=1000, help="number of classes")
    p.add_argument("--num-workers", type=int, default=24, help="DataLoader workers per rank")
    # Optimisation
    p.add_argument("--epochs", type=int, default=300, help="training epochs")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (e.g. a short test)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (constant, as official)")
    p.add_argument("--lr-schedule", type=str, default="constant", choices=list(LR_SCHEDULES),
                   help="constant (LlamaGen), cosine after the warm-up (ARPG: --warmup-epochs 100 --min-lr 1e-5), "
                        "constant+cosine from --lr-decay-start-epoch (LPD)")
    p.add_argument("--warmup-epochs", type=float, default=None,
                   help="linear warm-up from 0 (default 0; NPP --scheduler: 1 per stage)")
    p.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine")
    p.add_argument("--lr-decay-start-epoch", type=float, default=None,
                   help="constant+cosine: the epoch the cosine starts (LPD's --lr_decay_start_epoch)")
    p.add_argument("--weight-decay", type=float, default=5e-2, help="AdamW weight decay on 2-D weights")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm")
    p.add_argument("--global-batch-size", type=int, default=256, help="batch over all ranks and micro-steps")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--data-parallel", type=str, default="ddp", choices=list(PARALLEL_MODES),
                   help="ddp, or FSDP for XXL/3B: fsdp = FULL_SHARD, sdp = SHARD_GRAD_OP, hsdp = HYBRID_SHARD")
    p.add_argument("--grad-precision", type=str, default=None, choices=["fp32", "fp16", "bf16"],
                   help="FSDP gradient reduction dtype (default fp32)")
    p.add_argument("--mixed-precision", type=str, default="bf16", choices=["none", "fp16", "bf16"],
                   help="autocast dtype on CUDA (CPU runs float32)")
    p.add_argument("--max-nonfinite-steps", type=int, default=10,
                   help="stop when this many steps in a row have a non-finite loss")
    # Run
    p.add_argument("--global-seed", type=int, default=0,
                   help="seed: the initial weights from it alone (the same for any number of ranks, DDP or "
                        "FSDP), dropout per rank from seed * world + rank")
    p.add_argument("--results-dir", type=str, default="results", help="new runs go to <results>/<NNN>-<model>")
    p.add_argument("--resume", type=str, default=None, help="run folder to resume from its last checkpoint")
    p.add_argument("--log-every", type=int, default=100, help="log every N steps")
    p.add_argument("--ckpt-every", type=int, default=5000, help="checkpoint every N steps")
    p.add_argument("--device", type=str, default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    # Planning
    p.add_argument("--estimate", action="store_true",
                   help="plan the run instead: build model and data loader as the run would, time real steps in "
                        "this one process, print parameters, peak memory, speed and the projected wall time on "
                        "1-64 GPUs (and on CUDA the largest micro-batch that fits); writes nothing")
    p.add_argument("--estimate-steps", type=int, default=20,
                   help="--estimate: timed steps (per cost phase), after 1 (2 with torch.compile) untimed warm-up")
    add_strategy_arguments(p)
    return p


if __name__ == "__main__":
    run_cli(main, *parse_driver_args(build_parser()))

"""Sample N images per class with any strategy over torchrun ranks and pack the ADM `.npz`.

One process:
    python autoregressive/sample/sample_c2i_ddp.py --strategy raster --gpt-model GPT-XL \
        --gpt-ckpt pretrained_models/c2i_XL_384.pt --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --image-size 384 --image-size-eval 256 --cfg-scale 1.75
Eight GPUs (what scripts/autoregressive/sample_c2i.sh runs):
    torchrun --nproc_per_node=8 autoregressive/sample/sample_c2i_ddp.py ...

Image i has class `i % num_classes` (50 per class by default; `--labels random` draws labels as the
official driver does, from the seed) and a seed derived from `--global-seed` and i, so the images do
not depend on the number of ranks. Finished batches are written as atomic shards; a rerun keeps
them. Rank 0 packs `<sample-dir>/<name>.npz` (`arr_0` uint8 NHWC, `labels`) and writes
`<name>.json` with every setting and the checkpoints' SHA-256, and `fast_path_fallback`: null, or
how many batches `--decode-path auto` decoded eagerly after its fast path failed, and the first error.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from autoregressive.decoding.fast_decode import FastPathFallback
from autoregressive.decoding.row_rng import image_seeds
from autoregressive.sample.common import add_sampling_args, check_sampling_flags, load_sampler, sample_plan
from autoregressive.strategies import parse_driver_args
from utils.attention_kernels import record_attention_kernels
from utils.checkpoint import file_sha256, save_json
from utils.cli import run_cli
from utils.distributed import all_gather_object, barrier, cleanup, init_distributed
from utils.logger import create_logger, progress
from utils.memory import peak_memory_text
from utils.shards import (SettingsMismatch, check_shard_folder, claim_shard_folder, finished_shards, pack_npz,
                          to_uint8, write_pngs, write_shard)


def run_name(args: argparse.Namespace) -> str:
    """The official folder name, prefixed by the strategy and with the steps when set."""
    ckpt_name = Path(args.gpt_ckpt).stem if not args.from_fsdp else Path(args.gpt_ckpt).parent.name
    steps = f"-steps-{args.steps}" if args.steps is not None else ""
    return (f"{args.strategy}-{args.gpt_model or 'GPT'}-{ckpt_name}-size-{args.image_size}-size-{args.image_size_eval}"
            f"-{args.vq_model}-topk-{args.top_k}-topp-{args.top_p}-temperature-{args.temperature}"
            f"-cfg-{args.cfg_scale}{steps}-seed-{args.global_seed}")


def labels_and_seeds(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    total = args.num_fid_samples
    if args.labels == "balanced":
        per_class = math.ceil(total / args.num_classes)
        labels, seeds = sample_plan(args.num_classes, per_class, args.global_seed)
        return labels[:total], seeds[:total]
    seeds = image_seeds(args.global_seed, torch.arange(total))
    labels = image_seeds(args.global_seed + 1, torch.arange(total)) % args.num_classes
    return labels, seeds


#: flags that do not change the images: a sample folder resumes whatever they are (a moved
#: folder or checkpoint file included; the checkpoints' SHA-256 stand for their contents).
NOT_IMAGE_SETTINGS = ("device", "sample_dir", "gpt_ckpt", "vq_ckpt", "from_fsdp", "save_png", "verify_fast_path")
#: settings a rerun may change: more images, or the batch layout when no shard exists yet.
MAY_CHANGE = ("num_fid_samples", "per_proc_batch_size")


def image_settings(args: argparse.Namespace, rank: int) -> dict:
    """What determines the images (rank 0 hashes the checkpoints), recorded with the shards."""
    settings = {k: v for k, v in vars(args).items() if k not in NOT_IMAGE_SETTINGS}
    settings["gpt_ckpt_sha256"] = file_sha256(args.gpt_ckpt) if rank == 0 else None
    settings["vq_ckpt_sha256"] = file_sha256(args.vq_ckpt) if rank == 0 else None
    return settings


def check_sample_folder(folder: Path, settings: dict, per_proc_batch_size: int) -> None:
    """Refuse (read-only) a folder whose shards were made with other settings or batch size."""
    settings_file = folder / "settings.json"
    if settings_file.is_file() and finished_shards(folder):
        old_bs = json.loads(settings_file.read_text()).get("per_proc_batch_size")
        if old_bs not in (None, per_proc_batch_size):
            raise SettingsMismatch(f"{folder} holds shards of --per-proc-batch-size {old_bs}; "
                                   f"rerun with that batch size to resume")
    check_shard_folder(folder, settings, may_change=MAY_CHANGE)


def main(args: argparse.Namespace, given: set[str] | None = None) -> Path:
    # Setup ----------------------------------------------------------------------------------
    info = init_distributed(args.device)
    rank, world, device = info.rank, info.world_size, info.device
    name = run_name(args)
    folder = Path(args.sample_dir) / name
    logger = create_logger("sample", None, rank)  # to the folder once the run is accepted
    torch.backends.cuda.matmul.allow_tf32 = True

    # Checks before anything is written: counts, shards of other settings, the models -----------
    for flag in ("num_fid_samples", "per_proc_batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_sampling_flags(args)
    settings = image_settings(args, rank)
    if rank == 0:
        check_sample_folder(folder, settings, args.per_proc_batch_size)
    sampler = load_sampler(args, device, given)
    if rank == 0:
        claim_shard_folder(folder, settings, may_change=MAY_CHANGE)
    barrier()
    logger = create_logger("sample", folder if rank == 0 else None, rank)
    sampler.log = logger.info

    # Plan -------------------------------------------------------------------------------------
    labels, seeds = labels_and_seeds(args)
    total, bs = len(labels), args.per_proc_batch_size
    num_batches = math.ceil(total / bs)
    done = finished_shards(folder)
    mine = [b for b in range(rank, num_batches, world) if b * bs not in done]
    logger.info(f"{total} images ({args.labels} labels), {num_batches} batches of {bs}; "
                f"{len(done)} already done, {len(mine)} for rank 0 now; decode path {sampler.strategy.runner.name} "
                f"(the first batch of each size compiles and captures its steps)")

    # Sample ---------------------------------------------------------------------------------
    t0, made = time.perf_counter(), 0
    for i, b in enumerate(progress(mine, enabled=rank == 0, desc="sample", unit="batch")):
        lo, hi = b * bs, min((b + 1) * bs, total)
        with record_attention_kernels() if i == 0 else nullcontext() as kernels:
            images = sampler.images(labels[lo:hi], seeds[lo:hi])
        if i == 0:
            kernels.log(logger, "first sampling batch")
        images = to_uint8(images, args.image_size_eval)
        if args.save_png:  # before the shard: a finished shard always has its PNGs
            write_pngs(Path(args.sample_dir) / f"{name}_png", lo, images)
        write_shard(folder, lo, images, labels[lo:hi].numpy())
        made += hi - lo
    if device.type == "cuda":
        torch.cuda.synchronize()
    if made:
        logger.info(f"rank 0: {made} images in {time.perf_counter() - t0:.1f} s; {peak_memory_text(device)}")
    fallback = FastPathFallback.merge(all_gather_object(sampler.strategy.runner.fallback))
    if fallback is not None:
        logger.warning(str(fallback))
    barrier()

    # Pack -------------------------------------------------------------------------------------
    out = Path(args.sample_dir) / f"{name}.npz"
    if rank == 0:
        pack_npz(folder, out, total)
        save_json(out.with_suffix(".json"), {**settings, "fast_path_fallback": asdict(fallback) if fallback else None})
        logger.info(f"wrote {out} ({total} images, {args.image_size_eval}x{args.image_size_eval})")
    barrier()
    cleanup()
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p)
    o = p.add_argument_group("output")
    o.add_argument("--sample-dir", type=str, default="samples", help="shards and the .npz go here")
    o.add_argument("--per-proc-batch-size", type=int, default=32, help="images per batch per rank")
    o.add_argument("--num-fid-samples", type=int, default=50000, help="number of images")
    o.add_argument("--save-png", action="store_true",
                   help="also write every image as <sample-dir>/<name>_png/<index>.png (the official LPD "
                        "layout, for torch-fidelity); the .npz is written either way")
    o.add_argument("--labels", type=str, default="balanced", choices=["balanced", "random"],
                   help="balanced: image i has class i %% num_classes (50 per class); random: drawn from "
                        "the seed like the official driver (uniform, not balanced)")
    return p


if __name__ == "__main__":
    run_cli(main, *parse_driver_args(build_parser()))

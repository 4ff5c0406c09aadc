"""Sample N images per class with any strategy over torchrun ranks and pack the ADM `.npz`.

One process:
    python autoregressive/sample/sample_c2i_ddp.py --strategy raster --gpt-model GPT-XL \
        --gpt-ckpt pretrained_models/c2i_XL_384.pt --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --image-size 384 --image-size-eval 256 --cfg-scale 1.75
Eight GPUs (what scripts/autoregressive/sample_c2i.sh runs):
    torchrun --nproc_per_node=8 autoregressive/sample/sample_c2i_ddp.py ...

Image i has class `i % num_classes` (50 per class by default; `--labels random` draws labels as the
official driver does, from the seed) and a seed derived from `--global-seed` and i, so the images do
not depend on the number of ranks. `--num-classes` defaults to the checkpoint's; a checkpoint whose
class map has fewer classes than class embeddings is sampled over the map's classes only. Finished
batches are written as atomic shards; a rerun keeps them. Rank 0 packs `<sample-dir>/<name>.npz`
(`arr_0` uint8 NHWC, `labels`) and writes `<name>.json` with every setting and the checkpoints'
SHA-256, the checkpoint's class map (null for official files), and `fast_path_fallback`: null, or
how many batches `--decode-path auto` decoded eagerly after its fast path failed, and the first
error. `<name>` (`run_name`) spells out every setting that changes the images, so two runs that
differ never share a folder.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from autoregressive.decoding.fast_decode import FastPathFallback
from autoregressive.decoding.row_rng import image_seeds
from autoregressive.sample.common import (CheckpointClasses, add_sampling_args, check_sampling_flags, load_sampler,
                                         prefetch, sample_plan)
from autoregressive.strategies import STRATEGIES, parse_driver_args
from tokenizer.registry import get_kind
from utils.attention_kernels import record_attention_kernels
from utils.checkpoint import file_sha256, save_json
from utils.cli import run_cli
from utils.distributed import all_gather_object, barrier, cleanup, init_distributed
from utils.logger import create_logger, progress
from utils.memory import peak_memory_text
from utils.run import given_flags
from utils.shards import (SettingsMismatch, check_shard_folder, claim_shard_folder, finished_shards, pack_npz,
                          to_uint8, write_pngs, write_shard)


def checkpoint_name(gpt_ckpt: str, from_fsdp: bool = False) -> str:
    """The checkpoint part of a sample name: the file's stem as official (`--from-fsdp`: its folder);
    a checkpoint of our trainer (`<run>/checkpoints/<step>.pt`) is `<run>-<step>`, since its bare
    step number would name every run's checkpoint of that step alike."""
    path = Path(gpt_ckpt)
    if from_fsdp:
        return path.parent.name
    if path.parent.name == "checkpoints" and path.parent.parent.name:
        return f"{path.parent.parent.name}-{path.stem}"
    return path.stem


def tokenizer_name(args: argparse.Namespace) -> str:
    """The tokenizer the strategy decodes with: `--vq-model` when it is a size of the strategy's
    tokenizer kind, else the kind (VAR's multi-scale VQVAE: `MSVQ`, never the unused `VQ-16`)."""
    kind = get_kind(STRATEGIES[args.strategy].tokenizer_kind)
    return args.vq_model if args.vq_model in kind.sizes else kind.name.upper()


def _value_text(value: object) -> str:
    """A flag value as file-name text: a path by its stem, JSON lists without brackets or spaces,
    other characters outside [A-Za-z0-9._,+=-] as '_'; a long value is cut and ends with its hash."""
    text = str(value)
    if "/" in text or "\\" in text:
        text = Path(text).stem
    text = re.sub(r"[^A-Za-z0-9._,+=-]", "_", re.sub(r"[\[\]\s\"']", "", text))
    if len(text) > 40:
        text = f"{text[:24]}~{hashlib.sha256(str(value).encode()).hexdigest()[:8]}"
    return text


def _name_part(flag: str, value: object) -> str:
    """`flag-value`; a switch is `flag` when on and `no-flag` when off."""
    if value is True:
        return flag
    if value is False:
        return f"no-{flag}"
    return f"{flag}-{_value_text(value)}"


#: the longest sample name; a longer one is cut and ends with a hash of the whole
MAX_NAME = 200
#: the settings the official name spells out (its backbone, see `run_name`)
NAME_BACKBONE = ("strategy", "gpt_model", "gpt_ckpt", "from_fsdp", "image_size", "image_size_eval", "vq_model",
                 "top_k", "top_p", "temperature", "cfg_scale", "global_seed")


def run_name(args: argparse.Namespace) -> str:
    """The sample folder and `.npz` name: every setting that changes the images, so that two runs
    that differ never share a folder (a run resumes only a folder of its own settings).

    Backbone, the official LlamaGen pattern prefixed by the strategy:
    `<strategy>-<gpt-model>-<ckpt>-size-<S>-size-<S_eval>-<tokenizer>-topk-<k>-topp-<p>-temperature-<t>
    -cfg-<scale>-seed-<seed>`; then the strategy's `image_flags` (its decoding flags, always, as
    `-<flag>-<value>`, unset ones left out); then, in the parser's order, every other flag that
    changes the images (all flags but `NOT_IMAGE_SETTINGS`, `MAY_CHANGE` and the backbone) whose
    value differs from its default, e.g. `-cfg-interval-0.5-labels-random-num-classes-10`. The
    checkpoints' contents are not in the name: their SHA-256 in the folder's settings refuses a
    folder of other weights."""
    ckpt = checkpoint_name(args.gpt_ckpt, args.from_fsdp)
    parts = [f"{args.strategy}-{args.gpt_model or 'GPT'}-{ckpt}-size-{args.image_size}-size-{args.image_size_eval}"
             f"-{tokenizer_name(args)}-topk-{args.top_k}-topp-{args.top_p}-temperature-{args.temperature}"
             f"-cfg-{args.cfg_scale}-seed-{args.global_seed}"]
    declared = STRATEGIES[args.strategy].image_flags
    for dest in declared:
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            parts.append(_name_part(dest.replace("_", "-"), value))
    skip = {*NOT_IMAGE_SETTINGS, *MAY_CHANGE, *NAME_BACKBONE, *declared}
    for action in build_parser()._actions:
        dest = action.dest
        if action.option_strings and dest not in skip and hasattr(args, dest) and getattr(args, dest) != action.default:
            parts.append(_name_part(dest.replace("_", "-"), getattr(args, dest)))
    name = "-".join(parts)
    if len(name) > MAX_NAME:  # file names end at 255 bytes, and `<name>.reproduce.json` is 15 more
        name = f"{name[:MAX_NAME - 11]}~{hashlib.sha256(name.encode()).hexdigest()[:10]}"
    return name


def labels_and_seeds(args: argparse.Namespace, class_ids: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, seeds) of the run's images: image i has class `class_ids[i % C]` (balanced) or a
    class drawn from the seed (random); `class_ids` defaults to 0 .. --num-classes - 1."""
    total = args.num_fid_samples
    ids = torch.tensor(class_ids if class_ids is not None else list(range(args.num_classes)), dtype=torch.long)
    if args.labels == "balanced":
        per_class = math.ceil(total / len(ids))
        labels, seeds = sample_plan(len(ids), per_class, args.global_seed)
        return ids[labels[:total]], seeds[:total]
    seeds = image_seeds(args.global_seed, torch.arange(total))
    labels = image_seeds(args.global_seed + 1, torch.arange(total)) % len(ids)
    return ids[labels], seeds


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


def resolve_classes(args: argparse.Namespace, given: set[str] | None = None) -> CheckpointClasses:
    """Read the checkpoint's class records before anything else: `--num-classes` defaults to the
    checkpoint's (so the folder name says it), and a class map must fit it."""
    given = given if given is not None else given_flags(build_parser(), args=args)
    classes = CheckpointClasses.read(args.gpt_ckpt)
    classes.resolve(args, given)
    return classes


def main(args: argparse.Namespace, given: set[str] | None = None) -> Path:
    # Setup ----------------------------------------------------------------------------------
    classes = resolve_classes(args, given)
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
    class_ids = classes.ids(args.num_classes)
    if len(class_ids) < args.num_classes:
        logger.info(f"sampling the {len(class_ids)} classes of the checkpoint's class map (the model has "
                    f"{args.num_classes} class embeddings)")
    labels, seeds = labels_and_seeds(args, class_ids)
    total, bs = len(labels), args.per_proc_batch_size
    num_batches = math.ceil(total / bs)
    done = finished_shards(folder)
    mine = [b for b in range(rank, num_batches, world) if b * bs not in done]
    logger.info(f"{total} images ({args.labels} labels), {num_batches} batches of {bs}; "
                f"{len(done)} already done, {len(mine)} for rank 0 now; decode path {sampler.strategy.runner.name} "
                f"(the first batch of each size compiles and captures its steps)")

    # Sample ---------------------------------------------------------------------------------
    # The next batch's host-side set-up (LPD: its orders) is built in a worker thread meanwhile.
    def prepare(b: int) -> object:
        return sampler.prepare(labels[b * bs:(b + 1) * bs], seeds[b * bs:(b + 1) * bs])

    t0, made = time.perf_counter(), 0
    with closing(prefetch(mine, prepare)) as batches:  # closed (its worker joined) also on an error
        for i, (b, prepared) in enumerate(progress(batches, enabled=rank == 0, desc="sample", unit="batch",
                                                   total=len(mine))):
            lo, hi = b * bs, min((b + 1) * bs, total)
            with record_attention_kernels() if i == 0 else nullcontext() as kernels:
                images = sampler.images(labels[lo:hi], seeds[lo:hi], prepared)
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
        save_json(out.with_suffix(".json"), {**settings, "class_to_idx": classes.class_to_idx,
                                             "fast_path_fallback": asdict(fallback) if fallback else None})
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

"""Extract the VQ code indices of a class-folder data set once, in the layout GPT training reads (DDP).

One process (CPU or one GPU):
    python autoregressive/train/extract_codes_c2i.py --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --data-path imagenet/train --code-path codes/imagenet_code_c2i_flip --image-size 256
Several (torchrun; what scripts/autoregressive/extract_codes_c2i.sh runs), ten-crop as in the paper:
    torchrun --nproc_per_node=8 autoregressive/train/extract_codes_c2i.py --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --data-path imagenet/train --code-path codes/imagenet_code_c2i_flip_ten_crop --ten-crop --crop-range 1.1 \
        --image-size 384
The embedded demo set (no --data-path):
    python autoregressive/train/extract_codes_c2i.py --dataset digits --image-size 32 --vq-model VQ-debug \
        --codebook-size 512 --vq-ckpt results/vq-debug.pt --code-path codes/digits_flip --device cpu
VAR's multi-scale VQVAE (`--vq-model MSVQ-16` for vae_ch160v4096z32.pth, or MSVQ-debug): the codes are
the per-scale ids concatenated, (1, num_aug, sum pn^2); patch_nums come from our checkpoint, else
from --v-patch-nums or the official list of --image-size:
    python autoregressive/train/extract_codes_c2i.py --vq-model MSVQ-16 --vq-ckpt pretrained_models/vae_ch160v4096z32.pth \
        --data-path imagenet/train --code-path codes/imagenet_var --image-size 256

Writes, as the official `extract_codes_c2i.py` of FoundationVision/LlamaGen does,
`<code-path>/<dataset><S>_codes/<k>.npy` int64 (1, num_aug, N) and `<dataset><S>_labels/<k>.npy`
int64 (1,), k = the image's index in the data set; rank r encodes k = r, r+W, r+2W, ... (no padding
duplicates). Views: without --ten-crop the ADM centre crop and its mirror (num_aug 2); with it the ten
crops of an int(S * crop_range) centre crop (num_aug 10). Each file is written atomically.

Beside the codes (`<dataset><S>_codes/`): `codes_meta.json` (tokenizer identity, image size, crop
setting, num_aug, class map, data set size, skipped images), `class_to_idx.json` (the class map:
`--class-map FILE`, else the sorted folder names), and, written last
by a run that finished, `manifest.json`. A rerun skips the images whose code and label files both
exist. One code path holds the codes of one tokenizer at one image size and crop setting: adding
anything else is refused before a file is written.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from dataset.build import CLASS_MAP_HELP, IMAGE_DATASETS, build_image_dataset
from dataset.code_shards import (DEFAULT_SHARD_SIZE, SHARDS_SUFFIX, code_dtype, finished_code_shards, num_shards,
                                 read_shard_settings, shard_range, shard_settings, shards_dir, write_code_shard)
from dataset.codes import MANIFEST_FILE, META_FILE, META_FORMAT, code_dirs, npy_indices, read_meta
from dataset.image_folder import DatasetError, collate_skip_corrupt, write_class_index
from dataset.transforms import center_crop_tensor, ten_crop_tensor
from tokenizer.registry import codebook, code_length, encode, identity, kind_of_size, load_tokenizer, size_names
from utils.checkpoint import save_json, save_npy
from utils.cli import run_cli
from utils.distributed import DistInfo, all_gather_object, all_reduce_sum, barrier, cleanup, init_distributed
from utils.logger import create_logger, progress


class ExtractError(ValueError):
    """Settings that extraction refuses before writing anything."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def extraction_transform(img, image_size: int, ten_crop: bool, crop_range: float,
                         flip: bool = True) -> torch.Tensor:
    """PIL image -> the views encoded before flipping: (10,3,S,S) with --ten-crop (5 without the
    mirrored crops under --no-flip), else (1,3,S,S)."""
    if ten_crop:
        views = ten_crop_tensor(img, image_size, crop_range)
        return views if flip else views[:5]
    return center_crop_tensor(img, image_size)


def num_views(ten_crop: bool, flip: bool) -> int:
    """Views per image: 10 / 2 as the official (ten-crop / centre + mirror), halved by --no-flip."""
    return (10 if ten_crop else 2) // (1 if flip else 2)


def encode_images(vq: nn.Module, views: torch.Tensor, ten_crop: bool, flip: bool = True) -> np.ndarray:
    """(B,V,3,S,S) views of B images -> int64 codes (B, num_aug, N), all in one forward.

    Ten-crop views already contain their mirrors (TenCrop); otherwise each image's views are
    followed by their mirrors, [x, flip(x)] (num_aug 2) as the official. `flip=False` (data where a
    mirror changes the class, e.g. digits) encodes the views as they are. Each image's codes are
    those of the official one-image forward: the encoder treats batch items independently.
    """
    if not (ten_crop or not flip):
        views = torch.cat([views, torch.flip(views, dims=[-1])], dim=1)
    b, num_aug = views.shape[:2]
    idx = encode(vq, views.flatten(0, 1))  # (B * num_aug, N)
    return idx.reshape(b, num_aug, -1).to("cpu", torch.int64).numpy()


def encode_image(vq: nn.Module, views: torch.Tensor, ten_crop: bool, flip: bool = True) -> np.ndarray:
    """(V,3,S,S) views of one image -> int64 codes (1, num_aug, N): the official one-image forward."""
    return encode_images(vq, views[None], ten_crop, flip)


@dataclass
class Tokenizer:
    """The loaded tokenizer, what identifies it beside its codes, and its codes per image."""

    model: nn.Module
    identity: dict
    num_tokens: int
    codebook_size: int


def open_tokenizer(args: argparse.Namespace, device: torch.device) -> Tokenizer:
    """The tokenizer of `--vq-model` through the registry; refuses a checkpoint of another kind or
    size, codebook flags that disagree with it (where its kind reads them) and an image size it
    does not encode. Patch_nums (multi-scale kinds) come from our checkpoint, else --v-patch-nums,
    else the official list of --image-size."""
    vq = load_tokenizer(args.vq_ckpt, args.vq_model, codebook_size=args.codebook_size,
                        codebook_embed_dim=args.codebook_embed_dim, image_size=args.image_size,
                        patch_nums=args.v_patch_nums)
    kind_of_size(args.vq_model).check_codebook_flags(vq, args.codebook_size, args.codebook_embed_dim,
                                                     what=f"the tokenizer checkpoint {args.vq_ckpt}")
    if args.image_size % vq.downsample != 0:
        raise ExtractError(f"--image-size {args.image_size} is not a multiple of the tokenizer's downsampling "
                           f"factor {vq.downsample} ({args.vq_model}); use e.g. "
                           f"{(args.image_size // vq.downsample) * vq.downsample or vq.downsample}")
    ident = identity(vq, os.path.basename(args.vq_ckpt))
    return Tokenizer(vq.to(device).eval(), ident, code_length(vq, args.image_size), codebook(vq)[0])


def extraction_meta(args: argparse.Namespace, identity: dict, data, num_aug: int, num_tokens: int) -> dict:
    """What the codes folder records about how its codes were made."""
    return {"format": META_FORMAT, "dataset": args.dataset,
            "data_path": os.path.abspath(args.data_path) if args.data_path else None,
            "num_images": len(data), "image_size": args.image_size, "ten_crop": args.ten_crop,
            "crop_range": args.crop_range if args.ten_crop else None, "flip": not args.no_flip,
            "num_aug": num_aug,
            "num_tokens": num_tokens, "vq_model": args.vq_model, "tokenizer": identity,
            "class_to_idx": dict(data.class_to_idx), "skipped": [], "layout": args.layout,
            **({"shard_size": args.shard_size} if args.layout == "packed" else {})}


def _setting(meta: dict, key: str):
    """A comparable, printable value of one recorded setting."""
    v = meta.get(key, True if key == "flip" else None)  # folders from before --no-flip were flipped
    if key == "tokenizer":
        v = v or {}
        cfg = json.dumps(v.get("config"), sort_keys=True, default=str)  # order-free, as JSON stores it
        return f"weights sha256 {str(v.get('weights_sha256'))[:16]}, config {cfg}"
    if key == "class_to_idx":
        digest = hashlib.sha256(repr(sorted((v or {}).items())).encode()).hexdigest()
        return f"{len(v or {})} classes, sha256 {digest[:12]}"
    return v


def check_existing(code_path: Path, target: Path, meta: dict) -> None:
    """Refuse to add to a code path whose codes were made another way (nothing is written).

    Every code folder of the code path (per-image `*_codes/` and packed `*_shards/`) must share this
    run's tokenizer, image size and crop setting; the folder written to must also hold the same data
    set (name, size, class map) and, packed, the same shard size (shard j is images [j*s, (j+1)*s)).
    """
    if code_path.is_dir():
        found_metas = sorted([*code_path.glob(f"*_codes/{META_FILE}"), *code_path.glob(f"*{SHARDS_SUFFIX}/{META_FILE}")])
        for found_meta in found_metas:
            found = read_meta(found_meta.parent)
            keys = ["tokenizer", "image_size", "ten_crop", "crop_range", "flip"]
            if found_meta.parent == target:
                keys += ["dataset", "num_images", "class_to_idx", "shard_size"]
            bad = [f"{k}: there {_setting(found, k)}; this run {_setting(meta, k)}"
                   for k in keys if _setting(found, k) != _setting(meta, k)]
            if bad:
                raise ExtractError(
                    f"refusing to add codes to {code_path}: {found_meta.parent.name} was extracted with other "
                    f"settings (one code path holds one tokenizer, image size and crop setting; use a new "
                    f"--code-path):\n  " + "\n  ".join(bad))
    if target.is_dir() and read_meta(target) is None and (
            len(npy_indices(target)) > 0 or finished_code_shards(target)):
        raise ExtractError(f"refusing to add codes to {target}: it holds codes without {META_FILE}, so "
                           f"the tokenizer that made them cannot be checked; use a new --code-path")


def remove_stale_temporaries(*folders: Path) -> int:
    """Delete the temporary files a killed run left behind (atomic writes never finished)."""
    n = 0
    for folder in folders:
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
            n += 1
    return n


def finished_indices(codes_dir: Path, labels_dir: Path) -> np.ndarray:
    """Indices whose code and label files both exist (what a rerun skips)."""
    return np.intersect1d(npy_indices(codes_dir), npy_indices(labels_dir))


def chunks(indices: range | list[int], size: int) -> list[list[int]]:
    """`indices` cut into consecutive lists of at most `size`."""
    indices = list(indices)
    return [indices[i:i + size] for i in range(0, len(indices), size)]


# ---------------------------------------------------------------------------------------------
# Where the codes go: one image per file pair (official), or one shard per index range (packed)
# ---------------------------------------------------------------------------------------------


class PerImageFiles:
    """The official layout: `<k>.npy` in the codes and the labels folder; an image is done once
    both exist, so a rerun redoes at most the images a kill interrupted."""

    def __init__(self, codes_dir: Path, labels_dir: Path):
        self.codes_dir, self.labels_dir = codes_dir, labels_dir
        self.folders = (codes_dir, labels_dir)

    def plan(self, rank: int, world: int, num_images: int, batch_size: int) -> tuple[list[list[int]], int]:
        """This rank's batches still to encode (k = rank, rank + W, ... as the official), and how
        many of its images are already done."""
        done = set(finished_indices(self.codes_dir, self.labels_dir).tolist())
        mine = range(rank, num_images, world)
        todo = [k for k in mine if k not in done]
        return chunks(todo, batch_size), len(mine) - len(todo)

    def add(self, indices: list[int], labels: list[int], codes: np.ndarray, skipped: list[int]) -> None:
        for k, y, c in zip(indices, labels, codes):
            # Code first, label last: an image counts as finished only once both exist.
            save_npy(self.codes_dir / f"{k}.npy", c[None].astype(np.int64))  # (1, num_aug, N) int64
            save_npy(self.labels_dir / f"{k}.npy", np.array([y], dtype=np.int64))  # (1,)

    def present(self) -> tuple[int, list[int], list[dict]]:
        """(images with codes, indices without codes, skipped images recorded in the files: none)."""
        present = finished_indices(self.codes_dir, self.labels_dir)
        return len(present), present.tolist(), []


class PackedShards:
    """The packed layout (`dataset/code_shards.py`): shard j holds images [j*s, (j+1)*s) and is
    written once all of them are encoded or skipped, so a rerun redoes at most one shard per rank.
    Rank r writes shards j = r, r + W, ...; a shard's content does not depend on W."""

    def __init__(self, folder: Path, meta: dict, codebook_size: int):
        self.folder, self.meta = folder, meta
        self.folders = (folder,)
        self.shard_size, self.num_images = meta["shard_size"], meta["num_images"]
        self.dtype = code_dtype(codebook_size)
        self.open: dict[int, dict] = {}

    def plan(self, rank: int, world: int, num_images: int, batch_size: int) -> tuple[list[list[int]], int]:
        done = finished_code_shards(self.folder)
        mine = range(rank, num_shards(num_images, self.shard_size), world)
        batches = [b for j in mine if j not in done
                   for b in chunks(shard_range(j, self.shard_size, num_images), batch_size)]
        already = sum(len(shard_range(j, self.shard_size, num_images)) for j in mine if j in done)
        return batches, already

    def add(self, indices: list[int], labels: list[int], codes: np.ndarray, skipped: list[tuple[int, str]]) -> None:
        """Take one batch (all of one shard, as `plan` cuts them); write the shard once it is whole."""
        first = indices[0] if indices else skipped[0][0]
        j = first // self.shard_size
        rng = shard_range(j, self.shard_size, self.num_images)
        buf = self.open.setdefault(j, {"codes": [], "labels": [], "indices": [], "skipped": [], "seen": 0})
        if indices:
            buf["codes"].append(codes.astype(self.dtype))
        buf["labels"].extend(labels)
        buf["indices"].extend(indices)
        buf["skipped"].extend({"index": i, "path": p} for i, p in skipped)
        buf["seen"] += len(indices) + len(skipped)
        if buf["seen"] == len(rng):
            del self.open[j]
            order = np.argsort(np.asarray(buf["indices"], dtype=np.int64), kind="stable")
            codes_all = np.concatenate(buf["codes"])[order] if buf["codes"] else \
                np.zeros((0, self.meta["num_aug"], self.meta["num_tokens"]), self.dtype)
            settings = {**shard_settings(self.meta), "shard": j, "start": rng.start, "stop": rng.stop,
                        "skipped": sorted(buf["skipped"], key=lambda d: d["index"])}
            write_code_shard(self.folder, j, codes_all, np.asarray(buf["labels"], np.int64)[order],
                             np.asarray(buf["indices"], np.int64)[order], settings)

    def present(self) -> tuple[int, list[int], list[dict]]:
        """(images with codes, indices of the shards not written, skipped images they record)."""
        shards = finished_code_shards(self.folder)
        count, skipped = 0, []
        for path in shards.values():
            settings = read_shard_settings(path)
            count += settings["stop"] - settings["start"] - len(settings.get("skipped", []))
            skipped.extend(settings.get("skipped", []))
        missing = [k for j in range(num_shards(self.num_images, self.shard_size)) if j not in shards
                   for k in shard_range(j, self.shard_size, self.num_images)]
        return count, missing, skipped


# ---------------------------------------------------------------------------------------------
# Extraction
# ---------------------------------------------------------------------------------------------


def set_up(args: argparse.Namespace) -> tuple[DistInfo, logging.Logger]:
    """DDP, the official seed, a logger; flags that cannot work are refused before any work."""
    if args.batch_size < 1:
        raise ExtractError(f"--batch-size {args.batch_size} must be at least 1 (images per forward)")
    if args.shard_size < 1:
        raise ExtractError(f"--shard-size {args.shard_size} must be at least 1 (images per packed shard)")
    if args.ten_crop and int(args.image_size * args.crop_range) < args.image_size:
        raise ExtractError(f"--crop-range {args.crop_range} must be >= 1 (ten crops of size --image-size "
                           f"are cut from an int(image_size * crop_range) centre crop)")
    dist_info = init_distributed(args.device)
    rank, world = dist_info.rank, dist_info.world_size
    torch.manual_seed(args.global_seed * world + rank)  # extraction draws nothing random; kept as official
    # --debug: every rank logs each file it writes (the official prints every index).
    logger = create_logger("extract_codes", None, 0 if args.debug else rank)
    logger.info(f"rank {rank} of {world} on {dist_info.device}")
    return dist_info, logger


def open_data(args: argparse.Namespace) -> Dataset:
    """The images to encode, each as its views before flipping (an empty folder raises here)."""
    if args.dataset == "digits" and args.data_path:
        raise ExtractError("--dataset digits is embedded (its train split); drop --data-path")
    transform = functools.partial(extraction_transform, image_size=args.image_size, ten_crop=args.ten_crop,
                                  crop_range=args.crop_range, flip=not args.no_flip)
    data = build_image_dataset(args.dataset, args.data_path, transform, args.image_size, class_map=args.class_map)
    if len(data) == 0:
        raise DatasetError(f"--dataset {args.dataset} has no images")
    return data


def prepare_output(args: argparse.Namespace, rank: int, meta: dict, class_to_idx: dict, codebook_size: int,
                   logger: logging.Logger) -> PerImageFiles | PackedShards:
    """Check what the code path holds, then (rank 0) create the folders and record how these codes
    are made; returns where the codes go."""
    code_path = Path(args.code_path)
    if args.layout == "packed":
        out = PackedShards(shards_dir(code_path, args.dataset, args.image_size), meta, codebook_size)
    else:
        out = PerImageFiles(*code_dirs(code_path, args.dataset, args.image_size))
    home = out.folders[0]  # where codes_meta.json, class_to_idx.json and manifest.json live
    check_existing(code_path, home, meta)  # every rank checks, so every rank stops together
    barrier()  # all ranks have checked the folder as it was before rank 0 writes to it
    if rank == 0:
        for folder in out.folders:
            folder.mkdir(parents=True, exist_ok=True)
        (home / MANIFEST_FILE).unlink(missing_ok=True)  # a manifest means: the last run finished
        stale = remove_stale_temporaries(*out.folders)
        if stale:
            logger.info(f"removed {stale} unfinished temporary file(s) of an interrupted run")
        save_json(home / META_FILE, meta)
        write_class_index(home, class_to_idx)
    barrier()
    return out


def encode_missing(args: argparse.Namespace, dist_info: DistInfo, vq: nn.Module, data: Dataset,
                   out: PerImageFiles | PackedShards, logger: logging.Logger) -> tuple[int, list, int]:
    """Encode this rank's images that are not finished yet, `--batch-size` images per forward, while
    DataLoader workers decode the next batches; returns (images written, skipped (index, path)
    pairs, images already there)."""
    rank, world, device = dist_info.rank, dist_info.world_size, dist_info.device
    batches, already = out.plan(rank, world, len(data), args.batch_size)
    todo = sum(len(b) for b in batches)
    logger.info(f"{len(data):,} images; rank {rank}: {already:,} already extracted, {todo:,} to encode "
                f"in batches of {args.batch_size}")
    loader = DataLoader(data, batch_sampler=batches, num_workers=args.num_workers, collate_fn=collate_skip_corrupt,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    written, skipped = 0, []
    bar = progress(total=todo, enabled=rank == 0, desc="extract", unit="img")
    for batch in loader:
        batch_skipped = list(zip(batch["skipped_indices"], batch["skipped"]))
        skipped.extend(batch_skipped)
        codes, indices, labels = np.zeros((0,)), [], []
        if "images" in batch:
            with torch.inference_mode():
                codes = encode_images(vq, batch["images"].to(device, non_blocking=True), args.ten_crop,
                                      flip=not args.no_flip)
            indices, labels = batch["indices"].tolist(), batch["labels"].tolist()
        out.add(indices, labels, codes, batch_skipped)
        written += len(indices)
        bar.update(len(indices) + len(batch_skipped))
        if args.debug:
            logger.info(f"rank {rank}: encoded {indices}")
    bar.close()
    return written, skipped, already


def write_manifest(dist_info: DistInfo, meta: dict, num_images: int, out: PerImageFiles | PackedShards,
                   counts: tuple[int, list, int], logger: logging.Logger) -> dict:
    """Counts over ranks; rank 0 records the skipped images and writes the completion manifest."""
    written, skipped, already = counts
    totals = all_reduce_sum(torch.tensor([written, len(skipped), already], dtype=torch.int64,
                                         device=dist_info.device))
    written_all, skipped_all, already_all = (int(c) for c in totals.cpu())
    skipped_list = sorted((int(i), p) for part in all_gather_object(skipped) for i, p in part)
    barrier()
    manifest = None
    if dist_info.rank == 0:
        home = out.folders[0]
        present, missing_or_present, recorded = out.present()
        if isinstance(out, PerImageFiles):  # files: the present indices; what is absent and not skipped is missing
            skipped_idx = {i for i, _ in skipped_list}
            missing = sorted(set(range(num_images)) - set(missing_or_present) - skipped_idx)
            meta["skipped"] = [{"index": i, "path": p} for i, p in skipped_list]
        else:  # shards record their own skipped images, over every run that wrote them
            missing = missing_or_present
            meta["skipped"] = sorted(recorded, key=lambda d: d["index"])
        save_json(home / META_FILE, meta)
        manifest = {"complete": not missing, "layout": meta["layout"], "num_images": num_images,
                    "codes_present": present, "written_this_run": written_all, "already_present": already_all,
                    "skipped": meta["skipped"], "missing": missing, "world_size": dist_info.world_size}
        if isinstance(out, PackedShards):
            manifest["shards"] = sorted(p.name for p in finished_code_shards(home).values())
        save_json(home / MANIFEST_FILE, manifest)
        logger.info(f"encoded {written_all:,} images ({already_all:,} were already there); "
                    f"{present:,} of {num_images:,} images have codes in {home}")
        if meta["skipped"]:
            shown = "\n  ".join(d["path"] for d in meta["skipped"][:20])
            logger.info(f"skipped {len(meta['skipped'])} corrupt or unreadable image(s) (listed in {META_FILE}):"
                        f"\n  {shown}")
        else:
            logger.info("no corrupt or unreadable images")
    barrier()
    return manifest if manifest is not None else {"written_this_run": written_all}


def main(args: argparse.Namespace) -> dict:
    # Setup DDP; the tokenizer: a wrong checkpoint or image size is refused before any work ----
    dist_info, logger = set_up(args)
    tok = open_tokenizer(args, dist_info.device)
    num_aug = num_views(args.ten_crop, not args.no_flip)
    logger.info(f"{args.vq_model} from {args.vq_ckpt}: {num_aug} views x {tok.num_tokens} codes per image, "
                f"weights sha256 {tok.identity['weights_sha256'][:12]}")

    # Data, then the code folders (refused when they hold codes made another way) ---------------
    data = open_data(args)
    meta = extraction_meta(args, tok.identity, data, num_aug, tok.num_tokens)
    out = prepare_output(args, dist_info.rank, meta, data.class_to_idx, tok.codebook_size, logger)

    # Encode what is missing; report over ranks -------------------------------------------------
    counts = encode_missing(args, dist_info, tok.model, data, out, logger)
    manifest = write_manifest(dist_info, meta, len(data), out, counts, logger)
    cleanup()
    return manifest


# ---------------------------------------------------------------------------------------------
# Flags (official names and defaults of LlamaGen's `autoregressive/train/extract_codes_c2i.py`)
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Data
    p.add_argument("--data-path", type=str, default=None, help="class-folder root <root>/<class>/<image>")
    p.add_argument("--dataset", type=str, default="imagenet", choices=list(IMAGE_DATASETS),
                   help="imagenet / folder: any class-folder tree; digits: the embedded demo set (train split)")
    p.add_argument("--class-map", type=str, default=None, help=CLASS_MAP_HELP)
    p.add_argument("--code-path", type=str, required=True,
                   help="output root; codes go to <code-path>/<dataset><image-size>_shards (packed) or "
                        "_codes and _labels (--layout official)")
    p.add_argument("--layout", type=str, default="packed", choices=["packed", "official"],
                   help="packed: a few hundred memory-mapped shards (what our trainer reads fastest); official: "
                        "two .npy files per image, as LlamaGen's extraction writes (for the official trainers)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE,
                   help="images per shard of the packed layout (resumable unit; fixed per code folder)")
    p.add_argument("--batch-size", type=int, default=8,
                   help="images per encoder forward, each with all its views (the official extraction: 1)")
    p.add_argument("--image-size", type=int, default=256, help="image side in pixels (a multiple of the downsampling)")
    p.add_argument("--ten-crop", action="store_true",
                   help="encode the ten crops of an int(image_size * crop_range) centre crop (else crop + flip)")
    p.add_argument("--no-flip", action="store_true",
                   help="no mirrored views (for data where a mirror changes the class, e.g. digits)")
    p.add_argument("--crop-range", type=float, default=1.1, help="crop scale for --ten-crop (official 1.1 / 1.05)")
    # Tokenizer
    p.add_argument("--vq-model", type=str, default="VQ-16", choices=size_names(),
                   help="tokenizer size: LlamaGen's VQ-*, or VAR's multi-scale VQVAE MSVQ-*")
    p.add_argument("--v-patch-nums", type=str, default=None,
                   help="MSVQ-* with the official flat file: the scales, e.g. 256 / 512 / 1_2_3_4_6 "
                        "(default: the official list of --image-size; our checkpoints record theirs)")
    p.add_argument("--vq-ckpt", type=str, required=True, help="tokenizer checkpoint (official or ours)")
    p.add_argument("--codebook-size", type=int, default=16384, help="codebook entries of the tokenizer")
    p.add_argument("--codebook-embed-dim", type=int, default=8, help="codebook vector size of the tokenizer")
    # Run
    p.add_argument("--global-seed", type=int, default=0, help="seed (per rank: seed * world + rank)")
    p.add_argument("--num-workers", type=int, default=24, help="DataLoader workers per rank")
    p.add_argument("--device", type=str, default=None, choices=["cuda", "cpu"], help="default: cuda if available")
    p.add_argument("--debug", action="store_true", help="log every file written, on every rank")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())

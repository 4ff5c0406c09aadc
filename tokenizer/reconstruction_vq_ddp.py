"""Reconstruct a validation set with a VQ tokenizer: PSNR, SSIM and ADM `.npz` files for rFID.

Any tokenizer kind of `tokenizer/registry.py` (LlamaGen's VQ-*, VAR's MSVQ-*): the kind comes from
--vq-model, else from the checkpoint itself.

Protocol (official LlamaGen `reconstruction_vq_ddp.py` + `tokenizer/validation/val_ddp.py`): every
image is ADM-centre-cropped to --image-size (`center_crop_arr`), encoded, decoded from its code
indices, bicubic-resized to --image-size-eval when that differs, and turned into uint8 by
`clamp(127.5 x + 128, 0, 255)` truncation. rFID is the ADM evaluator between the reference `.npz`
(the validation images centre-cropped to --image-size-eval, uint8, shuffled with --global-seed as
the official `val_imagenet.npz` is shuffled) and the reconstructions `.npz` (dataset order).

Single process (the demo tokenizer on the digits' held-out split):
    python tokenizer/reconstruction_vq_ddp.py --vq-ckpt results/000-VQ-debug/checkpoints/0000400.pt \
        --dataset digits --image-size 32 --image-size-eval 32
torchrun (what `scripts/tokenizer/reconstruction_vq.sh` runs), ImageNet val at 256 px:
    bash scripts/tokenizer/reconstruction_vq.sh --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --vq-model VQ-16 --data-path /data/imagenet/val --image-size 256 --image-size-eval 256
    python evaluations/c2i/evaluator.py reconstructions/val_imagenet-size-256.npz \
        reconstructions/<run>.npz

Each rank writes finished batches as atomic shards (`<out>/shards/shard_<first index>.npz`); a rerun
keeps them and does only the rest. Rank 0 then packs both `.npz` files atomically, streamed from the
memory-mapped shards (`pack`), so that memory holds about one shard however large the set.
"""
from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

if __package__ in (None, ""):  # `python tokenizer/...py` / torchrun: the repo root on the path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from dataset.build import CLASS_MAP_HELP, IMAGE_DATASETS, build_image_dataset
from dataset.image_folder import SkipCounter, collate_skip_corrupt
from dataset.transforms import center_crop_arr, to_tensor_normalized
from tokenizer.metrics import OFFICIAL_SSIM_DATA_RANGE, psnr, ssim
from tokenizer.registry import codebook, decode, encode, load_tokenizer, size_names
from utils.checkpoint import atomic_write, file_sha256, save_json, save_npz
from utils.cli import run_cli
from utils.distributed import barrier, cleanup, init_distributed
from utils.logger import create_logger, progress
from utils.npz_stream import NpzWriter, npz_member_memmap
from utils.shards import claim_shard_folder, finished_shards, shard_member, shard_path, to_uint8, write_rows

#################################################################################
#                                    Helpers                                    #
#################################################################################


class CenterCrops(Dataset):
    """(crop at image_size in [-1,1] (3,S,S), reference crop at image_size_eval uint8 (S',S',3), index)."""

    def __init__(self, base: Dataset, image_size: int, image_size_eval: int):
        self.base, self.image_size, self.image_size_eval = base, image_size, image_size_eval

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        item = self.base[i]
        if isinstance(item, dict):  # a corrupt file, counted by collate_skip_corrupt
            return item
        img, _, index = item
        crop = center_crop_arr(img, self.image_size)
        ref = crop if self.image_size_eval == self.image_size else center_crop_arr(img, self.image_size_eval)
        return to_tensor_normalized(crop), torch.from_numpy(np.asarray(ref, dtype=np.uint8).copy()), index


def reconstruct(vq_model, x: torch.Tensor, image_size_eval: int) -> tuple[np.ndarray, np.ndarray]:
    """(reconstructions uint8 (B,S',S',3), ground truth float (B,S',S',3) in [0,1]) as the official:
    decode from the code indices; bicubic-resize both when S' differs; uint8 by truncation."""
    grid = x.shape[-2] // vq_model.downsample, x.shape[-1] // vq_model.downsample
    samples = decode(vq_model, encode(vq_model, x), grid)
    gt = x.float()
    if image_size_eval != x.shape[-1]:
        gt = F.interpolate(gt, size=(image_size_eval, image_size_eval), mode="bicubic")
    gt = ((gt.permute(0, 2, 3, 1).cpu().numpy() + 1.0) / 2.0)
    return to_uint8(samples, image_size_eval), gt


def image_metrics(recon: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image PSNR, SSIM (official data range 2) and SSIM (data range 1)."""
    r = recon.astype(np.float32) / 255.0
    p = np.array([psnr(a, b) for a, b in zip(r, gt)])
    s2 = np.array([ssim(a, b, OFFICIAL_SSIM_DATA_RANGE) for a, b in zip(r, gt)])
    s1 = np.array([ssim(a, b, 1.0) for a, b in zip(r, gt)])
    return p, s2, s1


def run_name(args: argparse.Namespace, codebook_size: int, codebook_dim: int) -> str:
    """The output folder and `.npz` name of a run: what produced it (tokenizer file, sizes, codebook,
    seed), so that `autoregressive/reproduce.py` finds the files this script writes."""
    return (f"{args.vq_model or 'VQ'}-{Path(args.vq_ckpt).stem}-{args.dataset}-size-{args.image_size}-size-"
            f"{args.image_size_eval}-codebook-size-{codebook_size}-dim-{codebook_dim}-seed-{args.global_seed}")


def reference_name(args: argparse.Namespace) -> str:
    """The reference batch the run writes beside its reconstructions (rFID is measured against it)."""
    return f"val_{args.dataset}-size-{args.image_size_eval}.npz"


#: the per-image members of a shard, small enough to hold for the whole set
PER_IMAGE = ("index", "psnr", "ssim", "ssim_range1")


def reference_permutation(n: int, seed: int) -> np.ndarray:
    """The reference's shuffle: `torch.randperm(n)` from a generator seeded with --global-seed."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()


def pack(shard_dir: Path, total: int, skipped: int, recon_path: Path, ref_path: Path,
         seed: int) -> dict[str, np.ndarray]:
    """Write the reconstructions in index order (`recon_path`) and the reference shuffled with `seed`
    (`ref_path`) as ADM `.npz` files (`arr_0`), atomically; return the per-image members in index order.

    Streamed, so that 50k images at 512 px (39 GB an array) never sit in memory: a first pass reads only
    the shards' per-image members and headers and checks that only skipped (corrupt) images are
    missing, then each array is written in chunks of at most one shard's rows gathered from the
    memory-mapped shards (`utils/shards.py:write_rows`). Array-identical to concatenating every shard,
    sorting by index and `np.savez`."""
    shards = finished_shards(shard_dir)
    paths = [shards[start] for start in sorted(shards)]
    parts = {k: [] for k in PER_IMAGE}
    layout = {"recon": [], "ref": []}  # (shape, dtype) of each shard's images
    for path in paths:
        with np.load(path) as f:
            for k in parts:
                parts[k].append(f[k])
        for k, shapes in layout.items():
            images = shard_member(path, k)
            shapes.append((images.shape, images.dtype))
            del images  # only the header was read
        n = len(parts["index"][-1])
        if any(len(v[-1]) != n for v in parts.values()) or any(v[-1][0][0] != n for v in layout.values()):
            raise RuntimeError(f"{path}: its members differ in length; remove it and rerun")
    out = {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}
    order = np.argsort(out["index"], kind="stable")
    out = {k: v[order] for k, v in out.items()}
    if len(out["index"]) + skipped != total or len(np.unique(out["index"])) != len(out["index"]):
        raise RuntimeError(f"{shard_dir}: {len(out['index'])} reconstructions + {skipped} skipped != {total} "
                           f"images; rerun to finish the missing shards")

    arrays = {}  # name -> (shape, dtype) of the output: what np.concatenate of the shards gives
    for name, shapes in layout.items():
        frames = {shape[1:] for shape, _ in shapes}
        if len(frames) > 1:
            raise RuntimeError(f"{shard_dir}: shards hold {name} images of shapes {sorted(frames)}")
        arrays[name] = (((len(order), *frames.pop()), np.result_type(*(d for _, d in shapes))) if shapes
                        else ((0,), np.dtype(np.float64)))  # no shard at all: np.zeros(0), as before
    lengths = [len(v) for v in parts["index"]]

    def npz(name: str, positions: np.ndarray) -> Callable[[BinaryIO], None]:
        def write(f: BinaryIO) -> None:
            with NpzWriter(f) as z, z.stream("arr_0", *arrays[name]) as arr:
                # one shard's worth of rows per write
                write_rows(arr, paths, name, lengths, positions, chunk_rows=max(lengths, default=1))
        return write

    atomic_write(recon_path, npz("recon", order))
    atomic_write(ref_path, npz("ref", order[reference_permutation(len(order), seed)]))
    return out


#################################################################################
#                                      Main                                     #
#################################################################################


@torch.no_grad()
def main(args):

    # Setup DDP:
    if args.split is not None and args.dataset != "digits":
        raise ValueError("--split applies to --dataset digits only; pass the validation folder "
                         "as --data-path")
    if args.per_proc_batch_size < 1 or args.image_size < 1 or args.image_size_eval < 1:
        raise ValueError("--per-proc-batch-size, --image-size and --image-size-eval must be >= 1")
    args.split = args.split or "heldout"
    info = init_distributed(args.device)
    device, rank, world = info.device, info.rank, info.world_size
    logger = create_logger("reconstruction_vq", None, rank)

    # Load the tokenizer (strict; EMA weights when the checkpoint has them, as the official):
    vq_model = load_tokenizer(args.vq_ckpt, args.vq_model, codebook_size=args.codebook_size,
                              codebook_embed_dim=args.codebook_embed_dim, image_size=args.image_size,
                              prefer_ema=not args.no_ema).to(device)
    if args.image_size % vq_model.downsample != 0:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of the tokenizer's "
                         f"downsampling factor {vq_model.downsample}")

    # Output folder, named after what produced it; refuse to mix shards of other settings:
    folder_name = run_name(args, *codebook(vq_model))
    sample_dir = Path(args.sample_dir)
    out_dir = sample_dir / folder_name
    shard_dir = out_dir / "shards"
    # what determines the reconstructions (the checkpoint by content: a moved folder or file resumes)
    settings = {"vq_ckpt_sha256": file_sha256(args.vq_ckpt) if rank == 0 else None, "dataset": args.dataset,
                "data_path": args.data_path, "split": args.split, "image_size": args.image_size,
                "image_size_eval": args.image_size_eval, "batch": args.per_proc_batch_size,
                "ema": not args.no_ema}

    # Data: centre crops; batches of --per-proc-batch-size, batch c on rank c % world. Opened before
    # the output folder is claimed, so a data set that cannot be read leaves nothing behind.
    base = build_image_dataset(args.dataset, args.data_path, None, args.image_size, split=args.split,
                               class_map=args.class_map)
    if args.class_map:  # the images are in class-id order: another map, another order of the .npz
        settings["class_to_idx"] = dict(base.class_to_idx)
    dataset = CenterCrops(base, args.image_size, args.image_size_eval)
    if rank == 0:  # beside the shards, so that finished ones are found and compared
        claim_shard_folder(shard_dir, settings)  # refuses shards of other settings (a user error)
    barrier()
    n, b = len(dataset), args.per_proc_batch_size
    done = finished_shards(shard_dir)
    mine = [c for c in range(math.ceil(n / b)) if c % world == rank and c * b not in done]
    todo = [i for c in mine for i in range(c * b, min((c + 1) * b, n))]
    logger.info(f"{n} images, {len(done)} batches already done, {len(mine)} to do on rank {rank} of {world}")
    loader = DataLoader(Subset(dataset, todo), batch_size=b, shuffle=False, num_workers=args.num_workers,
                        collate_fn=collate_skip_corrupt, drop_last=False)

    # Reconstruct, measure, write one shard per batch:
    skips = SkipCounter()
    for c, batch in zip(mine, progress(loader, enabled=info.is_main, desc="reconstruct")):
        skips.add(batch["skipped"])
        if "images" in batch:
            recon, gt = reconstruct(vq_model, batch["images"].to(device), args.image_size_eval)
            p, s2, s1 = image_metrics(recon, gt)
            # collate_skip_corrupt names the items' second field 'labels': here the reference crops.
            ref, index = batch["labels"].numpy(), batch["indices"].numpy()
        else:
            size = args.image_size_eval
            recon = ref = np.zeros((0, size, size, 3), np.uint8)
            p = s2 = s1 = np.zeros(0)
            index = np.zeros(0, np.int64)
        save_npz(shard_path(shard_dir, c * b), recon=recon, ref=ref, index=index, psnr=p, ssim=s2,
                 ssim_range1=s1, skipped=np.array(batch["skipped"], dtype=str))
    barrier()

    # Pack the reconstructions and the shuffled reference, print PSNR / SSIM (rank 0):
    if rank == 0:
        skipped = []
        for path in finished_shards(shard_dir).values():
            with np.load(path) as f:
                skipped.extend(f["skipped"].tolist())
        recon_path = sample_dir / f"{folder_name}.npz"
        ref_path = sample_dir / reference_name(args)
        out = pack(shard_dir, n, len(skipped), recon_path, ref_path, args.global_seed)
        result = (f"PSNR: {out['psnr'].mean():.6f}, SSIM: {out['ssim'].mean():.6f} (official data_range=2), "
                  f"SSIM: {out['ssim_range1'].mean():.6f} (data_range=1) over {len(out['psnr'])} images")
        print(result)
        (sample_dir / f"{folder_name}_results.txt").write_text(result + "\n")
        save_json(sample_dir / f"{folder_name}_results.json",
                  {"psnr": float(out["psnr"].mean()), "ssim": float(out["ssim"].mean()),
                   "ssim_range1": float(out["ssim_range1"].mean()), "num_images": int(len(out["psnr"])),
                   "skipped": len(skipped), "reconstructions": str(recon_path), "reference": str(ref_path)})
        logger.info(SkipCounter(skipped).report())
        logger.info(f"reconstructions {recon_path} {npz_member_memmap(recon_path, 'arr_0').shape}; "
                    f"reference (shuffled) {ref_path}")
    barrier()
    cleanup()


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    g = parser.add_argument_group("tokenizer")
    g.add_argument("--vq-ckpt", type=str, required=True, help="tokenizer checkpoint (official or ours)")
    g.add_argument("--vq-model", type=str, choices=size_names(), default=None,
                   help="size; required for official files, checked against ours")
    g.add_argument("--codebook-size", type=int, default=16384, help="for official files")
    g.add_argument("--codebook-embed-dim", type=int, default=8, help="for official files")
    g.add_argument("--no-ema", action="store_true", help="use 'model' even when the checkpoint has 'ema'")
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", type=str, choices=list(IMAGE_DATASETS), default="imagenet",
                   help="validation class-folder tree, or the digits")
    g.add_argument("--data-path", type=str, default=None, help="validation <root>/<class>/<image>")
    g.add_argument("--class-map", type=str, default=None, help=CLASS_MAP_HELP)
    g.add_argument("--split", type=str, choices=["train", "heldout"], default=None,
                   help="digits only: which split (default heldout)")
    g.add_argument("--image-size", type=int, default=256, help="centre-crop size fed to the tokenizer")
    g.add_argument("--image-size-eval", type=int, default=256, help="size of the saved images and metrics")
    g.add_argument("--num-workers", type=int, default=4, help="DataLoader workers per rank")
    g = parser.add_argument_group("run")
    g.add_argument("--sample-dir", type=str, default="reconstructions", help="output folder")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="images per batch and per shard")
    g.add_argument("--global-seed", type=int, default=0, help="seed of the reference shuffle")
    g.add_argument("--device", type=str, choices=["cuda", "cpu"], default=None, help="default: CUDA if present")
    return parser


if __name__ == "__main__":
    run_cli(main, get_parser().parse_args())

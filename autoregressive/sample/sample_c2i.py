"""Sample a PNG grid for chosen classes with any strategy (one process, CPU or GPU).

    python autoregressive/sample/sample_c2i.py --strategy raster --gpt-model GPT-XL \
        --gpt-ckpt pretrained_models/c2i_XL_384.pt --vq-ckpt pretrained_models/vq_ds16_c2i.pt \
        --image-size 384 --cfg-scale 4.0 --top-k 2000 --classes 207 360 387 974 88 979 417 279

Each row of the grid is one class (`--per-class` images); the images are those the DDP sampler
would make for the same seed and indices. A `--classes` item is a class id or, for a checkpoint
that carries a class map (ours do), a class name of it (`--classes 3 dog`); without `--classes` the
grid shows the official ImageNet ids for a 1000-class model, else the checkpoint's classes (all of
them up to 16, else the first 8).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from PIL import Image

from autoregressive.sample.common import CheckpointClasses, add_sampling_args, load_sampler
from autoregressive.strategies import parse_driver_args
from utils.cli import run_cli
from utils.run import given_flags
from autoregressive.decoding.row_rng import image_seeds
from utils.shards import to_uint8
from utils.attention_kernels import record_attention_kernels
from utils.distributed import init_distributed
from utils.memory import peak_memory_text


def make_grid(images_uint8, nrow: int, pad: int = 2):
    """(B,H,W,3) uint8 -> one grid PIL image with `nrow` images per row."""
    import numpy as np

    b, h, w, _ = images_uint8.shape
    rows = (b + nrow - 1) // nrow
    grid = np.zeros((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), dtype=np.uint8)
    for i, im in enumerate(images_uint8):
        r, c = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return Image.fromarray(grid)


def grid_classes(args: argparse.Namespace, given: set[str]) -> tuple[list[int], CheckpointClasses]:
    """The grid's class ids (`--classes`: ids or names of the checkpoint's class map; default: the
    checkpoint's classes), with `--num-classes` taken from the checkpoint when not given."""
    classes = CheckpointClasses.read(args.gpt_ckpt)
    classes.resolve(args, given)
    if not args.classes:
        return classes.grid_classes(args.num_classes), classes
    return [classes.class_id(c, args.num_classes) for c in args.classes], classes


def main(args: argparse.Namespace, given: set[str] | None = None) -> Path:
    given = given if given is not None else given_flags(build_parser(), args=args)
    if args.per_class < 1:
        raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    ids, classes = grid_classes(args, given)
    device = init_distributed(args.device).device
    sampler = load_sampler(args, device, given)
    if classes.class_to_idx:
        print("classes: " + ", ".join(f"{i} ({classes.name_of(i)})" for i in ids))
    labels = torch.tensor(ids, dtype=torch.long).repeat_interleave(args.per_class)
    seeds = image_seeds(args.global_seed, torch.arange(len(labels)))
    t0 = time.perf_counter()
    with record_attention_kernels() as kernels:
        images = sampler.images(labels, seeds)
    seconds = time.perf_counter() - t0
    print(f"attention kernels: {kernels.summary()}")
    for call in kernels.math_on_cuda:
        print(f"warning: the math attention kernel runs on CUDA ({call.describe()}): it materialises the "
              f"attention matrix", file=sys.stderr)
    nrow = args.per_class if args.per_class > 1 else len(labels)
    grid = make_grid(to_uint8(images, args.image_size_eval), nrow=nrow)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(out)
    runner = sampler.strategy.runner
    note = ("" if runner.name == "eager" else ", including the failed fast path" if runner.fallback is not None
            else ", including compiling and capturing the steps")
    print(f"{len(labels)} images in {seconds:.2f} s ({len(labels) / seconds:.2f} images/s, decode path "
          f"{runner.name}{note}); {peak_memory_text(device)}; grid saved to {out}")
    if runner.fallback is not None:
        print(runner.fallback)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p)
    p.set_defaults(cfg_scale=4.0, top_k=2000, image_size_eval=None)
    o = p.add_argument_group("output")
    o.add_argument("--classes", type=str, nargs="+", default=None,
                   help="classes, one grid row each: ids, or names of the checkpoint's class map (default: the "
                        "official ImageNet ids 207 360 387 974 88 979 417 279 for 1000 classes, else the "
                        "checkpoint's classes, up to 16)")
    o.add_argument("--per-class", type=int, default=1, help="images per class")
    o.add_argument("--out", type=str, default="sample.png", help="PNG grid path")
    return p


if __name__ == "__main__":
    run_cli(main, *parse_driver_args(build_parser()))

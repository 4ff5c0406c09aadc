"""Zero-shot editing: inpainting, outpainting and class-conditional editing of one image.

    python autoregressive/sample/edit.py --strategy arpg --gpt-model ARPG-L --gpt-ckpt pretrained_models/arpg_300m.pt \
        --vq-ckpt pretrained_models/vq_ds16_c2i.pt --image-size 256 --image dog.jpg --box 64,64,192,192 \
        --class-id 207 --cfg-scale 4.0 --out edit.png
    python autoregressive/sample/edit.py --strategy lpd --gpt-model LPD-L --gpt-ckpt pretrained_models/lpd_l_256.pt \
        --vq-ckpt pretrained_models/vq_ds16_c2i.pt --image-size 256 --image dog.jpg --outpaint-border 3 \
        --class-id 207 --cfg-scale 4.0 --out outpaint.png

The image is centre-cropped to `--image-size` and tokenized; the region to regenerate is given by
`--mask` (a PNG of the image's size, white = regenerate), `--box x0,y0,x1,y1` (pixels of the
cropped image) or `--outpaint-border K` (the K outer rings of tokens). A token is regenerated when
its cell touches the region. The other tokens stay as context and the strategy's `edit` generates
the rest for `--class-id` (the image's own class: inpainting / outpainting; another class:
class-conditional editing; an id, or a name where the checkpoint carries a class map). Output: one
row [input, input with the region greyed, K results].
Only strategies that generate in arbitrary orders (arpg, lpd) can edit, and VAR by masked teacher forcing
over its scales: `--strategy var` tokenizes with its multi-scale VQVAE (`--vq-ckpt`), the token mask
is the finest scale's and is pooled to the coarser scales (`VarStrategy.known_per_scale`):
    python autoregressive/sample/edit.py --strategy var --gpt-model VAR-d16 --gpt-ckpt pretrained_models/var_d16.pth \
        --vq-ckpt pretrained_models/vae_ch160v4096z32.pth --image-size 256 --image dog.jpg --box 64,64,192,192 \
        --class-id 207 --cfg-scale 4.0 --top-k 900 --top-p 0.95 --out edit.png
For arpg and lpd the schedule flags (`--order`, `--sample-schedule`, `--step`, ...) apply to the
regenerated tokens; LPD's locality-aware order grows from the kept ones.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from PIL import Image

from autoregressive.sample.common import CheckpointClasses, add_sampling_args, load_sampler
from autoregressive.strategies import get_strategy, parse_driver_args, strategy_names
from utils.cli import run_cli
from autoregressive.decoding.row_rng import RowRNG
from autoregressive.sample.sample_c2i import make_grid
from autoregressive.decoding.row_rng import image_seeds
from utils.shards import to_uint8
from dataset.transforms import center_crop_arr, to_tensor_normalized
from utils.distributed import init_distributed
from utils.run import given_flags


# ---------------------------------------------------------------------------------------------
# The region to regenerate, as a (grid, grid) boolean token mask (True = regenerate)
# ---------------------------------------------------------------------------------------------


def cells_touched(pixel_mask: np.ndarray, downsample: int) -> torch.Tensor:
    """(S, S) boolean pixels -> (S/f, S/f) tokens: True where any pixel of the cell is set."""
    s = pixel_mask.shape[0]
    g = s // downsample
    return torch.from_numpy(pixel_mask.reshape(g, downsample, g, downsample).any(axis=(1, 3)))


def mask_from_png(path: str | Path, image_pil_size: tuple[int, int], image_size: int, downsample: int) -> torch.Tensor:
    """A mask PNG of the input image's size (white = regenerate), cropped like the image."""
    mask = Image.open(path).convert("L")
    if mask.size != image_pil_size:
        raise ValueError(f"the mask {path} is {mask.size[0]}x{mask.size[1]} pixels but the image is "
                         f"{image_pil_size[0]}x{image_pil_size[1]}: they must have the same size")
    return cells_touched(np.asarray(center_crop_arr(mask, image_size)) >= 128, downsample)


def mask_from_box(box: str, image_size: int, downsample: int) -> torch.Tensor:
    """`x0,y0,x1,y1` in pixels of the cropped image (x1, y1 exclusive)."""
    try:
        x0, y0, x1, y1 = (int(v) for v in box.split(","))
    except ValueError:
        raise ValueError(f"--box must be four integers x0,y0,x1,y1, got {box!r}") from None
    if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
        raise ValueError(f"--box {box} is empty or leaves the {image_size}x{image_size} image "
                         f"(need 0 <= x0 < x1 <= {image_size} and 0 <= y0 < y1 <= {image_size})")
    pixels = np.zeros((image_size, image_size), dtype=bool)
    pixels[y0:y1, x0:x1] = True
    return cells_touched(pixels, downsample)


def mask_from_border(k: int, grid: int) -> torch.Tensor:
    """The k outer rings of the token grid."""
    if k < 1 or 2 * k >= grid:
        raise ValueError(f"--outpaint-border {k} must be >= 1 and leave an interior in a {grid}x{grid} token grid")
    regen = torch.ones(grid, grid, dtype=torch.bool)
    regen[k:grid - k, k:grid - k] = False
    return regen


def check_region(regen: torch.Tensor) -> None:
    if not bool(regen.any()):
        raise ValueError("the mask is empty: it selects no token to regenerate")


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def main(args: argparse.Namespace, given: set[str] | None = None) -> Path:
    strategy = get_strategy(args.strategy)
    if not strategy.can_edit:
        raise ValueError(f"--strategy {args.strategy} cannot edit images: it only generates in a fixed order "
                         f"(editable: {', '.join(n for n in strategy_names() if get_strategy(n).can_edit)})")
    given = given if given is not None else given_flags(build_parser(), args=args)
    classes = CheckpointClasses.read(args.gpt_ckpt)
    classes.resolve(args, given)
    class_id = classes.class_id(args.class_id, args.num_classes, "--class-id")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    try:
        image = Image.open(args.image).convert("RGB")
    except OSError as e:
        raise ValueError(f"--image {args.image}: cannot read the image ({e})") from e
    device = init_distributed(args.device).device
    grid = args.image_size // args.downsample_size
    if args.mask is not None:
        regen = mask_from_png(args.mask, image.size, args.image_size, args.downsample_size)
    elif args.box is not None:
        regen = mask_from_box(args.box, args.image_size, args.downsample_size)
    else:
        regen = mask_from_border(args.outpaint_border, grid)
    check_region(regen)
    # --step counts the steps over the regenerated tokens (checked by `edit`), not the whole grid.
    sampler = load_sampler(argparse.Namespace(**{**vars(args), "steps": None}), device, given)

    x = to_tensor_normalized(center_crop_arr(image, args.image_size))[None].to(device)  # (1, 3, S, S)
    codes = sampler.vq.encode_to_indices(x)  # (1, N)
    k = args.num_samples
    labels = torch.full((k,), class_id, dtype=torch.long, device=device)
    seeds = image_seeds(args.global_seed, torch.arange(k)).to(device)

    def edit(temperature: float) -> torch.Tensor:  # a fresh stream per image each time: a rerun repeats it
        return sampler.strategy.edit(sampler.gpt, labels, codes.repeat(k, 1), ~regen.reshape(-1).to(device),
                                     cfg_scale=args.cfg_scale, temperature=temperature, top_k=args.top_k,
                                     top_p=args.top_p, steps=args.steps, generator=RowRNG(seeds))

    if args.verify_fast_path:
        sampler.verify_fast_path(lambda: edit(0.0))
    tokens = sampler.strategy.runner.run(lambda: edit(args.temperature))
    results = sampler.decode(tokens)  # (K, 3, S, S)

    shown = x.clone()
    cell = regen.repeat_interleave(args.downsample_size, 0).repeat_interleave(args.downsample_size, 1).to(device)
    shown[:, :, cell] = 0.0  # grey where tokens are regenerated
    row = to_uint8(torch.cat([x, shown, results]).cpu())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    make_grid(row, nrow=len(row)).save(out)
    name = classes.name_of(class_id)
    print(f"regenerated {int(regen.sum())} of {grid * grid} tokens for class {class_id}"
          f"{f' ({name})' if name else ''}; saved {out}")
    if sampler.strategy.runner.fallback is not None:
        print(sampler.strategy.runner.fallback)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sampling_args(p)
    p.set_defaults(strategy="arpg", image_size=256, cfg_scale=4.0)
    e = p.add_argument_group("editing")
    e.add_argument("--image", type=str, required=True, help="the image to edit (any size; centre-cropped)")
    e.add_argument("--class-id", type=str, required=True,
                   help="class to generate the region for: an id, or a name of the checkpoint's class map")
    region = e.add_mutually_exclusive_group(required=True)
    region.add_argument("--mask", type=str, help="PNG of the image's size: white = regenerate")
    region.add_argument("--box", type=str, help="x0,y0,x1,y1: regenerate this box (pixels of the cropped image)")
    region.add_argument("--outpaint-border", type=int, help="regenerate the K outer rings of tokens")
    e.add_argument("--num-samples", type=int, default=4, help="results per image")
    e.add_argument("--out", type=str, default="edit.png", help="output PNG: input, masked input, results")
    return p


if __name__ == "__main__":
    run_cli(main, *parse_driver_args(build_parser()))

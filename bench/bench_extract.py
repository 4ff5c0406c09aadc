"""Code extraction speed: images/s at batch 1 (the official way) against batch B, with the codes compared.

    python bench/bench_extract.py --num-images 8 --batch-sizes 1 4                  # CPU, VQ-16 random
    python bench/bench_extract.py --device cuda --num-images 256 --batch-sizes 1 8 32 --results bench/RESULTS.md
    python bench/bench_extract.py --vq-ckpt pretrained_models/vq_ds16_c2i.pt --device cuda

Batch 1 is what FoundationVision/LlamaGen autoregressive/train/extract_codes_c2i.py does: one
image's views (ten-crop: 10) per tokenizer forward. Batch B encodes B images' views in one forward
(`encode_images`). Both are measured in the same run on the same images: synthetic, deterministic
smooth random PIL images of ImageNet-like sizes, put through the real extraction transform
(`extraction_transform`: ADM centre crop to int(S * crop_range), TenCrop(S)). The transform runs
once before any timing and is excluded from every figure (its cost is printed apart); timed is what
the extraction loop does per forward: the views to the device, the tokenizer's encode, the codes
back to the host. Each batch size first runs `--warmup` untimed forwards of its own shape; on CUDA
the device is synchronised before each clock read; cuDNN settings are left at their defaults.

The codes of every batch size are compared token by token with batch 1's. Each token's distance
margin (second-smallest minus smallest codebook distance, `tokenizer.registry.encode_with_margins`,
from one untimed forward at the largest batch size) says how near its choice is to a tie: the table
gives the smallest margin among differing tokens, and the output the smallest margin overall. Margins
exist for LlamaGen VQ tokenizers only (n/a for VAR's multi-scale kind). Without `--vq-ckpt` the
weights are random (seeded; speed does not depend on them). `--results FILE` appends the run (date,
device, command, settings, table) to a Markdown file.
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autoregressive.train.extract_codes_c2i import encode_images, extraction_transform, num_views  # noqa: E402
from dataset.transforms import with_flip  # noqa: E402
from tokenizer.registry import (encode_with_margins, has_margins, kind_of_size, load_tokenizer,  # noqa: E402
                                size_names)
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.memory import peak_memory_bytes  # noqa: E402
from utils.logger import progress  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_images(n: int, seed: int) -> list[Image.Image]:
    """`n` deterministic RGB images of ImageNet-like sizes (288..480 x 288..480): smooth random
    colour fields (bicubic-upsampled coarse noise at two scales) with a little pixel noise."""
    images = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        w, h = (int(v) for v in rng.integers(288, 481, size=2))
        field = np.zeros((h, w, 3), dtype=np.float32)
        for cells, amp in ((4, 0.7), (24, 0.3)):
            coarse = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
            field += amp * np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC), dtype=np.float32)
        field += rng.normal(0, 6, size=field.shape)
        images.append(Image.fromarray(np.clip(field, 0, 255).astype(np.uint8)))
    return images


def encoded_views(views: torch.Tensor, ten_crop: bool) -> torch.Tensor:
    """(B,V,3,S,S) views -> (B*num_aug,3,S,S): what `encode_images` encodes (flip views appended)."""
    if not ten_crop:
        views = torch.stack([with_flip(v) for v in views])
    return views.flatten(0, 1)


def time_batch_size(vq: torch.nn.Module, views: torch.Tensor, b: int, ten_crop: bool, warmup: int,
                    device: torch.device) -> tuple[float, np.ndarray]:
    """Seconds for all images at `b` images per forward (after `warmup` untimed forwards of that
    shape), and the codes (num_images, num_aug, N)."""
    for _ in range(warmup):
        encode_images(vq, views[:b].to(device), ten_crop)
    sync(device)
    codes = []
    bar = progress(total=len(views), desc=f"batch {b}", unit="img", leave=False)
    t0 = time.perf_counter()
    for i in range(0, len(views), b):
        codes.append(encode_images(vq, views[i:i + b].to(device), ten_crop))  # codes come back to the host
        bar.update(len(codes[-1]))
    sync(device)
    seconds = time.perf_counter() - t0
    bar.close()
    return seconds, np.concatenate(codes)


def margins_at(vq: torch.nn.Module, views: torch.Tensor, b: int, ten_crop: bool, shape: tuple[int, ...],
               device: torch.device) -> tuple[np.ndarray, np.ndarray] | None:
    """(codes, margins) of every token from untimed forwards at `b` images each; None for a kind
    without margins."""
    if not has_margins(vq):
        return None
    codes, margins = [], []
    for i in range(0, len(views), b):
        with torch.inference_mode():
            c, m = encode_with_margins(vq, encoded_views(views[i:i + b], ten_crop).to(device))
        codes.append(c.cpu())
        margins.append(m.float().cpu())
    return torch.cat(codes).reshape(shape).numpy(), torch.cat(margins).reshape(shape).numpy()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} threads"


def fmt_margin(m: float | None) -> str:
    return "n/a" if m is None else f"{m:.3g}"


def write_results(path: str, device: torch.device, settings: str, table: list[str], notes: list[str]) -> None:
    """Append this run as a Markdown section to `path` (written to a temporary file, then renamed)."""
    command = shlex.join(["python", "bench/bench_extract.py", *sys.argv[1:]])
    section = [f"## {datetime.date.today().isoformat()} — {device_name(device)}: code extraction, batch 1 vs "
               f"batch B (bench_extract)", "", "```sh", command, "```", "", settings, "", *table, "",
               *[f"- {line}" for line in notes], ""]
    old = Path(path).read_text() if Path(path).exists() else ""
    text = old + ("\n" if old and not old.endswith("\n\n") else "") + "\n".join(section)
    atomic_write(path, lambda f: f.write(text.encode()))


def main(args: argparse.Namespace) -> list[dict]:
    """Time every batch size on the same images; returns the rows (also printed)."""
    # -- setup ------------------------------------------------------------------------------------
    if min(args.batch_sizes) < 1 or args.num_images < 1 or args.image_size < 1 or args.warmup < 0:
        raise ValueError("--batch-sizes, --num-images and --image-size must be >= 1, --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if args.ten_crop and int(args.image_size * args.crop_range) < args.image_size:
        raise ValueError(f"--crop-range {args.crop_range} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch_sizes = list(dict.fromkeys([1, *args.batch_sizes]))  # batch 1, the baseline, always first
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.vq_ckpt:
        vq = load_tokenizer(args.vq_ckpt, args.vq_model, codebook_size=args.codebook_size,
                            codebook_embed_dim=args.codebook_embed_dim, image_size=args.image_size,
                            patch_nums=args.v_patch_nums)
        weights = args.vq_ckpt
    else:
        vq = kind_of_size(args.vq_model).build(args.vq_model, codebook_size=args.codebook_size,
                                               codebook_embed_dim=args.codebook_embed_dim, image_size=args.image_size,
                                               patch_nums=args.v_patch_nums)
        weights = f"random (seed {args.seed}; speed does not depend on them)"
    vq = vq.to(device).eval()
    if args.image_size % vq.downsample:
        raise ValueError(f"--image-size {args.image_size} is not a multiple of {args.vq_model}'s downsampling "
                         f"{vq.downsample}")

    # -- the images through the real extraction transform (not timed) ----------------------------
    t0 = time.perf_counter()
    images = synthetic_images(args.num_images, args.seed)
    t_make = time.perf_counter() - t0
    t0 = time.perf_counter()
    views = torch.stack([extraction_transform(img, args.image_size, args.ten_crop, args.crop_range)
                         for img in images])
    t_transform = (time.perf_counter() - t0) / args.num_images
    num_aug = num_views(args.ten_crop, True)
    crops = f"ten-crop (crop range {args.crop_range})" if args.ten_crop else "centre crop + flip"
    settings = (f"{args.vq_model}, weights {weights}; {args.num_images} synthetic images ({t_make:.2f} s to make), "
                f"{args.image_size} px, {crops}: {num_aug} views per image; fp32; warmup {args.warmup} forward(s) "
                f"per batch size; timed: views to the device, encode, codes to the host; PIL transform excluded "
                f"({t_transform * 1e3:.1f} ms per image, before timing); torch {torch.__version__}")
    print(f"bench_extract: {settings}; device {device_name(device)}")

    # -- each batch size ----------------------------------------------------------------------------
    timed = {}
    for b in batch_sizes:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        seconds, codes = time_batch_size(vq, views, b, args.ten_crop, args.warmup, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
        timed[b] = (seconds, codes, peak)
        print(f"batch {b}: {args.num_images / seconds:.3f} images/s ({seconds:.1f} s)", flush=True)

    # -- margins (untimed) and the comparison with batch 1 ------------------------------------------
    ref = timed[1][1]
    found = margins_at(vq, views, max(batch_sizes), args.ten_crop, ref.shape, device)
    margins = None
    if found is not None:
        margin_codes, margins = found
        off = int((margin_codes != timed[max(batch_sizes)][1]).sum())
        if off:
            print(f"note: the margin pass's codes differ from the timed batch {max(batch_sizes)} codes at {off} "
                  f"token(s)")
    rows = []
    for b in batch_sizes:
        seconds, codes, peak = timed[b]
        differ = codes != ref
        rows.append({"batch": b, "images_per_s": args.num_images / seconds, "s_per_image": seconds / args.num_images,
                     "speedup": timed[1][0] / seconds, "differ": int(differ.sum()),
                     "min_margin_differ": float(margins[differ].min()) if margins is not None and differ.any()
                     else None, "peak_mib": peak})
    head = ["batch (images/forward)", "views/forward", "images/s", "s/image", "speed-up vs batch 1",
            "token ids differing from batch 1", "smallest margin among them"] + \
        (["peak MiB"] if device.type == "cuda" else [])
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["batch"]), str(r["batch"] * num_aug), f"{r['images_per_s']:.4g}", f"{r['s_per_image']:.4g}",
                 f"{r['speedup']:.2f}x", f"{r['differ']} of {ref.size}",
                 fmt_margin(r["min_margin_differ"]) if r["differ"] else "-"]
        cells += [] if r["peak_mib"] is None else [f"{r['peak_mib']:.0f}"]
        table.append("| " + " | ".join(cells) + " |")
    overall = None if margins is None else float(margins.min())
    notes = [f"smallest distance margin over all {ref.size} tokens: {fmt_margin(overall)} (second-smallest minus "
             f"smallest squared distance to the l2-normalised codebook; from untimed forwards at batch "
             f"{max(batch_sizes)})" if margins is not None else
             f"distance margins: n/a for {args.vq_model} (LlamaGen VQ tokenizers only)",
             "batch 1 = one image's views per forward, as the official extract_codes_c2i.py; speed-up = images/s "
             "over batch 1's in this run",
             "peak MiB: torch.cuda.max_memory_allocated per batch size" if device.type == "cuda" else
             f"memory: the process's peak RSS was {peak_memory_bytes('cpu') / 2**20:.0f} MiB"]
    print("\n".join(table))
    for line in notes:
        print(f"- {line}")
    if args.results:
        write_results(args.results, device, settings, table, notes)
        print(f"appended to {args.results}")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # Tokenizer
    p.add_argument("--vq-model", choices=size_names(), default="VQ-16",
                   help="tokenizer size (VQ-16: LlamaGen's release)")
    p.add_argument("--vq-ckpt", default=None, help="tokenizer checkpoint; random seeded weights if absent")
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--codebook-embed-dim", type=int, default=8)
    p.add_argument("--v-patch-nums", default=None, help="MSVQ-* only: the scales, e.g. 1_2_4_8 (default: the "
                   "official list of --image-size)")
    # Workload
    p.add_argument("--num-images", type=int, default=64, help="images encoded at every batch size")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8],
                   help="images per forward; batch 1 (the baseline) is always measured first")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--ten-crop", action=argparse.BooleanOptionalAction, default=True,
                   help="ten crops per image (else the centre crop and its mirror)")
    p.add_argument("--crop-range", type=float, default=1.1, help="ten-crop from an int(S * crop_range) centre crop")
    p.add_argument("--warmup", type=int, default=1, help="untimed forwards per batch size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the images")
    # Execution
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--results", default=None, help="append the run as a Markdown section to this file")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())

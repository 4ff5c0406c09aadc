"""Training input speed: samples/s the GPT trainer's DataLoader delivers from per-image code files
(the official LlamaGen layout) and from the packed shards, cold and warm, in the same run.

    python bench/bench_codes_io.py                                   # 100,000 images, 2 views x 256 codes
    python bench/bench_codes_io.py --num-images 20000 --num-workers 4 --results bench/RESULTS.md

Both layouts hold the same synthetic codes (`--num-images` images, `--num-aug` views of `--num-tokens`
codes). Each is read for one epoch exactly as `train_c2i.py` reads it: `CodeDataset` with the
trainer's seeded shuffling sampler, `--batch-size` items per batch, `--num-workers` workers. "cold"
first evicts every code file from the page cache (`posix_fadvise(DONTNEED)`, no root needed), as on
the first epoch of a run; "warm" reads again with the files cached. Opening the data set (listing
files, reading shard indices) is timed apart from the epoch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch.utils.data import DataLoader  # noqa: E402

from dataset.code_shards import code_dtype, num_shards, shard_range, shards_dir, write_code_shard  # noqa: E402
from dataset.codes import CodeDataset, code_dirs  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.logger import progress  # noqa: E402
from utils.training import ResumableDistributedSampler  # noqa: E402

IMAGE_SIZE = 256  # only names the folders (imagenet256_*)


def make_codes(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    """The same random codes in both layouts under `root`: (per-image code path, packed code path)."""
    rng = np.random.default_rng(0)
    files_path, packed_path = root / "per_image", root / "packed"
    codes_dir, labels_dir = code_dirs(files_path, "imagenet", IMAGE_SIZE)
    codes_dir.mkdir(parents=True)
    labels_dir.mkdir(parents=True)
    folder = shards_dir(packed_path, "imagenet", IMAGE_SIZE)
    folder.mkdir(parents=True)
    dtype = code_dtype(args.codebook_size)
    for j in progress(range(num_shards(args.num_images, args.shard_size)), desc="writing codes", unit="shard"):
        ks = np.array(shard_range(j, args.shard_size, args.num_images))
        codes = rng.integers(0, args.codebook_size, size=(len(ks), args.num_aug, args.num_tokens))
        labels = rng.integers(0, 1000, size=len(ks))
        write_code_shard(folder, j, codes.astype(dtype), labels, ks, {"shard": j})
        for k, c, y in zip(ks, codes, labels):  # the official files: int64 (1, num_aug, N) and (1,)
            np.save(codes_dir / f"{k}.npy", c[None].astype(np.int64))
            np.save(labels_dir / f"{k}.npy", np.array([y], dtype=np.int64))
    return files_path, packed_path


def evict(path: Path) -> int:
    """Drop every file under `path` from the page cache; returns the number of files."""
    n = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            n += 1
    return n


def read_epoch(code_path: Path, args: argparse.Namespace) -> tuple[float, float, int]:
    """(seconds to open the data set, seconds for one epoch, samples delivered), as the trainer reads."""
    t0 = time.perf_counter()
    data = CodeDataset(code_path, dataset="imagenet", image_size=IMAGE_SIZE, seed=0)
    opened = time.perf_counter() - t0
    sampler = ResumableDistributedSampler(len(data), 0, 1, args.batch_size, seed=0)
    sampler.set_epoch(0)
    data.set_epoch(0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=args.num_workers,
                        drop_last=True)
    n = 0
    t0 = time.perf_counter()
    for codes, labels in progress(loader, desc=f"  reading {code_path.name}", unit="batch", leave=False):
        n += len(labels)
    return opened, time.perf_counter() - t0, n


def main(args: argparse.Namespace) -> list[dict]:
    if args.num_images < args.batch_size:
        raise ValueError(f"--num-images {args.num_images} must be at least --batch-size {args.batch_size}")
    workdir = Path(args.workdir) if args.workdir else None
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="bench_codes_io_", dir=workdir))
    print(f"{args.num_images:,} images x {args.num_aug} views x {args.num_tokens} codes under {root}")
    rows = []
    try:
        files_path, packed_path = make_codes(root, args)
        sizes = {name: sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
                 for name, p in (("per-image", files_path), ("packed", packed_path))}
        counts = {"per-image": sum(1 for _ in files_path.rglob("*.npy")),
                  "packed": sum(1 for _ in packed_path.rglob("*.npz"))}
        for cache in ("cold", "warm"):
            for name, path in (("per-image", files_path), ("packed", packed_path)):
                if cache == "cold":
                    evict(path)
                opened, seconds, n = read_epoch(path, args)
                rows.append({"layout": name, "cache": cache, "files": counts[name], "bytes": sizes[name],
                             "open_s": opened, "epoch_s": seconds, "samples_per_s": n / seconds})
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    report(rows, args)
    return rows


def report(rows: list[dict], args: argparse.Namespace) -> None:
    base = {r["cache"]: r["samples_per_s"] for r in rows if r["layout"] == "per-image"}
    lines = ["| layout | cache | files | MB | open s | epoch s | samples/s | x per-image |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layout']} | {r['cache']} | {r['files']:,} | {r['bytes'] / 1e6:,.0f} | {r['open_s']:.2f} "
                     f"| {r['epoch_s']:.2f} | {r['samples_per_s']:,.0f} | {r['samples_per_s'] / base[r['cache']]:.1f} |")
    table = "\n".join(lines)
    print(table)
    if args.results:
        cmd = "python bench/bench_codes_io.py " + " ".join(sys.argv[1:])
        section = (f"\n## {date.today().isoformat()}: training input, per-image files vs packed shards "
                   f"({os.cpu_count()} CPUs)\n\n```sh\n{cmd}\n```\n\n{args.num_images:,} images, {args.num_aug} views x "
                   f"{args.num_tokens} codes, batch {args.batch_size}, {args.num_workers} DataLoader workers.\n\n"
                   f"{table}\n")
        with open(args.results, "a") as f:
            f.write(section)
        print(f"appended to {args.results}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-images", type=int, default=100_000)
    p.add_argument("--num-aug", type=int, default=2, help="views per image (2: crop + flip; 10: ten-crop)")
    p.add_argument("--num-tokens", type=int, default=256, help="codes per view (256: VQ-16 at 256 px)")
    p.add_argument("--codebook-size", type=int, default=16384)
    p.add_argument("--shard-size", type=int, default=4096, help="images per packed shard (extraction's default)")
    p.add_argument("--batch-size", type=int, default=256, help="items per batch (one rank's micro-batch)")
    p.add_argument("--num-workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--workdir", type=str, default=None, help="where the codes are written (default: the temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the codes written")
    p.add_argument("--results", type=str, default=None, help="append the table to this markdown file")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())

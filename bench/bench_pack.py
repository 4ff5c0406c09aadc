"""Packing sample shards into the ADM `.npz`: peak RSS and wall time, in-memory against streamed.

    python bench/bench_pack.py                                   # 20,000 images of 256 px (3.9 GB)
    python bench/bench_pack.py --num-images 20000 --image-size 256 --shard-size 250 --results bench/RESULTS.md
    python bench/bench_pack.py --num-images 200 --image-size 32 --shard-size 30 --total 190   # quick

The bench writes `--num-images` random uint8 images (seeded) as the sampler's shards
(`utils/shards.py:write_shard`, `--shard-size` images each) in a temporary folder under `--workdir`,
then packs them twice, each packer in its own fresh Python process: `in-memory` is the packer before
streaming (every shard loaded, concatenated, `np.savez`; kept here as the baseline) and `streamed` is
`utils/shards.py:pack_npz` (one memory-mapped shard at a time through `utils/npz_stream.py`). Each
child reports its peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`, after packing), the same before
packing (the interpreter, numpy and torch, which `utils.shards` imports: torch's import peaks above
the resting RSS), the packing call's own peak above its starting RSS (`/proc/self/status` `VmHWM`,
reset through `/proc/self/clear_refs` just before the call; n/a where that is refused) and the wall
time of the packing call (the output is fsynced either way). The two outputs are then compared member by member,
streamed through `npz_member_memmap` in chunks (never loaded whole). The folder is removed at the
end unless `--keep`. `--results FILE` appends the run (date, device, command, table) to a Markdown file.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.checkpoint import atomic_write, save_npz  # noqa: E402
from utils.cli import run_cli  # noqa: E402
from utils.memory import peak_memory_bytes  # noqa: E402
from utils.logger import progress  # noqa: E402
from utils.npz_stream import npz_member_memmap  # noqa: E402
from utils.shards import finished_shards, pack_npz, write_shard  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pack_npz_in_memory(folder: Path, out_path: Path, total: int) -> Path:
    """The baseline: `utils/shards.py:pack_npz` before streaming (all shards in memory, concatenated)."""
    shards = finished_shards(folder)
    images, labels, expected = [], [], 0
    for start in sorted(shards):
        if start != expected:
            raise RuntimeError(f"sample shards in {folder} have a gap at index {expected}: rerun to finish")
        with np.load(shards[start]) as f:
            images.append(f["images"])
            labels.append(f["labels"])
        expected += len(labels[-1])
    if expected < total:
        raise RuntimeError(f"only {expected} of {total} samples are in {folder}: rerun to finish")
    arr = np.concatenate(images)[:total]
    lab = np.concatenate(labels)[:total]
    return save_npz(out_path, arr_0=arr, labels=lab)


PACKERS = {"in-memory": pack_npz_in_memory, "streamed": pack_npz}


def peak_rss_mib() -> float:
    return peak_memory_bytes("cpu") / 2**20  # the process's peak RSS (utils/memory.py)


def proc_status_mib(key: str) -> float | None:
    """`VmRSS` (now) or `VmHWM` (peak) of this process from /proc/self/status, None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark (`VmHWM`) to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(packer: str, folder: str, out: str, total: int) -> None:
    """Run one packer in this (fresh) process; print its figures as one JSON line.

    `ru_maxrss` is the process's peak, imports included (torch's import peaks above its resting RSS),
    so the packing's own peak is also read: `VmHWM` reset just before the call, minus `VmRSS` then."""
    before = peak_rss_mib()
    start = proc_status_mib("VmRSS")
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    PACKERS[packer](Path(folder), Path(out), total)
    seconds = time.perf_counter() - t0
    hwm = proc_status_mib("VmHWM")
    growth = hwm - start if reset and hwm is not None and start is not None else None
    print(json.dumps({"packer": packer, "rss_before_mib": before, "peak_rss_mib": peak_rss_mib(),
                      "rss_start_mib": start, "packing_growth_mib": growth, "seconds": seconds}))


def run_packer(packer: str, folder: Path, out: Path, total: int) -> dict:
    """One packer in its own Python process (so that each peak RSS is its own)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", packer, str(folder), str(out), str(total)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the {packer} packer failed (status {r.returncode}):\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_shards(folder: Path, num_images: int, image_size: int, shard_size: int, seed: int) -> None:
    """Random uint8 shards of the sampler's format; shard `start` draws from seed (seed, start)."""
    starts = range(0, num_images, shard_size)
    for start in progress(starts, desc="shards", unit="shard"):
        n = min(shard_size, num_images - start)
        rng = np.random.default_rng([seed, start])
        images = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
        write_shard(folder, start, images, rng.integers(0, 1000, size=n))


def same_npz(a: Path, b: Path, rows_per_chunk: int) -> bool:
    """Both files hold the same members (names, dtypes, shapes, values), read chunkwise through
    `npz_member_memmap` (each chunk mapped afresh, so neither file is ever resident whole)."""
    import zipfile

    with zipfile.ZipFile(a) as za, zipfile.ZipFile(b) as zb:
        if za.namelist() != zb.namelist():
            return False
        names = [n[:-4] for n in za.namelist()]
    for name in names:
        ma, mb = npz_member_memmap(a, name), npz_member_memmap(b, name)
        if ma.dtype != mb.dtype or ma.shape != mb.shape:
            return False
        n = len(ma)
        del ma, mb
        for lo in range(0, n, rows_per_chunk):
            ca = npz_member_memmap(a, name)[lo:lo + rows_per_chunk]
            cb = npz_member_memmap(b, name)[lo:lo + rows_per_chunk]
            if not np.array_equal(ca, cb):
                return False
    return True


def device_name() -> str:
    return f"CPU, {len(os.sched_getaffinity(0))} cores"


def command_line(argv: list[str] | None) -> str:
    return shlex.join(["python", "bench/bench_pack.py", *(argv or [])])


COLUMNS = ["packer", "peak RSS MiB", "peak before packing MiB", "RSS at start MiB", "packing peak +MiB",
           "wall s"]
WIDTHS = [10, 13, 24, 17, 18, 8]


def table_rows(results: list[dict]) -> list[list[str]]:
    def mib(v):
        return "n/a" if v is None else f"{v:.0f}"

    return [[r["packer"], mib(r["peak_rss_mib"]), mib(r["rss_before_mib"]), mib(r["rss_start_mib"]),
             mib(r["packing_growth_mib"]), f"{r['seconds']:.1f}"] for r in results]


def console_line(cells: list[str]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def write_results(path: str, settings: str, results: list[dict], verdict: str, argv: list[str] | None) -> None:
    """Append this run as a Markdown section to `path` (written to a temporary file, then renamed)."""
    table = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    table += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    section = [f"## {datetime.date.today().isoformat()} — {device_name()}: packing shards into the ADM .npz "
               f"(bench_pack)", "", "```sh", command_line(argv), "```", "", settings, "", *table, "",
               f"- {verdict}", ""]
    old = Path(path).read_text() if Path(path).exists() else ""
    text = old + ("\n" if old and not old.endswith("\n\n") else "") + "\n".join(section)
    atomic_write(path, lambda f: f.write(text.encode()))


def main(args: argparse.Namespace, argv: list[str] | None = None) -> list[dict]:
    """Make the shards, pack them with both packers (each in its own process), compare, report."""
    for flag in ("num_images", "image_size", "shard_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    total = args.num_images if args.total is None else args.total
    if not 1 <= total <= args.num_images:
        raise ValueError(f"--total must be in [1, --num-images {args.num_images}], got {total}")
    if args.workdir is not None and not Path(args.workdir).is_dir():
        raise NotADirectoryError(f"--workdir {args.workdir} is not a folder")
    work = Path(tempfile.mkdtemp(prefix="bench_pack.", dir=args.workdir))
    pixels = total * args.image_size ** 2 * 3
    settings = (f"{args.num_images} random uint8 images of {args.image_size} px in shards of {args.shard_size} "
                f"({-(-args.num_images // args.shard_size)} shards), packed to {total} images "
                f"({pixels / 1e9:.2f} GB of pixels); each packer in its own process; numpy {np.__version__}")
    print(f"bench_pack: {settings}; {device_name()}; workdir {work}")
    try:
        folder = work / "shards"
        t0 = time.perf_counter()
        make_shards(folder, args.num_images, args.image_size, args.shard_size, args.seed)
        print(f"shards written in {time.perf_counter() - t0:.1f} s")
        results = []
        for packer in PACKERS:
            results.append(run_packer(packer, folder, work / f"{packer}.npz", total))
            print(f"{packer}: done in {results[-1]['seconds']:.1f} s")
        rows_per_chunk = max(1, (256 << 20) // (args.image_size ** 2 * 3))  # 256 MiB of images
        identical = same_npz(work / "in-memory.npz", work / "streamed.npz", rows_per_chunk)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(console_line(COLUMNS))
    for row in table_rows(results):
        print(console_line(row))
    ratio = results[0]["peak_rss_mib"] / results[1]["peak_rss_mib"]
    verdict = (f"outputs {'array-identical' if identical else 'DIFFER'} (arr_0 and labels compared chunkwise "
               f"through npz_member_memmap); peak RSS in-memory / streamed: {ratio:.1f}x. Peak RSS: the child's "
               f"ru_maxrss; peak before packing: the same after its imports (numpy, torch) only; packing "
               f"peak +MiB: the packing call's own RSS peak above its RSS at start (VmHWM reset, Linux)")
    print(verdict)
    if args.results:
        write_results(args.results, settings, results, verdict, argv)
        print(f"appended to {args.results}")
    if not identical:
        raise SystemExit("bench_pack: the streamed output differs from the in-memory one")
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=20_000, help="images written as shards")
    p.add_argument("--image-size", type=int, default=256, help="height and width of each image")
    p.add_argument("--shard-size", type=int, default=250, help="images per shard (the sampler's batch)")
    p.add_argument("--total", type=int, default=None, help="images packed (default: all; fewer cuts the last shard)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random images")
    p.add_argument("--workdir", default=None,
                   help="folder for the shards and both outputs (default: the system's temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the shards and outputs")
    p.add_argument("--results", default=None, help="append the run as a Markdown section to this file")
    p.add_argument("--child", nargs=4, metavar=("PACKER", "FOLDER", "OUT", "TOTAL"), help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":
    parsed = build_parser().parse_args()
    if parsed.child:
        child(parsed.child[0], parsed.child[1], parsed.child[2], int(parsed.child[3]))
    else:
        run_cli(main, parsed, sys.argv[1:])

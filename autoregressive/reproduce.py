"""Reproduce a published row from its released checkpoint: download, sample 50 per class, evaluate.

    bash scripts/reproduce.sh llamagen GPT-L-384                 # torchrun on 8 GPUs by default
    python -m autoregressive.reproduce llamagen GPT-L-384 --nproc-per-node 1 --dry-run
    python -m autoregressive.reproduce --list

The rows live in one data file, `pretrained_models/presets.json` (method, name, strategy, the exact
sampling flags, the reference batch, the published numbers); files are named as in
`pretrained_models/checkpoints.json` and downloaded through `utils/download.py`. Sampling runs
`autoregressive/sample/sample_c2i_ddp.py` under torchrun (resumable: a rerun keeps finished
shards), evaluation `evaluations/c2i/metrics.py:evaluate_npz`. The published and measured numbers
are printed side by side and written to `<npz>.reproduce.json`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

from utils.cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "pretrained_models" / "presets.json"
#: sample_flags whose value names a file of the checkpoint registry.
FILE_FLAGS = ("gpt-ckpt", "vq-ckpt")
METRICS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
           ("precision", "Precision"), ("recall", "Recall"))


def load_presets(path: str | Path = PRESETS) -> list[dict[str, Any]]:
    return json.loads(Path(path).read_text())["presets"]


def find_preset(method: str, name: str, path: str | Path = PRESETS) -> dict[str, Any]:
    """The row `method name`; an unknown one raises a ValueError listing the known rows."""
    rows = load_presets(path)
    for row in rows:
        if row["method"] == method and row["name"] == name:
            return row
    known = ", ".join(f"{r['method']} {r['name']}" for r in rows)
    raise ValueError(f"no preset {method} {name!r} in {path}; known presets: {known}")


def sample_argv(row: dict[str, Any], files: dict[str, Path], sample_dir: str | Path,
                per_proc_batch_size: int, num_fid_samples: int) -> list[str]:
    """The flags of sample_c2i_ddp.py for a row, with registry names replaced by local paths."""
    argv = ["--strategy", row["strategy"]]
    for flag, value in row["sample_flags"].items():
        if flag in FILE_FLAGS:
            value = files[value]
        if value is True:
            argv.append(f"--{flag}")
        elif value is not False and value is not None:
            argv += [f"--{flag}", str(value)]
    return argv + ["--sample-dir", str(sample_dir), "--per-proc-batch-size", str(per_proc_batch_size),
                   "--num-fid-samples", str(num_fid_samples)]


def fetch_files(row: dict[str, Any], models_dir: str | Path, download=None) -> dict[str, Path]:
    """Download (or find in place) every registry file the row names, reference batch included."""
    if download is None:
        from utils.download import download_checkpoint as download
    names = [row["sample_flags"][f] for f in FILE_FLAGS if f in row["sample_flags"]] + [row["reference"]]
    return {n: Path(download(n, models_dir)) for n in names}


def comparison_table(row: dict[str, Any], measured: dict[str, Any]) -> str:
    """Markdown: metric | published | measured."""
    lines = [f"{row['method']} {row['name']} ({row['strategy']}, backend {measured.get('backend', '?')}, "
             f"{measured.get('num_samples', '?')} samples)", "", "| metric | published | measured |",
             "| --- | --- | --- |"]
    for key, label in METRICS:
        pub = row["published"].get(key)
        got = measured.get(key)
        lines.append(f"| {label} | {'-' if pub is None else pub} | {'-' if got is None else f'{got:.4g}'} |")
    return "\n".join(lines)


def sample_npz_path(argv: list[str]) -> Path:
    """Where sample_c2i_ddp.py writes the .npz for these flags (its own naming rule)."""
    from autoregressive.sample import sample_c2i_ddp

    args = sample_c2i_ddp.build_parser().parse_args(argv)
    return Path(args.sample_dir) / f"{sample_c2i_ddp.run_name(args)}.npz"


def main(args: argparse.Namespace, backend=None, download=None) -> dict[str, Any] | None:
    """Run one preset; `backend` / `download` replace the Inception backend / the downloader (tests)."""
    if args.list:
        for r in load_presets(args.presets):
            pub = ", ".join(f"{k} {v}" for k, v in r["published"].items() if v is not None)
            print(f"{r['method']:10s} {r['name']:14s} --strategy {r['strategy']:7s} {pub}")
        return None
    if not args.method or not args.name:
        raise ValueError("give a method and a preset name (see --list)")
    row = find_preset(args.method, args.name, args.presets)
    for flag in ("nproc_per_node", "per_proc_batch_size", "num_fid_samples", "is_split_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    args.models_dir, args.sample_dir = str(Path(args.models_dir).resolve()), str(Path(args.sample_dir).resolve())
    if args.dry_run:
        files = {n: Path(args.models_dir) / n for n in
                 [row["sample_flags"][f] for f in FILE_FLAGS if f in row["sample_flags"]] + [row["reference"]]}
    else:
        files = fetch_files(row, args.models_dir, download)
    argv = sample_argv(row, files, args.sample_dir, args.per_proc_batch_size, args.num_fid_samples)
    argv += shlex.split(args.extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}",
           f"--master_port={args.master_port}", str(ROOT / "autoregressive" / "sample" / "sample_c2i_ddp.py"), *argv]
    npz = sample_npz_path(argv)
    eval_cmd = f"python evaluations/c2i/evaluator.py {files[row['reference']]} {npz} --backend {args.backend}"
    print("sample:   " + shlex.join(cmd))
    print("evaluate: " + eval_cmd)
    if args.dry_run:
        return {"sample_cmd": cmd, "npz": str(npz)}
    subprocess.run(cmd, check=True, cwd=ROOT)
    from evaluations.c2i.metrics import evaluate_npz

    if backend is None:
        from evaluations.c2i.evaluator import build_backend
        backend = build_backend(args.backend, args.weights, 64, None)
    metrics = evaluate_npz(files[row["reference"]], npz, backend, split_size=args.is_split_size).to_dict()
    print(comparison_table(row, metrics))
    report = {"preset": row, "measured": metrics, "npz": str(npz), "sample_cmd": cmd}
    npz.with_suffix(".reproduce.json").write_text(json.dumps(report, indent=2))
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("method", nargs="?", help="llamagen, par, npp, arpg, lpd or var")
    p.add_argument("name", nargs="?", help="preset name, e.g. GPT-L-384 (see --list)")
    p.add_argument("--list", action="store_true", help="list the presets and their published numbers")
    p.add_argument("--presets", default=str(PRESETS), help="the presets table")
    p.add_argument("--models-dir", default="pretrained_models", help="where checkpoints are downloaded")
    p.add_argument("--sample-dir", default="samples", help="shards and the .npz go here")
    p.add_argument("--nproc-per-node", type=int, default=8, help="torchrun processes (GPUs)")
    p.add_argument("--master-port", type=int, default=12346, help="torchrun master port")
    p.add_argument("--per-proc-batch-size", type=int, default=32, help="images per batch per process")
    p.add_argument("--num-fid-samples", type=int, default=50000, help="50 per class, as published")
    p.add_argument("--backend", choices=["tf", "torch"], default="tf", help="evaluator feature backend")
    p.add_argument("--weights", default=None, help="evaluator weights (see evaluations/c2i/evaluator.py)")
    p.add_argument("--is-split-size", type=int, default=5000, help="Inception Score split (official 5000)")
    p.add_argument("--extra", default="", help="more sample_c2i_ddp.py flags, e.g. '--device cpu'")
    p.add_argument("--dry-run", action="store_true", help="print the commands, download and run nothing")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())

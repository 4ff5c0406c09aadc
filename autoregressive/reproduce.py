"""Reproduce a published row from its released checkpoint: download, sample 50 per class (or
reconstruct the validation set), evaluate.

    bash scripts/reproduce.sh llamagen GPT-L-384                 # torchrun on 8 GPUs by default
    python -m autoregressive.reproduce llamagen GPT-L-384 --nproc-per-node 1 --dry-run
    bash scripts/reproduce.sh vq VQ-16 --data-path /data/imagenet/val   # a tokenizer's rFID
    python -m autoregressive.reproduce --list

The rows live in one data file, `pretrained_models/presets.json`; files are named as in
`pretrained_models/checkpoints.json` and downloaded through `utils/download.py`. A row's `kind`:

- `gpt` (the default): method, name, strategy, the exact sampling flags, the reference batch, the
  published numbers. Sampling runs `autoregressive/sample/sample_c2i_ddp.py` under torchrun
  (resumable: a rerun keeps finished shards), evaluation `evaluations/c2i/metrics.py:evaluate_npz`.
- `vq`: a tokenizer's reconstruction flags and its published rFID (PSNR, SSIM where published).
  `tokenizer/reconstruction_vq_ddp.py` under torchrun reconstructs the validation images given by
  `--data-path` and writes the reference batch of those same images; rFID is the ADM evaluator
  between the two (LlamaGen's protocol), PSNR and SSIM come from the reconstruction.

The published and measured numbers are printed side by side and written to `<npz>.reproduce.json`.
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
from utils.run import given_flags

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ROOT / "pretrained_models" / "presets.json"
#: sample_flags whose value names a file of the checkpoint registry.
FILE_FLAGS = ("gpt-ckpt", "vq-ckpt")
#: recon_flags (kind vq) whose value names a file of the checkpoint registry.
RECON_FILE_FLAGS = ("vq-ckpt",)
METRICS = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
           ("precision", "Precision"), ("recall", "Recall"))
VQ_METRICS = (("fid", "rFID"), ("psnr", "PSNR"), ("ssim", "SSIM (official data_range=2)"),
              ("ssim_range1", "SSIM (data_range=1)"))
#: row kinds: sampling a GPT, or reconstructing with a tokenizer.
KINDS = ("gpt", "vq")
#: what the dry run prints for a data set the user has to provide.
DATA_PLACEHOLDER = "/path/to/imagenet/val"


def row_kind(row: dict[str, Any]) -> str:
    """A row's kind; rows without one are GPT rows."""
    return row.get("kind", "gpt")


def load_presets(path: str | Path = PRESETS, kind: str | None = None) -> list[dict[str, Any]]:
    """The rows of the presets table (only those of `kind` when given); an unknown kind is refused."""
    rows = json.loads(Path(path).read_text())["presets"]
    for r in rows:
        if row_kind(r) not in KINDS:
            raise ValueError(f"{path}: preset {r.get('method')} {r.get('name')} has kind {row_kind(r)!r}; "
                             f"known kinds: {', '.join(KINDS)}")
    return [r for r in rows if kind is None or row_kind(r) == kind]


def find_preset(method: str, name: str, path: str | Path = PRESETS) -> dict[str, Any]:
    """The row `method name`; an unknown one raises a ValueError listing the known rows."""
    rows = load_presets(path)
    for row in rows:
        if row["method"] == method and row["name"] == name:
            return row
    known = ", ".join(f"{r['method']} {r['name']}" for r in rows)
    raise ValueError(f"no preset {method} {name!r} in {path}; known presets: {known}")


def flag_argv(flags: dict[str, Any], files: dict[str, Path], file_flags) -> list[str]:
    """A preset's flags as argv: registry file names replaced by local paths, True as a bare flag,
    False and None left out."""
    argv: list[str] = []
    for flag, value in flags.items():
        if flag in file_flags:
            value = files[value]
        if value is True:
            argv.append(f"--{flag}")
        elif value is not False and value is not None:
            argv += [f"--{flag}", str(value)]
    return argv


def sample_argv(row: dict[str, Any], files: dict[str, Path], sample_dir: str | Path,
                per_proc_batch_size: int, num_fid_samples: int) -> list[str]:
    """The flags of sample_c2i_ddp.py for a row, with registry names replaced by local paths."""
    argv = ["--strategy", row["strategy"], *flag_argv(row["sample_flags"], files, FILE_FLAGS)]
    return argv + ["--sample-dir", str(sample_dir), "--per-proc-batch-size", str(per_proc_batch_size),
                   "--num-fid-samples", str(num_fid_samples)]


def fetch_files(row: dict[str, Any], models_dir: str | Path, download=None) -> dict[str, Path]:
    """Download (or find in place) every registry file the row names, reference batch included."""
    if download is None:
        from utils.download import download_checkpoint as download
    names = [row["sample_flags"][f] for f in FILE_FLAGS if f in row["sample_flags"]] + [row["reference"]]
    return {n: Path(download(n, models_dir)) for n in names}


def download_command(names: list[str], models_dir: str | Path) -> str:
    """The download step as a command a user can run alone."""
    return shlex.join(["python", "scripts/download_models.py", *names, "--dest", str(models_dir)])


def recon_argv(row: dict[str, Any], files: dict[str, Path], sample_dir: str | Path, per_proc_batch_size: int,
               data_path: str | None) -> list[str]:
    """The flags of reconstruction_vq_ddp.py for a `vq` row, registry names replaced by local paths."""
    argv = flag_argv(row["recon_flags"], files, RECON_FILE_FLAGS)
    if data_path is not None:
        argv += ["--data-path", str(data_path)]
    return argv + ["--sample-dir", str(sample_dir), "--per-proc-batch-size", str(per_proc_batch_size)]


def comparison_table(row: dict[str, Any], measured: dict[str, Any]) -> str:
    """Markdown: metric | published | measured."""
    what = row.get("strategy") or "reconstruction"
    lines = [f"{row['method']} {row['name']} ({what}, backend {measured.get('backend', '?')}, "
             f"{measured.get('num_samples', '?')} samples)", "", "| metric | published | measured |",
             "| --- | --- | --- |"]
    for key, label in (VQ_METRICS if row_kind(row) == "vq" else METRICS):
        pub = row["published"].get(key)
        got = measured.get(key)
        lines.append(f"| {label} | {'-' if pub is None else pub} | {'-' if got is None else f'{got:.4g}'} |")
    return "\n".join(lines)


def sample_npz_path(argv: list[str]) -> Path:
    """Where sample_c2i_ddp.py writes the .npz for these flags (its own naming rule)."""
    from autoregressive.sample import sample_c2i_ddp

    parser = sample_c2i_ddp.build_parser()
    args = parser.parse_args(argv)
    if Path(args.gpt_ckpt).is_file():  # the checkpoint's recorded classes enter the name, as in the sampler
        sample_c2i_ddp.resolve_classes(args, given_flags(parser, argv))
    return Path(args.sample_dir) / f"{sample_c2i_ddp.run_name(args)}.npz"


def evaluate(row: dict[str, Any], args: argparse.Namespace, ref: Path, npz: Path, backend=None) -> dict[str, Any]:
    """The ADM evaluator on `npz` against `ref` (the Inception backend of the flags unless given)."""
    from evaluations.c2i.metrics import evaluate_npz

    if backend is None:
        from evaluations.c2i.evaluator import build_backend
        backend = build_backend(args.backend, args.weights, 64, None)
    return evaluate_npz(ref, npz, backend, split_size=args.is_split_size).to_dict()


def report(row: dict[str, Any], metrics: dict[str, Any], npz: Path, cmd: list[str], key: str) -> dict[str, Any]:
    """Print the comparison and write it beside the evaluated `.npz` as `<npz>.reproduce.json`."""
    print(comparison_table(row, metrics))
    out = {"preset": row, "measured": metrics, "npz": str(npz), key: cmd}
    npz.with_suffix(".reproduce.json").write_text(json.dumps(out, indent=2))
    return out


def run_sampling(row: dict[str, Any], args: argparse.Namespace, backend=None, download=None) -> dict[str, Any]:
    """A `gpt` row: download, sample 50 per class under torchrun, evaluate against the reference batch."""
    names = [row["sample_flags"][f] for f in FILE_FLAGS if f in row["sample_flags"]] + [row["reference"]]
    print("download: " + download_command(names, args.models_dir))
    if args.dry_run:
        files = {n: Path(args.models_dir) / n for n in names}
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
    return report(row, evaluate(row, args, files[row["reference"]], npz, backend), npz, cmd, "sample_cmd")


def recon_outputs(argv: list[str], codebook_size: int, codebook_dim: int) -> tuple[Path, Path, Path]:
    """(reconstructions .npz, reference .npz, results .json) that reconstruction_vq_ddp.py writes for
    these flags (its own naming rule), for a tokenizer of that codebook."""
    from tokenizer import reconstruction_vq_ddp as recon

    a = recon.get_parser().parse_args(argv)
    name = recon.run_name(a, codebook_size, codebook_dim)
    return (Path(a.sample_dir) / f"{name}.npz", Path(a.sample_dir) / recon.reference_name(a),
            Path(a.sample_dir) / f"{name}_results.json")


def run_reconstruction(row: dict[str, Any], args: argparse.Namespace, backend=None,
                       download=None) -> dict[str, Any]:
    """A `vq` row: download the tokenizer, reconstruct the validation images under torchrun (writing
    their reference batch too), evaluate rFID against that reference, add PSNR and SSIM."""
    from tokenizer.reconstruction_vq_ddp import get_parser as recon_parser

    defaults = recon_parser().parse_args(["--vq-ckpt", "x"])
    dataset = row["recon_flags"].get("dataset", defaults.dataset)
    data_path = args.data_path
    if dataset != "digits" and data_path is None:
        if not args.dry_run:
            raise ValueError(f"{row['method']} {row['name']} reconstructs the {dataset} validation images, which "
                             f"cannot be downloaded: pass --data-path (their class-folder tree <root>/<class>/"
                             f"<image>; the published numbers use the 50,000 ImageNet validation images)")
        data_path = DATA_PLACEHOLDER
    if data_path is not None and not args.dry_run and not Path(data_path).is_dir():
        raise FileNotFoundError(f"--data-path {data_path} is not a folder")
    names = [row["recon_flags"][f] for f in RECON_FILE_FLAGS if f in row["recon_flags"]]
    print("download: " + download_command(names, args.models_dir))
    if args.dry_run:
        files = {n: Path(args.models_dir) / n for n in names}
    else:
        if download is None:
            from utils.download import download_checkpoint as download
        files = {n: Path(download(n, args.models_dir)) for n in names}
    argv = recon_argv(row, files, args.sample_dir, args.per_proc_batch_size, data_path) + shlex.split(args.extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc_per_node}",
           f"--master_port={args.master_port}", str(ROOT / "tokenizer" / "reconstruction_vq_ddp.py"), *argv]
    parsed = recon_parser().parse_args(argv)
    if args.dry_run:  # a release file holds the codebook of the flags
        size = (parsed.codebook_size, parsed.codebook_embed_dim)
    else:  # the tokenizer itself names its outputs (ours record their codebook)
        from tokenizer.registry import codebook, load_tokenizer
        size = codebook(load_tokenizer(parsed.vq_ckpt, parsed.vq_model, codebook_size=parsed.codebook_size,
                                       codebook_embed_dim=parsed.codebook_embed_dim, image_size=parsed.image_size))
    npz, ref, results = recon_outputs(argv, *size)
    print("reconstruct: " + shlex.join(cmd))
    print(f"evaluate:    python evaluations/c2i/evaluator.py {ref} {npz} --backend {args.backend}")
    if data_path == DATA_PLACEHOLDER:
        print(f"note: {row['name']} reconstructs the {dataset} validation images: pass --data-path")
    if args.dry_run:
        return {"recon_cmd": cmd, "npz": str(npz), "reference": str(ref)}
    subprocess.run(cmd, check=True, cwd=ROOT)
    metrics = evaluate(row, args, ref, npz, backend)
    image_metrics = json.loads(results.read_text())
    metrics.update({k: image_metrics[k] for k in ("psnr", "ssim", "ssim_range1")})
    return report(row, metrics, npz, cmd, "recon_cmd")


def main(args: argparse.Namespace, backend=None, download=None) -> dict[str, Any] | None:
    """Run one preset; `backend` / `download` replace the Inception backend / the downloader (tests)."""
    if args.list:
        for r in load_presets(args.presets):
            pub = ", ".join(f"{k} {v}" for k, v in r["published"].items() if v is not None)
            how = f"--strategy {r['strategy']:7s}" if row_kind(r) == "gpt" else f"{'reconstruction':18s}"
            print(f"{r['method']:10s} {r['name']:14s} {how} {pub}")
        return None
    if not args.method or not args.name:
        raise ValueError("give a method and a preset name (see --list)")
    row = find_preset(args.method, args.name, args.presets)
    for flag in ("nproc_per_node", "per_proc_batch_size", "num_fid_samples", "is_split_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    args.models_dir, args.sample_dir = str(Path(args.models_dir).resolve()), str(Path(args.sample_dir).resolve())
    if row_kind(row) == "vq":
        return run_reconstruction(row, args, backend, download)
    if args.data_path is not None:
        raise ValueError(f"--data-path is for the reconstruction presets (kind vq, e.g. vq VQ-16); "
                         f"{row['method']} {row['name']} samples its images")
    return run_sampling(row, args, backend, download)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("method", nargs="?", help="llamagen, par, npp, arpg, lpd, var, or vq (tokenizers)")
    p.add_argument("name", nargs="?", help="preset name, e.g. GPT-L-384 (see --list)")
    p.add_argument("--list", action="store_true", help="list the presets and their published numbers")
    p.add_argument("--presets", default=str(PRESETS), help="the presets table")
    p.add_argument("--models-dir", default="pretrained_models", help="where checkpoints are downloaded")
    p.add_argument("--sample-dir", default="samples", help="shards and the .npz go here")
    p.add_argument("--data-path", default=None,
                   help="vq presets: the validation images (<root>/<class>/<image>; ImageNet val as published)")
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

"""ADM-compatible evaluator: Inception Score, FID, sFID, Precision, Recall of a sample batch.

    python evaluations/c2i/evaluator.py VIRTUAL_imagenet256_labeled.npz samples.npz
    python evaluations/c2i/evaluator.py REF.npz SAMPLE.npz --backend torch --weights W.pth

Same command line and printout as `openai/guided-diffusion:evaluations/evaluator.py` (and
LlamaGen's copy, which also writes the five lines to `<sample without .npz>.txt`). Backends:
`tf` runs the original graph `classify_image_graph_def.pb` through TensorFlow (downloaded to
`pretrained_models/` if absent); `torch` runs our PyTorch port of that graph with converted
weights (`python -m evaluations.c2i.convert`), on the GPU when there is one. The reference
statistics are cached beside the reference batch per backend.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from evaluations.c2i.convert import CONVERTED_PATH, build_inception  # noqa: E402
from evaluations.c2i.features import TorchInceptionBackend  # noqa: E402
from evaluations.c2i.metrics import Metrics, check_batches, evaluate_npz  # noqa: E402
from evaluations.c2i.statistics import IS_SPLIT_SIZE  # noqa: E402
from utils.checkpoint import atomic_write  # noqa: E402
from utils.cli import run_cli  # noqa: E402


def build_backend(kind: str, weights: str | None, batch_size: int, device: str | None):
    if kind == "tf":
        from evaluations.c2i.inception_tf import TFInceptionBackend  # noqa: PLC0415 - needs TF

        backend = TFInceptionBackend(weights, batch_size=batch_size)
        print("warming up TensorFlow...")
        backend.warmup()
        return backend
    path = Path(weights) if weights else CONVERTED_PATH
    return TorchInceptionBackend(build_inception(path), name=f"torch ({path.name})",
                                 batch_size=batch_size, device=device)


def write_report(sample_path: str | Path, metrics: Metrics) -> Path:
    """`<sample without .npz>.txt` with the five lines (LlamaGen) and the backend's name."""
    sample_path = Path(sample_path)
    stem = sample_path.name[:-4] if sample_path.name.endswith(".npz") else sample_path.name
    text = "\n".join(metrics.lines() + [f"Feature backend: {metrics.backend}"]) + "\n"
    return atomic_write(sample_path.with_name(stem + ".txt"), lambda f: f.write(text.encode()))


def main(argv: list[str] | None = None) -> Metrics:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref_batch", help="path to reference batch npz file")
    parser.add_argument("sample_batch", help="path to sample batch npz file")
    # Backend
    parser.add_argument("--backend", choices=["tf", "torch"], default="tf",
                        help="tf: the original graph via TensorFlow (published numbers); "
                             "torch: the PyTorch port with converted weights")
    parser.add_argument("--weights", default=None,
                        help="tf: path of classify_image_graph_def.pb; torch: converted .pth "
                             f"(default {CONVERTED_PATH.name} under pretrained_models/)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward (official 64)")
    parser.add_argument("--device", default=None, help="torch backend device (default: cuda if available)")
    # Protocol
    parser.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                        help="Inception Score split size (official 5000); smaller only for small tests")
    parser.add_argument("--no-cache", action="store_true",
                        help="do not read or write the reference statistics cache")
    args = parser.parse_args(argv)
    if args.is_split_size < 1 or args.batch_size < 1:
        raise ValueError("--is-split-size and --batch-size must be >= 1")
    check_batches(args.ref_batch, args.sample_batch, args.is_split_size)  # before any weights are fetched

    backend = build_backend(args.backend, args.weights, args.batch_size, args.device)
    print(f"feature backend: {backend.name}")
    metrics = evaluate_npz(args.ref_batch, args.sample_batch, backend, split_size=args.is_split_size,
                           use_cache=not args.no_cache)
    for line in metrics.lines():
        print(line)
    write_report(args.sample_batch, metrics)
    return metrics


if __name__ == "__main__":
    run_cli(main)

"""Evaluator speed: images/s of each feature backend, and the time to evaluate 50k samples.

    python bench/bench_eval.py                                   # CPU, every backend it can build
    python bench/bench_eval.py --device cuda --num-images 2048 --batch-size 256
    python bench/bench_eval.py --backends torch domain --num-images 64 --stats-samples 500

Each backend runs `--num-images` random uint8 images at `--image-size` (after one untimed batch);
the 50k extrapolation is that rate times 50,000 plus the statistics measured on `--stats-samples`
feature vectors and scaled to 50k (mean/covariance and IS linearly, the manifold estimator of
precision/recall quadratically: it compares every sample with every reference point). The
reference side is not counted: it is computed once and cached (`evaluations/c2i/reference.py`).

Backends: `torch` (the PyTorch port of the ADM graph; the converted weights when present, else
random weights of the same network, same speed, said in the output), `tf` (the original graph
through TensorFlow; only when `classify_image_graph_def.pb` is present, as the test stand-in
graph would measure nothing real), `domain` (the digits classifier of the demo, random weights).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evaluations.c2i.convert import CONVERTED_PATH, INCEPTION_GRAPH_PATH, build_inception  # noqa: E402
from evaluations.c2i.features import TorchInceptionBackend, compute_activations  # noqa: E402
from evaluations.c2i.inception_torch import InceptionV3ADM  # noqa: E402
from evaluations.c2i.statistics import compute_statistics, inception_score, precision_recall  # noqa: E402
from evaluations.digits_classifier import DigitsClassifier, digits_backend  # noqa: E402
from utils.cli import run_cli  # noqa: E402

FULL = 50_000


def build_backends(names: list[str], device: str, batch_size: int) -> list[tuple[object, str]]:
    """(backend, note) for every requested backend that can be built here; prints why not otherwise."""
    out = []
    for name in names:
        if name == "torch":
            if CONVERTED_PATH.is_file():
                out.append((TorchInceptionBackend(build_inception(CONVERTED_PATH), name=f"torch ({CONVERTED_PATH.name})",
                                                  batch_size=batch_size, device=device), "converted weights"))
            else:
                out.append((TorchInceptionBackend(InceptionV3ADM().eval().requires_grad_(False), name="torch (random)",
                                                  batch_size=batch_size, device=device),
                            f"random weights: {CONVERTED_PATH} absent, same network and speed"))
        elif name == "tf":
            if not INCEPTION_GRAPH_PATH.is_file():
                print(f"tf: skipped, {INCEPTION_GRAPH_PATH} absent (python evaluations/c2i/convert.py downloads it)")
                continue
            try:
                from evaluations.c2i.inception_tf import TFInceptionBackend
                backend = TFInceptionBackend(INCEPTION_GRAPH_PATH, batch_size=batch_size, download=False)
                backend.warmup()
            except ImportError as e:
                print(f"tf: skipped, {e}")
                continue
            out.append((backend, "the original graph"))
        elif name == "domain":
            out.append((digits_backend(DigitsClassifier(), "digits_classifier (random)", device, batch_size),
                        "digits classifier, random weights, 32 px"))
        else:
            raise ValueError(f"unknown backend {name!r}; known: torch, tf, domain")
    return out


def time_features(backend, images: np.ndarray, batch_size: int) -> float:
    """Seconds for the activations of `images` (after one untimed batch)."""
    backend(images[:batch_size])
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
    compute_activations(backend, batches, len(images), show_progress=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def time_statistics(n: int, dim: int = 2048, spatial_dim: int = 2023) -> dict[str, float]:
    """Seconds of each statistic on n random feature vectors (the sample side of one evaluation)."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal((n, dim), dtype=np.float32)
    spatial = rng.standard_normal((n, spatial_dim), dtype=np.float32)
    probs = rng.dirichlet(np.ones(1008), n).astype(np.float32)
    ref = rng.standard_normal((n, dim), dtype=np.float32)
    out = {}
    t0 = time.perf_counter()
    stats = compute_statistics(pool)
    compute_statistics(spatial)
    out["mean_cov"] = time.perf_counter() - t0
    # The Frechet distance costs the same at any n; full-rank covariances (as at 50k) take the
    # fast path, so it is timed on 2 * dim vectors whatever --stats-samples is.
    full_rank = [compute_statistics(rng.standard_normal((2 * dim, dim), dtype=np.float32)) for _ in range(2)]
    t0 = time.perf_counter()
    full_rank[0].frechet_distance(full_rank[1])
    out["frechet"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inception_score(probs, split_size=max(n // 10, 1))
    out["inception_score"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    precision_recall(ref, pool)
    out["precision_recall"] = time.perf_counter() - t0
    return out


def main(args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dev = args.device
    print(f"bench_eval: {args.num_images} random {args.image_size}x{args.image_size} images, batch {args.batch_size}, "
          f"device {torch.cuda.get_device_name() if dev == 'cuda' else f'CPU, {torch.get_num_threads()} threads'}")
    n = args.stats_samples
    stats = time_statistics(n)
    scale = FULL / n
    stats_full = (stats["mean_cov"] + stats["inception_score"]) * scale + stats["frechet"] \
        + stats["precision_recall"] * scale ** 2
    print(f"statistics on {n} samples: mean/cov {stats['mean_cov']:.2f} s, Frechet {stats['frechet']:.2f} s, "
          f"IS {stats['inception_score']:.3f} s, precision/recall {stats['precision_recall']:.2f} s "
          f"-> {stats_full:.0f} s at 50k (extrapolated: linear, precision/recall quadratic)")
    print(f"{'backend':34s} {'images/s':>10s} {'features 50k':>13s} {'total 50k':>10s}  note")
    rows = {}
    for backend, note in build_backends(args.backends, dev, args.batch_size):
        size = 32 if backend.name.startswith("domain") else args.image_size
        images = rng.integers(0, 256, (args.num_images, size, size, 3), dtype=np.uint8)
        seconds = time_features(backend, images, args.batch_size)
        rate = args.num_images / seconds
        feats_full = FULL / rate
        rows[backend.name] = {"images_per_s": rate, "features_50k_s": feats_full, "total_50k_s": feats_full + stats_full}
        print(f"{backend.name:34s} {rate:10.1f} {feats_full / 60:11.1f} min {(feats_full + stats_full) / 60:7.1f} min  {note}")
    return {"statistics": stats, "statistics_50k_s": stats_full, "backends": rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--backends", nargs="+", default=["torch", "tf", "domain"], choices=["torch", "tf", "domain"])
    p.add_argument("--num-images", type=int, default=256, help="images measured per backend")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (official 64)")
    p.add_argument("--image-size", type=int, default=256, help="sample size (the graph resizes to 299)")
    p.add_argument("--stats-samples", type=int, default=5000, help="feature vectors for the statistics timing")
    return p


if __name__ == "__main__":
    run_cli(main, build_parser().parse_args())

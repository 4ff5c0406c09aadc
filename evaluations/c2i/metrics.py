"""The five ADM numbers from activations, and from two `.npz` batches end to end.

`compute_metrics(ref, sample)` is the official `main` after the activation pass: Inception Score
of the samples, FID and sFID of the sample statistics against the reference statistics
(`sample.frechet_distance(ref)`), precision and recall of the sample features against the
reference features. `evaluate_npz` adds the input checks and the streaming activation pass.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from evaluations.c2i.features import Activations, FeatureBackend, compute_activations
from evaluations.c2i.npz_io import BatchFormatError, BatchInfo, batch_info, iter_images
from evaluations.c2i.reference import ReferenceStats, reference_statistics
from evaluations.c2i.statistics import (IS_SPLIT_SIZE, ManifoldEstimator, compute_statistics,
                                        inception_score)


@dataclass
class Metrics:
    inception_score: float
    fid: float
    sfid: float | None  # None when the backend has no spatial features
    precision: float
    recall: float
    backend: str
    num_samples: int
    num_reference: int

    def lines(self) -> list[str]:
        """The official printout (`print("FID:", fid)` etc.), in the official order."""
        sfid = self.sfid if self.sfid is not None else f"n/a (backend {self.backend} has no spatial features)"
        return [f"Inception Score: {self.inception_score}", f"FID: {self.fid}", f"sFID: {sfid}",
                f"Precision: {self.precision}", f"Recall: {self.recall}"]

    def to_dict(self) -> dict:
        return asdict(self)


def compute_metrics(ref: ReferenceStats, sample: Activations, backend_name: str,
                    split_size: int = IS_SPLIT_SIZE, estimator: ManifoldEstimator | None = None,
                    log=None) -> Metrics:
    """IS, FID, sFID, precision, recall of `sample` against `ref` (official definitions); `log`
    (e.g. print) announces each phase, the slow k-NN passes of precision/recall included."""
    log = log or (lambda msg: None)
    n = len(sample.pool)
    if n < split_size:
        raise ValueError(
            f"{n} samples are fewer than one Inception Score split ({split_size}); published ADM "
            f"numbers use 50,000 samples (10 splits). Evaluate more samples, or pass a smaller "
            f"split size (--is-split-size {n}) knowing the number is not comparable")
    log("computing FID: sample statistics and the Frechet distance...")
    sample_stats = compute_statistics(sample.pool)
    fid = sample_stats.frechet_distance(ref.stats)
    sfid = None
    if sample.spatial is not None and ref.spatial_stats is not None:
        log("computing sFID: spatial statistics and the Frechet distance...")
        sfid = compute_statistics(sample.spatial).frechet_distance(ref.spatial_stats)
    log(f"computing precision/recall: k-NN manifolds of {len(ref.pool):,} reference and {n:,} sample features...")
    est = estimator or ManifoldEstimator(show_progress=log is not None)
    radii_ref = est.manifold_radii(ref.pool)
    radii_sample = est.manifold_radii(sample.pool)
    precision, recall, _, _ = est.evaluate_pr(ref.pool, radii_ref, sample.pool, radii_sample)
    return Metrics(inception_score(sample.probs, split_size), fid, sfid, float(precision[0]),
                   float(recall[0]), backend_name, n, len(ref.pool))


def check_batches(ref_path: str | Path, sample_path: str | Path, split_size: int = IS_SPLIT_SIZE) -> BatchInfo:
    """Both batches readable, uint8 NHWC RGB, of one image size, and enough samples for one
    Inception Score split: checked from the headers alone, before any weights are needed."""
    ref_info, sample_info = batch_info(ref_path), batch_info(sample_path)
    if (ref_info.height, ref_info.width) != (sample_info.height, sample_info.width):
        raise BatchFormatError(
            f"the reference images are {ref_info.height}x{ref_info.width} but the samples are "
            f"{sample_info.height}x{sample_info.width}; ADM compares images of the same size: "
            f"resize the samples (e.g. sample with --image-size-eval {ref_info.height}) or pick "
            f"the reference batch of that resolution")
    if sample_info.num_images < split_size:
        raise ValueError(
            f"{sample_path}: {sample_info.num_images} samples are fewer than one Inception Score "
            f"split ({split_size}); published ADM numbers use 50,000 samples. Evaluate more samples, "
            f"or pass --is-split-size {sample_info.num_images} knowing the number is not comparable")
    return sample_info


def evaluate_npz(ref_path: str | Path, sample_path: str | Path, backend: FeatureBackend,
                 split_size: int = IS_SPLIT_SIZE, use_cache: bool = True, show_progress: bool = True,
                 estimator: ManifoldEstimator | None = None, log=print) -> Metrics:
    """The whole evaluation of `sample_path` against `ref_path` with `backend`."""
    sample_info = check_batches(ref_path, sample_path, split_size)
    log("computing/reading reference batch statistics...")
    ref = reference_statistics(ref_path, backend, use_cache=use_cache, show_progress=show_progress)
    log("computing sample batch activations...")
    sample = compute_activations(backend, iter_images(sample_path, backend.batch_size),
                                 sample_info.num_images, desc="sample batch", show_progress=show_progress)
    log("Computing evaluations...")
    return compute_metrics(ref, sample, backend.name, split_size, estimator, log=log if show_progress else None)

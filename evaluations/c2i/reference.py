"""Reference-batch statistics, computed once per backend and cached beside the reference batch.

The official evaluator pushes the 10k reference images through Inception on every run (they are
needed for precision/recall) and takes `mu, sigma, mu_s, sigma_s` from the file when it stores
them (whole-train-set statistics), else computes them from the activations. We do the same once
and write `<ref stem>.<backend>.stats.npz` beside the batch (atomically), holding the reference
`pool` features and the four statistics, tagged with the backend and the source file's size and
modification time; a later run with the same backend and an unchanged batch reads it instead.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from evaluations.c2i.features import FeatureBackend, compute_activations
from evaluations.c2i.npz_io import BatchFormatError, BatchInfo, batch_info, iter_images, read_stored_statistics
from evaluations.c2i.statistics import FIDStatistics, compute_statistics
from utils.checkpoint import save_npz

CACHE_VERSION = 1


@dataclass
class ReferenceStats:
    """What the metrics need from the reference batch."""

    pool: np.ndarray  # [N_ref, D] features of the reference images (precision/recall)
    stats: FIDStatistics  # FID statistics (stored whole-train-set ones when the file has them)
    spatial_stats: FIDStatistics | None  # sFID statistics (None: the backend has no spatial features)
    info: BatchInfo
    from_cache: bool = False


def cache_path(ref_path: str | Path, backend_name: str) -> Path:
    ref_path = Path(ref_path)
    tag = re.sub(r"[^A-Za-z0-9]+", "_", backend_name).strip("_")
    stem = ref_path.name[:-4] if ref_path.name.endswith(".npz") else ref_path.name
    return ref_path.with_name(f"{stem}.{tag}.stats.npz")


def _source_tag(info: BatchInfo) -> np.ndarray:
    st = info.path.stat()
    return np.array([CACHE_VERSION, st.st_size, st.st_mtime_ns, info.num_images], dtype=np.int64)


def _read_cache(path: Path, backend_name: str, source: np.ndarray) -> dict | None:
    if not path.is_file():
        return None
    try:
        with np.load(path) as z:
            if str(z["backend"]) != backend_name or not np.array_equal(z["source"], source):
                return None
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):  # unreadable cache: recompute it
        return None


def _check_stored(stored: dict[str, np.ndarray], pool_dim: int, spatial_dim: int | None, path: Path,
                  backend_name: str) -> None:
    dims = {"mu": pool_dim, "mu_s": spatial_dim}
    for key, dim in dims.items():
        if dim is not None and stored[key].shape != (dim,):
            raise BatchFormatError(
                f"{path}: stored '{key}' has shape {stored[key].shape} but backend {backend_name} "
                f"gives {dim}-d features; these statistics belong to another feature network "
                f"(ADM reference batches hold Inception statistics: use --backend tf or torch)")


def reference_statistics(ref_path: str | Path, backend: FeatureBackend, use_cache: bool = True,
                         show_progress: bool = True) -> ReferenceStats:
    """Reference features and FID/sFID statistics for `backend`, cached beside `ref_path`."""
    info = batch_info(ref_path)
    source = _source_tag(info)
    cpath = cache_path(info.path, backend.name)
    cached = _read_cache(cpath, backend.name, source) if use_cache else None
    if cached is not None:
        spatial = (FIDStatistics(cached["mu_s"], cached["sigma_s"]) if "mu_s" in cached else None)
        return ReferenceStats(cached["pool"], FIDStatistics(cached["mu"], cached["sigma"]), spatial,
                              info, from_cache=True)

    acts = compute_activations(backend, iter_images(info.path, backend.batch_size), info.num_images,
                               desc="reference batch", show_progress=show_progress)
    stored = read_stored_statistics(info.path)
    spatial_dim = None if acts.spatial is None else acts.spatial.shape[1]
    if stored is not None:
        _check_stored(stored, acts.pool.shape[1], spatial_dim, info.path, backend.name)
        stats = FIDStatistics(stored["mu"], stored["sigma"])
        spatial = FIDStatistics(stored["mu_s"], stored["sigma_s"]) if spatial_dim is not None else None
    else:
        stats = compute_statistics(acts.pool)
        spatial = compute_statistics(acts.spatial) if acts.spatial is not None else None

    arrays = {"backend": np.array(backend.name), "source": source, "pool": acts.pool,
              "mu": stats.mu, "sigma": stats.sigma}
    if spatial is not None:
        arrays.update(mu_s=spatial.mu, sigma_s=spatial.sigma)
    if use_cache:
        save_npz(cpath, **arrays)
    return ReferenceStats(acts.pool, stats, spatial, info)

"""The ADM evaluator's statistics: Fréchet distance (FID, sFID), Inception Score, precision/recall.

Each function follows `openai/guided-diffusion@22e0df81:evaluations/evaluator.py` (the file
LlamaGen ships as `evaluations/c2i/evaluator.py`):

- `compute_statistics`: `mu` = mean over rows in the activations' dtype, `sigma = np.cov` (float64).
- `frechet_distance`: `sqrtm(sigma1 @ sigma2)`, the eps-on-the-diagonal retry when that is not
  finite, and the "Imaginary component" check (TTUR's safeguards); the same trace through a
  Cholesky factor when the reference covariance is positive definite (faster, same value).
- `inception_score`: consecutive splits of 5000 in file order, float32 arithmetic, plain mean.
- `ManifoldEstimator`: the k=3 manifold of improved precision/recall (Kynkäänniemi et al. 2019),
  squared distances through the official float16-first path, row/column blocks of 10000.

Nothing here knows about images or networks: the functions take activations (numpy arrays) and
are what the parity tests check against the golden `adm_eval` fixtures.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg

FRECHET_EPS = 1e-6  # official `frechet_distance(other, eps=1e-6)`
IS_SPLIT_SIZE = 5000  # official `compute_inception_score(activations, split_size=5000)`
SOFTMAX_BATCH_SIZE = 512  # official `Evaluator(softmax_batch_size=512)`


# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------

@dataclass
class FIDStatistics:
    """Mean and covariance of a set of activations (official dtypes: `mu` float32, `sigma` float64)."""

    mu: np.ndarray
    sigma: np.ndarray

    def frechet_distance(self, other: "FIDStatistics", eps: float = FRECHET_EPS, method: str = "auto") -> float:
        """FD(self, other); the evaluator calls `sample.frechet_distance(ref)`."""
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps, method)


def compute_statistics(activations: np.ndarray) -> FIDStatistics:
    """`mu = mean(acts, 0)` (numpy pairwise sum, input dtype), `sigma = np.cov(acts, rowvar=False)`."""
    if activations.ndim != 2:
        raise ValueError(f"activations must be [N, D], got shape {activations.shape}")
    if len(activations) < 2:
        raise ValueError(f"a covariance needs at least 2 activations, got {len(activations)}")
    return FIDStatistics(np.mean(activations, axis=0), np.cov(activations, rowvar=False))


def _trace_sqrt_product_cholesky(sigma1: np.ndarray, sigma2: np.ndarray) -> float | None:
    """`tr sqrtm(sigma1 @ sigma2)` through `sigma2 = L L^T`: `sigma1 @ sigma2` is similar to the
    symmetric PSD `L^T sigma1 L`, so the trace is the sum of the square roots of its eigenvalues
    (agrees with `sqrtm` to ~1e-8 relative on the `adm_eval` fixtures). None when `sigma2` is not positive
    definite (rank-deficient statistics), where only the official route applies."""
    s1, s2 = torch.from_numpy(np.asarray(sigma1, np.float64)), torch.from_numpy(np.asarray(sigma2, np.float64))
    chol, info = torch.linalg.cholesky_ex(s2)
    if int(info) != 0 or not torch.isfinite(s1).all():
        return None
    eig = torch.linalg.eigvalsh(chol.T @ s1 @ chol)
    return float(torch.sqrt(torch.clamp(eig, min=0)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FRECHET_EPS, method: str = "auto") -> float:
    """`|mu1-mu2|^2 + tr(s1) + tr(s2) - 2 tr(sqrtm(s1 @ s2))`, with the official safeguards.

    `method="sqrtm"` is the official route: `scipy.linalg.sqrtm` of the non-symmetric product;
    when that is not finite the official code warns and retries with `eps` added to both
    diagonals; a complex result is accepted (real part kept) only if every diagonal imaginary part
    is within 1e-3 of 0, otherwise `ValueError("Imaginary component ...")`.
    `method="auto"` (default) computes the same trace through a Cholesky factor of `s2` when it is
    positive definite (the usual case with 50k samples; ~10x faster at 2048 dims on a CPU) and
    takes the official route otherwise.
    """
    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape:
        raise ValueError(f"Training and test mean vectors have different lengths: {mu1.shape}, {mu2.shape}")
    if sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Training and test covariances have different dimensions: {sigma1.shape}, {sigma2.shape}")
    if method not in ("auto", "sqrtm"):
        raise ValueError(f"method must be 'auto' or 'sqrtm', got {method!r}")
    diff = mu1 - mu2
    tr_covmean = _trace_sqrt_product_cholesky(sigma1, sigma2) if method == "auto" else None
    if tr_covmean is None:
        tr_covmean = _trace_sqrtm_official(sigma1, sigma2, eps)
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def _trace_sqrtm_official(sigma1: np.ndarray, sigma2: np.ndarray, eps: float) -> float:
    # scipy >= 1.16 deprecates (1.18 removes) the `disp` argument the official code passes; the
    # default call returns the same matrix. A "singular matrix" warning is expected on
    # rank-deficient covariances and is not an error.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ingular.*")
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"fid calculation produces singular product; adding {eps} to diagonal of cov estimates")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # numerical error might give slight imaginary component
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(np.trace(covmean))


# ------------------------------------------------------------------------------------------------
# Inception Score
# ------------------------------------------------------------------------------------------------

def softmax_from_pool(pool: np.ndarray, weights: np.ndarray,
                      batch_size: int = SOFTMAX_BATCH_SIZE) -> np.ndarray:
    """`softmax(pool @ W)` in float32 chunks; W is the graph's `softmax/logits/MatMul` weight [D, K].

    The official evaluator takes that weight and never adds `softmax/biases`.
    """
    w = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32))
    out = np.empty((len(pool), w.shape[1]), dtype=np.float32)
    for i in range(0, len(pool), batch_size):
        p = torch.from_numpy(np.ascontiguousarray(pool[i: i + batch_size], dtype=np.float32))
        out[i: i + batch_size] = torch.softmax(p @ w, dim=1).numpy()
    return out


def inception_score(probs: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
    """Mean over consecutive splits of `exp(mean_rows(KL(p(y|x) || p(y))))`, float32 as official.

    Splits are taken in file order (no shuffle): a class-sorted sample batch gives a low score.
    A short last split counts as much as a full one, exactly like the official loop.
    """
    if len(probs) == 0:
        raise ValueError("inception_score needs at least one probability row")
    probs = np.asarray(probs, dtype=np.float32)
    scores = []
    for i in range(0, len(probs), split_size):
        part = probs[i: i + split_size]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ------------------------------------------------------------------------------------------------
# Precision / recall (manifold estimator)
# ------------------------------------------------------------------------------------------------

def _round_half(x: torch.Tensor) -> torch.Tensor:
    """Round float32 values to the nearest float16 (inf where they overflow), kept as float32."""
    return x.half().float()


def pairwise_sq_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Squared distances [len(u), len(v)] as the official `DistanceBlock` computes them.

    Official: `max(|u|^2 - 2 u.v + |v|^2, 0)` on inputs cast to float16; if the whole block is
    finite it is used (cast to float32), else the block is recomputed in float32. We emulate the
    float16 graph by rounding after each operation (TF's own summation order is not reproducible
    by another library), which is exact whenever the values are small integers.
    """
    def block(a: torch.Tensor, b: torch.Tensor, rnd) -> torch.Tensor:
        na = rnd((a * a).sum(1, keepdim=True))
        nb = rnd((b * b).sum(1, keepdim=True)).T
        ab = rnd(2 * rnd(a @ b.T))
        return torch.clamp(rnd(rnd(na - ab) + nb), min=0.0)

    u, v = u.float(), v.float()
    d16 = block(_round_half(u), _round_half(v), _round_half)
    if torch.isfinite(d16).all():
        return d16
    return block(u, v, lambda x: x)


class ManifoldEstimator:
    """k-NN hyperspheres around feature vectors and membership tests between two sets.

    Arguments keep the official names and defaults (`row_batch_size=10000, col_batch_size=10000,
    nhood_sizes=(3,), clamp_to_percentile=None, eps=1e-5`). Batch sizes bound memory (the radii
    pass holds a [row_batch_size, N] float32 block) and do not change the results.
    """

    def __init__(self, row_batch_size: int = 10000, col_batch_size: int = 10000,
                 nhood_sizes: tuple[int, ...] = (3,), clamp_to_percentile: float | None = None,
                 eps: float = 1e-5, device: str | torch.device = "cpu", show_progress: bool = False):
        self.show_progress = show_progress  # a progress bar over the row blocks of each pass
        self.row_batch_size = row_batch_size
        self.col_batch_size = col_batch_size
        self.nhood_sizes = list(nhood_sizes)
        self.clamp_to_percentile = clamp_to_percentile
        self.eps = eps  # used by the official realism score, which `main` never reports
        self.device = torch.device(device)

    def _rows(self, n: int, desc: str):
        """The first row of each row block, under a progress bar when `show_progress`."""
        starts = range(0, n, self.row_batch_size)
        if not self.show_progress:
            return starts
        from tqdm.auto import tqdm

        return tqdm(starts, desc=desc, unit="block", dynamic_ncols=True)

    def _t(self, x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(self.device)

    def manifold_radii(self, features: np.ndarray) -> np.ndarray:
        """[N, len(nhood_sizes)] float32: squared distance of each point to its k-th nearest other
        point (k-th smallest of its row, self-distance 0 included at index 0)."""
        n, k_max = len(features), max(self.nhood_sizes)
        if n <= k_max:
            raise ValueError(
                f"precision/recall need more than k={k_max} feature vectors per set to find the "
                f"k-th nearest neighbour, got {n}; evaluate more images")
        feats = self._t(features)
        radii = np.zeros([n, len(self.nhood_sizes)], dtype=np.float32)
        for b1 in self._rows(n, "precision/recall: k-NN radii"):
            rows = feats[b1: b1 + self.row_batch_size]
            dist = torch.cat([pairwise_sq_distances(rows, feats[b2: b2 + self.col_batch_size])
                              for b2 in range(0, n, self.col_batch_size)], dim=1)
            smallest = torch.topk(dist, k_max + 1, dim=1, largest=False, sorted=True).values
            radii[b1: b1 + len(rows)] = smallest[:, self.nhood_sizes].cpu().numpy()
            del dist
        if self.clamp_to_percentile is not None:
            max_distances = np.percentile(radii, self.clamp_to_percentile, axis=0)
            radii[radii > max_distances] = 0
        return radii

    def evaluate_pr(self, features_1: np.ndarray, radii_1: np.ndarray, features_2: np.ndarray,
                    radii_2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(precision [K1], recall [K2], features_1_status, features_2_status).

        `features_2_status[j, k]`: point j of set 2 lies inside some hypersphere of set 1
        (`d <= radius`, float32); precision is its mean (set 1 = reference, set 2 = samples).
        `features_1_status` likewise for set 1 inside set 2's manifold; recall is its mean.
        """
        f1, f2 = self._t(features_1), self._t(features_2)
        r1, r2 = self._t(radii_1), self._t(radii_2)
        status_1 = torch.zeros(len(f1), r2.shape[1], dtype=torch.bool, device=self.device)
        status_2 = torch.zeros(len(f2), r1.shape[1], dtype=torch.bool, device=self.device)
        for b1 in self._rows(len(f1), "precision/recall: manifold tests"):
            e1 = b1 + self.row_batch_size
            for b2 in range(0, len(f2), self.col_batch_size):
                e2 = b2 + self.col_batch_size
                d = pairwise_sq_distances(f1[b1:e1], f2[b2:e2])[..., None]  # (B1, B2, 1)
                status_1[b1:e1] |= (d <= r2[None, b2:e2]).any(dim=1)
                status_2[b2:e2] |= (d <= r1[b1:e1, None]).any(dim=0)
        s1, s2 = status_1.cpu().numpy(), status_2.cpu().numpy()
        return (np.mean(s2.astype(np.float64), axis=0), np.mean(s1.astype(np.float64), axis=0), s1, s2)


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     estimator: ManifoldEstimator | None = None) -> tuple[float, float]:
    """Official `Evaluator.compute_prec_recall(ref, sample)`: (precision, recall) with k=3."""
    est = estimator or ManifoldEstimator()
    radii_ref = est.manifold_radii(ref_features)
    radii_sample = est.manifold_radii(sample_features)
    precision, recall, _, _ = est.evaluate_pr(ref_features, radii_ref, sample_features, radii_sample)
    return float(precision[0]), float(recall[0])

"""Parity of the ADM evaluator statistics with the official code, on every `adm_eval` fixture.

Fixtures: `$GOLDEN_DIR/adm_eval/*.pt` (README beside them). Each case is recomputed with
`evaluations.c2i` from its stored inputs: statistics and Fréchet distances (`fid.pt`), the
Inception Score (`inception_score.pt`), precision/recall (`prec_recall*.pt`) and the activation
pass of a stand-in Inception graph (`activations.pt`) through the `torch` backend machinery.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from evaluations.c2i.features import TorchInceptionBackend, compute_activations
from evaluations.c2i.inception_torch import preprocess, resize_bilinear_tf1
from evaluations.c2i.statistics import (FIDStatistics, ManifoldEstimator, compute_statistics,
                                        frechet_distance, inception_score, pairwise_sq_distances,
                                        softmax_from_pool)
from tests.golden import assert_close, fixture_cases, get_case


def close(got: float, want: float, tol: dict, what: str) -> None:
    assert math.isclose(got, want, rel_tol=tol["rtol"], abs_tol=tol["atol"]), f"{what}: {got} != {want}"


def t(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(x))


# ------------------------------------------------------------------------------------------------
# Helpers that rebuild each fixture's inputs
# ------------------------------------------------------------------------------------------------

def hash_features(n: int, dim: int, salt: int) -> np.ndarray:
    """The integer hash of `golden/adm_eval/README.md` (uint64 arithmetic, M = 2**32 - 1)."""
    m = np.uint64(2**32 - 1)
    i = np.arange(n, dtype=np.uint64)[:, None]
    j = np.arange(dim, dtype=np.uint64)[None, :]
    h = (i * np.uint64(2654435761) + j * np.uint64(40503) + np.uint64(salt * 97531)) & m
    h = ((h ^ (h >> np.uint64(15))) * np.uint64(2246822519)) & m
    h = ((h ^ (h >> np.uint64(13))) * np.uint64(3266489917)) & m
    h = h ^ (h >> np.uint64(16))
    return ((h % np.uint64(4096)).astype(np.float64) / 4096).astype(np.float32)


class StandInInception(nn.Module):
    """The fixture's stand-in graph (README `activations.pt`) with the torch backend's contract:
    uint8 NHWC -> (pool_3, mixed_6/conv NHWC, bias-free logits), reusing our resize and scaling."""

    def __init__(self, sd: dict[str, torch.Tensor]):
        super().__init__()
        hwio_to_oihw = (3, 2, 0, 1)
        self.w1 = sd["mixed_6/conv/conv2d_params"].permute(hwio_to_oihw).contiguous()
        self.b1 = sd["mixed_6/conv/biases"]
        self.w2 = sd["pool_3/conv/conv2d_params"].permute(hwio_to_oihw).contiguous()
        self.b2 = sd["pool_3/conv/biases"]
        self.w_softmax = sd["softmax/weights"]

    def forward(self, images):
        x = F.avg_pool2d(preprocess(images), 17, stride=17)  # stem/AvgPool: (N, 3, 17, 17)
        m6 = F.relu(F.conv2d(x, self.w1) + self.b1[:, None, None])  # mixed_6/conv
        pool = F.avg_pool2d(F.relu(F.conv2d(m6, self.w2) + self.b2[:, None, None]), 17).flatten(1)
        return pool, m6.permute(0, 2, 3, 1), pool @ self.w_softmax


# ------------------------------------------------------------------------------------------------
# Case checks
# ------------------------------------------------------------------------------------------------

def check_stats_case(inp, out, tol):
    ref = compute_statistics(inp["ref_activations"].numpy())
    sample = compute_statistics(inp["sample_activations"].numpy())
    assert ref.mu.dtype == np.float32 and ref.sigma.dtype == np.float64  # official dtypes
    assert_close(t(ref.mu), out["ref_mu"], tol, "ref_mu")
    assert_close(t(ref.sigma), out["ref_sigma"].double(), tol, "ref_sigma")
    assert_close(t(sample.mu), out["sample_mu"], tol, "sample_mu")
    assert_close(t(sample.sigma), out["sample_sigma"].double(), tol, "sample_sigma")
    for method in ("auto", "sqrtm"):  # the fast route where it applies, and the official one
        close(sample.frechet_distance(ref, method=method), out["frechet_distance"], tol, method)


def check_frechet_from_statistics(inp, out, tol):
    a = [inp[k].double().numpy() for k in ("mu1", "sigma1", "mu2", "sigma2")]
    for method in ("auto", "sqrtm"):
        close(frechet_distance(*a, method=method), out["frechet_distance"], tol, method)
    close(FIDStatistics(a[2], a[3]).frechet_distance(FIDStatistics(a[0], a[1])),
          out["frechet_distance_swapped"], tol, "frechet_distance_swapped")


def check_full_2048(inp, out, tol):
    dim = inp["dim"]
    ref = hash_features(inp["n_ref"], dim, inp["salt_ref"])
    sample = hash_features(inp["n_sample"], dim, inp["salt_sample"]) * np.float32(0.875) + np.float32(0.0625)
    # The inputs themselves first: a wrong hash would make everything below meaningless.
    assert ref.sum(dtype=np.float64) == pytest.approx(inp["ref_activations_sum"], rel=1e-12)
    assert sample.sum(dtype=np.float64) == pytest.approx(inp["sample_activations_sum"], rel=1e-12)
    assert torch.equal(t(ref[0]), inp["ref_activations_first_row"])
    assert torch.equal(t(sample[-1]), inp["sample_activations_last_row"])
    rs, ss = compute_statistics(ref), compute_statistics(sample)
    assert_close(t(rs.mu), out["ref_mu"], tol, "ref_mu")
    assert_close(t(ss.mu), out["sample_mu"], tol, "sample_mu")
    close(float(np.trace(rs.sigma)), out["ref_sigma_trace"], tol, "ref_sigma_trace")
    close(float(np.trace(ss.sigma)), out["sample_sigma_trace"], tol, "sample_sigma_trace")
    assert_close(t(np.diagonal(rs.sigma).copy()), out["ref_sigma_diag"].double(), tol, "ref_sigma_diag")
    assert_close(t(ss.sigma[0]), out["sample_sigma_first_row"].double(), tol, "sample_sigma_first_row")
    # Full-rank 2048-d covariances: the Cholesky route (scipy's sqrtm of the same product takes
    # ~30 s on 2 CPU cores; the smaller cases check both routes against the official value).
    close(ss.frechet_distance(rs), out["frechet_distance"], tol, "frechet_distance")


def check_inception_score(fx, inp, out, tol):
    probs = softmax_from_pool(inp["activations"].numpy(), fx["state_dict"]["softmax/weights"].numpy())
    assert_close(t(probs[:16]), out["softmax_first16"], tol, "softmax_first16")
    for split in inp["split_sizes"]:
        close(inception_score(probs, split), out[f"inception_score_split_{split}"], tol, f"IS split {split}")


def check_prec_recall(fx, inp, out, tol):
    kwargs = {**fx["config"], **inp["manifold_estimator_kwargs"]}
    est = ManifoldEstimator(**kwargs)
    ref, sample = inp["ref_activations"].numpy(), inp["sample_activations"].numpy()
    ref_radii, sample_radii = est.manifold_radii(ref), est.manifold_radii(sample)
    precision, recall, ref_in, sample_in = est.evaluate_pr(ref, ref_radii, sample, sample_radii)
    close(float(precision[0]), out["precision"], tol, "precision")
    close(float(recall[0]), out["recall"], tol, "recall")
    assert_close(t(ref_radii), out["ref_radii"], tol, "ref_radii")
    assert_close(t(sample_radii), out["sample_radii"], tol, "sample_radii")
    d = pairwise_sq_distances(t(sample[:8]), t(ref[:8]))
    assert_close(d, out["pairwise_sq_distances_sample8_ref8"], tol, "pairwise distances")
    if "ref_in_sample_manifold" in out:
        assert_close(t(ref_in[:, 0]).long(), out["ref_in_sample_manifold"], tol, "ref_in_sample_manifold")
        assert_close(t(sample_in[:, 0]).long(), out["sample_in_ref_manifold"], tol, "sample_in_ref_manifold")


def check_clamp(fx, inp, out, tol):
    est = ManifoldEstimator(**{**fx["config"], **inp["manifold_estimator_kwargs"]})
    radii = est.manifold_radii(inp["features"].numpy())
    assert (radii == 0).any()  # the clamp did something
    assert_close(t(radii), out["radii"], tol, "radii")


def check_activations(fx, inp, out, tol):
    images = inp["images"].numpy()
    backend = TorchInceptionBackend(StandInInception(fx["state_dict"]), name="standin", device="cpu")
    batches = (images[i: i + 16] for i in range(0, len(images), 16))
    acts = compute_activations(backend, batches, len(images), show_progress=False)
    assert_close(t(acts.pool), out["pool_features"], tol, "pool_features")
    assert_close(t(acts.spatial), out["spatial_features"], tol, "spatial_features")
    assert_close(t(acts.probs), out["softmax"], tol, "softmax")
    close(inception_score(acts.probs), out["inception_score_default_split"], tol, "IS split 5000")
    close(inception_score(acts.probs, inp["split_size"]), out["inception_score_split"], tol, "IS split")
    resized = resize_bilinear_tf1(inp["images"][:1].float().permute(0, 3, 1, 2), (299, 299))
    rows = resized[0].permute(1, 2, 0)[list(range(24)) + list(range(291, 299))]
    assert_close(rows, out["resize_bilinear_img0_rows_0_23_and_291_298"], tol, "ResizeBilinear rows")
    with torch.no_grad():
        m6 = StandInInception(fx["state_dict"])(inp["images"][:2])[1]
    assert_close(m6, out["mixed_6_conv_first2"], tol, "mixed_6/conv")


@pytest.mark.parametrize("path,case_name", fixture_cases("adm_eval"))
def test_fixture(path, case_name):
    fx, case = get_case(path, case_name)
    tol, inp, out = fx["tolerance"], case["inputs"], case["outputs"]
    if case_name in ("fid_from_pool_like_activations", "sfid_from_spatial_like_activations",
                     "fid_rank_deficient_covariances"):
        check_stats_case(inp, out, tol)
    elif case_name == "frechet_distance_from_statistics":
        check_frechet_from_statistics(inp, out, tol)
    elif case_name == "fid_full_2048_dims_hash_features":
        check_full_2048(inp, out, tol)
    elif case_name == "inception_score_from_pool_activations":
        check_inception_score(fx, inp, out, tol)
    elif case_name in ("prec_recall_integer_features", "prec_recall_integer_features_small_batches",
                       "prec_recall_float_features"):
        check_prec_recall(fx, inp, out, tol)
    elif case_name == "manifold_radii_clamp_to_percentile":
        check_clamp(fx, inp, out, tol)
    elif case_name == "standin_graph_activations_and_inception_score":
        check_activations(fx, inp, out, tol)
    else:
        pytest.fail(f"unknown adm_eval case {case_name!r} in {path}: add its check to this test")

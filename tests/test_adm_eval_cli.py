"""The evaluator end to end: command line, printout, reference cache, domain backend, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from evaluations.c2i import evaluator
from evaluations.c2i.convert import InceptionWeightsError
from evaluations.c2i.features import DomainBackend
from evaluations.c2i.metrics import evaluate_npz
from evaluations.c2i.npz_io import BatchFormatError, iter_images
from evaluations.c2i.reference import cache_path, reference_statistics
from evaluations.c2i.inception_torch import InceptionV3ADM
from evaluations.c2i.statistics import compute_statistics, frechet_distance, inception_score, precision_recall
from utils.checkpoint import save_checkpoint


class TinyDomainNet(nn.Module):
    """A fixed random feature network: (features [B, 6], logits [B, 4], spatial [B, 2, 2, 2])."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 2, 3, stride=2)
        self.head = nn.Linear(6, 4)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)

    def forward(self, x):
        s = torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2)
        feats = torch.cat([s.flatten(1), x.mean((2, 3))], 1)[:, :6]
        return feats, self.head(feats), s


def images(n, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def savez(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def backend():
    return DomainBackend(TinyDomainNet(), name="tiny", batch_size=7, device="cpu")


def test_domain_backend_metrics_equal_the_statistics_of_its_features(tmp_path, backend):
    ref, sample = images(40, seed=1), images(30, seed=2)
    ref_p, sample_p = savez(tmp_path / "ref.npz", arr_0=ref), savez(tmp_path / "s.npz", arr_0=sample)
    m = evaluate_npz(ref_p, sample_p, backend, split_size=10, show_progress=False, log=lambda *_: None)
    rf, rs, _ = backend(ref)  # (pool, spatial, probs)
    sf, ss, sp = backend(sample)
    assert m.backend == "domain:tiny" and m.num_samples == 30 and m.num_reference == 40
    assert m.fid == pytest.approx(compute_statistics(sf).frechet_distance(compute_statistics(rf)), rel=1e-6)
    s_ref, s_sample = compute_statistics(rs), compute_statistics(ss)
    assert m.sfid == pytest.approx(frechet_distance(s_sample.mu, s_sample.sigma, s_ref.mu, s_ref.sigma), rel=1e-6)
    assert m.inception_score == pytest.approx(inception_score(sp, 10), rel=1e-6)
    assert (m.precision, m.recall) == precision_recall(rf, sf)
    assert 0 < m.fid and 0 <= m.precision <= 1 and 1 < m.inception_score <= 4


def test_reference_statistics_are_cached_and_invalidated(tmp_path, backend):
    ref_p = savez(tmp_path / "ref.npz", arr_0=images(20))
    first = reference_statistics(ref_p, backend, show_progress=False)
    cpath = cache_path(ref_p, backend.name)
    assert cpath.name == "ref.domain_tiny.stats.npz" and cpath.is_file() and not first.from_cache
    second = reference_statistics(ref_p, backend, show_progress=False)
    assert second.from_cache
    np.testing.assert_array_equal(second.pool, first.pool)
    np.testing.assert_array_equal(second.stats.sigma, first.stats.sigma)
    savez(ref_p, arr_0=images(21, seed=5))  # the batch changed: recompute
    third = reference_statistics(ref_p, backend, show_progress=False)
    assert not third.from_cache and len(third.pool) == 21


def test_stored_reference_statistics_are_used_and_checked(tmp_path, backend):
    mu, sigma = np.arange(6, dtype=np.float32), np.eye(6)
    ref_p = savez(tmp_path / "ref.npz", arr_0=images(20), mu=mu, sigma=sigma,
                  mu_s=np.zeros(8, np.float32), sigma_s=np.eye(8))
    ref = reference_statistics(ref_p, backend, use_cache=False, show_progress=False)
    np.testing.assert_array_equal(ref.stats.mu, mu)  # official: stored stats win
    assert len(ref.pool) == 20  # the images are still needed for precision/recall
    bad = savez(tmp_path / "inception_ref.npz", arr_0=images(20), mu=np.zeros(2048, np.float32),
                sigma=np.eye(3), mu_s=np.zeros(2023, np.float32), sigma_s=np.eye(3))
    with pytest.raises(BatchFormatError, match="another feature network"):
        reference_statistics(bad, backend, use_cache=False, show_progress=False)


@pytest.mark.parametrize("arrays,match", [
    (dict(arr_0=images(8).astype(np.float32) / 255), "dtype float32, expected uint8"),
    (dict(arr_0=images(8).transpose(0, 3, 1, 2).copy()), "looks like NCHW"),
    (dict(images=images(8)), r"no 'arr_0' array \(found keys \['images'\]\)"),
    (dict(arr_0=images(8)[..., 0]), r"expected \[N, H, W, 3\]"),
])
def test_bad_batches_are_refused_with_the_fix(tmp_path, backend, arrays, match):
    good = savez(tmp_path / "good.npz", arr_0=images(8))
    bad = savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(BatchFormatError, match=match):
        evaluate_npz(good, bad, backend, split_size=4, show_progress=False, log=lambda *_: None)


def test_size_mismatch_and_too_few_samples(tmp_path, backend):
    ref = savez(tmp_path / "ref.npz", arr_0=images(8, size=16))
    big = savez(tmp_path / "big.npz", arr_0=images(8, size=24))
    with pytest.raises(BatchFormatError, match="16x16 but the samples are 24x24"):
        evaluate_npz(ref, big, backend, split_size=4, show_progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="fewer than one Inception Score split.*--is-split-size 8"):
        evaluate_npz(ref, savez(tmp_path / "s.npz", arr_0=images(8)), backend, show_progress=False,
                     log=lambda *_: None)
    three = savez(tmp_path / "three.npz", arr_0=images(3))
    with pytest.raises(ValueError, match="more than k=3 feature vectors"):
        evaluate_npz(ref, three, backend, split_size=1, use_cache=False, show_progress=False,
                     log=lambda *_: None)


def test_streaming_reader_yields_file_order(tmp_path):
    x = images(10)
    p = savez(tmp_path / "x.npz", arr_0=x)
    chunks = list(iter_images(p, 4))
    assert [len(c) for c in chunks] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate(chunks), x)
    pc = tmp_path / "xc.npz"
    np.savez_compressed(pc, arr_0=x)
    np.testing.assert_array_equal(np.concatenate(list(iter_images(pc, 3))), x)


def test_command_line_torch_backend(tmp_path, capsys):
    """`evaluator.py REF SAMPLE --backend torch` with random Inception weights: the official
    printout in order, the report file, and a clear error for a missing weight file."""
    torch.manual_seed(0)
    model = InceptionV3ADM()
    for name, buf in model.named_buffers():
        if name.endswith("running_var"):
            buf.uniform_(0.5, 1.5)
    weights = save_checkpoint(model.state_dict(), tmp_path / "w.pth")
    # Like the ADM reference batches: images for precision/recall plus stored statistics.
    ref = savez(tmp_path / "ref.npz", arr_0=images(6, size=24, seed=1), mu=np.zeros(2048, np.float32),
                sigma=np.eye(2048) * 0.01, mu_s=np.zeros(2023, np.float32), sigma_s=np.eye(2023) * 0.01)
    sample = savez(tmp_path / "samples.npz", arr_0=images(5, size=24, seed=2))
    m = evaluator.main([str(ref), str(sample), "--backend", "torch", "--weights", str(weights),
                        "--device", "cpu", "--is-split-size", "5", "--batch-size", "6"])
    out = capsys.readouterr().out.splitlines()
    keys = [line.split(":")[0] for line in out if line.split(":")[0] in
            ("Inception Score", "FID", "sFID", "Precision", "Recall")]
    assert keys == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert f"FID: {m.fid}" in out and np.isfinite(m.fid) and np.isfinite(m.sfid)
    assert (tmp_path / "ref.torch_w_pth.stats.npz").is_file()  # cached beside the reference
    report = (tmp_path / "samples.txt").read_text().splitlines()
    assert report[:5] == m.lines() and report[5] == "Feature backend: torch (w.pth)"
    with pytest.raises(InceptionWeightsError, match="no Inception weights"):
        evaluator.main([str(ref), str(sample), "--backend", "torch", "--weights", str(tmp_path / "none.pth"),
                        "--is-split-size", "5"])
    # A batch that cannot be used is refused before the weights are looked for (or downloaded).
    nchw = savez(tmp_path / "nchw.npz", arr_0=images(5, size=24, seed=2).transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="looks like NCHW"):
        evaluator.main([str(ref), str(nchw), "--backend", "torch", "--weights", str(tmp_path / "none.pth"),
                        "--is-split-size", "5"])

"""Reconstruction metrics as the official `reconstruction_vq_ddp.py` computes them.

The official script calls scikit-image per image on HWC float images in [0, 1]:
`peak_signal_noise_ratio(restored, gt)` (data range 1, inferred from the non-negative float input)
and `structural_similarity(restored, gt, data_range=2.0, channel_axis=-1)`: a 7x7 uniform window,
K1 = 0.01, K2 = 0.03, sample covariance, reflect padding, border of 3 pixels cropped, mean over
channels. The data range of 2.0 for [0, 1] images is an official quirk (it shrinks C1 and C2 and
raises SSIM); `ssim` reproduces it by default and takes the correct `data_range=1.0` on request.
We compute in float64 with scipy, without scikit-image.
"""
from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

OFFICIAL_SSIM_DATA_RANGE = 2.0


def psnr(restored: np.ndarray, target: np.ndarray, data_range: float = 1.0) -> float:
    """10 log10(data_range^2 / MSE); +inf for identical images."""
    mse = np.mean((np.asarray(restored, np.float64) - np.asarray(target, np.float64)) ** 2)
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def ssim(restored: np.ndarray, target: np.ndarray, data_range: float = OFFICIAL_SSIM_DATA_RANGE,
         win_size: int = 7) -> float:
    """Mean SSIM of two HWC (or HW) images, scikit-image's default (non-Gaussian) variant."""
    x = np.asarray(restored, np.float64)
    y = np.asarray(target, np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    if x.ndim == 3:
        return float(np.mean([ssim(x[..., c], y[..., c], data_range, win_size) for c in range(x.shape[-1])]))
    if min(x.shape) < win_size:
        raise ValueError(f"SSIM needs images of at least {win_size}x{win_size}, got {x.shape}")
    n = win_size**2
    cov_norm = n / (n - 1.0)  # sample covariance
    ux, uy = uniform_filter(x, win_size), uniform_filter(y, win_size)
    uxx, uyy, uxy = uniform_filter(x * x, win_size), uniform_filter(y * y, win_size), uniform_filter(x * y, win_size)
    vx, vy, vxy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy), cov_norm * (uxy - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win_size - 1) // 2
    return float(s[pad:-pad, pad:-pad].mean())

"""Pixel metrics on uint8 images: PSNR and SSIM, as the audits report them.

Both take (H, W, 3) or (B, H, W, 3) uint8 arrays and return one value per image. SSIM follows
Wang et al. 2004 with the 7x7 uniform window and the sample covariance that scikit-image uses by
default (`structural_similarity(..., channel_axis=-1, data_range=255)`), averaged over channels,
so the audit numbers can be checked against scikit-image.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import uniform_filter

from dualtok_core.errors import ImageInputError

_K1, _K2, _WIN = 0.01, 0.03, 7


def _as_batch(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    for name, x in (("reference", a), ("reconstruction", b)):
        if x.dtype != np.uint8:
            raise ImageInputError(f"{name} must be uint8, got {x.dtype}")
    if a.shape != b.shape:
        raise ImageInputError(f"reference {a.shape} and reconstruction {b.shape} differ in shape")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4 or a.shape[-1] != 3:
        raise ImageInputError(f"images must be (H, W, 3) or (B, H, W, 3), got {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Peak signal-to-noise ratio in dB per image (data range 255); inf for identical images."""
    a, b = _as_batch(reference, reconstruction)
    mse = ((a - b) ** 2).mean(axis=(1, 2, 3))  # (B,)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def ssim(reference: np.ndarray, reconstruction: np.ndarray) -> np.ndarray:
    """Mean structural similarity per image, averaged over the three channels."""
    a, b = _as_batch(reference, reconstruction)
    if min(a.shape[1:3]) < _WIN:
        raise ImageInputError(f"SSIM needs images of at least {_WIN}x{_WIN}, got {a.shape[1]}x{a.shape[2]}")
    c1, c2 = (_K1 * 255.0) ** 2, (_K2 * 255.0) ** 2
    n = _WIN * _WIN
    cov_norm = n / (n - 1)  # sample covariance, as scikit-image's default
    size = (1, _WIN, _WIN, 1)  # filter over H and W only
    mu_a, mu_b = uniform_filter(a, size), uniform_filter(b, size)
    var_a = cov_norm * (uniform_filter(a * a, size) - mu_a * mu_a)
    var_b = cov_norm * (uniform_filter(b * b, size) - mu_b * mu_b)
    cov = cov_norm * (uniform_filter(a * b, size) - mu_a * mu_b)
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    pad = (_WIN - 1) // 2  # scikit-image crops the border where the window leaves the image
    return s[:, pad:-pad, pad:-pad, :].mean(axis=(1, 2, 3))

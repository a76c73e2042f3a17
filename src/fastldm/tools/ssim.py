"""Structural similarity, Wang, Bovik, Sheikh & Simoncelli 2004 ("Image Quality Assessment: From Error
Visibility to Structural Similarity", IEEE TIP 13(4), eq. 13 and §III-C):

    SSIM(x, y) = (2·μx·μy + C1)(2·σxy + C2) / ((μx² + μy² + C1)(σx² + σy² + C2)),  C1 = (K1·L)², C2 = (K2·L)²

with K1 = 0.01, K2 = 0.03, L the data range, and μ, σ², σxy local statistics under an 11 x 11 circular Gaussian
window of σ = 1.5 (normalised to sum 1). The mean SSIM (MSSIM) averages the map over the positions where the
window lies wholly inside the image, and here also over channels — what scikit-image's
`structural_similarity(..., gaussian_weights=True, sigma=1.5, use_sample_covariance=False)` computes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

K1, K2, SIGMA, RADIUS = 0.01, 0.03, 1.5, 5      # RADIUS = int(3.5·σ + 0.5): an 11-tap window


def _window() -> torch.Tensor:
    """The normalised 1-D Gaussian (11,) in float64; the 2-D window is its outer product."""
    x = torch.arange(-RADIUS, RADIUS + 1, dtype=torch.float64)
    w = torch.exp(-x**2 / (2 * SIGMA**2))
    return w / w.sum()


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian filter, valid positions only: (N, 1, H, W) -> (N, 1, H - 10, W - 10)."""
    w = _window()
    x = F.conv2d(x, w.view(1, 1, -1, 1))                             # (N, 1, H - 10, W)
    return F.conv2d(x, w.view(1, 1, 1, -1))                          # (N, 1, H - 10, W - 10)


def ssim(a, b, data_range: float = 1.0) -> np.ndarray | float:
    """Mean SSIM of images a and b (numpy arrays or tensors) shaped (H, W), (H, W, C) or a batch (B, H, W, C),
    both at least 11 x 11. Returns a float for one image, a (B,) float64 array for a batch."""
    a, b = torch.as_tensor(np.asarray(a)).double(), torch.as_tensor(np.asarray(b)).double()
    if a.shape != b.shape:
        raise ValueError(f"SSIM needs images of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    single = a.ndim < 4
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    if a.ndim == 3:
        a, b = a[None], b[None]
    B, H, W, C = a.shape
    if min(H, W) < 2 * RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * RADIUS + 1}x{2 * RADIUS + 1} pixels, got {W}x{H}")
    a = a.permute(0, 3, 1, 2).reshape(B * C, 1, H, W)               # (B·C, 1, H, W)
    b = b.permute(0, 3, 1, 2).reshape(B * C, 1, H, W)
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a**2
    var_b = _blur(b * b) - mu_b**2
    cov = _blur(a * b) - mu_a * mu_b
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    mean = s.reshape(B, -1).mean(dim=1).numpy()                       # (B,) over channels and positions
    return float(mean[0]) if single else mean

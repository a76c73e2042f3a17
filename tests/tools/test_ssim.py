"""SSIM (fastldm.tools.ssim) against closed forms and scikit-image's structural_similarity (test oracle).

Tolerance against scikit-image: 1e-6. Both compute in float64 with the same 11-tap Gaussian (σ = 1.5, truncate
3.5) over the same valid positions; they differ only in summation order (observed ~1e-12)."""
from __future__ import annotations

import numpy as np
import pytest

from fastldm.tools.ssim import K1, ssim


def _pair(shape, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random(shape)
    b = np.clip(a + 0.1 * rng.standard_normal(shape), 0, 1)   # a similar but not equal image
    return a, b


def test_identical_images_score_one():
    a, _ = _pair((16, 20, 3))
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-12)


def test_constant_images_closed_form():
    # Flat images have zero variance, so SSIM reduces to the luminance term (2·μa·μb + C1)/(μa² + μb² + C1).
    c1 = K1**2
    a, b = np.full((12, 12), 0.2), np.full((12, 12), 0.7)
    expected = (2 * 0.2 * 0.7 + c1) / (0.2**2 + 0.7**2 + c1)
    assert ssim(a, b) == pytest.approx(expected, abs=1e-12)


def test_negated_structure_is_negative():
    # b = 1 - a around the same mean 0.5: contrast equal, correlation -1 -> SSIM near -1.
    a, _ = _pair((32, 32))
    a = 0.5 + 0.4 * (a - 0.5)
    assert ssim(a, 1.0 - a) < -0.9


@pytest.mark.parametrize("shape", [(32, 40), (32, 40, 3), (11, 11, 4)])
def test_matches_scikit_image(shape):
    metrics = pytest.importorskip("skimage.metrics")
    a, b = _pair(shape, seed=len(shape))
    ref = metrics.structural_similarity(a, b, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False,
                                        channel_axis=-1 if len(shape) == 3 else None)
    assert abs(ssim(a, b) - ref) <= 1e-6


def test_batch_is_per_image():
    a, b = _pair((3, 16, 16, 3))
    batch = ssim(a, b)
    assert batch.shape == (3,)
    assert np.allclose(batch, [ssim(a[i], b[i]) for i in range(3)], atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="one shape"):
        ssim(np.zeros((16, 16)), np.zeros((16, 17)))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(np.zeros((8, 16)), np.zeros((8, 16)))

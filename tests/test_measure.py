"""The stages' PSNR, judged by scikit-image's (an independent implementation), and its bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio

from stages.common import measure


def noisy_pair(seed: int, frames: int = 3, height: int = 5, width: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    reference = rng.integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    noise = rng.integers(-40, 41, reference.shape)
    return np.clip(reference + noise, 0, 255).astype(np.uint8), reference


def oracle(frames: np.ndarray, reference: np.ndarray) -> float:
    return peak_signal_noise_ratio(reference, frames, data_range=255)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 9999), frames=st.integers(1, 4))
def test_psnr_matches_scikit_image_whole_per_frame_and_in_a_region(seed, frames):
    restored, reference = noisy_pair(seed, frames)
    assert measure.psnr(restored, reference) == pytest.approx(oracle(restored, reference), abs=1e-9)
    np.testing.assert_allclose(measure.psnr(restored, reference, per_frame=True),
                               [oracle(a, b) for a, b in zip(restored, reference)], atol=1e-9)
    region = np.random.default_rng(seed).random(reference.shape[:3]) < 0.5
    region[:, 0, 0] = True  # every frame selects a pixel
    assert measure.psnr(restored, reference, region=region) == pytest.approx(
        oracle(restored[region], reference[region]), abs=1e-9)
    np.testing.assert_allclose(measure.psnr(restored, reference, region=region, per_frame=True),
                               [oracle(a[r], b[r]) for a, b, r in zip(restored, reference, region)], atol=1e-9)


def test_identical_frames_score_a_finite_ceiling():
    _, reference = noisy_pair(0)
    assert measure.psnr(reference, reference) == pytest.approx(120.0)  # 10 log10(1 / MSE_FLOOR), not inf
    assert np.all(measure.psnr(reference, reference, per_frame=True) == pytest.approx(120.0))


def test_psnr_rejects_bad_input():
    restored, reference = noisy_pair(1)
    with pytest.raises(ValueError, match=r"must both be \[T, H, W, C\]"):
        measure.psnr(restored[:2], reference)
    with pytest.raises(ValueError, match="expected uint8"):
        measure.psnr(restored / 255, reference)
    with pytest.raises(ValueError, match=r"region must be bool \[T, H, W\]"):
        measure.psnr(restored, reference, region=np.ones(reference.shape[:3], np.uint8))
    empty = np.zeros(reference.shape[:3], bool)
    with pytest.raises(ValueError, match="region selects no pixel"):
        measure.psnr(restored, reference, region=empty)
    empty[0, 0, 0] = True
    with pytest.raises(ValueError, match="no pixel of some frame"):
        measure.psnr(restored, reference, region=empty, per_frame=True)

"""Pixel measures the data stages report on their own outputs (``vae``, ``degrade``, ``splat``, ``reinsert``).

The evaluation metrics of the paper's tables live in :mod:`chopgrad.metrics` (tensors, run by
``evaluate``); this is the one numpy PSNR the stages use to describe what they wrote, on the
``uint8`` ``[T, H, W, 3]`` frames they hold.
"""

from __future__ import annotations

import numpy as np

__all__ = ["MSE_FLOOR", "psnr"]

# The mean squared error (of pixels in [0, 1]) is floored here: identical frames score 120 dB, a
# finite number that JSON metrics files can hold, instead of inf.
MSE_FLOOR = 1e-12


def psnr(
    frames: np.ndarray,  # [T, H, W, 3] uint8
    reference: np.ndarray,  # [T, H, W, 3] uint8
    region: np.ndarray | None = None,  # [T, H, W] bool
    per_frame: bool = False,
) -> float | np.ndarray:
    """Peak signal-to-noise ratio of ``frames`` against ``reference``, in dB, with a peak of 255.

    Args:
        frames: ``uint8`` ``[T, H, W, 3]`` (any ``[T, H, W, C]``), e.g. renders or a reconstruction.
        reference: ``uint8``, the same shape: the ground truth.
        region: optional ``bool`` ``[T, H, W]``: only these pixels count (an object's mask).
        per_frame: one value per frame instead of one over the whole video (the mean squared error
            of all its pixels, not the mean of the frames' PSNRs).

    Returns:
        A float, or with ``per_frame`` a ``float64`` ``[T]`` array. At most 120 dB (see
        :data:`MSE_FLOOR`).

    Raises:
        ValueError: the arrays differ in shape or are not ``uint8``, or ``region`` has the wrong
            shape or selects no pixel (of some frame, with ``per_frame``).
    """
    if frames.shape != reference.shape or frames.ndim != 4:
        raise ValueError(f"psnr: frames {frames.shape} and reference {reference.shape} must both be [T, H, W, C].")
    if frames.dtype != np.uint8 or reference.dtype != np.uint8:
        raise ValueError(f"psnr: expected uint8 frames (peak 255), got {frames.dtype} and {reference.dtype}.")
    squared = (((frames.astype(np.float64) - reference) / 255) ** 2).mean(axis=-1)  # [T, H, W]
    axes = (1, 2) if per_frame else None
    if region is None:
        mse = squared.mean(axis=axes)
    else:
        if region.shape != squared.shape or region.dtype != bool:
            raise ValueError(f"psnr: region must be bool [T, H, W] = {list(squared.shape)}, got "
                             f"{region.dtype} {list(region.shape)}.")
        count = region.sum(axis=axes)
        if np.any(count == 0):
            raise ValueError("psnr: region selects no pixel" + (" of some frame." if per_frame else "."))
        mse = np.where(region, squared, 0.0).sum(axis=axes) / count
    value = 10 * np.log10(1.0 / np.maximum(mse, MSE_FLOOR))
    return value if per_frame else float(value)

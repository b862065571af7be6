"""The one input convention every metric in :mod:`chopgrad.metrics` accepts, checked in one place.

Videos are ``[B, 3, T, H, W]`` (the library's ``x``) or a single ``[T, 3, H, W]`` video, RGB, either

* floating point in ``[0, 1]``, or
* ``uint8`` in ``[0, 255]`` (divided by 255).

Anything else is refused with an error that says what was seen, never guessed: a float tensor with
values below 0 is most likely in ``[-1, 1]`` (the VAE's range) and must be mapped with ``(x + 1) / 2``
by the caller; a float tensor above 1 is most likely ``0..255`` and must be divided by 255. Values
within ``RANGE_TOLERANCE`` of the interval (decoder round-off) are clamped. Prediction and ground
truth must have the same shape: unlike DOVE's script, which silently crops both to the smaller frame
count and size, mismatches are errors here.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RANGE_TOLERANCE", "as_video", "as_video_pair", "frames_of", "to_uint8"]

RANGE_TOLERANCE = 1e-3  # float inputs may overshoot [0, 1] by this much (clamped), no more


def as_video(video: Tensor, name: str = "video") -> Tensor:
    """Check one video (batch) and return it as float32 ``[B, 3, T, H, W]`` in ``[0, 1]``.

    Args:
        video: ``[B, 3, T, H, W]`` or ``[T, 3, H, W]``; float in [0, 1] or uint8.
        name: what to call the tensor in error messages.
    """
    if not isinstance(video, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(video).__name__}")
    if video.ndim == 4:
        if video.shape[1] != 3:
            raise ValueError(f"{name} has shape {tuple(video.shape)}; a 4-D video must be [T, 3, H, W]")
        video = video.permute(1, 0, 2, 3).unsqueeze(0)  # [1, 3, T, H, W]
    elif video.ndim == 5:
        if video.shape[1] != 3:
            raise ValueError(f"{name} has shape {tuple(video.shape)}; a 5-D video must be [B, 3, T, H, W]")
    else:
        raise ValueError(f"{name} has shape {tuple(video.shape)}; expected [B, 3, T, H, W] or [T, 3, H, W]")
    if video.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(video.shape)}): no videos, frames or pixels")

    if video.dtype == torch.uint8:
        return video.float() / 255.0
    if not video.is_floating_point():
        raise TypeError(f"{name} has dtype {video.dtype}; expected a float tensor in [0, 1] or uint8 in [0, 255]")
    video = video.detach().float()
    if not torch.isfinite(video).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    low, high = video.min().item(), video.max().item()
    if low < -RANGE_TOLERANCE:
        raise ValueError(
            f"{name} has values down to {low:.4f}; metrics take float videos in [0, 1]. "
            "If it is in [-1, 1] (the VAE's range), pass (x + 1) / 2."
        )
    if high > 1 + RANGE_TOLERANCE:
        raise ValueError(
            f"{name} has values up to {high:.4f}; metrics take float videos in [0, 1]. "
            "If it holds 0..255 values, pass x / 255 or a uint8 tensor."
        )
    return video.clamp(0.0, 1.0)


def as_video_pair(pred: Tensor, gt: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`as_video` on both, and check they have the same number of videos, frames and size."""
    pred, gt = as_video(pred, "pred"), as_video(gt, "gt")
    if pred.shape != gt.shape:
        b, _, t, h, w = pred.shape
        b2, _, t2, h2, w2 = gt.shape
        problems = []
        if b != b2:
            problems.append(f"{b} vs {b2} videos")
        if t != t2:
            problems.append(f"{t} vs {t2} frames")
        if (h, w) != (h2, w2):
            problems.append(f"frame size {h}x{w} vs {h2}x{w2}")
        raise ValueError(f"pred and gt differ: {', '.join(problems)} (pred [B, 3, T, H, W] = "
                         f"{tuple(pred.shape)}, gt = {tuple(gt.shape)})")
    return pred, gt


def frames_of(video: Tensor) -> Tensor:
    """``[B, 3, T, H, W]`` -> ``[B * T, 3, H, W]``, frames of video 0 first."""
    b, c, t, h, w = video.shape
    return video.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [B * T, 3, H, W]


def to_uint8(video: Tensor) -> Tensor:
    """``[0, 1]`` floats -> ``uint8``, rounded as writing the frames to an 8-bit file would."""
    return (video * 255.0).round().clamp(0, 255).to(torch.uint8)

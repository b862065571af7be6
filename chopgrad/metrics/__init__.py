"""Video evaluation metrics: tensors in, numbers out.

Every metric takes videos ``[B, 3, T, H, W]`` (or one ``[T, 3, H, W]``), float in [0, 1] or uint8
(the rule and its errors: :mod:`chopgrad.metrics._video`). Pretrained weights are looked up through
:mod:`chopgrad.weights`; a missing file raises :class:`chopgrad.weights.MissingWeightsError` when the
metric is built, before any library tries to download it.

=========================  ===============  =================================================
name                       kind             implementation
=========================  ===============  =================================================
psnr, ssim                 per frame, FR    pyiqa defaults, DOVE's conventions (:mod:`.frames`)
lpips_vgg, lpips_alex      per frame, FR    lpips package v0.1
dists                      per frame, FR    pyiqa
fid                        frame sets       pyiqa's FID Inception + clean-fid resize (:mod:`.distribution`)
fvd                        video sets       cd-fvd's I3D
temporal_flickering, ...   per video, NR    VBench definitions (:mod:`.vbench`)
=========================  ===============  =================================================

:func:`evaluate` runs several by name and returns, per metric,
``{"value": float, "stand_in_weights": bool, "weights": {file: status}}`` where ``stand_in_weights``
is true when any weight file the metric loaded is not verified as the official one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from chopgrad.metrics import vbench
from chopgrad.metrics._video import as_video, as_video_pair
from chopgrad.metrics.distribution import FID, FVD
from chopgrad.metrics.frames import DISTS, LPIPS, PSNR, SSIM

__all__ = [
    "DISTRIBUTION",
    "DISTS",
    "FID",
    "FULL_REFERENCE",
    "FVD",
    "LOWER_IS_BETTER",
    "LPIPS",
    "METRICS",
    "NO_REFERENCE",
    "PSNR",
    "SSIM",
    "as_video",
    "build",
    "evaluate",
    "vbench",
]

FULL_REFERENCE = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "dists")
DISTRIBUTION = ("fid", "fvd")
NO_REFERENCE = ("temporal_flickering", "subject_consistency", "background_consistency",
                "aesthetic_quality", "imaging_quality", "dynamic_degree")
METRICS = FULL_REFERENCE + DISTRIBUTION + NO_REFERENCE
LOWER_IS_BETTER = frozenset({"lpips_vgg", "lpips_alex", "dists", "fid", "fvd"})

_BUILDERS = {
    "psnr": PSNR, "ssim": SSIM, "lpips_vgg": lambda device: LPIPS("vgg", device),
    "lpips_alex": lambda device: LPIPS("alex", device), "dists": DISTS, "fid": FID, "fvd": FVD,
    "subject_consistency": vbench.SubjectConsistency, "background_consistency": vbench.BackgroundConsistency,
    "aesthetic_quality": vbench.AestheticQuality, "imaging_quality": vbench.ImagingQuality,
    "dynamic_degree": vbench.DynamicDegree,
}


def _check_names(names: list[str]) -> None:
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")
    if not names:
        raise ValueError("no metrics requested")


def build(name: str, device: str | torch.device = "cpu"):
    """The metric object for ``name`` (loads its network; raises MissingWeightsError first)."""
    _check_names([name])
    if name == "temporal_flickering":
        raise ValueError("temporal_flickering needs no model: call chopgrad.metrics.vbench.temporal_flickering")
    return _BUILDERS[name](device)


def evaluate(pred: Tensor, gt: Tensor | None, metrics: list[str], device: str | torch.device = "cpu",
             fps: float | None = None) -> dict[str, dict]:
    """Evaluate ``pred`` against ``gt`` with the named metrics.

    Args:
        pred: ``[B, 3, T, H, W]`` or ``[T, 3, H, W]`` predicted videos.
        gt: ground truth of the same shape; may be None when only no-reference metrics are asked.
        metrics: names from :data:`METRICS`.
        fps: frame rate, needed by ``dynamic_degree`` (VBench samples about 8 frames per second).
    Returns:
        ``{name: {"value": float, "stand_in_weights": bool, "weights": {file: status}}}``. Per-frame
        metrics average frames within a video, then videos; VBench dimensions average videos.
    """
    _check_names(list(metrics))
    needs_gt = [name for name in metrics if name not in NO_REFERENCE]
    if needs_gt and gt is None:
        raise ValueError(f"metrics {', '.join(needs_gt)} compare with a ground truth; gt is None")
    if needs_gt:
        as_video_pair(pred, gt)  # fail on mismatched inputs before loading any network
    else:
        as_video(pred, "pred")
    if "dynamic_degree" in metrics and fps is None:
        raise ValueError("dynamic_degree needs the video frame rate: pass fps")

    results = {}
    for name in metrics:
        if name == "temporal_flickering":
            value, statuses = vbench.temporal_flickering(pred).mean().item(), {}
        else:
            metric = build(name, device)
            if name in FULL_REFERENCE:
                value = metric(pred, gt).mean(dim=1).mean().item()  # frames within a video, then videos
            elif name in DISTRIBUTION:
                value = metric(pred, gt)
            elif name == "dynamic_degree":
                value = metric(pred, fps=fps).mean().item()
            else:
                value = metric(pred).mean().item()
            statuses = dict(metric.weights)
        results[name] = {"value": float(value),
                         "stand_in_weights": any(status != "official" for status in statuses.values()),
                         "weights": statuses}
    return results

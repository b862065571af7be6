"""Full-reference frame metrics: PSNR, SSIM, LPIPS and DISTS, frame by frame over videos.

Conventions follow DOVE's evaluation script (``eval_metrics.py`` in zhengchen1999/DOVE), which the
paper's Table 1 uses, on pyiqa's defaults:

* PSNR: ``pyiqa.create_metric("psnr")``, on RGB in [0, 1], ``data_range=1``, no border crop.
* SSIM: ``pyiqa.create_metric("ssim")``, on the Y channel (Y of YIQ: 0.299 R + 0.587 G + 0.114 B,
  scaled to 0..255 and rounded as MATLAB does), 11x11 Gaussian window with sigma 1.5, no
  downsampling, no border crop, float64.
* LPIPS: the ``lpips`` package, v0.1, ``net="vgg"`` or ``"alex"`` on ImageNet torchvision backbones
  (``pnet_rand=False``), inputs mapped to [-1, 1] by lpips itself (``normalize=True``).
* DISTS: ``pyiqa.create_metric("dists")`` (Ding et al. 2020 on a torchvision VGG16).

Each metric scores every frame; a video's score is the mean over its frames and a data set's the
mean over videos (DOVE averages the same way). Inputs follow :mod:`chopgrad.metrics._video`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from chopgrad import weights
from chopgrad.metrics._video import as_video_pair, frames_of

__all__ = ["DISTS", "LPIPS", "MIN_SIZE", "PSNR", "SSIM", "FrameMetric"]

# Smallest frame side each metric takes (measured): SSIM's 11x11 window; AlexNet's stride-4 conv and
# three 3x3/2 max-pools leave nothing below 31 pixels; VGG16's four 2x2 pools below 16.
MIN_SIZE = {"ssim": 11, "lpips_alex": 31, "lpips_vgg": 16}


class FrameMetric(ABC):
    """A full-reference metric scored per frame; subclasses say how to score a batch of frames."""

    name: str = ""
    lower_is_better: bool = False
    frames_per_batch: int = 16  # frames scored at once (memory on CPU)

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.weights: dict[str, str] = {}  # weight file -> status (chopgrad.weights.file_status)

    @property
    def stand_in_weights(self) -> bool:
        """True if any weight file is not verified as the official one."""
        return any(status != "official" for status in self.weights.values())

    @abstractmethod
    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        """Scores of ``N`` frame pairs ``[N, 3, H, W]`` in [0, 1] on ``self.device``: ``[N]`` or ``[N, 1, ...]``."""

    @torch.no_grad()
    def __call__(self, pred: Tensor, gt: Tensor) -> Tensor:
        """Score every frame.

        Args:
            pred: ``[B, 3, T, H, W]`` or ``[T, 3, H, W]`` prediction.
            gt: ground truth of the same shape.
        Returns:
            ``[B, T]`` float64 per-frame scores.
        """
        pred, gt = as_video_pair(pred, gt)
        b, _, t, h, w = pred.shape
        if min(h, w) < MIN_SIZE.get(self.name, 1):
            raise ValueError(f"{self.name} needs frames of at least {MIN_SIZE[self.name]}x{MIN_SIZE[self.name]} "
                             f"pixels, got {h}x{w}")
        pred_frames, gt_frames = frames_of(pred), frames_of(gt)  # [B * T, 3, H, W]
        scores = [
            self._score(pred_frames[i : i + self.frames_per_batch].to(self.device),
                        gt_frames[i : i + self.frames_per_batch].to(self.device)).reshape(-1).double().cpu()
            for i in range(0, b * t, self.frames_per_batch)
        ]
        return torch.cat(scores).reshape(b, t)


def _pyiqa_metric(name: str, device: torch.device, **options):
    import pyiqa  # lazily: pyiqa imports yaml, pandas and more

    return pyiqa.create_metric(name, device=device, as_loss=False, **options)


class PSNR(FrameMetric):
    """PSNR in dB on RGB in [0, 1] (pyiqa ``psnr`` defaults; identical frames give 80 dB)."""

    name = "psnr"

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__(device)
        self._metric = _pyiqa_metric("psnr", self.device)

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._metric(pred, gt)


class SSIM(FrameMetric):
    """SSIM on the Y channel (pyiqa ``ssim`` defaults, see the module docstring)."""

    name = "ssim"

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__(device)
        self._metric = _pyiqa_metric("ssim", self.device)

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._metric(pred, gt)


class LPIPS(FrameMetric):
    """LPIPS v0.1 from the ``lpips`` package, on a VGG16 or AlexNet ImageNet backbone.

    The backbone comes from torchvision's ``$TORCH_HOME/hub/checkpoints`` and the linear layers
    ship with lpips; both are checked before ``lpips.LPIPS`` gets a chance to download anything.
    """

    lower_is_better = True

    def __init__(self, net: str = "vgg", device: str | torch.device = "cpu"):
        super().__init__(device)
        if net not in ("vgg", "alex"):
            raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
        self.name = f"lpips_{net}"
        self.weights = weights.require_metric(self.name)
        import lpips  # lazily, and only once the weights are known to be there

        self._model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=False, verbose=False)
        self._model.eval().to(self.device)

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._model(pred, gt, normalize=True)  # normalize: [0, 1] -> [-1, 1] inside lpips


class DISTS(FrameMetric):
    """DISTS through pyiqa (VGG16 backbone from torchvision, alpha/beta from pyiqa's weight file)."""

    name = "dists"
    lower_is_better = True

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__(device)
        self.weights = weights.require_metric(self.name)
        # An explicit path: pyiqa would otherwise look in the cache folder it fixed at import time.
        self._metric = _pyiqa_metric("dists", self.device,
                                     pretrained_model_path=str(weights.weight_path("dists")))

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._metric(pred, gt)

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
from typing import Literal

import torch
from torch import Tensor, nn

from chopgrad import weights as weight_files
from chopgrad.metrics._video import as_video_pair, frames_of
from chopgrad.metrics.limits import MIN_SIZE

__all__ = ["DISTS", "LPIPS", "LPIPS_NETS", "PSNR", "SSIM", "FrameMetric", "load_lpips"]

LPIPS_NETS = ("vgg", "alex")


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

    with weight_files.weights_only_loads():  # pyiqa unpickles with weights_only=False (chopgrad.weights, the note)
        return pyiqa.create_metric(name, device=device, as_loss=False, **options)


def load_lpips(net: Literal["vgg", "alex"] = "vgg", weights: Literal["official", "stand_in"] = "official",
               device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, str]]:
    """LPIPS v0.1 from the ``lpips`` package on an ImageNet torchvision backbone, in eval mode, frozen.

    The one LPIPS loader: the metric (:class:`LPIPS`), the pixel loss (:mod:`chopgrad.losses`) and the
    analyses build it here. The backbone comes from torchvision's ``$TORCH_HOME/hub/checkpoints`` and
    the linear layers ship with lpips; both are checked before lpips gets a chance to download
    anything, and loaded without running code (:func:`chopgrad.weights.loading`).

    Args:
        net: the backbone.
        weights: ``official`` (the files must be present) or ``stand_in`` (a missing file is replaced
            by a RANDOM stand-in in a temporary weight home, :func:`chopgrad.weights.metric_home`;
            the statuses say so).
        device: where the model goes.
    Returns:
        ``(model, {file: status})``; ``model(pred, target, normalize=False)`` takes frames
        ``[N, 3, H, W]`` in [-1, 1] (``normalize=True``: in [0, 1]) and returns ``[N, 1, 1, 1]``.
    Raises:
        chopgrad.weights.MissingWeightsError: ``official`` and a file missing.
    """
    if net not in LPIPS_NETS:
        raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
    if weights not in ("official", "stand_in"):
        raise ValueError(f"LPIPS weights must be 'official' or 'stand_in', got {weights!r}")
    metric = f"lpips_{net}"
    with weight_files.metric_home(weights, None, [metric]), weight_files.loading_metric(metric) as statuses:
        import lpips  # lazily, and only once the weights are known to be there: it would download them

        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=False, verbose=False)
    return model.eval().requires_grad_(False).to(device), statuses


class _WeightlessPyiqa(FrameMetric):
    """A pyiqa metric of the same name that needs no weight file, with pyiqa's defaults."""

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__(device)
        self._metric = _pyiqa_metric(self.name, self.device)

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._metric(pred, gt)


class PSNR(_WeightlessPyiqa):
    """PSNR in dB on RGB in [0, 1] (pyiqa ``psnr`` defaults; identical frames give 80 dB)."""

    name = "psnr"


class SSIM(_WeightlessPyiqa):
    """SSIM on the Y channel (pyiqa ``ssim`` defaults, see the module docstring)."""

    name = "ssim"


class LPIPS(FrameMetric):
    """LPIPS v0.1 from the ``lpips`` package, on a VGG16 or AlexNet ImageNet backbone.

    Built by :func:`load_lpips`; the weight policy is the caller's (:func:`chopgrad.weights.metric_home`).
    """

    lower_is_better = True

    def __init__(self, net: str = "vgg", device: str | torch.device = "cpu"):
        super().__init__(device)
        self.name = f"lpips_{net}"
        self._model, self.weights = load_lpips(net, "official", self.device)

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._model(pred, gt, normalize=True)  # normalize: [0, 1] -> [-1, 1] inside lpips


class DISTS(FrameMetric):
    """DISTS through pyiqa (VGG16 backbone from torchvision, alpha/beta from pyiqa's weight file)."""

    name = "dists"
    lower_is_better = True

    def __init__(self, device: str | torch.device = "cpu"):
        super().__init__(device)
        with weight_files.loading_metric(self.name) as self.weights:
            # An explicit path: pyiqa would otherwise look in the cache folder it fixed at import time.
            self._metric = _pyiqa_metric("dists", self.device,
                                         pretrained_model_path=str(weight_files.weight_path("dists")))

    def _score(self, pred: Tensor, gt: Tensor) -> Tensor:
        return self._metric(pred, gt)

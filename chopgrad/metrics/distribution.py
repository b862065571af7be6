"""Distribution metrics: FID over frames and FVD over videos.

FID (Heusel et al. 2017) follows clean-fid's "clean" protocol as pyiqa implements it
(``pyiqa/archs/fid_arch.py``): every frame is quantised to 8 bits, each channel resized to 299x299
with PIL's bicubic filter in float mode, scaled by ``(x - 128) / 128`` and passed through the FID
Inception-v3 (the TF 2015-12-05 graph ported by pytorch-fid, ``pyiqa.archs.inception.InceptionV3``);
then the Fréchet distance of the 2048-d pool features, with means and unbiased covariances as in
pyiqa. pyiqa's own ``FID`` metric only reads image folders, so the resize is mirrored here for
tensors (a test checks it against pyiqa's ``ResizeDataset`` on a PNG). All frames of all videos
form one set.

Note on the Fréchet distance: pyiqa (like pytorch-fid) takes ``scipy.linalg.sqrtm`` of the
2048x2048 product of covariances, which costs 60 to 90 s on two CPU cores. :func:`frechet_distance`
computes the same quantity exactly through ``tr sqrt(S1 S2) = ||A B^T||_*`` (the nuclear norm, for
any ``S1 = A^T A``, ``S2 = B^T B``), taking ``A`` as the centred features when there are fewer
samples than dimensions and as the symmetric square root of ``S1`` otherwise; a test checks it
against pyiqa's ``frechet_distance``.

FVD (Unterthiner et al. 2018) uses cd-fvd (Ge et al., CVPR 2024, ``pip install cd-fvd``): the
I3D network of piergiaj/pytorch-i3d with the Kinetics-400 weights converted from the TF-Hub model
(``i3d_pretrained_400.pt``, as VideoGPT/TATS/StyleGAN-V-style evaluations use), frames resized to
224x224 bilinearly and scaled to [-1, 1], the 400-d logits as features, and cd-fvd's Fréchet
distance. Each video is one sample; I3D needs at least 9 frames (16 is the standard clip length).

Both need at least 2 samples per set, and with fewer samples than feature dimensions the covariances
are singular: the values are then only comparable between runs with the same sample counts.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from chopgrad import weights
from chopgrad.metrics._video import as_video, frames_of, to_uint8
from chopgrad.metrics.limits import FVD_MIN_FRAMES

__all__ = ["FID", "FVD", "clean_resize", "frechet_distance"]

_FID_SIZE = 299


def _covariance_root(feats: np.ndarray) -> np.ndarray:
    """A matrix ``A`` with ``A^T A = np.cov(feats, rowvar=False)``; ``[min(N, D), D]``."""
    n, d = feats.shape
    centred = (feats - feats.mean(axis=0)) / np.sqrt(n - 1)  # [N, D]
    if n <= d:
        return centred
    eigval, eigvec = np.linalg.eigh(centred.T @ centred)  # the [D, D] covariance
    return (eigvec * np.sqrt(np.clip(eigval, 0.0, None))) @ eigvec.T  # symmetric square root


def frechet_distance(feats1: np.ndarray, feats2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2)`` of two feature sets ``[N, D]``.

    Means and unbiased covariances as pyiqa's FID; see the module docstring for the trace term.
    """
    feats1, feats2 = np.asarray(feats1, np.float64), np.asarray(feats2, np.float64)
    root1, root2 = _covariance_root(feats1), _covariance_root(feats2)
    tr_covmean = np.linalg.svd(root1 @ root2.T, compute_uv=False).sum()
    diff = feats1.mean(axis=0) - feats2.mean(axis=0)
    return float(diff @ diff + (root1**2).sum() + (root2**2).sum() - 2 * tr_covmean)


def clean_resize(frames: Tensor, size: int = _FID_SIZE) -> Tensor:
    """clean-fid's resize, as pyiqa's ``ResizeDataset(mode="clean")`` does it for one image file.

    Args:
        frames: ``[N, 3, H, W]`` uint8.
    Returns:
        ``[N, 3, size, size]`` float32 in 0..255.
    """
    from PIL import Image

    out = []
    for frame in frames.permute(0, 2, 3, 1).numpy():  # [H, W, 3] uint8 each
        channels = []
        for c in range(3):
            img = Image.fromarray(frame[:, :, c].astype(np.float32), mode="F")
            img = img.resize((size, size), resample=Image.BICUBIC)
            channels.append(np.asarray(img).clip(0, 255).reshape(size, size, 1))
        out.append(np.concatenate(channels, axis=2).astype(np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)  # [N, 3, size, size]


class FID:
    """Fréchet Inception Distance between the frames of two sets of videos (lower is better)."""

    name = "fid"
    lower_is_better = True

    def __init__(self, device: str | torch.device = "cpu", frames_per_batch: int = 16):
        self.device = torch.device(device)
        self.frames_per_batch = frames_per_batch
        with weights.loading_metric(self.name) as self.weights:  # pyiqa unpickles with weights_only=False
            import pyiqa.utils.download_util as pyiqa_download
            from pyiqa.archs.inception import InceptionV3

            # pyiqa fixes its cache folder when first imported; point it at the folder checked above
            # so that a TORCH_HOME set later (tests, users) is the one that counts.
            pyiqa_download.DEFAULT_CACHE_DIR = str(weights.weight_path("fid_inception").parent)
            self._model = InceptionV3(output_blocks=[InceptionV3.BLOCK_INDEX_BY_DIM[2048]])
        self._model.eval().to(self.device)

    @property
    def stand_in_weights(self) -> bool:
        return any(status != "official" for status in self.weights.values())

    @torch.no_grad()
    def features(self, videos: Tensor) -> np.ndarray:
        """Inception pool features of every frame.

        Args:
            videos: ``[B, 3, T, H, W]`` or ``[T, 3, H, W]`` (see :mod:`chopgrad.metrics._video`).
        Returns:
            ``[B * T, 2048]`` float64.
        """
        frames = to_uint8(frames_of(as_video(videos)))  # [N, 3, H, W] uint8
        feats = []
        for i in range(0, frames.shape[0], self.frames_per_batch):
            batch = (clean_resize(frames[i : i + self.frames_per_batch]) - 128) / 128  # clean-fid scaling
            out = self._model(batch.to(self.device), False, False)[0]  # [n, 2048, 1, 1]
            feats.append(out.reshape(out.shape[0], -1).double().cpu().numpy())
        return np.concatenate(feats)

    @staticmethod
    def from_features(feats_pred: np.ndarray, feats_gt: np.ndarray) -> float:
        """Fréchet distance of two feature sets ``[N, D]`` (:func:`frechet_distance`)."""
        for name, feats in (("pred", feats_pred), ("gt", feats_gt)):
            if feats.ndim != 2 or feats.shape[0] < 2:
                raise ValueError(f"FID needs at least 2 {name} frames, got features of shape {feats.shape}")
        return frechet_distance(feats_pred, feats_gt)

    def __call__(self, pred: Tensor, gt: Tensor) -> float:
        """FID between all frames of ``pred`` and all frames of ``gt`` (shapes may differ)."""
        return self.from_features(self.features(pred), self.features(gt))


class FVD:
    """Fréchet Video Distance with I3D through cd-fvd (lower is better)."""

    name = "fvd"
    lower_is_better = True

    def __init__(self, device: str | torch.device = "cpu", videos_per_batch: int = 4):
        self.device = torch.device(device)
        self.videos_per_batch = videos_per_batch
        with weights.loading_metric(self.name) as self.weights:
            from cdfvd.fvd import cdfvd

            self._fvd = cdfvd(model="i3d", n_real="full", n_fake="full", device=str(self.device),
                              ckpt_path=str(weights.weight_path("i3d")))

    @property
    def stand_in_weights(self) -> bool:
        return any(status != "official" for status in self.weights.values())

    @staticmethod
    def _as_clips(videos: Tensor, name: str) -> np.ndarray:
        video = as_video(videos, name)  # [B, 3, T, H, W]
        if video.shape[2] < FVD_MIN_FRAMES:
            raise ValueError(f"FVD needs at least {FVD_MIN_FRAMES} frames per video (I3D's temporal "
                             f"pooling; 16 is standard), {name} has {video.shape[2]}")
        return to_uint8(video).permute(0, 2, 3, 4, 1).numpy()  # [B, T, H, W, 3] uint8, cd-fvd's layout

    @torch.no_grad()
    def features(self, videos: Tensor, name: str = "videos") -> np.ndarray:
        """I3D logits of every video, preprocessed by cd-fvd's ``preprocess_i3d``.

        Args:
            videos: ``[B, 3, T, H, W]`` (or one ``[T, 3, H, W]``), ``T >= FVD_MIN_FRAMES``.
        Returns:
            ``[B, 400]`` float32.
        """
        from cdfvd.third_party.i3d.utils import preprocess_i3d

        clips = self._as_clips(videos, name)
        feats = []
        for i in range(0, clips.shape[0], self.videos_per_batch):
            batch = preprocess_i3d(clips[i : i + self.videos_per_batch]).to(self.device)  # [b, 3, T, 224, 224]
            feats.append(self._fvd.model(batch).float().cpu().numpy())  # [b, 400]
        return np.concatenate(feats)

    def from_features(self, feats_pred: np.ndarray, feats_gt: np.ndarray) -> float:
        """Fréchet distance of two I3D feature sets ``[N, 400]`` (cd-fvd's statistics and distance)."""
        from cdfvd.utils.metric_utils import FeatureStats

        stats = {}
        for name, feats in (("pred", feats_pred), ("gt", feats_gt)):
            if feats.ndim != 2 or feats.shape[0] < 2:
                raise ValueError(f"FVD needs at least 2 {name} videos, got features of shape {feats.shape}")
            stats[name] = FeatureStats(capture_mean_cov=True)
            stats[name].append(feats)
        return float(self._fvd.compute_fvd_from_stats(fake_stats=stats["pred"], real_stats=stats["gt"]))

    def __call__(self, pred: Tensor, gt: Tensor) -> float:
        """FVD between the videos of ``pred`` and of ``gt``, each ``[B, 3, T, H, W]`` with ``B >= 2``."""
        return self.from_features(self.features(pred, "pred"), self.features(gt, "gt"))

"""VBench quality dimensions and the VBench quality score, without the vbench package.

Follows VBench (Huang et al., CVPR 2024; github.com/Vchitect/VBench, ``vbench/*.py`` and
``scripts/constant.py``) dimension by dimension, on maintained model implementations:

=========================  ===========================================  ==============================
dimension                  VBench's definition                          model here
=========================  ===========================================  ==============================
temporal_flickering        1 - mean |frame_t+1 - frame_t| / 255         none
subject_consistency        mean over t>0 of (max(0, cos(f_t, f_t-1)) +  DINO ViT-B/16 through timm
                           max(0, cos(f_t, f_0))) / 2 on DINO features   (``dino_vitbase16_pretrain``)
background_consistency     the same on CLIP ViT-B/32 image features      OpenAI CLIP via open_clip
aesthetic_quality          mean LAION linear head(CLIP ViT-L/14) / 10    OpenAI CLIP via open_clip +
                                                                         ``nn.Linear(768, 1)``
imaging_quality            mean MUSIQ(SPAQ) / 100, frames longer side    pyiqa ``MUSIQ``
                           resized to 512 when larger
dynamic_degree             share of videos whose top-5% RAFT flow        torchvision ``raft_large``
                           magnitude exceeds 6 * min(H, W) / 256 on      (C+T weights ported from the
                           enough frame pairs (frames sampled ~8 fps)    RAFT paper, 20 updates)
motion_smoothness          1 - mean |odd frame - AMT-S interpolation     caller-supplied interpolator
                           of its even neighbours| / 255                 (see below)
=========================  ===========================================  ==============================

Departures, each forced by a missing maintained implementation:

* AMT (motion smoothness) exists in no maintained package. :func:`motion_smoothness` implements
  VBench's protocol around any frame interpolator the caller passes; without AMT-S weights and code
  the dimension, and so the quality score, cannot be reproduced with chopgrad alone.
* DINO: VBench loads ``dino_vitb16`` through torch.hub code from facebookresearch/dino; timm's
  ``VisionTransformer`` has the same layers and parameter names and loads the same checkpoint. For
  non-square frames its position-embedding resampling (``dynamic_img_size``) may differ slightly
  from DINO's own bicubic interpolation; for square 224x224 inputs the two are the same network.
* CLIP: VBench uses the ``clip`` package; its PyPI copy (openai-clip 1.0.1) no longer imports with
  current setuptools, so the same OpenAI checkpoint files are loaded with ``open_clip``'s
  ``load_openai_model``.

Videos follow :mod:`chopgrad.metrics._video`. VBench reads 8-bit video files, so float frames are
first rounded to 8 bits, as writing them to a video would. Every dimension returns one score per
video ``[B]``; VBench's dimension score is their mean (frame-weighted for the consistencies, which is
the same for equal-length videos).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from chopgrad import weights
from chopgrad.metrics._video import as_video, to_uint8
from chopgrad.metrics.limits import MIN_SIZE

__all__ = [
    "DIM_WEIGHT",
    "NORMALIZE",
    "QUALITY_DIMENSIONS",
    "RAFT_MIN_SIZE",
    "AestheticQuality",
    "BackgroundConsistency",
    "DynamicDegree",
    "ImagingQuality",
    "SubjectConsistency",
    "consistency_from_features",
    "dynamic_degree_from_flows",
    "motion_smoothness",
    "quality_score",
    "temporal_flickering",
]

# VBench scripts/constant.py: QUALITY_LIST, NORMALIZE_DIC (min, max) and DIM_WEIGHT.
QUALITY_DIMENSIONS = ("subject_consistency", "background_consistency", "temporal_flickering",
                      "motion_smoothness", "aesthetic_quality", "imaging_quality", "dynamic_degree")
NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0), "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0),
}
DIM_WEIGHT = {name: 1.0 for name in QUALITY_DIMENSIONS} | {"dynamic_degree": 0.5}

RAFT_MIN_SIZE = MIN_SIZE["dynamic_degree"]  # torchvision RAFT (chopgrad.metrics.limits)
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def quality_score(dimensions: dict[str, float]) -> float:
    """VBench's quality score: the DIM_WEIGHT-weighted mean of the min-max normalised dimensions."""
    missing = [name for name in QUALITY_DIMENSIONS if name not in dimensions]
    if missing:
        raise ValueError(f"the VBench quality score needs all seven quality dimensions; missing {missing}")
    total = sum((dimensions[n] - NORMALIZE[n][0]) / (NORMALIZE[n][1] - NORMALIZE[n][0]) * DIM_WEIGHT[n]
                for n in QUALITY_DIMENSIONS)
    return total / sum(DIM_WEIGHT.values())


def _frames_255(videos: Tensor, min_frames: int = 1) -> Tensor:
    """``[B, T, 3, H, W]`` float32 holding 8-bit values 0..255 (VBench's ``load_video`` output)."""
    video = to_uint8(as_video(videos))  # [B, 3, T, H, W] uint8
    if video.shape[2] < min_frames:
        raise ValueError(f"this VBench dimension needs at least {min_frames} frames, got {video.shape[2]}")
    return video.permute(0, 2, 1, 3, 4).float()  # [B, T, 3, H, W]


def temporal_flickering(videos: Tensor) -> Tensor:
    """Per-video temporal flickering ``[B]``: ``(255 - mean |x_t+1 - x_t|) / 255`` on 8-bit frames."""
    frames = _frames_255(videos, min_frames=2)  # [B, T, 3, H, W]
    mae = (frames[:, 1:] - frames[:, :-1]).abs().mean(dim=(2, 3, 4))  # [B, T - 1], one MAE per pair
    return ((255.0 - mae.double().mean(dim=1)) / 255.0).float()


def consistency_from_features(features: Tensor) -> Tensor:
    """VBench's subject/background consistency of one video from per-frame features ``[T, D]``.

    Returns the mean over frames ``t > 0`` of ``(max(0, cos(f_t, f_t-1)) + max(0, cos(f_t, f_0))) / 2``.
    """
    if features.shape[0] < 2:
        raise ValueError(f"consistency needs at least 2 frames, got {features.shape[0]}")
    feats = F.normalize(features.double(), dim=-1)
    sim_prev = (feats[1:] * feats[:-1]).sum(-1).clamp(min=0)  # [T - 1]
    sim_first = (feats[1:] * feats[:1]).sum(-1).clamp(min=0)  # [T - 1]
    return ((sim_prev + sim_first) / 2).mean()


def motion_smoothness(videos: Tensor, interpolate: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """VBench's motion smoothness ``[B]`` around a frame interpolator (VBench uses AMT-S).

    The even frames are interpolated pairwise at t = 1/2; each prediction is compared with the real
    odd frame between them: ``(255 - mean |odd - interpolated|) / 255`` on 8-bit frames.

    Args:
        videos: ``[B, 3, T, H, W]`` or ``[T, 3, H, W]``, ``T >= 3``.
        interpolate: ``(frame0, frame1) -> middle`` on ``[1, 3, H, W]`` floats in [0, 1].
    """
    frames = _frames_255(videos, min_frames=3)  # [B, T, 3, H, W]
    scores = []
    for video in frames:
        even, odd = video[0::2], video[1::2]
        diffs = []
        for i in range(even.shape[0] - 1):
            middle = interpolate(even[i : i + 1] / 255.0, even[i + 1 : i + 2] / 255.0)  # [1, 3, H, W]
            middle = (middle.detach().float().clamp(0, 1) * 255.0).round()  # tensor2img: back to 8 bits
            diffs.append((odd[i] - middle[0]).abs().mean())
        scores.append((255.0 - torch.stack(diffs).mean()) / 255.0)
    return torch.stack(scores)


def _status_any(statuses: dict[str, str]) -> bool:
    return any(status != "official" for status in statuses.values())


class _VBenchModel:
    name = ""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        with weights.loading_metric(self.name) as self.weights:  # no weight file runs code (chopgrad.weights)
            self._build()

    def _build(self) -> None:
        """Load the networks (their files are present; every torch.load is weights-only here)."""
        raise NotImplementedError

    @property
    def stand_in_weights(self) -> bool:
        return _status_any(self.weights)


def _clip_transform(frames: Tensor) -> Tensor:
    """VBench ``clip_transform(224)`` on ``[T, 3, H, W]`` 0..255 floats."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    frames = TF.resize(frames, 224, interpolation=InterpolationMode.BICUBIC, antialias=False)
    frames = TF.center_crop(frames, 224)
    return TF.normalize(frames / 255.0, _CLIP_MEAN, _CLIP_STD)


def _load_openai_clip(name: str, device: torch.device):
    import open_clip

    path = weights.weight_path(name)
    if weights.file_status(name) == "official":  # the full published SHA-256: OpenAI's TorchScript archive
        return open_clip.load_openai_model(str(path), precision="fp32", device=device).eval()
    # Anything else never reaches torch.jit.load: a TorchScript archive carries code. A stand-in is a
    # state dict, built as open_clip builds the official file's.
    from open_clip.model import build_model_from_openai_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    return build_model_from_openai_state_dict(state, cast_dtype=None).to(device).float().eval()  # as precision fp32


class SubjectConsistency(_VBenchModel):
    """Subject consistency on DINO ViT-B/16 [CLS] features (timm network, DINO checkpoint)."""

    name = "subject_consistency"

    def _build(self) -> None:
        import timm

        self._model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                        dynamic_img_size=True)
        state = torch.load(weights.weight_path("dino_vitb16"), map_location="cpu", weights_only=True)
        self._model.load_state_dict(state, strict=True)
        self._model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        from torchvision.transforms import functional as TF

        scores = []
        for video in _frames_255(videos, min_frames=2):  # [T, 3, H, W], VBench dino_transform(224):
            frames = TF.resize(video, 224, antialias=False)  # shorter side to 224, bilinear, no crop
            frames = TF.normalize(frames / 255.0, _IMAGENET_MEAN, _IMAGENET_STD)
            scores.append(consistency_from_features(self._model(frames.to(self.device)).cpu()))
        return torch.stack(scores).float()


class BackgroundConsistency(_VBenchModel):
    """Background consistency on OpenAI CLIP ViT-B/32 image features."""

    name = "background_consistency"

    def _build(self) -> None:
        self._model = _load_openai_clip("clip_vit_b32", self.device)

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        scores = [consistency_from_features(self._model.encode_image(_clip_transform(v).to(self.device)).cpu())
                  for v in _frames_255(videos, min_frames=2)]
        return torch.stack(scores).float()


class AestheticQuality(_VBenchModel):
    """LAION aesthetic predictor (linear head on normalised CLIP ViT-L/14 features) / 10."""

    name = "aesthetic_quality"

    def _build(self) -> None:
        self._clip = _load_openai_clip("clip_vit_l14", self.device)
        self._head = torch.nn.Linear(768, 1)
        self._head.load_state_dict(torch.load(weights.weight_path("laion_aesthetic"), map_location="cpu",
                                              weights_only=True))
        self._head.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        scores = []
        for video in _frames_255(videos):
            feats = F.normalize(self._clip.encode_image(_clip_transform(video).to(self.device)).float(), dim=-1)
            scores.append((self._head(feats).squeeze(-1) / 10).mean().cpu())
        return torch.stack(scores)


class ImagingQuality(_VBenchModel):
    """MUSIQ trained on SPAQ (pyiqa), frames with a longer side over 512 resized to 512, score / 100."""

    name = "imaging_quality"

    def _build(self) -> None:
        from pyiqa.archs.musiq_arch import MUSIQ

        self._model = MUSIQ(pretrained_model_path=str(weights.weight_path("musiq_spaq")))
        self._model.eval().to(self.device)

    @torch.no_grad()
    def __call__(self, videos: Tensor) -> Tensor:
        from torchvision.transforms import functional as TF

        scores = []
        for video in _frames_255(videos):  # [T, 3, H, W]; VBench's "longer" preprocessing mode
            h, w = video.shape[-2:]
            if max(h, w) > 512:
                scale = 512.0 / max(h, w)
                video = TF.resize(video, [int(scale * h), int(scale * w)], antialias=False)
            frame_scores = [self._model(frame[None].to(self.device) / 255.0).reshape(()) for frame in video]
            scores.append(torch.stack(frame_scores).mean().cpu() / 100.0)
        return torch.stack(scores).float()


def dynamic_degree_from_flows(flows: list[Tensor], frame_size: tuple[int, int]) -> bool:
    """VBench's ``check_move``: is a video dynamic, given its optical flows ``[2, H', W']`` per frame pair?

    A pair's score is the mean of the top 5% flow magnitudes; the video is dynamic when at least
    ``round(4 * n_frames / 16)`` pairs score above ``6 * min(H, W) / 256``.
    """
    thres = 6.0 * (min(frame_size) / 256.0)
    count_num = round(4 * ((len(flows) + 1) / 16.0))  # Python round, as VBench
    count = 0
    for flow in flows:
        rad = flow.double().pow(2).sum(0).sqrt().flatten()  # [H' * W'] magnitudes
        cut = int(rad.numel() * 0.05)
        if rad.sort(descending=True).values[:cut].mean().item() > thres:
            count += 1
        if count >= count_num:
            return True
    return False


class DynamicDegree(_VBenchModel):
    """Dynamic degree with torchvision's RAFT-large (C+T weights), 20 flow updates."""

    name = "dynamic_degree"

    def _build(self) -> None:
        from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

        self._model = raft_large(weights=Raft_Large_Weights.C_T_V1, progress=False).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, videos: Tensor, fps: float) -> Tensor:
        """``[B]`` 1.0 for dynamic videos, 0.0 for static ones; ``fps`` sets VBench's ~8 fps sampling."""
        interval = max(1, round(fps / 8))
        scores = []
        for video in _frames_255(videos, min_frames=2):  # [T, 3, H, W]
            frames = video[::interval]
            h, w = frames.shape[-2:]
            if min(h, w) < RAFT_MIN_SIZE:
                raise ValueError(f"dynamic degree needs frames of at least {RAFT_MIN_SIZE}x{RAFT_MIN_SIZE} "
                                 f"(RAFT's correlation pyramid), got {h}x{w}")
            if frames.shape[0] < 2:
                raise ValueError(f"dynamic degree needs at least 2 frames after sampling every {interval} "
                                 f"frames (fps {fps}), got {video.shape[0]} frames")
            pad_h, pad_w = (-h) % 8, (-w) % 8  # RAFT's InputPadder, "sintel" mode
            frames = F.pad(frames, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2],
                           mode="replicate")
            frames = (frames / 127.5 - 1.0).to(self.device)  # RAFT takes [-1, 1]
            flows = [self._model(frames[i : i + 1], frames[i + 1 : i + 2], num_flow_updates=20)[-1][0].cpu()
                     for i in range(frames.shape[0] - 1)]
            scores.append(float(dynamic_degree_from_flows(flows, (h, w))))
        return torch.tensor(scores)

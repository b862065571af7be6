"""Pixel losses on decoded video, by name, and the per-frame decoding baseline (paper section 4, supplement C).

Every loss takes ``pred`` and ``target`` video ``[B, 3, T, H, W]`` in ``[-1, 1]`` (what the
decoder produces, what :func:`chopgrad.decode_loss` hands its ``loss_fn``) and returns the mean
over frames of a per-frame score, so that the step-weighted sum ``decode_loss`` computes equals
the loss of the whole video:

* ``mse``: mean squared error on [-1, 1].
* ``lpips_vgg``: LPIPS v0.1 on a VGG16 backbone (``lpips`` package; Zhang et al. 2018), the NVS and
  inpainting loss (supplement C.2, weight 100).
* ``dists``: DISTS (Ding et al. 2020) from pyiqa with ``as_loss=True``, the super-resolution loss
  with pixel MSE (DOVE's stage 2: MSE 1 + DISTS 0.1, section 4.1).
* ``gram``: a Gram-matrix (style) loss on VGG16 features, Mirage's harmonisation loss with LPIPS
  (LPIPS + 0.1 Gram, supplement B.4): for each of relu1_2, relu2_2, relu3_3 and relu4_3 the Gram
  matrix ``F F^T / (H W)`` of the features ``F [C, H*W]`` (the uncentred feature covariance), the
  squared error between prediction and target Gram matrices averaged over entries, then over the
  four layers. Neither the paper nor Mirage states its normalisation; dividing by the positions
  only (not also by ``C`` as Johnson et al. 2016 do) keeps the term within a few orders of LPIPS,
  so that Mirage's weight 0.1 is not a no-op.

The perceptual backbones need pretrained weights that no package ships; they are checked through
:mod:`chopgrad.weights` before any library gets a chance to download them (a missing file raises
:class:`chopgrad.weights.MissingWeightsError` naming where it goes). Their parameters are frozen.

:class:`PixelLoss` is a weighted sum of named losses. :class:`PerFrameDecoder` wraps a causal
decoder so that every latent step is decoded on its own, without the cache of the steps before
it: the DOVE-style baseline (section 4.1: DOVE "is forced to encode and decode each video frame
separately during loss computation").
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from chopgrad import weights as weight_files
from chopgrad.metrics import limits
from chopgrad.metrics.frames import load_lpips

__all__ = ["KNOWN_LOSSES", "MIN_SIZE", "PerFrameDecoder", "PixelLoss", "build_loss", "check_loss_weights"]

KNOWN_LOSSES = ("mse", "lpips_vgg", "dists", "gram")
MIN_SIZE = {name: limits.MIN_SIZE[name] for name in KNOWN_LOSSES}  # smallest frame side (chopgrad.metrics.limits)

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


def _frames(video: Tensor) -> Tensor:  # [B, 3, T, H, W] -> [B * T, 3, H, W]
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"pixel losses take video [B, 3, T, H, W], got {tuple(video.shape)}")
    return video.transpose(1, 2).flatten(0, 1)


def check_loss_weights(losses: Mapping[str, float] | Iterable[tuple[str, float]], what: str = "losses") -> dict:
    """Validate ``{name: weight}`` without loading anything; returns it as a dict.

    Raises:
        ValueError: an unknown name (listing the known ones), a repeated name, or a weight that is
            not a finite number >= 0.
    """
    items = list(losses.items()) if isinstance(losses, Mapping) else [tuple(item) for item in losses]
    checked: dict[str, float] = {}
    for item in items:
        if len(item) != 2:
            raise ValueError(f"{what}: expected (name, weight) pairs, got {item!r}")
        name, weight = item
        if name not in KNOWN_LOSSES:
            raise ValueError(f"{what}: unknown loss {name!r}; known losses: {', '.join(KNOWN_LOSSES)}")
        if name in checked:
            raise ValueError(f"{what}: loss {name!r} is given twice")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 <= float(weight) < float("inf"):
            raise ValueError(f"{what}: the weight of {name!r} must be a finite number >= 0, got {weight!r}")
        checked[name] = float(weight)
    return checked


def _frozen(module: nn.Module) -> nn.Module:
    return module.eval().requires_grad_(False)


class MSE(nn.Module):
    """Mean squared error over every pixel (equal to the mean over frames of per-frame MSE)."""

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return torch.mean((pred - target) ** 2)


class LPIPSLoss(nn.Module):
    """LPIPS v0.1 with a VGG16 ImageNet backbone, mean over frames; inputs in [-1, 1] as lpips expects."""

    def __init__(self):
        super().__init__()
        self.model, self.weights = load_lpips("vgg")  # the weight policy is the caller's (chopgrad.weights)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.model(_frames(pred), _frames(target), normalize=False).mean()


class DISTSLoss(nn.Module):
    """DISTS from pyiqa (``as_loss=True``), mean over frames; maps [-1, 1] to pyiqa's [0, 1]."""

    def __init__(self):
        super().__init__()
        with weight_files.loading_metric("dists") as self.weights:  # pyiqa unpickles with weights_only=False
            import pyiqa

            self.model = pyiqa.create_metric("dists", as_loss=True, device=torch.device("cpu"),
                                             pretrained_model_path=str(weight_files.weight_path("dists")))
        _frozen(self.model)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.model((_frames(pred) + 1) / 2, (_frames(target) + 1) / 2).mean()


class GramLoss(nn.Module):
    """Gram-matrix style loss on VGG16 relu1_2 / relu2_2 / relu3_3 / relu4_3 (see the module docstring)."""

    LAYERS = (3, 8, 15, 22)  # indices of those ReLUs in torchvision's vgg16().features

    def __init__(self):
        super().__init__()
        with weight_files.loading(["vgg16"], purpose="the gram loss") as self.weights:
            state = torch.load(weight_files.weight_path("vgg16"), map_location="cpu", weights_only=True)
        from torchvision.models.vgg import cfgs, make_layers

        # Only the convolutional trunk: building all of vgg16() would initialise its 120M-parameter
        # classifier for nothing.
        features = make_layers(cfgs["D"])[: self.LAYERS[-1] + 1]
        prefix = "features."
        trunk = {key[len(prefix):]: value.float() for key, value in state.items() if key.startswith(prefix)
                 and int(key.split(".")[1]) <= self.LAYERS[-1]}
        features.load_state_dict(trunk)
        self.features = _frozen(features)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1))

    def _grams(self, frames: Tensor) -> list[Tensor]:  # [N, 3, H, W] in [-1, 1] -> per layer [N, C, C]
        hidden = ((frames + 1) / 2 - self.mean) / self.std
        grams = []
        for index, layer in enumerate(self.features):
            hidden = layer(hidden)
            if index in self.LAYERS:
                features = hidden.flatten(2)  # [N, C, H*W]
                grams.append(features @ features.transpose(1, 2) / features.shape[-1])
        return grams

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        pairs = list(zip(self._grams(_frames(pred)), self._grams(_frames(target))))
        return sum(torch.mean((gram_pred - gram_target) ** 2) for gram_pred, gram_target in pairs) / len(pairs)


_BUILDERS = {"mse": MSE, "lpips_vgg": LPIPSLoss, "dists": DISTSLoss, "gram": GramLoss}


def build_loss(name: str) -> nn.Module:
    """One pixel loss by name (:data:`KNOWN_LOSSES`): ``loss(pred, target) -> scalar`` on [B, 3, T, H, W]."""
    check_loss_weights({name: 1.0}, what="build_loss")
    return _BUILDERS[name]()


class PixelLoss(nn.Module):
    """``sum_name weight * loss_name(pred, target)`` over ``{name: weight}`` (zero weights are skipped).

    Args:
        losses: ``{name: weight}`` or ``[(name, weight), ...]`` with names from :data:`KNOWN_LOSSES`.

    Attributes:
        terms: the last call's unweighted value of each loss (floats, for logging).
        weights: ``{weight file: status}`` of every pretrained file the losses loaded
            (``stand-in`` / ``unverified`` mark results that measure nothing; see :mod:`chopgrad.weights`).
    """

    def __init__(self, losses: Mapping[str, float] | Iterable[tuple[str, float]]):
        super().__init__()
        self.loss_weights = {name: w for name, w in check_loss_weights(losses).items() if w > 0}
        if not self.loss_weights:
            raise ValueError("PixelLoss needs at least one loss with a weight > 0")
        self.losses = nn.ModuleDict({name: build_loss(name) for name in self.loss_weights})
        self.weights = {f: s for loss in self.losses.values() for f, s in getattr(loss, "weights", {}).items()}
        self.terms: dict[str, float] = {}

    @property
    def min_size(self) -> int:
        """Smallest frame (or tile) side in pixels that every loss of the sum accepts."""
        return max(MIN_SIZE[name] for name in self.loss_weights)

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:  # [B, 3, T, H, W] x 2 -> scalar
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        if min(pred.shape[-2:]) < self.min_size:
            raise ValueError(f"frames of {pred.shape[-2]}x{pred.shape[-1]} pixels are too small for the losses "
                             f"{sorted(self.loss_weights)} (at least {self.min_size} per side): use larger crops "
                             "or fewer tiles")
        total = pred.new_zeros(())
        for name, loss in self.losses.items():
            value = loss(pred, target)
            self.terms[name] = float(value.detach())
            total = total + self.loss_weights[name] * value
        return total


class PerFrameDecoder:
    """A causal decoder whose every step is decoded on its own, without the cache of earlier steps.

    The first step runs as the wrapped decoder runs it. Every later step gets the cache the step
    before it returned with every tensor replaced by zeros (its structure and plain values kept:
    Wan's ``"Rep"`` markers, step counters): the decoder sees no history, exactly as at the start
    of a video, where its causal convolutions pad with zeros, yet each latent frame still decodes
    to the wrapped decoder's frame count (4 for Wan), so the output lines up with the target.
    Only the content differs from a real decode, which is the point of this baseline (DOVE
    decodes frames separately for its pixel losses, paper section 4.1).

    Use it wherever a :class:`chopgrad.CausalDecoder` is taken:
    ``chopgrad.decode_loss(PerFrameDecoder(vae), latents, target, loss_fn, d_trunc=0)`` (no cache
    carries gradient, so ``d_trunc`` changes nothing) or ``chopgrad.decode(PerFrameDecoder(vae), z)``.
    """

    def __init__(self, decoder: Any):
        from chopgrad.adapters import wrap_decoder

        self.decoder = wrap_decoder(decoder)
        for name in ("latent_channels", "out_channels", "spatial_scale", "output_range", "clamp_output"):
            setattr(self, name, getattr(self.decoder, name))

    def step_sizes(self, latent_frames: int) -> list[int]:
        return self.decoder.step_sizes(latent_frames)

    def frames_out(self, step_index: int, step_size: int) -> int:
        return self.decoder.frames_out(step_index, step_size)

    def init_cache(self, tile: Any = None) -> Any:  # a chopgrad.Tile: the wrapped decoder may need it
        return self.decoder.init_cache(tile=tile)

    def step(self, latents: Tensor, cache: Any) -> tuple[Tensor, Any]:
        frames, after = self.decoder.step(latents, cache)
        blank = tree_map(lambda leaf: torch.zeros_like(leaf) if isinstance(leaf, Tensor) else leaf, after)
        return frames, blank

    def parameters(self) -> Iterable[nn.Parameter]:
        return self.decoder.parameters()

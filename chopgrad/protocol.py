"""The decoder protocol that ChopGrad drives.

A causal video decoder decodes latent frames in *steps* (its own loop: one latent frame per
step for Wan 2.1/2.2, two for CogVideoX) and carries a *cache* of features from one step to
the next. ChopGrad needs that loop written as a pure function, ``(latent step, cache) ->
(pixel frames, cache)``, so it can decide where gradients may cross a step boundary
(paper section 3.1, equation 1).

When ChopGrad decodes in spatial tiles (``tiles=(rows, cols)`` of :func:`chopgrad.decode_loss`),
it tells the decoder which part of the frame it decodes: :meth:`CausalDecoder.init_cache` gets
the :class:`Tile`, and the decoder may keep it in the cache it hands to the steps. Most decoders
ignore it; one whose steps read more than the latents (Mirage's skip connections,
:class:`chopgrad.skip.SkipDecoder`, crop the input video to the tile) needs it.

:func:`chopgrad.wrap_decoder` returns an implementation for diffusers' ``AutoencoderKLWan``
and ``AutoencoderKLCogVideoX``. Implement :class:`CausalDecoder` to use a decoder of your own.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

__all__ = ["CausalDecoder", "Tile", "num_frames", "num_latent_frames", "step_frames"]


@dataclass(frozen=True)
class Tile:
    """The part of the frame a decode covers: latent rows and columns, halo included.

    ``latents[..., tile.rows, tile.cols]`` are the latents the steps get; their frames cover
    pixel rows ``rows.start * spatial_scale`` to ``rows.stop * spatial_scale`` (likewise columns)
    of the whole decoded frame. ChopGrad decodes each tile from its own :meth:`~CausalDecoder.init_cache`.
    """

    rows: slice  # of the whole latent frame's height h, halo included
    cols: slice  # of its width w


@runtime_checkable
class CausalDecoder(Protocol):
    """A causal video decoder written as a pure step function.

    Attributes:
        latent_channels: channels ``C`` of the latents ``[B, C, t, h, w]`` it takes.
        out_channels: channels of the frames :meth:`step` returns (3 for RGB); the target's too.
        spatial_scale: output pixels per latent pixel (8 for Wan 2.1, 16 for Wan 2.2).
        output_range: ``(low, high)`` of the pixels that its public ``decode`` returns.
        clamp_output: whether its public ``decode`` clamps to ``output_range`` (Wan does).
    """

    latent_channels: int
    out_channels: int
    spatial_scale: int
    output_range: tuple[float, float]
    clamp_output: bool

    def step_sizes(self, latent_frames: int) -> list[int]:
        """Latent frames taken by each decode step, in order; they sum to ``latent_frames``."""
        ...

    def frames_out(self, step_index: int, step_size: int) -> int:
        """Pixel frames produced by step ``step_index`` when it takes ``step_size`` latent frames."""
        ...

    def init_cache(self, tile: Tile | None = None) -> Any:
        """The cache entering the first step (any pytree of tensors, ``None`` and constants).

        Args:
            tile: the part of the frame that the coming steps decode; ``None`` (the default) for
                the whole frame. ChopGrad always passes it; a decoder whose output does not depend
                on where its latents lie in the frame ignores it.
        """
        ...

    def step(self, latents: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """Decode one step.

        Args:
            latents: ``[B, C, s, h, w]``, this step's latent frames.
            cache: the cache returned by the previous step (or :meth:`init_cache`).

        Returns:
            ``(frames [B, out_channels, S, H, W] before any output clamp, cache for the next step)``.
            Must not modify ``cache`` in place: ChopGrad feeds detached copies of it back in.
        """
        ...

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """The parameters used by :meth:`step` (those with ``requires_grad`` get gradients)."""
        ...


def step_frames(decoder: CausalDecoder, latent_frames: int) -> list[tuple[slice, slice]]:
    """For each decode step, its slice of latent frames and its slice of output frames."""
    plan, z0, x0 = [], 0, 0
    for index, size in enumerate(decoder.step_sizes(latent_frames)):
        out = decoder.frames_out(index, size)
        plan.append((slice(z0, z0 + size), slice(x0, x0 + out)))
        z0, x0 = z0 + size, x0 + out
    return plan


def num_frames(decoder: CausalDecoder, latent_frames: int) -> int:
    """Pixel frames ``T`` that ``latent_frames`` latent frames decode to."""
    if latent_frames < 1:
        raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
    return step_frames(decoder, latent_frames)[-1][1].stop


def num_latent_frames(decoder: CausalDecoder, frames: int) -> int:
    """Latent frames ``t`` that decode to exactly ``frames`` pixel frames.

    Raises:
        ValueError: if the decoder cannot produce that frame count; the message names the
            nearest counts it can produce (for Wan, ``4 k + 1``).
    """
    t, produced = 1, num_frames(decoder, 1)
    while produced < frames:
        t += 1
        produced = num_frames(decoder, t)
    if produced != frames:
        below = num_frames(decoder, t - 1) if t > 1 else None
        options = f"{below} or {produced}" if below else f"{produced}"
        raise ValueError(
            f"this decoder cannot produce {frames} frames: the nearest frame counts it decodes to "
            f"are {options}; trim or pad the video to one of them"
        )
    return t

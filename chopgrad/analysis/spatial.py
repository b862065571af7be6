"""Spatial locality of a decoder: zero the bottom of the latents and see how far up the pixels change.

Paper section 3.3, figure 7: the frame decoded from the original latents next to the frame decoded
with the latents below a boundary row set to zero; the pixels well above the boundary do not move.
This is what makes ChopGrad's spatial tiles (``tiles=(rows, cols)`` with a ``halo``) work: a tile
needs only a few latent pixels of context around it.

:func:`spatial_locality` reports the change per pixel row (the maximum over videos, channels,
frames and columns) and the *reach*: how many pixel rows above the boundary change by more than a
threshold (and by anything at all).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chopgrad.adapters import wrap_decoder
from chopgrad.engine import decode

__all__ = ["SpatialLocality", "spatial_locality"]


@dataclass(frozen=True)
class SpatialLocality:
    boundary_row: int  # first zeroed latent row
    boundary_px: int  # first pixel row decoded from a zeroed latent row
    spatial_scale: int
    threshold: float
    row_change: Tensor  # [H] max |x - x_zeroed| in each pixel row
    reach_px: int  # pixel rows above the boundary whose change exceeds the threshold
    reach_any_px: int  # pixel rows above the boundary that change at all
    frame: int  # index of the frames kept for the figure
    original: Tensor  # [3, H, W] frame `frame` of video 0, decoded from the original latents
    zeroed: Tensor  # [3, H, W] the same frame decoded with the bottom latents zeroed

    def to_dict(self) -> dict:
        return {"boundary_row": self.boundary_row, "boundary_px": self.boundary_px,
                "spatial_scale": self.spatial_scale, "threshold": self.threshold,
                "reach_px": self.reach_px, "reach_any_px": self.reach_any_px,
                "reach_latent_rows": self.reach_px / self.spatial_scale, "frame": self.frame,
                "row_change": self.row_change.tolist()}


def _reach(row_change: Tensor, boundary_px: int, threshold: float) -> int:
    above = (row_change[:boundary_px] > threshold).nonzero().flatten()
    return 0 if above.numel() == 0 else boundary_px - int(above[0])


@torch.no_grad()
def spatial_locality(
    decoder: Any,
    latents: Tensor,  # [B, C, t, h, w]
    boundary_row: int,
    threshold: float = 2 / 255,
    frame: int | None = None,
) -> SpatialLocality:
    """Decode ``latents`` and a copy whose latent rows ``boundary_row:`` are zero; compare row by row.

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder` or supported diffusers VAE.
        latents: ``[B, C, t, h, w]``.
        boundary_row: first latent row set to zero (``1 <= boundary_row < h``).
        threshold: a change larger than this counts for ``reach_px`` (default: one 8-bit level
            of the decoder's [-1, 1] range).
        frame: which output frame the figure shows (default: the middle one).
    """
    decoder = wrap_decoder(decoder)
    height = latents.shape[-2]
    if isinstance(boundary_row, bool) or not isinstance(boundary_row, int) or not 1 <= boundary_row < height:
        raise ValueError(f"boundary_row must be a latent row in [1, {height - 1}] (latents are {height} rows high), "
                         f"got {boundary_row!r}")
    if not threshold >= 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    zeroed_latents = latents.clone()
    zeroed_latents[..., boundary_row:, :] = 0
    original = decode(decoder, latents)  # [B, 3, T, H, W], with the decoder's own clamp
    zeroed = decode(decoder, zeroed_latents)
    change = (original - zeroed).abs().double()
    row_change = change.amax(dim=(0, 1, 2, 4))  # [H]
    frames = original.shape[2]
    frame = frames // 2 if frame is None else frame
    if not 0 <= frame < frames:
        raise ValueError(f"frame must be in [0, {frames - 1}], got {frame}")
    boundary_px = boundary_row * decoder.spatial_scale
    return SpatialLocality(
        boundary_row, boundary_px, decoder.spatial_scale, float(threshold), row_change.cpu(),
        _reach(row_change, boundary_px, threshold), _reach(row_change, boundary_px, 0.0), frame,
        original[0, :, frame].float().cpu(), zeroed[0, :, frame].float().cpu(),
    )

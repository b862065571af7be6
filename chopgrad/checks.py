"""Argument checks of :func:`chopgrad.decode` and :func:`chopgrad.decode_loss`.

Every input a user can plausibly get wrong is refused here, before any decoding, with an error
that names the problem and the fix (diffusers' rule: clear errors instead of silently fixing
input). What can only be seen while decoding (what ``loss_fn`` returns) is checked by the engine.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor

from chopgrad.adapters import wrap_decoder
from chopgrad.protocol import CausalDecoder, num_frames

__all__ = ["check_latents", "check_loss_fn", "check_schedule", "check_target", "check_tiles"]


def _is_int(value: Any) -> bool:
    """An integral number (numpy integers included), but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_latents(decoder: Any, latents: Any) -> CausalDecoder:
    """Return ``decoder`` wrapped; refuse latents it cannot decode (shape, dtype, values)."""
    decoder = wrap_decoder(decoder)
    if not isinstance(latents, Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor [B, C, t, h, w] (what vae.decode takes), got {shape}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if latents.numel() == 0:
        what = "batch size 0" if latents.shape[0] == 0 else "an empty dimension"
        raise ValueError(
            f"latents of shape {tuple(latents.shape)} have {what}: there is nothing to decode; "
            "skip the call for an empty batch"
        )
    if latents.shape[1] != decoder.latent_channels:
        raise ValueError(
            f"latents have {latents.shape[1]} channels but the decoder expects {decoder.latent_channels}: "
            "pass latents in the layout [B, C, t, h, w] produced by this VAE's encoder"
        )
    dtypes = {p.dtype for p in decoder.parameters() if p.is_floating_point()}
    if dtypes and latents.dtype not in dtypes and not torch.is_autocast_enabled(latents.device.type):
        names = " and ".join(sorted(str(d) for d in dtypes))
        raise TypeError(
            f"latents are {latents.dtype} but the decoder's parameters are {names}: cast the latents "
            f"(latents.to({min(dtypes, key=str)})) or the VAE (vae.to({latents.dtype}))"
        )
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or Inf values: check the model that produced them")
    return decoder


def check_tiles(latents: Tensor, tiles: Any, halo: Any) -> tuple[int, int]:
    """Return ``tiles`` as two ints; refuse more tiles than latent rows or columns, a bad halo.

    Counts need not divide the latent: the spans differ by at most one latent pixel.
    """
    if not isinstance(tiles, (tuple, list)) or len(tiles) != 2 or not all(_is_int(n) and n >= 1 for n in tiles):
        raise ValueError(f"tiles must be two positive integers (rows, cols), got {tiles!r}")
    tiles = (int(tiles[0]), int(tiles[1]))
    height, width = latents.shape[-2:]
    if tiles[0] > height or tiles[1] > width:
        raise ValueError(
            f"tiles={tiles} are too many for a {height}x{width} latent: use at most {height} rows and {width} "
            f"cols of tiles (each tile needs at least one latent pixel)"
        )
    if not _is_int(halo) or halo < 0:
        raise ValueError(f"halo must be an integer >= 0 (latent pixels around each tile), got {halo!r}")
    return tiles


def check_schedule(d_trunc: Any, release_every: Any, recompute: Any) -> tuple[int | None, int]:
    """Return ``(d_trunc, release_every)`` as Python ints (numpy integers are accepted)."""
    if d_trunc is not None and (not _is_int(d_trunc) or d_trunc < 0):
        raise ValueError(f"d_trunc must be an integer >= 0 or None (full backpropagation), got {d_trunc!r}")
    if not _is_int(release_every) or release_every < 1:
        raise ValueError(
            f"release_every must be an integer >= 1 (decode steps per block; 1 is Algorithm 1), got {release_every!r}"
        )
    if d_trunc is None and release_every != 1:
        raise ValueError(
            f"release_every={release_every} needs an integer d_trunc: with d_trunc=None the whole video is one "
            "block already; drop release_every, or pass d_trunc"
        )
    if not isinstance(recompute, bool):
        raise TypeError(f"recompute must be True or False, got {recompute!r}")
    return (None if d_trunc is None else int(d_trunc)), int(release_every)


def check_target(decoder: CausalDecoder, latents: Tensor, target: Any) -> None:
    """Refuse a target that is not the video the latents decode to: shape, dtype, range."""
    batch, _, frames, height, width = latents.shape
    scale = decoder.spatial_scale
    expected = (batch, decoder.out_channels, num_frames(decoder, frames), height * scale, width * scale)
    if not isinstance(target, Tensor) or tuple(target.shape) != expected:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target has shape {shape} but latents of shape {tuple(latents.shape)} decode to {expected} "
            "[B, out_channels, T, H, W]; use chopgrad.num_latent_frames to match clip lengths"
        )
    if target.dtype != latents.dtype:
        raise TypeError(
            f"target is {target.dtype} but the latents are {latents.dtype} (the decoded frames are too): "
            f"cast the target, target.to({latents.dtype})"
        )
    values = target.detach()  # a target may require grad (the loss's gradient reaches it)
    if not torch.isfinite(values).all():
        raise ValueError("target contains NaN or Inf values")
    low, high = decoder.output_range
    tmin, tmax = float(values.min()), float(values.max())
    if tmin < low - 1e-3 or tmax > high + 1e-3:
        raise ValueError(
            f"target values span [{tmin:.3g}, {tmax:.3g}] but the decoder outputs [{low:g}, {high:g}]: "
            "rescale the target (uint8 frames: x / 127.5 - 1)"
        )


def check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(pred, target) -> scalar, got {type(loss_fn).__name__}")

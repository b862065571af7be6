"""Adapters that present diffusers' causal video VAE decoders as :class:`~chopgrad.CausalDecoder`.

Both follow the decode loop of the diffusers source they wrap, step for step, so that
:func:`chopgrad.decode` returns what ``vae.decode(latents).sample`` returns:

- ``AutoencoderKLWan._decode`` (diffusers ``models/autoencoders/autoencoder_kl_wan.py``):
  ``post_quant_conv`` (a 1x1x1 conv, so applying it per step is the same), then one latent frame
  per ``decoder`` call with ``first_chunk`` on the first, ``unpatchify`` for Wan 2.2, and a final
  clamp to [-1, 1]. The decoder keeps its cache in a list that it mutates through an index
  counter (``feat_cache``/``feat_idx``) and marks temporal upsamplers with the string ``"Rep"``
  on the first step; the adapter hides that behind a value-in, value-out cache.
- ``AutoencoderKLCogVideoX._decode``: two latent frames per ``decoder`` call (three in the first
  when the count is odd), with a functional ``conv_cache`` dict passed in and out. GroupNorm
  statistics span a step's frames, so the grouping must not change.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from chopgrad.protocol import CausalDecoder, Tile

__all__ = ["CogVideoXDecoder", "WanDecoder", "wrap_decoder"]


class WanDecoder:
    """Wan 2.1 / 2.2 (``is_residual``, ``patch_size``) decoder as a pure step function.

    The cache is ``(first_step: bool, features: list)``, one slot per causal conv of the decoder,
    holding the last ``CACHE_T = 2`` input frames of that conv, ``"Rep"`` or ``None``.
    """

    output_range = (-1.0, 1.0)
    clamp_output = True

    def __init__(self, vae: Any) -> None:
        from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

        config = vae.config
        self.vae = vae
        self._unpatchify = unpatchify
        self._patch_size = config.patch_size
        self.latent_channels = int(config.z_dim)
        self.spatial_scale = 2 ** (len(config.dim_mult) - 1) * (config.patch_size or 1)
        self.out_channels = int(config.out_channels) // (config.patch_size or 1) ** 2  # after unpatchify
        self.temporal_scale = 2 ** sum(bool(flag) for flag in config.temperal_downsample)
        self._num_slots = vae._cached_conv_counts["decoder"]

    def step_sizes(self, latent_frames: int) -> list[int]:
        return [1] * latent_frames

    def frames_out(self, step_index: int, step_size: int) -> int:
        return 1 + self.temporal_scale * (step_size - 1) if step_index == 0 else self.temporal_scale * step_size

    def init_cache(self, tile: Tile | None = None) -> tuple[bool, list]:
        return (True, [None] * self._num_slots)  # convolutions only: where the tile lies does not matter

    def step(self, latents: Tensor, cache: tuple[bool, list]) -> tuple[Tensor, tuple[bool, list]]:
        first, features = cache
        features = list(features)  # the decoder assigns into the list: give it its own copy
        hidden = self.vae.post_quant_conv(latents)
        frames = self.vae.decoder(hidden, feat_cache=features, feat_idx=[0], first_chunk=first)
        if self._patch_size is not None:
            frames = self._unpatchify(frames, patch_size=self._patch_size)
        return frames, (False, features)

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return itertools.chain(self.vae.post_quant_conv.parameters(), self.vae.decoder.parameters())


class CogVideoXDecoder:
    """CogVideoX decoder as a pure step function; the cache is diffusers' own ``conv_cache`` dict."""

    output_range = (-1.0, 1.0)
    clamp_output = False

    def __init__(self, vae: Any) -> None:
        config = vae.config
        self.vae = vae
        self.latent_channels = int(config.latent_channels)
        self.spatial_scale = 2 ** (len(config.block_out_channels) - 1)
        self.out_channels = int(config.out_channels)
        self.temporal_scale = int(config.temporal_compression_ratio)
        self._group = int(vae.num_latent_frames_batch_size)

    def step_sizes(self, latent_frames: int) -> list[int]:
        # Same grouping as AutoencoderKLCogVideoX._decode: the remainder joins the first step.
        steps = max(latent_frames // self._group, 1)
        first = min(self._group + latent_frames % self._group, latent_frames)
        return [first] + [self._group] * (steps - 1)

    def frames_out(self, step_index: int, step_size: int) -> int:
        # CogVideoXUpsample3D keeps the first frame of an odd-length chunk and doubles the rest.
        if step_size % 2 == 1:
            return 1 + self.temporal_scale * (step_size - 1)
        return self.temporal_scale * step_size

    def init_cache(self, tile: Tile | None = None) -> None:
        return None  # convolutions only: where the tile lies does not matter

    def step(self, latents: Tensor, cache: dict | None) -> tuple[Tensor, dict]:
        if self.vae.post_quant_conv is not None:
            latents = self.vae.post_quant_conv(latents)
        return self.vae.decoder(latents, conv_cache=cache)

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        modules = [self.vae.decoder] + ([self.vae.post_quant_conv] if self.vae.post_quant_conv is not None else [])
        return itertools.chain.from_iterable(module.parameters() for module in modules)


def wrap_decoder(vae: Any) -> CausalDecoder:
    """Return ``vae``'s decoder as a :class:`~chopgrad.CausalDecoder`.

    Args:
        vae: a diffusers ``AutoencoderKLWan`` or ``AutoencoderKLCogVideoX``, or an object that
            already implements :class:`~chopgrad.CausalDecoder` (returned unchanged).

    Raises:
        TypeError: for any other object, naming the supported types and what it lacks of the
            protocol (an ``init_cache`` without a ``tile`` argument included).
    """
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    if isinstance(vae, AutoencoderKLWan):
        return WanDecoder(vae)
    if isinstance(vae, AutoencoderKLCogVideoX):
        return CogVideoXDecoder(vae)
    missing = [name for name in _MEMBERS if not hasattr(vae, name)]
    if missing:
        raise TypeError(
            f"chopgrad cannot drive a decoder of type {type(vae).__name__}: pass a diffusers "
            "AutoencoderKLWan or AutoencoderKLCogVideoX, or an object implementing chopgrad.CausalDecoder "
            f"(it lacks {', '.join(missing)})"
        )
    if not _takes_tile(vae.init_cache):
        raise TypeError(
            f"{type(vae).__name__}.init_cache takes no tile: chopgrad.CausalDecoder declares "
            "init_cache(self, tile=None), the chopgrad.Tile being decoded; add the argument (ignore it "
            "if where the tile lies does not matter)"
        )
    return vae


# What CausalDecoder declares (its attributes, then its methods), read from it so the two cannot drift.
_MEMBERS = [*CausalDecoder.__annotations__, *(n for n, v in vars(CausalDecoder).items() if callable(v) and n[0] != "_")]


def _takes_tile(init_cache: Any) -> bool:
    try:
        parameters = inspect.signature(init_cache).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return True
    return any(p.name == "tile" or p.kind is p.VAR_KEYWORD for p in parameters)

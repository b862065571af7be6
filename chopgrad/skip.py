"""Mirage's decoder skip connections for the Wan 2.1 VAE, as a ChopGrad-ready causal decoder.

Mirage (paper supplement B.4, reimplemented there on Wan 2.1) adds skip connections from the
encoder to the decoder: the input video is encoded *per frame* ("2D mode": every frame on its
own, no temporal compression) through the encoder's layers up to the one immediately preceding
its first downsample; those full-resolution features are concatenated with the decoder's
features immediately following its final upsample and fused by a 3x3 convolution. The
decoder then continues as usual (its last up block's residual blocks, norm, ``conv_out``).

:class:`SkipDecoder` implements :class:`chopgrad.CausalDecoder`, so
``chopgrad.decode_loss(skip_decoder.bind(video), latents, target, loss_fn, d_trunc)`` trains the
fusion conv and the decoder LoRA (:mod:`chopgrad.lora`) with ChopGrad gradients.

.. note:: **Zero-initialised residual fusion.** The paper computes the fused features as
   ``conv3x3(cat(decoder, skip))``. We compute ``decoder + conv3x3(cat(decoder, skip))`` with the
   conv's weight and bias initialised to zero, so that training starts *exactly* from the
   pretrained decoder (a plain conv would have to be initialised to the identity on the decoder
   channels to do that; both parameterise the same set of functions).

.. note:: **How the skip features reach each step.**
   ``decode_loss`` calls ``step(latents, cache)`` with one step's latents and nothing else, so
   the decoder object holds the current video: :meth:`SkipDecoder.bind` stores the input video
   ``[B, 3, T, H, W]``. The engine starts every tile with ``init_cache(tile=...)``
   (:class:`chopgrad.Tile`, the protocol's way of saying which part of the frame is decoded), and
   the cache this decoder hands out carries that tile and the step's position (step index, first
   output frame) next to the Wan cache, so every ChopGrad mode (truncated, full, ``recompute``'s
   reverse sweep) finds the right pixels. Each step encodes its own frames (and its tile's
   pixels, halo included) on the fly, so the full-resolution features of the whole video
   (``base_dim`` channels per pixel) never exist at once.

The skip features are constants for the gradient: the encoder is frozen in Mirage, and they
are computed under ``torch.no_grad``. :func:`mirage_phase` sets the trainable parameters of
Mirage's two training phases (reconstruction; harmonization).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from chopgrad.adapters import WanDecoder
from chopgrad.protocol import Tile

__all__ = ["SkipDecoder", "mirage_phase", "skip_features"]

FusePoint = Literal["after_upsample", "before_head"]


def _out_channels(conv: nn.Module) -> int:
    return getattr(conv, "base_layer", conv).out_channels  # peft LoRA layers wrap the conv


def _encoder_layers(vae: nn.Module) -> list[nn.Module]:
    """Encoder layers up to (not including) the first downsample: ``conv_in`` + level-0 blocks."""
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

    layers = [vae.encoder.conv_in]
    for layer in vae.encoder.down_blocks:
        if isinstance(layer, WanResample):
            return layers
        layers.append(layer)
    raise ValueError("the VAE encoder has no downsample layer: no skip-connection point")


def skip_features(vae: nn.Module, video: Tensor) -> Tensor:  # [B, C_skip, T, H, W]
    """Mirage's skip features: every frame of ``video`` encoded on its own (2D mode).

    Args:
        vae: diffusers ``AutoencoderKLWan`` (Wan 2.1 layout).
        video: ``[B, 3, T, H, W]`` in [-1, 1].

    Returns:
        ``[B, C_skip, T, H, W]``: the output of the encoder layer preceding its first downsample
        (``C_skip = base_dim * dim_mult[0]``), computed under ``torch.no_grad``.
    """
    batch, _, frames, height, width = video.shape
    hidden = video.transpose(1, 2).reshape(batch * frames, video.shape[1], 1, height, width)  # [B*T, 3, 1, H, W]
    with torch.no_grad():
        for layer in _encoder_layers(vae):
            hidden = layer(hidden)  # no cache: a lone frame is causally padded with zeros
    channels = hidden.shape[1]
    return hidden.reshape(batch, frames, channels, height, width).transpose(1, 2)  # [B, C, T, H, W]


class SkipDecoder(nn.Module):
    """Wan 2.1 decoder with Mirage's skip connections, as a :class:`chopgrad.CausalDecoder`.

    Usage::

        skip = SkipDecoder(vae)                      # holds vae (not copied) and a zero fusion conv
        skip.to(device)                              # moves the fusion conv (and the vae)
        loss = chopgrad.decode_loss(skip.bind(video), latents, target, loss_fn, d_trunc=1, tiles=(2, 2))
        frames = chopgrad.decode(skip.bind(video), latents)     # inference
        torch.save / safetensors: skip.fusion.state_dict()   # the fusion weights ("weight", "bias")

    Args:
        vae: diffusers ``AutoencoderKLWan`` with the Wan 2.1 layout (``is_residual=False``, no
            ``patch_size``), with or without decoder LoRA (:func:`chopgrad.lora.add_decoder_lora`;
            add LoRA before or after, the fusion conv is not part of the VAE).
        fuse_at: ``"after_upsample"`` (default, the paper's wording: the output of the decoder's
            final upsampler, before the last up block's residual blocks) or ``"before_head"``
            (the last up block's output, just before ``norm_out``/``conv_out``).

    The fusion conv is ``nn.Conv2d(C_dec + C_skip, C_dec, 3, padding=1)`` applied to every frame,
    zero-initialised (module note), in the VAE's dtype and device.
    """

    def __init__(self, vae: nn.Module, fuse_at: FusePoint = "after_upsample") -> None:
        super().__init__()
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanResample

        if not isinstance(vae, AutoencoderKLWan):
            raise TypeError(f"SkipDecoder wraps a diffusers AutoencoderKLWan, got {type(vae).__name__}")
        if vae.config.is_residual or vae.config.patch_size is not None:
            raise ValueError(
                "SkipDecoder supports the Wan 2.1 VAE layout (is_residual=False, patch_size=None), as in the "
                "paper's Mirage reimplementation; this VAE is a Wan 2.2 layout"
            )
        if fuse_at == "after_upsample":
            upsamplers = [m for m in vae.decoder.modules() if isinstance(m, WanResample) and m.mode.startswith("upsample")]
            if not upsamplers:
                raise ValueError("the VAE decoder has no upsampler: use fuse_at='before_head'")
            target = upsamplers[-1]
            decoder_channels = _out_channels(target.resample[1])
        elif fuse_at == "before_head":
            target = vae.decoder.up_blocks[-1]
            decoder_channels = target.out_dim
        else:
            raise ValueError(f"fuse_at must be 'after_upsample' or 'before_head', got {fuse_at!r}")
        last = _encoder_layers(vae)[-1]  # conv_in, a WanResidualBlock or a WanAttentionBlock
        skip_channels = getattr(last, "out_dim", None) or getattr(last, "dim", None) or _out_channels(last)
        reference = vae.decoder.conv_in.weight
        self.vae = vae
        self.fuse_at = fuse_at
        self.fusion = nn.Conv2d(decoder_channels + skip_channels, decoder_channels, 3, padding=1)
        self.fusion.to(device=reference.device, dtype=reference.dtype)
        nn.init.zeros_(self.fusion.weight)
        nn.init.zeros_(self.fusion.bias)
        self._fuse_target = (target,)  # a tuple: not registered as a second copy of a vae submodule
        self._wan = WanDecoder(vae)
        self.latent_channels = self._wan.latent_channels
        self.spatial_scale = self._wan.spatial_scale
        self.output_range = self._wan.output_range
        self.clamp_output = self._wan.clamp_output
        self.out_channels = self._wan.out_channels
        self._video: Tensor | None = None
        self._skip: Tensor | None = None

    # ------------------------------------------------------------------ binding the video

    def bind(self, video: Tensor) -> SkipDecoder:
        """Hold ``video`` (``[B, 3, T, H, W]`` in [-1, 1], the clip whose latents are decoded next).

        Returns ``self``. Tiles need nothing here: the engine names each one to :meth:`init_cache`.

        Raises:
            ValueError: a video that is not ``[B, 3, T, H, W]`` with ``H``, ``W`` multiples of the
                spatial scale; trainable encoder layers (their gradients would be lost: the skip
                features are computed without gradient).
        """
        if not isinstance(video, Tensor) or video.dim() != 5 or video.shape[1] != 3:
            shape = tuple(video.shape) if isinstance(video, Tensor) else type(video).__name__
            raise ValueError(f"video must be a tensor [B, 3, T, H, W] (the clip being decoded), got {shape}")
        scale = self.spatial_scale
        height, width = video.shape[-2:]
        if height % scale or width % scale:
            raise ValueError(f"video size {height}x{width} is not a multiple of the VAE's spatial scale {scale}")
        if any(p.requires_grad for layer in _encoder_layers(self.vae) for p in layer.parameters()):
            raise ValueError(
                "the encoder layers that compute the skip features require grad, but the features are computed "
                "without gradient (Mirage keeps the encoder frozen): call vae.encoder.requires_grad_(False)"
            )
        self._video = video
        return self

    # ------------------------------------------------------------------ CausalDecoder

    def step_sizes(self, latent_frames: int) -> list[int]:
        return self._wan.step_sizes(latent_frames)

    def frames_out(self, step_index: int, step_size: int) -> int:
        return self._wan.frames_out(step_index, step_size)

    def init_cache(self, tile: Tile | None = None) -> tuple[Tile | None, int, int, Any]:
        """``(tile, step index, first output frame, Wan cache)``: where each step's pixels lie."""
        if self._video is None:
            raise RuntimeError("SkipDecoder has no video: call skip_decoder.bind(video) before decoding")
        return (tile, 0, 0, self._wan.init_cache())

    def step(self, latents: Tensor, cache: tuple[Tile | None, int, int, Any]) -> tuple[Tensor, tuple[Tile | None, int, int, Any]]:
        tile, index, first_frame, wan_cache = cache
        frames = self.frames_out(index, latents.shape[2])
        rows, cols = self._pixels(tile)
        video = self._video[:, :, first_frame : first_frame + frames, rows, cols]
        expected = (latents.shape[-2] * self.spatial_scale, latents.shape[-1] * self.spatial_scale)
        if video.shape[2] != frames or tuple(video.shape[-2:]) != expected:
            raise ValueError(
                f"the bound video gives frames {first_frame}..{first_frame + frames} of size {tuple(video.shape[-2:])} "
                f"for this step, but the latents decode to {frames} frames of size {expected}: bind the clip that "
                "these latents encode"
            )
        skip = skip_features(self.vae, video.to(device=latents.device, dtype=latents.dtype))
        self._skip = skip
        handle = self._fuse_target[0].register_forward_hook(self._fuse)
        try:
            out, wan_cache = self._wan.step(latents, wan_cache)
        finally:
            handle.remove()
            self._skip = None
        return out, (tile, index + 1, first_frame + frames, wan_cache)

    def _pixels(self, tile: Tile | None) -> tuple[slice, slice]:
        """The video's pixel rows and columns under ``tile`` (all of them for the whole frame)."""
        if tile is None:
            return slice(None), slice(None)
        scale = self.spatial_scale
        return slice(tile.rows.start * scale, tile.rows.stop * scale), slice(tile.cols.start * scale, tile.cols.stop * scale)

    def _fuse(self, module: nn.Module, inputs: Any, features: Tensor) -> Tensor:
        skip = self._skip
        if skip is None or features.shape[2:] != skip.shape[2:]:
            got = None if skip is None else tuple(skip.shape)
            raise RuntimeError(f"skip features {got} do not match the decoder features {tuple(features.shape)}")
        return features + _fuse_frames(self.fusion, features, skip)


def _fuse_frames(fusion: nn.Conv2d, features: Tensor, skip: Tensor) -> Tensor:  # [B, C_dec, T, H, W]
    """``fusion(cat(features, skip))`` frame by frame (the residual added by the caller)."""
    batch, channels, frames, height, width = features.shape
    stacked = torch.cat([features, skip.to(features.dtype)], dim=1)  # [B, C_dec + C_skip, T, H, W]
    flat = stacked.transpose(1, 2).reshape(batch * frames, -1, height, width)  # [B*T, C, H, W]
    fused = fusion(flat)  # [B*T, C_dec, H, W]
    return fused.reshape(batch, frames, channels, height, width).transpose(1, 2)


def mirage_phase(
    phase: Literal["reconstruction", "harmonization"],
    skip_decoder: SkipDecoder,
    transformer: nn.Module | None = None,
    *,
    decoder_adapters: tuple[str, str] = ("reconstruction", "harmonization"),
    transformer_adapter: str = "transformer",
) -> dict[str, nn.Parameter]:
    """Set what trains in Mirage's two training phases (supplement B.4); returns the trainable parameters.

    - ``"reconstruction"``: the fusion conv and the first decoder LoRA train (the second decoder
      LoRA, if present, is inactive); the transformer is frozen entirely.
    - ``"harmonization"``: the transformer LoRA and the second decoder LoRA train; the fusion conv
      and the first decoder LoRA stay active but frozen.

    The adapters must exist already (:func:`chopgrad.lora.add_decoder_lora` twice with the names in
    ``decoder_adapters``, :func:`chopgrad.lora.add_transformer_lora` for phase 2). The returned dict
    has ``fusion.*``, ``vae.*`` and ``transformer.*`` keys, ready for the optimizer.
    """
    from chopgrad import lora

    first, second = decoder_adapters
    vae = skip_decoder.vae
    present = lora.adapter_names(vae)
    if phase == "reconstruction":
        if first not in present:
            raise ValueError(f"phase 'reconstruction' needs the decoder adapter {first!r}: add it with lora.add_decoder_lora")
        lora.set_adapters(vae, active=[first], trainable=[first])
        skip_decoder.fusion.requires_grad_(True)
        if transformer is not None:
            transformer.requires_grad_(False)
    elif phase == "harmonization":
        missing = [name for name in (first, second) if name not in present]
        if missing:
            raise ValueError(f"phase 'harmonization' needs the decoder adapters {missing}: add them with lora.add_decoder_lora")
        if transformer is None or transformer_adapter not in lora.adapter_names(transformer):
            raise ValueError(
                f"phase 'harmonization' trains a transformer LoRA named {transformer_adapter!r}: pass the transformer "
                "after lora.add_transformer_lora"
            )
        lora.set_adapters(vae, active=[first, second], trainable=[second])
        skip_decoder.fusion.requires_grad_(False)
        lora.set_adapters(transformer, active=[transformer_adapter], trainable=[transformer_adapter])
    else:
        raise ValueError(f"phase must be 'reconstruction' or 'harmonization', got {phase!r}")
    params = lora.trainable_parameters(skip_decoder)
    if transformer is not None:
        params.update({f"transformer.{k}": v for k, v in lora.trainable_parameters(transformer).items()})
    return params

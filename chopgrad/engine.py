"""ChopGrad: decode latents and backpropagate a pixel loss with truncated gradients.

Follows Algorithm 1 of the paper (supplement A): the decoder runs its own steps one after the
other; the cache entering each step is detached, and the gradient of step ``s``'s loss term is
carried back through the caches of at most ``d_trunc`` earlier steps. The graph of a step is
released as soon as no later loss term can reach it, so at most ``d_trunc + 1`` step graphs are
alive at once and peak memory does not depend on the number of frames.

.. note:: **How gradients are delivered (read once, referred to elsewhere).**
   The truncated gradient is not the gradient of any single forward graph, so
   :func:`decode_loss` computes it eagerly, step by step, with ``torch.autograd.grad`` on
   detached copies of the latents and the cache, while it decodes. It returns the loss value as
   the output of a small autograd node whose backward hands the precomputed gradients, scaled by
   the incoming gradient, to ``latents`` and to every decoder parameter that requires grad.
   ``decode_loss(...).backward()``, ``(decode_loss(...) * w + other).backward()`` and
   optimizers therefore work as usual; double backward (``create_graph=True``) does not.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from chopgrad.adapters import wrap_decoder
from chopgrad.protocol import CausalDecoder, Tile, num_frames, step_frames

__all__ = ["decode", "decode_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


# ----------------------------------------------------------------------------- tiles


@dataclass(frozen=True)
class _Placement:
    tile: Tile  # the latents decoded for this tile (interior + halo), as the decoder is told
    crop: tuple[slice, slice]  # the interior inside the decoded tile, in pixels
    out: tuple[slice, slice]  # where the interior lies in the full frame, in pixels
    weight: float  # share of the frame's pixels


def _tile_layout(height: int, width: int, tiles: tuple[int, int], halo: int, scale: int) -> list[_Placement]:
    def spans(size: int, count: int) -> list[tuple[slice, slice, slice]]:
        step = size // count
        result = []
        for index in range(count):
            start, stop = index * step, (index + 1) * step
            lo, hi = max(start - halo, 0), min(stop + halo, size)
            crop = slice((start - lo) * scale, (stop - lo) * scale)
            result.append((slice(lo, hi), crop, slice(start * scale, stop * scale)))
        return result

    weight = 1.0 / (tiles[0] * tiles[1])
    return [
        _Placement(Tile(rows[0], cols[0]), (rows[1], cols[1]), (rows[2], cols[2]), weight)
        for rows in spans(height, tiles[0])
        for cols in spans(width, tiles[1])
    ]


# ----------------------------------------------------------------------------- checks


def _check_common(decoder: Any, latents: Any, d_trunc: Any, tiles: Any, halo: Any) -> CausalDecoder:
    decoder = wrap_decoder(decoder)
    if not isinstance(latents, Tensor) or latents.dim() != 5:
        shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
        raise ValueError(f"latents must be a tensor [B, C, t, h, w] (what vae.decode takes), got {shape}")
    if not latents.is_floating_point():
        raise TypeError(f"latents must be a floating-point tensor, got {latents.dtype}")
    if latents.shape[1] != decoder.latent_channels:
        raise ValueError(
            f"latents have {latents.shape[1]} channels but the decoder expects {decoder.latent_channels}: "
            "pass latents in the layout [B, C, t, h, w] produced by this VAE's encoder"
        )
    if not torch.isfinite(latents).all():
        raise ValueError("latents contain NaN or Inf values: check the model that produced them")
    if d_trunc is not None and (
        isinstance(d_trunc, bool) or not isinstance(d_trunc, numbers.Integral) or d_trunc < 0
    ):
        raise ValueError(f"d_trunc must be an integer >= 0 or None (full backpropagation), got {d_trunc!r}")
    if (
        not isinstance(tiles, (tuple, list))
        or len(tiles) != 2
        or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) and n >= 1 for n in tiles)
    ):
        raise ValueError(f"tiles must be two positive integers (rows, cols), got {tiles!r}")
    height, width = latents.shape[-2:]
    if height % tiles[0] or width % tiles[1]:
        raise ValueError(
            f"tiles={tuple(tiles)} do not divide the latent size {height}x{width}: choose tile counts that "
            f"divide it (rows from {_divisors(height)}, cols from {_divisors(width)})"
        )
    if isinstance(halo, bool) or not isinstance(halo, numbers.Integral) or halo < 0:
        raise ValueError(f"halo must be an integer >= 0 (latent pixels around each tile), got {halo!r}")
    return decoder


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_target(decoder: CausalDecoder, latents: Tensor, target: Any) -> None:
    batch, _, frames, height, width = latents.shape
    scale = decoder.spatial_scale
    expected = (batch, decoder.out_channels, num_frames(decoder, frames), height * scale, width * scale)
    if not isinstance(target, Tensor) or tuple(target.shape) != expected:
        shape = tuple(target.shape) if isinstance(target, Tensor) else type(target).__name__
        raise ValueError(
            f"target has shape {shape} but latents of shape {tuple(latents.shape)} decode to {expected} "
            "[B, out_channels, T, H, W]; use chopgrad.num_latent_frames to match clip lengths"
        )
    if not torch.isfinite(target).all():
        raise ValueError("target contains NaN or Inf values")
    low, high = decoder.output_range
    tmin, tmax = float(target.min()), float(target.max())
    if tmin < low - 1e-3 or tmax > high + 1e-3:
        raise ValueError(
            f"target values span [{tmin:.3g}, {tmax:.3g}] but the decoder outputs [{low:g}, {high:g}]: "
            "rescale the target (uint8 frames: x / 127.5 - 1)"
        )


# ----------------------------------------------------------------------------- cache plumbing


def detach_cache(cache: Any, requires_grad: bool) -> tuple[Any, list[int], list[Tensor]]:
    """Detach every tensor in ``cache``; return it with the positions and leaves that take grad.

    The truncation point of ChopGrad: with ``requires_grad`` the floating-point tensors become
    fresh leaves, so a vector-Jacobian product of a later step's output reaches them (their
    ``positions`` in the flattened cache say which cache entry each is) and goes no further back.
    Used by the engine and by :mod:`chopgrad.analysis.locality`.
    """
    leaves, spec = tree_flatten(cache)
    positions, grad_leaves = [], []
    for index, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            leaf = leaf.detach()
            if requires_grad and leaf.is_floating_point():
                leaf.requires_grad_(True)
                positions.append(index)
                grad_leaves.append(leaf)
            leaves[index] = leaf
    return tree_unflatten(leaves, spec), positions, grad_leaves


@dataclass
class _StepGraph:
    """One decode step's graph, kept alive while later loss terms may still reach it."""

    latent_slice: slice
    latents: Tensor  # detached leaf of this step's latents
    cache_positions: list[int]  # positions (in the flattened cache) of ...
    cache_leaves: list[Tensor]  # ... the detached cache leaves entering this step
    cache_out: list[Any]  # flattened cache leaving this step (tensors carry the step's graph)


class _Accumulator:
    """Gradients w.r.t. the tile's latents and the trainable decoder parameters."""

    def __init__(self, latents: Tensor | None, params: list[Tensor]) -> None:
        self.latents = torch.zeros_like(latents) if latents is not None else None
        self.params: list[Tensor | None] = [None] * len(params)

    def add(self, latent_slice: slice, latent_grad: Tensor | None, param_grads: tuple) -> None:
        if latent_grad is not None and self.latents is not None:
            self.latents[:, :, latent_slice] += latent_grad
        for index, grad in enumerate(param_grads):
            if grad is not None:
                self.params[index] = grad if self.params[index] is None else self.params[index].add_(grad)


def _vjp(outputs: list[Tensor], grad_outputs: list[Tensor | None], inputs: list[Tensor], retain: bool):
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs or not inputs:
        return [None] * len(inputs)
    outs, grads = zip(*pairs)
    return torch.autograd.grad(outs, inputs, grads, retain_graph=retain, allow_unused=True)


# ----------------------------------------------------------------------------- the three modes


def _step_loss(loss_fn: LossFn, frames: Tensor, target: Tensor, place: _Placement, share: float) -> Tensor:
    value = loss_fn(frames[..., place.crop[0], place.crop[1]], target[..., place.out[0], place.out[1]])
    if not isinstance(value, Tensor) or value.numel() != 1:
        raise ValueError("loss_fn(pred, target) must return a scalar tensor (reduce it, e.g. with .mean())")
    return value.reshape(()) * (share * place.weight)


def _truncated(decoder, latents, target, loss_fn, plan, place, d_trunc, params, acc) -> Tensor:
    """Algorithm 1: each step's loss term is backpropagated through at most ``d_trunc`` earlier steps."""
    want_latents = acc.latents is not None
    total_frames = plan[-1][1].stop
    window: list[_StepGraph] = []
    cache, total = decoder.init_cache(tile=place.tile), latents.new_zeros(())
    for latent_slice, frame_slice in plan:
        step_latents = latents[:, :, latent_slice].detach().requires_grad_(want_latents)
        cache_in, positions, leaves = detach_cache(cache, requires_grad=d_trunc > 0)
        frames, cache = decoder.step(step_latents, cache_in)
        share = (frame_slice.stop - frame_slice.start) / total_frames
        loss = _step_loss(loss_fn, frames, target[:, :, frame_slice], place, share)
        total = total + loss.detach()
        window.append(_StepGraph(latent_slice, step_latents, positions, leaves, tree_flatten(cache)[0]))
        del frames
        # Backpropagate this step's term through the window, newest step first.
        outputs, grad_outputs = [loss], [None]
        for back in range(len(window)):
            graph = window[-1 - back]
            last = back == d_trunc or back == len(window) - 1
            wanted = [graph.latents] * want_latents + ([] if last else graph.cache_leaves) + params
            grads = _vjp(outputs, grad_outputs, wanted, retain=back < d_trunc)
            acc.add(graph.latent_slice, grads[0] if want_latents else None, grads[len(wanted) - len(params):])
            if last:
                break
            cache_grads = grads[want_latents : want_latents + len(graph.cache_leaves)]
            previous = window[-2 - back]
            outputs = [previous.cache_out[p] for p, g in zip(graph.cache_positions, cache_grads) if g is not None]
            grad_outputs = [g for g in cache_grads if g is not None]
            if not outputs:
                break
        if len(window) > d_trunc:
            window.pop(0)  # no later term can reach it: release its graph
    return total


def _full(decoder, latents, target, loss_fn, plan, place, params, acc) -> Tensor:
    """Plain backpropagation through the untruncated loop (memory grows with the video)."""
    want_latents = acc.latents is not None
    leaf = latents.detach().requires_grad_(want_latents)
    total_frames = plan[-1][1].stop
    cache, total = decoder.init_cache(tile=place.tile), latents.new_zeros(())
    for latent_slice, frame_slice in plan:
        frames, cache = decoder.step(leaf[:, :, latent_slice], cache)
        share = (frame_slice.stop - frame_slice.start) / total_frames
        total = total + _step_loss(loss_fn, frames, target[:, :, frame_slice], place, share)
    grads = _vjp([total], [None], [leaf] * want_latents + params, retain=False)
    acc.add(slice(None), grads[0] if want_latents else None, grads[want_latents:])
    return total.detach()


def _recompute(decoder, latents, target, loss_fn, plan, place, params, acc) -> Tensor:
    """Exact gradient holding only the per-step caches: a forward sweep, then a reverse sweep
    that recomputes each step's graph and carries the cache adjoint backwards."""
    want_latents = acc.latents is not None
    total_frames = plan[-1][1].stop
    caches, cache = [], decoder.init_cache(tile=place.tile)
    with torch.no_grad():
        for latent_slice, _ in plan:
            caches.append(cache)
            _, cache = decoder.step(latents[:, :, latent_slice], cache)
    del cache
    total, outputs_adjoint = latents.new_zeros(()), None  # adjoint of the cache leaving the step
    for index in reversed(range(len(plan))):
        (latent_slice, frame_slice), cache_entering = plan[index], caches[index]
        caches[index] = None  # recomputed below; not needed again
        step_latents = latents[:, :, latent_slice].detach().requires_grad_(want_latents)
        cache_in, positions, leaves = detach_cache(cache_entering, requires_grad=True)
        frames, cache_out = decoder.step(step_latents, cache_in)
        share = (frame_slice.stop - frame_slice.start) / total_frames
        loss = _step_loss(loss_fn, frames, target[:, :, frame_slice], place, share)
        total = total + loss.detach()
        outputs, grad_outputs = [loss], [None]
        if outputs_adjoint is not None:
            flat_out = tree_flatten(cache_out)[0]
            outputs += [flat_out[p] for p, g in outputs_adjoint if g is not None]
            grad_outputs += [g for _, g in outputs_adjoint if g is not None]
        wanted = [step_latents] * want_latents + leaves + params
        grads = _vjp(outputs, grad_outputs, wanted, retain=False)
        acc.add(latent_slice, grads[0] if want_latents else None, grads[len(wanted) - len(params):])
        outputs_adjoint = list(zip(positions, grads[want_latents : want_latents + len(leaves)]))
    return total


class _DeliverGradients(torch.autograd.Function):
    """Returns the loss value; its backward hands out precomputed gradients (see the module note)."""

    @staticmethod
    def forward(ctx, value: Tensor, grads: list, *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):
        needs = ctx.needs_input_grad[2:]
        return (None, None) + tuple(
            None if grad is None or not need else grad * grad_output.to(grad.dtype)
            for grad, need in zip(ctx.grads, needs)
        )


# ----------------------------------------------------------------------------- public API


def decode_loss(
    decoder: Any,
    latents: Tensor,  # [B, C, t, h, w]
    target: Tensor,  # [B, 3, T, H, W], in the decoder's output range
    loss_fn: LossFn,
    d_trunc: int | None = 1,
    tiles: tuple[int, int] = (1, 1),
    *,
    halo: int = 2,
    recompute: bool = False,
) -> Tensor:
    """Decode ``latents`` step by step and return the pixel loss, with ChopGrad gradients.

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder`, or a diffusers VAE that
            :func:`~chopgrad.wrap_decoder` accepts.
        latents: ``[B, C, t, h, w]``, what ``vae.decode`` takes.
        target: ``[B, 3, T, H, W]`` in the decoder's output range (``[-1, 1]``), ``T`` the frame
            count the decoder produces for ``t`` latent frames (:func:`~chopgrad.num_frames`);
            ``3`` is the decoder's ``out_channels``.
        loss_fn: ``loss_fn(pred, target) -> scalar``, applied to each step's frames
            ``[B, 3, T_s, H', W']`` (one tile's interior when ``tiles`` is not ``(1, 1)``).
        d_trunc: truncation distance ``D >= 0``: step ``s``'s loss term reaches the latents of
            steps ``s - D .. s``, i.e. the cache entering step ``s - D`` is a constant. ``0``: each
            term reaches only its own step. ``None``: full backpropagation (exact).
        tiles: ``(rows, cols)`` spatial tiles, decoded and backpropagated one at a time, each from
            ``decoder.init_cache(tile=...)`` with its :class:`~chopgrad.Tile`;
            each count must divide the latent height and width.
        halo: latent pixels of context decoded around each tile (the loss sees only the interior).
        recompute: with ``d_trunc=None``, compute the exact gradient holding only the per-step
            caches (a reverse sweep that recomputes each step), not every step's activations.

    Returns:
        A scalar: ``sum_tiles sum_s (T_s / T) * loss_fn(pred_s, target_s) / n_tiles``, which for a
        per-element-mean loss equals ``loss_fn`` over the whole video. Calling ``.backward()`` on
        it (alone or inside a larger loss) delivers the truncated gradients into ``latents`` and
        into the decoder parameters that require grad.

    .. warning::
        The loss sees the decoder's output *before* the clamp that Wan's ``vae.decode`` applies:
        a clamp would give saturated pixels zero gradient. :func:`decode` does clamp.

    .. warning::
        ``d_trunc`` counts decoder *steps*: one latent frame (4 pixel frames) for Wan, two latent
        frames for CogVideoX.
    """
    decoder = _check_common(decoder, latents, d_trunc, tiles, halo)
    _check_target(decoder, latents, target)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(pred, target) -> scalar, got {type(loss_fn).__name__}")
    if recompute and d_trunc is not None:
        raise ValueError("recompute=True computes the exact gradient: use it with d_trunc=None")

    params = [p for p in decoder.parameters() if p.requires_grad]
    grad_needed = torch.is_grad_enabled() and (latents.requires_grad or bool(params))
    plan = step_frames(decoder, latents.shape[2])
    layout = _tile_layout(latents.shape[-2], latents.shape[-1], tuple(tiles), halo, decoder.spatial_scale)
    if not grad_needed:
        with torch.no_grad():
            return sum(_forward_loss(decoder, latents, target, loss_fn, plan, place) for place in layout)

    latent_grad = torch.zeros_like(latents) if latents.requires_grad else None
    param_grads: list[Tensor | None] = [None] * len(params)
    total = latents.new_zeros((), dtype=torch.float64)
    for place in layout:
        tile_latents = latents.detach()[..., place.tile.rows, place.tile.cols]
        acc = _Accumulator(tile_latents if latent_grad is not None else None, params)
        if d_trunc is None:
            run = _recompute if recompute else _full
            value = run(decoder, tile_latents, target, loss_fn, plan, place, params, acc)
        else:
            value = _truncated(decoder, tile_latents, target, loss_fn, plan, place, d_trunc, params, acc)
        total += value.double()
        if latent_grad is not None:
            latent_grad[..., place.tile.rows, place.tile.cols] += acc.latents
        for index, grad in enumerate(acc.params):
            if grad is not None:
                param_grads[index] = grad if param_grads[index] is None else param_grads[index] + grad
    grads = [latent_grad] + param_grads
    return _DeliverGradients.apply(total.to(latents.dtype), grads, latents, *params)


def _forward_loss(decoder, latents, target, loss_fn, plan, place) -> Tensor:
    total_frames = plan[-1][1].stop
    cache, total = decoder.init_cache(tile=place.tile), latents.new_zeros(())
    tile_latents = latents[..., place.tile.rows, place.tile.cols]
    for latent_slice, frame_slice in plan:
        frames, cache = decoder.step(tile_latents[:, :, latent_slice], cache)
        share = (frame_slice.stop - frame_slice.start) / total_frames
        total = total + _step_loss(loss_fn, frames, target[:, :, frame_slice], place, share)
    return total


def decode(
    decoder: Any,
    latents: Tensor,  # [B, C, t, h, w]
    tiles: tuple[int, int] = (1, 1),
    *,
    halo: int = 2,
    clamp: bool | None = None,
) -> Tensor:  # [B, 3, T, H, W]
    """Decode ``latents`` with the decoder's own steps.

    With ``tiles=(1, 1)`` this returns the same tensor as diffusers' ``vae.decode(latents).sample``
    (Wan's clamp to [-1, 1] included; pass ``clamp=False`` for the raw output). Gradients flow
    by plain autograd (use :func:`decode_loss` for ChopGrad gradients).

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder` or a supported diffusers VAE.
        latents: ``[B, C, t, h, w]``.
        tiles: spatial tiles decoded separately, each with ``halo`` latent pixels of context.
        clamp: clamp to the output range; defaults to what the decoder's ``decode`` does.
    """
    decoder = _check_common(decoder, latents, None, tiles, halo)
    plan = step_frames(decoder, latents.shape[2])
    scale = decoder.spatial_scale
    rows = []
    layout = _tile_layout(latents.shape[-2], latents.shape[-1], tuple(tiles), halo, scale)
    for place in layout:
        cache, pieces = decoder.init_cache(tile=place.tile), []
        tile_latents = latents[..., place.tile.rows, place.tile.cols]
        for latent_slice, _ in plan:
            frames, cache = decoder.step(tile_latents[:, :, latent_slice], cache)
            pieces.append(frames[..., place.crop[0], place.crop[1]])
        rows.append(torch.cat(pieces, dim=2))
    cols = tiles[1]
    out = torch.cat([torch.cat(rows[r * cols : (r + 1) * cols], dim=-1) for r in range(tiles[0])], dim=-2)
    if decoder.clamp_output if clamp is None else clamp:
        out = out.clamp(*decoder.output_range)
    return out

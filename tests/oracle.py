"""Brute-force references for ChopGrad gradients, written without the engine.

``truncated_oracle`` is the definition in the issues, computed the slow and obvious way: for each
step ``s``, decode from scratch with the cache entering step ``s - D - k`` detached, backpropagate
only step ``s``'s loss term, and sum over ``s``. ``k = s % release_every`` is the step's position
in its block (supplement D: a block's terms share one truncation point); ``k = 0`` always for
Algorithm 1. With ``tiles``, each tile (its latents widened by ``halo``, clipped to the frame) is
decoded on its own and its term is the loss on its interior, weighted by its share of the frame's
pixels. Tile counts need not divide the latent: spans of ``size // count`` or one more pixel.
``params`` are any leaves: the decoder's parameters, and those of the loss (a discriminator,
learnable weights, a target that requires grad), whose gradient is plain autograd's per term.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from chopgrad.protocol import Tile, step_frames


def _detach(cache):
    return tree_map(lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, cache)


def _tiles(height, width, tiles, halo):
    """(tile with halo, interior rows and cols relative to it, interior rows and cols in the frame), latent units."""
    rows, cols = tiles
    for r in range(rows):
        top, bottom = r * height // rows, (r + 1) * height // rows
        for c in range(cols):
            left, right = c * width // cols, (c + 1) * width // cols
            tile = Tile(slice(max(top - halo, 0), min(bottom + halo, height)), slice(max(left - halo, 0), min(right + halo, width)))
            inner = (slice(top - tile.rows.start, bottom - tile.rows.start), slice(left - tile.cols.start, right - tile.cols.start))
            yield tile, inner, (slice(top, bottom), slice(left, right))


def _scaled(span, scale):
    return slice(span.start * scale, span.stop * scale)


def truncated_oracle(decoder, latents, target, loss_fn, d_trunc, params=(), release_every=1, tiles=(1, 1), halo=2):
    """Return (loss value, grad wrt latents, grads wrt params) by brute force."""
    plan = step_frames(decoder, latents.shape[2])
    total_frames, scale = plan[-1][1].stop, decoder.spatial_scale
    grad = torch.zeros_like(latents)
    param_grads = [torch.zeros_like(p) for p in params]
    value = 0.0
    for tile, inner, frame in _tiles(latents.shape[-2], latents.shape[-1], tiles, halo):
        for s, (_, frames_s) in enumerate(plan):
            z = latents.detach().clone().requires_grad_(True)
            # No tile for the whole frame (a decoder may be told None), as vae.decode does.
            cache = decoder.init_cache() if tiles == (1, 1) else decoder.init_cache(tile=tile)
            cut = None if d_trunc is None else s - d_trunc - s % release_every
            for j, (latent_slice, _) in enumerate(plan[: s + 1]):
                if j == cut:
                    cache = _detach(cache)
                frames, cache = decoder.step(z[:, :, latent_slice, tile.rows, tile.cols], cache)
            pred = frames[..., _scaled(inner[0], scale), _scaled(inner[1], scale)]
            want = target[:, :, frames_s, _scaled(frame[0], scale), _scaled(frame[1], scale)]
            share = (frames_s.stop - frames_s.start) / total_frames
            weight = (frame[0].stop - frame[0].start) * (frame[1].stop - frame[1].start) / (latents.shape[-2] * latents.shape[-1])
            term = share * weight * loss_fn(pred, want)
            value += float(term.detach())
            # Retained: a non-leaf the loss shares between terms (a weight computed once) is crossed again.
            grads = torch.autograd.grad(term, [z, *params], retain_graph=True, allow_unused=True)
            grad += grads[0]
            for acc, g in zip(param_grads, grads[1:]):
                if g is not None:
                    acc += g
    return value, grad, param_grads

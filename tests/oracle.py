"""Brute-force references for ChopGrad gradients, written without the engine.

``truncated_oracle`` is the definition in the issue, computed the slow and obvious way: for each
step ``s``, decode from scratch with the cache entering step ``s - D`` detached, backpropagate only
step ``s``'s loss term, and sum over ``s``.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from chopgrad.protocol import step_frames


def _detach(cache):
    return tree_map(lambda leaf: leaf.detach() if isinstance(leaf, torch.Tensor) else leaf, cache)


def truncated_oracle(decoder, latents, target, loss_fn, d_trunc, params=()):
    """Return (loss value, grad wrt latents, grads wrt params) by brute force."""
    plan = step_frames(decoder, latents.shape[2])
    total_frames = plan[-1][1].stop
    grad = torch.zeros_like(latents)
    param_grads = [torch.zeros_like(p) for p in params]
    value = 0.0
    for s, (_, frames_s) in enumerate(plan):
        z = latents.detach().clone().requires_grad_(True)
        cache = decoder.init_cache()  # no tile: the oracle decodes the whole frame
        for j, (latent_slice, _) in enumerate(plan[: s + 1]):
            if d_trunc is not None and j == s - d_trunc:
                cache = _detach(cache)
            frames, cache = decoder.step(z[:, :, latent_slice], cache)
        share = (frames_s.stop - frames_s.start) / total_frames
        term = share * loss_fn(frames, target[:, :, frames_s])
        value += float(term)
        grads = torch.autograd.grad(term, [z, *params], allow_unused=True)
        grad += grads[0]
        for acc, g in zip(param_grads, grads[1:]):
            if g is not None:
                acc += g
    return value, grad, param_grads

"""How far ChopGrad's truncated gradients are from the exact ones (paper section 3.3, figures 4 and 5).

* :func:`decoder_gradient_error` (figure 5): the gradient of a pixel loss with respect to each
  decoder input latent step, truncated at ``d_trunc`` (:func:`chopgrad.decode_loss`) against the
  exact one (``d_trunc=None``): absolute and relative Frobenius errors per latent step, and for the
  whole latent tensor.
* :func:`parameter_gradient_agreement` (figure 4): a backbone produces the latents; its parameter
  gradient, averaged over clips, for each ``d_trunc`` against the exact one: normalized mean
  absolute error and cosine similarity of the flattened gradients. A cosine near 1 with a large
  error means the truncation changes the gradient's magnitude rather than its direction.

The exact gradients come from plain backpropagation through the whole decode
(``recompute=True`` gives the same gradient holding only the per-step caches, for long videos).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from chopgrad.adapters import wrap_decoder
from chopgrad.engine import decode_loss
from chopgrad.protocol import step_frames

__all__ = ["GradientError", "ParameterAgreement", "decoder_gradient_error", "parameter_gradient_agreement"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def _check_d_truncs(d_truncs: Sequence[int]) -> list[int]:
    d_truncs = list(d_truncs)
    if not d_truncs:
        raise ValueError("d_truncs is empty: give at least one truncation distance")
    for d in d_truncs:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"every d_trunc must be an integer >= 0, got {d!r}")
    return d_truncs


def _covering(d_trunc: int | None, steps: int) -> int | None:
    """``d_trunc`` values of ``steps - 1`` or more all reach every step: one computation serves them all."""
    return None if d_trunc is None else min(d_trunc, steps - 1)


def _latent_gradient(decoder, latents: Tensor, target: Tensor, loss_fn: LossFn, d_trunc: int | None,
                     recompute: bool) -> Tensor:  # [B, C, t, h, w]
    leaf = latents.detach().requires_grad_(True)
    kwargs = {"recompute": True} if d_trunc is None and recompute else {}
    decode_loss(decoder, leaf, target, loss_fn, d_trunc=d_trunc, **kwargs).backward()
    return leaf.grad


@dataclass(frozen=True)
class GradientError:
    """Errors of the truncated latent gradients, per video, ``d_trunc`` and latent step."""

    d_truncs: list[int]
    absolute: Tensor  # [V, len(d_truncs), S] ||g_trunc_j - g_j||_F per latent step j
    relative: Tensor  # [V, len(d_truncs), S] the same over ||g_j||_F (NaN where g_j = 0)
    total_relative: Tensor  # [V, len(d_truncs)] ||g_trunc - g||_F / ||g||_F over all latents
    exact_norm: Tensor  # [V, S] ||g_j||_F

    def table(self) -> list[dict]:
        """One row per ``d_trunc``: errors averaged over videos and latent steps."""
        rows = []
        for k, d in enumerate(self.d_truncs):
            rows.append({
                "d_trunc": d,
                "abs_mean": float(self.absolute[:, k].mean()),
                "rel_mean": float(self.relative[:, k].nanmean()),
                "rel_max": float(self.relative[:, k].nan_to_num(0.0).max()),
                "total_rel": float(self.total_relative[:, k].mean()),
            })
        return rows

    def to_dict(self) -> dict:
        return {"d_truncs": self.d_truncs, "table": self.table(),
                "absolute": self.absolute.tolist(), "relative": self.relative.nan_to_num(-1.0).tolist(),
                "exact_norm": self.exact_norm.tolist()}


def decoder_gradient_error(
    decoder: Any,
    latents: Tensor,  # [V, C, t, h, w], V videos, each decoded on its own
    target: Tensor,  # [V, 3, T, H, W] in the decoder's output range
    loss_fn: LossFn,
    d_truncs: Sequence[int],
    *,
    recompute: bool = False,
    progress: bool = False,
) -> GradientError:
    """Frobenius errors between ChopGrad's latent gradients and the exact ones (figure 5).

    Each video is decoded on its own (batch 1), so absolute errors are per video. A step ``j`` is
    one decode step's latent frames, the unit of ``d_trunc``. Every ``d_trunc >= steps - 1`` reaches
    all steps; those are computed once (as ``steps - 1``). Their error is round-off, not zero: the
    truncated and the plain backward passes add the same terms in a different order.

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder` or supported diffusers VAE.
        latents: ``[V, C, t, h, w]``.
        target: ``[V, 3, T, H, W]``, what ``loss_fn`` compares the decoded frames with.
        loss_fn: ``loss_fn(pred, target) -> scalar`` on one step's frames (as for ``decode_loss``).
        d_truncs: truncation distances to compare, each an integer >= 0.
        recompute: compute the exact gradient in ChopGrad's recompute mode (less memory).
        progress: tqdm bar over the (video, d_trunc) runs.
    """
    from tqdm.auto import tqdm

    decoder = wrap_decoder(decoder)
    d_truncs = _check_d_truncs(d_truncs)
    if not isinstance(target, Tensor) or not isinstance(latents, Tensor) or target.shape[0] != latents.shape[0]:
        raise ValueError("latents [V, C, t, h, w] and target [V, 3, T, H, W] must hold the same number of videos")
    plan = step_frames(decoder, latents.shape[2])
    videos, steps = latents.shape[0], len(plan)
    absolute = torch.zeros(videos, len(d_truncs), steps, dtype=torch.float64)
    relative = torch.zeros_like(absolute)
    total = torch.zeros(videos, len(d_truncs), dtype=torch.float64)
    exact_norm = torch.zeros(videos, steps, dtype=torch.float64)
    bar = tqdm(total=videos * (len(d_truncs) + 1), desc="gradient error", unit="run", disable=not progress)
    for v in range(videos):
        z, x = latents[v : v + 1], target[v : v + 1]
        exact = _latent_gradient(decoder, z, x, loss_fn, None, recompute).double()
        bar.update()
        exact_norm[v] = torch.stack([exact[:, :, s].norm() for s, _ in plan])
        computed: dict[int, Tensor] = {}
        for k, d in enumerate(d_truncs):
            key = _covering(d, steps)
            if key not in computed:
                computed[key] = _latent_gradient(decoder, z, x, loss_fn, key, recompute).double() - exact
            diff = computed[key]
            absolute[v, k] = torch.stack([diff[:, :, s].norm() for s, _ in plan])
            relative[v, k] = absolute[v, k] / exact_norm[v]  # 0/0 -> NaN: a step with no gradient
            total[v, k] = diff.norm() / exact.norm()
            bar.update()
    bar.close()
    return GradientError(d_truncs, absolute, relative, total, exact_norm)


@dataclass(frozen=True)
class ParameterAgreement:
    """Backbone parameter gradients averaged over clips, truncated against exact (figure 4)."""

    d_truncs: list[int]
    normalized_mae: list[float]  # mean |g_d - g| / mean |g|, over all parameters flattened
    cosine: list[float]  # <g_d, g> / (|g_d| |g|)
    relative_l2: list[float]  # |g_d - g| / |g|
    clips: int
    parameters: int  # number of scalars in the flattened gradient

    def table(self) -> list[dict]:
        return [{"d_trunc": d, "normalized_mae": m, "cosine": c, "relative_l2": r}
                for d, m, c, r in zip(self.d_truncs, self.normalized_mae, self.cosine, self.relative_l2)]

    def to_dict(self) -> dict:
        return {"d_truncs": self.d_truncs, "clips": self.clips, "parameters": self.parameters, "table": self.table()}


def parameter_gradient_agreement(
    decoder: Any,
    produce: Callable[[int], Tensor],
    targets: Sequence[Tensor],
    params: Sequence[torch.nn.Parameter],
    loss_fn: LossFn,
    d_truncs: Sequence[int],
    *,
    recompute: bool = False,
    progress: bool = False,
) -> ParameterAgreement:
    """Average backbone parameter gradient for each ``d_trunc`` against the exact one (figure 4).

    For clip ``k`` the backbone runs once, ``latents = produce(k)`` (``[B, C, t, h, w]``, differentiable
    in ``params``); the latent gradient of the decoded pixel loss is computed for every ``d_trunc``
    and exactly, and each is pulled back through the same backbone graph into ``params``. The
    decoder's own parameters are not differentiated (freeze them).

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder` or supported diffusers VAE.
        produce: ``produce(k) -> latents`` for clip ``k`` (the backbone's forward pass).
        targets: ``targets[k]`` ``[B, 3, T, H, W]``, the pixels clip ``k``'s latents should decode to.
        params: the backbone parameters whose gradients are compared.
        loss_fn: the pixel loss, as for :func:`chopgrad.decode_loss`.
        d_truncs: truncation distances, integers >= 0.
    """
    from tqdm.auto import tqdm

    decoder = wrap_decoder(decoder)
    d_truncs = _check_d_truncs(d_truncs)
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("params holds no parameter that requires grad: nothing to compare")
    if not targets:
        raise ValueError("targets is empty: give at least one clip")
    sums: list[Tensor | None] = [None] * (len(d_truncs) + 1)  # flattened gradient sums; the last is exact
    for k in tqdm(range(len(targets)), desc="backbone gradients", unit="clip", disable=not progress):
        with torch.enable_grad():
            latents = produce(k)
            steps = len(step_frames(decoder, latents.shape[2]))
            computed: dict[int | None, Tensor] = {}
            for index, d in enumerate([*d_truncs, None]):
                key = _covering(d, steps)
                if key not in computed:
                    latent_grad = _latent_gradient(decoder, latents, targets[k], loss_fn, key, recompute)
                    grads = torch.autograd.grad(latents, params, latent_grad, retain_graph=True, allow_unused=True)
                    computed[key] = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                                               for g, p in zip(grads, params)])
                sums[index] = computed[key] if sums[index] is None else sums[index] + computed[key]
        del latents, computed
    exact = sums[-1] / len(targets)
    mae, cosine, rel = [], [], []
    for flat in sums[:-1]:
        mean = flat / len(targets)
        mae.append(float((mean - exact).abs().mean() / exact.abs().mean()))
        cosine.append(float(torch.nn.functional.cosine_similarity(mean, exact, dim=0)))
        rel.append(float((mean - exact).norm() / exact.norm()))
    return ParameterAgreement(d_truncs, mae, cosine, rel, len(targets), int(exact.numel()))

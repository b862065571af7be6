"""Temporal locality of a causal decoder: how strongly latent step ``j`` moves the pixels of step ``i``.

Paper section 3.2, equation (2), and section 3.3 / figure 3. The influence measure is

    L(i <- j) = || d x_i / d z_j ||_F

where ``z_j`` are the latent frames that decode step ``j`` takes and ``x_i`` the pixel frames that
step ``i`` produces (before any output clamp), for ``0 <= D = i - j <= max_distance`` (the decoder is
causal: ``L(i <- j) = 0`` for ``j > i``). ``D`` counts decoder *steps* (one latent frame for Wan,
two for CogVideoX), the unit of ``d_trunc``.

.. note:: **Estimator.** The Jacobians have ``|x_i| x |z_j|`` entries (millions at video sizes), so
   their squared Frobenius norms are estimated with Gaussian random projections (Hutchinson):
   for ``u ~ N(0, I)`` over the outputs of step ``i``, ``E ||J^T u||^2 = tr(J J^T) = ||J||_F^2``.
   One vector-Jacobian product of ``u`` gives ``J_{i,j}^T u`` for every ``j`` at once. With ``K``
   probes the mean of ``||J^T u_k||^2`` is unbiased for ``||J||_F^2`` with variance
   ``2 ||J J^T||_F^2 / K <= 2 ||J||_F^4 / K``, i.e. a relative standard deviation of at most
   ``sqrt(2 / K)`` (less when the singular values are spread out). The reported ``L`` is the square
   root of that mean (slightly biased low, by Jensen's inequality). ``exact=True`` uses the standard
   basis instead of random vectors (``|x_i|`` products per step): exact, for small models and tests.

.. note:: **Why a window is exact.** The cache entering step ``s`` depends only on latents of steps
   before ``s``. So ``d x_i / d z_j`` for ``j >= i - max_distance`` is the same whether or not
   gradients may cross the cache entering step ``i - max_distance``: the estimator runs the decoder
   step by step with that cache detached (ChopGrad with ``d_trunc = max_distance``) and holds at
   most ``max_distance + 1`` step graphs, whatever the video length.

Videos in the batch are independent (one probe per video), so ``B`` videos cost one pass.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from chopgrad.adapters import wrap_decoder
from chopgrad.engine import detach_cache
from chopgrad.protocol import step_frames

__all__ = ["Locality", "exact_locality", "temporal_locality"]


@dataclass(frozen=True)
class Locality:
    """Influence estimates ``influence[b, i, j] = L(i <- j)`` for video ``b``; NaN where not measured."""

    influence: Tensor  # [B, S, S] float64, S decode steps
    max_distance: int
    probes: int | None  # Gaussian probes per output step; None when exact

    @property
    def steps(self) -> int:
        return self.influence.shape[1]

    def samples(self) -> tuple[Tensor, Tensor]:
        """Every measured pair: ``(distances [N], influence [N])``, videos and pairs flattened."""
        steps = torch.arange(self.steps)
        distance = (steps[:, None] - steps[None, :]).expand_as(self.influence)  # [B, S, S]: i - j
        measured = ~torch.isnan(self.influence)
        return distance[measured], self.influence[measured]

    def mean_by_distance(self) -> Tensor:  # [max_distance + 1]
        """Mean of ``L`` over videos and over pairs ``(i, j)`` with ``i - j = D``, for each ``D``."""
        distance, values = self.samples()
        return torch.stack([values[distance == d].mean() for d in range(self.max_distance + 1)])

    def to_dict(self) -> dict:
        distance, values = self.samples()
        return {
            "max_distance": self.max_distance,
            "probes": self.probes,
            "estimator": "exact" if self.probes is None else "hutchinson-gaussian",
            "steps": self.steps,
            "videos": self.influence.shape[0],
            "mean_by_distance": self.mean_by_distance().tolist(),
            "samples": {"distance": distance.tolist(), "influence": values.tolist()},
        }


@dataclass
class _Step:
    latents: Tensor  # this step's detached latent leaf
    cache_positions: list[int]  # positions, in the flattened cache, of ...
    cache_leaves: list[Tensor]  # ... the detached cache tensors entering this step
    cache_out: list[Any]  # flattened cache leaving this step (tensors carry this step's graph)


def _check(decoder: Any, latents: Any, max_distance: Any, probes: Any) -> Any:
    decoder = wrap_decoder(decoder)
    if not isinstance(latents, Tensor) or latents.dim() != 5 or not latents.is_floating_point():
        raise ValueError("latents must be a floating-point tensor [B, C, t, h, w] (what vae.decode takes)")
    if latents.shape[1] != decoder.latent_channels:
        raise ValueError(f"latents have {latents.shape[1]} channels but the decoder expects {decoder.latent_channels}")
    steps = len(decoder.step_sizes(latents.shape[2]))
    if isinstance(max_distance, bool) or not isinstance(max_distance, int) or max_distance < 0:
        raise ValueError(f"max_distance must be an integer >= 0, got {max_distance!r}")
    if max_distance >= steps:
        raise ValueError(
            f"max_distance={max_distance} is larger than the video: {latents.shape[2]} latent frames decode in "
            f"{steps} steps, so distances go up to {steps - 1}; use a longer video or max_distance <= {steps - 1}"
        )
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be an integer >= 1, got {probes!r}")
    return decoder


def _probe_vectors(frames: Tensor, probes: int, exact: bool, generator: torch.Generator | None):
    """Cotangents over one step's outputs: Gaussian, or the standard basis when ``exact``."""
    if exact:
        for index in range(frames.numel()):
            basis = torch.zeros(frames.numel(), dtype=frames.dtype, device=frames.device)
            basis[index] = 1
            yield basis.view_as(frames)
        return
    for _ in range(probes):
        noise = torch.randn(frames.shape, generator=generator, dtype=torch.float64)
        yield noise.to(device=frames.device, dtype=frames.dtype)


def temporal_locality(
    decoder: Any,
    latents: Tensor,  # [B, C, t, h, w]
    max_distance: int,
    probes: int = 4,
    *,
    exact: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Locality:
    """Estimate ``L(i <- j) = ||d x_i / d z_j||_F`` for every pair with ``0 <= i - j <= max_distance``.

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder` or a diffusers VAE that
            :func:`~chopgrad.wrap_decoder` accepts. Its parameters are not differentiated.
        latents: ``[B, C, t, h, w]``, ``B`` videos whose estimates are kept apart.
        max_distance: the largest step distance ``i - j`` measured (< the number of steps).
        probes: Gaussian probes per output step (see the estimator note in the module docstring).
        exact: use the standard basis instead (exact; one product per output element).
        generator: CPU generator for the probes (seed it for reproducible estimates).
        progress: show a tqdm bar over the decode steps.

    Returns:
        A :class:`Locality` holding ``influence [B, S, S]`` (float64).
    """
    from tqdm.auto import tqdm

    decoder = _check(decoder, latents, max_distance, probes)
    plan = step_frames(decoder, latents.shape[2])
    batch, steps = latents.shape[0], len(plan)
    squared = torch.full((batch, steps, steps), float("nan"), dtype=torch.float64)
    window: deque[_Step] = deque()
    cache = decoder.init_cache()
    with torch.enable_grad():
        for step, (latent_slice, _) in enumerate(tqdm(plan, desc="locality", unit="step", disable=not progress)):
            step_latents = latents[:, :, latent_slice].detach().requires_grad_(True)
            cache_in, positions, leaves = detach_cache(cache, requires_grad=max_distance > 0)
            frames, cache = decoder.step(step_latents, cache_in)
            window.append(_Step(step_latents, positions, leaves, tree_flatten(cache)[0]))
            if len(window) > max_distance + 1:
                window.popleft()  # no later output is measured against it: release its graph
            for back in range(len(window)):
                squared[:, step, step - back] = 0.0
            for probe in _probe_vectors(frames, probes, exact, generator):
                _backpropagate(window, step, frames, probe, squared[:, step])
    if not exact:
        squared /= probes  # NaN (unmeasured) stays NaN
    return Locality(squared.sqrt(), max_distance, None if exact else probes)


def _backpropagate(window: deque, step: int, frames: Tensor, probe: Tensor, squared_row: Tensor) -> None:
    """Add ``||J_{i,j}^T probe||^2`` per video into ``squared_row[:, j]`` for each step ``j`` in the window.

    ``frames`` are the outputs of step ``i = step``, the newest entry of ``window``. The product is
    carried back one step at a time: from a step's outputs to its latents and to the cache tensors
    that entered it, then from those into the previous step's graph (the same chain as ChopGrad's).
    """
    newest = len(window) - 1
    outputs, cotangents = [frames], [probe]
    for back in range(len(window)):
        graph = window[newest - back]
        last = back == newest
        wanted = [graph.latents] + ([] if last else graph.cache_leaves)
        grads = torch.autograd.grad(outputs, wanted, cotangents, retain_graph=True, allow_unused=True)
        if grads[0] is not None:
            squared_row[:, step - back] += grads[0].double().pow(2).flatten(1).sum(dim=1).cpu()
        if last:
            break
        previous = window[newest - back - 1]
        pairs = [(previous.cache_out[p], g) for p, g in zip(graph.cache_positions, grads[1:])
                 if g is not None and isinstance(previous.cache_out[p], Tensor) and previous.cache_out[p].requires_grad]
        if not pairs:
            break  # nothing of the earlier steps reaches this one through the cache
        outputs, cotangents = [o for o, _ in pairs], [g for _, g in pairs]


def exact_locality(decoder: Any, latents: Tensor, max_distance: int) -> Locality:
    """The influence measure from whole Jacobians: an independent oracle for :func:`temporal_locality`.

    Builds ``d x / d z`` of the untruncated decode column by column with forward-mode AD
    (``torch.autograd.forward_ad``, one decode per latent element, attention on PyTorch's math
    kernel, the one with forward-mode formulas) and takes the Frobenius norm of each ``(i, j)``
    block. Cost grows with the number of latent elements: for tiny models and tests only.
    """
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    decoder = _check(decoder, latents, max_distance, 1)
    plan = step_frames(decoder, latents.shape[2])

    def decode_all(z: Tensor) -> Tensor:  # [1, C, t, h, w] -> [1, 3, T, H, W], no clamp
        cache, pieces = decoder.init_cache(), []
        for latent_slice, _ in plan:
            frames, cache = decoder.step(z[:, :, latent_slice], cache)
            pieces.append(frames)
        return torch.cat(pieces, dim=2)

    batch, steps = latents.shape[0], len(plan)
    influence = torch.full((batch, steps, steps), float("nan"), dtype=torch.float64)
    for b in range(batch):
        z = latents[b : b + 1].detach()
        squared = torch.zeros(steps, steps, dtype=torch.float64)
        for j, (latent_slice, _) in enumerate(plan):
            for column in range(z[:, :, latent_slice].numel()):
                piece = torch.zeros_like(z[:, :, latent_slice])
                piece.view(-1)[column] = 1
                tangent = torch.zeros_like(z)
                tangent[:, :, latent_slice] = piece
                with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), fwAD.dual_level():
                    column_values = fwAD.unpack_dual(decode_all(fwAD.make_dual(z, tangent))).tangent  # [1, 3, T, H, W]
                for i, (_, frame_slice) in enumerate(plan):
                    squared[i, j] += column_values[:, :, frame_slice].double().pow(2).sum()
        for i in range(steps):
            for j in range(max(0, i - max_distance), i + 1):
                influence[b, i, j] = squared[i, j].sqrt()
    return Locality(influence, max_distance, None)

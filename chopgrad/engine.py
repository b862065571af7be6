"""ChopGrad: decode latents and backpropagate a pixel loss with truncated gradients.

Follows Algorithm 1 of the paper (supplement A): the decoder runs its own steps one after the
other; the cache entering each step is detached, and the gradient of step ``s``'s loss term is
carried back through the caches of at most ``d_trunc`` earlier steps. The graph of a step is
released as soon as no later loss term can reach it, so at most ``d_trunc + 1`` step graphs are
alive at once and peak memory does not depend on the number of frames.

Supplement D's time-memory trade, ``release_every=s``: the loss terms of each block of ``s``
consecutive steps are backpropagated together, through the block and the ``d_trunc`` steps
before it, and graphs are released once per block. The ``k``-th step of a block (``k = 0 ..
s - 1``) thus reaches back ``d_trunc + k`` steps; at most ``d_trunc + s`` step graphs are alive,
and a step is backpropagated ``(d_trunc + s) / s`` times on average instead of ``d_trunc + 1``.
``s = 1`` is Algorithm 1. Supplement D's own modification, *delayed eviction* (backpropagate only
when a graph must be evicted), is always on and changes no gradient: the first blocks, whose
truncation point is the initial cache (a constant anyway), are merged into one sweep, so with
``s = 1`` the first backward runs at step ``d_trunc`` and a step is backpropagated ``(T - D)(D + 1)``
times in all instead of about ``T (D + 1) - D (D + 1) / 2`` (``T`` steps; one sweep when ``D >= T - 1``).

``recompute=True`` (beyond the paper) gives exactly the same gradients while holding, for each
step of the window, only the cache entering it: the sweep replays each step's graph when it
reaches it, so the activations of one step are alive at a time. With ``d_trunc=None`` it is the
exact gradient of a reverse sweep over all steps, holding every step's cache.

.. note:: **How gradients are delivered (read once, referred to elsewhere).**
   The truncated gradient is not the gradient of any single forward graph, so
   :func:`decode_loss` computes it eagerly, step by step, with ``torch.autograd.grad`` on
   detached copies of the latents and the cache, while it decodes. It returns the loss value as
   the output of a small autograd node whose backward hands the precomputed gradients, scaled by
   the incoming gradient, to ``latents``, to every decoder parameter that requires grad and to
   every leaf that ``loss_fn`` reaches (next note).
   ``decode_loss(...).backward()``, ``(decode_loss(...) * w + other).backward()`` and
   optimizers therefore work as usual; double backward (``create_graph=True``) does not.

.. note:: **The loss side.** Each step's loss term is computed once, when the step is decoded,
   on a detached copy of the step's frames (cropped to the tile's interior) that takes grad. One
   ``torch.autograd.grad`` of the term gives its gradient w.r.t. those frames, which the sweeps
   then carry through the decoder (a replay never calls ``loss_fn`` again), and w.r.t. every other
   leaf that the term's graph reaches, found through its ``AccumulateGrad`` nodes: a
   discriminator's parameters, learnable loss weights, a target that requires grad (or the leaves
   under a non-leaf one). Those gradients do not cross the cache, so truncation does not change
   them: they equal plain autograd's, the sum over steps of ``d term_s / d leaf``, and are
   delivered to the leaves themselves (hooks on a non-leaf target do not fire). The graph between
   those leaves and the loss is retained from step to step, since every step's term crosses it;
   ``loss_fn``'s own activations are freed as soon as its step's term is differentiated.

.. note:: **Sweeps, retained graphs and replays (the autograd subtlety of the schedules).**
   A *sweep* visits the window newest step first and backpropagates, through each step's graph
   in one ``torch.autograd.grad`` call, that step's pending loss term together with the adjoint
   of the cache leaving it. Adjoints of different loss terms are summed before they cross a step,
   which is only right when all those terms share one truncation point: that is why a block's
   terms (one truncation point, ``block start - d_trunc``) take one sweep, while Algorithm 1,
   where every term has its own, needs a sweep per step. Summing first is exact in real
   arithmetic; in floating point it rounds differently from term-by-term passes (by about the
   precision of the decoder's lowest-precision op: Wan upsamples in float32). A graph that a
   later sweep crosses again is backpropagated with ``retain_graph=True``; the others without,
   which frees their buffers at once. ``recompute`` never retains: the step is replayed from
   its cache (and the replay's output stands in for the held cache entering the next step),
   which requires ``decoder.step`` to be a pure function of (latents, cache, parameters): no
   dropout or other randomness in training mode, no in-place change of the cache (the protocol
   forbids it), or the replayed graph is not the one that produced the loss and the gradient is
   silently wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from chopgrad.checks import check_latents, check_loss_fn, check_schedule, check_target, check_tiles
from chopgrad.protocol import CausalDecoder, Tile, step_frames

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
    """Tiles as even as the latent allows: ``count`` spans of ``size // count`` latent pixels or one
    more (the longer ones last), each weighted by its share of the frame's pixels."""
    def spans(size: int, count: int) -> list[tuple[slice, slice, slice]]:
        result = []
        for index in range(count):
            start, stop = index * size // count, (index + 1) * size // count
            lo, hi = max(start - halo, 0), min(stop + halo, size)
            crop = slice((start - lo) * scale, (stop - lo) * scale)
            result.append((slice(lo, hi), crop, slice(start * scale, stop * scale)))
        return result

    def share(rows: slice, cols: slice) -> float:
        return (rows.stop - rows.start) * (cols.stop - cols.start) / (height * width * scale * scale)

    return [
        _Placement(Tile(rows[0], cols[0]), (rows[1], cols[1]), (rows[2], cols[2]), share(rows[2], cols[2]))
        for rows in spans(height, tiles[0])
        for cols in spans(width, tiles[1])
    ]


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


@dataclass(frozen=True)
class _Schedule:
    """When the truncated loop backpropagates, releases and replays step graphs (module docstring)."""

    d_trunc: int  # a block's loss terms treat the cache entering step ``block start - d_trunc`` as a constant
    release_every: int  # steps per block: their loss terms are backpropagated together, in one sweep
    recompute: bool  # hold each windowed step's entering cache, not its graph; replay it in the sweep

    def block_stop(self, index: int, steps: int) -> int:
        """The first step after the block that holds step ``index``."""
        return min((index // self.release_every + 1) * self.release_every, steps)

    def cache_grad(self, index: int) -> bool:
        """Whether some loss term reaches through the cache entering step ``index``."""
        return self.d_trunc > 0 or index % self.release_every != 0


@dataclass
class _Pass:
    """One tile's decode: what every step needs, and where its gradients accumulate."""

    decoder: CausalDecoder
    latents: Tensor  # [B, C, t, h', w'], this tile's latents (detached)
    target: Tensor  # [B, 3, T, H, W], the whole frame (each step crops its interior)
    loss_fn: LossFn
    plan: list[tuple[slice, slice]]  # step_frames(decoder, t)
    place: _Placement
    params: list[Tensor]  # trainable decoder parameters
    acc: _Accumulator
    loss_leaves: _LossLeaves  # shared by the tiles
    loss_grad: bool  # grad mode of the call: the loss side takes grad (see the note on the loss side)

    @property
    def decoder_grad(self) -> bool:
        """Whether the latents or some decoder parameter want a gradient (else no step graph is built)."""
        return self.acc.latents is not None or bool(self.params)


@dataclass
class _StepGraph:
    """One decode step's graph, kept alive while later loss terms may still reach it."""

    latent_slice: slice
    latents: Tensor  # detached leaf of this step's latents
    cache_positions: list[int]  # positions (in the flattened cache) of ...
    cache_leaves: list[Tensor]  # ... the detached cache leaves entering this step
    cache_out: list[Any]  # flattened cache leaving this step (tensors carry the step's graph)
    pred: Tensor  # [B, 3, T_s, H', W'], the step's frames inside the tile (carrying the step's graph)
    value: Tensor | None  # the step's loss term (detached); None in a replay
    pred_grad: Tensor | None  # d(loss term) / d(pred); None in a replay, or if the decoder takes no grad


@dataclass
class _Held:
    """A step inside the window: its graph, or (``recompute``) the cache to replay it from."""

    index: int  # the step's position in the decode loop
    cache_in: Any  # detached cache entering the step; None unless recompute
    graph: _StepGraph | None  # recompute: None, but for a sweep's newest step until the sweep crosses it
    pred_grad: Tensor | None  # the gradient of the step's loss term w.r.t. its frames, until a sweep takes it


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


class _LossLeaves:
    """The leaves that the loss terms reach besides the frames, and their summed gradients."""

    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.grads: list[Tensor] = []
        self._index: dict[int, int] = {}  # id(tensor) -> position; the tensors are held, so ids stay unique

    def add(self, leaves: list[Tensor], grads: tuple) -> None:
        for leaf, grad in zip(leaves, grads):
            if grad is None:
                continue
            position = self._index.setdefault(id(leaf), len(self.tensors))
            if position == len(self.tensors):
                self.tensors.append(leaf)
                self.grads.append(grad)
            else:  # out of place: autograd may hand back an expanded (stride-0) gradient
                self.grads[position] = self.grads[position] + grad


def _leaves_under(term: Tensor, pred: Tensor) -> tuple[list[Tensor], bool]:
    """The leaves that ``term``'s graph reaches (its ``AccumulateGrad`` nodes) other than the leaf
    ``pred``, and whether it reaches ``pred``."""
    leaves, reaches, seen, stack = [], False, set(), [term.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if leaf is pred:
            reaches = True
        elif leaf is not None:
            leaves.append(leaf)
        else:
            stack.extend(child for child, _ in node.next_functions)
    return leaves, reaches


def _vjp(outputs: list[Tensor], grad_outputs: list[Tensor | None], inputs: list[Tensor], retain: bool):
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o.requires_grad]
    if not pairs or not inputs:
        return [None] * len(inputs)
    outs, grads = zip(*pairs)
    return torch.autograd.grad(outs, inputs, grads, retain_graph=retain, allow_unused=True)


# ----------------------------------------------------------------------------- the modes


def _loss_term(run: _Pass, index: int, pred: Tensor) -> tuple[Tensor, Tensor | None]:
    """Step ``index``'s loss term on its frames ``pred``: ``(value, d value / d pred)``; the
    gradients of the other leaves it reaches go to ``run.loss_leaves`` (see the note on the loss side)."""
    frame_slice = run.plan[index][1]
    share = (frame_slice.stop - frame_slice.start) / run.plan[-1][1].stop
    rows, cols = run.place.out
    with torch.set_grad_enabled(run.loss_grad):
        leaf = pred.detach().requires_grad_(run.loss_grad)
        term = run.loss_fn(leaf, run.target[:, :, frame_slice, rows, cols])
        if not isinstance(term, Tensor) or term.numel() != 1:
            raise ValueError("loss_fn(pred, target) must return a scalar tensor (reduce it, e.g. with .mean())")
        term = term.reshape(()) * (share * run.place.weight)
    if not run.loss_grad or not (term.requires_grad or run.decoder_grad):
        return term.detach(), None  # no gradient wanted anywhere
    leaves, reaches = _leaves_under(term, leaf) if term.requires_grad else ([], False)
    if not reaches:
        how = "it depends only on other tensors" if term.requires_grad else "it does not require grad"
        raise ValueError(
            f"loss_fn returned a tensor that does not depend on its first argument (the decoded frames; {how}), "
            "so no gradient would reach the latents or the decoder: compute the loss from pred with "
            "differentiable torch operations (no .detach(), .item(), numpy or torch.no_grad inside loss_fn)"
        )
    wanted = [leaf] * run.decoder_grad + leaves
    grads = torch.autograd.grad(term, wanted, retain_graph=bool(leaves), allow_unused=True) if wanted else ()
    run.loss_leaves.add(leaves, grads[run.decoder_grad :])
    return term.detach(), grads[0] if run.decoder_grad else None


def _run_step(run: _Pass, index: int, cache: Any, cache_grad: bool, live: bool, with_loss: bool = True):
    """Decode step ``index`` from ``cache``. With ``live`` its graph is built from fresh leaves (the
    latents, and the cache when ``cache_grad``); without, it runs under no_grad for its values only.
    ``with_loss`` computes its loss term (a replay does not: the sweep holds the term's gradient).

    Returns ``(graph, detached cache entering the step, cache leaving it)``.
    """
    latent_slice = run.plan[index][0]
    step_latents = run.latents[:, :, latent_slice].detach().requires_grad_(live and run.acc.latents is not None)
    cache_in, positions, leaves = detach_cache(cache, requires_grad=live and cache_grad)
    with torch.set_grad_enabled(live):
        frames, cache_out = run.decoder.step(step_latents, cache_in)
        pred = frames[..., run.place.crop[0], run.place.crop[1]]
    value, pred_grad = _loss_term(run, index, pred) if with_loss else (None, None)
    graph = _StepGraph(latent_slice, step_latents, positions, leaves, tree_flatten(cache_out)[0], pred, value, pred_grad)
    return graph, cache_in, cache_out


def _truncated(run: _Pass, schedule: _Schedule) -> Tensor:
    """Algorithm 1 and supplement D: decode step by step; at the end of each block, sweep its loss
    terms back through the window (the block and the ``d_trunc`` steps before it), then release
    the graphs (or, with ``recompute``, the caches) that no later block reaches."""
    steps, window = len(run.plan), []
    cache, total, pending = run.decoder.init_cache(tile=run.place.tile), run.latents.new_zeros(()), 0
    for index in range(steps):
        stop = schedule.block_stop(index, steps)
        # A block whose successor still truncates at the initial cache (a constant anyway) merges
        # with it: same gradient, one sweep fewer (supplement D's delayed eviction).
        sweep = index + 1 == stop and (stop == steps or stop > schedule.d_trunc)
        live = sweep or not schedule.recompute  # recompute: only a sweep's newest step keeps its graph
        cache, loss = _advance(run, schedule, window, index, cache, live)
        total = total + loss
        if sweep:
            keep_from = stop - schedule.d_trunc  # the next block's window starts here
            retain_from = steps if schedule.recompute or stop == steps else keep_from
            _sweep(run, schedule, window, pending, retain_from)
            window, pending = [held for held in window if held.index >= keep_from], stop
    return total


def _advance(run: _Pass, schedule: _Schedule, window: list[_Held], index: int, cache: Any, live: bool):
    """Decode step ``index`` into ``window``; return the cache leaving it and its loss value."""
    graph, cache_in, cache_out = _run_step(run, index, cache, schedule.cache_grad(index), live)
    pred_grad, graph.pred_grad = graph.pred_grad, None  # the window holds it, with or without the graph
    if schedule.recompute:  # hold the entering cache, and the graph only until the sweep crosses it
        window.append(_Held(index, cache_in, graph if live else None, pred_grad))
        cache_out = detach_cache(cache_out, requires_grad=False)[0]  # else its graph would keep cache_in alive
    else:
        window.append(_Held(index, None, graph, pred_grad))
    return cache_out, graph.value


def _sweep(run: _Pass, schedule: _Schedule, window: list[_Held], pending: int, retain_from: int) -> None:
    """Backpropagate the loss terms of steps ``>= pending`` through ``window``, newest step first,
    carrying one summed cache adjoint (see the note on sweeps); graphs of steps ``>= retain_from``
    are kept for the next sweep."""
    adjoint: list[tuple[int, Tensor]] = []  # (position in the flattened cache leaving the step, gradient)
    for position in reversed(range(len(window))):
        held, oldest = window[position], position == 0
        graph = held.graph
        if graph is None:  # recompute
            graph = _replay(run, schedule, window, position)
        held.graph = None if schedule.recompute else graph
        adjoint = _cross(run, graph, held.pred_grad, adjoint, oldest, retain=held.index >= retain_from)
        held.pred_grad = None  # backpropagated: no later sweep takes this term again
        if oldest or (not adjoint and window[position - 1].index < pending):
            break  # the truncation point, or nothing older is reached


def _replay(run: _Pass, schedule: _Schedule, window: list[_Held], position: int) -> _StepGraph:
    """Rebuild the graph of ``window[position]`` from the cache that entered it.

    The replay recomputes, bit for bit, the cache entering the next step in the window: that one
    is held once, from the replay, instead of twice while the replay runs.
    """
    held, newer = window[position], window[position + 1] if position + 1 < len(window) else None
    if newer is not None:
        newer.cache_in = None
    graph, _, cache_out = _run_step(run, held.index, held.cache_in, schedule.cache_grad(held.index), True, False)
    if newer is not None:
        newer.cache_in = detach_cache(cache_out, requires_grad=False)[0]
    return graph


def _cross(
    run: _Pass, graph: _StepGraph, pred_grad: Tensor | None, adjoint: list, oldest: bool, retain: bool
) -> list[tuple[int, Tensor]]:
    """One step of a sweep: backpropagate the step's pending loss term (``pred_grad``, its gradient
    w.r.t. the step's frames) and the adjoint of the cache leaving it; accumulate the gradients;
    return the adjoint of the cache entering it."""
    want_latents = run.acc.latents is not None
    pending = [(graph.pred, pred_grad)] if pred_grad is not None else []
    pairs = pending + [(graph.cache_out[p], g) for p, g in adjoint]
    leaves = [] if oldest else graph.cache_leaves  # the oldest step's entering cache is the truncation point
    wanted = [graph.latents] * want_latents + leaves + run.params
    grads = _vjp([o for o, _ in pairs], [g for _, g in pairs], wanted, retain=retain)
    run.acc.add(graph.latent_slice, grads[0] if want_latents else None, grads[len(wanted) - len(run.params) :])
    cache_grads = grads[want_latents : want_latents + len(leaves)]
    return [(p, g) for p, g in zip(graph.cache_positions, cache_grads) if g is not None]


def _full(run: _Pass) -> Tensor:
    """Plain backpropagation through the untruncated loop (memory grows with the video)."""
    want_latents = run.acc.latents is not None
    leaf = run.latents.detach().requires_grad_(want_latents)
    cache, total = run.decoder.init_cache(tile=run.place.tile), run.latents.new_zeros(())
    preds, pred_grads = [], []
    for index, (latent_slice, _) in enumerate(run.plan):
        frames, cache = run.decoder.step(leaf[:, :, latent_slice], cache)
        preds.append(frames[..., run.place.crop[0], run.place.crop[1]])
        value, pred_grad = _loss_term(run, index, preds[-1])
        pred_grads.append(pred_grad)
        total = total + value
    grads = _vjp(preds, pred_grads, [leaf] * want_latents + run.params, retain=False)
    run.acc.add(slice(None), grads[0] if want_latents else None, grads[want_latents:])
    return total


def _frozen(run: _Pass) -> Tensor:
    """No latent or decoder parameter takes grad: decode without step graphs. The loss side still
    gives its own leaves their gradients (a discriminator trained on a frozen decoder's frames)."""
    cache, total = run.decoder.init_cache(tile=run.place.tile), run.latents.new_zeros(())
    for index in range(len(run.plan)):
        graph, _, cache = _run_step(run, index, cache, cache_grad=False, live=False)
        total = total + graph.value
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


def _group_position(group: Any, tiles: int) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` without a group."""
    if group is None:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        raise ValueError("tile_group is given but torch.distributed is not initialised: call "
                         "chopgrad.distributed.init() (under torchrun) first, or leave tile_group out")
    rank, ranks = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of tile_group: call decode_loss with tile_group only on "
                         "the group's ranks")
    if ranks > tiles:
        raise ValueError(f"tile_group has {ranks} ranks but there are only {tiles} tiles: use at least "
                         f"as many tiles as ranks")
    return rank, ranks


def _sum_over_ranks(group: Any, total: Tensor, latent_grad: Tensor | None, params: list[Tensor],
                    param_grads: list[Tensor | None], loss_leaves: _LossLeaves) -> None:
    """Sum the loss and every gradient over ``group``, in place (each rank decoded its own tiles).

    A decoder parameter that no rank's tiles reached keeps no gradient (``None``), as in one process.
    """
    import torch.distributed as dist

    shapes = (latent_grad is not None, [tuple(p.shape) for p in params],
              [(tuple(g.shape), str(g.dtype)) for g in loss_leaves.grads])
    seen: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(seen, (shapes, [g is not None for g in param_grads]), group=group)
    if any(other != shapes for other, _ in seen):
        raise ValueError("the ranks of tile_group differ in the latents' requires_grad, the decoder parameters "
                         "that require grad or the leaves the loss reaches (shapes, dtypes): give every rank the "
                         "same latents, decoder and loss_fn")
    reached = [any(flags[index] for _, flags in seen) for index in range(len(params))]
    dist.all_reduce(total, group=group)
    if latent_grad is not None:
        latent_grad.copy_(_summed(latent_grad, group))
    for index, param in enumerate(params):
        if reached[index]:
            grad = param_grads[index]
            param_grads[index] = _summed(torch.zeros_like(param) if grad is None else grad, group)
    for index, grad in enumerate(loss_leaves.grads):
        loss_leaves.grads[index] = _summed(grad, group)


def _summed(tensor: Tensor, group: Any) -> Tensor:
    import torch.distributed as dist

    tensor = tensor.contiguous()
    dist.all_reduce(tensor, group=group)
    return tensor


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
    release_every: int = 1,
    recompute: bool = False,
    tile_group: Any = None,
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
            ``[B, 3, T_s, H', W']`` (one tile's interior when ``tiles`` is not ``(1, 1)``), once
            per step and tile in every mode. It must depend on ``pred``. It may hold leaves of its
            own (a discriminator, learnable loss weights), and ``target`` may require grad: they
            get exactly the gradient plain autograd gives them (the note on the loss side).
        d_trunc: truncation distance ``D >= 0``: step ``s``'s loss term reaches the latents of
            steps ``s - D .. s``, i.e. the cache entering step ``s - D`` is a constant. ``0``: each
            term reaches only its own step (with ``release_every=1``; see there for blocks).
            ``None``: full backpropagation (exact).
        tiles: ``(rows, cols)`` spatial tiles, decoded and backpropagated one at a time, each from
            ``decoder.init_cache(tile=...)`` with its :class:`~chopgrad.Tile`. Counts need not
            divide the latent: spans differ by at most one latent pixel (the longer ones last).
        halo: latent pixels of context decoded around each tile (the loss sees only the interior).
        release_every: steps per block, ``s >= 1`` (supplement D's time-memory trade). The loss
            terms of each block of ``s`` consecutive steps (steps ``b s .. b s + s - 1``) are
            backpropagated together, in one sweep through the block and the ``d_trunc`` steps
            before it, and graphs are released once per block: the ``k``-th step of a block
            reaches back ``d_trunc + k`` steps (the cache entering step ``b s - d_trunc`` is a
            constant for the whole block). ``1`` is Algorithm 1. At most ``d_trunc + s`` step
            graphs are alive; a step is backpropagated ``(d_trunc + s) / s`` times on average, not
            ``d_trunc + 1``. Needs an integer ``d_trunc``.
        recompute: hold, for each step in the window, the cache entering it instead of its graph,
            and replay the step when the sweep reaches it: the same gradient as without (for
            every ``d_trunc`` and ``release_every``; ``d_trunc=None`` gives the exact gradient), with
            the activations of one step at a time plus ``d_trunc + release_every + 1`` caches (those
            entering the window's steps and the one leaving it; every step's cache with
            ``d_trunc=None``) and the loss's gradient w.r.t. the frames of each step whose term
            awaits its sweep. It costs one step forward per step
            backpropagated (the newest step of a sweep reuses its forward). See the note on sweeps
            and replays in the module docstring.

        tile_group: a ``torch.distributed`` process group whose ranks hold the same sample (the
            same ``latents`` and ``target``, e.g. a sequence-parallel group): rank ``r`` of ``n``
            decodes and backpropagates tiles ``r, r + n, ...`` (row-major), and the loss and every
            gradient are summed over the group, so each rank gets what one process decoding every
            tile gets (up to the order of the sums). A collective: every rank of the group calls it. Needs at
            least as many tiles as ranks.

    Returns:
        A scalar: ``sum_tiles a_tile sum_s (T_s / T) * loss_fn(pred_s, target_s)``, with ``a_tile``
        the tile's share of the frame's pixels, which for a per-element-mean loss equals
        ``loss_fn`` over the whole video. Calling ``.backward()`` on
        it (alone or inside a larger loss) delivers the truncated gradients into ``latents`` and
        into the decoder parameters that require grad, and the untruncated ones into every leaf
        that ``loss_fn`` reaches besides ``pred``. Double backward is not supported.

    Raises:
        ValueError: latents that are not ``[B, C, t, h, w]`` with the decoder's ``C``, empty
            (batch size 0) or not finite; a target of another shape, outside the output range or
            not finite; bad ``d_trunc``, ``tiles``, ``halo`` or ``release_every`` (integers,
            numpy's included, are accepted; bools are not); a ``loss_fn`` that returns no scalar,
            or one that does not depend on ``pred`` (detached, or only on other tensors).
        TypeError: latents of another dtype than the decoder's parameters, a target of another
            dtype than the latents, a ``loss_fn`` that is not callable, a non-bool ``recompute``.

    .. warning::
        The loss sees the decoder's output *before* the clamp that Wan's ``vae.decode`` applies:
        a clamp would give saturated pixels zero gradient. :func:`decode` does clamp.

    .. warning::
        ``d_trunc`` counts decoder *steps*: one latent frame (4 pixel frames) for Wan, two latent
        frames for CogVideoX.
    """
    decoder = check_latents(decoder, latents)
    tiles = check_tiles(latents, tiles, halo)
    check_target(decoder, latents, target)
    check_loss_fn(loss_fn)
    d_trunc, release_every = check_schedule(d_trunc, release_every, recompute)

    loss_grad = torch.is_grad_enabled()
    params = [p for p in decoder.parameters() if p.requires_grad] if loss_grad else []
    plan = step_frames(decoder, latents.shape[2])
    layout = _tile_layout(latents.shape[-2], latents.shape[-1], tiles, halo, decoder.spatial_scale)
    rank, ranks = _group_position(tile_group, len(layout))
    latent_grad = torch.zeros_like(latents) if loss_grad and latents.requires_grad else None
    param_grads: list[Tensor | None] = [None] * len(params)
    loss_leaves, total = _LossLeaves(), latents.new_zeros((), dtype=torch.float64)
    for place in layout[rank::ranks]:
        tile_latents = latents.detach()[..., place.tile.rows, place.tile.cols]
        acc = _Accumulator(tile_latents if latent_grad is not None else None, params)
        run = _Pass(decoder, tile_latents, target, loss_fn, plan, place, params, acc, loss_leaves, loss_grad)
        if not run.decoder_grad:
            value = _frozen(run)
        elif d_trunc is None and not recompute:
            value = _full(run)
        else:  # d_trunc=None with recompute: one block, truncated nowhere (the exact gradient)
            value = _truncated(run, _Schedule(len(plan) if d_trunc is None else d_trunc, release_every, recompute))
        total += value.double()
        if latent_grad is not None:
            latent_grad[..., place.tile.rows, place.tile.cols] += acc.latents
        for index, grad in enumerate(acc.params):
            if grad is not None:
                param_grads[index] = grad if param_grads[index] is None else param_grads[index] + grad
    if tile_group is not None:
        _sum_over_ranks(tile_group, total, latent_grad, params, param_grads, loss_leaves)
    grads = [latent_grad, *param_grads, *loss_leaves.grads]
    return _DeliverGradients.apply(total.to(latents.dtype), grads, latents, *params, *loss_leaves.tensors)


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
    decoder = check_latents(decoder, latents)
    tiles = check_tiles(latents, tiles, halo)
    plan = step_frames(decoder, latents.shape[2])
    scale = decoder.spatial_scale
    rows = []
    layout = _tile_layout(latents.shape[-2], latents.shape[-1], tiles, halo, scale)
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

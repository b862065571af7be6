"""Multi-process training with ``torchrun``: process group, FSDP2 sharding, full state dicts.

The paper trains Wan 2.1 14B on 8 A100s by fully sharding the transformer's parameters and
optimizer state with FSDP (supplement B.4, C.2). This module is that mechanism and nothing
more (the training loop lives in the train stage):

- :func:`init` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``/``MASTER_PORT``) and starts the process group: NCCL on CUDA, gloo on CPU.
  Without torchrun it returns a single-process :class:`DistInfo` and starts nothing, so the
  same script runs under ``python`` and under ``torchrun``.
- :func:`shard_transformer` applies FSDP2's ``fully_shard`` to every transformer block and then
  to the root. Each parameter becomes a ``DTensor`` sharded on dim 0 across ranks, so an
  optimizer built *after* sharding keeps only its rank's slice of the state (AdamW moments).
  Frozen base weights and trainable LoRA weights may share a block (FSDP2 allows mixed
  ``requires_grad``). Gradients are averaged across ranks (reduce-scatter), i.e. the gradient of
  the mean of the ranks' losses: give each rank a different clip of the global batch.
- :func:`full_model_state_dict` / :func:`full_optimizer_state_dict` gather full, unsharded
  tensors on CPU for saving (``torch.distributed.checkpoint.state_dict`` with
  ``full_state_dict=True, cpu_offload=True``: rank 0 receives them, other ranks get ``{}``);
  :func:`load_full_model_state_dict` / :func:`load_full_optimizer_state_dict` put them back.
- :func:`all_reduce_mean` averages a logged scalar over ranks.

Pattern (``torchrun --standalone --nproc_per_node 8 -m stages.train ...``)::

    info = distributed.init()                          # DistInfo(rank, world_size, local_rank, device)
    transformer.to(info.device); vae.to(info.device)
    lora.add_transformer_lora(transformer, 128, 64)     # optional: before sharding
    distributed.shard_transformer(transformer)          # then build the optimizer
    optimizer = torch.optim.AdamW(lora.trainable_parameters(transformer).values(), lr=1e-5)
    for step in ...:
        clip = clips[step * info.world_size + info.rank]            # a different clip per rank
        loss = latent_mse + 100 * chopgrad.decode_loss(decoder, latents, target, lpips, d_trunc=1)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        logged = distributed.all_reduce_mean(loss)                  # same value on every rank
    state = distributed.full_model_state_dict(transformer)           # collective: all ranks call it
    if info.is_main:
        save_file(state, ...)   # or lora.save_adapter(transformer, path, name, state_dict=state)
    distributed.shutdown()

.. warning::
   The gathering and loading functions are collectives: every rank must call them, in the
   same order, or the job hangs. Keep the decoder (VAE) unsharded: ChopGrad's
   ``decode_loss`` runs many small forward/backward passes through it per step, and it is
   small next to the transformer; its trainable LoRA/fusion weights are averaged across ranks
   with :func:`all_reduce_gradients` before the optimizer step.
"""

from __future__ import annotations

import datetime
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = [
    "DistInfo",
    "Layout",
    "all_reduce_gradients",
    "all_reduce_mean",
    "barrier",
    "enable_sequence_parallel",
    "full_model_state_dict",
    "full_optimizer_state_dict",
    "init",
    "is_sharded",
    "load_full_model_state_dict",
    "load_full_optimizer_state_dict",
    "make_layout",
    "shard_transformer",
    "shutdown",
]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # number of processes (1 without torchrun)
    local_rank: int  # rank on this machine: picks the GPU
    device: torch.device  # cuda:<local_rank> on GPU machines, cpu otherwise
    backend: str | None  # "nccl", "gloo", or None when no process group was started

    @property
    def is_main(self) -> bool:
        """True on rank 0: the process that logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init(
    backend: str | None = None, *, device: str | torch.device | None = None, timeout_s: float = 1800.0
) -> DistInfo:
    """Start the process group from torchrun's environment; a no-op single process without it.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, gloo otherwise.
        device: force the device (e.g. ``"cpu"`` for a gloo test on a GPU machine; a bare
            ``"cuda"`` means ``cuda:<LOCAL_RANK>``); default ``cuda:<LOCAL_RANK>`` when CUDA is
            available, else CPU.
        timeout_s: collective timeout.

    Returns:
        :class:`DistInfo`. Calling it again in a process whose group is already started returns
        the same description.

    Raises:
        ValueError: a partial torchrun environment (some of RANK / WORLD_SIZE / LOCAL_RANK set),
            non-integer values, or NCCL asked for on a machine without CUDA.
    """
    present = [name for name in _TORCHRUN_VARS if name in os.environ]
    if not present:
        chosen = _resolve_device(device, 0)
        if chosen.type == "cuda":
            torch.cuda.set_device(chosen)
        return DistInfo(0, 1, 0, chosen, None)
    if len(present) != len(_TORCHRUN_VARS):
        missing = [name for name in _TORCHRUN_VARS if name not in present]
        raise ValueError(f"torchrun environment is incomplete: {missing} not set; launch with torchrun")
    try:
        rank, world_size, local_rank = (int(os.environ[name]) for name in _TORCHRUN_VARS)
    except ValueError as error:
        raise ValueError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers: {error}") from None
    chosen = _resolve_device(device, local_rank)
    backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
    if backend == "nccl" and chosen.type != "cuda":
        raise ValueError("the nccl backend needs CUDA devices: use backend='gloo' on CPU")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=chosen if chosen.type == "cuda" else None,
        )
    return DistInfo(rank, world_size, local_rank, chosen, dist.get_backend())


def _resolve_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """``device`` with a bare ``"cuda"`` made ``cuda:<local rank>`` (``torch.cuda.set_device`` needs an index)."""
    if device is None:
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    chosen = torch.device(device)
    return torch.device("cuda", local_rank) if chosen.type == "cuda" and chosen.index is None else chosen


def shutdown() -> None:
    """Destroy the process group (if one was started)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if dist.is_initialized():
        dist.barrier()


# ----------------------------------------------------------------------------- sequence parallelism


@dataclass(frozen=True)
class Layout:
    """How the ranks split the work: ``data_parallel`` groups of ``sequence_parallel`` consecutive ranks.

    The ranks of one group hold the same sample (batch 1 per group): the transformer splits its
    tokens across them (diffusers' context parallelism, Ulysses attention) and ChopGrad's decoder
    tiles go round them (``decode_loss(..., tile_group=layout.sequence_group)``). Different groups
    train on different samples. The effective batch per optimiser step is ``data_parallel``.
    """

    data_parallel: int  # sample groups: the batch of one optimiser step
    sequence_parallel: int  # ranks per sample
    data_rank: int  # this rank's group: which sample it trains on
    sequence_rank: int  # this rank's place in its group
    mesh: Any = None  # DeviceMesh ("data", "ring", "ulysses"); None in a single process or without sequence parallelism
    sequence_group: Any = None  # the ProcessGroup of this rank's sample group; None when sequence_parallel is 1


def make_layout(sequence_parallel: int = 1) -> Layout:
    """Split the started job into sample groups of ``sequence_parallel`` consecutive ranks.

    Call after :func:`init`. With ``sequence_parallel`` 1 every rank is its own group (data
    parallel only, as before). Ranks ``g * n .. g * n + n - 1`` form group ``g``: on one node of
    8 GPUs with ``sequence_parallel`` 8 (the paper's setting) the group is the node, whose GPUs
    talk over NVLink.

    Raises:
        ValueError: ``sequence_parallel`` < 1, or it does not divide the world size.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    if sequence_parallel < 1 or world % sequence_parallel:
        raise ValueError(f"sequence_parallel {sequence_parallel} must be >= 1 and divide the number of processes "
                         f"({world}): start a multiple of it (torchrun --nproc_per_node, --nnodes)")
    if sequence_parallel == 1:
        return Layout(world, 1, rank, 0)
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (world // sequence_parallel, 1, sequence_parallel),
                            mesh_dim_names=("data", "ring", "ulysses"))
    return Layout(world // sequence_parallel, sequence_parallel, rank // sequence_parallel,
                  rank % sequence_parallel, mesh, mesh["ulysses"].get_group())


def enable_sequence_parallel(transformer: nn.Module, layout: Layout) -> nn.Module:
    """Split ``transformer``'s tokens across the ranks of each sample group, forward and backward.

    diffusers' context parallelism with Ulysses attention (``ContextParallelConfig(ulysses_degree=
    layout.sequence_parallel)`` and the model's own ``_cp_plan``): the patch tokens are split
    before the first block, each attention exchanges heads for tokens with an all-to-all, and the
    output is gathered after ``proj_out``, so every rank of the group gets the whole prediction.
    In backward each rank then holds its tokens' share of every parameter gradient; the output
    gradient is scaled by the group size so that FSDP's mean over all ranks
    (:func:`shard_transformer`, called after this) is the mean over sample groups of each
    sample's whole gradient: one step equals the single-process step on the same samples.

    On CUDA this is ``transformer.enable_parallelism``; on CPU (gloo), where diffusers' set-up
    looks for an accelerator, the same configuration, processors and plan hooks are applied here.
    A no-op with ``layout.sequence_parallel`` 1.

    Raises:
        ValueError: the installed diffusers has no context parallelism for this model (it needs
            diffusers >= 0.36 and a model with a ``_cp_plan``, as ``WanTransformer3DModel``), or
            the attention heads do not divide by the group size.
    """
    size = layout.sequence_parallel
    if size == 1:
        return transformer
    try:
        from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    except ImportError:
        ContextParallelConfig = None
    if ContextParallelConfig is None or not getattr(transformer, "_cp_plan", None):
        raise ValueError(f"{type(transformer).__name__} has no context parallelism in this diffusers: sequence "
                         "parallelism needs diffusers >= 0.36 and a model with a _cp_plan (WanTransformer3DModel)")
    heads = getattr(getattr(transformer, "config", None), "num_attention_heads", None)
    if heads is not None and heads % size:
        raise ValueError(f"sequence_parallel {size} must divide the transformer's {heads} attention heads "
                         "(Ulysses attention gives each rank whole heads)")
    config = ContextParallelConfig(ulysses_degree=size, mesh=layout.mesh["ring", "ulysses"])
    if dist.get_backend() == "nccl":
        transformer.enable_parallelism(config=config)
    else:
        from diffusers.hooks.context_parallel import apply_context_parallel

        parallel = ParallelConfig(context_parallel_config=config)
        parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=config.mesh)
        transformer._parallel_config = parallel
        for module in transformer.modules():
            processor = getattr(module, "processor", None)
            if processor is not None and hasattr(processor, "_parallel_config"):
                processor._parallel_config = parallel
        apply_context_parallel(transformer, config, transformer._cp_plan)
    transformer.register_forward_hook(functools.partial(_scale_output_gradient, factor=float(size)))
    return transformer


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` in backward."""

    @staticmethod
    def forward(ctx, tensor: Tensor, factor: float) -> Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.factor, None


def _scale_output_gradient(module, args, output, *, factor: float):
    if isinstance(output, Tensor):
        return _ScaleGradient.apply(output, factor)
    if isinstance(output, tuple):
        return (_ScaleGradient.apply(output[0], factor), *output[1:])
    output.sample = _ScaleGradient.apply(output.sample, factor)  # diffusers' Transformer2DModelOutput
    return output


# ----------------------------------------------------------------------------- sharding


def shard_transformer(
    model: nn.Module,
    *,
    block_attribute: str | None = None,
    param_dtype: torch.dtype | None = None,
    reduce_dtype: torch.dtype | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2-shard a transformer in place: each block, then the root (the remaining parameters).

    Call after moving the model to its device and after injecting LoRA, and build the optimizer
    afterwards (it must see the sharded ``DTensor`` parameters). Activation checkpointing, if
    wanted, is applied to the blocks before this call.

    Args:
        model: e.g. diffusers' ``WanTransformer3DModel`` (its blocks are ``model.blocks``) or
            ``CogVideoXTransformer3DModel`` (``model.transformer_blocks``).
        block_attribute: name of the ``nn.ModuleList`` of blocks; each becomes one FSDP unit
            (its parameters are all-gathered just before it runs and freed after). None: ``blocks``,
            else ``transformer_blocks``.
        param_dtype, reduce_dtype: FSDP2 mixed precision (e.g. ``torch.bfloat16`` /
            ``torch.float32``); ``None`` keeps the parameters' dtype.
        reshard_after_forward: free gathered parameters after each block's forward (saves
            memory, re-gathers in backward).

    Returns:
        ``model`` (now an ``FSDPModule``). With no process group (a single process) the model
        is returned unchanged.

    Raises:
        ValueError: ``model`` has no ``block_attribute`` module list.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if block_attribute is None:
        block_attribute = "blocks" if hasattr(model, "blocks") else "transformer_blocks"
    blocks = getattr(model, block_attribute, None)
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
        raise ValueError(
            f"{type(model).__name__} has no module list {block_attribute!r} to shard: pass block_attribute="
            "the name of its list of transformer blocks"
        )
    if not dist.is_initialized():
        return model
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for block in blocks:
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` has been applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


# ----------------------------------------------------------------------------- reductions


def all_reduce_mean(value: float | Tensor) -> float:
    """Mean of a scalar over all ranks, as a Python float (the value itself in a single process).

    A collective: every rank must call it. Use it for logging, not inside the graph.
    """
    tensor = value.detach().reshape(()).double() if isinstance(value, Tensor) else torch.tensor(float(value), dtype=torch.float64)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return float(tensor)
    tensor = tensor.to(_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor) / dist.get_world_size()


def all_reduce_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """Average the ``.grad`` of plain (unsharded) parameters over ranks, in place.

    For trainable weights outside FSDP (decoder LoRA, Mirage's fusion conv): call after
    ``backward()`` and before ``optimizer.step()``; every rank must pass the same parameters in
    the same order. A parameter without a gradient on this rank contributes zeros; one without a
    gradient on every rank keeps ``grad=None`` (so the optimizer skips it, as in one process).
    """
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    params = list(parameters)
    if not params:
        return
    device = _collective_device()
    present = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(present, op=dist.ReduceOp.MAX)
    world = dist.get_world_size()
    for param, anywhere in zip(params, present.tolist()):
        if not anywhere:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- full state dicts


def _options(**kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state_dict(model: nn.Module, *, trainable_only: bool = False) -> dict[str, Tensor]:
    """Full (unsharded) CPU state dict of a model, FSDP-sharded or not.

    With a process group: a collective; rank 0 receives the tensors, the other ranks ``{}``.
    Keys are the model's own parameter names (FSDP adds no prefixes), so the result loads with
    ``model.load_state_dict`` into an unsharded copy, or goes to ``lora.save_adapter(...,
    state_dict=...)``.

    Args:
        trainable_only: keep only parameters with ``requires_grad`` (e.g. LoRA weights); frozen
            base weights are then not gathered at all.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    if not is_sharded(model) and not dist.is_initialized():
        state = model.state_dict()
        if trainable_only:
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            state = {k: v for k, v in state.items() if k in trainable}
        return {k: v.detach().cpu().clone() for k, v in state.items()}
    options = _options(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return _snapshot(get_model_state_dict(model, options=options), _live_tensors(model.parameters(), model.buffers()))


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Full CPU optimizer state (AdamW moments gathered), keyed by parameter names; rank 0 only.

    A collective under a process group. Load it back with :func:`load_full_optimizer_state_dict`
    into an optimizer over the same (re-sharded) parameters, possibly with a different world size.

    .. note:: **Snapshots, not views.** With ``cpu_offload`` on a CPU run, torch returns CPU
       tensors that are already on the CPU as they are, without a copy: AdamW's ``step``
       counters (and unsharded parameters) would alias the live ones, and a checkpoint taken
       before a step, then loaded into a second optimizer, would share (and double-increment)
       the live step counter. Both gathering functions copy such tensors, so what they return
       never changes after the call.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    state = get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))
    live = _live_tensors(model.parameters(), *(group.values() for group in optimizer.state.values()))
    return _snapshot(state, live)


def _live_tensors(*groups: Iterable) -> set[int]:
    """Storage addresses of the tensors a training step will update in place."""
    pointers = set()
    for group in groups:
        for item in group:
            if isinstance(item, Tensor):
                local = item.to_local() if hasattr(item, "to_local") else item
                if local.device.type == "cpu" and local.numel():
                    pointers.add(local.untyped_storage().data_ptr())
    return pointers


def _snapshot(state, live: set[int]):
    """Copy the tensors of ``state`` that alias live ones (see the note in full_optimizer_state_dict)."""
    from torch.utils._pytree import tree_map_only

    def copy_if_live(tensor: Tensor) -> Tensor:
        if tensor.device.type == "cpu" and tensor.numel() and tensor.untyped_storage().data_ptr() in live:
            return tensor.detach().clone()
        return tensor

    return tree_map_only(Tensor, copy_if_live, state)


def load_full_model_state_dict(model: nn.Module, state_dict: dict[str, Tensor], *, strict: bool = True) -> None:
    """Load a full state dict (as from :func:`full_model_state_dict`) into a sharded model.

    Every rank must call it; only rank 0 needs the tensors (others may pass ``{}``): they are
    broadcast from rank 0 and each rank keeps its shard.
    """
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    if not dist.is_initialized():
        model.load_state_dict(state_dict, strict=strict)
        return
    options = _options(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
    set_model_state_dict(model, state_dict, options=options)


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full optimizer state (as from :func:`full_optimizer_state_dict`); a collective."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    options = _options(full_state_dict=True, broadcast_from_rank0=dist.is_initialized())
    set_optimizer_state_dict(model, optimizer, state, options=options)

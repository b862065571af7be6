"""Training checkpoints: one safetensors file holding everything a run needs to continue bit for bit.

A checkpoint is a flat ``{name: tensor}`` map plus a JSON record, in one safetensors file. The
train stage puts in it the trainable weights, the optimizer states (keyed by parameter name, as
``torch.distributed.checkpoint`` gathers them from an FSDP-sharded model), every random-number
generator the run draws from (torch's global CPU and CUDA generators and the run's own named
ones, e.g. the clip sampler), the iteration count and a record of the run (its fingerprint, the loss
history, the seconds spent so far). Restoring all of it makes an interrupted run continue exactly
as the uninterrupted one would have (on CPU, where kernels are deterministic; ``tests/test_train.py``
checks that the final weights are identical).

Written atomically: a temporary file in the same folder, flushed to disk, then renamed over the
previous checkpoint, so a run killed while saving leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from stages.common.video import temp_sibling

__all__ = [
    "flatten_optimizer",
    "load_checkpoint",
    "load_named_optimizer_state",
    "named_optimizer_state",
    "restore_rng",
    "rng_tensors",
    "save_checkpoint",
    "unflatten_optimizer",
]

_KEY = "chopgrad_checkpoint"


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, Tensor], record: dict) -> Path:
    """Write ``tensors`` and the JSON ``record`` to ``path`` atomically; returns the path."""
    from safetensors.torch import save_file

    path = Path(path)
    flat = {name: value.detach().cpu().clone().contiguous() for name, value in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(path, ".safetensors")
    try:
        save_file(flat, str(temp), metadata={_KEY: json.dumps(record)})
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict] | None:
    """``(tensors, record)`` of a checkpoint written by :func:`save_checkpoint`; None when there is no file.

    Raises:
        ValueError: the file exists but is not a chopgrad checkpoint (or is corrupt).
    """
    path = Path(path)
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{path} is not a readable checkpoint ({err}); delete it to start over") from err
    if _KEY not in metadata:
        raise ValueError(f"{path} is not a chopgrad checkpoint (no {_KEY!r} metadata); delete it to start over")
    return tensors, json.loads(metadata[_KEY])


# ----------------------------------------------------------------------------------------------------------
# Optimizer state by parameter name ({"state": {name: {key: tensor}}, "param_groups": [{..., "params": [names]}]})


def named_optimizer_state(optimizer: torch.optim.Optimizer, parameters: dict[str, Tensor]) -> dict:
    """The state of an optimizer over plain (unsharded) parameters, keyed by their names."""
    names = {id(param): name for name, param in parameters.items()}
    state = {names[id(param)]: dict(values) for param, values in optimizer.state.items()}
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [names[id(param)] for param in group["params"]]} for group in optimizer.param_groups]
    return {"state": state, "param_groups": groups}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, parameters: dict[str, Tensor],
                               state: dict) -> None:
    """Inverse of :func:`named_optimizer_state`: put a name-keyed state into ``optimizer``."""
    index = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            index[id(param)] = len(index)
    by_name = {name: index[id(param)] for name, param in parameters.items() if id(param) in index}
    unknown = sorted(set(state["state"]) - set(by_name))
    if unknown:
        raise ValueError(f"optimizer state for unknown parameters {unknown[:3]}: the checkpoint was written by a "
                         "different model configuration")
    groups = [{**group, "params": [by_name[name] for name in group["params"]]} for group in state["param_groups"]]
    optimizer.load_state_dict({"state": {by_name[name]: values for name, values in state["state"].items()},
                               "param_groups": groups})


def flatten_optimizer(prefix: str, state: dict) -> tuple[dict[str, Tensor], list[dict]]:
    """A name-keyed optimizer state as flat tensors ``<prefix><name>/<key>`` and JSON param groups."""
    tensors = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            tensors[f"{prefix}{name}/{key}"] = value if isinstance(value, Tensor) else torch.tensor(value)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in group.items()} for group in state["param_groups"]]
    return tensors, groups


def unflatten_optimizer(prefix: str, tensors: dict[str, Tensor], groups: list[dict]) -> dict:
    """Inverse of :func:`flatten_optimizer`."""
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix):
            name, _, entry = key[len(prefix):].rpartition("/")
            state.setdefault(name, {})[entry] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in group.items()} for group in groups]
    return {"state": state, "param_groups": groups}


# ----------------------------------------------------------------------------------------------------------
# Random-number generators


def rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, Tensor]:
    """The state of torch's global generators (CPU, and this process's CUDA device when in use) and of
    ``generators``. Only the current device: under torchrun each rank has its own, and asking every
    visible device would open a CUDA context on each of them."""
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    for name, generator in generators.items():
        tensors[f"rng/{name}"] = generator.get_state()
    return tensors


def restore_rng(tensors: dict[str, Tensor], generators: dict[str, torch.Generator]) -> None:
    """Inverse of :func:`rng_tensors`."""
    missing = [name for name in generators if f"rng/{name}" not in tensors]
    if missing:
        raise ValueError(f"the checkpoint holds no state for the generator(s) {missing}")
    torch.set_rng_state(tensors["rng/torch"])
    if torch.cuda.is_available() and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    for name, generator in generators.items():
        generator.set_state(tensors[f"rng/{name}"])

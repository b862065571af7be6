"""Time and memory of ``decode_loss(...).backward()`` against ``d_trunc`` and video length.

Paper section 3.3 (figure 6: linear in ``d_trunc``; memory constant in video length) and
supplement figure 13 (against full backpropagation, dashed). Each configuration runs once under
:class:`chopgrad.memory.SavedTensorMeter` (which is also the warm-up), then ``repeats`` timed
times (the median is reported):

* ``saved_peak_bytes``: the peak bytes autograd holds for backward. Deterministic, so it is the
  memory measure used on CPU, where resident memory is noisy (the standalone benchmark
  :mod:`chopgrad.bench` measures resident memory in fresh processes instead). It counts what the
  truncation changes (saved activations), not parameters, inputs or allocator slack.
* ``seconds`` (wall) and ``cpu_seconds`` (CPU time of this process, all threads): on a shared CPU
  machine the wall time includes waiting for other processes; the CPU time does not.
* ``cuda_peak_bytes`` (CUDA only): ``torch.cuda.max_memory_allocated`` above what was allocated
  before the call, from the timed run.

Latents and targets are seeded random tensors: time and memory do not depend on their values.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from chopgrad.adapters import wrap_decoder
from chopgrad.engine import decode_loss
from chopgrad.memory import SavedTensorMeter
from chopgrad.protocol import num_frames

__all__ = ["measure_resources"]


def _mse(pred: Tensor, target: Tensor) -> Tensor:
    return torch.nn.functional.mse_loss(pred, target)


def _one(decoder, latents: Tensor, target: Tensor, loss_fn, d_trunc: int | None, repeats: int) -> dict:
    def call() -> None:
        leaf = latents.detach().requires_grad_(True)
        decode_loss(decoder, leaf, target, loss_fn, d_trunc=d_trunc).backward()

    cuda = latents.device.type == "cuda"
    with SavedTensorMeter() as meter:  # also the warm-up of the timed runs (allocator, kernels, lazy init)
        call()
    seconds, cpu_seconds, cuda_peak = [], [], None
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        start, cpu_start = time.perf_counter(), time.process_time()
        call()
        if cuda:
            torch.cuda.synchronize()
            cuda_peak = torch.cuda.max_memory_allocated() - before
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - cpu_start)
    return {"seconds": statistics.median(seconds), "cpu_seconds": statistics.median(cpu_seconds),
            "saved_peak_bytes": int(meter.peak_bytes), "cuda_peak_bytes": cuda_peak}


def measure_resources(
    decoder: Any,
    latent_size: tuple[int, int],  # (h, w) latent pixels
    d_truncs: Sequence[int],
    latent_frames: Sequence[int],
    *,
    reference_frames: int | None = None,
    length_d_truncs: Sequence[int] | None = None,
    full: bool = True,
    repeats: int = 1,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Measure ChopGrad at every ``d_trunc`` and every video length (and full backprop).

    Runs two sweeps: every ``d_trunc`` at ``reference_frames`` latent frames (default: the longest
    of ``latent_frames``), and every length of ``latent_frames`` at every ``length_d_truncs``
    (default: ``d_truncs``). With ``full``, plain backpropagation (``d_trunc=None``) is measured at
    every length too.

    Args:
        decoder: a :class:`~chopgrad.CausalDecoder` or supported diffusers VAE; its parameters'
            device and dtype are used for the latents.
        latent_size: ``(h, w)`` of the latents.
        d_truncs: truncation distances (integers >= 0).
        latent_frames: video lengths, in latent frames.
        repeats: timed runs per configuration (the median is reported).
        loss_fn: pixel loss (default: MSE).

    Returns:
        Rows ``{"mode": "chopgrad" | "full", "d_trunc", "latent_frames", "frames", "height", "width",
        "seconds", "cpu_seconds", "saved_peak_bytes", "cuda_peak_bytes"}``, one per distinct configuration.
    """
    from tqdm.auto import tqdm

    decoder = wrap_decoder(decoder)
    length_d_truncs = list(d_truncs if length_d_truncs is None else length_d_truncs)
    for d in [*d_truncs, *length_d_truncs]:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise ValueError(f"every d_trunc must be an integer >= 0, got {d!r}")
    if not latent_frames or any(not isinstance(t, int) or t < 1 for t in latent_frames):
        raise ValueError(f"latent_frames must be positive integers, got {list(latent_frames)!r}")
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    reference = max(latent_frames) if reference_frames is None else reference_frames
    configs = [(d, reference) for d in d_truncs] + [(d, t) for t in latent_frames for d in length_d_truncs]
    if full:
        configs += [(None, t) for t in sorted(set(latent_frames) | {reference})]
    configs = list(dict.fromkeys(configs))  # distinct, in order

    param = next(iter(decoder.parameters()), None)
    device, dtype = (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)
    scale = decoder.spatial_scale
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for d, t in tqdm(configs, desc="resources", unit="config", disable=not progress):
        frames = num_frames(decoder, t)
        shape = (1, decoder.latent_channels, t, *latent_size)
        latents = torch.randn(shape, generator=generator).to(device, dtype)
        target = (torch.rand(1, decoder.out_channels, frames, latent_size[0] * scale,
                             latent_size[1] * scale, generator=generator) * 2 - 1).to(device, dtype)
        row = {"mode": "full" if d is None else "chopgrad", "d_trunc": d, "latent_frames": t, "frames": frames,
               "height": latent_size[0] * scale, "width": latent_size[1] * scale}
        row.update(_one(decoder, latents, target, loss_fn or _mse, d, repeats))
        rows.append(row)
    return rows

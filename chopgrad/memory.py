"""Deterministic memory accounting: bytes that autograd holds for backward.

Resident memory and allocator statistics are noisy on CPU. :class:`SavedTensorMeter` counts,
through ``torch.autograd.graph.saved_tensors_hooks``, the bytes of every tensor saved for
backward while they are alive, and records the peak. It is what the tests use to check that
ChopGrad's memory does not grow with the number of frames.
"""

from __future__ import annotations

import torch

__all__ = ["SavedTensorMeter"]


class SavedTensorMeter:
    """Context manager tracking live and peak bytes of tensors saved for backward.

    A tensor saved by several autograd nodes is counted once per save (an upper bound, and the
    same bound for the same computation, which is what a comparison needs).

    Example::

        with SavedTensorMeter() as meter:
            chopgrad.decode_loss(decoder, latents, target, loss_fn, d_trunc=1)
        print(meter.peak_bytes)
    """

    def __init__(self) -> None:
        self.live_bytes = 0
        self.peak_bytes = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, tensor: torch.Tensor) -> _Saved:
        return _Saved(self, tensor)

    @staticmethod
    def _unpack(saved: _Saved) -> torch.Tensor:
        return saved.tensor

    def __enter__(self) -> SavedTensorMeter:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class _Saved:
    __slots__ = ("meter", "nbytes", "tensor")

    def __init__(self, meter: SavedTensorMeter, tensor: torch.Tensor) -> None:
        # A detached alias: holding a saved *output* with its grad_fn would form a reference
        # cycle through the autograd node and keep retained graphs alive.
        self.meter, self.tensor = meter, tensor.detach()
        self.nbytes = tensor.numel() * tensor.element_size()
        meter.live_bytes += self.nbytes
        meter.peak_bytes = max(meter.peak_bytes, meter.live_bytes)

    def __del__(self) -> None:
        self.meter.live_bytes -= self.nbytes

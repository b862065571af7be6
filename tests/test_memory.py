"""Memory held for backward does not grow with the number of frames (counted deterministically)."""

from __future__ import annotations

import pytest
import torch

import chopgrad
from chopgrad.memory import SavedTensorMeter
from conftest import mse


def _peak(vae, latent_frames, **kwargs):
    decoder = chopgrad.wrap_decoder(vae)
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(1, decoder.latent_channels, latent_frames, 4, 4, generator=generator, dtype=torch.float64)
    target = torch.zeros(1, 3, chopgrad.num_frames(decoder, latent_frames), 32, 32, dtype=torch.float64)
    z.requires_grad_(True)
    with SavedTensorMeter() as meter:
        loss = chopgrad.decode_loss(decoder, z, target, mse, **kwargs)
    loss.backward()
    assert meter.live_bytes == 0  # every step graph was released
    return meter.peak_bytes


@pytest.mark.parametrize("d_trunc", [0, 1, 2])
def test_chopgrad_peak_is_flat_in_video_length(wan21, d_trunc):
    # From 6 latent frames on, the window of d_trunc + 1 steps no longer holds the small first step.
    short, long = _peak(wan21, 6, d_trunc=d_trunc), _peak(wan21, 10, d_trunc=d_trunc)
    assert long == short


def test_chopgrad_peak_grows_with_d_trunc_and_full_backprop_with_length(wan21):
    peaks = [_peak(wan21, 6, d_trunc=d) for d in (0, 1, 2)]
    assert peaks[0] < peaks[1] < peaks[2]
    full_short, full_long = _peak(wan21, 4, d_trunc=None), _peak(wan21, 8, d_trunc=None)
    assert full_long > 2 * full_short


def test_recompute_holds_one_step(wan21):
    long = _peak(wan21, 8, d_trunc=None, recompute=True)
    assert long == _peak(wan21, 4, d_trunc=None, recompute=True)
    assert long < _peak(wan21, 8, d_trunc=None) / 3

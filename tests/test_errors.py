"""Every bad input a user can plausibly give: a clear error naming the problem, before any work."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import chopgrad
from conftest import mse


@pytest.fixture()
def setup(cogvideox):
    decoder = chopgrad.wrap_decoder(cogvideox)
    z = torch.randn(1, 4, 4, 4, 4, dtype=torch.float64)
    target = torch.zeros(1, 3, chopgrad.num_frames(decoder, 4), 32, 32, dtype=torch.float64)
    return decoder, z, target


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda z, t: (z[:, :3], t), "latents have 3 channels but the decoder expects 4"),
        (lambda z, t: (z[0], t), r"latents must be a tensor \[B, C, t, h, w\]"),
        (lambda z, t: (z.long(), t), "floating-point"),
        (lambda z, t: (z.index_fill(2, torch.tensor([1]), float("nan")), t), "NaN or Inf"),
        (lambda z, t: (z.index_fill(2, torch.tensor([0]), float("inf")), t), "NaN or Inf"),
        (lambda z, t: (z, t[:, :, :-1]), "target has shape"),
        (lambda z, t: (z, t[..., :16]), "target has shape"),
        (lambda z, t: (z, t + 200), r"target values span \[200, 200\] but the decoder outputs \[-1, 1\]"),
        (lambda z, t: (z, t.index_fill(2, torch.tensor([0]), float("nan"))), "target contains NaN"),
        (lambda z, t: (z[:0], t[:0]), r"latents of shape \(0, 4, 4, 4, 4\) have batch size 0: there is nothing to decode"),
        (lambda z, t: (z.float(), t.float()),
         r"latents are torch.float32 but the decoder's parameters are torch.float64: cast the latents \(latents.to\(torch.float64\)\) or the VAE"),
        (lambda z, t: (z, t.float()), r"target is torch.float32 but the latents are torch.float64 .*target.to\(torch.float64\)"),
    ],
)
def test_bad_tensors(setup, change, message):
    decoder, z, target = setup
    z, target = change(z, target)
    with pytest.raises((ValueError, TypeError), match=message):
        chopgrad.decode_loss(decoder, z, target, mse)


@pytest.mark.parametrize("d_trunc", [-1, 1.5, "1", True, np.True_, np.int64(-1), torch.tensor(1)])
def test_bad_d_trunc(setup, d_trunc):
    decoder, z, target = setup
    with pytest.raises(ValueError, match="d_trunc must be an integer >= 0 or None"):
        chopgrad.decode_loss(decoder, z, target, mse, d_trunc=d_trunc)


def test_numpy_integers_are_integers(setup):
    decoder, z, target = setup
    grads = []
    for kwargs in ({"d_trunc": 1, "release_every": 2}, {"d_trunc": np.int64(1), "release_every": np.int32(2)}):
        leaf = z.clone().requires_grad_(True)
        chopgrad.decode_loss(decoder, leaf, target, mse, tiles=(np.int64(2), 1), halo=np.int64(1), **kwargs).backward()
        grads.append(leaf.grad)
    assert torch.equal(*grads)


@pytest.mark.parametrize(
    "loss_fn,message",
    [
        (lambda p, t: mse(p, t).detach(), r"does not depend on its first argument \(the decoded frames; it does not require grad\)"),
        (lambda p, t: torch.tensor(mse(p, t).detach().item(), dtype=p.dtype), "does not depend on its first argument"),
        (lambda p, t: _WEIGHT * mse(t, torch.zeros_like(t)), r"\(the decoded frames; it depends only on other tensors\)"),
    ],
)
def test_a_loss_that_ignores_the_prediction(setup, loss_fn, message):
    decoder, z, target = setup
    for kwargs in ({"d_trunc": 1}, {"d_trunc": None}, {"d_trunc": 1, "recompute": True}):
        with pytest.raises(ValueError, match=message + ".*compute the loss from pred with differentiable torch operations"):
            chopgrad.decode_loss(decoder, z.requires_grad_(True), target, loss_fn, **kwargs)
    with torch.no_grad():  # no gradient wanted: nothing to refuse
        chopgrad.decode_loss(decoder, z, target, loss_fn)


_WEIGHT = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)


@pytest.mark.parametrize("tiles,message", [((5, 1), "too many for a 4x4 latent: use at most 4 rows and 4 cols"), ((0, 1), "two positive"), (2, "two positive")])
def test_bad_tiles(setup, tiles, message):
    decoder, z, target = setup
    with pytest.raises(ValueError, match=message):
        chopgrad.decode_loss(decoder, z, target, mse, tiles=tiles)


def test_bad_halo_loss_and_recompute_flag(setup):
    decoder, z, target = setup
    with pytest.raises(ValueError, match="halo must be an integer >= 0"):
        chopgrad.decode_loss(decoder, z, target, mse, halo=-1)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        chopgrad.decode_loss(decoder, z, target, "mse")
    with pytest.raises(TypeError, match="recompute"):
        chopgrad.decode_loss(decoder, z, target, mse, d_trunc=1, recompute="yes")
    with pytest.raises(ValueError, match="must return a scalar"):
        chopgrad.decode_loss(decoder, z, target, lambda a, b: (a - b) ** 2)


def test_frame_count_the_decoder_cannot_produce(wan21, cogvideox):
    wan = chopgrad.wrap_decoder(wan21)
    assert chopgrad.num_latent_frames(wan, 81) == 21
    with pytest.raises(ValueError, match="cannot produce 80 frames: the nearest frame counts it decodes to are 77 or 81"):
        chopgrad.num_latent_frames(wan, 80)
    cog = chopgrad.wrap_decoder(cogvideox)
    assert chopgrad.num_latent_frames(cog, 49) == 13
    assert chopgrad.num_latent_frames(cog, 48) == 12  # an even latent count decodes to 4 t frames
    with pytest.raises(ValueError, match="cannot produce 47 frames: the nearest frame counts it decodes to are 41 or 48"):
        chopgrad.num_latent_frames(cog, 47)


def test_unsupported_decoder_type():
    with pytest.raises(TypeError, match="cannot drive a decoder of type Conv3d: pass a diffusers AutoencoderKLWan"):
        chopgrad.wrap_decoder(torch.nn.Conv3d(1, 1, 1))


def test_library_does_not_import_pipeline_tooling():
    code = (
        "import sys, chopgrad, chopgrad.bench, chopgrad.memory\n"
        "bad = [m for m in ('prefect', 'dvc', 'mlflow', 'yaml') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

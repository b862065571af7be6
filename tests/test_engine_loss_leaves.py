"""Leaves that ``loss_fn`` reaches (a discriminator, learnable loss weights, a target that requires
grad) get the gradient plain autograd gives them, in every mode; judged by plain autograd through
``vae.decode`` and by the brute-force oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import chopgrad
from oracle import truncated_oracle


class LearnedLoss(nn.Module):
    """A pixel loss with leaves of its own: a tiny discriminator and two learnable weights."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        torch.manual_seed(2)
        self.disc = nn.Conv3d(3, 2, (1, 3, 3)).to(dtype)
        self.weights = nn.Parameter(torch.tensor([0.2, 0.7], dtype=dtype))
        self.calls = 0

    def forward(self, pred, target):  # [B, 3, T_s, H, W] x 2 -> scalar
        self.calls += 1
        pixel = ((pred - target) ** 2).mean()
        realness = torch.tanh(self.disc(target)).mean() - torch.tanh(self.disc(pred)).mean()
        return self.weights[0].exp() * pixel + self.weights[1] * realness


def _setup(decoder, latent_frames, h=2, w=2, seed=0):
    """Latents, and a target in [-1, 1] that requires grad (a leaf)."""
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(1, decoder.latent_channels, latent_frames, h, w, generator=generator, dtype=torch.float64)
    frames = chopgrad.num_frames(decoder, latent_frames)
    target = torch.rand(1, 3, frames, h * decoder.spatial_scale, w * decoder.spatial_scale, generator=generator,
                        dtype=torch.float64)
    return z, (target * 1.8 - 0.9).requires_grad_(True)


def _grads(leaves):
    grads = [leaf.grad if leaf.grad is not None else torch.zeros_like(leaf) for leaf in leaves]
    for leaf in leaves:
        leaf.grad = None
    return torch.cat([g.flatten() for g in grads])


def _engine(decoder, z, target, loss, leaves, **kwargs):
    """decode_loss's value and the gradients of the latents and ``leaves``, flattened."""
    latents = z.clone().requires_grad_(True)
    value = chopgrad.decode_loss(decoder, latents, target, loss, **kwargs)
    value.backward()
    return float(value.detach()), latents.grad, _grads(leaves)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _loss_leaves(loss, target):
    return [*loss.parameters(), target]


@pytest.mark.parametrize("name,t", [("wan21", 4), ("cogvideox", 5)])
def test_loss_leaves_get_plain_autograd_gradients_in_every_mode(request, name, t):
    vae = request.getfixturevalue(name)
    decoder = chopgrad.wrap_decoder(vae)
    loss = LearnedLoss()
    z, target = _setup(decoder, t, h=4, w=4)
    leaves = _loss_leaves(loss, target)
    latents = z.clone().requires_grad_(True)
    pred = vae.decode(latents).sample
    assert pred.abs().max() < 1, "fixture must stay inside Wan's clamp for this comparison"
    plan = chopgrad.step_frames(decoder, t)
    reference = sum((s.stop - s.start) / plan[-1][1].stop * loss(pred[:, :, s], target[:, :, s]) for _, s in plan)
    reference.backward()
    z_reference, leaf_reference = latents.grad, _grads(leaves)
    steps = len(plan)
    for kwargs in (
        {"d_trunc": None}, {"d_trunc": None, "recompute": True}, {"d_trunc": steps - 1},
        {"d_trunc": 0}, {"d_trunc": 1, "release_every": 2}, {"d_trunc": 1, "recompute": True},
    ):
        value, z_grad, leaf_grads = _engine(decoder, z, target, loss, leaves, **kwargs)
        assert value == pytest.approx(float(reference.detach()), rel=1e-12)
        # The loss side is never behind the cache: truncation does not change its leaves' gradients.
        assert _rel(leaf_grads, leaf_reference) < 1e-12, kwargs
        if kwargs["d_trunc"] is None:
            assert _rel(z_grad, z_reference) < 1e-12, kwargs
        elif kwargs["d_trunc"] >= steps - 1:
            assert _rel(z_grad, z_reference) < 1e-6, kwargs  # WanUpsample computes in float32


ORACLE_TOL = {"wan21": 1e-6, "cogvideox": 1e-10}


@pytest.mark.parametrize("name,t", [("wan21", 5), ("cogvideox", 8)])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"d_trunc": 0},
        {"d_trunc": 1},
        {"d_trunc": 1, "recompute": True},
        {"d_trunc": 1, "release_every": 2, "recompute": True},
        {"d_trunc": 0, "release_every": 3},
        pytest.param({"d_trunc": 1, "tiles": (2, 2), "halo": 1}, marks=pytest.mark.slow),
        pytest.param({"d_trunc": 2, "release_every": 2, "recompute": True, "tiles": (2, 2), "halo": 1},
                     marks=pytest.mark.slow),
    ],
)
def test_every_leaf_matches_the_oracle(request, name, t, kwargs):
    decoder = chopgrad.wrap_decoder(request.getfixturevalue(name))
    params = list(decoder.parameters())
    loss = LearnedLoss()
    z, target = _setup(decoder, t, h=4, w=4, seed=t)
    leaves = params + _loss_leaves(loss, target)
    try:
        for p in params:
            p.requires_grad_(True)
        value, z_grad, leaf_grads = _engine(decoder, z, target, loss, leaves, **kwargs)
        oracle_kwargs = {k: v for k, v in kwargs.items() if k != "recompute"}
        ref_value, ref_z, ref_leaves = truncated_oracle(decoder, z, target, loss, params=leaves, **oracle_kwargs)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    assert value == pytest.approx(ref_value, rel=1e-12)
    assert _rel(z_grad, ref_z) < ORACLE_TOL[name]
    assert _rel(leaf_grads[: -target.numel()], torch.cat([g.flatten() for g in ref_leaves[:-1]])) < ORACLE_TOL[name]
    assert _rel(leaf_grads[-target.numel() :], ref_leaves[-1].flatten()) < 1e-12  # the target: loss side only


@pytest.mark.parametrize(
    "kwargs",
    [{"d_trunc": None}, {"d_trunc": 1}, {"d_trunc": 0, "release_every": 3}, {"d_trunc": 2, "recompute": True},
     {"d_trunc": None, "recompute": True, "tiles": (2, 1)}],
)
def test_loss_fn_runs_once_per_step_and_tile(cogvideox, kwargs):
    # Replays (recompute) rebuild a step's graph but take its term's gradient from the window:
    # the loss side, and so its leaves' gradient, is computed once per term.
    decoder = chopgrad.wrap_decoder(cogvideox)
    loss = LearnedLoss()
    z, target = _setup(decoder, 8)
    _engine(decoder, z, target, loss, _loss_leaves(loss, target), **kwargs)
    tiles = kwargs.get("tiles", (1, 1))
    assert loss.calls == len(decoder.step_sizes(8)) * tiles[0] * tiles[1]


def test_shared_non_leaf_tensors_reach_their_leaves(cogvideox):
    # A loss weight and a target computed once, outside loss_fn: every step's term crosses the
    # same graph, whose leaves get the summed gradient; the graph stays usable afterwards.
    decoder = chopgrad.wrap_decoder(cogvideox)
    loss = LearnedLoss()
    z, base = _setup(decoder, 6)
    raw = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    leaves = [raw, base, *loss.parameters()]

    def grads(pixel_loss):
        weight, target = nn.functional.softplus(raw), 0.9 * base
        (pixel_loss(lambda p, t: weight * loss(p, t), target) + weight).backward()
        return _grads(leaves)

    latents = z.clone().requires_grad_(True)
    got = grads(lambda fn, target: chopgrad.decode_loss(decoder, latents, target, fn, d_trunc=1, recompute=True))
    assert _rel(got, grads(lambda fn, target: _stepwise_loss(decoder, z, target, fn))) < 1e-12


def _stepwise_loss(decoder, z, target, loss_fn):
    """decode_loss's value by plain autograd, the frames held constant (the loss side only)."""
    with torch.no_grad():
        pred = chopgrad.decode(decoder, z, clamp=False)
    plan = chopgrad.step_frames(decoder, z.shape[2])
    return sum((s.stop - s.start) / plan[-1][1].stop * loss_fn(pred[:, :, s], target[:, :, s]) for _, s in plan)


def test_a_discriminator_step_on_a_frozen_decoder(wan21):
    # Nothing on the decoder side takes grad (the GAN discriminator's turn): no step graph is
    # built, and the discriminator still gets plain autograd's gradient.
    decoder = chopgrad.wrap_decoder(wan21)
    loss = LearnedLoss()
    z, target = _setup(decoder, 3)
    leaves = _loss_leaves(loss, target)
    value = chopgrad.decode_loss(decoder, z, target, loss, d_trunc=1, tiles=(2, 1), halo=1)
    value.backward()
    got = _grads(leaves)
    _, _, want = truncated_oracle(decoder, z, target, loss, 1, params=leaves, tiles=(2, 1), halo=1)
    assert _rel(got, torch.cat([g.flatten() for g in want])) < 1e-12
    with torch.no_grad():
        assert not chopgrad.decode_loss(decoder, z, target, loss, d_trunc=1).requires_grad


def test_a_loss_that_reaches_a_decoder_parameter_directly(cogvideox):
    # Weight decay inside loss_fn: the parameter gets its truncated gradient through the frames
    # plus the direct one, as in the oracle (which backpropagates each term by plain autograd).
    decoder = chopgrad.wrap_decoder(cogvideox)
    weight = cogvideox.decoder.conv_out.conv.weight
    z, target = _setup(decoder, 6)

    def loss(pred, target):
        return ((pred - target) ** 2).mean() + 0.1 * (weight**2).sum()

    try:
        weight.requires_grad_(True)
        _, z_grad, got = _engine(decoder, z, target.detach(), loss, [weight], d_trunc=1)
        _, ref_z, (want,) = truncated_oracle(decoder, z, target.detach(), loss, 1, params=[weight])
    finally:
        weight.requires_grad_(False)
        weight.grad = None
    assert _rel(z_grad, ref_z) < 1e-10 and _rel(got, want.flatten()) < 1e-10

"""The engine against independent references: plain autograd through vae.decode and the brute-force oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import chopgrad
from conftest import make_cogvideox, mse
from oracle import truncated_oracle


def _inputs(decoder, latent_frames, h=4, w=6, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, decoder.latent_channels, latent_frames, h, w, generator=generator, dtype=torch.float64)
    shape = (batch, 3, chopgrad.num_frames(decoder, latent_frames), h * decoder.spatial_scale, w * decoder.spatial_scale)
    target = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1
    return z, target


def _engine_grad(decoder, z, target, **kwargs):
    leaf = z.clone().requires_grad_(True)
    loss = chopgrad.decode_loss(decoder, leaf, target, mse, **kwargs)
    loss.backward()
    return float(loss.detach()), leaf.grad


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# Engine against oracle. The engine sums the adjoints of terms that share a truncation point before
# they cross a step (blocks, and the first d_trunc + 1 terms: delayed eviction); the oracle
# backpropagates term by term. Wan's float32 upsampling (WanUpsample) rounds the two orders
# differently; CogVideoX and the toy decoders compute in float64 throughout.
ORACLE_TOL = {"wan21": 1e-6, "wan22": 1e-6, "cogvideox": 1e-10}


@pytest.mark.parametrize("name,t", [("wan21", 4), ("wan22", 3), ("cogvideox", 5), ("cogvideox", 6)])
def test_forward_parity_with_diffusers(request, name, t):
    vae = request.getfixturevalue(name)
    z, _ = _inputs(chopgrad.wrap_decoder(vae), t, batch=2)
    expected = vae.decode(z).sample
    got = chopgrad.decode(vae, z)
    assert got.shape == expected.shape
    assert torch.equal(got, expected)


def test_wan_decode_keeps_the_clamp():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=8, z_dim=16).double().eval()  # unscaled: its output saturates
    z, _ = _inputs(chopgrad.wrap_decoder(vae), 2)
    raw = chopgrad.decode(vae, z, clamp=False)
    assert raw.abs().max() > 1
    assert torch.equal(chopgrad.decode(vae, z), vae.decode(z).sample)
    assert torch.equal(chopgrad.decode(vae, z), raw.clamp(-1, 1))


@pytest.mark.parametrize("name,t,tol", [("wan21", 4, 1e-6), ("wan22", 3, 1e-6), ("cogvideox", 5, 1e-10), ("cogvideox", 4, 1e-10)])
def test_full_and_covering_truncation_equal_plain_autograd(request, name, t, tol):
    vae = request.getfixturevalue(name)
    decoder = chopgrad.wrap_decoder(vae)
    z, target = _inputs(decoder, t)
    leaf = z.clone().requires_grad_(True)
    pred = vae.decode(leaf).sample
    assert pred.abs().max() < 1, "fixture must stay inside the clamp for this comparison"
    reference = torch.autograd.grad(mse(pred, target), leaf)[0]
    steps = len(decoder.step_sizes(t))
    for kwargs in ({"d_trunc": None}, {"d_trunc": None, "recompute": True}, {"d_trunc": steps - 1}, {"d_trunc": steps + 3}):
        value, grad = _engine_grad(decoder, z, target, **kwargs)
        assert value == pytest.approx(float(mse(pred, target)), rel=1e-12)
        exact_modes = kwargs["d_trunc"] is None
        assert _rel(grad, reference) <= (1e-12 if exact_modes else tol), kwargs


@pytest.mark.parametrize("name,t", [("wan21", 4), ("wan22", 4), ("cogvideox", 5), ("cogvideox", 6)])
@pytest.mark.parametrize("d_trunc", [0, 1, 2])
def test_truncated_matches_brute_force_oracle(request, name, t, d_trunc):
    decoder = chopgrad.wrap_decoder(request.getfixturevalue(name))
    z, target = _inputs(decoder, t, seed=d_trunc)
    value, grad = _engine_grad(decoder, z, target, d_trunc=d_trunc)
    ref_value, ref_grad, _ = truncated_oracle(decoder, z, target, mse, d_trunc)
    assert value == pytest.approx(ref_value, rel=1e-12)
    assert _rel(grad, ref_grad) < (1e-10 if d_trunc == 0 else ORACLE_TOL[name])
    # recompute=True replays the same steps and sweeps them in the same order: the same numbers.
    replayed_value, replayed_grad = _engine_grad(decoder, z, target, d_trunc=d_trunc, recompute=True)
    assert replayed_value == value and torch.equal(replayed_grad, grad)


@settings(max_examples=8, deadline=None)
@given(t=st.integers(1, 7), d_trunc=st.integers(0, 4), seed=st.integers(0, 100))
def test_truncation_property_cogvideox(t, d_trunc, seed):
    decoder = chopgrad.wrap_decoder(_COG)
    z, target = _inputs(decoder, t, h=2, w=2, seed=seed)
    value, grad = _engine_grad(decoder, z, target, d_trunc=d_trunc)
    ref_value, ref_grad, _ = truncated_oracle(decoder, z, target, mse, d_trunc)
    assert value == pytest.approx(ref_value, rel=1e-12)
    assert _rel(grad, ref_grad) < 1e-10


_COG = make_cogvideox()


def test_d_trunc_zero_keeps_later_terms_off_earlier_latents(wan21):
    decoder = chopgrad.wrap_decoder(wan21)
    z, _ = _inputs(decoder, 4)
    with torch.no_grad():
        target = chopgrad.decode(decoder, z, clamp=False)
    target[:, :, -4:] += 0.1  # only the last step's term has a non-zero gradient
    _, grad0 = _engine_grad(decoder, z, target, d_trunc=0)
    assert torch.count_nonzero(grad0[:, :, :3]) == 0
    assert torch.count_nonzero(grad0[:, :, 3]) > 0
    _, grad1 = _engine_grad(decoder, z, target, d_trunc=1)
    assert torch.count_nonzero(grad1[:, :, :2]) == 0
    assert torch.count_nonzero(grad1[:, :, 2]) > 0


@pytest.mark.parametrize("name,t", [("wan21", 3), ("cogvideox", 5)])
@pytest.mark.parametrize("d_trunc", [0, 1, None])
def test_decoder_parameter_gradients_match_oracle(request, name, t, d_trunc):
    vae = request.getfixturevalue(name)
    decoder = chopgrad.wrap_decoder(vae)
    params = list(decoder.parameters())
    z, target = _inputs(decoder, t)
    try:
        for p in params:
            p.requires_grad_(True)
            p.grad = None
        leaf = z.clone().requires_grad_(True)
        chopgrad.decode_loss(decoder, leaf, target, mse, d_trunc=d_trunc).backward()
        _, ref_grad, ref_params = truncated_oracle(decoder, z, target, mse, d_trunc, params)
        tol = 1e-10 if d_trunc == 0 else ORACLE_TOL[name]  # full backprop sums all terms in one backward
        assert _rel(leaf.grad, ref_grad) < tol
        got = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        want = torch.cat([g.flatten() for g in ref_params])
        assert _rel(got, want) < tol
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


def test_returned_scalar_composes_with_other_losses(cogvideox):
    decoder = chopgrad.wrap_decoder(cogvideox)
    z, target = _inputs(decoder, 4)
    _, alone = _engine_grad(decoder, z, target, d_trunc=1)
    leaf = z.clone().requires_grad_(True)
    backbone_out = leaf * 1.0  # stands for a backbone producing the latents
    loss = 3.0 * chopgrad.decode_loss(decoder, backbone_out, target, mse, d_trunc=1) + (leaf**2).sum()
    loss.backward()
    assert _rel(leaf.grad, 3.0 * alone + 2 * z) < 1e-12


def test_no_grad_returns_the_value_only(cogvideox):
    decoder = chopgrad.wrap_decoder(cogvideox)
    z, target = _inputs(decoder, 4)
    with torch.no_grad():
        value = chopgrad.decode_loss(decoder, z, target, mse)
    assert not value.requires_grad
    assert float(value) == pytest.approx(float(mse(cogvideox.decode(z).sample, target)), rel=1e-12)


def test_tiles_with_covering_halo_equal_untiled(wan21):
    decoder = chopgrad.wrap_decoder(wan21)
    z, target = _inputs(decoder, 3, h=4, w=4)
    value, grad = _engine_grad(decoder, z, target, d_trunc=1)
    # A halo as large as the latent makes every tile see all of it: only the crop differs.
    tiled_value, tiled_grad = _engine_grad(decoder, z, target, d_trunc=1, tiles=(2, 2), halo=4)
    assert tiled_value == pytest.approx(value, rel=1e-12)
    assert _rel(tiled_grad, grad) < 1e-6  # WanUpsample computes in float32
    assert torch.equal(chopgrad.decode(decoder, z, tiles=(2, 2), halo=4), chopgrad.decode(decoder, z))


@pytest.mark.parametrize("tiles", [(4, 4), pytest.param((2, 2), marks=pytest.mark.slow), (3, 2)])
def test_tiles_that_do_not_divide_the_latent_equal_untiled_with_a_covering_halo(wan21, tiles):
    """The paper's 4x4 tiles on a latent they do not divide (90 rows at 720x1280): uneven spans."""
    decoder = chopgrad.wrap_decoder(wan21)
    z, target = _inputs(decoder, 1, h=5, w=7, seed=2)  # spatial only: the tiled oracle test covers time
    value, grad = _engine_grad(decoder, z, target, d_trunc=1)
    tiled_value, tiled_grad = _engine_grad(decoder, z, target, d_trunc=1, tiles=tiles, halo=7)
    assert tiled_value == pytest.approx(value, rel=1e-12)
    assert _rel(tiled_grad, grad) < 1e-6  # WanUpsample computes in float32
    assert torch.equal(chopgrad.decode(decoder, z, tiles=tiles, halo=7), chopgrad.decode(decoder, z))


def test_tiles_without_halo_change_the_forward_a_little(wan21):
    decoder = chopgrad.wrap_decoder(wan21)
    z, _ = _inputs(decoder, 2, h=4, w=6)
    full = chopgrad.decode(decoder, z)
    tiled = chopgrad.decode(decoder, z, tiles=(2, 2), halo=0)
    assert tiled.shape == full.shape
    assert 0 < float((tiled - full).abs().max())


class ToyCausalDecoder:
    """A user's own decoder: a recurrent 1x1 conv whose cache is last step's hidden state."""

    latent_channels, spatial_scale, output_range, clamp_output, out_channels = 2, 1, (-1.0, 1.0), False, 3

    def __init__(self):
        torch.manual_seed(1)
        self.inp = torch.nn.Conv3d(2, 4, 1).double()
        self.rec = torch.nn.Conv3d(4, 4, 1).double()
        self.out = torch.nn.Conv3d(4, 3, 1).double()

    def step_sizes(self, latent_frames):
        return [1] * latent_frames

    def frames_out(self, step_index, step_size):
        return step_size

    def init_cache(self, tile=None):
        return {"hidden": None}  # pointwise: where the tile lies does not matter

    def step(self, latents, cache):
        hidden = self.inp(latents)
        if cache["hidden"] is not None:
            hidden = hidden + self.rec(cache["hidden"])
        hidden = torch.tanh(hidden)
        return 0.5 * torch.tanh(self.out(hidden)), {"hidden": hidden}

    def parameters(self):
        return [*self.inp.parameters(), *self.rec.parameters(), *self.out.parameters()]


@pytest.mark.parametrize("d_trunc", [0, 1, 3, None])
def test_a_users_own_decoder(d_trunc):
    decoder = ToyCausalDecoder()
    assert chopgrad.wrap_decoder(decoder) is decoder
    z, target = _inputs(decoder, 6, h=3, w=3)
    value, grad = _engine_grad(decoder, z, target, d_trunc=d_trunc)
    ref_value, ref_grad, _ = truncated_oracle(decoder, z, target, mse, d_trunc)
    assert value == pytest.approx(ref_value, rel=1e-12)
    assert _rel(grad, ref_grad) < 1e-12


class PositionalDecoder(ToyCausalDecoder):
    """The toy plus a bias that depends on where each latent pixel lies in the whole frame.

    Pointwise, so a tile's interior decodes as in the untiled frame whatever the halo, but only if
    the decoder is told which tile it decodes: without it, every tile would get the bias of the
    frame's top-left corner.
    """

    def __init__(self):
        super().__init__()
        self.tiles_seen = []

    def init_cache(self, tile=None):
        self.tiles_seen.append(tile)
        return {"hidden": None, "tile": tile}

    def step(self, latents, cache):
        frames, after = super().step(latents, cache)
        height, width = latents.shape[-2:]
        tile = cache["tile"] or chopgrad.Tile(slice(0, height), slice(0, width))
        rows = torch.arange(tile.rows.start, tile.rows.stop, dtype=frames.dtype)
        cols = torch.arange(tile.cols.start, tile.cols.stop, dtype=frames.dtype)
        bias = 0.2 * torch.sin(rows[:, None] + 2 * cols[None, :])  # [h, w]
        return frames + bias, {**after, "tile": tile}


@pytest.mark.parametrize("kwargs", [{"d_trunc": 1}, {"d_trunc": None}, {"d_trunc": None, "recompute": True}])
def test_each_tile_is_named_to_the_decoder(kwargs):
    decoder = PositionalDecoder()
    z, target = _inputs(decoder, 3, h=4, w=6)
    value, grad = _engine_grad(decoder, z, target, **kwargs)
    untiled = decoder.tiles_seen.pop()
    assert untiled == chopgrad.Tile(slice(0, 4), slice(0, 6)) and not decoder.tiles_seen
    tiled_value, tiled_grad = _engine_grad(decoder, z, target, tiles=(2, 2), halo=1, **kwargs)
    # Row spans [0, 2) and [2, 4), column spans [0, 3) and [3, 6), each widened by the halo of 1.
    rows, cols = (slice(0, 3), slice(1, 4)), (slice(0, 4), slice(2, 6))
    assert decoder.tiles_seen == [chopgrad.Tile(r, c) for r in rows for c in cols]
    assert tiled_value == pytest.approx(value, rel=1e-12)
    assert _rel(tiled_grad, grad) < 1e-12
    assert torch.equal(chopgrad.decode(decoder, z, tiles=(2, 2), halo=1), chopgrad.decode(decoder, z))


class OldProtocolDecoder:
    """A decoder written before the protocol declared ``out_channels`` and passed the tile."""

    latent_channels, spatial_scale, output_range, clamp_output = 2, 1, (-1.0, 1.0), False
    step_sizes, frames_out = ToyCausalDecoder.step_sizes, ToyCausalDecoder.frames_out
    step, parameters = ToyCausalDecoder.step, ToyCausalDecoder.parameters

    def init_cache(self):
        return {"hidden": None}


def test_a_decoder_written_against_the_old_protocol_is_told_each_fix():
    with pytest.raises(TypeError, match=r"implementing chopgrad.CausalDecoder \(it lacks out_channels\)"):
        chopgrad.wrap_decoder(OldProtocolDecoder())

    class WithChannels(OldProtocolDecoder):
        out_channels = 3

    with pytest.raises(TypeError, match=r"WithChannels.init_cache takes no tile: .* init_cache\(self, tile=None\)"):
        chopgrad.wrap_decoder(WithChannels())


# ----------------------------------------------------------------------------- supplement D's blocks, recompute


def _engine_grads(decoder, z, target, params, **kwargs):
    """decode_loss's value and gradients w.r.t. the latents and ``params`` (their grads are reset)."""
    for p in params:
        p.grad = None
    leaf = z.clone().requires_grad_(True)
    loss = chopgrad.decode_loss(decoder, leaf, target, mse, **kwargs)
    loss.backward()
    return float(loss.detach()), leaf.grad, [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]


def _assert_matches_oracle(decoder, z, target, tol, params=(), **kwargs):
    value, grad, param_grads = _engine_grads(decoder, z, target, params, **kwargs)
    oracle_kwargs = {k: v for k, v in kwargs.items() if k != "recompute"}
    ref_value, ref_grad, ref_params = truncated_oracle(decoder, z, target, mse, params=params, **oracle_kwargs)
    assert value == pytest.approx(ref_value, rel=1e-12)
    assert _rel(grad, ref_grad) < tol, kwargs
    if params:
        got, want = torch.cat([g.flatten() for g in param_grads]), torch.cat([g.flatten() for g in ref_params])
        assert _rel(got, want) < tol, kwargs


@pytest.mark.parametrize("name,t", [("wan21", 6), ("cogvideox", 10)])
@pytest.mark.parametrize("d_trunc,release_every", [(0, 2), (1, 2), (1, 3), (2, 2), (0, 4)])
@pytest.mark.parametrize("recompute", [False, True])
def test_blocks_match_brute_force_oracle(request, name, t, d_trunc, release_every, recompute):
    # The k-th step of a block reaches back d_trunc + k steps (the oracle cuts there, term by term).
    decoder = chopgrad.wrap_decoder(request.getfixturevalue(name))
    z, target = _inputs(decoder, t, h=2, w=2, seed=d_trunc + 3 * release_every)
    _assert_matches_oracle(decoder, z, target, ORACLE_TOL[name], d_trunc=d_trunc, release_every=release_every, recompute=recompute)


@settings(max_examples=12, deadline=None)
@given(
    t=st.integers(1, 11), d_trunc=st.integers(0, 3), release_every=st.integers(1, 4), recompute=st.booleans(),
    seed=st.integers(0, 100),
)
def test_blocks_and_recompute_property_cogvideox(t, d_trunc, release_every, recompute, seed):
    decoder = chopgrad.wrap_decoder(_COG)
    z, target = _inputs(decoder, t, h=2, w=2, seed=seed)
    _assert_matches_oracle(decoder, z, target, 1e-10, d_trunc=d_trunc, release_every=release_every, recompute=recompute)


@pytest.mark.parametrize("name,t", [("wan21", 5), ("cogvideox", 9)])
@pytest.mark.parametrize(
    "kwargs", [{"d_trunc": 1, "release_every": 2}, {"d_trunc": 1, "recompute": True}, {"d_trunc": 0, "release_every": 3, "recompute": True}]
)
def test_new_modes_decoder_parameter_gradients_match_oracle(request, name, t, kwargs):
    decoder = chopgrad.wrap_decoder(request.getfixturevalue(name))
    params = list(decoder.parameters())
    z, target = _inputs(decoder, t, h=2, w=2)
    try:
        for p in params:
            p.requires_grad_(True)
        _assert_matches_oracle(decoder, z, target, ORACLE_TOL[name], params=params, **kwargs)
    finally:
        for p in params:
            p.requires_grad_(False)
            p.grad = None


@pytest.mark.parametrize("decoder_name", [pytest.param("wan21", marks=pytest.mark.slow), "positional"])
@pytest.mark.parametrize(
    "kwargs", [{"d_trunc": 1, "release_every": 2}, {"d_trunc": 1, "recompute": True}, {"d_trunc": 2, "release_every": 2, "recompute": True}]
)
def test_new_modes_with_tiles_match_the_tiled_oracle(request, decoder_name, kwargs):
    decoder = PositionalDecoder() if decoder_name == "positional" else chopgrad.wrap_decoder(request.getfixturevalue(decoder_name))
    z, target = _inputs(decoder, 5, h=4, w=4, seed=1)
    _assert_matches_oracle(decoder, z, target, ORACLE_TOL.get(decoder_name, 1e-12), tiles=(2, 2), halo=1, **kwargs)


@pytest.mark.parametrize("kwargs", [{"d_trunc": 1}, {"d_trunc": None}, {"d_trunc": 1, "release_every": 2, "recompute": True}])
def test_uneven_tiles_match_the_tiled_oracle(kwargs):
    """3x2 tiles on a 5x7 latent: spans of 1 or 2 rows and 3 or 4 columns, each named to the decoder."""
    decoder = PositionalDecoder()
    z, target = _inputs(decoder, 4, h=5, w=7, seed=3)
    _assert_matches_oracle(decoder, z, target, 1e-12, tiles=(3, 2), halo=1, **kwargs)
    rows, cols = (slice(0, 2), slice(0, 4), slice(2, 5)), (slice(0, 4), slice(2, 7))
    assert decoder.tiles_seen[:6] == [chopgrad.Tile(r, c) for r in rows for c in cols]
    # Pointwise: equal up to the rounding of convolutions over different sizes.
    torch.testing.assert_close(chopgrad.decode(decoder, z, tiles=(3, 2), halo=0), chopgrad.decode(decoder, z), rtol=0, atol=1e-12)


class CountingDecoder(ToyCausalDecoder):
    """The toy, counting step calls and how many times a backward pass crosses a step's graph."""

    def __init__(self):
        super().__init__()
        self.calls = self.crossings = 0

    def step(self, latents, cache):
        self.calls += 1
        frames, after = super().step(latents, cache)
        if after["hidden"].requires_grad:
            after["hidden"].register_hook(self._crossed)
        return frames, after

    def _crossed(self, grad):
        self.crossings += 1


@pytest.mark.parametrize(
    "d_trunc,release_every,crossings",
    [
        (2, 1, 4 * 3),  # delayed eviction: one sweep over steps 0..2, then one per step: (T - D)(D + 1)
        (5, 1, 6),  # D = T - 1: a single sweep, as full backpropagation
        (1, 2, 2 + 3 + 3),  # blocks [0, 1] [2, 3] [4, 5]: windows of 2, 1 + 2, 1 + 2 steps
        (0, 3, 3 + 3),  # blocks [0, 2] [3, 5], nothing before them
        (2, 2, 4 + 4),  # blocks [0, 1] and [2, 3] merge (both truncate at the initial cache), then [2, 5]
    ],
)
def test_sweep_schedule_counts(d_trunc, release_every, crossings):
    decoder = CountingDecoder()
    z, target = _inputs(decoder, 6, h=2, w=2)
    _engine_grad(decoder, z, target, d_trunc=d_trunc, release_every=release_every)
    assert (decoder.calls, decoder.crossings) == (6, crossings)
    decoder.calls = decoder.crossings = 0
    _engine_grad(decoder, z, target, d_trunc=d_trunc, release_every=release_every, recompute=True)
    sweeps = len({min((i // release_every + 1) * release_every, 6) for i in range(6)} - set(range(1, d_trunc + 1)))
    # Every crossing but the newest step's in each sweep replays a step.
    assert (decoder.calls, decoder.crossings) == (6 + crossings - sweeps, crossings)


@pytest.mark.parametrize(
    "kwargs,error,message",
    [
        ({"release_every": 0}, ValueError, r"release_every must be an integer >= 1 \(decode steps per block"),
        ({"release_every": -2}, ValueError, "release_every must be an integer >= 1"),
        ({"release_every": 1.5}, ValueError, "release_every must be an integer >= 1"),
        ({"release_every": True}, ValueError, "release_every must be an integer >= 1"),
        ({"d_trunc": None, "release_every": 2}, ValueError, "release_every=2 needs an integer d_trunc: .* drop release_every, or pass d_trunc"),
        ({"recompute": "yes"}, TypeError, "recompute must be True or False"),
    ],
)
def test_bad_schedules_name_the_fix(cogvideox, kwargs, error, message):
    decoder = chopgrad.wrap_decoder(cogvideox)
    z, target = _inputs(decoder, 4)
    with pytest.raises(error, match=message):
        chopgrad.decode_loss(decoder, z.requires_grad_(True), target, mse, **kwargs)

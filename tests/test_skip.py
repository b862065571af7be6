"""chopgrad.skip: Mirage's skip-connected Wan decoder against an independent plain-autograd oracle.

The oracle runs diffusers' own ``vae.decode`` loop with a forward hook that fuses per-frame
encoder features, computed frame by frame in a Python loop, into the decoder's features at the
fusion point, counting output frames itself. It shares only the fusion conv's weights.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_wan, mse

import chopgrad
from chopgrad import lora
from chopgrad.skip import SkipDecoder, mirage_phase, skip_features


def _inputs(t=3, h=4, w=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(1, 16, t, h, w, generator=generator, dtype=torch.float64)
    frames = 1 + 4 * (t - 1)
    video = torch.rand(1, 3, frames, 8 * h, 8 * w, generator=generator, dtype=torch.float64) * 2 - 1
    target = torch.rand(1, 3, frames, 8 * h, 8 * w, generator=generator, dtype=torch.float64) * 0.2 - 0.1
    return z, video, target


def _randomise(module, std, seed, only=None):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if only is None or only in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def _oracle_features(vae, video):
    """Per-frame encode, one frame at a time: conv_in and the level-0 residual blocks."""
    layers = [vae.encoder.conv_in] + list(vae.encoder.down_blocks[: vae.config.num_res_blocks])
    frames = []
    with torch.no_grad():
        for index in range(video.shape[2]):
            hidden = video[:, :, index : index + 1]
            for layer in layers:
                hidden = layer(hidden)
            frames.append(hidden)
    return torch.cat(frames, dim=2)


def _oracle_decode(vae, fusion, z, video, fuse_at="after_upsample"):
    """Plain autograd through diffusers' vae.decode (clamped) with the fusion as a forward hook."""
    module = vae.decoder.up_blocks[-2].upsamplers[0] if fuse_at == "after_upsample" else vae.decoder.up_blocks[-1]
    skip, position = _oracle_features(vae, video), [0]

    def hook(_, __, features):
        count = features.shape[2]
        part = skip[:, :, position[0] : position[0] + count]
        position[0] += count
        stacked = torch.cat([features, part], dim=1)
        per_frame = [fusion(stacked[:, :, i]) for i in range(count)]  # 3x3 conv on each frame
        return features + torch.stack(per_frame, dim=2)

    handle = module.register_forward_hook(hook)
    try:
        return vae.decode(z).sample
    finally:
        handle.remove()


@pytest.mark.parametrize("fuse_at", ["after_upsample", "before_head"])
def test_zero_fusion_is_exactly_the_plain_decoder(fuse_at):
    vae = make_wan()
    z, video, _ = _inputs()
    skip = SkipDecoder(vae, fuse_at=fuse_at)
    assert torch.count_nonzero(skip.fusion.weight) == 0 and torch.count_nonzero(skip.fusion.bias) == 0
    assert skip.fusion.in_channels == 16 and skip.fusion.out_channels == 8  # decoder 8 + skip 8 channels
    assert torch.equal(chopgrad.decode(skip.bind(video), z), vae.decode(z).sample)
    frames, _ = skip.step(z[:, :, :1], skip.init_cache())  # no tile: the whole frame
    assert torch.equal(frames, chopgrad.decode(skip, z[:, :, :1], clamp=False))
    assert torch.equal(chopgrad.decode(skip.bind(video), z, (2, 2)), chopgrad.decode(vae, z, (2, 2)))


def test_skip_features_are_a_per_frame_encode():
    vae = make_wan()
    _, video, _ = _inputs()
    features = skip_features(vae, video)
    assert features.shape == (1, 8, 9, 32, 32) and not features.requires_grad
    torch.testing.assert_close(features, _oracle_features(vae, video), rtol=0, atol=1e-13)
    # Per frame: frame 5's features do not depend on any other frame.
    changed = video.clone()
    changed[:, :, 4] = 0
    other = skip_features(vae, changed)
    assert torch.equal(other[:, :, 5:], features[:, :, 5:]) and not torch.equal(other[:, :, 4], features[:, :, 4])


@pytest.mark.parametrize("fuse_at", ["after_upsample", "before_head"])
def test_forward_and_gradients_match_the_oracle(fuse_at):
    vae = make_wan()
    lora.add_decoder_lora(vae, rank=2, alpha=2, adapter_name="reconstruction")
    _randomise(vae, 0.05, seed=1, only="lora_B")
    skip = SkipDecoder(vae, fuse_at=fuse_at)
    _randomise(skip.fusion, 0.02, seed=2)
    z, video, target = _inputs(t=3)
    expected = _oracle_decode(vae, skip.fusion, z, video, fuse_at)
    assert expected.abs().max() < 1, "the oracle goes through Wan's clamp: stay inside it"
    got = chopgrad.decode(skip.bind(video), z)
    assert (got - vae.decode(z).sample).abs().max() > 1e-4  # the skip connection does something
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)

    params = lora.trainable_parameters(skip)
    assert {n for n in params if not n.startswith("vae.")} == {"fusion.weight", "fusion.bias"}
    leaf = z.clone().requires_grad_(True)
    reference = torch.autograd.grad(mse(_oracle_decode(vae, skip.fusion, leaf, video, fuse_at), target),
                                    [leaf] + list(params.values()))

    def errors(**kwargs):
        leaf = z.clone().requires_grad_(True)
        skip.zero_grad(set_to_none=True)
        chopgrad.decode_loss(skip.bind(video), leaf, target, mse, **kwargs).backward()
        grads = [leaf.grad] + [p.grad for p in params.values()]
        return max(float((g - r).norm() / r.norm()) for g, r in zip(grads, reference))

    assert errors(d_trunc=2) <= 1e-6  # covering (3 steps); float32 inside WanUpsample's backward
    if fuse_at == "after_upsample":  # the other modes once (they do not depend on the fusion point)
        assert errors(d_trunc=None) <= 1e-12
        assert errors(d_trunc=None, recompute=True) <= 1e-12  # reverse sweep: steps out of order
        assert errors(d_trunc=0) > 1e-3


def test_tiles_decode_each_tile_with_its_own_pixels():
    vae = make_wan()
    skip = SkipDecoder(vae)
    _randomise(skip.fusion, 0.02, seed=3)
    z, video, target = _inputs(t=2, h=4, w=6)
    halo, tiles = 1, (2, 3)
    got = chopgrad.decode(skip.bind(video), z, tiles, halo=halo)
    expected = torch.zeros_like(got)
    for r in range(tiles[0]):
        for c in range(tiles[1]):
            rows = slice(max(2 * r - halo, 0), min(2 * r + 2 + halo, 4))
            cols = slice(max(2 * c - halo, 0), min(2 * c + 2 + halo, 6))
            tile = _oracle_decode(vae, skip.fusion, z[..., rows, cols], video[..., rows.start * 8 : rows.stop * 8, cols.start * 8 : cols.stop * 8])
            top, left = (2 * r - rows.start) * 8, (2 * c - cols.start) * 8
            expected[..., 16 * r : 16 * r + 16, 16 * c : 16 * c + 16] = tile[..., top : top + 16, left : left + 16]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # The engine names each tile to init_cache: the loss sees the same tiles as decode.
    loss = chopgrad.decode_loss(skip.bind(video), z, target, mse, d_trunc=1, tiles=tiles, halo=halo)
    raw = chopgrad.decode(skip, z, tiles, halo=halo, clamp=False)  # the loss sees the unclamped output
    assert float(loss.detach()) == pytest.approx(float(mse(raw, target)), rel=1e-12)


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    ).double()


def test_mirage_phases_train_exactly_their_parameters():
    vae, transformer = make_wan(), _tiny_transformer()
    skip = SkipDecoder(vae)
    for name in ("reconstruction", "harmonization"):
        lora.add_decoder_lora(vae, rank=2, alpha=2, adapter_name=name)
    lora.add_transformer_lora(transformer, rank=2, alpha=2)
    for module, seed in ((vae, 4), (transformer, 5)):  # non-zero B: every LoRA weight gets a gradient
        _randomise(module, 0.05, seed, only="lora_B")
    z_hat, video, target = _inputs(t=2)
    text = torch.randn(1, 5, 32, dtype=torch.float64)

    def grads_after(phase):
        trainable = mirage_phase(phase, skip, transformer)
        skip.zero_grad(set_to_none=True)
        transformer.zero_grad(set_to_none=True)
        if phase == "reconstruction":  # decode the clean latents back to the video
            latents = z_hat
        else:  # one-step harmonization: the transformer predicts the velocity
            v = transformer(hidden_states=z_hat, timestep=torch.tensor([200]), encoder_hidden_states=text, return_dict=False)[0]
            latents = z_hat - v
        chopgrad.decode_loss(skip.bind(video), latents, target, mse, d_trunc=1).backward()
        named = [(f"skip.{n}", p) for n, p in skip.named_parameters()] + [(f"transformer.{n}", p) for n, p in transformer.named_parameters()]
        with_grad = {n for n, p in named if p.grad is not None and bool(p.grad.abs().sum() > 0)}
        return {f"skip.{n}" if not n.startswith("transformer.") else n for n in trainable}, with_grad

    trainable, with_grad = grads_after("reconstruction")
    expected = {f"skip.{n}" for n, _ in skip.named_parameters() if n.startswith("fusion.") or ".reconstruction." in n}
    assert trainable == with_grad == expected

    _randomise(skip.fusion, 0.02, seed=6)  # as after phase 1
    trainable, with_grad = grads_after("harmonization")
    expected = {f"skip.{n}" for n, _ in skip.named_parameters() if ".harmonization." in n}
    expected |= {f"transformer.{n}" for n, _ in transformer.named_parameters() if ".lora_" in n}
    assert trainable == with_grad == expected


def test_bad_inputs_are_rejected():
    from diffusers import AutoencoderKLCogVideoX

    vae = make_wan()
    skip = SkipDecoder(vae)
    z, video, _ = _inputs(t=2)
    with pytest.raises(RuntimeError, match="call skip_decoder.bind"):
        chopgrad.decode(skip, z)
    with pytest.raises(ValueError, match=r"video must be a tensor \[B, 3, T, H, W\]"):
        skip.bind(video[:, :2])
    with pytest.raises(ValueError, match="multiple of the VAE's spatial scale"):
        skip.bind(video[..., :30])
    with pytest.raises(ValueError, match="bind the clip that these latents encode"):
        chopgrad.decode(skip.bind(video[:, :, :4]), z)
    with pytest.raises(ValueError, match="fuse_at must be"):
        SkipDecoder(vae, fuse_at="middle")
    with pytest.raises(TypeError, match="AutoencoderKLWan"):
        SkipDecoder(AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2))
    with pytest.raises(ValueError, match="Wan 2.2 layout"):
        SkipDecoder(make_wan("2.2"))
    vae.encoder.conv_in.requires_grad_(True)
    with pytest.raises(ValueError, match="requires_grad_\\(False\\)"):
        skip.bind(video)
    vae.encoder.conv_in.requires_grad_(False)
    with pytest.raises(ValueError, match="needs the decoder adapter 'reconstruction'"):
        mirage_phase("reconstruction", skip)
    with pytest.raises(ValueError, match="phase must be"):
        mirage_phase("finetune", skip)

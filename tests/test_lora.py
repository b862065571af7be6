"""chopgrad.lora: peft LoRA on the Wan transformer and on the Wan VAE decoder's causal convs."""

from __future__ import annotations

import pytest
import torch
from conftest import make_wan, mse

import chopgrad
from chopgrad import lora


def _latents(t=3, h=4, w=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, t, h, w, generator=generator, dtype=torch.float64)


def _target(vae, t=3, h=4, w=4, seed=1):
    frames = chopgrad.num_frames(chopgrad.wrap_decoder(vae), t)
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, frames, 8 * h, 8 * w, generator=generator, dtype=torch.float64) * 0.2 - 0.1


def _randomise(model, adapter, std=0.05, seed=0):
    """LoRA B starts at zero (the update is off); give it values so the adapter does something."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * std)


def _tiny_transformer():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64,
    )
    return model.double().eval()


def _transformer_inputs():
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 16, 2, 4, 4, generator=generator, dtype=torch.float64)
    text = torch.randn(1, 5, 32, generator=generator, dtype=torch.float64)
    return {"hidden_states": hidden, "timestep": torch.tensor([200]), "encoder_hidden_states": text, "return_dict": False}


# ----------------------------------------------------------------------------- decoder LoRA


def test_plain_peft_cannot_adapt_wan_causal_conv():
    # The reason chopgrad.lora registers its own layer (module note); if peft starts handling
    # WanCausalConv3d itself, this fails and CausalConv3dLora can be reconsidered.
    from peft import LoraConfig, inject_adapter_in_model

    with pytest.raises(TypeError, match="bias"):
        inject_adapter_in_model(LoraConfig(r=2, target_modules=["decoder.conv_in"]), make_wan(), adapter_name="x")


def test_decoder_lora_targets_every_decoder_conv_and_starts_as_the_plain_decoder():
    from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

    vae, z = make_wan(), _latents()
    expected = vae.decode(z).sample
    targets = lora.decoder_lora_targets(vae)
    adapted = lora.add_decoder_lora(vae, rank=4, alpha=4, adapter_name="reconstruction")
    assert adapted == sorted(targets) and len(adapted) == 38
    assert isinstance(vae.decoder.conv_in, lora.CausalConv3dLora)
    assert isinstance(vae.decoder.conv_in.base_layer, WanCausalConv3d)
    assert not any(name.startswith("encoder.") for name in adapted)
    assert torch.equal(vae.decode(z).sample, expected)  # B = 0: LoRA adds exactly nothing
    assert lora.decoder_lora_targets(vae) == targets  # unchanged by the injection (for a second adapter)


def test_causal_conv_lora_equals_the_merged_weight_on_every_decode_step():
    # Unmerged: LoRA branch fed the cached, causally padded input; merged: peft folds
    # W + scale * B A into the base conv, which handles the cache itself. Equal on every step
    # only if the LoRA branch sees the same cache as the base conv.
    vae, z = make_wan(), _latents(t=4)
    lora.add_decoder_lora(vae, rank=4, alpha=8, adapter_name="reconstruction")
    _randomise(vae, "reconstruction")
    plain = chopgrad.decode(make_wan(), z, clamp=False)
    unmerged = chopgrad.decode(vae, z, clamp=False)
    for module in vae.modules():
        if hasattr(module, "merge") and hasattr(module, "lora_A"):
            module.merge()
    merged = chopgrad.decode(vae, z, clamp=False)
    assert (unmerged - plain).abs().max() > 1e-3  # the adapter does change the output
    torch.testing.assert_close(unmerged, merged, rtol=0, atol=1e-12)


def test_decoder_lora_gets_chopgrad_gradients_equal_to_plain_autograd():
    vae, z = make_wan(), _latents(t=3)
    target = _target(vae)
    lora.add_decoder_lora(vae, rank=4, alpha=4, adapter_name="reconstruction")
    _randomise(vae, "reconstruction")
    params = lora.trainable_parameters(vae)
    assert params and all(".lora_" in name for name in params)

    mse(chopgrad.decode(vae, z, clamp=False), target).backward()  # plain autograd, whole video
    expected = {name: p.grad.clone() for name, p in params.items()}

    def relative_errors(**kwargs):
        vae.zero_grad(set_to_none=True)
        chopgrad.decode_loss(vae, z, target, mse, **kwargs).backward()
        return {name: float((p.grad - expected[name]).norm() / expected[name].norm()) for name, p in params.items()}

    assert max(relative_errors(d_trunc=None).values()) <= 1e-12
    # Covering truncation (3 steps): exact up to the float32 inside WanUpsample's backward
    # (it casts to float32), the same tolerance as tests/test_engine.py uses for Wan.
    assert max(relative_errors(d_trunc=2).values()) <= 1e-6
    assert max(relative_errors(d_trunc=0).values()) > 1e-2  # truncation does change them


def test_two_decoder_adapters_stack_and_only_the_trainable_one_gets_gradients():
    vae, z = make_wan(), _latents(t=2)
    target = _target(vae, t=2)
    lora.add_decoder_lora(vae, 4, 4, "reconstruction")
    _randomise(vae, "reconstruction", seed=1)
    lora.add_decoder_lora(vae, 4, 4, "harmonization")
    _randomise(vae, "harmonization", seed=2)
    assert lora.adapter_names(vae) == ["reconstruction", "harmonization"]
    # After adding, all adapters run and only the newest trains (Mirage phase 2).
    assert {n.split(".")[-2] for n in lora.trainable_parameters(vae)} == {"harmonization"}

    both = chopgrad.decode(vae, z, clamp=False)
    lora.set_adapters(vae, active="reconstruction")
    only_first = chopgrad.decode(vae, z, clamp=False)
    assert not lora.trainable_parameters(vae)
    assert (both - only_first).abs().max() > 1e-4

    lora.set_adapters(vae, active=["reconstruction", "harmonization"], trainable=["harmonization"])
    torch.testing.assert_close(chopgrad.decode(vae, z, clamp=False), both, rtol=0, atol=0)
    chopgrad.decode_loss(vae, z, target, mse, d_trunc=1).backward()
    for name, param in vae.named_parameters():
        has_grad = param.grad is not None and bool(param.grad.abs().sum() > 0)
        assert has_grad == (".harmonization." in name), name

    with pytest.raises(ValueError, match="unknown adapter"):
        lora.set_adapters(vae, active=["reconstruction", "typo"])
    with pytest.raises(ValueError, match="must also be active"):
        lora.set_adapters(vae, active="reconstruction", trainable="harmonization")
    with pytest.raises(ValueError, match="already has an adapter"):
        lora.add_decoder_lora(vae, 4, 4, "harmonization")


def test_decoder_adapter_saves_and_loads_into_a_fresh_vae(tmp_path):
    vae, z = make_wan(), _latents(t=2)
    lora.add_decoder_lora(vae, 4, 8, "harmonization")
    _randomise(vae, "harmonization")
    path = lora.save_adapter(vae, tmp_path / "adapters" / "decoder.safetensors", "harmonization")
    assert path.is_file() and not list(path.parent.glob(".*tmp"))

    from safetensors.torch import load_file

    stored = load_file(str(path))
    assert stored and all("lora_" in key and "harmonization" not in key for key in stored)  # adapter only

    fresh = make_wan()
    assert lora.load_adapter(fresh, path) == "harmonization"  # injected from the file's metadata
    torch.testing.assert_close(
        chopgrad.decode(fresh, z, clamp=False), chopgrad.decode(vae, z, clamp=False), rtol=0, atol=0
    )


def test_load_adapter_rejects_bad_files(tmp_path):
    from safetensors.torch import save_file

    vae = make_wan()
    with pytest.raises(FileNotFoundError, match="no adapter file"):
        lora.load_adapter(vae, tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="not written by chopgrad.lora.save_adapter"):
        lora.load_adapter(vae, tmp_path / "foreign.safetensors")
    lora.add_decoder_lora(vae, 4, 4, "reconstruction")
    lora.save_adapter(vae, tmp_path / "rank4.safetensors", "reconstruction")
    other = make_wan()
    lora.add_decoder_lora(other, 8, 4, "reconstruction")
    with pytest.raises(ValueError, match="wrong shape"):
        lora.load_adapter(other, tmp_path / "rank4.safetensors")
    with pytest.raises(ValueError, match="no adapter named"):
        lora.save_adapter(other, tmp_path / "x.safetensors", "harmonization")


@pytest.mark.parametrize("rank,alpha", [(0, 4), (2.5, 4), (4, 0), (True, 4)])
def test_bad_rank_or_alpha_is_rejected(rank, alpha):
    with pytest.raises(ValueError, match="LoRA (rank|alpha)"):
        lora.add_decoder_lora(make_wan(), rank, alpha)


# ----------------------------------------------------------------------------- transformer LoRA


def test_transformer_lora_adapts_attention_and_ffn_and_only_it_trains(tmp_path):
    model, inputs = _tiny_transformer(), _transformer_inputs()
    expected = model(**inputs)[0]
    adapted = lora.add_transformer_lora(model, rank=4, alpha=2)
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                 "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"]
    assert adapted == sorted(f"blocks.{b}.{name}" for b in range(2) for name in per_block)
    assert model.blocks[0].attn1.to_q.scaling["transformer"] == 0.5  # alpha / rank
    torch.testing.assert_close(model(**inputs)[0], expected, rtol=0, atol=0)

    _randomise(model, "transformer")
    out = model(**inputs)[0]
    assert (out - expected).abs().max() > 1e-4
    out.square().mean().backward()
    for name, param in model.named_parameters():
        assert (param.grad is not None) == (".lora_" in name), name
    assert set(lora.trainable_parameters(model)) == {n for n, _ in model.named_parameters() if ".lora_" in n}

    path = lora.save_adapter(model, tmp_path / "transformer.safetensors", "transformer")
    fresh = _tiny_transformer()
    lora.load_adapter(fresh, path)
    torch.testing.assert_close(fresh(**inputs)[0], out.detach(), rtol=0, atol=0)



def test_lora_on_a_bf16_base_trains_in_float32():
    # transformer_dtype: bfloat16 stores the frozen base in bf16; AdamW on bf16 adapters would round
    # most updates away, so the adapters are float32 (as peft's get_peft_model makes them).
    model = _tiny_transformer().to(torch.bfloat16)
    lora.add_transformer_lora(model, rank=4, alpha=2)
    dtypes = {name: param.dtype for name, param in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert torch.bfloat16 in {d for n, d in dtypes.items() if ".lora_" not in n}
    _randomise(model, "transformer")
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in _transformer_inputs().items()}
    out = model(**inputs)[0]
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora.trainable_parameters(model).values())

def test_transformer_lora_unknown_target_names_the_existing_modules():
    with pytest.raises(ValueError, match="matches no Linear module.*attn1.to_q"):
        lora.add_transformer_lora(_tiny_transformer(), 4, 4, target_modules=["to_qkv"])

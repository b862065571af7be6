"""Shared fixtures: tiny random-weight decoders that run in well under a second on CPU."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import chopgrad  # noqa: E402, F401  (applies the torchvision fix before diffusers is imported)
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    convolutions run faster on one thread, and do not fight a parallel test worker for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet_output(vae, conv_out) -> None:
    # Random decoders saturate Wan's clamp; scale the last conv so outputs stay well inside
    # [-1, 1] and gradients can be compared with plain autograd through vae.decode.
    with torch.no_grad():
        conv_out.weight.mul_(0.05)
        if conv_out.bias is not None:
            conv_out.bias.zero_()


def make_wan(variant: str = "2.1", dtype=torch.float64):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    if variant == "2.1":
        vae = AutoencoderKLWan(base_dim=8, z_dim=16)
    else:  # Wan 2.2: residual up/down blocks and 2x2 patchify
        vae = AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], is_residual=True,
            patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16,
        )
    vae = vae.to(dtype).eval().requires_grad_(False)
    _quiet_output(vae, vae.decoder.conv_out)
    return vae


def make_cogvideox(dtype=torch.float64):
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2
    )
    vae = vae.to(dtype).eval().requires_grad_(False)
    _quiet_output(vae, vae.decoder.conv_out.conv)
    return vae


@pytest.fixture(scope="session")
def wan21():
    return make_wan("2.1")


@pytest.fixture(scope="session")
def wan22():
    return make_wan("2.2")


@pytest.fixture(scope="session")
def cogvideox():
    return make_cogvideox()


def mse(pred, target):
    return ((pred - target) ** 2).mean()


TEXT_WORDS = ["<pad>", "</s>", "<unk>", "a", "room", "clean", "video"]


def write_text_encoder(folder):
    """A tiny UMT5 encoder and a word-level tokenizer in a Wan-like folder (tokenizer/, text_encoder/)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TEXT_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(TEXT_WORDS), d_model=16, d_kv=4, d_ff=32, num_layers=1,
                                          num_heads=2)).eval()
    encoder.save_pretrained(folder / "text_encoder")
    return encoder

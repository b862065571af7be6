"""Single-step video restoration around Wan 2.1's diffusion transformer (paper supplement C.2, C.3).

The pre-trained flow-matching transformer is fine-tuned into a one-step restorer: its input is the
(normalised) latent ``z_hat`` of the degraded video (a 3DGS render, a masked video, an upsampled
low-resolution video, a naive insertion), the diffusion timestep is fixed (200) and the text
condition is a fixed caption's precomputed embedding (or a data set's own prompt). Wan is trained
to predict the velocity ``v = noise - data``; with ``z_hat`` in the place of the noise the target
is ``v = z_hat - z`` and the restored latent is ``z = z_hat - v`` (one Euler step from ``z_hat``
to the data). No change to the architecture, no distillation.

Latents are normalised as the Wan pipelines do, per channel with the VAE config's
``latents_mean`` / ``latents_std``: :func:`normalize_latents` before the transformer,
:func:`denormalize_latents` before decoding.

Builders: :func:`small_transformer` (a narrow ``WanTransformer3DModel`` trained from scratch, the
embedded default) and :func:`load_transformer` (real Wan 2.1 weights from a local diffusers folder,
checked before anything is loaded). Text: :func:`fixed_text_embedding` (a seeded random stand-in
for a caption embedding, for models without a text encoder) and :func:`encode_prompts` (Wan's own
UMT5 prompt encoding, given a tokenizer and text encoder loaded by the caller).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TEXT_LENGTH",
    "TIMESTEP",
    "Restorer",
    "check_transformer_folder",
    "denormalize_latents",
    "encode_prompts",
    "fixed_text_embedding",
    "load_transformer",
    "normalize_latents",
    "small_transformer",
]

TIMESTEP = 200  # the fixed diffusion timestep of supplement C.2 (Wan's scale: 0..1000)
TEXT_LENGTH = 512  # tokens per prompt in Wan 2.1's pipelines (UMT5, zero-padded)
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "diffusion_pytorch_model.bin")


# ----------------------------------------------------------------------------------------------------------
# Latent normalisation (as diffusers' WanPipeline)


def _stats(values: Sequence[float], like: Tensor) -> Tensor:  # [C] -> [1, C, 1, 1, 1]
    stats = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    if stats.ndim != 1 or stats.numel() != like.shape[1]:
        raise ValueError(f"latent statistics have {stats.numel()} entries but the latents {tuple(like.shape)} "
                         f"have {like.shape[1]} channels: use the latents_mean/latents_std of this VAE's config")
    return stats.view(1, -1, 1, 1, 1)


def normalize_latents(latents: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """``(latents - mean) / std`` per channel: [B, C, t, h, w] -> [B, C, t, h, w] (what the transformer eats)."""
    return (latents - _stats(mean, latents)) / _stats(std, latents)


def denormalize_latents(latents: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Inverse of :func:`normalize_latents`: [B, C, t, h, w] -> [B, C, t, h, w] (what ``vae.decode`` takes)."""
    return latents * _stats(std, latents) + _stats(mean, latents)


# ----------------------------------------------------------------------------------------------------------
# Transformer builders


def small_transformer(
    latent_channels: int = 16,
    num_layers: int = 2,
    num_heads: int = 2,
    head_dim: int = 16,
    ffn_dim: int = 64,
    text_dim: int = 32,
    freq_dim: int = 32,
    patch_size: tuple[int, int, int] = (1, 2, 2),
    rope_max_seq_len: int = 1024,
    zero_output: bool = True,
    seed: int = 0,
):
    """A narrow ``WanTransformer3DModel`` with random weights, to train from scratch.

    Same architecture as Wan 2.1's transformer (patch embedding, RoPE, self- and cross-attention
    blocks with timestep modulation), only smaller: Wan 2.1 14B has 40 layers, 40 heads of 128,
    ``ffn_dim`` 13824, ``text_dim`` 4096, ``freq_dim`` 256.

    Args:
        latent_channels: channels ``C`` of the VAE latents (in and out).
        rope_max_seq_len: longest token grid side RoPE covers (latent frames, or patches per side).
        zero_output: zero the output projection, so the untrained restorer is the identity
            (``v = 0``, ``z = z_hat``): the degraded video is a far better start than noise. False
            where gradients through an untrained transformer are measured (:mod:`chopgrad.analysis`):
            a zero output projection passes no gradient to the weights before it.
        seed: seeds the initial weights (the global RNG is left as it was).
    """
    from diffusers import WanTransformer3DModel

    sizes = {"latent_channels": latent_channels, "num_layers": num_layers, "num_heads": num_heads,
             "head_dim": head_dim, "ffn_dim": ffn_dim, "text_dim": text_dim, "freq_dim": freq_dim}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"small_transformer: {name} must be a positive integer, got {value!r}")
    if head_dim % 2 or freq_dim % 2:
        raise ValueError(f"small_transformer: head_dim and freq_dim must be even (RoPE and sinusoidal "
                         f"embeddings split them in halves), got {head_dim} and {freq_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = WanTransformer3DModel(
            patch_size=tuple(patch_size), num_attention_heads=num_heads, attention_head_dim=head_dim,
            in_channels=latent_channels, out_channels=latent_channels, text_dim=text_dim, freq_dim=freq_dim,
            ffn_dim=ffn_dim, num_layers=num_layers, rope_max_seq_len=rope_max_seq_len,
        )
    if zero_output:
        with torch.no_grad():
            model.proj_out.weight.zero_()
            model.proj_out.bias.zero_()
    return model


def check_transformer_folder(path: str | os.PathLike | None) -> tuple[Path, str | None]:
    """Where a diffusers ``WanTransformer3DModel`` lies: ``(folder, subfolder)``, checked without loading.

    Accepts a Wan 2.1 diffusers folder (``Wan-AI/Wan2.1-T2V-14B-Diffusers``: the transformer in its
    ``transformer/`` subfolder) or the ``transformer/`` folder itself.

    Raises:
        ValueError: naming what is missing (folder, ``config.json``, weights, wrong model class) and
            what to point the path at instead.
    """
    fix = ("point it at a local Wan 2.1 diffusers folder (e.g. Wan-AI/Wan2.1-T2V-14B-Diffusers, holding "
           "transformer/config.json and transformer/diffusion_pytorch_model*.safetensors)")
    if path is None or str(path) == "":
        raise ValueError(f"no transformer path given: {fix}")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"transformer path {folder} is not a folder (missing weights folder): {fix}")
    for sub in ("transformer", None):
        config = folder / sub / "config.json" if sub else folder / "config.json"
        if not config.is_file():
            continue
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config} is not a diffusers config ({err}): {fix}") from err
        if class_name != "WanTransformer3DModel":
            if sub is None:
                break
            raise ValueError(f"{config} describes a {class_name}, not a WanTransformer3DModel: {fix}")
        weights_dir = config.parent
        if not any((weights_dir / name).is_file() for name in _WEIGHT_FILES):
            raise ValueError(f"{weights_dir} has a config.json but no weights ({' or '.join(_WEIGHT_FILES)}): "
                             f"{fix}")
        return folder, sub
    raise ValueError(f"{folder} holds no WanTransformer3DModel (neither {folder / 'transformer/config.json'} "
                     f"nor {folder / 'config.json'}): {fix}")


def load_transformer(path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                     latent_channels: int | None = None):
    """Wan 2.1's transformer from a local diffusers folder (``local_files_only``: no download).

    Args:
        path: see :func:`check_transformer_folder`; checked before anything is loaded.
        torch_dtype: load in this dtype (the weights' own when None).
        latent_channels: when given, the VAE's latent channel count ``C``; a transformer taking or
            giving another count is refused from its ``config.json``, before its weights are read.
    """
    from diffusers import WanTransformer3DModel

    folder, subfolder = check_transformer_folder(path)
    if latent_channels is not None:
        _check_channels(folder / subfolder if subfolder else folder, latent_channels)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return WanTransformer3DModel.from_pretrained(folder, local_files_only=True, **kwargs)


def _check_channels(weights_dir: Path, latent_channels: int) -> None:
    config = json.loads((weights_dir / "config.json").read_text())
    channels = (config.get("in_channels", 16), config.get("out_channels") or config.get("in_channels", 16))
    if channels != (latent_channels, latent_channels):
        raise ValueError(f"the transformer in {weights_dir} maps {channels[0]} to {channels[1]} latent channels "
                         f"but the VAE has {latent_channels}: use the transformer and VAE of the same model")


# ----------------------------------------------------------------------------------------------------------
# Text condition


def fixed_text_embedding(text_dim: int, length: int = TEXT_LENGTH, tokens: int = 16, seed: int = 0) -> Tensor:
    """A seeded random stand-in for one caption's embedding: ``[1, length, text_dim]``.

    Shaped like Wan's UMT5 prompt embedding: ``tokens`` unit-variance rows, then zero padding up to
    ``length`` (Wan zero-pads prompts to 512 tokens). It stands for "a fixed caption" where no
    text encoder is available: a constant condition the transformer learns to work with (the
    caption's meaning is lost; with a text encoder use :func:`encode_prompts`).
    """
    if not 1 <= tokens <= length:
        raise ValueError(f"fixed_text_embedding: need 1 <= tokens <= length, got tokens={tokens}, length={length}")
    generator = torch.Generator().manual_seed(seed)
    embedding = torch.zeros(1, length, text_dim)
    embedding[:, :tokens] = torch.randn(1, tokens, text_dim, generator=generator)
    return embedding


@torch.no_grad()
def encode_prompts(prompts: Sequence[str], tokenizer: Any, text_encoder: Any,
                   length: int = TEXT_LENGTH) -> Tensor:
    """Wan 2.1's prompt embedding (``WanPipeline._get_t5_prompt_embeds``): ``[N, length, text_dim]``.

    Each prompt is tokenised to ``length`` tokens, encoded by the UMT5 encoder, and the rows past
    its own tokens are set to zero.

    Args:
        prompts: N captions.
        tokenizer: Wan's tokenizer (``AutoTokenizer.from_pretrained(folder, subfolder="tokenizer")``).
        text_encoder: Wan's ``UMT5EncoderModel`` (``subfolder="text_encoder"``).
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"encode_prompts: expected a non-empty list of non-empty strings, got {prompts!r}")
    tokens = tokenizer([p.strip() for p in prompts], padding="max_length", max_length=length, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device)
    hidden = text_encoder(tokens.input_ids.to(device), mask).last_hidden_state  # [N, length, D]
    return (hidden * mask.gt(0).unsqueeze(-1)).float().cpu()


# ----------------------------------------------------------------------------------------------------------
# The restorer


class Restorer(nn.Module):
    """One-step restoration: ``z = z_hat - transformer(z_hat, t=200, text)`` on normalised latents.

    Args:
        transformer: a diffusers ``WanTransformer3DModel`` (or a peft-wrapped one) whose
            ``in_channels == out_channels`` is the VAE's latent channel count.
        text_embedding: the fixed condition, ``[1, L, text_dim]`` or ``[L, text_dim]``; stored as a
            buffer, so it is saved and loaded with the model's state.
        timestep: the fixed diffusion timestep.
    """

    def __init__(self, transformer: nn.Module, text_embedding: Tensor, timestep: float = TIMESTEP):
        super().__init__()
        config = transformer.config
        if int(config.in_channels) != int(config.out_channels or config.in_channels):
            raise ValueError(f"the transformer maps {config.in_channels} to {config.out_channels} channels; "
                             "a restorer needs in_channels == out_channels (a text-to-video Wan 2.1 model, not "
                             "image-to-video)")
        if text_embedding.ndim == 2:
            text_embedding = text_embedding[None]
        if text_embedding.ndim != 3 or text_embedding.shape[0] != 1 or text_embedding.shape[-1] != config.text_dim:
            raise ValueError(f"text_embedding must be [1, L, {config.text_dim}] (the transformer's text_dim), "
                             f"got {tuple(text_embedding.shape)}")
        self.transformer = transformer
        self.timestep = float(timestep)
        self.register_buffer("text_embedding", text_embedding.detach().clone().float())

    @property
    def latent_channels(self) -> int:
        return int(self.transformer.config.in_channels)

    def _check(self, z_hat: Tensor, text_embedding: Tensor | None) -> None:
        patch = tuple(self.transformer.config.patch_size)
        if z_hat.ndim != 5 or z_hat.shape[1] != self.latent_channels:
            raise ValueError(f"z_hat must be normalised latents [B, {self.latent_channels}, t, h, w], "
                             f"got {tuple(z_hat.shape)}")
        if any(size % p for size, p in zip(z_hat.shape[2:], patch)):
            raise ValueError(f"the latent size (t, h, w) = {tuple(z_hat.shape[2:])} is not a multiple of the "
                             f"transformer's patch size {patch}: crop the video to a multiple of "
                             f"{patch[1]} x the VAE's spatial factor")
        if text_embedding is not None and (text_embedding.ndim != 3
                                           or text_embedding.shape[0] not in (1, z_hat.shape[0])
                                           or text_embedding.shape[-1] != self.text_embedding.shape[-1]):
            raise ValueError(f"text_embedding must be [1 or B, L, {self.text_embedding.shape[-1]}], "
                             f"got {tuple(text_embedding.shape)}")

    def velocity(self, z_hat: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """The predicted velocity ``v`` ([B, C, t, h, w]); the training target is ``z_hat - z``.

        Args:
            z_hat: normalised latents of the degraded video, [B, C, t, h, w].
            text_embedding: a per-sample condition [1 or B, L, text_dim]; the fixed one when None.
        """
        self._check(z_hat, text_embedding)
        batch = z_hat.shape[0]
        text = self.text_embedding if text_embedding is None else text_embedding
        dtype = next(self.transformer.parameters()).dtype
        text = text.to(z_hat.device, dtype).expand(batch, -1, -1)
        timestep = torch.full((batch,), self.timestep, device=z_hat.device)
        out = self.transformer(z_hat.to(dtype), timestep, text, return_dict=False)[0]
        return out.to(z_hat.dtype)

    def forward(self, z_hat: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """The restored normalised latents ``z = z_hat - v``: [B, C, t, h, w] -> [B, C, t, h, w]."""
        return z_hat - self.velocity(z_hat, text_embedding)

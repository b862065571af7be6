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
    "DOVE_TIMESTEP",
    "TEXT_LENGTH",
    "TIMESTEP",
    "CogVideoXRestorer",
    "Restorer",
    "check_transformer_folder",
    "denormalize_latents",
    "encode_cogvideox_prompts",
    "encode_prompts",
    "fixed_text_embedding",
    "load_transformer",
    "normalize_latents",
    "small_transformer",
]

TIMESTEP = 200  # the fixed diffusion timestep of supplement C.2 (Wan's scale: 0..1000)
TEXT_LENGTH = 512  # tokens per prompt in Wan 2.1's pipelines (UMT5, zero-padded)
COGVIDEOX_TEXT_LENGTH = 226  # CogVideoX's max_text_seq_length (T5)
DOVE_TIMESTEP = 399  # DOVE's one-step timestep (inference_script.py: sr_noise_step; CogVideoX's scale: 0..999)
TRANSFORMER_CLASSES = ("WanTransformer3DModel", "CogVideoXTransformer3DModel")
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
    """Where a diffusers ``WanTransformer3DModel`` or ``CogVideoXTransformer3DModel`` lies:
    ``(folder, subfolder)``, checked without loading.

    Accepts a Wan 2.1 diffusers folder (``Wan-AI/Wan2.1-T2V-14B-Diffusers``: the transformer in its
    ``transformer/`` subfolder), a CogVideoX or DOVE pipeline folder (the same layout), or the
    ``transformer/`` folder itself.

    Raises:
        ValueError: naming what is missing (folder, ``config.json``, weights, wrong model class) and
            what to point the path at instead.
    """
    fix = ("point it at a local Wan 2.1 diffusers folder (e.g. Wan-AI/Wan2.1-T2V-14B-Diffusers, holding "
           "transformer/config.json and transformer/diffusion_pytorch_model*.safetensors) or a DOVE / CogVideoX "
           "pipeline folder of the same layout")
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
        if class_name not in TRANSFORMER_CLASSES:
            if sub is None:
                break
            raise ValueError(f"{config} describes a {class_name}, not a {' or '.join(TRANSFORMER_CLASSES)}: {fix}")
        weights_dir = config.parent
        if not any((weights_dir / name).is_file() for name in _WEIGHT_FILES):
            raise ValueError(f"{weights_dir} has a config.json but no weights ({' or '.join(_WEIGHT_FILES)}): "
                             f"{fix}")
        return folder, sub
    raise ValueError(f"{folder} holds no WanTransformer3DModel or CogVideoXTransformer3DModel (neither "
                     f"{folder / 'transformer/config.json'} nor {folder / 'config.json'}): {fix}")


def transformer_family(path: str | os.PathLike) -> str:
    """``"wan"`` or ``"cogvideox"``: which transformer a folder of :func:`check_transformer_folder` holds."""
    folder, sub = check_transformer_folder(path)
    config = json.loads(((folder / sub if sub else folder) / "config.json").read_text())
    return "cogvideox" if config["_class_name"] == "CogVideoXTransformer3DModel" else "wan"


def dove_alpha(path: str | os.PathLike, timestep: int = DOVE_TIMESTEP) -> float:
    """``alphas_cumprod[timestep]`` of the scheduler in a CogVideoX / DOVE folder (``scheduler/``).

    DOVE restores with ``x0 = sqrt(a) z_lr - sqrt(1 - a) v`` at ``timestep`` 399 (the inverse of
    v-prediction, ``scheduler.get_velocity``); ``a`` depends on the scheduler's betas and SNR shift,
    so it is read from the checkpoint's own ``scheduler_config.json``.
    """
    from diffusers import CogVideoXDPMScheduler

    folder, sub = check_transformer_folder(path)
    if sub is None or not (folder / "scheduler" / "scheduler_config.json").is_file():
        raise ValueError(f"{folder} has no scheduler/scheduler_config.json: point the path at the whole DOVE / "
                         "CogVideoX pipeline folder (model_index.json, transformer/, vae/, scheduler/)")
    scheduler = CogVideoXDPMScheduler.from_pretrained(folder, subfolder="scheduler", local_files_only=True)
    if not 0 <= timestep < len(scheduler.alphas_cumprod):
        raise ValueError(f"timestep {timestep} is outside the scheduler's 0..{len(scheduler.alphas_cumprod) - 1}")
    return float(scheduler.alphas_cumprod[timestep])


def load_transformer(path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                     latent_channels: int | None = None):
    """Wan 2.1's (or CogVideoX's) transformer from a local diffusers folder (``local_files_only``: no download).

    Args:
        path: see :func:`check_transformer_folder`; checked before anything is loaded.
        torch_dtype: load in this dtype (the weights' own when None).
        latent_channels: when given, the VAE's latent channel count ``C``; a transformer taking or
            giving another count is refused from its ``config.json``, before its weights are read.
    """
    import diffusers

    folder, subfolder = check_transformer_folder(path)
    config = json.loads(((folder / subfolder if subfolder else folder) / "config.json").read_text())
    if latent_channels is not None:
        _check_channels(folder / subfolder if subfolder else folder, latent_channels)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    return getattr(diffusers, config["_class_name"]).from_pretrained(folder, local_files_only=True, **kwargs)


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


@torch.no_grad()
def encode_cogvideox_prompts(prompts: Sequence[str], tokenizer: Any, text_encoder: Any,
                             length: int = COGVIDEOX_TEXT_LENGTH) -> Tensor:
    """CogVideoX's prompt embedding (``CogVideoXPipeline._get_t5_prompt_embeds``): ``[N, length, 4096]``.

    Each prompt is tokenised to ``length`` tokens (padded, truncated) and encoded by the T5 encoder;
    unlike Wan, the padding rows are kept. An empty prompt is allowed: DOVE restores with ``""``.
    """
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"encode_cogvideox_prompts: expected a non-empty list of strings, got {prompts!r}")
    tokens = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    device = next(text_encoder.parameters()).device
    return text_encoder(tokens.input_ids.to(device))[0].float().cpu()


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

    _text_dim_key, _model_name = "text_dim", "Wan 2.1"  # the config key of the text width; the model family

    def __init__(self, transformer: nn.Module, text_embedding: Tensor, timestep: float = TIMESTEP):
        super().__init__()
        config = transformer.config
        if int(config.in_channels) != int(config.out_channels or config.in_channels):
            raise ValueError(f"the transformer maps {config.in_channels} to {config.out_channels} channels; "
                             f"a restorer needs in_channels == out_channels (a text-to-video {self._model_name} model, "
                             "not image-to-video)")
        if text_embedding.ndim == 2:
            text_embedding = text_embedding[None]
        width = getattr(config, self._text_dim_key)
        if text_embedding.ndim != 3 or text_embedding.shape[0] != 1 or text_embedding.shape[-1] != width:
            raise ValueError(f"text_embedding must be [1, L, {width}] (the transformer's {self._text_dim_key}), "
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
        self._check_text(z_hat, text_embedding)

    def _check_text(self, z_hat: Tensor, text_embedding: Tensor | None) -> None:
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

    def from_velocity(self, z_hat: Tensor, velocity: Tensor) -> Tensor:
        """The restored latents of a predicted velocity: ``z_hat - v`` (one Euler step to the data)."""
        return z_hat - velocity

    def forward(self, z_hat: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """The restored normalised latents (``z = z_hat - v``): [B, C, t, h, w] -> [B, C, t, h, w]."""
        return self.from_velocity(z_hat, self.velocity(z_hat, text_embedding))


class CogVideoXRestorer(Restorer):
    """DOVE's one-step restoration with a CogVideoX transformer (Chen et al. 2025, ``inference_script.py``).

    The latent of the (upsampled) degraded video is the sample at ``timestep`` (399) without added
    noise; the transformer predicts ``v`` (CogVideoX's v-prediction) and the restored latent is
    ``z = sqrt(a) z_hat - sqrt(1 - a) v`` with ``a = alphas_cumprod[timestep]`` (:func:`dove_alpha`).
    Latents are CogVideoX's, scaled by the VAE's ``scaling_factor`` (what :func:`normalize_latents`
    does with mean 0 and std ``1 / scaling_factor``). As in DOVE, the latent frames are laid out
    ``[B, t, C, h, w]`` for the transformer, a CogVideoX 1.5 transformer (``patch_size_t`` 2) gets the
    first latent frame repeated in front until ``t`` divides, dropped again from its output, and the
    3D rotary embedding is diffusers' CogVideoX pipeline rule.

    Args:
        transformer: a diffusers ``CogVideoXTransformer3DModel`` (text-to-video: ``in_channels`` =
            ``out_channels``).
        text_embedding: the fixed condition ``[1, L, text_embed_dim]`` (DOVE: the T5 embedding of the
            empty prompt, ``L`` = 226).
        timestep: DOVE's 399.
        alpha: ``alphas_cumprod[timestep]`` of the model's scheduler.
    """

    _text_dim_key, _model_name = "text_embed_dim", "CogVideoX"

    def __init__(self, transformer: nn.Module, text_embedding: Tensor, timestep: float = DOVE_TIMESTEP,
                 alpha: float = 0.5):
        if not 0 < alpha < 1:
            raise ValueError(f"alpha = alphas_cumprod[timestep] must be in (0, 1), got {alpha}")
        super().__init__(transformer, text_embedding, timestep)
        self.alpha = float(alpha)

    def _check(self, z_hat: Tensor, text_embedding: Tensor | None) -> None:
        patch = int(self.transformer.config.patch_size)
        if z_hat.ndim != 5 or z_hat.shape[1] != self.latent_channels:
            raise ValueError(f"z_hat must be scaled latents [B, {self.latent_channels}, t, h, w], got {tuple(z_hat.shape)}")
        if z_hat.shape[3] % patch or z_hat.shape[4] % patch:
            raise ValueError(f"the latent size (h, w) = {tuple(z_hat.shape[3:])} is not a multiple of the transformer's "
                             f"patch size {patch}: crop the video to a multiple of {patch} x the VAE's spatial factor")
        self._check_text(z_hat, text_embedding)

    def _rotary(self, frames: int, height: int, width: int, device: torch.device):
        """CogVideoXPipeline._prepare_rotary_positional_embeddings for a latent grid (frames after padding)."""
        config = self.transformer.config
        if not config.use_rotary_positional_embeddings:
            return None
        from diffusers.models.embeddings import get_3d_rotary_pos_embed

        p, p_t = int(config.patch_size), config.patch_size_t
        grid = (height // p, width // p)
        base = (config.sample_height // p, config.sample_width // p)
        if p_t is None:  # CogVideoX 1.0
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            crops = get_resize_crop_region_for_grid(grid, base[1], base[0])
            return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=crops, grid_size=grid,
                                           temporal_size=frames, device=device)
        return get_3d_rotary_pos_embed(embed_dim=config.attention_head_dim, crops_coords=None, grid_size=grid,
                                       temporal_size=(frames + p_t - 1) // p_t, grid_type="slice", max_size=base,
                                       device=device)

    def velocity(self, z_hat: Tensor, text_embedding: Tensor | None = None) -> Tensor:
        """The predicted ``v`` ([B, C, t, h, w])."""
        self._check(z_hat, text_embedding)
        batch, frames = z_hat.shape[0], z_hat.shape[2]
        text = self.text_embedding if text_embedding is None else text_embedding
        dtype = next(self.transformer.parameters()).dtype
        text = text.to(z_hat.device, dtype).expand(batch, -1, -1)
        latents = z_hat.permute(0, 2, 1, 3, 4)  # [B, t, C, h, w]
        p_t = self.transformer.config.patch_size_t
        copies = (-frames) % p_t if p_t else 0  # DOVE: the first latent frame repeated in front
        if copies:
            latents = torch.cat([latents[:, :1].expand(-1, copies, -1, -1, -1), latents], dim=1)
        timestep = torch.full((batch,), int(self.timestep), device=z_hat.device, dtype=torch.long)
        rotary = self._rotary(latents.shape[1], z_hat.shape[3], z_hat.shape[4], z_hat.device)
        out = self.transformer(hidden_states=latents.to(dtype), encoder_hidden_states=text, timestep=timestep,
                               image_rotary_emb=rotary, return_dict=False)[0]
        return out[:, copies:].permute(0, 2, 1, 3, 4).to(z_hat.dtype)

    def from_velocity(self, z_hat: Tensor, velocity: Tensor) -> Tensor:
        """``sqrt(a) z_hat - sqrt(1 - a) v`` (scheduler.get_velocity(v, z_hat, t) in DOVE)."""
        return self.alpha ** 0.5 * z_hat - (1 - self.alpha) ** 0.5 * velocity

"""The models the analyses run on: VAEs by folder or built-in name, a backbone, an LPIPS loss.

* :func:`load_vae`: a local diffusers folder (``AutoencoderKLWan`` or ``AutoencoderKLCogVideoX``,
  told apart by ``_class_name`` in its ``config.json``) or a built-in random-weight architecture
  (:data:`BUILTIN_VAES`).
* :func:`latent_stats`: the VAE's latent scaling (Wan: ``latents_mean`` / ``latents_std``; CogVideoX:
  ``scaling_factor``) for :func:`chopgrad.restoration.normalize_latents`, the space a backbone works in.
* :func:`backbone_transformer` and :class:`FlowBackbone`: a ``WanTransformer3DModel`` (built or
  loaded by :mod:`chopgrad.restoration`) as the backbone that produces the decoder's latents (flow
  matching, Wan's parameterisation).
* :func:`lpips_loss`: LPIPS (:func:`chopgrad.metrics.frames.load_lpips`) as a differentiable video
  loss, on the official weights or random stand-ins (marked as such).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from chopgrad import restoration
from chopgrad.metrics.frames import LPIPS_NETS, load_lpips
from chopgrad.metrics.limits import MIN_SIZE

__all__ = ["BUILTIN_VAES", "FlowBackbone", "backbone_transformer", "encode_videos", "latent_stats", "load_vae",
           "lpips_loss", "random_latents"]

# Built-in random-weight VAEs: what the architecture does to gradients, not what trained weights do.
BUILTIN_VAES = {
    "wan-tiny": "AutoencoderKLWan(base_dim=8, z_dim=16), random weights",
    "cogvideox-tiny": "AutoencoderKLCogVideoX(block_out_channels=(8,)*4, latent_channels=4), random weights",
    "wan2.1": "the Wan 2.1 VAE architecture (diffusers' default AutoencoderKLWan config), random weights",
}
SUPPORTED_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")


def load_vae(name_or_path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             seed: int = 0):
    """A diffusers causal video VAE in eval mode with frozen parameters.

    Args:
        name_or_path: a local diffusers folder holding ``config.json`` + weights, or one of
            :data:`BUILTIN_VAES` (random weights from ``seed``).
    Raises:
        ValueError: unknown name, a folder without ``config.json``, or an unsupported class.
    """
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    path = Path(name_or_path)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"{path} is not a diffusers model folder: {config} is missing")
        try:
            class_name = json.loads(config.read_text()).get("_class_name")
        except (json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{config} is not a diffusers config: {err}") from err
        classes = {"AutoencoderKLWan": AutoencoderKLWan, "AutoencoderKLCogVideoX": AutoencoderKLCogVideoX}
        if class_name not in classes:
            raise ValueError(f"unknown decoder: {config} declares {class_name!r}; chopgrad's analysis supports "
                             f"{' and '.join(SUPPORTED_CLASSES)} (or implement chopgrad.CausalDecoder)")
        vae = classes[class_name].from_pretrained(path, local_files_only=True)
    elif str(name_or_path) in BUILTIN_VAES:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if name_or_path == "wan-tiny":
                vae = AutoencoderKLWan(base_dim=8, z_dim=16)
            elif name_or_path == "cogvideox-tiny":
                vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4,
                                             layers_per_block=1, norm_num_groups=2)
            else:
                vae = AutoencoderKLWan()
    else:
        raise ValueError(f"unknown decoder {str(name_or_path)!r}: not a folder and not a built-in name; give a local "
                         f"diffusers VAE folder ({' or '.join(SUPPORTED_CLASSES)}) or one of {', '.join(BUILTIN_VAES)}")
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def latent_stats(vae) -> tuple[list[float], list[float]]:  # mean, std, C values each
    """The VAE config's per-channel latent statistics, for :func:`chopgrad.restoration.normalize_latents`.

    Wan configs give ``latents_mean`` / ``latents_std``; CogVideoX configs give one ``scaling_factor``
    (``z * scaling_factor`` is what its pipelines diffuse), i.e. mean 0 and std ``1 / scaling_factor``.
    """
    config = vae.config
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        return list(mean), list(std)
    channels = int(getattr(config, "z_dim", None) or config.latent_channels)
    return [0.0] * channels, [1.0 / float(getattr(config, "scaling_factor", 1.0))] * channels


@torch.no_grad()
def encode_videos(vae, videos: Tensor) -> Tensor:  # [B, 3, T, H, W] in [-1, 1] -> [B, C, t, h, w]
    """Posterior means (``latent_dist.mode()``) of each video, encoded one at a time."""
    param = next(vae.parameters())
    return torch.cat([vae.encode(video[None].to(param)).latent_dist.mode() for video in videos])


def random_latents(vae, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:  # [B, C, t, h, w]
    """Standard normal latents in the backbone's normalized space, mapped to what ``decode`` takes."""
    param = next(vae.parameters())
    noise = torch.randn(shape, generator=generator, dtype=torch.float64)
    return restoration.denormalize_latents(noise, *latent_stats(vae)).to(param)


# ----------------------------------------------------------------------------- backbone


def backbone_transformer(latent_channels: int, transformer_path: str | Path | None = None, seed: int = 0,
                         num_layers: int = 2):
    """The ``WanTransformer3DModel`` whose parameter gradients the backbone analysis compares.

    Args:
        latent_channels: the VAE's latent channels ``C`` (the transformer's in and out).
        transformer_path: a local Wan 2.1 diffusers folder (or its ``transformer/``), see
            :func:`chopgrad.restoration.load_transformer`; None: a small random one from ``seed``
            with ``num_layers`` blocks (:func:`chopgrad.restoration.small_transformer`).
    """
    if transformer_path is not None:
        return restoration.load_transformer(transformer_path, latent_channels=latent_channels)
    # zero_output=False: a zeroed output projection would give every other parameter a zero gradient.
    return restoration.small_transformer(latent_channels, num_layers=num_layers, zero_output=False, seed=seed)


class FlowBackbone:
    """A Wan transformer producing decoder latents from noised clean latents (flow matching).

    ``z_sigma = (1 - sigma) z + sigma noise`` in the normalized latent space, the transformer predicts
    the velocity ``v = noise - z``, and the backbone returns the clean estimate ``z_sigma - sigma v``
    mapped back to what ``vae.decode`` takes. The text condition is a fixed random embedding (no
    text encoder here); noise and text come from ``seed``.
    """

    def __init__(self, transformer, vae, sigma: float = 0.5, text_tokens: int = 8, seed: int = 0):
        if not 0 < sigma <= 1:
            raise ValueError(f"sigma must be in (0, 1], got {sigma!r}")
        self.transformer, self.vae, self.sigma = transformer, vae, sigma
        self.text_tokens, self.seed = text_tokens, seed
        self.stats = latent_stats(vae)
        patch = transformer.config.patch_size
        self.patch_size = tuple(patch)

    def check(self, latents: Tensor) -> None:
        _, _, _, height, width = latents.shape
        ph, pw = self.patch_size[1], self.patch_size[2]
        if height % ph or width % pw:
            raise ValueError(f"latents of {height}x{width} pixels do not split into the transformer's {ph}x{pw} "
                             "patches: crop the video to a multiple of spatial_scale * patch size")

    def __call__(self, clean: Tensor, index: int = 0) -> Tensor:  # [B, C, t, h, w] -> same
        self.check(clean)
        param = next(self.transformer.parameters())
        generator = torch.Generator().manual_seed(self.seed * 100003 + index)
        z = restoration.normalize_latents(clean.detach(), *self.stats).to(param)
        noise = torch.randn(z.shape, generator=generator).to(param)
        text = torch.randn(z.shape[0], self.text_tokens, self.transformer.config.text_dim,
                           generator=generator).to(param)
        noised = (1 - self.sigma) * z + self.sigma * noise
        timestep = torch.full((z.shape[0],), self.sigma * 1000, device=param.device)
        velocity = self.transformer(noised, timestep, text).sample
        return restoration.denormalize_latents(noised - self.sigma * velocity, *self.stats)


# ----------------------------------------------------------------------------- LPIPS

# Smallest frame side per LPIPS backbone: chopgrad.metrics.limits.MIN_SIZE, by backbone name.
LPIPS_MIN_SIZE = {net: MIN_SIZE[f"lpips_{net}"] for net in LPIPS_NETS}


def lpips_loss(net: str = "vgg", weights: str = "official",
               device: str | torch.device = "cpu") -> tuple[Callable[[Tensor, Tensor], Tensor], dict]:
    """LPIPS v0.1 (``lpips`` package) as a video loss ``loss(pred, target) -> scalar`` (mean over frames).

    The network comes from :func:`chopgrad.metrics.frames.load_lpips`, the one LPIPS loader.

    Args:
        net: ``vgg`` or ``alex``.
        weights: ``official`` (the files must be present) or ``stand_in`` (missing files are replaced by
            random stand-ins in a temporary weight home, never the user's caches; ``info`` says so).
    Returns:
        ``(loss, info)``, ``info = {"metric", "weights": {file: status}, "stand_in_weights": bool}``.
    Raises:
        chopgrad.weights.MissingWeightsError: ``official`` and a file missing.
    """
    model, statuses = load_lpips(net, weights, device)
    info = {"metric": f"lpips_{net}", "weights": statuses,
            "stand_in_weights": any(status != "official" for status in statuses.values())}
    smallest = LPIPS_MIN_SIZE[net]

    def loss(pred: Tensor, target: Tensor) -> Tensor:  # [B, 3, T, H, W] in [-1, 1] each
        if min(pred.shape[-2:]) < smallest:
            raise ValueError(f"LPIPS-{net} needs frames of at least {smallest} x {smallest} pixels, got "
                             f"{pred.shape[-2]} x {pred.shape[-1]} (its backbone pools them away): use larger frames")
        frames = pred.transpose(1, 2).flatten(0, 1)  # [B * T, 3, H, W]
        reference = target.transpose(1, 2).flatten(0, 1)
        dtype = next(model.parameters()).dtype
        return model(frames.to(dtype), reference.to(dtype)).mean().to(pred.dtype)

    return loss, info

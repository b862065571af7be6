"""The models the analyses run on: VAEs by folder or built-in name, a backbone, an LPIPS loss.

* :func:`load_vae`: a local diffusers folder (``AutoencoderKLWan`` or ``AutoencoderKLCogVideoX``,
  told apart by ``_class_name`` in its ``config.json``) or a built-in random-weight architecture
  (:data:`BUILTIN_VAES`).
* :func:`normalize_latents` / :func:`denormalize_latents`: the VAE's latent scaling (Wan:
  ``latents_mean`` / ``latents_std``; CogVideoX: ``scaling_factor``), the space a backbone works in.
* :class:`FlowBackbone`: a ``WanTransformer3DModel`` as the backbone that produces the decoder's
  latents (flow matching, Wan's parameterisation), random-initialised from a seed or loaded.
* :func:`lpips_loss`: LPIPS from the ``lpips`` package as a differentiable video loss, with weights
  checked through :mod:`chopgrad.weights` (optionally random stand-ins, marked as such).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["BUILTIN_VAES", "FlowBackbone", "denormalize_latents", "encode_videos", "load_transformer",
           "load_vae", "lpips_loss", "normalize_latents", "random_latents", "tiny_transformer"]

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


def _latent_scaling(vae) -> tuple[Tensor, Tensor]:  # mean, std, each [1, C, 1, 1, 1]
    config = vae.config
    channels = int(getattr(config, "z_dim", None) or config.latent_channels)
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean, std = torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)
        if mean.numel() != channels or std.numel() != channels:
            raise ValueError(f"the VAE config's latents_mean / latents_std have {mean.numel()} / {std.numel()} "
                             f"values but the latents have {channels} channels: fix the config")
    else:  # CogVideoX-style: a single scaling factor
        mean = torch.zeros(channels, dtype=torch.float64)
        std = torch.full((channels,), 1.0 / float(getattr(config, "scaling_factor", 1.0)), dtype=torch.float64)
    return mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)


def normalize_latents(vae, latents: Tensor) -> Tensor:  # [B, C, t, h, w] -> same
    """From what ``vae.decode`` takes to the normalized space a diffusion backbone works in."""
    mean, std = _latent_scaling(vae)
    return (latents - mean.to(latents)) / std.to(latents)


def denormalize_latents(vae, latents: Tensor) -> Tensor:  # [B, C, t, h, w] -> same
    mean, std = _latent_scaling(vae)
    return latents * std.to(latents) + mean.to(latents)


@torch.no_grad()
def encode_videos(vae, videos: Tensor) -> Tensor:  # [B, 3, T, H, W] in [-1, 1] -> [B, C, t, h, w]
    """Posterior means (``latent_dist.mode()``) of each video, encoded one at a time."""
    param = next(vae.parameters())
    return torch.cat([vae.encode(video[None].to(param)).latent_dist.mode() for video in videos])


def random_latents(vae, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:  # [B, C, t, h, w]
    """Standard normal latents in the backbone's normalized space, mapped to what ``decode`` takes."""
    param = next(vae.parameters())
    return denormalize_latents(vae, torch.randn(shape, generator=generator, dtype=torch.float64)).to(param)


# ----------------------------------------------------------------------------- backbone


def tiny_transformer(latent_channels: int, seed: int = 0, num_layers: int = 2, patch_size=(1, 2, 2)):
    """A small random ``WanTransformer3DModel`` (the ENVIRONMENT.md tiny config) seeded with ``seed``."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return WanTransformer3DModel(
            patch_size=tuple(patch_size), num_attention_heads=2, attention_head_dim=16, in_channels=latent_channels,
            out_channels=latent_channels, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=num_layers,
            rope_max_seq_len=64,
        )


def load_transformer(path: str | Path, latent_channels: int):
    """A ``WanTransformer3DModel`` from a local diffusers folder (e.g. Wan 2.1's ``transformer/``)."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    config = path / "config.json"
    if not config.is_file():
        raise ValueError(f"{path} is not a diffusers model folder: {config} is missing")
    class_name = json.loads(config.read_text()).get("_class_name")
    if class_name != "WanTransformer3DModel":
        raise ValueError(f"{config} declares {class_name!r}; the backbone analysis loads a WanTransformer3DModel")
    model = WanTransformer3DModel.from_pretrained(path, local_files_only=True)
    if model.config.in_channels != latent_channels or model.config.out_channels != latent_channels:
        raise ValueError(f"the transformer in {path} takes {model.config.in_channels} latent channels but the VAE "
                         f"has {latent_channels}: use the transformer and VAE of the same model")
    return model


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
        z = normalize_latents(self.vae, clean.detach()).to(param)
        noise = torch.randn(z.shape, generator=generator).to(param)
        text = torch.randn(z.shape[0], self.text_tokens, self.transformer.config.text_dim,
                           generator=generator).to(param)
        noised = (1 - self.sigma) * z + self.sigma * noise
        timestep = torch.full((z.shape[0],), self.sigma * 1000, device=param.device)
        velocity = self.transformer(noised, timestep, text).sample
        return denormalize_latents(self.vae, noised - self.sigma * velocity)


# ----------------------------------------------------------------------------- LPIPS

LPIPS_MIN_SIZE = {"vgg": 16, "alex": 32}  # smaller frames are pooled to nothing before LPIPS' last layer


def _load_lpips(net: str, allow_stand_in: bool, device) -> tuple[torch.nn.Module, dict]:
    from chopgrad import weights

    metric = f"lpips_{net}"
    missing = [name for name in weights.METRIC_WEIGHTS[metric] if weights.file_status(name) == "missing"]
    with contextlib.ExitStack() as stack:
        if missing and allow_stand_in:
            stack.enter_context(_scratch_hub())
            weights.write_stand_ins(missing)
        statuses = weights.require_metric(metric)  # MissingWeightsError before lpips can try a download
        import lpips

        model = lpips.LPIPS(net=net, version="0.1", pretrained=True, pnet_rand=False, verbose=False)
    info = {"metric": metric, "weights": statuses,
            "stand_in_weights": any(status != "official" for status in statuses.values())}
    return model.eval().requires_grad_(False).to(device), info


@contextlib.contextmanager
def _scratch_hub() -> Iterator[Path]:
    """Point ``torch.hub.get_dir()`` at a temporary folder, so stand-ins never land in a real cache."""
    previous = getattr(torch.hub, "_hub_dir", None)  # None: follow $TORCH_HOME, as before
    with tempfile.TemporaryDirectory(prefix="chopgrad-stand-ins-") as scratch:
        torch.hub.set_dir(scratch)
        try:
            yield Path(scratch)
        finally:
            torch.hub._hub_dir = previous


def lpips_loss(net: str = "vgg", allow_stand_in: bool = False,
               device: str | torch.device = "cpu") -> tuple[Callable[[Tensor, Tensor], Tensor], dict]:
    """LPIPS v0.1 (``lpips`` package) as a video loss ``loss(pred, target) -> scalar`` (mean over frames).

    Weights are checked through :mod:`chopgrad.weights` before lpips can try a download. With
    ``allow_stand_in`` and a missing backbone file, random stand-in weights of the right shapes are
    written into a temporary torch hub folder (never the user's cache) by
    ``chopgrad.weights.write_stand_ins`` and loaded by the same code as the real ones.

    Returns:
        ``(loss, info)``, ``info = {"metric", "weights": {file: status}, "stand_in_weights": bool}``.
    Raises:
        chopgrad.weights.MissingWeightsError: missing weights and not ``allow_stand_in``.
    """
    if net not in LPIPS_MIN_SIZE:
        raise ValueError(f"LPIPS net must be 'vgg' or 'alex', got {net!r}")
    model, info = _load_lpips(net, allow_stand_in, device)
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

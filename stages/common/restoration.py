"""The model the ``train`` stage trains and the ``infer`` stage runs: build it, save it, load it, run it.

A model is a :class:`chopgrad.restoration.Restorer` (Wan transformer + fixed text condition,
paper supplement C.2) and the project's causal VAE (``data/vae``), frozen except where the spec
says otherwise (a decoder LoRA, trained through ChopGrad). A JSON *spec* says how to rebuild it:

* ``transformer``: ``{"source": "small", "config": {...}, "seed": s, "dtype"}`` (a
  ``WanTransformer3DModel`` built from scratch: every weight is saved) or ``{"source": "pretrained",
  "path": ..., "dtype"}`` (real Wan 2.1 weights, reloaded from that folder: only the trained weights
  are saved); ``dtype`` is the weights' storage dtype (``float32`` or ``bfloat16``);
* ``transformer_lora`` / ``decoder_lora``: ``null`` or ``{"rank", "alpha"}`` (peft, :mod:`chopgrad.lora`);
  ``decoder_lora["adapters"]`` names the decoder adapters (default ``["decoder"]``; Mirage's schedule
  has two, :data:`MIRAGE_ADAPTERS`), all active in a built model;
* ``decoder_skip``: Mirage's skip connections from a per-frame encode of the degraded input into the
  decoder, fused by a trained 3x3 conv (:class:`chopgrad.skip.SkipDecoder`, supplement B.4);
* ``timestep``, ``text`` (how the fixed condition was made), ``latents_mean`` / ``latents_std``.

A trained model folder holds ``config.json`` (the spec) and ``model.safetensors`` (keys
``transformer.<name>`` and ``decoder.<name>``, plus ``text_embedding``). ``decoder.<name>`` are the
trained weights of :attr:`Model.decoder_module` (the VAE, or the skip decoder holding it and its
fusion conv).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import chopgrad
import chopgrad.restoration
from stages.common.video import from_tensor, to_tensor

__all__ = ["MODEL_FILE", "SPEC_FILE", "Model", "build_model", "check_vae_folder", "load_model", "restore_video",
           "roundtrip_model", "save_model", "spatial_factor"]

SPEC_FILE = "config.json"
MODEL_FILE = "model.safetensors"
DECODER_ADAPTER = "decoder"  # peft adapter name of the decoder LoRA
MIRAGE_ADAPTERS = ("reconstruction", "harmonization")  # Mirage's two decoder LoRAs, one per stage (B.4)


VAE_CLASSES = ("AutoencoderKLWan", "AutoencoderKLCogVideoX")  # the causal decoders chopgrad.wrap_decoder drives


def check_vae_folder(path: str | os.PathLike) -> Path:
    """A VAE folder (the ``vae`` stage's ``AutoencoderKLWan``, or a CogVideoX / DOVE ``vae/``), checked before any work."""
    folder = Path(path)
    fix = ("run the vae stage first (`dvc repro vae`) or pass --vae the folder it wrote (data/vae), or the vae/ "
           "folder of a CogVideoX / DOVE checkpoint")
    config = folder / "config.json"
    if not config.is_file():
        raise ValueError(f"VAE folder {folder} has no config.json (missing weights folder): {fix}")
    class_name = json.loads(config.read_text()).get("_class_name")
    if class_name not in VAE_CLASSES:
        raise ValueError(f"{folder} holds a {class_name}, not one of {', '.join(VAE_CLASSES)}: {fix}")
    if not any(folder.glob("diffusion_pytorch_model*")):
        raise ValueError(f"VAE folder {folder} has a config.json but no weights: {fix}")
    return folder


def vae_family(vae_config: dict) -> str:
    """``"wan"`` or ``"cogvideox"``, from a VAE's ``config.json``."""
    return "cogvideox" if vae_config.get("_class_name") == "AutoencoderKLCogVideoX" else "wan"


def spatial_factor(vae_config: dict) -> int:
    """Pixels per latent pixel of a VAE config (as :func:`chopgrad.wrap_decoder`'s adapters read it)."""
    if vae_family(vae_config) == "cogvideox":
        return 2 ** (len(vae_config["block_out_channels"]) - 1)
    return 2 ** (len(vae_config["dim_mult"]) - 1) * (vae_config.get("patch_size") or 1)


def temporal_factor(vae_config: dict) -> int:
    """Video frames per latent frame after the first (``1 + factor * k`` frames make ``1 + k`` latents)."""
    if vae_family(vae_config) == "cogvideox":
        return int(vae_config.get("temporal_compression_ratio", 4))
    return 2 ** sum(bool(flag) for flag in vae_config.get("temperal_downsample", [False, True, True]))


def clip_frames_rule(vae_config: dict) -> tuple[str, object]:
    """``(rule, test)``: which frame counts the VAE encodes and decodes back to the same count. Wan: 1 + 4k.
    CogVideoX: 1, 8k or 8k + 1 (its encoder batches 8 frames: 13 frames come back as 16)."""
    if vae_family(vae_config) == "cogvideox":
        return "1, 8k or 8k + 1 (CogVideoX)", lambda n: n == 1 or n % 8 in (0, 1)
    step = temporal_factor(vae_config)
    return f"1 + {step}k", lambda n: (n - 1) % step == 0


def latent_frames(vae_config: dict, frames: int) -> int:
    """Latent frames of a clip of ``frames`` (a count :func:`clip_frames_rule` accepts)."""
    temporal = temporal_factor(vae_config)
    if vae_family(vae_config) == "cogvideox" and frames % 8 == 0:
        return frames // temporal
    return (frames - 1) // temporal + 1


def frame_multiple(vae_config: dict) -> int:
    """Clips are ``1 + frame_multiple * k`` frames: the temporal factor (Wan: 4); 8 for CogVideoX, whose
    encoder batches 8 frames (a 13-frame clip decodes to 16; DOVE pads to 8k + 1)."""
    return 8 if vae_family(vae_config) == "cogvideox" else temporal_factor(vae_config)


def latent_channels(vae_config: dict) -> int:
    return int(vae_config["latent_channels"] if vae_family(vae_config) == "cogvideox" else vae_config["z_dim"])


def latent_stats(vae_config: dict) -> tuple[list[float], list[float]]:
    """``(mean, std)`` per latent channel that normalise the latents for the transformer: Wan's own
    ``latents_mean`` / ``latents_std``; CogVideoX scales by ``scaling_factor`` (mean 0, std 1 / factor),
    as its pipelines do."""
    if vae_family(vae_config) == "cogvideox":
        channels = latent_channels(vae_config)
        return [0.0] * channels, [1.0 / float(vae_config.get("scaling_factor", 1.15258426))] * channels
    return list(vae_config["latents_mean"]), list(vae_config["latents_std"])


@dataclass
class Model:
    """A restorer and its VAE, on one device."""

    spec: dict
    restorer: chopgrad.restoration.Restorer | None  # None: the VAE round trip (z = z_hat), see roundtrip_model
    vae: nn.Module  # diffusers AutoencoderKLWan or AutoencoderKLCogVideoX
    skip: nn.Module | None = None  # chopgrad.skip.SkipDecoder around vae, when the spec asks for it

    @property
    def transformer(self) -> nn.Module:
        return self.restorer.transformer

    def transformer_trainable(self) -> dict[str, nn.Parameter]:
        return _trainable(self.transformer)

    @property
    def decoder_module(self) -> nn.Module:
        """The module holding the decoder's trainable weights: the skip decoder, or the VAE."""
        return self.skip if self.skip is not None else self.vae

    def decoder_trainable(self) -> dict[str, nn.Parameter]:
        return _trainable(self.decoder_module)

    def decoder_weights(self) -> dict[str, nn.Parameter]:
        """Every decoder weight that training may change (LoRA adapters, the fusion conv), trainable
        right now or not: what is saved. Under Mirage's schedule a stage freezes the other's weights."""
        return {name: param for name, param in self.decoder_module.named_parameters()
                if param.requires_grad or "lora_" in name or name.startswith("fusion.")}

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent pixel: the VAE's spatial compression."""
        return int(chopgrad.wrap_decoder(self.vae).spatial_scale)

    @property
    def size_multiple(self) -> int:
        """Frame sides must be multiples of this: the VAE's factor times the transformer's patch."""
        if self.restorer is None:
            return self.spatial_factor
        patch = self.transformer.config.patch_size
        return self.spatial_factor * int(patch if isinstance(patch, int) else patch[1])

    @property
    def frame_multiple(self) -> int:
        """Videos are padded to ``1 + frame_multiple * k`` frames: the VAE's temporal factor (Wan: 4);
        8 for CogVideoX, whose encoder takes 1, 8k or 8k + 1 frames (DOVE pads to 8k + 1)."""
        return frame_multiple(dict(self.vae.config, _class_name=type(self.vae).__name__))

    def restore(self, z_hat: Tensor, text: Tensor | None = None) -> Tensor:
        """The restored latents (``z_hat`` itself for the VAE round trip)."""
        return z_hat if self.restorer is None else self.restorer(z_hat, text)

    def decoder(self, video: Tensor | None = None):
        """The decoder ChopGrad drives (:class:`chopgrad.CausalDecoder`), LoRA included.

        Args:
            video: the degraded input ``[B, 3, T, H, W]`` whose latents are decoded next; the skip
                decoder takes its skip features from it (ignored without skip connections).
        """
        if self.skip is None:
            return chopgrad.wrap_decoder(self.vae)
        if video is None:
            raise ValueError("this model's decoder has skip connections: pass the degraded input video")
        return self.skip.bind(video)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:  # [B, 3, T, H, W] in [-1, 1] -> normalised [B, C, t, h, w]
        """Posterior mean of the frozen encoder, normalised with the VAE's latents_mean/std."""
        latents = self.vae.encode(video).latent_dist.mode()
        return chopgrad.restoration.normalize_latents(latents, self.spec["latents_mean"], self.spec["latents_std"])

    def to_decoder(self, latents: Tensor) -> Tensor:  # normalised [B, C, t, h, w] -> what vae.decode takes
        return chopgrad.restoration.denormalize_latents(latents, self.spec["latents_mean"], self.spec["latents_std"])


def _trainable(module: nn.Module) -> dict[str, nn.Parameter]:
    # chopgrad.lora.trainable_parameters without importing peft (seconds) when no LoRA is used
    return {name: param for name, param in module.named_parameters() if param.requires_grad}


_VAES: dict[tuple, nn.Module] = {}


def _load_vae(vae_dir: str | os.PathLike, device: torch.device) -> nn.Module:
    """A fresh copy of the VAE in ``vae_dir`` (read from disk once per process: models mutate theirs with LoRA)."""
    import diffusers

    folder = check_vae_folder(vae_dir).resolve()
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(folder.iterdir()))
    key = (str(folder), stamp)
    if key not in _VAES:
        _VAES.clear()
        vae_class = getattr(diffusers, json.loads((folder / "config.json").read_text())["_class_name"])
        _VAES[key] = vae_class.from_pretrained(folder, local_files_only=True).eval().requires_grad_(False)
    return copy.deepcopy(_VAES[key]).to(device)


def _transformer(spec: dict) -> nn.Module:
    source = spec["transformer"]
    dtype = getattr(torch, source.get("dtype", "float32"))
    if source["source"] == "small":
        model = chopgrad.restoration.small_transformer(**source["config"], seed=source["seed"])
        return model if dtype == torch.float32 else model.to(dtype)
    return chopgrad.restoration.load_transformer(source["path"], torch_dtype=dtype)


def build_model(spec: dict, vae_dir: str | os.PathLike, text_embedding: Tensor | None = None,
                device: str | torch.device = "cpu") -> Model:
    """Build the model a spec describes, with fresh trainable weights.

    Args:
        spec: see the module docstring.
        vae_dir: the ``vae`` stage's folder.
        text_embedding: the fixed condition ``[1, L, text_dim]``; zeros of ``spec["text"]["shape"]``
            when None (a saved model loads its own over them).
    """
    device = torch.device(device)
    vae = _load_vae(vae_dir, device)
    transformer = _transformer(spec)
    channels = latent_channels(dict(vae.config))
    if int(transformer.config.in_channels) != channels:
        raise ValueError(f"the transformer takes {transformer.config.in_channels} latent channels but the VAE in "
                         f"{vae_dir} makes {channels}: use a transformer made for this VAE (Wan 2.1: 16)")
    if spec.get("transformer_lora") or spec.get("decoder_lora"):
        from chopgrad import lora
    if spec.get("transformer_lora"):
        lora.add_transformer_lora(transformer, spec["transformer_lora"]["rank"], spec["transformer_lora"]["alpha"])
    if spec.get("decoder_lora"):
        adapters = spec["decoder_lora"].get("adapters", [DECODER_ADAPTER])
        for name in adapters:
            lora.add_decoder_lora(vae, spec["decoder_lora"]["rank"], spec["decoder_lora"]["alpha"], name)
        if len(adapters) > 1:
            lora.set_adapters(vae, active=adapters, trainable=adapters)
        vae.train(False)
    skip = None
    if spec.get("decoder_skip"):
        from chopgrad.skip import SkipDecoder

        skip = SkipDecoder(vae).to(device)  # a zero-initialised fusion conv: starts as the plain decoder
        skip.fusion.requires_grad_(True)
    if text_embedding is None:
        text_embedding = torch.zeros(spec["text"]["shape"])
    if spec["transformer"].get("family", "wan") == "cogvideox":  # DOVE's one-step restorer
        restorer = chopgrad.restoration.CogVideoXRestorer(transformer, text_embedding, timestep=spec["timestep"],
                                                          alpha=spec["alpha"]).to(device)
    else:
        restorer = chopgrad.restoration.Restorer(transformer, text_embedding, timestep=spec["timestep"]).to(device)
    return Model(spec, restorer, vae, skip)


def roundtrip_model(vae_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Model:
    """The VAE round trip as a model: encode, no transformer (``z = z_hat``), decode.

    Where every restorer starts (a small transformer's output projection is zero-initialised, so
    ``v = 0``) and the best a frozen decoder can do from the encoder's latents: the reference that
    tells a method's gain apart from the VAE's own reconstruction error.
    """
    device = torch.device(device)
    vae = _load_vae(vae_dir, device)
    mean, std = latent_stats(dict(vae.config))
    return Model({"reference": "vae_roundtrip", "latents_mean": mean, "latents_std": std, "text": {}}, None, vae, None)


def model_state(model: Model, transformer_state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """What :func:`save_model` writes: ``transformer.*`` (all of a small model's weights, the trained
    ones of a pretrained model), ``decoder.*`` (the trained decoder weights) and ``text_embedding``.

    Args:
        transformer_state: the transformer's state when it was gathered elsewhere (FSDP: from
            :func:`chopgrad.distributed.full_model_state_dict`); read from the model when None.
    """
    small = model.spec["transformer"]["source"] == "small"
    if transformer_state is None:
        trainable = model.transformer_trainable()
        transformer_state = {k: v for k, v in model.transformer.state_dict().items() if small or k in trainable}
    state = {f"transformer.{k}": v for k, v in transformer_state.items()}
    state.update({f"decoder.{k}": v for k, v in model.decoder_weights().items()})
    state["text_embedding"] = model.restorer.text_embedding
    return state


def save_model(folder: str | os.PathLike, spec: dict, state: dict[str, Tensor]) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(folder / MODEL_FILE))
    (folder / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")


def load_model(folder: str | os.PathLike, vae_dir: str | os.PathLike, device: str | torch.device = "cpu") -> Model:
    """Rebuild a model saved by :func:`save_model` (pretrained bases reloaded from their folders).

    Raises:
        ValueError: the folder lacks its files, or the saved weights do not fit the rebuilt model.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / SPEC_FILE).is_file() or not (folder / MODEL_FILE).is_file():
        raise ValueError(f"{folder} is not a trained model folder ({SPEC_FILE} and {MODEL_FILE}): run the train stage")
    spec = json.loads((folder / SPEC_FILE).read_text())
    state = load_file(str(folder / MODEL_FILE))
    model = build_model(spec, vae_dir, state.pop("text_embedding"), device)
    for prefix, module in (("transformer.", model.transformer), ("decoder.", model.decoder_module)):
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not part:
            continue
        result = module.load_state_dict(part, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{folder / MODEL_FILE}: {len(result.unexpected_keys)} saved {prefix[:-1]} weights fit "
                             f"no parameter of the rebuilt model (e.g. {result.unexpected_keys[:2]}): the spec and "
                             "weights disagree")
    return model


def describe(model: Model) -> dict[str, Any]:
    """Parameter counts for the records."""
    count = lambda params: int(sum(p.numel() for p in params))
    return {"transformer_parameters": count(model.transformer.parameters()),
            "trainable_parameters": count(model.transformer_trainable().values())
            + count(model.decoder_trainable().values())}


@torch.no_grad()
def restore_video(model: Model, frames: np.ndarray, text: Tensor | None = None, tiles: tuple[int, int] = (1, 1),
                  halo: int = 2, autocast: bool = False) -> tuple[np.ndarray, dict]:
    """Run a model on a whole video: [T, H, W, 3] uint8 -> [T, H, W, 3] uint8, and the seconds per part.

    The video is padded (last frame repeated; edges replicated) to 1 + 4k frames (8k for CogVideoX) and to sides that
    are multiples of the model's size multiple, and the output cut back to the input's size.
    ``autocast``: the transformer under bf16 autocast, as training runs it (on CUDA only).
    """
    device = next(model.vae.parameters()).device
    count, height, width = frames.shape[:3]
    multiple, step = model.size_multiple, model.frame_multiple
    padded_count = 1 + step * math.ceil((count - 1) / step)
    video = to_tensor(frames)[None]  # [1, 3, T, H, W]
    if padded_count > count:
        video = torch.cat([video, video[:, :, -1:].expand(-1, -1, padded_count - count, -1, -1)], dim=2)
    pad_h, pad_w = (-height) % multiple, (-width) % multiple
    if pad_h or pad_w:
        video = torch.nn.functional.pad(video[0], (0, pad_w, 0, pad_h), mode="replicate")[None]
    video = video.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings, start = {}, time.perf_counter()
    z_hat = model.encode(video)
    sync()
    timings["encode_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
        z = model.restore(z_hat, text)
    z = z.to(z_hat.dtype)
    sync()
    timings["transformer_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    out = chopgrad.decode(model.decoder(video), model.to_decoder(z), tiles=tiles, halo=halo)
    sync()
    timings["decode_seconds"] = time.perf_counter() - start
    return from_tensor(out[0, :, :count, :height, :width]), timings

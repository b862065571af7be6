"""Stage ``train``: fine-tune the single-step restorer with pixel losses through ChopGrad, and the paper's baselines.

One stage process per *method* (a DVC ``matrix``), each training its method on every task of
``train.tasks`` (paper section 4, supplement C.2; Table 2's ablation):

============== =====================================================================================
chopgrad_d0/1/2 latent MSE + pixel loss through :func:`chopgrad.decode_loss` with ``d_trunc`` 0/1/2
latent_mse      latent MSE only (the paper's ChopGrad*)
latent_mse_2x   latent MSE only, twice the steps (ChopGrad-dagger)
per_frame       latent MSE + pixel loss with every latent frame decoded on its own, no cache (DOVE-style)
============== =====================================================================================

The model (``stages/common/restorer.py``): Wan 2.1's ``WanTransformer3DModel`` as a one-step
restorer on the VAE latents (``z = z_hat - v``, timestep 200, a fixed caption's embedding), the
VAE from ``data/vae`` frozen except for an optional decoder LoRA. The losses per application are
the paper's (``train.loss_<application>``, ``{name: weight}`` mappings; ``latent_mse`` is the MSE on
the velocity): NVS and inpainting latent MSE + 100 LPIPS-VGG (C.2, C.3), super-resolution MSE 1 +
DISTS 0.1 (DOVE's stage 2, 4.1), driving LPIPS + 0.1 Gram (Mirage's harmonisation, B.4).
AdamW (paper: lr 1e-5, weight decay 0.1, betas 0.9/0.99), batch 1, one random clip and crop per
step. On GPU: bf16 autocast and activation checkpointing of the transformer. Under ``torchrun``
the transformer and its optimizer state are sharded with FSDP (``chopgrad/distributed.py``), each
rank trains on its own clip and rank 0 writes.

``train.schedule: mirage`` (with ``decoder_skip``, a decoder LoRA and a transformer LoRA) trains
each task in Mirage's two stages (B.4): ``reconstruction_steps`` steps of reconstruction (fusion conv
and the decoder LoRA ``reconstruction``, on the target's own latents, ``loss_reconstruction``), then
``steps`` of harmonisation (transformer LoRA and the decoder LoRA ``harmonization``), fresh AdamW
state at the switch (:func:`chopgrad.skip.mirage_stage`; docs/training.md).

Checkpoints (safetensors, atomic) every ``checkpoint_every`` steps in ``--checkpoints``: a run
that is interrupted resumes from the last one when started again with the same inputs and params
(a fingerprint of them is stored) and ends with the weights of an uninterrupted run. The folder is
removed once the stage has written its outputs.

Outputs, per task: ``<out>/<task>/`` with ``config.json`` + ``model.safetensors`` (the model,
``stages.common.restorer.load_model``), ``train.json``, ``sample.mp4`` (input | output | target);
``--metrics`` gathers the ``train.json`` records.

    python -m stages.train --params params.yaml --method chopgrad_d1 --vae data/vae \
        --pairs data/splat/nvs data/masks/inpaint_box ... --out data/train/chopgrad_d1 \
        --metrics metrics/train/chopgrad_d1.json --checkpoints checkpoints/train/chopgrad_d1
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import chopgrad
from chopgrad import distributed, restoration
from chopgrad import losses as pixel_losses
from stages.common import checkpoint as ckpt
from stages.common import cli, restorer
from stages.common import pairs as pairs_io
from stages.common.video import (
    from_tensor,
    list_frames,
    read_image,
    to_tensor,
    write_json,
    write_video,
)

log = logging.getLogger("stages.train")

STAGE = "train"
LATENT = "latent_mse"  # the name of the velocity MSE in the loss tables


@dataclass(frozen=True)
class Method:
    decode: Literal["chopgrad", "per_frame"] | None  # how the pixel loss decodes; None: latent MSE only
    d_trunc: int  # ChopGrad's truncation distance (per_frame: no cache, 0)
    steps_factor: int  # multiple of train.steps


METHODS = {
    "chopgrad_d0": Method("chopgrad", 0, 1),
    "chopgrad_d1": Method("chopgrad", 1, 1),
    "chopgrad_d2": Method("chopgrad", 2, 1),
    "latent_mse": Method(None, 0, 1),
    "latent_mse_2x": Method(None, 0, 2),
    "per_frame": Method("per_frame", 0, 1),
}
APPLICATIONS = ("nvs", "inpainting", "sr", "driving")
# The metric whose weight files each pixel loss loads (gram needs VGG16 only, a file lpips_vgg loads too).
LOSS_METRIC = {"lpips_vgg": "lpips_vgg", "dists": "dists", "gram": "lpips_vgg"}

LossTable = dict[str, float]


@dataclass(frozen=True)
class Params:
    tasks: tuple[str, ...]  # tasks each method trains on (their pairs folders are given on the command line)
    transformer_path: str | None  # null: a small Wan transformer from scratch (sizes below); else a Wan 2.1 folder
    transformer_dtype: Literal["float32", "bfloat16"]  # weight storage; bfloat16 halves a frozen 14B base (with LoRA)
    num_layers: int  # small transformer: blocks (Wan 2.1 14B: 40)
    num_heads: int  # small transformer: attention heads (14B: 40)
    head_dim: int  # small transformer: channels per head (14B: 128)
    ffn_dim: int  # small transformer: feed-forward width (14B: 13824)
    text_dim: int  # small transformer: text-embedding width (Wan's UMT5: 4096)
    freq_dim: int  # small transformer: sinusoidal timestep-embedding width (14B: 256)
    text_encoder_path: str | None  # Wan 2.1 folder with tokenizer/ + text_encoder/; null: seeded stand-in embedding
    caption: str  # the fixed caption (C.2), encoded when a text encoder is given
    timestep: int  # fixed diffusion timestep (C.2: 200)
    steps: int  # optimisation steps per task (latent_mse_2x: twice as many)
    clip_frames: int  # frames per training clip, 1 + 4k (C.2: 81)
    crop: tuple[int, int]  # training crop [height, width] in pixels (C.2: the full 480 x 832)
    lr: float  # AdamW learning rate (paper: 1e-5 for the pretrained 14B)
    weight_decay: float  # AdamW weight decay (paper: 0.1)
    betas: tuple[float, float]  # AdamW betas (paper: 0.9, 0.99)
    loss_nvs: LossTable  # {name: weight}; names: latent_mse + chopgrad.losses.KNOWN_LOSSES
    loss_inpainting: LossTable  # C.3: as NVS
    loss_sr: LossTable  # 4.1: DOVE's stage 2
    loss_driving: LossTable  # B.4: Mirage's harmonisation
    schedule: Literal["joint", "mirage"]  # joint: all trainable weights at once; mirage: B.4's two stages (below)
    reconstruction_steps: int  # mirage: reconstruction steps (fusion conv + decoder LoRA 1) before the harmonisation
    loss_reconstruction: LossTable  # mirage reconstruction: pixel losses on the VAE round trip of the target (B.4)
    tiles: tuple[int, int]  # ChopGrad spatial tiles [rows, cols] (C.2: 2 x 2); each must divide the latent crop
    halo: int  # latent pixels of context around each tile
    transformer_lora_rank: int  # 0: train every transformer weight; paper LoRA: 128
    transformer_lora_alpha: float  # paper: 64
    decoder_lora_rank: int  # 0: the decoder stays frozen; Mirage: 16 (trained through ChopGrad)
    decoder_lora_alpha: float  # Mirage: 16
    decoder_skip: bool  # Mirage's encoder-to-decoder skip connections, fusion conv trained (B.4)
    checkpoint_every: int  # steps between checkpoints
    sample_frames: int  # frames (1 + 4k) of the sample video written per task
    weights: Literal["official", "stand_in"]  # pixel-loss backbones: the real files, or random stand-ins if missing
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA when available
    mixed_precision: bool  # bf16 autocast of the transformer (GPU only)
    activation_checkpointing: bool  # recompute transformer blocks in backward (GPU only)
    seed: int  # model init and clip sampling
    threads: int  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        unknown = [task for task in self.tasks if task not in pairs_io.APPLICATIONS]
        if not self.tasks or unknown or len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"train.tasks must list distinct tasks from {sorted(pairs_io.APPLICATIONS)}, "
                             f"got {list(self.tasks)}")
        for name in ("num_layers", "num_heads", "head_dim", "ffn_dim", "text_dim", "freq_dim", "steps",
                     "checkpoint_every", "timestep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("clip_frames", "sample_frames"):
            value = getattr(self, name)
            if value < 1 or (value - 1) % 4:
                raise ValueError(f"train.{name} must be 1 + 4k (5, 9, ..., 81), got {value}")
        if min(self.crop) < 1 or min(self.tiles) < 1 or self.halo < 0:
            raise ValueError("train.crop and train.tiles must be positive and train.halo >= 0")
        if not (self.lr > 0 and self.weight_decay >= 0 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError("train.lr must be > 0, train.weight_decay >= 0 and train.betas in [0, 1)")
        if min(self.transformer_lora_rank, self.decoder_lora_rank) < 0:
            raise ValueError("train.transformer_lora_rank and train.decoder_lora_rank must be >= 0 (0: no LoRA)")
        if self.threads < 0:
            raise ValueError(f"train.threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.transformer_dtype == "bfloat16" and self.transformer_lora_rank == 0:
            # AdamW on bf16 weights rounds most lr-1e-5 updates away, and diffusers keeps some Wan modules in
            # float32, which FSDP's reduce-scatter refuses to mix with bf16 gradients.
            raise ValueError("train.transformer_dtype 'bfloat16' stores a frozen base for a LoRA: set "
                             "train.transformer_lora_rank > 0, or train every weight with transformer_dtype "
                             "'float32' (bf16 compute comes from train.mixed_precision)")
        for application in APPLICATIONS:
            loss_table(self, application)  # unknown names, repeats, bad weights
        if self.schedule == "mirage":
            needed = [setting for setting, ok in (("train.decoder_skip: true", self.decoder_skip),
                                                  ("train.decoder_lora_rank > 0", self.decoder_lora_rank > 0),
                                                  ("train.transformer_lora_rank > 0", self.transformer_lora_rank > 0))
                      if not ok]
            if needed:
                raise ValueError("train.schedule 'mirage' trains the fusion conv and a decoder LoRA, then a transformer "
                                 f"LoRA and a second decoder LoRA (B.4): set {', '.join(needed)}")
            if self.reconstruction_steps < 1:
                raise ValueError(f"train.reconstruction_steps must be >= 1 with train.schedule 'mirage', "
                                 f"got {self.reconstruction_steps}")
        reconstruction_losses(self)


def loss_table(params: Params, application: str) -> tuple[float, dict[str, float]]:
    """``(latent MSE weight, {pixel loss: weight})`` of an application; ValueError naming the key."""
    key = f"train.loss_{application}"
    known = (LATENT, *pixel_losses.KNOWN_LOSSES)
    table = getattr(params, f"loss_{application}")
    for name in table:
        if name not in known:
            raise ValueError(f"{key}: unknown loss {name!r}; known losses: {', '.join(known)}")
    pixel = pixel_losses.check_loss_weights({n: w for n, w in table.items() if n != LATENT}, what=key)
    latent = table.get(LATENT, 0.0)
    if not latent >= 0:
        raise ValueError(f"{key}: the weight of {LATENT!r} must be >= 0, got {latent}")
    if not any(w > 0 for w in pixel.values()):
        raise ValueError(f"{key} has no pixel loss with a weight > 0: the chopgrad and per_frame methods would be "
                         f"{LATENT}; add one of {', '.join(pixel_losses.KNOWN_LOSSES)}")
    return float(latent), {n: w for n, w in pixel.items() if w > 0}


def reconstruction_losses(params: Params) -> dict[str, float]:
    """``{pixel loss: weight}`` of Mirage's reconstruction stage; ValueError naming the key."""
    key = "train.loss_reconstruction"
    if LATENT in params.loss_reconstruction:
        raise ValueError(f"{key}: the reconstruction stage has no transformer, so no {LATENT!r}; "
                         f"use pixel losses ({', '.join(pixel_losses.KNOWN_LOSSES)})")
    pixel = pixel_losses.check_loss_weights(params.loss_reconstruction, what=key)
    if not any(w > 0 for w in pixel.values()):
        raise ValueError(f"{key} needs a pixel loss with a weight > 0")
    return {n: w for n, w in pixel.items() if w > 0}


def phases(params: Params, method: str) -> list[tuple[str, int]]:
    """``[(phase, steps), ...]`` a task trains through: ``joint``, or Mirage's ``reconstruction`` and
    ``harmonization`` (:func:`chopgrad.skip.mirage_stage`)."""
    steps = params.steps * METHODS[method].steps_factor
    if params.schedule == "mirage":
        return [("reconstruction", params.reconstruction_steps), ("harmonization", steps)]
    return [("joint", steps)]


def phase_at(params: Params, method: str, step: int) -> str:
    """The phase that step ``step`` (0-based) trains in."""
    for phase, count in phases(params, method):
        if step < count:
            return phase
        step -= count
    return phases(params, method)[-1][0]


# ----------------------------------------------------------------------------------------------------------
# Checks before any work


@dataclass(frozen=True)
class Task:
    name: str
    folder: Path
    application: str
    fps: float
    train: list[dict]  # pairs of the train split (from stages.common.pairs.load_pairs)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def plan(params: Params, method: str, pairs_dirs: list[str | Path], vae_dir: str | Path) -> dict:
    """Check everything a run needs before any work; return what it will train on.

    Raises:
        ValueError: an unknown method, missing or unusable folders, tasks without pairs folders,
            clips or crops that do not fit, tiles that do not divide the latent crop, tile
            interiors too small for the losses, or bad transformer / text-encoder folders.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; the train stage knows {', '.join(METHODS)}")
    vae_folder = restorer.check_vae_folder(vae_dir)
    vae_config = _json(vae_folder / "config.json")
    spatial = 2 ** (len(vae_config["dim_mult"]) - 1) * (vae_config.get("patch_size") or 1)
    config = transformer_config(params, vae_config)
    patch = tuple(config["patch_size"])
    if config["in_channels"] != vae_config["z_dim"]:
        raise ValueError(f"train.transformer_path: the transformer takes {config['in_channels']} latent "
                         f"channels, the VAE in {vae_folder} makes {vae_config['z_dim']}")
    if params.text_encoder_path is not None:
        for sub in ("tokenizer", "text_encoder"):
            if not (Path(params.text_encoder_path) / sub).is_dir():
                raise ValueError(f"train.text_encoder_path: {params.text_encoder_path} has no {sub}/ folder; point "
                                 "it at a Wan 2.1 diffusers folder (tokenizer/ and text_encoder/) or set it to null")
    multiple = spatial * patch[1]
    if any(size % multiple for size in params.crop):
        raise ValueError(f"train.crop {list(params.crop)} must be multiples of {multiple} (the VAE's {spatial}x "
                         f"times the transformer's patch {patch[1]})")
    latent = [size // spatial for size in params.crop]
    if latent[0] % params.tiles[0] or latent[1] % params.tiles[1]:
        raise ValueError(f"train.tiles {list(params.tiles)} do not divide the latent crop {latent[0]}x{latent[1]} "
                         f"(train.crop {list(params.crop)} / {spatial}): choose tile counts that divide it")

    by_task: dict[str, Path] = {}
    for folder in map(Path, pairs_dirs):
        manifest = pairs_io.load_manifest(folder, check_frames=False)
        if manifest["task"] in by_task:
            raise ValueError(f"two pairs folders hold task {manifest['task']!r}: {by_task[manifest['task']]} "
                             f"and {folder}")
        by_task[manifest["task"]] = folder
    tasks = []
    for name in params.tasks:
        if name not in by_task:
            raise ValueError(f"train.tasks lists {name!r} but no pairs folder given with --pairs holds it "
                             f"(given: {sorted(by_task) or 'none'}); run its data stage or remove it from train.tasks")
        manifest = pairs_io.load_manifest(by_task[name])
        train = [pair for pair in manifest["pairs"] if pair["split"] == "train"]
        if not train:
            raise ValueError(f"{by_task[name]} has no train pairs to train {name!r} on")
        for pair in train:
            if pair["frames"] < params.clip_frames or pair["height"] < params.crop[0] or pair["width"] < params.crop[1]:
                raise ValueError(f"{name} pair {pair['scene']!r} ({pair['frames']} frames of {pair['height']}x"
                                 f"{pair['width']}) is smaller than train.clip_frames={params.clip_frames} x "
                                 f"train.crop={list(params.crop)}")
        application = manifest["application"]
        pixel = loss_table(params, application)[1] if METHODS[method].decode else {}
        if params.schedule == "mirage":
            pixel = {**pixel, **reconstruction_losses(params)}
        if pixel:
            smallest = max(pixel_losses.MIN_SIZE[n] for n in pixel)
            tile = min(params.crop[0] // params.tiles[0], params.crop[1] // params.tiles[1])
            if tile < smallest:
                raise ValueError(f"tiles of {tile} pixels (train.crop / train.tiles) are too small for the "
                                 f"{application} "
                                 f"losses {sorted(pixel)} (at least {smallest}): use a larger crop or fewer tiles")
        tasks.append(Task(name, by_task[name], application, float(manifest["fps"]), train))
    return {"tasks": tasks, "vae_config": vae_config, "size_multiple": multiple}


def transformer_config(params: Params, vae_config: dict) -> dict:
    """``patch_size``, ``in_channels`` and ``text_dim`` of the transformer the params describe (no loading)."""
    if params.transformer_path is None:
        return {"patch_size": [1, 2, 2], "in_channels": int(vae_config["z_dim"]), "text_dim": params.text_dim}
    folder, sub = restoration.check_transformer_folder(params.transformer_path)
    config = _json((folder / sub if sub else folder) / "config.json")
    return {"patch_size": config.get("patch_size", [1, 2, 2]), "in_channels": config.get("in_channels", 16),
            "text_dim": config.get("text_dim", 4096)}


def _pixel_metrics(params: Params, method: str, tasks: list[Task]) -> list[str]:
    names = set(reconstruction_losses(params)) if params.schedule == "mirage" else set()
    if METHODS[method].decode:
        names |= {n for task in tasks for n in loss_table(params, task.application)[1]}
    return sorted({LOSS_METRIC[n] for n in names if n in LOSS_METRIC})


# ----------------------------------------------------------------------------------------------------------
# Data


class Clips:
    """Random (input, target) clips and crops of a task's train pairs, read from the PNG frames on demand."""

    def __init__(self, task: Task, frames: int, crop: tuple[int, int]):
        self.task, self.frames, self.crop = task, frames, crop
        self.paths = [(list_frames(pair["input"]), list_frames(pair["target"])) for pair in task.train]

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(input, target, pair index)``: two [1, 3, frames, crop_h, crop_w] tensors in [-1, 1]."""
        index = int(torch.randint(len(self.paths), (), generator=generator))
        pair, (inputs, targets) = self.task.train[index], self.paths[index]
        start = int(torch.randint(pair["frames"] - self.frames + 1, (), generator=generator))
        top = int(torch.randint(pair["height"] - self.crop[0] + 1, (), generator=generator))
        left = int(torch.randint(pair["width"] - self.crop[1] + 1, (), generator=generator))

        def clip(paths):
            frames = np.stack([read_image(path)[top:top + self.crop[0], left:left + self.crop[1]]
                               for path in paths[start:start + self.frames]])
            return to_tensor(frames)[None]  # [1, 3, T, H, W]

        return clip(inputs), clip(targets), index


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The clip sampler of one step on one rank: a pure function of (seed, step, rank), so a resumed or
    re-sharded run draws the same clips without carrying generator state."""
    state = np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


# ----------------------------------------------------------------------------------------------------------
# Model, losses, one step


def model_spec(params: Params, vae_config: dict) -> dict:
    if params.transformer_path is None:
        transformer = {"source": "small", "seed": params.seed, "config": {
            "latent_channels": int(vae_config["z_dim"]), "num_layers": params.num_layers,
            "num_heads": params.num_heads, "head_dim": params.head_dim, "ffn_dim": params.ffn_dim,
            "text_dim": params.text_dim, "freq_dim": params.freq_dim,
            # A zeroed output projection starts the restorer at the identity; with a transformer LoRA
            # the projection is frozen, and zero would block every gradient: keep it random then.
            "zero_output": not params.transformer_lora_rank}}
    else:
        transformer = {"source": "pretrained", "path": str(Path(params.transformer_path).resolve())}
    transformer["dtype"] = params.transformer_dtype
    lora_spec = lambda rank, alpha: {"rank": rank, "alpha": alpha} if rank else None
    decoder_lora = lora_spec(params.decoder_lora_rank, params.decoder_lora_alpha)
    if decoder_lora:  # Mirage: one adapter per stage (B.4)
        mirage = params.schedule == "mirage"
        decoder_lora["adapters"] = list(restorer.MIRAGE_ADAPTERS) if mirage else [restorer.DECODER_ADAPTER]
    return {
        "transformer": transformer,
        "transformer_lora": lora_spec(params.transformer_lora_rank, params.transformer_lora_alpha),
        "decoder_lora": decoder_lora,
        "decoder_skip": params.decoder_skip,
        "timestep": params.timestep,
        "latents_mean": list(vae_config["latents_mean"]), "latents_std": list(vae_config["latents_std"]),
        "text": {"caption": params.caption, "encoder": params.text_encoder_path},
    }


def text_embeddings(params: Params, text_dim: int, prompts: list[str | None]) -> tuple[torch.Tensor, dict]:
    """The fixed caption's embedding [1, L, text_dim] and one per distinct prompt.

    Without a text encoder (``train.text_encoder_path: null``) the caption's embedding is a seeded
    random stand-in (:func:`chopgrad.restoration.fixed_text_embedding`) and pair prompts are not used.
    """
    if params.text_encoder_path is None:
        return restoration.fixed_text_embedding(text_dim, seed=params.seed), {}
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(params.text_encoder_path, subfolder="tokenizer", local_files_only=True)
    encoder = UMT5EncoderModel.from_pretrained(params.text_encoder_path, subfolder="text_encoder",
                                               local_files_only=True).eval()
    distinct = sorted({p for p in prompts if p})
    embedded = restoration.encode_prompts([params.caption, *distinct], tokenizer, encoder)
    if embedded.shape[-1] != text_dim:
        raise ValueError(f"train.text_encoder_path encodes to {embedded.shape[-1]} channels but the transformer takes "
                         f"{text_dim}: use the text encoder of the same Wan model")
    return embedded[:1], {p: embedded[i + 1:i + 2] for i, p in enumerate(distinct)}


@dataclass
class StepResult:
    loss: float
    latent: float | None  # None in Mirage's reconstruction stage (no transformer)
    pixel: float | None


def train_step(model: restorer.Model, method: Method, latent_weight: float, pixel_loss, params: Params,
               clip: tuple[torch.Tensor, torch.Tensor], text: torch.Tensor | None, device: torch.device,
               autocast: bool) -> tuple[torch.Tensor, StepResult]:
    """Forward and backward of one clip; returns the loss tensor (already backpropagated) and its terms."""
    degraded, target = (x.to(device) for x in clip)
    z_hat, z = model.encode(degraded), model.encode(target)  # normalised [1, C, t, h, w]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        velocity = model.restorer.velocity(z_hat, text)
    velocity = velocity.float()
    latent = torch.mean((velocity - (z_hat - z)) ** 2)  # target v = z_hat - z
    loss = (latent_weight if method.decode else 1.0) * latent
    pixel = None
    if method.decode:
        decoder = model.decoder(degraded, params.tiles, params.halo)
        if method.decode == "per_frame":
            decoder = pixel_losses.PerFrameDecoder(decoder)
        restored = model.to_decoder(z_hat - velocity)  # z = z_hat - v, as vae.decode takes it
        pixel = chopgrad.decode_loss(decoder, restored, target, pixel_loss, d_trunc=method.d_trunc,
                                     tiles=params.tiles, halo=params.halo)
        loss = loss + pixel
    loss.backward()
    return loss, StepResult(float(loss.detach()), float(latent.detach()),
                            None if pixel is None else float(pixel.detach()))


def reconstruction_step(model: restorer.Model, method: Method, loss_fn, params: Params, target: torch.Tensor,
                        device: torch.device) -> StepResult:
    """Mirage's reconstruction stage (B.4): the target's own latents decoded with skip features of the
    target, the pixel loss backpropagated into the fusion conv and the first decoder LoRA. Decoding as
    the method decodes (ChopGrad's ``d_trunc``, per-frame); latent-only methods backpropagate fully."""
    target = target.to(device)
    z = model.encode(target)
    decoder = model.decoder(target, params.tiles, params.halo)
    if method.decode == "per_frame":
        decoder = pixel_losses.PerFrameDecoder(decoder)
    d_trunc = method.d_trunc if method.decode else None
    pixel = chopgrad.decode_loss(decoder, model.to_decoder(z), target, loss_fn, d_trunc=d_trunc,
                                 tiles=params.tiles, halo=params.halo)
    pixel.backward()
    return StepResult(float(pixel.detach()), None, float(pixel.detach()))


# ----------------------------------------------------------------------------------------------------------
# Training one task


def _set_phase(model: restorer.Model, phase: str) -> None:
    """Set what trains in ``phase`` (``joint``: whatever the model was built trainable)."""
    if phase != "joint":
        from chopgrad.skip import mirage_stage

        mirage_stage(phase, model.skip, model.transformer, decoder_adapters=restorer.MIRAGE_ADAPTERS)


def _optimizers(model: restorer.Model, params: Params) -> dict:
    """Fresh AdamW optimizers (``transformer``, ``decoder``) over what trains now."""
    optimizers = {}
    for name, group in (("transformer", model.transformer_trainable()), ("decoder", model.decoder_trainable())):
        if group:
            optimizers[name] = torch.optim.AdamW(list(group.values()), lr=params.lr, betas=params.betas,
                                                 weight_decay=params.weight_decay)
    return optimizers


def _peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_rss_bytes": None}
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far (all tasks before this one too).
    return {"peak_memory_bytes": None, "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def _fingerprint(params: Params, method: str, task: Task, vae_dir: Path, world_size: int) -> str:
    """What a checkpoint must have been written with to be resumed: the params, method, task, world
    size, the VAE (config and weights, by content) and the training pairs (pairs.json, and the names
    and sizes of their frame files: cheap, and no modification time, which `dvc checkout` changes)."""
    digest = hashlib.sha256(json.dumps({"params": asdict(params), "method": method, "task": task.name,
                                        "world_size": world_size}, sort_keys=True).encode())
    digest.update((task.folder / pairs_io.PAIRS_FILE).read_bytes())
    for pair in task.train:
        for key in ("input", "target"):
            for path in list_frames(pair[key]):
                digest.update(f"{path.name}:{path.stat().st_size};".encode())
    for path in sorted(vae_dir.iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def _checkpoint_tensors(model: restorer.Model, optimizers: dict) -> tuple[dict, dict]:
    """Trainable weights and optimizer states as flat tensors (collectives under FSDP: every rank calls it)."""
    tensors = {f"model/transformer/{k}": v for k, v in
               distributed.full_model_state_dict(model.transformer, trainable_only=True).items()}
    tensors.update({f"model/decoder/{k}": v.detach() for k, v in model.decoder_weights().items()})
    groups = {}
    if "transformer" in optimizers:
        state = distributed.full_optimizer_state_dict(model.transformer, optimizers["transformer"])
        if state:  # ranks other than 0 receive {}
            flat, groups["transformer"] = ckpt.flatten_optimizer("optim/transformer/", state)
            tensors.update(flat)
    if "decoder" in optimizers:
        state = ckpt.named_optimizer_state(optimizers["decoder"], model.decoder_trainable())
        flat, groups["decoder"] = ckpt.flatten_optimizer("optim/decoder/", state)
        tensors.update(flat)
    return tensors, groups


def _restore(model: restorer.Model, optimizers: dict, tensors: dict, groups: dict | None) -> None:
    """Weights and RNG from a checkpoint; optimizer states too unless ``groups`` is None (a checkpoint
    written in the previous Mirage stage: the next stage starts with fresh optimizers, as it does
    without an interruption)."""
    prefix = "model/transformer/"
    transformer_state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    distributed.load_full_model_state_dict(model.transformer, transformer_state, strict=False)
    with torch.no_grad():
        for name, param in model.decoder_weights().items():
            param.copy_(tensors[f"model/decoder/{name}"])
    if groups is None:
        optimizers = {}
    if "transformer" in optimizers:
        state = ckpt.unflatten_optimizer("optim/transformer/", tensors, groups["transformer"])
        distributed.load_full_optimizer_state_dict(model.transformer, optimizers["transformer"], state)
    if "decoder" in optimizers:
        state = ckpt.unflatten_optimizer("optim/decoder/", tensors, groups["decoder"])
        ckpt.load_named_optimizer_state(optimizers["decoder"], model.decoder_trainable(), state)
    ckpt.restore_rng(tensors, {})


def train_task(params: Params, method: str, task: Task, vae_dir: Path, checkpoint_path: Path, out_dir: Path,
               info: distributed.DistInfo, pixel_loss=None, on_step: Callable[[int], None] | None = None,
               reconstruction_loss=None) -> dict:
    """Train ``method`` on ``task`` (resuming from ``checkpoint_path`` when it matches) and write ``out_dir``.

    Args:
        pixel_loss: the application's :class:`chopgrad.losses.PixelLoss` (None for latent-only methods).
        on_step: called with the step count after every step and its checkpoint (tests stop runs here).
        reconstruction_loss: the :class:`~chopgrad.losses.PixelLoss` of Mirage's reconstruction stage
            (``train.schedule: mirage`` only).

    Returns:
        The task's record (also written to ``out_dir / "train.json"``) with its loss ``history``.
    """
    spec_method = METHODS[method]
    total_steps = sum(count for _, count in phases(params, method))
    latent_weight, _ = loss_table(params, task.application)
    device = info.device
    on_gpu = device.type == "cuda"

    vae_config = _json(vae_dir / "config.json")
    spec = model_spec(params, vae_config)
    torch.manual_seed(params.seed)
    text_dim = transformer_config(params, vae_config)["text_dim"]
    caption, prompt_embeddings = text_embeddings(params, text_dim, [pair["prompt"] for pair in task.train])
    spec["text"]["shape"] = list(caption.shape)
    model = restorer.build_model(spec, vae_dir, caption, device)
    model.restorer.train()
    if on_gpu and params.activation_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    fingerprint = _fingerprint(params, method, task, vae_dir, info.world_size)
    record = {"step": 0, "fingerprint": fingerprint, "history": [], "seconds": 0.0}
    loaded = ckpt.load_checkpoint(checkpoint_path)
    resume = loaded is not None and loaded[1].get("fingerprint") == fingerprint
    phase = phase_at(params, method, loaded[1]["step"] if resume else 0)
    _set_phase(model, phase)  # requires_grad before sharding
    distributed.shard_transformer(model.transformer)  # a no-op without torchrun
    optimizers = _optimizers(model, params)
    if resume:
        tensors, record = loaded
        groups = record.pop("groups")
        same_stage = phase_at(params, method, record["step"] - 1) == phase  # else the optimizers start fresh
        _restore(model, optimizers, tensors, groups if same_stage else None)
        log.info("%s/%s: resuming from step %d (%s)", method, task.name, record["step"], checkpoint_path)
    elif loaded is not None:
        log.warning("%s/%s: %s was written with other inputs or params; starting over", method, task.name,
                    checkpoint_path)
    resumed_from = record["step"]

    clips = Clips(task, params.clip_frames, params.crop)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats(device)
    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=record["step"], desc=f"train {method}/{task.name}", unit="step",
               disable=not info.is_main, file=sys.stderr, mininterval=1.0)
    while record["step"] < total_steps:
        step = record["step"]
        if phase_at(params, method, step) != phase:  # Mirage: reconstruction -> harmonization, fresh optimizers
            phase = phase_at(params, method, step)
            _set_phase(model, phase)
            optimizers = _optimizers(model, params)
            log.info("%s/%s: %s stage from step %d", method, task.name, phase, step)
        started = time.perf_counter()
        degraded, target, index = clips.sample(step_generator(params.seed, step, info.rank))
        if phase == "reconstruction":
            result = reconstruction_step(model, spec_method, reconstruction_loss, params, target, device)
        else:
            prompt = task.train[index]["prompt"]
            text = prompt_embeddings.get(prompt) if prompt else None
            _, result = train_step(model, spec_method, latent_weight, pixel_loss, params, (degraded, target),
                                   text, device, on_gpu and params.mixed_precision)
        distributed.all_reduce_gradients(model.decoder_trainable().values())
        for optimizer in optimizers.values():
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        record["seconds"] += seconds
        entry = {"step": step + 1, "phase": phase, "loss": distributed.all_reduce_mean(result.loss),
                 "lr": params.lr, "seconds": seconds}
        if result.latent is not None:
            entry["latent"] = distributed.all_reduce_mean(result.latent)
        if result.pixel is not None:
            entry["pixel"] = distributed.all_reduce_mean(result.pixel)
        record["history"].append(entry)
        record["step"] = step + 1
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4g}")
        if record["step"] % params.checkpoint_every == 0 or record["step"] == total_steps:
            tensors, groups = _checkpoint_tensors(model, optimizers)
            if info.is_main:
                tensors.update(ckpt.rng_tensors({}))
                ckpt.save_checkpoint(checkpoint_path, tensors, {**record, "groups": groups})
            distributed.barrier()
        if on_step is not None:
            on_step(record["step"])
    bar.close()

    transformer_state = distributed.full_model_state_dict(
        model.transformer, trainable_only=spec["transformer"]["source"] != "small")
    summary = _summary(params, method, task, record, resumed_from, latent_weight, pixel_loss, info)
    summary.update(restorer.describe(model))
    model.restorer.eval()
    sample = sample_video(model, task, params.sample_frames)  # every rank: the FSDP forward is a collective
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        restorer.save_model(out_dir, spec, restorer.model_state(model, transformer_state))
        write_json(out_dir / "train.json", summary)
        write_video(out_dir / "sample.mp4", sample, fps=task.fps)
    return {**summary, "history": record["history"]}


def _summary(params: Params, method: str, task: Task, record: dict, resumed_from: int, latent_weight: float,
             pixel_loss, info: distributed.DistInfo) -> dict:
    """The task's ``train.json`` record (interfaces.md), from the run's record of steps."""
    spec_method, history = METHODS[method], record["history"]
    last = [h for h in history if h.get("phase", "joint") == phases(params, method)[-1][0]]
    tail = last[-max(1, len(last) // 10):]  # "final": the mean of the last tenth of the (last stage's) steps
    first = [h for h in history if h.get("phase") == "reconstruction"]
    seconds = max(record["seconds"], 1e-9)
    return {
        "method": method, "task": task.name, "application": task.application,
        "steps": params.steps * spec_method.steps_factor, "resumed_from_step": resumed_from,
        "schedule": params.schedule, "reconstruction_steps": params.reconstruction_steps if params.schedule == "mirage" else 0,
        "final_reconstruction_loss": float(np.mean([h["loss"] for h in first[-max(1, len(first) // 10):]]))
        if first else None,
        "train_seconds": round(record["seconds"], 3), "seconds_per_step": round(seconds / max(1, len(history)), 4),
        "clip_frames_per_second": round(params.clip_frames * info.world_size * len(history) / seconds, 3),
        "final_loss": float(np.mean([h["loss"] for h in tail])),
        "final_latent_loss": float(np.mean([h["latent"] for h in tail])),
        "final_pixel_loss": float(np.mean([h["pixel"] for h in tail])) if spec_method.decode else None,
        **_peak_memory(info.device), "device": str(info.device), "world_size": info.world_size,
        "d_trunc": spec_method.d_trunc if spec_method.decode == "chopgrad" else None,
        "decoding": spec_method.decode, "latent_weight": latent_weight if spec_method.decode else 1.0,
        "pixel_losses": dict(pixel_loss.loss_weights) if pixel_loss is not None else {},
        "stand_in_weights": bool(pixel_loss is not None
                                 and any(status != "official" for status in pixel_loss.weights.values())),
        "clip_frames": params.clip_frames, "crop": list(params.crop), "tiles": list(params.tiles),
    }


@torch.no_grad()
def restore_video(model: restorer.Model, frames: np.ndarray, text: torch.Tensor | None = None,
                  tiles: tuple[int, int] = (1, 1), halo: int = 2, autocast: bool = False) -> tuple[np.ndarray, dict]:
    """Run a model on a whole video: [T, H, W, 3] uint8 -> [T, H, W, 3] uint8, and the seconds per part.

    The video is padded (last frame repeated; edges replicated) to 1 + 4k frames and to sides that
    are multiples of the model's size multiple, and the output cut back to the input's size.
    ``autocast``: the transformer under bf16 autocast, as ``train_step`` runs it (on CUDA only).
    """
    device = next(model.vae.parameters()).device
    count, height, width = frames.shape[:3]
    multiple = model.size_multiple
    padded_count = 1 + 4 * math.ceil((count - 1) / 4)
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
    out = chopgrad.decode(model.decoder(video, tiles, halo), model.to_decoder(z), tiles=tiles, halo=halo)
    sync()
    timings["decode_seconds"] = time.perf_counter() - start
    return from_tensor(out[0, :, :count, :height, :width]), timings


def sample_video(model: restorer.Model, task: Task, frames: int) -> np.ndarray:  # -> [T, H, 3W, 3] uint8
    """input | output | target of the first frames of the task's first train pair."""
    pair = task.train[0]
    count = min(frames, 1 + 4 * ((pair["frames"] - 1) // 4))
    read = lambda folder: np.stack([read_image(p) for p in list_frames(folder)[:count]])
    degraded, target = read(pair["input"]), read(pair["target"])
    output, _ = restore_video(model, degraded)
    return np.concatenate([degraded, output, target], axis=2)


# ----------------------------------------------------------------------------------------------------------
# The stage


@contextlib.contextmanager
def _loss_weights(params: Params, metrics: list[str], home: str | Path):
    """Open the weights policy for the pixel losses' backbones (stages/common/weights.py)."""
    if not metrics:
        yield None
        return
    from stages.common.weights import metric_home

    with metric_home(params.weights, home, metrics) as chosen:
        yield chosen


def _device(params: Params) -> torch.device | None:
    if params.device == "auto":
        return None  # distributed.init picks cuda:<local rank> when CUDA is available
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available: use 'auto' or 'cpu'")
    return torch.device(params.device)


def run(params: Params, method: str, vae_dir: str | Path, pairs_dirs: list[str | Path], out_dir: str | Path,
        metrics_path: str | Path, checkpoint_dir: str | Path, weights_home: str | Path = ".weights/stand_in",
        on_step: Callable[[str, int], None] | None = None) -> dict:
    """Train ``method`` on every task of ``params.tasks``; write ``out_dir``, ``metrics_path``.

    Returns:
        ``{"metrics": {...}, "tasks": {task: record with its "history"}, "samples": [mp4 paths]}``.
    """
    vae_dir, out_dir, metrics_path, checkpoint_dir = map(Path, (vae_dir, out_dir, metrics_path, checkpoint_dir))
    planned = plan(params, method, pairs_dirs, vae_dir)
    tasks: list[Task] = planned["tasks"]
    info = distributed.init(device=_device(params))
    started = time.perf_counter()
    # Outputs are built beside out_dir and swapped in at the end. Tasks already finished by an
    # interrupted run are not trained again (their checkpoints are at the last step): they are
    # rebuilt from their checkpoints and written again.
    build = out_dir.parent / f".{out_dir.name}.build"
    if info.is_main:
        shutil.rmtree(build, ignore_errors=True)
    distributed.barrier()
    records = {}
    with _loss_weights(params, _pixel_metrics(params, method, tasks), weights_home):
        losses_by_application = {}
        for task in tasks:
            pixel_loss = None
            if METHODS[method].decode:
                if task.application not in losses_by_application:
                    table = loss_table(params, task.application)[1]
                    losses_by_application[task.application] = pixel_losses.PixelLoss(table).to(info.device)
                pixel_loss = losses_by_application[task.application]
            if params.schedule == "mirage" and "reconstruction" not in losses_by_application:
                losses_by_application["reconstruction"] = pixel_losses.PixelLoss(
                    reconstruction_losses(params)).to(info.device)
            step_hook = (lambda step, name=task.name: on_step(name, step)) if on_step else None
            records[task.name] = train_task(params, method, task, vae_dir, checkpoint_dir / f"{task.name}.safetensors",
                                            build / task.name, info, pixel_loss, step_hook,
                                            losses_by_application.get("reconstruction"))
    metrics = {"method": method, "world_size": info.world_size, "seconds": round(time.perf_counter() - started, 2),
               "tasks": {name: {k: v for k, v in record.items() if k != "history"} for name, record in records.items()}}
    if info.is_main:
        pairs_io.swap_in(build, out_dir)
        write_json(metrics_path, metrics)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the outputs are in place: nothing to resume
    distributed.barrier()
    return {"metrics": metrics, "tasks": records, "samples": [out_dir / name / "sample.mp4" for name in records],
            "is_main": info.is_main}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--method", required=True, help=f"one of {', '.join(METHODS)}")
    parser.add_argument("--vae", required=True, help="the vae stage's folder (data/vae)")
    parser.add_argument("--pairs", nargs="+", required=True, help="pairs folders (data/splat/nvs, ...)")
    parser.add_argument("--out", required=True, help="output folder (data/train/<method>)")
    parser.add_argument("--metrics", required=True, help="metrics JSON (metrics/train/<method>.json)")
    parser.add_argument("--checkpoints", required=True, help="checkpoint folder, kept until the stage ends")
    parser.add_argument("--weights-home", default=".weights/stand_in", help="where stand-in loss weights go")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    try:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun workers: rank 0 alone logs to MLflow
            run(params, args.method, args.vae, args.pairs, args.out, args.metrics, args.checkpoints, args.weights_home)
            return
        from stages.common.tracking import stage_run

        # The MLflow run is named like the expanded DVC stage, train@<method>, as `dvc repro` names it.
        with stage_run(f"{STAGE}@{args.method}", params) as tracker:
            tracker.set_tags({"chopgrad.method": args.method})
            result = run(params, args.method, args.vae, args.pairs, args.out, args.metrics, args.checkpoints,
                         args.weights_home)
            log_result(tracker, result)
    finally:
        distributed.shutdown()


def log_result(tracker, result: dict) -> None:
    """Losses, learning rate, throughput, memory and sample videos of every task into the MLflow run."""
    for task, record in result["tasks"].items():
        history = record["history"]
        steps = [h["step"] for h in history]
        for key in ("loss", "latent", "pixel", "lr"):
            points = [(h["step"], h[key]) for h in history if h.get(key) is not None]
            if points:
                tracker.log_curve(f"{task}/{key}", *zip(*points))
        tracker.log_curve(f"{task}/steps_per_second", steps, [1.0 / max(h["seconds"], 1e-9) for h in history])
        tracker.log_metrics({f"{task}/{k}": v for k, v in record.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for sample in result["samples"]:
        tracker.log_artifact(sample, f"videos/{sample.parent.name}")
    tracker.log_metrics({"seconds": result["metrics"]["seconds"]})


if __name__ == "__main__":
    main()

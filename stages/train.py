"""Stage ``train``: fine-tune the single-step restorer with pixel losses through ChopGrad, and the paper's baselines.

One stage process per (experiment, method) (``experiments:`` in ``params.yaml``, the ``runs:`` table a
``foreach`` in ``dvc.yaml`` iterates over): ``--experiment`` gives its pairs, VAE, start and settings
over the ``train`` defaults (paper section 4, supplement C; Table 2's ablation). The
methods are declared once, in ``params.yaml``: ``{decode, d_trunc, iterations_factor}`` each
(:class:`stages.common.training.Method`).

The model (``stages/common/restoration.py``): Wan 2.1's ``WanTransformer3DModel`` as a one-step
restorer on the VAE latents (``z = z_hat - v``, timestep 200, a fixed caption's embedding), the
VAE from ``data/vae`` frozen except for an optional decoder LoRA. The losses per application are
the paper's (``train.loss_<application>``, ``{name: weight}`` mappings; ``latent_mse`` is the MSE on
the velocity): NVS and inpainting latent MSE + 100 LPIPS-VGG (C.2, C.3), super-resolution MSE 1 +
DISTS 0.1 (DOVE's stage 2, 4.1), driving LPIPS + 0.1 Gram (Mirage's harmonisation, B.4).
AdamW (paper: lr 1e-5, weight decay 0.1, betas 0.9/0.99), batch 1, one random clip and crop per
iteration (an *iteration* is one optimiser update; a *step* is one decode step, as in
:mod:`chopgrad`). On GPU: bf16 autocast and activation checkpointing of the transformer. Under
``torchrun`` the transformer and its optimizer state are sharded with FSDP (``chopgrad/distributed.py``),
each rank trains on its own clip and rank 0 writes.

``train.schedule: mirage`` (with ``decoder_skip``, a decoder LoRA and a transformer LoRA) trains
each task in Mirage's two phases (B.4): ``reconstruction_iterations`` of reconstruction (fusion conv
and the decoder LoRA ``reconstruction``, on the target's own latents, ``loss_reconstruction``), then
``iterations`` of harmonisation (transformer LoRA and the decoder LoRA ``harmonization``), fresh AdamW
state at the switch (:func:`chopgrad.skip.mirage_phase`; docs/training.md).

Checkpoints (safetensors, atomic) every ``checkpoint_every`` iterations in ``--checkpoints``: a run
that is interrupted resumes from the last one when started again with the same inputs and params
(a fingerprint of them is stored) and ends with the weights of an uninterrupted run. The folder is
removed once the stage has written its outputs.

Outputs, per experiment (task): ``<out>/<experiment>/`` with ``config.json`` + ``model.safetensors`` (the model,
``stages.common.restoration.load_model``), ``train.json``, ``sample.mp4`` (input | output | target).
They hold only what the inputs and params determine, so a rerun writes the same bytes and DVC reruns
nothing after it; what the run measured (seconds, throughput, peak memory, device, the iteration it
resumed from) goes to ``--metrics`` alone, beside each task's ``train.json`` record (layouts:
docs/interfaces.md).

    python -m stages.train --params params.yaml --experiment nvs --method chopgrad_d1 \
        --out data/train/chopgrad_d1 --metrics metrics/train/chopgrad_d1/nvs.json \
        --checkpoints checkpoints/train/nvs-chopgrad_d1

Without ``--experiment``, ``--vae`` and ``--pairs`` (any number of folders, one task each) with the
``train`` section as it is (library and test use).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import chopgrad.restoration
from chopgrad import distributed
from chopgrad import losses as pixel_losses
from stages.common import checkpoint as ckpt
from stages.common import cli, experiments, measure, restoration, training
from stages.common import pairs as pairs_io
from stages.common.params import ParamsError, params_from_mapping
from stages.common.training import Method
from stages.common.video import list_frames, read_image, write_json, write_video

log = logging.getLogger("stages.train")

STAGE = "train"
LATENT = "latent_mse"  # the name of the velocity MSE in the loss tables
APPLICATIONS = ("nvs", "inpainting", "sr", "driving")
# The metric whose weight files each pixel loss loads (gram needs VGG16 only, a file lpips_vgg loads too).
LOSS_METRIC = {"lpips_vgg": "lpips_vgg", "dists": "dists", "gram": "lpips_vgg"}

LossTable = dict[str, float]


@dataclass(frozen=True)
class Params:
    methods: dict[str, Method]  # Table 2's methods by name; dvc.yaml runs train@<name> for each
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
    iterations: int | None  # optimiser updates per task (times the method's iterations_factor); null: from epochs
    epochs: int | None  # passes over the task's train videos (C.3: 5), batch = train.nproc_per_node x nnodes /
    # sequence_parallel: iterations = ceil(epochs x videos / batch); null: train.iterations
    clip_frames: int  # frames per training clip: Wan 1 + 4k (C.2: 81); CogVideoX 1, 8k or 8k + 1 (4.1: 24)
    crop: tuple[int, int]  # training crop [height, width] in pixels (C.2: the full 480 x 832)
    lr: float  # AdamW learning rate (paper: 1e-5 for the pretrained 14B)
    weight_decay: float  # AdamW weight decay (paper: 0.1)
    betas: tuple[float, float]  # AdamW betas (paper: 0.9, 0.99)
    loss_nvs: LossTable  # {name: weight}; names: latent_mse + chopgrad.losses.KNOWN_LOSSES
    loss_inpainting: LossTable  # C.3: as NVS
    loss_sr: LossTable  # 4.1: DOVE's stage 2
    loss_driving: LossTable  # B.4: Mirage's harmonisation
    schedule: Literal["joint", "mirage"]  # joint: all trainable weights at once; mirage: B.4's two phases (below)
    reconstruction_iterations: int  # mirage: reconstruction iterations (fusion conv + decoder LoRA 1) first
    loss_reconstruction: LossTable  # mirage reconstruction: pixel losses on the VAE round trip of the target (B.4)
    tiles: tuple[int, int]  # ChopGrad spatial tiles [rows, cols] (C.2: 2 x 2); need not divide the latent crop
    halo: int  # latent pixels of context around each tile
    transformer_lora_rank: int  # 0: train every transformer weight; paper LoRA: 128
    transformer_lora_alpha: float  # paper: 64
    decoder_lora_rank: int  # 0: the decoder stays frozen; Mirage: 16 (trained through ChopGrad)
    decoder_lora_alpha: float  # Mirage: 16
    decoder_skip: bool  # Mirage's encoder-to-decoder skip connections, fusion conv trained (B.4)
    checkpoint_every: int  # iterations between checkpoints
    validation_every: int  # iterations between PSNRs on the pairs' validation split (and at the end); 0: none
    sample_frames: int  # frames (1 + 4k) of the sample video written per task
    weights: Literal["official", "stand_in", "substitute"]  # pixel-loss backbones (below, and apply_substitutes)
    substitutes: dict[str, LossTable]  # weights "substitute": a network loss whose files are missing -> these losses
    nproc_per_node: int  # processes (GPUs) per node; with nproc_per_node x nnodes > 1 the stage starts torchrun itself
    nnodes: int  # nodes; > 1: start the same stage command on every node (rdzv_endpoint below)
    rdzv_endpoint: str | None  # nnodes > 1: host:port of the rendezvous (torchrun --rdzv-endpoint), the same on every node
    sequence_parallel: int  # ranks that share one sample (Ulysses context parallelism, tiles across them); divides the world
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA when available
    mixed_precision: bool  # bf16 autocast of the transformer (GPU only)
    activation_checkpointing: bool  # recompute transformer blocks in backward (GPU only)
    seed: int  # model init and clip sampling
    threads: int  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        if not self.methods:
            raise ValueError("train.methods is empty: declare at least one method (see params.yaml)")
        if (self.iterations is None) == (self.epochs is None):
            raise ValueError(f"set one of train.iterations and train.epochs, the other null; got iterations "
                             f"{self.iterations}, epochs {self.epochs}")
        for name in ("iterations", "epochs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("num_layers", "num_heads", "head_dim", "ffn_dim", "text_dim", "freq_dim",
                     "checkpoint_every", "timestep"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.validation_every < 0:
            raise ValueError(f"train.validation_every must be >= 0 (0: no validation), got {self.validation_every}")
        for name in ("clip_frames", "sample_frames"):  # the VAE's own rule is checked with the VAE (plan)
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"train.{name} must be >= 1 (Wan: 1 + 4k, e.g. 81; CogVideoX: 1, 8k or 8k + 1), got {value}")
        if min(self.crop) < 1 or min(self.tiles) < 1 or self.halo < 0:
            raise ValueError("train.crop and train.tiles must be positive and train.halo >= 0")
        if not (self.lr > 0 and self.weight_decay >= 0 and all(0 <= b < 1 for b in self.betas)):
            raise ValueError("train.lr must be > 0, train.weight_decay >= 0 and train.betas in [0, 1)")
        if min(self.transformer_lora_rank, self.decoder_lora_rank) < 0:
            raise ValueError("train.transformer_lora_rank and train.decoder_lora_rank must be >= 0 (0: no LoRA)")
        if self.threads < 0:
            raise ValueError(f"train.threads must be >= 0 (0: torch's default), got {self.threads}")
        self._check_processes()
        if self.transformer_dtype == "bfloat16" and self.transformer_lora_rank == 0:
            # AdamW on bf16 weights rounds most lr-1e-5 updates away, and diffusers keeps some Wan modules in
            # float32, which FSDP's reduce-scatter refuses to mix with bf16 gradients.
            raise ValueError("train.transformer_dtype 'bfloat16' stores a frozen base for a LoRA: set "
                             "train.transformer_lora_rank > 0, or train every weight with transformer_dtype "
                             "'float32' (bf16 compute comes from train.mixed_precision)")
        for application in APPLICATIONS:
            loss_table(self, application)  # unknown names, repeats, bad weights
        self._check_substitutes()
        if self.schedule == "mirage":
            self._check_mirage()
        reconstruction_losses(self)

    @property
    def world_size(self) -> int:
        """Processes of one run: ``nproc_per_node x nnodes``."""
        return self.nproc_per_node * self.nnodes

    @property
    def data_parallel(self) -> int:
        """Samples per optimiser step (the effective batch): one per group of ``sequence_parallel`` ranks."""
        return self.world_size // self.sequence_parallel

    def _check_processes(self):
        for name in ("nproc_per_node", "nnodes", "sequence_parallel"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.world_size % self.sequence_parallel:
            raise ValueError(f"train.sequence_parallel {self.sequence_parallel} must divide the processes of a run, "
                             f"train.nproc_per_node x train.nnodes = {self.world_size}")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError("train.nnodes > 1 needs train.rdzv_endpoint: host:port of the first node, reachable "
                             "from every node (torchrun --rdzv-endpoint)")
        if self.sequence_parallel > 1 and self.transformer_path is None and self.num_heads % self.sequence_parallel:
            raise ValueError(f"train.sequence_parallel {self.sequence_parallel} must divide train.num_heads "
                             f"{self.num_heads} (Ulysses attention gives each rank whole heads)")

    def _check_substitutes(self):
        for name, table in self.substitutes.items():
            if name not in LOSS_METRIC:
                raise ValueError(f"train.substitutes: {name!r} is not a loss with weight files; substitute one of "
                                 f"{', '.join(LOSS_METRIC)}")
            losses = pixel_losses.check_loss_weights(table, what=f"train.substitutes.{name}")
            heavy = [n for n in losses if n in LOSS_METRIC]
            if heavy or not any(w > 0 for w in losses.values()):
                raise ValueError(f"train.substitutes.{name} must be losses without weight files (mse) with a "
                                 f"weight > 0, got {dict(table)}")
        if self.weights == "substitute":
            used = {n for application in APPLICATIONS for n in loss_table(self, application)[1]}
            used |= set(reconstruction_losses(self)) if self.schedule == "mirage" else set()
            missing = sorted(n for n in used if n in LOSS_METRIC and n not in self.substitutes)
            if missing:
                raise ValueError(f"train.weights 'substitute' but train.substitutes has no entry for {missing}: "
                                 f"add one (e.g. {missing[0]}: {{mse: 1.0}})")

    def _check_mirage(self):
        needed = [setting for setting, ok in (("train.decoder_skip: true", self.decoder_skip),
                                              ("train.decoder_lora_rank > 0", self.decoder_lora_rank > 0),
                                              ("train.transformer_lora_rank > 0", self.transformer_lora_rank > 0))
                  if not ok]
        if needed:
            raise ValueError("train.schedule 'mirage' trains the fusion conv and a decoder LoRA, then a transformer "
                             f"LoRA and a second decoder LoRA (B.4): set {', '.join(needed)}")
        if self.reconstruction_iterations < 1:
            raise ValueError(f"train.reconstruction_iterations must be >= 1 with train.schedule 'mirage', "
                             f"got {self.reconstruction_iterations}")


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
    """``{pixel loss: weight}`` of Mirage's reconstruction phase; ValueError naming the key."""
    key = "train.loss_reconstruction"
    if LATENT in params.loss_reconstruction:
        raise ValueError(f"{key}: the reconstruction phase has no transformer, so no {LATENT!r}; "
                         f"use pixel losses ({', '.join(pixel_losses.KNOWN_LOSSES)})")
    pixel = pixel_losses.check_loss_weights(params.loss_reconstruction, what=key)
    if not any(w > 0 for w in pixel.values()):
        raise ValueError(f"{key} needs a pixel loss with a weight > 0")
    return {n: w for n, w in pixel.items() if w > 0}


def method_of(params: Params, method: str) -> Method:
    if method not in params.methods:
        raise ValueError(f"unknown method {method!r}; train.methods declares {', '.join(params.methods)}")
    return params.methods[method]


def phases(params: Params, method: str) -> list[tuple[str, int]]:
    """``[(phase, iterations), ...]`` a task trains through: ``joint``, or Mirage's ``reconstruction`` and
    ``harmonization`` (:func:`chopgrad.skip.mirage_phase`); none for a method that does not train."""
    iterations = params.iterations * method_of(params, method).iterations_factor
    if iterations == 0:
        return [("joint", 0)]
    if params.schedule == "mirage":
        return [("reconstruction", params.reconstruction_iterations), ("harmonization", iterations)]
    return [("joint", iterations)]


def phase_at(params: Params, method: str, iteration: int) -> str:
    """The phase that iteration ``iteration`` (0-based) trains in."""
    for phase, count in phases(params, method):
        if iteration < count:
            return phase
        iteration -= count
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
    validation: tuple[dict, ...] = ()  # pairs of the validation split (DL3DV's 5 scenes), for train.validation_every


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def plan(params: Params, method: str, pairs_dirs: list[str | Path], vae_dir: str | Path,
         names: list[str] | None = None, task: str | None = None) -> dict:
    """Check everything a run needs before any work; return what it will train on.

    Args:
        pairs_dirs: the pairs folders to train on, one task each.
        names: the task (experiment) names, one per folder, naming the output folders; default the
            folders' own task names.
        task: the paper task the folders must hold (an experiment's ``task``), when given.

    Raises:
        ValueError: an unknown method, missing or unusable folders, two folders of one name, a
            folder of another task, clips or crops that do not fit, more tiles than the latent crop
            has rows or columns, tile interiors too small for the losses, or bad transformer /
            text-encoder folders.
    """
    method_of(params, method)
    vae_folder = restoration.check_vae_folder(vae_dir)
    vae_config = _json(vae_folder / "config.json")
    multiple = _check_model(params, vae_folder, vae_config)
    if not pairs_dirs:
        raise ValueError("no pairs folder given: pass --pairs the folder of the experiment's task")
    folders = [Path(folder) for folder in pairs_dirs]
    manifests = [pairs_io.load_manifest(folder, check_frames=False) for folder in folders]
    names = list(names) if names is not None else [manifest["task"] for manifest in manifests]
    if len(names) != len(folders) or len(set(names)) != len(names):
        raise ValueError(f"the pairs folders need distinct names, got {names} for {[str(f) for f in folders]}")
    for folder, manifest in zip(folders, manifests):
        if task is not None and manifest["task"] != task:
            raise ValueError(f"{folder} holds {manifest['task']!r} pairs but the experiment's task is {task!r}: point "
                             "its pairs at a folder of that task")
    tasks = [_task(params, method, name, folder, vae_config) for name, folder in zip(names, folders)]
    return {"tasks": tasks, "vae_config": vae_config, "size_multiple": multiple}


def _check_model(params: Params, vae_folder: Path, vae_config: dict) -> int:
    """Check the transformer, text encoder, crop and tiles against the VAE; the crop's size multiple."""
    spatial = restoration.spatial_factor(vae_config)
    config = transformer_config(params, vae_config)
    if config["in_channels"] != restoration.latent_channels(vae_config):
        raise ValueError(f"train.transformer_path: the transformer takes {config['in_channels']} latent "
                         f"channels, the VAE in {vae_folder} makes {restoration.latent_channels(vae_config)}")
    if params.text_encoder_path is not None:
        for sub in ("tokenizer", "text_encoder"):
            if not (Path(params.text_encoder_path) / sub).is_dir():
                raise ValueError(f"train.text_encoder_path: {params.text_encoder_path} has no {sub}/ folder; point "
                                 "it at a Wan 2.1 diffusers folder (tokenizer/ and text_encoder/) or set it to null")
    patch = tuple(config["patch_size"])
    multiple = spatial * patch[1]
    if any(size % multiple for size in params.crop):
        raise ValueError(f"train.crop {list(params.crop)} must be multiples of {multiple} (the VAE's {spatial}x "
                         f"times the transformer's patch {patch[1]})")
    rule, accepts = restoration.clip_frames_rule(vae_config)
    for name in ("clip_frames", "sample_frames"):
        if not accepts(getattr(params, name)):
            raise ValueError(f"train.{name} {getattr(params, name)} must be {rule} frames for the VAE in {vae_folder} "
                             f"({restoration.vae_family(vae_config)}: other counts do not decode back to themselves)")
    if config.get("family") == "cogvideox" and params.sequence_parallel > 1:
        raise ValueError("train.sequence_parallel > 1 splits a Wan transformer (diffusers' _cp_plan); the CogVideoX "
                         "transformer has none: use sequence_parallel 1 (one sample per GPU) for DOVE")
    if config["num_attention_heads"] % params.sequence_parallel:
        raise ValueError(f"train.sequence_parallel {params.sequence_parallel} must divide the transformer's "
                         f"{config['num_attention_heads']} attention heads (Ulysses attention gives each rank whole heads)")
    _check_split(params, tokens(params.clip_frames, *params.crop, vae_config, patch),
                 f"a training clip (train.clip_frames {params.clip_frames}, train.crop {list(params.crop)})")
    latent = [size // spatial for size in params.crop]
    if params.tiles[0] > latent[0] or params.tiles[1] > latent[1]:
        raise ValueError(f"train.tiles {list(params.tiles)} are more than the latent crop {latent[0]}x{latent[1]} "
                         f"(train.crop {list(params.crop)} / {spatial}) has rows and columns: at most "
                         f"{latent[0]} rows and {latent[1]} cols")
    return multiple


def _task(params: Params, method: str, name: str, folder: Path, vae_config: dict) -> Task:
    """One task (an experiment's pairs folder), checked: clip and crop sizes, tiles against its losses."""
    manifest = pairs_io.load_manifest(folder)
    train = [pair for pair in manifest["pairs"] if pair["split"] == "train"]
    if not train:
        raise ValueError(f"{folder} has no train pairs to train {name!r} on")
    for pair in train:
        if pair["frames"] < params.clip_frames or pair["height"] < params.crop[0] or pair["width"] < params.crop[1]:
            raise ValueError(f"{name} pair {pair['scene']!r} ({pair['frames']} frames of {pair['height']}x"
                             f"{pair['width']}) is smaller than train.clip_frames={params.clip_frames} x "
                             f"train.crop={list(params.crop)}")
    if params.sequence_parallel > 1:
        first, patch = train[0], tuple(transformer_config(params, vae_config)["patch_size"])
        step = restoration.frame_multiple(vae_config)
        count = min(params.sample_frames, 1 + step * ((first["frames"] - 1) // step))
        _check_split(params, tokens(count, first["height"], first["width"], vae_config, patch),
                     f"{name}'s sample video ({count} frames of {first['height']}x{first['width']}, train.sample_frames)")
    spatial = restoration.spatial_factor(vae_config)
    application = manifest["application"]
    pixel = loss_table(params, application)[1] if method_of(params, method).decode else {}
    if params.schedule == "mirage":
        pixel = {**pixel, **reconstruction_losses(params)}
    if pixel:
        smallest = max(pixel_losses.MIN_SIZE[n] for n in pixel)
        # The smallest interior of the uneven split: (latent // tiles) latent pixels.
        tile = min(params.crop[k] // spatial // params.tiles[k] * spatial for k in (0, 1))
        if tile < smallest:
            raise ValueError(f"tiles of {tile} pixels (the smallest of train.crop / train.tiles) are too small for the {application} "
                             f"losses {sorted(pixel)} (at least {smallest}): use a larger crop or fewer tiles")
    validation = tuple(pair for pair in manifest["pairs"] if pair["split"] == "validation")
    if params.sequence_parallel > 1 and params.validation_every:  # whole frames: their tokens split too
        step = restoration.frame_multiple(vae_config)
        patch = tuple(transformer_config(params, vae_config)["patch_size"])
        for pair in validation:
            count = validation_frames(step, pair, params.clip_frames)
            _check_split(params, tokens(count, pair["height"], pair["width"], vae_config, patch),
                         f"{name}'s validation pair {pair['scene']!r} ({count} frames of {pair['height']}x"
                         f"{pair['width']}, train.validation_every)")
    return Task(name, folder, application, float(manifest["fps"]), train, validation)


def apply_substitutes(params: Params) -> tuple[Params, dict[str, LossTable]]:
    """Under ``train.weights: substitute``, the params with every network loss whose weight files are
    missing replaced by its ``train.substitutes`` entry (weights added to a loss already in the table),
    and ``{replaced loss: its substitute}``. The losses whose files are present stay: with the real files
    in place the same params train the paper's losses. Other policies: the params unchanged."""
    if params.weights != "substitute":
        return params, {}
    from chopgrad.weights import METRIC_WEIGHTS, file_status

    missing = {name for name, metric in LOSS_METRIC.items()
               if any(file_status(f) == "missing" for f in METRIC_WEIGHTS[metric])}

    def replaced(table: LossTable) -> LossTable:
        out: dict[str, float] = {}
        for name, weight in table.items():
            for new_name, new_weight in (params.substitutes[name].items() if name in missing else [(name, weight)]):
                out[new_name] = out.get(new_name, 0.0) + new_weight
        return out

    tables = {f"loss_{a}": replaced(getattr(params, f"loss_{a}")) for a in (*APPLICATIONS, "reconstruction")}
    trained = (*APPLICATIONS, "reconstruction") if params.schedule == "mirage" else APPLICATIONS
    used = {n for a in trained for n in getattr(params, f"loss_{a}")}
    done = {name: dict(params.substitutes[name]) for name in sorted(missing & used)}
    return replace(params, **tables, weights="official"), done


def transformer_config(params: Params, vae_config: dict) -> dict:
    """``patch_size``, ``in_channels`` and ``text_dim`` of the transformer the params describe (no loading)."""
    if params.transformer_path is None:
        return {"patch_size": [1, 2, 2], "in_channels": restoration.latent_channels(vae_config), "text_dim": params.text_dim,
                "num_attention_heads": params.num_heads}
    folder, sub = chopgrad.restoration.check_transformer_folder(params.transformer_path)
    config = _json((folder / sub if sub else folder) / "config.json")
    if config["_class_name"] == "CogVideoXTransformer3DModel":  # DOVE: patch_size p, patch_size_t (1.5) or null (1.0)
        patch = int(config.get("patch_size", 2))
        return {"patch_size": [int(config.get("patch_size_t") or 1), patch, patch], "family": "cogvideox",
                "in_channels": config.get("in_channels", 16), "text_dim": config.get("text_embed_dim", 4096),
                "num_attention_heads": config.get("num_attention_heads", 30)}
    return {"patch_size": config.get("patch_size", [1, 2, 2]), "in_channels": config.get("in_channels", 16),
            "text_dim": config.get("text_dim", 4096), "num_attention_heads": config.get("num_attention_heads", 40)}


def tokens(frames: int, height: int, width: int, vae_config: dict, patch: tuple[int, ...]) -> int:
    """Transformer tokens of a clip as the restorer pads it: 1 + 4k frames, sides to the size multiple."""
    _, accepts = restoration.clip_frames_rule(vae_config)
    step = restoration.frame_multiple(vae_config)
    padded = frames if accepts(frames) else 1 + step * math.ceil((frames - 1) / step)  # as restore_video pads
    latent_frames = restoration.latent_frames(vae_config, padded)
    multiple = restoration.spatial_factor(vae_config) * patch[1]
    return math.ceil(latent_frames / patch[0]) * math.ceil(height / multiple) * math.ceil(width / multiple)


def _check_split(params: Params, count: int, what: str) -> None:
    """Sequence parallelism splits the tokens evenly across the ranks of a sample (diffusers' Ulysses)."""
    if count % params.sequence_parallel:
        raise ValueError(f"train.sequence_parallel {params.sequence_parallel} must divide the {count} transformer "
                         f"tokens of {what}: change train.sequence_parallel, or that size")


def _pixel_metrics(params: Params, method: str, tasks: list[Task]) -> list[str]:
    names = set(reconstruction_losses(params)) if params.schedule == "mirage" else set()
    if method_of(params, method).decode:
        names |= {n for task in tasks for n in loss_table(params, task.application)[1]}
    return sorted({LOSS_METRIC[n] for n in names if n in LOSS_METRIC})


def model_spec(params: Params, vae_config: dict) -> dict:
    """The spec of the model the params describe (:mod:`stages.common.restoration`)."""
    if params.transformer_path is None:
        transformer = {"source": "small", "seed": params.seed, "config": {
            "latent_channels": restoration.latent_channels(vae_config), "num_layers": params.num_layers,
            "num_heads": params.num_heads, "head_dim": params.head_dim, "ffn_dim": params.ffn_dim,
            "text_dim": params.text_dim, "freq_dim": params.freq_dim,
            # A zeroed output projection starts the restorer at the identity; with a transformer LoRA
            # the projection is frozen, and zero would block every gradient: keep it random then.
            "zero_output": not params.transformer_lora_rank}}
    else:
        transformer = {"source": "pretrained", "path": str(Path(params.transformer_path).resolve()),
                       "family": chopgrad.restoration.transformer_family(params.transformer_path)}
    transformer["dtype"] = params.transformer_dtype
    cogvideox = transformer.get("family") == "cogvideox"
    lora_spec = lambda rank, alpha: {"rank": rank, "alpha": alpha} if rank else None
    decoder_lora = lora_spec(params.decoder_lora_rank, params.decoder_lora_alpha)
    if decoder_lora:  # Mirage: one adapter per phase (B.4)
        mirage = params.schedule == "mirage"
        decoder_lora["adapters"] = list(restoration.MIRAGE_ADAPTERS) if mirage else [restoration.DECODER_ADAPTER]
    return {
        "transformer": transformer,
        "transformer_lora": lora_spec(params.transformer_lora_rank, params.transformer_lora_alpha),
        "decoder_lora": decoder_lora,
        "decoder_skip": params.decoder_skip,
        "timestep": params.timestep,
        **({"alpha": chopgrad.restoration.dove_alpha(params.transformer_path, params.timestep)} if cogvideox else {}),
        **dict(zip(("latents_mean", "latents_std"), restoration.latent_stats(vae_config), strict=True)),
        "text": {"caption": params.caption, "encoder": params.text_encoder_path},
    }


# ----------------------------------------------------------------------------------------------------------
# Training one task


def _set_phase(model: restoration.Model, phase: str) -> None:
    """Set what trains in ``phase`` (``joint``: whatever the model was built trainable)."""
    if phase != "joint":
        from chopgrad.skip import mirage_phase

        mirage_phase(phase, model.skip, model.transformer, decoder_adapters=restoration.MIRAGE_ADAPTERS)


@dataclass
class _Run:
    """What one task's training loop works on."""

    model: restoration.Model
    optimizers: dict
    phase: str
    record: dict  # iteration, fingerprint, history, seconds: what a checkpoint stores
    resumed_from: int
    prompts: dict  # pair prompt -> embedding (with a text encoder)
    layout: distributed.Layout  # sample groups of train.sequence_parallel ranks
    start: str | None = None  # the trained model folder a chained experiment started from
    training_peak: int = 0  # CUDA: the peak memory of training steps before the last validation (bytes)

    @property
    def tile_group(self):
        """The ranks that share this sample's decoder tiles (when there are tiles enough for each of them)."""
        return self.layout.sequence_group if self.layout.sequence_parallel > 1 else None


def _optimizers(params: Params, model: restoration.Model) -> dict:
    return training.make_optimizers(model, lr=params.lr, betas=params.betas, weight_decay=params.weight_decay)


ARCHITECTURE = ("transformer", "transformer_lora", "decoder_lora", "decoder_skip")  # spec keys a start fixes


def _check_start(params: Params, start: Path, vae_config: dict) -> None:
    """A chained experiment takes its model from ``start``: its own architecture settings must agree."""
    theirs = _json(start / restoration.SPEC_FILE)
    ours = model_spec(params, vae_config)
    differ = [key for key in ARCHITECTURE if _architecture(ours.get(key)) != _architecture(theirs.get(key))]
    if differ:
        raise ValueError(f"the experiment starts from {start}, whose model differs in {', '.join(differ)} "
                         f"({', '.join(f'{k}: {theirs.get(k)}' for k in differ)}): the model comes from the start, "
                         "so set the experiment's train keys (transformer_path, LoRA ranks, decoder_skip) to match it")


def _architecture(value):
    """A spec entry without what the schedule or the initialisation settles (seed, zero output, which
    decoder adapters a Mirage schedule names)."""
    if isinstance(value, dict):
        return {k: _architecture(v) for k, v in value.items() if k not in ("seed", "zero_output", "adapters")}
    return value


def for_task(params: Params, task: Task) -> Params:
    """``params`` with ``train.epochs`` turned into iterations for ``task``: one pass over its train videos
    is ``ceil(videos / batch)`` optimiser updates (the batch: one video per sample group of ranks)."""
    if params.epochs is None:
        return params
    return replace(params, iterations=math.ceil(params.epochs * len(task.train) / params.data_parallel), epochs=None)


def _start(params: Params, method: str, task: Task, vae_dir: Path, checkpoint_path: Path,
           info: distributed.DistInfo, layout: distributed.Layout, start: Path | None = None) -> _Run:
    """Build the model (or load ``start``'s) and its optimizers, sharded; resume from ``checkpoint_path``
    when it matches."""
    vae_config = _json(vae_dir / "config.json")
    spec = model_spec(params, vae_config)
    torch.manual_seed(params.seed)
    text_dim = transformer_config(params, vae_config)["text_dim"]
    caption, prompts = training.text_embeddings(params.text_encoder_path, params.caption, text_dim,
                                                [pair["prompt"] for pair in task.train], params.seed,
                                                spec["transformer"].get("family", "wan"))
    if start is None:
        spec["text"]["shape"] = list(caption.shape)
        model = restoration.build_model(spec, vae_dir, caption, info.device)
    else:  # chained: the upstream experiment's model, architecture and weights (its spec is kept)
        model = restoration.load_model(start, vae_dir, info.device)
        model.restorer.train()
    model.restorer.train()
    if info.device.type == "cuda" and params.activation_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    fingerprint = training.fingerprint(
        {"params": {k: v for k, v in asdict(params).items() if k != "validation_every"},  # validation trains nothing
         "method": method, "task": task.name, "world_size": info.world_size,
         "start": None if start is None else training.file_sha256(start / restoration.MODEL_FILE)},
        task.folder / pairs_io.PAIRS_FILE, task.train, vae_dir)
    record = {"iteration": 0, "fingerprint": fingerprint, "history": [], "seconds": 0.0}
    loaded = ckpt.load_checkpoint(checkpoint_path)
    resume = loaded is not None and loaded[1].get("fingerprint") == fingerprint
    phase = phase_at(params, method, loaded[1]["iteration"] if resume else 0)
    _set_phase(model, phase)  # requires_grad before sharding
    if start is not None and phase == "joint" and model.skip is not None:
        # C.4: ChopGrad fine-tunes Mirage's harmonization stage model: the transformer LoRA and the second
        # decoder LoRA train; the fusion conv and the reconstruction LoRA stay as Mirage left them.
        _set_phase(model, "harmonization")
    distributed.enable_sequence_parallel(model.transformer, layout)  # a no-op with train.sequence_parallel 1
    distributed.shard_transformer(model.transformer)  # a no-op without torchrun
    optimizers = _optimizers(params, model)
    if resume:
        tensors, record = loaded
        groups = record.pop("groups")
        same_phase = phase_at(params, method, record["iteration"] - 1) == phase  # else the optimizers start fresh
        training.restore_checkpoint(model, optimizers, tensors, groups if same_phase else None)
        log.info("%s/%s: resuming from iteration %d (%s)", method, task.name, record["iteration"], checkpoint_path)
    elif loaded is not None:
        log.warning("%s/%s: %s was written with other inputs or params; starting over", method, task.name,
                    checkpoint_path)
    return _Run(model, optimizers, phase, record, record["iteration"], prompts, layout,
                None if start is None else str(start))


def _iterate(params: Params, method: str, task: Task, run: _Run, clips: training.Clips, losses: dict,
             info: distributed.DistInfo) -> dict:
    """One optimiser update of ``run`` (switching phase when it is due); the history entry it adds."""
    iteration, model = run.record["iteration"], run.model
    if phase_at(params, method, iteration) != run.phase:  # Mirage: reconstruction -> harmonization
        run.phase = phase_at(params, method, iteration)
        _set_phase(model, run.phase)
        run.optimizers = _optimizers(params, model)
        log.info("%s/%s: %s phase from iteration %d", method, task.name, run.phase, iteration)
    started = time.perf_counter()
    # The ranks of one sample group draw the same clip: the generator of their group's index.
    degraded, target, index = clips.sample(training.sample_generator(params.seed, iteration, run.layout.data_rank))
    spec_method = method_of(params, method)
    if run.phase == "reconstruction":
        result = training.reconstruction_iteration(model, spec_method, losses["reconstruction"], target,
                                                   tiles=params.tiles, halo=params.halo, tile_group=run.tile_group)
    else:
        prompt = task.train[index]["prompt"]
        result = training.train_iteration(
            model, spec_method, loss_table(params, task.application)[0], losses.get(task.application),
            (degraded, target), run.prompts.get(prompt) if prompt else None, tiles=params.tiles, halo=params.halo,
            autocast=info.device.type == "cuda" and params.mixed_precision, tile_group=run.tile_group)
    distributed.all_reduce_gradients(model.decoder_trainable().values())
    for optimizer in run.optimizers.values():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    entry = {"iteration": iteration + 1, "phase": run.phase, "loss": distributed.all_reduce_mean(result.loss),
             "lr": params.lr, "seconds": seconds}
    for key in ("latent", "pixel"):
        if getattr(result, key) is not None:
            entry[key] = distributed.all_reduce_mean(getattr(result, key))
    run.record["seconds"] += seconds
    run.record["history"].append(entry)
    run.record["iteration"] = iteration + 1
    return entry


def train_task(params: Params, method: str, task: Task, vae_dir: Path, checkpoint_path: Path, out_dir: Path,
               info: distributed.DistInfo, layout: distributed.Layout, losses: dict,
               on_iteration: Callable[[int], None] | None = None, start: Path | None = None) -> dict:
    """Train ``method`` on ``task`` (resuming from ``checkpoint_path`` when it matches) and write ``out_dir``.

    Args:
        losses: ``{application or "reconstruction": chopgrad.losses.PixelLoss}`` (none needed for
            latent-only methods; ``reconstruction`` for Mirage's first phase).
        on_iteration: called with the iteration count after every iteration and its checkpoint (tests
            stop runs here).

    Returns:
        The task's record: ``train.json``'s, what the run measured (:func:`_measured`) and its loss ``history``.
    """
    total = sum(count for _, count in phases(params, method))
    run = _start(params, method, task, vae_dir, checkpoint_path, info, layout, start)
    clips = training.Clips(task.train, params.clip_frames, params.crop)
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=run.record["iteration"], desc=f"train {method}/{task.name}", unit="it",
               disable=not info.is_main, file=sys.stderr, mininterval=1.0)
    while run.record["iteration"] < total:
        entry = _iterate(params, method, task, run, clips, losses, info)
        if task.validation and params.validation_every and (
                run.record["iteration"] % params.validation_every == 0 or run.record["iteration"] == total):
            if info.device.type == "cuda":  # the reported peak is the training steps', not the validation's
                run.training_peak = max(run.training_peak, torch.cuda.max_memory_allocated(info.device))
            entry["validation_psnr"] = validation_psnr(run.model, task.validation, params, info.device)
            if info.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(info.device)
        bar.update(1)
        bar.set_postfix(loss=f"{entry['loss']:.4g}")
        if run.record["iteration"] % params.checkpoint_every == 0 or run.record["iteration"] == total:
            tensors, groups = training.checkpoint_tensors(run.model, run.optimizers)
            if info.is_main:
                tensors.update(ckpt.rng_tensors({}))
                ckpt.save_checkpoint(checkpoint_path, tensors, {**run.record, "groups": groups})
            distributed.barrier()
        if on_iteration is not None:
            on_iteration(run.record["iteration"])
    bar.close()
    return _finish(params, method, task, run, out_dir, losses, info)


def _finish(params: Params, method: str, task: Task, run: _Run, out_dir: Path, losses: dict,
            info: distributed.DistInfo) -> dict:
    """Write the task's model, ``train.json`` and sample video; its record with the measurements and history."""
    model = run.model
    pretrained = model.spec["transformer"]["source"] != "small"
    # Untrained (iterations_factor 0) on a pretrained base without LoRA or start: its folder holds every weight.
    untouched = pretrained and not run.record["history"] and not model.spec.get("transformer_lora") and run.start is None
    transformer_state = {} if untouched else distributed.full_model_state_dict(model.transformer, trainable_only=pretrained)
    summary = _summary(params, method, task, run, losses.get(task.application), info)
    measured = _measured(params, run, info)
    summary.update(restoration.describe(model))
    model.restorer.eval()
    sample = sample_video(model, task.train[0], params.sample_frames)  # every rank: the FSDP forward is a collective
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        restoration.save_model(out_dir, model.spec, restoration.model_state(model, transformer_state))
        write_json(out_dir / "train.json", summary)
        write_video(out_dir / "sample.mp4", sample, fps=task.fps)
    return {**summary, **measured, "history": run.record["history"]}


def _mean_tail(history: list[dict], key: str) -> float:
    """The mean of ``key`` over the last tenth of ``history`` (the "final" value of a curve)."""
    return float(np.mean([h[key] for h in history[-max(1, len(history) // 10):]]))


def _summary(params: Params, method: str, task: Task, run: _Run, pixel_loss, info: distributed.DistInfo) -> dict:
    """The task's ``train.json`` record (docs/interfaces.md), from the run's record of iterations: what the
    inputs and params determine, nothing measured (:func:`_measured`)."""
    spec_method, history = method_of(params, method), run.record["history"]
    last = [h for h in history if h["phase"] == phases(params, method)[-1][0]]
    first = [h for h in history if h["phase"] == "reconstruction"]
    mirage = params.schedule == "mirage"
    return {
        "method": method, "task": task.name, "application": task.application,
        "iterations": params.iterations * spec_method.iterations_factor,
        "schedule": params.schedule, "reconstruction_iterations": params.reconstruction_iterations if mirage else 0,
        "final_reconstruction_loss": _mean_tail(first, "loss") if first else None,
        "final_loss": _mean_tail(last, "loss") if last else None,
        "final_latent_loss": _mean_tail(last, "latent") if last else None,
        "final_pixel_loss": _mean_tail(last, "pixel") if spec_method.decode and last else None,
        "validation_pairs": len(task.validation) if params.validation_every else 0,
        "final_validation_psnr": next((h["validation_psnr"] for h in reversed(history) if "validation_psnr" in h), None),
        "world_size": info.world_size, "sequence_parallel": params.sequence_parallel, "batch": params.data_parallel,
        "d_trunc": spec_method.d_trunc, "decoding": spec_method.decode,
        "latent_weight": loss_table(params, task.application)[0] if spec_method.decode else 1.0,
        "pixel_losses": dict(pixel_loss.loss_weights) if pixel_loss is not None and spec_method.decode else {},
        "stand_in_weights": bool(pixel_loss is not None and spec_method.decode
                                 and any(status != "official" for status in pixel_loss.weights.values())),
        "clip_frames": params.clip_frames, "crop": list(params.crop), "tiles": list(params.tiles),
        "start": run.start,
    }


def _measured(params: Params, run: _Run, info: distributed.DistInfo) -> dict:
    """What this run of a task measured, for ``--metrics`` only: wall-clock seconds (those before an
    interruption included), throughput, peak memory, the device, the iteration it resumed from. None of
    it goes into ``train.json``, whose bytes must not change when the same inputs run again."""
    history, seconds = run.record["history"], max(run.record["seconds"], 1e-9)
    memory = training.peak_memory(info.device)
    if memory["peak_memory_bytes"] is not None:  # CUDA: with the training peaks before each validation
        memory["peak_memory_bytes"] = max(memory["peak_memory_bytes"], run.training_peak)
    return {
        "train_seconds": round(run.record["seconds"], 3),
        "seconds_per_iteration": round(seconds / max(1, len(history)), 4),
        "clip_frames_per_second": round(params.clip_frames * params.data_parallel * len(history) / seconds, 3),
        **memory, "device": str(info.device), "resumed_from_iteration": run.resumed_from,
    }


def validation_psnr(model: restoration.Model, validation: list[dict], params: Params, device: torch.device) -> float:
    """Mean PSNR (dB) of the restored first ``clip_frames`` frames (whole frames) of each validation pair
    against its target, decoded as ``infer`` decodes (the training tiles and halo, bf16 autocast on CUDA):
    the curve that tells when training has converged (the paper's Mirage stage: "the validation loss
    plateaued"). Every rank runs it (the FSDP forward is a collective)."""
    model.restorer.eval()
    scores = []
    with torch.no_grad():
        for pair in validation:
            count = validation_frames(model.frame_multiple, pair, params.clip_frames)
            read = lambda folder: np.stack([read_image(p) for p in list_frames(folder)[:count]])
            output, _ = restoration.restore_video(model, read(pair["input"]), tiles=params.tiles, halo=params.halo,
                                                  autocast=device.type == "cuda" and params.mixed_precision)
            scores.append(measure.psnr(output, read(pair["target"])))
    model.restorer.train()
    return round(float(np.mean(scores)), 4)


def validation_frames(frame_multiple: int, pair: dict, clip_frames: int) -> int:
    """Frames of a validation pair restored: ``clip_frames``, or the longest clip the VAE takes that it has."""
    return min(clip_frames, 1 + frame_multiple * ((pair["frames"] - 1) // frame_multiple))


def sample_video(model: restoration.Model, pair: dict, frames: int) -> np.ndarray:  # -> [T, H, 3W, 3] uint8
    """input | output | target of the first frames of a pair."""
    count = min(frames, 1 + model.frame_multiple * ((pair["frames"] - 1) // model.frame_multiple))
    read = lambda folder: np.stack([read_image(p) for p in list_frames(folder)[:count]])
    degraded, target = read(pair["input"]), read(pair["target"])
    output, _ = restoration.restore_video(model, degraded)
    return np.concatenate([degraded, output, target], axis=2)


# ----------------------------------------------------------------------------------------------------------
# The stage


@contextlib.contextmanager
def _loss_weights(params: Params, metrics: list[str], home: str | Path):
    """Open the weights policy for the pixel losses' backbones (:func:`chopgrad.weights.metric_home`)."""
    if not metrics:
        yield None
        return
    from chopgrad.weights import metric_home

    with metric_home(params.weights, home, metrics) as chosen:
        yield chosen


def _device(params: Params) -> torch.device | None:
    if params.device == "auto":
        return None  # distributed.init picks cuda:<local rank> when CUDA is available
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device is 'cuda' but CUDA is not available: use 'auto' or 'cpu'")
    return torch.device(params.device)


def _losses(params: Params, method: str, tasks: list[Task], device: torch.device) -> dict:
    """``{application: PixelLoss}`` for the tasks' applications (pixel-loss methods), and ``reconstruction``
    for Mirage's first phase: each built once and shared by the tasks."""
    built = {}
    if method_of(params, method).decode:
        for application in sorted({task.application for task in tasks}):
            built[application] = pixel_losses.PixelLoss(loss_table(params, application)[1]).to(device)
    if params.schedule == "mirage":
        built["reconstruction"] = pixel_losses.PixelLoss(reconstruction_losses(params)).to(device)
    return built


def run(params: Params, method: str, vae_dir: str | Path, pairs_dirs: list[str | Path], out_dir: str | Path,
        metrics_path: str | Path, checkpoint_dir: str | Path, stand_in_home: str | Path = ".weights/stand_in",
        on_iteration: Callable[[str, int], None] | None = None, names: list[str] | None = None,
        task: str | None = None, start: str | Path | None = None) -> dict:
    """Train ``method`` on each pairs folder; write ``out_dir/<name>/`` for each, and ``metrics_path``.

    Args:
        names: the output folders' names, one per pairs folder (an experiment's name); default the
            folders' task names. Each ``out_dir/<name>`` is replaced atomically; other folders in
            ``out_dir`` (other experiments of the method) are left alone.
        task: the paper task every folder must hold (the experiment's), when given.
        start: a trained model folder (another experiment's ``data/train/<method>/<experiment>``) to
            start from: its architecture and weights (chaining, Table 4), instead of the backbone.

    Returns:
        ``{"metrics": {...}, "tasks": {task: record with its "history"}, "samples": [mp4 paths]}``.
    """
    vae_dir, out_dir, metrics_path, checkpoint_dir = map(Path, (vae_dir, out_dir, metrics_path, checkpoint_dir))
    if checkpoint_dir.exists() and not checkpoint_dir.is_dir():
        raise ValueError(f"--checkpoints {checkpoint_dir} is a file: pass a folder (it is created)")
    params, substituted = apply_substitutes(params)
    if substituted:
        log.warning("weight files missing: %s trained with their train.substitutes instead (%s)",
                    ", ".join(substituted), "; ".join(f"{k} -> {v}" for k, v in substituted.items()))
    tasks: list[Task] = plan(params, method, pairs_dirs, vae_dir, names, task)["tasks"]
    start = None if start is None else Path(start)
    if start is not None and not (start / restoration.SPEC_FILE).is_file():
        raise ValueError(f"--start {start} is not a trained model folder ({restoration.SPEC_FILE}, "
                         f"{restoration.MODEL_FILE}): train the experiment it names first (`dvc repro` runs it first)")
    if start is not None:
        _check_start(params, start, _json(Path(vae_dir) / "config.json"))
    info = distributed.init(device=_device(params))
    if info.world_size != params.world_size:
        raise ValueError(f"{info.world_size} processes were started but train.nproc_per_node x train.nnodes is "
                         f"{params.world_size}: set them in params.yaml and run the stage without torchrun (it starts "
                         "torchrun itself)")
    layout = distributed.make_layout(params.sequence_parallel)
    started = time.perf_counter()
    # Tasks already finished by an interrupted run are not trained again (their checkpoints are at the
    # last iteration): they are rebuilt from their checkpoints and written again.
    records = {}
    with _loss_weights(params, _pixel_metrics(params, method, tasks), stand_in_home):
        losses = _losses(params, method, tasks, info.device)
        for one in tasks:
            hook = (lambda count, name=one.name: on_iteration(name, count)) if on_iteration else None
            with _main_rank_outputs(info, out_dir / one.name) as build:
                records[one.name] = train_task(for_task(params, one), method, one, vae_dir,
                                               checkpoint_dir / f"{one.name}.safetensors", build, info, layout, losses,
                                               hook, start)
    metrics = {"method": method, "world_size": info.world_size, "sequence_parallel": layout.sequence_parallel,
               "batch": layout.data_parallel, "seconds": round(time.perf_counter() - started, 2),
               "substituted_losses": substituted,
               "tasks": {name: {k: v for k, v in record.items() if k != "history"} for name, record in records.items()}}
    if info.is_main:
        write_json(metrics_path, metrics)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # the outputs are in place: nothing to resume
    distributed.barrier()
    return {"metrics": metrics, "tasks": records, "samples": [out_dir / name / "sample.mp4" for name in records],
            "is_main": info.is_main}


@contextlib.contextmanager
def _main_rank_outputs(info: distributed.DistInfo, out_dir: Path):
    """Rank 0 builds ``out_dir`` aside and swaps it in at the end (:func:`stages.common.video.staged_outputs`);
    the other ranks write nothing, so they get a folder name that is never created."""
    from stages.common.video import staged_outputs

    if not info.is_main:
        yield out_dir.parent / f".{out_dir.name}.rank{info.rank}"
        distributed.barrier()
        return
    with staged_outputs(out_dir) as (build,):
        yield build
    distributed.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--experiment", help="an experiment of params.yaml's experiments: (its settings, pairs, "
                                                "VAE and start); without it, the train section as it is")
    parser.add_argument("--method", required=True, help="a method of train.methods in params.yaml")
    parser.add_argument("--vae", help="the VAE folder (default: the experiment's vae)")
    parser.add_argument("--pairs", nargs="+", help="pairs folders (default: the experiment's pairs)")
    parser.add_argument("--out", required=True, help="output folder (data/train/<method>): writes <out>/<experiment>/")
    parser.add_argument("--metrics", required=True, help="metrics JSON (metrics/train/<method>/<experiment>.json)")
    parser.add_argument("--checkpoints", required=True, help="checkpoint folder, kept until the stage ends")
    parser.add_argument("--train-root", default="data/train",
                        help="where the trained models are (data/train): a chained experiment starts from one")
    parser.add_argument("--stand-in-home", default=".weights/stand_in",
                        help="where stand-in loss weights go (as evaluate.stand_in_home)")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    names, task, start, pairs, vae = None, None, None, args.pairs, args.vae
    if args.experiment is not None:
        params, experiment = experiment_params(args.params, args.experiment)
        if params.threads:  # the experiment's own (cli.start applied the defaults')
            torch.set_num_threads(params.threads)
        names, task, start = [experiment.name], experiment.task, experiment.start_folder(args.train_root)
        pairs, vae = pairs or [experiment.pairs], vae or experiment.vae
        if [str(Path(p)) for p in pairs] != [str(Path(experiment.pairs))] or Path(vae) != Path(experiment.vae):
            raise ValueError(f"--pairs {pairs} / --vae {vae} differ from experiments.{experiment.name}'s pairs "
                                 f"{experiment.pairs} and vae {experiment.vae}: leave them out, or change params.yaml")
    elif not pairs or not vae:
        raise ValueError("without --experiment, give --pairs and --vae")
    if params.world_size > 1 and "RANK" not in os.environ:
        os.execv(sys.executable, torchrun_command(params, args.method, sys.argv[1:] if argv is None else argv,
                                                  args.experiment))
    arguments = (params, args.method, vae, pairs, args.out, args.metrics, args.checkpoints, args.stand_in_home)
    options = {"names": names, "task": task, "start": start}
    try:
        if int(os.environ.get("RANK", "0")) != 0:  # torchrun workers: rank 0 alone logs to MLflow
            run(*arguments, **options)
            return
        from stages.common.tracking import stage_run

        # The MLflow run is named like the expanded DVC stage, train@<experiment>-<method>, as `dvc repro` names it.
        name = f"{STAGE}@{experiments.run_key(args.experiment, args.method)}" if args.experiment else f"{STAGE}@{args.method}"
        with stage_run(name, params) as tracker:
            tracker.set_tags({"chopgrad.method": args.method, "chopgrad.experiment": args.experiment or ""})
            log_result(tracker, run(*arguments, **options))
    finally:
        distributed.shutdown()


def experiment_params(params_path: str | Path, name: str) -> tuple[Params, experiments.Experiment]:
    """The train params of experiment ``name`` (the train defaults, its overrides on top), checked with
    the whole ``experiments:`` / ``runs:`` declaration."""
    data, declared = experiments.load_checked(params_path)
    if name not in declared:
        raise ParamsError(f"{params_path}: no experiment {name!r}; the experiments are {', '.join(declared)}")
    experiment = declared[name]
    params = params_from_mapping(STAGE, Params, experiments.train_mapping(data, experiment),
                                 source=f"{params_path} (train with experiments.{name}.train)")
    return params, experiment


def torchrun_command(params: Params, method: str, argv: list[str], experiment: str | None = None) -> list[str]:
    """The torchrun command line that runs this stage with ``argv`` on ``train.nproc_per_node`` processes
    (and ``train.nnodes`` nodes: the same command on each, meeting at ``train.rdzv_endpoint``)."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={params.nproc_per_node}",
               f"--nnodes={params.nnodes}"]
    if params.nnodes == 1:
        command.append("--standalone")
    else:
        job = experiments.run_key(experiment, method) if experiment else method
        command += ["--rdzv-backend=c10d", f"--rdzv-endpoint={params.rdzv_endpoint}", f"--rdzv-id=chopgrad-{STAGE}-{job}"]
    return [*command, "-m", f"stages.{STAGE}", *argv]


def log_result(tracker, result: dict) -> None:
    """Losses, learning rate, throughput, memory and sample videos of every task into the MLflow run."""
    for task, record in result["tasks"].items():
        history = record["history"]
        iterations = [h["iteration"] for h in history]
        for key in ("loss", "latent", "pixel", "lr", "validation_psnr"):
            points = [(h["iteration"], h[key]) for h in history if h.get(key) is not None]
            if points:
                tracker.log_curve(f"{task}/{key}", *zip(*points))
        tracker.log_curve(f"{task}/iterations_per_second", iterations,
                          [1.0 / max(h["seconds"], 1e-9) for h in history])
        tracker.log_metrics({f"{task}/{k}": v for k, v in record.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for sample in result["samples"]:
        tracker.log_artifact(sample, f"videos/{sample.parent.name}")
    tracker.log_metrics({"seconds": result["metrics"]["seconds"]})


if __name__ == "__main__":
    main()

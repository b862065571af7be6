"""The parts of one training iteration of the restorer: methods, clips, the iteration, optimizers, checkpoints.

The ``train`` stage (``stages/train.py``) puts these together; each takes plain arguments, not the
stage's params. Words: an *iteration* is one optimiser update (``train.iterations`` of them per
task); a *step* is one iteration of the decoder's own decode loop, as everywhere in :mod:`chopgrad`.

A :class:`Method` is one row of the paper's Table 2 ablation, declared once in ``params.yaml``
(``train.methods``); ``dvc.yaml`` runs one ``train@<experiment>-<method>`` per method an experiment lists:

============ ==============================================================================
``decode``   ``chopgrad``: latent MSE + pixel loss through :func:`chopgrad.decode_loss` with ``d_trunc``;
             ``per_frame``: every latent frame decoded on its own, no cache (DOVE-style);
             ``null``: latent MSE only (ChopGrad*; with ``iterations_factor: 2``, ChopGrad-dagger)
============ ==============================================================================
"""

from __future__ import annotations

import hashlib
import json
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import chopgrad
import chopgrad.restoration
from chopgrad import distributed
from chopgrad import losses as pixel_losses
from stages.common import checkpoint as ckpt
from stages.common import restoration
from stages.common.video import list_frames, read_image, to_tensor

__all__ = ["Clips", "IterationResult", "Method", "checkpoint_tensors", "fingerprint", "make_optimizers",
           "peak_memory", "reconstruction_iteration", "restore_checkpoint", "sample_generator", "text_embeddings",
           "train_iteration"]


@dataclass(frozen=True)
class Method:
    """How a method trains: one entry of ``train.methods``."""

    decode: Literal["chopgrad", "per_frame"] | None  # how the pixel loss decodes; null: latent MSE only
    d_trunc: int | None  # ChopGrad's truncation distance (decode: chopgrad only; null otherwise)
    iterations_factor: int  # multiple of train.iterations (ChopGrad-dagger: 2); 0: no training (the starting model)

    def __post_init__(self):
        if (self.decode == "chopgrad") != (self.d_trunc is not None):
            raise ValueError(f"d_trunc is set for decode 'chopgrad' only (an integer >= 0) and null otherwise; "
                             f"got decode {self.decode!r} with d_trunc {self.d_trunc!r}")
        if self.d_trunc is not None and self.d_trunc < 0:
            raise ValueError(f"d_trunc must be >= 0, got {self.d_trunc}")
        if self.iterations_factor < 0:
            raise ValueError(f"iterations_factor must be >= 0, got {self.iterations_factor}")
        if self.iterations_factor == 0 and self.decode is not None:
            raise ValueError("iterations_factor 0 writes the starting model untrained (Table 1's DOVE row: the DOVE "
                             f"checkpoint as it is): it takes decode null, got decode {self.decode!r}")


class Clips:
    """Random (input, target) clips and crops of train pairs, read from the PNG frames on demand."""

    def __init__(self, pairs: list[dict], frames: int, crop: tuple[int, int]):
        self.pairs, self.frames, self.crop = pairs, frames, crop
        self.paths = [(list_frames(pair["input"]), list_frames(pair["target"])) for pair in pairs]

    def sample(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(input, target, pair index)``: two [1, 3, frames, crop_h, crop_w] tensors in [-1, 1]."""
        index = int(torch.randint(len(self.paths), (), generator=generator))
        pair, (inputs, targets) = self.pairs[index], self.paths[index]
        start = int(torch.randint(pair["frames"] - self.frames + 1, (), generator=generator))
        top = int(torch.randint(pair["height"] - self.crop[0] + 1, (), generator=generator))
        left = int(torch.randint(pair["width"] - self.crop[1] + 1, (), generator=generator))

        def clip(paths):
            frames = np.stack([read_image(path)[top:top + self.crop[0], left:left + self.crop[1]]
                               for path in paths[start:start + self.frames]])
            return to_tensor(frames)[None]  # [1, 3, T, H, W]

        return clip(inputs), clip(targets), index


def sample_generator(seed: int, iteration: int, rank: int) -> torch.Generator:
    """The clip sampler of one iteration on one rank: a pure function of (seed, iteration, rank), so a
    resumed or re-sharded run draws the same clips without carrying generator state."""
    state = np.random.SeedSequence([seed, iteration, rank]).generate_state(1)[0]
    return torch.Generator().manual_seed(int(state))


def text_embeddings(text_encoder_path: str | None, caption: str, text_dim: int, prompts: list[str | None],
                    seed: int, family: str = "wan") -> tuple[torch.Tensor, dict]:
    """The fixed caption's embedding [1, L, text_dim] and one per distinct prompt.

    Without a text encoder (``text_encoder_path`` None) the caption's embedding is a seeded random
    stand-in (:func:`chopgrad.restoration.fixed_text_embedding`) and pair prompts are not used.
    ``family`` "wan": Wan's UMT5 encoding (512 tokens, zeroed past each prompt); "cogvideox": CogVideoX's
    T5 encoding (226 tokens), where the caption may be empty (DOVE's prompt is "").
    """
    cogvideox = family == "cogvideox"
    length = chopgrad.restoration.COGVIDEOX_TEXT_LENGTH if cogvideox else chopgrad.restoration.TEXT_LENGTH
    if text_encoder_path is None:
        return chopgrad.restoration.fixed_text_embedding(text_dim, length=length, seed=seed), {}
    from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(text_encoder_path, subfolder="tokenizer", local_files_only=True)
    encoder = (T5EncoderModel if cogvideox else UMT5EncoderModel).from_pretrained(
        text_encoder_path, subfolder="text_encoder", local_files_only=True).eval()
    distinct = sorted({p for p in prompts if p})
    encode = chopgrad.restoration.encode_cogvideox_prompts if cogvideox else chopgrad.restoration.encode_prompts
    embedded = encode([caption, *distinct], tokenizer, encoder)
    if embedded.shape[-1] != text_dim:
        raise ValueError(f"train.text_encoder_path encodes to {embedded.shape[-1]} channels but the transformer takes "
                         f"{text_dim}: use the text encoder of the same model")
    return embedded[:1], {p: embedded[i + 1:i + 2] for i, p in enumerate(distinct)}


@dataclass
class IterationResult:
    loss: float
    latent: float | None  # None in Mirage's reconstruction phase (no transformer)
    pixel: float | None


def _pixel_decoder(model: restoration.Model, method: Method, video: torch.Tensor):
    decoder = model.decoder(video)
    return pixel_losses.PerFrameDecoder(decoder) if method.decode == "per_frame" else decoder


def _tile_group(group, tiles: tuple[int, int]):
    """``group`` when it has no more ranks than there are tiles (else every rank decodes every tile)."""
    if group is None:
        return None
    import torch.distributed as dist

    return group if dist.get_world_size(group) <= tiles[0] * tiles[1] else None


def train_iteration(model: restoration.Model, method: Method, latent_weight: float, pixel_loss,
                    clip: tuple[torch.Tensor, torch.Tensor], text: torch.Tensor | None, *, tiles: tuple[int, int],
                    halo: int, autocast: bool, tile_group=None) -> IterationResult:
    """Forward and backward of one clip (the gradients are left in the parameters); the loss and its terms.

    Args:
        clip: ``(degraded, target)``, each [1, 3, T, H, W] in [-1, 1].
        latent_weight: the weight of the velocity MSE beside the pixel loss (latent-only methods: 1).
        pixel_loss: the pixel loss (``chopgrad.losses.PixelLoss``); unused when ``method.decode`` is None.
        autocast: the transformer under bf16 autocast (CUDA).
        tile_group: the process group of the ranks that share this clip (sequence parallelism): each
            decodes its own tiles (``chopgrad.decode_loss``'s ``tile_group``); None: this rank decodes all.
    """
    device = next(model.vae.parameters()).device
    degraded, target = (x.to(device) for x in clip)
    z_hat, z = model.encode(degraded), model.encode(target)  # normalised [1, C, t, h, w]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        velocity = model.restorer.velocity(z_hat, text)
    velocity = velocity.float()
    restored_latents = model.restorer.from_velocity(z_hat, velocity)  # Wan: z_hat - v; DOVE: sqrt(a) z_hat - sqrt(1-a) v
    latent = torch.mean((restored_latents - z) ** 2)  # Wan: the velocity MSE against v = z_hat - z
    loss = (latent_weight if method.decode else 1.0) * latent
    pixel = None
    if method.decode:
        restored = model.to_decoder(restored_latents)  # as vae.decode takes it
        pixel = chopgrad.decode_loss(_pixel_decoder(model, method, degraded), restored, target,
                                     pixel_loss, d_trunc=method.d_trunc or 0, tiles=tiles, halo=halo,
                                     tile_group=_tile_group(tile_group, tiles))
        loss = loss + pixel
    loss.backward()
    return IterationResult(float(loss.detach()), float(latent.detach()),
                           None if pixel is None else float(pixel.detach()))


def reconstruction_iteration(model: restoration.Model, method: Method, loss_fn, target: torch.Tensor, *,
                             tiles: tuple[int, int], halo: int, tile_group=None) -> IterationResult:
    """Mirage's reconstruction phase (B.4): the target's own latents decoded with skip features of the
    target, the pixel loss backpropagated into the fusion conv and the first decoder LoRA. Decoding as
    the method decodes (ChopGrad's ``d_trunc``, per-frame); latent-only methods backpropagate fully."""
    target = target.to(next(model.vae.parameters()).device)
    z = model.encode(target)
    d_trunc = (method.d_trunc or 0) if method.decode else None
    pixel = chopgrad.decode_loss(_pixel_decoder(model, method, target), model.to_decoder(z), target,
                                 loss_fn, d_trunc=d_trunc, tiles=tiles, halo=halo,
                                 tile_group=_tile_group(tile_group, tiles))
    pixel.backward()
    return IterationResult(float(pixel.detach()), None, float(pixel.detach()))


def make_optimizers(model: restoration.Model, *, lr: float, betas: tuple[float, float],
                    weight_decay: float) -> dict[str, torch.optim.Optimizer]:
    """Fresh AdamW optimizers (``transformer``, ``decoder``) over what trains now."""
    optimizers = {}
    for name, group in (("transformer", model.transformer_trainable()), ("decoder", model.decoder_trainable())):
        if group:
            optimizers[name] = torch.optim.AdamW(list(group.values()), lr=lr, betas=betas, weight_decay=weight_decay)
    return optimizers


def peak_memory(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_memory_bytes": int(torch.cuda.max_memory_allocated(device)), "peak_rss_bytes": None}
    # ru_maxrss is in KiB on Linux: the process's peak resident set so far (all tasks before this one too).
    return {"peak_memory_bytes": None, "peak_rss_bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024}


def file_sha256(path: Path) -> str:
    """The content hash of a file (a chained experiment's starting weights, in the fingerprint)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(settings: dict, pairs_file: Path, pairs: list[dict], vae_dir: Path) -> str:
    """What a checkpoint must have been written with to be resumed: ``settings`` (params, method, task,
    world size: anything JSON), the VAE (config and weights, by content) and the training pairs
    (``pairs_file``, and the names and sizes of their frame files: cheap, and no modification time,
    which `dvc checkout` changes)."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(pairs_file.read_bytes())
    for pair in pairs:
        for key in ("input", "target"):
            for path in list_frames(pair[key]):
                digest.update(f"{path.name}:{path.stat().st_size};".encode())
    for path in sorted(vae_dir.iterdir()):
        if path.is_file():
            with open(path, "rb") as handle:
                for block in iter(lambda handle=handle: handle.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()


def checkpoint_tensors(model: restoration.Model, optimizers: dict) -> tuple[dict, dict]:
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


def restore_checkpoint(model: restoration.Model, optimizers: dict, tensors: dict, groups: dict | None) -> None:
    """Weights and RNG from a checkpoint; optimizer states too unless ``groups`` is None (a checkpoint
    written in the previous Mirage phase: the next phase starts with fresh optimizers, as it does
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

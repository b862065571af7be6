"""Stage ``vae``: the project's causal video VAE, a small Wan 2.1-style VAE trained here, or real weights.

Every later stage decodes with the VAE this stage leaves in ``data/vae/`` (a diffusers
``AutoencoderKLWan`` folder: ``config.json`` + safetensors), so the pipeline runs the same with
the embedded stand-in and with the real thing.

``source: train`` trains a small ``AutoencoderKLWan`` (same architecture family as Wan 2.1's VAE:
causal 3D convolutions, feature cache, 1 + 4k frames per latent clip, 4x temporal compression and
16 latent channels; narrower, ``base_dim`` 16 instead of 96, and 4x spatial compression instead of
8x in the embedded recipe) on random clips and crops of the training scenes, with Wan's reconstruction
recipe reduced to what fits a CPU budget: an L1 loss plus a KL term weighted as in LDM/Wan (no
perceptual or adversarial terms). The latent mean and standard deviation measured on the training
clips are stored in the config as ``latents_mean`` / ``latents_std``, as Wan's are.

The embedded default does not train here: it loads ``weights/embedded/vae/``, which this stage
trained with ``profiles/embedded-vae.yaml`` (the command, its time and the hash of its output are in
``weights/embedded/README.md``). What that recipe learned on the way:

.. warning::
    A freshly initialised small Wan VAE first sits on a plateau near the mean colour (its decoder
    barely depends on the latents), then climbs out. The plateau is longest at high learning rates:
    at 1.5e-3 the 16-wide VAE was still on it after 600 updates, at 5e-4 it left it within about 400.
    Training clips must be long: a VAE trained on 5-frame clips reconstructs the first 9 frames of a
    held-out scene at 21.6 dB but all 33 at 18 dB (its causal cache drifts on frames it never saw in
    training); 17-frame clips of 32 x 32 pixels cost the same as 5-frame clips of 64 x 64 and do not
    drift. ``posterior: mode`` (the decoder sees the posterior mean) and a cosine decay are the rest
    of the recipe. Compare ``test_psnr`` with ``test_psnr_mean_colour`` (each test clip replaced by
    its own mean colour) in ``metrics/vae.json``.

``source: pretrained`` copies a local diffusers folder (e.g. the ``vae/`` folder of
Wan-AI/Wan2.1-T2V-1.3B-Diffusers), loaded with ``local_files_only=True``; no network access.

Either way the VAE reconstructs the first ``eval_frames`` frames of every held-out (test) scene:
the mean PSNR goes to the metrics file, a side-by-side mp4 and a frame grid to the plots folder.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import chopgrad  # noqa: F401  (before diffusers: the torchvision fix for CPU-only torch)
from stages.common import cli, measure

log = logging.getLogger("stages.vae")

STAGE = "vae"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                "diffusion_pytorch_model.bin")
VIDEO_FPS = 15  # playback speed of the sample video only


@dataclass(frozen=True)
class Params:
    source: Literal["train", "pretrained"]  # train the small VAE here, or copy a local diffusers folder
    pretrained_path: str | None  # read only with source: pretrained; Wan 2.1's vae/ folder, say
    base_dim: int  # channels of the first encoder level (Wan 2.1: 96)
    z_dim: int  # latent channels (Wan 2.1: 16)
    dim_mult: tuple[int, ...]  # channel multiplier per level; len - 1 spatial 2x downsamplings (Wan: 1,2,4,4)
    num_res_blocks: int  # residual blocks per level (Wan 2.1: 2)
    temporal_downsample: tuple[bool, ...]  # which downsamplings also halve time (Wan 2.1: F,T,T = 4x)
    clip_frames: int  # frames per training clip: 1 + 4k, the unit the causal encoder consumes
    crop: tuple[int, int]  # training crop [height, width] in pixels, multiples of the spatial factor
    batch_size: int  # clips per optimisation step
    iterations: int  # optimiser updates
    lr: float  # AdamW peak learning rate
    betas: tuple[float, float]  # AdamW betas (LDM's autoencoders use 0.5, 0.9)
    warmup_iterations: int  # linear warm-up of the learning rate, then lr_schedule
    lr_schedule: Literal["constant", "cosine"]  # after warm-up: constant, or cosine decay to 0 at the last update
    posterior: Literal["sample", "mode"]  # what the decoder sees in training: a posterior sample (LDM/Wan), or its mean
    kl_weight: float  # KL weight against an L1 summed over pixels (Wan/LDM recipe: 1e-6)
    grad_clip: float  # max gradient norm; the first steps of a fresh VAE are spiky
    eval_frames: int  # frames (1 + 4k) of each held-out scene reconstructed for the PSNR
    seed: int  # model init, clip sampling and posterior sampling
    threads: int  # CPU threads for torch, 0 = torch's default; a small model trains fastest on 1

    def __post_init__(self):
        if (self.eval_frames - 1) % 4 or self.eval_frames < 1:
            raise ValueError(f"vae.eval_frames must be 1 + 4k (1, 5, 9, ...), got {self.eval_frames}")
        if self.threads < 0:
            raise ValueError(f"vae.threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.source == "pretrained":
            check_pretrained(self.pretrained_path)
            return  # the training knobs are not read
        if min(self.base_dim, self.z_dim, self.num_res_blocks, self.batch_size, self.iterations) < 1:
            raise ValueError("vae.base_dim, z_dim, num_res_blocks, batch_size and iterations must be >= 1")
        if not self.dim_mult or min(self.dim_mult) < 1:
            raise ValueError(f"vae.dim_mult must be a non-empty list of positive integers, "
                             f"got {list(self.dim_mult)}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(f"vae.temporal_downsample needs one entry per downsampling, len(dim_mult) - 1 = "
                             f"{len(self.dim_mult) - 1}, got {len(self.temporal_downsample)}")
        if (self.clip_frames - 1) % 4 or self.clip_frames < 1:
            raise ValueError(f"vae.clip_frames must be 1 + 4k (1, 5, 9, 13, ...), got {self.clip_frames}")
        factor = self.spatial_factor
        if any(size < factor or size % factor for size in self.crop):
            raise ValueError(f"vae.crop must be multiples of the spatial factor {factor}, "
                             f"got {list(self.crop)}")
        if not (self.lr > 0 and self.kl_weight >= 0 and self.grad_clip > 0):
            raise ValueError("vae.lr and vae.grad_clip must be > 0 and vae.kl_weight >= 0")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"vae.betas must be in [0, 1), got {list(self.betas)}")
        if not 0 <= self.warmup_iterations < self.iterations:
            raise ValueError(f"vae.warmup_iterations must be in [0, iterations), got {self.warmup_iterations}")

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


def check_pretrained(path: str | None) -> Path:
    """The folder of a diffusers ``AutoencoderKLWan``, checked before any work; ValueError naming the fix."""
    fix = ("point vae.pretrained_path at a diffusers AutoencoderKLWan folder, e.g. the vae/ folder of "
           "Wan-AI/Wan2.1-T2V-1.3B-Diffusers, holding config.json and diffusion_pytorch_model.safetensors")
    if path is None:
        raise ValueError(f"vae.source is 'pretrained' but vae.pretrained_path is null: {fix}")
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"vae.pretrained_path: {folder} is not a folder (missing weights folder): {fix}")
    config = folder / "config.json"
    if not config.is_file():
        nested = folder / "vae" / "config.json"
        hint = f" (did you mean {folder / 'vae'}?)" if nested.is_file() else ""
        raise ValueError(f"vae.pretrained_path: {folder} has no config.json{hint}: {fix}")
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"vae.pretrained_path: {config} is not a diffusers config ({err}): {fix}") from err
    if class_name != "AutoencoderKLWan":
        raise ValueError(f"vae.pretrained_path: {folder} holds a {class_name}, "
                         f"not an AutoencoderKLWan: {fix}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"vae.pretrained_path: {folder} has no weights ({' or '.join(WEIGHT_FILES)}): {fix}")
    return folder


# ----------------------------------------------------------------------------------------------------------
# Data: scenes as uint8 videos [T, H, W, 3]; clips as float [B, 3, T, H, W] in [-1, 1]


def load_videos(scenes_dir: Path, split: str, max_frames: int | None = None) -> dict[str, np.ndarray]:
    """The frames of every scene of ``split`` ('train' or 'test') by scene name: uint8 [T, H, W, 3].

    With ``max_frames``, only the first ``1 + 4k <= max_frames`` frames are read (a whole causal clip).
    """
    from stages.common import scenes

    names = scenes.load_split(scenes_dir)[split]
    if not names:
        raise ValueError(f"{scenes_dir / 'split.json'} lists no {split} scenes; "
                         "the vae stage needs at least one")
    videos = {}
    for name in names:
        scene = scenes.load_scene(scenes_dir / name, load_images=False)
        count = scene.num_frames if max_frames is None else min(max_frames, scene.num_frames)
        videos[name] = scene.read_images(np.arange(1 + 4 * ((count - 1) // 4)))
    return videos


def center_crop(video: np.ndarray, factor: int) -> np.ndarray:  # [T, H, W, 3] -> [T, H', W', 3]
    """Crop H and W down to multiples of ``factor`` (the VAE's spatial compression), centred."""
    height, width = (video.shape[1] // factor) * factor, (video.shape[2] // factor) * factor
    top, left = (video.shape[1] - height) // 2, (video.shape[2] - width) // 2
    return video[:, top:top + height, left:left + width]


def to_clip(video: np.ndarray) -> torch.Tensor:  # [T, H, W, 3] uint8 -> [3, T, H, W] float in [-1, 1]
    return torch.from_numpy(np.ascontiguousarray(video)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def sample_clips(videos: list[np.ndarray], params: Params, generator: torch.Generator) -> torch.Tensor:
    """A random batch of training clips and crops: [B, 3, clip_frames, crop_h, crop_w]."""
    clips = []
    for _ in range(params.batch_size):
        video = videos[int(torch.randint(len(videos), (), generator=generator))]
        frames, height, width = video.shape[:3]
        if frames < params.clip_frames or height < params.crop[0] or width < params.crop[1]:
            raise ValueError(f"a training scene of {frames} frames of {height}x{width} is smaller than "
                             f"vae.clip_frames={params.clip_frames} x vae.crop={list(params.crop)}")
        start = int(torch.randint(frames - params.clip_frames + 1, (), generator=generator))
        top = int(torch.randint(height - params.crop[0] + 1, (), generator=generator))
        left = int(torch.randint(width - params.crop[1] + 1, (), generator=generator))
        clips.append(to_clip(video[start:start + params.clip_frames, top:top + params.crop[0],
                                   left:left + params.crop[1]]))
    return torch.stack(clips)  # [B, 3, T, H, W]


# ----------------------------------------------------------------------------------------------------------
# Model


def build_vae(params: Params):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(params.seed)
    return AutoencoderKLWan(
        base_dim=params.base_dim, z_dim=params.z_dim, dim_mult=list(params.dim_mult),
        num_res_blocks=params.num_res_blocks, temperal_downsample=list(params.temporal_downsample),
        latents_mean=[0.0] * params.z_dim, latents_std=[1.0] * params.z_dim,
        scale_factor_temporal=2 ** sum(params.temporal_downsample),
        scale_factor_spatial=params.spatial_factor,
    )


def train(vae, videos: list[np.ndarray], params: Params) -> list[float]:
    """Fit ``vae`` to random clips of ``videos``; returns the loss of every step."""
    generator = torch.Generator().manual_seed(params.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=params.lr, betas=params.betas, weight_decay=0.0)

    def lr_factor(step: int) -> float:  # linear warm-up, then constant or cosine decay
        warm = min(1.0, (step + 1) / params.warmup_iterations) if params.warmup_iterations else 1.0
        if params.lr_schedule == "cosine":
            return warm * 0.5 * (1.0 + math.cos(math.pi * step / params.iterations))
        return warm

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    vae.train()
    losses, start = [], time.perf_counter()
    for step in range(params.iterations):
        clips = sample_clips(videos, params, generator)  # [B, 3, T, H, W]
        posterior = vae.encode(clips).latent_dist
        latents = posterior.mode() if params.posterior == "mode" else posterior.sample(generator=generator)
        recon = vae.decode(latents).sample  # [B, 3, T, H, W]
        # L1 and KL both as sums per clip, divided by the pixel count: LDM's / Wan's weighting.
        pixels = clips[0].numel()
        loss = (recon - clips).abs().mean() + params.kl_weight * posterior.kl().mean() / pixels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), params.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % max(1, params.iterations // 10) == 0 or step == params.iterations - 1:
            log.info("iteration %d/%d  loss %.4f  %.1f s", step + 1, params.iterations, losses[-1],
                     time.perf_counter() - start)
    return losses


@torch.no_grad()
def latent_stats(vae, videos: list[np.ndarray], params: Params) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the posterior means over training clips (Wan's latents_mean/std)."""
    vae.eval()
    latents = [vae.encode(to_clip(center_crop(video[:params.clip_frames], params.spatial_factor))[None])
               .latent_dist.mean for video in videos]  # each [1, C, t, h, w]
    flat = torch.cat([z.transpose(0, 1).reshape(z.shape[1], -1) for z in latents], dim=1)  # [C, N]
    return flat.mean(dim=1).tolist(), flat.std(dim=1).clamp_min(1e-6).tolist()


@torch.no_grad()
def reconstruct(vae, video: np.ndarray) -> np.ndarray:  # [T, H, W, 3] uint8 -> [T, H, W, 3] uint8
    """Encode (posterior mean) and decode one video."""
    vae.eval()
    x = to_clip(video)[None]  # [1, 3, T, H, W]
    recon = vae.decode(vae.encode(x).latent_dist.mode()).sample[0]  # [3, T, H, W]
    return ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()


# ----------------------------------------------------------------------------------------------------------
# Outputs


def save_model(vae, out_dir: Path) -> None:
    """``save_pretrained`` into ``out_dir``, replacing a previous VAE folder there, never anything else."""
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise FileExistsError(f"{out_dir} exists and is not a VAE folder; refusing to replace it")
    from stages.common.video import staged_outputs

    with staged_outputs(out_dir) as (staging,):
        vae.save_pretrained(staging, safe_serialization=True)


def plot_training(losses: list[float], source: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if losses:
        ax.plot(np.arange(1, len(losses) + 1), losses, lw=0.8, alpha=0.4, label="step")
        window = max(1, len(losses) // 20)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(window, len(losses) + 1), smooth, lw=1.5, label=f"mean of {window}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("L1 + KL loss")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no training: weights from {source}", ha="center", va="center", wrap=True)
        ax.set_axis_off()
    ax.set_title("VAE training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_reconstruction(reference: np.ndarray, recon: np.ndarray, psnr: np.ndarray, path: Path,
                        columns: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = np.linspace(0, len(reference) - 1, min(columns, len(reference))).round().astype(int)
    fig, axes = plt.subplots(2, len(picks), figsize=(2.2 * len(picks), 3.2), dpi=100, squeeze=False)
    for col, index in enumerate(picks):
        for row, (frames, name) in enumerate([(reference, "input"), (recon, "reconstruction")]):
            axes[row, col].imshow(frames[index])
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            if col == 0:
                axes[row, col].set_ylabel(name)
        axes[0, col].set_title(f"frame {index + 1}: {psnr[index]:.1f} dB", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------
# The stage


def run(params: Params, scenes_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
        plots_dir: str | Path) -> dict:
    """Provide the VAE in ``out_dir`` and measure it on the held-out scenes of ``scenes_dir``.

    Returns:
        ``{"metrics": {...}, "losses": [...], "figures": [paths], "video": path}``.
    """
    scenes_dir, out_dir, metrics_path, plots_dir = map(Path, (scenes_dir, out_dir, metrics_path, plots_dir))
    from diffusers import AutoencoderKLWan

    started = time.perf_counter()
    if params.source == "pretrained":
        folder = check_pretrained(params.pretrained_path)
        vae = AutoencoderKLWan.from_pretrained(folder, local_files_only=True)
        losses: list[float] = []
        factor = vae.config.scale_factor_spatial
    else:
        factor = params.spatial_factor
        train_videos = list(load_videos(scenes_dir, "train").values())
        vae = build_vae(params)
        losses = train(vae, train_videos, params)
        mean, std = latent_stats(vae, train_videos, params)
        vae.register_to_config(latents_mean=mean, latents_std=std)
    train_seconds = time.perf_counter() - started
    vae.eval()
    save_model(vae, out_dir)

    test_videos = {name: center_crop(video, factor) for name, video in
                   load_videos(scenes_dir, "test", max_frames=params.eval_frames).items()}
    psnr, samples, constant = {}, {}, []
    for name, video in test_videos.items():
        samples[name] = reconstruct(vae, video)
        psnr[name] = measure.psnr(samples[name], video, per_frame=True)
        mean_colour = np.broadcast_to(video.mean(axis=(0, 1, 2)).round().astype(np.uint8), video.shape)
        constant.append(measure.psnr(mean_colour, video, per_frame=True))

    plots_dir.mkdir(parents=True, exist_ok=True)
    name = next(iter(test_videos))  # the sample shown: the first test scene
    video, recon = test_videos[name], samples[name]
    figures = [plots_dir / "training_curve.png", plots_dir / "reconstruction.png"]
    plot_training(losses, str(params.pretrained_path), figures[0])
    plot_reconstruction(video, recon, psnr[name], figures[1])
    from stages.common.video import write_video

    side_by_side = np.concatenate([video, recon], axis=2)  # [T, H, 2W, 3]: input | reconstruction
    sample = write_video(plots_dir / "reconstruction.mp4", side_by_side, fps=VIDEO_FPS)

    metrics = {
        "test_psnr": float(np.mean(np.concatenate(list(psnr.values())))),
        "test_psnr_first_frame": float(np.mean([values[0] for values in psnr.values()])),
        "test_psnr_mean_colour": float(np.mean(np.concatenate(constant))),  # the collapsed VAE's score
        "test_scenes": len(psnr),
        "eval_frames": len(video),
        "train_seconds": round(train_seconds, 2),
        "parameters": int(sum(p.numel() for p in vae.parameters())),
    }
    if losses:
        metrics["final_loss"] = float(np.mean(losses[-max(1, len(losses) // 20):]))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    log.info("test PSNR %.2f dB over %d scenes (%s)", metrics["test_psnr"], len(psnr), ", ".join(psnr))
    return {"metrics": metrics, "losses": losses, "figures": figures, "video": sample}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--scenes", required=True, help="scene set folder (with split.json)")
    parser.add_argument("--out", required=True, help="folder for the diffusers VAE")
    parser.add_argument("--metrics", required=True, help="metrics JSON file")
    parser.add_argument("--plots", required=True, help="folder for the training curve, frames and video")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        result = run(params, args.scenes, args.out, args.metrics, args.plots)
        tracker.log_metrics(result["metrics"])
        if result["losses"]:
            tracker.log_curve("train_loss", range(1, len(result["losses"]) + 1), result["losses"])
        for figure in result["figures"]:
            tracker.log_figure(figure)
        tracker.log_video(result["video"])
        tracker.log_artifact(Path(args.out) / "config.json", "model")
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

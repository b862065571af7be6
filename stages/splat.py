"""Stage ``splat``: sparse-view 3D Gaussian splatting renders against ground truth (novel-view synthesis pairs).

Paper section 4.2 and supplement B.2: every DL3DV-Benchmark scene is reconstructed with gsplat from
every 50th frame only, and the whole camera path is rendered; the renders, full of the floaters and
blur of a sparse-view reconstruction, are the degraded inputs of the "nvs" task, the captured frames
its targets. This stage does the same for every scene of the set (train, test and validation splits alike, the
split read from ``split.json``), with :mod:`stages.common.splat` (gsplat's trainer recipe and
``DefaultStrategy``; ``gsplat.rasterization`` on CUDA, gsplat's PyTorch projection and a dense
compositor on CPU). Initialisation: the scene's SfM points when it ships them, random points in the
room (``objects.json``) or around the cameras otherwise.

Outputs (built under temporary names and swapped in at the end):

- ``<out>/nvs/``: the pairs folder (``pairs.json``; ``<split>/<scene>/input`` = renders,
  ``<split>/<scene>/target`` = ground truth; PNG frames ``00000.png, ...``);
- ``<out>/gaussians/<scene>.safetensors``: the reconstruction;
- ``--metrics``: per-scene PSNR at the held-out frames (those not trained on) and at the training frames;
- ``--plots``: ``videos/<scene>.mp4`` (render | ground truth), ``frames.png`` (held-out frames) and
  ``training.png`` (loss and Gaussian count).

The embedded ``params.yaml`` values are a schedule sized for one CPU thread (300 iterations, learning rates
x10); gsplat's and the paper's full schedule is given next to each value there.

    python -m stages.splat --params params.yaml --scenes data/scenes --out data/splat \
        --metrics metrics/splat.json --plots plots/splat
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.common import cli, measure, pairs, scenes, video
from stages.common import splat as gs

log = logging.getLogger("stages.splat")

STAGE = "splat"
TASK = "nvs"
FPS = 24  # the pairs' nominal frame rate (DL3DV videos are 30 fps, sub-sampled; Wan works at 16-24)


@dataclass(frozen=True)
class Params:
    every: int  # k: reconstruct from frames 0, k, 2k, ... (paper: every 50th frame)
    iterations: int  # optimiser updates per scene (gsplat / paper: 30000)
    sh_degree: int  # highest spherical-harmonics degree (gsplat: 3)
    sh_degree_interval: int  # one more SH degree every this many steps (gsplat: 1000)
    init_num_points: int  # random initialisation, when a scene has no SfM points (gsplat: 100000)
    init_extent: float  # random init without room bounds: a cube of this x scene scale around the cameras
    init_opacity: float  # initial opacity (gsplat: 0.1)
    init_scale: float  # initial scale factor on the 3-nearest-neighbour distance (gsplat: 1.0)
    ssim_lambda: float  # loss = (1 - l) L1 + l (1 - SSIM) (gsplat: 0.2)
    means_lr: float  # times the scene scale, decayed to 1 % (gsplat: 1.6e-4)
    scales_lr: float  # log scales (gsplat: 5e-3)
    quats_lr: float  # rotations (gsplat: 1e-3)
    opacities_lr: float  # logit opacities (gsplat: 5e-2)
    sh0_lr: float  # degree-0 colour (gsplat: 2.5e-3)
    shN_lr: float  # higher SH degrees (gsplat: 2.5e-3 / 20)
    refine_start_iter: int  # DefaultStrategy: no densification before this step (gsplat: 500)
    refine_stop_iter: int  # ... nor after this one (gsplat: 15000)
    refine_every: int  # ... grow / split / prune every this many steps (gsplat: 100)
    reset_every: int  # ... its opacity-reset period, also when too-big pruning starts (gsplat: 3000)
    grow_grad2d: float  # ... screen-gradient threshold for growing (gsplat: 0.0002)
    scene_dir: str | None  # null: the --scenes set; else a real DL3DV / nerfstudio scene set or scene folder
    image_dir: str | None  # read frames from this folder of each scene (e.g. DL3DV's images_4); null: listed
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA (gsplat.rasterization) when available
    sample_videos: int  # scenes whose render | ground-truth video is logged (first train, first test, ...)
    seed: int  # initialisation, view order, densification noise
    threads: int  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        for name in ("every", "iterations", "sh_degree_interval", "init_num_points", "refine_every", "reset_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"splat.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.sh_degree <= 4:
            raise ValueError(f"splat.sh_degree must be in [0, 4] (gsplat's SH), got {self.sh_degree}")
        if self.init_num_points < 4:
            raise ValueError(f"splat.init_num_points must be >= 4 (3 neighbours each), got {self.init_num_points}")
        if not 0 < self.init_opacity < 1:
            raise ValueError(f"splat.init_opacity must be in (0, 1), got {self.init_opacity}")
        if not 0 <= self.ssim_lambda <= 1:
            raise ValueError(f"splat.ssim_lambda must be in [0, 1], got {self.ssim_lambda}")
        for name in ("init_extent", "init_scale", "means_lr", "scales_lr", "quats_lr", "opacities_lr", "sh0_lr",
                     "shN_lr", "grow_grad2d"):
            if not getattr(self, name) > 0:
                raise ValueError(f"splat.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.refine_start_iter <= self.refine_stop_iter:
            raise ValueError(f"splat.refine_start_iter must be in [0, refine_stop_iter], got "
                             f"{self.refine_start_iter} and {self.refine_stop_iter}")
        if self.sample_videos < 0 or self.threads < 0 or self.seed < 0:
            raise ValueError("splat.sample_videos, splat.threads and splat.seed must be >= 0")
        if self.scene_dir is not None and not Path(self.scene_dir).is_dir():
            raise ValueError(f"splat.scene_dir: {self.scene_dir} is not a folder; point it at a DL3DV / "
                             "nerfstudio scene folder (transforms.json) or a set of them (split.json), or null")

    def train_config(self) -> gs.TrainConfig:
        return gs.TrainConfig(
            iterations=self.iterations, sh_degree=self.sh_degree, sh_degree_interval=self.sh_degree_interval,
            ssim_lambda=self.ssim_lambda, means_lr=self.means_lr, scales_lr=self.scales_lr,
            quats_lr=self.quats_lr, opacities_lr=self.opacities_lr, sh0_lr=self.sh0_lr, shN_lr=self.shN_lr,
            refine_start_iter=self.refine_start_iter, refine_stop_iter=self.refine_stop_iter,
            refine_every=self.refine_every, reset_every=self.reset_every, grow_grad2d=self.grow_grad2d,
            seed=self.seed)


# ----------------------------------------------------------------------------------------------------------
# Scenes


def check_scenes(entries: list[gs.SceneEntry], params: Params) -> dict[str, scenes.Scene]:
    """Load every scene's layout (not its frames) and check it before any work; errors name the fix."""
    loaded = {}
    for entry in entries:
        scene = scenes.load_scene(entry.folder, image_dir=params.image_dir, load_images=False)
        if params.every > scene.num_frames:
            raise ValueError(f"splat.every = {params.every} is larger than the {scene.num_frames} frames of "
                             f"scene {entry.name}: no k-th frame but frame 0 to reconstruct from; set "
                             f"splat.every <= {scene.num_frames} (the paper: 50 for ~300-frame videos).")
        if min(scene.height, scene.width) < 11:
            raise ValueError(f"scene {entry.name} has {scene.width}x{scene.height} frames; the SSIM loss needs "
                             "at least 11x11 pixels.")
        loaded[entry.name] = scene
    return loaded


def initial_gaussians(entry: gs.SceneEntry, scene: scenes.Scene, train_ids: np.ndarray, params: Params,
                      generator: torch.Generator) -> tuple[dict[str, torch.Tensor], str]:
    """SfM points when the scene has them, else random points in the room or around the cameras."""
    for folder in entry.search:
        found = gs.sfm_points(folder, scene.extra)
        if found is not None and len(found[0]) >= 4:
            points, rgb, source = found
            log.info("%s: %d SfM points from %s", entry.name, len(points), source)
            return gs.init_gaussians(torch.from_numpy(points).float(), torch.from_numpy(rgb).float() / 255,
                                     params.sh_degree, params.init_opacity, params.init_scale, generator), "sfm"
    if scene.room is not None:
        low, high = scene.room.bounds
    else:
        centres = scene.camtoworlds[train_ids, :3, 3]
        reach = params.init_extent * gs.scene_scale(scene.camtoworlds[train_ids])
        low, high = centres.mean(axis=0) - reach, centres.mean(axis=0) + reach
    points, rgb = gs.random_points(low, high, params.init_num_points, generator)
    return gs.init_gaussians(points, rgb, params.sh_degree, params.init_opacity, params.init_scale,
                             generator), "random"


def cameras(scene: scenes.Scene) -> tuple[torch.Tensor, torch.Tensor]:  # -> viewmats [T, 4, 4], Ks [T, 3, 3]
    viewmats = gs.viewmats_from_camtoworlds(scene.camtoworlds)
    return viewmats, torch.as_tensor(scene.intrinsics, dtype=torch.float32).expand(len(viewmats), 3, 3)


def reconstruct(entry: gs.SceneEntry, scene: scenes.Scene, frames: np.ndarray, params: Params,
                device: torch.device) -> dict:
    """Train on every ``every``-th frame, render the whole path; the Gaussians, renders and measures."""
    from tqdm import tqdm

    started = time.perf_counter()
    generator = torch.Generator().manual_seed(params.seed)
    train_ids = np.arange(0, len(frames), params.every)
    heldout_ids = np.setdiff1d(np.arange(len(frames)), train_ids)
    init, init_kind = initial_gaussians(entry, scene, train_ids, params, generator)
    viewmats, Ks = cameras(scene)
    images = torch.from_numpy(frames[train_ids]).float().div(255).to(device)
    scale = gs.scene_scale(scene.camtoworlds[train_ids])
    bar = tqdm(total=params.iterations, desc=f"splat {entry.name}", unit="it", leave=False)

    def progress(step: int, loss: float, count: int) -> None:
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss:.3f}", gaussians=count)

    with bar:
        trained, history = gs.train({k: v.to(device) for k, v in init.items()}, images, viewmats[train_ids].to(device),
                                    Ks[train_ids].to(device), params.train_config(), scale, progress=progress)
    with tqdm(total=len(frames), desc=f"render {entry.name}", unit="frame", leave=False) as bar:
        renders = gs.render_frames(trained, viewmats, Ks, scene.width, scene.height, params.sh_degree,
                                   progress=bar.update)
    psnr = measure.psnr(renders, frames, per_frame=True)
    measures = {
        "split": entry.split, "init": init_kind, "init_gaussians": len(init["means"]),
        "num_gaussians": len(trained["means"]), "train_views": len(train_ids), "heldout_frames": len(heldout_ids),
        "train_psnr": round(float(psnr[train_ids].mean()), 4),
        "heldout_psnr": round(float(psnr[heldout_ids].mean()), 4) if len(heldout_ids) else None,
        "final_loss": round(float(np.mean(history["loss"][-max(1, params.iterations // 20):])), 5),
        "scene_scale": round(scale, 5), "seconds": round(time.perf_counter() - started, 2),
    }
    metadata = {"scene": entry.name, "split": entry.split, "sh_degree": params.sh_degree, "every": params.every,
                "train_frames": train_ids.tolist(), "scene_scale": scale, "init": init_kind,
                "width": scene.width, "height": scene.height}
    return {"gaussians": trained, "metadata": metadata, "renders": renders, "psnr": psnr, "measures": measures,
            "history": history}


# ----------------------------------------------------------------------------------------------------------
# Outputs


def plot_frames(samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]], path: Path,
                columns: int = 5) -> Path:
    """Rows of render / ground truth at held-out frames of each sample scene, with each frame's PSNR."""
    rows = {name: (renders, truth, heldout) for name, (renders, truth, _, heldout) in samples.items()}
    return gs.plot_frame_pairs(rows, ("render", "ground truth"), path, columns,
                               title=lambda name, index: f"frame {index}: {samples[name][2][index]:.1f} dB")


def sample_names(entries: list[gs.SceneEntry], count: int) -> list[str]:
    """First train scene, first test scene, then the others in order, ``count`` of them."""
    firsts = [next((e.name for e in entries if e.split == part), None) for part in ("train", "test")]
    ordered = [n for n in firsts if n] + [e.name for e in entries]
    return list(dict.fromkeys(ordered))[:count]


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("splat.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'.")
    return torch.device("cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu")


def run(params: Params, scenes_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
        plots_dir: str | Path) -> dict:
    """Reconstruct and render every scene; write the pairs, the Gaussians, metrics and plots.

    Returns:
        ``{"metrics": {...}, "videos": [paths], "figures": [paths], "histories": {scene: {...}}}``.
    """
    out_dir, metrics_path, plots_dir = Path(out_dir), Path(metrics_path), Path(plots_dir)
    source = Path(params.scene_dir) if params.scene_dir is not None else Path(scenes_dir)
    entries = gs.scene_entries(source)
    loaded = check_scenes(entries, params)  # every error before any work
    device = resolve_device(params.device)
    started = time.perf_counter()
    with video.staged_outputs(out_dir) as (build,):
        samples, results = sample_names(entries, params.sample_videos), {}
        videos, frame_samples = [], {}
        with pairs.PairsWriter(build / TASK, TASK, fps=FPS) as writer:
            for entry in entries:
                frames = loaded[entry.name].read_images()
                result = reconstruct(entry, loaded[entry.name], frames, params, device)
                gs.save_gaussians(build / "gaussians" / f"{entry.name}.safetensors", result["gaussians"],
                                  result["metadata"])
                writer.add(entry.name, entry.split, result["renders"], frames)
                if entry.name in samples:
                    side_by_side = np.concatenate([result["renders"], frames], axis=2)  # render | ground truth
                    videos.append(video.write_video(plots_dir / "videos" / f"{entry.name}.mp4", side_by_side,
                                                    fps=FPS))
                    heldout = np.setdiff1d(np.arange(len(frames)), result["metadata"]["train_frames"])
                    frame_samples[entry.name] = (result["renders"], frames, result["psnr"], heldout)
                results[entry.name] = result
                log.info("%s (%s): held-out PSNR %s dB, train PSNR %.2f dB, %d Gaussians, %.1f s", entry.name,
                         entry.split, result["measures"]["heldout_psnr"], result["measures"]["train_psnr"],
                         result["measures"]["num_gaussians"], result["measures"]["seconds"])
            writer.commit()
        plots_dir.mkdir(parents=True, exist_ok=True)
        figures = [gs.plot_training({n: r["history"] for n, r in results.items()}, plots_dir / "training.png")]
        if frame_samples:
            figures.append(plot_frames(frame_samples, plots_dir / "frames.png"))
    metrics = summarise({n: r["measures"] for n, r in results.items()}, time.perf_counter() - started)
    video.write_json(metrics_path, metrics)
    return {"metrics": metrics, "videos": videos, "figures": figures,
            "histories": {n: r["history"] for n, r in results.items()}}


def summarise(measures: dict[str, dict], seconds: float) -> dict:
    heldout = [m["heldout_psnr"] for m in measures.values() if m["heldout_psnr"] is not None]
    by_split = {part: [m["heldout_psnr"] for m in measures.values()
                       if m["split"] == part and m["heldout_psnr"] is not None] for part in ("train", "test")}
    return {
        "heldout_psnr": round(float(np.mean(heldout)), 4) if heldout else None,
        "heldout_psnr_test_scenes": round(float(np.mean(by_split["test"])), 4) if by_split["test"] else None,
        "train_psnr": round(float(np.mean([m["train_psnr"] for m in measures.values()])), 4),
        "num_scenes": len(measures),
        "seconds": round(seconds, 2),
        "scenes": measures,
    }


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--scenes", required=True, help="scene set folder (with split.json)")
    parser.add_argument("--out", required=True, help="output folder: nvs/ pairs and gaussians/")
    parser.add_argument("--metrics", required=True, help="metrics JSON file")
    parser.add_argument("--plots", required=True, help="folder for sample videos and figures")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        result = run(params, args.scenes, args.out, args.metrics, args.plots)
        tracker.log_metrics(gs.numeric_metrics(result["metrics"]))
        for name, history in result["histories"].items():
            tracker.log_curve(f"loss/{name}", range(len(history["loss"])), history["loss"])
        for path in result["videos"]:
            tracker.log_video(path)
        for path in result["figures"]:
            tracker.log_figure(path)
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

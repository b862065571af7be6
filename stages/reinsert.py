"""Stage ``reinsert``: naive asset insertion renders against ground truth (the driving task's pairs).

Paper section 4.4 and supplement B.4: Waymo scenes are reconstructed with SplatAD, a vehicle's Gaussians
are removed and a generated, lower-fidelity 3D asset (TRELLIS, from a few object-centric views) is put
back at the original pose after estimating its heading (Orient-Anything; assets with an inconsistent or
unconfident orientation are discarded and the original scene is kept). The renders of the edited scene,
with the artifacts of a naive insertion, are the inputs a video model learns to harmonise; the captured
frames are the targets. Each component is replaced here by one that runs on a CPU in seconds, behind
the interface the real one would plug into:

=================  =======================================  ===========================================
paper              here                                      interface
=================  =======================================  ===========================================
Waymo segments     Waymo Open Dataset v2 parquet segments,   ``waymo.read_segment`` -> ``drive.drive_scene``
                   one camera (the embedded ones: data/scenes/waymo)
SplatAD scene      gsplat fit of a static background and     ``reconstruct(scene, frames, params, device)``
                   one rigid Gaussian set per tracked actor,   -> Gaussians with ``owner``
                   moved by its 3D box poses (``stages.common.drive``)
TRELLIS asset      a few-view gsplat fit in the actor's box  ``AssetGenerator(views: AssetViews, actor)
                   frame from an axis-aligned cube (no         -> Gaussians`` (box frame)
                   heading given): ``asset_views`` frames
                   masked by the projected box
Orient-Anything    the minimum-area rectangle of the opaque  ``OrientationEstimator(Gaussians)
                   Gaussians' ground footprint                 -> (heading, confidence)``
=================  =======================================  ===========================================

Removal is exact: the actor's own Gaussians are dropped (no box test on a mixed reconstruction).
Orientation check: the asset's estimated heading of its long horizontal axis (modulo 180 degrees, as any
symmetric box's; modulo 90 for a nearly square footprint, ``drive.heading_error``) must be within
``max_yaw_error_deg`` of the box's, with a confidence (``1 - min / max`` bounding-rectangle area over
the directions) of at least ``min_confidence``. An accepted asset is turned by the
residual about its centroid, centred on the box and becomes the actor's Gaussians, moved by the actor's
box poses like the reconstruction was. Actors are tried from most to least visible; a segment whose
assets are all discarded keeps its reconstruction, as in the paper.

Outputs: ``<out>/driving/`` pairs folder (``input`` = renders of the edited scene, ``target`` = the
camera frames, undistorted; training segments -> train, test segments -> test),
``<out>/gaussians/<segment>.safetensors`` (the edited scene, with ``owner``; its metadata lists the actors
in owner order), ``--metrics``, ``--plots``.

    python -m stages.reinsert --params params.yaml --out data/reinsert --metrics metrics/reinsert.json \
        --plots plots/reinsert
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.common import cli, drive, measure, pairs, video, waymo
from stages.common import splat as gs

log = logging.getLogger("stages.reinsert")

STAGE = "reinsert"
TASK = "driving"
Gaussians = dict[str, torch.Tensor]  # the GAUSSIAN_KEYS of stages.common.splat (+ owner in a scene)


@dataclass(frozen=True)
class Params:
    waymo_path: str  # a Waymo Open Dataset v2 folder (<split>/<component>/<segment>.parquet)
    waymo_camera: str  # FRONT, FRONT_LEFT, FRONT_RIGHT, SIDE_LEFT or SIDE_RIGHT
    waymo_train_split: str  # the split folder of the training pairs' segments (the release's: training)
    waymo_test_split: str  # ... and of the test pairs' (the release's: validation)
    waymo_train_segments: str | None  # a text file of context names, or null: the whole split
    waymo_test_segments: str | None
    waymo_frames: int  # first frames of each segment (0: all)
    actor_types: tuple[str, ...]  # BoxType names whose tracks become actors (the rest is background)
    every: int  # reconstruct from frames 0, k, 2k, ... (SplatAD: every frame)
    iterations: int  # optimiser updates per segment
    sh_degree: int
    sh_degree_interval: int
    background_points: int  # random initial background Gaussians (no lidar is read)
    actor_points: int  # random initial Gaussians in each actor's box
    init_extent: float  # the background's cube: this x the scene scale around the cameras
    init_opacity: float
    lr_scale: float  # gsplat's learning rates times this (as the splat stage's CPU schedule)
    refine_start_iter: int  # gsplat.DefaultStrategy, as splat.*
    refine_stop_iter: int
    refine_every: int
    reset_every: int
    grow_grad2d: float
    min_visible_pixels: int  # a frame shows an actor when its projected box covers this many pixels
    asset_views: int  # views the asset is reconstructed from (the paper's TRELLIS: a few object crops)
    asset_iterations: int  # optimiser updates of the asset (low fidelity on purpose)
    asset_points: int  # random initial Gaussians in the box
    asset_lr_scale: float  # gsplat's learning rates times this (the asset's schedule is ~300x shorter)
    asset_alpha_weight: float  # weight of the silhouette (rendered alpha vs projected box) L1 term
    max_yaw_error_deg: float  # discard assets whose estimated heading is further from the box's
    min_confidence: float  # ... or whose orientation confidence (horizontal anisotropy) is lower
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA (gsplat.rasterization) when available
    sample_videos: int  # segments whose insertion | ground-truth video is logged
    seed: int  # initialisation, view order, densification noise
    threads: int  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        for name in ("every", "iterations", "sh_degree_interval", "refine_every", "reset_every", "asset_views",
                     "asset_iterations", "min_visible_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"reinsert.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("background_points", "actor_points", "asset_points"):
            if getattr(self, name) < 4:
                raise ValueError(f"reinsert.{name} must be >= 4 (3 neighbours each), got {getattr(self, name)}")
        if not 0 <= self.sh_degree <= 4:
            raise ValueError(f"reinsert.sh_degree must be in [0, 4] (gsplat's SH), got {self.sh_degree}")
        if not 0 < self.init_opacity < 1:
            raise ValueError(f"reinsert.init_opacity must be in (0, 1), got {self.init_opacity}")
        for name in ("init_extent", "lr_scale", "asset_lr_scale", "grow_grad2d"):
            if not getattr(self, name) > 0:
                raise ValueError(f"reinsert.{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.refine_start_iter <= self.refine_stop_iter:
            raise ValueError(f"reinsert.refine_start_iter must be in [0, refine_stop_iter], got "
                             f"{self.refine_start_iter} and {self.refine_stop_iter}")
        if self.asset_alpha_weight < 0:
            raise ValueError(f"reinsert.asset_alpha_weight must be >= 0, got {self.asset_alpha_weight}")
        if not 0 <= self.max_yaw_error_deg <= 90:
            raise ValueError(f"reinsert.max_yaw_error_deg must be in [0, 90] (headings are compared modulo "
                             f"180 degrees), got {self.max_yaw_error_deg}")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"reinsert.min_confidence must be in [0, 1], got {self.min_confidence}")
        cameras = [c.name for c in waymo.CameraName if c != waymo.CameraName.UNKNOWN]
        if self.waymo_camera not in cameras:
            raise ValueError(f"reinsert.waymo_camera must be one of {', '.join(cameras)}, got {self.waymo_camera!r}")
        types = [t.name for t in waymo.BoxType if t != waymo.BoxType.TYPE_UNKNOWN]
        if not self.actor_types or set(self.actor_types) - set(types):
            raise ValueError(f"reinsert.actor_types must be a non-empty list of {', '.join(types)}, got "
                             f"{list(self.actor_types)}")
        if self.waymo_frames < 0:
            raise ValueError(f"reinsert.waymo_frames must be >= 0 (0: every frame), got {self.waymo_frames}")
        if self.sample_videos < 0 or self.threads < 0 or self.seed < 0:
            raise ValueError("reinsert.sample_videos, reinsert.threads and reinsert.seed must be >= 0")

    def train_config(self) -> gs.TrainConfig:
        return scaled_config(self.iterations, self.lr_scale, sh_degree=self.sh_degree,
                             sh_degree_interval=self.sh_degree_interval, refine_start_iter=self.refine_start_iter,
                             refine_stop_iter=self.refine_stop_iter, refine_every=self.refine_every,
                             reset_every=self.reset_every, grow_grad2d=self.grow_grad2d, seed=self.seed)


def scaled_config(iterations: int, scale: float, **settings) -> gs.TrainConfig:
    """gsplat's trainer with its learning rates times ``scale`` (opacities' at most 2x: larger steps flip
    them between transparent and opaque), for schedules ~100x shorter than its 30000 steps."""
    base = gs.TrainConfig()
    return gs.TrainConfig(iterations=iterations, means_lr=base.means_lr * scale, scales_lr=base.scales_lr * scale,
                          quats_lr=base.quats_lr * scale, opacities_lr=base.opacities_lr * min(scale, 2.0),
                          sh0_lr=base.sh0_lr * scale, shN_lr=base.shN_lr * scale, **settings)


@dataclass(eq=False)
class AssetViews:
    """What an asset generator sees: a few views of one actor, in its box frame."""

    images: torch.Tensor  # [V, H, W, 3] in [0, 1], black outside the actor's projected box
    masks: torch.Tensor  # [V, H, W] in {0, 1}: the projected box
    viewmats: torch.Tensor  # [V, 4, 4] OpenCV box-to-camera
    Ks: torch.Tensor  # [V, 3, 3]
    frames: list[int]  # which frames of the segment


AssetGenerator = Callable[[AssetViews, drive.Actor], Gaussians]
OrientationEstimator = Callable[[Gaussians], tuple[float, float]]


# ----------------------------------------------------------------------------------------------------------
# The components (replaceable; see the table in the module docstring)


def reconstruct(scene: drive.DriveScene, frames: np.ndarray, params: Params, device: torch.device,
                progress: Callable[[int, float, int], None] | None = None) -> tuple[Gaussians, dict]:
    """SplatAD's stand-in: background + actors fitted together on every ``every``-th frame."""
    generator = torch.Generator().manual_seed(params.seed)
    train_ids = np.arange(0, scene.frames, params.every)
    init = drive.init_drive_gaussians(scene, train_ids, params.background_points, params.actor_points,
                                      params.init_extent, params.sh_degree, params.init_opacity, 1.0, generator)
    poses = [scene.poses(int(t)) for t in train_ids]
    scale = gs.scene_scale(np.linalg.inv(scene.viewmats[train_ids]))
    Ks = torch.as_tensor(scene.intrinsics, dtype=torch.float32).expand(len(train_ids), 3, 3)
    trained, history = gs.train(
        {k: v.to(device) for k, v in init.items()}, torch.from_numpy(frames[train_ids]).float().div(255).to(device),
        torch.from_numpy(scene.viewmats[train_ids]).float().to(device), Ks.to(device), params.train_config(), scale,
        progress=progress, place=lambda gaussians, view: drive.place(gaussians, *poses[view]))
    return {k: v.cpu() for k, v in trained.items()}, {"train_frames": train_ids, "scene_scale": scale,
                                                      "history": history}


def asset_views(scene: drive.DriveScene, frames: np.ndarray, counts: np.ndarray, actor: drive.Actor,
                count: int, min_pixels: int) -> AssetViews | None:
    """``count`` frames spread over those where the actor's box covers ``min_pixels`` (``counts [T]``);
    None if too few."""
    visible = np.flatnonzero(counts >= min_pixels)
    if len(visible) < count:
        return None
    picks = visible[np.linspace(0, len(visible) - 1, count).round().astype(int)]
    masks = torch.from_numpy(drive.box_silhouettes(scene, actor, picks.tolist())).float()
    viewmats = torch.from_numpy(scene.viewmats[picks] @ actor.world_from_box[picks]).float()  # box -> camera
    Ks = torch.as_tensor(scene.intrinsics, dtype=torch.float32).expand(count, 3, 3)
    images = torch.from_numpy(frames[picks]).float().div(255) * masks[..., None]
    return AssetViews(images, masks, viewmats, Ks, picks.tolist())


def few_view_asset(params: Params, device: torch.device) -> AssetGenerator:
    """TRELLIS's stand-in: Gaussians fitted to a few masked views, no densification. They start as random
    points in an axis-aligned cube of the box's largest side (a generator's canonical frame knows nothing
    of the heading), so the heading the fit takes is the views' and the orientation check tests it."""

    def generate(views: AssetViews, actor: drive.Actor) -> Gaussians:
        generator = torch.Generator().manual_seed(params.seed)
        points = (torch.rand(params.asset_points, 3, generator=generator) - 0.5) * float(max(actor.size))
        rgb = torch.rand(params.asset_points, 3, generator=generator)
        init = gs.init_gaussians(points, rgb, sh_degree=0, generator=generator)
        config = scaled_config(params.asset_iterations, params.asset_lr_scale, sh_degree=0,
                               refine_start_iter=params.asset_iterations + 1,
                               refine_stop_iter=params.asset_iterations + 1, alpha_weight=params.asset_alpha_weight,
                               seed=params.seed)
        extent = float(np.linalg.norm(actor.size))  # lengths relative to the object, not the scene
        asset, _ = gs.train({k: v.to(device) for k, v in init.items()}, views.images.to(device),
                            views.viewmats.to(device), views.Ks.to(device), config, extent,
                            target_alphas=views.masks.to(device))
        return {k: v.cpu() for k, v in asset.items()}

    return generate


def insert_best_actor(scene_gaussians: Gaussians, scene: drive.DriveScene, frames: np.ndarray, params: Params,
                      generate: AssetGenerator, estimate: OrientationEstimator) -> tuple[Gaussians, dict]:
    """Try the actors from most to least visible until an asset passes the orientation check."""
    counts = [drive.box_pixel_counts(scene, actor) for actor in scene.actors]
    order = sorted(range(len(scene.actors)), key=lambda k: (-int(counts[k].sum()), k))
    attempts = []
    for index in order:
        actor = scene.actors[index]
        views = asset_views(scene, frames, counts[index], actor, params.asset_views, params.min_visible_pixels)
        if views is None:
            attempts.append({"actor": actor.object_id, "reason": "too few views"})
            continue
        asset = generate(views, actor)
        yaw, confidence = estimate(asset)
        residual = drive.heading_error(actor.size, yaw)
        attempt = {"actor": actor.object_id, "yaw_error_deg": round(math.degrees(abs(residual)), 3),
                   "confidence": round(confidence, 4), "asset_views": views.frames}
        if math.degrees(abs(residual)) > params.max_yaw_error_deg or confidence < params.min_confidence:
            attempts.append({**attempt, "reason": "inconsistent orientation"})
            continue
        weights = torch.sigmoid(asset["opacities"])[:, None]
        pivot = ((weights * asset["means"]).sum(0) / weights.sum()).tolist()
        placed = drive.turn_about_z(asset, residual, pivot, (0.0, 0.0, 0.0))
        removed = int((drive.actor_ids(scene_gaussians) == index).sum())
        edited = drive.replace_actor(scene_gaussians, index, placed)
        return edited, {"reinserted": True, "actor": actor.object_id, "index": index, **attempt,
                        "removed_gaussians": removed, "asset_gaussians": len(placed["means"]),
                        "discarded": attempts}
    return scene_gaussians, {"reinserted": False, "actor": None, "index": None, "discarded": attempts}


# ----------------------------------------------------------------------------------------------------------
# The stage


@dataclass(frozen=True)
class Source:
    name: str  # the segment's context name
    split: str  # the pairs' split: train or test
    folder: str  # the release's split folder it is read from
    fps: float


def _scene(params: Params, segment: waymo.Segment) -> drive.DriveScene:
    return drive.drive_scene(segment, params.waymo_frames, [waymo.BoxType[name] for name in params.actor_types])


def check_inputs(params: Params) -> list[Source]:
    """Every segment read and checked (components, camera, frames, boxes with tracks, an actor somewhere)
    before any image is decoded or anything written; each is read again when its turn comes (a real
    split's images do not fit in memory together)."""
    splits = {"train": (params.waymo_train_split, params.waymo_train_segments),
              "test": (params.waymo_test_split, params.waymo_test_segments)}
    sources, actors = [], 0
    for segment, split, folder, count in waymo.checked_segments(
            params.waymo_path, splits, STAGE, waymo.CameraName[params.waymo_camera], params.waymo_frames):
        scene = _scene(params, segment)
        if min(scene.height, scene.width) < 11:
            raise waymo.WaymoError(f"{segment.path}: {scene.width}x{scene.height} frames; the SSIM loss of the "
                                   "reconstruction needs at least 11x11 pixels.")
        actors += len(scene.actors)
        sources.append(Source(scene.name, split, folder, waymo.frame_rate(segment, count)))
    if not actors:
        raise waymo.WaymoError(f"no segment of {params.waymo_path} labels a 3D box of type "
                               f"{', '.join(params.actor_types)}: the driving task has no actor to remove and "
                               "reinsert (check reinsert.actor_types).")
    return sources


def edit_segment(source: Source, build: Path, params: Params, generate: AssetGenerator,
                 estimate: OrientationEstimator, device: torch.device):
    """One segment: reconstruct, reinsert an actor, save the edited Gaussians, render every frame;
    (renders, frames, region [T, H, W], measures, history)."""
    from tqdm import tqdm

    began = time.perf_counter()
    scene = _scene(params, waymo.read_segment(params.waymo_path, source.folder, source.name,
                                              waymo.CameraName[params.waymo_camera]))
    frames = scene.read_images()
    with tqdm(total=params.iterations, desc=f"reconstruct {scene.name}", unit="it", leave=False) as bar:
        reconstruction, info = reconstruct(scene, frames, params, device, lambda *_: bar.update(1))
    edited, outcome = insert_best_actor(reconstruction, scene, frames, params, generate, estimate)
    metadata = {"segment": scene.name, "split": source.split, "sh_degree": params.sh_degree,
                "frames": scene.frames, "width": scene.width, "height": scene.height,
                "actors": [actor.object_id for actor in scene.actors],
                "reinsert": {k: v for k, v in outcome.items() if k != "discarded"}}
    gs.save_gaussians(build / "gaussians" / f"{scene.name}.safetensors", edited, metadata)
    with tqdm(total=scene.frames, desc=f"render {scene.name}", unit="frame", leave=False) as bar:
        renders = drive.render({k: v.to(device) for k, v in edited.items()}, scene, params.sh_degree, bar.update)
    region = (drive.box_silhouettes(scene, scene.actors[outcome["index"]]) if outcome["reinserted"]
              else np.zeros(frames.shape[:3], bool))
    # The reconstruction itself, on its training frames and the frames midway between them (held out).
    train_ids = info["train_frames"]
    heldout_ids = np.setdiff1d(np.minimum(train_ids + params.every // 2, scene.frames - 1), train_ids)
    shown = np.concatenate([train_ids, heldout_ids])
    before = (drive.render({k: v.to(device) for k, v in reconstruction.items()}, scene, params.sh_degree,
                           indices=shown.tolist()) if outcome["reinserted"] else renders[shown])
    psnr = measure.psnr(before, frames[shown], per_frame=True)
    sampled = region[shown].any()
    measures = {
        "split": source.split, "fps": source.fps, "actors": len(scene.actors),
        "fitted_actors": int(len(np.unique(drive.actor_ids(reconstruction)[drive.actor_ids(reconstruction) >= 0]))),
        "train_views": len(train_ids), "num_gaussians": len(reconstruction["means"]),
        "actor_gaussians": int((drive.actor_ids(reconstruction) >= 0).sum()),
        "reconstruction_train_psnr": round(float(psnr[:len(train_ids)].mean()), 4),
        "reconstruction_heldout_psnr": round(float(psnr[len(train_ids):].mean()), 4) if len(heldout_ids) else None,
        "reinserted": outcome["reinserted"], "actor": outcome["actor"],
        **{key: outcome[key] for key in ("yaw_error_deg", "confidence", "removed_gaussians", "asset_gaussians")
           if key in outcome},
        "discarded_assets": len(outcome["discarded"]),
        "discarded": outcome["discarded"],  # per asset: actor, yaw error, confidence, views, why
        "psnr": round(float(measure.psnr(renders, frames, per_frame=True).mean()), 4),
        # over the reinserted actor's projected box: every frame (the pairs' inputs), and on the sampled
        # frames before and after the edit (the reconstruction's own actor against the asset)
        "object_psnr": round(measure.psnr(renders, frames, region=region), 4) if region.any() else None,
        "object_psnr_sampled": (round(measure.psnr(renders[shown], frames[shown], region=region[shown]), 4)
                                if sampled else None),
        "reconstruction_object_psnr_sampled": (round(measure.psnr(before, frames[shown], region=region[shown]), 4)
                                               if sampled else None),
        "seconds": round(time.perf_counter() - began, 2),
    }
    log.info("%s: %s", scene.name, measures)
    return renders, frames, region, measures, info["history"]


def plot_samples(samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path,
                 columns: int = 5) -> Path:
    """Insertion / ground truth at frames where the reinserted actor is in view, for each sample segment."""
    rows = {name: (renders, truth, np.flatnonzero(region.reshape(len(region), -1).any(axis=1))
                   if region.any() else np.arange(len(renders)))
            for name, (renders, truth, region) in samples.items()}
    return gs.plot_frame_pairs(rows, ("insertion", "ground truth"), path, columns)


def _mean(values: list) -> float | None:
    """The mean of the values that are not None (None if none is)."""
    kept = [value for value in values if value is not None]
    return round(float(np.mean(kept)), 4) if kept else None


def run(params: Params, out_dir: str | Path, metrics_path: str | Path, plots_dir: str | Path) -> dict:
    """Reconstruct and edit every segment; write the pairs, the edited Gaussians, metrics and plots.

    Returns:
        ``{"metrics": {...}, "videos": [paths], "figures": [paths]}``.
    """
    out_dir, metrics_path, plots_dir = map(Path, (out_dir, metrics_path, plots_dir))
    sources = check_inputs(params)
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("reinsert.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'.")
    device = torch.device("cuda" if params.device != "cpu" and torch.cuda.is_available() else "cpu")
    generate, estimate = few_view_asset(params, device), drive.heading
    names = [s.name for s in sources]
    firsts = [next((s.name for s in sources if s.split == part), None) for part in ("train", "test")]
    samples = list(dict.fromkeys([n for n in firsts if n] + names))[:params.sample_videos]
    fps = float(np.median([source.fps for source in sources]))  # the pairs' rate: the cameras' (10 Hz)
    started = time.perf_counter()
    with video.staged_outputs(out_dir, plots_dir) as (build, plots_build):
        measures, videos, shown, histories = {}, [], {}, {}
        with pairs.PairsWriter(build / TASK, TASK, fps=fps) as writer:
            for source in sources:
                name = source.name
                renders, frames, region, measures[name], histories[name] = edit_segment(
                    source, build, params, generate, estimate, device)
                writer.add(name, source.split, renders, frames)
                if name in samples:
                    videos.append(video.write_video(plots_build / "videos" / f"{name}.mp4",
                                                    np.concatenate([renders, frames], axis=2), fps=fps))
                    shown[name] = (renders, frames, region)
            writer.commit()
        figures = [gs.plot_training(histories, plots_build / "training.png")]
        if shown:
            figures.append(plot_samples(shown, plots_build / "frames.png"))
    videos = [plots_dir / path.relative_to(plots_build) for path in videos]
    figures = [plots_dir / path.relative_to(plots_build) for path in figures]
    metrics = {
        "reinserted_segments": sum(m["reinserted"] for m in measures.values()),
        "discarded_assets": sum(m["discarded_assets"] for m in measures.values()),
        "reconstruction_heldout_psnr": _mean([m["reconstruction_heldout_psnr"] for m in measures.values()]),
        "psnr": round(float(np.mean([m["psnr"] for m in measures.values()])), 4),
        "object_psnr": _mean([m["object_psnr"] for m in measures.values()]),
        "num_segments": len(measures), "fps": fps,
        "seconds": round(time.perf_counter() - started, 2),
        "segments": measures,
    }
    video.write_json(metrics_path, metrics)
    return {"metrics": metrics, "videos": videos, "figures": figures}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--out", required=True, help="output folder: driving/ pairs and gaussians/")
    parser.add_argument("--metrics", required=True, help="metrics JSON file")
    parser.add_argument("--plots", required=True, help="folder for sample videos and figures")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        result = run(params, args.out, args.metrics, args.plots)
        tracker.log_metrics(gs.numeric_metrics(result["metrics"]))
        for path in result["videos"]:
            tracker.log_video(path)
        for path in result["figures"]:
            tracker.log_figure(path)
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

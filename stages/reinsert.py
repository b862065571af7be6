"""Stage ``reinsert``: naive asset insertion renders against ground truth (the driving task's pairs).

Paper section 4.4 and supplement B.4: Waymo scenes are reconstructed with SplatAD, a vehicle's Gaussians
are removed and a generated, lower-fidelity 3D asset (TRELLIS, from a few object-centric views) is put
back at the original pose after estimating its heading (Orient-Anything; assets with an inconsistent or
unconfident orientation are discarded and the original scene is kept). The renders of the edited scene,
with the artifacts of a naive insertion, are the inputs a video model learns to harmonise; the captured
frames are the targets. Each component is replaced here by one that runs on a CPU in seconds, behind
the interface the real one would plug into:

=================  =======================================  ===========================================
paper              here                                      interface (this module)
=================  =======================================  ===========================================
SplatAD scene      the ``splat`` stage's 3DGS of the scene   ``load_scene_gaussians(path) -> Gaussians``
                   (static: our objects do not move)         (dict of means/quats/scales/opacities/SH)
actor boxes        labelled 3D boxes of ``objects.json``     ``scenes.ObjectBox`` (centre, size, yaw)
TRELLIS asset      a few-view gsplat fit of the object's     ``AssetGenerator(views: AssetViews, box)
                   masked frames: ``asset_views`` views,       -> Gaussians`` (any frame; world here)
                   ``asset_iterations`` iterations, no densification
Orient-Anything    PCA of the asset Gaussians' centres on    ``OrientationEstimator(Gaussians)
                   the ground plane (opacity-weighted)         -> (yaw, confidence)``
=================  =======================================  ===========================================

Orientation check: the estimated heading of the asset's long horizontal axis (defined modulo 180
degrees, as any symmetric box's) must be within ``max_yaw_error_deg`` of the labelled box's, with a
confidence (horizontal anisotropy ``(l1 - l2) / (l1 + l2)`` of the centres' covariance) of at least
``min_confidence``. Accepted assets are turned by the residual yaw about their centroid and moved to the
box centre; objects are tried from most to least visible, and a scene whose assets are all discarded
keeps its original Gaussians, as in the paper. Removal takes every Gaussian whose centre is in the box
grown by ``box_margin``.

Outputs: ``<out>/driving/`` pairs folder (``input`` = renders of the edited scene, ``target`` = ground
truth), ``<out>/gaussians/<scene>.safetensors`` (the edited scenes), ``--metrics``, ``--plots``.

    python -m stages.reinsert --params params.yaml --scenes data/scenes --splat data/splat/gaussians \
        --out data/reinsert --metrics metrics/reinsert.json --plots plots/reinsert
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

from stages.common import cli, measure, pairs, scenes, video
from stages.common import splat as gs

log = logging.getLogger("stages.reinsert")

STAGE = "reinsert"
TASK = "driving"
FPS = 24
Gaussians = dict[str, torch.Tensor]  # the GAUSSIAN_KEYS of stages.common.splat


@dataclass(frozen=True)
class Params:
    box_margin: float  # metres around the labelled box inside which Gaussian centres count as the object's
    min_visible_pixels: int  # a frame shows an object when its mask covers at least this many pixels
    asset_views: int  # views the asset is reconstructed from (the paper's TRELLIS: a few object crops)
    asset_iterations: int  # optimiser updates of the asset (low fidelity on purpose)
    asset_points: int  # random initial Gaussians in the box
    asset_lr_scale: float  # gsplat's learning rates times this (the asset's schedule is ~300x shorter)
    asset_alpha_weight: float  # weight of the silhouette (rendered alpha vs mask) L1 term
    max_yaw_error_deg: float  # discard assets whose estimated heading is further from the box's
    min_confidence: float  # ... or whose orientation confidence (horizontal anisotropy) is lower
    scene_dir: str | None  # must match splat.scene_dir: the scenes the Gaussians were made from
    image_dir: str | None  # must match splat.image_dir
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA (gsplat.rasterization) when available
    sample_videos: int  # scenes whose insertion | ground-truth video is logged
    seed: int  # asset initialisation and view order
    threads: int  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        for name in ("asset_views", "asset_iterations", "asset_points"):
            if getattr(self, name) < 1:
                raise ValueError(f"reinsert.{name} must be >= 1, got {getattr(self, name)}")
        if self.asset_points < 4:
            raise ValueError(f"reinsert.asset_points must be >= 4 (3 neighbours each), got {self.asset_points}")
        if self.box_margin < 0 or self.min_visible_pixels < 1:
            raise ValueError("reinsert.box_margin must be >= 0 and reinsert.min_visible_pixels >= 1")
        if not (self.asset_lr_scale > 0 and self.asset_alpha_weight >= 0):
            raise ValueError("reinsert.asset_lr_scale must be > 0 and reinsert.asset_alpha_weight >= 0")
        if not 0 <= self.max_yaw_error_deg <= 90:
            raise ValueError(f"reinsert.max_yaw_error_deg must be in [0, 90] (headings are compared modulo "
                             f"180 degrees), got {self.max_yaw_error_deg}")
        if not 0 <= self.min_confidence <= 1:
            raise ValueError(f"reinsert.min_confidence must be in [0, 1], got {self.min_confidence}")
        if self.sample_videos < 0 or self.threads < 0 or self.seed < 0:
            raise ValueError("reinsert.sample_videos, reinsert.threads and reinsert.seed must be >= 0")


@dataclass(eq=False)
class AssetViews:
    """What an asset generator sees: a few masked views of one object."""

    images: torch.Tensor  # [V, H, W, 3] in [0, 1], background black
    masks: torch.Tensor  # [V, H, W] in {0, 1}
    viewmats: torch.Tensor  # [V, 4, 4] OpenCV world-to-camera
    Ks: torch.Tensor  # [V, 3, 3]
    frames: list[int]  # which frames of the video


AssetGenerator = Callable[[AssetViews, scenes.ObjectBox], Gaussians]
OrientationEstimator = Callable[[Gaussians], tuple[float, float]]


# ----------------------------------------------------------------------------------------------------------
# The components (replaceable; see the table in the module docstring)


def load_scene_gaussians(path: str | Path) -> tuple[Gaussians, dict]:
    """The reconstructed scene (SplatAD's place): the splat stage's Gaussians and their metadata."""
    return gs.load_gaussians(path)


def asset_views(scene: scenes.Scene, frames: np.ndarray, masks: np.ndarray, box: scenes.ObjectBox,
                count: int, min_pixels: int) -> AssetViews | None:
    """``count`` frames spread over those where the object covers ``min_pixels``; None if too few."""
    visible = np.flatnonzero((masks == box.label).reshape(len(masks), -1).sum(axis=1) >= min_pixels)
    if len(visible) < count:
        return None
    picks = visible[np.linspace(0, len(visible) - 1, count).round().astype(int)]
    silhouettes = torch.from_numpy(masks[picks] == box.label).float()  # [V, H, W]
    viewmats = gs.viewmats_from_camtoworlds(scene.camtoworlds[picks])
    Ks = torch.as_tensor(scene.intrinsics, dtype=torch.float32).expand(count, 3, 3)
    images = torch.from_numpy(frames[picks]).float().div(255) * silhouettes[..., None]
    return AssetViews(images, silhouettes, viewmats, Ks, picks.tolist())


def few_view_asset(params: Params, device: torch.device) -> AssetGenerator:
    """TRELLIS's stand-in: Gaussians fitted to a few masked views, random in the box, no densification."""

    def generate(views: AssetViews, box: scenes.ObjectBox) -> Gaussians:
        generator = torch.Generator().manual_seed(params.seed + box.label)
        local = (torch.rand(params.asset_points, 3, generator=generator) - 0.5) * torch.tensor(box.size)
        points = local @ torch.from_numpy(box.rotation).float().T + torch.tensor(box.center, dtype=torch.float32)
        rgb = torch.rand(params.asset_points, 3, generator=generator)
        init = gs.init_gaussians(points, rgb, sh_degree=0, generator=generator)
        scale = params.asset_lr_scale
        config = gs.TrainConfig(
            iterations=params.asset_iterations, sh_degree=0, means_lr=1.6e-4 * scale, scales_lr=5e-3 * scale,
            quats_lr=1e-3 * scale, opacities_lr=5e-2 * min(scale, 2.0), sh0_lr=2.5e-3 * scale,
            refine_start_iter=params.asset_iterations + 1, refine_stop_iter=params.asset_iterations + 1,
            alpha_weight=params.asset_alpha_weight, seed=params.seed)
        extent = float(np.linalg.norm(box.size))  # lengths relative to the object, not the scene
        asset, _ = gs.train({k: v.to(device) for k, v in init.items()}, views.images.to(device),
                            views.viewmats.to(device), views.Ks.to(device), config, extent,
                            target_alphas=views.masks.to(device))
        return {k: v.cpu() for k, v in asset.items()}

    return generate


def pca_yaw(gaussians: Gaussians) -> tuple[float, float]:
    """Orient-Anything's stand-in: heading of the long horizontal axis of the opacity-weighted centres.

    Returns:
        ``(yaw, confidence)``: yaw in radians in [0, pi) (an axis, so modulo 180 degrees), in the
        convention of ``ObjectBox.yaw`` (its local +x is world ``(cos yaw, 0, -sin yaw)``); confidence
        ``(l1 - l2) / (l1 + l2)`` from the eigenvalues of the horizontal covariance (0: round, 1: a line).
    """
    weights = torch.sigmoid(gaussians["opacities"]).double()
    ground = gaussians["means"][:, [0, 2]].double()  # [N, 2] (x, z)
    centre = (weights[:, None] * ground).sum(0) / weights.sum()
    spread = ground - centre
    covariance = (weights[:, None, None] * spread[:, :, None] * spread[:, None, :]).sum(0) / weights.sum()
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    axis_x, axis_z = vectors[:, 1].tolist()
    confidence = float((values[1] - values[0]) / (values[1] + values[0]).clamp_min(1e-12))
    return math.atan2(-axis_z, axis_x) % math.pi, confidence


def box_axis_yaw(box: scenes.ObjectBox) -> float:
    """The heading of the box's long horizontal axis, in [0, pi): its yaw, or yaw - 90 degrees if z is longer."""
    return (box.yaw if box.size[0] >= box.size[2] else box.yaw - math.pi / 2) % math.pi


def axis_difference(target: float, estimate: float) -> float:
    """``target - estimate`` for axes (modulo pi), in [-pi/2, pi/2)."""
    return (target - estimate + math.pi / 2) % math.pi - math.pi / 2


# ----------------------------------------------------------------------------------------------------------
# Removal and reinsertion


def remove_object(scene: Gaussians, box: scenes.ObjectBox, margin: float) -> tuple[Gaussians, torch.Tensor]:
    """The scene without the Gaussians whose centres are in the (grown) box, and the removed ids."""
    inside = gs.in_box(scene["means"], box.center, box.size, box.yaw, margin)
    return gs.select(scene, ~inside), torch.nonzero(inside).squeeze(1)


def reinsert(scene: Gaussians, box: scenes.ObjectBox, asset: Gaussians, asset_yaw: float,
             margin: float) -> tuple[Gaussians, torch.Tensor, torch.Tensor]:
    """Remove the object's Gaussians and put ``asset`` (heading ``asset_yaw``) at the box's pose.

    Returns:
        ``(edited scene, removed ids in the input scene, the asset's ids in the edited scene)``; the kept
        Gaussians come first, in their original order.
    """
    kept, removed = remove_object(scene, box, margin)
    weights = torch.sigmoid(asset["opacities"])[:, None]
    pivot = ((weights * asset["means"]).sum(0) / weights.sum()).tolist()
    placed = gs.turn_about_y(asset, axis_difference(box_axis_yaw(box), asset_yaw), pivot, box.center)
    edited, asset_ids = gs.concat(kept, placed)
    return edited, removed, asset_ids


def insert_best_object(scene_gaussians: Gaussians, scene: scenes.Scene, frames: np.ndarray, masks: np.ndarray,
                       params: Params, generate: AssetGenerator,
                       estimate: OrientationEstimator) -> tuple[Gaussians, dict]:
    """Try the objects from most to least visible until an asset passes the orientation check."""
    visibility = {box.label: int((masks == box.label).sum()) for box in scene.objects}
    attempts = []
    for box in sorted(scene.objects, key=lambda b: -visibility[b.label]):
        views = asset_views(scene, frames, masks, box, params.asset_views, params.min_visible_pixels)
        if views is None:
            attempts.append({"object": box.name, "reason": "too few views"})
            continue
        asset = generate(views, box)
        yaw, confidence = estimate(asset)
        error = math.degrees(abs(axis_difference(box_axis_yaw(box), yaw)))
        attempt = {"object": box.name, "yaw_error_deg": round(error, 3), "confidence": round(confidence, 4),
                   "asset_views": views.frames}
        if error > params.max_yaw_error_deg or confidence < params.min_confidence:
            attempts.append({**attempt, "reason": "inconsistent orientation"})
            continue
        edited, removed, asset_ids = reinsert(scene_gaussians, box, asset, yaw, params.box_margin)
        return edited, {"reinserted": True, "object": box.name, "label": box.label, **attempt,
                        "removed_gaussians": len(removed), "asset_gaussians": len(asset_ids),
                        "discarded": attempts}
    return scene_gaussians, {"reinserted": False, "object": None, "label": None, "discarded": attempts}


# ----------------------------------------------------------------------------------------------------------
# The stage


def check_inputs(entries: list[gs.SceneEntry], splat_dir: Path, params: Params) -> dict[str, scenes.Scene]:
    """Every scene has labelled boxes, masks and the splat stage's Gaussians; errors before any work."""
    loaded = {}
    for entry in entries:
        scene = scenes.load_scene(entry.folder, image_dir=params.image_dir, load_images=False)
        if not scene.objects:
            raise ValueError(f"scene {entry.name} lists no objects ({entry.folder / 'objects.json'} is missing or "
                             "has an empty object list): the reinsert stage needs labelled 3D boxes to remove "
                             "and reinsert; give the scene an objects.json, or leave it out of the set.")
        if scene.mask_paths is None:
            raise ValueError(f"scene {entry.name} has no masks/ folder: the asset is reconstructed from the "
                             "object's masked frames; add per-frame label masks.")
        path = splat_dir / f"{entry.name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run the splat stage on the same scenes first "
                                    "(reinsert.scene_dir must match splat.scene_dir).")
        _, metadata = gs.load_gaussians(path)
        if (metadata.get("width"), metadata.get("height")) != (scene.width, scene.height):
            raise ValueError(f"{path} was made from {metadata.get('width')}x{metadata.get('height')} frames, "
                             f"scene {entry.name} has {scene.width}x{scene.height}: reinsert.image_dir must "
                             "match splat.image_dir.")
        loaded[entry.name] = scene
    return loaded


def plot_samples(samples: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], path: Path,
                 columns: int = 5) -> Path:
    """Insertion / ground truth at frames where the object is in view, for each sample scene."""
    rows = {name: (renders, truth, np.flatnonzero(region.reshape(len(region), -1).any(axis=1)))
            for name, (renders, truth, region) in samples.items()}
    return gs.plot_frame_pairs(rows, ("insertion", "ground truth"), path, columns)


def edit_scene(entry: gs.SceneEntry, scene: scenes.Scene, splat_dir: Path, build: Path, params: Params,
               generate: AssetGenerator, estimate: OrientationEstimator, device: torch.device):
    """One scene: reinsert an object, save the edited Gaussians, render the path; (renders, frames,
    object region [T, H, W], measures)."""
    began = time.perf_counter()
    frames, masks = scene.read_images(), scene.read_masks()
    scene_gaussians, metadata = load_scene_gaussians(splat_dir / f"{entry.name}.safetensors")
    edited, info = insert_best_object(scene_gaussians, scene, frames, masks, params, generate, estimate)
    gs.save_gaussians(build / "gaussians" / f"{entry.name}.safetensors", edited,
                      {**metadata, "reinsert": {k: v for k, v in info.items() if k != "discarded"}})
    viewmats = gs.viewmats_from_camtoworlds(scene.camtoworlds)
    Ks = torch.as_tensor(scene.intrinsics, dtype=torch.float32).expand(len(viewmats), 3, 3)
    renders = gs.render_frames({k: v.to(device) for k, v in edited.items()}, viewmats, Ks, scene.width,
                               scene.height, int(metadata.get("sh_degree", 3)))
    region = masks == info["label"] if info["reinserted"] else np.zeros(masks.shape, bool)
    measures = {
        "split": entry.split, "reinserted": info["reinserted"], "object": info["object"],
        **{key: info[key] for key in ("yaw_error_deg", "confidence", "removed_gaussians", "asset_gaussians")
           if key in info},
        "discarded_assets": len(info["discarded"]),
        "psnr": round(float(measure.psnr(renders, frames, per_frame=True).mean()), 4),  # per-frame, as splat's
        "object_psnr": round(measure.psnr(renders, frames, region=region), 4) if region.any() else None,
        "seconds": round(time.perf_counter() - began, 2),
    }
    log.info("%s: %s", entry.name, measures)
    return renders, frames, region, measures


def run(params: Params, scenes_dir: str | Path, splat_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plots_dir: str | Path) -> dict:
    """Edit and render every scene; write the pairs, the edited Gaussians, metrics and plots.

    Returns:
        ``{"metrics": {...}, "videos": [paths], "figures": [paths]}``.
    """
    from tqdm import tqdm

    splat_dir, out_dir, metrics_path, plots_dir = map(Path, (splat_dir, out_dir, metrics_path, plots_dir))
    entries = gs.scene_entries(Path(params.scene_dir) if params.scene_dir is not None else Path(scenes_dir))
    loaded = check_inputs(entries, splat_dir, params)
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("reinsert.device is 'cuda' but torch sees no CUDA device; use 'auto' or 'cpu'.")
    device = torch.device("cuda" if params.device != "cpu" and torch.cuda.is_available() else "cpu")
    generate, estimate = few_view_asset(params, device), pca_yaw
    firsts = [next((e.name for e in entries if e.split == part), None) for part in ("train", "test")]
    samples = list(dict.fromkeys([n for n in firsts if n] + [e.name for e in entries]))[:params.sample_videos]
    started = time.perf_counter()
    with video.staged_outputs(out_dir) as (build,):
        measures, videos, shown = {}, [], {}
        with pairs.PairsWriter(build / TASK, TASK, fps=FPS) as writer:
            for entry in tqdm(entries, desc="reinsert", unit="scene"):
                renders, frames, region, measures[entry.name] = edit_scene(
                    entry, loaded[entry.name], splat_dir, build, params, generate, estimate, device)
                writer.add(entry.name, entry.split, renders, frames)
                if entry.name in samples:
                    videos.append(video.write_video(plots_dir / "videos" / f"{entry.name}.mp4",
                                                    np.concatenate([renders, frames], axis=2), fps=FPS))
                    shown[entry.name] = (renders, frames, region)
            writer.commit()
        plots_dir.mkdir(parents=True, exist_ok=True)
        figures = [plot_samples(shown, plots_dir / "frames.png")] if shown else []
    object_psnr = [m["object_psnr"] for m in measures.values() if m["object_psnr"] is not None]
    metrics = {
        "reinserted_scenes": sum(m["reinserted"] for m in measures.values()),
        "discarded_assets": sum(m["discarded_assets"] for m in measures.values()),
        "psnr": round(float(np.mean([m["psnr"] for m in measures.values()])), 4),
        "object_psnr": round(float(np.mean(object_psnr)), 4) if object_psnr else None,
        "num_scenes": len(measures),
        "seconds": round(time.perf_counter() - started, 2),
        "scenes": measures,
    }
    video.write_json(metrics_path, metrics)
    return {"metrics": metrics, "videos": videos, "figures": figures}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--scenes", required=True, help="scene set folder (with split.json)")
    parser.add_argument("--splat", required=True, help="the splat stage's Gaussians folder")
    parser.add_argument("--out", required=True, help="output folder: driving/ pairs and gaussians/")
    parser.add_argument("--metrics", required=True, help="metrics JSON file")
    parser.add_argument("--plots", required=True, help="folder for sample videos and figures")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        result = run(params, args.scenes, args.splat, args.out, args.metrics, args.plots)
        tracker.log_metrics(gs.numeric_metrics(result["metrics"]))
        for path in result["videos"]:
            tracker.log_video(path)
        for path in result["figures"]:
            tracker.log_figure(path)
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

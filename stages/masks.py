"""Stage ``masks``: (masked video, ground truth) pairs for video inpainting (paper section 4.3, supplement B.3).

Four pairs folders, one per mask source and video source, (:mod:`stages.common.pairs`) under ``--out``:

- ``inpaint_box``: a fixed central box of half the height and half the width in every frame of every
  scene of ``--scenes`` (nerfstudio / DL3DV folders), the paper's DL3DV inpainting task (B.3: "a fixed
  rectangular mask having half the height and half the width of the video"), with no prompt (the
  paper uses one fixed caption).
- ``inpaint_objects`` (only when ``waymo_path`` is set): the paper's Waymo-Bbox task, read from Waymo
  Open Dataset v2 segments (:mod:`stages.common.waymo`): a seeded random half (``object_fraction``,
  at least one) of the vehicles that one camera's boxes show, each masked by its camera box in every
  frame it appears in, grown by ``dilation`` pixels.
- ``inpaint_box_waymo`` (with ``inpaint_objects``): the central box on the same segments, the paper's
  Waymo box inpainting (Table 3's Waymo rows; task ``inpaint_box``).
- ``inpaint_rovi`` (only when ``rovi_path`` is set): dataset-provided per-object masks with a text
  prompt, read from a folder in the ROVI / Refer-YouTube-VOS layout (:mod:`stages.common.rovi`).

The input is the ground truth with the masked pixels set to the constant grey ``fill`` (the paper
does not state its fill value; grey is 0 in the decoder's [-1, 1] range, the neutral value); the
mask video is 255 where the model must fill in. Everything is built under temporary names and
swapped in at the end: a failed run leaves the previous output, or nothing.

    python -m stages.masks --params params.yaml --scenes data/scenes --out data/masks \
        --metrics metrics/masks.json --plots plots/masks
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from stages.common import cli, pairs, rovi, scenes, video, waymo

log = logging.getLogger("stages.masks")

STAGE = "masks"
FPS = 24  # the pairs' playback rate (docs/interfaces.md), and the sample videos'


class MaskError(ValueError):
    """Input data that cannot be masked as asked (no objects, no label masks, a malformed ROVI folder)."""


@dataclass(frozen=True)
class Params:
    fill: int  # grey level (0..255) of the masked pixels in the input video; 127 ~ 0 in [-1, 1]
    object_fraction: float  # share of each segment's labelled vehicles masked (Waymo-Bbox: 0.5), at least one
    dilation: int  # pixels each object mask grows by (square), so object edges do not leak through
    seed: int  # the vehicle choice of segment s is drawn from (seed, crc32(s))
    scene_dir: str | None  # a real DL3DV / nerfstudio set (split.json) for inpaint_box; null: the --scenes set
    image_dir: str | None  # read its frames from this folder of each scene (DL3DV's images_4); null: the listed
    waymo_path: str | None  # a Waymo Open Dataset v2 folder (<split>/<component>/<segment>.parquet), or null
    waymo_camera: str  # the camera filmed from: FRONT, FRONT_LEFT, FRONT_RIGHT, SIDE_LEFT or SIDE_RIGHT
    waymo_train_split: str  # its split folder of the training pairs (the release's: training)
    waymo_test_split: str  # ... and of the test pairs (the release's: validation)
    waymo_train_segments: str | None  # a text file of context names (the paper's 230), or null: the whole split
    waymo_test_segments: str | None  # ... the test segments (the paper's 70)
    waymo_frames: int  # first frames of each segment kept (0: all)
    rovi_path: str | None  # a ROVI-layout folder (train.json/test.json, JPEGImages/, Annotations/), or null
    rovi_frames: int  # first frames of each ROVI video kept (0: all)
    rovi_size: tuple[int, int] | None  # resize ROVI frames to [height, width] (null: as stored)

    def __post_init__(self):
        if not 0 <= self.fill <= 255:
            raise ValueError(f"masks.fill must be a grey level in [0, 255], got {self.fill}")
        if not 0 < self.object_fraction <= 1:
            raise ValueError(f"masks.object_fraction must be in (0, 1] (0.5: half the objects), "
                             f"got {self.object_fraction}")
        if self.dilation < 0:
            raise ValueError(f"masks.dilation must be >= 0 pixels, got {self.dilation}")
        if self.seed < 0:
            raise ValueError(f"masks.seed must be >= 0, got {self.seed}")
        if self.scene_dir is not None and not Path(self.scene_dir).is_dir():
            raise ValueError(f"masks.scene_dir: {self.scene_dir} is not a folder; point it at a DL3DV / nerfstudio "
                             "scene set (scene folders and split.json), or null for the --scenes set")
        cameras = [c.name for c in waymo.CameraName if c != waymo.CameraName.UNKNOWN]
        if self.waymo_camera not in cameras:
            raise ValueError(f"masks.waymo_camera must be one of {', '.join(cameras)}, got {self.waymo_camera!r}")
        if self.waymo_frames < 0:
            raise ValueError(f"masks.waymo_frames must be >= 0 (0: every frame), got {self.waymo_frames}")
        if self.rovi_frames < 0:
            raise ValueError(f"masks.rovi_frames must be >= 0 (0: every frame), got {self.rovi_frames}")
        if self.rovi_size is not None and min(self.rovi_size) < 8:
            raise ValueError(f"masks.rovi_size must be [height, width] of at least 8 pixels each, or null, "
                             f"got {list(self.rovi_size)}")


# ----------------------------------------------------------------------------------------------------------
# Mask geometry (boolean masks, True = to fill)


def box_mask(frames: int, height: int, width: int) -> np.ndarray:  # -> [T, H, W] bool
    """The central box of ``height // 2`` rows and ``width // 2`` columns, in every frame."""
    rows, cols = height // 2, width // 2
    top, left = (height - rows) // 2, (width - cols) // 2
    mask = np.zeros((frames, height, width), bool)
    mask[:, top:top + rows, left:left + cols] = True
    return mask


def scene_rng(seed: int, scene: str) -> np.random.Generator:
    """A generator that depends only on the seed and the scene's name (not on the other scenes)."""
    return np.random.default_rng([seed, zlib.crc32(scene.encode())])


def choose_objects(ids: list, fraction: float, rng: np.random.Generator) -> list:
    """A random ``round(fraction * len(ids))`` of ``ids`` (at least one), sorted."""
    if not ids:
        raise MaskError("choose_objects: no labelled objects to choose from.")
    count = max(1, int(np.floor(fraction * len(ids) + 0.5)))
    chosen = rng.choice(len(ids), size=count, replace=False)
    return sorted(sorted(ids)[int(i)] for i in chosen)


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:  # [T, H, W] bool -> [T, H, W] bool
    """Grow each frame's mask by ``pixels`` in every direction (a (2p+1)-square structuring element)."""
    if pixels == 0:
        return mask.copy()
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return np.stack([cv2.dilate(frame.view(np.uint8), kernel) > 0 for frame in mask])


def box_pixels(center: tuple[float, float], size: tuple[float, float], height: int, width: int
               ) -> tuple[slice, slice]:
    """The pixels a 2D box covers (rows, columns), clipped to the frame: Waymo's camera boxes are in pixel
    units with pixel ``i`` spanning ``[i, i + 1)``; every pixel the box overlaps is taken."""
    (u, v), (w, h) = center, size
    left, right = int(np.floor(u - w / 2)), int(np.ceil(u + w / 2))
    top, bottom = int(np.floor(v - h / 2)), int(np.ceil(v + h / 2))
    return slice(max(top, 0), max(min(bottom, height), 0)), slice(max(left, 0), max(min(right, width), 0))


def vehicle_ids(segment: waymo.Segment, frames: int) -> list[str]:
    """The camera object ids of the vehicles this camera's boxes show in the first ``frames`` frames, sorted."""
    return sorted({box.object_id for boxes in segment.boxes_2d[:frames] for box in boxes
                   if box.type == waymo.BoxType.TYPE_VEHICLE})


def waymo_bbox_mask(segment: waymo.Segment, chosen: list[str], frames: int, dilation: int) -> np.ndarray:
    """Waymo-Bbox: in each of the first ``frames`` frames, the camera boxes of the ``chosen`` objects, grown by
    ``dilation`` pixels; returns ``[frames, H, W]`` bool (a frame where none of them is seen is empty)."""
    height, width = segment.camera.height, segment.camera.width
    mask = np.zeros((frames, height, width), bool)
    for t, boxes in enumerate(segment.boxes_2d[:frames]):
        for box in boxes:
            if box.object_id in chosen:
                mask[(t, *box_pixels(box.center, box.size, height, width))] = True
    return dilate(mask, dilation)


def apply_mask(frames: np.ndarray, mask: np.ndarray, fill: int) -> np.ndarray:  # [T, H, W, 3], [T, H, W]
    """``frames`` with the masked pixels set to the grey level ``fill``."""
    masked = frames.copy()
    masked[mask] = fill
    return masked


def as_mask_frames(mask: np.ndarray) -> np.ndarray:  # [T, H, W] bool -> [T, H, W] uint8
    return np.where(mask, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# The stage


def _check_scenes(scenes_dir: Path, image_dir: str | None = None) -> list[tuple[str, str, scenes.Scene]]:
    """(name, split, scene) for every train, test and validation scene of the set (DL3DV-Benchmark's ``<scene>/nerfstudio/``
    too), layouts checked; nothing decoded."""
    split = scenes.load_split(scenes_dir)
    return [(name, split_name, scenes.load_scene(scenes.scene_root(scenes_dir / name), image_dir, load_images=False))
            for split_name in pairs.SPLITS for name in split[split_name]]


@dataclass(frozen=True)
class WaymoSource:
    name: str  # the segment's context name: the pair's scene name
    split: str  # the pairs' split: train or test
    folder: str  # the release's split folder it is read from
    frames: int  # frames kept
    vehicles: tuple[str, ...]  # camera object ids of the vehicles seen in those frames
    fps: float  # its camera's frame rate, from the timestamps (the release: 10 Hz)


def _waymo_segments(params: Params) -> list[WaymoSource]:
    """Every segment to mask, each read and checked (components, camera, frames, boxes, a vehicle in view
    somewhere) before any image is decoded or anything written."""
    splits = {"train": (params.waymo_train_split, params.waymo_train_segments),
              "test": (params.waymo_test_split, params.waymo_test_segments)}
    sources = []
    for segment, split, folder, count in waymo.checked_segments(
            params.waymo_path, splits, "masks", waymo.CameraName[params.waymo_camera], params.waymo_frames,
            optional=True, error=MaskError):
        sources.append(WaymoSource(segment.context_name, split, folder, count, tuple(vehicle_ids(segment, count)),
                                   waymo.frame_rate(segment, count)))
    if not any(source.vehicles for source in sources):
        raise MaskError(f"no segment of {params.waymo_path} shows a vehicle box in camera {params.waymo_camera}; "
                        "inpaint_objects (Waymo-Bbox) has nothing to mask.")
    return sources


def _sample(masked: np.ndarray, mask: np.ndarray, target: np.ndarray) -> np.ndarray:  # -> [T, H, 3W, 3]
    """masked | mask | target, side by side."""
    return np.concatenate([masked, np.repeat(as_mask_frames(mask)[..., None], 3, axis=3), target], axis=2)


def _area(fractions: list[float]) -> dict:
    """Statistics of the per-pair mask area fractions."""
    return {"mask_area_fraction": round(float(np.mean(fractions)), 6),
            "mask_area_fraction_min": round(min(fractions), 6),
            "mask_area_fraction_max": round(max(fractions), 6)}


def run(params: Params, scenes_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
        plots_dir: str | Path) -> dict:
    """Write the inpainting pairs folders into ``out_dir`` (replacing it atomically) and measure them.

    Args:
        params: the ``masks:`` section.
        scenes_dir: the scene set (``split.json`` and nerfstudio / DL3DV scene folders): ``inpaint_box``, unless
            ``params.scene_dir`` names another (real DL3DV).
        out_dir: the folder to (re)create, holding one pairs folder per task.
        metrics_path: metrics JSON (mask area fraction per task, vehicles chosen per segment).
        plots_dir: folder (re)created with the sample videos (masked | mask | target).

    Returns:
        ``{"metrics": {...}, "videos": [paths], "chosen": {segment: [camera object ids]}}``.
    """
    scenes_dir, out_dir, plots_dir = Path(scenes_dir), Path(out_dir), Path(plots_dir)
    checked = _check_scenes(Path(params.scene_dir) if params.scene_dir else scenes_dir,  # every input checked first
                            params.image_dir)
    segments = _waymo_segments(params) if params.waymo_path is not None else []
    if params.rovi_path is not None:
        rovi.check_rovi(params.rovi_path)

    with video.staged_outputs(out_dir, plots_dir) as (build, plots_build):
        metrics, chosen, videos, samples = {}, {}, [], {}

        def add(writer: pairs.PairsWriter, name: str, split: str, frames: np.ndarray, mask: np.ndarray,
                areas: list[float], prompt: str | None = None) -> None:
            masked = apply_mask(frames, mask, params.fill)
            writer.add(name, split, masked, frames, mask=as_mask_frames(mask), prompt=prompt)
            areas.append(float(mask.mean()))  # only the area: real sets do not fit in memory
            if split not in samples.setdefault(writer.folder.name, {}):  # per pairs folder: inpaint_box_waymo too
                samples[writer.folder.name][split] = (name, _sample(masked, mask, frames))

        box_areas = []
        with pairs.PairsWriter(build / "inpaint_box", "inpaint_box", FPS) as writer:
            for name, split, scene in tqdm(checked, desc="inpaint_box", unit="scene", disable=None):
                frames = scene.read_images()
                add(writer, name, split, frames, box_mask(*frames.shape[:3]), box_areas)
            writer.commit()
        metrics["inpaint_box"] = {"pairs": len(box_areas), **_area(box_areas)}

        if segments:
            object_areas, box_waymo_areas, skipped = [], [], []
            camera = waymo.CameraName[params.waymo_camera]
            fps = float(np.median([source.fps for source in segments]))  # the pairs' rate: the cameras' (10 Hz)
            with pairs.PairsWriter(build / "inpaint_objects", "inpaint_objects", fps) as writer, \
                    pairs.PairsWriter(build / "inpaint_box_waymo", "inpaint_box", fps) as box_writer:
                for source in tqdm(segments, desc="waymo", unit="segment", disable=None):
                    segment = waymo.read_segment(params.waymo_path, source.folder, source.name, camera)
                    frames = segment.read_images(range(source.frames))
                    add(box_writer, source.name, source.split, frames, box_mask(*frames.shape[:3]), box_waymo_areas)
                    if not source.vehicles:  # a segment without a vehicle in view has nothing to inpaint
                        skipped.append(source.name)
                        log.warning("%s: no vehicle box of camera %s in its first %d frames; left out of "
                                    "inpaint_objects", source.name, params.waymo_camera, source.frames)
                        continue
                    picked = choose_objects(list(source.vehicles), params.object_fraction,
                                            scene_rng(params.seed, source.name))
                    chosen[source.name] = picked
                    add(writer, source.name, source.split, frames,
                        waymo_bbox_mask(segment, picked, source.frames, params.dilation), object_areas)
                writer.commit()
                box_writer.commit()
            metrics["inpaint_objects"] = {
                "pairs": len(object_areas), **_area(object_areas),
                "objects_chosen_mean": round(float(np.mean([len(c) for c in chosen.values()])), 4),
                "segments_without_vehicles": len(skipped), "fps": fps}
            metrics["inpaint_box_waymo"] = {"pairs": len(box_waymo_areas), **_area(box_waymo_areas), "fps": fps}

        if params.rovi_path is not None:
            rovi_areas = []
            with pairs.PairsWriter(build / "inpaint_rovi", "inpaint_rovi", FPS) as writer:
                for clip in rovi.iter_rovi(params.rovi_path, params.rovi_frames, params.rovi_size):
                    add(writer, clip.name, clip.split, clip.frames, clip.mask, rovi_areas, prompt=clip.prompt)
                writer.commit()
            metrics["inpaint_rovi"] = {"pairs": len(rovi_areas), **_area(rovi_areas)}
        for task, by_split in samples.items():
            for split, (name, frames) in sorted(by_split.items()):
                path = video.write_video(plots_build / f"{task}_{name}.mp4", frames, fps=FPS)
                videos.append(plots_dir / path.name)
    video.write_json(metrics_path, metrics)
    return {"metrics": metrics, "videos": videos, "chosen": chosen}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--scenes", required=True, help="scene set folder, e.g. data/scenes")
    parser.add_argument("--out", required=True, help="folder of pairs folders to (re)create, e.g. data/masks")
    parser.add_argument("--metrics", required=True, help="metrics JSON file, e.g. metrics/masks.json")
    parser.add_argument("--plots", required=True, help="folder for the sample videos, e.g. plots/masks")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        started = time.perf_counter()
        result = run(params, args.scenes, args.out, args.metrics, args.plots)
        tracker.log_metrics({**result["metrics"], "seconds": round(time.perf_counter() - started, 2)})
        for path in result["videos"]:
            tracker.log_video(path)
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

"""Stage ``scenes``: the embedded synthetic scene set (DL3DV-like rooms of photo-textured boxes).

Writes ``num_scenes`` scenes in the nerfstudio / DL3DV layout (``transforms.json``, ``images/``,
plus ``masks/`` and ``objects.json``; see :mod:`stages.common.scenes`) and a ``split.json`` whose
last ``num_test_scenes`` scenes are held out; and the same scenes as object-masked videos in ROVI's
layout (``rovi/``: :mod:`stages.common.rovi`), which ``masks`` reads with the reader real ROVI takes;
and each room filmed again along a level drive as a Waymo Open Dataset v2 segment (``waymo/training/``,
``waymo/validation/``: :mod:`stages.common.waymo`), the source of ``masks``' Waymo-Bbox pairs; and,
in DOVE's layouts (:mod:`stages.common.vsr`), the train scenes as training videos (``dove/``: ``videos.txt``
and mp4s) and the test scenes as a VSR test set (``vsr/bicubic/``: ``GT/`` and bicubic ``LQ/``), which
``degrade`` reads. Scene ``i`` depends only on ``(seed, i)``, so adding
scenes leaves the existing ones byte-identical. Sample videos (frames next to their object labels)
and a metrics JSON go to ``--plots`` and ``--metrics``, by default inside the output folder.

The output folder is built under a temporary name next to it and swapped in at the end: a failed
run leaves the previous output (or nothing) in place, never a half-written set.

    python -m stages.scenes --params params.yaml --out data/scenes
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stages.common import cli, rovi, scenes, video, vsr, waymo

log = logging.getLogger("stages.scenes")

STAGE = "scenes"
VIDEO_FPS = 24  # playback speed of the sample videos only
MAX_OBJECTS = 8  # more boxes than this rarely fit apart in the room


@dataclass(frozen=True)
class Params:
    num_scenes: int  # scenes in the set, train and test together
    num_test_scenes: int  # the last ones, held out for evaluation
    frames: int  # frames per scene (the camera path is sampled this many times)
    height: int  # frame height, pixels
    width: int  # frame width, pixels
    seed: int  # scene i is drawn from (seed, i)
    num_objects: int  # labelled boxes per scene
    rovi_frames: int  # frames per video of the ROVI-layout copy in <out>/rovi/ (0: none written)
    rovi_stride: int  # its frames are every rovi_stride-th frame of the scene (YouTube-VOS keeps every fifth)
    waymo_frames: int  # frames per Waymo v2 segment in <out>/waymo/ (a level drive through each room; 0: none)
    dove_frames: int  # frames per training video of the DOVE-layout copy of the train scenes in <out>/dove/ (0: none)
    vsr_frames: int  # frames per video of the VSR test set <out>/vsr/bicubic/ made of the test scenes (0: none)
    vsr_scale: int  # its GT / LQ size ratio (DOVE: 4)

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"scenes.{name} must be an integer, got {value!r}")
        if self.num_scenes < 1:
            raise ValueError(f"scenes.num_scenes must be >= 1, got {self.num_scenes}")
        if not 0 <= self.num_test_scenes < self.num_scenes:
            raise ValueError(f"scenes.num_test_scenes must be in [0, num_scenes) = [0, {self.num_scenes}) "
                             f"so that one scene is left for training, got {self.num_test_scenes}")
        if self.frames < 1:
            raise ValueError(f"scenes.frames must be >= 1, got {self.frames}")
        if not (8 <= self.height <= 4096 and 8 <= self.width <= 4096):
            raise ValueError(f"scenes.height and scenes.width must be in [8, 4096], "
                             f"got {self.height}x{self.width}")
        if self.seed < 0:
            raise ValueError(f"scenes.seed must be >= 0, got {self.seed}")
        if self.rovi_frames < 0 or self.rovi_stride < 1 or (self.rovi_frames - 1) * self.rovi_stride >= self.frames:
            raise ValueError(f"scenes.rovi_frames ({self.rovi_frames}, >= 0) frames every rovi_stride "
                             f"({self.rovi_stride}, >= 1) frames must fit in the {self.frames} frames of a scene")
        if not (0 <= self.dove_frames <= self.frames and 0 <= self.vsr_frames <= self.frames):
            raise ValueError(f"scenes.dove_frames ({self.dove_frames}) and scenes.vsr_frames ({self.vsr_frames}) "
                             f"must be in [0, scenes.frames = {self.frames}] (0: not written)")
        if (self.vsr_frames or self.waymo_frames) and not self.num_test_scenes:
            raise ValueError("scenes.vsr_frames and scenes.waymo_frames make test data from the test scenes: set "
                             "scenes.num_test_scenes >= 1, or set them to 0")
        if self.vsr_scale < 1 or (self.vsr_frames and min(self.height, self.width) < self.vsr_scale):
            raise ValueError(f"scenes.vsr_scale must be >= 1 and at most the frame size, got {self.vsr_scale}")
        if self.waymo_frames < 0:
            raise ValueError(f"scenes.waymo_frames must be >= 0 (0: no Waymo segments), got {self.waymo_frames}")
        if not 0 <= self.num_objects <= MAX_OBJECTS:
            raise ValueError(f"scenes.num_objects must be in [0, {MAX_OBJECTS}], got {self.num_objects}")


def scene_names(params: Params) -> tuple[list[str], list[str]]:
    """Train and test scene names: ``scene_000`` ..., the last ``num_test_scenes`` held out."""
    names = [f"scene_{index:03d}" for index in range(params.num_scenes)]
    cut = params.num_scenes - params.num_test_scenes
    return names[:cut], names[cut:]


def label_colours(labels: np.ndarray) -> np.ndarray:  # [T, H, W] -> [T, H, W, 3] uint8
    """Object labels as colours for the sample videos: 0 black, then a fixed, well-spread palette."""
    palette = np.zeros((256, 3), np.uint8)
    hues = (np.arange(255) * 47) % 180  # OpenCV hue range 0..179; 47 steps apart, so neighbours differ
    hsv = np.stack([hues, np.full(255, 200), np.full(255, 255)], axis=-1).astype(np.uint8)[None]
    palette[1:] = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]
    return palette[labels]


def rovi_videos(build: Path, renders: dict[str, scenes.Render], splits: dict[str, str],
                params: Params) -> list[rovi.RoviVideo]:
    """Each scene as a ROVI video: its first ``rovi_frames`` frames ``rovi_stride`` apart, the object labels
    as ids, and per visible object the expression "the <name>" (``astronaut_box_2``: "the astronaut box 2")."""
    keep = slice(0, params.rovi_frames * params.rovi_stride, params.rovi_stride)
    videos = []
    for name, render in renders.items():
        ids = render.labels[keep]
        visible = set(np.unique(ids).tolist())
        objects = scenes.load_scene(build / name, load_images=False).objects or []
        expressions = {box.label: "the " + box.name.replace("_", " ") for box in objects if box.label in visible}
        if expressions:  # a video whose objects never enter the kept frames has nothing to inpaint
            videos.append(rovi.RoviVideo(name, splits[name], render.images[keep], ids, expressions))
    return videos


VSR_LABEL = "bicubic"  # the embedded VSR test set: <out>/vsr/bicubic/ (GT and LQ = OpenCV bicubic GT / vsr_scale)
WAYMO_SPLITS = {"train": "training", "test": "validation"}  # the release's split folders
WAYMO_START_MICROS = 1_552_440_195_000_000  # the first frame's timestamp; frames are 100 ms apart (10 Hz)
CAMERA_HEIGHT = 1.0  # metres above the floor: the front camera of the embedded segments
ROOM_TO_WAYMO = np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]])  # room (y up) -> Waymo world (z up)
WAYMO_CAMERA_IN_GL = np.array([[0.0, -1, 0], [0, 0, 1], [-1, 0, 0]])  # Waymo camera axes in OpenGL camera axes


def _homogeneous(rotation: np.ndarray, translation=(0.0, 0.0, 0.0)) -> np.ndarray:  # -> [4, 4]
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = rotation, translation
    return matrix


def camera_boxes(labels: np.ndarray, objects: list) -> list[dict[int, tuple]]:  # [T, H, W] -> per frame
    """Per frame, each visible object's tight 2D box over its label pixels: ``label -> ((u, v), (w, h))``
    in Waymo's pixel units (pixel ``i`` spans ``[i, i + 1)``)."""
    out = []
    for frame in labels:
        boxes = {}
        for box in objects:
            rows, cols = np.nonzero(frame == box.label)
            if len(rows):
                u0, u1, v0, v1 = cols.min(), cols.max() + 1, rows.min(), rows.max() + 1
                boxes[box.label] = (((u0 + u1) / 2, (v0 + v1) / 2), (float(u1 - u0), float(v1 - v0)))
        out.append(boxes)
    return out


def waymo_segment(render: scenes.Render, camtoworlds: np.ndarray, intrinsics: np.ndarray, objects: list,
                  camera_height: float = CAMERA_HEIGHT) -> tuple[list[waymo.Frame], list[waymo.CameraCalibration]]:
    """A level drive as a Waymo v2 segment of one FRONT camera, in the data set's frames and units.

    World: the room turned so that +z is up (``ROOM_TO_WAYMO``). Vehicle: on the floor below the camera,
    +x forward, +y left, +z up; the camera sits ``camera_height`` above its origin with the vehicle's
    axes (Waymo camera axes), so the extrinsic is one constant translation. 3D boxes: every object in every
    frame (the data set labels objects out of the camera's view too), in the vehicle frame of that frame,
    size (length, width, height) = the box's (x, z, y) extents, heading about +z. 2D boxes: the objects
    seen in the frame, tight around their pixels. Ids are the object names (laser) and ``cam-`` + name.
    """
    height, width = render.images.shape[1:3]
    camera = waymo.CameraCalibration(
        name=waymo.CameraName.FRONT, intrinsics=np.asarray(intrinsics, float), distortion=np.zeros(5),
        camera_to_vehicle=_homogeneous(np.eye(3), (0.0, 0.0, camera_height)), width=width, height=height)
    world_from_gl = _homogeneous(ROOM_TO_WAYMO) @ camtoworlds @ _homogeneous(WAYMO_CAMERA_IN_GL)  # [T, 4, 4]
    world_from_vehicle = world_from_gl @ np.linalg.inv(camera.camera_to_vehicle)
    if not np.allclose(world_from_vehicle[:, 2, :3], [0, 0, 1], atol=1e-9):
        raise scenes.SceneError("waymo_segment: the camera path is not level; a Waymo vehicle frame turns only "
                                "about +z (use scenes.make_drive).")
    boxes_2d = camera_boxes(render.labels, objects)
    frames = []
    for t, pose in enumerate(world_from_vehicle):
        vehicle_yaw = np.arctan2(pose[1, 0], pose[0, 0])
        vehicle_from_world = np.linalg.inv(pose)
        boxes_3d = []
        for box in objects:
            center = vehicle_from_world @ np.append(ROOM_TO_WAYMO @ np.asarray(box.center), 1.0)
            heading = (box.yaw - vehicle_yaw + np.pi) % (2 * np.pi) - np.pi
            boxes_3d.append(waymo.Box3d(box.name, waymo.BoxType.TYPE_VEHICLE, tuple(center[:3].tolist()),
                                        (box.size[0], box.size[2], box.size[1]), float(heading)))
        names = {box.label: box.name for box in objects}
        frames.append(waymo.Frame(
            timestamp_micros=WAYMO_START_MICROS + 100_000 * t, world_from_vehicle=pose,
            images={waymo.CameraName.FRONT: render.images[t]}, boxes_3d=boxes_3d,
            boxes_2d={waymo.CameraName.FRONT: [waymo.Box2d(f"cam-{names[label]}", waymo.BoxType.TYPE_VEHICLE,
                                                           center, size)
                                               for label, (center, size) in boxes_2d[t].items()]}))
    return frames, [camera]


def write_drives(build: Path, names: dict[str, str], params: Params) -> int:
    """Film each room along a level drive and write it as a Waymo v2 segment; returns the camera boxes written."""
    count = 0
    for index, (name, split) in enumerate(names.items()):
        render, camtoworlds, intrinsics, spec = scenes.render_drive(
            seed=[params.seed, index], frames=params.waymo_frames, height=params.height, width=params.width,
            num_objects=params.num_objects, camera_height=CAMERA_HEIGHT)
        frames, cameras = waymo_segment(render, camtoworlds, intrinsics, spec.objects)
        waymo.write_segment(build / "waymo", WAYMO_SPLITS[split], name, frames, cameras)
        count += sum(len(f.boxes_2d[waymo.CameraName.FRONT]) for f in frames)
    return count


def _metrics(renders: dict[str, scenes.Render], params: Params, num_train: int) -> dict:
    labels = np.stack([r.labels for r in renders.values()])  # [S, T, H, W]
    seen = [np.isin(np.arange(1, params.num_objects + 1), r.labels).mean() if params.num_objects else 1.0
            for r in renders.values()]
    steps = [np.abs(np.diff(r.images.astype(np.int16), axis=0)).mean() if params.frames > 1 else 0.0
             for r in renders.values()]
    return {
        "num_scenes": params.num_scenes,
        "num_train_scenes": num_train,
        "num_test_scenes": params.num_scenes - num_train,
        "frames_per_scene": params.frames,
        "total_frames": params.num_scenes * params.frames,
        "object_pixel_fraction": round(float((labels > 0).mean()), 6),  # how much of the frames objects cover
        "objects_seen_fraction": round(float(np.mean(seen)), 6),  # objects visible in at least one frame
        "mean_frame_step": round(float(np.mean(steps)), 4),  # mean |frame t+1 - frame t|, 0..255: smoothness
    }


def run(params: Params, out_dir: str | Path, metrics_path: str | Path | None = None,
        plots_dir: str | Path | None = None) -> dict:
    """Generate the scene set into ``out_dir`` (replacing it atomically) and measure it.

    Args:
        params: the ``scenes:`` section.
        out_dir: the scene set folder to (re)create.
        metrics_path: metrics JSON file; default ``<out_dir>/metrics.json``.
        plots_dir: folder for the sample videos (re)created; default ``<out_dir>/videos``.

    Returns:
        ``{"metrics": {...}, "videos": [paths], "metrics_path": path}``; the metrics are deterministic.
    """
    out_dir = Path(out_dir)
    plots_dir = out_dir / "videos" if plots_dir is None else Path(plots_dir)
    metrics_path = out_dir / "metrics.json" if metrics_path is None else Path(metrics_path)
    train, test = scene_names(params)
    samples = train[:1] + test[:1]  # the sample videos
    with video.staged_outputs(out_dir, plots_dir) as (build, plots_build):
        renders = {}
        for index, name in enumerate(train + test):
            started = time.perf_counter()
            renders[name] = scenes.generate_scene(
                build / name, seed=[params.seed, index], frames=params.frames, height=params.height,
                width=params.width, num_objects=params.num_objects)
            log.info("%s: %d frames in %.1f s", name, params.frames, time.perf_counter() - started)
        scenes.write_split(build, train, test)
        splits = {**dict.fromkeys(train, "train"), **dict.fromkeys(test, "test")}
        videos = rovi_videos(build, renders, splits, params) if params.rovi_frames else []
        if params.rovi_frames and not videos:
            raise scenes.SceneError(f"scenes.rovi_frames: no object is seen in the first {params.rovi_frames} frames "
                                    f"(every {params.rovi_stride}th) of any scene, so the ROVI copy would be empty; "
                                    "raise rovi_frames or rovi_stride, or set rovi_frames to 0")
        if videos:
            rovi.write_rovi(build / "rovi", videos, frame_step=params.rovi_stride)
        camera_box_count = write_drives(build, splits, params) if params.waymo_frames else 0
        if params.dove_frames:  # the train scenes as DOVE's training videos
            vsr.write_video_list(build / "dove", {name: renders[name].images[:params.dove_frames] for name in train},
                                 fps=VIDEO_FPS)
        if params.vsr_frames and test:  # the test scenes as a VSR test set (GT and its bicubic downsampling)
            vsr.write_vsr_set(build / "vsr" / VSR_LABEL, {name: renders[name].images[:params.vsr_frames]
                                                          for name in test}, params.vsr_scale)
        for name in samples:
            frames = np.concatenate([renders[name].images, label_colours(renders[name].labels)], axis=2)
            video.write_video(plots_build / f"{name}.mp4", frames, fps=VIDEO_FPS)
        metrics = _metrics(renders, params, len(train))
        metrics["rovi_videos"] = len(videos)
        metrics["rovi_objects"] = sum(len(v.expressions) for v in videos)
        metrics["waymo_segments"] = params.num_scenes if params.waymo_frames else 0
        metrics["waymo_camera_boxes"] = camera_box_count
    video.write_json(metrics_path, metrics)  # once the set is in place, wherever the file lies
    log.info("wrote %d scenes (%d test) to %s", params.num_scenes, len(test), out_dir)
    return {"metrics": metrics, "videos": [plots_dir / f"{name}.mp4" for name in samples],
            "metrics_path": metrics_path}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--out", required=True, help="scene set folder to (re)create, e.g. data/scenes")
    parser.add_argument("--metrics", default=None, help="metrics JSON file (default: <out>/metrics.json)")
    parser.add_argument("--plots", default=None, help="folder for the sample videos (default: <out>/videos)")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        started = time.perf_counter()
        result = run(params, args.out, args.metrics, args.plots)
        tracker.log_metrics({**result["metrics"], "seconds": round(time.perf_counter() - started, 2)})
        for path in result["videos"]:
            tracker.log_video(path)
        tracker.log_artifact(Path(args.out) / "split.json")
        tracker.log_artifact(result["metrics_path"])


if __name__ == "__main__":
    main()

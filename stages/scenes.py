"""Stage ``scenes``: the embedded synthetic scene set (DL3DV-like rooms of photo-textured boxes).

Writes ``num_scenes`` scenes in the nerfstudio / DL3DV layout (``transforms.json``, ``images/``,
plus ``masks/`` and ``objects.json``; see :mod:`stages.common.scenes`) and a ``split.json`` whose
last ``num_test_scenes`` scenes are held out. Scene ``i`` depends only on ``(seed, i)``, so adding
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

from stages.common import cli, scenes, video

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
        for name in samples:
            frames = np.concatenate([renders[name].images, label_colours(renders[name].labels)], axis=2)
            video.write_video(plots_build / f"{name}.mp4", frames, fps=VIDEO_FPS)
        metrics = _metrics(renders, params, len(train))
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

"""Stage ``masks``: (masked video, ground truth) pairs for video inpainting (paper section 4.3, supplement B.3).

Three mask sources, each written as a pairs folder (:mod:`stages.common.pairs`) under ``--out``:

- ``inpaint_box``: a fixed central box of half the height and half the width in every frame, the
  paper's DL3DV / Waymo inpainting task (B.3: "a fixed rectangular mask having half the height and
  half the width of the video"), with no prompt (the paper uses one fixed caption).
- ``inpaint_objects``: the paper's Waymo-Bbox task: a seeded random half (``object_fraction``, at
  least one) of each video's labelled objects, masked in every frame. Waymo masks the vehicles'
  bounding boxes; here each chosen object's per-frame 2D bounding box of its label pixels
  (``object_shape: box``) or its exact label pixels (``silhouette``), grown by ``dilation`` pixels.
  Labels come from the scene's ``masks/`` (per-pixel object labels) and ``objects.json``.
- ``inpaint_rovi`` (only when ``rovi_path`` is set): dataset-provided per-object masks with a text
  prompt, read from a folder in the ROVI / Refer-YouTube-VOS layout (see :func:`load_rovi`).

The input is the ground truth with the masked pixels set to the constant grey ``fill`` (the paper
does not state its fill value; grey is 0 in the decoder's [-1, 1] range, the neutral value); the
mask video is 255 where the model must fill in. Everything is built under temporary names and
swapped in at the end: a failed run leaves the previous output, or nothing.

    python -m stages.masks --params params.yaml --scenes data/scenes --out data/masks \
        --metrics metrics/masks.json --plots plots/masks
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
from tqdm import tqdm

from chopgrad.metrics.files import frame_sort_key
from stages.common import cli, pairs, scenes, video

log = logging.getLogger("stages.masks")

STAGE = "masks"
FPS = 24  # the pairs' playback rate (docs/interfaces.md), and the sample videos'
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class MaskError(ValueError):
    """Input data that cannot be masked as asked (no objects, no label masks, a malformed ROVI folder)."""


@dataclass(frozen=True)
class Params:
    fill: int  # grey level (0..255) of the masked pixels in the input video; 127 ~ 0 in [-1, 1]
    object_fraction: float  # share of each video's labelled objects masked (Waymo-Bbox: 0.5), at least one
    object_shape: Literal["box", "silhouette"]  # per-frame bounding box (Waymo-Bbox) or exact label pixels
    dilation: int  # pixels each object mask grows by (square), so object edges do not leak through
    seed: int  # the object choice of scene s is drawn from (seed, crc32(s))
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


def choose_objects(labels: list[int], fraction: float, rng: np.random.Generator) -> list[int]:
    """A random ``round(fraction * len(labels))`` of ``labels`` (at least one), sorted."""
    if not labels:
        raise MaskError("choose_objects: no labelled objects to choose from.")
    count = max(1, int(np.floor(fraction * len(labels) + 0.5)))
    return sorted(int(label) for label in rng.choice(sorted(labels), size=count, replace=False))


def _bounding_boxes(pixels: np.ndarray) -> np.ndarray:  # [T, H, W] bool -> [T, H, W] bool
    """Each frame's axis-aligned bounding rectangle of its True pixels (empty where there are none)."""
    rows, cols = pixels.any(axis=2), pixels.any(axis=1)  # [T, H], [T, W]
    # a row lies inside the box if some occupied row is at or above it and some at or below it
    inside_rows = np.maximum.accumulate(rows, axis=1) & np.maximum.accumulate(rows[:, ::-1], axis=1)[:, ::-1]
    inside_cols = np.maximum.accumulate(cols, axis=1) & np.maximum.accumulate(cols[:, ::-1], axis=1)[:, ::-1]
    return inside_rows[:, :, None] & inside_cols[:, None, :]


def dilate(mask: np.ndarray, pixels: int) -> np.ndarray:  # [T, H, W] bool -> [T, H, W] bool
    """Grow each frame's mask by ``pixels`` in every direction (a (2p+1)-square structuring element)."""
    if pixels == 0:
        return mask.copy()
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return np.stack([cv2.dilate(frame.view(np.uint8), kernel) > 0 for frame in mask])


def object_mask(labels: np.ndarray, chosen: list[int], shape: str, dilation: int) -> np.ndarray:
    """The mask of the ``chosen`` object labels in label frames ``[T, H, W]``; returns ``[T, H, W]`` bool.

    ``shape="silhouette"``: their label pixels; ``"box"``: per frame and object, the bounding box of
    its label pixels. Then grown by ``dilation`` pixels.
    """
    if shape == "silhouette":
        mask = np.isin(labels, chosen)
    elif shape == "box":
        mask = np.zeros(labels.shape, bool)
        for label in chosen:
            mask |= _bounding_boxes(labels == label)
    else:
        raise MaskError(f"object_mask: shape must be 'box' or 'silhouette', got {shape!r}.")
    return dilate(mask, dilation)


def apply_mask(frames: np.ndarray, mask: np.ndarray, fill: int) -> np.ndarray:  # [T, H, W, 3], [T, H, W]
    """``frames`` with the masked pixels set to the grey level ``fill``."""
    masked = frames.copy()
    masked[mask] = fill
    return masked


def as_mask_frames(mask: np.ndarray) -> np.ndarray:  # [T, H, W] bool -> [T, H, W] uint8
    return np.where(mask, 255, 0).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------
# ROVI: dataset-provided masks with a prompt per object


@dataclass(eq=False)
class RoviClip:
    """One object of one ROVI video: the frames, its mask in every frame, and its text prompt."""

    name: str  # <video>_obj<id>, the pair's scene name
    split: str
    frames: np.ndarray  # [T, H, W, 3] uint8
    mask: np.ndarray  # [T, H, W] bool
    prompt: str


def _by_stem(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in folder.iterdir() if p.suffix in IMAGE_SUFFIXES and not p.name.startswith(".")}


def _rovi_index(root: Path) -> list[dict]:
    """Check the layout of a ROVI folder without decoding images; one entry per (video, object).

    Raises MaskError naming the problem before any frame is read.
    """
    if not root.is_dir():
        raise MaskError(f"masks.rovi_path: {root} is not a folder; point it at a ROVI-layout folder holding "
                        "train.json/test.json, JPEGImages/ and Annotations/, or set it to null.")
    split_files = {split: root / f"{split}.json" for split in pairs.SPLITS if (root / f"{split}.json").is_file()}
    if not split_files:
        raise MaskError(f"{root} holds neither train.json nor test.json; a ROVI folder lists its videos, "
                        "their expressions and object ids in them.")
    entries = []
    for split, path in split_files.items():
        try:
            videos = json.loads(path.read_text())["videos"]
            if not isinstance(videos, dict) or not videos:
                raise TypeError("'videos' must be a non-empty mapping")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise MaskError(f"{path} is not a ROVI annotation file ({error!r}); it needs "
                            "{'videos': {<video>: {'expressions': {<id>: {'exp', 'obj_id'}}}}}.") from error
        for name in sorted(videos, key=frame_sort_key):
            entries.extend(_rovi_video(root, split, name, videos[name], path))
    return entries


def _rovi_video(root: Path, split: str, name: str, meta: dict, path: Path) -> list[dict]:
    where = f"{path}: video {name!r}"
    image_dir, mask_dir = root / "JPEGImages" / name, root / "Annotations" / name
    if not image_dir.is_dir():
        raise MaskError(f"{where}: its frames folder {image_dir} is missing.")
    if not mask_dir.is_dir():
        raise MaskError(f"{where}: its masks folder {mask_dir} is missing (missing masks); ROVI ships a "
                        "per-frame object-id mask for every frame.")
    images, masks = _by_stem(image_dir), _by_stem(mask_dir)
    if meta.get("frames") is not None:
        frames = [str(frame) for frame in meta["frames"]]
        lacking = [f for f in frames if f not in images] + [f for f in frames if f not in masks]
        if lacking:
            raise MaskError(f"{where} lists frame {lacking[0]!r}, which has no image in {image_dir} or no "
                            f"mask in {mask_dir} (missing masks or frames).")
    else:
        if set(images) != set(masks):
            raise MaskError(f"{where}: mismatched frame counts, {len(images)} images in {image_dir} but "
                            f"{len(masks)} masks in {mask_dir} (first difference: "
                            f"{min(set(images) ^ set(masks), key=frame_sort_key)!r}); every frame needs its mask.")
        frames = sorted(images, key=frame_sort_key)
    if not frames:
        raise MaskError(f"{where} has no frames.")
    expressions = meta.get("expressions")
    if not isinstance(expressions, dict) or not expressions:
        raise MaskError(f"{where} has no expressions; ROVI gives each object a text prompt.")
    prompts: dict[int, str] = {}
    for key in sorted(expressions, key=frame_sort_key):  # the first expression of each object is its prompt
        expression = expressions[key]
        try:
            obj_id, text = int(expression["obj_id"]), str(expression["exp"]).strip()
        except (KeyError, TypeError, ValueError) as error:
            raise MaskError(f"{where}: expression {key!r} needs 'exp' (text) and 'obj_id' (an integer), "
                            f"got {expression!r}.") from error
        if obj_id < 1 or not text:
            raise MaskError(f"{where}: expression {key!r} has obj_id {obj_id} (must be >= 1) or an empty text.")
        prompts.setdefault(obj_id, text)
    return [{"name": f"{name}_obj{obj_id}", "split": split, "obj_id": obj_id, "prompt": prompt,
             "images": [images[f] for f in frames], "masks": [masks[f] for f in frames]}
            for obj_id, prompt in sorted(prompts.items())]


def _read_ids(path: Path) -> np.ndarray:  # -> [H, W] object ids
    """An object-id mask: a palette or grey PNG whose pixel values are object ids (0 = background)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I;16", "I"):
            raise MaskError(f"{path} is a {image.mode} image; ROVI masks are palette or single-channel PNGs "
                            "whose values are object ids.")
        return np.array(image)


def load_rovi(root: str | Path, max_frames: int = 0, size: tuple[int, int] | None = None) -> list[RoviClip]:
    """Every clip of a ROVI folder, in memory; see :func:`iter_rovi` (which streams them)."""
    return list(iter_rovi(root, max_frames, size))


def iter_rovi(root: str | Path, max_frames: int = 0, size: tuple[int, int] | None = None) -> Iterator[RoviClip]:
    """Read a folder in the ROVI layout: one clip per (video, object), with its mask and prompt.

    Layout (ROVI is built on Refer-YouTube-VOS and A2D-Sentences in their shared layout)::

        <root>/train.json, <root>/test.json   {"videos": {<video>: {"frames": [<stem>, ...] (optional),
                                                 "expressions": {<id>: {"exp": <text>, "obj_id": <id>}}}}}
        <root>/JPEGImages/<video>/<stem>.jpg  the frames
        <root>/Annotations/<video>/<stem>.png per-frame object-id masks (palette or grey PNG, 0 = none)

    The first expression of each object (in expression-id order) is its prompt.

    Args:
        root: the ROVI folder.
        max_frames: keep the first frames only (0: all).
        size: resize frames (area) and masks (nearest) to ``(height, width)``; None keeps them.

    Yields:
        The clips, train split first. Objects absent from every kept frame are skipped (logged).

    Raises:
        MaskError: a missing JSON, frames or masks folder, a listed frame without image or mask,
            image and mask counts that differ, a malformed expression, or nothing usable at all.
    """
    entries = _rovi_index(Path(root))  # the whole layout is checked before any frame is read
    cache, count = {}, 0
    for entry in tqdm(entries, desc="rovi", unit="object", disable=None):
        keep = slice(0, max_frames or None)
        key = entry["images"][0].parent
        if key not in cache:  # a video's frames and ids are read once for all its objects
            images = [video.read_image(p) for p in entry["images"][keep]]
            ids = [_read_ids(p) for p in entry["masks"][keep]]
            if any(i.shape[:2] != images[0].shape[:2] for i in images + ids):
                raise MaskError(f"{key}: frames and masks differ in size; they must all share one size.")
            cache = {key: (np.stack(images), np.stack(ids))}
        frames, ids = cache[key]
        mask = ids == entry["obj_id"]
        if not mask.any():
            log.warning("ROVI %s: object %d is in none of the kept frames; skipped", key.name, entry["obj_id"])
            continue
        if size is not None:
            height, width = size
            frames = np.stack([cv2.resize(f, (width, height), interpolation=cv2.INTER_AREA) for f in frames])
            mask = np.stack([cv2.resize(m.view(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST)
                             for m in mask]) > 0
        count += 1
        yield RoviClip(entry["name"], entry["split"], frames, mask, entry["prompt"])
    if not count:
        raise MaskError(f"{root}: no object of any video is visible in the kept frames; nothing to inpaint.")


# ----------------------------------------------------------------------------------------------------------
# The stage


def _check_scenes(scenes_dir: Path) -> list[tuple[str, str, scenes.Scene]]:
    """(name, split, scene) for every scene, layouts checked and object labels present; nothing decoded."""
    split = scenes.load_split(scenes_dir)
    checked = []
    for split_name in pairs.SPLITS:
        for name in split[split_name]:
            scene = scenes.load_scene(scenes_dir / name, load_images=False)
            if scene.mask_paths is None:
                raise MaskError(f"scene {scene.folder} has no masks/ folder (missing masks): inpaint_objects needs "
                                "per-frame object labels; regenerate the scenes or drop this scene.")
            if not scene.objects:
                raise MaskError(f"scene {scene.folder} has an empty object list (objects.json lists no objects): "
                                "inpaint_objects masks a random half of each video's objects, so every scene "
                                "needs at least one (scenes.num_objects >= 1).")
            checked.append((name, split_name, scene))
    return checked


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
        scenes_dir: the scene set (``split.json`` and scene folders with ``masks/`` and ``objects.json``).
        out_dir: the folder to (re)create, holding one pairs folder per task.
        metrics_path: metrics JSON (mask area fraction per task, objects chosen per scene).
        plots_dir: folder (re)created with the sample videos (masked | mask | target).

    Returns:
        ``{"metrics": {...}, "videos": [paths], "chosen": {scene: [labels]}}``.
    """
    scenes_dir, out_dir, plots_dir = Path(scenes_dir), Path(out_dir), Path(plots_dir)
    checked = _check_scenes(scenes_dir)
    if params.rovi_path is not None:
        _rovi_index(Path(params.rovi_path))  # layout errors before any work

    with video.staged_outputs(out_dir, plots_dir) as (build, plots_build):
        metrics, chosen, videos, samples = {}, {}, [], {}
        box_masks, object_masks, skipped = [], [], []
        with pairs.PairsWriter(build / "inpaint_box", "inpaint_box", FPS) as box_writer, \
                pairs.PairsWriter(build / "inpaint_objects", "inpaint_objects", FPS) as object_writer:
            for name, split, scene in tqdm(checked, desc="masks", unit="scene", disable=None):
                frames, labels = scene.read_images(), scene.read_masks()  # [T, H, W, 3], [T, H, W]
                tasks = [(box_writer, box_mask(*labels.shape), box_masks)]
                visible = sorted({box.label for box in scene.objects} & set(np.unique(labels).tolist()))
                if visible:  # objects that never enter the frame cannot be inpainted
                    chosen[name] = choose_objects(visible, params.object_fraction, scene_rng(params.seed, name))
                    tasks.append((object_writer, object_mask(labels, chosen[name], params.object_shape,
                                                             params.dilation), object_masks))
                else:
                    skipped.append(name)
                    log.warning("%s: none of its %d labelled objects is visible in any frame; left out of "
                                "inpaint_objects", name, len(scene.objects))
                for writer, mask, kept in tasks:
                    masked = apply_mask(frames, mask, params.fill)
                    writer.add(name, split, masked, frames, mask=as_mask_frames(mask))
                    kept.append(float(mask.mean()))  # only the area: real sets do not fit in memory
                    if split not in samples.setdefault(writer.task, {}):
                        samples[writer.task][split] = (name, _sample(masked, mask, frames))
            if not object_masks:
                raise MaskError(f"no scene of {scenes_dir} has a labelled object visible in any frame of its "
                                "masks/; inpaint_objects has nothing to mask.")
            box_writer.commit()
            object_writer.commit()
        metrics["inpaint_box"] = {"pairs": len(box_masks), **_area(box_masks)}
        metrics["inpaint_objects"] = {
            "pairs": len(object_masks), **_area(object_masks),
            "objects_chosen_mean": round(float(np.mean([len(c) for c in chosen.values()])), 4),
            "scenes_without_visible_objects": len(skipped)}
        if params.rovi_path is not None:
            rovi_areas = []
            with pairs.PairsWriter(build / "inpaint_rovi", "inpaint_rovi", FPS) as rovi_writer:
                for clip in iter_rovi(params.rovi_path, params.rovi_frames, params.rovi_size):
                    masked = apply_mask(clip.frames, clip.mask, params.fill)
                    rovi_writer.add(clip.name, clip.split, masked, clip.frames, mask=as_mask_frames(clip.mask),
                                    prompt=clip.prompt)
                    rovi_areas.append(float(clip.mask.mean()))
                    if clip.split not in samples.setdefault("inpaint_rovi", {}):
                        samples["inpaint_rovi"][clip.split] = (clip.name, _sample(masked, clip.mask, clip.frames))
                rovi_writer.commit()
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

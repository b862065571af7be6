"""ROVI's layout (Refer-YouTube-VOS / A2D-Sentences): read a folder of object-masked videos with prompts; write one.

ROVI is built on Refer-YouTube-VOS and A2D-Sentences, and shares their layout::

    <root>/train.json, <root>/test.json   {"videos": {<video>: {"frames": [<stem>, ...] (optional),
                                             "expressions": {<id>: {"exp": <text>, "obj_id": <id>}}}}}
    <root>/JPEGImages/<video>/<stem>.jpg  the frames
    <root>/Annotations/<video>/<stem>.png per-frame object-id masks (palette PNG, 0 = no object)

:func:`iter_rovi` reads one clip per (video, object): the frames, the object's mask and its first
expression as the prompt. :func:`write_rovi` writes videos in the same layout (the embedded default's
object-masked videos come from it, so ``make repro`` reads them with the reader real ROVI takes).
Doubt: ROVI's archive on the Hugging Face hub (``jianzongwu/rovi``) could not be opened here; the
layout follows the Refer-YouTube-VOS layout the data set is built on.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from chopgrad.metrics.files import frame_sort_key
from stages.common import pairs, video

__all__ = ["RoviClip", "RoviError", "RoviVideo", "check_rovi", "iter_rovi", "load_rovi", "write_rovi"]

log = logging.getLogger("stages.common.rovi")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class RoviError(ValueError):
    """A folder that is not in ROVI's layout, or videos that cannot be written in it."""


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

    Raises RoviError naming the problem before any frame is read.
    """
    if not root.is_dir():
        raise RoviError(f"masks.rovi_path: {root} is not a folder; point it at a ROVI-layout folder holding "
                        "train.json/test.json, JPEGImages/ and Annotations/, or set it to null.")
    split_files = {split: root / f"{split}.json" for split in ("train", "test") if (root / f"{split}.json").is_file()}
    if not split_files:
        raise RoviError(f"{root} holds neither train.json nor test.json; a ROVI folder lists its videos, "
                        "their expressions and object ids in them.")
    entries = []
    for split, path in split_files.items():
        try:
            videos = json.loads(path.read_text())["videos"]
            if not isinstance(videos, dict) or not videos:
                raise TypeError("'videos' must be a non-empty mapping")
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise RoviError(f"{path} is not a ROVI annotation file ({error!r}); it needs "
                            "{'videos': {<video>: {'expressions': {<id>: {'exp', 'obj_id'}}}}}.") from error
        for name in sorted(videos, key=frame_sort_key):
            entries.extend(_rovi_video(root, split, name, videos[name], path))
    return entries


def _rovi_video(root: Path, split: str, name: str, meta: dict, path: Path) -> list[dict]:
    where = f"{path}: video {name!r}"
    image_dir, mask_dir = root / "JPEGImages" / name, root / "Annotations" / name
    if not image_dir.is_dir():
        raise RoviError(f"{where}: its frames folder {image_dir} is missing.")
    if not mask_dir.is_dir():
        raise RoviError(f"{where}: its masks folder {mask_dir} is missing (missing masks); ROVI ships a "
                        "per-frame object-id mask for every frame.")
    images, masks = _by_stem(image_dir), _by_stem(mask_dir)
    if meta.get("frames") is not None:
        frames = [str(frame) for frame in meta["frames"]]
        lacking = [f for f in frames if f not in images] + [f for f in frames if f not in masks]
        if lacking:
            raise RoviError(f"{where} lists frame {lacking[0]!r}, which has no image in {image_dir} or no "
                            f"mask in {mask_dir} (missing masks or frames).")
    else:
        if set(images) != set(masks):
            raise RoviError(f"{where}: mismatched frame counts, {len(images)} images in {image_dir} but "
                            f"{len(masks)} masks in {mask_dir} (first difference: "
                            f"{min(set(images) ^ set(masks), key=frame_sort_key)!r}); every frame needs its mask.")
        frames = sorted(images, key=frame_sort_key)
    if not frames:
        raise RoviError(f"{where} has no frames.")
    expressions = meta.get("expressions")
    if not isinstance(expressions, dict) or not expressions:
        raise RoviError(f"{where} has no expressions; ROVI gives each object a text prompt.")
    prompts: dict[int, str] = {}
    for key in sorted(expressions, key=frame_sort_key):  # the first expression of each object is its prompt
        expression = expressions[key]
        try:
            obj_id, text = int(expression["obj_id"]), str(expression["exp"]).strip()
        except (KeyError, TypeError, ValueError) as error:
            raise RoviError(f"{where}: expression {key!r} needs 'exp' (text) and 'obj_id' (an integer), "
                            f"got {expression!r}.") from error
        if obj_id < 1 or not text:
            raise RoviError(f"{where}: expression {key!r} has obj_id {obj_id} (must be >= 1) or an empty text.")
        prompts.setdefault(obj_id, text)
    return [{"name": f"{name}_obj{obj_id}", "split": split, "obj_id": obj_id, "prompt": prompt,
             "images": [images[f] for f in frames], "masks": [masks[f] for f in frames]}
            for obj_id, prompt in sorted(prompts.items())]


def _read_ids(path: Path) -> np.ndarray:  # -> [H, W] object ids
    """An object-id mask: a palette or grey PNG whose pixel values are object ids (0 = background)."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I;16", "I"):
            raise RoviError(f"{path} is a {image.mode} image; ROVI masks are palette or single-channel PNGs "
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
        RoviError: a missing JSON, frames or masks folder, a listed frame without image or mask,
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
                raise RoviError(f"{key}: frames and masks differ in size; they must all share one size.")
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
        raise RoviError(f"{root}: no object of any video is visible in the kept frames; nothing to inpaint.")


def check_rovi(root: str | os.PathLike) -> int:
    """Check the layout of a ROVI folder without decoding an image; returns its (video, object) count.

    Raises:
        RoviError: as :func:`iter_rovi`, before any frame is read.
    """
    return len(_rovi_index(Path(root)))


@dataclass(eq=False)
class RoviVideo:
    """One video to write: frames, per-pixel object ids and a text expression per object id."""

    name: str  # the video's folder name
    split: str  # train or test
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    ids: np.ndarray  # [T, H, W] uint8 object ids, 0 = none
    expressions: Mapping[int, str]  # object id -> its referring expression


def _palette() -> list[int]:  # DAVIS / YouTube-VOS style: id 0 black, then well-spread colours
    colours = [(0, 0, 0)] + [((i * 97) % 256, (i * 57 + 128) % 256, (i * 151 + 64) % 256) for i in range(1, 256)]
    return [channel for colour in colours for channel in colour]


def write_rovi(root: str | os.PathLike, videos: Sequence[RoviVideo], jpeg_quality: int = 95,
               frame_step: int = 5) -> Path:
    """Write ``videos`` as a folder in ROVI's layout (read back by :func:`iter_rovi`), atomically.

    Frames are JPEGs (as YouTube-VOS ships them), masks palette PNGs whose values are object ids, the
    frame stems the source frame numbers ``0, frame_step, 2 frame_step, ...`` (YouTube-VOS keeps every
    fifth frame and names frames by their number: ``00000``, ``00005``, ...). Every object id of ``expressions`` must appear in the video's ``ids``.

    Raises:
        RoviError: ``root`` exists and is not empty, two videos share a name, a split is not train or
            test, frames and ids disagree in shape, or an expression names an id that never appears.
    """
    from PIL import Image

    root = Path(root)
    names = [v.name for v in videos]
    if not videos or len(set(names)) != len(names):
        raise RoviError(f"write_rovi: needs videos of distinct names, got {names}.")
    for v in videos:
        if v.split not in pairs.SPLITS:
            raise RoviError(f"write_rovi: video {v.name!r} has split {v.split!r}; use one of {pairs.SPLITS}.")
        if v.frames.ndim != 4 or v.frames.shape[-1] != 3 or v.ids.shape != v.frames.shape[:3] or not len(v.frames):
            raise RoviError(f"write_rovi: video {v.name!r} needs frames [T, H, W, 3] and ids [T, H, W] of the "
                            f"same T, H, W; got {list(v.frames.shape)} and {list(v.ids.shape)}.")
        absent = sorted(set(v.expressions) - set(np.unique(v.ids).tolist()))
        if absent or not v.expressions or min(v.expressions) < 1:
            raise RoviError(f"write_rovi: video {v.name!r} has expressions for object ids "
                            f"{sorted(v.expressions)}; ids must be >= 1 and appear in its masks (absent: {absent}).")
    with video.new_folder(root, "write_rovi", RoviError) as tmp:
        index: dict[str, dict] = {split: {} for split in pairs.SPLITS}
        palette = _palette()
        for v in videos:
            stems = [f"{frame_step * t:05d}" for t in range(len(v.frames))]
            (tmp / "JPEGImages" / v.name).mkdir(parents=True)
            (tmp / "Annotations" / v.name).mkdir(parents=True)
            for stem, frame, ids in zip(stems, v.frames, v.ids, strict=True):
                ok, encoded = cv2.imencode(".jpg", np.ascontiguousarray(frame[..., ::-1]),
                                           [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
                assert ok, "OpenCV failed to encode a uint8 image as JPEG"
                (tmp / "JPEGImages" / v.name / f"{stem}.jpg").write_bytes(encoded.tobytes())
                mask = Image.fromarray(np.ascontiguousarray(ids, dtype=np.uint8), mode="P")
                mask.putpalette(palette)
                mask.save(tmp / "Annotations" / v.name / f"{stem}.png")
            index[v.split][v.name] = {
                "frames": stems,
                "expressions": {str(i): {"exp": text, "obj_id": str(obj_id)}
                                for i, (obj_id, text) in enumerate(sorted(v.expressions.items()))}}
        for split, entries in index.items():
            if entries:
                video.write_json(tmp / f"{split}.json", {"videos": entries})
    return root

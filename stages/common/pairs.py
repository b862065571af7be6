"""The pairs folder: (degraded input, ground truth) video pairs, the one format every application trains on.

Written by the data preparation stages (``splat``, ``masks``, ``reinsert``, ``degrade``; paper
sections 4.1-4.4 and supplement B), read by ``train``, ``infer`` and ``evaluate``. The layout is
binding (``docs/interfaces.md``)::

    <folder>/pairs.json
    <folder>/<split>/<scene>/input/00000.png ...   the degraded video at the target's size (uint8 RGB)
    <folder>/<split>/<scene>/target/00000.png ...  the ground truth, same T, H, W
    <folder>/<split>/<scene>/mask/00000.png ...    inpainting only: single channel, 255 = region to fill
    <folder>/<split>/<scene>/lowres/00000.png ...  sr only: the raw low-resolution frames

``pairs.json`` = ``{"task", "application", "fps", "pairs": [{"scene", "split", "input", "target",
"mask", "prompt", "lowres", "frames", "height", "width"}, ...]}``, paths relative to the folder.

Write with :class:`PairsWriter` (everything is built under a temporary sibling and renamed into
place by :meth:`PairsWriter.commit`: a failure leaves the previous folder, or nothing, never a
half-written one). Read with :func:`load_pairs` (validated; paths come back absolute) and
:func:`read_pair` (the frames).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Self

import numpy as np

from stages.common import video

__all__ = [
    "APPLICATIONS",
    "PAIRS_FILE",
    "PairsError",
    "PairsWriter",
    "load_manifest",
    "load_pairs",
    "read_pair",
]

PAIRS_FILE = "pairs.json"
# task -> application (the paper's four applications; three inpainting mask sources)
APPLICATIONS = {"nvs": "nvs", "inpaint_box": "inpainting", "inpaint_objects": "inpainting",
                "inpaint_rovi": "inpainting", "driving": "driving", "sr": "sr"}
SPLITS = ("train", "test", "validation")  # validation: held out of training and of the tables (train's validation PSNR)
PAIR_KEYS = ("scene", "split", "input", "target", "mask", "prompt", "lowres", "frames", "height", "width")
FOLDER_KEYS = ("input", "target", "mask", "lowres")  # the keys that name frame folders


class PairsError(ValueError):
    """A pairs folder, or a pair given to the writer, does not match the pairs format."""


# ----------------------------------------------------------------------------------------------------------
# Writing


def _check_video(frames: Any, what: str, channels: int | None) -> None:
    """``frames`` must be uint8 [T, H, W, 3] (channels=3) or [T, H, W] (channels=None)."""
    shape = "[T, H, W, 3]" if channels else "[T, H, W]"
    if not isinstance(frames, np.ndarray):
        raise PairsError(f"{what}: expected a numpy array {shape}, got {type(frames).__name__}.")
    ok = frames.ndim == 4 and frames.shape[-1] == channels if channels else frames.ndim == 3
    if not ok or min(frames.shape) == 0:
        raise PairsError(f"{what}: expected a non-empty uint8 array {shape}, got shape {tuple(frames.shape)}.")
    if frames.dtype != np.uint8:
        raise PairsError(f"{what}: expected dtype uint8, got {frames.dtype}.")


class PairsWriter:
    """Build one pairs folder pair by pair, then :meth:`commit` it atomically.

    Use as a context manager: leaving the block by an exception removes everything built so far
    (and leaves any previous folder untouched); :meth:`commit` writes ``pairs.json`` and swaps the
    folder in. Frames are written as each pair is added, so a long data set streams through.

    Args:
        folder: the pairs folder to (re)create, e.g. ``data/masks/inpaint_box``.
        task: one of :data:`APPLICATIONS` (its application is stored beside it).
        fps: playback rate of the videos, > 0.
    """

    def __init__(self, folder: str | os.PathLike, task: str, fps: float = 24):
        if task not in APPLICATIONS:
            raise PairsError(f"Unknown task {task!r}; the pairs format knows {sorted(APPLICATIONS)}.")
        if not (isinstance(fps, (int, float)) and not isinstance(fps, bool) and fps > 0 and math.isfinite(fps)):
            raise PairsError(f"fps must be a positive number, got {fps!r}.")
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise PairsError(f"{self.folder} exists and is not a folder; remove it or choose another path.")
        self.task, self.application, self.fps = task, APPLICATIONS[task], fps
        self.pairs: list[dict] = []
        self._build: Path | None = None

    def __enter__(self) -> Self:
        self._build = video.temp_folder(self.folder)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if self._build is not None:  # not committed: an exception, or a forgotten commit()
            shutil.rmtree(self._build, ignore_errors=True)
            self._build = None

    def add(
        self,
        scene: str,
        split: str,
        input: np.ndarray,  # [T, H, W, 3] uint8, the degraded video at the target's size
        target: np.ndarray,  # [T, H, W, 3] uint8, the ground truth
        mask: np.ndarray | None = None,  # [T, H, W] uint8, 0 or 255 (255 = fill); inpainting only
        prompt: str | None = None,  # a caption, where the data set has one
        lowres: np.ndarray | None = None,  # [T, h, w, 3] uint8, the raw low-resolution frames; sr only
    ) -> dict:
        """Check one pair, write its frames, and return its ``pairs.json`` entry."""
        if self._build is None:
            raise PairsError("PairsWriter.add() outside its `with` block (or after commit()).")
        what = f"{self.task} pair {scene!r}"
        if not isinstance(scene, str) or not scene or Path(scene).name != scene or scene.startswith("."):
            raise PairsError(f"{what}: the scene name must be a plain folder name, got {scene!r}.")
        if any(pair["scene"] == scene for pair in self.pairs):
            raise PairsError(f"{what}: scene {scene!r} was already added; scene names must be unique.")
        if split not in SPLITS:
            raise PairsError(f"{what}: split must be one of {SPLITS}, got {split!r}.")
        _check_video(input, f"{what}: input", 3)
        _check_video(target, f"{what}: target", 3)
        if input.shape != target.shape:
            raise PairsError(f"{what}: input {input.shape} and target {target.shape} must have the same "
                             "[T, H, W, 3] (the input is the degraded video at the target's size).")
        frames, height, width = target.shape[:3]
        if (mask is None) == (self.application == "inpainting"):
            raise PairsError(f"{what}: a mask is required for inpainting tasks and only for them "
                             f"(task {self.task!r}, mask {'missing' if mask is None else 'given'}).")
        if mask is not None:
            _check_video(mask, f"{what}: mask", None)
            if mask.shape != target.shape[:3]:
                raise PairsError(f"{what}: mask {mask.shape} must be [T, H, W] = {target.shape[:3]}.")
            if not np.isin(mask, (0, 255)).all():
                raise PairsError(f"{what}: mask values must be 0 (keep) or 255 (fill), found "
                                 f"{sorted(set(np.unique(mask).tolist()) - {0, 255})[:5]}.")
        if (lowres is None) == (self.application == "sr"):
            raise PairsError(f"{what}: lowres frames are required for the sr task and only for it.")
        if lowres is not None:
            _check_video(lowres, f"{what}: lowres", 3)
            if len(lowres) != frames:
                raise PairsError(f"{what}: lowres has {len(lowres)} frames, the target {frames}.")
        if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
            raise PairsError(f"{what}: prompt must be a non-empty string or None, got {prompt!r}.")

        entry = {"scene": scene, "split": split}
        for key, frames_of in (("input", input), ("target", target), ("mask", mask), ("lowres", lowres)):
            relative = f"{split}/{scene}/{key}"
            if frames_of is not None:
                video.write_frames(self._build / relative, frames_of, prefix="", start=0)
            entry[key] = relative if frames_of is not None else None
        entry.update(prompt=prompt, frames=int(frames), height=int(height), width=int(width))
        entry = {key: entry[key] for key in PAIR_KEYS}
        self.pairs.append(entry)
        return entry

    def commit(self) -> Path:
        """Write ``pairs.json`` and swap the folder into place; returns the path of ``pairs.json``."""
        if self._build is None:
            raise PairsError("PairsWriter.commit() outside its `with` block, or called twice.")
        if not self.pairs:
            raise PairsError(f"{self.folder}: no pairs were added; a pairs folder holds at least one.")
        video.write_json(self._build / PAIRS_FILE, {
            "task": self.task, "application": self.application, "fps": self.fps,
            "pairs": sorted(self.pairs, key=lambda pair: (SPLITS.index(pair["split"]), pair["scene"])),
        })
        video.swap_in(self._build, self.folder)
        self._build = None
        return self.folder / PAIRS_FILE


# ----------------------------------------------------------------------------------------------------------
# Reading


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_entry(entry: Any, index: int, application: str, folder: Path, path: Path,
                 check_frames: bool) -> dict:
    where = f"{path}: pairs[{index}]"
    if not isinstance(entry, dict):
        raise PairsError(f"{where} must be an object, got {type(entry).__name__}.")
    missing, unknown = [k for k in PAIR_KEYS if k not in entry], sorted(set(entry) - set(PAIR_KEYS))
    if missing or unknown:
        raise PairsError(f"{where}: missing key(s) {missing}, unknown key(s) {unknown}; a pair has exactly "
                         f"{list(PAIR_KEYS)} (null where it does not apply).")
    if not isinstance(entry["scene"], str) or not entry["scene"]:
        raise PairsError(f"{where}: 'scene' must be a non-empty string, got {entry['scene']!r}.")
    where = f"{path}: pair {entry['scene']!r}"
    if entry["split"] not in SPLITS:
        raise PairsError(f"{where}: 'split' must be one of {SPLITS}, got {entry['split']!r}.")
    for key in ("frames", "height", "width"):
        if not _positive_int(entry[key]):
            raise PairsError(f"{where}: '{key}' must be a positive integer, got {entry[key]!r}.")
    if entry["prompt"] is not None and not (isinstance(entry["prompt"], str) and entry["prompt"].strip()):
        raise PairsError(f"{where}: 'prompt' must be a non-empty string or null, got {entry['prompt']!r}.")
    required = {"input": True, "target": True, "mask": application == "inpainting",
                "lowres": application == "sr"}
    resolved = dict(entry)
    root = folder.resolve()
    for key in FOLDER_KEYS:
        value = entry[key]
        if (value is None) == required[key]:
            raise PairsError(f"{where}: '{key}' must be {'a frame folder' if required[key] else 'null'} for "
                             f"the {application} application, got {value!r}.")
        if value is None:
            continue
        if not isinstance(value, str) or Path(value).is_absolute():
            raise PairsError(f"{where}: '{key}' must be a path relative to {folder}, got {value!r}.")
        frame_dir = (folder / value).resolve()
        if root not in frame_dir.parents:
            raise PairsError(f"{where}: '{key}' = {value!r} points outside {folder}.")
        if not frame_dir.is_dir():
            raise PairsError(f"{where}: the {key} frame folder {folder / value} is missing; re-run the stage "
                             "that wrote this pairs folder.")
        resolved[key] = folder / value
    if check_frames:
        _check_folders(resolved, where)
    return resolved


def _frame_folders(pair: dict) -> dict[str, Path]:
    return {key: pair[key] for key in FOLDER_KEYS if pair[key] is not None}


def _check_folders(pair: dict, where: str) -> None:
    """Frame names alike in every folder of the pair, their count and the first frame's size as the entry says."""
    try:
        listed = video.match_frames(_frame_folders(pair))
    except video.MediaError as error:
        raise PairsError(f"{where}: {error}") from error
    for key, paths in listed.items():
        if len(paths) != pair["frames"]:
            raise PairsError(f"{where}: {pair[key]} holds {len(paths)} frames, pairs.json says {pair['frames']}.")
        try:
            first = video.read_image(paths[0], labels=key == "mask")
        except video.MediaError as error:
            raise PairsError(f"{where}: {key}: {error}") from error
        if key != "lowres" and first.shape[:2] != (pair["height"], pair["width"]):
            raise PairsError(f"{where}: {key} frames are {first.shape[1]}x{first.shape[0]}, pairs.json says "
                             f"{pair['width']}x{pair['height']}.")


def load_manifest(folder: str | os.PathLike, check_frames: bool = True) -> dict:
    """Read and validate ``<folder>/pairs.json``; see :func:`load_pairs`.

    Returns:
        ``{"task", "application", "fps", "pairs"}`` with every frame-folder path made absolute
        (``folder / relative``, a :class:`~pathlib.Path`); ``mask``/``lowres``/``prompt`` may be None.
    """
    folder = Path(folder).absolute()
    path = folder / PAIRS_FILE
    if not path.is_file():
        raise PairsError(f"{path} not found; a pairs folder holds pairs.json (run the stage that writes "
                         f"{folder}, e.g. `dvc repro`).")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise PairsError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(data, dict) or set(data) != {"task", "application", "fps", "pairs"}:
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise PairsError(f"{path} must be an object with exactly task, application, fps, pairs; got {keys}.")
    task = data["task"]
    if task not in APPLICATIONS:
        raise PairsError(f"{path}: unknown task {task!r}; known: {sorted(APPLICATIONS)}.")
    if data["application"] != APPLICATIONS[task]:
        raise PairsError(f"{path}: task {task!r} belongs to application {APPLICATIONS[task]!r}, "
                         f"not {data['application']!r}.")
    fps = data["fps"]
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise PairsError(f"{path}: fps must be a positive number, got {fps!r}.")
    if not isinstance(data["pairs"], list) or not data["pairs"]:
        raise PairsError(f"{path}: 'pairs' must be a non-empty list.")
    pairs = [_check_entry(entry, index, data["application"], folder, path, check_frames)
             for index, entry in enumerate(data["pairs"])]
    scenes = [pair["scene"] for pair in pairs]
    duplicates = sorted({name for name in scenes if scenes.count(name) > 1})
    if duplicates:
        raise PairsError(f"{path}: scene(s) {duplicates} appear more than once.")
    return {**data, "pairs": pairs}


def load_pairs(folder: str | os.PathLike, split: str | None = None, check_frames: bool = True) -> list[dict]:
    """The pairs of a pairs folder, validated, as a list of dicts.

    Args:
        folder: the folder holding ``pairs.json`` (e.g. ``data/degrade/sr``).
        split: ``"train"``, ``"test"`` or ``"validation"`` to keep one split only; None for all.
        check_frames: also check that the frame folders of a pair hold the same names (frames are
            paired by name), count them and check the first frame's size (one image read per
            folder; cheap). False checks only that the folders exist.

    Returns:
        One dict per pair with the keys of the format (``scene, split, input, target, mask, prompt,
        lowres, frames, height, width``); ``input``/``target``/``mask``/``lowres`` are absolute
        :class:`~pathlib.Path` objects (or None). Read the frames with :func:`read_pair`.

    Raises:
        PairsError: no ``pairs.json``, malformed JSON, an unknown task, a pair with missing or
            unknown keys, a frame folder missing, outside the folder, or of the wrong length/size,
            or frame names that differ between a pair's folders (each missing and extra file named).
    """
    if split is not None and split not in SPLITS:
        raise PairsError(f"split must be one of {SPLITS} or None, got {split!r}.")
    pairs = load_manifest(folder, check_frames)["pairs"]
    return [pair for pair in pairs if split is None or pair["split"] == split]


def read_pair(pair: dict) -> dict[str, np.ndarray | None]:
    """The frames of one pair from :func:`load_pairs`.

    Returns:
        ``{"input": [T, H, W, 3], "target": [T, H, W, 3], "mask": [T, H, W] or None,
        "lowres": [T, h, w, 3] or None}``, all uint8.

    Raises:
        PairsError: the frames on disk disagree with the entry (count or size), or the folders hold
            different frame names (frames are paired by name).
    """
    try:  # by name, not position: a frame missing in one folder must not shift the others
        video.match_frames(_frame_folders(pair))
    except video.MediaError as error:
        raise PairsError(f"pair {pair['scene']!r}: {error}") from error
    frames = {}
    for key in FOLDER_KEYS:
        if pair[key] is None:
            frames[key] = None
            continue
        try:
            frames[key] = video.read_frames(pair[key], labels=key == "mask")
        except video.MediaError as error:
            raise PairsError(f"pair {pair['scene']!r}: {key}: {error}") from error
        size = frames[key].shape[:3]
        expected = (pair["frames"], pair["height"], pair["width"])
        if size[0] != expected[0] or (key != "lowres" and size != expected):
            raise PairsError(f"pair {pair['scene']!r}: {key} frames are [T, H, W] = {list(size)}, "
                             f"pairs.json says {list(expected)}.")
    return frames

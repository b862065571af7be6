"""Video and image-folder I/O for every stage: mp4 through ffmpeg, PNG frame folders through OpenCV.

Frames live in two forms across the project:

- on disk and in numpy: ``uint8`` ``[T, H, W, 3]`` RGB (``[T, H, W]`` for label images);
- in the decoders: ``float32`` ``[3, T, H, W]`` in ``[-1, 1]`` (:func:`to_tensor` / :func:`from_tensor`).

mp4 is encoded and decoded through ffmpeg-python with the ffmpeg executable bundled by imageio-ffmpeg
(``imageio_ffmpeg.get_ffmpeg_exe()``): no system ffmpeg is assumed. Containers are probed with PyAV
(its own ffmpeg libraries; there is no ffprobe to call). Every writer is atomic: it
writes to a temporary name in the destination folder and renames with ``os.replace``, so a failure
never leaves a half-written file or folder behind (:func:`staged_outputs`, :func:`temp_sibling`,
:func:`temp_folder` and :func:`write_json` give the other stages the same guarantee). What a
``kill -9`` leaves of those temporary names is removed by the next write to the same path
(:func:`remove_stale_temps`).

Frame folders are ordered and paired by the library's rules (:mod:`chopgrad.metrics.files`, shared
with ``python -m chopgrad.metrics``): natural order of names, frames of two folders paired by name,
16-bit images scaled to 8 bits or refused.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import cv2
import ffmpeg
import imageio_ffmpeg
import numpy as np
import torch

from chopgrad.metrics.files import frame_sort_key, match_frame_names, pixels_to_uint8

__all__ = [
    "MediaError",
    "MediaNotFoundError",
    "VideoInfo",
    "from_tensor",
    "list_frames",
    "match_frames",
    "new_folder",
    "probe_video",
    "read_frames",
    "read_image",
    "read_video",
    "remove_leftovers",
    "remove_stale_temps",
    "staged_outputs",
    "swap_in",
    "temp_folder",
    "temp_sibling",
    "to_tensor",
    "write_frames",
    "write_image",
    "write_json",
    "write_video",
]


class MediaError(ValueError):
    """A video, image or frame folder is unreadable, inconsistent, or the input to a writer is invalid."""


class MediaNotFoundError(MediaError, FileNotFoundError):
    """A video, image or frame folder does not exist."""


@dataclass(frozen=True)
class VideoInfo:
    """A video stream's size, frame rate and frame count (0 where the container does not store one)."""

    width: int
    height: int
    fps: float
    frames: int


def _ffmpeg_exe() -> str:
    return imageio_ffmpeg.get_ffmpeg_exe()


def _check_frames(frames: np.ndarray, what: str, allow_labels: bool = False) -> None:
    """Raise MediaError unless ``frames`` is a non-empty [T, H, W, 3] (or [T, H, W]) uint8/uint16 array."""
    if not isinstance(frames, np.ndarray):
        raise MediaError(f"{what}: expected a numpy array, got {type(frames).__name__}.")
    shapes = "[T, H, W, 3] or [T, H, W]" if allow_labels else "[T, H, W, 3]"
    rgb = frames.ndim == 4 and frames.shape[-1] == 3
    labels = allow_labels and frames.ndim == 3
    if not (rgb or labels):
        raise MediaError(f"{what}: expected frames of shape {shapes}, got {tuple(frames.shape)}.")
    allowed = (np.uint8, np.uint16) if labels else (np.uint8,)
    if frames.dtype not in allowed:
        raise MediaError(
            f"{what}: expected dtype {'/'.join(np.dtype(d).name for d in allowed)}, got {frames.dtype}; "
            "convert float frames in [-1, 1] with from_tensor(), or use np.clip(...).astype(np.uint8)."
        )
    if min(frames.shape[:3]) == 0:
        raise MediaError(f"{what}: frames have an empty dimension, shape {tuple(frames.shape)}.")


def temp_sibling(path: Path, suffix: str = "") -> Path:
    """A fresh, unused name in ``path``'s folder (same file system, so os.replace is atomic).

    Only the name: the writer creates the file, with the usual permissions (mkstemp's would be 0600).
    """
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


TEMP_NAME = r"\.{name}\.[0-9a-f]{{12}}\.tmp(\.[^/]*)?"  # what temp_sibling makes of ``name``
OUTPUT_ROOTS = ("data", "plots", "metrics", "results")  # where the stages write


def _remove(paths: list[Path]) -> list[Path]:
    for child in paths:
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    return paths


def remove_leftovers(repo: str | os.PathLike = ".") -> list[Path]:
    """Remove every temporary sibling (:func:`temp_sibling` names) under the stages' output folders of
    ``repo``: what killed runs left. Run before any stage (``python -m stages.common.check``), never
    while a stage runs. Returns the paths removed."""
    pattern = re.compile(TEMP_NAME.format(name=".+"))
    found = [path for root in OUTPUT_ROOTS for path in sorted(Path(repo, root).rglob(".*"))
             if pattern.fullmatch(path.name)] if Path(repo).is_dir() else []
    return _remove([path for path in found if not any(parent in found for parent in path.parents)])


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` (:func:`temp_sibling` names) left by a killed writer.

    A ``kill -9`` (or a power cut) ends a writer before it can clean up; the next run writing ``path``
    calls this first. Two writers of one path at a time are not supported anyway (DVC runs a stage
    once at a time), so any such sibling is a leftover.

    Returns:
        The paths removed.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = re.compile(TEMP_NAME.format(name=re.escape(path.name)))
    return _remove([child for child in path.parent.iterdir() if pattern.fullmatch(child.name)])


def temp_folder(folder: Path) -> Path:
    """Create a fresh folder next to ``folder`` (same file system, so os.replace is atomic)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(folder)
    tmp.mkdir()
    return tmp


def swap_in(built: Path, target: Path) -> None:
    """Replace the folder ``target`` by the folder ``built`` (same parent): two renames, the old copy
    removed last, so a reader sees the old folder or the new one, never half of either."""
    old = None
    if target.exists():
        if not target.is_dir():
            raise MediaError(f"{target} exists and is not a folder; remove it or choose another path.")
        old = temp_folder(target)
        os.replace(target, old / target.name)
    os.replace(built, target)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def new_folder(folder: str | os.PathLike, what: str, error: type[Exception] = MediaError) -> Iterator[Path]:
    """Build a folder that must not exist yet (or be empty) aside, and move it into place at the end;
    on an exception nothing is left, neither the folder nor its build.

    Raises:
        error: ``folder`` exists and is not an empty folder (``what`` names the caller in the message).
    """
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise error(f"{what}: {folder} already exists and is not an empty folder; remove it first.")
    tmp = temp_folder(folder)
    try:
        yield tmp
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def staged_outputs(*targets: str | os.PathLike) -> Iterator[tuple[Path, ...]]:
    """Build a stage's output folders aside and swap each into place at the end; on an exception, none.

    A target that lies inside another one (``plots`` defaulting to ``<out>/videos``) is built inside
    that one's build folder, so it arrives with it; only the outermost targets are swapped. Build
    folders a killed run left next to a target are removed first (:func:`remove_stale_temps`).

    .. warning::
        The swaps happen one folder after another: each folder is atomic, the set of them is not.
        An exception raised inside the block (``KeyboardInterrupt`` included) swaps nothing.

    Args:
        targets: the folders to (re)create; each may exist (it is replaced) or not.

    Yields:
        One fresh, empty build folder per target, in the order given: write into these.

    Raises:
        MediaError: a target exists and is not a folder, or is given twice.
    """
    targets = tuple(Path(target) for target in targets)
    resolved = [target.resolve() for target in targets]
    for target, where in zip(targets, resolved):
        if target.exists() and not target.is_dir():
            raise MediaError(f"{target} exists and is not a folder; remove it or choose another path.")
        if resolved.count(where) > 1:
            raise MediaError(f"staged_outputs: {target} is given twice.")
    outer = {where: target for target, where in zip(targets, resolved)
             if not any(other in where.parents for other in resolved)}
    for target in outer.values():
        remove_stale_temps(target)
    builds: dict[Path, Path] = {}  # outer target -> its build folder
    try:
        for where, target in outer.items():
            builds[where] = temp_folder(target)
        yield tuple(_build_of(where, builds) for where in resolved)
        for where, built in builds.items():
            swap_in(built, outer[where])
    except BaseException:  # Ctrl-C too: a build folder left behind would hold half an output
        for built in builds.values():
            shutil.rmtree(built, ignore_errors=True)
        raise


def _build_of(where: Path, builds: dict[Path, Path]) -> Path:
    """The build folder standing for the resolved target ``where``: its own, or a place in an outer one."""
    if where in builds:
        return builds[where]
    outer = next(folder for folder in builds if folder in where.parents)
    inside = builds[outer] / where.relative_to(outer)
    inside.mkdir(parents=True, exist_ok=True)
    return inside


def write_json(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON, atomically; the folder is created if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_sibling(path)
    try:
        with open(tmp, "x") as handle:
            handle.write(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _ffmpeg_message(error: ffmpeg.Error) -> str:
    lines = (error.stderr or b"").decode("utf-8", "replace").strip().splitlines()
    return lines[-1] if lines else str(error)


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,  # [T, H, W, 3] uint8 RGB
    fps: float = 24.0,
    crf: int = 18,
) -> Path:
    """Encode frames as an H.264 mp4, atomically.

    Even sizes are stored as yuv420p (plays in every browser, e.g. the MLflow UI); odd sizes, which
    4:2:0 chroma cannot hold, as yuv444p so the read-back shape is always exact. The same frames and
    settings give the same bytes on any machine (one encoder thread, no version string).

    Args:
        path: destination ``.mp4``; its folder is created if needed. An existing file is replaced.
        frames: ``uint8`` ``[T, H, W, 3]`` RGB frames.
        fps: frames per second, > 0.
        crf: x264 constant rate factor, 0 (best) to 51 (worst); 18 is visually lossless.

    Returns:
        The path written.
    """
    path = Path(path)
    _check_frames(frames, f"write_video({path})")
    if not fps > 0:
        raise MediaError(f"write_video({path}): fps must be > 0, got {fps}.")
    if not (isinstance(crf, (int, np.integer)) and 0 <= crf <= 51):
        raise MediaError(f"write_video({path}): crf must be an integer in [0, 51], got {crf!r}.")
    height, width = frames.shape[1:3]
    pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path)
    tmp = temp_sibling(path, ".mp4")
    stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
    # One x264 thread and bit-exact muxing: the bytes depend on the frames and settings only, not on
    # the machine's core count or the ffmpeg build, so a rerun leaves DVC's hash (and every stage after) alone.
    stream = ffmpeg.output(
        stream, str(tmp), format="mp4", vcodec="libx264", pix_fmt=pix_fmt, crf=int(crf),
        movflags="+faststart", threads=1, fflags="+bitexact", loglevel="error",
    )
    try:
        ffmpeg.run(
            stream, cmd=_ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes(),
            capture_stdout=True, capture_stderr=True, overwrite_output=True,
        )
        os.replace(tmp, path)
    except ffmpeg.Error as error:
        raise MediaError(f"write_video({path}): ffmpeg failed to encode: {_ffmpeg_message(error)}") from error
    finally:
        tmp.unlink(missing_ok=True)
    return path


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Size, frame rate and frame count of a video's first video stream, read with PyAV.

    Raises:
        MediaNotFoundError: the file does not exist.
        MediaError: it is corrupt, truncated before its index, or holds no video stream.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"Video not found: {path}. Check the path, or run the stage that writes it.")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path} holds no video stream.")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            return VideoInfo(width=stream.width, height=stream.height, fps=float(rate or 0.0),
                             frames=int(stream.frames))
    except av.error.FFmpegError as error:
        raise MediaError(f"Video {path} is corrupt or not a video ({error.strerror}).") from error


def read_video(path: str | os.PathLike) -> np.ndarray:  # [T, H, W, 3] uint8
    """Decode every frame of a video to RGB, with the ffmpeg executable.

    Args:
        path: a video file ffmpeg can read (mp4 written by :func:`write_video`, or any other).

    Returns:
        ``uint8`` ``[T, H, W, 3]`` RGB frames, one per stored frame, unrotated.

    Raises:
        MediaNotFoundError: the file does not exist.
        MediaError: the file is corrupt, holds no frames, or fewer than its index lists (truncated).
    """
    path = Path(path)
    info = probe_video(path)
    # As stored: no rotation from metadata (it would swap H and W behind the probe's back), no
    # frame-rate conversion (one output frame per stored frame).
    stream = ffmpeg.output(ffmpeg.input(str(path), noautorotate=None), "pipe:", format="rawvideo",
                           pix_fmt="rgb24", fps_mode="passthrough", loglevel="error")
    try:
        raw, _ = ffmpeg.run(stream, cmd=_ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as error:
        detail = _ffmpeg_message(error)
        raise MediaError(f"Video {path} is corrupt: ffmpeg failed to decode it ({detail}).") from error
    frame_bytes = info.height * info.width * 3
    if len(raw) == 0 or len(raw) % frame_bytes:
        raise MediaError(
            f"Video {path} decoded to {len(raw)} bytes, not a whole number of "
            f"{info.width}x{info.height} RGB frames; the file is truncated or corrupt."
        )
    frames = np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3).copy()
    if info.frames and len(frames) != info.frames:  # info.frames is 0 where the container has no count
        raise MediaError(f"Video {path} lists {info.frames} frames but {len(frames)} could be decoded; "
                         "the file is truncated or corrupt.")
    return frames


def write_image(path: str | os.PathLike, image: np.ndarray) -> Path:
    """Write one PNG atomically.

    Args:
        path: destination ``.png``; its folder must exist.
        image: ``uint8`` ``[H, W, 3]`` RGB, or ``uint8``/``uint16`` ``[H, W]`` (labels, stored losslessly).

    Returns:
        The path written.
    """
    path = Path(path)
    _check_frames(image[None] if isinstance(image, np.ndarray) else image, f"write_image({path})", True)
    pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
    tmp = temp_sibling(path, ".png")
    try:
        if not cv2.imwrite(str(tmp), pixels):
            raise MediaError(f"write_image({path}): OpenCV could not write the PNG.")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_image(path: str | os.PathLike, labels: bool = False) -> np.ndarray:
    """Read one image file.

    Args:
        path: an image OpenCV can read (PNG, JPEG, ...).
        labels: False for colour (``uint8`` ``[H, W, 3]`` RGB, grey is expanded and alpha dropped;
            16-bit images scaled to 8 bits, or refused when they hold 8-bit values:
            :func:`chopgrad.metrics.files.pixels_to_uint8`); True for a single-channel label image,
            returned unchanged (``uint8``/``uint16`` ``[H, W]``).

    Returns:
        The image array.
    """
    path = Path(path)
    if not path.is_file():
        raise MediaNotFoundError(f"Image not found: {path}.")
    # IMREAD_COLOR alone would shift 16-bit pixels right by 8 bits: 8-bit values in a 16-bit file read as 0.
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED if labels else cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH)
    if image is None:
        raise MediaError(f"Image {path} is corrupt or not an image (OpenCV could not decode it).")
    if labels:
        if image.ndim != 2:
            raise MediaError(f"Label image {path} has {image.shape[2]} channels; label images must have one.")
        return image
    try:
        image = pixels_to_uint8(image, f"Image {path}")
    except ValueError as error:
        raise MediaError(str(error)) from error
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _frame_number(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem)
    if not numbers:
        raise MediaError(f"Frame {path} has no number in its name; name frames like frame_00001.png.")
    return int(numbers[-1])


def list_frames(folder: str | os.PathLike, pattern: str = "*.png") -> list[Path]:
    """The frame files of a folder in natural order (frame_2 before frame_10), the order
    ``python -m chopgrad.metrics`` reads them in (:func:`chopgrad.metrics.files.frame_sort_key`).

    Raises:
        MediaNotFoundError: the folder does not exist.
        MediaError: it holds no matching file, a name has no number, or two names share a number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MediaNotFoundError(f"Frame folder not found: {folder}.")
    paths = sorted((p for p in folder.glob(pattern) if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: frame_sort_key(p.name))
    if not paths:
        raise MediaError(f"Frame folder {folder} is empty: no files match {pattern!r}.")
    numbers = [_frame_number(p) for p in paths]  # every name holds one
    keys = [frame_sort_key(p.name)[0] for p in paths]  # equal for frame_1.png and frame_01.png
    for index in range(1, len(paths)):
        if keys[index] == keys[index - 1]:
            raise MediaError(f"Frames {paths[index - 1].name} and {paths[index].name} in {folder} have the same "
                             f"number {numbers[index]}.")
    return paths


def match_frames(folders: dict[str, str | os.PathLike], pattern: str = "*.png") -> dict[str, list[Path]]:
    """The frames of several folders that belong together (input, target, mask), paired by name.

    Args:
        folders: ``{key: folder}``; every folder must hold the same frame names.
        pattern: glob of the frame files.

    Returns:
        ``{key: paths}`` from :func:`list_frames`: the same names, in the same order, in every folder.

    Raises:
        MediaError: a folder is missing or empty, or the names differ (the missing and extra files named).
    """
    listed = {key: list_frames(folder, pattern) for key, folder in folders.items()}
    try:
        match_frame_names({f"{folders[key]}/": [p.name for p in paths] for key, paths in listed.items()})
    except ValueError as error:
        raise MediaError(str(error)) from error
    return listed


def write_frames(
    folder: str | os.PathLike,
    frames: np.ndarray,  # [T, H, W, 3] uint8 RGB, or [T, H, W] uint8/uint16 labels
    prefix: str = "frame_",
    start: int = 1,
) -> list[Path]:
    """Write frames as ``<prefix>00001.png, ...`` into a new folder, atomically.

    The folder is built under a temporary name next to it and renamed into place.

    Args:
        folder: destination; it must not exist yet, or be empty.
        frames: ``uint8`` ``[T, H, W, 3]`` RGB, or ``[T, H, W]`` labels (``uint8``/``uint16``).
        prefix: file-name prefix.
        start: number of the first frame (1 as in DL3DV / nerfstudio folders).

    Returns:
        The written paths, in frame order.
    """
    folder = Path(folder)
    _check_frames(frames, f"write_frames({folder})", allow_labels=True)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise MediaError(f"write_frames: {folder} already exists and is not an empty folder; "
                         "remove it first.")
    tmp = temp_folder(folder)
    try:
        names = [f"{prefix}{start + index:05d}.png" for index in range(len(frames))]
        for name, frame in zip(names, frames):
            write_image(tmp / name, frame)
        if folder.exists():
            folder.rmdir()
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [folder / name for name in names]


def read_frames(folder: str | os.PathLike, labels: bool = False, pattern: str = "*.png") -> np.ndarray:
    """Read a frame folder, sorted numerically (see :func:`list_frames`).

    Args:
        folder: folder of frame images.
        labels: read single-channel label images instead of RGB (see :func:`read_image`).
        pattern: glob of the frame files.

    Returns:
        ``uint8`` ``[T, H, W, 3]`` RGB, or ``[T, H, W]`` labels.

    Raises:
        MediaNotFoundError: the folder does not exist.
        MediaError: the folder is empty, a frame is unreadable, or frames differ in size.
    """
    paths = list_frames(folder, pattern)
    frames = [read_image(paths[0], labels)]
    for path in paths[1:]:
        frame = read_image(path, labels)
        if frame.shape != frames[0].shape:
            raise MediaError(
                f"Frames in {folder} differ in size: {paths[0].name} is {frames[0].shape}, "
                f"{path.name} is {frame.shape}; every frame of a sequence must have the same size."
            )
        frames.append(frame)
    return np.stack(frames)


def to_tensor(frames: np.ndarray) -> torch.Tensor:  # [T, H, W, 3] uint8 -> [3, T, H, W] float32
    """Frames as the decoders see them: ``float32`` ``[3, T, H, W]``, 0 -> -1 and 255 -> 1."""
    _check_frames(frames, "to_tensor")
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)  # [3, T, H, W]
    return video.to(torch.float32) / 127.5 - 1.0


def from_tensor(video: torch.Tensor) -> np.ndarray:  # [3, T, H, W] float in [-1, 1] -> [T, H, W, 3] uint8
    """Inverse of :func:`to_tensor`: clamps to [-1, 1], rounds to the nearest ``uint8`` level."""
    if not isinstance(video, torch.Tensor) or video.ndim != 4 or video.shape[0] != 3:
        shape = tuple(video.shape) if hasattr(video, "shape") else type(video).__name__
        raise MediaError(
            f"from_tensor: expected a tensor [3, T, H, W], got {shape}; for a batch [B, 3, T, H, W] "
            "convert each video[b] separately."
        )
    if not video.is_floating_point():
        raise MediaError(f"from_tensor: expected a floating-point tensor in [-1, 1], got {video.dtype}.")
    levels = ((video.detach().to("cpu", torch.float32).clamp(-1.0, 1.0) + 1.0) * 127.5).round()
    return levels.to(torch.uint8).permute(1, 2, 3, 0).contiguous().numpy()  # [T, H, W, 3]

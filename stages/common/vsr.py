"""DOVE's data layouts: VSR test sets (folders of frames) and training video lists; read and written.

Test sets, as DOVE ships UDM10, SPMCS, YouHQ40, RealVSR and MVSR4x (``datasets/test/<set>/``; mmagic's
UDM10 / SPMCS name the low-quality folder ``BIx4`` or ``BDx4``)::

    <set>/GT/<video>/*.png     high-resolution frames (ordered by the number in their names)
    <set>/LQ/<video>/*.png     low-resolution frames, GT size / scale, paired with GT by name

Training videos, as DOVE's (CogVideoX's) fine-tuning reads them: a text file of video paths relative
to the data root, one per line (its ``--video_column``, here ``videos.txt``)::

    <root>/videos.txt          videos/clip_a.mp4 ...
    <root>/videos/clip_a.mp4   any video ffmpeg reads

:func:`write_vsr_set` and :func:`write_video_list` write the same layouts (the embedded default's VSR
test set and training videos come from them, so ``make repro`` reads them with the readers the real
data take).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from stages.common import video

__all__ = ["LQ_DIRS", "VIDEO_LIST", "VsrError", "VsrVideo", "index_vsr_set", "iter_vsr_set", "read_video_list",
           "write_video_list", "write_vsr_set"]

LQ_DIRS = ("LQ", "BIx4", "BDx4")  # DOVE's test sets; mmagic's UDM10 / SPMCS (bicubic, blur-downsampled)
VIDEO_LIST = "videos.txt"  # DOVE's --video_column file


class VsrError(ValueError):
    """A folder that is not in DOVE's test-set or training-video layout."""



@dataclass(frozen=True)
class VsrVideo:
    name: str
    gt: Path  # folder of HR frames
    lq: Path  # folder of LR frames


def index_vsr_set(root: str | Path, lq_dir: str | None, scale: int) -> list[VsrVideo]:
    """Check a VSR test set's layout (names, frame counts, sizes against ``scale``) without reading it all.

    Raises:
        VsrError: no GT/ or LQ folder (or several LQ candidates), videos only on one side, frame
            counts that differ, or frame sizes where GT != LQ x ``scale``.
    """
    root = Path(root)
    if not (root / "GT").is_dir():
        raise VsrError(f"{root} has no GT/ folder; a VSR test set holds GT/<video>/*.png and LQ/<video>/*.png "
                       "(DOVE's UDM10, SPMCS, YouHQ40, RealVSR, MVSR4x): check degrade.vsr_sets.")
    if lq_dir is None:
        found = [name for name in LQ_DIRS if (root / name).is_dir()]
        if len(found) != 1:
            raise VsrError(f"{root} holds {found or 'none'} of the low-quality folders {list(LQ_DIRS)}; set "
                           "degrade.vsr_lq_dir to the one to use.")
        lq_dir = found[0]
    elif not (root / lq_dir).is_dir():
        raise VsrError(f"degrade.vsr_lq_dir: {root / lq_dir} is not a folder.")
    gt_names = {p.name for p in (root / "GT").iterdir() if p.is_dir() and not p.name.startswith(".")}
    lq_names = {p.name for p in (root / lq_dir).iterdir() if p.is_dir() and not p.name.startswith(".")}
    if gt_names != lq_names or not gt_names:
        raise VsrError(f"{root}: GT/ and {lq_dir}/ must hold the same video folders; only in GT: "
                       f"{sorted(gt_names - lq_names)}, only in {lq_dir}: {sorted(lq_names - gt_names)}.")
    videos = []
    for name in sorted(gt_names):
        entry = VsrVideo(name, root / "GT" / name, root / lq_dir / name)
        try:
            gt, lq = video.list_frames(entry.gt), video.list_frames(entry.lq)
            gt_size, lq_size = video.read_image(gt[0]).shape[:2], video.read_image(lq[0]).shape[:2]
        except video.MediaError as error:
            raise VsrError(f"{root}: video {name!r}: {error}") from error
        try:  # paired by name, not position: a frame missing on one side must not shift the others
            video.match_frames({"GT": entry.gt, lq_dir: entry.lq})
        except video.MediaError as error:
            what = (f"mismatched frame counts: {len(gt)} GT frames but {len(lq)} {lq_dir} frames"
                    if len(gt) != len(lq) else "mismatched frame names")
            raise VsrError(f"{root}: video {name!r} has {what}; {error} Every HR frame needs its LR "
                               "frame.") from error
        if gt_size != (lq_size[0] * scale, lq_size[1] * scale):
            raise VsrError(f"{root}: video {name!r}: GT frames are {gt_size[1]}x{gt_size[0]}, {lq_dir} frames "
                               f"{lq_size[1]}x{lq_size[0]}; with degrade.scale {scale} GT must be exactly {scale}x "
                               "the LR size (scale not dividing: set degrade.scale to the set's factor).")
        videos.append(entry)
    return videos


def iter_vsr_set(root: str | Path, lq_dir: str | None, scale: int) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """A VSR test set in the folder-of-frames layout, one video at a time (they need not fit in memory).

    Frames are ``*.png`` in natural order, GT and LR paired by name. The whole layout is checked first
    (:func:`index_vsr_set`).

    Yields:
        ``(video, gt [T, H, W, 3], lq [T, H/s, W/s, 3])``, uint8, videos in name order.
    """
    for entry in index_vsr_set(root, lq_dir, scale):
        try:
            gt, lq = video.read_frames(entry.gt), video.read_frames(entry.lq)
        except video.MediaError as error:
            raise VsrError(f"{root}: video {entry.name!r}: {error}") from error
        yield entry.name, gt, lq


def write_vsr_set(root: str | os.PathLike, videos: Mapping[str, np.ndarray], scale: int) -> Path:
    """Write a test set in DOVE's layout, atomically: each video's frames (centre-cropped to multiples of
    ``scale``) as ``GT/<video>/frame_00001.png ...`` and their bicubic ``1 / scale`` downsampling as
    ``LQ/<video>/...``. The downsampling is OpenCV's ``INTER_CUBIC``, which does not low-pass first:
    UDM10's ``BIx4`` used MATLAB's ``imresize`` (antialiased bicubic), so this LQ aliases more and its
    scores are not comparable with the published ones.

    Raises:
        VsrError: ``root`` exists and is not empty, no videos, or a video smaller than ``scale``.
    """
    root = Path(root)
    if not videos:
        raise VsrError("write_vsr_set: no videos to write.")
    with video.new_folder(root, "write_vsr_set", VsrError) as tmp:
        for name, frames in videos.items():
            height, width = (frames.shape[1] // scale) * scale, (frames.shape[2] // scale) * scale
            if not height or not width:
                raise VsrError(f"write_vsr_set: video {name!r} of {frames.shape[2]}x{frames.shape[1]} is smaller "
                               f"than the scale {scale}.")
            top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
            gt = np.ascontiguousarray(frames[:, top:top + height, left:left + width])
            lq = np.stack([cv2.resize(f, (width // scale, height // scale), interpolation=cv2.INTER_CUBIC) for f in gt])
            video.write_frames(tmp / "GT" / name, gt)
            video.write_frames(tmp / "LQ" / name, lq)
    return root


def read_video_list(root: str | os.PathLike) -> list[Path]:
    """The training videos of a DOVE data root: the paths its ``videos.txt`` lists (relative to the root),
    each checked to exist; blank lines skipped.

    Raises:
        VsrError: no ``videos.txt``, an empty list, a listed video missing or listed twice.
    """
    root = Path(root)
    listing = root / VIDEO_LIST
    if not listing.is_file():
        raise VsrError(f"{listing} not found: a DOVE training folder lists its videos, one path relative to "
                       f"{root} per line, in {VIDEO_LIST} (check degrade.train_videos).")
    paths = []
    for number, line in enumerate(listing.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        path = root / line.strip()
        if not path.is_file():
            raise VsrError(f"{listing}, line {number}: {line.strip()!r} is not a file under {root}; fix the list or "
                           "put the video there.")
        if path in paths:
            raise VsrError(f"{listing}, line {number}: {line.strip()!r} is listed twice.")
        paths.append(path)
    if not paths:
        raise VsrError(f"{listing} lists no video.")
    return paths


def write_video_list(root: str | os.PathLike, videos: Mapping[str, np.ndarray], fps: float = 24.0) -> Path:
    """Write training videos as DOVE reads them, atomically: ``videos/<name>.mp4`` (H.264, visually
    lossless CRF 18) and ``videos.txt`` listing them.

    Raises:
        VsrError: ``root`` exists and is not empty, or no videos.
    """
    root = Path(root)
    if not videos:
        raise VsrError("write_video_list: no videos to write.")
    with video.new_folder(root, "write_video_list", VsrError) as tmp:
        for name, frames in videos.items():
            video.write_video(tmp / "videos" / f"{name}.mp4", frames, fps=fps)
        (tmp / VIDEO_LIST).write_text("".join(f"videos/{name}.mp4\n" for name in videos))
    return root

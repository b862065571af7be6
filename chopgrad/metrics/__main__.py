"""Evaluate a prediction against a ground truth from files, for users who only want the metrics.

    python -m chopgrad.metrics PRED GT --metrics psnr,ssim,lpips_vgg [--json out.json] [--fps 24]

PRED and GT are each a folder of frames (PNG/JPEG: one video), a video file (read with PyAV: one
video), or a folder of video files (one video each, all of the same size and length). GT may be left
out when only no-reference (VBench) metrics are asked for. Files are taken in natural order
(``2.png`` before ``10.png``, as the pipeline reads them: :mod:`chopgrad.metrics.files`), and PRED
and GT folders must hold the same names: frames and videos are paired by name, never by position.
16-bit images are scaled to 8 bits (65535 -> 255); one holding only 8-bit values is refused.

Every frame is scored (no sampling). Metrics with pretrained weights need their files where
``python -m chopgrad.weights status`` says; a missing one is reported before any video is read.
Errors (missing files or weights, mismatched videos) are printed without a traceback, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from chopgrad import weights
from chopgrad.metrics import METRICS, evaluate
from chopgrad.metrics.files import frame_sort_key, match_frame_names, pixels_to_uint8

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm"}


def _read_image(path: Path) -> np.ndarray:  # [H, W, 3] uint8
    from PIL import Image

    with Image.open(path) as image:
        if image.mode.startswith("I"):  # 16-bit (or 32-bit integer) grey: exact values, scaled here
            grey = np.asarray(image)
            if grey.dtype != np.uint16:
                if grey.min() < 0 or grey.max() > 65535:
                    raise ValueError(f"{path}: grey values outside 0..65535; only 8- and 16-bit images are read")
                grey = grey.astype(np.uint16)
            return np.repeat(pixels_to_uint8(grey, str(path))[..., None], 3, axis=-1)
        if _png_bit_depth(path) == 16:  # Pillow keeps only the high byte of 16-bit colour
            return _read_deep_colour(path)
        return np.asarray(image.convert("RGB"))


def _png_bit_depth(path: Path) -> int | None:
    """The bit depth in a PNG's header (None for other files)."""
    with open(path, "rb") as handle:
        head = handle.read(25)
    return head[24] if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" else None


def _read_deep_colour(path: Path) -> np.ndarray:  # [H, W, 3] uint8
    """A 16-bit colour PNG through PyAV's PNG decoder, which keeps all 16 bits."""
    import av

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0))
    return pixels_to_uint8(frame.to_ndarray(format="rgb48le"), str(path))


def _read_frames(folder: Path, files: list[Path]) -> np.ndarray:
    frames = [_read_image(path) for path in files]
    sizes = {frame.shape for frame in frames}
    if len(sizes) > 1:
        raise ValueError(f"frames in {folder} differ in size: {sorted(sizes)}")
    return np.stack(frames)  # [T, H, W, 3] uint8


def _read_video_file(path: Path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path} has no video frames")
    return np.stack(frames)  # [T, H, W, 3] uint8


def _listing(path: Path) -> tuple[list[Path], list[Path]]:
    """The frame files and the video files of a folder, in natural order."""
    files = sorted((p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")),
                   key=lambda p: frame_sort_key(p.name))
    return ([p for p in files if p.suffix.lower() in IMAGE_SUFFIXES],
            [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES])


def load_videos(path: str | Path) -> tuple[torch.Tensor, float | None]:
    """Read ``path`` as ``[B, 3, T, H, W]`` uint8, with the frame rate when it is a video file."""
    path = Path(path)
    fps = None
    if path.is_file():
        if path.suffix.lower() not in VIDEO_SUFFIXES:
            raise ValueError(f"{path} is neither a frame folder nor a video file ({', '.join(sorted(VIDEO_SUFFIXES))})")
        import av

        with av.open(str(path)) as container:
            rate = container.streams.video[0].average_rate
            fps = float(rate) if rate else None
        videos = [_read_video_file(path)]
    elif path.is_dir():
        images, video_files = _listing(path)
        if images and video_files:
            raise ValueError(f"{path} mixes frames and video files; give one kind")
        if images:
            videos = [_read_frames(path, images)]
        elif video_files:
            videos = [_read_video_file(p) for p in video_files]
        else:
            raise ValueError(f"{path} holds no frames ({', '.join(sorted(IMAGE_SUFFIXES))}) and no videos")
    else:
        raise FileNotFoundError(f"{path} does not exist")
    shapes = {video.shape for video in videos}
    if len(shapes) > 1:
        raise ValueError(f"videos in {path} differ in length or size: {sorted(shapes)}")
    return torch.from_numpy(np.stack(videos)).permute(0, 4, 1, 2, 3).contiguous(), fps  # [B, 3, T, H, W]


def check_names(pred: str | Path, gt: str | Path) -> None:
    """Two folders must hold the same frame (or video) names: they are paired by name, not position.

    Raises:
        ValueError: naming the files one folder has and the other lacks.
    """
    pred, gt = Path(pred), Path(gt)
    if not (pred.is_dir() and gt.is_dir()):
        return
    listed = {folder: _listing(folder) for folder in (pred, gt)}  # (frames, videos) each
    names = {folder: [p.name for p in images + videos] for folder, (images, videos) in listed.items()}
    try:
        match_frame_names({f"pred {pred}/": names[pred], f"gt {gt}/": names[gt]})
    except ValueError as error:
        kind = "frames" if listed[pred][0] else "videos"
        counts = f"{len(names[pred])} vs {len(names[gt])} {kind}; " if len(names[pred]) != len(names[gt]) else ""
        raise ValueError(f"pred and gt differ: {counts}{error}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chopgrad.metrics", description=__doc__.split("\n")[0])
    parser.add_argument("pred", help="predicted frames folder, video file or folder of videos")
    parser.add_argument("gt", nargs="?", help="ground truth, same kinds (not needed for VBench metrics)")
    parser.add_argument("--metrics", required=True, help=f"comma-separated, from: {','.join(METRICS)}")
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--fps", type=float, help="frame rate for dynamic_degree (default: the video's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    names = [name.strip() for name in args.metrics.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        parser.error(f"unknown or no metrics {unknown}; choose from {', '.join(METRICS)}")
    try:
        files = sorted({f for name in names for f in weights.METRIC_WEIGHTS.get(name, ())})
        weights.require(files, purpose=f"metrics {', '.join(names)}")  # before reading any video
        if args.gt:
            check_names(args.pred, args.gt)  # before reading any frame
        pred, fps = load_videos(args.pred)
        gt = load_videos(args.gt)[0] if args.gt else None
        results = evaluate(pred, gt, names, device=args.device, fps=args.fps or fps)
    except (ValueError, FileNotFoundError) as error:  # MissingWeightsError is a FileNotFoundError
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, result in results.items():
        flag = "  (stand-in weights)" if result["stand_in_weights"] else ""
        print(f"{name:>24}: {result['value']:.6g}{flag}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

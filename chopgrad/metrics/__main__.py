"""Evaluate a prediction against a ground truth from files, for users who only want the metrics.

    python -m chopgrad.metrics PRED GT --metrics psnr,ssim,lpips_vgg [--json out.json] [--fps 24]

PRED and GT are each a folder of frames (PNG/JPEG, sorted by name: one video), a video file (read
with PyAV: one video), or a folder of video files (sorted by name: one video each, all of the same
size and length). GT may be left out when only no-reference (VBench) metrics are asked for.

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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
VIDEO_SUFFIXES = {".mp4", ".mov", ".mkv", ".avi", ".webm"}


def _read_frames(folder: Path, files: list[Path]) -> np.ndarray:
    from PIL import Image

    frames = [np.asarray(Image.open(path).convert("RGB")) for path in files]
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
        files = sorted(p for p in path.iterdir() if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        video_files = [p for p in files if p.suffix.lower() in VIDEO_SUFFIXES]
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

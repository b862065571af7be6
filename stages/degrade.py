"""Stage ``degrade``: (low-resolution input, high-resolution ground truth) pairs for video super-resolution.

Paper section 4.1: ChopGrad fine-tunes DOVE, which trains on high-quality videos degraded by the
second-order pipeline of Real-ESRGAN / RealBasicVSR and feeds the model the low-resolution video
upsampled bicubically to the target size. Here, per scene, one degradation is drawn from
``(seed, crc32(scene name))`` and applied to every frame of the video (RealBasicVSR draws one per
sequence, so it stays temporally consistent; the noise itself is drawn per frame):

    order 1, at HR:   blur (isotropic or anisotropic Gaussian kernel, opencv) -> random rescale
                      (area / bilinear / bicubic) -> Gaussian or Poisson noise
    order 2:          blur (with probability ``second_blur_prob``) -> resize to HR / ``scale`` ->
                      Gaussian or Poisson noise -> H.264 compression by ffmpeg (libx264, a CRF
                      drawn from ``crf``)

HR frames are centre-cropped to multiples of ``scale`` first. The pair's ``lowres`` is the LR
video, its ``input`` that video upsampled bicubically to the HR size, its ``target`` the HR video.

With ``train_videos`` set, the training pairs are DOVE's training videos (a ``videos.txt`` list,
:mod:`stages.common.vsr`) degraded the same way, instead of the train scenes of ``--scenes``. Each test
set of ``vsr_sets`` (DOVE's layout: ``<set>/GT/<video>/*.png``, ``<set>/LQ/<video>/*.png``; UDM10,
SPMCS, YouHQ40, RealVSR, MVSR4x) becomes a test-only pairs folder ``<test-sets>/<label>/``, which an
experiment's ``test_sets`` scores as rows of their own.

    python -m stages.degrade --params params.yaml --scenes data/scenes --out data/degrade/sr \
        --test-sets data/degrade/test_sets --metrics metrics/degrade.json --plots plots/degrade
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import ffmpeg
import imageio_ffmpeg
import numpy as np
from tqdm import tqdm

from stages.common import cli, measure, pairs, scenes, video, vsr

log = logging.getLogger("stages.degrade")

STAGE = "degrade"
FPS = 24  # the pairs' playback rate (docs/interfaces.md); also the rate the compressor sees
INTERPOLATIONS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}


class DegradeError(ValueError):
    """Input that cannot be turned into super-resolution pairs (sizes, a malformed VSR test set)."""


Range = tuple[float, float]


@dataclass(frozen=True)
class Params:
    scale: int  # LR = HR / scale (DOVE: 4); HR frames are centre-cropped to multiples of it
    kernel_size: tuple[int, int]  # odd blur kernel sizes drawn from this range (Real-ESRGAN: 7..21)
    blur_sigma: Range  # first-order Gaussian std range, pixels (Real-ESRGAN: 0.2..3)
    blur_sigma2: Range  # second-order std range (Real-ESRGAN: 0.2..1.5)
    anisotropic_prob: float  # chance of an anisotropic (two stds, rotated) kernel over an isotropic one
    second_blur_prob: float  # chance the second order blurs at all (Real-ESRGAN: 0.8)
    resize_range: Range  # first-order rescale factor range (RealBasicVSR: 0.15..1.5; narrower for tiny frames)
    gaussian_noise_prob: float  # chance of Gaussian noise, Poisson otherwise (Real-ESRGAN: 0.5)
    noise_sigma: Range  # first-order Gaussian noise std range, grey levels (Real-ESRGAN: 1..30)
    noise_sigma2: Range  # second-order (Real-ESRGAN: 1..25)
    poisson_scale: Range  # first-order Poisson noise scale range (Real-ESRGAN: 0.05..3)
    poisson_scale2: Range  # second-order (Real-ESRGAN: 0.05..2.5)
    crf: tuple[int, int]  # libx264 constant rate factor range, one drawn per scene (higher: blockier)
    seed: int  # scene s is degraded with draws from (seed, crc32(s))
    train_videos: str | None  # a DOVE training folder (videos.txt + the videos): the train pairs; null: --scenes' train
    vsr_sets: dict[str, str]  # label -> a VSR test set in DOVE's layout (GT/, LQ/): a test-only pairs folder each
    vsr_lq_dir: str | None  # their low-quality folder name; null: the one of LQ, BIx4, BDx4 present

    def __post_init__(self):
        if not 1 <= self.scale <= 16:
            raise ValueError(f"degrade.scale must be an integer in [1, 16] (DOVE: 4), got {self.scale}")
        low, high = self.kernel_size
        if not (3 <= low <= high and low % 2 and high % 2):
            raise ValueError(f"degrade.kernel_size must be [min, max] odd sizes with 3 <= min <= max, "
                             f"got {list(self.kernel_size)}")
        for name in ("blur_sigma", "blur_sigma2", "resize_range", "noise_sigma", "noise_sigma2",
                     "poisson_scale", "poisson_scale2"):
            low, high = getattr(self, name)
            positive = name.startswith(("blur", "resize"))  # a zero std or scale is no blur / no image
            if not (0 < low if positive else 0 <= low) or low > high:
                raise ValueError(f"degrade.{name} must be a range [min, max] with {'0 <' if positive else '0 <='} "
                                 f"min <= max, got {list(getattr(self, name))}")
        for name in ("anisotropic_prob", "second_blur_prob", "gaussian_noise_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"degrade.{name} must be a probability in [0, 1], got {getattr(self, name)}")
        low, high = self.crf
        if not 0 <= low <= high <= 51:
            raise ValueError(f"degrade.crf must be a range [min, max] of libx264 CRFs with 0 <= min <= max <= 51, "
                             f"got {list(self.crf)}")
        if self.seed < 0:
            raise ValueError(f"degrade.seed must be >= 0, got {self.seed}")
        if self.vsr_lq_dir is not None and Path(self.vsr_lq_dir).name != self.vsr_lq_dir:
            raise ValueError(f"degrade.vsr_lq_dir must be a folder name inside each test set (e.g. LQ), "
                             f"got {self.vsr_lq_dir!r}")
        bad = [label for label in self.vsr_sets if not re.fullmatch(r"[A-Za-z0-9_]+", label) or label == "sr"]
        if bad:
            raise ValueError(f"degrade.vsr_sets: labels {bad} must be letters, digits and _ (they name folders "
                             "and table rows), other than sr (the sr pairs' own), e.g. {UDM10: data/external/vsr/UDM10}")


# ----------------------------------------------------------------------------------------------------------
# One degradation: drawn once per video


@dataclass(frozen=True)
class Noise:
    kind: str  # "gaussian" (std in grey levels) or "poisson" (scale)
    amount: float


@dataclass(frozen=True)
class Degradation:
    kernel1: tuple  # (size, sigma_x, sigma_y, theta) of the first blur
    resize1: float  # first-order rescale factor
    interpolation1: str
    noise1: Noise
    kernel2: tuple | None  # the second blur, or None
    interpolation2: str  # of the resize to the LR size
    noise2: Noise
    crf: int

    def describe(self) -> dict:
        """The draws, as JSON-able numbers (rounded) and names, for the metrics file."""
        def plain(value):
            if isinstance(value, float):
                return round(value, 4)
            if isinstance(value, (tuple, list)):
                return [plain(item) for item in value]
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value

        return plain(asdict(self))


def scene_rng(seed: int, scene: str) -> np.random.Generator:
    """A generator that depends only on the seed and the scene's name."""
    return np.random.default_rng([seed, zlib.crc32(scene.encode())])


def _kernel_draw(params: Params, sigma: Range, rng: np.random.Generator) -> tuple:
    size = int(rng.choice(np.arange(params.kernel_size[0], params.kernel_size[1] + 1, 2)))
    if rng.random() < params.anisotropic_prob:
        return size, float(rng.uniform(*sigma)), float(rng.uniform(*sigma)), float(rng.uniform(0, math.pi))
    std = float(rng.uniform(*sigma))
    return size, std, std, 0.0


def _noise_draw(params: Params, sigma: Range, scale: Range, rng: np.random.Generator) -> Noise:
    if rng.random() < params.gaussian_noise_prob:
        return Noise("gaussian", float(rng.uniform(*sigma)))
    return Noise("poisson", float(rng.uniform(*scale)))


def sample_degradation(params: Params, rng: np.random.Generator) -> Degradation:
    """Draw every random choice of the two-order pipeline (the noise values themselves excepted)."""
    kernel1 = _kernel_draw(params, params.blur_sigma, rng)
    resize1 = float(rng.uniform(*params.resize_range))
    interpolation1 = str(rng.choice(list(INTERPOLATIONS)))
    noise1 = _noise_draw(params, params.noise_sigma, params.poisson_scale, rng)
    kernel2 = _kernel_draw(params, params.blur_sigma2, rng) if rng.random() < params.second_blur_prob else None
    interpolation2 = str(rng.choice(list(INTERPOLATIONS)))
    noise2 = _noise_draw(params, params.noise_sigma2, params.poisson_scale2, rng)
    crf = int(rng.integers(params.crf[0], params.crf[1] + 1))
    return Degradation(kernel1, resize1, interpolation1, noise1, kernel2, interpolation2, noise2, crf)


def blur_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:  # -> [size, size]
    """A normalised Gaussian kernel with stds ``sigma_x, sigma_y`` along axes turned by ``theta`` radians."""
    rotation = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    covariance = rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T
    offsets = np.arange(size) - size // 2
    grid = np.stack(np.meshgrid(offsets, offsets, indexing="xy"), axis=-1)  # [size, size, 2] (x, y)
    exponent = np.einsum("...i,ij,...j->...", grid, np.linalg.inv(covariance), grid)
    kernel = np.exp(-0.5 * exponent)
    return (kernel / kernel.sum()).astype(np.float32)


def _blur(frames: np.ndarray, kernel: tuple) -> np.ndarray:  # [T, H, W, 3] float32
    size, sigma_x, sigma_y, theta = kernel
    fits = min(frames.shape[1:3])  # a kernel wider than the frame would only reflect the frame into itself
    size = min(size, fits if fits % 2 else fits - 1)
    weights = blur_kernel(size, sigma_x, sigma_y, theta)
    return np.stack([cv2.filter2D(frame, -1, weights, borderType=cv2.BORDER_REFLECT_101) for frame in frames])


def _resize(frames: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    return np.stack([cv2.resize(frame, (width, height), interpolation=INTERPOLATIONS[interpolation])
                     for frame in frames])


def add_noise(frames: np.ndarray, noise: Noise, rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of std ``amount`` grey levels, or Real-ESRGAN's Poisson (shot) noise times ``amount``.

    Poisson: with 256 photon levels at full scale (an 8-bit image), ``poisson(x * 256) / 256 - x``.
    Returns float32 frames clipped to [0, 255].
    """
    if noise.kind == "gaussian":
        noisy = frames + rng.normal(0.0, noise.amount, frames.shape).astype(np.float32)
    else:
        levels = np.clip(frames, 0, 255) / 255.0 * 256.0
        shot = (rng.poisson(levels).astype(np.float32) - levels) / 256.0 * 255.0
        noisy = frames + noise.amount * shot
    return np.clip(noisy, 0, 255).astype(np.float32)


def compress(frames: np.ndarray, crf: int, fps: float = FPS) -> np.ndarray:  # [T, h, w, 3] uint8 -> same
    """Encode with libx264 at ``crf`` (one thread, so the bytes do not depend on the machine) and decode."""
    height, width = frames.shape[1:3]
    pix_fmt = "yuv420p" if height % 2 == 0 and width % 2 == 0 else "yuv444p"  # 4:2:0 needs even sizes
    with tempfile.TemporaryDirectory(prefix="degrade-") as folder:
        path = Path(folder) / "lowres.mp4"
        stream = ffmpeg.input("pipe:", format="rawvideo", pix_fmt="rgb24", s=f"{width}x{height}", framerate=fps)
        stream = ffmpeg.output(stream, str(path), format="mp4", vcodec="libx264", pix_fmt=pix_fmt, crf=int(crf),
                               threads=1, loglevel="error")
        try:
            ffmpeg.run(stream, cmd=imageio_ffmpeg.get_ffmpeg_exe(), input=np.ascontiguousarray(frames).tobytes(),
                       capture_stdout=True, capture_stderr=True, overwrite_output=True)
        except ffmpeg.Error as error:
            raise DegradeError(f"ffmpeg could not encode the {width}x{height} video: "
                               f"{(error.stderr or b'').decode(errors='replace').strip()[-300:]}") from error
        decoded = video.read_video(path)
    if decoded.shape != frames.shape:
        raise DegradeError(f"compression changed the video's shape {frames.shape} -> {decoded.shape}.")
    return decoded


def degrade(hr: np.ndarray, degradation: Degradation, scale: int, rng: np.random.Generator) -> np.ndarray:
    """The low-resolution video: ``[T, H, W, 3]`` uint8 (H, W multiples of ``scale``) -> ``[T, H/s, W/s, 3]``."""
    frames = hr.astype(np.float32)
    height, width = hr.shape[1:3]
    frames = _blur(frames, degradation.kernel1)
    mid = (max(2, round(height * degradation.resize1)), max(2, round(width * degradation.resize1)))
    frames = _resize(frames, *mid, degradation.interpolation1)
    frames = add_noise(frames, degradation.noise1, rng)
    if degradation.kernel2 is not None:
        frames = _blur(frames, degradation.kernel2)
    frames = _resize(frames, height // scale, width // scale, degradation.interpolation2)
    frames = add_noise(frames, degradation.noise2, rng)
    return compress(np.clip(np.round(frames), 0, 255).astype(np.uint8), degradation.crf)


def upsample(lowres: np.ndarray, height: int, width: int) -> np.ndarray:  # [T, h, w, 3] -> [T, H, W, 3]
    """Bicubic upsampling to the HR size: what the model eats (DOVE's input)."""
    return np.stack([cv2.resize(frame, (width, height), interpolation=cv2.INTER_CUBIC) for frame in lowres])


def crop_to_multiple(frames: np.ndarray, scale: int) -> np.ndarray:  # [T, H, W, 3] -> [T, H', W', 3]
    """Centre crop to the largest size whose sides are multiples of ``scale``."""
    height, width = frames.shape[1:3]
    top, left = (height % scale) // 2, (width % scale) // 2
    return frames[:, top:top + height - height % scale, left:left + width - width % scale]


# ----------------------------------------------------------------------------------------------------------
# The stage


def _check_scenes(scenes_dir: Path, scale: int, splits: tuple[str, ...]) -> list[tuple[str, str, scenes.Scene]]:
    split = scenes.load_split(scenes_dir)
    checked = []
    for split_name in splits:
        for name in split[split_name]:
            scene = scenes.load_scene(scenes_dir / name, load_images=False)
            if scene.height < scale or scene.width < scale:
                raise DegradeError(f"scene {scene.folder} is {scene.width} pixels wide and {scene.height} pixels "
                                   f"high, smaller than degrade.scale {scale} on a side; use a smaller scale or "
                                   "larger frames.")
            checked.append((name, split_name, scene))
    return checked


def _train_videos(params: Params) -> list[tuple[str, Path]]:
    """(name, path) of every DOVE training video, each probed (size against the scale) before any work."""
    listed = []
    for path in vsr.read_video_list(params.train_videos):
        try:
            info = video.probe_video(path)
        except video.MediaError as error:
            raise DegradeError(f"{path} (listed in {Path(params.train_videos) / vsr.VIDEO_LIST}) is not a "
                               f"readable video: {error}") from error
        if info.height < params.scale or info.width < params.scale:
            raise DegradeError(f"{path} is {info.width}x{info.height}, smaller than degrade.scale {params.scale}.")
        name = path.stem
        if any(name == other for other, _ in listed):
            raise DegradeError(f"{path}: two training videos are named {name!r}; the pairs are named by file stem.")
        listed.append((name, path))
    return listed


def run(params: Params, scenes_dir: str | Path, out_dir: str | Path, metrics_path: str | Path,
        plots_dir: str | Path, test_sets_dir: str | Path | None = None) -> dict:
    """Write the ``sr`` pairs folder ``out_dir`` and one test pairs folder per ``vsr_sets`` entry under
    ``test_sets_dir`` (each replaced atomically), sample videos and metrics.

    Args:
        params: the ``degrade:`` section.
        scenes_dir: the scene set: its test scenes (and, without ``train_videos``, its train scenes) degraded.
        out_dir: the pairs folder to (re)create, e.g. ``data/degrade/sr``.
        metrics_path: metrics JSON: PSNR of input vs target per video and the degradation drawn.
        plots_dir: folder (re)created with the sample videos (input | target).
        test_sets_dir: the folder (re)created with ``<label>/`` pairs folders, e.g. ``data/degrade/test_sets``;
            needed when ``vsr_sets`` is not empty.

    Returns:
        ``{"metrics": {...}, "videos": [paths]}``.
    """
    scenes_dir, out_dir, plots_dir = Path(scenes_dir), Path(out_dir), Path(plots_dir)
    if params.vsr_sets and test_sets_dir is None:
        raise DegradeError("degrade.vsr_sets names test sets but no folder was given for them (--test-sets).")
    checked = _check_scenes(scenes_dir, params.scale, ("test",) if params.train_videos else pairs.SPLITS)
    train_videos = _train_videos(params) if params.train_videos else []
    clash = sorted({name for name, _ in train_videos} & {name for name, _, _ in checked})
    if clash:
        raise DegradeError(f"training videos {clash} of {params.train_videos} have the names of test scenes of "
                           f"{scenes_dir}; the sr pairs are named by them: rename the videos.")
    for root in params.vsr_sets.values():
        vsr.index_vsr_set(root, params.vsr_lq_dir, params.scale)  # layout errors before any work
    targets = [out_dir, plots_dir] + ([Path(test_sets_dir)] if test_sets_dir is not None else [])

    per_video, videos, samples = {}, [], {}
    with video.staged_outputs(*targets) as (build, plots_build, *test_build):
        with pairs.PairsWriter(build, "sr", FPS) as writer:
            sources = [(name, "train", lambda path=path: video.read_video(path)) for name, path in train_videos]
            sources += [(name, split, scene.read_images) for name, split, scene in checked]
            for name, split, read in tqdm(sources, desc="degrade", unit="video", disable=None):
                target = crop_to_multiple(read(), params.scale)
                rng = scene_rng(params.seed, name)
                degradation = sample_degradation(params, rng)
                lowres = degrade(target, degradation, params.scale, rng)
                per_video[name] = _add(writer, name, split, lowres, target, samples, "sr")
                per_video[name]["degradation"] = degradation.describe()
            writer.commit()
        per_set = {}
        for label, root in params.vsr_sets.items():
            with pairs.PairsWriter(test_build[0] / label, "sr", FPS) as writer:
                scored = [_add(writer, name, "test", lowres, target, samples, label)
                          for name, target, lowres in vsr.iter_vsr_set(root, params.vsr_lq_dir, params.scale)]
                writer.commit()
            per_set[label] = {"pairs": len(scored),
                              "psnr_input": round(float(np.mean([s["psnr_input"] for s in scored])), 4)}
        for (group, split), (name, frames) in sorted(samples.items()):
            path = video.write_video(plots_build / f"{group}_{name}.mp4", frames, fps=FPS)
            videos.append(plots_dir / path.name)
    metrics = {"scale": params.scale, "pairs": len(per_video)}
    for split in pairs.SPLITS:
        values = [s["psnr_input"] for s in per_video.values() if s["split"] == split]
        metrics[f"{split}_pairs"] = len(values)
        metrics[f"psnr_input_{split}"] = round(float(np.mean(values)), 4) if values else None
    metrics["test_sets"] = per_set
    metrics["scenes"] = per_video
    video.write_json(metrics_path, metrics)
    return {"metrics": metrics, "videos": videos}


def _add(writer: pairs.PairsWriter, name: str, split: str, lowres: np.ndarray, target: np.ndarray,
         samples: dict, group: str) -> dict:
    """Write one pair (input = bicubic upsampling of ``lowres``); returns its statistics. The first pair of
    each (group, split) becomes a sample video."""
    model_input = upsample(lowres, *target.shape[1:3])
    writer.add(name, split, model_input, target, lowres=lowres)
    if (group, split) not in samples:
        samples[(group, split)] = (name, np.concatenate([model_input, target], axis=2))  # input | target
    return {"split": split, "psnr_input": round(measure.psnr(model_input, target), 4), "frames": len(target)}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--scenes", required=True, help="scene set folder, e.g. data/scenes")
    parser.add_argument("--out", required=True, help="pairs folder to (re)create, e.g. data/degrade/sr")
    parser.add_argument("--metrics", required=True, help="metrics JSON file, e.g. metrics/degrade.json")
    parser.add_argument("--plots", required=True, help="folder for the sample videos, e.g. plots/degrade")
    parser.add_argument("--test-sets", default=None,
                        help="folder of the vsr_sets' test pairs folders, e.g. data/degrade/test_sets")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        started = time.perf_counter()
        result = run(params, args.scenes, args.out, args.metrics, args.plots, args.test_sets)
        metrics = result["metrics"]
        tracker.log_metrics({key: value for key, value in metrics.items() if isinstance(value, (int, float))}
                            | {f"psnr_input/{name}": scene["psnr_input"] for name, scene in metrics["scenes"].items()}
                            | {f"psnr_input/{label}": entry["psnr_input"] for label, entry in metrics["test_sets"].items()}
                            | {"seconds": round(time.perf_counter() - started, 2)})
        for path in result["videos"]:
            tracker.log_video(path)
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

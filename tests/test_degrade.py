"""The degrade stage: the seeded degradation pipeline, the VSR test-set reader, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data

from stages import degrade
from stages.common import measure, pairs, scenes, video, vsr
from stages.common.params import ParamsError, params_from_mapping

PARAMS = degrade.Params(
    scale=4, kernel_size=(7, 21), blur_sigma=(0.2, 3.0), blur_sigma2=(0.2, 1.5), anisotropic_prob=0.5,
    second_blur_prob=0.8, resize_range=(0.3, 1.5), gaussian_noise_prob=0.5, noise_sigma=(1.0, 30.0),
    noise_sigma2=(1.0, 25.0), poisson_scale=(0.05, 3.0), poisson_scale2=(0.05, 2.5), crf=(18, 35), seed=0,
    train_videos=None, vsr_sets={}, vsr_lq_dir=None,
)


def photo_video(frames: int, height: int, width: int, shift: int = 0) -> np.ndarray:  # [T, H, W, 3] uint8
    """A crop of a real photograph panning right by two pixels a frame."""
    image = skimage.data.astronaut()
    return np.stack([image[100 + shift:100 + shift + height, 150 + 2 * t:150 + 2 * t + width] for t in range(frames)])


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    """Three scenes of 5 frames, 34 x 50 pixels (not multiples of 4: they get cropped), one held out."""
    folder = tmp_path_factory.mktemp("scenes")
    intrinsics = np.array([[40.0, 0, 25], [0, 40.0, 17], [0, 0, 1]])
    for index in range(3):
        scenes.write_scene(folder / f"scene_{index}", photo_video(5, 34, 50, shift=30 * index), intrinsics,
                           np.tile(np.eye(4), (5, 1, 1)))
    scenes.write_split(folder, ["scene_0", "scene_1"], ["scene_2"])
    return folder


def lowres_of(hr: np.ndarray, seed: int, name: str = "s", params=PARAMS) -> np.ndarray:
    rng = degrade.scene_rng(seed, name)
    return degrade.degrade(hr, degrade.sample_degradation(params, rng), params.scale, rng)


# ----------------------------------------------------------------------------------------------------------
# The degradation


def test_isotropic_and_axis_aligned_kernels_match_opencv_gaussians():
    one_d = cv2.getGaussianKernel(9, 1.7).ravel()
    np.testing.assert_allclose(degrade.blur_kernel(9, 1.7, 1.7, 0.0), np.outer(one_d, one_d), atol=1e-6)
    along_x, along_y = cv2.getGaussianKernel(11, 2.5).ravel(), cv2.getGaussianKernel(11, 0.8).ravel()
    np.testing.assert_allclose(degrade.blur_kernel(11, 2.5, 0.8, 0.0), np.outer(along_y, along_x), atol=1e-6)
    # turned a quarter turn, the wide axis is vertical
    np.testing.assert_allclose(degrade.blur_kernel(11, 2.5, 0.8, math.pi / 2), np.outer(along_x, along_y), atol=1e-6)
    kernel = degrade.blur_kernel(15, 3.0, 0.5, 0.6)
    assert abs(kernel.sum() - 1) < 1e-5 and not np.allclose(kernel, kernel.T)  # anisotropic, rotated


def test_noise_has_the_drawn_strength():
    rng = np.random.default_rng(0)
    flat = np.full((4, 64, 64, 3), 100.0, np.float32)
    gaussian = degrade.add_noise(flat, degrade.Noise("gaussian", 10.0), rng)
    assert abs(gaussian.std() - 10.0) < 0.3 and abs(gaussian.mean() - 100.0) < 0.3
    poisson = degrade.add_noise(flat, degrade.Noise("poisson", 2.0), rng)
    # shot noise at level x of 256 photons has std sqrt(x * 256) / 256 * 255, times the scale
    expected = 2.0 * math.sqrt(100 / 255 * 256) / 256 * 255
    assert abs(poisson.std() - expected) < 0.05 * expected and abs(poisson.mean() - 100.0) < 0.5


def test_degradation_is_deterministic_by_seed_and_lowres_is_a_quarter():
    hr = photo_video(5, 32, 48)
    first, second, other = lowres_of(hr, 0), lowres_of(hr, 0), lowres_of(hr, 1)
    assert first.shape == (5, 8, 12, 3) and first.dtype == np.uint8
    assert first.tobytes() == second.tobytes()  # same seed: identical bytes
    assert first.tobytes() != other.tobytes()  # another seed: another degradation
    assert lowres_of(hr, 0, "t").tobytes() != first.tobytes()  # and another scene name


def test_compression_changes_the_frames_more_at_higher_crf():
    lowres = photo_video(6, 16, 24)
    light, heavy = degrade.compress(lowres, 10), degrade.compress(lowres, 45)
    assert light.shape == heavy.shape == lowres.shape
    assert not np.array_equal(light, lowres)
    assert measure.psnr(heavy, lowres) < measure.psnr(light, lowres)
    assert measure.psnr(light, lowres) > 25  # still the same video
    odd = photo_video(3, 5, 7)  # odd sizes go through 4:4:4
    assert degrade.compress(odd, 30).shape == odd.shape


def test_crop_to_multiple_is_centred():
    frames = np.arange(2 * 11 * 14 * 3, dtype=np.uint8).reshape(2, 11, 14, 3)
    np.testing.assert_array_equal(degrade.crop_to_multiple(frames, 4), frames[:, 1:9, 1:13])


# ----------------------------------------------------------------------------------------------------------
# The stage


def run_stage(tmp: Path, scene_set: Path, params=PARAMS) -> dict:
    return degrade.run(params, scene_set, tmp / "sr", tmp / "metrics" / "degrade.json", tmp / "plots",
                       tmp / "test_sets")


def test_stage_writes_sr_pairs_from_the_scenes(tmp_path, scene_set):
    result = run_stage(tmp_path, scene_set)
    loaded = pairs.load_pairs(tmp_path / "sr")
    assert [(p["scene"], p["split"]) for p in loaded] == [("scene_0", "train"), ("scene_1", "train"),
                                                         ("scene_2", "test")]
    for pair in loaded:
        frames = pairs.read_pair(pair)
        hr = degrade.crop_to_multiple(video.read_frames(scene_set / pair["scene"] / "images"), 4)
        assert hr.shape == (5, 32, 48, 3) and (pair["height"], pair["width"]) == (32, 48)
        np.testing.assert_array_equal(frames["target"], hr)
        np.testing.assert_array_equal(frames["lowres"], lowres_of(hr, 0, pair["scene"]))  # seeded per scene
        np.testing.assert_array_equal(frames["input"], degrade.upsample(frames["lowres"], 32, 48))
        assert result["metrics"]["scenes"][pair["scene"]]["psnr_input"] == round(
            measure.psnr(frames["input"], frames["target"]), 4)
    metrics = json.loads((tmp_path / "metrics" / "degrade.json").read_text())
    assert metrics == result["metrics"] and metrics["train_pairs"] == 2 and metrics["test_pairs"] == 1
    assert 10 < metrics["psnr_input_train"] < 40
    assert 18 <= metrics["scenes"]["scene_0"]["degradation"]["crf"] <= 35
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["sr_scene_0.mp4", "sr_scene_2.mp4"]
    assert video.read_video(tmp_path / "plots" / "sr_scene_0.mp4").shape == (5, 32, 96, 3)  # input | target


def write_vsr_set(root: Path, gt_frames: int = 3, lq_frames: int = 3, lq_size=(4, 6),
                  lq_dirs=("LQ",)) -> Path:
    """A VSR test set in DOVE's folder-of-frames layout, written with cv2 (not the stage's writers)."""
    for name, shift in (("calendar", 0), ("walk", 40)):
        (root / "GT" / name).mkdir(parents=True)
        gt = photo_video(gt_frames, 16, 24, shift)
        for t, frame in enumerate(gt):
            cv2.imwrite(str(root / "GT" / name / f"{t:08d}.png"), frame[..., ::-1])
        for lq_dir in lq_dirs:
            (root / lq_dir / name).mkdir(parents=True)
            for t, frame in enumerate(gt[:lq_frames]):
                small = cv2.resize(frame, lq_size[::-1], interpolation=cv2.INTER_AREA)
                cv2.imwrite(str(root / lq_dir / name / f"{t:08d}.png"), small[..., ::-1])
    return root


def test_each_vsr_set_becomes_a_test_pairs_folder_of_its_own(tmp_path, scene_set):
    udm10, spmcs = write_vsr_set(tmp_path / "UDM10"), write_vsr_set(tmp_path / "SPMCS", gt_frames=2, lq_frames=2)
    params = dataclasses.replace(PARAMS, vsr_sets={"UDM10": str(udm10), "SPMCS": str(spmcs)})
    result = run_stage(tmp_path, scene_set, params)
    assert [(p["scene"], p["split"]) for p in pairs.load_pairs(tmp_path / "sr")] == [
        ("scene_0", "train"), ("scene_1", "train"), ("scene_2", "test")]  # the sr folder as without sets
    assert sorted(p.name for p in (tmp_path / "test_sets").iterdir()) == ["SPMCS", "UDM10"]
    loaded = pairs.load_pairs(tmp_path / "test_sets" / "UDM10")
    assert [(p["scene"], p["split"]) for p in loaded] == [("calendar", "test"), ("walk", "test")]
    frames = pairs.read_pair(loaded[1])
    gt = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted((udm10 / "GT" / "walk").iterdir())])
    lq = np.stack([cv2.imread(str(p))[..., ::-1] for p in sorted((udm10 / "LQ" / "walk").iterdir())])
    np.testing.assert_array_equal(frames["target"], gt)
    np.testing.assert_array_equal(frames["lowres"], lq)
    np.testing.assert_array_equal(frames["input"], degrade.upsample(lq, 16, 24))
    assert pairs.load_pairs(tmp_path / "test_sets" / "SPMCS")[0]["frames"] == 2
    assert result["metrics"]["test_sets"]["UDM10"]["pairs"] == 2 and "walk" not in result["metrics"]["scenes"]
    assert "bicubic" not in result["metrics"]["test_sets"]
    assert "UDM10_calendar.mp4" in {p.name for p in (tmp_path / "plots").iterdir()}


def test_vsr_sets_need_a_folder_for_their_pairs(tmp_path, scene_set):
    params = dataclasses.replace(PARAMS, vsr_sets={"UDM10": str(write_vsr_set(tmp_path / "UDM10"))})
    with pytest.raises(degrade.DegradeError, match="--test-sets"):
        degrade.run(params, scene_set, tmp_path / "sr", tmp_path / "m.json", tmp_path / "plots")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["UDM10"]


def test_write_vsr_set_is_read_back_by_the_reader(tmp_path):
    clips = {"a": photo_video(3, 18, 26), "b": photo_video(2, 16, 24, shift=7)}
    root = vsr.write_vsr_set(tmp_path / "set", clips, scale=4)
    read = {name: (gt, lq) for name, gt, lq in vsr.iter_vsr_set(root, None, 4)}
    np.testing.assert_array_equal(read["a"][0], clips["a"][:, 1:17, 1:25])  # centre crop to multiples of 4
    expected = np.stack([cv2.resize(f, (6, 4), interpolation=cv2.INTER_CUBIC) for f in clips["a"][:, 1:17, 1:25]])
    np.testing.assert_array_equal(read["a"][1], expected)
    assert read["b"][1].shape == (2, 4, 6, 3)
    with pytest.raises(vsr.VsrError, match="already exists"):
        vsr.write_vsr_set(root, clips, scale=4)


def test_dove_training_videos_give_the_train_pairs(tmp_path, scene_set):
    clips = {"clip_b": photo_video(6, 24, 32), "clip_a": photo_video(4, 24, 32, shift=9)}
    root = vsr.write_video_list(tmp_path / "dove", clips)
    assert (root / "videos.txt").read_text() == "videos/clip_b.mp4\nvideos/clip_a.mp4\n"
    result = run_stage(tmp_path, scene_set, dataclasses.replace(PARAMS, train_videos=str(root)))
    loaded = pairs.load_pairs(tmp_path / "sr")
    assert [(p["scene"], p["split"], p["frames"]) for p in loaded] == [
        ("clip_a", "train", 4), ("clip_b", "train", 6), ("scene_2", "test", 5)]  # the scenes' test split stays
    frames = pairs.read_pair(loaded[1])
    np.testing.assert_array_equal(frames["target"], video.read_video(root / "videos" / "clip_b.mp4"))
    assert np.abs(frames["target"].astype(int) - clips["clip_b"]).mean() < 4  # H.264 at CRF 18
    np.testing.assert_array_equal(frames["lowres"], lowres_of(frames["target"], 0, "clip_b"))
    assert result["metrics"]["train_pairs"] == 2


@pytest.mark.parametrize("edit, message", [
    (lambda root: (root / "videos.txt").unlink(), "videos.txt not found"),
    (lambda root: (root / "videos.txt").write_text("videos/clip.mp4\nvideos/gone.mp4\n"), "line 2: 'videos/gone.mp4'"),
    (lambda root: (root / "videos.txt").write_text("\n"), "lists no video"),
    (lambda root: (root / "videos" / "clip.mp4").write_bytes(b"not a video"), "not a readable video"),
    (lambda root: (root / "videos" / "clip.mp4").rename(root / "videos" / "scene_2.mp4")  # returns the new path
     and (root / "videos.txt").write_text("videos/scene_2.mp4\n"), r"\['scene_2'\] .* have the names of test scenes"),
])
def test_a_broken_training_folder_is_rejected_before_any_output(tmp_path, scene_set, edit, message):
    root = vsr.write_video_list(tmp_path / "dove", {"clip": photo_video(3, 16, 24)})
    edit(root)
    with pytest.raises((vsr.VsrError, degrade.DegradeError), match=message):
        run_stage(tmp_path / "out", scene_set, dataclasses.replace(PARAMS, train_videos=str(root)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, lq_dir, message", [
    ({"lq_frames": 2}, None, "mismatched frame counts: 3 GT frames but 2 LQ"),
    ({"lq_size": (5, 6)}, None, "scale not dividing"),
    ({"lq_dirs": ("LQ", "BIx4")}, None, r"\['LQ', 'BIx4'\].*set degrade.vsr_lq_dir"),
    ({"lq_dirs": ("LQ",)}, "BDx4", "is not a folder"),
])
def test_a_broken_vsr_set_is_rejected_before_any_output(tmp_path, scene_set, kwargs, lq_dir, message):
    root = write_vsr_set(tmp_path / "set", **kwargs)
    with pytest.raises(vsr.VsrError, match=message):
        run_stage(tmp_path, scene_set, dataclasses.replace(PARAMS, vsr_sets={"UDM10": str(root)}, vsr_lq_dir=lq_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # nothing written, no temporaries


def test_vsr_videos_on_one_side_only_are_named(tmp_path):
    root = write_vsr_set(tmp_path / "set")
    (root / "GT" / "extra").mkdir()
    with pytest.raises(vsr.VsrError, match=r"only in GT: \['extra'\]"):
        vsr.index_vsr_set(root, None, 4)


def test_a_failure_mid_run_keeps_the_previous_output(tmp_path, scene_set, monkeypatch):
    run_stage(tmp_path, scene_set)
    before = {p: p.read_bytes() for p in (tmp_path / "sr").rglob("*") if p.is_file()}

    def broken(frames, crf, fps=24):
        raise degrade.DegradeError("ffmpeg could not encode")

    monkeypatch.setattr(degrade, "compress", broken)
    with pytest.raises(degrade.DegradeError, match="could not encode"):
        run_stage(tmp_path, scene_set)
    assert {p: p.read_bytes() for p in (tmp_path / "sr").rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_scenes_smaller_than_the_scale_are_rejected(tmp_path):
    small = tmp_path / "scenes"
    for name in ("a", "b"):
        scenes.write_scene(small / name, photo_video(2, 12, 20), np.array([[9.0, 0, 10], [0, 9.0, 6], [0, 0, 1]]),
                           np.tile(np.eye(4), (2, 1, 1)))
    scenes.write_split(small, ["a"], ["b"])
    with pytest.raises(degrade.DegradeError, match="12 pixels high, smaller than degrade.scale 16"):
        run_stage(tmp_path / "out", small, dataclasses.replace(PARAMS, scale=16))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, message", [
    ("crf", [30, 20], "degrade.crf"), ("crf", [10, 60], "degrade.crf"), ("scale", 0, "degrade.scale"),
    ("kernel_size", [8, 21], "degrade.kernel_size"), ("blur_sigma", [0.0, 1.0], "degrade.blur_sigma"),
    ("noise_sigma", [5.0, 1.0], "degrade.noise_sigma"), ("gaussian_noise_prob", 1.5, "gaussian_noise_prob"),
    ("vsr_lq_dir", "../LQ", "degrade.vsr_lq_dir"), ("crf", [18.5, 30], "degrade.crf"),
    ("vsr_sets", {"UDM-10": "x"}, "degrade.vsr_sets"), ("vsr_sets", {"sr": "x"}, "other than sr"),
])
def test_bad_params_name_the_key(key, value, message):
    values = {**dataclasses.asdict(PARAMS), key: value}
    with pytest.raises(ParamsError, match=message):
        params_from_mapping("degrade", degrade.Params, values)

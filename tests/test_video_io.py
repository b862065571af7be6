"""Video and frame-folder I/O: round trips checked against independent readers, and every bad input."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio

from stages.common import video
from stages.common.video import MediaError, MediaNotFoundError


def moving_photo(frames: int, height: int, width: int) -> np.ndarray:  # [T, H, W, 3] uint8
    """A real photograph panning sideways: natural content, like the scenes the stages write."""
    photo = cv2.resize(skimage.data.astronaut(), (width * 2, height), interpolation=cv2.INTER_AREA)
    photo = cv2.GaussianBlur(photo, (0, 0), 1.5)  # 4:2:0 chroma cannot hold single-pixel colour detail
    return np.stack([photo[:, 2 * t: 2 * t + width] for t in range(frames)])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("frames,height,width", [(9, 32, 48), (1, 32, 48), (5, 33, 47)])
def test_mp4_round_trip_keeps_shape_and_quality(tmp_path, frames, height, width):
    clip = moving_photo(frames, height, width)
    path = video.write_video(tmp_path / "sub" / "clip.mp4", clip, fps=12, crf=18)
    back = video.read_video(path)
    assert back.shape == clip.shape and back.dtype == np.uint8
    # 4:2:0 chroma (even sizes) costs a few dB at these tiny sizes; odd sizes are stored 4:4:4.
    assert peak_signal_noise_ratio(clip, back) > (30 if height % 2 == 0 else 34)
    # A second decoder (PyAV, its own ffmpeg libraries) sees the same frame count and size.
    import av

    with av.open(str(path)) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == frames and decoded[0].shape == clip.shape[1:]
    assert video.probe_video(path) == video.VideoInfo(width=width, height=height, fps=12.0, frames=frames)
    assert leftovers(path.parent) == []


def test_mp4_reads_videos_written_by_another_encoder(tmp_path):
    clip = moving_photo(6, 32, 48)
    writer = cv2.VideoWriter(str(tmp_path / "cv.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (48, 32))
    for frame in clip:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    back = video.read_video(tmp_path / "cv.mp4")
    assert back.shape == clip.shape
    assert peak_signal_noise_ratio(clip, back) > 25


def test_mp4_missing_and_corrupt_files_name_the_path(tmp_path):
    with pytest.raises(MediaNotFoundError, match=r"Video not found: .*nothing\.mp4"):
        video.read_video(tmp_path / "nothing.mp4")
    assert issubclass(MediaNotFoundError, FileNotFoundError) and issubclass(MediaNotFoundError, ValueError)
    corrupt = tmp_path / "random.mp4"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(MediaError, match=r"random\.mp4 is corrupt or not a video"):
        video.read_video(corrupt)
    with pytest.raises(ValueError, match="corrupt"):
        video.probe_video(corrupt)


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.99])
def test_mp4_truncated_file_is_an_error_not_a_short_video(tmp_path, keep):
    path = video.write_video(tmp_path / "clip.mp4", moving_photo(20, 32, 48))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # faststart: the index survives, some frames do not
    with pytest.raises(MediaError, match=r"clip\.mp4 .*(corrupt|truncated)"):
        video.read_video(path)


@pytest.mark.parametrize("frames,match", [
    (np.zeros((4, 8, 8, 3), np.float32), "dtype uint8"),
    (np.zeros((4, 8, 8), np.uint8), r"shape \[T, H, W, 3\]"),
    (np.zeros((0, 8, 8, 3), np.uint8), "empty dimension"),
    ([[0]], "numpy array"),
])
def test_write_video_rejects_bad_frames(tmp_path, frames, match):
    with pytest.raises(MediaError, match=match):
        video.write_video(tmp_path / "x.mp4", frames)
    assert list(tmp_path.iterdir()) == []


def test_write_video_rejects_bad_settings(tmp_path):
    clip = moving_photo(2, 16, 16)
    with pytest.raises(MediaError, match="fps must be > 0"):
        video.write_video(tmp_path / "x.mp4", clip, fps=0)
    with pytest.raises(MediaError, match=r"crf must be an integer in \[0, 51\]"):
        video.write_video(tmp_path / "x.mp4", clip, crf=60)


def test_write_video_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"previous")
    monkeypatch.setattr(video, "_ffmpeg_exe", lambda: "false")  # an encoder that always fails
    with pytest.raises(MediaError, match="ffmpeg failed to encode"):
        video.write_video(target, moving_photo(2, 16, 16))
    assert target.read_bytes() == b"previous" and leftovers(tmp_path) == []


def test_frame_folder_round_trip_is_exact(tmp_path):
    clip = np.random.default_rng(1).integers(0, 256, (12, 9, 7, 3), dtype=np.uint8)
    paths = video.write_frames(tmp_path / "frames", clip)
    assert [p.name for p in paths][:2] == ["frame_00001.png", "frame_00002.png"]
    np.testing.assert_array_equal(video.read_frames(tmp_path / "frames"), clip)
    # Independent reader: OpenCV directly, BGR on disk.
    np.testing.assert_array_equal(cv2.imread(str(paths[3]))[..., ::-1], clip[3])
    labels = np.random.default_rng(2).integers(0, 2**16, (3, 5, 6), dtype=np.uint16)
    video.write_frames(tmp_path / "labels", labels)
    np.testing.assert_array_equal(video.read_frames(tmp_path / "labels", labels=True), labels)
    assert leftovers(tmp_path) == []


def test_frame_folders_sort_numerically(tmp_path):
    for number in (10, 2, 1, 33):
        cv2.imwrite(str(tmp_path / f"f_{number}.png"), np.full((4, 4, 3), number, np.uint8))
    assert [p.name for p in video.list_frames(tmp_path)] == ["f_1.png", "f_2.png", "f_10.png", "f_33.png"]
    assert video.read_frames(tmp_path)[:, 0, 0, 0].tolist() == [1, 2, 10, 33]


def test_frame_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="Frame folder not found"):
        video.read_frames(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match=r"empty.* is empty"):
        video.read_frames(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    cv2.imwrite(str(mixed / "frame_1.png"), np.zeros((4, 6, 3), np.uint8))
    cv2.imwrite(str(mixed / "frame_2.png"), np.zeros((5, 6, 3), np.uint8))
    with pytest.raises(MediaError, match=r"differ in size: frame_1\.png is \(4, 6, 3\), frame_2\.png is"):
        video.read_frames(mixed)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "frame_1.png").write_bytes(b"not a png")
    with pytest.raises(MediaError, match=r"frame_1\.png is corrupt"):
        video.read_frames(broken)
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    cv2.imwrite(str(nameless / "cover.png"), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MediaError, match="has no number in its name"):
        video.read_frames(nameless)
    clash = tmp_path / "clash"
    clash.mkdir()
    for name in ("frame_1.png", "frame_01.png"):
        cv2.imwrite(str(clash / name), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(MediaError, match="have the same number 1"):
        video.read_frames(clash)


def test_write_frames_refuses_to_mix_into_an_existing_folder(tmp_path):
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "old.png").write_bytes(b"x")
    with pytest.raises(MediaError, match="already exists and is not an empty folder"):
        video.write_frames(tmp_path / "frames", np.zeros((2, 4, 4, 3), np.uint8))
    assert sorted(os.listdir(tmp_path / "frames")) == ["old.png"]


def test_write_frames_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    real_imwrite = cv2.imwrite

    def failing_imwrite(path, image):
        calls.append(path)
        return len(calls) < 3 and real_imwrite(path, image)  # the third frame fails

    monkeypatch.setattr(video.cv2, "imwrite", failing_imwrite)
    with pytest.raises(MediaError, match="could not write the PNG"):
        video.write_frames(tmp_path / "frames", np.zeros((5, 4, 4, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


def old_output(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "old.txt").write_text("old")
    return folder


def test_staged_outputs_swap_every_folder_in(tmp_path):
    out, plots = old_output(tmp_path / "out"), tmp_path / "plots"  # one replaced, one new
    with video.staged_outputs(out, plots) as (out_build, plots_build):
        assert list(out_build.iterdir()) == [] and out_build.parent == tmp_path and out.exists()
        (out_build / "new.txt").write_text("new")
        (plots_build / "plot.txt").write_text("plot")
    assert sorted(os.listdir(out)) == ["new.txt"] and sorted(os.listdir(plots)) == ["plot.txt"]
    assert leftovers(tmp_path) == []  # the build folders and the old copy are gone


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_staged_outputs_failure_leaves_the_old_folders(tmp_path, error):
    out, plots = old_output(tmp_path / "out"), tmp_path / "plots"
    with pytest.raises(type(error)), video.staged_outputs(out, plots) as (out_build, plots_build):
        (out_build / "new.txt").write_text("new")
        (plots_build / "plot.txt").write_text("plot")
        raise error
    assert sorted(os.listdir(out)) == ["old.txt"] and not plots.exists()
    assert leftovers(tmp_path) == []


def test_staged_outputs_build_a_folder_inside_another_with_it(tmp_path):
    out = old_output(tmp_path / "out")
    with video.staged_outputs(out, out / "videos") as (out_build, videos_build):
        assert videos_build == out_build / "videos" and videos_build.is_dir()
        (videos_build / "a.mp4").write_text("a")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["videos", "videos/a.mp4"]
    assert leftovers(tmp_path) == []


def test_staged_outputs_reject_a_file_and_a_folder_given_twice(tmp_path):
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(MediaError, match="exists and is not a folder"), \
            video.staged_outputs(tmp_path / "out", tmp_path / "file"):
        pass
    with pytest.raises(MediaError, match="is given twice"), \
            video.staged_outputs(tmp_path / "out", tmp_path / "x" / ".." / "out"):
        pass
    assert sorted(os.listdir(tmp_path)) == ["file"]


@settings(max_examples=25, deadline=None)
@given(frames=st.integers(1, 3), height=st.integers(1, 5), width=st.integers(1, 5), seed=st.integers(0, 9999))
def test_tensor_round_trip_is_exact(frames, height, width, seed):
    clip = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    tensor = video.to_tensor(clip)
    assert tensor.shape == (3, frames, height, width) and tensor.dtype == torch.float32
    # Independent formula: channel c of frame t is clip[t, ..., c] mapped 0..255 -> -1..1.
    np.testing.assert_allclose(tensor[1, -1].numpy(), clip[-1, :, :, 1] / 127.5 - 1.0, atol=1e-6)
    np.testing.assert_array_equal(video.from_tensor(tensor), clip)


def test_tensor_levels_and_range():
    levels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=3)
    tensor = video.to_tensor(levels)
    assert tensor.min() == -1.0 and tensor.max() == 1.0
    np.testing.assert_array_equal(video.from_tensor(tensor), levels)
    out_of_range = torch.tensor([-3.0, 2.0, 0.0]).reshape(3, 1, 1, 1)
    assert video.from_tensor(out_of_range).reshape(-1).tolist() == [0, 255, 128]  # clamped, rounded


def test_tensor_conversions_reject_bad_input():
    with pytest.raises(MediaError, match=r"batch \[B, 3, T, H, W\]"):
        video.from_tensor(torch.zeros(1, 3, 2, 4, 4))
    with pytest.raises(MediaError, match="floating-point"):
        video.from_tensor(torch.zeros(3, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(MediaError, match="dtype uint8"):
        video.to_tensor(np.zeros((2, 4, 4, 3), np.float32))


def test_match_frames_pairs_folders_by_name(tmp_path):
    for folder, numbers in (("input", (0, 1, 2, 3)), ("target", (0, 1, 2, 3)), ("mask", (0, 2, 3, 4))):
        (tmp_path / folder).mkdir()
        for number in numbers:
            cv2.imwrite(str(tmp_path / folder / f"{number:05d}.png"), np.zeros((4, 4, 3), np.uint8))
    listed = video.match_frames({"input": tmp_path / "input", "target": tmp_path / "target"})
    assert [p.name for p in listed["target"]] == ["00000.png", "00001.png", "00002.png", "00003.png"]
    with pytest.raises(MediaError, match=r"mask/ lacks 00001 \(present in .*input/\); .*mask/ has 00004, which"):
        video.match_frames({"input": tmp_path / "input", "mask": tmp_path / "mask"})


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=64))
def test_16_bit_pixels_come_back_as_their_8_bit_levels(levels):
    from chopgrad.metrics.files import pixels_to_uint8

    eight = np.array(levels, np.uint8)
    assert (pixels_to_uint8(eight.astype(np.uint16) * 257) == eight).all()  # 257 k -> k, 65535 -> 255
    full = np.arange(0, 65536, 7, dtype=np.uint16)
    assert (pixels_to_uint8(full) == np.round(full / 65535 * 255)).all()
    if 0 < eight.max():
        with pytest.raises(ValueError, match="8-bit values stored in a 16-bit file"):
            pixels_to_uint8(eight.astype(np.uint16))


def test_a_16_bit_colour_png_reads_as_its_8_bit_levels_not_black(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (5, 7, 3)).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "deep.png"), rgb[..., ::-1].astype(np.uint16) * 257)
    np.testing.assert_array_equal(video.read_image(tmp_path / "deep.png"), rgb)
    cv2.imwrite(str(tmp_path / "shallow.png"), rgb[..., ::-1].astype(np.uint16))
    with pytest.raises(MediaError, match=r"shallow\.png is a 16-bit image .* Re-save it as 8-bit"):
        video.read_image(tmp_path / "shallow.png")

"""The masks stage: mask geometry, the seeded object choice, the ROVI reader, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from stages import masks
from stages.common import pairs, scenes, video, waymo
from stages.common.params import ParamsError, params_from_mapping

PARAMS = masks.Params(fill=127, object_fraction=0.5, dilation=0, seed=0, scene_dir=None, image_dir=None,
                      waymo_path=None, waymo_camera="FRONT",
                      waymo_train_split="training", waymo_test_split="validation", waymo_train_segments=None,
                      waymo_test_segments=None, waymo_frames=0, rovi_path=None, rovi_frames=0, rovi_size=None)
FRAMES, HEIGHT, WIDTH = 4, 16, 24


def textured(frames: int, height: int, width: int, seed: int) -> np.ndarray:  # [T, H, W, 3] uint8
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def write_set(folder: Path, count: int = 3) -> Path:
    """Scenes scene_0.. in the nerfstudio layout (the last one held out): frames only, as real DL3DV."""
    intrinsics = np.array([[20.0, 0, 12], [0, 20.0, 8], [0, 0, 1]])
    names = [f"scene_{index}" for index in range(count)]
    for index, name in enumerate(names):
        scenes.write_scene(folder / name, textured(FRAMES, HEIGHT, WIDTH, index), intrinsics,
                           np.tile(np.eye(4), (FRAMES, 1, 1)))
    scenes.write_split(folder, names[:-1], names[-1:])
    return folder


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    return write_set(tmp_path_factory.mktemp("scenes"))


FRONT = waymo.CameraName.FRONT
VEHICLE, PEDESTRIAN = waymo.BoxType.TYPE_VEHICLE, waymo.BoxType.TYPE_PEDESTRIAN


def vehicle_boxes(t: int, vehicles: int) -> list[waymo.Box2d]:
    """Vehicle k: a box moving right by one pixel a frame, with fractional edges; vehicle 0 leaves after
    frame 1 (a vehicle out of view is masked only where seen); a pedestrian in every frame (never masked)."""
    boxes = [waymo.Box2d(f"car{k}", VEHICLE, (4.5 + 9 * (k // 3) + t, 3.25 + 5 * (k % 3)), (5.0, 3.5))
             for k in range(vehicles) if k or t < 2]
    return boxes + [waymo.Box2d("walker", PEDESTRIAN, (20.0, 12.0), (3.0, 5.0))]


def write_waymo(root: Path, vehicles_per_segment: dict[str, tuple[str, int]]) -> Path:
    """Segments of one FRONT camera in the v2 schema (stages.common.waymo.write_segment): segment -> (split, vehicles)."""
    camera = waymo.CameraCalibration(FRONT, np.array([[20.0, 0, 12], [0, 20.0, 8], [0, 0, 1]]), np.zeros(5),
                                     np.eye(4), WIDTH, HEIGHT)
    for index, (name, (split, vehicles)) in enumerate(vehicles_per_segment.items()):
        images = textured(FRAMES, HEIGHT, WIDTH, 10 + index)
        frames = [waymo.Frame(1552440195000000 + 100_000 * t, np.eye(4), {FRONT: images[t]},
                              boxes_2d={FRONT: vehicle_boxes(t, vehicles)}) for t in range(FRAMES)]
        waymo.write_segment(root, split, name, frames, [camera])
    return root


SEGMENTS = {"seg_a": ("training", 4), "seg_b": ("training", 3), "seg_c": ("validation", 2)}


@pytest.fixture(scope="module")
def waymo_set(tmp_path_factory) -> Path:
    return write_waymo(tmp_path_factory.mktemp("waymo"), SEGMENTS)


def run_stage(tmp: Path, scene_set: Path, params=PARAMS) -> dict:
    return masks.run(params, scene_set, tmp / "masks", tmp / "metrics" / "masks.json", tmp / "plots")


# ----------------------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("height, width", [(16, 24), (64, 96), (15, 23), (9, 8)])
def test_box_is_half_the_height_and_width_and_centred(height, width):
    mask = masks.box_mask(3, height, width)
    rows, cols = np.nonzero(mask[0].any(axis=1))[0], np.nonzero(mask[0].any(axis=0))[0]
    assert len(rows) == height // 2 and len(cols) == width // 2
    assert mask[0].sum() == (height // 2) * (width // 2)  # a solid rectangle
    assert abs(rows[0] - (height - 1 - rows[-1])) <= 1 and abs(cols[0] - (width - 1 - cols[-1])) <= 1
    if height % 2 == 0 and width % 2 == 0:
        assert rows[0] == height - 1 - rows[-1] and cols[0] == width - 1 - cols[-1]  # exactly centred
    assert (mask == mask[0]).all()  # every frame


@pytest.mark.parametrize("count", range(1, 9))
def test_object_choice_is_a_seeded_half_and_at_least_one(count):
    labels = list(range(3, 3 + count))
    chosen = masks.choose_objects(labels, 0.5, masks.scene_rng(0, "a"))
    assert chosen == masks.choose_objects(labels, 0.5, masks.scene_rng(0, "a"))  # seeded
    assert len(chosen) == max(1, int(count / 2 + 0.5)) and set(chosen) <= set(labels)
    assert chosen == sorted(set(chosen))
    draws = {tuple(masks.choose_objects(labels, 0.5, masks.scene_rng(seed, "a"))) for seed in range(40)}
    assert len(draws) > 1 or count == 1  # the seed matters


def test_object_choice_of_nothing_is_an_error():
    with pytest.raises(masks.MaskError, match="no labelled objects"):
        masks.choose_objects([], 0.5, masks.scene_rng(0, "a"))


def dilate_oracle(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Brute force: a pixel is in the dilation if some mask pixel is within Chebyshev distance ``pixels``."""
    out = np.zeros_like(mask)
    for t, i, j in zip(*np.nonzero(mask)):
        out[t, max(0, i - pixels):i + pixels + 1, max(0, j - pixels):j + pixels + 1] = True
    return out


def boxes_oracle(segment: waymo.Segment, chosen: list[str]) -> np.ndarray:  # -> [T, H, W] bool
    """Brute force: a pixel [i, i + 1) x [j, j + 1) is masked if it overlaps a chosen box (open intervals)."""
    out = np.zeros((segment.num_frames, HEIGHT, WIDTH), bool)
    for t, boxes in enumerate(segment.boxes_2d):
        for box in boxes:
            if box.object_id in chosen:
                (u, v), (w, h) = box.center, box.size
                for i in range(HEIGHT):
                    for j in range(WIDTH):
                        out[t, i, j] |= (i < v + h / 2 and i + 1 > v - h / 2 and j < u + w / 2 and j + 1 > u - w / 2)
    return out


def test_box_pixels_cover_every_pixel_the_box_overlaps_and_clip_to_the_frame():
    assert masks.box_pixels((5.5, 3.0), (3.0, 2.0), 16, 24) == (slice(2, 4), slice(4, 7))  # whole pixels
    assert masks.box_pixels((5.25, 3.0), (3.0, 2.5), 16, 24) == (slice(1, 5), slice(3, 7))  # partial ones too
    assert masks.box_pixels((1.0, 15.0), (6.0, 6.0), 16, 24) == (slice(12, 16), slice(0, 4))  # clipped
    rows, cols = masks.box_pixels((40.0, 3.0), (4.0, 2.0), 16, 24)  # wholly outside: empty
    assert np.zeros((16, 24))[rows, cols].size == 0


@pytest.mark.parametrize("dilation", [0, 1, 3])
def test_waymo_bbox_masks_cover_exactly_the_chosen_vehicles_boxes(waymo_set, dilation):
    segment = waymo.read_segment(waymo_set, "training", "seg_a")
    assert masks.vehicle_ids(segment, FRAMES) == ["car0", "car1", "car2", "car3"]  # not the pedestrian
    mask = masks.waymo_bbox_mask(segment, ["car0", "car3"], FRAMES, dilation)
    np.testing.assert_array_equal(mask, dilate_oracle(boxes_oracle(segment, ["car0", "car3"]), dilation))
    assert not mask[2:].any() or mask[2:].sum() < mask[:2].sum()  # car0 has left after frame 1
    if dilation == 0:
        assert not mask[:, 10:, 18:].any()  # the pedestrian's box stays unmasked


# ----------------------------------------------------------------------------------------------------------
# The stage


def check_pair(pair: dict, expected_mask: np.ndarray, target: np.ndarray, fill: int) -> None:
    frames = pairs.read_pair(pair)
    np.testing.assert_array_equal(frames["target"], target)
    np.testing.assert_array_equal(frames["mask"], np.where(expected_mask, 255, 0))
    np.testing.assert_array_equal(frames["input"][~expected_mask], target[~expected_mask])
    assert (frames["input"][expected_mask] == fill).all()


def with_waymo(root: Path, **changes) -> masks.Params:
    return dataclasses.replace(PARAMS, **{"waymo_path": str(root), **changes})


def test_stage_writes_box_pairs_from_scenes_and_waymo_bbox_pairs_from_segments(tmp_path, scene_set, waymo_set):
    params = with_waymo(waymo_set, dilation=1, fill=0)
    result = run_stage(tmp_path, scene_set, params)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["inpaint_box", "inpaint_box_waymo",
                                                                      "inpaint_objects"]
    box_pairs = pairs.load_pairs(tmp_path / "masks" / "inpaint_box")
    assert [(p["scene"], p["split"]) for p in box_pairs] == [("scene_0", "train"), ("scene_1", "train"),
                                                             ("scene_2", "test")]
    assert all(p["prompt"] is None and p["lowres"] is None for p in box_pairs)
    for pair in box_pairs:
        check_pair(pair, masks.box_mask(FRAMES, HEIGHT, WIDTH),
                   video.read_frames(scene_set / pair["scene"] / "images"), 0)

    object_pairs = pairs.load_pairs(tmp_path / "masks" / "inpaint_objects")
    assert [(p["scene"], p["split"]) for p in object_pairs] == [("seg_a", "train"), ("seg_b", "train"),
                                                                ("seg_c", "test")]
    assert result["chosen"]["seg_a"] == masks.choose_objects(["car0", "car1", "car2", "car3"], 0.5,
                                                             masks.scene_rng(0, "seg_a"))
    assert [len(result["chosen"][name]) for name in SEGMENTS] == [2, 2, 1]  # half, rounded half up, at least 1
    for pair in object_pairs:
        folder = "validation" if pair["split"] == "test" else "training"
        segment = waymo.read_segment(waymo_set, folder, pair["scene"])
        expected = dilate_oracle(boxes_oracle(segment, result["chosen"][pair["scene"]]), 1)
        check_pair(pair, expected, segment.read_images(), 0)  # the decoded JPEGs are the ground truth

    waymo_box = pairs.load_pairs(tmp_path / "masks" / "inpaint_box_waymo")  # the central box on every segment
    assert [(p["scene"], p["split"]) for p in waymo_box] == [("seg_a", "train"), ("seg_b", "train"), ("seg_c", "test")]
    segment = waymo.read_segment(waymo_set, "training", "seg_b")
    check_pair(waymo_box[1], masks.box_mask(FRAMES, HEIGHT, WIDTH), segment.read_images(), 0)

    assert pairs.load_manifest(tmp_path / "masks" / "inpaint_objects")["fps"] == 10  # the segments' 10 Hz
    metrics = json.loads((tmp_path / "metrics" / "masks.json").read_text())
    assert metrics == result["metrics"] and metrics["inpaint_box_waymo"]["pairs"] == 3
    assert metrics["inpaint_box"]["mask_area_fraction"] == 0.25 and metrics["inpaint_box"]["pairs"] == 3
    assert 0 < metrics["inpaint_objects"]["mask_area_fraction"] < 0.5
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "inpaint_box_scene_0.mp4", "inpaint_box_scene_2.mp4", "inpaint_box_waymo_seg_a.mp4",
        "inpaint_box_waymo_seg_c.mp4", "inpaint_objects_seg_a.mp4", "inpaint_objects_seg_c.mp4"]
    sample = video.read_video(tmp_path / "plots" / "inpaint_box_scene_0.mp4")
    assert sample.shape == (FRAMES, HEIGHT, 3 * WIDTH, 3)  # masked | mask | target

    again = tmp_path / "again"
    assert run_stage(again, scene_set, params)["chosen"] == result["chosen"]  # deterministic
    for a, b in zip(sorted((tmp_path / "masks").rglob("*.png")), sorted((again / "masks").rglob("*.png"))):
        assert a.read_bytes() == b.read_bytes()


def test_a_dl3dv_benchmark_set_gives_the_box_pairs_at_its_images_4_size(tmp_path, scene_set):
    dl3dv = tmp_path / "dl3dv"  # DL3DV-Benchmark's nesting: <scene>/nerfstudio/transforms.json, a resized copy
    intrinsics = np.array([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]])
    for index, name in enumerate(["9a1b", "7c2d"]):
        frames = textured(FRAMES, 32, 48, 20 + index)
        root = dl3dv / name / "nerfstudio"
        scenes.write_scene(root, frames, intrinsics, np.tile(np.eye(4), (FRAMES, 1, 1)))
        for path in sorted((root / "images").iterdir()):
            (root / "images_4").mkdir(exist_ok=True)
            small = cv2.resize(video.read_image(path), (24, 16), interpolation=cv2.INTER_AREA)
            video.write_image(root / "images_4" / path.name, small)
    scenes.write_split(dl3dv, ["9a1b"], ["7c2d"])
    params = dataclasses.replace(PARAMS, scene_dir=str(dl3dv), image_dir="images_4")
    run_stage(tmp_path, scene_set, params)  # --scenes is the embedded set; scene_dir wins
    loaded = pairs.load_pairs(tmp_path / "masks" / "inpaint_box")
    assert [(p["scene"], p["split"], p["height"], p["width"]) for p in loaded] == [("9a1b", "train", 16, 24),
                                                                                 ("7c2d", "test", 16, 24)]
    target = video.read_frames(dl3dv / "7c2d" / "nerfstudio" / "images_4")
    check_pair(loaded[1], masks.box_mask(FRAMES, 16, 24), target, PARAMS.fill)
    with pytest.raises(ParamsError, match="masks.scene_dir"):
        params_from_mapping("masks", masks.Params, {**dataclasses.asdict(PARAMS), "scene_dir": str(tmp_path / "no")})


def test_segment_lists_choose_the_split_and_first_frames_are_kept(tmp_path, scene_set, waymo_set):
    (tmp_path / "train.txt").write_text("# the paper's 230, here one\nseg_b\n")
    (tmp_path / "test.txt").write_text("seg_a\n")
    params = with_waymo(waymo_set, waymo_train_segments=str(tmp_path / "train.txt"),
                        waymo_test_segments=str(tmp_path / "test.txt"), waymo_test_split="training", waymo_frames=2)
    run_stage(tmp_path, scene_set, params)
    loaded = pairs.load_pairs(tmp_path / "masks" / "inpaint_objects")
    assert [(p["scene"], p["split"], p["frames"]) for p in loaded] == [("seg_b", "train", 2), ("seg_a", "test", 2)]


def test_segments_without_a_vehicle_in_view_are_left_out(tmp_path, scene_set):
    root = write_waymo(tmp_path / "waymo", {"seg_a": ("training", 2), "seg_b": ("training", 0),
                                            "seg_c": ("validation", 1)})
    result = run_stage(tmp_path, scene_set, with_waymo(root))
    assert [p["scene"] for p in pairs.load_pairs(tmp_path / "masks" / "inpaint_objects")] == ["seg_a", "seg_c"]
    assert result["metrics"]["inpaint_objects"]["segments_without_vehicles"] == 1


def test_a_failure_mid_run_keeps_the_previous_output(tmp_path, scene_set, waymo_set):
    run_stage(tmp_path, scene_set, with_waymo(waymo_set))
    before = {p: p.read_bytes() for p in (tmp_path / "masks").rglob("*") if p.is_file()}
    empty = write_waymo(tmp_path / "empty", {"seg_a": ("training", 0), "seg_c": ("validation", 0)})
    with pytest.raises(masks.MaskError, match="no segment of .* shows a vehicle box in camera FRONT"):
        run_stage(tmp_path, scene_set, with_waymo(empty))
    assert {p: p.read_bytes() for p in (tmp_path / "masks").rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def break_component(root: Path, tag: str) -> None:
    (root / "training" / tag / "seg_b.parquet").unlink()


@pytest.mark.parametrize("change, error, message", [
    (lambda tmp, root: {"waymo_path": str(tmp / "nowhere")}, waymo.WaymoNotFoundError, "masks.waymo_path: .* is not a folder"),
    (lambda tmp, root: {"waymo_camera": "SIDE_LEFT"}, waymo.WaymoError, "camera 4 .SIDE_LEFT."),
    (lambda tmp, root: {"waymo_frames": FRAMES + 1}, masks.MaskError, "fewer than masks.waymo_frames"),
    (lambda tmp, root: {"waymo_test_split": "testing"}, waymo.WaymoNotFoundError, "testing/camera_image not found"),
    (lambda tmp, root: (tmp / "l.txt").write_text("seg_a\n") and {"waymo_test_segments": str(tmp / "l.txt"),
                                                                  "waymo_test_split": "training"},
     waymo.WaymoError, "both training and test segments"),
    (lambda tmp, root: break_component(root, "vehicle_pose") or {}, waymo.WaymoNotFoundError, "vehicle_pose"),
])
def test_bad_waymo_input_is_rejected_before_any_output(tmp_path, scene_set, change, error, message):
    root = write_waymo(tmp_path / "waymo", SEGMENTS)
    with pytest.raises(error, match=message):
        run_stage(tmp_path / "out", scene_set, with_waymo(root, **change(tmp_path, root)))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key, value, message", [
    ("fill", 256, "masks.fill"), ("object_fraction", 0.0, "masks.object_fraction"),
    ("dilation", -1, "masks.dilation"), ("waymo_camera", "REAR", "masks.waymo_camera"),
    ("waymo_frames", -1, "masks.waymo_frames"),
    ("rovi_size", [4, 40], "masks.rovi_size"), ("rovi_frames", -2, "masks.rovi_frames"),
])
def test_bad_params_name_the_key(key, value, message):
    values = {**dataclasses.asdict(PARAMS), key: value}
    with pytest.raises(ParamsError, match=message):
        params_from_mapping("masks", masks.Params, values)

"""The masks stage: mask geometry, the seeded object choice, the ROVI reader, and bad inputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from stages import masks
from stages.common import pairs, scenes, video
from stages.common.params import ParamsError, params_from_mapping

PARAMS = masks.Params(fill=127, object_fraction=0.5, object_shape="silhouette", dilation=0, seed=0,
                      rovi_path=None, rovi_frames=0, rovi_size=None)
FRAMES, HEIGHT, WIDTH = 4, 16, 24


def textured(frames: int, height: int, width: int, seed: int) -> np.ndarray:  # [T, H, W, 3] uint8
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def moving_labels(frames: int, labels: list[int]) -> np.ndarray:  # [T, H, W] uint8
    """Object k: a blob (a rectangle with one corner pixel missing) moving right by one pixel a frame."""
    out = np.zeros((frames, HEIGHT, WIDTH), np.uint8)
    for t in range(frames):
        for index, label in enumerate(labels):
            top, left = 1 + 5 * (index % 3), 1 + 10 * (index // 3) + t
            out[t, top:top + 4, left:left + 5] = label
            out[t, top, left] = 0  # not a rectangle: box and silhouette differ
    return out


def write_set(folder: Path, objects_per_scene: list[int], masks_too: bool = True) -> Path:
    """Scenes scene_0.. (the last one held out), each with labels 1..n as objects and masks/."""
    intrinsics = np.array([[20.0, 0, 12], [0, 20.0, 8], [0, 0, 1]])
    names = []
    for index, count in enumerate(objects_per_scene):
        labels = list(range(1, count + 1))
        boxes = [scenes.ObjectBox(k, f"box{k}", (0.0, 0.5, 0.0), (1.0, 1.0, 1.0), 0.0) for k in labels]
        scenes.write_scene(folder / f"scene_{index}", textured(FRAMES, HEIGHT, WIDTH, index), intrinsics,
                           np.tile(np.eye(4), (FRAMES, 1, 1)), moving_labels(FRAMES, labels) if masks_too else None,
                           boxes, scenes.Room((4.0, 3.0, 4.0)))
        names.append(f"scene_{index}")
    scenes.write_split(folder, names[:-1], names[-1:])
    return folder


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    return write_set(tmp_path_factory.mktemp("scenes"), [4, 3, 1])


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


def box_oracle(labels: np.ndarray, chosen: list[int]) -> np.ndarray:
    out = np.zeros(labels.shape, bool)
    for t in range(len(labels)):
        for label in chosen:
            rows, cols = np.nonzero(labels[t] == label)
            if len(rows):
                out[t, rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
    return out


@pytest.mark.parametrize("dilation", [0, 1, 3])
def test_object_masks_cover_exactly_the_chosen_objects(dilation):
    labels = moving_labels(3, [1, 2, 5, 7])
    chosen = [2, 7]
    silhouette = masks.object_mask(labels, chosen, "silhouette", dilation)
    assert (silhouette == dilate_oracle(np.isin(labels, chosen), dilation)).all()
    box = masks.object_mask(labels, chosen, "box", dilation)
    assert (box == dilate_oracle(box_oracle(labels, chosen), dilation)).all()
    assert (box >= silhouette).all() and box.sum() > silhouette.sum()  # the blobs are not rectangles
    if dilation == 0:
        assert not silhouette[np.isin(labels, [0, 1, 5])].any()  # nothing of the other objects


# ----------------------------------------------------------------------------------------------------------
# The stage


def check_pair(pair: dict, expected_mask: np.ndarray, scene_folder: Path, fill: int) -> None:
    frames = pairs.read_pair(pair)
    target = video.read_frames(scene_folder / "images")
    np.testing.assert_array_equal(frames["target"], target)
    np.testing.assert_array_equal(frames["mask"], np.where(expected_mask, 255, 0))
    np.testing.assert_array_equal(frames["input"][~expected_mask], target[~expected_mask])
    assert (frames["input"][expected_mask] == fill).all()


def test_stage_writes_box_and_object_pairs(tmp_path, scene_set):
    params = dataclasses.replace(PARAMS, object_shape="box", dilation=1, fill=0)
    result = run_stage(tmp_path, scene_set, params)
    assert sorted(p.name for p in (tmp_path / "masks").iterdir()) == ["inpaint_box", "inpaint_objects"]
    box_pairs = pairs.load_pairs(tmp_path / "masks" / "inpaint_box")
    assert [(p["scene"], p["split"]) for p in box_pairs] == [("scene_0", "train"), ("scene_1", "train"),
                                                             ("scene_2", "test")]
    assert all(p["prompt"] is None and p["lowres"] is None for p in box_pairs)
    for pair in box_pairs:
        check_pair(pair, masks.box_mask(FRAMES, HEIGHT, WIDTH), scene_set / pair["scene"], 0)

    assert result["chosen"]["scene_0"] == masks.choose_objects([1, 2, 3, 4], 0.5, masks.scene_rng(0, "scene_0"))
    assert [len(result["chosen"][f"scene_{i}"]) for i in range(3)] == [2, 2, 1]
    for pair in pairs.load_pairs(tmp_path / "masks" / "inpaint_objects"):
        labels = video.read_frames(scene_set / pair["scene"] / "masks", labels=True)
        expected = dilate_oracle(box_oracle(labels, result["chosen"][pair["scene"]]), 1)
        check_pair(pair, expected, scene_set / pair["scene"], 0)

    metrics = json.loads((tmp_path / "metrics" / "masks.json").read_text())
    assert metrics == result["metrics"]
    assert metrics["inpaint_box"]["mask_area_fraction"] == 0.25 and metrics["inpaint_box"]["pairs"] == 3
    assert 0 < metrics["inpaint_objects"]["mask_area_fraction"] < 0.5
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "inpaint_box_scene_0.mp4", "inpaint_box_scene_2.mp4", "inpaint_objects_scene_0.mp4",
        "inpaint_objects_scene_2.mp4"]
    sample = video.read_video(tmp_path / "plots" / "inpaint_box_scene_0.mp4")
    assert sample.shape == (FRAMES, HEIGHT, 3 * WIDTH, 3)  # masked | mask | target

    again = tmp_path / "again"
    assert run_stage(again, scene_set, params)["chosen"] == result["chosen"]  # deterministic
    for a, b in zip(sorted((tmp_path / "masks").rglob("*.png")), sorted((again / "masks").rglob("*.png"))):
        assert a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------------------------------------
# ROVI


def write_rovi(root: Path, frames: int = 3, drop_mask: bool = False, extra_image: bool = False,
               list_frames: bool = True) -> Path:
    """Two videos in the ROVI / Refer-YouTube-VOS layout, written with PIL (not the stage's writers)."""
    palette = [0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9)
    layout = {"train": {"vid_a": {1: ["remove the red box", "the box"], 2: ["remove the cup"]}},
              "test": {"vid_b": {1: ["remove the dog"]}}}
    for split, videos in layout.items():
        meta = {}
        for name, objects in videos.items():
            (root / "JPEGImages" / name).mkdir(parents=True)
            (root / "Annotations" / name).mkdir(parents=True)
            stems = [f"{5 * t:05d}" for t in range(frames)]
            for t, stem in enumerate(stems):
                pixels = textured(1, 12, 20, seed=t + len(name))[0]
                Image.fromarray(pixels).save(root / "JPEGImages" / name / f"{stem}.jpg", quality=95)
                ids = np.zeros((12, 20), np.uint8)
                ids[2:6, 3 + t:9 + t] = 1
                ids[7:11, 12:18] = 2 if 2 in objects else 0
                image = Image.fromarray(ids, mode="P")
                image.putpalette(palette)
                if not (drop_mask and t == frames - 1):
                    image.save(root / "Annotations" / name / f"{stem}.png")
            if extra_image:
                Image.fromarray(pixels).save(root / "JPEGImages" / name / "99999.jpg")
            expressions, key = {}, 0
            for obj_id, texts in objects.items():
                for text in texts:
                    expressions[str(key)] = {"exp": text, "obj_id": str(obj_id)}
                    key += 1
            meta[name] = {"expressions": expressions, **({"frames": stems} if list_frames else {})}
        (root / f"{split}.json").write_text(json.dumps({"videos": meta}))
    return root


def test_rovi_folder_becomes_a_third_pairs_folder_with_prompts(tmp_path, scene_set):
    rovi = write_rovi(tmp_path / "rovi")
    params = dataclasses.replace(PARAMS, rovi_path=str(rovi))
    result = run_stage(tmp_path, scene_set, params)
    loaded = pairs.load_pairs(tmp_path / "masks" / "inpaint_rovi")
    assert [(p["scene"], p["split"], p["prompt"]) for p in loaded] == [
        ("vid_a_obj1", "train", "remove the red box"), ("vid_a_obj2", "train", "remove the cup"),
        ("vid_b_obj1", "test", "remove the dog")]
    frames = pairs.read_pair(loaded[0])
    jpegs = np.stack([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB)
                      for p in sorted((rovi / "JPEGImages" / "vid_a").iterdir())])
    np.testing.assert_array_equal(frames["target"], jpegs)
    ids = np.stack([np.array(Image.open(p)) for p in sorted((rovi / "Annotations" / "vid_a").iterdir())])
    np.testing.assert_array_equal(frames["mask"], np.where(ids == 1, 255, 0))
    assert (frames["input"][ids == 1] == PARAMS.fill).all()
    assert result["metrics"]["inpaint_rovi"]["pairs"] == 3

    clips = masks.load_rovi(rovi, max_frames=2, size=(24, 40))
    assert clips[0].frames.shape == (2, 24, 40, 3) and clips[0].mask.shape == (2, 24, 40)
    np.testing.assert_array_equal(clips[0].mask, np.repeat(np.repeat(ids[:2] == 1, 2, axis=1), 2, axis=2))


@pytest.mark.parametrize("kwargs, message", [
    ({"drop_mask": True}, "no mask .*missing masks"),
    ({"drop_mask": True, "list_frames": False}, "mismatched frame counts"),
    ({"extra_image": True, "list_frames": False}, "mismatched frame counts"),
])
def test_a_broken_rovi_folder_is_rejected_before_any_output(tmp_path, scene_set, kwargs, message):
    rovi = write_rovi(tmp_path / "rovi", **kwargs)
    with pytest.raises(masks.MaskError, match=message):
        run_stage(tmp_path, scene_set, dataclasses.replace(PARAMS, rovi_path=str(rovi)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rovi"]  # nothing written, no temporaries


def test_rovi_without_annotations_or_json_is_rejected(tmp_path):
    with pytest.raises(masks.MaskError, match="neither train.json nor test.json"):
        masks.load_rovi(tmp_path)
    rovi = write_rovi(tmp_path / "rovi")
    for path in (rovi / "Annotations" / "vid_b").iterdir():
        path.unlink()
    (rovi / "Annotations" / "vid_b").rmdir()
    with pytest.raises(masks.MaskError, match="masks folder .* is missing"):
        masks.load_rovi(rovi)


# ----------------------------------------------------------------------------------------------------------
# Bad scenes and params


@pytest.mark.parametrize("objects, masks_too, message", [
    ([2, 0], True, "empty object list"),
    ([2, 1], False, "no masks/ folder .*missing masks"),
])
def test_scenes_without_objects_or_masks_are_rejected_before_any_output(tmp_path, objects, masks_too, message):
    bad = write_set(tmp_path / "scenes", objects, masks_too)
    with pytest.raises(masks.MaskError, match=message):
        run_stage(tmp_path / "out", bad)
    assert not (tmp_path / "out").exists()


def hide_objects(folder: Path, scene: str) -> None:
    for path in (folder / scene / "masks").iterdir():  # its objects are never visible
        video.write_image(path, np.zeros((HEIGHT, WIDTH), np.uint8))


def test_scenes_whose_objects_never_show_are_left_out_of_inpaint_objects(tmp_path):
    hidden = write_set(tmp_path / "scenes", [2, 1, 2])
    hide_objects(hidden, "scene_1")
    result = run_stage(tmp_path, hidden)
    assert [p["scene"] for p in pairs.load_pairs(tmp_path / "masks" / "inpaint_objects")] == ["scene_0", "scene_2"]
    assert len(pairs.load_pairs(tmp_path / "masks" / "inpaint_box")) == 3
    assert result["metrics"]["inpaint_objects"]["scenes_without_visible_objects"] == 1


def test_a_failure_mid_run_keeps_the_previous_output(tmp_path, scene_set):
    run_stage(tmp_path, scene_set)
    before = {p: p.read_bytes() for p in (tmp_path / "masks").rglob("*") if p.is_file()}
    hidden = write_set(tmp_path / "hidden", [2, 1])
    for scene in ("scene_0", "scene_1"):
        hide_objects(hidden, scene)
    with pytest.raises(masks.MaskError, match="no scene .* has a labelled object visible"):
        run_stage(tmp_path, hidden)
    assert {p: p.read_bytes() for p in (tmp_path / "masks").rglob("*") if p.is_file()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("key, value, message", [
    ("fill", 256, "masks.fill"), ("object_fraction", 0.0, "masks.object_fraction"),
    ("dilation", -1, "masks.dilation"), ("object_shape", "circle", "masks.object_shape"),
    ("rovi_size", [4, 40], "masks.rovi_size"), ("rovi_frames", -2, "masks.rovi_frames"),
])
def test_bad_params_name_the_key(key, value, message):
    values = {**dataclasses.asdict(PARAMS), key: value}
    with pytest.raises(ParamsError, match=message):
        params_from_mapping("masks", masks.Params, values)

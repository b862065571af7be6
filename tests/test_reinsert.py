"""The reinsert stage: removal and reinsertion of exactly the object's Gaussians, the orientation check with
pluggable generator / estimator, and the stage end to end on generated scenes, with its bad-input errors."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import reinsert as stage
from stages import splat
from stages.common import pairs as pairs_folder
from stages.common import scenes, video
from stages.common import splat as gs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


BOX = scenes.ObjectBox(label=2, name="crate", center=(0.4, 0.3, -0.2), size=(1.0, 0.5, 0.3), yaw=0.6)


def random_gaussians(means: torch.Tensor, sh_bases: int, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    count = len(means)
    return {"means": means.float(), "quats": torch.randn(count, 4, generator=generator),
            "scales": torch.randn(count, 3, generator=generator) - 3,
            "opacities": torch.randn(count, generator=generator),
            "sh0": torch.randn(count, 1, 3, generator=generator),
            "shN": torch.randn(count, sh_bases - 1, 3, generator=generator)}


def box_points(box: scenes.ObjectBox, count: int, seed: int, yaw: float | None = None, centre=None) -> torch.Tensor:
    """Uniform points in ``box`` (optionally turned to ``yaw`` and moved to ``centre``: an unanchored asset)."""
    rng = np.random.default_rng(seed)
    local = (rng.uniform(size=(count, 3)) - 0.5) * np.asarray(box.size)
    turned = scenes.ObjectBox(box.label, box.name, box.center if centre is None else centre, box.size,
                              box.yaw if yaw is None else yaw)
    return torch.from_numpy(local @ turned.rotation.T + np.asarray(turned.center))


def rotation_matrix(quat: np.ndarray) -> np.ndarray:  # [N, 4] wxyz -> [N, 3, 3]
    w, x, y, z = (quat / np.linalg.norm(quat, axis=1, keepdims=True)).T
    return np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], axis=1).reshape(-1, 3, 3)


def test_reinsertion_removes_and_reinserts_exactly_the_objects_gaussians():
    rng = np.random.default_rng(0)
    outside = torch.from_numpy(rng.uniform([-3, 0, -3], [3, 2.5, 3], size=(200, 3)))
    scene = random_gaussians(torch.cat([outside, box_points(BOX, 30, 1)]), sh_bases=16, seed=2)
    # the asset: a box-shaped cloud in a frame of its own (turned by 50 degrees, elsewhere), degree-0 colour
    asset = random_gaussians(box_points(BOX, 400, 3, yaw=BOX.yaw + math.radians(50), centre=(2.0, 1.0, 2.0)),
                             sh_bases=1, seed=4)
    asset["opacities"] = torch.full((400,), 2.0)
    yaw, confidence = stage.pca_yaw(asset)
    assert confidence > 0.5
    assert abs(math.degrees(stage.axis_difference(BOX.yaw + math.radians(50), yaw))) < 3

    edited, removed, asset_ids = stage.reinsert(scene, BOX, asset, yaw, margin=0.05)

    local = (scene["means"].double().numpy() - np.asarray(BOX.center)) @ BOX.rotation  # brute force
    inside = np.flatnonzero((np.abs(local) <= np.asarray(BOX.size) / 2 + 0.05).all(axis=1))
    assert removed.tolist() == inside.tolist() and len(inside) >= 30
    kept = np.setdiff1d(np.arange(230), inside)
    assert len(edited["means"]) == len(kept) + 400 and asset_ids.tolist() == list(range(len(kept), len(kept) + 400))
    for key in gs.GAUSSIAN_KEYS:  # the kept Gaussians, untouched and in order
        torch.testing.assert_close(edited[key][: len(kept)], scene[key][kept], rtol=0, atol=0)
    for key in ("scales", "opacities", "sh0"):
        torch.testing.assert_close(edited[key][asset_ids], asset[key], rtol=0, atol=0)
    assert edited["shN"].shape == (len(kept) + 400, 15, 3) and (edited["shN"][asset_ids] == 0).all()
    # a rigid turn about the vertical: positions and orientations turned alike, the asset back in the box
    turn = stage.axis_difference(stage.box_axis_yaw(BOX), yaw)
    c, s = math.cos(turn), math.sin(turn)
    rotation = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
    placed = edited["means"][asset_ids].double().numpy()
    offsets = asset["means"].double().numpy() - asset["means"].double().numpy().mean(axis=0)
    np.testing.assert_allclose(placed - placed.mean(axis=0), offsets @ rotation.T, atol=1e-5)
    np.testing.assert_allclose(rotation_matrix(edited["quats"][asset_ids].double().numpy()),
                               rotation @ rotation_matrix(asset["quats"].double().numpy()), atol=1e-5)
    assert gs.in_box(edited["means"][asset_ids], BOX.center, BOX.size, BOX.yaw, margin=0.05).float().mean() > 0.97


def test_orientation_estimate_and_axis_conventions():
    for yaw in (0.0, 0.4, 1.2, 2.9):
        cloud = {"means": box_points(scenes.ObjectBox(1, "b", (0, 0, 0), (2.0, 0.5, 0.5), yaw), 2000, 5).float(),
                 "opacities": torch.zeros(2000)}
        estimate, confidence = stage.pca_yaw(cloud)
        assert abs(stage.axis_difference(yaw, estimate)) < math.radians(2) and 0 <= estimate < math.pi
        assert confidence == pytest.approx((4 - 0.25) / (4 + 0.25), abs=0.05)  # variances scale with size^2
    long_z = scenes.ObjectBox(1, "b", (0, 0, 0), (0.3, 1.0, 0.9), 0.2)
    assert stage.box_axis_yaw(long_z) == pytest.approx((0.2 - math.pi / 2) % math.pi)
    assert stage.axis_difference(0.05, math.pi - 0.05) == pytest.approx(0.1)  # axes: 179 degrees is -1


# ----------------------------------------------------------------------------------------------------------
# The stage


TINY = stage.Params(box_margin=0.05, min_visible_pixels=4, asset_views=2, asset_iterations=5, asset_points=40,
                    asset_lr_scale=10.0, asset_alpha_weight=1.0, max_yaw_error_deg=90.0, min_confidence=0.0,
                    scene_dir=None, image_dir=None, device="cpu", sample_videos=1, seed=0, threads=1)


def tiny_params(**changes) -> stage.Params:
    return dataclasses.replace(TINY, **changes)


SPLAT = splat.Params(every=4, iterations=6, sh_degree=1, sh_degree_interval=3, init_num_points=150, init_extent=3.0,
                     init_opacity=0.1, init_scale=1.0, ssim_lambda=0.2, means_lr=1.6e-3, scales_lr=5e-2,
                     quats_lr=1e-2, opacities_lr=0.1, sh0_lr=2.5e-2, shN_lr=1.25e-3, refine_start_iter=100,
                     refine_stop_iter=100, refine_every=3, reset_every=100, grow_grad2d=2e-4, scene_dir=None,
                     image_dir=None, device="cpu", sample_videos=0, seed=0, threads=1)


def make_set(folder: Path) -> Path:
    for index, name in enumerate(["s0", "s1"]):
        scenes.generate_scene(folder / name, seed=[11, index], frames=9, height=16, width=24, num_objects=2,
                              supersample=1, texture_size=32)
    scenes.write_split(folder, ["s0"], ["s1"])
    return folder


@pytest.fixture(scope="module")
def splat_output(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("reinsert")
    scene_set = make_set(root / "scenes")
    splat.run(SPLAT, scene_set, root / "splat", root / "splat.json", root / "splat_plots")
    return scene_set, root / "splat" / "gaussians"


def run_stage(params, scene_set, gaussians, out: Path) -> dict:
    return stage.run(params, scene_set, gaussians, out / "reinsert", out / "metrics.json", out / "plots")


def test_stage_writes_driving_pairs_and_edited_scenes(splat_output, tmp_path):
    scene_set, gaussians = splat_output
    result = run_stage(tiny_params(), scene_set, gaussians, tmp_path)
    assert len(pairs_folder.load_pairs(tmp_path / "reinsert" / "driving")) == 2  # the shared reader validates it
    pairs = json.loads((tmp_path / "reinsert" / "driving" / "pairs.json").read_text())
    assert pairs["task"] == "driving" and pairs["application"] == "driving"
    assert [(p["scene"], p["split"], p["frames"]) for p in pairs["pairs"]] == [("s0", "train", 9), ("s1", "test", 9)]
    for pair in pairs["pairs"]:
        inputs = video.read_frames(tmp_path / "reinsert" / "driving" / pair["input"])
        targets = video.read_frames(tmp_path / "reinsert" / "driving" / pair["target"])
        assert inputs.shape == targets.shape == (9, 16, 24, 3)
        np.testing.assert_array_equal(targets, scenes.load_scene(scene_set / pair["scene"]).images)
        measures = result["metrics"]["scenes"][pair["scene"]]
        assert measures["reinserted"]  # the thresholds accept every asset here
        original, _ = gs.load_gaussians(gaussians / f"{pair['scene']}.safetensors")
        edited, metadata = gs.load_gaussians(tmp_path / "reinsert" / "gaussians" / f"{pair['scene']}.safetensors")
        assert len(edited["means"]) == (len(original["means"]) - measures["removed_gaussians"]
                                        + measures["asset_gaussians"])
        assert metadata["reinsert"]["object"] == measures["object"] and measures["asset_gaussians"] == 40
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics == result["metrics"] and metrics["reinserted_scenes"] == 2
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {"videos", "frames.png"}
    assert video.read_video(tmp_path / "plots" / "videos" / "s0.mp4").shape == (9, 16, 48, 3)


def test_inconsistent_assets_are_discarded_and_the_next_object_tried(splat_output):
    scene_set, gaussians = splat_output
    scene = scenes.load_scene(scene_set / "s0")
    original, _ = gs.load_gaussians(gaussians / "s0.safetensors")
    order = sorted(scene.objects, key=lambda b: -int((scene.masks == b.label).sum()))
    made = {}  # id(asset) -> the box it was made for

    def generate(views: stage.AssetViews, box: scenes.ObjectBox):  # a stand-in generator: the box, as points
        assert views.images.shape[0] == 2 and views.masks.shape == views.images.shape[:3]
        assert (views.images[views.masks == 0] == 0).all()  # the background is masked out
        asset = random_gaussians(box_points(box, 50, 0), sh_bases=1, seed=1)
        made[id(asset)] = box
        return asset

    def estimate(asset):  # a stand-in estimator: 40 degrees off for the first object, right for the second
        box = made[id(asset)]
        return stage.box_axis_yaw(box) + (math.radians(40) if box is order[0] else 0.0), 0.9

    params = tiny_params(max_yaw_error_deg=15.0)
    _, info = stage.insert_best_object(original, scene, scene.images, scene.masks, params, generate, estimate)
    assert [box.name for box in made.values()] == [order[0].name, order[1].name]
    assert info["reinserted"] and info["object"] == order[1].name and info["yaw_error_deg"] == pytest.approx(0)
    assert info["discarded"] == [{"object": order[0].name, "yaw_error_deg": pytest.approx(40.0),
                                  "confidence": 0.9, "asset_views": info["discarded"][0]["asset_views"],
                                  "reason": "inconsistent orientation"}]

    def never(asset):
        return 0.0, 0.01  # unconfident: every asset discarded, the original scene kept (as in the paper)

    kept, info = stage.insert_best_object(original, scene, scene.images, scene.masks, params, generate, never)
    assert kept is original and not info["reinserted"] and len(info["discarded"]) == 2


def test_scenes_without_objects_or_gaussians_are_refused(splat_output, tmp_path):
    scene_set, gaussians = splat_output
    with pytest.raises(FileNotFoundError, match="run the splat stage"):
        run_stage(tiny_params(), scene_set, tmp_path / "nowhere", tmp_path)
    objects = json.loads((scene_set / "s1" / "objects.json").read_text())
    try:
        (scene_set / "s1" / "objects.json").write_text(json.dumps({**objects, "objects": []}))
        with pytest.raises(ValueError, match="scene s1 lists no objects"):
            run_stage(tiny_params(), scene_set, gaussians, tmp_path)
    finally:
        (scene_set / "s1" / "objects.json").write_text(json.dumps(objects))
    assert not (tmp_path / "reinsert").exists() and not (tmp_path / "metrics.json").exists()

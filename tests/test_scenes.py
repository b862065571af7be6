"""The embedded scene set: exact geometry against hand projections, the nerfstudio reader, the stage."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages import scenes as stage
from stages.common import rovi, scenes, video, vsr, waymo
from stages.common.scenes import ObjectBox, Room, SceneError, SceneSpec

TINY = {"frames": 4, "height": 20, "width": 28, "num_objects": 2, "texture_size": 32}


def opengl_camera(eye, yaw_deg=0.0, pitch_deg=0.0) -> np.ndarray:  # [4, 4]
    """Camera-to-world by hand: start looking down -z, pitch about x, then yaw about +y."""
    yaw, pitch = np.radians(yaw_deg), np.radians(pitch_deg)
    r_yaw = np.array([[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]])
    r_pitch = np.array([[1, 0, 0], [0, np.cos(pitch), -np.sin(pitch)], [0, np.sin(pitch), np.cos(pitch)]])
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = r_yaw @ r_pitch, eye
    return c2w


def project(points, intrinsics, c2w) -> np.ndarray:  # [N, 3] -> [N, 2] pixel coordinates (u, v)
    """OpenCV pinhole projection through the inverse of an OpenGL camera-to-world (nerfstudio convention)."""
    camera = (np.linalg.inv(c2w) @ np.c_[points, np.ones(len(points))].T)[:3]  # [3, N] OpenGL camera axes
    x, y, z = camera[0], -camera[1], -camera[2]  # OpenCV axes: y down, z forward
    assert (z > 0).all(), "every point must be in front of the camera"
    (fx, _, cx), (_, fy, cy) = intrinsics[:2]
    return np.stack([fx * x / z + cx, fy * y / z + cy], axis=1)


def hull_distance(corners_uv, height, width) -> np.ndarray:  # [H, W] signed pixel distance of pixel centres
    hull = cv2.convexHull(corners_uv.astype(np.float32))
    return np.array([[cv2.pointPolygonTest(hull, (j + 0.5, i + 0.5), True) for j in range(width)]
                     for i in range(height)])


def ramp_texture(size=64) -> np.ndarray:  # [size, size, 3]: red = 4 * column / 255, green = 4 * row / 255
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    return np.stack([cols * 4 / 255, rows * 4 / 255, np.full_like(cols, 0.5)], axis=-1)


def flat(colour) -> np.ndarray:
    return np.ones((8, 8, 3), np.float32) * np.asarray(colour, np.float32)


# ---------------------------------------------------------------------------------------------
# Geometry, against hand computations.


@pytest.mark.parametrize("supersample", [1, 2])
def test_room_depth_and_texture_coordinates_by_hand(supersample):
    """Every pixel: which plane its centre ray meets, at what depth, and the wall's texel there."""
    room = Room((4.0, 2.0, 6.0))  # x in [-2, 2], y in [0, 2], z in [-3, 3]
    spec = SceneSpec(room, [], floor_texture=flat((0.2, 0.9, 0.1)), wall_texture=ramp_texture(),
                     ceiling_texture=flat((0.9, 0.1, 0.9)), object_textures=[], texels_per_metre=10.0,
                     ambient=1.0)
    height, width = 24, 32
    intrinsics = scenes.make_intrinsics(height, width, fov_deg=90.0)
    assert np.allclose(intrinsics, [[16, 0, 16], [0, 16, 12], [0, 0, 1]])
    eye = np.array([0.3, 1.0, 0.5])
    out = scenes.render(spec, intrinsics, opengl_camera(eye)[None], height, width, supersample)

    rows, cols = np.mgrid[0:height, 0:width] + 0.5
    dirs = np.stack([(cols - 16) / 16, -(rows - 12) / 16, -np.ones_like(cols)], -1)  # camera axes = world
    planes = {"x-": (0, -2.0), "x+": (0, 2.0), "floor": (1, 0.0), "ceiling": (1, 2.0), "z-": (2, -3.0)}
    with np.errstate(divide="ignore"):
        t = {name: (value - eye[axis]) / dirs[..., axis] for name, (axis, value) in planes.items()}
    t = {name: np.where(v > 0, v, np.inf) for name, v in t.items()}
    depth = np.minimum.reduce(list(t.values()))
    np.testing.assert_allclose(out.depth[0], depth, rtol=1e-5)
    assert (out.labels == 0).all()

    hit = eye + depth[..., None] * dirs
    plane = np.argmin(np.stack(list(t.values())), axis=0)  # [H, W] index into planes
    same = [np.roll(plane, shift, axis) == plane for shift in (-1, 1) for axis in (0, 1)]
    interior = np.logical_and.reduce(same)  # all sub-samples of the pixel meet its plane (faces are convex)
    interior[[0, -1], :] = interior[:, [0, -1]] = False
    names = list(planes)
    image = out.images[0].astype(float)
    # The wall ahead is parallel to the image, so its texel coordinates are affine in the pixel
    # coordinates and the sub-sample average equals the centre value: a along x from -2, b down from 2.
    back = interior & (plane == names.index("z-"))
    col, row = (hit[..., 0] + 2) * 10 - 0.5, (2 - hit[..., 1]) * 10 - 0.5
    back &= (col > 0.5) & (row > 0.5)  # away from the texture's wrap seam
    assert back.sum() > 50
    np.testing.assert_allclose(image[back, 0], col[back] * 4, atol=1.01)  # red ramp: 4 levels per texel
    np.testing.assert_allclose(image[back, 1], row[back] * 4, atol=1.01)
    floor = interior & (plane == names.index("floor"))
    ceiling = interior & (plane == names.index("ceiling"))
    assert floor.sum() > 20 and ceiling.sum() > 20
    np.testing.assert_allclose(image[floor], np.tile([51, 229.5, 25.5], (floor.sum(), 1)), atol=1)
    np.testing.assert_allclose(image[ceiling], np.tile([229.5, 25.5, 229.5], (ceiling.sum(), 1)), atol=1)


def test_box_mask_is_the_projection_of_its_corners():
    box = ObjectBox(7, "crate", center=(0.2, 0.4, -1.0), size=(0.6, 0.8, 0.5), yaw=0.5)
    spec = SceneSpec(Room((6.0, 3.0, 6.0)), [box], flat(0.5), flat(0.5), flat(0.5), [flat(0.8)])
    height, width = 30, 40
    intrinsics = scenes.make_intrinsics(height, width, fov_deg=70.0)
    c2w = opengl_camera([0.9, 1.5, 1.2], yaw_deg=25.0, pitch_deg=-30.0)
    labels = scenes.render(spec, intrinsics, c2w[None], height, width).labels[0]
    # Corners by hand: local +-size/2, turned by yaw about +y (x' = c x + s z, z' = -s x + c z).
    c, s = np.cos(0.5), np.sin(0.5)
    local = np.array([[x, y, z] for x in (-0.3, 0.3) for y in (-0.4, 0.4) for z in (-0.25, 0.25)])
    x, y, z = local.T
    corners = np.stack([c * x + s * z, y, -s * x + c * z], axis=1)
    corners += box.center
    np.testing.assert_allclose(np.sort(box.corners(), 0), np.sort(corners, 0), atol=1e-12)
    distance = hull_distance(project(corners, intrinsics, c2w), height, width)
    assert (labels[distance > 1e-3] == 7).all() and (labels[distance < -1e-3] == 0).all()
    assert 20 < (labels == 7).sum() < labels.size / 2


@pytest.mark.parametrize("side", [0, 90, 180, 270])
def test_box_faces_show_their_texture_upright_and_unmirrored(side):
    """Seen from any side, a face's texture runs left to right (red ramp) and top to bottom (green)."""
    turn = 20 + side  # look straight at one face of a box turned by 20 degrees
    box = ObjectBox(1, "box", (0.0, 0.5, 0.0), (1.0, 1.0, 1.0), yaw=np.radians(20))
    spec = SceneSpec(Room((8.0, 3.0, 8.0)), [box], flat(0.5), flat(0.5), flat(0.5), [ramp_texture()],
                     ambient=1.0)
    eye = np.array([2.0 * np.sin(np.radians(turn)), 0.5, 2.0 * np.cos(np.radians(turn))])
    intrinsics = scenes.make_intrinsics(24, 24, 60.0)
    out = scenes.render(spec, intrinsics, opengl_camera(eye, yaw_deg=turn)[None], 24, 24, supersample=1)
    face = out.labels[0] == 1
    assert face.sum() > 50
    image = out.images[0].astype(float)
    rows, cols = np.nonzero(face)
    assert np.corrcoef(cols, image[face, 0])[0, 1] > 0.99 and np.corrcoef(rows, image[face, 1])[0, 1] > 0.99


@settings(max_examples=15, deadline=None)
@given(yaw=st.floats(0, np.pi), x=st.floats(-1, 1), size=st.floats(0.2, 1.0), turn=st.floats(-40, 40))
def test_box_mask_matches_projection_for_any_pose(yaw, x, size, turn):
    box = ObjectBox(1, "box", center=(x, size / 2, -1.0), size=(size, size, size * 0.7), yaw=yaw)
    spec = SceneSpec(Room((6.0, 3.0, 6.0)), [box], flat(0.5), flat(0.5), flat(0.5), [flat(0.8)])
    intrinsics = scenes.make_intrinsics(16, 20, fov_deg=80.0)
    c2w = opengl_camera([0.0, 1.4, 1.5], yaw_deg=turn, pitch_deg=-25.0)
    labels = scenes.render(spec, intrinsics, c2w[None], 16, 20, supersample=1).labels[0]
    distance = hull_distance(project(box.corners(), intrinsics, c2w), 16, 20)
    assert (labels[distance > 1e-3] == 1).all() and (labels[distance < -1e-3] == 0).all()


def test_render_rejects_cameras_outside_the_room_or_inside_an_object():
    box = ObjectBox(1, "box", (0.0, 0.5, 0.0), (1.0, 1.0, 1.0), 0.0)
    spec = SceneSpec(Room((4.0, 3.0, 4.0)), [box], flat(0.5), flat(0.5), flat(0.5), [flat(0.8)])
    intrinsics = scenes.make_intrinsics(8, 8, 60.0)
    with pytest.raises(SceneError, match="inside the room"):
        scenes.render(spec, intrinsics, opengl_camera([0, 1, 9])[None], 8, 8)
    with pytest.raises(SceneError, match="inside an object"):
        scenes.render(spec, intrinsics, opengl_camera([0.1, 0.5, 0])[None], 8, 8)
    bad = SceneSpec(spec.room, [box, box], flat(0.5), flat(0.5), flat(0.5), [flat(0.8)] * 2)
    with pytest.raises(SceneError, match=r"distinct integers in 1\.\.255"):
        scenes.render(bad, intrinsics, opengl_camera([1.5, 1, 1.5])[None], 8, 8)


# ---------------------------------------------------------------------------------------------
# Generated scenes.


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("generated") / "scene"
    scenes.generate_scene(folder, seed=3, **TINY)
    return folder


def test_generation_is_deterministic_by_seed(generated, tmp_path):
    scenes.generate_scene(tmp_path / "again", seed=3, **TINY)
    scenes.generate_scene(tmp_path / "other", seed=4, **TINY)
    def files(folder):
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    first = files(generated)
    assert len(first) == 2 * TINY["frames"] + 2  # images, masks, transforms.json, objects.json
    assert first == files(tmp_path / "again")
    frame = Path("images/frame_00001.png")
    assert first[frame] != files(tmp_path / "other")[frame]


def test_generated_scene_layout_and_masks_agree_with_the_boxes(generated):
    meta = json.loads((generated / "transforms.json").read_text())
    assert meta["camera_model"] == "OPENCV" and (meta["w"], meta["h"]) == (28, 20)
    assert [f["file_path"] for f in meta["frames"]] == [f"images/frame_{i:05d}.png" for i in range(1, 5)]
    scene = scenes.load_scene(generated)
    assert scene.images.shape == (4, 20, 28, 3) and scene.masks.shape == (4, 20, 28)
    assert [box.label for box in scene.objects] == [1, 2] and scene.room is not None
    # Every pixel labelled k lies inside the projection of box k (occlusion can only remove pixels).
    for frame in range(4):
        for box in scene.objects:
            inside = hull_distance(project(box.corners(), scene.intrinsics, scene.camtoworlds[frame]), 20, 28)
            assert (inside[scene.masks[frame] == box.label] > -1e-3).all()
    assert (scene.masks > 0).any()
    # The room encloses every camera, and every box stands on the floor.
    lo, hi = scene.room.bounds
    assert ((scene.camtoworlds[:, :3, 3] > lo) & (scene.camtoworlds[:, :3, 3] < hi)).all()
    assert all(np.isclose(box.corners()[:, 1].min(), 0.0) for box in scene.objects)


def test_trajectory_is_smooth_and_looks_ahead():
    rng = np.random.default_rng(0)
    spec = scenes.make_spec(rng, 3, texture_size=16)
    c2w = scenes.make_trajectory(spec, rng, 300)
    rotations = c2w[:, :3, :3]
    identity = np.tile(np.eye(3), (300, 1, 1))
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1), identity, atol=1e-9)
    steps = np.linalg.norm(np.diff(c2w[:, :3, 3], axis=0), axis=1)
    assert steps.max() < 0.1 and steps.max() < 3 * steps.mean()  # no jumps
    assert (c2w[:, 1, 1] > 0.5).all()  # camera up stays near world up: no roll, no flips


# ---------------------------------------------------------------------------------------------
# The reader, on scenes written by hand (not by the generator).


def write_by_hand(folder: Path, names=("frame_00002.png", "frame_00010.png", "frame_00001.png"), size=(6, 8),
                  images_dir="images", **overrides) -> dict:
    """A nerfstudio scene written directly: frames listed out of order, poses = translations by index."""
    (folder / images_dir).mkdir(parents=True)
    frames = []
    for name in names:
        number = int(name[6:11])
        pixels = np.full((*size, 3), (number, 2 * number, 3 * number), np.uint8)
        cv2.imwrite(str(folder / images_dir / name), pixels)
        pose = np.eye(4)
        pose[:3, 3] = [number, 0, 0]
        frames.append({"file_path": f"images/{name}", "transform_matrix": pose.tolist(),
                       "colmap_im_id": number})  # an extra key, as in DL3DV
    meta = {"camera_model": "OPENCV", "fl_x": 10.0, "fl_y": 11.0, "cx": 4.0, "cy": 3.0, "w": size[1],
            "h": size[0], "k1": 0.01, "k2": 0.0, "p1": 0.0, "p2": 0.0, "applied_transform": [[1, 0, 0, 0]],
            "frames": frames}
    meta.update(overrides)
    (folder / "transforms.json").write_text(json.dumps(meta))
    return meta


def test_reader_loads_a_hand_written_nerfstudio_scene(tmp_path):
    write_by_hand(tmp_path)
    scene = scenes.load_scene(tmp_path)
    assert [p.name for p in scene.image_paths] == ["frame_00001.png", "frame_00002.png", "frame_00010.png"]
    assert scene.images.shape == (3, 6, 8, 3) and (scene.height, scene.width) == (6, 8)
    # PNGs were written BGR with (B, G, R) = (n, 2n, 3n): RGB reads back (3n, 2n, n).
    assert scene.images[:, 0, 0].tolist() == [[3, 2, 1], [6, 4, 2], [30, 20, 10]]
    np.testing.assert_array_equal(scene.camtoworlds[:, 0, 3], [1, 2, 10])
    np.testing.assert_array_equal(scene.distortion, [0.01, 0, 0, 0])  # as recorded; the frames are undistorted
    pinhole, _ = scenes.undistortion(np.array([[10.0, 0, 4], [0, 11, 3], [0, 0, 1]]), scene.distortion, 8, 6)
    np.testing.assert_array_equal(scene.intrinsics, pinhole)
    np.testing.assert_allclose(scene.intrinsics, [[10, 0, 4], [0, 11, 3], [0, 0, 1]], atol=0.2)
    assert scene.masks is None and scene.objects is None and "applied_transform" in scene.extra
    lazy = scenes.load_scene(tmp_path, load_images=False)
    assert lazy.images is None and lazy.num_frames == 3
    np.testing.assert_array_equal(lazy.read_images([2]), scene.images[2:])


def test_reader_undistorts_an_opencv_camera_like_dl3dvs(tmp_path):
    """Frames of an OpenCV camera (k1, k2, p1, p2 in transforms.json, as DL3DV records) are read as the
    pinhole camera of ``Scene.intrinsics`` sees the scene: a smooth pattern of the normalised image plane,
    distorted by the coefficients, reads back as that pattern at the new camera's pixels."""
    height, width = 48, 64
    camera = np.array([[50.0, 0, 31.5], [0, 52.0, 23.5], [0, 0, 1]])
    distortion = np.array([-0.25, 0.06, 0.002, -0.003])

    def pattern(x, y):  # the scene seen on the normalised plane, values in [40, 215]
        return 127.5 + 87.5 * np.sin(4.0 * x + 1.0) * np.cos(3.0 * y)

    v, u = np.mgrid[0:height, 0:width].astype(np.float64)
    plane = cv2.undistortPoints(np.stack([u, v], -1).reshape(-1, 1, 2), camera, distortion).reshape(height, width, 2)
    distorted = np.repeat(pattern(plane[..., 0], plane[..., 1])[..., None], 3, axis=-1).round().astype(np.uint8)
    folder = tmp_path / "scene"
    scenes.write_scene(folder, distorted[None].repeat(2, 0), camera, np.eye(4)[None].repeat(2, 0))
    meta = json.loads((folder / "transforms.json").read_text())
    meta.update(dict(zip(("k1", "k2", "p1", "p2"), distortion.tolist())))
    (folder / "transforms.json").write_text(json.dumps(meta))

    scene = scenes.load_scene(folder)
    np.testing.assert_allclose(scene.distortion, distortion)
    assert not np.allclose(scene.intrinsics, camera)  # the pinhole camera of the undistorted frames
    fx, fy, cx, cy = scene.intrinsics[0, 0], scene.intrinsics[1, 1], scene.intrinsics[0, 2], scene.intrinsics[1, 2]
    expected = pattern((u - cx) / fx, (v - cy) / fy)
    inner = (slice(3, -3), slice(3, -3))
    error = np.abs(scene.images[0, ..., 0].astype(float) - expected)[inner]
    assert error.mean() < 2.0 and error.max() < 12.0
    raw = np.abs(distorted[..., 0].astype(float) - expected)[inner]
    assert raw.mean() > 5 * error.mean()  # the file as stored is far from the pinhole view
    np.testing.assert_array_equal(scenes.load_scene(folder, load_images=False).read_images([1]), scene.images[1:])


def test_reader_uses_a_downsampled_copy_like_dl3dv(tmp_path):
    write_by_hand(tmp_path, images_dir="images_2", size=(3, 4), w=8, h=6)  # listed images/ is absent
    scene = scenes.load_scene(tmp_path)
    assert scene.image_paths[0].parent.name == "images_2" and (scene.height, scene.width) == (3, 4)
    np.testing.assert_allclose(scene.intrinsics, [[5, 0, 2], [0, 5.5, 1.5], [0, 0, 1]], atol=0.1)  # k1 0.01: undistorted
    (tmp_path / "images_4").mkdir()
    with pytest.raises(SceneError, match=r"several resized copies \['images_2', 'images_4'\]"):
        scenes.load_scene(tmp_path)
    assert scenes.load_scene(tmp_path, image_dir="images_2").width == 4


def test_reader_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="Scene folder not found"):
        scenes.load_scene(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"transforms\.json not found"):
        scenes.load_scene(tmp_path / "empty")

    write_by_hand(tmp_path / "missing")
    (tmp_path / "missing/images/frame_00010.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"1 image\(s\) listed in .* missing, e\.g\. .*frame_00010"):
        scenes.load_scene(tmp_path / "missing")

    write_by_hand(tmp_path / "extra")
    cv2.imwrite(str(tmp_path / "extra/images/frame_00099.png"), np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(SceneError, match=r"1 image\(s\) in .* are not listed .*frame_00099\.png"):
        scenes.load_scene(tmp_path / "extra")

    write_by_hand(tmp_path / "mixed")
    cv2.imwrite(str(tmp_path / "mixed/images/frame_00010.png"), np.zeros((7, 8, 3), np.uint8))
    with pytest.raises(SceneError, match=r"frame_00010\.png is 8x7 but the scene's frames are 8x6"):
        scenes.load_scene(tmp_path / "mixed")

    write_by_hand(tmp_path / "wh", w=16)
    with pytest.raises(SceneError, match=r"says images are 16x6 but they are 8x6"):
        scenes.load_scene(tmp_path / "wh")

    write_by_hand(tmp_path / "fisheye", camera_model="OPENCV_FISHEYE")
    with pytest.raises(SceneError, match="OPENCV_FISHEYE' is not supported"):
        scenes.load_scene(tmp_path / "fisheye")

    meta = write_by_hand(tmp_path / "nofocal")
    del meta["fl_x"], meta["fl_y"]
    (tmp_path / "nofocal/transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SceneError, match="has no 'fl_x'"):
        scenes.load_scene(tmp_path / "nofocal")

    write_by_hand(tmp_path / "badpose")
    meta = json.loads((tmp_path / "badpose/transforms.json").read_text())
    meta["frames"][0]["transform_matrix"] = [[1, 0, 0]]
    (tmp_path / "badpose/transforms.json").write_text(json.dumps(meta))
    with pytest.raises(SceneError, match="must be a finite 4x4 matrix"):
        scenes.load_scene(tmp_path / "badpose")

    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled/transforms.json").write_text("{frames: ")
    with pytest.raises(SceneError, match="is not valid JSON"):
        scenes.load_scene(tmp_path / "garbled")


def test_split_round_trip_and_errors(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    scenes.write_split(tmp_path, ["a", "b"], ["c"])
    assert json.loads((tmp_path / "split.json").read_text()) == {"train": ["a", "b"], "test": ["c"]}
    assert scenes.load_split(tmp_path) == {"train": ["a", "b"], "test": ["c"], "validation": []}
    scenes.write_split(tmp_path, ["a"], ["c"], validation=["b"])
    assert scenes.load_split(tmp_path) == {"train": ["a"], "test": ["c"], "validation": ["b"]}
    with pytest.raises(SceneError, match=r"\['a'\] are in more than one of train, test"):
        scenes.write_split(tmp_path, ["a"], ["a"])
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "test": ["c"], "validation": ["a"]}))
    with pytest.raises(SceneError, match=r"lists scenes \['a'\] twice"):
        scenes.load_split(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"train": ["a"], "test": ["c"], "val": ["b"]}))
    with pytest.raises(SceneError, match="optionally 'validation'"):
        scenes.load_split(tmp_path)
    scenes.write_split(tmp_path, ["a", "b"], ["c"])
    (tmp_path / "c").rmdir()
    with pytest.raises(FileNotFoundError, match=r"names scene 'c' but .* is missing"):
        scenes.load_split(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"split\.json not found"):
        scenes.load_split(tmp_path / "a")


def test_the_papers_95_40_5_split_of_a_dl3dv_folder(tmp_path, capsys):
    for index in range(140):  # DL3DV-Benchmark's layout: <hash>/nerfstudio/transforms.json (a few flat ones)
        inner = tmp_path / f"{index:03d}scene" / ("nerfstudio" if index % 7 else "")
        inner.mkdir(parents=True, exist_ok=True)
        (inner / "transforms.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # not a scene
    stage_main = scenes.main
    stage_main(["split", str(tmp_path), "--seed", "3"])
    assert "95 train, 40 test, 5 validation" in capsys.readouterr().out
    split = scenes.load_split(tmp_path)
    assert [len(split[k]) for k in ("train", "test", "validation")] == [95, 40, 5]
    assert sorted(split["train"] + split["test"] + split["validation"]) == scenes.scene_folders(tmp_path)
    assert split["test"] == sorted(split["test"])  # each list in natural order
    first = (tmp_path / "split.json").read_bytes()
    scenes.make_split(tmp_path, 95, 40, 5, seed=3)
    assert (tmp_path / "split.json").read_bytes() == first  # seeded
    assert scenes.make_split(tmp_path, 95, 40, 5, seed=4) and scenes.load_split(tmp_path)["test"] != split["test"]
    with pytest.raises(SceneError, match="holds 140 scene folders; the split asks for 95 train \\+ 40 test \\+ 4"):
        scenes.make_split(tmp_path, 95, 40, 4)
    with pytest.raises(SystemExit):
        stage_main(["split", str(tmp_path), "--validation", "0"])
    assert "make the counts add up" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The stage.

PARAMS = {"num_scenes": 3, "num_test_scenes": 1, "frames": 3, "height": 16, "width": 24, "seed": 5,
          "num_objects": 2, "rovi_frames": 2, "rovi_stride": 2, "waymo_frames": 3,
          "dove_frames": 2, "vsr_frames": 3, "vsr_scale": 4}


def test_stage_writes_a_loadable_set_and_replaces_it_atomically(tmp_path, monkeypatch):
    out = tmp_path / "data" / "scenes"
    result = stage.run(stage.Params(**PARAMS), out)
    assert scenes.load_split(out) == {"train": ["scene_000", "scene_001"], "test": ["scene_002"], "validation": []}
    assert result["metrics"]["total_frames"] == 9 and result["metrics"]["num_test_scenes"] == 1
    assert json.loads((out / "metrics.json").read_text()) == result["metrics"]
    assert [p.name for p in result["videos"]] == ["scene_000.mp4", "scene_002.mp4"]
    assert video.read_video(result["videos"][0]).shape == (3, 16, 48, 3)  # frames beside their labels
    for name in ("scene_000", "scene_001", "scene_002"):
        assert scenes.load_scene(out / name).images.shape == (3, 16, 24, 3)
    clips = rovi.load_rovi(out / "rovi")  # the ROVI-layout copy: frames 0 and 2, labels as object ids
    assert clips and result["metrics"]["rovi_objects"] == len(clips)
    for clip in clips:
        scene = scenes.load_scene(out / clip.name.rsplit("_obj", 1)[0])
        label = int(clip.name.rsplit("_obj", 1)[1])
        np.testing.assert_array_equal(clip.mask, scene.read_masks([0, 2]) == label)
        assert clip.prompt == "the " + next(o.name for o in scene.objects if o.label == label).replace("_", " ")
        assert clip.split == ("test" if clip.name.startswith("scene_002") else "train")
    listed = vsr.read_video_list(out / "dove")  # the train scenes as DOVE's training videos
    assert [p.name for p in listed] == ["scene_000.mp4", "scene_001.mp4"]
    assert np.abs(video.read_video(listed[0]).astype(int) - scenes.load_scene(out / "scene_000").images[:2]).mean() < 6
    (name, gt, lq), = vsr.iter_vsr_set(out / "vsr" / "bicubic", None, 4)  # the test scene as a VSR test set
    assert name == "scene_002" and gt.shape == (3, 16, 24, 3) and lq.shape == (3, 4, 6, 3)
    np.testing.assert_array_equal(gt, scenes.load_scene(out / "scene_002").images)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")}

    def broken(folder, **kwargs):  # the second scene of a rerun fails
        if folder.name == "scene_001":
            raise RuntimeError("disk full")
        return real(folder, **kwargs)

    real = scenes.generate_scene
    monkeypatch.setattr(scenes, "generate_scene", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        stage.run(stage.Params(**{**PARAMS, "seed": 6}), out)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")} == before  # old set untouched
    assert sorted(p.name for p in out.parent.iterdir()) == ["scenes"]  # no temporary folders left
    monkeypatch.setattr(scenes, "generate_scene", real)
    stage.run(stage.Params(**PARAMS), out, metrics_path=tmp_path / "metrics" / "scenes.json",
              plots_dir=tmp_path / "plots")  # a rerun: same seed, same bytes
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.png")} == before
    assert (tmp_path / "metrics" / "scenes.json").is_file()
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["scene_000.mp4", "scene_002.mp4"]


@pytest.mark.parametrize("change,match", [
    ({"num_test_scenes": 3}, r"num_test_scenes must be in \[0, num_scenes\)"),
    ({"num_scenes": 0}, "num_scenes must be >= 1"),
    ({"frames": 0}, "frames must be >= 1"),
    ({"height": 4}, r"height and scenes.width must be in \[8, 4096\]"),
    ({"seed": -1}, "seed must be >= 0"),
    ({"num_objects": 20}, r"num_objects must be in \[0, 8\]"),
    ({"rovi_frames": 3}, "rovi_frames .* must fit in the 3 frames"),
    ({"dove_frames": 4}, r"must be in \[0, scenes.frames = 3\]"),
    ({"vsr_frames": -5}, r"must be in \[0, scenes.frames = 3\]"),
    ({"num_test_scenes": 0}, "make test data from the test scenes"),
    ({"frames": 2.5}, "frames must be an integer"),
])
def test_stage_params_are_validated(change, match):
    with pytest.raises((ValueError, TypeError), match=match):
        stage.Params(**{**PARAMS, **change})


def test_stage_main_parses_argv_loads_params_and_logs(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("scenes:\n" + "".join(f"  {k}: {v}\n" for k, v in PARAMS.items()))
    logged = {"metrics": {}, "videos": [], "artifacts": []}

    class Tracker:
        def log_metrics(self, metrics):
            logged["metrics"].update(metrics)

        def log_video(self, path):
            logged["videos"].append(Path(path).name)

        def log_artifact(self, path):
            logged["artifacts"].append(Path(path).name)

    class StageRun:
        def __init__(self, name, params):
            logged["stage"], logged["params"] = name, params

        def __enter__(self):
            return Tracker()

        def __exit__(self, *exc):
            return False

    monkeypatch.setitem(sys.modules, "stages.common.tracking", types.SimpleNamespace(stage_run=StageRun))
    stage.main(["--params", str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")])
    assert logged["stage"] == "scenes" and logged["params"] == stage.Params(**PARAMS)
    assert logged["metrics"]["total_frames"] == 9 and logged["metrics"]["seconds"] >= 0
    assert logged["videos"] == ["scene_000.mp4", "scene_002.mp4"]
    assert logged["artifacts"] == ["split.json", "metrics.json"]
    assert scenes.load_split(tmp_path / "out")["test"] == ["scene_002"]


def test_a_rovi_copy_without_any_object_in_view_is_an_error_not_an_empty_folder(tmp_path):
    with pytest.raises(SceneError, match="no object is seen in the first 2 frames"):
        stage.run(stage.Params(**{**PARAMS, "num_objects": 0}), tmp_path / "scenes")
    assert not (tmp_path / "scenes").exists()
    stage.run(stage.Params(**{**PARAMS, "num_objects": 0, "rovi_frames": 0}), tmp_path / "scenes")  # none asked
    assert not (tmp_path / "scenes" / "rovi").exists()


def project_waymo(points: np.ndarray, camera) -> np.ndarray:  # [N, 3] camera frame -> [N, 2] pixels
    """Waymo's pinhole projection (camera_model.cc, no distortion): (x, y, z) -> (-y / x, -z / x) -> pixels."""
    normalised = np.stack([-points[:, 1] / points[:, 0], -points[:, 2] / points[:, 0]], axis=1)
    return normalised * np.diag(camera.intrinsics)[:2] + camera.intrinsics[:2, 2]


def test_stage_writes_each_room_as_a_waymo_segment_whose_boxes_match_its_pixels(tmp_path):
    params = stage.Params(**{**PARAMS, "frames": 3, "waymo_frames": 6, "num_objects": 3, "height": 32, "width": 48})
    out = tmp_path / "scenes"
    result = stage.run(params, out)
    root = out / "waymo"
    assert waymo.list_segments(root, "training") == ["scene_000", "scene_001"]
    assert waymo.list_segments(root, "validation") == ["scene_002"]
    segment = waymo.read_segment(root, "validation", "scene_002")
    assert segment.num_frames == 6 and np.all(np.diff(segment.timestamps_micros) == 100_000)  # 10 Hz
    objects = scenes.load_scene(out / "scene_002", load_images=False).objects  # the same room
    render, _, _, _ = scenes.render_drive(seed=[5, 2], frames=6, height=32, width=48, num_objects=3)
    assert np.abs(segment.read_images().astype(int) - render.images).mean() < 3  # JPEG of the same frames
    assert result["metrics"]["waymo_camera_boxes"] >= sum(len(b) for b in segment.boxes_2d)
    vehicle_from_camera = segment.camera.camera_to_vehicle
    seen = tight = 0
    for t in range(segment.num_frames):
        pose = segment.world_from_vehicle[t]
        assert np.allclose(pose[2, :3], [0, 0, 1]) and np.isclose((pose @ vehicle_from_camera)[2, 3], 1.0)
        assert sorted(b.object_id for b in segment.boxes_3d[t]) == sorted(o.name for o in objects)
        for box in segment.boxes_3d[t]:  # the world box is the room's box: same centre and up axis
            world = pose @ np.append(box.center, 1.0)
            room = next(o for o in objects if o.name == box.object_id)
            np.testing.assert_allclose(world[:3], [room.center[0], -room.center[2], room.center[1]], atol=1e-9)
            assert box.size == (room.size[0], room.size[2], room.size[1])
        for box2d in segment.boxes_2d[t]:  # its 3D box projects onto (a superset of) its pixels' box
            box = next(b for b in segment.boxes_3d[t] if "cam-" + b.object_id == box2d.object_id)
            c, s = np.cos(box.heading), np.sin(box.heading)
            signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float) / 2
            local = signs * box.size
            corners = local @ np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]).T + box.center  # vehicle frame
            in_camera = (np.linalg.inv(vehicle_from_camera) @ np.c_[corners, np.ones(8)].T).T[:, :3]
            if (in_camera[:, 0] <= 0.1).any():
                continue  # partly behind the camera: its projection is unbounded
            uv = project_waymo(in_camera, segment.camera)
            (u, v), (w, h) = box2d.center, box2d.size
            assert uv[:, 0].min() <= u - w / 2 + 1 and uv[:, 0].max() >= u + w / 2 - 1
            assert uv[:, 1].min() <= v - h / 2 + 1 and uv[:, 1].max() >= v + h / 2 - 1
            seen += 1
            size = (segment.camera.width, segment.camera.height)
            inside = uv.min() >= -1 and (uv.max(axis=0) <= np.add(size, 1)).all()
            projected = np.clip([*uv.min(axis=0), *uv.max(axis=0)], 0, [*size, *size])
            tight += inside and np.allclose(projected, [u - w / 2, v - h / 2, u + w / 2, v + h / 2], atol=1.5)
    assert seen > 0 and tight > 0  # wholly in view (and not hidden): the pixels' box is the projected box

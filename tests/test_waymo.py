"""The Waymo Open Dataset v2 reader: round trip through the fixture writer, row order, segment lists,
and a clear error for every kind of bad file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from stages.common import waymo
from stages.common.waymo import Box2d, Box3d, CameraCalibration, Frame, WaymoError, WaymoNotFoundError

SEGMENT = "10023947602400723454_1120_000_1140_000"
SPLIT = "training"
HEIGHT, WIDTH = 16, 24
FRONT, SIDE_LEFT = waymo.CameraName.FRONT, waymo.CameraName.SIDE_LEFT
STAMPS = (1552440195362591, 1552440195462613, 1552440195562604)  # 10 Hz, as in the release
IMAGE = "[CameraImageComponent].image"


def rigid(rng: np.random.Generator) -> np.ndarray:  # [4, 4] a random rotation and translation
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    matrix = np.eye(4)
    matrix[:3, :3], matrix[:3, 3] = q * np.sign(np.linalg.det(q)), rng.normal(scale=100, size=3)
    return matrix


def image(frame: int, camera: int) -> np.ndarray:  # [H, W, 3] smooth, a different colour per channel
    rows, cols = np.mgrid[0:HEIGHT, 0:WIDTH]
    return np.stack([cols * 8, rows * 10, np.full_like(rows, 40 * frame + 20 * camera)], -1).astype(np.uint8)


def intrinsics(camera: int) -> np.ndarray:  # [3, 3], a different focal length per camera
    return np.array([[20.5 + camera, 0, 11.7], [0, 21.25, 8.1], [0, 0, 1]])


def make_cameras() -> list[CameraCalibration]:
    rng = np.random.default_rng(1)
    return [CameraCalibration(name=name, intrinsics=intrinsics(name),
                              distortion=rng.normal(scale=0.01, size=5), camera_to_vehicle=rigid(rng),
                              width=WIDTH, height=HEIGHT)
            for name in (FRONT, SIDE_LEFT)]


def make_frames() -> list[Frame]:
    """3 frames; the car is in every frame, the pedestrian only in the middle one (no track: fine)."""
    rng = np.random.default_rng(2)
    frames = []
    for index, stamp in enumerate(STAMPS):
        boxes_3d = [Box3d("car-laser", waymo.BoxType.TYPE_VEHICLE, (10.0 + index, -2.5, 0.75),
                          (4.5, 1.9, 1.6), 0.1 * index - 3.1)]
        boxes_2d = {FRONT: [Box2d("car-front", waymo.BoxType.TYPE_VEHICLE, (12.5 - index, 8.0), (6.0, 4.25))],
                    SIDE_LEFT: []}
        if index == 1:
            boxes_3d.insert(0, Box3d("ped-laser", waymo.BoxType.TYPE_PEDESTRIAN, (5.0, 3.0, 0.9),
                                     (0.6, 0.7, 1.8), 1.5))
            boxes_2d[SIDE_LEFT] = [Box2d("ped-side", waymo.BoxType.TYPE_PEDESTRIAN, (3.0, 9.5), (2.0, 5.0))]
        images = {FRONT: image(index, FRONT), SIDE_LEFT: image(index, SIDE_LEFT)}
        frames.append(Frame(stamp, rigid(rng), images, boxes_3d, boxes_2d))
    return frames


@pytest.fixture
def root(tmp_path: Path) -> Path:
    waymo.write_segment(tmp_path, SPLIT, SEGMENT, make_frames(), make_cameras(), jpeg_quality=100)
    return tmp_path


def component(root: Path, tag: str) -> Path:
    return root / SPLIT / tag / f"{SEGMENT}.parquet"


def rewrite(root: Path, tag: str, change: Callable[[pa.Table], pa.Table]) -> None:
    path = component(root, tag)
    pq.write_table(change(pq.read_table(path)), path)


def replace(table: pa.Table, name: str, values: list) -> pa.Table:
    column = pa.array(values, table.schema.field(name).type)
    return table.set_column(table.schema.get_field_index(name), name, column)


# ---------------------------------------------------------------------------------------------
# Round trip and layout.


@pytest.mark.parametrize("camera", [FRONT, SIDE_LEFT])
def test_round_trip(root: Path, camera: int) -> None:
    frames, cameras = make_frames(), {c.name: c for c in make_cameras()}
    segment = waymo.read_segment(root, SPLIT, SEGMENT, camera)
    assert segment.context_name == SEGMENT and segment.num_frames == 3
    assert segment.timestamps_micros.tolist() == list(STAMPS)
    np.testing.assert_array_equal(segment.camera.intrinsics, cameras[camera].intrinsics)
    np.testing.assert_array_equal(segment.camera.distortion, cameras[camera].distortion)
    np.testing.assert_array_equal(segment.camera.camera_to_vehicle, cameras[camera].camera_to_vehicle)
    assert (segment.camera.name, segment.camera.width, segment.camera.height) == (camera, WIDTH, HEIGHT)
    np.testing.assert_array_equal(segment.world_from_vehicle, [f.world_from_vehicle for f in frames])
    assert segment.boxes_3d == tuple(tuple(sorted(f.boxes_3d, key=lambda b: b.object_id)) for f in frames)
    assert segment.boxes_2d == tuple(tuple(f.boxes_2d[camera]) for f in frames)
    images = segment.read_images()
    assert images.shape == (3, HEIGHT, WIDTH, 3) and images.dtype == np.uint8
    expected = np.stack([f.images[camera] for f in frames]).astype(int)
    assert np.abs(images.astype(int) - expected).max() <= 6  # JPEG at quality 100, chroma subsampled
    np.testing.assert_array_equal(segment.read_images([2, 0]), images[[2, 0]])


def test_written_camera_image_schema_is_the_tutorials(root: Path) -> None:
    """An oracle apart from the dataclasses: the column table of tutorial/tutorial_v2.ipynb."""
    documented = """
        string | key.segment_context_name
        int64 | key.frame_timestamp_micros
        int8 | key.camera_name
        binary | [CameraImageComponent].image
        fixed_size_list<item: double>[16] | [CameraImageComponent].pose.transform
        float | [CameraImageComponent].velocity.linear_velocity.x
        float | [CameraImageComponent].velocity.linear_velocity.y
        float | [CameraImageComponent].velocity.linear_velocity.z
        double | [CameraImageComponent].velocity.angular_velocity.x
        double | [CameraImageComponent].velocity.angular_velocity.y
        double | [CameraImageComponent].velocity.angular_velocity.z
        double | [CameraImageComponent].pose_timestamp
        double | [CameraImageComponent].rolling_shutter_params.shutter
        double | [CameraImageComponent].rolling_shutter_params.camera_trigger_time
        double | [CameraImageComponent].rolling_shutter_params.camera_readout_done_time"""
    schema = pq.read_schema(component(root, "camera_image"))
    rows = [line.strip() for line in documented.strip().split("\n")]
    assert [f"{field.type} | {field.name}" for field in schema] == rows


def test_rows_in_any_order_read_in_timestamp_order(root: Path) -> None:
    before = waymo.read_segment(root, SPLIT, SEGMENT, FRONT)
    for tag in waymo.SCHEMAS:
        rewrite(root, tag, lambda table: table.take(np.random.default_rng(3).permutation(table.num_rows)))
    assert pq.read_table(component(root, "vehicle_pose")).column(waymo.TIMESTAMP).to_pylist() != list(STAMPS)
    after = waymo.read_segment(root, SPLIT, SEGMENT, FRONT)
    assert after.timestamps_micros.tolist() == list(STAMPS)
    np.testing.assert_array_equal(after.world_from_vehicle, before.world_from_vehicle)
    assert (after.boxes_3d, after.boxes_2d, after.jpegs) == (before.boxes_3d, before.boxes_2d, before.jpegs)


def test_writer_frames_in_any_order(tmp_path: Path) -> None:
    frames = make_frames()
    waymo.write_segment(tmp_path, SPLIT, SEGMENT, frames[::-1], make_cameras())
    segment = waymo.read_segment(tmp_path, SPLIT, SEGMENT, FRONT)
    assert segment.timestamps_micros.tolist() == list(STAMPS)
    np.testing.assert_array_equal(segment.world_from_vehicle, [f.world_from_vehicle for f in frames])


def test_list_segments(tmp_path: Path) -> None:
    for name in ("2_0_0_1_0", "1_0_0_1_0"):
        waymo.write_segment(tmp_path, SPLIT, name, make_frames(), make_cameras())
    assert waymo.list_segments(tmp_path, SPLIT) == ["1_0_0_1_0", "2_0_0_1_0"]
    with pytest.raises(WaymoNotFoundError, match=r"validation/camera_image not found"):
        waymo.list_segments(tmp_path, "validation")


def test_read_segment_list(tmp_path: Path) -> None:
    path = tmp_path / "test.txt"
    path.write_text(f"# 70 test segments\n{SEGMENT}\n\n  1_0_0_1_0  \n")
    assert waymo.read_segment_list(path) == [SEGMENT, "1_0_0_1_0"]
    path.write_text(f"{SEGMENT}\ntraining/camera_image/{SEGMENT}.parquet\n")
    with pytest.raises(WaymoError, match=r"line 2: .* is not a segment context name"):
        waymo.read_segment_list(path)
    path.write_text(f"{SEGMENT}\n1_0_0_1_0\n{SEGMENT}\n")
    with pytest.raises(WaymoError, match=rf"line 3: segment {SEGMENT} is listed twice"):
        waymo.read_segment_list(path)
    path.write_text("# nothing\n\n")
    with pytest.raises(WaymoError, match="names no segment"):
        waymo.read_segment_list(path)
    with pytest.raises(WaymoNotFoundError, match="missing.txt not found"):
        waymo.read_segment_list(tmp_path / "missing.txt")


# ---------------------------------------------------------------------------------------------
# Bad data: clear errors, raised by read_segment before any image is decoded.


def drop_row(index: int) -> Callable[[pa.Table], pa.Table]:
    return lambda table: table.filter(pa.array(np.arange(table.num_rows) != index))


def set_first(name: str, value: object) -> Callable[[pa.Table], pa.Table]:
    return lambda table: replace(table, name, [value] + table.column(name).to_pylist()[1:])


def shift_timestamps(table: pa.Table) -> pa.Table:
    return replace(table, waymo.TIMESTAMP, [t + 1 for t in table.column(waymo.TIMESTAMP).to_pylist()])


def camera_names_as_text(table: pa.Table) -> pa.Table:  # as in the repository's camera_hkp test data
    names = [waymo.CameraName(name).name for name in table.column(waymo.CAMERA).to_pylist()]
    return table.set_column(table.schema.get_field_index(waymo.CAMERA), waymo.CAMERA, pa.array(names))


BAD = {  # what a bad file looks like -> (component, change, the error's words)
    "missing column": ("lidar_box", lambda table: table.drop_columns(["[LiDARBoxComponent].box.heading"]),
                       (r"lidar_box/.*\.parquet has no column '\[LiDARBoxComponent\]\.box\.heading': "
                        r"it is not a Waymo Open Dataset v2 lidar_box component")),
    "3D box without object id": ("lidar_box", set_first("key.laser_object_id", None),
                                 (r"1 box row\(s\) have no key\.laser_object_id .*every box needs its "
                                  r"object id")),
    "2D box without object id": ("camera_box", set_first("key.camera_object_id", None),
                                 r"have no key\.camera_object_id"),
    "a pose fewer": ("vehicle_pose", drop_row(1),
                     (r"camera_image/.* has 3 frames of camera 1 \(FRONT\) but .*vehicle_pose/.* has 2 "
                      r"vehicle poses")),
    "poses of other frames": ("vehicle_pose", shift_timestamps,
                              rf"has no vehicle pose at timestamp {STAMPS[0]}, a frame of .*camera_image"),
    "not a JPEG": ("camera_image", set_first(IMAGE, b"<html>not found</html>"),
                   rf"the image of camera 1 \(FRONT\) at timestamp {STAMPS[0]} is not a JPEG"),
    "an empty image": ("camera_image", set_first(IMAGE, None), "is not a JPEG"),
    "an image twice": ("camera_image", set_first(waymo.TIMESTAMP, STAMPS[1]),
                       rf"two images of camera 1 \(FRONT\) at timestamp {STAMPS[1]}"),
    "camera names as text": ("camera_box", camera_names_as_text,
                             r"column 'key\.camera_name' is string, not an integer"),
    "boxes off the frames": ("lidar_box", shift_timestamps, r"boxes at 3 timestamp\(s\) that are not frames"),
    "an object twice": ("lidar_box", lambda table: pa.concat_tables([table, table.slice(0, 1)]),
                        rf"object 'car-laser' twice at timestamp {STAMPS[0]}"),
    "another segment": ("vehicle_pose", set_first(waymo.CONTEXT, "1_0_0_1_0"),
                        r"holds rows of segment\(s\) \['1_0_0_1_0'\]"),
    "an empty number": ("lidar_box", set_first("[LiDARBoxComponent].box.center.x", None),
                        r"column '\[LiDARBoxComponent\]\.box\.center\.x' has 1 empty value"),
    "a NaN pose": ("vehicle_pose",
                   set_first("[VehiclePoseComponent].world_from_vehicle.transform", [np.nan] * 16),
                   r"world_from_vehicle\.transform' holds NaN"),
    "uncalibrated camera": ("camera_calibration", drop_row(0),
                            (r"camera_calibration/.* has 0 rows of camera 1 \(FRONT\) \(needs one\); it "
                             r"calibrates cameras 4 \(SIDE_LEFT\)")),
    "not parquet": ("camera_box", None, r"camera_box/.* is not a parquet file"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_component(root: Path, case: str) -> None:
    tag, change, words = BAD[case]
    if change is None:
        component(root, tag).write_bytes(b"PAR1 and then nothing")
    else:
        rewrite(root, tag, change)
    with pytest.raises(WaymoError, match=words):
        waymo.read_segment(root, SPLIT, SEGMENT, FRONT)


@pytest.mark.parametrize("tag", list(waymo.SCHEMAS))
def test_missing_component(root: Path, tag: str) -> None:
    component(root, tag).unlink()
    words = rf"{tag}/{SEGMENT}\.parquet not found: segment {SEGMENT} needs its {tag} component"
    with pytest.raises(FileNotFoundError, match=words):
        waymo.read_segment(root, SPLIT, SEGMENT, FRONT)


def test_camera_not_in_segment(root: Path) -> None:
    words = (rf"Segment {SEGMENT} has no images of camera 2 \(FRONT_LEFT\) .*it has cameras 1 \(FRONT\), "
             r"4 \(SIDE_LEFT\)")
    with pytest.raises(WaymoError, match=words):
        waymo.read_segment(root, SPLIT, SEGMENT, waymo.CameraName.FRONT_LEFT)


def test_damaged_jpeg_named_when_decoded(root: Path) -> None:
    def damage(table: pa.Table) -> pa.Table:  # keeps the JPEG start marker, zeroes the rest
        stamps, jpegs = table.column(waymo.TIMESTAMP).to_pylist(), table.column(IMAGE).to_pylist()
        damaged = [jpeg[:2] + b"\x00" * 40 if stamp == STAMPS[2] else jpeg
                   for stamp, jpeg in zip(stamps, jpegs)]
        return replace(table, IMAGE, damaged)

    rewrite(root, "camera_image", damage)
    segment = waymo.read_segment(root, SPLIT, SEGMENT, SIDE_LEFT)
    assert segment.read_images([0, 1]).shape == (2, HEIGHT, WIDTH, 3)
    words = rf"image of camera 4 \(SIDE_LEFT\) at timestamp {STAMPS[2]} does not decode as a JPEG"
    with pytest.raises(WaymoError, match=words):
        segment.read_images()


def test_image_size_against_calibration(root: Path) -> None:
    rewrite(root, "camera_calibration", lambda table: replace(
        table, "[CameraCalibrationComponent].width", [WIDTH * 2] * table.num_rows))
    segment = waymo.read_segment(root, SPLIT, SEGMENT, FRONT)
    words = rf"is {WIDTH}x{HEIGHT} but camera_calibration says {WIDTH * 2}x{HEIGHT}"
    with pytest.raises(WaymoError, match=words):
        segment.read_images()


# ---------------------------------------------------------------------------------------------
# The writer refuses what the reader would refuse.


def test_writer_errors(tmp_path: Path) -> None:
    frames, cameras = make_frames(), make_cameras()
    waymo.write_segment(tmp_path, SPLIT, SEGMENT, frames, cameras)
    with pytest.raises(WaymoError, match="already exist; remove them first"):
        waymo.write_segment(tmp_path, SPLIT, SEGMENT, frames, cameras)
    with pytest.raises(WaymoError, match=r"frame .* has images of cameras \[1, 4\] .* the cameras are \[1\]"):
        waymo.write_segment(tmp_path, SPLIT, "1_0_0_1_0", frames, cameras[:1])
    small = [Frame(f.timestamp_micros, f.world_from_vehicle, {k: v[:8] for k, v in f.images.items()})
             for f in frames]
    with pytest.raises(WaymoError, match=r"the image must be \[16, 24, 3\] uint8, got \[8, 24, 3\] uint8"):
        waymo.write_segment(tmp_path, SPLIT, "1_0_0_1_0", small, cameras)
    skew = np.zeros((3, 3))
    skew[0, 1] = 0.5
    skewed = CameraCalibration(FRONT, intrinsics(FRONT) + skew, cameras[0].distortion,
                               cameras[0].camera_to_vehicle, WIDTH, HEIGHT)
    with pytest.raises(WaymoError, match=r"camera 1 \(FRONT\) needs intrinsics \[\[f_u, 0, c_u\]"):
        waymo.write_segment(tmp_path, SPLIT, "1_0_0_1_0", frames, [skewed, cameras[1]])
    with pytest.raises(WaymoError, match="distinct timestamps"):
        waymo.write_segment(tmp_path, SPLIT, "1_0_0_1_0", frames[:1] * 2, cameras)
    with pytest.raises(WaymoError, match="is not a segment context name"):
        waymo.write_segment(tmp_path, SPLIT, "a/b", frames, cameras)
    assert waymo.list_segments(tmp_path, SPLIT) == [SEGMENT]


def test_written_rows_compare_with_a_hand_count(root: Path) -> None:
    """One row per camera, per frame and camera, per frame, per 2D box, per 3D box (the release's keys)."""
    rows = {tag: pq.read_metadata(component(root, tag)).num_rows for tag in waymo.SCHEMAS}
    assert rows == {"camera_calibration": 2, "camera_image": 6, "vehicle_pose": 3, "camera_box": 4,
                    "lidar_box": 4}
    boxes = pq.read_table(component(root, "camera_box"))
    assert pc.sum(pc.equal(boxes.column(waymo.CAMERA), SIDE_LEFT)).as_py() == 1

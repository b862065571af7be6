"""Read one segment of the Waymo Open Dataset v2 (parquet components) for one camera; write fixtures.

No TensorFlow and no ``waymo-open-dataset`` package: the components are plain parquet files, read
with pyarrow. Layout of the official release (``waymo_open_dataset_v_2_0_0/<split>/`` in
``tutorial/tutorial_object_asset.ipynb``), one file per component and segment (``context.name``)::

    <root>/<split>/camera_image/<context_name>.parquet         JPEG per camera per frame
    <root>/<split>/camera_calibration/<context_name>.parquet   one row per camera
    <root>/<split>/vehicle_pose/<context_name>.parquet         one row per frame
    <root>/<split>/camera_box/<context_name>.parquet           one row per 2D box per camera per frame
    <root>/<split>/lidar_box/<context_name>.parquet            one row per 3D box per frame

with ``<split>`` e.g. ``training`` or ``validation``.

Column names and arrow types are those of the v2 component dataclasses in
github.com/waymo-research/waymo-open-dataset, ``src/waymo_open_dataset/v2/``. ``component.py`` flattens
a component into columns: key fields become ``key.<field>``, every other field
``[<ComponentClass>].<field>.<subfield>``. The ``*_SCHEMA`` constants below spell them out, each from:

- ``camera_image``: ``perception/camera_image.py`` (``CameraImageComponent``; ``CameraName`` enum), key
  from ``perception/base.py`` (``CameraKey``: ``key.segment_context_name``, ``key.frame_timestamp_micros``,
  ``key.camera_name`` int8), ``pose``/``velocity`` from ``column_types.py`` (``Transform``, ``Vec3s``,
  ``Vec3d``). The same table is printed in ``tutorial/tutorial_v2.ipynb`` ("Supported components").
- ``camera_calibration``: ``perception/context.py`` (``CameraCalibrationComponent``, ``Intrinsic``),
  key ``SegmentCameraKey`` from ``perception/base.py`` (no timestamp: one row per camera).
- ``vehicle_pose``: ``perception/pose.py`` (``VehiclePoseComponent``), key ``FrameKey`` (base.py).
- ``camera_box``: ``perception/box.py`` (``CameraBoxComponent``, ``DifficultyLevel``,
  ``BoxType`` enum), key ``CameraLabelKey`` (base.py: ``key.camera_object_id``), box
  ``BoxAxisAligned2d`` (column_types.py).
- ``lidar_box``: ``perception/box.py`` (``LiDARBoxComponent``), key ``LaserLabelKey`` (base.py:
  ``key.laser_object_id``), box ``Box3d`` (column_types.py).

Units and frames (``column_types.py``, ``context.py``, ``dataset.proto``, ``label.proto``,
``wdl_limited/camera/camera_model.cc``):

- ``key.frame_timestamp_micros``: microseconds; it is the frame's, shared by every component.
- ``*.transform``: 16 float64, a row-major 4x4 (``dataset.proto``: "4x4 row major transform matrix").
  ``world_from_vehicle``: vehicle to world, metres. ``extrinsic``: camera to vehicle.
- Camera axes are Waymo's, NOT OpenCV's: +x forward (the optical axis), +y left, +z up. A camera
  point ``(x, y, z)`` goes to normalised ``(-y / x, -z / x)``, then through the OpenCV distortion
  ``k1, k2, p1, p2, k3`` and ``u = f_u * . + c_u``, ``v = f_v * . + c_v`` (pixels; camera_model.cc's
  ``CameraToImageWithDepth``).
- 3D boxes: vehicle frame of their frame, metres; size = (length along x, width along y, height
  along z); heading: radians about +z, from +x to the box's front, in [-pi, pi).
- 2D boxes: pixels, axis-aligned, centre (u, v) and size (width, height).
- ``key.camera_object_id`` (2D boxes) and ``key.laser_object_id`` (3D boxes) are different ids; the
  ``camera_to_lidar_box_association`` component links them (pedestrians only), and is not read here.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "Box2d",
    "Box3d",
    "BoxType",
    "CameraCalibration",
    "CameraName",
    "Frame",
    "Segment",
    "WaymoError",
    "WaymoNotFoundError",
    "checked_segments",
    "choose_segments",
    "frame_rate",
    "list_segments",
    "read_segment",
    "read_segment_list",
    "write_segment",
]


class CameraName(IntEnum):  # perception/camera_image.py, CameraName
    UNKNOWN = 0
    FRONT = 1
    FRONT_LEFT = 2
    FRONT_RIGHT = 3
    SIDE_LEFT = 4
    SIDE_RIGHT = 5


CAMERA_LABELS = {camera.value: f"{camera.value} ({camera.name})" for camera in CameraName}


class BoxType(IntEnum):  # perception/box.py, BoxType
    TYPE_UNKNOWN = 0
    TYPE_VEHICLE = 1
    TYPE_PEDESTRIAN = 2
    TYPE_SIGN = 3
    TYPE_CYCLIST = 4


GLOBAL_SHUTTER = 5  # perception/context.py, RollingShutterReadOutDirection.GLOBAL_SHUTTER

CONTEXT = "key.segment_context_name"
TIMESTAMP = "key.frame_timestamp_micros"
CAMERA = "key.camera_name"
TRANSFORM = pa.list_(pa.float64(), 16)  # column_types.py, Transform

CAMERA_IMAGE_SCHEMA = pa.schema([
    (CONTEXT, pa.string()), (TIMESTAMP, pa.int64()), (CAMERA, pa.int8()),
    ("[CameraImageComponent].image", pa.binary()),
    ("[CameraImageComponent].pose.transform", TRANSFORM),
    *((f"[CameraImageComponent].velocity.linear_velocity.{a}", pa.float32()) for a in "xyz"),
    *((f"[CameraImageComponent].velocity.angular_velocity.{a}", pa.float64()) for a in "xyz"),
    ("[CameraImageComponent].pose_timestamp", pa.float64()),
    *((f"[CameraImageComponent].rolling_shutter_params.{name}", pa.float64())
      for name in ("shutter", "camera_trigger_time", "camera_readout_done_time")),
])
INTRINSIC_FIELDS = ("f_u", "f_v", "c_u", "c_v", "k1", "k2", "p1", "p2", "k3")
CAMERA_CALIBRATION_SCHEMA = pa.schema([
    (CONTEXT, pa.string()), (CAMERA, pa.int8()),
    *((f"[CameraCalibrationComponent].intrinsic.{name}", pa.float64()) for name in INTRINSIC_FIELDS),
    ("[CameraCalibrationComponent].extrinsic.transform", TRANSFORM),
    ("[CameraCalibrationComponent].width", pa.int32()),
    ("[CameraCalibrationComponent].height", pa.int32()),
    ("[CameraCalibrationComponent].rolling_shutter_direction", pa.int8()),
])
VEHICLE_POSE_SCHEMA = pa.schema([
    (CONTEXT, pa.string()), (TIMESTAMP, pa.int64()),
    ("[VehiclePoseComponent].world_from_vehicle.transform", TRANSFORM),
])
CAMERA_BOX_SCHEMA = pa.schema([
    (CONTEXT, pa.string()), (TIMESTAMP, pa.int64()), (CAMERA, pa.int8()),
    ("key.camera_object_id", pa.string()),
    *((f"[CameraBoxComponent].box.{part}.{a}", pa.float64()) for part in ("center", "size") for a in "xy"),
    ("[CameraBoxComponent].type", pa.int8()),
    ("[CameraBoxComponent].difficulty_level.detection", pa.int8()),
    ("[CameraBoxComponent].difficulty_level.tracking", pa.int8()),
])
LIDAR_BOX_SCHEMA = pa.schema([
    (CONTEXT, pa.string()), (TIMESTAMP, pa.int64()), ("key.laser_object_id", pa.string()),
    *((f"[LiDARBoxComponent].box.{part}.{a}", pa.float64()) for part in ("center", "size") for a in "xyz"),
    ("[LiDARBoxComponent].box.heading", pa.float64()),
    ("[LiDARBoxComponent].type", pa.int8()),
    ("[LiDARBoxComponent].num_lidar_points_in_box", pa.int64()),
    ("[LiDARBoxComponent].num_top_lidar_points_in_box", pa.int64()),
    *((f"[LiDARBoxComponent].{name}.{a}", pa.float64()) for name in ("speed", "acceleration") for a in "xyz"),
    ("[LiDARBoxComponent].difficulty_level.detection", pa.int8()),
    ("[LiDARBoxComponent].difficulty_level.tracking", pa.int8()),
])
SCHEMAS = {
    "camera_image": CAMERA_IMAGE_SCHEMA,
    "camera_calibration": CAMERA_CALIBRATION_SCHEMA,
    "vehicle_pose": VEHICLE_POSE_SCHEMA,
    "camera_box": CAMERA_BOX_SCHEMA,
    "lidar_box": LIDAR_BOX_SCHEMA,
}
CONTEXT_NAME = re.compile(r"[A-Za-z0-9_-]+")  # e.g. 10023947602400723454_1120_000_1140_000


class WaymoError(ValueError):
    """Data that is not a well-formed Waymo Open Dataset v2 segment."""


class WaymoNotFoundError(WaymoError, FileNotFoundError):
    """A component file, split folder or segment list that is not there."""


@dataclass(frozen=True, eq=False)
class CameraCalibration:
    name: int  # CameraName
    intrinsics: np.ndarray  # [3, 3] pixels: f_u, f_v on the diagonal, (c_u, c_v) in the last column
    distortion: np.ndarray  # [5] k1, k2, p1, p2, k3 (OpenCV's order and meaning)
    camera_to_vehicle: np.ndarray  # [4, 4] the extrinsic, Waymo camera axes (+x forward, +y left, +z up)
    width: int  # pixels
    height: int


@dataclass(frozen=True)
class Box3d:
    object_id: str  # key.laser_object_id: the same object keeps it across the segment's frames
    type: int  # BoxType
    center: tuple[float, float, float]  # metres, vehicle frame of this frame
    size: tuple[float, float, float]  # length (x), width (y), height (z), metres
    heading: float  # radians about +z, in [-pi, pi)


@dataclass(frozen=True)
class Box2d:
    object_id: str  # key.camera_object_id: not the same ids as Box3d's
    type: int  # BoxType
    center: tuple[float, float]  # (u, v) pixels
    size: tuple[float, float]  # (width, height) pixels


@dataclass(frozen=True, eq=False)
class Frame:
    """One frame of every camera: what :func:`write_segment` writes."""

    timestamp_micros: int
    world_from_vehicle: np.ndarray  # [4, 4]
    images: Mapping[int, np.ndarray]  # camera name -> [H, W, 3] uint8 RGB
    boxes_3d: Sequence[Box3d] = ()
    boxes_2d: Mapping[int, Sequence[Box2d]] = field(default_factory=dict)  # camera name -> its boxes


@dataclass(frozen=True, eq=False)
class Segment:
    """One camera of one segment, frames in timestamp order; images decode on demand."""

    context_name: str
    camera: CameraCalibration
    timestamps_micros: np.ndarray  # [T] int64, ascending
    world_from_vehicle: np.ndarray  # [T, 4, 4]
    boxes_3d: tuple[tuple[Box3d, ...], ...]  # [T] boxes of each frame, sorted by object id
    boxes_2d: tuple[tuple[Box2d, ...], ...]  # [T] this camera's boxes of each frame, sorted by object id
    jpegs: tuple[bytes, ...]  # [T]
    path: Path  # the camera_image file, for messages

    @property
    def num_frames(self) -> int:
        return len(self.jpegs)

    def read_images(self, indices: Sequence[int] | None = None) -> np.ndarray:  # -> [t, H, W, 3] uint8 RGB
        """Decode the JPEGs of frames ``indices`` (all by default).

        Raises:
            WaymoError: an image does not decode, or its size is not the calibration's.
        """
        chosen = range(self.num_frames) if indices is None else indices
        images = np.empty((len(chosen), self.camera.height, self.camera.width, 3), np.uint8)
        for out, index in enumerate(chosen):
            where = f"{self.path}: the image of camera {_camera_label(self.camera.name)} at timestamp " \
                    f"{self.timestamps_micros[index]}"
            bgr = cv2.imdecode(np.frombuffer(self.jpegs[index], np.uint8), cv2.IMREAD_COLOR)
            if bgr is None:
                raise WaymoError(f"{where} does not decode as a JPEG; the file is damaged, download it "
                                 "again.")
            if bgr.shape[:2] != images.shape[1:3]:
                raise WaymoError(f"{where} is {bgr.shape[1]}x{bgr.shape[0]} but camera_calibration says "
                                 f"{self.camera.width}x{self.camera.height}.")
            images[out] = bgr[..., ::-1]
        return images


def _camera_label(name: int) -> str:
    return CAMERA_LABELS.get(name, str(name))


def _component_path(root: str | os.PathLike, split: str, tag: str, context_name: str) -> Path:
    return Path(root) / split / tag / f"{context_name}.parquet"


def _component(root: str | os.PathLike, split: str, tag: str, context_name: str, columns: Sequence[str],
               camera: int | None = None) -> tuple[pa.Table, Path]:
    """``columns`` of a component of segment ``context_name`` (the rows of ``camera`` only, if given)."""
    path = _component_path(root, split, tag, context_name)
    if not path.is_file():
        raise WaymoNotFoundError(f"{path} not found: segment {context_name} needs its {tag} component; "
                                 f"download {split}/{tag}/{context_name}.parquet of the Waymo Open Dataset "
                                 "v2.")
    try:
        schema = pq.read_schema(path)
    except pa.ArrowException as error:
        raise WaymoError(f"{path} is not a parquet file ({error}).") from error
    for column in columns:
        if column not in schema.names:
            raise WaymoError(f"{path} has no column {column!r}: it is not a Waymo Open Dataset v2 {tag} "
                             f"component (its columns: SCHEMAS[{tag!r}] in stages/common/waymo.py).")
    for column in {CAMERA, TIMESTAMP} & set(columns):
        if not pa.types.is_integer(schema.field(column).type):
            raise WaymoError(f"{path}: column {column!r} is {schema.field(column).type}, not an integer; "
                             f"it is not a Waymo Open Dataset v2 {tag} component.")
    filters = None if camera is None else [(CAMERA, "=", camera)]
    table = pq.read_table(path, columns=list(columns), filters=filters)
    others = set(table.column(CONTEXT).to_pylist()) - {context_name}
    if others:
        raise WaymoError(f"{path} holds rows of segment(s) {sorted(map(str, others))}; a component file "
                         f"holds only the segment {context_name} it is named after.")
    return table, path


def _scalars(table: pa.Table, columns: Sequence[str], path: Path) -> np.ndarray:  # -> [rows, len(columns)]
    for column in columns:
        empty = table.column(column).null_count
        if empty:
            raise WaymoError(f"{path}: column {column!r} has {empty} empty value(s).")
    values = np.stack([table.column(c).to_numpy().astype(np.float64) for c in columns], axis=1)
    if not np.isfinite(values).all():
        raise WaymoError(f"{path}: columns {list(columns)} hold NaN or infinite values.")
    return values


def _transforms(table: pa.Table, column: str, path: Path) -> np.ndarray:  # -> [rows, 4, 4]
    rows = table.column(column).to_pylist()
    if any(row is None or len(row) != 16 for row in rows):
        raise WaymoError(f"{path}: every {column!r} must hold 16 numbers (a row-major 4x4).")
    values = np.array(rows, np.float64).reshape(len(rows), 4, 4)
    if not np.isfinite(values).all():
        raise WaymoError(f"{path}: column {column!r} holds NaN or infinite values.")
    return values


def _calibration(root: str | os.PathLike, split: str, context_name: str, camera: int) -> CameraCalibration:
    prefix = "[CameraCalibrationComponent]."
    numbers = [f"{prefix}intrinsic.{name}" for name in INTRINSIC_FIELDS]
    transform, size = f"{prefix}extrinsic.transform", [f"{prefix}width", f"{prefix}height"]
    table, path = _component(root, split, "camera_calibration", context_name,
                             [CONTEXT, CAMERA, *numbers, transform, *size])
    names = table.column(CAMERA).to_pylist()
    if names.count(camera) != 1:
        raise WaymoError(f"{path} has {names.count(camera)} rows of camera {_camera_label(camera)} (needs "
                         f"one); it calibrates cameras {', '.join(map(_camera_label, sorted(names)))}.")
    row = table.slice(names.index(camera), 1)
    f_u, f_v, c_u, c_v, *distortion = _scalars(row, numbers, path)[0]
    width, height = (int(v) for v in _scalars(row, size, path)[0])
    return CameraCalibration(
        name=camera, intrinsics=np.array([[f_u, 0.0, c_u], [0.0, f_v, c_v], [0.0, 0.0, 1.0]]),
        distortion=np.array(distortion), camera_to_vehicle=_transforms(row, transform, path)[0],
        width=width, height=height)


def _camera_images(root: str | os.PathLike, split: str, context_name: str,
                   camera: int) -> tuple[Path, dict[int, int], tuple[bytes, ...]]:
    """The camera_image file, its frames (timestamp -> index in time order) and JPEGs in time order."""
    image = "[CameraImageComponent].image"
    table, path = _component(root, split, "camera_image", context_name, [CONTEXT, CAMERA])
    cameras = sorted(set(table.column(CAMERA).to_pylist()))
    if camera not in cameras:
        raise WaymoError(f"Segment {context_name} has no images of camera {_camera_label(camera)} in {path}; "
                         f"it has cameras {', '.join(map(_camera_label, cameras))}: choose one of those.")
    table, path = _component(root, split, "camera_image", context_name, [CONTEXT, TIMESTAMP, image], camera)
    stamps, jpegs = table.column(TIMESTAMP).to_pylist(), table.column(image).to_pylist()
    order = sorted(range(len(stamps)), key=stamps.__getitem__)
    repeated = [timestamp for timestamp, count in Counter(stamps).items() if count > 1]
    if repeated:
        raise WaymoError(f"{path} has two images of camera {_camera_label(camera)} at timestamp "
                         f"{repeated[0]}.")
    for timestamp, jpeg in zip(stamps, jpegs):
        if not jpeg or not jpeg.startswith(b"\xff\xd8"):
            raise WaymoError(f"{path}: the image of camera {_camera_label(camera)} at timestamp {timestamp} "
                             "is not a JPEG (no JPEG start marker); the file is damaged, download it again.")
    return path, {stamps[i]: index for index, i in enumerate(order)}, tuple(jpegs[i] for i in order)


def _poses(root: str | os.PathLike, split: str, context_name: str, frames: dict[int, int], image_path: Path,
           camera: int) -> np.ndarray:  # -> [T, 4, 4] world from vehicle, in the order of ``frames``
    transform = "[VehiclePoseComponent].world_from_vehicle.transform"
    table, path = _component(root, split, "vehicle_pose", context_name, [CONTEXT, TIMESTAMP, transform])
    stamps = table.column(TIMESTAMP).to_pylist()
    if len(stamps) != len(frames):
        raise WaymoError(f"{image_path} has {len(frames)} frames of camera {_camera_label(camera)} but "
                         f"{path} has {len(stamps)} vehicle poses; both must cover the same frames.")
    unposed = sorted(frames.keys() - set(stamps))
    if unposed:
        raise WaymoError(f"{path} has no vehicle pose at timestamp {unposed[0]}, a frame of {image_path}.")
    world_from_vehicle = np.empty((len(frames), 4, 4))
    world_from_vehicle[[frames[t] for t in stamps]] = _transforms(table, transform, path)
    return world_from_vehicle


def _boxes(table: pa.Table, path: Path, id_column: str, frames: dict[int, int], numbers: Sequence[str],
           type_column: str, make: Callable[[str, int, list[float]], Box3d | Box2d]) -> tuple[tuple, ...]:
    """Boxes per frame (``frames``: timestamp -> frame index), each frame's sorted by object id."""
    ids, stamps = table.column(id_column).to_pylist(), table.column(TIMESTAMP).to_pylist()
    if None in ids:
        raise WaymoError(f"{path}: {ids.count(None)} box row(s) have no {id_column} (first at timestamp "
                         f"{stamps[ids.index(None)]}); every box needs its object id.")
    stray = sorted(set(stamps) - frames.keys())
    if stray:
        raise WaymoError(f"{path} has boxes at {len(stray)} timestamp(s) that are not frames of the chosen "
                         f"camera in camera_image, e.g. {stray[0]}.")
    values = _scalars(table, [*numbers, type_column], path)
    per_frame: list[dict[str, Box3d | Box2d]] = [{} for _ in frames]
    for object_id, timestamp, row in zip(ids, stamps, values):
        boxes = per_frame[frames[timestamp]]
        if object_id in boxes:
            raise WaymoError(f"{path} has object {object_id!r} twice at timestamp {timestamp}.")
        boxes[object_id] = make(object_id, int(row[-1]), row[:-1].tolist())
    return tuple(tuple(boxes[k] for k in sorted(boxes)) for boxes in per_frame)


def read_segment(root: str | os.PathLike, split: str, context_name: str,
                 camera: int = CameraName.FRONT) -> Segment:
    """Read segment ``context_name`` of ``<root>/<split>`` as seen by ``camera`` (a CameraName).

    Every check runs here, before any image is decoded (:meth:`Segment.read_images` decodes).

    Raises:
        WaymoNotFoundError: a component file is missing.
        WaymoError: not a v2 component (a column missing), no such camera, frames of camera_image and
            vehicle_pose that differ, a box without object id, an image row that is not a JPEG, ...
    """
    path, frames, jpegs = _camera_images(root, split, context_name, camera)
    calibration = _calibration(root, split, context_name, camera)
    world_from_vehicle = _poses(root, split, context_name, frames, path, camera)

    lidar = "[LiDARBoxComponent]."
    numbers = [f"{lidar}box.{part}.{a}" for part in ("center", "size") for a in "xyz"]
    numbers.append(f"{lidar}box.heading")
    table, box_path = _component(root, split, "lidar_box", context_name,
                                 [CONTEXT, TIMESTAMP, "key.laser_object_id", *numbers, f"{lidar}type"])
    boxes_3d = _boxes(table, box_path, "key.laser_object_id", frames, numbers, f"{lidar}type",
                      lambda i, t, v: Box3d(i, t, (v[0], v[1], v[2]), (v[3], v[4], v[5]), v[6]))

    cam = "[CameraBoxComponent]."
    numbers = [f"{cam}box.{part}.{a}" for part in ("center", "size") for a in "xy"]
    table, box_path = _component(root, split, "camera_box", context_name,
                                 [CONTEXT, TIMESTAMP, CAMERA, "key.camera_object_id", *numbers, f"{cam}type"],
                                 camera)
    boxes_2d = _boxes(table, box_path, "key.camera_object_id", frames, numbers, f"{cam}type",
                      lambda i, t, v: Box2d(i, t, (v[0], v[1]), (v[2], v[3])))

    return Segment(context_name=context_name, camera=calibration,
                   timestamps_micros=np.array(sorted(frames), np.int64),
                   world_from_vehicle=world_from_vehicle, boxes_3d=boxes_3d, boxes_2d=boxes_2d, jpegs=jpegs,
                   path=path)


def list_segments(root: str | os.PathLike, split: str) -> list[str]:
    """Context names of the segments in ``<root>/<split>`` (those with a camera_image file), sorted."""
    folder = Path(root) / split / "camera_image"
    if not folder.is_dir():
        raise WaymoNotFoundError(f"{folder} not found: a Waymo Open Dataset v2 split folder holds one folder "
                                 "per component (camera_image, vehicle_pose, ...).")
    return sorted(path.stem for path in folder.glob("*.parquet"))


def choose_segments(root: str | os.PathLike, splits: Mapping[str, tuple[str, str | None]], section: str,
                    optional: bool = False) -> list[tuple[str, str, str]]:
    """The segments a stage reads, checked before any image is decoded.

    Args:
        root: a Waymo Open Dataset v2 folder (``<split>/<component>/<segment>.parquet``).
        splits: pairs split (``train``/``test``) -> (the release's split folder, a segment list file or None
            for every segment of that folder).
        section: the params section (``masks``, ``reinsert``), named in the errors with its keys
            ``waymo_path`` and ``waymo_<split>_segments``.
        optional: ``<section>.waymo_path`` may be null (the error says so).

    Returns:
        ``(context name, pairs split, split folder)`` per segment, in the order of ``splits``.

    Raises:
        WaymoError: no such folder, an empty split or a segment in two splits (what :func:`read_segment`
            refuses is checked when each is read).
    """
    root = Path(root)
    if not root.is_dir():
        raise WaymoNotFoundError(f"{section}.waymo_path: {root} is not a folder; point it at a Waymo Open Dataset "
                                 "v2 folder (<split>/camera_image/<segment>.parquet, ...; docs/data.md)"
                                 + (", or set it to null." if optional else "."))
    chosen = []
    for split, (folder, listing) in splits.items():
        names = read_segment_list(listing) if listing else list_segments(root, folder)
        if not names:
            raise WaymoError(f"{root / folder / 'camera_image'} holds no segment; the {split} pairs need at least "
                             f"one (or list them with {section}.waymo_{split}_segments).")
        chosen += [(name, split, folder) for name in names]
    counts = Counter(name for name, _, _ in chosen)
    twice = sorted(name for name, count in counts.items() if count > 1)
    if twice:
        raise WaymoError(f"Waymo segment(s) {twice} are both training and test segments; a segment may be in one "
                         f"split only (check {section}.waymo_train_segments / waymo_test_segments).")
    return chosen


def checked_segments(root: str | os.PathLike, splits: Mapping[str, tuple[str, str | None]], section: str,
                     camera: int, frames: int = 0, optional: bool = False,
                     error: type[Exception] = WaymoError) -> Iterator[tuple[Segment, str, str, int]]:
    """Read and check each segment :func:`choose_segments` picks, one at a time (a real split's images do not
    fit in memory together): ``(segment, pairs split, split folder, frames kept)``, no image decoded.

    Raises:
        error: a segment with fewer than ``frames`` frames (``<section>.waymo_frames``; 0: all).
        WaymoError: what :func:`choose_segments` and :func:`read_segment` refuse.
    """
    for name, split, folder in choose_segments(root, splits, section, optional):
        segment = read_segment(root, folder, name, camera)
        if frames > segment.num_frames:
            raise error(f"{segment.path}: segment {name} has {segment.num_frames} frames, fewer than "
                        f"{section}.waymo_frames ({frames}); lower it, or 0 for every frame.")
        yield segment, split, folder, frames or segment.num_frames


def frame_rate(segment: Segment, frames: int) -> float:
    """Frames per second of the first ``frames`` frames, from their timestamps (the release: 10 Hz)."""
    steps = np.diff(segment.timestamps_micros[:frames])
    return round(1e6 / float(np.median(steps)), 3) if len(steps) else 10.0


def read_segment_list(path: str | os.PathLike) -> list[str]:
    """Context names listed in a text file, one per line (blank lines and ``#`` comments skipped).

    Such lists fix a split of segments, e.g. the paper's 230 training and 70 test segments.
    """
    path = Path(path)
    if not path.is_file():
        raise WaymoNotFoundError(f"Segment list {path} not found.")
    names: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        if not CONTEXT_NAME.fullmatch(name):
            raise WaymoError(f"{path}, line {number}: {name!r} is not a segment context name; write one name "
                             "per line, like 10023947602400723454_1120_000_1140_000 (no path, no .parquet).")
        if name in names:
            raise WaymoError(f"{path}, line {number}: segment {name} is listed twice.")
        names.append(name)
    if not names:
        raise WaymoError(f"Segment list {path} names no segment.")
    return names


def _check(context_name: str, frames: Sequence[Frame], cameras: Sequence[CameraCalibration]) -> None:
    names = [int(camera.name) for camera in cameras]
    stamps = [frame.timestamp_micros for frame in frames]
    if not CONTEXT_NAME.fullmatch(context_name):
        raise WaymoError(f"write_segment: {context_name!r} is not a segment context name (letters, digits, "
                         "_ and - only).")
    if not frames or not cameras or len(set(names)) != len(names) or len(set(stamps)) != len(stamps):
        raise WaymoError(f"write_segment: needs frames of distinct timestamps and cameras of distinct names; "
                         f"got timestamps {stamps} and cameras {names}.")
    for camera in cameras:
        matrix = np.asarray(camera.intrinsics)
        if matrix.shape != (3, 3) or matrix[0, 1] or matrix[1, 0] or list(matrix[2]) != [0, 0, 1] \
                or np.shape(camera.distortion) != (5,) or np.shape(camera.camera_to_vehicle) != (4, 4):
            raise WaymoError(f"write_segment: camera {_camera_label(camera.name)} needs intrinsics "
                             "[[f_u, 0, c_u], [0, f_v, c_v], [0, 0, 1]], 5 distortion coefficients and a "
                             "4x4 camera_to_vehicle.")
    for frame in frames:
        if set(frame.images) != set(names) or not set(frame.boxes_2d) <= set(names):
            raise WaymoError(f"write_segment: frame {frame.timestamp_micros} has images of cameras "
                             f"{sorted(map(int, frame.images))} and boxes of "
                             f"{sorted(map(int, frame.boxes_2d))}; the cameras are {sorted(names)}.")
        if np.shape(frame.world_from_vehicle) != (4, 4):
            raise WaymoError(f"write_segment: frame {frame.timestamp_micros}: world_from_vehicle must be "
                             "4x4.")
        for camera in cameras:
            image = frame.images[camera.name]
            if image.shape != (camera.height, camera.width, 3) or image.dtype != np.uint8:
                raise WaymoError(f"write_segment: frame {frame.timestamp_micros}, camera "
                                 f"{_camera_label(camera.name)}: the image must be [{camera.height}, "
                                 f"{camera.width}, 3] uint8, got {list(image.shape)} {image.dtype}.")


def _jpeg(image: np.ndarray, quality: int) -> bytes:  # [H, W, 3] uint8 RGB
    bgr = np.ascontiguousarray(image[..., ::-1])
    ok, encoded = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "OpenCV failed to encode a uint8 image as JPEG"
    return encoded.tobytes()


def _transform(matrix: np.ndarray) -> list[float]:  # [4, 4] -> 16 numbers, row-major
    return np.asarray(matrix, np.float64).ravel().tolist()


def _columns(context_name: str, frames: Sequence[Frame], cameras: Sequence[CameraCalibration],
             quality: int) -> dict[str, dict[str, list]]:
    """The columns of each component, by tag; the schema's other columns are optional in the source."""
    calibration = {CONTEXT: [context_name] * len(cameras), CAMERA: [c.name for c in cameras]}
    intrinsics = [  # in the order of INTRINSIC_FIELDS
        [c.intrinsics[0, 0], c.intrinsics[1, 1], c.intrinsics[0, 2], c.intrinsics[1, 2], *c.distortion]
        for c in cameras]
    for i, name in enumerate(INTRINSIC_FIELDS):
        calibration[f"[CameraCalibrationComponent].intrinsic.{name}"] = [float(row[i]) for row in intrinsics]
    calibration |= {
        "[CameraCalibrationComponent].extrinsic.transform": [_transform(c.camera_to_vehicle)
                                                             for c in cameras],
        "[CameraCalibrationComponent].width": [c.width for c in cameras],
        "[CameraCalibrationComponent].height": [c.height for c in cameras],
        "[CameraCalibrationComponent].rolling_shutter_direction": [GLOBAL_SHUTTER] * len(cameras),
    }
    # The fixture's cameras have a global shutter and stand still at their frame's vehicle pose.
    shots = [(frame, camera.name) for frame in frames for camera in cameras]
    seconds = [frame.timestamp_micros / 1e6 for frame, _ in shots]
    images = {
        CONTEXT: [context_name] * len(shots), TIMESTAMP: [f.timestamp_micros for f, _ in shots],
        CAMERA: [name for _, name in shots],
        "[CameraImageComponent].image": [_jpeg(f.images[name], quality) for f, name in shots],
        "[CameraImageComponent].pose.transform": [_transform(f.world_from_vehicle) for f, _ in shots],
        **{name: [0.0] * len(shots) for name in CAMERA_IMAGE_SCHEMA.names if ".velocity." in name},
        "[CameraImageComponent].pose_timestamp": seconds,
        "[CameraImageComponent].rolling_shutter_params.shutter": [0.0] * len(shots),
        "[CameraImageComponent].rolling_shutter_params.camera_trigger_time": seconds,
        "[CameraImageComponent].rolling_shutter_params.camera_readout_done_time": seconds,
    }
    poses = {CONTEXT: [context_name] * len(frames), TIMESTAMP: [f.timestamp_micros for f in frames],
             "[VehiclePoseComponent].world_from_vehicle.transform": [_transform(f.world_from_vehicle)
                                                                     for f in frames]}
    rows_2d = [(f, name, box) for f in frames for name, boxes in f.boxes_2d.items() for box in boxes]
    boxes_2d = {
        CONTEXT: [context_name] * len(rows_2d), TIMESTAMP: [f.timestamp_micros for f, _, _ in rows_2d],
        CAMERA: [name for _, name, _ in rows_2d],
        "key.camera_object_id": [b.object_id for _, _, b in rows_2d],
        **{f"[CameraBoxComponent].box.{part}.{a}": [float(getattr(b, part)[i]) for _, _, b in rows_2d]
           for part in ("center", "size") for i, a in enumerate("xy")},
        "[CameraBoxComponent].type": [int(b.type) for _, _, b in rows_2d],
    }
    rows_3d = [(f, box) for f in frames for box in f.boxes_3d]
    boxes_3d = {
        CONTEXT: [context_name] * len(rows_3d), TIMESTAMP: [f.timestamp_micros for f, _ in rows_3d],
        "key.laser_object_id": [b.object_id for _, b in rows_3d],
        **{f"[LiDARBoxComponent].box.{part}.{a}": [float(getattr(b, part)[i]) for _, b in rows_3d]
           for part in ("center", "size") for i, a in enumerate("xyz")},
        "[LiDARBoxComponent].box.heading": [float(b.heading) for _, b in rows_3d],
        "[LiDARBoxComponent].type": [int(b.type) for _, b in rows_3d],
        "[LiDARBoxComponent].num_lidar_points_in_box": [0] * len(rows_3d),  # the fixture has no lidar
        "[LiDARBoxComponent].num_top_lidar_points_in_box": [0] * len(rows_3d),
    }
    return {"camera_image": images, "camera_calibration": calibration, "vehicle_pose": poses,
            "camera_box": boxes_2d, "lidar_box": boxes_3d}


def write_segment(root: str | os.PathLike, split: str, context_name: str, frames: Sequence[Frame],
                  cameras: Sequence[CameraCalibration], jpeg_quality: int = 95) -> dict[str, Path]:
    """Write a segment as the five v2 components :func:`read_segment` reads, in the release's schema.

    Columns the reader does not use are written too: the vehicle pose as each image's pose, zero
    velocities and lidar point counts, a global shutter; the source's optional ones (box speed,
    acceleration, difficulty levels) empty.

    Args:
        frames: every frame holds an image of each of ``cameras``, in any timestamp order.
        jpeg_quality: OpenCV's JPEG quality, 0..100.

    Returns:
        The written file of each component tag.

    Raises:
        WaymoError: inconsistent frames or cameras, or files of this segment already there.
    """
    _check(context_name, frames, cameras)
    paths = {tag: _component_path(root, split, tag, context_name) for tag in SCHEMAS}
    existing = [str(path) for path in paths.values() if path.exists()]
    if existing:
        raise WaymoError(f"write_segment: {existing} already exist; remove them first.")
    for tag, columns in _columns(context_name, frames, cameras, jpeg_quality).items():
        rows = len(columns[CONTEXT])
        table = pa.Table.from_pydict({name: columns.get(name, [None] * rows) for name in SCHEMAS[tag].names},
                                     schema=SCHEMAS[tag])
        paths[tag].parent.mkdir(parents=True, exist_ok=True)
        # The release's lists name their values 'item'; newer pyarrow writes 'element' unless told.
        pq.write_table(table, paths[tag], use_compliant_nested_type=False)
    return paths

"""Embedded synthetic scenes in the spirit of DL3DV, and a reader for the nerfstudio / DL3DV layout.

A scene is a room (floor, four walls and a ceiling: textured planes) holding a few separable
objects (textured boxes, axis-aligned or turned about the vertical axis, each with an integer label
and a name), filmed along a smooth camera path. Textures are real photographs bundled with
scikit-image. Frames are rendered EXACTLY by ray casting (ray-plane and ray-box slab intersections,
nearest hit, bilinear texture lookup), so the pinhole intrinsics, camera poses and per-pixel object
labels are ground truth, not estimates.

Conventions (those of nerfstudio, which DL3DV-10K and its benchmark ship in):

- World: metres, +y up. The room spans ``[-X/2, X/2] x [0, Y] x [-Z/2, Z/2]``.
- ``camtoworlds`` ``[T, 4, 4]``: camera-to-world, OpenGL camera axes (+x right, +y up, looking
  down -z). A world point ``p`` projects, with ``c = inv(c2w) @ p`` and OpenCV axes
  ``(c.x, -c.y, -c.z)``, to ``u = fx * c.x / -c.z + cx``, ``v = fy * -c.y / -c.z + cy``.
- Pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1)``; its centre is ``(j + 0.5, i + 0.5)``.
- Label images: 0 is the room, ``k`` the object labelled ``k``, sampled at pixel centres.

On-disk layout of one scene (nerfstudio / DL3DV-Benchmark, plus our extras)::

    <scene>/transforms.json    camera_model OPENCV, fl_x fl_y cx cy w h, frames: file_path, transform_matrix
    <scene>/images/frame_00001.png ...
    <scene>/masks/frame_00001.png ...   (ours: per-pixel object label, uint8)
    <scene>/objects.json                (ours: room size and labelled boxes)

and of a set: ``<set>/<scene>/...`` plus ``<set>/split.json`` = ``{"train": [...], "test": [...]}``.
:func:`load_scene` is driven by the layout alone, so a real DL3DV scene folder (``transforms.json``
and ``images/`` or ``images_4/``, no extras) loads through the same code.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import cv2
import numpy as np
import skimage.data

from stages.common import video

__all__ = [
    "ObjectBox",
    "Render",
    "Room",
    "Scene",
    "SceneError",
    "SceneNotFoundError",
    "SceneSpec",
    "generate_scene",
    "load_scene",
    "load_split",
    "load_texture",
    "look_at",
    "make_drive",
    "make_intrinsics",
    "make_spec",
    "make_split",
    "make_trajectory",
    "render",
    "render_drive",
    "scene_folders",
    "scene_root",
    "undistort",
    "undistortion",
    "write_scene",
    "write_split",
]

# Photographs from scikit-image's wheel (no download). Grey ones are tinted per scene. The stochastic
# ones (gravel, grass) are left out of the room: at the embedded 64x96 they are per-pixel noise that
# neither a small VAE nor a sparse-view splat can learn in CPU minutes, and DL3DV's rooms are not that.
FLOOR_TEXTURES = ("brick", "moon", "camera")
WALL_TEXTURES = ("brick", "camera", "moon", "coins")
CEILING_TEXTURES = ("moon", "brick")
OBJECT_TEXTURES = ("astronaut", "coffee", "chelsea", "rocket", "colorwheel", "immunohistochemistry",
                   "hubble_deep_field", "retina", "stereo_motorcycle", "logo")
LIGHT = np.array([0.35, 1.0, 0.6]) / np.linalg.norm([0.35, 1.0, 0.6])  # from above, fixed for all scenes
CHUNK = 2**15  # rays per batch: small enough to stay in cache (measured: 2**18 is 3x slower)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".JPG", ".JPEG", ".PNG")


class SceneError(ValueError):
    """A scene folder or scene description is invalid."""


class SceneNotFoundError(SceneError, FileNotFoundError):
    """A scene folder, or a file it must hold, does not exist."""


@dataclass(frozen=True)
class Room:
    """The room's geometry: ``size = (X, Y, Z)`` metres, spanning ``[-X/2, X/2] x [0, Y] x [-Z/2, Z/2]``."""

    size: tuple[float, float, float]

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:  # ([3], [3]) min and max corners
        x, y, z = self.size
        return np.array([-x / 2, 0.0, -z / 2]), np.array([x / 2, y, z / 2])


@dataclass(frozen=True)
class ObjectBox:
    """One labelled object: a box of full extents ``size`` (along its local x, y, z) at ``center``,
    turned by ``yaw`` radians about world +y: ``world = R_y(yaw) @ local + center``."""

    label: int
    name: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float

    @property
    def rotation(self) -> np.ndarray:  # [3, 3] local -> world
        c, s = np.cos(self.yaw), np.sin(self.yaw)
        return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])

    def corners(self) -> np.ndarray:  # [8, 3] world
        signs = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], float)
        return (signs * np.asarray(self.size) / 2) @ self.rotation.T + np.asarray(self.center)

    def to_json(self) -> dict:
        return {"label": self.label, "name": self.name, "center": list(self.center),
                "size": list(self.size), "yaw": self.yaw}


@dataclass(eq=False)
class SceneSpec:
    """Everything the renderer needs. Textures are float32 ``[h, w, 3]`` in [0, 1].

    Room textures tile: a point at in-plane offset ``(a, b)`` metres from the face's corner reads
    texel ``(a, b) * texels_per_metre - 0.5`` (walls: a along the wall, b down from the ceiling;
    floor and ceiling: a along x, b along z). Object textures stretch once over each face, read
    from its top-left corner seen from outside. Shading: ``ambient + (1 - ambient) * max(0, n . LIGHT)``.
    """

    room: Room
    objects: list[ObjectBox]
    floor_texture: np.ndarray
    wall_texture: np.ndarray
    ceiling_texture: np.ndarray
    object_textures: list[np.ndarray]
    texels_per_metre: float = 64.0
    ambient: float = 0.6


@dataclass(eq=False)
class Render:
    images: np.ndarray  # [T, H, W, 3] uint8
    labels: np.ndarray  # [T, H, W] uint8, 0 = room
    depth: np.ndarray  # [T, H, W] float32, distance along the camera's viewing axis


@lru_cache(maxsize=64)
def load_texture(name: str, size: int) -> np.ndarray:  # [size, size, 3] float32 in [0, 1], read-only
    """A scikit-image photograph (``skimage.data.<name>()``) as an RGB float texture, area-resized.

    Cached and read-only: scenes share textures.
    """
    loader = getattr(skimage.data, name, None)
    if loader is None:
        raise SceneError(f"Unknown texture {name!r}: skimage.data has no such image.")
    image = loader()
    image = image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)
    image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]
    texture = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
    texture.setflags(write=False)
    return texture


def make_intrinsics(height: int, width: int, fov_deg: float) -> np.ndarray:  # [3, 3]
    """Pinhole K: horizontal field of view ``fov_deg``, square pixels, principal point at the centre."""
    focal = width / (2.0 * np.tan(np.radians(fov_deg) / 2.0))
    return np.array([[focal, 0.0, width / 2.0], [0.0, focal, height / 2.0], [0.0, 0.0, 1.0]])


def _tinted(name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A room texture in a random tint (the room photographs are grey)."""
    return load_texture(name, size) * rng.uniform(0.55, 1.0, 3).astype(np.float32)


def make_spec(rng: np.random.Generator, num_objects: int, texture_size: int = 128) -> SceneSpec:
    """A random room with ``num_objects`` non-overlapping boxes standing on the floor."""
    room = Room(tuple(float(v) for v in rng.uniform([5.0, 2.6, 5.0], [7.0, 3.2, 7.0])))
    names = list(rng.choice(OBJECT_TEXTURES, num_objects, replace=num_objects > len(OBJECT_TEXTURES)))
    reach = 0.3 * min(room.size[0], room.size[2])  # object centres stay in the middle, inside the path
    objects: list[ObjectBox] = []
    for label, name in enumerate(names, start=1):
        for _ in range(1000):
            size = tuple(float(v) for v in rng.uniform([0.35, 0.3, 0.35], [0.9, 1.1, 0.9]))
            radius, angle = reach * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
            center = (float(radius * np.cos(angle)), size[1] / 2, float(radius * np.sin(angle)))
            reach_xz = np.hypot(size[0], size[2]) / 2  # bounding circle on the floor
            if all(np.hypot(center[0] - o.center[0], center[2] - o.center[2])
                   > reach_xz + np.hypot(o.size[0], o.size[2]) / 2 + 0.1 for o in objects):  # 0.1 m apart
                break
        else:
            raise SceneError(f"Could not place {num_objects} separate objects in a room of {room.size}; "
                             "ask for fewer objects.")
        yaw = 0.0 if rng.uniform() < 0.3 else float(rng.uniform(0, np.pi / 2))
        taken = sum(o.name.startswith(f"{name}_box") for o in objects)
        unique = f"{name}_box" + (f"_{taken + 1}" if taken else "")
        objects.append(ObjectBox(label, unique, center, size, yaw))
    return SceneSpec(
        room=room, objects=objects,
        floor_texture=_tinted(str(rng.choice(FLOOR_TEXTURES)), texture_size, rng),
        wall_texture=_tinted(str(rng.choice(WALL_TEXTURES)), texture_size, rng),
        ceiling_texture=_tinted(str(rng.choice(CEILING_TEXTURES)), texture_size, rng),
        object_textures=[load_texture(str(name), texture_size) for name in names],
        texels_per_metre=texture_size / 3.0,  # one photograph per 3 m tile
    )


def look_at(eye: np.ndarray, target: np.ndarray) -> np.ndarray:  # [T, 3], [T, 3] -> [T, 4, 4] OpenGL c2w
    forward = target - eye
    forward /= np.linalg.norm(forward, axis=-1, keepdims=True)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right, axis=-1, keepdims=True)
    up = np.cross(right, forward)
    c2w = np.tile(np.eye(4), (len(eye), 1, 1))
    c2w[:, :3, :3] = np.stack([right, up, -forward], axis=-1)  # columns: camera x, y, z in world
    c2w[:, :3, 3] = eye
    return c2w


def make_trajectory(spec: SceneSpec, rng: np.random.Generator, frames: int) -> np.ndarray:  # [T, 4, 4]
    """A smooth path: an elliptic arc around the objects, bobbing in height, looking at a drifting target.

    Raises:
        SceneError: no sampled path keeps 0.3 m away from every object (the room is too crowded).
    """
    x_size, _, z_size = spec.room.size
    s = np.linspace(0.0, 1.0, frames)[:, None]  # [T, 1] path parameter
    for _ in range(100):
        radii = rng.uniform(0.62, 0.78, 2) * np.array([x_size, z_size]) / 2
        angle = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * rng.uniform(0.5, 1.0) * 2 * np.pi * s
        bob = rng.integers(1, 3)  # up-and-down cycles along the path
        height = rng.uniform(1.2, 1.6) + 0.25 * np.sin(2 * np.pi * bob * s + rng.uniform(0, 2 * np.pi))
        eye = np.concatenate([radii[0] * np.cos(angle), height, radii[1] * np.sin(angle)], axis=1)  # [T, 3]
        phase = rng.uniform(0, 2 * np.pi, 3)
        target = np.concatenate([0.5 * np.sin(2 * np.pi * s + phase[0]),
                                 0.4 + 0.15 * np.sin(2 * np.pi * s + phase[1]),
                                 0.5 * np.cos(2 * np.pi * s + phase[2])], axis=1)  # [T, 3]
        if all(_box_distance(box, eye).min() > 0.3 for box in spec.objects):
            return look_at(eye, target)
    raise SceneError(f"No camera path clears the objects of a room of size {spec.room.size}; "
                     "use fewer objects.")


def make_drive(spec: SceneSpec, rng: np.random.Generator, frames: int, camera_height: float = 1.0) -> np.ndarray:
    """A driving-like path: a level camera (no pitch, no roll) at ``camera_height`` metres circling the
    objects on an ellipse and looking at a target drifting near the room's centre, at its own height.

    A level camera keeps the vehicle frame of a Waymo segment upright (boxes turn only about +z), and a
    constant height keeps its camera-to-vehicle extrinsic constant, as the data set's are.

    Returns:
        ``[T, 4, 4]`` OpenGL camera-to-world matrices.

    Raises:
        SceneError: no sampled path keeps 0.3 m away from every object.
    """
    x_size, _, z_size = spec.room.size
    s = np.linspace(0.0, 1.0, frames)[:, None]  # [T, 1]
    for _ in range(100):
        radii = rng.uniform(0.62, 0.78, 2) * np.array([x_size, z_size]) / 2
        angle = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * rng.uniform(0.3, 0.6) * 2 * np.pi * s
        eye = np.concatenate([radii[0] * np.cos(angle), np.full_like(s, camera_height),
                              radii[1] * np.sin(angle)], axis=1)  # [T, 3]
        phase = rng.uniform(0, 2 * np.pi, 2)
        target = np.concatenate([0.4 * np.sin(2 * np.pi * s + phase[0]), np.full_like(s, camera_height),
                                 0.4 * np.cos(2 * np.pi * s + phase[1])], axis=1)
        if all(_box_distance(box, eye).min() > 0.3 for box in spec.objects):
            return look_at(eye, target)
    raise SceneError(f"No level camera path clears the objects of a room of size {spec.room.size}; "
                     "use fewer objects.")


def _box_distance(box: ObjectBox, points: np.ndarray) -> np.ndarray:  # [N, 3] -> [N], 0 inside
    local = (points - np.asarray(box.center)) @ box.rotation  # [N, 3]
    return np.linalg.norm(np.maximum(np.abs(local) - np.asarray(box.size) / 2, 0.0), axis=-1)


def _column(values) -> np.ndarray:  # [3] -> [3, 1], to broadcast against [3, N]
    return np.asarray(values, dtype=np.float32).reshape(3, 1)


def _slabs(origins: np.ndarray, dirs: np.ndarray, half: np.ndarray):  # [3, N], [3, N], [3] -> [N] x 3
    """Rays vs the box [-half, half] (slab method): entry distance, exit distance, entry axis.

    A ray parallel to a slab gets +-inf from the division, which is right: -inf..inf inside the slab,
    an empty interval outside. Grazing a face exactly gives 0/0 = nan, which fmax/fmin skip.
    """
    t_in, t_out = np.full(dirs.shape[1], -np.inf, np.float32), np.full(dirs.shape[1], np.inf, np.float32)
    axis = np.zeros(dirs.shape[1], np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):
            t1, t2 = (-half[k] - origins[k]) / dirs[k], (half[k] - origins[k]) / dirs[k]
            near, far = np.fmin(t1, t2), np.fmax(t1, t2)
            axis[near > t_in] = k
            t_in, t_out = np.fmax(t_in, near), np.fmin(t_out, far)
    return t_in, t_out, axis


def _hit(spec: SceneSpec, origins: np.ndarray, dirs: np.ndarray):  # [3, N], [3, N] -> 3 x [N]
    """Nearest hit of each ray: surface (0: room, i + 1: spec.objects[i]), hit face axis, distance t."""
    lo, hi = (bound.astype(np.float32) for bound in spec.room.bounds)
    depth, axis = np.full(dirs.shape[1], np.inf, np.float32), np.zeros(dirs.shape[1], np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in range(3):  # the camera is inside: each ray leaves through the nearest wall it heads to
            exit_k = np.where(dirs[k] > 0, hi[k] - origins[k], lo[k] - origins[k]) / dirs[k]
            exit_k[dirs[k] == 0] = np.inf
            axis[exit_k < depth] = k
            depth = np.minimum(depth, exit_k)
    surface = np.zeros(dirs.shape[1], np.int64)
    for index, box in enumerate(spec.objects, start=1):
        rotation_t = box.rotation.T.astype(np.float32)  # world -> local
        t_in, t_out, box_axis = _slabs(rotation_t @ (origins - _column(box.center)), rotation_t @ dirs,
                                       np.asarray(box.size, np.float32) / 2)
        nearer = (t_in <= t_out) & (t_in > 0) & (t_in < depth)
        depth[nearer], surface[nearer], axis[nearer] = t_in[nearer], index, box_axis[nearer]
    return surface, axis, depth


def _sample(texture: np.ndarray, cols: np.ndarray, rows: np.ndarray, border: int) -> np.ndarray:  # [N, 3]
    """Bilinear lookup at texel coordinates ``[N]`` (integer = texel centre) with cv2.remap.

    remap wants 2-D maps under 32767 rows, so the N lookups are folded into rows of 1024.
    """
    count, width = len(cols), 1024
    padded = -(-count // width) * width
    maps = [np.pad(m.astype(np.float32), (0, padded - count)).reshape(-1, width) for m in (cols, rows)]
    out = cv2.remap(texture, maps[0], maps[1], cv2.INTER_LINEAR, borderMode=border)
    return out.reshape(-1, 3)[:count]


def _colour(spec: SceneSpec, origins, dirs, surface, axis, depth) -> np.ndarray:  # [3, N], ... -> [N, 3]
    """Shaded texture colour at each hit (see SceneSpec for the texture and shading rules)."""
    lo, hi = spec.room.bounds
    colour = np.zeros((dirs.shape[1], 3), np.float32)
    normal = np.zeros((3, dirs.shape[1]))
    room = np.flatnonzero(surface == 0)
    points = origins[:, room] + depth[room] * dirs[:, room]  # [3, n] hits on the room
    normal[axis[room], room] = -np.sign(dirs[axis[room], room])  # the room's faces look inwards
    offset = (points - _column(lo)) * spec.texels_per_metre - 0.5  # [3, n] texel coordinates on x, y, z
    down = (hi[1] - points[1]) * spec.texels_per_metre - 0.5
    face = axis[room]
    for mask, texture, cols, rows in (
        (face == 0, spec.wall_texture, offset[2], down),
        (face == 2, spec.wall_texture, offset[0], down),
        ((face == 1) & (dirs[1, room] < 0), spec.floor_texture, offset[0], offset[2]),
        ((face == 1) & (dirs[1, room] > 0), spec.ceiling_texture, offset[0], offset[2]),
    ):
        if mask.any():
            colour[room[mask]] = _sample(texture, cols[mask], rows[mask], cv2.BORDER_WRAP)
    for index, (box, texture) in enumerate(zip(spec.objects, spec.object_textures), start=1):
        rays = np.flatnonzero(surface == index)
        if not len(rays):
            continue
        half = np.asarray(box.size) / 2
        rotation_t = box.rotation.T
        hits = origins[:, rays] + depth[rays] * dirs[:, rays]
        local = (rotation_t @ (hits - _column(box.center)) + _column(half)) / _column(2 * half)  # [3, n]
        k = axis[rays]
        side = -np.sign((rotation_t @ dirs[:, rays])[k, np.arange(len(rays))])  # entry face: +1 or -1
        # Face axes (a rightwards, b downwards) seen from outside: x-faces run along z, z-faces along x.
        a = np.where(k == 0, np.where(side > 0, 1 - local[2], local[2]),
                     np.where(k == 2, np.where(side > 0, local[0], 1 - local[0]), local[0]))
        b = np.where(k == 1, np.where(side > 0, local[2], 1 - local[2]), 1 - local[1])
        cols, rows = a * texture.shape[1] - 0.5, b * texture.shape[0] - 0.5
        colour[rays] = _sample(texture, cols, rows, cv2.BORDER_REFLECT)
        local_normal = np.zeros((3, len(rays)))
        local_normal[k, np.arange(len(rays))] = side
        normal[:, rays] = box.rotation @ local_normal
    shade = spec.ambient + (1 - spec.ambient) * np.maximum(LIGHT @ normal, 0.0)
    return colour * shade[:, None].astype(np.float32)


def _camera_rays(intrinsics: np.ndarray, height: int, width: int, supersample: int) -> np.ndarray:
    """Ray directions ``[3, H*s * W*s]`` in OpenGL camera axes with z = -1 (so t is depth), s*s per pixel."""
    offsets = (np.arange(supersample) + 0.5) / supersample
    u = (np.arange(width)[:, None] + offsets).reshape(-1)  # [W*s] sample columns, pixel units
    v = (np.arange(height)[:, None] + offsets).reshape(-1)  # [H*s]
    uu, vv = np.meshgrid(u, v)  # [H*s, W*s]
    fx, fy, cx, cy = intrinsics[0, 0], intrinsics[1, 1], intrinsics[0, 2], intrinsics[1, 2]
    return np.stack([(uu - cx) / fx, -(vv - cy) / fy, -np.ones_like(uu)]).reshape(3, -1)


def _world_rays(camera_rays: np.ndarray, camtoworlds: np.ndarray):  # [3, n], [t, 4, 4] -> [3, t*n] x 2
    dirs = np.einsum("tij,jn->itn", camtoworlds[:, :3, :3], camera_rays).reshape(3, -1)
    origins = np.repeat(camtoworlds[:, :3, 3].T, camera_rays.shape[1], axis=1)
    return origins, dirs


def render(
    spec: SceneSpec,
    intrinsics: np.ndarray,  # [3, 3]
    camtoworlds: np.ndarray,  # [T, 4, 4] OpenGL camera-to-world
    height: int,
    width: int,
    supersample: int = 2,
) -> Render:
    """Ray-cast every frame. Colours average ``supersample x supersample`` rays per pixel (anti-aliasing);
    labels and depth come from the single ray through each pixel centre.

    Raises:
        SceneError: bad labels, bad sizes, or a camera outside the room or inside an object.
    """
    object_labels = [box.label for box in spec.objects]
    if len(set(object_labels)) != len(object_labels) or not all(1 <= k <= 255 for k in object_labels):
        raise SceneError("render: object labels must be distinct integers in 1..255 (0 is the room), "
                         f"got {object_labels}.")
    if len(spec.object_textures) != len(spec.objects):
        raise SceneError(f"render: {len(spec.objects)} objects but {len(spec.object_textures)} textures.")
    if min(height, width, supersample) < 1 or camtoworlds.ndim != 3 or camtoworlds.shape[1:] != (4, 4):
        raise SceneError(f"render: need height, width, supersample >= 1 and camtoworlds [T, 4, 4]; got "
                         f"{height}, {width}, {supersample} and {camtoworlds.shape}.")
    lo, hi = spec.room.bounds
    eyes = camtoworlds[:, :3, 3]
    if not np.all((eyes > lo) & (eyes < hi)):
        raise SceneError(f"render: every camera must be inside the room {spec.room.size}.")
    if any(_box_distance(box, eyes).min() == 0 for box in spec.objects):
        raise SceneError("render: a camera stands inside an object; move the path or the objects.")
    fine_rays, centre_rays = (_camera_rays(intrinsics, height, width, s) for s in (supersample, 1))
    label_of = np.array([0, *object_labels], np.uint8)  # surface index -> label
    images = np.empty((len(camtoworlds), height, width, 3), np.uint8)
    labels = np.empty((len(camtoworlds), height, width), np.uint8)
    depth = np.empty((len(camtoworlds), height, width), np.float32)
    # float32: half the memory traffic of float64 and 3x faster here; ample for pixel-level geometry.
    fine_rays, centre_rays = fine_rays.astype(np.float32), centre_rays.astype(np.float32)
    camtoworlds = camtoworlds.astype(np.float32)
    chunk = max(1, CHUNK // fine_rays.shape[1])  # frames per batch
    for start in range(0, len(camtoworlds), chunk):
        c2w = camtoworlds[start:start + chunk]
        frames = slice(start, start + len(c2w))
        origins, dirs = _world_rays(fine_rays, c2w)
        colour = _colour(spec, origins, dirs, *_hit(spec, origins, dirs))
        colour = colour.reshape(len(c2w), height, supersample, width, supersample, 3).mean(axis=(2, 4))
        images[frames] = np.clip(np.rint(colour * 255.0), 0, 255).astype(np.uint8)
        surface, _, distance = _hit(spec, *_world_rays(centre_rays, c2w))
        labels[frames] = label_of[surface].reshape(len(c2w), height, width)
        depth[frames] = distance.reshape(len(c2w), height, width)
    return Render(images, labels, depth)


# ----------------------------------------------------------------------------------------------
# Files: the nerfstudio / DL3DV layout.


def _natural_key(text: str) -> list:
    """Sort key that orders frame_2 before frame_10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _read_json(path: Path, hint: str) -> dict:
    if not path.is_file():
        raise SceneNotFoundError(f"{path} not found; {hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SceneError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(data, dict):
        raise SceneError(f"{path} must hold a JSON object, got {type(data).__name__}.")
    return data


def write_scene(
    folder: str | os.PathLike,
    images: np.ndarray,  # [T, H, W, 3] uint8
    intrinsics: np.ndarray,  # [3, 3]
    camtoworlds: np.ndarray,  # [T, 4, 4] OpenGL camera-to-world
    masks: np.ndarray | None = None,  # [T, H, W] uint8 object labels
    objects: list[ObjectBox] | None = None,
    room: Room | None = None,
) -> Path:
    """Write one scene in the nerfstudio / DL3DV layout (see the module docstring), atomically.

    Args:
        folder: the scene folder to create; it must not exist yet, or be empty.
        images, intrinsics, camtoworlds: the frames and their pinhole cameras.
        masks: optional per-pixel object labels, written to ``masks/``.
        objects, room: optional geometry, written to ``objects.json``.

    Returns:
        The scene folder.
    """
    folder = Path(folder)
    if len(camtoworlds) != len(images) or (masks is not None and masks.shape != images.shape[:3]):
        raise SceneError(f"write_scene({folder}): {len(images)} images, {len(camtoworlds)} poses, masks of "
                         f"shape {None if masks is None else masks.shape}; they must agree frame for frame.")
    with video.new_folder(folder, "write_scene", SceneError) as tmp:
        paths = video.write_frames(tmp / "images", images)
        if masks is not None:
            video.write_frames(tmp / "masks", masks)
        height, width = images.shape[1:3]
        video.write_json(tmp / "transforms.json", {
            "camera_model": "OPENCV",
            "fl_x": float(intrinsics[0, 0]), "fl_y": float(intrinsics[1, 1]),
            "cx": float(intrinsics[0, 2]), "cy": float(intrinsics[1, 2]),
            "w": int(width), "h": int(height), "k1": 0.0, "k2": 0.0, "p1": 0.0, "p2": 0.0,
            "frames": [
                {"file_path": f"images/{path.name}", "transform_matrix": np.asarray(c2w, float).tolist()}
                for path, c2w in zip(paths, camtoworlds, strict=True)
            ],
        })
        if objects is not None:
            video.write_json(tmp / "objects.json", {
                "room": None if room is None else {"size": list(room.size)},
                "objects": [box.to_json() for box in objects],
            })
    return folder


def generate_scene(
    folder: str | os.PathLike,
    *,
    seed: int | Sequence[int],
    frames: int = 300,
    height: int = 64,
    width: int = 96,
    num_objects: int = 3,
    fov_deg: float = 70.0,
    supersample: int = 2,
    texture_size: int = 128,
) -> Render:
    """Make, film and write one random scene; the same arguments give byte-identical files.

    Args:
        folder: the scene folder to create (see :func:`write_scene`).
        seed: anything ``np.random.default_rng`` takes, e.g. ``[set_seed, scene_index]``.
        frames, height, width: length and size of the video.
        num_objects: labelled boxes in the room (labels 1..num_objects).
        fov_deg: horizontal field of view of the pinhole camera.
        supersample: rays per pixel along each axis, averaged (anti-aliasing).
        texture_size: side of the square textures, texels.

    Returns:
        The rendering (images ``[T, H, W, 3]``, labels ``[T, H, W]``, depth ``[T, H, W]``), as written.
    """
    rng = np.random.default_rng(seed)
    spec = make_spec(rng, num_objects, texture_size)
    camtoworlds = make_trajectory(spec, rng, frames)
    intrinsics = make_intrinsics(height, width, fov_deg)
    result = render(spec, intrinsics, camtoworlds, height, width, supersample)
    write_scene(folder, result.images, intrinsics, camtoworlds, result.labels, spec.objects, spec.room)
    return result


def render_drive(
    *,
    seed: int | Sequence[int],
    frames: int,
    height: int = 64,
    width: int = 96,
    num_objects: int = 3,
    fov_deg: float = 70.0,
    supersample: int = 2,
    texture_size: int = 128,
    camera_height: float = 1.0,
) -> tuple[Render, np.ndarray, np.ndarray, SceneSpec]:
    """Film the room of :func:`generate_scene` (same ``seed``, same room and objects) along a level
    driving-like path (:func:`make_drive`); nothing is written.

    Returns:
        ``(render, camtoworlds [T, 4, 4] OpenGL, intrinsics [3, 3], spec)``.
    """
    rng = np.random.default_rng(seed)
    spec = make_spec(rng, num_objects, texture_size)
    drive_rng = np.random.default_rng([*np.atleast_1d(seed).tolist(), 1])  # the scene's own path stays as it was
    camtoworlds = make_drive(spec, drive_rng, frames, camera_height)
    intrinsics = make_intrinsics(height, width, fov_deg)
    return render(spec, intrinsics, camtoworlds, height, width, supersample), camtoworlds, intrinsics, spec


@dataclass(eq=False)
class Scene:
    """One scene as loaded from disk; intrinsics are those of the frames as read (undistorted, a pinhole camera)."""

    folder: Path
    image_paths: list[Path]
    intrinsics: np.ndarray  # [3, 3]
    camtoworlds: np.ndarray  # [T, 4, 4] OpenGL / nerfstudio camera-to-world
    height: int
    width: int
    distortion: np.ndarray  # [4] OpenCV k1, k2, p1, p2 as recorded (DL3DV's); frames are read undistorted
    images: np.ndarray | None = None  # [T, H, W, 3] uint8, None when loaded lazily
    mask_paths: list[Path] | None = None
    masks: np.ndarray | None = None  # [T, H, W] object labels, if the scene has masks/ and was loaded eagerly
    objects: list[ObjectBox] | None = None
    room: Room | None = None
    extra: dict = field(default_factory=dict)  # other keys of transforms.json, untouched
    undistort_maps: tuple[np.ndarray, np.ndarray] | None = None  # cv2.remap maps when distortion is not zero

    @property
    def num_frames(self) -> int:
        return len(self.image_paths)

    def read_images(self, indices: Sequence[int] | None = None) -> np.ndarray:  # -> [t, H, W, 3] uint8
        """Read frames (all, or ``indices``) from disk, checking their size; undistorted (:func:`undistortion`)."""
        return undistort(_read_all(self.image_paths, indices, False, (self.height, self.width)),
                          self.undistort_maps, cv2.INTER_LINEAR)

    def read_masks(self, indices: Sequence[int] | None = None) -> np.ndarray:  # -> [t, H, W] labels
        """Read object-label masks (all, or ``indices``) from disk, checking their size."""
        if self.mask_paths is None:
            raise SceneError(f"Scene {self.folder} has no masks/ folder.")
        return undistort(_read_all(self.mask_paths, indices, True, (self.height, self.width)),
                          self.undistort_maps, cv2.INTER_NEAREST)


def undistortion(intrinsics: np.ndarray, distortion: np.ndarray, width: int, height: int
                 ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None]:
    """The pinhole camera of the undistorted frames and the ``cv2.remap`` maps that undistort them.

    DL3DV's ``transforms.json`` records an OpenCV camera (``k1, k2, p1, p2``). The frames are resampled
    to a pinhole camera of the same size whose every pixel sees the scene (``cv2.getOptimalNewCameraMatrix``
    with ``alpha = 0``, as gsplat's COLMAP parser does before it crops): the border that distortion
    bends out of the frame is lost, nothing is invented. Zero coefficients: the camera as it is, no maps.
    """
    if not np.any(distortion):
        return intrinsics, None
    new, _ = cv2.getOptimalNewCameraMatrix(intrinsics, distortion, (width, height), 0, (width, height))
    maps = cv2.initUndistortRectifyMap(intrinsics, distortion, None, new, (width, height), cv2.CV_32FC1)
    return new, maps


def undistort(frames: np.ndarray, maps, interpolation: int) -> np.ndarray:  # [t, H, W(, 3)] -> same
    """Resample frames with :func:`undistortion`'s maps (None: the frames as they are)."""
    if maps is None:
        return frames
    return np.stack([cv2.remap(frame, maps[0], maps[1], interpolation, borderMode=cv2.BORDER_REPLICATE)
                     for frame in frames])


def _read_all(paths: list[Path], indices, labels: bool, size: tuple[int, int]) -> np.ndarray:
    chosen = paths if indices is None else [paths[i] for i in indices]
    arrays = []
    for path in chosen:
        array = video.read_image(path, labels)
        if array.shape[:2] != size:
            raise SceneError(f"{path} is {array.shape[1]}x{array.shape[0]} but the scene's frames are "
                             f"{size[1]}x{size[0]}; all frames of a scene must have one size.")
        arrays.append(array)
    return np.stack(arrays)


SUPPORTED_CAMERAS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")


def _camera(meta: dict, frames: list[dict], path: Path) -> dict:
    """Shared intrinsics, from the top level of transforms.json or (identical) in every frame."""
    camera = {}
    for key, default in (("fl_x", None), ("fl_y", None), ("cx", None), ("cy", None), ("w", None), ("h", None),
                         ("k1", 0.0), ("k2", 0.0), ("p1", 0.0), ("p2", 0.0), ("camera_model", "OPENCV")):
        values = {json.dumps(frame[key]) for frame in frames if key in frame}
        if key in meta:
            camera[key] = meta[key]
        elif len(values) == 1 and all(key in frame for frame in frames):
            camera[key] = frames[0][key]
        elif values:
            raise SceneError(f"{path}: '{key}' differs between frames; only one shared camera is supported.")
        elif key == "fl_y" and "fl_x" in camera:
            camera[key] = camera["fl_x"]
        elif default is None:
            raise SceneError(f"{path} has no '{key}'; a nerfstudio transforms.json needs fl_x, fl_y, cx, cy, "
                             "w and h.")
        else:
            camera[key] = default
    try:
        for key in ("fl_x", "fl_y", "cx", "cy", "k1", "k2", "p1", "p2"):
            camera[key] = float(camera[key])
        camera["w"], camera["h"] = int(camera["w"]), int(camera["h"])
    except (TypeError, ValueError) as error:
        raise SceneError(f"{path}: intrinsics must be numbers ({error}).") from error
    if camera["camera_model"] not in SUPPORTED_CAMERAS:
        raise SceneError(f"{path}: camera_model {camera['camera_model']!r} is not supported; "
                         f"use one of {SUPPORTED_CAMERAS}.")
    return camera


def _frame_paths(folder: Path, frames: list[dict], image_dir: str | None, path: Path):
    """Image paths and poses of the listed frames, in file-name order (as nerfstudio sorts them)."""
    for index, frame in enumerate(frames):
        if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
            raise SceneError(f"{path}: frame {index} needs 'file_path' and 'transform_matrix'.")
    frames = sorted(frames, key=lambda frame: _natural_key(str(frame["file_path"])))
    image_paths, poses = [], []
    for frame in frames:
        relative = Path(frame["file_path"])
        if image_dir is not None:  # DL3DV: images_4/ holds the same names as the listed images/
            relative = Path(image_dir, *relative.parts[1:] or relative.parts)
        pose = np.asarray(frame["transform_matrix"], dtype=float)
        if pose.shape != (4, 4) or not np.isfinite(pose).all():
            raise SceneError(f"{path}: transform_matrix of {frame['file_path']} must be a finite 4x4 matrix.")
        image_paths.append(folder / relative)
        poses.append(pose)
    if len(set(image_paths)) != len(image_paths):
        raise SceneError(f"{path} lists the same image more than once.")
    missing = [p for p in image_paths if not p.is_file()]
    if missing:
        raise SceneNotFoundError(f"{len(missing)} image(s) listed in {path} are missing, e.g. {missing[0]}; "
                                 "restore them or remove their frames from transforms.json.")
    listed = set(image_paths)
    for parent in sorted({p.parent for p in image_paths}):
        extra = sorted(p for p in parent.iterdir() if p.suffix in IMAGE_SUFFIXES and p not in listed
                       and not p.name.startswith("."))
        if extra:
            raise SceneError(f"{len(extra)} image(s) in {parent} are not listed in {path}, "
                             f"e.g. {extra[0].name}; "
                             "add their frames to transforms.json or move them out.")
    return image_paths, np.stack(poses)


def _resized_dir(folder: Path, frames: list[dict], path: Path) -> str | None:
    """None if the listed image folder exists; else the one resized copy (DL3DV ships images_4/ only)."""
    first = frames[0].get("file_path") if isinstance(frames[0], dict) else None
    listed = folder / Path(str(first)).parent
    if first is None or listed.is_dir():
        return None
    copies = sorted(p.name for p in folder.glob(f"{listed.name}_*") if p.is_dir())
    if len(copies) > 1:
        raise SceneError(f"{listed} is missing and {folder} holds several resized copies {copies}; "
                         "choose one with image_dir=...")
    return copies[0] if copies else None


def _scaled_intrinsics(camera: dict, width: int, height: int, resized: bool, what: str) -> np.ndarray:
    """K for images of ``width x height``: transforms.json's own, or rescaled for a resized copy."""
    if not resized and (width, height) != (camera["w"], camera["h"]):
        raise SceneError(f"{what}: transforms.json says images are {camera['w']}x{camera['h']} but they are "
                         f"{width}x{height}; fix w/h or pass image_dir for a resized copy.")
    scale_x, scale_y = width / camera["w"], height / camera["h"]
    if abs(camera["w"] * scale_y - width) > 1:
        raise SceneError(f"{what}: {width}x{height} images are not a resize of {camera['w']}x{camera['h']} "
                         "(the aspect ratio differs).")
    return np.array([[camera["fl_x"] * scale_x, 0.0, camera["cx"] * scale_x],
                     [0.0, camera["fl_y"] * scale_y, camera["cy"] * scale_y], [0.0, 0.0, 1.0]])


def _load_objects(path: Path) -> tuple[list[ObjectBox] | None, Room | None]:
    """Our ``objects.json``, if the scene has one (real DL3DV scenes do not)."""
    if not path.is_file():
        return None, None
    data = _read_json(path, "")
    try:
        objects = [ObjectBox(int(o["label"]), str(o["name"]), tuple(map(float, o["center"])),
                             tuple(map(float, o["size"])), float(o["yaw"])) for o in data["objects"]]
        room = Room(tuple(map(float, data["room"]["size"]))) if data.get("room") else None
    except (KeyError, TypeError, ValueError) as error:
        raise SceneError(f"{path} is malformed ({error!r}); it needs 'objects', each with label, name, "
                         "center, size and yaw.") from error
    return objects, room


def load_scene(folder: str | os.PathLike, image_dir: str | None = None, load_images: bool = True) -> Scene:
    """Load a scene in the nerfstudio / DL3DV layout: ours, or a real DL3DV scene folder.

    Args:
        folder: the scene folder, holding ``transforms.json``.
        image_dir: read frames from this folder instead of the one ``file_path`` names (e.g. ``"images_4"``,
            DL3DV's 4x-downsampled copy); intrinsics are rescaled to the size found there. When None and
            the listed folder (``images/``) is absent, its one resized copy (``images_*``) is used.
        load_images: read all frames (and masks) now; False keeps only paths (see ``Scene.read_images``).

    Returns:
        The :class:`Scene`, frames ordered by file name.

    Raises:
        SceneNotFoundError: no folder, no transforms.json, or a listed image is missing.
        SceneError: malformed transforms.json, images not listed in it, or frames of different sizes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise SceneNotFoundError(f"Scene folder not found: {folder}.")
    path = folder / "transforms.json"
    meta = _read_json(path, "a nerfstudio / DL3DV scene folder holds transforms.json next to images/.")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise SceneError(f"{path} has no frames; it needs a non-empty 'frames' list.")
    camera = _camera(meta, frames, path)
    if image_dir is None:
        image_dir = _resized_dir(folder, frames, path)
    image_paths, camtoworlds = _frame_paths(folder, frames, image_dir, path)
    height, width = video.read_image(image_paths[0]).shape[:2]
    intrinsics = _scaled_intrinsics(camera, width, height, resized=image_dir is not None,
                                     what=f"{path} vs {image_paths[0]}")
    mask_dir = folder / "masks"
    mask_paths = [mask_dir / p.name for p in image_paths] if mask_dir.is_dir() else None
    if mask_paths is not None and not all(p.is_file() for p in mask_paths):
        missing = next(p for p in mask_paths if not p.is_file())
        raise SceneNotFoundError(f"{mask_dir} exists but lacks {missing.name}; every frame needs its mask.")
    objects, room = _load_objects(folder / "objects.json")
    distortion = np.array([camera[key] for key in ("k1", "k2", "p1", "p2")], float)
    intrinsics, maps = undistortion(intrinsics, distortion, width, height)
    scene = Scene(
        folder=folder, image_paths=image_paths, intrinsics=intrinsics, camtoworlds=camtoworlds,
        height=height, width=width, distortion=distortion,
        mask_paths=mask_paths, objects=objects, room=room,
        extra={key: value for key, value in meta.items() if key not in camera and key != "frames"},
        undistort_maps=maps,
    )
    if load_images:
        scene.images = scene.read_images()
        scene.masks = scene.read_masks() if mask_paths is not None else None
    return scene


def write_split(folder: str | os.PathLike, train: list[str], test: list[str],
                validation: Sequence[str] = ()) -> Path:
    """Write ``<folder>/split.json`` naming the train and test (and validation) scenes, disjoint, atomically."""
    folder = Path(folder)
    lists = {"train": list(train), "test": list(test), **({"validation": list(validation)} if validation else {})}
    names = [name for names in lists.values() for name in names]
    if len(set(names)) != len(names):
        raise SceneError(f"Scenes {sorted({n for n in names if names.count(n) > 1})} are in more than one of "
                         f"{', '.join(lists)}.")
    video.write_json(folder / "split.json", lists)
    return folder / "split.json"


def load_split(folder: str | os.PathLike) -> dict[str, list[str]]:
    """Read ``<folder>/split.json``, ``{"train": [...], "test": [...]}`` and optionally ``"validation"``
    (returned as ``[]`` when absent); the lists are disjoint and every scene folder must exist.

    The validation scenes (the paper's 5 of DL3DV-Benchmark) are held out of both: they become pairs of the
    ``validation`` split, which ``train`` restores for its validation PSNR and never trains on.
    """
    folder = Path(folder)
    split = _read_json(folder / "split.json", "a scene set holds split.json; the scenes stage writes it "
                       "(for a DL3DV download: `python -m stages.common.scenes split <folder>`).")
    if not {"train", "test"} <= set(split) <= {"train", "test", "validation"} \
            or not all(isinstance(v, list) for v in split.values()):
        raise SceneError(f"{folder / 'split.json'} must have the lists 'train' and 'test' (and optionally "
                         "'validation'), nothing else.")
    split.setdefault("validation", [])
    names = [name for names in split.values() for name in names]
    if len(set(names)) != len(names):
        raise SceneError(f"{folder / 'split.json'} lists scenes {sorted({n for n in names if names.count(n) > 1})} "
                         "twice; each scene belongs to one of train, test, validation.")
    for name in names:
        if not (folder / name).is_dir():
            raise SceneNotFoundError(f"{folder / 'split.json'} names scene {name!r} but {folder / name} "
                                     "is missing.")
    return split


def scene_root(folder: str | os.PathLike) -> Path:
    """The folder holding transforms.json: ``folder`` or, DL3DV-Benchmark style, ``folder/nerfstudio``."""
    folder = Path(folder)
    if not (folder / "transforms.json").is_file() and (folder / "nerfstudio" / "transforms.json").is_file():
        return folder / "nerfstudio"
    return folder


def scene_folders(root: str | os.PathLike) -> list[str]:
    """The scene folders of a set, in natural order: those holding ``transforms.json`` (or DL3DV-Benchmark's
    ``nerfstudio/transforms.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise SceneNotFoundError(f"{root} is not a folder of scenes.")
    return sorted((p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                   and (scene_root(p) / "transforms.json").is_file()),
                  key=_natural_key)


def make_split(root: str | os.PathLike, train: int, test: int, validation: int = 0, seed: int = 0) -> Path:
    """Split the scenes of ``root`` at random (seeded) into ``train``, ``test`` and ``validation`` scenes and
    write ``<root>/split.json`` (the paper's DL3DV-Benchmark split: 95, 40, 5 of its 140 scenes).

    Raises:
        SceneError: the counts do not add up to the scenes found (naming both), or a count is negative.
    """
    names = scene_folders(root)
    if min(train, test, validation) < 0 or train + test + validation != len(names) or not train or not test:
        raise SceneError(f"{root} holds {len(names)} scene folders; the split asks for {train} train + {test} test "
                         f"+ {validation} validation = {train + test + validation} (train and test at least 1): "
                         "make the counts add up to the scenes there.")
    order = np.random.default_rng(seed).permutation(len(names))
    chosen = [names[i] for i in order]
    parts = chosen[:train], chosen[train:train + test], chosen[train + test:]
    return write_split(root, *(sorted(part, key=_natural_key) for part in parts))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m stages.common.scenes",
        description="Write split.json for a folder of nerfstudio / DL3DV scenes (e.g. the paper's 95/40/5 split of "
                    "DL3DV-Benchmark's 140 scenes).")
    commands = parser.add_subparsers(dest="command", required=True)
    split = commands.add_parser("split", help="a seeded random train/test/validation split")
    split.add_argument("root", help="the folder of scene folders, e.g. data/external/dl3dv")
    split.add_argument("--train", type=int, default=95)
    split.add_argument("--test", type=int, default=40)
    split.add_argument("--validation", type=int, default=5)
    split.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = make_split(args.root, args.train, args.test, args.validation, args.seed)
    except SceneError as error:
        parser.exit(2, f"error: {error}\n")
    print(f"wrote {path}: {args.train} train, {args.test} test, {args.validation} validation scenes")


if __name__ == "__main__":
    main()

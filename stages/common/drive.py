"""Driving scenes from Waymo Open Dataset v2 segments: a static background and one rigid set of Gaussians per
tracked actor, moved by its 3D box poses (the scene decomposition of SplatAD, paper section 4.4 / B.4).

A segment (``stages.common.waymo.read_segment``, one camera) becomes a :class:`DriveScene`:

- **Cameras.** ``world_from_vehicle[t] @ camera_to_vehicle`` places Waymo's camera (+x forward, +y left,
  +z up) in the world; ``OPENCV_IN_WAYMO_CAMERA`` turns it into the OpenCV camera gsplat wants
  (``viewmats`` = world-to-camera). The world is recentred on the first frame's vehicle pose: Waymo's
  world frame lies kilometres away, which float32 Gaussians cannot resolve to the centimetre. Frames with lens distortion (``k1, k2, p1, p2, k3``, OpenCV's model) are
  resampled to a pinhole camera of the same size (``scenes.undistortion``), as DL3DV's are.
- **Actors.** Every 3D box (``lidar_box``) of the chosen types, grouped by ``key.laser_object_id``. A box's
  frame: its centre, +x to its front (heading about the vehicle's +z), +z up; ``world_from_box[t] =
  world_from_vehicle[t] @ box_in_vehicle[t]``. Its size is the largest labelled one of the track (Waymo
  labels the same object with sizes that vary a little from frame to frame). An actor is drawn only in the
  frames that label it (``present``); elsewhere its Gaussians get no opacity.
- **Gaussians.** One dict in gsplat's trainer parametrisation with one more entry, ``owner [N]`` (int):
  -1 for the background, whose means are world coordinates, and ``k`` for actor ``k``, whose means and
  rotations are in its box frame. :func:`place` moves them to a frame's box poses (differentiably), so
  one gsplat training (``stages.common.splat.train(place=...)``) fits the background and every actor
  together, densification included: gsplat's strategy carries ``owner`` through duplication, splitting
  and pruning like any other per-Gaussian entry.

Removing an actor is dropping its ``owner``'s rows; inserting an asset is adding rows with its owner.

What SplatAD has and this does not: lidar (its point initialisation, lidar rendering and losses), the
rolling shutter, per-camera exposure, and actor-pose optimisation. The background is initialised at random
around the camera path (no lidar points are read), and higher spherical-harmonics bands of an actor are
evaluated with world-frame view directions, which is exact for actors that do not turn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import Tensor

from stages.common import scenes, waymo
from stages.common import splat as gs

__all__ = [
    "OPENCV_IN_WAYMO_CAMERA",
    "Actor",
    "DriveScene",
    "actor_ids",
    "axis_difference",
    "box_axis",
    "box_pixel_counts",
    "box_silhouettes",
    "drive_scene",
    "heading",
    "heading_error",
    "init_drive_gaussians",
    "place",
    "render",
    "replace_actor",
    "turn_about_z",
]

OPENCV_IN_WAYMO_CAMERA = np.array([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # columns: x right, y down, z forward
SQUARE_RATIO = 1.2  # a footprint whose length / width is below this is compared modulo 90 degrees
HIDDEN_OPACITY = -30.0  # logit: sigmoid ~ 1e-13, far below gsplat's 1/255 alpha threshold


@dataclass(frozen=True, eq=False)
class Actor:
    object_id: str  # key.laser_object_id
    type: int  # waymo.BoxType
    size: np.ndarray  # [3] length (x), width (y), height (z), metres: the track's largest
    world_from_box: np.ndarray  # [T, 4, 4]; identity where absent
    present: np.ndarray  # [T] bool: the frame labels it
    quats: np.ndarray  # [T, 4] wxyz: the rotations of world_from_box


@dataclass(frozen=True, eq=False)
class DriveScene:
    name: str  # the segment's context name
    segment: waymo.Segment
    frames: int  # the first frames used
    viewmats: np.ndarray  # [T, 4, 4] OpenCV world-to-camera
    intrinsics: np.ndarray  # [3, 3] pinhole, after undistortion
    width: int
    height: int
    actors: tuple[Actor, ...]
    undistort_maps: tuple[np.ndarray, np.ndarray] | None

    def read_images(self, indices: Sequence[int] | None = None) -> np.ndarray:  # -> [t, H, W, 3] uint8
        chosen = range(self.frames) if indices is None else indices
        return scenes.undistort(self.segment.read_images(list(chosen)), self.undistort_maps, cv2.INTER_LINEAR)

    def poses(self, frame: int) -> tuple[Tensor, Tensor, Tensor]:  # -> world_from_box [A, 4, 4], quats [A, 4], present [A]
        """The actors' box poses at ``frame``, their rotations as quaternions, and which the frame labels."""
        if not self.actors:
            return torch.zeros(0, 4, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.bool)
        return (torch.from_numpy(np.stack([a.world_from_box[frame] for a in self.actors]).astype(np.float32)),
                torch.from_numpy(np.stack([a.quats[frame] for a in self.actors]).astype(np.float32)),
                torch.tensor([bool(a.present[frame]) for a in self.actors], dtype=torch.bool))


def _box_in_vehicle(box: waymo.Box3d) -> np.ndarray:  # -> [4, 4]
    c, s = math.cos(box.heading), math.sin(box.heading)
    matrix = np.eye(4)
    matrix[:3, :3] = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]
    matrix[:3, 3] = box.center
    return matrix


def drive_scene(segment: waymo.Segment, frames: int = 0, actor_types: Sequence[int] = (waymo.BoxType.TYPE_VEHICLE,)
                ) -> DriveScene:
    """The cameras and actors of the first ``frames`` frames (0: all) of a segment; no image is decoded."""
    from scipy.spatial.transform import Rotation

    count = frames or segment.num_frames
    camera = segment.camera
    origin = np.linalg.inv(segment.world_from_vehicle[0])  # the scene's world: the first vehicle frame
    world_from_vehicle = origin @ segment.world_from_vehicle[:count]
    world_from_camera = world_from_vehicle @ camera.camera_to_vehicle @ OPENCV_IN_WAYMO_CAMERA
    intrinsics, maps = scenes.undistortion(camera.intrinsics, camera.distortion, camera.width, camera.height)
    tracks: dict[str, dict] = {}
    for t, boxes in enumerate(segment.boxes_3d[:count]):
        for box in boxes:
            if box.type not in actor_types:
                continue
            track = tracks.setdefault(box.object_id, {"type": box.type, "size": np.zeros(3),
                                                      "poses": np.tile(np.eye(4), (count, 1, 1)),
                                                      "present": np.zeros(count, bool)})
            track["size"] = np.maximum(track["size"], box.size)
            track["poses"][t] = world_from_vehicle[t] @ _box_in_vehicle(box)
            track["present"][t] = True
    actors = tuple(Actor(object_id, track["type"], track["size"], track["poses"], track["present"],
                         Rotation.from_matrix(track["poses"][:, :3, :3]).as_quat()[:, [3, 0, 1, 2]])
                   for object_id, track in sorted(tracks.items()))
    return DriveScene(segment.context_name, segment, count, np.linalg.inv(world_from_camera),
                      np.asarray(intrinsics, float), camera.width, camera.height, actors, maps)


def actor_ids(gaussians: dict[str, Tensor]) -> Tensor:  # -> [N] long
    return gaussians["owner"].long()


# ----------------------------------------------------------------------------------------------------------
# Composite Gaussians


def init_drive_gaussians(scene: DriveScene, train_ids: np.ndarray, background_points: int, actor_points: int,
                         extent: float, sh_degree: int, init_opacity: float, init_scale: float,
                         generator: torch.Generator) -> dict[str, Tensor]:
    """Random background Gaussians in a cube of ``extent`` x the scene scale around the training cameras,
    and ``actor_points`` random Gaussians in the box (its frame) of each actor that a training frame shows
    (an actor seen only between training frames gets none: nothing would fit it); simple_trainer's
    scales, rotations, opacities and colours for each set (``splat.init_gaussians``)."""
    camtoworlds = np.linalg.inv(scene.viewmats[train_ids])
    centres = camtoworlds[:, :3, 3]
    reach = extent * gs.scene_scale(camtoworlds)
    points, rgb = gs.random_points(centres.mean(axis=0) - reach, centres.mean(axis=0) + reach, background_points,
                                   generator)
    parts = [gs.init_gaussians(points, rgb, sh_degree, init_opacity, init_scale, generator)]
    owners = [torch.full((background_points,), -1, dtype=torch.int32)]
    for index, actor in enumerate(scene.actors):
        if not box_pixel_counts(scene, actor, train_ids).any():
            continue
        local = (torch.rand(actor_points, 3, generator=generator) - 0.5) * torch.from_numpy(actor.size).float()
        colours = torch.rand(actor_points, 3, generator=generator)
        parts.append(gs.init_gaussians(local, colours, sh_degree, init_opacity, init_scale, generator))
        owners.append(torch.full((actor_points,), index, dtype=torch.int32))
    merged = {key: torch.cat([part[key] for part in parts]) for key in gs.GAUSSIAN_KEYS}
    merged["owner"] = torch.cat(owners)
    return merged


def place(gaussians: dict[str, Tensor], world_from_box: Tensor, quats: Tensor, present: Tensor) -> dict[str, Tensor]:
    """The Gaussians of one frame in world coordinates: each actor's moved by its box pose ``[A, 4, 4]``
    (rotation ``quats [A, 4]``, wxyz), hidden (opacity ~0) where ``present [A]`` is False; differentiable in
    the Gaussians (:meth:`DriveScene.poses` gives the three)."""
    owner = actor_ids(gaussians)
    actor = owner >= 0
    if not actor.any():
        return gaussians
    index = owner.clamp_min(0)
    device = gaussians["means"].device
    world_from_box, quats, present = world_from_box.to(device), quats.to(device), present.to(device)
    rotation, translation = world_from_box[index, :3, :3], world_from_box[index, :3, 3]
    moved = (rotation @ gaussians["means"][..., None]).squeeze(-1) + translation
    turned = gs.quat_multiply(quats[index], gaussians["quats"])
    placed = dict(gaussians)
    placed["means"] = torch.where(actor[:, None], moved, gaussians["means"])
    placed["quats"] = torch.where(actor[:, None], turned, gaussians["quats"])
    placed["opacities"] = gaussians["opacities"].masked_fill(actor & ~present[index], HIDDEN_OPACITY)
    return placed


@torch.no_grad()
def render(gaussians: dict[str, Tensor], scene: DriveScene, sh_degree: int,
           progress: Callable[[int], object] | None = None,
           indices: Sequence[int] | None = None) -> np.ndarray:  # -> [t, H, W, 3] uint8
    """Frames ``indices`` of the scene (all by default), each with the actors at that frame's poses."""
    device = gaussians["means"].device
    Ks = torch.as_tensor(scene.intrinsics, dtype=torch.float32, device=device)[None]
    chosen = range(scene.frames) if indices is None else indices
    frames = np.empty((len(chosen), scene.height, scene.width, 3), np.uint8)
    for out, t in enumerate(chosen):
        colours, _, _ = gs.rasterize(place(gaussians, *scene.poses(t)),
                                     torch.from_numpy(scene.viewmats[t:t + 1]).float().to(device), Ks, scene.width,
                                     scene.height, sh_degree)
        frames[out] = (colours[0].clamp(0, 1) * 255).round().to("cpu", torch.uint8).numpy()
        if progress is not None:
            progress(1)
    return frames


def replace_actor(gaussians: dict[str, Tensor], index: int, asset: dict[str, Tensor] | None
                  ) -> dict[str, Tensor]:
    """Drop actor ``index``'s Gaussians and add ``asset`` (its box frame) as that actor's; None: removal only.
    The rest keep their order; the asset's SH are zero-padded to the scene's degree."""
    kept = {key: value[actor_ids(gaussians) != index] for key, value in gaussians.items()}
    if asset is None:
        return kept
    merged, ids = gs.concat(kept, asset)
    merged["owner"] = torch.cat([kept["owner"], kept["owner"].new_full((len(ids),), index)])
    return merged


# ----------------------------------------------------------------------------------------------------------
# Geometry of one actor: silhouettes, heading


def _corners(size: np.ndarray) -> np.ndarray:  # [3] -> [8, 4] homogeneous, box frame
    signs = np.array([[x, y, z] for x in (-0.5, 0.5) for y in (-0.5, 0.5) for z in (-0.5, 0.5)])
    return np.concatenate([signs * size, np.ones((8, 1))], axis=1)


def box_silhouette(scene: DriveScene, actor: Actor, frame: int, near: float = 0.05) -> np.ndarray | None:
    """The image region ``[H, W]`` bool of the actor's 3D box at ``frame`` (the convex hull of its projected
    corners); None where the frame does not label it or a corner is within ``near`` metres of the camera
    plane."""
    if not actor.present[frame]:
        return None
    camera = (scene.viewmats[frame] @ actor.world_from_box[frame] @ _corners(actor.size).T)[:3]  # [3, 8]
    if (camera[2] <= near).any():
        return None
    pixels = (scene.intrinsics @ camera)[:2] / camera[2]
    hull = cv2.convexHull(np.round(pixels.T * 16).astype(np.int32))  # 4 fractional bits
    mask = np.zeros((scene.height, scene.width), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def box_pixel_counts(scene: DriveScene, actor: Actor, frames: Sequence[int] | None = None) -> np.ndarray:  # [t] int
    """Pixels of the actor's projected box in each of ``frames`` (all by default); one image at a time."""
    chosen = range(scene.frames) if frames is None else frames
    return np.array([0 if (mask := box_silhouette(scene, actor, int(t))) is None else int(mask.sum())
                     for t in chosen], np.int64)


def box_silhouettes(scene: DriveScene, actor: Actor, frames: Sequence[int] | None = None) -> np.ndarray:
    """:func:`box_silhouette` of ``frames`` (all by default), ``[t, H, W]`` bool, empty where there is none."""
    chosen = range(scene.frames) if frames is None else frames
    out = np.zeros((len(chosen), scene.height, scene.width), bool)
    for row, t in enumerate(chosen):
        mask = box_silhouette(scene, actor, int(t))
        if mask is not None:
            out[row] = mask
    return out


def heading(gaussians: dict[str, Tensor], steps: int = 90) -> tuple[float, float]:
    """Orient-Anything's stand-in: the heading of the asset's footprint, in its box frame (about +z, from +x).

    The footprint is the ground-plane (x, y) positions of the opaque Gaussians (opacity > 0.5; all if fewer
    than 8 are); its extents along each direction are the 5 and 95 % quantiles (a few floaters do not
    count). The minimum-area bounding rectangle over ``steps`` directions in [0, 90) degrees gives the
    heading of its longer side, in [0, pi) (an axis: modulo 180 degrees), and the confidence
    ``1 - min area / max area`` over the directions (0: round, no heading; 0.5: a square; towards 1: a
    long thin footprint).
    """
    opaque = torch.sigmoid(gaussians["opacities"]) > 0.5
    points = gaussians["means"][opaque if int(opaque.sum()) >= 8 else slice(None), :2].double()
    angles = torch.arange(steps, dtype=torch.float64) * (math.pi / 2 / steps)  # [S]
    directions = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)  # [S, 2]: along; across = +90
    along = points @ directions.T  # [N, S]
    across = points @ torch.stack([-directions[:, 1], directions[:, 0]], dim=1).T
    quantiles = torch.tensor([0.05, 0.95], dtype=torch.float64)
    length = torch.diff(torch.quantile(along, quantiles, dim=0), dim=0)[0]  # [S]
    width = torch.diff(torch.quantile(across, quantiles, dim=0), dim=0)[0]
    area = length * width
    best = int(torch.argmin(area))
    yaw = float(angles[best]) + (0.0 if length[best] >= width[best] else math.pi / 2)
    confidence = float(1 - area.min() / area.max().clamp_min(1e-12))
    return yaw % math.pi, confidence


def heading_error(size: np.ndarray, estimate: float, square_ratio: float = SQUARE_RATIO) -> float:
    """The signed error of a heading estimate against a box of ``size``: modulo 180 degrees against its long
    axis, or modulo 90 degrees when its footprint is nearly square (length / width below ``square_ratio``):
    then no side is the long one, and a quarter turn looks the same."""
    target = box_axis(size)
    if max(size[0], size[1]) < square_ratio * min(size[0], size[1]):
        return (target - estimate + math.pi / 4) % (math.pi / 2) - math.pi / 4
    return axis_difference(target, estimate)


def box_axis(size: np.ndarray) -> float:
    """The heading of a box's long horizontal axis in its own frame: 0 (+x, its length) or pi/2."""
    return 0.0 if size[0] >= size[1] else math.pi / 2


def axis_difference(target: float, estimate: float) -> float:
    """``target - estimate`` for axes (modulo pi), in [-pi/2, pi/2)."""
    return (target - estimate + math.pi / 2) % math.pi - math.pi / 2


def turn_about_z(gaussians: dict[str, Tensor], angle: float, pivot: Sequence[float],
                 target: Sequence[float]) -> dict[str, Tensor]:
    """Rigidly turn Gaussians by ``angle`` about the vertical through ``pivot``, then carry ``pivot`` to
    ``target``. Only view-independent colour stays right (SH above degree 0 are not rotated)."""
    means = gaussians["means"]
    c, s = math.cos(angle), math.sin(angle)
    rotation = means.new_tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    turn = gaussians["quats"].new_tensor([math.cos(angle / 2), 0.0, 0.0, math.sin(angle / 2)])
    moved = dict(gaussians)
    moved["means"] = (means - means.new_tensor(pivot)) @ rotation.T + means.new_tensor(target)
    moved["quats"] = gs.quat_multiply(turn.expand_as(gaussians["quats"]), gaussians["quats"])
    return moved

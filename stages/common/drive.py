"""Driving scenes from Waymo Open Dataset v2 segments: a static background and one rigid set of Gaussians per
tracked actor, moved by its 3D box poses (the scene decomposition of SplatAD, paper section 4.4 / B.4).

A segment (``stages.common.waymo.read_segment``, one camera) becomes a :class:`DriveScene`:

- **Cameras.** ``world_from_vehicle[t] @ camera_to_vehicle`` places Waymo's camera (+x forward, +y left,
  +z up) in the world; ``OPENCV_IN_WAYMO_CAMERA`` turns it into the OpenCV camera gsplat wants
  (``viewmats`` = world-to-camera). Frames with lens distortion (``k1, k2, p1, p2, k3``, OpenCV's model) are
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
    "box_silhouettes",
    "drive_scene",
    "heading",
    "init_drive_gaussians",
    "place",
    "render",
    "replace_actor",
    "turn_about_z",
]

OPENCV_IN_WAYMO_CAMERA = np.array([[0.0, 0, 1, 0], [-1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 0, 1]])  # columns: x right, y down, z forward
HIDDEN_OPACITY = -30.0  # logit: sigmoid ~ 1e-13, far below gsplat's 1/255 alpha threshold


@dataclass(frozen=True, eq=False)
class Actor:
    object_id: str  # key.laser_object_id
    type: int  # waymo.BoxType
    size: np.ndarray  # [3] length (x), width (y), height (z), metres: the track's largest
    world_from_box: np.ndarray  # [T, 4, 4]; identity where absent
    present: np.ndarray  # [T] bool: the frame labels it


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
        images = self.segment.read_images(list(chosen))
        if self.undistort_maps is None:
            return images
        return np.stack([cv2.remap(image, *self.undistort_maps, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                         for image in images])

    def poses(self, frame: int) -> tuple[Tensor, Tensor]:  # -> world_from_box [A, 4, 4], present [A]
        return (torch.from_numpy(np.stack([a.world_from_box[frame] for a in self.actors]).astype(np.float32))
                if self.actors else torch.zeros(0, 4, 4),
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
    count = frames or segment.num_frames
    camera = segment.camera
    world_from_camera = segment.world_from_vehicle[:count] @ camera.camera_to_vehicle @ OPENCV_IN_WAYMO_CAMERA
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
            track["poses"][t] = segment.world_from_vehicle[t] @ _box_in_vehicle(box)
            track["present"][t] = True
    actors = tuple(Actor(object_id, track["type"], track["size"], track["poses"], track["present"])
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
    and ``actor_points`` random Gaussians in each actor's box (its frame); simple_trainer's scales,
    rotations, opacities and colours for each set (``splat.init_gaussians``)."""
    camtoworlds = np.linalg.inv(scene.viewmats[train_ids])
    centres = camtoworlds[:, :3, 3]
    reach = extent * gs.scene_scale(camtoworlds)
    points, rgb = gs.random_points(centres.mean(axis=0) - reach, centres.mean(axis=0) + reach, background_points,
                                   generator)
    parts = [gs.init_gaussians(points, rgb, sh_degree, init_opacity, init_scale, generator)]
    owners = [torch.full((background_points,), -1, dtype=torch.int32)]
    for index, actor in enumerate(scene.actors):
        local = (torch.rand(actor_points, 3, generator=generator) - 0.5) * torch.from_numpy(actor.size).float()
        colours = torch.rand(actor_points, 3, generator=generator)
        parts.append(gs.init_gaussians(local, colours, sh_degree, init_opacity, init_scale, generator))
        owners.append(torch.full((actor_points,), index, dtype=torch.int32))
    merged = {key: torch.cat([part[key] for part in parts]) for key in gs.GAUSSIAN_KEYS}
    merged["owner"] = torch.cat(owners)
    return merged


def _rotation_quats(rotations: Tensor) -> Tensor:  # [A, 3, 3] -> [A, 4] wxyz
    from scipy.spatial.transform import Rotation

    if not len(rotations):
        return rotations.new_zeros(0, 4)
    xyzw = Rotation.from_matrix(rotations.detach().cpu().double().numpy()).as_quat()
    return torch.from_numpy(xyzw[:, [3, 0, 1, 2]]).to(rotations)


def place(gaussians: dict[str, Tensor], world_from_box: Tensor, present: Tensor) -> dict[str, Tensor]:
    """The Gaussians of one frame in world coordinates: each actor's moved by its box pose ``[A, 4, 4]``,
    hidden (opacity ~0) where ``present [A]`` is False; differentiable in the Gaussians."""
    owner = actor_ids(gaussians)
    actor = owner >= 0
    if not actor.any():
        return gaussians
    index = owner.clamp_min(0)
    device = gaussians["means"].device
    world_from_box, present = world_from_box.to(device), present.to(device)
    rotation, translation = world_from_box[index, :3, :3], world_from_box[index, :3, 3]
    moved = (rotation @ gaussians["means"][..., None]).squeeze(-1) + translation
    turned = gs.quat_multiply(_rotation_quats(world_from_box[:, :3, :3])[index], gaussians["quats"])
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


def box_silhouettes(scene: DriveScene, actor: Actor, near: float = 0.05) -> np.ndarray:  # -> [T, H, W] bool
    """The image region of the actor's 3D box in each frame (the convex hull of its projected corners), empty
    where the frame does not label it or a corner is within ``near`` metres of the camera plane."""
    out = np.zeros((scene.frames, scene.height, scene.width), bool)
    corners = _corners(actor.size)
    for t in np.flatnonzero(actor.present[:scene.frames]):
        camera = (scene.viewmats[t] @ actor.world_from_box[t] @ corners.T)[:3]  # [3, 8]
        if (camera[2] <= near).any():
            continue
        pixels = (scene.intrinsics @ camera)[:2] / camera[2]
        hull = cv2.convexHull(np.round(pixels.T * 16).astype(np.int32))  # 4 fractional bits
        mask = np.zeros((scene.height, scene.width), np.uint8)
        cv2.fillConvexPoly(mask, hull, 1, lineType=cv2.LINE_8, shift=4)
        out[t] = mask.astype(bool)
    return out


def heading(gaussians: dict[str, Tensor]) -> tuple[float, float]:
    """Orient-Anything's stand-in: the heading of the long horizontal axis of the opacity-weighted centres,
    in the box frame (about +z, from +x), in [0, pi) (an axis: modulo 180 degrees), and a confidence
    ``(l1 - l2) / (l1 + l2)`` from the eigenvalues of the horizontal covariance (0: round, 1: a line)."""
    weights = torch.sigmoid(gaussians["opacities"]).double()
    ground = gaussians["means"][:, :2].double()
    centre = (weights[:, None] * ground).sum(0) / weights.sum()
    spread = ground - centre
    covariance = (weights[:, None, None] * spread[:, :, None] * spread[:, None, :]).sum(0) / weights.sum()
    values, vectors = torch.linalg.eigh(covariance)  # ascending
    axis_x, axis_y = vectors[:, 1].tolist()
    confidence = float((values[1] - values[0]) / (values[1] + values[0]).clamp_min(1e-12))
    return math.atan2(axis_y, axis_x) % math.pi, confidence


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

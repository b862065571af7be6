"""3D Gaussian splatting for the data stages: scene representation, SfM points, a CPU rasterizer, training.

The paper (section 4.2, supplement B.2) reconstructs each DL3DV scene with gsplat from every 50th frame
and renders the whole camera path: the renders, with their floaters and blur, are the inputs a video
model learns to restore. This module follows gsplat 1.5.3 and its ``examples/simple_trainer.py``:

- **Gaussians** are a dict of tensors with gsplat's trainer names and activations: ``means [N, 3]``,
  ``quats [N, 4]`` (wxyz, unnormalised), ``scales [N, 3]`` (log), ``opacities [N]`` (logit),
  ``sh0 [N, 1, 3]`` and ``shN [N, K-1, 3]`` (spherical-harmonics coefficients, ``K = (degree + 1)^2``),
  saved as safetensors (:func:`save_gaussians`).
- **Initialisation** from SfM points when the scene has them (nerfstudio's ``ply_file_path``, or a COLMAP
  ``sparse/0/points3D.{bin,txt}`` mapped through transforms.json's ``applied_transform``), random in the
  scene bounds otherwise; scales from the 3 nearest neighbours, opacity 0.1 (simple_trainer's defaults).
- **Rendering** (:func:`rasterize`): ``gsplat.rasterization`` on CUDA. On CPU, gsplat's own PyTorch
  projection (``gsplat.cuda._torch_impl``: ``_quat_scale_to_covar_preci``, ``_fully_fused_projection``,
  ``_spherical_harmonics``) feeds a dense, depth-sorted alpha compositor that follows gsplat's
  CUDA kernel rule for rule (see the note "Compositing like gsplat's kernel"); it returns the non-packed
  ``info`` dict ``DefaultStrategy`` reads (``means2d`` [C, N, 2] whose gradient it accumulates, ``radii``
  [C, N, 2], ``width``, ``height``, ``n_cameras``, ``gaussian_ids = None``).
- **Training** (:func:`train`): simple_trainer's recipe: one random training view per step (reshuffled
  every epoch), ``(1 - 0.2) L1 + 0.2 (1 - SSIM)``, one more SH degree every ``sh_degree_interval`` steps,
  one Adam per parameter with its learning rate (means scaled by the scene scale and decayed to 1 % over
  the run), and ``gsplat.DefaultStrategy`` densification (duplicate, split, prune).

Cameras: scenes store OpenGL camera-to-world matrices (nerfstudio); gsplat wants OpenCV world-to-camera
``viewmats``: :func:`viewmats_from_camtoworlds`. gsplat's trainer also normalises the world; every
length it uses is relative to the scene scale, so we keep world units and pass the scale instead.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GAUSSIAN_KEYS",
    "SH_C0",
    "SceneEntry",
    "TrainConfig",
    "concat",
    "init_gaussians",
    "load_gaussians",
    "num_sh_bases",
    "numeric_metrics",
    "quat_multiply",
    "plot_frame_pairs",
    "plot_training",
    "random_points",
    "rasterize",
    "read_colmap_points",
    "read_ply_points",
    "render_frames",
    "rgb_to_sh",
    "save_gaussians",
    "scene_entries",
    "scene_root",
    "scene_scale",
    "select",
    "sfm_points",
    "ssim",
    "train",
    "viewmats_from_camtoworlds",
]

GAUSSIAN_KEYS = ("means", "quats", "scales", "opacities", "sh0", "shN")
SH_C0 = 0.28209479177387814  # the degree-0 spherical-harmonics basis, 1 / (2 sqrt(pi))
ALPHA_THRESHOLD = 1.0 / 255.0  # gsplat's kernel skips fainter contributions (cuda/include/Common.h)
MIN_TRANSMITTANCE = 1e-4  # ... and stops a pixel before its transmittance would fall this low
MAX_ALPHA = 0.999


def num_sh_bases(degree: int) -> int:
    return (degree + 1) ** 2


def rgb_to_sh(rgb: Tensor) -> Tensor:  # [..., 3] in [0, 1] -> [..., 3] degree-0 coefficients
    return (rgb - 0.5) / SH_C0


# ----------------------------------------------------------------------------------------------------------
# Cameras and points


def viewmats_from_camtoworlds(camtoworlds: np.ndarray | Tensor) -> Tensor:  # [T, 4, 4] OpenGL c2w -> w2c
    """OpenCV world-to-camera matrices (gsplat's ``viewmats``) from nerfstudio's OpenGL camera-to-world."""
    c2w = torch.as_tensor(np.asarray(camtoworlds), dtype=torch.float64)
    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64))  # GL -> CV camera axes
    return torch.linalg.inv(c2w @ flip).float()


def scene_scale(camtoworlds: np.ndarray) -> float:  # [T, 4, 4] -> metres
    """simple_trainer's scene scale: 1.1 x the largest camera distance from the cameras' mean.

    One camera (or cameras at one spot) has no extent; 1.0 is used then.
    """
    centres = np.asarray(camtoworlds)[:, :3, 3]
    extent = float(np.linalg.norm(centres - centres.mean(axis=0), axis=1).max())
    return 1.1 * extent if extent > 1e-6 else 1.0


def random_points(low: np.ndarray, high: np.ndarray, count: int,
                  generator: torch.Generator) -> tuple[Tensor, Tensor]:  # -> [count, 3] points, [count, 3] rgb
    """Uniform points in the box ``[low, high]`` with uniform random colours (simple_trainer's random init)."""
    low, high = (torch.as_tensor(np.asarray(v), dtype=torch.float32) for v in (low, high))
    points = low + (high - low) * torch.rand(count, 3, generator=generator)
    return points, torch.rand(count, 3, generator=generator)


_PLY_TYPES = {"char": "b", "int8": "b", "uchar": "B", "uint8": "B", "short": "h", "int16": "h",
              "ushort": "H", "uint16": "H", "int": "i", "int32": "i", "uint": "I", "uint32": "I",
              "float": "f", "float32": "f", "double": "d", "float64": "d"}


def read_ply_points(path: str | Path) -> tuple[np.ndarray, np.ndarray]:  # -> [N, 3] float, [N, 3] uint8
    """The vertices (x, y, z, red, green, blue) of a point-cloud PLY, ASCII or binary little-endian.

    This is the ``sparse_pc.ply`` that nerfstudio's ``ns-process-data`` writes next to transforms.json
    (``ply_file_path``), already in the transforms' world frame. Vertices must be the first element.
    """
    path = Path(path)
    with open(path, "rb") as handle:
        if handle.readline().strip() != b"ply":
            raise ValueError(f"{path} is not a PLY file (no 'ply' magic line).")
        fmt, elements = None, []  # elements: [name, count, [(property, type code)]]
        for raw in iter(handle.readline, b""):
            words = raw.decode("ascii", "replace").split()
            if not words or words[0] in ("comment", "obj_info"):
                continue
            if words[0] == "end_header":
                break
            if words[0] == "format":
                fmt = words[1]
            elif words[0] == "element":
                elements.append([words[1], int(words[2]), []])
            elif words[0] == "property" and elements:
                is_list = words[1] == "list"
                elements[-1][2].append((words[-1], None if is_list else _PLY_TYPES.get(words[1])))
        body = handle.read()
    if not elements or elements[0][0] != "vertex":
        raise ValueError(f"{path}: the first PLY element must be 'vertex'.")
    _, count, properties = elements[0]
    names, types = [name for name, _ in properties], [code for _, code in properties]
    if None in types:
        raise ValueError(f"{path}: list or unknown property types in the vertex element are not supported.")
    if not {"x", "y", "z"} <= set(names):
        raise ValueError(f"{path}: the vertex element has no x, y, z properties (found {names}).")
    if fmt == "ascii":
        rows = np.array(body.split(), dtype=np.float64)[: count * len(names)].reshape(count, len(names))
        columns = {name: rows[:, index] for index, name in enumerate(names)}
    elif fmt == "binary_little_endian":
        dtype = np.dtype([(name, "<" + code) for name, code in zip(names, types)])
        table = np.frombuffer(body, dtype=dtype, count=count)
        columns = {name: table[name].astype(np.float64) for name in names}
    else:
        raise ValueError(f"{path}: PLY format {fmt!r} is not supported (ascii or binary_little_endian).")
    points = np.stack([columns[axis] for axis in "xyz"], axis=1)
    if {"red", "green", "blue"} <= set(columns):
        rgb = np.stack([columns[c] for c in ("red", "green", "blue")], axis=1).clip(0, 255).astype(np.uint8)
    else:
        rgb = np.full((count, 3), 128, np.uint8)
    return points, rgb


def read_colmap_points(folder: str | Path) -> tuple[np.ndarray, np.ndarray]:  # -> [N, 3], [N, 3] uint8
    """COLMAP's sparse points (``points3D.bin`` or ``points3D.txt`` in ``folder``), in COLMAP's world."""
    folder = Path(folder)
    if (folder / "points3D.bin").is_file():
        data = (folder / "points3D.bin").read_bytes()
        (count,), offset = struct.unpack_from("<Q", data, 0), 8
        points, rgb = np.empty((count, 3)), np.empty((count, 3), np.uint8)
        record = struct.Struct("<Q3d3BdQ")  # id, xyz, rgb, error, track length; then (image, point2D) pairs
        for index in range(count):
            _, x, y, z, r, g, b, _, track = record.unpack_from(data, offset)
            points[index], rgb[index] = (x, y, z), (r, g, b)
            offset += record.size + 8 * track
        return points, rgb
    if (folder / "points3D.txt").is_file():
        rows = [line.split() for line in (folder / "points3D.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
        values = np.array([row[1:7] for row in rows], dtype=np.float64).reshape(-1, 6)
        return values[:, :3], values[:, 3:].clip(0, 255).astype(np.uint8)
    raise FileNotFoundError(f"{folder} holds neither points3D.bin nor points3D.txt.")


COLMAP_FOLDERS = ("colmap/sparse/0", "sparse/0", "colmap/sparse", "sparse")


def sfm_points(folder: str | Path, transforms: dict) -> tuple[np.ndarray, np.ndarray, str] | None:
    """A scene's SfM points in the frame of its transforms.json poses, or None if it ships none.

    Looks, in order, at transforms.json's ``ply_file_path`` (nerfstudio: already in that frame) and at a
    COLMAP sparse model (``colmap/sparse/0``, ``sparse/0``, ...), whose points are mapped through the
    3x4 ``applied_transform`` that ns-process-data records (identity when the file has none).

    Returns:
        ``(points [N, 3], rgb [N, 3] uint8, source path)``.
    """
    folder = Path(folder)
    if transforms.get("ply_file_path"):
        path = folder / transforms["ply_file_path"]
        if not path.is_file():
            raise FileNotFoundError(f"{folder / 'transforms.json'} names ply_file_path {path.name!r} but "
                                    f"{path} is missing; restore it or remove the key.")
        points, rgb = read_ply_points(path)
        return points, rgb, str(path)
    for name in COLMAP_FOLDERS:
        sparse = folder / name
        if (sparse / "points3D.bin").is_file() or (sparse / "points3D.txt").is_file():
            points, rgb = read_colmap_points(sparse)
            applied = np.asarray(transforms.get("applied_transform", np.eye(4)[:3]), dtype=np.float64)
            if applied.shape not in ((3, 4), (4, 4)):
                raise ValueError(f"{folder / 'transforms.json'}: applied_transform must be 3x4, got "
                                 f"{applied.shape}.")
            return points @ applied[:3, :3].T + applied[:3, 3], rgb, str(sparse)
    return None


def init_gaussians(points: Tensor, rgb: Tensor, sh_degree: int, init_opacity: float = 0.1,
                   init_scale: float = 1.0, generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """Gaussians at ``points`` [N, 3] with colours ``rgb`` [N, 3] in [0, 1], as simple_trainer makes them.

    Scales: the mean distance to the 3 nearest neighbours (isotropic, times ``init_scale``); rotations
    random; opacity ``init_opacity``; SH: the colour in degree 0, zeros above.
    """
    from scipy.spatial import cKDTree

    points, rgb = points.float(), rgb.float()
    count = len(points)
    if count < 4:
        raise ValueError(f"init_gaussians: need at least 4 points (3 neighbours each), got {count}.")
    distances, _ = cKDTree(points.numpy()).query(points.numpy(), k=4)  # [N, 4], itself first
    mean_distance = torch.from_numpy(np.sqrt((distances[:, 1:] ** 2).mean(axis=1))).float().clamp_min(1e-7)
    shN = torch.zeros(count, num_sh_bases(sh_degree) - 1, 3)
    return {
        "means": points.clone(),
        "quats": torch.rand(count, 4, generator=generator),
        "scales": torch.log(mean_distance * init_scale)[:, None].repeat(1, 3),
        "opacities": torch.logit(torch.full((count,), init_opacity)),
        "sh0": rgb_to_sh(rgb)[:, None, :],
        "shN": shN,
    }


METADATA_KEY = "chopgrad"  # the one safetensors metadata entry: the whole record as sorted JSON


def save_gaussians(path: str | Path, gaussians: dict[str, Tensor], metadata: dict | None = None) -> Path:
    """Write Gaussians as safetensors (GAUSSIAN_KEYS in float32, other entries such as a driving scene's
    ``owner`` as they are), with ``metadata`` as one JSON string.

    One entry, its keys sorted: safetensors keeps its metadata in a Rust ``HashMap``, whose order
    changes from process to process, so several entries would make a rerun's file differ byte for
    byte (and DVC rerun every stage after it) although the tensors are identical.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu", torch.float32 if key in GAUSSIAN_KEYS else value.dtype).contiguous()
               for key, value in gaussians.items()}
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(metadata or {}, sort_keys=True)})
    return path


def load_gaussians(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read :func:`save_gaussians`' file: the tensors (every entry) and the metadata (decoded from JSON)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Gaussians not found: {path}; run the splat stage first.")
    with safe_open(str(path), framework="pt") as handle:
        missing = set(GAUSSIAN_KEYS) - set(handle.keys())
        stored = handle.metadata() or {}
        if missing or METADATA_KEY not in stored:
            lacking = sorted(missing) + ([f"metadata {METADATA_KEY!r}"] if METADATA_KEY not in stored else [])
            raise ValueError(f"{path} lacks {', '.join(lacking)}; it is not a splat stage output of this "
                             "version (re-run the splat stage).")
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return tensors, json.loads(stored[METADATA_KEY])


# ----------------------------------------------------------------------------------------------------------
# Rendering
#
# Note "Compositing like gsplat's kernel" (cuda/csrc/RasterizeToPixels3DGSFwd.cu and
# ProjectionEWA3DGSFused.cu, gsplat 1.5.3). Per pixel centre p = (j + 0.5, i + 0.5), the Gaussians seen by
# the camera (radius > 0) are taken front to back (by camera-space depth) with
# sigma = 0.5 (a dx^2 + c dy^2) + b dx dy for the conic (a, b, c) and d = mean2d - p,
# alpha = min(0.999, opacity exp(-sigma)); a Gaussian with sigma < 0 or alpha < 1/255 is skipped; the pixel
# stops BEFORE the first Gaussian that would bring its transmittance T to 1e-4 or below; colour =
# sum alpha T c + T_final background. The radius is gsplat's opacity-aware one,
# ceil(min(3.33, sqrt(2 ln(255 opacity))) sqrt(Sigma2d_ii)): outside it alpha < 1/255, so evaluating each
# Gaussian only on the pixels of its box (gsplat's tiles) and on all pixels (here) give the same image.


def _radii(means2d: Tensor, conics: Tensor, opacities: Tensor, valid: Tensor, width: int,
           height: int) -> Tensor:  # [C, N, 2], [C, N, 3], [1, N], [C, N] -> [C, N, 2] int32, 0: not drawn
    a, b, c = conics.detach().unbind(-1)
    det = (a * c - b * b).clamp_min(1e-30)
    var_x, var_y = c / det, a / det  # the diagonal of the (blurred) 2D covariance, the conic's inverse
    opacity = opacities.detach().expand_as(a)
    extend = torch.sqrt(2.0 * torch.log(opacity.clamp_min(ALPHA_THRESHOLD) / ALPHA_THRESHOLD)).clamp_max(3.33)
    radius = torch.stack([torch.ceil(extend * var_x.sqrt()), torch.ceil(extend * var_y.sqrt())], -1)
    x, y = means2d.detach().unbind(-1)
    drawn = (valid & (opacity >= ALPHA_THRESHOLD) & (x + radius[..., 0] > 0) & (x - radius[..., 0] < width)
             & (y + radius[..., 1] > 0) & (y - radius[..., 1] < height))
    return torch.where(drawn[..., None], radius, torch.zeros_like(radius)).int()


def _composite(pixels: Tensor, means2d: Tensor, conics: Tensor, opacities: Tensor,
               colors: Tensor) -> tuple[Tensor, Tensor]:  # [P, 2], [M, 2], [M, 3], [M], [M, D] -> [P, D], [P]
    """Front-to-back alpha compositing of M depth-sorted Gaussians at P pixel centres (dense [P, M]).

    sigma is a quadratic form in the pixel position, so it is one [P, 6] x [6, M] product (pixels and
    means relative to the first pixel keep the terms small). The conics are positive definite, so the
    kernel's ``sigma < 0`` test can only catch rounding here and is left out.
    """
    origin = pixels[:1].detach()
    x, y = (pixels - origin).unbind(-1)
    mx, my = (means2d - origin).unbind(-1)
    a, b, c = conics.unbind(-1)
    features = torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], dim=1)  # [P, 6]
    coefficients = torch.stack([0.5 * a, b, 0.5 * c, -(a * mx + b * my), -(b * mx + c * my),
                                0.5 * a * mx * mx + b * mx * my + 0.5 * c * my * my])  # [6, M]
    exponent = torch.log(opacities.clamp_min(1e-30)) - features @ coefficients  # [P, M] ln(opacity e^-sigma)
    drawn = exponent >= math.log(ALPHA_THRESHOLD)
    alpha = torch.where(drawn, torch.exp(exponent).clamp_max(MAX_ALPHA), torch.zeros_like(exponent))
    log_keep = torch.log1p(-alpha)  # ln(1 - alpha)
    log_after = torch.cumsum(log_keep, dim=1)  # ln T after each Gaussian
    weights = alpha * torch.exp(log_after - log_keep)  # alpha T_before
    weights = weights * (log_after.detach() > math.log(MIN_TRANSMITTANCE))  # the stop rule: a row prefix
    return weights @ colors, weights.sum(dim=1)


def _tiles(height: int, width: int, tile_size: int, dtype) -> list[tuple[slice, slice, Tensor]]:
    """Row-major tiles of the image: (rows, cols, pixel centres [h*w, 2] as (x, y))."""
    tiles = []
    for top in range(0, height, tile_size):
        for left in range(0, width, tile_size):
            rows, cols = slice(top, min(top + tile_size, height)), slice(left, min(left + tile_size, width))
            yy, xx = torch.meshgrid(torch.arange(rows.start, rows.stop, dtype=dtype),
                                    torch.arange(cols.start, cols.stop, dtype=dtype), indexing="ij")
            tiles.append((rows, cols, torch.stack([xx, yy], dim=-1).reshape(-1, 2) + 0.5))
    return tiles


def rasterize_torch(
    means: Tensor,  # [N, 3]
    quats: Tensor,  # [N, 4] wxyz, unnormalised
    scales: Tensor,  # [N, 3] activated (not log)
    opacities: Tensor,  # [N] activated, in [0, 1]
    colors: Tensor,  # [N, K, 3] SH coefficients (sh_degree given) or [N, D] colours
    viewmats: Tensor,  # [C, 4, 4] OpenCV world-to-camera
    Ks: Tensor,  # [C, 3, 3]
    width: int,
    height: int,
    sh_degree: int | None = None,
    backgrounds: Tensor | None = None,  # [C, D]
    near_plane: float = 0.01,
    far_plane: float = 1e10,
    eps2d: float = 0.3,
    tile_size: int = 16,
) -> tuple[Tensor, Tensor, dict]:  # -> [C, H, W, D], [C, H, W, 1], info
    """``gsplat.rasterization(..., packed=False)`` on CPU: gsplat's PyTorch projection and a dense compositor.

    See the note "Compositing like gsplat's kernel". Differentiable in every input but the radii.
    """
    from gsplat.cuda._torch_impl import (
        _fully_fused_projection,
        _quat_scale_to_covar_preci,
        _spherical_harmonics,
    )

    covars, _ = _quat_scale_to_covar_preci(quats, scales, compute_covar=True, compute_preci=False)
    torch_radii, means2d, depths, conics, _ = _fully_fused_projection(
        means, covars, viewmats, Ks, width, height, eps2d=eps2d, near_plane=near_plane, far_plane=far_plane)
    radii = _radii(means2d, conics, opacities[None], (torch_radii > 0).all(-1), width, height)
    tiles = _tiles(height, width, tile_size, means.dtype)
    campos = torch.linalg.inv(viewmats)[:, :3, 3]  # [C, 3]
    renders, alphas = [], []
    for cam in range(len(viewmats)):
        ids = torch.nonzero((radii[cam] > 0).all(-1)).squeeze(1)
        ids = ids[torch.argsort(depths[cam, ids], stable=True)]  # front to back
        if sh_degree is None:
            rgb = colors[ids]
        else:
            rgb = _spherical_harmonics(sh_degree, means[ids] - campos[cam], colors[ids])
            rgb = torch.clamp_min(rgb + 0.5, 0.0)  # as gsplat.rasterization does
        centre, radius = means2d[cam, ids].detach(), radii[cam, ids].to(means.dtype)
        color = means.new_zeros(height, width, rgb.shape[-1])
        alpha = means.new_zeros(height, width, 1)
        for rows, cols, pixels in tiles:  # only the Gaussians whose box meets the tile (gsplat's tiling)
            meets = ((centre[:, 0] + radius[:, 0] > cols.start) & (centre[:, 0] - radius[:, 0] < cols.stop)
                     & (centre[:, 1] + radius[:, 1] > rows.start) & (centre[:, 1] - radius[:, 1] < rows.stop))
            sub = torch.nonzero(meets).squeeze(1)
            if not len(sub):
                continue
            tile_color, tile_alpha = _composite(pixels, means2d[cam, ids[sub]], conics[cam, ids[sub]],
                                                opacities[ids[sub]], rgb[sub])
            shape = (rows.stop - rows.start, cols.stop - cols.start)
            color = color.index_put((torch.arange(rows.start, rows.stop)[:, None],
                                     torch.arange(cols.start, cols.stop)[None, :]),
                                    tile_color.reshape(*shape, -1))
            alpha = alpha.index_put((torch.arange(rows.start, rows.stop)[:, None],
                                     torch.arange(cols.start, cols.stop)[None, :]),
                                    tile_alpha.reshape(*shape, 1))
        if backgrounds is not None:
            color = color + (1.0 - alpha) * backgrounds[cam]
        renders.append(color)
        alphas.append(alpha)
    info = {"batch_ids": None, "camera_ids": None, "gaussian_ids": None, "radii": radii, "means2d": means2d,
            "depths": depths, "conics": conics, "opacities": opacities[None].expand(len(viewmats), -1),
            "width": width, "height": height, "n_batches": 1, "n_cameras": len(viewmats)}
    return torch.stack(renders), torch.stack(alphas), info


def rasterize(gaussians: dict[str, Tensor], viewmats: Tensor, Ks: Tensor, width: int, height: int,
              sh_degree: int, backgrounds: Tensor | None = None, backend: str = "auto",
              **kwargs) -> tuple[Tensor, Tensor, dict]:  # [C, 4, 4], [C, 3, 3] -> [C, H, W, 3], [C, H, W, 1], info
    """Render Gaussians (trainer parametrisation: log scales, logit opacities, SH) from C cameras.

    Args:
        backend: ``"gsplat"`` (CUDA), ``"torch"`` (CPU, :func:`rasterize_torch`), or ``"auto"``: gsplat
            when the tensors are on a CUDA device.
    """
    colors = torch.cat([gaussians["sh0"], gaussians["shN"]], dim=1)  # [N, K, 3]
    args = (gaussians["means"], gaussians["quats"], torch.exp(gaussians["scales"]),
            torch.sigmoid(gaussians["opacities"]), colors, viewmats, Ks, width, height)
    if backend == "auto":
        backend = "gsplat" if gaussians["means"].is_cuda else "torch"
    if backend == "gsplat":
        from gsplat import rasterization

        return rasterization(*args, sh_degree=sh_degree, backgrounds=backgrounds, packed=False, **kwargs)
    if backend != "torch":
        raise ValueError(f"rasterize: backend must be 'auto', 'gsplat' or 'torch', got {backend!r}.")
    return rasterize_torch(*args, sh_degree=sh_degree, backgrounds=backgrounds, **kwargs)


@torch.no_grad()
def render_frames(gaussians: dict[str, Tensor], viewmats: Tensor, Ks: Tensor, width: int, height: int,
                  sh_degree: int, batch: int = 4,
                  progress: Callable | None = None) -> np.ndarray:  # [T, 4, 4], [T, 3, 3] -> [T, H, W, 3] uint8
    """Render a camera path in batches of cameras, as uint8 frames; ``progress(n)`` after each batch."""
    device = gaussians["means"].device
    frames = []
    for start in range(0, len(viewmats), batch):
        colors, _, _ = rasterize(gaussians, viewmats[start:start + batch].to(device),
                                 Ks[start:start + batch].to(device), width, height, sh_degree)
        frames.append((colors.clamp(0, 1) * 255).round().to("cpu", torch.uint8).numpy())
        if progress is not None:
            progress(len(colors))
    return np.concatenate(frames)


# ----------------------------------------------------------------------------------------------------------
# Losses and metrics


def ssim(images: Tensor, targets: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:  # [B, 3, H, W] x2
    """Mean SSIM over 'valid' windows: the Gaussian-window SSIM gsplat's trainer takes from fused_ssim."""
    if min(images.shape[-2:]) < window:
        raise ValueError(f"ssim: images of {tuple(images.shape[-2:])} pixels are smaller than the "
                         f"{window}x{window} window.")
    coords = torch.arange(window, dtype=images.dtype, device=images.device) - (window - 1) / 2
    kernel_1d = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum()
    kernel = (kernel_1d[:, None] * kernel_1d[None, :]).expand(images.shape[1], 1, window, window)

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(x, kernel, groups=images.shape[1])

    mu_x, mu_y = blur(images), blur(targets)
    var_x = blur(images * images) - mu_x ** 2
    var_y = blur(targets * targets) - mu_y ** 2
    cov = blur(images * targets) - mu_x * mu_y
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    value = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return value.mean()


# ----------------------------------------------------------------------------------------------------------
# Training


@dataclass(frozen=True)
class TrainConfig:
    """simple_trainer's knobs that the data stages use; defaults are gsplat's (the paper's 30k schedule)."""

    iterations: int = 30_000
    sh_degree: int = 3
    sh_degree_interval: int = 1000  # one more SH degree every this many steps
    ssim_lambda: float = 0.2
    means_lr: float = 1.6e-4  # times the scene scale, decayed exponentially to 1 % at the last step
    scales_lr: float = 5e-3
    quats_lr: float = 1e-3
    opacities_lr: float = 5e-2
    sh0_lr: float = 2.5e-3
    shN_lr: float = 2.5e-3 / 20
    refine_start_iter: int = 500
    refine_stop_iter: int = 15_000
    refine_every: int = 100
    reset_every: int = 3000
    grow_grad2d: float = 0.0002
    alpha_weight: float = 0.0  # weight of an L1 loss on the rendered alpha (used with target alphas)
    seed: int = 0


def train(
    gaussians: dict[str, Tensor],
    images: Tensor,  # [V, H, W, 3] float in [0, 1]
    viewmats: Tensor,  # [V, 4, 4]
    Ks: Tensor,  # [V, 3, 3]
    config: TrainConfig,
    scale: float,
    target_alphas: Tensor | None = None,  # [V, H, W] in [0, 1], for config.alpha_weight
    progress: Callable[[int, float, int], None] | None = None,
    place: Callable[[dict[str, Tensor], int], dict[str, Tensor]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, list]]:
    """Fit Gaussians to posed images with gsplat's trainer recipe (see the module docstring).

    Args:
        gaussians: the GAUSSIAN_KEYS, and any other per-Gaussian tensors (e.g. the driving scenes' ``owner``),
            which are not trained but follow the Gaussians through densification (gsplat's strategy ops
            carry every entry of the parameter dict).
        place: ``place(params, view) -> Gaussians`` to render at training view ``view``: e.g. actors' local
            Gaussians moved to that frame's box poses (``stages.common.drive``); None: as they are.

    Returns:
        The trained Gaussians (detached tensors, extra entries included) and the history
        ``{"loss": [...], "num_gaussians": [...]}`` (one entry per step). ``progress(step, loss, num_gaussians)``
        is called after each step.
    """
    from gsplat.strategy import DefaultStrategy

    if config.sh_degree < 0 or num_sh_bases(config.sh_degree) != 1 + gaussians["shN"].shape[1]:
        raise ValueError(f"train: sh_degree {config.sh_degree} needs {num_sh_bases(config.sh_degree) - 1} "
                         f"shN coefficients, the Gaussians have {gaussians['shN'].shape[1]}.")
    device = images.device
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(gaussians[k].detach().clone().to(device))
                                     for k in GAUSSIAN_KEYS})
    rates = {"means": config.means_lr * scale, "scales": config.scales_lr, "quats": config.quats_lr,
             "opacities": config.opacities_lr, "sh0": config.sh0_lr, "shN": config.shN_lr}
    optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": rates[k], "name": k}], eps=1e-15)
                  for k in GAUSSIAN_KEYS}
    decay = torch.optim.lr_scheduler.ExponentialLR(optimizers["means"], gamma=0.01 ** (1.0 / config.iterations))
    strategy = DefaultStrategy(refine_start_iter=config.refine_start_iter,
                               refine_stop_iter=config.refine_stop_iter, refine_every=config.refine_every,
                               reset_every=config.reset_every, grow_grad2d=config.grow_grad2d)
    strategy.check_sanity(params, optimizers)
    for key in gaussians.keys() - set(GAUSSIAN_KEYS):  # after the check: it wants an optimizer per entry
        params[key] = torch.nn.Parameter(gaussians[key].detach().clone().to(device), requires_grad=False)
    state = strategy.initialize_state(scene_scale=scale)
    generator = torch.Generator().manual_seed(config.seed)
    order: list[int] = []
    history: dict[str, list] = {"loss": [], "num_gaussians": []}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)  # DefaultStrategy's splits draw from the global generator
        for step in range(config.iterations):
            if not order:  # a fresh permutation of the views every epoch, as the trainer's shuffled loader
                order = torch.randperm(len(images), generator=generator).tolist()
            loss = _train_step(step, order.pop(), params, optimizers, decay, strategy, state, images, viewmats, Ks,
                               config, target_alphas, place)
            history["loss"].append(loss)
            history["num_gaussians"].append(len(params["means"]))
            if progress is not None:
                progress(step, history["loss"][-1], history["num_gaussians"][-1])
    return {k: params[k].detach() for k in params.keys()}, history


def _train_step(step: int, view: int, params, optimizers, decay, strategy, state, images: Tensor, viewmats: Tensor,
                Ks: Tensor, config: TrainConfig, target_alphas: Tensor | None, place=None) -> float:
    """One step of :func:`train` on training view ``view`` (simple_trainer's loop body); returns the loss."""
    height, width = images.shape[1:3]
    sh_degree = min(step // config.sh_degree_interval, config.sh_degree)
    shown = params if place is None else place(params, view)
    colors, alphas, info = rasterize(shown, viewmats[view:view + 1], Ks[view:view + 1], width, height, sh_degree)
    strategy.step_pre_backward(params, optimizers, state, step, info)
    target = images[view:view + 1]
    l1 = (colors - target).abs().mean()
    ssim_loss = 1.0 - ssim(colors.permute(0, 3, 1, 2), target.permute(0, 3, 1, 2))
    loss = torch.lerp(l1, ssim_loss, config.ssim_lambda)
    if target_alphas is not None and config.alpha_weight > 0:
        loss = loss + config.alpha_weight * (alphas[..., 0] - target_alphas[view:view + 1]).abs().mean()
    loss.backward()
    for optimizer in optimizers.values():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    decay.step()
    strategy.step_post_backward(params, optimizers, state, step, info, packed=False)
    return loss.item()


# ----------------------------------------------------------------------------------------------------------
# Editing Gaussians (the reinsert stage): select, rotate, concatenate


def select(gaussians: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """The Gaussians picked by a boolean mask [N] or an index tensor, in order."""
    return {key: gaussians[key][index] for key in GAUSSIAN_KEYS}


def concat(first: dict[str, Tensor], second: dict[str, Tensor]) -> tuple[dict[str, Tensor], Tensor]:
    """``first`` then ``second``; the SH of the lower-degree set are zero-padded. Returns the ids of
    ``second``'s Gaussians in the result."""
    bases = max(first["shN"].shape[1], second["shN"].shape[1])

    def pad(shN: Tensor) -> Tensor:
        return torch.cat([shN, shN.new_zeros(len(shN), bases - shN.shape[1], 3)], dim=1)

    merged = {key: torch.cat([first[key], second[key]]) for key in GAUSSIAN_KEYS if key != "shN"}
    merged["shN"] = torch.cat([pad(first["shN"]), pad(second["shN"])])
    return merged, torch.arange(len(first["means"]), len(merged["means"]))


def quat_multiply(left: Tensor, right: Tensor) -> Tensor:  # [..., 4] wxyz x [..., 4] -> [..., 4]
    w1, x1, y1, z1 = left.unbind(-1)
    w2, x2, y2, z2 = right.unbind(-1)
    return torch.stack([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2, w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                        w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2, w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2], dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Scene sets (the splat stage)


@dataclass(frozen=True)
class SceneEntry:
    name: str
    folder: Path  # the folder holding transforms.json
    split: str  # "train", "test" or "validation"
    search: tuple[Path, ...]  # where SfM points may lie (the scene folder, and DL3DV's parent of nerfstudio/)


def scene_root(folder: Path) -> Path:
    """The folder holding transforms.json: ``folder`` or, DL3DV-Benchmark style, ``folder/nerfstudio``."""
    from stages.common import scenes

    return scenes.scene_root(folder)


def scene_entries(source: str | Path) -> list[SceneEntry]:
    """The scenes of a set (``split.json``) or a single scene folder (split 'test'), checked to exist."""
    from stages.common import scenes

    source = Path(source)
    if (source / "split.json").is_file():
        split = scenes.load_split(source)
        named = [(name, part) for part in ("train", "test", "validation") for name in split[part]]
        if not named:
            raise scenes.SceneError(f"{source / 'split.json'} lists no scenes.")
        found = [(name, source / name, part) for name, part in named]
    elif (scene_root(source) / "transforms.json").is_file():
        found = [(source.name, source, "test")]  # one real scene: held out, as DL3DV-Benchmark test scenes
    else:
        raise scenes.SceneNotFoundError(
            f"{source} holds neither split.json (a scene set) nor transforms.json (one nerfstudio / DL3DV "
            "scene); run the scenes stage, or point scene_dir at a scene folder.")
    return [SceneEntry(name, scene_root(folder), part, tuple(dict.fromkeys([scene_root(folder), folder])))
            for name, folder, part in found]


def numeric_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """The numbers of a nested metrics dict, flattened with '/' (MLflow takes numbers only)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(numeric_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = value
    return flat


def plot_training(histories: dict[str, dict], path: Path) -> Path:
    """Loss and Gaussian count per step, one line per scene (:func:`train`'s histories)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2), dpi=100)
    for name, history in histories.items():
        axes[0].plot(history["loss"], lw=0.8, label=name)
        axes[1].plot(history["num_gaussians"], lw=1.2, label=name)
    axes[0].set(xlabel="step", ylabel="0.8 L1 + 0.2 (1 - SSIM)", yscale="log", title="training loss")
    axes[1].set(xlabel="step", ylabel="Gaussians", title="DefaultStrategy densification")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_frame_pairs(rows: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], labels: tuple[str, str],
                     path: Path, columns: int = 5, title=lambda name, index: f"frame {index}") -> Path:
    """A PNG grid: for each ``name: (frames, reference, candidates)`` two rows (``labels``) at
    ``columns`` evenly spaced frames of ``candidates`` (all frames when empty); ``title(name, index)``
    heads each column. The splat and reinsert stages' frame figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2 * len(rows), columns, figsize=(2.0 * columns, 2.6 * len(rows)), dpi=100,
                             squeeze=False)
    for row, (name, (frames, reference, candidates)) in enumerate(rows.items()):
        pool = candidates if len(candidates) else np.arange(len(frames))
        for col, index in enumerate(pool[np.linspace(0, len(pool) - 1, columns).round().astype(int)]):
            for offset, (shown, label) in enumerate(zip((frames, reference), labels, strict=True)):
                ax = axes[2 * row + offset, col]
                ax.imshow(shown[index])
                ax.set_xticks([])
                ax.set_yticks([])
                if col == 0:
                    ax.set_ylabel(f"{name}\n{label}", fontsize=7)
            axes[2 * row, col].set_title(title(name, index), fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path

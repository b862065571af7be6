"""Gaussian splatting for the data stages: the CPU rasterizer against hand computations (and gsplat's CUDA
rasterizer where there is a GPU), training and densification, SfM points, and the splat stage end to end
on generated and hand-written (DL3DV layout) scenes, with its bad-input errors."""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import splat as stage
from stages.common import measure, scenes, video
from stages.common import pairs as pairs_folder
from stages.common import splat as gs

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def camera(eye=(0.0, 0.0, 0.0), height=20, width=30, focal=25.0, dtype=torch.float64):
    """An OpenCV camera at ``eye`` looking down +z (identity rotation): viewmats [1, 4, 4], Ks [1, 3, 3]."""
    viewmat = torch.eye(4, dtype=dtype)
    viewmat[:3, 3] = -torch.tensor(eye, dtype=dtype)
    K = torch.tensor([[focal, 0, width / 2], [0, focal, height / 2], [0, 0, 1]], dtype=dtype)
    return viewmat[None], K[None]


def gaussians(means, scales, opacities, rgb, quats=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
    means = torch.tensor(means, dtype=dtype)
    count = len(means)
    return {
        "means": means,
        "quats": torch.tensor(quats, dtype=dtype) if quats is not None else torch.tensor([[1.0, 0, 0, 0]] * count,
                                                                                         dtype=dtype),
        "scales": torch.log(torch.tensor(scales, dtype=dtype)),
        "opacities": torch.logit(torch.tensor(opacities, dtype=dtype)),
        "sh0": gs.rgb_to_sh(torch.tensor(rgb, dtype=dtype))[:, None, :],
        "shN": torch.zeros(count, 0, 3, dtype=dtype),
    }


def analytic_alpha(mean, covariance, opacity, K, height, width) -> np.ndarray:  # -> [H, W]
    """A single Gaussian's footprint by hand (numpy): the EWA projection with gsplat's 0.3 px blur, then
    opacity * exp(-0.5 d^T Sigma2d^-1 d) at pixel centres, zero below 1/255, capped at 0.999."""
    mean, covariance, K = (np.asarray(v, float) for v in (mean, covariance, K))
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    x, y, z = mean
    jacobian = np.array([[fx / z, 0, -fx * x / z ** 2], [0, fy / z, -fy * y / z ** 2]])
    sigma2d = jacobian @ covariance @ jacobian.T + 0.3 * np.eye(2)
    centre = np.array([fx * x / z + cx, fy * y / z + cy])
    rows, cols = np.mgrid[0:height, 0:width]
    d = np.stack([cols + 0.5, rows + 0.5], axis=-1) - centre
    mahalanobis = np.einsum("hwi,ij,hwj->hw", d, np.linalg.inv(sigma2d), d)
    alpha = np.minimum(opacity * np.exp(-0.5 * mahalanobis), 0.999)
    return np.where(alpha >= 1 / 255, alpha, 0.0)


def rotation_quat(axis, angle) -> list[float]:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    return [math.cos(angle / 2), *(math.sin(angle / 2) * axis)]


def rotation_matrix(quat) -> np.ndarray:
    w, x, y, z = quat
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


# ----------------------------------------------------------------------------------------------------------
# The rasterizer against hand computations


def test_single_gaussian_footprint_is_the_analytic_one():
    quat = rotation_quat([0.3, 1.0, 0.2], 0.7)
    scales = [0.3, 0.12, 0.2]
    mean, opacity, rgb = [0.2, -0.1, 3.0], 0.8, [0.9, 0.4, 0.1]
    viewmats, Ks = camera()
    colors, alphas, info = gs.rasterize(gaussians([mean], [scales], [opacity], [rgb], [quat]), viewmats, Ks,
                                        30, 20, sh_degree=0)
    rotation = rotation_matrix(quat)
    expected = analytic_alpha(mean, rotation @ np.diag(np.square(scales)) @ rotation.T, opacity, Ks[0], 20, 30)
    assert expected.max() > 0.5 and (expected == 0).any()  # the footprint is inside the frame, with an edge
    np.testing.assert_allclose(alphas[0, ..., 0].numpy(), expected, atol=1e-12)
    np.testing.assert_allclose(colors[0].numpy(), expected[..., None] * np.array(rgb), atol=1e-12)
    assert info["radii"].shape == (1, 1, 2) and (info["radii"] > 0).all()
    assert info["means2d"].shape == (1, 1, 2) and info["n_cameras"] == 1 and info["gaussian_ids"] is None


def test_two_gaussians_composite_front_to_back_as_by_hand():
    means, scales = [[0.1, 0.0, 2.0], [-0.1, 0.05, 3.0]], [[0.25] * 3, [0.3] * 3]
    opacities, rgb = [0.6, 0.9], [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    viewmats, Ks = camera()
    background = torch.tensor([[0.2, 0.7, 0.3]], dtype=torch.float64)
    near, far = (analytic_alpha(m, np.diag(np.square(s)), o, Ks[0], 20, 30)
                 for m, s, o in zip(means, scales, opacities))
    expected = near[..., None] * rgb[0] + (1 - near[..., None]) * far[..., None] * rgb[1]
    expected += (1 - near[..., None]) * (1 - far[..., None]) * background.numpy()
    for order in ([0, 1], [1, 0]):  # depth decides, not the order given
        scene = gaussians([means[i] for i in order], [scales[i] for i in order], [opacities[i] for i in order],
                          [rgb[i] for i in order])
        colors, alphas, _ = gs.rasterize(scene, viewmats, Ks, 30, 20, 0, backgrounds=background)
        np.testing.assert_allclose(colors[0].numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(alphas[0, ..., 0].numpy(), 1 - (1 - near) * (1 - far), atol=1e-12)


def test_a_pixel_stops_before_its_transmittance_falls_to_1e_4():
    # Three nearly opaque Gaussians in a row: 0.999 each; after two T would be 1e-6, so gsplat's kernel
    # stops after the first one and the pixel at the centre is 0.999 c1 + 0.001 background.
    centred = [[0.5 * z / 25, 0.5 * z / 25, z] for z in (2.0, 2.5, 3.0)]  # on pixel (10, 15)'s centre
    scene = gaussians(centred, [[0.5] * 3] * 3, [1 - 1e-6] * 3,
                      [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    viewmats, Ks = camera()
    background = torch.tensor([[0.0, 0.0, 0.5]], dtype=torch.float64)
    colors, alphas, _ = gs.rasterize(scene, viewmats, Ks, 30, 20, 0, backgrounds=background)
    np.testing.assert_allclose(colors[0, 10, 15].numpy(), [0.999, 0.0, 0.5 * 0.001], atol=1e-9)
    assert alphas[0, 10, 15, 0].item() == pytest.approx(0.999, abs=1e-9)


def test_rasterizer_gradients_match_finite_differences():
    scene = gaussians([[0.1, 0.0, 2.0], [-0.2, 0.1, 2.6]], [[0.2, 0.3, 0.25], [0.35, 0.2, 0.3]], [0.7, 0.8],
                      [[0.8, 0.2, 0.1], [0.1, 0.5, 0.9]], [rotation_quat([1, 1, 0], 0.4), [1.0, 0, 0, 0]])
    viewmats, Ks = camera(height=12, width=16, focal=12.0)
    weights = torch.rand(1, 12, 16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keys = ("means", "scales", "opacities", "sh0", "quats")

    def loss(*values):
        colors, _, _ = gs.rasterize({**scene, **dict(zip(keys, values))}, viewmats, Ks, 16, 12, 0)
        return (colors * weights).sum()

    inputs = tuple(scene[k].clone().requires_grad_(True) for k in keys)
    assert torch.autograd.gradcheck(loss, inputs, eps=1e-6, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (gsplat.rasterization)")
def test_cpu_rasterizer_matches_gsplat_rasterization():
    generator = torch.Generator().manual_seed(0)
    points, rgb = gs.random_points(np.array([-1.5, -1.0, 2.0]), np.array([1.5, 1.0, 5.0]), 400, generator)
    scene = gs.init_gaussians(points, rgb, sh_degree=1, init_opacity=0.5, generator=generator)
    scene["shN"] = 0.1 * torch.randn(scene["shN"].shape, generator=generator)
    viewmats = torch.eye(4).repeat(2, 1, 1)
    viewmats[1, :3, 3] = torch.tensor([0.3, -0.1, 0.2])
    Ks = torch.tensor([[40.0, 0, 24], [0, 40.0, 16], [0, 0, 1]]).repeat(2, 1, 1)
    outputs = {}
    for backend, device in (("torch", "cpu"), ("gsplat", "cuda")):
        params = {k: v.to(device).requires_grad_(True) for k, v in scene.items()}
        colors, alphas, info = gs.rasterize(params, viewmats.to(device), Ks.to(device), 48, 32, 1, backend=backend)
        info["means2d"].retain_grad()
        (colors * torch.linspace(0, 1, colors.numel(), device=device).reshape(colors.shape)).sum().backward()
        outputs[backend] = (colors.detach().cpu(), alphas.detach().cpu(), info["radii"].cpu(),
                            info["means2d"].grad.cpu(), params["means"].grad.cpu())
    (colors, alphas, radii, means2d_grad, means_grad), theirs = outputs["torch"], outputs["gsplat"]
    torch.testing.assert_close(colors, theirs[0], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(alphas, theirs[1], atol=1e-3, rtol=1e-3)
    assert ((radii > 0) == (theirs[2] > 0)).float().mean() > 0.99  # the same Gaussians drawn ...
    assert (radii - theirs[2]).abs().max() <= 1  # ... with the same boxes, up to float rounding in ceil
    for mine, cuda in ((means2d_grad, theirs[3]), (means_grad, theirs[4])):
        torch.testing.assert_close(mine, cuda, atol=1e-3 * cuda.abs().max().item(), rtol=1e-2)


# ----------------------------------------------------------------------------------------------------------
# Training and densification


def target_views(count=4, height=24, width=32):
    """Renders of a random 'true' set of Gaussians from cameras on an arc: (images, viewmats, Ks)."""
    generator = torch.Generator().manual_seed(1)
    points, rgb = gs.random_points(np.array([-1.0, -1.0, -1.0]), np.array([1.0, 1.0, 1.0]), 150, generator)
    truth = gs.init_gaussians(points, rgb, sh_degree=0, init_opacity=0.9, generator=generator)
    angles = np.linspace(-0.4, 0.4, count)
    eyes = np.stack([3.5 * np.sin(angles), np.zeros(count), 3.5 * np.cos(angles)], axis=1)
    c2w = scenes.look_at(eyes, np.zeros_like(eyes))
    viewmats = gs.viewmats_from_camtoworlds(c2w)
    Ks = torch.tensor(scenes.make_intrinsics(height, width, 60.0), dtype=torch.float32).expand(count, 3, 3)
    with torch.no_grad():
        images, _, _ = gs.rasterize(truth, viewmats, Ks, width, height, 0)
    return images.clamp(0, 1), viewmats, Ks, c2w


def test_training_lowers_the_loss_and_densification_changes_the_count():
    images, viewmats, Ks, c2w = target_views()
    generator = torch.Generator().manual_seed(2)
    points, rgb = gs.random_points(np.array([-1.2] * 3), np.array([1.2] * 3), 200, generator)
    init = gs.init_gaussians(points, rgb, sh_degree=1, generator=generator)
    config = gs.TrainConfig(iterations=60, sh_degree=1, sh_degree_interval=30, refine_start_iter=10, refine_stop_iter=50,
                            refine_every=10, reset_every=1000, means_lr=1.6e-3, scales_lr=5e-2, quats_lr=1e-2,
                            opacities_lr=0.1, sh0_lr=2.5e-2, shN_lr=1.25e-3)
    trained, history = gs.train(init, images, viewmats, Ks, config, gs.scene_scale(c2w))
    assert len(history["loss"]) == 60 and all(np.isfinite(history["loss"]))
    assert np.mean(history["loss"][-10:]) < 0.7 * np.mean(history["loss"][:10])
    counts = history["num_gaussians"]
    assert counts[0] == 200 and len(set(counts)) > 1 and len(trained["means"]) == counts[-1]
    target = (images * 255).round().byte().numpy()
    before = measure.psnr(gs.render_frames(init, viewmats, Ks, 32, 24, 1), target, per_frame=True)
    after = measure.psnr(gs.render_frames(trained, viewmats, Ks, 32, 24, 1), target, per_frame=True)
    assert after.mean() > before.mean() + 3


def test_training_is_deterministic_given_the_seed():
    images, viewmats, Ks, c2w = target_views(count=2)
    points, rgb = gs.random_points(np.array([-1.2] * 3), np.array([1.2] * 3), 120, torch.Generator().manual_seed(5))
    init = gs.init_gaussians(points, rgb, sh_degree=0, generator=torch.Generator().manual_seed(5))
    config = gs.TrainConfig(iterations=12, sh_degree=0, refine_start_iter=3, refine_every=4, grow_grad2d=1e-5, seed=3)
    first, history = gs.train(init, images, viewmats, Ks, config, gs.scene_scale(c2w))
    torch.manual_seed(123)  # the global generator's state does not matter
    second, _ = gs.train(init, images, viewmats, Ks, config, gs.scene_scale(c2w))
    assert len(set(history["num_gaussians"])) > 1  # splits (random offsets) happened
    for key in gs.GAUSSIAN_KEYS:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)


def test_default_strategy_reads_the_cpu_info_dict():
    from gsplat.strategy import DefaultStrategy

    images, viewmats, Ks, _ = target_views(count=1)
    generator = torch.Generator().manual_seed(3)
    points, rgb = gs.random_points(np.array([-5.0] * 3), np.array([5.0] * 3), 100, generator)  # some unseen
    params = torch.nn.ParameterDict({k: torch.nn.Parameter(v) for k, v in
                                     gs.init_gaussians(points, rgb, 0, generator=generator).items()})
    optimizers = {k: torch.optim.Adam([{"params": params[k], "lr": 1e-3, "name": k}]) for k in params}
    strategy = DefaultStrategy(refine_start_iter=0, refine_every=1, grow_grad2d=1e-12)
    state = strategy.initialize_state(scene_scale=1.0)
    colors, _, info = gs.rasterize(params, viewmats, Ks, 32, 24, 0)
    strategy.step_pre_backward(params, optimizers, state, 1, info)
    (colors - images).abs().mean().backward()
    visible = (info["radii"][0] > 0).all(-1)
    assert 0 < visible.sum() < 100 and info["means2d"].grad is not None
    strategy.step_post_backward(params, optimizers, state, 1, info, packed=False)
    # every visible Gaussian with a gradient grew (duplicated or split); the invisible ones did not
    moved = (info["means2d"].grad[0].norm(dim=-1) > 0) & visible
    assert len(params["means"]) == 100 + int(moved.sum())


# ----------------------------------------------------------------------------------------------------------
# SfM points


POINTS = np.array([[0.0, 0.0, 0.0], [1.0, 0.5, -0.2], [-0.3, 0.8, 0.4], [0.2, -0.6, 1.1], [0.7, 0.1, 0.9]])
COLOURS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30], [200, 100, 50]], np.uint8)
APPLIED = np.array([[0.0, 1.0, 0.0, 0.5], [1.0, 0.0, 0.0, -0.2], [0.0, 0.0, -1.0, 0.1]])  # ns-process-data's kind


def write_points3d_txt(folder: Path) -> None:
    folder.mkdir(parents=True)
    lines = ["# 3D point list with one line of data per point:", "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[]"]
    for index, (p, c) in enumerate(zip(POINTS, COLOURS), start=1):
        lines.append(f"{index} {p[0]} {p[1]} {p[2]} {c[0]} {c[1]} {c[2]} 0.5 1 3 2 7")
    (folder / "points3D.txt").write_text("\n".join(lines) + "\n")


def write_points3d_bin(folder: Path) -> None:
    folder.mkdir(parents=True)
    data = struct.pack("<Q", len(POINTS))
    for index, (p, c) in enumerate(zip(POINTS, COLOURS), start=1):
        track = [(1, 4), (2, 9)][: index % 2 + 1]
        data += struct.pack("<Q3d3BdQ", index, *p, *c, 0.25, len(track))
        data += b"".join(struct.pack("<ii", *pair) for pair in track)
    (folder / "points3D.bin").write_bytes(data)


def test_colmap_text_and_binary_points_read_alike(tmp_path):
    write_points3d_txt(tmp_path / "txt")
    write_points3d_bin(tmp_path / "bin")
    for folder in ("txt", "bin"):
        points, rgb = gs.read_colmap_points(tmp_path / folder)
        np.testing.assert_allclose(points, POINTS)
        np.testing.assert_array_equal(rgb, COLOURS)


def test_ply_points_ascii_and_binary(tmp_path):
    header = ("ply\nformat {fmt} 1.0\ncomment by hand\nelement vertex 5\nproperty float x\nproperty float y\n"
              "property float z\nproperty uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
    rows = "".join(f"{p[0]} {p[1]} {p[2]} {c[0]} {c[1]} {c[2]}\n" for p, c in zip(POINTS, COLOURS))
    (tmp_path / "a.ply").write_text(header.format(fmt="ascii") + rows)
    table = np.zeros(5, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"),
                               ("blue", "u1")])
    for axis, column in zip("xyz", POINTS.T):
        table[axis] = column
    for channel, column in zip(("red", "green", "blue"), COLOURS.T):
        table[channel] = column
    (tmp_path / "b.ply").write_bytes(header.format(fmt="binary_little_endian").encode() + table.tobytes())
    for name in ("a.ply", "b.ply"):
        points, rgb = gs.read_ply_points(tmp_path / name)
        np.testing.assert_allclose(points, POINTS, atol=1e-6)
        np.testing.assert_array_equal(rgb, COLOURS)


def test_sfm_points_map_colmap_through_applied_transform(tmp_path):
    write_points3d_txt(tmp_path / "colmap" / "sparse" / "0")
    points, _, source = gs.sfm_points(tmp_path, {"applied_transform": APPLIED.tolist()})
    np.testing.assert_allclose(points, POINTS @ APPLIED[:, :3].T + APPLIED[:, 3])
    assert source.endswith("colmap/sparse/0")
    (tmp_path / "elsewhere").mkdir()
    assert gs.sfm_points(tmp_path / "elsewhere", {}) is None
    with pytest.raises(FileNotFoundError, match="sparse_pc.ply"):
        gs.sfm_points(tmp_path, {"ply_file_path": "sparse_pc.ply"})


# ----------------------------------------------------------------------------------------------------------
# The stage


TINY = stage.Params(
    every=4, iterations=12, sh_degree=1, sh_degree_interval=6, init_num_points=150, init_extent=3.0, init_opacity=0.1,
    init_scale=1.0, ssim_lambda=0.2, means_lr=1.6e-3, scales_lr=5e-2, quats_lr=1e-2, opacities_lr=0.1, sh0_lr=2.5e-2,
    shN_lr=1.25e-3, refine_start_iter=3, refine_stop_iter=10, refine_every=3, reset_every=100, grow_grad2d=2e-4,
    scene_dir=None, image_dir=None, device="cpu", sample_videos=1, seed=0, threads=1)


def tiny_params(**changes) -> stage.Params:
    return dataclasses.replace(TINY, **changes)


def make_set(folder: Path, count: int = 2, frames: int = 9) -> Path:
    """A generated scene set: ``count`` scenes of ``frames`` frames of 16 x 24, the last one held out."""
    names = [f"s{index}" for index in range(count)]
    for index, name in enumerate(names):
        scenes.generate_scene(folder / name, seed=[7, index], frames=frames, height=16, width=24, num_objects=2,
                              supersample=1, texture_size=32)
    scenes.write_split(folder, names[:-1], names[-1:])
    return folder


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    return make_set(tmp_path_factory.mktemp("set"))


@pytest.fixture(scope="module")
def splat_run(tmp_path_factory, scene_set):
    out = tmp_path_factory.mktemp("splat")
    result = stage.run(tiny_params(), scene_set, out / "splat", out / "metrics.json", out / "plots")
    return out, result


def test_stage_writes_pairs_gaussians_metrics_and_plots(scene_set, splat_run):
    out, result = splat_run
    assert len(pairs_folder.load_pairs(out / "splat" / "nvs")) == 2  # the shared reader validates it
    pairs = json.loads((out / "splat" / "nvs" / "pairs.json").read_text())
    assert pairs["task"] == "nvs" and pairs["application"] == "nvs" and pairs["fps"] > 0
    assert [(p["scene"], p["split"]) for p in pairs["pairs"]] == [("s0", "train"), ("s1", "test")]
    for pair in pairs["pairs"]:
        assert pair["mask"] is None and pair["prompt"] is None and pair["lowres"] is None
        assert (pair["frames"], pair["height"], pair["width"]) == (9, 16, 24)
        inputs = video.read_frames(out / "splat" / "nvs" / pair["input"])
        targets = video.read_frames(out / "splat" / "nvs" / pair["target"])
        assert inputs.shape == targets.shape == (9, 16, 24, 3)
        assert sorted(p.name for p in (out / "splat" / "nvs" / pair["input"]).iterdir())[:2] == ["00000.png",
                                                                                                 "00001.png"]
        np.testing.assert_array_equal(targets, scenes.load_scene(scene_set / pair["scene"]).images)
        tensors, metadata = gs.load_gaussians(out / "splat" / "gaussians" / f"{pair['scene']}.safetensors")
        assert metadata["train_frames"] == [0, 4, 8] and metadata["init"] == "random"
        assert tensors["shN"].shape[1:] == (3, 3)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == result["metrics"]
    for name in ("s0", "s1"):
        scene = metrics["scenes"][name]
        assert scene["train_views"] == 3 and scene["heldout_frames"] == 6
        assert 5 < scene["heldout_psnr"] < 60 and 5 < scene["train_psnr"] < 60
    assert {p.name for p in (out / "plots").iterdir()} == {"videos", "training.png", "frames.png"}
    assert video.read_video(out / "plots" / "videos" / "s0.mp4").shape == (9, 16, 48, 3)  # render | truth


def test_validation_scenes_become_validation_pairs(tmp_path):
    """DL3DV's 5 validation scenes of split.json: reconstructed like the others, written as the validation
    split, which train restores for its validation PSNR and infer / evaluate never read."""
    for index, name in enumerate(("a", "b", "c")):
        scenes.generate_scene(tmp_path / "set" / name, seed=[8, index], frames=5, height=16, width=24, num_objects=1,
                              supersample=1, texture_size=32)
    scenes.write_split(tmp_path / "set", ["a"], ["c"], validation=["b"])
    stage.run(tiny_params(every=2, iterations=2, sample_videos=0), tmp_path / "set", tmp_path / "splat",
              tmp_path / "m.json", tmp_path / "plots")
    written = pairs_folder.load_pairs(tmp_path / "splat" / "nvs")
    assert [(p["scene"], p["split"]) for p in written] == [("a", "train"), ("c", "test"), ("b", "validation")]
    assert [p["scene"] for p in pairs_folder.load_pairs(tmp_path / "splat" / "nvs", "test")] == ["c"]


def write_dl3dv_scene(folder: Path, with_colmap: bool, frames: int = 6) -> None:
    """A DL3DV-Benchmark-style scene written by hand: <scene>/nerfstudio/transforms.json listing images/ at
    96 x 64 while only the 4x-downsampled images_4/ ships, OpenGL poses, an ns-process-data
    applied_transform, and (optionally) COLMAP points beside nerfstudio/."""
    nerfstudio = folder / "nerfstudio"
    (nerfstudio / "images_4").mkdir(parents=True)
    angles = np.linspace(0, 0.5, frames)
    eyes = np.stack([2.5 * np.sin(angles), 0.2 * np.ones(frames), 2.5 * np.cos(angles)], axis=1)
    poses = scenes.look_at(eyes, np.zeros_like(eyes))
    rows, cols = np.mgrid[0:16, 0:24]
    listed = []
    for index in range(frames):
        image = np.stack([(rows * 9 + index * 5) % 256, (cols * 7) % 256, np.full_like(rows, 90)], -1)
        name = f"frame_{index + 1:05d}.png"
        video.write_image(nerfstudio / "images_4" / name, image.astype(np.uint8))
        listed.append({"file_path": f"images/{name}", "transform_matrix": poses[index].tolist(),
                       "colmap_im_id": index + 1})
    transforms = {"w": 96, "h": 64, "fl_x": 80.0, "fl_y": 80.0, "cx": 48.0, "cy": 32.0, "k1": 0.0, "k2": 0.0,
                  "p1": 0.0, "p2": 0.0, "camera_model": "OPENCV", "frames": listed[::-1],
                  "applied_transform": APPLIED.tolist()}
    (nerfstudio / "transforms.json").write_text(json.dumps(transforms))
    if with_colmap:
        write_points3d_txt(folder / "colmap" / "sparse" / "0")


@pytest.mark.parametrize("with_colmap", [True, False])
def test_stage_reads_a_dl3dv_scene_folder_from_params(tmp_path, with_colmap):
    scene = tmp_path / "0a1b2c3d"
    write_dl3dv_scene(scene, with_colmap)
    params = tiny_params(every=2, iterations=4, scene_dir=str(scene), sample_videos=0)
    result = stage.run(params, tmp_path / "unused", tmp_path / "splat", tmp_path / "m.json", tmp_path / "plots")
    measures = result["metrics"]["scenes"]["0a1b2c3d"]
    assert measures["split"] == "test" and measures["train_views"] == 3
    assert measures["init"] == ("sfm" if with_colmap else "random")
    assert measures["init_gaussians"] == (len(POINTS) if with_colmap else 150)
    pairs = json.loads((tmp_path / "splat" / "nvs" / "pairs.json").read_text())["pairs"]
    assert [(p["scene"], p["frames"], p["height"], p["width"]) for p in pairs] == [("0a1b2c3d", 6, 16, 24)]
    tensors, _ = gs.load_gaussians(tmp_path / "splat" / "gaussians" / "0a1b2c3d.safetensors")
    assert torch.isfinite(tensors["means"]).all()


# ----------------------------------------------------------------------------------------------------------
# Bad inputs: clear errors, raised before anything is written


@pytest.fixture
def broken_set(tmp_path) -> Path:
    return make_set(tmp_path / "set", count=2, frames=5)


def run_expecting(error, match: str, params: stage.Params, scenes_dir: Path, tmp_path: Path):
    with pytest.raises(error, match=match):
        stage.run(params, scenes_dir, tmp_path / "out", tmp_path / "m.json", tmp_path / "plots")
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_missing_transforms_json_is_named(broken_set, tmp_path):
    (broken_set / "s1" / "transforms.json").unlink()
    run_expecting(scenes.SceneNotFoundError, "transforms.json", tiny_params(every=2), broken_set, tmp_path)


def test_missing_and_extra_images_are_named(broken_set, tmp_path):
    (broken_set / "s0" / "images" / "frame_00003.png").unlink()
    run_expecting(scenes.SceneNotFoundError, r"missing, e\.g\. .*frame_00003", tiny_params(every=2), broken_set,
                  tmp_path)
    video.write_image(broken_set / "s0" / "images" / "frame_00003.png", np.zeros((16, 24, 3), np.uint8))
    video.write_image(broken_set / "s1" / "images" / "frame_00099.png", np.zeros((16, 24, 3), np.uint8))
    run_expecting(scenes.SceneError, r"not listed .*frame_00099", tiny_params(every=2), broken_set, tmp_path)


def test_every_larger_than_the_frames_is_refused(broken_set, tmp_path):
    run_expecting(ValueError, r"splat\.every = 6 is larger than the 5 frames", tiny_params(every=6), broken_set,
                  tmp_path)


def test_a_folder_that_is_no_scene_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    run_expecting(scenes.SceneNotFoundError, "neither split.json", tiny_params(), tmp_path / "empty", tmp_path)
    with pytest.raises(ValueError, match="splat.scene_dir"):
        tiny_params(scene_dir=str(tmp_path / "nowhere"))

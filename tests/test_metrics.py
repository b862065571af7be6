"""chopgrad.metrics: known answers, invariants, stand-in weight loading, bad inputs, the CLI.

Stand-in weights: random tensors of the official shapes, saved by ``weights.write_stand_ins`` where
each library looks (``$TORCH_HOME/hub/...`` and ``$HOME/.cache/clip``) in temporary folders; the real
loading code reads them.
"""

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from torch import nn

import chopgrad  # noqa: F401  (before torchvision: the CPU fix)
from chopgrad import metrics, weights
from chopgrad.metrics import vbench
from chopgrad.metrics._video import as_video, as_video_pair

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _save(state: dict, name: str) -> None:
    path = weights.weight_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)


@pytest.fixture(scope="session")
def home_dir(tmp_path_factory):
    """A session TORCH_HOME/HOME; stand-ins are written into it by the fixtures below."""
    root = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "torch"))
        patch.setenv("HOME", str(root / "home"))
        patch.delenv(weights.CLIP_HOME_ENV, raising=False)
        yield root


@pytest.fixture
def home(home_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(home_dir / "torch"))
    monkeypatch.setenv("HOME", str(home_dir / "home"))
    monkeypatch.delenv(weights.CLIP_HOME_ENV, raising=False)
    return home_dir


@pytest.fixture(scope="session")
def vgg_alex(home_dir):
    weights.write_stand_ins(["vgg16", "alexnet", "dists"])


@pytest.fixture(scope="session")
def inception(home_dir):
    weights.write_stand_ins(["fid_inception"])


@pytest.fixture(scope="session")
def i3d(home_dir):
    weights.write_stand_ins(["i3d"])


def _video(b=2, t=4, h=64, w=64, seed=0):
    """Smooth random videos in [0.2, 0.8] (no clipping at noise levels used below)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, t, h // 8, w // 8, generator=g)
    return 0.2 + 0.6 * torch.nn.functional.interpolate(low, size=(t, h, w), mode="trilinear")


def _noisy(video, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (video + sigma * torch.randn(video.shape, generator=g)).clamp(0, 1)


# ---------------------------------------------------------------- input convention


def test_uint8_is_divided_by_255_and_4d_is_one_video():
    frames = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)  # [T, 3, H, W]
    video = as_video(frames)
    assert video.shape == (1, 3, 5, 8, 8)
    assert torch.equal(video[0].permute(1, 0, 2, 3), frames.float() / 255)


@pytest.mark.parametrize("values, hint", [(torch.rand(1, 3, 2, 8, 8) * 2 - 1, "(x + 1) / 2"),
                                          (torch.rand(1, 3, 2, 8, 8) * 255, "x / 255")])
def test_float_outside_unit_range_is_refused_with_the_fix(values, hint):
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        as_video(values)
    assert hint in str(info.value)


def test_round_off_overshoot_is_clamped():
    video = torch.full((1, 3, 2, 4, 4), 1.0 + 1e-5)
    assert as_video(video).max().item() == 1.0


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(2, 4, 3, 8, 8), "must be \\[B, 3, T, H, W\\]"),
    (torch.zeros(4, 4, 8, 8), "must be \\[T, 3, H, W\\]"),
    (torch.zeros(3, 8, 8), "expected \\[B, 3, T, H, W\\]"),
    (torch.zeros(1, 3, 0, 8, 8), "empty"),
    (torch.zeros(0, 3, 4, 8, 8), "empty"),
    (torch.zeros(1, 3, 2, 8, 8, dtype=torch.int32), "dtype torch.int32"),
    (torch.full((1, 3, 2, 8, 8), float("nan")), "NaN"),
])
def test_malformed_videos_are_refused(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        as_video(bad)


@pytest.mark.parametrize("gt_shape, message", [((2, 3, 5, 16, 16), "4 vs 5 frames"),
                                               ((2, 3, 4, 16, 12), "frame size 16x16 vs 16x12"),
                                               ((3, 3, 4, 16, 16), "2 vs 3 videos")])
def test_mismatched_pred_and_gt_are_refused(gt_shape, message):
    with pytest.raises(ValueError, match=message):
        as_video_pair(torch.rand(2, 3, 4, 16, 16), torch.rand(*gt_shape))


# ---------------------------------------------------------------- PSNR, SSIM


def test_psnr_at_known_gaussian_noise():
    gt = _video(b=2, t=3, h=128, w=128)
    sigma = 0.05
    scores = metrics.PSNR()(gt + sigma * torch.randn(gt.shape, generator=torch.Generator().manual_seed(3)), gt)
    assert scores.shape == (2, 3)
    assert scores.mean().item() == pytest.approx(10 * math.log10(1 / sigma**2), abs=0.05)


def test_psnr_uint8_and_float_inputs_agree():
    gt = torch.randint(0, 256, (1, 3, 2, 32, 32), dtype=torch.uint8)
    pred = torch.randint(0, 256, (1, 3, 2, 32, 32), dtype=torch.uint8)
    psnr = metrics.PSNR()
    assert torch.allclose(psnr(pred, gt), psnr(pred.float() / 255, gt.float() / 255))


def test_ssim_matches_scikit_image_on_the_y_channel():
    """Oracle: scikit-image's SSIM with the Gaussian window of Wang et al. on Y = round(255 * luma)."""
    from skimage.data import astronaut
    from skimage.metrics import structural_similarity
    from skimage.transform import resize

    image = torch.from_numpy(resize(astronaut(), (96, 96), anti_aliasing=True)).permute(2, 0, 1).float()
    gt = torch.stack([image, image.flip(-1)], dim=1)[None]  # [1, 3, 2, 96, 96]
    pred = _noisy(gt, 0.08)
    ours = metrics.SSIM()(pred, gt)[0]

    def luma(frame):  # YIQ/BT.601 luma on 0..255, rounded, as pyiqa (and MATLAB) do
        r, g, b = frame.double()
        return (255 * (0.299 * r + 0.587 * g + 0.114 * b)).round().numpy()

    for t in range(2):
        expected = structural_similarity(luma(pred[0, :, t]), luma(gt[0, :, t]), gaussian_weights=True,
                                         sigma=1.5, use_sample_covariance=False, data_range=255)
        assert ours[t].item() == pytest.approx(expected, abs=1e-6)


def test_psnr_and_ssim_worsen_monotonically_with_noise():
    gt = _video()
    psnr, ssim = metrics.PSNR(), metrics.SSIM()
    p = [psnr(_noisy(gt, s), gt).mean().item() for s in (0.01, 0.05, 0.2)]
    s = [ssim(_noisy(gt, s), gt).mean().item() for s in (0.01, 0.05, 0.2)]
    assert p[0] > p[1] > p[2] and s[0] > s[1] > s[2]
    assert ssim(gt, gt).mean().item() == pytest.approx(1.0)


# ---------------------------------------------------------------- LPIPS, DISTS (stand-in backbones)


@pytest.mark.parametrize("build", [lambda: metrics.LPIPS("vgg"), lambda: metrics.LPIPS("alex"), metrics.DISTS])
def test_perceptual_metrics_load_stand_ins_and_behave(home, vgg_alex, build):
    metric = build()
    assert metric.stand_in_weights
    assert "stand-in" in metric.weights.values()
    gt = _video(b=1, t=2)
    assert metric(gt, gt).abs().max().item() < 1e-6
    scores = [metric(_noisy(gt, s), gt).mean().item() for s in (0.02, 0.08, 0.3)]
    assert 0 < scores[0] < scores[1] < scores[2]


def test_frames_too_small_for_a_network_are_refused_clearly(home, vgg_alex):
    for build, size in ((lambda: metrics.LPIPS("alex"), 31), (lambda: metrics.LPIPS("vgg"), 16), (metrics.SSIM, 11)):
        metric = build()
        small = torch.rand(1, 3, 1, size - 1, 48)
        with pytest.raises(ValueError, match=f"needs frames of at least {size}x{size} pixels, got {size - 1}x48"):
            metric(small, small)
        fits = torch.rand(1, 3, 1, size, size)
        assert metric(fits, fits).shape == (1, 1)


def test_lpips_rejects_unknown_backbone():
    with pytest.raises(ValueError, match="'vgg' or 'alex'"):
        metrics.LPIPS("squeeze")


# ---------------------------------------------------------------- FID, FVD (stand-in networks)


def test_clean_resize_matches_pyiqa_on_an_image_file(tmp_path):
    from PIL import Image
    from pyiqa.archs.fid_arch import ResizeDataset

    frame = torch.randint(0, 256, (3, 40, 56), dtype=torch.uint8)
    Image.fromarray(frame.permute(1, 2, 0).numpy()).save(tmp_path / "frame.png")
    expected = ResizeDataset([tmp_path / "frame.png"], mode="clean")[0]
    from chopgrad.metrics.distribution import clean_resize

    assert torch.equal(clean_resize(frame[None])[0], expected)


@pytest.mark.parametrize("n1, n2", [(5, 7), (40, 90)])  # fewer and more samples than dimensions
def test_frechet_distance_matches_pyiqa(n1, n2):
    from pyiqa.archs.fid_arch import frechet_distance as pyiqa_frechet

    from chopgrad.metrics.distribution import frechet_distance

    rng = np.random.default_rng(0)
    f1 = rng.standard_normal((n1, 32)) @ rng.standard_normal((32, 32))
    f2 = 0.5 + rng.standard_normal((n2, 32)) @ rng.standard_normal((32, 32))
    expected = pyiqa_frechet(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    assert frechet_distance(f1, f2) == pytest.approx(expected, rel=1e-6)
    assert abs(frechet_distance(f1, f1)) < 1e-8


@pytest.mark.slow  # an Inception network over two image sets
def test_fid_is_zero_for_identical_sets_and_grows_with_noise(home, inception):
    fid = metrics.FID()
    assert fid.weights == {"fid_inception": "stand-in"} and fid.stand_in_weights
    gt = _video(b=1, t=3)
    feats_gt = fid.features(gt)
    assert feats_gt.shape == (3, 2048)
    values = [fid.from_features(fid.features(_noisy(gt, s)), feats_gt) for s in (0.0, 0.05, 0.2)]
    assert abs(values[0]) < 1e-3
    assert values[0] < values[1] < values[2]


def test_fid_needs_two_frames(home, inception):
    with pytest.raises(ValueError, match="at least 2 pred frames"):
        metrics.FID.from_features(np.zeros((1, 2048)), np.zeros((4, 2048)))


@pytest.mark.slow  # an I3D network over two video sets
def test_fvd_is_zero_for_identical_sets_and_positive_with_noise(home, i3d):
    fvd = metrics.FVD()
    assert fvd.weights == {"i3d": "unverified"} and fvd.stand_in_weights
    gt = _video(b=2, t=9, h=32, w=32)
    feats_gt = fvd.features(gt)
    assert feats_gt.shape == (2, 400)
    assert abs(fvd.from_features(feats_gt, feats_gt)) < 1e-3
    assert fvd.from_features(fvd.features(_noisy(gt, 0.2)), feats_gt) > 1e-2


@pytest.mark.slow
def test_fvd_grows_monotonically_with_noise(home, i3d):
    fvd = metrics.FVD()
    gt = _video(b=2, t=9, h=32, w=32)
    values = [fvd(_noisy(gt, s), gt) for s in (0.02, 0.1, 0.3)]
    assert values[0] < values[1] < values[2]


def test_fvd_refuses_short_videos_and_single_videos(home, i3d):
    fvd = metrics.FVD()
    with pytest.raises(ValueError, match="at least 9 frames per video"):
        fvd.features(_video(b=2, t=8, h=32, w=32), "pred")
    with pytest.raises(ValueError, match="at least 2 gt videos"):
        fvd.from_features(np.zeros((3, 400)), np.zeros((1, 400)))


# ---------------------------------------------------------------- missing weights


@pytest.mark.parametrize("build, filename", [
    (lambda: metrics.LPIPS("vgg"), "vgg16-397923af.pth"), (metrics.DISTS, "DISTS_weights-f5e65c96.pth"),
    (metrics.FID, "pt_inception-2015-12-05-6726825d.pth"), (metrics.FVD, "i3d_pretrained_400.pt"),
    (vbench.SubjectConsistency, "dino_vitbase16_pretrain.pth"), (vbench.BackgroundConsistency, "ViT-B-32.pt"),
    (vbench.AestheticQuality, "sa_0_4_vit_l_14_linear.pth"), (vbench.ImagingQuality, "musiq_spaq_ckpt-358bb6af.pth"),
    (vbench.DynamicDegree, "raft_large_C_T_V1-22a6c225.pth"),
])
def test_missing_weights_raise_at_once_with_the_path(tmp_path, monkeypatch, build, filename):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(weights.CLIP_HOME_ENV, raising=False)
    start = time.perf_counter()
    with pytest.raises(weights.MissingWeightsError, match="put it at: " + str(tmp_path)) as info:
        build()
    assert time.perf_counter() - start < 2.0
    assert filename in str(info.value)


# ---------------------------------------------------------------- VBench: definitions by hand


def test_temporal_flickering_by_hand():
    frames = torch.zeros(1, 3, 3, 2, 2, dtype=torch.uint8)
    frames[:, :, 1] = 10  # |f1 - f0| = 10 everywhere
    frames[:, :, 2, 0, 0] = 40  # |f2 - f1| = 30 on 1 of 4 pixels, 10 on the others
    mean_diff = (10 + (30 + 3 * 10) / 4) / 2
    assert vbench.temporal_flickering(frames).item() == pytest.approx((255 - mean_diff) / 255)
    # Float frames are rounded to 8 bits first, as VBench reads them from a video file.
    assert vbench.temporal_flickering(frames.float() / 255 + 0.001).item() == pytest.approx((255 - mean_diff) / 255)
    static = torch.rand(2, 3, 5, 8, 8)[:, :, :1].expand(2, 3, 5, 8, 8)
    assert torch.equal(vbench.temporal_flickering(static), torch.ones(2))


def test_temporal_flickering_needs_two_frames():
    with pytest.raises(ValueError, match="at least 2 frames"):
        vbench.temporal_flickering(torch.rand(1, 3, 1, 8, 8))


def test_consistency_by_hand():
    angles = torch.tensor([0.0, math.pi / 3, math.pi])  # frame 2 points away from frame 0
    feats = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1) * torch.tensor([[1.0], [2.0], [0.5]])
    # t=1: cos to prev = cos to first = 0.5; t=2: cos to prev = cos(2pi/3) = -0.5 -> 0, cos to first = -1 -> 0
    assert vbench.consistency_from_features(feats).item() == pytest.approx((0.5 + 0.0) / 2)


def test_motion_smoothness_with_an_exact_interpolator_is_one_and_by_hand_otherwise():
    t = torch.arange(7, dtype=torch.float32).view(1, 1, 7, 1, 1)
    linear = (20 + 10 * t).expand(1, 3, 7, 4, 4).to(torch.uint8)  # pixel values 20, 30, ..., 80
    blend = lambda a, b: (a + b) / 2
    assert vbench.motion_smoothness(linear, blend).item() == pytest.approx(1.0)
    # Interpolating by copying the first frame misses each odd frame by exactly 10 levels.
    assert vbench.motion_smoothness(linear, lambda a, b: a).item() == pytest.approx((255 - 10) / 255)


def test_dynamic_degree_decision_by_hand():
    moving, still = torch.full((2, 64, 64), 6.0), torch.zeros(2, 64, 64)  # |flow| = 8.49 vs threshold 6
    # 16 frames -> 15 flows, count_num = round(4) = 4: dynamic once 4 pairs move.
    assert vbench.dynamic_degree_from_flows([moving] * 4 + [still] * 11, (256, 256))
    assert not vbench.dynamic_degree_from_flows([moving] * 3 + [still] * 12, (256, 256))
    # The threshold scales with the shorter side: 6 * 512 / 256 = 12 > 8.49.
    assert not vbench.dynamic_degree_from_flows([moving] * 15, (512, 1024))
    # Top 5% (cut = int(4096 * 0.05) = 204 pixels) at |(10, 10)| = 14.14: the mean exceeds 6 when more
    # than 204 * 6 / 14.14 = 86.6 pixels move.
    def sparse(k):
        flow = torch.zeros(2, 64 * 64)
        flow[:, :k] = 10.0
        return flow.view(2, 64, 64)

    assert vbench.dynamic_degree_from_flows([sparse(87)] * 15, (256, 256))
    assert not vbench.dynamic_degree_from_flows([sparse(86)] * 15, (256, 256))


# Paper Table 6: (aesthetic, background, dynamic, imaging, motion smoothness, subject, flickering) -> overall.
TABLE_6 = [
    ((0.531, 0.917, 0.950, 0.731, 0.957, 0.912, 0.912), 0.792),
    ((0.519, 0.912, 0.950, 0.729, 0.961, 0.903, 0.919), 0.792),
    ((0.512, 0.956, 0.882, 0.716, 0.987, 0.953, 0.969), 0.836),
    ((0.517, 0.960, 0.894, 0.695, 0.988, 0.945, 0.972), 0.835),
    ((0.519, 0.957, 0.859, 0.704, 0.987, 0.950, 0.970), 0.834),
    ((0.525, 0.962, 0.847, 0.696, 0.988, 0.955, 0.972), 0.835),
    ((0.472, 0.926, 0.816, 0.538, 0.959, 0.885, 0.941), 0.752),
    ((0.457, 0.924, 0.749, 0.521, 0.964, 0.884, 0.947), 0.747),
]


@pytest.mark.parametrize("components, overall", TABLE_6)
def test_quality_score_reproduces_the_papers_table_6(components, overall):
    names = ("aesthetic_quality", "background_consistency", "dynamic_degree", "imaging_quality",
             "motion_smoothness", "subject_consistency", "temporal_flickering")
    # Components are printed to 3 decimals, so the recomputed score may differ by rounding.
    assert vbench.quality_score(dict(zip(names, components))) == pytest.approx(overall, abs=1.5e-3)


def test_quality_score_needs_every_dimension():
    with pytest.raises(ValueError, match="motion_smoothness"):
        vbench.quality_score({name: 1.0 for name in vbench.QUALITY_DIMENSIONS if name != "motion_smoothness"})


# ---------------------------------------------------------------- VBench: model-backed, stand-in weights


@pytest.mark.slow
def test_subject_consistency_with_stand_in_dino(home):
    weights.write_stand_ins(["dino_vitb16"])
    metric = vbench.SubjectConsistency()
    assert metric.weights == {"dino_vitb16": "unverified"} and metric.stand_in_weights
    static = _video(b=1, t=3, h=32, w=48)[:, :, :1].expand(1, 3, 3, 32, 48)
    assert metric(static).item() == pytest.approx(1.0, abs=1e-5)
    assert metric(torch.rand(1, 3, 3, 32, 48)).item() < 1.0


@pytest.mark.slow
def test_background_consistency_with_stand_in_clip(home):
    weights.write_stand_ins(["clip_vit_b32"])
    metric = vbench.BackgroundConsistency()
    assert metric.weights == {"clip_vit_b32": "stand-in"}
    static = _video(b=1, t=3, h=32, w=32)[:, :, :1].expand(1, 3, 3, 32, 32)
    assert metric(static).item() == pytest.approx(1.0, abs=1e-5)
    assert metric(torch.rand(1, 3, 3, 32, 32)).item() < 1.0


@pytest.mark.slow
def test_aesthetic_quality_with_stand_in_clip_l14(home):
    weights.write_stand_ins(["clip_vit_l14"])
    head = nn.Linear(768, 1)
    nn.init.constant_(head.weight, 0.0)
    nn.init.constant_(head.bias, 5.5)  # a constant head: every frame scores 5.5, reported as 0.55
    _save(head.state_dict(), "laion_aesthetic")
    metric = vbench.AestheticQuality()
    assert metric.stand_in_weights
    assert metric(_video(b=2, t=2, h=32, w=32)).tolist() == pytest.approx([0.55, 0.55])


@pytest.mark.slow
def test_imaging_quality_with_stand_in_musiq(home):
    weights.write_stand_ins(["musiq_spaq"])
    metric = vbench.ImagingQuality()
    assert metric.weights == {"musiq_spaq": "stand-in"}
    scores = metric(_video(b=2, t=2, h=32, w=32))
    assert scores.shape == (2,) and torch.isfinite(scores).all()


@pytest.mark.slow
def test_dynamic_degree_with_stand_in_raft(home):
    weights.write_stand_ins(["raft_large"])
    metric = vbench.DynamicDegree()
    assert metric.weights == {"raft_large": "stand-in"}
    scores = metric(_video(b=1, t=3, h=128, w=128), fps=8)
    assert scores.shape == (1,) and scores.item() in (0.0, 1.0)
    with pytest.raises(ValueError, match="at least 128x128"):
        metric(_video(b=1, t=3, h=64, w=64), fps=8)


# ---------------------------------------------------------------- evaluate() and the CLI


def test_evaluate_reports_values_and_stand_in_flags(home, vgg_alex):
    gt = _video(b=2, t=3)
    pred = _noisy(gt, 0.05)
    results = metrics.evaluate(pred, gt, ["psnr", "ssim", "lpips_alex", "temporal_flickering"])
    assert results["psnr"]["value"] == pytest.approx(metrics.PSNR()(pred, gt).mean().item())
    assert results["psnr"]["stand_in_weights"] is False and results["psnr"]["weights"] == {}
    assert results["lpips_alex"]["stand_in_weights"] is True
    assert results["lpips_alex"]["weights"] == {"alexnet": "stand-in", "lpips_alex_lin": "official"}
    assert results["temporal_flickering"]["value"] == pytest.approx(vbench.temporal_flickering(pred).mean().item())


def test_evaluate_refuses_bad_requests_before_loading_anything():
    video = torch.rand(1, 3, 4, 16, 16)
    with pytest.raises(ValueError, match="unknown metric\\(s\\) psrn"):
        metrics.evaluate(video, video, ["psrn"])
    with pytest.raises(ValueError, match="compare with a ground truth"):
        metrics.evaluate(video, None, ["psnr"])
    with pytest.raises(ValueError, match="4 vs 3 frames"):
        metrics.evaluate(video, torch.rand(1, 3, 3, 16, 16), ["dists"])
    with pytest.raises(ValueError, match="pass fps"):
        metrics.evaluate(video, None, ["dynamic_degree"])


def _write_frames(folder, video):  # video [3, T, H, W] uint8
    from PIL import Image

    folder.mkdir()
    for t in range(video.shape[1]):
        Image.fromarray(video[:, t].permute(1, 2, 0).numpy()).save(folder / f"{t:04d}.png")


def test_cli_on_frame_folders_matches_the_library(tmp_path, capsys):
    from chopgrad.metrics.__main__ import main

    gt = (_video(b=1, t=3, h=32, w=32) * 255).round().to(torch.uint8)
    pred = (_noisy(gt.float() / 255, 0.05) * 255).round().to(torch.uint8)
    _write_frames(tmp_path / "pred", pred[0])
    _write_frames(tmp_path / "gt", gt[0])
    out = tmp_path / "out" / "metrics.json"
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--metrics", "psnr,ssim,temporal_flickering",
                 "--json", str(out)]) == 0
    saved = json.loads(out.read_text())
    expected = metrics.evaluate(pred, gt, ["psnr", "ssim", "temporal_flickering"])
    for name in expected:
        assert saved[name]["value"] == pytest.approx(expected[name]["value"])
    assert "psnr" in capsys.readouterr().out


def test_cli_reads_video_files(tmp_path):
    import av

    from chopgrad.metrics.__main__ import load_videos

    path = tmp_path / "clip.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for t in range(5):
            frame = np.full((48, 64, 3), 40 * t, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    videos, fps = load_videos(path)
    assert videos.shape == (1, 3, 5, 48, 64) and videos.dtype == torch.uint8
    assert fps == pytest.approx(12)
    assert abs(videos[0, :, 3].float().mean().item() - 120) < 3  # lossy codec, flat frames


def test_cli_rejects_unknown_metrics_and_mixed_folders(tmp_path, capsys):
    from chopgrad.metrics.__main__ import load_videos, main

    _write_frames(tmp_path / "pred", torch.zeros(3, 2, 8, 8, dtype=torch.uint8))
    with pytest.raises(SystemExit):
        main([str(tmp_path / "pred"), "--metrics", "psnr,bogus"])
    assert "bogus" in capsys.readouterr().err
    (tmp_path / "pred" / "x.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="mixes frames and video files"):
        load_videos(tmp_path / "pred")
    with pytest.raises(FileNotFoundError):
        load_videos(tmp_path / "nowhere")


def test_cli_reports_missing_weights_and_bad_inputs_without_a_traceback(tmp_path, monkeypatch, capsys):
    from chopgrad.metrics.__main__ import main

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    _write_frames(tmp_path / "pred", torch.zeros(3, 2, 8, 8, dtype=torch.uint8))
    _write_frames(tmp_path / "gt", torch.zeros(3, 3, 8, 8, dtype=torch.uint8))
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--metrics", "psnr,dists"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: metrics psnr, dists needs pretrained weights") and "vgg16-397923af.pth" in err
    assert main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--metrics", "psnr"]) == 2
    assert "error: pred and gt differ: 2 vs 3 frames" in capsys.readouterr().err


def test_importing_the_metrics_pulls_in_no_pipeline_tools():
    code = ("import sys, chopgrad.metrics, chopgrad.weights; "
            "print([m for m in ('prefect', 'dvc', 'mlflow', 'yaml') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"

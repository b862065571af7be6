"""chopgrad.analysis (paper section 3.3): estimator against exact Jacobians, the fit, gradient errors,
resources, spatial locality, the CLI on the real Wan 2.1 VAE architecture, and the analysis stage."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import chopgrad
from chopgrad import analysis
from chopgrad.analysis import models
from chopgrad.analysis.__main__ import main as cli

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


class RecurrentDecoder:
    """A user's own causal decoder: a 3x3 conv RNN whose cache is the last step's hidden state."""

    latent_channels, out_channels, spatial_scale, output_range, clamp_output = 2, 3, 1, (-1.0, 1.0), False

    def __init__(self, recurrence: float = 1.0):
        torch.manual_seed(3)
        self.inp = torch.nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1)).double()
        self.rec = torch.nn.Conv3d(4, 4, 1).double()
        self.out = torch.nn.Conv3d(4, 3, 1).double()
        self.recurrence = recurrence
        for p in self.parameters():
            p.requires_grad_(False)

    def step_sizes(self, latent_frames):
        return [1] * latent_frames

    def frames_out(self, step_index, step_size):
        return step_size

    def init_cache(self, tile=None):  # a conv RNN's output does not depend on where its latents lie
        return {"hidden": None}

    def step(self, latents, cache):
        hidden = self.inp(latents)
        if cache["hidden"] is not None:
            hidden = hidden + self.recurrence * self.rec(cache["hidden"])
        hidden = torch.tanh(hidden)
        return 0.5 * torch.tanh(self.out(hidden)), {"hidden": hidden}

    def parameters(self):
        return [*self.inp.parameters(), *self.rec.parameters(), *self.out.parameters()]


def small_wan(dtype=torch.float64):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           latents_mean=[0.1, 0.0, -0.2, 0.3], latents_std=[1.5, 1.0, 0.7, 2.0])
    return vae.to(dtype).eval().requires_grad_(False)


def relative(a, b):
    return float((a - b).norm() / b.norm())


# ----------------------------------------------------------------------------- temporal locality


def test_basis_probes_give_the_exact_jacobian_norms():
    decoder = RecurrentDecoder()
    latents = torch.randn(2, 2, 5, 2, 2, dtype=torch.float64)
    exact = analysis.exact_locality(decoder, latents, max_distance=3)  # forward-mode, whole decode
    basis = analysis.temporal_locality(decoder, latents, max_distance=3, exact=True)  # reverse, step window
    measured = ~torch.isnan(exact.influence)
    assert torch.equal(measured, ~torch.isnan(basis.influence))
    assert measured.sum() == 2 * (5 + 4 + 3 + 2)  # every pair with 0 <= i - j <= 3, for two videos
    assert torch.allclose(basis.influence[measured], exact.influence[measured], rtol=1e-12, atol=0)
    # independent check of one block with torch's own reverse-mode Jacobian of the whole decode
    jac = torch.autograd.functional.jacobian(lambda z: chopgrad.decode(decoder, z, clamp=False), latents[:1])
    block = jac[:, :, 4, :, :, :, :, 2]  # d x_4 / d z_2
    assert float(block.pow(2).sum().sqrt()) == pytest.approx(float(exact.influence[0, 4, 2]), rel=1e-12)


@pytest.mark.parametrize("name", ["wan", "cogvideox"])
def test_gaussian_estimator_matches_exact_jacobians(name):
    from diffusers import AutoencoderKLCogVideoX

    if name == "wan":
        vae, latents = small_wan(), torch.randn(1, 4, 3, 1, 1, dtype=torch.float64)
    else:
        torch.manual_seed(0)
        vae = AutoencoderKLCogVideoX(block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1,
                                     norm_num_groups=2).double().eval().requires_grad_(False)
        latents = torch.randn(1, 4, 4, 1, 1, dtype=torch.float64)  # two steps of two latent frames
    distance = min(2, len(chopgrad.wrap_decoder(vae).step_sizes(latents.shape[2])) - 1)
    exact = analysis.exact_locality(vae, latents, max_distance=distance)
    probes = 48  # relative std of each squared norm <= sqrt(2 / 48) = 0.2, of the norm about half that
    estimate = analysis.temporal_locality(vae, latents, distance, probes, generator=torch.Generator().manual_seed(0))
    measured = ~torch.isnan(exact.influence)
    ratio = estimate.influence[measured] / exact.influence[measured]
    assert float((ratio - 1).abs().mean()) < 0.12
    assert float((ratio - 1).abs().max()) < 0.35


def test_locality_errors_name_the_problem():
    decoder = RecurrentDecoder()
    latents = torch.randn(1, 2, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="max_distance=3 is larger than the video: 3 latent frames decode in 3 steps"):
        analysis.temporal_locality(decoder, latents, max_distance=3)
    with pytest.raises(ValueError, match="probes must be an integer >= 1"):
        analysis.temporal_locality(decoder, latents, 1, probes=0)
    with pytest.raises(ValueError, match="channels"):
        analysis.temporal_locality(decoder, torch.randn(1, 3, 3, 2, 2), 1)
    with pytest.raises(ValueError, match=r"relative tolerance eps must be in \(0, 1\)"):
        analysis.locality_report(decoder, latents, max_distance=2, probes=1, rel_tol=1.5)


def test_locality_report_on_a_decaying_decoder():
    decoder = RecurrentDecoder(recurrence=0.4)  # a contracting recurrence: influence decays with distance
    latents = torch.randn(2, 2, 8, 3, 3, dtype=torch.float64)
    _, fit, summary = analysis.locality_report(decoder, latents, max_distance=5, probes=16, fit_from="zero")
    assert fit is not None and fit.alpha > 0.5 and summary["r2"] > 0.9
    mean = summary["mean_by_distance"]
    assert all(a > b for a, b in itertools.pairwise(mean))
    eps = 1e-3 * mean[0]
    assert summary["eps"] == pytest.approx(eps)
    assert summary["recommended_d_trunc"] == math.ceil(math.log(fit.C / eps) / fit.alpha)


# ----------------------------------------------------------------------------- fit


@pytest.mark.parametrize("method", ["loglinear", "curve_fit"])
def test_fit_recovers_known_parameters(method):
    distances = np.repeat(np.arange(9), 4)
    noise = np.random.default_rng(0).normal(0, 0.05, distances.size)
    clean = 2.5 * np.exp(-0.7 * distances)
    # each method's own noise model: relative noise for the log-linear fit, additive for curve_fit
    values = clean * np.exp(noise) if method == "loglinear" else clean + 0.2 * noise
    fit = analysis.fit_exponential(distances, values, method=method)
    assert fit.alpha == pytest.approx(0.7, rel=0.05) and fit.C == pytest.approx(2.5, rel=0.1)
    assert fit.alpha_ci[0] < 0.7 < fit.alpha_ci[1] and fit.C_ci[0] < 2.5 < fit.C_ci[1]
    assert fit.r2 > 0.95 and fit.n == distances.size
    clean = analysis.fit_exponential(np.arange(5), 3.0 * np.exp(-1.3 * np.arange(5)), method=method)
    assert clean.alpha == pytest.approx(1.3, rel=1e-9) and clean.C == pytest.approx(3.0, rel=1e-9)
    assert clean.r2 == pytest.approx(1.0, abs=1e-12)


def test_recommended_d_trunc_follows_the_bound():
    fit = analysis.fit_exponential(np.arange(6), 2.0 * np.exp(-0.5 * np.arange(6)))
    out = analysis.recommend_d_trunc(fit, rel_tol=1e-3, reference=2.0)
    assert out["eps"] == pytest.approx(2e-3)
    assert out["d_trunc_bound"] == pytest.approx(math.log(1000) / 0.5, rel=1e-9)  # 13.8
    assert out["d_trunc"] == 14
    growing = analysis.fit_exponential(np.arange(4), np.exp(0.2 * np.arange(4)))
    assert analysis.recommend_d_trunc(growing, 1e-3, 1.0)["d_trunc"] is None  # no decay, no distance
    for bad in (0, 1, 1.5, -1e-3):
        with pytest.raises(ValueError, match=r"eps must be in \(0, 1\)"):
            analysis.recommend_d_trunc(fit, bad, 1.0)


def test_fit_errors():
    with pytest.raises(ValueError, match=">= 3 distinct distances"):
        analysis.fit_exponential([0, 1], [1.0, 0.5])
    with pytest.raises(ValueError, match="must be > 0"):
        analysis.fit_exponential([0, 1, 2], [1.0, 0.0, 0.1])
    with pytest.raises(ValueError, match="unknown fit method"):
        analysis.fit_exponential([0, 1, 2], [1.0, 0.5, 0.2], method="spline")


# ----------------------------------------------------------------------------- gradient errors


# Wan's covering truncation matches plain backprop to ~1e-7 in float64, not to round-off: diffusers'
# WanUpsample computes in float32, and the truncated sweeps group the loss terms' cotangents
# differently from plain backprop's one sum, so the float32 roundings differ. The same tolerance as
# tests/test_engine.py::test_full_and_covering_truncation_equal_plain_autograd.
@pytest.mark.parametrize("name, tol", [("recurrent", 1e-12), ("wan", 1e-6)])
def test_gradient_error_vanishes_when_d_trunc_covers_all_steps(name, tol):
    if name == "wan":
        decoder, latents, target = small_wan(), torch.randn(2, 4, 4, 2, 2, dtype=torch.float64), \
            torch.rand(2, 3, 13, 16, 16, dtype=torch.float64) * 2 - 1
    else:
        decoder, latents, target = RecurrentDecoder(), torch.randn(2, 2, 4, 3, 3, dtype=torch.float64), \
            torch.rand(2, 3, 4, 3, 3, dtype=torch.float64) - 0.5
    error = analysis.decoder_gradient_error(decoder, latents, target, lambda p, t: ((p - t) ** 2).mean(), [0, 1, 3, 7])
    table = error.table()  # 4 decode steps: d_trunc 3 and 7 reach every step
    assert [row["d_trunc"] for row in table] == [0, 1, 3, 7]
    assert table[0]["total_rel"] > 1e-3 and table[0]["abs_mean"] > 0  # truncation changes the gradient ...
    for row in table[2:]:  # ... but not once it reaches every step
        assert row["total_rel"] < tol and row["rel_max"] < tol
    assert error.absolute.shape == (2, 4, 4) and torch.all(error.exact_norm > 0)


def test_wan_covering_truncation_is_exact_once_upsample_keeps_float64(monkeypatch):
    """The ~1e-7 of the test above comes from WanUpsample's float32 and from nothing else."""
    from diffusers.models.autoencoders import autoencoder_kl_wan

    monkeypatch.setattr(autoencoder_kl_wan.WanUpsample, "forward", torch.nn.Upsample.forward)
    torch.manual_seed(1)
    latents = torch.randn(2, 4, 4, 2, 2, dtype=torch.float64)
    target = torch.rand(2, 3, 13, 16, 16, dtype=torch.float64) * 2 - 1
    error = analysis.decoder_gradient_error(small_wan(), latents, target, lambda p, t: ((p - t) ** 2).mean(), [3])
    assert error.table()[0]["total_rel"] < 1e-13


def test_backbone_cosine_is_one_when_d_trunc_covers_all_steps():  # tolerances: see the note above
    vae = small_wan()
    transformer = models.backbone_transformer(latent_channels=4, seed=0).double()
    backbone = models.FlowBackbone(transformer, vae, sigma=0.5, seed=0)
    clean = [torch.randn(1, 4, 3, 2, 2, dtype=torch.float64) for _ in range(2)]
    targets = [torch.rand(1, 3, 9, 16, 16, dtype=torch.float64) * 2 - 1 for _ in range(2)]
    result = analysis.parameter_gradient_agreement(
        vae, lambda k: backbone(clean[k], k), targets, list(transformer.parameters()),
        lambda p, t: ((p - t) ** 2).mean(), [0, 2, 5])
    assert result.parameters == sum(p.numel() for p in transformer.parameters())
    assert result.cosine[0] < 1 - 1e-6 and result.normalized_mae[0] > 1e-6
    for cosine, mae in zip(result.cosine[1:], result.normalized_mae[1:]):
        assert cosine == pytest.approx(1.0, abs=1e-12) and mae < 1e-6


def test_backbone_latent_space_is_the_vaes_normalised_space():
    from diffusers import AutoencoderKLCogVideoX

    vae = small_wan()
    mean, std = [0.1, 0.0, -0.2, 0.3], [1.5, 1.0, 0.7, 2.0]  # small_wan's config
    assert models.latent_stats(vae) == (mean, std)
    noise = torch.randn((2, 4, 3, 2, 2), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    latents = models.random_latents(vae, (2, 4, 3, 2, 2), torch.Generator().manual_seed(5))
    by_hand = noise * torch.tensor(std).view(1, 4, 1, 1, 1) + torch.tensor(mean).view(1, 4, 1, 1, 1)
    torch.testing.assert_close(latents, by_hand)
    cogvideox = AutoencoderKLCogVideoX(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1,
                                       norm_num_groups=2, scaling_factor=0.5)
    assert models.latent_stats(cogvideox) == ([0.0] * 4, [2.0] * 4)  # its pipelines diffuse z * scaling_factor


def test_backbone_transformer_from_a_wan21_folder_refuses_other_channels_before_loading(tmp_path, monkeypatch):
    from chopgrad import restoration

    saved = restoration.small_transformer(latent_channels=4, zero_output=False, seed=1)
    saved.save_pretrained(tmp_path / "wan" / "transformer")
    loaded = models.backbone_transformer(4, tmp_path / "wan")
    for (name, a), (_, b) in zip(saved.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, msg=name)
    monkeypatch.setattr("diffusers.WanTransformer3DModel.from_pretrained", None)  # loading would now fail
    with pytest.raises(ValueError, match="maps 4 to 4 latent channels but the VAE has 16: use the transformer"):
        models.backbone_transformer(16, tmp_path / "wan")


def test_gradient_error_argument_errors():
    vae = small_wan()
    latents, target = torch.randn(1, 4, 2, 2, 2, dtype=torch.float64), torch.zeros(1, 3, 5, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="d_trunc must be an integer >= 0"):
        analysis.decoder_gradient_error(vae, latents, target, torch.nn.functional.mse_loss, [-1])
    with pytest.raises(ValueError, match="same number of videos"):
        analysis.decoder_gradient_error(vae, latents, target.repeat(2, 1, 1, 1, 1), torch.nn.functional.mse_loss, [0])


# ----------------------------------------------------------------------------- resources and spatial


def test_resources_memory_is_flat_in_length_and_grows_with_d_trunc():
    vae = small_wan(torch.float32)
    # lengths past the first step (Wan's first step decodes one frame: a smaller graph)
    rows = analysis.measure_resources(vae, (2, 2), d_truncs=[0, 1, 2], latent_frames=[3, 5], length_d_truncs=[1])
    saved = {(r["d_trunc"], r["latent_frames"]): r["saved_peak_bytes"] for r in rows}
    assert saved[(1, 3)] == saved[(1, 5)]  # ChopGrad: constant in video length
    assert saved[(0, 5)] < saved[(1, 5)] < saved[(2, 5)]  # and growing with d_trunc
    assert saved[(None, 3)] < saved[(None, 5)]  # full backprop grows with length
    assert all(r["seconds"] > 0 and r["cuda_peak_bytes"] is None for r in rows)
    assert len(rows) == len({(r["d_trunc"], r["latent_frames"]) for r in rows}) == 6


def test_spatial_locality_reach():
    pointwise = RecurrentDecoder()  # 3x3 input conv: one latent row of reach above the boundary
    latents = torch.randn(1, 2, 3, 8, 6, dtype=torch.float64)
    result = analysis.spatial_locality(pointwise, latents, boundary_row=4, threshold=0.0)
    assert result.boundary_px == 4 and result.reach_any_px == 1 and result.reach_px == 1
    assert torch.all(result.row_change[:3] == 0) and result.row_change[3] > 0
    wan = analysis.spatial_locality(small_wan(), torch.randn(1, 4, 2, 4, 4, dtype=torch.float64), boundary_row=2)
    assert 0 < wan.reach_any_px <= wan.boundary_px == 16
    assert wan.original.shape == wan.zeroed.shape == (3, 32, 32)
    with pytest.raises(ValueError, match=r"boundary_row must be a latent row in \[1, 7\]"):
        analysis.spatial_locality(pointwise, latents, boundary_row=8)


# ----------------------------------------------------------------------------- LPIPS weights


def test_lpips_loss_refuses_missing_weights(tmp_path, monkeypatch):
    from chopgrad.weights import MissingWeightsError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: the VGG16 file is missing
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        models.lpips_loss("vgg", weights="official")
    with pytest.raises(ValueError, match="LPIPS net must be 'vgg' or 'alex'"):
        models.lpips_loss("squeeze")
    with pytest.raises(ValueError, match="LPIPS weights must be 'official' or 'stand_in', got True"):
        models.lpips_loss("vgg", weights=True)  # the policy, not the old allow_stand_in flag
    monkeypatch.setattr(models, "load_lpips", lambda net, weights, device: (None, {}))
    loss, _ = models.lpips_loss("alex")
    smallest = models.LPIPS_MIN_SIZE["alex"]  # chopgrad.metrics.limits decides it
    with pytest.raises(ValueError, match=f"LPIPS-alex needs frames of at least {smallest} x {smallest} pixels"):
        loss(torch.zeros(1, 3, 1, 16, 24), torch.zeros(1, 3, 1, 16, 24))
    # weights="stand_in": see test_stage_writes_the_summary_raw_results_and_five_figures


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def wan21_folder(tmp_path_factory) -> Path:
    """A random-weight diffusers folder of the real Wan 2.1 VAE architecture (bf16 on disk: half the bytes)."""
    from diffusers import AutoencoderKLWan

    folder = tmp_path_factory.mktemp("wan21") / "vae"
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           temperal_downsample=[False, True, True])
    vae.to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.slow  # the full-size Wan 2.1 VAE architecture
def test_cli_runs_on_a_real_wan21_architecture_folder(wan21_folder, tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--vae", str(wan21_folder), "--height", "16", "--width", "16", "--videos", "1", "--out", str(out),
              "--quiet"]
    assert cli(["locality", *common, "--frames", "9", "--max-distance", "2", "--probes", "1"]) == 0
    result = json.loads((out / "locality.json").read_text())
    assert result["summary"]["steps"] == 3 and len(result["summary"]["mean_by_distance"]) == 3
    assert "recommended_d_trunc" in result["summary"] and (out / "locality.png").stat().st_size > 0
    assert cli(["spatial", *common, "--frames", "5"]) == 0
    spatial = json.loads((out / "spatial.json").read_text())
    assert spatial["boundary_px"] == 8 and len(spatial["row_change"]) == 16
    assert (out / "spatial.png").is_file()


def test_cli_grad_error_backbone_resources_on_a_builtin_decoder(tmp_path):
    common = ["--vae", "wan-tiny", "--height", "16", "--width", "16", "--frames", "9", "--videos", "1",
              "--out", str(tmp_path), "--quiet"]
    assert cli(["grad-error", *common, "--d-trunc", "0,2", "--loss", "mse"]) == 0
    table = json.loads((tmp_path / "grad-error.json").read_text())["tables"]["mse"]
    assert table[0]["total_rel"] > 0 and table[1]["total_rel"] < 1e-4  # float32 round-off only
    assert cli(["backbone", *common, "--d-trunc", "0,2"]) == 0
    backbone = json.loads((tmp_path / "backbone.json").read_text())
    assert backbone["table"][1]["cosine"] > 0.999 and backbone["backbone"] == "small random"
    assert cli(["resources", *common, "--d-trunc", "0,1", "--lengths", "5,9"]) == 0
    rows = json.loads((tmp_path / "resources.json").read_text())["rows"]
    assert {r["mode"] for r in rows} == {"chopgrad", "full"}
    for name in ("grad-error", "backbone", "resources"):
        assert (tmp_path / f"{name}.png").is_file()


@pytest.mark.parametrize("argv, message", [
    (["locality", "--vae", "no-such-decoder"], "unknown decoder 'no-such-decoder'"),
    (["locality", "--vae", "wan-tiny", "--frames", "9", "--max-distance", "5"], "larger than the video"),
    (["locality", "--vae", "wan-tiny", "--frames", "16"], "cannot produce 16 frames"),
    (["spatial", "--vae", "wan-tiny", "--height", "20"], "multiples of 8"),
    (["spatial", "--vae", "wan-tiny", "--frames", "5", "--boundary", "9"], "boundary_row must be a latent row"),
    (["backbone", "--vae", "wan-tiny", "--loss", "mse,lpips"], "takes one --loss"),
    (["grad-error", "--vae", "wan-tiny", "--loss", "l1"], "unknown loss"),
    (["backbone", "--vae", "wan-tiny", "--transformer-path", "/no/such/Wan2.1"], "is not a folder"),
])
def test_cli_errors_name_the_problem(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli([*argv, "--out", str(tmp_path), "--quiet"])
    assert exit_info.value.code == 2
    assert not (tmp_path / f"{argv[0]}.json").exists()
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("eps", ["0", "1", "1.5", "abc"])
def test_cli_refuses_eps_outside_the_unit_interval(eps, capsys):
    with pytest.raises(SystemExit):
        cli(["locality", "--vae", "wan-tiny", "--eps", eps])
    assert "(0, 1)" in capsys.readouterr().err


def test_cli_refuses_folders_that_are_not_supported_vaes(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    other = tmp_path / "unet"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    for folder, message in ((empty, "config.json is missing"), (other, "declares 'UNet2DModel'")):
        with pytest.raises(SystemExit):
            cli(["spatial", "--vae", str(folder), "--out", str(tmp_path / "out")])
        assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- the pipeline stage


def stage_params(**changes):
    from stages import analysis as stage

    values = {"clips": 2, "locality_frames": 13, "frames": 9, "max_distance": 3, "probes": 1, "fit_from": "peak",
              "rel_tol": 1e-3, "d_trunc": (0, 1, 2), "losses": ("mse", "lpips"), "lpips_net": "vgg",
              "lpips_frames": 5, "weights": "stand_in", "transformer_path": None, "backbone_layers": 1,
              "backbone_sigma": 0.5, "resource_frames": (5, 9), "resource_length_d_trunc": (1,),
              "resource_repeats": 1, "spatial_boundary": 0.5, "spatial_threshold": 2 / 255, "seed": 0, "threads": 1}
    return stage.Params(**{**values, **changes})


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory) -> tuple[Path, Path]:
    """A saved tiny Wan VAE and a scene set whose one test scene holds two 13-frame clips of 16 x 24."""
    from stages.common import scenes

    root = tmp_path_factory.mktemp("stage")
    small_wan(torch.float32).save_pretrained(root / "vae")
    t, y, x = np.meshgrid(np.arange(27), np.arange(16), np.arange(24), indexing="ij")
    for index, name in enumerate(["a", "b"]):
        frames = np.stack([np.sin(0.4 * x + 0.3 * t + index), np.cos(0.5 * y - 0.2 * t), np.sin(0.2 * (x + y))], -1)
        scenes.write_scene(root / "scenes" / name, (127.5 * (1 + frames)).round().astype(np.uint8),
                           np.array([[20.0, 0, 12], [0, 20.0, 8], [0, 0, 1]]), np.tile(np.eye(4), (27, 1, 1)))
    scenes.write_split(root / "scenes", ["a"], ["b"])
    return root / "vae", root / "scenes"


@pytest.mark.slow
def test_stage_writes_the_summary_raw_results_and_five_figures(stage_inputs, tmp_path, monkeypatch):
    from stages import analysis as stage

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no backbone file: LPIPS on marked stand-ins
    vae_dir, scenes_dir = stage_inputs
    out, metrics_path, plots_dir = tmp_path / "data", tmp_path / "metrics" / "analysis.json", tmp_path / "plots"
    result = stage.run(stage_params(), vae_dir, scenes_dir, out, metrics_path, plots_dir, progress=False)
    metrics = json.loads(metrics_path.read_text())
    assert metrics == json.loads(json.dumps(analysis.json_safe(result["metrics"])))
    assert metrics["clips"] == ["b[0:13]", "b[13:26]"] and metrics["latent_shape"] == [4, 3, 2, 2]
    locality = metrics["locality"]
    assert len(locality["mean_by_distance"]) == 4 and locality["rel_tol"] == 1e-3
    assert {"alpha", "C", "r2", "recommended_d_trunc", "eps"} <= set(locality)
    assert set(metrics["gradient_error"]) == {"mse", "lpips"}
    assert metrics["stand_in_weights"] is True and metrics["lpips"]["weights"]["vgg16"] == "stand-in"
    assert metrics["gradient_error"]["lpips"][0]["abs_mean"] > 0  # LPIPS gradients reached the latents
    for table in metrics["gradient_error"].values():
        assert [row["d_trunc"] for row in table] == [0, 1, 2]
    assert metrics["gradient_error"]["lpips"][-1]["total_rel"] < 1e-4  # 5 frames = 2 steps: d_trunc 2 is exact
    assert [row["d_trunc"] for row in metrics["backbone"]["table"]] == [0, 1, 2]
    rows = metrics["resources"]["rows"]
    assert {(r["mode"], r["frames"]) for r in rows} >= {("chopgrad", 5), ("chopgrad", 9), ("full", 5), ("full", 9)}
    assert metrics["spatial"]["boundary_px"] == 8
    assert sorted(p.name for p in plots_dir.iterdir()) == sorted(f"{name}.png" for name in stage.FIGURES)
    assert sorted(p.name for p in out.iterdir()) == ["backbone.json", "grad_error_lpips.json", "grad_error_mse.json",
                                                     "locality.json", "resources.json", "spatial.json"]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary build folders left behind
    assert not (tmp_path / "torch").exists()  # the stand-ins never went into the torch cache


@pytest.mark.parametrize("changes, message", [
    ({"max_distance": 4}, r"analysis.max_distance must be in \[2, 3\]"),
    ({"rel_tol": 1.0}, r"analysis.rel_tol must be in \(0, 1\)"),
    ({"frames": 8}, "analysis.frames must be 1 \\+ 4k"),
    ({"lpips_frames": 13}, "lpips_frames <= frames <= locality_frames"),
    ({"d_trunc": ()}, "analysis.d_trunc and analysis.resource_length_d_trunc must be non-empty"),
    ({"transformer_path": "/no/such/Wan2.1"}, "analysis.transformer_path: transformer path /no/such/Wan2.1 is not"),
    ({"weights": "skip"}, "analysis.weights must be one of official, stand_in, got 'skip'"),
])
def test_stage_params_errors_name_the_key(changes, message):
    with pytest.raises(ValueError, match=message):
        stage_params(**changes)


def test_stage_refuses_bad_inputs_before_any_work(stage_inputs, tmp_path):
    from stages import analysis as stage

    vae_dir, scenes_dir = stage_inputs
    outputs = (tmp_path / "data", tmp_path / "m.json", tmp_path / "plots")
    with pytest.raises(ValueError, match="run the vae stage first"):
        stage.run(stage_params(), tmp_path / "no-vae", scenes_dir, *outputs, progress=False)
    with pytest.raises(ValueError, match="lower analysis.clips or analysis.frames"):
        stage.run(stage_params(clips=3), vae_dir, scenes_dir, *outputs, progress=False)
    assert not any(path.exists() for path in outputs)


def test_stage_with_official_weights_refuses_a_missing_lpips_file(stage_inputs, tmp_path, monkeypatch):
    from chopgrad.weights import MissingWeightsError
    from stages import analysis as stage

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty cache: the VGG16 file is missing
    outputs = (tmp_path / "data", tmp_path / "m.json", tmp_path / "plots")
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        stage.run(stage_params(weights="official"), *stage_inputs, *outputs, progress=False)
    assert not any(path.exists() for path in outputs)


def test_analysis_library_does_not_import_pipeline_tooling():
    import subprocess
    import sys

    code = ("import sys, chopgrad.analysis, chopgrad.analysis.__main__, chopgrad.analysis.models\n"
            "bad = [m for m in ('prefect', 'dvc', 'mlflow', 'yaml', 'stages') if m in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True)

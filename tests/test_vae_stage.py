"""The vae stage's run() on a tiny hand-made scene set, with a tiny VAE and a few iterations."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from stages import vae
from stages.common import scenes, video

TINY = vae.Params(
    source="train", pretrained_path=None, base_dim=4, z_dim=4, dim_mult=(1, 2, 2, 2), num_res_blocks=1,
    temporal_downsample=(False, True, True), clip_frames=5, crop=(16, 16), batch_size=1, iterations=3, lr=1e-3,
    betas=(0.5, 0.9), warmup_iterations=1, lr_schedule="constant", posterior="sample", kl_weight=1e-6, grad_clip=1.0, eval_frames=9, seed=0,
    threads=1,
)


def moving_pattern(frames: int, height: int, width: int, phase: float) -> np.ndarray:  # [T, H, W, 3] uint8
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    channels = [np.sin(0.4 * x + 0.3 * t + phase), np.cos(0.5 * y - 0.2 * t + phase),
                np.sin(0.2 * (x + y) + phase)]
    return (127.5 * (1 + np.stack(channels, axis=-1))).round().astype(np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def scene_set(tmp_path_factory) -> Path:
    """Two training scenes and one test scene of 11 frames of 16 x 24 pixels, with split.json."""
    folder = tmp_path_factory.mktemp("scenes")
    intrinsics = np.array([[20.0, 0, 12], [0, 20.0, 8], [0, 0, 1]])
    for index, name in enumerate(["a", "b", "c"]):
        scenes.write_scene(folder / name, moving_pattern(11, 16, 24, phase=index), intrinsics,
                           np.tile(np.eye(4), (11, 1, 1)))
    scenes.write_split(folder, ["a", "b"], ["c"])
    return folder


def run_stage(folder: Path, scene_set: Path, params: vae.Params) -> dict:
    return vae.run(params, scene_set, folder / "vae", folder / "metrics" / "vae.json", folder / "plots")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scene_set):
    folder = tmp_path_factory.mktemp("trained")
    return folder, run_stage(folder, scene_set, TINY)


def test_run_saves_a_vae_that_reloads_and_decodes(trained):
    from diffusers import AutoencoderKLWan

    folder, result = trained
    files = {p.name for p in (folder / "vae").iterdir()}
    assert files == {"config.json", "diffusion_pytorch_model.safetensors"}
    model = AutoencoderKLWan.from_pretrained(folder / "vae", local_files_only=True)
    assert model.config.base_dim == 4 and model.config.z_dim == 4
    assert len(model.config.latents_mean) == len(model.config.latents_std) == 4
    with torch.no_grad():
        frames = model.decode(torch.zeros(1, 4, 3, 2, 3)).sample  # 3 latent frames -> 1 + 4 * 2
    assert frames.shape == (1, 3, 9, 16, 24)
    assert len(result["losses"]) == TINY.iterations and all(np.isfinite(result["losses"]))


def test_run_writes_metrics_plots_and_a_sample_video(trained):
    folder, result = trained
    metrics = json.loads((folder / "metrics" / "vae.json").read_text())
    assert metrics == result["metrics"]
    assert metrics["test_scenes"] == 1 and metrics["eval_frames"] == 9  # 11 frames -> 1 + 4 * 2
    assert 0 < metrics["test_psnr"] < 100 and 0 < metrics["test_psnr_mean_colour"] < 100
    for figure in result["figures"]:
        assert video.read_image(figure).shape[2] == 3
    sample = video.read_video(result["video"])  # input | reconstruction, side by side
    assert sample.shape == (9, 16, 48, 3)


def test_psnr_is_the_psnr_of_the_saved_model(trained, scene_set):
    """Recompute the metric independently from the files: the reloaded VAE and the test frames."""
    from diffusers import AutoencoderKLWan

    folder, result = trained
    model = AutoencoderKLWan.from_pretrained(folder / "vae", local_files_only=True).eval()
    frames = scenes.load_scene(scene_set / "c").images[:9]  # [9, 16, 24, 3]
    x = torch.from_numpy(frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, 9, 16, 24]
    with torch.no_grad():
        recon = model.decode(model.encode(x).latent_dist.mode()).sample
    recon = ((recon[0].clamp(-1, 1) + 1) * 127.5).round() / 255  # quantised to uint8 as the stage does
    mse = ((recon - x[0].add(1).div(2)) ** 2).mean(dim=(0, 2, 3)).double()  # per frame
    assert result["metrics"]["test_psnr"] == pytest.approx(float((-10 * torch.log10(mse)).mean()), abs=1e-3)


def test_same_seed_same_weights(scene_set):
    videos = list(vae.load_videos(scene_set, "train").values())
    first, again = vae.build_vae(TINY), vae.build_vae(TINY)
    assert vae.train(first, videos, TINY) == vae.train(again, videos, TINY)
    a, b = first.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    fresh, reseeded = vae.build_vae(TINY), vae.build_vae(dataclasses.replace(TINY, seed=1))
    assert not torch.equal(fresh.decoder.conv_out.weight, reseeded.decoder.conv_out.weight)


def test_pretrained_source_copies_the_folder_and_measures_it(trained, scene_set, tmp_path):
    folder, result = trained
    params = dataclasses.replace(TINY, source="pretrained", pretrained_path=str(folder / "vae"))
    copied = run_stage(tmp_path, scene_set, params)
    assert copied["losses"] == []
    assert copied["metrics"]["test_psnr"] == pytest.approx(result["metrics"]["test_psnr"])
    assert (tmp_path / "vae" / "config.json").is_file()


def test_clear_errors(trained, scene_set, tmp_path):
    too_long = dataclasses.replace(TINY, clip_frames=13)
    with pytest.raises(ValueError, match=r"smaller than vae.clip_frames=13 x vae.crop=\[16, 16\]"):
        run_stage(tmp_path, scene_set, too_long)
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is not a VAE folder"):
        vae.save_model(None, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_cosine_schedule_decays_and_mode_trains_on_the_posterior_mean(scene_set):
    videos = list(vae.load_videos(scene_set, "train").values())
    params = dataclasses.replace(TINY, lr_schedule="cosine", posterior="mode", iterations=4, warmup_iterations=0)
    model = vae.build_vae(params)
    seen = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    try:
        vae.train(model, videos, params)
    finally:
        torch.optim.AdamW.step = original
    assert seen == pytest.approx([params.lr * 0.5 * (1 + np.cos(np.pi * k / 4)) for k in range(4)])
    # mode: the decoder sees the posterior mean (no noise): the first loss is the mean's L1 + KL
    sampled = dataclasses.replace(params, posterior="sample")
    mode_losses = vae.train(vae.build_vae(params), videos, params)
    assert mode_losses != vae.train(vae.build_vae(sampled), videos, sampled)
    generator = torch.Generator().manual_seed(params.seed)
    clips = vae.sample_clips(videos, params, generator)
    fresh = vae.build_vae(params)
    posterior = fresh.encode(clips).latent_dist
    first = (fresh.decode(posterior.mode()).sample - clips).abs().mean() \
        + params.kl_weight * posterior.kl().mean() / clips[0].numel()
    assert mode_losses[0] == pytest.approx(first.item(), rel=1e-5)


REPO = Path(__file__).resolve().parents[1]
RECIPE_KEYS = ("source", "pretrained_path")  # the only keys where params.yaml and the recipe differ


def test_params_name_the_recipe_of_the_shipped_vae():
    """params.yaml loads weights/embedded/vae; its training keys are profiles/embedded-vae.yaml's, which made it."""
    from ruamel.yaml import YAML

    shipped = YAML(typ="safe").load((REPO / "params.yaml").read_text())["vae"]
    recipe = YAML(typ="safe").load((REPO / "profiles/embedded-vae.yaml").read_text())["vae"]
    assert shipped["source"] == "pretrained" and shipped["pretrained_path"] == "weights/embedded/vae"
    assert {k: v for k, v in shipped.items() if k not in RECIPE_KEYS} == \
        {k: v for k, v in recipe.items() if k not in RECIPE_KEYS}
    config = json.loads((REPO / "weights/embedded/vae/config.json").read_text())
    assert config["_class_name"] == "AutoencoderKLWan"
    assert (config["base_dim"], config["z_dim"], config["dim_mult"]) == \
        (recipe["base_dim"], recipe["z_dim"], recipe["dim_mult"])
    assert config["temperal_downsample"] == recipe["temporal_downsample"]


def test_shipped_weights_are_the_recorded_ones():
    """weights/embedded/README.md records the sha256 of the file the recipe's command wrote."""
    import hashlib
    import re

    readme = (REPO / "weights/embedded/README.md").read_text()
    recorded = re.search(r"sha256 ([0-9a-f]{64})\s+vae/diffusion_pytorch_model\.safetensors", readme)
    assert recorded, "weights/embedded/README.md must record the VAE's sha256"
    data = (REPO / "weights/embedded/vae/diffusion_pytorch_model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == recorded.group(1)

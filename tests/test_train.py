"""The train stage and its components: the restorer, the pixel losses, per-frame decoding, checkpoints.

Everything runs on a tiny random-weight Wan VAE (``base_dim`` 4, 4 latent channels) and a tiny Wan
transformer, on hand-made pairs folders of 9 frames; the pixel losses' backbones are random
stand-ins written into a temporary weight home (``weights: stand_in``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_text_encoder

import chopgrad
import chopgrad.restoration
from chopgrad import losses
from chopgrad.weights import MissingWeightsError
from stages import train
from stages.common import pairs as pairs_io
from stages.common import measure, restoration, training
from stages.common import video as video_io
from stages.common.params import ParamsError, params_from_mapping

METHODS = {name: training.Method(decode, d_trunc, factor) for name, (decode, d_trunc, factor) in {
    "chopgrad_d0": ("chopgrad", 0, 1), "chopgrad_d1": ("chopgrad", 1, 1), "chopgrad_d2": ("chopgrad", 2, 1),
    "latent_mse": (None, None, 1), "latent_mse_2x": (None, None, 2), "per_frame": ("per_frame", None, 1)}.items()}
BASE = {
    "methods": {name: dataclasses.asdict(method) for name, method in METHODS.items()},
    "transformer_path": None, "transformer_dtype": "float32", "num_layers": 1, "num_heads": 2,
    "head_dim": 8, "ffn_dim": 32, "text_dim": 16, "freq_dim": 16, "text_encoder_path": None,
    "caption": "a clean video", "timestep": 200, "iterations": 3, "epochs": None, "clip_frames": 5, "crop": [16, 16], "lr": 1e-3,
    "weight_decay": 0.1, "betas": [0.9, 0.99],
    "loss_nvs": {"latent_mse": 1.0, "lpips_vgg": 10.0},
    "loss_inpainting": {"latent_mse": 1.0, "lpips_vgg": 10.0},
    "loss_sr": {"mse": 1.0, "dists": 0.1}, "loss_driving": {"lpips_vgg": 1.0, "gram": 0.1},
    "schedule": "joint", "reconstruction_iterations": 1, "loss_reconstruction": {"mse": 1.0, "lpips_vgg": 0.1},
    "tiles": [1, 1], "halo": 2, "transformer_lora_rank": 0, "transformer_lora_alpha": 4.0, "decoder_lora_rank": 0,
    "decoder_lora_alpha": 2.0, "decoder_skip": False, "checkpoint_every": 2, "validation_every": 0, "sample_frames": 5,
    "weights": "stand_in", "substitutes": {"lpips_vgg": {"mse": 1.0}, "dists": {"mse": 1.0}, "gram": {"mse": 1.0}},
    "nproc_per_node": 1, "nnodes": 1, "rdzv_endpoint": None, "sequence_parallel": 1,
    "device": "cpu", "mixed_precision": True, "activation_checkpointing": True, "seed": 0,
    "threads": 1,
}


def params(**changes) -> train.Params:
    return params_from_mapping("train", train.Params, {**BASE, **changes})


def moving_pattern(frames: int, height: int, width: int, phase: float) -> np.ndarray:  # [T, H, W, 3] uint8
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    channels = [np.sin(0.4 * x + 0.3 * t + phase), np.cos(0.5 * y - 0.2 * t + phase), np.sin(0.2 * (x + y) + phase)]
    return (127.5 * (1 + np.stack(channels, axis=-1))).round().astype(np.uint8)


def write_inputs(root: Path, tasks=("nvs", "sr"), frames: int = 9, height: int = 16, width: int = 32) -> dict:
    """A tiny VAE folder and one pairs folder per task (2 train + 1 test pairs: noisy input, clean target)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=4, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1] * 4, latents_std=[0.5] * 4)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    rng = np.random.default_rng(0)
    folders = []
    for task in tasks:
        folder = root / "pairs" / task
        with pairs_io.PairsWriter(folder, task, fps=8) as writer:
            for index, split in enumerate(["train", "train", "test"]):
                target = moving_pattern(frames, height, width, phase=index)
                noisy = np.clip(target.astype(int) + rng.integers(-50, 50, target.shape), 0, 255).astype(np.uint8)
                inpainting = pairs_io.APPLICATIONS[task] == "inpainting"
                mask = np.zeros(target.shape[:3], np.uint8)
                mask[:, : height // 2] = 255
                writer.add(f"scene_{index}", split, noisy, target, mask=mask if inpainting else None,
                           lowres=target[:, ::4, ::4].copy() if task == "sr" else None)
            writer.commit()
        folders.append(folder)
    return {"vae": root / "vae", "pairs": folders}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def weight_home(tmp_path_factory):
    """An empty TORCH_HOME (no real weights seen) and a stand-in home the stage fills once."""
    root = tmp_path_factory.mktemp("weights")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root / "empty"))
        patch.setenv("CHOPGRAD_CLIP_HOME", str(root / "empty_clip"))
        yield root / "stand_in"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    """The VAE, ``pairs``: the nvs pairs folder alone (most tests train one task), ``all_pairs``: nvs and sr."""
    written = write_inputs(tmp_path_factory.mktemp("inputs"))
    return {"vae": written["vae"], "pairs": written["pairs"][:1], "all_pairs": written["pairs"]}


def run_stage(folder: Path, inputs: dict, weight_home: Path, method="chopgrad_d1", on_iteration=None, pairs=None,
              **changes) -> dict:
    return train.run(params(**changes), method, inputs["vae"], pairs or inputs["pairs"], folder / "out" / method,
                     folder / "metrics.json", folder / "ckpt" / method, weight_home, on_iteration=on_iteration)


def tiny_model(inputs: dict, **changes) -> restoration.Model:
    p = params(**changes)
    spec = train.model_spec(p, json.loads((inputs["vae"] / "config.json").read_text()))
    spec["text"]["shape"] = [1, 8, p.text_dim]
    return restoration.build_model(spec, inputs["vae"], chopgrad.restoration.fixed_text_embedding(p.text_dim, 8, 4))


def first_clip(inputs: dict, task: str = "nvs"):
    folder = next(f for f in inputs["all_pairs"] if f.name == task)
    plan = train.plan(params(), "chopgrad_d1", [folder], inputs["vae"])
    clips = training.Clips(plan["tasks"][0].train, 5, (16, 16))
    degraded, target, _ = clips.sample(training.sample_generator(0, 0, 0))
    return plan["tasks"][0], (degraded, target)


# ----------------------------------------------------------------------------------------------------------
# The restorer


def test_restorer_output_is_z_hat_minus_the_predicted_velocity():
    transformer = chopgrad.restoration.small_transformer(latent_channels=4, num_layers=1, head_dim=8, text_dim=16,
                                                freq_dim=16, ffn_dim=32, zero_output=False).double()
    model = chopgrad.restoration.Restorer(transformer, chopgrad.restoration.fixed_text_embedding(16, 8, 4).double())
    z_hat = torch.randn(2, 4, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    velocity = model.velocity(z_hat)
    assert velocity.abs().max() > 0
    torch.testing.assert_close(model(z_hat), z_hat - velocity, rtol=0, atol=0)
    # It is the transformer at the fixed timestep 200 on the fixed text condition.
    direct = transformer(z_hat, torch.tensor([200.0, 200.0]), model.text_embedding.double().expand(2, -1, -1),
                         return_dict=False)[0]
    torch.testing.assert_close(velocity, direct, rtol=0, atol=0)
    # A zeroed output projection (the default) makes the untrained restorer the identity.
    identity = chopgrad.restoration.Restorer(chopgrad.restoration.small_transformer(latent_channels=4, text_dim=16),
                                    chopgrad.restoration.fixed_text_embedding(16))
    torch.testing.assert_close(identity(z_hat.float()), z_hat.float(), rtol=0, atol=0)


def test_latent_normalisation_round_trips_and_checks_the_channel_count():
    latents = torch.randn(1, 4, 2, 3, 3, dtype=torch.float64)
    mean, std = [0.1, -0.2, 0.3, 0.0], [0.5, 2.0, 1.0, 0.25]
    normalised = chopgrad.restoration.normalize_latents(latents, mean, std)
    torch.testing.assert_close(normalised[:, 1], (latents[:, 1] + 0.2) / 2.0)
    torch.testing.assert_close(chopgrad.restoration.denormalize_latents(normalised, mean, std), latents)
    with pytest.raises(ValueError, match="3 entries but the latents .* have 4 channels"):
        chopgrad.restoration.normalize_latents(latents, mean[:3], std[:3])


def test_restorer_rejects_latents_it_cannot_take():
    model = chopgrad.restoration.Restorer(chopgrad.restoration.small_transformer(latent_channels=4, text_dim=16),
                                 chopgrad.restoration.fixed_text_embedding(16))
    with pytest.raises(ValueError, match=r"\[B, 4, t, h, w\]"):
        model(torch.zeros(1, 16, 2, 4, 4))
    with pytest.raises(ValueError, match="not a multiple of the transformer's patch size"):
        model(torch.zeros(1, 4, 2, 3, 4))
    with pytest.raises(ValueError, match="text_embedding must be"):
        chopgrad.restoration.Restorer(chopgrad.restoration.small_transformer(latent_channels=4, text_dim=16),
                             chopgrad.restoration.fixed_text_embedding(32))


def test_transformer_folder_is_checked_before_loading(tmp_path):
    with pytest.raises(ValueError, match="is not a folder"):
        chopgrad.restoration.load_transformer(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="holds no WanTransformer3DModel"):
        chopgrad.restoration.load_transformer(tmp_path)
    chopgrad.restoration.small_transformer(latent_channels=4, text_dim=16).save_pretrained(tmp_path / "wan" / "transformer")
    loaded = chopgrad.restoration.load_transformer(tmp_path / "wan")  # the Wan 2.1 folder: subfolder="transformer"
    assert loaded.config.in_channels == 4 and loaded.config.text_dim == 16
    for weights in (tmp_path / "wan" / "transformer").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(ValueError, match="no weights"):
        chopgrad.restoration.load_transformer(tmp_path / "wan")


def test_prompts_are_encoded_as_wan_encodes_them(tmp_path):
    encoder = write_text_encoder(tmp_path)
    caption, prompts = training.text_embeddings(str(tmp_path), "a clean video", 16, ["a room", None, "a room"], seed=0)
    assert caption.shape == (1, chopgrad.restoration.TEXT_LENGTH, 16) and list(prompts) == ["a room"]
    with torch.no_grad():  # Wan: the encoder's states of the prompt's own tokens, zeros after them
        direct = encoder(torch.tensor([[3, 4]]), torch.ones(1, 2, dtype=torch.long)).last_hidden_state
    torch.testing.assert_close(prompts["a room"][0, :2], direct[0], rtol=1e-5, atol=1e-6)
    assert prompts["a room"][0, 2:].abs().max() == 0 and caption[0, 3:].abs().max() == 0
    assert caption[0, :3].abs().min() > 0
    with pytest.raises(ValueError, match="encodes to 16 channels but the transformer takes 32"):
        training.text_embeddings(str(tmp_path), "a clean video", 32, [], seed=0)


# ----------------------------------------------------------------------------------------------------------
# Losses and per-frame decoding


def test_unknown_loss_names_are_rejected_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown loss 'ssim'; known losses: mse, lpips_vgg, dists, gram"):
        losses.PixelLoss({"ssim": 1.0})
    with pytest.raises(ParamsError, match="train.loss_sr: unknown loss 'l1'; known losses: latent_mse, mse"):
        params(loss_sr={"l1": 1.0})
    with pytest.raises(ParamsError, match="train.loss_nvs has no pixel loss"):
        params(loss_nvs={"latent_mse": 1.0})
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        losses.check_loss_weights({"mse": -1.0})


@pytest.mark.parametrize("present", [(), ("vgg16", "lpips_vgg_lin")])
def test_substitute_trains_weightless_losses_only_where_files_are_missing(present, monkeypatch):
    """The embedded default: no loss on a random network; with the real files placed, the paper's losses."""
    from chopgrad import weights

    monkeypatch.setattr(weights, "file_status", lambda name: "official" if name in present else "missing")
    declared = params(weights="substitute")
    effective, substituted = train.apply_substitutes(declared)
    assert effective.weights == "official"  # what remains needs its real files
    if not present:
        assert substituted == {"dists": {"mse": 1.0}, "gram": {"mse": 1.0}, "lpips_vgg": {"mse": 1.0}}
        assert effective.loss_nvs == {"latent_mse": 1.0, "mse": 1.0}
        assert effective.loss_sr == {"mse": 2.0}  # mse 1.0 + dists' substitute
        assert effective.loss_driving == {"mse": 2.0}
        assert effective.loss_reconstruction == {"mse": 2.0}
    else:  # VGG16 and LPIPS's heads present: LPIPS-VGG and Gram stay, DISTS (its own file) is replaced
        assert substituted == {"dists": {"mse": 1.0}}
        assert effective.loss_nvs == declared.loss_nvs and effective.loss_driving == declared.loss_driving
        assert effective.loss_sr == {"mse": 2.0}
    assert train.apply_substitutes(params(weights="stand_in")) == (params(weights="stand_in"), {})


@pytest.mark.parametrize("changes, message", [
    ({"substitutes": {"mse": {"mse": 1.0}}}, "'mse' is not a loss with weight files"),
    ({"substitutes": {"lpips_vgg": {"dists": 1.0}}}, "must be losses without weight files"),
    ({"weights": "substitute", "substitutes": {"lpips_vgg": {"mse": 1.0}}}, r"no entry for \['dists', 'gram'\]"),
])
def test_bad_substitutes_are_refused(changes, message):
    with pytest.raises(ParamsError, match=message):
        params(**changes)


@pytest.mark.slow  # VGG16 and DISTS networks
def test_weighted_pixel_loss_is_the_weighted_sum(weight_home):
    from chopgrad.weights import metric_home

    generator = torch.Generator().manual_seed(0)
    pred, target = (torch.rand(1, 3, 2, 16, 16, generator=generator) * 2 - 1 for _ in range(2))
    with metric_home("stand_in", weight_home, ["lpips_vgg", "dists"]):
        combined = losses.PixelLoss({"mse": 2.0, "lpips_vgg": 3.0, "gram": 0.5, "dists": 0.1})
    assert set(combined.weights) == {"vgg16", "lpips_vgg_lin", "dists"}
    assert combined.weights["vgg16"] == "stand-in"
    value = combined(pred, target)
    parts = {name: float(loss(pred, target)) for name, loss in combined.losses.items()}
    assert parts["mse"] == pytest.approx(float(((pred - target) ** 2).mean()))
    assert float(value) == pytest.approx(2 * parts["mse"] + 3 * parts["lpips_vgg"] + 0.5 * parts["gram"]
                                         + 0.1 * parts["dists"], rel=1e-5)
    assert all(v > 0 for v in parts.values()) and float(combined(target, target)) == pytest.approx(0, abs=1e-5)
    with pytest.raises(ValueError, match="too small for the losses"):
        combined(pred[..., :8, :8], target[..., :8, :8])


def test_per_frame_decoding_drops_the_cache_and_differs_from_chopgrad(inputs):
    model = tiny_model(inputs)
    decoder = model.decoder()
    latents = torch.randn(1, 4, 3, 2, 4, generator=torch.Generator().manual_seed(0))
    full = chopgrad.decode(decoder, latents)
    per_frame = chopgrad.decode(losses.PerFrameDecoder(decoder), latents)
    assert per_frame.shape == full.shape == (1, 3, 9, 16, 32)
    torch.testing.assert_close(per_frame[:, :, :1], full[:, :, :1], rtol=0, atol=0)  # first step: no history anyway
    assert (per_frame[:, :, 1:] - full[:, :, 1:]).abs().max() > 1e-3
    # Each later latent frame decodes as it would alone after a blank history: independent of the others.
    changed = latents.clone()
    changed[:, :, 1] += 1.0
    again = chopgrad.decode(losses.PerFrameDecoder(decoder), changed)
    torch.testing.assert_close(again[:, :, 5:], per_frame[:, :, 5:], rtol=0, atol=0)
    assert (chopgrad.decode(decoder, changed)[:, :, 5:] - full[:, :, 5:]).abs().max() > 1e-3
    # Its pixel-loss gradient is not ChopGrad's either.
    target = torch.zeros_like(full)
    grads = []
    for wrapped in (decoder, losses.PerFrameDecoder(decoder)):
        leaf = latents.clone().requires_grad_(True)
        chopgrad.decode_loss(wrapped, leaf, target, lambda a, b: ((a - b) ** 2).mean(), d_trunc=0).backward()
        grads.append(leaf.grad)
    assert (grads[0] - grads[1]).abs().max() > 1e-6


# ----------------------------------------------------------------------------------------------------------
# Training


def test_a_few_steps_lower_the_loss_on_one_clip(inputs):
    # A problem the tiny random VAE can represent: the target is the decoder's own output for the
    # degraded clip's latents shifted by a constant per channel (one proj_out bias away). The pixel
    # loss alone trains (latent weight 0: with a random VAE, encode(decode(z)) is far from z), and
    # reaches the transformer only through ChopGrad's decode_loss.
    _, (degraded, _) = first_clip(inputs)
    model = tiny_model(inputs)
    with torch.no_grad():
        shift = torch.tensor([3.0, -3.0, 2.0, 0.0]).view(1, 4, 1, 1, 1)
        target = chopgrad.decode(model.decoder(), model.to_decoder(model.encode(degraded) + shift))
    pixel = losses.PixelLoss({"mse": 100.0})
    optimizer = torch.optim.AdamW(model.transformer_trainable().values(), lr=3e-3, betas=(0.9, 0.99))
    history = []
    for _ in range(8):
        result = training.train_iteration(model, METHODS["chopgrad_d1"], 0.0, pixel, (degraded, target), None,
                                          tiles=(1, 1), halo=2, autocast=False)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append(result.loss)
    assert history[-1] < 0.7 * history[0]
    assert all(later < earlier for earlier, later in itertools.pairwise(history))


@pytest.mark.parametrize("lora", [False, True])
def test_gradients_reach_exactly_the_trainable_parameters(inputs, weight_home, lora):
    from chopgrad.weights import metric_home

    _, clip = first_clip(inputs)
    changes = {"transformer_lora_rank": 2, "decoder_lora_rank": 2, "decoder_skip": True} if lora else {}
    model = tiny_model(inputs, **changes)
    with metric_home("stand_in", weight_home, ["lpips_vgg"]):
        pixel = losses.PixelLoss({"lpips_vgg": 10.0})
    if lora:  # LoRA B starts at zero: give it values so that every LoRA factor gets a gradient
        with torch.no_grad():
            for name, param in [*model.transformer.named_parameters(), *model.decoder_module.named_parameters()]:
                if "lora_B" in name:
                    param.normal_(0, 0.1)
    else:  # the zeroed output projection blocks every other gradient on the first step
        torch.nn.init.normal_(model.transformer.proj_out.weight, std=0.1)
    training.train_iteration(model, METHODS["chopgrad_d1"], 1.0, pixel, clip, None, tiles=(1, 1), halo=2,
                             autocast=False)
    trainable = {**{f"t.{k}": v for k, v in model.transformer_trainable().items()},
                 **{f"v.{k}": v for k, v in model.decoder_trainable().items()}}
    modules = (model.transformer, model.decoder_module, pixel)
    frozen = [p for m in modules for p in m.parameters() if not p.requires_grad]
    assert trainable and frozen
    if lora:  # transformer LoRA, decoder LoRA and Mirage's fusion conv, the decoder's through ChopGrad
        assert all("lora_" in name for name in trainable if name != "v.fusion.weight" and name != "v.fusion.bias")
        assert {"v.fusion.weight", "v.fusion.bias"} <= set(trainable)
        assert any(name.startswith("v.vae.decoder.") and "lora_" in name for name in trainable)
    else:
        assert len(trainable) == len(list(model.transformer.parameters())) and not model.decoder_trainable()
    missing = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"trainable parameters without a gradient: {missing[:5]}"
    assert all(p.grad is None for p in frozen)


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return {task.name: load_file(str(task / restoration.MODEL_FILE)) for task in sorted(folder.iterdir())}


@pytest.mark.slow
def test_an_interrupted_run_resumes_and_ends_with_the_same_weights(tmp_path, inputs, weight_home):
    changes = {"pairs": inputs["all_pairs"], "iterations": 4, "checkpoint_every": 2}
    straight = run_stage(tmp_path / "straight", inputs, weight_home, **changes)

    class Killed(Exception):
        pass

    def stop(task, step):  # dies after step 3 of the second task: the step after its checkpoint is lost
        if task == "sr" and step == 3:
            raise Killed

    with pytest.raises(Killed):
        run_stage(tmp_path / "resumed", inputs, weight_home, on_iteration=stop, **changes)
    ckpt_dir = tmp_path / "resumed" / "ckpt" / "chopgrad_d1"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["nvs.safetensors", "sr.safetensors"]
    # Each task's folder is swapped in whole when it is done: nvs is in, nothing of sr is half-written.
    assert sorted(p.name for p in (tmp_path / "resumed" / "out" / "chopgrad_d1").iterdir()) == ["nvs"]
    resumed = run_stage(tmp_path / "resumed", inputs, weight_home, **changes)
    assert resumed["tasks"]["nvs"]["resumed_from_iteration"] == 4  # finished before: not trained again
    assert resumed["tasks"]["sr"]["resumed_from_iteration"] == 2
    assert not ckpt_dir.exists()  # removed once the outputs are in place
    for task in ("nvs", "sr"):
        assert [h["loss"] for h in resumed["tasks"][task]["history"]] == \
               [h["loss"] for h in straight["tasks"][task]["history"]]
    expected = _weights(tmp_path / "straight" / "out" / "chopgrad_d1")
    got = _weights(tmp_path / "resumed" / "out" / "chopgrad_d1")
    assert expected.keys() == got.keys()
    for task in expected:
        assert expected[task].keys() == got[task].keys()
        for name in expected[task]:
            assert torch.equal(expected[task][name], got[task][name]), (task, name)
    assert file_md5s(tmp_path / "resumed" / "out") == file_md5s(tmp_path / "straight" / "out")  # train.json too
    metrics = json.loads((tmp_path / "resumed" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"nvs", "sr"} and metrics["tasks"]["sr"]["resumed_from_iteration"] == 2
    assert metrics["tasks"]["sr"]["peak_memory_bytes"] is None and metrics["tasks"]["sr"]["peak_rss_bytes"] > 0


def file_md5s(folder: Path) -> dict[str, str]:
    """md5 of every file under ``folder`` by relative path: what DVC hashes a folder output by."""
    return {path.relative_to(folder).as_posix(): hashlib.md5(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


@pytest.mark.slow  # two training runs
def test_a_rerun_with_the_same_inputs_writes_the_same_bytes(tmp_path, inputs, weight_home):
    # DVC hashes the outputs: a measured time inside one would rerun infer and evaluate after every train run.
    runs = [run_stage(tmp_path / name, inputs, weight_home, pairs=inputs["all_pairs"], iterations=2) for name in "ab"]
    first, second = (file_md5s(tmp_path / name / "out") for name in "ab")
    assert first == second
    assert {"chopgrad_d1/nvs/train.json", "chopgrad_d1/sr/sample.mp4", "chopgrad_d1/sr/model.safetensors"} <= set(first)
    record = json.loads((tmp_path / "a" / "out" / "chopgrad_d1" / "nvs" / "train.json").read_text())
    measured = {"train_seconds", "seconds_per_iteration", "clip_frames_per_second", "peak_memory_bytes",
                "peak_rss_bytes", "device", "resumed_from_iteration"}
    assert not measured & set(record) and record["final_loss"] > 0  # the losses stay: deterministic on CPU
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert measured <= set(metrics["tasks"]["nvs"]) and metrics["tasks"]["nvs"]["train_seconds"] > 0
    assert {k: v for k, v in metrics["tasks"]["nvs"].items() if k not in measured} == record  # and the times
    assert runs[0]["tasks"]["sr"]["train_seconds"] == metrics["tasks"]["sr"]["train_seconds"]


def test_validation_pairs_give_a_psnr_curve_and_stay_out_of_training(tmp_path, inputs, weight_home):
    """Pairs of the validation split (DL3DV's 5 scenes) are restored every validation_every iterations and at
    the end; their PSNR is in the history and train.json; training never draws them."""
    folder = tmp_path / "pairs" / "nvs"
    shutil.copytree(inputs["pairs"][0], folder)
    manifest = json.loads((folder / "pairs.json").read_text())
    validation = {**manifest["pairs"][2], "scene": "scene_9", "split": "validation"}
    for key in ("input", "target"):
        shutil.copytree(folder / manifest["pairs"][2][key], folder / "validation" / "scene_9" / key)
        validation[key] = f"validation/scene_9/{key}"
    manifest["pairs"].append(validation)
    (folder / "pairs.json").write_text(json.dumps(manifest))
    result = run_stage(tmp_path, inputs, weight_home, method="latent_mse", pairs=[folder], iterations=5,
                       validation_every=2)
    history = result["tasks"]["nvs"]["history"]
    assert [h["iteration"] for h in history if "validation_psnr" in h] == [2, 4, 5]
    model = restoration.load_model(tmp_path / "out" / "latent_mse" / "nvs", inputs["vae"])
    pair = pairs_io.load_pairs(folder, "validation")[0]
    read = lambda key: np.stack([video_io.read_image(p) for p in video_io.list_frames(pair[key])[:5]])
    output, _ = restoration.restore_video(model, read("input"))
    record = json.loads((tmp_path / "out" / "latent_mse" / "nvs" / "train.json").read_text())
    assert record["final_validation_psnr"] == history[-1]["validation_psnr"] == pytest.approx(
        measure.psnr(output, read("target")), abs=1e-3)
    assert record["validation_pairs"] == 1
    plan = train.plan(params(), "latent_mse", [folder], inputs["vae"])
    assert [p["scene"] for p in plan["tasks"][0].train] == ["scene_0", "scene_1"]  # never trained on
    off = run_stage(tmp_path / "off", inputs, weight_home, method="latent_mse", pairs=[folder], iterations=2)
    assert not any("validation_psnr" in h for h in off["tasks"]["nvs"]["history"])


def test_a_checkpoint_of_other_params_is_not_resumed(tmp_path, inputs, weight_home):
    def stop(task, step):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path, inputs, weight_home, method="latent_mse", on_iteration=stop, iterations=4)
    result = run_stage(tmp_path, inputs, weight_home, method="latent_mse", iterations=4, lr=2e-3)
    assert result["tasks"]["nvs"]["resumed_from_iteration"] == 0


def test_methods_train_what_they_say(tmp_path, inputs, weight_home):
    twice = run_stage(tmp_path, inputs, weight_home, method="latent_mse_2x", iterations=2)["tasks"]["nvs"]
    assert twice["iterations"] == 4 and twice["final_pixel_loss"] is None and twice["pixel_losses"] == {}
    per_frame = run_stage(tmp_path, inputs, weight_home, method="per_frame", iterations=1)["tasks"]["nvs"]
    assert per_frame["decoding"] == "per_frame" and per_frame["final_pixel_loss"] > 0
    assert per_frame["stand_in_weights"] is True


MIRAGE = {"schedule": "mirage", "reconstruction_iterations": 2, "iterations": 2, "checkpoint_every": 1, "decoder_skip": True,
          "decoder_lora_rank": 2, "transformer_lora_rank": 2}


def _snapshot(model: restoration.Model) -> dict[str, torch.Tensor]:
    weights = {f"decoder.{k}": v for k, v in model.decoder_weights().items()}
    weights.update({f"transformer.{k}": v for k, v in model.transformer.named_parameters() if "lora_" in k})
    return {k: v.detach().clone() for k, v in weights.items()}


def _changed(before: dict, after: dict) -> set[str]:
    kinds = set()
    for name, value in before.items():
        if not torch.equal(value, after[name]):
            kinds.add("fusion" if name.startswith("decoder.fusion.") else
                      next(part for part in ("reconstruction", "harmonization", "transformer") if f".{part}" in name
                           or name.startswith(part)))
    return kinds


def test_the_mirage_schedule_trains_each_phase_s_weights_in_turn(tmp_path, inputs, weight_home, monkeypatch):
    snapshots = []
    original = train._set_phase

    def spy(model, phase):  # a snapshot of the weights as each phase begins
        snapshots.append((phase, _snapshot(model), model))
        original(model, phase)

    monkeypatch.setattr(train, "_set_phase", spy)
    result = run_stage(tmp_path, inputs, weight_home, **MIRAGE)["tasks"]["nvs"]
    (first, start, model), (second, middle, _) = snapshots
    assert (first, second) == ("reconstruction", "harmonization")
    end = _snapshot(model)
    assert _changed(start, middle) == {"fusion", "reconstruction"}  # B.4: fusion blocks + reconstruction LoRA
    assert _changed(middle, end) == {"harmonization", "transformer"}  # then the transformer LoRA + second LoRA
    assert [h["phase"] for h in result["history"]] == ["reconstruction"] * 2 + ["harmonization"] * 2
    assert "latent" not in result["history"][0] and result["history"][-1]["latent"] > 0
    assert result["schedule"] == "mirage" and result["reconstruction_iterations"] == 2
    assert result["final_reconstruction_loss"] > 0
    saved = restoration.load_model(tmp_path / "out" / "chopgrad_d1" / "nvs", inputs["vae"])  # both LoRAs, the fusion
    for name, value in _snapshot(saved).items():
        assert torch.equal(value, end[name]), name


@pytest.mark.slow
def test_a_mirage_run_killed_at_the_phase_switch_resumes_to_the_same_weights(tmp_path, inputs, weight_home):
    straight = run_stage(tmp_path / "straight", inputs, weight_home, **MIRAGE)

    def stop(task, step):  # the checkpoint of the last reconstruction step is written, then it dies
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_stage(tmp_path / "resumed", inputs, weight_home, on_iteration=stop, **MIRAGE)
    resumed = run_stage(tmp_path / "resumed", inputs, weight_home, **MIRAGE)
    assert resumed["tasks"]["nvs"]["resumed_from_iteration"] == 2
    assert [h["loss"] for h in resumed["tasks"]["nvs"]["history"]] == \
           [h["loss"] for h in straight["tasks"]["nvs"]["history"]]
    expected, got = (_weights(tmp_path / run / "out" / "chopgrad_d1")["nvs"] for run in ("straight", "resumed"))
    assert expected.keys() == got.keys() and any("harmonization" in k for k in got)
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.parametrize("changes, pattern", [
    ({"decoder_skip": False}, r"schedule 'mirage' .* set train.decoder_skip: true"),
    ({"decoder_lora_rank": 0, "transformer_lora_rank": 0}, "set train.decoder_lora_rank > 0, train.transformer_lora_rank > 0"),
    ({"reconstruction_iterations": 0}, "train.reconstruction_iterations must be >= 1"),
    ({"loss_reconstruction": {"latent_mse": 1.0}}, "the reconstruction phase has no transformer"),
    ({"loss_reconstruction": {"mse": 0.0}}, "train.loss_reconstruction needs a pixel loss with a weight > 0"),
])
def test_mirage_settings_that_cannot_work_are_rejected(changes, pattern):
    with pytest.raises(ParamsError, match=pattern):
        params(**{**MIRAGE, **changes})


# ----------------------------------------------------------------------------------------------------------
# Rejected before training starts


@pytest.mark.parametrize("method, changes, pattern", [
    ("chopgrad_d3", {}, "unknown method 'chopgrad_d3'; train.methods declares chopgrad_d0"),
    ("chopgrad_d1", {"tiles": [3, 1]}, r"train.tiles \[3, 1\] are more than the latent crop 2x2"),
    ("chopgrad_d1", {"crop": [24, 24]}, r"train.crop \[24, 24\] must be multiples of 16"),
    ("chopgrad_d1", {"crop": [16, 32], "tiles": [2, 4]}, "tiles of 8 pixels .* too small for the nvs losses"),
    ("chopgrad_d1", {"clip_frames": 13}, "is smaller than train.clip_frames=13"),
    ("chopgrad_d1", {"transformer_path": "/nowhere/Wan2.1"}, "is not a folder"),
    ("chopgrad_d1", {"text_encoder_path": "/nowhere"}, "has no tokenizer/ folder"),
    ("chopgrad_d1", {"nproc_per_node": 2, "sequence_parallel": 2, "clip_frames": 1},
     r"train.sequence_parallel 2 must divide the 1 transformer tokens of a training clip"),
])
def test_bad_configurations_are_rejected_before_training(tmp_path, inputs, method, changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        train.run(params(**changes), method, inputs["vae"], inputs["pairs"], tmp_path / "out", tmp_path / "m.json",
                  tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("changes, pattern", [
    ({"nproc_per_node": 0}, "train.nproc_per_node must be >= 1"),
    ({"nproc_per_node": 2, "sequence_parallel": 3}, ("train.sequence_parallel 3 must divide the processes of a run, "
                                                     "train.nproc_per_node x train.nnodes = 2")),
    ({"nnodes": 2}, "train.nnodes > 1 needs train.rdzv_endpoint"),
    ({"nproc_per_node": 2, "sequence_parallel": 2, "num_heads": 3}, "must divide train.num_heads 3"),
])
def test_process_settings_that_cannot_work_are_rejected(changes, pattern):
    with pytest.raises(ParamsError, match=pattern):
        params(**changes)


def test_the_stage_starts_torchrun_with_the_processes_of_params():
    single = params(nproc_per_node=4, sequence_parallel=4, num_heads=4)
    command = train.torchrun_command(single, "chopgrad_d1", ["--params", "p.yaml"])
    assert command[1:] == ["-m", "torch.distributed.run", "--nproc-per-node=4", "--nnodes=1", "--standalone",
                           "-m", "stages.train", "--params", "p.yaml"]
    assert (single.world_size, single.data_parallel) == (4, 1)
    nodes = params(nproc_per_node=8, nnodes=2, rdzv_endpoint="node0:29500", sequence_parallel=8, num_heads=8)
    assert train.torchrun_command(nodes, "chopgrad_d1", [])[4:8] == [
        "--nnodes=2", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29500", "--rdzv-id=chopgrad-train-chopgrad_d1"]
    assert (nodes.world_size, nodes.data_parallel) == (16, 2)


def test_a_run_started_with_other_processes_than_params_is_refused(tmp_path, inputs, monkeypatch):
    monkeypatch.setattr(train.distributed, "init", lambda device=None: train.distributed.DistInfo(
        0, 2, 0, torch.device("cpu"), "gloo"))
    with pytest.raises(ValueError, match="2 processes were started but train.nproc_per_node x train.nnodes is 1"):
        train.run(params(), "latent_mse", inputs["vae"], inputs["pairs"], tmp_path / "out", tmp_path / "m.json",
                  tmp_path / "ckpt")
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # a 2-process torchrun
def test_two_ranks_on_one_sample_train_as_one_process(tmp_path, inputs, weight_home):
    """Issue 17.1-3: nproc_per_node 2 with sequence_parallel 2 (batch 1): the stage starts torchrun itself,
    both ranks train on the same clips, split by tokens and tiles; the losses are the single process's."""
    import os
    import subprocess
    import sys

    from ruamel.yaml import YAML

    changes = {"crop": [16, 32], "tiles": [1, 2], "iterations": 2, "checkpoint_every": 2}
    expected = run_stage(tmp_path / "single", inputs, weight_home, **changes)["tasks"]["nvs"]
    section = {**BASE, **changes, "nproc_per_node": 2, "sequence_parallel": 2}
    with (tmp_path / "params.yaml").open("w") as handle:
        YAML(typ="safe", pure=True).dump({"train": section}, handle)
    repo = Path(__file__).resolve().parent.parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(repo)}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "stages.train", "--params", str(tmp_path / "params.yaml"), "--method", "chopgrad_d1",
               "--vae", str(inputs["vae"]), "--pairs", *map(str, inputs["pairs"]), "--out", str(tmp_path / "out"),
               "--metrics", str(tmp_path / "metrics.json"), "--checkpoints", str(tmp_path / "ckpt"),
               "--stand-in-home", str(weight_home)]
    done = subprocess.run(command, cwd=repo, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert (metrics["world_size"], metrics["sequence_parallel"], metrics["batch"]) == (2, 2, 1)
    record = json.loads((tmp_path / "out" / "nvs" / "train.json").read_text())
    assert record["final_loss"] == pytest.approx(expected["final_loss"], rel=1e-4)
    assert record["final_pixel_loss"] == pytest.approx(expected["final_pixel_loss"], rel=1e-4)


def test_a_checkpoint_path_that_is_a_file_is_rejected_before_training(tmp_path, inputs):
    (tmp_path / "ckpt").write_text("not a folder")
    with pytest.raises(ValueError, match="--checkpoints .*ckpt is a file: pass a folder"):
        train.run(params(), "latent_mse", inputs["vae"], inputs["pairs"], tmp_path / "out", tmp_path / "m.json",
                  tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("entry, pattern", [
    ({"decode": "chopgrad", "d_trunc": None, "iterations_factor": 1}, "chopgrad_d9: d_trunc is set for decode "
                                                                        "'chopgrad' only"),
    ({"decode": None, "d_trunc": 1, "iterations_factor": 1}, "got decode None with d_trunc 1"),
    ({"decode": "chopgrad", "d_trunc": -1, "iterations_factor": 1}, "d_trunc must be >= 0"),
    ({"decode": "chopgrad", "d_trunc": 1, "iterations_factor": -1}, "iterations_factor must be >= 0"),
    ({"decode": "chopgrad", "d_trunc": 1, "iterations_factor": 0}, "iterations_factor 0 .* takes decode null"),
    ({"decode": "tiled", "d_trunc": 1, "iterations_factor": 1}, "train.methods.chopgrad_d9.decode must be one of"),
    ({"decode": "chopgrad", "d_trunc": 1}, r"missing key\(s\) train.methods.chopgrad_d9.iterations_factor"),
])
def test_bad_method_entries_are_rejected_naming_the_method(entry, pattern):
    with pytest.raises(ParamsError, match=pattern):
        params(methods={**BASE["methods"], "chopgrad_d9": entry})


def test_tiles_that_fit_are_accepted(inputs):
    planned = train.plan(params(crop=[16, 32], tiles=[1, 2]), "chopgrad_d1", inputs["pairs"], inputs["vae"])
    assert [task.name for task in planned["tasks"]] == ["nvs"] and planned["size_multiple"] == 16


def test_missing_folders_and_weights_are_rejected_before_training(tmp_path, inputs, monkeypatch):
    with pytest.raises(ValueError, match="has no config.json"):
        train.run(params(), "chopgrad_d1", tmp_path / "no_vae", inputs["pairs"], tmp_path / "o", tmp_path / "m",
                  tmp_path / "c")
    with pytest.raises(pairs_io.PairsError, match="pairs.json not found"):
        train.run(params(), "chopgrad_d1", inputs["vae"], [tmp_path / "no_pairs"], tmp_path / "o", tmp_path / "m",
                  tmp_path / "c")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(MissingWeightsError, match="vgg16-397923af.pth"):
        train.run(params(weights="official"), "chopgrad_d1", inputs["vae"], inputs["pairs"], tmp_path / "o",
                  tmp_path / "m", tmp_path / "c")
    assert not (tmp_path / "o").exists() and not (tmp_path / "c").exists()
    with pytest.raises(ParamsError, match="train.clip_frames must be >= 1"):
        params(clip_frames=0)
    with pytest.raises(ValueError, match=r"train.clip_frames 8 must be 1 \+ 4k frames for the VAE"):
        train.plan(params(clip_frames=8), "chopgrad_d1", inputs["pairs"], inputs["vae"])
    with pytest.raises(ValueError, match="the pairs folders need distinct names"):
        train.plan(params(), "chopgrad_d1", inputs["pairs"] * 2, inputs["vae"])
    with pytest.raises(ValueError, match="holds 'nvs' pairs but the experiment's task is 'sr'"):
        train.plan(params(), "chopgrad_d1", inputs["pairs"], inputs["vae"], task="sr")
    with pytest.raises(ParamsError, match="'bfloat16' stores a frozen base for a LoRA: set train.transformer_lora_rank > 0"):
        params(transformer_dtype="bfloat16")
    params(transformer_dtype="bfloat16", transformer_lora_rank=4)  # the one-GPU LoRA setting


def test_saved_model_rebuilds_to_the_same_outputs(tmp_path, inputs, weight_home):
    from safetensors.torch import load_file

    run_stage(tmp_path, inputs, weight_home, iterations=1, transformer_lora_rank=2, decoder_lora_rank=2, decoder_skip=True)
    folder = tmp_path / "out" / "chopgrad_d1" / "nvs"
    spec = json.loads((folder / restoration.SPEC_FILE).read_text())
    assert spec["transformer_lora"] == {"rank": 2, "alpha": 4.0}
    assert spec["decoder_lora"] == {"rank": 2, "alpha": 2.0, "adapters": [restoration.DECODER_ADAPTER]}
    assert spec["decoder_skip"] is True
    saved = load_file(str(folder / restoration.MODEL_FILE))
    assert saved["decoder.fusion.weight"].abs().max() > 0  # trained away from its zero start
    assert any(".lora_" in k for k in saved if k.startswith("decoder.vae.decoder."))
    first, second = restoration.load_model(folder, inputs["vae"]), restoration.load_model(folder, inputs["vae"])
    for name, param in first.decoder_trainable().items():
        assert torch.equal(param, saved[f"decoder.{name}"]), name
    frames = moving_pattern(5, 16, 32, 0.5)
    out_a, timings = restoration.restore_video(first, frames)
    out_b, _ = restoration.restore_video(second, frames)
    np.testing.assert_array_equal(out_a, out_b)
    assert out_a.shape == frames.shape and set(timings) == {"encode_seconds", "transformer_seconds", "decode_seconds"}
    odd = moving_pattern(7, 12, 20, 0.5)  # padded to 9 frames of 16 x 32 inside, cut back
    assert restoration.restore_video(first, odd)[0].shape == odd.shape


def test_a_pretrained_transformer_folder_trains_and_saves_only_its_trained_weights(tmp_path, inputs, weight_home):
    # A stand-in for a Wan 2.1 diffusers folder: a small transformer saved under transformer/.
    chopgrad.restoration.small_transformer(latent_channels=4, num_layers=1, head_dim=8, ffn_dim=32, text_dim=16,
                                  freq_dim=16, zero_output=False).save_pretrained(tmp_path / "wan" / "transformer")
    run_stage(tmp_path, inputs, weight_home, method="latent_mse", iterations=1, transformer_path=str(tmp_path / "wan"),
              transformer_lora_rank=2)
    folder = tmp_path / "out" / "latent_mse" / "nvs"
    spec = json.loads((folder / restoration.SPEC_FILE).read_text())
    assert spec["transformer"] == {"source": "pretrained", "path": str((tmp_path / "wan").resolve()),
                                   "family": "wan", "dtype": "float32"}
    saved = _weights(tmp_path / "out" / "latent_mse")["nvs"]
    assert saved and all(".lora_" in k for k in saved if k != "text_embedding")  # the base is reloaded, not copied
    model = restoration.load_model(folder, inputs["vae"])
    for name, param in model.transformer_trainable().items():
        assert torch.equal(param, saved[f"transformer.{name}"]), name


def test_params_section_in_params_yaml_is_valid():
    from stages.common.params import load_params

    repo = Path(__file__).resolve().parents[1]
    section = load_params("train", train.Params, repo / "params.yaml")
    assert dataclasses.asdict(section)["loss_nvs"]["lpips_vgg"] == 100.0  # supplement C.2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bf16 autocast, checkpointing)")])])
def test_one_gpu_settings_train_and_restore(tmp_path, inputs, weight_home, device):
    # The settings of docs/training.md's one-GPU command, at toy size: train.device cuda (a bare "cuda"),
    # bf16 autocast, activation checkpointing, a LoRA on a bf16 base, a decoder LoRA through ChopGrad.
    # On CPU the same run without autocast and checkpointing (no-ops there): the bf16 base with float32 LoRA.
    record = run_stage(tmp_path, inputs, weight_home, device=device, transformer_dtype="bfloat16",
                       transformer_lora_rank=4, decoder_lora_rank=2, iterations=2)
    task = record["tasks"]["nvs"]
    assert task["iterations"] == 2 and all(math.isfinite(h["loss"]) for h in task["history"])
    assert (task["peak_memory_bytes"] or 0) > 0 if device == "cuda" else task["peak_rss_bytes"] > 0
    model = restoration.load_model(tmp_path / "out" / "chopgrad_d1" / "nvs", inputs["vae"], device)
    assert {p.dtype for n, p in model.transformer.named_parameters() if ".lora_" in n} == {torch.float32}
    frames = moving_pattern(5, 16, 32, 0.0)
    output, timings = restoration.restore_video(model, frames, autocast=True)
    assert output.shape == frames.shape and output.dtype == np.uint8 and timings["transformer_seconds"] > 0

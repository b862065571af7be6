"""Table 1 on a CogVideoX backbone: DOVE's one-step restorer, its checkpoint layout, train -> infer -> evaluate.

A tiny random-weight stand-in of DOVE's checkpoint (a diffusers CogVideoX pipeline folder:
``transformer/`` a CogVideoX 1.5-style ``CogVideoXTransformer3DModel`` with ``patch_size_t`` 2,
``vae/`` an ``AutoencoderKLCogVideoX``, ``scheduler/`` DOVE's ``CogVideoXDPMScheduler`` settings) goes
through the stages as the real one would: the ``dove`` method (``iterations_factor`` 0) is the checkpoint
as it is, the DOVE row of Table 1; ``chopgrad_d1`` fine-tunes it through ChopGrad on the sr pairs.
Numbers on random weights are no result: only the plumbing and the conventions are tested.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from test_train import BASE, METHODS, write_inputs

import chopgrad
import chopgrad.restoration
from stages import evaluate, infer, train
from stages.common import restoration
from stages.common.params import ParamsError, params_from_mapping

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TEXT_DIM, TEXT_LENGTH = 32, 8


def write_dove(root: Path, patch_size_t: int | None = 2) -> Path:
    """A DOVE-layout folder (model_index.json, transformer/, vae/, scheduler/) with tiny random weights."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    torch.manual_seed(0)
    folder = root / "dove"
    CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, time_embed_dim=16,
        text_embed_dim=TEXT_DIM, num_layers=1, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
        patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=TEXT_LENGTH,
        use_rotary_positional_embeddings=True, use_learned_positional_embeddings=False,
    ).save_pretrained(folder / "transformer", safe_serialization=True)
    AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 4, up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 16, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, scaling_factor=0.7,
    ).save_pretrained(folder / "vae", safe_serialization=True)
    # CogVideoX 5B's scheduler (diffusers' conversion script: snr_shift_scale 1.0 for 5B), as DOVE loads it.
    CogVideoXDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, snr_shift_scale=1.0,
                          rescale_betas_zero_snr=True, prediction_type="v_prediction",
                          timestep_spacing="trailing").save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "CogVideoXPipeline"}))
    return folder


@pytest.fixture(scope="module")
def dove(tmp_path_factory) -> Path:
    return write_dove(tmp_path_factory.mktemp("dove"))


@pytest.fixture(scope="module")
def sr_pairs(tmp_path_factory) -> Path:
    return write_inputs(tmp_path_factory.mktemp("sr"), tasks=("sr",), frames=9, height=32, width=32)["pairs"][0]


def dove_params(dove: Path, **changes) -> train.Params:
    methods = {name: dataclasses.asdict(method) for name, method in METHODS.items()}
    methods["dove"] = {"decode": None, "d_trunc": None, "iterations_factor": 0}
    values = {**BASE, "methods": methods, "transformer_path": str(dove), "timestep": 399,
              "clip_frames": 9, "crop": [32, 32], "sample_frames": 9, "iterations": 2, "text_dim": TEXT_DIM,
              "loss_sr": {"mse": 1.0}, **changes}
    return params_from_mapping("train", train.Params, values)


def test_the_restored_latent_is_the_inverse_of_v_prediction(dove):
    """DOVE: ``scheduler.get_velocity(v, z_lr, t) = sqrt(a) z_lr - sqrt(1 - a) v``, at t = 399."""
    from diffusers import CogVideoXDPMScheduler

    scheduler = CogVideoXDPMScheduler.from_pretrained(dove, subfolder="scheduler")
    alpha = chopgrad.restoration.dove_alpha(dove)
    assert alpha == pytest.approx(float(scheduler.alphas_cumprod[399]))
    assert alpha == pytest.approx(0.3935, abs=1e-4)  # CogVideoX 5B's betas with zero terminal SNR
    transformer = chopgrad.restoration.load_transformer(dove)
    restorer = chopgrad.restoration.CogVideoXRestorer(transformer, torch.randn(1, TEXT_LENGTH, TEXT_DIM), alpha=alpha)
    z = torch.randn(1, 4, 3, 4, 4)
    v = restorer.velocity(z)
    expected = scheduler.get_velocity(v.permute(0, 2, 1, 3, 4), z.permute(0, 2, 1, 3, 4), torch.tensor([399]))
    torch.testing.assert_close(restorer(z), expected.permute(0, 2, 1, 3, 4))


def test_odd_latent_frames_get_the_first_frame_repeated_in_front(dove):
    """CogVideoX 1.5 patches 2 latent frames together: DOVE prepends a copy of the first latent frame."""
    transformer = chopgrad.restoration.load_transformer(dove)
    restorer = chopgrad.restoration.CogVideoXRestorer(transformer, torch.randn(1, TEXT_LENGTH, TEXT_DIM), alpha=0.4)
    z = torch.randn(1, 4, 3, 4, 4)
    padded = torch.cat([z[:, :, :1], z], dim=2)
    seen = []
    transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["hidden_states"]),
                                          with_kwargs=True)
    velocity = restorer.velocity(z)
    torch.testing.assert_close(seen[0], padded.permute(0, 2, 1, 3, 4))
    assert velocity.shape == z.shape


def test_clip_lengths_follow_the_vae(dove, sr_pairs, tmp_path):
    """CogVideoX's encoder takes 1, 8k or 8k + 1 frames (the paper fine-tunes DOVE on 24); Wan's 1 + 4k."""
    with pytest.raises(ValueError, match=r"train.clip_frames 5 must be 1, 8k or 8k \+ 1 \(CogVideoX\) frames"):
        train.plan(dove_params(dove, clip_frames=5), "chopgrad_d1", [sr_pairs], dove / "vae")
    assert train.plan(dove_params(dove, clip_frames=8), "chopgrad_d1", [sr_pairs], dove / "vae")["tasks"]
    wan = write_inputs(tmp_path, tasks=("sr",), frames=9)
    with pytest.raises(ValueError, match=r"train.clip_frames 8 must be 1 \+ 4k frames"):
        train.plan(dove_params(dove, transformer_path=None, clip_frames=8, crop=[16, 16], sample_frames=5, text_dim=16),
                   "chopgrad_d1", wan["pairs"], wan["vae"])
    with pytest.raises(ParamsError, match="iterations_factor 0 writes the starting model untrained"):
        dove_params(dove, methods={"bad": {"decode": "chopgrad", "d_trunc": 1, "iterations_factor": 0}})


@pytest.mark.slow  # two trainings, inference and evaluation on the tiny CogVideoX
def test_table_1_runs_on_a_dove_checkpoint(dove, sr_pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    params = dove_params(dove)
    records = {}
    for method in ("dove", "chopgrad_d1"):
        result = train.run(params, method, dove / "vae", [sr_pairs], tmp_path / "train" / method,
                           tmp_path / "metrics" / "train" / method / "sr.json", tmp_path / "ckpt" / method)
        records[method] = result["tasks"]["sr"]
    assert records["dove"]["iterations"] == 0 and records["dove"]["final_loss"] is None
    assert records["chopgrad_d1"]["iterations"] == 2 and records["chopgrad_d1"]["final_pixel_loss"] > 0
    from safetensors.torch import load_file

    untouched = load_file(str(tmp_path / "train" / "dove" / "sr" / restoration.MODEL_FILE))
    assert set(untouched) == {"text_embedding"}  # the checkpoint itself holds every weight
    tuned = load_file(str(tmp_path / "train" / "chopgrad_d1" / "sr" / restoration.MODEL_FILE))
    assert any(k.startswith("transformer.") for k in tuned)
    spec = json.loads((tmp_path / "train" / "dove" / "sr" / restoration.SPEC_FILE).read_text())
    assert spec["transformer"]["family"] == "cogvideox" and spec["alpha"] == pytest.approx(0.3935, abs=1e-4)
    assert spec["latents_std"] == pytest.approx([1 / 0.7] * 4)  # CogVideoX's scaling_factor

    infer_params = params_from_mapping("infer", infer.Params, {
        "max_frames": None, "segment_frames": None, "vae_roundtrip": True, "tiles": [1, 1], "halo": 2, "warmup_frames": 1,
        "sample_frames": 9, "device": "cpu", "mixed_precision": True, "threads": 1})
    infer.run(infer_params, tmp_path / "train", dove / "vae", [sr_pairs], tmp_path / "infer",
              tmp_path / "metrics" / "infer.json")
    for method in ("dove", "chopgrad_d1", "vae_roundtrip"):
        assert len(list((tmp_path / "infer" / method / "sr").glob("*/*.png"))) == 9  # one 9-frame test video
    model = restoration.load_model(tmp_path / "train" / "dove" / "sr", dove / "vae")
    assert isinstance(model.restorer, chopgrad.restoration.CogVideoXRestorer) and model.frame_multiple == 8

    eval_params = params_from_mapping("evaluate", evaluate.Params, {
        "metrics": ["psnr", "ssim"], "weights": "skip", "stand_in_home": "unused",
        "table_metrics_only": True, "frames": 0, "model_frames": 0, "vbench_frames": 0, "fvd_clips": 2,
        "fvd_clip_frames": 9, "device": "cpu", "threads": 1})
    evaluate.run(eval_params, tmp_path / "infer", tmp_path / "metrics" / "train", tmp_path / "metrics" / "infer.json",
                 tmp_path / "metrics" / "evaluate.json", tmp_path / "tables", [evaluate.Source("sr", sr_pairs, "sr")])
    table = (tmp_path / "tables" / "table1.md").read_text()
    assert "DOVE [12] / dove (ours)" in table and "ChopGrad (Ours) / chopgrad_d1 (ours)" in table

"""The infer stage: every trained (method, task) model restores its task's test videos, timed.

Models come from the train stage's ``run`` on the tiny inputs of ``test_train.py`` (latent-only
methods, one step: no loss weights needed), one of them with Mirage's skip decoder and a decoder
LoRA so that inference goes through both.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_text_encoder
from test_train import file_md5s, write_inputs
from test_train import params as train_params

from stages import infer, train
from stages.common import pairs as pairs_io
from stages.common import restoration, video
from stages.common.params import ParamsError, params_from_mapping

BASE = {"max_frames": None, "segment_frames": None, "vae_roundtrip": False, "tiles": [1, 1], "halo": 2, "warmup_frames": 1, "sample_frames": 5, "device": "cpu", "mixed_precision": True,
        "threads": 1}


def params(**changes) -> infer.Params:
    return params_from_mapping("infer", infer.Params, {**BASE, **changes})


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("infer")
    inputs = write_inputs(root, frames=9, height=16, width=24)  # 24 is no multiple of 16: padded inside
    runs = {"latent_mse": {}, "latent_mse_2x": {"decoder_skip": True, "decoder_lora_rank": 2}}
    for method, changes in runs.items():
        train.run(train_params(iterations=1, **changes), method, inputs["vae"], inputs["pairs"],
                  root / "train" / method, root / "metrics" / f"{method}.json", root / "ckpt" / method)
    return {**inputs, "root": root, "train": root / "train"}


def run_stage(trained: dict, out: Path, **changes) -> dict:
    return infer.run(params(**changes), trained["train"], trained["vae"], trained["pairs"], out / "infer",
                     out / "infer.json")


def test_every_model_restores_every_test_video_at_the_targets_size(trained, tmp_path):
    result = run_stage(trained, tmp_path)
    out = tmp_path / "infer"
    assert sorted(p.name for p in out.iterdir()) == ["latent_mse", "latent_mse_2x"]
    for method in ("latent_mse", "latent_mse_2x"):
        for task, folder in zip(("nvs", "sr"), trained["pairs"]):
            (pair,) = pairs_io.load_pairs(folder, split="test")
            frames = video.read_frames(out / method / task / pair["scene"])
            assert frames.shape == (pair["frames"], pair["height"], pair["width"], 3) == (9, 16, 24, 3)
            assert [p.name for p in video.list_frames(out / method / task / pair["scene"])][:2] == \
                   ["00000.png", "00001.png"]  # named like the pairs folders' frames
            timing = json.loads((out / method / task / "timing.json").read_text())
            assert timing == {"method": method, "task": task, "frames": 9, "scenes": [pair["scene"]],
                              "max_frames": None, "segment_frames": None, "tiles": [1, 1], "reference": False}  # nothing measured
            assert video.probe_video(out / method / task / "sample.mp4").width == 3 * 24  # input | output | target
            measured = json.loads((tmp_path / "infer.json").read_text())[method][task]  # the times: metrics only
            assert set(measured) == {"frames", *infer.MEASURED} and measured["frames"] == 9
            parts = measured["encode_seconds"] + measured["transformer_seconds"] + measured["decode_seconds"]
            assert measured["seconds_per_frame"] == pytest.approx(parts / 9, rel=1e-2) and parts > 0
    assert len(result["samples"]) == 4


def test_a_rerun_with_the_same_inputs_writes_the_same_bytes(trained, tmp_path):
    # DVC hashes data/infer: a measured time inside it would rerun evaluate after every infer run.
    for name in "ab":
        run_stage(trained, tmp_path / name, vae_roundtrip=True)
    first = file_md5s(tmp_path / "a" / "infer")
    assert first == file_md5s(tmp_path / "b" / "infer")
    assert {"latent_mse/nvs/timing.json", "latent_mse_2x/sr/sample.mp4",
            "vae_roundtrip/sr/scene_2/00000.png"} <= set(first)


def test_outputs_are_the_loaded_models_restoration(trained, tmp_path):
    run_stage(trained, tmp_path, max_frames=5)
    for train_dir in sorted(trained["train"].iterdir()):
        model = restoration.load_model(train_dir / "nvs", trained["vae"])
        assert (model.skip is not None) == (train_dir.name == "latent_mse_2x")
        (pair,) = pairs_io.load_pairs(trained["pairs"][0], split="test")
        degraded = video.read_frames(pair["input"])[:5]
        expected, _ = restoration.restore_video(model, degraded)
        written = video.read_frames(tmp_path / "infer" / train_dir.name / "nvs" / pair["scene"])
        assert written.shape == (5, 16, 24, 3)  # max_frames: the first frames only
        np.testing.assert_array_equal(written, expected)


def test_the_vae_roundtrip_reference_is_the_input_through_the_vae_alone(trained, tmp_path):
    result = run_stage(trained, tmp_path, max_frames=5, vae_roundtrip=True)
    out = tmp_path / "infer" / infer.ROUNDTRIP
    assert sorted(p.name for p in out.iterdir()) == ["nvs", "sr"]  # one per task the models were trained on
    model = restoration.roundtrip_model(trained["vae"])
    assert 16 % model.size_multiple == 0 and 24 % model.size_multiple == 0  # no transformer patch: no padding
    vae = model.vae
    for task, folder in (("nvs", trained["pairs"][0]), ("sr", trained["pairs"][1])):
        (pair,) = pairs_io.load_pairs(folder, split="test")
        degraded = video.read_frames(pair["input"])[:5]
        x = torch.from_numpy(np.concatenate([degraded, degraded[-1:].repeat(4, 0)])).permute(3, 0, 1, 2)[None]
        x = x.float() / 127.5 - 1  # padded to 9 frames (1 + 4k), the last repeated
        with torch.no_grad():
            expected = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
        expected = ((expected[0, :, :5, :, :24].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).numpy()
        written = video.read_frames(out / task / pair["scene"]).astype(float)
        assert np.abs(written - expected).max() <= 1  # uint8 rounding
        assert json.loads((out / task / "timing.json").read_text())["reference"] is True
        assert result["metrics"][infer.ROUNDTRIP][task]["transformer_seconds"] < 1e-3
    assert set(result["metrics"]) == {"latent_mse", "latent_mse_2x", infer.ROUNDTRIP}
    trained_timing = json.loads((tmp_path / "infer" / "latent_mse" / "nvs" / "timing.json").read_text())
    assert trained_timing["reference"] is False


@pytest.mark.parametrize("changes, pattern", [
    ({"tiles": [3, 1]}, r"infer.tiles \[3, 1\] are more than the latent 2x4"),
])
def test_bad_tiles_are_rejected_before_any_work(trained, tmp_path, changes, pattern):
    with pytest.raises(ValueError, match=pattern):
        run_stage(trained, tmp_path, **changes)
    assert not any(tmp_path.iterdir())


def test_missing_models_and_pairs_are_rejected_before_any_work(trained, tmp_path):
    (tmp_path / "train" / "chopgrad_d1").mkdir(parents=True)
    with pytest.raises(ValueError, match="chopgrad_d1 holds no trained model .*: run its train stage"):
        infer.run(params(), tmp_path / "train", trained["vae"], trained["pairs"], tmp_path / "o", tmp_path / "m.json")
    with pytest.raises(ValueError, match="holds no train stage output .*: run the train stages"):
        infer.run(params(), tmp_path / "nowhere", trained["vae"], trained["pairs"], tmp_path / "o",
                  tmp_path / "m.json")
    with pytest.raises(ValueError, match="was trained on 'sr' but no --pairs folder holds that task"):
        infer.run(params(), trained["train"], trained["vae"], trained["pairs"][:1], tmp_path / "o", tmp_path / "m.json")
    with pytest.raises(ValueError, match="has no config.json"):
        infer.run(params(), trained["train"], tmp_path / "no_vae", trained["pairs"], tmp_path / "o",
                  tmp_path / "m.json")
    assert not (tmp_path / "o").exists() and not (tmp_path / "m.json").exists()
    with pytest.raises(ParamsError, match="infer.max_frames must be >= 1 or null"):
        params(max_frames=0)


def test_the_text_encoder_loads_once_for_every_job(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from transformers import UMT5EncoderModel

    write_text_encoder(tmp_path)
    loads = []
    original = UMT5EncoderModel.from_pretrained
    monkeypatch.setattr(UMT5EncoderModel, "from_pretrained",
                        lambda *args, **kwargs: loads.append(args) or original(*args, **kwargs))
    models = [SimpleNamespace(spec={"text": {"encoder": str(tmp_path)}, "transformer": {"family": "wan"}})
              for _ in range(3)]  # three (method, task) jobs
    cache: dict = {}
    embeddings = [infer._text(model, prompt, cache) for model in models for prompt in ("a room", "a clean video")]
    assert len(loads) == 1 and embeddings[0].shape[-1] == 16
    assert torch.equal(embeddings[0], embeddings[2]) and not torch.equal(embeddings[0], embeddings[1])
    assert infer._text(SimpleNamespace(spec={"text": {}}), "a room", cache) is None  # trained without an encoder


def test_params_section_in_params_yaml_is_valid():
    from stages.common.params import load_params

    section = load_params("infer", infer.Params, Path(__file__).resolve().parents[1] / "params.yaml")
    assert section.max_frames is None or section.max_frames >= 1

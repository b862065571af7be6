"""Experiments end to end, as `dvc repro` runs them: `python -m stages.train --experiment`, infer and evaluate
reading ``experiments:``, on tiny random-weight models (issue 13's hardest paths).

- Wan NVS with 2x2 decoder tiles (the paper's Table 2 setting, in miniature).
- Mirage's two phases, then ChopGrad started from Mirage's trained model (Table 4's chaining), with
  4x4 tiles on a 6x10 latent, which 4 divides neither way.

Plus the declaration itself: bad entries, a stale ``runs:`` table, cycles of ``start``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from ruamel.yaml import YAML
from test_infer import BASE as INFER
from test_train import BASE as TRAIN
from test_train import write_inputs

from stages import evaluate, infer, train
from stages.common import experiments, restoration
from stages.common.params import ParamsError

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
EVALUATE = {"metrics": ["psnr", "ssim"], "weights": "skip", "stand_in_home": "unused", "table_metrics_only": True,
            "frames": 0, "model_frames": 0, "vbench_frames": 0, "fvd_clips": 2, "fvd_clip_frames": 9,
            "device": "cpu", "threads": 1}
CHEAP_LOSSES = {"loss_nvs": {"latent_mse": 1.0, "mse": 1.0}, "loss_driving": {"mse": 1.0},
                "loss_reconstruction": {"mse": 1.0}}


def write_params(path: Path, entries: dict, **train_changes) -> dict:
    data = {"train": {**copy.deepcopy(TRAIN), **CHEAP_LOSSES, **train_changes}, "infer": dict(INFER),
            "evaluate": dict(EVALUATE), "experiments": entries}
    data["runs"] = experiments.runs_table(experiments.load(path, data))  # starts under data/train, as dvc.yaml
    with path.open("w") as handle:
        YAML(typ="safe", pure=True).dump(data, handle)
    return data


def experiment(task: str, pairs: Path, vae: Path, methods: list[str], **settings) -> dict:
    return {"task": task, "pairs": str(pairs), "vae": str(vae), "methods": methods, "start": None, "train": {},
            "infer": {}, "eval_frames": None, "paper_dataset": None, **settings}


def train_run(root: Path, name: str, method: str, monkeypatch) -> dict:
    monkeypatch.chdir(root)
    train.main(["--params", "params.yaml", "--experiment", name, "--method", method, "--out", f"data/train/{method}",
                "--metrics", f"metrics/train/{method}/{name}.json", "--checkpoints", f"ckpt/{name}-{method}"])
    return json.loads((root / "data" / "train" / method / name / "train.json").read_text())


def infer_and_evaluate(root: Path) -> dict:
    infer.run(infer.Params(**{**INFER, "tiles": tuple(INFER["tiles"])}), root / "data" / "train", None, None, root / "infer",
              root / "metrics" / "infer.json", params_path=root / "params.yaml")
    params = evaluate.Params(**{**EVALUATE, "metrics": tuple(EVALUATE["metrics"])})
    return evaluate.run(params, root / "infer", root / "metrics" / "train", root / "metrics" / "infer.json",
                        root / "metrics" / "evaluate.json", root / "tables", evaluate.sources_of(root / "params.yaml"))


@pytest.fixture
def tracking(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")


@pytest.mark.slow  # training, inference and evaluation of one experiment
def test_wan_nvs_with_2x2_tiles_trains_infers_and_evaluates(tmp_path, monkeypatch, tracking):
    data = write_inputs(tmp_path / "inputs", tasks=("nvs",), frames=9, height=32, width=32)
    entries = {"nvs": experiment("nvs", data["pairs"][0], data["vae"], ["chopgrad_d1"],
                                 train={"crop": [32, 32], "tiles": [2, 2], "halo": 1, "iterations": 2},
                                 infer={"tiles": [2, 2], "halo": 1, "max_frames": 9})}
    write_params(tmp_path / "params.yaml", entries)
    record = train_run(tmp_path, "nvs", "chopgrad_d1", monkeypatch)
    assert record["tiles"] == [2, 2] and record["iterations"] == 2 and record["final_pixel_loss"] > 0
    result = infer_and_evaluate(tmp_path)
    timing = json.loads((tmp_path / "infer" / "chopgrad_d1" / "nvs" / "timing.json").read_text())
    assert timing["tiles"] == [2, 2] and timing["frames"] == 9
    assert set(result["results"]["nvs"]) == {"input", "chopgrad_d1"}
    assert "| nvs (this run) | chopgrad_d1 | ours |" in (tmp_path / "tables" / "table2.md").read_text()


@pytest.mark.slow  # Mirage's two phases, the chained ChopGrad run, inference and evaluation
def test_chopgrad_starts_from_mirage_with_4x4_tiles_on_a_latent_they_do_not_divide(tmp_path, monkeypatch, tracking):
    data = write_inputs(tmp_path / "inputs", tasks=("driving",), frames=9, height=48, width=80)
    mirage = {"schedule": "mirage", "decoder_skip": True, "decoder_lora_rank": 2, "decoder_lora_alpha": 2,
              "transformer_lora_rank": 2, "transformer_lora_alpha": 2, "reconstruction_iterations": 1, "iterations": 1}
    chained = {**mirage, "schedule": "joint", "crop": [48, 80], "tiles": [4, 4], "halo": 1, "iterations": 1,
               "lr": 1e-12}  # a negligible step: the trained weights stay Mirage's, which shows where it started
    entries = {
        "driving_mirage": experiment("driving", data["pairs"][0], data["vae"], ["mirage"], train=mirage),
        "driving": experiment("driving", data["pairs"][0], data["vae"], ["chopgrad_d1"], train=chained,
                              start={"experiment": "driving_mirage", "method": "mirage"},
                              infer={"tiles": [4, 4], "halo": 1, "segment_frames": 5}),
    }
    methods = {**TRAIN["methods"], "mirage": {"decode": "chopgrad", "d_trunc": 2, "iterations_factor": 1}}
    params = write_params(tmp_path / "params.yaml", entries, methods=methods)
    assert params["runs"]["driving-chopgrad_d1"]["start"] == "data/train/mirage/driving_mirage"  # a DVC dependency
    first = train_run(tmp_path, "driving_mirage", "mirage", monkeypatch)
    assert first["schedule"] == "mirage" and first["final_reconstruction_loss"] > 0
    second = train_run(tmp_path, "driving", "chopgrad_d1", monkeypatch)
    assert second["tiles"] == [4, 4] and second["start"] == "data/train/mirage/driving_mirage"
    upstream = restoration.load_model(tmp_path / "data" / "train" / "mirage" / "driving_mirage", data["vae"])
    model = restoration.load_model(tmp_path / "data" / "train" / "chopgrad_d1" / "driving", data["vae"])
    assert model.spec["decoder_skip"] and model.spec["decoder_lora"]["adapters"] == list(restoration.MIRAGE_ADAPTERS)
    for (name, theirs), (_, ours) in zip(upstream.decoder_weights().items(), model.decoder_weights().items(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6, msg=name)  # Mirage's fusion conv and LoRAs
    lora = {k: v for k, v in model.transformer.state_dict().items() if "lora_" in k}
    assert lora and all(torch.allclose(v, upstream.transformer.state_dict()[k], atol=1e-6) for k, v in lora.items())
    result = infer_and_evaluate(tmp_path)
    timing = json.loads((tmp_path / "infer" / "chopgrad_d1" / "driving" / "timing.json").read_text())
    assert timing["segment_frames"] == 5 and timing["frames"] == 9  # segments of 5 and 4 frames
    assert {"driving", "driving_mirage"} <= set(result["results"])
    table4 = (tmp_path / "tables" / "table4.md").read_text()
    assert "| driving_mirage (this run) | mirage | ours |" in table4 and "| driving (this run) | chopgrad_d1 |" in table4


def test_bad_declarations_are_refused_naming_the_experiment(tmp_path):
    data = {"train": {"methods": {"chopgrad_d1": {}}, "lr": 1.0}, "infer": {"tiles": [1, 1]},
            "experiments": {"a": experiment("nvs", tmp_path, tmp_path, ["chopgrad_d1"])}}
    path = tmp_path / "params.yaml"
    assert set(experiments.load(path, data)) == {"a"}
    cases = [
        ({"methods": ["chopgrad_d9"]}, "experiments.a.methods: 'chopgrad_d9' is not in train.methods"),
        ({"task": "segmentation"}, "experiments.a.task must be one of nvs, inpaint_box"),
        ({"train": {"methods": {}}}, r"experiments.a.train: \['methods'\] are not train keys an experiment can override"),
        ({"infer": {"typo": 1}}, r"experiments.a.infer: \['typo'\] are not infer keys"),
        ({"start": {"experiment": "b", "method": "chopgrad_d1"}}, "start names experiment 'b', which is not declared"),
        ({"start": {"experiment": "a", "method": "chopgrad_d1"}}, r"in a cycle: a -> a"),
        ({"eval_frames": 0}, "eval_frames must be a positive integer or null"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
    ]
    for change, message in cases:
        broken = copy.deepcopy(data)
        broken["experiments"]["a"].update(change)
        with pytest.raises(ParamsError, match=message):
            experiments.load(path, broken)
    named = copy.deepcopy(data)
    named["experiments"]["a-b"] = named["experiments"].pop("a")
    with pytest.raises(ParamsError, match="may not contain '-'"):
        experiments.load(path, named)


def test_a_stale_runs_table_is_refused_and_rewritten(tmp_path):
    path = tmp_path / "params.yaml"
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    path.write_text(text.replace("  nvs-per_frame:\n", "  nvs-per_frame_old:\n"))
    data = experiments.read(path)
    with pytest.raises(ParamsError, match=r"missing \['nvs-per_frame'\], extra \['nvs-per_frame_old'\]\); rewrite it"):
        experiments.check_runs(data, path)
    with pytest.raises(ParamsError, match="does not match experiments"):
        train.experiment_params(path, "nvs")
    experiments.write_runs(path)
    experiments.check_runs(experiments.read(path), path)
    assert path.read_text() == text  # comments, nulls and layout kept

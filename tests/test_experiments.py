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


@pytest.mark.slow  # training, inference and evaluation on three test sets
def test_test_sets_run_the_experiments_models_and_get_rows_of_their_own(tmp_path, monkeypatch, tracking):
    data = write_inputs(tmp_path / "inputs", tasks=("sr",), frames=5, height=16, width=32)
    extra = write_inputs(tmp_path / "more", tasks=("sr",), frames=5, height=16, width=32)["pairs"][0]
    entries = {"sr": experiment("sr", data["pairs"][0], data["vae"], ["chopgrad_d1"], train={"iterations": 1},
                                test_sets={"UDM10": str(extra), "rooms": str(extra)})}
    write_params(tmp_path / "params.yaml", entries, loss_sr={"mse": 1.0})
    declared = experiments.load(tmp_path / "params.yaml")
    assert [(e.name, e.experiment.name, e.paper_dataset) for e in experiments.evaluations(declared)] == [
        ("sr", "sr", None), ("sr_UDM10", "sr", "UDM10"), ("sr_rooms", "sr", None)]
    assert list(write_params(tmp_path / "params.yaml", entries, loss_sr={"mse": 1.0})["runs"]) == ["sr-chopgrad_d1"]
    train_run(tmp_path, "sr", "chopgrad_d1", monkeypatch)
    result = infer_and_evaluate(tmp_path)
    assert sorted(p.name for p in (tmp_path / "infer" / "chopgrad_d1").iterdir()) == ["sr", "sr_UDM10", "sr_rooms"]
    timing = json.loads((tmp_path / "infer" / "chopgrad_d1" / "sr_UDM10" / "timing.json").read_text())
    assert timing["scenes"] == ["scene_2"]  # the test pairs of the test set's folder
    assert set(result["results"]) == {"sr", "sr_UDM10", "sr_rooms"}
    assert set(result["results"]["sr_UDM10"]) == {"input", "chopgrad_d1"}
    table = (tmp_path / "tables" / "table1.md").read_text()
    assert "| sr_UDM10 (this run) | PSNR ↑ |" in table and "| sr_rooms (this run) | PSNR ↑ |" in table


@pytest.mark.slow  # Mirage's two phases, the chained ChopGrad run, inference and evaluation
def test_chopgrad_starts_from_mirage_with_4x4_tiles_on_a_latent_they_do_not_divide(tmp_path, monkeypatch, tracking):
    data = write_inputs(tmp_path / "inputs", tasks=("driving",), frames=9, height=48, width=80)
    mirage = {"schedule": "mirage", "decoder_skip": True, "decoder_lora_rank": 2, "decoder_lora_alpha": 2,
              "transformer_lora_rank": 2, "transformer_lora_alpha": 2, "reconstruction_iterations": 1, "iterations": 1}
    chained = {**mirage, "schedule": "joint", "crop": [48, 80], "tiles": [4, 4], "halo": 1, "iterations": 2}
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
    # C.4: ChopGrad fine-tunes Mirage's harmonization stage. Mirage's fusion conv (zero when built) and its
    # reconstruction LoRA are frozen: exactly Mirage's, which shows the run started from Mirage's model;
    # the harmonization LoRA and the transformer LoRA trained on.
    theirs, ours = upstream.decoder_weights(), model.decoder_weights()
    frozen = [name for name in ours if name.startswith("fusion.") or ".reconstruction." in name]
    assert frozen and theirs["fusion.weight"].abs().max() > 0
    for name in frozen:
        assert torch.equal(ours[name], theirs[name]), name
    assert any(not torch.equal(ours[n], theirs[n]) for n in ours if ".harmonization." in n)
    upstream_state = upstream.transformer.state_dict()
    assert any(not torch.equal(v, upstream_state[k]) for k, v in model.transformer.state_dict().items() if "lora_" in k)
    result = infer_and_evaluate(tmp_path)
    timing = json.loads((tmp_path / "infer" / "chopgrad_d1" / "driving" / "timing.json").read_text())
    assert timing["segment_frames"] == 5 and timing["frames"] == 9  # segments of 5 and 4 frames
    assert {"driving", "driving_mirage"} <= set(result["results"])
    table4 = (tmp_path / "tables" / "table4.md").read_text()
    assert "| driving_mirage (this run) | mirage | ours |" in table4 and "| driving (this run) | chopgrad_d1 |" in table4


@pytest.mark.slow  # one Mirage run
def test_a_chained_experiment_must_describe_the_model_it_starts_from(tmp_path, monkeypatch, tracking):
    data = write_inputs(tmp_path / "inputs", tasks=("driving",), frames=9, height=16, width=32)
    mirage = {"schedule": "mirage", "decoder_skip": True, "decoder_lora_rank": 2, "decoder_lora_alpha": 2,
              "transformer_lora_rank": 2, "transformer_lora_alpha": 2, "reconstruction_iterations": 1, "iterations": 1}
    entries = {"driving_mirage": experiment("driving", data["pairs"][0], data["vae"], ["mirage"], train=mirage),
               "driving": experiment("driving", data["pairs"][0], data["vae"], ["chopgrad_d1"],
                                     train={**mirage, "schedule": "joint", "transformer_lora_rank": 4},
                                     start={"experiment": "driving_mirage", "method": "mirage"})}
    methods = {**TRAIN["methods"], "mirage": {"decode": "chopgrad", "d_trunc": 2, "iterations_factor": 1}}
    write_params(tmp_path / "params.yaml", entries, methods=methods)
    train_run(tmp_path, "driving_mirage", "mirage", monkeypatch)
    with pytest.raises(ValueError, match=r"whose model differs in transformer_lora .*set the experiment's train keys"):
        train_run(tmp_path, "driving", "chopgrad_d1", monkeypatch)
    assert not (tmp_path / "data" / "train" / "chopgrad_d1").exists()


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
        ({"paper_dataset": "DL3DV-Benchmrk"}, "paper_dataset 'DL3DV-Benchmrk' is not a data set of the paper's nvs"),
        ({"colour": "red"}, r"unknown key\(s\) \['colour'\]"),
        ({"test_sets": {"UDM-10": "x"}}, "test_sets must map labels"),
        ({"test_sets": ["x"]}, "test_sets must map labels"),
        ({"evaluate_pairs": False}, "false only with test_sets"),
        ({"evaluate_pairs": "no", "test_sets": {"x": "y"}}, "evaluate_pairs must be true or false"),
    ]
    for change, message in cases:
        broken = copy.deepcopy(data)
        broken["experiments"]["a"].update(change)
        with pytest.raises(ParamsError, match=message):
            experiments.load(path, broken)
    only_sets = copy.deepcopy(data)
    only_sets["experiments"]["a"].update(evaluate_pairs=False, test_sets={"UDM10": "y"})
    assert [e.name for e in experiments.evaluations(experiments.load(path, only_sets))] == ["a_UDM10"]
    bare = copy.deepcopy(data)
    del bare["experiments"]["a"]["train"]  # a train@ run depends on it (dvc.yaml): it must be written, {} or not
    with pytest.raises(ParamsError, match=r"missing key\(s\) \['train'\]"):
        experiments.load(path, bare)
    named = copy.deepcopy(data)
    named["experiments"]["a-b"] = named["experiments"].pop("a")
    with pytest.raises(ParamsError, match="may not contain '-'"):
        experiments.load(path, named)
    clash = copy.deepcopy(data)
    clash["experiments"]["a_x"] = copy.deepcopy(clash["experiments"]["a"])
    clash["experiments"]["a"]["test_sets"] = {"x": str(tmp_path)}
    with pytest.raises(ParamsError, match=r"\['a_x'\] name both an experiment and an experiment's test set"):
        experiments.load(path, clash)


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

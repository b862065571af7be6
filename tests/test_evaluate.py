"""Stage ``evaluate``, its weights policy helper and the paper tables, on small fake stage outputs.

The fake ``data/infer``, pairs folders and train / infer metrics files are written here in the documented
layout (``docs/interfaces.md``: the contract between the stages), not produced by the train/infer stages.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import chopgrad  # noqa: F401  (before torchvision: the CPU fix)
from chopgrad import weights
from stages import evaluate
from stages.common import paper_tables, video
from stages.common.pairs import PairsError, PairsWriter
from stages.common.params import ParamsError, params_from_mapping
from chopgrad.weights import metric_home

FRAMES, HEIGHT, WIDTH = 12, 32, 48
METHODS = ("chopgrad_d1", "per_frame", "latent_mse", "my_method")
TASKS = ("nvs", "sr", "inpaint_objects")
PAPER = Path(__file__).resolve().parents[2] / "shared" / "reference" / "chopgrad-paper.txt"


def _target(rng) -> np.ndarray:  # [T, H, W, 3] uint8, smooth and slowly moving
    base = np.kron(rng.integers(40, 216, (1, HEIGHT // 8, WIDTH // 8, 3)), np.ones((1, 8, 8, 1)))
    return np.clip(base + 2.0 * np.arange(FRAMES)[:, None, None, None], 0, 255).astype(np.uint8)


def _noisy(frames: np.ndarray, sigma: float, rng) -> np.ndarray:
    return np.clip(frames + rng.normal(0, sigma, frames.shape), 0, 255).round().astype(np.uint8)


def make_project(root: Path, tasks=TASKS, methods=METHODS, test_scenes=2) -> list[str]:
    """Pairs folders, inference outputs with timing.json, and the train and infer metrics files (the measured
    seconds) in the documented layout."""
    rng = np.random.default_rng(0)
    folders, trained, timed = [], {}, {}
    for task in tasks:
        folder = root / "pairs" / task
        with PairsWriter(folder, task, fps=24) as writer:
            for index in range(test_scenes + 1):
                target = _target(rng)
                mask = np.zeros(target.shape[:3], np.uint8) if task.startswith("inpaint") else None
                if mask is not None:
                    mask[:, 8:24, 12:36] = 255
                writer.add(f"scene_{index}", "train" if index == 0 else "test", _noisy(target, 40, rng), target,
                           mask=mask, lowres=target[:, ::4, ::4] if task == "sr" else None)
            writer.commit()
        folders.append(str(folder))
        for rank, method in enumerate(methods):
            out = root / "infer" / method / task
            for index in range(1, test_scenes + 1):
                target = video.read_frames(folder / "test" / f"scene_{index}" / "target")
                video.write_frames(out / f"scene_{index}", _noisy(target, 4 + 6 * rank, rng), prefix="", start=0)
            scenes = [f"scene_{index}" for index in range(1, test_scenes + 1)]
            (out / "timing.json").write_text(json.dumps({
                "method": method, "task": task, "frames": FRAMES, "scenes": scenes, "max_frames": None,
                "tiles": [1, 1], "reference": False}))
            timed.setdefault(method, {})[task] = {
                "frames": FRAMES, "seconds_per_frame": 0.5 + rank, "encode_seconds": 0.1, "transformer_seconds": 0.2,
                "decode_seconds": 0.3, "device": "cpu"}
            record = trained.setdefault(method, {"method": method, "world_size": 1, "seconds": 1.0, "tasks": {}})
            record["tasks"][task] = {
                "method": method, "task": task, "iterations": 4, "final_loss": 0.1, "train_seconds": 360.0 * (rank + 1),
                "seconds_per_iteration": 90.0, "peak_memory_bytes": None, "device": "cpu"}
    for method, record in trained.items():  # one file per (method, experiment), as train@<experiment>-<method> writes
        for task, entry in record["tasks"].items():
            path = root / "metrics" / "train" / method / f"{task}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({**record, "tasks": {task: entry}}))
    (root / "metrics" / "infer.json").write_text(json.dumps(timed))
    return folders


@dataclass(frozen=True)
class Setup:
    """The evaluate params and the experiments (sources) a test evaluates."""

    params: evaluate.Params
    sources: list


def make_params(folders, **changes) -> Setup:
    """One experiment per pairs folder, named like the folder (as the embedded default names its experiments)."""
    values = {"metrics": ["psnr", "ssim", "lpips_alex", "temporal_flickering"],
              "weights": "stand_in", "stand_in_home": "unused", "table_metrics_only": True, "frames": 5,
              "model_frames": 3, "vbench_frames": 0, "fvd_clips": 2,
              "fvd_clip_frames": 16, "device": "cpu", "threads": 1} | changes
    sources = [evaluate.Source(Path(f).name, Path(f)) for f in folders]
    return Setup(params_from_mapping("evaluate", evaluate.Params, values), sources)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate")
    make_project(root)
    return root


@pytest.fixture
def homes(tmp_path, monkeypatch) -> Path:
    """Empty 'real' weight homes (TORCH_HOME, HOME): every metric weight file is missing."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "real" / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "real" / "home"))
    monkeypatch.delenv(weights.CLIP_HOME_ENV, raising=False)
    return tmp_path / "real"


@pytest.fixture(scope="module")
def stand_in_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("stand_in")


def run_stage(project: Path, out: Path, setup: Setup) -> dict:
    return evaluate.run(setup.params, project / "infer", project / "metrics" / "train",
                        project / "metrics" / "infer.json", out / "metrics" / "evaluate.json", out / "tables",
                        setup.sources)


@pytest.fixture(scope="module")
def evaluated(project, stand_in_home, tmp_path_factory):
    """One run on the fake project: stand-in LPIPS, FVD and dynamic degree not computable."""
    out = tmp_path_factory.mktemp("out")
    real = tmp_path_factory.mktemp("real")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(real / "torch"))
        patch.setenv("HOME", str(real / "home"))
        patch.delenv(weights.CLIP_HOME_ENV, raising=False)
        params = make_params([project / "pairs" / t for t in TASKS], stand_in_home=str(stand_in_home),
                             metrics=["psnr", "ssim", "lpips_alex", "temporal_flickering", "fvd", "dynamic_degree"])
        result = run_stage(project, out, params)
    return {"out": out, "result": result, "real": real, "params": params}


# ---------------------------------------------------------------------------------------------------------
# The tables


def _md_rows(path: Path) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in path.read_text().splitlines() if line.startswith("| ") and not line.startswith("|---")]


def test_metrics_json_has_every_task_and_method_found(evaluated):
    data = json.loads((evaluated["out"] / "metrics" / "evaluate.json").read_text())
    for task in TASKS:
        assert set(data[task]) == {"input", *METHODS}
        for method in METHODS:
            assert set(data[task][method]) >= {"psnr", "ssim", "lpips_alex", "inference_seconds_per_frame",
                                               "train_hours"}
            assert "fvd" not in data[task][method]  # not computable: reported in the tables instead
    # table_metrics_only: Table 1 (sr) shows no flickering, Tables 2 (nvs) and 6 (inpainting) do.
    assert "temporal_flickering" not in data["sr"]["per_frame"]
    assert "temporal_flickering" in data["nvs"]["per_frame"] and "temporal_flickering" in data["inpaint_objects"]["input"]
    record = json.loads((evaluated["out"] / "tables" / "evaluation.json").read_text())
    assert "fvd" not in record["results"]["nvs"]["per_frame"]  # not in Table 2: not even "not computed"
    assert data["nvs"]["latent_mse"]["train_hours"] == pytest.approx(3 * 360 / 3600)
    assert data["nvs"]["per_frame"]["inference_seconds_per_frame"] == 1.5
    assert data["stand_in_metrics"] == "lpips_alex"


def test_psnr_matches_an_independent_computation_on_the_sampled_frames(evaluated, project):
    data = json.loads((evaluated["out"] / "metrics" / "evaluate.json").read_text())
    index = np.unique(np.linspace(0, FRAMES - 1, 5).round().astype(int))
    for method, folder in (("per_frame", project / "infer" / "per_frame" / "sr"), ("input", None)):
        values = []
        for scene in ("scene_1", "scene_2"):
            target = video.read_frames(project / "pairs" / "sr" / "test" / scene / "target")[index] / 255.0
            source = folder / scene if folder else project / "pairs" / "sr" / "test" / scene / "input"
            pred = video.read_frames(source)[index] / 255.0
            mse = ((pred - target) ** 2).mean(axis=(1, 2, 3))
            values.append(np.mean(10 * np.log10(1 / mse)))
        assert data["sr"][method]["psnr"] == pytest.approx(np.mean(values), abs=1e-4)
    assert data["sr"]["chopgrad_d1"]["psnr"] > data["sr"]["per_frame"]["psnr"] > data["sr"]["input"]["psnr"]


def test_temporal_flickering_uses_every_frame(evaluated, project):
    data = json.loads((evaluated["out"] / "metrics" / "evaluate.json").read_text())
    frames = [video.read_frames(project / "infer" / "latent_mse" / "nvs" / s).astype(float) for s in ("scene_1", "scene_2")]
    expected = np.mean([(255 - np.abs(np.diff(f, axis=0)).mean()) / 255 for f in frames])
    assert data["nvs"]["latent_mse"]["temporal_flickering"] == pytest.approx(expected, abs=1e-6)


def test_a_reference_method_needs_no_training_and_follows_the_input(tmp_path, homes):
    folders = make_project(tmp_path, tasks=("nvs",), methods=("latent_mse", "vae_roundtrip"))
    shutil.rmtree(tmp_path / "metrics" / "train" / "vae_roundtrip")  # infer's reference: nothing trained
    timing = tmp_path / "infer" / "vae_roundtrip" / "nvs" / "timing.json"
    timing.write_text(json.dumps({**json.loads(timing.read_text()), "reference": True}))
    result = run_stage(tmp_path, tmp_path / "out", make_params(folders, metrics=["psnr"]))
    rows = result["results"]["nvs"]
    assert "train_hours" not in rows["vae_roundtrip"] and rows["vae_roundtrip"]["inference_seconds_per_frame"]
    assert rows["latent_mse"]["train_hours"]["value"] == pytest.approx(0.1)
    table = tmp_path / "out" / "tables" / "table2.md"
    assert [r[1] for r in _md_rows(table)[1:] if r[2] == "ours"] == ["input", "vae_roundtrip", "latent_mse"]
    assert "`vae_roundtrip` is that input encoded and decoded by the frozen VAE" in table.read_text()
    timing.write_text(json.dumps({**json.loads(timing.read_text()), "reference": False}))  # then it needs training
    with pytest.raises(evaluate.EvaluateError, match=r"train/vae_roundtrip/nvs.json is missing; the train stage writes "
                                                     r"it \(re-run `train@nvs-vae_roundtrip`\)"):
        run_stage(tmp_path, tmp_path / "out2", make_params(folders, metrics=["psnr"]))


def test_table_2_puts_the_papers_row_beside_ours(evaluated):
    rows = _md_rows(evaluated["out"] / "tables" / "table2.md")
    header = rows[0]
    body = [dict(zip(header, row)) for row in rows[1:]]
    ours = [r["method"] for r in body if r["source"] == "ours"]
    assert ours == ["input", "per_frame", "latent_mse", "chopgrad_d1", "my_method"]
    at = next(i for i, r in enumerate(body) if r["method"] == "chopgrad_d1")
    assert body[at + 1]["method"] == "ChopGrad D_trunc=1" and body[at + 1]["source"] == "paper Table 2"
    assert body[at + 1]["FID ↓"] == "11.209" and body[at + 1]["Train Time [h]"] == "4.0"
    mse = next(i for i, r in enumerate(body) if r["method"] == "latent_mse")
    assert body[mse + 1]["method"] == "ChopGrad* (latent MSE)"
    assert {r["method"] for r in body if r["source"] != "ours"} >= {"Difix [61]", "MVSplat-360 [11]",
                                                                    "ChopGrad D_trunc=0", "ChopGrad D_trunc=2"}
    d1 = body[at]
    assert d1["LPIPS ↓"].endswith(paper_tables.STAND_IN_MARK)
    assert not d1["PSNR ↑"].endswith(paper_tables.STAND_IN_MARK)
    assert d1["VBench Overall Quality ↑"] == "n/c" and d1["FID ↓"] == "–"
    assert d1["Inference [s/frame] ↓"] == "0.5" and d1["Train Time [h]"] == "0.1"
    assert body[0]["Inference [s/frame] ↓"] == "–"  # no model for the input


def test_every_table_marks_stand_ins_and_explains_what_is_missing(evaluated):
    tables = evaluated["out"] / "tables"
    for number in (1, 2, 4, 5):
        text = (tables / f"table{number}.md").read_text()
        if number == 4:  # no driving pairs in this run: only the paper's rows, and a note
            assert "This run has no driving pairs" in text and "(this run)" not in text
            continue
        assert f"{paper_tables.STAND_IN_MARK} computed with stand-in (random) weights" in text
    table5 = (tables / "table5.md").read_text()
    assert "n/c: FVD ↓ not computed: 2 test video(s) of 12 frames give fewer than 2 clips of 16" in table5
    table6 = (tables / "table6.md").read_text()
    assert "Dynamic Degree not computed: frames of 32x48 are smaller than RAFT's 128x128" in table6
    assert "Motion Smoothness ↑ not computed: VBench scores it with the AMT-S" in table6
    with open(tables / "table2.csv") as handle:
        rows = list(csv.DictReader(handle))
    d1 = next(r for r in rows if r["method"] == "chopgrad_d1")
    assert d1["stand_in_weights"] == "lpips_alex" and float(d1["psnr"]) > 0
    assert next(r for r in rows if r["method"] == "ChopGrad D_trunc=1")["fid"] == "11.209"
    record = json.loads((tables / "evaluation.json").read_text())
    assert record["stand_in_home_used"] is True
    assert record["weights"]["lpips_alex"] == {"alexnet": "stand-in", "lpips_alex_lin": "official"}


def test_table_1_merges_our_methods_into_the_papers_columns(evaluated):
    rows = _md_rows(evaluated["out"] / "tables" / "table1.md")
    header, body = rows[0], rows[1:]
    assert "ChopGrad (Ours) / chopgrad_d1 (ours)" in header
    # DOVE's column is the DOVE checkpoint (our method "dove", not run here); per_frame keeps its own name.
    assert "DOVE [12]" in header and "per_frame (ours)" in header and not any("/ per_frame" in h for h in header)
    assert "my_method (ours)" in header and "input (ours)" in header
    assert [r[0] for r in body[:3]] == ["sr (this run)"] * 3  # PSNR, SSIM, LPIPS (DISTS shown, not requested)
    udm10 = next(r for r in body if r[0] == "UDM10 (paper Table 1)" and r[1] == "PSNR ↑")
    assert udm10[header.index("DOVE [12]")] == "26.48"
    assert udm10[header.index("my_method (ours)")] == "–"
    ours_psnr = next(r for r in body if r[0] == "sr (this run)" and r[1] == "PSNR ↑")
    assert float(ours_psnr[header.index("per_frame (ours)")]) > 0 and ours_psnr[header.index("DOVE [12]")] == "–"


def test_stand_ins_stay_out_of_the_users_caches(evaluated, stand_in_home):
    assert not any(p.is_file() for p in evaluated["real"].rglob("*"))
    assert (stand_in_home / "torch" / "hub" / "checkpoints" / "alexnet-owt-7be5be79.pth").is_file()


@pytest.mark.slow
def test_fid_and_fvd_run_in_the_stage_on_stand_ins(tmp_path, homes, stand_in_home):
    make_project(tmp_path, tasks=("driving",), methods=("chopgrad_d1", "per_frame"), test_scenes=1)
    params = make_params([tmp_path / "pairs" / "driving"], metrics=["psnr", "fid", "fvd"], model_frames=2,
                         fvd_clips=2, fvd_clip_frames=9, stand_in_home=str(stand_in_home))
    result = run_stage(tmp_path, tmp_path / "out", params)
    rows = result["results"]["driving"]
    for method in ("input", "chopgrad_d1", "per_frame"):
        assert rows[method]["fid"]["stand_in"] and rows[method]["fvd"]["stand_in"]
        assert math.isfinite(rows[method]["fid"]["value"]) and math.isfinite(rows[method]["fvd"]["value"])
    assert rows["input"]["fid"]["value"] > rows["chopgrad_d1"]["fid"]["value"]  # noise 40 vs 4 levels
    record = json.loads((tmp_path / "out" / "tables" / "evaluation.json").read_text())
    assert record["weights"]["fvd"] == {"i3d": "unverified"} and record["weights"]["fid"] == {"fid_inception": "stand-in"}
    table = _md_rows(tmp_path / "out" / "tables" / "table4.md")
    d1 = dict(zip(table[0], next(r for r in table if r[1] == "chopgrad_d1")))
    assert d1["FID ↓"].endswith(paper_tables.STAND_IN_MARK) and d1["FVD ↓"].endswith(paper_tables.STAND_IN_MARK)
    paper = dict(zip(table[0], table[table.index(next(r for r in table if r[1] == "chopgrad_d1")) + 1]))
    assert paper["method"] == "ChopGrad" and paper["FVD ↓"] == "154.49"


# ---------------------------------------------------------------------------------------------------------
# Bad inputs: rejected before anything is written


def _broken(project: Path, tmp_path: Path, breaks) -> Path:
    copy = tmp_path / "project"
    shutil.copytree(project, copy)
    breaks(copy)
    return copy


def _drop_frame(root):
    (root / "infer" / "per_frame" / "nvs" / "scene_2" / "00011.png").unlink()


def _extra_frame(root):
    folder = root / "infer" / "chopgrad_d1" / "nvs" / "scene_1"
    shutil.copy(folder / "00011.png", folder / "00012.png")


def _resize(root):
    folder = root / "infer" / "latent_mse" / "sr" / "scene_1"
    shutil.rmtree(folder)
    video.write_frames(folder, np.zeros((FRAMES, HEIGHT, WIDTH + 8, 3), np.uint8), prefix="", start=0)


def _edit(path: Path, keys: tuple[str, ...], value) -> None:
    """Set (or with ``None`` remove) ``data[keys[0]]...[keys[-1]]`` of a JSON file."""
    data = json.loads(path.read_text())
    inner = data
    for key in keys[:-1]:
        inner = inner[key]
    if value is None:
        del inner[keys[-1]]
    else:
        inner[keys[-1]] = value
    path.write_text(json.dumps(data))


def _only_train(root):
    with PairsWriter(root / "pairs" / "nvs", "nvs") as writer:
        writer.add("scene_0", "train", np.zeros((2, 8, 8, 3), np.uint8), np.zeros((2, 8, 8, 3), np.uint8))
        writer.commit()


@pytest.mark.parametrize("breaks, message", [
    (lambda r: shutil.rmtree(r / "infer" / "chopgrad_d1" / "sr" / "scene_2"),
     "chopgrad_d1 on scene_2: Frame folder not found"),
    (_drop_frame, "per_frame on scene_2: 11 frames, but another method of task 'nvs' has 12; every method"),
    (_resize, "holds 12 frames of 32x56; the target has 12 frames of 32x48"),
    (_extra_frame, "holds 13 frames of 32x48; the target has 12 frames of 32x48 (a prediction has its target's"),
    (_only_train, "has no test pairs: nothing to evaluate for 'nvs'"),
    (lambda r: shutil.rmtree(r / "infer"), "no inference outputs in"),
    (lambda r: (r / "infer" / "my_method" / "nvs" / "timing.json").unlink(), "timing.json is missing"),
    (lambda r: _edit(r / "metrics" / "train" / "per_frame" / "sr.json", ("tasks", "sr", "train_seconds"), "long"),
     "sr.json: tasks.sr.train_seconds must be a non-negative number, got 'long'; the train stage writes it"),
    (lambda r: _edit(r / "metrics" / "train" / "latent_mse" / "nvs.json", ("tasks", "nvs"), None),
     "nvs.json has no tasks.nvs.train_seconds; the train stage writes it (re-run `train@nvs-latent_mse`)"),
    (lambda r: (r / "metrics" / "train" / "my_method" / "nvs.json").unlink(),
     "my_method/nvs.json is missing; the train stage"),
    (lambda r: _edit(r / "metrics" / "infer.json", ("chopgrad_d1", "sr", "seconds_per_frame"), -1.0),
     "infer.json: chopgrad_d1.sr.seconds_per_frame must be a non-negative number, got -1.0; the infer stage"),
    (lambda r: _edit(r / "metrics" / "infer.json", ("my_method",), None),
     "infer.json has no my_method.inpaint_objects.seconds_per_frame; the infer stage"),
    (lambda r: (r / "metrics" / "infer.json").write_text("{"), "infer.json is not valid JSON"),
    (lambda r: shutil.copytree(r / "infer" / "per_frame", r / "infer" / "input"), "reserved for the degraded input"),
    (lambda r: (r / "pairs" / "sr" / "pairs.json").unlink(), "pairs.json not found"),
])
def test_bad_inputs_are_rejected_before_anything_is_written(project, tmp_path, homes, breaks, message):
    broken = _broken(project, tmp_path, breaks)
    params = make_params([broken / "pairs" / t for t in TASKS], stand_in_home=str(tmp_path / "stand_in"))
    with pytest.raises((evaluate.EvaluateError, PairsError)) as info:
        run_stage(broken, tmp_path / "out", params)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "stand_in").exists()


@pytest.mark.parametrize("changes, message", [
    ({"metrics": ["psnr", "psrn"]}, "unknown, repeated or no metrics ['psrn']"),
    ({"metrics": []}, "unknown, repeated or no metrics"),
    ({"metrics": ["psnr", "motion_smoothness"]}, "motion_smoothness cannot be computed (VBench scores it with"),
    ({"weights": "download"}, "evaluate.weights must be one of 'official', 'stand_in', 'skip'"),
    ({"vbench_frames": 1}, "vbench_frames 0 or >= 2"),
    ({"model_frames": -1}, "evaluate.model_frames must be >= 0"),
    ({"fvd_clip_frames": 8}, "fvd_clip_frames >= 9"),
])
def test_bad_params_are_rejected_naming_the_key(changes, message):
    with pytest.raises(ParamsError) as info:
        make_params(["data/degrade/sr"], **changes)
    assert message in str(info.value)


def test_two_experiments_of_one_name_or_a_folder_of_another_task_are_refused(project, tmp_path):
    setup = make_params([project / "pairs" / "sr", project / "pairs" / "sr"])
    with pytest.raises(evaluate.EvaluateError, match="two sources are named 'sr': give each experiment its own name"):
        run_stage(project, tmp_path / "out", setup)
    setup = Setup(setup.params, [evaluate.Source("sr", project / "pairs" / "sr", task="nvs")])
    with pytest.raises(evaluate.EvaluateError, match="holds 'sr' pairs but sr is a 'nvs' experiment"):
        run_stage(project, tmp_path / "out", setup)


def test_an_experiment_of_another_name_fills_its_tasks_table_and_eval_frames_cut(project, tmp_path):
    """Paper profile style: experiment nvs_dl3dv of task nvs, its rows in Table 2; only the first 5 frames scored."""
    shutil.copytree(project / "infer", tmp_path / "project" / "infer")
    shutil.copytree(project / "metrics", tmp_path / "project" / "metrics")
    for method_dir in (tmp_path / "project" / "infer").iterdir():
        (method_dir / "nvs").rename(method_dir / "nvs_dl3dv")
    for path in (tmp_path / "project" / "metrics" / "train").glob("*/nvs.json"):
        record = json.loads(path.read_text())
        record["tasks"] = {"nvs_dl3dv": record["tasks"]["nvs"]}
        path.with_name("nvs_dl3dv.json").write_text(json.dumps(record))
    timed = json.loads((tmp_path / "project" / "metrics" / "infer.json").read_text())
    for tasks in timed.values():
        tasks["nvs_dl3dv"] = tasks.pop("nvs")
    (tmp_path / "project" / "metrics" / "infer.json").write_text(json.dumps(timed))
    setup = make_params([], metrics=["psnr"])
    setup = Setup(setup.params, [evaluate.Source("nvs_dl3dv", project / "pairs" / "nvs", "nvs", eval_frames=5)])
    result = run_stage(tmp_path / "project", tmp_path / "out", setup)
    assert set(result["results"]) == {"nvs_dl3dv"}
    table2 = (tmp_path / "out" / "tables" / "table2.md").read_text()
    assert "| nvs_dl3dv (this run) | chopgrad_d1 | ours |" in table2
    record = json.loads((tmp_path / "out" / "tables" / "evaluation.json").read_text())
    assert record["tasks"]["nvs_dl3dv"]["task"] == "nvs"


# ---------------------------------------------------------------------------------------------------------
# Weights policies


def test_outputs_of_experiments_no_longer_declared_are_left_out(project, tmp_path, caplog):
    result = run_stage(project, tmp_path / "out", make_params([project / "pairs" / "nvs"], metrics=["psnr"]))
    assert list(result["results"]) == ["nvs"]
    assert "'sr' is not an experiment of the params; not evaluated" in caplog.text


def test_predictions_of_the_first_frames_are_scored_against_the_first_frames(project, tmp_path, homes):
    short = tmp_path / "short"
    shutil.copytree(project, short)
    for method in METHODS:  # as infer.max_frames does: the first 9 frames of every test video
        for scene in ("scene_1", "scene_2"):
            for name in ("00009.png", "00010.png", "00011.png"):
                (short / "infer" / method / "nvs" / scene / name).unlink()
    params = make_params([short / "pairs" / "nvs"], metrics=["psnr", "temporal_flickering"], frames=0)
    result = run_stage(short, tmp_path / "out", params)
    target = video.read_frames(short / "pairs" / "nvs" / "test" / "scene_1" / "input")[:9].astype(float)
    flicker = (255 - np.abs(np.diff(target, axis=0)).mean()) / 255
    scene_2 = video.read_frames(short / "pairs" / "nvs" / "test" / "scene_2" / "input")[:9].astype(float)
    flicker = (flicker + (255 - np.abs(np.diff(scene_2, axis=0)).mean()) / 255) / 2
    assert result["results"]["nvs"]["input"]["temporal_flickering"]["value"] == pytest.approx(flicker, abs=1e-6)
    table = (tmp_path / "out" / "tables" / "table2.md").read_text()
    assert "2 test video(s) of 12 frames (the first 9, the frames the models restored)" in table


def test_official_policy_fails_at_once_naming_the_missing_file(project, tmp_path, homes):
    params = make_params([project / "pairs" / "sr"], weights="official", metrics=["psnr", "lpips_vgg"],
                         stand_in_home=str(tmp_path / "stand_in"))
    start = time.perf_counter()
    with pytest.raises(weights.MissingWeightsError) as info:
        run_stage(project, tmp_path / "out", params)
    assert time.perf_counter() - start < 5.0
    assert "vgg16-397923af.pth" in str(info.value)
    assert f"put it at: {homes / 'torch' / 'hub' / 'checkpoints' / 'vgg16-397923af.pth'}" in str(info.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "stand_in").exists()


def test_skip_policy_leaves_out_metrics_without_weights_and_says_so(project, tmp_path, homes):
    params = make_params([project / "pairs" / "nvs"], weights="skip", metrics=["psnr", "dists", "fvd"],
                         table_metrics_only=False)
    result = run_stage(project, tmp_path / "out", params)
    cell = result["results"]["nvs"]["chopgrad_d1"]["dists"]
    assert cell == {"value": None, "reason": "weights missing (vgg16, dists) and evaluate.weights is 'skip'"}
    assert result["results"]["nvs"]["chopgrad_d1"]["psnr"]["value"] > 0
    assert "fewer than 2 clips" in result["results"]["nvs"]["input"]["fvd"]["reason"]  # all metrics, every task
    assert "DISTS ↓ not computed: weights missing (vgg16, dists)" in (tmp_path / "out" / "tables" / "table2.md").read_text()
    assert not result["stand_in"]


def test_metric_home_uses_real_files_when_present_and_restores_the_environment(tmp_path, homes):
    weights.write_stand_ins(["raft_large"])  # a "real" file, as far as the policy can tell
    before = os.environ["TORCH_HOME"]
    with metric_home("stand_in", tmp_path / "local", ["dynamic_degree", "psnr"]) as home:
        assert not home.stand_in and os.environ["TORCH_HOME"] == before
    with metric_home("stand_in", tmp_path / "local", ["fvd"]) as home:
        assert home.stand_in and home.folder == (tmp_path / "local").resolve()
        assert os.environ["TORCH_HOME"] == str(tmp_path / "local" / "torch")
        assert weights.file_status("i3d") == "unverified"  # counts as a stand-in
    assert os.environ["TORCH_HOME"] == before and weights.CLIP_HOME_ENV not in os.environ
    assert not weights.weight_path("i3d").exists()  # nothing random in the real home
    with pytest.raises(ValueError, match="unknown weights policy 'download'"), metric_home("download", tmp_path, []):
        pass
    with pytest.raises(ValueError, match="unknown metric\\(s\\) lpips"), metric_home("skip", tmp_path, ["lpips"]):
        pass


# ---------------------------------------------------------------------------------------------------------
# Sampling helpers, the paper's figures, MLflow


@pytest.mark.parametrize("length, count", [(300, 8), (12, 5), (5, 5), (5, 9), (7, 0), (1, 3)])
def test_frame_indices_are_even_and_include_both_ends(length, count):
    index = evaluate.frame_indices(length, count)
    assert index[0] == 0 and index[-1] == length - 1
    assert len(index) == (length if count in (0,) or count >= length else count)


@pytest.mark.parametrize("length, clips, frames, expected", [
    (300, 2, 16, [0, 284]), (300, 3, 100, [0, 100, 200]), (17, 2, 9, [0, 8]), (40, 4, 16, [0, 8, 16, 24]),
    (9, 2, 9, [0]), (12, 2, 16, [])])
def test_fvd_clips_are_evenly_spaced_and_cover_the_video(length, clips, frames, expected):
    assert evaluate.clip_starts(length, clips, frames).tolist() == expected


def test_paper_figures_match_the_papers_text():
    if not PAPER.is_file():
        pytest.skip(f"{PAPER} not available")
    lines = PAPER.read_text().splitlines()
    labels = {"psnr": "PSNR (↑)", "ssim": "SSIM (↑)", "lpips_alex": "LPIPS (↓)", "dists": "DISTS (↓)"}
    for dataset, metrics in paper_tables.TABLE_1.items():
        for metric, texts in metrics.items():
            line = (dataset if metric == "psnr" else "") + "\t" + labels[metric] + "\t" + "\t".join(texts)
            assert lines.count(line) == 1, line
    for number in (2, 3, 4, 5, 6):
        previous = -1
        for dataset, rows in paper_tables._PAPER_DATA[number].items():
            for method, texts in rows.items():
                tail = "\t".join("-" if t is None else t for t in texts)
                if number == 5:  # the paper's "VBench Overall" header spans two cells
                    tail = tail.rsplit("\t", 1)[0] + "\t\t" + tail.rsplit("\t", 1)[1]
                hits = [i for i, line in enumerate(lines) if line.endswith("\t" + tail) and i > previous]
                assert hits, f"Table {number}, {dataset}, {method}: not found after line {previous}"
                previous = hits[0]  # rows in the paper's order (Table 2 prints two identical rows)
    assert len(paper_tables.paper_values()) == 5 * 4 * 9 + 8 * 9 + 6 * 7 + 2 * 6 + 2 * 7 + 8 * 8


def test_quality_score_of_the_papers_table_6_rows():
    for dataset, rows in paper_tables.TABLE_6.items():
        for method, texts in rows.items():
            values = dict(zip(paper_tables.TABLE_6_COLUMNS, map(float, texts)))
            overall = values.pop("vbench_overall")
            assert math.isclose(evaluate.vbench.quality_score(values), overall, abs_tol=1.5e-3), (dataset, method)


@pytest.mark.slow  # MLflow store and nested runs
def test_main_logs_one_nested_mlflow_run_per_method_and_task(project, tmp_path, homes, monkeypatch):
    from mlflow import MlflowClient

    folders = [str(project / "pairs" / "nvs")]
    params = {"evaluate": {"metrics": ["psnr", "temporal_flickering"], "weights": "official",
                           "stand_in_home": str(tmp_path / "w"), "table_metrics_only": True, "frames": 3,
                           "model_frames": 3, "vbench_frames": 0, "fvd_clips": 2,
                           "fvd_clip_frames": 16, "device": "cpu", "threads": 1},
              "train": {"methods": {m: {} for m in METHODS}},
              "experiments": {"nvs": {"task": "nvs", "pairs": folders[0], "vae": "data/vae", "methods": list(METHODS),
                                      "start": None, "train": {}}}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    evaluate.main(["--params", str(tmp_path / "params.yaml"), "--infer", str(project / "infer"),
                   "--train-metrics", str(project / "metrics" / "train"),
                   "--infer-metrics", str(project / "metrics" / "infer.json"), "--metrics", str(tmp_path / "m.json"),
                   "--tables", str(tmp_path / "tables")])
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("chopgrad").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "evaluate"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == sorted(f"{m}/nvs" for m in ("input", *METHODS))
    child = next(r for r in children if r.info.run_name == "per_frame/nvs")
    assert child.data.tags["chopgrad.method"] == "per_frame" and child.data.tags["chopgrad.task"] == "nvs"
    saved = json.loads((tmp_path / "m.json").read_text())
    assert child.data.metrics["psnr"] == pytest.approx(saved["nvs"]["per_frame"]["psnr"])
    assert parent.data.metrics["nvs/per_frame/psnr"] == pytest.approx(saved["nvs"]["per_frame"]["psnr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tables")}
    assert "tables/table2.md" in artifacts and "tables/table1.csv" in artifacts

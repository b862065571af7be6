"""The pipeline frame: dvc.yaml, params.yaml, stages/ and the Prefect flow agree, and they run.

The slow tests reproduce the real pipeline with tiny params in a temporary copy of the repository
(a git + DVC repo of its own), then run the Prefect flow over it under Prefect's test harness.
"""

from __future__ import annotations

import ast
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from stages.common import tracking  # noqa: F401  (telemetry off before Prefect's test server starts)
from stages.common.params import load_params

# One xdist worker takes the module: the tiny project and the Prefect test server start once.
pytestmark = pytest.mark.xdist_group("pipeline")
REPO = Path(__file__).resolve().parents[1]
UNTRACKED_DEPS = {"stages/common/tracking.py"}  # side record only; see dvc.yaml


def read_yaml(path: Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


def write_yaml(path: Path, data: dict) -> None:
    with path.open("w") as f:
        YAML(typ="safe", pure=True).dump(data, f)


def entries(stage: dict, kind: str) -> dict[str, dict]:
    """A stage's outs/metrics/plots as {path: options}."""
    found = {}
    for item in stage.get(kind, []):
        path, options = next(iter(item.items())) if isinstance(item, dict) else (item, {})
        found[path] = options or {}
    return found


def imported_files(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """The project files (stages/, chopgrad/) that ``path`` imports, at any depth, lazily or not."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] not in ("stages", "chopgrad"):
                continue
            parts = name.split(".")
            for candidate in (REPO.joinpath(*parts).with_suffix(".py"), REPO.joinpath(*parts, "__init__.py")):
                if candidate.is_file() and candidate not in seen:
                    seen.add(candidate)
                    imported_files(candidate, seen)
    return seen


def test_stages_sections_files_and_flow_agree():
    from pipeline.flow import stage_order

    stages = read_yaml(REPO / "dvc.yaml")["stages"]
    params = read_yaml(REPO / "params.yaml")
    assert set(params) - {"experiments", "runs"} == set(stages), "one params.yaml section per dvc.yaml stage, and " \
        "no other but the experiments and their runs"
    expanded = stage_names(REPO)  # matrix/foreach entries expanded: train@chopgrad_d0, ...
    assert list(dict.fromkeys(name.split("@")[0] for name in expanded)) == list(stages)
    assert stage_order(REPO) == expanded, "the flow runs every stage (matrix entries expanded), in dvc.yaml's order"
    for name, stage in map(definition, stages.items()):
        assert stage["cmd"].startswith(f"python -m stages.{name} --params params.yaml "), name
        assert stage["params"][0] == name, f"{name}: declare the whole '{name}' section"
        assert all(p.startswith(("experiments", "runs.")) for p in stage["params"][1:]), name  # the experiments
        module = importlib.import_module(f"stages.{name}")
        assert module.STAGE == name
        load_params(name, module.Params, REPO / "params.yaml")  # the committed section is valid
        for path, options in entries(stage, "metrics").items():
            assert path.endswith(".json") and options.get("cache") is False, (name, path)
        for path in entries(stage, "plots"):
            assert path.endswith(".png"), f"{name}: plots are images, rendered offline by `dvc plots show`"


def test_train_methods_are_declared_once_in_params_and_expand_to_one_stage_per_experiment_and_method():
    from stages.common import experiments

    params = read_yaml(REPO / "params.yaml")
    train = params["train"]
    methods = list(train["methods"])
    losses = {name for key, table in train.items() if key.startswith("loss_") for name in table}  # latent_mse too
    assert read_yaml(REPO / "dvc.yaml")["stages"]["train"]["foreach"] == "${runs}"
    experiments.check_runs(params, REPO / "params.yaml")  # the runs: table is the experiments'
    expected = [f"train@{e}-{m}" for e, entry in params["experiments"].items() for m in entry["methods"]]
    assert [name for name in stage_names(REPO) if name.startswith("train@")] == expected
    assert not any(method in (REPO / "dvc.yaml").read_text() for method in methods)
    for path in REPO.joinpath("stages").glob("*.py"):  # no stage lists them again (docstrings may show one)
        tree = ast.parse(path.read_text())
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        named = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant) and id(node) not in docstrings
                 and node.value in methods and node.value not in losses}
        assert not named, f"{path.relative_to(REPO)} names the method(s) {named}: read train.methods instead"


def test_real_data_enter_through_fixed_places_the_stages_depend_on():
    """Issue 13.8: a data set placed in data/external/<name> reruns its stage; no dvc.yaml edit."""
    from ruamel.yaml import YAML

    stages = read_yaml(REPO / "dvc.yaml")["stages"]
    paper = YAML(typ="safe", pure=True).load((REPO / "profiles" / "paper.yaml").read_text())
    for stage, key, folder in (("splat", "scene_dir", "data/external/dl3dv"), ("reinsert", "waymo_path", "data/external/waymo"),
                               ("masks", "rovi_path", "data/external/rovi"), ("masks", "waymo_path", "data/external/waymo"),
                               ("masks", "scene_dir", "data/external/dl3dv"),
                               ("degrade", "train_videos", "data/external/dove"),
                               ("degrade", "vsr_sets", "data/external/vsr")):
        assert folder in stages[stage]["deps"], (stage, folder)
        assert (REPO / folder / "README.md").is_file(), "the fixed place exists in a fresh clone (DVC needs its deps)"
        values = paper[stage][key].values() if isinstance(paper[stage][key], dict) else [paper[stage][key]]
        assert values and all(value.startswith(folder) for value in values), (stage, key)  # the paper profile reads it there


def test_no_stage_imports_another():
    stage_files = {path.stem for path in REPO.joinpath("stages").glob("*.py")} - {"__init__"}
    for path in REPO.joinpath("stages").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                     if isinstance(node, ast.ImportFrom) else [])
            imported = {name.split(".")[1] for name in names if name.startswith("stages.") and name.count(".") >= 1}
            assert not imported & stage_files, f"{path.relative_to(REPO)} imports the stage(s) {imported & stage_files}"


def definition(item: tuple[str, dict]) -> tuple[str, dict]:
    """``(name, stage)`` with a foreach/matrix stage's ``do:`` body as its definition."""
    name, stage = item
    return name, stage.get("do", stage)


def test_stage_deps_cover_the_code_they_import():
    for name, stage in map(definition, read_yaml(REPO / "dvc.yaml")["stages"].items()):
        deps = stage["deps"]
        stage_file = REPO / "stages" / f"{name}.py"
        assert f"stages/{name}.py" in deps
        for file in imported_files(stage_file):
            relative = file.relative_to(REPO).as_posix()
            if relative in UNTRACKED_DEPS or not file.read_text().strip():
                continue
            assert any(relative == dep or relative.startswith(dep.rstrip("/") + "/") for dep in deps), \
                f"stage {name} imports {relative}, which is not among its deps"


# ----------------------------------------------------------------------------------------------------------
# Running it: a temporary copy of the repository with tiny params

TINY = {
    "scenes": {"num_scenes": 3, "num_test_scenes": 1, "frames": 9, "height": 16, "width": 24, "seed": 0,
               "num_objects": 1,
               "rovi_frames": 9, "rovi_stride": 1, "waymo_frames": 9,
               "dove_frames": 9, "vsr_frames": 5},
    "vae": {"source": "train", "base_dim": 4, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "temporal_downsample": [False, True, True],
            "clip_frames": 5, "crop": [16, 16],
            "batch_size": 1, "iterations": 2, "warmup_iterations": 1, "eval_frames": 5},
    "masks": {"dilation": 1},
    "degrade": {"scale": 4},  # 16x24 -> 4x6 low-resolution frames
    "splat": {"every": 4, "iterations": 10, "sh_degree_interval": 5, "init_num_points": 200, "refine_start_iter": 3,
              "refine_stop_iter": 8, "refine_every": 3, "reset_every": 100},
    "reinsert": {"every": 4, "iterations": 10, "sh_degree_interval": 5, "background_points": 100, "actor_points": 20,
                 "refine_start_iter": 3, "refine_stop_iter": 8, "refine_every": 3, "reset_every": 100,
                 "asset_views": 2, "asset_iterations": 5, "asset_points": 40, "min_visible_pixels": 4},
    "train": {"num_layers": 1, "head_dim": 8, "ffn_dim": 32, "text_dim": 16, "freq_dim": 16, "iterations": 1,
              "clip_frames": 5, "crop": [16, 16], "checkpoint_every": 1, "sample_frames": 5},
    "infer": {"max_frames": 5, "warmup_frames": 0, "sample_frames": 5},
    "evaluate": {"metrics": ["psnr", "ssim", "lpips_vgg", "temporal_flickering"], "frames": 0, "model_frames": 2},
    "analysis": {"clips": 1, "locality_frames": 9, "frames": 9, "max_distance": 2, "probes": 1, "d_trunc": [0, 1],
                 "lpips_frames": 5, "backbone_layers": 1, "resource_frames": [5, 9], "losses": ["mse", "lpips"],
                 "weights": "stand_in"},
}
# The tiny run's methods per experiment (each run is a process: a few, not the whole matrix).
TINY_METHODS = {"nvs": ["chopgrad_d1", "latent_mse", "per_frame"], "inpaint_box": ["chopgrad_d1"],
                "inpaint_objects": ["latent_mse"], "inpaint_rovi": ["chopgrad_d1"], "inpaint_box_waymo": ["latent_mse"],
                "driving": ["latent_mse"],
                "sr": ["chopgrad_d1", "per_frame"]}
# Files each stage must leave in the tiny run (stage name: paths relative to the repo).
PRODUCED = {
    "scenes": ["data/scenes/split.json", "metrics/scenes.json", "data/scenes/rovi/train.json",
               "data/scenes/waymo/validation/camera_image/scene_002.parquet"],
    "vae": ["data/vae/config.json", "data/vae/diffusion_pytorch_model.safetensors", "metrics/vae.json",
            "plots/vae/training_curve.png", "plots/vae/reconstruction.png", "plots/vae/reconstruction.mp4"],
    "masks": ["data/masks/inpaint_box/pairs.json", "data/masks/inpaint_objects/pairs.json",
              "data/masks/inpaint_rovi/pairs.json", "data/masks/inpaint_box_waymo/pairs.json", "metrics/masks.json",
              "plots/masks/inpaint_box_scene_000.mp4", "plots/masks/inpaint_objects_scene_002.mp4"],
    "degrade": ["data/degrade/sr/pairs.json", "data/degrade/test_sets/bicubic/pairs.json", "metrics/degrade.json",
                "plots/degrade/sr_scene_000.mp4", "plots/degrade/sr_scene_002.mp4", "plots/degrade/bicubic_scene_002.mp4"],
    "splat": ["data/splat/nvs/pairs.json", "data/splat/nvs/test/scene_002/input/00008.png",
              "data/splat/gaussians/scene_000.safetensors", "data/splat/gaussians/scene_002.safetensors",
              "metrics/splat.json", "plots/splat/training.png", "plots/splat/frames.png",
              "plots/splat/videos/scene_000.mp4", "plots/splat/videos/scene_002.mp4"],
    "reinsert": ["data/reinsert/driving/pairs.json", "data/reinsert/driving/train/scene_001/target/00008.png",
                 "data/reinsert/gaussians/scene_002.safetensors", "metrics/reinsert.json",
                 "plots/reinsert/frames.png", "plots/reinsert/training.png", "plots/reinsert/videos/scene_000.mp4"],
    **{f"train@{task}-{method}": [f"data/train/{method}/{task}/{name}"
                                  for name in ("config.json", "model.safetensors", "train.json", "sample.mp4")]
       + [f"metrics/train/{method}/{task}.json"]
       for task, methods in TINY_METHODS.items() for method in methods},
    "infer": ["metrics/infer.json", "data/infer/chopgrad_d1/nvs/timing.json", "data/infer/chopgrad_d1/nvs/sample.mp4",
              "data/infer/vae_roundtrip/sr/timing.json",
              "data/infer/per_frame/sr/timing.json", "data/infer/chopgrad_d1/inpaint_box/scene_002/00000.png"],
    "evaluate": ["metrics/evaluate.json", "results/tables/evaluation.json",
                 *(f"results/tables/table{n}.{ext}" for n in range(1, 7) for ext in ("md", "csv"))],
    "analysis": ["metrics/analysis.json", "data/analysis/locality.json", "data/analysis/grad_error_lpips.json",
                 *(f"plots/analysis/{name}.png" for name in ("locality", "grad_error", "backbone", "resources",
                                                              "spatial"))],
}


def stage_names(repo: Path) -> list[str]:
    """The stages `dvc repro` runs, matrix and foreach entries expanded (``train@nvs``, ...)."""
    done = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=repo,
                          capture_output=True, text=True, check=True, env=environment(repo.parent))
    return done.stdout.split()


COPY = ["dvc.yaml", "params.yaml", ".dvcignore", ".dvc/config", ".dvc/.gitignore", ".gitignore", "stages",
        "chopgrad", "pipeline", "weights"]
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false"]


def environment(tmp: Path) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
            "OMP_NUM_THREADS": "1"}


def dvc(repo: Path, *args: str) -> str:
    env = {k: v for k, v in environment(repo.parent).items() if k != "CHOPGRAD_EXECUTION_ID"}
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=env, capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC copy of the repository's pipeline, params shrunk to seconds, one commit."""
    repo = tmp_path_factory.mktemp("pipeline") / "repo"
    repo.mkdir()
    for name in COPY:
        source, target = REPO / name, repo / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target)
    from stages.common import experiments

    for readme in REPO.glob("data/external/**/README.md"):  # the fixed places, empty (as in a fresh clone)
        target = repo / readme.relative_to(REPO)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(readme, target)
    params = read_yaml(repo / "params.yaml")
    for section, values in TINY.items():
        params[section].update(values)
    for name, methods in TINY_METHODS.items():
        params["experiments"][name]["methods"] = methods
    params["runs"] = experiments.runs_table(experiments.load(repo / "params.yaml", params))
    write_yaml(repo / "params.yaml", params)
    subprocess.run([*GIT, "init", "-q"], cwd=repo, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=repo, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "pipeline"], cwd=repo, check=True)
    return repo


def mlflow_runs(tmp: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("chopgrad")
    if experiment is None:  # no stage has run against this store yet
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.mark.slow
def test_dvc_repro_runs_skips_and_reruns_only_what_changed(project):
    out = dvc(project, "repro")
    lock = read_yaml(project / "dvc.lock")["stages"]
    assert set(lock) == set(stage_names(project)), "every stage (matrix/foreach entries expanded) ran"
    for stage in lock:
        assert f"Running stage '{stage}'" in out, stage
    for path in ["dvc.lock", *(path for paths in PRODUCED.values() for path in paths)]:
        assert (project / path).is_file(), path
    assert lock["vae"]["params"]["params.yaml"]["vae"]["iterations"] == 2

    runs = [r for r in mlflow_runs(project.parent) if "mlflow.parentRunId" not in r.data.tags]  # stage runs
    assert sorted(r.info.run_name for r in runs) == sorted(lock), "one MLflow run per stage run"
    assert [r.info.run_name for r in runs][:2] == ["scenes", "vae"]
    assert len({r.data.tags["chopgrad.execution_id"] for r in runs}) == 1  # one `dvc repro`, one id
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                            check=True).stdout
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["dvc.stage"] == run.info.run_name
        assert run.data.tags["mlflow.source.git.commit"] == commit.strip()
        key = run.data.tags["dvc.stage_hash"]  # DVC's run-cache key: names its record of this run
        assert (project / ".dvc" / "cache" / "runs" / key[:2] / key).is_dir()
    vae_run = next(r for r in runs if r.info.run_name == "vae")
    metrics = json.loads((project / "metrics" / "vae.json").read_text())
    assert vae_run.data.metrics["test_psnr"] == metrics["test_psnr"]
    assert vae_run.data.params["iterations"] == "2"

    again = dvc(project, "repro")
    assert "Running stage" not in again and "didn't change, skipping" in again

    # A param of the last stage: it alone reruns (a vae param would rerun nearly everything, minutes here).
    swept = dvc(project, "exp", "run", "-S", "evaluate.frames=3")
    assert [line for line in swept.splitlines() if "Running stage" in line] == ["Running stage 'evaluate':"]
    assert read_yaml(project / "dvc.lock")["stages"]["evaluate"]["params"]["params.yaml"]["evaluate"]["frames"] == 3


def output_hashes(project: Path) -> dict[str, str]:
    """Every stage output's hash as DVC recorded it in dvc.lock."""
    lock = read_yaml(project / "dvc.lock")["stages"]
    return {out["path"]: out.get("md5") for stage in lock.values() for out in stage.get("outs", [])}


@pytest.mark.slow
# SIGKILL, the case that leaves leftovers (SIGTERM's clean exit is tests/test_faults.py's); one case keeps
# this worker's share of `make test` (the pipeline group) short.
@pytest.mark.parametrize("stage, build, signal_name", [("train@nvs-latent_mse", "data/train/latent_mse/.nvs.*.tmp",
                                                         "SIGKILL")])
def test_a_killed_repro_is_finished_by_the_next_one_with_the_same_outputs(project, stage, build, signal_name):
    import signal
    import time

    dvc(project, "repro")  # the finished pipeline (a no-op after the test above)
    before = output_hashes(project)
    env = {k: v for k, v in environment(project.parent).items() if k != "CHOPGRAD_EXECUTION_ID"}
    process = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "--force", "--single-item", stage], cwd=project,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while not list(project.glob(build)):  # inside the stage: its outputs removed, new ones being built
        assert process.poll() is None and time.monotonic() < deadline, f"{stage} ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, getattr(signal, signal_name))
    process.wait(timeout=60)
    # As `make repro` does: the params check (which clears what the kill left), then dvc repro. The
    # stage built its outputs aside (staged_outputs), so the old ones may still be in place.
    subprocess.run([sys.executable, "-m", "stages.common.check"], cwd=project, env=env, check=True,
                   capture_output=True)
    assert not list((project / "data").rglob(".*.tmp*")), "the check removes a killed run's leftovers"
    dvc(project, "repro")
    assert output_hashes(project) == before, "the next repro reaches the same outputs, byte for byte"
    assert "up to date" in dvc(project, "status")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_flow_runs_the_pipeline_under_prefect(project, harness, monkeypatch):
    from pipeline.flow import pipeline

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project.parent / 'mlflow.db'}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = len(mlflow_runs(project.parent))
    # scenes too: xdist may run another module's test in between, and pytest then builds a fresh project.
    state = pipeline(repo=str(project), stages=["vae", "scenes"], force=True, return_state=True)
    assert state.is_completed(), state.message
    assert state.result() == ["scenes", "vae"]  # pipeline order
    runs = mlflow_runs(project.parent)[before:]
    assert [run.info.run_name for run in runs] == ["scenes", "vae"]
    assert {run.data.tags["chopgrad.execution_id"] for run in runs} == {f"prefect-{state.state_details.flow_run_id}"}


FIRST = """
import pathlib, sys
attempts = pathlib.Path("../attempts")
attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
if len(attempts.read_text()) < 2:
    sys.exit("fails on its first attempt")
pathlib.Path("a.txt").write_text("a")
"""
SECOND = """
import os, pathlib
pathlib.Path("b.txt").write_text(os.environ["CHOPGRAD_EXECUTION_ID"])
"""
TOY = """
stages:
  first:
    cmd: python first.py
    deps: [first.py]
    outs: [a.txt]
  second:
    cmd: python second.py
    deps: [second.py, a.txt]
    outs: [b.txt]
"""


@pytest.fixture
def toy(tmp_path) -> Path:
    """A two-stage DVC repo whose first stage fails on its first attempt."""
    repo = tmp_path / "toy"
    repo.mkdir()
    subprocess.run([*GIT, "init", "-q"], cwd=repo, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=repo, check=True,
                   env=environment(tmp_path))
    (repo / "first.py").write_text(FIRST)
    (repo / "second.py").write_text(SECOND)
    (repo / "dvc.yaml").write_text(TOY)
    return repo


@pytest.mark.slow
def test_flow_retries_a_failed_stage_and_stops_after_a_final_failure(toy, harness):
    from pipeline.flow import pipeline, stage_order

    assert stage_order(toy) == ["first", "second"]
    state = pipeline(repo=str(toy), retries=1, return_state=True)
    assert state.is_completed(), state.message
    assert (toy.parent / "attempts").read_text() == "xx"  # failed once, passed on the retry
    assert (toy / "b.txt").read_text() == f"prefect-{state.state_details.flow_run_id}"

    (toy.parent / "attempts").unlink()
    (toy / "b.txt").unlink()
    state = pipeline(repo=str(toy), retries=0, force=True, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert "dvc repro --single-item first failed" in str(error)
    assert not (toy / "b.txt").exists()  # the stage after the failure never ran

    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['third'\]"):
        pipeline(repo=str(toy), stages=["third"])


def test_deployment_has_the_cron_schedule_and_parameters():
    from pipeline.deploy import deployment

    built = deployment(name="nightly", cron="30 2 * * *", repo="/some/repo", force=True)
    assert built.name == "nightly"
    assert [schedule.schedule.cron for schedule in built.schedules] == ["30 2 * * *"]
    assert built.parameters == {"repo": "/some/repo", "force": True}


def test_deploy_refuses_to_run_without_a_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # no profile of the user's that names a server
    done = subprocess.run([sys.executable, "-m", "pipeline.deploy", "--cron", "* * * * *"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "PREFECT_API_URL is not set" in done.stderr

"""MLflow tracking of stages, read back from a temporary SQLite store with MlflowClient."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from stages.common import tracking
from stages.common.tracking import stage_run

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Knobs:
    steps: int
    crop: tuple[int, int]
    name: str | None


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    """One SQLite store for the module (creating its tables takes seconds); each test has its experiment."""
    from mlflow import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    return MlflowClient(uri), uri, folder


@pytest.fixture
def store(database, tmp_path, monkeypatch, request):
    """The store, a git repo with one commit standing in for the project, a fixed execution id."""
    client, uri, _ = database
    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    (project / "a.txt").write_text("a")
    subprocess.run([*git, "add", "a.txt"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], cwd=project, check=True)
    monkeypatch.setenv("DVC_ROOT", str(project))
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    monkeypatch.setenv("CHOPGRAD_EXECUTION_ID", "exec-1")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True,
                            check=True).stdout.strip()
    return client, commit


def the_run(client, name: str):
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'")
    return run


def test_stage_run_logs_params_metrics_artifacts_and_tags(store, database, tmp_path):
    client, commit = store
    video, figure, folder = tmp_path / "sample.mp4", tmp_path / "curve.png", tmp_path / "model"
    video.write_bytes(b"\x00mp4")
    figure.write_bytes(b"\x89PNG")
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    with stage_run("demo", Knobs(steps=3, crop=(8, 16), name=None)) as tracker:
        assert tracker.active
        tracker.log_metrics({"psnr": 21.5, "per_scene": {"a": 1.0}})
        tracker.log_curve("loss", [1, 2, 3], [0.9, 0.5, 0.25])
        tracker.log_video(video)
        tracker.log_figure(figure)
        tracker.log_artifact(folder, "model")
        tracker.set_tags({"note": "hi"})

    run = the_run(client, "demo")
    assert run.info.status == "FINISHED"
    assert run.data.params == {"steps": "3", "crop": "(8, 16)", "name": "None"}
    assert run.data.metrics == {"psnr": 21.5, "per_scene/a": 1.0, "loss": 0.25}
    history = client.get_metric_history(run.info.run_id, "loss")
    steps = [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)]
    assert steps == [(1, 0.9), (2, 0.5), (3, 0.25)]
    tags = run.data.tags
    assert tags["chopgrad.stage"] == "demo"
    assert tags["chopgrad.execution_id"] == "exec-1"
    assert tags["mlflow.source.git.commit"] == commit
    assert tags["note"] == "hi"
    assert "dvc.stage" not in tags  # not under DVC
    artifacts = {a.path for top in ("videos", "plots", "model")
                 for a in client.list_artifacts(run.info.run_id, top)}
    assert artifacts == {"videos/sample.mp4", "plots/curve.png", "model/config.json"}
    # The artifacts live next to the database, not in the working directory.
    assert run.info.artifact_uri.startswith((database[2] / "mlartifacts").as_uri())
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "videos" / "sample.mp4"
    assert stored.read_bytes() == b"\x00mp4"


def test_runs_of_one_execution_share_the_id_and_a_failure_is_recorded(store):
    client, _ = store
    with stage_run("first", Knobs(1, (1, 1), "a")):
        pass
    with pytest.raises(RuntimeError, match="boom"), stage_run("second", Knobs(1, (1, 1), "b")):
        raise RuntimeError("boom")
    assert the_run(client, "second").info.status == "FAILED"
    experiment = client.get_experiment_by_name(os.environ["MLFLOW_EXPERIMENT_NAME"])
    grouped = client.search_runs([experiment.experiment_id], "tags.`chopgrad.execution_id` = 'exec-1'")
    assert sorted(r.info.run_name for r in grouped) == ["first", "second"]


def test_child_runs_nest_inherit_the_tags_and_record_failure(store):
    client, commit = store
    with stage_run("parent", Knobs(1, (1, 1), None)) as tracker:
        with tracker.child_run("a/nvs", tags={"chopgrad.method": "a"}) as child:
            assert child.active and child.run_id != tracker.run_id
            child.log_metrics({"psnr": 20.0})
        with pytest.raises(RuntimeError, match="boom"), tracker.child_run("b/nvs"):
            raise RuntimeError("boom")
    parent, first, second = (the_run(client, name) for name in ("parent", "a/nvs", "b/nvs"))
    assert first.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert first.data.tags["chopgrad.execution_id"] == "exec-1" and first.data.tags["chopgrad.method"] == "a"
    assert first.data.tags["mlflow.source.git.commit"] == commit
    assert (first.info.status, second.info.status) == ("FINISHED", "FAILED")
    assert first.data.metrics == {"psnr": 20.0}


def test_a_child_of_an_inactive_run_is_inactive():
    with tracking.Tracker(None, None).child_run("x") as child:
        child.log_metrics({"x": 1.0})  # a no-op, not an error
    assert not child.active


def test_tracking_failures_never_fail_the_stage(tmp_path, monkeypatch, caplog):
    (tmp_path / "a-file").write_text("")  # a database "inside" a file cannot be created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}")
    output = tmp_path / "out.json"
    with (caplog.at_level(logging.WARNING, logger="stages.common.tracking"),
          stage_run("demo", Knobs(1, (1, 1), None)) as tracker):
        output.write_text(json.dumps({"ok": 1}))
        tracker.log_metrics({"x": 1.0})
        tracker.log_video(tmp_path / "missing.mp4")
    assert not tracker.active
    assert json.loads(output.read_text()) == {"ok": 1}
    assert "MLflow tracking is off for stage demo" in caplog.text


def test_a_failing_log_call_warns_and_the_run_still_finishes(store, tmp_path, caplog):
    client, _ = store
    with (caplog.at_level(logging.WARNING, logger="stages.common.tracking"),
          stage_run("demo", Knobs(1, (1, 1), None)) as tracker):
        tracker.log_video(tmp_path / "missing.mp4")
        tracker.log_metrics({"after": 2.0})
    assert "could not log artifact" in caplog.text and "missing.mp4" in caplog.text
    run = the_run(client, "demo")
    assert run.info.status == "FINISHED" and run.data.metrics == {"after": 2.0}


def test_default_store_is_inside_the_repo(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    uri, artifacts = tracking._store(None)
    assert uri == f"sqlite:///{REPO / 'mlflow.db'}"
    assert artifacts == (REPO / "mlartifacts").as_uri()
    ignored = subprocess.run(["git", "check-ignore", "mlflow.db", "mlartifacts/x"], cwd=REPO,
                             capture_output=True, text=True, check=False).stdout.split()
    assert ignored == ["mlflow.db", "mlartifacts/x"]
    assert tracking._store("http://127.0.0.1:5000") == ("http://127.0.0.1:5000", None)


def test_execution_id_without_env_is_fresh_per_stage(monkeypatch):
    monkeypatch.delenv("CHOPGRAD_EXECUTION_ID", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    first, second = tracking.execution_id(), tracking.execution_id()
    assert first.startswith("run-") and first != second


def test_telemetry_is_off_on_import_unless_the_user_says_otherwise():
    env = {k: v for k, v in os.environ.items() if k not in tracking.TELEMETRY_OFF}
    env["DO_NOT_TRACK"] = "false"  # the user's own choice is kept
    code = ("import json, os, stages.common.tracking as t; "
            "print(json.dumps({k: os.environ[k] for k in t.TELEMETRY_OFF}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == {**tracking.TELEMETRY_OFF, "DO_NOT_TRACK": "false"}


# ----------------------------------------------------------------------------------------------------------
# Outages (docs/faults.md): found in seconds, one message, the user's choice of local / skip / stop

DOWN = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused at once


@pytest.fixture
def down(database, monkeypatch):
    """MLFLOW_TRACKING_URI at a dead server; the repository's local store is the module's database."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    monkeypatch.setenv("DVC_ROOT", str(database[2]))  # <root>/mlflow.db: the store made once for the module
    monkeypatch.delenv("DVC_STAGE", raising=False)
    monkeypatch.delenv(tracking.OUTAGE_ENV, raising=False)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outage")
    monkeypatch.setenv("CHOPGRAD_EXECUTION_ID", "exec-down")
    return database[0]


def test_an_unreachable_server_is_found_in_seconds_and_the_run_kept_locally(down, caplog):
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="stages.common.tracking"), \
            stage_run("demo", Knobs(1, (1, 1), None)) as tracker:
        tracker.log_metrics({"psnr": 30.0})
    assert time.monotonic() - started < 30  # MLflow's own retries: about 4 minutes
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"MLflow server {DOWN} is unreachable (" in warning and "Connection refused" in warning
    assert "CHOPGRAD_TRACKING_OUTAGE=local: recording stage demo in the local store" in warning
    run = the_run(down, "demo")
    assert run.info.status == "FINISHED" and run.data.metrics == {"psnr": 30.0}
    assert run.data.tags["chopgrad.intended_tracking_uri"] == DOWN


def test_an_outage_can_skip_tracking_or_stop_the_stage(down, monkeypatch, caplog):
    monkeypatch.setenv(tracking.OUTAGE_ENV, "skip")
    with caplog.at_level(logging.WARNING, logger="stages.common.tracking"), \
            stage_run("skipped", Knobs(1, (1, 1), None)) as tracker:
        tracker.log_metrics({"x": 1.0})
    assert not tracker.active and "stage skipped runs untracked" in caplog.text
    monkeypatch.setenv(tracking.OUTAGE_ENV, "stop")
    ran = []
    with pytest.raises(tracking.TrackingUnavailableError, match=r"unreachable .* stage stopped stops"), \
            stage_run("stopped", Knobs(1, (1, 1), None)):
        ran.append(True)
    assert not ran
    monkeypatch.setenv(tracking.OUTAGE_ENV, "retry")
    with pytest.raises(ValueError, match="CHOPGRAD_TRACKING_OUTAGE='retry'; choose one of local, skip, stop"):
        tracking.outage_choice()


def test_the_params_check_stops_on_an_outage_only_when_asked(monkeypatch):
    from stages.common import check

    monkeypatch.setenv("MLFLOW_TRACKING_URI", DOWN)
    monkeypatch.setenv(tracking.OUTAGE_ENV, "local")
    assert check.check(REPO / "params.yaml", ["scenes"]) == []
    monkeypatch.setenv(tracking.OUTAGE_ENV, "stop")
    (problem,) = check.check(REPO / "params.yaml", ["scenes"])
    assert f"MLflow server {DOWN} is unreachable" in problem and "CHOPGRAD_TRACKING_OUTAGE=stop" in problem


def test_a_server_that_never_answers_is_given_up_after_the_timeout():
    with socket.socket() as listener:  # accepts connections (the kernel's backlog), never replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        started = time.monotonic()
        problem = tracking.server_problem(f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5)
    assert problem == "no answer within 0.5 s" and time.monotonic() - started < 5
    assert tracking.server_problem("sqlite:///x.db") is None


class DeadClient:
    """An MLflow client whose server went away: every call fails as MLflow's REST client does."""

    def __init__(self):
        self.calls = 0

    def log_batch(self, *args, **kwargs):
        import requests
        from mlflow.exceptions import MlflowException

        self.calls += 1
        try:
            raise requests.exceptions.ConnectionError("[Errno 111] Connection refused")
        except requests.exceptions.ConnectionError as error:
            raise MlflowException(f"API request to {DOWN}/api failed with exception {error}")

    set_terminated = log_batch


def test_a_server_lost_mid_run_costs_one_call_then_tracking_stops(caplog):
    client = DeadClient()
    tracker = tracking.Tracker(client, "run-1")
    with caplog.at_level(logging.WARNING, logger="stages.common.tracking"):
        tracker.log_metrics({"a": 1.0})
        tracker.log_curve("loss", [0, 1], [1.0, 0.5])
        tracker.log_metrics({"b": 2.0})
    assert client.calls == 1 and not tracker.active
    assert "the server stopped answering" in caplog.text and "no more tracking for run run-1" in caplog.text


def test_an_interrupted_stage_is_marked_killed(store):
    client, _ = store
    with pytest.raises(KeyboardInterrupt), stage_run("interrupted", Knobs(1, (1, 1), None)):
        raise KeyboardInterrupt
    assert the_run(client, "interrupted").info.status == "KILLED"

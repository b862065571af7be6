"""MLflow tracking for DVC stages: one MLflow run per stage execution.

DVC stays the record of what ran (``dvc.lock``, the cache); MLflow is where people compare runs.
Every stage's ``main()`` wraps its ``run`` in :func:`stage_run`, which opens a run named after the
stage, logs its params, and tags it with the git commit, the DVC stage and its run-cache key, and
a pipeline execution id shared by all the stages of one ``dvc repro`` / Prefect flow run (group or
filter by the tag ``chopgrad.execution_id`` in the MLflow UI).

Where runs go:
    * ``MLFLOW_TRACKING_URI`` when set (a real server, ``http://...``, or any store URI);
    * otherwise ``sqlite:///<repo>/mlflow.db`` with artifacts in ``<repo>/mlartifacts/``
      (both ignored by git). For a ``sqlite:///.../x.db`` URI the artifacts go next to the
      database, in ``mlartifacts/``; a server chooses its own artifact store.

.. warning::
    Tracking is a side record. A tracking failure (server down, disk full, a bad URI) is logged
    as a warning and the stage carries on: it never changes or removes a stage's outputs. Only an
    exception raised by the stage itself fails the stage (and marks the MLflow run FAILED; KILLED
    when SIGTERM or Ctrl-C stopped it, see ``stages/common/cli.py``).

An unreachable server (``http://...``) is found by one probe of at most :data:`PROBE_TIMEOUT`
seconds before the run starts, instead of MLflow's retries (about 4 minutes per call by default).
What happens then is ``CHOPGRAD_TRACKING_OUTAGE`` (:data:`OUTAGE_ENV`):

* ``local`` (default): the run goes to the repository's SQLite store instead, tagged
  ``chopgrad.intended_tracking_uri`` (copy it over later, or compare it there);
* ``skip``: the stage runs untracked;
* ``stop``: the stage fails at once (:class:`TrackingUnavailableError`); ``python -m
  stages.common.check`` (``make repro``) checks it before DVC removes any output.

A server that stops answering during a run costs one call's short retries (:data:`HTTP_DEFAULTS`,
unless the ``MLFLOW_HTTP_REQUEST_*`` variables are set), then tracking stops for that run with one
warning. docs/faults.md lists every fault the pipeline handles.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "OUTAGE_CHOICES",
    "OUTAGE_ENV",
    "PROBE_TIMEOUT",
    "TELEMETRY_OFF",
    "Tracker",
    "TrackingUnavailableError",
    "disable_telemetry",
    "execution_id",
    "outage_choice",
    "repo_root",
    "server_problem",
    "stage_run",
    "unreachable_server",
]

log = logging.getLogger(__name__)

# Every tool the pipeline runs phones home unless told not to (docs/pipeline.md, "Telemetry").
# MLflow accepts DO_NOT_TRACK=true only, not 1.
TELEMETRY_OFF = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}

EXPERIMENT = "chopgrad"
EXECUTION_ID_ENV = "CHOPGRAD_EXECUTION_ID"
OUTAGE_ENV = "CHOPGRAD_TRACKING_OUTAGE"
OUTAGE_CHOICES = ("local", "skip", "stop")
PROBE_TIMEOUT = 5.0  # seconds to wait for a tracking server's first answer
# MLflow retries a failed HTTP call 7 times with backoff factor 2 and a 120 s timeout: minutes per call.
# A side record is not worth that; the user's own MLFLOW_HTTP_REQUEST_* values win.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached and ``CHOPGRAD_TRACKING_OUTAGE=stop`` says to stop."""


def disable_telemetry() -> None:
    """Set the telemetry-off variables that the user has not set (call before importing the tools)."""
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)


disable_telemetry()
for _key, _value in HTTP_DEFAULTS.items():
    os.environ.setdefault(_key, _value)


def repo_root() -> Path:
    """The repository this code runs in: DVC's ``DVC_ROOT`` inside a stage, else this file's repo."""
    return Path(os.environ.get("DVC_ROOT") or Path(__file__).resolve().parents[2])


def execution_id() -> str:
    """The id that groups the MLflow runs of one pipeline execution.

    ``CHOPGRAD_EXECUTION_ID`` when set (the Prefect flow sets it to its flow-run id); otherwise,
    under ``dvc repro`` / ``dvc exp run``, the id of that DVC process (its pid and start time),
    shared by every stage it runs; otherwise a fresh id for this stage alone.
    """
    if os.environ.get(EXECUTION_ID_ENV):
        return os.environ[EXECUTION_ID_ENV]
    if os.environ.get("DVC_STAGE"):
        dvc = _dvc_ancestor()
        if dvc is not None:
            return dvc
    return f"run-{uuid.uuid4().hex[:12]}"


def _dvc_ancestor() -> str | None:
    import psutil

    with contextlib.suppress(psutil.Error):
        for proc in psutil.Process().parents():
            cmdline = proc.cmdline()
            # `dvc repro` runs as .../bin/dvc or as `python -m dvc`
            if any(Path(arg).name == "dvc" for arg in cmdline[:3]):
                return f"dvc-{proc.pid}-{int(proc.create_time())}"
    return None


def outage_choice() -> str:
    """``CHOPGRAD_TRACKING_OUTAGE``: what to do when the tracking server is unreachable."""
    choice = os.environ.get(OUTAGE_ENV, "local").strip().lower() or "local"
    if choice not in OUTAGE_CHOICES:
        raise ValueError(f"{OUTAGE_ENV}={os.environ[OUTAGE_ENV]!r}; choose one of {', '.join(OUTAGE_CHOICES)} "
                         "(local: record in the repository's store, skip: no tracking, stop: fail the stage).")
    return choice


def server_problem(uri: str, timeout: float = PROBE_TIMEOUT) -> str | None:
    """Why the tracking server at ``uri`` cannot be reached, or None (also for non-HTTP stores).

    One request, no retries: any HTTP answer (even 404 or 401) means a server is there; a refused
    connection, an unknown host or no answer within ``timeout`` seconds is reported.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    import requests

    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=timeout)
    except requests.exceptions.Timeout:
        return f"no answer within {timeout:g} s"
    except requests.exceptions.RequestException as err:
        return _reason(err)
    return None


def unreachable_server() -> str | None:
    """The configured tracking server and why it cannot be reached; None when it answers (or is a local store)."""
    uri = _store(None)[0]
    problem = server_problem(uri)
    return f"MLflow server {uri} is unreachable ({problem})" if problem else None


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the errors it was raised from or during, outermost first (at most 16)."""
    chain = [err]
    while len(chain) < 16 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def _reason(err: BaseException) -> str:
    """The innermost cause of a connection error, e.g. '[Errno 111] Connection refused'."""
    return str(_chain(err)[-1])


def _is_outage(err: BaseException) -> bool:
    """Whether ``err`` (or an error it came from) is a lost connection rather than a refused call."""
    import requests

    lost = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError, TimeoutError)
    return any(isinstance(seen, lost) or type(seen).__name__ == "MaxRetryError" for seen in _chain(err))


class Tracker:
    """Logs into one MLflow run; every method warns instead of raising when tracking fails."""

    def __init__(self, client: Any | None, run_id: str | None):
        self._client = client
        self.run_id = run_id

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log scalar metrics (nested mappings are flattened with '/')."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        flat = _flatten(metrics)
        self._call("log metrics", lambda: self._client.log_batch(self.run_id, metrics=[
            Metric(key, float(value), now, step or 0) for key, value in flat.items()]))

    def log_curve(self, name: str, steps: Sequence[int], values: Sequence[float]) -> None:
        """Log a whole metric history (e.g. the training loss) in one call."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(v), now, int(s)) for s, v in zip(steps, values, strict=True)]
        for start in range(0, len(metrics), 1000):  # MLflow's log_batch limit
            chunk = metrics[start:start + 1000]
            self._call(f"log curve {name}",
                       lambda chunk=chunk: self._client.log_batch(self.run_id, metrics=chunk))

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self._call(f"set tag {key}", lambda k=key, v=value: self._client.set_tag(self.run_id, k, str(v)))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Copy a file or folder into the run's artifacts (under ``artifact_path`` if given)."""
        path = Path(path)
        if path.is_dir():
            self._call(f"log artifacts {path}",
                       lambda: self._client.log_artifacts(self.run_id, str(path), artifact_path))
        else:
            self._call(f"log artifact {path}",
                       lambda: self._client.log_artifact(self.run_id, str(path), artifact_path))

    def log_video(self, path: str | Path) -> None:
        """An mp4 under the run's ``videos/`` artifacts (the MLflow UI plays it)."""
        self.log_artifact(path, "videos")

    def log_figure(self, path: str | Path) -> None:
        """An image file under the run's ``plots/`` artifacts."""
        self.log_artifact(path, "plots")

    @contextlib.contextmanager
    def child_run(self, name: str, tags: Mapping[str, Any] | None = None) -> Iterator[Tracker]:
        """A run nested under this one (same store and experiment), closed FINISHED or FAILED.

        It inherits this run's ``chopgrad.*``, ``dvc.*`` and ``mlflow.source*`` tags, so filters on
        the execution id or the git commit find it too. Inactive when this run is, or when it cannot
        be created (a warning, as everywhere here).
        """
        child = Tracker(None, None)
        if self.active:
            try:
                parent = self._client.get_run(self.run_id)
                inherited = {k: v for k, v in parent.data.tags.items()
                             if k.startswith(("chopgrad.", "dvc.", "mlflow.source"))}
                run = self._client.create_run(parent.info.experiment_id, run_name=name, tags={
                    **inherited, **{k: str(v) for k, v in (tags or {}).items()}, "mlflow.parentRunId": self.run_id})
                child = Tracker(self._client, run.info.run_id)
            except Exception as err:  # noqa: BLE001 -- see the module warning
                log.warning("MLflow tracking: could not open the nested run %s: %s", name, err)
        with _closing(child):
            yield child

    def _call(self, what: str, fn) -> None:
        if not self.active:
            return
        try:
            fn()
        except Exception as err:  # noqa: BLE001 -- see the module warning: tracking never fails a stage
            if _is_outage(err):  # each further call would wait through its retries again
                log.warning("MLflow tracking: the server stopped answering (could not %s: %s); no more "
                            "tracking for run %s", what, err, self.run_id)
                self.run_id = None
                return
            log.warning("MLflow tracking: could not %s: %s", what, err)


@contextlib.contextmanager
def stage_run(stage: str, params: Any, *, tracking_uri: str | None = None,
              experiment: str | None = None) -> Iterator[Tracker]:
    """Open an MLflow run for one execution of ``stage``; close it FINISHED or FAILED.

    Args:
        stage: the stage's name (also its ``params.yaml`` section and MLflow run name).
        params: the stage's ``Params`` dataclass; its fields are logged as MLflow params.
        tracking_uri: overrides ``MLFLOW_TRACKING_URI`` and the repo's SQLite store.
        experiment: overrides ``MLFLOW_EXPERIMENT_NAME`` and the default ``"chopgrad"``.

    Yields:
        A :class:`Tracker`; inactive (every call a no-op) if the run could not be started.
    """
    tracker = _start(stage, params, tracking_uri, experiment)
    with _closing(tracker):
        yield tracker


@contextlib.contextmanager
def _closing(tracker: Tracker) -> Iterator[None]:
    """End ``tracker``'s run FINISHED; KILLED when the block is interrupted (Ctrl-C, or SIGTERM
    through ``stages.common.cli``), FAILED when it raises anything else (the exception goes on)."""
    try:
        yield
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        tracker._call(f"mark the run {status}", lambda: tracker._client.set_terminated(tracker.run_id, status))
        raise
    tracker._call("finish the run", lambda: tracker._client.set_terminated(tracker.run_id, "FINISHED"))


def _start(stage: str, params: Any, tracking_uri: str | None, experiment: str | None) -> Tracker:
    uri, artifact_root = _store(tracking_uri)
    tags = {}
    problem = server_problem(uri)
    if problem:
        if _on_outage(stage, uri, problem) == "skip":
            return Tracker(None, None)
        tags, (uri, artifact_root) = {"chopgrad.intended_tracking_uri": uri}, _local_store()
    run = None
    try:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                                       or EXPERIMENT, artifact_root)
        run = client.create_run(experiment_id, run_name=stage, tags={**_tags(stage), **tags})
        flat = _flatten(dataclasses.asdict(params)) if dataclasses.is_dataclass(params) else {}
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in flat.items()])
    except Exception as err:  # noqa: BLE001 -- see the module warning
        log.warning("MLflow tracking is off for stage %s: %s", stage, err)
        return Tracker(None, None)
    except KeyboardInterrupt:  # stopped while the run was being opened: not left RUNNING
        if run is not None:
            Tracker(client, run.info.run_id)._call("mark the run KILLED",
                                                   lambda: client.set_terminated(run.info.run_id, "KILLED"))
        raise
    log.info("MLflow run %s (%s) in %s", run.info.run_id, stage, uri)
    return Tracker(client, run.info.run_id)


def _on_outage(stage: str, uri: str, problem: str) -> str:
    """Say once that the server is unreachable and what happens (``CHOPGRAD_TRACKING_OUTAGE``); the choice.

    Raises:
        TrackingUnavailableError: the choice is ``stop``.
    """
    choice = outage_choice()
    consequence = {"local": f"recording stage {stage} in the local store {_local_store()[0]} instead",
                   "skip": f"stage {stage} runs untracked", "stop": f"stage {stage} stops"}[choice]
    message = (f"MLflow server {uri} is unreachable ({problem}); {OUTAGE_ENV}={choice}: {consequence} "
               f"(choices: {', '.join(OUTAGE_CHOICES)}; docs/faults.md).")
    if choice == "stop":
        raise TrackingUnavailableError(message)
    log.warning("%s", message)
    return choice


def _local_store() -> tuple[str, str]:
    """The repository's own store: ``<repo>/mlflow.db``, artifacts in ``<repo>/mlartifacts/``."""
    root = repo_root()
    return f"sqlite:///{root / 'mlflow.db'}", (root / "mlartifacts").as_uri()


def _store(tracking_uri: str | None) -> tuple[str, str | None]:
    """The tracking URI and, for a local store, where artifacts of a new experiment go."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return _local_store()
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        return uri, (db.parent / "mlartifacts").as_uri()
    return uri, None


def _experiment_id(client: Any, name: str, artifact_root: str | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_root)
    except Exception:  # another stage process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _tags(stage: str) -> dict[str, str]:
    tags = {
        "chopgrad.stage": stage,
        "chopgrad.execution_id": execution_id(),
        "mlflow.source.name": f"stages/{stage.split('@')[0]}.py",  # train@chopgrad_d1 -> stages/train.py
        "mlflow.source.type": "LOCAL",
    }
    root = repo_root()
    commit = _git(root, "rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        tags["chopgrad.git_dirty"] = str(bool(_git(root, "status", "--porcelain", "--untracked-files=no")))
    dvc_stage = os.environ.get("DVC_STAGE")
    if dvc_stage:
        tags["dvc.stage"] = dvc_stage
        stage_hash = _dvc_stage_hash(root, dvc_stage)
        if stage_hash:
            tags["dvc.stage_hash"] = stage_hash
    return tags


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _dvc_stage_hash(root: Path, stage: str) -> str | None:
    """DVC's run-cache key of ``stage``: a hash of its command, dependencies and params.

    The same key names the stage's entry under ``.dvc/cache/runs/`` once the stage has run, so the
    tag leads from an MLflow run to the DVC record of exactly these inputs.
    """
    try:
        from dvc.repo import Repo
        from dvc.stage.cache import _can_hash, _get_stage_hash

        with Repo(str(root)) as repo:
            (dvc_stage,) = repo.stage.collect(stage)
            dvc_stage.save_deps()
            return _get_stage_hash(dvc_stage) if _can_hash(dvc_stage) else None
    except Exception as err:  # noqa: BLE001 -- a missing tag is not worth failing a stage
        log.warning("could not compute the DVC stage hash of %s: %s", stage, err)
        return None


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

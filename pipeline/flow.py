"""The Prefect flow over the DVC pipeline: one task per ``dvc.yaml`` stage, in DVC's order.

DVC stays the one cache and record of what ran: each task is ``dvc repro --single-item <stage>``,
which skips a stage whose deps and params are unchanged and records the run in ``dvc.lock``.
Prefect adds retries, the stages' logs in its UI, and scheduling (``pipeline/deploy.py``). The stage
list is read from ``dvc.yaml`` through DVC's own graph, so a stage added there is a task here.

Every stage run by one flow run logs to MLflow under the same ``chopgrad.execution_id`` tag,
``prefect-<flow run id>`` (see ``stages/common/tracking.py``).

Run it once, without a server (Prefect starts a temporary one)::

    python -m pipeline.flow                 # every stage
    python -m pipeline.flow --stages vae    # some stages, still in pipeline order
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from stages.common.tracking import EXECUTION_ID_ENV, disable_telemetry

disable_telemetry()  # before prefect reads its settings

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

__all__ = ["REPO", "pipeline", "reproduce", "stage_order"]

REPO = Path(__file__).resolve().parents[1]


def stage_order(repo: str | Path = REPO) -> list[str]:
    """The stages of ``repo``'s ``dvc.yaml`` in the order ``dvc repro`` runs them (dependencies first)."""
    from dvc.repo import Repo
    from dvc.repo.reproduce import plan_repro

    with Repo(str(repo)) as dvc_repo:
        stages = plan_repro(dvc_repo.index.graph)
    # `dvc repro` takes a stage of the root dvc.yaml by name, any other as "<dvc.yaml path>:<name>"
    names = []
    for stage in stages:
        dvcfile = os.path.relpath(stage.dvcfile.path, repo)
        names.append(stage.name if dvcfile == "dvc.yaml" else f"{dvcfile}:{stage.name}")
    return names


@task(name="dvc-repro", task_run_name="{stage}", retries=1, retry_delay_seconds=10)
def reproduce(stage: str, repo: str, execution_id: str, force: bool = False) -> str:
    """``dvc repro --single-item <stage>`` in ``repo``, its output forwarded line by line to Prefect's log."""
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    logger.info("$ dvc %s", " ".join(command[3:]))
    # Stage commands say `python`: make it this environment's, as `source .venv/bin/activate` would.
    env = {**os.environ, EXECUTION_ID_ENV: execution_id,
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    with subprocess.Popen(command, cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as process:
        for line in process.stdout:
            logger.info(line.rstrip())
    if process.returncode:
        raise RuntimeError(f"dvc repro --single-item {stage} failed with exit code {process.returncode}; "
                           "its output is in the log above")
    return stage


@flow(name="chopgrad-pipeline")
def pipeline(repo: str = str(REPO), stages: list[str] | None = None, force: bool = False,
             retries: int = 1) -> list[str]:
    """Reproduce the DVC pipeline of ``repo``, stage by stage; a failed stage stops the ones after it.

    Args:
        repo: the repository (holding ``dvc.yaml``).
        stages: run only these stages (in pipeline order); all when None.
        force: re-run stages even when DVC finds them up to date (``dvc repro --force``).
        retries: extra attempts of a failed stage.

    Returns:
        The stages run, in order.
    """
    order = stage_order(repo)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
        order = [stage for stage in order if stage in stages]
    execution_id = f"prefect-{flow_run.get_id()}"
    get_run_logger().info("stages %s, MLflow execution id %s", order, execution_id)
    for stage in order:
        reproduce.with_options(retries=retries)(stage, repo, execution_id, force)
    return order


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the DVC pipeline once as a Prefect flow.")
    parser.add_argument("--repo", default=str(REPO), help="repository holding dvc.yaml")
    parser.add_argument("--stages", nargs="+", help="only these stages (default: all)")
    parser.add_argument("--force", action="store_true", help="re-run up-to-date stages too")
    parser.add_argument("--retries", type=int, default=1, help="extra attempts of a failed stage")
    args = parser.parse_args(argv)
    pipeline(repo=args.repo, stages=args.stages, force=args.force, retries=args.retries)


if __name__ == "__main__":
    main()

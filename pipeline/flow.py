"""The Prefect flow over the DVC pipeline: one task per ``dvc.yaml`` stage, in DVC's order.

DVC stays the one cache and record of what ran: each task is ``dvc repro --single-item <stage>``,
which skips a stage whose deps and params are unchanged and records the run in ``dvc.lock``.
Prefect adds retries, the stages' logs in its UI, and scheduling (``pipeline/deploy.py``). The stage
list is read from ``dvc.yaml`` through DVC's own graph, so a stage added there is a task here.

Every stage run by one flow run logs to MLflow under the same ``chopgrad.execution_id`` tag,
``prefect-<flow run id>`` (see ``stages/common/tracking.py``).

Before any stage, the repository's own params check runs (``python -m stages.common.check``, where the
repository has one): a bad param fails the flow with that one message, before DVC removes any
output. A stage that fails on its input (``<stage>: input error: ...``, see ``stages/common/cli.py``)
is not retried: the same input fails the same way. ``python -m pipeline.flow`` ends with the failure's
message, not a traceback (``CHOPGRAD_TRACEBACK=1`` raises it instead).

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

from stages.common.cli import INPUT_ERROR
from stages.common.tracking import EXECUTION_ID_ENV, disable_telemetry

disable_telemetry()  # before prefect reads its settings

from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run
from prefect.states import Failed

__all__ = ["REPO", "InputError", "StageFailed", "check_params", "pipeline", "reproduce", "stage_error", "stage_order"]

REPO = Path(__file__).resolve().parents[1]
INPUT_MARKER = f": {INPUT_ERROR}: "  # how a stage that rejected its input says so (stages/common/cli.py)
CHECK_MODULE = "stages/common/check.py"


class StageFailed(RuntimeError):
    """``dvc repro`` of one stage failed; the message holds the stage's last words."""


class InputError(StageFailed):
    """A stage, or the params check, rejected its input: retrying cannot help."""


def check_params(repo: str | Path) -> None:
    """Run ``repo``'s params check (``python -m stages.common.check``) where it has one.

    Raises:
        InputError: the check found problems; its message lists them.
    """
    if not (Path(repo) / CHECK_MODULE).is_file():
        return
    done = subprocess.run([sys.executable, "-m", "stages.common.check", "--params", "params.yaml"], cwd=repo,
                          env=_environment(), capture_output=True, text=True, check=False)
    if done.returncode:
        lines = [line.removeprefix("error: ") for line in done.stderr.splitlines() if line.startswith("error: ")]
        raise InputError("params check failed before any stage ran: "
                         + ("; ".join(lines) or done.stderr.strip().splitlines()[-1]))


def _environment(**extra: str) -> dict[str, str]:
    """This environment, with its Python first on PATH (stage commands say `python`)."""
    return {**os.environ, **extra,
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}


def _retryable(task, task_run, state) -> bool:
    """Prefect's retry condition: anything but an input error (the same input fails the same way)."""
    return not isinstance(state.result(raise_on_failure=False), InputError)


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


@task(name="dvc-repro", task_run_name="{stage}", retries=1, retry_delay_seconds=10,
      retry_condition_fn=_retryable)
def reproduce(stage: str, repo: str, execution_id: str, force: bool = False) -> str:
    """``dvc repro --single-item <stage>`` in ``repo``, its output forwarded line by line to Prefect's log.

    Returns:
        ``stage``; or, when ``dvc repro`` fails, a Failed state holding an :class:`InputError` (the stage
        rejected its input: not retried) or a :class:`StageFailed` (retried as the task's options say).
    """
    logger = get_run_logger()
    command = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    logger.info("$ dvc %s", " ".join(command[3:]))
    output = []
    with subprocess.Popen(command, cwd=repo, env=_environment(**{EXECUTION_ID_ENV: execution_id}),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        for line in process.stdout:
            logger.info(line.rstrip())
            output.append(line)
    if process.returncode:  # a Failed state, not an exception: its message, without a traceback in the log
        error = stage_error(stage, process.returncode, output)
        return Failed(message=str(error), data=error)
    return stage


def stage_error(stage: str, returncode: int, output: list[str]) -> StageFailed:
    """The error for a failed ``dvc repro`` of ``stage``: InputError when the stage said its input was bad."""
    said = [line.strip() for line in output if INPUT_MARKER in line]
    if said:
        return InputError(f"stage {stage} rejected its input (not retried): {' '.join(said)}")
    return StageFailed(f"dvc repro --single-item {stage} failed with exit code {returncode}; its output is in "
                       "the log above")


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
        The stages run, in order; or a Failed state holding the first failure (an :class:`InputError`
        when the params check failed, so that no stage ran, or a stage rejected its input), which
        ``pipeline(...)`` raises and ``return_state=True`` returns.
    """
    order = stage_order(repo)
    if stages:
        unknown = sorted(set(stages) - set(order))
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; dvc.yaml has {order}")
        order = [stage for stage in order if stage in stages]
    execution_id = f"prefect-{flow_run.get_id()}"
    get_run_logger().info("stages %s, MLflow execution id %s", order, execution_id)
    try:
        check_params(repo)  # before `dvc repro` removes any stage's outputs
        for stage in order:
            state = reproduce.with_options(retries=retries)(stage, repo, execution_id, force, return_state=True)
            if state.is_failed():
                error = state.result(raise_on_failure=False)
                raise error if isinstance(error, StageFailed) else StageFailed(f"stage {stage}: {state.message}")
    except StageFailed as error:  # said once, in words: the stage's own output is in the log above
        get_run_logger().error("%s", error)
        return Failed(message=str(error), data=error)
    return order


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.flow``: exits 1 with the failure's one-line message when the flow fails."""
    parser = argparse.ArgumentParser(description="Run the DVC pipeline once as a Prefect flow.")
    parser.add_argument("--repo", default=str(REPO), help="repository holding dvc.yaml")
    parser.add_argument("--stages", nargs="+", help="only these stages (default: all)")
    parser.add_argument("--force", action="store_true", help="re-run up-to-date stages too")
    parser.add_argument("--retries", type=int, default=1, help="extra attempts of a failed stage")
    args = parser.parse_args(argv)
    if os.environ.get("CHOPGRAD_TRACEBACK", "") not in ("", "0"):
        pipeline(repo=args.repo, stages=args.stages, force=args.force, retries=args.retries)
        return
    state = pipeline(repo=args.repo, stages=args.stages, force=args.force, retries=args.retries,
                     return_state=True)
    if state.is_failed():
        error = state.result(raise_on_failure=False)
        sys.exit(f"error: {error if isinstance(error, BaseException) else state.message}\n"
                 "(CHOPGRAD_TRACEBACK=1 shows the tracebacks.)")


if __name__ == "__main__":
    main()

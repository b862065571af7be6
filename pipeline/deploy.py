"""Scheduled retraining: serve the pipeline flow as a Prefect deployment with a cron schedule.

Needs a running Prefect server (a temporary one would vanish with this process)::

    PREFECT_SERVER_API_PORT=4200 prefect server start          # UI on http://127.0.0.1:4200
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m pipeline.deploy --cron "0 3 * * *"               # keeps running; Ctrl-C stops it

The process registers the deployment, then polls the server and runs the flow on schedule (and on
"Quick run" from the UI). A scheduled run re-runs only the stages whose data, code or params changed
since the last run; ``--force`` re-runs them all every time.
"""

from __future__ import annotations

import argparse

from pipeline.flow import REPO, pipeline

__all__ = ["DEFAULT_CRON", "DEFAULT_NAME", "deployment", "main"]

DEFAULT_NAME = "scheduled-retraining"
DEFAULT_CRON = "0 3 * * *"  # every day at 03:00 UTC


def deployment(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, repo: str = str(REPO),
               force: bool = False):
    """The pipeline flow as a deployment on ``cron`` (UTC), not yet registered."""
    return pipeline.to_deployment(
        name=name, cron=cron, parameters={"repo": repo, "force": force},
        description="Re-run the chopgrad DVC pipeline (stages whose inputs changed, or all with force).",
        tags=["chopgrad", "dvc"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the pipeline as a scheduled Prefect deployment.")
    parser.add_argument("--name", default=DEFAULT_NAME, help="deployment name")
    parser.add_argument("--cron", default=DEFAULT_CRON, help="schedule, cron syntax, UTC")
    parser.add_argument("--repo", default=str(REPO), help="repository holding dvc.yaml")
    parser.add_argument("--force", action="store_true", help="re-run every stage on each scheduled run")
    args = parser.parse_args(argv)

    from prefect import serve
    from prefect.settings import PREFECT_API_URL

    if not PREFECT_API_URL.value():
        parser.error("PREFECT_API_URL is not set, so the deployment would go to a temporary server that "
                     "dies with this process. Start a server (PREFECT_SERVER_API_PORT=4200 prefect server "
                     "start) and export PREFECT_API_URL=http://127.0.0.1:4200/api")
    serve(deployment(args.name, args.cron, args.repo, args.force))


if __name__ == "__main__":
    main()

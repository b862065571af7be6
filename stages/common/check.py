"""Check every stage's ``params.yaml`` section before DVC touches any output.

``dvc repro`` removes a stage's previous outputs before it runs the stage's command, so a param the
stage then rejects costs those outputs. This command loads every section into its stage's ``Params``
(the same strict loading the stage does: unknown, missing and mistyped keys, ranges) and, where
``CHOPGRAD_TRACKING_OUTAGE=stop``, checks that the MLflow server answers. ``make repro`` and the
Prefect flow (``pipeline/flow.py``) run it first::

    python -m stages.common.check                      # params.yaml, every stage of stages/
    python -m stages.common.check --params exp.yaml vae splat

Exit status 0 when all is well; 2 with one line per problem otherwise (``CHOPGRAD_TRACEBACK=1``
adds the tracebacks). It first removes what killed runs left behind (temporary ``.<name>.<hex>.tmp``
siblings under data/, plots/, metrics/ and results/). Checks that need a stage's input data (e.g. ``splat.every`` against a scene's
frame count) are left to the stage, which makes them before any work (docs/faults.md).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from pathlib import Path

from stages.common.params import ParamsError, load_params

__all__ = ["check", "main", "stage_names"]

STAGES_DIR = Path(__file__).resolve().parents[1]


def stage_names(stages_dir: Path = STAGES_DIR) -> list[str]:
    """Every stage of the project: the modules ``stages/<name>.py``, sorted."""
    return sorted(path.stem for path in stages_dir.glob("*.py") if not path.stem.startswith("_"))


def check(params_path: str | Path, stages: list[str] | None = None) -> list[str]:
    """Load each stage's section of ``params_path`` into its ``Params``; the problems found, one line each.

    Args:
        params_path: the params file (``params.yaml``).
        stages: stage names (``stages/<name>.py``; ``train@x`` counts as ``train``); all when None.
    """
    problems = []
    known = stage_names()
    for name in dict.fromkeys(stage.split("@")[0] for stage in (stages or known)):
        if name not in known:
            problems.append(f"unknown stage {name!r}; the stages are {', '.join(known)}")
            continue
        try:
            module = importlib.import_module(f"stages.{name}")  # imports only: no stage work at import time
            load_params(module.STAGE, module.Params, params_path)
        except ParamsError as error:
            problems.append(str(error))
            if _tracebacks():
                traceback.print_exc()
    problems.extend(_experiment_problems(params_path))
    problems.extend(_tracking_problem())
    return problems


def _experiment_problems(params_path: str | Path) -> list[str]:
    """The experiments: their entries, the runs: table, and each one's train and infer settings."""
    from stages.common import experiments
    from stages.common.params import params_from_mapping

    train, infer = (importlib.import_module(f"stages.{name}") for name in ("train", "infer"))  # as check() loads them

    try:
        data, declared = experiments.load_checked(params_path)
    except ParamsError as error:
        return [str(error)]
    problems = []
    for experiment in declared.values():
        for mapping, module in ((experiments.train_mapping, train), (experiments.infer_mapping, infer)):
            try:
                params_from_mapping(module.STAGE, module.Params, mapping(data, experiment),
                                    source=f"{params_path} ({module.STAGE} with experiments.{experiment.name}.{module.STAGE})")
            except ParamsError as error:
                problems.append(str(error))
    return problems


def _tracking_problem() -> list[str]:
    """The MLflow server's problem: an error when the user chose to stop on one, else a warning."""
    from stages.common import tracking

    try:
        choice = tracking.outage_choice()
    except ValueError as error:
        return [str(error)]
    problem = tracking.unreachable_server()
    if problem and choice == "stop":
        return [f"{problem} and {tracking.OUTAGE_ENV}=stop; start the server, or choose local or skip"]
    if problem:
        print(f"warning: {problem}; {tracking.OUTAGE_ENV}={choice}: the stages will "
              f"{'record in the local store' if choice == 'local' else 'run untracked'}.", file=sys.stderr)
    return []


def _tracebacks() -> bool:
    return os.environ.get("CHOPGRAD_TRACEBACK", "") not in ("", "0")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.common.check", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("stages", nargs="*", help="only these stages (default: all)")
    args = parser.parse_args(argv)
    from stages.common.video import remove_leftovers  # imported by every stage module anyway

    removed = remove_leftovers(Path(args.params).resolve().parent)
    if removed:  # a kill -9 leaves them; .dvcignore keeps DVC from hashing them meanwhile
        print(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(map(str, removed[:3]))}")
    problems = check(args.params, args.stages or None)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    if problems:
        print(f"{len(problems)} problem(s) found before any stage ran; fix them and run again.", file=sys.stderr)
        return 2
    print(f"{args.params}: every stage's params are valid.")
    return 0


if __name__ == "__main__":
    sys.exit(main())

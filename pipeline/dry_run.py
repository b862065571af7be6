"""Plan every stage of a params profile without data or weights: what ``dvc repro`` would run, and with what.

``dvc repro --dry`` stops at the first stage whose inputs are not there yet; this command does not
need them. It checks the profile as the stages will (every section, the experiments and their
``runs:`` table, each experiment's train and infer settings: ``python -m stages.common.check``), asks
DVC itself to expand ``dvc.yaml`` with the profile (``foreach`` over the runs, interpolated commands
and dependencies), and prints, per stage, its command and the inputs that no stage produces and
that must be in place (real data sets under ``data/external/``, model folders), and per training run
the settings it trains with::

    python -m pipeline.dry_run --params profiles/paper.yaml    # the paper's experiments
    python -m pipeline.dry_run                                 # the embedded default (params.yaml)

Exit status 0 when the profile is valid, 2 with the problems otherwise. Nothing is written outside
a temporary folder.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import sys
import tempfile
from pathlib import Path

__all__ = ["main", "plan"]

REPO = Path(__file__).resolve().parents[1]
NOT_HERE = "is not a folder"  # the stages' words for a params path with nothing there
SHOWN = ("iterations", "epochs", "clip_frames", "crop", "tiles", "lr", "weight_decay", "schedule",
         "transformer_path", "nproc_per_node", "nnodes", "sequence_parallel")


def plan(params_path: str | Path) -> dict:
    """``{"problems": [...], "stages": [{"name", "cmd", "deps", "missing"}], "runs": {run: settings}}``."""
    from stages.common import check, experiments

    params_path = Path(params_path)
    found = check.check(params_path)
    # A folder the params name that is not here yet (a data set, model weights) is what the plan needs in
    # place, not an error of the profile; every other problem is.
    absent = [problem for problem in found if NOT_HERE in problem]
    problems = [problem for problem in found if NOT_HERE not in problem]
    if problems:
        return {"problems": problems, "stages": [], "runs": {}, "absent": absent}
    with tempfile.TemporaryDirectory() as tmp:  # DVC expands dvc.yaml against the profile as params.yaml
        shutil.copy2(REPO / "dvc.yaml", Path(tmp) / "dvc.yaml")
        shutil.copy2(params_path, Path(tmp) / "params.yaml")
        stages = _stages(Path(tmp))
    produced = {out for stage in stages for out in stage["outs"]}
    for stage in stages:
        stage["missing"] = list(dict.fromkeys(
            dep for dep in stage["deps"] if not (REPO / dep).exists()
            and not any(dep == out or dep.startswith(out.rstrip("/") + "/") for out in produced)))
    data, declared = experiments.load_checked(params_path)
    runs = {}
    for key, run in data["runs"].items():
        experiment = declared[run["experiment"]]
        settings = experiments.train_mapping(data, experiment)
        world = settings["nproc_per_node"] * settings["nnodes"]
        runs[key] = {**{name: settings[name] for name in SHOWN}, "batch": world // settings["sequence_parallel"],
                     "method": settings["methods"][run["method"]], "start": experiment.start,
                     "infer": experiments.infer_mapping(data, experiment), "eval_frames": experiment.eval_frames}
    return {"problems": [], "stages": stages, "runs": runs, "absent": absent}


def _stages(root: Path) -> list[dict]:
    from dvc.repo import Repo

    quiet = logging.getLogger("dvc")
    level, quiet.level = quiet.level, logging.WARNING  # not "Initialized DVC repository."
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            repo = Repo.init(str(root), no_scm=True, force=True)
    finally:
        quiet.setLevel(level)
    try:
        found = []
        for stage in repo.index.stages:
            found.append({"name": stage.name, "cmd": stage.cmd,
                          "deps": [dep.def_path for dep in stage.deps],
                          "outs": [out.def_path for out in stage.outs]})
        return found
    finally:
        repo.close()


def _iterations(run: dict) -> str:
    if run["iterations"] is not None:
        return str(run["iterations"] * run["method"]["iterations_factor"])
    return f"{run['epochs']} epochs"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=str(REPO / "params.yaml"), help="the profile (params.yaml, profiles/paper.yaml)")
    args = parser.parse_args(argv)
    result = plan(args.params)
    if result["problems"]:
        for problem in result["problems"]:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.params}: {len(result['stages'])} stages")
    if result["absent"]:
        print("needs in place (params paths with nothing there yet):")
        for line in result["absent"]:
            print(f"  - {line}")
    for stage in result["stages"]:
        print(f"\n{stage['name']}\n  $ {stage['cmd']}")
        if stage["missing"]:
            print(f"  needs in place: {', '.join(stage['missing'])}")
    print("\ntraining runs (experiment-method): iterations, clip, crop, tiles, lr, processes, batch")
    for key, run in result["runs"].items():
        gpus = run["nproc_per_node"] * run["nnodes"]
        start = f", starts from {run['start']['experiment']}/{run['start']['method']}" if run["start"] else ""
        print(f"  {key}: {_iterations(run)} x {run['clip_frames']} frames, crop {run['crop']}, tiles {run['tiles']}, "
              f"lr {run['lr']:g}, {gpus} process(es) in groups of {run['sequence_parallel']}, batch {run['batch']}"
              f"{start}; infer max_frames {run['infer']['max_frames']}, segment {run['infer']['segment_frames']}, "
              f"eval_frames {run['eval_frames']}")


if __name__ == "__main__":
    main()

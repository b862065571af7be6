"""The paper's experiments as named entries of ``params.yaml``: each its own data, backbone and settings.

``train:`` and ``infer:`` hold the defaults; each entry of ``experiments:`` says what one
experiment trains on and overrides any of those keys for itself::

    experiments:
      nvs:                          # the experiment's name: data/train/<method>/nvs, table rows "nvs"
        task: nvs                   # the paper task: the pairs' kind, the loss table, the paper table
        pairs: data/splat/nvs       # its pairs folder (a data stage's output, or a fixed place in data/)
        vae: data/vae               # the VAE it decodes with (a CogVideoX / DOVE vae/ for Table 1)
        methods: [chopgrad_d1, latent_mse]   # the train.methods it runs (Table 2's ablation where the paper has it)
        start: null                 # or {experiment: driving_mirage, method: mirage}: start from those weights
        train: {lr: 1.0e-5}         # overrides of train keys
        infer: {max_frames: 297}    # overrides of infer keys
        eval_frames: 294            # first frames evaluated (null: every inferred frame)
        paper_dataset: null         # the paper's data set these rows stand beside (null: the task's default)
        test_sets: {}               # {UDM10: data/degrade/test_sets/UDM10}: more test sets for its trained models
        evaluate_pairs: true        # false: only the test_sets are evaluated, not the pairs folder's own test split

Each entry of ``test_sets`` is one more test set of the experiment's trained models: ``infer`` runs every
model of the experiment on that pairs folder's test pairs and ``evaluate`` scores them as rows of their
own, named ``<experiment>_<label>`` (Table 1: one row group per VSR test set); a label that is a data
set of the paper's table for the task (``UDM10``) is placed beside it. Nothing is trained for them.
``evaluate_pairs: false`` leaves out the pairs folder's own test split (DOVE's training videos have
none that the paper reports: its Table 1 is the five test sets alone); it needs ``test_sets``.

DVC runs one ``train@<experiment>-<method>`` per (experiment, method): ``dvc.yaml`` iterates over the
``runs:`` table, which lists each pair with the folders it depends on (DVC cannot look one section
up from another). ``python -m stages.common.experiments`` writes that table from ``experiments:``;
every stage and ``python -m stages.common.check`` refuse a table that does not match. A stage
instance depends on ``train`` (the defaults) and on its own experiment's entry, so changing one
experiment's params reruns only its runs (and ``infer`` / ``evaluate``, which read every experiment).
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TASKS", "Evaluation", "Experiment", "check_runs", "evaluations", "infer_mapping", "load", "load_checked", "main", "read", "run_key",
           "runs_table",
           "train_mapping", "write_runs"]

TASKS = ("nvs", "inpaint_box", "inpaint_objects", "inpaint_rovi", "driving", "sr")  # the paper's tasks
_KEYS = ("task", "pairs", "vae", "methods", "start", "train", "infer", "eval_frames", "paper_dataset", "test_sets",
         "evaluate_pairs")
LABEL = re.compile(r"[A-Za-z0-9_]+")  # a test set's label: a part of folder and row names
REQUIRED = ("task", "pairs", "vae", "methods", "start", "train")  # what train@ runs depend on (dvc.yaml params)
NOT_OVERRIDABLE = ("methods",)  # train keys an experiment cannot override (the method catalogue is shared)


@dataclass(frozen=True)
class Experiment:
    name: str
    task: str
    pairs: str
    vae: str
    methods: tuple[str, ...]
    start: dict | None = None  # {"experiment": ..., "method": ...}
    train: dict[str, Any] = field(default_factory=dict)
    infer: dict[str, Any] = field(default_factory=dict)
    eval_frames: int | None = None
    paper_dataset: str | None = None
    test_sets: dict[str, str] = field(default_factory=dict)  # label -> pairs folder, evaluated as <name>_<label>
    evaluate_pairs: bool = True  # False: the test_sets only, not the pairs folder's own test split

    def start_folder(self, train_root: str | Path = "data/train") -> Path | None:
        """The trained model folder this experiment starts from (None: from its backbone)."""
        return None if self.start is None else Path(train_root) / self.start["method"] / self.start["experiment"]


@dataclass(frozen=True)
class Evaluation:
    """One test set of an experiment's trained models: what ``infer`` runs them on and ``evaluate`` scores."""

    name: str  # rows and folders: data/infer/<method>/<name>
    experiment: Experiment  # whose models run (data/train/<method>/<experiment.name>), with its VAE and infer settings
    pairs: str  # the pairs folder whose test pairs are restored
    paper_dataset: str | None  # the paper's data set the rows stand beside (None: the task's default)


def evaluations(declared: dict[str, Experiment]) -> list[Evaluation]:
    """Every test set of every experiment: its own pairs first (unless ``evaluate_pairs`` is false), then each of
    its ``test_sets``."""
    from stages.common.paper_tables import paper_datasets

    out = []
    for experiment in declared.values():
        if experiment.evaluate_pairs:
            out.append(Evaluation(experiment.name, experiment, experiment.pairs, experiment.paper_dataset))
        for label, folder in experiment.test_sets.items():
            dataset = label if label in paper_datasets(experiment.task) else None
            out.append(Evaluation(f"{experiment.name}_{label}", experiment, folder, dataset))
    return out


def run_key(experiment: str, method: str) -> str:
    """The DVC name of a run: ``train@<run_key>``."""
    return f"{experiment}-{method}"


def read(path: str | Path) -> dict:
    from ruamel.yaml import YAML

    from stages.common.params import ParamsError

    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: no such params file (run from the repository root or pass --params)")
    data = YAML(typ="safe", pure=True).load(path.read_text())
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: not a mapping of sections")
    return data


def load(path: str | Path = "params.yaml", data: dict | None = None) -> dict[str, Experiment]:
    """Every experiment of the params file, checked (keys, tasks, methods, starts: no cycles).

    Raises:
        ParamsError: naming the experiment and the key, and what to write instead.
    """
    from stages.common.params import ParamsError

    data = read(path) if data is None else data
    entries = data.get("experiments")
    if not isinstance(entries, dict) or not entries:
        raise ParamsError(f"{path}: no 'experiments:' section (a mapping of named experiments; see "
                          "stages/common/experiments.py)")
    methods = (data.get("train") or {}).get("methods") or {}
    experiments = {}
    for name, entry in entries.items():
        where = f"{path}: experiments.{name}"
        if not isinstance(entry, dict):
            raise ParamsError(f"{where} must be a mapping of {', '.join(_KEYS)}")
        unknown = sorted(set(entry) - set(_KEYS))
        missing = [key for key in REQUIRED if key not in entry]
        if unknown or missing:
            raise ParamsError(f"{where}: unknown key(s) {unknown} / missing key(s) {missing}; an experiment takes "
                              f"{', '.join(_KEYS)}")
        if "-" in str(name):
            raise ParamsError(f"{where}: experiment names may not contain '-' (it separates experiment and method in "
                              "the run names); use '_'")
        if entry["task"] not in TASKS:
            raise ParamsError(f"{where}.task must be one of {', '.join(TASKS)}, got {entry['task']!r}")
        listed = entry["methods"]
        if not isinstance(listed, list) or not listed or len(set(listed)) != len(listed):
            raise ParamsError(f"{where}.methods must list distinct methods of train.methods")
        for method in listed:
            if method not in methods:
                raise ParamsError(f"{where}.methods: {method!r} is not in train.methods ({', '.join(methods)})")
        for section in ("train", "infer"):
            overrides = entry.get(section) or {}
            if not isinstance(overrides, dict):
                raise ParamsError(f"{where}.{section} must be a mapping of {section} keys to override")
            defaults = data.get(section) or {}
            bad = sorted(key for key in overrides if key not in defaults or key in NOT_OVERRIDABLE)
            if bad:
                raise ParamsError(f"{where}.{section}: {bad} are not {section} keys an experiment can override "
                                  f"(the keys of the '{section}:' section, except {', '.join(NOT_OVERRIDABLE)})")
        start = entry.get("start")
        if start is not None and (not isinstance(start, dict) or set(start) != {"experiment", "method"}):
            raise ParamsError(f"{where}.start must be null or {{experiment: <name>, method: <method>}}")
        dataset = entry.get("paper_dataset")
        if dataset is not None:
            from stages.common.paper_tables import paper_datasets

            if dataset not in paper_datasets(entry["task"]):
                raise ParamsError(f"{where}.paper_dataset {dataset!r} is not a data set of the paper's {entry['task']} "
                                  f"table(s): one of {', '.join(sorted(paper_datasets(entry['task'])))}, or null")
        frames = entry.get("eval_frames")
        if frames is not None and (not isinstance(frames, int) or isinstance(frames, bool) or frames < 1):
            raise ParamsError(f"{where}.eval_frames must be a positive integer or null (every inferred frame)")
        test_sets = entry.get("test_sets") or {}
        if not isinstance(test_sets, dict) or not all(isinstance(k, str) and LABEL.fullmatch(k) and isinstance(v, str)
                                                      for k, v in test_sets.items()):
            raise ParamsError(f"{where}.test_sets must map labels (letters, digits, _) to pairs folders, e.g. "
                              "{UDM10: data/degrade/test_sets/UDM10}; got " + repr(test_sets))
        own = entry.get("evaluate_pairs", True)
        if not isinstance(own, bool) or (not own and not test_sets):
            raise ParamsError(f"{where}.evaluate_pairs must be true or false, and false only with test_sets (an "
                              f"experiment evaluated nowhere); got {own!r}")
        experiments[name] = Experiment(
            name, entry["task"], str(entry["pairs"]), str(entry["vae"]), tuple(listed), start,
            dict(entry.get("train") or {}), dict(entry.get("infer") or {}), frames, entry.get("paper_dataset"),
            dict(test_sets), own)
    for experiment in experiments.values():
        _check_start(experiments, experiment, path)
    names = [e.name for e in evaluations(experiments)]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ParamsError(f"{path}: {clash} name both an experiment and an experiment's test set "
                          "(<experiment>_<label>); rename the label or the experiment")
    return experiments


def _check_start(experiments: dict[str, Experiment], experiment: Experiment, path) -> None:
    from stages.common.params import ParamsError

    seen = [experiment.name]
    current = experiment
    while current.start is not None:
        upstream = current.start["experiment"]
        if upstream not in experiments:
            raise ParamsError(f"{path}: experiments.{current.name}.start names experiment {upstream!r}, which is not "
                              f"declared (the experiments are {', '.join(experiments)})")
        if current.start["method"] not in experiments[upstream].methods:
            raise ParamsError(f"{path}: experiments.{current.name}.start: experiment {upstream} does not run method "
                              f"{current.start['method']!r} (it runs {', '.join(experiments[upstream].methods)})")
        if upstream in seen:
            raise ParamsError(f"{path}: experiments start from each other in a cycle: {' -> '.join(seen + [upstream])}")
        seen.append(upstream)
        current = experiments[upstream]


def runs_table(experiments: dict[str, Experiment], train_root: str = "data/train") -> dict[str, dict]:
    """The ``runs:`` table ``dvc.yaml`` iterates over: one entry per (experiment, method).

    ``start`` is the folder the run depends on beyond its pairs and VAE: the upstream model of a
    chained experiment, else the VAE folder again (DVC records a dependency twice; it keeps the
    stage's dependency list the same shape for every run, and the VAE's two files cost nothing to
    hash, where the pairs folder's thousands of frames would, on every `dvc status`).
    """
    table = {}
    for experiment in experiments.values():
        start = experiment.start_folder(train_root)
        for method in experiment.methods:
            table[run_key(experiment.name, method)] = {
                "experiment": experiment.name, "method": method, "pairs": experiment.pairs, "vae": experiment.vae,
                "start": str(start) if start is not None else experiment.vae}
    return table


def check_runs(data: dict, path: str | Path = "params.yaml", declared: dict[str, Experiment] | None = None) -> None:
    """Refuse a ``runs:`` table that does not match ``experiments:`` (ParamsError naming the fix).

    ``declared``: the experiments of ``data`` when already loaded (:func:`load`)."""
    from stages.common.params import ParamsError

    expected = runs_table(load(path, data) if declared is None else declared)
    if data.get("runs") != expected:
        have = set(data.get("runs") or {})
        detail = (f"missing {sorted(set(expected) - have)}, extra {sorted(have - set(expected))}"
                  if have != set(expected) else "entries differ in their folders")
        raise ParamsError(f"{path}: the runs: table does not match experiments: ({detail}); rewrite it with "
                          f"`python -m stages.common.experiments --params {path}`")


def load_checked(path: str | Path) -> tuple[dict, dict[str, Experiment]]:
    """The params file's sections and its experiments, with its ``runs:`` table checked against them."""
    data = read(path)
    declared = load(path, data)
    check_runs(data, path, declared)
    return data, declared


def train_mapping(data: dict, experiment: Experiment) -> dict[str, Any]:
    """The ``train`` section an experiment trains with: the defaults, its overrides on top."""
    return {**data["train"], **experiment.train}


def infer_mapping(data: dict, experiment: Experiment) -> dict[str, Any]:
    return {**data["infer"], **experiment.infer}


def write_runs(path: str | Path) -> dict[str, dict]:
    """Rewrite the ``runs:`` section of ``path`` from its ``experiments:`` (comments elsewhere kept)."""
    from ruamel.yaml import YAML

    path = Path(path)
    table = runs_table(load(path))
    yaml = YAML()  # round trip: comments and order of the other sections stay
    yaml.width = 118  # the file's own line length
    yaml.preserve_quotes = True
    yaml.representer.add_representer(type(None), lambda representer, _: representer.represent_scalar(
        "tag:yaml.org,2002:null", "null"))
    document = yaml.load(path.read_text())
    document["runs"] = {key: dict(entry) for key, entry in table.items()}
    with path.open("w") as handle:
        yaml.dump(document, handle)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the runs: table of a params file from its experiments:.")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--check", action="store_true", help="only check that the table matches (exit 2 if not)")
    args = parser.parse_args(argv)
    from stages.common.params import ParamsError

    try:
        if args.check:
            check_runs(read(args.params), args.params)
            print(f"{args.params}: runs: matches experiments:")
        else:
            table = write_runs(args.params)
            print(f"{args.params}: runs: {len(table)} (experiment, method) runs written")
    except ParamsError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

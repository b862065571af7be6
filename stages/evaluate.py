"""Stage ``evaluate``: every method's test videos scored, and the paper's Tables 1-6 filled in.

Reads the pairs folders of the experiments in ``params.yaml`` (``experiments:``, their test pairs: degraded
input and ground truth, :mod:`stages.common.pairs`; the first ``eval_frames`` of each), the inference
outputs ``data/infer/<method>/<experiment>/<scene>/`` with their ``timing.json``, and the measured times,
which the train and infer stages keep out of their outputs so that a rerun leaves those bytes alone:
``metrics/train/<method>/<experiment>.json`` (training seconds) and ``metrics/infer.json`` (seconds per
frame) (layouts: ``docs/interfaces.md``). Each experiment's rows go in the tables of its paper task.
For every (experiment, method) found, and for the degraded input itself (method ``input``, no model: the
reference every method should beat), it computes the metrics of :mod:`chopgrad.metrics` named in
``params.yaml`` (conventions: ``docs/evaluation.md``), the inference seconds per frame and the
training time, then writes

* ``metrics/evaluate.json``: ``{task: {method: {metric: value}}}`` (DVC metrics);
* ``results/tables/table{1..6}.{md,csv}``: the paper's tables (:mod:`stages.common.paper_tables`),
  our rows beside the paper's published figures; ``results/tables/evaluation.json``: the full record
  (per-metric weight-file statuses, what was not computed and why, frame sampling);
* an MLflow run ``evaluate`` with the tables, and one nested run per (method, task) with its metrics.

Pretrained weights follow the ``weights`` policy (:func:`chopgrad.weights.metric_home`); metrics computed on
stand-in (random) weights are marked ``‡`` in every table and ``stand_in`` in the JSON.

Never computed, and said so in the tables: VBench's ``motion_smoothness`` (its AMT-S interpolator
ships in no maintained package) and so the VBench overall quality score, which needs all seven
quality dimensions; ``dynamic_degree`` on frames smaller than RAFT's 128x128 minimum.

Cost (params): with ``table_metrics_only`` each task gets only the metrics its paper table(s) show
(``sr``: Table 1's; ``nvs``: Table 2's; inpainting: Tables 3/5 and 6; ``driving``: Table 4's).
PSNR and SSIM run on ``frames`` evenly spaced frames per video, LPIPS, DISTS and FID on
``model_frames``, the model-based VBench dimensions on ``vbench_frames``, FVD on ``fvd_clips``
evenly spaced clips of ``fvd_clip_frames`` consecutive frames per video (each clip one sample;
overlapping only in videos shorter than all of them); temporal flickering on every frame. 0 means
every frame.

Length: a prediction may hold only the first N frames of its target (``infer.max_frames``); every
method of a task must then hold the same N per video, and all metrics of that task, the input's
included, are computed on those first N frames, as the paper evaluates on the first frames its
models restored (supplement C.2: the first 294; C.3: the first N of training length).

    python -m stages.evaluate --params params.yaml --infer data/infer --train-metrics metrics/train \
        --infer-metrics metrics/infer.json --metrics metrics/evaluate.json --tables results/tables
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import chopgrad  # noqa: F401  (before torchvision/lpips/pyiqa: the torchvision fix for CPU-only torch)
from chopgrad import metrics as cm
from chopgrad import weights as cw
from chopgrad.metrics import vbench
from chopgrad.metrics.limits import FVD_MIN_FRAMES, MIN_SIZE
from chopgrad.weights import POLICIES, metric_home
from stages.common import cli, paper_tables, video
from stages.common.pairs import load_manifest

log = logging.getLogger("stages.evaluate")

STAGE = "evaluate"
INPUT = "input"  # the method name of the degraded input itself
FRAME_METRICS = ("psnr", "ssim", "lpips_vgg", "lpips_alex", "dists")
PIXEL_METRICS = ("psnr", "ssim")  # cheap: on `frames`; the networks on `model_frames`
VBENCH_MODELS = ("subject_consistency", "background_consistency", "aesthetic_quality", "imaging_quality")
NEVER = {  # columns no run computes, and why (docs/evaluation.md, "VBench")
    "motion_smoothness": "VBench scores it with the AMT-S frame interpolator, which no maintained package ships",
    "vbench_overall": "VBench's quality score needs all seven quality dimensions, motion smoothness included",
}
CHUNK = 64  # frames per call of a frame metric (bounds memory on long, large videos)


@dataclass(frozen=True)
class Params:
    metrics: tuple[str, ...]  # chopgrad.metrics names to compute (the tables show those computed)
    weights: Literal["official", "stand_in", "skip"]  # where metric weights come from (chopgrad.weights.metric_home)
    stand_in_home: str  # project-local weight home for `stand_in` (git-ignored); never the user's caches
    table_metrics_only: bool  # per task, only the metrics its paper table(s) show (false: all, every task)
    frames: int  # evenly spaced frames per video for PSNR and SSIM; 0 = every frame
    model_frames: int  # evenly spaced frames per video for LPIPS, DISTS and FID (networks); 0 = every frame
    vbench_frames: int  # evenly spaced frames per video for the model-based VBench dimensions; 0 = all
    fvd_clips: int  # evenly spaced clips per video for FVD, each one sample (FVD needs >= 2 per set)
    fvd_clip_frames: int  # consecutive frames per FVD clip (16 is the standard; I3D needs >= 9)
    device: str  # "cpu" or "cuda[:n]"
    threads: int  # CPU threads for torch, 0 = torch's default

    def __post_init__(self):
        asked = list(self.metrics)
        never = [m for m in asked if m in NEVER]
        if never:
            raise ValueError(f"evaluate.metrics: {', '.join(never)} cannot be computed ({NEVER[never[0]]}); "
                             "remove it: the tables report it as not computed")
        unknown = [m for m in asked if m not in cm.METRICS]
        if unknown or not asked or len(set(asked)) != len(asked):
            raise ValueError(f"evaluate.metrics: unknown, repeated or no metrics {unknown or asked}; "
                             f"choose from {', '.join(cm.METRICS)}")
        if self.weights not in POLICIES:
            raise ValueError(f"evaluate.weights must be one of {', '.join(POLICIES)}, got {self.weights!r}")
        if min(self.frames, self.model_frames) < 0 or self.vbench_frames < 0 or self.vbench_frames == 1:
            raise ValueError("evaluate.frames and evaluate.model_frames must be >= 0 and evaluate.vbench_frames "
                             "0 or >= 2 (consistency compares frames), 0 meaning every frame")
        if self.fvd_clips < 1 or self.fvd_clip_frames < FVD_MIN_FRAMES:
            raise ValueError(f"evaluate.fvd_clips must be >= 1 and evaluate.fvd_clip_frames >= "
                             f"{FVD_MIN_FRAMES} (I3D's temporal pooling)")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"evaluate.device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        if self.threads < 0:
            raise ValueError(f"evaluate.threads must be >= 0 (0: torch's default), got {self.threads}")


# ---------------------------------------------------------------------------------------------------------
# What there is to evaluate, checked before any work


class EvaluateError(ValueError):
    """An input of the evaluate stage that does not match the documented layouts."""


@dataclass(frozen=True)
class Source:
    """One experiment to evaluate: its name (the rows' label), pairs folder, paper task and what is scored."""

    name: str
    folder: Path
    task: str | None = None  # the paper task (its tables); None: the pairs folder's own task
    eval_frames: int | None = None  # first frames evaluated (None: every inferred frame)
    paper_dataset: str | None = None  # the paper's data set its rows stand beside (None: the task's default)
    trained_as: str | None = None  # the experiment whose models ran (its training seconds); None: this name


def sources_of(params_path: str | os.PathLike) -> list[Source]:
    """The experiments of a params file as evaluate's sources (checked as the train stage checks them)."""
    from stages.common import experiments

    data = experiments.read(params_path)
    declared = experiments.load(params_path, data)
    return [Source(e.name, Path(e.pairs), e.experiment.task, e.experiment.eval_frames, e.paper_dataset,
                   e.experiment.name) for e in experiments.evaluations(declared)]


@dataclass
class TaskPlan:
    task: str  # the experiment's name
    folder: Path  # the pairs folder
    fps: float
    pairs: list[dict]  # its test pairs (stages.common.pairs.load_pairs entries)
    lengths: dict[str, int] = field(default_factory=dict)  # scene -> frames evaluated (the first N)
    outputs: dict[str, Path] = field(default_factory=dict)  # method -> data/infer/<method>/<experiment>
    timing: dict[str, dict] = field(default_factory=dict)  # method -> timing.json
    seconds_per_frame: dict[str, float] = field(default_factory=dict)  # method -> metrics/infer.json's
    train_seconds: dict[str, float] = field(default_factory=dict)  # method -> metrics/train/<method>/<task>.json's
    kind: str = ""  # the paper task (its tables)
    eval_frames: int | None = None  # first frames evaluated (None: all inferred)
    paper_dataset: str | None = None
    trained_as: str = ""  # the experiment whose models ran here (metrics/train/<method>/<trained_as>.json)


def _read_json(path: Path, fix: str) -> dict:
    if not path.is_file():
        raise EvaluateError(f"{path} is missing; {fix}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EvaluateError(f"{path} is not valid JSON ({error}); {fix}") from error
    if not isinstance(data, dict):
        raise EvaluateError(f"{path} holds no JSON object; {fix}")
    return data


def _seconds(data: dict, keys: tuple[str, ...], path: Path, fix: str) -> float:
    """The number at ``data[keys[0]][keys[1]]...``, checked: finite and non-negative."""
    value = data
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    where = ".".join(keys)
    if value is None:
        raise EvaluateError(f"{path} has no {where}; {fix}")
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise EvaluateError(f"{path}: {where} must be a non-negative number, got {value!r}; {fix}")
    return float(value)


def _check_output(folder: Path, pair: dict, method: str) -> int:
    """The prediction folder of one test pair: its frame count N (<= the target's) and the target's size."""
    where = f"{method} on {pair['scene']}"
    try:
        paths = video.list_frames(folder)
        first = video.read_image(paths[0])
    except video.MediaError as error:
        raise EvaluateError(f"{where}: {error} Every test pair needs its prediction (re-run `infer`).") from error
    if len(paths) > pair["frames"] or first.shape[:2] != (pair["height"], pair["width"]):
        raise EvaluateError(f"{where}: {folder} holds {len(paths)} frames of {first.shape[0]}x{first.shape[1]}; "
                            f"the target has {pair['frames']} frames of {pair['height']}x{pair['width']} "
                            "(a prediction has its target's size and at most its frame count).")
    targets = [path.stem for path in video.list_frames(pair["target"])[: len(paths)]]
    if [path.stem for path in paths] != targets:  # scored by name, frame k against target frame k
        wrong = [path.name for path, stem in zip(paths, targets) if path.stem != stem]
        raise EvaluateError(f"{where}: {folder} holds {', '.join(wrong[:5])}, which the target's first "
                            f"{len(paths)} frames ({targets[0]} ... {targets[-1]}) lack; a prediction is "
                            "named like its target's frames (re-run `infer`).")
    return len(paths)


def plan(params: Params, infer_dir: str | os.PathLike, train_metrics: str | os.PathLike,
         infer_metrics: str | os.PathLike, sources: list[Source]) -> dict[str, TaskPlan]:
    """Every (experiment, method) to evaluate, validated: EvaluateError/PairsError naming the problem and fix.

    ``train_metrics``: the folder of the train stages' ``<method>/<experiment>.json``; ``infer_metrics``:
    the infer stage's metrics file; ``sources``: the experiments (:func:`sources_of`).
    """
    tasks: dict[str, TaskPlan] = {}
    for source in sources:
        folder = Path(source.folder)
        manifest = load_manifest(folder)
        test = [pair for pair in manifest["pairs"] if pair["split"] == "test"]
        if not test:
            raise EvaluateError(f"{folder}/pairs.json has no test pairs: nothing to evaluate for "
                                f"{source.name!r} (check data/scenes/split.json)")
        if source.name in tasks:
            raise EvaluateError(f"two sources are named {source.name!r}: give each experiment its own name")
        kind = source.task or manifest["task"]
        if manifest["task"] != kind:
            raise EvaluateError(f"{folder} holds {manifest['task']!r} pairs but {source.name} is a {kind!r} experiment")
        tasks[source.name] = TaskPlan(source.name, folder, float(manifest["fps"]), test, kind=kind,
                                      eval_frames=source.eval_frames, paper_dataset=source.paper_dataset,
                                      trained_as=source.trained_as or source.name)

    infer_dir, train_metrics, infer_metrics = Path(infer_dir), Path(train_metrics), Path(infer_metrics)
    method_dirs = sorted(p for p in infer_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if infer_dir.is_dir() else []
    if not method_dirs:
        raise EvaluateError(f"no inference outputs in {infer_dir} (expected {infer_dir}/<method>/<experiment>/); "
                            "run the `infer` stage first")
    infer_fix = "the infer stage writes it (re-run `infer`)"
    timed = _read_json(infer_metrics, infer_fix)
    trained: dict[Path, dict] = {}  # metrics/train/<method>/<experiment>.json, read once
    for method_dir in method_dirs:
        method = method_dir.name
        if method == INPUT:
            raise EvaluateError(f"{method_dir}: the method name {INPUT!r} is reserved for the degraded input")
        task_dirs = sorted(p for p in method_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not task_dirs:
            raise EvaluateError(f"{method_dir} holds no task folders (expected {method_dir}/<task>/<scene>/)")
        for task_dir in task_dirs:
            if task_dir.name not in tasks:  # an experiment no longer declared
                log.warning("%s: %r is not an experiment of the params; not evaluated", task_dir, task_dir.name)
                continue
            task = tasks[task_dir.name]
            for pair in task.pairs:
                length = _check_output(task_dir / pair["scene"], pair, method)
                if task.eval_frames is not None:  # the paper: the first 294 of 297 inferred frames (Table 2)
                    length = min(length, task.eval_frames)
                if task.lengths.setdefault(pair["scene"], length) != length:
                    raise EvaluateError(
                        f"{method} on {pair['scene']}: {length} frames, but another method of task {task.task!r} "
                        f"has {task.lengths[pair['scene']]}; every method must restore the same first frames")
            task.outputs[method] = task_dir
            task.timing[method] = _read_json(task_dir / "timing.json", infer_fix)
            task.seconds_per_frame[method] = _seconds(timed, (method, task.task, "seconds_per_frame"), infer_metrics,
                                                      infer_fix)
            if task.timing[method].get("reference") is not True:  # a reference (vae_roundtrip) trains nothing
                path = train_metrics / method / f"{task.trained_as}.json"
                fix = f"the train stage writes it (re-run `train@{task.trained_as}-{method}`)"
                if path not in trained:
                    trained[path] = _read_json(path, fix)
                task.train_seconds[method] = _seconds(trained[path], ("tasks", task.trained_as, "train_seconds"), path,
                                                      fix)
    for task in tasks.values():  # only the input to score: every frame (or the first eval_frames)
        for pair in task.pairs:
            task.lengths.setdefault(pair["scene"], min(pair["frames"], task.eval_frames or pair["frames"]))
    return tasks


# ---------------------------------------------------------------------------------------------------------
# Scoring


def frame_indices(length: int, count: int) -> np.ndarray:
    """``count`` evenly spaced frame indices of ``length`` frames, first and last included; 0: all."""
    if count == 0 or count >= length:
        return np.arange(length)
    return np.unique(np.linspace(0, length - 1, count).round().astype(int))


def clip_starts(length: int, clips: int, clip_frames: int) -> np.ndarray:
    """Starts of ``clips`` evenly spaced clips of ``clip_frames`` frames, first and last frame covered.

    The clips overlap only when the video is shorter than ``clips * clip_frames`` (tiny CPU runs);
    none fit in a video shorter than one clip.
    """
    if length < clip_frames:
        return np.zeros(0, int)
    return np.unique(np.linspace(0, length - clip_frames, clips).round().astype(int))


def _tensor(frames: np.ndarray) -> torch.Tensor:  # [T, H, W, 3] uint8 -> [1, 3, T, H, W] uint8
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2)[None]


def task_metrics(task: str, params: Params) -> list[str]:
    """The metrics to compute for a paper ``task``: all requested, or those its paper table(s) show."""
    shown = paper_tables.columns_for_task(task)
    if not params.table_metrics_only or shown is None:
        return list(params.metrics)
    return [m for m in params.metrics if m in shown]


def _reasons(task: TaskPlan, params: Params, home, names: list[str]) -> dict[str, str]:
    """Why a metric of ``names`` cannot be computed for ``task`` (all its methods alike)."""
    h, w = task.pairs[0]["height"], task.pairs[0]["width"]
    lengths = list(task.lengths.values())
    reasons = {}
    for metric, files in (home.skipped if home else {}).items():
        if metric in names:
            reasons[metric] = f"weights missing ({', '.join(files)}) and evaluate.weights is 'skip'"
    for metric, size in MIN_SIZE.items():
        if metric in names and min(h, w) < size:
            reasons[metric] = f"frames of {h}x{w} are smaller than the {size}x{size} this metric needs"
    if "dynamic_degree" in names and min(h, w) < vbench.RAFT_MIN_SIZE:
        reasons["dynamic_degree"] = (f"frames of {h}x{w} are smaller than RAFT's {vbench.RAFT_MIN_SIZE}x"
                                     f"{vbench.RAFT_MIN_SIZE} minimum")
    if "fvd" in names and sum(len(clip_starts(t, params.fvd_clips, params.fvd_clip_frames)) for t in lengths) < 2:
        reasons["fvd"] = (f"{len(lengths)} test video(s) of {'/'.join(map(str, sorted(set(lengths))))} frames give "
                          f"fewer than 2 clips of {params.fvd_clip_frames} frames per set (raise evaluate.fvd_clips "
                          "or lower evaluate.fvd_clip_frames)")
    if "fid" in names and sum(len(frame_indices(t, params.model_frames)) for t in lengths) < 2:
        reasons["fid"] = "fewer than 2 frames per set (raise evaluate.model_frames)"
    if any(m in names for m in vbench.QUALITY_DIMENSIONS):
        reasons.update(NEVER)
    return reasons


def _stand_in(metric) -> bool:
    return any(status != "official" for status in metric.weights.values())


class Scorer:
    """The metric networks, built once, and the per-task ground-truth features they reuse."""

    def __init__(self, names: list[str], params: Params):
        self.params = params
        self.models = {name: cm.build(name, params.device) for name in names if name != "temporal_flickering"}
        self._gt_features: dict[tuple[str, str], np.ndarray] = {}

    def weights(self) -> dict[str, dict[str, str]]:
        return {name: dict(model.weights) for name, model in self.models.items()}

    def _frame_metric(self, name: str, preds: list[np.ndarray], targets: list[np.ndarray]) -> float:
        means = []
        count = self.params.frames if name in PIXEL_METRICS else self.params.model_frames
        for pred, target in zip(preds, targets, strict=True):
            index = frame_indices(len(target), count)
            scores = [self.models[name](_tensor(pred[index[i:i + CHUNK]]), _tensor(target[index[i:i + CHUNK]]))
                      for i in range(0, len(index), CHUNK)]  # each [1, n]
            means.append(torch.cat(scores, dim=1).mean().item())
        return float(np.mean(means))

    def _fid_features(self, videos: list[np.ndarray]) -> np.ndarray:
        model = self.models["fid"]
        return np.concatenate([model.features(_tensor(v[frame_indices(len(v), self.params.model_frames)]))
                               for v in videos])

    def _fvd_features(self, videos: list[np.ndarray], name: str) -> np.ndarray:
        length, feats = self.params.fvd_clip_frames, []
        for v in videos:  # one batch per video: videos of a task may differ in size
            starts = clip_starts(len(v), self.params.fvd_clips, length)
            if len(starts):
                clips = torch.cat([_tensor(v[s:s + length]) for s in starts])  # [n, 3, clip_frames, H, W]
                feats.append(self.models["fvd"].features(clips, name))
        return np.concatenate(feats)

    def _gt(self, kind: str, task: str, targets: list[np.ndarray]) -> np.ndarray:
        if (kind, task) not in self._gt_features:
            self._gt_features[kind, task] = (self._fid_features(targets) if kind == "fid"
                                             else self._fvd_features(targets, "gt"))
        return self._gt_features[kind, task]

    def score(self, name: str, task: TaskPlan, preds: list[np.ndarray], targets: list[np.ndarray]) -> float:
        """One metric over the test videos of one (task, method)."""
        if name in FRAME_METRICS:
            return self._frame_metric(name, preds, targets)
        if name == "fid":
            return self.models["fid"].from_features(self._fid_features(preds), self._gt("fid", task.task, targets))
        if name == "fvd":
            return self.models["fvd"].from_features(self._fvd_features(preds, "pred"),
                                                    self._gt("fvd", task.task, targets))
        if name == "temporal_flickering":
            return float(np.mean([vbench.temporal_flickering(_tensor(p)).item() for p in preds]))
        if name == "dynamic_degree":
            return float(np.mean([self.models[name](_tensor(p), fps=task.fps).item() for p in preds]))
        return float(np.mean([self.models[name](_tensor(p[frame_indices(len(p), self.params.vbench_frames)])).item()
                              for p in preds]))


def _read_videos(task: TaskPlan, method: str, key: str = "input") -> list[np.ndarray]:
    """The first ``task.lengths[scene]`` frames of each test video of ``method`` (``input``: the pair's
    ``key`` folder, the degraded input or the target), ``[N, H, W, 3]`` uint8 each."""
    videos = []
    for pair in task.pairs:
        folder = pair[key] if method == INPUT else task.outputs[method] / pair["scene"]
        frames = video.read_frames(folder)[: task.lengths[pair["scene"]]]  # [N, H, W, 3] uint8
        expected = (task.lengths[pair["scene"]], pair["height"], pair["width"])
        if frames.shape[:3] != expected:
            raise EvaluateError(f"{method} on {pair['scene']}: {folder} holds frames [T, H, W] = "
                                f"{list(frames.shape[:3])}, expected {list(expected)}")
        videos.append(frames)
    return videos


def evaluate_task(task: TaskPlan, scorer: Scorer, names: list[str], reasons: dict[str, str]) -> dict[str, dict]:
    """``{method: {column: cell}}`` for the input and every method of ``task`` (cells: paper_tables)."""
    targets = _read_videos(task, INPUT, "target")
    rows = {}
    for method in [INPUT, *sorted(task.outputs)]:
        start = time.perf_counter()
        preds = _read_videos(task, method)
        cells = {name: {"value": None, "reason": reason} for name, reason in reasons.items()}
        for name in names:
            if name not in reasons:
                model = scorer.models.get(name)
                cells[name] = {"value": scorer.score(name, task, preds, targets),
                               "stand_in": bool(model is not None and _stand_in(model))}
        if method != INPUT:
            cells["inference_seconds_per_frame"] = {"value": task.seconds_per_frame[method], "stand_in": False}
            if method in task.train_seconds:
                cells["train_hours"] = {"value": task.train_seconds[method] / 3600, "stand_in": False}
        rows[method] = cells
        log.info("evaluated %s on %s in %.1f s", method, task.task, time.perf_counter() - start)
    return rows


# ---------------------------------------------------------------------------------------------------------
# The stage


def _notes(spec: paper_tables.TableSpec, tasks: dict[str, TaskPlan], results: dict, params: Params) -> list[str]:
    """Footnotes of one table: what 'this run' is, the marks, what was not computed and why."""
    notes = []
    for name in spec.tasks:
        if name in tasks:
            task = tasks[name]
            pair, scored = task.pairs[0], sorted(set(task.lengths.values()))
            total = sorted({p["frames"] for p in task.pairs})
            first = "" if scored == total else f" (the first {'/'.join(map(str, scored))}, the frames the models restored)"
            notes.append(f"{name} (this run): {len(task.pairs)} test video(s) of {'/'.join(map(str, total))} frames"
                         f"{first}, {pair['height']}x{pair['width']}, from {task.folder}; `input` is the degraded "
                         "input itself (no model), the reference every method should beat."
                         + (" `vae_roundtrip` is that input encoded and decoded by the frozen VAE, no transformer: "
                            "where every restorer starts, and the VAE's own reconstruction error."
                            if any(t.get("reference") for t in task.timing.values()) else ""))
    if not any(name in tasks for name in spec.tasks):
        notes.append(f"This run has no {' / '.join(spec.tasks)} pairs: only the paper's figures are shown.")
    notes.append(f"paper Table {spec.number}: the published figures, as printed. Their data sets and models are "
                 "the paper's; this run's are tiny synthetic stand-ins, so compare trends, not values.")
    cells = [(column, cell) for name in spec.tasks if name in results for row in results[name].values()
             for column, cell in row.items() if column in spec.columns]
    if any(cell.get("stand_in") for _, cell in cells):
        notes.append(f"{paper_tables.STAND_IN_MARK} computed with stand-in (random) weights "
                     f"(evaluate.weights: {params.weights}; real files missing, see "
                     "`python -m chopgrad.weights status`): the number only shows the code ran.")
    for column, reason in sorted({(column, cell["reason"]) for column, cell in cells if cell["value"] is None}):
        notes.append(f"n/c: {paper_tables.LABELS[column]} not computed: {reason}.")
    notes.append("–: not requested in evaluate.metrics, or not applicable (no model for `input`, no paper figure).")
    if "lpips_alex" in spec.columns:
        notes.append("LPIPS is LPIPS v0.1 on AlexNet (DOVE's script, pyiqa's and lpips' default); the paper does "
                     "not name the network outside Table 1. LPIPS-VGG is ours only.")
    notes.append(f"Sampling per video: PSNR/SSIM on {params.frames or 'all'} evenly spaced frames, LPIPS/DISTS/FID "
                 f"on {params.model_frames or 'all'}, model-based VBench dimensions on {params.vbench_frames or 'all'}, "
                 f"FVD on {params.fvd_clips} evenly spaced clip(s) of {params.fvd_clip_frames} frames (one sample each; "
                 "overlapping in videos shorter than all of them), temporal flickering on all.")
    return notes


def _metrics_json(results: dict) -> dict:
    values = {task: {method: {column: cell["value"] for column, cell in row.items() if cell["value"] is not None}
                     for method, row in rows.items()} for task, rows in results.items()}
    stand_in = sorted({column for rows in results.values() for row in rows.values()
                       for column, cell in row.items() if cell.get("stand_in")})
    return {**values, "stand_in_metrics": ",".join(stand_in)}


def run(params: Params, infer_dir: str | os.PathLike, train_metrics: str | os.PathLike,
        infer_metrics: str | os.PathLike, metrics_path: str | os.PathLike, tables_dir: str | os.PathLike,
        sources: list[Source]) -> dict:
    """Evaluate every (experiment, method) and write the metrics JSON and the tables (see the module docstring).

    Returns:
        ``{"results": {experiment: {method: {column: cell}}}, "tables": [paths], "metrics": path,
        "stand_in": bool}``.
    """
    tasks = plan(params, infer_dir, train_metrics, infer_metrics, sources)
    names = {name: task_metrics(task.kind, params) for name, task in tasks.items()}
    static = {name: _reasons(task, params, None, names[name]) for name, task in tasks.items()}
    needed = [m for m in params.metrics if any(m in names[t] and m not in static[t] for t in tasks)]
    models = [m for m in needed if m != "temporal_flickering"]
    results = {}
    with metric_home(params.weights, params.stand_in_home, models) as home:
        if home.stand_in:
            log.warning("weights missing: running %s on RANDOM stand-in weights from %s (marked in every table)",
                        ", ".join(m for m in models if cw.METRIC_WEIGHTS.get(m)), home.folder)
        scorer = Scorer([m for m in needed if m not in home.skipped], params)
        for name, task in tasks.items():
            results[name] = evaluate_task(task, scorer, names[name], _reasons(task, params, home, names[name]))

    tables_dir = Path(tables_dir)
    with video.staged_outputs(tables_dir) as (build,):
        written = []
        kinds = {name: (task.kind, task.paper_dataset) for name, task in tasks.items()}
        for number, spec in paper_tables.TABLES.items():
            spec = paper_tables.for_experiments(spec, kinds)  # our rows: experiments of the table's tasks
            markdown, text = paper_tables.render(spec, results, _notes(spec, tasks, results, params))
            (build / f"table{number}.md").write_text(markdown)
            (build / f"table{number}.csv").write_text(text)
            written += [tables_dir / f"table{number}.md", tables_dir / f"table{number}.csv"]
        record = {"params": dataclasses.asdict(params), "stand_in_home_used": home.stand_in,
                  "weights": scorer.weights(), "skipped": {k: list(v) for k, v in home.skipped.items()},
                  "tasks": {name: {"pairs": str(task.folder), "task": task.kind, "fps": task.fps,
                                   "scenes": [pair["scene"] for pair in task.pairs],
                                   "methods": [INPUT, *sorted(task.outputs)]} for name, task in tasks.items()},
                  "results": results}
        video.write_json(build / "evaluation.json", record)
    video.write_json(metrics_path, _metrics_json(results))
    return {"results": results, "tables": written, "metrics": Path(metrics_path), "stand_in": home.stand_in}


def _log_method_runs(parent, results: dict) -> None:
    """One MLflow run per (method, task), nested under the stage's run, tagged with both."""
    for task, rows in results.items():
        for method, cells in rows.items():
            stand_in = sorted(c for c, cell in cells.items() if cell.get("stand_in"))
            with parent.child_run(f"{method}/{task}", tags={
                    "chopgrad.method": method, "chopgrad.task": task,
                    "chopgrad.stand_in_metrics": ",".join(stand_in) or "none"}) as child:
                child.log_metrics({c: cell["value"] for c, cell in cells.items() if cell["value"] is not None})


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--infer", required=True, help="inference outputs: <infer>/<method>/<experiment>/<scene>/")
    parser.add_argument("--train-metrics", required=True,
                        help="the train stages' metrics folder: <folder>/<method>/<experiment>.json (metrics/train)")
    parser.add_argument("--infer-metrics", required=True, help="the infer stage's metrics file (metrics/infer.json)")
    parser.add_argument("--metrics", required=True, help="metrics JSON file (DVC metrics)")
    parser.add_argument("--tables", required=True, help="folder for table{1..6}.{md,csv} and evaluation.json")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        result = run(params, args.infer, args.train_metrics, args.infer_metrics, args.metrics, args.tables,
                     sources_of(args.params))
        values = _metrics_json(result["results"])
        values.pop("stand_in_metrics")
        tracker.log_metrics(values)  # task/method/metric
        tracker.set_tags({"chopgrad.stand_in_weights": result["stand_in"]})
        tracker.log_artifact(args.tables, "tables")
        tracker.log_artifact(args.metrics)
        _log_method_runs(tracker, result["results"])


if __name__ == "__main__":
    main()

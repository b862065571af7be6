"""Stage ``infer``: run every trained (experiment, method) model on its experiment's test videos and time it.

For each (experiment, method) of ``params.yaml``'s ``experiments:`` (the model folder the ``train``
stage wrote, ``data/train/<method>/<experiment>/``), every TEST pair of the experiment's pairs folder
is restored with the experiment's VAE and infer settings, in one pass over the video (or in segments
of ``infer.segment_frames``), as in the paper's
supplement C.2: encode the degraded video with the VAE, one transformer step (``z = z_hat - v``),
decode with :func:`chopgrad.decode` (spatial ``tiles``). Videos are padded to ``1 + 4k`` frames
(8k + 1 for CogVideoX) and to sides the model takes, and cut back. Seconds per frame include encode, transformer and
decode (C.2: "pre-processing as well as the full network pass"), measured after a short warm-up,
without file I/O.

With ``infer.vae_roundtrip`` it also writes the reference ``vae_roundtrip`` for every experiment: each
test input encoded and decoded by the frozen VAE, no transformer (``z = z_hat``). That is where every
restorer starts and what a frozen decoder can reach from the encoder's latents, so it separates a
method's gain from the VAE's own reconstruction error. Its ``timing.json`` says ``"reference": true``.

Outputs (docs/interfaces.md): ``<out>/<method>/<experiment>/<scene>/00000.png ...`` (uint8, the
target's H and W; the first ``infer.max_frames`` frames, all when null) and
``<out>/<method>/<experiment>/timing.json`` = ``{"method", "task", "frames", "scenes", "max_frames",
"segment_frames", "tiles", "reference"}`` (``task``: the experiment's name); a sample ``input | output | target`` mp4 per model (``sample.mp4``, also in MLflow).
The outputs hold nothing measured, so a rerun writes the same bytes and DVC reruns nothing after it;
the times (``MEASURED``: seconds per frame, encode / transformer / decode seconds, the device) go to
``--metrics`` alone, ``{method: {task: {...}}}``, which ``evaluate`` reads for its inference column.

    python -m stages.infer --params params.yaml --train data/train --out data/infer --metrics metrics/infer.json

``--train`` is the folder of every ``train@<experiment>-<method>`` output; which models run, on which
pairs and with which VAE, comes from ``experiments:`` (:func:`plan_experiments`). :func:`run` without a
params file runs every model folder found, on the pairs folders of their tasks (the library use).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from stages.common import cli, restoration
from stages.common import pairs as pairs_io
from stages.common.video import list_frames, read_image, staged_outputs, write_frames, write_json, write_video

log = logging.getLogger("stages.infer")

STAGE = "infer"
ROUNDTRIP = "vae_roundtrip"  # the reference method: the VAE's own reconstruction of the degraded input
# What a job measures: in --metrics only, never in timing.json (its bytes must not change on a rerun).
MEASURED = ("seconds_per_frame", "encode_seconds", "transformer_seconds", "decode_seconds", "device")


@dataclass(frozen=True)
class Params:
    max_frames: int | None  # first frames of each test video restored (null: all); CPU budgets need few
    segment_frames: int | None  # restore in consecutive segments of this many frames, each its own pass (null: one pass)
    vae_roundtrip: bool  # also write the reference `vae_roundtrip`: each test input encoded and decoded, no transformer
    tiles: tuple[int, int]  # spatial tiles of the decode [rows, cols] (C.2: 2 x 2); need not divide the latent
    halo: int  # latent pixels of context around each tile
    warmup_frames: int  # frames of an untimed first run per model (lazy initialisation out of the timing)
    sample_frames: int  # frames of the sample video per model
    device: Literal["auto", "cpu", "cuda"]  # auto: CUDA when available
    mixed_precision: bool  # bf16 autocast of the transformer, as train runs it (GPU only)
    threads: int  # torch CPU threads (0: torch's default)

    def __post_init__(self):
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"infer.max_frames must be >= 1 or null (every frame), got {self.max_frames}")
        if self.segment_frames is not None and self.segment_frames < 1:
            raise ValueError(f"infer.segment_frames must be >= 1 or null (one pass), got {self.segment_frames}")
        if min(self.tiles) < 1 or self.halo < 0:
            raise ValueError(f"infer.tiles must be positive and infer.halo >= 0, got {list(self.tiles)}, {self.halo}")
        if self.warmup_frames < 0 or self.sample_frames < 1:
            raise ValueError("infer.warmup_frames must be >= 0 and infer.sample_frames >= 1")
        if self.threads < 0:
            raise ValueError(f"infer.threads must be >= 0 (0: torch's default), got {self.threads}")


@dataclass(frozen=True)
class Job:
    method: str
    task: str  # the experiment's name (the folder data/infer/<method>/<task>)
    model_dir: Path | None  # None: the VAE round trip (ROUNDTRIP)
    pairs: list[dict]  # the task's test pairs
    fps: float
    vae_dir: Path | None = None  # the experiment's VAE (None: the one given to run)
    params: Params | None = None  # the experiment's infer settings (None: the ones given to run)


def plan_experiments(params_path: str | Path, train_dir: str | Path) -> list[Job]:
    """Every (experiment, method) of a params file's ``experiments:`` on the experiment's test pairs and on
    each of its ``test_sets`` (as task ``<experiment>_<label>``), and the VAE round trip of each, with the
    experiment's own infer settings; checked before any work.

    Raises:
        ValueError: a model of a declared (experiment, method) missing from ``train_dir``, a pairs folder
            of another task or without test pairs, tiles that do not fit.
    """
    from stages.common import experiments
    from stages.common.params import params_from_mapping

    data, declared = experiments.load_checked(params_path)
    jobs = []
    for evaluation in experiments.evaluations(declared):  # each experiment's own test pairs, then its test_sets
        experiment = evaluation.experiment
        settings = params_from_mapping(STAGE, Params, experiments.infer_mapping(data, experiment),
                                       source=f"{params_path} (infer with experiments.{experiment.name}.infer)")
        vae_dir = Path(experiment.vae)
        spatial = restoration.spatial_factor(json.loads((restoration.check_vae_folder(vae_dir) / "config.json").read_text()))
        manifest = pairs_io.load_manifest(evaluation.pairs, check_frames=False)
        if manifest["task"] != experiment.task:
            where = "" if evaluation.name == experiment.name else f" (its test set {evaluation.name})"
            raise ValueError(f"{evaluation.pairs} holds {manifest['task']!r} pairs but experiments.{experiment.name}.task "
                             f"is {experiment.task!r}{where}")
        test = _checked_test_pairs(settings, evaluation.name, manifest, spatial)
        for method in experiment.methods:
            model_dir = Path(train_dir) / method / experiment.name
            if not (model_dir / restoration.SPEC_FILE).is_file():
                raise ValueError(f"{model_dir} holds no trained model: run train@{experiments.run_key(experiment.name, method)} "
                                 "(`dvc repro train`)")
            jobs.append(Job(method, evaluation.name, model_dir, test, float(manifest["fps"]), vae_dir, settings))
        if settings.vae_roundtrip:
            jobs.append(Job(ROUNDTRIP, evaluation.name, None, test, float(manifest["fps"]), vae_dir, settings))
    return jobs


def plan(params: Params, train_dir: str | Path, vae_dir: str | Path, pairs_dirs: list[str | Path]) -> list[Job]:
    """Every (method, task) to run, checked before any work.

    Raises:
        ValueError: a missing train folder or a method folder without models, a task without a
            pairs folder or without test pairs, more tiles than a test video's latent has rows or columns.
    """
    vae_folder = restoration.check_vae_folder(vae_dir)
    spatial = restoration.spatial_factor(json.loads((vae_folder / "config.json").read_text()))
    manifests = {}
    for folder in map(Path, pairs_dirs):
        manifest = pairs_io.load_manifest(folder, check_frames=False)
        manifests[manifest["task"]] = manifest
    train_dir = Path(train_dir)
    methods = sorted(p for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith(".")) \
        if train_dir.is_dir() else []
    if not methods:
        raise ValueError(f"{train_dir} holds no train stage output (<method>/<task>/{restoration.SPEC_FILE}): "
                         "run the train stages (`dvc repro train`) or pass --train their folder (data/train)")
    jobs = []
    for method_dir in methods:
        models = sorted(p.parent for p in method_dir.glob(f"*/{restoration.SPEC_FILE}"))
        if not models:
            raise ValueError(f"{method_dir} holds no trained model (<task>/{restoration.SPEC_FILE}): run its train "
                             "stage, or remove the folder")
        for model_dir in models:
            test = _test_pairs(params, model_dir, manifests, spatial)
            jobs.append(Job(method_dir.name, model_dir.name, model_dir, test, float(manifests[model_dir.name]["fps"])))
    if params.vae_roundtrip:
        for task in sorted({job.task for job in jobs}):
            first = next(job for job in jobs if job.task == task)
            jobs.append(Job(ROUNDTRIP, task, None, first.pairs, first.fps))
    return jobs


def _test_pairs(params: Params, model_dir: Path, manifests: dict, spatial: int) -> list[dict]:
    """The test pairs of the task ``model_dir`` was trained on, checked against the tiles."""
    task = model_dir.name
    if task not in manifests:
        raise ValueError(f"{model_dir} was trained on {task!r} but no --pairs folder holds that task "
                         f"(given: {sorted(manifests) or 'none'})")
    return _checked_test_pairs(params, task, manifests[task], spatial)


def _checked_test_pairs(params: Params, task: str, manifest: dict, spatial: int) -> list[dict]:
    test = [p for p in manifest["pairs"] if p["split"] == "test"]
    if not test:
        raise ValueError(f"the {task} pairs folder has no test pairs to run a model on")
    multiple = spatial * 2  # the Wan transformer's 2x2 patches
    for pair in test:
        latent = [-(-size // multiple) * 2 for size in (pair["height"], pair["width"])]
        if params.tiles[0] > latent[0] or params.tiles[1] > latent[1]:
            raise ValueError(f"infer.tiles {list(params.tiles)} are more than the latent "
                             f"{latent[0]}x{latent[1]} of {task} test pair {pair['scene']!r} "
                             f"({pair['height']}x{pair['width']} pixels) has rows and columns: use at most "
                             f"{latent[0]} rows and {latent[1]} cols")
    return test


def _read(folder: Path, count: int | None) -> np.ndarray:  # -> [T, H, W, 3] uint8
    paths = list_frames(folder)
    return np.stack([read_image(path) for path in paths[:count]])


def _text(model: restoration.Model, prompt: str | None, cache: dict) -> torch.Tensor | None:
    """The pair's prompt embedding when the model was trained with a text encoder; else the fixed one.

    ``cache`` lives for the whole stage: the text encoder (UMT5, ~23 GB in float32) loads once, not
    once per (method, task).
    """
    encoder = model.spec["text"].get("encoder")
    if not prompt or not encoder:
        return None
    if (encoder, prompt) not in cache:
        from transformers import AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        from chopgrad.restoration import encode_cogvideox_prompts, encode_prompts

        cogvideox = model.spec.get("transformer", {}).get("family") == "cogvideox"  # DOVE: CogVideoX's T5 encoding
        if encoder not in cache:
            cache[encoder] = (AutoTokenizer.from_pretrained(encoder, subfolder="tokenizer", local_files_only=True),
                              (T5EncoderModel if cogvideox else UMT5EncoderModel).from_pretrained(
                                  encoder, subfolder="text_encoder", local_files_only=True).eval())
        cache[(encoder, prompt)] = (encode_cogvideox_prompts if cogvideox else encode_prompts)([prompt], *cache[encoder])
    return cache[(encoder, prompt)]


def infer_job(params: Params, job: Job, vae_dir: Path, out_dir: Path, device: torch.device,
              text_cache: dict | None = None) -> dict:
    """Restore every test video of one (method, task); write frames, ``timing.json`` and ``sample.mp4``.

    ``text_cache``: prompt embeddings and text encoders shared between jobs (see :func:`_text`).

    Returns:
        ``timing.json``'s record with the ``MEASURED`` times added.
    """
    params, vae_dir = job.params or params, job.vae_dir or vae_dir
    if job.model_dir is None:
        model = restoration.roundtrip_model(vae_dir, device)
    else:
        model = restoration.load_model(job.model_dir, vae_dir, device)
        model.restorer.eval()
    if params.warmup_frames:
        first = _read(job.pairs[0]["input"], params.warmup_frames)
        restoration.restore_video(model, first, tiles=params.tiles, halo=params.halo, autocast=params.mixed_precision)
    totals = {"encode_seconds": 0.0, "transformer_seconds": 0.0, "decode_seconds": 0.0}
    text_cache = {} if text_cache is None else text_cache
    frames, sample = 0, None
    for pair in job.pairs:
        degraded = _read(pair["input"], params.max_frames)
        text = _text(model, pair["prompt"], text_cache)
        step = params.segment_frames or len(degraded)  # the paper's driving: 49-frame segments, each its own pass
        outputs = []
        for first in range(0, len(degraded), step):
            output, timings = restoration.restore_video(model, degraded[first:first + step], text, tiles=params.tiles,
                                                        halo=params.halo, autocast=params.mixed_precision)
            outputs.append(output)
            for key in totals:
                totals[key] += timings[key]
        output = np.concatenate(outputs)
        frames += len(output)
        write_frames(out_dir / pair["scene"], output, prefix="", start=0)
        if sample is None:
            count = min(params.sample_frames, len(output))
            target = _read(pair["target"], count)
            sample = np.concatenate([degraded[:count], output[:count], target], axis=2)  # input | output | target
    record = {"method": job.method, "task": job.task, "frames": frames, "scenes": [pair["scene"] for pair in job.pairs],
              "max_frames": params.max_frames, "segment_frames": params.segment_frames, "tiles": list(params.tiles),
              "reference": job.model_dir is None}
    write_json(out_dir / "timing.json", record)
    write_video(out_dir / "sample.mp4", sample, fps=job.fps)
    measured = {"seconds_per_frame": sum(totals.values()) / frames, **{k: round(v, 4) for k, v in totals.items()},
                "device": _device_name(device)}
    log.info("%s/%s: %d frames, %.3f s/frame", job.method, job.task, frames, measured["seconds_per_frame"])
    return {**record, **measured}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run(params: Params, train_dir: str | Path, vae_dir: str | Path | None, pairs_dirs: list[str | Path] | None,
        out_dir: str | Path, metrics_path: str | Path, params_path: str | Path | None = None) -> dict:
    """Run every trained model on its test pairs; write ``out_dir`` (atomically) and ``metrics_path``.

    Args:
        params_path: a params file whose ``experiments:`` say which models run, on which pairs, with which
            VAE and infer settings (:func:`plan_experiments`; ``vae_dir`` and ``pairs_dirs`` unused).
            None: every model folder of ``train_dir`` on the ``pairs_dirs`` of its task, with ``vae_dir``.

    Returns:
        ``{"metrics": {method: {task: {"frames", *MEASURED}}}, "timings": [...], "samples": [paths]}``.
    """
    out_dir, metrics_path = map(Path, (out_dir, metrics_path))
    if params_path is not None:
        jobs = plan_experiments(params_path, train_dir)
    else:
        vae_dir = Path(vae_dir)
        jobs = plan(params, train_dir, vae_dir, pairs_dirs)
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("infer.device is 'cuda' but CUDA is not available: use 'auto' or 'cpu'")
    device = torch.device("cuda" if params.device == "cuda" or (params.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    text_cache: dict = {}
    with staged_outputs(out_dir) as (build,):
        timings = [infer_job(params, job, vae_dir, build / job.method / job.task, device, text_cache) for job in jobs]
    metrics: dict[str, dict] = {}
    for timing in timings:
        metrics.setdefault(timing["method"], {})[timing["task"]] = {
            "frames": timing["frames"], **{key: timing[key] for key in MEASURED}}
    write_json(metrics_path, metrics)
    return {"metrics": metrics, "timings": timings,
            "samples": [out_dir / t["method"] / t["task"] / "sample.mp4" for t in timings]}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--train", required=True, help="the train stages' folder (data/train/<method>/<experiment>/)")
    parser.add_argument("--out", required=True, help="output folder (data/infer)")
    parser.add_argument("--metrics", required=True, help="metrics JSON (metrics/infer.json)")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        started = time.perf_counter()
        result = run(params, args.train, None, None, args.out, args.metrics, params_path=args.params)
        tracker.log_metrics({f"{method}/{task}/{key}": value for method, tasks in result["metrics"].items()
                             for task, values in tasks.items() for key, value in values.items() if key != "device"})
        tracker.log_metrics({"seconds": time.perf_counter() - started})
        for sample in result["samples"]:
            tracker.log_artifact(sample, f"videos/{sample.parent.parent.name}_{sample.parent.name}")
        tracker.log_artifact(args.metrics)


if __name__ == "__main__":
    main()

"""Faults and bad input (issue 18, docs/faults.md): reruns byte for byte, signals, leftovers of a kill,
frames paired by name, 16-bit images, params checked before DVC touches an output, no retry of bad input.

Tracking outages are tested in test_tracking.py, frame folders and pairs folders in test_video_io.py
and test_pairs.py; this module holds what spans stages and the metrics command.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML

from chopgrad.metrics import __main__ as metrics_cli
from chopgrad.metrics.files import frame_sort_key
from stages.common import check, video
from stages.common.params import params_from_mapping

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def read_yaml(path: Path) -> dict:
    return YAML(typ="safe", pure=True).load(path.read_text())


def write_yaml(path: Path, data: dict) -> None:
    with path.open("w") as handle:
        YAML(typ="safe", pure=True).dump(data, handle)


# ----------------------------------------------------------------------------------------------------------
# Reruns: every stage's outputs byte for byte, as DVC hashes them

TINY = {  # the tiny pipeline of test_pipeline.py, with train cut to two methods and no network losses
    "scenes": {"num_scenes": 3, "num_test_scenes": 1, "frames": 9, "height": 16, "width": 24, "num_objects": 1,
               "rovi_frames": 9, "rovi_stride": 1, "waymo_frames": 9,
               "dove_frames": 9, "vsr_frames": 5},
    "vae": {"source": "train", "base_dim": 4, "z_dim": 4, "dim_mult": [1, 2, 2, 2], "temporal_downsample": [False, True, True],
            "clip_frames": 5, "crop": [16, 16],
            "batch_size": 1, "iterations": 2, "warmup_iterations": 1, "eval_frames": 5},
    "masks": {"dilation": 1},
    "degrade": {"scale": 4},
    "splat": {"every": 4, "iterations": 10, "sh_degree_interval": 5, "init_num_points": 200, "refine_start_iter": 3,
              "refine_stop_iter": 8, "refine_every": 3, "reset_every": 100},
    "reinsert": {"every": 4, "iterations": 10, "sh_degree_interval": 5, "background_points": 100, "actor_points": 20,
                 "refine_start_iter": 3, "refine_stop_iter": 8, "refine_every": 3, "reset_every": 100,
                 "asset_views": 2, "asset_iterations": 5, "asset_points": 40, "min_visible_pixels": 4},
    "train": {"num_layers": 1, "head_dim": 8, "ffn_dim": 32, "text_dim": 16, "freq_dim": 16, "iterations": 1,
              "clip_frames": 5, "crop": [16, 16], "checkpoint_every": 1, "sample_frames": 5,
              "methods": {"chopgrad_d1": {"decode": "chopgrad", "d_trunc": 1, "iterations_factor": 1}},
              "loss_nvs": {"latent_mse": 1.0, "mse": 1.0},
              "loss_inpainting": {"latent_mse": 1.0, "mse": 1.0}, "loss_sr": {"mse": 1.0},
              "loss_driving": {"mse": 1.0}, "loss_reconstruction": {"mse": 1.0}},
    "infer": {"max_frames": 5, "warmup_frames": 0, "sample_frames": 5},
    "evaluate": {"metrics": ["psnr", "ssim", "temporal_flickering"], "frames": 0},
}
PAIRS = ["data/splat/nvs", "data/masks/inpaint_box", "data/degrade/sr"]
# (stage, its outputs as dvc.yaml declares them, its run() with dvc.yaml's paths). Metrics files are left
# out: they hold wall-clock seconds by design and are `cache: false` (evaluate reads train's and infer's, for
# its time columns, so only a stage that really ran again reruns it).
STAGES = [
    ("scenes", ["data/scenes"], lambda m, p: m.run(p, "data/scenes", "metrics/scenes.json")),
    ("vae", ["data/vae", "plots/vae"], lambda m, p: m.run(p, "data/scenes", "data/vae", "metrics/vae.json", "plots/vae")),
    ("masks", ["data/masks", "plots/masks"],
     lambda m, p: m.run(p, "data/scenes", "data/masks", "metrics/masks.json", "plots/masks")),
    ("degrade", ["data/degrade/sr", "data/degrade/test_sets", "plots/degrade"],
     lambda m, p: m.run(p, "data/scenes", "data/degrade/sr", "metrics/degrade.json", "plots/degrade",
                        "data/degrade/test_sets")),
    ("splat", ["data/splat", "plots/splat"],
     lambda m, p: m.run(p, "data/scenes", "data/splat", "metrics/splat.json", "plots/splat")),
    ("reinsert", ["data/reinsert", "plots/reinsert"], lambda m, p: m.run(
        p, "data/reinsert", "metrics/reinsert.json", "plots/reinsert")),
    ("train", ["data/train/chopgrad_d1"], lambda m, p: [m.run(  # as train@<experiment>-chopgrad_d1, one each
        p, "chopgrad_d1", "data/vae", [pairs], "data/train/chopgrad_d1", f"metrics/train/chopgrad_d1/{Path(pairs).name}.json",
        f"checkpoints/train/{Path(pairs).name}-chopgrad_d1", stand_in_home=".weights/stand_in") for pairs in PAIRS]),
    ("infer", ["data/infer"], lambda m, p: m.run(p, "data/train", "data/vae", PAIRS, "data/infer", "metrics/infer.json")),
    ("evaluate", ["results/tables"], lambda m, p: m.run(p, "data/infer", "metrics/train", "metrics/infer.json",
                                                        "metrics/evaluate.json", "results/tables",
                                                        [m.Source(Path(f).name, Path(f)) for f in PAIRS])),
]


def file_hashes(paths: list[str]) -> dict[str, str]:
    """md5 of every file under ``paths``: what DVC hashes (a folder's hash is made of these)."""
    hashes = {}
    for path in map(Path, paths):
        for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
            if not file.is_file():
                continue
            hashes[file.as_posix()] = hashlib.md5(file.read_bytes()).hexdigest()
    return hashes


@pytest.mark.slow
def test_every_stage_rerun_with_the_same_inputs_writes_the_same_bytes(tmp_path, monkeypatch):
    params = read_yaml(REPO / "params.yaml")
    for section, values in TINY.items():
        params[section].update(values)
    monkeypatch.chdir(tmp_path)  # dvc.yaml's relative paths, .weights/stand_in inside the test folder
    differ = {}
    for name, outputs, run in STAGES:
        module = importlib.import_module(f"stages.{name}")
        stage_params = params_from_mapping(name, module.Params, params[name])
        hashes = []
        for _ in range(2):
            run(module, stage_params)
            hashes.append(file_hashes(outputs))
        assert hashes[0], f"{name} wrote nothing under {outputs}"
        kinds = {Path(path).suffix for path in hashes[0]}
        assert name in ("scenes", "train", "infer", "evaluate") or {".png", ".mp4"} <= kinds, (name, kinds)
        changed = sorted(path for path in hashes[0].keys() | hashes[1].keys() if hashes[0].get(path) != hashes[1].get(path))
        if changed:
            differ[name] = changed
    assert not differ, f"rerun outputs differ: {differ}"


def test_gaussians_files_do_not_depend_on_metadata_order(tmp_path):
    import torch

    from stages.common import splat

    count, generator = 4, torch.Generator().manual_seed(0)
    shapes = {"means": (3,), "quats": (4,), "scales": (3,), "opacities": (), "sh0": (1, 3), "shN": (3, 3)}
    gaussians = {key: torch.rand(count, *shapes[key], generator=generator) for key in splat.GAUSSIAN_KEYS}
    metadata = {f"key{i}": i for i in range(20)}
    first = splat.save_gaussians(tmp_path / "a.safetensors", gaussians, metadata).read_bytes()
    shuffled = dict(reversed(list(metadata.items())))
    assert splat.save_gaussians(tmp_path / "b.safetensors", gaussians, shuffled).read_bytes() == first
    assert splat.load_gaussians(tmp_path / "b.safetensors")[1] == metadata


# ----------------------------------------------------------------------------------------------------------
# Signals and kill -9


@pytest.mark.slow
def test_sigterm_ends_a_stage_cleanly(tmp_path):
    from mlflow import MlflowClient

    from stages import scenes as scenes_stage

    params = read_yaml(REPO / "params.yaml")
    params["splat"].update(TINY["splat"], iterations=1_000_000, device="cpu")  # runs until stopped
    write_yaml(tmp_path / "params.yaml", params)
    scene_set = tmp_path / "scenes"
    scenes_stage.run(params_from_mapping("scenes", scenes_stage.Params, {**params["scenes"], **TINY["scenes"]}),
                     scene_set)
    data, log = tmp_path / "data", (tmp_path / "stage.log").open("w")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "OMP_NUM_THREADS": "1",
           "CHOPGRAD_EXECUTION_ID": "sigterm", "PYTHONPATH": str(REPO)}
    env.pop("CHOPGRAD_TRACEBACK", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "stages.splat", "--params", str(tmp_path / "params.yaml"), "--scenes", str(scene_set),
         "--out", str(data / "splat"), "--metrics", str(tmp_path / "splat.json"), "--plots", str(tmp_path / "plots")],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not list(data.glob(".splat.*.tmp")) and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert list(data.glob(".splat.*.tmp")), (tmp_path / "stage.log").read_text()[-2000:]
        time.sleep(0.5)  # inside the training loop
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=180)  # a loaded CI machine can be slow to clean up
    finally:
        process.kill()
    output = (tmp_path / "stage.log").read_text()
    assert code == -signal.SIGTERM, output[-4000:]  # cli.CLEANUP_SECONDS: a hang ends with every thread's traceback
    assert "splat: stopped by SIGTERM." in output and "Traceback" not in output
    assert sorted(p.name for p in data.iterdir()) == []  # no build folder, no half output
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("chopgrad").experiment_id])
    assert (run.info.run_name, run.info.status) == ("splat", "KILLED")


GC_CALLBACK_LOOP = """
import time, weakref
from stages.common import cli
cli._install_handlers("demo")
class Garbage: pass
def busy(seconds):
    until = time.perf_counter() + seconds
    while time.perf_counter() < until: pass
def collected(ref):  # Python drops an exception raised here; two thirds of the time is spent here
    busy(0.01)
print("ready", flush=True)
while True:
    kept = weakref.ref(Garbage(), collected)
    busy(0.005)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_that_lands_in_a_gc_callback_still_stops_the_stage(signum):
    """A garbage collection can run the signal handler inside a weakref callback, where Python drops the
    exception (CI once saw splat go on training after SIGTERM): it is raised again, the process ends."""
    process = subprocess.Popen([sys.executable, "-c", GC_CALLBACK_LOOP], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout.readline() == "ready\n"
        time.sleep(0.3)
        process.send_signal(signum)
        assert process.wait(timeout=30) == -signum
    finally:
        process.kill()
    output = process.stdout.read()
    assert f"demo: {'stopped by SIGTERM' if signum == signal.SIGTERM else 'interrupted by SIGINT'}." in output
    assert "Exception ignored" not in output and "Traceback" not in output


def test_the_next_run_removes_what_a_kill_left(tmp_path):
    """kill -9 runs no cleanup: its build folders and temporary files go at the next write of the same path."""
    out = tmp_path / "out"
    left = [tmp_path / ".out.0123456789ab.tmp", tmp_path / ".out.ba9876543210.tmp"]
    left[0].mkdir()
    (left[0] / "half.png").write_bytes(b"x")
    left[1].mkdir()  # swap_in's copy of the previous output
    kept = [tmp_path / ".other.0123456789ab.tmp", tmp_path / ".out.notours.tmp", tmp_path / "out.0123456789ab.tmp"]
    for path in kept:
        path.write_text("not a leftover of out")
    with video.staged_outputs(out) as (build,):
        (build / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", *(p.name for p in kept)])
    metrics = tmp_path / "m.json"
    (tmp_path / ".m.json.0123456789ab.tmp").write_text("{")
    (tmp_path / ".clip.mp4.0123456789ab.tmp.mp4").write_bytes(b"")
    video.write_json(metrics, {"a": 1})
    video.write_video(tmp_path / "clip.mp4", np.zeros((1, 8, 8, 3), np.uint8))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".m.json", ".clip.mp4"))]


# ----------------------------------------------------------------------------------------------------------
# One frame order for the pipeline and the metrics command; frames paired by name; 16-bit images


def write_png(path: Path, value: int, dtype=np.uint8, size=(4, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((*size, 3), value, dtype))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(0, 10_000), min_size=1, max_size=12, unique=True), st.sampled_from(["", "f_", "frame"]),
       st.sampled_from([0, 3, 5]))
def test_the_pipeline_and_the_metrics_command_read_frames_in_one_natural_order(tmp_path_factory, numbers, prefix,
                                                                              pad):
    folder = tmp_path_factory.mktemp("frames")
    for number in numbers:
        write_png(folder / f"{prefix}{number:0{pad}d}.png", number % 256)
    expected = [f"{prefix}{number:0{pad}d}.png" for number in sorted(numbers)]
    assert [p.name for p in video.list_frames(folder)] == expected
    frames, _ = metrics_cli.load_videos(folder)  # [1, 3, T, H, W], in the order it read the files
    assert frames[0, 0, :, 0, 0].tolist() == [number % 256 for number in sorted(numbers)]


def test_frame_sort_key_orders_numbers_as_numbers():
    names = ["10.png", "2.png", "1.png", "frame_10_b.png", "frame_9_b.png", "a.png", "01.png"]
    assert sorted(names, key=frame_sort_key) == ["01.png", "1.png", "2.png", "10.png", "a.png", "frame_9_b.png",
                                                 "frame_10_b.png"]


def test_the_metrics_command_pairs_frames_by_name(tmp_path, capsys):
    for t in range(4):
        write_png(tmp_path / "pred" / f"{t}.png", 10 * t)
    for t in (0, 1, 3, 4):  # 2 missing, 4 added: same count, shifted by one from frame 2 on
        write_png(tmp_path / "gt" / f"{t}.png", 10 * t)
    assert metrics_cli.main([str(tmp_path / "pred"), str(tmp_path / "gt"), "--metrics", "psnr"]) == 2
    err = capsys.readouterr().err
    assert "error: pred and gt differ:" in err and "lacks 2 (present in pred" in err and "has 4, which pred" in err


def test_a_16_bit_png_is_scaled_or_refused_never_black(tmp_path, capsys):
    rgb = np.random.default_rng(0).integers(1, 256, (6, 8, 3)).astype(np.uint8)
    (tmp_path / "deep").mkdir()
    (tmp_path / "low").mkdir()
    cv2.imwrite(str(tmp_path / "deep" / "0.png"), rgb[..., ::-1].astype(np.uint16) * 257)  # 16-bit, full range
    cv2.imwrite(str(tmp_path / "deep" / "1.png"), rgb[..., 0].astype(np.uint16) * 257)  # 16-bit grey
    cv2.imwrite(str(tmp_path / "low" / "0.png"), rgb[..., ::-1].astype(np.uint16))  # 8-bit values in 16 bits
    grey = np.repeat(rgb[..., :1], 3, axis=-1)
    np.testing.assert_array_equal(video.read_frames(tmp_path / "deep"), np.stack([rgb, grey]))
    frames, _ = metrics_cli.load_videos(tmp_path / "deep")
    np.testing.assert_array_equal(frames[0].permute(1, 2, 3, 0).numpy(), np.stack([rgb, grey]))
    with pytest.raises(video.MediaError, match=r"0\.png is a 16-bit image whose values all lie in 0\.\.\d+: 8-bit"):
        video.read_frames(tmp_path / "low")
    assert metrics_cli.main([str(tmp_path / "low"), "--metrics", "temporal_flickering"]) == 2
    assert "16-bit image whose values all lie in" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------------
# Params checked before DVC removes an output; bad input neither retried nor buried


def test_the_params_check_names_every_bad_key_and_passes_the_committed_file(tmp_path):
    assert check.check(REPO / "params.yaml") == []
    params = read_yaml(REPO / "params.yaml")
    params["splat"]["every"] = 0
    params["vae"]["lr"] = "fast"
    params["masks"]["typo"] = 1
    write_yaml(tmp_path / "params.yaml", params)
    problems = check.check(tmp_path / "params.yaml")
    assert len(problems) == 3
    assert any("splat.every must be >= 1, got 0" in p for p in problems)
    assert any("vae.lr must be a number, got 'fast'" in p for p in problems)
    assert any("unknown key(s) masks.typo" in p for p in problems)
    assert check.check(tmp_path / "params.yaml", ["vae", "train@chopgrad_d1"]) == [
        next(p for p in problems if "vae.lr" in p)]
    assert "unknown stage 'nope'" in check.check(REPO / "params.yaml", ["nope"])[0]


def test_the_params_check_imports_no_heavy_tools():
    code = ("import sys, time; start = time.perf_counter(); from stages.common import check; "
            "assert check.check('params.yaml') == []; print(round(time.perf_counter() - start, 2)); "
            "print([m for m in ('mlflow', 'prefect', 'dvc', 'gsplat', 'pyiqa', 'lpips', 'diffusers', 'transformers',"
            " 'torchvision') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                          env={**os.environ, "MLFLOW_TRACKING_URI": "", "CHOPGRAD_TRACKING_OUTAGE": "local"})
    seconds, heavy = done.stdout.splitlines()
    assert heavy == "[]", f"importing the stages for their Params pulled in {heavy} ({seconds} s)"


@pytest.mark.slow
def test_the_flow_checks_params_before_any_stage_and_does_not_retry_bad_input(tmp_path):
    from prefect.states import Failed

    from pipeline import flow

    repo = tmp_path / "repo"
    shutil.copytree(REPO / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = read_yaml(REPO / "params.yaml")
    params["degrade"]["scale"] = 0
    write_yaml(repo / "params.yaml", params)
    with pytest.raises(flow.InputError, match=r"params check failed before any stage ran: .*degrade\.scale"):
        flow.check_params(repo)
    flow.check_params(tmp_path)  # a repository without the check: nothing to run

    said = ["Running stage 'x':\n", "x: input error: /data/a.png is corrupt\n", "ERROR: failed to reproduce 'x'\n"]
    error = flow.stage_error("x", 255, said)
    assert isinstance(error, flow.InputError) and "x: input error: /data/a.png is corrupt" in str(error)
    retryable = flow.reproduce.retry_condition_fn  # Prefect asks it before each retry
    assert not retryable(flow.reproduce, None, Failed(data=error))
    other = flow.stage_error("x", 255, ["Traceback ...\n", "MemoryError\n"])
    assert type(other) is flow.StageFailed and retryable(flow.reproduce, None, Failed(data=other))


@pytest.mark.slow
def test_a_stage_prints_an_input_error_in_one_line(tmp_path):
    """A bad params file under `python -m stages.<name>`: one line naming the key, no traceback."""
    params = read_yaml(REPO / "params.yaml")
    params["scenes"]["frames"] = 0
    write_yaml(tmp_path / "params.yaml", params)
    env = {k: v for k, v in os.environ.items() if k != "CHOPGRAD_TRACEBACK"}
    command = [sys.executable, "-m", "stages.scenes", "--params", str(tmp_path / "params.yaml"), "--out",
               str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert done.stderr.startswith("scenes: input error: ") and "scenes.frames" in done.stderr
    assert "Traceback" not in done.stderr and "CHOPGRAD_TRACEBACK=1" in done.stderr
    done = subprocess.run(command, cwd=REPO, env={**env, "CHOPGRAD_TRACEBACK": "1"}, capture_output=True, text=True,
                          check=False)
    assert "Traceback" in done.stderr and "ParamsError" in done.stderr

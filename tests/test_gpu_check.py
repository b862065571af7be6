"""pipeline.gpu_check: the parts that run without a GPU (wheel preparation, arguments, the plan, the
training step at toy size). The check itself runs on a GPU machine (docs/benchmark.md)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline import gpu_check


def test_prepare_pins_the_locked_versions_and_never_carries_torch(tmp_path, capsys):
    gpu_check.main(["prepare", "--wheels", str(tmp_path / "whl"), "--extra", "pyiqa", "--dry-run"])
    lines = capsys.readouterr().out.splitlines()
    locked = gpu_check.locked_versions()
    assert "pip wheel --no-deps --wheel-dir" in lines[0] and lines[0].endswith(str(gpu_check.REPO))
    downloads = [line for line in lines[1:] if " download " in line]
    assert len(downloads) == len(gpu_check.NEEDED) + len(gpu_check.TEST_NEEDS) + 1
    for name in (*gpu_check.NEEDED, *gpu_check.TEST_NEEDS, "pyiqa"):
        assert any(line.endswith(f"{name}=={locked[gpu_check._normal(name)]}") for line in downloads), name
    assert all("--python-version 3.12" in line and "--only-binary=:all:" in line for line in downloads)
    assert not any("torch==" in line for line in lines)
    assert not (tmp_path / "whl").exists()  # a dry run writes nothing
    gpu_check.main(["prepare", "--wheels", str(tmp_path / "whl"), "--no-tests", "--dry-run"])
    assert " av==" not in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [("torch", "must not be carried"), ("nvidia-cublas", "must not be carried"),
                                            ("no-such-package", "not in requirements.lock")])
def test_prepare_refuses_what_it_must_not_or_cannot_carry(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit):
        gpu_check.main(["prepare", "--wheels", str(tmp_path), "--extra", extra, "--dry-run"])
    assert message in capsys.readouterr().err


def test_run_prints_its_plan_and_runs_nothing_on_a_dry_run(tmp_path, capsys):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    (wheels / "chopgrad-0.1.0-py3-none-any.whl").write_bytes(b"")
    gpu_check.main(["run", "--wheels", str(wheels), "--out", str(tmp_path / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert "--no-index --no-deps" in out and "(1 wheels)" in out
    for step in ("tests", "bench_tiles_1x1", "bench_tiles_2x2", "train"):
        assert f"  {step} (up to " in out
    assert "-m pytest -q -m cuda" in out
    assert "--decoder wan2.1 --frames 81 --height 480 --width 832 --dtype bfloat16 --device cuda" in out
    assert "--tiles 2,2" in out and "--modes full,exact,chopgrad --d-trunc 0,1,2 --keep-going" in out
    assert not (tmp_path / "out").exists()
    assert sum(step.share for step in gpu_check.plan("paper", "cuda", tmp_path, 10)) <= 1


@pytest.mark.parametrize("args, message", [
    (["--wheels", "missing"], "is not a folder: fill it with `python -m pipeline.gpu_check prepare"),
    (["--wheels", "."], "holds no chopgrad wheel"),
    (["--minutes", "0.5"], "--minutes must be at least 1"),
    (["--steps", "train,fly"], "unknown ['fly']"),
])
def test_run_refuses_bad_arguments_before_any_work(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        gpu_check.main(["run", "--out", str(tmp_path / "out"), *args])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_run_on_cuda_without_a_gpu_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_check.main(["run", "--out", str(tmp_path / "out")])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err


def test_the_paper_scale_is_wan21_14b():
    from diffusers import WanTransformer3DModel  # after conftest's `import chopgrad` (its torchvision guard)

    with torch.device("meta"):
        model = WanTransformer3DModel(**gpu_check.SCALES["paper"].transformer)
    assert 14.0e9 < sum(p.numel() for p in model.parameters()) < 14.5e9


@pytest.mark.slow  # a subprocess that builds the toy transformer and VAE
def test_the_training_step_runs_at_toy_size_and_lands_in_the_table(tmp_path, capsys):
    gpu_check.main(["run", "--scale", "tiny", "--device", "cpu", "--steps", "train", "--out", str(tmp_path)])
    record = json.loads((tmp_path / "gpu_check.json").read_text())
    (step,) = record["steps"]
    assert step["status"] == "passed", (tmp_path / "train.log").read_text()[-3000:]
    (row,) = step["rows"]
    assert row["transformer_parameters"] > row["trainable_parameters"] > 0  # a LoRA on a frozen base
    assert row["step_seconds"] > 0 and row["peak_gib"] is None and torch.isfinite(torch.tensor(row["loss"]))
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| train | train step d_trunc=1 tiles=2x2 9 frames 32x32 float32 on cpu" in table

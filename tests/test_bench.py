"""The benchmark CLI: one small run end to end, its JSON schema, and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

KEYS = {"decoder", "mode", "d_trunc", "release_every", "frames", "height", "width", "peak_bytes", "seconds", "device", "dtype",
        "tiles"}


def _bench(*args, check=True):
    return subprocess.run([sys.executable, "-m", "chopgrad.bench", *args], capture_output=True, text=True, check=check)


@pytest.mark.slow  # four measurement processes (fresh ones, as the benchmark measures)
def test_bench_writes_rows_table_and_plot(tmp_path):
    out = _bench(
        "--decoder", "cogvideox-tiny", "--frames", "9", "--d-trunc", "1", "--modes", "exact,chopgrad",
        "--height", "32", "--width", "32", "--json", str(tmp_path / "rows.json"), "--plot", str(tmp_path / "plot.png"),
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["mode"], r["d_trunc"], r["frames"]) for r in rows] == [("exact", None, 9), ("chopgrad", 1, 9)]
    for row in rows:
        assert set(row) == KEYS
        assert row["peak_bytes"] > 0 and row["seconds"] > 0 and row["device"].startswith("cpu")
    assert "| cogvideox-tiny | chopgrad | 1 | 9 | 32x32 |" in out.stdout
    assert [r["release_every"] for r in rows] == [None, 1]
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "16"], "cannot produce 16 frames: the nearest frame counts it decodes to are 13 or 17"),
        (["--modes", "fast"], "unknown mode"),
        (["--modes", "chopgrad,release"], "choose from full, exact, chopgrad, chopgrad_release, chopgrad_recompute"),
        (["--d-trunc", "-1"], "must be >= 0"),
        (["--modes", "chopgrad_release", "--release-every", "2,0"], "--release-every values must be >= 1"),
        (["--decoder", "sd-vae"], "invalid choice"),
        (["--no-time", "--plot", "p.png"], "--plot draws time beside memory: leave out --no-time"),
    ],
)
def test_bench_argument_errors(args, message, capsys):
    from chopgrad import bench

    with pytest.raises(SystemExit) as exit_:  # in this process: argparse's exit, before any measurement
        bench.main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tiling_error_shrinks_as_the_halo_grows(tmp_path):
    out = _bench(
        "--decoder", "wan-tiny", "--frames", "5", "--height", "64", "--width", "64", "--tiles", "2,2",
        "--tiling-halos", "0,2,8", "--json", str(tmp_path / "tiling.json"),
    )
    rows = json.loads((tmp_path / "tiling.json").read_text())
    assert [r["halo"] for r in rows] == [0, 2, 8]
    assert rows[0]["rms"] > rows[1]["rms"] > 0
    assert rows[2]["rms"] == 0  # a halo as large as the latent: every tile sees all of it
    assert "| 2x2 | 0 |" in out.stdout


def test_new_modes_measure_in_process():
    from chopgrad import bench

    configs = [
        bench.Config("cogvideox-tiny", "chopgrad_release", 1, 25, 16, 16, "cpu", "float64", release_every=2),
        bench.Config("cogvideox-tiny", "chopgrad_recompute", 1, 25, 16, 16, "cpu", "float64", release_every=1,
                     tiles=(2, 1)),
    ]
    assert [bench.decode_kwargs(c) for c in configs] == [
        {"d_trunc": 1, "release_every": 2, "tiles": (1, 1)}, {"d_trunc": 1, "recompute": True, "tiles": (2, 1)}
    ]
    rows = bench.run(configs, fresh_process=False, progress=lambda line: None)
    assert [(r["mode"], r["d_trunc"], r["release_every"]) for r in rows] == [
        ("chopgrad_release", 1, 2), ("chopgrad_recompute", 1, 1)
    ]
    assert all(set(r) == KEYS and r["seconds"] > 0 for r in rows)
    table = bench.markdown_table(rows)
    assert "| cogvideox-tiny | chopgrad_release | 1 | 25 | 16x16 |" in table and table.endswith("| 1 |")
    assert "| cogvideox-tiny | chopgrad_recompute | 1 | 25 | 16x16 (2x1 tiles) |" in table


def test_keep_going_records_a_failed_measurement_and_goes_on(monkeypatch):
    """A GPU run where full backprop runs out of memory: that is a row of the result, not the end of it."""
    from chopgrad import bench

    real = bench.measure

    def measure(config, warmup=False):
        if config.mode == "full":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(config, warmup)

    monkeypatch.setattr(bench, "measure", measure)
    configs = [bench.Config("wan-tiny", mode, d, 5, 16, 16, "cpu", "float32") for mode, d in (("full", None), ("chopgrad", 1))]
    with pytest.raises(torch.OutOfMemoryError):
        bench.run(configs, fresh_process=False, progress=lambda line: None)
    failed, measured = bench.run(configs, fresh_process=False, progress=lambda line: None, keep_going=True)
    assert failed["error"] == "OutOfMemoryError: CUDA out of memory. Tried to allocate 20.00 GiB"
    assert failed["peak_bytes"] is None and measured["seconds"] > 0 and "error" not in measured
    assert "| wan-tiny | full | - | 5 | 16x16 | OutOfMemoryError: CUDA out of memory." in bench.markdown_table([failed, measured])


@pytest.mark.slow  # fresh measurement processes
def test_bench_cli_runs_the_new_modes(tmp_path):
    _bench(
        "--decoder", "cogvideox-tiny", "--frames", "9", "--d-trunc", "1", "--release-every", "2,3",
        "--modes", "chopgrad_release,chopgrad_recompute", "--height", "16", "--width", "16", "--no-time",
        "--json", str(tmp_path / "rows.json"),
    )
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["mode"], r["release_every"]) for r in rows] == [
        ("chopgrad_release", 2), ("chopgrad_release", 3), ("chopgrad_recompute", 1)
    ]
    assert all(r["peak_bytes"] > 0 and r["seconds"] is None for r in rows)  # memory only


def test_plot_draws_against_frames_or_against_d_trunc(tmp_path):
    from chopgrad import bench

    def row(mode, d_trunc, frames, s=None):
        return {"decoder": "wan-tiny", "mode": mode, "d_trunc": d_trunc, "frames": frames, "height": 64, "width": 64,
                "peak_bytes": 2**20 * (1 + (d_trunc or 9)), "seconds": 0.1 * frames, "device": "cpu",
                "release_every": s}

    by_frames = [row("chopgrad", 1, f) for f in (17, 33)] + [row("full", None, f) for f in (17, 33)]
    figure_13 = [row("full", None, 93)] + [row("chopgrad", d, 93) for d in (0, 1, 2)] + \
                [row("chopgrad_release", d, 93, 2) for d in (0, 1, 2)]
    for name, rows in (("frames.png", by_frames), ("d_trunc.png", figure_13)):
        bench.plot(rows, tmp_path / name)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow  # one measurement process
def test_a_failing_measurement_reports_the_childs_own_error():
    from chopgrad import bench

    config = bench.Config("wan-tiny", "chopgrad", 1, 17, 60, 64, "cpu", "float32")
    with pytest.raises(RuntimeError, match=r"measuring chopgrad d_trunc=1 at 17 frames failed: .*multiples of 8"):
        bench.run([config], progress=lambda _: None)

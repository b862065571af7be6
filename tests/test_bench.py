"""The benchmark CLI: one small run end to end, its JSON schema, and its argument errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {"decoder", "mode", "d_trunc", "frames", "height", "width", "peak_bytes", "seconds", "device", "dtype"}


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
    assert (tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    "args,message",
    [
        (["--frames", "16"], "cannot produce 16 frames: the nearest frame counts it decodes to are 13 or 17"),
        (["--modes", "fast"], "unknown mode"),
        (["--d-trunc", "-1"], "must be >= 0"),
        (["--decoder", "sd-vae"], "invalid choice"),
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

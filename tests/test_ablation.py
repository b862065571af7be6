"""pipeline.ablation: the seeded Table 2 ablation's statistics and its refusals."""

import json
import math

import pytest

from pipeline import ablation


def _seed(psnr: dict[str, float], roundtrip: float = 20.0, base: float = 18.0) -> dict:
    rows = {"input": {"psnr": base, "ssim": 0.5}, "vae_roundtrip": {"psnr": roundtrip, "ssim": 0.6}}
    rows.update({method: {"psnr": value, "ssim": 0.7} for method, value in psnr.items()})
    return {"nvs": rows, "stand_in_metrics": ""}


def test_mean_spread_and_paired_differences():
    per_seed = {0: _seed({"chopgrad_d1": 21.0}, roundtrip=20.0), 1: _seed({"chopgrad_d1": 22.0}, roundtrip=20.0),
                2: _seed({"chopgrad_d1": 23.0}, roundtrip=20.0)}
    table = ablation.aggregate(per_seed)
    cell = table["nvs"]["chopgrad_d1"]
    assert cell["psnr"]["mean"] == pytest.approx(22.0)
    assert cell["psnr"]["std"] == pytest.approx(1.0)  # sample std of 21, 22, 23
    assert cell["psnr_vs_vae_roundtrip"]["mean"] == pytest.approx(2.0)
    assert cell["psnr_vs_input"]["mean"] == pytest.approx(4.0)
    assert table["nvs"]["vae_roundtrip"]["psnr"]["std"] == 0.0
    assert "psnr_vs_vae_roundtrip" not in table["nvs"]["vae_roundtrip"]


def test_a_difference_is_paired_per_seed():
    # The reference moves with the seed exactly as the method does: the difference has no spread.
    per_seed = {seed: _seed({"latent_mse": 20.5 + seed}, roundtrip=20.0 + seed) for seed in range(3)}
    cell = ablation.aggregate(per_seed)["nvs"]["latent_mse"]["psnr_vs_vae_roundtrip"]
    assert cell["mean"] == pytest.approx(0.5) and cell["std"] == pytest.approx(0.0)


def test_render_marks_a_difference_within_the_spread():
    per_seed = {0: _seed({"per_frame": 20.5}), 1: _seed({"per_frame": 19.0}), 2: _seed({"per_frame": 20.9})}
    text = ablation.render(ablation.aggregate(per_seed), [0, 1, 2], {0: 1.0})
    row = next(line for line in text.splitlines() if line.startswith("| per_frame"))
    assert "(n.s.)" in row.split("|")[4]  # +0.13 ± 1.03 against vae_roundtrip
    assert "seed 0: 1.0" in text


def test_seed_files_from_different_params_are_refused():
    per_seed = {0: _seed({"chopgrad_d1": 21.0}), 1: _seed({"latent_mse": 21.0})}
    with pytest.raises(ValueError, match="lack some of its methods"):
        ablation.aggregate(per_seed)


def test_aggregate_only_reads_the_seed_files(tmp_path):
    for seed in (0, 1):
        (tmp_path / f"seed{seed}.json").write_text(json.dumps(_seed({"chopgrad_d0": 21.0 + seed})))
    assert ablation.main(["--seeds", "0", "1", "--out", str(tmp_path), "--aggregate-only"]) == 0
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert math.isclose(saved["table"]["nvs"]["chopgrad_d0"]["psnr"]["mean"], 21.5)
    assert "## nvs" in (tmp_path / "ablation.md").read_text()


def test_missing_seed_files_and_single_seed_are_refused(tmp_path):
    with pytest.raises(SystemExit, match=r"seed\{0,1\}\.json missing"):
        ablation.main(["--seeds", "0", "1", "--out", str(tmp_path), "--aggregate-only"])
    with pytest.raises(SystemExit):
        ablation.main(["--seeds", "3", "--out", str(tmp_path), "--aggregate-only"])


def test_set_seed_keeps_the_rest_of_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# top comment\ntrain:\n  seed: 0        # the seed\n  lr: 1.0e-3\nother: {a: 1}\n")
    ablation._set_seed(path, 7)
    text = path.read_text()
    assert "seed: 7" in text and "# the seed" in text and "# top comment" in text and "lr: 1.0e-3" in text


def test_methods_are_compared_with_latent_mse_seed_by_seed():
    per_seed = {seed: _seed({"latent_mse": 20.0 + seed, "chopgrad_d1": 20.2 + seed}) for seed in range(3)}
    table = ablation.aggregate(per_seed)["nvs"]
    assert table["chopgrad_d1"]["psnr_vs_latent_mse"]["mean"] == pytest.approx(0.2)
    assert table["chopgrad_d1"]["psnr_vs_latent_mse"]["std"] == pytest.approx(0.0)
    assert "psnr_vs_latent_mse" not in table["latent_mse"]

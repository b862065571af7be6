"""chopgrad.weights: the registry, missing-file errors, stand-in detection and the CLI (no network)."""

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import chopgrad  # noqa: F401  (before torchvision: the CPU fix)
from chopgrad import weights


@pytest.fixture
def empty_home(tmp_path, monkeypatch):
    """TORCH_HOME and HOME pointing at empty folders: no weight file is present."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv(weights.CLIP_HOME_ENV, raising=False)
    return tmp_path


def test_every_metric_file_is_registered_with_a_source():
    for metric, names in weights.METRIC_WEIGHTS.items():
        for name in names:
            entry = weights.REGISTRY[name]
            assert entry.url.startswith("https://"), (metric, name)
            assert entry.filename in entry.url or entry.location == "lpips", (metric, name)


def test_paths_follow_torch_home_set_after_import(empty_home):
    assert weights.weight_path("vgg16") == empty_home / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    assert weights.weight_path("dists") == empty_home / "torch" / "hub" / "pyiqa" / "DISTS_weights-f5e65c96.pth"
    assert weights.weight_path("clip_vit_b32") == empty_home / "home" / ".cache" / "clip" / "ViT-B-32.pt"


def test_clip_home_variable_moves_the_clip_lookup(empty_home, monkeypatch):
    monkeypatch.setenv(weights.CLIP_HOME_ENV, str(empty_home / "clip"))
    assert weights.weight_path("clip_vit_l14") == empty_home / "clip" / "ViT-L-14.pt"


def test_missing_file_raises_at_once_naming_file_and_folder(empty_home):
    start = time.perf_counter()
    with pytest.raises(weights.MissingWeightsError) as info:
        weights.require_metric("dists")
    assert time.perf_counter() - start < 1.0
    message = str(info.value)
    assert "DISTS_weights-f5e65c96.pth" in message and "vgg16-397923af.pth" in message
    assert str(weights.weight_path("dists")) in message
    assert str(weights.weight_path("vgg16")) in message
    assert weights.REGISTRY["dists"].url in message


def test_status_tells_official_stand_in_unverified_and_missing(empty_home):
    assert weights.file_status("vgg16") == "missing"
    # The LPIPS linear layers ship in the lpips wheel: their published hash is checked in full.
    assert weights.file_status("lpips_vgg_lin") == "official"
    path = weights.weight_path("vgg16")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not the ImageNet VGG16")
    assert weights.file_status("vgg16") == "stand-in"
    i3d = weights.weight_path("i3d")
    i3d.write_bytes(b"no published hash for this file")
    assert weights.file_status("i3d") == "unverified"
    assert weights.require(["vgg16", "i3d"]) == {"vgg16": "stand-in", "i3d": "unverified"}


def test_hash_prefix_match_counts_as_official(empty_home, monkeypatch):
    path = weights.weight_path("alexnet")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"some bytes")
    digest = hashlib.sha256(b"some bytes").hexdigest()
    entry = weights.REGISTRY["alexnet"]
    monkeypatch.setitem(weights.REGISTRY, "alexnet", weights.WeightFile(
        entry.name, entry.filename, entry.location, entry.url, digest[:8], entry.description))
    assert weights.file_status("alexnet") == "official"


def test_status_cli_lists_missing_files_with_expected_paths(empty_home, capsys):
    assert weights.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"[   missing] vgg16: {weights.weight_path('vgg16')}" in out
    assert f"[  official] lpips_vgg_lin: {weights.weight_path('lpips_vgg_lin')}" in out
    assert "get it from: https://download.pytorch.org/models/vgg16-397923af.pth" in out
    n = len(weights.REGISTRY)
    assert f"2 of {n} weight files present; {n - 2} missing." in out
    path = weights.weight_path("vgg16")
    assert f"mkdir -p {path.parent} && curl -L -o {path} {weights.REGISTRY['vgg16'].url}" in out
    assert "Metrics with official weights: none" in out


def test_status_cli_runs_as_a_module(empty_home):
    env = dict(os.environ)
    result = subprocess.run([sys.executable, "-m", "chopgrad.weights", "status", "i3d"],
                            check=False, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert str(weights.weight_path("i3d")) in result.stdout
    assert "0 of 1 weight files present; 1 missing." in result.stdout


def test_cli_rejects_unknown_names(empty_home, capsys):
    with pytest.raises(SystemExit) as info:
        weights.main(["fetch", "vgg17"])
    assert info.value.code == 2
    assert "unknown weight file(s) vgg17" in capsys.readouterr().err


def test_fetch_downloads_only_missing_files_to_their_lookup_path(empty_home, monkeypatch):
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst, hash_prefix))
        Path(dst).write_bytes(b"downloaded")

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    present = weights.weight_path("raft_large")
    present.parent.mkdir(parents=True)
    present.write_bytes(b"already here")
    assert weights.main(["fetch", "raft_large", "i3d"]) == 0
    assert calls == [(weights.REGISTRY["i3d"].url, str(weights.weight_path("i3d")), None)]
    assert present.read_bytes() == b"already here"


def test_fetch_passes_the_expected_hash_to_the_download(empty_home, monkeypatch):
    calls = []
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda url, dst, hash_prefix=None, progress=True: calls.append(hash_prefix))
    weights.fetch(["vgg16"])
    assert calls == ["397923af"]


# ---------------------------------------------------------------- stand-ins


def test_stand_ins_are_written_where_the_loaders_look_and_detected(empty_home):
    written = weights.write_stand_ins(["dists", "raft_large", "laion_aesthetic"], seed=3)
    assert written == [weights.weight_path(n) for n in ("dists", "raft_large", "laion_aesthetic")]
    assert weights.file_status("dists") == "stand-in" and weights.file_status("raft_large") == "stand-in"
    assert weights.file_status("laion_aesthetic") == "unverified"  # no published hash
    state = torch.load(weights.weight_path("dists"))
    assert set(state) == {"alpha", "beta"} and state["alpha"].shape == (1, 1475, 1, 1)
    # The real loader reads it: torchvision's RAFT from $TORCH_HOME/hub/checkpoints.
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large

    model = raft_large(weights=Raft_Large_Weights.C_T_V1, progress=False)
    assert torch.equal(model.state_dict()["feature_encoder.convnormrelu.0.weight"],
                       torch.load(weights.weight_path("raft_large"))["feature_encoder.convnormrelu.0.weight"])
    assert not list(weights.weight_path("dists").parent.glob(".*partial*"))


def test_stand_ins_never_overwrite_and_are_seeded(empty_home):
    weights.write_stand_ins(["dists"], seed=1)
    first = weights.weight_path("dists").read_bytes()
    assert weights.write_stand_ins(["dists"], seed=2) == []
    assert weights.weight_path("dists").read_bytes() == first
    rng_state = torch.random.get_rng_state()
    other = empty_home / "other"
    os.environ["TORCH_HOME"] = str(other)  # restored by monkeypatch
    weights.write_stand_ins(["dists"], seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # the global RNG is left alone
    assert torch.equal(torch.load(weights.weight_path("dists"))["alpha"],
                       torch.load(empty_home / "torch" / "hub" / "pyiqa" / "DISTS_weights-f5e65c96.pth")["alpha"])


def test_stand_ins_refuse_unknown_names_before_writing(empty_home):
    with pytest.raises(KeyError, match="vgg17"):
        weights.write_stand_ins(["dists", "vgg17"])
    assert weights.file_status("dists") == "missing"


def test_stand_in_cli_refuses_without_yes_and_says_the_files_are_random(empty_home, capsys):
    assert weights.main(["stand-in", "dists", "lpips_vgg_lin"]) == 1
    captured = capsys.readouterr()
    assert "RANDOM" in captured.err and "--yes" in captured.err
    assert str(weights.weight_path("dists")) in captured.err
    assert "already present, left alone" in captured.out  # the LPIPS layers ship with lpips
    assert weights.file_status("dists") == "missing"
    assert weights.main(["stand-in", "dists", "--yes"]) == 0
    assert f"wrote stand-in (random) weights: {weights.weight_path('dists')}" in capsys.readouterr().out
    assert weights.file_status("dists") == "stand-in"
    weights.main(["status", "dists"])
    assert "NOT the official file" in capsys.readouterr().out

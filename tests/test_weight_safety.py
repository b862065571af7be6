"""Weight files never run code: a crafted pickle wherever a loader looks is refused, and nothing runs.

Each test plants a file whose unpickling would run a shell command (``touch`` a marker file, as the
reported attack ran one through ``python -m chopgrad.metrics ... --metrics dists``) where one of the
project's loaders looks, builds the metric or loss that reads it through its real library code
(pyiqa, lpips, torchvision, cd-fvd, timm, open_clip), and checks that the error names the file and
that the marker is absent. The first test shows the planted file does run its command when unpickled
the unsafe way, so the marker's absence means something.
"""

import os
import shlex
from pathlib import Path

import pytest
import torch

import chopgrad  # noqa: F401  (before torchvision: the CPU fix)
from chopgrad import losses, metrics, weights
from chopgrad.metrics import vbench
from chopgrad.metrics.frames import load_lpips

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _RunsCode:
    """Unpickles to ``os.system("touch MARKER")``: what a malicious weight file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def _plant(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": _RunsCode(marker)}, path)
    return path


@pytest.fixture(scope="module")
def vgg16_stand_in(tmp_path_factory):
    """A stand-in VGG16 written once (DISTS needs a loadable backbone to reach its own file)."""
    root = tmp_path_factory.mktemp("vgg16")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(root))
        return weights.write_stand_ins(["vgg16"])[0]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """Empty weight folders for TORCH_HOME, HOME (CLIP) and the environment torch reads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(weights.CLIP_HOME_ENV, raising=False)
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    return tmp_path


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "code-ran"


def plant(name: str, marker: Path) -> Path:
    """The crafted file, under the name and in the folder the loader of registry entry ``name`` reads."""
    return _plant(weights.weight_path(name), marker)


def link(stand_in: Path, name: str) -> None:
    path = weights.weight_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(stand_in)


def assert_refused(build, path: Path, marker: Path) -> None:
    with pytest.raises(weights.UnsafeWeightsError) as info:
        build()
    message = str(info.value)
    assert f"refused to load {path}" in message and "weights_only=True" in message, message
    assert "Fix: delete it" in message
    assert not marker.exists(), "the planted file ran its command"


def test_the_planted_file_runs_its_command_when_unpickled_unsafely(home, marker):
    path = plant("dists", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


# ---------------------------------------------------------------- every loader the project builds

# (what to build, the registry file to plant, registry files that must load first, as stand-ins)
CASES = {
    "lpips_vgg: torchvision VGG16 in the hub checkpoints": (lambda: metrics.LPIPS("vgg"), "vgg16", ()),
    "lpips_alex: torchvision AlexNet in the hub checkpoints": (lambda: metrics.LPIPS("alex"), "alexnet", ()),
    "load_lpips in stand-in mode, files present": (lambda: load_lpips("vgg", "stand_in"), "vgg16", ()),
    "dists: pyiqa's own file": (metrics.DISTS, "dists", ("vgg16",)),
    "dists: pyiqa's torchvision VGG16": (metrics.DISTS, "vgg16", ("dists",)),
    "fid: pyiqa's FID Inception": (metrics.FID, "fid_inception", ()),
    "fvd: cd-fvd's I3D": (metrics.FVD, "i3d", ()),
    "imaging_quality: pyiqa's MUSIQ": (vbench.ImagingQuality, "musiq_spaq", ()),
    "subject_consistency: DINO for timm": (vbench.SubjectConsistency, "dino_vitb16", ()),
    "background_consistency: CLIP ViT-B/32": (vbench.BackgroundConsistency, "clip_vit_b32", ()),
    "dynamic_degree: torchvision RAFT": (vbench.DynamicDegree, "raft_large", ()),
    "loss lpips_vgg": (lambda: losses.build_loss("lpips_vgg"), "vgg16", ()),
    "loss dists (pyiqa, as_loss)": (lambda: losses.build_loss("dists"), "dists", ("vgg16",)),
    "loss gram": (lambda: losses.build_loss("gram"), "vgg16", ()),
}


@pytest.mark.parametrize("case", CASES)
def test_a_crafted_weight_file_is_refused_and_runs_nothing(case, home, marker, vgg16_stand_in):
    build, planted, first = CASES[case]
    for name in first:
        if name == "vgg16":
            link(vgg16_stand_in, name)
        else:
            weights.write_stand_ins([name])
    path = plant(planted, marker)
    assert_refused(build, path, marker)


def test_the_aesthetic_head_and_its_clip_are_refused(home, marker):
    path = plant("clip_vit_l14", marker)
    plant("laion_aesthetic", marker)
    assert_refused(vbench.AestheticQuality, path, marker)


def test_a_torchscript_file_that_is_not_the_official_clip_never_reaches_torch_jit_load(home, monkeypatch):
    path = weights.weight_path("clip_vit_b32")
    path.parent.mkdir(parents=True)
    torch.jit.script(torch.nn.Linear(2, 2)).save(str(path))
    monkeypatch.setattr(torch.jit, "load", lambda *args, **kwargs: pytest.fail("torch.jit.load on an unverified file"))
    with pytest.raises(weights.UnsafeWeightsError, match="TorchScript"):
        vbench.BackgroundConsistency()


def test_the_metrics_cli_reports_the_refusal_without_running_anything(home, marker, vgg16_stand_in, capsys):
    from PIL import Image

    from chopgrad.metrics.__main__ import main

    for video in ("pred", "gt"):
        (home / video).mkdir()
        for t in range(2):
            Image.new("RGB", (32, 32), (40 * t, 80, 120)).save(home / video / f"{t}.png")
    link(vgg16_stand_in, "vgg16")
    path = plant("dists", marker)
    assert main([str(home / "pred"), str(home / "gt"), "--metrics", "dists"]) == 2
    assert capsys.readouterr().err.startswith(f"error: refused to load {path}")
    assert not marker.exists()


# ---------------------------------------------------------------- the guard itself


def test_the_guard_overrides_weights_only_false_and_the_unsafe_environment_then_restores_both(
        home, marker, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    path = plant("dists", marker)
    original = torch.load
    with weights.weights_only_loads(), weights.weights_only_loads():  # nesting changes nothing
        assert os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] == "1"
        with pytest.raises(weights.UnsafeWeightsError, match="posix.system"):
            torch.load(path, map_location="cpu", weights_only=False)
        with pytest.raises(Exception, match="weights_only|GLOBAL"):  # torch's own check, for earlier bindings
            torch.serialization.load(path, weights_only=False)
    assert torch.load is original
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert not marker.exists()


def test_plain_state_dicts_still_load_inside_the_guard(home):
    weights.write_stand_ins(["dists"])
    with weights.weights_only_loads():
        state = torch.load(weights.weight_path("dists"), weights_only=False)  # what pyiqa asks for
    assert set(state) == {"alpha", "beta"}


# ---------------------------------------------------------------- the stand-in home


def test_the_stand_in_home_refuses_a_file_it_did_not_write_before_anything_loads(home, marker):
    folder = home / "stand_in"
    path = _plant(folder / "torch" / "hub" / "pyiqa" / weights.REGISTRY["fid_inception"].filename, marker)
    with (pytest.raises(weights.UnsafeWeightsError, match="did not write") as info,
          weights.metric_home("stand_in", folder, ["fid"])):
        pytest.fail("the block ran")
    assert str(path) in str(info.value) and "delete" in str(info.value)
    assert not marker.exists()
    assert os.environ["TORCH_HOME"] == str(home / "torch")  # restored


def test_the_stand_in_home_loads_its_own_record_and_refuses_a_changed_file(home, marker):
    folder = home / "stand_in"
    with weights.metric_home("stand_in", folder, ["fid"]) as chosen:
        assert chosen.stand_in
        path = weights.weight_path("fid_inception")
        recorded = (path.parent / weights.STAND_IN_MANIFEST).read_text()
        assert path.name in recorded
        assert metrics.FID().weights == {"fid_inception": "stand-in"}
    path.write_bytes(path.read_bytes() + b"\0")  # changed since chopgrad wrote it
    with pytest.raises(weights.UnsafeWeightsError, match="did not write"), weights.metric_home("stand_in", folder, ["fid"]):
        pass

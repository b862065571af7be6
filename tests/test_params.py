"""The strict params.yaml loader: every bad section a user can write fails with a message naming it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from ruamel.yaml import YAML

from stages import vae
from stages.common.params import ParamsError, load_params

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Knobs:
    mode: Literal["a", "b"]
    steps: int
    lr: float
    name: str
    flag: bool
    sizes: tuple[int, ...]
    crop: tuple[int, int]
    folder: str | None
    weights: dict[str, float]

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"knobs.steps must be >= 1, got {self.steps}")


GOOD = {"mode": "a", "steps": 3, "lr": 0.5, "name": "x", "flag": True, "sizes": [1, 2, 3], "crop": [4, 5],
        "folder": None, "weights": {"mse": 1, "lpips": 0.5}}


def write_yaml(path: Path, data: dict) -> Path:
    with path.open("w") as f:
        YAML(typ="safe", pure=True).dump(data, f)
    return path


def repo_section(name: str) -> dict:
    return YAML(typ="safe", pure=True).load((REPO / "params.yaml").read_text())[name]


def test_good_section_converts_lists_and_ints(tmp_path):
    knobs = load_params("knobs", Knobs, write_yaml(tmp_path / "p.yaml", {"knobs": {**GOOD, "lr": 2}}))
    assert knobs == Knobs("a", 3, 2.0, "x", True, (1, 2, 3), (4, 5), None, {"mse": 1.0, "lpips": 0.5})
    assert isinstance(knobs.lr, float) and isinstance(knobs.weights["mse"], float)


def test_yaml_1_2_numbers_as_dvc_reads_them(tmp_path):
    # PyYAML (YAML 1.1) would read 1e-3 as a string; DVC and this loader read YAML 1.2.
    path = tmp_path / "p.yaml"
    path.write_text("knobs:\n  mode: a\n  steps: 3\n  lr: 1e-3\n  name: x\n  flag: false\n"
                    "  sizes: []\n  crop: [1, 2]\n  folder: some/where\n  weights: {}\n")
    knobs = load_params("knobs", Knobs, path)
    assert knobs.lr == 1e-3 and knobs.folder == "some/where" and knobs.sizes == ()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"stepz": 3}, "unknown key(s) knobs.stepz"),
        ({"steps": "ten"}, "knobs.steps must be an integer, got 'ten'"),
        ({"steps": 2.5}, "knobs.steps must be an integer, got 2.5"),
        ({"steps": True}, "knobs.steps must be an integer, got True"),
        ({"lr": "0.1"}, "remove the quotes"),
        ({"flag": 1}, "knobs.flag must be true or false"),
        ({"mode": "c"}, "knobs.mode must be one of 'a', 'b'"),
        ({"sizes": [1, "2"]}, "knobs.sizes must be a list of integers"),
        ({"crop": [4]}, "knobs.crop must be a list of 2 items"),
        ({"folder": 3}, "knobs.folder must be a string or null"),
        ({"steps": 0}, "knobs.steps must be >= 1, got 0"),
        ({"weights": [["mse", 1.0]]}, "knobs.weights must be a mapping from strings to numbers"),
        ({"weights": {"mse": "1"}}, "knobs.weights must be a mapping from strings to numbers"),
    ],
)
def test_bad_values_name_the_key(tmp_path, change, message):
    path = write_yaml(tmp_path / "p.yaml", {"knobs": {**GOOD, **change}})
    with pytest.raises(ParamsError) as err:
        load_params("knobs", Knobs, path)
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_key_missing_section_missing_file(tmp_path):
    values = dict(GOOD)
    del values["lr"]
    with pytest.raises(ParamsError, match=r"missing key\(s\) knobs.lr"):
        load_params("knobs", Knobs, write_yaml(tmp_path / "a.yaml", {"knobs": values}))
    with pytest.raises(ParamsError, match=r"no 'knobs:' section; add one with the keys \['mode', 'steps'"):
        load_params("knobs", Knobs, write_yaml(tmp_path / "b.yaml", {"other": {}}))
    with pytest.raises(ParamsError, match="'knobs:' must be a mapping"):
        load_params("knobs", Knobs, write_yaml(tmp_path / "c.yaml", {"knobs": [1, 2]}))
    with pytest.raises(ParamsError, match="no such params file"):
        load_params("knobs", Knobs, tmp_path / "none.yaml")


def test_duplicate_key_is_an_error(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("knobs:\n  steps: 1\n  steps: 2\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params("knobs", Knobs, path)


def test_repo_vae_section_loads():
    params = load_params("vae", vae.Params, REPO / "params.yaml")
    assert params.source == "pretrained" and params.pretrained_path == "weights/embedded/vae"  # shipped, in git
    assert params.clip_frames % 4 == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"clip_frames": 8}, "vae.clip_frames must be 1 + 4k"),
        ({"eval_frames": 0}, "vae.eval_frames must be 1 + 4k"),
        ({"crop": [30, 32]}, "vae.crop must be multiples of the spatial factor 4"),
        ({"temporal_downsample": [False, True, True]}, "vae.temporal_downsample needs one entry per downsampling"),
        ({"warmup_iterations": 10_000}, "vae.warmup_iterations must be in [0, iterations)"),
        ({"source": "download"}, "vae.source must be one of 'train', 'pretrained'"),
        ({"lr": "1e-3x"}, "vae.lr must be a number"),
    ],
)
def test_vae_out_of_range(tmp_path, change, message):
    path = write_yaml(tmp_path / "p.yaml", {"vae": {**repo_section("vae"), "source": "train", **change}})
    with pytest.raises(ParamsError) as err:
        load_params("vae", vae.Params, path)
    assert message in str(err.value)


def pretrained(tmp_path: Path, folder: Path | str | None) -> vae.Params:
    section = {**repo_section("vae"), "source": "pretrained",
               "pretrained_path": None if folder is None else str(folder)}
    return load_params("vae", vae.Params, write_yaml(tmp_path / "p.yaml", {"vae": section}))


def test_pretrained_folder_errors(tmp_path):
    with pytest.raises(ParamsError, match="vae.pretrained_path is null"):
        pretrained(tmp_path, None)
    with pytest.raises(ParamsError, match=r"pretrained_path: .*nowhere is not a folder \(missing weights"):
        pretrained(tmp_path, tmp_path / "nowhere")

    root = tmp_path / "Wan2.1"  # the whole model repo instead of its vae/ folder
    (root / "vae").mkdir(parents=True)
    (root / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan"}))
    with pytest.raises(ParamsError, match=r"has no config.json \(did you mean .*Wan2.1/vae\?\)"):
        pretrained(tmp_path, root)
    with pytest.raises(ParamsError, match="has no weights"):
        pretrained(tmp_path, root / "vae")

    other = tmp_path / "sd"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ParamsError, match="holds a AutoencoderKL, not an AutoencoderKLWan"):
        pretrained(tmp_path, other)


def test_pretrained_folder_is_accepted_and_training_knobs_are_not_checked(tmp_path):
    from diffusers import AutoencoderKLWan

    folder = tmp_path / "vae"
    tiny = AutoencoderKLWan(base_dim=8, z_dim=4, latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tiny.save_pretrained(folder)
    params = pretrained(tmp_path, folder)
    assert Path(params.pretrained_path) == folder
    assert dataclasses.replace(params, clip_frames=8).clip_frames == 8  # unused when not training

"""The pairs folder format (stages/common/pairs.py): write, read back, and reject what does not match."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from stages.common import pairs, video


def clip(frames=3, height=4, width=6, seed=0) -> np.ndarray:  # [T, H, W, 3] uint8
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def box_mask(frames=3, height=4, width=6) -> np.ndarray:  # [T, H, W] uint8
    mask = np.zeros((frames, height, width), np.uint8)
    mask[:, 1:3, 2:4] = 255
    return mask


def write_inpainting(folder: Path) -> None:
    with pairs.PairsWriter(folder, "inpaint_box", fps=24) as writer:
        writer.add("b", "test", clip(seed=1), clip(seed=2), mask=box_mask())
        writer.add("a", "train", clip(seed=3), clip(seed=4), mask=box_mask(), prompt="a red box")
        writer.commit()


def test_written_folder_matches_the_format_and_reads_back(tmp_path):
    folder = tmp_path / "inpaint_box"
    write_inpainting(folder)
    manifest = json.loads((folder / "pairs.json").read_text())
    assert manifest["task"] == "inpaint_box" and manifest["application"] == "inpainting"
    assert [p["scene"] for p in manifest["pairs"]] == ["a", "b"]  # train first, then test
    assert manifest["pairs"][0] == {"scene": "a", "split": "train", "input": "train/a/input",
                                    "target": "train/a/target", "mask": "train/a/mask", "prompt": "a red box",
                                    "lowres": None, "frames": 3, "height": 4, "width": 6}
    assert sorted(p.name for p in (folder / "test/b/input").iterdir()) == ["00000.png", "00001.png",
                                                                           "00002.png"]
    loaded = pairs.load_pairs(folder)
    assert [p["scene"] for p in loaded] == ["a", "b"]
    assert loaded[1]["input"] == folder / "test/b/input"
    assert [p["scene"] for p in pairs.load_pairs(folder, split="test")] == ["b"]
    frames = pairs.read_pair(loaded[1])
    np.testing.assert_array_equal(frames["input"], clip(seed=1))  # lossless
    np.testing.assert_array_equal(frames["target"], clip(seed=2))
    np.testing.assert_array_equal(frames["mask"], box_mask())
    assert frames["lowres"] is None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_sr_pairs_carry_lowres_frames(tmp_path):
    with pairs.PairsWriter(tmp_path / "sr", "sr") as writer:
        writer.add("s", "test", clip(height=8, width=12), clip(height=8, width=12, seed=1),
                   lowres=clip(height=2, width=3))
        writer.commit()
    (pair,) = pairs.load_pairs(tmp_path / "sr")
    assert pairs.read_pair(pair)["lowres"].shape == (3, 2, 3, 3)


def test_a_failure_inside_the_writer_leaves_the_previous_folder(tmp_path):
    folder = tmp_path / "inpaint_box"
    write_inpainting(folder)
    before = sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    with pytest.raises(pairs.PairsError, match="same"), pairs.PairsWriter(folder, "inpaint_box") as writer:
        writer.add("c", "train", clip(), clip(), mask=box_mask())
        writer.add("d", "train", clip(), clip(frames=2), mask=box_mask())
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == before
    assert [p.name for p in tmp_path.iterdir()] == ["inpaint_box"]


@pytest.mark.parametrize("kwargs, message", [
    ({"scene": "x", "split": "val"}, "split must be one of"),
    ({"scene": "../x"}, "plain folder name"),
    ({"mask": None}, "mask is required"),
    ({"mask": box_mask() // 2}, "0 .keep. or 255"),
    ({"input": clip().astype(np.float32)}, "uint8"),
    ({"lowres": clip()}, "lowres frames are required for the sr task and only"),
    ({"prompt": ""}, "non-empty string"),
])
def test_the_writer_rejects_bad_pairs(tmp_path, kwargs, message):
    arguments = {"scene": "x", "split": "train", "input": clip(), "target": clip(), "mask": box_mask(), **kwargs}
    with pairs.PairsWriter(tmp_path / "p", "inpaint_box") as writer, pytest.raises(pairs.PairsError, match=message):
        writer.add(**arguments)
    assert not (tmp_path / "p").exists()


def test_the_writer_rejects_an_unknown_task_and_an_empty_folder(tmp_path):
    with pytest.raises(pairs.PairsError, match="Unknown task 'deblur'"):
        pairs.PairsWriter(tmp_path / "p", "deblur")
    with pytest.raises(pairs.PairsError, match="no pairs were added"), pairs.PairsWriter(tmp_path / "p", "nvs") as writer:
        writer.commit()
    assert list(tmp_path.iterdir()) == []


def edit_manifest(folder: Path, edit) -> None:
    manifest = json.loads((folder / "pairs.json").read_text())
    edit(manifest)
    (folder / "pairs.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(task="deblur"), "unknown task 'deblur'"),
    (lambda m: m.update(application="sr"), "belongs to application 'inpainting'"),
    (lambda m: m.update(pairs=[]), "non-empty list"),
    (lambda m: m["pairs"][0].pop("prompt"), r"missing key\(s\) \['prompt'\]"),
    (lambda m: m["pairs"][0].update(mask=None), "'mask' must be a frame folder"),
    (lambda m: m["pairs"][0].update(input="../../etc"), "points outside"),
    (lambda m: m["pairs"][0].update(frames=4), "holds 3 frames, pairs.json says 4"),
    (lambda m: m["pairs"][0].update(width=7), "pairs.json says 7x4"),
    (lambda m: m["pairs"][1].update(scene="a"), "more than once"),
])
def test_load_pairs_rejects_a_malformed_folder(tmp_path, edit, message):
    folder = tmp_path / "inpaint_box"
    write_inpainting(folder)
    edit_manifest(folder, edit)
    with pytest.raises(pairs.PairsError, match=message):
        pairs.load_pairs(folder)


def test_load_pairs_names_missing_files(tmp_path):
    with pytest.raises(pairs.PairsError, match="pairs.json not found"):
        pairs.load_pairs(tmp_path)
    folder = tmp_path / "inpaint_box"
    write_inpainting(folder)
    shutil.rmtree(folder / "test/b/mask")
    with pytest.raises(pairs.PairsError, match="mask frame folder .* is missing"):
        pairs.load_pairs(folder)
    (folder / "test/b/mask").mkdir()
    video.write_image(folder / "test/b/mask/00000.png", box_mask()[0])
    with pytest.raises(pairs.PairsError, match=r"mask/ lacks 00001, 00002 \(present in .*input/\)"):
        pairs.load_pairs(folder)
    for name in ("00001.png", "00002.png"):  # the names are right, the count is not
        video.write_image(folder / "test/b/mask" / name, box_mask()[0])
    (folder / "test/b/mask/00003.png").write_bytes((folder / "test/b/mask/00000.png").read_bytes())
    for key in ("input", "target"):
        (folder / f"test/b/{key}/00003.png").write_bytes((folder / f"test/b/{key}/00000.png").read_bytes())
    with pytest.raises(pairs.PairsError, match="holds 4 frames, pairs.json says 3"):
        pairs.load_pairs(folder)


def test_frames_are_paired_by_name_not_position(tmp_path):
    """One target frame missing and another added: same count, but input k would meet target k + 1."""
    folder = tmp_path / "inpaint_box"
    write_inpainting(folder)
    target = folder / "test/b/target"
    (target / "00001.png").rename(target / "00003.png")
    with pytest.raises(pairs.PairsError, match=r"pair 'b': .*target/ lacks 00001 \(present in .*input/\); "
                                               r".*target/ has 00003, which .*input/ lacks"):
        pairs.load_pairs(folder)
    (pair,) = pairs.load_pairs(folder, split="test", check_frames=False)
    with pytest.raises(pairs.PairsError, match="target/ lacks 00001"):
        pairs.read_pair(pair)

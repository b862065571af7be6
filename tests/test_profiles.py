"""The two profiles: the embedded default (params.yaml) and the paper's (profiles/paper.yaml).

The paper profile is checked value by value against the paper's supplements B and C (each expected
value below quotes where it comes from), and planned stage by stage without data or weights
(``python -m pipeline.dry_run``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import dry_run
from stages.common import experiments

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "profiles" / "paper.yaml"

# (experiment, section, key, value, where the paper says so)
PAPER_VALUES = [
    ("nvs", "train", "transformer_path", "models/Wan2.1-T2V-14B-Diffusers", "C.2: initialized using the pre-trained Wan 2.1 14B"),
    ("nvs", "train", "iterations", 880, "C.2: trained for 880 training iterations"),
    ("nvs", "train", "clip_frames", 81, "C.2: a random 81-frame sequence"),
    ("nvs", "train", "crop", [480, 832], "C.2: Videos have a resolution of 832x480"),
    ("nvs", "train", "tiles", [2, 2], "C.2: spatial chunk size of H/2 x W/2, resulting in 4 chunks"),
    ("nvs", "train", "lr", 1e-5, "C.2: learning rate of 1e-5"),
    ("nvs", "train", "weight_decay", 0.1, "C.2: a weight decay of 0.1"),
    ("nvs", "train", "betas", [0.9, 0.99], "C.2: betas of 0.9 and 0.99"),
    ("nvs", "train", "timestep", 200, "C.2: the diffusion timestep is fixed to 200"),
    ("nvs", "train", "loss_nvs", {"latent_mse": 1.0, "lpips_vgg": 100.0}, "C.2: LPIPS weight of 100, latent MSE 1"),
    ("nvs", "train", "nproc_per_node", 8, "C.2: 8 A100 GPUs"),
    ("nvs", "train", "sequence_parallel", 8, "C.2: 8-way sequence parallelism"),
    ("nvs", "infer", "max_frames", 297, "C.2: Inference is performed on the first 297 frames"),
    ("nvs", "experiment", "eval_frames", 294, "C.2: evaluation is conducted on the first 294 frames"),
    ("nvs", "experiment", "methods", ["chopgrad_d0", "chopgrad_d1", "chopgrad_d2", "latent_mse", "latent_mse_2x",
                                      "per_frame"], "Table 2: D_trunc 0/1/2, ChopGrad*, ChopGrad-dagger"),
    ("inpaint_box", "train", "epochs", 5, "C.3: For DL3DV-benchmark we trained for 5 epochs at 49 frames"),
    ("inpaint_box", "train", "clip_frames", 49, "C.3: 5 epochs at 49 frames"),
    ("inpaint_box", "train", "loss_inpainting", {"latent_mse": 1.0, "lpips_vgg": 100.0}, "C.3: same settings as C.2"),
    ("inpaint_box", "infer", "max_frames", 49, "C.3: inference at the same duration as training"),
    ("inpaint_box", "experiment", "eval_frames", 49, "C.3: evaluating on the first N frames"),
    ("inpaint_objects", "train", "epochs", 5, "C.3: Waymo (and Waymo-Bbox) 5 epochs at 49 frames"),
    ("inpaint_objects", "train", "clip_frames", 49, "C.3: 5 epochs at 49 frames"),
    ("inpaint_rovi", "train", "iterations", 10000, "C.3: for ROVI 10k steps at 29 frames"),
    ("inpaint_rovi", "train", "clip_frames", 29, "C.3: 10k steps at 29 frames"),
    ("inpaint_rovi", "train", "text_encoder_path", "models/Wan2.1-T2V-14B-Diffusers", "C.3: ROVI's own prompts"),
    ("sr", "experiment", "vae", "models/DOVE/vae", "C.1: DOVE uses the CogVideoX autoencoder"),
    ("sr", "train", "transformer_path", "models/DOVE", "C.1: the DOVE checkpoint is used to initialize ChopGrad"),
    ("sr", "train", "iterations", 500, "4.1 / C.1: fine-tuning is performed for 500 iterations"),
    ("sr", "train", "clip_frames", 24, "C.1: videos with lengths of 24 frames"),
    ("sr", "train", "crop", [320, 640], "C.1: training at a resolution of 640x320"),
    ("sr", "train", "tiles", [1, 1], "C.1: no spatial chunking was used"),
    ("sr", "train", "loss_sr", {"mse": 1.0, "dists": 0.1}, "4.1: DISTS with a weight of 0.1 and MSE with a weight of 1"),
    ("sr", "train", "nproc_per_node", 4, "C.1: on 4 A100 GPUs"),
    ("sr", "train", "caption", "", "DOVE's inference_script.py: the empty prompt"),
    ("sr", "train", "timestep", 399, "DOVE's inference_script.py: sr_noise_step 399"),
    ("sr", "experiment", "methods", ["dove", "chopgrad_d1"], "B.1: the original DOVE checkpoint is used"),
    ("driving_mirage", "train", "schedule", "mirage", "B.4: Mirage's two training stages"),
    ("driving_mirage", "train", "reconstruction_iterations", 10000, "B.4: We train each for 10k steps"),
    ("driving_mirage", "train", "iterations", 10000, "B.4: We train each for 10k steps"),
    ("driving_mirage", "train", "lr", 2e-4, "B.4: learning rate is 2e-4"),
    ("driving_mirage", "train", "clip_frames", 9, "B.4: clip length is 9 frames"),
    ("driving_mirage", "train", "crop", [480, 832], "B.4: clip resolution is 480x832"),
    ("driving_mirage", "train", "nproc_per_node", 8, "B.4: a node with 8 80GB A100 GPUs"),
    ("driving_mirage", "train", "sequence_parallel", 1, "B.4: batch size is 8 (one clip per GPU)"),
    ("driving_mirage", "train", "decoder_lora_rank", 16, "B.4: LoRA rank and alpha values of 16 in the VAE"),
    ("driving_mirage", "train", "decoder_lora_alpha", 16, "B.4: LoRA rank and alpha values of 16 in the VAE"),
    ("driving_mirage", "train", "transformer_lora_rank", 128, "B.4: for the transformer we set rank to 128"),
    ("driving_mirage", "train", "transformer_lora_alpha", 64, "B.4: and alpha to 64"),
    ("driving_mirage", "train", "decoder_skip", True, "B.4: skip connections to the decoder"),
    ("driving_mirage", "train", "weight_decay", 0.01, "B.4: weight decay of 0.01"),
    ("driving_mirage", "train", "loss_reconstruction", {"mse": 1.0, "lpips_vgg": 0.1},
     "B.4: LPIPS and MSE losses, with the LPIPS component scaled by a factor of 0.1"),
    ("driving_mirage", "train", "loss_driving", {"lpips_vgg": 1.0, "gram": 0.1}, "B.4: Gram loss scaled by 0.1"),
    ("driving", "experiment", "start", {"experiment": "driving_mirage", "method": "mirage"},
     "C.4: We initialize with the Mirage harmonization checkpoint"),
    ("driving", "train", "iterations", 1000, "C.4: a subsequent 1k steps using ChopGrad"),
    ("driving", "train", "crop", [720, 1280], "C.4: at a resolution of 720x1280"),
    ("driving", "train", "clip_frames", 49, "C.4: a duration of 49 frames"),
    ("driving", "train", "tiles", [4, 4], "C.4: 16 spatial chunks (4h x 4w)"),
    ("driving", "train", "lr", 2e-4, "C.4: the learning rate is maintained at 2e-4"),
    ("driving", "train", "weight_decay", 0.1, "C.4: a weight decay of 0.1"),
    ("driving", "train", "sequence_parallel", 8, "C.4: batch size was set to 1 (on 8 A100 GPUs)"),
    ("driving", "experiment", "methods", ["chopgrad_d1"], "C.4: a truncation distance of 1"),
    ("driving", "infer", "segment_frames", 49, "4.4: performed inference on 49 frame segments"),
    ("driving_mirage", "infer", "segment_frames", 97, "4.4: Mirage inferred at high resolution / duration (720x1280, 97 frames)"),
]


@pytest.fixture(scope="module")
def paper() -> dict:
    data = experiments.read(PAPER)
    return {"data": data, "experiments": experiments.load(PAPER, data)}


@pytest.mark.parametrize("experiment, section, key, value, source", PAPER_VALUES,
                         ids=[f"{e}.{k}" for e, _, k, _, _ in PAPER_VALUES])
def test_the_paper_profile_has_the_papers_values(paper, experiment, section, key, value, source):
    entry = paper["experiments"][experiment]
    if section == "experiment":
        got = getattr(entry, key)
        got = list(got) if isinstance(got, tuple) else got
    else:
        mapping = experiments.train_mapping if section == "train" else experiments.infer_mapping
        got = mapping(paper["data"], entry)[key]
    assert got == value, f"{experiment} {section}.{key}: {got!r}, the paper: {value!r} ({source})"


def test_the_paper_methods_are_the_papers(paper):
    methods = paper["data"]["train"]["methods"]
    assert methods["chopgrad_d1"] == {"decode": "chopgrad", "d_trunc": 1, "iterations_factor": 1}
    assert methods["latent_mse_2x"]["iterations_factor"] == 2  # C.2: ChopGrad-dagger 1760 iterations
    assert methods["dove"] == {"decode": None, "d_trunc": None, "iterations_factor": 0}  # B.1: the checkpoint as is
    # Mirage trains 9-frame clips: 3 latent frames, which d_trunc 2 backpropagates through entirely.
    assert methods["mirage"] == {"decode": "chopgrad", "d_trunc": 2, "iterations_factor": 1}


@pytest.mark.parametrize("profile", [REPO / "params.yaml", PAPER], ids=["embedded", "paper"])
def test_a_dry_run_plans_every_stage_without_data_or_weights(profile):
    result = dry_run.plan(profile)
    assert result["problems"] == []
    data = experiments.read(profile)
    names = [stage["name"] for stage in result["stages"]]
    assert names == ["scenes", "vae", "masks", "degrade", "splat", "reinsert",
                     *(f"train@{key}" for key in data["runs"]), "infer", "evaluate", "analysis"]
    assert set(result["runs"]) == set(data["runs"])
    if profile == PAPER:  # what a user must place: the weights and data sets the profile names
        absent = " ".join(result["absent"])
        assert "models/Wan2.1-T2V-14B-Diffusers" in absent  # the data folders exist (data/external, empty)
        sr = next(stage for stage in result["stages"] if stage["name"] == "train@sr-dove")
        assert sr["missing"] == ["models/DOVE/vae"]
        chained = next(stage for stage in result["stages"] if stage["name"] == "train@driving-chopgrad_d1")
        assert "data/train/mirage/driving_mirage" in chained["deps"]  # retraining Mirage reruns it
        assert result["runs"]["nvs-chopgrad_d1"]["batch"] == 1 and result["runs"]["driving_mirage-mirage"]["batch"] == 8
    else:
        assert result["absent"] == []


def test_the_dry_run_command_prints_the_plan_and_refuses_a_broken_profile(tmp_path):
    done = subprocess.run([sys.executable, "-m", "pipeline.dry_run", "--params", str(PAPER)], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "train@driving-chopgrad_d1" in done.stdout and "starts from driving_mirage/mirage" in done.stdout
    broken = tmp_path / "params.yaml"
    broken.write_text(PAPER.read_text().replace("    methods: [dove, chopgrad_d1]", "    methods: [dove, chopgrad_d9]"))
    done = subprocess.run([sys.executable, "-m", "pipeline.dry_run", "--params", str(broken)], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "experiments.sr.methods: 'chopgrad_d9' is not in train.methods" in done.stderr

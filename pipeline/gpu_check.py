"""The GPU check in one command: CUDA tests, the VAE benchmark at the paper's size, one training step.

CI never has a GPU, and a GPU machine may have no network. So the check is split in two:

1. On a CPU machine with network, ``prepare`` fills a folder with wheels for CPython 3.12 on
   x86-64 Linux: chopgrad's own wheel and the packages the check needs beyond a GPU image's
   (torch, numpy, transformers, peft, safetensors, pytest, OpenCV are expected there; ``--extra
   NAME`` adds more, ``--no-tests`` leaves out the CUDA tests' video and splatting packages), at the
   versions of ``requirements.lock``::

       python -m pipeline.gpu_check prepare --wheels .whl

2. On the GPU machine (Python 3.12, its own torch, no network), from the repository checkout::

       python3 -m pipeline.gpu_check run --wheels .whl --out results/gpu

   installs the wheels into ``--site`` (``pip --no-index --no-deps --target``: the machine's torch
   stays), then runs, each step in its own process with its share of ``--minutes`` (10):

   * ``tests``: the CUDA-marked tests (``pytest -m cuda``);
   * ``bench``: ``chopgrad.bench`` on the Wan 2.1 VAE architecture (random weights) at 832x480,
     81 frames, bf16: full backprop, exact mode, ``d_trunc`` 0, 1, 2, tiles 1x1 and 2x2 (an
     out-of-memory is recorded as the result it is);
   * ``train``: one training step of the paper's NVS setting (supplement C.2: 81 frames at
     832x480, 2x2 tiles, ``d_trunc`` 1, bf16) on a random-weight transformer of Wan 2.1 14B's
     shape with a LoRA of rank 128, activation checkpointing, through the Wan 2.1 VAE
     architecture: seconds and peak GPU memory.

   It writes ``gpu_check.json`` and ``gpu_check.md`` (one table) under ``--out``. ``--dry-run``
   prints that plan and runs nothing; ``--scale tiny --device cpu`` runs the same steps at toy
   size (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LOCK = REPO / "requirements.lock"
# What the check imports beyond a GPU image's packages (the lent machines' image holds torch, numpy,
# transformers, peft, safetensors, pytest, opencv-python-headless, scipy, pillow, tqdm, ...): the
# library and the step measurements need diffusers; the CUDA tests also the stages' video I/O and gsplat.
NEEDED = ("diffusers",)
TEST_NEEDS = ("av", "ffmpeg-python", "future", "imageio-ffmpeg", "gsplat")
# The test files that hold CUDA-marked tests: pytest imports only these (the other test modules need
# packages a GPU image lacks, and collecting them would fail before any CUDA test ran).
CUDA_TEST_FILES = ("tests/test_splat.py", "tests/test_train.py")
# Never carried: the GPU machine's own builds must stay (a CPU torch wheel would shadow them).
NEVER = re.compile(r"^(torch|torchvision|torchaudio|triton|nvidia-.*|cuda-.*)$")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")


# ----------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class Scale:
    """The sizes of one check: the paper's (C.2) or a toy one that runs on a CPU in seconds."""

    decoder: str  # chopgrad.bench decoder name
    frames: int
    height: int
    width: int
    dtype: str
    transformer: dict  # diffusers WanTransformer3DModel config
    lora_rank: int
    text_tokens: int


SCALES = {
    "paper": Scale("wan2.1", 81, 480, 832, "bfloat16", {  # Wan 2.1 T2V 14B's transformer config
        "patch_size": (1, 2, 2), "num_attention_heads": 40, "attention_head_dim": 128, "in_channels": 16,
        "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824, "num_layers": 40,
        "cross_attn_norm": True, "eps": 1e-6}, lora_rank=128, text_tokens=512),
    "tiny": Scale("wan-tiny", 9, 32, 32, "float32", {
        "patch_size": (1, 2, 2), "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 16,
        "out_channels": 16, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 1}, lora_rank=4, text_tokens=4),
}


@dataclass(frozen=True)
class Step:
    name: str
    command: list[str]
    share: float  # of the time budget
    rows: Path | None = None  # the JSON the step writes: its measured rows


def plan(scale_name: str, device: str, out: Path, minutes: float) -> list[Step]:
    """The steps of ``run``, each a command in its own process with its share of the budget."""
    scale = SCALES[scale_name]
    python = sys.executable
    bench = [python, "-m", "chopgrad.bench", "--decoder", scale.decoder, "--frames", str(scale.frames),
             "--height", str(scale.height), "--width", str(scale.width), "--dtype", scale.dtype, "--device", device,
             "--modes", "full,exact,chopgrad", "--d-trunc", "0,1,2", "--keep-going"]
    if device == "cpu":
        bench.append("--no-time")
    steps = [Step("tests", [python, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                            *(str(REPO / name) for name in CUDA_TEST_FILES)], 0.2)]
    for tiles in ("1,1", "2,2"):
        name = f"bench_tiles_{tiles.replace(',', 'x')}"
        steps.append(Step(name, [*bench, "--tiles", tiles, "--json", str(out / f"{name}.json")], 0.25, out / f"{name}.json"))
    steps.append(Step("train", [python, "-m", "pipeline.gpu_check", "train-step", "--scale", scale_name, "--device",
                                device, "--json", str(out / "train.json")], 0.3, out / "train.json"))
    return steps


# ----------------------------------------------------------------------------- prepare (CPU, network)


def locked_versions(lock: Path = LOCK) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of ``requirements.lock`` (names normalised)."""
    versions = {}
    for line in lock.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if match:
            versions[_normal(match.group(1))] = match.group(2)
    return versions


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def prepare_commands(wheels: Path, extra: list[str], python_version: str = "3.12", tests: bool = True) -> list[list[str]]:
    """The pip commands that fill ``wheels``: chopgrad's wheel, then each needed package's, pinned."""
    versions = locked_versions()
    names = [*NEEDED, *(TEST_NEEDS if tests else ()), *extra]
    refused = [n for n in names if NEVER.match(_normal(n))]
    if refused:
        raise ValueError(f"{refused} must not be carried: the GPU machine's own torch/CUDA builds stay")
    missing = [n for n in names if _normal(n) not in versions]
    if missing:
        raise ValueError(f"{missing} are not in {LOCK.name}: name packages the project locks")
    pip = [sys.executable, "-m", "pip"]
    commands = [[*pip, "wheel", "--no-deps", "--wheel-dir", str(wheels), str(REPO)]]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    for name in names:
        commands.append([*pip, "download", "--no-deps", "--only-binary=:all:", "--python-version", python_version,
                         "--implementation", "cp", *platforms, "--dest", str(wheels),
                         f"{name}=={versions[_normal(name)]}"])
    return commands


def install_command(wheels: Path, site: Path) -> list[str]:
    """Install every wheel of ``wheels`` into ``site`` without an index or dependencies."""
    found = sorted(wheels.glob("*.whl"))
    if not any(p.name.startswith("chopgrad-") for p in found):
        raise ValueError(f"{wheels} holds no chopgrad wheel: fill it first with "
                         f"`python -m pipeline.gpu_check prepare --wheels {wheels}` on a machine with network")
    return [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--upgrade",
            "--target", str(site), *map(str, found)]


# ----------------------------------------------------------------------------- the training step


def train_step(scale_name: str, device: str) -> dict:
    """One step of the paper's NVS setting at ``scale``: latent MSE plus a pixel MSE through
    ``chopgrad.decode_loss`` (2x2 tiles, ``d_trunc`` 1), backward through a LoRA'd transformer."""
    import torch
    import torch.nn.functional as F

    import chopgrad  # first: its torchvision guard (chopgrad/_compat.py) before diffusers imports torchvision
    from chopgrad import bench, lora

    scale = SCALES[scale_name]
    from diffusers import WanTransformer3DModel
    dtype = getattr(torch, scale.dtype)
    started = time.perf_counter()
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its own dtype: 14B parameters in float32 would not fit
    try:
        with torch.device(device):
            model = WanTransformer3DModel(**scale.transformer)
    finally:
        torch.set_default_dtype(default)
    lora.add_transformer_lora(model, scale.lora_rank, scale.lora_rank / 2)
    for param in lora.trainable_parameters(model).values():
        param.data = param.data.float()  # adapters train in float32, as the train stage keeps them
    model.enable_gradient_checkpointing()
    decoder = bench.build_decoder(scale.decoder, device, dtype)
    built = time.perf_counter() - started
    scale_factor = decoder.spatial_scale
    latent_frames = chopgrad.num_latent_frames(decoder, scale.frames)
    shape = (1, decoder.latent_channels, latent_frames, scale.height // scale_factor, scale.width // scale_factor)
    generator = torch.Generator(device).manual_seed(1)
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    z_hat = z + 0.3 * torch.randn(shape, generator=generator, device=device, dtype=dtype)
    text = torch.randn(1, scale.text_tokens, scale.transformer["text_dim"], generator=generator, device=device, dtype=dtype)
    target = torch.rand(1, 3, scale.frames, scale.height, scale.width, generator=generator, device=device, dtype=dtype) * 2 - 1
    optimizer = torch.optim.AdamW(lora.trainable_parameters(model).values(), lr=1e-5)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    timestep = torch.tensor([500], device=device)
    with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        velocity = model(hidden_states=z_hat, timestep=timestep, encoder_hidden_states=text, return_dict=False)[0]
    latents = (z_hat - velocity).to(dtype)  # one-step restoration: the latent the VAE decodes
    latent_loss = F.mse_loss(velocity.float(), (z_hat - z).float())
    pixel = chopgrad.decode_loss(decoder, latents, target, lambda p, t: F.mse_loss(p.float(), t.float()),
                                 d_trunc=1, tiles=(2, 2))
    (latent_loss + pixel.float()).backward()
    optimizer.step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    parameters = sum(p.numel() for p in model.parameters())
    return {"scale": scale_name, "device": bench.device_name(torch.device(device)), "frames": scale.frames,
            "height": scale.height, "width": scale.width, "dtype": scale.dtype, "tiles": [2, 2], "d_trunc": 1,
            "transformer_parameters": parameters, "lora_rank": scale.lora_rank,
            "trainable_parameters": sum(p.numel() for p in lora.trainable_parameters(model).values()),
            "build_seconds": round(built, 2), "step_seconds": round(seconds, 3),
            "peak_gib": None if peak is None else round(peak / 2**30, 2),
            "loss": float(latent_loss + pixel.float())}


# ----------------------------------------------------------------------------- run


def run_steps(steps: list[Step], minutes: float, env: dict, out: Path) -> list[dict]:
    """Run each step with its share of the budget; record its outcome, never stop at a failure."""
    results = []
    for step in steps:
        limit = max(30.0, step.share * minutes * 60)
        if step.rows is not None:
            step.rows.unlink(missing_ok=True)  # never report an earlier run's rows
        start = time.perf_counter()
        # Its own process group: a timeout ends the step's children too.
        process = subprocess.Popen(step.command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        try:
            output = process.communicate(timeout=limit)[0]
            status = "passed" if process.returncode == 0 else f"failed (exit {process.returncode})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            output = process.communicate()[0]
            status = f"timed out after {limit:.0f} s"
        (out / f"{step.name}.log").write_text(output)
        rows = json.loads(step.rows.read_text()) if step.rows is not None and step.rows.is_file() else []
        results.append({"step": step.name, "status": status, "seconds": round(time.perf_counter() - start, 1),
                        "command": shlex.join(step.command), "last_line": (output.strip().splitlines() or [""])[-1],
                        "rows": rows if isinstance(rows, list) else [rows]})
    return results


def markdown(results: list[dict]) -> str:
    """One table: each step's outcome, then each of its measured rows (bench rows, the training step)."""
    lines = ["| step | what | outcome | seconds | peak GiB |", "|---|---|---|---|---|"]
    for result in results:
        lines.append(f"| {result['step']} | {result['last_line'][:100].replace('|', '/')} | {result['status']} | "
                     f"{result['seconds']} | |")
        for row in result["rows"]:
            seconds = row.get("seconds", row.get("step_seconds"))
            peak = row.get("peak_gib") if "peak_gib" in row else (
                None if row.get("peak_bytes") is None else round(row["peak_bytes"] / 2**30, 2))
            d_trunc = "-" if row.get("d_trunc") is None else row["d_trunc"]
            tiles = "x".join(map(str, row.get("tiles") or (1, 1)))
            what = (f"{row.get('mode', 'train step')} d_trunc={d_trunc} tiles={tiles} {row['frames']} frames "
                    f"{row['height']}x{row['width']} {row['dtype']} on {row['device']}")
            outcome = row.get("error", "measured").replace("|", "/")
            lines.append(f"| {result['step']} | {what} | {outcome} | {'-' if seconds is None else seconds} | "
                         f"{'-' if peak is None else peak} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.gpu_check", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="on a CPU machine with network: fill a folder with wheels")
    prep.add_argument("--wheels", type=Path, required=True)
    prep.add_argument("--extra", action="append", default=[], help="another locked package to carry (repeatable)")
    prep.add_argument("--python-version", default="3.12")
    prep.add_argument("--no-tests", action="store_true",
                      help="leave out what only the CUDA tests need (av, ffmpeg-python, imageio-ffmpeg, gsplat: "
                           "about 75 MB); then run the check with --steps bench_tiles_1x1,bench_tiles_2x2,train")
    prep.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    check = sub.add_parser("run", help="on the GPU machine: install the wheels, run the check")
    check.add_argument("--wheels", type=Path, help="wheel folder from `prepare` (leave out when chopgrad is installed)")
    check.add_argument("--site", type=Path, default=Path("/tmp/chopgrad-site"), help="where the wheels are installed")
    check.add_argument("--out", type=Path, required=True)
    check.add_argument("--minutes", type=float, default=10.0, help="time budget of the whole check")
    check.add_argument("--scale", choices=sorted(SCALES), default="paper")
    check.add_argument("--device", default="cuda")
    check.add_argument("--steps", help="comma-separated subset of the steps (default: all): tests, "
                       "bench_tiles_1x1, bench_tiles_2x2, train")
    check.add_argument("--dry-run", action="store_true", help="print the plan, run nothing")
    step = sub.add_parser("train-step", help="(one step of `run`) time one training step")
    step.add_argument("--scale", choices=sorted(SCALES), default="paper")
    step.add_argument("--device", default="cuda")
    step.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)

    if args.command == "prepare":
        try:
            commands = prepare_commands(args.wheels, args.extra, args.python_version, not args.no_tests)
        except ValueError as error:
            parser.error(str(error))
        for command in commands:
            print(shlex.join(command))
            if not args.dry_run:
                args.wheels.mkdir(parents=True, exist_ok=True)
                subprocess.run(command, check=True)
        return
    if args.command == "train-step":
        result = train_step(args.scale, args.device)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result))
        return

    if args.minutes < 1:
        parser.error(f"--minutes must be at least 1, got {args.minutes:g}")
    if args.wheels is not None and not args.wheels.is_dir():
        parser.error(f"--wheels {args.wheels} is not a folder: fill it with `python -m pipeline.gpu_check prepare "
                     f"--wheels {args.wheels}` on a machine with network, and carry it here")
    try:
        install = None if args.wheels is None else install_command(args.wheels, args.site)
    except ValueError as error:
        parser.error(str(error))
    steps = plan(args.scale, args.device, args.out, args.minutes)
    if args.steps:
        chosen = [name.strip() for name in args.steps.split(",") if name.strip()]
        unknown = sorted(set(chosen) - {step.name for step in steps})
        if unknown or not chosen:
            parser.error(f"--steps {args.steps!r}: unknown {unknown}; choose from {', '.join(s.name for s in steps)}")
        steps = [step for step in steps if step.name in chosen]
    print(f"GPU check, {args.minutes:g} minutes, scale {args.scale}, device {args.device}, results in {args.out}:")
    if install:
        print(f"  install: {shlex.join(install[:11])} ... ({len(install) - 11} wheels)")
    for item in steps:
        print(f"  {item.name} (up to {item.share * args.minutes:.1f} min): {shlex.join(item.command)}")
    if args.dry_run:
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            parser.error("--device cuda but torch.cuda.is_available() is False: run it on the GPU machine "
                         "(or --scale tiny --device cpu for the toy run)")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if install:
        subprocess.run(install, check=True)
        env["PYTHONPATH"] = os.pathsep.join([str(args.site), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    else:
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_steps(steps, args.minutes, env, args.out)
    record = {"date": time.strftime("%Y-%m-%d"), "scale": asdict(SCALES[args.scale]), "device": args.device,
              "minutes": args.minutes, "steps": results}
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=2, default=list) + "\n")
    table = markdown(results)
    (args.out / "gpu_check.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()

"""Benchmark: peak memory and wall time of one ``decode_loss(...).backward()``.

    python -m chopgrad.bench --decoder wan-tiny --frames 17,33,65 --d-trunc 0,1,2 --json out.json

For each configuration (a mode, below) and frame count it measures ``peak_bytes``, the working
memory of the call above what was allocated before it: on CUDA from ``torch.cuda.max_memory_allocated``; on CPU the peak resident memory of a
fresh process that runs only that configuration, minus its resident memory just before the call
(Linux: ``/proc/self/status``, with the peak reset through ``/proc/self/clear_refs``; the child
runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed memory leaves the resident set). Time is
the wall time of the call after one warm-up call, in a second fresh process on CPU.

Modes (``--modes``), each one ``decode_loss`` call (:data:`MODES`): ``full`` (``d_trunc=None``),
``exact`` (``d_trunc=None, recompute=True``), ``chopgrad`` (Algorithm 1 at each ``--d-trunc``),
``chopgrad_release`` (supplement D's blocks: each ``--d-trunc`` with each ``--release-every``) and
``chopgrad_recompute`` (each ``--d-trunc`` with ``recompute=True``: one step's activations at a time).

Decoders have random weights (memory and time do not depend on their values):
``wan-tiny`` (``AutoencoderKLWan(base_dim=8)``), ``cogvideox-tiny`` and ``wan2.1`` (the real Wan 2.1
VAE architecture, diffusers' default config).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import chopgrad

__all__ = ["MODES", "Config", "build_decoder", "decode_kwargs", "main", "measure", "run"]

DECODERS = ("wan-tiny", "cogvideox-tiny", "wan2.1")
MODES = ("full", "exact", "chopgrad", "chopgrad_release", "chopgrad_recompute")


@dataclass(frozen=True)
class Config:
    decoder: str
    mode: str  # one of MODES
    d_trunc: int | None
    frames: int
    height: int
    width: int
    device: str
    dtype: str
    release_every: int | None = None  # steps per block (chopgrad modes); None without truncation
    tiles: tuple[int, int] = (1, 1)  # spatial tiles (rows, cols), each with decode_loss's default halo


def decode_kwargs(config: Config) -> dict:
    """The ``decode_loss`` keyword arguments of ``config.mode`` (and its tiles)."""
    mode = {
        "full": {"d_trunc": None},
        "exact": {"d_trunc": None, "recompute": True},
        "chopgrad": {"d_trunc": config.d_trunc},
        "chopgrad_release": {"d_trunc": config.d_trunc, "release_every": config.release_every},
        "chopgrad_recompute": {"d_trunc": config.d_trunc, "recompute": True},
    }[config.mode]
    return {**mode, "tiles": tuple(config.tiles)}


def build_decoder(name: str, device: str, dtype: torch.dtype):
    """A random-weight diffusers VAE of the named architecture, or a local diffusers folder, wrapped."""
    from diffusers import AutoencoderKLCogVideoX, AutoencoderKLWan

    torch.manual_seed(0)
    if Path(name).is_dir():
        config = Path(name) / "config.json"
        if not config.is_file():
            raise ValueError(f"{name} is not a diffusers model folder: {config} is missing")
        cls_name = json.loads(config.read_text()).get("_class_name")
        cls = {"AutoencoderKLWan": AutoencoderKLWan, "AutoencoderKLCogVideoX": AutoencoderKLCogVideoX}.get(cls_name)
        if cls is None:
            raise ValueError(f"{config} declares {cls_name!r}; chopgrad supports AutoencoderKLWan and AutoencoderKLCogVideoX")
        vae = cls.from_pretrained(name, local_files_only=True)
    elif name == "wan-tiny":
        vae = AutoencoderKLWan(base_dim=8, z_dim=16)
    elif name == "cogvideox-tiny":
        vae = AutoencoderKLCogVideoX(
            block_out_channels=(8, 8, 8, 8), latent_channels=4, layers_per_block=1, norm_num_groups=2
        )
    elif name == "wan2.1":
        vae = AutoencoderKLWan()  # diffusers' defaults are the Wan 2.1 VAE architecture
    else:
        raise ValueError(f"unknown decoder {name!r}: choose one of {', '.join(DECODERS)} or a local diffusers VAE folder")
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return chopgrad.wrap_decoder(vae)


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not found in /proc/self/status (the CPU memory benchmark needs Linux)")


def measure(config: Config, warmup: bool = False) -> dict:
    """Run one configuration in this process and return its result row.

    With ``warmup`` one untimed call runs first, so that the timed call reuses allocated memory
    (steady state, as in a training loop); without it the peak memory of a first call is exact.
    """
    device, dtype = torch.device(config.device), getattr(torch, config.dtype)
    decoder = build_decoder(config.decoder, config.device, dtype)
    scale = decoder.spatial_scale
    if config.height % scale or config.width % scale:
        raise ValueError(f"height and width must be multiples of {scale} for {config.decoder}")
    latent_frames = chopgrad.num_latent_frames(decoder, config.frames)
    generator = torch.Generator().manual_seed(0)
    shape = (1, decoder.latent_channels, latent_frames, config.height // scale, config.width // scale)
    latents = torch.randn(shape, generator=generator).to(device, dtype).requires_grad_(True)
    target = (torch.rand(1, 3, config.frames, config.height, config.width, generator=generator) * 2 - 1).to(
        device, dtype
    )
    kwargs = decode_kwargs(config)

    def mse(pred, tgt):
        return torch.nn.functional.mse_loss(pred.float(), tgt.float())

    if warmup:
        chopgrad.decode_loss(decoder, latents, target, mse, **kwargs).backward()
        latents.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # reset the peak resident set size (VmHWM)
        before = _rss_bytes("VmRSS")
    start = time.perf_counter()
    chopgrad.decode_loss(decoder, latents, target, mse, **kwargs).backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else _rss_bytes("VmHWM") - before
    row = asdict(config)
    del row["dtype"], row["release_every"]
    row.update(peak_bytes=int(peak), seconds=round(seconds, 4), device=device_name(device), dtype=config.dtype,
               release_every=config.release_every)
    return row


def tiling_error(decoder, latent_frames: int, height: int, width: int, tiles: tuple[int, int], halos: list[int]) -> list[dict]:
    """How far the tiled forward is from the untiled one, for each halo (latent pixels).

    Returns rows ``{"tiles", "halo", "max_abs", "rms", "psnr_db"}`` comparing ``decode`` with
    ``tiles`` against ``decode`` without, on seeded random latents, in the decoder's [-1, 1] range.
    """
    scale = decoder.spatial_scale
    generator = torch.Generator().manual_seed(0)
    shape = (1, decoder.latent_channels, latent_frames, height // scale, width // scale)
    param = next(iter(decoder.parameters()))
    latents = torch.randn(shape, generator=generator).to(param.device, param.dtype)
    rows = []
    with torch.no_grad():
        reference = chopgrad.decode(decoder, latents)
        for halo in halos:
            diff = (chopgrad.decode(decoder, latents, tiles=tiles, halo=halo) - reference).float()
            rms = float(diff.pow(2).mean().sqrt())
            psnr = float("inf") if rms == 0 else 20 * torch.log10(torch.tensor(2.0 / rms)).item()
            rows.append({"tiles": list(tiles), "halo": halo, "max_abs": float(diff.abs().max()), "rms": rms, "psnr_db": psnr})
    return rows


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's cores and torch threads: the ``device`` of every result row."""
    if device.type == "cuda":
        return torch.cuda.getdevice_name(device)
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _measure_in_fresh_process(config: Config, threads: int | None = None, timed: bool = True) -> dict:
    """Peak memory from one process, time from another (``timed=False``: memory only, ``seconds`` None).

    Memory: glibc keeps freed blocks in its heap, so resident memory would remember released step
    graphs; with every block over 64 KiB served by mmap, freed memory leaves the resident set.
    That makes each allocation fault in fresh pages, so time comes from a second process with the
    default allocator, timing the call after one warm-up call.
    """

    def child(env: dict, warmup: bool) -> dict:
        argv = [sys.executable, "-m", "chopgrad.bench", "--one", json.dumps(asdict(config))]
        out = subprocess.run(argv + ["--warmup"] * warmup, capture_output=True, text=True, env=env)
        if out.returncode:  # the child's own message, not a CalledProcessError around it
            last = (out.stderr.strip().splitlines() or [f"exit code {out.returncode}"])[-1]
            raise RuntimeError(f"measuring {_label(asdict(config))} at {config.frames} frames failed: {last}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    base = dict(os.environ) | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
    row = child(base | {"MALLOC_MMAP_THRESHOLD_": "65536"}, warmup=False)
    row["seconds"] = child(base, warmup=True)["seconds"] if timed else None
    return row


def run(configs: list[Config], fresh_process: bool = True, threads: int | None = None, progress=print,
        timed: bool = True, keep_going: bool = False, on_row=None) -> list[dict]:
    """Measure each configuration; ``timed=False`` skips the CPU timing process (``seconds`` None).

    With ``keep_going`` a failed measurement (out of memory, say: a result worth recording) becomes a
    row with ``error`` and no ``peak_bytes`` or ``seconds``, and the next one runs. ``on_row(rows)``
    is called with the rows so far after each measurement (to save them as they come).
    """
    rows = []
    for index, config in enumerate(configs, 1):
        try:
            row = _measure_in_fresh_process(config, threads, timed) if fresh_process else measure(config, warmup=True)
        except RuntimeError as error:  # torch.OutOfMemoryError too
            if not keep_going:
                raise
            row = _failed_row(config, error)
        if row.get("error"):  # out of the except block: the failed call's tensors can be freed now
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        seconds = "       - s" if row["seconds"] is None else f"{row['seconds']:8.3f} s"
        peak = row.get("error") or f"peak {row['peak_bytes'] / 2**20:9.1f} MiB  {seconds}"
        progress(
            f"[{index}/{len(configs)}] {row['mode']:18s} d_trunc={row['d_trunc']!s:4s} "
            f"release_every={row['release_every']!s:4s} frames={row['frames']:4d}  {peak}"
        )
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    return rows


def _failed_row(config: Config, error: Exception) -> dict:
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    device = device_name(torch.device(config.device))
    return {**asdict(config), "peak_bytes": None, "seconds": None, "device": device,
            "error": f"{type(error).__name__}: {message}"[:200]}


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| decoder | mode | d_trunc | frames | HxW | peak MiB | seconds | device | release_every |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = "-" if r["d_trunc"] is None else r["d_trunc"]
        s = "-" if r.get("release_every") is None else r["release_every"]
        lines.append(
            f"| {r['decoder']} | {r['mode']} | {d} | {r['frames']} | {r['height']}x{r['width']}{_tiled(r)} | "
            f"{r.get('error') or format(r['peak_bytes'] / 2**20, '.1f')} | "
            f"{'-' if r['seconds'] is None else format(r['seconds'], '.3f')} | {r['device']} | {s} |"
        )
    return "\n".join(lines)


def _tiled(row: dict) -> str:
    tiles = tuple(row.get("tiles") or (1, 1))
    return "" if tiles == (1, 1) else f" ({tiles[0]}x{tiles[1]} tiles)"


def plot(rows: list[dict], path: Path) -> None:
    """Memory and time against frames; with a single frame count, against ``d_trunc`` (the paper's
    figure 13), the modes without truncation drawn as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if not r.get("error")]  # a failed measurement has no point to draw
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(10, 4))
    by_d_trunc = len({r["frames"] for r in rows}) == 1
    series_of = (lambda r: _label(r).split(" d_trunc=")[0] + _blocks(r)) if by_d_trunc else _label
    x_of = (lambda r: r["d_trunc"]) if by_d_trunc else (lambda r: r["frames"])
    for label in sorted({series_of(r) for r in rows}):
        series = [r for r in rows if series_of(r) == label]
        for ax, value in ((mem_ax, lambda r: r["peak_bytes"] / 2**20), (time_ax, lambda r: r["seconds"])):
            if by_d_trunc and series[0]["d_trunc"] is None:  # full / exact: one value, a reference line
                ax.axhline(value(series[0]), linestyle="--", color="gray" if label == "exact" else "black",
                           label=label)
            else:
                series.sort(key=x_of)
                ax.plot([x_of(r) for r in series], [value(r) for r in series], marker="o", label=label)
    first = rows[0]
    for ax, ylabel in ((mem_ax, "peak working memory (MiB)"), (time_ax, "seconds, decode_loss + backward")):
        ax.set_xlabel("d_trunc" if by_d_trunc else "frames")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    mem_ax.legend(fontsize=7)
    frames = f", {first['frames']} frames" if by_d_trunc else ""
    fig.suptitle(f"{first['decoder']} {first['height']}x{first['width']}{frames} on {first['device']}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _blocks(row: dict) -> str:
    return f" release_every={row['release_every']}" if row["mode"] == "chopgrad_release" else ""


def _label(row: dict) -> str:
    if row["d_trunc"] is None:
        return row["mode"]
    return f"{row['mode']} d_trunc={row['d_trunc']}{_blocks(row)}"


def _decoder_name(text: str) -> str:
    if text in DECODERS or Path(text).is_dir():
        return text
    raise argparse.ArgumentTypeError(f"invalid choice {text!r}: one of {', '.join(DECODERS)} or a local diffusers VAE folder")


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _configs(args: argparse.Namespace, modes: list[str]) -> list[Config]:
    return [
        Config(args.decoder, mode, d, frames, args.height, args.width, args.device, args.dtype, s,
               tuple(args.tiles or (1, 1)))
        for mode in modes
        for d in (args.d_trunc if mode.startswith("chopgrad") else [None])
        for s in (args.release_every if mode == "chopgrad_release" else [None if d is None else 1])
        for frames in args.frames
    ]


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chopgrad.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", type=_decoder_name, default="wan-tiny", help=f"one of {', '.join(DECODERS)} or a local diffusers VAE folder")
    parser.add_argument("--frames", type=_ints, default=[17, 33, 65], help="pixel frame counts, e.g. 17,33,65")
    parser.add_argument("--d-trunc", type=_ints, default=[0, 1, 2], help="truncation distances for the chopgrad modes")
    parser.add_argument("--release-every", type=_ints, default=[2], help="steps per block for chopgrad_release, e.g. 2,4")
    parser.add_argument("--modes", default="full,exact,chopgrad", help=f"any of {','.join(MODES)}")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--threads", type=int, help="CPU threads per measurement (default: torch's); 1 is steadiest")
    parser.add_argument("--no-time", action="store_true",
                        help="memory only: on CPU one process per configuration instead of two, seconds left "
                             "empty (on CUDA both come from one process anyway)")
    parser.add_argument("--json", type=Path, help="write the result rows here")
    parser.add_argument("--plot", type=Path, help="write a PNG of memory and time vs frames here")
    parser.add_argument("--tiling-halos", type=_ints, help="instead: report the tiled-forward error for these halos")
    parser.add_argument("--tiles", type=_ints, help="tile rows,cols of the measurements (default 1,1) or of "
                        "--tiling-halos (default 2,2)")
    parser.add_argument("--keep-going", action="store_true",
                        help="record a failed measurement (out of memory, say) as a row with its error and go on")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one configuration, in this process
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(Config(**json.loads(args.one)), warmup=args.warmup)))
        return

    if args.tiles is not None and (len(args.tiles) != 2 or min(args.tiles) < 1):
        parser.error(f"--tiles must be two positive integers rows,cols, got {args.tiles}")

    if args.tiling_halos is not None:
        decoder = build_decoder(args.decoder, args.device, getattr(torch, args.dtype))
        latent_frames = chopgrad.num_latent_frames(decoder, args.frames[0])
        rows = tiling_error(decoder, latent_frames, args.height, args.width, tuple(args.tiles or (2, 2)),
                            args.tiling_halos)
        print("| tiles | halo (latent px) | max abs | RMS | PSNR dB |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['tiles'][0]}x{r['tiles'][1]} | {r['halo']} | {r['max_abs']:.2e} | {r['rms']:.2e} | {r['psnr_db']:.1f} |")
        if args.json:
            _write_rows(args.json, rows)
        return

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}: choose from {', '.join(MODES)}")
    if any(d < 0 for d in args.d_trunc):
        parser.error("--d-trunc values must be >= 0")
    if args.no_time and args.plot and args.device == "cpu":
        parser.error("--plot draws time beside memory: leave out --no-time")
    if any(s < 1 for s in args.release_every):
        parser.error("--release-every values must be >= 1 (decode steps per block)")
    decoder = build_decoder(args.decoder, "cpu", torch.float32)
    for frames in args.frames:  # fail before any measurement on a frame count the decoder cannot make
        try:
            chopgrad.num_latent_frames(decoder, frames)
        except ValueError as error:
            parser.error(f"--frames {frames}: {error}")
    try:
        rows = run(_configs(args, modes), fresh_process=args.device == "cpu", threads=args.threads,  # CUDA: in process
                   timed=not args.no_time, keep_going=args.keep_going,
                   on_row=(lambda done: _write_rows(args.json, done)) if args.json else None)
    except RuntimeError as error:  # a measurement's own error, one line
        parser.exit(1, f"python -m chopgrad.bench: {error}\n")
    print(markdown_table(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()

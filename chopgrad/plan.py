"""Memory planner: the peak working memory of ``decode_loss(...).backward()`` before you launch it.

    python -m chopgrad.plan --decoder wan2.1 --frames 81 --height 480 --width 832 \\
        --d-trunc 1 --tiles 2,2 --dtype bfloat16 --budget-gib 80
    python -m chopgrad.plan --decoder wan-tiny --frames 17 --height 256 --width 256 --measure  # check it

The planner measures the decoder architecture itself (random weights: memory does not depend on
their values) at a few small sizes, with the benchmark's own measurement (:func:`chopgrad.bench.run`:
CUDA's peak allocation on a GPU, the peak resident set of a fresh process on CPU), fits a model,
and scales it to the requested shape. The model follows from how the engine works:

* tiles are decoded one after another, each from its own cache, so only one tile's decode is
  alive at a time: memory grows with the area ``A`` of one tile, halo included (output pixels);
* a step's activations grow linearly with ``A``; the engine holds ``g`` of them at once, where
  ``g`` depends on the mode: ``d_trunc + release_every`` step graphs (ChopGrad, supplement D's
  blocks), ``d_trunc + release_every + 1`` caches (``recompute=True``: one step's graph besides),
  or every step (full backpropagation, and the caches of the exact recompute mode);

so ``peak = c0 + A * (c1 * g + c2)``, with ``c0`` the fixed part, ``c1`` the bytes per pixel of one
held unit, ``c2`` those of one step's transient tensors. The three constants are fitted by least
squares per (architecture, mode, dtype, device) from measurements at two areas and three values of
``g``. ``docs/benchmark.md`` compares its predictions with measured peaks.

.. warning::
    The fit is linear in the area. Allocator effects (cuDNN workspaces, fragmentation) and a
    decoder whose activations do not scale with the area break that; calibrate on the device and
    dtype you will run on, and leave headroom.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["Fit", "Shape", "calibrate", "fit", "held_units", "main", "predict"]

GIB = 2**30
CALIBRATION_AREAS = ((32, 32), (64, 64))  # output pixels; small enough for a CPU in seconds


@dataclass(frozen=True)
class Shape:
    """What ``decode_loss`` is asked to do: its video, tiles and mode."""

    frames: int
    height: int
    width: int
    mode: str = "chopgrad"  # chopgrad | chopgrad_release | chopgrad_recompute | full | exact
    d_trunc: int | None = 1
    release_every: int = 1
    tiles: tuple[int, int] = (1, 1)
    halo: int = 2


@dataclass(frozen=True)
class Fit:
    """``peak = c0 + area * (c1 * held + c2)`` bytes, and where the constants come from."""

    decoder: str
    mode: str
    dtype: str
    device: str
    c0: float
    c1: float
    c2: float
    points: tuple[dict, ...]  # the measurements: area, held units, peak_bytes

    def peak_bytes(self, area: float, held: float) -> float:
        return self.c0 + area * (self.c1 * held + self.c2)


def steps_of(decoder, frames: int) -> int:
    """Decode steps of ``decoder`` for a video of ``frames`` pixel frames."""
    import chopgrad

    return len(decoder.step_sizes(chopgrad.num_latent_frames(decoder, frames)))


def held_units(shape: Shape, steps: int) -> int:
    """``g``: how many step graphs (caches, for the recompute modes) the engine holds at its peak."""
    window = (shape.d_trunc or 0) + shape.release_every
    held = {"chopgrad": (shape.d_trunc or 0) + 1, "chopgrad_release": window,
            "chopgrad_recompute": window + 1, "full": steps, "exact": steps}[shape.mode]
    return min(held, steps + 1)


def tile_area(shape: Shape, spatial_scale: int) -> int:
    """Output pixels of the largest tile, halo included (the whole frame without tiles)."""
    rows, cols = shape.tiles
    latent_h, latent_w = shape.height // spatial_scale, shape.width // spatial_scale
    extent = lambda size, count: min(size, math.ceil(size / count) + (2 * shape.halo if count > 1 else 0))
    return extent(latent_h, rows) * extent(latent_w, cols) * spatial_scale**2


def fit(points: list[dict]) -> tuple[float, float, float]:
    """Least-squares ``(c0, c1, c2)`` from points ``{"area", "held", "peak_bytes"}``."""
    features = torch.tensor([[1.0, p["area"] * p["held"], p["area"]] for p in points], dtype=torch.float64)
    peaks = torch.tensor([[float(p["peak_bytes"])] for p in points], dtype=torch.float64)
    solution = torch.linalg.lstsq(features, peaks).solution[:, 0]
    return tuple(float(v) for v in solution)


def calibration_shapes(mode: str, release_every: int) -> list[Shape]:
    """Two areas x three values of ``g``: frames for the full modes, ``d_trunc`` for the others."""
    shapes = []
    for height, width in CALIBRATION_AREAS:
        if mode in ("full", "exact"):
            shapes += [Shape(frames, height, width, mode, None) for frames in (9, 13, 17)]
        else:  # 17 frames: 5 Wan steps, 3 CogVideoX steps; enough for the largest window below
            shapes += [Shape(17, height, width, mode, d_trunc, release_every) for d_trunc in (0, 1, 2)]
    return shapes


def calibrate(decoder_name: str, mode: str, dtype: str = "float32", device: str = "cpu",
              release_every: int = 1, progress=print) -> Fit:
    """Measure ``decoder_name`` at :func:`calibration_shapes` (fresh processes) and fit the model."""
    from chopgrad import bench

    decoder = bench.build_decoder(decoder_name, "cpu", torch.float32)
    shapes = calibration_shapes(mode, release_every)
    configs = [bench.Config(decoder_name, s.mode, s.d_trunc, s.frames, s.height, s.width, device, dtype,
                            s.release_every if mode == "chopgrad_release" else None) for s in shapes]
    rows = bench.run(configs, fresh_process=device == "cpu", threads=1, progress=progress, timed=False)
    points = tuple({"area": s.height * s.width, "held": held_units(s, steps_of(decoder, s.frames)),
                    "peak_bytes": row["peak_bytes"]} for s, row in zip(shapes, rows, strict=True))
    return Fit(decoder_name, mode, dtype, device, *fit(list(points)), points=points)


def predict(calibration: Fit, shape: Shape, decoder=None) -> dict:
    """The predicted peak of ``shape`` from a calibration of the same decoder architecture and mode."""
    if shape.mode != calibration.mode:
        raise ValueError(f"the calibration is of mode {calibration.mode!r}, the shape asks for {shape.mode!r}: "
                         "calibrate that mode")
    if decoder is None:
        from chopgrad import bench

        decoder = bench.build_decoder(calibration.decoder, "cpu", torch.float32)
    scale = decoder.spatial_scale
    if shape.height % scale or shape.width % scale:
        raise ValueError(f"height and width must be multiples of {scale} for {calibration.decoder}")
    steps = steps_of(decoder, shape.frames)
    area, held = tile_area(shape, scale), held_units(shape, steps)
    return {**asdict(shape), "tiles": list(shape.tiles), "decoder": calibration.decoder, "dtype": calibration.dtype,
            "device": calibration.device, "steps": steps, "tile_area": area, "held": held,
            "peak_bytes": int(calibration.peak_bytes(area, held))}


def _pair(text: str) -> tuple[int, int]:
    values = [int(v) for v in text.split(",")]
    if len(values) != 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected two positive integers 'rows,cols', got {text!r}")
    return values[0], values[1]


def main(argv: list[str] | None = None) -> None:
    from chopgrad import bench

    parser = argparse.ArgumentParser(prog="python -m chopgrad.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--decoder", default="wan2.1", help=f"one of {', '.join(bench.DECODERS)} or a VAE folder")
    parser.add_argument("--frames", type=int, required=True, help="pixel frames of the video")
    parser.add_argument("--height", type=int, required=True)
    parser.add_argument("--width", type=int, required=True)
    parser.add_argument("--mode", default="chopgrad", choices=bench.MODES)
    parser.add_argument("--d-trunc", type=int, default=1)
    parser.add_argument("--release-every", type=int, default=1)
    parser.add_argument("--tiles", type=_pair, default=(1, 1), help="rows,cols")
    parser.add_argument("--halo", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where to calibrate (the device you will train on)")
    parser.add_argument("--calibration", type=Path, help="a calibration JSON to reuse (written when missing)")
    parser.add_argument("--budget-gib", type=float, help="say whether the prediction fits this much memory")
    parser.add_argument("--measure", action="store_true",
                        help="also run the shape with the benchmark's measurement and print the prediction's error")
    args = parser.parse_args(argv)
    if args.measure and args.tiles != (1, 1) and args.halo != 2:
        parser.error("--measure runs chopgrad.bench, whose tiles have decode_loss's default halo of 2: leave out "
                     "--halo or --measure")
    if args.d_trunc < 0 or args.release_every < 1 or args.halo < 0:
        parser.error("--d-trunc and --halo must be >= 0 and --release-every >= 1")
    d_trunc = None if args.mode in ("full", "exact") else args.d_trunc
    shape = Shape(args.frames, args.height, args.width, args.mode, d_trunc, args.release_every, args.tiles, args.halo)
    decoder = bench.build_decoder(args.decoder, "cpu", torch.float32)
    try:
        steps_of(decoder, args.frames)
    except ValueError as error:
        parser.error(f"--frames {args.frames}: {error}")
    calibration = _load_or_calibrate(args)
    result = predict(calibration, shape, decoder)
    print(f"{args.decoder} {args.mode} d_trunc={d_trunc} release_every={args.release_every} tiles={args.tiles} "
          f"{args.frames}x{args.height}x{args.width} {args.dtype} on {args.device}: "
          f"predicted peak {result['peak_bytes'] / GIB:.2f} GiB ({result['held']} held, tile area {result['tile_area']})")
    if args.budget_gib is not None:
        fits = result["peak_bytes"] <= args.budget_gib * GIB
        print(f"{'fits' if fits else 'does NOT fit'} a budget of {args.budget_gib:g} GiB")
    if args.measure:
        release = args.release_every if args.mode == "chopgrad_release" else None
        config = bench.Config(args.decoder, args.mode, d_trunc, args.frames, args.height, args.width, args.device,
                              args.dtype, release, tuple(args.tiles))
        (row,) = bench.run([config], fresh_process=args.device == "cpu", threads=1, progress=lambda _: None,
                           timed=False)
        print(f"measured peak {row['peak_bytes'] / GIB:.3f} GiB; prediction error "
              f"{result['peak_bytes'] / row['peak_bytes'] - 1:+.1%}")


def _load_or_calibrate(args: argparse.Namespace) -> Fit:
    wanted = {"decoder": args.decoder, "mode": args.mode, "dtype": args.dtype, "device": args.device}
    if args.calibration is not None and args.calibration.is_file():
        data = json.loads(args.calibration.read_text())
        if {k: data.get(k) for k in wanted} != wanted:
            raise SystemExit(f"{args.calibration} calibrates {[data.get(k) for k in wanted]}, not {list(wanted.values())}:"
                             " pass another --calibration path or remove the file")
        return Fit(**{**data, "points": tuple(data["points"])})
    calibration = calibrate(args.decoder, args.mode, args.dtype, args.device, args.release_every)
    if args.calibration is not None:
        args.calibration.parent.mkdir(parents=True, exist_ok=True)
        args.calibration.write_text(json.dumps(asdict(calibration), indent=2) + "\n")
    return calibration


if __name__ == "__main__":
    main()

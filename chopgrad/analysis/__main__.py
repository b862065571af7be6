"""Run ChopGrad's analyses on your own decoder (paper section 3.3, figures 3 to 7).

    python -m chopgrad.analysis locality   --vae PATH_OR_NAME [--video CLIP] --max-distance 4 --eps 1e-3
    python -m chopgrad.analysis grad-error --vae PATH_OR_NAME --d-trunc 0,1,2,3 --loss mse,lpips
    python -m chopgrad.analysis backbone   --vae PATH_OR_NAME [--transformer-path PATH] --d-trunc 0,1,2
    python -m chopgrad.analysis resources  --vae PATH_OR_NAME --d-trunc 0,1,2 --lengths 9,17,33
    python -m chopgrad.analysis spatial    --vae PATH_OR_NAME [--boundary ROW]

``--vae`` is a local diffusers folder (``AutoencoderKLWan`` or ``AutoencoderKLCogVideoX``, read from
its ``config.json``) or a built-in random-weight architecture (``wan-tiny``, ``cogvideox-tiny``,
``wan2.1``). The clips are ``--video`` (a video file, a folder of frames, or a folder of videos),
encoded by the VAE, cropped to ``--frames`` frames and to multiples of the VAE's spatial factor; without
``--video``, ``--videos`` random latent clips of ``--frames`` x ``--height`` x ``--width`` pixels
(standard normal in the VAE's normalized latent space), with targets decoded from a second random
draw. Each command writes ``OUT/<command>.json`` and ``OUT/<command>.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import chopgrad
from chopgrad.analysis import models, plots
from chopgrad.analysis.gradients import decoder_gradient_error, parameter_gradient_agreement
from chopgrad.analysis.report import json_safe, locality_report
from chopgrad.analysis.resources import measure_resources
from chopgrad.analysis.spatial import spatial_locality

COMMANDS = ("locality", "grad-error", "backbone", "resources", "spatial")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def _checked(convert, ok, expected: str):
    """An argparse type: ``convert`` the text, then refuse values that are not ``ok``, naming ``expected``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_unit_interval = _checked(float, lambda v: 0 < v < 1, "a relative tolerance in (0, 1) (e.g. 1e-3)")
_positive = _checked(int, lambda v: v >= 1, "a positive integer")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m chopgrad.analysis", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--vae", required=True, help=f"local diffusers VAE folder or one of {', '.join(models.BUILTIN_VAES)}")
    common.add_argument("--video", type=Path, help="video file, frame folder or folder of videos (default: random latents)")
    common.add_argument("--frames", type=_positive, default=17, help="pixel frames per clip (Wan: 1 + 4k)")
    common.add_argument("--height", type=_positive, default=64, help="pixel height of random clips")
    common.add_argument("--width", type=_positive, default=64, help="pixel width of random clips")
    common.add_argument("--videos", type=_positive, default=2, help="random clips (without --video)")
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--threads", type=_positive, help="torch CPU threads")
    common.add_argument("--out", type=Path, default=Path("analysis"), help="folder for <command>.json and .png")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("locality", parents=[common], help="temporal locality L(i <- j), fit, recommended d_trunc (fig. 3)")
    p.add_argument("--max-distance", type=int, default=3, help="largest step distance i - j (< decode steps)")
    p.add_argument("--probes", type=_positive, default=4, help="Gaussian probes per output step")
    p.add_argument("--eps", type=_unit_interval, default=1e-3, help="relative tolerance, in (0, 1), of L at distance 0")
    p.add_argument("--fit", default="loglinear", choices=["loglinear", "curve_fit"])
    p.add_argument("--fit-from", default="peak", choices=["peak", "zero"],
                   help="fit the means from the distance where they peak (default) or from 0")

    for name, text in (("grad-error", "truncated vs exact latent gradients (fig. 5)"),
                       ("backbone", "truncated vs exact backbone parameter gradients (fig. 4)")):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--d-trunc", type=_ints, default=[0, 1, 2, 3], help="truncation distances, e.g. 0,1,2")
        p.add_argument("--loss", default="mse" if name == "backbone" else "mse,lpips", help="mse and/or lpips")
        p.add_argument("--lpips-net", default="vgg", choices=["vgg", "alex"])
        p.add_argument("--weights", default="official", choices=["official", "stand_in"],
                       help="LPIPS backbone weights: the real files, or random stand-ins where they are missing "
                            "(marked in the JSON)")
    p.add_argument("--transformer-path", type=Path,
                   help="a Wan 2.1 diffusers folder, or its transformer/ (default: a small random transformer)")
    p.add_argument("--sigma", type=float, default=0.5, help="noise level of the backbone's input, in (0, 1]")

    p = sub.add_parser("resources", parents=[common], help="time and memory vs d_trunc and video length (figs. 6, 13)")
    p.add_argument("--d-trunc", type=_ints, default=[0, 1, 2, 3])
    p.add_argument("--lengths", type=_ints, default=[9, 17, 33], help="pixel frame counts for the length sweep")
    p.add_argument("--repeats", type=_positive, default=1, help="timed runs per configuration (median)")

    p = sub.add_parser("spatial", parents=[common], help="zero the bottom latents, see how far up pixels change (fig. 7)")
    p.add_argument("--boundary", type=int, help="first zeroed latent row (default: half the latent height)")
    p.add_argument("--threshold", type=float, default=2 / 255, help="a change above this counts (decoder range [-1, 1])")
    return parser


# ----------------------------------------------------------------------------- clips


def _crop(videos: torch.Tensor, factor: int) -> torch.Tensor:  # [B, 3, T, H, W] -> H, W multiples of factor
    height, width = videos.shape[-2] // factor * factor, videos.shape[-1] // factor * factor
    if height == 0 or width == 0:
        raise ValueError(f"the video ({videos.shape[-2]}x{videos.shape[-1]}) is smaller than the VAE's "
                         f"spatial factor {factor}")
    top, left = (videos.shape[-2] - height) // 2, (videos.shape[-1] - width) // 2
    return videos[..., top:top + height, left:left + width]


def clips(args, vae, decoder, multiple: int = 1, targets: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(latents [V, C, t, h, w], targets [V, 3, T, H, W] in [-1, 1])`` from ``--video`` or random
    (random targets only when ``targets``)."""
    factor = decoder.spatial_scale * multiple
    latent_frames = chopgrad.num_latent_frames(decoder, args.frames)  # clear error for e.g. 16 frames on Wan
    param = next(vae.parameters())
    if args.video is not None:
        from chopgrad.metrics.__main__ import load_videos

        videos, _ = load_videos(args.video)  # [B, 3, T, H, W] uint8
        if videos.shape[2] < args.frames:
            raise ValueError(f"{args.video} has {videos.shape[2]} frames, fewer than --frames {args.frames}")
        videos = _crop(videos[:, :, :args.frames], factor).to(param.device).double() / 127.5 - 1
        videos = videos.to(param.dtype)
        return models.encode_videos(vae, videos), videos
    if args.height % factor or args.width % factor:
        raise ValueError(f"--height and --width must be multiples of {factor} for this VAE and command, "
                         f"got {args.height}x{args.width}")
    generator = torch.Generator().manual_seed(args.seed)
    shape = (args.videos, decoder.latent_channels, latent_frames, args.height // decoder.spatial_scale,
             args.width // decoder.spatial_scale)
    latents = models.random_latents(vae, shape, generator)
    if not targets:
        return latents, None
    with torch.no_grad():
        return latents, chopgrad.decode(decoder, models.random_latents(vae, shape, generator), clamp=True)


def _losses(args) -> dict:
    names = [name.strip() for name in args.loss.split(",") if name.strip()]
    unknown = sorted(set(names) - {"mse", "lpips"})
    if unknown or not names:
        raise ValueError(f"unknown loss(es) {unknown or names}: choose from mse, lpips")
    losses, info = {}, {}
    for name in names:
        if name == "mse":
            losses[name] = lambda pred, target: torch.nn.functional.mse_loss(pred, target)
        else:
            losses[name], info[name] = models.lpips_loss(args.lpips_net, args.weights, args.device)
    return {"fns": losses, "weights": info}


# ----------------------------------------------------------------------------- commands


def run(args) -> dict:
    dtype = getattr(torch, args.dtype)
    vae = models.load_vae(args.vae, dtype, args.device, seed=args.seed)
    decoder = chopgrad.wrap_decoder(vae)
    result: dict = {"command": args.command, "vae": str(args.vae), "dtype": args.dtype, "device": args.device,
                    "inputs": str(args.video) if args.video else "random latents"}
    png = args.out / f"{args.command}.png"
    title = f"{Path(str(args.vae)).name}: {args.command}"
    progress = not args.quiet
    if args.command == "locality":
        latents, _ = clips(args, vae, decoder, targets=False)
        locality, fit, summary = locality_report(decoder, latents, max_distance=args.max_distance, probes=args.probes,
                                                 rel_tol=args.eps, fit_method=args.fit, fit_from=args.fit_from,
                                                 seed=args.seed, progress=progress)
        result.update(summary=summary, samples=locality.to_dict()["samples"])
        plots.plot_locality(locality, fit, png, title, fit_start=summary["fit_distances"][0])
    elif args.command == "grad-error":
        losses = _losses(args)
        latents, targets = clips(args, vae, decoder)
        tables = {}
        for name, fn in losses["fns"].items():
            error = decoder_gradient_error(decoder, latents, targets, fn, args.d_trunc, progress=progress)
            tables[name] = error.table()
            result[name] = error.to_dict()
        result.update(tables=tables, loss_weights=losses["weights"])
        plots.plot_gradient_error(tables, png, title)
    elif args.command == "backbone":
        if "," in args.loss:
            raise ValueError(f"the backbone command takes one --loss (mse or lpips), got {args.loss!r}")
        losses = _losses(args)
        (name, fn), = losses["fns"].items()
        transformer = models.backbone_transformer(decoder.latent_channels, args.transformer_path, seed=args.seed)
        transformer = transformer.to(args.device, dtype).train(False)
        backbone = models.FlowBackbone(transformer, vae, sigma=args.sigma, seed=args.seed)
        patch = max(backbone.patch_size[1:])
        latents, targets = clips(args, vae, decoder, multiple=patch)
        agreement = parameter_gradient_agreement(
            decoder, lambda k: backbone(latents[k : k + 1], k), [targets[k : k + 1] for k in range(len(targets))],
            list(transformer.parameters()), fn, args.d_trunc, progress=progress)
        result.update(loss=name, loss_weights=losses["weights"],
                      backbone=str(args.transformer_path or "small random"),
                      **agreement.to_dict())
        plots.plot_backbone(agreement.table(), png, title)
    elif args.command == "resources":
        latents_per_length = [chopgrad.num_latent_frames(decoder, frames) for frames in args.lengths]
        if args.height % decoder.spatial_scale or args.width % decoder.spatial_scale:
            raise ValueError(f"--height and --width must be multiples of {decoder.spatial_scale}")
        size = (args.height // decoder.spatial_scale, args.width // decoder.spatial_scale)
        rows = measure_resources(decoder, size, args.d_trunc, latents_per_length, repeats=args.repeats,
                                 seed=args.seed, progress=progress)
        result.update(rows=rows, memory_measure="peak bytes saved for backward (SavedTensorMeter)")
        plots.plot_resources(rows, png, title)
    else:
        latents, _ = clips(args, vae, decoder, targets=False)
        boundary = latents.shape[-2] // 2 if args.boundary is None else args.boundary
        spatial = spatial_locality(decoder, latents, boundary, args.threshold)
        result.update(spatial.to_dict())
        plots.plot_spatial(spatial, png, title)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: say what and how to fix it, no traceback
        parser.exit(2, f"{parser.prog} {args.command}: error: {error}\n")
    result["seconds"] = round(time.perf_counter() - start, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.command}.json"
    path.write_text(json.dumps(json_safe(result), indent=2) + "\n")
    print(json.dumps(json_safe(result.get("summary") or result.get("tables") or result.get("table")
                               or {k: result[k] for k in ("reach_px", "reach_any_px") if k in result}
                               or result.get("rows")), indent=2))
    print(f"wrote {path} and {args.out / f'{args.command}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage ``analysis``: the paper's section 3.3 analysis (figures 3 to 7) on the pipeline's VAE.

Runs the five analyses of :mod:`chopgrad.analysis` on the VAE in ``data/vae`` with latents encoded
from clips of the held-out (test) scenes of ``data/scenes``:

1. temporal locality (figure 3): ``L(i <- j)`` by Gaussian probes, the fit ``C exp(-alpha D)`` with
   R^2 and 95% intervals, and the ``d_trunc`` the bound recommends for ``rel_tol`` (eps relative to
   the mean influence at distance 0);
2. decoder-input gradient error (figure 5) for MSE and LPIPS, truncated against exact;
3. backbone parameter gradients (figure 4): a small random ``WanTransformer3DModel`` (or Wan 2.1's,
   from ``transformer_path``) produces the latents from noised clip latents;
4. time and saved-tensor memory against ``d_trunc`` and video length (figures 6 and 13);
5. spatial locality (figure 7).

Outputs: ``metrics/analysis.json`` (the summary: alpha, C, R^2, intervals, recommended ``d_trunc``,
gradient-error, cosine-similarity and resource tables), one JSON per analysis with every sample in
``data/analysis/``, five PNG figures in ``plots/analysis/``. LPIPS runs on random stand-in weights
when the real VGG16 file is absent and ``weights`` is ``stand_in``; the JSON says so.

    python -m stages.analysis --params params.yaml --vae data/vae --scenes data/scenes \\
        --out data/analysis --metrics metrics/analysis.json --plots plots/analysis
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

import chopgrad  # before diffusers: the torchvision fix for CPU-only torch
from chopgrad import restoration
from stages.common import cli, video

log = logging.getLogger("stages.analysis")

STAGE = "analysis"
FIGURES = ("locality", "grad_error", "backbone", "resources", "spatial")
WEIGHTS = ("official", "stand_in")  # the LPIPS of the analysis: real files, or a marked random stand-in


@dataclass(frozen=True)
class Params:
    clips: int  # held-out clips (windows of the test scenes) the analyses average over
    locality_frames: int  # pixel frames per clip for the locality (1 + 4k): (frames - 1) / 4 + 1 decode steps
    frames: int  # the first 1 + 4k of those frames: gradient error, backbone, resources (<= locality_frames)
    max_distance: int  # locality: largest step distance i - j measured (< locality decode steps)
    probes: int  # locality: Gaussian probes per output step; relative std of L^2 <= sqrt(2 / probes)
    fit_from: Literal["peak", "zero"]  # fit the mean influence from its peak (decaying tail) or from D = 0
    rel_tol: float  # tolerance for the recommended d_trunc, relative to the mean influence at D = 0
    d_trunc: tuple[int, ...]  # truncation distances compared with exact gradients and timed
    losses: tuple[Literal["mse", "lpips"], ...]  # pixel losses for the decoder-input gradient error
    lpips_net: Literal["vgg", "alex"]  # LPIPS backbone (the paper's LPIPS: vgg)
    lpips_frames: int  # LPIPS gradient error on the first 1 + 4k frames of each clip: VGG per frame is costly
    weights: Literal["official", "stand_in"]  # LPIPS backbone: the real file, or a random stand-in if missing
    transformer_path: str | None  # a Wan 2.1 diffusers folder (transformer/ inside); null: a small random one
    backbone_layers: int  # transformer blocks of the small random backbone
    backbone_sigma: float  # flow-matching noise level of the backbone's input, in (0, 1]
    resource_frames: tuple[int, ...]  # video lengths (pixel frames, 1 + 4k) for time and memory
    resource_length_d_trunc: tuple[int, ...]  # d_trunc values swept over the lengths (and full backprop)
    resource_repeats: int  # timed runs per configuration, median reported
    spatial_boundary: float  # fraction of latent rows kept; the rows below are zeroed
    spatial_threshold: float  # pixel change (decoder range [-1, 1]) that counts as "changed"; 2/255 = one 8-bit level
    seed: int  # probes, backbone init and inputs
    threads: int  # torch CPU threads, 0 = torch's default

    def __post_init__(self):
        lengths = {"locality_frames": self.locality_frames, "frames": self.frames, "lpips_frames": self.lpips_frames,
                   **{f"resource_frames[{i}]": value for i, value in enumerate(self.resource_frames)}}
        for key, value in lengths.items():
            if value < 1 or (value - 1) % 4:
                raise ValueError(f"analysis.{key} must be 1 + 4k (5, 9, 17, 33, ...), got {value}")
        if not self.lpips_frames <= self.frames <= self.locality_frames:
            raise ValueError(f"analysis.lpips_frames <= frames <= locality_frames must hold (each clip's first "
                             f"frames are reused), got {self.lpips_frames}, {self.frames}, {self.locality_frames}")
        if min(self.clips, self.probes, self.backbone_layers, self.resource_repeats) < 1:
            raise ValueError("analysis.clips, probes, backbone_layers and resource_repeats must be >= 1")
        steps = (self.locality_frames - 1) // 4 + 1
        if not 2 <= self.max_distance < steps:
            raise ValueError(f"analysis.max_distance must be in [2, {steps - 1}]: a fit needs 3 distances and "
                             f"{self.locality_frames} frames decode in {steps} steps; got {self.max_distance}")
        if not 0 < self.rel_tol < 1:
            raise ValueError(f"analysis.rel_tol must be in (0, 1) (e.g. 1e-3), got {self.rel_tol}")
        if not self.d_trunc or min(self.d_trunc) < 0 or not self.resource_length_d_trunc \
                or min(self.resource_length_d_trunc) < 0:
            raise ValueError("analysis.d_trunc and analysis.resource_length_d_trunc must be non-empty lists of "
                             "integers >= 0")
        if not self.losses or len(set(self.losses)) != len(self.losses):
            raise ValueError(f"analysis.losses must list mse and/or lpips once each, got {list(self.losses)}")
        if not 0 < self.backbone_sigma <= 1:
            raise ValueError(f"analysis.backbone_sigma must be in (0, 1], got {self.backbone_sigma}")
        if not 0 < self.spatial_boundary < 1 or self.spatial_threshold < 0:
            raise ValueError("analysis.spatial_boundary must be in (0, 1) and analysis.spatial_threshold >= 0")
        if not self.resource_frames:
            raise ValueError("analysis.resource_frames must list at least one length")
        if self.threads < 0:
            raise ValueError(f"analysis.threads must be >= 0 (0: torch's default), got {self.threads}")
        if self.weights not in WEIGHTS:
            raise ValueError(f"analysis.weights must be one of {', '.join(WEIGHTS)}, got {self.weights!r}")
        if self.transformer_path is not None:
            try:
                restoration.check_transformer_folder(self.transformer_path)
            except ValueError as err:
                raise ValueError(f"analysis.transformer_path: {err}, or set it to null") from None


# ----------------------------------------------------------------------------------------------------------
# Inputs


def load_clips(scenes_dir: Path, count: int, frames: int, multiple: int) -> tuple[torch.Tensor, list[str]]:
    """``count`` clips of ``frames`` frames from the test scenes: [V, 3, T, H, W] in [-1, 1], and their names.

    Clip ``k`` is window ``k // n`` of test scene ``k % n`` (consecutive, non-overlapping windows),
    centre-cropped to multiples of ``multiple`` pixels.
    """
    from stages.common import scenes

    names = scenes.load_split(scenes_dir)["test"]
    if not names:
        raise ValueError(f"{scenes_dir / 'split.json'} lists no test scenes; the analysis stage needs one")
    loaded = {name: scenes.load_scene(scenes_dir / name, load_images=False) for name in names}
    clips, labels = [], []
    for k in range(count):
        name, window = names[k % len(names)], k // len(names)
        scene = loaded[name]
        start = window * frames
        if start + frames > scene.num_frames:
            raise ValueError(f"clip {k} needs frames {start}..{start + frames - 1} of {name}, which has "
                             f"{scene.num_frames}: lower analysis.clips or analysis.frames")
        images = scene.read_images(np.arange(start, start + frames))  # [T, H, W, 3] uint8
        height, width = images.shape[1] // multiple * multiple, images.shape[2] // multiple * multiple
        if height == 0 or width == 0:
            raise ValueError(f"{name} frames ({images.shape[1]}x{images.shape[2]}) are smaller than {multiple} px")
        top, left = (images.shape[1] - height) // 2, (images.shape[2] - width) // 2
        images = images[:, top:top + height, left:left + width]
        clips.append(torch.from_numpy(np.ascontiguousarray(images)).permute(3, 0, 1, 2).float() / 127.5 - 1)
        labels.append(f"{name}[{start}:{start + frames}]")
    return torch.stack(clips), labels


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(pred, target)


# ----------------------------------------------------------------------------------------------------------
# The stage


def _plot(params: Params, folder: Path, vae_name: str, lpips_info: dict | None, clips: int, reference_frames: int, *,
          locality, grad_tables: dict, agreement, resources: list, spatial) -> None:
    """The five figures (paper figures 3-7) into ``folder``."""
    from chopgrad.analysis import plots

    locality, fit, summary = locality
    stand_in = " (LPIPS: stand-in weights)" if lpips_info and lpips_info["stand_in_weights"] else ""
    plots.plot_locality(locality, fit, folder / "locality.png", f"{vae_name}: temporal locality over {clips} clips",
                        summary["fit_distances"][0])
    frames_of = {"mse": params.frames, "lpips": params.lpips_frames}
    plots.plot_gradient_error({f"{loss} ({frames_of[loss]} frames)": rows for loss, rows in grad_tables.items()},
                              folder / "grad_error.png", f"{vae_name}: latent gradient error vs d_trunc{stand_in}")
    plots.plot_backbone(agreement.table(), folder / "backbone.png",
                        f"{vae_name}: backbone parameter gradients ({agreement.parameters} parameters)")
    plots.plot_resources(resources, folder / "resources.png", f"{vae_name}: time and memory (CPU)",
                         reference_frames=reference_frames, time_key="cpu_seconds")
    plots.plot_spatial(spatial, folder / "spatial.png", f"{vae_name}: spatial locality")


def run(params: Params, vae_dir: str | Path, scenes_dir: str | Path, out_dir: str | Path,
        metrics_path: str | Path, plots_dir: str | Path, progress: bool = True) -> dict:
    """Run the five analyses; write raw results, the summary metrics and the figures atomically.

    Returns:
        ``{"metrics": {...}, "figures": [paths], "metrics_path": path}``.
    """
    from chopgrad import analysis
    from chopgrad.analysis import models

    vae_dir, scenes_dir, out_dir, metrics_path, plots_dir = map(Path, (vae_dir, scenes_dir, out_dir, metrics_path,
                                                                       plots_dir))
    for path in (out_dir, plots_dir):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"{path} exists and is not a folder; remove it or choose another path")
    if not (vae_dir / "config.json").is_file():
        raise ValueError(f"{vae_dir} holds no VAE (config.json missing): run the vae stage first")
    started = time.perf_counter()
    vae = models.load_vae(vae_dir)
    decoder = chopgrad.wrap_decoder(vae)
    transformer = models.backbone_transformer(decoder.latent_channels, params.transformer_path, params.seed,
                                              params.backbone_layers)
    backbone = models.FlowBackbone(transformer.eval(), vae, sigma=params.backbone_sigma, seed=params.seed)
    multiple = decoder.spatial_scale * max(backbone.patch_size[1:])
    videos, clip_names = load_clips(scenes_dir, params.clips, params.locality_frames, multiple)  # [V, 3, T, H, W]
    lpips_fn, lpips_info = None, None
    if "lpips" in params.losses:  # load (or fail on missing weights or small frames) before any long computation
        smallest = models.LPIPS_MIN_SIZE[params.lpips_net]
        if min(videos.shape[-2:]) < smallest:
            raise ValueError(f"LPIPS-{params.lpips_net} needs frames of at least {smallest} x {smallest} pixels; the "
                             f"clips are {videos.shape[-2]} x {videos.shape[-1]}: drop lpips from analysis.losses")
        lpips_fn, lpips_info = models.lpips_loss(params.lpips_net, params.weights)
    latents = models.encode_videos(vae, videos)  # [V, C, t, h, w]
    # The encoder is causal: the first 1 + 4k frames encode to the first k + 1 latent frames, so the
    # shorter clips of the other analyses are prefixes of these.
    t = chopgrad.num_latent_frames(decoder, params.frames)
    short_latents, short_videos = latents[:, :, :t], videos[:, :, :params.frames]
    seconds: dict[str, float] = {}
    raw: dict[str, dict] = {}

    tick = time.perf_counter()
    locality, fit, summary = analysis.locality_report(
        decoder, latents, max_distance=params.max_distance, probes=params.probes, rel_tol=params.rel_tol,
        fit_from=params.fit_from, seed=params.seed, progress=progress)
    raw["locality"] = {**summary, **locality.to_dict()}
    seconds["locality"] = time.perf_counter() - tick

    tick = time.perf_counter()
    grad_tables = {}
    for loss in params.losses:
        frames = params.frames if loss == "mse" else params.lpips_frames
        loss_t = chopgrad.num_latent_frames(decoder, frames)
        error = analysis.decoder_gradient_error(decoder, latents[:, :, :loss_t], videos[:, :, :frames],
                                                _mse if loss == "mse" else lpips_fn, params.d_trunc, progress=progress)
        grad_tables[loss] = error.table()
        raw[f"grad_error_{loss}"] = {"frames": frames, **error.to_dict()}
    seconds["grad_error"] = time.perf_counter() - tick

    tick = time.perf_counter()
    agreement = analysis.parameter_gradient_agreement(
        decoder, lambda k: backbone(short_latents[k:k + 1], k), [short_videos[k:k + 1] for k in range(len(videos))],
        list(transformer.parameters()), _mse, params.d_trunc, progress=progress)
    raw["backbone"] = {"backbone": params.transformer_path or "small random WanTransformer3DModel",
                       "parameters": agreement.parameters, **agreement.to_dict()}
    seconds["backbone"] = time.perf_counter() - tick

    tick = time.perf_counter()
    lengths = [chopgrad.num_latent_frames(decoder, frames) for frames in params.resource_frames]
    resources = analysis.measure_resources(
        decoder, tuple(latents.shape[-2:]), params.d_trunc, lengths,
        reference_frames=t, length_d_truncs=params.resource_length_d_trunc, repeats=params.resource_repeats, seed=params.seed,
        progress=progress)
    raw["resources"] = {"memory_measure": "peak bytes saved for backward (chopgrad.memory.SavedTensorMeter)",
                        "device": "cpu", "threads": torch.get_num_threads(), "rows": resources}
    seconds["resources"] = time.perf_counter() - tick

    tick = time.perf_counter()
    boundary = max(1, min(latents.shape[-2] - 1, round(params.spatial_boundary * latents.shape[-2])))
    spatial = analysis.spatial_locality(decoder, short_latents, boundary, params.spatial_threshold)
    raw["spatial"] = spatial.to_dict()
    seconds["spatial"] = time.perf_counter() - tick

    metrics = summarize(params, summary, grad_tables, lpips_info, agreement, resources, spatial, clip_names,
                        short_latents.shape, seconds, time.perf_counter() - started)
    with video.staged_outputs(out_dir, plots_dir) as (build, plots_build):
        for name, data in raw.items():
            video.write_json(build / f"{name}.json", analysis.json_safe(data))
        _plot(params, plots_build, f"VAE {vae_dir.name}", lpips_info, len(videos), t, locality=(locality, fit, summary),
              grad_tables=grad_tables, agreement=agreement, resources=resources, spatial=spatial)
    video.write_json(metrics_path, analysis.json_safe(metrics))
    log.info("analysis done in %.1f s: %s", time.perf_counter() - started,
             ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()))
    return {"metrics": metrics, "figures": [plots_dir / f"{name}.png" for name in FIGURES],
            "metrics_path": metrics_path}


def summarize(params, locality, grad_tables, lpips_info, agreement, resources, spatial, clip_names, shape,
              seconds, total) -> dict:
    """The metrics file: what the paper's claims are checked against (see docs/analysis.md)."""
    reference = [r for r in resources if r["mode"] == "chopgrad" and r["latent_frames"] == shape[2]]
    return {
        "clips": clip_names,
        "latent_shape": list(shape[1:]),  # of the `frames` clips; the locality used `locality_frames`
        "locality": {key: locality.get(key) for key in (
            "alpha", "C", "r2", "alpha_ci", "C_ci", "fit_from", "fit_distances", "mean_by_distance", "rel_tol",
            "eps", "d_trunc_bound", "recommended_d_trunc", "probes", "note") if key in locality},
        "gradient_error": grad_tables,
        "lpips": lpips_info,
        "stand_in_weights": bool(lpips_info and lpips_info["stand_in_weights"]),
        "backbone": {"parameters": agreement.parameters, "clips": agreement.clips, "table": agreement.table()},
        "resources": {"memory_measure": "saved_peak_bytes: peak bytes saved for backward (SavedTensorMeter)",
                      "rows": [{k: r[k] for k in ("mode", "d_trunc", "frames", "seconds", "cpu_seconds",
                                                  "saved_peak_bytes")} for r in resources],
                      "d_trunc_slope_cpu_seconds": _slope(reference, "cpu_seconds"),
                      "d_trunc_slope_saved_bytes": _slope(reference, "saved_peak_bytes")},
        "spatial": {k: v for k, v in spatial.to_dict().items() if k != "row_change"},
        "seconds": {**{k: round(v, 2) for k, v in seconds.items()}, "total": round(total, 2)},
        "params": asdict(params),
    }


def _slope(rows: list[dict], key: str) -> dict | None:
    """Least-squares line of ``key`` against d_trunc, with R^2 (linearity of figure 6)."""
    if len(rows) < 3:
        return None
    d = np.array([r["d_trunc"] for r in rows], dtype=float)
    y = np.array([r[key] for r in rows], dtype=float)
    slope, intercept = np.polyfit(d, y, 1)
    residual = y - (slope * d + intercept)
    total = ((y - y.mean()) ** 2).sum()
    return {"slope": float(slope), "intercept": float(intercept),
            "r2": float(1 - (residual ** 2).sum() / total) if total > 0 else 1.0}


def main(argv: list[str] | None = None) -> None:
    parser = cli.stage_parser(__doc__, STAGE)
    parser.add_argument("--vae", required=True, help="the diffusers VAE folder (the vae stage's output)")
    parser.add_argument("--scenes", required=True, help="scene set folder (with split.json)")
    parser.add_argument("--out", required=True, help="folder for the raw per-analysis JSON files")
    parser.add_argument("--metrics", required=True, help="metrics JSON file")
    parser.add_argument("--plots", required=True, help="folder for the five PNG figures")
    args = parser.parse_args(argv)
    params = cli.start(STAGE, Params, args.params)
    from stages.common.tracking import stage_run

    with stage_run(STAGE, params) as tracker:
        result = run(params, args.vae, args.scenes, args.out, args.metrics, args.plots)
        tracker.log_metrics(_scalars(result["metrics"]))
        for figure in result["figures"]:
            tracker.log_figure(figure)
        tracker.log_artifact(args.metrics)
        tracker.log_artifact(args.out, "analysis")


def _scalars(metrics: dict) -> dict[str, float]:
    """The numbers worth comparing across runs, flat (MLflow metrics are scalars)."""
    out = {}
    locality = metrics["locality"]
    for key in ("alpha", "C", "r2", "recommended_d_trunc", "d_trunc_bound"):
        if isinstance(locality.get(key), (int, float)):
            out[f"locality_{key}"] = float(locality[key])
    for loss, rows in metrics["gradient_error"].items():
        for row in rows:
            out[f"grad_error_{loss}_rel_d{row['d_trunc']}"] = row["rel_mean"]
    for row in metrics["backbone"]["table"]:
        out[f"backbone_cosine_d{row['d_trunc']}"] = row["cosine"]
        out[f"backbone_nmae_d{row['d_trunc']}"] = row["normalized_mae"]
    out["spatial_reach_px"] = float(metrics["spatial"]["reach_px"])
    out["stand_in_weights"] = float(metrics["stand_in_weights"])
    out["seconds_total"] = metrics["seconds"]["total"]
    return out


if __name__ == "__main__":
    main()

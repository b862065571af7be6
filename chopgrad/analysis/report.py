"""Compositions shared by the CLI and the pipeline stage: locality with its fit and recommendation."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from chopgrad.analysis.fit import ExponentialFit, fit_exponential, recommend_d_trunc
from chopgrad.analysis.locality import Locality, temporal_locality

__all__ = ["json_safe", "locality_report"]


def locality_report(
    decoder: Any,
    latents: Tensor,  # [B, C, t, h, w]
    *,
    max_distance: int,
    probes: int,
    rel_tol: float = 1e-3,
    fit_method: str = "loglinear",
    fit_from: str = "peak",
    seed: int = 0,
    progress: bool = False,
) -> tuple[Locality, ExponentialFit | None, dict]:
    """Estimate temporal locality, fit ``C exp(-alpha D)`` to the per-distance means, recommend ``d_trunc``.

    The fit uses the distances whose mean influence is > 0, from 0 (``fit_from="zero"``, the
    paper's figure 3) or from the distance where the mean peaks (``fit_from="peak"``: the decaying
    tail, for decoders whose influence first grows with distance; the bound then holds from the
    peak on). When fewer than 3 remain there is no fit: if the influence vanishes exactly beyond
    some distance, the recommended ``d_trunc`` is that distance (truncation beyond it is exact);
    otherwise (no decay inside ``max_distance``) there is no recommendation.

    Returns:
        ``(locality, fit or None, summary)``; ``summary`` holds ``mean_by_distance``, the fit
        (``C``, ``alpha``, ``r2``, intervals), ``rel_tol``, ``eps`` (= ``rel_tol`` times the mean
        influence at distance 0) and ``recommended_d_trunc``.
    """
    if fit_from not in ("zero", "peak"):
        raise ValueError(f"fit_from must be 'zero' or 'peak', got {fit_from!r}")
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not 0 < rel_tol < 1:
        raise ValueError(f"the relative tolerance eps must be in (0, 1) (e.g. 1e-3), got {rel_tol!r}")  # before the work
    generator = torch.Generator().manual_seed(seed)
    locality = temporal_locality(decoder, latents, max_distance, probes, generator=generator, progress=progress)
    mean = locality.mean_by_distance().numpy()
    summary: dict = {"mean_by_distance": mean.tolist(), "max_distance": max_distance, "probes": probes,
                     "videos": int(latents.shape[0]), "steps": locality.steps, "rel_tol": rel_tol}
    if mean[0] <= 0:
        raise ValueError("the decoder's output does not depend on its own step's latents (influence 0 at distance 0)")
    start = int(mean.argmax()) if fit_from == "peak" else 0
    positive = [d for d in range(start, len(mean)) if mean[d] > 0]
    summary.update(fit_from=fit_from, fit_distances=positive)
    if len(positive) < 3:
        vanishes = positive[-1] < len(mean) - 1
        summary.update(fit=None, eps=rel_tol * float(mean[0]), C=None, alpha=None, r2=None,
                       d_trunc_bound=float(positive[-1]) if vanishes else None,
                       recommended_d_trunc=int(positive[-1]) if vanishes else None,
                       note=("influence is exactly 0 beyond the recommended distance" if vanishes else
                             "fewer than 3 distances to fit after the peak: measure a larger max_distance"))
        return locality, None, summary
    fit = fit_exponential(positive, mean[positive], method=fit_method)
    recommendation = recommend_d_trunc(fit, rel_tol, float(mean[0]))
    summary.update(fit=fit.to_dict(), C=fit.C, alpha=fit.alpha, r2=fit.r2, alpha_ci=list(fit.alpha_ci),
                   C_ci=list(fit.C_ci), eps=recommendation["eps"], d_trunc_bound=recommendation["d_trunc_bound"],
                   recommended_d_trunc=recommendation["d_trunc"])
    if recommendation["d_trunc"] is None:
        summary["note"] = "no decay: the fitted alpha is <= 0, so no truncation distance meets the tolerance"
    return locality, fit, summary


def json_safe(value: Any) -> Any:
    """Replace non-finite floats (which JSON cannot hold) with None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value

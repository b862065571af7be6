"""Fit the temporal-locality bound ``L(D) = C * exp(-alpha * D)`` and turn it into a truncation distance.

Paper section 3.2, equations (3) and (6): if the influence of latent step ``j`` on the output of
step ``i`` decays as ``C * exp(-alpha * D(i, j))``, truncating gradients at ``D_trunc`` changes each
latent's gradient by at most ``C * exp(-alpha * D_trunc)`` times the summed gradient norms, so
``D_trunc >= log(C / eps) / alpha`` keeps that factor below a tolerance ``eps``.

Two estimators, both with confidence intervals from the t distribution with ``n - 2`` degrees of
freedom (``n`` points):

* ``"loglinear"`` (default): ordinary least squares of ``log L`` on ``D``. Every point weighs the
  same in *relative* terms, which suits values spanning decades. ``r2`` is computed on ``log L``.
* ``"curve_fit"``: ``scipy.optimize.curve_fit`` of ``C * exp(-alpha * D)`` on ``L`` itself,
  started from the log-linear solution. Large values dominate; ``r2`` is computed on ``L``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["ExponentialFit", "fit_exponential", "recommend_d_trunc"]


@dataclass(frozen=True)
class ExponentialFit:
    """``L(D) ~ C * exp(-alpha * D)`` with ``confidence`` intervals (``(low, high)``)."""

    C: float
    alpha: float
    r2: float  # coefficient of determination, on log L ("loglinear") or on L ("curve_fit")
    C_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    confidence: float
    method: str
    n: int  # points fitted

    def predict(self, distances) -> np.ndarray:
        return self.C * np.exp(-self.alpha * np.asarray(distances, dtype=np.float64))

    def truncation_distance(self, eps: float) -> float:
        """``log(C / eps) / alpha``: the smallest ``D`` with ``C exp(-alpha D) <= eps`` (``inf`` if no decay)."""
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if self.alpha <= 0:
            return math.inf
        return math.log(self.C / eps) / self.alpha

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def fit_exponential(
    distances,  # [N] temporal distances D (steps)
    values,  # [N] influence L > 0 at those distances
    method: str = "loglinear",
    confidence: float = 0.95,
) -> ExponentialFit:
    """Fit ``values ~ C * exp(-alpha * distances)``.

    Args:
        distances: ``[N]`` distances (at least 3 distinct values, so that an interval exists).
        values: ``[N]`` positive values.
        method: ``"loglinear"`` or ``"curve_fit"`` (see the module docstring).
        confidence: level of the two-sided intervals, in (0, 1).

    Raises:
        ValueError: on mismatched lengths, fewer than 3 distinct distances, non-positive or
            non-finite values, an unknown method or a confidence outside (0, 1).
    """
    from scipy import stats

    d = np.asarray(distances, dtype=np.float64).reshape(-1)
    y = np.asarray(values, dtype=np.float64).reshape(-1)
    if d.shape != y.shape:
        raise ValueError(f"distances and values differ in length: {d.size} vs {y.size}")
    if len(np.unique(d)) < 3:
        raise ValueError(f"the fit needs values at >= 3 distinct distances to give intervals, got {np.unique(d).tolist()}")
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(d))):
        raise ValueError("distances and values must be finite")
    if np.any(y <= 0):
        raise ValueError("values must be > 0 for an exponential fit (an influence of exactly 0 has no logarithm)")
    if method not in ("loglinear", "curve_fit"):
        raise ValueError(f"unknown fit method {method!r}: use 'loglinear' or 'curve_fit'")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")

    n, dof = d.size, d.size - 2
    quantile = float(stats.t.ppf(0.5 + confidence / 2, dof)) if dof > 0 else math.inf
    design = np.stack([np.ones_like(d), -d], axis=1)  # log y = log C - alpha d
    (log_c, alpha), *_ = np.linalg.lstsq(design, np.log(y), rcond=None)
    if method == "loglinear":
        residual = np.log(y) - design @ np.array([log_c, alpha])
        sigma2 = residual @ residual / dof if dof > 0 else math.nan
        covariance = sigma2 * np.linalg.inv(design.T @ design)
        se_log_c, se_alpha = np.sqrt(np.diag(covariance))
        r2 = _r2(np.log(y), design @ np.array([log_c, alpha]))
        c = math.exp(log_c)
        c_ci = (math.exp(log_c - quantile * se_log_c), math.exp(log_c + quantile * se_log_c))
    else:
        from scipy.optimize import curve_fit

        (c, alpha), covariance = curve_fit(lambda x, c, a: c * np.exp(-a * x), d, y, p0=(math.exp(log_c), alpha),
                                           maxfev=10000)
        se_c, se_alpha = np.sqrt(np.diag(covariance))
        r2 = _r2(y, c * np.exp(-alpha * d))
        c_ci = (c - quantile * se_c, c + quantile * se_c)
    alpha_ci = (alpha - quantile * se_alpha, alpha + quantile * se_alpha)
    return ExponentialFit(float(c), float(alpha), float(r2), tuple(map(float, c_ci)), tuple(map(float, alpha_ci)),
                          confidence, method, int(n))


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    total = float(((observed - observed.mean()) ** 2).sum())
    return 1.0 - float(((observed - predicted) ** 2).sum()) / total if total > 0 else 1.0


def recommend_d_trunc(fit: ExponentialFit, rel_tol: float, reference: float) -> dict:
    """The truncation distance that the paper's bound recommends for a *relative* tolerance.

    ``eps = rel_tol * reference``, where ``reference`` is the influence at distance 0 (the mean
    measured ``L(i <- i)``): the dropped terms are then at most ``rel_tol`` times a step's influence
    on its own frames. The bound is ``D >= log(C / eps) / alpha`` (paper, after equation (6)).

    Returns:
        ``{"rel_tol", "eps", "d_trunc_bound" (float, inf without decay), "d_trunc" (the smallest
        integer >= the bound and >= 0, or None without decay)}``.
    Raises:
        ValueError: ``rel_tol`` outside (0, 1) or ``reference`` not > 0.
    """
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float)) or not 0 < rel_tol < 1:
        raise ValueError(f"the relative tolerance eps must be in (0, 1) (e.g. 1e-3), got {rel_tol!r}")
    if not (isinstance(reference, (int, float)) and reference > 0 and math.isfinite(reference)):
        raise ValueError(f"reference (the influence at distance 0) must be a finite number > 0, got {reference!r}")
    eps = rel_tol * reference
    bound = fit.truncation_distance(eps)
    d_trunc = None if math.isinf(bound) else max(0, math.ceil(bound - 1e-9))
    return {"rel_tol": rel_tol, "eps": eps, "d_trunc_bound": bound, "d_trunc": d_trunc}

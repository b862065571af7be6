"""Which weight files a pipeline stage's metrics (or metric losses) run on: a policy, in one place.

The metrics' pretrained weights cannot be downloaded here and ship with no package
(:mod:`chopgrad.weights`). A stage that needs them (``evaluate`` for its metrics, ``train`` for its
LPIPS/DISTS losses) opens :func:`metric_home` around building its metric objects, with one of three
policies (a ``weights:`` key in the stage's ``params.yaml`` section):

``official``
    The files must be where their loaders look (``python -m chopgrad.weights status``); a missing
    one raises :class:`chopgrad.weights.MissingWeightsError` at once, naming the file and its path.
``stand_in``
    If every needed file is present, nothing changes. If any is missing, the stage runs on a
    project-local weight home instead (``TORCH_HOME`` and ``CHOPGRAD_CLIP_HOME`` pointed at
    ``folder``, e.g. ``.weights/stand_in/``, git-ignored), filled with RANDOM stand-ins of the right
    shapes (:func:`chopgrad.weights.write_stand_ins`, written once and reused); every metric that
    loads weights then runs on stand-ins and its results are marked so. Random files are never
    written into the user's own caches.
``skip``
    Metrics whose files are missing are left out (``home.skipped`` lists them with the files);
    the others run on the files present.

Example::

    with metric_home(params.weights, ".weights/stand_in", ["lpips_vgg"]) as home:
        loss_net = chopgrad.metrics.LPIPS("vgg")  # built inside the block: it reads home's files
    if home.stand_in: ...  # say so in the stage's outputs

Build the networks inside the ``with`` block; once built they no longer need it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chopgrad import weights

__all__ = ["POLICIES", "MetricHome", "metric_home"]

POLICIES = ("official", "stand_in", "skip")


@dataclass(frozen=True)
class MetricHome:
    """What :func:`metric_home` decided."""

    policy: str
    metrics: tuple[str, ...]  # the metrics to compute (under ``skip``: those with every file present)
    skipped: dict[str, tuple[str, ...]] = field(default_factory=dict)  # metric -> its missing files
    stand_in: bool = False  # True when the project-local stand-in home is in use
    folder: Path | None = None  # that home, when in use


def _known_metrics() -> tuple[str, ...]:
    from chopgrad.metrics import METRICS

    return METRICS


@contextlib.contextmanager
def metric_home(policy: str, folder: str | os.PathLike, metrics: list[str] | tuple[str, ...]
                ) -> Iterator[MetricHome]:
    """Decide where the weights of ``metrics`` come from, and set the lookup paths for the block.

    Args:
        policy: ``official``, ``stand_in`` or ``skip`` (module docstring).
        folder: the project-local stand-in home (used by ``stand_in`` only), e.g. ``.weights/stand_in``.
        metrics: names from :data:`chopgrad.metrics.METRICS` (those without weights, e.g. ``psnr``,
            always run).
    Yields:
        A :class:`MetricHome`. Under ``stand_in`` with files missing, ``TORCH_HOME`` and
        ``CHOPGRAD_CLIP_HOME`` point into ``folder`` until the block ends.
    Raises:
        ValueError: an unknown policy or metric.
        MissingWeightsError: under ``official``, any needed file missing (before anything is built).
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown weights policy {policy!r}; choose one of {', '.join(POLICIES)}")
    unknown = [name for name in metrics if name not in _known_metrics()]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(_known_metrics())}")
    files = {name: weights.METRIC_WEIGHTS.get(name, ()) for name in metrics}
    needed = list(dict.fromkeys(f for names in files.values() for f in names))
    missing = [name for name in needed if weights.file_status(name) == "missing"]

    if policy == "official" or not missing:
        weights.require(needed, purpose=f"metrics {', '.join(metrics)} (weights policy 'official')")
        yield MetricHome(policy, tuple(metrics))
        return
    if policy == "skip":
        skipped = {m: tuple(f for f in names if f in missing) for m, names in files.items()
                   if any(f in missing for f in names)}
        yield MetricHome(policy, tuple(m for m in metrics if m not in skipped), skipped)
        return

    home = Path(folder).resolve()
    saved = {key: os.environ.get(key) for key in ("TORCH_HOME", weights.CLIP_HOME_ENV)}
    os.environ["TORCH_HOME"] = str(home / "torch")
    os.environ[weights.CLIP_HOME_ENV] = str(home / "clip")
    try:
        for name in needed:  # torch.hub.set_dir() would beat TORCH_HOME: never write outside the home
            path = weights.weight_path(name)
            if weights.REGISTRY[name].location != "lpips" and home not in path.resolve().parents:
                raise RuntimeError(f"stand-in weights for {name} would go to {path}, outside {home} "
                                   "(torch.hub.set_dir() was called?); refusing to write random files there")
        weights.write_stand_ins(needed)
        yield MetricHome(policy, tuple(metrics), stand_in=True, folder=home)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

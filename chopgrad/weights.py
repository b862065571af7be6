"""The one registry of every pretrained weight file the metrics load, and the one place they are loaded from.

No package we install ships these weights (the LPIPS linear layers in the lpips wheel aside), and
the libraries that load them (torchvision, lpips, pyiqa, cd-fvd, timm, open_clip) download on a
miss: offline that is a hang or a long retry loop. So every metric asks this module first, through
:func:`require` (or :func:`loading`), and a missing file raises :class:`MissingWeightsError` at once,
naming the file and the folder to put it in.

Each file is looked up where the library that loads it looks, computed at call time so that a
``TORCH_HOME`` set after import is honoured:

* ``torch_hub``: ``torch.hub.get_dir()/checkpoints`` (torchvision backbones, also used for the files
  whose loaders have no location of their own: DINO, I3D, the LAION aesthetic head);
* ``pyiqa``: ``torch.hub.get_dir()/pyiqa`` (pyiqa's ``DEFAULT_CACHE_DIR``);
* ``clip``: ``$CHOPGRAD_CLIP_HOME`` if set, else ``~/.cache/clip`` (openai-clip's default
  ``download_root``; chopgrad passes the file path to open_clip itself, so the variable only moves
  chopgrad's lookup, for project-local weight homes);
* ``lpips``: the ``lpips`` package's own ``weights/v0.1`` folder (shipped with the wheel).

Stand-in weights. Tests, and machines without the real files, run the real loading code on files of
the right shapes but random values. :func:`file_status` tells them apart by SHA-256: ``official``
(matches the published hash, or the hash prefix in a torch.hub-style file name), ``stand-in``
(does not), ``unverified`` (no hash is published for that file; it cannot be told from a stand-in, so
results count it as one). Metric results carry ``stand_in_weights`` and the per-file statuses.
:func:`write_stand_ins` writes such files (random networks of the official architecture, built
with the same library code that loads them) where the loaders look, never over an existing file.

Weights policy. :func:`metric_home` decides, for a block that builds metrics, where their files come
from: ``official`` (the files must be present), ``stand_in`` (if any is missing, the whole block runs
on a separate weight home filled with stand-ins, never the user's caches) or ``skip`` (metrics with
missing files are left out). Stages take the policy from their ``weights`` key; :func:`load_lpips
<chopgrad.metrics.frames.load_lpips>` takes ``official`` or ``stand_in``.

Note: weight files never run code. A ``.pth`` file is a pickle, and unpickling can call any Python
function: a crafted file where a loader looks would run it the moment a metric is built. pyiqa
loads its files with ``torch.load(..., weights_only=False)``, and torchvision's cached backbones go
through ``torch.hub.load_state_dict_from_url``, whose default is the same. So every network is built
inside :func:`loading` (:func:`weights_only_loads`), which makes every ``torch.load`` in the block, the
project's and its libraries', run with ``weights_only=True`` (tensors and plain containers only): a
file that needs more is refused with :class:`UnsafeWeightsError`, naming it. The one other loader,
``torch.jit.load`` of OpenAI's CLIP TorchScript archives, runs only on a file whose full SHA-256
is the published one. A stand-in home loads only files chopgrad wrote there: :func:`write_stand_ins`
records the SHA-256 of each file it writes in ``.chopgrad-stand-ins.json`` beside it, and
:func:`metric_home` refuses any other file in the home that is not the official one.

CLI::

    python -m chopgrad.weights status [NAMES...]         # present / missing files and where they go
    python -m chopgrad.weights fetch [NAMES...]          # download (machines with internet access only)
    python -m chopgrad.weights stand-in NAMES... --yes   # write RANDOM stand-ins (smoke tests only)
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "CLIP_HOME_ENV",
    "METRIC_WEIGHTS",
    "POLICIES",
    "REGISTRY",
    "STAND_IN_MANIFEST",
    "MetricHome",
    "MissingWeightsError",
    "UnsafeWeightsError",
    "WeightFile",
    "fetch",
    "file_status",
    "loading",
    "loading_metric",
    "main",
    "metric_home",
    "require",
    "require_metric",
    "weight_path",
    "weights_only_loads",
    "write_stand_ins",
]

CLIP_HOME_ENV = "CHOPGRAD_CLIP_HOME"  # moves the ``clip`` location (see the module docstring)


class MissingWeightsError(FileNotFoundError):
    """A metric's pretrained weight file is not where its loader looks for it."""


@dataclass(frozen=True)
class WeightFile:
    name: str  # registry key, used on the CLI
    filename: str  # the name the loading library expects
    location: str  # "torch_hub" | "pyiqa" | "clip" | "lpips"
    url: str  # where `fetch` downloads it from
    sha256: str | None  # full hash or a torch.hub-style prefix; None when none is published
    description: str


_HF_PYIQA = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"

REGISTRY: dict[str, WeightFile] = {
    w.name: w
    for w in [
        WeightFile("vgg16", "vgg16-397923af.pth", "torch_hub",
                   "https://download.pytorch.org/models/vgg16-397923af.pth", "397923af",
                   "torchvision VGG16 ImageNet backbone (LPIPS-VGG, DISTS)"),
        WeightFile("alexnet", "alexnet-owt-7be5be79.pth", "torch_hub",
                   "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "7be5be79",
                   "torchvision AlexNet ImageNet backbone (LPIPS-Alex)"),
        WeightFile("lpips_vgg_lin", "vgg.pth", "lpips",
                   "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth",
                   "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868",
                   "LPIPS v0.1 linear layers for VGG (shipped with the lpips wheel)"),
        WeightFile("lpips_alex_lin", "alex.pth", "lpips",
                   "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth",
                   "df73285e35b22355a2df87cdb6b70b343713b667eddbda73e1977e0c860835c0",
                   "LPIPS v0.1 linear layers for AlexNet (shipped with the lpips wheel)"),
        WeightFile("dists", "DISTS_weights-f5e65c96.pth", "pyiqa",
                   _HF_PYIQA + "DISTS_weights-f5e65c96.pth", "f5e65c96",
                   "DISTS alpha/beta weights (pyiqa)"),
        WeightFile("fid_inception", "pt_inception-2015-12-05-6726825d.pth", "pyiqa",
                   _HF_PYIQA + "pt_inception-2015-12-05-6726825d.pth", "6726825d",
                   "FID Inception-v3 (TF 2015-12-05 graph ported by pytorch-fid; pyiqa)"),
        WeightFile("i3d", "i3d_pretrained_400.pt", "torch_hub",
                   "https://github.com/songweige/TATS/raw/main/tats/fvd/i3d_pretrained_400.pt", None,
                   "I3D Kinetics-400 for FVD (pytorch-i3d port of the TF-Hub model, as cd-fvd loads it)"),
        WeightFile("dino_vitb16", "dino_vitbase16_pretrain.pth", "torch_hub",
                   "https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth",
                   None, "DINO ViT-B/16 (VBench subject consistency)"),
        WeightFile("clip_vit_b32", "ViT-B-32.pt", "clip",
                   "https://openaipublic.azureedge.net/clip/models/"
                   "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
                   "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
                   "OpenAI CLIP ViT-B/32 (VBench background consistency)"),
        WeightFile("clip_vit_l14", "ViT-L-14.pt", "clip",
                   "https://openaipublic.azureedge.net/clip/models/"
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
                   "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
                   "OpenAI CLIP ViT-L/14 (VBench aesthetic quality)"),
        WeightFile("laion_aesthetic", "sa_0_4_vit_l_14_linear.pth", "torch_hub",
                   "https://raw.githubusercontent.com/LAION-AI/aesthetic-predictor/main/sa_0_4_vit_l_14_linear.pth",
                   None, "LAION aesthetic predictor linear head on CLIP ViT-L/14 (VBench aesthetic quality)"),
        WeightFile("musiq_spaq", "musiq_spaq_ckpt-358bb6af.pth", "pyiqa",
                   _HF_PYIQA + "musiq_spaq_ckpt-358bb6af.pth", "358bb6af",
                   "MUSIQ trained on SPAQ (VBench imaging quality; pyiqa)"),
        WeightFile("raft_large", "raft_large_C_T_V1-22a6c225.pth", "torch_hub",
                   "https://download.pytorch.org/models/raft_large_C_T_V1-22a6c225.pth", "22a6c225",
                   "torchvision RAFT-large, C+T weights ported from the RAFT paper (VBench dynamic degree)"),
    ]
}

# Which files each metric loads (metric names as in chopgrad.metrics).
METRIC_WEIGHTS: dict[str, tuple[str, ...]] = {
    "lpips_vgg": ("vgg16", "lpips_vgg_lin"),
    "lpips_alex": ("alexnet", "lpips_alex_lin"),
    "dists": ("vgg16", "dists"),
    "fid": ("fid_inception",),
    "fvd": ("i3d",),
    "subject_consistency": ("dino_vitb16",),
    "background_consistency": ("clip_vit_b32",),
    "aesthetic_quality": ("clip_vit_l14", "laion_aesthetic"),
    "imaging_quality": ("musiq_spaq",),
    "dynamic_degree": ("raft_large",),
}


def _location_dir(location: str) -> Path:
    if location == "torch_hub":
        return Path(torch.hub.get_dir()) / "checkpoints"
    if location == "pyiqa":
        return Path(torch.hub.get_dir()) / "pyiqa"
    if location == "clip":
        return Path(os.environ.get(CLIP_HOME_ENV) or os.path.expanduser("~/.cache/clip"))
    if location == "lpips":
        import importlib.util

        spec = importlib.util.find_spec("lpips")
        if spec is None or spec.origin is None:
            return Path("<lpips package not installed>")
        return Path(spec.origin).parent / "weights" / "v0.1"
    raise ValueError(f"unknown weight location {location!r}")


def _entry(name: str) -> WeightFile:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown weight file {name!r}; known: {', '.join(REGISTRY)}") from None


def weight_path(name: str) -> Path:
    """Where the loader of registry entry ``name`` looks for its file (present or not)."""
    entry = _entry(name)
    return _location_dir(entry.location) / entry.filename


_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        _HASH_CACHE[key] = digest.hexdigest()
    return _HASH_CACHE[key]


def file_status(name: str) -> str:
    """``missing``, ``official``, ``stand-in`` or ``unverified`` (see the module docstring)."""
    entry, path = _entry(name), weight_path(name)
    if not path.is_file():
        return "missing"
    if entry.sha256 is None:
        return "unverified"
    return "official" if _sha256(path).startswith(entry.sha256) else "stand-in"


def _missing_message(names: list[str], purpose: str) -> str:
    lines = [f"{purpose} needs pretrained weights that are not on this machine:"]
    for name in names:
        entry = _entry(name)
        lines.append(f"  {entry.filename} ({entry.description})")
        lines.append(f"    put it at: {weight_path(name)}")
        lines.append(f"    source:    {entry.url}")
    lines.append("Run `python -m chopgrad.weights status` to see every file, or "
                 "`python -m chopgrad.weights fetch` on a machine with internet access.")
    return "\n".join(lines)


def require(names: tuple[str, ...] | list[str], purpose: str = "this metric") -> dict[str, str]:
    """Check that every named file is present, before any library gets a chance to download it.

    Returns:
        ``{name: status}`` with statuses from :func:`file_status` (never ``missing``).
    Raises:
        MissingWeightsError: naming every missing file, where to put it and where to get it.
    """
    statuses = {name: file_status(name) for name in names}
    missing = [name for name, status in statuses.items() if status == "missing"]
    if missing:
        raise MissingWeightsError(_missing_message(missing, purpose))
    return statuses


def require_metric(metric: str) -> dict[str, str]:
    """:func:`require` for the files of one metric of :data:`METRIC_WEIGHTS`."""
    return require(METRIC_WEIGHTS[metric], purpose=f"metric {metric!r}")


# ---------------------------------------------------------------- loading without running code

_FORCE_SAFE, _FORCE_UNSAFE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class UnsafeWeightsError(ValueError):
    """A weight file that is not plain tensors (loading it could run code), or one a stand-in home did not write."""


def _unsafe_message(file, error: Exception) -> str:
    path = Path(file) if isinstance(file, (str, os.PathLike)) else None
    entry = next((e for e in REGISTRY.values() if path is not None and e.filename == path.name), None)
    why = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line or "TorchScript" in line),
               str(error).splitlines()[0] if str(error) else type(error).__name__)
    source = f"the official file from {entry.url}" if entry else "a file from a source you trust"
    message = (f"refused to load {file}: it is not a plain weights file ({why}). chopgrad loads weight files "
               "only with torch.load(weights_only=True), because unpickling anything else can run arbitrary "
               f"code. Fix: delete it and put {source} there; never load it with weights_only=False unless "
               "you made it yourself.")
    if entry is not None and entry.sha256 and path.is_file() and _sha256(path).startswith(entry.sha256):
        # An 8-digit prefix is easy to forge, so it buys no exception; but a real official file that
        # needs more than tensors would be a chopgrad bug, worth a different hint.
        message += (f" (Its hash starts like the official file's, {entry.sha256}: if you downloaded it from "
                    "that address yourself, report this, the file needs converting to plain tensors.)")
    return message


def _weights_only_load(file, *args, **kwargs):
    kwargs["weights_only"] = True  # whatever the library asked for (pyiqa asks for False)
    try:
        return torch.serialization.load(file, *args, **kwargs)
    except pickle.UnpicklingError as error:
        raise UnsafeWeightsError(_unsafe_message(file, error)) from error
    except RuntimeError as error:  # a TorchScript archive, or an explicit pickle_module
        if "weights_only" not in str(error):
            raise
        raise UnsafeWeightsError(_unsafe_message(file, error)) from error


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block runs with ``weights_only=True`` (module docstring, the note).

    Patches ``torch.load`` (so that a refusal names its file) and sets torch's own
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (which also reaches code that bound ``torch.load`` earlier), both
    restored when the block ends; a nested block changes nothing.

    Raises:
        UnsafeWeightsError: from inside the block, for a file ``weights_only=True`` cannot load.
    """
    if torch.load is _weights_only_load:
        yield
        return
    previous, saved = torch.load, {key: os.environ.pop(key, None) for key in (_FORCE_SAFE, _FORCE_UNSAFE)}
    os.environ[_FORCE_SAFE] = "1"
    torch.load = _weights_only_load
    try:
        yield
    finally:
        torch.load = previous
        _restore_environment(saved)


def _restore_environment(saved: dict[str, str | None]) -> None:
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@contextlib.contextmanager
def loading(names: tuple[str, ...] | list[str], purpose: str = "this metric") -> Iterator[dict[str, str]]:
    """:func:`require` the files, then build the networks that read them inside :func:`weights_only_loads`.

    Example::

        with weights.loading_metric("dists") as statuses:
            model = pyiqa.create_metric("dists", ...)

    Yields:
        ``{name: status}`` as :func:`require` returns it.
    Raises:
        MissingWeightsError: before the block, as :func:`require`.
        UnsafeWeightsError: from the block, for a file that is not plain tensors.
    """
    statuses = require(names, purpose)
    with weights_only_loads():
        yield statuses


def loading_metric(metric: str) -> contextlib.AbstractContextManager[dict[str, str]]:
    """:func:`loading` for the files of one metric of :data:`METRIC_WEIGHTS`."""
    return loading(METRIC_WEIGHTS[metric], purpose=f"metric {metric!r}")


def fetch(names: list[str] | None = None, force: bool = False) -> list[Path]:
    """Download registry files to where their loaders look (needs internet access).

    Files already present are left alone unless ``force``. Raises whatever the download raises.
    """
    fetched = []
    for name in names or list(REGISTRY):
        entry, path = _entry(name), weight_path(name)
        if path.is_file() and not force:
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(entry.url, str(path), hash_prefix=entry.sha256, progress=True)
        fetched.append(path)
    return fetched

# ---------------------------------------------------------------- stand-in weights


def _kaiming(model: torch.nn.Module) -> torch.nn.Module:
    """Kaiming-normal conv/linear weights, so that features of deep random networks do not vanish."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model


def _half(state: dict) -> dict:
    # Big backbones are saved in float16 (half the disk); their loaders copy into float32 parameters.
    return {key: value.half() if value.is_floating_point() else value for key, value in state.items()}


def _fid_inception_state() -> dict:
    import pyiqa.archs.inception as inc

    model = inc._inception_v3(num_classes=1008, aux_logits=False, pretrained=False)
    # pyiqa's fid_inception_v3 layer swaps, without its download of the official file.
    for name, block in [("Mixed_5b", inc.FIDInceptionA(192, 32)), ("Mixed_5c", inc.FIDInceptionA(256, 64)),
                        ("Mixed_5d", inc.FIDInceptionA(288, 64)), ("Mixed_6b", inc.FIDInceptionC(768, 128)),
                        ("Mixed_6c", inc.FIDInceptionC(768, 160)), ("Mixed_6d", inc.FIDInceptionC(768, 160)),
                        ("Mixed_6e", inc.FIDInceptionC(768, 192)), ("Mixed_7b", inc.FIDInceptionE_1(1280)),
                        ("Mixed_7c", inc.FIDInceptionE_2(2048))]:
        setattr(model, name, block)
    return _kaiming(model).state_dict()


def _i3d_state() -> dict:
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    return _kaiming(InceptionI3d(400, in_channels=3)).state_dict()


def _torchvision_state(builder: str) -> dict:
    import torchvision

    return getattr(torchvision.models, builder)().state_dict()


def _raft_state() -> dict:
    from torchvision.models.optical_flow import raft_large

    return raft_large().state_dict()


def _dino_state() -> dict:
    import timm

    return _half(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).state_dict())


def _clip_state(arch: str) -> dict:
    import open_clip

    return _half(open_clip.create_model(arch, pretrained=None).state_dict())


def _musiq_state() -> dict:
    from pyiqa.archs.musiq_arch import MUSIQ

    return MUSIQ(pretrained=False).state_dict()


def _laion_head_state() -> dict:
    head = torch.nn.Linear(768, 1)
    torch.nn.init.normal_(head.weight, std=0.5)  # LAION scores are ~1..10: a spread around 5
    torch.nn.init.constant_(head.bias, 5.0)
    return head.state_dict()


def _dists_state() -> dict:
    # pyiqa's DISTS initialises alpha and beta as N(0.1, 0.01); positive values keep the score sensible.
    return {"alpha": torch.rand(1, 1475, 1, 1) * 0.1 + 0.05, "beta": torch.rand(1, 1475, 1, 1) * 0.1 + 0.05}


# Registry name -> state dict of a random network with the official architecture and key names.
_STAND_INS = {
    "vgg16": lambda: _half(_torchvision_state("vgg16")),
    "alexnet": lambda: _half(_torchvision_state("alexnet")),
    "dists": _dists_state,
    "fid_inception": _fid_inception_state,
    "i3d": _i3d_state,
    "dino_vitb16": _dino_state,
    "clip_vit_b32": lambda: _clip_state("ViT-B-32"),
    "clip_vit_l14": lambda: _clip_state("ViT-L-14"),
    "laion_aesthetic": _laion_head_state,
    "musiq_spaq": _musiq_state,
    "raft_large": _raft_state,
}


STAND_IN_MANIFEST = ".chopgrad-stand-ins.json"  # beside the files: {file name: SHA-256} of the stand-ins written


def _recorded(folder: Path) -> dict[str, str]:
    try:
        return json.loads((folder / STAND_IN_MANIFEST).read_text())
    except FileNotFoundError:
        return {}


def _record_stand_in(path: Path) -> None:
    recorded = _recorded(path.parent) | {path.name: _sha256(path)}
    partial = path.parent / f"{STAND_IN_MANIFEST}.partial-{os.getpid()}"
    partial.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
    os.replace(partial, path.parent / STAND_IN_MANIFEST)


def _written_by_chopgrad(name: str) -> bool:
    path = weight_path(name)
    return _recorded(path.parent).get(path.name) == _sha256(path)


def write_stand_ins(names: list[str], seed: int = 0) -> list[Path]:
    """Write RANDOM stand-in weight files where the loaders look, for smoke tests without the real ones.

    Each file is a state dict of the official architecture, built by the same library code that
    loads it (torchvision, pyiqa, cd-fvd, timm, open_clip), with random values; :func:`file_status`
    reports it as ``stand-in`` (or ``unverified`` where no hash is published), so every metric that
    loads it is marked. Its SHA-256 is recorded in :data:`STAND_IN_MANIFEST` beside it (the record
    :func:`metric_home` checks). A file already present (real or stand-in) is never overwritten. The paths
    follow ``TORCH_HOME`` and ``CHOPGRAD_CLIP_HOME``: point them at a scratch folder first unless
    you mean to fill your real caches with random networks.

    .. warning:: Metrics computed with stand-ins measure nothing; they only show the code runs.

    Args:
        names: registry names (:data:`REGISTRY`).
        seed: seeds the random values (file ``i`` of ``names`` uses ``seed + i``); the global RNG is
            left as it was.
    Returns:
        The paths written (files already present are left out).
    Raises:
        KeyError: for an unknown name, before anything is written.
        ValueError: for a missing file that ships with a package (the LPIPS linear layers).
    """
    entries = [_entry(name) for name in names]
    written = []
    for i, entry in enumerate(entries):
        path = weight_path(entry.name)
        if path.exists():
            continue
        if entry.name not in _STAND_INS:
            raise ValueError(f"{entry.filename} ships with the {entry.location} package and is missing from "
                             f"{path.parent}: reinstall that package (`pip install --force-reinstall lpips`)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + i)
            state = _STAND_INS[entry.name]()
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        try:
            torch.save(state, partial)
            os.replace(partial, path)  # a killed run never leaves a truncated file under the real name
        finally:
            partial.unlink(missing_ok=True)
        _record_stand_in(path)
        written.append(path)
    return written


# ---------------------------------------------------------------- the weights policy

POLICIES = ("official", "stand_in", "skip")


@dataclass(frozen=True)
class MetricHome:
    """What :func:`metric_home` decided."""

    policy: str
    metrics: tuple[str, ...]  # the metrics to compute (under ``skip``: those with every file present)
    skipped: dict[str, tuple[str, ...]] = field(default_factory=dict)  # metric -> its missing files
    stand_in: bool = False  # True when the stand-in home is in use
    folder: Path | None = None  # that home, when in use


def _check_policy(policy: str, metrics: list[str] | tuple[str, ...]) -> None:
    from chopgrad.metrics import METRICS  # lazily: chopgrad.metrics imports this module

    if policy not in POLICIES:
        raise ValueError(f"unknown weights policy {policy!r}; choose one of {', '.join(POLICIES)}")
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")


@contextlib.contextmanager
def metric_home(policy: str, folder: str | os.PathLike | None, metrics: list[str] | tuple[str, ...]
                ) -> Iterator[MetricHome]:
    """Decide where the weights of ``metrics`` come from, and set the lookup paths for the block.

    ``official``: the files must be where their loaders look. ``stand_in``: if every file is present
    nothing changes; if any is missing, ``TORCH_HOME`` and ``CHOPGRAD_CLIP_HOME`` point into
    ``folder`` for the block, where the missing files are written as RANDOM stand-ins (once, then
    reused) and the results are marked so. ``skip``: metrics with missing files are left out. Build the
    networks inside the block; once built they no longer need it.

    Example::

        with metric_home(params.weights, ".weights/stand_in", ["lpips_vgg"]) as home:
            loss_net = chopgrad.metrics.LPIPS("vgg")
        if home.stand_in: ...  # say so in the outputs

    Args:
        policy: one of :data:`POLICIES`.
        folder: the stand-in home (``stand_in`` only), e.g. a git-ignored ``.weights/stand_in``; None: a
            temporary folder, removed when the block ends.
        metrics: names from :data:`chopgrad.metrics.METRICS` (those without weights, e.g. ``psnr``, always run).
    Raises:
        ValueError: an unknown policy or metric.
        MissingWeightsError: under ``official``, any needed file missing (before anything is built).
        UnsafeWeightsError: under ``stand_in``, a file in the home that chopgrad did not write and that is
            not the official one.
    """
    _check_policy(policy, metrics)
    files = {name: METRIC_WEIGHTS.get(name, ()) for name in metrics}
    needed = list(dict.fromkeys(f for names in files.values() for f in names))
    missing = [name for name in needed if file_status(name) == "missing"]
    if policy == "official" or not missing:
        require(needed, purpose=f"metrics {', '.join(metrics)} (weights policy 'official')")
        yield MetricHome(policy, tuple(metrics))
    elif policy == "skip":
        skipped = {m: tuple(f for f in names if f in missing) for m, names in files.items()
                   if any(f in missing for f in names)}
        yield MetricHome(policy, tuple(m for m in metrics if m not in skipped), skipped)
    else:
        with _stand_in_home(folder, needed) as home:
            yield MetricHome(policy, tuple(metrics), stand_in=True, folder=home)


@contextlib.contextmanager
def _stand_in_home(folder: str | os.PathLike | None, needed: list[str]) -> Iterator[Path]:
    with contextlib.ExitStack() as stack:
        if folder is None:
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="chopgrad-stand-ins-"))
        home = Path(folder).resolve()
        stack.callback(_restore_environment, {key: os.environ.get(key) for key in ("TORCH_HOME", CLIP_HOME_ENV)})
        os.environ["TORCH_HOME"], os.environ[CLIP_HOME_ENV] = str(home / "torch"), str(home / "clip")
        for name in needed:  # torch.hub.set_dir() would beat TORCH_HOME: never write outside the home
            path = weight_path(name)
            if REGISTRY[name].location != "lpips" and home not in path.resolve().parents:
                raise RuntimeError(f"stand-in weights for {name} would go to {path}, outside {home} "
                                   "(torch.hub.set_dir() was called?); refusing to write random files there")
        write_stand_ins(needed)
        _refuse_foreign_files(home, needed)
        yield home


def _refuse_foreign_files(home: Path, needed: list[str]) -> None:
    """Stand-in mode loads the official files or the stand-ins chopgrad wrote, nothing else found in ``home``."""
    foreign = [weight_path(name) for name in needed if REGISTRY[name].location != "lpips"
               and file_status(name) != "official" and not _written_by_chopgrad(name)]
    if foreign:
        raise UnsafeWeightsError(
            f"the stand-in weight home {home} holds files that chopgrad did not write (they are not in its "
            f"record, {STAND_IN_MANIFEST} beside them, or were changed since) and that are not the official "
            f"files: {', '.join(map(str, foreign))}. Stand-in mode loads only its own stand-ins. Fix: delete "
            "them (fresh stand-ins are written on the next run) or put the official files there.")


def _status_report(names: list[str]) -> str:
    lines = [(f"Weight files, each at the path its loader reads (torch hub folder: {torch.hub.get_dir()}, "
              f"from $TORCH_HOME; CLIP folder: {_location_dir('clip')}, from ${CLIP_HOME_ENV} or ~/.cache/clip):")]
    missing, not_official = [], []
    for name in names:
        entry, path, status = _entry(name), weight_path(name), file_status(name)
        metrics = [m for m, files in METRIC_WEIGHTS.items() if name in files]
        lines.append(f"[{status:>10}] {name}: {path}")
        lines.append(f"             {entry.description}; used by: {', '.join(metrics)}")
        if status == "missing":
            missing.append(name)
            lines.append(f"             get it from: {entry.url}")
        elif status == "stand-in":
            not_official.append(name)
            lines.append(f"             NOT the official file (sha256 {_sha256(path)[:16]}..., official "
                         f"{entry.sha256[:16]}...): results using it are marked stand-in; replace it with "
                         f"{entry.url}")
        elif status == "unverified":
            not_official.append(name)
            lines.append(f"             no published hash to check it against (sha256 {_sha256(path)[:16]}...): "
                         f"results using it are marked stand-in; the official file is {entry.url}")
    present = len(names) - len(missing)
    lines.append(f"{present} of {len(names)} weight files present; {len(missing)} missing.")
    if not_official:
        lines.append(f"Not verified as official ({', '.join(not_official)}): replace them with the files above "
                     "for real numbers.")
    if missing:
        lines.append("To compute the real numbers, place each missing file at the path shown above, e.g.")
        for name in missing[:2]:
            path = weight_path(name)
            lines.append(f"    mkdir -p {path.parent} && curl -L -o {path} {_entry(name).url}")
        lines.append("or run `python -m chopgrad.weights fetch` on a machine with internet access and copy "
                     "the folders over.")
    ready = [m for m, files in METRIC_WEIGHTS.items()
             if all(file_status(f) == "official" for f in files)]
    lines.append(f"Metrics with official weights: {', '.join(ready) or 'none'} "
                 "(psnr, ssim and temporal_flickering need none).")
    return "\n".join(lines)


def _stand_in_command(names: list[str], yes: bool, seed: int) -> int:
    todo = [name for name in names if not weight_path(name).exists()]
    for name in names:
        if name not in todo:
            print(f"already present, left alone: {weight_path(name)}")
    if not todo:
        return 0
    if not yes:
        print("Would write RANDOM stand-in weights (right shapes, meaningless values) to:", file=sys.stderr)
        for name in todo:
            print(f"    {weight_path(name)}", file=sys.stderr)
        print("Metrics computed with them measure nothing and are marked stand-in; they only show the "
              "code runs. These are the folders your real weight files go in: to keep random files out "
              f"of them, set TORCH_HOME and {CLIP_HOME_ENV} to a scratch folder first. "
              "Re-run with --yes to write them.", file=sys.stderr)
        return 1
    for path in write_stand_ins(todo, seed=seed):
        print(f"wrote stand-in (random) weights: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chopgrad.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="list present and missing weight files with their paths")
    p_status.add_argument("names", nargs="*", help="registry names (default: all)")
    p_fetch = sub.add_parser("fetch", help="download weight files (needs internet access)")
    p_fetch.add_argument("names", nargs="*", help="registry names (default: all)")
    p_fetch.add_argument("--force", action="store_true", help="download again even if present")
    p_stand = sub.add_parser("stand-in", help="write RANDOM stand-in weight files (smoke tests only)")
    p_stand.add_argument("names", nargs="+", help="registry names")
    p_stand.add_argument("--yes", action="store_true", help="really write random files where the loaders look")
    p_stand.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        parser.error(f"unknown weight file(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    names = args.names or list(REGISTRY)
    if args.command == "status":
        print(_status_report(names))
        return 0
    if args.command == "stand-in":
        return _stand_in_command(names, args.yes, args.seed)
    for path in fetch(names, force=args.force):
        print(f"fetched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

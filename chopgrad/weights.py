"""The one registry of every pretrained weight file the metrics load.

No metric weights ship with the packages we use (ENVIRONMENT.md, "Metrics and pretrained weights"),
and the libraries that load them (torchvision, lpips, pyiqa, openai-clip) download on a miss: offline
that is a hang or a long retry loop. So every metric asks this module first, through
:func:`require`, and a missing file raises :class:`MissingWeightsError` at once, naming the file and
the folder to put it in.

Each file is looked up where the library that loads it looks, computed at call time so that a
``TORCH_HOME`` set after import is honoured:

* ``torch_hub``: ``torch.hub.get_dir()/checkpoints`` (torchvision backbones, also used for the files
  whose loaders have no location of their own: DINO, I3D, the LAION aesthetic head);
* ``pyiqa``: ``torch.hub.get_dir()/pyiqa`` (pyiqa's ``DEFAULT_CACHE_DIR``);
* ``clip``: ``~/.cache/clip`` (openai-clip's default ``download_root``);
* ``lpips``: the ``lpips`` package's own ``weights/v0.1`` folder (shipped with the wheel).

Stand-in weights. Tests, and machines without the real files, run the real loading code on files of
the right shapes but random values. :func:`file_status` tells them apart by SHA-256: ``official``
(matches the published hash, or the hash prefix in a torch.hub-style file name), ``stand-in``
(does not), ``unverified`` (no hash is published for that file; it cannot be told from a stand-in, so
results count it as one). Metric results carry ``stand_in_weights`` and the per-file statuses.

CLI::

    python -m chopgrad.weights status [NAMES...]   # present / missing files and where they go
    python -m chopgrad.weights fetch [NAMES...]    # download (machines with internet access only)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "METRIC_WEIGHTS",
    "REGISTRY",
    "MissingWeightsError",
    "WeightFile",
    "fetch",
    "file_status",
    "main",
    "require",
    "require_metric",
    "weight_path",
]


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
        return Path(os.path.expanduser("~/.cache/clip"))
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


def _status_report(names: list[str]) -> str:
    lines, n_missing = [], 0
    for name in names:
        entry, path, status = _entry(name), weight_path(name), file_status(name)
        n_missing += status == "missing"
        metrics = [m for m, files in METRIC_WEIGHTS.items() if name in files]
        lines.append(f"[{status:>10}] {name}: {path}")
        lines.append(f"             {entry.description}; used by: {', '.join(metrics)}")
        if status == "missing":
            lines.append(f"             get it from: {entry.url}")
        elif status != "official":
            lines.append(f"             sha256 {_sha256(path)} (official: {entry.sha256 or 'not published'})")
    lines.append(f"{len(names) - n_missing} of {len(names)} weight files present; {n_missing} missing.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chopgrad.weights", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_status = sub.add_parser("status", help="list present and missing weight files with their paths")
    p_status.add_argument("names", nargs="*", help="registry names (default: all)")
    p_fetch = sub.add_parser("fetch", help="download weight files (needs internet access)")
    p_fetch.add_argument("names", nargs="*", help="registry names (default: all)")
    p_fetch.add_argument("--force", action="store_true", help="download again even if present")
    args = parser.parse_args(argv)

    unknown = [name for name in args.names if name not in REGISTRY]
    if unknown:
        parser.error(f"unknown weight file(s) {', '.join(unknown)}; known: {', '.join(REGISTRY)}")
    names = args.names or list(REGISTRY)
    if args.command == "status":
        print(_status_report(names))
        return 0
    for path in fetch(names, force=args.force):
        print(f"fetched {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

CLI::

    python -m chopgrad.weights status [NAMES...]         # present / missing files and where they go
    python -m chopgrad.weights fetch [NAMES...]          # download (machines with internet access only)
    python -m chopgrad.weights stand-in NAMES... --yes   # write RANDOM stand-ins (smoke tests only)
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
    "CLIP_HOME_ENV",
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


def write_stand_ins(names: list[str], seed: int = 0) -> list[Path]:
    """Write RANDOM stand-in weight files where the loaders look, for smoke tests without the real ones.

    Each file is a state dict of the official architecture, built by the same library code that
    loads it (torchvision, pyiqa, cd-fvd, timm, open_clip), with random values; :func:`file_status`
    reports it as ``stand-in`` (or ``unverified`` where no hash is published), so every metric that
    loads it is marked. A file already present (real or stand-in) is never overwritten. The paths
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
        written.append(path)
    return written


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

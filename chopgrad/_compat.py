"""Make ``import torchvision`` work on a CPU-only torch build.

The only torchvision wheel that matches ``torch==2.13.0`` is a CUDA build. On a CPU-only
torch its ``_C`` extension fails to load, and the first import of torchvision (and so of
diffusers, lpips and pyiqa, which import it) raises
``RuntimeError: operator torchvision::nms does not exist``.

:func:`ensure_torchvision` runs before torchvision is first imported. It tries to load the
extension the way torchvision would; if that fails with ``OSError`` it registers the schemas
of the two operators that torchvision's Python code looks up at import time, so that the
pure-Python parts (models, transforms) work. The C++ kernels (nms, roi_align, image codecs)
stay unavailable. Where the extension loads normally (a matching CUDA machine) nothing changes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

__all__ = ["ensure_torchvision"]

# Kept alive for the life of the process: dropping the Library object unregisters the schemas.
_LIBRARY: torch.library.Library | None = None
_DONE = False


def ensure_torchvision() -> None:
    """Let torchvision import on this torch build; a no-op when it already can."""
    global _LIBRARY, _DONE
    if _DONE or "torchvision" in sys.modules:
        _DONE = True
        return
    _DONE = True
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    for lib in sorted(package_dir.glob("_C*.so")) + sorted(package_dir.glob("_C*.pyd")):
        try:
            torch.ops.load_library(str(lib))
            return
        except OSError:
            continue  # wrong CUDA/CPU flavour of the extension: fall through to the schemas
    if _has_op("nms"):
        return
    _LIBRARY = torch.library.Library("torchvision", "DEF")
    _LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIBRARY.define(
        "qnms(Tensor dets, Tensor scores, float iou_threshold, Tensor scale, Tensor zero_point) -> Tensor"
    )


def _has_op(name: str) -> bool:
    try:
        getattr(torch.ops.torchvision, name)
    except (AttributeError, RuntimeError):
        return False
    return True

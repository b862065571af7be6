"""Frame files read as videos: one frame order, pairing by name, one 16-bit rule.

Shared by ``python -m chopgrad.metrics`` and the pipeline's stages (``stages/common/video.py``), so a
folder holding ``1.png ... 60.png`` is one video in one order everywhere (text order would put
``10.png`` before ``2.png`` and change temporal metrics and FVD without a word), frames of two
folders are paired by name, never by position (one frame missing and another added would otherwise
pair frame k with frame k + 1), and a 16-bit image is either scaled properly or refused, never read
as black.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath

import numpy as np

__all__ = ["frame_sort_key", "match_frame_names", "pixels_to_uint8"]

_DIGITS = re.compile(r"(\d+)")
_SHOWN = 5  # names listed in an error before "..."


def frame_sort_key(name: str) -> tuple:
    """Natural order of file names: digit runs compare as numbers, the rest as text.

    ``frame_2.png`` comes before ``frame_10.png``, ``9.png`` before ``10.png``. Names that differ only
    in zero padding (``1.png``, ``01.png``) compare equal in the first item of the key and are
    ordered by the name itself, so the order is total and the same on every file system.
    """
    parts = _DIGITS.split(name)  # text, digits, text, ...: the same type at each position
    return tuple(int(part) if index % 2 else part for index, part in enumerate(parts)), name


def _listing(names: Sequence[str], limit: int = _SHOWN) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def match_frame_names(folders: Mapping[str, Sequence[str]]) -> list[str]:
    """Check that every folder holds the same frames, by name (the stem: ``00003.png`` pairs with
    ``00003.jpg``); return the stems in frame order.

    Args:
        folders: ``{label: file names}``, e.g. ``{"input/": [...], "target/": [...]}``; the labels
            name the folders in the error.

    Returns:
        The shared stems, sorted by :func:`frame_sort_key`.

    Raises:
        ValueError: a folder holds two files of one stem, or lacks frames another folder has (the
            missing and the extra names are listed).
    """
    stems = {}
    for label, names in folders.items():
        found = [PurePath(name).stem for name in names]
        repeated = sorted({stem for stem in found if found.count(stem) > 1}, key=frame_sort_key)
        if repeated:
            raise ValueError(f"{label} holds several files named {_listing(repeated)} (different "
                             "extensions); keep one file per frame.")
        stems[label] = set(found)
    (first, reference), *others = stems.items()
    for label, found in others:
        missing = sorted(reference - found, key=frame_sort_key)
        extra = sorted(found - reference, key=frame_sort_key)
        if missing or extra:
            problems = ([f"{label} lacks {_listing(missing)} (present in {first})"] if missing else []) + \
                       ([f"{label} has {_listing(extra)}, which {first} lacks"] if extra else [])
            raise ValueError(f"frames are paired by name and these folders differ: {'; '.join(problems)}. "
                             "Rename or remove frames so that every folder holds the same names.")
    return sorted(reference, key=frame_sort_key)


def pixels_to_uint8(pixels: np.ndarray, name: str = "image") -> np.ndarray:
    """8-bit pixels from an image file of 8 or 16 bits per channel.

    ``uint8`` comes back as it is. ``uint16`` is scaled by 255 / 65535 and rounded (65535 -> 255,
    257 k -> k), as a 16-to-8-bit export does.

    .. warning::
        A 16-bit image whose values all lie in 1..255 is refused: it holds 8-bit values written into
        a 16-bit file, which proper scaling would turn black, while reading it as 8-bit would be a
        guess that brightens a genuinely dark 16-bit image 257 times. Re-save it as 8-bit, or scale
        it to 0..65535.

    Raises:
        ValueError: another dtype, or the ambiguous 16-bit image above.
    """
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype != np.uint16:
        raise ValueError(f"{name}: {pixels.dtype} pixels; image files of 8 or 16 bits per channel are read.")
    peak = int(pixels.max()) if pixels.size else 0
    if 0 < peak <= 255:
        raise ValueError(
            f"{name} is a 16-bit image whose values all lie in 0..{peak}: 8-bit values stored in a 16-bit "
            "file, which would read as black. Re-save it as 8-bit, or scale it to 0..65535 (x 257).")
    return ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)

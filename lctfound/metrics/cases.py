"""Case names: how evaluation pairs predictions with references and truth tables."""

from __future__ import annotations

import os

#: Name endings dropped before cases are matched (``lung1_image_seg`` and ``lung1_label`` are both
#: case ``lung1``).
CASE_SUFFIXES = ("_seg", "_label", "_labels", "_mask", "_image")


def case_key(name: str | os.PathLike) -> str:
    """The case a file or table entry belongs to: `volume_stem` without the endings in `CASE_SUFFIXES`
    (dropped repeatedly, case-insensitively, never down to an empty name)."""
    from ..io.volume import volume_stem

    key = volume_stem(name)
    changed = True
    while changed:
        changed = False
        for suffix in CASE_SUFFIXES:
            if key.lower().endswith(suffix) and len(key) > len(suffix):
                key, changed = key[: -len(suffix)], True
    return key

"""Python 3.9 stand-ins for newer built-ins (3D Slicer 5.8 bundles Python 3.9): the engine keeps
compiling and importing there (checked in Testing/test_python_versions.py)."""

from __future__ import annotations

import itertools
import sys
from typing import Any, Iterable, Iterator

_MISSING = object()


def _strict_zip_fallback(*iterables: Iterable[Any]) -> Iterator[tuple]:
    for values in itertools.zip_longest(*iterables, fillvalue=_MISSING):
        if any(value is _MISSING for value in values):
            raise ValueError("strict_zip(): the iterables have different lengths")
        yield values


def strict_zip(*iterables: Iterable[Any]) -> Iterator[tuple]:
    """``zip(*iterables, strict=True)`` on every Python: like zip, but a ValueError when the lengths
    differ (a silent truncation would pair the wrong items)."""
    if sys.version_info >= (3, 10):
        return zip(*iterables, strict=True)  # noqa: B905 - the built-in check where it exists
    return _strict_zip_fallback(*iterables)

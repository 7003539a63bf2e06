"""Where LCTfound keeps its per-user data.

Everything lives under one cache root so that weights and data survive upgrades of Slicer
or of this package and can be shared on a multi-user machine:
``$LCTFOUND_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lctfound``, else ``~/.cache/lctfound``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """The cache root; raises `LCTfoundError` when it (or a folder above it) is a file."""
    env = os.environ.get("LCTFOUND_CACHE_DIR")
    if env:
        root = Path(env).expanduser()
        source = f"LCTFOUND_CACHE_DIR={env}"
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "lctfound"
        source = f"XDG_CACHE_HOME={xdg}" if xdg else str(root)
    _check_folder(root, source)
    return root


def _check_folder(root: Path, source: str) -> None:
    # A cache "root" that is a file (or lies under one) would fail deep inside the first writer.
    for path in (root, *root.parents):
        if path.exists():
            if not path.is_dir():
                from .errors import LCTfoundError

                raise LCTfoundError(f"{source}: {path} is a file, not a folder; point the cache to a folder "
                                    "(unset LCTFOUND_CACHE_DIR for the default)")
            return


def sample_data_dir() -> Path:
    return cache_root() / "sample-data"


def user_models_dir() -> Path:
    return cache_root() / "models"


def feature_cache_dir() -> Path:
    return cache_root() / "features"

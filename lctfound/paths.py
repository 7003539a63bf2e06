"""Where LCTfound keeps its per-user data.

Everything lives under one cache root so that weights and data survive upgrades of Slicer
or of this package and can be shared on a multi-user machine:
``$LCTFOUND_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lctfound``, else ``~/.cache/lctfound``.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    env = os.environ.get("LCTFOUND_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lctfound"


def sample_data_dir() -> Path:
    return cache_root() / "sample-data"


def user_models_dir() -> Path:
    return cache_root() / "models"


def feature_cache_dir() -> Path:
    return cache_root() / "features"

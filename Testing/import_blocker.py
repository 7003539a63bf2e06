"""Make installed packages look absent, as in a fresh 3D Slicer: `hidden_packages(...)` blocks their
import (a ``sys.meta_path`` finder that raises ModuleNotFoundError, with the modules dropped from
``sys.modules`` for the duration) and their metadata (``importlib.metadata.version``/``distribution``
raise PackageNotFoundError). Everything is restored on exit. `unhide` makes one visible again (a
stand-in for pip having installed it)."""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.metadata as metadata
import re
import sys
from typing import Iterable, Iterator


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


#: Distribution name -> top-level import names, where they differ.
IMPORT_NAMES = {"scikit-image": ["skimage"], "huggingface-hub": ["huggingface_hub"], "pillow": ["PIL"]}


class HiddenPackages(importlib.abc.MetaPathFinder):
    def __init__(self, distributions: Iterable[str]) -> None:
        self.distributions = {_normalized(name) for name in distributions}

    def unhide(self, distribution: str) -> None:
        self.distributions.discard(_normalized(distribution))

    @property
    def modules(self) -> set[str]:
        names = set()
        for distribution in self.distributions:
            names.update(IMPORT_NAMES.get(distribution, [distribution.replace("-", "_")]))
        return names

    def hides_module(self, fullname: str) -> bool:
        return fullname.split(".")[0] in self.modules

    def find_spec(self, fullname, path=None, target=None):
        if self.hides_module(fullname):
            raise ModuleNotFoundError(f"No module named '{fullname}' (hidden by the test)", name=fullname)
        return None

    def hides_distribution(self, name: str) -> bool:
        return _normalized(name) in self.distributions


@contextlib.contextmanager
def hidden_packages(*distributions: str) -> Iterator[HiddenPackages]:
    blocker = HiddenPackages(distributions)
    saved_modules = {name: module for name, module in sys.modules.items() if blocker.hides_module(name)}
    real_version, real_distribution = metadata.version, metadata.distribution

    def version(name):
        if blocker.hides_distribution(name):
            raise metadata.PackageNotFoundError(name)
        return real_version(name)

    def distribution(name):
        if blocker.hides_distribution(name):
            raise metadata.PackageNotFoundError(name)
        return real_distribution(name)

    for name in saved_modules:
        del sys.modules[name]
    sys.meta_path.insert(0, blocker)
    metadata.version, metadata.distribution = version, distribution
    try:
        yield blocker
    finally:
        metadata.version, metadata.distribution = real_version, real_distribution
        sys.meta_path.remove(blocker)
        for name in [name for name in sys.modules if blocker.hides_module(name) or name in saved_modules]:
            sys.modules.pop(name, None)
        sys.modules.update(saved_modules)

"""The Python packages the LCTfound jobs need inside 3D Slicer, and how to install them.

A fresh Slicer ships numpy, scipy, pydicom, pillow, requests and SimpleITK; torch comes from the
PyTorch extension; everything else (`SLICER_REQUIREMENTS`) is installed with pip after asking the
user once. This module is Qt-free and never imports the packages it checks: what is installed is
read from package metadata (`importlib.metadata`), so checking is cheap and cannot half-import a
broken package. The Slicer side (dialog, PyTorch extension, ``slicer.util.pip_install``) is
``LCTfoundSlicerLib/dependencies.py``.

Rules kept here:

* the set is **pinned**: the exact versions the test suite runs with (`SLICER_REQUIREMENTS`);
  a package that is already installed at a version at or above its tested floor is left alone
  (another extension may need it), a missing or older one gets the pinned version;
* pip never changes what Slicer or the PyTorch extension installed: a constraints file pins
  `PROTECTED_PACKAGES` to the versions *running now* (`constraints_text`);
* wheels only (``--only-binary :all:``): a Slicer has no compiler;
* the set needs Python >= 3.11 (diffusers, transformers, accelerate, scikit-image and matplotlib
  at these versions), i.e. Slicer 5.10 or later, and torch >= 2.8 (monai 1.6), which has no
  builds for Intel Macs. `platform_problem` says so instead of letting pip fail.

``scripts/check_dependency_resolution.py`` resolves this set for every supported Python and
platform (Windows, macOS arm64, Linux) against PyPI; the sizes below come from that script.
"""

from __future__ import annotations

import importlib.metadata as metadata
import math
import platform
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Sequence

#: The oldest Slicer release the extension supports, and the Python it bundles.
MINIMUM_SLICER_VERSION = "5.10"
MINIMUM_PYTHON = (3, 11)
#: Pythons of the supported Slicer releases (5.10 and 5.12 bundle 3.12) and the next one.
SUPPORTED_PYTHONS = ("3.12", "3.13")

#: torch is installed by the PyTorch extension (the build that fits the GPU driver); monai 1.6
#: needs torch 2.8 or later.
TORCH_REQUIREMENT = ">=2.8"

#: What Slicer (and the PyTorch extension) installed: pip must never replace these, so the
#: constraints file pins each one that is installed to its running version.
PROTECTED_PACKAGES = ("numpy", "scipy", "pydicom", "pillow", "requests", "SimpleITK", "torch", "vtk")

#: What the Slicer releases we support bundle (for the resolution check; read from Slicer's
#: own Python layer, see shared/slicer-python/README.md).
SLICER_BUNDLED = {
    "5.10": {"python": "3.12", "numpy": "2.0.2", "scipy": "1.13.1", "pydicom": "2.4.4", "pillow": "11.2.1",
             "requests": "2.32.3"},
}

#: Download size (MB) of the dependencies the pinned packages pull in that a fresh Slicer lacks
#: (tokenizers, hf-xet, fonttools, kernels, pydantic, ...). Measured with
#: ``scripts/check_dependency_resolution.py --sizes`` (Python 3.12): the whole set downloads
#: 66 MB on Windows, 67 MB on macOS arm64, 88 MB on Linux (larger manylinux wheels).
SUPPORT_PACKAGES_MB = 35
#: What the PyTorch extension downloads, by build (CPU wheel ~130 MB; CUDA builds ~2.5 GB).
TORCH_DOWNLOAD_TEXT = "0.1-3 GB, depending on the GPU"


@dataclass(frozen=True)
class Package:
    """One package of the set: its distribution name, the pinned (tested) version, the oldest
    version that is still accepted when already installed, why it is needed and its wheel's
    download size (MB, the largest of the supported platforms)."""

    name: str
    pinned: str
    minimum: str
    purpose: str
    download_mb: float

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.pinned}"


#: The pinned, tested set (the versions of the project's test environment), install order.
SLICER_REQUIREMENTS: tuple[Package, ...] = (
    Package("safetensors", "0.8.0", "0.4", "model weights", 0.4),
    Package("huggingface_hub", "2.4.0", "0.23", "model downloads", 0.9),
    Package("diffusers", "0.42.1", "0.30", "the LCTfound diffusion model", 6.4),
    Package("transformers", "5.25.0", "4.40", "the condition encoder", 13.8),
    Package("accelerate", "1.16.0", "0.30", "training", 0.4),
    Package("monai", "1.6.1", "1.4", "segmentation heads and CT-FM", 1.7),
    Package("torchmetrics", "1.9.0", "1.3", "image metrics", 1.0),
    Package("scikit-image", "0.26.0", "0.22", "image filters and metrics", 14.7),
    Package("matplotlib", "3.11.2", "3.7", "training loss curves", 10.8),
    Package("tqdm", "4.70.1", "4.60", "progress reports", 0.1),
    Package("psutil", "7.2.2", "5.9", "cancelling jobs", 0.1),
)

#: What a Slicer that runs its jobs on a department server (`lctfound serve`) needs: the thin client
#: (`lctfound.remote`) talks HTTP and compresses volumes; no torch, no diffusers (numpy is Slicer's).
CLIENT_REQUIREMENTS: tuple[Package, ...] = (
    Package("httpx", "0.29.0", "0.27", "talking to the server", 0.2),
    Package("zstandard", "0.25.0", "0.22", "compressing volumes for the server", 5.6),
)
#: Download (MB) of what httpx pulls in that a fresh Slicer lacks (httpcore, h11, anyio, sniffio).
CLIENT_SUPPORT_MB = 1

VersionOf = Callable[[str], Optional[str]]


def installed_version(name: str) -> Optional[str]:
    """The installed version of distribution ``name`` (from its metadata), or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _release(version: str) -> tuple[int, ...]:
    """The release numbers of a version ("2.8.0+cu128" -> (2, 8, 0)), for >= comparisons."""
    numbers = []
    for part in re.split(r"[.+!-]", version):
        match = re.match(r"\d+", part)
        if not match:
            break
        numbers.append(int(match.group()))
        if match.group() != part:
            break
    return tuple(numbers)


def at_least(version: str, minimum: str) -> bool:
    """Whether ``version`` is ``minimum`` or later (release numbers; pre-releases count as it)."""
    installed, floor = _release(version), _release(minimum)
    width = max(len(installed), len(floor))
    return installed + (0,) * (width - len(installed)) >= floor + (0,) * (width - len(floor))


def platform_problem(python: Sequence[int] = tuple(sys.version_info[:2]), system: str = sys.platform,
                     machine: str = platform.machine()) -> str:
    """Why the set cannot be installed here (empty when it can)."""
    if tuple(python[:2]) < MINIMUM_PYTHON:
        return (f"LCTfound needs 3D Slicer {MINIMUM_SLICER_VERSION} or later (Python "
                f"{'.'.join(map(str, MINIMUM_PYTHON))}+); this Slicer runs Python {'.'.join(map(str, python[:2]))}. "
                "Install a newer Slicer from download.slicer.org.")
    if system == "darwin" and machine.lower() in ("x86_64", "amd64", "i386"):
        return ("LCTfound needs PyTorch 2.8 or later, which has no builds for Intel Macs; "
                "use a Mac with Apple silicon, Windows or Linux.")
    return ""


@dataclass(frozen=True)
class DependencyReport:
    """What is installed and what is missing, read from package metadata."""

    torch_version: Optional[str]
    #: name -> installed version (None: not installed) of every package of the set.
    versions: Mapping[str, Optional[str]]
    #: Packages to install with pip: missing or older than their floor.
    to_install: tuple[Package, ...]
    #: Why nothing can be installed on this Slicer/platform (empty when it can).
    problem: str = ""
    #: Versions of the protected packages that are installed (the constraints).
    protected: Mapping[str, str] = field(default_factory=dict)
    #: False for server mode: jobs run on a server and this computer needs only the thin client.
    needs_torch: bool = True

    @property
    def packages(self) -> tuple[Package, ...]:
        return SLICER_REQUIREMENTS if self.needs_torch else CLIENT_REQUIREMENTS

    @property
    def torch_ok(self) -> bool:
        if not self.needs_torch:
            return True
        return self.torch_version is not None and at_least(self.torch_version, TORCH_REQUIREMENT.lstrip(">="))

    @property
    def complete(self) -> bool:
        return not self.problem and self.torch_ok and not self.to_install

    @property
    def support_mb(self) -> int:
        return SUPPORT_PACKAGES_MB if self.needs_torch else CLIENT_SUPPORT_MB

    @property
    def download_mb(self) -> int:
        """Estimated pip download (MB), without torch."""
        if not self.to_install:
            return 0
        return math.ceil(sum(package.download_mb for package in self.to_install) + self.support_mb)

    def missing_text(self) -> str:
        """One line naming what is missing (for an error message)."""
        parts = []
        if not self.torch_ok:
            parts.append(f"torch{TORCH_REQUIREMENT}" + (f" (installed: {self.torch_version})" if self.torch_version else ""))
        parts += [package.name for package in self.to_install]
        return ", ".join(parts)

    def install_lines(self) -> list[str]:
        """One line per thing to install, for the confirmation dialog."""
        lines = []
        if not self.torch_ok:
            now = f", replacing {self.torch_version}" if self.torch_version else ""
            lines.append(f"PyTorch {TORCH_REQUIREMENT} through the PyTorch extension ({TORCH_DOWNLOAD_TEXT}{now})")
        for package in self.to_install:
            now = self.versions.get(package.name)
            change = f", replacing {now}" if now else ""
            lines.append(f"{package.name} {package.pinned} ({package.purpose}{change})")
        if self.to_install:
            lines.append(f"and the packages these need (about {self.support_mb} MB)")
        return lines

    def version_lines(self) -> list[str]:
        """``name: version`` of torch, the set and the protected packages (the check button)."""
        lines = [f"torch: {self.torch_version or 'not installed'} (needs {TORCH_REQUIREMENT})" if self.needs_torch
                 else f"torch: {self.torch_version or 'not installed'} (not needed: jobs run on the server)"]
        for package in self.packages:
            version = self.versions.get(package.name)
            state = "not installed" if version is None else version
            if version is not None and not at_least(version, package.minimum):
                state += f" (too old, needs {package.minimum}+)"
            lines.append(f"{package.name}: {state}")
        lines += [f"{name}: {version} (kept)" for name, version in sorted(self.protected.items()) if name != "torch"]
        return lines


def check(version_of: VersionOf = installed_version, problem: Optional[str] = None,
          server: bool = False) -> DependencyReport:
    """What of `SLICER_REQUIREMENTS` and torch is installed (metadata only, nothing imported);
    ``server``: what running jobs on a server needs instead (`CLIENT_REQUIREMENTS`, no torch)."""
    packages = CLIENT_REQUIREMENTS if server else SLICER_REQUIREMENTS
    versions = {package.name: version_of(package.name) for package in packages}
    to_install = tuple(package for package in packages
                       if versions[package.name] is None or not at_least(versions[package.name], package.minimum))
    protected = {name: version for name in PROTECTED_PACKAGES for version in [version_of(name)] if version}
    return DependencyReport(torch_version=version_of("torch"), versions=versions, to_install=to_install,
                            problem=platform_problem() if problem is None else problem, protected=protected,
                            needs_torch=not server)


def constraints_text(protected: Mapping[str, str]) -> str:
    """The pip constraints file: every protected package pinned to its running version."""
    header = "# Written by LCTfound: keep the packages Slicer and the PyTorch extension installed.\n"
    return header + "".join(f"{name}=={version}\n" for name, version in sorted(protected.items(), key=lambda item: item[0].lower()))


def pip_arguments(packages: Iterable[Package], constraints_file: Path) -> list[str]:
    """The arguments after ``pip install`` (what ``slicer.util.pip_install`` takes as a list)."""
    return ["--only-binary", ":all:", "--constraint", str(constraints_file),
            *(package.requirement for package in packages)]


def write_constraints(protected: Mapping[str, str], folder: Path) -> Path:
    """Write the constraints file into ``folder`` (atomically) and return its path."""
    from ..atomic import atomic_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "slicer-constraints.txt"
    with atomic_file(path) as temporary:
        temporary.write_text(constraints_text(protected), encoding="utf-8")
    return path

"""Two real chest CT volumes with lesion labels, fetched offline-mirror style from a package index.

Provenance, as far as it is known: the files ship in the source distribution of
``pyradiomics==3.0.1`` (PyPI, BSD-3-Clause, Copyright 2017 Harvard Medical School) as test
data under ``data/``. The package does not document where the images come from; they are
de-identified research test images and this module claims no dataset origin for them. Its
licence text is stored beside the data as ``pyradiomics-LICENSE.txt``. The data are only in
the sdist (the wheels do not contain them).

==========  ===========  =====================  ==============  ==================
sample      size (i,j,k)  spacing (mm)          HU min..max     label voxels (=1)
==========  ===========  =====================  ==============  ==================
``lung1``   512×512×48   0.5703125² × 5.0       −1024..3071     837 (slices 32–34)
``lung2``   512×512×61   0.6269531² × 5.0       −1024..1671     24 644 (15–25)
==========  ===========  =====================  ==============  ==================

`fetch_sample` downloads the sdist with pip (so pip's index, mirror, proxy and certificate
settings apply), checks its pinned sha256, extracts only the four NRRD files and the licence
(exact member names, regular files only, each checked against its pinned sha256 before it
is published atomically) into `lctfound.paths.sample_data_dir` (``$LCTFOUND_CACHE_DIR``
is respected). When the files are already there with the right checksums nothing is
downloaded.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

from .. import paths
from ..atomic import atomic_file
from ..errors import InputError, LCTfoundError
from ..hashing import sha256_file
from ..progress import Progress, ensure_progress
from .volume import CTVolume, read_volume

SDIST_REQUIREMENT = "pyradiomics==3.0.1"
SDIST_NAME = "pyradiomics-3.0.1.tar.gz"
SDIST_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
SDIST_SIZE = 34_473_030
_MEMBER_ROOT = "pyradiomics-3.0.1/"


class _PinnedFile(NamedTuple):
    member: str  # path inside the sdist, below _MEMBER_ROOT
    sha256: str
    size: int


# Stored name -> where it is in the sdist and what it must hash to.
SAMPLE_FILES: dict[str, _PinnedFile] = {
    "lung1_image.nrrd": _PinnedFile(
        "data/lung1_image.nrrd", "379fa48bf34cfa961e6f5ec19c0c38757a30b9aa884212ef28dc29b5061c64ed", 12_548_518
    ),
    "lung1_label.nrrd": _PinnedFile(
        "data/lung1_label.nrrd", "e9d9a88054d7bc1d3034193ff907ce6b8c6ba28a7bc3a16f23728982d1b6b50a", 24_999
    ),
    "lung2_image.nrrd": _PinnedFile(
        "data/lung2_image.nrrd", "aa2b94eec79127ed786798ac8dc3c013010e1692d5787bebfae1a1e9685a4651", 17_817_709
    ),
    "lung2_label.nrrd": _PinnedFile(
        "data/lung2_label.nrrd", "cef52738dc51aab69a48fe30639da956d2b911b1c2920439c091fab84727657a", 33_427
    ),
    "pyradiomics-LICENSE.txt": _PinnedFile(
        "LICENSE.txt", "5c1fc504fb0865a72a29e035b25ef3513e6d7e9c7169cb445eae855f03b006e2", 1_467
    ),
}

SAMPLE_NAMES = ("lung1", "lung2")

PROVENANCE = """\
LCTfound sample data
====================
lung1_image.nrrd, lung1_label.nrrd, lung2_image.nrrd, lung2_label.nrrd were extracted
unchanged from data/ in the source distribution pyradiomics-3.0.1.tar.gz
(sha256 {sdist_sha}) of the pyradiomics package (BSD-3-Clause, Copyright 2017 Harvard
Medical School; licence in pyradiomics-LICENSE.txt). The package does not document the
origin of these images: treat them as de-identified research test images of unknown source.
Images: CT in HU (int16, LPS); labels: 1 = lesion, 0 = background.
"""


@dataclass(frozen=True)
class SampleInfo:
    """What one sample is expected to look like (checked by the tests)."""

    image: str
    label: str
    size_ijk: tuple[int, int, int]
    spacing: tuple[float, float, float]
    hu_range: tuple[int, int]
    label_voxels: int


SAMPLES: dict[str, SampleInfo] = {
    "lung1": SampleInfo("lung1_image.nrrd", "lung1_label.nrrd", (512, 512, 48), (0.5703125, 0.5703125, 5.0), (-1024, 3071), 837),
    "lung2": SampleInfo("lung2_image.nrrd", "lung2_label.nrrd", (512, 512, 61), (0.6269531, 0.6269531, 5.0), (-1024, 1671), 24_644),
}


@dataclass(frozen=True)
class SampleData:
    """The fetched sample files: ``folder`` and the path of every stored file by name."""

    folder: Path
    files: dict[str, Path]

    def image(self, name: str) -> Path:
        return self.files[_info(name).image]

    def label(self, name: str) -> Path:
        return self.files[_info(name).label]

    def paths(self, name: str) -> tuple[Path, Path]:
        """(image, label) paths of sample ``name`` ("lung1" or "lung2")."""
        return self.image(name), self.label(name)


def _info(name: str) -> SampleInfo:
    try:
        return SAMPLES[name]
    except KeyError:
        raise InputError(f"unknown sample {name!r}; choose one of {', '.join(SAMPLE_NAMES)}") from None


def _file_ok(path: Path, pinned: _PinnedFile) -> bool:
    try:
        if path.stat().st_size != pinned.size:
            return False
    except OSError:
        return False
    return sha256_file(path) == pinned.sha256


def verify_sample(folder: Optional[Path] = None) -> list[str]:
    """Names of the stored sample files that are missing or fail their checksum (empty: all good)."""
    folder = Path(folder) if folder is not None else paths.sample_data_dir()
    return [name for name, pinned in SAMPLE_FILES.items() if not _file_ok(folder / name, pinned)]


def fetch_sample(force: bool = False, progress: Optional[Progress] = None) -> SampleData:
    """Make sure the sample files are in `paths.sample_data_dir`; download them if needed.

    With the files present and their checksums valid (and ``force`` False) nothing is
    downloaded. Otherwise pip downloads the pinned pyradiomics sdist into a temporary
    folder, its sha256 is checked, and the missing or damaged files are extracted and
    published atomically. Network or index problems raise `LCTfoundError`; a cancel
    through ``progress`` raises `Cancelled` and publishes nothing new.
    """
    progress = ensure_progress(progress)
    folder = paths.sample_data_dir()
    needed = list(SAMPLE_FILES) if force else verify_sample(folder)
    total = 2 + len(needed)
    if needed:
        folder.mkdir(parents=True, exist_ok=True)
        progress.check_cancelled()
        # The sdist goes beside the sample folder (same file system, never inside it).
        with tempfile.TemporaryDirectory(prefix=".sample-download-", dir=folder.parent) as tmp:
            progress.update(0, total, f"downloading {SDIST_NAME} ({SDIST_SIZE / 1e6:.1f} MB)")
            sdist = download_sdist(Path(tmp), progress)
            progress.update(1, total, "checking the download")
            _check_sdist(sdist)
            progress.update(2, total, "extracting")
            _extract(sdist, folder, needed, progress, total)
        _write_provenance(folder)
    progress.update(total, total, "sample data ready")
    return SampleData(folder, {name: folder / name for name in SAMPLE_FILES})


def sample_paths(name: str = "lung1", fetch: bool = True, progress: Optional[Progress] = None) -> tuple[Path, Path]:
    """(image, label) paths of sample ``name``, fetching the data first unless ``fetch`` is False."""
    _info(name)
    if fetch:
        return fetch_sample(progress=progress).paths(name)
    folder = paths.sample_data_dir()
    info = _info(name)
    return folder / info.image, folder / info.label


def load_sample(name: str = "lung1", progress: Optional[Progress] = None) -> tuple[CTVolume, CTVolume]:
    """(image, label) volumes of sample ``name`` ("lung1" or "lung2"), fetching if needed."""
    image_path, label_path = sample_paths(name, fetch=True, progress=progress)
    image = read_volume(image_path)
    label = read_volume(label_path, labels=True)
    image.metadata["sample"] = label.metadata["sample"] = name
    return image, label


# --------------------------------------------------------------------------------------------
# Download
# --------------------------------------------------------------------------------------------

_LINK = re.compile(r"((?:https?|file)://[^\s#'\"]*/" + re.escape(SDIST_NAME) + r")(?:#sha256=([0-9a-f]{64}))?")


def _python_executable() -> str:
    """The Python that runs pip: this interpreter, or Slicer's PythonSlicer inside Slicer."""
    executable = sys.executable or ""
    if executable and Path(executable).name.lower().startswith("python"):
        return executable
    return shutil.which("PythonSlicer") or executable or "python3"


def _pip_command(directory: Path, isolated: bool) -> list[str]:
    command = [_python_executable(), "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    if not isolated:
        command.append("--no-build-isolation")
    return command + ["-vv", SDIST_REQUIREMENT, "-d", str(directory)]


def _run(command: list[str], log_path: Path, progress: Progress) -> int:
    """Run ``command`` with its output in ``log_path``, stopping it if the user cancels."""
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1", PYTHONIOENCODING="utf-8")
    with open(log_path, "wb") as log:
        try:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        except OSError as error:
            raise LCTfoundError(f"cannot run pip ({command[0]}): {error}") from None
        try:
            while process.poll() is None:
                if progress.cancel_token.cancelled:
                    process.terminate()
                    try:
                        process.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        process.kill()
                    progress.check_cancelled()
                time.sleep(0.1)
        except BaseException:
            if process.poll() is None:
                process.kill()
                process.wait()
            raise
    return process.returncode


def _last_error_line(log: str) -> str:
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ERROR:"):
            return line[len("ERROR:") :].strip()
    return lines[-1] if lines else "no output"


def find_sdist_link(log: str) -> Optional[str]:
    """The sdist URL pip found in its (``-vv``) log, preferring one that carries the pinned hash."""
    links = _LINK.findall(log)
    for url, digest in links:
        if digest == SDIST_SHA256:
            return url
    for url, digest in links:
        if not digest:
            return url
    return None


def download_sdist(directory: Path, progress: Optional[Progress] = None) -> Path:
    """Download the pinned sdist into ``directory`` and return its path.

    1. ``pip download --no-deps --no-binary :all: --no-build-isolation`` (pip prepares the
       sdist's metadata with the packages already installed: numpy and setuptools);
    2. if pip got the file but could not prepare its metadata, the URL it found (from its
       ``-vv`` log, which pip resolved through its own index settings) is fetched directly;
    3. otherwise ``pip download`` with build isolation (pip fetches the build requirements).
    """
    progress = ensure_progress(progress)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / SDIST_NAME
    errors = []
    for isolated in (False, True):
        log_path = directory / f"pip-{'isolated' if isolated else 'plain'}.log"
        code = _run(_pip_command(directory, isolated), log_path, progress)
        if code == 0 and target.is_file():
            return target
        log = log_path.read_text(errors="replace")
        errors.append(_last_error_line(log))
        link = find_sdist_link(log)
        if link:
            try:
                return download_url(link, target, progress)
            except LCTfoundError as error:
                errors.append(str(error))
    raise LCTfoundError(
        f"could not download {SDIST_REQUIREMENT} from the package index: {'; '.join(dict.fromkeys(errors))}"
    )


def _ssl_context():
    import ssl

    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or os.environ.get("REQUESTS_CA_BUNDLE")
    if cafile and os.path.isfile(cafile):
        return ssl.create_default_context(cafile=cafile)
    return ssl.create_default_context()


def download_url(url: str, target: Path, progress: Optional[Progress] = None) -> Path:
    """Fetch ``url`` (http, https or file) to ``target``; the caller checks the hash."""
    import urllib.error
    import urllib.request

    progress = ensure_progress(progress)
    if not url.startswith(("https://", "http://", "file://")):
        raise LCTfoundError(f"refusing to download {url!r}: unsupported scheme")
    try:
        with urllib.request.urlopen(url, timeout=180, context=_ssl_context()) as response, open(target, "wb") as out:
            done = 0
            while block := response.read(1 << 20):
                out.write(block)
                done += len(block)
                progress.check_cancelled()
                if done > 2 * SDIST_SIZE:
                    raise LCTfoundError(f"{url}: larger than the expected {SDIST_SIZE} bytes")
    except (urllib.error.URLError, OSError) as error:
        raise LCTfoundError(f"cannot download {url}: {getattr(error, 'reason', error)}") from None
    return target


def _check_sdist(sdist: Path) -> None:
    digest = sha256_file(sdist)
    if digest != SDIST_SHA256:
        raise LCTfoundError(
            f"{sdist.name}: sha256 {digest} differs from the pinned {SDIST_SHA256}; "
            "the package index served a different file, refusing to use it"
        )


def _extract(sdist: Path, folder: Path, names: list[str], progress: Progress, total: int) -> None:
    """Copy the wanted members, by exact name and only if they are regular files, out of the sdist.

    Nothing in the archive decides where a file goes: targets are ``folder / name`` for our
    own fixed names, so path traversal, links and devices in the archive cannot do harm.
    """
    wanted = {_MEMBER_ROOT + SAMPLE_FILES[name].member: name for name in names}
    done = 2
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive:
            name = wanted.pop(member.name, None)
            if name is None:
                continue
            pinned = SAMPLE_FILES[name]
            if not member.isfile() or member.size != pinned.size:
                raise LCTfoundError(f"{sdist.name}: {member.name} is not the expected regular file of {pinned.size} bytes")
            progress.check_cancelled()
            source = archive.extractfile(member)
            with atomic_file(folder / name) as tmp:
                digest = hashlib.sha256()
                with open(tmp, "wb") as out:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        out.write(block)
                if digest.hexdigest() != pinned.sha256:
                    raise LCTfoundError(f"{sdist.name}: {member.name} has sha256 {digest.hexdigest()}, expected {pinned.sha256}")
                os.chmod(tmp, 0o644)  # a shared cache: readable by every user
            done += 1
            progress.update(done, total, f"extracted {name}")
            if not wanted:
                break
    if wanted:
        raise LCTfoundError(f"{sdist.name}: does not contain {', '.join(sorted(wanted))}")


def _write_provenance(folder: Path) -> None:
    with atomic_file(folder / "README.txt") as tmp:
        tmp.write_text(PROVENANCE.format(sdist_sha=SDIST_SHA256))
        os.chmod(tmp, 0o644)


__all__ = [
    "SAMPLES",
    "SAMPLE_FILES",
    "SAMPLE_NAMES",
    "SampleData",
    "SampleInfo",
    "download_sdist",
    "download_url",
    "fetch_sample",
    "find_sdist_link",
    "load_sample",
    "sample_paths",
    "sha256_file",
    "verify_sample",
]

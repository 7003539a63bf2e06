"""The feature cache's bookkeeping: its size limit, least-recently-used eviction, entry locks
and checksums.

The cache (``<cache root>/features``, see `paths.feature_cache_dir`) holds one folder per
(volume, model, feature recipe) written by `pipelines.segmentation.FeatureCache` (one file per
stored slice and an index), and one
``.safetensors`` file per scan embedding under ``ctfm/`` (`ctfm.probe.EmbeddingCache`). Both
store checksums of what they hold and recompute anything that does not match, so a truncated,
zeroed or half-written entry is never used.

The cache's total size stays under a limit (`DEFAULT_LIMIT`, or ``$LCTFOUND_FEATURE_CACHE_LIMIT``
such as ``500MB``, ``8GB``; ``0`` keeps nothing on disk). Before new files are written, the
least recently used entries are removed until they fit; an entry that a process has open holds a
shared lock (`EntryLock`) and is never removed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .errors import LCTfoundError
from .paths import feature_cache_dir

logger = logging.getLogger(__name__)

LIMIT_ENV = "LCTFOUND_FEATURE_CACHE_LIMIT"
DEFAULT_LIMIT = 4 * 2**30
#: Entry sub-folder of the CT-FM embedding cache (its entries are the files inside).
EMBEDDINGS_FOLDER = "ctfm"
LOCK_NAME = ".lock"
#: Without advisory locks (Windows), an entry used this recently counts as in use.
RECENT_USE_S = 3600.0
_SIZE_UNITS = {"TB": 2**40, "GB": 2**30, "MB": 2**20, "KB": 2**10, "T": 2**40, "G": 2**30, "M": 2**20, "K": 2**10,
               "B": 1}

try:  # POSIX advisory locks; absent on Windows
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def parse_size(text: str) -> int:
    """``"500MB"``, ``"4GB"``, ``"4G"``, ``"1024"`` → bytes; `LCTfoundError` for anything else."""
    cleaned = str(text).strip().upper().replace(" ", "")
    number, factor = cleaned, 1
    for unit, unit_factor in _SIZE_UNITS.items():
        if cleaned.endswith(unit):
            number, factor = cleaned[: -len(unit)], unit_factor
            break
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise LCTfoundError(f"cannot read size {text!r}; use e.g. 500MB or 4GB")
    return int(value * factor)


def cache_limit() -> int:
    """The feature cache's size limit in bytes (``$LCTFOUND_FEATURE_CACHE_LIMIT`` or `DEFAULT_LIMIT`)."""
    text = os.environ.get(LIMIT_ENV, "").strip()
    if not text:
        return DEFAULT_LIMIT
    try:
        return parse_size(text)
    except LCTfoundError:
        raise LCTfoundError(f"{LIMIT_ENV}={text!r}: not a size; use e.g. 500MB or 4GB (0 keeps no features "
                            "on disk)") from None


def slice_digest(data) -> str:
    """A fast checksum (BLAKE2b, 128 bits) of an array's bytes."""
    import numpy as np

    return hashlib.blake2b(np.ascontiguousarray(data).view("uint8").reshape(-1), digest_size=16).hexdigest()


def disk_bytes(path: Path) -> int:
    """Bytes ``path`` (a file, or a folder with everything in it) takes on disk."""
    def one(stat: os.stat_result) -> int:
        blocks = getattr(stat, "st_blocks", None)
        return max(stat.st_size, blocks * 512) if blocks is not None else stat.st_size

    try:
        if path.is_file():
            return one(path.stat())
        total = 0
        for folder, _, files in os.walk(path):
            for name in files:
                try:
                    total += one(os.stat(os.path.join(folder, name)))
                except OSError:
                    pass
        return total
    except OSError:
        return 0


@dataclass
class CacheEntry:
    path: Path
    size: int
    last_used: float


def entries(root: Optional[Path] = None) -> list[CacheEntry]:
    """The cache's entries (feature folders and embedding files), least recently used first."""
    root = Path(root) if root is not None else feature_cache_dir()
    found: list[CacheEntry] = []
    if not root.is_dir():
        return found
    candidates: list[Path] = []
    for child in root.iterdir():
        if child.name == EMBEDDINGS_FOLDER and child.is_dir():
            candidates += [f for f in child.iterdir() if f.is_file() and not f.name.startswith(".")]
        elif child.is_dir() and not child.name.startswith("."):
            candidates.append(child)
    for path in candidates:
        try:
            last_used = path.stat().st_mtime
        except OSError:
            continue
        found.append(CacheEntry(path, disk_bytes(path), last_used))
    return sorted(found, key=lambda entry: entry.last_used)


def mark_used(path: Path) -> None:
    """Record a use of an entry (its mtime is the LRU clock)."""
    try:
        os.utime(path)
    except OSError:
        pass


class EntryLock:
    """A shared lock on a cache entry folder while it is in use; `try_exclusive` is how eviction
    asks whether anyone holds one."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        if self._fd is not None or fcntl is None:
            return
        fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass


def _remove_if_unused(entry: CacheEntry) -> bool:
    """Remove an entry unless some process has it open; True when removed."""
    path = entry.path
    if path.is_file():  # embedding files are written atomically and read in one go
        try:
            path.unlink()
            return True
        except OSError:
            return False
    if fcntl is None:  # pragma: no cover - Windows: recently used entries may be in use
        if time.time() - entry.last_used < RECENT_USE_S:
            return False
        shutil.rmtree(path, ignore_errors=True)
        return not path.exists()
    lock = path / LOCK_NAME
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # in use
        # Renamed aside first, so no process opens a half-removed entry.
        aside = path.with_name(f".{path.name}.removing")
        try:
            os.replace(path, aside)
        except OSError:
            return False
        shutil.rmtree(aside, ignore_errors=True)
        return True
    finally:
        os.close(fd)


def remove_unused_entry(folder: Path) -> bool:
    """Remove an entry folder unless some process has it open (an entry its user left empty)."""
    return _remove_if_unused(CacheEntry(Path(folder), 0, 0.0))


def make_room(needed: int, root: Optional[Path] = None, keep: Iterable[Path] = ()) -> bool:
    """Remove least recently used entries until ``needed`` more bytes fit under the limit.

    Entries in use and those in ``keep`` stay. Returns False when the new entry cannot fit (it
    is larger than the limit, or what is left is in use): the caller then keeps it in memory.
    """
    limit = cache_limit()
    if needed > limit:
        return False
    keep = {Path(p).resolve() for p in keep}
    current = entries(root)
    total = sum(entry.size for entry in current)
    for entry in current:
        if total + needed <= limit:
            break
        if entry.path.resolve() in keep:
            continue
        if _remove_if_unused(entry):
            logger.info("feature cache: removed the least recently used entry %s (%d bytes)", entry.path.name,
                        entry.size)
            total -= entry.size
    return total + needed <= limit


@dataclass
class CacheUsage:
    root: Path
    size: int
    limit: int
    entries: int


def usage(root: Optional[Path] = None) -> CacheUsage:
    """Location, size, limit and number of entries (for `lctfound doctor`)."""
    root = Path(root) if root is not None else feature_cache_dir()
    found = entries(root)
    return CacheUsage(root, sum(entry.size for entry in found), cache_limit(), len(found))

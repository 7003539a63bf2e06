"""Checksums of files and of collections of files (model folders, data sets, downloads)."""

from __future__ import annotations

import hashlib
import os
from typing import Sequence


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fingerprint(entries: Sequence[tuple[str, str]]) -> str:
    """A stable sha256 over (name, sha256) pairs, e.g. a training set's files."""
    digest = hashlib.sha256()
    for name, checksum in sorted(entries):
        digest.update(f"{name}\0{checksum}\n".encode())
    return digest.hexdigest()

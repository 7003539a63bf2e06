"""Helpers for tests that feed LCTfound bad inputs and faults (full disks, read-only folders,
outputs that are inputs) and check that nothing is lost and the user gets one line.

Every bad-input case asserts the same things; use them together::

    before = snapshot(ct_path, model_folder)          # inputs, byte for byte
    code, out, err = run_cli([...])                   # the conftest fixture (in-process)
    assert_one_line_error(code, err)                  # exit 2, one `error:` line, no traceback
    assert_unchanged(before)                          # every input byte-identical
    assert_no_partial_outputs(output_folder)          # no temporaries, no half-written file

Full-disk cases use `small_tmpfs` (a real tmpfs mounted for the test; skipped unless the tests
run as root) and `fill_disk`; `enospc` injects the error where a mount is not possible.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import pytest

PathLike = Union[str, os.PathLike]

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- inputs unchanged


def _files(path: Path) -> Iterable[Path]:
    if path.is_dir():
        yield from sorted(p for p in path.rglob("*") if p.is_file())
    elif path.exists():
        yield path


def snapshot(*paths: PathLike) -> dict[str, Optional[str]]:
    """sha256 of every file under ``paths`` (files or folders); a missing path maps to None."""
    digest: dict[str, Optional[str]] = {}
    for item in paths:
        item = Path(item)
        if not item.exists():
            digest[str(item)] = None
        for file in _files(item):
            digest[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    return digest


def assert_unchanged(before: dict[str, Optional[str]]) -> None:
    """Every file of a `snapshot` still exists with the same bytes (and missing ones are still missing)."""
    for name, digest in before.items():
        path = Path(name)
        if digest is None:
            assert not path.exists(), f"{name} appeared"
            continue
        assert path.is_file(), f"input {name} was removed"
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, f"input {name} was changed"


# ---------------------------------------------------------------------------- what the user sees


def assert_one_line_error(code: int, err: str, exit_code: int = 2, contains: Optional[str] = None) -> str:
    """Exit ``exit_code``, exactly one line on stderr, starting ``error:``, no traceback. Returns the line."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code, f"exit code {code}, expected {exit_code}; stderr: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {err}"
    assert lines[0].startswith("error:"), lines[0]
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------- outputs


def temporaries(folder: PathLike) -> list[Path]:
    """Temporaries of `lctfound.atomic` (``.<name>.XXXX.tmp*``, ``.old``) and write probes under ``folder``."""
    folder = Path(folder)
    if not folder.exists():
        return []
    return [p for p in folder.rglob(".*")
            if ".tmp" in p.name or p.name.endswith(".old") or p.name.startswith(".lctfound-write-check.")]


def assert_no_partial_outputs(folder: PathLike, allowed: Sequence[PathLike] = ()) -> None:
    """No temporaries under ``folder`` and no file other than ``allowed`` (the inputs that were there)."""
    folder = Path(folder)
    assert not temporaries(folder), f"temporaries left: {temporaries(folder)}"
    allowed_set = {Path(p).resolve() for p in allowed}
    extra = [p for p in _files(folder) if p.resolve() not in allowed_set
             and not any(parent in allowed_set for parent in p.resolve().parents)]
    assert not extra, f"partial outputs left: {extra}"


# ---------------------------------------------------------------------------- full disks


def can_mount() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


@contextlib.contextmanager
def small_tmpfs(path: PathLike, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block (created if needed); skips the test
    unless it runs as root on Linux and the mount works."""
    path = Path(path)
    if not can_mount():
        pytest.skip("a small tmpfs needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only_mount(path: PathLike) -> Iterator[Path]:
    """A read-only tmpfs at ``path`` (refused writes even for root); skips unless root on Linux."""
    path = Path(path)
    if not can_mount():
        pytest.skip("a read-only mount needs root on Linux")
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill_disk(folder: PathLike, leave_bytes: int = 0) -> Path:
    """Fill the file system of ``folder`` with one filler file, leaving about ``leave_bytes`` free."""
    filler = Path(folder) / f"filler-{uuid.uuid4().hex[:8]}"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as handle:
        chunk = b"\0" * (1 << 16)
        remaining = max(0, free - leave_bytes)
        try:
            while remaining > 0:
                handle.write(chunk[:min(len(chunk), remaining)])
                remaining -= len(chunk)
            handle.flush()
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
    return filler


def enospc(*_args, **_kwargs):
    """A drop-in for any write function: raises ``OSError(ENOSPC)`` (monkeypatch it in)."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# ---------------------------------------------------------------------------- processes


def run_lctfound(args: Sequence[PathLike], env: Optional[dict] = None, shell_suffix: str = "",
                 timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m lctfound ARGS`` in a child process (for pipes and signals); ``shell_suffix`` such as
    ``"| head -1"`` runs it through bash with ``pipefail`` off, so ``returncode`` is lctfound's only
    when no suffix is given — use ``PIPESTATUS`` via the suffix otherwise."""
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    command = [sys.executable, "-m", "lctfound", *[str(a) for a in args]]
    if not shell_suffix:
        return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)
    import shlex

    line = " ".join(shlex.quote(c) for c in command) + f" {shell_suffix}; exit ${{PIPESTATUS[0]}}"
    return subprocess.run(["bash", "-c", line], env=environment, capture_output=True, text=True, timeout=timeout)

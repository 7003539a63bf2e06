"""Supported Pythons: the engine and the extension compile and import under each Python of pyenv
(3.9 = Slicer 5.8, 3.12 = Slicer 5.10/5.12, 3.13 = the next), and the pinned dependency set of the
Slicer installer resolves for every supported Python on Windows, macOS and Linux.

The import check runs ``scripts/check_python_compat.py`` with a bare pyenv interpreter (third-party
packages replaced by stand-ins for the import only); the resolution check runs
``scripts/check_dependency_resolution.py`` against PyPI (marked ``slow``: network, ~1 minute).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lctfound.compat import _strict_zip_fallback, strict_zip

REPO = Path(__file__).resolve().parents[1]
PYENV = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
#: The pyenv interpreters CI has (Slicer 5.8, Slicer 5.10/5.12, the next Python).
PYENV_VERSIONS = ("3.9.18", "3.12.1", "3.13.0")


def pyenv_python(version: str) -> Path:
    path = PYENV / version / "bin" / "python"
    if not path.is_file():
        pytest.skip(f"pyenv Python {version} is not installed at {path} (CI has it: pyenv install {version})")
    return path


@pytest.mark.parametrize("version", PYENV_VERSIONS)
def test_engine_and_extension_compile_and_import(version):
    python = pyenv_python(version)
    result = subprocess.run([str(python), "-I", "-B", str(REPO / "scripts" / "check_python_compat.py"), "--repo", str(REPO)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"Python {version}: compiled ")


def test_no_zip_strict_anywhere():
    """``zip(strict=...)`` needs Python 3.10 and only fails when the line runs: one AST scan here."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_python_compat
    finally:
        sys.path.remove(str(REPO / "scripts"))
    found = []
    for path in check_python_compat.python_files(REPO):
        relative = path.relative_to(REPO).as_posix()
        if relative not in check_python_compat.EXEMPT_FROM_KEYWORD_CHECK:
            found += [f"{relative}:{line}: {message}" for line, message in
                      check_python_compat.newer_keyword_calls(ast.parse(path.read_text(encoding="utf-8")))]
    assert found == []


def test_strict_zip_checks_lengths_on_every_python():
    for function in (strict_zip, _strict_zip_fallback):
        assert list(function([1, 2], "ab", (5, 6))) == [(1, "a", 5), (2, "b", 6)]
        with pytest.raises(ValueError):
            list(function([1, 2], "a"))
        with pytest.raises(ValueError):
            list(function([1], "ab"))
        assert list(function()) == []


@pytest.mark.slow
def test_pinned_set_resolves_for_every_supported_python_and_platform(tmp_path):
    """Needs network access to PyPI and uv (``pip install uv``; in the test extra)."""
    pytest.importorskip("uv", reason="uv is not installed (pip install uv)")
    report = tmp_path / "resolution.json"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "check_dependency_resolution.py"), "--json", str(report)],
                            capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode == 3:
        pytest.skip(f"PyPI is not reachable: {result.stdout.strip()[-300:]}")
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads(report.read_text())
    combos = {(item["python"], item["platform"]) for item in results if item["resolved"]}
    from lctfound.logic.dependencies import SUPPORTED_PYTHONS
    for python in SUPPORTED_PYTHONS:
        for platform in ("windows-x86_64", "macos-arm64", "linux-x86_64"):
            assert (python, platform) in combos

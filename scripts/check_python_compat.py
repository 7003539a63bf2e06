"""Compile every Python file of the project and import the engine and the Slicer extension with the
interpreter that runs this script (e.g. a bare pyenv Python 3.9 or 3.13), to catch syntax and
standard-library features that interpreter lacks.

Only the standard library is needed. Third-party packages (torch, numpy, monai, ..., and Slicer's
slicer/qt/ctk/vtk) are usually absent from such an interpreter; for this import check only, each
top-level package that cannot be found is replaced by a permissive stand-in (any attribute, call,
subscript or base class works). So this proves that our code compiles and that its import-time code
runs on this Python, not that the real packages work there (the dependency resolution check and
the test suite cover those).

Usage: python scripts/check_python_compat.py [--repo PATH]; prints one line per problem and exits 1
if there is any.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.abc
import importlib.machinery
import sys
import traceback
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMPILED_FOLDERS = ("lctfound", "LCTfoundSlicerLib", "LCTfoundSegmentation", "LCTfoundEnhance", "LCTfoundTrain",
                    "LCTfoundCTFM", "benchmarks", "scripts", "Testing")
MODULE_FOLDERS = ("LCTfoundSegmentation", "LCTfoundEnhance", "LCTfoundTrain", "LCTfoundCTFM")
SKIPPED_PARTS = {"__pycache__", ".venv", "node_modules"}
#: Optional standard-library modules that other platforms' code probes for: never stand-ins.
NOT_STUBBED = {"msvcrt", "winreg", "winsound", "nt", "org", "posix"}
#: The files that use newer keywords behind a version check.
EXEMPT_FROM_KEYWORD_CHECK = {"lctfound/compat.py", "scripts/check_python_compat.py"}
#: Keyword arguments of built-ins that newer Pythons added (a call only fails when it runs).
NEWER_KEYWORDS = {("zip", "strict"): "3.10 (use lctfound.compat.strict_zip)",
                  ("dataclass", "slots"): "3.10", ("dataclass", "kw_only"): "3.10"}


class _StubMeta(type):
    """A class that stands for anything: attributes, calls, subscripts and operators give stubs."""

    def __getattr__(cls, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return _stub(f"{cls.__name__}.{name}")

    def __call__(cls, *args, **kwargs):
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _StubMeta):
            return args[0]  # used as a decorator
        return cls

    def __getitem__(cls, item):
        return cls

    def __iter__(cls):
        return iter(())

    def __len__(cls):
        return 0

    def __bool__(cls):
        return False

    def __binary(cls, *args):
        return cls

    __or__ = __ror__ = __and__ = __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _StubMeta__binary
    __truediv__ = __rtruediv__ = __floordiv__ = __pow__ = __neg__ = __matmul__ = _StubMeta__binary
    __lt__ = __le__ = __gt__ = __ge__ = _StubMeta__binary


def _stub(name: str) -> type:
    return _StubMeta(name.rpartition(".")[2] or name, (), {"__module__": name.rpartition(".")[0] or name})


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        value = _stub(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class StubMissingPackages(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on sys.meta_path: a module no real finder found becomes a stand-in (and is recorded)."""

    def __init__(self, own_packages: set[str]) -> None:
        self.own_packages = own_packages
        self.stubbed: set[str] = set()

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.split(".")[0]
        if top in self.own_packages or top in NOT_STUBBED or top.startswith("_"):
            return None  # our own code must really import; the standard library's probes must fail
        self.stubbed.add(fullname.split(".")[0])
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


def newer_keyword_calls(tree, minimum=(3, 9)) -> list[tuple[int, str]]:
    """``(line, message)`` of calls that pass a keyword argument newer than ``minimum`` Python."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            for keyword in node.keywords:
                needs = NEWER_KEYWORDS.get((name, keyword.arg))
                if needs:
                    found.append((node.lineno, f"{name}({keyword.arg}=...) needs Python {needs}"))
    return found


def python_files(repo: Path) -> list[Path]:
    files = []
    for folder in COMPILED_FOLDERS:
        for path in sorted((repo / folder).rglob("*.py")):
            if not SKIPPED_PARTS.intersection(path.relative_to(repo).parts):
                files.append(path)
    return files


def engine_modules(repo: Path) -> list[str]:
    names = []
    for path in sorted((repo / "lctfound").rglob("*.py")):
        relative = path.relative_to(repo).with_suffix("")
        if SKIPPED_PARTS.intersection(relative.parts) or relative.name == "__main__":
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        names.append(".".join(parts))
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=REPO)
    args = parser.parse_args(argv)
    repo = args.repo.resolve()
    problems = []

    files = python_files(repo)
    for path in files:
        source = path.read_text(encoding="utf-8")
        try:
            compile(source, str(path), "exec", dont_inherit=True)
        except SyntaxError as error:
            problems.append(f"{path.relative_to(repo)}:{error.lineno}: does not compile: {error.msg}")
            continue
        if path.relative_to(repo).as_posix() not in EXEMPT_FROM_KEYWORD_CHECK:
            problems += [f"{path.relative_to(repo)}:{line}: {message}"
                         for line, message in newer_keyword_calls(ast.parse(source))]

    own = {"lctfound", "LCTfoundSlicerLib", *MODULE_FOLDERS}
    sys.path[:0] = [str(repo)] + [str(repo / folder) for folder in MODULE_FOLDERS]
    finder = StubMissingPackages(own)
    sys.meta_path.append(finder)
    modules = engine_modules(repo) + ["LCTfoundSlicerLib", "LCTfoundSlicerLib.dependencies"] + list(MODULE_FOLDERS)
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - report every module that fails, with its reason
            problems.append(f"import {name} failed: {traceback.format_exc(limit=-1).strip().splitlines()[-1]}"
                            f" ({traceback.format_exc(limit=-2).strip().splitlines()[-3].strip()})")

    try:  # the 3.9 stand-in for zip(strict=True) behaves like it
        from lctfound.compat import strict_zip

        assert list(strict_zip([1, 2], "ab")) == [(1, "a"), (2, "b")]
        try:
            list(strict_zip([1, 2], "a"))
            problems.append("lctfound.compat.strict_zip accepted iterables of different lengths")
        except ValueError:
            pass
    except Exception:  # noqa: BLE001
        problems.append(f"lctfound.compat.strict_zip failed: {traceback.format_exc().strip().splitlines()[-1]}")

    version = ".".join(map(str, sys.version_info[:3]))
    print(f"Python {version}: compiled {len(files)} files, imported {len(modules)} modules; "
          f"stand-ins for: {', '.join(sorted(finder.stubbed)) or 'none'}")
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

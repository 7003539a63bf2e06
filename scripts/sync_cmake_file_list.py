#!/usr/bin/env python3
"""Rewrite the file list in lctfound/CMakeLists.txt from the files on disk.

Slicer installs only the files a CMakeLists lists; Testing/test_extension_layout.py checks the
list, and this script is the quick way to bring it up to date after adding or removing files.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lctfound"
RESOURCE_SUFFIXES = (".json", ".safetensors", ".md")


def listing(suffixes: tuple[str, ...]) -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                  if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts)


def replace(text: str, variable: str, entries: list[str]) -> str:
    body = "".join(f"  {entry}\n" for entry in entries)
    pattern = re.compile(rf"set\({variable}\n.*?  \)", re.S)
    if not pattern.search(text):
        sys.exit(f"{variable} not found in lctfound/CMakeLists.txt")
    return pattern.sub(lambda _: f"set({variable}\n{body}  )", text)


def main() -> None:
    cmake = ROOT / "CMakeLists.txt"
    text = cmake.read_text()
    text = replace(text, "LCTFOUND_PYTHON_SCRIPTS", listing((".py",)))
    resources = [r for r in listing(RESOURCE_SUFFIXES)]
    text = replace(text, "LCTFOUND_PYTHON_RESOURCES", resources)
    cmake.write_text(text)
    print(f"updated {cmake}")


if __name__ == "__main__":
    main()

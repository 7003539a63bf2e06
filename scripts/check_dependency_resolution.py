"""Resolve the Slicer installer's pinned dependency set (`lctfound.logic.dependencies`) against PyPI for
every supported Python and platform, wheels only, with the Slicer release's bundled packages as
constraints, the way pip would resolve it inside that Slicer.

``uv pip compile --python-version X --python-platform P`` is used because it evaluates environment
markers for the target platform (``pip install --dry-run --platform`` only filters wheel tags and keeps
this machine's markers, so it would pull Linux-only CUDA packages for Windows) and reads package
metadata without downloading whole wheels.

Targets: `SUPPORTED_PYTHONS` x (Windows x86_64, macOS arm64, Linux x86_64) must resolve. With
``--unsupported`` it also tries what the extension does not support (Python 3.9 = Slicer 5.8 with its
bundled packages, Intel macOS) and reports the outcome without failing. ``--sizes`` adds the download
size of what the installer would fetch (PyPI's JSON simple API).

Exit codes: 0 every supported target resolves, 1 one does not, 3 PyPI is not reachable.
Usage: python scripts/check_dependency_resolution.py [--unsupported] [--sizes] [--json FILE]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lctfound.logic.dependencies import (  # noqa: E402
    PROTECTED_PACKAGES,
    SLICER_BUNDLED,
    SLICER_REQUIREMENTS,
    SUPPORTED_PYTHONS,
    TORCH_REQUIREMENT,
)

INDEX = "https://pypi.org/simple"
PLATFORMS = {
    "windows-x86_64": ("x86_64-pc-windows-msvc", r"win_amd64"),
    "macos-arm64": ("aarch64-apple-darwin", r"macosx_\d+_\d+_(arm64|universal2)"),
    "linux-x86_64": ("x86_64-unknown-linux-gnu", r"(manylinux|linux)\w*_x86_64"),
}
UNSUPPORTED_PLATFORMS = {"macos-x86_64": ("x86_64-apple-darwin", r"macosx_\d+_\d+_(x86_64|universal2|intel)")}
#: Slicer 5.8 (Python 3.9), for --unsupported: what it bundles (shared/slicer-python/README.md).
SLICER_58_BUNDLED = {"python": "3.9", "numpy": "1.26.4", "scipy": "1.13.1", "pydicom": "2.4.4", "pillow": "10.3.0",
                     "requests": "2.32.3"}
NETWORK_ERRORS = ("dns error", "failed to connect", "connection refused", "network unreachable", "timed out",
                  "failed to fetch")


def slicer_for(python: str) -> tuple[str, dict]:
    """The Slicer release that bundles ``python`` and its bundled packages ("" and {} if none yet)."""
    if python == SLICER_58_BUNDLED["python"]:
        return "5.8", {k: v for k, v in SLICER_58_BUNDLED.items() if k != "python"}
    for release, bundled in sorted(SLICER_BUNDLED.items()):
        if bundled["python"] == python:
            return release, {k: v for k, v in bundled.items() if k != "python"}
    return "", {}


def requirements() -> list[str]:
    return [f"torch{TORCH_REQUIREMENT}"] + [package.requirement for package in SLICER_REQUIREMENTS]


def resolve(python: str, platform: str, triple: str, folder: Path) -> dict:
    release, bundled = slicer_for(python)
    stem = folder / f"{python}-{platform}"
    (stem.with_suffix(".in")).write_text("\n".join(requirements()) + "\n", encoding="utf-8")
    command = [sys.executable, "-m", "uv", "pip", "compile", "--no-config", "--quiet", "--no-header",
               "--no-annotate", "--python-version", python, "--python-platform", triple, "--only-binary", ":all:",
               "--index-url", INDEX, str(stem.with_suffix(".in")), "-o", str(stem.with_suffix(".txt"))]
    if bundled:
        stem.with_suffix(".constraints").write_text("".join(f"{k}=={v}\n" for k, v in bundled.items()), encoding="utf-8")
        command[-2:-2] = ["--constraint", str(stem.with_suffix(".constraints"))]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    item = {"python": python, "platform": platform, "slicer": release, "resolved": result.returncode == 0,
            "packages": {}, "error": ""}
    if result.returncode == 0:
        for line in stem.with_suffix(".txt").read_text(encoding="utf-8").splitlines():
            match = re.match(r"^([A-Za-z0-9_.-]+)==([^\s;]+)", line)
            if match:
                item["packages"][match.group(1).lower()] = match.group(2)
    else:
        lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
        item["error"] = " ".join(lines)[:800]
    return item


def _wheel_size(name: str, version: str, platform_pattern: str, python: str) -> int:
    request = urllib.request.Request(f"{INDEX}/{name}/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    tag = "cp" + python.replace(".", "")
    best = 0
    for entry in files:
        parts = entry["filename"][:-4].split("-") if entry["filename"].endswith(".whl") else []
        if len(parts) < 5 or parts[1] != version:
            continue
        python_tag, abi, platform_tag = parts[-3], parts[-2], parts[-1]
        if platform_tag != "any" and not re.search(platform_pattern, platform_tag):
            continue
        if python_tag.startswith("py") or tag in python_tag or abi == "abi3":
            best = max(best, int(entry.get("size") or 0))
    return best


def download_sizes(item: dict, platform_pattern: str) -> dict:
    """MB the installer downloads (torch and Slicer's bundled packages excluded) and torch's wheel."""
    torch_family = {"torch", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock", "setuptools",
                    "typing-extensions", "triton"}
    skipped = {name.lower() for name in PROTECTED_PACKAGES} | torch_family
    sizes = {}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {name: pool.submit(_wheel_size, name, version, platform_pattern, item["python"])
                   for name, version in item["packages"].items() if not name.startswith("nvidia") and not name.startswith("cuda")}
        for name, future in futures.items():
            sizes[name] = future.result()
    return {"installer_mb": round(sum(v for k, v in sizes.items() if k not in skipped) / 1e6, 1),
            "torch_wheel_mb": round(sizes.get("torch", 0) / 1e6, 1),
            "largest": sorted(((k, round(v / 1e6, 1)) for k, v in sizes.items() if k not in skipped),
                              key=lambda kv: -kv[1])[:8]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unsupported", action="store_true", help="also try Python 3.9 (Slicer 5.8) and Intel macOS")
    parser.add_argument("--sizes", action="store_true", help="report download sizes (extra PyPI requests)")
    parser.add_argument("--json", type=Path, help="write the results to this file")
    args = parser.parse_args(argv)

    targets = [(python, platform, triple, True) for python in SUPPORTED_PYTHONS for platform, (triple, _) in PLATFORMS.items()]
    targets += [(python, platform, triple, True) for python in SUPPORTED_PYTHONS
                for platform, (triple, _) in UNSUPPORTED_PLATFORMS.items() if args.unsupported]
    if args.unsupported:
        targets += [(SLICER_58_BUNDLED["python"], platform, triple, False) for platform, (triple, _) in PLATFORMS.items()]
    with tempfile.TemporaryDirectory() as folder, concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [(supported and platform in PLATFORMS, pool.submit(resolve, python, platform, triple, Path(folder)))
                   for python, platform, triple, supported in targets]
        results = [(required, future.result()) for required, future in futures]

    failures = 0
    for required, item in results:
        if not item["resolved"] and required and any(word in item["error"].lower() for word in NETWORK_ERRORS):
            print(f"PyPI is not reachable: {item['error']}")
            return 3
    for required, item in results:
        where = f"Python {item['python']} {item['platform']}" + (f" (Slicer {item['slicer']} bundle)" if item["slicer"] else "")
        if item["resolved"]:
            key = {name: item["packages"].get(name) for name in ("torch", "numpy", "scipy", "diffusers", "monai")}
            line = f"OK    {where}: {len(item['packages'])} packages; " + ", ".join(f"{k} {v}" for k, v in key.items() if v)
            if args.sizes:
                pattern = {**PLATFORMS, **UNSUPPORTED_PLATFORMS}[item["platform"]][1]
                item["sizes"] = download_sizes(item, pattern)
                line += f"; installer download {item['sizes']['installer_mb']} MB, torch wheel {item['sizes']['torch_wheel_mb']} MB"
            print(line)
        else:
            failures += required
            print(f"{'FAIL' if required else 'NO  '}  {where}: {item['error']}")
    if args.json:
        args.json.write_text(json.dumps([item for _, item in results], indent=2), encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

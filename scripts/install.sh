#!/usr/bin/env bash
# Install LCTfound and everything its tests need into ./.venv (idempotent).
# torch is installed first, from the pinned local CPU build, so that no later resolution can
# pull a CUDA build or torchvision; the check at the end fails loudly if one slipped in.
# System packages for `lctfound web` and its browser tests (Debian/Ubuntu): chromium (the
# browser Playwright drives; `playwright install` is never run), libosmesa6-dev (offscreen
# rendering without a display) and libturbojpeg0 (fast view frames). They are installed with
# apt-get when missing (through sudo when not root); elsewhere a note says what is missing, and
# the browser tests skip unless LCTFOUND_REQUIRE_BROWSER=1 (CI) makes that a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
APT_PACKAGES=(chromium libosmesa6-dev libturbojpeg0)

install_system_packages() {
  if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: not a Debian-like system; install chromium and OSMesa yourself for lctfound web and its browser tests" >&2
    return 0
  fi
  local missing=()
  for package in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
  done
  [ "${#missing[@]}" -eq 0 ] && return 0
  local run=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      run=(sudo)
    else
      echo "note: cannot install ${missing[*]} (needs root or sudo); lctfound web and its browser tests need them" >&2
      return 0
    fi
  fi
  echo "installing system packages: ${missing[*]}"
  "${run[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${run[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_system_packages
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
# The tests run the very versions the Slicer installer pins (lctfound/logic/dependencies.py), whatever the
# package index offers newer: they go in as constraints.
.venv/bin/python - > .venv/pinned-constraints.txt <<'PY'
import importlib.util
import sys
spec = importlib.util.spec_from_file_location("dependencies", "lctfound/logic/dependencies.py")
module = sys.modules["dependencies"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
for package in module.SLICER_REQUIREMENTS + module.CLIENT_REQUIREMENTS:
    print(package.requirement)
PY
.venv/bin/python -m pip install --quiet -c .venv/pinned-constraints.txt -e ".[test,web]"
if .venv/bin/python -m pip list 2>/dev/null | grep -iE "^(torchvision|nvidia-)" ; then
  echo "error: torchvision or a CUDA package was installed; remove it (it drags a CUDA torch)" >&2
  exit 1
fi
.venv/bin/lctfound --version

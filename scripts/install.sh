#!/usr/bin/env bash
# Install LCTfound and everything its tests need into ./.venv (idempotent).
# torch is installed first, from the pinned local CPU build, so that no later resolution can
# pull a CUDA build or torchvision; the check at the end fails loudly if one slipped in.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[test]"
if .venv/bin/python -m pip list 2>/dev/null | grep -iE "^(torchvision|nvidia-)" ; then
  echo "error: torchvision or a CUDA package was installed; remove it (it drags a CUDA torch)" >&2
  exit 1
fi
.venv/bin/lctfound --version

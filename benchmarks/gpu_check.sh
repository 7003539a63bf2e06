#!/usr/bin/env bash
# One prepared GPU check (benchmarks/gpu_check.py): bf16 peak, official feature throughput and MFU at
# batch 1-64, a training step, CPU-vs-GPU agreement, the few-shot loop on the sample CT, peak memory.
# Everything lands in OUT (gpu_check.json, gpu_check.md, gpu_check.log). Finishes in <= 8 min on one
# H100/H200 (--budget-s 420 stops starting new stages).
#
#   bash benchmarks/gpu_check.sh OUT            # on a GPU machine
#   bash benchmarks/gpu_check.sh OUT --smoke    # the same code on the CPU, small sizes (tested in CI)
#
# A machine without the project's dependencies (diffusers, monai, SimpleITK, ...) can be given a
# folder of wheels in LCTFOUND_WHEELS; they are installed into a private folder first.
set -euo pipefail
if [ "$#" -lt 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT [--smoke] [--budget-s S]" >&2
  exit 2
fi
out="$1"; shift
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python="python3"; fi
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${LCTFOUND_WHEELS:-}" ]; then
  "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/lctfound-site "$LCTFOUND_WHEELS"/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/lctfound-site"
fi
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
"$python" "$root/benchmarks/gpu_check.py" "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"

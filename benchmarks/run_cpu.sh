#!/usr/bin/env bash
# The CPU benchmarks of benchmarks/RESULTS.md, in order; results are appended to benchmarks/results.jsonl.
# Run on an otherwise idle machine: every figure is a wall-clock time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=benchmarks/results.jsonl
export HF_HUB_OFFLINE=1
EMBEDDED=lctfound/models/embedded/lctfound-cpu-tiny
$PY benchmarks/bench_features.py forward --presets cpu-tiny cpu-base official --repeats 3 --json $OUT
$PY benchmarks/bench_features.py sample --model $EMBEDDED --json $OUT
$PY benchmarks/bench_features.py sample --preset cpu-tiny --json $OUT
$PY benchmarks/bench_features.py large --model $EMBEDDED --slices 300 --json $OUT
$PY benchmarks/bench_features.py large --preset official --slices 300 --limit-slices 1 --resolution 256 --json $OUT
$PY benchmarks/bench_training.py --presets cpu-tiny cpu-base --resolution 256 --batch-size 4 --steps 3 --json $OUT
$PY benchmarks/bench_training.py --presets official --resolution 256 --batch-size 1 --steps 1 --warmup 0 --json $OUT

"""benchmarks/gpu_check.sh: the one prepared GPU check runs end to end on the CPU (``--smoke``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_writes_every_figure(tmp_path, sample_data):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), str(out), "--smoke"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    figures = json.loads((out / "gpu_check.json").read_text())
    assert figures["machine"]["smoke"] is True
    assert figures["peak"]["tflops"] > 0
    rows = figures["features"]
    assert [row["batch"] for row in rows] == [1, 2]
    for row in rows:
        assert row["slices_per_s"] > 0 and 0 < row["mfu"] and row["slice_forwards_per_s"] == pytest.approx(
            4 * row["slices_per_s"])
    assert figures["training"]["images_per_s"] > 0
    fewshot = figures["fewshot"]
    assert fewshot["labelled_slices"] and fewshot["predicted_slices"] == 4
    assert 0.0 <= fewshot["dice_on_labelled_slices"] <= 1.0
    assert (out / "gpu_check.md").read_text().startswith("# gpu_check")
    assert (out / "gpu_check.log").is_file()


def test_gpu_check_refuses_a_missing_gpu_in_one_line(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(tmp_path / "o"),
                             "--device", "cuda"], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: no CUDA device here; run with --smoke on a CPU"]

"""The protocol pieces of benchmarks/bench_fewshot.py: which slices are labelled, what is scored."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fewshot.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fewshot", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_labelled_choices(bench):
    # lung1: three lesion slices, all subsets; k = 3 leaves nothing held out
    assert bench.labelled_choices(32, 34, 1, 3) == [(32,), (33,), (34,)]
    assert bench.labelled_choices(32, 34, 2, 3) == [(32, 33), (32, 34), (33, 34)]
    assert bench.labelled_choices(32, 34, 3, 3) == []
    # lung2: evenly spread centres shifted by -1, 0, +1
    assert bench.labelled_choices(15, 25, 1, 3) == [(19,), (20,), (21,)]
    assert bench.labelled_choices(15, 25, 2, 3) == [(16, 22), (17, 23), (18, 24)]
    assert bench.labelled_choices(15, 25, 3, 3) == [(15, 19, 23), (16, 20, 24), (17, 21, 25)]
    assert bench.labelled_choices(15, 25, 3, 1) == [(16, 20, 24)]


def test_evaluate_scores_only_unlabelled_slices(bench):
    truth = np.zeros((10, 8, 8), dtype=np.uint8)
    truth[4:7, 2:5, 2:5] = 1
    prediction = truth.copy()
    prediction[4] = 0              # a labelled slice predicted wrongly: never scored
    prediction[0, 6:, 6:] = 1      # a false positive far away: counts in the volume Dice only
    scores = bench.evaluate(prediction, truth, (4,))
    assert scores["none"]["near"] == pytest.approx(1.0)
    assert scores["none"]["heldout"] == pytest.approx(2 * 18 / (18 + 4 + 18))
    assert scores["largest"]["heldout"] == pytest.approx(1.0)  # the island is removed

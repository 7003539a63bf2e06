"""Windows, the official [-1, 1] normalisation, resizing and batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctfound.errors import LCTfoundError
from lctfound.preprocessing import (model_to_hu, prepare_slices, resize_labels, slice_batches, window_to_unit)
from lctfound.windows import WINDOWS, Window, get_window


def test_window_presets_and_custom():
    assert (WINDOWS["lung"].low, WINDOWS["lung"].high) == (-1250, 250)
    assert (WINDOWS["mediastinal"].low, WINDOWS["mediastinal"].high) == (-200, 200)
    assert get_window("350,40") == Window(350, 40)
    with pytest.raises(LCTfoundError, match="unknown window"):
        get_window("bone-ish")
    with pytest.raises(LCTfoundError, match="positive"):
        get_window("0,40")


def test_official_normalisation_matches_the_pretraining_loader():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 1500, size=(2, 32, 32)).astype(np.int16)
    ours = prepare_slices(hu, "lung", 32, mode="official")
    # The loader, written out as the official code did it: clip (int16 kept), per-slice min-max with
    # +1e-8 (so the top quantises to 254), uint8, /255, (x-.5)/.5.
    for index in range(2):
        clipped = np.clip(hu[index], -1250, 250)
        unit = (clipped - clipped.min()) / (clipped.max() - clipped.min() + 1e-8)
        expected = ((unit * 255).astype(np.uint8) / 255.0 - 0.5) / 0.5
        for channel in range(3):
            np.testing.assert_allclose(ours[index, channel].numpy(), expected, atol=1e-6)
    assert ours.shape == (2, 3, 32, 32) and ours.min() >= -1 and ours.max() <= 1


def test_fixed_mode_is_invertible_to_hu():
    hu = torch.linspace(-200, 200, 64).reshape(1, 8, 8)
    x = prepare_slices(hu, "mediastinal", 8, mode="fixed")
    torch.testing.assert_close(model_to_hu(x, "mediastinal"), hu, atol=1e-3, rtol=0)


def test_uniform_slice_does_not_divide_by_zero():
    unit = window_to_unit(np.full((4, 4), -1000), "lung")
    assert torch.isfinite(unit).all()


def test_label_resizing_keeps_classes():
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[:, 10:30, 10:30] = 3
    down = resize_labels(labels, 32)
    assert set(down.unique().tolist()) == {0, 3}
    back = resize_labels(down, 64)
    assert back.shape == labels.shape and set(back.unique().tolist()) == {0, 3}


def test_resizing_to_model_size_and_batches():
    hu = np.zeros((3, 100, 120), dtype=np.int16)
    assert prepare_slices(hu, "lung", 64).shape == (3, 3, 64, 64)
    assert list(slice_batches(range(5), 2)) == [[0, 1], [2, 3], [4]]

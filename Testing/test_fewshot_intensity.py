"""The fast recipe's head also reads two cheap intensity channels (issue 15, item 3)."""

from __future__ import annotations

import numpy as np

from lctfound.models import load_model, save_model
from lctfound.pipelines.baselines import IntensityPatchSegmenter
from lctfound.pipelines.segmentation import (INTENSITY_CHANNELS, FewShotConfig, FewShotSegmenter,
                                             intensity_channels)

from lctfound.windows import get_window

from model_factory import tiny_model


def test_intensity_channels_and_head_inputs(tmp_path):
    hu = np.full((2, 32, 32), -1000.0, dtype=np.float32)
    hu[:, 8:24, 8:24] = 40.0  # soft tissue, inside the mediastinal window
    channels = intensity_channels(hu, "mediastinal", 16)
    assert channels.shape == (2, INTENSITY_CHANNELS, 16, 16)
    grey, smoothed = channels[0, 0].numpy(), channels[0, 1].numpy()
    window = get_window("mediastinal")
    assert np.isclose(grey[8, 8], (40.0 - window.low) / window.width - 0.5, atol=1e-6)
    assert np.isclose(grey[0, 0], -0.5)  # air: the window's bottom
    assert smoothed[8, 8] < grey[8, 8] and smoothed[3, 8] > grey[3, 8]  # blurred across the edge

    save_model(tiny_model(64, seed=1), tmp_path / "tiny")
    backbone = load_model(tmp_path / "tiny")
    fast = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig.for_recipe("fast"))
    assert fast.head_inputs == fast.extractor.channels + INTENSITY_CHANNELS
    assert not FewShotConfig.for_recipe("official").intensity_features
    # The raw-intensity baseline stays what it was: its intensities are already its features.
    assert IntensityPatchSegmenter({1: "Lesion"}).head_inputs == 25

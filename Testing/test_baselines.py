"""The raw-intensity baseline of few-shot segmentation (`lctfound.pipelines.baselines`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctfound.errors import LCTfoundError
from lctfound.pipelines.baselines import IntensityPatchExtractor, IntensityPatchSegmenter, PatchSpec
from lctfound.pipelines.segmentation import UNLABELLED, FeatureCache, FewShotConfig, FewShotSegmenter
from lctfound.preprocessing import prepare_slices


def test_patch_channels_are_the_windowed_neighbours():
    rng = np.random.default_rng(0)
    hu = rng.normal(0, 150, (2, 48, 48)).astype(np.float32)
    extractor = IntensityPatchExtractor(PatchSpec(window="mediastinal", patch=5, resolution=32))
    features = extractor(hu)
    assert features.shape == (2, 25, 32, 32) and extractor.channels == 25
    grey = prepare_slices(hu, "mediastinal", 32)[:, 0]
    torch.testing.assert_close(features[:, 12], grey)  # the centre channel is the pixel itself
    # channel (dy + 2) * 5 + (dx + 2) holds the value at offset (dy, dx)
    torch.testing.assert_close(features[:, 1 * 5 + 4, 5:, :-2], grey[:, 4:-1, 2:])  # dy = -1, dx = +2
    torch.testing.assert_close(features[:, 0, 0, 0], grey[:, 0, 0])  # replicate padding at the corner
    lung = IntensityPatchExtractor(PatchSpec(window="lung", patch=3, resolution=32))(hu)
    assert lung.shape == (2, 9, 32, 32) and not torch.allclose(lung[:, 4], features[:, 12])


def test_iter_volume_and_bad_specs():
    volume = np.zeros((3, 16, 16), dtype=np.int16)
    extractor = IntensityPatchExtractor(PatchSpec(resolution=8))
    batches = list(extractor.iter_volume(volume, [2, 0], batch_size=1))
    assert [b for b, _ in batches] == [[2], [0]] and batches[0][1].dtype == torch.float16
    with pytest.raises(LCTfoundError, match="outside the volume"):
        list(extractor.iter_volume(volume, [3]))
    with pytest.raises(LCTfoundError, match="odd number"):
        PatchSpec(patch=4)
    with pytest.raises(LCTfoundError, match="at least one structure"):
        IntensityPatchSegmenter({0: "Background"})


def phantom(slices: int = 6, size: int = 48, seed: int = 0):
    """Lung (−850 HU) with a soft-tissue lesion (+40 HU) disc on every slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    volume = rng.normal(-850, 20, (slices, size, size)).astype(np.float32)
    lesion = np.stack([(yy - 20) ** 2 + (xx - 26) ** 2 < (6 + k % 3) ** 2 for k in range(slices)])
    volume[lesion] = 40 + rng.normal(0, 10, lesion.sum())
    return volume, lesion


def test_segmenter_trains_the_shared_head_on_raw_features(tmp_path):
    volume, lesion = phantom()
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[[1, 4]] = lesion[[1, 4]]
    torch.manual_seed(0)  # the head's initial weights
    # ~1,100 labelled pixels are one batch (one step per epoch): a higher rate converges in 40 steps
    config = FewShotConfig(epochs=40, learning_rate=1e-2, resolution=24)
    segmenter = IntensityPatchSegmenter({1: "Lesion"}, config, patch=3)
    assert type(segmenter).fit is FewShotSegmenter.fit  # the same training as the LCTfound head
    report = segmenter.fit(volume, labels, cache_root=tmp_path)
    assert report.slices == [1, 4] and report.class_pixels["Lesion"] > 0
    prediction = segmenter(volume, cache_root=tmp_path) == 1
    held_out = [0, 2, 3, 5]
    overlap = (prediction[held_out] & lesion[held_out]).sum()
    assert 2 * overlap / (prediction[held_out].sum() + lesion[held_out].sum()) > 0.8
    cache = FeatureCache(segmenter.extractor, volume, tmp_path)
    assert cache.cached_slices == len(report.slices)  # prediction streams: only the fitted slices are kept
    other = IntensityPatchSegmenter({1: "Lesion"}, FewShotConfig(window="lung", resolution=24), patch=3)
    assert FeatureCache(other.extractor, volume, tmp_path).folder != cache.folder
    with pytest.raises(LCTfoundError, match="not saved"):
        segmenter.save(tmp_path / "model")

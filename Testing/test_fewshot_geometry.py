"""Few-shot geometry (issue 15, item 2): non-square slices keep their aspect ratio on the way into
the backbone (padded to square, not stretched) and predictions map back to the native grid exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctfound.models import load_model, save_model
from lctfound.pipelines.segmentation import (UNLABELLED, FewShotConfig, FewShotSegmenter, _to_native_grid,
                                             pad_to_square, square_padding)

from model_factory import tiny_model

HEIGHT, WIDTH, RADIUS = 40, 64, 9


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone") / "tiny"
    save_model(tiny_model(64, seed=1), folder)
    return load_model(folder)


def disc_volume(slices: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:HEIGHT, :WIDTH]
    disc = (yy - 20) ** 2 + (xx - 36) ** 2 < RADIUS ** 2
    volume = rng.normal(-800, 20, (slices, HEIGHT, WIDTH)).astype(np.float32)
    volume[:, disc] = 40 + rng.normal(0, 10, (slices, int(disc.sum())))
    return volume, np.broadcast_to(disc, volume.shape)


def extents(mask: np.ndarray) -> tuple[int, int]:
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[-1] - rows[0] + 1), int(columns[-1] - columns[0] + 1)


def test_padding_is_undone_exactly():
    assert square_padding(40, 64) == (12, 12, 0, 0) and square_padding(5, 2) == (0, 0, 1, 2)
    volume = np.arange(2 * 5 * 2, dtype=np.float32).reshape(2, 5, 2)
    square = pad_to_square(volume, -1.0)
    assert square.shape == (2, 5, 5) and (square[:, :, [0, 3, 4]] == -1).all()
    assert pad_to_square(square, 0.0) is square
    # An image resized to the square and back, cropped, is the image (bilinear of a linear ramp is exact).
    ramp = torch.as_tensor(np.add.outer(np.arange(40.0), np.arange(64.0) * 2))[None, None].float()
    padded = torch.as_tensor(pad_to_square(ramp[0].numpy(), 0.0))[None]
    assert torch.allclose(_to_native_grid(padded, 40, 64, padded=True), ramp)


def test_a_round_structure_stays_round(backbone, tmp_path):
    volume, disc = disc_volume()
    segmenter = FewShotSegmenter(backbone, {1: "Disc"}, FewShotConfig(epochs=5, min_steps=60))
    # What the backbone sees: the disc is as tall as it is wide (stretching made it 64/40 = 1.6 taller).
    prepared = segmenter.extractor.prepare(segmenter.model_volume(volume)[:1])[0, 0].numpy()
    height, width = extents(prepared > prepared.min() + 0.5 * (prepared.max() - prepared.min()))
    assert abs(height / width - 1) < 0.15, (height, width)

    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[[0, 2]] = disc[[0, 2]]
    segmenter.fit(volume, labels, cache_root=tmp_path)
    predicted = segmenter(volume, cache_root=tmp_path)[1] == 1
    assert predicted.shape == (HEIGHT, WIDTH)
    height, width = extents(predicted)
    assert abs(height / width - 1) < 0.15, (height, width)
    assert 2 * (predicted & disc[1]).sum() / (predicted.sum() + disc[1].sum()) > 0.8

"""Few-shot results that stay clean on the whole volume (issue 15, item 1): prediction kept to the
annotated extent plus a margin, and 3D post-processing that keeps what touches the annotation."""

from __future__ import annotations

import numpy as np
import pytest

from lctfound.errors import LCTfoundError
from lctfound.pipelines.segmentation import (DEFAULT_POSTPROCESSING, annotated_extent, annotation_seeds,
                                             parse_extent_margin, postprocess_labels, prediction_slices,
                                             seeds_volume)


def test_extent_and_margin():
    annotation = np.full((20, 8, 8), -1, dtype=np.int16)
    annotation[3] = 0            # a reviewed slice without the structure does not widen the extent
    annotation[6, 2:4, 2:4] = 1
    annotation[9, 2:4, 2:4] = 1
    assert annotated_extent(annotation) == (6, 9)
    assert prediction_slices(20, annotation, 2) == list(range(4, 12))
    assert prediction_slices(20, annotation, 50) == list(range(20))
    assert prediction_slices(20, None, 2) == list(range(20))
    assert annotated_extent(np.zeros((4, 3, 3))) is None
    assert parse_extent_margin("3", 2.5) == 3
    assert parse_extent_margin("15mm", 2.5) == 6 and parse_extent_margin("16mm", 5.0) == 4
    for bad in ("-1", "ten", "-5mm"):
        with pytest.raises(LCTfoundError, match="extent margin"):
            parse_extent_margin(bad, 1.0)


def test_connected_keeps_every_component_touching_the_annotation():
    labels = np.zeros((12, 20, 20), dtype=np.uint8)
    labels[2:5, 2:6, 2:6] = 1      # annotated lesion A
    labels[2:5, 12:16, 12:16] = 1  # annotated lesion B (smaller than the false positive)
    labels[8:12, 2:10, 2:10] = 1   # a far-away false positive, the largest component
    annotation = np.full(labels.shape, -1, dtype=np.int16)
    annotation[3] = 0
    annotation[3, 3:5, 3:5] = 1
    annotation[3, 13:15, 13:15] = 1
    assert DEFAULT_POSTPROCESSING == ("connected",)
    kept = postprocess_labels(labels, ["connected"], annotation)
    assert kept[2:5].sum() == labels[2:5].sum() and kept[8:].sum() == 0
    largest = postprocess_labels(labels, ["largest"])
    assert largest[8:].sum() > 0 and largest[2:5, 12:16, 12:16].sum() == 0  # what 'largest' got wrong
    # Seeds stand for the annotation in a saved model: one inside point per painted component.
    seeds = annotation_seeds(annotation)
    assert sorted(s[0] for s in seeds) == [3, 3] and all(s[3] == 1 for s in seeds)
    assert np.array_equal(postprocess_labels(labels, ["connected"], seeds_volume(labels.shape, seeds)), kept)
    # Without an annotation (another volume), the largest component.
    assert np.array_equal(postprocess_labels(labels, ["connected"]), largest)
    with pytest.raises(LCTfoundError, match="not on the prediction's grid"):
        postprocess_labels(labels, ["connected"], annotation[:3])

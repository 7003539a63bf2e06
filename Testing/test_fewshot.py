"""Few-shot segmentation: label 2 slices → train → predict → correct one slice → retrain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lctfound.errors import LCTfoundError
from lctfound.models import load_model, save_model
from lctfound.pipelines.segmentation import (UNLABELLED, FeatureCache, FewShotConfig, FewShotSegmenter,
                                             postprocess_labels)

from data_factory import fewshot_phantom
from model_factory import tiny_model

SIZE = 64


def phantom(slices: int = 8, seed: int = 0):
    return fewshot_phantom(slices, SIZE, seed)


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    folder = tmp_path_factory.mktemp("backbone") / "tiny"
    save_model(tiny_model(SIZE, seed=1), folder)
    return load_model(folder)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_label_two_slices_train_predict_correct_retrain(backbone, tmp_path):
    volume, lesion, blob = phantom()
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    for k in (1, 2):  # the annotator paints the lesion on two slices
        labels[k] = lesion[k].astype(np.int16)
    segmenter = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig(epochs=15))
    computed = []  # slices whose features the backbone computes
    real_iter = segmenter.extractor.iter_volume

    def counting_iter(volume_, slices, *args, **kwargs):
        computed.extend(slices)
        return real_iter(volume_, slices, *args, **kwargs)

    segmenter.extractor.iter_volume = counting_iter
    report = segmenter.fit(volume, labels, cache_root=tmp_path)
    assert computed == [1, 2]
    assert report.slices == [1, 2] and report.class_pixels["Lesion"] > 0
    prediction = segmenter(volume, cache_root=tmp_path) == 1
    assert dice(prediction[:4], lesion[:4]) > 0.6
    false_positive = (prediction & blob).sum() / blob.sum()
    assert false_positive > 0.3, "the dense blob should first be taken for lesion"

    # The annotator erases the false positive on slice 5 (and keeps the lesion there): label it all.
    labels[5] = lesion[5].astype(np.int16)
    computed.clear()
    report = segmenter.fit(volume, labels, cache_root=tmp_path)
    assert computed == [5]  # prediction streams (caches nothing): only the newly reviewed slice is computed
    assert report.corrected_pixels > 0
    corrected = segmenter(volume, cache_root=tmp_path) == 1
    assert (corrected[5] & blob[5]).sum() < 0.05 * blob[5].sum()   # the edit is respected
    assert (corrected & blob).sum() < 0.5 * (prediction & blob).sum()  # and carries over to the other slices
    assert dice(corrected, lesion) > 0.6


def test_predicting_a_volume_caches_at_most_the_labelled_slices(backbone, tmp_path):
    # Issue 15, item 5: prediction streams features (compute, classify, discard); the cache keeps only
    # what retraining needs, the labelled slices, and says where it is and how big.
    volume, lesion, _ = phantom()
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[3] = lesion[3].astype(np.int16)
    segmenter = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig(epochs=2))
    report = segmenter.fit(volume, labels, cache_root=tmp_path)
    assert "1 slice(s)" in report.cache and str(tmp_path) in report.cache
    segmenter(volume, cache_root=tmp_path)
    entry = FeatureCache(segmenter.extractor, volume, tmp_path)
    assert entry.cached_slices == 1 and sorted(entry.stored(range(volume.shape[0]))) == [3]
    # A volume nobody labelled: predicting it leaves nothing in the cache.
    other = phantom(seed=5)[0]
    segmenter(other, cache_root=tmp_path)
    assert not FeatureCache(segmenter.extractor, other, tmp_path).folder.exists()


def test_feature_cache_computes_each_slice_once(backbone, tmp_path):
    volume, _, _ = phantom(4)
    segmenter = FewShotSegmenter(backbone, {1: "Lesion"})
    cache = FeatureCache(segmenter.extractor, volume, tmp_path)
    first = cache.get([0, 2])
    assert cache.cached_slices == 2
    again = FeatureCache(segmenter.extractor, volume, tmp_path).get([2, 0, 3])
    np.testing.assert_array_equal(again[0], first[1])
    assert cache.cached_slices == 3
    changed = volume.copy()
    changed[0, 0, 0] += 1
    assert FeatureCache(segmenter.extractor, changed, tmp_path).folder != cache.folder


def test_save_load_and_backbone_check(backbone, tmp_path):
    volume, lesion, _ = phantom(4)
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[0] = lesion[0]
    segmenter = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig(epochs=3))
    segmenter.fit(volume, labels, cache_root=tmp_path)
    segmenter.save(tmp_path / "model")
    loaded = FewShotSegmenter.load(tmp_path / "model", backbone)
    np.testing.assert_array_equal(loaded(volume, cache_root=tmp_path), segmenter(volume, cache_root=tmp_path))
    other = tiny_model(SIZE, seed=9)
    save_model(other, tmp_path / "other")
    with pytest.raises(LCTfoundError, match="trained on backbone"):
        FewShotSegmenter.load(tmp_path / "model", load_model(tmp_path / "other"))


def test_bad_inputs(backbone):
    volume, lesion, _ = phantom(3)
    segmenter = FewShotSegmenter(backbone, {1: "Lesion"})
    with pytest.raises(LCTfoundError, match="no labelled slice"):
        segmenter.fit(volume, np.full(volume.shape, UNLABELLED, dtype=np.int16))
    with pytest.raises(LCTfoundError, match="not on the volume's grid"):
        segmenter.fit(volume, np.zeros((3, 10, 10), dtype=np.int16))
    only_background = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    only_background[0] = 0
    with pytest.raises(LCTfoundError, match="only background"):
        segmenter.fit(volume, only_background)
    unnamed = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    unnamed[0] = lesion[0] * 3
    with pytest.raises(LCTfoundError, match="label value 3 has no name"):
        segmenter.fit(volume, unnamed)
    with pytest.raises(LCTfoundError, match="at least one structure"):
        FewShotSegmenter(backbone, {0: "Background"})


def test_postprocessing():
    labels = np.zeros((3, 20, 20), dtype=np.uint8)
    labels[:, 2:10, 2:10] = 1
    labels[1, 5, 5] = 0          # a hole
    labels[:, 15:17, 15:17] = 1  # a small separate island
    cleaned = postprocess_labels(labels, ["largest", "fill"])
    assert cleaned[:, 15:17, 15:17].sum() == 0 and cleaned[1, 5, 5] == 1
    with pytest.raises(LCTfoundError, match="unknown post-processing"):
        postprocess_labels(labels, ["blur"])


def test_cli_segment_train_and_batch_predict(backbone, tmp_path, run_cli, monkeypatch):
    import csv

    from lctfound.io.volume import CTVolume, read_volume, write_volume

    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    volume, lesion, _ = phantom(4)
    ct = CTVolume(volume.astype(np.int16), spacing=(0.7, 0.7, 5.0))
    write_volume(ct, tmp_path / "ct.nrrd")
    label = np.zeros(volume.shape, dtype=np.uint8)
    label[1] = lesion[1]
    write_volume(ct.with_array(label), tmp_path / "label.nrrd")
    code, out, err = run_cli(["segment", "train", tmp_path / "ct.nrrd", "--labels", tmp_path / "label.nrrd",
                              "--names", "1=Lesion", "--backbone", backbone.path, "--epochs", "5",
                              "-o", tmp_path / "fewshot"])
    assert code == 0, err
    assert "trained on slices [1]" in out
    # One slice makes an epoch a single step: the raised epoch count is said, and kept for the panel.
    assert "instead of the 5 asked for" in out
    from lctfound.logic.segmentation import SegmentationModuleLogic

    assert "instead of the 5 asked for" in SegmentationModuleLogic.training_note(tmp_path / "fewshot")

    code, out, err = run_cli(["segment", "predict", tmp_path / "ct.nrrd", "--model", tmp_path / "fewshot",
                              "--postprocess", "largest", "-o", tmp_path / "pred.nii.gz"])
    assert code == 0, err
    predicted = read_volume(tmp_path / "pred.nii.gz", labels=True)
    assert predicted.shape == ct.shape and np.allclose(predicted.spacing, ct.spacing)  # NIfTI stores float32
    assert set(np.unique(predicted.array)) <= {0, 1}

    # On its training volume the model keeps to the annotated extent (slice 1) plus the margin.
    code, out, err = run_cli(["segment", "predict", tmp_path / "ct.nrrd", "--model", tmp_path / "fewshot",
                              "--extent-margin", "0", "-o", tmp_path / "pred_extent.nii.gz"])
    assert code == 0, err
    assert "predicting slices 1-1 of 4" in out
    kept = read_volume(tmp_path / "pred_extent.nii.gz", labels=True).array
    assert kept[[0, 2, 3]].sum() == 0 and kept[1].sum() > 0
    code, out, err = run_cli(["segment", "predict", tmp_path / "ct.nrrd", "--model", tmp_path / "fewshot",
                              "--extent-margin", "2 slices", "-o", tmp_path / "bad.nii.gz"])
    assert code == 2 and err.startswith("error: extent margin")

    batch = tmp_path / "batch"
    batch.mkdir()
    write_volume(ct, batch / "a.nrrd")
    write_volume(ct, batch / "b.nii.gz")
    (batch / "broken.nrrd").write_bytes(b"NRRD0004\nnot really")
    code, out, err = run_cli(["segment", "predict", batch, "--model", tmp_path / "fewshot", "-o", tmp_path / "out"])
    assert code == 1 and "2 of 3 volume(s) segmented" in out
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = {Path(r["input"]).name: r for r in csv.DictReader(handle)}
    assert rows["a.nrrd"]["status"] == "ok" and rows["broken.nrrd"]["status"].startswith("error:")
    done = (tmp_path / "out" / "a_seg.nii.gz").stat().st_mtime_ns
    (batch / "broken.nrrd").unlink()
    code, out, err = run_cli(["segment", "predict", batch, "--model", tmp_path / "fewshot", "-o", tmp_path / "out"])
    assert code == 0 and (tmp_path / "out" / "a_seg.nii.gz").stat().st_mtime_ns == done  # resumed, not redone

    other_grid = CTVolume(np.zeros((4, 32, 32), dtype=np.uint8), spacing=(0.7, 0.7, 5.0))
    write_volume(other_grid, tmp_path / "small_label.nrrd")
    code, out, err = run_cli(["segment", "train", tmp_path / "ct.nrrd", "--labels", tmp_path / "small_label.nrrd",
                              "--backbone", backbone.path, "-o", tmp_path / "bad"])
    assert code == 2 and err.startswith("error:") and "small_label.nrrd" in err
    empty = ct.with_array(np.zeros(volume.shape, dtype=np.uint8))
    write_volume(empty, tmp_path / "empty_label.nrrd")
    code, out, err = run_cli(["segment", "train", tmp_path / "ct.nrrd", "--labels", tmp_path / "empty_label.nrrd",
                              "--backbone", backbone.path, "-o", tmp_path / "bad2"])
    assert code == 2 and "no labelled slice" in err

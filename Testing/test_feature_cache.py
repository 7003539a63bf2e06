"""The feature cache is verified (checksums per slice) and bounded (a size limit, least recently
used entries removed first, never one in use) — issue 12, rule 9 — and stores only the slices
computed, one file each (issue 15, item 5)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from lctfound import cache as cache_module
from lctfound.cache import disk_bytes, make_room, parse_size, slice_digest, usage
from lctfound.errors import LCTfoundError
from lctfound.features import human_bytes
from lctfound.pipelines.baselines import IntensityPatchExtractor, IntensityPatchSegmenter, PatchSpec
from lctfound.pipelines.segmentation import (ENTRY_FORMAT, ENTRY_INDEX, SLICES_FOLDER, UNLABELLED, FeatureCache,
                                             FewShotConfig)

SLICES, SIZE = 6, 32


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-500, 300, (SLICES, SIZE, SIZE)).astype(np.float32)


@pytest.fixture
def extractor():
    return IntensityPatchExtractor(PatchSpec(patch=3, resolution=16))


def counting(extractor, calls):
    original = extractor.iter_volume

    def iter_volume(hu, slices, *args, **kwargs):
        calls.extend(slices)
        return original(hu, slices, *args, **kwargs)

    extractor.iter_volume = iter_volume
    return extractor


def slice_file(entry: FeatureCache, index: int):
    return entry.folder / SLICES_FOLDER / f"{index}.npy"


def test_damaged_slice_files_fail_their_checksum_and_only_they_are_recomputed(extractor, tmp_path, caplog):
    ct = volume()
    expected = FeatureCache(extractor, ct, tmp_path).get(range(SLICES))
    entry = FeatureCache(extractor, ct, tmp_path)
    truncated = slice_file(entry, 1)
    size = truncated.stat().st_size
    with open(truncated, "r+b") as handle:
        handle.truncate(size // 3)
    np.save(slice_file(entry, 2), np.zeros(entry.shape[1:], dtype=np.float16))  # zeroed
    changed = np.load(slice_file(entry, 4))
    changed[0, 0, 0] += 1
    np.save(slice_file(entry, 4), changed)  # one value off
    slice_file(entry, 5).unlink()  # removed
    calls = []
    with caplog.at_level(logging.WARNING):
        again = FeatureCache(counting(extractor, calls), ct, tmp_path).get(range(SLICES))
    assert sorted(calls) == [1, 2, 4, 5]  # the intact slices are read, not recomputed
    np.testing.assert_array_equal(again, expected)
    assert sum("fail their checksum" in r.getMessage() for r in caplog.records) == 1
    assert truncated.stat().st_size == size  # rewritten whole
    calls.clear()
    FeatureCache(counting(extractor, calls), ct, tmp_path).get(range(SLICES))
    assert calls == []


def test_an_entry_stores_the_slices_computed_not_the_volume(tmp_path):
    # Issue 15, item 5: a fit on 2 labelled slices of a 40-slice volume stores about 2 slices' features;
    # retraining on the same volume reads them back instead of computing them again.
    ct = np.random.default_rng(0).normal(-500, 300, (40, 64, 64)).astype(np.float32)
    labels = np.full(ct.shape, UNLABELLED, dtype=np.int16)
    labels[[12, 20]] = 0
    labels[12, 20:30, 20:30] = labels[20, 25:35, 25:35] = 1
    segmenter = IntensityPatchSegmenter({1: "Lesion"}, FewShotConfig(epochs=1, min_steps=1, resolution=64), patch=5)
    calls = []
    counting(segmenter.extractor, calls)
    report = segmenter.fit(ct, labels, cache_root=tmp_path)
    assert calls == [12, 20]
    entry = FeatureCache(segmenter.extractor, ct, tmp_path)
    slice_bytes = entry.slice_bytes
    assert slice_bytes == 25 * 64 * 64 * 2
    assert disk_bytes(entry.folder) < 3 * slice_bytes  # not 40 slices' worth
    assert sorted(p.name for p in (entry.folder / SLICES_FOLDER).iterdir()) == ["12.npy", "20.npy"]
    assert f"2 slice(s), {human_bytes(disk_bytes(entry.folder))} on disk in {entry.folder}" in report.cache
    calls.clear()
    segmenter.fit(ct, labels, cache_root=tmp_path)  # a retrain after corrections
    assert calls == []
    labels[30] = 0  # one more reviewed slice: only it is computed, and stored beside the others
    segmenter.fit(ct, labels, cache_root=tmp_path)
    assert calls == [30] and entry.cached_slices == 3


def test_an_entry_of_the_old_whole_volume_format_is_replaced(extractor, tmp_path, caplog):
    ct, root = volume(), tmp_path / "cache"
    entry = FeatureCache(extractor, ct, root)
    entry.folder.mkdir(parents=True)
    old = np.lib.format.open_memmap(entry.folder / "features.npy", mode="w+", dtype=np.float16, shape=entry.shape)
    old[0] = 1
    old.flush()
    del old
    (entry.folder / ENTRY_INDEX).write_text(json.dumps({"format": 2, "shape": list(entry.shape), "dtype": "float16",
                                                        "digests": {"0": slice_digest(np.ones(entry.shape[1:],
                                                                                              np.float16))}}))
    assert usage(root).size >= SLICES * entry.slice_bytes  # the old entry is counted whole
    # Prediction reads no features of an old entry (and removes it) ...
    with caplog.at_level(logging.WARNING):
        assert FeatureCache(extractor, ct, root).stored([0]) == {}
    assert "older format" in caplog.text and not entry.folder.exists()
    # ... and a fit stores the new format in its place.
    expected = FeatureCache(extractor, ct, tmp_path / "elsewhere").get([0])
    calls = []
    np.testing.assert_array_equal(FeatureCache(counting(extractor, calls), ct, root).get([0]), expected)
    assert calls == [0] and not (entry.folder / "features.npy").exists()
    assert json.loads((entry.folder / ENTRY_INDEX).read_text())["format"] == ENTRY_FORMAT
    assert usage(root).size == disk_bytes(entry.folder) < 2 * entry.slice_bytes + 8192


def test_entry_without_checksums_or_with_a_foreign_index_is_rebuilt(extractor, tmp_path):
    ct = volume()
    expected = FeatureCache(extractor, ct, tmp_path).get([0, 1])
    entry = FeatureCache(extractor, ct, tmp_path)
    (entry.folder / ENTRY_INDEX).write_text("{not json")
    calls = []
    np.testing.assert_array_equal(FeatureCache(counting(extractor, calls), ct, tmp_path).get([0, 1]), expected)
    assert calls == [0, 1]
    index = json.loads((entry.folder / ENTRY_INDEX).read_text())
    assert sorted(index["digests"]) == ["0", "1"]


def test_size_limit_evicts_least_recently_used_but_never_an_entry_in_use(extractor, tmp_path, monkeypatch):
    root, elsewhere = tmp_path / "cache", tmp_path / "elsewhere"
    one = FeatureCache(extractor, volume(0), root)
    one.get([0])
    per_entry = disk_bytes(one.folder)  # one slice and the index, as stored on this file system
    # Room for two such entries and half a slice: a third slice must evict one.
    monkeypatch.setenv("LCTFOUND_FEATURE_CACHE_LIMIT", str(2 * per_entry + one.slice_bytes // 2))
    caches = [one, FeatureCache(extractor, volume(1), root)]
    caches[1].get([0])
    caches[0].close()  # the oldest is released; the second stays open (in use)
    third = FeatureCache(extractor, volume(2), root)
    third.get([0])
    assert not caches[0].folder.exists()  # least recently used, not in use: evicted
    assert caches[1].folder.exists() and third.folder.exists()
    # Both remaining entries are in use: a fourth cannot make room and keeps the slices it was asked
    # for in memory only (never the whole volume).
    fourth = FeatureCache(extractor, volume(3), root)
    np.testing.assert_array_equal(fourth.get([1]), FeatureCache(extractor, volume(3), elsewhere).get([1]))
    assert not fourth.folder.exists()
    assert "1 slice(s) did not fit" in fourth.describe()
    assert caches[1].folder.exists() and third.folder.exists()
    found = usage(root)
    assert found.entries == 2 and found.size <= found.limit
    caches[1].close()
    third.close()
    assert make_room(per_entry * 2, root)  # released entries may go now
    assert usage(root).entries == 0


def test_limit_zero_keeps_nothing_on_disk(extractor, tmp_path, monkeypatch):
    monkeypatch.setenv("LCTFOUND_FEATURE_CACHE_LIMIT", "0")
    ct = volume()
    features = FeatureCache(extractor, ct, tmp_path).get([0, 3])
    assert features.shape == (2, 9, 16, 16)
    assert list(tmp_path.iterdir()) == []


def test_limit_parsing(monkeypatch):
    assert parse_size("500MB") == 500 * 2**20 and parse_size("4g") == 4 * 2**30 and parse_size("1024") == 1024
    for bad in ("lots", "-1GB", "nan", "inf"):
        with pytest.raises(LCTfoundError):
            parse_size(bad)
    monkeypatch.setenv("LCTFOUND_FEATURE_CACHE_LIMIT", "huge")
    with pytest.raises(LCTfoundError, match="LCTFOUND_FEATURE_CACHE_LIMIT"):
        cache_module.cache_limit()


def test_cache_root_that_is_a_file_is_one_line(extractor, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LCTfoundError, match="cannot be written"):
        FeatureCache(extractor, volume(), blocker).get([0])


def test_doctor_shows_location_size_limit_and_entries(extractor, run_cli, tmp_path, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("LCTFOUND_FEATURE_CACHE_LIMIT", "2GB")
    FeatureCache(extractor, volume(), tmp_path / "features").get([0])
    code, out, err = run_cli(["doctor", "--json"])
    assert code == 0, err
    report = json.loads(out)["cache"]["features"]
    assert report["root"] == str(tmp_path / "features")
    assert report["entries"] == 1 and report["limit"] == 2 * 2**30 and report["size"] > 0
    code, out, _ = run_cli(["doctor"])
    assert "feature cache:" in out and "1 entries" in out and "limit 2.0 GB" in out

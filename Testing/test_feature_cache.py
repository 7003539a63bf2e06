"""The feature cache is verified (checksums per slice) and bounded (a size limit, least recently
used entries removed first, never one in use) — issue 12, rule 9."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from lctfound import cache as cache_module
from lctfound.cache import make_room, parse_size, usage
from lctfound.errors import LCTfoundError
from lctfound.pipelines.baselines import IntensityPatchExtractor, PatchSpec
from lctfound.pipelines.segmentation import ENTRY_INDEX, FeatureCache

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


def test_truncated_features_file_is_recomputed_not_zero_extended(extractor, tmp_path, caplog):
    ct = volume()
    expected = FeatureCache(extractor, ct, tmp_path).get(range(SLICES))
    features = FeatureCache(extractor, ct, tmp_path).folder / "features.npy"
    size = features.stat().st_size
    with open(features, "r+b") as handle:
        handle.truncate(size // 3)
    calls = []
    with caplog.at_level(logging.WARNING):
        again = FeatureCache(counting(extractor, calls), ct, tmp_path).get(range(SLICES))
    assert sorted(calls) == list(range(SLICES))  # every slice recomputed
    np.testing.assert_array_equal(again, expected)
    assert any("truncated" in r.getMessage() for r in caplog.records)
    assert features.stat().st_size == size


def test_zeroed_slices_fail_their_checksum_and_only_they_are_recomputed(extractor, tmp_path, caplog):
    ct = volume()
    expected = FeatureCache(extractor, ct, tmp_path).get(range(SLICES))
    entry = FeatureCache(extractor, ct, tmp_path)
    stored = np.load(entry.folder / "features.npy", mmap_mode="r+")
    stored[2] = 0
    stored[4, 0, 0, 0] += 1
    stored.flush()
    del stored
    calls = []
    with caplog.at_level(logging.WARNING):
        again = FeatureCache(counting(extractor, calls), ct, tmp_path).get(range(SLICES))
    assert sorted(calls) == [2, 4]
    np.testing.assert_array_equal(again, expected)
    assert sum("fail their checksum" in r.getMessage() for r in caplog.records) == 1


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
    per_entry = one.nbytes
    monkeypatch.setenv("LCTFOUND_FEATURE_CACHE_LIMIT", str(int(per_entry * 2.5)))
    caches = [one, FeatureCache(extractor, volume(1), root)]
    for entry in caches:
        entry.get([0])
    caches[0].close()  # the oldest is released; the second stays open (in use)
    third = FeatureCache(extractor, volume(2), root)
    third.get([0])
    assert not caches[0].folder.exists()  # least recently used, not in use: evicted
    assert caches[1].folder.exists() and third.folder.exists()
    # Both remaining entries are in use: a fourth cannot make room and stays in memory only.
    fourth = FeatureCache(extractor, volume(3), root)
    np.testing.assert_array_equal(fourth.get([1]), FeatureCache(extractor, volume(3), elsewhere).get([1]))
    assert not fourth.folder.exists()
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

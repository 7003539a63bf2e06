"""The real sample CTs: fetch, checksums, geometry, caching, safe extraction, CLI."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from lctfound.errors import Cancelled, InputError, LCTfoundError
from lctfound.io import sample_data as sd
from lctfound.io.volume import read_label_volume, read_volume
from lctfound.progress import Progress

DATA_GROUP = ("data",)

# Measured on the pinned files (see lctfound/io/sample_data.py).
EXPECTED = {
    "lung1": dict(
        size=(512, 512, 48), spacing=(0.5703125, 0.5703125, 5.0), origin=(-146.0, -325.0, -777.5),
        hu=(-1024, 3071), percentiles=(-1013, -880, 406), label_voxels=837, label_slices=(32, 34),
    ),
    "lung2": dict(
        size=(512, 512, 61), spacing=(0.6269531, 0.6269531, 5.0), origin=(-170.5, -324.5, -360.0),
        hu=(-1024, 1671), percentiles=(-1013, -118, 378), label_voxels=24_644, label_slices=(15, 25),
    ),
}


def _no_download(*args, **kwargs):
    raise AssertionError("the sample data must not be downloaded again")


def test_fetch_stores_verified_files(sample_data):
    assert sample_data.folder == sample_data.files["lung1_image.nrrd"].parent
    assert sd.verify_sample(sample_data.folder) == []
    for name, pinned in sd.SAMPLE_FILES.items():
        path = sample_data.files[name]
        assert path.stat().st_size == pinned.size
        assert sd.sha256_file(path) == pinned.sha256
    readme = (sample_data.folder / "README.txt").read_text()
    assert "pyradiomics" in readme and sd.SDIST_SHA256 in readme and "not document" in readme
    assert "Harvard Medical School" in (sample_data.folder / "pyradiomics-LICENSE.txt").read_text()
    # Nothing but the published files (no temporaries, no download folders).
    assert sorted(p.name for p in sample_data.folder.iterdir()) == sorted([*sd.SAMPLE_FILES, "README.txt"])


@pytest.mark.parametrize("name", sd.SAMPLE_NAMES)
def test_sample_geometry_and_intensities(sample_data, name):
    expected = EXPECTED[name]
    image_path, label_path = sample_data.paths(name)
    image = read_volume(image_path)
    assert image.shape[::-1] == expected["size"] == sd.SAMPLES[name].size_ijk
    np.testing.assert_allclose(image.spacing, expected["spacing"], rtol=0, atol=1e-7)
    assert tuple(round(s, 4) for s in image.spacing[:2]) == {"lung1": (0.5703,) * 2, "lung2": (0.627,) * 2}[name]
    np.testing.assert_allclose(image.origin, expected["origin"], rtol=0, atol=1e-9)
    np.testing.assert_array_equal(image.direction, np.eye(3))
    assert image.array.dtype == np.int16
    assert (int(image.array.min()), int(image.array.max())) == expected["hu"] == sd.SAMPLES[name].hu_range
    np.testing.assert_allclose(np.percentile(image.array, [1, 50, 99]), expected["percentiles"], atol=1)

    label = read_label_volume(label_path, reference=image)
    assert label.same_grid(image)
    assert set(np.unique(label.array)) == {0, 1}
    assert int(label.array.sum()) == expected["label_voxels"] == sd.SAMPLES[name].label_voxels
    slices = np.nonzero(label.array.any(axis=(1, 2)))[0]
    assert (slices.min(), slices.max()) == expected["label_slices"]
    # The lesion is denser than lung: the label marks real tissue, not air.
    assert np.median(image.array[label.array > 0]) > -500


def test_load_sample_uses_the_cache(sample_cache, monkeypatch):
    monkeypatch.setattr(sd, "download_sdist", _no_download)
    image, label = sd.load_sample("lung1")
    assert image.shape == (48, 512, 512) and label.same_grid(image)
    assert image.metadata["sample"] == "lung1"
    assert sd.sample_paths("lung2") == (sample_cache / "sample-data" / "lung2_image.nrrd", sample_cache / "sample-data" / "lung2_label.nrrd")
    with pytest.raises(InputError, match="unknown sample 'lung3'; choose one of lung1, lung2"):
        sd.load_sample("lung3")


def test_second_fetch_does_no_network_work(sample_cache, monkeypatch):
    monkeypatch.setattr(sd, "download_sdist", _no_download)
    monkeypatch.setattr(sd.subprocess, "Popen", _no_download)
    data = sd.fetch_sample()
    assert data.folder == sample_cache / "sample-data"


def test_fetch_repairs_a_damaged_file(sample_cache):
    """A real download (local mirror, ~35 MB) into a private cache replaces a damaged label only."""
    folder = sample_cache / "sample-data"
    damaged = folder / "lung1_label.nrrd"
    damaged.write_bytes(b"x" * damaged.stat().st_size)
    untouched = (folder / "lung2_image.nrrd").stat()
    assert sd.verify_sample(folder) == ["lung1_label.nrrd"]

    messages = []
    sd.fetch_sample(progress=Progress(lambda done, total, message: messages.append((done, total, message))))
    assert sd.verify_sample(folder) == []
    assert (folder / "lung2_image.nrrd").stat().st_ino == untouched.st_ino  # not rewritten
    assert messages[0][2].startswith("downloading pyradiomics-3.0.1.tar.gz")
    assert any(m == "extracted lung1_label.nrrd" for _, _, m in messages)
    assert messages[-1][:2] == (3, 3)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*sd.SAMPLE_FILES, "README.txt"])


def test_cancel_before_download_publishes_nothing(empty_cache, monkeypatch):
    monkeypatch.setattr(sd, "download_sdist", _no_download)
    progress = Progress()
    progress.cancel_token.cancel()
    with pytest.raises(Cancelled):
        sd.fetch_sample(progress=progress)
    assert sd.verify_sample() == list(sd.SAMPLE_FILES)


def test_download_failure_is_one_line(empty_cache, monkeypatch):
    def fail(directory, progress=None):
        raise LCTfoundError("could not download pyradiomics==3.0.1 from the package index: no matching distribution")

    monkeypatch.setattr(sd, "download_sdist", fail)
    with pytest.raises(LCTfoundError, match="could not download"):
        sd.fetch_sample()
    assert not any((empty_cache / "sample-data").glob("*.nrrd"))


def test_sdist_with_a_wrong_hash_is_refused(tmp_path):
    fake = tmp_path / sd.SDIST_NAME
    fake.write_bytes(b"not the sdist")
    with pytest.raises(LCTfoundError, match="differs from the pinned"):
        sd._check_sdist(fake)


def test_find_sdist_link_in_a_pip_log():
    url = "https://files.example.org/packages/1b/35/c7f7/pyradiomics-3.0.1.tar.gz"
    log = (
        "  Found link https://files.example.org/pyradiomics-3.0.0.tar.gz#sha256=" + "0" * 64 + " (from x), version: 3.0\n"
        f"  Found link {url}#sha256={sd.SDIST_SHA256} (from https://pypi.org/simple/pyradiomics/), version: 3.0.1\n"
        "ERROR: Failed to build 'pyradiomics' when getting requirements to build wheel\n"
    )
    assert sd.find_sdist_link(log) == url
    assert sd.find_sdist_link("ERROR: No matching distribution found for pyradiomics==3.0.1") is None
    assert sd._last_error_line(log) == "Failed to build 'pyradiomics' when getting requirements to build wheel"


def test_download_url_file_scheme(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"abc" * 1000)
    target = sd.download_url(source.as_uri(), tmp_path / "copy.bin")
    assert target.read_bytes() == source.read_bytes()
    with pytest.raises(LCTfoundError, match="unsupported scheme"):
        sd.download_url("ftp://example.org/x.tar.gz", tmp_path / "x")


def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for info, data in members:
            archive.addfile(info, io.BytesIO(data) if info.isfile() else None)
    return path


def _regular(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def test_extraction_is_safe(tmp_path):
    """Only the exact pinned members are written, to our own names, after their hash is checked."""
    root = "pyradiomics-3.0.1/"
    pinned = sd.SAMPLE_FILES["lung1_label.nrrd"]
    out = tmp_path / "out"
    out.mkdir()

    link = tarfile.TarInfo(root + pinned.member)
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    evil = _tar(tmp_path / "link.tar.gz", [_regular("../../evil.txt", b"x"), (link, b"")])
    with pytest.raises(LCTfoundError, match="is not the expected regular file"):
        sd._extract(evil, out, ["lung1_label.nrrd"], Progress(), 3)

    wrong = _tar(tmp_path / "wrong.tar.gz", [_regular(root + pinned.member, b"y" * pinned.size)])
    with pytest.raises(LCTfoundError, match="has sha256"):
        sd._extract(wrong, out, ["lung1_label.nrrd"], Progress(), 3)

    missing = _tar(tmp_path / "missing.tar.gz", [_regular(root + "data/other.nrrd", b"z")])
    with pytest.raises(LCTfoundError, match="does not contain pyradiomics-3.0.1/data/lung1_label.nrrd"):
        sd._extract(missing, out, ["lung1_label.nrrd"], Progress(), 3)

    assert list(out.iterdir()) == []
    assert not (tmp_path.parent / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_cli_fetch_sample(sample_cache, monkeypatch, run_cli):
    monkeypatch.setattr(sd, "download_sdist", _no_download)
    code, out, err = run_cli(["data", "fetch-sample"], groups=DATA_GROUP)
    assert code == 0, err
    assert f"sample data in {sample_cache / 'sample-data'}" in out
    assert "lung1: lung1_image.nrrd (CT)  lung1_label.nrrd (lesion label)" in out


def test_cli_info_on_the_sample(sample_data, run_cli):
    code, out, err = run_cli(["data", "info", sample_data.image("lung2")], groups=DATA_GROUP)
    assert code == 0, err
    assert "size (i,j,k): 512 × 512 × 61" in out
    assert "spacing:     0.6269531, 0.6269531, 5 mm" in out
    assert "min / max:   -1024 / 1671 HU" in out


def test_download_falls_back_to_the_link_pip_found(tmp_path, monkeypatch):
    """When pip finds the sdist but cannot prepare its metadata, the URL from its log is fetched."""
    mirror = tmp_path / "mirror" / sd.SDIST_NAME
    mirror.parent.mkdir()
    mirror.write_bytes(b"sdist bytes")
    commands = []

    def fake_run(command, log_path, progress):
        commands.append(command)
        log_path.write_text(
            f"  Found link {mirror.as_uri()}#sha256={sd.SDIST_SHA256} (from file:///simple/pyradiomics/), version: 3.0.1\n"
            "ERROR: Failed to build 'pyradiomics' when getting requirements to build wheel\n"
        )
        return 1

    monkeypatch.setattr(sd, "_run", fake_run)
    result = sd.download_sdist(tmp_path / "download")
    assert result == tmp_path / "download" / sd.SDIST_NAME
    assert result.read_bytes() == b"sdist bytes"
    assert len(commands) == 1 and "--no-build-isolation" in commands[0] and "-vv" in commands[0]


def test_download_reports_pip_errors(tmp_path, monkeypatch):
    def fake_run(command, log_path, progress):
        log_path.write_text("ERROR: No matching distribution found for pyradiomics==3.0.1\n")
        return 1

    monkeypatch.setattr(sd, "_run", fake_run)
    with pytest.raises(LCTfoundError, match=r"^could not download pyradiomics==3.0.1 from the package index: No matching distribution found for pyradiomics==3.0.1$"):
        sd.download_sdist(tmp_path / "download")

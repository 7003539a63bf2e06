"""CT volume I/O: round trips keep geometry, DICOM series selection, bad input gives one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import data_factory
from lctfound.errors import InputError
from lctfound.io.dicom import list_dicom_series
from lctfound.io.volume import (
    CTVolume,
    check_same_grid,
    describe_volume,
    read_label_volume,
    read_volume,
    validate_ct,
    write_volume,
)

DATA_GROUP = ("data",)


def assert_geometry(actual: CTVolume, expected: CTVolume, atol: float) -> None:
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual.spacing, expected.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(actual.origin, expected.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(actual.direction, expected.direction, rtol=0, atol=atol)


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

# NIfTI stores spacing, origin and the quaternion/sform in float32; NRRD and MetaImage in text.
ROUND_TRIP_TOLERANCE = {".nii": 1e-4, ".nii.gz": 1e-4, ".nrrd": 1e-12, ".mha": 1e-12}


@pytest.mark.parametrize("extension", list(ROUND_TRIP_TOLERANCE))
def test_round_trip_keeps_oblique_geometry(tmp_path, oblique_ct, extension):
    path = write_volume(oblique_ct, tmp_path / f"ct{extension}")
    volume = read_volume(path)
    assert_geometry(volume, oblique_ct, ROUND_TRIP_TOLERANCE[extension])
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, oblique_ct.array)
    assert volume.same_grid(oblique_ct)
    assert volume.metadata["source"] == str(path)
    # Only the published file remains: no temporaries beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"ct{extension}"]


def test_round_trip_float_and_compression(tmp_path, oblique_ct):
    volume = oblique_ct.with_array(oblique_ct.array.astype(np.float32) + 0.25)
    compressed = write_volume(volume, tmp_path / "c.nrrd")
    plain = write_volume(volume, tmp_path / "p.nrrd", compress=False)
    assert compressed.stat().st_size < plain.stat().st_size
    back = read_volume(compressed)
    assert back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, volume.array)
    assert_geometry(back, volume, 1e-12)


def test_slab_keeps_world_positions(oblique_ct):
    slab = oblique_ct.slab(2, 5)
    assert slab.shape == (3, *oblique_ct.shape[1:])
    np.testing.assert_array_equal(slab.array, oblique_ct.array[2:5])
    # voxel (i, j, k) of the slab is voxel (i, j, k + 2) of the volume, in world millimetres
    for ijk in ((0, 0, 0), (3, 1, 2)):
        inside = slab.ijk_to_ras() @ np.array([*ijk, 1.0])
        whole = oblique_ct.ijk_to_ras() @ np.array([ijk[0], ijk[1], ijk[2] + 2, 1.0])
        np.testing.assert_allclose(inside, whole, atol=1e-9)
    assert oblique_ct.slab(-2, 100).shape[0] == 2
    with pytest.raises(ValueError, match="no slices"):
        oblique_ct.slab(5, 5)


def test_write_overwrites_atomically_and_refuses_unsupported_formats(tmp_path, synthetic_ct):
    target = tmp_path / "out.mha"
    write_volume(synthetic_ct, target)
    write_volume(synthetic_ct.with_array(synthetic_ct.array + 1), target)
    np.testing.assert_array_equal(read_volume(target).array, synthetic_ct.array + 1)
    for name in ("out.nhdr", "out.mhd", "out.png", "out"):
        with pytest.raises(InputError, match="unsupported output format"):
            write_volume(synthetic_ct, tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.mha"]


def test_label_round_trip_and_grid_check(tmp_path, oblique_ct):
    label = data_factory.nodule_label(oblique_ct, value=3)
    path = write_volume(label, tmp_path / "label.nrrd")
    back = read_label_volume(path, reference=oblique_ct)
    assert back.array.dtype == np.uint8
    assert back.metadata["kind"] == "label"
    np.testing.assert_array_equal(back.array, label.array)
    assert back.same_grid(oblique_ct)

    shifted = CTVolume(label.array, label.spacing, np.add(label.origin, (0.5, 0, 0)), label.direction)
    with pytest.raises(InputError, match="origin"):
        check_same_grid(shifted, oblique_ct, "shifted.nrrd")
    other = write_volume(data_factory.synthetic_ct(shape=(12, 40, 40)).with_array(np.zeros((12, 40, 40), np.uint8)), tmp_path / "small.nrrd")
    with pytest.raises(InputError, match=r"small.nrrd: does not lie on the image's voxel grid \(size 40×40×12 vs 48×40×12\)"):
        read_label_volume(other, reference=data_factory.synthetic_ct())


def test_float_label_files_become_integers(tmp_path, synthetic_ct):
    integral = write_volume(synthetic_ct.with_array(np.where(synthetic_ct.array > 0, 2.0, 0.0).astype(np.float32)), tmp_path / "f.nrrd")
    assert read_label_volume(integral).array.dtype == np.uint8
    fractional = write_volume(synthetic_ct.with_array(np.full(synthetic_ct.shape, 0.5, np.float32)), tmp_path / "half.nrrd")
    with pytest.raises(InputError, match="non-integer values"):
        read_label_volume(fractional)


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------

AXIAL_SPACING = (0.7421875, 0.7421875, 2.5)
AXIAL_ORIGIN = (-190.0, -180.5, -300.25)


def test_dicom_series_round_trip(tmp_path):
    ct = data_factory.synthetic_ct(spacing=AXIAL_SPACING, origin=AXIAL_ORIGIN)
    files = data_factory.write_dicom_series(ct, tmp_path / "series", description="Chest 2.5mm")
    volume = read_volume(tmp_path / "series")
    assert_geometry(volume, ct, 1e-9)
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, ct.array)
    assert volume.metadata["format"] == "dicom"
    assert volume.metadata["modality"] == "CT"
    assert volume.metadata["series_description"] == "Chest 2.5mm"
    assert volume.metadata["num_files"] == len(files) == 12


def test_dicom_oblique_series_and_subfolders(tmp_path):
    ct = data_factory.synthetic_ct(
        spacing=AXIAL_SPACING, origin=AXIAL_ORIGIN, direction=data_factory.rotation_matrix((8.0, -5.0, 3.0))
    )
    data_factory.write_dicom_series(ct, tmp_path / "export" / "ST0" / "SE1")
    volume = read_volume(tmp_path / "export")
    assert_geometry(volume, ct, 1e-6)
    np.testing.assert_array_equal(volume.array, ct.array)


def test_dicom_rescale_slope_gives_float_hu(tmp_path, synthetic_ct):
    data_factory.write_dicom_series(synthetic_ct, tmp_path / "s", rescale_slope=0.5, rescale_intercept=-1024)
    volume = read_volume(tmp_path / "s")
    assert volume.array.dtype.kind in "fi"
    np.testing.assert_array_equal(volume.array, synthetic_ct.array)


def _two_series(folder: Path) -> tuple[CTVolume, CTVolume, str, str]:
    big = data_factory.synthetic_ct(spacing=AXIAL_SPACING, origin=AXIAL_ORIGIN)
    small = data_factory.synthetic_ct(shape=(6, 32, 32), spacing=(0.8, 0.8, 5.0), seed=3)
    data_factory.write_dicom_series(big, folder, series_uid="1.2.826.0.1.3680043.8.498.1", description="thin", prefix="A")
    data_factory.write_dicom_series(small, folder, series_uid="1.2.826.0.1.3680043.8.498.2", description="thick", series_number=2, prefix="B")
    return big, small, "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2"


def test_choose_series_by_uid(tmp_path):
    big, small, big_uid, small_uid = _two_series(tmp_path / "two")
    assert list_dicom_series(tmp_path / "two") == [(big_uid, 12, "thin"), (small_uid, 6, "thick")]
    default = read_volume(tmp_path / "two")
    assert default.metadata["series_uid"] == big_uid
    np.testing.assert_array_equal(default.array, big.array)
    chosen = read_volume(tmp_path / "two", series_uid=small_uid)
    assert chosen.metadata["series_uid"] == small_uid
    assert_geometry(chosen, small, 1e-9)
    np.testing.assert_array_equal(chosen.array, small.array)
    with pytest.raises(InputError, match=f"no DICOM series with SeriesInstanceUID 1.2.3; found {big_uid} \\(12 files\\)"):
        read_volume(tmp_path / "two", series_uid="1.2.3")


def test_single_file_dicom_volume(tmp_path):
    ct = data_factory.synthetic_ct(spacing=AXIAL_SPACING, origin=AXIAL_ORIGIN)
    path = data_factory.write_dicom_multiframe(ct, tmp_path / "multi.dcm")
    volume = read_volume(path)
    assert_geometry(volume, ct, 1e-9)
    np.testing.assert_array_equal(volume.array, ct.array)
    assert volume.metadata["format"] == "dicom"
    assert volume.metadata["modality"] == "CT"


# --------------------------------------------------------------------------------------------
# CT validation
# --------------------------------------------------------------------------------------------


def test_validate_ct_accepts_float_and_padded_ct(synthetic_ct):
    validate_ct(synthetic_ct.with_array(synthetic_ct.array.astype(np.float32)))
    padded = synthetic_ct.array.copy()
    padded[:, :4, :] = -3024  # outside the reconstruction circle
    validate_ct(synthetic_ct.with_array(padded))


@pytest.mark.parametrize(
    "transform, message",
    [
        (lambda a: a + 1024, "no air near -1000 HU"),  # stored values, intercept not applied
        (lambda a: (a + 1024) / 4095.0, "no air near -1000 HU"),  # normalised to [0, 1]
        (lambda a: (a - a.mean()) / a.std(), "no air near -1000 HU"),  # z-scored
        (lambda a: a * 1000.0, "implausible"),  # wrong unit
    ],
)
def test_validate_ct_rejects_non_hu(synthetic_ct, transform, message):
    with pytest.raises(InputError, match=message):
        validate_ct(synthetic_ct.with_array(transform(synthetic_ct.array.astype(np.float32))), "x")


def test_validate_false_bypasses_the_ct_check(tmp_path):
    path = write_volume(data_factory.synthetic_mr(), tmp_path / "mr.nrrd")
    with pytest.raises(InputError, match="does not look like CT"):
        read_volume(path)
    assert read_volume(path, validate=False).array.max() > 1000


# --------------------------------------------------------------------------------------------
# Bad input: one clear line naming the path, through the API and through the CLI
# --------------------------------------------------------------------------------------------


def _image(tmp_path: Path, name: str, array: np.ndarray, vector: bool = False) -> Path:
    path = tmp_path / name
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=vector), str(path))
    return path


def _dicom_with(tmp_path: Path, damage) -> Path:
    folder = tmp_path / "dicom"
    files = data_factory.write_dicom_series(data_factory.synthetic_ct(), folder, shuffle=False)
    damage(folder, files)
    return folder


def _truncate(path: Path, keep: float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _make_4d(tmp_path: Path) -> Path:
    frames = [sitk.GetImageFromArray(np.full((4, 5, 6), -1000 + 10 * t, np.int16)) for t in range(3)]
    path = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return path


def _nan_volume(tmp_path: Path, value: float) -> Path:
    ct = data_factory.synthetic_ct()
    array = ct.array.astype(np.float32)
    array[3, 10, 10] = value
    return write_volume(ct.with_array(array), tmp_path / "bad.nrrd")


BAD_INPUTS = {
    "missing path": (lambda t: t / "nowhere.nii.gz", "no such file or folder"),
    "empty folder": (lambda t: (t / "empty").mkdir() or t / "empty", "the folder is empty"),
    "empty file": (lambda t: data_factory.write_text_file(t / "zero.nrrd", ""), "the file is empty"),
    "text file": (lambda t: data_factory.write_text_file(t / "notes.txt"), "not a recognised image format"),
    "text named .nii.gz": (lambda t: data_factory.write_text_file(t / "scan.nii.gz"), "cannot be read as an image"),
    "folder of non-DICOM files": (
        lambda t: [data_factory.write_text_file(t / "docs" / f"f{i}.txt") for i in range(3)] and t / "docs",
        "no DICOM image series found among its 3 files",
    ),
    "folder holding a NIfTI file": (
        lambda t: write_volume(data_factory.synthetic_ct(), t / "vol" / "ct.nii.gz").parent,
        "holds no DICOM series but 1 volume file",
    ),
    "folder of fake .dcm files": (
        lambda t: data_factory.write_text_file(t / "fake" / "a.dcm") and t / "fake",
        "not a valid DICOM file",
    ),
    "2D image": (lambda t: _image(t, "slice.nrrd", np.zeros((40, 48), np.int16)), "is a 2D image"),
    "single slice 3D": (lambda t: _image(t, "one.nii", np.zeros((1, 40, 48), np.int16)), r"is a 2D image \(48×40×1\)"),
    "4D image": (_make_4d, "is a 4D image of size 6×5×4×3"),
    "vector image": (lambda t: _image(t, "rgb.nrrd", np.zeros((4, 5, 6, 3), np.uint8), vector=True), "has 3 components per voxel"),
    "NaN voxel": (lambda t: _nan_volume(t, np.nan), "has 1 NaN or infinite voxels"),
    "inf voxel": (lambda t: _nan_volume(t, np.inf), "has 1 NaN or infinite voxels"),
    "MR volume": (lambda t: write_volume(data_factory.synthetic_mr(), t / "mr.nii.gz"), "does not look like CT in Hounsfield units"),
    "MR DICOM series": (
        lambda t: data_factory.write_dicom_series(data_factory.synthetic_ct(), t / "mr", modality="MR") and t / "mr",
        "DICOM modality is MR, not CT",
    ),
    "truncated DICOM slice": (
        lambda t: _dicom_with(t, lambda folder, files: _truncate(files[5], 0.5)),
        "IM0005_1.dcm: DICOM image whose pixel data cannot be read",
    ),
    "DICOM header cut short": (
        lambda t: _dicom_with(t, lambda folder, files: _truncate(files[2], 0.15)),
        "IM0002_1.dcm: truncated DICOM image",
    ),
    "garbage .dcm in a series": (
        lambda t: _dicom_with(t, lambda folder, files: (folder / "zz.dcm").write_bytes(os.urandom(4096))),
        "zz.dcm: not a valid DICOM file",
    ),
    "missing DICOM slice": (
        lambda t: _dicom_with(t, lambda folder, files: files[6].unlink()),
        "irregular slice spacing",
    ),
    "duplicate DICOM slices": (
        lambda t: _dicom_with(
            t, lambda folder, files: data_factory.write_dicom_series(
                data_factory.synthetic_ct(seed=5), folder, series_uid=_uid(files[0]), prefix="DUP"
            )
        ),
        "slices at the same position",
    ),
    "single DICOM slice file": (
        lambda t: data_factory.write_dicom_series(data_factory.synthetic_ct(), t / "s")[0],
        "is a 2D image .*pass the folder holding the whole series",
    ),
}


def _uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_api_and_cli(tmp_path, run_cli, case):
    make, message = BAD_INPUTS[case]
    path = make(tmp_path)
    with pytest.raises(InputError, match=message) as raised:
        read_volume(path)
    text = str(raised.value)
    assert "\n" not in text
    assert text.startswith(str(path)), text  # names the path first

    code, out, err = run_cli(["data", "info", path], groups=DATA_GROUP)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert lines[0].startswith(f"error: {text}")  # the CLI may add a hint about one of its options


def test_cli_error_in_a_separate_process(tmp_path):
    """The installed entry point prints one line and exits 2 (no traceback)."""
    script = (
        "import sys, lctfound.cli as c; c.COMMAND_MODULES = ('data',); sys.exit(c.main(sys.argv[1:]))"
    )
    missing = tmp_path / "missing.nrrd"
    result = subprocess.run(
        [sys.executable, "-c", script, "data", "info", str(missing)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == f"error: {missing}: no such file or folder\n"


# --------------------------------------------------------------------------------------------
# `lctfound data info`
# --------------------------------------------------------------------------------------------


def test_cli_info_on_a_dicom_folder(tmp_path, run_cli):
    big, small, big_uid, small_uid = _two_series(tmp_path / "two")
    code, out, err = run_cli(["data", "info", tmp_path / "two"], groups=DATA_GROUP)
    assert code == 0, err
    assert f"* {big_uid}  12 files  thin" in out
    assert f"  {small_uid}  6 files  thick" in out
    assert "size (i,j,k): 48 × 40 × 12" in out
    assert "spacing:     0.7421875, 0.7421875, 2.5 mm" in out
    assert "origin:      -190, -180.5, -300.25 mm (LPS)" in out

    code, out, err = run_cli(["data", "info", tmp_path / "two", "--series-uid", small_uid, "--json"], groups=DATA_GROUP)
    assert code == 0, err
    report = json.loads(out)
    assert report["series_uid"] == small_uid
    assert report["size_ijk"] == [32, 32, 6]
    assert report["spacing"] == pytest.approx([0.8, 0.8, 5.0])
    assert [s["files"] for s in report["series"]] == [12, 6]
    assert report["min"] == float(small.array.min())


def test_cli_info_label_and_no_validate(tmp_path, run_cli, synthetic_ct):
    label = write_volume(data_factory.nodule_label(synthetic_ct), tmp_path / "label.nrrd")
    code, out, err = run_cli(["data", "info", label], groups=DATA_GROUP)
    assert code == 2 and "does not look like CT" in err
    code, out, err = run_cli(["data", "info", "--label", label], groups=DATA_GROUP)
    assert code == 0, err
    assert "labels:      0: " in out and "1: " in out
    mr = write_volume(data_factory.synthetic_mr(), tmp_path / "mr.mha")
    code, out, err = run_cli(["data", "info", "--no-validate", mr], groups=DATA_GROUP)
    assert code == 0 and "voxel type:  int16" in out


@pytest.mark.parametrize("args", [["data", "--help"], ["data", "info", "--help"], ["data", "fetch-sample", "--help"]])
def test_cli_help(run_cli, args):
    code, out, err = run_cli(args, groups=DATA_GROUP)
    assert code == 0
    assert "usage: lctfound data" in out


def test_describe_volume(synthetic_ct):
    report = describe_volume(synthetic_ct)
    assert report["size_ijk"] == [48, 40, 12]
    assert report["min"] == synthetic_ct.array.min()
    assert report["percentiles"]["p50"] == pytest.approx(float(np.percentile(synthetic_ct.array, 50)))

"""DICOM SEG export (lctfound.io.dicom_seg): written with highdicom, read back with pydicom/highdicom."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from lctfound.errors import InputError, LCTfoundError
from lctfound.io.dicom_seg import (
    SegmentSpec,
    ct_series_datasets,
    read_dicom_seg_labels,
    source_datasets_of,
    write_ct_series,
    write_dicom_seg,
)
from lctfound.io.volume import read_volume

from data_factory import oblique_ct, synthetic_ct, write_dicom_series


def labels_for(shape):
    labels = np.zeros(shape, np.uint8)
    labels[3:6, 10:20, 10:25] = 4
    labels[7, 5:9, 5:9] = 9
    return labels


def test_derived_ct_series_keeps_values_and_geometry(tmp_path):
    ct = oblique_ct()
    files = write_ct_series(ct_series_datasets(ct), tmp_path / "series")
    assert len(files) == ct.shape[0]
    back = read_volume(tmp_path / "series")
    assert np.array_equal(back.array, ct.array)
    assert back.same_grid(ct, tolerance=1e-3)
    with pytest.raises(LCTfoundError, match="already exists"):
        write_ct_series(ct_series_datasets(ct), tmp_path / "series")


def test_seg_round_trip_against_a_derived_series(tmp_path):
    ct = synthetic_ct()
    sources = ct_series_datasets(ct)
    labels = labels_for(ct.shape)
    specs = [SegmentSpec(4, "Lesion", ("SCT", "49755003", "Morphologically Altered Structure"),
                         ("SCT", "52988006", "Lesion"), (1.0, 0.2, 0.2)),
             SegmentSpec(9, "Vessel"), SegmentSpec(12, "Empty")]
    path = write_dicom_seg(labels, specs, sources, tmp_path / "x.seg.dcm", software_version="test")
    back, names = read_dicom_seg_labels(path, sources)
    assert names == {1: "Lesion", 2: "Vessel", 3: "Empty"}
    assert np.array_equal(back == 1, labels == 4) and np.array_equal(back == 2, labels == 9)
    seg = pydicom.dcmread(str(path))
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert seg.SegmentSequence[1].SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Tissue"
    assert seg.StudyInstanceUID == sources[0].StudyInstanceUID
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced <= {ds.SOPInstanceUID for ds in sources}


def test_seg_refers_to_an_original_series_in_volume_order(tmp_path):
    ct = synthetic_ct()
    files = write_dicom_series(ct, tmp_path / "dicom")  # shuffled file order, no PatientBirthDate
    volume = read_volume(tmp_path / "dicom")
    sources = source_datasets_of(files, volume)
    assert [float(ds.ImagePositionPatient[2]) for ds in sources] == sorted(
        float(ds.ImagePositionPatient[2]) for ds in sources)
    labels = labels_for(ct.shape)
    path = write_dicom_seg(labels, [SegmentSpec(4, "Lesion"), SegmentSpec(9, "Vessel")], sources,
                           tmp_path / "y.seg.dcm")
    back, _ = read_dicom_seg_labels(path, sources)
    assert np.array_equal(back == 1, labels == 4)
    assert pydicom.dcmread(str(path)).PatientID == "SYN0001"


def test_a_series_off_the_grid_is_refused(tmp_path):
    ct = synthetic_ct()
    files = write_dicom_series(ct, tmp_path / "dicom")
    shifted = ct.with_array(ct.array)
    shifted.origin = (ct.origin[0], ct.origin[1], ct.origin[2] + 7.0)
    with pytest.raises(InputError, match="does not lie on the volume's grid"):
        source_datasets_of(files, shifted)
    with pytest.raises(InputError, match="images but the volume"):
        source_datasets_of(files[:-1], ct)


def test_labels_without_a_segment_or_on_another_grid_are_refused(tmp_path):
    ct = synthetic_ct()
    sources = ct_series_datasets(ct)
    labels = labels_for(ct.shape)
    with pytest.raises(LCTfoundError, match=r"label values \[9\] have no segment"):
        write_dicom_seg(labels, [SegmentSpec(4, "Lesion")], sources, tmp_path / "a.dcm")
    with pytest.raises(LCTfoundError, match="does not match"):
        write_dicom_seg(labels[:-1], [SegmentSpec(4, "Lesion"), SegmentSpec(9, "V")], sources, tmp_path / "b.dcm")
    with pytest.raises(LCTfoundError, match="distinct positive"):
        write_dicom_seg(labels, [SegmentSpec(4, "A"), SegmentSpec(4, "B")], sources, tmp_path / "c.dcm")
    assert not any(tmp_path.glob("*.dcm"))

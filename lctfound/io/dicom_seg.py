"""DICOM Segmentation (SEG) export with highdicom, and the CT series a SEG refers to.

A DICOM SEG references the CT images it was drawn on. For a CT read from DICOM those are the
original files (`source_datasets_of`, which checks that they lie on the volume's grid); for a
CT that came from NIfTI/NRRD there are none, so `ct_series_datasets` derives a CT Image Storage
series from the volume (new UIDs, the volume's exact geometry) and `write_ct_series` stores it
next to the SEG.

`write_dicom_seg` writes a BINARY segmentation with one segment per label value (segment
numbers 1..N in label order); each segment carries its name, coded category/type and colour.
`read_dicom_seg_labels` reads one back as a label array on the source grid (for tests and
round-trip checks).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_directory, atomic_file
from ..errors import InputError, LCTfoundError
from .volume import CTVolume

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: (scheme, value, meaning) of the fallback coded concepts (SNOMED CT "Tissue").
TISSUE = ("SCT", "85756007", "Tissue")
MANUFACTURER = "LCTfound"
_GEOMETRY_TOLERANCE_MM = 1e-2


@dataclass(frozen=True)
class SegmentSpec:
    """One segment of a SEG: the label value it comes from, its name, codes and colour (RGB 0..1)."""

    label: int
    name: str
    category: tuple[str, str, str] = TISSUE
    type: tuple[str, str, str] = TISSUE
    color: Optional[tuple[float, float, float]] = None
    algorithm: str = "SEMIAUTOMATIC"
    extra: dict = field(default_factory=dict, compare=False)


def _decimal(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) as precise as fits."""
    for digits in range(12, 4, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise LCTfoundError(f"{value} does not fit a DICOM decimal string")


def ct_series_datasets(
    volume: CTVolume,
    *,
    patient_name: str = "Anonymous^",
    patient_id: str = "LCTFOUND",
    study_uid: Optional[str] = None,
    series_description: str = "LCTfound CT",
    series_number: int = 1,
) -> list:
    """A CT Image Storage dataset per slice of ``volume`` (index k = InstanceNumber - 1), pixel
    values stored as int16 HU (rescale 1, 0)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise LCTfoundError(f"expected a 3D volume, got shape {array.shape}")
    values = np.round(array.astype(np.float64))
    if values.min() < -32768 or values.max() > 32767:
        raise LCTfoundError("the CT values do not fit 16-bit DICOM storage")
    stored = values.astype(np.int16)
    direction = np.asarray(volume.direction, dtype=np.float64)
    origin = np.asarray(volume.origin, dtype=np.float64)
    spacing = volume.spacing
    study_uid = study_uid or generate_uid()
    series_uid, frame_uid = generate_uid(), generate_uid()
    now = datetime.datetime.now()
    date, time_ = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    datasets = []
    for k in range(array.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "CT"
        ds.Manufacturer = MANUFACTURER
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = study_uid
        ds.StudyID = ""
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time_
        ds.SeriesInstanceUID = series_uid
        ds.SeriesDescription = series_description
        ds.SeriesNumber = series_number
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.InstanceNumber = k + 1
        position = origin + k * spacing[2] * direction[:, 2]
        ds.ImagePositionPatient = [_decimal(v) for v in position]
        ds.ImageOrientationPatient = [_decimal(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_decimal(spacing[1]), _decimal(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = _decimal(spacing[2])
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        datasets.append(ds)
    return datasets


def write_ct_series(datasets: Sequence, folder: str | os.PathLike) -> list[Path]:
    """Write ``datasets`` as ``CT0001.dcm``, ... into a NEW folder (published atomically)."""
    target = Path(folder)
    if target.exists():
        raise LCTfoundError(f"{target} already exists; choose a new folder")
    names = []
    with atomic_directory(target) as tmp:
        for number, ds in enumerate(datasets, start=1):
            name = f"CT{number:04d}.dcm"
            ds.save_as(tmp / name, enforce_file_format=True)
            names.append(name)
    return [target / name for name in names]


def _slice_normal(ds) -> np.ndarray:
    orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient]).reshape(2, 3)
    return np.cross(orientation[0], orientation[1])


def source_datasets_of(files: Sequence[str | os.PathLike], volume: CTVolume) -> list:
    """Headers of the DICOM files a volume was read from, ordered along the volume's k axis;
    `InputError` when they do not lie on the volume's grid (the SEG would be misplaced)."""
    import pydicom

    datasets = [pydicom.dcmread(str(path), stop_before_pixels=True) for path in files]
    if len(datasets) != volume.shape[0]:
        raise InputError(f"the DICOM series has {len(datasets)} images but the volume {volume.shape[0]} slices")
    normal = _slice_normal(datasets[0])
    datasets.sort(key=lambda ds: float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])))
    direction = np.asarray(volume.direction, dtype=np.float64)
    for k, ds in enumerate(datasets):
        expected = np.asarray(volume.origin) + k * volume.spacing[2] * direction[:, 2]
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        if (int(ds.Rows), int(ds.Columns)) != volume.shape[1:] or not np.allclose(position, expected,
                                                                                 atol=_GEOMETRY_TOLERANCE_MM):
            raise InputError("the DICOM series does not lie on the volume's grid; export the SEG against a new "
                             "CT series instead")
    return datasets


#: Patient and study attributes highdicom copies from the sources; type 2 (may be empty) in
#: DICOM, but anonymisers often drop them.
_TYPE2_ATTRIBUTES = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                     "ReferringPhysicianName", "StudyDate", "StudyTime")


def _with_type2_attributes(datasets: Sequence) -> list:
    """Copies of ``datasets`` with every missing `_TYPE2_ATTRIBUTES` present and empty."""
    import copy

    completed = []
    for ds in datasets:
        missing = [name for name in _TYPE2_ATTRIBUTES if name not in ds]
        if missing:
            ds = copy.deepcopy(ds)
            for name in missing:
                setattr(ds, name, "")
        completed.append(ds)
    return completed


def _coded(concept: tuple[str, str, str]):
    from highdicom.sr.coding import CodedConcept

    scheme, value, meaning = concept
    return CodedConcept(value=value, scheme_designator=scheme, meaning=meaning)


def write_dicom_seg(
    labels: np.ndarray,
    segments: Sequence[SegmentSpec],
    source_images: Sequence,
    path: str | os.PathLike,
    *,
    series_description: str = "LCTfound segmentation",
    software_version: str = "",
) -> Path:
    """Write the label array ``labels[k, j, i]`` (on the grid of ``source_images``, one image per
    k) as a BINARY DICOM SEG; empty segments are kept as segments without frames."""
    import highdicom as hd
    from pydicom.uid import generate_uid

    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.shape[0] != len(source_images):
        raise LCTfoundError(f"label array {labels.shape} does not match {len(source_images)} source images")
    first = source_images[0]
    if labels.shape[1:] != (int(first.Rows), int(first.Columns)):
        raise LCTfoundError(f"label slices {labels.shape[1:]} do not match the images ({first.Rows}×{first.Columns})")
    if not segments:
        raise LCTfoundError("no segment to export")
    values = [int(spec.label) for spec in segments]
    if len(set(values)) != len(values) or min(values) <= 0:
        raise LCTfoundError("segment labels must be distinct positive values")
    present = set(np.unique(labels).tolist()) - {0}
    unknown = sorted(present - set(values))
    if unknown:
        raise LCTfoundError(f"label values {unknown} have no segment description")
    # Segment numbers must be 1..N; labels keep their order.
    numbered = np.zeros(labels.shape, dtype=np.uint8 if len(segments) < 256 else np.uint16)
    descriptions = []
    for number, spec in enumerate(segments, start=1):
        numbered[labels == spec.label] = number
        color = None
        if spec.color is not None:
            color = hd.color.CIELabColor.from_rgb(*[int(round(255 * min(max(c, 0.0), 1.0))) for c in spec.color])
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=spec.name[:64],
            segmented_property_category=_coded(spec.category),
            segmented_property_type=_coded(spec.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues[spec.algorithm],
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name="LCTfound", version=software_version or "unknown",
                family=_coded(("DCM", "113037", "Learning Algorithm"))),
            display_color=color,
        ))
    seg = hd.seg.Segmentation(
        source_images=_with_type2_attributes(source_images),
        pixel_array=numbered,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=300,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="LCTfound",
        software_versions=software_version or "unknown",
        device_serial_number="none",
        series_description=series_description,
        omit_empty_frames=True,
    )
    target = Path(path)
    with atomic_file(target, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return target


def read_dicom_seg_labels(path: str | os.PathLike, source_images: Sequence) -> tuple[np.ndarray, dict[int, str]]:
    """A SEG as ``(labels[k, j, i], {segment number: label})`` on the grid of ``source_images``
    (ordered along k)."""
    import highdicom as hd

    seg = hd.seg.segread(str(path))
    uids = [ds.SOPInstanceUID for ds in source_images]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=True, ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    names = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    return np.asarray(pixels), names

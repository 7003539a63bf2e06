"""Synthetic test images: small CT-like volumes, label maps, non-CT volumes and DICOM series.

Everything here is deterministic (seeded) and small enough for a 2-core CPU. Import it from
tests as ``import data_factory`` (``Testing/conftest.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from lctfound.io.volume import CTVolume

# Typical HU of the tissues painted into the synthetic chest.
AIR_HU = -1000
LUNG_HU = -850
FAT_HU = -100
SOFT_TISSUE_HU = 40
BONE_HU = 700


def rotation_matrix(angles_deg: Sequence[float] = (20.0, -10.0, 35.0)) -> np.ndarray:
    """A proper rotation (det +1) from x-y-z Euler angles: a non-trivial oblique direction."""
    ax, ay, az = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def chest_phantom(
    shape: tuple[int, int, int] = (12, 40, 48),
    noise_hu: float = 20.0,
    seed: int = 0,
) -> np.ndarray:
    """A (k, j, i) float array in HU: air around an elliptic body with two lungs, a spine and a nodule."""
    rng = np.random.default_rng(seed)
    nk, nj, ni = shape
    k, j, i = np.meshgrid(
        np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij"
    )
    hu = np.full(shape, float(AIR_HU))
    body = (i / 0.9) ** 2 + (j / 0.7) ** 2 <= 1.0
    hu[body] = SOFT_TISSUE_HU
    fat_ring = body & ((i / 0.8) ** 2 + (j / 0.6) ** 2 > 1.0)
    hu[fat_ring] = FAT_HU
    for centre in (-0.4, 0.4):
        lung = ((i - centre) / 0.3) ** 2 + ((j + 0.05) / 0.45) ** 2 <= 1.0
        hu[lung] = LUNG_HU
    spine = (i / 0.12) ** 2 + ((j - 0.5) / 0.12) ** 2 <= 1.0
    hu[spine] = BONE_HU
    nodule = ((i - 0.4) / 0.1) ** 2 + (j / 0.1) ** 2 + (k / 0.5) ** 2 <= 1.0
    hu[nodule] = SOFT_TISSUE_HU
    hu += rng.normal(0.0, noise_hu, size=shape)
    return hu


def synthetic_ct(
    shape: tuple[int, int, int] = (12, 40, 48),
    spacing: tuple[float, float, float] = (0.75, 0.75, 2.5),
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0),
    direction: Optional[np.ndarray] = None,
    dtype: type = np.int16,
    seed: int = 0,
) -> CTVolume:
    """A small chest-like `CTVolume` (int16 HU by default, clipped to −1024..3071)."""
    hu = np.clip(chest_phantom(shape, seed=seed), -1024, 3071)
    array = np.round(hu).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else hu.astype(dtype)
    return CTVolume(array, spacing, origin, np.eye(3) if direction is None else direction)


def oblique_ct(**kwargs) -> CTVolume:
    """`synthetic_ct` with an oblique direction and a non-zero origin (geometry round trips)."""
    kwargs.setdefault("spacing", (0.6269531, 0.8, 2.5))
    kwargs.setdefault("origin", (-170.3, -324.51, -360.123))
    kwargs.setdefault("direction", rotation_matrix())
    return synthetic_ct(**kwargs)


def nodule_label(volume: CTVolume, value: int = 1) -> CTVolume:
    """A uint8 label map on ``volume``'s grid marking its soft-tissue voxels inside the right lung."""
    nk, nj, ni = volume.shape
    k, j, i = np.meshgrid(
        np.linspace(-1, 1, nk), np.linspace(-1, 1, nj), np.linspace(-1, 1, ni), indexing="ij"
    )
    mask = ((i - 0.4) / 0.1) ** 2 + (j / 0.1) ** 2 + (k / 0.5) ** 2 <= 1.0
    return volume.with_array(mask.astype(np.uint8) * np.uint8(value))


def synthetic_mr(shape: tuple[int, int, int] = (12, 40, 48), seed: int = 1) -> CTVolume:
    """An MR-like volume: non-negative intensities 0..~4000 with no air at −1000 (not CT)."""
    rng = np.random.default_rng(seed)
    hu = chest_phantom(shape, noise_hu=0.0, seed=seed)
    mr = np.interp(hu, [AIR_HU, LUNG_HU, FAT_HU, SOFT_TISSUE_HU, BONE_HU], [5, 60, 3800, 1200, 300])
    mr = np.clip(mr + rng.normal(0, 30, size=shape), 0, 4095)
    return CTVolume(mr.astype(np.int16), (0.9, 0.9, 3.0))


def write_dicom_series(
    volume: CTVolume,
    folder: str | Path,
    series_uid: Optional[str] = None,
    study_uid: Optional[str] = None,
    description: str = "Synthetic chest",
    series_number: int = 1,
    modality: str = "CT",
    prefix: str = "IM",
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    shuffle: bool = True,
) -> list[Path]:
    """Write ``volume`` as a CT Image Storage series, one file per slice; return the files.

    Pixels are stored as uint16 ``(HU - intercept) / slope`` like most scanners do. Files are
    written in a shuffled order with names that do not sort by position, so readers must sort
    slices by ImagePositionPatient.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = generate_uid()
    direction = np.asarray(volume.direction, dtype=np.float64)
    spacing = volume.spacing
    origin = np.asarray(volume.origin, dtype=np.float64)
    stored = np.round((np.asarray(volume.array, dtype=np.float64) - rescale_intercept) / rescale_slope)
    if stored.min() < 0 or stored.max() > 65535:
        raise ValueError("volume does not fit uint16 storage with this rescale")
    stored = stored.astype(np.uint16)
    order = np.random.default_rng(7).permutation(volume.shape[0]) if shuffle else range(volume.shape[0])
    today = datetime.date(2024, 1, 2).strftime("%Y%m%d")
    files = []
    for file_index, k in enumerate(order):
        k = int(k)
        position = origin + k * spacing[2] * direction[:, 2]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientName = "Synthetic^Phantom"
        ds.PatientID = "SYN0001"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.StudyDate = ds.SeriesDate = today
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds(v) for v in position]
        ds.ImageOrientationPatient = [_ds(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [_ds(spacing[1]), _ds(spacing[0])]  # row spacing (j), column spacing (i)
        ds.SliceThickness = _ds(spacing[2])
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = f"{rescale_intercept:g}"
        ds.RescaleSlope = f"{rescale_slope:g}"
        ds.RescaleType = "HU"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"{prefix}{file_index:04d}_{series_number}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_text_file(path: str | Path, text: str = "this is not an image\n") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _ds(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) as precise as fits."""
    for digits in range(12, 4, -1):
        text = f"{float(value):.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"{value} does not fit a DICOM decimal string")


def write_dicom_multiframe(volume: CTVolume, path: str | Path, rescale_intercept: float = -1024.0) -> Path:
    """Write ``volume`` as one multi-frame DICOM file (frames along k; axial geometry only)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stored = np.round(np.asarray(volume.array, dtype=np.float64) - rescale_intercept).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.NumberOfFrames = volume.shape[0]
    ds.ImagePositionPatient = [_ds(v) for v in volume.origin]
    ds.ImageOrientationPatient = [_ds(v) for v in (*volume.direction[:, 0], *volume.direction[:, 1])]
    ds.PixelSpacing = [_ds(volume.spacing[1]), _ds(volume.spacing[0])]
    ds.SpacingBetweenSlices = _ds(volume.spacing[2])
    ds.SliceThickness = _ds(volume.spacing[2])
    ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = f"{rescale_intercept:g}"
    ds.RescaleSlope = "1"
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def fewshot_phantom(slices: int = 8, size: int = 64, seed: int = 0):
    """Few-shot test volume (slices, size, size) float32 HU with two masks: a lesion (+40 HU disc)
    on every slice and, on slices ≥ 4, a denser +150 HU blob elsewhere that a first model
    trained on slices 0–3 takes for lesion (the false positive an annotator erases)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    scale = size / 64
    volume = rng.normal(LUNG_HU, 20, (slices, size, size)).astype(np.float32)
    lesion = np.zeros((slices, size, size), dtype=bool)
    blob = np.zeros_like(lesion)
    for k in range(slices):
        lesion[k] = (yy - 22 * scale) ** 2 + (xx - 22 * scale) ** 2 < ((7 + k % 3) * scale) ** 2
        if k >= 4:
            blob[k] = (yy - 44 * scale) ** 2 + (xx - 42 * scale) ** 2 < (6 * scale) ** 2
    volume[lesion] = SOFT_TISSUE_HU + rng.normal(0, 10, lesion.sum())
    volume[blob] = 150 + rng.normal(0, 10, blob.sum())
    return volume, lesion, blob

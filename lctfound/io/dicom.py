"""DICOM series discovery and reading (GDCM through SimpleITK, headers through pydicom).

A folder (and its sub-folders) may hold several series; `list_dicom_series` lists them
largest first and `read_dicom_series` reads one, sorted by slice position, with rescale
slope/intercept applied. Problems a user can hit are reported as one-line `InputError`s:
no DICOM at all, a SeriesInstanceUID that is not there, a truncated or garbage file among
the slices (GDCM silently skips those, which would leave a hole in the volume), slices at
duplicate or irregular positions, a single 2D slice.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import numpy as np

from ..errors import InputError

DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
# Single-file volume formats, named in the error when a folder holds one instead of DICOM.
VOLUME_EXTENSIONS = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Header tags read per series (SimpleITK metadata keys are "gggg|eeee").
TAG_MODALITY = "0008|0060"
TAG_SERIES_DESCRIPTION = "0008|103e"
TAG_IMAGE_POSITION = "0020|0032"


class DicomSeriesInfo(NamedTuple):
    """One series found in a folder: its SeriesInstanceUID, how many files, its description."""

    uid: str
    num_files: int
    description: str


@dataclass
class _Series:
    uid: str
    files: list[str]
    description: str = ""
    modality: str = ""


@dataclass
class _BadFile:
    path: str
    reason: str
    uid: Optional[str] = None  # the series it claims to belong to, when its header says so


@dataclass
class _Scan:
    folder: Path
    series: list[_Series] = field(default_factory=list)
    bad_files: list[_BadFile] = field(default_factory=list)
    num_files: int = 0
    volume_files: list[str] = field(default_factory=list)


@contextlib.contextmanager
def quiet_itk() -> Iterator[None]:
    """Silence ITK's own warnings on stderr (we report problems ourselves)."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(previous)


def has_dicom_magic(path: str | os.PathLike) -> bool:
    """True when the file carries the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """A DICOM extension or the Part 10 magic."""
    return str(path).lower().endswith(DICOM_EXTENSIONS) or has_dicom_magic(path)


def _header(path: str) -> tuple[str, str, str]:
    """(SeriesInstanceUID, SeriesDescription, Modality) from a file header, '' when absent."""
    import pydicom

    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            specific_tags=["SeriesInstanceUID", "SeriesDescription", "Modality"],
        )
    except Exception:  # noqa: BLE001 - a header we cannot read just has no description
        return "", "", ""
    return (
        str(ds.get("SeriesInstanceUID", "") or ""),
        str(ds.get("SeriesDescription", "") or "").strip(),
        str(ds.get("Modality", "") or "").strip(),
    )


def _diagnose_orphan(path: str) -> Optional[_BadFile]:
    """Why GDCM left a DICOM-looking file out of every series; None when it is harmless.

    Harmless: DICOMDIR, structured reports, RT structure sets and other objects without
    pixels. Everything else (unparseable bytes, an empty data set, pixels GDCM refused,
    typically a truncated slice) is a bad file.
    """
    import pydicom

    try:
        ds = pydicom.dcmread(path)
    except Exception as error:  # noqa: BLE001 - pydicom raises many kinds for broken bytes
        kind = "not a valid DICOM file" if isinstance(error, pydicom.errors.InvalidDicomError) else "unreadable DICOM file"
        return _BadFile(path, f"{kind} (corrupt or truncated?)")
    if len(ds) == 0:
        return _BadFile(path, "truncated DICOM file (no data set after the file header)")
    uid = str(ds.get("SeriesInstanceUID", "") or "") or None
    if "PixelData" in ds:
        return _BadFile(path, "DICOM image whose pixel data cannot be read (truncated?)", uid)
    sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID", "")
    sop_name = getattr(sop_class, "name", "") or ""
    if "Image Storage" in sop_name or "Rows" in ds:
        return _BadFile(path, "truncated DICOM image (no pixel data)", uid)
    return None


def _scan_folder(folder: Path) -> _Scan:
    import SimpleITK as sitk

    scan = _Scan(folder)
    by_uid: dict[str, _Series] = {}
    with quiet_itk():
        for directory, subdirs, filenames in os.walk(folder):
            subdirs.sort()
            files = [f for f in filenames if not f.startswith(".")]
            scan.num_files += len(files)
            if not files:
                continue
            in_series: set[str] = set()
            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(directory):
                names = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(directory, uid))
                in_series.update(os.path.normpath(n) for n in names)
                # A series split over sub-folders: keep the folder with the most slices.
                if uid not in by_uid or len(names) > len(by_uid[uid].files):
                    by_uid[uid] = _Series(uid, names)
            for name in sorted(files):
                path = os.path.normpath(os.path.join(directory, name))
                if name.lower().endswith(VOLUME_EXTENSIONS):
                    scan.volume_files.append(path)
                if path in in_series or not os.path.isfile(path) or not looks_like_dicom(path):
                    continue
                bad = _diagnose_orphan(path)
                if bad is not None:
                    scan.bad_files.append(bad)
    for series in by_uid.values():
        _, series.description, series.modality = _header(series.files[0])
    scan.series = sorted(by_uid.values(), key=lambda s: (-len(s.files), s.uid))
    return scan


def _check_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder).expanduser()
    if not folder.exists():
        raise InputError(f"{folder}: no such file or folder")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a folder")
    return folder


def list_dicom_series(folder: str | os.PathLike) -> list[DicomSeriesInfo]:
    """The DICOM image series under ``folder`` (sub-folders included), largest first.

    Each entry is ``(uid, num_files, description)``. An empty list means no DICOM images.
    """
    scan = _scan_folder(_check_folder(folder))
    return [DicomSeriesInfo(s.uid, len(s.files), s.description) for s in scan.series]


def _select_series(scan: _Scan, series_uid: Optional[str]) -> _Series:
    folder = scan.folder
    if not scan.series:
        if scan.num_files == 0:
            raise InputError(f"{folder}: the folder is empty")
        if scan.bad_files:
            bad = scan.bad_files[0]
            raise InputError(f"{folder}: no readable DICOM series; {bad.path}: {bad.reason}")
        if scan.volume_files:
            raise InputError(
                f"{folder}: holds no DICOM series but {len(scan.volume_files)} volume file(s) such as "
                f"{scan.volume_files[0]}; pass that file instead of the folder"
            )
        raise InputError(
            f"{folder}: no DICOM image series found among its {scan.num_files} files "
            "(expected DICOM slices or a NIfTI/NRRD/MHA file)"
        )
    if series_uid is None:
        chosen = scan.series[0]
        tied = [s for s in scan.series if len(s.files) == len(chosen.files)]
        if len(tied) > 1:
            listing = ", ".join(f"{s.uid} ({len(s.files)} files{', ' + repr(s.description) if s.description else ''})"
                                for s in tied)
            raise InputError(f"{folder}: holds {len(tied)} image series of the same size ({listing}), so which one "
                             "is meant is unclear; pass a folder that holds only that series",
                             option_hints={"series_uid": "or choose one with --series-uid UID"})
    else:
        matches = [s for s in scan.series if s.uid == series_uid.strip()]
        if not matches:
            available = ", ".join(f"{s.uid} ({len(s.files)} files)" for s in scan.series)
            raise InputError(f"{folder}: no DICOM series with SeriesInstanceUID {series_uid}; found {available}")
        chosen = matches[0]
    for bad in scan.bad_files:
        if bad.uid in (None, chosen.uid):
            raise InputError(f"{bad.path}: {bad.reason}; remove it or re-export the series")
    return chosen


def _check_slice_positions(reader, series: _Series, direction: np.ndarray, folder: Path) -> None:
    """Refuse duplicate or irregularly spaced slices (missing files, mixed acquisitions)."""
    positions = []
    for index in range(len(series.files)):
        if not reader.HasMetaDataKey(index, TAG_IMAGE_POSITION):
            return  # no positions (e.g. a multi-frame object): nothing to check
        text = reader.GetMetaData(index, TAG_IMAGE_POSITION)
        try:
            positions.append([float(v) for v in text.strip().split("\\")])
        except ValueError:
            return
    if len(positions) < 3:
        return
    normal = np.cross(direction[:, 0], direction[:, 1])
    distances = np.sort(np.asarray(positions) @ normal)
    steps = np.diff(distances)
    typical = float(np.median(steps))
    if np.any(steps < 1e-3) or typical <= 0:
        duplicates = int(np.sum(steps < 1e-3))
        raise InputError(
            f"{folder}: series {series.uid} has {duplicates} slices at the same position "
            "(several acquisitions in one series?); export them as separate series"
        )
    if np.max(np.abs(steps - typical)) > max(0.1 * typical, 0.01):
        raise InputError(
            f"{folder}: series {series.uid} has irregular slice spacing "
            f"({steps.min():.3g} to {steps.max():.3g} mm, typically {typical:.3g} mm): missing slices?"
        )


def _check_series_memory(series: _Series, folder: Path) -> None:
    """Refuse a series that would not fit in memory, from its first slice's header, before reading it."""
    import pydicom

    from .headers import check_memory

    try:
        ds = pydicom.dcmread(series.files[0], stop_before_pixels=True,
                             specific_tags=["Rows", "Columns", "NumberOfFrames"])
        voxels = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - an unreadable header is reported when the series is read
        return
    # 4 bytes per voxel: rescaled values may be float32.
    check_memory(voxels * len(series.files) * 4, f"{folder}: series {series.uid} ({len(series.files)} slices)")


def _check_slice_sizes(series: _Series, folder: Path) -> None:
    """Refuse a series whose slices do not all have the same rows × columns (ITK's message is cryptic)."""
    import pydicom

    sizes: dict = {}
    for path in series.files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns"])
            key = (int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0))
        except Exception:  # noqa: BLE001 - unreadable headers are reported by the caller
            continue
        sizes.setdefault(key, []).append(path)
    if len(sizes) > 1:
        ordered = sorted(sizes.items(), key=lambda item: -len(item[1]))
        listing = ", ".join(f"{c}×{r} in {len(files)} file(s)" for (c, r), files in ordered)
        odd = ordered[-1][1][0]
        raise InputError(f"{folder}: series {series.uid} mixes slices of different rows and columns ({listing}, "
                         f"e.g. {odd}); remove the odd slices or export the series again")


def read_dicom_series(folder: str | os.PathLike, series_uid: Optional[str] = None):
    """Read one series as a SimpleITK image (the largest unless ``series_uid`` is given).

    Returns ``(image, metadata)``; the metadata holds the series UID, description, modality
    and number of files. Rescale slope/intercept are applied by GDCM.
    """
    import SimpleITK as sitk

    folder = _check_folder(folder)
    scan = _scan_folder(folder)
    series = _select_series(scan, series_uid)
    _check_series_memory(series, folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(series.files)
    reader.MetaDataDictionaryArrayUpdateOn()
    with quiet_itk():
        try:
            image = reader.Execute()
        except RuntimeError as error:
            from .volume import itk_error_summary

            _check_slice_sizes(series, folder)
            raise InputError(
                f"{folder}: series {series.uid} cannot be read ({itk_error_summary(error)})"
            ) from None
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(image.GetDimension(), -1)
    if len(series.files) > 1:
        sizes = {(reader.GetMetaData(i, "0028|0011").strip(), reader.GetMetaData(i, "0028|0010").strip())
                 for i in range(len(series.files))
                 if reader.HasMetaDataKey(i, "0028|0010") and reader.HasMetaDataKey(i, "0028|0011")}
        if len(sizes) > 1:
            _check_slice_sizes(series, folder)
    if image.GetDimension() == 3 and len(series.files) > 1:
        _check_slice_positions(reader, series, direction, folder)
    metadata = {
        "format": "dicom",
        "series_uid": series.uid,
        "series_description": series.description,
        "modality": series.modality,
        "num_files": len(series.files),
    }
    return image, metadata

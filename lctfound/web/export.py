"""Export of the edited segmentation and the CT from the web app's scene (no trame here).

Formats: ``.seg.nrrd`` (names, colours, terminology kept), a NIfTI labelmap (values fixed by
structure name, `lctfound.mrml.labels_from_segmentation`), DICOM SEG (highdicom, against the
original DICOM series when the CT came from one, else against a CT series derived from the
volume and written beside it; the download is then a zip of both), and the volume as NIfTI or
NRRD. Files go into the server's export folder under new names (nothing is overwritten).
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..atomic import atomic_file
from ..errors import LCTfoundError

#: kind → (button text, file suffix, MIME type of the download)
KINDS: dict[str, tuple[str, str, str]] = {
    "seg_nrrd": ("Segmentation (.seg.nrrd)", ".seg.nrrd", "application/octet-stream"),
    "labelmap": ("Label map (NIfTI)", "_labels.nii.gz", "application/gzip"),
    "dicom_seg": ("DICOM SEG", ".seg.dcm", "application/dicom"),
    "volume_nifti": ("Volume (NIfTI)", ".nii.gz", "application/gzip"),
    "volume_nrrd": ("Volume (NRRD)", ".nrrd", "application/octet-stream"),
}
SEGMENTATION_KINDS = ("seg_nrrd", "labelmap", "dicom_seg")


@dataclass(frozen=True)
class ExportResult:
    """What was written: the file to download (``path``), its download name and MIME type,
    every file written, and a note for the page."""

    path: Path
    download_name: str
    mime: str
    files: tuple[Path, ...]
    note: str = ""


def file_stem(name: str) -> str:
    """A file-name-safe form of a node name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return stem or "lctfound"


def new_path(folder: Path, stem: str, suffix: str) -> Path:
    """``folder/stem+suffix``, or ``stem-2``, ``stem-3``… when taken."""
    candidate, number = folder / f"{stem}{suffix}", 1
    def taken(path: Path) -> bool:  # a DICOM SEG also takes <stem>_ct/ and <stem>_seg_and_ct.zip
        stem_path = path.name[: -len(suffix)]
        return path.exists() or (suffix == ".seg.dcm" and (path.with_name(stem_path + "_ct").exists()
                                                           or path.with_name(stem_path + "_seg_and_ct.zip").exists()))

    while taken(candidate):
        number += 1
        candidate = folder / f"{stem}-{number}{suffix}"
    return candidate


def export(kind: str, volume_node: Any, segmentation_node: Any, folder: Path,
           dicom_source: Optional[tuple[Path, str]] = None) -> ExportResult:
    """Write one export of ``kind`` (see `KINDS`) into ``folder``."""
    if kind not in KINDS:
        raise LCTfoundError(f"unknown export {kind!r}")
    if volume_node is None:
        raise LCTfoundError("open a CT first")
    if kind in SEGMENTATION_KINDS and (segmentation_node is None
                                       or segmentation_node.GetSegmentation().GetNumberOfSegments() == 0):
        raise LCTfoundError("there is no segment to export: add and paint a segment first")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _, suffix, mime = KINDS[kind]
    base = file_stem(volume_node.GetName() if kind.startswith("volume") else segmentation_node.GetName())
    path = new_path(folder, base, suffix)
    download = f"{base}{suffix}"
    if kind == "seg_nrrd":
        from ..mrml import save_segmentation

        save_segmentation(segmentation_node, path)
        return ExportResult(path, download, mime, (path,))
    if kind == "labelmap":
        from ..mrml import save_segmentation

        names = save_segmentation(segmentation_node, path, reference_volume_node=volume_node) or {}
        note = "labels: " + ", ".join(f"{value} = {name}" for value, name in sorted(names.items()))
        return ExportResult(path, download, mime, (path,), note)
    if kind == "dicom_seg":
        return _export_dicom_seg(volume_node, segmentation_node, path, download, dicom_source)
    from ..mrml import save_volume

    save_volume(volume_node, path)
    return ExportResult(path, download, mime, (path,))


def segment_specs(segmentation_node: Any, names: dict[int, str]) -> list:
    """`SegmentSpec` per exported label: name, colour of its segment, codes from the structure
    table (SNOMED "Tissue" when the name has none)."""
    from ..io.dicom_seg import TISSUE, SegmentSpec
    from ..mrml.structures import default_structure_table

    table = default_structure_table()
    segmentation = segmentation_node.GetSegmentation()
    colours = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        colours.setdefault(segment.GetName(), tuple(segment.GetColor()))
    specs = []
    for value, name in sorted(names.items()):
        structure = table.find(name)
        entry = structure.terminology_entry if structure is not None else None
        category = (entry.category.scheme, entry.category.value, entry.category.meaning) if entry else TISSUE
        kind = (entry.type.scheme, entry.type.value, entry.type.meaning) if entry else TISSUE
        colour = colours.get(name) or (structure.color if structure is not None else None)
        specs.append(SegmentSpec(value, name, category, kind, colour))
    return specs


def _dicom_files(folder: Path, series_uid: str) -> list[str]:
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not uids:
        return []
    if series_uid not in uids:  # the series read: the one with the most files
        series_uid = max(uids, key=lambda u: len(reader.GetGDCMSeriesFileNames(str(folder), u)))
    uid = series_uid
    return list(reader.GetGDCMSeriesFileNames(str(folder), uid))


def _export_dicom_seg(volume_node: Any, segmentation_node: Any, path: Path, download: str,
                      dicom_source: Optional[tuple[Path, str]]) -> ExportResult:
    from .. import __version__
    from ..errors import InputError
    from ..io.dicom_seg import ct_series_datasets, source_datasets_of, write_ct_series, write_dicom_seg
    from ..mrml import ctvolume_from_volume_node, labels_from_segmentation

    ct = ctvolume_from_volume_node(volume_node)
    labels, names = labels_from_segmentation(segmentation_node, volume_node)
    if not names:
        raise LCTfoundError("there is no labelled segment to export")
    specs = segment_specs(segmentation_node, names)
    sources = None
    if dicom_source is not None:
        folder, uid = dicom_source
        try:
            files = _dicom_files(folder, uid or str(ct.metadata.get("series_uid", "")))
            sources = source_datasets_of(files, ct) if files else None
        except InputError:
            sources = None
    if sources is not None:
        write_dicom_seg(labels, specs, sources, path, software_version=__version__)
        return ExportResult(path, download, "application/dicom", (path,),
                            "DICOM SEG referencing the original CT series")
    datasets = ct_series_datasets(ct, series_description=f"{volume_node.GetName()} (LCTfound export)")
    series_folder = path.with_name(path.name[: -len(".seg.dcm")] + "_ct")
    written = write_ct_series(datasets, series_folder)
    write_dicom_seg(labels, specs, datasets, path, software_version=__version__)
    archive = path.with_name(path.name[: -len(".seg.dcm")] + "_seg_and_ct.zip")
    with atomic_file(archive, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as bundle:
            bundle.write(path, path.name)
            for file in written:
                bundle.write(file, f"{series_folder.name}/{file.name}")
    return ExportResult(archive, download.replace(".seg.dcm", "_seg_and_ct.zip"), "application/zip",
                        (path, archive, *written),
                        "the CT did not come from DICOM: the SEG references a CT series derived from it "
                        "(both in the zip)")

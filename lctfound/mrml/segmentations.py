"""Segmentation nodes ↔ label arrays, with names, colours, terminology, review status and undo.

Arrays are KJI (slice, row, column) on the voxel grid of a reference volume node, like
`CTVolume.array`. Segments are named and coloured from the fixed structure table
(`structures.json`) and tagged with standard terminology, so an annotator's corrections are
read back with label values fixed by *name* (`labels_from_segmentation`).

Everything takes the scene or nodes explicitly (no ``slicer.mrmlScene``), validates its
arguments in Python and raises `LCTfoundError` before anything invalid reaches C++.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import InputError, LCTfoundError
from ._compat import slicer, vtk
from .scene import add_node, ensure_segmentations_logic, node_scene, require_node, require_scene
from .structures import Structure, StructureTable, default_structure_table, normalize_name
from .volumes import (
    _suffix,
    array_from_image_data,
    ijk_to_ras_of,
    load_volume,
    parent_transform_matrix,
    storage_node_target,
    vtk_matrix_from_array,
)

SEGMENTATION_SUFFIXES = (".seg.nrrd",)
LABELMAP_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")

# Slicer's segment status values (vtkSlicerSegmentationsModuleLogic.SegmentStatus).
STATUSES = ("NotStarted", "InProgress", "Completed", "Flagged")
_STATUS_ALIASES = {"reviewed": "Completed", "done": "Completed", "ai": "InProgress"}

LABEL_TAG = "LCTfound.Label"
_TERMINOLOGY_TAG = slicer.vtkSegment.GetTerminologyEntryTagName()

_Logic = slicer.vtkSlicerSegmentationsModuleLogic


# --- validation helpers ---------------------------------------------------------------------

def _require_segmentation(seg_node: Any) -> Any:
    require_node(seg_node, "vtkMRMLSegmentationNode", "segmentation node")
    if seg_node.GetSegmentation() is None:
        raise LCTfoundError(f"segmentation node {seg_node.GetName()!r} has no segmentation")
    return seg_node


def _segment_names(seg_node: Any) -> list[str]:
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]


def segment_ids(seg_node: Any) -> list[str]:
    """IDs of all segments, in display order."""
    _require_segmentation(seg_node)
    segmentation = seg_node.GetSegmentation()
    return [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]


def resolve_segment_id(seg_node: Any, segment: str) -> str:
    """The ID of a segment given its ID or its name (exact, then case/underscore-insensitive)."""
    _require_segmentation(seg_node)
    if not isinstance(segment, str) or not segment:
        raise LCTfoundError(f"segment must be given by a non-empty ID or name, got {segment!r}")
    segmentation = seg_node.GetSegmentation()
    if segmentation.GetSegment(segment) is not None:
        return segment
    ids = segment_ids(seg_node)
    names = _segment_names(seg_node)
    exact = [sid for sid, name in zip(ids, names) if name == segment]
    if len(exact) == 1:
        return exact[0]
    loose = [sid for sid, name in zip(ids, names) if normalize_name(name) == normalize_name(segment)]
    if len(exact) > 1 or len(loose) > 1:
        raise LCTfoundError(
            f"segmentation {seg_node.GetName()!r} has several segments named {segment!r}; use a segment ID"
        )
    if len(loose) == 1:
        return loose[0]
    listing = ", ".join(repr(n) for n in names) or "none"
    raise LCTfoundError(f"segmentation {seg_node.GetName()!r} has no segment {segment!r} (segments: {listing})")


def get_segment_tag(segment: Any, tag: str) -> str | None:
    """Value of a vtkSegment tag, None when absent."""
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def segment_terminology(seg_node: Any, segment: str) -> str:
    """The segment's terminology-entry string ('' when it has none)."""
    segment_id = resolve_segment_id(seg_node, segment)
    return get_segment_tag(seg_node.GetSegmentation().GetSegment(segment_id), _TERMINOLOGY_TAG) or ""


def _check_same_scene(scene: Any, node: Any, what: str) -> None:
    if node.GetScene() is not scene:
        raise LCTfoundError(f"{what} {node.GetName()!r} belongs to another MRML scene")


# --- geometry -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """A voxel grid: KJI ``shape`` and the IJK→RAS matrix in the segmentation's frame."""

    shape: tuple[int, int, int]
    ijk_to_ras: np.ndarray


def _volume_grid(volume_node: Any, seg_node: Any | None = None) -> Grid:
    """Grid of ``volume_node`` expressed in the coordinate frame of ``seg_node``."""
    require_node(volume_node, "vtkMRMLScalarVolumeNode", "reference volume node")
    image = volume_node.GetImageData()
    if image is None:
        raise LCTfoundError(f"reference volume {volume_node.GetName()!r} has no image data")
    i, j, k = image.GetDimensions()
    matrix = ijk_to_ras_of(volume_node)
    to_world = parent_transform_matrix(volume_node)
    if to_world is not None:
        matrix = to_world @ matrix
    if seg_node is not None:
        seg_to_world = parent_transform_matrix(seg_node)
        if seg_to_world is not None:
            matrix = np.linalg.inv(seg_to_world) @ matrix
    return Grid((k, j, i), matrix)


def _reference_volume(seg_node: Any, reference_volume_node: Any | None) -> Any:
    if reference_volume_node is not None:
        return require_node(reference_volume_node, "vtkMRMLScalarVolumeNode", "reference volume node")
    node = seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole())
    if node is None:
        raise LCTfoundError(
            f"segmentation {seg_node.GetName()!r} has no reference volume; pass reference_volume_node"
        )
    return require_node(node, "vtkMRMLScalarVolumeNode", "reference volume node")


def _oriented_image(grid: Grid, array: np.ndarray | None = None) -> "slicer.vtkOrientedImageData":
    """A vtkOrientedImageData on ``grid``; holding a uint8 copy of ``array`` if given."""
    image = slicer.vtkOrientedImageData()
    k, j, i = grid.shape
    if array is None:
        image.SetExtent(0, i - 1, 0, j - 1, 0, k - 1)
    else:
        from ._compat import numpy_support

        image.SetDimensions(i, j, k)
        scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array, dtype=np.uint8).ravel(), deep=True)
        image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(vtk_matrix_from_array(grid.ijk_to_ras))
    return image


def _set_reference_geometry(seg_node: Any, grid: Grid, volume_node: Any | None) -> None:
    """Reference image geometry (conversion parameter) and, with a volume, the node reference role."""
    converter = slicer.vtkSegmentationConverter
    geometry = converter.SerializeImageGeometry(_oriented_image(grid))
    seg_node.GetSegmentation().SetConversionParameter(converter.GetReferenceImageGeometryParameterName(), geometry)
    if volume_node is not None:
        # The role is what DICOM SEG export and Slicer's editor use to find the source volume.
        seg_node.SetNodeReferenceID(seg_node.GetReferenceImageGeometryReferenceRole(), volume_node.GetID())


def _check_mask(mask: Any, grid: Grid, volume_name: str, what: str = "mask") -> np.ndarray:
    if mask is None:
        raise LCTfoundError(f"{what} is missing (None)")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise LCTfoundError(f"{what} must be 3-D (slices, rows, columns), got shape {mask.shape}")
    if mask.shape != grid.shape:
        raise LCTfoundError(
            f"{what} shape {mask.shape} differs from the grid of volume {volume_name!r} {grid.shape} "
            "(arrays are KJI: slices, rows, columns)"
        )
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_ or np.issubdtype(mask.dtype, np.floating)):
        raise LCTfoundError(f"{what} has unsupported dtype {mask.dtype}")
    return mask


# --- segments: create, fill, read ----------------------------------------------------------

def _apply_structure(segment: Any, name: str, table: StructureTable, color: Sequence[float] | None,
                     terminology: str | None) -> Structure | None:
    structure = table.find(name, terminology)
    if color is None:
        # Stable across processes (str hash() is salted): a colour derived from the name.
        color = structure.color if structure is not None else table.color_for_label(
            100 + zlib.crc32(normalize_name(name).encode("utf-8")) % 997
        )
    if len(tuple(color)) != 3:
        raise LCTfoundError(f"segment colour must be (r, g, b) in 0..1, got {color!r}")
    segment.SetColor(*(float(c) for c in color))
    text = terminology if terminology is not None else (structure.terminology if structure is not None else "")
    if text:
        segment.SetTag(_TERMINOLOGY_TAG, text)
    return structure


def add_segment(
    seg_node: Any,
    name: str,
    mask: np.ndarray | None = None,
    reference_volume_node: Any | None = None,
    table: StructureTable | None = None,
    color: Sequence[float] | None = None,
    terminology: str | None = None,
    segment_id: str | None = None,
    status: str | int | None = None,
) -> str:
    """Add a named segment (colour and terminology from the table unless given); returns its ID.

    With ``mask`` the segment is filled (values > 0 are inside) on the reference volume's grid.
    """
    _require_segmentation(seg_node)
    if not isinstance(name, str) or not name.strip():
        raise LCTfoundError(f"segment name must be a non-empty string, got {name!r}")
    scene = node_scene(seg_node, "segmentation")
    ensure_segmentations_logic(scene)
    table = table or default_structure_table()
    name = name.strip()
    segmentation = seg_node.GetSegmentation()
    base_id = segment_id or name
    new_id = segmentation.GenerateUniqueSegmentID(base_id)
    added = segmentation.AddEmptySegment(new_id, name)
    if not added:
        raise LCTfoundError(
            f"could not add segment {name!r}: the segmentation converters are not registered "
            "(call ensure_segmentations_logic(scene) first)"
        )
    segment = segmentation.GetSegment(added)
    structure = _apply_structure(segment, name, table, color, terminology)
    if structure is not None:
        segment.SetTag(LABEL_TAG, str(structure.label))
    if status is not None:
        set_segment_status(seg_node, added, status)
    if mask is not None:
        set_segment_from_mask(seg_node, added, mask, reference_volume_node)
    return added


def set_segment_from_mask(seg_node: Any, segment: str, mask: np.ndarray, reference_volume_node: Any | None = None) -> None:
    """Replace the content of one segment with ``mask`` (KJI on the reference grid; > 0 is inside).

    Other segments are not changed, also where they overlap. To keep the previous content
    restorable, call `save_state_for_undo` (or `snapshot`) first.
    """
    _require_segmentation(seg_node)
    segment_id = resolve_segment_id(seg_node, segment)
    volume = _reference_volume(seg_node, reference_volume_node)
    grid = _volume_grid(volume, seg_node)
    mask = _check_mask(mask, grid, volume.GetName())
    ensure_segmentations_logic(node_scene(seg_node, "segmentation"))
    image = _oriented_image(grid, (mask > 0).astype(np.uint8))
    ok = _Logic.SetBinaryLabelmapToSegment(image, seg_node, segment_id, _Logic.MODE_REPLACE, image.GetExtent())
    if not ok:
        raise LCTfoundError(f"could not write the mask into segment {segment!r} of {seg_node.GetName()!r}")


def mask_from_segment(seg_node: Any, segment: str, reference_volume_node: Any | None = None) -> np.ndarray:
    """A uint8 copy (0/1) of one segment on the full reference grid, KJI.

    This is how an annotator's edit is read back.
    """
    _require_segmentation(seg_node)
    segment_id = resolve_segment_id(seg_node, segment)
    volume = _reference_volume(seg_node, reference_volume_node)
    grid = _volume_grid(volume, seg_node)
    return _mask_on_grid(seg_node, segment_id, grid)


def _mask_on_grid(seg_node: Any, segment_id: str, grid: Grid) -> np.ndarray:
    segment = seg_node.GetSegmentation().GetSegment(segment_id)
    representation = slicer.vtkOrientedImageData()
    ok = _Logic.GetSegmentBinaryLabelmapRepresentation(seg_node, segment_id, representation, False)
    if not ok:
        raise LCTfoundError(f"could not read segment {segment.GetName()!r} of {seg_node.GetName()!r}")
    extent = representation.GetExtent()
    if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5] \
            or representation.GetPointData().GetScalars() is None:
        return np.zeros(grid.shape, dtype=np.uint8)
    reference = _oriented_image(grid)
    resampled = slicer.vtkOrientedImageData()
    ok = slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
        representation, reference, resampled, False, True
    )
    if not ok:
        raise LCTfoundError(f"could not resample segment {segment.GetName()!r} to the reference grid")
    values = array_from_image_data(resampled, f"segment {segment.GetName()!r}")
    if values.shape != grid.shape:
        raise LCTfoundError(
            f"segment {segment.GetName()!r} resampled to {values.shape}, expected {grid.shape}"
        )
    return (values == segment.GetLabelValue()).astype(np.uint8)


def segmentation_node_from_labels(
    scene: Any,
    label_array: np.ndarray,
    reference_volume_node: Any,
    names: Mapping[int, str] | None = None,
    name: str = "Segmentation",
    table: StructureTable | None = None,
    status: str | int | None = None,
) -> "slicer.vtkMRMLSegmentationNode":
    """A NEW segmentation node with one segment per label value > 0 present in ``label_array``.

    Segment names come from ``names`` ({label: name}) or else the structure table's name for
    that label (``Label <n>`` if none); colour and terminology come from the table entry for
    the name. The reference image geometry (and the reference-volume node reference used by
    DICOM SEG export) is set from ``reference_volume_node``.
    """
    require_scene(scene)
    volume = require_node(reference_volume_node, "vtkMRMLScalarVolumeNode", "reference volume node")
    _check_same_scene(scene, volume, "reference volume")
    labels = _check_labels(label_array)
    grid = _volume_grid(volume)
    _check_mask(labels, grid, volume.GetName(), "label array")
    names = _check_names(names)
    table = table or default_structure_table()
    ensure_segmentations_logic(scene)
    seg_node = add_node(scene, "vtkMRMLSegmentationNode", name)
    try:
        seg_node.CreateDefaultDisplayNodes()
        _set_reference_geometry(seg_node, grid, volume)
        place_next_to(seg_node, volume)
        _fill_from_labels(seg_node, labels, names, table, status, volume)
    except Exception:
        _remove_node(scene, seg_node)
        raise
    return seg_node


def update_segmentation_from_labels(
    seg_node: Any,
    label_array: np.ndarray,
    reference_volume_node: Any | None = None,
    names: Mapping[int, str] | None = None,
    table: StructureTable | None = None,
    undo_stack: SegmentationUndoStack | None = None,
    status: str | int | None = None,
) -> list[str]:
    """Write a model's labels into an EXISTING segmentation, keeping the user's other segments.

    Each label value > 0 present (named as in `segmentation_node_from_labels`) replaces the
    content of the segment of the same structure (matched by name, alias or terminology), or
    is added as a new segment. One undo state is saved first (``undo_stack``, or the Slicer
    Segment Editor when it edits this node). Returns the IDs of the written segments.
    """
    _require_segmentation(seg_node)
    volume = _reference_volume(seg_node, reference_volume_node)
    grid = _volume_grid(volume, seg_node)
    labels = _check_labels(label_array)
    _check_mask(labels, grid, volume.GetName(), "label array")
    names = _check_names(names)
    table = table or default_structure_table()
    existing: dict[str, str] = {}
    for info in list_segments(seg_node, table):
        structure = table.find(info.name, info.terminology)
        existing.setdefault(normalize_name(structure.name if structure else info.name), info.id)
    save_state_for_undo(seg_node, undo_stack)
    written = []
    if seg_node.GetNodeReference(seg_node.GetReferenceImageGeometryReferenceRole()) is None:
        _set_reference_geometry(seg_node, grid, volume)
    for value in (int(v) for v in np.unique(labels) if v > 0):
        by_label = table.by_label(value)
        seg_name = names.get(value) or (by_label.name if by_label is not None else f"Label {value}")
        structure = table.find(seg_name)
        key = normalize_name(structure.name if structure else seg_name)
        segment_id = existing.get(key)
        if segment_id is None:
            color = None if structure is not None else table.color_for_label(value)
            segment_id = add_segment(seg_node, seg_name, table=table, color=color)
            seg_node.GetSegmentation().GetSegment(segment_id).SetTag(LABEL_TAG, str(value))
            existing[key] = segment_id
        set_segment_from_mask(seg_node, segment_id, labels == value, volume)
        if status is not None:
            set_segment_status(seg_node, segment_id, status)
        written.append(segment_id)
    return written


def _check_labels(label_array: Any) -> np.ndarray:
    if label_array is None:
        raise LCTfoundError("label array is missing (None)")
    labels = np.asarray(label_array)
    if labels.dtype == np.bool_:
        labels = labels.astype(np.uint8)
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels)) and np.all(labels == np.round(labels)):
            labels = labels.astype(np.int64)
        else:
            raise LCTfoundError(f"label array must hold integers, got dtype {labels.dtype}")
    if labels.size and labels.min() < 0:
        raise LCTfoundError(f"label array has negative values (minimum {labels.min()})")
    return labels


def _check_names(names: Mapping[int, str] | None) -> dict[int, str]:
    if names is None:
        return {}
    if not isinstance(names, Mapping):
        raise LCTfoundError(f"names must be a {{label: name}} mapping, got {type(names).__name__}")
    checked: dict[int, str] = {}
    for label, text in names.items():
        if not isinstance(text, str) or not text.strip():
            raise LCTfoundError(f"name for label {label!r} must be a non-empty string")
        checked[int(label)] = text.strip()
    return checked


def _fill_from_labels(seg_node, labels, names, table, status, volume) -> None:
    present = [int(v) for v in np.unique(labels) if v > 0]
    for value in present:
        structure = table.by_label(value)
        seg_name = names.get(value) or (structure.name if structure is not None else f"Label {value}")
        color = None
        if table.find(seg_name) is None:
            color = table.color_for_label(value)
        segment_id = add_segment(seg_node, seg_name, table=table, color=color, status=status)
        seg_node.GetSegmentation().GetSegment(segment_id).SetTag(LABEL_TAG, str(value))
        set_segment_from_mask(seg_node, segment_id, labels == value, volume)


def place_next_to(node: Any, other: Any) -> None:
    """Put ``node`` in the same Subject Hierarchy folder/study as ``other`` (no-op without one)."""
    scene = node.GetScene()
    if scene is None or other is None or other.GetScene() is not scene:
        return
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if shn is None:
        return
    other_item = shn.GetItemByDataNode(other)
    if not other_item:
        return  # headless scenes without the subject hierarchy logic have no items
    parent = shn.GetItemParent(other_item)
    if not parent:
        return
    item = shn.GetItemByDataNode(node)
    if item:
        shn.SetItemParent(item, parent)
    else:
        shn.CreateItem(parent, node)


def _remove_node(scene: Any, node: Any) -> None:
    for n in range(node.GetNumberOfDisplayNodes()):
        display = node.GetNthDisplayNode(n)
        if display is not None:
            scene.RemoveNode(display)
    scene.RemoveNode(node)


# --- status (review workflow) -------------------------------------------------------------

def _status_value(status: str | int) -> int:
    if isinstance(status, (int, np.integer)) and not isinstance(status, bool):
        if 0 <= int(status) < len(STATUSES):
            return int(status)
    elif isinstance(status, str):
        key = status.replace(" ", "").replace("_", "").lower()
        key = _STATUS_ALIASES.get(key, key).lower()
        for value, canonical in enumerate(STATUSES):
            if canonical.lower() == key:
                return getattr(_Logic, canonical)
    raise LCTfoundError(f"unknown segment status {status!r}; use one of {', '.join(STATUSES)}")


def set_segment_status(seg_node: Any, segment: str, status: str | int) -> None:
    """Set Slicer's segment status tag (NotStarted, InProgress, Completed, Flagged)."""
    segment_id = resolve_segment_id(seg_node, segment)
    value = _status_value(status)
    _Logic.SetSegmentStatus(seg_node.GetSegmentation().GetSegment(segment_id), value)


def get_segment_status(seg_node: Any, segment: str) -> str:
    """The segment's status name (NotStarted when never set)."""
    segment_id = resolve_segment_id(seg_node, segment)
    value = _Logic.GetSegmentStatus(seg_node.GetSegmentation().GetSegment(segment_id))
    return STATUSES[value] if 0 <= value < len(STATUSES) else STATUSES[0]


def mark_reviewed(seg_node: Any, segment: str, reviewed: bool = True) -> None:
    """Mark a segment as reviewed (Completed), or back to InProgress."""
    set_segment_status(seg_node, segment, "Completed" if reviewed else "InProgress")


def segments_with_status(seg_node: Any, statuses: str | Iterable[str]) -> list[str]:
    """IDs of the segments whose status is one of ``statuses``."""
    wanted = {_status_value(s) for s in ([statuses] if isinstance(statuses, (str, int)) else statuses)}
    segmentation = _require_segmentation(seg_node).GetSegmentation()
    return [sid for sid in segment_ids(seg_node) if _Logic.GetSegmentStatus(segmentation.GetSegment(sid)) in wanted]


@dataclass(frozen=True)
class SegmentInfo:
    """What a front end needs to list a segment."""

    id: str
    name: str
    color: tuple[float, float, float]
    terminology: str
    status: str
    label: int | None  # value in the structure table, None for a name the table does not know


def list_segments(seg_node: Any, table: StructureTable | None = None) -> list[SegmentInfo]:
    _require_segmentation(seg_node)
    table = table or default_structure_table()
    segmentation = seg_node.GetSegmentation()
    infos = []
    for sid in segment_ids(seg_node):
        segment = segmentation.GetSegment(sid)
        terminology = get_segment_tag(segment, _TERMINOLOGY_TAG) or ""
        structure = table.find(segment.GetName(), terminology)
        infos.append(SegmentInfo(
            sid, segment.GetName(), tuple(segment.GetColor()), terminology,
            get_segment_status(seg_node, sid), None if structure is None else structure.label,
        ))
    return infos


# --- export to labels -----------------------------------------------------------------------

def labels_from_segmentation(
    seg_node: Any,
    reference_volume_node: Any | None = None,
    table: StructureTable | None = None,
    statuses: str | Iterable[str] | None = None,
    segments: Iterable[str] | None = None,
) -> tuple[np.ndarray, dict[int, str]]:
    """Export segments to a KJI label array with values fixed by structure name.

    Known names (or aliases, or matching terminology) get the table's value whatever the
    segment order; unknown names get values from ``table.user_label_start`` in sorted-name
    order (pass a table already `extended` with all names of a data set to keep them stable
    across cases). Segments with the same structure are merged. Where segments overlap, the
    higher label value wins (lobes over lung, lesion over lobes). ``statuses`` keeps only
    segments with that status (e.g. "Completed" for reviewed ones); ``segments`` restricts
    to the given IDs or names. Returns ``(labels, {label: name})`` for the exported segments
    (uint8 when all values fit, else uint16).
    """
    _require_segmentation(seg_node)
    volume = _reference_volume(seg_node, reference_volume_node)
    grid = _volume_grid(volume, seg_node)
    table = table or default_structure_table()
    chosen = segment_ids(seg_node) if segments is None else [resolve_segment_id(seg_node, s) for s in segments]
    if statuses is not None:
        allowed = set(segments_with_status(seg_node, statuses))
        chosen = [sid for sid in chosen if sid in allowed]
    segmentation = seg_node.GetSegmentation()
    items = []
    for sid in chosen:
        segment = segmentation.GetSegment(sid)
        items.append((sid, segment.GetName(), get_segment_tag(segment, _TERMINOLOGY_TAG)))
    unknown = sorted({n.strip() for _, n, t in items if table.find(n, t) is None}, key=normalize_name)
    table = table.extended(unknown)
    per_label: dict[int, list[str]] = {}
    label_names: dict[int, str] = {}
    for sid, seg_name, terminology in items:
        structure = table.find(seg_name, terminology)
        if structure is None or structure.label == 0:
            continue  # "Background" segments carry no label
        per_label.setdefault(structure.label, []).append(sid)
        label_names[structure.label] = structure.name
    top = max(per_label, default=0)
    labels = np.zeros(grid.shape, dtype=np.uint8 if top <= 255 else np.uint16)
    for value in sorted(per_label):
        for sid in per_label[value]:
            labels[_mask_on_grid(seg_node, sid, grid) > 0] = value
    return labels, dict(sorted(label_names.items()))


def color_table_node(scene: Any, table: StructureTable | None = None, name: str = "LCTfound structures") -> Any:
    """A NEW colour table node whose entry names are the structure names (for Slicer's exporters)."""
    require_scene(scene)
    table = table or default_structure_table()
    node = add_node(scene, "vtkMRMLColorTableNode", name)
    node.SetTypeToUser()
    node.SetNumberOfColors(max(s.label for s in table) + 1)
    node.GetLookupTable().SetRange(0, max(s.label for s in table))
    for s in table:
        node.SetColor(s.label, s.name, *s.color, 0.0 if s.label == 0 else 1.0)
    return node


# --- undo -----------------------------------------------------------------------------------

class SegmentationSnapshot:
    """A deep copy of a segmentation's segments (content, names, colours, tags)."""

    def __init__(self, seg_node: Any):
        _require_segmentation(seg_node)
        self.node_id = seg_node.GetID()
        self.segmentation = slicer.vtkSegmentation()
        self.segmentation.DeepCopy(seg_node.GetSegmentation())

    def restore(self, seg_node: Any) -> None:
        _require_segmentation(seg_node)
        seg_node.GetSegmentation().DeepCopy(self.segmentation)
        seg_node.Modified()


def snapshot(seg_node: Any) -> SegmentationSnapshot:
    """Copy the segmentation so that a later `restore` brings it back exactly."""
    return SegmentationSnapshot(seg_node)


def restore(seg_node: Any, saved: SegmentationSnapshot) -> None:
    """Bring ``seg_node`` back to the state saved by `snapshot`."""
    if not isinstance(saved, SegmentationSnapshot):
        raise LCTfoundError(f"expected a SegmentationSnapshot, got {type(saved).__name__}")
    saved.restore(seg_node)


class SegmentationUndoStack:
    """Undo/redo of a segmentation's content, on Slicer's own `vtkSegmentationHistory`.

    Call `save_state()` before each change (as the Segment Editor's ``saveStateForUndo``);
    `undo()` goes back to the last saved state, `redo()` forward again.
    """

    def __init__(self, seg_node: Any, max_states: int = 20):
        _require_segmentation(seg_node)
        if not isinstance(max_states, int) or max_states < 1:
            raise LCTfoundError(f"max_states must be a positive integer, got {max_states!r}")
        self.seg_node = seg_node
        self.history = slicer.vtkSegmentationHistory()
        self.history.SetMaximumNumberOfStates(max_states)
        self.history.SetSegmentation(seg_node.GetSegmentation())

    def save_state(self) -> None:
        if not self.history.SaveState():
            raise LCTfoundError(f"could not save an undo state of {self.seg_node.GetName()!r}")

    @property
    def can_undo(self) -> bool:
        return bool(self.history.IsRestorePreviousStateAvailable())

    @property
    def can_redo(self) -> bool:
        return bool(self.history.IsRestoreNextStateAvailable())

    def undo(self) -> bool:
        if not self.can_undo:
            return False
        ok = bool(self.history.RestorePreviousState())
        self.seg_node.Modified()
        return ok

    def redo(self) -> bool:
        if not self.can_redo:
            return False
        ok = bool(self.history.RestoreNextState())
        self.seg_node.Modified()
        return ok

    def clear(self) -> None:
        self.history.RemoveAllStates()


def save_state_for_undo(seg_node: Any, undo_stack: SegmentationUndoStack | None = None) -> bool:
    """Save an undo state before overwriting segments; True when one was saved.

    Uses ``undo_stack`` when given; in the Slicer application, the Segment Editor's
    ``saveStateForUndo()`` when the editor is editing ``seg_node``.
    """
    _require_segmentation(seg_node)
    if undo_stack is not None:
        if undo_stack.seg_node is not seg_node:
            raise LCTfoundError("the undo stack belongs to another segmentation node")
        undo_stack.save_state()
        return True
    widget = getattr(getattr(slicer, "modules", None), "SegmentEditorWidget", None)
    editor = getattr(widget, "editor", None)
    if editor is not None and editor.segmentationNode() is seg_node:
        editor.saveStateForUndo()
        return True
    return False


# --- files ----------------------------------------------------------------------------------

def _segmentation_file_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(SEGMENTATION_SUFFIXES):
        return "seg"
    if _suffix(path) in LABELMAP_SUFFIXES:
        return "labelmap"
    raise LCTfoundError(
        f"{path}: unsupported segmentation file type; use .seg.nrrd or a labelmap ({', '.join(LABELMAP_SUFFIXES)})"
    )


def save_segmentation(
    seg_node: Any,
    path: str | Path,
    reference_volume_node: Any | None = None,
    table: StructureTable | None = None,
    statuses: str | Iterable[str] | None = None,
) -> dict[int, str] | None:
    """Write ``.seg.nrrd`` (names, colours, terminology, status kept) or a labelmap (.nii.gz, .nrrd).

    Labelmaps use `labels_from_segmentation` (values fixed by name) on the reference grid and
    return its ``{label: name}``; ``.seg.nrrd`` returns None. Written atomically.
    """
    _require_segmentation(seg_node)
    path = Path(path)
    kind = _segmentation_file_kind(path)
    scene = node_scene(seg_node, "segmentation")
    if kind == "seg":
        if statuses is not None:
            raise LCTfoundError("status filtering applies to labelmap export, not to .seg.nrrd")
        storage = seg_node.GetStorageNode()
        if storage is None or not storage.IsA("vtkMRMLSegmentationStorageNode"):
            storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
            seg_node.SetAndObserveStorageNodeID(storage.GetID())
        storage.SetUseCompression(True)
        with storage_node_target(path, ".seg.nrrd") as tmp:
            storage.SetFileName(str(tmp))
            ok = storage.WriteData(seg_node)
            storage.SetFileName(str(path))
            if not ok:
                raise LCTfoundError(f"{path}: could not write segmentation {seg_node.GetName()!r}")
        return None
    volume = _reference_volume(seg_node, reference_volume_node)
    labels, names = labels_from_segmentation(seg_node, volume, table=table, statuses=statuses)
    grid = _volume_grid(volume, seg_node)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", scene.GenerateUniqueName("__lctfound_export__"))
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    try:
        from .volumes import image_data_from_array

        labelmap.SetIJKToRASMatrix(vtk_matrix_from_array(grid.ijk_to_ras))
        labelmap.SetAndObserveImageData(image_data_from_array(labels))
        storage.SetUseCompression(True)
        with storage_node_target(path, _suffix(path)) as tmp:
            storage.SetFileName(str(tmp))
            if not storage.WriteData(labelmap):
                raise LCTfoundError(f"{path}: could not write the label map of {seg_node.GetName()!r}")
    finally:
        scene.RemoveNode(storage)
        scene.RemoveNode(labelmap)
    return names


def load_segmentation(
    scene: Any,
    path: str | Path,
    reference_volume_node: Any | None = None,
    name: str | None = None,
    table: StructureTable | None = None,
    names: Mapping[int, str] | None = None,
) -> "slicer.vtkMRMLSegmentationNode":
    """Read ``.seg.nrrd`` or a labelmap file into a NEW segmentation node.

    Labelmap values are named by ``names`` or the structure table. With
    ``reference_volume_node`` the segmentation references that volume (a labelmap must then
    be on its grid); without it, a labelmap's own grid is the reference geometry.
    """
    require_scene(scene)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    kind = _segmentation_file_kind(path)
    volume = None
    if reference_volume_node is not None:
        volume = require_node(reference_volume_node, "vtkMRMLScalarVolumeNode", "reference volume node")
        _check_same_scene(scene, volume, "reference volume")
    ensure_segmentations_logic(scene)
    base = name or path.name[: -len(_suffix(path))] or "Segmentation"
    if kind == "seg":
        seg_node = add_node(scene, "vtkMRMLSegmentationNode", base)
        storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
        storage.SetFileName(str(path))
        if not storage.ReadData(seg_node) or seg_node.GetSegmentation().GetNumberOfSegments() == 0 and not _is_empty_seg_file(path):
            scene.RemoveNode(storage)
            _remove_node(scene, seg_node)
            raise InputError(f"{path}: could not read a segmentation from this file")
        seg_node.SetAndObserveStorageNodeID(storage.GetID())
        if seg_node.GetDisplayNode() is None:
            seg_node.CreateDefaultDisplayNodes()
        if volume is not None:
            _set_reference_geometry(seg_node, _volume_grid(volume, seg_node), volume)
            place_next_to(seg_node, volume)
        return seg_node
    labelmap = load_volume(scene, path, name="__lctfound_import__", labelmap=True, display=False)
    try:
        labels = array_from_image_data(labelmap.GetImageData(), str(path))
        if volume is None:
            volume_for_grid = labelmap
        else:
            volume_for_grid = volume
            lm_grid, ref_grid = _volume_grid(labelmap), _volume_grid(volume)
            if lm_grid.shape != ref_grid.shape or not np.allclose(lm_grid.ijk_to_ras, ref_grid.ijk_to_ras, atol=1e-3):
                raise InputError(
                    f"{path}: label map grid {lm_grid.shape} does not match volume {volume.GetName()!r} "
                    f"grid {ref_grid.shape} (shape, spacing, origin or direction differ)"
                )
        seg_node = segmentation_node_from_labels(
            scene, _check_labels(labels), volume_for_grid, names=names, name=base, table=table
        )
        if volume is None:
            # The temporary label map must not stay referenced; keep its geometry only.
            seg_node.RemoveNodeReferenceIDs(seg_node.GetReferenceImageGeometryReferenceRole())
    finally:
        storage = labelmap.GetStorageNode()
        if storage is not None:
            scene.RemoveNode(storage)
        _remove_node(scene, labelmap)
    return seg_node


def _is_empty_seg_file(path: Path) -> bool:
    """True when a .seg.nrrd legitimately holds no segment (its header has no Segment0_ID)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(65536).split(b"\n\n", 1)[0]
    except OSError:
        return False
    return b"Segment0_ID" not in header

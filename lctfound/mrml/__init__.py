"""MRML adapters: the one place (with `lctfound.logic`) that touches 3D Slicer nodes.

Shared by the desktop Slicer modules, the web front end (trame-slicer) and the command line.
They work in the Slicer application and headless on the ``slicer-core`` wheel: every
function takes the scene or the nodes explicitly and never uses ``slicer.mrmlScene``,
``slicer.modules`` or ``slicer.app``.

Submodules:
  scene          new_headless_scene, ensure_segmentations_logic
  volumes        CTVolume ↔ volume node, window presets, .nrrd/.nii.gz I/O
  segmentations  label arrays ↔ segmentation nodes, status, undo, .seg.nrrd/labelmap I/O
  structures     the fixed name → label/colour/terminology table (no slicer import)
  terminology    Slicer terminology-entry strings (no slicer import)

Names are imported lazily, so ``lctfound.mrml.structures`` works without slicer installed.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "scene": [
        "new_headless_scene", "ensure_segmentations_logic", "require_scene", "require_node", "add_node",
    ],
    "volumes": [
        "volume_node_from_ctvolume", "ctvolume_from_volume_node", "update_volume_node_from_array",
        "apply_window_preset", "WINDOW_PRESETS", "save_volume", "load_volume", "volume_shape",
        "get_provenance", "set_provenance", "ATTRIBUTE_PREFIX",
    ],
    "segmentations": [
        "segmentation_node_from_labels", "update_segmentation_from_labels", "add_segment", "set_segment_from_mask", "mask_from_segment",
        "labels_from_segmentation", "resolve_segment_id", "segment_ids", "list_segments", "SegmentInfo",
        "set_segment_status", "get_segment_status", "mark_reviewed", "segments_with_status", "STATUSES",
        "snapshot", "restore", "SegmentationSnapshot", "SegmentationUndoStack", "save_state_for_undo",
        "save_segmentation", "load_segmentation", "color_table_node", "get_segment_tag", "segment_terminology",
    ],
    "structures": ["Structure", "StructureTable", "default_structure_table", "normalize_name"],
    "terminology": ["TerminologyEntry", "Code", "parse_terminology", "make_terminology"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'lctfound.mrml' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

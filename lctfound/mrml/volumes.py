"""Volume nodes ↔ `CTVolume`, window/level presets and volume file I/O through storage nodes.

Geometry: a `CTVolume` holds ITK/LPS spacing, origin and direction; MRML holds one IJK→RAS
matrix. Conversions go through `CTVolume.ijk_to_ras()` / `CTVolume.from_ijk_to_ras()` and
are exact up to floating-point rounding. Arrays are always copied (never shared with VTK).
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_file, image_reads_back
from ..errors import InputError, LCTfoundError
from ..io.volume import CTVolume
from ._compat import numpy_support, slicer, vtk
from .scene import add_node, node_scene, require_node, require_scene

ATTRIBUTE_PREFIX = "LCTfound."

# (window, level) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (1500.0, -500.0),
    "mediastinal": (400.0, 0.0),
}

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")

_SUPPORTED_DTYPES = (
    np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64, np.float32, np.float64,
)


# --- matrices ---------------------------------------------------------------------------

def vtk_matrix_from_array(matrix: np.ndarray) -> "vtk.vtkMatrix4x4":
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
        raise LCTfoundError(f"expected a finite 4×4 matrix, got shape {matrix.shape}")
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(matrix[r, c]))
    return out


def array_from_vtk_matrix(matrix: "vtk.vtkMatrix4x4") -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def ijk_to_ras_of(node: Any) -> np.ndarray:
    """The node's own IJK→RAS matrix (without parent transforms)."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return array_from_vtk_matrix(matrix)


def parent_transform_matrix(node: Any) -> np.ndarray | None:
    """The linear node-to-world transform of ``node``, None when it is not transformed."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return None
    if not transform_node.IsTransformToWorldLinear():
        raise LCTfoundError(
            f"{node.GetName()!r} is under a non-linear transform; harden the transform first"
        )
    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    result = array_from_vtk_matrix(matrix)
    return None if np.allclose(result, np.eye(4)) else result


# --- image data -------------------------------------------------------------------------

def _check_volume_array(array: Any, what: str = "volume array") -> np.ndarray:
    if array is None:
        raise LCTfoundError(f"{what} is missing (None)")
    array = np.asarray(array)
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if array.ndim != 3:
        raise LCTfoundError(f"{what} must be 3-D (slices, rows, columns), got shape {array.shape}")
    if min(array.shape) < 1:
        raise LCTfoundError(f"{what} is empty (shape {array.shape})")
    if array.dtype.type not in _SUPPORTED_DTYPES:
        raise LCTfoundError(f"{what} has unsupported dtype {array.dtype}")
    if array.dtype.byteorder not in ("=", "|"):
        array = array.astype(array.dtype.newbyteorder("="))
    return array


def image_data_from_array(array: np.ndarray) -> "vtk.vtkImageData":
    """A vtkImageData holding a copy of the KJI ``array`` (VTK's x = i is the fastest axis)."""
    array = _check_volume_array(array)
    k, j, i = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array).ravel(), deep=True)
    scalars.SetName("ImageScalars")
    image.GetPointData().SetScalars(scalars)
    return image


def array_from_image_data(image: Any, what: str = "image") -> np.ndarray:
    """A KJI copy of a single-component vtkImageData."""
    if image is None:
        raise LCTfoundError(f"{what} has no image data")
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        raise LCTfoundError(f"{what} has no voxel values")
    if scalars.GetNumberOfComponents() != 1:
        raise LCTfoundError(f"{what} has {scalars.GetNumberOfComponents()} components per voxel; expected 1")
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(scalars).reshape(k, j, i).copy()


# --- provenance -------------------------------------------------------------------------

def _attribute_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True)


def set_provenance(node: Any, provenance: Mapping[str, Any] | None) -> None:
    """Store ``provenance`` as node attributes ``LCTfound.<key>`` (non-strings as JSON)."""
    if not provenance:
        return
    for key, value in provenance.items():
        key = str(key)
        if not key or any(ch.isspace() for ch in key):
            raise LCTfoundError(f"provenance key {key!r} must be a non-empty word")
        node.SetAttribute(ATTRIBUTE_PREFIX + key, _attribute_text(value))


def get_provenance(node: Any) -> dict[str, Any]:
    """The ``LCTfound.*`` attributes of ``node`` (JSON values decoded, others as text)."""
    result: dict[str, Any] = {}
    for name in node.GetAttributeNames() or ():
        if not name.startswith(ATTRIBUTE_PREFIX):
            continue
        text = node.GetAttribute(name)
        try:
            value = json.loads(text)
        except (TypeError, ValueError):
            value = text
        result[name[len(ATTRIBUTE_PREFIX):]] = value
    return result


# --- CTVolume ↔ node --------------------------------------------------------------------

def volume_node_from_ctvolume(
    scene: Any,
    volume: CTVolume,
    name: str = "CT",
    provenance: Mapping[str, Any] | None = None,
    labelmap: bool = False,
    window: str | None = None,
) -> "slicer.vtkMRMLScalarVolumeNode":
    """A NEW scalar (or labelmap) volume node holding a copy of ``volume``.

    The name is made unique in the scene. ``volume.metadata`` and ``provenance`` are stored as
    ``LCTfound.*`` node attributes. ``window`` optionally applies a preset ("lung", "mediastinal").
    """
    require_scene(scene)
    if not isinstance(volume, CTVolume):
        raise LCTfoundError(f"expected a CTVolume, got {type(volume).__name__}")
    array = _check_volume_array(volume.array, "CT volume array")
    ijk_to_ras = volume.ijk_to_ras()
    if not np.all(np.isfinite(ijk_to_ras)) or abs(np.linalg.det(ijk_to_ras[:3, :3])) < 1e-12:
        raise LCTfoundError("CT volume geometry is degenerate (zero spacing or singular direction)")
    if window is not None and window not in WINDOW_PRESETS:
        raise LCTfoundError(f"unknown window preset {window!r}; choose from {', '.join(WINDOW_PRESETS)}")
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = add_node(scene, class_name, name)
    node.SetIJKToRASMatrix(vtk_matrix_from_array(ijk_to_ras))
    node.SetAndObserveImageData(image_data_from_array(array))
    _create_display_nodes(node)
    set_provenance(node, volume.metadata)
    set_provenance(node, provenance)
    if window is not None:
        apply_window_preset(node, window)
    return node


def ctvolume_from_volume_node(node: Any, apply_transforms: bool = True) -> CTVolume:
    """A `CTVolume` copy of a scalar volume node (geometry exact; parent linear transform applied)."""
    require_node(node, "vtkMRMLScalarVolumeNode", "volume node")
    array = array_from_image_data(node.GetImageData(), f"volume {node.GetName()!r}")
    ijk_to_ras = ijk_to_ras_of(node)
    if apply_transforms:
        to_world = parent_transform_matrix(node)
        if to_world is not None:
            ijk_to_ras = to_world @ ijk_to_ras
    metadata = get_provenance(node)
    metadata.setdefault("name", node.GetName())
    return CTVolume.from_ijk_to_ras(array, ijk_to_ras, metadata=metadata)


def update_volume_node_from_array(node: Any, array: np.ndarray, provenance: Mapping[str, Any] | None = None) -> None:
    """Replace the voxels of ``node`` with a copy of ``array`` (same shape), keeping its geometry."""
    require_node(node, "vtkMRMLScalarVolumeNode", "volume node")
    array = _check_volume_array(array)
    image = node.GetImageData()
    if image is not None:
        i, j, k = image.GetDimensions()
        if array.shape != (k, j, i):
            raise LCTfoundError(
                f"array shape {array.shape} differs from volume {node.GetName()!r} grid {(k, j, i)}"
            )
    node.SetAndObserveImageData(image_data_from_array(array))
    set_provenance(node, provenance)
    node.Modified()


def volume_shape(node: Any) -> tuple[int, int, int]:
    """(k, j, i) shape of a volume node's voxel grid."""
    require_node(node, "vtkMRMLVolumeNode", "volume node")
    image = node.GetImageData()
    if image is None:
        raise LCTfoundError(f"volume {node.GetName()!r} has no image data")
    i, j, k = image.GetDimensions()
    return (k, j, i)


def apply_window_preset(node: Any, preset: str = "lung") -> tuple[float, float]:
    """Set the display window/level of ``node`` to a preset; returns (window, level)."""
    require_node(node, "vtkMRMLScalarVolumeNode", "volume node")
    if preset not in WINDOW_PRESETS:
        raise LCTfoundError(f"unknown window preset {preset!r}; choose from {', '.join(WINDOW_PRESETS)}")
    display = node.GetDisplayNode()
    if display is None:
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
    if display is None or not display.IsA("vtkMRMLScalarVolumeDisplayNode"):
        raise LCTfoundError(f"volume {node.GetName()!r} has no scalar display node")
    window, level = WINDOW_PRESETS[preset]
    display.AutoWindowLevelOff()
    display.SetWindowLevel(window, level)
    return window, level


def _create_display_nodes(node: Any) -> None:
    """Default display nodes; a labelmap's only when its colour table exists (not headless)."""
    scene = node.GetScene()
    if node.IsA("vtkMRMLLabelMapVolumeNode") and (scene is None or scene.GetNodeByID("vtkMRMLColorTableNodeLabels") is None):
        return
    node.CreateDefaultDisplayNodes()


# --- files ------------------------------------------------------------------------------

def _suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in sorted(VOLUME_SUFFIXES + (".seg.nrrd",), key=len, reverse=True):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


@contextlib.contextmanager
def storage_node_target(path: Path, suffix: str):
    """`atomic_file` for a storage node's ``WriteData``: the temporary name is freed for the node to
    create, the file is read back before publication, and the ``TempWrite`` folder a storage node
    leaves beside the file when a write fails (a full disk) is removed."""
    temp_write = Path(path).parent / "TempWrite"
    existed = temp_write.exists()
    try:
        with atomic_file(path, suffix=suffix, verify=image_reads_back) as tmp:
            tmp.unlink()  # the storage node writes a new file (and logs when replacing one)
            yield tmp
    finally:
        if not existed and temp_write.is_dir():
            shutil.rmtree(temp_write, ignore_errors=True)


def save_volume(node: Any, path: str | Path, compress: bool = True) -> Path:
    """Write a volume node to .nrrd/.nii.gz/... through a volume archetype storage node (atomically)."""
    require_node(node, "vtkMRMLScalarVolumeNode", "volume node")
    path = Path(path)
    if _suffix(path) not in VOLUME_SUFFIXES:
        raise LCTfoundError(f"{path}: unsupported volume file type; use one of {', '.join(VOLUME_SUFFIXES)}")
    if node.GetImageData() is None:
        raise LCTfoundError(f"volume {node.GetName()!r} has no image data to save")
    scene = node_scene(node, "volume")
    storage = node.GetStorageNode()
    if storage is None or not storage.IsA("vtkMRMLVolumeArchetypeStorageNode"):
        storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetUseCompression(bool(compress))
    with storage_node_target(path, _suffix(path)) as tmp:
        storage.SetFileName(str(tmp))
        ok = storage.WriteData(node)
        if not ok:
            storage.SetFileName(str(path))
            raise LCTfoundError(f"{path}: could not write volume {node.GetName()!r}")
    storage.SetFileName(str(path))
    return path


def load_volume(scene: Any, path: str | Path, name: str | None = None, labelmap: bool = False, display: bool = True) -> Any:
    """Read .nrrd/.nii.gz/... into a NEW scalar (or labelmap) volume node through a storage node."""
    require_scene(scene)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if _suffix(path) not in VOLUME_SUFFIXES:
        raise InputError(f"{path}: unsupported volume file type; use one of {', '.join(VOLUME_SUFFIXES)}")
    base = name or path.name[: -len(_suffix(path))] or "Volume"
    class_name = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    node = add_node(scene, class_name, base)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetCenterImage(False)
    storage.SetSingleFile(True)
    ok = storage.ReadData(node)
    if not ok or node.GetImageData() is None:
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"{path}: could not read a volume from this file")
    node.SetAndObserveStorageNodeID(storage.GetID())
    if node.GetDisplayNode() is None and display:
        _create_display_nodes(node)
    return node

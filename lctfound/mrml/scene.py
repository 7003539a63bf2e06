"""MRML scenes and the segmentations module logic, in real Slicer and headless.

A `vtkSlicerSegmentationsModuleLogic` must have been given a scene before segments can be
created (it registers the labelmap ↔ closed-surface converter rules); without it
``AddEmptySegment`` silently returns ''. Real Slicer does this at start-up; headless code
calls `new_headless_scene` or `ensure_segmentations_logic`.
"""

from __future__ import annotations

from typing import Any

from ..errors import LCTfoundError
from ._compat import slicer

# Python attribute on the scene wrapper that keeps our logic alive (VTK keeps the attribute
# dictionary of a wrapped object for as long as the C++ object lives).
_LOGIC_ATTR = "_lctfound_segmentations_logic"


def require_scene(scene: Any) -> "slicer.vtkMRMLScene":
    """Return ``scene`` if it is a vtkMRMLScene, else raise LCTfoundError (never pass None to C++)."""
    if scene is None or not isinstance(scene, slicer.vtkMRMLScene):
        raise LCTfoundError(f"expected an MRML scene (vtkMRMLScene), got {type(scene).__name__}")
    return scene


def require_node(node: Any, cls: str | tuple[str, ...], what: str = "node") -> Any:
    """Return ``node`` if it is an MRML node of class ``cls`` (a name, or names), else raise."""
    classes = (cls,) if isinstance(cls, str) else tuple(cls)
    types = tuple(getattr(slicer, c) for c in classes)
    if node is None or not isinstance(node, types):
        got = "None" if node is None else (node.GetClassName() if hasattr(node, "GetClassName") else type(node).__name__)
        raise LCTfoundError(f"{what}: expected a {' or '.join(classes)}, got {got}")
    return node


def node_scene(node: Any, what: str = "node") -> "slicer.vtkMRMLScene":
    """The scene a node belongs to (adapters need it to add helper nodes)."""
    scene = node.GetScene()
    if scene is None:
        raise LCTfoundError(f"{what} {node.GetName()!r} is not in an MRML scene")
    return scene


def _application_segmentations_logic(scene: "slicer.vtkMRMLScene") -> Any | None:
    """Slicer's own logic when ``scene`` is the application scene (real Slicer only)."""
    app_scene = getattr(slicer, "mrmlScene", None)
    modules = getattr(slicer, "modules", None)
    if app_scene is None or modules is None or app_scene is not scene:
        return None
    module = getattr(modules, "segmentations", None)
    return module.logic() if module is not None else None


def ensure_segmentations_logic(
    scene: "slicer.vtkMRMLScene", logic: Any = None
) -> "slicer.vtkSlicerSegmentationsModuleLogic":
    """A segmentations module logic attached to ``scene`` (created once and kept alive).

    In Slicer, for the application scene, this is ``slicer.modules.segmentations.logic()``.
    A front end that already runs one on ``scene`` (trame-slicer's ``SlicerApp``) passes it as
    ``logic`` so that no second logic observes the scene.
    """
    require_scene(scene)
    if logic is not None:
        setattr(scene, _LOGIC_ATTR, logic)
        return logic
    logic = getattr(scene, _LOGIC_ATTR, None)
    if logic is not None:
        return logic
    logic = _application_segmentations_logic(scene)
    if logic is None:
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
    setattr(scene, _LOGIC_ATTR, logic)
    return logic


def new_headless_scene() -> "slicer.vtkMRMLScene":
    """A new empty scene ready for volumes and segmentations (tests, web front end, CLI)."""
    scene = slicer.vtkMRMLScene()
    ensure_segmentations_logic(scene)
    return scene


def add_node(scene: "slicer.vtkMRMLScene", class_name: str, name: str) -> Any:
    """Add a new node of ``class_name`` with a unique name derived from ``name``."""
    require_scene(scene)
    if not isinstance(name, str) or not name.strip():
        raise LCTfoundError(f"node name must be a non-empty string, got {name!r}")
    node = scene.AddNewNodeByClass(class_name, scene.GenerateUniqueName(name.strip()))
    if node is None:
        raise LCTfoundError(f"could not create a {class_name} in the scene")
    return node

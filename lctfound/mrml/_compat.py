"""Import of ``slicer`` and ``vtk`` for the MRML adapters, with one clear error when missing.

Works both inside 3D Slicer and with the Qt-free ``slicer-core`` wheel. Nothing here
touches ``slicer.app``, ``slicer.mrmlScene`` or ``slicer.modules`` (absent in the wheel).
"""

from __future__ import annotations

try:
    import slicer  # noqa: F401
    import vtk  # noqa: F401
    from vtk.util import numpy_support  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "lctfound.mrml needs 3D Slicer or the slicer-core wheel "
        "(pip install 'lctfound[mrml]'): " + str(exc)
    ) from exc

__all__ = ["slicer", "vtk", "numpy_support"]

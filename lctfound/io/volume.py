"""CT volumes with their geometry.

`CTVolume` is the one in-memory exchange format of the engine: a (slices, rows, columns)
= (k, j, i) array in Hounsfield units plus the ITK/DICOM geometry (LPS physical space).
MRML adapters convert it to IJK→RAS; readers and writers keep spacing, origin and
direction exact end to end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# LPS (ITK, DICOM) and RAS (Slicer) differ by flipping the first two physical axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass
class CTVolume:
    """A 3D CT image: ``array[k, j, i]`` in HU with ITK geometry (LPS).

    spacing: (i, j, k) voxel size in mm; origin: LPS position of voxel (0, 0, 0) in mm;
    direction: 3×3 matrix whose columns are the i, j, k axis directions in LPS.
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def ijk_to_lps(self) -> np.ndarray:
        """4×4 matrix mapping (i, j, k, 1) voxel indices to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4×4 matrix mapping (i, j, k, 1) voxel indices to RAS millimetres (Slicer's convention)."""
        matrix = self.ijk_to_lps()
        matrix[:3, :] = LPS_TO_RAS @ matrix[:3, :]
        return matrix

    @classmethod
    def from_ijk_to_ras(cls, array: np.ndarray, ijk_to_ras: np.ndarray, **kwargs: Any) -> "CTVolume":
        """Build a volume from a KJI array and an IJK→RAS matrix (as MRML stores it)."""
        ijk_to_ras = np.asarray(ijk_to_ras, dtype=np.float64)
        linear = LPS_TO_RAS @ ijk_to_ras[:3, :3]
        spacing = np.linalg.norm(linear, axis=0)
        direction = linear / spacing
        origin = LPS_TO_RAS @ ijk_to_ras[:3, 3]
        return cls(array, tuple(spacing), tuple(origin), direction, **kwargs)

    def same_grid(self, other: "CTVolume", tolerance: float = 1e-4) -> bool:
        """True when both volumes have the same shape and voxel-to-world mapping."""
        return self.shape == other.shape and np.allclose(
            self.ijk_to_lps(), other.ijk_to_lps(), atol=tolerance
        )

    def with_array(self, array: np.ndarray, **metadata: Any) -> "CTVolume":
        """A new volume on the same grid holding ``array`` (a result never overwrites its input)."""
        if array.shape != self.array.shape:
            raise ValueError(f"array shape {array.shape} differs from the volume grid {self.array.shape}")
        return CTVolume(array, self.spacing, self.origin, self.direction.copy(), {**self.metadata, **metadata})

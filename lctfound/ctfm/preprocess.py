"""CT-FM's preprocessing contract on a `CTVolume`, keeping the exact voxel geometry.

Steps (MONAI transforms on a ``MetaTensor`` whose affine is the volume's IJK→RAS matrix):

1. ``Orientation("SPL")`` — array axis 0 runs toward Superior, 1 toward Posterior, 2 toward Left;
   a pure permutation/flip, so no voxel is resampled;
2. ``Spacing((3, 1, 1))`` mm, bilinear;
3. ``CropForeground`` — the bounding box of voxels above 0 HU (the body; skipped when none);
4. ``ScaleIntensityRange(-1024, 2048 → 0, 1, clip=True)``;
5. ``DivisiblePad(16)`` with 0 (= −1024 HU), split evenly before and after.

Geometry. The result's ``affine`` maps a preprocessed voxel index ``(a0, a1, a2)`` (the array
order, voxel centres at integers) to RAS millimetres. It is checked against our own bookkeeping
of the crop and pad offsets, and the source volume keeps its ``ijk_to_ras()``, so::

    preprocessed index --affine--> RAS --inv(source ijk_to_ras)--> source (i, j, k)

is one exact 4×4 matrix (`PreparedVolume.index_to_source_ijk`). Feature maps at stride ``s``
of a window starting at index ``o`` have their own affines (`grid_affine`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..errors import InputError
from ..io.volume import CTVolume


@dataclass(frozen=True)
class CTFMPreprocessing:
    """The contract's settings (defaults: CT-FM's pretraining / feature-extraction recipe)."""

    orientation: str = "SPL"
    spacing: Optional[tuple[float, float, float]] = (3.0, 1.0, 1.0)  # per array axis after orientation
    hu_min: float = -1024.0
    hu_max: float = 2048.0
    foreground_crop: bool = True
    foreground_threshold_hu: float = 0.0
    size_multiple: int = 16
    interpolation: str = "bilinear"

    def as_dict(self) -> dict[str, Any]:
        return {"orientation": self.orientation, "spacing": list(self.spacing) if self.spacing else None,
                "hu_window": [self.hu_min, self.hu_max], "scaled_range": [0.0, 1.0],
                "foreground_crop": self.foreground_crop, "foreground_threshold_hu": self.foreground_threshold_hu,
                "size_multiple": self.size_multiple, "interpolation": self.interpolation, "pad_value_hu": self.hu_min}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CTFMPreprocessing":
        """The settings written by `as_dict` (stored in indexes and task models)."""
        try:
            return cls(orientation=str(data["orientation"]),
                       spacing=tuple(float(v) for v in data["spacing"]) if data.get("spacing") else None,
                       hu_min=float(data["hu_window"][0]), hu_max=float(data["hu_window"][1]),
                       foreground_crop=bool(data["foreground_crop"]),
                       foreground_threshold_hu=float(data["foreground_threshold_hu"]),
                       size_multiple=int(data["size_multiple"]), interpolation=str(data["interpolation"]))
        except (KeyError, TypeError, ValueError, IndexError):
            raise InputError(f"not a CT-FM preprocessing description: {data!r}") from None

    def scale(self, hu: float) -> float:
        """The preprocessed intensity of ``hu``."""
        return float(np.clip((hu - self.hu_min) / (self.hu_max - self.hu_min), 0.0, 1.0))


DEFAULT_PREPROCESSING = CTFMPreprocessing()


def _apply(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    flat = points.reshape(-1, 3)
    out = flat @ matrix[:3, :3].T + matrix[:3, 3]
    return out.reshape(points.shape)


def translation(offset) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, 3] = np.asarray(offset, dtype=np.float64)
    return matrix


def grid_affine(affine: np.ndarray, stride: float = 1.0, offset=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Affine of a grid whose cell ``n`` sits at preprocessed index ``offset + stride·n``."""
    matrix = np.diag([float(stride)] * 3 + [1.0])
    matrix[:3, 3] = np.asarray(offset, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ matrix


@dataclass
class PreparedVolume:
    """A volume in CT-FM's input space, with the exact mapping back to its source volume."""

    array: np.ndarray  # float32 (a0, a1, a2) in SPL order, values in [0, 1]
    affine: np.ndarray  # 4×4: preprocessed index → RAS mm
    source_ijk_to_ras: np.ndarray  # 4×4 of the source volume (Slicer's IJKToRAS)
    source_shape: tuple[int, int, int]  # source array shape (k, j, i)
    settings: CTFMPreprocessing = DEFAULT_PREPROCESSING
    steps: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))

    # Exact mappings between the three spaces (points are (..., 3) arrays).
    def index_to_ras(self, index) -> np.ndarray:
        return _apply(self.affine, index)

    def ras_to_index(self, ras) -> np.ndarray:
        return _apply(np.linalg.inv(self.affine), ras)

    def index_to_source_ijk_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.source_ijk_to_ras) @ self.affine

    def index_to_source_ijk(self, index) -> np.ndarray:
        return _apply(self.index_to_source_ijk_matrix(), index)

    def source_ijk_to_index(self, ijk) -> np.ndarray:
        return _apply(np.linalg.inv(self.index_to_source_ijk_matrix()), ijk)

    def to_source_grid(self, values: np.ndarray, affine: Optional[np.ndarray] = None, fill: float = 0.0,
                       order: int = 1, dtype=np.float32) -> np.ndarray:
        """Resample ``values`` (a grid with ``affine``: index → RAS; default: this grid) onto the source
        volume's (k, j, i) grid. Source voxels outside the grid get ``fill``. Slice by slice (bounded memory)."""
        from scipy.ndimage import map_coordinates

        affine = self.affine if affine is None else np.asarray(affine, dtype=np.float64)
        values = np.asarray(values, dtype=np.float32)
        to_grid = np.linalg.inv(affine) @ self.source_ijk_to_ras  # source ijk → grid index
        nk, nj, ni = self.source_shape
        jj, ii = np.meshgrid(np.arange(nj, dtype=np.float64), np.arange(ni, dtype=np.float64), indexing="ij")
        out = np.empty((nk, nj, ni), dtype=dtype)
        limits = np.asarray(values.shape, dtype=np.float64)
        for k in range(nk):
            ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, float(k))], axis=1)
            coords = ijk @ to_grid[:3, :3].T + to_grid[:3, 3]
            sampled = map_coordinates(values, coords.T, order=order, mode="nearest")
            inside = np.all((coords >= -0.5) & (coords <= limits - 0.5), axis=1)
            sampled[~inside] = fill
            out[k] = sampled.reshape(nj, ni)
        return out

    def from_source_grid(self, values: np.ndarray, fill: float = 0.0, order: int = 0, dtype=None) -> np.ndarray:
        """Resample ``values`` on the source volume's (k, j, i) grid onto this grid (same shape as
        ``array``) through the exact index mapping; nearest neighbour by default (label maps).
        Cells outside the source volume (padding) get ``fill``. Slice by slice (bounded memory)."""
        from scipy.ndimage import map_coordinates

        values = np.asarray(values)
        if values.shape != tuple(self.source_shape):
            raise InputError(f"array of shape {values.shape} does not lie on the source grid "
                             f"{tuple(self.source_shape)}")
        dtype = values.dtype if dtype is None else dtype
        to_source = self.index_to_source_ijk_matrix()
        n0, n1, n2 = self.shape
        a1, a2 = np.meshgrid(np.arange(n1, dtype=np.float64), np.arange(n2, dtype=np.float64), indexing="ij")
        limits = np.asarray(self.source_shape[::-1], dtype=np.float64)  # (i, j, k) sizes
        out = np.empty(self.shape, dtype=dtype)
        for a0 in range(n0):
            index = np.stack([np.full(a1.size, float(a0)), a1.ravel(), a2.ravel()], axis=1)
            ijk = index @ to_source[:3, :3].T + to_source[:3, 3]
            sampled = map_coordinates(values, ijk[:, ::-1].T, order=order, mode="nearest")
            inside = np.all((ijk >= -0.5) & (ijk <= limits - 0.5), axis=1)
            sampled[~inside] = fill
            out[a0] = sampled.reshape(n1, n2)
        return out


def _metatensor(volume: CTVolume):
    import torch
    from monai.data import MetaTensor

    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"expected a 3D volume, got an array of shape {array.shape}")
    data = np.ascontiguousarray(array.astype(np.float32, copy=False).transpose(2, 1, 0))[None]  # [1, i, j, k]
    return MetaTensor(torch.from_numpy(data), affine=torch.as_tensor(volume.ijk_to_ras(), dtype=torch.float64))


def _orient(image, axcodes: str):
    """MONAI ``Orientation`` (a permutation/flip of the array; the affine follows exactly)."""
    from monai.transforms import Orientation

    codes = axcodes.upper()
    if len(codes) != 3 or sorted("LRAPSI".index(c) // 2 for c in codes if c in "LRAPSI") != [0, 1, 2]:
        raise InputError(f"orientation {axcodes!r}: use three letters naming each of R/L, A/P, S/I once")
    # The affine is IJK→RAS, so the codes are RAS labels (stated: MONAI is changing its default).
    return Orientation(axcodes=codes, labels=(("L", "R"), ("P", "A"), ("I", "S")))(image)


def _affine(image) -> np.ndarray:
    return np.asarray(image.affine, dtype=np.float64)


def prepare_volume(volume: CTVolume, settings: CTFMPreprocessing = DEFAULT_PREPROCESSING) -> PreparedVolume:
    """Apply the contract to ``volume`` (HU); see the module docstring for steps and geometry."""
    from monai.transforms import CropForeground, DivisiblePad, ScaleIntensityRange, Spacing

    if min(volume.shape) < 1:
        raise InputError("the volume is empty")
    source_ijk_to_ras = volume.ijk_to_ras()
    image = _metatensor(volume)
    steps: dict[str, Any] = {"source_shape_kji": list(volume.shape), "source_spacing_ijk": list(volume.spacing)}

    image = _orient(image, settings.orientation)
    steps["oriented_shape"] = list(image.shape[1:])
    if settings.spacing is not None:
        image = Spacing(pixdim=settings.spacing, mode=settings.interpolation, padding_mode="border",
                        dtype=np.float32)(image)
    steps["resampled_shape"] = list(image.shape[1:])
    resampled_affine = _affine(image)

    crop_start = np.zeros(3, dtype=np.int64)
    if settings.foreground_crop:
        threshold = settings.foreground_threshold_hu
        cropper = CropForeground(select_fn=lambda x: x > threshold, margin=0, allow_smaller=True)
        if bool((image > threshold).any()):
            start, end = cropper.compute_bounding_box(image)
            crop_start = np.asarray(start, dtype=np.int64)
            image = cropper.crop_pad(image, start, end)
            steps["crop_box"] = [list(map(int, start)), list(map(int, end))]
        else:
            steps["crop_box"] = None  # nothing above the threshold: the whole field of view is kept
    image = ScaleIntensityRange(a_min=settings.hu_min, a_max=settings.hu_max, b_min=0.0, b_max=1.0, clip=True)(image)
    before = np.zeros(3, dtype=np.int64)
    if settings.size_multiple > 1:
        size = np.asarray(image.shape[1:], dtype=np.int64)
        target = -(-size // settings.size_multiple) * settings.size_multiple
        before = (target - size) // 2
        image = DivisiblePad(k=settings.size_multiple, method="symmetric", mode="constant", value=0.0)(image)
        steps["pad_before"] = before.tolist()
        steps["pad_after"] = (target - size - before).tolist()

    # Our own bookkeeping of the geometry must agree with MONAI's tracked affine.
    expected = resampled_affine @ translation(crop_start - before)
    affine = _affine(image)
    if not np.allclose(affine, expected, atol=1e-6):
        raise RuntimeError(f"CT-FM preprocessing lost track of the geometry:\n{affine}\nvs\n{expected}")
    array = np.ascontiguousarray(image[0].detach().cpu().numpy().astype(np.float32, copy=False))
    steps["shape"] = list(array.shape)
    return PreparedVolume(array, expected, source_ijk_to_ras, tuple(volume.shape), settings, steps)

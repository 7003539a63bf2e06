"""CT volumes with their geometry.

`CTVolume` is the one in-memory exchange format of the engine: a (slices, rows, columns)
= (k, j, i) array in Hounsfield units plus the ITK/DICOM geometry (LPS physical space).
MRML adapters convert it to IJK→RAS; readers and writers keep spacing, origin and
direction exact end to end.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..errors import InputError

# LPS (ITK, DICOM) and RAS (Slicer) differ by flipping the first two physical axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])

#: File names of single-file (or header + data) volumes the engine reads and writes.
VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def volume_stem(path: str | os.PathLike) -> str:
    """The case name of a volume file or DICOM folder: its name without a volume suffix
    (``lung1_image.nii.gz`` → ``lung1_image``). Predictions, tables and evaluations match cases by it."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES + (".seg.nrrd",), key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def find_volumes(path: str | os.PathLike) -> list[Path]:
    """The CT volumes of ``path``: the file itself, or a folder's volume files and DICOM series
    folders (sorted by name), or the folder itself when it is one DICOM series."""
    from .dicom import looks_like_dicom

    from ..atomic import note_input

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"{path}: no such file or folder")
    note_input(path)

    def holds_dicom(folder: Path) -> bool:
        return any(looks_like_dicom(f) for f in sorted(folder.iterdir())[:5] if f.is_file())

    entries = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if child.is_file() and child.name.lower().endswith(VOLUME_SUFFIXES):
            entries.append(child)
        elif child.is_dir() and holds_dicom(child):
            entries.append(child)
    if not entries and holds_dicom(path):
        return [path]
    if not entries:
        raise InputError(f"{path}: no CT volumes (NIfTI, NRRD, MHA or DICOM folders) found")
    return entries


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

    def slab(self, first: int, stop: int) -> "CTVolume":
        """Slices ``first`` … ``stop − 1`` as a new volume whose voxels keep their world positions."""
        first, stop, _ = slice(first, stop).indices(self.shape[0])
        if stop <= first:
            raise ValueError(f"no slices in {first}:{stop} of a volume with {self.shape[0]} slices")
        origin = np.asarray(self.origin) + first * self.spacing[2] * self.direction[:, 2]
        return CTVolume(np.ascontiguousarray(self.array[first:stop]), self.spacing, tuple(origin),
                        self.direction.copy(), dict(self.metadata))


# --------------------------------------------------------------------------------------------
# Reading, writing and validating volumes (SimpleITK; imported lazily to keep this module light)
# --------------------------------------------------------------------------------------------

# File formats by extension (longest first so that ".nii.gz" wins over ".gz").
READ_FORMATS = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".nrrd": "nrrd",
    ".nhdr": "nrrd",
    ".mha": "metaimage",
    ".mhd": "metaimage",
}
# Single-file formats only: a detached header (.nhdr, .mhd) cannot be published atomically.
WRITE_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")

# The CT plausibility test (see `validate_ct`).
AIR_PERCENTILE = 0.5
AIR_MAX_HU = -800.0
MEDIAN_RANGE_HU = (-1200.0, 1500.0)
VALUE_RANGE_HU = (-32768.0, 65535.0)
_VALIDATION_SAMPLE = 2_000_000


def itk_error_summary(error: BaseException, limit: int = 160) -> str:
    """The informative part of a SimpleITK/ITK exception, on one short line."""
    text = str(error)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    detail = ""
    for index, line in enumerate(lines):
        if "ERROR:" in line:
            detail = line.split("ERROR:", 1)[1].strip()
            rest = lines[index + 1 :]
            if rest:
                detail = f"{detail} {rest[-1]}"
            break
    detail = detail or (lines[-1] if lines else type(error).__name__)
    detail = re.sub(r"\w+ImageIO\(0x[0-9a-f]+\):\s*", "", detail)
    if "Unable to determine ImageIO reader" in detail:
        detail = "not a recognised image format"
    return detail if len(detail) <= limit else detail[: limit - 1] + "…"


def _format_of(path: Path) -> Optional[str]:
    name = path.name.lower()
    for extension, kind in READ_FORMATS.items():
        if name.endswith(extension):
            return kind
    return None


def volume_from_sitk(image, metadata: Optional[dict] = None) -> CTVolume:
    """A `CTVolume` from a 3D scalar SimpleITK image (geometry copied exactly)."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return CTVolume(array, image.GetSpacing(), image.GetOrigin(), direction, dict(metadata or {}))


def volume_to_sitk(volume: CTVolume):
    """A SimpleITK image holding ``volume``'s array and geometry (bool arrays become uint8)."""
    import SimpleITK as sitk

    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise ValueError(f"expected a 3D (k, j, i) array, got shape {array.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    image.SetSpacing(tuple(float(s) for s in volume.spacing))
    image.SetOrigin(tuple(float(o) for o in volume.origin))
    image.SetDirection(tuple(float(d) for d in np.asarray(volume.direction, dtype=np.float64).ravel()))
    return image


def _read_image_file(path: Path):
    import SimpleITK as sitk

    from .dicom import quiet_itk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    with quiet_itk():
        try:
            return reader.Execute()
        except RuntimeError as error:
            detail = itk_error_summary(error).replace(f"Error reading {path}:", "").strip()
            raise InputError(f"{path}: cannot be read as an image ({detail})") from None


def _as_3d_scalar(image, path: Path, hint: str = ""):
    """Reject vector, 2D and genuinely 4D images; drop trailing singleton dimensions."""
    import SimpleITK as sitk

    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{path}: has {components} components per voxel (a colour, vector or multi-channel image); "
            "a scalar 3D CT volume is needed"
        )
    size = list(image.GetSize())
    dimension = image.GetDimension()
    if dimension > 3:
        extra = size[3:]
        if any(s != 1 for s in extra):
            raise InputError(
                f"{path}: is a {dimension}D image of size {'×'.join(map(str, size))} "
                "(a time series or multi-volume file); a single 3D volume is needed"
            )
        image = sitk.Extract(image, size[:3] + [0] * (dimension - 3), [0] * dimension)
        size = list(image.GetSize())
        dimension = 3
    if dimension < 3 or size[2] < 2:
        shape = "×".join(map(str, size))
        raise InputError(f"{path}: is a 2D image ({shape}); a 3D volume with several slices is needed{hint}")
    return image


def _narrow_dtype(array: np.ndarray) -> np.ndarray:
    """int32/int64/uint16 that fit int16 become int16 (HU range); float64 becomes float32."""
    if array.dtype.kind in "iu" and array.dtype != np.int16 and array.dtype.itemsize >= 2 and array.size:
        low, high = int(array.min()), int(array.max())
        if -32768 <= low and high <= 32767:
            return array.astype(np.int16)
    if array.dtype == np.float64:
        return array.astype(np.float32)
    return array


# A label map holds few non-negative whole numbers; values this low or this many suggest a CT.
CT_LIKE_MIN = -500
MAX_LABEL_VALUES = 1000
_LABEL_MAP_ADVICE = "give a label map: 0 = background, 1, 2, … = structures"


def check_label_map(array: np.ndarray, name: str) -> None:
    """Refuse what is not a label map: negative values, or a CT given in its place (very low values or
    more than `MAX_LABEL_VALUES` distinct values, counted on an evenly strided sample)."""
    array = np.asarray(array)
    if array.size == 0 or array.dtype == np.uint8 or array.dtype == bool:
        return
    low, high = int(array.min()), int(array.max())
    flat = array.reshape(-1)
    sample = flat[:: max(1, flat.size // _VALIDATION_SAMPLE)]
    distinct = int(np.unique(sample).size)
    if low <= CT_LIKE_MIN or distinct > MAX_LABEL_VALUES:
        raise InputError(f"{name}: this looks like a CT image, not a label map (values {low}..{high}, "
                         f"{distinct if distinct <= MAX_LABEL_VALUES else f'more than {MAX_LABEL_VALUES}'} "
                         f"distinct values); {_LABEL_MAP_ADVICE}")
    if low < 0:
        raise InputError(f"{name}: has negative label values (lowest {low}); {_LABEL_MAP_ADVICE}")


def _label_dtype(array: np.ndarray, path: Path) -> np.ndarray:
    if array.dtype.kind in "iu":
        return array
    if array.dtype.kind == "b":
        return array.astype(np.uint8)
    if not np.array_equal(array, np.round(array)):
        if array.size and float(array.min()) <= CT_LIKE_MIN:
            raise InputError(f"{path}: this looks like a CT image, not a label map (non-integer values from "
                             f"{float(array.min()):g} to {float(array.max()):g}); {_LABEL_MAP_ADVICE}")
        raise InputError(f"{path}: has non-integer values; a label map must hold whole-number labels "
                         f"({_LABEL_MAP_ADVICE})")
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    for dtype in (np.uint8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if info.min <= low and high <= info.max:
            return array.astype(dtype)
    raise InputError(f"{path}: label values {low:g}..{high:g} are out of range for a label map")


def check_finite(array: np.ndarray, name: str) -> None:
    """Refuse NaN or infinite voxels, whatever the format (checked on the data as read, before any cast)."""
    array = np.asarray(array)
    if array.dtype.kind not in "fc":
        return
    bad = int(array.size - np.count_nonzero(np.isfinite(array)))
    if bad:
        raise InputError(f"{name}: has {bad} NaN or infinite voxels; a CT volume or label map must be finite "
                         "everywhere (fill them, e.g. with -1024 HU or 0, and save again)")


def check_spacing(spacing, name: str) -> None:
    """Refuse a voxel size that is zero, negative or not a number (distances and volumes need it)."""
    values = [float(s) for s in spacing]
    if not all(np.isfinite(v) and v > 0 for v in values):
        raise InputError(f"{name}: voxel size {', '.join(f'{v:g}' for v in values)} mm is not a physical size; "
                         "set the voxel size in the file (e.g. in 3D Slicer: Volumes module, Image Spacing) "
                         "and save again")


def read_volume(
    path: str | os.PathLike,
    series_uid: Optional[str] = None,
    validate: bool = True,
    labels: bool = False,
) -> CTVolume:
    """Read a 3D CT volume (or, with ``labels=True``, an integer label map) from disk.

    ``path`` may be a DICOM folder (sub-folders are searched; the series with the most files
    is read unless ``series_uid`` names one), a 3D DICOM file, or a NIfTI (.nii, .nii.gz),
    NRRD (.nrrd, .nhdr) or MetaImage (.mha, .mhd) file; other formats SimpleITK reads are
    accepted too. Spacing, origin and direction are kept exactly as stored (NIfTI stores
    them as float32). DICOM rescale slope/intercept are applied; integer results that fit
    become int16 and float64 becomes float32.

    With ``validate`` (CT only) the intensities must look like Hounsfield units; see
    `validate_ct`. Label maps are never validated as CT; float label files with integral
    values are converted to the smallest integer type that fits.

    Every problem with the input raises a one-line `InputError` naming the path.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    from ..atomic import note_input

    note_input(path)  # no output of this command may replace it
    metadata: dict = {"source": str(path)}
    if path.is_dir():
        from .dicom import read_dicom_series

        image, dicom_metadata = read_dicom_series(path, series_uid)
        metadata.update(dicom_metadata)
    else:
        if path.stat().st_size == 0:
            raise InputError(f"{path}: the file is empty")
        if series_uid is not None:
            raise InputError(f"{path}: a series UID applies to DICOM folders, not to a single file")
        kind = _format_of(path)
        from .headers import check_volume_file

        check_volume_file(path)  # before ITK allocates what the header claims
        image = _read_image_file(path)
        metadata["format"] = kind or ("dicom" if _is_dicom_file(path) else "other")
        if metadata["format"] == "dicom" and image.HasMetaDataKey("0008|0060"):
            metadata["modality"] = image.GetMetaData("0008|0060").strip()
    hint = "; pass the folder holding the whole series" if metadata.get("format") == "dicom" and path.is_file() else ""
    image = _as_3d_scalar(image, path, hint)
    check_spacing(image.GetSpacing(), str(path))
    volume = volume_from_sitk(image, metadata)
    check_finite(volume.array, str(path))  # on the data as stored, before any cast
    if labels:
        volume.array = _label_dtype(volume.array, path)
        check_label_map(volume.array, str(path))
        volume.metadata["kind"] = "label"
        return volume
    volume.array = _narrow_dtype(volume.array)
    if validate:
        validate_ct(volume, str(path))
    return volume


def _is_dicom_file(path: Path) -> bool:
    from .dicom import looks_like_dicom

    return looks_like_dicom(path)


def read_label_volume(
    path: str | os.PathLike,
    reference: Optional[CTVolume] = None,
    series_uid: Optional[str] = None,
) -> CTVolume:
    """Read an integer label map; with ``reference`` it must lie on the reference's grid."""
    label = read_volume(path, series_uid=series_uid, validate=False, labels=True)
    if reference is not None:
        check_same_grid(label, reference, str(path))
    return label


def check_same_grid(volume: CTVolume, reference: CTVolume, name: str = "label map", tolerance: float = 1e-4) -> None:
    """Raise `InputError` unless ``volume`` lies on ``reference``'s voxel grid (see `CTVolume.same_grid`)."""
    if volume.same_grid(reference, tolerance):
        return
    if volume.shape != reference.shape:
        detail = f"size {_ijk_size(volume)} vs {_ijk_size(reference)}"
    elif not np.allclose(volume.spacing, reference.spacing, atol=tolerance):
        detail = f"spacing {_fmt3(volume.spacing)} vs {_fmt3(reference.spacing)} mm"
    elif not np.allclose(volume.origin, reference.origin, atol=tolerance):
        detail = f"origin {_fmt3(volume.origin)} vs {_fmt3(reference.origin)} mm"
    else:
        detail = "different direction matrices"
    raise InputError(f"{name}: does not lie on the image's voxel grid ({detail}); resample it onto the image first")


def _ijk_size(volume: CTVolume) -> str:
    return "×".join(str(n) for n in volume.shape[::-1])


def _fmt3(values) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in values) + ")"


def validate_ct(volume: CTVolume, name: str = "volume") -> None:
    """Raise a one-line `InputError` unless ``volume`` plausibly holds CT in Hounsfield units.

    The test, designed to pass any CT that contains air or lung and to fail MR, PET,
    normalised or unscaled images:

    * the array is 3D and every voxel is finite (no NaN/inf);
    * a DICOM Modality, when known, is ``CT``;
    * air is present: the 0.5th percentile is at most −800 HU (air is about −1000 HU, lung
      −900..−700; padding outside the field of view, e.g. −2048 or −3024, also counts). MR
      (0..~4000), raw stored values (0..4095 with the intercept not applied), [0, 1] or
      z-scored images fail here;
    * the median lies in −1200..1500 HU and all values in −32768..65535.

    Percentiles are computed on at most two million evenly strided voxels. Use
    ``validate=False`` (the commands that offer ``--no-validate``) to bypass for unusual but
    genuine CT, such as a tight crop of soft tissue with no air.
    """
    array = np.asarray(volume.array)
    if array.ndim != 3:
        raise InputError(f"{name}: expected a 3D volume, got an array of shape {array.shape}")
    if array.size == 0:
        raise InputError(f"{name}: the volume is empty")
    if array.dtype.kind not in "iuf":
        raise InputError(f"{name}: voxel type {array.dtype} is not a numeric intensity")
    check_finite(array, name)
    modality = str(volume.metadata.get("modality", "") or "").upper()
    if modality and modality != "CT":
        raise InputError(f"{name}: DICOM modality is {modality}, not CT")
    flat = array.reshape(-1)
    step = max(1, flat.size // _VALIDATION_SAMPLE)
    sample = flat[::step].astype(np.float32, copy=False)
    low, median = np.percentile(sample, [AIR_PERCENTILE, 50.0])
    vmin, vmax = float(array.min()), float(array.max())
    hint = {"no_validate": "pass --no-validate if it really is CT in HU"}
    if low > AIR_MAX_HU:
        raise InputError(
            f"{name}: does not look like CT in Hounsfield units: no air near -1000 HU "
            f"(values {vmin:g}..{vmax:g}, {AIR_PERCENTILE:g}th percentile {low:.0f}); "
            "an MR, normalised or unscaled image? Give a CT volume in HU", hint)
    if not (MEDIAN_RANGE_HU[0] <= median <= MEDIAN_RANGE_HU[1]) or vmin < VALUE_RANGE_HU[0] or vmax > VALUE_RANGE_HU[1]:
        raise InputError(
            f"{name}: intensities are implausible for CT in Hounsfield units "
            f"(values {vmin:g}..{vmax:g}, median {median:.0f}); give a CT volume in HU", hint)


def write_volume(volume: CTVolume, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write ``volume`` to a NIfTI (.nii, .nii.gz), NRRD (.nrrd) or MetaImage (.mha) file.

    The file appears atomically (written beside the target, then renamed), compressed
    unless ``compress`` is False (.nii.gz is always compressed, .nii never). Returns the path.
    """
    import SimpleITK as sitk

    path = Path(path).expanduser()
    name = path.name.lower()
    extension = next((ext for ext in WRITE_FORMATS if name.endswith(ext)), None)
    if extension is None:
        raise InputError(
            f"{path}: unsupported output format; use one of {', '.join(WRITE_FORMATS)} "
            "(detached-header .nhdr/.mhd and DICOM are not written)"
        )
    if path.is_dir():
        raise InputError(f"{path}: is a folder; give a file name")
    image = volume_to_sitk(volume)

    def read_back(tmp: Path) -> None:
        # SimpleITK does not raise on a full disk: it leaves an empty or truncated file. Only a
        # file that reads back to the same voxels on the same grid is published.
        written = sitk.ReadImage(str(tmp))
        expected = sitk.GetArrayViewFromImage(image)
        if tuple(written.GetSize()) != tuple(image.GetSize()) or not np.array_equal(
                sitk.GetArrayViewFromImage(written), expected, equal_nan=expected.dtype.kind == "f"):
            raise ValueError("the voxels read back differ from those written")

    try:
        from ..atomic import atomic_file

        with atomic_file(path, suffix=extension, verify=read_back,
                         size_hint=int(np.asarray(volume.array).nbytes)) as tmp:
            sitk.WriteImage(image, str(tmp), compress)
    except RuntimeError as error:
        raise InputError(f"{path}: cannot be written ({itk_error_summary(error)})") from None
    except OSError as error:
        raise InputError(f"{path}: cannot be written ({error.strerror or error})") from None
    return path


def describe_volume(volume: CTVolume, percentiles=(1, 5, 50, 95, 99)) -> dict:
    """Geometry and intensity statistics (plain Python values) for reports and ``data info``."""
    array = np.asarray(volume.array)
    flat = array.reshape(-1)
    step = max(1, flat.size // _VALIDATION_SAMPLE)
    sample = flat[::step]
    finite = sample[np.isfinite(sample)] if array.dtype.kind == "f" else sample
    values = np.percentile(finite, percentiles) if finite.size else [float("nan")] * len(percentiles)
    return {
        "size_ijk": [int(n) for n in volume.shape[::-1]],
        "spacing": [float(s) for s in volume.spacing],
        "origin": [float(o) for o in volume.origin],
        "direction": [[float(v) for v in row] for row in volume.direction],
        "dtype": str(array.dtype),
        "min": float(np.nanmin(array)) if array.size else float("nan"),
        "max": float(np.nanmax(array)) if array.size else float("nan"),
        "percentiles": {f"p{p:g}": float(v) for p, v in zip(percentiles, values)},
        "physical_extent_mm": [float(n * s) for n, s in zip(volume.shape[::-1], volume.spacing)],
    }

"""Reading CTs for the web app: uploads, server-side paths and the built-in sample.

Pure engine code (no trame, no MRML): each reader returns a `CTVolume` and runs in a worker
thread while the page shows a progress bar. The sample may be shrunk at load time
(`SampleOptions`), which keeps browser tests and demonstrations on small CPUs fast; the page
says when it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError
from ..io.volume import VOLUME_SUFFIXES, CTVolume, read_volume

#: Single-file formats accepted by upload and by the server-side browser.
FILE_SUFFIXES = tuple(suffix for suffix in VOLUME_SUFFIXES if suffix not in (".nhdr", ".mhd"))
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")


@dataclass(frozen=True)
class SampleOptions:
    """How the built-in sample is shrunk when loaded: in-plane block averaging by ``downsample``
    (1 = full resolution) and an optional slice range ``first..last`` (inclusive)."""

    downsample: int = 1
    first_slice: Optional[int] = None
    last_slice: Optional[int] = None

    def describe(self) -> str:
        parts = []
        if self.downsample > 1:
            parts.append(f"downsampled {self.downsample}× in-plane")
        if self.first_slice is not None or self.last_slice is not None:
            parts.append(f"slices {self.first_slice or 0}-{'' if self.last_slice is None else self.last_slice}")
        return ", ".join(parts)


def parse_slice_range(text: str) -> tuple[int, int]:
    """``"12-28"`` → (12, 28)."""
    try:
        first, last = (int(part) for part in str(text).split("-", 1))
    except ValueError:
        raise InputError(f"slice range {text!r}: write FIRST-LAST, e.g. 12-28") from None
    if first < 0 or last < first:
        raise InputError(f"slice range {text!r}: need 0 <= FIRST <= LAST")
    return first, last


def shrink(volume: CTVolume, options: SampleOptions, labels: bool = False) -> CTVolume:
    """Crop slices and block-average (labels: majority of the block) in-plane; the geometry
    follows (origin at the centre of the first block)."""
    count = volume.shape[0]
    first = options.first_slice or 0
    last = count - 1 if options.last_slice is None else min(options.last_slice, count - 1)
    if first > last:
        raise InputError(f"slice range {first}-{last} is outside the sample's {count} slices")
    volume = volume.slab(first, last + 1)
    array = volume.array
    factor = max(int(options.downsample), 1)
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    direction = np.asarray(volume.direction, dtype=np.float64)
    origin = np.asarray(volume.origin, dtype=np.float64)
    if factor > 1:
        from skimage.measure import block_reduce

        rows, cols = (array.shape[1] // factor) * factor, (array.shape[2] // factor) * factor
        array = array[:, :rows, :cols]
        means = block_reduce(array.astype(np.float32), (1, factor, factor), np.mean)
        array = ((means >= 0.5) if labels else np.round(means)).astype(volume.array.dtype)
        half_block = (factor - 1) / 2
        origin = origin + direction[:, 0] * spacing[0] * half_block + direction[:, 1] * spacing[1] * half_block
        spacing = spacing * np.array([factor, factor, 1.0])
    return CTVolume(np.ascontiguousarray(array), tuple(spacing), tuple(origin), direction,
                    {**volume.metadata, "shrunk": options.describe()})


def read_sample(name: str, options: SampleOptions = SampleOptions()) -> tuple[CTVolume, CTVolume]:
    """The (image, lesion label) of a built-in sample, fetched if needed, then shrunk."""
    from ..io.sample_data import load_sample

    image, label = load_sample(name)
    if options != SampleOptions():
        image, label = shrink(image, options), shrink(label, options, labels=True)
    image.metadata["name"] = f"{name} sample"
    return image, label


def upload_kind(names: list[str]) -> str:
    """``"file"`` for one volume file, ``"dicom"`` for a set of DICOM slices; `InputError` otherwise."""
    if not names:
        raise InputError("nothing was uploaded")
    lowered = [name.lower() for name in names]
    volumes = [name for name in lowered if name.endswith(FILE_SUFFIXES)]
    if volumes:
        if len(names) > 1:
            raise InputError("upload one volume file (NIfTI, NRRD, MHA) at a time, or the files of one DICOM series")
        return "file"
    if len(names) == 1 and not lowered[0].endswith(DICOM_SUFFIXES) and "." in Path(lowered[0]).name:
        raise InputError(f"{names[0]}: not a CT file; upload NIfTI (.nii, .nii.gz), NRRD (.nrrd), MHA (.mha) or "
                         "a DICOM series")
    return "dicom"


def read_path(path: str | os.PathLike) -> CTVolume:
    """A CT file or DICOM folder (already checked against the data roots)."""
    return read_volume(path)

"""Volume file headers checked against the files before any voxel is read.

A header states the size and type of the voxel data; ITK trusts it, allocates that much and
fills whatever the file lacks with zeros (a NIfTI header claiming 512×512×10000 voxels on a
2 KB file takes minutes and gigabytes and yields a volume of zeros; a truncated ``.nii.gz``
reads as zero-filled). `check_volume_file` parses the header of a NIfTI, NRRD (attached or
detached, raw, gzip or bzip2) or MetaImage (.mha/.mhd, raw or zlib) file and refuses, in one
line, before anything is allocated:

* a declared volume that would not fit in the available memory;
* data shorter or longer than declared (uncompressed: by file size; compressed: the stream is
  decompressed chunk by chunk and counted, which also checks the gzip CRC);
* no physical voxel size (NIfTI pixdim 0 without an sform, NRRD without space directions or
  spacings, MetaImage without ElementSpacing), which ITK would silently read as 1 mm;
* NaN or infinite voxels in a floating-point NIfTI (ITK's NIfTI reader turns them into 0,
  so they must be caught in the raw data).

Formats it does not know (DICOM files, other ITK formats) pass through unchecked here.
"""

from __future__ import annotations

import bz2
import gzip
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import InputError

#: Reading a volume holds the raw data, its NumPy copy and a converted copy at the same time.
MEMORY_FACTOR = 3
_CHUNK = 1 << 20
_MAX_TEXT_HEADER = 1 << 20

_SPACING_ADVICE = ("distances and volumes would be wrong; set the voxel size in the file (for example in 3D Slicer: "
                   "Volumes module, Volume Information, Image Spacing, then save) and try again")


@dataclass
class DeclaredData:
    """What a header says about the voxel data and where that data lies."""

    format: str
    shape: tuple
    itemsize: int
    dtype: str
    data_path: Path
    offset: int = 0  # where the (raw or compressed) data stream starts in ``data_path``
    compression: Optional[str] = None  # None, "gzip", "zlib" or "bzip2"
    skip: int = 0  # bytes before the voxels inside the (decompressed) stream: NIfTI vox_offset, NRRD byte skip
    at_end: bool = False  # raw voxels are the last `nbytes` of the file (NRRD byte skip -1, MetaImage HeaderSize -1)
    checkable: bool = True  # False for layouts whose size cannot be predicted (text encodings, file lists)

    @property
    def num_voxels(self) -> int:
        return int(np.prod([int(n) for n in self.shape], dtype=object)) if self.shape else 0

    @property
    def nbytes(self) -> int:
        return self.num_voxels * self.itemsize

    def describe(self) -> str:
        return f"{'×'.join(str(n) for n in self.shape)} {self.dtype} voxels ({format_bytes(self.nbytes)})"


def format_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000.0
    return f"{count:.1f} TB"  # pragma: no cover


def available_memory() -> int:
    """Bytes of memory this process can still use (psutil's 'available')."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_memory(nbytes: int, what: str) -> None:
    """Refuse work that would need more memory than is available, before allocating it."""
    needed = int(nbytes) * MEMORY_FACTOR
    available = available_memory()
    if needed > available:
        raise InputError(f"{what} needs about {format_bytes(needed)} of memory to read, "
                         f"only {format_bytes(available)} is available; use a smaller volume or a machine "
                         "with more memory")


def _format_of(path: Path) -> Optional[str]:
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "metaimage"
    return None


def check_volume_file(path: str | os.PathLike, require_spacing: bool = True) -> Optional[DeclaredData]:
    """Check a NIfTI/NRRD/MetaImage file's header against the file (see the module docstring).

    ``require_spacing=False`` is for arrays without a physical grid (sinograms). Returns what the
    header declares (None for formats not checked here); raises a one-line `InputError` naming
    the path otherwise.
    """
    path = Path(path)
    kind = _format_of(path)
    if kind is None:
        return None
    if kind == "nifti":
        declared, stored_dtype = _nifti_header(path, require_spacing)
    elif kind == "nrrd":
        declared = _nrrd_header(path, require_spacing)
    else:
        declared = _metaimage_header(path, require_spacing)
    if any(int(n) <= 0 for n in declared.shape):
        raise InputError(f"{path}: the header declares a volume of size {'×'.join(map(str, declared.shape))}; "
                         "every dimension must be at least 1")
    # Uncompressed sizes are a stat away; a compressed stream is counted (in bounded chunks) only
    # once the declared size is known to fit in memory.
    if declared.checkable and declared.compression is None:
        _check_data_length(path, declared)
    check_memory(declared.nbytes, f"{path}: the header declares {declared.describe()}, which")
    if declared.checkable and declared.compression is not None:
        _check_data_length(path, declared)
    if kind == "nifti" and stored_dtype.kind in "fc":
        _check_nifti_finite(path, declared, stored_dtype)
    return declared


# ---------------------------------------------------------------------------------------- sizes

def _stored_length(data_path: Path, offset: int, compression: Optional[str], limit: int) -> int:
    """Length of the (decompressed) data after ``offset``, read in bounded chunks; counting stops
    a little past ``limit``. A truncated or corrupt stream raises EOFError, OSError or zlib.error."""
    with open(data_path, "rb") as handle:
        handle.seek(offset)
        if compression is None:
            return max(os.fstat(handle.fileno()).st_size - offset, 0)
        total = 0
        if compression in ("gzip", "bzip2"):
            # gzip/bz2 readers handle several members and check the CRC at the end of each.
            stream = gzip.GzipFile(fileobj=handle) if compression == "gzip" else bz2.BZ2File(handle)
            with stream:
                while True:
                    chunk = stream.read(_CHUNK)
                    if not chunk:
                        return total
                    total += len(chunk)
                    if total > limit:
                        return total
        decompressor = zlib.decompressobj(47)  # a zlib (MetaImage) or gzip header
        while not decompressor.eof:
            data = decompressor.unconsumed_tail or handle.read(_CHUNK)
            if not data:
                raise EOFError("the compressed stream ends early")
            total += len(decompressor.decompress(data, _CHUNK))
            if total > limit:
                return total
        return total


def _check_data_length(path: Path, declared: DeclaredData) -> None:
    if not declared.data_path.is_file():
        raise InputError(f"{path}: its data file {declared.data_path} does not exist")
    expected = declared.skip + declared.nbytes
    try:
        stored = _stored_length(declared.data_path, declared.offset, declared.compression, expected)
    except (EOFError, zlib.error, OSError, ValueError) as error:
        detail = " ".join(str(error).split()) or type(error).__name__
        raise InputError(f"{path}: the compressed voxel data is truncated or corrupt ({detail}); "
                         "re-export or copy the file again") from None
    if stored < (declared.nbytes if declared.at_end else expected):
        raise InputError(f"{path}: the header declares {declared.describe()} but the file holds only "
                         f"{format_bytes(max(stored - declared.skip, 0))} of voxel data (truncated, or a header that "
                         "does not belong to this data); re-export or copy the file again")
    if stored > expected and not declared.at_end:
        raise InputError(f"{path}: the header declares {declared.describe()} but the file holds more voxel data "
                         f"({format_bytes(stored - declared.skip)}): the header does not match the data; "
                         "re-export the file")


# ---------------------------------------------------------------------------------------- NIfTI

def _nifti_header(path: Path, require_spacing: bool = True):
    import nibabel
    from nibabel.openers import ImageOpener

    try:
        # The header as stored: nibabel's default check would "repair" pixdim 0 to 1 mm (and log it).
        with ImageOpener(str(path)) as handle:
            raw = handle.read(4)
            handle.seek(0)
            header_class = nibabel.Nifti2Header if raw in (b"\x1c\x02\x00\x00", b"\x00\x00\x02\x1c") \
                else nibabel.Nifti1Header
            header = header_class.from_fileobj(handle, check=False)
        if header["magic"] not in (b"n+1", b"n+2"):
            raise ValueError("not a single-file NIfTI (magic n+1/n+2 missing)")
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(header.get_data_offset())
    except Exception as error:  # noqa: BLE001 - nibabel raises many kinds for a broken header
        detail = " ".join(str(error).split())[:160] or type(error).__name__
        raise InputError(f"{path}: cannot be read as an image (not a NIfTI file: {detail})") from None
    spatial = min(3, len(shape))
    pixdim = [float(v) for v in header["pixdim"][1:1 + spatial]]
    if require_spacing and int(header["sform_code"]) == 0 and not all(math.isfinite(v) and v > 0 for v in pixdim):
        raise InputError(f"{path}: the header gives no voxel size (pixdim {', '.join(f'{v:g}' for v in pixdim)} "
                         f"and no sform); {_SPACING_ADVICE}")
    declared = DeclaredData("nifti", shape, int(dtype.itemsize), str(dtype.newbyteorder("=")), path, 0,
                            "gzip" if path.name.lower().endswith(".gz") else None, skip=offset)
    return declared, dtype


def _check_nifti_finite(path: Path, declared: DeclaredData, dtype: np.dtype) -> None:
    """Refuse NaN/inf among a float NIfTI's stored values (ITK's reader would turn them into 0)."""
    from nibabel.openers import ImageOpener

    from .volume import check_finite

    with ImageOpener(str(path)) as handle:
        handle.seek(declared.skip)
        data = np.frombuffer(handle.read(declared.nbytes), dtype=dtype)
    check_finite(data, str(path))


# ---------------------------------------------------------------------------------------- NRRD

_NRRD_TYPES = {}
for _size, _names, _dtype in (
    (1, "signed char|int8|int8_t", "int8"),
    (1, "uchar|unsigned char|uint8|uint8_t", "uint8"),
    (2, "short|short int|signed short|signed short int|int16|int16_t", "int16"),
    (2, "ushort|unsigned short|unsigned short int|uint16|uint16_t", "uint16"),
    (4, "int|signed int|int32|int32_t", "int32"),
    (4, "uint|unsigned int|uint32|uint32_t", "uint32"),
    (8, "longlong|long long|long long int|signed long long|signed long long int|int64|int64_t", "int64"),
    (8, "ulonglong|unsigned long long|unsigned long long int|uint64|uint64_t", "uint64"),
    (4, "float", "float32"),
    (8, "double", "float64"),
):
    for _name in _names.split("|"):
        _NRRD_TYPES[_name] = (_size, _dtype)


def _read_text_header(path: Path, stop) -> tuple[list[str], int]:
    """Header lines (decoded) and the byte offset just after the header."""
    lines: list[str] = []
    offset = 0
    with open(path, "rb") as handle:
        while offset < _MAX_TEXT_HEADER:
            raw = handle.readline(_MAX_TEXT_HEADER)
            if not raw:
                break
            offset += len(raw)
            line = raw.decode("latin-1").rstrip("\r\n")
            if stop(line, lines):
                if line:
                    lines.append(line)
                break
            lines.append(line)
        else:
            raise InputError(f"{path}: the header is longer than {_MAX_TEXT_HEADER} bytes (not a volume file?)")
    return lines, offset


def _ints(text: str, path: Path, field: str) -> list[int]:
    try:
        return [int(v) for v in text.split()]
    except ValueError:
        raise InputError(f"{path}: cannot read the header field {field}: {text!r}") from None


def _nrrd_header(path: Path, require_spacing: bool = True) -> DeclaredData:
    lines, end = _read_text_header(path, lambda line, seen: line == "" and bool(seen))
    if not lines or not lines[0].startswith("NRRD"):
        raise InputError(f"{path}: cannot be read as an image (not a NRRD file: no NRRD magic line)")
    fields: dict[str, str] = {}
    for line in lines[1:]:
        if line.startswith("#") or ":=" in line:  # comments and key/value pairs
            continue
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip().lower()] = value.strip()
    for required in ("type", "sizes", "encoding"):
        if required not in fields:
            raise InputError(f"{path}: the NRRD header has no '{required}' field")
    type_name = " ".join(fields["type"].lower().split())
    if type_name not in _NRRD_TYPES:
        raise InputError(f"{path}: NRRD voxel type {fields['type']!r} is not a scalar number type")
    itemsize, dtype = _NRRD_TYPES[type_name]
    sizes = _ints(fields["sizes"], path, "sizes")
    if require_spacing:
        _check_nrrd_spacing(path, fields)
    encoding = fields["encoding"].lower()
    compression = {"raw": None, "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2"}.get(encoding, "text")
    data_file = fields.get("data file", fields.get("datafile"))
    checkable = compression != "text"
    byte_skip = (_ints(fields.get("byte skip", fields.get("byteskip", "0")), path, "byte skip") or [0])[0]
    if (_ints(fields.get("line skip", fields.get("lineskip", "0")), path, "line skip") or [0])[0]:
        checkable = False
    if data_file is None:
        if path.name.lower().endswith(".nhdr"):
            raise InputError(f"{path}: a detached NRRD header (.nhdr) without a 'data file' field")
        data_path, offset = path, end
    else:
        if data_file.upper().startswith("LIST") or len(data_file.split()) > 1 or "%" in data_file:
            checkable = False  # several data files: ITK checks each while reading
        data_path, offset = (path.parent / data_file), 0
    return DeclaredData("nrrd", tuple(sizes), itemsize, dtype, data_path, offset,
                        compression if compression != "text" else None, skip=max(byte_skip, 0),
                        at_end=byte_skip == -1 and compression is None, checkable=checkable)


def _check_nrrd_spacing(path: Path, fields: dict) -> None:
    directions = fields.get("space directions")
    if directions is not None:
        vectors = re.findall(r"\(([^)]*)\)", directions)
        for vector in vectors:
            try:
                values = [float(v) for v in vector.split(",")]
            except ValueError:
                raise InputError(f"{path}: cannot read the NRRD space directions {directions!r}") from None
            if not all(math.isfinite(v) for v in values) or not any(values):
                raise InputError(f"{path}: a NRRD space direction is {vector!r}, so the voxel size is unknown; "
                                 f"{_SPACING_ADVICE}")
        if vectors:
            return
    spacings = fields.get("spacings")
    if spacings is not None:
        values = []
        for text in spacings.split()[:3]:
            try:
                values.append(float(text))
            except ValueError:
                values.append(float("nan"))
        if values and all(math.isfinite(v) and v > 0 for v in values):
            return
        raise InputError(f"{path}: NRRD spacings {spacings!r} do not give a voxel size; {_SPACING_ADVICE}")
    raise InputError(f"{path}: the NRRD header gives no voxel size (no 'space directions' or 'spacings'); "
                     f"{_SPACING_ADVICE}")


# ---------------------------------------------------------------------------------------- MetaImage

_MET_TYPES = {
    "MET_CHAR": (1, "int8"), "MET_UCHAR": (1, "uint8"), "MET_SHORT": (2, "int16"), "MET_USHORT": (2, "uint16"),
    "MET_INT": (4, "int32"), "MET_UINT": (4, "uint32"), "MET_LONG": (4, "int32"), "MET_ULONG": (4, "uint32"),
    "MET_LONG_LONG": (8, "int64"), "MET_ULONG_LONG": (8, "uint64"), "MET_FLOAT": (4, "float32"),
    "MET_DOUBLE": (8, "float64"),
}


def _check_metaimage_spacing(path: Path, spacing_text: Optional[str]) -> None:
    if spacing_text is None:
        raise InputError(f"{path}: the MetaImage header gives no voxel size (no ElementSpacing); {_SPACING_ADVICE}")
    try:
        spacing = [float(v) for v in spacing_text.split()]
    except ValueError:
        spacing = [float("nan")]
    if not spacing or not all(math.isfinite(v) and v > 0 for v in spacing[:3]):
        raise InputError(f"{path}: MetaImage ElementSpacing {spacing_text!r} is not a voxel size; {_SPACING_ADVICE}")


def _metaimage_header(path: Path, require_spacing: bool = True) -> DeclaredData:
    lines, end = _read_text_header(path, lambda line, seen: line.strip().lower().startswith("elementdatafile"))
    fields: dict[str, str] = {}
    for line in lines:
        key, sep, value = line.partition("=")
        if sep:
            fields[key.strip().lower()] = value.strip()
    if "elementdatafile" not in fields or "dimsize" not in fields:
        raise InputError(f"{path}: cannot be read as an image (not a MetaImage file: no DimSize or ElementDataFile)")
    element_type = fields.get("elementtype", "").upper()
    if element_type not in _MET_TYPES:
        raise InputError(f"{path}: MetaImage voxel type {element_type or 'missing'!r} is not a scalar number type")
    itemsize, dtype = _MET_TYPES[element_type]
    sizes = _ints(fields["dimsize"], path, "DimSize")
    channels = _ints(fields.get("elementnumberofchannels", "1"), path, "ElementNumberOfChannels") or [1]
    if channels[0] != 1:
        sizes = sizes + [channels[0]]
    if require_spacing:
        _check_metaimage_spacing(path, fields.get("elementspacing", fields.get("elementsize")))
    compressed = fields.get("compresseddata", "false").lower() == "true"
    header_size = (_ints(fields.get("headersize", "0"), path, "HeaderSize") or [0])[0]
    data_file = fields["elementdatafile"]
    checkable = True
    if data_file.upper() == "LOCAL":
        data_path, offset = path, end
    else:
        if data_file.upper().startswith("LIST") or len(data_file.split()) > 1 or "%" in data_file:
            checkable = False
        data_path, offset = path.parent / data_file, 0
    return DeclaredData("metaimage", tuple(sizes), itemsize, dtype, data_path, offset,
                        "zlib" if compressed else None, skip=0 if compressed else max(header_size, 0),
                        at_end=header_size == -1 and not compressed, checkable=checkable)

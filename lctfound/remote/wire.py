"""How volumes travel between `lctfound serve` and its clients (needs only numpy and zstandard).

A volume is a JSON header and a body. The body is the raw C-order array bytes compressed with
zstandard (a maintained, small codec; level 3 packs a CT about 2-3x in well under the time the
network takes). The header holds what is needed to rebuild it exactly: ``shape``, ``dtype``
(little-endian numpy names only), ``spacing``, ``origin``, ``direction`` (ITK/LPS, as
`lctfound.io.volume.CTVolume`), ``sha256`` of the raw bytes and ``compressed_bytes``. Both sides
check the decompressed size and the checksum; a mismatch is one `WireError` line.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import LCTfoundError

#: Version of the HTTP interface; the client and the server refuse each other when it differs.
API_VERSION = 1

#: The array types a volume may travel as (explicit little-endian, no objects, no structured types).
DTYPES = ("uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "float64")

#: Upper bound of voxels in one volume (a 1024x1024x2000 CT), so a lying header cannot make a side
#: allocate without limit.
MAX_VOXELS = 1024 * 1024 * 2000

ZSTD_LEVEL = 3

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class WireError(LCTfoundError):
    """A volume header or body that does not hold together (size, type or checksum)."""


def check_name(value: Any, what: str) -> str:
    """A name chosen by a client (model, client id): 1-64 letters, digits, ``.``, ``_`` or ``-``, not
    starting with a dot or dash, so it can never be a path."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise WireError(f"{what} {value!r} is not a valid name; use 1-64 letters, digits, '.', '_' or '-' "
                        "starting with a letter or digit")
    return value


def encode_volume(array: np.ndarray, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                  origin: Sequence[float] = (0.0, 0.0, 0.0), direction: Optional[Any] = None) -> tuple[dict, bytes]:
    """``(header, compressed body)`` of a 3D array with its geometry."""
    import zstandard

    array = np.asarray(array)
    if array.ndim != 3:
        raise WireError(f"a volume must be 3D, this one has shape {array.shape}")
    dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    if dtype.name not in DTYPES:
        raise WireError(f"volumes of type {array.dtype} cannot be sent; convert to one of {', '.join(DTYPES)}")
    raw = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<")).tobytes()
    body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(raw)
    header = {
        "shape": [int(n) for n in array.shape],
        "dtype": dtype.name,
        "spacing": [float(v) for v in spacing],
        "origin": [float(v) for v in origin],
        "direction": np.asarray(np.eye(3) if direction is None else direction, dtype=np.float64).reshape(3, 3).tolist(),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "compressed_bytes": len(body),
    }
    return header, body


def check_header(header: Mapping[str, Any]) -> dict:
    """The header, checked (types, sizes, geometry); raises `WireError`."""
    if not isinstance(header, Mapping):
        raise WireError("the volume header is not a JSON object")
    try:
        shape = [int(n) for n in header["shape"]]
        dtype = str(header["dtype"])
        spacing = [float(v) for v in header["spacing"]]
        origin = [float(v) for v in header["origin"]]
        direction = np.asarray(header["direction"], dtype=np.float64).reshape(3, 3)
        sha256 = str(header["sha256"])
        compressed = int(header["compressed_bytes"])
    except (KeyError, TypeError, ValueError) as error:
        raise WireError(f"the volume header is incomplete or malformed ({error})") from None
    if len(shape) != 3 or min(shape) < 1 or int(np.prod(shape, dtype=np.int64)) > MAX_VOXELS:
        raise WireError(f"volume shape {shape} is not a 3D shape of at most {MAX_VOXELS} voxels")
    if dtype not in DTYPES:
        raise WireError(f"volume type {dtype!r} is not one of {', '.join(DTYPES)}")
    if len(spacing) != 3 or len(origin) != 3 or not all(np.isfinite(spacing + origin)) or min(spacing) <= 0 \
            or not np.all(np.isfinite(direction)):
        raise WireError("the volume geometry (spacing, origin, direction) is not finite and positive")
    if not re.fullmatch(r"[0-9a-f]{64}", sha256) or compressed < 1:
        raise WireError("the volume header's checksum or size is malformed")
    return {"shape": shape, "dtype": dtype, "spacing": spacing, "origin": origin, "direction": direction.tolist(),
            "sha256": sha256, "compressed_bytes": compressed}


def decode_volume(header: Mapping[str, Any], body: bytes) -> np.ndarray:
    """The array of a checked header and its compressed body; raises `WireError` on any mismatch."""
    import zstandard

    header = check_header(header)
    if len(body) != header["compressed_bytes"]:
        raise WireError(f"the volume body has {len(body)} bytes, its header says {header['compressed_bytes']}")
    dtype = np.dtype(header["dtype"]).newbyteorder("<")
    expected = int(np.prod(header["shape"], dtype=np.int64)) * dtype.itemsize
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=expected)
    except zstandard.ZstdError as error:
        raise WireError(f"the volume body is not valid zstandard data ({error})") from None
    if len(raw) != expected:
        raise WireError(f"the volume body holds {len(raw)} bytes, its shape and type need {expected}")
    if hashlib.sha256(raw).hexdigest() != header["sha256"]:
        raise WireError("the volume's checksum does not match (damaged in transfer); send it again")
    return np.frombuffer(raw, dtype=dtype).reshape(header["shape"]).astype(dtype.newbyteorder("="), copy=True)

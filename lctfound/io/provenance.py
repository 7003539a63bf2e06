"""Provenance of result volumes: what made them, in a JSON file beside them.

A result volume (generated, super-resolved, enhanced) carries a ``{key: value}`` record (task,
parameters, source, model name and sha256, seed, time). Files keep it in a JSON file of the same
name — ``OUT.nrrd`` / ``OUT.nii.gz`` → ``OUT.json`` — the convention of ``lctfound enhance``
(`lctfound.cli.enhance`); in Slicer it becomes the node attributes ``LCTfound.<key>``
(`lctfound.mrml.volumes.set_provenance`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from ..errors import InputError
from .volume import WRITE_FORMATS, CTVolume, volume_stem


def provenance_path(path: str | os.PathLike) -> Path:
    """``OUT.nrrd`` / ``OUT.nii.gz`` → ``OUT.json``."""
    path = Path(path)
    return path.with_name(volume_stem(path) + ".json")


def check_new_output(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()) -> Path:
    """Raise an `LCTfoundError` unless ``path`` is a writable volume format whose file and provenance
    JSON do not exist yet (or ``overwrite``), neither resolves to one of ``inputs`` and their folder
    is writable (`lctfound.atomic.check_outputs`)."""
    from ..atomic import check_outputs

    path = Path(path).expanduser()
    if not path.name.lower().endswith(WRITE_FORMATS):
        raise InputError(f"{path}: unsupported output format; use one of {', '.join(WRITE_FORMATS)}")
    check_outputs([path, provenance_path(path)], inputs, overwrite)
    return path


def write_volume_with_provenance(volume: CTVolume, path: str | os.PathLike,
                                 provenance: Optional[Mapping[str, Any]] = None) -> Path:
    """Write ``volume``, then ``provenance`` (default ``volume.metadata``) as ``OUT.json``, each atomically.
    Returns the JSON path."""
    from ..atomic import atomic_file
    from ..metrics.statistics import json_ready
    from .volume import write_volume

    path = Path(path).expanduser()
    record = with_compute_settings(volume.metadata if provenance is None else provenance)
    side = provenance_path(path)
    # The small JSON is written (and checked) first and renamed only after the volume is published:
    # a full disk leaves neither, never a volume without its provenance.
    with atomic_file(side) as tmp:
        tmp.write_text(json.dumps(json_ready(record), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_volume(volume, path)
    return side


def with_compute_settings(record: Optional[Mapping[str, Any]]) -> dict[str, Any]:
    """``record`` with a ``compute`` entry (device and CPU threads of this run) unless it has one."""
    from ..devices import compute_settings

    record = dict(record or {})
    record.setdefault("compute", compute_settings())
    return record


def read_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance record beside a result volume file ({} when there is none)."""
    side = provenance_path(path)
    if not side.is_file():
        return {}
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(f"{side}: not valid JSON ({error.msg})") from None
    return record if isinstance(record, dict) else {}


def model_provenance(model: Any) -> dict[str, Any]:
    """Name, folder and U-Net weight sha256 of a loaded `LCTfoundModel` (None where unknown)."""
    from ..hashing import sha256_file
    from ..models.bundle import WEIGHTS_NAME, locate_unet_folder

    files = model.metadata.get("files", {}) or {}
    # load_model has verified the recorded checksum; hash the weights only when none is recorded.
    sha256 = files.get(f"unet/{WEIGHTS_NAME}") or files.get(WEIGHTS_NAME)
    if not sha256 and model.path is not None:
        sha256 = sha256_file(locate_unet_folder(model.path) / WEIGHTS_NAME)
    name = model.metadata.get("name") or (Path(model.path).name if model.path is not None else model.preset)
    return {"model": name, "model_path": str(model.path) if model.path is not None else None,
            "model_sha256": sha256 or None}

"""Where models are found: the embedded default, the user's model folder, the official release,
and any folder a user points to. Every front end lists and resolves models through here.

* embedded — shipped inside the package (``lctfound/models/embedded/<name>``);
* user — ``<cache>/models/<name>`` (trained or imported models; see `lctfound.paths`);
* official — the folder or cached Hugging Face repo id in ``$LCTFOUND_OFFICIAL_MODEL``;
* folder — extra folders given by the caller (Slicer settings, command-line paths).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from ..errors import CheckpointError, LCTfoundError
from ..paths import user_models_dir

# `.bundle` (PyTorch) is imported where it is used: the panels check new model names without PyTorch.

EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
DEFAULT_MODEL_NAME = "lctfound-cpu-tiny"
OFFICIAL_ENV = "LCTFOUND_OFFICIAL_MODEL"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    path: Path
    source: str  # "embedded" | "user" | "official" | "folder"
    preset: str
    description: str = ""


def _entry(path: Path, source: str, name: Optional[str] = None) -> Optional[ModelEntry]:
    from .bundle import METADATA_FILE, locate_unet_folder, read_unet_config

    metadata_path = path / METADATA_FILE
    try:
        if metadata_path.is_file():
            metadata = json.loads(metadata_path.read_text())
            return ModelEntry(name or metadata.get("name") or path.name, path, source,
                              metadata.get("preset", "custom"), metadata.get("description", ""))
        from .bundle import _match_preset

        unet_folder = locate_unet_folder(path)
        return ModelEntry(name or path.name, path, source, _match_preset(read_unet_config(unet_folder)),
                          "diffusers folder without LCTfound metadata")
    except (CheckpointError, OSError, json.JSONDecodeError):
        return None  # not a model folder; listing skips it, loading it by path explains why


def _children(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")) if folder.is_dir() else []


def list_models(extra_folders: Iterable[str | Path] = ()) -> list[ModelEntry]:
    """All models found, the embedded default first."""
    from .bundle import locate_unet_folder

    entries: list[ModelEntry] = []
    for path in _children(EMBEDDED_DIR):
        entries.append(_entry(path, "embedded"))
    for path in _children(user_models_dir()):
        entries.append(_entry(path, "user"))
    official = os.environ.get(OFFICIAL_ENV)
    if official:
        try:
            entries.append(_entry(locate_unet_folder(official).parent if Path(official).exists()
                                  else locate_unet_folder(official), "official", "official"))
        except CheckpointError:
            pass
    for folder in extra_folders:
        entries.append(_entry(Path(folder).expanduser(), "folder"))
    entries = [entry for entry in entries if entry is not None]
    entries.sort(key=lambda e: (e.source != "embedded" or e.name != DEFAULT_MODEL_NAME,))
    return entries


def resolve_model(spec: Optional[str | Path] = None) -> Path:
    """A model name from `list_models`, ``default``, a folder path, or a cached repo id → folder."""
    from .bundle import locate_unet_folder

    if spec in (None, "", "default"):
        default = EMBEDDED_DIR / DEFAULT_MODEL_NAME
        if not default.is_dir():
            raise LCTfoundError(f"the embedded default model is missing from {EMBEDDED_DIR}; reinstall lctfound or "
                                "name a model folder")
        return default
    path = Path(spec).expanduser()
    if path.exists():
        return path
    for entry in list_models():
        if entry.name == str(spec):
            return entry.path
    if "/" in str(spec) and not str(spec).startswith((".", "/", "~")):
        return locate_unet_folder(str(spec)).parent
    names = ", ".join(entry.name for entry in list_models()) or "none"
    raise LCTfoundError(f"model {spec!r} not found (not a folder; known models: {names})")


MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_new_model_name(name: str) -> None:
    """A name for a new user model: letters, digits, ``._-``, not already taken."""
    if not MODEL_NAME_PATTERN.match(name or ""):
        raise LCTfoundError(f"model name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    if (user_models_dir() / name).exists() or (EMBEDDED_DIR / name).exists():
        raise LCTfoundError(f"model name {name!r} is already taken; choose another")


def register_model(folder: str | Path, name: str) -> Path:
    """Copy a model (or task model) folder into the user model folder as ``name``, atomically.

    Every front end lists models from there (`list_models`, `list_task_models`).
    """
    import shutil

    from ..atomic import atomic_directory

    from .bundle import METADATA_FILE, locate_unet_folder
    from .task_models import TASK_FILE

    check_new_model_name(name)
    source = Path(folder)
    if not (source / TASK_FILE).is_file():
        locate_unet_folder(source)  # a backbone folder, or a clear error
    target = user_models_dir() / name
    with atomic_directory(target) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        for metadata_path in (tmp / METADATA_FILE, tmp / TASK_FILE):
            if not metadata_path.is_file():
                continue
            metadata = json.loads(metadata_path.read_text())
            metadata["name"] = name  # the metadata file is not among the checksummed files
            metadata_path.write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return target

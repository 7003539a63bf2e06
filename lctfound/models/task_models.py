"""Task models: trained heads, adapters or fine-tuned backbones, saved with what they depend on.

A task model is a folder::

    task.json                  task type, backbone reference, mode, preprocessing, labels, training
    <part>.safetensors         one file per trained part (head, adapters, output layer…)
    backbone/                  only for full fine-tuning: the fine-tuned backbone (model-folder layout)

The backbone reference names the backbone model (registry name and path) and the sha256 of its
U-Net weights, so loading a head on a different backbone is refused with a clear error instead
of giving silently wrong results. Every file's sha256 is recorded and checked on load.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

from .. import __version__
from ..atomic import atomic_directory
from ..errors import CheckpointError, LCTfoundError
from ..hashing import sha256_file
from ..paths import user_models_dir
from .bundle import WEIGHTS_NAME, LCTfoundModel, locate_unet_folder, save_model

TASK_FILE = "task.json"
TASK_FORMAT_VERSION = 1
BACKBONE_FOLDER = "backbone"


def backbone_reference(model: LCTfoundModel, name: Optional[str] = None) -> dict[str, Any]:
    """What a task model needs to find and verify its backbone again."""
    reference: dict[str, Any] = {"preset": model.preset, "name": name or model.metadata.get("name")}
    if model.path is not None:
        reference["path"] = str(model.path)
        weights = locate_unet_folder(model.path) / WEIGHTS_NAME
        reference["unet_sha256"] = sha256_file(weights)
    return reference


@dataclass
class TaskModel:
    """A loaded task model: its description and the state dicts of its parts."""

    folder: Path
    info: dict[str, Any]
    parts: dict[str, dict[str, torch.Tensor]]

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def backbone(self) -> dict[str, Any]:
        return self.info["backbone"]

    def backbone_folder(self) -> Optional[Path]:
        """The fine-tuned backbone stored inside the task model (full fine-tuning), if any."""
        folder = self.folder / BACKBONE_FOLDER
        return folder if folder.is_dir() else None

    def resolve_backbone(self, base_model: Optional[LCTfoundModel] = None) -> LCTfoundModel:
        """The backbone to run: the stored fine-tuned one, else ``base_model`` once verified."""
        from .bundle import load_model

        stored = self.backbone_folder()
        if stored is not None:
            return load_model(stored)
        if base_model is None:
            raise LCTfoundError(f"{self.folder}: needs its backbone model "
                                f"({self.backbone.get('name') or self.backbone.get('path')})")
        self.check_backbone(base_model)
        return base_model

    def check_backbone(self, model: LCTfoundModel) -> None:
        """Refuse a backbone other than the one this task model was trained on."""
        expected = self.backbone.get("unet_sha256")
        if expected is None or model.path is None:
            return
        actual = sha256_file(locate_unet_folder(model.path) / WEIGHTS_NAME)
        if actual != expected:
            raise CheckpointError(
                f"{self.folder}: trained on backbone {self.backbone.get('name') or self.backbone.get('path')} "
                f"(weights {expected[:12]}…), not on {model.path} ({actual[:12]}…)")


def save_task_model(folder: str | Path, task: str, backbone: dict[str, Any], parts: dict[str, torch.nn.Module],
                    info: dict[str, Any], backbone_model: Optional[LCTfoundModel] = None,
                    overwrite: bool = False) -> Path:
    """Write a task model folder atomically; ``parts`` name → module whose state dict is saved."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        for name, module in parts.items():
            state = {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}
            save_file(state, str(tmp / f"{name}.safetensors"))
        if backbone_model is not None:
            save_model(backbone_model, tmp / BACKBONE_FOLDER)
        document = {
            "format_version": TASK_FORMAT_VERSION, "task": task, "backbone": backbone, "parts": sorted(parts),
            **info, "lctfound_version": __version__,
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        document["files"] = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / TASK_FILE).write_text(json.dumps(document, indent=2, ensure_ascii=False, default=str))
    return folder


def read_task_info(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / TASK_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder}: not a task model ({TASK_FILE} missing)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error.msg})") from None
    if info.get("format_version", 0) > TASK_FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer LCTfound; upgrade lctfound")
    return info


def load_task_model(folder: str | Path, task: Optional[str] = None) -> TaskModel:
    """Read a task model with checksum verification; ``task`` refuses a model of another task."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    info = read_task_info(folder)
    if task is not None and info.get("task") != task:
        raise CheckpointError(f"{folder}: a {info.get('task')} model, not a {task} model")
    for relative, checksum in info.get("files", {}).items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {TASK_FILE} but missing")
        if sha256_file(path) != checksum:
            raise CheckpointError(f"{path}: sha256 differs from {TASK_FILE}; the file is corrupt or was changed")
    parts = {}
    for name in info.get("parts", []):
        try:
            parts[name] = load_file(str(folder / f"{name}.safetensors"))
        except Exception as error:  # damaged file: one clear line
            raise CheckpointError(f"{folder / (name + '.safetensors')}: cannot be read ({error})") from None
    return TaskModel(folder, info, parts)


@dataclass(frozen=True)
class TaskModelEntry:
    name: str
    path: Path
    task: str
    backbone: str
    description: str = ""


def list_task_models(task: Optional[str] = None, extra_folders: Iterable[str | Path] = ()) -> list[TaskModelEntry]:
    """Task models in the user model folder (and extra folders), optionally of one task."""
    candidates = []
    root = user_models_dir()
    if root.is_dir():
        candidates.extend(p for p in sorted(root.iterdir()) if (p / TASK_FILE).is_file())
    candidates.extend(Path(p).expanduser() for p in extra_folders)
    entries = []
    for path in candidates:
        try:
            info = read_task_info(path)
        except CheckpointError:
            continue
        if task is None or info.get("task") == task:
            backbone = info.get("backbone", {})
            entries.append(TaskModelEntry(info.get("name") or path.name, path, info.get("task", "?"),
                                          backbone.get("name") or backbone.get("preset") or "?",
                                          info.get("description", "")))
    return entries


def require_parts(model: TaskModel, names: Iterable[str]) -> None:
    missing = [name for name in names if name not in model.parts]
    if missing:
        raise LCTfoundError(f"{model.folder}: has no {missing[0]!r} part (this model cannot do that task)")

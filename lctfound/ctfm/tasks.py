"""What the CT-FM task models (linear probe, segmentation decoder) share: the backbone reference
stored in ``task.json``, the check that refuses another backbone, and finding task models.

A CT-FM task model's backbone reference::

    {"backbone": "ctfm", "name": <folder name>, "path": <CT-FM folder>, "weights_sha256": <sha256
     of model.safetensors>, "config": {...}}

LCTfound task models name their backbone by ``unet_sha256`` instead; a task model of one
backbone is never run on the other.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..errors import CheckpointError, LCTfoundError
from ..io.volume import CTVolume
from ..models.task_models import TASK_FILE, TaskModel, list_task_models, load_task_model
from .model import CTFMModel, load_model

PROBE_TASK = "ctfm-probe"
SEGMENTATION_TASK = "ctfm-segmentation"
TASKS = (PROBE_TASK, SEGMENTATION_TASK)
RESEARCH_NOTE = "research use only; not for clinical decisions"


def model_fingerprint(model: CTFMModel) -> str:
    """The sha256 of the weights file, or (an unsaved model) of the encoder's tensors."""
    if model.weights_sha256:
        return model.weights_sha256
    if "content_sha256" not in model.metadata:  # hashed once per loaded model (frozen weights)
        digest = hashlib.sha256()
        for name, tensor in sorted(model.encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        model.metadata["content_sha256"] = digest.hexdigest()
    return model.metadata["content_sha256"]


def volume_fingerprint(volume: CTVolume) -> str:
    """A content hash of a volume: voxels, shape, dtype and IJK→RAS geometry (what preprocessing sees)."""
    array = np.ascontiguousarray(volume.array)
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}|".encode())
    digest.update(np.round(volume.ijk_to_ras(), 6).tobytes())
    digest.update(array.tobytes())
    return digest.hexdigest()


def backbone_reference(model: CTFMModel) -> dict[str, Any]:
    """What a CT-FM task model records about its backbone (see the module docstring)."""
    return {"backbone": "ctfm", "name": model.path.name if model.path else "ctfm (unsaved)",
            "path": str(model.path) if model.path else None, "weights_sha256": model_fingerprint(model),
            "config": dict(model.config)}


def check_backbone(task_model: TaskModel, model: Any) -> None:
    """Refuse a backbone other than the CT-FM encoder the task model was trained on."""
    reference = task_model.backbone
    if reference.get("backbone") != "ctfm":
        raise CheckpointError(f"{task_model.folder}: not a CT-FM task model (backbone {reference.get('backbone')!r})")
    if not isinstance(model, CTFMModel):
        raise CheckpointError(f"{task_model.folder}: needs a CT-FM encoder, not a {type(model).__name__} "
                              "(an LCTfound backbone cannot run a CT-FM task model)")
    expected, actual = reference.get("weights_sha256"), model_fingerprint(model)
    if expected and actual != expected:
        raise CheckpointError(f"{task_model.folder}: trained on CT-FM weights {expected[:12]}… "
                              f"({reference.get('path') or reference.get('name')}), "
                              f"not on {model.path or 'this model'} "
                              f"({actual[:12]}…); use the CT-FM model it was trained on",
                              option_hints={"model": "pass it with --model"})
    if dict(reference.get("config", model.config)) != dict(model.config):
        raise CheckpointError(f"{task_model.folder}: trained on a CT-FM encoder with config {reference.get('config')}, "
                              f"not {model.config}")


def task_model_name(task_model: TaskModel) -> str:
    """Its registered or given name; else its folder's name (the run folder's for ``RUN/model``)."""
    folder = task_model.folder
    return task_model.info.get("name") or (folder.parent.name if folder.name == "model" else folder.name)


def resolve_task_folder(spec: str | Path) -> Path:
    """A task-model folder path, or the name of a registered task model (user model folder)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    for entry in list_task_models():
        if entry.name == str(spec) or entry.path.name == str(spec):
            return entry.path
    raise LCTfoundError(f"task model {spec!r} not found (not a folder and not a registered task model)")


def load_ctfm_task_model(spec: str | Path, task: str) -> TaskModel:
    """Load a CT-FM task model of ``task`` (checksums verified; another task or backbone is refused)."""
    folder = resolve_task_folder(spec)
    if not (folder / TASK_FILE).is_file():
        raise CheckpointError(f"{folder}: not a task model ({TASK_FILE} missing)")
    task_model = load_task_model(folder, task)
    if task_model.backbone.get("backbone") != "ctfm":
        raise CheckpointError(f"{folder}: not a CT-FM task model")
    return task_model


def backbone_for(task_model: TaskModel, model: Optional[CTFMModel | str | Path] = None,
                 device: str | torch.device = "cpu") -> CTFMModel:
    """The CT-FM encoder to run ``task_model`` with: ``model`` (loaded or a spec), else the folder
    its reference names; checked against the reference."""
    if model is None:
        path = task_model.backbone.get("path")
        if not path or not Path(path).exists():
            raise LCTfoundError(f"{task_model.folder}: its CT-FM backbone ({path or 'unsaved'}) is not here; "
                                "give the CT-FM model folder it was trained on",
                                option_hints={"model": "pass it with --model"})
        model = path
    if not isinstance(model, CTFMModel):
        model = load_model(model, device=device)
    check_backbone(task_model, model)
    return model


def inventory(folders: Any = ()) -> dict[str, Any]:
    """What CT-FM can use here, as JSON-ready data: the encoders found (``folders``, strictly checked
    without loading weights, and the published repos in the local Hugging Face cache), why each other
    folder of ``folders`` is not an encoder, the trained probes and decoders, and PyTorch's devices.
    ``lctfound ctfm list --json`` prints it; the panels run that command so that their process never
    imports PyTorch."""
    import dataclasses

    from ..devices import available_devices
    from .model import inspect_model, list_ctfm_models

    def as_dict(entry: Any) -> dict[str, str]:
        return {key: str(value) for key, value in dataclasses.asdict(entry).items()}

    encoders = list_ctfm_models(folders)
    listed = {Path(entry.path).expanduser().resolve() for entry in encoders}
    rejected = {}
    for folder in folders:
        if Path(folder).expanduser().resolve() not in listed:
            try:
                inspect_model(folder)
            except LCTfoundError as error:
                rejected[str(folder)] = str(error)
    task_models = [entry for task in TASKS for entry in list_task_models(task)]
    return {"encoders": [as_dict(entry) for entry in encoders], "rejected": rejected,
            "task_models": [as_dict(entry) for entry in task_models], "devices": available_devices()}

"""Diagnosis research tool: scan classification from deep LCTfound features, Grad-CAM saliency, result tables.

`ScanClassifier` wraps a trained classification task model (``lctfound classify train`` or
``lctfound train finetune --task classification``) with its verified backbone. Calling it on a HU
volume classifies the chosen slices (by default the central slices the model was trained on)
and returns a `ScanPrediction`: per-slice class probabilities, the scan's probabilities (their
mean), the predicted class and where the model came from. `saliency_volume` explains a
prediction with Grad-CAM as a volume on the input grid; `results_rows` makes the rows of the table
every front end shows (`lctfound.pipelines.results_table`), with `RESEARCH_USE_NOTE` on every row.

Each slice's diffusion noise is drawn from its slice index, so a result does not depend on the
batch size or on which other slices are analysed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..errors import CheckpointError, InputError, LCTfoundError
from ..models.bundle import WEIGHTS_NAME, LCTfoundModel, locate_unet_folder
from ..models.task_models import TaskModel, load_task_model
from ..preprocessing import prepare_slices, slice_batches
from ..progress import Progress, ensure_progress
from ..training.finetune import SliceClassifier, central_slices, classify_slices, slice_noise
from .results_table import result_columns
from ..compat import strict_zip

TASK = "classification"

#: Shown with every result (table rows, CLI output, Slicer panel).
RESEARCH_USE_NOTE = "Research tool, not a medical device: not for diagnosis or treatment decisions."

#: The layer Grad-CAM explains: the rectified output of the head's 256-channel convolution.
CAM_LAYER = "head.activation"

#: Which slices to analyse: None = the model's own choice (its central N), "all", a list such as
#: "3,5,10-12", or slice indices.
SliceChoice = Union[None, str, Sequence[int]]


@dataclass
class ScanPrediction:
    """The classification of one scan.

    ``slice_probabilities[i, c]`` is the probability of class ``class_names[c]`` on slice
    ``slices[i]``; the scan's probabilities are their mean over the analysed slices.
    """

    slices: list[int]
    slice_probabilities: np.ndarray
    class_names: list[str]
    provenance: dict[str, Any]
    input: str = ""
    note: str = RESEARCH_USE_NOTE

    @property
    def probabilities(self) -> np.ndarray:
        """Scan probabilities (K,): the mean slice probability of each class."""
        return self.slice_probabilities.mean(axis=0)

    @property
    def predicted_index(self) -> int:
        return int(np.argmax(self.probabilities))

    @property
    def predicted(self) -> str:
        """The class with the highest scan probability."""
        return self.class_names[self.predicted_index]

    def probability(self, class_name: str) -> float:
        return float(self.probabilities[class_index(self.class_names, class_name)])


def class_index(class_names: Sequence[str], target: Union[int, str]) -> int:
    """The index of a class given by name or index, or a clear error."""
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if 0 <= int(target) < len(class_names):
            return int(target)
    elif str(target) in class_names:
        return list(class_names).index(str(target))
    raise LCTfoundError(f"unknown class {target!r}; the model's classes are: {', '.join(class_names)}")


def _hu_array(hu_volume: Any) -> np.ndarray:
    """The (slices, rows, columns) HU array of an array or a `CTVolume`."""
    array = np.asarray(getattr(hu_volume, "array", hu_volume))
    if array.ndim != 3 or 0 in array.shape:
        raise InputError(f"expected a CT volume (slices, rows, columns), got an array of shape {array.shape}")
    return array


def _backbone_spec(reference: dict[str, Any]) -> str:
    """Where a task model's backbone is: its recorded folder if it still exists, else its registered name."""
    path = reference.get("path")
    if path and Path(path).exists():
        return path
    return reference.get("name") or path or "default"


class ScanClassifier:
    """A classification task model and its backbone, called on HU volumes like a diffusers pipeline::

        classifier = ScanClassifier.from_pretrained("my-pap-model")
        prediction = classifier(volume.array)            # central slices, as in training
        prediction.predicted, prediction.probabilities   # e.g. "PAP", array([0.12, 0.88])
    """

    def __init__(self, classifier: SliceClassifier, task_model: TaskModel, backbone: Optional[LCTfoundModel] = None,
                 batch_size: int = 4, seed: int = 0):
        if batch_size < 1:
            raise LCTfoundError("the batch size must be at least 1")
        self.classifier = classifier.eval()
        self.classifier.unet.requires_grad_(False)  # inference only: Grad-CAM needs no backbone gradients
        self.task_model = task_model
        self.class_names = [str(name) for name in task_model.info["classes"]]
        self.slices_per_scan = int(task_model.info.get("slice_selection", {}).get("slices_per_scan", 0))
        self.batch_size, self.seed = batch_size, seed
        self.provenance = self._provenance(backbone)
        self._cam_hooks = None

    @classmethod
    def from_pretrained(cls, model: Union[str, Path, TaskModel], backbone: Union[None, str, Path, LCTfoundModel] = None,
                        device: Union[str, torch.device] = "cpu", batch_size: int = 4) -> "ScanClassifier":
        """Load a classification task model (folder or registered name) and its backbone.

        ``backbone`` (name, folder or loaded model) defaults to the one the task model names; it
        is verified against the task model's record (a different backbone is refused). A model
        fine-tuned in full mode carries its own backbone and ignores ``backbone``.
        """
        from ..devices import resolve_device
        from ..models import load_model, resolve_model

        device = resolve_device(device) if isinstance(device, str) else device
        if isinstance(model, TaskModel):
            task_model = model
            if task_model.task != TASK:
                raise CheckpointError(f"{task_model.folder}: a {task_model.task} model, not a {TASK} model")
        else:
            task_model = load_task_model(resolve_model(model), TASK)
        base = None
        if task_model.backbone_folder() is None:
            if isinstance(backbone, LCTfoundModel):
                base = backbone
            else:
                base = load_model(resolve_model(backbone or _backbone_spec(task_model.backbone)), device=device)
        classifier = SliceClassifier.from_task_model(task_model, base)  # verifies the backbone
        return cls(classifier.to(device), task_model, base, batch_size=batch_size)

    # ------------------------------------------------------------------ description
    def _provenance(self, backbone: Optional[LCTfoundModel]) -> dict[str, Any]:
        info, folder = self.task_model.info, self.task_model.folder
        files = info.get("files", {})
        reference = self.task_model.backbone
        stored = self.task_model.backbone_folder()
        if stored is not None:
            origin = reference.get("name") or reference.get("path") or reference.get("preset")
            backbone_name = f"fine-tuned from {origin}"
            backbone_path = str(stored)
            backbone_sha = files.get(f"backbone/unet/{WEIGHTS_NAME}", "")
        else:
            backbone_path = str(backbone.path) if backbone is not None and backbone.path else ""
            backbone_name = ((backbone.metadata.get("name") if backbone is not None else None) or reference.get("name")
                             or backbone_path or reference.get("preset", ""))
            # resolve_backbone has verified a backbone folder against the recorded checksum, so it is hashed
            # only when none is recorded; a backbone that lives only in memory has no checksum to show.
            backbone_sha = ""
            if backbone is not None and backbone.path is not None:
                backbone_sha = reference.get("unet_sha256") or ""
                if not backbone_sha:
                    from ..hashing import sha256_file

                    backbone_sha = sha256_file(locate_unet_folder(backbone.path) / WEIGHTS_NAME)
        settings = info["classifier"]
        # An unnamed model is known by its folder; a training run's model folder is RUN/model, so the run names it.
        name = info.get("name") or (folder.parent.name if folder.name == "model" else folder.name)
        return {
            "model": name, "model_path": str(folder),
            "model_sha256": files.get("head.safetensors", ""),
            "backbone": backbone_name, "backbone_path": backbone_path, "backbone_sha256": backbone_sha,
            "mode": settings["mode"], "timesteps": list(settings["timesteps"]), "block": settings["block"],
            "window": settings["window"], "slices_per_scan": self.slices_per_scan, "classes": list(self.class_names),
            "trained": info.get("saved", ""), "training_steps": info.get("training", {}).get("step"),
            "trained_with": info.get("lctfound_version", ""), "lctfound_version": __version__,
            "noise_seed": self.seed,
        }

    @property
    def device(self) -> torch.device:
        return next(self.classifier.head.parameters()).device

    def select_slices(self, num_slices: int, slices: SliceChoice = None) -> list[int]:
        """The slice indices analysed in a volume of ``num_slices`` slices (see `SliceChoice`)."""
        from ..features import parse_slices

        if slices is None:
            return central_slices(num_slices, self.slices_per_scan)
        if isinstance(slices, str):
            if slices.strip().lower() == "all":
                return list(range(num_slices))
            chosen = parse_slices(slices, num_slices) or []
        else:
            chosen = [int(s) for s in slices]
        bad = [s for s in chosen if not 0 <= s < num_slices]
        if bad:
            raise LCTfoundError(f"slice {bad[0]} is outside the volume (0..{num_slices - 1})")
        if not chosen:
            raise LCTfoundError("no slice chosen to classify")
        return chosen

    # ------------------------------------------------------------------ prediction
    def __call__(self, hu_volume: Any, slices: SliceChoice = None, progress: Optional[Progress] = None,
                 source: Optional[str] = None) -> ScanPrediction:
        """Classify a (slices, rows, columns) HU array or `CTVolume`.

        ``source`` names the input in result tables (default: the file a `CTVolume` was read from).
        """
        array = _hu_array(hu_volume)
        indices = self.select_slices(array.shape[0], slices)
        probabilities = classify_slices(self.classifier, array, indices, self.batch_size, self.seed, progress)
        if source is None:
            source = str(getattr(hu_volume, "metadata", {}).get("source", ""))
        return ScanPrediction(indices, probabilities, list(self.class_names), dict(self.provenance), source)

    # ------------------------------------------------------------------ Grad-CAM
    def cam_hooks(self):
        """MONAI's activation/gradient hooks on `CAM_LAYER`, registered once on this classifier."""
        from monai.visualize.class_activation_maps import ModelWithHooks

        if self._cam_hooks is None:
            self._cam_hooks = ModelWithHooks(self.classifier, CAM_LAYER, register_forward=True, register_backward=True)
        return self._cam_hooks


def _unit_peak(maps: torch.Tensor) -> torch.Tensor:
    """Scale each (1, H, W) map so its peak is 1 (a map that is all zero stays zero)."""
    peak = maps.amax(dim=tuple(range(1, maps.dim())), keepdim=True)
    return torch.where(peak > 0, maps / peak.clamp_min(1e-12), torch.zeros_like(maps))


def saliency_volume(classifier: ScanClassifier, hu_volume: Any, target_class: Union[None, int, str] = None,
                    slices: SliceChoice = None, progress: Optional[Progress] = None,
                    prediction: Optional[ScanPrediction] = None) -> np.ndarray:
    """Grad-CAM of the scan's target class as a float32 volume on the input grid.

    For every analysed slice: the gradients of the target class logit with respect to the
    rectified output of the head's convolution, averaged over space, weight its channels; the
    ReLU of the weighted sum is resized bilinearly to the slice's native rows × columns and
    scaled to a peak of 1. Slices not analysed are 0. ``target_class`` (name or index) defaults
    to the predicted class; pass the ``prediction`` already made to reuse its slices and class.
    MONAI's `GradCAM` does the work (the classifier's extra noise input goes through its kwargs).
    """
    from monai.visualize import GradCAM

    progress = ensure_progress(progress)
    array = _hu_array(hu_volume)
    if prediction is not None and slices is None:
        indices = list(prediction.slices)
        classifier.select_slices(array.shape[0], indices)
    else:
        indices = classifier.select_slices(array.shape[0], slices)
    if target_class is None:
        if prediction is None:
            prediction = classifier(array, indices, progress)
        target = prediction.predicted_index
    else:
        target = class_index(classifier.class_names, target_class)
    rows, columns = array.shape[1:]

    def native_grid(_model_grid):
        return lambda maps: F.interpolate(maps, size=(rows, columns), mode="bilinear", align_corners=False)

    cam = GradCAM(nn_module=classifier.cam_hooks(), target_layers=CAM_LAYER, upsampler=native_grid,
                  postprocessing=_unit_peak)
    inner = classifier.classifier
    size = inner.unet.config.sample_size
    out = np.zeros(array.shape, dtype=np.float32)
    done = 0
    for batch in slice_batches(indices, classifier.batch_size):
        progress.check_cancelled()
        x = prepare_slices(np.asarray(array[batch]), inner.window, size).to(classifier.device)
        noise = slice_noise(batch, x.shape[1:], classifier.seed).to(classifier.device)
        with torch.enable_grad():
            maps = cam(x, class_idx=target, noise=noise)
        out[batch] = maps[:, 0].detach().float().cpu().numpy()
        done += len(batch)
        progress.update(done, len(indices), f"saliency of slice {batch[-1]}")
    return out


# ---------------------------------------------------------------------- result tables

def format_slices(indices: Iterable[int]) -> str:
    """Slice indices as runs, e.g. [3, 4, 5, 9] → "3-5,9" (the syntax ``--slices`` reads)."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def results_rows(predictions: Iterable[ScanPrediction]) -> list[dict[str, Any]]:
    """One table row per prediction (probabilities as floats; ``status`` "ok"; the research-use note)."""
    from ..io.volume import volume_stem

    rows = []
    for prediction in predictions:
        provenance = prediction.provenance
        row: dict[str, Any] = {"case": volume_stem(prediction.input) if prediction.input else "",
                               "input": prediction.input, "predicted": prediction.predicted}
        row.update({f"probability_{name}": float(p)
                    for name, p in strict_zip(prediction.class_names, prediction.probabilities)})
        row.update({"slices": format_slices(prediction.slices), "model": provenance.get("model", ""),
                    "model_sha256": provenance.get("model_sha256", ""), "backbone": provenance.get("backbone", ""),
                    "backbone_sha256": provenance.get("backbone_sha256", ""), "status": "ok",
                    "note": prediction.note})
        rows.append(row)
    return rows


def error_row(source: str, message: str, class_names: Sequence[str], provenance: dict[str, Any]) -> dict[str, Any]:
    """The row of an input that could not be classified (``status`` "error: …")."""
    from ..io.volume import volume_stem

    row = {column: "" for column in result_columns(class_names)}
    row.update({"case": volume_stem(source), "input": source, "model": provenance.get("model", ""),
                "model_sha256": provenance.get("model_sha256", ""), "backbone": provenance.get("backbone", ""),
                "backbone_sha256": provenance.get("backbone_sha256", ""), "status": f"error: {message}",
                "note": RESEARCH_USE_NOTE})
    return row

"""One way to predict with every kind of segmentation task model.

`load_segmentation_predictor(model)` reads a task-model folder (or registered name) and returns a
`SegmentationPredictor` for its task:

* ``fewshot-segmentation`` — a `FewShotSegmenter` (per-pixel MLP on cached backbone features);
* ``segmentation``         — a dense structures model (`DenseBackbone`: frozen head, adapters or a
  fully fine-tuned backbone);
* ``segmentation-student`` — a distilled `StudentSegmenter` (no backbone).

Every predictor has ``task``, ``label_names``, ``class_values``, ``window``, ``provenance``,
``needs_backbone``, ``predict(hu_volume, progress=None, postprocess=())`` (label values on the
native grid, uint8 or uint16) and ``predict_probabilities(hu_volume, progress=None)`` (yields
``(slice, probabilities (K, H, W))``; any predictor can teach a student). The CLI and the
Slicer logic predict only through here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CheckpointError, LCTfoundError
from ..progress import Progress, ensure_progress
from .segmentation import TASK as FEWSHOT_TASK
from .student import STUDENT_TASK
from ..compat import strict_zip

DENSE_TASK = "segmentation"  # the task name `DenseSegmentationTask` saves structures models under
SEGMENTATION_TASKS = (FEWSHOT_TASK, DENSE_TASK, STUDENT_TASK)


def label_dtype(class_values: Sequence[int]) -> np.dtype:
    return np.dtype(np.uint8 if max(class_values) < 256 else np.uint16)


class SegmentationPredictor:
    """A loaded segmentation task model, ready to label whole volumes."""

    task: str
    label_names: dict[int, str]
    class_values: list[int]
    window: str
    #: ``{"model": {name, path, task, sha256}, "backbone": {name, path, sha256} or None}``; ``sha256``
    #: of a task model is the fingerprint of its checksummed files (unchanged by registering it).
    provenance: dict[str, Any]
    needs_backbone: bool
    #: The slice size the network reads (a student distilled from this predictor works at it).
    input_size: int
    #: Where the model runs (a student distilled from this predictor trains there too).
    device: torch.device = torch.device("cpu")

    def predict_probabilities(self, hu_volume: np.ndarray, progress: Optional[Progress] = None
                              ) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def predict(self, hu_volume: np.ndarray, progress: Optional[Progress] = None,
                postprocess: Sequence[str] = (), slices: Optional[Sequence[int]] = None,
                annotation: Optional[np.ndarray] = None) -> np.ndarray:
        """Label values (N, H, W) on the native grid; slices outside ``slices`` (default: none) are
        background (``postprocess``, ``annotation``: see `postprocess_labels`)."""
        raise NotImplementedError

    def annotation_for(self, hu_volume: np.ndarray) -> Optional[np.ndarray]:
        """The annotation the model was trained from, when ``hu_volume`` is that volume (few-shot models)."""
        return None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.task} {self.provenance['model'].get('name')!r}>"


def _check_volume(hu_volume: np.ndarray) -> np.ndarray:
    hu_volume = np.asarray(hu_volume)
    if hu_volume.ndim != 3 or 0 in hu_volume.shape:
        raise LCTfoundError(f"expected a non-empty 3D volume, got shape {hu_volume.shape}")
    return hu_volume


def _postprocessed(labels: np.ndarray, postprocess: Sequence[str], slices: Optional[Sequence[int]] = None,
                   annotation: Optional[np.ndarray] = None) -> np.ndarray:
    from .segmentation import postprocess_labels

    if slices is not None:
        outside = np.ones(labels.shape[0], dtype=bool)
        outside[list(slices)] = False
        labels[outside] = 0
    return postprocess_labels(labels, postprocess, annotation) if postprocess else labels


class FewShotPredictor(SegmentationPredictor):
    task = FEWSHOT_TASK
    needs_backbone = True

    def __init__(self, segmenter: Any, provenance: dict[str, Any], cache_root: Optional[Path] = None):
        self.segmenter, self.provenance, self.cache_root = segmenter, provenance, cache_root
        self.label_names, self.class_values = dict(segmenter.label_names), list(segmenter.class_values)
        self.window = segmenter.config.window
        self.input_size = segmenter.model.sample_size

    def predict_probabilities(self, hu_volume, progress=None):
        return self.segmenter.predict_probabilities(_check_volume(hu_volume), progress=progress,
                                                    cache_root=self.cache_root)

    def predict(self, hu_volume, progress=None, postprocess=(), slices=None, annotation=None):
        return self.segmenter(_check_volume(hu_volume), progress=progress, cache_root=self.cache_root,
                              postprocess=postprocess, slices=slices, annotation=annotation)

    def annotation_for(self, hu_volume):
        return self.segmenter.annotation_for(_check_volume(hu_volume))


class DensePredictor(SegmentationPredictor):
    """A dense structures model, run on slice batches (memory: the volume, the labels, one batch)."""

    task = DENSE_TASK

    def __init__(self, dense: Any, label_names: dict[int, str], provenance: dict[str, Any], needs_backbone: bool,
                 batch_size: int = 4):
        self.dense, self.provenance, self.needs_backbone = dense, provenance, needs_backbone
        self.batch_size = batch_size
        self.class_values = list(dense.class_values)
        self.label_names = {v: label_names.get(v, f"Label {v}") for v in self.class_values if v != 0}
        self.window = dense.window
        self.input_size = dense.unet.config.sample_size

    @torch.no_grad()
    def _logits(self, hu_volume: np.ndarray, progress: Optional[Progress]) -> Iterator[tuple[list[int], torch.Tensor]]:
        from ..preprocessing import prepare_slices, slice_batches

        progress = ensure_progress(progress)
        hu_volume = _check_volume(hu_volume)
        size = self.dense.unet.config.sample_size
        device = next(self.dense.parameters()).device
        count, done = hu_volume.shape[0], 0
        for batch in slice_batches(range(count), self.batch_size):
            progress.check_cancelled()
            x = prepare_slices(np.asarray(hu_volume[batch[0]:batch[-1] + 1]), self.dense.window, size).to(device)
            noise = None
            if self.dense.timestep > 0:
                # The same noise as `predict_dense` (seeded by the batch's first slice, batches of 4).
                noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(batch[0])).to(device)
            logits = self.dense(x, noise).float().cpu()
            yield batch, F.interpolate(logits, size=hu_volume.shape[1:], mode="bilinear", align_corners=False)
            done += len(batch)
            progress.update(done, count, f"slice {batch[-1]}")

    def predict_probabilities(self, hu_volume, progress=None):
        for batch, logits in self._logits(hu_volume, progress):
            for index, probabilities in strict_zip(batch, torch.softmax(logits, dim=1).numpy()):
                yield index, probabilities

    def predict(self, hu_volume, progress=None, postprocess=(), slices=None, annotation=None):
        values = np.asarray(self.class_values, dtype=label_dtype(self.class_values))
        out = np.zeros(np.shape(hu_volume), dtype=values.dtype)
        for batch, logits in self._logits(hu_volume, progress):
            out[batch[0]:batch[-1] + 1] = values[logits.argmax(1).numpy()]
        return _postprocessed(out, postprocess, slices, annotation)


class StudentPredictor(SegmentationPredictor):
    task = STUDENT_TASK
    needs_backbone = False

    def __init__(self, student: Any, provenance: dict[str, Any]):
        self.student, self.provenance = student, provenance
        self.label_names, self.class_values = dict(student.label_names), list(student.class_values)
        self.window = student.window
        self.input_size = student.config.resolution

    def predict_probabilities(self, hu_volume, progress=None):
        return self.student.predict_probabilities(_check_volume(hu_volume), progress=progress)

    def predict(self, hu_volume, progress=None, postprocess=(), slices=None, annotation=None):
        labels = self.student.predict(_check_volume(hu_volume), progress=progress)
        return _postprocessed(labels, postprocess, slices, annotation)


# ---------------------------------------------------------------------------------------------- loading


def _model_provenance(folder: Path, info: dict[str, Any]) -> dict[str, Any]:
    from ..hashing import fingerprint

    return {"name": info.get("name") or folder.name, "path": str(folder), "task": info.get("task"),
            "sha256": fingerprint(list(info.get("files", {}).items()))}


def _weights_sha256(folder: Path) -> str:
    from ..hashing import sha256_file
    from ..models.bundle import WEIGHTS_NAME, locate_unet_folder

    return sha256_file(locate_unet_folder(folder) / WEIGHTS_NAME)


def _backbone_provenance(model: Any) -> dict[str, Any]:
    return {"name": model.metadata.get("name"), "path": str(model.path) if model.path else None,
            "sha256": _weights_sha256(model.path) if model.path is not None else None}


def _base_backbone(reference: dict[str, Any], backbone: Optional[str | Path], device: torch.device):
    """The backbone a task model names (its path if it still exists, else its registered name,
    else the embedded default), or the one the caller gives."""
    from ..models import load_model, resolve_model

    if backbone is None:
        path = reference.get("path")
        backbone = path if path and Path(path).exists() else (reference.get("name") or "default")
    return load_model(resolve_model(backbone), device=device)


def load_segmentation_predictor(model: str | Path, backbone: str | Path | None = None,
                                device: str = "auto") -> SegmentationPredictor:
    """The predictor of a segmentation task model (folder or registered name).

    ``backbone`` overrides the backbone the model names (few-shot and frozen/adapter structures
    models; ignored by students and fully fine-tuned models, which carry their own).
    """
    from ..devices import resolve_device
    from ..models import resolve_model
    from ..models.task_models import TASK_FILE, load_task_model, read_task_info

    folder = resolve_model(model)
    if not (folder / TASK_FILE).is_file():
        if (folder / "unet").is_dir() or (folder / "config.json").is_file():
            raise LCTfoundError(f"{folder} is a backbone model, not a segmentation model")
        raise CheckpointError(f"{folder}: not a task model ({TASK_FILE} missing)")
    info = read_task_info(folder)
    task = info.get("task")
    if task not in SEGMENTATION_TASKS:
        raise LCTfoundError(f"{folder} is a {task} model, not a segmentation model")
    torch_device = resolve_device(device)
    provenance: dict[str, Any] = {"model": _model_provenance(folder, info), "backbone": None}

    if task == STUDENT_TASK:
        from .student import StudentSegmenter

        student = StudentSegmenter.load(folder, torch_device)
        provenance["teacher"] = student.teacher
        predictor: SegmentationPredictor = StudentPredictor(student, provenance)
    elif task == FEWSHOT_TASK:
        from .segmentation import FewShotSegmenter

        base = _base_backbone(info.get("backbone", {}), backbone, torch_device)
        segmenter = FewShotSegmenter.load(folder, base)
        provenance["backbone"] = _backbone_provenance(base)
        predictor = FewShotPredictor(segmenter, provenance)
    else:
        from ..training.finetune import DenseBackbone

        task_model = load_task_model(folder, DENSE_TASK)
        needs_backbone = task_model.backbone_folder() is None
        base = _base_backbone(task_model.backbone, backbone, torch_device) if needs_backbone else None
        dense = DenseBackbone.from_task_model(task_model, base).to(torch_device).eval()
        if base is not None:
            provenance["backbone"] = _backbone_provenance(base)
        else:
            stored = task_model.backbone_folder()
            provenance["backbone"] = {"name": task_model.backbone.get("name"), "path": str(stored),
                                      "sha256": _weights_sha256(stored), "fine_tuned": True}
        names = {int(k): v for k, v in info.get("labels", {}).items()}
        predictor = DensePredictor(dense, names, provenance, needs_backbone)
    predictor.device = torch_device
    return predictor

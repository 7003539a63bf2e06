"""Qt-free logic of the LCTfoundSegmentation module: few-shot segmentation with an in-place
correction loop, whole-lung structure models and diagnosis (scan classification with saliency).

The annotator's loop:

1. paint a structure on a few slices of a segmentation node (any number of segments);
2. **Train** — the labelled slices (or, once slices are marked reviewed, exactly the reviewed
   slices) are exported with the volume and `lctfound segment train` runs as a background job;
   the new few-shot model is registered under the chosen name;
3. **Predict** — `lctfound segment predict` runs as a job; the result lands in a NEW segmentation
   node (or, on request, in the annotation node itself after an undo state is saved), and the
   slices the annotator labelled keep the annotator's labels and stay marked reviewed;
4. the annotator corrects slices in the Segment Editor and marks them reviewed
   (`mark_slice_reviewed`), then trains again: the features are cached, so this round costs
   the small head only.

Which slices count is stored on the segmentation node as the attribute
`REVIEWED_SLICES_ATTRIBUTE` (slice indices along the volume's K axis, e.g. ``"3,10-12"``), so it is
saved with the scene. Without that attribute, every slice holding a painted voxel counts.

Structures (many-structure models from the Train module) and students (distilled few-shot
models) predict the same way; diagnosis runs `lctfound classify predict` and shows a results
table (with provenance and the research-use note) and a saliency overlay volume.

"Run on" a server (`lctfound serve`): the same commands with ``--server``. Few-shot training keeps the
model on the server; few-shot models and students (yours there, or offered by the server), structures
models and classifiers the server offers predict there, and the result comes back into new nodes named
as a local run names them. A server computes no saliency overlay: the panel says so.

MRML is imported lazily (`lctfound.mrml`): this module loads when Slicer starts.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..atomic import write_text_file
from ..errors import LCTfoundError
from .base import ButtonState, Choice, ModuleLogicBase, ModuleParameters, _snake_case
from .server import ServerConnection, check_server_model_name, connect, server_arguments

if TYPE_CHECKING:
    import numpy as np

    from ..jobs import Job

logger = logging.getLogger(__name__)

FEWSHOT = "fewshot"
STRUCTURES = "structures"
DIAGNOSIS = "diagnosis"

TASKS = (
    Choice(FEWSHOT, "Few-shot segmentation",
           "Paint a structure on a few slices, train in seconds to minutes, predict the whole volume, "
           "correct and retrain."),
    Choice(STRUCTURES, "Lung structures",
           "Predict a many-structure model (airways, vessels, lobes, …) trained in the LCTfound Train module, "
           "with 3D surfaces."),
    Choice(DIAGNOSIS, "Diagnosis (research)",
           "Scan classification with a trained classifier: probabilities, provenance and a saliency overlay. "
           "A research tool, not a diagnosis."),
)

#: Task-model kinds (task.json "task") each panel predicts with.
TASK_MODEL_KINDS = {
    FEWSHOT: ("fewshot-segmentation", "segmentation-student"),
    STRUCTURES: ("segmentation",),
    DIAGNOSIS: ("classification",),
}

OUTPUT_MODES = (
    Choice("new", "New segmentation", "The result goes into a new segmentation node; nothing is overwritten."),
    Choice("update", "Update the annotation",
           "The result replaces the unreviewed slices of the annotation segmentation (an undo state is saved "
           "first); reviewed slices keep your labels."),
)

WINDOWS = (
    Choice("mediastinal", "Mediastinal window", "Soft tissue: tumours, lymph nodes, vessels"),
    Choice("lung", "Lung window", "Lung parenchyma, airways, nodules"),
)

#: Segmentation node attribute listing the slices (K indices) the annotator has reviewed.
REVIEWED_SLICES_ATTRIBUTE = "LCTfound.ReviewedSlices"
#: Node attribute naming the model that produced a result node.
MODEL_ATTRIBUTE = "LCTfound.Model"

JOB_FILE = "job.json"
SALIENCY_FILE = "saliency.nii.gz"
#: What the panel says about diagnosis on a server (`classify predict --server` has no --saliency).
SERVER_SALIENCY_NOTE = "The server sends back no saliency overlay; classify on this computer for one."


@dataclass
class SegmentationParameters(ModuleParameters):
    """``model_name`` is the backbone used for few-shot training; ``task_model`` the trained
    model used for prediction or classification."""

    task: str = FEWSHOT
    annotation_segmentation: Any = None
    task_model: str = ""
    new_model_name: str = ""
    #: Head training epochs; left at this default, the recipe's own count is used (20 official, 30 fast).
    epochs: int = 30
    window: str = "mediastinal"
    output_mode: str = "new"
    #: Few-shot prediction: keep the 3D parts that touch the annotation (`connected` post-processing).
    keep_connected: bool = True
    #: Few-shot prediction: slices predicted beyond the annotated extent, in mm; ``whole_volume`` predicts all.
    extent_margin_mm: float = 15.0
    whole_volume: bool = False
    keep_largest: bool = False
    fill_holes: bool = False
    smooth: bool = False
    surfaces: bool = True
    saliency: bool = True


# ---------------------------------------------------------------------------------------------
# Reviewed slices
# ---------------------------------------------------------------------------------------------


def format_slices(slices: Sequence[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1-3,7"`` (the form `lctfound.features.parse_slices` reads)."""
    values = sorted({int(s) for s in slices})
    parts: list[str] = []
    start = previous = None
    for value in values + [None]:
        if start is not None and (value is None or value != previous + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if value is not None and start is None:
            start = value
        previous = value
    return ",".join(parts)


def reviewed_slices(segmentation: Any) -> Optional[list[int]]:
    """The slices marked reviewed on ``segmentation``; None when none were ever marked."""
    text = segmentation.GetAttribute(REVIEWED_SLICES_ATTRIBUTE)
    if text is None:
        return None
    from ..validation import parse_slice_list  # not lctfound.features: a Slicer on a server has no torch

    return parse_slice_list(text, 1 << 30) or [] if text.strip() else []


def set_reviewed_slices(segmentation: Any, slices: Sequence[int]) -> None:
    segmentation.SetAttribute(REVIEWED_SLICES_ATTRIBUTE, format_slices(slices))


def mark_slice_reviewed(segmentation: Any, index: int, reviewed: bool = True) -> list[int]:
    """Mark (or unmark) slice ``index`` reviewed; returns the reviewed slices. The first mark on a
    node that has none also keeps the slices already painted (they were the annotator's work)."""
    current = reviewed_slices(segmentation)
    if current is None:
        current = painted_slices(segmentation)
    chosen = set(current)
    if reviewed:
        chosen.add(int(index))
    else:
        chosen.discard(int(index))
    set_reviewed_slices(segmentation, sorted(chosen))
    return sorted(chosen)


def painted_slices(segmentation: Any, volume: Any = None) -> list[int]:
    """Slices (K indices of the reference volume) on which any segment holds a voxel."""
    import numpy as np

    from ..mrml import labels_from_segmentation

    if segmentation.GetSegmentation().GetNumberOfSegments() == 0:
        return []
    labels, _ = labels_from_segmentation(segmentation, volume)
    return [int(k) for k in np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))]


def slice_index_at(volume: Any, ras: Sequence[float]) -> int:
    """The K index (axial slice of the volume's array) through the RAS point ``ras``, e.g. the
    offset of the red slice view. Rounded to the nearest voxel centre."""
    import numpy as np

    from ..mrml.volumes import ijk_to_ras_of

    ijk = np.linalg.inv(ijk_to_ras_of(volume)) @ np.array([*map(float, ras), 1.0])
    k = int(round(float(ijk[2])))
    slices = volume.GetImageData().GetDimensions()[2]
    if not 0 <= k < slices:
        raise LCTfoundError(f"that position is outside volume '{volume.GetName()}' (slice {k} of 0..{slices - 1})")
    return k


def training_labels(segmentation: Any, volume: Any) -> tuple["np.ndarray", list[int], dict[int, str]]:
    """The label array (on ``volume``'s grid), the training slices and ``{label: name}``.

    Training slices are the reviewed slices when any were marked, else the painted ones.
    """
    from ..mrml import labels_from_segmentation
    from .train import segmentation_grid_problem

    problem = segmentation_grid_problem(volume, segmentation)
    if problem:
        raise LCTfoundError(problem)
    labels, names = labels_from_segmentation(segmentation, volume)
    reviewed = reviewed_slices(segmentation)
    if reviewed is None:
        slices = [int(k) for k in range(labels.shape[0]) if labels[k].any()]
        if not slices:
            raise LCTfoundError(f"no labelled slice in '{segmentation.GetName()}': paint the structure on at least "
                                "one slice first")
    else:
        slices = [k for k in reviewed if 0 <= k < labels.shape[0]]
        if not slices:
            raise LCTfoundError(f"no slice of '{segmentation.GetName()}' is marked reviewed: mark the slices you "
                                "checked, or remove the marks to train on the painted slices")
    if not any(labels[k].any() for k in slices):
        raise LCTfoundError("the training slices hold only background: paint the structure on one of them")
    bad = [name for name in names.values() if "," in name or "=" in name]
    if bad:  # `--names 1=A,2=B` cannot carry it
        raise LCTfoundError(f"segment name '{bad[0]}' contains ',' or '='; rename the segment")
    return labels, slices, names


# ---------------------------------------------------------------------------------------------
# The logic
# ---------------------------------------------------------------------------------------------


class SegmentationModuleLogic(ModuleLogicBase):
    """Few-shot train / predict, structure prediction and diagnosis as background jobs."""

    task_name = "segmentation"
    parameters_class = SegmentationParameters

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_folder: Optional[Path] = None
        self._job_info: dict[str, Any] = {}
        #: Nodes and names of the last finished run (read by the widget and tests).
        self.result_segmentation: Any = None
        self.saliency_volume: Any = None
        self.results_table: Any = None
        self.diagnosis_rows: list[dict[str, str]] = []
        self.registered_model: Optional[Path] = None
        self._undo_stacks: dict[str, Any] = {}
        self._result_target: Optional[SegmentationParameters] = None

    # -- task models ----------------------------------------------------------------------

    def find_task_model(self, name: str, task: Optional[str] = None) -> Optional[Any]:
        kinds = TASK_MODEL_KINDS.get(task or "", None)
        for entry in self.task_models():
            if entry.name == name and (kinds is None or entry.task in kinds):
                return entry
        return None

    def task_model_choices(self, task: str, refresh: bool = False) -> list[Choice]:
        kinds = TASK_MODEL_KINDS.get(task, ())
        return [Choice(entry.name, f"{entry.name} ({entry.task}, on {entry.backbone})",
                       "\n".join(part for part in (entry.description, str(entry.path)) if part))
                for entry in self.task_models(refresh) if entry.task in kinds]

    def choices(self, parameter_name: str, refresh: bool = False, parameters: Any = None) -> list[Choice]:
        name = _snake_case(parameter_name)
        server = self.connected_server(parameters) if parameters is not None else None
        if server is not None and name == "model_name":
            return [Choice(model, f"{model} (on the server)", server.url) for model in server.backbones()]
        if server is not None and name == "task_model":
            return [Choice(model, f"{model} ({'yours, ' if model in server.your_models else ''}on the server)",
                           ", ".join(server.labels.get(model, {}).values()) or server.url)
                    for model in self.server_task_models(server, self.parameters_from(parameters).task)]
        if name == "task_model":
            task = self.parameters_from(parameters).task if parameters is not None else FEWSHOT
            return self.task_model_choices(task, refresh)
        fixed = {"task": TASKS, "output_mode": OUTPUT_MODES, "window": WINDOWS}
        if name in fixed:
            return list(fixed[name])
        return super().choices(parameter_name, refresh)

    def visible_fields(self, parameters: Any) -> set[str]:
        p = self.parameters_from(parameters)
        shown = {"task", "input_volume", "task_model", "device"}
        if p.task == FEWSHOT:
            shown |= {"annotation_segmentation", "model_name", "new_model_name", "epochs", "window", "output_mode",
                      "keep_connected", "extent_margin_mm", "whole_volume", "keep_largest", "fill_holes", "smooth", "surfaces"}
        elif p.task == STRUCTURES:
            shown |= {"keep_largest", "fill_holes", "smooth", "surfaces"}
        elif not self.on_server(p):  # a server computes no saliency (`SERVER_SALIENCY_NOTE`)
            shown |= {"saliency"}
        if self.on_server(p):
            shown.discard("device")  # the server picks its device
        return shown

    def default_values(self, parameters: Any) -> dict[str, Any]:
        p = self.parameters_from(parameters)
        server = self.connected_server(p)
        if server is not None:  # the server's backbones and task models, not this computer's
            defaults: dict[str, Any] = {}
            backbones, models = server.backbones(), self.server_task_models(server, p.task)
            if p.model_name not in backbones and backbones:
                defaults["model_name"] = backbones[0]
            if p.task_model not in models and models:
                defaults["task_model"] = models[-1]
            return defaults
        defaults = super().default_values(parameters)
        if not p.task_model:
            choices = self.task_model_choices(p.task)
            if choices:
                defaults["task_model"] = choices[-1].value
        return defaults

    # -- checks ---------------------------------------------------------------------------

    def check_new_model_name(self, name: str) -> str:
        from ..models.registry import check_new_model_name

        if not name.strip():
            return "Enter a name for the new model."
        try:
            check_new_model_name(name.strip())
        except LCTfoundError as error:
            return str(error)
        return ""

    def check_task_model(self, p: SegmentationParameters) -> str:
        if not p.task_model:
            what = {FEWSHOT: "a few-shot model (train one first)", STRUCTURES: "a structures model",
                    DIAGNOSIS: "a classification model"}[p.task]
            return f"Select {what}."
        if self.find_task_model(p.task_model, p.task) is None:
            entry = self.find_task_model(p.task_model)
            if entry is not None:
                needed = " or ".join(TASK_MODEL_KINDS[p.task])
                return f"Model '{p.task_model}' is a {entry.task} model; this panel needs {needed}."
            return f"Model '{p.task_model}' is not installed here."
        return ""

    # -- run on a server ------------------------------------------------------------------

    #: Few-shot training, segmentation (few-shot, student and structures models) and diagnosis run on a
    #: server (as ``segment train/predict --server`` and ``classify predict --server`` jobs).
    server_jobs = frozenset({"segment-train", "segment-predict", "classify-predict"})

    def server_tasks(self, parameters: Any, action: str = "") -> tuple[str, ...]:
        """Few-shot "train" → segment-train; "predict" → segment-predict (classify-predict for diagnosis);
        the panel (no action) needs what its buttons send. Only few-shot models train here."""
        task = self.parameters_from(parameters).task
        predict = ("classify-predict",) if task == DIAGNOSIS else ("segment-predict",)
        if task != FEWSHOT:
            return () if action == "train" else predict
        return {"train": ("segment-train",), "predict": predict}.get(action, ("segment-train", *predict))

    def no_server_task(self, parameters: Any, action: str = "") -> str:
        return ("Only few-shot models train in this panel; train structures and diagnosis models in the LCTfound "
                "Train module.")

    @staticmethod
    def server_task_models(server: ServerConnection, task: str) -> list[str]:
        """The server's models (offered by it, or yours there) that ``task``'s panel predicts with."""
        return server.task_models(*TASK_MODEL_KINDS.get(task, ()))

    def _server_train_problems(self, p: SegmentationParameters) -> list[str]:
        server = self.connected_server(p)
        problems = [self.server_problem(p, "train")]
        if server is not None:
            if p.model_name not in server.backbones():
                problems.append("Select a backbone the server offers (Test connection lists them).")
            problems.append(check_server_model_name(p.new_model_name, server))
        return problems

    def _server_predict_problems(self, p: SegmentationParameters) -> list[str]:
        server = self.connected_server(p)
        problems = [self.server_problem(p, "predict")]
        if server is not None and p.task_model not in self.server_task_models(server, p.task):
            what = {FEWSHOT: "few-shot model or student", STRUCTURES: "structures model",
                    DIAGNOSIS: "classification model"}[p.task]
            if not p.task_model:
                problems.append(f"Select a {what} on the server" + (" (train one first)." if p.task == FEWSHOT
                                                                      else " (Test connection lists them)."))
            else:
                problems.append(f"The server has no {what} named '{p.task_model}' (Test connection lists them).")
        return problems

    def train_problems(self, parameters: Any) -> list[str]:
        p = self.parameters_from(parameters)
        problems = [self.check_input_volume(p.input_volume)]
        if p.task != FEWSHOT:
            problems.append("Training is part of few-shot segmentation; train structure and diagnosis models in "
                            "the LCTfound Train module.")
        if p.annotation_segmentation is None:
            problems.append("Select the segmentation with your labelled slices.")
        if self.on_server(p):
            problems += self._server_train_problems(p)
        else:
            problems += [self.check_model(p.model_name), self.check_new_model_name(p.new_model_name),
                         self.check_device(p.device)]
        if not 1 <= int(p.epochs) <= 10000:
            problems.append("Epochs must lie between 1 and 10000.")
        return [problem for problem in problems if problem]

    def predict_problems(self, parameters: Any) -> list[str]:
        p = self.parameters_from(parameters)
        problems = [self.check_input_volume(p.input_volume)]
        problems += (self._server_predict_problems(p) if self.on_server(p)
                     else [self.check_task_model(p), self.check_device(p.device)])
        if p.task != DIAGNOSIS and p.output_mode == "update" and p.annotation_segmentation is None:
            problems.append("Select the annotation segmentation to update, or put the result in a new segmentation.")
        problems.append(self.extent_problem(p))
        return [problem for problem in problems if problem]

    def parameter_problems(self, parameters: Any) -> list[str]:
        """What the status line names first: input volume, the backbone (few-shot) and the device."""
        p = self.parameters_from(parameters)
        problems = [self.check_input_volume(p.input_volume)]
        if self.on_server(p):
            problems.append(self.server_problem(p))
            return [problem for problem in problems if problem]
        if p.task == FEWSHOT:
            problems.append(self.check_model(p.model_name))
        problems.append(self.check_device(p.device))
        return [problem for problem in problems if problem]

    def training_recipe(self, parameters: Any) -> tuple[str, int]:
        """The few-shot recipe that training runs for the selected backbone (official for the official
        backbone, fast otherwise) and its epochs (the recipe's own unless the field was changed)."""
        from ..pipelines.recipes import OFFICIAL_SETTINGS, is_official_backbone_folder

        p = self.parameters_from(parameters)
        official = is_official_backbone_folder(self._backbone_path(p.model_name))
        recipe_epochs = OFFICIAL_SETTINGS["epochs"] if official else SegmentationParameters.epochs
        epochs = recipe_epochs if int(p.epochs) == SegmentationParameters.epochs else int(p.epochs)
        return ("official" if official else "fast"), epochs

    def selection_summary(self, parameters: Any) -> str:
        p = self.parameters_from(parameters)
        problem = self.first_problem(p)
        if problem:
            return problem
        if self.on_server(p):
            server = self.connected_server(p)
            if p.task == DIAGNOSIS:
                chosen = f" Classifies with '{p.task_model}'." if p.task_model else ""
                return f"Runs on the server {server.url}.{chosen} {SERVER_SALIENCY_NOTE}"
            text = f"Runs on the server {server.url}"
            text += (f" with backbone '{p.model_name or '?'}' (the server picks the recipe: official for the "
                     "official backbone, fast otherwise)." if p.task == FEWSHOT else ".")
            return f"{text} Predicts with '{p.task_model}'." if p.task_model else text
        text = super().selection_summary(p) if p.task == FEWSHOT else f"Runs on {self.device_label(p.device)}."
        if p.task == FEWSHOT:
            from ..pipelines.recipes import describe_recipe

            try:
                recipe, epochs = self.training_recipe(p)
                text += f" Training uses the {describe_recipe(recipe)}, {epochs} epochs."
            except LCTfoundError as error:
                text += f" {error}"
        missing = self.check_task_model(p)
        return f"{text} {missing}" if missing else f"{text} Predicts with '{p.task_model}'."

    def _button(self, problems: list[str], tooltip: str) -> ButtonState:
        if self.state.busy:
            return ButtonState(False, f"{self.task_name} is running")
        if problems:
            return ButtonState(False, problems[0])
        return ButtonState(True, tooltip)

    def train_button_state(self, parameters: Any) -> ButtonState:
        return self._button(self.train_problems(parameters), "Train a few-shot model on the labelled/reviewed slices")

    def predict_button_state(self, parameters: Any) -> ButtonState:
        p = self.parameters_from(parameters)
        tooltip = "Classify the scan" if p.task == DIAGNOSIS else "Segment the whole volume"
        return self._button(self.predict_problems(p), tooltip)

    def cancel_button_state(self) -> ButtonState:
        if self.state.busy:
            return ButtonState(True, "Stop the running job")
        return ButtonState(False, "Nothing is running")

    # -- running --------------------------------------------------------------------------

    def _new_run(self, kind: str) -> Path:
        run = self.new_run_folder(kind)
        run.mkdir(parents=True)
        return run

    def _launch(self, run: Path, info: dict[str, Any], args: list[str], device: str, message: str) -> "Job":
        write_text_file(run / JOB_FILE, json.dumps(info, indent=2, default=str))
        try:
            job = self.start_job(args, device=device, message=message, cwd=run)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise
        self.run_folder, self._job_info = run, info
        return job

    @staticmethod
    def _export_volume(volume: Any, run: Path) -> Path:
        from .base import export_volume_node

        return export_volume_node(volume, run / "volume.nrrd")

    def _backbone_path(self, name: str) -> Path:
        entry = self.find_model(name)
        if entry is None:
            raise LCTfoundError(f"Model '{name}' is not installed here.")
        return Path(entry.path).resolve()

    def correction_start(self, segmentation: Any, names: dict[int, str]) -> Optional[Any]:
        """The installed few-shot model that predicted ``segmentation`` (its `MODEL_ATTRIBUTE`) when
        it segments the same structures: retraining then starts from it and weighs the annotator's
        corrections (pixels it got wrong) more. None: train from scratch."""
        from ..models.task_models import read_task_info

        entry = self.find_task_model(segmentation.GetAttribute(MODEL_ATTRIBUTE) or "")
        if entry is None or entry.task != "fewshot-segmentation":
            return None
        try:
            labels = {int(k): v for k, v in read_task_info(entry.path).get("labels", {}).items()}
        except LCTfoundError:
            return None
        return entry if labels == {int(k): v for k, v in names.items() if int(k) > 0} else None

    def start_train(self, parameters: Any) -> "Job":
        """Export the volume and the training slices and start `lctfound segment train`."""
        p = self.parameters_from(parameters)
        problems = self.train_problems(p)
        if problems:
            raise LCTfoundError(problems[0])
        if self.state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        labels, slices, names = training_labels(p.annotation_segmentation, p.input_volume)
        run = self._new_run("fewshot-train")
        try:
            from ..io.volume import write_volume
            from ..mrml import ctvolume_from_volume_node

            volume_path = self._export_volume(p.input_volume, run)
            labels_path = run / "labels.nrrd"
            write_volume(ctvolume_from_volume_node(p.input_volume).with_array(labels), labels_path)
            name = p.new_model_name.strip()
            server = self.connected_server(p)
            common = ["segment", "train", str(volume_path), "--labels", str(labels_path),
                      "--slices", format_slices(slices),
                      "--names", ",".join(f"{value}={text}" for value, text in sorted(names.items())),
                      "--window", p.window, "--events"]
            if server is not None:
                return self._start_server_train(p, server, run, common, slices, names)
            recipe, epochs = self.training_recipe(p)
            args = common + ["--epochs", str(epochs), "--output", str(run / "model")]
            start_from = self.correction_start(p.annotation_segmentation, names)
            if start_from is not None:
                args += ["--init", str(start_from.path)]  # the recipe is the start model's
            else:
                args += ["--backbone", str(self._backbone_path(p.model_name)), "--recipe", recipe]
            info = {"action": "train", "new_model_name": name, "slices": slices, "names": names, "recipe": recipe,
                    "init": start_from.name if start_from is not None else "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise
        return self._launch(run, info, args, p.device, f"training on slices {format_slices(slices)}")

    def _start_server_train(self, p: SegmentationParameters, server: ServerConnection, run: Path,
                            args: list[str], slices: list[int], names: dict[int, str]) -> "Job":
        """`segment train --server`: the exported slices go up, the model is trained and kept on the server
        under the new name (the server picks the recipe for its backbone; epochs only when changed)."""
        name = p.new_model_name.strip()
        args = args + ["--output", name, "--backbone", p.model_name, *server_arguments(server)]
        if int(p.epochs) != SegmentationParameters.epochs:
            args += ["--epochs", str(int(p.epochs))]
        info = {"action": "train", "new_model_name": name, "slices": slices, "names": names, "recipe": "auto",
                "init": "", "server": server.url, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        return self._launch(run, info, args, p.device, f"training on slices {format_slices(slices)} on {server.url}")

    def start_predict(self, parameters: Any) -> "Job":
        """Export the volume and start `lctfound segment predict` (or `classify predict` for diagnosis)."""
        p = self.parameters_from(parameters)
        problems = self.predict_problems(p)
        if problems:
            raise LCTfoundError(problems[0])
        if self.state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        server = self.connected_server(p)
        entry = None if server is not None else self.find_task_model(p.task_model, p.task)
        run = self._new_run(p.task)
        try:
            volume_path = self._export_volume(p.input_volume, run)
            info: dict[str, Any] = {"action": "classify" if p.task == DIAGNOSIS else "predict", "task": p.task,
                                    "task_model": p.task_model,
                                    "task_model_path": str(entry.path) if entry is not None else "",
                                    "server": server.url if server is not None else "",
                                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            model = p.task_model if server is not None else str(entry.path)  # a server resolves its names
            if p.task == DIAGNOSIS:
                args = ["classify", "predict", str(volume_path), "--model", model,
                        "--output", str(run / "results.csv"), "--events"]
                if p.saliency and server is None:  # a server computes none (`SERVER_SALIENCY_NOTE`)
                    args += ["--saliency", str(run / SALIENCY_FILE)]
                message = f"classifying with {p.task_model}"
            else:
                fewshot = p.task == FEWSHOT
                steps = [step for step, on in (("connected", fewshot and p.keep_connected),
                                               ("largest", p.keep_largest), ("fill", p.fill_holes),
                                               ("smooth", p.smooth)) if on]
                args = ["segment", "predict", str(volume_path), "--model", model,
                        "--output", str(run / "prediction.nrrd"), "--events",
                        "--postprocess", ",".join(steps) or "none"]
                if fewshot:
                    args += self._extent_args(p, run)
                message = f"segmenting with {p.task_model}"
            if server is not None:
                args += server_arguments(server)
                message += f" on {server.url}"
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise
        # The nodes the result goes to are kept for `on_job_finished` (MRML is read on the main thread).
        self._result_target = p
        return self._launch(run, info, args, p.device, message)

    @staticmethod
    def extent_problem(parameters: Any) -> str:
        p = parameters
        if p.task == FEWSHOT and not p.whole_volume and not 0 <= float(p.extent_margin_mm) <= 10000:
            return "The extent margin must be between 0 and 10000 mm."
        return ""

    def _extent_args(self, p: SegmentationParameters, run: Path) -> list[str]:
        """`segment predict` options that keep a few-shot prediction to the annotated extent: the current
        annotation (painted and reviewed slices) goes with the volume; without one the model's own applies."""
        args = ["--extent-margin", f"{float(p.extent_margin_mm):g}mm"]
        if p.whole_volume:
            args.append("--whole-volume")
        if p.annotation_segmentation is not None:
            try:
                labels, slices, _ = training_labels(p.annotation_segmentation, p.input_volume)
            except LCTfoundError:
                return args  # nothing painted on this volume: the model's training annotation, if it is this volume
            import numpy as np

            from ..io.volume import write_volume
            from ..mrml import ctvolume_from_volume_node

            # Only the slices training uses (reviewed, else painted): an updated node also holds predictions.
            annotation = np.zeros(labels.shape, dtype=np.int16)
            annotation[slices] = labels[slices]
            path = run / "annotation.nrrd"
            write_volume(ctvolume_from_volume_node(p.input_volume).with_array(annotation), path)
            args += ["--annotation", str(path)]
        return args

    # -- results --------------------------------------------------------------------------

    def on_job_finished(self, job: "Job") -> str:
        action = self._job_info.get("action")
        if action == "train":
            return self._finish_train()
        if action == "predict":
            return self._finish_predict(self._result_target)
        if action == "classify":
            return self._finish_classify(self._result_target)
        return ""

    def _finish_train(self) -> str:
        from ..models.registry import register_model

        name = self._job_info["new_model_name"]
        if self._job_info.get("server"):
            return self._finish_server_train(name)
        output = self.run_folder / "model"
        try:
            self.registered_model = register_model(output, name)
        except LCTfoundError as error:
            raise LCTfoundError(f"{error} (the trained model is in {output})") from None
        self.refresh()
        message = f"few-shot model '{name}' registered (slices {format_slices(self._job_info['slices'])})"
        note = self.training_note(output)
        return f"{message}; {note}" if note else message

    def _finish_server_train(self, name: str) -> str:
        """The model stays on the server: its lists are read again so that the selectors offer it."""
        server = self.server
        message = (f"few-shot model '{name}' trained on slices {format_slices(self._job_info['slices'])}; "
                   f"it stays on the server {self._job_info['server']}")
        if server is not None and server.url == self._job_info["server"]:
            try:
                self.server = connect(server.url, server.token_file)
            except LCTfoundError as error:
                return f"{message} (its model list could not be read again: {error})"
        return message

    @staticmethod
    def training_note(model_folder: Path) -> str:
        """What training changed from what was asked (e.g. more epochs to reach the recipe's minimum
        steps), as `segment train` recorded it in the model; '' when nothing."""
        from ..models.task_models import read_task_info

        try:
            return str(read_task_info(model_folder).get("training", {}).get("epochs_note", ""))
        except LCTfoundError:
            return ""

    def undo_stack(self, segmentation: Any):
        """The undo stack of ``segmentation`` kept by this logic (Slicer: the Segment Editor's own
        undo is used when it edits that node)."""
        from ..mrml import SegmentationUndoStack

        key = segmentation.GetID()
        stack = self._undo_stacks.get(key)
        if stack is None or stack.seg_node is not segmentation:
            stack = self._undo_stacks[key] = SegmentationUndoStack(segmentation)
        return stack

    def _finish_predict(self, p: SegmentationParameters) -> str:
        from ..io.volume import read_label_volume
        from ..models.task_models import read_task_info
        from ..mrml import ctvolume_from_volume_node, segmentation_node_from_labels, update_segmentation_from_labels

        volume = p.input_volume
        reference = ctvolume_from_volume_node(volume)
        labels = read_label_volume(self.run_folder / "prediction.nrrd", reference=reference).array
        if self._job_info.get("server"):
            server = self.server
            names = dict(server.labels.get(self._job_info["task_model"], {})) if server is not None else {}
            if not names:
                import numpy as np

                names = {int(v): f"Label {int(v)}" for v in np.unique(labels) if v > 0}
        else:
            names = {int(k): v for k, v in read_task_info(self._job_info["task_model_path"]).get("labels", {}).items()}
        kept: list[int] = []
        annotation = p.annotation_segmentation
        if annotation is not None and p.task == FEWSHOT:
            # The annotator's slices are ground truth: they override the prediction and stay reviewed.
            try:
                truth, kept, truth_names = training_labels(annotation, volume)
            except LCTfoundError:
                truth, kept, truth_names = None, [], {}
            if kept:
                labels = self._merge_truth(labels, names, truth, truth_names, kept)
        model_name = self._job_info["task_model"]
        if p.output_mode == "update" and annotation is not None:
            target = annotation
            update_segmentation_from_labels(target, labels, volume, names, undo_stack=self._editor_or_own_stack(target))
        else:
            target = segmentation_node_from_labels(volume.GetScene(), labels, volume, names,
                                                   name=f"{volume.GetName()} {model_name}")
        if kept:
            set_reviewed_slices(target, kept)
        target.SetAttribute(MODEL_ATTRIBUTE, model_name)
        if p.surfaces:
            target.CreateClosedSurfaceRepresentation()
        self.result_segmentation = target
        counts = ", ".join(f"{names.get(value, f'Label {value}')} {int((labels == value).sum())} voxels"
                           for value in sorted(names))
        return f"'{target.GetName()}': {counts}"

    def _editor_or_own_stack(self, segmentation: Any):
        from ..mrml._compat import slicer

        widget = getattr(getattr(slicer, "modules", None), "SegmentEditorWidget", None)
        editor = getattr(widget, "editor", None)
        if editor is not None and editor.segmentationNode() is segmentation:
            return None  # `save_state_for_undo` uses the Segment Editor's undo
        return self.undo_stack(segmentation)

    @staticmethod
    def _merge_truth(labels, names, truth, truth_names, slices):
        """Put the annotator's labels on ``slices``, mapping their values to the model's by name."""
        from ..mrml.structures import normalize_name

        by_name = {normalize_name(name): value for value, name in names.items()}
        merged = labels.copy()
        for k in slices:
            merged[k] = 0
            for value, name in truth_names.items():
                target = by_name.get(normalize_name(name))
                if target is not None:
                    merged[k][truth[k] == value] = target
        return merged

    def _finish_classify(self, p: SegmentationParameters) -> str:
        import numpy as np

        from ..io.volume import read_volume
        from ..mrml import ctvolume_from_volume_node, volume_node_from_ctvolume

        table_path = self.run_folder / "results.csv"
        with open(table_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
        if not rows:
            raise LCTfoundError(f"{table_path}: the classifier wrote no result")
        self.diagnosis_rows = rows
        scene = p.input_volume.GetScene()
        self.results_table = self._table_node(scene, rows, f"{p.input_volume.GetName()} diagnosis")
        self.saliency_volume = None
        saliency_file = self.run_folder / SALIENCY_FILE
        if p.saliency and saliency_file.is_file():
            reference = ctvolume_from_volume_node(p.input_volume)
            saliency = read_volume(saliency_file, validate=False)
            if saliency.shape != reference.shape:
                raise LCTfoundError(f"{saliency_file}: saliency is not on the input volume's grid")
            node = volume_node_from_ctvolume(scene, reference.with_array(saliency.array.astype(np.float32)),
                                             name=f"{p.input_volume.GetName()} saliency {p.task_model}")
            node.SetAttribute(MODEL_ATTRIBUTE, p.task_model)
            self.saliency_volume = node
        row = rows[0]
        probabilities = ", ".join(f"{key[len('probability_'):]} {float(value):.3f}"
                                  for key, value in row.items() if key.startswith("probability_"))
        text = f"predicted '{row.get('predicted', '?')}' ({probabilities}). {row.get('note', '')}".strip()
        return f"{text} {SERVER_SALIENCY_NOTE}" if self._job_info.get("server") else text

    @staticmethod
    def _table_node(scene: Any, rows: list[dict[str, str]], name: str) -> Any:
        """A NEW table node holding ``rows`` (one column per key, all text)."""
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
        table = node.GetTable()
        from ..mrml._compat import vtk

        for key in rows[0]:
            column = vtk.vtkStringArray()
            column.SetName(key)
            for row in rows:
                column.InsertNextValue(str(row.get(key, "")))
            table.AddColumn(column)
        node.Modified()
        return node

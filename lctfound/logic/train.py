"""Qt-free logic of the LCTfoundTrain module: pretrain an LCTfound model on the user's CTs, or
fine-tune a backbone for segmentation or classification.

Training runs as a job (`lctfound.jobs`) in a child process, one command per task::

    pretrain                 lctfound train pretrain DATA -o RUN/pretrain ... --events
    finetune-segmentation    lctfound train finetune --task segmentation --image CT --labels LABELS ...
                             -o RUN/finetune-segmentation ... --events
    finetune-classification  lctfound train finetune --task classification --table CSV ...
                             -o RUN/finetune-classification ... --events

`TrainModuleLogic.poll()` turns the job's events into progress (step/total, loss, ETA) and a loss
history. When the job finishes, the logic registers the trained model (a backbone, or a task
model folder) under the new name — the one way models are registered here — so every module's
selectors list it (`list_models`, `list_task_models`). Cancel ends the process tree; the newest
checkpoint stays, and `resume()` continues from it with the exact command stored in job.json.

Training data per task (``data_source``):

* pretrain — a folder of CT files, or loaded volumes (exported as ``data/volume-NNN.nrrd``);
* finetune-segmentation — loaded volumes, each with the segmentation drawn on it (paired by the
  segmentation's reference volume), exported as ``data/image-NNN.nrrd`` + ``data/labels-NNN.nrrd``
  with label values fixed by segment name (`lctfound.mrml.labels_from_segmentation` and the
  structure table); or a folder of ``CASE_image.*`` + ``CASE_label.*`` file pairs;
* finetune-classification — a CSV table with columns image,label (label = class name), or loaded
  volumes each given a class name (stored on the node as attribute `CLASS_ATTRIBUTE`), exported
  with ``data/cases.csv``.

Everything that would make a run fail at once (no pairs, a volume without labelled voxels, a
segmentation on another voxel grid, a single class, ...) is a one-line problem of
`parameter_problems`, shown before Start is enabled.

A run folder (default ``<cache>/runs/<name>-<timestamp>``) holds::

    job.json     what was started (command arguments, task, new model name, device, data)
    data/        exported training data (loaded volumes, label maps, cases.csv)
    <task>/      the command's output: metrics.csv, loss_curve.png, model/, checkpoints/
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..atomic import write_text_file
from ..errors import LCTfoundError
from ..training.tables import table_path
from ..validation import MAX_BATCH, MAX_IMAGE_SIZE, MAX_STEPS, check_int
from .base import AUTO_DEVICE, ButtonState, Choice, ModuleLogicBase, RunState, _snake_case

if TYPE_CHECKING:
    from ..jobs import Job

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
DATA_FOLDER = "data"
CASES_FILE = "cases.csv"
CHECKPOINT_PREFIX = "step-"

PRETRAIN = "pretrain"
SEGMENTATION = "finetune-segmentation"
CLASSIFICATION = "finetune-classification"
#: Task of the panel → ``lctfound train finetune --task`` value.
FINETUNE_TASKS = {SEGMENTATION: "segmentation", CLASSIFICATION: "classification"}

TASKS = (
    Choice(PRETRAIN, "Pretrain (diffusion, unlabelled CTs)",
           "Train the diffusion backbone on your own CT volumes; no annotations needed."),
    Choice(SEGMENTATION, "Fine-tune: segmentation",
           "Train a segmentation model on a backbone from annotated CTs: loaded volumes with the segmentations "
           "drawn on them, or a folder of CASE_image / CASE_label file pairs."),
    Choice(CLASSIFICATION, "Fine-tune: classification",
           "Train a scan classifier on a backbone from CTs with one class name each: a CSV table "
           "(columns image,label) or loaded volumes given a class name here."),
)
TASK_VALUES = tuple(choice.value for choice in TASKS)

#: Data sources of each task, the default first, with the text shown for that task.
TASK_DATA_SOURCES: dict[str, tuple[Choice, ...]] = {
    PRETRAIN: (
        Choice("folder", "Folder of CT files", "Every CT volume under a folder (NIfTI, NRRD, MHA, DICOM series, .npy slices)."),
        Choice("volumes", "Loaded volumes", "Volumes loaded in this scene; they are exported to the run folder first."),
    ),
    SEGMENTATION: (
        Choice("volumes", "Loaded volumes with segmentations",
               "Each selected volume with the selected segmentation drawn on it; exported to the run folder first."),
        Choice("folder", "Folder of image/label pairs",
               "Files CASE_image.nrrd and CASE_label.nrrd (or .nii.gz, .nii, .mha) in one folder; label 0 is background."),
    ),
    CLASSIFICATION: (
        Choice("table", "CSV table (image,label)",
               "A CSV file with columns image (path, relative to the table) and label (the class name)."),
        Choice("volumes", "Loaded volumes with class names",
               "Each selected volume with the class name entered below; exported to the run folder first."),
    ),
}
#: Every data source (for front ends that list them all).
DATA_SOURCES = (TASK_DATA_SOURCES[PRETRAIN][0], TASK_DATA_SOURCES[PRETRAIN][1], TASK_DATA_SOURCES[CLASSIFICATION][0])

MODES = (
    Choice("frozen", "Frozen backbone (train a new head)",
           "Only a new output head trains; fast, needs few examples. Default learning rate 1e-3."),
    Choice("adapter", "Adapters (frozen backbone + small adapters)",
           "Small adapter layers and the head train, the backbone stays as it is. Default learning rate 1e-3."),
    Choice("full", "Full fine-tuning",
           "Every backbone weight trains with the new head (the paper's structure models). Default learning rate 1e-4."),
)
TASK_MODES = {SEGMENTATION: ("frozen", "adapter", "full"), CLASSIFICATION: ("frozen", "full")}
DEFAULT_MODES = {SEGMENTATION: "full", CLASSIFICATION: "frozen"}

#: Segment status filter of segmentation training from the scene.
SEGMENT_FILTERS = (
    Choice("all", "All segments", "Train on every segment of the selected segmentations."),
    Choice("reviewed", "Only reviewed segments (status Completed)",
           "Train only on segments whose status is Completed (reviewed by the annotator)."),
)
REVIEWED_STATUSES = ("Completed",)

#: Volume node attribute holding the class name a volume is given for classification training.
CLASS_ATTRIBUTE = "LCTfound.ClassName"

#: Network presets of `lctfound.models.presets` (listed here so the panel opens without torch;
#: a test checks that both lists agree).
PRESETS = (
    Choice("cpu-tiny", "cpu-tiny (smallest, CPU-friendly)", "Widths 16-32-64-96-128, attention at 1/8 only; trains on a CPU."),
    Choice("cpu-base", "cpu-base (CPU-practical)", "Widths 32-64-128-256-256, attention at 1/8 only; pretrain on a GPU, run on a CPU."),
    Choice("official", "official (290 M parameters)", "The published LCTfound U-Net; needs a large GPU to train."),
)
#: Same rule as `lctfound.models.registry.check_new_model_name` (a test checks it).
MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
DEFAULT_MODEL_NAME = "lctfound-pretrained"
DEFAULT_MODEL_NAMES = {PRETRAIN: DEFAULT_MODEL_NAME, SEGMENTATION: "lctfound-segmentation",
                       CLASSIFICATION: "lctfound-classifier"}
#: Learning rates used when the panel's learning rate is 0 ("automatic").
PRETRAIN_LEARNING_RATE = 2e-4
FULL_FINETUNE_LEARNING_RATE = 1e-4
HEAD_LEARNING_RATE = 1e-3

#: File names of segmentation pairs in a folder: CASE_image.<ext> and CASE_label.<ext>.
PAIR_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
_PAIR_PATTERN = re.compile(r"^(?P<case>.+)_(?P<kind>image|label)(?P<ext>\.nii\.gz|\.nii|\.nrrd|\.nhdr|\.mha|\.mhd)$",
                           re.IGNORECASE)
_GRID_TOLERANCE_MM = 1e-3


@dataclass
class TrainParameters:
    """What one training run needs. Paths may be ``str`` or ``Path``; ``""`` or ``"."`` means
    "not chosen". ``patch_size`` 0 trains on whole slices; ``ema_decay`` 0 keeps no EMA;
    ``learning_rate`` 0 uses the task's default (`effective_learning_rate`); ``mode`` ""
    uses the task's default mode; ``slices_per_scan`` 0 uses every slice."""

    data_source: str = "folder"
    data_folder: Any = ""
    training_volumes: Sequence[Any] = field(default_factory=list)
    #: Segmentation nodes drawn on the training volumes (finetune-segmentation from the scene).
    training_segmentations: Sequence[Any] = field(default_factory=list)
    segment_filter: str = "all"
    #: CSV table with columns image,label (finetune-classification).
    table_path: Any = ""
    task: str = PRETRAIN
    #: Model the fine-tuning starts from (a name of the model selector).
    backbone_model: str = ""
    mode: str = ""
    slices_per_scan: int = 12
    preset: str = "cpu-tiny"
    resolution: int = 256
    patch_size: int = 128
    batch_size: int = 8
    max_steps: int = 2000
    learning_rate: float = 0.0
    checkpoint_every: int = 200
    ema_decay: float = 0.995
    device: str = AUTO_DEVICE
    run_folder: Any = ""
    new_model_name: str = ""
    #: Not on the panel: sample images per window at each checkpoint, and steps between metric events.
    num_samples: int = 4
    log_every: int = 10
    #: "Run on" (see `lctfound.logic.server`); training is no server task, so a server address only explains that.
    server_url: str = ""
    server_token_file: str = ""


def chosen_path(value: Any) -> Optional[Path]:
    """``value`` as a Path, or None when it is empty (a Slicer ``Path`` parameter is ``.`` then)."""
    if value is None:
        return None
    text = str(value).strip()
    if text in ("", "."):
        return None
    return Path(text).expanduser()


def checkpoint_steps(output: Path) -> list[int]:
    """Steps of the complete checkpoints in a training output folder, oldest first."""
    folder = Path(output) / "checkpoints"
    steps = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(CHECKPOINT_PREFIX) and (path / "training" / "trainer_state.json").is_file():
                try:
                    steps.append(int(path.name[len(CHECKPOINT_PREFIX):]))
                except ValueError:
                    continue
    return sorted(steps)


def read_loss_history(output: Path, up_to_step: Optional[int] = None) -> list[tuple[int, float]]:
    """``(step, loss)`` rows of a training output's metrics.csv."""
    path = Path(output) / "metrics.csv"
    history: list[tuple[int, float]] = []
    if not path.is_file():
        return history
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            try:
                step, loss = int(float(row["step"])), float(row["loss"])
            except (KeyError, TypeError, ValueError):
                continue
            if up_to_step is None or step <= up_to_step:
                history.append((step, loss))
    return history


def effective_mode(parameters: TrainParameters) -> str:
    """The backbone mode a fine-tuning run uses (the task's default when none is chosen)."""
    modes = TASK_MODES.get(parameters.task, ())
    return parameters.mode if parameters.mode in modes else DEFAULT_MODES.get(parameters.task, "")


def effective_learning_rate(parameters: TrainParameters) -> float:
    """The chosen learning rate, or for 0 the task's default: 2e-4 for pretraining, 1e-4 for
    full fine-tuning, 1e-3 for a frozen backbone or adapters."""
    if parameters.learning_rate:
        return float(parameters.learning_rate)
    if parameters.task in FINETUNE_TASKS:
        return FULL_FINETUNE_LEARNING_RATE if effective_mode(parameters) == "full" else HEAD_LEARNING_RATE
    return PRETRAIN_LEARNING_RATE


def folder_pairs(folder: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``(case, image, label)`` pairs of ``CASE_image.*`` / ``CASE_label.*`` files in ``folder``
    (sorted by case), and the names of files that miss their partner."""
    found: dict[str, dict[str, Path]] = {}
    for path in sorted(Path(folder).iterdir()):
        match = _PAIR_PATTERN.match(path.name)
        if match and path.is_file():
            found.setdefault(match.group("case"), {})[match.group("kind").lower()] = path
    pairs = [(case, files["image"], files["label"]) for case, files in sorted(found.items()) if len(files) == 2]
    unmatched = [next(iter(files.values())).name for _, files in sorted(found.items()) if len(files) == 1]
    return pairs, unmatched


def _node_name(node: Any) -> str:
    get_name = getattr(node, "GetName", None)
    return str(get_name()) if callable(get_name) else str(node)


def _node_key(node: Any) -> Any:
    get_id = getattr(node, "GetID", None)
    return get_id() if callable(get_id) else id(node)


def _present(nodes: Optional[Sequence[Any]]) -> list[Any]:
    return [node for node in (nodes or []) if node is not None]


def volume_class_name(node: Any) -> str:
    """The class name a volume node was given for classification training ('' if none)."""
    get_attribute = getattr(node, "GetAttribute", None)
    value = get_attribute(CLASS_ATTRIBUTE) if callable(get_attribute) else None
    return (value or "").strip()


def set_volume_class_name(node: Any, name: str) -> None:
    """Give a volume node a class name (stored as a node attribute, saved with the scene)."""
    node.SetAttribute(CLASS_ATTRIBUTE, (name or "").strip())


def source_volume_of(segmentation: Any) -> Any:
    """The volume a segmentation node was drawn on (its reference image geometry volume), or None."""
    get_role = getattr(segmentation, "GetReferenceImageGeometryReferenceRole", None)
    get_reference = getattr(segmentation, "GetNodeReference", None)
    if not callable(get_role) or not callable(get_reference):
        return None
    return get_reference(get_role())


def pair_volumes_with_segmentations(volumes: Sequence[Any], segmentations: Sequence[Any]) -> tuple[list[tuple[Any, Any]], str]:
    """Pair each volume with the selected segmentation drawn on it (the segmentation's source
    volume). A segmentation that names no source volume is paired with the one volume left without
    a segmentation. Returns ``(pairs in volume order, "")`` or ``([], problem)``."""
    volumes, segmentations = _present(volumes), _present(segmentations)
    keys = {_node_key(volume): volume for volume in volumes}
    matched: dict[Any, list[Any]] = {}
    unreferenced = []
    for segmentation in segmentations:
        source = source_volume_of(segmentation)
        if source is None:
            unreferenced.append(segmentation)
        elif _node_key(source) in keys:
            matched.setdefault(_node_key(source), []).append(segmentation)
        else:
            return [], (f"Segmentation '{_node_name(segmentation)}' was drawn on volume '{_node_name(source)}', "
                        "which is not selected; select that volume too.")
    for key, found in matched.items():
        if len(found) > 1:
            names = "', '".join(_node_name(s) for s in found)
            return [], f"Volume '{_node_name(keys[key])}' has several selected segmentations ('{names}'); select one per volume."
    alone = [volume for volume in volumes if _node_key(volume) not in matched]
    if len(unreferenced) == 1 and len(alone) == 1:
        matched[_node_key(alone[0])] = unreferenced
        alone, unreferenced = [], []
    if unreferenced:
        return [], (f"Segmentation '{_node_name(unreferenced[0])}' names no volume it was drawn on; select it "
                    "with its volume as source volume in Segment Editor, or pair it with the only volume left.")
    if alone:
        return [], (f"Volume '{_node_name(alone[0])}' has no selected segmentation; select the segmentation "
                    "drawn on it (or unselect the volume).")
    return [(volume, matched[_node_key(volume)][0]) for volume in volumes], ""


def _format_names(names: dict[int, str]) -> str:
    return ",".join(f"{value}={name}" for value, name in sorted(names.items()))


class TrainModuleLogic(ModuleLogicBase):
    """Start, follow, cancel and resume training runs; see the module docstring."""

    task_name = "training"
    parameters_class = TrainParameters

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: The run folder of the current (or last) run.
        self.run_folder: Optional[Path] = None
        #: ``(step, loss)`` of the current run (with the earlier part of a resumed run).
        self.loss_history: list[tuple[int, float]] = []
        #: Step of the newest checkpoint written by the current run (None: none yet).
        self.last_checkpoint_step: Optional[int] = None
        #: Warnings the job reported (e.g. a smaller micro-batch after running out of memory).
        self.warnings: list[str] = []
        #: Where the trained model was registered (after a finished run).
        self.registered_model: Optional[Path] = None
        self._job_info: dict[str, Any] = {}
        #: Results of the costly data checks (label maps read, segmentations resampled), by signature.
        self._check_cache: dict[Any, Any] = {}

    # -- choices -----------------------------------------------------------------------------

    def choices(self, parameter_name: str, refresh: bool = False, parameters: Any = None) -> list[Choice]:
        """Items of a selector; ``parameters`` narrows the data sources and modes to its task."""
        name = _snake_case(parameter_name)
        task = self.parameters_from(parameters).task if parameters is not None else None
        if name == "data_source":
            return list(TASK_DATA_SOURCES[task]) if task in TASK_DATA_SOURCES else list(DATA_SOURCES)
        if name == "mode":
            return [choice for choice in MODES if task not in TASK_MODES or choice.value in TASK_MODES[task]]
        if name == "backbone_model":
            return self.model_choices(refresh)
        fixed = {"task": TASKS, "preset": PRESETS, "segment_filter": SEGMENT_FILTERS}
        if name in fixed:
            return list(fixed[name])
        return super().choices(parameter_name, refresh)

    def visible_fields(self, parameters: Any) -> set[str]:
        """The parameters (snake_case) the panel shows for this task and data source, plus
        ``volume_classes`` (the class-name table of loaded volumes)."""
        p = self.parameters_from(parameters)
        shown = {"task", "data_source", "batch_size", "max_steps", "learning_rate", "checkpoint_every", "ema_decay",
                 "device", "run_folder", "new_model_name"}
        source = p.data_source
        if p.task == SEGMENTATION:
            shown |= {"backbone_model", "mode"}
            shown |= {"training_volumes", "training_segmentations", "segment_filter"} if source == "volumes" else {"data_folder"}
        elif p.task == CLASSIFICATION:
            shown |= {"backbone_model", "mode", "slices_per_scan"}
            shown |= {"training_volumes", "volume_classes"} if source == "volumes" else {"table_path"}
        else:
            shown |= {"preset", "resolution", "patch_size"}
            shown |= {"training_volumes"} if source == "volumes" else {"data_folder"}
        if self.on_server(p):
            shown.discard("device")  # nothing runs here while a server is chosen
        return shown

    # -- folders and names -------------------------------------------------------------------

    @staticmethod
    def output_folder(run_folder: Path | str, task: str = PRETRAIN) -> Path:
        """Where the training command writes (metrics.csv, loss_curve.png, model/, checkpoints/)."""
        return Path(run_folder) / task

    @staticmethod
    def run_task(run_folder: Path | str) -> str:
        """The task of a run folder (from its job.json; pretrain when unreadable)."""
        try:
            return json.loads((Path(run_folder) / JOB_FILE).read_text()).get("task", PRETRAIN)
        except (OSError, ValueError):
            return PRETRAIN

    def loss_curve_png(self, run_folder: Optional[Path | str] = None) -> Optional[Path]:
        """The loss-curve image of a run (default: the current one), once the first checkpoint wrote it."""
        folder = chosen_path(run_folder) or self.run_folder
        if folder is None:
            return None
        task = self._job_info.get("task", PRETRAIN) if folder == self.run_folder and self._job_info else self.run_task(folder)
        path = self.output_folder(folder, task) / "loss_curve.png"
        return path if path.is_file() else None

    def _taken_model_names(self) -> set[str]:
        from ..paths import user_models_dir

        taken = {entry.name for entry in self.models()}
        folder = user_models_dir()
        if folder.is_dir():
            taken.update(path.name for path in folder.iterdir())
        return taken

    def check_new_model_name(self, name: str) -> str:
        """Why ``name`` cannot name the trained model, or an empty string."""
        name = (name or "").strip()
        if not name:
            return "Enter a name for the new model."
        if not MODEL_NAME_PATTERN.match(name):
            return (f"Model name '{name}' may only contain letters, digits, '.', '_' and '-', "
                    "must start with a letter or digit and have at most 64 characters.")
        if name in self._taken_model_names():
            return f"A model named '{name}' already exists; choose another name."
        return ""

    def suggest_model_name(self, base: str = DEFAULT_MODEL_NAME) -> str:
        """A valid name for the trained model that no installed model uses yet."""
        taken = self._taken_model_names()
        name, number = base, 1
        while name in taken:
            number += 1
            name = f"{base}-{number}"
        return name

    # -- parameters --------------------------------------------------------------------------

    def default_values(self, parameters: Any) -> dict[str, Any]:
        """Fills an empty new model name, and for the chosen task a valid data source, its
        default mode and (fine-tuning) the default backbone model."""
        parameters = self.parameters_from(parameters)
        defaults = super().default_values(parameters)
        task = parameters.task
        if not parameters.new_model_name:
            defaults["new_model_name"] = self.suggest_model_name(DEFAULT_MODEL_NAMES.get(task, DEFAULT_MODEL_NAME))
        sources = [choice.value for choice in TASK_DATA_SOURCES.get(task, ())]
        if sources and parameters.data_source not in sources:
            defaults["data_source"] = sources[0]
        if task in FINETUNE_TASKS:
            if parameters.mode not in TASK_MODES[task]:
                defaults["mode"] = DEFAULT_MODES[task]
            if not parameters.backbone_model and self.default_model_name():
                defaults["backbone_model"] = self.default_model_name()
        return defaults

    def fill_task_defaults(self, target: Any) -> dict[str, Any]:
        """After the user picked another task: its default mode (a mode chosen for the previous
        task says nothing about this one), then `fill_defaults`. Returns what was set."""
        parameters = self.parameters_from(target)
        changed: dict[str, Any] = {}
        if parameters.task in DEFAULT_MODES and parameters.mode != DEFAULT_MODES[parameters.task]:
            changed["mode"] = DEFAULT_MODES[parameters.task]
            if isinstance(target, dict):
                target["mode"] = changed["mode"]
            else:
                setattr(target, "mode", changed["mode"])
        return {**changed, **self.fill_defaults(target)}

    def check_data(self, parameters: TrainParameters) -> str:
        """Why the training data of these parameters cannot be used, or an empty string."""
        p = parameters
        if p.task == SEGMENTATION:
            return self._check_segmentation_data(p)
        if p.task == CLASSIFICATION:
            return self._check_classification_data(p)
        if p.data_source == "folder":
            folder = chosen_path(p.data_folder)
            if folder is None:
                return "Choose the folder with the training CT volumes."
            if not folder.is_dir():
                return f"Training data folder not found: {folder}"
            return ""
        if p.data_source == "volumes":
            return self._check_volumes(p.training_volumes)
        return f"Unknown data source '{p.data_source}'; choose 'folder' or 'volumes'."

    @staticmethod
    def _check_volumes(nodes: Sequence[Any]) -> str:
        volumes = _present(nodes)
        if not volumes:
            return "Select the loaded volumes to train on."
        for node in volumes:
            get_image_data = getattr(node, "GetImageData", None)
            if callable(get_image_data) and get_image_data() is None:
                return f"Volume '{_node_name(node)}' has no image data."
        return ""

    def _wrong_source(self, p: TrainParameters) -> str:
        sources = [choice.value for choice in TASK_DATA_SOURCES[p.task]]
        if p.data_source not in sources:
            return f"Data source '{p.data_source}' does not fit this task; choose one of: {', '.join(sources)}."
        return ""

    # segmentation data

    def _check_segmentation_data(self, p: TrainParameters) -> str:
        problem = self._wrong_source(p)
        if problem:
            return problem
        if p.data_source == "folder":
            folder = chosen_path(p.data_folder)
            if folder is None:
                return "Choose the folder with the CASE_image / CASE_label file pairs."
            if not folder.is_dir():
                return f"Training data folder not found: {folder}"
            pairs, unmatched = folder_pairs(folder)
            if unmatched:
                return f"'{unmatched[0]}' in {folder} has no partner file (CASE_image.* needs CASE_label.*, and back)."
            if not pairs:
                return (f"No image/label pairs in {folder}: name them CASE_image.nrrd and CASE_label.nrrd "
                        "(or .nii.gz, .nii, .mha).")
            for case, image, label in pairs:
                try:
                    problem = self._file_pair_problem(case, image, label)
                except OSError as error:
                    problem = f"Case '{case}': cannot be read ({error.strerror or error})."
                if problem:
                    return problem
            return ""
        problem = self._check_volumes(p.training_volumes)
        if problem:
            return problem
        if not _present(p.training_segmentations):
            return "Select the segmentations drawn on the training volumes (one per volume)."
        pairs, problem = pair_volumes_with_segmentations(p.training_volumes, p.training_segmentations)
        if problem:
            return problem
        statuses = self._statuses(p)
        try:
            table = self.structure_table([segmentation for _, segmentation in pairs], statuses)
            for volume, segmentation in pairs:
                problem = self._scene_pair_problem(volume, segmentation, table, statuses)
                if problem:
                    return problem
        except ImportError as error:
            return f"Reading segmentations needs 3D Slicer or the slicer-core wheel ({error})."
        except LCTfoundError as error:
            return " ".join(str(error).split())
        return ""

    @staticmethod
    def _statuses(p: TrainParameters) -> Optional[tuple[str, ...]]:
        return REVIEWED_STATUSES if p.segment_filter == "reviewed" else None

    def _cached(self, key: Any, compute) -> Any:
        if key not in self._check_cache:
            if len(self._check_cache) > 256:
                self._check_cache.clear()
            self._check_cache[key] = compute()
        return self._check_cache[key]

    def _file_pair_problem(self, case: str, image: Path, label: Path) -> str:
        """A label map without labelled voxels or off the image's grid (read once per file version)."""
        def stamp(path: Path) -> tuple:
            status = path.stat()
            return str(path), status.st_mtime_ns, status.st_size

        def compute() -> str:
            import numpy as np
            import SimpleITK as sitk

            from ..io.volume import read_volume

            problem = self._image_file_problem(image)
            if problem:
                return problem
            try:
                labels = read_volume(label, validate=False, labels=True)
                reader = sitk.ImageFileReader()
                reader.SetFileName(str(image))
                reader.ReadImageInformation()
            except LCTfoundError as error:
                return str(error)
            except RuntimeError as error:
                return f"{image}: cannot be read ({' '.join(str(error).split())[:160]})"
            size = tuple(int(n) for n in reader.GetSize())
            if len(size) != 3 or size != tuple(labels.shape[::-1]):
                return (f"Case '{case}': the label map ({'×'.join(map(str, labels.shape[::-1]))}) does not lie on the "
                        f"image's voxel grid ({'×'.join(map(str, size))}); resample it onto the image.")
            same = (np.allclose(reader.GetSpacing(), labels.spacing, atol=_GRID_TOLERANCE_MM)
                    and np.allclose(reader.GetOrigin(), labels.origin, atol=_GRID_TOLERANCE_MM)
                    and np.allclose(np.reshape(reader.GetDirection(), (3, 3)), labels.direction, atol=1e-4))
            if not same:
                return f"Case '{case}': the label map does not lie on the image's voxel grid; resample it onto the image."
            if not np.any(labels.array):
                return f"Case '{case}': the label map {label.name} has no labelled voxel."
            return ""

        return self._cached(("file-pair", stamp(image), stamp(label)), compute)

    def _image_file_problem(self, image: Path) -> str:
        """Why a training image file (a table row, a pair's image) cannot be used, from its header
        checked against the file (truncated, a header that lies, NaN in NIfTI, no voxel size) —
        before a job is started on it. A folder must be a DICOM series. Cached per file version."""
        def compute() -> str:
            from ..io.dicom import looks_like_dicom
            from ..io.headers import check_volume_file

            if image.is_dir():
                files = [f for f in sorted(image.iterdir())[:5] if f.is_file()]
                if files and any(looks_like_dicom(f) for f in files):
                    return ""
                return f"{image}: a folder that holds no DICOM series; name a CT file or a DICOM folder"
            try:
                check_volume_file(image)
            except LCTfoundError as error:
                return str(error)
            except OSError as error:
                return f"{image}: cannot be read ({error.strerror or error})"
            return ""

        status = image.stat()
        return self._cached(("image-file", str(image), status.st_mtime_ns, status.st_size), compute)

    def structure_table(self, segmentations: Sequence[Any], statuses: Optional[Sequence[str]] = None):
        """The structure table extended with every (chosen) segment name of ``segmentations``,
        so that a name gets the same label value in every case."""
        from ..mrml import default_structure_table, segment_ids, segments_with_status
        from ..mrml.segmentations import get_segment_tag
        from ..mrml.structures import normalize_name

        table = default_structure_table()
        names = set()
        for segmentation in segmentations:
            chosen = segments_with_status(segmentation, statuses) if statuses else segment_ids(segmentation)
            for segment_id in chosen:
                segment = segmentation.GetSegmentation().GetSegment(segment_id)
                terminology = get_segment_tag(segment, _terminology_tag())
                if table.find(segment.GetName(), terminology) is None:
                    names.add(segment.GetName().strip())
        return table.extended(sorted(names, key=normalize_name))

    def _scene_pair_problem(self, volume: Any, segmentation: Any, table: Any, statuses) -> str:
        """A segmentation on another voxel grid than its volume, or without a labelled voxel in
        it (computed once per version of the nodes)."""
        key = ("scene-pair", _volume_signature(volume), _segmentation_signature(segmentation),
               tuple(statuses or ()), tuple(s.name for s in table))

        def compute() -> str:
            from ..mrml import labels_from_segmentation

            problem = segmentation_grid_problem(volume, segmentation)
            if problem:
                return problem
            try:
                labels, names = labels_from_segmentation(segmentation, volume, table, statuses)
            except LCTfoundError as error:
                return f"Segmentation '{_node_name(segmentation)}': {error}"
            if not labels.any():
                what = "reviewed (Completed) segment" if statuses else "segment"
                return (f"Segmentation '{_node_name(segmentation)}' has no labelled voxel in volume "
                        f"'{_node_name(volume)}' (no {what} with content).")
            bad = [name for name in names.values() if "," in name]
            if bad:  # `--names 1=A,2=B` cannot carry it
                return f"Segment name '{bad[0]}' contains a comma; rename the segment."
            return ""

        return self._cached(key, compute)

    # classification data

    def _check_classification_data(self, p: TrainParameters) -> str:
        problem = self._wrong_source(p)
        if problem:
            return problem
        if p.data_source == "volumes":
            problem = self._check_volumes(p.training_volumes)
            if problem:
                return problem
            volumes = _present(p.training_volumes)
            for node in volumes:
                name = volume_class_name(node)
                if not name:
                    return f"Enter a class name for volume '{_node_name(node)}'."
                if "\n" in name or "\r" in name:
                    return f"The class name of volume '{_node_name(node)}' may not span several lines."
            classes = sorted({volume_class_name(node) for node in volumes})
            if len(classes) < 2:
                return f"All volumes have class '{classes[0]}'; classification needs at least two classes."
            return ""
        table = chosen_path(p.table_path)
        if table is None:
            return "Choose the CSV table (columns image,label) of the training scans."
        if not table.is_file():
            return f"Table not found: {table}"
        rows, problem = read_case_table(table)
        if problem:
            return problem
        for number, row in enumerate(rows, start=2):
            if not row["label"]:
                return f"{table.name} line {number}: the label (class name) is empty."
            image = table_path(table, row["image"])
            if not image.exists():
                return f"{table.name} line {number}: image not found: {image}"
            problem = self._image_file_problem(image)
            if problem:
                return f"{table.name} line {number}: {problem}"
        classes = sorted({row["label"] for row in rows})
        if len(classes) < 2:
            return f"{table.name}: every scan has class '{classes[0]}'; classification needs at least two classes."
        return ""

    def data_summary(self, parameters: Any) -> str:
        """One line about the training data as it will be used (cases, pairs, classes), or ''."""
        p = self.parameters_from(parameters)
        try:
            if p.task == SEGMENTATION and p.data_source == "volumes":
                pairs, problem = pair_volumes_with_segmentations(p.training_volumes, p.training_segmentations)
                if problem or not pairs:
                    return ""
                listing = "; ".join(f"{_node_name(v)} + {_node_name(s)}" for v, s in pairs)
                return f"{len(pairs)} case(s): {listing}"
            if p.task == SEGMENTATION and p.data_source == "folder":
                folder = chosen_path(p.data_folder)
                if folder is None or not folder.is_dir():
                    return ""
                pairs, _ = folder_pairs(folder)
                return f"{len(pairs)} image/label pair(s)" if pairs else ""
            if p.task == CLASSIFICATION:
                if p.data_source == "volumes":
                    classes = [volume_class_name(node) for node in _present(p.training_volumes)]
                else:
                    table = chosen_path(p.table_path)
                    if table is None or not table.is_file():
                        return ""
                    rows, problem = read_case_table(table)
                    classes = [] if problem else [row["label"] for row in rows]
                counts = {name: classes.count(name) for name in sorted(set(classes)) if name}
                if not counts:
                    return ""
                return f"{len(classes)} scan(s): " + ", ".join(f"{name} ({count})" for name, count in counts.items())
        except OSError:
            return ""
        return ""

    def check_hyperparameters(self, p: TrainParameters) -> list[str]:
        problems = []
        if p.task in FINETUNE_TASKS:
            problems.append(self.check_backbone(p.backbone_model))
            if p.mode and p.mode not in TASK_MODES[p.task]:
                problems.append(f"Mode '{p.mode}' is not available for this task; choose one of: "
                                f"{', '.join(TASK_MODES[p.task])}.")
            if p.task == CLASSIFICATION and p.slices_per_scan < 0:
                problems.append(f"Slices per scan must be 0 (all) or more (got {p.slices_per_scan}).")
        else:
            if p.preset not in {choice.value for choice in PRESETS}:
                problems.append(f"Unknown preset '{p.preset}'; choose one of: {', '.join(c.value for c in PRESETS)}.")
            if p.resolution < 16 or p.resolution % 16 or p.resolution > MAX_IMAGE_SIZE:
                problems.append(f"Resolution must be a multiple of 16 up to {MAX_IMAGE_SIZE} (got {p.resolution}).")
            if p.patch_size and (p.patch_size % 16 or not 16 <= p.patch_size <= p.resolution):
                problems.append(f"Patch size must be 0 (whole slices) or a multiple of 16 up to the resolution (got {p.patch_size}).")
        # The command line's bounds (`lctfound.validation`), checked here before the run folder exists.
        for label, value, limit in (("Batch size", p.batch_size, MAX_BATCH), ("Steps", p.max_steps, MAX_STEPS),
                                    ("Checkpoint interval", p.checkpoint_every, MAX_STEPS)):
            try:
                check_int(value, label, 1, limit)
            except LCTfoundError as error:
                problems.append(f"{error}.")
        if not (p.learning_rate >= 0 and math.isfinite(p.learning_rate)) or p.learning_rate > 10:
            problems.append(f"Learning rate must be positive (at most 10), or 0 for the task's default "
                            f"(got {p.learning_rate}).")
        if not 0 <= p.ema_decay < 1:
            problems.append(f"EMA decay must lie in [0, 1), 0 for no EMA (got {p.ema_decay}).")
        return [problem for problem in problems if problem]

    def check_backbone(self, name: str) -> str:
        """Why the backbone model ``name`` cannot be fine-tuned, or an empty string."""
        if not name and self.models():
            return "Select the backbone model to fine-tune."
        return self.check_model(name)

    def no_server_task(self, parameters: Any, action: str = "") -> str:
        # server_tasks stays (): pretraining and fine-tuning need the data and the run folder here.
        return ("Pretraining and fine-tuning run on this computer only (they are not server tasks); clear the "
                "server address to train here.")

    def parameter_problems(self, parameters: Any) -> list[str]:
        p = self.parameters_from(parameters)
        problems = [self.server_problem(p)]
        if p.task not in TASK_VALUES:
            problems.append(f"Task '{p.task}' is not available; choose one of: {', '.join(TASK_VALUES)}.")
        problems.append(self.check_data(p))
        problems += self.check_hyperparameters(p)
        problems.append(self.check_device(p.device))
        problems.append(self.check_new_model_name(p.new_model_name))
        run = chosen_path(p.run_folder)
        if run is not None and run.exists() and (not run.is_dir() or any(run.iterdir())):
            problems.append(f"Run folder {run} is not empty; Resume it or choose a new folder.")
        return [problem for problem in problems if problem]

    # -- buttons -----------------------------------------------------------------------------

    def start_button_state(self, parameters: Any) -> ButtonState:
        if self.state.busy:
            return ButtonState(False, f"{self.task_name} is running")
        problem = self.first_problem(parameters)
        return ButtonState(not problem, problem or "Start training in the background")

    def cancel_button_state(self) -> ButtonState:
        if self.state is RunState.RUNNING:
            return ButtonState(True, "Stop training; the newest checkpoint is kept for Resume")
        return ButtonState(False, "Stopping…" if self.state is RunState.CANCELLING else "Nothing is running")

    def resume_target(self, parameters: Any = None) -> Optional[Path]:
        """The run Resume continues: the chosen run folder, else the last run."""
        chosen = chosen_path(self.parameters_from(parameters).run_folder) if parameters is not None else None
        return chosen or self.run_folder

    def resume_problem(self, run_folder: Optional[Path | str]) -> str:
        """Why ``run_folder`` cannot be resumed, or an empty string."""
        if self.state.busy:
            return f"{self.task_name} is running"
        folder = chosen_path(run_folder)
        if folder is None:
            return "No run to resume: choose its run folder."
        job_file = folder / JOB_FILE
        if not job_file.is_file():
            return f"{folder} is not a run folder of LCTfound Train (it has no {JOB_FILE})."
        try:
            info = json.loads(job_file.read_text())
        except (OSError, ValueError) as error:
            return f"{job_file} cannot be read ({error})."
        if info.get("registered_model"):
            return f"This run has finished; its model is registered as '{info.get('new_model_name')}'."
        if not checkpoint_steps(self.output_folder(folder, info.get("task", PRETRAIN))):
            return "Nothing to resume: the run stopped before its first checkpoint."
        return self.check_new_model_name(info.get("new_model_name", ""))

    def resume_button_state(self, parameters: Any = None) -> ButtonState:
        target = self.resume_target(parameters)
        problem = (self.server_problem(parameters) if parameters is not None else "") or self.resume_problem(target)
        return ButtonState(not problem, problem or f"Continue {target} from its newest checkpoint")

    # -- commands ----------------------------------------------------------------------------

    def _loop_arguments(self, p: TrainParameters, output: Path) -> list[str]:
        args = ["--output", str(output), "--batch-size", str(p.batch_size), "--max-steps", str(p.max_steps),
                "--lr", repr(effective_learning_rate(p)), "--checkpoint-every", str(p.checkpoint_every),
                "--log-every", str(p.log_every), "--name", p.new_model_name.strip()]
        if p.ema_decay:
            args += ["--ema", repr(float(p.ema_decay))]
        return args

    def command(self, parameters: TrainParameters, data: Any, output: Path) -> list[str]:
        """The ``lctfound`` arguments of a run (``--resume`` is added by `resume()`). ``data`` is
        the pretraining folder, or for fine-tuning the `prepare_data` result."""
        p = parameters
        if p.task in FINETUNE_TASKS:
            return self.finetune_command(p, data, output)
        args = ["train", p.task, str(data), "--output", str(output),
                "--preset", p.preset, "--resolution", str(p.resolution), "--batch-size", str(p.batch_size),
                "--max-steps", str(p.max_steps), "--lr", repr(effective_learning_rate(p)),
                "--checkpoint-every", str(p.checkpoint_every), "--num-samples", str(p.num_samples),
                "--log-every", str(p.log_every), "--name", p.new_model_name.strip()]
        if p.patch_size:
            args += ["--patch-size", str(p.patch_size)]
        if p.ema_decay:
            args += ["--ema", repr(float(p.ema_decay))]
        return args + ["--events"]

    def finetune_command(self, p: TrainParameters, data: dict[str, Any], output: Path) -> list[str]:
        """``train finetune --task ...``: ``data`` holds ``pairs`` + ``names`` (segmentation) or
        ``table`` (classification); the backbone is passed as its folder."""
        args = ["train", "finetune", "--task", FINETUNE_TASKS[p.task], "--backbone", str(self.backbone_path(p)),
                "--mode", effective_mode(p)]
        if p.task == SEGMENTATION:
            for image, labels in data["pairs"]:
                args += ["--image", str(image), "--labels", str(labels)]
            if data.get("names"):
                args += ["--names", _format_names(data["names"])]
        else:
            args += ["--table", str(data["table"]), "--slices-per-scan", str(p.slices_per_scan)]
        return args + self._loop_arguments(p, output) + ["--events"]

    def backbone_path(self, p: TrainParameters) -> Path:
        entry = self.find_model(p.backbone_model)
        if entry is None:
            raise LCTfoundError(f"Model '{p.backbone_model}' is not installed here.")
        return Path(entry.path).resolve()

    # -- exporting loaded data ---------------------------------------------------------------

    def export_volumes(self, volume_nodes: Sequence[Any], folder: Path) -> list[Path]:
        """Write volume nodes as NRRD files ``volume-001.nrrd``, ... into ``folder`` (on the
        main thread: MRML is read here). Neutral file names, so that no node name such as
        "lung_seg" matches the training data's exclusion patterns."""
        from ..io.volume import write_volume
        from ..mrml import ctvolume_from_volume_node

        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for number, node in enumerate(volume_nodes, start=1):
            path = folder / f"volume-{number:03d}.nrrd"
            write_volume(ctvolume_from_volume_node(node), path, compress=False)
            paths.append(path)
        return paths

    def export_segmentation_pairs(self, pairs: Sequence[tuple[Any, Any]], folder: Path,
                                  statuses: Optional[Sequence[str]] = None) -> tuple[list[tuple[Path, Path]], dict[int, str]]:
        """Write each (volume, segmentation) as ``image-NNN.nrrd`` + ``labels-NNN.nrrd`` (label
        values fixed by segment name, the same in every case); returns the file pairs and
        ``{label: name}`` over all cases."""
        from ..io.volume import write_volume
        from ..mrml import ctvolume_from_volume_node, labels_from_segmentation

        folder.mkdir(parents=True, exist_ok=True)
        table = self.structure_table([segmentation for _, segmentation in pairs], statuses)
        files, names = [], {}
        for number, (volume, segmentation) in enumerate(pairs, start=1):
            ct = ctvolume_from_volume_node(volume)
            labels, label_names = labels_from_segmentation(segmentation, volume, table, statuses)
            if not labels.any():
                raise LCTfoundError(f"Segmentation '{_node_name(segmentation)}' has no labelled voxel in volume "
                                    f"'{_node_name(volume)}'.")
            image_path, labels_path = folder / f"image-{number:03d}.nrrd", folder / f"labels-{number:03d}.nrrd"
            write_volume(ct, image_path, compress=False)
            write_volume(ct.with_array(labels), labels_path, compress=True)
            files.append((image_path, labels_path))
            names.update(label_names)
        return files, dict(sorted(names.items()))

    def export_classified_volumes(self, volume_nodes: Sequence[Any], folder: Path) -> Path:
        """Write the volumes (``volume-NNN.nrrd``) and ``cases.csv`` (image,label) into ``folder``."""
        paths = self.export_volumes(volume_nodes, folder)
        table = folder / CASES_FILE
        with open(table, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["image", "label"])
            for path, node in zip(paths, volume_nodes):
                writer.writerow([path.name, volume_class_name(node)])
        return table

    def prepare_data(self, p: TrainParameters, run: Path) -> tuple[Any, dict[str, Any]]:
        """Export loaded data into ``run/data`` where needed; returns what `command` takes and
        the job.json entries that describe the data."""
        data_folder = run / DATA_FOLDER
        if p.task == SEGMENTATION:
            if p.data_source == "volumes":
                pairs, problem = pair_volumes_with_segmentations(p.training_volumes, p.training_segmentations)
                if problem:
                    raise LCTfoundError(problem)
                files, names = self.export_segmentation_pairs(pairs, data_folder, self._statuses(p))
                info = {"data": str(data_folder), "volumes": [_node_name(v) for v, _ in pairs],
                        "segmentations": [_node_name(s) for _, s in pairs], "labels": {str(k): v for k, v in names.items()}}
                return {"pairs": files, "names": names}, info
            folder = chosen_path(p.data_folder).resolve()
            files = [(image, label) for _, image, label in folder_pairs(folder)[0]]
            return {"pairs": files, "names": {}}, {"data": str(folder), "volumes": []}
        if p.task == CLASSIFICATION:
            if p.data_source == "volumes":
                nodes = _present(p.training_volumes)
                table = self.export_classified_volumes(nodes, data_folder)
                info = {"data": str(data_folder), "volumes": [_node_name(node) for node in nodes],
                        "classes": [volume_class_name(node) for node in nodes]}
                return {"table": table}, info
            table = chosen_path(p.table_path).resolve()
            return {"table": table}, {"data": str(table), "volumes": []}
        if p.data_source == "volumes":
            nodes = _present(p.training_volumes)
            self.export_volumes(nodes, data_folder)
            return data_folder, {"data": str(data_folder), "volumes": [_node_name(node) for node in nodes]}
        folder = chosen_path(p.data_folder).resolve()
        return folder, {"data": str(folder), "volumes": []}

    # -- starting ----------------------------------------------------------------------------

    def start(self, parameters: Any) -> "Job":
        """Check the parameters, prepare the run folder (exporting loaded data) and start the
        training job. Raises `LCTfoundError` with the first problem."""
        p = self.parameters_from(parameters)
        if self.state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        problem = self.first_problem(p)
        if problem:
            raise LCTfoundError(problem)
        name = p.new_model_name.strip()
        run = chosen_path(p.run_folder) or self.new_run_folder(name)
        created = not run.exists()
        run.mkdir(parents=True, exist_ok=True)
        try:
            data, data_info = self.prepare_data(p, run)
            args = self.command(p, data, self.output_folder(run, p.task))
            info = {"task": p.task, "args": args, "new_model_name": name, "device": p.device,
                    "data_source": p.data_source, **data_info,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "registered_model": ""}
            if p.task in FINETUNE_TASKS:
                info.update(backbone_model=p.backbone_model, mode=effective_mode(p))
            write_text_file(run / JOB_FILE, json.dumps(info, indent=2))
        except BaseException:
            if created:
                shutil.rmtree(run, ignore_errors=True)
            raise
        return self._launch(run, info, args, f"{p.task}: starting")

    def resume(self, run_folder: Path | str) -> "Job":
        """Continue a cancelled or crashed run from its newest checkpoint (the same command,
        settings and device; the same data, which must be unchanged)."""
        problem = self.resume_problem(run_folder)
        if problem:
            raise LCTfoundError(problem)
        run = Path(chosen_path(run_folder))
        info = json.loads((run / JOB_FILE).read_text())
        output = self.output_folder(run, info.get("task", PRETRAIN))
        steps = checkpoint_steps(output)
        job = self._launch(run, info, [*info["args"], "--resume"], f"resuming from step {steps[-1]}")
        self.loss_history = read_loss_history(output, up_to_step=steps[-1])
        self.last_checkpoint_step = steps[-1]
        return job

    def _launch(self, run: Path, info: dict[str, Any], args: list[str], message: str) -> "Job":
        job = self.start_job(args, device=info.get("device"), message=message, cwd=run)
        self.run_folder = run
        self._job_info = info
        self.loss_history = []
        self.last_checkpoint_step = None
        self.warnings = []
        self.registered_model = None
        logger.info("training started in %s", run)
        return job

    # -- following the job -------------------------------------------------------------------

    def handle_event(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        at = event.get("received_at")
        if kind == "start":
            data = event.get("data") or (f"{event['items']} slices" if "items" in event else "the data")
            self.report_progress(self._done, int(event.get("total_steps", 0)),
                                 f"training on {data} ({event.get('device', '?')})", at, rate_sample=False)
        elif kind == "resumed":
            self.report_progress(int(event.get("step", 0)), self._total, f"resumed at step {event.get('step')}", at,
                                 rate_sample=False)
        elif kind == "metrics":
            step, total, loss = int(event["step"]), int(event.get("total_steps") or self._total), float(event["loss"])
            self.loss_history.append((step, loss))
            self.report_progress(step, total, f"step {step}/{total}, loss {loss:.4f}", at)
        elif kind == "checkpoint":
            self.last_checkpoint_step = int(event["step"])
        elif kind == "warning":
            self.warnings.append(str(event.get("message", "")))
            logger.warning("training: %s", event.get("message"))
        elif kind == "log":
            logger.info("training: %s", event.get("text"))

    def on_job_finished(self, job: "Job") -> str:
        from ..models.registry import register_model

        name = self._job_info.get("new_model_name", "")
        task = self._job_info.get("task", PRETRAIN)
        output = self.output_folder(self.run_folder, task)
        try:
            target = register_model(output / "model", name)
        except LCTfoundError as error:
            raise LCTfoundError(f"{error} (the trained model is in {output / 'model'})") from None
        self.registered_model = target
        self._job_info["registered_model"] = str(target)
        write_text_file(self.run_folder / JOB_FILE, json.dumps(self._job_info, indent=2))
        self.refresh()  # the new model shows up in the model selectors
        loss = f", loss {self.loss_history[-1][1]:.4f}" if self.loss_history else ""
        what = f"{FINETUNE_TASKS[task]} model" if task in FINETUNE_TASKS else "model"
        return f"{what} '{name}' registered ({self._done} steps{loss})"

    def cancelled_message(self, job: "Job") -> str:
        output = self.output_folder(self.run_folder, self._job_info.get("task", PRETRAIN))
        steps = checkpoint_steps(output)
        if steps:
            return f"checkpoint of step {steps[-1]} kept; Resume continues from it"
        return "no checkpoint had been written yet"


# ---------------------------------------------------------------------------------------------
# Helpers that read files or MRML (imported lazily: this module loads when Slicer starts)
# ---------------------------------------------------------------------------------------------


def read_case_table(path: Path) -> tuple[list[dict[str, str]], str]:
    """Rows (image, label; stripped) of a classification CSV, or ``([], problem)``."""
    from ..training.tables import read_case_table as read_table  # the same reader the command line uses

    try:
        return read_table(path, ("image", "label")), ""
    except LCTfoundError as error:
        return [], str(error)


def _terminology_tag() -> str:
    from ..mrml._compat import slicer

    return slicer.vtkSegment.GetTerminologyEntryTagName()


def _volume_signature(volume: Any) -> tuple:
    image = volume.GetImageData()
    return (volume.GetID(), volume.GetMTime(), image.GetMTime() if image is not None else 0)


def _segmentation_signature(segmentation: Any) -> tuple:
    """Changes whenever a segment is added, removed, renamed, re-tagged or painted."""
    from ..mrml._compat import slicer

    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    content = segmentation.GetSegmentation()
    items: list[Any] = [segmentation.GetID(), segmentation.GetMTime(), content.GetMTime()]
    for number in range(content.GetNumberOfSegments()):
        segment = content.GetNthSegment(number)
        data = segment.GetRepresentation(representation)
        items.append((content.GetNthSegmentID(number), segment.GetName(), segment.GetMTime(),
                      data.GetMTime() if data is not None else 0))
    return tuple(items)


def segmentation_grid_problem(volume: Any, segmentation: Any) -> str:
    """Why ``segmentation`` (its reference image geometry) does not lie on the voxel grid of
    ``volume``, or '' (also when the segmentation stores no geometry: it is resampled then)."""
    import numpy as np

    from ..mrml._compat import slicer, vtk
    from ..mrml.volumes import array_from_vtk_matrix, ijk_to_ras_of, parent_transform_matrix

    converter = slicer.vtkSegmentationConverter
    text = segmentation.GetSegmentation().GetConversionParameter(converter.GetReferenceImageGeometryParameterName())
    if not text:
        return ""
    geometry = slicer.vtkOrientedImageData()
    converter.DeserializeImageGeometry(text, geometry)
    extent = geometry.GetExtent()
    seg_size = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    matrix = vtk.vtkMatrix4x4()
    geometry.GetImageToWorldMatrix(matrix)
    seg_matrix = array_from_vtk_matrix(matrix)
    seg_origin = seg_matrix @ np.array([extent[0], extent[2], extent[4], 1.0])
    volume_size = tuple(volume.GetImageData().GetDimensions())
    volume_matrix = ijk_to_ras_of(volume)
    to_world = parent_transform_matrix(volume)
    if to_world is not None:
        volume_matrix = to_world @ volume_matrix
    seg_to_world = parent_transform_matrix(segmentation)
    if seg_to_world is not None:
        volume_matrix = np.linalg.inv(seg_to_world) @ volume_matrix
    names = f"Segmentation '{_node_name(segmentation)}' does not lie on the voxel grid of volume '{_node_name(volume)}'"
    if seg_size != volume_size:
        return (f"{names} (size {'×'.join(map(str, seg_size))} vs {'×'.join(map(str, volume_size))}); "
                "pair it with the volume it was drawn on, or resample it onto this volume.")
    if not (np.allclose(seg_matrix[:3, :3], volume_matrix[:3, :3], atol=_GRID_TOLERANCE_MM)
            and np.allclose(seg_origin[:3], volume_matrix[:3, 3], atol=_GRID_TOLERANCE_MM)):
        return f"{names} (other spacing, origin or orientation); pair it with the volume it was drawn on."
    return ""

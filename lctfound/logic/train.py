"""Qt-free logic of the LCTfoundTrain module: pretrain an LCTfound model on the user's CTs.

Training runs as a job (`lctfound.jobs`): ``lctfound train pretrain DATA -o RUN/pretrain ...
--events`` in a child process. `TrainModuleLogic.poll()` turns its events into progress
(step/total, loss, ETA) and a loss history; when the job finishes, the model is registered
under the new name, so every module's model selector lists it. Cancel ends the process tree;
the newest checkpoint stays, and `resume()` continues from it.

A run folder (default ``<cache>/runs/<name>-<timestamp>``) holds::

    job.json     what was started (command arguments, new model name, device, data)
    data/        the loaded volumes, exported as NRRD (when the data source is "volumes")
    pretrain/    the command's output: metrics.csv, loss_curve.png, samples/, model/, checkpoints/

Fine-tuning tasks come with the segmentation module; until then "pretrain" is the only task.
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

from ..errors import LCTfoundError
from .base import AUTO_DEVICE, ButtonState, Choice, ModuleLogicBase, RunState, _snake_case

if TYPE_CHECKING:
    from ..jobs import Job

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"
DATA_FOLDER = "data"
CHECKPOINT_PREFIX = "step-"

TASKS = (
    Choice("pretrain", "Pretrain (diffusion, unlabelled CTs)",
           "Train the diffusion backbone on your own CT volumes; no annotations needed."),
)
DATA_SOURCES = (
    Choice("folder", "Folder of CT files", "Every CT volume under a folder (NIfTI, NRRD, MHA, DICOM series, .npy slices)."),
    Choice("volumes", "Loaded volumes", "Volumes loaded in this scene; they are exported to the run folder first."),
)
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


@dataclass
class TrainParameters:
    """What one training run needs. Paths may be ``str`` or ``Path``; ``""`` or ``"."`` means
    "not chosen". ``patch_size`` 0 trains on whole slices; ``ema_decay`` 0 keeps no EMA."""

    data_source: str = "folder"
    data_folder: Any = ""
    training_volumes: Sequence[Any] = field(default_factory=list)
    task: str = "pretrain"
    preset: str = "cpu-tiny"
    resolution: int = 256
    patch_size: int = 128
    batch_size: int = 8
    max_steps: int = 2000
    learning_rate: float = 2e-4
    checkpoint_every: int = 200
    ema_decay: float = 0.995
    device: str = AUTO_DEVICE
    run_folder: Any = ""
    new_model_name: str = ""
    #: Not on the panel: sample images per window at each checkpoint, and steps between metric events.
    num_samples: int = 4
    log_every: int = 10


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


def _node_name(node: Any) -> str:
    get_name = getattr(node, "GetName", None)
    return str(get_name()) if callable(get_name) else str(node)


class TrainModuleLogic(ModuleLogicBase):
    """Start, follow, cancel and resume training runs; see the module docstring."""

    task_name = "training"
    parameters_class = TrainParameters

    def __init__(self, *, runs_root: Optional[Path | str] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._runs_root = Path(runs_root) if runs_root is not None else None
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

    # -- choices -----------------------------------------------------------------------------

    def choices(self, parameter_name: str, refresh: bool = False) -> list[Choice]:
        name = _snake_case(parameter_name)
        fixed = {"task": TASKS, "data_source": DATA_SOURCES, "preset": PRESETS}
        if name in fixed:
            return list(fixed[name])
        return super().choices(parameter_name, refresh)

    # -- folders and names -------------------------------------------------------------------

    def runs_root(self) -> Path:
        if self._runs_root is not None:
            return self._runs_root
        from ..paths import cache_root

        return cache_root() / "runs"

    def new_run_folder(self, name: str) -> Path:
        """A folder that does not exist yet: ``<runs>/<name>-<YYYYmmdd-HHMMSS>[-N]``."""
        base = self.runs_root() / f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, number = base, 1
        while folder.exists():
            number += 1
            folder = base.with_name(f"{base.name}-{number}")
        return folder

    @staticmethod
    def output_folder(run_folder: Path | str, task: str = "pretrain") -> Path:
        """Where the training command writes (metrics.csv, loss_curve.png, model/, checkpoints/)."""
        return Path(run_folder) / task

    def loss_curve_png(self, run_folder: Optional[Path | str] = None) -> Optional[Path]:
        """The loss-curve image of a run (default: the current one), once the first checkpoint wrote it."""
        folder = chosen_path(run_folder) or self.run_folder
        if folder is None:
            return None
        path = self.output_folder(folder) / "loss_curve.png"
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
        parameters = self.parameters_from(parameters)
        defaults = super().default_values(parameters)
        if not parameters.new_model_name:
            defaults["new_model_name"] = self.suggest_model_name()
        return defaults

    def check_data(self, parameters: TrainParameters) -> str:
        if parameters.data_source == "folder":
            folder = chosen_path(parameters.data_folder)
            if folder is None:
                return "Choose the folder with the training CT volumes."
            if not folder.is_dir():
                return f"Training data folder not found: {folder}"
            return ""
        if parameters.data_source == "volumes":
            volumes = [node for node in (parameters.training_volumes or []) if node is not None]
            if not volumes:
                return "Select the loaded volumes to train on."
            for node in volumes:
                get_image_data = getattr(node, "GetImageData", None)
                if callable(get_image_data) and get_image_data() is None:
                    return f"Volume '{_node_name(node)}' has no image data."
            return ""
        return f"Unknown data source '{parameters.data_source}'; choose 'folder' or 'volumes'."

    def check_hyperparameters(self, p: TrainParameters) -> list[str]:
        problems = []
        if p.preset not in {choice.value for choice in PRESETS}:
            problems.append(f"Unknown preset '{p.preset}'; choose one of: {', '.join(c.value for c in PRESETS)}.")
        if p.resolution < 16 or p.resolution % 16:
            problems.append(f"Resolution must be a multiple of 16 (got {p.resolution}).")
        if p.patch_size and (p.patch_size % 16 or not 16 <= p.patch_size <= p.resolution):
            problems.append(f"Patch size must be 0 (whole slices) or a multiple of 16 up to the resolution (got {p.patch_size}).")
        for label, value in (("Batch size", p.batch_size), ("Steps", p.max_steps),
                             ("Checkpoint interval", p.checkpoint_every)):
            if value < 1:
                problems.append(f"{label} must be at least 1 (got {value}).")
        if not (p.learning_rate > 0 and math.isfinite(p.learning_rate)):
            problems.append(f"Learning rate must be positive (got {p.learning_rate}).")
        if not 0 <= p.ema_decay < 1:
            problems.append(f"EMA decay must lie in [0, 1), 0 for no EMA (got {p.ema_decay}).")
        return problems

    def parameter_problems(self, parameters: Any) -> list[str]:
        p = self.parameters_from(parameters)
        problems = []
        if p.task not in {choice.value for choice in TASKS}:
            problems.append(f"Task '{p.task}' is not available; choose one of: {', '.join(c.value for c in TASKS)}.")
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
        if not checkpoint_steps(self.output_folder(folder, info.get("task", "pretrain"))):
            return "Nothing to resume: the run stopped before its first checkpoint."
        return self.check_new_model_name(info.get("new_model_name", ""))

    def resume_button_state(self, parameters: Any = None) -> ButtonState:
        target = self.resume_target(parameters)
        problem = self.resume_problem(target)
        return ButtonState(not problem, problem or f"Continue {target} from its newest checkpoint")

    # -- starting ----------------------------------------------------------------------------

    def command(self, parameters: TrainParameters, data_folder: Path, output: Path) -> list[str]:
        """The ``lctfound`` arguments of a run (``--resume`` is added by `resume()`)."""
        p = parameters
        args = ["train", p.task, str(data_folder), "--output", str(output),
                "--preset", p.preset, "--resolution", str(p.resolution), "--batch-size", str(p.batch_size),
                "--max-steps", str(p.max_steps), "--lr", repr(float(p.learning_rate)),
                "--checkpoint-every", str(p.checkpoint_every), "--num-samples", str(p.num_samples),
                "--log-every", str(p.log_every), "--name", p.new_model_name.strip()]
        if p.patch_size:
            args += ["--patch-size", str(p.patch_size)]
        if p.ema_decay:
            args += ["--ema", repr(float(p.ema_decay))]
        return args + ["--events"]

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

    def start(self, parameters: Any) -> "Job":
        """Check the parameters, prepare the run folder (exporting loaded volumes) and start
        the training job. Raises `LCTfoundError` with the first problem."""
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
            volumes: list[str] = []
            if p.data_source == "volumes":
                data = run / DATA_FOLDER
                nodes = [node for node in p.training_volumes if node is not None]
                self.export_volumes(nodes, data)
                volumes = [_node_name(node) for node in nodes]
            else:
                data = chosen_path(p.data_folder).resolve()
            args = self.command(p, data, self.output_folder(run, p.task))
            info = {"task": p.task, "args": args, "new_model_name": name, "device": p.device,
                    "data_source": p.data_source, "data": str(data), "volumes": volumes,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "registered_model": ""}
            (run / JOB_FILE).write_text(json.dumps(info, indent=2))
        except BaseException:
            if created:
                shutil.rmtree(run, ignore_errors=True)
            raise
        return self._launch(run, info, args, f"{p.task}: starting")

    def resume(self, run_folder: Path | str) -> "Job":
        """Continue a cancelled or crashed run from its newest checkpoint (same settings and
        device; the same data, which must be unchanged)."""
        problem = self.resume_problem(run_folder)
        if problem:
            raise LCTfoundError(problem)
        run = Path(chosen_path(run_folder))
        info = json.loads((run / JOB_FILE).read_text())
        output = self.output_folder(run, info.get("task", "pretrain"))
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
            self.report_progress(self._done, int(event.get("total_steps", 0)),
                                 f"training on {event.get('data', 'the data')} ({event.get('device', '?')})", at,
                                 rate_sample=False)
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
        output = self.output_folder(self.run_folder, self._job_info.get("task", "pretrain"))
        try:
            target = register_model(output / "model", name)
        except LCTfoundError as error:
            raise LCTfoundError(f"{error} (the trained model is in {output / 'model'})") from None
        self.registered_model = target
        self._job_info["registered_model"] = str(target)
        (self.run_folder / JOB_FILE).write_text(json.dumps(self._job_info, indent=2))
        self.refresh()  # the new model shows up in the model selectors
        loss = f", loss {self.loss_history[-1][1]:.4f}" if self.loss_history else ""
        return f"model '{name}' registered ({self._done} steps{loss})"

    def cancelled_message(self, job: "Job") -> str:
        output = self.output_folder(self.run_folder, self._job_info.get("task", "pretrain"))
        steps = checkpoint_steps(output)
        if steps:
            return f"checkpoint of step {steps[-1]} kept; Resume continues from it"
        return "no checkpoint had been written yet"

"""Qt-free logic shared by the LCTfound modules (segmentation, enhance, train).

`ModuleLogicBase` is what a Slicer module Logic, a web panel or a script holds on to. It knows

* which **devices** can run a model (``auto`` plus `lctfound.devices.available_devices()`),
* which **models** are installed (`lctfound.models.registry.list_models()`),
* what is wrong with the current **parameters** (one line per problem, most important first),
* the **run state** of the module's long work, which runs as a `lctfound.jobs.Job` (a child
  process): Idle → Running → Finished / Cancelling → Cancelled / Failed, with progress
  numbers, an ETA and a status line. Front ends call `poll()` from a timer; nothing blocks.

Nothing here imports Qt, Slicer, VTK or torch at import time. Parameters may hold MRML nodes:
they are only duck-typed (``GetImageData``), never imported here.

Naming: the engine uses snake_case; Slicer parameter nodes use camelCase. `parameters_from()`
and `fill_defaults()` accept either spelling on the object they read or write.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence

from ..errors import LCTfoundError
from .server import ServerConnection, connect, normalized_url

if TYPE_CHECKING:
    from ..jobs import Job

logger = logging.getLogger(__name__)

#: Dynamic Qt property naming the parameter of a ``QComboBox`` whose items the widget fills from
#: `ModuleLogicBase.choices()`. Such combo boxes cannot use ``SlicerParameterName``: Slicer's
#: parameter-node GUI connector for ``QComboBox`` needs a fixed ``Choice([...])`` list, while
#: installed models and devices are only known at run time.
CHOICE_PROPERTY_NAME = "LCTfoundChoiceParameterName"

#: Dynamic Qt property naming the ``list[vtkMRML...Node]`` parameter of a
#: ``qMRMLCheckableNodeComboBox``; Slicer has no GUI connector for node lists, so the widget
#: syncs the checked nodes by hand.
NODE_LIST_PROPERTY_NAME = "LCTfoundNodeListParameterName"

#: The device value that lets the engine pick the best available device.
AUTO_DEVICE = "auto"

_DEVICE_KINDS = ("cpu", "cuda", "mps")
_MODEL_SOURCE_LABELS = {"embedded": "built-in", "user": "user", "official": "official", "folder": "folder"}


# ---------------------------------------------------------------------------------------------
# Run state
# ---------------------------------------------------------------------------------------------


class RunState(str, enum.Enum):
    """Where a module's long work stands. The value is the word shown to users."""

    IDLE = "Idle"
    RUNNING = "Running"
    FINISHED = "Finished"
    CANCELLING = "Cancelling"
    CANCELLED = "Cancelled"
    FAILED = "Failed"

    @property
    def busy(self) -> bool:
        """Work is under way (a new run cannot start)."""
        return self in (RunState.RUNNING, RunState.CANCELLING)

    @property
    def ended(self) -> bool:
        """The last run is over, successfully or not."""
        return self in (RunState.FINISHED, RunState.CANCELLED, RunState.FAILED)


#: Allowed state changes. Every state that is not busy may start a new run or go back to Idle.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.IDLE: frozenset({RunState.RUNNING, RunState.IDLE}),
    RunState.RUNNING: frozenset({RunState.FINISHED, RunState.CANCELLING, RunState.CANCELLED, RunState.FAILED}),
    # Work may still complete (or fail) before the cancel reaches it.
    RunState.CANCELLING: frozenset({RunState.CANCELLED, RunState.FINISHED, RunState.FAILED}),
    RunState.FINISHED: frozenset({RunState.RUNNING, RunState.IDLE}),
    RunState.CANCELLED: frozenset({RunState.RUNNING, RunState.IDLE}),
    RunState.FAILED: frozenset({RunState.RUNNING, RunState.IDLE}),
}


class InvalidTransition(RuntimeError):
    """A programming error: the run state cannot change that way (for example Idle → Finished)."""


def format_seconds(seconds: float) -> str:
    """``4.0 s``, ``1 min 05 s``, ``2 h 03 min``."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True)
class ModuleStatus:
    """An immutable snapshot of a module's run state."""

    state: RunState = RunState.IDLE
    message: str = ""
    done: int = 0
    total: int = 0
    error: str = ""
    elapsed_s: Optional[float] = None
    #: Estimated seconds left, from the rate of progress reports so far (None: unknown).
    eta_s: Optional[float] = None

    @property
    def busy(self) -> bool:
        return self.state.busy

    @property
    def fraction(self) -> Optional[float]:
        """Progress in [0, 1], or None while the amount of work is unknown."""
        if self.total <= 0:
            return None
        return min(max(self.done / self.total, 0.0), 1.0)

    @property
    def percent(self) -> Optional[int]:
        fraction = self.fraction
        return None if fraction is None else int(round(100 * fraction))

    def summary(self) -> str:
        """One line for a status label, e.g. ``Running: loss 0.1234 (3/10, 30%, about 1 min 05 s left)``."""
        state = self.state
        if state is RunState.IDLE:
            return "Idle" + (f": {self.message}" if self.message else "")
        if state.busy:
            text = state.value + (f": {self.message}" if self.message else "")
            if self.total > 0:
                eta = f", about {format_seconds(self.eta_s)} left" if self.eta_s is not None and state is RunState.RUNNING else ""
                text += f" ({self.done}/{self.total}, {self.percent}%{eta})"
            return text
        took = f" after {format_seconds(self.elapsed_s)}" if self.elapsed_s is not None else ""
        if state is RunState.FAILED:
            return f"Failed{took}: {self.error or self.message or 'unknown error'}"
        if state is RunState.CANCELLED:
            return f"Cancelled{took}" + (f": {self.message}" if self.message else "")
        took = f" in {format_seconds(self.elapsed_s)}" if self.elapsed_s is not None else ""
        return f"Finished{took}" + (f": {self.message}" if self.message else "")


# ---------------------------------------------------------------------------------------------
# Front-end helpers
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """One entry of a selector: the stored value, the text shown, and a tooltip."""

    value: str
    label: str
    tooltip: str = ""


@dataclass(frozen=True)
class ButtonState:
    """Whether a button can be clicked, and the tooltip that says why (not)."""

    enabled: bool
    tooltip: str = ""


@dataclass(frozen=True)
class ProgressBarState:
    """What the progress bar shows; ``maximum == 0`` means "busy, amount unknown" (Qt's convention)."""

    visible: bool
    value: int = 0
    maximum: int = 100
    text: str = ""


@dataclass
class ModuleParameters:
    """The parameters of the image modules. ``input_volume`` is a volume node, a CTVolume or a file path."""

    input_volume: Any = None
    model_name: str = ""
    device: str = AUTO_DEVICE
    #: "Run on": empty = this computer, else an `lctfound serve` address (see `lctfound.logic.server`).
    server_url: str = ""
    #: File holding the server's access token; empty = ``$LCTFOUND_SERVER_TOKEN``.
    server_token_file: str = ""


def _camel_case(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


_MISSING = object()


def _read_attribute(source: Any, name: str) -> Any:
    """Read ``name`` (snake_case) from a mapping or object, also trying the camelCase spelling."""
    for candidate in (name, _camel_case(name)):
        if isinstance(source, dict):
            if candidate in source:
                return source[candidate]
        else:
            try:
                return getattr(source, candidate)
            except AttributeError:
                continue
    return _MISSING


def device_environment(device: Optional[str]) -> dict[str, str]:
    """Environment variables that make a child process use ``device``: ``cpu`` hides the GPUs
    (``CUDA_VISIBLE_DEVICES=-1``), ``cuda:N`` shows only GPU N; ``auto`` changes nothing."""
    choice = (device or AUTO_DEVICE).strip().lower()
    if choice == "cpu":
        return {"CUDA_VISIBLE_DEVICES": "-1"}
    if choice.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": choice.partition(":")[2]}
    return {}


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------


class ModuleLogicBase:
    """Devices, models, parameter checks and the job-driven run state of one LCTfound module.

    Collaborators can be injected (tests, web panels with their own registry):

    * ``list_models(extra_folders=...)`` → list of model entries (default:
      `lctfound.models.registry.list_models`),
    * ``available_devices()`` → device names, best first (default: `lctfound.devices.available_devices`),
    * ``clock()`` → seconds (default: `time.monotonic`, the clock of job event timestamps),
    * ``python`` → the interpreter that runs jobs (default: this one; in Slicer ``PythonSlicer``).
    """

    #: Shown in messages ("training is already running").
    task_name = "processing"
    #: The dataclass that holds this module's parameters (with ``server_url`` and ``server_token_file``).
    parameters_class: type = ModuleParameters
    #: Server tasks (`server_tasks` names) this logic can send to a server as jobs.
    server_jobs: frozenset = frozenset()

    def __init__(
        self,
        *,
        list_models: Optional[Callable[..., Sequence[Any]]] = None,
        available_devices: Optional[Callable[[], Sequence[str]]] = None,
        extra_model_folders: Iterable[os.PathLike | str] = (),
        clock: Callable[[], float] = time.monotonic,
        python: Optional[os.PathLike | str] = None,
        runs_root: Optional[os.PathLike | str] = None,
        list_task_models: Optional[Callable[..., Sequence[Any]]] = None,
    ) -> None:
        self._list_models = list_models
        self._available_devices = available_devices
        self.extra_model_folders: tuple[Path, ...] = tuple(Path(folder) for folder in extra_model_folders)
        self._clock = clock
        self.python = python
        self._runs_root = Path(runs_root) if runs_root is not None else None
        self._list_task_models = list_task_models
        self._task_models: Optional[list[Any]] = None

        self._state = RunState.IDLE
        self._message = ""
        self._done = 0
        self._total = 0
        self._error = ""
        self._started_at: Optional[float] = None
        self._ended_at: Optional[float] = None
        self._rate_anchor: Optional[tuple[float, int]] = None
        self._eta_s: Optional[float] = None
        #: The job of the current (or last) run.
        self.job: Optional["Job"] = None
        #: Called with the job's command-line arguments before any job starts; it raises to stop the
        #: start. Slicer sets it to the dependency installer (LCTfoundSlicerLib.dependencies.
        #: ensureDependencies: a ``--server`` job needs the thin client only); web, command line and
        #: tests leave it None.
        self.before_job: Optional[Callable[[Sequence[str]], None]] = None
        self._cancel_thread: Optional[threading.Thread] = None

        self._models: Optional[list[Any]] = None
        self._devices: Optional[list[str]] = None
        #: Why models could not be listed (empty when listing worked).
        self.models_error = ""
        #: Why devices could not be listed, e.g. PyTorch missing (empty when listing worked).
        self.devices_error = ""
        #: The server reached by the last "Test connection" (None: not tested, or it failed).
        self.server: Optional[ServerConnection] = None

    # -- devices ----------------------------------------------------------------------------

    def devices(self, refresh: bool = False) -> list[str]:
        """Usable device names, best first (cached; ``refresh=True`` asks again)."""
        if self._devices is None or refresh:
            lister = self._available_devices
            if lister is None:
                from ..devices import available_devices as lister
            try:
                self._devices = [str(name) for name in lister()]
                self.devices_error = ""
            except ImportError as error:
                self._devices = []
                self.devices_error = (
                    f"PyTorch is not available ({error}); install it with the PyTorch extension "
                    "(module 'PyTorch Utils') or pip"
                )
                logger.warning("cannot list devices: %s", self.devices_error)
        return list(self._devices)

    def device_choices(self, refresh: bool = False) -> list[Choice]:
        """``auto`` first, then every available device; CPU is always offered."""
        devices = self.devices(refresh)
        if self.devices_error:
            return [
                Choice(AUTO_DEVICE, "Automatic", self.devices_error),
                Choice("cpu", "CPU", self.devices_error),
            ]
        best = devices[0] if devices else "cpu"
        choices = [Choice(AUTO_DEVICE, f"Automatic ({best})", "Use the fastest device available here")]
        for name in devices:
            choices.append(Choice(name, self._device_label(name), self._device_tooltip(name)))
        if "cpu" not in devices:
            choices.append(Choice("cpu", "CPU", self._device_tooltip("cpu")))
        return choices

    @staticmethod
    def _device_label(name: str) -> str:
        if name == "cpu":
            return "CPU"
        if name == "mps":
            return "Apple GPU (mps)"
        if name.startswith("cuda"):
            index = name.partition(":")[2] or "0"
            return f"NVIDIA GPU {index} ({name})"
        return name

    @staticmethod
    def _device_tooltip(name: str) -> str:
        if name == "cpu":
            return "Runs everywhere; much slower than a GPU on full-size volumes"
        return f"Run on {name}"

    def check_device(self, device: Optional[str]) -> str:
        """Why ``device`` cannot be used here, or an empty string."""
        choice = (device or AUTO_DEVICE).strip().lower()
        devices = self.devices()
        if self.devices_error:
            return self.devices_error
        if choice == AUTO_DEVICE:
            return ""
        kind = choice.split(":")[0]
        if kind not in _DEVICE_KINDS:
            return f"Unknown device '{choice}'; choose one of: {', '.join([AUTO_DEVICE, *devices])}."
        if choice == "cpu" or choice in devices:
            return ""
        if choice == "cuda:0" and "cuda" in devices:
            return ""
        return f"Device '{choice}' is not available on this computer (available: {', '.join(devices) or 'none'})."

    def device_label(self, device: Optional[str]) -> str:
        """The selector text of ``device`` ("Automatic (cpu)", "CPU", ...)."""
        value = (device or AUTO_DEVICE).strip().lower()
        for choice in self.device_choices():
            if choice.value == value:
                return choice.label
        return value

    # -- models -----------------------------------------------------------------------------

    def models(self, refresh: bool = False) -> list[Any]:
        """Installed models this module can use (cached; ``refresh=True`` scans again).

        Entries have ``name``, ``path``, ``source``, ``preset`` and ``description`` (as
        `lctfound.models.registry.ModelEntry`). A failing registry does not raise here (a widget
        must still open): the list is empty and `models_error` says why.
        """
        if self._models is None or refresh:
            lister = self._list_models
            try:
                if lister is None:
                    lister = importlib.import_module("lctfound.models.registry").list_models
                entries = list(lister(extra_folders=self.extra_model_folders))
                self.models_error = ""
            except Exception as error:  # noqa: BLE001 - shown to the user, logged with traceback
                logger.warning("cannot list models", exc_info=True)
                entries = []
                self.models_error = str(error) if isinstance(error, LCTfoundError) else f"{type(error).__name__}: {error}"
            self._models = entries
        return list(self._models)

    def find_model(self, name: Optional[str]) -> Optional[Any]:
        for entry in self.models():
            if entry.name == name:
                return entry
        return None

    def default_model_name(self) -> str:
        """The first model of the registry's order (it lists the embedded default first)."""
        models = self.models()
        return models[0].name if models else ""

    def model_choices(self, refresh: bool = False) -> list[Choice]:
        choices: list[Choice] = []
        seen: set[str] = set()
        for entry in self.models(refresh):
            if entry.name in seen:
                continue
            seen.add(entry.name)
            source = _MODEL_SOURCE_LABELS.get(entry.source, entry.source)
            tooltip = "\n".join(part for part in (entry.description, f"Preset: {entry.preset}" if entry.preset else "", str(entry.path)) if part)
            choices.append(Choice(entry.name, f"{entry.name} ({source})", tooltip))
        return choices

    def check_model(self, name: Optional[str]) -> str:
        """Why the model called ``name`` cannot be used, or an empty string."""
        models = self.models()
        if not name:
            if self.models_error:
                return f"No model could be listed: {self.models_error}"
            if not models:
                return (
                    "No LCTfound model is installed: import the weights "
                    "(command line: lctfound model import) or add a model folder."
                )
            return "Select a model."
        entry = self.find_model(name)
        if entry is None:
            return f"Model '{name}' is not installed here."
        path = Path(entry.path)
        if not path.exists():
            return f"The files of model '{name}' are missing: {path}"
        return ""

    # -- choices for selectors ---------------------------------------------------------------

    def choices(self, parameter_name: str, refresh: bool = False) -> list[Choice]:
        """Items of the selector bound to ``parameter_name`` (``modelName``/``model_name``, ``device``)."""
        name = _snake_case(parameter_name)
        if name == "model_name":
            return self.model_choices(refresh)
        if name == "device":
            return self.device_choices(refresh)
        raise KeyError(f"{type(self).__name__} has no choices for parameter {parameter_name!r}")

    def refresh(self) -> None:
        """Forget cached models and devices (after importing a model, plugging a GPU, …)."""
        self._models = None
        self._devices = None
        self._task_models = None

    def task_models(self, refresh: bool = False) -> list[Any]:
        """Installed task models (`lctfound.models.task_models.list_task_models` entries with ``name``,
        ``path``, ``task``, ``backbone``, ``description``); cached, ``refresh=True`` scans again."""
        if self._task_models is None or refresh:
            lister = self._list_task_models
            if lister is None:
                from ..models.task_models import list_task_models as lister
            try:
                self._task_models = list(lister(extra_folders=self.extra_model_folders))
            except LCTfoundError as error:
                logger.warning("cannot list task models: %s", error)
                self._task_models = []
        return list(self._task_models)

    # -- parameters --------------------------------------------------------------------------

    def parameters_from(self, source: Any) -> Any:
        """Build this module's parameters dataclass from a mapping, a dataclass or a Slicer
        parameter node (camelCase attributes such as ``inputVolume``)."""
        if isinstance(source, self.parameters_class):
            return source
        values = {}
        for field in dataclasses.fields(self.parameters_class):
            value = _read_attribute(source, field.name)
            if value is not _MISSING:
                values[field.name] = value
        return self.parameters_class(**values)

    def default_values(self, parameters: Any) -> dict[str, Any]:
        """Values (snake_case names) that should replace empty parameters."""
        parameters = self.parameters_from(parameters)
        defaults: dict[str, Any] = {}
        if hasattr(parameters, "model_name") and not parameters.model_name:
            name = self.default_model_name()
            if name:
                defaults["model_name"] = name
        if not parameters.device:
            defaults["device"] = AUTO_DEVICE
        return defaults

    def fill_defaults(self, target: Any) -> dict[str, Any]:
        """Write `default_values()` into ``target`` (a dataclass, dict or parameter node) in the
        spelling it uses; returns what was set."""
        defaults = self.default_values(target)
        for name, value in defaults.items():
            if isinstance(target, dict):
                key = _camel_case(name) if _camel_case(name) in target and name not in target else name
                target[key] = value
            elif dataclasses.is_dataclass(target) or hasattr(target, name):
                setattr(target, name, value)
            else:
                setattr(target, _camel_case(name), value)
        return defaults

    def check_input_volume(self, volume: Any) -> str:
        """Why ``volume`` cannot be used as input, or an empty string."""
        if volume is None or (isinstance(volume, str) and not volume.strip()):
            return "Select an input volume."
        if isinstance(volume, (str, os.PathLike)):
            if not Path(volume).expanduser().exists():
                return f"Input file not found: {volume}"
            return ""
        get_image_data = getattr(volume, "GetImageData", None)
        if callable(get_image_data) and get_image_data() is None:
            return "The input volume has no image data."
        return ""

    def parameter_problems(self, parameters: Any) -> list[str]:
        """Every reason why these parameters cannot be used, most important first.
        Subclasses with other parameters replace or extend the list."""
        parameters = self.parameters_from(parameters)
        problems = [
            self.check_input_volume(parameters.input_volume),
            self.check_model(parameters.model_name),
            self.check_device(parameters.device),
        ]
        return [problem for problem in problems if problem]

    def first_problem(self, parameters: Any) -> str:
        """The most important problem of these parameters, or an empty string."""
        problems = self.parameter_problems(parameters)
        return problems[0] if problems else ""

    def selection_summary(self, parameters: Any) -> str:
        """A status line for the current selection: its first problem, or the chosen model
        (with its source and preset) and the device."""
        parameters = self.parameters_from(parameters)
        problem = self.first_problem(parameters)
        if problem:
            return problem
        entry = self.find_model(parameters.model_name)
        source = _MODEL_SOURCE_LABELS.get(entry.source, entry.source)
        preset = f", preset {entry.preset}" if entry.preset else ""
        return f"Model {entry.name} ({source}{preset}) on {self.device_label(parameters.device)}."

    # -- run on a server ("Run on") ------------------------------------------------------------

    @staticmethod
    def on_server(parameters: Any) -> bool:
        """Whether "Run on" names a server instead of this computer."""
        value = _read_attribute(parameters, "server_url")
        return bool(normalized_url(value if isinstance(value, str) else ""))

    def connected_server(self, parameters: Any) -> Optional[ServerConnection]:
        """The tested connection to the server ``parameters`` name; None on this computer or untested."""
        p = self.parameters_from(parameters)
        if not self.on_server(p) or self.server is None or not self.server.matches(p.server_url, p.server_token_file):
            return None
        return self.server

    def test_connection(self, parameters: Any) -> str:
        """Reach the server named in ``parameters`` (the "Test connection" button): one line saying what
        it offers; an `LCTfoundError` sentence when it cannot be used. Selectors then list its models."""
        p = self.parameters_from(parameters)
        self.server = None
        self.server = connect(p.server_url, p.server_token_file)
        return self.server.summary

    def server_tasks(self, parameters: Any, action: str = "") -> tuple[str, ...]:
        """The server tasks (names in the server's ``GET /info``) the panel's chosen task needs (for
        ``action``, in panels with several buttons); () when it is no server task. The mapping table of
        each module; a server that adds a task is then used without touching the panels."""
        return ()

    def no_server_task(self, parameters: Any, action: str = "") -> str:
        """The sentence `server_problem` says when `server_tasks` is empty."""
        return (f"{self.task_name[:1].upper()}{self.task_name[1:]} runs on this computer only (it is not a server "
                "task); clear the server address.")

    def server_problem(self, parameters: Any, action: str = "") -> str:
        """Why the chosen server cannot run this panel's job, in one sentence, or '' (also on this computer)."""
        p = self.parameters_from(parameters)
        if not self.on_server(p):
            return ""
        tasks = self.server_tasks(p, action)
        if not tasks:
            return self.no_server_task(p, action)
        unsent = [task for task in tasks if task not in self.server_jobs]
        if unsent:
            return (f"This panel cannot send {', '.join(unsent)} to a server yet; run it on this computer (clear "
                    "the server address).")
        server = self.connected_server(p)
        if server is None:
            return f"Press Test connection to use the server at {normalized_url(p.server_url)}."
        missing = [task for task in tasks if not server.runs(task)]
        if missing:
            return (f"The server at {server.url} does not run {', '.join(missing)}; run this on this computer "
                    "(clear the server address) or ask its administrator.")
        return ""

    # -- run state ---------------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        return self._state

    def status(self) -> ModuleStatus:
        elapsed = None
        if self._started_at is not None:
            end = self._ended_at if self._ended_at is not None else self._clock()
            elapsed = max(end - self._started_at, 0.0)
        eta = self._eta_s if self._state is RunState.RUNNING else None
        return ModuleStatus(self._state, self._message, self._done, self._total, self._error, elapsed, eta)

    def status_summary(self) -> str:
        """One line for a status label (see `ModuleStatus.summary`)."""
        return self.status().summary()

    def progress_bar_state(self) -> ProgressBarState:
        """Visible only while busy; indeterminate (maximum 0) while the amount of work is unknown."""
        status = self.status()
        if not status.busy:
            return ProgressBarState(visible=False, text=status.summary())
        if status.percent is None:
            return ProgressBarState(visible=True, value=0, maximum=0, text=status.message)
        text = f"{status.percent}%"
        if status.eta_s is not None:
            text += f", about {format_seconds(status.eta_s)} left"
        return ProgressBarState(visible=True, value=status.percent, maximum=100, text=text)

    def _transition(self, new_state: RunState, message: Optional[str] = None, error: str = "") -> ModuleStatus:
        if new_state not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"cannot go from {self._state.value} to {new_state.value}")
        self._state = new_state
        if message is not None:
            self._message = message
        if new_state in (RunState.RUNNING, RunState.IDLE):
            self._done, self._total, self._error = 0, 0, ""
            self._rate_anchor, self._eta_s = None, None
            self._started_at = self._clock() if new_state is RunState.RUNNING else None
            self._ended_at = None
        elif new_state.ended:
            self._ended_at = self._clock()
            self._error = " ".join(error.split())
        status = self.status()
        logger.debug("%s: %s", type(self).__name__, status.summary())
        return status

    def begin(self, message: str = "") -> ModuleStatus:
        """Enter Running; `LCTfoundError` while a run is under way."""
        if self._state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        return self._transition(RunState.RUNNING, message or f"{self.task_name} started")

    def report_progress(self, done: int, total: int, message: str = "", at: Optional[float] = None,
                        rate_sample: bool = True) -> None:
        """Record progress (``at``: when it happened, on the logic's clock; default now).
        The ETA uses the rate since the first rate sample of the run, so start-up time does not
        count; ``rate_sample=False`` reports numbers that say nothing about speed (the total
        becoming known, the step a resumed run starts from). Ignored when nothing runs."""
        if not self._state.busy:
            return
        now = self._clock() if at is None else at
        self._done, self._total = int(done), int(total)
        if message and self._state is RunState.RUNNING:
            self._message = message
        if not rate_sample:
            return
        if self._rate_anchor is None:
            self._rate_anchor = (now, self._done)
        else:
            anchor_time, anchor_done = self._rate_anchor
            if self._done > anchor_done and now > anchor_time and self._total > 0:
                rate = (self._done - anchor_done) / (now - anchor_time)
                self._eta_s = max(self._total - self._done, 0) / rate

    def request_cancel(self, message: str = "stopping") -> bool:
        """Running → Cancelling. False when nothing runs."""
        if self._state is not RunState.RUNNING:
            return False
        self._transition(RunState.CANCELLING, message)
        return True

    def finish(self, message: str = "") -> ModuleStatus:
        return self._transition(RunState.FINISHED, message)

    def mark_cancelled(self, message: str = "") -> ModuleStatus:
        return self._transition(RunState.CANCELLED, message)

    def fail(self, error: BaseException | str) -> ModuleStatus:
        if isinstance(error, BaseException) and not isinstance(error, LCTfoundError):
            error = f"{type(error).__name__}: {error}"
        return self._transition(RunState.FAILED, "", error=str(error))

    def reset(self) -> ModuleStatus:
        """Back to Idle after a run has ended; `InvalidTransition` while busy."""
        return self._transition(RunState.IDLE, "")

    # -- run folders -------------------------------------------------------------------------

    def runs_root(self) -> Path:
        """Where runs keep their exported inputs, logs and outputs (default ``<cache>/runs``)."""
        if self._runs_root is not None:
            return self._runs_root
        from ..paths import cache_root

        return cache_root() / "runs"

    def new_run_folder(self, name: str) -> Path:
        """A folder that does not exist yet: ``<runs>/<name>-<YYYYmmdd-HHMMSS>[-N]``."""
        from ..atomic import check_writable

        base = self.runs_root() / f"{name or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"
        folder, number = base, 1
        while folder.exists():
            number += 1
            folder = base.with_name(f"{base.name}-{number}")
        check_writable(folder / "x")  # a read-only or full runs folder is one line now, not after the work
        return folder

    # -- jobs --------------------------------------------------------------------------------

    def start_job(self, args: Sequence[str], *, device: Optional[str] = None, message: str = "",
                  cwd: Optional[os.PathLike | str] = None) -> "Job":
        """Run ``lctfound <args>`` as this module's job (see `lctfound.jobs`) on ``device``."""
        from ..jobs import Job

        if self._state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        if self.before_job is not None:
            self.before_job(list(args))
        job = Job.start(list(args), cwd=cwd, env=device_environment(device), python=self.python)
        self.job = job
        self.begin(message)
        return job

    def poll(self) -> list[dict[str, Any]]:
        """Take the job's new events, update the run state from them and return them.
        Cheap and non-blocking: call it from a timer (Slicer: ``qt.QTimer``, web: async task)."""
        if self.job is None:
            return []
        events = self.job.poll()
        for event in events:
            if event["event"] == "exit":
                if self._state.busy:
                    self._job_ended(self.job, event)
            elif self._state.busy:
                self.handle_event(event)
        return events

    def handle_event(self, event: dict[str, Any]) -> None:
        """Turn one job event (not ``exit``) into progress. This handles the ``progress`` events
        of `lctfound.progress.EventsProgress`; modules whose commands say more extend it."""
        kind = event["event"]
        if kind == "progress":
            self.report_progress(int(event.get("done", 0)), int(event.get("total", 0)),
                                 str(event.get("message", "")), event.get("received_at"))
        elif kind == "log":
            logger.info("%s: %s", self.task_name, event.get("text"))

    def _job_ended(self, job: "Job", exit_event: dict[str, Any]) -> None:
        state = exit_event["state"]
        if state == "finished":
            try:
                message = self.on_job_finished(job)
            except Exception as error:  # noqa: BLE001 - a failed follow-up step fails the run
                logger.warning("%s: finishing the run failed", self.task_name, exc_info=True)
                self.fail(error)
                return
            self.finish(message)
        elif state == "cancelled":
            self.mark_cancelled(self.cancelled_message(job))
        else:
            self.fail(exit_event.get("error") or "the job failed")

    def on_job_finished(self, job: "Job") -> str:
        """Follow-up work after a successful job (register outputs, load results); returns the
        finished message. An exception here makes the run Failed."""
        return ""

    def cancelled_message(self, job: "Job") -> str:
        return ""

    def cancel(self) -> bool:
        """Stop the running job (its whole process tree) without blocking the caller: the kill
        happens in a helper thread; `poll()` then reports Cancelled. False when nothing runs."""
        job = self.job
        if job is None or not self.request_cancel("stopping"):
            return False
        self._cancel_thread = threading.Thread(target=job.cancel, name="lctfound-cancel", daemon=True)
        self._cancel_thread.start()
        return True


def export_volume_node(volume_node: Any, path: Path) -> Path:
    """A volume node as a file with its world geometry, uncompressed (a job reads it at once)."""
    from ..io.volume import write_volume
    from ..mrml import ctvolume_from_volume_node

    write_volume(ctvolume_from_volume_node(volume_node), path, compress=False)
    return Path(path)

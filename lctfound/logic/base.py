"""Qt-free logic shared by the three LCTfound modules (segmentation, enhance, train).

`ModuleLogicBase` is what a Slicer module Logic, a web panel or a script holds on to. It knows

* which **devices** can run a model (``auto`` plus `lctfound.devices.available_devices()`),
* which **models** are installed (`lctfound.models.registry.list_models()`),
* whether the current **parameters** allow Apply, and if not, the one-line reason why,
* the **run state** of the module's long work: Idle → Running → Finished / Cancelling →
  Cancelled / Failed, with progress numbers, a status line and callbacks for front ends.

Nothing here imports Qt, Slicer, VTK or torch at import time. Parameters may hold MRML nodes:
they are only duck-typed (``GetImageData``, ``GetID``), never imported. Front ends turn the
state into widgets with `apply_button_state()` and `progress_bar_state()`, so that all
behaviour (texts, enabling, tooltips) is decided — and tested — here.

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
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence, TypeVar

from ..errors import Cancelled, LCTfoundError
from ..progress import CancelToken, Progress

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Dynamic Qt property naming the parameter of a ``QComboBox`` whose items the widget fills from
#: `ModuleLogicBase.choices()`. Such combo boxes cannot use ``SlicerParameterName``: Slicer's
#: parameter-node GUI connector for ``QComboBox`` needs a fixed ``Choice([...])`` list, while
#: installed models and devices are only known at run time.
CHOICE_PROPERTY_NAME = "LCTfoundChoiceParameterName"

#: The device value that lets the engine pick the best available device.
AUTO_DEVICE = "auto"

_DEVICE_KINDS = ("cpu", "cuda", "mps")
_MODEL_SOURCE_LABELS = {"embedded": "built-in", "user": "user", "official": "official", "folder": "folder"}
_MODEL_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


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
        """Work is under way (a new run cannot start; the Apply button is a Cancel button)."""
        return self in (RunState.RUNNING, RunState.CANCELLING)

    @property
    def ended(self) -> bool:
        """The last run is over, successfully or not."""
        return self in (RunState.FINISHED, RunState.CANCELLED, RunState.FAILED)


#: Allowed state changes. Every state that is not busy may start a new run or go back to Idle.
TRANSITIONS: dict[RunState, frozenset[RunState]] = {
    RunState.IDLE: frozenset({RunState.RUNNING, RunState.IDLE}),
    RunState.RUNNING: frozenset({RunState.FINISHED, RunState.CANCELLING, RunState.CANCELLED, RunState.FAILED}),
    # Work may still complete (or fail) before it notices the cancel request.
    RunState.CANCELLING: frozenset({RunState.CANCELLED, RunState.FINISHED, RunState.FAILED}),
    RunState.FINISHED: frozenset({RunState.RUNNING, RunState.IDLE}),
    RunState.CANCELLED: frozenset({RunState.RUNNING, RunState.IDLE}),
    RunState.FAILED: frozenset({RunState.RUNNING, RunState.IDLE}),
}


class InvalidTransition(RuntimeError):
    """A programming error: the run state cannot change that way (for example Idle → Finished)."""


def _format_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@dataclass(frozen=True)
class ModuleStatus:
    """An immutable snapshot of a module's run state, handed to status callbacks."""

    state: RunState = RunState.IDLE
    message: str = ""
    done: int = 0
    total: int = 0
    error: str = ""
    elapsed_s: Optional[float] = None

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
        """One line for a status label, e.g. ``Running: extracting features (3/10, 30%)``."""
        state = self.state
        if state is RunState.IDLE:
            return "Idle" + (f": {self.message}" if self.message else "")
        if state.busy:
            text = state.value + (f": {self.message}" if self.message else "")
            if self.total > 0:
                text += f" ({self.done}/{self.total}, {self.percent}%)"
            return text
        took = f" after {_format_seconds(self.elapsed_s)}" if self.elapsed_s is not None else ""
        if state is RunState.FAILED:
            return f"Failed{took}: {self.error or self.message or 'unknown error'}"
        if state is RunState.CANCELLED:
            return f"Cancelled{took}" + (f": {self.message}" if self.message else "")
        took = f" in {_format_seconds(self.elapsed_s)}" if self.elapsed_s is not None else ""
        return f"Finished{took}" + (f": {self.message}" if self.message else "")


StatusCallback = Callable[[ModuleStatus], None]


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
    """What the Apply button shows: it turns into Cancel while work runs."""

    text: str
    enabled: bool
    tooltip: str = ""


@dataclass(frozen=True)
class ProgressBarState:
    """What the progress bar shows; ``maximum == 0`` means "busy, amount unknown" (Qt's convention)."""

    visible: bool
    value: int = 0
    maximum: int = 100
    text: str = ""


class ModelEntryLike(Protocol):
    """What the logic reads from `lctfound.models.registry.ModelEntry`."""

    name: str
    path: Path
    source: str
    preset: str
    description: str


@dataclass
class ModuleParameters:
    """The parameters every module has. ``input_volume`` is a volume node, a CTVolume or a file path."""

    input_volume: Any = None
    model_name: str = ""
    device: str = AUTO_DEVICE


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


def refers_to_same(first: Any, second: Any) -> bool:
    """True when two parameters refer to the same node or file (by identity, MRML ID or path)."""
    if first is None or second is None:
        return False
    if first is second:
        return True
    first_id = getattr(first, "GetID", None)
    second_id = getattr(second, "GetID", None)
    if callable(first_id) and callable(second_id):
        return bool(first_id()) and first_id() == second_id()
    if isinstance(first, (str, os.PathLike)) and isinstance(second, (str, os.PathLike)):
        return Path(first).expanduser().resolve() == Path(second).expanduser().resolve()
    return False


# ---------------------------------------------------------------------------------------------
# The base class
# ---------------------------------------------------------------------------------------------


class ModuleLogicBase:
    """Devices, models, parameter checks and the run-state machine of one LCTfound module.

    Collaborators can be injected (tests, web panels with their own registry):

    * ``list_models(extra_folders=...)`` → list of model entries (default:
      `lctfound.models.registry.list_models`),
    * ``available_devices()`` → device names, best first (default: `lctfound.devices.available_devices`),
    * ``clock()`` → seconds (default: `time.monotonic`).

    Status callbacks run on the thread that changed the state. A Qt front end whose work runs in
    another thread must hand them to its main thread (or poll `status()` with a timer).
    """

    #: Shown in messages and on the Apply button tooltip ("Run segmentation").
    task_name = "processing"
    #: The dataclass that holds this module's parameters.
    parameters_class: type = ModuleParameters

    def __init__(
        self,
        *,
        list_models: Optional[Callable[..., Sequence[ModelEntryLike]]] = None,
        available_devices: Optional[Callable[[], Sequence[str]]] = None,
        extra_model_folders: Iterable[os.PathLike | str] = (),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._list_models = list_models
        self._available_devices = available_devices
        self.extra_model_folders: tuple[Path, ...] = tuple(Path(folder) for folder in extra_model_folders)
        self._clock = clock

        self._lock = threading.RLock()
        self._callbacks: list[StatusCallback] = []
        self._state = RunState.IDLE
        self._message = ""
        self._done = 0
        self._total = 0
        self._error = ""
        self._started_at: Optional[float] = None
        self._ended_at: Optional[float] = None
        self._cancel_token: Optional[CancelToken] = None

        self._models: Optional[list[ModelEntryLike]] = None
        self._devices: Optional[list[str]] = None
        #: Why models could not be listed (empty when listing worked).
        self.models_error = ""
        #: Why devices could not be listed, e.g. PyTorch missing (empty when listing worked).
        self.devices_error = ""

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

    # -- models -----------------------------------------------------------------------------

    def models(self, refresh: bool = False) -> list[ModelEntryLike]:
        """Installed models this module can use (cached; ``refresh=True`` scans again).

        A failing registry does not raise here (a widget must still open): the list is empty
        and `models_error` says why; `check_model()` reports it.
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
            self._models = [entry for entry in entries if self.accepts_model(entry)]
        return list(self._models)

    def accepts_model(self, entry: ModelEntryLike) -> bool:
        """Whether this module can use a model; subclasses filter by preset or heads."""
        return True

    def find_model(self, name: Optional[str]) -> Optional[ModelEntryLike]:
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
        if not parameters.model_name:
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
        """Every reason why these parameters cannot be applied, most important first.
        Subclasses extend the list with their own checks."""
        parameters = self.parameters_from(parameters)
        problems = [
            self.check_input_volume(parameters.input_volume),
            self.check_model(parameters.model_name),
            self.check_device(parameters.device),
        ]
        return [problem for problem in problems if problem]

    def cannot_apply_reason(self, parameters: Any) -> str:
        """The first reason why Apply is disabled, or an empty string when it can run."""
        problems = self.parameter_problems(parameters)
        return problems[0] if problems else ""

    def can_apply(self, parameters: Any) -> bool:
        return not self.cannot_apply_reason(parameters)

    # -- widgets state -----------------------------------------------------------------------

    def apply_button_state(self, parameters: Any = None) -> ButtonState:
        """Apply (enabled only when the parameters are complete) or, while busy, Cancel."""
        status = self.status()
        if status.state is RunState.RUNNING:
            return ButtonState("Cancel", True, f"Stop the running {self.task_name}")
        if status.state is RunState.CANCELLING:
            return ButtonState("Cancelling…", False, "Waiting for the current step to stop")
        reason = "Nothing selected yet." if parameters is None else self.cannot_apply_reason(parameters)
        if reason:
            return ButtonState("Apply", False, reason)
        return ButtonState("Apply", True, f"Run {self.task_name}")

    def progress_bar_state(self) -> ProgressBarState:
        """Visible only while busy; indeterminate (maximum 0) while the amount of work is unknown."""
        status = self.status()
        if not status.busy:
            return ProgressBarState(visible=False, text=status.summary())
        if status.percent is None:
            return ProgressBarState(visible=True, value=0, maximum=0, text=status.message)
        return ProgressBarState(visible=True, value=status.percent, maximum=100, text=f"{status.percent}%")

    # -- run state ---------------------------------------------------------------------------

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def cancel_token(self) -> Optional[CancelToken]:
        """The token of the current (or last) run."""
        return self._cancel_token

    def status(self) -> ModuleStatus:
        with self._lock:
            return self._snapshot()

    def status_summary(self) -> str:
        """One line for a status label (see `ModuleStatus.summary`)."""
        return self.status().summary()

    def add_status_callback(self, callback: StatusCallback) -> None:
        with self._lock:
            if callback not in self._callbacks:
                self._callbacks.append(callback)

    def remove_status_callback(self, callback: StatusCallback) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def _snapshot(self) -> ModuleStatus:
        elapsed = None
        if self._started_at is not None:
            end = self._ended_at if self._ended_at is not None else self._clock()
            elapsed = max(end - self._started_at, 0.0)
        return ModuleStatus(self._state, self._message, self._done, self._total, self._error, elapsed)

    def _notify(self, status: ModuleStatus) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for callback in callbacks:
            try:
                callback(status)
            except Exception:  # noqa: BLE001 - a broken view must not break the run state
                logger.exception("status callback %r failed", callback)

    def _transition_locked(self, new_state: RunState, message: Optional[str] = None, error: str = "") -> ModuleStatus:
        """Change the state; the caller holds the lock and notifies after releasing it."""
        if new_state not in TRANSITIONS[self._state]:
            raise InvalidTransition(f"cannot go from {self._state.value} to {new_state.value}")
        self._state = new_state
        if message is not None:
            self._message = message
        if new_state is RunState.RUNNING:
            self._done, self._total, self._error = 0, 0, ""
            self._started_at, self._ended_at = self._clock(), None
        elif new_state is RunState.IDLE:
            self._done, self._total, self._error = 0, 0, ""
            self._started_at = self._ended_at = None
        elif new_state.ended:
            self._ended_at = self._clock()
            self._error = error
        return self._snapshot()

    def _transition(self, new_state: RunState, message: Optional[str] = None, *, error: str = "") -> ModuleStatus:
        with self._lock:
            snapshot = self._transition_locked(new_state, message, error)
        logger.debug("%s: %s", type(self).__name__, snapshot.summary())
        self._notify(snapshot)
        return snapshot

    def start(self, message: str = "") -> Progress:
        """Enter Running and return the `Progress` that the work reports to (and checks for cancel)."""
        with self._lock:
            if self._state.busy:
                raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
            token = CancelToken()
            self._cancel_token = token
            snapshot = self._transition_locked(RunState.RUNNING, message or f"{self.task_name} started")
        self._notify(snapshot)
        return Progress(callback=self.report_progress, cancel_token=token)

    def report_progress(self, done: int, total: int, message: str = "") -> None:
        """Record progress of the running work; ignored when nothing runs (late reports)."""
        with self._lock:
            if not self._state.busy:
                return
            self._done, self._total = int(done), int(total)
            if message and self._state is RunState.RUNNING:
                self._message = message
            snapshot = self._snapshot()
        self._notify(snapshot)

    def request_cancel(self, message: str = "stopping after the current step") -> bool:
        """Ask the running work to stop (Running → Cancelling). False when nothing runs."""
        with self._lock:
            if self._state is not RunState.RUNNING:
                return False
            if self._cancel_token is not None:
                self._cancel_token.cancel()
            snapshot = self._transition_locked(RunState.CANCELLING, message)
        self._notify(snapshot)
        return True

    def finish(self, message: str = "") -> ModuleStatus:
        return self._transition(RunState.FINISHED, message)

    def mark_cancelled(self, message: str = "") -> ModuleStatus:
        return self._transition(RunState.CANCELLED, message)

    def fail(self, error: BaseException | str) -> ModuleStatus:
        if isinstance(error, BaseException):
            text = str(error) if isinstance(error, LCTfoundError) else f"{type(error).__name__}: {error}"
        else:
            text = str(error)
        text = " ".join(text.split())
        return self._transition(RunState.FAILED, "", error=text)

    def reset(self) -> ModuleStatus:
        """Back to Idle after a run has ended; `InvalidTransition` while busy."""
        return self._transition(RunState.IDLE, "")

    def run(self, work: Callable[[Progress], T], message: str = "", finished_message: str = "") -> T:
        """Run ``work(progress)`` in this thread through the state machine.

        Returns its result (Finished). A `Cancelled` exception ends in Cancelled and is re-raised;
        any other exception ends in Failed and is re-raised with its traceback.
        """
        progress = self.start(message)
        try:
            result = work(progress)
        except Cancelled as error:
            self.mark_cancelled(str(error))
            raise
        except KeyboardInterrupt:
            self.mark_cancelled("interrupted")
            raise
        except BaseException as error:
            self.fail(error)
            raise
        self.finish(finished_message)
        return result

    # -- the module's task -------------------------------------------------------------------

    def apply(self, parameters: Any, *, raise_on_cancel: bool = False) -> Any:
        """Check the parameters, then run `process()` through `run()`.

        Raises `LCTfoundError` with the reason when the parameters are incomplete. A cancelled
        run returns None (the status says Cancelled) unless ``raise_on_cancel`` is set.
        """
        parameters = self.parameters_from(parameters)
        reason = self.cannot_apply_reason(parameters)
        if reason:
            raise LCTfoundError(reason)
        try:
            return self.run(lambda progress: self.process(parameters, progress), f"{self.task_name} started")
        except Cancelled:
            if raise_on_cancel:
                raise
            return None

    def process(self, parameters: Any, progress: Progress) -> Any:
        """The module's task; each module logic implements it."""
        raise LCTfoundError(f"{self.task_name} is not available in this version of LCTfound yet")


def is_valid_model_name(name: str) -> bool:
    """A model name usable as a folder name on every platform."""
    return bool(_MODEL_NAME_PATTERN.match(name or "")) and name not in (".", "..")

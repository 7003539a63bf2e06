"""What a client may run on the server: one table entry per task.

Each `Task` names its uploaded inputs, checks its options (every value a client sends is checked
here; anything else is refused) and builds the argument list of the same ``lctfound`` command a
local job runs. Options are passed as ``--name=value`` so that no value can read as another option.
Paths in the command are the server's own: the job folder's input files, its output file and the
client's model folder. Adding a task is one entry in `TASKS`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..errors import LCTfoundError
from ..remote.wire import check_name


class TaskError(LCTfoundError):
    """A job request that cannot run as asked (unknown task, bad option, missing input)."""


@dataclass
class JobPaths:
    """The server-side files of one job: checked options, input files, the output and model resolution."""

    options: dict
    inputs: dict  # input name -> Path of the volume file the server wrote
    output: Path  # the result volume (tasks whose output is a volume)
    model_folder: Callable[[str], str]  # a client's model name -> what the command gets (a server path or name)
    new_model_folder: Callable[[str], Path]  # where a new model of this client goes


def _integer(low: int, high: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise TaskError(f"must be a whole number from {low} to {high}")
        return value
    return check


def _number(low: float, high: float) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise TaskError(f"must be a number from {low:g} to {high:g}")
        return float(value)
    return check


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise TaskError(f"must be one of {', '.join(choices)}")
        return value
    return check


def _pattern(regex: str, example: str) -> Callable[[Any], str]:
    compiled = re.compile(regex)

    def check(value: Any) -> str:
        if not isinstance(value, str) or not compiled.fullmatch(value):
            raise TaskError(f"is not of the form {example}")
        return value
    return check


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TaskError("must be true or false")
    return value


def _name(value: Any) -> str:
    try:
        return check_name(value, "the name")
    except LCTfoundError as error:
        raise TaskError(str(error)) from None


SLICES = _pattern(r"[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", "10,12-14")


@dataclass(frozen=True)
class Task:
    name: str
    description: str
    command: tuple  # the lctfound sub-command words
    inputs: tuple  # required uploaded volumes
    build: Callable[[JobPaths], list]  # the command's arguments after `command`
    options: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    required_options: tuple = ()
    optional_inputs: tuple = ()
    labels_inputs: tuple = ()  # inputs that are label maps (written as integer volumes)
    output: str = "volume"  # "volume", "labels" or "model"
    model_options: tuple = ()  # options that name a model: resolved on the server


def _value_options(paths: JobPaths, names: Mapping[str, str]) -> list:
    """``--flag=value`` for each given option of ``names`` (option key -> command-line flag)."""
    words = []
    for key, flag in names.items():
        value = paths.options.get(key)
        if value is None or value is False:
            continue
        words.append(flag if value is True else f"{flag}={value}")
    return words


def _segment_train(paths: JobPaths) -> list:
    words = [str(paths.inputs["volume"]), f"--labels={paths.inputs['labels']}",
             f"--output={paths.new_model_folder(paths.options['model'])}"]
    if paths.options.get("backbone"):
        words.append(f"--backbone={paths.model_folder(paths.options['backbone'])}")
    if paths.options.get("init"):
        words.append(f"--init={paths.model_folder(paths.options['init'])}")
    return words + _value_options(paths, {"names": "--names", "slices": "--slices", "epochs": "--epochs",
                                          "recipe": "--recipe", "window": "--window", "overwrite": "--overwrite"})


def _segment_predict(paths: JobPaths) -> list:
    words = [str(paths.inputs["volume"]), f"--model={paths.model_folder(paths.options['model'])}",
             f"--output={paths.output}"]
    if "annotation" in paths.inputs:
        words.append(f"--annotation={paths.inputs['annotation']}")
    if paths.options.get("backbone"):
        words.append(f"--backbone={paths.model_folder(paths.options['backbone'])}")
    return words + _value_options(paths, {"postprocess": "--postprocess", "extent_margin": "--extent-margin",
                                          "whole_volume": "--whole-volume"})


def _enhance_low_dose(paths: JobPaths) -> list:
    return [str(paths.inputs["volume"]), f"--output={paths.output}"] + _value_options(
        paths, {"method": "--method", "strength": "--strength", "slices": "--slices", "no_validate": "--no-validate"})


TASKS = {task.name: task for task in (
    Task("segment-train", "few-shot segmentation: train a task model on the labelled slices (stays on the server)",
         ("segment", "train"), ("volume", "labels"), _segment_train,
         options={"model": _name, "names": _pattern(r"[0-9]+=[^,=]{1,64}(,[0-9]+=[^,=]{1,64})*", "1=Lesion,2=Vessel"),
                  "slices": SLICES, "epochs": _integer(1, 10000), "recipe": _choice("auto", "official", "fast"),
                  "window": _pattern(r"[a-z][a-z0-9_-]{0,31}", "mediastinal"), "backbone": _name, "init": _name,
                  "overwrite": _flag},
         required_options=("model",), labels_inputs=("labels",), output="model", model_options=("backbone", "init")),
    Task("segment-predict", "segment a volume with a task model on the server; a label map comes back",
         ("segment", "predict"), ("volume",), _segment_predict,
         options={"model": _name, "backbone": _name, "postprocess": _pattern(r"[a-z]+(,[a-z]+)*", "connected,fill"),
                  "extent_margin": _pattern(r"[0-9]+(\.[0-9]+)?(mm)?", "15mm"), "whole_volume": _flag},
         required_options=("model",), optional_inputs=("annotation",), labels_inputs=("annotation",),
         output="labels", model_options=("model", "backbone")),
    Task("enhance-low-dose", "denoise a low-dose CT (TV or non-local means); a volume with its provenance comes back",
         ("enhance", "low-dose"), ("volume",), _enhance_low_dose,
         options={"method": _choice("tv", "nlm"), "strength": _number(0.0, 100.0), "slices": SLICES,
                  "no_validate": _flag}),
)}


def check_request(task_name: Any, inputs: Any, options: Any) -> tuple[Task, dict, dict]:
    """``(task, inputs, options)`` of a job request, checked; raises `TaskError` with one sentence."""
    task = TASKS.get(task_name) if isinstance(task_name, str) else None
    if task is None:
        raise TaskError(f"unknown task {task_name!r}; this server runs {', '.join(sorted(TASKS))}")
    if not isinstance(inputs, Mapping) or not isinstance(options or {}, Mapping):
        raise TaskError("'inputs' and 'options' must be JSON objects")
    unknown = sorted(set(inputs) - set(task.inputs) - set(task.optional_inputs))
    missing = [name for name in task.inputs if name not in inputs]
    if unknown or missing:
        raise TaskError(f"task {task.name} takes the inputs {', '.join(task.inputs + task.optional_inputs)}"
                        + (f"; {unknown[0]!r} is not one" if unknown else f"; {missing[0]!r} is missing"))
    checked: dict = {}
    for key, value in (options or {}).items():
        if key not in task.options:
            raise TaskError(f"task {task.name} has no option {key!r}; its options are {', '.join(task.options)}")
        if value is None:
            continue
        try:
            checked[key] = task.options[key](value)
        except TaskError as error:
            raise TaskError(f"option {key!r} of {task.name} {error}") from None
    for key in task.required_options:
        if key not in checked:
            raise TaskError(f"task {task.name} needs the option {key!r}")
    for key, value in inputs.items():
        if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{32}", value):
            raise TaskError(f"input {key!r} must be an upload id this server returned")
    return task, dict(inputs), checked


def describe_tasks() -> list:
    return [{"name": task.name, "description": task.description, "inputs": list(task.inputs),
             "optional_inputs": list(task.optional_inputs), "options": sorted(task.options), "output": task.output}
            for task in TASKS.values()]


def model_label_names(folder: Optional[Path]) -> dict:
    """``{value: name}`` of a segmentation task model folder (from its task.json), {} if unreadable."""
    import json

    if folder is None:
        return {}
    try:
        document = json.loads((Path(folder) / "task.json").read_text(encoding="utf-8"))
        return {str(int(k)): str(v) for k, v in (document.get("labels") or {}).items() if int(k) > 0}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}

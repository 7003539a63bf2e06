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
from ..pipelines.choices import (
    FBP_FILTERS, INTENSITY_MAPPINGS, LOW_DOSE_METHODS, SAMPLERS, SLICE_MODELS, SPARSE_VIEW_METHODS,
    SUPER_RESOLUTION_AXES, SUPER_RESOLUTION_FACTORS, SUPER_RESOLUTION_METHODS,
)
from ..remote.wire import check_name
from ..validation import MAX_BATCH, MAX_DIFFUSION_STEPS, MAX_IMAGE_SIZE, MAX_SEED


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


def _integer(low: int, high: int, multiple_of: int = 1) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high or value % multiple_of:
            raise TaskError(f"must be a whole number from {low} to {high}"
                            + (f", a multiple of {multiple_of}" if multiple_of > 1 else ""))
        return value
    return check


def _number(low: float, high: float, open_low: bool = False, open_high: bool = False) -> Callable[[Any], float]:
    """A number from ``low`` to ``high``; ``open_low``/``open_high``: that end excluded."""
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high \
                or (open_low and value == low) or (open_high and value == high):
            raise TaskError(f"must be a number {rule}")
        return float(value)
    rule = (f"from {low:g} to {high:g}" if not (open_low or open_high) else
            f"{'above' if open_low else 'at least'} {low:g} and {'below' if open_high else 'at most'} {high:g}")
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
    output: str = "volume"  # "volume", "labels", "model" or "json" (`read_result` of `result_file`)
    model_options: tuple = ()  # options that name a model: resolved on the server
    takes_device: bool = True  # the command has --device (the worker's device is passed)
    check_inputs: Optional[Callable[[Mapping], None]] = None  # how the given inputs go together
    result_file: str = "result.nrrd"  # the output file's name in the job folder
    #: Output "json": the result from `result_file` and the command's ``result`` events.
    read_result: Optional[Callable[[Path, list], dict]] = None


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
    return _enhance(paths, {"method": "--method", "strength": "--strength", "steps": "--steps",
                            "batch_size": "--batch-size"}, models=("model", "backbone"))


# -- the other enhancement tasks and generation: each option as the local command takes it --------------

def _whole_choice(*choices: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value not in choices:
            raise TaskError(f"must be one of {', '.join(map(str, choices))}")
        return value
    return check


def _spacing(value: Any) -> str:
    """A voxel size in mm, ``S`` or ``X,Y,Z``, each above 0 and at most 100."""
    if not isinstance(value, str) or not re.fullmatch(r"[0-9]+(\.[0-9]+)?(,[0-9]+(\.[0-9]+)?){2}|[0-9]+(\.[0-9]+)?",
                                                      value) or not all(0 < float(v) <= 100 for v in value.split(",")):
        raise TaskError("must be one or three sizes in mm above 0 and at most 100, e.g. 0.7,0.7,2.5")
    return value


#: Options every `lctfound enhance` task shares (`_add_output_options`).
_ENHANCE_COMMON = {"slices": "--slices", "no_validate": "--no-validate"}
#: Free text (a prompt, a disease): one printable line.
TEXT = _pattern(r"[^\x00-\x1f\x7f]{1,256}", "a line of text")
#: A window name or WIDTH,LEVEL in HU (`lctfound.windows.get_window`).
WINDOW = _pattern(r"[a-z][a-z0-9_-]{0,31}|[0-9]+(\.[0-9]+)?,-?[0-9]+(\.[0-9]+)?", "lung or 1500,-600")
SEED = _integer(0, MAX_SEED)
DIFFUSION_STEPS = _integer(1, MAX_DIFFUSION_STEPS)
BATCH = _integer(1, MAX_BATCH)
ITERATIONS = _integer(0, 100_000)
VIEWS = _integer(2, 100_000)
FRACTION = _number(0.0, 1.0)
STRENGTH = _number(0.0, 1.0, open_low=True)  # (0, 1]: 1 starts from noise
GEOMETRY = _choice("parallel", "fan")


def _enhance(paths: JobPaths, names: Mapping[str, str], models: tuple = ()) -> list:
    """``VOLUME --output=OUT [--model=...] --name=value...`` of an ``enhance`` task: ``models`` are the
    options naming models (the command gets them resolved on the server)."""
    words = [str(paths.inputs["volume"]), f"--output={paths.output}"]
    words += [f"--{key.replace('_', '-')}={paths.model_folder(paths.options[key])}" for key in models
              if paths.options.get(key)]
    return words + _value_options(paths, {**names, **_ENHANCE_COMMON})


def _simulate_low_dose(paths: JobPaths) -> list:
    return _enhance(paths, {"dose": "--dose", "photons": "--photons", "electronic_noise": "--electronic-noise",
                            "method": "--method", "input_noise_free": "--input-noise-free", "geometry": "--geometry",
                            "views": "--views", "seed": "--seed"})


def _sparse_view(paths: JobPaths) -> list:
    return _enhance(paths, {"views": "--views", "geometry": "--geometry", "method": "--method",
                            "mu_water": "--mu-water", "filter": "--filter", "tv_iterations": "--tv-iterations",
                            "tv_weight": "--tv-weight", "steps": "--steps", "strength": "--strength",
                            "dc_iterations": "--dc-iterations", "eta": "--eta", "window": "--window",
                            "batch_size": "--batch-size", "refine_iterations": "--refine-iterations",
                            "seed": "--seed"}, models=("model",))


def _super_resolution(paths: JobPaths) -> list:
    return _enhance(paths, {"factor": "--factor", "axis": "--axis", "method": "--method",
                            "slice_model": "--slice-model", "steps": "--steps", "eta": "--eta",
                            "noise_hu": "--noise-hu", "window": "--window", "intensity": "--intensity",
                            "batch_size": "--batch-size", "seed": "--seed"}, models=("model",))


def _vcta(paths: JobPaths) -> list:
    return _enhance(paths, {"steps": "--steps", "eta": "--eta", "strength": "--strength", "batch_size": "--batch-size",
                            "seed": "--seed"}, models=("model", "backbone"))


def _generate(paths: JobPaths) -> list:
    """`lctfound generate`, no input volume: the output is a volume in HU (its extension says so)."""
    words = [f"--output={paths.output}"]
    if paths.options.get("model"):
        words.append(f"--model={paths.model_folder(paths.options['model'])}")
    return words + _value_options(paths, {
        "window": "--window", "disease": "--disease", "prompt": "--prompt", "num_images": "--num-images",
        "steps": "--steps", "sampler": "--sampler", "guidance_scale": "--guidance-scale", "seed": "--seed",
        "size": "--size", "batch_size": "--batch-size", "spacing": "--spacing"})


#: The tasks of this block (after `enhance-low-dose` in `TASKS`).
_ENHANCE_TASKS = (
    Task("enhance-simulate-low-dose", "simulate a lower-dose scan (projection-domain Poisson noise); a volume comes "
         "back", ("enhance", "simulate-low-dose"), ("volume",), _simulate_low_dose,
         options={"dose": _number(0.0, 1.0, open_low=True, open_high=True), "photons": _number(0.0, 1e12, open_low=True),
                  "electronic_noise": _number(0.0, 1e6), "method": _choice(*LOW_DOSE_METHODS),
                  "input_noise_free": _flag, "geometry": GEOMETRY, "views": VIEWS, "seed": SEED, "slices": SLICES,
                  "no_validate": _flag},
         required_options=("dose",), takes_device=False),
    Task("enhance-sparse-view", "reconstruct from few simulated projection views (FBP, TV or diffusion with a "
         "backbone); a volume comes back", ("enhance", "sparse-view"), ("volume",), _sparse_view,
         options={"views": VIEWS, "geometry": GEOMETRY, "method": _choice(*SPARSE_VIEW_METHODS),
                  "mu_water": _number(0.0, 1.0, open_low=True), "filter": _choice(*FBP_FILTERS),
                  "tv_iterations": ITERATIONS, "tv_weight": _number(0.0, 1e6), "model": _name,
                  "steps": DIFFUSION_STEPS, "strength": STRENGTH, "dc_iterations": ITERATIONS, "eta": FRACTION,
                  "window": WINDOW, "batch_size": BATCH, "refine_iterations": ITERATIONS, "seed": SEED,
                  "slices": SLICES, "no_validate": _flag},
         required_options=("views",), model_options=("model",)),
    Task("enhance-super-resolution", "super-resolve x2, x4 or x8 in-plane or through-plane (DDNM or interpolation); "
         "a volume on the finer grid comes back", ("enhance", "super-resolution"), ("volume",), _super_resolution,
         options={"factor": _whole_choice(*SUPER_RESOLUTION_FACTORS), "axis": _choice(*SUPER_RESOLUTION_AXES),
                  "method": _choice(*SUPER_RESOLUTION_METHODS), "slice_model": _choice(*SLICE_MODELS),
                  "model": _name, "steps": DIFFUSION_STEPS, "eta": FRACTION, "noise_hu": _number(0.0, 10_000.0),
                  "window": WINDOW, "intensity": _choice(*INTENSITY_MAPPINGS), "batch_size": BATCH, "seed": SEED,
                  "slices": SLICES, "no_validate": _flag},
         model_options=("model",)),
    Task("enhance-vcta", "virtual CT angiography with a vcta task model; a contrast-enhanced volume comes back",
         ("enhance", "vcta"), ("volume",), _vcta,
         options={"model": _name, "backbone": _name, "steps": DIFFUSION_STEPS, "eta": FRACTION, "strength": STRENGTH,
                  "batch_size": BATCH, "seed": SEED, "slices": SLICES, "no_validate": _flag},
         required_options=("model",), model_options=("model", "backbone")),
    Task("generate", "synthetic CT slices from a window prompt, no input; a volume in HU comes back",
         ("generate",), (), _generate,
         # num_images: a result travels as one volume (`lctfound.remote.wire.MAX_VOXELS`: 2000 slices of 1024²).
         options={"model": _name, "window": WINDOW, "disease": TEXT, "prompt": TEXT, "num_images": _integer(1, 2000),
                  "steps": DIFFUSION_STEPS, "sampler": _choice(*SAMPLERS), "guidance_scale": _number(0.0, 100.0),
                  "seed": SEED, "size": _integer(16, MAX_IMAGE_SIZE, multiple_of=8), "batch_size": BATCH,
                  "spacing": _spacing},
         model_options=("model",)),
)


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
    Task("enhance-low-dose", "denoise a low-dose CT (TV, non-local means or a cold-diffusion task model); a volume "
         "with its provenance comes back",
         ("enhance", "low-dose"), ("volume",), _enhance_low_dose,
         options={"method": _choice("tv", "nlm", "cold-diffusion"), "strength": _number(0.0, 100.0),
                  "model": _name, "backbone": _name, "steps": DIFFUSION_STEPS, "batch_size": BATCH,
                  "slices": SLICES, "no_validate": _flag},
         model_options=("model", "backbone")),
    *_ENHANCE_TASKS,
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
    if unknown and not task.inputs + task.optional_inputs:
        raise TaskError(f"task {task.name} takes no input volumes; {unknown[0]!r} is not one")
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
    if task.check_inputs is not None:
        task.check_inputs(inputs)
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


def model_kind(folder: Optional[Path]) -> str:
    """What a model folder holds: its task model kind (``task`` of its task.json, e.g. ``vcta``,
    ``low-dose-enhancement``, ``fewshot``), ``ctfm-index`` (a CT-FM index the administrator offers),
    ``ctfm`` (a CT-FM encoder) or ``backbone`` (an LCTfound diffusion backbone). File names only, so
    that ``GET /models`` stays light (`lctfound.ctfm.layout`: no PyTorch, no weights read)."""
    import json

    from ..ctfm.layout import ENCODER_KIND, INDEX_KIND, looks_like_encoder, missing_index_file

    if folder is None:
        return ""
    task_file = Path(folder) / "task.json"
    if not task_file.is_file():
        if not missing_index_file(folder):
            return INDEX_KIND
        return ENCODER_KIND if looks_like_encoder(folder) else "backbone"
    try:
        return str(json.loads(task_file.read_text(encoding="utf-8")).get("task") or "")
    except (OSError, ValueError, AttributeError):
        return ""


# -- distilled students, diagnosis and CT-FM embeddings ---------------------------------------------
# (one block, added to `TASKS` below; each builds the same command a local run uses)

#: Volumes one distillation job takes: ``volume``, ``volume2`` … (each with an optional ``labels``,
#: ``labels2`` … on its grid).
MAX_DISTILL_VOLUMES = 4
DISTILL_VOLUMES = ("volume",) + tuple(f"volume{n}" for n in range(2, MAX_DISTILL_VOLUMES + 1))
DISTILL_LABELS = ("labels",) + tuple(f"labels{n}" for n in range(2, MAX_DISTILL_VOLUMES + 1))


def _resolution(value: Any) -> int:
    from ..validation import MAX_IMAGE_SIZE

    number = _integer(16, MAX_IMAGE_SIZE)(value)
    if number % 16:
        raise TaskError("must be a multiple of 16")
    return number


def _check_distill_inputs(inputs: Mapping) -> None:
    """Volumes come in order (``volume2`` needs ``volume``), and each label map belongs to a volume."""
    for number, (volume, labels) in enumerate(zip(DISTILL_VOLUMES, DISTILL_LABELS)):
        if volume in inputs and number and DISTILL_VOLUMES[number - 1] not in inputs:
            raise TaskError(f"input {volume!r} of segment-distill needs {DISTILL_VOLUMES[number - 1]!r} first")
        if labels in inputs and volume not in inputs:
            raise TaskError(f"input {labels!r} of segment-distill is the label map of {volume!r}, which is missing")


def _segment_distill(paths: JobPaths) -> list:
    volumes = [name for name in DISTILL_VOLUMES if name in paths.inputs]
    words = [str(paths.inputs[name]) for name in volumes]
    words += [f"--teacher={paths.model_folder(paths.options['teacher'])}",
              f"--output={paths.new_model_folder(paths.options['model'])}"]
    if any(name in paths.inputs for name in DISTILL_LABELS):  # one per volume, '-' for none (as the command)
        words += [f"--labels={paths.inputs.get(DISTILL_LABELS[DISTILL_VOLUMES.index(name)], '-')}"
                  for name in volumes]
    if paths.options.get("backbone"):
        words.append(f"--backbone={paths.model_folder(paths.options['backbone'])}")
    return words + _value_options(paths, {"epochs": "--epochs", "time_budget": "--time-budget",
                                          "resolution": "--resolution", "overwrite": "--overwrite"})


def _classify_predict(paths: JobPaths) -> list:
    words = [str(paths.inputs["volume"]), f"--model={paths.model_folder(paths.options['model'])}",
             f"--output={paths.output}"]
    if paths.options.get("backbone"):
        words.append(f"--backbone={paths.model_folder(paths.options['backbone'])}")
    return words + _value_options(paths, {"slices": "--slices", "batch_size": "--batch-size"})


def _read_results_table(path: Path, events: list) -> dict:
    """The rows of the job's results table (values as the table holds them) and its class names."""
    from ..pipelines.results_table import read_results_csv, table_class_names

    classes = table_class_names(path)
    return {"classes": classes, "rows": read_results_csv(path, classes)}


def _ctfm_embed(paths: JobPaths) -> list:
    return [str(paths.inputs["volume"]), f"--model={paths.model_folder(paths.options['model'])}",
            f"--output={paths.output}"] + _value_options(
        paths, {"aggregation": "--aggregation", "window": "--window", "overlap": "--overlap",
                "batch_size": "--batch-size", "no_validate": "--no-validate"})


def _read_embedding(path: Path, events: list) -> dict:
    """The embedding file's settings record and tensors (exact: float32 values survive JSON)."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as handle:
        info = json.loads((handle.metadata() or {})["lctfound"])
        tensors = {}
        for key in handle.keys():
            array = handle.get_tensor(key)
            tensors[key] = {"dtype": array.dtype.name, "shape": list(array.shape), "values": array.ravel().tolist()}
    return {"info": info, "tensors": tensors}


COORDINATES = r"-?[0-9]{1,6}(\.[0-9]{1,6})?"


def _ctfm_search(paths: JobPaths) -> list:
    return [paths.model_folder(paths.options["index"]), f"--query={paths.inputs['volume']}",
            f"--model={paths.model_folder(paths.options['model'])}"] + _value_options(
        paths, {"point": "--point", "region": "--region", "top": "--top", "no_validate": "--no-validate"})


def _search_result(path: Path, events: list) -> dict:
    """The search's ``result`` event (what ``--json`` prints) without the indexed volumes' server paths."""
    found = next((event for event in reversed(events) if event.get("event") == "result"), None)
    if found is None:
        raise TaskError("the search ended without a result")
    return {"level": found.get("level"), "query_centre_ras": found.get("query_centre_ras"),
            "matches": [{key: value for key, value in match.items() if key != "path"}
                        for match in found.get("matches", [])]}


TASKS.update((task.name, task) for task in (
    Task("segment-distill", "distil one of your segmentation models into a small, fast student (stays on the "
         "server)", ("segment", "distill"), ("volume",), _segment_distill,
         options={"model": _name, "teacher": _name, "backbone": _name, "epochs": _integer(1, 10000),
                  "time_budget": _number(0.0, 24 * 60.0), "resolution": _resolution, "overwrite": _flag},
         required_options=("model", "teacher"), optional_inputs=DISTILL_VOLUMES[1:] + DISTILL_LABELS,
         labels_inputs=DISTILL_LABELS, output="model", model_options=("teacher", "backbone"),
         check_inputs=_check_distill_inputs),
    Task("classify-predict", "classify one scan (research use); its results-table row comes back",
         ("classify", "predict"), ("volume",), _classify_predict,
         options={"model": _name, "backbone": _name,
                  "slices": _pattern(r"all|[0-9]+(-[0-9]+)?(,[0-9]+(-[0-9]+)?)*", "all or 10,12-14"),
                  "batch_size": _integer(1, 256)},
         required_options=("model",), output="json", model_options=("model", "backbone"),
         result_file="results.csv", read_result=_read_results_table),
    Task("ctfm-embed", "embed one volume with a CT-FM encoder the server offers; the embedding comes back",
         ("ctfm", "embed"), ("volume",), _ctfm_embed,
         options={"model": _name, "aggregation": _choice("mean", "min", "whole"),
                  "window": _pattern(r"[0-9]{1,4},[0-9]{1,4},[0-9]{1,4}", "32,128,128"),
                  "overlap": _number(0.0, 0.99), "batch_size": _integer(1, 64), "no_validate": _flag},
         required_options=("model",), output="json", model_options=("model",),
         result_file="embedding.safetensors", read_result=_read_embedding),
    Task("ctfm-search", "rank the volumes of a CT-FM index the server offers (--models NAME=INDEX_FOLDER) by "
         "similarity with a query volume; the ranking comes back", ("ctfm", "search"), ("volume",), _ctfm_search,
         options={"index": _name, "model": _name, "point": _pattern(",".join([COORDINATES] * 3), "-20.5,10,-140"),
                  "region": _pattern(",".join([COORDINATES] * 6), "0,0,0,10,10,10"), "top": _integer(1, 100_000),
                  "no_validate": _flag},
         required_options=("index", "model"), output="json", model_options=("index", "model"),
         read_result=_search_result),
))

"""Qt-free logic of the LCTfoundEnhance module: every image task that makes a new volume.

Each task is one `lctfound enhance …` (or `lctfound generate`) subcommand run as a background job
(`ModuleLogicBase.start_job`) on the input volume exported to a run folder. The command ends with a
``result`` event naming the new volume file and its provenance JSON; `on_job_finished` loads it
into a NEW volume node (never the input) named after the task and its parameters, with the
provenance as ``LCTfound.*`` node attributes, and offers the input/result pair for comparison
(`comparison`). Slicer shows it as background/foreground with an opacity slider; the web front end
as a slider or side by side.

MRML is imported lazily (`lctfound.mrml`): this module loads when Slicer starts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..atomic import write_text_file
from ..errors import LCTfoundError
from .base import ButtonState, Choice, ModuleLogicBase, ModuleParameters, _snake_case
from .server import server_arguments

if TYPE_CHECKING:
    from ..jobs import Job

logger = logging.getLogger(__name__)

LOW_DOSE_SIMULATION = "simulate-low-dose"
LOW_DOSE = "low-dose"
SPARSE_VIEW = "sparse-view"
SUPER_RESOLUTION = "super-resolution"
VCTA = "vcta"
SYNTHETIC = "synthetic"


@dataclass
class EnhanceParameters(ModuleParameters):
    """``model_name`` is the LCTfound backbone (diffusion prior); ``task_model`` a trained
    enhancement model (low-dose enhancement, VCTA)."""

    task: str = SUPER_RESOLUTION  # works out of the box with the embedded model
    task_model: str = ""
    dose: float = 0.1
    #: Low-dose method: tv wins the project's benchmark (benchmarks/RESULTS.md), so it is the default.
    denoiser: str = "tv"
    views: int = 32
    reconstruction: str = "tv"  # TV wins the project's sparse-view benchmark (benchmarks/RESULTS.md)
    geometry: str = "parallel"
    factor: int = 4
    axis: str = "in-plane"
    interpolation: str = "ddnm"
    steps: int = 50
    seed: int = 0
    window: str = "lung"
    count: int = 8
    guidance_scale: float = 1.0


@dataclass(frozen=True)
class EnhanceTask:
    """One task of the panel: its command, what it needs and what its result is called."""

    value: str
    label: str
    tooltip: str
    command: tuple[str, ...]
    #: "backbone" (the diffusion prior), a task-model kind (task.json "task"), or "" (nothing).
    needs: Callable[[EnhanceParameters], str]
    options: Callable[[EnhanceParameters], list[str]]
    fields: frozenset[str]
    needs_input: bool = True


def _sparse_view_options(p: EnhanceParameters) -> list[str]:
    options = ["--views", str(int(p.views)), "--method", p.reconstruction, "--geometry", p.geometry]
    if p.reconstruction == "diffusion":
        options += ["--steps", str(int(p.steps))]
    return options


TASKS = {
    task.value: task
    for task in (
        EnhanceTask(LOW_DOSE, "Low-dose enhancement",
                    "Denoise a low-dose CT: total variation (default, best on the project's benchmark), non-local "
                    "means, or cold diffusion with a trained enhancement model.",
                    ("enhance", "low-dose"),
                    lambda p: "low-dose-enhancement" if p.denoiser == "cold-diffusion" else "",
                    lambda p: ["--method", p.denoiser], frozenset({"denoiser", "task_model"})),
        EnhanceTask(LOW_DOSE_SIMULATION, "Simulate low dose",
                    "Poisson noise on simulated projections at a dose fraction, reconstructed by FBP.",
                    ("enhance", "simulate-low-dose"), lambda p: "",
                    lambda p: ["--dose", f"{float(p.dose):g}", "--seed", str(int(p.seed))], frozenset({"dose", "seed"})),
        EnhanceTask(SPARSE_VIEW, "Sparse-view reconstruction",
                    "Simulate N projection views and reconstruct them: FBP, iterative TV, or LCTfound-guided diffusion.",
                    ("enhance", "sparse-view"), lambda p: "backbone" if p.reconstruction == "diffusion" else "",
                    _sparse_view_options, frozenset({"views", "reconstruction", "geometry", "steps", "model_name"})),
        EnhanceTask(SUPER_RESOLUTION, "Super-resolution",
                    "×2/×4/×8 in-plane or thick → thin slices: zero-shot DDNM with the LCTfound prior, or interpolation.",
                    ("enhance", "super-resolution"), lambda p: "backbone" if p.interpolation == "ddnm" else "",
                    lambda p: ["--factor", str(int(p.factor)), "--axis", p.axis, "--method", p.interpolation,
                               "--steps", str(int(p.steps)), "--seed", str(int(p.seed))],
                    frozenset({"factor", "axis", "interpolation", "steps", "seed", "model_name"})),
        EnhanceTask(VCTA, "Virtual CT angiography",
                    "Contrast-enhanced CT predicted from a non-contrast CT by a fine-tuned conditional diffusion model.",
                    ("enhance", "vcta"), lambda p: "vcta", lambda p: ["--steps", str(int(p.steps))],
                    frozenset({"task_model", "steps"})),
        EnhanceTask(SYNTHETIC, "Synthetic CT",
                    "Generate CT slices from a window prompt (classifier-free guidance, DDIM) as a new volume.",
                    ("generate",), lambda p: "backbone",
                    lambda p: ["--window", p.window, "--num-images", str(int(p.count)), "--steps", str(int(p.steps)),
                               "--seed", str(int(p.seed)), "--guidance-scale", f"{float(p.guidance_scale):g}"],
                    frozenset({"window", "count", "steps", "seed", "guidance_scale", "model_name"}), needs_input=False),
    )
}

FIXED_CHOICES = {
    "task": tuple(Choice(t.value, t.label, t.tooltip) for t in TASKS.values()),
    "denoiser": (Choice("tv", "Total variation (best on the benchmark)"), Choice("nlm", "Non-local means"),
                 Choice("cold-diffusion", "LCTfound cold diffusion (trained model)")),
    "reconstruction": (Choice("fbp", "Filtered back-projection"), Choice("tv", "Iterative TV"),
                       Choice("diffusion", "LCTfound-guided diffusion")),
    "geometry": (Choice("parallel", "Parallel beam"), Choice("fan", "Fan beam")),
    "axis": (Choice("in-plane", "In-plane"), Choice("through-plane", "Through-plane (thick → thin)")),
    "interpolation": (Choice("ddnm", "DDNM (LCTfound prior)"), Choice("bicubic", "Bicubic"),
                      Choice("bspline", "B-spline")),
    "window": (Choice("lung", "Lung window"), Choice("mediastinal", "Mediastinal window")),
}

JOB_FILE = "job.json"
PROVENANCE_PREFIX = "LCTfound."


def server_task(p: EnhanceParameters) -> str:
    """The server task (a name in the server's ``GET /info``) that runs the panel's task with these
    parameters: each is the same command with ``--server``."""
    if p.task == LOW_DOSE:
        return "enhance-low-dose"  # TV, NLM or cold diffusion with a task model the server has
    return {LOW_DOSE_SIMULATION: "enhance-simulate-low-dose", SPARSE_VIEW: "enhance-sparse-view",
            SUPER_RESOLUTION: "enhance-super-resolution", VCTA: "enhance-vcta", SYNTHETIC: "generate"}.get(p.task, "")


#: Every server task the panel can send (the same `lctfound enhance …`/`generate` command with ``--server``).
SERVER_TASKS = frozenset({"enhance-low-dose", "enhance-simulate-low-dose",
                          "enhance-sparse-view", "enhance-super-resolution", "enhance-vcta", "generate"})


class EnhanceModuleLogic(ModuleLogicBase):
    """Runs the enhancement tasks as jobs and loads each result into a new volume node."""

    task_name = "enhancement"
    parameters_class = EnhanceParameters
    server_jobs = SERVER_TASKS

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_folder: Optional[Path] = None
        self._job_info: dict[str, Any] = {}
        self._target: Optional[EnhanceParameters] = None
        self._result_event: dict[str, Any] = {}
        #: The volume node of the last finished run.
        self.result_volume: Any = None

    # -- models ---------------------------------------------------------------------------

    def _task(self, p: EnhanceParameters) -> EnhanceTask:
        task = TASKS.get(p.task)
        if task is None:
            raise LCTfoundError(f"unknown enhancement task {p.task!r}; choose one of: {', '.join(TASKS)}")
        return task

    @staticmethod
    def _needs(p: EnhanceParameters) -> str:
        """The model kind the task needs with these parameters ('' none, 'backbone', or a task model kind)."""
        return TASKS[p.task].needs(p) if p.task in TASKS else ""

    def find_task_model(self, name: str, kind: str) -> Optional[Any]:
        return next((e for e in self.task_models() if e.name == name and e.task == kind), None)

    def server_tasks(self, parameters: Any, action: str = "") -> tuple[str, ...]:
        task = server_task(self.parameters_from(parameters))
        return (task,) if task else ()

    def choices(self, parameter_name: str, refresh: bool = False, parameters: Any = None) -> list[Choice]:
        name = _snake_case(parameter_name)
        server = self.connected_server(parameters) if parameters is not None else None
        if server is not None and name in ("model_name", "task_model"):
            p = self.parameters_from(parameters)
            models = server.backbones() if name == "model_name" else server.task_models(self._needs(p))
            return [Choice(model, f"{model} (on the server)", server.url) for model in models]
        if name == "task_model":
            p = self.parameters_from(parameters) if parameters is not None else EnhanceParameters()
            return [Choice(e.name, f"{e.name} (on {e.backbone})", str(e.path))
                    for e in self.task_models(refresh) if e.task == self._needs(p)]
        if name in FIXED_CHOICES:
            return list(FIXED_CHOICES[name])
        return super().choices(parameter_name, refresh)

    def visible_fields(self, parameters: Any) -> set[str]:
        p = self.parameters_from(parameters)
        task = TASKS.get(p.task)
        shown = {"task", "device"} | (set(task.fields) if task else set())
        if task is None or task.needs_input:
            shown.add("input_volume")
        if task is not None and "task_model" in shown and not task.needs(p):
            shown.discard("task_model")  # e.g. low-dose TV or NLM: no trained model involved
        if self.on_server(p):
            shown.discard("device")  # the server picks its device
        return shown

    def default_values(self, parameters: Any) -> dict[str, Any]:
        p = self.parameters_from(parameters)
        server = self.connected_server(p)
        if server is not None:  # the server's models, not this computer's
            defaults: dict[str, Any] = {}
            for name, models in (("model_name", server.backbones()), ("task_model", server.task_models(self._needs(p)))):
                if getattr(p, name) not in models and models:
                    defaults[name] = models[0] if name == "model_name" else models[-1]
            return defaults
        defaults = super().default_values(parameters)
        if not p.task_model:
            choices = self.choices("task_model", parameters=p)
            if choices:
                defaults["task_model"] = choices[-1].value
        return defaults

    # -- checks ---------------------------------------------------------------------------

    def parameter_problems(self, parameters: Any) -> list[str]:
        p = self.parameters_from(parameters)
        try:
            task = self._task(p)
        except LCTfoundError as error:
            return [str(error)]
        problems = [self.check_input_volume(p.input_volume)] if task.needs_input else []
        needs = task.needs(p)
        if self.on_server(p):
            problems += self._server_problems(p, needs)
        elif needs == "backbone":
            problems.append(self.check_model(p.model_name))
        elif needs:
            if not p.task_model:
                problems.append(f"Select a {needs} model (train one with `lctfound enhance train-{p.task}`).")
            elif self.find_task_model(p.task_model, needs) is None:
                problems.append(f"Model '{p.task_model}' is not an installed {needs} model.")
        if not self.on_server(p):
            problems.append(self.check_device(p.device))
        checks = {
            "dose": (lambda: 0 < float(p.dose) < 1, "The dose fraction must lie between 0 and 1 (e.g. 0.1 for 10%)."),
            "views": (lambda: int(p.views) >= 1, "Sparse-view reconstruction needs at least one view."),
            "factor": (lambda: int(p.factor) in (2, 4, 8), "The super-resolution factor must be 2, 4 or 8."),
            "steps": (lambda: int(p.steps) >= 1, "Steps must be at least 1."),
            "count": (lambda: int(p.count) >= 1, "Generate at least one slice."),
        }
        for field, (ok, message) in checks.items():
            if field in task.fields and not ok():
                problems.append(message)
        return [problem for problem in problems if problem]

    def _server_problems(self, p: EnhanceParameters, needs: str) -> list[str]:
        """The task on the chosen server: one it runs (`server_problem`), with a model it has."""
        problems = [self.server_problem(p)]
        server = self.connected_server(p)
        if server is not None and needs == "backbone" and p.model_name not in server.backbones():
            problems.append("Select a backbone the server offers (Test connection lists them).")
        elif server is not None and needs and p.task_model not in server.task_models(needs):
            problems.append(f"Select a {needs} model the server has (Test connection lists them).")
        return problems

    def selection_summary(self, parameters: Any) -> str:
        p = self.parameters_from(parameters)
        problem = self.first_problem(p)
        if problem:
            return problem
        task = self._task(p)
        needs = task.needs(p)
        what = {"backbone": f"model {p.model_name}", "": "no model"}.get(needs, f"model {p.task_model}")
        server = self.connected_server(p)
        where = f"the server {server.url}" if server is not None else self.device_label(p.device)
        return f"{task.label} with {what} on {where}."

    def start_button_state(self, parameters: Any) -> ButtonState:
        if self.state.busy:
            return ButtonState(False, f"{self.task_name} is running")
        problem = self.first_problem(parameters)
        return ButtonState(not problem, problem or "Run the task; the result is a new volume")

    def cancel_button_state(self) -> ButtonState:
        return ButtonState(self.state.busy, "Stop the running job" if self.state.busy else "Nothing is running")

    # -- running --------------------------------------------------------------------------

    def _model_path(self, p: EnhanceParameters, needs: str) -> Path:
        if needs == "backbone":
            entry = self.find_model(p.model_name)
        else:
            entry = self.find_task_model(p.task_model, needs)
        if entry is None:
            raise LCTfoundError(f"Model '{p.model_name if needs == 'backbone' else p.task_model}' is not installed here.")
        return Path(entry.path).resolve()

    def command(self, p: EnhanceParameters, volume_path: Optional[Path], output: Path) -> list[str]:
        """The ``lctfound`` arguments of the task (``volume_path`` None for generation); on a server the
        same command with ``--server`` (models named as the server lists them)."""
        task = self._task(p)
        args = list(task.command)
        if volume_path is not None:
            args.append(str(volume_path))
        needs = task.needs(p)
        server = self.connected_server(p)
        if needs:
            model = (p.model_name if needs == "backbone" else p.task_model) if server is not None else \
                str(self._model_path(p, needs))
            args += ["--model", model]
        args += task.options(p) + ["--output", str(output), "--events"]
        return args + server_arguments(server) if server is not None else args

    def start(self, parameters: Any) -> "Job":
        """Export the input volume and start the task's command; raises `LCTfoundError` with the first problem."""
        p = self.parameters_from(parameters)
        if self.state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        problem = self.first_problem(p)
        if problem:
            raise LCTfoundError(problem)
        task = self._task(p)
        run = self.new_run_folder(p.task)
        run.mkdir(parents=True)
        try:
            volume_path = None
            if task.needs_input:
                from ..io.volume import write_volume
                from ..mrml import ctvolume_from_volume_node

                volume_path = run / "input.nrrd"
                write_volume(ctvolume_from_volume_node(p.input_volume), volume_path, compress=False)
            output = run / "result.nii.gz" if p.task == SYNTHETIC else run / "result.nrrd"
            args = self.command(p, volume_path, output)
            server = self.connected_server(p)
            info = {"task": p.task, "args": args, "output": str(output), "server": server.url if server else "",
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
            write_text_file(run / JOB_FILE, json.dumps(info, indent=2))
            where = f" on {server.url}" if server is not None else ""
            job = self.start_job(args, device=p.device if server is None else "auto",
                                 message=f"{task.label}: starting{where}", cwd=run)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise
        self.run_folder, self._job_info, self._target, self._result_event = run, info, p, {}
        return job

    def handle_event(self, event: dict[str, Any]) -> None:
        if event["event"] == "result":
            self._result_event = event
        else:
            super().handle_event(event)

    def on_job_finished(self, job: "Job") -> str:
        from ..io.provenance import read_provenance
        from ..io.volume import read_volume
        from ..mrml import volume_node_from_ctvolume
        from ..mrml.segmentations import place_next_to
        from ..mrml.volumes import set_provenance

        # A server job's events are the server's (its result event names the server's file): the result
        # is the output this computer's command wrote.
        on_server = bool(self._job_info.get("server"))
        output = self._job_info["output"] if on_server else self._result_event.get("output")
        if not output or not Path(output).is_file():
            raise LCTfoundError(f"the {self._job_info.get('task')} job reported no result volume")
        p = self._target
        result = read_volume(output, validate=False)
        provenance = read_provenance(output)
        event_name = "" if on_server else self._result_event.get("name")
        name = str(event_name or provenance.get("name") or Path(output).stem)
        scene = p.input_volume.GetScene() if p.input_volume is not None else self._scene
        if scene is None:
            raise LCTfoundError("no scene to put the result in")
        node = volume_node_from_ctvolume(scene, result, name=name)
        set_provenance(node, {key: value for key, value in provenance.items() if key and " " not in str(key)})
        if p.input_volume is not None:
            place_next_to(node, p.input_volume)
        self.result_volume = node
        took = provenance.get("seconds_per_slice")
        return f"new volume '{node.GetName()}'" + (f" ({float(took):.2f} s per slice)" if took else "")

    #: Scene for tasks without an input volume (synthetic CT); front ends set it.
    _scene: Any = None

    def set_scene(self, scene: Any) -> None:
        self._scene = scene

    def comparison(self) -> tuple[Any, Any]:
        """``(input, result)`` volume nodes of the last run for a side-by-side or slider view
        (input is None for generated volumes)."""
        if self.result_volume is None:
            raise LCTfoundError("nothing to compare yet: run a task first")
        return (self._target.input_volume if self._target else None), self.result_volume

"""Tests of the Qt-free module logic base (`lctfound.logic.base`): choices, parameter checks,
the run-state machine driven by job events, status texts and the widget states derived from them."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from lctfound.errors import LCTfoundError
from lctfound.logic import (
    AUTO_DEVICE,
    TRANSITIONS,
    Choice,
    EnhanceModuleLogic,
    InvalidTransition,
    ModuleLogicBase,
    ModuleParameters,
    ModuleStatus,
    ProgressBarState,
    RunState,
    SegmentationModuleLogic,
    TrainModuleLogic,
    device_environment,
)

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Entry:
    """Stand-in for `lctfound.models.registry.ModelEntry` (same attributes)."""

    name: str
    path: Path
    source: str = "user"
    preset: str = "lctfound"
    description: str = ""


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeVolume:
    def __init__(self, image_data=object(), node_id="vtkMRMLScalarVolumeNode1"):
        self._image_data, self._id = image_data, node_id

    def GetImageData(self):
        return self._image_data

    def GetID(self):
        return self._id


@pytest.fixture
def models(tmp_path):
    entries = []
    for name, source in (("lctfound-cpu-tiny", "embedded"), ("airway", "user"), ("official", "official")):
        folder = tmp_path / name
        folder.mkdir()
        entries.append(Entry(name, folder, source, description=f"{name} model"))
    return entries


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def logic(models, clock):
    return ModuleLogicBase(
        list_models=lambda extra_folders=(): list(models), available_devices=lambda: ["cpu"], clock=clock
    )


def ready_parameters(**values):
    base = dict(input_volume=FakeVolume(), model_name="airway", device="cpu")
    base.update(values)
    return ModuleParameters(**base)


# ---------------------------------------------------------------------------------------------
# Import weight
# ---------------------------------------------------------------------------------------------


def test_importing_the_logic_is_light():
    """Slicer imports lctfound.logic at start-up: no torch, numpy, Slicer, VTK or Qt."""
    code = (
        "import sys, lctfound.logic\n"
        "heavy = {'torch', 'numpy', 'diffusers', 'SimpleITK', 'monai', 'slicer', 'vtk', 'vtkmodules', 'qt', 'ctk'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip() == "[]"


# ---------------------------------------------------------------------------------------------
# Devices
# ---------------------------------------------------------------------------------------------


def test_device_choices_start_with_auto():
    logic = ModuleLogicBase(available_devices=lambda: ["cuda", "cuda:1", "mps", "cpu"], list_models=lambda **_: [])
    choices = logic.device_choices()
    assert [choice.value for choice in choices] == ["auto", "cuda", "cuda:1", "mps", "cpu"]
    assert choices[0].label == "Automatic (cuda)"
    assert [choice.label for choice in choices[1:]] == ["NVIDIA GPU 0 (cuda)", "NVIDIA GPU 1 (cuda:1)", "Apple GPU (mps)", "CPU"]
    assert all(isinstance(choice, Choice) and choice.tooltip for choice in choices)


def test_cpu_is_always_offered():
    logic = ModuleLogicBase(available_devices=lambda: ["cuda"], list_models=lambda **_: [])
    assert [choice.value for choice in logic.device_choices()] == ["auto", "cuda", "cpu"]
    assert logic.check_device("cpu") == ""


@pytest.mark.parametrize(
    "device, problem",
    [
        ("auto", ""),
        ("", ""),
        (None, ""),
        ("CPU", ""),
        (" cpu ", ""),
        ("cuda", ""),
        ("cuda:0", ""),
        ("cuda:1", "not available"),
        ("mps", "not available"),
        ("tpu", "Unknown device 'tpu'"),
    ],
)
def test_check_device(device, problem):
    logic = ModuleLogicBase(available_devices=lambda: ["cuda", "cpu"], list_models=lambda **_: [])
    reason = logic.check_device(device)
    assert (problem in reason) if problem else reason == ""


def test_missing_torch_is_reported_not_raised():
    def no_torch():
        raise ModuleNotFoundError("No module named 'torch'")

    logic = ModuleLogicBase(available_devices=no_torch, list_models=lambda **_: [])
    assert [choice.value for choice in logic.device_choices()] == ["auto", "cpu"]
    assert "PyTorch is not available" in logic.check_device("auto")
    assert "PyTorch extension" in logic.check_device("cpu")
    assert logic.parameter_problems(ready_parameters())[-1].startswith("PyTorch is not available")


def test_devices_are_cached_until_refresh():
    calls = []

    def devices():
        calls.append(1)
        return ["cpu"]

    logic = ModuleLogicBase(available_devices=devices, list_models=lambda **_: [])
    logic.device_choices()
    logic.check_device("cpu")
    assert len(calls) == 1
    logic.device_choices(refresh=True)
    assert len(calls) == 2
    logic.refresh()
    logic.devices()
    assert len(calls) == 3


def test_default_device_lister_is_the_engines():
    pytest.importorskip("torch")
    from lctfound.devices import available_devices

    logic = ModuleLogicBase(list_models=lambda **_: [])
    assert logic.devices() == available_devices()
    assert logic.check_device("cpu") == "" and logic.check_device("auto") == ""


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_model_choices(logic, models):
    choices = logic.model_choices()
    assert [choice.value for choice in choices] == ["lctfound-cpu-tiny", "airway", "official"]
    assert [choice.label for choice in choices] == [
        "lctfound-cpu-tiny (built-in)", "airway (user)", "official (official)"
    ]
    assert "airway model" in choices[1].tooltip and str(models[1].path) in choices[1].tooltip
    assert logic.default_model_name() == "lctfound-cpu-tiny"
    assert logic.find_model("airway") is models[1]
    assert logic.find_model("nope") is None


def test_duplicate_model_names_are_listed_once(tmp_path):
    entries = [Entry("m", tmp_path, "user"), Entry("m", tmp_path, "folder")]
    logic = ModuleLogicBase(list_models=lambda **_: entries, available_devices=lambda: ["cpu"])
    assert [choice.label for choice in logic.model_choices()] == ["m (user)"]


def test_extra_model_folders_are_passed_to_the_registry(tmp_path):
    seen = {}

    def list_models(extra_folders=()):
        seen["extra_folders"] = tuple(extra_folders)
        return []

    ModuleLogicBase(list_models=list_models, extra_model_folders=[tmp_path, str(tmp_path / "b")]).models()
    assert seen["extra_folders"] == (tmp_path, tmp_path / "b")


def test_default_model_lister_is_the_registry(monkeypatch, tmp_path):
    """Without injection the logic calls lctfound.models.registry.list_models(extra_folders=...)."""
    calls = []

    def list_models(extra_folders=()):
        calls.append(tuple(extra_folders))
        return [Entry("from-registry", tmp_path, "embedded")]

    fake = types.ModuleType("lctfound.models.registry")
    fake.list_models = list_models
    monkeypatch.setitem(sys.modules, "lctfound.models.registry", fake)
    logic = ModuleLogicBase(available_devices=lambda: ["cpu"], extra_model_folders=[tmp_path])
    assert [choice.value for choice in logic.model_choices()] == ["from-registry"]
    assert calls == [(tmp_path,)]


def test_real_registry_entries_fit_the_logic(monkeypatch, tmp_path):
    registry = pytest.importorskip("lctfound.models.registry")
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("LCTFOUND_OFFICIAL_MODEL", raising=False)
    logic = ModuleLogicBase(available_devices=lambda: ["cpu"])
    entries = logic.models()
    assert logic.models_error == ""
    assert [entry.name for entry in entries] == [entry.name for entry in registry.list_models()]
    for entry in entries:
        assert isinstance(entry.name, str) and isinstance(entry.path, Path)
        assert entry.source in ("embedded", "user", "official", "folder")
        assert isinstance(entry.preset, str) and isinstance(entry.description, str)
    if entries:
        assert logic.check_model(logic.default_model_name()) == ""


def test_failing_registry_is_reported_not_raised():
    def broken(extra_folders=()):
        raise LCTfoundError("model folder /x is unreadable")

    logic = ModuleLogicBase(list_models=broken, available_devices=lambda: ["cpu"])
    assert logic.model_choices() == []
    assert logic.models_error == "model folder /x is unreadable"
    assert logic.check_model("") == "No model could be listed: model folder /x is unreadable"

    def crashing(extra_folders=()):
        raise RuntimeError("boom")

    logic = ModuleLogicBase(list_models=crashing, available_devices=lambda: ["cpu"])
    assert logic.models() == [] and logic.models_error == "RuntimeError: boom"


def test_check_model(logic, models):
    assert logic.check_model("airway") == ""
    assert logic.check_model("") == "Select a model."
    assert logic.check_model("gone") == "Model 'gone' is not installed here."
    models[1].path.rmdir()
    assert logic.check_model("airway").startswith("The files of model 'airway' are missing")
    empty = ModuleLogicBase(list_models=lambda **_: [], available_devices=lambda: ["cpu"])
    assert "No LCTfound model is installed" in empty.check_model("")


def test_models_are_cached_until_refresh(models):
    calls = []

    def list_models(extra_folders=()):
        calls.append(1)
        return list(models)

    logic = ModuleLogicBase(list_models=list_models, available_devices=lambda: ["cpu"])
    logic.model_choices()
    logic.check_model("airway")
    logic.default_model_name()
    assert len(calls) == 1
    logic.model_choices(refresh=True)
    assert len(calls) == 2


def test_choices_by_parameter_name(logic):
    assert logic.choices("modelName") == logic.model_choices()
    assert logic.choices("model_name") == logic.model_choices()
    assert logic.choices("device") == logic.device_choices()
    with pytest.raises(KeyError):
        logic.choices("inputVolume")


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def test_parameters_from_any_spelling(logic):
    volume = FakeVolume()
    from_node = logic.parameters_from(SimpleNamespace(inputVolume=volume, modelName="airway", device="cpu"))
    from_dict = logic.parameters_from({"input_volume": volume, "model_name": "airway", "device": "cpu"})
    from_camel_dict = logic.parameters_from({"inputVolume": volume, "modelName": "airway", "device": "cpu"})
    assert from_node == from_dict == from_camel_dict == ModuleParameters(volume, "airway", "cpu")
    same = ModuleParameters()
    assert logic.parameters_from(same) is same
    assert logic.parameters_from(SimpleNamespace()) == ModuleParameters()


def test_fill_defaults(logic):
    node = SimpleNamespace(inputVolume=None, modelName="", device="")
    assert logic.fill_defaults(node) == {"model_name": "lctfound-cpu-tiny", "device": AUTO_DEVICE}
    assert (node.modelName, node.device) == ("lctfound-cpu-tiny", "auto")
    assert logic.fill_defaults(node) == {}

    chosen = SimpleNamespace(inputVolume=None, modelName="airway", device="cpu")
    logic.fill_defaults(chosen)
    assert (chosen.modelName, chosen.device) == ("airway", "cpu")

    parameters = ModuleParameters()
    logic.fill_defaults(parameters)
    assert parameters.model_name == "lctfound-cpu-tiny"

    mapping = {"modelName": "", "device": "auto"}
    logic.fill_defaults(mapping)
    assert mapping == {"modelName": "lctfound-cpu-tiny", "device": "auto"}


def test_no_model_no_default(clock):
    logic = ModuleLogicBase(list_models=lambda **_: [], available_devices=lambda: ["cpu"])
    node = SimpleNamespace(inputVolume=None, modelName="", device="auto")
    assert logic.fill_defaults(node) == {}
    assert node.modelName == ""


def test_check_input_volume(logic, tmp_path):
    import numpy as np

    existing = tmp_path / "ct.nii.gz"
    existing.write_bytes(b"")
    assert logic.check_input_volume(None) == "Select an input volume."
    assert logic.check_input_volume("  ") == "Select an input volume."
    assert logic.check_input_volume(FakeVolume(image_data=None)) == "The input volume has no image data."
    assert logic.check_input_volume(FakeVolume()) == ""
    assert logic.check_input_volume(str(existing)) == ""
    assert logic.check_input_volume(existing) == ""
    assert logic.check_input_volume(tmp_path / "missing.nrrd").startswith("Input file not found")
    assert logic.check_input_volume(np.zeros((2, 2, 2))) == ""


def test_problems_come_in_order(logic):
    parameters = ModuleParameters(input_volume=None, model_name="", device="tpu")
    assert logic.parameter_problems(parameters) == [
        "Select an input volume.",
        "Select a model.",
        "Unknown device 'tpu'; choose one of: auto, cpu.",
    ]
    assert logic.first_problem(parameters) == "Select an input volume."
    parameters.input_volume = FakeVolume()
    assert logic.first_problem(parameters) == "Select a model."
    parameters.model_name = "airway"
    assert logic.first_problem(parameters).startswith("Unknown device")
    parameters.device = "auto"
    assert logic.first_problem(parameters) == ""


def test_selection_summary_names_model_source_preset_and_device(logic):
    node = SimpleNamespace(inputVolume=None, modelName="airway", device="cpu")
    assert logic.selection_summary(node) == "Select an input volume."
    node.inputVolume = FakeVolume()
    assert logic.selection_summary(node) == "Model airway (user, preset lctfound) on CPU."
    node.modelName, node.device = "lctfound-cpu-tiny", "auto"
    assert logic.selection_summary(node) == "Model lctfound-cpu-tiny (built-in, preset lctfound) on Automatic (cpu)."
    gpu = ModuleLogicBase(list_models=lambda **_: logic.models(), available_devices=lambda: ["cuda", "cpu"])
    node.device = "cuda"
    assert gpu.selection_summary(node).endswith("on NVIDIA GPU 0 (cuda).")


@pytest.mark.parametrize("device, env", [("cpu", {"CUDA_VISIBLE_DEVICES": "-1"}), (" CPU ", {"CUDA_VISIBLE_DEVICES": "-1"}),
                                         ("cuda:1", {"CUDA_VISIBLE_DEVICES": "1"}), ("cuda", {}), ("auto", {}),
                                         ("", {}), (None, {}), ("mps", {})])
def test_device_environment(device, env):
    assert device_environment(device) == env


@pytest.mark.mrml
def test_real_mrml_nodes_are_duck_typed(logic, tmp_path):
    """The checks work on slicer-core nodes without the logic importing slicer itself."""
    slicer = pytest.importorskip("slicer")
    import numpy as np
    import slicer.util  # noqa: F401, F811

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert logic.check_input_volume(volume) == "The input volume has no image data."
    node = SimpleNamespace(inputVolume=volume, modelName="airway", device="cpu")
    assert logic.selection_summary(node) == "The input volume has no image data."
    slicer.util.updateVolumeFromArray(volume, np.zeros((3, 4, 5), dtype=np.int16))
    assert logic.check_input_volume(volume) == ""
    assert logic.selection_summary(node) == "Model airway (user, preset lctfound) on CPU."

    train = TrainModuleLogic(list_models=lambda **_: logic.models(), available_devices=lambda: ["cpu"],
                             runs_root=tmp_path)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    empty.SetName("empty")
    parameters = {"dataSource": "volumes", "trainingVolumes": [volume, empty], "newModelName": "x"}
    assert train.check_data(train.parameters_from(parameters)) == "Volume 'empty' has no image data."
    parameters["trainingVolumes"] = [volume]
    assert train.check_data(train.parameters_from(parameters)) == ""


# ---------------------------------------------------------------------------------------------
# Run-state machine
# ---------------------------------------------------------------------------------------------


def test_transition_table_is_complete():
    assert set(TRANSITIONS) == set(RunState)
    for state in RunState:
        assert RunState.RUNNING in TRANSITIONS[state] or state.busy
        assert RunState.IDLE in TRANSITIONS[state] or state.busy
    assert TRANSITIONS[RunState.RUNNING] >= {RunState.FINISHED, RunState.CANCELLING, RunState.FAILED}
    assert RunState.CANCELLED in TRANSITIONS[RunState.CANCELLING]
    assert [state.value for state in RunState] == ["Idle", "Running", "Finished", "Cancelling", "Cancelled", "Failed"]
    assert [state for state in RunState if state.busy] == [RunState.RUNNING, RunState.CANCELLING]
    assert [state for state in RunState if state.ended] == [RunState.FINISHED, RunState.CANCELLED, RunState.FAILED]


@pytest.mark.parametrize("method", ["finish", "mark_cancelled"])
def test_cannot_end_a_run_that_did_not_start(logic, method):
    with pytest.raises(InvalidTransition):
        getattr(logic, method)()
    with pytest.raises(InvalidTransition):
        logic.fail("x")
    assert logic.state is RunState.IDLE


def test_successful_run_reports_every_step(logic, clock):
    status = logic.begin("segmenting")
    assert status.summary() == "Running: segmenting"
    clock.now += 2
    logic.report_progress(1, 4, "loading model")
    assert logic.status().summary() == "Running: loading model (1/4, 25%)"
    assert logic.status().elapsed_s == pytest.approx(2.0)
    clock.now += 2
    logic.report_progress(4, 4, "writing labels")
    logic.finish("3 segments")
    assert logic.status_summary() == "Finished in 4.0 s: 3 segments"
    clock.now += 100  # elapsed time stops at the end of the run
    assert logic.status().elapsed_s == pytest.approx(4.0)


def test_eta_comes_from_the_rate_since_the_first_report(logic, clock):
    logic.begin("training")
    logic.report_progress(0, 110, "model built", rate_sample=False)  # the total is known; no rate yet
    assert logic.status().total == 110 and logic.status().message == "model built"
    clock.now += 30  # start-up time is not part of the rate
    logic.report_progress(10, 110)
    assert logic.status().eta_s is None  # one report: no rate yet
    clock.now += 20
    logic.report_progress(20, 110, "step 20")
    assert logic.status().eta_s == pytest.approx(180.0)  # 10 steps per 20 s, 90 steps left
    assert logic.status().summary() == "Running: step 20 (20/110, 18%, about 3 min 00 s left)"
    logic.report_progress(30, 110, at=clock.now + 20)  # an event's own timestamp wins
    assert logic.status().eta_s == pytest.approx(160.0)
    assert logic.progress_bar_state() == ProgressBarState(True, 27, 100, "27%, about 2 min 40 s left")
    logic.request_cancel()
    assert logic.status().eta_s is None and "left" not in logic.status().summary()
    logic.mark_cancelled()
    assert logic.status().eta_s is None
    logic.begin("again")
    logic.report_progress(5, 10)
    assert logic.status().eta_s is None  # a new run starts a new rate


def test_failure_keeps_the_message_on_one_line(logic, clock):
    logic.begin()
    clock.now += 1
    logic.fail(LCTfoundError("model 'x' does not fit\n this volume"))
    status = logic.status()
    assert status.state is RunState.FAILED
    assert status.error == "model 'x' does not fit this volume"
    assert status.summary() == "Failed after 1.0 s: model 'x' does not fit this volume"
    logic.begin()
    logic.fail(ValueError("invalid literal"))
    assert logic.status().error == "ValueError: invalid literal"
    logic.begin()
    logic.fail("the process ended\nwith exit code 1")
    assert logic.status().error == "the process ended with exit code 1"


def test_cancel_request_then_cancelled(logic):
    logic.begin()
    logic.report_progress(1, 10, "step 1")
    assert logic.request_cancel("stopping after the current step") is True
    assert logic.state is RunState.CANCELLING
    logic.report_progress(2, 10, "step 2")  # numbers still move, the message stays
    assert logic.status().message == "stopping after the current step" and logic.status().done == 2
    assert logic.request_cancel() is False  # already cancelling
    logic.mark_cancelled("checkpoint kept")
    assert logic.status().summary().startswith("Cancelled after") and logic.status().summary().endswith("checkpoint kept")


def test_work_may_finish_before_the_cancel_reaches_it(logic):
    logic.begin()
    logic.request_cancel()
    logic.finish("done anyway")
    assert logic.state is RunState.FINISHED


def test_one_run_at_a_time(logic):
    logic.begin("first")
    with pytest.raises(LCTfoundError, match="already running"):
        logic.begin("second")
    with pytest.raises(InvalidTransition):
        logic.reset()
    logic.finish()
    logic.begin("second")  # a new run after the end
    assert logic.status().done == 0 and logic.status().message == "second"


def test_request_cancel_when_nothing_runs(logic):
    assert logic.request_cancel() is False
    assert logic.cancel() is False
    assert logic.state is RunState.IDLE


def test_late_progress_is_ignored(logic):
    logic.begin()
    logic.finish("ok")
    logic.report_progress(5, 5, "late")
    assert logic.status().summary() == "Finished in 0.0 s: ok"


def test_reset_goes_back_to_idle(logic, clock):
    logic.begin()
    logic.report_progress(1, 2)
    logic.finish()
    logic.reset()
    status = logic.status()
    assert status == ModuleStatus(RunState.IDLE, "", 0, 0, "", None, None)
    assert status.summary() == "Idle"


@pytest.mark.parametrize(
    "seconds, text", [(0.04, "0.0 s"), (59.94, "59.9 s"), (61, "1 min 01 s"), (3725, "1 h 02 min")]
)
def test_durations_in_summaries(seconds, text):
    assert ModuleStatus(RunState.FINISHED, elapsed_s=seconds).summary() == f"Finished in {text}"


def test_status_numbers():
    assert ModuleStatus(RunState.RUNNING, done=3, total=0).fraction is None
    assert ModuleStatus(RunState.RUNNING, done=3, total=4).percent == 75
    assert ModuleStatus(RunState.RUNNING, done=9, total=4).fraction == 1.0
    assert ModuleStatus(RunState.CANCELLING, "stopping").summary() == "Cancelling: stopping"
    assert ModuleStatus(RunState.FAILED).summary() == "Failed: unknown error"
    assert ModuleStatus(RunState.IDLE, "ready").summary() == "Idle: ready"


def test_progress_bar_state(logic):
    assert logic.progress_bar_state() == ProgressBarState(visible=False, text="Idle")
    logic.begin("loading model")
    assert logic.progress_bar_state() == ProgressBarState(True, 0, 0, "loading model")  # busy, amount unknown
    logic.report_progress(1, 3, "slice 1")
    assert logic.progress_bar_state() == ProgressBarState(True, 33, 100, "33%")
    logic.finish()
    assert not logic.progress_bar_state().visible


# ---------------------------------------------------------------------------------------------
# Jobs drive the run state (a scripted stand-in for `lctfound.jobs.Job`; real jobs: test_jobs.py,
# test_train_logic.py)
# ---------------------------------------------------------------------------------------------


class ScriptedJob:
    """Hands out prepared batches of events, one batch per poll()."""

    def __init__(self, *batches):
        self.batches = list(batches)
        self.cancelled = False

    def poll(self):
        return self.batches.pop(0) if self.batches else []

    def cancel(self, timeout=5.0):
        self.cancelled = True
        self.batches.append([{"event": "exit", "state": "cancelled", "returncode": -15, "error": ""}])
        return True


class CountingLogic(ModuleLogicBase):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen, self.finish_error = [], None

    def handle_event(self, event):
        self.seen.append(event["event"])
        if event["event"] == "progress":
            self.report_progress(event["done"], event["total"], "working")

    def on_job_finished(self, job):
        if self.finish_error:
            raise self.finish_error
        return "all done"

    def cancelled_message(self, job):
        return "stopped"


def run_with(logic, job):
    logic.job = job
    logic.begin("started")
    events = []
    for _ in range(10):
        events += logic.poll()
    return events


@pytest.fixture
def counting(models, clock):
    return CountingLogic(list_models=lambda **_: models, available_devices=lambda: ["cpu"], clock=clock)


def test_poll_without_a_job(counting):
    assert counting.poll() == [] and counting.state is RunState.IDLE


def test_job_events_update_progress_and_exit_finishes(counting):
    job = ScriptedJob([{"event": "start"}, {"event": "progress", "done": 1, "total": 2}],
                      [{"event": "log", "text": "hello"}, {"event": "exit", "state": "finished", "returncode": 0, "error": ""}])
    counting.job = job
    counting.begin("started")
    assert [e["event"] for e in counting.poll()] == ["start", "progress"]
    assert counting.status().summary() == "Running: working (1/2, 50%)"
    assert [e["event"] for e in counting.poll()] == ["log", "exit"]
    assert counting.seen == ["start", "progress", "log"]  # exit is the logic's own business
    assert counting.state is RunState.FINISHED and counting.status().message == "all done"


def test_failed_job_and_failed_follow_up(counting):
    run_with(counting, ScriptedJob([{"event": "exit", "state": "failed", "returncode": 2, "error": "bad data folder"}]))
    assert counting.state is RunState.FAILED and counting.status().error == "bad data folder"

    counting.finish_error = LCTfoundError("model name 'x' is already taken")
    run_with(counting, ScriptedJob([{"event": "exit", "state": "finished", "returncode": 0, "error": ""}]))
    assert counting.state is RunState.FAILED and counting.status().error == "model name 'x' is already taken"


def test_cancel_goes_through_cancelling_to_cancelled(counting):
    job = ScriptedJob([{"event": "progress", "done": 1, "total": 5}])
    counting.job = job
    counting.begin("started")
    counting.poll()
    assert counting.cancel() is True
    assert counting.state is RunState.CANCELLING
    counting._cancel_thread.join(5)
    assert job.cancelled
    counting.poll()
    assert counting.state is RunState.CANCELLED and counting.status().summary().endswith(": stopped")
    assert counting.cancel() is False


def test_start_job_refuses_while_busy(counting):
    counting.begin()
    with pytest.raises(LCTfoundError, match="already running"):
        counting.start_job(["--version"])


@pytest.mark.parametrize("cls, task", [(SegmentationModuleLogic, "segmentation"), (EnhanceModuleLogic, "enhancement"),
                                       (TrainModuleLogic, "training")])
def test_module_logics_are_module_logic_bases(cls, task):
    logic = cls(list_models=lambda **_: [], available_devices=lambda: ["cpu"])
    assert isinstance(logic, ModuleLogicBase)
    assert logic.task_name == task
    assert logic.status_summary() == "Idle"
    assert logic.choices("device")[0].value == AUTO_DEVICE

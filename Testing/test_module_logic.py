"""Tests of the Qt-free module logic base (`lctfound.logic.base`): choices, parameter checks,
the run-state machine, status texts and the widget states derived from them."""

from __future__ import annotations

import subprocess
import sys
import threading
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from lctfound.errors import Cancelled, LCTfoundError
from lctfound.logic import (
    AUTO_DEVICE,
    TRANSITIONS,
    ButtonState,
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


def test_subclasses_can_filter_models(models):
    class OnlyUserModels(ModuleLogicBase):
        def accepts_model(self, entry):
            return entry.source == "user"

    logic = OnlyUserModels(list_models=lambda **_: models, available_devices=lambda: ["cpu"])
    assert [choice.value for choice in logic.model_choices()] == ["airway"]
    assert logic.check_model("lctfound-cpu-tiny") == "Model 'lctfound-cpu-tiny' is not installed here."


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


def test_cannot_apply_reasons_come_in_order(logic):
    parameters = ModuleParameters(input_volume=None, model_name="", device="tpu")
    assert logic.parameter_problems(parameters) == [
        "Select an input volume.",
        "Select a model.",
        "Unknown device 'tpu'; choose one of: auto, cpu.",
    ]
    assert logic.cannot_apply_reason(parameters) == "Select an input volume."
    parameters.input_volume = FakeVolume()
    assert logic.cannot_apply_reason(parameters) == "Select a model."
    parameters.model_name = "airway"
    assert logic.cannot_apply_reason(parameters).startswith("Unknown device")
    assert not logic.can_apply(parameters)
    parameters.device = "auto"
    assert logic.cannot_apply_reason(parameters) == ""
    assert logic.can_apply(parameters)


@pytest.mark.mrml
def test_real_mrml_nodes_are_duck_typed(logic):
    """The checks work on slicer-core nodes without the logic importing slicer itself."""
    slicer = pytest.importorskip("slicer")
    import numpy as np
    import slicer.util  # noqa: F401

    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    assert logic.check_input_volume(volume) == "The input volume has no image data."
    slicer.util.updateVolumeFromArray(volume, np.zeros((3, 4, 5), dtype=np.int16))
    assert logic.check_input_volume(volume) == ""

    other = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    enhance = EnhanceModuleLogic(list_models=lambda **_: logic.models(), available_devices=lambda: ["cpu"])
    node = SimpleNamespace(inputVolume=volume, modelName="airway", device="cpu", outputVolume=volume)
    assert "must differ" in enhance.cannot_apply_reason(node)
    node.outputVolume = other
    assert enhance.cannot_apply_reason(node) == ""

    train = TrainModuleLogic(list_models=lambda **_: logic.models(), available_devices=lambda: ["cpu"])
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    node = SimpleNamespace(inputVolume=volume, inputSegmentation=segmentation, modelName="airway", device="cpu",
                           newModelName="new-head")
    assert train.cannot_apply_reason(node) == "The training segmentation has no segments."


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


def test_successful_run_notifies_every_step(logic, clock):
    seen: list[ModuleStatus] = []
    logic.add_status_callback(seen.append)
    logic.add_status_callback(seen.append)  # registered once

    def work(progress):
        clock.now += 2
        progress.update(1, 4, "loading model")
        clock.now += 2
        progress.update(4, 4, "writing labels")
        return 42

    assert logic.run(work, "segmenting", finished_message="3 segments") == 42
    assert [status.state for status in seen] == [RunState.RUNNING] * 3 + [RunState.FINISHED]
    assert seen[0].summary() == "Running: segmenting"
    assert seen[1].summary() == "Running: loading model (1/4, 25%)"
    assert seen[1].elapsed_s == pytest.approx(2.0)
    assert seen[-1].summary() == "Finished in 4.0 s: 3 segments"
    assert logic.status_summary() == "Finished in 4.0 s: 3 segments"
    clock.now += 100  # elapsed time stops at the end of the run
    assert logic.status().elapsed_s == pytest.approx(4.0)


def test_failure_keeps_the_message_and_reraises(logic, clock):
    def work(progress):
        clock.now += 1
        raise LCTfoundError("model 'x' does not fit\n this volume")

    with pytest.raises(LCTfoundError):
        logic.run(work)
    status = logic.status()
    assert status.state is RunState.FAILED
    assert status.error == "model 'x' does not fit this volume"
    assert status.summary() == "Failed after 1.0 s: model 'x' does not fit this volume"

    with pytest.raises(ValueError):
        logic.run(lambda progress: int("x"))
    assert logic.status().error.startswith("ValueError: invalid literal")


def test_cancel_from_inside_the_work(logic):
    """As in Slicer, where a Cancel click is handled while the work pumps events."""

    def work(progress):
        progress.update(1, 10, "step 1")
        assert logic.request_cancel() is True
        assert logic.state is RunState.CANCELLING
        assert logic.apply_button_state(None) == ButtonState("Cancelling…", False, "Waiting for the current step to stop")
        progress.update(2, 10, "step 2")  # numbers still move, the message stays
        assert logic.status().message == "stopping after the current step"
        progress.check_cancelled()
        pytest.fail("check_cancelled must raise")

    with pytest.raises(Cancelled):
        logic.run(work)
    assert logic.state is RunState.CANCELLED
    assert logic.status().summary().startswith("Cancelled after")
    assert logic.cancel_token.cancelled


def test_work_that_finishes_before_noticing_the_cancel(logic):
    def work(progress):
        logic.request_cancel()
        return "done anyway"

    assert logic.run(work) == "done anyway"
    assert logic.state is RunState.FINISHED


def test_cancel_from_another_thread(logic):
    started, may_stop = threading.Event(), threading.Event()
    outcome = {}

    def work(progress):
        started.set()
        while True:
            may_stop.wait(0.01)
            progress.check_cancelled()

    def runner():
        try:
            logic.run(work)
        except Cancelled as error:
            outcome["error"] = error

    thread = threading.Thread(target=runner)
    thread.start()
    assert started.wait(5)
    assert logic.status().busy
    assert logic.request_cancel()
    thread.join(5)
    assert not thread.is_alive()
    assert isinstance(outcome["error"], Cancelled)
    assert logic.state is RunState.CANCELLED


def test_keyboard_interrupt_counts_as_cancelled(logic):
    def work(progress):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        logic.run(work)
    assert logic.state is RunState.CANCELLED
    assert logic.status().message == "interrupted"


def test_one_run_at_a_time(logic):
    logic.start("first")
    with pytest.raises(LCTfoundError, match="already running"):
        logic.start("second")
    with pytest.raises(InvalidTransition):
        logic.reset()
    logic.finish()
    logic.start("second")  # a new run after the end
    assert logic.status().done == 0 and logic.status().message == "second"


def test_request_cancel_when_nothing_runs(logic):
    assert logic.request_cancel() is False
    assert logic.state is RunState.IDLE


def test_late_progress_is_ignored(logic):
    progress = logic.start()
    logic.finish("ok")
    progress.update(5, 5, "late")
    assert logic.status().summary() == "Finished in 0.0 s: ok"


def test_reset_goes_back_to_idle(logic, clock):
    logic.run(lambda progress: None)
    logic.reset()
    status = logic.status()
    assert status == ModuleStatus(RunState.IDLE, "", 0, 0, "", None)
    assert status.summary() == "Idle"


def test_broken_callback_does_not_break_the_run(logic):
    seen = []

    def broken(status):
        raise RuntimeError("widget deleted")

    logic.add_status_callback(broken)
    logic.add_status_callback(seen.append)
    assert logic.run(lambda progress: "ok") == "ok"
    assert logic.state is RunState.FINISHED and len(seen) == 2
    logic.remove_status_callback(seen.append)
    logic.remove_status_callback(seen.append)  # removing twice is harmless
    logic.run(lambda progress: None)
    assert len(seen) == 2


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


# ---------------------------------------------------------------------------------------------
# Widget states
# ---------------------------------------------------------------------------------------------


def test_apply_button_state(logic):
    assert logic.apply_button_state(None) == ButtonState("Apply", False, "Nothing selected yet.")
    assert logic.apply_button_state(ModuleParameters()) == ButtonState("Apply", False, "Select an input volume.")
    assert logic.apply_button_state(ready_parameters()) == ButtonState("Apply", True, "Run processing")
    logic.start()
    assert logic.apply_button_state(ready_parameters()) == ButtonState("Cancel", True, "Stop the running processing")
    logic.fail("x")
    assert logic.apply_button_state(ready_parameters()).text == "Apply"


def test_apply_button_state_reads_a_parameter_node(logic):
    node = SimpleNamespace(inputVolume=FakeVolume(), modelName="airway", device="cpu")
    assert logic.apply_button_state(node).enabled


def test_progress_bar_state(logic):
    assert logic.progress_bar_state() == ProgressBarState(visible=False, text="Idle")
    progress = logic.start("loading model")
    assert logic.progress_bar_state() == ProgressBarState(True, 0, 0, "loading model")  # busy, amount unknown
    progress.update(1, 3, "slice 1")
    assert logic.progress_bar_state() == ProgressBarState(True, 33, 100, "33%")
    logic.finish()
    assert not logic.progress_bar_state().visible


# ---------------------------------------------------------------------------------------------
# apply() and process()
# ---------------------------------------------------------------------------------------------


def test_apply_refuses_incomplete_parameters_without_changing_state(logic):
    with pytest.raises(LCTfoundError, match="Select an input volume"):
        logic.apply(ModuleParameters())
    assert logic.state is RunState.IDLE


def test_apply_without_a_task_fails_clearly(logic):
    with pytest.raises(LCTfoundError, match="not available in this version"):
        logic.apply(ready_parameters())
    assert logic.state is RunState.FAILED


def test_apply_returns_none_when_cancelled(models):
    class Cancelling(SegmentationModuleLogic):
        def process(self, parameters, progress):
            self.request_cancel()
            progress.check_cancelled()

    logic = Cancelling(list_models=lambda **_: models, available_devices=lambda: ["cpu"])
    assert logic.apply(ready_parameters()) is None
    assert logic.state is RunState.CANCELLED
    with pytest.raises(Cancelled):
        logic.apply(ready_parameters(), raise_on_cancel=True)


def test_apply_hands_typed_parameters_to_process(models):
    received = []

    class Recording(SegmentationModuleLogic):
        def process(self, parameters, progress):
            received.append(parameters)
            progress.update(1, 1)
            return "ok"

    logic = Recording(list_models=lambda **_: models, available_devices=lambda: ["cpu"])
    node = SimpleNamespace(inputVolume=FakeVolume(), modelName="airway", device="cpu", outputSegmentation="seg")
    assert logic.apply(node) == "ok"
    assert type(received[0]).__name__ == "SegmentationParameters"
    assert received[0].output_segmentation == "seg"


@pytest.mark.parametrize("cls, task", [(SegmentationModuleLogic, "segmentation"), (EnhanceModuleLogic, "enhancement"),
                                       (TrainModuleLogic, "training")])
def test_module_logics_are_module_logic_bases(cls, task):
    logic = cls(list_models=lambda **_: [], available_devices=lambda: ["cpu"])
    assert isinstance(logic, ModuleLogicBase)
    assert logic.task_name == task
    assert issubclass(logic.parameters_class, ModuleParameters)
    assert logic.status_summary() == "Idle"

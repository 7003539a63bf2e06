"""`TrainModuleLogic`: the LCTfoundTrain panel's behaviour without Slicer — parameters, the
pretraining command, real tiny runs started, followed, cancelled and resumed through the logic,
model registration, and export of loaded volumes (slicer-core)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

import data_factory
from lctfound.errors import LCTfoundError
from lctfound.io.volume import read_volume, write_volume
from lctfound.logic import RunState, TrainModuleLogic, TrainParameters
from lctfound.logic.train import JOB_FILE, MODEL_NAME_PATTERN, PRESETS, checkpoint_steps, chosen_path


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("train-cts")
    write_volume(data_factory.synthetic_ct(seed=1), folder / "a.nrrd")
    return folder


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private cache (user models, runs) and one thread per child: the machine is small and shared."""
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "cache"


@pytest.fixture
def logic(cache):
    return TrainModuleLogic(available_devices=lambda: ["cpu"])


def tiny(ct_folder, **values) -> TrainParameters:
    base = dict(data_source="folder", data_folder=str(ct_folder), resolution=32, patch_size=0, batch_size=2,
                max_steps=3, checkpoint_every=2, ema_decay=0.0, num_samples=0, log_every=1, device="cpu",
                new_model_name="my-pretrained")
    base.update(values)
    return TrainParameters(**base)


def poll_until(logic, done, timeout=180.0) -> list[dict]:
    """What the panel's QTimer does: poll every 50 ms until ``done()``."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += logic.poll()
        if done():
            return events
        time.sleep(0.05)
    if logic.job is not None:
        logic.job.cancel(timeout=1)
    pytest.fail(f"timed out; state {logic.status_summary()}; stderr: {logic.job.stderr_tail if logic.job else ''}")


def ended(logic):
    return lambda: logic.state.ended


# ---------------------------------------------------------------------------------------------
# Parameters, choices, command (no child process)
# ---------------------------------------------------------------------------------------------


def test_fixed_choices_match_the_engine():
    from lctfound.models.presets import PRESETS as ENGINE_PRESETS
    from lctfound.models.registry import MODEL_NAME_PATTERN as REGISTRY_PATTERN

    logic = TrainModuleLogic(list_models=lambda **_: [], available_devices=lambda: ["cpu"])
    assert sorted(choice.value for choice in logic.choices("preset")) == sorted(ENGINE_PRESETS)
    assert logic.choices("preset") == list(PRESETS) and PRESETS[0].value == "cpu-tiny"  # the default first
    assert [choice.value for choice in logic.choices("task")] == ["pretrain"]  # fine-tuning is not offered yet
    assert [choice.value for choice in logic.choices("dataSource")] == ["folder", "volumes"]
    assert [choice.value for choice in logic.choices("device")] == ["auto", "cpu"]
    assert MODEL_NAME_PATTERN.pattern == REGISTRY_PATTERN.pattern


def test_defaults_are_complete_except_the_data(logic, tmp_path):
    node = TrainParameters()
    assert logic.fill_defaults(node) == {"new_model_name": "lctfound-pretrained"}
    assert logic.parameter_problems(node) == ["Choose the folder with the training CT volumes."]
    node.data_folder = tmp_path
    assert logic.parameter_problems(node) == []
    assert logic.start_button_state(node).enabled
    node.data_folder = "."  # what an empty Slicer Path parameter holds
    assert not logic.start_button_state(node).enabled
    assert logic.start_button_state(node).tooltip == "Choose the folder with the training CT volumes."


def test_parameter_problems(logic, tmp_path, cache):
    p = TrainParameters(data_folder=tmp_path / "missing", task="segmentation", preset="huge", resolution=40,
                        patch_size=48, batch_size=0, max_steps=0, learning_rate=0.0, checkpoint_every=0, ema_decay=1.0,
                        device="cuda", new_model_name="a b")
    problems = logic.parameter_problems(p)
    assert problems[0] == "Task 'segmentation' is not available; choose one of: pretrain."
    assert problems[1] == f"Training data folder not found: {tmp_path / 'missing'}"
    joined = " | ".join(problems)
    for text in ("Unknown preset 'huge'", "Resolution must be a multiple of 16 (got 40)", "Patch size must be 0",
                 "Batch size must be at least 1", "Steps must be at least 1", "Checkpoint interval must be at least 1",
                 "Learning rate must be positive", "EMA decay must lie in [0, 1)", "Device 'cuda' is not available",
                 "Model name 'a b' may only contain"):
        assert text in joined, text
    assert logic.check_data(TrainParameters(data_source="volumes")) == "Select the loaded volumes to train on."

    (cache / "models" / "taken").mkdir(parents=True)
    assert "already exists" in logic.check_new_model_name("taken")
    assert logic.suggest_model_name("taken") == "taken-2"
    assert logic.check_new_model_name("x" * 65).startswith("Model name")

    busy = tmp_path / "busy"
    (busy / "pretrain").mkdir(parents=True)
    problems = logic.parameter_problems(TrainParameters(data_folder=tmp_path, run_folder=busy, new_model_name="ok"))
    assert problems == [f"Run folder {busy} is not empty; Resume it or choose a new folder."]


def test_parameters_from_a_camel_case_parameter_node(logic, tmp_path):
    from types import SimpleNamespace

    node = SimpleNamespace(dataSource="folder", dataFolder=tmp_path, trainingVolumes=[], task="pretrain", preset="cpu-tiny",
                           resolution=64, patchSize=0, batchSize=4, maxSteps=10, learningRate=1e-3, checkpointEvery=5,
                           emaDecay=0.0, device="cpu", runFolder=Path("."), newModelName="n")
    p = logic.parameters_from(node)
    assert (p.resolution, p.batch_size, p.max_steps, p.learning_rate, p.new_model_name) == (64, 4, 10, 1e-3, "n")
    assert chosen_path(p.run_folder) is None and chosen_path(p.data_folder) == tmp_path


def test_command(logic, tmp_path):
    p = tiny(tmp_path, patch_size=16, ema_decay=0.99, learning_rate=3e-4)
    args = logic.command(p, tmp_path / "data", tmp_path / "run" / "pretrain")
    assert args[:5] == ["train", "pretrain", str(tmp_path / "data"), "--output", str(tmp_path / "run" / "pretrain")]
    assert args[-1] == "--events"
    pairs = dict(zip(args[5:-1:2], args[6:-1:2]))
    assert pairs == {"--preset": "cpu-tiny", "--resolution": "32", "--batch-size": "2", "--max-steps": "3",
                     "--lr": "0.0003", "--checkpoint-every": "2", "--num-samples": "0", "--log-every": "1",
                     "--name": "my-pretrained", "--patch-size": "16", "--ema": "0.99"}
    plain = logic.command(tiny(tmp_path), tmp_path, tmp_path / "out")
    assert "--patch-size" not in plain and "--ema" not in plain  # 0 means off


def test_invalid_parameters_start_nothing(logic, cache):
    with pytest.raises(LCTfoundError, match="Choose the folder"):
        logic.start(TrainParameters(new_model_name="x"))
    assert logic.state is RunState.IDLE and logic.job is None
    assert not (cache / "runs").exists()


def test_failed_export_removes_the_new_run_folder(logic, cache, monkeypatch):
    def broken(nodes, folder):
        folder.mkdir(parents=True)
        raise LCTfoundError("disk full")

    monkeypatch.setattr(logic, "export_volumes", broken)
    with pytest.raises(LCTfoundError, match="disk full"):
        logic.start(TrainParameters(data_source="volumes", training_volumes=[object()], new_model_name="x"))
    assert list((cache / "runs").iterdir()) == [] and logic.job is None


def test_resume_problems(logic, tmp_path):
    assert logic.resume_problem(None) == "No run to resume: choose its run folder."
    assert "has no job.json" in logic.resume_problem(tmp_path)
    (tmp_path / JOB_FILE).write_text(json.dumps({"task": "pretrain", "args": [], "new_model_name": "fresh"}))
    assert logic.resume_problem(tmp_path) == "Nothing to resume: the run stopped before its first checkpoint."
    assert not logic.resume_button_state(TrainParameters(run_folder=tmp_path)).enabled
    (tmp_path / "pretrain" / "checkpoints" / "step-0000002" / "training").mkdir(parents=True)
    (tmp_path / "pretrain" / "checkpoints" / "step-0000002" / "training" / "trainer_state.json").write_text("{}")
    (tmp_path / "pretrain" / "checkpoints" / "step-0000004").mkdir()  # incomplete: ignored
    assert checkpoint_steps(tmp_path / "pretrain") == [2]
    assert logic.resume_problem(tmp_path) == ""
    assert logic.resume_button_state(TrainParameters(run_folder=tmp_path)).enabled


def test_events_become_progress_eta_and_loss_history(logic):
    """ETA from the events' own timestamps: start-up before the first step does not count."""
    logic.begin("starting")
    logic.handle_event({"event": "start", "total_steps": 100, "data": "1 source(s)", "device": "cpu", "received_at": 10.0})
    status = logic.status()
    assert (status.done, status.total, status.message, status.eta_s) == (0, 100, "training on 1 source(s) (cpu)", None)
    logic.handle_event({"event": "metrics", "step": 10, "total_steps": 100, "loss": 0.5, "received_at": 50.0})
    assert logic.status().eta_s is None
    logic.handle_event({"event": "metrics", "step": 20, "total_steps": 100, "loss": 0.4, "received_at": 60.0})
    status = logic.status()
    assert status.eta_s == pytest.approx(80.0) and status.message == "step 20/100, loss 0.4000"
    assert logic.progress_bar_state().text == "20%, about 1 min 20 s left"
    logic.handle_event({"event": "checkpoint", "step": 20, "path": "x", "received_at": 61.0})
    logic.handle_event({"event": "warning", "message": "out of memory; micro-batch 4", "received_at": 62.0})
    logic.handle_event({"event": "log", "text": "a line", "received_at": 63.0})
    assert logic.loss_history == [(10, 0.5), (20, 0.4)]
    assert logic.last_checkpoint_step == 20 and logic.warnings == ["out of memory; micro-batch 4"]


# ---------------------------------------------------------------------------------------------
# Real runs through the logic
# ---------------------------------------------------------------------------------------------


def test_run_finishes_and_registers_the_model(logic, ct_folder, cache):
    from lctfound.models.registry import list_models

    job = logic.start(tiny(ct_folder))
    assert logic.state is RunState.RUNNING and logic.job is job
    run = logic.run_folder
    assert run.parent == cache / "runs" and run.name.startswith("my-pretrained-")
    assert not logic.start_button_state(tiny(ct_folder, new_model_name="other")).enabled
    with pytest.raises(LCTfoundError, match="already running"):
        logic.start(tiny(ct_folder, new_model_name="other"))

    seen_running = []
    events = poll_until(logic, lambda: seen_running.append(logic.status()) or logic.state.ended)
    assert logic.state is RunState.FINISHED, logic.status_summary() + "\n" + job.stderr_tail
    assert [e["event"] for e in events][-2:] == ["finished", "exit"]
    assert [step for step, _ in logic.loss_history] == [1, 2, 3]
    assert all(np.isfinite(loss) for _, loss in logic.loss_history)
    assert logic.last_checkpoint_step == 3
    assert any(s.total == 3 and s.done >= 1 for s in seen_running if s.state is RunState.RUNNING)
    assert logic.status().message == f"model 'my-pretrained' registered (3 steps, loss {logic.loss_history[-1][1]:.4f})"

    assert logic.registered_model == cache / "models" / "my-pretrained"
    assert "my-pretrained" in [entry.name for entry in list_models()]
    assert "my-pretrained" in [choice.value for choice in logic.choices("modelName")]  # the registry was re-read
    assert logic.loss_curve_png() == run / "pretrain" / "loss_curve.png"
    assert logic.loss_curve_png(run) == logic.loss_curve_png()
    info = json.loads((run / JOB_FILE).read_text())
    assert info["registered_model"] == str(logic.registered_model) and info["device"] == "cpu"
    assert logic.resume_problem(run).startswith("This run has finished")
    assert logic.suggest_model_name("my-pretrained") == "my-pretrained-2"


def test_cancel_keeps_the_checkpoint_and_resume_completes(logic, ct_folder, cache, tmp_path):
    params = tiny(ct_folder, max_steps=400, checkpoint_every=2, run_folder=tmp_path / "my-run")
    job = logic.start(params)
    assert psutil.Process(job.pid).environ().get("CUDA_VISIBLE_DEVICES") == "-1"  # device "cpu"
    poll_until(logic, lambda: logic.last_checkpoint_step is not None)
    assert logic.cancel_button_state().enabled and not logic.resume_button_state().enabled
    assert logic.cancel() is True
    assert logic.state is RunState.CANCELLING and not logic.cancel_button_state().enabled
    poll_until(logic, ended(logic), timeout=30)
    assert logic.state is RunState.CANCELLED, logic.status_summary()
    kept = checkpoint_steps(tmp_path / "my-run" / "pretrain")
    assert kept and logic.status().message == f"checkpoint of step {kept[-1]} kept; Resume continues from it"
    assert not psutil.pid_exists(job.pid) or psutil.Process(job.pid).status() == psutil.STATUS_ZOMBIE
    assert logic.registered_model is None and not (cache / "models" / "my-pretrained").exists()

    # Resume a shorter run: the same arguments, so change max-steps in job.json to keep the test short.
    info = json.loads((tmp_path / "my-run" / JOB_FILE).read_text())
    info["args"][info["args"].index("--max-steps") + 1] = str(kept[-1] + 2)
    (tmp_path / "my-run" / JOB_FILE).write_text(json.dumps(info))
    assert logic.resume_button_state().enabled  # the last run
    logic.resume(tmp_path / "my-run")
    assert logic.state is RunState.RUNNING and logic.last_checkpoint_step == kept[-1]
    assert [step for step, _ in logic.loss_history] == list(range(1, kept[-1] + 1))  # the curve so far
    poll_until(logic, ended(logic))
    assert logic.state is RunState.FINISHED, logic.status_summary() + "\n" + logic.job.stderr_tail
    assert [step for step, _ in logic.loss_history] == list(range(1, kept[-1] + 3))
    assert logic.registered_model == cache / "models" / "my-pretrained"


def test_failed_run_reports_the_one_line_error(logic, tmp_path, cache):
    (tmp_path / "empty").mkdir()
    logic.start(tiny(tmp_path / "empty"))
    poll_until(logic, ended(logic), timeout=120)
    assert logic.state is RunState.FAILED
    error = logic.status().error
    assert "no CT volumes or slice files found" in error and "\n" not in error
    assert logic.registered_model is None
    assert logic.resume_problem(logic.run_folder) == "Nothing to resume: the run stopped before its first checkpoint."


@pytest.mark.mrml
def test_loaded_volumes_are_exported_and_trained_on(logic, cache):
    pytest.importorskip("slicer")
    from lctfound.mrml import new_headless_scene, volume_node_from_ctvolume

    scene = new_headless_scene()
    ct = data_factory.synthetic_ct(seed=3)
    nodes = [volume_node_from_ctvolume(scene, ct, name="lung_seg"),  # a name the data indexer would skip
             volume_node_from_ctvolume(scene, data_factory.synthetic_ct(seed=4), name="second")]
    node = {"dataSource": "volumes", "trainingVolumes": nodes, "resolution": 32, "patchSize": 0, "batchSize": 2,
            "maxSteps": 2, "checkpointEvery": 2, "emaDecay": 0.0, "device": "cpu", "newModelName": "from-scene",
            "numSamples": 0, "logEvery": 1}
    logic.start(node)
    data = logic.run_folder / "data"
    assert sorted(path.name for path in data.iterdir()) == ["volume-001.nrrd", "volume-002.nrrd"]
    exported = read_volume(data / "volume-001.nrrd")
    assert np.array_equal(exported.array, ct.array)
    assert np.allclose(exported.ijk_to_ras(), ct.ijk_to_ras())
    info = json.loads((logic.run_folder / JOB_FILE).read_text())
    assert info["volumes"] == ["lung_seg", "second"] and info["data"] == str(data)
    poll_until(logic, ended(logic))
    assert logic.state is RunState.FINISHED, logic.status_summary() + "\n" + logic.job.stderr_tail
    assert logic.registered_model == cache / "models" / "from-scene"

"""`TrainModuleLogic`: the LCTfoundTrain panel's behaviour without Slicer — parameters, the
pretraining and fine-tuning commands, real tiny runs started, followed, cancelled and resumed
through the logic, model registration (backbones and task models), the one-line data problems,
and export of loaded volumes and segmentations (slicer-core)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from lctfound.models.registry import DEFAULT_MODEL_NAME

import data_factory
from lctfound.errors import LCTfoundError
from lctfound.io.volume import read_volume, write_volume
from lctfound.logic import RunState, TrainModuleLogic, TrainParameters
from lctfound.logic.base import ButtonState
from lctfound.logic.train import (CLASSIFICATION, JOB_FILE, MODEL_NAME_PATTERN, PRESETS, PRETRAIN, SEGMENTATION,
                                  checkpoint_steps, chosen_path, effective_learning_rate, set_volume_class_name)


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
    assert [choice.value for choice in logic.choices("task")] == ["pretrain", SEGMENTATION, CLASSIFICATION]
    assert [choice.value for choice in logic.choices("dataSource")] == ["folder", "volumes", "table"]
    for task, sources, modes in (("pretrain", ["folder", "volumes"], ["frozen", "adapter", "full"]),
                                 (SEGMENTATION, ["volumes", "folder"], ["frozen", "adapter", "full"]),
                                 (CLASSIFICATION, ["table", "volumes"], ["frozen", "full"])):
        p = TrainParameters(task=task)
        assert [choice.value for choice in logic.choices("dataSource", parameters=p)] == sources
        assert [choice.value for choice in logic.choices("mode", parameters=p)] == modes
    assert [choice.value for choice in logic.choices("segmentFilter")] == ["all", "reviewed"]
    assert logic.choices("backboneModel") == []  # the model selector (nothing installed here)
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
                        patch_size=48, batch_size=0, max_steps=0, learning_rate=-1.0, checkpoint_every=0, ema_decay=1.0,
                        device="cuda", new_model_name="a b")
    problems = logic.parameter_problems(p)
    assert problems[0] == ("Task 'segmentation' is not available; choose one of: "
                           "pretrain, finetune-segmentation, finetune-classification.")
    assert problems[1] == f"Training data folder not found: {tmp_path / 'missing'}"
    joined = " | ".join(problems)
    for text in ("Unknown preset 'huge'", "Resolution must be a multiple of 16 up to 2048 (got 40)", "Patch size must be 0",
                 "Batch size must be a whole number from 1", "Steps must be a whole number from 1",
                 "Checkpoint interval must be a whole number from 1",
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


def test_training_on_a_server_is_refused_in_one_sentence(logic, ct_folder):
    """Pretraining and fine-tuning are no server tasks: with a server address every button says so
    (before any connection is tried) and nothing starts."""
    ready = TrainParameters(data_folder=ct_folder, new_model_name="ok", device="cpu", resolution=32, patch_size=0)
    assert logic.first_problem(ready) == "" and logic.server_problem(ready) == ""
    for task in (PRETRAIN, SEGMENTATION, CLASSIFICATION):
        p = TrainParameters(data_folder=ct_folder, new_model_name="ok", task=task, server_url="http://gpu-host:8765",
                            server_token_file="")
        reason = logic.server_problem(p)
        assert reason.startswith("Pretraining and fine-tuning run on this computer only") and "\n" not in reason
        assert logic.first_problem(p) == reason and "device" not in logic.visible_fields(p)
        assert logic.start_button_state(p) == ButtonState(False, reason)
        assert logic.resume_button_state(p) == ButtonState(False, reason)
        with pytest.raises(LCTfoundError, match="not server tasks"):
            logic.start(p)
    assert logic.job is None


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


# ---------------------------------------------------------------------------------------------
# Fine-tuning: segmentation and classification
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backbone_folder(tmp_path_factory):
    """A tiny backbone (64² input), found by the logic as an extra model folder named 'tiny-backbone'."""
    from lctfound.models import save_model
    from model_factory import tiny_model

    folder = tmp_path_factory.mktemp("backbone") / "tiny-backbone"
    save_model(tiny_model(64), folder, extra_metadata={"name": "tiny-backbone"})
    return folder


@pytest.fixture
def ft_logic(cache, backbone_folder):
    return TrainModuleLogic(available_devices=lambda: ["cpu"], extra_model_folders=[backbone_folder])


def fine(task, **values) -> TrainParameters:
    """Tiny fine-tuning parameters: 3 steps of batch 2 on the 64² backbone, no EMA."""
    base = dict(task=task, data_source="table" if task == CLASSIFICATION else "volumes", backbone_model="tiny-backbone", batch_size=2, max_steps=3, checkpoint_every=2,
                ema_decay=0.0, log_every=1, device="cpu", new_model_name=f"my-{task}", slices_per_scan=2)
    base.update(values)
    return TrainParameters(**base)


@pytest.fixture(scope="module")
def class_table(tmp_path_factory):
    """cases.csv with four small synthetic scans of two classes (relative image paths)."""
    folder = tmp_path_factory.mktemp("classes")
    rows = ["image,label"]
    for number in range(4):
        name = f"scan-{number}.nrrd"
        write_volume(data_factory.synthetic_ct(shape=(6, 32, 32), seed=10 + number), folder / name)
        rows.append(f"{name},{'nodule' if number % 2 else 'normal'}")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    return folder / "cases.csv"


def test_finetune_defaults_learning_rates_and_visible_fields(ft_logic):
    p = TrainParameters(task=SEGMENTATION, data_source="table")
    # The embedded default model is the default backbone whenever it is installed.
    assert ft_logic.fill_defaults(p) == {"new_model_name": "lctfound-segmentation", "data_source": "volumes",
                                         "mode": "full", "backbone_model": DEFAULT_MODEL_NAME}
    assert effective_learning_rate(p) == 1e-4  # full fine-tuning
    for mode in ("frozen", "adapter"):
        assert effective_learning_rate(TrainParameters(task=SEGMENTATION, mode=mode)) == 1e-3
    assert effective_learning_rate(TrainParameters(task=CLASSIFICATION)) == 1e-3  # frozen by default
    assert effective_learning_rate(TrainParameters(task=CLASSIFICATION, mode="full")) == 1e-4
    assert effective_learning_rate(TrainParameters()) == 2e-4  # pretraining
    assert effective_learning_rate(TrainParameters(task=SEGMENTATION, learning_rate=5e-5)) == 5e-5  # chosen

    c = TrainParameters(task=CLASSIFICATION, mode="adapter", new_model_name="x")
    assert ft_logic.fill_defaults(c) == {"data_source": "table", "mode": "frozen", "backbone_model": DEFAULT_MODEL_NAME}
    c.mode = "adapter"
    assert "Mode 'adapter' is not available for this task; choose one of: frozen, full." in ft_logic.parameter_problems(c)

    seen = ft_logic.visible_fields
    assert {"training_volumes", "training_segmentations", "segment_filter", "backbone_model", "mode"} <= seen(p)
    assert not {"data_folder", "table_path", "preset", "resolution", "slices_per_scan"} & seen(p)
    assert {"data_folder"} <= seen(TrainParameters(task=SEGMENTATION, data_source="folder"))
    assert {"table_path", "slices_per_scan", "mode"} <= seen(c) and "volume_classes" not in seen(c)
    assert {"training_volumes", "volume_classes"} <= seen(TrainParameters(task=CLASSIFICATION, data_source="volumes"))
    assert {"preset", "resolution", "patch_size"} <= seen(TrainParameters()) and "backbone_model" not in seen(TrainParameters())

    empty = TrainModuleLogic(list_models=lambda **_: [], available_devices=lambda: ["cpu"])
    assert "No LCTfound model is installed" in " ".join(empty.check_hyperparameters(fine(SEGMENTATION, backbone_model="")))
    assert ft_logic.check_backbone("") == "Select the backbone model to fine-tune."


def test_finetune_commands(ft_logic, backbone_folder, tmp_path):
    seg = fine(SEGMENTATION, mode="adapter", ema_decay=0.99)
    args = ft_logic.command(seg, {"pairs": [(tmp_path / "i1.nrrd", tmp_path / "l1.nrrd"),
                                            (tmp_path / "i2.nrrd", tmp_path / "l2.nrrd")],
                                  "names": {14: "Lesion", 100: "Scar"}}, tmp_path / "out")
    assert args[:8] == ["train", "finetune", "--task", "segmentation", "--backbone", str(backbone_folder.resolve()),
                        "--mode", "adapter"]
    assert args[8:16] == ["--image", str(tmp_path / "i1.nrrd"), "--labels", str(tmp_path / "l1.nrrd"),
                          "--image", str(tmp_path / "i2.nrrd"), "--labels", str(tmp_path / "l2.nrrd")]
    assert args[-1] == "--events" and "--register" not in args  # the logic registers when the job finishes
    pairs = dict(zip(args[16:-1:2], args[17:-1:2]))
    assert pairs == {"--names": "14=Lesion,100=Scar", "--output": str(tmp_path / "out"), "--batch-size": "2",
                     "--max-steps": "3", "--lr": "0.001", "--checkpoint-every": "2", "--log-every": "1",
                     "--name": "my-finetune-segmentation", "--ema": "0.99"}

    cls = ft_logic.command(fine(CLASSIFICATION, slices_per_scan=0), {"table": tmp_path / "t.csv"}, tmp_path / "o")
    assert cls[:8] == ["train", "finetune", "--task", "classification", "--backbone", str(backbone_folder.resolve()),
                       "--mode", "frozen"]
    assert cls[8:12] == ["--table", str(tmp_path / "t.csv"), "--slices-per-scan", "0"]

    # The command is the CLI's: it parses, with the options the panel set.
    import argparse

    from lctfound.cli import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.register(parser.add_subparsers())
    parsed = parser.parse_args(args)
    assert (parsed.task, parsed.mode, parsed.lr, parsed.ema, parsed.max_steps) == ("segmentation", "adapter", 1e-3, 0.99, 3)
    assert parsed.image == [str(tmp_path / "i1.nrrd"), str(tmp_path / "i2.nrrd")]
    assert parser.parse_args(cls).slices_per_scan == 0


def test_segmentation_folder_problems(ft_logic, tmp_path):
    ct = data_factory.synthetic_ct(seed=5)
    folder = tmp_path / "pairs"
    folder.mkdir()
    p = fine(SEGMENTATION, data_source="folder", data_folder=folder)
    assert ft_logic.check_data(fine(SEGMENTATION, data_source="folder")) == \
        "Choose the folder with the CASE_image / CASE_label file pairs."
    assert ft_logic.check_data(p).startswith(f"No image/label pairs in {folder}")
    write_volume(ct, folder / "a_image.nrrd")
    assert ft_logic.check_data(p) == f"'a_image.nrrd' in {folder} has no partner file (CASE_image.* needs CASE_label.*, and back)."
    write_volume(ct.with_array(np.zeros(ct.shape, np.uint8)), folder / "a_label.nrrd")
    assert ft_logic.check_data(p) == "Case 'a': the label map a_label.nrrd has no labelled voxel."
    write_volume(data_factory.nodule_label(data_factory.synthetic_ct(shape=(10, 40, 48))), folder / "a_label.nrrd")
    assert ft_logic.check_data(p).startswith("Case 'a': the label map (48×40×10) does not lie on the image's voxel grid")
    write_volume(data_factory.nodule_label(ct), folder / "a_label.nrrd")
    assert ft_logic.check_data(p) == "" and ft_logic.data_summary(p) == "1 image/label pair(s)"
    (folder / "notes.txt").write_text("ignored")
    assert ft_logic.parameter_problems(p) == []


def test_classification_table_problems(ft_logic, class_table, tmp_path):
    p = fine(CLASSIFICATION, table_path=class_table)
    assert ft_logic.parameter_problems(p) == []
    assert ft_logic.data_summary(p) == "4 scan(s): nodule (2), normal (2)"
    assert ft_logic.check_data(fine(CLASSIFICATION)) == "Choose the CSV table (columns image,label) of the training scans."
    assert ft_logic.check_data(fine(CLASSIFICATION, table_path=tmp_path / "x.csv")) == f"Table not found: {tmp_path / 'x.csv'}"
    table = tmp_path / "t.csv"
    for text, problem in (
        ("path,class\na,b\n", "t.csv: needs a header line with the columns image,label."),
        ("image,label\n", "t.csv: has no rows (one line per scan: image,label)."),
        (f"image,label\n{class_table.parent / 'scan-0.nrrd'},normal\nmissing.nrrd,nodule\n",
         f"t.csv line 3: image not found: {tmp_path / 'missing.nrrd'}"),
        (f"image,label\n{class_table.parent / 'scan-0.nrrd'},\n", "t.csv line 2: the label (class name) is empty."),
        (f"image,label\n{class_table.parent / 'scan-0.nrrd'},normal\n{class_table.parent / 'scan-1.nrrd'},normal\n",
         "t.csv: every scan has class 'normal'; classification needs at least two classes."),
    ):
        table.write_text(text)
        assert ft_logic.check_data(fine(CLASSIFICATION, table_path=table)) == problem


def test_classification_run_from_a_table_registers_a_task_model(ft_logic, class_table, cache):
    from lctfound.models.task_models import list_task_models, load_task_model

    ft_logic.start(fine(CLASSIFICATION, table_path=class_table))
    run = ft_logic.run_folder
    info = json.loads((run / JOB_FILE).read_text())
    assert info["task"] == CLASSIFICATION and info["data"] == str(class_table.resolve()) and info["mode"] == "frozen"
    poll_until(ft_logic, ended(ft_logic))
    assert ft_logic.state is RunState.FINISHED, ft_logic.status_summary() + "\n" + ft_logic.job.stderr_tail
    assert [step for step, _ in ft_logic.loss_history] == [1, 2, 3]
    assert ft_logic.status().message.startswith("classification model 'my-finetune-classification' registered (3 steps")
    assert ft_logic.registered_model == cache / "models" / "my-finetune-classification"
    entries = list_task_models("classification")
    assert [entry.name for entry in entries] == ["my-finetune-classification"]
    task_model = load_task_model(entries[0].path, "classification")
    assert task_model.info["classes"] == ["nodule", "normal"] and task_model.info["classifier"]["mode"] == "frozen"
    assert ft_logic.loss_curve_png() == run / CLASSIFICATION / "loss_curve.png"
    assert ft_logic.loss_curve_png(run) == ft_logic.loss_curve_png()
    assert "my-finetune-classification" not in [choice.value for choice in ft_logic.choices("backboneModel")]


def test_finetune_cancel_keeps_the_checkpoint_and_resume_completes(ft_logic, class_table, cache, tmp_path):
    from lctfound.models.task_models import list_task_models

    ft_logic.start(fine(CLASSIFICATION, table_path=class_table, max_steps=400, run_folder=tmp_path / "ft-run"))
    poll_until(ft_logic, lambda: ft_logic.last_checkpoint_step is not None)
    assert ft_logic.cancel() is True
    poll_until(ft_logic, ended(ft_logic), timeout=30)
    assert ft_logic.state is RunState.CANCELLED, ft_logic.status_summary()
    kept = checkpoint_steps(tmp_path / "ft-run" / CLASSIFICATION)
    assert kept and ft_logic.status().message == f"checkpoint of step {kept[-1]} kept; Resume continues from it"
    assert list_task_models("classification") == []

    info = json.loads((tmp_path / "ft-run" / JOB_FILE).read_text())
    info["args"][info["args"].index("--max-steps") + 1] = str(kept[-1] + 2)  # a short rest of the run
    (tmp_path / "ft-run" / JOB_FILE).write_text(json.dumps(info))
    assert ft_logic.resume_problem(tmp_path / "ft-run") == ""
    ft_logic.resume(tmp_path / "ft-run")
    assert ft_logic.job.command[-1] == "--resume" and ft_logic.job.command[3:-1] == info["args"]
    assert [step for step, _ in ft_logic.loss_history] == list(range(1, kept[-1] + 1))
    poll_until(ft_logic, ended(ft_logic))
    assert ft_logic.state is RunState.FINISHED, ft_logic.status_summary() + "\n" + ft_logic.job.stderr_tail
    assert [step for step, _ in ft_logic.loss_history] == list(range(1, kept[-1] + 3))
    assert [entry.name for entry in list_task_models("classification")] == ["my-finetune-classification"]


# ---------------------------------------------------------------------------------------------
# Fine-tuning from the scene (slicer-core)
# ---------------------------------------------------------------------------------------------


def scene_case(scene, name="CT", seed=3, shape=(12, 40, 48), segment="Lesion", empty=False):
    """A synthetic CT volume node and a segmentation node with one segment built from a label array."""
    from lctfound.mrml import segmentation_node_from_labels, volume_node_from_ctvolume

    ct = data_factory.synthetic_ct(shape=shape, seed=seed)
    volume = volume_node_from_ctvolume(scene, ct, name=name)
    labels = data_factory.nodule_label(ct).array
    if empty:
        labels = np.zeros_like(labels)
    segmentation = segmentation_node_from_labels(scene, labels, volume, names={1: segment}, name=f"{name} segmentation")
    return ct, volume, segmentation


@pytest.mark.mrml
def test_segmentation_run_from_the_scene_registers_a_task_model(ft_logic, cache):
    pytest.importorskip("slicer")
    from lctfound.io.volume import read_label_volume
    from lctfound.models.task_models import list_task_models, load_task_model
    from lctfound.mrml import new_headless_scene

    scene = new_headless_scene()
    ct, volume, segmentation = scene_case(scene)
    node = {"task": SEGMENTATION, "dataSource": "volumes", "trainingVolumes": [volume],
            "trainingSegmentations": [segmentation], "backboneModel": "tiny-backbone", "mode": "frozen",
            "batchSize": 2, "maxSteps": 2, "checkpointEvery": 2, "emaDecay": 0.0, "device": "cpu",
            "newModelName": "scene-lesions", "logEvery": 1}
    assert ft_logic.parameter_problems(node) == []
    assert ft_logic.data_summary(node) == "1 case(s): CT + CT segmentation"
    ft_logic.start(node)
    data = ft_logic.run_folder / "data"
    assert sorted(path.name for path in data.iterdir()) == ["image-001.nrrd", "labels-001.nrrd"]
    labels = read_label_volume(data / "labels-001.nrrd", reference=read_volume(data / "image-001.nrrd"))
    assert set(np.unique(labels.array)) == {0, 14}  # "Lesion" is label 14 of the structure table
    assert np.array_equal(labels.array > 0, data_factory.nodule_label(ct).array > 0)
    info = json.loads((ft_logic.run_folder / JOB_FILE).read_text())
    assert info["labels"] == {"14": "Lesion"} and info["segmentations"] == ["CT segmentation"]
    assert info["args"][info["args"].index("--names") + 1] == "14=Lesion" and "--lr" in info["args"]
    assert info["args"][info["args"].index("--lr") + 1] == "0.001"  # frozen backbone: 1e-3

    poll_until(ft_logic, ended(ft_logic))
    assert ft_logic.state is RunState.FINISHED, ft_logic.status_summary() + "\n" + ft_logic.job.stderr_tail
    entries = list_task_models("segmentation")
    assert [entry.name for entry in entries] == ["scene-lesions"]
    assert entries[0].path == cache / "models" / "scene-lesions" == ft_logic.registered_model
    task_model = load_task_model(entries[0].path, "segmentation")
    assert task_model.info["labels"] == {"14": "Lesion"} and task_model.info["dense"]["mode"] == "frozen"


@pytest.mark.mrml
def test_scene_problems_are_one_line_reasons(ft_logic):
    pytest.importorskip("slicer")
    from lctfound.mrml import new_headless_scene, set_segment_status

    scene = new_headless_scene()
    _, volume, segmentation = scene_case(scene, "A")
    _, empty_volume, empty_segmentation = scene_case(scene, "B", seed=4, empty=True)
    _, small_volume, small_segmentation = scene_case(scene, "C", seed=5, shape=(10, 40, 48))

    def problem(volumes, segmentations, **values):
        return ft_logic.check_data(fine(SEGMENTATION, data_source="volumes", training_volumes=volumes,
                                        training_segmentations=segmentations, **values))

    assert problem([], []) == "Select the loaded volumes to train on."
    assert problem([volume], []) == "Select the segmentations drawn on the training volumes (one per volume)."
    assert problem([volume], [segmentation]) == ""
    assert problem([empty_volume], [empty_segmentation]) == \
        "Segmentation 'B segmentation' has no labelled voxel in volume 'B' (no segment with content)."
    assert problem([volume], [segmentation, empty_segmentation]).startswith(
        "Segmentation 'B segmentation' was drawn on volume 'B', which is not selected")
    assert problem([volume, empty_volume], [segmentation]).startswith("Volume 'B' has no selected segmentation")

    # A segmentation drawn on another grid (C: 10 slices) but pointed at volume A (12 slices).
    small_segmentation.SetNodeReferenceID(small_segmentation.GetReferenceImageGeometryReferenceRole(), volume.GetID())
    assert problem([volume], [small_segmentation]) == (
        "Segmentation 'C segmentation' does not lie on the voxel grid of volume 'A' (size 48×40×10 vs 48×40×12); "
        "pair it with the volume it was drawn on, or resample it onto this volume.")
    assert problem([volume], [segmentation, small_segmentation]).startswith(
        "Volume 'A' has several selected segmentations ('A segmentation', 'C segmentation')")

    # Only reviewed segments: nothing is reviewed yet, then the lesion is.
    assert problem([volume], [segmentation], segment_filter="reviewed") == (
        "Segmentation 'A segmentation' has no labelled voxel in volume 'A' (no reviewed (Completed) segment with content).")
    set_segment_status(segmentation, "Lesion", "Completed")
    assert problem([volume], [segmentation], segment_filter="reviewed") == ""

    # Classification from loaded volumes: a class name each, at least two classes.
    p = fine(CLASSIFICATION, data_source="volumes", training_volumes=[volume, empty_volume])
    assert ft_logic.check_data(p) == "Enter a class name for volume 'A'."
    set_volume_class_name(volume, "nodule")
    set_volume_class_name(empty_volume, " nodule ")
    assert ft_logic.check_data(p) == "All volumes have class 'nodule'; classification needs at least two classes."
    set_volume_class_name(empty_volume, "normal")
    assert ft_logic.check_data(p) == "" and ft_logic.data_summary(p) == "2 scan(s): nodule (1), normal (1)"
    with pytest.raises(LCTfoundError, match="has no labelled voxel"):  # start() refuses with the same line
        ft_logic.start(fine(SEGMENTATION, data_source="volumes", training_volumes=[empty_volume],
                            training_segmentations=[empty_segmentation]))
    assert ft_logic.job is None


@pytest.mark.mrml
def test_classified_volumes_are_exported_with_a_case_table(ft_logic, tmp_path):
    pytest.importorskip("slicer")
    from lctfound.mrml import new_headless_scene, volume_node_from_ctvolume

    scene = new_headless_scene()
    nodes = [volume_node_from_ctvolume(scene, data_factory.synthetic_ct(seed=seed), name=f"scan {seed}")
             for seed in (1, 2)]
    set_volume_class_name(nodes[0], "normal")
    set_volume_class_name(nodes[1], "nodule")
    data, info = ft_logic.prepare_data(fine(CLASSIFICATION, data_source="volumes", training_volumes=nodes), tmp_path)
    assert data == {"table": tmp_path / "data" / "cases.csv"}
    assert (tmp_path / "data" / "cases.csv").read_text().splitlines() == \
        ["image,label", "volume-001.nrrd,normal", "volume-002.nrrd,nodule"]
    assert info["classes"] == ["normal", "nodule"] and info["volumes"] == ["scan 1", "scan 2"]
    assert read_volume(tmp_path / "data" / "volume-002.nrrd").shape == (12, 40, 48)

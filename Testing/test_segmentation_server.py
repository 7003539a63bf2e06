"""The Segmentation module logic with "Run on" a server (issue 14): a real `lctfound serve` on
127.0.0.1, a logic with no model installed on this computer, the annotator's loop on the server.

Test connection (a wrong token is one sentence) → the selectors list the server's backbones → Train
(the model stays on the server, nothing is registered here) → Predict into a new segmentation node
named after the model's labels, the annotator's slices kept.

Then the panel's other tasks on a server that offers a few-shot teacher, a structures model and a
classifier: each selector lists only the server's models of its kind (a student distilled there joins
the few-shot list), and the structures prediction and the diagnosis equal the local jobs' results.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("slicer")
pytest.importorskip("httpx")

from lctfound.errors import LCTfoundError  # noqa: E402
from lctfound.io.volume import CTVolume  # noqa: E402
from lctfound.logic import RunState  # noqa: E402
from lctfound.logic.segmentation import (  # noqa: E402
    DIAGNOSIS,
    FEWSHOT,
    SERVER_SALIENCY_NOTE,
    STRUCTURES,
    SegmentationModuleLogic,
    SegmentationParameters,
    reviewed_slices,
)
from lctfound.models import save_model  # noqa: E402
from lctfound.mrml import (  # noqa: E402
    labels_from_segmentation,
    mask_from_segment,
    new_headless_scene,
    segmentation_node_from_labels,
    volume_node_from_ctvolume,
)

from data_factory import fewshot_phantom  # noqa: E402
from model_factory import tiny_model, train_tiny_classifier  # noqa: E402
from server_helpers import Server, backbone_server  # noqa: E402

pytestmark = [pytest.mark.mrml, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    running = backbone_server(tmp_path_factory.mktemp("logic-server"), 64, seed=1)
    yield running
    running.stop()


def run_job(logic, polls: int = 6000) -> list[dict]:
    events = []
    for _ in range(polls):  # a hang guard counted in polls, not a speed requirement
        if not (logic.state.busy or logic.job is None):
            break
        events.extend(logic.poll())
        time.sleep(0.1)
    events.extend(logic.poll())
    assert logic.state is RunState.FINISHED, logic.status_summary()
    return events


def test_fewshot_train_and_predict_on_a_server(server, tmp_path, monkeypatch, empty_cache):
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "slicer-desk")
    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    token_file = tmp_path / "token"
    token_file.write_text(server.token + "\n")
    wrong_token = tmp_path / "wrong-token"
    wrong_token.write_text("x" * 43 + "\n")

    # Nothing is installed on this computer, and it cannot list its devices (no torch).
    logic = SegmentationModuleLogic(list_models=lambda extra_folders=(): [], available_devices=lambda: [],
                                    runs_root=tmp_path / "runs")
    scene = new_headless_scene()
    volume, lesion, _ = fewshot_phantom()
    node = volume_node_from_ctvolume(scene, CTVolume(np.round(volume).astype(np.int16), (0.8, 0.8, 2.5),
                                                     (0.0, 0.0, 0.0), np.eye(3)), name="phantom")
    painted = np.zeros(lesion.shape, dtype=np.uint8)
    painted[[1, 2]] = lesion[[1, 2]]
    annotation = segmentation_node_from_labels(scene, painted, node, {1: "Lesion"}, name="my labels")
    p = SegmentationParameters(task=FEWSHOT, input_volume=node, annotation_segmentation=annotation,
                               new_model_name="lesion-remote", epochs=15, server_url=server.url + "/",
                               server_token_file=str(wrong_token))

    assert not logic.train_button_state(p).enabled
    assert logic.selection_summary(p) == f"Press Test connection to use the server at {server.url}."
    with pytest.raises(LCTfoundError) as refused:
        logic.test_connection(p)
    assert "\n" not in str(refused.value) and "token" in str(refused.value).lower()
    assert logic.connected_server(p) is None

    p.server_token_file = str(token_file)
    assert logic.test_connection(p).startswith(f"connected to {server.url}")
    offered = [c.value for c in logic.choices("modelName", parameters=p)]
    assert "tiny" in offered and logic.choices("taskModel", parameters=p) == []
    logic.fill_defaults(p)
    assert p.model_name == offered[0]
    p.model_name = "tiny"  # the annotator picks the small backbone
    assert logic.train_button_state(p).enabled, logic.train_problems(p)
    assert "Runs on the server" in logic.selection_summary(p)

    logic.start_train(p)
    command = logic.job.command
    assert "--server" in command and server.url in command and server.token not in " ".join(command)
    events = run_job(logic)
    assert any(e["event"] == "progress" for e in events)
    assert "stays on the server" in logic.status_summary()
    assert logic.registered_model is None  # nothing was registered on this computer
    assert logic.server.your_models == ["lesion-remote"] and list(logic.server.labels["lesion-remote"].values()) == ["Lesion"]
    assert [c.value for c in logic.choices("taskModel", parameters=p)] == ["lesion-remote"]
    p.new_model_name = "lesion-remote"
    assert "already have a model named" in logic.train_problems(p)[0]

    logic.fill_defaults(p)
    assert p.task_model == "lesion-remote"
    assert logic.predict_button_state(p).enabled, logic.predict_problems(p)
    logic.start_predict(p)
    run_job(logic)
    result = logic.result_segmentation
    assert result is not annotation and reviewed_slices(result) == [1, 2]
    predicted = mask_from_segment(result, "Lesion", node).astype(bool)
    assert np.array_equal(predicted[[1, 2]], lesion[[1, 2]].astype(bool))  # the annotator's slices kept
    assert predicted.sum() > lesion[[1, 2]].sum()  # and the model predicted beyond them

    # Train and predict each need their server task (from the server's GET /info).
    p.task = FEWSHOT
    logic.server.tasks.remove("segment-train")
    assert "does not run segment-train" in logic.train_problems(p)[0] and logic.predict_problems(p) == []
    logic.server.tasks.append("segment-train")

    p.task = DIAGNOSIS  # a classifier the server offers (it offers none)
    assert logic.predict_problems(p)[0] == ("The server has no classification model named 'lesion-remote' (Test "
                                            "connection lists them).")
    p.task_model = ""
    assert logic.predict_problems(p)[0] == "Select a classification model on the server (Test connection lists them)."
    assert logic.train_problems(p)[0].startswith("Training is part of few-shot segmentation")
    assert logic.server_problem(p, "train") == logic.no_server_task(p, "train")


SPACING = (0.8, 0.8, 2.5)


@pytest.fixture(scope="module")
def task_models(tmp_path_factory):
    """A tiny backbone; on it a few-shot teacher (2 painted slices), a structures model (Lesion, Vessel; a
    frozen backbone and an untrained output layer, saved as `train finetune` saves one) and a classifier
    trained for 2 steps by `classify train`; the phantom CT they see."""
    import torch

    from lctfound.io.volume import write_volume
    from lctfound.models import load_model
    from lctfound.pipelines.segmentation import UNLABELLED, FewShotConfig, FewShotSegmenter
    from lctfound.training.finetune import DenseBackbone, DenseLossModule, DenseSegmentationTask

    folder = tmp_path_factory.mktemp("task-models")
    volume, lesion, _ = fewshot_phantom()
    ct = CTVolume(np.round(volume).astype(np.int16), SPACING, (0.0, 0.0, 0.0), np.eye(3))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCTFOUND_CACHE_DIR", str(folder / "fixture-cache"))
        save_model(tiny_model(64, seed=1), folder / "tiny", extra_metadata={"name": "tiny"})
        backbone = load_model(folder / "tiny")
        labels = np.full(lesion.shape, UNLABELLED, dtype=np.int16)
        labels[[2, 5]] = lesion[[2, 5]]
        teacher = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig(timesteps=(0, 100), epochs=5))
        teacher.fit(ct.array, labels)
        teacher.save(folder / "teacher", extra={"name": "teacher"})
        task = DenseSegmentationTask(backbone, list(ct.array[:2]), [np.zeros(lesion.shape[1:], np.uint8)] * 2,
                                     {1: "Lesion", 2: "Vessel"}, mode="frozen", name="structures")
        torch.manual_seed(0)
        dense = DenseBackbone(backbone, 3, "frozen", class_values=[0, 1, 2])
        task.save_model(DenseLossModule(dense), folder / "structures", task.metadata())
        train_tiny_classifier(folder, folder / "tiny", "classifier")
    write_volume(ct, folder / "ct.nrrd")
    return SimpleNamespace(folder=folder, ct=ct)


@pytest.fixture(scope="module")
def task_server(task_models):
    folder = task_models.folder
    models = [f"{name}={folder / path}" for name, path in (("tiny", "tiny"), ("teacher", "teacher"),
                                                           ("structures", "structures"), ("classifier", "run/model"))]
    running = Server(folder / "data", folder / "server-cache", ["--models", *models])
    yield running
    running.stop()


def test_structures_students_and_diagnosis_on_a_server(task_server, task_models, tmp_path, monkeypatch,
                                                       empty_cache, run_cli):
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "slicer-structures")
    monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", task_server.token)
    folder = task_models.folder
    # This computer has the structures model and the classifier too, for the local runs to compare with.
    logic = SegmentationModuleLogic(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"],
                                    runs_root=tmp_path / "runs",
                                    extra_model_folders=[folder / "structures", folder / "run" / "model"])
    scene = new_headless_scene()
    node = volume_node_from_ctvolume(scene, task_models.ct, name="phantom")
    p = SegmentationParameters(task=STRUCTURES, input_volume=node, server_url=task_server.url)
    logic.test_connection(p)

    def offered(task: str, name: str = "taskModel") -> list[str]:
        return [choice.value for choice in logic.choices(name, parameters=SegmentationParameters(
            task=task, server_url=task_server.url))]

    # Each selector lists the server's models of its kind only.
    backbones = offered(FEWSHOT, "modelName")  # with the server's built-in default
    assert "tiny" in backbones and not {"teacher", "structures", "classifier"} & set(backbones)
    assert (offered(FEWSHOT), offered(STRUCTURES), offered(DIAGNOSIS)) == (["teacher"], ["structures"], ["classifier"])
    p.task_model = "classifier"
    assert logic.predict_problems(p) == ["The server has no structures model named 'classifier' (Test connection "
                                         "lists them)."]

    # Lung structures on the server: a new node named after the model's labels, equal to the local job's.
    p.task_model = ""
    logic.fill_defaults(p)
    assert p.task_model == "structures" and logic.predict_button_state(p).enabled, logic.predict_problems(p)
    assert logic.selection_summary(p) == f"Runs on the server {task_server.url}. Predicts with 'structures'."
    logic.start_predict(p)
    assert "--server" in logic.job.command
    run_job(logic)
    remote = logic.result_segmentation
    remote_labels, remote_names = labels_from_segmentation(remote, node)
    assert sorted(remote_names.values()) == ["Lesion", "Vessel"] and remote_labels.any()
    p.server_url = ""
    assert logic.predict_button_state(p).enabled, logic.predict_problems(p)
    logic.start_predict(p)
    assert "--server" not in logic.job.command
    run_job(logic)
    local_labels, local_names = labels_from_segmentation(logic.result_segmentation, node)
    assert local_names == remote_names and np.array_equal(local_labels, remote_labels)

    # Diagnosis on the server: the local job's results row, without the saliency overlay (the panel says so).
    p.task, p.task_model, p.server_url = DIAGNOSIS, "", task_server.url
    assert "saliency" not in logic.visible_fields(p)
    logic.fill_defaults(p)
    assert p.task_model == "classifier"
    assert logic.selection_summary(p).endswith(SERVER_SALIENCY_NOTE)
    logic.start_predict(p)
    run_job(logic)
    assert logic.status_summary().endswith(SERVER_SALIENCY_NOTE) and logic.saliency_volume is None
    remote_row = logic.diagnosis_rows[0]
    p.server_url = ""
    assert "saliency" in logic.visible_fields(p)
    logic.start_predict(p)
    run_job(logic)
    local_row = logic.diagnosis_rows[0]
    assert logic.saliency_volume is not None and SERVER_SALIENCY_NOTE not in logic.status_summary()
    same = [key for key in local_row if key.startswith("probability_")] + ["predicted", "model_sha256", "note"]
    assert len(same) > 4 and {key: remote_row[key] for key in same} == {key: local_row[key] for key in same}
    p.server_url = task_server.url
    logic.server.tasks.remove("classify-predict")
    assert logic.predict_problems(p)[0].startswith(f"The server at {task_server.url} does not run classify-predict")
    logic.server.tasks.append("classify-predict")

    # A student distilled on the server (`segment distill --server`) is listed with the few-shot models and
    # predicts there into a node named after its labels.
    code, _, err = run_cli(["segment", "distill", folder / "ct.nrrd", "--teacher", "teacher", "--epochs", "1",
                            "--resolution", "32", "--time-budget", "0", "-o", "student", "--server", task_server.url])
    assert code == 0, err
    logic.test_connection(p)
    assert offered(FEWSHOT) == ["student", "teacher"] and offered(STRUCTURES) == ["structures"]
    assert "(yours, on the server)" in logic.choices("taskModel", parameters=SegmentationParameters(
        task=FEWSHOT, server_url=task_server.url))[0].label
    p.task, p.task_model, p.annotation_segmentation = FEWSHOT, "student", None
    assert logic.predict_button_state(p).enabled, logic.predict_problems(p)
    logic.start_predict(p)
    run_job(logic)
    assert [name for name in labels_from_segmentation(logic.result_segmentation, node)[1].values()] == ["Lesion"]

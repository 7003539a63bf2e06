"""The Segmentation module logic with "Run on" a server (issue 14): a real `lctfound serve` on
127.0.0.1, a logic with no model installed on this computer, the annotator's loop on the server.

Test connection (a wrong token is one sentence) → the selectors list the server's backbones → Train
(the model stays on the server, nothing is registered here) → Predict into a new segmentation node
named after the model's labels, the annotator's slices kept.
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
    SegmentationModuleLogic,
    SegmentationParameters,
    reviewed_slices,
)
from lctfound.models import save_model  # noqa: E402
from lctfound.mrml import mask_from_segment, new_headless_scene, segmentation_node_from_labels, volume_node_from_ctvolume  # noqa: E402

from data_factory import fewshot_phantom  # noqa: E402
from model_factory import tiny_model  # noqa: E402
from server_helpers import Server  # noqa: E402

pytestmark = [pytest.mark.mrml, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logic-server")
    save_model(tiny_model(64, seed=1), folder / "tiny")
    running = Server(folder / "data", folder / "server-cache", ["--models", f"tiny={folder / 'tiny'}"])
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

    p.task = DIAGNOSIS
    assert "runs few-shot segmentation" in logic.predict_problems(p)[0]

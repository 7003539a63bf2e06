"""The Segmentation panel with "Run on" a department server (issue 14), clicked through on Slicer's
own Python layer of each tag, against a real `lctfound serve` on 127.0.0.1.

The annotator types the server's address and token file, presses Test connection (the device row
goes, the backbone selector lists the server's models), trains (the model stays on the server and
is selected for prediction), predicts into a new segmentation node, then clears the address and is
back on this computer's models.
"""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness.fixtures import slicer_flow, slicer_session  # noqa: F401

pytest.importorskip("httpx")

pytestmark = [pytest.mark.mrml, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from model_factory import tiny_model
    from server_helpers import Server

    from lctfound.models import save_model

    folder = tmp_path_factory.mktemp("panel-server")
    save_model(tiny_model(32, seed=1), folder / "tiny")
    running = Server(folder / "data", folder / "server-cache", ["--models", f"tiny={folder / 'tiny'}"])
    (folder / "token").write_text(running.token + "\n")
    running.token_file = folder / "token"
    yield running
    running.stop()


def test_fewshot_train_and_predict_on_a_server_from_the_panel(slicer_flow, server, monkeypatch):
    from test_slicer_harness_flows import PAINTED, painted_chest, wait_for_job

    from lctfound.mrml import mask_from_segment

    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", f"panel-{slicer_flow.tag}".replace(".", "-"))
    volume, annotation, lesion = painted_chest()

    widget = slicer_flow.selectModule("LCTfoundSegmentation")
    ui, engine = widget.ui, widget.logic.engine
    ui.taskSelector.select("fewshot")
    ui.annotationSelector.select(annotation)
    ui.serverUrlLineEdit.type(server.url)
    ui.serverTokenFileLineEdit.type(str(server.token_file))
    assert not ui.trainButton.enabled and "Test connection" in ui.trainButton.toolTip
    assert not ui.deviceSelector.visible  # the server picks its device

    ui.testConnectionButton.click()
    assert ui.connectionLabel.text.startswith(f"connected to {server.url}"), ui.connectionLabel.text
    ui.modelSelector.select("tiny")
    ui.newModelNameLineEdit.type("lesion-remote")
    ui.epochsSpinBox.value = 1
    assert ui.trainButton.enabled, ui.trainButton.toolTip
    ui.trainButton.click()
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Finished", engine.status_summary()
    assert "stays on the server" in ui.statusLabel.text
    assert ui.taskModelSelector.currentData() == "lesion-remote"

    ui.outputModeSelector.select("new")
    assert ui.predictButton.enabled, ui.predictButton.toolTip
    ui.predictButton.click()
    wait_for_job(slicer_flow, widget)
    result = engine.result_segmentation
    assert engine.state.value == "Finished" and result is not None and result is not annotation
    assert result.GetSegmentation().GetNumberOfSegments() == 1
    predicted = mask_from_segment(result, "Lesion", volume)
    assert np.array_equal(predicted[list(PAINTED)] > 0, lesion[list(PAINTED)] > 0)  # the painted slices kept

    ui.serverUrlLineEdit.type("")  # back on this computer
    assert ui.deviceSelector.visible
    assert ui.modelSelector.findData("tiny") < 0 and widget._parameterNode.modelName != "tiny"

"""The Segmentation panel with "Run on" a department server (issue 14), clicked through on Slicer's
own Python layer of each tag, against a real `lctfound serve` on 127.0.0.1.

The annotator types the server's address and token file, presses Test connection (the device row
goes, the backbone selector lists the server's models), trains (the model stays on the server and
is selected for prediction), predicts into a new segmentation node, then clears the address and is
back on this computer's models. The Enhance panel runs low-dose TV there; the CT-FM panel searches an index
the server offers.
"""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness.fixtures import slicer_flow, slicer_session  # noqa: F401
from test_ctfm_server import world  # noqa: F401 - the CT-FM server's fixture
from test_slicer_harness_flows import wait_for_job

pytest.importorskip("httpx")

pytestmark = [pytest.mark.mrml, pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from server_helpers import backbone_server

    running = backbone_server(tmp_path_factory.mktemp("panel-server"), 32, seed=1)
    yield running
    running.stop()


def test_fewshot_train_and_predict_on_a_server_from_the_panel(slicer_flow, server, monkeypatch):
    import sys

    from import_blocker import hidden_packages
    from test_slicer_harness_flows import PAINTED, painted_chest

    from lctfound.mrml import mask_from_segment

    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", f"panel-{slicer_flow.tag}".replace(".", "-"))
    volume, annotation, lesion = painted_chest()

    widget = slicer_flow.selectModule("LCTfoundSegmentation")
    ui, engine = widget.ui, widget.logic.engine
    with hidden_packages("torch"):  # a CPU-only Slicer: the thin client is all it needs
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
        assert "torch" not in sys.modules  # the Slicer side never imported it

    ui.serverUrlLineEdit.type("")  # back on this computer
    assert ui.deviceSelector.visible
    assert ui.modelSelector.findData("tiny") < 0 and widget._parameterNode.modelName != "tiny"


def test_enhance_low_dose_on_a_server_from_the_panel(slicer_flow, server, monkeypatch):
    """Run on a server in the Enhance panel with torch hidden from the Slicer side: Test connection, the
    device row goes, low-dose TV runs on the server into a new volume — the same volume as a run on this
    computer after the address is cleared."""
    import sys

    import slicer
    from import_blocker import hidden_packages
    from slicer_harness.fixtures import volume_from_array
    from test_slicer_harness_flows import tiny_ct

    from lctfound.mrml.volumes import get_provenance

    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", f"enhance-{slicer_flow.tag}".replace(".", "-"))
    volume = volume_from_array(tiny_ct()[0], name="low-dose chest")
    widget = slicer_flow.selectModule("LCTfoundEnhance")
    ui, engine = widget.ui, widget.logic.engine
    with hidden_packages("torch"):
        ui.taskSelector.select("low-dose")
        ui.denoiserSelector.select("tv")
        ui.inputVolumeSelector.select(volume)
        ui.serverUrlLineEdit.type(server.url)
        ui.serverTokenFileLineEdit.type(str(server.token_file))
        assert not ui.deviceSelector.visible  # the server picks its device
        assert not ui.startButton.enabled and "Test connection" in ui.startButton.toolTip
        ui.testConnectionButton.click()
        assert ui.connectionLabel.text.startswith(f"connected to {server.url}"), ui.connectionLabel.text
        assert ui.startButton.enabled, ui.startButton.toolTip
        assert "on the server" in ui.statusLabel.text
        ui.startButton.click()
        wait_for_job(slicer_flow, widget)
        assert engine.state.value == "Finished", engine.status_summary()
        assert "torch" not in sys.modules  # the Slicer side never imported it
    remote = engine.result_volume
    assert remote is not None and remote is not volume and get_provenance(remote)["server"] == server.url

    ui.serverUrlLineEdit.type("")  # back on this computer: the same task here
    assert ui.deviceSelector.visible
    ui.inputVolumeSelector.select(volume)
    assert ui.startButton.enabled, ui.startButton.toolTip
    ui.startButton.click()
    wait_for_job(slicer_flow, widget)
    local = engine.result_volume
    assert local is not remote and "server" not in get_provenance(local)
    assert np.array_equal(slicer.util.arrayFromVolume(remote), slicer.util.arrayFromVolume(local))


def test_train_and_ctfm_panels_say_why_not_on_a_server(slicer_flow):
    """The same Run on rows in the Train and CT-FM panels (the shared widget base); Train's tasks and CT-FM's
    index, classify, segment and training are not server tasks, and Search waits for Test connection, which
    each disabled button says in one sentence."""
    from lctfound.logic.ctfm import HEATMAP_NOT_ON_SERVER, INDEX_NOT_ON_SERVER

    address = "http://127.0.0.1:9"
    widget = slicer_flow.selectModule("LCTfoundTrain")
    ui = widget.ui
    ui.serverUrlLineEdit.type(address)
    reason = "Pretraining and fine-tuning run on this computer only (they are not server tasks)"
    for button in (ui.startButton, ui.resumeButton):
        assert not button.enabled and button.toolTip.startswith(reason), button.toolTip
    assert ui.statusLabel.text.startswith(reason) and not ui.deviceSelector.visible
    ui.serverUrlLineEdit.type("")
    assert not ui.startButton.toolTip.startswith(reason) and ui.deviceSelector.visible

    widget = slicer_flow.selectModule("LCTfoundCTFM")
    ui = widget.ui
    ui.serverUrlLineEdit.type(address)
    assert not ui.searchButton.enabled and ui.searchButton.toolTip == \
        f"Press Test connection to use the server at {address}.", ui.searchButton.toolTip
    assert not ui.buildIndexButton.enabled and ui.buildIndexButton.toolTip == INDEX_NOT_ON_SERVER
    assert not ui.showHeatmapCheckBox.enabled and ui.showHeatmapCheckBox.toolTip == HEATMAP_NOT_ON_SERVER
    for button in (ui.classifyButton, ui.segmentButton, ui.trainButton):
        assert not button.enabled and button.toolTip.startswith("CT-FM classification, segmentation and training "
                                                                "run on this computer only"), button.toolTip
    ui.testConnectionButton.click()  # nothing listens there: one line, no popup
    assert ui.connectionLabel.text and "\n" not in ui.connectionLabel.text
    ui.serverUrlLineEdit.type("")
    assert ui.deviceSelector.visible and ui.showHeatmapCheckBox.enabled


def test_ctfm_search_on_a_server_from_the_panel(slicer_flow, world, monkeypatch):
    """Search in the CT-FM panel on a server offering a CT-FM encoder and an index (Testing/test_ctfm_server.py's
    world), with torch hidden from the Slicer side: Test connection fills the encoder and Server index
    selectors, the folders and the device go, Search brings the ranking into the results table, and its scans
    (on the server) cannot be loaded here, which Load selected scan says."""
    import sys

    from import_blocker import hidden_packages
    from slicer_harness.fixtures import volume_from_array

    from lctfound.io.volume import read_volume
    from lctfound.logic.ctfm import MATCH_ON_SERVER

    folder, server = world
    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", f"ctfm-{slicer_flow.tag}".replace(".", "-"))
    ct = read_volume(folder / "ct.nrrd")
    volume = volume_from_array(ct.array, name="query CT", spacing=ct.spacing)
    widget = slicer_flow.selectModule("LCTfoundCTFM")
    ui, engine = widget.ui, widget.logic.engine
    with hidden_packages("torch"):
        ui.inputVolumeSelector.select(volume)
        ui.serverUrlLineEdit.type(server.url)
        ui.serverTokenFileLineEdit.type(str(server.token_file))
        assert not ui.deviceSelector.visible and not ui.indexFolderSelector.visible
        assert not ui.encoderFolderSelector.visible and ui.serverIndexSelector.visible
        ui.testConnectionButton.click()
        assert ui.connectionLabel.text.startswith(f"connected to {server.url}"), ui.connectionLabel.text
        assert [ui.modelSelector.itemData(i) for i in range(ui.modelSelector.count)] == ["ct-fm"]
        assert [ui.serverIndexSelector.itemData(i) for i in range(ui.serverIndexSelector.count)] == ["cohort"]
        assert ui.modelSelector.currentData() == "ct-fm" and ui.serverIndexSelector.currentData() == "cohort"
        ui.topKSpinBox.value = 2
        assert ui.searchButton.enabled, ui.searchButton.toolTip
        assert ui.statusLabel.text == f"CT-FM encoder ct-fm on the server {server.url}."
        ui.searchButton.click()
        wait_for_job(slicer_flow, widget)
        assert engine.state.value == "Finished", engine.status_summary()
        assert "torch" not in sys.modules  # the Slicer side never imported it
    table = widget._parameterNode.resultsTable
    assert table is engine.results_table and engine.heatmap_node is None
    rows = table.GetTable()
    assert sorted(rows.GetValueByName(row, "case").ToString() for row in range(rows.GetNumberOfRows())) == \
        ["case0", "case1"]
    assert not ui.loadMatchButton.enabled and ui.loadMatchButton.toolTip == MATCH_ON_SERVER

    ui.serverUrlLineEdit.type("")  # back on this computer: its folders and devices again
    assert ui.deviceSelector.visible and ui.indexFolderSelector.visible and not ui.serverIndexSelector.visible
    assert ui.modelSelector.findData("ct-fm") < 0

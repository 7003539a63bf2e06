"""The LCTfoundCTFM panel driven through its widgets on Slicer's own Python layer (each tag of
../shared/slicer-python; Testing/slicer_harness): choose an encoder folder, build an index of a folder
of scans, search it by the loaded scan, pick a row of the results table and load that scan, search by a
point placed twice, cancel a running search, and a failed start. Every action is a real child-process
job; the test turns the event loop (the panel's QTimer) until it has ended.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_factory import save_small_ctfm_encoder

from slicer_harness.fixtures import slicer_app, slicer_session  # noqa: F401

pytestmark = pytest.mark.mrml


def scan(seed: int):
    """64³ voxels of soft tissue (1 × 1 × 3 mm) with air in front (the index job checks that it looks
    like CT) and a bright 6 mm sphere, placed by the seed."""
    from lctfound.io.volume import CTVolume

    rng = np.random.default_rng(seed)
    array = (40.0 + 15.0 * rng.standard_normal((64, 64, 64))).astype(np.float32)
    centre = np.array([31.5, 31.5, 31.5]) if seed == 0 else np.array([12.0, 50.0, 20.0])
    k, j, i = np.meshgrid(*[np.arange(64)] * 3, indexing="ij")
    array[(((np.stack([k, j, i], -1) - centre) * np.array([3.0, 1.0, 1.0])) ** 2).sum(-1) <= 36.0] = 900.0
    array[:, :4] = -1000.0
    return CTVolume(array, (1.0, 1.0, 3.0), (10.0, -20.0, 30.0))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from lctfound.io.volume import write_volume

    folder = tmp_path_factory.mktemp("ctfm-panel")
    encoder = save_small_ctfm_encoder(folder / "encoder")
    scans = folder / "cohort"
    scans.mkdir()
    for seed in range(2):
        write_volume(scan(seed), scans / f"case{seed}.nrrd")  # NRRD keeps the geometry exactly
    return encoder, scans


def view_row_showing(view, case: str) -> int:
    """The row of the table view a user clicks to pick ``case``: qMRMLTableModel shows the column
    titles in its row 0 unless the table node uses them as the header (then view row = table row)."""
    table = view.mrmlTableNode()
    offset = 0 if table.GetUseColumnTitleAsColumnHeader() else 1
    rows = table.GetTable()
    return next(row for row in range(rows.GetNumberOfRows())
                if rows.GetValueByName(row, "case").ToString() == case) + offset


def run_job(app, widget) -> None:
    app.runUntil(lambda: not widget.logic.engine.state.busy, "the CT-FM job")


def choose(combo, value) -> None:
    """Pick the item whose data is ``value``, as a click in the drop-down does."""
    index = combo.findData(value)
    assert index >= 0, f"{combo.objectName} offers no {value!r}"
    combo.setCurrentIndex(index)


def test_index_search_load_point_and_cancel_through_the_panel(slicer_app, cohort, tmp_path):
    import slicer

    from lctfound import mrml
    from lctfound.ctfm.retrieval import load_index
    from lctfound.logic.ctfm import HEATMAP_ATTRIBUTE
    from lctfound.io.volume import read_volume

    encoder, scans = cohort
    widget = slicer_app.selectModule("LCTfoundCTFM")
    ui, node, engine = widget.ui, widget._parameterNode, widget.logic.engine
    engine._runs_root = tmp_path / "runs"  # runs of this test stay in it

    ui.encoderFolderSelector.currentPath = str(encoder)  # listed (and checked) by the child inventory
    assert node.modelName == "encoder" and ui.modelSelector.currentText.startswith("encoder")
    assert not ui.buildIndexButton.enabled and "folder of volumes" in ui.buildIndexButton.toolTip

    # a failed start: the status line is written again (here: a folder that holds no scan)
    empty = tmp_path / "empty"
    empty.mkdir()
    ui.cohortFolderSelector.currentPath = str(empty)
    ui.statusLabel.text = "stale"
    ui.buildIndexButton.click()
    errors = slicer_app.takeSlotErrors()
    assert len(errors) == 1 and "no CT volumes" in errors[0][1]
    assert ui.statusLabel.text.startswith("Indexing could not start.") and "no CT volumes" in ui.statusLabel.text
    assert not engine.state.busy

    # Build index → a new index folder becomes the searched one
    ui.cohortFolderSelector.currentPath = str(scans)
    ui.buildIndexButton.click()
    assert engine.state.busy and ui.cancelButton.enabled and ui.progressBar.visible
    run_job(slicer_app, widget)
    assert ui.statusLabel.text.startswith("Finished"), ui.statusLabel.text
    assert ui.indexFolderSelector.currentPath == str(engine.run_output)

    # search by the loaded scan → a new results table, shown; its second row → Load selected scan
    volume = mrml.load_volume(slicer.mrmlScene, scans / "case0.nrrd", "query")
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.showHeatmapCheckBox.checked = False
    assert ui.searchButton.enabled, ui.searchButton.toolTip
    ui.searchButton.click()
    run_job(slicer_app, widget)
    assert "best 'case0'" in ui.statusLabel.text, ui.statusLabel.text
    table = node.resultsTable
    assert table is not None and ui.resultsTableSelector.currentNode() is table
    assert ui.resultsTableView.mrmlTableNode() is table and table.GetTable().GetNumberOfRows() == 2
    volumes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    ui.resultsTableView.selectRow(view_row_showing(ui.resultsTableView, "case1"))
    ui.loadMatchButton.click()
    loaded = slicer.mrmlScene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    assert loaded.GetNumberOfItems() == volumes + 1
    match = loaded.GetItemAsObject(volumes)
    assert match.GetName() == "case1"
    assert np.array_equal(mrml.ctvolume_from_volume_node(match).array, read_volume(scans / "case1.nrrd").array)

    # search by a point placed twice: the second placement is the query; heat map on
    choose(ui.queryKindSelector, "point")
    assert ui.queryPointSelector.visible and not ui.queryRegionSelector.visible
    fiducial = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "query point")
    ui.queryPointSelector.setCurrentNode(fiducial)
    index = load_index(node.indexFolder)  # the centre of an indexed window of this scan
    point = index.window_centre_ras[[row for row in range(len(index.window_volume))
                                     if index.entries[index.window_volume[row]]["name"] == "case0"][0]]
    fiducial.AddControlPointWorld([0.0, 0.0, 0.0])
    fiducial.AddControlPointWorld([float(v) for v in point])
    slicer_app.processEvents()  # the panel keeps the point just placed
    assert fiducial.GetNumberOfControlPoints() == 1
    ui.showHeatmapCheckBox.checked = True
    ui.searchButton.click()
    run_job(slicer_app, widget)
    table = node.resultsTable
    rows = table.GetTable()
    # the same search in this process, by the point placed last (not the first one)
    expected = engine.search(node.indexFolder, volume, engine.load_backbone(str(encoder)), point_ras=point, top_k=2)
    assert [rows.GetValueByName(row, "case").ToString() for row in range(2)] == ["case0", "case1"]
    assert [rows.GetValueByName(row, "score").ToDouble() for row in range(2)] == pytest.approx(
        [row["score"] for row in expected.rows], abs=1e-4)
    assert json.loads(table.GetAttribute(HEATMAP_ATTRIBUTE))["centre_ras"] == pytest.approx(expected.query.centre_ras,
                                                                                          abs=1e-6)
    heatmap = engine.heatmap_node
    assert heatmap is not None and heatmap.GetScene() is slicer.mrmlScene and heatmap is not volume

    # cancel a running search: nothing is added
    nodes = slicer.mrmlScene.GetNumberOfNodes()
    ui.searchButton.click()
    assert ui.cancelButton.enabled
    ui.cancelButton.click()
    run_job(slicer_app, widget)
    assert ui.statusLabel.text.startswith("Cancelled"), ui.statusLabel.text
    assert slicer.mrmlScene.GetNumberOfNodes() == nodes and node.resultsTable is table
    assert ui.searchButton.enabled and not ui.cancelButton.enabled

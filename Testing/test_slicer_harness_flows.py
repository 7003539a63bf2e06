"""The modules' main flows driven through their widgets (clicks, field changes) on Slicer's own
Python layer of each tag, with real child-process jobs.

Few-shot segmentation: load a CT, paint 2 slices, Train → the job runs → Predict → the result in
the Segment Editor → mark a slice reviewed → retrain while the annotator is in the Segment Editor
(the follow-up must still happen) → Cancel a running job → a failed start. Enhance: the default
task. Train: pretraining start → Cancel → Resume. Kept tiny: a 6×32×32 CT and a 32-pixel backbone
("imported" into the private model folder, then Refresh), few steps. The tests of a module build
on each other in file order (one scene per tag).
"""

from __future__ import annotations

import numpy as np
import pytest

from slicer_harness.fixtures import slicer_flow, slicer_session, volume_from_array  # noqa: F401

# The timeout is a hang guard, not a speed requirement: a few-shot training (600 head steps) takes
# about a minute on an idle 2-core machine and took 10-15 on one shared by six test runs.
pytestmark = [pytest.mark.mrml, pytest.mark.timeout(3600)]

SHAPE = (6, 32, 32)
PAINTED = (1, 4)
BACKBONE = "harness-tiny"


def tiny_ct():
    from data_factory import fewshot_phantom

    volume, lesion, _ = fewshot_phantom(slices=SHAPE[0], size=SHAPE[1])
    return np.round(volume).astype(np.int16), lesion


def paint(segmentation, volume, mask, slices):
    """What painting in the Segment Editor leaves behind: a segment with the mask on ``slices``."""
    import slicer

    segment_id = segmentation.GetSegmentation().AddEmptySegment("lesion", "Lesion", (1.0, 0.2, 0.2))
    painted = np.zeros(mask.shape, dtype=np.uint8)
    for k in slices:
        painted[k] = mask[k]
    slicer.util.updateSegmentBinaryLabelmapFromArray(painted, segmentation, segment_id, volume)
    return segment_id


def show_slice(volume, k):
    """Scroll the red view to slice ``k`` of ``volume`` (what the annotator does before Mark)."""
    import slicer
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    centre = slicer.util.arrayFromVTKMatrix(matrix) @ np.array([SHAPE[2] / 2, SHAPE[1] / 2, k, 1.0])
    slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().JumpSliceByCentering(*centre[:3])


def wait_for_job(harness, widget):
    engine = widget.logic.engine
    harness.runUntil(lambda: not engine.state.busy and not widget._timer.isActive(), "the job to end")
    return engine


def import_tiny_backbone():
    """A 32-pixel backbone in the user model folder, as `lctfound models import` would leave it."""
    from model_factory import tiny_model

    from lctfound.models import save_model
    from lctfound.paths import user_models_dir

    folder = user_models_dir() / BACKBONE
    if not folder.is_dir():
        save_model(tiny_model(32, seed=1), folder)


@pytest.fixture(scope="module")
def scene(slicer_session):
    """The CT and the annotator's 2 painted slices."""
    volume, segmentation, _ = painted_chest()
    import_tiny_backbone()
    return dict(volume=volume, segmentation=segmentation)


def painted_chest():
    """(volume node, segmentation node with the lesion painted on `PAINTED`, the lesion mask) in the scene."""
    import slicer

    array, lesion = tiny_ct()
    volume = volume_from_array(array, name="chest")
    segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "annotation")
    segmentation.CreateDefaultDisplayNodes()
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    paint(segmentation, volume, lesion, PAINTED)
    return volume, segmentation, lesion


# -- LCTfoundSegmentation -----------------------------------------------------------------------


def test_fewshot_train_then_predict_into_the_segment_editor(slicer_flow, scene):
    import slicer

    from lctfound.logic import format_slices, reviewed_slices

    widget = slicer_flow.selectModule("LCTfoundSegmentation")
    ui, engine = widget.ui, widget.logic.engine
    ui.taskSelector.select("fewshot")
    assert widget._parameterNode.inputVolume is scene["volume"]  # the only volume, picked by the selector
    ui.annotationSelector.select(scene["segmentation"])
    ui.refreshModelsButton.click()  # the user imported a backbone
    ui.modelSelector.select(BACKBONE)
    ui.deviceSelector.select("cpu")
    ui.newModelNameLineEdit.type("lesion-v1")
    ui.epochsSpinBox.value = 1
    assert ui.trainButton.enabled, ui.trainButton.toolTip
    ui.trainButton.click()
    assert engine.state.busy and ui.cancelButton.enabled and not ui.trainButton.enabled
    assert ui.progressBar.visible
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Finished", engine.status_summary()
    node = widget._parameterNode
    assert node.taskModel == "lesion-v1" and ui.taskModelSelector.currentData() == "lesion-v1"
    assert ui.newModelNameLineEdit.text == ""

    ui.outputModeSelector.select("new")
    assert ui.predictButton.enabled, ui.predictButton.toolTip
    ui.predictButton.click()
    wait_for_job(slicer_flow, widget)
    result = engine.result_segmentation
    assert engine.state.value == "Finished" and result is not None and result is not scene["segmentation"]
    editor = slicer.modules.SegmentEditorWidget.editor
    assert editor.segmentationNode() is result and editor.sourceVolumeNode() is scene["volume"]
    assert node.annotationSegmentation is result and ui.annotationSelector.currentNode() is result
    assert ui.reviewedSlicesLabel.text == format_slices(PAINTED)  # the painted slices stay ground truth

    # the annotator checks slices in the red view and marks them reviewed
    show_slice(scene["volume"], 2)
    ui.markReviewedButton.click()
    assert ui.reviewedSlicesLabel.text == format_slices([1, 2, 4])
    ui.unmarkReviewedButton.click()
    show_slice(scene["volume"], 3)
    ui.markReviewedButton.click()
    assert reviewed_slices(result) == [1, 3, 4] and ui.reviewedSlicesLabel.text == format_slices([1, 3, 4])


def test_retrain_and_predict_while_in_the_segment_editor(slicer_flow, scene):
    """Finding 6: the annotator paints in the Segment Editor while the job runs; when it ends the new
    model is still selected and the prediction still reaches the editor."""
    import slicer

    widget = slicer_flow.selectModule("LCTfoundSegmentation")
    ui, engine = widget.ui, widget.logic.engine
    ui.newModelNameLineEdit.type("lesion-v2")
    ui.trainButton.click()
    slicer_flow.selectModule("SegmentEditor")
    assert widget._parameterNode is None  # exit() unbound the panel
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Finished", engine.status_summary()
    # retrained from the model that predicted the slices, on the reviewed slices
    assert engine._job_info["init"] == "lesion-v1" and engine._job_info["slices"] == [1, 3, 4]
    node = widget.logic.getParameterNode()
    assert node.taskModel == "lesion-v2" and node.newModelName == ""

    slicer_flow.selectModule("LCTfoundSegmentation")
    assert ui.taskModelSelector.currentData() == "lesion-v2"
    ui.outputModeSelector.select("new")
    ui.predictButton.click()
    slicer_flow.selectModule("SegmentEditor")
    wait_for_job(slicer_flow, widget)
    editor = slicer.modules.SegmentEditorWidget.editor
    assert engine.state.value == "Finished", engine.status_summary()
    assert editor.segmentationNode() is engine.result_segmentation
    assert widget.logic.getParameterNode().annotationSegmentation is engine.result_segmentation


def test_cancel_a_running_training(slicer_flow, scene):
    widget = slicer_flow.selectModule("LCTfoundSegmentation")
    ui, engine = widget.ui, widget.logic.engine
    ui.newModelNameLineEdit.type("lesion-cancelled")
    ui.trainButton.click()
    assert engine.state.busy
    ui.cancelButton.click()
    assert not ui.trainButton.enabled  # stopping
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Cancelled", engine.status_summary()
    assert "Cancelled" in ui.statusLabel.text, ui.statusLabel.text
    assert ui.trainButton.enabled and widget._parameterNode.taskModel == "lesion-v2"


def test_failed_start_says_why_in_the_status_line(slicer_flow, scene):
    """Finding 8: after a failed start the status line says so (and the buttons are refreshed)."""
    widget = slicer_flow.selectModule("LCTfoundSegmentation")
    ui, engine = widget.ui, widget.logic.engine
    ui.newModelNameLineEdit.type("lesion-nopython")
    python, engine.python = engine.python, "/nonexistent/PythonSlicer"
    try:
        ui.trainButton.click()
    finally:
        engine.python = python
    errors = slicer_flow.takeSlotErrors()
    assert len(errors) == 1  # re-raised after the error popup: the Python console has the traceback
    assert ui.statusLabel.text.startswith("Training could not start."), ui.statusLabel.text
    assert ui.trainButton.enabled and not engine.state.busy
    ui.newModelNameLineEdit.type("lesion-other")  # a changed setting: the status says what holds now
    assert not ui.statusLabel.text.startswith("Training could not start.")


# -- LCTfoundEnhance --------------------------------------------------------------------------------


def test_enhance_default_task(slicer_flow, scene):
    widget = slicer_flow.selectModule("LCTfoundEnhance")
    ui, engine, node = widget.ui, widget.logic.engine, widget._parameterNode
    default_task = node.task
    assert ui.taskSelector.currentData() == default_task and node.inputVolume is scene["volume"]
    ui.modelSelector.select(BACKBONE)
    ui.deviceSelector.select("cpu")
    ui.factorSpinBox.value = 2
    ui.stepsSpinBox.value = 2
    assert ui.startButton.enabled, ui.startButton.toolTip
    ui.startButton.click()
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Finished", engine.status_summary()
    result = engine.result_volume
    assert result is not None and result is not scene["volume"]
    assert ui.comparisonSlider.enabled
    import slicer

    composite = slicer.app.layoutManager().sliceWidget("Red").sliceLogic().GetSliceCompositeNode()
    assert result.GetID() in (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID())


# -- LCTfoundTrain ----------------------------------------------------------------------------------


def set_up_pretraining(widget, volume, max_steps, name, checkpoint_every=1):
    """Pretrain on the loaded CT: 32-pixel slices, batch 2. (Each checkpoint also renders sample
    images, the slowest part here.)"""
    ui = widget.ui
    ui.taskSelector.select("pretrain")
    ui.dataSourceSelector.select("volumes")
    if volume not in ui.trainingVolumesSelector.checkedNodes():
        ui.trainingVolumesSelector.check(volume)
    assert [node.GetID() for node in widget._parameterNode.trainingVolumes] == [volume.GetID()]
    ui.resolutionSpinBox.value = 32
    ui.patchSizeSpinBox.value = 0
    ui.batchSizeSpinBox.value = 2
    ui.maxStepsSpinBox.value = max_steps
    ui.checkpointEverySpinBox.value = checkpoint_every
    ui.deviceSelector.select("cpu")
    ui.newModelNameLineEdit.type(name)
    assert ui.startButton.enabled, ui.startButton.toolTip


def test_pretrain_start_cancel_resume(slicer_flow, scene):
    widget = slicer_flow.selectModule("LCTfoundTrain")
    ui, engine = widget.ui, widget.logic.engine
    set_up_pretraining(widget, scene["volume"], max_steps=100000, name="harness-pretrained")
    assert not ui.resumeButton.enabled
    ui.startButton.click()
    assert engine.state.busy and ui.cancelButton.enabled
    slicer_flow.runUntil(lambda: engine.last_checkpoint_step or not engine.state.busy, "the first checkpoint")
    ui.cancelButton.click()
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Cancelled", engine.status_summary()
    first = engine.last_checkpoint_step
    assert first and ui.resumeButton.enabled, ui.resumeButton.toolTip

    ui.resumeButton.click()
    assert engine.state.busy
    # the job reports the step it resumed from (a restarted run would count from 0)
    slicer_flow.runUntil(lambda: engine.status().done >= first or not engine.state.busy, "the resumed run")
    assert engine.state.busy, engine.status_summary()
    ui.cancelButton.click()
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Cancelled", engine.status_summary()


def test_pretrain_finishing_in_another_module_registers_and_frees_the_name(slicer_flow, scene):
    """Finding 6 for LCTfoundTrain: the run ends while the Segment Editor is shown."""
    widget = slicer_flow.selectModule("LCTfoundTrain")
    ui, engine = widget.ui, widget.logic.engine
    set_up_pretraining(widget, scene["volume"], max_steps=2, name="harness-away", checkpoint_every=2)
    ui.startButton.click()
    slicer_flow.selectModule("SegmentEditor")
    wait_for_job(slicer_flow, widget)
    assert engine.state.value == "Finished", engine.status_summary()
    node = widget.logic.getParameterNode()
    assert node.newModelName != "harness-away"  # a free name for the next run
    segmentation = slicer_flow.selectModule("LCTfoundSegmentation")
    segmentation.ui.refreshModelsButton.click()
    assert segmentation.ui.modelSelector.findData("harness-away") >= 0

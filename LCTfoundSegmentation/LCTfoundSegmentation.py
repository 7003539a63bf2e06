"""LCTfoundSegmentation: few-shot segmentation with an in-place correction loop, lung structures and
diagnosis (scan classification with a saliency overlay).

Thin Slicer front end. Train and Predict run in a background process (`lctfound.jobs`); a QTimer
polls the Qt-free `lctfound.logic.SegmentationModuleLogic`, which exports the volume and the
labelled/reviewed slices, follows the job, loads results into NEW nodes (or, on request, into the
annotation after saving an undo state) and decides which buttons are enabled and why. That logic is
tested without Slicer.
"""

import os
import sys
from typing import Annotated, Optional

import qt

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# A source checkout has LCTfoundSlicerLib and lctfound next to this module's folder (an installed
# extension has them in qt-scripted-modules, on sys.path already); the library cannot add itself.
_sourceRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_sourceRoot, "LCTfoundSlicerLib", "__init__.py")) and _sourceRoot not in sys.path:
    sys.path.append(_sourceRoot)

# Light imports only (no torch): this runs while Slicer starts.
from LCTfoundSlicerLib import (  # noqa: E402
    LCTfoundJobModuleWidget,
    LCTfoundModule,
    LCTfoundModuleLogic,
    LCTfoundVolumeModuleTestMixin,
    pythonSlicerExecutable,
)
from lctfound.logic import (  # noqa: E402
    DIAGNOSIS,
    SegmentationModuleLogic,
    SegmentationParameters,
    format_slices,
    mark_slice_reviewed,
    reviewed_slices,
    slice_index_at,
)

_DEFAULTS = SegmentationParameters()


#
# LCTfoundSegmentation
#


class LCTfoundSegmentation(LCTfoundModule):
    def __init__(self, parent):
        LCTfoundModule.__init__(
            self,
            parent,
            title=_("LCTfound Segmentation"),
            helpText=_(
                "Few-shot segmentation on LCTfound features: paint a structure on a few slices, train, predict the "
                "whole volume, correct slices in the Segment Editor, mark them reviewed and retrain. Also predicts "
                "many-structure lung models (with 3D surfaces) and runs trained scan classifiers with a saliency "
                "overlay: a research tool, not a diagnosis."
            ),
        )


#
# Parameters
#


@parameterNodeWrapper
class LCTfoundSegmentationParameterNode:
    """
    task - fewshot, structures or diagnosis.
    inputVolume - the CT volume to process.
    annotationSegmentation - the segmentation with the annotator's labelled (or reviewed) slices.
    modelName - the backbone a few-shot model is trained on.
    taskModel - the trained model that predicts (few-shot, student, structures or classifier).
    newModelName - the name a newly trained few-shot model is registered under.
    epochs, window - few-shot training settings.
    outputMode - "new" segmentation node, or "update" the annotation (undo state saved first).
    keepConnected, extentMarginMm, wholeVolume - few-shot prediction kept to the annotated extent (plus a
        margin in mm, or every slice) and to the 3D parts touching the annotation.
    keepLargest, fillHoles, smooth, surfaces - post-processing and 3D display of segmentations.
    saliency - add a Grad-CAM overlay volume to diagnosis results.
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    serverUrl, serverTokenFile - "Run on": empty for this computer, else an `lctfound serve` address and
        the file holding its access token (empty: $LCTFOUND_SERVER_TOKEN).
    """

    task: str = _DEFAULTS.task
    inputVolume: vtkMRMLScalarVolumeNode
    annotationSegmentation: vtkMRMLSegmentationNode
    modelName: str = ""
    taskModel: str = ""
    newModelName: str = ""
    epochs: Annotated[int, WithinRange(1, 10000)] = _DEFAULTS.epochs
    window: str = _DEFAULTS.window
    outputMode: str = _DEFAULTS.output_mode
    keepConnected: bool = _DEFAULTS.keep_connected
    extentMarginMm: Annotated[float, WithinRange(0.0, 10000.0)] = _DEFAULTS.extent_margin_mm
    wholeVolume: bool = _DEFAULTS.whole_volume
    keepLargest: bool = _DEFAULTS.keep_largest
    fillHoles: bool = _DEFAULTS.fill_holes
    smooth: bool = _DEFAULTS.smooth
    surfaces: bool = _DEFAULTS.surfaces
    saliency: bool = _DEFAULTS.saliency
    device: str = _DEFAULTS.device
    serverUrl: str = _DEFAULTS.server_url
    serverTokenFile: str = _DEFAULTS.server_token_file


#
# LCTfoundSegmentationWidget
#


class LCTfoundSegmentationWidget(LCTfoundJobModuleWidget):
    """Task, inputs, few-shot training, prediction and results; the parameter node, the hand-synced
    choice selectors and the status line are the bases'."""

    uiFile = "UI/LCTfoundSegmentation.ui"

    def __init__(self, parent=None) -> None:
        LCTfoundJobModuleWidget.__init__(self, parent)
        self._shownTask = None

    def createLogic(self) -> "LCTfoundSegmentationLogic":
        return LCTfoundSegmentationLogic()

    def setupWidgets(self, uiWidget) -> None:
        LCTfoundJobModuleWidget.setupWidgets(self, uiWidget)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.predictButton.connect("clicked(bool)", self.onPredictButton)
        self.ui.undoButton.connect("clicked(bool)", self.onUndoButton)
        self.ui.markReviewedButton.connect("clicked(bool)", lambda: self.onMarkReviewed(True))
        self.ui.unmarkReviewedButton.connect("clicked(bool)", lambda: self.onMarkReviewed(False))

    # -- selectors ----------------------------------------------------------------------------

    def _onTaskShown(self) -> None:
        """A new task: its trained models in the model selector, and a default one chosen."""
        self._shownTask = self._parameterNode.task if self._parameterNode else None
        if self._parameterNode:
            self._parameterNode.taskModel = ""
        self._onServerShown()

    # -- state to widgets ---------------------------------------------------------------------

    def _updateStatus(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.task != self._shownTask:
            self._onTaskShown()  # may modify the parameter node, which calls this again
        LCTfoundJobModuleWidget._updateStatus(self)
        engine = self.logic.engine
        node = self._parameterNode
        shown = engine.visible_fields(node) if node else set()
        fields = {
            "annotation_segmentation": (self.ui.annotationLabel, self.ui.annotationSelector),
            "output_mode": (self.ui.outputModeLabel, self.ui.outputModeSelector),
            "saliency": (self.ui.saliencyLabel, self.ui.saliencyCheckBox),
            "surfaces": (self.ui.surfacesLabel, self.ui.surfacesCheckBox),
            "keep_largest": (self.ui.postprocessLabel, self.ui.keepLargestCheckBox, self.ui.fillHolesCheckBox,
                             self.ui.smoothCheckBox),
            "keep_connected": (self.ui.keepConnectedCheckBox,),
            "extent_margin_mm": (self.ui.extentLabel, self.ui.extentMarginSpinBox, self.ui.wholeVolumeCheckBox),
            "device": (self.ui.deviceLabel, self.ui.deviceSelector),
        }
        for name, widgets in fields.items():
            for widget in widgets:
                widget.visible = name in shown
        self.ui.trainCollapsibleButton.visible = "new_model_name" in shown
        self.ui.resultsCollapsibleButton.visible = bool(node and node.task == DIAGNOSIS)
        annotation = node.annotationSegmentation if node else None
        marked = reviewed_slices(annotation) if annotation else None
        self.ui.reviewedSlicesLabel.text = (
            _("none marked: painted slices are used") if marked is None else format_slices(marked) or _("none"))
        for button, state in (
            (self.ui.trainButton, engine.train_button_state(node) if node else None),
            (self.ui.predictButton, engine.predict_button_state(node) if node else None),
        ):
            button.enabled = bool(state and state.enabled)
            button.toolTip = state.tooltip if state else ""
        markable = bool(annotation and node.inputVolume)
        self.ui.markReviewedButton.enabled = self.ui.unmarkReviewedButton.enabled = markable
        result = engine.result_segmentation
        self.ui.undoButton.enabled = bool(result and engine.undo_stack(result).can_undo)
        self._showProgress()

    def _showDiagnosis(self) -> None:
        rows = self.logic.engine.diagnosis_rows
        table = self.ui.resultsTable
        columns = [key for key in (rows[0] if rows else {}) if key != "note"]
        table.clear()
        table.setColumnCount(len(columns))
        table.setRowCount(len(rows))
        table.setHorizontalHeaderLabels(columns)
        for row, values in enumerate(rows):
            for column, key in enumerate(columns):
                item = qt.QTableWidgetItem(str(values.get(key, "")))
                item.setFlags(qt.Qt.ItemIsEnabled | qt.Qt.ItemIsSelectable)
                table.setItem(row, column, item)
        self.ui.resultsNoteLabel.text = rows[0].get("note", "") if rows else ""
        saliency = self.logic.engine.saliency_volume
        if saliency is not None:
            slicer.util.setSliceViewerLayers(foreground=saliency, foregroundOpacity=0.4)

    def _showSegmentation(self, node) -> None:
        result = self.logic.engine.result_segmentation
        if result is None:
            return
        node.annotationSegmentation = result  # corrections are made on the result
        editor = getattr(getattr(slicer.modules, "SegmentEditorWidget", None), "editor", None)
        if editor is not None:
            editor.setSegmentationNode(result)
            editor.setSourceVolumeNode(node.inputVolume)

    # -- actions ------------------------------------------------------------------------------

    def onTrainButton(self) -> None:
        def start():
            self.logic.engine.start_train(self._parameterNode)
            self._startPolling()

        self._runStart(_("Training could not start."), start)

    def onPredictButton(self) -> None:
        def start():
            self.logic.engine.start_predict(self._parameterNode)
            self._startPolling()

        self._runStart(_("Prediction could not start."), start)

    def onUndoButton(self) -> None:
        result = self.logic.engine.result_segmentation
        if result is not None:
            self.logic.engine.undo_stack(result).undo()
        self._updateStatus()

    def onMarkReviewed(self, reviewed: bool) -> None:
        node = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("The slice could not be marked."), waitCursor=False):
            # The red view's plane centre (column 3 of SliceToRAS) is a point on the shown slice.
            sliceToRAS = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceNode().GetSliceToRAS()
            position = [sliceToRAS.GetElement(row, 3) for row in range(3)]
            index = slice_index_at(node.inputVolume, position)
            mark_slice_reviewed(node.annotationSegmentation, index, reviewed)
        self._updateStatus()

    def _onJobEnded(self) -> None:
        # Also while another module is shown (the annotator paints in the Segment Editor meanwhile).
        action = self.logic.engine._job_info.get("action")
        node = self.jobParameterNode()
        if action == "train":
            self._fillChoiceSelectors()
            node.taskModel = node.newModelName.strip()
            node.newModelName = ""
        elif action == "classify":
            self._showDiagnosis()
        else:
            self._showSegmentation(node)


#
# LCTfoundSegmentationLogic
#


class LCTfoundSegmentationLogic(LCTfoundModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.SegmentationModuleLogic`). Can be used without the GUI widget:

        logic = LCTfoundSegmentationLogic()
        logic.engine.start_train(parameterNode)      # returns at once
        while logic.engine.poll() or logic.engine.state.busy: ...
    """

    parameterNodeClass = LCTfoundSegmentationParameterNode

    def __init__(self, engine: Optional[SegmentationModuleLogic] = None) -> None:
        LCTfoundModuleLogic.__init__(self, engine or SegmentationModuleLogic(python=pythonSlicerExecutable()))


#
# LCTfoundSegmentationTest
#


class LCTfoundSegmentationTest(LCTfoundVolumeModuleTestMixin, ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundSegmentation); the headless tests are in Testing/Python
    and Testing/test_segmentation_logic.py."""

    logicClass = LCTfoundSegmentationLogic
    engineClass = SegmentationModuleLogic

    def test_ReviewedSlices(self):
        import numpy as np

        from lctfound.mrml import segmentation_node_from_labels

        self.delayDisplay("Marking reviewed slices")
        volume = slicer.util.addVolumeFromArray(np.full((6, 32, 32), -800, dtype=np.int16), name="LCTfoundTestCT")
        labels = np.zeros((6, 32, 32), dtype=np.uint8)
        labels[2, 10:20, 10:20] = 1
        segmentation = segmentation_node_from_labels(slicer.mrmlScene, labels, volume, {1: "Lesion"})
        self.assertEqual(mark_slice_reviewed(segmentation, 4), [2, 4])
        self.assertEqual(reviewed_slices(segmentation), [2, 4])
        self.delayDisplay("Test passed")

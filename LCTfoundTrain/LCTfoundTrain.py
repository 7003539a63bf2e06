"""LCTfoundTrain: pretrain an LCTfound model on your own lung CT volumes, or fine-tune a backbone
for segmentation (from your segmentations) or classification (from class names per scan).

Thin Slicer front end. Training runs in a background process (`lctfound.jobs`); a QTimer polls
the Qt-free `lctfound.logic.TrainModuleLogic`, which turns the process's events into progress,
ETA, loss history and status, registers the trained model, and decides which buttons are
enabled and why. That logic is tested without Slicer.
"""

import os
import sys
from pathlib import Path
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
    LCTfoundModule,
    LCTfoundModuleLogic,
    LCTfoundModuleTestMixin,
    LCTfoundModuleWidget,
    pythonSlicerExecutable,
)
from lctfound.logic import (  # noqa: E402
    NODE_LIST_PROPERTY_NAME,
    RunState,
    TrainModuleLogic,
    TrainParameters,
    set_volume_class_name,
    volume_class_name,
)

POLL_INTERVAL_MS = 500
_DEFAULTS = TrainParameters()


#
# LCTfoundTrain
#


class LCTfoundTrain(LCTfoundModule):
    def __init__(self, parent):
        LCTfoundModule.__init__(
            self,
            parent,
            title=_("LCTfound Train"),
            helpText=_(
                "Pretrain an LCTfound diffusion model on your own lung CT volumes, or fine-tune a backbone "
                "for segmentation (loaded volumes with the segmentations drawn on them, or image/label file "
                "pairs) or classification (a CSV table, or loaded volumes given a class name). Training runs "
                "in the background with progress, ETA and a loss curve; Cancel keeps the newest checkpoint "
                "and Resume continues from it. The finished model is registered under the name you choose "
                "and appears in every LCTfound module."
            ),
        )


#
# Parameters
#


@parameterNodeWrapper
class LCTfoundTrainParameterNode:
    """
    task - "pretrain", "finetune-segmentation" or "finetune-classification".
    dataSource - "folder" (dataFolder: CT files, or CASE_image/CASE_label pairs), "table" (tablePath:
      CSV image,label) or "volumes" (trainingVolumes, exported when training starts; with
      trainingSegmentations for segmentation, or each volume's class name for classification).
    segmentFilter - "all" or "reviewed" (only segments with status Completed).
    backboneModel, mode (frozen/adapter/full), slicesPerScan (0: all) - fine-tuning settings.
    preset, resolution, patchSize (0: whole slices) - pretraining settings.
    batchSize, maxSteps, learningRate (0: the task's default), checkpointEvery, emaDecay (0: none).
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    runFolder - empty: a new folder under the LCTfound cache; an existing run folder to Resume.
    newModelName - the name the trained model is registered under.
    serverUrl, serverTokenFile - "Run on": empty for this computer, else an `lctfound serve` address and
        the file holding its access token (empty: $LCTFOUND_SERVER_TOKEN).
    """

    dataSource: str = _DEFAULTS.data_source
    dataFolder: Path
    trainingVolumes: list[vtkMRMLScalarVolumeNode]
    trainingSegmentations: list[vtkMRMLSegmentationNode]
    segmentFilter: str = _DEFAULTS.segment_filter
    tablePath: Path
    task: str = _DEFAULTS.task
    backboneModel: str = ""
    mode: str = ""
    slicesPerScan: Annotated[int, WithinRange(0, 100_000)] = _DEFAULTS.slices_per_scan
    preset: str = _DEFAULTS.preset
    resolution: Annotated[int, WithinRange(16, 2048)] = _DEFAULTS.resolution
    patchSize: Annotated[int, WithinRange(0, 2048)] = _DEFAULTS.patch_size
    batchSize: Annotated[int, WithinRange(1, 4096)] = _DEFAULTS.batch_size
    maxSteps: Annotated[int, WithinRange(1, 100_000_000)] = _DEFAULTS.max_steps
    # Decimals of the float fields are set in the .ui (a Decimals(...) annotation logs "Unused annotations").
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = _DEFAULTS.learning_rate
    checkpointEvery: Annotated[int, WithinRange(1, 100_000_000)] = _DEFAULTS.checkpoint_every
    emaDecay: Annotated[float, WithinRange(0.0, 0.9999)] = _DEFAULTS.ema_decay
    device: str = _DEFAULTS.device
    runFolder: Path
    newModelName: str = ""
    serverUrl: str = _DEFAULTS.server_url
    serverTokenFile: str = _DEFAULTS.server_token_file


#
# LCTfoundTrainWidget
#


class LCTfoundTrainWidget(LCTfoundModuleWidget):
    """Task, data, settings and run controls; the parameter node, the hand-synced choice selectors,
    the status line and the scene/module observers are LCTfoundModuleWidget's."""

    uiFile = "UI/LCTfoundTrain.ui"

    def __init__(self, parent=None) -> None:
        LCTfoundModuleWidget.__init__(self, parent)
        self._nodeListSelectors = {}
        self._timer = None
        self._shownTask = None

    def createLogic(self) -> "LCTfoundTrainLogic":
        return LCTfoundTrainLogic()

    def setupWidgets(self, uiWidget) -> None:
        # Node lists have no connectGui connector either: synced by hand like the choice selectors.
        for selector in uiWidget.findChildren(slicer.qMRMLCheckableNodeComboBox):
            name = selector.property(NODE_LIST_PROPERTY_NAME)
            if name:
                self._nodeListSelectors[name] = selector
                selector.connect("checkedNodesChanged()", lambda name=name: self._onNodesChecked(name))

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.ui.volumeClassesTable.connect("cellChanged(int,int)", self.onClassNameEdited)

    def cleanup(self) -> None:
        LCTfoundModuleWidget.cleanup(self)
        if self._timer:
            self._timer.stop()
        if self.logic and self.logic.engine.job is not None and self.logic.engine.state.busy:
            self.logic.engine.job.cancel(timeout=2)  # do not leave a training process behind

    def setParameterNode(self, inputParameterNode: Optional[LCTfoundTrainParameterNode]) -> None:
        self._shownTask = None  # a (re)connected node keeps its stored mode; see _onTaskShown
        LCTfoundModuleWidget.setParameterNode(self, inputParameterNode)

    # -- selectors synced by hand --------------------------------------------------------------

    def _choiceItems(self, name: str, refresh: bool = False) -> list:
        return self.logic.engine.choices(name, refresh=refresh, parameters=self._parameterNode)

    def _onNodesChecked(self, name: str) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, list(self._nodeListSelectors[name].checkedNodes()))

    def _syncSelectors(self) -> None:
        LCTfoundModuleWidget._syncSelectors(self)
        for name, selector in self._nodeListSelectors.items():
            checked = {node.GetID() for node in (getattr(self._parameterNode, name) if self._parameterNode else []) if node}
            wasBlocked = selector.blockSignals(True)
            for index in range(selector.nodeCount()):
                node = selector.nodeFromIndex(index)
                selector.setCheckState(node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
            selector.blockSignals(wasBlocked)

    # -- state to widgets ---------------------------------------------------------------------

    def _onTaskShown(self) -> None:
        """A new task: its data sources and modes in the selectors, and its defaults filled in."""
        switched = self._shownTask is not None
        self._shownTask = self._parameterNode.task if self._parameterNode else None
        self._fillChoiceSelectors()
        if self._parameterNode and switched:
            self.logic.engine.fill_task_defaults(self._parameterNode)
        elif self._parameterNode:
            self.logic.engine.fill_defaults(self._parameterNode)

    def _fillClassTable(self) -> None:
        """One row per selected volume: its name and its class name (a node attribute)."""
        volumes = [node for node in (self._parameterNode.trainingVolumes if self._parameterNode else []) if node]
        table = self.ui.volumeClassesTable
        shown = [(table.item(row, 0).text() if table.item(row, 0) else "", table.item(row, 1).text() if table.item(row, 1) else "")
                 for row in range(table.rowCount)]
        if shown == [(node.GetName(), volume_class_name(node)) for node in volumes]:
            return  # unchanged: do not disturb an edit under way
        wasBlocked = table.blockSignals(True)
        table.rowCount = len(volumes)
        for row, node in enumerate(volumes):
            nameItem = qt.QTableWidgetItem(node.GetName())
            nameItem.setFlags(qt.Qt.ItemIsEnabled)
            nameItem.setData(qt.Qt.UserRole, node.GetID())
            table.setItem(row, 0, nameItem)
            table.setItem(row, 1, qt.QTableWidgetItem(volume_class_name(node)))
        table.blockSignals(wasBlocked)

    def onClassNameEdited(self, row: int, column: int) -> None:
        table = self.ui.volumeClassesTable
        if column != 1 or table.item(row, 0) is None:
            return
        node = slicer.mrmlScene.GetNodeByID(table.item(row, 0).data(qt.Qt.UserRole))
        if node is not None:
            set_volume_class_name(node, table.item(row, 1).text() if table.item(row, 1) else "")
        self._updateStatus()

    def statusText(self) -> str:
        engine = self.logic.engine
        if engine.state is RunState.IDLE and self._parameterNode:
            return engine.first_problem(self._parameterNode) or _("Ready to start training.")
        run = f"\n{engine.run_folder}" if engine.run_folder else ""
        return engine.status_summary() + run

    def _updateStatus(self, caller=None, event=None) -> None:
        if self._parameterNode and self._parameterNode.task != self._shownTask:
            self._onTaskShown()  # may modify the parameter node, which calls this again
        LCTfoundModuleWidget._updateStatus(self)  # selectors and status line
        engine = self.logic.engine
        shown = engine.visible_fields(self._parameterNode) if self._parameterNode else {"data_folder"}
        fields = {
            "data_folder": (self.ui.dataFolderLabel, self.ui.dataFolderSelector),
            "table_path": (self.ui.tablePathLabel, self.ui.tablePathSelector),
            "training_volumes": (self.ui.trainingVolumesLabel, self.ui.trainingVolumesSelector),
            "training_segmentations": (self.ui.trainingSegmentationsLabel, self.ui.trainingSegmentationsSelector),
            "segment_filter": (self.ui.segmentFilterLabel, self.ui.segmentFilterSelector),
            "volume_classes": (self.ui.volumeClassesLabel, self.ui.volumeClassesTable),
            "backbone_model": (self.ui.backboneModelLabel, self.ui.backboneModelSelector),
            "mode": (self.ui.modeLabel, self.ui.modeSelector),
            "preset": (self.ui.presetLabel, self.ui.presetSelector),
            "resolution": (self.ui.resolutionLabel, self.ui.resolutionSpinBox),
            "patch_size": (self.ui.patchSizeLabel, self.ui.patchSizeSpinBox),
            "slices_per_scan": (self.ui.slicesPerScanLabel, self.ui.slicesPerScanSpinBox),
        }
        for name, widgets in fields.items():
            for widget in widgets:
                widget.visible = name in shown
        if "volume_classes" in shown:
            self._fillClassTable()
        summary = engine.data_summary(self._parameterNode) if self._parameterNode else ""
        self.ui.dataSummaryLabel.text = summary
        for widget in (self.ui.dataSummaryTitleLabel, self.ui.dataSummaryLabel):
            widget.visible = bool(summary)
        for button, state in (
            (self.ui.startButton, engine.start_button_state(self._parameterNode) if self._parameterNode else None),
            (self.ui.cancelButton, engine.cancel_button_state()),
            (self.ui.resumeButton, engine.resume_button_state(self._parameterNode)),
        ):
            button.enabled = bool(state and state.enabled)
            button.toolTip = state.tooltip if state else ""
        bar = engine.progress_bar_state()
        self.ui.progressBar.visible = bar.visible
        self.ui.progressBar.maximum = bar.maximum
        self.ui.progressBar.value = bar.value
        self.ui.progressBar.format = bar.text

    def _showLossCurve(self) -> None:
        path = self.logic.engine.loss_curve_png()
        if path is None:
            self.ui.lossCurveLabel.clear()
            return
        pixmap = qt.QPixmap(str(path))
        width = max(self.ui.lossCurveLabel.width, 200)
        self.ui.lossCurveLabel.setPixmap(pixmap.scaledToWidth(width, qt.Qt.SmoothTransformation))

    # -- actions ------------------------------------------------------------------------------

    def onStartButton(self) -> None:
        def start():
            self.logic.start(self._parameterNode)
            self._timer.start()
            self._showLossCurve()

        self._runStart(_("Training could not start."), start)

    def onCancelButton(self) -> None:
        self.logic.engine.cancel()  # the process tree is ended in a helper thread
        self._updateStatus()

    def onResumeButton(self) -> None:
        def resume():
            self.logic.engine.resume(self.logic.engine.resume_target(self._parameterNode))
            self._timer.start()
            self._showLossCurve()

        self._runStart(_("Training could not resume."), resume)

    def onPollTimer(self) -> None:
        events = self.logic.engine.poll()
        if any(event["event"] in ("checkpoint", "exit") for event in events):
            self._showLossCurve()
        if not self.logic.engine.state.busy:
            self._timer.stop()
            if self.logic.engine.state is RunState.FAILED and self.logic.engine.job is not None:
                slicer.util.errorDisplay(
                    _("Training failed: {error}").format(error=self.logic.engine.status().error),
                    detailedText=self.logic.engine.job.stderr_tail,
                )
            if self.logic.engine.state is RunState.FINISHED:
                # Also while another module is shown: the node outlives the panel's binding.
                node = self.jobParameterNode()
                self._fillChoiceSelectors()  # a trained backbone can be fine-tuned next
                node.newModelName = ""  # a free name for the next run
                self.logic.engine.fill_defaults(node)
        self._updateStatus()


#
# LCTfoundTrainLogic
#


class LCTfoundTrainLogic(LCTfoundModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.TrainModuleLogic`). Can be used without the GUI widget:

        logic = LCTfoundTrainLogic()
        job = logic.start(parameterNode)       # returns at once
        while logic.engine.poll() or logic.engine.state.busy: ...
    """

    parameterNodeClass = LCTfoundTrainParameterNode

    def __init__(self, engine: Optional[TrainModuleLogic] = None) -> None:
        LCTfoundModuleLogic.__init__(self, engine or TrainModuleLogic(python=pythonSlicerExecutable()))

    def start(self, parameterNode):
        """Start training for the parameters of ``parameterNode`` (or any object with the same
        camelCase attributes); loaded volumes are exported here, on the main thread."""
        return self.engine.start(parameterNode)


#
# LCTfoundTrainTest
#


class LCTfoundTrainTest(LCTfoundModuleTestMixin, ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundTrain); the headless tests are in Testing/Python.
    runTest (LCTfoundModuleTestMixin) runs the test_* methods in this order on a cleared scene."""

    def test_ParameterNodeDefaults(self):
        logic = LCTfoundTrainLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.task, "pretrain")
        self.assertEqual(parameterNode.device, "auto")
        self.assertEqual(parameterNode.trainingVolumes, [])
        self.assertEqual(parameterNode.trainingSegmentations, [])
        self.assertEqual(parameterNode.resolution, TrainParameters().resolution)
        self.assertEqual(parameterNode.learningRate, 0.0)  # automatic
        self.assertEqual([choice.value for choice in logic.engine.choices("task")],
                         ["pretrain", "finetune-segmentation", "finetune-classification"])

    def test_StartProblems(self):
        import numpy as np

        self.delayDisplay("Checking why Start is disabled")
        logic = LCTfoundTrainLogic(TrainModuleLogic(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"]))
        parameterNode = logic.getParameterNode()
        logic.engine.fill_defaults(parameterNode)
        self.assertIn("folder", logic.engine.first_problem(parameterNode))
        parameterNode.dataSource = "volumes"
        self.assertIn("loaded volumes", logic.engine.first_problem(parameterNode))
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 32, 32), dtype=np.int16), name="LCTfoundTestCT")
        parameterNode.trainingVolumes = [volume]
        self.assertEqual(logic.engine.first_problem(parameterNode), "")
        self.delayDisplay("Test passed")

    def test_FineTuningProblems(self):
        import numpy as np

        from lctfound.mrml import segmentation_node_from_labels

        self.delayDisplay("Checking the fine-tuning data problems")
        logic = LCTfoundTrainLogic(TrainModuleLogic(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"]))
        parameterNode = logic.getParameterNode()
        parameterNode.task = "finetune-segmentation"
        logic.engine.fill_defaults(parameterNode)
        self.assertEqual(parameterNode.mode, "full")
        # A folder of image/label pairs (the default source) is valid for fine-tuning too: choose volumes.
        parameterNode.dataSource = "volumes"
        array = np.full((6, 32, 32), -1000, dtype=np.int16)
        volume = slicer.util.addVolumeFromArray(array, name="LCTfoundTestCT")
        parameterNode.trainingVolumes = [volume]
        self.assertIn("segmentations", logic.engine.first_problem(parameterNode))
        segmentation = segmentation_node_from_labels(slicer.mrmlScene, np.zeros(array.shape, np.uint8), volume,
                                                     name="LCTfoundTestSegmentation")
        parameterNode.trainingSegmentations = [segmentation]
        self.assertIn("has no labelled voxel", logic.engine.first_problem(parameterNode))
        self.delayDisplay("Test passed")

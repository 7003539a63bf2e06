"""LCTfoundTrain: pretrain an LCTfound model on your own lung CT volumes.

Thin Slicer front end. Training runs in a background process (`lctfound.jobs`); a QTimer polls
the Qt-free `lctfound.logic.TrainModuleLogic`, which turns the process's events into progress,
ETA, loss history and status, registers the trained model, and decides which buttons are
enabled and why. That logic is tested without Slicer.
"""

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Decimals, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _addSourceTreeToPath():
    """Running from a source checkout: make the `lctfound` package next to this module importable.
    (An installed extension has it in qt-scripted-modules, which is on sys.path already.)"""
    sourceRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(sourceRoot, "lctfound", "__init__.py")) and sourceRoot not in sys.path:
        sys.path.append(sourceRoot)


_addSourceTreeToPath()

# Light imports only (no torch): this runs while Slicer starts.
from lctfound.logic import (  # noqa: E402
    CHOICE_PROPERTY_NAME,
    NODE_LIST_PROPERTY_NAME,
    RunState,
    TrainModuleLogic,
    TrainParameters,
)

CITATION = (
    '"A lung CT vision foundation model facilitating disease diagnosis and medical imaging", '
    "Nature Communications 2025, doi:10.1038/s41467-025-66620-z."
)
HOMEPAGE = "https://github.com/lctfound/SlicerLCTfound"
POLL_INTERVAL_MS = 500
_DEFAULTS = TrainParameters()


def pythonSlicerExecutable() -> str:
    """The interpreter for background jobs: PythonSlicer (Slicer's Python without the GUI)."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    return shutil.which(name) or sys.executable


#
# LCTfoundTrain
#


class LCTfoundTrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LCTfound Train")
        self.parent.categories = ["LCTfound"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerLCTfound developers (SlicerLCTfound project)"]
        self.parent.helpText = _(
            "Pretrain an LCTfound diffusion model on your own lung CT volumes (a folder or the loaded "
            "volumes). Training runs in the background with progress, ETA and a loss curve; Cancel "
            "keeps the newest checkpoint and Resume continues from it. The finished model is "
            "registered under the name you choose and appears in every LCTfound module. "
            'See the <a href="{homepage}">extension documentation</a>.'
        ).format(homepage=HOMEPAGE)
        self.parent.acknowledgementText = _(
            "LCTfound is described in {citation} The official weights have no stated licence "
            "and are not distributed with this extension."
        ).format(citation=CITATION)


#
# Parameters
#


@parameterNodeWrapper
class LCTfoundTrainParameterNode:
    """
    dataSource - "folder" (dataFolder) or "volumes" (trainingVolumes, exported when training starts).
    task - "pretrain" (fine-tuning tasks come with the segmentation module).
    preset, resolution, patchSize (0: whole slices), batchSize, maxSteps, learningRate,
    checkpointEvery, emaDecay (0: none) - the training settings.
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    runFolder - empty: a new folder under the LCTfound cache; an existing run folder to Resume.
    newModelName - the name the trained model is registered under.
    """

    dataSource: str = _DEFAULTS.data_source
    dataFolder: Path
    trainingVolumes: list[vtkMRMLScalarVolumeNode]
    task: str = _DEFAULTS.task
    preset: str = _DEFAULTS.preset
    resolution: Annotated[int, WithinRange(16, 2048)] = _DEFAULTS.resolution
    patchSize: Annotated[int, WithinRange(0, 2048)] = _DEFAULTS.patch_size
    batchSize: Annotated[int, WithinRange(1, 4096)] = _DEFAULTS.batch_size
    maxSteps: Annotated[int, WithinRange(1, 100_000_000)] = _DEFAULTS.max_steps
    learningRate: Annotated[float, WithinRange(1e-7, 1.0), Decimals(6)] = _DEFAULTS.learning_rate
    checkpointEvery: Annotated[int, WithinRange(1, 100_000_000)] = _DEFAULTS.checkpoint_every
    emaDecay: Annotated[float, WithinRange(0.0, 0.9999), Decimals(4)] = _DEFAULTS.ema_decay
    device: str = _DEFAULTS.device
    runFolder: Path
    newModelName: str = ""


#
# LCTfoundTrainWidget
#


class LCTfoundTrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._choiceSelectors = {}
        self._nodeListSelectors = {}
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LCTfoundTrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LCTfoundTrainLogic()

        # Choices known only at run time and node lists have no connectGui connector: synced by hand.
        for combo in uiWidget.findChildren(qt.QComboBox):
            name = combo.property(CHOICE_PROPERTY_NAME)
            if name:
                self._choiceSelectors[name] = combo
                combo.connect("currentIndexChanged(int)", lambda index, name=name: self._onChoiceSelected(name))
        self._fillChoiceSelectors()
        for selector in uiWidget.findChildren(slicer.qMRMLCheckableNodeComboBox):
            name = selector.property(NODE_LIST_PROPERTY_NAME)
            if name:
                self._nodeListSelectors[name] = selector
                selector.connect("checkedNodesChanged()", lambda name=name: self._onNodesChecked(name))

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        if self._timer:
            self._timer.stop()
        if self.logic and self.logic.engine.job is not None and self.logic.engine.state.busy:
            self.logic.engine.job.cancel(timeout=2)  # do not leave a training process behind

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.engine.fill_defaults(self._parameterNode)

    def setParameterNode(self, inputParameterNode: Optional[LCTfoundTrainParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)
        self._updateStatus()

    # -- selectors synced by hand --------------------------------------------------------------

    def _fillChoiceSelectors(self, refresh: bool = False) -> None:
        for name, combo in self._choiceSelectors.items():
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for choice in self.logic.engine.choices(name, refresh=refresh):
                combo.addItem(choice.label, choice.value)
                combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            combo.blockSignals(wasBlocked)

    def _onChoiceSelected(self, name: str) -> None:
        combo = self._choiceSelectors[name]
        if self._parameterNode and combo.currentIndex >= 0:
            setattr(self._parameterNode, name, combo.itemData(combo.currentIndex) or "")

    def _onNodesChecked(self, name: str) -> None:
        if self._parameterNode:
            setattr(self._parameterNode, name, list(self._nodeListSelectors[name].checkedNodes()))

    def _syncSelectors(self) -> None:
        for name, combo in self._choiceSelectors.items():
            value = getattr(self._parameterNode, name) if self._parameterNode else ""
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(combo.findData(value))
            combo.blockSignals(wasBlocked)
        for name, selector in self._nodeListSelectors.items():
            checked = {node.GetID() for node in (getattr(self._parameterNode, name) if self._parameterNode else []) if node}
            wasBlocked = selector.blockSignals(True)
            for index in range(selector.nodeCount()):
                node = selector.nodeFromIndex(index)
                selector.setCheckState(node, qt.Qt.Checked if node.GetID() in checked else qt.Qt.Unchecked)
            selector.blockSignals(wasBlocked)

    # -- state to widgets ---------------------------------------------------------------------

    def _updateStatus(self, caller=None, event=None) -> None:
        self._syncSelectors()
        engine = self.logic.engine
        fromFolder = not self._parameterNode or self._parameterNode.dataSource == "folder"
        for widget in (self.ui.dataFolderLabel, self.ui.dataFolderSelector):
            widget.visible = fromFolder
        for widget in (self.ui.trainingVolumesLabel, self.ui.trainingVolumesSelector):
            widget.visible = not fromFolder
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
        if engine.state is RunState.IDLE and self._parameterNode:
            problem = engine.first_problem(self._parameterNode)
            self.ui.statusLabel.text = problem or _("Ready to start training.")
        else:
            run = f"\n{engine.run_folder}" if engine.run_folder else ""
            self.ui.statusLabel.text = engine.status_summary() + run

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
        with slicer.util.tryWithErrorDisplay(_("Training could not start."), waitCursor=True):
            self.logic.start(self._parameterNode)
            self._timer.start()
        self._showLossCurve()
        self._updateStatus()

    def onCancelButton(self) -> None:
        self.logic.engine.cancel()  # the process tree is ended in a helper thread
        self._updateStatus()

    def onResumeButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Training could not resume."), waitCursor=True):
            self.logic.engine.resume(self.logic.engine.resume_target(self._parameterNode))
            self._timer.start()
        self._showLossCurve()
        self._updateStatus()

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
            if self.logic.engine.state is RunState.FINISHED and self._parameterNode:
                self._parameterNode.newModelName = self.logic.engine.suggest_model_name()  # for the next run
        self._updateStatus()


#
# LCTfoundTrainLogic
#


class LCTfoundTrainLogic(ScriptedLoadableModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.TrainModuleLogic`). Can be used without the GUI widget:

        logic = LCTfoundTrainLogic()
        job = logic.start(parameterNode)       # returns at once
        while logic.engine.poll() or logic.engine.state.busy: ...
    """

    def __init__(self, engine: Optional[TrainModuleLogic] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.engine = engine or TrainModuleLogic(python=pythonSlicerExecutable())

    def getParameterNode(self):
        return LCTfoundTrainParameterNode(super().getParameterNode())

    def start(self, parameterNode):
        """Start training for the parameters of ``parameterNode`` (or any object with the same
        camelCase attributes); loaded volumes are exported here, on the main thread."""
        return self.engine.start(parameterNode)


#
# LCTfoundTrainTest
#


class LCTfoundTrainTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundTrain); the headless tests are in Testing/Python."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParameterNodeDefaults()
        self.setUp()
        self.test_StartProblems()

    def test_ParameterNodeDefaults(self):
        logic = LCTfoundTrainLogic()
        parameterNode = logic.getParameterNode()
        self.assertEqual(parameterNode.task, "pretrain")
        self.assertEqual(parameterNode.device, "auto")
        self.assertEqual(parameterNode.trainingVolumes, [])
        self.assertEqual(parameterNode.resolution, TrainParameters().resolution)

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

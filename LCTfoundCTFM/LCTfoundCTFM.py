"""LCTfoundCTFM: CT-FM (a 3D whole-body CT encoder) as a second backbone — index a folder of volumes,
search it by the loaded scan, a point or a region with a similarity heat map over the scan, classify
and segment the loaded scan with trained probes and decoders, and train new ones.

Thin Slicer front end over the Qt-free `lctfound.logic.CTFMLogic`, which decides what each button
may do and why not and runs every action as a background job (a QTimer polls it; Cancel ends the job's
process tree): indexing, training, and search, classify and segment, whose input volume (and query
point or box) is read from the scene when the button is clicked and whose results are added as new
nodes when the job has finished. This process never imports PyTorch: even the encoders, task models
and devices are listed by a child process. That logic is tested without Slicer.
"""

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
from slicer import (
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsNode,
    vtkMRMLMarkupsROINode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# A source checkout has LCTfoundSlicerLib and lctfound next to this module's folder (an installed
# extension has them in qt-scripted-modules, on sys.path already); the library cannot add itself.
_sourceRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_sourceRoot, "LCTfoundSlicerLib", "__init__.py")) and _sourceRoot not in sys.path:
    sys.path.append(_sourceRoot)

# Light imports only (no torch): this runs while Slicer starts.
from lctfound.logic import CTFMLogic, CTFMParameters  # noqa: E402
from LCTfoundSlicerLib import (  # noqa: E402
    LCTfoundJobModuleWidget,
    LCTfoundModule,
    LCTfoundModuleLogic,
    LCTfoundModuleTestMixin,
    pythonSlicerExecutable,
)

_DEFAULTS = CTFMParameters()


#
# LCTfoundCTFM
#


class LCTfoundCTFM(LCTfoundModule):
    def __init__(self, parent):
        LCTfoundModule.__init__(
            self,
            parent,
            title=_("LCTfound CT-FM retrieval"),
            helpText=_(
                "CT-FM, a 3D foundation encoder of whole-body CT, as a second backbone: index a folder of volumes, "
                "find the most similar scans to the loaded one, to a point or to a region (with a similarity heat "
                "map over the scan), classify and segment the loaded scan with trained probes and decoders, and "
                "train new ones. CT-FM has no image decoder, so enhancement and generation stay with LCTfound. "
                "CT-FM weights are not bundled and never downloaded: choose a local copy of "
                "project-lighter/ct_fm_feature_extractor. A research tool, not a diagnosis."
            ),
        )


#
# Parameters
#


@parameterNodeWrapper
class LCTfoundCTFMParameterNode:
    """
    inputVolume - the CT volume to query by, classify or segment.
    encoderFolder - a local CT-FM encoder folder (published layout), listed besides the cached ones.
    modelName - the CT-FM encoder.
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    cohortFolder - the folder of volumes Build index indexes; indexFolder - the index searched.
    serverIndex - on a server: the name of an index it offers (searched instead of indexFolder).
    queryKind - scan, point (queryPoint's first control point) or region (queryRegion).
    topK, showHeatmap - number of results; whether to map the similarity over the input volume.
    resultsTable - the table of the last search (shown in the panel).
    probeModel, decoderModel - trained CT-FM task models (folders).
    trainingKind (probe/decoder), trainingTable (CSV), trainingSegmentation, decoderMode (frozen/full),
    maxSteps (0: default), newModelName - training settings.
    serverUrl, serverTokenFile - "Run on": empty for this computer, else an `lctfound serve` address and
        the file holding its access token (empty: $LCTFOUND_SERVER_TOKEN).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    encoderFolder: Path
    modelName: str = ""
    device: str = _DEFAULTS.device
    cohortFolder: Path
    indexFolder: Path
    serverIndex: str = ""
    queryKind: str = _DEFAULTS.query_kind
    queryPoint: vtkMRMLMarkupsFiducialNode
    queryRegion: vtkMRMLMarkupsROINode
    topK: Annotated[int, WithinRange(1, 1000)] = _DEFAULTS.top_k
    showHeatmap: bool = _DEFAULTS.show_heatmap
    resultsTable: vtkMRMLTableNode
    probeModel: str = ""
    decoderModel: str = ""
    trainingKind: str = _DEFAULTS.training_kind
    trainingTable: Path
    trainingSegmentation: vtkMRMLSegmentationNode
    decoderMode: str = _DEFAULTS.decoder_mode
    maxSteps: Annotated[int, WithinRange(0, 1_000_000)] = _DEFAULTS.max_steps
    newModelName: str = ""
    serverUrl: str = _DEFAULTS.server_url
    serverTokenFile: str = _DEFAULTS.server_token_file


#
# LCTfoundCTFMWidget
#


class LCTfoundCTFMWidget(LCTfoundJobModuleWidget):
    """Inputs, capabilities, index, search, classify/segment and training; the parameter node, the
    hand-synced choice selectors, progress, Cancel and the job timer are the bases'."""

    uiFile = "UI/LCTfoundCTFM.ui"

    #: Parameter (snake_case, as `CTFMLogic.visible_fields` names them) → its widgets.
    FIELDS = {
        "encoder_folder": ("encoderFolderLabel", "encoderFolderSelector"),
        "index_folder": ("indexFolderLabel", "indexFolderSelector"),
        "server_index": ("serverIndexLabel", "serverIndexSelector"),
        "query_point": ("queryPointLabel", "queryPointSelector", "queryPointPlaceWidget"),
        "query_region": ("queryRegionLabel", "queryRegionSelector", "queryRegionPlaceWidget"),
        "training_segmentation": ("trainingSegmentationLabel", "trainingSegmentationSelector"),
        "decoder_mode": ("decoderModeLabel", "decoderModeSelector"),
    }
    #: Action (`CTFMLogic.action_state`) → its button.
    ACTION_BUTTONS = {"index": "buildIndexButton", "search": "searchButton", "classify": "classifyButton",
                      "segment": "segmentButton", "train": "trainButton"}

    def __init__(self, parent=None) -> None:
        LCTfoundJobModuleWidget.__init__(self, parent)
        self._shownEncoderFolder = None
        self._observedQueryPoint = None

    def createLogic(self) -> "LCTfoundCTFMLogic":
        return LCTfoundCTFMLogic()

    def setupWidgets(self, uiWidget) -> None:
        LCTfoundJobModuleWidget.setupWidgets(self, uiWidget)
        self.ui.buildIndexButton.connect("clicked(bool)", self.onBuildIndexButton)
        self.ui.searchButton.connect("clicked(bool)", self.onSearchButton)
        self.ui.loadMatchButton.connect("clicked(bool)", self.onLoadMatchButton)
        self.ui.classifyButton.connect("clicked(bool)", self.onClassifyButton)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegmentButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self._showCapabilities()

    def _showCapabilities(self) -> None:
        """Every task of the backbone registry; the ones CT-FM cannot do are greyed out with the reason."""
        self.ui.capabilitiesList.clear()
        for task, state in self.logic.engine.task_states("ctfm").items():
            item = qt.QListWidgetItem(task)
            item.setToolTip(state.tooltip)
            item.setFlags(qt.Qt.ItemIsEnabled if state.enabled else qt.Qt.NoItemFlags)
            self.ui.capabilitiesList.addItem(item)

    # -- state to widgets ---------------------------------------------------------------------

    def _updateStatus(self, caller=None, event=None) -> None:
        node = self._parameterNode
        engine = self.logic.engine
        self._observeQueryPoint(node.queryPoint if node else None)
        if node and str(node.encoderFolder) != self._shownEncoderFolder:
            self._shownEncoderFolder = str(node.encoderFolder)
            name = engine.use_encoder_folder(node.encoderFolder)
            self._fillChoiceSelectors()
            if name and node.modelName != name:
                node.modelName = name  # calls this again
        LCTfoundJobModuleWidget._updateStatus(self)
        shown = engine.visible_fields(node) if node else set()
        for name, widgetNames in self.FIELDS.items():
            for widgetName in widgetNames:
                getattr(self.ui, widgetName).visible = name in shown
        for action, buttonName in self.ACTION_BUTTONS.items():
            state = engine.action_state(action, node) if node else None
            button = getattr(self.ui, buttonName)
            button.enabled = bool(state and state.enabled)
            button.toolTip = state.tooltip if state else ""
        heatmap = engine.heatmap_state(node) if node else None
        self.ui.showHeatmapCheckBox.enabled = bool(heatmap and heatmap.enabled)
        self.ui.showHeatmapCheckBox.toolTip = heatmap.tooltip if heatmap else ""
        loadMatch = engine.load_match_state(node.resultsTable if node else None)
        self.ui.loadMatchButton.enabled = loadMatch.enabled and not engine.state.busy
        self.ui.loadMatchButton.toolTip = loadMatch.tooltip
        self._showProgress()

    # -- the query point: one point, placing it again moves it ---------------------------------

    def _observeQueryPoint(self, markups) -> None:
        if markups is self._observedQueryPoint:
            return
        if self._observedQueryPoint is not None:
            self.removeObserver(self._observedQueryPoint, vtkMRMLMarkupsNode.PointPositionDefinedEvent,
                                self._onQueryPointPlaced)
        self._observedQueryPoint = markups
        if markups is not None:
            self.addObserver(markups, vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onQueryPointPlaced)

    def _onQueryPointPlaced(self, caller, event) -> None:
        # After the markups widget has finished placing the new point: removing points inside its
        # event would change the index of the point it is placing.
        qt.QTimer.singleShot(0, lambda: self.logic.engine.keep_last_point(caller))

    # -- actions: each starts a job; its results are added when it has finished ---------------

    def _startJob(self, failureMessage: str, start) -> None:
        """``start(parameters)`` (an engine's start_*) for a button, then follow the job; a failed start
        is shown and the status line says why (`_runStart`)."""

        def startAndPoll() -> None:
            start(self._parameterNode)
            self._startPolling()

        self._runStart(failureMessage, startAndPoll)

    def onBuildIndexButton(self) -> None:
        self._startJob(_("Indexing could not start."), self.logic.engine.start_index)

    def onTrainButton(self) -> None:
        self._startJob(_("Training could not start."), self.logic.engine.start_training)

    def onSearchButton(self) -> None:
        self._startJob(_("The search could not start."), self.logic.engine.start_search)

    def onClassifyButton(self) -> None:
        self._startJob(_("Classification could not start."), self.logic.engine.start_classify)

    def onSegmentButton(self) -> None:
        self._startJob(_("Segmentation could not start."), self.logic.engine.start_segment)

    def _onJobEnded(self) -> None:
        """The new nodes of a finished job (added by the engine's poll) into the panel and the views,
        also when another module is shown (the parameter node is then read from the logic)."""
        engine = self.logic.engine
        parameterNode = self.jobParameterNode()
        if engine.job_kind in ("probe", "decoder"):
            self._fillChoiceSelectors()  # the newly registered probe or decoder
        engine.apply_finished_job(parameterNode)
        if engine.heatmap_node is not None:
            slicer.util.setSliceViewerLayers(background=engine.job_parameters.input_volume,
                                             foreground=engine.heatmap_node, foregroundOpacity=0.5)
            self._jumpTo(engine.peak_ras(engine.heatmap_node))

    def onLoadMatchButton(self) -> None:
        view = self.ui.resultsTableView
        table = self._parameterNode.resultsTable
        # view row → source model row (the view sorts) → table row (the model may show the titles in row 0)
        row = self.logic.engine.table_row(table, view.sortFilterProxyModel().mapToSource(view.currentIndex()).row())
        with slicer.util.tryWithErrorDisplay(_("The scan could not be loaded."), waitCursor=True):
            volume, centre = self.logic.engine.load_match(table, row)
            slicer.util.setSliceViewerLayers(background=volume, foreground=None, fit=True)
            if centre is not None:
                self._jumpTo(centre)

    @staticmethod
    def _jumpTo(ras) -> None:
        slicer.modules.markups.logic().JumpSlicesToLocation(ras[0], ras[1], ras[2], True)


#
# LCTfoundCTFMLogic
#


class LCTfoundCTFMLogic(LCTfoundModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.CTFMLogic`). Can be used without the GUI widget:

        logic = LCTfoundCTFMLogic()
        logic.engine.start_search(parameterNode)
        while logic.engine.state.busy:
            logic.engine.poll()  # adds the results table and the heat map when the job has finished
    """

    parameterNodeClass = LCTfoundCTFMParameterNode

    def __init__(self, engine: Optional[CTFMLogic] = None) -> None:
        LCTfoundModuleLogic.__init__(self, engine or CTFMLogic(python=pythonSlicerExecutable()))


#
# LCTfoundCTFMTest
#


class LCTfoundCTFMTest(LCTfoundModuleTestMixin, ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundCTFM); the headless tests are in Testing/Python and
    Testing/test_ctfm_logic.py."""

    @staticmethod
    def _engine() -> CTFMLogic:
        return CTFMLogic(inventory=lambda folders: {"encoders": [], "rejected": {}, "task_models": [], "devices": ["cpu"]})

    def test_ParameterNodeDefaults(self):
        parameterNode = LCTfoundCTFMLogic(self._engine()).getParameterNode()
        self.assertIsNone(parameterNode.inputVolume)
        self.assertEqual((parameterNode.device, parameterNode.queryKind, parameterNode.topK), ("auto", "scan", 10))
        self.assertTrue(parameterNode.showHeatmap)

    def test_GenerativeTasksAreGreyedOut(self):
        self.delayDisplay("Checking what CT-FM offers")
        states = self._engine().task_states("ctfm")
        self.assertTrue(states["retrieval"].enabled)
        self.assertFalse(states["enhancement"].enabled)
        self.assertIn("no image decoder", states["enhancement"].tooltip)
        self.delayDisplay("Test passed")

    def test_SearchProblems(self):
        import numpy as np

        self.delayDisplay("Checking the search button")
        logic = LCTfoundCTFMLogic(self._engine())
        parameterNode = logic.getParameterNode()
        self.assertIn("No CT-FM encoder", logic.engine.selection_summary(parameterNode))
        parameterNode.inputVolume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), dtype=np.int16))
        parameterNode.queryKind = "point"
        problems = logic.engine.action_problems("search", parameterNode)
        self.assertTrue(any("index folder" in problem for problem in problems), problems)
        self.assertTrue(any("point" in problem for problem in problems), problems)
        self.assertFalse(logic.engine.action_state("search", parameterNode).enabled)
        self.delayDisplay("Test passed")

"""Bases of the Module, Widget, Logic and Test classes of the LCTfound scripted modules.

Each module file keeps the classes Slicer looks up by name (`<Module>`, `<Module>Widget`,
`<Module>Logic`, `<Module>Test`) and only what is its own: title and help, parameter class, .ui file,
engine class and extra widgets. Slicer derives the module name, the resource folder and the parameter
node's name from the concrete class names, so these bases work unchanged for every module.
"""

import importlib
import os
import pathlib
import shutil
import sys
from typing import Any, Optional

import ctk
import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import GuiConnector, unannotatedType
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Light imports only (no torch): this runs while Slicer starts.
from lctfound.logic import CHOICE_PROPERTY_NAME, RunState

CITATION = (
    '"A lung CT vision foundation model facilitating disease diagnosis and medical imaging", '
    "Nature Communications 2025, doi:10.1038/s41467-025-66620-z."
)
HOMEPAGE = "https://github.com/lctfound/SlicerLCTfound"


def pythonSlicerExecutable() -> str:
    """The interpreter for background jobs: PythonSlicer (Slicer's Python without the GUI)."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    return shutil.which(name) or sys.executable


#
# Module
#


class LCTfoundModule(ScriptedLoadableModule):
    """Metadata shared by the LCTfound modules; each module passes its translated title and help."""

    def __init__(self, parent, title: str, helpText: str) -> None:
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = title
        self.parent.categories = ["LCTfound"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerLCTfound developers (SlicerLCTfound project)"]
        self.parent.helpText = helpText + " " + _('See the <a href="{homepage}">extension documentation</a>.').format(
            homepage=HOMEPAGE
        )
        self.parent.acknowledgementText = _(
            "LCTfound is described in {citation} The official weights have no stated licence "
            "and are not distributed with this extension."
        ).format(citation=CITATION)


#
# Logic
#


class LCTfoundModuleLogic(ScriptedLoadableModuleLogic):
    """Slicer side of a module's logic; all behaviour is in `self.engine` (the module's Qt-free
    `lctfound.logic` class). Can be used without the GUI widget.

    A module's logic sets `parameterNodeClass` (its @parameterNodeWrapper class) and passes its engine.
    """

    parameterNodeClass = None

    def __init__(self, engine: Any) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.engine = engine
        self._installDependencyCheck()

    def _installDependencyCheck(self) -> None:
        """Before any job of this engine starts, make sure its Python packages are installed (asking the
        user once); a declined or failed installation raises, so the job is not started."""
        from .dependencies import ensureDependencies

        self.engine.before_job = ensureDependencies

    def getParameterNode(self):
        return self.parameterNodeClass(super().getParameterNode())


#
# Widgets
#


class PathFieldConnector(GuiConnector):
    """A ctkPathLineEdit bound to a ``Path`` parameter, showing an unset path as an empty field.

    Slicer's own connector writes ``str(Path())``, so every unset folder or file reads ``.`` (the
    current folder). Given to ``connectParametersToGui`` explicitly; never chosen by the wrapper."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return False

    @staticmethod
    def create(widget, datatype):
        return None

    def __init__(self, widget) -> None:
        super().__init__()
        self._widget = widget

    def _connect(self) -> None:
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self) -> None:
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self) -> pathlib.Path:
        return pathlib.Path(self._widget.currentPath.strip())  # an empty field is Path(): unset

    def write(self, value) -> None:
        text = "" if value is None else str(value)
        self._widget.currentPath = "" if text == "." else text


class LCTfoundModuleWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel of an LCTfound module: loads the module's .ui, binds the parameter node to it, keeps
    the selectors whose choices are known only at run time in sync by hand, shows a status line and
    follows the scene (close) and the module (enter, exit, cleanup).

    A module's widget sets `uiFile` and implements `createLogic()`; it may extend `setupWidgets()`
    (its own connections), `_choiceItems()`, `_syncSelectors()`, `statusText()` and `_updateStatus()`.
    """

    uiFile = ""  # "UI/<Module>.ui", relative to the module's Resources folder

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._choiceSelectors = {}
        self._startFailure = ""  # why the last Start failed, shown until a setting changes
        self._shownServer = None  # the server connection the selectors list (None: this computer's models)

    def createLogic(self) -> LCTfoundModuleLogic:
        raise NotImplementedError(f"{type(self).__name__} must create its module's logic")

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(self.uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = self.createLogic()

        # Model and device lists (and other choices) are only known at run time, so these combo boxes
        # are synced by hand instead of by connectGui (see lctfound.logic.CHOICE_PROPERTY_NAME).
        for combo in uiWidget.findChildren(qt.QComboBox):
            name = combo.property(CHOICE_PROPERTY_NAME)
            if name:
                self._choiceSelectors[name] = combo
                combo.connect("currentIndexChanged(int)", lambda index, name=name: self._onChoiceSelected(name))
        self._fillChoiceSelectors()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.testConnectionButton.connect("clicked(bool)", self.onTestConnection)
        self.setupWidgets(uiWidget)
        self._addDependenciesSection()

        self.initializeParameterNode()

    def setupWidgets(self, uiWidget) -> None:
        """The module's own widgets and connections (called before the parameter node is bound)."""

    # -- run on a server -----------------------------------------------------------------------

    def onTestConnection(self) -> None:
        """Reach the server in "Run on" (every module's .ui has the rows: serverUrl, serverTokenFile, Test
        connection and its line); the result, or why not, is one line next to the button."""
        from lctfound.errors import LCTfoundError

        from .dependencies import ensureDependencies

        try:
            ensureDependencies(["--server"])  # the thin client (httpx, zstandard), after asking once
            self.ui.connectionLabel.text = self.logic.engine.test_connection(self._parameterNode)
        except LCTfoundError as error:
            self.ui.connectionLabel.text = str(error)
        self._updateStatus()

    def _connectedServer(self):
        return self.logic.engine.connected_server(self._parameterNode) if self._parameterNode else None

    def _onServerShown(self) -> None:
        """Run on this computer or a tested server: the selectors list that side's models, and a model of
        the other side is not kept selected."""
        self._shownServer = self._connectedServer()
        self._fillChoiceSelectors()
        node = self._parameterNode
        if node:
            for name in ("modelName", "taskModel"):
                combo = self._choiceSelectors.get(name)
                if combo is not None and combo.findData(getattr(node, name)) < 0:
                    setattr(node, name, "")
            self.logic.engine.fill_defaults(node)

    # -- dependencies section ------------------------------------------------------------------

    def _addDependenciesSection(self) -> None:
        """A collapsed "Dependencies" section under the panel: check the installed Python packages and
        install the missing ones (otherwise they are installed, after asking, when a job starts)."""
        section = ctk.ctkCollapsibleButton()
        section.objectName = "dependenciesCollapsibleButton"
        section.text = _("Dependencies")
        section.collapsed = True
        self.layout.addWidget(section)
        sectionLayout = qt.QFormLayout(section)
        self.checkDependenciesButton = qt.QPushButton(_("Check dependencies"))
        self.checkDependenciesButton.objectName = "checkDependenciesButton"
        self.checkDependenciesButton.toolTip = _("Show the versions of the Python packages LCTfound uses")
        self.installDependenciesButton = qt.QPushButton(_("Install missing packages"))
        self.installDependenciesButton.objectName = "installDependenciesButton"
        self.installDependenciesButton.toolTip = _("Install the Python packages LCTfound needs (asks first)")
        self.dependenciesLabel = qt.QLabel()
        self.dependenciesLabel.objectName = "dependenciesLabel"
        self.dependenciesLabel.wordWrap = True
        self.dependenciesLabel.textInteractionFlags = qt.Qt.TextSelectableByMouse
        sectionLayout.addRow(self.checkDependenciesButton)
        sectionLayout.addRow(self.installDependenciesButton)
        sectionLayout.addRow(self.dependenciesLabel)
        self.checkDependenciesButton.connect("clicked(bool)", self.onCheckDependencies)
        self.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

    def onCheckDependencies(self) -> None:
        from .dependencies import versionReport

        self.dependenciesLabel.text = versionReport()

    def onInstallDependencies(self) -> None:
        from .dependencies import ensureDependencies

        with slicer.util.tryWithErrorDisplay(_("The Python packages could not be installed."), waitCursor=False):
            ensureDependencies()
        self.onCheckDependencies()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Developer mode "Reload": Slicer re-imports only the module file, so re-import this library first."""
        package = __name__.rpartition(".")[0]
        for name in sorted(name for name in sys.modules if name.startswith(package + ".")):
            importlib.reload(sys.modules[name])
        importlib.reload(sys.modules[package])
        ScriptedLoadableModuleWidget.onReload(self)

    # -- parameter node ----------------------------------------------------------------------

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        self.logic.engine.fill_defaults(self._parameterNode)

    def setParameterNode(self, inputParameterNode: Optional[Any]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # connectParametersToGui, not connectGui: Slicer 5.8's connectGui returns no tag, so
            # disconnectGui would never disconnect and every enter() would bind the widgets again.
            self._parameterNodeGuiTag = self._parameterNode.connectParametersToGui(self._guiBindings())
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._updateStatus()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._startFailure = ""  # a changed setting: the status line says what holds now
        self._updateStatus()

    def jobParameterNode(self):
        """The parameter node a finished job's follow-up writes to: the panel's, or, while another
        module is shown (exit() unbinds the panel), the logic's — the same scene node."""
        return self._parameterNode or self.logic.getParameterNode()

    def _runStart(self, failureMessage: str, start) -> None:
        """Call ``start()`` (which starts a job) for a button. A failure is shown (a popup, and the
        status line until a setting changes) and re-raised, so the Python console has the
        traceback; the status line and buttons are refreshed either way."""
        self._startFailure = ""
        try:
            with slicer.util.tryWithErrorDisplay(failureMessage, waitCursor=True):
                start()
        except Exception as error:
            self._startFailure = f"{failureMessage} {error}"
            raise
        finally:
            self._updateStatus()

    def _guiBindings(self) -> dict:
        """{parameter: widget or connector} for the widgets with a SlicerParameterName (what
        connectGui would bind); Path fields get a `PathFieldConnector`."""
        bindings = {}
        for widget in vars(self.ui).values():
            name = widget.property("SlicerParameterName")
            if not name:
                continue
            # type(), as Slicer's connectors do: PythonQt's isinstance across wrapped classes is unreliable
            isPath = type(widget) == ctk.ctkPathLineEdit and unannotatedType(
                self._parameterNode.dataType(name)) in (pathlib.Path, pathlib.PurePath)
            bindings[name] = PathFieldConnector(widget) if isPath else widget
        return bindings

    # -- selectors synced by hand ------------------------------------------------------------

    def _choiceItems(self, name: str, refresh: bool = False) -> list:
        """The `lctfound.logic.Choice` items of the selector bound to parameter ``name``."""
        return self.logic.engine.choices(name, refresh=refresh)

    def _fillChoiceSelectors(self, refresh: bool = False) -> None:
        for name, combo in self._choiceSelectors.items():
            wasBlocked = combo.blockSignals(True)
            combo.clear()
            for choice in self._choiceItems(name, refresh=refresh):
                combo.addItem(choice.label, choice.value)
                combo.setItemData(combo.count - 1, choice.tooltip, qt.Qt.ToolTipRole)
            combo.blockSignals(wasBlocked)

    def _onChoiceSelected(self, name: str) -> None:
        combo = self._choiceSelectors[name]
        if self._parameterNode and combo.currentIndex >= 0:
            setattr(self._parameterNode, name, combo.itemData(combo.currentIndex) or "")

    def _syncSelectors(self) -> None:
        for name, combo in self._choiceSelectors.items():
            value = getattr(self._parameterNode, name) if self._parameterNode else ""
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(combo.findData(value))
            combo.blockSignals(wasBlocked)

    # -- state to widgets --------------------------------------------------------------------

    def statusText(self) -> str:
        """The status line: what is selected, or what is missing."""
        return self.logic.engine.selection_summary(self._parameterNode) if self._parameterNode else ""

    def _updateStatus(self, caller=None, event=None) -> None:
        if self._parameterNode and self._connectedServer() is not self._shownServer:
            self._onServerShown()  # may modify the parameter node, which calls this again
        self._syncSelectors()
        self.ui.statusLabel.text = self._startFailure or self.statusText()
        onServer = bool(self._parameterNode) and self.logic.engine.on_server(self._parameterNode)
        for widget in (self.ui.deviceLabel, self.ui.deviceSelector):
            widget.visible = not onServer  # the server picks its device


class LCTfoundVolumeModuleWidget(LCTfoundModuleWidget):
    """The panel of a module that works on one input volume with an installed model (Segmentation,
    Enhance): starts with the scene's first scalar volume and can re-read the installed models."""

    def setupWidgets(self, uiWidget) -> None:
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)

    def initializeParameterNode(self) -> None:
        super().initializeParameterNode()
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def onRefreshModels(self) -> None:
        self.logic.engine.refresh()
        self._fillChoiceSelectors(refresh=True)
        if self._parameterNode:
            self.logic.engine.fill_defaults(self._parameterNode)
        self._updateStatus()


class LCTfoundJobModuleWidget(LCTfoundVolumeModuleWidget):
    """A volume module whose work runs as background jobs of its engine (Segmentation, Enhance): a
    timer polls the engine while a job runs, Cancel ends the job's process tree, the progress bar and
    status line follow the engine, and leaving Slicer does not leave a job behind. The module calls
    `_startPolling()` after starting a job and implements `_onJobEnded()`."""

    POLL_INTERVAL_MS = 500

    def __init__(self, parent=None) -> None:
        LCTfoundVolumeModuleWidget.__init__(self, parent)
        self._timer = None

    def setupWidgets(self, uiWidget) -> None:
        LCTfoundVolumeModuleWidget.setupWidgets(self, uiWidget)
        self._timer = qt.QTimer()
        self._timer.setInterval(self.POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self.onPollTimer)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)

    def cleanup(self) -> None:
        LCTfoundVolumeModuleWidget.cleanup(self)
        if self._timer:
            self._timer.stop()
        if self.logic and self.logic.engine.job is not None and self.logic.engine.state.busy:
            self.logic.engine.job.cancel(timeout=2)  # do not leave a job behind

    def _choiceItems(self, name: str, refresh: bool = False) -> list:
        return self.logic.engine.choices(name, refresh=refresh, parameters=self._parameterNode)

    def statusText(self) -> str:
        engine = self.logic.engine
        if engine.state is RunState.IDLE:
            return LCTfoundVolumeModuleWidget.statusText(self)
        return engine.status_summary()

    def _showProgress(self) -> None:
        engine = self.logic.engine
        state = engine.cancel_button_state()
        self.ui.cancelButton.enabled = state.enabled
        self.ui.cancelButton.toolTip = state.tooltip
        bar = engine.progress_bar_state()
        self.ui.progressBar.visible = bar.visible
        self.ui.progressBar.maximum = bar.maximum
        self.ui.progressBar.value = bar.value
        self.ui.progressBar.format = bar.text

    def _startPolling(self) -> None:
        self._timer.start()

    def onCancelButton(self) -> None:
        self.logic.engine.cancel()  # the process tree is ended in a helper thread
        self._updateStatus()

    def onPollTimer(self) -> None:
        engine = self.logic.engine
        engine.poll()
        if not engine.state.busy:
            self._timer.stop()
            if engine.state is RunState.FAILED and engine.job is not None:
                slicer.util.errorDisplay(_("The job failed: {error}").format(error=engine.status().error),
                                         detailedText=engine.job.stderr_tail)
            elif engine.state is RunState.FINISHED:
                self._onJobEnded()
        self._updateStatus()

    def _onJobEnded(self) -> None:
        """Show the results of a finished job (new nodes, tables)."""


#
# Tests (run inside Slicer)
#


class LCTfoundModuleTestMixin:
    """setUp and runTest of an LCTfound module's in-Slicer test. Not a TestCase itself: a test loader
    collects every TestCase a module file names, so only the module's own
    `<Module>Test(a mixin, ScriptedLoadableModuleTest)` may be one."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Every test_* method, in the order they are defined (shared ones first), on a cleared scene."""
        names = dict.fromkeys(name for cls in reversed(type(self).__mro__) for name in vars(cls) if name.startswith("test_"))
        for name in names:
            self.setUp()
            getattr(self, name)()


class LCTfoundVolumeModuleTestMixin(LCTfoundModuleTestMixin):
    """The in-Slicer tests of a volume module; its `<Module>Test` sets `logicClass` and `engineClass`."""

    logicClass = None  # the module's LCTfoundModuleLogic subclass
    engineClass = None  # its Qt-free lctfound.logic class

    def test_ParameterNodeDefaults(self):
        logic = self.logicClass()
        parameterNode = logic.getParameterNode()
        self.assertIsNone(parameterNode.inputVolume)
        self.assertEqual(parameterNode.device, "auto")

    def test_StatusLine(self):
        import numpy as np

        self.delayDisplay("Checking the status line")
        logic = self.logicClass(self.engineClass(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"]))
        parameterNode = logic.getParameterNode()
        self.assertIn("input volume", logic.engine.selection_summary(parameterNode))
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), dtype=np.int16), name="LCTfoundTestCT")
        parameterNode.inputVolume = volume
        self.assertIn("No LCTfound model is installed", logic.engine.selection_summary(parameterNode))
        self.delayDisplay("Test passed")

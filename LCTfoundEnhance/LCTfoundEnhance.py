"""LCTfoundEnhance: every LCTfound image task that makes a new volume — low-dose enhancement (cold
diffusion), low-dose simulation, sparse-view reconstruction, super-resolution, virtual CT
angiography and synthetic CT.

Thin Slicer front end. The task runs in a background process (`lctfound.jobs`); a QTimer polls the
Qt-free `lctfound.logic.EnhanceModuleLogic`, which exports the input, follows the job and loads the
result into a NEW volume node with its provenance. The result is shown over the input with a fade
slider for comparison. That logic is tested without Slicer.
"""

import os
import sys
from typing import Annotated, Optional


import slicer
from slicer import vtkMRMLScalarVolumeNode
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
from lctfound.logic import EnhanceModuleLogic, EnhanceParameters  # noqa: E402

_DEFAULTS = EnhanceParameters()


#
# LCTfoundEnhance
#


class LCTfoundEnhance(LCTfoundModule):
    def __init__(self, parent):
        LCTfoundModule.__init__(
            self,
            parent,
            title=_("LCTfound Enhance"),
            helpText=_(
                "Low-dose enhancement, low-dose simulation, sparse-view reconstruction, super-resolution, virtual CT "
                "angiography and synthetic CT with the LCTfound diffusion foundation model. Every result is a new "
                "volume with its provenance; the input is never overwritten."
            ),
        )


#
# Parameters
#


@parameterNodeWrapper
class LCTfoundEnhanceParameterNode:
    """
    task - low-dose, simulate-low-dose, sparse-view, super-resolution, vcta or synthetic.
    inputVolume - the CT volume to process (not needed for synthetic CT).
    modelName - the LCTfound backbone used as diffusion prior.
    taskModel - the trained low-dose enhancement or VCTA model.
    denoiser - low-dose method: tv (default), nlm or cold-diffusion.
    dose, views, reconstruction, geometry, factor, axis, interpolation, window, count, guidanceScale,
    steps, seed - the settings of the tasks (each task shows its own).
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    serverUrl, serverTokenFile - "Run on": empty for this computer, else an `lctfound serve` address and
        the file holding its access token (empty: $LCTFOUND_SERVER_TOKEN).
    """

    task: str = _DEFAULTS.task
    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    taskModel: str = ""
    # Decimals of the float fields are set in the .ui: the wrapper ignores a Decimals(...) annotation
    # ("Unused annotations" warning at every Slicer start).
    denoiser: str = _DEFAULTS.denoiser
    dose: Annotated[float, WithinRange(0.01, 0.99)] = _DEFAULTS.dose
    views: Annotated[int, WithinRange(1, 4096)] = _DEFAULTS.views
    reconstruction: str = _DEFAULTS.reconstruction
    geometry: str = _DEFAULTS.geometry
    factor: Annotated[int, WithinRange(2, 8)] = _DEFAULTS.factor
    axis: str = _DEFAULTS.axis
    interpolation: str = _DEFAULTS.interpolation
    window: str = _DEFAULTS.window
    count: Annotated[int, WithinRange(1, 1024)] = _DEFAULTS.count
    guidanceScale: Annotated[float, WithinRange(0.0, 20.0)] = _DEFAULTS.guidance_scale
    steps: Annotated[int, WithinRange(1, 1000)] = _DEFAULTS.steps
    seed: Annotated[int, WithinRange(0, 2147483647)] = _DEFAULTS.seed
    device: str = _DEFAULTS.device
    serverUrl: str = _DEFAULTS.server_url
    serverTokenFile: str = _DEFAULTS.server_token_file


#
# LCTfoundEnhanceWidget
#


class LCTfoundEnhanceWidget(LCTfoundJobModuleWidget):
    """Task, inputs, the task's settings, Run / Cancel with progress and an input/result fade slider;
    the parameter node, the hand-synced choice selectors and the status line are the bases'."""

    uiFile = "UI/LCTfoundEnhance.ui"

    #: Parameter (snake_case, as `EnhanceModuleLogic.visible_fields` names them) → its label and editor.
    FIELDS = {
        "input_volume": ("inputVolumeLabel", "inputVolumeSelector"),
        "model_name": ("modelLabel", "modelSelector", "refreshModelsButton"),
        "task_model": ("taskModelLabel", "taskModelSelector"),
        "denoiser": ("denoiserLabel", "denoiserSelector"),
        "dose": ("doseLabel", "doseSpinBox"),
        "views": ("viewsLabel", "viewsSpinBox"),
        "reconstruction": ("reconstructionLabel", "reconstructionSelector"),
        "geometry": ("geometryLabel", "geometrySelector"),
        "factor": ("factorLabel", "factorSpinBox"),
        "axis": ("axisLabel", "axisSelector"),
        "interpolation": ("interpolationLabel", "interpolationSelector"),
        "window": ("windowLabel", "windowSelector"),
        "count": ("countLabel", "countSpinBox"),
        "guidance_scale": ("guidanceScaleLabel", "guidanceScaleSpinBox"),
        "steps": ("stepsLabel", "stepsSpinBox"),
        "seed": ("seedLabel", "seedSpinBox"),
    }

    def __init__(self, parent=None) -> None:
        LCTfoundJobModuleWidget.__init__(self, parent)
        self._shownTask = None

    def createLogic(self) -> "LCTfoundEnhanceLogic":
        return LCTfoundEnhanceLogic()

    def setupWidgets(self, uiWidget) -> None:
        LCTfoundJobModuleWidget.setupWidgets(self, uiWidget)
        self.logic.engine.set_scene(slicer.mrmlScene)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.comparisonSlider.connect("valueChanged(int)", self.onComparisonSlider)

    def _updateStatus(self, caller=None, event=None) -> None:
        node = self._parameterNode
        if node and node.task != self._shownTask:
            self._shownTask = node.task
            node.taskModel = ""  # the trained models of the new task
            self._fillChoiceSelectors()
            self.logic.engine.fill_defaults(node)
        LCTfoundJobModuleWidget._updateStatus(self)
        engine = self.logic.engine
        shown = engine.visible_fields(node) if node else set()
        for name, widgetNames in self.FIELDS.items():
            for widgetName in widgetNames:
                getattr(self.ui, widgetName).visible = name in shown
        state = engine.start_button_state(node) if node else None
        self.ui.startButton.enabled = bool(state and state.enabled)
        self.ui.startButton.toolTip = state.tooltip if state else ""
        self.ui.comparisonSlider.enabled = engine.result_volume is not None
        self._showProgress()

    def onComparisonSlider(self, value: int) -> None:
        if self.logic.engine.result_volume is not None:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value / 100.0)

    def _onJobEnded(self) -> None:
        before, after = self.logic.engine.comparison()
        slicer.util.setSliceViewerLayers(background=before or after, foreground=after if before else None,
                                         foregroundOpacity=self.ui.comparisonSlider.value / 100.0, fit=before is None)

    def onStartButton(self) -> None:
        def start():
            self.logic.engine.start(self._parameterNode)
            self._startPolling()

        self._runStart(_("The task could not start."), start)


#
# LCTfoundEnhanceLogic
#


class LCTfoundEnhanceLogic(LCTfoundModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.EnhanceModuleLogic`). Can be used without the GUI widget."""

    parameterNodeClass = LCTfoundEnhanceParameterNode

    def __init__(self, engine: Optional[EnhanceModuleLogic] = None) -> None:
        LCTfoundModuleLogic.__init__(self, engine or EnhanceModuleLogic(python=pythonSlicerExecutable()))


#
# LCTfoundEnhanceTest
#


class LCTfoundEnhanceTest(LCTfoundVolumeModuleTestMixin, ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundEnhance); the headless tests are in Testing/Python."""

    logicClass = LCTfoundEnhanceLogic
    engineClass = EnhanceModuleLogic

    def test_TaskProblems(self):
        self.delayDisplay("Checking the task settings")
        logic = LCTfoundEnhanceLogic(EnhanceModuleLogic(list_models=lambda extra_folders=(): [],
                                                        list_task_models=lambda extra_folders=(): [],
                                                        available_devices=lambda: ["cpu"]))
        parameterNode = logic.getParameterNode()
        parameterNode.task = "synthetic"
        self.assertIn("No LCTfound model is installed", logic.engine.first_problem(parameterNode))
        self.delayDisplay("Test passed")

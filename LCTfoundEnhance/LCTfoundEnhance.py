"""LCTfoundEnhance: enhance lung CT images (e.g. low-dose denoising) with LCTfound.

Thin Slicer front end: choose the CT volume, an installed model and the device; the status line
says what is selected (model source and preset, device) or what is missing. The enhancement task
itself comes in a later version of the extension, so the panel has no Apply button yet.
Everything that decides something lives in the Qt-free `lctfound.logic.EnhanceModuleLogic`, which is
tested without Slicer.
"""

import os
import sys
from typing import Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
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
from lctfound.logic import CHOICE_PROPERTY_NAME, EnhanceModuleLogic  # noqa: E402

CITATION = (
    '"A lung CT vision foundation model facilitating disease diagnosis and medical imaging", '
    "Nature Communications 2025, doi:10.1038/s41467-025-66620-z."
)
HOMEPAGE = "https://github.com/lctfound/SlicerLCTfound"


#
# LCTfoundEnhance
#


class LCTfoundEnhance(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("LCTfound Enhance")
        self.parent.categories = ["LCTfound"]
        self.parent.dependencies = []
        self.parent.contributors = ["SlicerLCTfound developers (SlicerLCTfound project)"]
        self.parent.helpText = _(
            "Enhance lung CT images (for example low-dose denoising) with the LCTfound diffusion foundation model; the input is never overwritten. "
            "This version lets you choose the CT volume, the model and the device and shows what "
            "is selected; the enhancement itself comes in a later version. "
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
class LCTfoundEnhanceParameterNode:
    """
    inputVolume - the CT volume to process.
    modelName - the installed LCTfound model (filled from the model registry).
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    device: str = "auto"


#
# LCTfoundEnhanceWidget
#


class LCTfoundEnhanceWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._choiceSelectors = {}

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/LCTfoundEnhance.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = LCTfoundEnhanceLogic()

        # Model and device lists are only known at run time, so these combo boxes are synced by
        # hand instead of by connectGui (see lctfound.logic.CHOICE_PROPERTY_NAME).
        for combo in uiWidget.findChildren(qt.QComboBox):
            name = combo.property(CHOICE_PROPERTY_NAME)
            if name:
                self._choiceSelectors[name] = combo
                combo.connect("currentIndexChanged(int)", lambda index, name=name: self._onChoiceSelected(name))
        self._fillChoiceSelectors()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)

        self.initializeParameterNode()

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

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        self.logic.engine.fill_defaults(self._parameterNode)

    def setParameterNode(self, inputParameterNode: Optional[LCTfoundEnhanceParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateStatus)
        self._updateStatus()

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

    def _updateStatus(self, caller=None, event=None) -> None:
        for name, combo in self._choiceSelectors.items():
            value = getattr(self._parameterNode, name) if self._parameterNode else ""
            wasBlocked = combo.blockSignals(True)
            combo.setCurrentIndex(combo.findData(value))
            combo.blockSignals(wasBlocked)
        self.ui.statusLabel.text = self.logic.engine.selection_summary(self._parameterNode) if self._parameterNode else ""

    def onRefreshModels(self) -> None:
        self.logic.engine.refresh()
        self._fillChoiceSelectors(refresh=True)
        if self._parameterNode:
            self.logic.engine.fill_defaults(self._parameterNode)
        self._updateStatus()


#
# LCTfoundEnhanceLogic
#


class LCTfoundEnhanceLogic(ScriptedLoadableModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.EnhanceModuleLogic`). Can be used without the GUI widget."""

    def __init__(self, engine: Optional[EnhanceModuleLogic] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.engine = engine or EnhanceModuleLogic()

    def getParameterNode(self):
        return LCTfoundEnhanceParameterNode(super().getParameterNode())


#
# LCTfoundEnhanceTest
#


class LCTfoundEnhanceTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundEnhance); the headless tests are in Testing/Python."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_ParameterNodeDefaults()
        self.setUp()
        self.test_StatusLine()

    def test_ParameterNodeDefaults(self):
        logic = LCTfoundEnhanceLogic()
        parameterNode = logic.getParameterNode()
        self.assertIsNone(parameterNode.inputVolume)
        self.assertEqual(parameterNode.device, "auto")

    def test_StatusLine(self):
        import numpy as np

        self.delayDisplay("Checking the status line")
        logic = LCTfoundEnhanceLogic(
            EnhanceModuleLogic(list_models=lambda extra_folders=(): [], available_devices=lambda: ["cpu"])
        )
        parameterNode = logic.getParameterNode()
        self.assertIn("input volume", logic.engine.selection_summary(parameterNode))
        volume = slicer.util.addVolumeFromArray(np.zeros((4, 8, 8), dtype=np.int16), name="LCTfoundTestCT")
        parameterNode.inputVolume = volume
        self.assertIn("No LCTfound model is installed", logic.engine.selection_summary(parameterNode))
        self.delayDisplay("Test passed")

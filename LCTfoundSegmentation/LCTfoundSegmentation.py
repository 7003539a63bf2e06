"""LCTfoundSegmentation: segment lung CT structures with LCTfound features.

Thin Slicer front end: choose the CT volume, an installed model and the device; the status line
says what is selected (model source and preset, device) or what is missing. The segmentation task
itself comes in a later version of the extension, so the panel has no Apply button yet.
Everything that decides something lives in the Qt-free `lctfound.logic.SegmentationModuleLogic`, which is
tested without Slicer; the panel code shared by the LCTfound modules is in `LCTfoundSlicerLib`.
"""

import os
import sys
from typing import Optional

from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

# A source checkout has LCTfoundSlicerLib and lctfound next to this module's folder (an installed
# extension has them in qt-scripted-modules, on sys.path already); the library cannot add itself.
_sourceRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if os.path.isfile(os.path.join(_sourceRoot, "LCTfoundSlicerLib", "__init__.py")) and _sourceRoot not in sys.path:
    sys.path.append(_sourceRoot)

# Light imports only (no torch): this runs while Slicer starts.
from LCTfoundSlicerLib import LCTfoundModule, LCTfoundModuleLogic, LCTfoundVolumeModuleTestMixin, LCTfoundVolumeModuleWidget  # noqa: E402
from lctfound.logic import SegmentationModuleLogic  # noqa: E402


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
                "Segment lung CT structures with features of the LCTfound diffusion foundation model. "
                "This version lets you choose the CT volume, the model and the device and shows what "
                "is selected; the segmentation itself comes in a later version."
            ),
        )


#
# Parameters
#


@parameterNodeWrapper
class LCTfoundSegmentationParameterNode:
    """
    inputVolume - the CT volume to process.
    modelName - the installed LCTfound model (filled from the model registry).
    device - "auto", "cpu", "cuda", "cuda:N" or "mps".
    """

    inputVolume: vtkMRMLScalarVolumeNode
    modelName: str = ""
    device: str = "auto"


#
# LCTfoundSegmentationWidget
#


class LCTfoundSegmentationWidget(LCTfoundVolumeModuleWidget):
    """Volume, model and device selectors with a status line (all behaviour in LCTfoundVolumeModuleWidget)."""

    uiFile = "UI/LCTfoundSegmentation.ui"

    def createLogic(self) -> "LCTfoundSegmentationLogic":
        return LCTfoundSegmentationLogic()


#
# LCTfoundSegmentationLogic
#


class LCTfoundSegmentationLogic(LCTfoundModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.SegmentationModuleLogic`). Can be used without the GUI widget."""

    parameterNodeClass = LCTfoundSegmentationParameterNode

    def __init__(self, engine: Optional[SegmentationModuleLogic] = None) -> None:
        LCTfoundModuleLogic.__init__(self, engine or SegmentationModuleLogic())


#
# LCTfoundSegmentationTest
#


class LCTfoundSegmentationTest(LCTfoundVolumeModuleTestMixin, ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundSegmentation); the headless tests are in Testing/Python."""

    logicClass = LCTfoundSegmentationLogic
    engineClass = SegmentationModuleLogic

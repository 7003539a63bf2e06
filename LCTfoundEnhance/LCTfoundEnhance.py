"""LCTfoundEnhance: enhance lung CT images (e.g. low-dose denoising) with LCTfound.

Thin Slicer front end: choose the CT volume, an installed model and the device; the status line
says what is selected (model source and preset, device) or what is missing. The enhancement task
itself comes in a later version of the extension, so the panel has no Apply button yet.
Everything that decides something lives in the Qt-free `lctfound.logic.EnhanceModuleLogic`, which is
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
from lctfound.logic import EnhanceModuleLogic  # noqa: E402


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
                "Enhance lung CT images (for example low-dose denoising) with the LCTfound diffusion foundation model; the input is never overwritten. "
                "This version lets you choose the CT volume, the model and the device and shows what "
                "is selected; the enhancement itself comes in a later version."
            ),
        )


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


class LCTfoundEnhanceWidget(LCTfoundVolumeModuleWidget):
    """Volume, model and device selectors with a status line (all behaviour in LCTfoundVolumeModuleWidget)."""

    uiFile = "UI/LCTfoundEnhance.ui"

    def createLogic(self) -> "LCTfoundEnhanceLogic":
        return LCTfoundEnhanceLogic()


#
# LCTfoundEnhanceLogic
#


class LCTfoundEnhanceLogic(LCTfoundModuleLogic):
    """Slicer side of the module logic; all behaviour is in `self.engine`
    (`lctfound.logic.EnhanceModuleLogic`). Can be used without the GUI widget."""

    parameterNodeClass = LCTfoundEnhanceParameterNode

    def __init__(self, engine: Optional[EnhanceModuleLogic] = None) -> None:
        LCTfoundModuleLogic.__init__(self, engine or EnhanceModuleLogic())


#
# LCTfoundEnhanceTest
#


class LCTfoundEnhanceTest(LCTfoundVolumeModuleTestMixin, ScriptedLoadableModuleTest):
    """Runs inside Slicer (ctest py_LCTfoundEnhance); the headless tests are in Testing/Python."""

    logicClass = LCTfoundEnhanceLogic
    engineClass = EnhanceModuleLogic

"""Slicer-side code shared by the LCTfound scripted modules (Qt, MRML and Slicer's module classes).

Built like Slicer's DICOMLib: a scripted "module" without a module file, installed WITH_SUBDIR next to
the modules (qt-scripted-modules/LCTfoundSlicerLib/), so every LCTfound module can import it. The
decisions stay in the Qt-free engine `lctfound.logic`; this package only wires it to the panels.
"""

from .bases import (
    CITATION,
    HOMEPAGE,
    LCTfoundModule,
    LCTfoundJobModuleWidget,
    LCTfoundModuleLogic,
    LCTfoundModuleTestMixin,
    LCTfoundModuleWidget,
    LCTfoundVolumeModuleTestMixin,
    LCTfoundVolumeModuleWidget,
    pythonSlicerExecutable,
)

__all__ = [
    "CITATION",
    "HOMEPAGE",
    "LCTfoundModule",
    "LCTfoundJobModuleWidget",
    "LCTfoundModuleLogic",
    "LCTfoundModuleTestMixin",
    "LCTfoundModuleWidget",
    "LCTfoundVolumeModuleTestMixin",
    "LCTfoundVolumeModuleWidget",
    "pythonSlicerExecutable",
]

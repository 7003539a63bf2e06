"""Qt-free logic of the LCTfoundSegmentation module.

For now the module lets users choose the input volume, the model and the device, and says
what the selection is (or what is missing). The segmentation task itself comes in a later
version, as a job (`ModuleLogicBase.start_job`) like training.
"""

from __future__ import annotations

from .base import ModuleLogicBase, ModuleParameters


class SegmentationModuleLogic(ModuleLogicBase):
    task_name = "segmentation"
    parameters_class = ModuleParameters

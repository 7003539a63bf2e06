"""Qt-free logic of the LCTfoundEnhance module (low-dose enhancement and related image tasks).

For now the module lets users choose the input volume, the model and the device, and says
what the selection is (or what is missing). The enhancement task itself comes in a later
version, as a job (`ModuleLogicBase.start_job`) like training.
"""

from __future__ import annotations

from .base import ModuleLogicBase, ModuleParameters


class EnhanceModuleLogic(ModuleLogicBase):
    task_name = "enhancement"
    parameters_class = ModuleParameters

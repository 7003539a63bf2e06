"""Qt-free logic of the LCTfoundEnhance module (low-dose enhancement and related image tasks).

The input volume is never overwritten: the result goes to ``output_volume`` (a new volume
when None). The enhancement pipeline plugs into `process()` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import ModuleLogicBase, ModuleParameters, refers_to_same


@dataclass
class EnhanceParameters(ModuleParameters):
    """``output_volume``: where the enhanced image goes; None creates a new volume."""

    output_volume: Any = None


class EnhanceModuleLogic(ModuleLogicBase):
    task_name = "enhancement"
    parameters_class = EnhanceParameters

    def parameter_problems(self, parameters: Any) -> list[str]:
        parameters = self.parameters_from(parameters)
        problems = super().parameter_problems(parameters)
        if refers_to_same(parameters.input_volume, parameters.output_volume):
            problems.append(
                "The output volume must differ from the input volume (the input is never overwritten)."
            )
        return problems

"""Qt-free logic of the LCTfoundSegmentation module.

The skeleton knows the module's parameters and when Apply can run; the segmentation pipeline
itself (features → pixel head → labels → segmentation node) plugs into `process()` later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .base import ModuleLogicBase, ModuleParameters


@dataclass
class SegmentationParameters(ModuleParameters):
    """``output_segmentation``: the segmentation to update; None creates a new one."""

    output_segmentation: Any = None


class SegmentationModuleLogic(ModuleLogicBase):
    task_name = "segmentation"
    parameters_class = SegmentationParameters

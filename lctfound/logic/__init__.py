"""Module logic: one Qt-free logic class per LCTfound module, shared by Slicer and web front ends.

Import is light (no torch, no Slicer, no Qt): the Slicer module files import this package when
Slicer starts. MRML may only be imported lazily inside functions.
"""

from .base import (
    AUTO_DEVICE,
    CHOICE_PROPERTY_NAME,
    TRANSITIONS,
    ButtonState,
    Choice,
    InvalidTransition,
    ModelEntryLike,
    ModuleLogicBase,
    ModuleParameters,
    ModuleStatus,
    ProgressBarState,
    RunState,
    is_valid_model_name,
)
from .enhance import EnhanceModuleLogic, EnhanceParameters
from .segmentation import SegmentationModuleLogic, SegmentationParameters
from .train import TrainModuleLogic, TrainParameters

__all__ = [
    "AUTO_DEVICE",
    "CHOICE_PROPERTY_NAME",
    "TRANSITIONS",
    "ButtonState",
    "Choice",
    "EnhanceModuleLogic",
    "EnhanceParameters",
    "InvalidTransition",
    "ModelEntryLike",
    "ModuleLogicBase",
    "ModuleParameters",
    "ModuleStatus",
    "ProgressBarState",
    "RunState",
    "SegmentationModuleLogic",
    "SegmentationParameters",
    "TrainModuleLogic",
    "TrainParameters",
    "is_valid_model_name",
]

"""Module logic: one Qt-free logic class per LCTfound module, shared by Slicer and web front ends.

Import is light (no torch, no Slicer, no Qt): the Slicer module files import this package when
Slicer starts. MRML may only be imported lazily inside functions.
"""

from .base import (
    AUTO_DEVICE,
    CHOICE_PROPERTY_NAME,
    NODE_LIST_PROPERTY_NAME,
    TRANSITIONS,
    ButtonState,
    Choice,
    InvalidTransition,
    ModuleLogicBase,
    ModuleParameters,
    ModuleStatus,
    ProgressBarState,
    RunState,
    device_environment,
    format_seconds,
)
from .ctfm import CTFMLogic, CTFMParameters
from .enhance import EnhanceModuleLogic, EnhanceParameters
from .segmentation import (
    DIAGNOSIS,
    FEWSHOT,
    STRUCTURES,
    SegmentationModuleLogic,
    SegmentationParameters,
    format_slices,
    mark_slice_reviewed,
    reviewed_slices,
    slice_index_at,
)
from .train import TrainModuleLogic, TrainParameters, set_volume_class_name, volume_class_name

__all__ = [
    "AUTO_DEVICE",
    "DIAGNOSIS",
    "FEWSHOT",
    "STRUCTURES",
    "SegmentationParameters",
    "format_slices",
    "mark_slice_reviewed",
    "reviewed_slices",
    "slice_index_at",
    "CHOICE_PROPERTY_NAME",
    "NODE_LIST_PROPERTY_NAME",
    "TRANSITIONS",
    "ButtonState",
    "Choice",
    "CTFMLogic",
    "CTFMParameters",
    "EnhanceModuleLogic",
    "EnhanceParameters",
    "InvalidTransition",
    "ModuleLogicBase",
    "ModuleParameters",
    "ModuleStatus",
    "ProgressBarState",
    "RunState",
    "SegmentationModuleLogic",
    "TrainModuleLogic",
    "TrainParameters",
    "device_environment",
    "format_seconds",
    "set_volume_class_name",
    "volume_class_name",
]

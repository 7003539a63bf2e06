"""Networks, presets, conditioning, model folders and the model registry."""

from .bundle import LCTfoundModel, add_prompt_cache, load_model, new_model, save_model
from .presets import PRESETS, Preset, build_unet, describe_unet, get_preset
from .registry import ModelEntry, list_models, resolve_model

__all__ = [
    "LCTfoundModel", "ModelEntry", "PRESETS", "Preset", "add_prompt_cache", "build_unet", "describe_unet",
    "get_preset", "list_models", "load_model", "new_model", "resolve_model", "save_model",
]

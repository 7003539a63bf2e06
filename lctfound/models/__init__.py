"""Networks, presets, conditioning, model folders and the model registry."""

from __future__ import annotations

import importlib
from typing import Any

# Where each public name lives. They are imported on first use (PEP 562): the panels read the registry
# (model names, entries) without importing PyTorch, which `bundle` and `presets` need.
_EXPORTS = {
    "LCTfoundModel": "bundle", "add_prompt_cache": "bundle", "load_model": "bundle", "new_model": "bundle",
    "save_model": "bundle",
    "PRESETS": "presets", "Preset": "presets", "build_unet": "presets", "describe_unet": "presets",
    "get_preset": "presets",
    "ModelEntry": "registry", "list_models": "registry", "resolve_model": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)

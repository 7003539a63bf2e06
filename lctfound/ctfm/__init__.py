"""CT-FM (project-lighter) as a second backbone: a 3D MONAI SegResEncoder for embeddings, dense
features, retrieval, linear probes and segmentation decoders. Weights are never downloaded: a
local folder in the published Hugging Face layout (or a repo already in the local cache) is required.

Modules: `preprocess` (the input contract with exact geometry), `model` (strict loading and
saving), `features` (sliding-window embeddings and maps), `retrieval` (index and search),
`probe` (scan classification on cached embeddings), `decoder` (a trainable segmentation decoder,
frozen or fully fine-tuned), `tasks` (what their task models share: the backbone reference).
"""

from __future__ import annotations

import importlib
from typing import Any

# Where each public name lives. They are imported on first use (PEP 562), so that light modules of
# this package (`layout`) and the panels that read them do not import PyTorch.
_EXPORTS = {
    "WindowSettings": "features", "dense_features": "features", "embed_point": "features",
    "embed_region": "features", "embed_volume": "features", "similarity_volume": "features",
    "CTFM_CONFIG": "model", "CTFMModel": "model", "inspect_model": "model", "load_model": "model",
    "new_model": "model", "save_model": "model",
    "CTFMPreprocessing": "preprocess", "PreparedVolume": "preprocess", "prepare_volume": "preprocess",
    "RetrievalIndex": "retrieval", "build_index": "retrieval", "load_index": "retrieval",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "CTFM_CONFIG", "CTFMModel", "CTFMPreprocessing", "PreparedVolume", "RetrievalIndex", "WindowSettings",
    "build_index", "dense_features", "embed_point", "embed_region", "embed_volume", "inspect_model",
    "load_index", "load_model", "new_model", "prepare_volume", "save_model", "similarity_volume",
]

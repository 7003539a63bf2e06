"""CT-FM (project-lighter) as a second backbone: a 3D MONAI SegResEncoder for embeddings, dense
features, retrieval, linear probes and segmentation decoders. Weights are never downloaded: a
local folder in the published Hugging Face layout (or a repo already in the local cache) is required.

Modules: `preprocess` (the input contract with exact geometry), `model` (strict loading and
saving), `features` (sliding-window embeddings and maps), `retrieval` (index and search),
`probe` (scan classification on cached embeddings), `decoder` (a trainable segmentation decoder,
frozen or fully fine-tuned), `tasks` (what their task models share: the backbone reference).
"""

from .features import WindowSettings, dense_features, embed_point, embed_region, embed_volume, similarity_volume
from .model import CTFM_CONFIG, CTFMModel, inspect_model, load_model, new_model, save_model
from .preprocess import CTFMPreprocessing, PreparedVolume, prepare_volume
from .retrieval import RetrievalIndex, build_index, load_index

__all__ = [
    "CTFM_CONFIG", "CTFMModel", "CTFMPreprocessing", "PreparedVolume", "RetrievalIndex", "WindowSettings",
    "build_index", "dense_features", "embed_point", "embed_region", "embed_volume", "inspect_model",
    "load_index", "load_model", "new_model", "prepare_volume", "save_model", "similarity_volume",
]

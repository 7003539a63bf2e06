"""File names of CT-FM folders and the light checks that tell them apart, importable without PyTorch
(panels check an index folder with them; the server's ``GET /models`` says which of its models is a
CT-FM encoder or index)."""

from __future__ import annotations

from pathlib import Path

#: The manifest and the embedding matrix of an index folder (`lctfound.ctfm.retrieval`).
MANIFEST_NAME = "index.json"
MATRIX_NAME = "embeddings.safetensors"
#: The files of an encoder folder in the published Hugging Face layout (`lctfound.ctfm.model`).
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
#: What the server's ``GET /models`` "kinds" call a CT-FM encoder folder and a CT-FM index folder.
ENCODER_KIND = "ctfm"
INDEX_KIND = "ctfm-index"


def missing_index_file(folder: Path) -> str:
    """The first file of an index folder (manifest, then matrix) that ``folder`` lacks; '' when it has both."""
    return next((name for name in (MANIFEST_NAME, MATRIX_NAME) if not (Path(folder) / name).is_file()), "")


def looks_like_encoder(folder: Path) -> bool:
    """Whether ``folder`` holds CT-FM weights where `lctfound.ctfm.model.locate_weights` looks first (the
    published layout, which LCTfound's own CT-FM folders keep; an LCTfound diffusion folder keeps its
    weights under ``unet/``). A sieve on file names only: loading checks the tensors strictly."""
    folder = Path(folder)
    return (folder / WEIGHTS_NAME).is_file() and not (folder / "unet").is_dir()

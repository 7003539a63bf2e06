"""File names of CT-FM folders, importable without PyTorch (panels check an index folder with them)."""

#: The manifest and the embedding matrix of an index folder (`lctfound.ctfm.retrieval`).
MANIFEST_NAME = "index.json"
MATRIX_NAME = "embeddings.safetensors"

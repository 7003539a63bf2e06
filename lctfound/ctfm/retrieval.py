"""Retrieval with CT-FM embeddings: index a folder of volumes, query by scan, point or region.

An index is a folder written atomically::

    embeddings.safetensors   volumes [N, C] float32; windows [M, C] float32,
                             window_volume [M] int64, window_centre_ras [M, 3] float64
    index.json               manifest: format, backbone, model checksum, preprocessing and window
                             settings, one entry per volume (path, size, spacing, window rows)

Queries are compared by cosine similarity. Whole-scan queries rank the volume vectors; point and
region queries rank volumes by their best-matching window and report where it lies (RAS), so a
viewer can jump there. An index only answers queries made with the same model and settings.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import numpy as np

from .. import __version__
from ..atomic import atomic_directory
from ..errors import InputError, LCTfoundError
from ..io.volume import read_volume, volume_stem
from ..progress import Progress, ensure_progress
from .features import WindowSettings, embed_volume
from .layout import MANIFEST_NAME, MATRIX_NAME, missing_index_file
from .model import CTFMModel
from .preprocess import DEFAULT_PREPROCESSING, CTFMPreprocessing, prepare_volume

DEFAULT_SETTINGS = WindowSettings()
INDEX_FORMAT = 1


@dataclass
class Match:
    rank: int
    score: float
    name: str
    path: str
    centre_ras: Optional[list[float]] = None  # best window's centre (point / region queries)

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "score": round(self.score, 6), "name": self.name, "path": self.path,
                **({"centre_ras": self.centre_ras} if self.centre_ras is not None else {})}


@dataclass
class RetrievalIndex:
    manifest: dict[str, Any]
    volumes: np.ndarray  # [N, C]
    windows: np.ndarray  # [M, C]
    window_volume: np.ndarray  # [M]
    window_centre_ras: np.ndarray  # [M, 3]
    path: Optional[Path] = None

    @property
    def entries(self) -> list[dict[str, Any]]:
        return self.manifest["volumes"]

    @property
    def settings(self) -> WindowSettings:
        w = self.manifest["windows"]
        return WindowSettings(tuple(w["window"]), float(w["overlap"]), int(w.get("batch_size", 2)),
                              w.get("blend", "gaussian"))

    @property
    def aggregation(self) -> str:
        return self.manifest["aggregation"]

    def check_model(self, model: CTFMModel) -> None:
        """Refuse a query model that differs from the one the index was built with."""
        expected = self.manifest["model"]["weights_sha256"]
        if model.weights_sha256 and expected and model.weights_sha256 != expected:
            raise LCTfoundError(f"index {self.path or ''} was built with model weights {expected[:12]}…, "
                                f"but the query model's are {model.weights_sha256[:12]}…; use the same model",
                                option_hints={"model": "pass it with --model"})
        if int(self.manifest["model"]["embedding_dim"]) != model.embedding_dim:
            raise LCTfoundError(f"index holds {self.manifest['model']['embedding_dim']}-d embeddings; the model gives "
                                f"{model.embedding_dim}-d")

    def search(self, query: np.ndarray, level: str = "volume", top_k: int = 10) -> list[Match]:
        """Rank indexed volumes by cosine similarity with ``query`` (``volume`` or best ``window``)."""
        query = np.asarray(query, dtype=np.float64).reshape(-1)
        if query.shape[0] != self.volumes.shape[1]:
            raise LCTfoundError(f"query vector has {query.shape[0]} values; the index holds "
                                f"{self.volumes.shape[1]}-d embeddings")
        if level == "volume":
            scores = cosine(self.volumes, query)
            order = np.argsort(-scores, kind="stable")[:top_k]
            return [Match(r + 1, float(scores[i]), self.entries[i]["name"], self.entries[i]["path"])
                    for r, i in enumerate(order)]
        if level != "window":
            raise LCTfoundError(f"unknown search level {level!r}; use volume or window")
        if self.windows.shape[0] == 0:
            raise LCTfoundError("this index has no window embeddings; rebuild it with windows for point/region queries")
        scores = cosine(self.windows, query)
        best: dict[int, int] = {}
        for row in np.argsort(-scores, kind="stable"):
            best.setdefault(int(self.window_volume[row]), int(row))
        ranked = sorted(best.items(), key=lambda item: -scores[item[1]])[:top_k]
        return [Match(r + 1, float(scores[row]), self.entries[v]["name"], self.entries[v]["path"],
                      [round(float(x), 3) for x in self.window_centre_ras[row]]) for r, (v, row) in enumerate(ranked)]


def cosine(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    matrix = np.asarray(matrix, dtype=np.float64)
    norms = np.linalg.norm(matrix, axis=1) * max(np.linalg.norm(vector), 1e-12)
    return (matrix @ vector) / np.maximum(norms, 1e-12)


def build_index(model: CTFMModel, volumes: Iterable[str | os.PathLike], output: str | os.PathLike,
                settings: WindowSettings = DEFAULT_SETTINGS, aggregation: str = "mean", windows: bool = True,
                preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING, validate: bool = True,
                overwrite: bool = False, progress: Optional[Progress] = None) -> Path:
    """Embed every volume and write the index folder atomically (nothing appears if any volume fails)."""
    import torch
    from safetensors.torch import save_file

    progress = ensure_progress(progress)
    paths = [Path(p) for p in volumes]
    if not paths:
        raise InputError("no volumes to index")
    output = Path(output)
    if output.exists() and not overwrite:
        raise LCTfoundError(f"{output}: already exists; choose a new index folder",
                            option_hints={"overwrite": "or pass --overwrite to replace it"})
    if aggregation == "whole" and windows:
        aggregation = "mean"  # windows are computed anyway; "whole" needs a second pass
    vectors, window_rows, window_owner, centres, entries = [], [], [], [], []
    for number, path in enumerate(paths):
        progress.check_cancelled()
        progress.update(number, len(paths), f"{path.name}")
        volume = read_volume(path, validate=validate)
        prepared = prepare_volume(volume, preprocessing)
        vector, per_window = embed_volume(model, prepared, aggregation, settings)
        vectors.append(vector)
        first = sum(len(w) for w in window_rows)
        if windows and per_window is not None:
            window_rows.append(per_window.embeddings)
            window_owner.append(np.full(len(per_window.embeddings), number, dtype=np.int64))
            centres.append(per_window.centres_ras)
        entries.append({"name": volume_stem(path), "path": str(path.resolve()),
                        "size_ijk": [int(n) for n in volume.shape[::-1]], "spacing": list(volume.spacing),
                        "prepared_shape": list(prepared.shape),
                        "windows": [first, sum(len(w) for w in window_rows)]})
    progress.update(len(paths), len(paths), "writing the index")
    dim = model.embedding_dim
    tensors = {
        "volumes": torch.from_numpy(np.stack(vectors).astype(np.float32)),
        "windows": torch.from_numpy(np.concatenate(window_rows).astype(np.float32) if window_rows
                                    else np.zeros((0, dim), np.float32)),
        "window_volume": torch.from_numpy(np.concatenate(window_owner) if window_owner else np.zeros(0, np.int64)),
        "window_centre_ras": torch.from_numpy(np.concatenate(centres) if centres else np.zeros((0, 3))),
    }
    manifest = {
        "format": "lctfound-ctfm-index", "format_version": INDEX_FORMAT, "backbone": "ctfm",
        "model": {"path": str(model.path) if model.path else None, "weights_sha256": model.weights_sha256,
                  "embedding_dim": dim, "config": model.config},
        "preprocessing": preprocessing.as_dict(), "windows": settings.as_dict(), "aggregation": aggregation,
        "has_windows": bool(windows), "volumes": entries, "lctfound_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    with atomic_directory(output, overwrite=overwrite) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / MATRIX_NAME), metadata={"format": "pt"})
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    return output


def load_index(path: str | os.PathLike) -> RetrievalIndex:
    """Read an index folder with checks (one-line `LCTfoundError` for anything wrong)."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    manifest_path, matrix_path = path / MANIFEST_NAME, path / MATRIX_NAME
    if not path.is_dir():
        raise InputError(f"{path}: no such index folder")
    if missing_index_file(path):
        raise InputError(f"{path}: not a CT-FM index (needs {MANIFEST_NAME} and {MATRIX_NAME})")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise InputError(f"{manifest_path}: not valid JSON ({error.msg})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "lctfound-ctfm-index":
        raise InputError(f"{manifest_path}: not a CT-FM index manifest")
    if int(manifest.get("format_version", 0)) > INDEX_FORMAT:
        raise InputError(f"{path}: written by a newer LCTfound (index format {manifest['format_version']}); "
                         "upgrade lctfound")
    try:
        tensors = load_file(str(matrix_path))
    except Exception as error:  # safetensors' own error type for damaged files
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"{matrix_path}: cannot be read ({reason})") from None
    needed = ("volumes", "windows", "window_volume", "window_centre_ras")
    if any(name not in tensors for name in needed):
        raise InputError(f"{matrix_path}: lacks one of {', '.join(needed)}")
    index = RetrievalIndex(manifest, tensors["volumes"].numpy(), tensors["windows"].numpy(),
                           tensors["window_volume"].numpy(), tensors["window_centre_ras"].numpy(), path)
    if index.volumes.shape[0] != len(index.entries) or index.windows.shape[0] != index.window_volume.shape[0]:
        raise InputError(f"{path}: manifest and embedding matrix disagree (damaged index); rebuild it")
    return index


def parse_triplet(text: str, what: str) -> list[float]:
    """``"R,A,S"`` → three floats (one-line error otherwise)."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 3 or not all(np.isfinite(values)):
        raise LCTfoundError(f"cannot read {what} {text!r}; use three comma-separated numbers R,A,S in mm")
    return values


def parse_region(text: str) -> tuple[list[float], list[float]]:
    """``"R1,A1,S1,R2,A2,S2"`` (two opposite corners in RAS mm) → two corners."""
    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        values = []
    if len(values) != 6 or not all(np.isfinite(values)):
        raise LCTfoundError(f"cannot read region {text!r}; use six numbers R1,A1,S1,R2,A2,S2 "
                            "(two opposite corners, mm)")
    return values[:3], values[3:]


"""Linear probe on frozen CT-FM embeddings: scan-level classification (diagnosis, triage, prognosis).

Each scan is embedded once (the 512-d CT-FM vector: sliding windows aggregated by mean or min,
see `lctfound.ctfm.features`) and cached on disk per (volume content, model weights, recipe),
so training epochs and later predictions cost a matrix product, not the encoder. A linear layer
on standardised embeddings (the training set's mean and standard deviation, stored with the
layer) is trained with class-balanced cross-entropy through the shared `TrainingLoop`
(AdamW, cosine schedule, checkpoints, exact resume).

The result is a task model (task ``ctfm-probe``) naming its CT-FM backbone by the sha256 of its
weights; running it on another backbone is refused. Predictions are written as a CSV with the
columns of ``lctfound classify predict`` (``case, input, predicted, probability_<class>…, model,
model_sha256, backbone, backbone_sha256, note``), which ``lctfound evaluate classification``
reads.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_file
from ..errors import LCTfoundError
from ..hashing import sha256_file
from ..io.volume import CTVolume, read_volume, volume_stem
from ..models.task_models import TaskModel, require_parts, save_task_model
from ..paths import feature_cache_dir
from ..progress import Progress, ensure_progress
from ..training.loop import LoopConfig, TrainingLoop, TrainingResult, TrainingTask, check_run_folder
from .features import AGGREGATIONS, WindowSettings, embed_volume
from .model import CTFMModel
from .preprocess import DEFAULT_PREPROCESSING, CTFMPreprocessing, prepare_volume
from .tasks import (
    PROBE_TASK,
    RESEARCH_NOTE,
    backbone_for,
    backbone_reference,
    load_ctfm_task_model,
    model_fingerprint,
    task_model_name,
    volume_fingerprint,
)
from ..compat import strict_zip

logger = logging.getLogger(__name__)

PART = "probe"
CACHE_FORMAT = 2  # 2: entries carry a checksum


# --------------------------------------------------------------------------- embeddings, cached

@dataclass(frozen=True)
class EmbeddingRecipe:
    """How a scan becomes one vector (part of the cache key and of the task model)."""

    windows: WindowSettings = WindowSettings()
    aggregation: str = "mean"
    preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING

    def __post_init__(self) -> None:
        if self.aggregation not in AGGREGATIONS:
            raise LCTfoundError(f"unknown aggregation {self.aggregation!r}; choose one of: {', '.join(AGGREGATIONS)}")

    def as_dict(self) -> dict[str, Any]:
        windows = {k: v for k, v in self.windows.as_dict().items() if k != "batch_size"}  # batching changes nothing
        return {"windows": windows, "aggregation": self.aggregation, "preprocessing": self.preprocessing.as_dict()}

    @classmethod
    def from_dict(cls, data: dict[str, Any], batch_size: int = 2) -> "EmbeddingRecipe":
        w = data["windows"]
        return cls(WindowSettings(tuple(int(v) for v in w["window"]), float(w["overlap"]), batch_size,
                                  w.get("blend", "gaussian")),
                   data["aggregation"], CTFMPreprocessing.from_dict(data["preprocessing"]))


class EmbeddingCache:
    """Scan embeddings on disk (``<cache>/features/ctfm/<key>.safetensors``), keyed by the volume's
    content and geometry, the model's weights and the recipe. ``enabled=False`` always recomputes."""

    def __init__(self, model: CTFMModel, recipe: EmbeddingRecipe, root: Optional[Path] = None, enabled: bool = True):
        self.model, self.recipe, self.enabled = model, recipe, enabled
        self.root = Path(root) if root is not None else feature_cache_dir() / "ctfm"
        recipe_text = json.dumps({"format": CACHE_FORMAT, "model": model_fingerprint(model), **recipe.as_dict()},
                                 sort_keys=True)
        self._recipe_key = hashlib.sha256(recipe_text.encode()).hexdigest()

    def key(self, volume: CTVolume) -> str:
        return hashlib.sha256(f"{self._recipe_key}|{volume_fingerprint(volume)}".encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> Optional[np.ndarray]:
        from safetensors.torch import load_file

        path = self._path(key)
        if not self.enabled or not path.is_file():
            return None
        from safetensors import safe_open

        from ..cache import mark_used, slice_digest

        try:
            with safe_open(str(path), framework="pt") as handle:
                digest = (handle.metadata() or {}).get("blake2b", "")
            vector = load_file(str(path))["embedding"].numpy()
        except Exception:  # a damaged cache file is recomputed, never trusted
            return None
        if vector.shape != (self.model.embedding_dim,) or slice_digest(vector) != digest:
            logger.warning("embedding cache entry %s fails its checksum; recomputing it", path.name)
            return None
        mark_used(path)
        return vector

    def put(self, key: str, vector: np.ndarray, source: str = "") -> None:
        from safetensors.torch import save_file

        from ..cache import EMBEDDINGS_FOLDER, make_room, slice_digest

        if not self.enabled:
            return
        vector = np.ascontiguousarray(vector, dtype=np.float32)
        if self.root.name == EMBEDDINGS_FOLDER and not make_room(vector.nbytes + 4096, self.root.parent):
            return  # the cache is full of entries in use (or its limit is 0): keep nothing
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with atomic_file(self._path(key)) as tmp:
                save_file({"embedding": torch.from_numpy(vector)}, str(tmp),
                          metadata={"source": source, "recipe": json.dumps(self.recipe.as_dict()),
                                    "blake2b": slice_digest(vector)})
        except OSError as error:  # the embedding is in hand: a cache that cannot be written costs speed only
            logger.warning("embedding cache %s: cannot be written (%s)", self.root, error.strerror or error)

    def embed(self, volume: CTVolume, source: str = "",
              progress: Optional[Progress] = None) -> tuple[np.ndarray, str, bool]:
        """``(embedding, cache key, whether it came from the cache)``."""
        key = self.key(volume)
        vector = self.get(key)
        if vector is not None:
            return vector, key, True
        prepared = prepare_volume(volume, self.recipe.preprocessing)
        vector, _ = embed_volume(self.model, prepared, self.recipe.aggregation, self.recipe.windows, progress=progress)
        vector = np.asarray(vector, dtype=np.float32)
        self.put(key, vector, source)
        return vector, key, False


def embed_cases(cache: EmbeddingCache, paths: Sequence[str | Path], validate: bool = True,
                progress: Optional[Progress] = None,
                on_event: Optional[Callable[[dict], None]] = None) -> tuple[np.ndarray, list[str]]:
    """Embeddings [N, C] and cache keys of the volumes at ``paths`` (read, embedded or taken from the cache)."""
    progress = ensure_progress(progress)
    vectors, keys = [], []
    for number, path in enumerate(paths):
        progress.check_cancelled()
        progress.update(number, len(paths), f"embedding {Path(path).name}")
        volume = read_volume(path, validate=validate)
        vector, key, cached = cache.embed(volume, str(path), _windows_progress(progress, number, len(paths), path))
        vectors.append(vector)
        keys.append(key)
        if on_event is not None:
            on_event({"event": "embedding", "task": PROBE_TASK, "done": number + 1, "total": len(paths),
                      "case": volume_stem(path), "cached": cached})
    progress.update(len(paths), len(paths), "embeddings ready")
    return np.stack(vectors).astype(np.float32), keys


def _windows_progress(outer: Progress, number: int, total: int, path: str | Path) -> Progress:
    """The window loop of one case: cancellable, reported as the message of the per-case progress."""
    name = Path(path).name

    def report(done: int, windows: int, _message: str) -> None:
        outer.update(number, total, f"{name}: window {done}/{windows}")

    return Progress(report, cancel_token=outer.cancel_token)


# --------------------------------------------------------------------------- the probe

class ProbeHead(nn.Module):
    """A linear layer on standardised embeddings; the standardisation is stored with it."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        if num_classes < 2:
            raise LCTfoundError("a probe needs at least two classes")
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.linear = nn.Linear(dim, num_classes)

    def standardise_with(self, embeddings: np.ndarray) -> None:
        data = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        self.mean.copy_(data.mean(dim=0))
        self.scale.copy_(1.0 / data.std(dim=0, unbiased=False).clamp_min(1e-6))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.linear((embeddings - self.mean) * self.scale)


class EmbeddingDataset(torch.utils.data.Dataset):
    def __init__(self, embeddings: np.ndarray, classes: Sequence[int]):
        self.embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        self.classes = [int(c) for c in classes]

    def __len__(self) -> int:
        return len(self.classes)

    def __getitem__(self, item: int) -> dict:
        return {"embedding": self.embeddings[item], "labels": torch.tensor(self.classes[item]), "index": item}


class ProbeLossModule(nn.Module):
    def __init__(self, head: ProbeHead, class_weights: torch.Tensor):
        super().__init__()
        self.head = head
        self.loss = nn.CrossEntropyLoss(weight=class_weights)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(self.head(batch["embedding"]).float(), batch["labels"])


class ProbeTask(TrainingTask):
    """Train a linear probe on cached CT-FM embeddings; classes balanced by weighting the loss."""

    name = PROBE_TASK

    def __init__(self, model: CTFMModel, embeddings: np.ndarray, classes: Sequence[int], class_names: Sequence[str],
                 cases: Sequence[str], keys: Sequence[str], recipe: EmbeddingRecipe, name: Optional[str] = None,
                 description: str = "", table: Optional[str] = None):
        self.class_names = list(class_names)
        if len(self.class_names) < 2:
            raise LCTfoundError("a probe needs at least two classes")
        if not len(embeddings) == len(classes) == len(cases) == len(keys) or not len(cases):
            raise LCTfoundError("need the same, non-zero number of embeddings, classes and cases")
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.data = EmbeddingDataset(self.embeddings, classes)
        counts = np.bincount(self.data.classes, minlength=len(self.class_names)).astype(np.float64)
        self.class_weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32)
        self.cases, self.keys, self.recipe = list(cases), list(keys), recipe
        self.reference = backbone_reference(model)
        self.model_name, self.description, self.table = name, description, table

    def dataset(self) -> EmbeddingDataset:
        return self.data

    def describe(self) -> str:
        counts = np.bincount(self.data.classes, minlength=len(self.class_names))
        counted = strict_zip(self.class_names, counts)
        return f"{len(self.data)} scans; " + ", ".join(f"{n}: {c}" for n, c in counted)

    def build_module(self) -> ProbeLossModule:
        head = ProbeHead(self.embeddings.shape[1], len(self.class_names))
        head.standardise_with(self.embeddings)
        return ProbeLossModule(head, self.class_weights)

    def resume_settings(self) -> dict[str, Any]:
        fingerprint = hashlib.sha256(json.dumps([self.keys, self.data.classes]).encode()).hexdigest()
        return {"classes": self.class_names, "items": len(self.data), "recipe": self.recipe.as_dict(),
                "backbone_sha256": self.reference["weights_sha256"], "data_fingerprint": fingerprint}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.model_name, "description": self.description, "classes": self.class_names,
                "training_cases": self.cases, "table": self.table}

    def save_model(self, module: ProbeLossModule, folder: Path, metadata: dict[str, Any]) -> None:
        save_task_model(folder, PROBE_TASK, self.reference, {PART: module.head},
                        {**metadata, "probe": {"embedding_dim": int(self.embeddings.shape[1]),
                                               "num_classes": len(self.class_names), "kind": "linear",
                                               "standardised": True},
                         "embedding": self.recipe.as_dict(), "mode": "frozen"})

    def load_weights(self, module: ProbeLossModule, folder: Path) -> None:
        task_model = load_ctfm_task_model(folder, PROBE_TASK)
        require_parts(task_model, [PART])
        module.head.load_state_dict(task_model.parts[PART])


def read_probe_table(table: str | Path) -> tuple[list[Path], list[str], list[str]]:
    """(image paths, their class names, sorted class names) of a CSV with columns image,label."""
    from ..training.tables import read_case_table, table_path

    rows = read_case_table(table, ("image", "label"))
    missing = [row for row in rows if not row["image"] or not row["label"]]
    if missing:
        raise LCTfoundError(f"{Path(table).name}: a row lacks its image or label ({missing[0]})")
    class_names = sorted({row["label"] for row in rows})
    if len(class_names) < 2:
        raise LCTfoundError(f"{Path(table).name}: only one class ({class_names[0]!r}); a probe needs at least two")
    return [table_path(table, row["image"]) for row in rows], [row["label"] for row in rows], class_names


def train_probe(model: CTFMModel, table: str | Path, loop: LoopConfig, recipe: EmbeddingRecipe = EmbeddingRecipe(),
                cache_root: Optional[Path] = None, use_cache: bool = True, validate: bool = True,
                name: Optional[str] = None, description: str = "", resume: bool = False,
                progress: Optional[Progress] = None,
                on_event: Optional[Callable[[dict], None]] = None) -> TrainingResult:
    """Embed the table's scans (cached), then train the probe with the `TrainingLoop`."""
    output = Path(loop.output).expanduser()
    check_run_folder(output, resume)  # before the costly preparation
    paths, labels, class_names = read_probe_table(table)
    if loop.batch_size > len(paths):
        raise LCTfoundError(f"batch size {loop.batch_size} exceeds the {len(paths)} scans of {Path(table).name}; "
                            f"use a batch size of {len(paths)} or less",
                            option_hints={"batch_size": f"pass --batch-size {len(paths)} or less"})
    cache = EmbeddingCache(model, recipe, cache_root, enabled=use_cache)
    embeddings, keys = embed_cases(cache, paths, validate, progress, on_event)
    task = ProbeTask(model, embeddings, [class_names.index(label) for label in labels], class_names,
                     [volume_stem(p) for p in paths], keys, recipe, name, description, str(table))
    result = TrainingLoop(loop, task, resume, progress, on_event).run()
    if result.is_main_process:
        probe = LinearProbe.load(result.model_folder, model)
        predicted = probe.probabilities(embeddings).argmax(axis=1)
        result.extra["train_accuracy"] = float(np.mean(predicted == np.asarray(task.data.classes)))
    return result


# --------------------------------------------------------------------------- prediction

class LinearProbe:
    """A trained probe with its backbone, ready to classify volumes."""

    def __init__(self, head: ProbeHead, task_model: TaskModel, model: CTFMModel, batch_size: int = 2):
        self.head, self.task_model, self.model = head.eval(), task_model, model
        self.class_names: list[str] = list(task_model.info["classes"])
        self.recipe = EmbeddingRecipe.from_dict(task_model.info["embedding"], batch_size)

    @classmethod
    def load(cls, spec: str | Path, model: Optional[CTFMModel | str | Path] = None, device: str | torch.device = "cpu",
             batch_size: int = 2) -> "LinearProbe":
        """Load a ``ctfm-probe`` task model and its CT-FM backbone (``model`` or the referenced folder)."""
        task_model = load_ctfm_task_model(spec, PROBE_TASK)
        require_parts(task_model, [PART])
        backbone = backbone_for(task_model, model, device)
        settings = task_model.info["probe"]
        head = ProbeHead(int(settings["embedding_dim"]), int(settings["num_classes"]))
        head.load_state_dict(task_model.parts[PART])
        return cls(head, task_model, backbone, batch_size)

    @property
    def weights_sha256(self) -> str:
        return sha256_file(self.task_model.folder / f"{PART}.safetensors")

    @torch.no_grad()
    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        """Class probabilities [N, K] of embeddings [N, C]."""
        x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32)).reshape(-1, self.head.linear.in_features)
        return torch.softmax(self.head(x).float(), dim=1).numpy()

    def cache(self, root: Optional[Path] = None, enabled: bool = True) -> EmbeddingCache:
        return EmbeddingCache(self.model, self.recipe, root, enabled)

    def classify(self, volume: CTVolume, cache: Optional[EmbeddingCache] = None,
                 progress: Optional[Progress] = None) -> np.ndarray:
        """Class probabilities [K] of one volume."""
        cache = cache or self.cache(enabled=False)
        vector, _, _ = cache.embed(volume, str(volume.metadata.get("source", "")), progress)
        return self.probabilities(vector[None])[0]

    def row(self, case: str, source: str, probabilities: np.ndarray) -> dict[str, str]:
        """One prediction row in the columns of ``lctfound classify predict``."""
        reference = self.task_model.backbone
        return {"case": case, "input": source, "predicted": self.class_names[int(np.argmax(probabilities))],
                **{f"probability_{name}": f"{float(p):.6f}"
                   for name, p in strict_zip(self.class_names, probabilities)},
                "model": task_model_name(self.task_model),
                "model_sha256": self.weights_sha256, "backbone": reference.get("name") or "ctfm",
                "backbone_sha256": reference.get("weights_sha256") or "", "note": RESEARCH_NOTE}

    def columns(self) -> list[str]:
        return ["case", "input", "predicted", *[f"probability_{n}" for n in self.class_names], "model", "model_sha256",
                "backbone", "backbone_sha256", "note"]


def predict_probe(probe: LinearProbe, inputs: Sequence[str | Path], output: str | Path, validate: bool = True,
                  use_cache: bool = True, cache_root: Optional[Path] = None, overwrite: bool = False,
                  progress: Optional[Progress] = None) -> list[dict[str, str]]:
    """Classify every volume and write the predictions CSV atomically (nothing is written on failure)."""
    output = Path(output)
    if output.suffix.lower() != ".csv":
        raise LCTfoundError(f"{output}: predictions are written as a .csv file")
    if output.exists() and not overwrite:
        raise LCTfoundError(f"{output}: already exists; choose a new file",
                                option_hints={"overwrite": "or pass --overwrite to replace it"})
    progress = ensure_progress(progress)
    cache = probe.cache(cache_root, use_cache)
    rows = []
    for number, path in enumerate(inputs):
        progress.check_cancelled()
        progress.update(number, len(inputs), Path(path).name)
        volume = read_volume(path, validate=validate)
        probabilities = probe.classify(volume, cache, _windows_progress(progress, number, len(inputs), path))
        rows.append(probe.row(volume_stem(path), str(path), probabilities))
    progress.update(len(inputs), len(inputs), "done")
    with atomic_file(output) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, probe.columns())
        writer.writeheader()
        writer.writerows(rows)
    return rows

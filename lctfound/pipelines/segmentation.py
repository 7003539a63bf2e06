"""Few-shot segmentation on frozen LCTfound features (the paper's protocol, reference §6.1).

An annotator labels a few slices; `FewShotSegmenter.fit` trains the per-pixel MLP head
(`PixelMLPHead`, CE + focal loss, AdamW 1e-3, cosine decay) on the denoising features of those
slices only; `__call__` predicts every slice. Two recipes (`lctfound.pipelines.recipes`):
``official`` reproduces the paper's code (every pixel at the model's input size, batches of 4
augmented images through the backbone, 20 epochs); ``fast`` caches features per (volume, model,
feature recipe) on disk, slice by slice, so retraining after corrections and predicting again
reuse them: the second round costs the MLP, not the backbone.

Label arrays use -1 for "not labelled" (those slices are ignored); 0 is background.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_file
from ..cache import LIMIT_ENV, LOCK_NAME, EntryLock, cache_limit, slice_digest
from ..errors import LCTfoundError
from ..features import FeatureExtractor, FeatureSpec, human_bytes
from ..models.bundle import WEIGHTS_NAME, LCTfoundModel, locate_unet_folder
from ..models.task_models import TaskModel, backbone_reference, load_task_model, require_parts, save_task_model
from ..paths import feature_cache_dir
from ..progress import Progress, ensure_progress
from ..training.finetune import PixelMLPHead, official_head_widths
from .recipes import OFFICIAL_SETTINGS, official_augmentation, resolve_recipe, segmentation_loss, warmup_cosine_schedule

logger = logging.getLogger(__name__)

UNLABELLED = -1
TASK = "fewshot-segmentation"
#: The feature cache entry's index: shape and a checksum of every stored slice.
ENTRY_INDEX = "entry.json"
#: The entry's folder of per-slice feature files, ``<slice index>.npy`` (C, R, R) float16.
SLICES_FOLDER = "slices"
#: 3: one file per stored slice. Format 2 kept the whole volume in one ``features.npy`` with disk blocks
#: reserved for every slice (and format 1 added ``done.npy``); such an entry is emptied and rebuilt when
#: its volume is used again, and is evicted like any other entry until then.
ENTRY_FORMAT = 3
OLD_ENTRY_FILES = ("features.npy", "done.npy")


def volume_key(array: np.ndarray) -> str:
    """A content hash of a volume (shape, dtype and voxels): the cache key's volume part."""
    digest = hashlib.sha256(f"{array.shape}|{array.dtype}".encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def square_padding(height: int, width: int) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) padding that makes a height × width slice square, centred."""
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return top, side - height - top, left, side - width - left


def pad_to_square(volume: np.ndarray, value: float) -> np.ndarray:
    """Slices (K, H, W) padded with ``value`` to (K, S, S), S = max(H, W), centred; the volume itself
    when its slices are square. Resizing a square to the model's square input keeps the aspect ratio."""
    top, bottom, left, right = square_padding(*volume.shape[1:])
    if not (top or bottom or left or right):
        return volume
    return np.pad(np.asarray(volume), ((0, 0), (top, bottom), (left, right)), constant_values=value)


class FeatureCache:
    """Features of one volume under one model and recipe, computed slice by slice on demand.

    Each computed slice is its own file, ``slices/<index>.npy`` (C, R, R) float16, written atomically
    and read back before it is published; ``entry.json`` holds a checksum of every stored slice
    (replaced atomically after each batch). An entry so takes the bytes of the slices computed (a
    fit's labelled slices), not of the whole volume; an interrupted run keeps what it finished and a
    later call computes only the missing slices. A slice whose file no longer matches its checksum
    (truncated, zeroed, removed) is recomputed with a warning. The cache is bounded (`lctfound.cache`):
    room is made for the slices about to be written; when they do not fit under the limit, they are
    kept in memory for this run only.
    """

    def __init__(self, extractor: FeatureExtractor, volume: np.ndarray, root: Optional[Path] = None):
        self.extractor, self.volume = extractor, volume
        model = extractor.model
        weights = "random"
        if model.path is not None:
            from ..hashing import sha256_file

            weights = sha256_file(locate_unet_folder(model.path) / WEIGHTS_NAME)
        recipe = {"spec": asdict(extractor.spec), "resolution": extractor.resolution, "weights": weights}
        if extractor.precision != "fp32":  # bf16 features differ slightly; fp32 keys stay as they were
            recipe["precision"] = extractor.precision
        recipe = json.dumps(recipe, sort_keys=True)
        key = hashlib.sha256((volume_key(volume) + recipe).encode()).hexdigest()[:32]
        self.root = Path(root) if root is not None else feature_cache_dir()
        self.folder = self.root / key
        self.shape = (volume.shape[0], extractor.channels, extractor.resolution, extractor.resolution)
        self._opened = False
        self._digests: dict[int, str] = {}  # the slices stored on disk (the index)
        self._memory: dict[int, np.ndarray] = {}  # slices computed in this run that did not fit under the limit
        self._lock = EntryLock(self.folder)

    @property
    def slice_bytes(self) -> int:
        """Bytes of one slice's features (its file adds a header of 128 bytes)."""
        return int(np.prod(self.shape[1:])) * np.dtype(np.float16).itemsize

    def _slice_path(self, index: int) -> Path:
        return self.folder / SLICES_FOLDER / f"{index}.npy"

    # -- opening ---------------------------------------------------------------------------------

    def _open(self) -> None:
        if self._opened:
            return
        from ..cache import mark_used

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._lock.acquire()
        except OSError as error:
            raise self._write_error(error) from None
        self._opened = True
        self._digests = self._read_index()
        mark_used(self.folder)

    def _write_error(self, error: OSError, needed: Optional[int] = None) -> LCTfoundError:
        from ..atomic import disk_full_error, is_disk_full

        if is_disk_full(error):
            return disk_full_error(self.root, needed)
        return LCTfoundError(f"feature cache {self.root}: cannot be written ({error.strerror or error}); set "
                             "LCTFOUND_CACHE_DIR to a writable folder")

    def _read_index(self) -> dict[int, str]:
        """The stored slices' checksums. An entry of an older format (one whole-volume file) or with
        a damaged or foreign index is emptied, with a warning, and so rebuilt."""
        index_path = self.folder / ENTRY_INDEX
        old_files = [name for name in OLD_ENTRY_FILES if (self.folder / name).exists()]
        try:
            index = json.loads(index_path.read_text())
            stored_format = index.get("format")
            if old_files or (isinstance(stored_format, int) and stored_format < ENTRY_FORMAT):
                problem = "it has an older format (one file for the whole volume)"
            elif stored_format != ENTRY_FORMAT or list(index.get("shape", ())) != list(self.shape):
                problem = "its index does not match"
            else:
                return {int(k): str(v) for k, v in index.get("digests", {}).items() if 0 <= int(k) < self.shape[0]}
        except FileNotFoundError:
            if not old_files and not (self.folder / SLICES_FOLDER).exists():
                return {}  # a new entry
            problem = "it has no checksums"
        except (OSError, ValueError, TypeError, AttributeError) as error:
            problem = f"its index cannot be read ({error})"
        logger.warning("feature cache entry %s: %s; its features are computed again", self.folder.name, problem)
        for path in self.folder.iterdir():
            if path.name == LOCK_NAME:
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
        return {}

    # -- reading ---------------------------------------------------------------------------------

    def _load(self, slices: Sequence[int]) -> dict[int, np.ndarray]:
        """The intact features of ``slices`` held in memory or stored; stored slices that fail their
        checksum are dropped from the entry (with one warning) so they are computed again."""
        found, damaged = {}, []
        for s in dict.fromkeys(slices):
            if s in self._memory:
                found[s] = self._memory[s]
                continue
            digest = self._digests.get(s)
            if digest is None:
                continue
            value = self._read_slice(self._slice_path(s))
            if value is not None and slice_digest(value) == digest:
                found[s] = value
            else:
                damaged.append(s)
        if damaged:
            logger.warning("feature cache entry %s: %d slice(s) fail their checksum (damaged file); recomputing them",
                           self.folder.name, len(damaged))
            for s in damaged:
                del self._digests[s]
                with contextlib.suppress(OSError):
                    self._slice_path(s).unlink()
            try:
                self._write_index()
            except (LCTfoundError, OSError):
                pass  # the next store rewrites it; until then the damaged slices only fail again
        return found

    def _read_slice(self, path: Path) -> Optional[np.ndarray]:
        """A slice file's features, or None when it is missing, truncated or not of this entry's shape."""
        try:
            value = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        return value if value.shape == self.shape[1:] and value.dtype == np.float16 else None

    def get(self, slices: Sequence[int], batch_size: int = 1, progress: Optional[Progress] = None) -> np.ndarray:
        """Features (len(slices), C, R, R) float16, computing only what is not cached (or not intact)."""
        progress = ensure_progress(progress)
        slices = [int(s) for s in slices]
        self._open()
        found = self._load(slices)
        missing = [s for s in dict.fromkeys(slices) if s not in found]
        to_disk = bool(missing) and self._room_for(len(missing))
        computed = 0
        for batch, values in self.extractor.iter_volume(self.volume, missing, batch_size, out_dtype=torch.float16):
            batch_values = {int(s): value for s, value in zip(batch, values.numpy())}
            found.update(batch_values)
            if to_disk:
                self._store(batch_values)
            else:
                self._memory.update(batch_values)
            computed += len(batch)
            progress.update(computed, len(missing), f"features of slice {batch[-1]}")
            progress.check_cancelled()
        if not slices:
            return np.zeros((0, *self.shape[1:]), dtype=np.float16)
        return np.stack([found[s] for s in slices])

    def stored(self, slices: Sequence[int]) -> dict[int, np.ndarray]:
        """The intact stored features of ``slices`` ({slice: (C, R, R) float16}, in memory), without
        creating an entry or computing anything: what prediction reuses of a fit's cache."""
        if not self._opened:
            if not (self.folder / ENTRY_INDEX).is_file():
                return {}
            try:
                self._open()
            except LCTfoundError:
                return {}
        try:
            return self._load([int(s) for s in slices])
        finally:
            self.close()

    # -- writing ---------------------------------------------------------------------------------

    def _room_for(self, count: int) -> bool:
        """Make room under the limit for ``count`` new slice files. False (with a warning) when they
        do not fit: they are kept in memory for this run only, and an entry with nothing stored goes."""
        from ..cache import make_room

        needed = count * self.slice_bytes
        if make_room(needed, self.root, keep=[self.folder]):
            return True
        logger.warning("feature cache: %s of features do not fit under its limit (%s); keeping them in memory "
                       "for this run only (raise %s to keep them)", human_bytes(needed),
                       human_bytes(cache_limit()), LIMIT_ENV)
        if not self._digests:
            self._release()
        return False

    def _store(self, values: dict[int, np.ndarray]) -> None:
        """Publish one file per slice (each read back against its checksum first), then the index
        naming them. On a failure an entry with nothing stored is removed."""
        try:
            for s, value in values.items():
                digest = slice_digest(value)
                with atomic_file(self._slice_path(s), expected_bytes=value.nbytes,
                                 verify=lambda path, digest=digest: self._check_written(path, digest)) as tmp:
                    with open(tmp, "wb") as handle:
                        np.save(handle, value, allow_pickle=False)
                self._digests[s] = digest
            self._write_index()
        except (LCTfoundError, OSError) as error:
            if not (self.folder / ENTRY_INDEX).is_file():
                self._release()
            if isinstance(error, LCTfoundError):
                raise
            raise self._write_error(error, len(values) * self.slice_bytes) from None

    def _check_written(self, path: Path, digest: str) -> None:
        value = self._read_slice(path)
        if value is None or slice_digest(value) != digest:
            raise ValueError("it differs from the features written")

    def _write_index(self) -> None:
        index = {"format": ENTRY_FORMAT, "shape": list(self.shape), "dtype": "float16",
                 "digests": {str(k): v for k, v in sorted(self._digests.items())}}
        with atomic_file(self.folder / ENTRY_INDEX) as tmp:
            tmp.write_text(json.dumps(index))

    # -- the entry as a whole --------------------------------------------------------------------

    def describe(self) -> str:
        """One line: where the entry is and how much it takes on disk (and what stayed in memory)."""
        from ..cache import disk_bytes

        size = disk_bytes(self.folder) if self.folder.exists() else 0
        text = (f"feature cache: {self.cached_slices} slice(s), {human_bytes(size)} on disk in {self.folder} "
                f"(all entries limited to {human_bytes(cache_limit())}, {LIMIT_ENV})")
        if self._memory:
            text += f"; {len(self._memory)} slice(s) did not fit and were kept in memory for this run only"
        return text

    def close(self) -> None:
        """Release the entry (it may be evicted from now on) and the slices held in memory."""
        self._memory = {}
        self._release()

    def _release(self) -> None:
        """Release the lock; an entry left with nothing stored is removed (unless another process has it open)."""
        from ..cache import remove_unused_entry

        self._lock.release()
        if self._opened and not (self.folder / ENTRY_INDEX).is_file():
            remove_unused_entry(self.folder)
        self._opened, self._digests = False, {}

    @property
    def cached_slices(self) -> int:
        """Slices stored on disk."""
        try:
            index = json.loads((self.folder / ENTRY_INDEX).read_text())
            return len(index.get("digests", {})) if index.get("format") == ENTRY_FORMAT else 0
        except (OSError, ValueError, AttributeError):
            return 0


#: Channels `intensity_channels` adds, and the smoothing of the second one (pixels of the feature grid).
INTENSITY_CHANNELS = 2
INTENSITY_SIGMA = 2.0


def intensity_channels(hu_slices: np.ndarray, window: str, resolution: int) -> torch.Tensor:
    """(B, H, W) HU (square slices) → (B, 2, R, R): the HU in the window as [0, 1] (area-resized to the
    feature grid) and the same Gaussian-smoothed (σ = `INTENSITY_SIGMA` grid pixels), centred on 0."""
    from scipy import ndimage

    from ..preprocessing import window_to_unit

    unit = window_to_unit(np.asarray(hu_slices, dtype=np.float32), window, "fixed")[:, None]
    grey = F.interpolate(unit, size=(resolution, resolution), mode="area")[:, 0].numpy()
    smoothed = ndimage.gaussian_filter(grey, sigma=(0, INTENSITY_SIGMA, INTENSITY_SIGMA), mode="nearest")
    return torch.from_numpy(np.stack([grey, smoothed], axis=1) - 0.5).float()


def _to_native_grid(logits: torch.Tensor, height: int, width: int, padded: bool) -> torch.Tensor:
    """Logits on the feature grid → the slice's own height × width. ``padded``: the grid covers the
    slice padded to square (`pad_to_square`), so bilinear to that square, then crop the padding off."""
    if not padded or height == width:
        return F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
    top, _, left, _ = square_padding(height, width)
    side = max(height, width)
    logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
    return logits[..., top:top + height, left:left + width]


@dataclass
class FewShotConfig:
    """Settings of a few-shot model; `for_recipe` / `for_model` give a recipe's defaults."""

    timesteps: tuple[int, ...] = (0, 50, 100, 150)
    blocks: tuple[int, ...] = (1, 2, 3, 4)
    window: str = "mediastinal"
    #: Feature grid R; default: the model's input size (official), min(model size, 128) (fast, bounds the cache).
    resolution: Optional[int] = None
    epochs: int = 30
    #: With few labelled slices an epoch is a few optimiser steps: train at least this many steps
    #: (benchmarks/RESULTS.md: 30 epochs on one slice under-trained the head, Dice 0.19 vs 0.28).
    min_steps: int = 600
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    batch_pixels: int = 4096
    pixels_per_class_per_slice: int = 20000
    focal_gamma: float = 2.0
    #: On retraining, pixels the current model gets wrong (the annotator's corrections) count this much more.
    correction_weight: float = 5.0
    seed: int = 0
    #: ``official`` or ``fast`` (see `lctfound.pipelines.recipes`); the fields below are the official
    #: recipe's training settings (0 / None / False: not used by the fast recipe).
    recipe: str = "fast"
    focal_alpha: float = 0.25
    batch_images: int = 0
    warmup_steps: int = 0
    grad_clip: Optional[float] = None
    augment: bool = False
    #: Fast recipe: the head also reads two cheap intensity channels per pixel, the HU in the window
    #: and the same smoothed (`intensity_channels`); they carry most of what one labelled slice can
    #: teach (issue 15: k = 1 lost to a pixel MLP on HU + smoothed HU). Models saved before: off.
    intensity_features: bool = True

    def __post_init__(self) -> None:
        if self.recipe not in ("official", "fast"):
            raise LCTfoundError(f"unknown recipe {self.recipe!r}; choose official or fast")
        if self.recipe == "official":
            self.intensity_features = False  # the paper's head reads the backbone's features only

    @classmethod
    def for_recipe(cls, recipe: str, **overrides: Any) -> "FewShotConfig":
        """A recipe's settings; ``overrides`` that are None keep the recipe's value."""
        overrides = {key: value for key, value in overrides.items() if value is not None}
        if recipe == "official":
            settings = {key: value for key, value in OFFICIAL_SETTINGS.items() if key != "dropout"}
            return cls(**{**settings, "min_steps": 0, "recipe": "official", **overrides})
        return cls(**{"recipe": recipe, **overrides})

    @classmethod
    def for_model(cls, model: LCTfoundModel, recipe: Optional[str] = "auto", **overrides: Any) -> "FewShotConfig":
        """``recipe`` ``auto`` → official for the official backbone, fast otherwise."""
        return cls.for_recipe(resolve_recipe(recipe, model), **overrides)

    @property
    def official(self) -> bool:
        return self.recipe == "official"

    def feature_spec(self, model: LCTfoundModel) -> FeatureSpec:
        if self.official:
            return FeatureSpec(tuple(self.timesteps), tuple(self.blocks), self.window,
                               resolution=self.resolution or model.sample_size, seed=self.seed,
                               normalization="official-segmentation", resize="area")
        resolution = self.resolution or min(model.sample_size, 128)
        return FeatureSpec(tuple(self.timesteps), tuple(self.blocks), self.window, resolution=resolution, seed=self.seed)


@dataclass
class FitReport:
    slices: list[int]
    pixels: int
    corrected_pixels: int
    class_pixels: dict[str, int]
    final_loss: float
    losses: list[float] = field(default_factory=list)
    #: Epochs actually run, and the epochs asked for (the fast recipe raises them to reach ``min_steps``).
    epochs: int = 0
    requested_epochs: int = 0
    #: Where the features of the labelled slices are cached and how big that is (one line; "" if not cached).
    cache: str = ""

    @property
    def epochs_note(self) -> str:
        """One sentence when training ran more epochs than asked for (else '')."""
        if self.epochs <= self.requested_epochs:
            return ""
        return (f"ran {self.epochs} epochs instead of the {self.requested_epochs} asked for: with "
                f"{len(self.slices)} labelled slice(s) an epoch is only a few steps, and the fast recipe trains "
                "at least its minimum number of steps")


class FewShotSegmenter:
    """``fit(volume, labels)`` on a few labelled slices, then ``segmenter(volume)`` for all of them."""

    def __init__(self, model: LCTfoundModel, label_names: dict[int, str], config: FewShotConfig = FewShotConfig(),
                 head: Optional[PixelMLPHead] = None):
        names = {int(k): v for k, v in label_names.items() if int(k) != 0}
        if not names:
            raise LCTfoundError("name at least one structure to segment (label 1 or above)")
        self.model, self.config = model, config
        self.class_values = [0] + sorted(names)
        self.label_names = names
        self.extractor = FeatureExtractor(model, config.feature_spec(model))
        self._trained = head is not None
        self.head = head if head is not None else self.new_head()
        #: ``{"volume": volume_key, "seeds": annotation_seeds}`` of the last `fit` (kept in the saved model).
        self.annotation: Optional[dict[str, Any]] = None

    def model_volume(self, hu_volume: np.ndarray) -> np.ndarray:
        """What the backbone sees: the fast recipe pads slices to square with the window's low value
        (air, once windowed) so features see the body undistorted; the official recipe resizes as the
        paper's code does."""
        if self.config.official:
            return hu_volume
        from ..windows import get_window

        low = get_window(self.config.window).low
        if np.issubdtype(np.asarray(hu_volume[:0]).dtype, np.integer):
            low = np.floor(low)
        return pad_to_square(hu_volume, low)

    def annotation_for(self, hu_volume: np.ndarray) -> Optional[np.ndarray]:
        """The training annotation's seed points as a label volume when ``hu_volume`` is the volume
        this model was trained on, else None."""
        if not self.annotation or self.annotation.get("volume") != volume_key(hu_volume):
            return None
        return seeds_volume(hu_volume.shape, self.annotation.get("seeds", []))

    def new_head(self) -> PixelMLPHead:
        """An untrained head whose start depends on ``config.seed`` only, not on earlier work in the process."""
        with torch.random.fork_rng():
            torch.manual_seed(self.config.seed)
            widths = official_head_widths(len(self.class_values)) if self.config.official else None
            return PixelMLPHead(self.head_inputs, len(self.class_values), widths=widths)

    @property
    def head_inputs(self) -> int:
        """Values per pixel the head reads: the backbone's channels (+ the intensity channels)."""
        return self.extractor.channels + (INTENSITY_CHANNELS if self.config.intensity_features else 0)

    def head_features(self, features: torch.Tensor | np.ndarray, model_volume: np.ndarray,
                      slices: Sequence[int]) -> torch.Tensor:
        """The head's input (B, head_inputs, R, R) float32 from backbone features of ``slices`` of the
        padded volume `model_volume`."""
        features = torch.as_tensor(np.asarray(features) if isinstance(features, np.ndarray) else features).float()
        if not self.config.intensity_features:
            return features
        extra = intensity_channels(np.asarray(model_volume[list(slices)]), self.config.window, features.shape[-1])
        return torch.cat([features, extra], dim=1)

    # ------------------------------------------------------------------ training
    def _training_rows(self, features: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
        resolution = self.extractor.resolution
        lookup = {value: index for index, value in enumerate(self.class_values)}
        rows, targets = [], []
        for slice_features, slice_labels in zip(features, labels):
            small = F.interpolate(torch.as_tensor(slice_labels, dtype=torch.float32)[None, None],
                                  size=(resolution, resolution), mode="nearest-exact")[0, 0].numpy().astype(np.int64)
            flat_labels = small.reshape(-1)
            flat_features = slice_features.reshape(slice_features.shape[0], -1)
            for value, index in lookup.items():
                where = np.flatnonzero(flat_labels == value)
                if where.size == 0:
                    continue
                take = rng.choice(where, size=min(where.size, self.config.pixels_per_class_per_slice), replace=False)
                rows.append(flat_features[:, take].T)
                targets.append(np.full(take.size, index, dtype=np.int64))
        return np.concatenate(rows).astype(np.float32), np.concatenate(targets)

    def fit(self, hu_volume: np.ndarray, labels: np.ndarray, progress: Optional[Progress] = None,
            cache_root: Optional[Path] = None) -> FitReport:
        """Train the head on the slices of ``labels`` that hold any value ≥ 0 (−1 = not labelled)."""
        progress = ensure_progress(progress)
        if labels.shape != hu_volume.shape:
            raise LCTfoundError(f"labels {labels.shape} are not on the volume's grid {hu_volume.shape}")
        labelled = [int(k) for k in range(labels.shape[0]) if (labels[k] >= 0).any()]
        if not labelled:
            raise LCTfoundError("no labelled slice: paint the structure on at least one slice first")
        unknown = sorted(set(np.unique(labels[labelled])) - set(self.class_values) - {UNLABELLED})
        if unknown:
            raise LCTfoundError(f"label value {unknown[0]} has no name in this segmenter")
        if not any((labels[k] > 0).any() for k in labelled):
            raise LCTfoundError("the labelled slices hold only background: paint the structure on a slice")
        # Where the annotator painted, on this volume: prediction on it is kept to that extent and
        # to the components touching the paint (`annotation_for`).
        self.annotation = {"volume": volume_key(hu_volume), "seeds": annotation_seeds(np.asarray(labels))}
        if self.config.official:
            return self._fit_official(hu_volume, labels, labelled, progress)
        model_volume = self.model_volume(hu_volume)
        cache = FeatureCache(self.extractor, model_volume, cache_root)
        features = self.head_features(cache.get(labelled, progress=progress), model_volume, labelled).numpy()
        rng = np.random.default_rng(self.config.seed)
        rows, targets = self._training_rows(features, pad_to_square(labels[labelled], UNLABELLED), rng)
        x_all, y_all = torch.from_numpy(rows), torch.from_numpy(targets)
        weights = torch.ones(len(rows))
        if self._trained:
            with torch.no_grad():
                current = torch.cat([self.head.eval()(chunk).argmax(1) for chunk in x_all.split(65536)])
            weights[current != y_all] = self.config.correction_weight
        torch.manual_seed(self.config.seed)
        head = self.head.train()
        optimizer = torch.optim.AdamW(head.parameters(), lr=self.config.learning_rate,
                                      weight_decay=self.config.weight_decay)
        steps_per_epoch = max(1, int(np.ceil(len(rows) / self.config.batch_pixels)))
        epochs = max(self.config.epochs, int(np.ceil(self.config.min_steps / steps_per_epoch)))
        total = steps_per_epoch * epochs
        schedule = warmup_cosine_schedule(optimizer, self.config.warmup_steps, total)
        losses = []
        for epoch in range(epochs):
            order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.config.seed + epoch))
            epoch_loss = 0.0
            for start in range(0, len(rows), self.config.batch_pixels):
                index = order[start:start + self.config.batch_pixels]
                if len(index) < 2:
                    continue  # BatchNorm needs two rows
                logits = head(x_all[index])
                loss = segmentation_loss(logits, y_all[index], self.config.focal_alpha, self.config.focal_gamma,
                                         weights[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(head.parameters(), self.config.grad_clip)
                optimizer.step()
                schedule.step()
                epoch_loss += float(loss.detach()) * len(index)
            losses.append(epoch_loss / len(rows))
            progress.update(epoch + 1, epochs, f"head epoch {epoch + 1}, loss {losses[-1]:.4f}")
            progress.check_cancelled()
        head.eval()
        self._trained = True
        counts = np.bincount(targets, minlength=len(self.class_values))
        class_pixels = {("background" if v == 0 else self.label_names[v]): int(c)
                        for v, c in zip(self.class_values, counts)}
        return FitReport(labelled, len(rows), int((weights > 1).sum()), class_pixels, losses[-1], losses,
                         epochs=epochs, requested_epochs=self.config.epochs, cache=cache.describe())

    def _fit_official(self, hu_volume: np.ndarray, labels: np.ndarray, labelled: list[int],
                      progress: Progress) -> FitReport:
        """The original training loop (main_seg.py:125-165): per step, a batch of 4 labelled slices
        (shuffled, the last incomplete batch dropped) is augmented, noised with a fresh ε and run
        through the backbone; the head classifies every pixel at the model's input size."""
        from ..preprocessing import resize_images, window_to_unit

        config, size = self.config, self.extractor.resolution
        structures = self.class_values[1:]
        # Image in [0, 1] and per-structure cover fractions at the model's size, as the original
        # loader's Resized (area) left them before augmentation.
        unit = resize_images(window_to_unit(np.asarray(hu_volume[labelled]), config.window, "official-segmentation")[:, None],
                             size, "area")[:, 0]
        slice_labels = torch.as_tensor(np.asarray(labels[labelled]), dtype=torch.long)
        cover = torch.stack([torch.nn.functional.interpolate((slice_labels == value).float()[:, None], size=(size, size),
                                                             mode="area")[:, 0] for value in structures], dim=1)
        batch_images = max(1, config.batch_images)
        count = len(labelled)
        batches_per_epoch = max(1, count // batch_images)  # drop_last, but never zero batches
        total = batches_per_epoch * config.epochs
        torch.manual_seed(config.seed)
        device = self.model.device
        head = self.head.to(device).train()  # dropout on and batch statistics, as the original trains
        optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
        schedule = warmup_cosine_schedule(optimizer, config.warmup_steps, total)
        augmentation = official_augmentation() if config.augment else None
        noise_generator = torch.Generator().manual_seed(config.seed)
        losses, step = [], 0
        try:
            for epoch in range(config.epochs):
                order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed + epoch)).tolist()
                epoch_loss = 0.0
                for batch_index in range(batches_per_epoch):
                    members = order[batch_index * batch_images:(batch_index + 1) * batch_images]
                    images, covers = unit[members], cover[members]
                    if augmentation is not None:
                        images, covers = self._augment(augmentation, images, covers, (config.seed, epoch, batch_index))
                    targets = self._full_cover_targets(covers)
                    x0 = ((images - 0.5) / 0.5)[:, None].expand(-1, 3, -1, -1)
                    noise = torch.randn(x0.shape, generator=noise_generator)
                    features = self.extractor(x0, [labelled[m] for m in members], torch.float16, noise=noise)
                    rows = features.to(device).permute(0, 2, 3, 1).reshape(-1, features.shape[1]).float()
                    del features
                    loss = segmentation_loss(head(rows), targets.reshape(-1).to(device), config.focal_alpha,
                                             config.focal_gamma)
                    del rows
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.grad_clip:
                        torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
                    optimizer.step()
                    schedule.step()
                    step += 1
                    epoch_loss += float(loss.detach())
                    progress.update(step, total, f"epoch {epoch + 1}, batch {batch_index + 1}, loss {float(loss.detach()):.4f}")
                    progress.check_cancelled()
                losses.append(epoch_loss / batches_per_epoch)
        finally:
            head.cpu()
        head.eval()
        self._trained = True
        targets_all = self._full_cover_targets(cover)
        counts = np.bincount(targets_all.reshape(-1).numpy(), minlength=len(self.class_values))
        class_pixels = {("background" if v == 0 else self.label_names[v]): int(c)
                        for v, c in zip(self.class_values, counts)}
        return FitReport(labelled, int(targets_all.numel()), 0, class_pixels, losses[-1], losses,
                         epochs=config.epochs, requested_epochs=config.epochs)

    @staticmethod
    def _full_cover_targets(covers: torch.Tensor) -> torch.Tensor:
        """Class index per pixel: structure k+1 where its cover is complete (the original's ``.long()``
        truncation of the area-resized label), else background."""
        targets = torch.zeros((covers.shape[0], *covers.shape[2:]), dtype=torch.long)
        for channel in range(covers.shape[1]):
            targets[covers[:, channel] >= 1.0] = channel + 1
        return targets

    @staticmethod
    def _augment(augmentation, images: torch.Tensor, covers: torch.Tensor, key: tuple[int, ...]):
        """The original's random flips and rotation, per image, seeded by (seed, epoch, batch)."""
        seed = int(np.random.default_rng(list(key)).integers(0, 2**31 - 1))
        augmentation.set_random_state(seed=seed)
        out_images, out_covers = [], []
        for image, cover in zip(images, covers):
            item = augmentation({"image": image[None].clone(), "label": cover.clone()})
            out_images.append(torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)[0])
            out_covers.append(torch.as_tensor(np.asarray(item["label"]), dtype=torch.float32))
        return torch.stack(out_images), torch.stack(out_covers)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_probabilities(self, hu_volume: np.ndarray, slices: Optional[Sequence[int]] = None,
                              progress: Optional[Progress] = None, cache_root: Optional[Path] = None,
                              batch_size: int = 1):
        """Yield ``(slice index, probabilities (K, H, W))`` on the native grid, slice by slice."""
        progress = ensure_progress(progress)
        slices = list(range(hu_volume.shape[0])) if slices is None else [int(s) for s in slices]
        # Streamed: features are computed per batch, classified and dropped, never cached (a whole
        # volume's features are GBs; the official grid is 0.5 GB per slice in fp16). Only slices a fit
        # stored (the labelled ones, what retraining needs) are read back from the cache.
        model_volume = self.model_volume(hu_volume)
        cache = None if self.config.official else FeatureCache(self.extractor, model_volume, cache_root)
        stored = cache.stored(slices) if cache is not None else {}
        head = self.head.eval()
        height, width = hu_volume.shape[1:]
        for done, first in enumerate(range(0, len(slices), batch_size)):
            batch = slices[first:first + batch_size]
            if cache is None:
                features = self.extractor(self.extractor.prepare(np.asarray(hu_volume[batch])), batch)
            else:
                features = self.head_features(self._stream_features(model_volume, batch, stored), model_volume, batch)
            channels, resolution = features.shape[1], features.shape[-1]
            rows = features.permute(0, 2, 3, 1).reshape(-1, channels)
            logits = head(rows).reshape(len(batch), resolution, resolution, -1).permute(0, 3, 1, 2)
            logits = _to_native_grid(logits, height, width, padded=cache is not None)
            for index, slice_logits in zip(batch, torch.softmax(logits, dim=1)):
                yield index, slice_logits.numpy()
            progress.update(min(first + batch_size, len(slices)), len(slices), f"slice {batch[-1]}")
            progress.check_cancelled()

    def _stream_features(self, hu_volume: np.ndarray, batch: list[int], stored: dict[int, np.ndarray]) -> np.ndarray:
        """Features (len(batch), C, R, R) float16 as `FeatureCache.get` gives them: stored ones reused,
        the others computed now and not kept."""
        missing = [s for s in batch if s not in stored]
        fresh: dict[int, np.ndarray] = {}
        for done, values in self.extractor.iter_volume(hu_volume, missing, max(1, len(missing)),
                                                       out_dtype=torch.float16):
            fresh.update(zip((int(s) for s in done), values.numpy()))
        return np.stack([stored[s] if s in stored else fresh[s] for s in batch])

    def __call__(self, hu_volume: np.ndarray, progress: Optional[Progress] = None,
                 cache_root: Optional[Path] = None, postprocess: Sequence[str] = (),
                 slices: Optional[Sequence[int]] = None, annotation: Optional[np.ndarray] = None) -> np.ndarray:
        """Label values (K, H, W) for the volume; only ``slices`` are predicted (default all, the others
        are background). ``postprocess`` and ``annotation``: see `postprocess_labels`."""
        values = np.asarray(self.class_values, dtype=np.uint8 if max(self.class_values) < 256 else np.uint16)
        out = np.zeros(hu_volume.shape, dtype=values.dtype)
        for index, probabilities in self.predict_probabilities(hu_volume, slices, progress=progress,
                                                               cache_root=cache_root):
            out[index] = values[probabilities.argmax(0)]
        return postprocess_labels(out, postprocess, annotation) if postprocess else out

    # ------------------------------------------------------------------ storage
    def save(self, folder: str | Path, extra: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
        info = {"labels": {str(k): v for k, v in self.label_names.items()}, "class_values": self.class_values,
                "fewshot": {**asdict(self.config), "feature_channels": self.extractor.channels,
                            "feature_resolution": self.extractor.resolution},
                "head_widths": list(self.head.widths),
                "preprocessing": {"window": self.config.window, "normalization": self.extractor.spec.normalization,
                                  "resize": self.extractor.spec.resize, "size": self.model.sample_size},
                **({"annotation": self.annotation} if self.annotation else {}),
                **(extra or {})}
        return save_task_model(folder, TASK, backbone_reference(self.model), {"head": self.head}, info,
                               overwrite=overwrite)

    @classmethod
    def load(cls, folder: str | Path, model: LCTfoundModel) -> "FewShotSegmenter":
        task_model: TaskModel = load_task_model(folder, TASK)
        task_model.check_backbone(model)
        require_parts(task_model, ["head"])
        settings = dict(task_model.info["fewshot"])
        channels = settings.pop("feature_channels")
        settings.pop("feature_resolution", None)
        settings.setdefault("intensity_features", False)  # saved before the intensity channels existed
        config = FewShotConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
        names = {int(k): v for k, v in task_model.info["labels"].items()}
        widths = task_model.info.get("head_widths")  # absent in models saved before recipes: the scaled widths
        head = PixelMLPHead(channels + (INTENSITY_CHANNELS if config.intensity_features else 0), len(names) + 1,
                            widths=widths)
        head.load_state_dict(task_model.parts["head"])
        segmenter = cls(model, names, config, head.eval())
        segmenter.annotation = task_model.info.get("annotation")
        if segmenter.extractor.channels != channels:
            raise LCTfoundError(f"{folder}: its head expects {channels} feature channels, this backbone gives "
                                f"{segmenter.extractor.channels}")
        return segmenter


POSTPROCESSING = ("connected", "largest", "fill", "smooth")
#: The post-processing `segment predict` and the panels apply unless told otherwise.
DEFAULT_POSTPROCESSING = ("connected",)


def postprocess_labels(labels: np.ndarray, steps: Sequence[str], annotation: Optional[np.ndarray] = None) -> np.ndarray:
    """Per structure: ``connected`` keeps the 3D connected components that touch the annotator's
    voxels of that structure in ``annotation`` (label values on the same grid; without any, the
    largest component), ``largest`` connected component, ``fill`` holes (per slice), ``smooth``
    (binary opening+closing)."""
    from scipy import ndimage

    unknown = [s for s in steps if s not in POSTPROCESSING]
    if unknown:
        raise LCTfoundError(f"unknown post-processing {unknown[0]!r}; choose from {', '.join(POSTPROCESSING)}")
    if annotation is not None and annotation.shape != labels.shape:
        raise LCTfoundError(f"the annotation {annotation.shape} is not on the prediction's grid {labels.shape}")
    out = np.zeros_like(labels)
    for value in [int(v) for v in np.unique(labels) if v != 0]:
        mask = labels == value
        if "smooth" in steps:
            structure = ndimage.generate_binary_structure(3, 1)
            mask = ndimage.binary_closing(ndimage.binary_opening(mask, structure), structure)
        if "connected" in steps and mask.any():
            mask = _touching_annotation(mask, None if annotation is None else annotation == value)
        if "largest" in steps and mask.any():
            mask = _largest_component(mask)
        if "fill" in steps:
            mask = np.stack([ndimage.binary_fill_holes(s) for s in mask])
        out[mask & (out == 0)] = value
    return out


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = np.bincount(components.ravel())[1:]
    return components == (int(np.argmax(sizes)) + 1)


def _touching_annotation(mask: np.ndarray, annotated: Optional[np.ndarray]) -> np.ndarray:
    """The 3D components of ``mask`` holding an annotated voxel; the largest one when none is annotated
    (a volume the annotator never painted) or no component reaches the annotation."""
    from scipy import ndimage

    if annotated is None or not annotated.any():
        return _largest_component(mask)
    components, _ = ndimage.label(mask)
    touching = np.unique(components[annotated & mask])
    touching = touching[touching > 0]
    if touching.size == 0:
        return _largest_component(mask)
    return np.isin(components, touching)


# ------------------------------------------------------------------------------ annotated extent

def annotated_extent(annotation: np.ndarray) -> Optional[tuple[int, int]]:
    """First and last slice of ``annotation`` (label values; 0 and −1 are no structure) holding a structure."""
    holding = np.flatnonzero((np.asarray(annotation) > 0).reshape(annotation.shape[0], -1).any(axis=1))
    if holding.size == 0:
        return None
    return int(holding[0]), int(holding[-1])


def parse_extent_margin(text: str | float | int, slice_spacing: float) -> int:
    """A margin in slices from ``"3"`` (slices) or ``"15mm"`` (millimetres along the slice axis, rounded up)."""
    value = str(text).strip().lower()
    try:
        if value.endswith("mm"):
            millimetres = float(value[:-2])
            if millimetres < 0 or not np.isfinite(millimetres):
                raise ValueError
            return int(np.ceil(millimetres / max(float(slice_spacing), 1e-6) - 1e-9))
        slices = int(value)
        if slices < 0:
            raise ValueError
        return slices
    except ValueError:
        raise LCTfoundError(f"extent margin {text!r}: give a number of slices (e.g. 3) or millimetres "
                            "(e.g. 15mm), not negative") from None


def prediction_slices(slice_count: int, annotation: Optional[np.ndarray], margin: int) -> list[int]:
    """The slices to predict: the annotated extent ± ``margin`` slices, or all when nothing is annotated."""
    extent = None if annotation is None else annotated_extent(annotation)
    if extent is None:
        return list(range(slice_count))
    return list(range(max(0, extent[0] - margin), min(slice_count, extent[1] + margin + 1)))


def annotation_seeds(labels: np.ndarray) -> list[list[int]]:
    """``[slice, row, column, value]`` of one inside point (the farthest from the border) of every 2D
    component of every structure the annotator painted: a few numbers that stand for the annotation
    in a saved model (its extent and the components `connected` keeps)."""
    from scipy import ndimage

    seeds = []
    for k in np.flatnonzero((labels > 0).reshape(labels.shape[0], -1).any(axis=1)):
        for value in [int(v) for v in np.unique(labels[k]) if v > 0]:
            components, count = ndimage.label(labels[k] == value)
            distance = ndimage.distance_transform_edt(components > 0)
            for index in range(1, count + 1):
                inside = np.where(components == index, distance, -1.0)
                row, column = np.unravel_index(int(np.argmax(inside)), inside.shape)
                seeds.append([int(k), int(row), int(column), value])
    return seeds


def seeds_volume(shape: Sequence[int], seeds: Sequence[Sequence[int]]) -> np.ndarray:
    """A label volume holding only the seed points of `annotation_seeds`."""
    volume = np.zeros(tuple(shape), dtype=np.int16)
    for k, row, column, value in seeds:
        if 0 <= k < shape[0] and 0 <= row < shape[1] and 0 <= column < shape[2]:
            volume[k, row, column] = value
    return volume

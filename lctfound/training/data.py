"""Slices for diffusion pretraining, streamed lazily from a folder of CT volumes or slices.

Sources are found once (headers only: no voxel data is read while indexing), so memory does
not grow with the number of slices. A volume is read when one of its slices is first needed
and kept in a small LRU cache; the sampler visits volumes in shuffled blocks so that cache
hits are the rule even for large data sets. Unreadable files are skipped, counted and reported.

Every item is a deterministic function of (seed, epoch, item index): the augmentation random
state and the condition dropout are seeded from them, and the sampler's order from
(seed, epoch). A resumed run therefore sees exactly the data an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..errors import InputError
from ..io.dicom import VOLUME_EXTENSIONS, looks_like_dicom
from ..preprocessing import unit_to_model, window_to_unit
from ..windows import NULL_PROMPT, WINDOWS, get_window

log = logging.getLogger(__name__)

SLICE_EXTENSIONS = (".npy", ".npz")


@dataclass
class SliceSource:
    path: Path
    kind: str  # "volume" | "dicom" | "slice"
    num_slices: int


@dataclass
class SourceIndex:
    """The slice sources of a data folder, with what was skipped and why."""

    root: Path
    sources: list[SliceSource]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    @property
    def num_slices(self) -> int:
        return sum(source.num_slices for source in self.sources)

    def summary(self) -> str:
        text = f"{len(self.sources)} source(s), {self.num_slices} slices"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable file(s), e.g. {self.skipped[0][0]}: {self.skipped[0][1]}"
        return text


def _volume_slices(path: Path) -> int:
    """Slices of a CT volume file or DICOM series folder, read once with the project's checks (header
    against file, finite values, CT in HU), so that an MR or broken volume is never trained on."""
    from ..io.volume import read_volume

    return int(read_volume(path).shape[0])


def _slice_shape(path: Path) -> tuple[int, ...]:
    if path.suffix == ".npy":
        return tuple(np.load(path, mmap_mode="r", allow_pickle=False).shape)
    with np.load(path, allow_pickle=False) as archive:
        key = "im" if "im" in archive.files else archive.files[0]
        return tuple(archive[key].shape)


#: File names skipped by default: label maps and masks stored beside the CTs.
DEFAULT_EXCLUDE = ("*label*", "*seg*", "*mask*")


def index_sources(root: str | os.PathLike, exclude: Sequence[str] = DEFAULT_EXCLUDE) -> SourceIndex:
    """Find volumes (NIfTI, NRRD, MHA, DICOM series folders) and 2D slice files under ``root``.

    Files whose name matches one of the ``exclude`` glob patterns (case-insensitive; label maps
    and masks by default) are left out.
    """
    from fnmatch import fnmatch

    root = Path(root).expanduser()
    if not root.exists():
        raise InputError(f"{root}: no such folder")
    if root.is_file():
        paths, dicom_dirs = [root], []
    else:
        paths, dicom_dirs = [], []
        for folder, _dirs, files in os.walk(root):
            files = sorted(f for f in files if not f.startswith("."))
            folder_path = Path(folder)
            if any(f.lower().endswith((".dcm", ".dicom", ".ima")) for f in files) or (
                files and not any(f.lower().endswith(VOLUME_EXTENSIONS + SLICE_EXTENSIONS) for f in files)
                and looks_like_dicom(folder_path / files[0])
            ):
                dicom_dirs.append(folder_path)
                continue
            paths.extend(folder_path / f for f in files)
    paths = [p for p in paths if not any(fnmatch(p.name.lower(), pattern.lower()) for pattern in exclude)]
    sources: list[SliceSource] = []
    skipped: list[tuple[str, str]] = []
    for path in sorted(paths):
        name = path.name.lower()
        try:
            if name.endswith(VOLUME_EXTENSIONS):
                sources.append(SliceSource(path, "volume", _volume_slices(path)))
            elif name.endswith(SLICE_EXTENSIONS):
                shape = _slice_shape(path)
                if len(shape) != 2:
                    raise InputError(f"a slice file must hold a 2D array, got shape {shape}")
                sources.append(SliceSource(path, "slice", 1))
        except Exception as error:  # any unusable file is skipped and reported, never fatal
            skipped.append((str(path), _reason(error, path)))
    for folder in sorted(dicom_dirs):
        try:
            sources.append(SliceSource(folder, "dicom", _volume_slices(folder)))
        except Exception as error:
            skipped.append((str(folder), _reason(error, folder)))
    if not sources:
        detail = f" ({len(skipped)} unusable file(s), e.g. {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        raise InputError(f"{root}: no CT volumes or slice files found{detail}")
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    return SourceIndex(root, sources, skipped)


def _reason(error: BaseException, path: Path) -> str:
    """Why a source was skipped, without repeating its path."""
    text = " ".join(str(error).split())
    if text.startswith(f"{path}: "):
        text = text[len(str(path)) + 2:]
    return text[:200] or type(error).__name__


def _load_slice_file(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    with np.load(path, allow_pickle=False) as archive:
        return archive["im" if "im" in archive.files else archive.files[0]]


@dataclass(frozen=True)
class AugmentConfig:
    """The official pretraining augmentations (reference §4); ``enabled=False`` only resizes."""

    enabled: bool = True
    roi_scale: float = 0.9
    max_roi_scale: float = 1.1
    flip_prob: float = 0.5
    rotate90_prob: float = 0.3
    contrast_prob: float = 0.1
    gamma: tuple[float, float] = (0.97, 1.03)
    #: Train on random square patches of this size cut from the resized slice (None: whole slice).
    #: Keeps the pixel scale of full-size inference while cutting CPU cost by (size/patch)².
    patch_size: int | None = None


def build_augmentation(size: int, config: AugmentConfig):
    """MONAI transforms on a (1, H, W) [0, 1] slice, in the official order."""
    from monai.transforms import (Compose, RandAdjustContrast, RandFlip, RandRotate90, RandScaleCrop,
                                  RandSpatialCrop, Resize)

    resize = Resize((size, size), mode="bilinear", anti_aliasing=True)
    patch = ([RandSpatialCrop((config.patch_size, config.patch_size), random_size=False)]
             if config.patch_size and config.patch_size < size else [])
    if not config.enabled:
        return Compose([resize, *patch])
    return Compose([
        RandScaleCrop(roi_scale=config.roi_scale, max_roi_scale=config.max_roi_scale, random_size=True),
        resize,
        *patch,
        RandFlip(prob=config.flip_prob, spatial_axis=0),
        RandFlip(prob=config.flip_prob, spatial_axis=1),
        RandRotate90(prob=config.rotate90_prob),
        RandAdjustContrast(prob=config.contrast_prob, gamma=config.gamma),
    ])


class CTSliceDataset(Dataset):
    """Items = (slice, window) pairs: each slice is seen once per window per epoch.

    ``__getitem__`` returns ``{"pixel_values": (3, S, S) in [−1, 1], "prompt": str}``; the prompt
    is the window's official sentence, or the null prompt with probability ``condition_dropout``.
    """

    def __init__(self, index: SourceIndex, size: int = 256, windows: Sequence[str] = tuple(WINDOWS),
                 augment: AugmentConfig = AugmentConfig(), condition_dropout: float = 0.05, seed: int = 0,
                 cache_bytes: int = 1 << 30):
        self.index = index
        self.size = int(size)
        self.windows = [get_window(w) for w in windows]
        self.window_names = list(windows)
        self.augment_config = augment
        self.condition_dropout = float(condition_dropout)
        self.seed = int(seed)
        self.output_size = augment.patch_size if augment.patch_size and augment.patch_size < self.size else self.size
        self.epoch = 0
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._offsets = np.cumsum([0] + [s.num_slices * len(self.windows) for s in index.sources])
        self.read_failures = 0

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def items_per_source(self) -> list[int]:
        return np.diff(self._offsets).astype(int).tolist()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def locate(self, item: int) -> tuple[int, int, int]:
        """Item index → (source, slice, window)."""
        source = int(np.searchsorted(self._offsets, item, side="right") - 1)
        local = item - int(self._offsets[source])
        return source, local // len(self.windows), local % len(self.windows)

    def _volume(self, source_index: int) -> np.ndarray:
        if source_index in self._cache:
            self._cache.move_to_end(source_index)
            return self._cache[source_index]
        from ..io.volume import read_volume

        source = self.index.sources[source_index]
        array = np.asarray(read_volume(source.path, validate=False).array)
        self._cache[source_index] = array
        while len(self._cache) > 1 and sum(a.nbytes for a in self._cache.values()) > self.cache_bytes:
            self._cache.popitem(last=False)
        return array

    def hu_slice(self, source_index: int, slice_index: int) -> np.ndarray:
        source = self.index.sources[source_index]
        if source.kind == "slice":
            return _load_slice_file(source.path).astype(np.float32)
        return self._volume(source_index)[slice_index].astype(np.float32)

    def __getitem__(self, item: int) -> dict:
        source, slice_index, window_index = self.locate(item)
        rng = np.random.default_rng([self.seed, self.epoch, item])
        try:
            hu = self.hu_slice(source, slice_index)
        except Exception as error:  # a file that broke after indexing: count it, train on a blank instead of dying
            self.read_failures += 1
            log.warning("cannot read %s: %s", self.index.sources[source].path, " ".join(str(error).split())[:160])
            hu = np.full((self.size, self.size), -1024.0, dtype=np.float32)
        window = self.windows[window_index]
        unit = window_to_unit(hu, window, "official")[None]  # (1, H, W) in [0, 1]
        transform = build_augmentation(self.size, self.augment_config)
        transform.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        unit = torch.as_tensor(np.asarray(transform(unit)), dtype=torch.float32).clamp(0, 1)
        if tuple(unit.shape[-2:]) != (self.output_size,) * 2:
            raise RuntimeError(f"augmentation produced {tuple(unit.shape)}, expected {self.output_size}²")
        prompt = NULL_PROMPT if rng.random() < self.condition_dropout else window.prompt()
        return {"pixel_values": unit_to_model(unit[0]), "prompt": prompt,
                "window": self.window_names[window_index], "index": item}


def collate(batch: list[dict]) -> dict:
    return {"pixel_values": torch.stack([item["pixel_values"] for item in batch]),
            "prompt": [item["prompt"] for item in batch], "window": [item["window"] for item in batch],
            "index": [item["index"] for item in batch]}


class BlockShuffleSampler(Sampler[int]):
    """Deterministic per-epoch order, sharded across processes, resumable at any position.

    The sources are shuffled, grouped into blocks of ``block_sources`` sources, and the items
    of each block shuffled together: random enough for SGD, local enough for the volume cache.
    Process ``rank`` of ``world_size`` takes every ``world_size``-th item of the epoch's order,
    so processes see disjoint data; the order is cut to a multiple of ``world_size`` so all
    processes run the same number of steps.
    """

    def __init__(self, items_per_source: Sequence[int], seed: int = 0, rank: int = 0, world_size: int = 1,
                 block_sources: int = 4):
        self.items_per_source = list(items_per_source)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.block_sources = max(1, int(block_sources))
        self.epoch = 0
        self.start = 0
        total = sum(self.items_per_source)
        self.per_rank = total // self.world_size
        if self.per_rank == 0:
            raise InputError(f"{total} training items cannot be shared by {world_size} processes")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch; ``start`` skips that many of this rank's items (used on resume)."""
        self.epoch, self.start = int(epoch), int(start)

    def epoch_order(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.epoch, 7919])
        offsets = np.cumsum([0] + self.items_per_source)
        sources = rng.permutation(len(self.items_per_source))
        order = []
        for first in range(0, len(sources), self.block_sources):
            block = sources[first:first + self.block_sources]
            items = np.concatenate([np.arange(offsets[s], offsets[s + 1]) for s in block])
            order.append(rng.permutation(items))
        order = np.concatenate(order)
        return order[: self.per_rank * self.world_size]

    def __iter__(self) -> Iterator[int]:
        mine = self.epoch_order()[self.rank::self.world_size]
        return iter(int(i) for i in mine[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def data_fingerprint(index: SourceIndex) -> str:
    """sha256 over the sources' names, sizes and modification-free content hashes (small files) or sizes."""
    from ..hashing import fingerprint, sha256_file

    entries = []
    for source in index.sources:
        if source.path.is_file():
            entries.append((str(source.path.relative_to(index.root) if source.path != index.root else source.path.name),
                            sha256_file(source.path)))
        else:
            files = sorted(p for p in source.path.iterdir() if p.is_file())
            entries.append((str(source.path.relative_to(index.root)) if source.path != index.root else ".",
                            fingerprint([(p.name, sha256_file(p)) for p in files])))
    return fingerprint(entries)



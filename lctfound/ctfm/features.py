"""CT-FM features of a volume: whole-volume and per-window embeddings, dense maps, similarity maps.

Everything runs on the preprocessed volume (`prepare_volume`) through MONAI's sliding-window
inferer, so memory is bounded by the window batch plus the (optionally downsampled) output map:
windows are cut, encoded and dropped one batch at a time.

* embedding — ``512``-d: the global average pool of the last stage (stride 16) of each window;
  the volume's vector aggregates the window vectors (``mean``, default, or element-wise ``min``
  as in CT-FM's 3D-MIR retrieval) or, with ``whole``, pools one forward pass of the whole volume;
* window embeddings — one vector per window, with the window's start/centre in preprocessed
  voxels and its centre in RAS;
* dense features — stage ``s`` (stride ``2**s``) maps stitched over the volume, optionally
  average-pooled by ``downsample``; cell ``n`` sits at the receptive-field centre
  ``stride·downsample·n + stride·(downsample−1)/2`` in preprocessed voxels (see `DenseFeatures.affine`);
* similarity maps — per-window cosine similarity with a query vector, placed at the window centres
  (a rectilinear grid) and interpolated linearly at every voxel of the source volume: the map
  peaks exactly at the centre of the best window, where a viewer jumps to.

Windows must be multiples of 16 voxels (CT-FM's own retrieval used 24-deep windows; 32×128×128,
the pretraining patch, keeps every window aligned with the stride-16 grid).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError, LCTfoundError
from ..io.volume import CTVolume
from ..progress import Progress, ensure_progress
from .model import CTFMModel
from .preprocess import DEFAULT_PREPROCESSING, CTFMPreprocessing, PreparedVolume, grid_affine, prepare_volume
from ..compat import strict_zip

DEFAULT_WINDOW = (32, 128, 128)
DEFAULT_OVERLAP = 0.5
AGGREGATIONS = ("mean", "min", "whole")


@dataclass(frozen=True)
class WindowSettings:
    """How windows are cut from the preprocessed volume."""

    window: tuple[int, int, int] = DEFAULT_WINDOW
    overlap: float = DEFAULT_OVERLAP
    batch_size: int = 2
    blend: str = "gaussian"  # MONAI blend mode for stitched maps

    def as_dict(self) -> dict[str, Any]:
        return {"window": list(self.window), "overlap": self.overlap, "batch_size": self.batch_size,
                "blend": self.blend}


def check_windows(settings: WindowSettings, multiple: int = 16) -> None:
    """Windows and their step must be multiples of ``multiple`` voxels (exact stitching on the coarse grid)."""
    if len(settings.window) != 3 or any(int(w) < multiple or int(w) % multiple for w in settings.window):
        raise LCTfoundError(f"window {'x'.join(map(str, settings.window))}: each size must be a multiple of "
                            f"{multiple} voxels")
    if not 0.0 <= settings.overlap < 1.0:
        raise LCTfoundError(f"overlap {settings.overlap}: must be at least 0 and below 1")
    for size in settings.window:
        step = int(size * (1 - settings.overlap))
        if step % multiple:
            good = sorted({round(1 - k * multiple / size, 4) for k in range(1, size // multiple + 1)})
            raise LCTfoundError(f"overlap {settings.overlap} gives a step of {step} voxels for a {size}-voxel window, "
                                f"not a multiple of {multiple}; use one of {', '.join(map(str, good))}")
    if settings.batch_size < 1:
        raise LCTfoundError("window batch size must be at least 1")


def window_count(shape: Sequence[int], settings: WindowSettings) -> int:
    """Number of windows MONAI's sliding-window inferer cuts from a (padded) volume of ``shape``."""
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    size = tuple(max(int(s), int(w)) for s, w in strict_zip(shape, settings.window))
    interval = _get_scan_interval(size, tuple(settings.window), 3, (settings.overlap,) * 3)
    return len(dense_patch_slices(size, tuple(settings.window), interval))


def _padded(prepared: PreparedVolume, window: Sequence[int]) -> torch.Tensor:
    """[1, 1, D, H, W] input, padded at the end (index origin unchanged) to at least one window."""
    array = prepared.array
    pad = [max(0, int(w) - s) for s, w in strict_zip(array.shape, window)]
    if any(pad):
        array = np.pad(array, [(0, p) for p in pad], constant_values=0.0)
    return torch.from_numpy(np.ascontiguousarray(array))[None, None]


@dataclass
class WindowEmbeddings:
    """Per-window embeddings of one volume."""

    embeddings: np.ndarray  # [n, C] float32
    starts: np.ndarray  # [n, 3] int: window start in preprocessed voxels
    window: tuple[int, int, int]
    affine: np.ndarray  # preprocessed index → RAS

    @property
    def centres_index(self) -> np.ndarray:
        return self.starts + (np.asarray(self.window, dtype=np.float64) - 1.0) / 2.0

    @property
    def centres_ras(self) -> np.ndarray:
        index = self.centres_index
        return index @ self.affine[:3, :3].T + self.affine[:3, 3]

    def aggregate(self, how: str = "mean") -> np.ndarray:
        if how == "mean":
            return self.embeddings.mean(axis=0)
        if how == "min":
            return self.embeddings.min(axis=0)
        raise LCTfoundError(f"unknown aggregation {how!r}; use mean or min")


@dataclass
class DenseFeatures:
    """A stitched feature map over the preprocessed volume."""

    array: np.ndarray  # [C, d0, d1, d2]
    affine: np.ndarray  # cell index → RAS (receptive-field centres)
    stage: int
    stride: int  # encoder stride of the stage
    downsample: int


# MONAI stitches dict outputs in sorted key order and shrinks its weight map for each smaller
# output in turn, so the keys sort from the finest output to the coarsest.
_DENSE, _NONE = "1-dense", "2-none"


def _unit(vectors: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def run_windows(model: CTFMModel, prepared: PreparedVolume, settings: WindowSettings = WindowSettings(),
                dense_stage: Optional[int] = None, dense_downsample: int = 1,
                max_output_bytes: int = 2 << 30, progress: Optional[Progress] = None) -> dict[str, Any]:
    """One streamed sliding-window pass; returns ``windows`` (`WindowEmbeddings`) and, on request,
    ``dense`` (`DenseFeatures` of ``dense_stage``)."""
    from monai.inferers import sliding_window_inference

    progress = ensure_progress(progress)
    window = tuple(int(w) for w in settings.window)
    stride = 1
    if dense_stage is not None:
        if not 0 <= dense_stage < model.stages:
            raise LCTfoundError(f"stage {dense_stage}: the encoder has stages 0..{model.stages - 1}")
        if dense_downsample < 1:
            raise LCTfoundError("downsample must be at least 1")
        stride = 2 ** dense_stage
    check_windows(settings, max(model.total_stride, stride * dense_downsample))
    inputs = _padded(prepared, window)
    total = window_count(inputs.shape[2:], settings)
    if dense_stage is not None:
        channels = int(model.config["init_filters"]) * stride
        cells = math.prod(s // (stride * dense_downsample) for s in inputs.shape[2:])
        need = 4 * cells * (channels + 1)
        if need > max_output_bytes:
            raise LCTfoundError(f"the stage-{dense_stage} map would take {need / 2**30:.2f} GiB; raise the downsample "
                                f"factor (now {dense_downsample}) or choose a deeper stage")
    device = model.device
    embeddings: list[np.ndarray] = []
    starts: list[list[int]] = []
    done = 0

    def predictor(batch: torch.Tensor, coords: list) -> dict[str, torch.Tensor]:
        nonlocal done
        progress.check_cancelled()
        with torch.inference_mode():
            feats = model.encoder(batch.to(device))
        vectors = feats[-1].float().mean(dim=(2, 3, 4))
        embeddings.append(vectors.cpu().numpy())
        starts.extend([[int(s.start) for s in coord[2:]] for coord in coords])
        outputs: dict[str, torch.Tensor] = {}
        if dense_stage is not None:
            fmap = feats[dense_stage].float()
            if dense_downsample > 1:
                fmap = torch.nn.functional.avg_pool3d(fmap, dense_downsample)
            outputs[_DENSE] = fmap.cpu()
        if not outputs:  # the inferer needs an output: a one-channel map on the coarsest grid
            outputs[_NONE] = torch.zeros(batch.shape[0], 1, *(s // model.total_stride for s in batch.shape[2:]))
        done += batch.shape[0]
        progress.update(done, total, f"window {done}/{total}")
        return outputs

    progress.update(0, total, f"{total} windows of {'x'.join(map(str, window))}")
    stitched = sliding_window_inference(inputs, window, settings.batch_size, predictor, overlap=settings.overlap,
                                        mode=settings.blend, device=torch.device("cpu"), with_coord=True)
    progress.check_cancelled()
    result: dict[str, Any] = {
        "windows": WindowEmbeddings(np.concatenate(embeddings, axis=0).astype(np.float32),
                                    np.asarray(starts, dtype=np.int64).reshape(-1, 3), window, prepared.affine.copy()),
    }
    if dense_stage is not None:
        factor = stride * dense_downsample
        offset = stride * (dense_downsample - 1) / 2.0
        affine = grid_affine(prepared.affine, factor, (offset,) * 3)
        result["dense"] = DenseFeatures(stitched[_DENSE][0].numpy(), affine,
                                        dense_stage, stride, dense_downsample)
    return result


def _as_prepared(volume: CTVolume | PreparedVolume, preprocessing: CTFMPreprocessing) -> PreparedVolume:
    return volume if isinstance(volume, PreparedVolume) else prepare_volume(volume, preprocessing)


def embed_volume(model: CTFMModel, volume: CTVolume | PreparedVolume, aggregation: str = "mean",
                 settings: WindowSettings = WindowSettings(), preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING,
                 progress: Optional[Progress] = None) -> tuple[np.ndarray, Optional[WindowEmbeddings]]:
    """``(embedding [C], window embeddings or None)`` of a volume (see the module docstring)."""
    if aggregation not in AGGREGATIONS:
        raise LCTfoundError(f"unknown aggregation {aggregation!r}; choose one of: {', '.join(AGGREGATIONS)}")
    prepared = _as_prepared(volume, preprocessing)
    if aggregation == "whole":
        progress = ensure_progress(progress)
        progress.check_cancelled()
        vector = embed_array(model, prepared.array)
        progress.update(1, 1, "whole volume")
        return vector, None
    windows = run_windows(model, prepared, settings, progress=progress)["windows"]
    return windows.aggregate(aggregation), windows


def embed_array(model: CTFMModel, array: np.ndarray) -> np.ndarray:
    """One forward pass of a preprocessed array (padded at the end to multiples of the total stride)."""
    multiple = model.total_stride
    pad = [(0, (-s) % multiple + (multiple if s == 0 else 0)) for s in array.shape]
    array = np.pad(np.asarray(array, dtype=np.float32), pad, constant_values=0.0)
    x = torch.from_numpy(np.ascontiguousarray(array))[None, None].to(model.device)
    with torch.inference_mode():
        return model.encoder(x)[-1].float().mean(dim=(2, 3, 4))[0].cpu().numpy()


def window_start_around(prepared: PreparedVolume, centre_index: Sequence[float], window: Sequence[int]) -> np.ndarray:
    """Start of the window centred (as closely as the volume allows) on ``centre_index``."""
    centre = np.asarray(centre_index, dtype=np.float64)
    size = np.asarray(window, dtype=np.float64)
    limit = np.maximum(np.asarray(prepared.shape) - size, 0)
    return np.clip(np.round(centre - (size - 1) / 2.0), 0, limit).astype(np.int64)


def embed_point(model: CTFMModel, prepared: PreparedVolume, point_ras: Sequence[float],
                window: Sequence[int] = DEFAULT_WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """``(embedding, window centre in RAS)`` of the window around a RAS point of the volume."""
    index = prepared.ras_to_index(np.asarray(point_ras, dtype=np.float64))
    if np.any(index < -0.5) or np.any(index > np.asarray(prepared.shape) - 0.5):
        source_ijk = np.round(prepared.index_to_source_ijk(index), 1)
        raise InputError(f"point {_fmt(point_ras)} (RAS) lies outside the body crop of the volume "
                         f"(source IJK {_fmt(source_ijk)})")
    start = window_start_around(prepared, index, window)
    crop = prepared.array[tuple(slice(int(s), int(s) + int(w)) for s, w in strict_zip(start, window))]
    centre = start + (np.asarray(crop.shape) - 1) / 2.0
    return embed_array(model, crop), prepared.index_to_ras(centre)


def embed_region(model: CTFMModel, prepared: PreparedVolume, corner_a_ras: Sequence[float],
                 corner_b_ras: Sequence[float],
                 settings: WindowSettings = WindowSettings()) -> tuple[np.ndarray, np.ndarray]:
    """``(embedding, region centre in RAS)`` of a RAS box: one pass when it fits a window, else the windows' mean."""
    a, b = np.asarray(corner_a_ras, dtype=np.float64), np.asarray(corner_b_ras, dtype=np.float64)
    corners = np.array([[x, y, z] for x in (a[0], b[0]) for y in (a[1], b[1]) for z in (a[2], b[2])])
    index = prepared.ras_to_index(corners)
    low = np.clip(np.floor(index.min(axis=0) + 0.5), 0, None).astype(np.int64)
    high = np.minimum(np.ceil(index.max(axis=0) - 0.5).astype(np.int64) + 1, np.asarray(prepared.shape))
    if np.any(high <= low):
        raise InputError(f"region {_fmt(a)} .. {_fmt(b)} (RAS) does not overlap the body crop of the volume")
    crop = prepared.array[tuple(slice(int(lo), int(hi)) for lo, hi in strict_zip(low, high))]
    centre = prepared.index_to_ras((low + high - 1) / 2.0)
    if all(c <= w for c, w in strict_zip(crop.shape, settings.window)):
        return embed_array(model, crop), centre
    sub = PreparedVolume(crop, grid_affine(prepared.affine, 1.0, low), prepared.source_ijk_to_ras,
                         prepared.source_shape, prepared.settings)
    return run_windows(model, sub, settings)["windows"].aggregate("mean"), centre


def dense_features(model: CTFMModel, volume: CTVolume | PreparedVolume, stage: int = 4, downsample: int = 1,
                   settings: WindowSettings = WindowSettings(),
                   preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING,
                   max_output_bytes: int = 2 << 30, progress: Optional[Progress] = None) -> DenseFeatures:
    """Stage-``stage`` features stitched over the whole volume (bounded by ``max_output_bytes``)."""
    prepared = _as_prepared(volume, preprocessing)
    return run_windows(model, prepared, settings, dense_stage=stage, dense_downsample=downsample,
                       max_output_bytes=max_output_bytes, progress=progress)["dense"]


def similarity_volume(model: CTFMModel, volume: CTVolume, query: np.ndarray,
                      settings: WindowSettings = WindowSettings(),
                      preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING,
                      prepared: Optional[PreparedVolume] = None, fill: float = 0.0,
                      progress: Optional[Progress] = None) -> tuple[CTVolume, WindowEmbeddings]:
    """Cosine similarity of every window of ``volume`` with ``query``, as a float32 `CTVolume` on the
    volume's own grid (Slicer overlays it directly); voxels outside the body crop get ``fill``."""
    prepared = prepared or prepare_volume(volume, preprocessing)
    if np.asarray(query).shape != (model.embedding_dim,):
        raise LCTfoundError(f"query vector has shape {np.asarray(query).shape}; this model's embeddings are "
                            f"{model.embedding_dim}-d")
    windows = run_windows(model, prepared, settings, progress=progress)["windows"]
    query_unit = _unit(torch.as_tensor(np.asarray(query, np.float32)))
    scores = (_unit(torch.from_numpy(windows.embeddings)) @ query_unit).numpy()
    on_source = window_values_on_source(prepared, windows, scores, fill)
    heatmap = volume.with_array(on_source, kind="ctfm-similarity")
    return heatmap, windows


def window_values_on_source(prepared: PreparedVolume, windows: WindowEmbeddings, values: np.ndarray,
                            fill: float = 0.0) -> np.ndarray:
    """Per-window values, placed at the window centres, interpolated linearly onto the source volume's
    (k, j, i) grid (clamped beyond the outermost centres; ``fill`` outside the prepared volume).

    MONAI's windows form a full grid of starts per axis (the last one may step less), so the centres
    are a rectilinear grid and a voxel exactly at a window's centre takes that window's value."""
    from scipy.interpolate import RegularGridInterpolator

    centres = windows.centres_index
    axes = [np.unique(centres[:, axis]) for axis in range(3)]
    grid = np.full([len(a) for a in axes], np.nan, dtype=np.float64)
    positions = tuple(np.searchsorted(axes[axis], centres[:, axis]) for axis in range(3))
    grid[positions] = np.asarray(values, dtype=np.float64)
    if np.isnan(grid).any():
        raise RuntimeError("window starts do not form a full grid")
    for axis in range(3):  # linear interpolation needs two nodes per axis: a constant axis gets a twin node
        if len(axes[axis]) == 1:
            axes[axis] = np.array([axes[axis][0], axes[axis][0] + 1.0])
            grid = np.concatenate([grid, grid], axis=axis)
    interpolate = RegularGridInterpolator(axes, grid, method="linear")
    low = np.array([a[0] for a in axes])
    high = np.array([a[-1] for a in axes])
    to_index = np.linalg.inv(prepared.affine) @ prepared.source_ijk_to_ras
    nk, nj, ni = prepared.source_shape
    jj, ii = np.meshgrid(np.arange(nj, dtype=np.float64), np.arange(ni, dtype=np.float64), indexing="ij")
    limits = np.asarray(prepared.shape, dtype=np.float64)
    out = np.empty((nk, nj, ni), dtype=np.float32)
    for k in range(nk):  # slice by slice: bounded memory
        ijk = np.stack([ii.ravel(), jj.ravel(), np.full(ii.size, float(k))], axis=1)
        index = ijk @ to_index[:3, :3].T + to_index[:3, 3]
        sampled = interpolate(np.clip(index, low, high))
        sampled[~np.all((index >= -0.5) & (index <= limits - 0.5), axis=1)] = fill
        out[k] = sampled.reshape(nj, ni)
    return out


def _fmt(values) -> str:
    return "(" + ", ".join(f"{float(v):.1f}" for v in np.ravel(values)) + ")"

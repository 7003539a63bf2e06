"""Denoising features of LCTfound (the paper's segmentation recipe, reference §6.1).

For each slice x0 (preprocessed to [−1, 1]): draw ONE noise image ε, and for every timestep t
in (0, 50, 100, 150) run the U-Net on ``scheduler.add_noise(x0, ε, t)`` with the window prompt,
keeping the outputs of up blocks 1–4 (forward hooks). Each map is resized to the output grid
(bilinear, ``align_corners=False``) and the maps are concatenated in the order
``[t0: up1, up2, up3, up4, t50: …]`` — 960 channels per timestep for the official model
(3,840 in all).

Fixes relative to the official code: the whole batch goes through each timestep at once (the
official loop only produced the documented layout for batch size 1), and the noise for a slice
is drawn from a generator seeded by the slice index, so a slice's features do not depend on
which batch it falls in (feature caches stay valid).

Volumes are streamed slice batch by slice batch: memory holds one batch of features, never the
volume's. The forward runs under bf16 autocast on CUDA and in fp32 on CPUs, where bf16 would move
the features by ~2 % (`lctfound.devices.resolve_precision`; $LCTFOUND_PRECISION=bf16 opts in on
CPUs with AMX or AVX-512 BF16), with PyTorch SDPA attention.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .devices import resolve_precision
from .errors import LCTfoundError
from .models.bundle import LCTfoundModel
from .models.presets import FEATURE_BLOCKS, FEATURE_TIMESTEPS, feature_channels
from .models.taps import tap_up_blocks
from .preprocessing import NORMALIZATION_MODES, RESIZE_MODES, NormalizationMode, ResizeMode, prepare_slices, slice_batches
from .progress import Progress, ensure_progress


@dataclass(frozen=True)
class FeatureSpec:
    """What to extract. ``resolution=None`` means the model's input size (256 for the official model)."""

    timesteps: tuple[int, ...] = FEATURE_TIMESTEPS
    blocks: tuple[int, ...] = FEATURE_BLOCKS
    window: str = "mediastinal"  # the official segmentation features used the mediastinal prompt
    disease: Optional[str] = None
    resolution: Optional[int] = None
    seed: int = 0
    normalization: NormalizationMode = "official"
    #: How slices reach the model's input size: ``area`` (the original loaders) or ``antialias``.
    resize: ResizeMode = "antialias"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATION_MODES:
            raise LCTfoundError(f"unknown normalisation {self.normalization!r}; choose one of: "
                                f"{', '.join(NORMALIZATION_MODES)}")
        if self.resize not in RESIZE_MODES:
            raise LCTfoundError(f"unknown resize mode {self.resize!r}; choose one of: {', '.join(RESIZE_MODES)}")
        if not self.timesteps:
            raise LCTfoundError("at least one timestep is needed")
        if any(not 0 <= t < 1000 for t in self.timesteps):
            raise LCTfoundError(f"timesteps must lie in 0..999, got {list(self.timesteps)}")
        if not self.blocks or any(not 0 <= b <= 4 for b in self.blocks):
            raise LCTfoundError(f"up blocks must lie in 0..4, got {list(self.blocks)}")
        if self.resolution is not None and self.resolution < 1:
            raise LCTfoundError(f"resolution must be positive, got {self.resolution}")


@dataclass
class ChannelGroup:
    timestep: int
    block: int
    start: int
    stop: int


class FeatureExtractor:
    """Frozen-backbone features for batches of slices; see the module docstring."""

    def __init__(self, model: LCTfoundModel, spec: FeatureSpec = FeatureSpec(), precision: Optional[str] = None):
        self.model = model
        self.spec = spec
        self._precision_choice = precision
        resolve_precision(model.device, precision)  # an unknown choice fails here, before any work
        self.resolution = spec.resolution or model.sample_size
        widths = list(reversed(model.unet.config.block_out_channels))
        self.layout: list[ChannelGroup] = []
        start = 0
        for timestep in spec.timesteps:
            for block in spec.blocks:
                self.layout.append(ChannelGroup(timestep, block, start, start + widths[block]))
                start += widths[block]
        self.channels = start
        assert self.channels == feature_channels(model.unet.config, spec.blocks) * len(spec.timesteps)
        self._condition_cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ core
    def _condition(self, batch: int) -> torch.Tensor:
        if batch not in self._condition_cache:
            self._condition_cache[batch] = self.model.condition(self.spec.window, self.spec.disease, batch)
        return self._condition_cache[batch]

    @property
    def precision(self) -> str:
        """``fp32`` or ``bf16``: how the backbone runs on the model's current device."""
        return resolve_precision(self.model.device, self._precision_choice)

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.model.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def noise_for(self, slice_ids: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        """One ε per slice, reproducible from (seed, slice id) alone, drawn on the CPU."""
        noise = torch.empty((len(slice_ids), *shape))
        for row, slice_id in enumerate(slice_ids):
            generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + int(slice_id))
            noise[row] = torch.randn(shape, generator=generator)
        return noise

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, slice_ids: Optional[Sequence[int]] = None,
                 out_dtype: torch.dtype = torch.float32, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model inputs (B, 3, S, S) in [−1, 1] → features (B, C, R, R) on the CPU.

        ``noise`` (B, 3, S, S): the ε to use instead of the seeded per-slice draw (training with
        fresh noise per batch, as the original did, or comparing with its stored noise)."""
        unet, scheduler = self.model.unet, self.model.scheduler
        device = self.model.device
        batch = x0.shape[0]
        slice_ids = list(range(batch)) if slice_ids is None else list(slice_ids)
        x0 = x0.to(device, torch.float32)
        if noise is None:
            noise = self.noise_for(slice_ids, tuple(x0.shape[1:]))
        elif tuple(noise.shape) != tuple(x0.shape):
            raise LCTfoundError(f"noise {tuple(noise.shape)} does not match the inputs {tuple(x0.shape)}")
        noise = noise.to(device, torch.float32)
        condition = self._condition(batch)
        out = torch.empty((batch, self.channels, self.resolution, self.resolution), dtype=out_dtype)
        with tap_up_blocks(unet, self.spec.blocks) as captured:
            for timestep in self.spec.timesteps:
                t = torch.full((batch,), timestep, dtype=torch.long, device=device)
                noisy = scheduler.add_noise(x0, noise, t)
                captured.clear()
                with self._autocast():
                    unet(noisy.to(unet.dtype), t, encoder_hidden_states=condition)
                for group in self.layout:
                    if group.timestep != timestep:
                        continue
                    feature = captured[group.block].float()
                    if feature.shape[-1] != self.resolution:
                        feature = F.interpolate(feature, size=(self.resolution, self.resolution), mode="bilinear",
                                                align_corners=False, antialias=feature.shape[-1] > self.resolution)
                    out[:, group.start:group.stop] = feature.to("cpu", out_dtype)
        return out

    # ------------------------------------------------------------------ slices and volumes
    def prepare(self, hu_slices: np.ndarray | torch.Tensor) -> torch.Tensor:
        return prepare_slices(hu_slices, self.spec.window, self.model.sample_size, self.spec.normalization,
                              self.spec.resize)

    def iter_volume(self, hu_volume: np.ndarray, slices: Optional[Sequence[int]] = None, batch_size: int = 1,
                    progress: Optional[Progress] = None, out_dtype: torch.dtype = torch.float16,
                    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(slice indices, features (b, C, R, R))`` batch by batch over a (K, H, W) HU volume."""
        return iter_slice_batches(hu_volume, slices, batch_size, progress,
                                  lambda batch: self(self.prepare(np.asarray(hu_volume[batch])), batch, out_dtype))

    def describe(self) -> dict[str, Any]:
        return {
            "spec": asdict(self.spec),
            "resolution": self.resolution,
            "channels": self.channels,
            "layout": [asdict(group) for group in self.layout],
            "model": str(self.model.path) if self.model.path else self.model.preset,
            "preset": self.model.preset,
            "precision": self.precision,
        }


def iter_slice_batches(hu_volume: np.ndarray, slices: Optional[Sequence[int]], batch_size: int,
                       progress: Optional[Progress], compute: Callable[[list[int]], torch.Tensor],
                       ) -> Iterator[tuple[list[int], torch.Tensor]]:
    """Yield ``(slice indices, compute(indices))`` batch by batch over ``slices`` (default: all) of a
    (K, H, W) volume, with progress and cancellation; an index outside the volume is refused first."""
    progress = ensure_progress(progress)
    indices = list(range(hu_volume.shape[0])) if slices is None else [int(i) for i in slices]
    bad = [i for i in indices if not 0 <= i < hu_volume.shape[0]]
    if bad:
        raise LCTfoundError(f"slice {bad[0]} is outside the volume (0..{hu_volume.shape[0] - 1})")

    def batches() -> Iterator[tuple[list[int], torch.Tensor]]:
        done = 0
        progress.update(0, len(indices), "features")
        for batch in slice_batches(indices, batch_size):
            progress.check_cancelled()
            values = compute(batch)
            done += len(batch)
            progress.update(done, len(indices), f"slice {batch[-1]}")
            yield batch, values

    return batches()


def feature_bytes(num_slices: int, channels: int, resolution: int, dtype: torch.dtype = torch.float16) -> int:
    return num_slices * channels * resolution * resolution * torch.empty((), dtype=dtype).element_size()


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} TB"


def save_volume_features(extractor: FeatureExtractor, hu_volume: np.ndarray, folder: str | Path,
                         slices: Optional[Sequence[int]] = None, batch_size: int = 1,
                         dtype: torch.dtype = torch.float16, progress: Optional[Progress] = None,
                         extra_metadata: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
    """Stream features of a volume into ``folder/features.npy`` (N, C, R, R) + ``features.json``.

    The array is a memory-mapped ``.npy`` filled batch by batch, so RAM holds one batch only;
    the folder appears atomically when every slice is done (a cancel leaves nothing behind).
    """
    from .atomic import atomic_directory, create_memmap

    indices = list(range(hu_volume.shape[0])) if slices is None else [int(i) for i in slices]
    shape = (len(indices), extractor.channels, extractor.resolution, extractor.resolution)
    np_dtype = {torch.float16: np.float16, torch.float32: np.float32}[dtype]
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        array = create_memmap(tmp / "features.npy", np_dtype, shape)  # blocks reserved: no SIGBUS on a full disk
        row = 0
        for batch, features in extractor.iter_volume(hu_volume, indices, batch_size, progress, dtype):
            array[row:row + len(batch)] = features.numpy()
            row += len(batch)
        array.flush()
        del array
        metadata = {**extractor.describe(), "slices": indices, "shape": list(shape),
                    "dtype": np.dtype(np_dtype).name, "bytes": feature_bytes(*shape[:2], shape[2], dtype),
                    **(extra_metadata or {})}
        (tmp / "features.json").write_text(json.dumps(metadata, indent=2))
    return Path(folder)


def load_volume_features(folder: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict[str, Any]]:
    folder = Path(folder)
    try:
        metadata = json.loads((folder / "features.json").read_text())
        array = np.load(folder / "features.npy", mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise LCTfoundError(f"{folder}: not a feature folder ({error})") from None
    return array, metadata


def parse_slices(text: Optional[str], num_slices: int) -> Optional[list[int]]:
    """``"3,5,10-12"`` → [3, 5, 10, 11, 12] (inclusive ranges); None/empty → all slices.
    See `lctfound.validation.parse_slice_list` (reversed ranges, negative and outside slices are refused)."""
    from .validation import parse_slice_list

    return parse_slice_list(text, num_slices)



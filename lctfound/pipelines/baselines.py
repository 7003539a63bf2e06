"""A "no foundation model" baseline for few-shot segmentation: the same pixel MLP on raw intensities.

`IntensityPatchSegmenter` is `FewShotSegmenter` with the LCTfound features replaced by the windowed
intensities of each pixel's ``patch × patch`` neighbourhood (`IntensityPatchExtractor`). Training
and prediction are inherited unchanged — the same `PixelMLPHead`, CE + focal loss, AdamW, cosine
schedule, per-class pixel sampling, feature grid and bilinear upsampling of the logits — so a
comparison with the LCTfound features measures the features and nothing else.

The intensities are the backbone's own input: the slice windowed and normalised as the model saw
it in training (`lctfound.preprocessing.prepare_slices`, ``official`` mode: per-slice min-max,
uint8 quantisation, [−1, 1]), resized (antialiased) to the feature grid; the neighbourhood is read
on that grid with replicate padding at the border. Channel ``(dy + r) * patch + (dx + r)`` (with
``r = patch // 2``) holds the value at offset ``(dy, dx)``; the centre channel is the pixel itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LCTfoundError
from ..features import iter_slice_batches
from ..preprocessing import NormalizationMode, prepare_slices
from ..progress import Progress
from .segmentation import FewShotConfig, FewShotSegmenter

#: The feature grid when the config does not name one: the same as `FewShotConfig`'s default for
#: the embedded backbone (min(model input, 128)).
DEFAULT_RESOLUTION = 128


@dataclass(frozen=True)
class PatchSpec:
    """What `IntensityPatchExtractor` computes (also the feature cache's recipe key)."""

    window: str = "mediastinal"
    patch: int = 5
    resolution: int = DEFAULT_RESOLUTION
    normalization: NormalizationMode = "official"
    kind: str = "intensity-patch"  # keeps cache keys apart from LCTfound feature recipes

    def __post_init__(self) -> None:
        if self.patch < 1 or self.patch % 2 == 0:
            raise LCTfoundError(f"the neighbourhood must be an odd number of pixels wide, got {self.patch}")
        if self.resolution < 1:
            raise LCTfoundError(f"resolution must be positive, got {self.resolution}")


class _NoBackbone:
    """What `FeatureCache` reads of ``extractor.model``: no weight file, so the key is volume + spec only."""

    path = None


class IntensityPatchExtractor:
    """HU slices → (B, patch², R, R) windowed-intensity neighbourhoods; the feature-source interface
    of `FewShotSegmenter` (``spec``, ``resolution``, ``channels``, ``precision``, ``iter_volume``,
    ``model.path``)."""

    model = _NoBackbone()
    precision = "fp32"  # no network: the intensities themselves

    def __init__(self, spec: PatchSpec = PatchSpec()):
        self.spec = spec
        self.resolution = spec.resolution
        self.channels = spec.patch * spec.patch

    def __call__(self, hu_slices: np.ndarray | torch.Tensor, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        grey = prepare_slices(hu_slices, self.spec.window, self.resolution, self.spec.normalization)[:, :1]
        radius = self.spec.patch // 2
        padded = F.pad(grey, (radius,) * 4, mode="replicate")
        patches = F.unfold(padded, self.spec.patch)  # (B, patch², R·R), row-major offsets
        return patches.reshape(grey.shape[0], self.channels, self.resolution, self.resolution).to(out_dtype)

    def iter_volume(self, hu_volume: np.ndarray, slices: Optional[Sequence[int]] = None, batch_size: int = 1,
                    progress: Optional[Progress] = None, out_dtype: torch.dtype = torch.float16,
                    ) -> Iterator[tuple[list[int], torch.Tensor]]:
        """Yield ``(slice indices, features (b, patch², R, R))`` over a (K, H, W) HU volume."""
        return iter_slice_batches(hu_volume, slices, batch_size, progress,
                                  lambda batch: self(np.asarray(hu_volume[batch]), out_dtype))


class IntensityPatchSegmenter(FewShotSegmenter):
    """`FewShotSegmenter` on raw intensity neighbourhoods instead of LCTfound features (no backbone).

    ``config.window`` picks the intensity window and ``config.resolution`` the grid
    (default `DEFAULT_RESOLUTION`); the timestep/block settings of the config do not apply.
    """

    def __init__(self, label_names: dict[int, str], config: Optional[FewShotConfig] = None, patch: int = 5):
        # The baseline's own intensities are its features: no extra intensity channels.
        config = replace(config or FewShotConfig(), intensity_features=False)
        names = {int(k): v for k, v in label_names.items() if int(k) != 0}
        if not names:
            raise LCTfoundError("name at least one structure to segment (label 1 or above)")
        self.model, self.config = None, config
        self.class_values = [0] + sorted(names)
        self.label_names = names
        self.extractor = IntensityPatchExtractor(
            PatchSpec(config.window, patch, config.resolution or DEFAULT_RESOLUTION))
        self.head = self.new_head()
        self._trained = False
        self.annotation = None

    def save(self, *args, **kwargs):
        raise LCTfoundError("the raw-intensity baseline is a benchmark reference and is not saved as a task model")

    @classmethod
    def load(cls, *args, **kwargs):
        raise LCTfoundError("the raw-intensity baseline is a benchmark reference and is not saved as a task model")

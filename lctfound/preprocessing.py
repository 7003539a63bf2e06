"""From HU slices to model inputs and back.

The official pretraining loader (reference §4) clipped each slice to its window, min-max
scaled it per slice to [0, 1], quantised to uint8 (×255, truncated), divided by 255,
replicated grey to 3 channels and normalised with (x − 0.5)/0.5 to [−1, 1]. ``mode="official"``
reproduces that exactly (the uint8 truncation included) so features match what the network
saw in training. ``mode="fixed"`` maps the window linearly without the per-slice stretch and
is invertible to HU, which enhancement and generation need.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .windows import Window, get_window

NormalizationMode = Literal["official", "fixed"]


def window_to_unit(hu: np.ndarray | torch.Tensor, window: Window | str, mode: NormalizationMode = "official") -> torch.Tensor:
    """HU slices (..., H, W) → float32 tensor in [0, 1] under a window."""
    window = get_window(window)
    x = torch.as_tensor(np.asarray(hu) if not isinstance(hu, torch.Tensor) else hu).float()
    x = x.clamp(window.low, window.high)
    if mode == "fixed":
        return (x - window.low) / window.width
    if mode != "official":
        raise ValueError(f"unknown normalisation mode {mode!r}")
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    unit = (x - low) / (high - low).clamp_min(1e-6)  # a uniform slice maps to 0, as min-max of cv2 would
    return torch.floor(unit * 255.0) / 255.0


def unit_to_model(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] grey (B, H, W) → [−1, 1] RGB (B, 3, H, W), as NormalizeIntensity(0.5, 0.5) did."""
    return ((unit - 0.5) / 0.5).unsqueeze(-3).expand(*unit.shape[:-2], 3, *unit.shape[-2:]).contiguous()


def model_to_hu(x: torch.Tensor, window: Window | str) -> torch.Tensor:
    """Inverse of the fixed mapping: model output (B, 3, H, W) or (B, H, W) in [−1, 1] → HU."""
    window = get_window(window)
    if x.dim() == 4:
        x = x.mean(dim=1)
    return ((x.clamp(-1, 1) + 1) / 2) * window.width + window.low


def resize_images(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) images; antialiased bilinear when shrinking."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def resize_labels(labels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize integer label maps (B, H, W) with nearest neighbour (never interpolate classes)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0].to(labels.dtype)


def prepare_slices(hu_slices: np.ndarray | torch.Tensor, window: Window | str, size: int,
                   mode: NormalizationMode = "official") -> torch.Tensor:
    """HU slices (B, H, W) → model input (B, 3, size, size) in [−1, 1]."""
    unit = window_to_unit(hu_slices, window, mode)
    if unit.dim() == 2:
        unit = unit[None]
    return unit_to_model(resize_images(unit[:, None], size)[:, 0])


def slice_batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive groups of slice indices of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]

"""From HU slices to model inputs and back.

The official pretraining loader (reference §4) clipped each slice to its window, min-max
scaled it per slice with ``(im − min)/(max − min + 1e-8)``, quantised to uint8 (×255, truncated),
divided by 255, resized with MONAI ``Resize`` (default mode ``area``), replicated grey to 3
channels and normalised with (x − 0.5)/0.5 to [−1, 1]. ``mode="official"`` reproduces that
bit for bit (numpy's arithmetic included: integer HU in float64, so the window top quantises to
254; float32 HU in float32, where it quantises to 255) so features match what the network saw in
training. ``mode="official-segmentation"`` is the segmentation loader: the same uint8 image,
then ``ScaleIntensity(0, 1)`` (which stretches the 254 top back to 1). ``mode="fixed"`` maps the
window linearly without the per-slice stretch and is invertible to HU, which enhancement and
generation need.

Resizing (`resize_images`): ``area`` is the original loaders' (2×2 block mean for 512 → 256);
``antialias`` (antialiased bilinear) is the fast recipe's.
"""

from __future__ import annotations

from typing import Iterator, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .windows import Window, get_window

NormalizationMode = Literal["official", "official-segmentation", "fixed"]
ResizeMode = Literal["area", "antialias"]
NORMALIZATION_MODES = ("official", "official-segmentation", "fixed")
RESIZE_MODES = ("area", "antialias")


def window_to_unit(hu: np.ndarray | torch.Tensor, window: Window | str, mode: NormalizationMode = "official") -> torch.Tensor:
    """HU slices (..., H, W) → float32 tensor in [0, 1] under a window."""
    window = get_window(window)
    x = hu if isinstance(hu, torch.Tensor) else torch.as_tensor(np.asarray(hu))
    if mode == "fixed":
        x = x.float().clamp(window.low, window.high)
        return (x - window.low) / window.width
    if mode not in ("official", "official-segmentation"):
        raise ValueError(f"unknown normalisation mode {mode!r}")
    quantised = official_uint8(x, window)
    unit = quantised.float() / 255.0
    if mode == "official-segmentation":
        unit = scale_intensity(unit)
    return unit


def official_uint8(hu: torch.Tensor, window: Window) -> torch.Tensor:
    """The uint8 image of the official loader (``MDataset.read_npy``): clip to the window, then
    ``((im − min)/(max − min + 1e-8) × 255).astype(uint8)`` per slice, with numpy's arithmetic:
    float32 HU computes in float32 (where the 1e-8 vanishes), any other HU in float64."""
    dtype = torch.float32 if hu.dtype in (torch.float32, torch.float16, torch.bfloat16) else torch.float64
    x = hu.to(dtype).clamp(window.low, window.high)
    low = x.amin(dim=(-2, -1), keepdim=True)
    span = x.amax(dim=(-2, -1), keepdim=True) - low
    if dtype == torch.float64:
        span = span + 1e-8
    else:
        span = span.clamp_min(1e-8)  # float32: max − min + 1e-8 rounds to max − min except for a uniform slice
    return torch.floor((x - low) / span * 255.0).to(torch.uint8)


def scale_intensity(unit: torch.Tensor) -> torch.Tensor:
    """MONAI ``ScaleIntensity(minv=0, maxv=1)`` per slice: min-max stretch; a uniform slice maps to 0."""
    low = unit.amin(dim=(-2, -1), keepdim=True)
    span = unit.amax(dim=(-2, -1), keepdim=True) - low
    return torch.where(span > 0, (unit - low) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(unit))


def unit_to_model(unit: torch.Tensor) -> torch.Tensor:
    """[0, 1] grey (B, H, W) → [−1, 1] RGB (B, 3, H, W), as NormalizeIntensity(0.5, 0.5) did."""
    return ((unit - 0.5) / 0.5).unsqueeze(-3).expand(*unit.shape[:-2], 3, *unit.shape[-2:]).contiguous()


def model_to_hu(x: torch.Tensor, window: Window | str) -> torch.Tensor:
    """Inverse of the fixed mapping: model output (B, 3, H, W) or (B, H, W) in [−1, 1] → HU."""
    window = get_window(window)
    if x.dim() == 4:
        x = x.mean(dim=1)
    return ((x.clamp(-1, 1) + 1) / 2) * window.width + window.low


def resize_images(x: torch.Tensor, size: int | tuple[int, int], mode: ResizeMode = "antialias") -> torch.Tensor:
    """Resize (B, C, H, W) images: ``area`` (MONAI ``Resize``'s default, the original loaders') or
    ``antialias`` (bilinear, antialiased when shrinking)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(x.shape[-2:]) == size:
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    if mode != "antialias":
        raise ValueError(f"unknown resize mode {mode!r}")
    shrinking = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrinking)


def resize_labels(labels: torch.Tensor, size: int | tuple[int, int], mode: str = "nearest") -> torch.Tensor:
    """Resize integer label maps (B, H, W), never interpolating classes.

    ``nearest``: nearest neighbour. ``area``: the original segmentation loader — the label is
    area-resized like the image and truncated with ``.long()``, so a pixel keeps a structure only
    where the structure covers it fully (generalised to several structures: full cover by one
    value, else background 0)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    if tuple(labels.shape[-2:]) == size:
        return labels
    if mode == "area":
        out = torch.zeros((labels.shape[0], *size), dtype=labels.dtype)
        for value in [int(v) for v in torch.unique(labels) if int(v) != 0]:
            cover = F.interpolate((labels == value).float()[:, None], size=size, mode="area")[:, 0]
            out[cover >= 1.0] = value
        return out
    if mode != "nearest":
        raise ValueError(f"unknown label resize mode {mode!r}")
    resized = F.interpolate(labels[:, None].float(), size=size, mode="nearest-exact")
    return resized[:, 0].to(labels.dtype)


def prepare_slices(hu_slices: np.ndarray | torch.Tensor, window: Window | str, size: int,
                   mode: NormalizationMode = "official", resize: ResizeMode = "antialias") -> torch.Tensor:
    """HU slices (B, H, W) → model input (B, 3, size, size) in [−1, 1]."""
    unit = window_to_unit(hu_slices, window, mode)
    if unit.dim() == 2:
        unit = unit[None]
    return unit_to_model(resize_images(unit[:, None], size, resize)[:, 0])


def slice_batches(indices: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Consecutive groups of slice indices of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    indices = list(indices)
    for start in range(0, len(indices), batch_size):
        yield indices[start:start + batch_size]

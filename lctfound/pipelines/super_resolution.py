"""Zero-shot super-resolution: DDNM null-space projection with a true block-average operator.

The official zero-shot code posed super-resolution as restoring a bilinearly re-upsampled image
with an *identity* degradation operator (reference §8), so no null-space projection took place.
Here the degradation is the acquisition model itself:

* in-plane ×f — a low-resolution pixel is the mean of the f×f high-resolution pixels it covers
  (area averaging);
* through-plane ×f (thick → thin slices), ``slice_model="average"`` (default) — a thick slice is
  the mean of the f consecutive thin slices it covers (an idealised thick reconstruction: a box
  slice profile); the thin slices tile each thick one, and their centres average to its centre;
* through-plane ×f, ``slice_model="point"`` — a thick slice is a point sample: it equals the thin
  slice at its own centre (thick slices reconstructed thin but stored every f-th, or a slice profile
  much narrower than the spacing). The thin grid runs from the first thick centre to the last, so
  N thick slices give (N − 1)·f + 1 thin ones and every f-th thin slice coincides with a thick one
  (`PointSample`).

The operator ``A`` is that block mean (`BlockAverage`), its pseudo-inverse ``A⁺`` replicates each
value over its block (so ``A A⁺ = I``), and every sampling step replaces the range-space part of
the network's clean estimate by the measurement (DDNM, Wang et al. 2023)::

    x̂0|t = A⁺ y + (I − A⁺A) x0|t

Sampling follows the DDIM schedule of diffusers' `DDIMScheduler` on the model's own noise
schedule (timesteps and ᾱ) with the DDNM update ``x_{t−1} = √ᾱ_{t−1} x̂0 + √(1 − ᾱ_{t−1})
(η z + √(1 − η²) ε̂)`` (`SuperResolutionPipeline.ddnm_step`); η = 0.85 by default, the DDNM
code's value (the official LCTfound script passes ``--eta 0.85`` too, but its sampler never uses
it). η = 0 left visible noise in the ×4 results of the embedded model. With a noise level
σ_y > 0 (``noise_hu``) the DDNM+ rule scales the correction and the injected noise.

What the model sees. The U-Net denoises images of ``model.sample_size`` (T) pixels; the state
``x_t`` lives on the full output grid. At every step the noise is predicted on overlapping T×T
tiles of the output grid and blended with Gaussian weights (MONAI `sliding_window_inference`);
a grid smaller than T is reflect-padded to T for the network only. The projection is applied on
the whole output grid, so tiling never affects data consistency. Because the DDIM schedule ends
at ᾱ = 1, the result is the last projected estimate and satisfies ``A(x̂) = y``.

Intensities (``intensity``). Both mappings are affine, so the projection means the same thing in
HU and in the model's [−1, 1], and both are inverted exactly:

* ``"official"`` (default) — the training loader's per-slice min-max inside the window (reference
  §4) without its uint8 quantisation: each plane's range [lo, hi] of the window-clipped
  measurement maps to [−1, 1] and the result maps back with the same lo, hi. Every training slice
  had air at −1; the fixed mapping puts air (−1024 HU) at −0.70 in the lung window, a shift the
  model never saw (in the ×4 benchmark it cost 9 HU RMSE, on the sample CTs and on an unseen
  slice alike);
* ``"fixed"`` — the window maps linearly to [−1, 1] (`lctfound.preprocessing`, ``mode="fixed"``).

Voxels outside the window are clipped for the network, so a final projection in HU restores the
exact block means (``A(x̂) = y`` in HU to float precision, also where the input exceeds the
window). With ``noise_hu > 0`` the final step deliberately does not force ``A(x̂) = y`` (the data
are noisy).

Through-plane. A 2D model cannot see z in an axial slice: the null space of the thick-slice
operator (how detail is distributed among the f thin slices) is invisible slice by slice, so
axial processing could only add incoherent detail. The pipeline therefore works on coronal
reformats — planes (z, x) at fixed row j — where the operator averages f consecutive rows and
the model's prior on edges and texture acts along z. The plane keeps its native pixel sizes
(thin-slice spacing × column spacing), which are not square in general; the model was trained
on axial slices, so this is a domain shift; the benchmark does not measure it (the sample CTs
have 5 mm slices and no thin-slice truth).

Coherence between slices (or planes): every slice starts from the same noise image and gets the
same per-step noise, so similar neighbouring slices give similar results, and a slice's result
does not depend on the batch it ran in.

Scale. The embedded model was trained on whole slices resized to 128² (2.3–2.5 mm pixels); its
prior fits output pixels of about that size. At much finer output pixels (e.g. ×4 of a 512²
slice, 0.14 mm) the tiles show 18 mm of anatomy, which the model has never seen.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import LCTfoundError
from .names import super_resolution_name as result_name  # noqa: F401 - re-exported
from .choices import DEFAULT_ETA, INTENSITY_MAPPINGS, SLICE_MODEL_TEXT, SLICE_MODELS  # noqa: F401 - re-exported
from .choices import SUPER_RESOLUTION_AXES, SUPER_RESOLUTION_FACTORS, SUPER_RESOLUTION_METHODS
from ..models.conditioning import condition_prompt
from ..preprocessing import unit_to_model
from ..progress import Progress, ensure_progress
from ..windows import Window, get_window

FACTORS, AXES, METHODS = SUPER_RESOLUTION_FACTORS, SUPER_RESOLUTION_AXES, SUPER_RESOLUTION_METHODS
TASK = "super-resolution"
#: Largest result held in memory (float32), 4 GiB; larger requests must choose a slice range.
MAX_OUTPUT_BYTES = 4 << 30


def check_factor(factor: Any) -> int:
    if factor not in FACTORS or isinstance(factor, bool):
        raise LCTfoundError(f"super-resolution factor must be one of {', '.join(map(str, FACTORS))}, got {factor}")
    return int(factor)


def check_axis(axis: str) -> str:
    if axis not in AXES:
        raise LCTfoundError(f"unknown axis {axis!r}; choose in-plane or through-plane")
    return axis


def check_method(method: str) -> str:
    if method not in METHODS:
        raise LCTfoundError(f"unknown super-resolution method {method!r}; choose one of: {', '.join(METHODS)}")
    return method


def check_slice_model(slice_model: str) -> str:
    if slice_model not in SLICE_MODELS:
        raise LCTfoundError(f"unknown slice model {slice_model!r}; choose average or point")
    return slice_model


class BlockAverage:
    """The degradation operator A (block mean) and its pseudo-inverse A⁺ (block replication).

    Acts on the last two dimensions of a tensor: in-plane it averages f×f pixel blocks; for
    through-plane, on a reformatted (z, x) plane, it averages f consecutive rows. Both sides of
    ``A A⁺ = I`` hold exactly up to float rounding.
    """

    def __init__(self, factor: int, axis: str = "in-plane"):
        self.factor = check_factor(factor)
        self.axis = check_axis(axis)
        self.kernel = (self.factor, self.factor) if axis == "in-plane" else (self.factor, 1)

    def high_shape(self, low_shape: tuple[int, int]) -> tuple[int, int]:
        return low_shape[0] * self.kernel[0], low_shape[1] * self.kernel[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A x: (..., H, W) → (..., H/k0, W/k1)."""
        lead = x.shape[:-2]
        pooled = F.avg_pool2d(x.reshape(-1, 1, *x.shape[-2:]), self.kernel, self.kernel)
        return pooled.reshape(*lead, *pooled.shape[-2:])

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        """A⁺ y: every value replicated over its block."""
        return y.repeat_interleave(self.kernel[0], dim=-2).repeat_interleave(self.kernel[1], dim=-1)

    def project(self, x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x − w·A⁺(A x − y); without a weight (w = 1) the null-space projection A⁺y + (I − A⁺A) x.
        ``weight`` broadcasts against x (e.g. one value per plane)."""
        correction = self.pinv(y - self(x))
        return x + correction if weight is None else x + weight * correction


class PointSample(BlockAverage):
    """Through-plane point-sample operator on a (z, x) plane: A keeps every f-th row (rows 0, f, 2f…),
    A⁺ puts each measured row back in place with zeros between (``A A⁺ = I`` exactly).
    h thick rows ↔ (h − 1)·f + 1 thin rows."""

    def __init__(self, factor: int):
        super().__init__(factor, "through-plane")

    def high_shape(self, low_shape: tuple[int, int]) -> tuple[int, int]:
        return (low_shape[0] - 1) * self.factor + 1, low_shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., ::self.factor, :]

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        high = y.new_zeros((*y.shape[:-2], *self.high_shape(tuple(y.shape[-2:]))))
        high[..., ::self.factor, :] = y
        return high


def make_operator(factor: int, axis: str = "in-plane", slice_model: str = "average") -> BlockAverage:
    """The degradation operator of ``axis`` under ``slice_model`` (only through-plane has a choice)."""
    if check_slice_model(slice_model) == "point" and check_axis(axis) == "through-plane":
        return PointSample(factor)
    return BlockAverage(factor, axis)


# --------------------------------------------------------------------------------------------
# Arrays of slices ↔ the 2D planes an operator acts on
# --------------------------------------------------------------------------------------------

def _plane_count(shape: tuple[int, ...], axis: str) -> int:
    return shape[0] if axis == "in-plane" else shape[1]


def _read_planes(array: np.ndarray, first: int, last: int, axis: str) -> np.ndarray:
    """Planes first..last-1 as (B, h, w): axial slices, or coronal (z, x) planes of rows j."""
    if axis == "in-plane":
        return np.asarray(array[first:last], dtype=np.float64)
    return np.asarray(array[:, first:last, :], dtype=np.float64).transpose(1, 0, 2)


def _write_planes(output: np.ndarray, planes: np.ndarray, first: int, last: int, axis: str) -> None:
    if axis == "in-plane":
        output[first:last] = planes
    else:
        output[:, first:last, :] = planes.transpose(1, 0, 2)


def output_shape(shape: tuple[int, int, int], factor: int, axis: str,
                 slice_model: str = "average") -> tuple[int, int, int]:
    """The (k, j, i) shape of a super-resolved array of ``shape``."""
    k, j, i = shape
    if axis == "in-plane":
        return k, j * factor, i * factor
    return ((k - 1) * factor + 1 if check_slice_model(slice_model) == "point" else k * factor), j, i


def _as_volume_array(low_res: np.ndarray, axis: str, factor: int) -> np.ndarray:
    array = np.asarray(low_res)
    if array.ndim == 2 and axis == "in-plane":
        array = array[None]
    if array.ndim != 3:
        raise LCTfoundError(f"expected (slices, rows, columns) for {axis} super-resolution, got shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise LCTfoundError(f"voxel type {array.dtype} is not a numeric intensity")
    _check_samples(array.shape, axis, factor)
    return array


def _check_samples(shape: tuple[int, ...], axis: str, factor: int) -> None:
    along = shape[1:] if axis == "in-plane" else shape[:1]
    if min(along) < 2:
        what = "rows and columns" if axis == "in-plane" else "slices"
        raise LCTfoundError(f"volume too small for ×{factor} {axis} super-resolution: at least 2 {what} needed, "
                            f"got {'×'.join(map(str, shape[::-1]))} voxels")


# --------------------------------------------------------------------------------------------
# Interpolation baselines
# --------------------------------------------------------------------------------------------

def _bicubic(planes: np.ndarray, operator: BlockAverage) -> np.ndarray:
    from PIL import Image

    # Keys cubic convolution with a = −0.5 (PIL BICUBIC, as MATLAB imresize; PyTorch's a = −0.75 does not
    # even reproduce linear ramps), pixel-area-aligned, on 32-bit float images; a scale of 1 keeps an axis.
    height, width = operator.high_shape(planes.shape[1:])
    box = None
    if isinstance(operator, PointSample):
        # Output row r at input row r/f (centre to centre): a source box starting at ½ − ½/f, height/f rows tall.
        f = operator.factor
        box = (0.0, 0.5 - 0.5 / f, float(planes.shape[2]), 0.5 - 0.5 / f + height / f)
    return np.stack([np.asarray(Image.fromarray(plane.astype(np.float32), mode="F")
                                .resize((width, height), Image.Resampling.BICUBIC, box=box)) for plane in planes])


def _bspline(planes: np.ndarray, operator: BlockAverage) -> np.ndarray:
    from scipy import ndimage

    # Interpolating cubic B-spline (prefiltered), mirrored borders; pixel-area-aligned grid (grid_mode) for the
    # average model, centre-aligned first and last samples for the point model.
    if isinstance(operator, PointSample):
        height = operator.high_shape(planes.shape[1:])[0]
        return ndimage.zoom(planes, (1, height / planes.shape[1], 1), order=3, prefilter=True, mode="mirror",
                            grid_mode=False)
    return ndimage.zoom(planes, (1, *operator.kernel), order=3, prefilter=True, mode="reflect", grid_mode=True)


_BASELINES: dict[str, Callable[[np.ndarray, BlockAverage], np.ndarray]] = {"bicubic": _bicubic, "bspline": _bspline}


def interpolate(low_res_hu: np.ndarray, factor: int, axis: str = "in-plane", method: str = "bicubic",
                batch_size: int = 16, progress: Optional[Progress] = None,
                slice_model: str = "average") -> np.ndarray:
    """A baseline super-resolution of a (slices, rows, columns) array (a single 2D slice for in-plane).

    ``bicubic``: cubic convolution (Keys, a = −0.5; PIL ``Image.resize(BICUBIC)`` on float32
    images, the kernel of MATLAB's ``imresize``). ``bspline``: cubic B-spline interpolation (``scipy.ndimage.zoom``,
    order 3 with prefilter, ``grid_mode=True``, ``mode="reflect"``). Both sample the output grid of
    `super_resolved_geometry`; neither enforces ``A(x̂) = y``. Works plane by plane (bounded memory).
    """
    if method not in _BASELINES:
        raise LCTfoundError(f"unknown interpolation {method!r}; choose bicubic or bspline")
    factor, axis = check_factor(factor), check_axis(axis)
    squeeze = np.ndim(low_res_hu) == 2
    array = _as_volume_array(low_res_hu, axis, factor)
    operator = make_operator(factor, axis, slice_model)
    progress = ensure_progress(progress)
    count = _plane_count(array.shape, axis)
    output = np.empty(output_shape(array.shape, factor, axis, slice_model), dtype=np.float32)
    unit = "slice" if axis == "in-plane" else "plane"
    for first in range(0, count, batch_size):
        progress.check_cancelled()
        last = min(count, first + batch_size)
        _write_planes(output, _BASELINES[method](_read_planes(array, first, last, axis), operator), first, last, axis)
        progress.update(last, count, f"{unit} {last}/{count}")
    return output[0] if squeeze else output


# --------------------------------------------------------------------------------------------
# DDNM
# --------------------------------------------------------------------------------------------

class SuperResolutionPipeline:
    """``pipeline(low_res_hu, factor=4, axis="in-plane", steps=50, seed=0)`` → high-resolution HU array.

    ``low_res_hu``: (slices, rows, columns) HU (or one 2D slice for in-plane). In-plane the result
    is (slices, rows·f, columns·f); through-plane (thick slices) it is (slices·f, rows, columns).
    ``window`` selects the intensity mapping and the prompt (a window the model was trained with).
    ``batch_size`` planes are restored together; ``tile_batch`` network tiles run per call.
    ``intensity``: ``"official"`` or ``"fixed"`` HU ↔ model mapping (see the module docstring).
    """

    def __init__(self, model: Any, window: str | Window = "lung", batch_size: int = 4, tile_batch: int = 8,
                 tile_overlap: float = 0.25, intensity: str = "official"):
        if intensity not in INTENSITY_MAPPINGS:
            raise LCTfoundError(f"unknown intensity mapping {intensity!r}; choose {' or '.join(INTENSITY_MAPPINGS)}")
        if batch_size < 1 or tile_batch < 1:
            raise LCTfoundError("batch_size and tile_batch must be at least 1")
        label = model.metadata.get("name") or model.path or model.preset
        if model.condition_encoder is None:
            raise LCTfoundError(f"model {label} has no prompt vectors; cache them once with "
                                "`lctfound model add-prompts MODEL --bert BERT_FOLDER`")
        prediction = model.scheduler.config.get("prediction_type", "epsilon")
        if prediction != "epsilon":
            raise LCTfoundError(f"model {label} predicts {prediction}; DDNM here needs an ε-predicting LCTfound U-Net")
        if not 0 <= tile_overlap < 1:
            raise LCTfoundError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.model = model
        self.window = get_window(window)
        self.batch_size = batch_size
        self.tile_batch = tile_batch
        self.tile_overlap = tile_overlap
        self.intensity = intensity

    @property
    def tile_size(self) -> int:
        return self.model.sample_size

    def make_scheduler(self, steps: int):
        """diffusers' DDIM schedule on the model's noise schedule: the timesteps and ᾱ the update uses
        (ᾱ = 1 after the last step, so the result is the last projected estimate)."""
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.model.scheduler.config, set_alpha_to_one=True)
        scheduler.set_timesteps(steps)
        return scheduler

    def check_size(self, high_shape: tuple[int, int], factor: int, axis: str) -> None:
        smallest = self.tile_size // 2 + 1
        if min(high_shape) < smallest:
            raise LCTfoundError(
                f"volume too small for ×{factor} {axis} DDNM: the model would see {high_shape[0]}×{high_shape[1]}"
                f"-pixel planes; it needs at least {smallest} pixels each way (its input is {self.tile_size}²)")

    @torch.no_grad()
    def __call__(self, low_res_hu: np.ndarray, factor: int, axis: str = "in-plane", steps: int = 50,
                 eta: float = DEFAULT_ETA, seed: int = 0, noise_hu: float = 0.0,
                 progress: Optional[Progress] = None, slice_model: str = "average") -> np.ndarray:
        factor, axis = check_factor(factor), check_axis(axis)
        if steps < 1:
            raise LCTfoundError(f"steps must be at least 1, got {steps}")
        if not 0 <= eta <= 1:
            raise LCTfoundError(f"eta must be in [0, 1], got {eta}")
        if noise_hu < 0:
            raise LCTfoundError(f"noise_hu must be at least 0, got {noise_hu}")
        squeeze = np.ndim(low_res_hu) == 2
        array = _as_volume_array(low_res_hu, axis, factor)
        operator = make_operator(factor, axis, slice_model)
        plane_shape = array.shape[1:] if axis == "in-plane" else (array.shape[0], array.shape[2])
        high_shape = operator.high_shape(plane_shape)
        self.check_size(high_shape, factor, axis)
        progress = ensure_progress(progress)
        count = _plane_count(array.shape, axis)
        output = np.empty(output_shape(array.shape, factor, axis, slice_model), dtype=np.float32)
        context = self.model.encode_prompts([condition_prompt(self.window)])
        unit = "slice" if axis == "in-plane" else "plane"
        for first in range(0, count, self.batch_size):
            last = min(count, first + self.batch_size)

            def report(step: int, first: int = first, last: int = last) -> None:
                progress.update(first * steps + step * (last - first), count * steps, f"{unit} {last}/{count}")

            planes = self.restore(_read_planes(array, first, last, axis), operator, context, steps, eta, seed,
                                  noise_hu, progress, report)
            _write_planes(output, planes, first, last, axis)
        return output[0] if squeeze else output

    def restore(self, low_hu: np.ndarray, operator: BlockAverage, context: torch.Tensor, steps: int, eta: float,
                seed: int, noise_hu: float, progress: Progress, report: Callable[[int], None]) -> np.ndarray:
        """DDNM on a batch of low-resolution planes (B, h, w) in HU → (B, H, W) HU (float32)."""
        device = self.model.device
        window = self.window
        batch = low_hu.shape[0]
        high_shape = operator.high_shape(low_hu.shape[1:])
        clipped = np.clip(low_hu, window.low, window.high)
        if self.intensity == "official":  # each plane's own range ↔ [−1, 1], as the training loader did
            low = clipped.min(axis=(1, 2), keepdims=True)
            span = np.maximum(clipped.max(axis=(1, 2), keepdims=True) - low, 1.0)
        else:  # the window ↔ [−1, 1]
            low, span = np.full((batch, 1, 1), window.low), np.full((batch, 1, 1), window.width)
        y = unit_to_model(torch.from_numpy((clipped - low) / span).float()).to(device)  # (B, 3, h, w)
        # HU → the model's [−1, 1] scale, per plane: (B, 1, 1, 1).
        sigma_y = torch.from_numpy(2.0 * noise_hu / span).float().reshape(batch, 1, 1, 1).to(device)
        channels = self.model.unet.config.in_channels
        scheduler = self.make_scheduler(steps)
        alphas = scheduler.alphas_cumprod.to(torch.float64)
        stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        generator = torch.Generator().manual_seed(int(seed))
        # One noise image for every plane of the batch (see the module docstring: coherence, batch independence).
        x = torch.randn((1, channels, *high_shape), generator=generator).expand(batch, -1, -1, -1).to(device)
        x = x * scheduler.init_noise_sigma
        for step, t in enumerate(scheduler.timesteps):
            progress.check_cancelled()
            t = int(t)
            alpha = float(alphas[t])
            alpha_prev = float(alphas[t - stride]) if t - stride >= 0 else float(scheduler.final_alpha_cumprod)
            eps = self.predict_noise(x, t, context)
            x0 = ((x - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)).clamp(-1, 1)
            z = None
            if eta > 0:
                z = torch.randn((1, channels, *high_shape), generator=generator).expand(batch, -1, -1, -1).to(device)
            x = self.ddnm_step(x0, eps, y, z, operator, alpha_prev, sigma_y, eta)
            report(step + 1)
        unit = ((x.double().cpu().mean(dim=1).clamp(-1, 1) + 1) / 2)  # mean of the 3 channels, in [0, 1]
        hu = unit * torch.from_numpy(span) + torch.from_numpy(low)  # the mapping inverted
        if noise_hu == 0:
            # Exact data consistency in HU, including voxels the window clipped for the network.
            hu = operator.project(hu, torch.from_numpy(low_hu))
        return hu.float().numpy()

    @staticmethod
    def ddnm_step(x0: torch.Tensor, eps: torch.Tensor, y: torch.Tensor, z: Optional[torch.Tensor],
                  operator: BlockAverage, alpha_prev: float, sigma_y: torch.Tensor, eta: float) -> torch.Tensor:
        """x_{t−1} = √ᾱ_{t−1}·x̂0 + γ·(η z + √(1 − η²) ε̂), x̂0 = x0 − λ A⁺(A x0 − y) (DDNM / DDNM+).

        Hand-written because diffusers has no DDNM step, and DDIM's ``step`` would re-derive ε from
        the projected x̂0, which cancels most of the correction in x_{t−1}: with the network's own ε̂,
        as in the DDNM paper, the measurement steers the trajectory. With σ_y = 0: λ = 1 and
        γ = √(1 − ᾱ_{t−1}). With σ_y > 0 (DDNM+): the measurement noise A⁺n enters x_{t−1} scaled by
        √ᾱ_{t−1}; λ keeps it within the noise level √(1 − ᾱ_{t−1}) that x_{t−1} may carry and γ adds
        only the remainder (the official code compares with ᾱ instead of √ᾱ and uses √(1 − ᾱ²); we
        follow the derivation). ``sigma_y``: one value per plane, shape (B, 1, 1, 1).
        """
        allowed = math.sqrt(max(0.0, 1.0 - alpha_prev))
        injected = math.sqrt(alpha_prev) * sigma_y
        within = injected <= allowed
        weight = torch.where(within, torch.ones_like(injected), allowed / injected.clamp_min(1e-12))
        gamma = torch.where(within, (allowed ** 2 - injected ** 2).clamp_min(0).sqrt(), torch.zeros_like(injected))
        x0 = operator.project(x0, y, weight)
        noise = eps if z is None else eta * z + math.sqrt(1 - eta ** 2) * eps
        return math.sqrt(alpha_prev) * x0 + gamma * noise

    def predict_noise(self, x: torch.Tensor, t: int, context: torch.Tensor) -> torch.Tensor:
        """ε̂(x_t, t) on the whole grid: one network call when the grid is the model size, else
        Gaussian-blended overlapping tiles of the model size (reflect-padded when the grid is smaller)."""
        unet = self.model.unet
        size = self.tile_size

        def network(tiles: torch.Tensor) -> torch.Tensor:
            condition = context.expand(tiles.shape[0], -1, -1)
            return unet(tiles.to(unet.dtype), t, encoder_hidden_states=condition).sample.float()

        if tuple(x.shape[-2:]) == (size, size):
            return torch.cat([network(chunk) for chunk in x.split(self.tile_batch)])
        from monai.inferers import sliding_window_inference

        return sliding_window_inference(x, (size, size), self.tile_batch, network, overlap=self.tile_overlap,
                                        mode="gaussian", padding_mode="reflect")


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------

def super_resolved_geometry(volume: Any, factor: int, axis: str,
                            slice_model: str = "average") -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(spacing, origin) of the super-resolved grid of ``volume`` (a `CTVolume`).

    Average model (and in-plane): each old voxel is split into f sub-voxels along the upsampled
    axes; the new voxel centres lie at old index −½ + (m + ½)/f, m = 0..f−1, so the f (or f²) new
    centres average to the old centre and the new voxels tile the old one exactly. Point model:
    thin slice m·f lies at thick slice m's centre (same origin). Direction is unchanged.
    """
    factor, axis = check_factor(factor), check_axis(axis)
    scale = np.array([factor, factor, 1.0]) if axis == "in-plane" else np.array([1.0, 1.0, factor])
    spacing = np.asarray(volume.spacing, dtype=np.float64)
    offset_index = -0.5 + 0.5 / scale  # in old voxel units, per (i, j, k) axis; 0 where not upsampled
    if axis == "through-plane" and check_slice_model(slice_model) == "point":
        offset_index = np.zeros(3)
    origin = np.asarray(volume.origin, dtype=np.float64) + volume.direction @ (spacing * offset_index)
    return tuple(float(s) for s in spacing / scale), tuple(float(o) for o in origin)


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted indices → maximal runs of consecutive ones as (first, last + 1)."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and index == runs[-1][1]:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def check_request(shape: tuple[int, int, int], factor: int, axis: str, method: str,
                  pipeline: Optional[SuperResolutionPipeline] = None, slices: Optional[Sequence[int]] = None,
                  max_output_bytes: int = MAX_OUTPUT_BYTES, slice_model: str = "average") -> list[int]:
    """Every check `super_resolve_volume` makes before working, for front ends to call first; returns
    the sorted input slice indices to process. Raises a one-line `LCTfoundError`."""
    factor, axis, method = check_factor(factor), check_axis(axis), check_method(method)
    count = shape[0]
    indices = list(range(count)) if slices is None else sorted({int(k) for k in slices})
    if not indices or not all(0 <= k < count for k in indices):
        raise LCTfoundError(f"slices must be indices inside the volume (0..{count - 1}), got {slices}")
    result = output_shape(shape, factor, axis, slice_model)
    if 4 * math.prod(result) > max_output_bytes:
        raise LCTfoundError(f"the ×{factor} {axis} result would be {'×'.join(map(str, result[::-1]))} voxels "
                            f"({4 * math.prod(result) / 2**30:.1f} GiB as float32, limit "
                            f"{max_output_bytes / 2**30:.1f} GiB); choose fewer slices")
    if method == "ddnm" and pipeline is None:
        raise LCTfoundError("DDNM super-resolution needs a model (a SuperResolutionPipeline)")
    parts = [(len(indices), *shape[1:])] if axis == "in-plane" else [(b - a, *shape[1:]) for a, b in _runs(indices)]
    for part in parts:
        _check_samples(part, axis, factor)
        if pipeline is not None and method == "ddnm":
            plane = part[1:] if axis == "in-plane" else (part[0], part[2])
            pipeline.check_size(make_operator(factor, axis, slice_model).high_shape(plane), factor, axis)
    return indices


class _PartProgress(Progress):
    """Reports a part's (done, total) as its share of the whole; cancelling the whole cancels the part."""

    def __init__(self, parent: Progress, part: int, parts: int):
        super().__init__(cancel_token=parent.cancel_token)
        self.add_callback(lambda done, total, message: parent.update(
            round(1000 * (part + (done / total if total else 1.0))), 1000 * parts, message))


def super_resolve_volume(volume: Any, factor: int, axis: str = "in-plane", method: str = "ddnm",
                         pipeline: Optional[SuperResolutionPipeline] = None, steps: int = 50,
                         eta: float = DEFAULT_ETA, seed: int = 0, noise_hu: float = 0.0,
                         slices: Optional[Sequence[int]] = None, progress: Optional[Progress] = None,
                         max_output_bytes: int = MAX_OUTPUT_BYTES, slice_model: str = "average") -> Any:
    """A NEW `CTVolume` super-resolved ×``factor`` in-plane or through-plane (the input is untouched).

    ``method``: ``ddnm`` (needs ``pipeline``), ``bicubic`` or ``bspline`` (see `interpolate`).
    ``slices``: input slice indices to process (default: all); the result keeps the whole output
    grid and holds −1024 HU elsewhere, as the other ``lctfound enhance`` tasks do. Through-plane,
    each run of consecutive selected slices is super-resolved on its own. Geometry: see
    `super_resolved_geometry`. The result's ``metadata`` is its provenance (task, method, factor,
    axis, model name and sha256, steps, seed, time per slice...). The result is held in memory as
    float32; outputs over ``max_output_bytes`` are refused (choose slices). Working memory beyond
    input and output is one batch of planes. ``slice_model`` (through-plane): ``average`` (a thick
    slice is the mean of its f thin slices) or ``point`` (it is the thin slice at its centre); it
    decides the operator, the output grid and is recorded in the provenance.
    """
    from .. import __version__
    from ..io.provenance import model_provenance
    from ..io.volume import CTVolume

    factor, axis, method = check_factor(factor), check_axis(axis), check_method(method)
    count = volume.shape[0]
    slice_model = check_slice_model(slice_model)
    indices = check_request(volume.shape, factor, axis, method, pipeline, slices, max_output_bytes, slice_model)
    shape = output_shape(volume.shape, factor, axis, slice_model)

    def run(array: np.ndarray, part_progress: Optional[Progress]) -> np.ndarray:
        if method == "ddnm":
            return pipeline(array, factor, axis, steps=steps, eta=eta, seed=seed, noise_hu=noise_hu,
                            progress=part_progress, slice_model=slice_model)
        return interpolate(array, factor, axis, method, progress=part_progress, slice_model=slice_model)

    started = time.perf_counter()
    everything = len(indices) == count
    if everything:
        output = run(volume.array, progress)
    else:
        output = np.full(shape, -1024.0, dtype=np.float32)
        if axis == "in-plane":
            output[indices] = run(volume.array[indices], progress)
        else:
            runs = _runs(indices)
            parent = ensure_progress(progress)
            for number, (first, stop) in enumerate(runs):
                part = _PartProgress(parent, number, len(runs))
                part_result = run(volume.array[first:stop], part)
                output[first * factor:first * factor + part_result.shape[0]] = part_result
    seconds = time.perf_counter() - started
    spacing, origin = super_resolved_geometry(volume, factor, axis, slice_model)
    stem = _source_stem(volume.metadata.get("source")) or volume.metadata.get("name") or "volume"
    provenance: dict[str, Any] = {
        "name": result_name(stem, method, factor, axis, slice_model), "task": TASK, "method": method,
        "factor": factor, "axis": axis, "source": volume.metadata.get("source") or volume.metadata.get("name"),
        "source_spacing": [float(s) for s in volume.spacing], "slices": "all" if everything else indices,
        "seconds_total": round(seconds, 3), "seconds_per_slice": round(seconds / len(indices), 4),
        "lctfound_version": __version__, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    if axis == "through-plane":
        provenance["slice_model"] = slice_model
        provenance["acquisition_model"] = SLICE_MODEL_TEXT[slice_model]
    if method == "ddnm":
        window = pipeline.window
        provenance.update(model_provenance(pipeline.model))
        provenance.update({"window": window.name if window.name != "custom" else f"{window.width:g},{window.level:g}",
                           "prompt": condition_prompt(window), "intensity": pipeline.intensity, "sampler": "ddim",
                           "steps": steps, "eta": eta, "seed": seed, "noise_hu": noise_hu,
                           "tile": pipeline.tile_size})
    return CTVolume(output, spacing, origin, volume.direction.copy(), provenance)


def _source_stem(source: Optional[str]) -> Optional[str]:
    if not source:
        return None
    from ..io.volume import volume_stem

    return volume_stem(source)

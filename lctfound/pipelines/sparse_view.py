"""Sparse-view CT reconstruction: FBP, iterative TV, and LCTfound-guided diffusion with data consistency.

Sinograms come from a volume (simulated with the projector of `lctfound.tomography`, parallel
or fan beam) or from a file of measured line integrals (`read_sinograms`: NPY, NRRD, NIfTI or
MHA of shape (slices, views, detectors) with a JSON geometry sidecar).

`SparseViewDiffusionPipeline` is zero-shot DDNM-style reconstruction: DDIM sampling with the
LCTfound U-Net as the prior, on the model's fixed-mode [−1, 1] scale of a HU window, and at
every step the denoised estimate x̂₀ is made consistent with the projections y by LSQR
started at x̂₀ (scipy `lsqr` on the projector): it converges to x̂₀ + A⁺(y − A x̂₀), DDNM's
range/null-space decomposition — the data fix what the views see, the prior the rest. The
next sample is drawn from the corrected x̂₀ (ε re-derived from it). HU outside the window
(bone above the lung window's 250 HU) cannot live on the model's scale: that part of each
corrected estimate is carried to the next step and added back before the next correction, so
the projections stay explained. The network runs at its own size (the slice is reconstructed
there on a coarser grid of the same field of view); on a finer volume grid the result is
upsampled and refined by a few TV iterations against the projections.

The paper fine-tunes the model on the target data before guiding it; here that is the
existing pretraining command continued from a model (``lctfound train pretrain DATA
--init-model default``), whose result is passed as ``model``. It is not automated here.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import InputError, LCTfoundError
from .names import sparse_view_name as result_name  # noqa: F401 - re-exported
from ..io.volume import CTVolume
from ..progress import Progress, ensure_progress
from ..tomography import (
    FBP_FILTERS,
    HU_AIR,
    MU_WATER_PER_MM,
    Geometry,
    Projector,
    hu_to_mu,
    mu_to_hu,
    pad_to_square,
    square_pixel_mm,
    tv_reconstruction,
)
from .choices import SPARSE_VIEW_METHODS
from .low_dose import provenance, volume_source

TASK = "sparse-view"
METHODS = SPARSE_VIEW_METHODS
SINOGRAM_SUFFIXES = (".npy", ".nrrd", ".nii", ".nii.gz", ".mha")
#: Value of the slices a run did not reconstruct (``slices=`` a subset): air.
UNRECONSTRUCTED_HU = -1024.0


# --------------------------------------------------------------------------------------------
# Sinogram stacks
# --------------------------------------------------------------------------------------------


@dataclass
class SinogramStack:
    """Line integrals (slices, views, detectors) with their geometry and reconstruction grid.

    ``image_size`` × ``image_size`` pixels of ``pixel_mm`` is the square grid reconstructed;
    ``volume`` (when simulated from one) is the input volume whose grid the result takes, and
    ``slices`` the indices of its slices the sinograms belong to.
    """

    sinograms: np.ndarray
    geometry: Geometry
    image_size: int
    pixel_mm: float
    slice_spacing_mm: float = 1.0
    slices: Optional[list[int]] = None
    volume: Optional[CTVolume] = None
    source: Optional[str] = None
    #: Water's linear attenuation (1/mm) that converts μ to HU (HU = 1000·(μ/μ_water − 1)); it must be the
    #: value the line integrals were made with, else every HU is biased (0.0193 vs 0.0192: ≈ 5 HU at water).
    mu_water_per_mm: float = MU_WATER_PER_MM

    def __post_init__(self) -> None:
        self.sinograms = check_sinogram_stack(self.sinograms, self.geometry, self.source or "sinogram")
        self.mu_water_per_mm = check_mu_water(self.mu_water_per_mm)

    def sidecar(self) -> dict[str, Any]:
        return {**self.geometry.to_dict(), "image_size": int(self.image_size), "pixel_mm": float(self.pixel_mm),
                "slice_spacing_mm": float(self.slice_spacing_mm), "mu_water_per_mm": float(self.mu_water_per_mm),
                "units": "line integrals -ln(I/I0)"}


def check_mu_water(mu_water: Any) -> float:
    """A plausible water attenuation in 1/mm (diagnostic energies: about 0.015–0.03)."""
    try:
        value = float(mu_water)
    except (TypeError, ValueError):
        raise InputError(f"mu_water_per_mm must be a number (1/mm), got {mu_water!r}") from None
    if not 0.001 <= value <= 0.1:
        raise InputError(f"mu_water_per_mm {value:g}/mm is implausible: water at CT energies is about 0.015-0.03/mm "
                         "(e.g. 0.0193 at 70 keV); give it in 1/mm, not 1/cm")
    return value


def check_sinogram_stack(sinograms: np.ndarray, geometry: Geometry, name: str = "sinogram") -> np.ndarray:
    """(views, detectors) or (slices, views, detectors) matching ``geometry`` → float64 (slices, views, detectors)."""
    array = np.asarray(sinograms)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise InputError(f"{name}: expected (slices, views, detectors) line integrals, got an array of shape "
                         f"{array.shape}")
    if array.shape[1] == 0:
        raise InputError(f"{name}: has zero views")
    if array.shape[0] == 0 or array.shape[2] == 0:
        raise InputError(f"{name}: is empty (shape {array.shape})")
    if array.dtype.kind not in "iuf":
        raise InputError(f"{name}: values of type {array.dtype} are not line integrals")
    if array.shape[1:] != (geometry.views, geometry.detectors):
        raise InputError(f"{name}: {array.shape[1]} views × {array.shape[2]} detectors per slice, but the geometry "
                         f"has {geometry.views} views × {geometry.detectors} detectors")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise InputError(f"{name}: has NaN or infinite values")
    return array


def simulate_sinograms(volume: CTVolume, geometry: Optional[Geometry] = None, *, kind: str = "parallel",
                       views: int = 16, slices: Optional[Sequence[int]] = None,
                       progress: Optional[Progress] = None, mu_water: float = MU_WATER_PER_MM) -> SinogramStack:
    """Noise-free line integrals of ``slices`` of ``volume`` (default: all) in ``geometry``
    (default `Geometry.for_image(kind, views, …)` covering the padded square slice), μ from HU with
    ``mu_water`` (1/mm)."""
    mu_water = check_mu_water(mu_water)
    if views < 1:
        raise LCTfoundError(f"the number of views must be at least 1, got {views}")
    progress = ensure_progress(progress)
    pixel_mm = square_pixel_mm(volume.spacing)
    padded, _ = pad_to_square(np.asarray(volume.array, dtype=np.float64), HU_AIR)
    size = padded.shape[-1]
    geometry = geometry or Geometry.for_image(kind, views, size, pixel_mm)
    projector = Projector(geometry, size, pixel_mm)
    indices = _slice_indices(slices, volume.shape[0])
    out = np.empty((len(indices), geometry.views, geometry.detectors))
    for done, k in enumerate(indices, start=1):
        progress.check_cancelled()
        out[done - 1] = projector.forward(hu_to_mu(padded[k], mu_water))
        progress.update(done, len(indices), f"projecting slice {k}")
    return SinogramStack(out, geometry, size, pixel_mm, float(volume.spacing[2]), indices, volume,
                         volume.metadata.get("source"), mu_water)


def _slice_indices(slices: Optional[Sequence[int]], count: int) -> list[int]:
    indices = list(range(count)) if slices is None else sorted(set(int(k) for k in slices))
    if not indices:
        raise LCTfoundError("no slices chosen")
    bad = [k for k in indices if not 0 <= k < count]
    if bad:
        raise LCTfoundError(f"slice {bad[0]} is outside the volume (0..{count - 1})")
    return indices


def sidecar_path(path: str | os.PathLike) -> Path:
    """``sino.npy`` / ``sino.nii.gz`` → ``sino.json`` beside it."""
    path = Path(path)
    name = path.name
    for suffix in sorted(SINOGRAM_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".json")
    return path.with_name(name + ".json")


def read_sinograms(path: str | os.PathLike, geometry: Optional[dict[str, Any]] = None,
                   mu_water: Optional[float] = None) -> SinogramStack:
    """Measured line integrals from a .npy (no pickles), .nrrd, .nii(.gz) or .mha file of shape
    (slices, views, detectors) — NRRD/NIfTI axes (i, j, k) = (detector, view, slice) — and the
    JSON sidecar beside it (``sino.npy`` → ``sino.json``) or ``geometry``: the `Geometry`
    fields plus ``image_size`` and ``pixel_mm`` of the grid to reconstruct and, optionally,
    ``slice_spacing_mm`` and ``mu_water_per_mm``. The format, with an example, is in
    docs/sinogram-format.md. ``mu_water`` (1/mm), when given, overrides the sidecar's value;
    without either, `MU_WATER_PER_MM` is used."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path}: no such sinogram file")
    name = path.name.lower()
    if not name.endswith(SINOGRAM_SUFFIXES):
        raise InputError(f"{path}: unsupported sinogram format; use one of {', '.join(SINOGRAM_SUFFIXES)}")
    if geometry is None:
        side = sidecar_path(path)
        if not side.is_file():
            raise InputError(f"{path}: no geometry; write it to {side.name} beside the file (JSON with kind, views, "
                             "detectors, detector_spacing_mm, ..., image_size, pixel_mm)")
        try:
            geometry = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise InputError(f"{side}: cannot be read as JSON ({error})") from None
        if not isinstance(geometry, dict):
            raise InputError(f"{side}: must hold a JSON object")
    settings = dict(geometry)
    try:
        image_size = int(settings.pop("image_size"))
        pixel_mm = float(settings.pop("pixel_mm"))
    except KeyError as error:
        raise InputError(f"{path}: the geometry does not give {error.args[0]} (the grid to reconstruct)") from None
    except (TypeError, ValueError):
        raise InputError(f"{path}: image_size and pixel_mm must be numbers") from None
    slice_spacing = float(settings.pop("slice_spacing_mm", 1.0))
    sidecar_mu = settings.pop("mu_water_per_mm", None)
    mu_water = check_mu_water(mu_water if mu_water is not None else
                              (sidecar_mu if sidecar_mu is not None else MU_WATER_PER_MM))
    settings.pop("units", None)
    parsed = Geometry.from_dict(settings)
    if name.endswith(".npy"):
        try:
            array = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise InputError(f"{path}: cannot be read as a NumPy array ({error})") from None
    else:
        import SimpleITK as sitk

        from ..io.headers import check_volume_file
        from ..io.volume import itk_error_summary

        check_volume_file(path, require_spacing=False)  # the header against the file, before ITK allocates
        try:
            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        except RuntimeError as error:
            raise InputError(f"{path}: cannot be read ({itk_error_summary(error)})") from None
    from ..io.volume import check_finite

    check_finite(array, str(path))
    if image_size < 8 or not 0 < pixel_mm < float("inf"):
        raise InputError(f"{path}: image_size must be at least 8 and pixel_mm positive")
    return SinogramStack(array, parsed, image_size, pixel_mm, slice_spacing, None, None, str(path), mu_water)


def write_sinograms(stack: SinogramStack, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``stack`` as float32 .npy plus its JSON sidecar, atomically."""
    from ..atomic import atomic_file

    path = Path(path).expanduser()
    if not path.name.lower().endswith(".npy"):
        raise LCTfoundError(f"{path}: sinograms are written as .npy (with a .json geometry sidecar)")
    side = sidecar_path(path)
    for target in (path, side):
        if target.exists() and not overwrite:
            raise LCTfoundError(f"{target}: already exists; choose a new file",
                                option_hints={"overwrite": "or pass --overwrite to replace it"})
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, stack.sinograms.astype(np.float32), allow_pickle=False)
    with atomic_file(side) as tmp:
        tmp.write_text(json.dumps(stack.sidecar(), indent=2) + "\n", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# LCTfound-guided diffusion
# --------------------------------------------------------------------------------------------


def data_consistency(projector: Projector, image_mu: np.ndarray, sinogram: np.ndarray, iterations: int) -> np.ndarray:
    """``iterations`` of LSQR on A x = y started at ``image_mu``: → x + A⁺(y − A x) (DDNM's
    range-space correction), then non-negativity."""
    from scipy.sparse.linalg import LinearOperator, lsqr

    if iterations <= 0:
        return image_mu
    n = projector.image_size
    shape = sinogram.shape
    operator = LinearOperator((sinogram.size, n * n), dtype=np.float64,
                              matvec=lambda v: projector.forward(v.reshape(n, n)).ravel(),
                              rmatvec=lambda w: projector.adjoint(w.reshape(shape)).ravel())
    result = lsqr(operator, sinogram.ravel(), x0=np.asarray(image_mu, dtype=np.float64).ravel(), iter_lim=iterations)
    return np.maximum(result[0].reshape(n, n), 0.0)


def check_diffusion_model(model) -> None:
    """A model the diffusion reconstruction can use: an ε-predicting LCTfound U-Net with 3 channels."""
    config = model.unet.config
    if model.condition_encoder is None:
        raise LCTfoundError(f"model {model.metadata.get('name') or model.path}: has no prompt vectors; cache them with "
                            "`lctfound model add-prompts MODEL --bert BERT_FOLDER`")
    prediction = model.scheduler.config.get("prediction_type", "epsilon")
    if config.in_channels != 3 or config.out_channels != 3 or prediction != "epsilon":
        raise LCTfoundError(f"model {model.metadata.get('name') or model.path}: sparse-view diffusion needs an "
                            f"LCTfound denoising U-Net (3 → 3 channels, ε prediction); this one has "
                            f"{config.in_channels} → {config.out_channels} channels, {prediction} prediction")


def load_diffusion_model(spec: str | os.PathLike | None, device: str = "auto"):
    """Load a backbone for diffusion reconstruction: task models and foreign networks are refused
    (`lctfound.pipelines.generation.load_diffusion_model`), and so is a U-Net that is not an
    ε-predicting 3-channel LCTfound one or has no prompt vectors (`check_diffusion_model`)."""
    from .generation import load_diffusion_model as load

    model = load(spec or "default", device)
    check_diffusion_model(model)
    return model


class SparseViewDiffusionPipeline:
    """``pipeline(sinograms, geometry, image_size, pixel_mm, seed=0)`` → (slices, N, N) HU and seconds per slice.

    steps: DDIM steps over the full schedule; strength: 1 starts from pure noise, s < 1 starts
    at that fraction of the schedule from the TV reconstruction noised to it (SDEdit-style,
    only ⌈s·steps⌉ network calls); dc_iterations: LSQR iterations per step; eta: DDIM noise
    (0 deterministic given the seed); refine_iterations / tv_weight: TV refinement at the volume
    grid when it is finer than the model's.
    """

    def __init__(self, model, window: str = "lung", steps: int = 50, strength: float = 1.0, dc_iterations: int = 10,
                 eta: float = 0.0, batch_size: int = 4, refine_iterations: int = 10, tv_weight: float = 0.005,
                 tv_iterations: int = 50):
        from diffusers import DDIMScheduler

        from ..models.conditioning import condition_prompt
        from ..windows import get_window

        check_diffusion_model(model)
        if steps < 1:
            raise LCTfoundError(f"steps must be at least 1, got {steps}")
        if not 0.0 < strength <= 1.0:
            raise LCTfoundError(f"strength must be in (0, 1], got {strength}")
        if dc_iterations < 0 or refine_iterations < 0 or tv_iterations < 0:
            raise LCTfoundError("iteration counts must be at least 0")
        if batch_size < 1:
            raise LCTfoundError(f"batch size must be at least 1, got {batch_size}")
        self.model = model
        self.window = get_window(window)
        self.prompt = condition_prompt(window)
        self.scheduler = DDIMScheduler.from_config(model.scheduler.config)
        self.steps, self.strength, self.eta = int(steps), float(strength), float(eta)
        self.dc_iterations, self.batch_size = int(dc_iterations), int(batch_size)
        self.refine_iterations, self.tv_weight, self.tv_iterations = int(refine_iterations), float(tv_weight), int(
            tv_iterations)

    def settings(self) -> dict[str, Any]:
        return {"window": self.window.name if self.window.name != "custom" else
                f"{self.window.width:g},{self.window.level:g}", "steps": self.steps, "strength": self.strength,
                "dc_iterations": self.dc_iterations, "eta": self.eta, "refine_iterations": self.refine_iterations,
                "tv_weight": self.tv_weight, "tv_iterations": self.tv_iterations, "sampler": "ddim",
                "consistency": "LSQR from x0 each step (DDNM range-space correction)"}

    def _to_model(self, hu: np.ndarray) -> torch.Tensor:
        """HU (B, n, n) → model input (B, 3, n, n) in [−1, 1], fixed window mapping."""
        from ..preprocessing import unit_to_model, window_to_unit

        return unit_to_model(window_to_unit(torch.from_numpy(hu).float(), self.window, mode="fixed"))

    def _to_hu(self, x: torch.Tensor) -> np.ndarray:
        from ..preprocessing import model_to_hu

        return model_to_hu(x.float().cpu(), self.window).numpy().astype(np.float64)

    @torch.no_grad()
    def __call__(self, sinograms: np.ndarray, geometry: Geometry, image_size: int, pixel_mm: float, seed: int = 0,
                 slice_ids: Optional[Sequence[int]] = None, progress: Optional[Progress] = None,
                 mu_water: float = MU_WATER_PER_MM) -> tuple[np.ndarray, list[float]]:
        progress = ensure_progress(progress)
        mu_water = check_mu_water(mu_water)
        sinograms = check_sinogram_stack(sinograms, geometry)
        count = sinograms.shape[0]
        slice_ids = list(range(count)) if slice_ids is None else [int(k) for k in slice_ids]
        size = int(self.model.unet.config.sample_size)
        model_pixel = pixel_mm * image_size / size
        small = Projector(geometry, size, model_pixel)
        full = Projector(geometry, image_size, pixel_mm) if size != image_size else small
        self.scheduler.set_timesteps(self.steps)
        timesteps = self.scheduler.timesteps
        timesteps = timesteps[len(timesteps) - max(1, math.ceil(self.strength * len(timesteps))):]
        calls = len(timesteps)
        total_units = count * (calls + 1)
        results = np.empty((count, image_size, image_size))
        seconds: list[float] = []
        device, dtype = self.model.device, self.model.unet.dtype
        for first in range(0, count, self.batch_size):
            batch = list(range(first, min(count, first + self.batch_size)))
            start = time.perf_counter()
            generators = [torch.Generator().manual_seed(int(seed) * 1_000_003 + int(slice_ids[i])) for i in batch]
            noise = torch.cat([torch.randn((1, 3, size, size), generator=g) for g in generators])
            if self.strength < 1.0:
                initial = np.stack([mu_to_hu(tv_reconstruction(sinograms[i], geometry, size, model_pixel,
                                                               self.tv_iterations, self.tv_weight, small), mu_water)
                                    for i in batch])
                x = self.scheduler.add_noise(self._to_model(initial), noise, timesteps[:1])
                carry = initial - np.clip(initial, self.window.low, self.window.high)
            else:
                x = noise * self.scheduler.init_noise_sigma
                carry = np.zeros((len(batch), size, size))
            context = self.model.encode_prompts([self.prompt] * len(batch))
            estimate = np.zeros((len(batch), size, size))
            for step, t in enumerate(timesteps):
                progress.check_cancelled()
                eps = self.model.unet(x.to(device, dtype), t, encoder_hidden_states=context).sample.float().cpu()
                alpha = self.scheduler.alphas_cumprod[int(t)]
                x0 = ((x - (1 - alpha).sqrt() * eps) / alpha.sqrt()).clamp(-1, 1)
                prior = self._to_hu(x0) + carry
                for j, i in enumerate(batch):
                    estimate[j] = mu_to_hu(data_consistency(small, hu_to_mu(prior[j], mu_water), sinograms[i],
                                                            self.dc_iterations), mu_water)
                clipped = np.clip(estimate, self.window.low, self.window.high)
                carry = estimate - clipped
                x0_consistent = self._to_model(clipped)
                eps_consistent = (x - alpha.sqrt() * x0_consistent) / (1 - alpha).sqrt()
                variance_noise = torch.cat([torch.randn((1, 3, size, size), generator=g) for g in generators])
                x = self.scheduler.step(eps_consistent, t, x, eta=self.eta, variance_noise=variance_noise).prev_sample
                progress.update(first * (calls + 1) + len(batch) * (step + 1), total_units,
                                f"slices {slice_ids[batch[0]]}-{slice_ids[batch[-1]]}: step {step + 1}/{calls}")
            for j, i in enumerate(batch):
                if full is small:
                    results[i] = estimate[j]
                else:
                    upsampled = _resize(hu_to_mu(estimate[j], mu_water), image_size)
                    results[i] = mu_to_hu(tv_reconstruction(sinograms[i], geometry, image_size, pixel_mm,
                                                            self.refine_iterations, self.tv_weight, full,
                                                            initial=upsampled), mu_water)
            elapsed = time.perf_counter() - start
            seconds += [elapsed / len(batch)] * len(batch)
            progress.update((batch[-1] + 1) * (calls + 1), total_units, f"slice {slice_ids[batch[-1]]} done")
        return results, seconds


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    return resize(image, (size, size), order=1, mode="edge", anti_aliasing=False, preserve_range=True)


# --------------------------------------------------------------------------------------------
# Volumes
# --------------------------------------------------------------------------------------------


def reconstruct_sparse_view(stack: SinogramStack, method: str, *, filter_name: str = "ramp", tv_iterations: int = 50,
                            tv_weight: float = 0.005, pipeline: Optional[SparseViewDiffusionPipeline] = None,
                            seed: int = 0, progress: Optional[Progress] = None) -> CTVolume:
    """A new volume reconstructed from ``stack`` by ``method`` (fbp, tv or diffusion; diffusion
    needs ``pipeline``). On the simulated volume's grid when there is one (slices not in the
    stack hold −1024 HU), else on the stack's square grid (origin 0, identity direction)."""
    if method not in METHODS:
        raise LCTfoundError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "diffusion" and pipeline is None:
        raise LCTfoundError("diffusion reconstruction needs a model (SparseViewDiffusionPipeline)")
    if filter_name not in FBP_FILTERS:
        raise LCTfoundError(f"unknown FBP filter {filter_name!r}; choose from {', '.join(FBP_FILTERS)}")
    progress = ensure_progress(progress)
    count, size = stack.sinograms.shape[0], stack.image_size
    slice_ids = stack.slices if stack.slices is not None else list(range(count))
    images = np.empty((count, size, size))
    seconds: list[float] = []
    parameters: dict[str, Any] = {"method": method, "views": stack.geometry.views, "geometry_kind": stack.geometry.kind,
                                  "geometry": stack.geometry.to_dict(),
                                  "mu_water_per_mm": float(stack.mu_water_per_mm),
                                  "hu_definition": "HU = 1000 * (mu / mu_water_per_mm - 1)"}
    model_info = None
    if method == "diffusion":
        images, seconds = pipeline(stack.sinograms, stack.geometry, size, stack.pixel_mm, seed, slice_ids, progress,
                                   mu_water=stack.mu_water_per_mm)
        parameters.update(pipeline.settings())
        parameters["seed"] = int(seed)
        from ..io.provenance import model_provenance

        model_info = model_provenance(pipeline.model)
    else:
        projector = Projector(stack.geometry, size, stack.pixel_mm)
        if method == "fbp":
            parameters["filter"] = filter_name
        else:
            parameters.update({"tv_iterations": int(tv_iterations), "tv_weight": float(tv_weight),
                               "algorithm": "FISTA-accelerated SIRT with a Chambolle TV proximal step, from FBP"})
        for i in range(count):
            progress.check_cancelled()
            start = time.perf_counter()
            if method == "fbp":
                mu = projector.fbp(stack.sinograms[i], filter_name)
            else:
                mu = tv_reconstruction(stack.sinograms[i], stack.geometry, size, stack.pixel_mm, tv_iterations,
                                       tv_weight, projector)
            images[i] = mu_to_hu(mu, stack.mu_water_per_mm)
            seconds.append(time.perf_counter() - start)
            progress.update(i + 1, count, f"slice {slice_ids[i]}")
    if stack.volume is not None:
        source = stack.volume
        array = np.full(source.shape, UNRECONSTRUCTED_HU, dtype=np.float32)
        _, crop = pad_to_square(np.zeros((1,) + source.shape[1:]), 0.0)
        for i, k in enumerate(slice_ids):
            array[k] = images[i][crop]
        spacing, origin, direction = source.spacing, source.origin, source.direction.copy()
        source_name, total = volume_source(source), source.shape[0]
    else:
        source_name, total = stack.source, count
        array = images.astype(np.float32)
        spacing = (stack.pixel_mm, stack.pixel_mm, stack.slice_spacing_mm)
        origin, direction = (0.0, 0.0, 0.0), np.eye(3)
    parameters["input"] = "simulated from the volume (noise-free)" if stack.volume is not None else "measured sinograms"
    metadata = provenance(TASK, parameters, source_name, slice_ids, total, seconds, model_info)
    return CTVolume(array, spacing, origin, direction, metadata)



"""Low-dose CT simulated from a full-dose scan in the projection domain (Poisson noise, real projector).

Each slice is converted to linear attenuation μ (`lctfound.tomography.hu_to_mu`), forward
projected (scikit-image projector, parallel or fan beam), and transmitted photon counts are
drawn as I ~ Poisson(I₀·e^(−p)) (plus optional Gaussian electronic noise on the counts), then
taken back to line integrals −ln(I/I₀) and reconstructed by FBP. Counts below one photon
(photon starvation, or negative after electronic noise) are set to one photon before the log.

Two ways to produce the output on the input grid:

* ``noise-insertion`` (default): output = input + FBP(p_noisy − p). FBP is linear, so this adds
  exactly the reconstructed projection noise and keeps the input's resolution, texture and
  reconstruction kernel (no FBP round-trip blur or discretisation error);
* ``reconstruct``: output = FBP(p_noisy), a complete re-reconstruction (carries the projector's
  round-trip error: 7 HU RMSE parallel, 15 HU fan at 512² with 720 views, lung1 slice 24).

The input is itself a noisy scan at I₀. With ``input_noise=True`` (default) the simulated noise
is only the part missing for dose fraction d: counts are drawn at I₀·d/(1 − d), whose log-domain
variance e^p·(1 − d)/(d·I₀) plus the input's e^p/I₀ gives the target e^p/(d·I₀) (the
high-dose-scan method of Zeng et al., Med. Phys. 2015). ``input_noise=False`` treats the input
as noise-free and draws at I₀·d (use it for phantoms). ``incident_photons`` I₀ counts photons per
detector bin per view at full dose.

This module only simulates; the enhancement of low-dose scans is a separate pipeline.
"""

from __future__ import annotations

import datetime as _dt
import time
from typing import Any, Optional, Sequence

import numpy as np

from .. import __version__
from ..errors import LCTfoundError
from .names import low_dose_name as result_name  # noqa: F401 - re-exported
from ..io.volume import CTVolume
from ..progress import Progress, ensure_progress
from .choices import DEFAULT_INCIDENT_PHOTONS, DEFAULT_VIEWS, LOW_DOSE_METHODS  # noqa: F401 - re-exported
from ..tomography import (
    HU_AIR,
    MU_WATER_PER_MM,
    Geometry,
    Projector,
    hu_to_mu,
    mu_to_hu,
    pad_to_square,
    square_pixel_mm,
)

TASK = "simulate-low-dose"
METHODS = LOW_DOSE_METHODS
#: Value of the slices a run did not simulate (``slices=`` a subset): air.
UNPROCESSED_HU = -1024.0
#: Voxels below this are padding outside the scanner's field of view, not air: left unchanged.
PADDING_BELOW_HU = -1024.5


def noisy_line_integrals(line_integrals: np.ndarray, incident_photons: float, rng: np.random.Generator,
                         electronic_noise: float = 0.0) -> np.ndarray:
    """Line integrals measured with ``incident_photons`` per bin: Poisson counts (+ Gaussian
    electronic noise of ``electronic_noise`` counts standard deviation) → −ln(I/I₀)."""
    if not incident_photons > 0:
        raise LCTfoundError(f"incident photons must be positive, got {incident_photons}")
    if electronic_noise < 0:
        raise LCTfoundError(f"electronic noise must be non-negative, got {electronic_noise}")
    expected = incident_photons * np.exp(-np.asarray(line_integrals, dtype=np.float64))
    counts = rng.poisson(expected).astype(np.float64)
    if electronic_noise > 0:
        counts += rng.normal(0.0, electronic_noise, size=counts.shape)
    return -np.log(np.maximum(counts, 1.0) / incident_photons)


def effective_photons(dose_fraction: float, incident_photons: float, input_noise: bool) -> float:
    """Photons per bin to draw at so that the output has the noise of ``dose_fraction``."""
    check_dose_fraction(dose_fraction)
    if input_noise:
        return incident_photons * dose_fraction / (1.0 - dose_fraction)
    return incident_photons * dose_fraction


def check_dose_fraction(dose_fraction: float) -> None:
    if not 0.0 < dose_fraction < 1.0:
        raise LCTfoundError(f"dose fraction must be between 0 and 1 (e.g. 0.1 for 10 %), got {dose_fraction}")


def simulate_low_dose_slice(hu: np.ndarray, projector: Projector, dose_fraction: float,
                            rng: np.random.Generator, incident_photons: float = DEFAULT_INCIDENT_PHOTONS,
                            electronic_noise: float = 0.0, method: str = "noise-insertion",
                            input_noise: bool = True) -> np.ndarray:
    """One square HU slice at ``dose_fraction`` of its dose (float64 HU, same shape)."""
    if method not in METHODS:
        raise LCTfoundError(f"unknown low-dose method {method!r}; choose from {', '.join(METHODS)}")
    photons = effective_photons(dose_fraction, incident_photons, input_noise)
    hu = np.asarray(hu, dtype=np.float64)
    clean = projector.forward(hu_to_mu(hu))
    noisy = noisy_line_integrals(clean, photons, rng, electronic_noise)
    if method == "reconstruct":
        return mu_to_hu(projector.fbp(noisy))
    return hu + projector.fbp(noisy - clean) / MU_WATER_PER_MM * 1000.0


def simulate_low_dose(volume: CTVolume, dose_fraction: float, *, incident_photons: float = DEFAULT_INCIDENT_PHOTONS,
                      geometry: Optional[Geometry] = None, geometry_kind: str = "fan", views: int = DEFAULT_VIEWS,
                      electronic_noise: float = 0.0, method: str = "noise-insertion", input_noise: bool = True,
                      seed: int = 0, slices: Optional[Sequence[int]] = None,
                      progress: Optional[Progress] = None) -> CTVolume:
    """A new volume: ``volume`` as if scanned at ``dose_fraction`` of its dose.

    ``geometry`` (for the volume's square in-plane grid) defaults to `Geometry.for_image` of
    ``geometry_kind`` with ``views``. Slice k uses the random stream ``seed``/k, so a slice's
    noise does not depend on which other slices are simulated. ``slices`` limits the work to
    those slice indices (the others hold −1024 HU; the metadata lists the slices done).
    The result's metadata holds the task, every parameter and the time per slice.
    """
    check_dose_fraction(dose_fraction)
    if method not in METHODS:
        raise LCTfoundError(f"unknown low-dose method {method!r}; choose from {', '.join(METHODS)}")
    progress = ensure_progress(progress)
    pixel_mm = square_pixel_mm(volume.spacing)
    array = np.asarray(volume.array)
    padded, crop = pad_to_square(array.astype(np.float64), HU_AIR)
    size = padded.shape[-1]
    geometry = geometry or Geometry.for_image(geometry_kind, views, size, pixel_mm)
    projector = Projector(geometry, size, pixel_mm)
    indices = list(range(array.shape[0])) if slices is None else sorted(set(int(k) for k in slices))
    if not indices:
        raise LCTfoundError("no slices to simulate")
    output = np.full(array.shape, UNPROCESSED_HU)
    seconds = []
    progress.update(0, len(indices), "projecting")
    for done, k in enumerate(indices, start=1):
        progress.check_cancelled()
        start = time.perf_counter()
        rng = np.random.default_rng([int(seed), int(k)])
        result = simulate_low_dose_slice(padded[k], projector, dose_fraction, rng, incident_photons,
                                         electronic_noise, method, input_noise)[crop]
        padding = array[k] < PADDING_BELOW_HU
        output[k] = np.where(padding, array[k], result)
        seconds.append(time.perf_counter() - start)
        progress.update(done, len(indices), f"slice {k}")
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(np.int16)
        output = np.clip(np.round(output), info.min, info.max).astype(np.int16)
    else:
        output = output.astype(np.float32)
    parameters = {"dose_fraction": float(dose_fraction), "incident_photons": float(incident_photons),
                  "electronic_noise": float(electronic_noise), "method": method, "input_noise": bool(input_noise),
                  "geometry": geometry.to_dict(), "seed": int(seed), "mu_water_per_mm": MU_WATER_PER_MM}
    metadata = provenance(TASK, parameters, volume_source(volume), indices, volume.shape[0], seconds)
    return CTVolume(output, volume.spacing, volume.origin, volume.direction.copy(), metadata)


def provenance(task: str, parameters: dict[str, Any], source: Optional[str], slices: Sequence[int], total_slices: int,
               seconds: Sequence[float], model: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The metadata of a result volume, flat (Slicer stores each key as a node attribute): the task,
    its parameters, the source, the slices done, the time per slice, the model (name, path,
    sha256 from `lctfound.io.provenance.model_provenance`) and the version."""
    metadata: dict[str, Any] = {"task": task, **parameters, "source": source,
                                "slices": list(int(k) for k in slices) if len(slices) != total_slices else "all",
                                "seconds_per_slice": float(np.median(seconds)) if len(seconds) else None,
                                "seconds_total": float(np.sum(seconds))}
    if model is not None:
        metadata.update(model)
    metadata["lctfound_version"] = __version__
    metadata["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return metadata


def volume_source(volume: CTVolume) -> Optional[str]:
    """The file or node a volume came from, for provenance."""
    return volume.metadata.get("source") or volume.metadata.get("name")



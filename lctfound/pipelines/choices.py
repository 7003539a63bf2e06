"""Choices and defaults of the enhancement pipelines and their training, without torch or scipy.

The command line builds every option (and ``--help``) from these; keeping them here, and not in the
pipeline modules that import torch, lets `lctfound --help` and the light commands start in a fraction of
a second. The pipeline modules import their constants from here, so each is defined once.
"""

from __future__ import annotations

# simulate-low-dose (`lctfound.pipelines.low_dose`)
LOW_DOSE_METHODS = ("noise-insertion", "reconstruct")
#: Full-dose photons per detector bin per view. With the default 720-view fan geometry this gives
#: 16.5 HU noise (ramp FBP) in soft tissue of lung1 slice 24 at full dose (measured with
#: ``input_noise=False``), the order of a routine chest CT; 10 % dose then adds about 50 HU.
DEFAULT_INCIDENT_PHOTONS = 1.0e5
DEFAULT_VIEWS = 720

# classical low-dose denoising (`lctfound.pipelines.classical_denoise`)
#: TV weight per HU of estimated noise (on HU/1000): 50 HU → 0.08, the benchmark's best weight at 10 % dose.
TV_WEIGHT_PER_SIGMA = 1.6
#: NLM h per estimated noise σ (scikit-image's example for fast mode).
NLM_H_PER_SIGMA = 0.8

# sparse-view (`lctfound.pipelines.sparse_view`)
SPARSE_VIEW_METHODS = ("fbp", "tv", "diffusion")
#: μ of water in 1/mm at the effective energy the simulation and the HU conversion assume
#: (`lctfound.tomography`; docs/sinogram-format.md).
MU_WATER_PER_MM = 0.0193
#: Filters of filtered back-projection (`lctfound.tomography`).
FBP_FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")

# super-resolution (`lctfound.pipelines.super_resolution`)
SUPER_RESOLUTION_FACTORS = (2, 4, 8)
SUPER_RESOLUTION_AXES = ("in-plane", "through-plane")
SUPER_RESOLUTION_METHODS = ("ddnm", "bicubic", "bspline")
#: η of the DDNM update: the DDNM code's default (and the official zero-shot script's unused --eta).
DEFAULT_ETA = 0.85
INTENSITY_MAPPINGS = ("official", "fixed")
#: Through-plane acquisition models: a thick slice is the mean of its f thin slices, or the thin slice at its centre.
SLICE_MODELS = ("average", "point")
#: What each through-plane slice model assumes (help text and provenance).
SLICE_MODEL_TEXT = {
    "average": "thick slice = mean of the f thin slices it covers (box profile); thin-slice centres average to "
               "the thick centre",
    "point": "thick slice = the thin slice at its centre (point sample); every f-th thin slice lies on a thick "
             "slice, (N-1)*f+1 thin slices",
}

# low-dose enhancement by cold diffusion (`lctfound.pipelines.cold_diffusion`)
COLD_DIFFUSION_DEFAULT_STEPS = 10
COLD_DIFFUSION_DEFAULT_TIMESTEP_MAX = 20
COLD_DIFFUSION_DEFAULT_WINDOW = "lung"

# synthetic CT generation (`lctfound.pipelines.generation`)
SAMPLERS = ("ddim", "dpm-solver", "ddpm")

# virtual CTA (`lctfound.pipelines.vcta`)
VCTA_MODES = ("full", "adapter")

# training of the enhancers (`lctfound.training.enhancement`)
LOSSES = ("mse", "l1")
#: γ of the min-SNR loss weights of VCTA fine-tuning (Hang et al.'s recommended 5); None = plain ε-MSE.
DEFAULT_MIN_SNR_GAMMA = 5.0

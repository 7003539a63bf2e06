"""The noise schedule of LCTfound: diffusers' `DDPMScheduler` exactly as the official code built it.

``DDPMScheduler(num_train_timesteps=1000)`` with every other value the default (reference §3):
linear β from 1e-4 to 0.02, ε-prediction, "fixed_small" variance, sample clipping to [-1, 1],
"leading" timestep spacing. The defaults are written out so a diffusers release that changes
them cannot change the model's noise process.
"""

from __future__ import annotations

OFFICIAL_SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": True,
    "clip_sample_range": 1.0,
    "thresholding": False,
    "timestep_spacing": "leading",
    "steps_offset": 0,
}


def make_ddpm_scheduler(**overrides):
    from diffusers import DDPMScheduler

    return DDPMScheduler(**{**OFFICIAL_SCHEDULER_CONFIG, **overrides})

"""The names of the enhancement tasks' results (file stems), without torch, numpy or scipy.

A result is named after its source and the task's parameters (``lung1_image_ldct-tv``). The local
commands and their ``--server`` paths both name outputs with these (a thin client has no torch), and
the pipeline modules re-export each as their ``result_name``.
"""

from __future__ import annotations


def low_dose_name(stem: str, dose_fraction: float) -> str:
    """``lung1_image`` at 0.1 → ``lung1_image_lowdose10pct``: names a result after its task and dose."""
    return f"{stem}_lowdose{dose_fraction * 100:g}".replace(".", "p") + "pct"


def classical_denoise_name(stem: str, method: str) -> str:
    """``lung1_image``, tv → ``lung1_image_ldct-tv``."""
    return f"{stem}_ldct-{method}"


def cold_diffusion_name(source_name: str, steps: int) -> str:
    """``lung1_ldct-cold-diffusion-10steps``: a result named after its task and parameters (a valid file stem)."""
    return f"{source_name}_ldct-cold-diffusion-{steps}steps"


def sparse_view_name(stem: str, method: str, views: int, kind: str) -> str:
    """``lung1_image``, tv, 16, fan → ``lung1_image_sparse16fan_tv``."""
    return f"{stem}_sparse{views}{kind}_{method}"


def super_resolution_name(stem: str, method: str, factor: int, axis: str, slice_model: str = "average") -> str:
    """A result named after its task and parameters: ``lung1_image`` → ``lung1_image_sr-ddnm-x4-in-plane``
    (``..._through-plane-point`` for the point-sample model)."""
    suffix = "-point" if axis == "through-plane" and slice_model == "point" else ""
    return f"{stem}_sr-{method}-x{factor}-{axis}{suffix}"


def vcta_name(source_name: str, steps: int, seed: int, strength: float = 1.0) -> str:
    """``lung1_vcta-ddim50-seed0`` (``…-strength0.5`` when below 1): named after the task and its parameters."""
    name = f"{source_name}_vcta-ddim{steps}-seed{seed}"
    return name + (f"-strength{strength:g}" if strength < 1 else "")

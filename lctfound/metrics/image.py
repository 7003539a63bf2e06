"""Image-quality metrics of CT volumes against a reference, per slice and per volume.

* PSNR over a stated HU range: both images are clipped to the range (default −1000..1000 HU,
  data range 2000 HU) and PSNR = 10·log10(range² / MSE);
* SSIM (scikit-image `structural_similarity`, Gaussian window σ = 1.5 as in Wang et al. 2004)
  on the clipped images with the same data range;
* RMSE in HU on the unclipped images;
* VIF (pixel-domain VIF-P, torchmetrics `visual_information_fidelity`, which needs no
  torchvision) on the clipped images scaled to 0..255, the scale its noise constant assumes.

A mask (e.g. the body) restricts PSNR, RMSE and SSIM to its voxels (SSIM: the mean of the SSIM
map there); VIF is a whole-slice measure and ignores it. Per-volume values pool every evaluated
voxel (PSNR and RMSE from the pooled MSE, SSIM the mean over masked pixels of all slices, VIF
the mean over slices). LPIPS is not offered: torchmetrics' LPIPS needs torchvision, which this
project does not install. Nor is CLIP-IQA: torchmetrics' CLIP-IQA weights come from piq (which
needs torchvision), and a plain CLIP checkpoint is a different, untested measure.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from ..errors import InputError, LCTfoundError
from ..io.volume import CTVolume, check_same_grid
from ..progress import Progress, ensure_progress
from .statistics import paired_tests, summarize

DEFAULT_HU_RANGE = (-1000.0, 1000.0)
METRICS = ("psnr", "ssim", "rmse_hu", "vif")
#: Higher is better for every metric but RMSE.
HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "rmse_hu": False, "vif": True}
VIF_MIN_SIZE = 41  # torchmetrics' VIF uses 4 scales of Gaussian windows and needs 41×41 pixels


def parse_hu_range(text: str | Sequence[float] | None) -> tuple[float, float]:
    """``"-1000,1000"`` (or a pair) → (low, high) with low < high."""
    if text is None:
        return DEFAULT_HU_RANGE
    try:
        if isinstance(text, str):
            low, high = (float(part) for part in text.replace(":", ",").split(","))
        else:
            low, high = (float(v) for v in text)
    except ValueError:
        raise LCTfoundError(f"cannot read HU range {text!r}; use LOW,HIGH, e.g. -1000,1000") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise LCTfoundError(f"HU range must be LOW,HIGH with LOW < HIGH, got {low:g},{high:g}")
    return low, high


def slice_metrics(prediction: np.ndarray, reference: np.ndarray, hu_range: tuple[float, float] = DEFAULT_HU_RANGE,
                  mask: Optional[np.ndarray] = None) -> dict[str, float]:
    """PSNR (dB), SSIM, RMSE (HU) and VIF of one 2D slice, plus the sums the volume values pool."""
    import torch
    from skimage.metrics import structural_similarity
    from torchmetrics.functional.image import visual_information_fidelity

    prediction = np.asarray(prediction, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    if prediction.shape != reference.shape or prediction.ndim != 2:
        raise LCTfoundError(f"slices must be 2D and of the same shape, got {prediction.shape} and {reference.shape}")
    low, high = hu_range
    data_range = high - low
    keep = np.ones(prediction.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    count = int(keep.sum())
    if count == 0:
        raise LCTfoundError("the mask is empty on this slice")
    clipped_p, clipped_r = np.clip(prediction, low, high), np.clip(reference, low, high)
    clipped_sq = float(((clipped_p - clipped_r)[keep] ** 2).sum())
    raw_sq = float(((prediction - reference)[keep] ** 2).sum())
    mse = clipped_sq / count
    psnr = math.inf if mse == 0 else 10.0 * math.log10(data_range ** 2 / mse)
    _, ssim_map = structural_similarity(clipped_p, clipped_r, data_range=data_range, gaussian_weights=True,
                                        sigma=1.5, use_sample_covariance=False, full=True)
    ssim_sum = float(ssim_map[keep].sum())
    vif = math.nan
    if min(prediction.shape) >= VIF_MIN_SIZE:
        scale = 255.0 / data_range
        to_tensor = lambda a: torch.from_numpy((a - low) * scale).float()[None, None]  # noqa: E731
        vif = float(visual_information_fidelity(to_tensor(clipped_p), to_tensor(clipped_r)))
    return {"psnr": psnr, "ssim": ssim_sum / count, "rmse_hu": math.sqrt(raw_sq / count), "vif": vif,
            "pixels": count, "clipped_sq_sum": clipped_sq, "raw_sq_sum": raw_sq, "ssim_sum": ssim_sum}


@dataclass
class ImageEvaluation:
    """Per-slice metrics of one prediction volume against its reference."""

    prediction: str
    reference: str
    hu_range: tuple[float, float]
    slices: list[int]
    values: dict[str, np.ndarray]  # metric → per-slice values (len(slices))
    volume: dict[str, float]
    mask: Optional[str] = None
    notes: list[str] = field(default_factory=list)


def evaluate_image_volumes(prediction: CTVolume, reference: CTVolume, hu_range: tuple[float, float] = DEFAULT_HU_RANGE,
                           mask: Optional[CTVolume] = None, slices: Optional[Sequence[int]] = None,
                           names: tuple[str, str, Optional[str]] = ("prediction", "reference", None),
                           progress: Optional[Progress] = None) -> ImageEvaluation:
    """Metrics of ``prediction`` against ``reference`` (same grid) on ``slices`` (default all).

    Slices with no mask voxel are left out (listed in the notes).
    """
    progress = ensure_progress(progress)
    check_same_grid(prediction, reference, names[0])
    if mask is not None:
        check_same_grid(mask, reference, names[2] or "mask")
    count = reference.shape[0]
    indices = list(range(count)) if slices is None else [int(k) for k in slices]
    bad = [k for k in indices if not 0 <= k < count]
    if bad:
        raise LCTfoundError(f"slice {bad[0]} is outside the volume (0..{count - 1})")
    notes: list[str] = []
    per_slice: dict[str, list[float]] = {name: [] for name in METRICS}
    kept: list[int] = []
    totals = {"pixels": 0, "clipped_sq_sum": 0.0, "raw_sq_sum": 0.0, "ssim_sum": 0.0}
    skipped = []
    for done, k in enumerate(indices, start=1):
        progress.check_cancelled()
        keep = None if mask is None else np.asarray(mask.array[k]) > 0
        if keep is not None and not keep.any():
            skipped.append(k)
            continue
        values = slice_metrics(prediction.array[k], reference.array[k], hu_range, keep)
        kept.append(k)
        for name in METRICS:
            per_slice[name].append(values[name])
        for name in totals:
            totals[name] += values[name]
        progress.update(done, len(indices), f"slice {k}")
    if skipped:
        notes.append(f"{len(skipped)} slice(s) with an empty mask left out: {_ranges(skipped)}")
    if not kept:
        raise LCTfoundError("no slice to evaluate (the mask is empty on every chosen slice)")
    if min(reference.shape[1:]) < VIF_MIN_SIZE:
        notes.append(f"VIF needs slices of at least {VIF_MIN_SIZE}×{VIF_MIN_SIZE} pixels; not computed")
    low, high = hu_range
    pooled_mse = totals["clipped_sq_sum"] / totals["pixels"]
    vif_values = np.asarray(per_slice["vif"], dtype=np.float64)
    volume = {
        "psnr": math.inf if pooled_mse == 0 else 10.0 * math.log10((high - low) ** 2 / pooled_mse),
        "ssim": totals["ssim_sum"] / totals["pixels"],
        "rmse_hu": math.sqrt(totals["raw_sq_sum"] / totals["pixels"]),
        "vif": float(np.mean(vif_values)) if np.isfinite(vif_values).all() else math.nan,
        "pixels": int(totals["pixels"]),
    }
    return ImageEvaluation(names[0], names[1], (float(low), float(high)), kept,
                           {name: np.asarray(v, dtype=np.float64) for name, v in per_slice.items()}, volume,
                           names[2], notes)


def evaluate_image_files(prediction: str | os.PathLike, reference: str | os.PathLike,
                         hu_range: tuple[float, float] = DEFAULT_HU_RANGE, mask: str | os.PathLike | None = None,
                         slices: Optional[str] = None, progress: Optional[Progress] = None) -> ImageEvaluation:
    """`evaluate_image_volumes` on files (CT volumes; the mask a label map, non-zero = inside)."""
    from ..features import parse_slices
    from ..io.volume import read_label_volume, read_volume

    for path in (prediction, reference):
        if Path(path).is_dir() and not _is_dicom_folder(Path(path)):
            raise InputError(f"{path}: is a folder; evaluate image compares two volume files")
    predicted = read_volume(prediction, validate=False)
    truth = read_volume(reference, validate=False)
    mask_volume = read_label_volume(mask, reference=truth) if mask else None
    chosen = parse_slices(slices, truth.shape[0])
    return evaluate_image_volumes(predicted, truth, hu_range, mask_volume, chosen,
                                  (str(prediction), str(reference), str(mask) if mask else None), progress)


def _is_dicom_folder(path: Path) -> bool:
    from ..io.dicom import looks_like_dicom

    return any(looks_like_dicom(f) for f in sorted(path.iterdir())[:5] if f.is_file())


def _ranges(indices: Sequence[int]) -> str:
    """[3, 4, 5, 9] → "3-5,9" (the syntax ``--slices`` reads)."""
    runs: list[list[int]] = []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


def image_block(evaluation: ImageEvaluation, n_resamples: int, seed: int) -> dict[str, Any]:
    """Summary of one prediction: per-volume values, per-slice summaries (bootstrap over slices)."""
    summaries = {}
    for name in METRICS:
        values = evaluation.values[name]
        finite = _finite(values)
        summary = summarize(finite, n_resamples=n_resamples, seed=seed)
        if finite.size < values.size:
            summary["not_finite"] = int(values.size - finite.size)
        summaries[name] = summary
    return {"prediction": evaluation.prediction, "slices": evaluation.slices, "volume": evaluation.volume,
            "per_slice": summaries, "notes": list(evaluation.notes)}


def image_report(evaluation: ImageEvaluation, compare: Optional[ImageEvaluation] = None, *,
                 n_resamples: int = 1000, seed: int = 0) -> dict[str, Any]:
    """The JSON report of ``evaluate image``: per-volume values, slice summaries with bootstrap
    intervals over slices, and, with ``compare``, paired tests over the common slices."""
    low, high = evaluation.hu_range
    report: dict[str, Any] = {
        "reference": evaluation.reference,
        "mask": evaluation.mask,
        "hu_range": [low, high],
        "data_range_hu": high - low,
        "definitions": {
            "psnr": f"10·log10({high - low:g}² / MSE), both images clipped to {low:g}..{high:g} HU",
            "ssim": "scikit-image SSIM, Gaussian σ=1.5, clipped images, mean over the mask",
            "rmse_hu": "root mean square difference in HU, unclipped, over the mask",
            "vif": "torchmetrics VIF-P on clipped images scaled to 0..255, whole slice",
        },
        "results": image_block(evaluation, n_resamples, seed),
        "bootstrap": {"resamples": n_resamples, "seed": seed, "over": "slices (not independent samples)"},
    }
    if compare is not None:
        report["compare"] = image_block(compare, n_resamples, seed)
        report["comparison"] = compare_images(evaluation, compare, n_resamples=n_resamples, seed=seed)
    return report


def compare_images(first: ImageEvaluation, second: ImageEvaluation, *, n_resamples: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Paired tests (Wilcoxon signed-rank, paired t-test) of first − second over their common slices."""
    common = sorted(set(first.slices) & set(second.slices))
    if len(common) < 2:
        raise LCTfoundError(f"a paired comparison needs at least 2 common slices, got {len(common)}")
    index_a = {k: i for i, k in enumerate(first.slices)}
    index_b = {k: i for i, k in enumerate(second.slices)}
    out: dict[str, Any] = {"slices": common, "metrics": {}}
    for name in METRICS:
        a = first.values[name][[index_a[k] for k in common]]
        b = second.values[name][[index_b[k] for k in common]]
        finite = np.isfinite(a) & np.isfinite(b)
        if finite.sum() < 2:
            out["metrics"][name] = {"n": int(finite.sum()), "note": "fewer than 2 slices with finite values"}
            continue
        tests = paired_tests(a[finite], b[finite], n_resamples=n_resamples, seed=seed)
        tests["higher_is_better"] = HIGHER_IS_BETTER[name]
        if finite.sum() < len(common):
            tests["note"] = "; ".join(filter(None, [tests.get("note"), f"{len(common) - int(finite.sum())} "
                                                    "slice(s) with an infinite value left out"]))
        out["metrics"][name] = tests
    return out


def image_rows(evaluation: ImageEvaluation, set_name: str) -> list[dict[str, Any]]:
    """Per-slice CSV rows."""
    rows = []
    for i, k in enumerate(evaluation.slices):
        row: dict[str, Any] = {"set": set_name, "prediction": evaluation.prediction, "slice": k}
        row.update({name: float(evaluation.values[name][i]) for name in METRICS})
        rows.append(row)
    return rows

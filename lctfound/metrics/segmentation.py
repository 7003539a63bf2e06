"""Segmentation evaluation: Dice, HD95 (mm) and volumes per case and structure, summaries, paired tests.

Arrays are label maps in (k, j, i) order as `CTVolume` holds them; ``spacing`` is the volume's
(i, j, k) voxel size in mm. Dice and the Hausdorff distance come from MONAI (`compute_dice`,
`compute_hausdorff_distance` with ``percentile=95`` and the voxel spacing, so HD95 is in mm).

Empty structures have defined results rather than MONAI's NaN/inf:

* prediction and reference both empty → Dice 1, HD95 0 mm, note ``both empty``;
* only one empty → Dice 0, HD95 undefined (NaN here, ``null`` in JSON) with a note; such cases
  are left out of HD95 summaries and counted there.

With ``slices`` only those slice indices are evaluated: every other slice is cleared in both
maps, so Dice and volumes count the voxels of those slices and HD95 is measured between the
structures as they appear on them (slices keep their 3D positions; distances in mm).
"""

from __future__ import annotations

import math
import os
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError, LCTfoundError
from ..progress import Progress, ensure_progress
from .cases import CASE_SUFFIXES, case_key
from .statistics import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, paired_tests, summarize

BOTH_EMPTY = "both empty: Dice 1, HD95 0"
PREDICTION_EMPTY = "prediction empty: Dice 0, HD95 undefined (infinite)"
REFERENCE_EMPTY = "reference empty: Dice 0, HD95 undefined (infinite)"


# --------------------------------------------------------------------------------------------
# Per case
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StructureScore:
    """The scores of one structure in one case; ``hd95_mm`` is NaN when undefined (see ``note``)."""

    case: str
    label: int
    structure: str
    dice: float
    hd95_mm: float
    prediction_ml: float
    reference_ml: float
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["hd95_mm"] = self.hd95_mm if math.isfinite(self.hd95_mm) else None
        return out


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...]:
    spans = []
    for axis in range(mask.ndim):
        hits = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        spans.append(slice(int(hits[0]), int(hits[-1]) + 1))
    return tuple(spans)


def _crop_pad(box: tuple[slice, ...], *arrays: np.ndarray) -> list[np.ndarray]:
    """The box of each array with one voxel of zeros around it (what MONAI's edge crop does)."""
    return [np.pad(array[box], 1) for array in arrays]


def hd95_mm(prediction: np.ndarray, reference: np.ndarray, spacing_kji: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between two non-empty boolean masks (MONAI).

    ``spacing_kji`` is the voxel size along the array axes. Both masks are cropped to the box
    around them plus one voxel of zeros first, as MONAI's own edge step does, which leaves the
    distances unchanged and keeps large volumes fast.
    """
    import torch
    from monai.metrics import compute_hausdorff_distance

    prediction = np.asarray(prediction, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    prediction, reference = _crop_pad(_bounding_box(prediction | reference), prediction, reference)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's deprecation and empty-mask warnings; callers handle empty masks
        value = compute_hausdorff_distance(torch.from_numpy(prediction)[None, None],
                                           torch.from_numpy(reference)[None, None],
                                           include_background=True, percentile=95,
                                           spacing=[float(s) for s in spacing_kji])
    return float(value.item())


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """Dice of two boolean masks by MONAI; both empty gives 1 (MONAI's ``ignore_empty=False``)."""
    import torch
    from monai.metrics import compute_dice

    prediction = np.asarray(prediction, dtype=bool)
    reference = np.asarray(reference, dtype=bool)
    union = prediction | reference
    if not union.any():
        return 1.0
    box = _bounding_box(union)  # Dice ignores voxels outside both masks
    value = compute_dice(torch.from_numpy(prediction[box])[None, None].double(),
                         torch.from_numpy(reference[box])[None, None].double(),
                         include_background=True, ignore_empty=False)
    return float(value.item())


def _slice_mask(slices: Optional[Sequence[int]], num_slices: int) -> Optional[np.ndarray]:
    if slices is None:
        return None
    indices = [int(s) for s in slices]
    bad = [s for s in indices if not 0 <= s < num_slices]
    if bad:
        raise LCTfoundError(f"slice {bad[0]} is outside the volume (0..{num_slices - 1})")
    if not indices:
        raise LCTfoundError("the slice list is empty")
    mask = np.zeros(num_slices, dtype=bool)
    mask[indices] = True
    return mask


def score_structures(
    prediction: np.ndarray,
    reference: np.ndarray,
    spacing: Sequence[float],
    structures: Mapping[int, str],
    slices: Optional[Sequence[int]] = None,
    case: str = "case",
) -> list[StructureScore]:
    """Dice, HD95 (mm) and volumes (mL) of each structure (label value → name) in one case.

    ``prediction`` and ``reference`` are integer (k, j, i) label maps on the same grid;
    ``spacing`` is (i, j, k) in mm; ``slices`` restricts the evaluation to those slice indices.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape or prediction.ndim != 3:
        raise LCTfoundError(f"{case}: prediction {prediction.shape} and reference {reference.shape} "
                            "must be 3D label maps of the same shape")
    spacing_kji = [float(s) for s in spacing][::-1]
    voxel_ml = float(np.prod(spacing_kji)) / 1000.0
    mask = _slice_mask(slices, reference.shape[0])
    scores = []
    for label, name in sorted(structures.items()):
        predicted = prediction == label
        expected = reference == label
        if mask is not None:  # other slices cleared: the selected ones keep their 3D positions
            predicted[~mask] = False
            expected[~mask] = False
        predicted_voxels = int(np.count_nonzero(predicted))
        expected_voxels = int(np.count_nonzero(expected))
        note = ""
        if predicted_voxels == 0 and expected_voxels == 0:
            value, distance, note = 1.0, 0.0, BOTH_EMPTY
        elif predicted_voxels == 0 or expected_voxels == 0:
            value, distance = 0.0, math.nan
            note = PREDICTION_EMPTY if predicted_voxels == 0 else REFERENCE_EMPTY
        else:
            value = dice(predicted, expected)
            distance = hd95_mm(predicted, expected, spacing_kji)
        scores.append(StructureScore(case, int(label), str(name), value, distance,
                                     predicted_voxels * voxel_ml, expected_voxels * voxel_ml, note))
    return scores


# --------------------------------------------------------------------------------------------
# Structure names
# --------------------------------------------------------------------------------------------


def default_name(label: int) -> str:
    return f"Label {label}"


def parse_structure_names(text: str) -> dict[int, str]:
    """``"1=Lesion,2=Vessel"`` → {1: "Lesion", 2: "Vessel"}."""
    names: dict[int, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        value, sep, name = part.partition("=")
        try:
            label = int(value.strip())
        except ValueError:
            label = -1
        if not sep or label <= 0 or not name.strip():
            raise LCTfoundError(f"cannot read structure name {part.strip()!r}; use e.g. 1=Lesion,2=Vessel "
                                "(label values are positive integers)")
        if label in names:
            raise LCTfoundError(f"label {label} is named twice")
        names[label] = name.strip()
    if not names:
        raise LCTfoundError("no structure names given; use e.g. 1=Lesion,2=Vessel")
    return names


def structure_names_from_model(folder: str | os.PathLike) -> dict[int, str]:
    """The label names a segmentation task model stores in task.json (``labels``: value → name)."""
    from ..models.task_models import read_task_info

    info = read_task_info(Path(folder).expanduser())
    labels = info.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise LCTfoundError(f"{folder}: task.json has no label names (a {info.get('task')} model?)")
    try:
        return {int(value): str(name) for value, name in labels.items() if int(value) > 0}
    except ValueError:
        raise LCTfoundError(f"{folder}: task.json labels are not keyed by label value") from None


# --------------------------------------------------------------------------------------------
# Matching files by case
# --------------------------------------------------------------------------------------------


def _by_case(paths: Sequence[Path], role: str) -> dict[str, Path]:
    groups: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        groups[case_key(path)].append(path)
    out = {}
    for key, members in groups.items():
        if len(members) > 1:
            # An image beside its label map (lung1_image + lung1_label) is not a label map.
            members = [p for p in members if not _stem_lower(p).endswith("_image")] or members
        if len(members) > 1:
            raise InputError(f"{role}s {', '.join(p.name for p in members)} all belong to case {key!r}; "
                             "keep one label map per case in the folder")
        out[key] = members[0]
    return out


def _stem_lower(path: Path) -> str:
    from ..io.volume import volume_stem

    return volume_stem(path).lower()


@dataclass
class CaseMatch:
    """Predictions paired with references by case name, and what was left unpaired."""

    pairs: list[tuple[str, Path, Path]]
    unmatched_predictions: list[Path] = field(default_factory=list)
    unmatched_references: list[Path] = field(default_factory=list)


def match_cases(prediction: str | os.PathLike, reference: str | os.PathLike) -> CaseMatch:
    """Pair label maps of ``prediction`` and ``reference`` (each a file or a folder) by `case_key`.

    Two single files are paired whatever their names. Raises `InputError` when nothing pairs.
    """
    from ..io.volume import find_volumes

    prediction, reference = Path(prediction).expanduser(), Path(reference).expanduser()
    predictions = find_volumes(prediction)
    references = find_volumes(reference)
    if prediction.is_file() and reference.is_file():
        return CaseMatch([(case_key(prediction), prediction, reference)])
    by_prediction = _by_case(predictions, "prediction")
    by_reference = _by_case(references, "reference")
    common = sorted(set(by_prediction) & set(by_reference))
    if not common:
        raise InputError(f"no case of {prediction} matches a case of {reference} (cases are matched by file name "
                         f"without the endings {', '.join(CASE_SUFFIXES)}; e.g. "
                         f"{sorted(by_prediction)[0]!r} vs {sorted(by_reference)[0]!r})")
    return CaseMatch([(key, by_prediction[key], by_reference[key]) for key in common],
                     [by_prediction[k] for k in sorted(set(by_prediction) - set(common))],
                     [by_reference[k] for k in sorted(set(by_reference) - set(common))])


# --------------------------------------------------------------------------------------------
# Evaluating files
# --------------------------------------------------------------------------------------------


@dataclass
class SegmentationEvaluation:
    """Per-case scores of one prediction set against its references."""

    prediction: str
    reference: str
    structures: dict[int, str]
    scores: list[StructureScore]
    cases: list[dict[str, str]]
    unmatched_predictions: list[str] = field(default_factory=list)
    unmatched_references: list[str] = field(default_factory=list)
    slices: Optional[str] = None
    notes: list[str] = field(default_factory=list)

    def case_names(self) -> list[str]:
        return [case["case"] for case in self.cases]

    def values(self, label: int, metric: str) -> dict[str, float]:
        """``metric`` ("dice", "hd95_mm", "prediction_ml", "reference_ml") of ``label`` by case."""
        return {s.case: getattr(s, metric) for s in self.scores if s.label == label}


def _slice_indices(slices: str | Sequence[int] | None, num_slices: int) -> Optional[list[int]]:
    if slices is None:
        return None
    if isinstance(slices, str):
        from ..features import parse_slices

        return parse_slices(slices, num_slices)
    return [int(s) for s in slices]


def _describe_slices(slices: str | Sequence[int] | None) -> Optional[str]:
    if slices is None or isinstance(slices, str):
        return slices or None
    return ",".join(str(int(s)) for s in slices)


def evaluate_segmentation_files(
    prediction: str | os.PathLike,
    reference: str | os.PathLike,
    structures: Optional[Mapping[int, str]] = None,
    slices: str | Sequence[int] | None = None,
    progress: Optional[Progress] = None,
) -> SegmentationEvaluation:
    """Score predicted label maps against reference label maps (files or folders matched by case).

    ``structures`` maps label values to names; None evaluates every label value found in any
    prediction or reference, named "Label N" (a structure absent from both maps of a case scores
    as ``both empty``). Named structures leave other label values out (a note lists them).
    ``slices`` ("10,12-14" or indices) restricts every case to those slices. Each prediction
    must lie on its reference's voxel grid.
    """
    from ..io.volume import check_same_grid, read_label_volume

    progress = ensure_progress(progress)
    match = match_cases(prediction, reference)
    named = dict(structures) if structures else None
    scores: list[StructureScore] = []
    cases = []
    seen: set[int] = set()
    for done, (case, prediction_path, reference_path) in enumerate(match.pairs):
        progress.check_cancelled()
        progress.update(done, len(match.pairs), case)
        expected = read_label_volume(reference_path)
        predicted = read_label_volume(prediction_path)
        check_same_grid(predicted, expected, f"{prediction_path} (prediction for reference {reference_path})")
        indices = _slice_indices(slices, expected.shape[0])
        present = _labels_present(predicted.array, expected.array, indices)
        seen |= present
        labels = named if named is not None else {v: default_name(v) for v in sorted(present)}
        scores += score_structures(predicted.array, expected.array, expected.spacing, labels, indices, case)
        cases.append({"case": case, "prediction": str(prediction_path), "reference": str(reference_path)})
    progress.update(len(match.pairs), len(match.pairs), "done")
    notes = []
    if named is None:
        if not seen:
            raise InputError(f"no labels in any prediction or reference of {prediction} and {reference}; "
                             "name the structures to score", option_hints={"names": "pass --names 1=Lesion"})
        names = {v: default_name(v) for v in sorted(seen)}
    else:
        names = dict(sorted(named.items()))
        ignored = sorted(seen - set(named))
        if ignored:
            notes.append(f"label values {', '.join(map(str, ignored))} are not among the named structures; ignored")
    evaluation = SegmentationEvaluation(str(prediction), str(reference), names, scores, cases,
                                        [str(p) for p in match.unmatched_predictions],
                                        [str(p) for p in match.unmatched_references],
                                        _describe_slices(slices), notes)
    complete_structures(evaluation, names)
    return evaluation


def _labels_present(prediction: np.ndarray, reference: np.ndarray, slices: Optional[Sequence[int]]) -> set[int]:
    if slices is not None:
        prediction, reference = prediction[list(slices)], reference[list(slices)]
    values = set(np.unique(prediction[prediction > 0]).tolist()) | set(np.unique(reference[reference > 0]).tolist())
    return {int(v) for v in values}


def complete_structures(evaluation: SegmentationEvaluation, structures: Mapping[int, str]) -> None:
    """Add ``both empty`` scores for structures a case lacks in both maps, so every case has every structure."""
    have = {(s.case, s.label) for s in evaluation.scores}
    for case in evaluation.case_names():
        for label, name in structures.items():
            if (case, label) not in have:
                evaluation.scores.append(StructureScore(case, int(label), name, 1.0, 0.0, 0.0, 0.0, BOTH_EMPTY))
    evaluation.structures = {int(k): v for k, v in sorted(structures.items())}
    order = {case: index for index, case in enumerate(evaluation.case_names())}
    evaluation.scores.sort(key=lambda s: (order[s.case], s.label))


# --------------------------------------------------------------------------------------------
# Summaries and comparisons
# --------------------------------------------------------------------------------------------


def summarize_segmentation(
    evaluation: SegmentationEvaluation,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "BCa",
) -> list[dict[str, Any]]:
    """Per structure: Dice, HD95 (defined cases only, with the count left out) and volumes summarised
    over cases (mean, median, bootstrap intervals of both; none for a single case)."""
    settings = dict(n_resamples=n_resamples, seed=seed, confidence=confidence, method=method)
    out = []
    for label, name in evaluation.structures.items():
        scores = [s for s in evaluation.scores if s.label == label]
        distances = [s.hd95_mm for s in scores if math.isfinite(s.hd95_mm)]
        out.append({
            "label": label, "structure": name, "n": len(scores),
            "both_empty": sum(s.note == BOTH_EMPTY for s in scores),
            "dice": summarize([s.dice for s in scores], **settings),
            "hd95_mm": {**summarize(distances, **settings), "undefined": len(scores) - len(distances)},
            "prediction_ml": summarize([s.prediction_ml for s in scores], **settings),
            "reference_ml": summarize([s.reference_ml for s in scores], **settings),
        })
    return out


def compare_segmentations(
    first: SegmentationEvaluation,
    second: SegmentationEvaluation,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> list[dict[str, Any]]:
    """Paired tests of two prediction sets scored against the same references, per structure.

    Dice uses every common case; HD95 the common cases where both are defined (fewer than two
    such cases leaves the HD95 comparison out, with a note). Differences are first − second.
    Raises `LCTfoundError` when fewer than two cases are common to both sets.
    """
    union = {**second.structures, **first.structures}
    complete_structures(first, union)
    complete_structures(second, union)
    second_cases = set(second.case_names())
    common = [case for case in first.case_names() if case in second_cases]
    if len(common) < 2:
        raise LCTfoundError(f"comparing needs at least 2 cases common to both prediction sets, got {len(common)}"
                            + (f" ({common[0]})" if common else ""))
    settings = dict(n_resamples=n_resamples, seed=seed, confidence=confidence)
    out = []
    for label, name in first.structures.items():
        a_dice, b_dice = first.values(label, "dice"), second.values(label, "dice")
        entry: dict[str, Any] = {"label": label, "structure": name, "cases": common,
                                 "dice": paired_tests([a_dice[c] for c in common], [b_dice[c] for c in common],
                                                      **settings)}
        a_hd, b_hd = first.values(label, "hd95_mm"), second.values(label, "hd95_mm")
        defined = [c for c in common if math.isfinite(a_hd[c]) and math.isfinite(b_hd[c])]
        if len(defined) >= 2:
            entry["hd95_mm"] = {**paired_tests([a_hd[c] for c in defined], [b_hd[c] for c in defined], **settings),
                                "left_out": len(common) - len(defined)}
        else:
            entry["hd95_mm"] = {"n": len(defined), "note": "fewer than 2 cases with HD95 defined in both sets"}
        out.append(entry)
    return out


def segmentation_report(
    evaluation: SegmentationEvaluation,
    compare: Optional[SegmentationEvaluation] = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "BCa",
) -> dict[str, Any]:
    """Everything as one JSON-ready dict: inputs, per-case scores, per-structure summaries and,
    with ``compare``, the second set's scores and summaries and the paired comparison."""
    comparison = None
    if compare is not None:  # first: it gives both sets the same structures and checks the common cases
        comparison = compare_segmentations(evaluation, compare, n_resamples, seed, confidence)

    def block(item: SegmentationEvaluation) -> dict[str, Any]:
        return {"prediction": item.prediction, "cases": item.cases,
                "unmatched_predictions": item.unmatched_predictions,
                "unmatched_references": item.unmatched_references,
                "notes": item.notes,
                "scores": [s.as_dict() for s in item.scores],
                "summary": summarize_segmentation(item, n_resamples, seed, confidence, method)}

    report: dict[str, Any] = {
        "task": "segmentation",
        "reference": evaluation.reference,
        "structures": {str(k): v for k, v in evaluation.structures.items()},
        "slices": evaluation.slices,
        "definitions": {
            "dice": "MONAI compute_dice per structure (1 when prediction and reference are both empty)",
            "hd95_mm": "MONAI compute_hausdorff_distance, percentile 95, symmetric, voxel spacing in mm; 0 when both "
                       "are empty, undefined (null) when only one is, and then left out of HD95 summaries",
            "volume_ml": "voxel count × voxel volume",
            "slices": "with slices, every other slice is cleared in both maps before Dice, HD95 and volumes are "
                      "computed (slices keep their 3D positions)",
        },
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": confidence, "method": method,
                      "over": "cases (a single case gives no interval; slices are never resampled instead)"},
        "results": block(evaluation),
    }
    if compare is not None:
        report["compare"] = block(compare)
        report["comparison"] = {"difference": "prediction − compare", "structures": comparison}
    return report


def segmentation_rows(evaluation: SegmentationEvaluation, set_name: str = "prediction") -> list[dict[str, Any]]:
    """Per-case rows for a CSV file (HD95 empty when undefined)."""
    return [{"set": set_name, **s.as_dict()} for s in evaluation.scores]

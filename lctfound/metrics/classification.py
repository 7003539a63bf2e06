"""Classification evaluation: AUROC, accuracy, sensitivity and specificity with stratified bootstrap
intervals, and paired comparison of two models (DeLong, paired bootstrap, McNemar).

Inputs are the CSV tables the engine writes and reads:

* predictions (``lctfound classify predict``): ``case`` (the input's `volume_stem`), ``predicted``
  and one ``probability_<class name>`` column per class; other columns are ignored;
* truth: ``case,label`` or the training-table format ``image,label`` (case = volume_stem(image)).

Cases are matched by `case_key`. Predictions are the argmax of the probability columns.
AUROC is torchmetrics' (binary: the positive class's probability; more classes: one-vs-rest,
macro average over the classes present in the truth). Bootstrap intervals resample cases within
each true class (stratified), so every resample holds every class.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from ..errors import InputError, LCTfoundError
from .cases import case_key
from .statistics import DEFAULT_CONFIDENCE, DEFAULT_RESAMPLES, bootstrap_intervals
from ..compat import strict_zip

PROBABILITY_PREFIX = "probability_"
STRATIFIED_NOTE = ("cases are resampled within each true class (stratified), so every resample holds every "
                   "class and its class counts")


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


@dataclass
class ClassPredictions:
    """A predictions table: case names, class names (probability column order), probabilities (n, C)."""

    path: str
    cases: list[str]
    classes: list[str]
    probabilities: np.ndarray
    predicted: list[Optional[str]]


def read_predictions(path: str | os.PathLike) -> ClassPredictions:
    """Read a predictions CSV (``case``, ``predicted``, ``probability_<class>`` columns)."""
    from ..training.tables import read_case_table

    path = Path(path).expanduser()
    rows = read_case_table(path, ["case"])
    columns = [c for c in rows[0] if c.startswith(PROBABILITY_PREFIX) and len(c) > len(PROBABILITY_PREFIX)]
    if not columns:
        raise InputError(f"{path.name}: has no probability_<class> columns (a table from `lctfound classify "
                         "predict` is needed)")
    classes = [c[len(PROBABILITY_PREFIX):] for c in columns]
    if len(classes) < 2:
        raise InputError(f"{path.name}: has one probability column; at least two classes are needed")
    cases, seen, values = [], set(), np.zeros((len(rows), len(columns)))
    for index, row in enumerate(rows):
        case = row.get("case", "")
        if not case:
            raise InputError(f"{path.name}: row {index + 2} has no case name")
        if case in seen:
            raise InputError(f"{path.name}: case {case!r} appears twice")
        seen.add(case)
        cases.append(case)
        for column_index, column in enumerate(columns):
            try:
                value = float(row.get(column, ""))
            except ValueError:
                value = math.nan
            if not (math.isfinite(value) and -1e-6 <= value <= 1 + 1e-6):
                raise InputError(f"{path.name}: {column} of case {case!r} is {row.get(column)!r}, "
                                 "not a probability between 0 and 1")
            values[index, column_index] = min(max(value, 0.0), 1.0)
    predicted = [row.get("predicted") or None for row in rows]
    return ClassPredictions(str(path), cases, classes, values, predicted)


def read_truth(path: str | os.PathLike) -> dict[str, str]:
    """Case → true class name from ``case,label`` or ``image,label`` (case = volume_stem(image)) CSV."""
    from ..io.volume import volume_stem
    from ..training.tables import read_case_table

    path = Path(path).expanduser()
    rows = read_case_table(path, ["label"])
    if "case" in rows[0]:
        column = "case"
    elif "image" in rows[0]:
        column = "image"
    else:
        raise InputError(f"{path.name}: needs a header line with the columns case,label or image,label.")
    truth: dict[str, str] = {}
    for index, row in enumerate(rows):
        name = row.get(column, "")
        if not name or not row.get("label"):
            raise InputError(f"{path.name}: row {index + 2} needs both {column} and label")
        case = volume_stem(name) if column == "image" else name
        if case in truth:
            raise InputError(f"{path.name}: case {case!r} appears twice")
        truth[case] = row["label"]
    return truth


# --------------------------------------------------------------------------------------------
# Matching predictions with the truth
# --------------------------------------------------------------------------------------------


@dataclass
class ClassificationCases:
    """Predictions matched with their true classes.

    ``truth`` holds class indices into ``classes`` (the predictions' column order); ``positive``
    is the positive class's index for two classes and None for more.
    """

    source: str
    cases: list[str]
    classes: list[str]
    truth: np.ndarray
    probabilities: np.ndarray
    positive: Optional[int]
    unmatched_predictions: list[str] = field(default_factory=list)
    unmatched_truth: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def present(self) -> list[int]:
        """Indices of the classes that occur in the truth."""
        return sorted(set(self.truth.tolist()))

    def subset(self, cases: Sequence[str]) -> "ClassificationCases":
        where = {case: index for index, case in enumerate(self.cases)}
        rows = [where[c] for c in cases]
        return ClassificationCases(self.source, list(cases), self.classes, self.truth[rows],
                                   self.probabilities[rows], self.positive)


def _keyed(names: Sequence[str], source: str) -> dict[str, str]:
    keyed: dict[str, str] = {}
    for name in names:
        key = case_key(name)
        if key in keyed:
            raise InputError(f"{source}: cases {keyed[key]!r} and {name!r} are the same case {key!r}")
        keyed[key] = name
    return keyed


def match_classification(
    predictions: ClassPredictions,
    truth: Mapping[str, str],
    positive: Optional[str] = None,
    truth_name: str = "truth",
) -> ClassificationCases:
    """Pair predictions with true classes by `case_key`; check the classes; pick the positive class.

    Raises `InputError` when no case matches, when a true class has no probability column, or
    when the matched truth holds a single class. For two classes ``positive`` names the positive
    class (default: the second in sorted order); for more it must be None.
    """
    source = Path(predictions.path).name
    by_prediction = _keyed(predictions.cases, source)
    by_truth = _keyed(list(truth), truth_name)
    common = [key for key in by_prediction if key in by_truth]
    if not common:
        raise InputError(f"no case of {source} is in {truth_name} (e.g. {predictions.cases[0]!r} vs "
                         f"{next(iter(truth))!r})")
    classes = predictions.classes
    labels = [truth[by_truth[key]] for key in common]
    missing = sorted(set(labels) - set(classes))
    if missing:
        raise InputError(f"{truth_name}: class {missing[0]!r} has no probability column in {source} "
                         f"(classes there: {', '.join(classes)})")
    if len(set(labels)) < 2:
        raise InputError(f"{truth_name}: every matched case is {labels[0]!r}; AUROC, sensitivity and specificity "
                         "need cases of at least two classes")
    notes = []
    index_of = {name: index for index, name in enumerate(classes)}
    if len(classes) == 2:
        chosen = positive if positive is not None else sorted(classes)[1]
        if chosen not in index_of:
            raise InputError(f"the positive class {chosen!r} is not a class of {source} ({', '.join(classes)})")
        positive_index: Optional[int] = index_of[chosen]
    else:
        if positive is not None:
            raise InputError(f"a positive class applies to two-class predictions; {source} has {len(classes)} classes")
        positive_index = None
        absent = [c for c in classes if c not in set(labels)]
        if absent:
            notes.append(f"classes {', '.join(absent)} do not occur in the truth: left out of the macro AUROC "
                         "and the per-class metrics")
    rows = [predictions.cases.index(by_prediction[key]) for key in common]
    disagree = sum(1 for r in rows if predictions.predicted[r] is not None
                   and predictions.predicted[r] != classes[int(predictions.probabilities[r].argmax())])
    if disagree:
        notes.append(f"{disagree} rows' 'predicted' column differs from the most probable class; "
                     "metrics use the most probable class")
    return ClassificationCases(
        predictions.path, [predictions.cases[r] for r in rows], list(classes),
        np.array([index_of[label] for label in labels], dtype=np.int64), predictions.probabilities[rows],
        positive_index,
        [by_prediction[k] for k in by_prediction if k not in by_truth],
        [by_truth[k] for k in by_truth if k not in by_prediction], notes)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def metric_names(data: ClassificationCases) -> list[str]:
    """The names of `metric_values`' entries, in order."""
    if data.positive is not None:
        return ["auroc", "accuracy", "sensitivity", "specificity"]
    names = ["auroc", "accuracy"]
    for index in data.present:
        names += [f"{data.classes[index]}/{metric}" for metric in ("auroc", "sensitivity", "specificity")]
    return names


def metric_values(probabilities: np.ndarray, truth: np.ndarray, positive: Optional[int],
                  present: Sequence[int]) -> np.ndarray:
    """The metrics named by `metric_names` (torchmetrics; predictions are the argmax)."""
    import torch
    from torchmetrics.functional.classification import (
        binary_auroc,
        multiclass_accuracy,
        multiclass_auroc,
        multiclass_recall,
        multiclass_specificity,
    )

    scores = torch.as_tensor(probabilities, dtype=torch.float64)
    target = torch.as_tensor(truth, dtype=torch.long)
    classes = scores.shape[1]
    predicted = scores.argmax(dim=1)
    options = dict(num_classes=classes, validate_args=False)
    accuracy = float(multiclass_accuracy(predicted, target, average="micro", **options))
    recall = multiclass_recall(predicted, target, average=None, **options).double().numpy()
    specificity = multiclass_specificity(predicted, target, average=None, **options).double().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # classes absent from the truth: left out below
        if positive is not None:
            auroc = float(binary_auroc(scores[:, positive], (target == positive).long(), validate_args=False))
            return np.array([auroc, accuracy, recall[positive], specificity[positive]])
        per_class = multiclass_auroc(scores, target, average=None, **options).double().numpy()
    present = list(present)
    values = [float(per_class[present].mean()), accuracy]
    for index in present:
        values += [per_class[index], recall[index], specificity[index]]
    return np.array(values, dtype=np.float64)


def _strata(truth: np.ndarray, present: Sequence[int]) -> list[np.ndarray]:
    return [np.flatnonzero(truth == index) for index in present]


def classification_metrics(
    data: ClassificationCases,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "percentile",
) -> dict[str, dict[str, Any]]:
    """Each metric's value and stratified bootstrap interval: {name: {"value", "ci"}}."""
    present = data.present
    names = metric_names(data)

    def statistic(*indices):
        rows = np.concatenate(indices)
        return metric_values(data.probabilities[rows], data.truth[rows], data.positive, present)

    values = statistic(*_strata(data.truth, present))
    intervals = bootstrap_intervals(_strata(data.truth, present), statistic, n_resamples=n_resamples, seed=seed,
                                    confidence=confidence, method=method)
    return {name: {"value": float(value), "ci": interval.as_dict()}
            for name, value, interval in strict_zip(names, values, intervals)}


# --------------------------------------------------------------------------------------------
# Paired comparison
# --------------------------------------------------------------------------------------------


def delong_components(scores: np.ndarray, positive: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's structural components of one score set (midranks, Sun & Xu 2014).

    Returns ``(auc, v10, v01)``: v10[i] is the fraction of negatives scored below positive i
    (ties count half), v01[j] the fraction of positives scored above negative j. The AUROC is
    their mean. Hand-written: no maintained Python library here offers DeLong's test
    (scikit-learn and torchmetrics compute AUROC only, without its covariance).
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    pos, neg = scores[positive], scores[~positive]
    m, n = pos.size, neg.size
    if m == 0 or n == 0:
        raise LCTfoundError("DeLong's test needs positive and negative cases")
    ranks = rankdata(np.concatenate([pos, neg]))
    v10 = (ranks[:m] - rankdata(pos)) / n
    v01 = 1.0 - (ranks[m:] - rankdata(neg)) / m
    return float(v10.mean()), v10, v01


def delong_covariance(score_sets: Sequence[np.ndarray], positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUROCs of several score sets on the same cases and their DeLong covariance matrix."""
    parts = [delong_components(scores, positive) for scores in score_sets]
    aucs = np.array([p[0] for p in parts])
    v10 = np.stack([p[1] for p in parts])
    v01 = np.stack([p[2] for p in parts])
    m, n = v10.shape[1], v01.shape[1]
    if m < 2 or n < 2:
        raise LCTfoundError("DeLong's test needs at least two positive and two negative cases")
    covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs, covariance


def delong_test(scores_a: np.ndarray, scores_b: np.ndarray, positive: np.ndarray) -> dict[str, Any]:
    """DeLong's test for two correlated AUROCs (same cases): z = (A − B) / sd, two-sided p.

    Identical AUROC components (e.g. identical scores) give variance 0 and p = 1.
    """
    from scipy.stats import norm

    aucs, covariance = delong_covariance([scores_a, scores_b], positive)
    difference = float(aucs[0] - aucs[1])
    variance = float(covariance[0, 0] + covariance[1, 1] - 2 * covariance[0, 1])
    out: dict[str, Any] = {"auroc_a": float(aucs[0]), "auroc_b": float(aucs[1]), "difference": difference,
                           "variance": max(variance, 0.0)}
    if variance <= 1e-15:
        return {**out, "z": None, "p_value": 1.0 if abs(difference) < 1e-12 else 0.0,
                "note": "zero variance of the difference"}
    z = difference / math.sqrt(variance)
    return {**out, "z": z, "p_value": float(2 * norm.sf(abs(z)))}


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """Exact McNemar test: a binomial test (scipy) on the discordant pairs."""
    from scipy.stats import binomtest

    correct_a = np.asarray(correct_a, dtype=bool)
    correct_b = np.asarray(correct_b, dtype=bool)
    only_a = int(np.count_nonzero(correct_a & ~correct_b))
    only_b = int(np.count_nonzero(~correct_a & correct_b))
    discordant = only_a + only_b
    p_value = 1.0 if discordant == 0 else float(binomtest(only_a, discordant, 0.5).pvalue)
    return {"only_a_correct": only_a, "only_b_correct": only_b, "p_value": p_value}


def compare_classifications(
    first: ClassificationCases,
    second: ClassificationCases,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """Paired comparison of two models' predictions of the same cases (differences are first − second).

    AUROC: DeLong's test (binary; per class one-vs-rest for more classes) and a stratified paired
    bootstrap interval of the AUROC difference (macro for more classes). Accuracy: exact McNemar
    test and a paired bootstrap interval of the difference. Raises `LCTfoundError` when the class
    sets differ or fewer than two cases are common.
    """
    if sorted(first.classes) != sorted(second.classes):
        raise LCTfoundError(f"the models predict different classes ({', '.join(first.classes)} vs "
                            f"{', '.join(second.classes)})")
    second_cases = set(second.cases)
    common = [case for case in first.cases if case in second_cases]
    if len(common) < 2:
        raise LCTfoundError(f"comparing needs at least 2 cases common to both prediction tables, got {len(common)}")
    a = first.subset(common)
    b = second.subset(common)
    order = [b.classes.index(name) for name in a.classes]  # the second table's columns in the first's order
    b = ClassificationCases(b.source, b.cases, a.classes, a.truth, b.probabilities[:, order], a.positive)
    present = a.present
    if len(present) < 2:
        raise LCTfoundError("the common cases hold a single class; the models cannot be compared")

    def statistic(*indices):
        rows = np.concatenate(indices)
        values_a = metric_values(a.probabilities[rows], a.truth[rows], a.positive, present)
        values_b = metric_values(b.probabilities[rows], b.truth[rows], b.positive, present)
        return values_a[:2] - values_b[:2]  # AUROC and accuracy

    strata = _strata(a.truth, present)
    point = statistic(*strata)
    intervals = bootstrap_intervals(strata, statistic, n_resamples=n_resamples, seed=seed, confidence=confidence,
                                    method="percentile")
    if a.positive is not None:
        targets = {a.classes[a.positive]: a.truth == a.positive}
    else:
        targets = {a.classes[index]: a.truth == index for index in present}
    delong = {}
    for name, positive in targets.items():
        index = a.classes.index(name)
        try:
            delong[name] = delong_test(a.probabilities[:, index], b.probabilities[:, index], positive)
        except LCTfoundError as error:
            delong[name] = {"p_value": None, "note": str(error)}
    correct_a = a.predicted == a.truth
    correct_b = b.predicted == b.truth
    return {
        "n": len(common), "cases": common, "difference": "first − second",
        "auroc": {"difference": float(point[0]), "ci": intervals[0].as_dict(),
                  "delong": delong if a.positive is None else next(iter(delong.values()))},
        "accuracy": {"first": float(correct_a.mean()), "second": float(correct_b.mean()),
                     "difference": float(point[1]), "ci": intervals[1].as_dict(),
                     "mcnemar": mcnemar_test(correct_a, correct_b)},
        "bootstrap": {"paired": True, "stratified": STRATIFIED_NOTE},
    }


# --------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------


def evaluate_classification_files(
    predictions: str | os.PathLike,
    truth: str | os.PathLike,
    positive: Optional[str] = None,
) -> ClassificationCases:
    """Read a predictions table and a truth table and match them (see `match_classification`)."""
    return match_classification(read_predictions(predictions), read_truth(truth), positive, Path(truth).name)


def classification_rows(data: ClassificationCases, set_name: str = "predictions") -> list[dict[str, Any]]:
    """Per-case rows for a CSV file."""
    rows = []
    predicted = data.predicted
    for index, case in enumerate(data.cases):
        row = {"set": set_name, "case": case, "truth": data.classes[data.truth[index]],
               "predicted": data.classes[predicted[index]], "correct": bool(predicted[index] == data.truth[index])}
        row.update({f"{PROBABILITY_PREFIX}{name}": float(data.probabilities[index, c])
                    for c, name in enumerate(data.classes)})
        rows.append(row)
    return rows


def classification_report(
    data: ClassificationCases,
    compare: Optional[ClassificationCases] = None,
    truth: Optional[str] = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """Everything as one JSON-ready dict: metrics with intervals, per-case rows and, with
    ``compare``, the second model's metrics and the paired comparison."""
    comparison = compare_classifications(data, compare, n_resamples, seed, confidence) if compare else None

    def block(item: ClassificationCases) -> dict[str, Any]:
        return {"predictions": item.source, "n": len(item.cases),
                "class_counts": {item.classes[i]: int(np.count_nonzero(item.truth == i)) for i in item.present},
                "unmatched_predictions": item.unmatched_predictions, "unmatched_truth": item.unmatched_truth,
                "notes": item.notes,
                "metrics": classification_metrics(item, n_resamples, seed, confidence),
                "cases": classification_rows(item)}

    report: dict[str, Any] = {
        "task": "classification", "truth": truth, "classes": data.classes,
        "mode": "binary" if data.positive is not None else "multiclass",
        "positive_class": data.classes[data.positive] if data.positive is not None else None,
        "definitions": {
            "predicted": "the class with the highest probability",
            "auroc": ("torchmetrics binary AUROC of the positive class's probability" if data.positive is not None
                      else "torchmetrics one-vs-rest AUROC per class, macro average over classes in the truth"),
            "sensitivity": "recall of the class (positive class for binary)",
            "specificity": "true-negative rate of the class (one-vs-rest)",
        },
        "bootstrap": {"resamples": n_resamples, "seed": seed, "confidence": confidence, "method": "percentile",
                      "stratified": STRATIFIED_NOTE},
        "results": block(data),
    }
    if compare is not None:
        report["compare"] = block(compare)
        report["comparison"] = comparison
    return report


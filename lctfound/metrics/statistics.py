"""Statistics shared by the evaluation commands: seeded bootstrap intervals, summaries and paired tests.

Everything here wraps scipy (`scipy.stats.bootstrap`, `wilcoxon`, `ttest_rel`) and adds the
behaviour evaluation needs on small medical data sets: a defined answer for one case (no
interval, never one invented from slices), for identical values (a zero-width interval) and
for BCa intervals that cannot be computed (the percentile interval instead, said so).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from ..errors import LCTfoundError

DEFAULT_RESAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95
CI_METHODS = ("BCa", "percentile")


@dataclass(frozen=True)
class Interval:
    """A confidence interval; ``low``/``high`` are None when it is not available (``note`` says why)."""

    low: Optional[float]
    high: Optional[float]
    method: str
    note: str = ""

    @property
    def available(self) -> bool:
        return self.low is not None and self.high is not None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"low": self.low, "high": self.high, "method": self.method}
        if self.note:
            out["note"] = self.note
        return out

    def text(self, digits: int = 3) -> str:
        return f"[{self.low:.{digits}f}, {self.high:.{digits}f}]" if self.available else "[n/a]"


def not_available(note: str) -> Interval:
    return Interval(None, None, "not available", note)


def check_bootstrap_settings(n_resamples: int, confidence: float, method: str = "percentile") -> None:
    if n_resamples < 100:
        raise LCTfoundError(f"bootstrap needs at least 100 resamples, got {n_resamples}")
    if not 0.5 <= confidence < 1.0:
        raise LCTfoundError(f"confidence level must be in [0.5, 1), got {confidence}")
    if method not in CI_METHODS:
        raise LCTfoundError(f"unknown interval method {method!r}; choose from {', '.join(CI_METHODS)}")


def bootstrap_intervals(
    samples: Sequence[np.ndarray],
    statistic: Callable[..., Any],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "BCa",
    vectorized: bool = False,
) -> list[Interval]:
    """Intervals for each value ``statistic(*samples)`` returns (a scalar or a 1-D vector).

    Each sample is resampled with replacement independently of the others (scipy's multi-sample
    bootstrap), which is stratified resampling when the samples are the cases of each class.
    ``vectorized`` statistics take an ``axis`` keyword. The generator is seeded, so the same
    inputs and seed give the same intervals. A BCa interval that cannot be computed (NaN, e.g.
    for a statistic that barely varies) falls back to the percentile interval of the same
    resamples and says so.
    """
    from scipy import stats

    check_bootstrap_settings(n_resamples, confidence, method)
    samples = [np.asarray(sample) for sample in samples]
    estimate = np.atleast_1d(np.asarray(statistic(*samples), dtype=np.float64))
    if sum(len(sample) for sample in samples) < 2:
        return [not_available("n=1: a bootstrap interval needs at least two cases")] * len(estimate)
    if min(len(sample) for sample in samples) < 2:  # resampling a group of one case gives nothing
        return [not_available("a stratified bootstrap needs at least two cases in every class")] * len(estimate)

    def as_float(*args, **kwargs):
        return np.asarray(statistic(*args, **kwargs), dtype=np.float64)

    def run(kind: str):
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            result = stats.bootstrap(tuple(samples), as_float, n_resamples=n_resamples, confidence_level=confidence,
                                     method=kind, vectorized=vectorized, rng=np.random.default_rng(seed))
        return np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)

    low, high = run(method)
    fallback: Optional[tuple[np.ndarray, np.ndarray]] = None
    intervals = []
    for index, value in enumerate(estimate):
        if not math.isfinite(value):
            intervals.append(not_available("the statistic is undefined on these cases"))
            continue
        lo, hi, kind, note = float(low[index]), float(high[index]), method, ""
        if not (math.isfinite(lo) and math.isfinite(hi)) and method == "BCa":
            fallback = fallback or run("percentile")
            lo, hi = float(fallback[0][index]), float(fallback[1][index])
            kind, note = "percentile", "BCa undefined for these values; percentile interval"
        if not (math.isfinite(lo) and math.isfinite(hi)):
            intervals.append(not_available("undefined on some resamples"))
            continue
        if hi - lo <= 1e-12 * max(1.0, abs(value)):
            note = note or "every resample gives the same value"
        intervals.append(Interval(lo, hi, kind, note))
    return intervals


def bootstrap_interval(
    values: Sequence[float],
    statistic: str = "mean",
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "BCa",
) -> Interval:
    """Bootstrap interval of the ``"mean"`` or ``"median"`` of ``values`` over cases.

    One value gives no interval (n=1); identical values give the zero-width interval at that
    value, labelled ``degenerate``.
    """
    functions = {"mean": np.mean, "median": np.median}
    if statistic not in functions:
        raise ValueError(f"statistic must be one of {sorted(functions)}")
    values = np.asarray(values, dtype=np.float64)
    check_bootstrap_settings(n_resamples, confidence, method)
    if values.size < 2:
        return not_available(f"n={values.size}: a bootstrap interval needs at least two cases")
    if np.ptp(values) == 0:
        value = float(values[0])
        return Interval(value, value, "degenerate", "all values are equal")
    function = functions[statistic]
    return bootstrap_intervals([values], lambda x, axis=-1: function(x, axis=axis), n_resamples=n_resamples,
                               seed=seed, confidence=confidence, method=method, vectorized=True)[0]


def summarize(
    values: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    method: str = "BCa",
) -> dict[str, Any]:
    """n, mean, median, standard deviation, range and bootstrap intervals of the mean and median."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return {"n": 0, "mean": None, "median": None, "std": None, "min": None, "max": None,
                "mean_ci": not_available("no values").as_dict(), "median_ci": not_available("no values").as_dict()}
    settings = dict(n_resamples=n_resamples, seed=seed, confidence=confidence, method=method)
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "median": float(np.median(values)),
        "std": float(values.std(ddof=1)) if values.size > 1 else None,
        "min": float(values.min()),
        "max": float(values.max()),
        "mean_ci": bootstrap_interval(values, "mean", **settings).as_dict(),
        "median_ci": bootstrap_interval(values, "median", **settings).as_dict(),
    }


def paired_tests(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> dict[str, Any]:
    """Compare paired per-case values ``a`` and ``b`` (same cases, same order).

    Returns the mean and median of ``a - b``, a percentile bootstrap interval of the mean
    difference (cases resampled in pairs), the Wilcoxon signed-rank test and the paired t-test
    (two-sided). All-zero differences give p = 1 for both tests; constant non-zero differences
    leave the t-test undefined (None, with a note). Raises `LCTfoundError` for fewer than two pairs.
    """
    from scipy import stats

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError("paired values must be two 1-D arrays of the same length")
    if a.size < 2:
        raise LCTfoundError(f"a paired comparison needs at least 2 common cases, got {a.size}")
    difference = a - b
    notes = []
    out: dict[str, Any] = {"n": int(a.size), "mean_a": float(a.mean()), "mean_b": float(b.mean()),
                           "mean_difference": float(difference.mean()),
                           "median_difference": float(np.median(difference))}
    out["mean_difference_ci"] = bootstrap_interval(difference, "mean", n_resamples=n_resamples, seed=seed,
                                                   confidence=confidence, method="percentile").as_dict()
    spread = float(np.ptp(difference))
    if np.all(difference == 0):
        out["wilcoxon"] = {"statistic": 0.0, "p_value": 1.0}
        out["t_test"] = {"statistic": 0.0, "p_value": 1.0}
        notes.append("identical values in every case")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wilcoxon = stats.wilcoxon(a, b)
        out["wilcoxon"] = {"statistic": float(wilcoxon.statistic), "p_value": float(wilcoxon.pvalue)}
        if spread <= 1e-12 * max(1.0, float(np.abs(difference).max())):
            out["t_test"] = {"statistic": None, "p_value": None}
            notes.append("the difference is the same in every case: the t-test is undefined")
        else:
            t_test = stats.ttest_rel(a, b)
            out["t_test"] = {"statistic": float(t_test.statistic), "p_value": float(t_test.pvalue)}
    if notes:
        out["note"] = "; ".join(notes)
    return out


def finite_or_none(value: Any) -> Any:
    """``value`` for JSON: NaN and infinities become None (JSON has no NaN)."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def json_ready(value: Any) -> Any:
    """A copy of nested dicts/lists with numpy scalars made plain and NaN/inf made None."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    return finite_or_none(value)

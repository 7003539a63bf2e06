"""Evaluation metrics and statistics behind ``lctfound evaluate`` (numpy in, plain dicts out, Qt-free).

* `segmentation`: Dice, HD95 (mm) and volumes per case and structure, summaries, paired tests;
* `classification`: AUROC, accuracy, sensitivity/specificity, DeLong and McNemar comparisons;
* `statistics`: seeded bootstrap intervals, summaries and paired tests shared by both;
* `reports`: JSON/CSV output and text tables; `cases`: how files and table rows are matched.
"""

from .cases import CASE_SUFFIXES, case_key
from .classification import (
    ClassificationCases,
    ClassPredictions,
    classification_metrics,
    classification_report,
    compare_classifications,
    delong_test,
    evaluate_classification_files,
    match_classification,
    mcnemar_test,
    read_predictions,
    read_truth,
)
from .reports import write_results
from .segmentation import (
    SegmentationEvaluation,
    StructureScore,
    compare_segmentations,
    evaluate_segmentation_files,
    score_structures,
    segmentation_report,
    summarize_segmentation,
)
from .statistics import Interval, bootstrap_interval, bootstrap_intervals, paired_tests, summarize

__all__ = [
    "CASE_SUFFIXES", "ClassPredictions", "ClassificationCases", "Interval", "SegmentationEvaluation",
    "StructureScore", "bootstrap_interval", "bootstrap_intervals", "case_key", "classification_metrics",
    "classification_report", "compare_classifications", "compare_segmentations", "delong_test",
    "evaluate_classification_files", "evaluate_segmentation_files", "match_classification", "mcnemar_test",
    "paired_tests", "read_predictions", "read_truth", "score_structures", "segmentation_report", "summarize",
    "summarize_segmentation", "write_results",
]

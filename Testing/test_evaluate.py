"""``lctfound evaluate`` and `lctfound.metrics`: known-value Dice/HD95, empty cases, bootstrap intervals,
DeLong and McNemar against independent computations, and the command line end to end."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from lctfound.errors import InputError, LCTfoundError
from lctfound.io.volume import CTVolume, write_volume
from lctfound.metrics import case_key
from lctfound.metrics.classification import (
    ClassificationCases,
    ClassPredictions,
    classification_metrics,
    compare_classifications,
    delong_components,
    delong_covariance,
    delong_test,
    match_classification,
    mcnemar_test,
    metric_values,
)
from lctfound.metrics.segmentation import (
    BOTH_EMPTY,
    PREDICTION_EMPTY,
    REFERENCE_EMPTY,
    compare_segmentations,
    evaluate_segmentation_files,
    hd95_mm,
    match_cases,
    parse_structure_names,
    score_structures,
    segmentation_report,
    structure_names_from_model,
    summarize_segmentation,
)
from lctfound.metrics.statistics import bootstrap_interval, bootstrap_intervals, paired_tests
from lctfound.compat import strict_zip

GROUPS = ("evaluate",)
SPACING = (0.7, 0.8, 3.0)  # (i, j, k) mm, deliberately anisotropic


def cube(shape=(20, 30, 30), start=(5, 5, 5), size=(10, 10, 10), value=1) -> np.ndarray:
    array = np.zeros(shape, dtype=np.uint8)
    array[tuple(slice(s, s + n) for s, n in strict_zip(start, size))] = value
    return array


# --------------------------------------------------------------------------------------------
# Segmentation metrics
# --------------------------------------------------------------------------------------------


def test_dice_of_offset_cubes_is_analytic():
    reference = cube()
    shifted_i = cube(start=(5, 5, 7))  # 2 voxels along i: overlap 10×10×8
    shifted_ki = cube(start=(8, 5, 7))  # 3 along k and 2 along i: overlap 7×10×8
    (score,) = score_structures(shifted_i, reference, SPACING, {1: "Cube"})
    assert score.dice == pytest.approx(2 * 800 / 2000, abs=1e-6)
    (score,) = score_structures(shifted_ki, reference, SPACING, {1: "Cube"})
    assert score.dice == pytest.approx(2 * 560 / 2000, abs=1e-6)
    voxel_ml = 0.7 * 0.8 * 3.0 / 1000
    assert score.reference_ml == pytest.approx(1000 * voxel_ml)
    assert score.prediction_ml == pytest.approx(1000 * voxel_ml)
    assert score.note == ""


@pytest.mark.parametrize("axis, spacing_mm", [(0, 3.0), (2, 0.7)])
def test_hd95_is_in_millimetres_along_the_right_axis(axis, spacing_mm):
    # Two parallel one-voxel plates two voxels apart: every surface point is exactly 2 voxels from the other.
    prediction = np.zeros((10, 12, 12), dtype=np.uint8)
    reference = np.zeros_like(prediction)
    index_a, index_b = [slice(2, 10)] * 3, [slice(2, 10)] * 3
    index_a[axis], index_b[axis] = 3, 5
    prediction[tuple(index_a)] = 1
    reference[tuple(index_b)] = 1
    (score,) = score_structures(prediction, reference, SPACING, {1: "Plate"})
    assert score.dice == 0.0
    assert score.hd95_mm == pytest.approx(2 * spacing_mm, rel=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI deprecation inside its own edge step
def test_hd95_on_the_cropped_masks_equals_monai_on_the_whole_volume():
    import torch
    from monai.metrics import compute_hausdorff_distance

    prediction, reference = cube(start=(6, 4, 7)) == 1, cube() == 1
    expected = compute_hausdorff_distance(torch.from_numpy(prediction)[None, None],
                                          torch.from_numpy(reference)[None, None],
                                          include_background=True, percentile=95, spacing=SPACING[::-1]).item()
    spacing_kji = SPACING[::-1]
    assert hd95_mm(prediction, reference, spacing_kji) == pytest.approx(expected, rel=1e-6)


def test_empty_structures_have_defined_scores():
    reference = cube(value=1)
    reference[0, 0, 0] = 0
    prediction = cube(value=2)  # label 1 missing from the prediction, label 2 missing from the reference
    scores = {s.label: s for s in score_structures(prediction, reference, SPACING, {1: "A", 2: "B", 3: "C"})}
    assert (scores[1].dice, math.isnan(scores[1].hd95_mm), scores[1].note) == (0.0, True, PREDICTION_EMPTY)
    assert (scores[2].dice, math.isnan(scores[2].hd95_mm), scores[2].note) == (0.0, True, REFERENCE_EMPTY)
    assert (scores[3].dice, scores[3].hd95_mm, scores[3].note) == (1.0, 0.0, BOTH_EMPTY)
    assert scores[1].as_dict()["hd95_mm"] is None


def test_slices_restrict_dice_volumes_and_hd95():
    reference = cube(shape=(10, 12, 12), start=(2, 2, 2), size=(6, 8, 8))
    prediction = reference.copy()
    prediction[5:] = 0  # right on slices 2-4, missing on 5-7
    (held_in,) = score_structures(prediction, reference, SPACING, {1: "X"}, slices=[2, 3, 4])
    (held_out,) = score_structures(prediction, reference, SPACING, {1: "X"}, slices=[5, 6])
    (outside,) = score_structures(prediction, reference, SPACING, {1: "X"}, slices=[0, 9])
    (whole,) = score_structures(prediction, reference, SPACING, {1: "X"})
    assert (held_in.dice, held_in.hd95_mm) == (1.0, 0.0) and whole.dice == pytest.approx(2 * 192 / (192 + 384))
    assert held_in.reference_ml == pytest.approx(3 * 64 * 0.7 * 0.8 * 3.0 / 1000)
    assert (held_out.dice, held_out.note) == (0.0, PREDICTION_EMPTY)
    assert held_out.reference_ml == pytest.approx(2 * 64 * 0.7 * 0.8 * 3.0 / 1000)
    assert outside.note == BOTH_EMPTY
    with pytest.raises(LCTfoundError, match="outside the volume"):
        score_structures(prediction, reference, SPACING, {1: "X"}, slices=[10])


def test_structure_names_from_text_and_task_model(tmp_path):
    assert parse_structure_names("1=Lesion, 2=Vessel") == {1: "Lesion", 2: "Vessel"}
    for bad in ("Lesion", "0=Background", "1=", "x=Lesion", "1=A,1=B"):
        with pytest.raises(LCTfoundError):
            parse_structure_names(bad)
    (tmp_path / "task.json").write_text(json.dumps({"format_version": 1, "task": "segmentation",
                                                    "labels": {"1": "Nodule", "2": "Vessel"}}))
    assert structure_names_from_model(tmp_path) == {1: "Nodule", 2: "Vessel"}


def test_case_keys_and_matching(tmp_path):
    assert case_key("lung1_image_seg.nii.gz") == case_key("lung1_label.nrrd") == "lung1"
    assert case_key("a_MASK.mha") == "a"
    assert case_key("_seg.nii.gz") == "_seg"
    volume = CTVolume(cube(shape=(4, 6, 6), start=(1, 1, 1), size=(2, 2, 2)), SPACING)
    for name in ("pred/lung1_image_seg.nii.gz", "pred/lung3_seg.nii.gz", "ref/lung1_label.nrrd",
                 "ref/lung1_image.nrrd", "ref/lung2_labels.mha"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        write_volume(volume, tmp_path / name)
    match = match_cases(tmp_path / "pred", tmp_path / "ref")
    assert [(case, p.name, r.name) for case, p, r in match.pairs] == [
        ("lung1", "lung1_image_seg.nii.gz", "lung1_label.nrrd")]  # the image beside the label is not a label map
    assert [p.name for p in match.unmatched_predictions] == ["lung3_seg.nii.gz"]
    assert [p.name for p in match.unmatched_references] == ["lung2_labels.mha"]
    (tmp_path / "other").mkdir()
    write_volume(volume, tmp_path / "other" / "zzz.nii.gz")
    with pytest.raises(InputError, match="no case"):
        match_cases(tmp_path / "other", tmp_path / "ref")


def _scores_evaluation(dices_by_case):
    """A SegmentationEvaluation built from per-case Dice values (HD95 from the Dice, for ordering)."""
    from lctfound.metrics.segmentation import SegmentationEvaluation, StructureScore

    scores = [StructureScore(case, 1, "Lesion", d, 10 * (1 - d) if d > 0 else math.nan, 1.0, 1.0,
                             "" if d > 0 else PREDICTION_EMPTY) for case, d in dices_by_case.items()]
    cases = [{"case": c, "prediction": f"{c}.nii.gz", "reference": f"{c}_label.nii.gz"} for c in dices_by_case]
    return SegmentationEvaluation("pred", "ref", {1: "Lesion"}, scores, cases)


def test_summary_excludes_undefined_hd95_and_single_case_has_no_interval():
    evaluation = _scores_evaluation({"a": 0.8, "b": 0.6, "c": 0.0, "d": 0.9})
    (summary,) = summarize_segmentation(evaluation, n_resamples=200)
    assert summary["dice"]["n"] == 4 and summary["dice"]["mean"] == pytest.approx(0.575)
    assert summary["hd95_mm"]["n"] == 3 and summary["hd95_mm"]["undefined"] == 1
    assert summary["hd95_mm"]["median"] == pytest.approx(2.0)
    ci = summary["dice"]["mean_ci"]
    assert ci["low"] <= 0.575 <= ci["high"]
    (single,) = summarize_segmentation(_scores_evaluation({"a": 0.8}), n_resamples=200)
    assert single["dice"]["mean_ci"]["low"] is None and "n=1" in single["dice"]["mean_ci"]["note"]


def test_paired_segmentation_comparison():
    first = _scores_evaluation({"a": 0.8, "b": 0.7, "c": 0.9, "d": 0.6, "e": 0.75})
    second = _scores_evaluation({"a": 0.7, "b": 0.65, "c": 0.7, "d": 0.61, "e": 0.6, "f": 0.9})
    (entry,) = compare_segmentations(first, second, n_resamples=200)
    dice = entry["dice"]
    from scipy import stats

    a, b = [0.8, 0.7, 0.9, 0.6, 0.75], [0.7, 0.65, 0.7, 0.61, 0.6]
    assert dice["n"] == 5 and entry["cases"] == ["a", "b", "c", "d", "e"]
    assert dice["wilcoxon"]["p_value"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    assert dice["t_test"]["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert dice["mean_difference"] == pytest.approx(np.mean(np.subtract(a, b)))
    assert dice["mean_difference_ci"]["low"] <= dice["mean_difference"] <= dice["mean_difference_ci"]["high"]
    with pytest.raises(LCTfoundError, match="at least 2"):
        compare_segmentations(first, _scores_evaluation({"a": 0.5, "z": 0.5}), n_resamples=200)


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def test_bootstrap_interval_contains_estimate_and_is_seeded():
    values = np.random.default_rng(3).beta(5, 2, size=25)
    first = bootstrap_interval(values, "mean", seed=7)
    assert first.low < values.mean() < first.high and first.method == "BCa"
    assert bootstrap_interval(values, "mean", seed=7) == first
    assert bootstrap_interval(values, "mean", seed=8) != first
    median = bootstrap_interval(values, "median", method="percentile", seed=7)
    assert median.low <= np.median(values) <= median.high and median.method == "percentile"
    assert not bootstrap_interval([0.7], "mean").available
    assert bootstrap_interval([0.5, 0.5, 0.5], "mean").method == "degenerate"
    fallback = bootstrap_interval([1, 1, 1, 1, 1, 1, 1, 0.9], "median")  # BCa undefined here
    assert fallback.method == "percentile" and "BCa undefined" in fallback.note
    with pytest.raises(LCTfoundError):
        bootstrap_interval(values, "mean", n_resamples=10)


def test_paired_tests_edge_cases():
    same = paired_tests([0.5, 0.6, 0.7], [0.5, 0.6, 0.7], n_resamples=200)
    assert same["wilcoxon"]["p_value"] == 1.0 and same["t_test"]["p_value"] == 1.0
    shifted = paired_tests([0.5, 0.6, 0.7], [0.25, 0.35, 0.45], n_resamples=200)
    assert shifted["t_test"]["p_value"] is None and "t-test is undefined" in shifted["note"]
    with pytest.raises(LCTfoundError, match="at least 2"):
        paired_tests([0.5], [0.4])


# --------------------------------------------------------------------------------------------
# Classification metrics
# --------------------------------------------------------------------------------------------


def _binary_data(n=30, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    truth = np.array([0] * (n // 2) + [1] * (n - n // 2))
    score = 1 / (1 + np.exp(-(2.0 * (truth - 0.5) + rng.normal(0, noise, n))))
    score = np.round(score, 1)  # ties on purpose
    return truth, np.stack([1 - score, score], axis=1)


def test_auroc_matches_mann_whitney_ranks_and_torchmetrics():
    import torch
    from scipy import stats
    from torchmetrics.functional.classification import multiclass_auroc

    truth, probabilities = _binary_data()
    auroc, accuracy, sensitivity, specificity = metric_values(probabilities, truth, 1, [0, 1])
    positive, negative = probabilities[truth == 1, 1], probabilities[truth == 0, 1]
    u = stats.mannwhitneyu(positive, negative).statistic
    assert auroc == pytest.approx(u / (positive.size * negative.size), abs=1e-6)
    assert delong_components(probabilities[:, 1], truth == 1)[0] == pytest.approx(auroc, abs=1e-6)
    predicted = probabilities.argmax(1)
    assert accuracy == pytest.approx(np.mean(predicted == truth))
    assert sensitivity == pytest.approx(np.mean(predicted[truth == 1] == 1))
    assert specificity == pytest.approx(np.mean(predicted[truth == 0] == 0))

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 40)
    scores = rng.dirichlet([1, 1, 1], 40)
    values = metric_values(scores, labels, None, [0, 1, 2])
    expected = multiclass_auroc(torch.tensor(scores), torch.tensor(labels), num_classes=3, average="macro")
    assert values[0] == pytest.approx(float(expected), abs=1e-6)


def test_delong_variance_matches_its_pairwise_definition():
    truth, probabilities = _binary_data(n=24, seed=4)
    scores = probabilities[:, 1]
    positive, negative = scores[truth == 1], scores[truth == 0]
    # DeLong's kernel ψ(x, y) = 1 if x > y, ½ if tied, 0 otherwise, over every positive/negative pair.
    psi = (positive[:, None] > negative[None, :]) + 0.5 * (positive[:, None] == negative[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    expected = v10.var(ddof=1) / positive.size + v01.var(ddof=1) / negative.size
    aucs, covariance = delong_covariance([scores], truth == 1)
    assert aucs[0] == pytest.approx(psi.mean())
    assert covariance[0, 0] == pytest.approx(expected, rel=1e-10)


def test_delong_identical_scores_and_a_real_difference():
    truth, good = _binary_data(n=40, seed=2, noise=0.5)
    _, poor = _binary_data(n=40, seed=3, noise=3.0)
    same = delong_test(good[:, 1], good[:, 1], truth == 1)
    assert same["p_value"] == 1.0 and same["difference"] == 0.0
    result = delong_test(good[:, 1], poor[:, 1], truth == 1)
    assert result["difference"] > 0 and result["z"] > 0 and 0 < result["p_value"] < 0.05
    swapped = delong_test(poor[:, 1], good[:, 1], truth == 1)
    assert swapped["p_value"] == pytest.approx(result["p_value"]) and swapped["z"] == pytest.approx(-result["z"])


def test_mcnemar_is_a_binomial_test_on_discordant_pairs():
    from scipy.stats import binomtest

    a = np.array([1] * 10 + [1] * 8 + [0] * 2 + [0] * 5, dtype=bool)
    b = np.array([1] * 10 + [0] * 8 + [1] * 2 + [0] * 5, dtype=bool)
    result = mcnemar_test(a, b)
    assert (result["only_a_correct"], result["only_b_correct"]) == (8, 2)
    assert result["p_value"] == pytest.approx(binomtest(8, 10, 0.5).pvalue)
    assert mcnemar_test(a, a)["p_value"] == 1.0


def test_stratified_bootstrap_keeps_rare_classes():
    # 2 positives in 22: unstratified resampling would lose both in ~12 % of resamples (AUROC undefined).
    rng = np.random.default_rng(5)
    truth = np.array([0] * 20 + [1] * 2)
    score = np.concatenate([rng.uniform(0, 0.7, 20), [0.6, 0.9]])
    data = ClassificationCases("p.csv", [f"c{i}" for i in range(22)], ["no", "yes"], truth,
                               np.stack([1 - score, score], axis=1), 1)
    metrics = classification_metrics(data, n_resamples=300, seed=1)
    auroc = metrics["auroc"]
    assert auroc["ci"]["low"] is not None and auroc["ci"]["low"] <= auroc["value"] <= auroc["ci"]["high"]
    assert classification_metrics(data, n_resamples=300, seed=1) == metrics

    def counts(*strata):
        return np.array([len(s) for s in strata], dtype=float)

    intervals = bootstrap_intervals([np.flatnonzero(truth == 0), np.flatnonzero(truth == 1)], counts,
                                    n_resamples=100, method="percentile")
    assert [(i.low, i.high) for i in intervals] == [(20, 20), (2, 2)]
    # one case per class (two scans): no interval, said in words instead of a scipy error
    single = classification_metrics(ClassificationCases("p.csv", ["a", "b"], ["no", "yes"], np.array([0, 1]),
                                                        np.array([[0.8, 0.2], [0.3, 0.7]]), 1), n_resamples=100)
    assert single["auroc"]["value"] == 1.0 and single["auroc"]["ci"]["low"] is None
    assert "two cases in every class" in single["auroc"]["ci"]["note"]


def test_matching_positive_class_and_paired_comparison():
    truth, good = _binary_data(n=20, seed=6, noise=0.5)
    names = ["benign", "malignant"]
    cases = [f"case{i}_image" for i in range(20)]
    predictions = ClassPredictions("a.csv", cases, names, good, [None] * 20)
    table = {f"case{i}": names[t] for i, t in enumerate(truth)}  # case,label written without _image
    data = match_classification(predictions, table)
    assert data.positive == 1 and len(data.cases) == 20
    assert match_classification(predictions, table, positive="benign").positive == 0
    part = match_classification(ClassPredictions("a.csv", [cases[0], cases[18]], names, good[[0, 18]], [None] * 2),
                                table)
    other = match_classification(ClassPredictions("b.csv", [cases[0], cases[19]], names[::-1],
                                                  good[[0, 19]][:, ::-1], [None] * 2), table)
    with pytest.raises(LCTfoundError, match="at least 2 cases common"):
        compare_classifications(part, other)
    same = compare_classifications(data, match_classification(
        ClassPredictions("b.csv", cases, names[::-1], good[:, ::-1], [None] * 20), table), n_resamples=200)
    assert same["auroc"]["delong"]["p_value"] == 1.0 and same["accuracy"]["mcnemar"]["p_value"] == 1.0
    assert same["auroc"]["difference"] == 0.0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _write_label(path: Path, array: np.ndarray, spacing=SPACING) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_volume(CTVolume(array, spacing), path)


@pytest.fixture
def segmentation_folders(tmp_path):
    """Three cases: references, a prediction set shifted by one voxel and one shifted by two."""
    for index in range(3):
        reference = cube(shape=(12, 24, 24), start=(3, 4 + index, 5), size=(6, 8, 8))
        reference[10:12, 18:20, 18:20] = 2
        _write_label(tmp_path / "ref" / f"case{index}_label.nii.gz", reference)
        _write_label(tmp_path / "pred" / f"case{index}_image_seg.nii.gz", np.roll(reference, 1, axis=2))
        _write_label(tmp_path / "pred2" / f"case{index}.nii.gz", np.roll(reference, 2 + index % 2, axis=2))
    return tmp_path


def test_cli_segmentation_end_to_end(segmentation_folders, run_cli):
    root = segmentation_folders
    code, out, err = run_cli(["evaluate", "segmentation", "--prediction", root / "pred", "--reference", root / "ref",
                              "--compare", root / "pred2", "--names", "1=Lesion,2=Core", "--bootstrap", "200",
                              "--output", root / "results.json"], GROUPS)
    assert code == 0, err
    assert "Lesion" in out and "Core" in out and "Wilcoxon p" in out and "wrote" in out
    report = json.loads((root / "results.json").read_text())
    assert report["structures"] == {"1": "Lesion", "2": "Core"}
    assert [c["case"] for c in report["results"]["cases"]] == ["case0", "case1", "case2"]
    lesion = [s for s in report["results"]["scores"] if s["structure"] == "Lesion"]
    assert all(s["dice"] == pytest.approx(2 * 6 * 8 * 7 / (2 * 384), abs=1e-6) for s in lesion)
    assert all(s["hd95_mm"] == pytest.approx(0.7, rel=1e-5) for s in lesion)
    comparison = report["comparison"]["structures"][0]
    assert comparison["structure"] == "Lesion" and comparison["dice"]["mean_difference"] > 0

    code, out, err = run_cli(["evaluate", "segmentation", "-p", root / "pred" / "case0_image_seg.nii.gz",
                              "-r", root / "ref" / "case0_label.nii.gz", "--slices", "3,4", "--bootstrap", "200",
                              "--output", root / "one.csv"], GROUPS)
    assert code == 0, err
    assert "Label 1" in out and "Label 2" not in out and "n=1" in out  # label 2 lies on other slices
    rows = list(csv.DictReader((root / "one.csv").open()))
    assert [r["structure"] for r in rows] == ["Label 1"]
    assert float(rows[0]["reference_ml"]) == pytest.approx(2 * 64 * 0.7 * 0.8 * 3.0 / 1000)

    code, _, err = run_cli(["evaluate", "segmentation", "-p", root / "pred", "-r", root / "ref",
                            "--output", root / "results.json"], GROUPS)
    assert code == 2 and "already exists" in err


def _write_csv(path: Path, header, rows) -> Path:
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


@pytest.fixture
def classification_tables(tmp_path):
    truth, good = _binary_data(n=24, seed=8, noise=0.6)
    _, poor = _binary_data(n=24, seed=9, noise=2.5)
    names = ["benign", "malignant"]
    header = ["case", "predicted", "probability_benign", "probability_malignant", "model"]
    for name, probabilities in (("a.csv", good), ("b.csv", poor)):
        _write_csv(tmp_path / name, header, [[f"case{i}_image", names[int(p.argmax())], p[0], p[1], "m"]
                                             for i, p in enumerate(probabilities)])
    _write_csv(tmp_path / "truth.csv", ["image", "label"],
               [[f"images/case{i}_image.nii.gz", names[t]] for i, t in enumerate(truth)])
    return tmp_path, truth, good


def test_cli_classification_end_to_end(classification_tables, run_cli):
    root, truth, good = classification_tables
    code, out, err = run_cli(["evaluate", "classification", "--predictions", root / "a.csv", "--truth",
                              root / "truth.csv", "--compare", root / "b.csv", "--bootstrap", "200",
                              "--output", root / "out.json"], GROUPS)
    assert code == 0, err
    assert "positive class: malignant (default" in out and "DeLong" in out and "McNemar" in out
    report = json.loads((root / "out.json").read_text())
    auroc = report["results"]["metrics"]["auroc"]
    assert auroc["value"] == pytest.approx(delong_components(good[:, 1], truth == 1)[0], abs=1e-6)
    assert auroc["ci"]["low"] <= auroc["value"] <= auroc["ci"]["high"]
    assert report["comparison"]["n"] == 24 and report["positive_class"] == "malignant"

    code, out, err = run_cli(["evaluate", "classification", "--predictions", root / "a.csv", "--truth",
                              root / "truth.csv", "--positive", "benign", "--bootstrap", "200",
                              "--output", root / "cases.csv"], GROUPS)
    assert code == 0, err
    assert "positive class: benign (--positive)" in out
    rows = list(csv.DictReader((root / "cases.csv").open()))
    assert len(rows) == 24 and set(rows[0]) >= {"case", "truth", "predicted", "correct", "probability_benign"}


def _bad_segmentation_inputs(root: Path) -> dict[str, list]:
    reference = cube(shape=(12, 24, 24), start=(3, 4, 5), size=(6, 8, 8))
    _write_label(root / "bad" / "offgrid.nii.gz", reference, spacing=(1.0, 1.0, 1.0))
    _write_label(root / "bad" / "float.nii.gz", reference.astype(np.float32) * 0.5)
    _write_label(root / "bad" / "zzz.nii.gz", reference)
    _write_label(root / "bad" / "case0_seg.nii.gz", reference)
    one = root / "ref" / "case0_label.nii.gz"
    return {
        "missing file": ["-p", root / "nothing.nii.gz", "-r", one],
        "grid mismatch": ["-p", root / "bad" / "offgrid.nii.gz", "-r", one],
        "non-integer labels": ["-p", root / "bad" / "float.nii.gz", "-r", one],
        "no matched cases": ["-p", root / "pred2", "-r", root / "bad" / "zzz.nii.gz"],
        "compare with one common case": ["-p", root / "pred", "-r", root / "ref", "--compare",
                                         root / "bad" / "case0_seg.nii.gz"],
        "bad names": ["-p", root / "pred", "-r", root / "ref", "--names", "Lesion"],
        "bad slices": ["-p", root / "pred", "-r", root / "ref", "--slices", "5-99"],
        "bad output": ["-p", root / "pred", "-r", root / "ref", "--output", root / "x.txt"],
    }


def test_cli_segmentation_bad_inputs_exit_2_with_one_line(segmentation_folders, run_cli):
    for what, args in _bad_segmentation_inputs(segmentation_folders).items():
        code, _, err = run_cli(["evaluate", "segmentation", *args, "--bootstrap", "100"], GROUPS)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (what, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, err)


def test_cli_classification_bad_inputs_exit_2_with_one_line(classification_tables, run_cli):
    root, truth, good = classification_tables
    _write_csv(root / "unknown.csv", ["case", "label"], [["case0_image", "benign"], ["case1_image", "other"]])
    _write_csv(root / "single.csv", ["case", "label"], [["case0_image", "benign"], ["case1_image", "benign"]])
    _write_csv(root / "nomatch.csv", ["case", "label"], [["x", "benign"], ["y", "malignant"]])
    _write_csv(root / "noheader.csv", ["name", "label"], [["case0", "benign"]])
    header = ["case", "predicted", "probability_benign", "probability_malignant"]
    _write_csv(root / "part.csv", header, [["case0_image", "benign", 0.9, 0.1], ["case12_image", "benign", 0.6, 0.4]])
    _write_csv(root / "few.csv", header, [["case0_image", "benign", 0.9, 0.1], ["case13_image", "benign", 0.6, 0.4]])
    _write_csv(root / "notprob.csv", ["case", "predicted", "probability_benign", "probability_malignant"],
               [["case0_image", "benign", 1.5, "x"]])
    a, t = root / "a.csv", root / "truth.csv"
    cases = {
        "missing predictions": ["--predictions", root / "none.csv", "--truth", t],
        "missing truth": ["--predictions", a, "--truth", root / "none.csv"],
        "truth class missing from predictions": ["--predictions", a, "--truth", root / "unknown.csv"],
        "single class in truth": ["--predictions", a, "--truth", root / "single.csv"],
        "no matched cases": ["--predictions", a, "--truth", root / "nomatch.csv"],
        "truth without case/image column": ["--predictions", a, "--truth", root / "noheader.csv"],
        "compare with one common case": ["--predictions", root / "part.csv", "--truth", t, "--compare",
                                         root / "few.csv"],
        "not a probability": ["--predictions", root / "notprob.csv", "--truth", t],
        "unknown positive class": ["--predictions", a, "--truth", t, "--positive", "other"],
    }
    for what, args in cases.items():
        code, _, err = run_cli(["evaluate", "classification", *args, "--bootstrap", "100"], GROUPS)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (what, err)
        assert len(lines) == 1 and lines[0].startswith("error: "), (what, err)


def test_report_from_files_matches_direct_scores(segmentation_folders):
    root = segmentation_folders
    evaluation = evaluate_segmentation_files(root / "pred", root / "ref")
    assert evaluation.structures == {1: "Label 1", 2: "Label 2"}
    report = segmentation_report(evaluation, n_resamples=200)
    assert json.dumps(report, allow_nan=False)  # undefined values are None, never NaN
    assert len(report["results"]["scores"]) == 6

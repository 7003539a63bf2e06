"""Image-quality metrics (`lctfound.metrics.image`) and ``lctfound evaluate image``."""

from __future__ import annotations

import json
import math

import data_factory
import numpy as np
import pytest

from lctfound.errors import LCTfoundError
from lctfound.io.volume import CTVolume, write_volume
from lctfound.metrics.image import evaluate_image_volumes, parse_hu_range, slice_metrics


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """VIF's convolutions run 10-20x slower with two threads on a shared, loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference():
    return data_factory.synthetic_ct(shape=(6, 64, 64), spacing=(1.0, 1.0, 2.0), dtype=np.float32, seed=3)


def test_identical_images_are_perfect(reference):
    values = slice_metrics(reference.array[2], reference.array[2])
    assert values["psnr"] == math.inf and values["rmse_hu"] == 0.0
    assert values["ssim"] == pytest.approx(1.0) and values["vif"] == pytest.approx(1.0)


def test_known_values_of_an_offset_and_of_clipping(reference):
    image = reference.array[2]
    values = slice_metrics(image + 10.0, image, hu_range=(-3000, 3000))  # nothing clipped
    assert values["rmse_hu"] == pytest.approx(10.0)
    assert values["psnr"] == pytest.approx(10 * math.log10(6000 ** 2 / 100.0))
    # clipped to −1000..1000 for PSNR: an error only above 1000 HU does not count, but RMSE (HU) sees it
    flat = np.full((64, 64), 0.0)
    bright = flat.copy()
    bright[10:20, 10:20] = 1500.0
    brighter = flat.copy()
    brighter[10:20, 10:20] = 2500.0
    values = slice_metrics(brighter, bright)
    assert values["psnr"] == math.inf and values["rmse_hu"] == pytest.approx(math.sqrt(100 * 1000 ** 2 / 4096))
    # an error only outside the mask is not seen inside it
    mask = np.zeros((64, 64), bool)
    mask[30:, :] = True
    values = slice_metrics(brighter, flat, mask=mask)
    assert values["rmse_hu"] == 0.0 and values["psnr"] == math.inf
    noisy = image + np.random.default_rng(0).normal(0, 50, image.shape)
    assert slice_metrics(noisy, image)["vif"] < 0.9 and slice_metrics(noisy, image)["ssim"] < 0.99


def test_volume_values_pool_the_slices(reference):
    prediction = reference.with_array(reference.array + np.arange(6, dtype=np.float32)[:, None, None] * 5.0)
    evaluation = evaluate_image_volumes(prediction, reference, (-3000, 3000), slices=[1, 2, 3])
    assert evaluation.slices == [1, 2, 3]
    assert list(evaluation.values["rmse_hu"]) == pytest.approx([5.0, 10.0, 15.0])
    assert evaluation.volume["rmse_hu"] == pytest.approx(math.sqrt((25 + 100 + 225) / 3))
    assert evaluation.volume["psnr"] == pytest.approx(10 * math.log10(6000 ** 2 / ((25 + 100 + 225) / 3)))
    moved = CTVolume(prediction.array, prediction.spacing, (1.0, 0.0, 0.0))
    with pytest.raises(LCTfoundError, match="voxel grid"):
        evaluate_image_volumes(moved, reference)
    with pytest.raises(LCTfoundError, match="LOW < HIGH"):
        parse_hu_range("1000,-1000")
    assert parse_hu_range("-160,240") == (-160.0, 240.0)


@pytest.fixture
def files(reference, tmp_path):
    rng = np.random.default_rng(1)
    paths = {"reference": tmp_path / "ref.nrrd", "good": tmp_path / "good.nrrd", "bad": tmp_path / "bad.nrrd",
             "mask": tmp_path / "mask.nrrd", "empty": tmp_path / "empty.nrrd", "small": tmp_path / "small.nrrd"}
    write_volume(reference, paths["reference"])
    write_volume(reference.with_array(reference.array + rng.normal(0, 20, reference.shape).astype(np.float32)),
                 paths["good"])
    write_volume(reference.with_array(reference.array + rng.normal(0, 80, reference.shape).astype(np.float32)),
                 paths["bad"])
    body = (reference.array > -500).astype(np.uint8)
    write_volume(reference.with_array(body), paths["mask"])
    write_volume(reference.with_array(np.zeros(reference.shape, np.uint8)), paths["empty"])
    write_volume(CTVolume(np.zeros((6, 32, 32), np.float32), (1.0, 1.0, 2.0)), paths["small"])
    return paths


def test_evaluate_image_cli_compares_two_volumes_over_slices(run_cli, files, tmp_path):
    output = tmp_path / "report.json"
    code, out, err = run_cli(["evaluate", "image", "-p", files["good"], "-r", files["reference"], "--compare",
                              files["bad"], "--mask", files["mask"], "--range", "-1000,1000", "-o", output],
                             groups=["evaluate"])
    assert code == 0, err
    assert "data range 2000 HU" in out and "Wilcoxon" in out
    report = json.loads(output.read_text())
    assert report["data_range_hu"] == 2000 and report["results"]["slices"] == list(range(6))
    comparison = report["comparison"]["metrics"]
    assert comparison["rmse_hu"]["mean_difference"] < 0 and comparison["psnr"]["mean_difference"] > 0
    assert comparison["rmse_hu"]["wilcoxon"]["p_value"] == pytest.approx(2 / 2 ** 6)  # exact, 6 slices all one way
    assert report["results"]["volume"]["rmse_hu"] == pytest.approx(20, rel=0.1)
    csv_output = tmp_path / "slices.csv"
    code, _, err = run_cli(["evaluate", "image", "-p", files["good"], "-r", files["reference"], "--slices", "1-3",
                            "-o", csv_output], groups=["evaluate"])
    assert code == 0, err
    lines = csv_output.read_text().splitlines()
    assert lines[0].startswith("set,prediction,slice,psnr,ssim,rmse_hu,vif") and len(lines) == 4


def test_evaluate_image_bad_inputs_exit_2(run_cli, files, tmp_path):
    cases = [
        (["-p", files["small"], "-r", files["reference"]], "voxel grid"),
        (["-p", files["good"], "-r", files["reference"], "--range", "5"], "HU range"),
        (["-p", files["good"], "-r", files["reference"], "--mask", files["empty"]], "mask is empty"),
        (["-p", files["good"], "-r", files["reference"], "--compare", files["bad"], "--slices", "2"],
         "at least 2 common slices"),
        (["-p", files["good"], "-r", files["reference"], "-o", tmp_path / "x.txt"], ".json"),
        (["-p", tmp_path / "missing.nrrd", "-r", files["reference"]], "no such file"),
    ]
    for args, message in cases:
        code, _, err = run_cli(["evaluate", "image", *args], groups=["evaluate"])
        assert code == 2, (args, err)
        assert message in err and err.strip().count("\n") == 0, (message, err)

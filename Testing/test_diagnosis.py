"""Diagnosis: scan classification on deep features, Grad-CAM saliency, results tables, `lctfound classify`.

One tiny classifier is trained once (module fixture) through the real command and training loop on
synthetic scans: class "opacity" has a bright disc near one corner of every slice, class "clear"
has none. The tests then check predictions, determinism, saliency localisation and the batch CLI.
"""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from model_factory import tiny_model

from lctfound.errors import CheckpointError, LCTfoundError
from lctfound.io.volume import CTVolume, read_volume, write_volume
from lctfound.models import load_model, save_model
from lctfound.models.task_models import backbone_reference, load_task_model, save_task_model
from lctfound.pipelines.diagnosis import (
    RESEARCH_USE_NOTE,
    ScanClassifier,
    format_slices,
    results_rows,
    saliency_volume,
)
from lctfound.pipelines.results_table import result_columns, write_results_csv

ROWS = COLUMNS = 48
SLICES = 6
SPACING, ORIGIN = (0.7, 0.7, 2.5), (-20.0, 15.0, 40.0)


def synthetic_scan(opacity: bool, seed: int, corner: int = 0) -> CTVolume:
    """Lung-like noise; an "opacity" scan has a 60 HU disc near ``corner`` (0 top-left … 3 bottom-right)
    on every slice."""
    rng = np.random.default_rng(seed)
    array = rng.normal(-850, 30, (SLICES, ROWS, COLUMNS)).astype(np.float32)
    if opacity:
        yy, xx = np.mgrid[:ROWS, :COLUMNS]
        for k in range(SLICES):
            cy, cx = rng.integers(9, 15, 2)
            cy, cx = (ROWS - 1 - cy if corner & 2 else cy), (COLUMNS - 1 - cx if corner & 1 else cx)
            array[k][(yy - cy) ** 2 + (xx - cx) ** 2 < 25] = 60.0
    return CTVolume(array, SPACING, ORIGIN)


def quadrant(corner: int) -> tuple[slice, slice]:
    rows = slice(ROWS // 2, ROWS) if corner & 2 else slice(0, ROWS // 2)
    columns = slice(COLUMNS // 2, COLUMNS) if corner & 1 else slice(0, COLUMNS // 2)
    return rows, columns


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A classifier trained by ``lctfound classify train`` (the real loop) on 8 synthetic scans."""
    from lctfound.cli import main

    root = tmp_path_factory.mktemp("diagnosis")
    save_model(tiny_model(32), root / "backbone", extra_metadata={"name": "tiny-backbone"})
    rows = ["image,label"]
    for index in range(8):
        opacity = bool(index % 2)
        write_volume(synthetic_scan(opacity, seed=index), root / "train" / f"scan{index}.nrrd")
        rows.append(f"train/scan{index}.nrrd,{'opacity' if opacity else 'clear'}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    # Up block 3 keeps the random tiny backbone's features local enough to test localisation on a
    # 32² model; the default block 1 reads the same way.
    code = main(["classify", "train", "--backbone", str(root / "backbone"), "--table", str(root / "cases.csv"),
                 "--slices-per-scan", "4", "--timesteps", "0,50", "--block", "3", "-o", str(root / "run"),
                 "--max-steps", "40", "--batch-size", "4", "--lr", "3e-3", "--warmup-steps", "0",
                 "--checkpoint-every", "40", "--seed", "1", "--name", "opacity-test"])
    assert code == 0
    return root


@pytest.fixture(scope="module")
def classifier(trained):
    return ScanClassifier.from_pretrained(trained / "run" / "model", trained / "backbone", device="cpu")


def test_head_is_convolution_to_256_channels_pooling_and_mlp(trained):
    from lctfound.training.finetune import CLASSIFIER_HEAD, SliceClassifier

    head = SliceClassifier(load_model(trained / "backbone"), 3, timesteps=(0, 50)).head
    assert head.conv.out_channels == 256 and head.conv.in_channels == 2 * 96
    assert isinstance(head.pool, torch.nn.AdaptiveAvgPool2d)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 64), (64, 3)]
    info = load_task_model(trained / "run" / "model", "classification").info
    assert info["classifier"]["head"] == CLASSIFIER_HEAD and info["slice_selection"] == {"slices_per_scan": 4}


def test_scan_predictions_beat_chance(classifier):
    truths, predicted = [], []
    for index in range(8):
        opacity = bool(index % 2)
        prediction = classifier(synthetic_scan(opacity, seed=100 + index, corner=index % 4))
        truths.append("opacity" if opacity else "clear")
        predicted.append(prediction.predicted)
        assert prediction.slices == [1, 2, 3, 4]  # the 4 central slices, as in training
        assert prediction.slice_probabilities.shape == (4, 2)
        np.testing.assert_allclose(prediction.probabilities, prediction.slice_probabilities.mean(axis=0), rtol=1e-6)
        assert prediction.predicted == prediction.class_names[int(np.argmax(prediction.probabilities))]
    accuracy = np.mean(np.array(truths) == np.array(predicted))
    assert accuracy >= 7 / 8, (truths, predicted)


def test_results_do_not_depend_on_batching_or_on_the_other_slices(classifier):
    volume = synthetic_scan(True, seed=200)
    results = []
    for batch_size in (1, 3, 6):
        classifier.batch_size = batch_size
        results.append(classifier(volume, "all").slice_probabilities)
    classifier.batch_size = 4
    np.testing.assert_allclose(results[0], results[1], atol=1e-5)
    np.testing.assert_allclose(results[0], results[2], atol=1e-5)
    subset = classifier(volume, [4, 1])
    np.testing.assert_allclose(subset.slice_probabilities, results[0][[4, 1]], atol=1e-5)
    assert classifier(volume, "2-3").slices == [2, 3]
    with pytest.raises(LCTfoundError, match="slice 9 is outside the volume"):
        classifier(volume, [9])


def test_saliency_concentrates_on_the_disc(classifier):
    for corner in (0, 3):
        volume = synthetic_scan(True, seed=300 + corner, corner=corner)
        saliency = saliency_volume(classifier, volume, target_class="opacity")
        assert saliency.shape == volume.shape and saliency.dtype == np.float32
        analysed = [1, 2, 3, 4]
        assert not saliency[[0, 5]].any()  # slices not analysed stay 0
        for k in analysed:
            assert saliency[k].min() >= 0 and saliency[k].max() == pytest.approx(1.0)
            # A map that ignores the disc puts ~1/4 of its mass in the disc's quadrant.
            share = saliency[k][quadrant(corner)].sum() / saliency[k].sum()
            assert share > 0.5, (corner, k, share)
    # The default target is the predicted class; a given prediction is reused.
    prediction = classifier(volume, [2])
    assert prediction.predicted == "opacity"
    again = saliency_volume(classifier, volume, prediction=prediction)
    np.testing.assert_allclose(again[2], saliency_volume(classifier, volume, "opacity", [2])[2], atol=1e-5)
    with pytest.raises(LCTfoundError, match="unknown class 'nodule'"):
        saliency_volume(classifier, volume, target_class="nodule")


def test_results_rows_carry_provenance_and_the_note(classifier, tmp_path):
    prediction = classifier(synthetic_scan(False, seed=400), source="/data/case_07.nii.gz")
    (row,) = results_rows([prediction])
    assert list(row) == result_columns(["clear", "opacity"])
    assert row["case"] == "case_07" and row["input"] == "/data/case_07.nii.gz" and row["status"] == "ok"
    assert row["probability_clear"] + row["probability_opacity"] == pytest.approx(1.0, abs=1e-5)
    assert row["slices"] == "1-4" and row["note"] == RESEARCH_USE_NOTE
    provenance = prediction.provenance
    assert row["model"] == provenance["model"] == "opacity-test" and row["backbone"] == "tiny-backbone"
    assert len(row["model_sha256"]) == 64 and len(row["backbone_sha256"]) == 64
    assert provenance["timesteps"] == [0, 50] and provenance["block"] == 3 and provenance["trained"]
    write_results_csv([row], tmp_path / "r.csv", prediction.class_names)
    with open(tmp_path / "r.csv", newline="") as handle:
        (stored,) = list(csv.DictReader(handle))
    assert float(stored["probability_opacity"]) == pytest.approx(row["probability_opacity"], abs=1e-6)
    assert format_slices([3, 4, 5, 9, 11, 12]) == "3-5,9,11-12"


def test_cli_predicts_a_folder_resumes_and_writes_saliency(trained, tmp_path, run_cli):
    folder = tmp_path / "scans"
    for index in range(3):
        write_volume(synthetic_scan(bool(index % 2), seed=500 + index), folder / f"p{index}.nii.gz")
    (folder / "broken.nrrd").write_text("not an image\n")
    args = ["classify", "predict", folder, "--model", trained / "run" / "model", "--backbone", trained / "backbone",
            "-o", tmp_path / "results.csv", "--saliency", tmp_path / "saliency", "--device", "cpu"]
    code, out, err = run_cli(args)
    assert code == 1, err  # one input failed; the others are classified
    with open(tmp_path / "results.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["case", "input", "predicted", "probability_clear", "probability_opacity",
                                     "slices", "model", "model_sha256", "backbone", "backbone_sha256", "status",
                                     "note"]
        rows = {row["case"]: row for row in reader}
    assert sorted(rows) == ["broken", "p0", "p1", "p2"]
    assert rows["broken"]["status"].startswith("error: ") and rows["broken"]["predicted"] == ""
    assert [rows[c]["predicted"] for c in ("p0", "p1", "p2")] == ["clear", "opacity", "clear"]
    assert all(rows[c]["status"] == "ok" and rows[c]["note"] == RESEARCH_USE_NOTE for c in ("p0", "p1", "p2"))
    assert RESEARCH_USE_NOTE in out and "3 scan(s) classified, 0 already" in out
    saliency = read_volume(tmp_path / "saliency" / "p1_saliency.nii.gz", validate=False)
    source = read_volume(folder / "p1.nii.gz")
    assert saliency.same_grid(source) and saliency.array.dtype == np.float32 and saliency.array.max() == 1.0

    before = (tmp_path / "results.csv").read_bytes()
    code, out, err = run_cli(args)  # resume: only the failed input is tried again
    assert code == 1 and "0 scan(s) classified, 3 already" in out
    assert (tmp_path / "results.csv").read_bytes() == before

    (folder / "broken.nrrd").unlink()
    (tmp_path / "table.csv").write_text("image\nscans/p1.nii.gz\n")
    code, out, err = run_cli(["classify", "predict", tmp_path / "table.csv", "--model", trained / "run" / "model",
                              "-o", tmp_path / "table_results.csv", "--slices", "all"])
    assert code == 0, err
    with open(tmp_path / "table_results.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["case"] == "p1" and row["slices"] == "0-5" and row["predicted"] == "opacity"

    code, out, err = run_cli(["classify", "predict", folder / "p0.nii.gz", "--model", trained / "run" / "model",
                              "-o", tmp_path / "one.csv", "--saliency", tmp_path / "p0_cam.nrrd", "--slices", "2"])
    assert code == 0, err
    cam = read_volume(tmp_path / "p0_cam.nrrd", validate=False)
    assert cam.shape == (SLICES, ROWS, COLUMNS) and not cam.array[[0, 1, 3, 4, 5]].any()


def test_cli_refuses_bad_inputs_with_one_line(trained, tmp_path, run_cli):
    model, backbone = trained / "run" / "model", trained / "backbone"
    write_volume(synthetic_scan(False, seed=600), tmp_path / "scan.nrrd")
    (tmp_path / "empty").mkdir()
    other_backbone = tmp_path / "other-backbone"
    save_model(tiny_model(32, seed=5), other_backbone)
    segmentation = tmp_path / "seg-model"
    save_task_model(segmentation, "segmentation", backbone_reference(load_model(backbone)),
                    {"head": torch.nn.Linear(2, 2)}, {"labels": {"1": "Lesion"}})
    predict = ["classify", "predict", tmp_path / "scan.nrrd", "-o", tmp_path / "out.csv"]
    cases = [
        (predict + ["--model", segmentation], "a segmentation model, not a classification model"),
        (predict + ["--model", model, "--backbone", other_backbone], "trained on backbone"),
        (predict + ["--model", tmp_path / "missing-model"], "not found"),
        (["classify", "predict", tmp_path / "missing.nrrd", "--model", model, "-o", tmp_path / "out.csv"],
         "no such file or folder"),
        (["classify", "predict", tmp_path / "empty", "--model", model, "-o", tmp_path / "out.csv"], "no CT volumes"),
        (predict[:-1] + [tmp_path / "out.txt", "--model", model], "must be a .csv file"),
        (predict + ["--model", model, "--slices", "x-y"], "cannot read slice list"),
    ]
    for args, message in cases:
        code, out, err = run_cli(args)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "out.csv").exists()

    # A results table of other classes is never overwritten.
    (tmp_path / "other.csv").write_text("case,input,predicted\nx,y,z\n")
    code, out, err = run_cli(predict[:-1] + [tmp_path / "other.csv", "--model", model])
    assert code == 2 and "not a results table of this model's classes" in err
    assert (tmp_path / "other.csv").read_text() == "case,input,predicted\nx,y,z\n"


def test_an_older_head_layout_fails_clearly(trained, tmp_path, run_cli):
    from lctfound.training.finetune import SliceClassifier

    backbone = load_model(trained / "backbone")
    nn = torch.nn  # the head layout saved before the MLP (conv → pool → one linear layer)
    old_head = nn.Sequential(nn.Conv2d(192, 256, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Dropout(0.5), nn.Linear(256, 2))
    settings = {"mode": "frozen", "window": "mediastinal", "block": 1, "timesteps": [0, 50], "num_classes": 2}
    save_task_model(tmp_path / "old", "classification", backbone_reference(backbone), {"head": old_head},
                    {"classes": ["a", "b"], "classifier": settings})
    with pytest.raises(CheckpointError, match="train the model again"):
        SliceClassifier.from_task_model(load_task_model(tmp_path / "old"), backbone)
    write_volume(synthetic_scan(False, seed=700), tmp_path / "scan.nrrd")
    code, out, err = run_cli(["classify", "predict", tmp_path / "scan.nrrd", "--model", tmp_path / "old",
                              "--backbone", trained / "backbone", "-o", tmp_path / "out.csv"])
    assert code == 2 and "predates the conv256-pool-mlp head" in err


def test_classify_train_is_the_finetune_command():
    from lctfound.cli import build_parser
    from lctfound.cli.train import run_finetune

    parser = build_parser()
    classify = parser.parse_args(["classify", "train", "--table", "t.csv", "-o", "run"])
    finetune = parser.parse_args(["train", "finetune", "--task", "classification", "--table", "t.csv", "-o", "run"])
    assert classify.func is finetune.func is run_finetune
    shared = {k: v for k, v in vars(finetune).items() if k not in ("command", "train_command", "func", "mode")}
    assert {k: getattr(classify, k) for k in shared if hasattr(classify, k)} == {
        k: v for k, v in shared.items() if hasattr(classify, k)}
    assert classify.task == "classification" and classify.mode == "frozen" and classify.slices_per_scan == 12
    with pytest.raises(SystemExit):
        parser.parse_args(["classify", "train", "-o", "run"])  # --table is required here


def test_a_fully_fine_tuned_model_carries_its_backbone(trained, tmp_path):
    from lctfound.hashing import sha256_file
    from lctfound.training.finetune import SliceClassificationTask
    from lctfound.training.loop import LoopConfig, TrainingLoop

    volumes = [synthetic_scan(bool(index % 2), seed=800 + index) for index in range(2)]
    task = SliceClassificationTask(load_model(trained / "backbone"), [v.array[2] for v in volumes], [0, 1], ["a", "b"],
                                   ["clear", "opacity"], mode="full", timesteps=(0,), block=3, name="full-test")
    result = TrainingLoop(LoopConfig(output=str(tmp_path / "run"), batch_size=2, max_steps=2, checkpoint_every=2,
                                     seed=0), task).run()
    save_model(tiny_model(32, seed=9), tmp_path / "unrelated")
    # The given backbone is not used: the model carries its own fine-tuned one.
    classifier = ScanClassifier.from_pretrained(result.model_folder, tmp_path / "unrelated")
    provenance = classifier.provenance
    assert provenance["backbone"] == "fine-tuned from tiny-backbone" and provenance["mode"] == "full"
    weights = result.model_folder / "backbone" / "unet" / "diffusion_pytorch_model.safetensors"
    assert provenance["backbone_sha256"] == sha256_file(weights)
    assert not any(p.requires_grad for p in classifier.classifier.unet.parameters())
    prediction = classifier(volumes[1], [2, 3])
    assert prediction.slice_probabilities.shape == (2, 2)
    saliency = saliency_volume(classifier, volumes[1], prediction=prediction)
    assert saliency[[2, 3]].max() == pytest.approx(1.0) and not saliency[[0, 1, 4, 5]].any()

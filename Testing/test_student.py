"""Distilled student segmenter and the one predictor entry point for every segmentation model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import tiny_model

from lctfound.errors import Cancelled, LCTfoundError
from lctfound.models import load_model, save_model
from lctfound.models.task_models import backbone_reference, load_task_model, save_task_model
from lctfound.pipelines.predictors import load_segmentation_predictor
from lctfound.pipelines.segmentation import UNLABELLED, FewShotConfig, FewShotSegmenter
from lctfound.pipelines.student import StudentConfig, budget_epochs, context_indices, distill
from lctfound.progress import Progress

SIZE = 64
# Small and quick for tests; the defaults (16..256 at 256²) are for real CTs.
TEST_STUDENT = dict(features=(8, 16, 32, 64, 128), resolution=64, epochs=10, batch_size=2, learning_rate=5e-3,
                    time_budget=None)  # no wall-clock budget: a loaded machine must not change the result


def lesion_volume(slices: int = 6, seed: int = 0):
    """Lung-like noise (int16 HU, as read from a file) with a soft-tissue disc that moves and
    changes size from slice to slice."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    volume = rng.normal(-850, 20, (slices, SIZE, SIZE))
    lesion = np.zeros(volume.shape, dtype=bool)
    for k in range(slices):
        lesion[k] = (yy - 28 - 2 * k) ** 2 + (xx - 26 - k) ** 2 < (11 + k % 3) ** 2
    volume[lesion] = 40 + rng.normal(0, 10, lesion.sum())
    return np.round(volume).astype(np.int16), lesion


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny backbone, a few-shot teacher trained on two slices, and a student distilled from it."""
    root = tmp_path_factory.mktemp("student")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LCTFOUND_CACHE_DIR", str(root / "cache"))
        save_model(tiny_model(SIZE, seed=1), root / "backbone", extra_metadata={"name": "tiny"})
        backbone = load_model(root / "backbone")
        volume, lesion = lesion_volume()
        labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
        labels[[1, 4]] = lesion[[1, 4]]
        teacher = FewShotSegmenter(backbone, {1: "Lesion"}, FewShotConfig(timesteps=(0, 100), epochs=10))
        teacher.fit(volume, labels)
        teacher.save(root / "teacher", extra={"name": "teacher"})
        predictor = load_segmentation_predictor(root / "teacher", device="cpu")
        progress_calls = []
        student = distill(predictor, [volume], config=StudentConfig(**TEST_STUDENT),
                          progress=Progress(lambda *call: progress_calls.append(call)))
        student.save(root / "student", extra={"name": "student"})
        teacher_labels = predictor.predict(volume)
    return dict(root=root, backbone=backbone, volume=volume, lesion=lesion, labels=labels, teacher=predictor,
                teacher_labels=teacher_labels, student=student, progress=progress_calls)


@pytest.fixture(autouse=True)
def feature_cache(models, monkeypatch):
    """Every test reuses the module's feature cache (never the user's)."""
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(models["root"] / "cache"))


def test_student_agrees_with_its_teacher(models):
    student, volume = models["student"], models["volume"]
    teacher_mask = models["teacher_labels"] == 1
    assert teacher_mask.any() and dice(teacher_mask, models["lesion"]) > 0.8  # a teacher worth learning from
    predicted = student.predict(volume)
    assert predicted.dtype == np.uint8 and predicted.shape == volume.shape
    assert dice(predicted == 1, teacher_mask) >= 0.8
    report = student.report
    assert report.slices == 6 and report.annotated_slices == 0 and report.agreement["Lesion"] >= 0.8
    assert report.losses[-1] < report.losses[0]
    messages = [message for _, _, message in models["progress"]]
    assert any(m.startswith("teacher, volume 1") for m in messages) and "student epoch 10/10" in messages[-1]


def test_student_loads_and_predicts_without_a_backbone(models, monkeypatch):
    import lctfound.models.bundle as bundle

    def no_backbone(*args, **kwargs):
        raise AssertionError("a student must not load a backbone")

    monkeypatch.setattr(bundle, "load_model", no_backbone)
    monkeypatch.setattr("lctfound.models.load_model", no_backbone)
    predictor = load_segmentation_predictor(models["root"] / "student", device="cpu")
    assert predictor.task == "segmentation-student" and not predictor.needs_backbone
    assert predictor.label_names == {1: "Lesion"} and predictor.provenance["backbone"] is None
    teacher = predictor.provenance["teacher"]
    assert teacher["model"]["name"] == "teacher" and teacher["model"]["task"] == "fewshot-segmentation"
    assert teacher["backbone"]["sha256"] == backbone_reference(models["backbone"])["unet_sha256"]
    np.testing.assert_array_equal(predictor.predict(models["volume"]), models["student"].predict(models["volume"]))
    info = load_task_model(models["root"] / "student").info
    assert info["student"]["resolution"] == 64 and info["preprocessing"]["normalization"] == "official"


def test_prediction_streams_slice_batches_and_can_be_cancelled(models):
    student, volume = models["student"], models["volume"]
    updates = []
    whole = student.predict(volume, progress=Progress(lambda *call: updates.append(call)), batch_size=4)
    assert [done for done, _, _ in updates] == [4, 6]  # one update per batch of slices
    # Inputs are normalised per slice and the network per sample: batching does not change the result.
    np.testing.assert_array_equal(student.predict(volume, batch_size=1), whole)
    assert context_indices([0, 3, 5], 6).tolist() == [[0, 0, 1], [2, 3, 4], [4, 5, 5]]
    progress = Progress()
    progress.cancel_token.cancel()
    with pytest.raises(Cancelled):
        student.predict(volume, progress=progress)
    cleaned = student.predict(volume, postprocess=["largest"])
    assert set(np.unique(cleaned)) <= {0, 1}


def test_time_budget_cuts_the_epochs_and_progress_shows_an_eta(models):
    # Issue 15, item 4: the default distillation has a time budget. The epochs that fit are decided
    # after the first one; a budget the teacher pass alone exceeds leaves exactly one epoch.
    assert budget_epochs(20, 30.0, None) == 20
    assert budget_epochs(20, 30.0, 95.0) == 4      # the first epoch plus three more fit
    assert budget_epochs(20, 30.0, -5.0) == 1      # over budget already: still one whole epoch
    assert budget_epochs(3, 1.0, 100.0) == 3       # never more than asked for
    assert StudentConfig().time_budget == 600.0    # the default fits a coffee break
    messages = []
    student = distill(models["teacher"], [models["volume"]],
                      config=StudentConfig(**{**TEST_STUDENT, "epochs": 3, "time_budget": 1e-6}),
                      progress=Progress(lambda *call: messages.append(str(call[2]))))
    assert student.report.epochs == 1 and len(student.report.losses) == 1
    assert any("ETA" in message for message in messages if message.startswith("student epoch"))


def test_labels_add_supervision_and_bad_inputs_are_refused(models):
    teacher, volume, labels = models["teacher"], models["volume"], models["labels"]
    quick = StudentConfig(**{**TEST_STUDENT, "epochs": 1})
    student = distill(teacher, [volume, volume], [labels, None], quick)
    assert student.report.volumes == 2 and student.report.slices == 12 and student.report.annotated_slices == 2
    with pytest.raises(LCTfoundError, match="not on the volume's grid"):
        distill(teacher, [volume], [labels[:, :32]], quick)
    with pytest.raises(LCTfoundError, match="label value 3 is not a structure of the teacher"):
        distill(teacher, [volume], [np.where(labels == 1, 3, labels)], quick)
    with pytest.raises(LCTfoundError, match="no volume to distil on"):
        distill(teacher, [], None, quick)
    with pytest.raises(LCTfoundError, match="multiple of 16"):
        distill(teacher, [volume], None, StudentConfig(resolution=100))


def test_one_predictor_for_every_segmentation_model(models, tmp_path):
    from lctfound.training.finetune import DenseBackbone, DenseLossModule, DenseSegmentationTask, predict_dense

    backbone, volume = models["backbone"], models["volume"]
    fewshot = load_segmentation_predictor(models["root"] / "teacher", device="cpu")
    assert fewshot.task == "fewshot-segmentation" and fewshot.needs_backbone
    assert fewshot.provenance["backbone"]["sha256"] == backbone_reference(backbone)["unet_sha256"]
    np.testing.assert_array_equal(fewshot.predict(volume), models["teacher_labels"])

    # A structures model (frozen backbone, new output layer) saved as `train finetune` does.
    task = DenseSegmentationTask(backbone, list(volume[:2]), [np.zeros((SIZE, SIZE), np.uint8)] * 2,
                                 {1: "Lesion", 2: "Vessel"}, mode="frozen")
    torch.manual_seed(0)
    dense = DenseBackbone(backbone, 3, "frozen", class_values=[0, 1, 2])
    task.save_model(DenseLossModule(dense), tmp_path / "structures", task.metadata())
    structures = load_segmentation_predictor(tmp_path / "structures", device="cpu")
    assert structures.task == "segmentation" and structures.needs_backbone
    assert structures.label_names == {1: "Lesion", 2: "Vessel"}
    np.testing.assert_array_equal(structures.predict(volume), predict_dense(dense.eval(), volume))
    probabilities = dict(structures.predict_probabilities(volume[:2]))
    assert sorted(probabilities) == [0, 1] and probabilities[0].shape == (3, SIZE, SIZE)

    student = load_segmentation_predictor(models["root"] / "student", device="cpu")
    assert student.task == "segmentation-student"

    save_task_model(tmp_path / "classifier", "classification", backbone_reference(backbone),
                    {"head": torch.nn.Linear(4, 2)}, {"classes": ["a", "b"]})
    with pytest.raises(LCTfoundError, match="is a classification model, not a segmentation model"):
        load_segmentation_predictor(tmp_path / "classifier")
    with pytest.raises(LCTfoundError, match="is a backbone model, not a segmentation model"):
        load_segmentation_predictor(models["root"] / "backbone")


def test_a_student_can_be_distilled_from_a_student(models):
    student = models["student"]
    second = distill(student, [models["volume"]], config=StudentConfig(**{**TEST_STUDENT, "epochs": 1,
                                                                          "resolution": None}))
    assert second.label_names == student.label_names and second.window == student.window
    assert second.config.resolution == student.config.resolution == 64  # default: the teacher's input size


def test_cli_distill_then_predict(models, tmp_path, run_cli):
    from lctfound.io.volume import CTVolume, read_volume, write_volume

    volume, lesion = models["volume"], models["lesion"]
    ct = CTVolume(volume, spacing=(0.7, 0.7, 5.0))  # int16, as read back: the cached features are reused
    write_volume(ct, tmp_path / "ct.nrrd")
    label = np.zeros(volume.shape, dtype=np.uint8)
    label[2] = lesion[2]
    write_volume(ct.with_array(label), tmp_path / "label.nrrd")
    teacher = models["root"] / "teacher"
    code, out, err = run_cli(["segment", "distill", "--teacher", teacher, tmp_path / "ct.nrrd",
                              "--labels", tmp_path / "label.nrrd", "--epochs", "2", "--resolution", "32",
                              "-o", tmp_path / "student"])
    assert code == 0, err
    assert "distilled on 6 slices of 1 volume(s) (1 annotated)" in out
    import re

    from lctfound.cli.segment import STUDENT_MISSED_DICE

    name, agreement = re.search(r"Dice with the teacher: (\S+) ([0-9.]+)", out).groups()
    assert (f"has not learnt {name}" in err) == (float(agreement) < STUDENT_MISSED_DICE), (out, err)
    info = load_task_model(tmp_path / "student", "segmentation-student").info
    assert info["teacher"]["model"]["name"] == "teacher" and info["student"]["resolution"] == 32
    code, out, err = run_cli(["segment", "predict", tmp_path / "ct.nrrd", "--model", tmp_path / "student",
                              "-o", tmp_path / "pred.nii.gz"])
    assert code == 0, err
    predicted = read_volume(tmp_path / "pred.nii.gz", labels=True)
    assert predicted.shape == ct.shape and set(np.unique(predicted.array)) <= {0, 1}

    save_task_model(tmp_path / "classifier", "classification", {}, {"head": torch.nn.Linear(4, 2)}, {})
    code, _, err = run_cli(["segment", "distill", "--teacher", tmp_path / "classifier", tmp_path / "ct.nrrd",
                            "-o", tmp_path / "bad1"])
    assert code == 2 and "not a segmentation model" in err
    write_volume(CTVolume(np.zeros((6, 32, 32), dtype=np.uint8), spacing=(0.7, 0.7, 5.0)), tmp_path / "small.nrrd")
    code, _, err = run_cli(["segment", "distill", "--teacher", teacher, tmp_path / "ct.nrrd",
                            "--labels", tmp_path / "small.nrrd", "-o", tmp_path / "bad2"])
    assert code == 2 and "does not lie on the image's voxel grid" in err
    code, _, err = run_cli(["segment", "distill", "--teacher", teacher, "-o", tmp_path / "bad3"])
    assert code == 2 and "VOLUME" in err
    code, _, err = run_cli(["segment", "distill", "--teacher", teacher, tmp_path / "ct.nrrd", tmp_path / "ct.nrrd",
                            "--labels", tmp_path / "label.nrrd", "-o", tmp_path / "bad4"])
    assert code == 2 and "1 label map(s) for 2 volume(s)" in err
    assert not any((tmp_path / f"bad{n}").exists() for n in range(1, 5))

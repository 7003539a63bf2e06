"""Fine-tuning machinery: frozen head, adapters, full fine-tune; task model folders; resume through the loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctfound.errors import Cancelled, CheckpointError, LCTfoundError
from lctfound.models import save_model
from lctfound.models.registry import register_model
from lctfound.models.task_models import list_task_models, load_task_model
from lctfound.progress import Progress
from lctfound.training.finetune import (DenseBackbone, DenseSegmentationTask, PixelMLPHead, predict_dense)
from lctfound.training.loop import LoopConfig, TrainingLoop

from model_factory import tiny_model


def disc_slices(count: int = 6, size: int = 64, seed: int = 0):
    """Soft-tissue discs (label 1) in lung-like background; positions vary per slice."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    yy, xx = np.mgrid[:size, :size]
    for _ in range(count):
        cy, cx, r = rng.integers(18, 46), rng.integers(18, 46), rng.integers(6, 12)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r ** 2
        image = np.where(mask, 40.0, -850.0) + rng.normal(0, 25, (size, size))
        images.append(image.astype(np.float32))
        labels.append(mask.astype(np.uint8))
    return images, labels


@pytest.fixture
def backbone(tmp_path):
    model = tiny_model(64)
    save_model(model, tmp_path / "backbone", extra_metadata={"name": "tiny-backbone"})
    from lctfound.models import load_model

    return load_model(tmp_path / "backbone")


def train(task, output, steps=12, lr=3e-3, **kwargs):
    config = LoopConfig(output=str(output), batch_size=3, max_steps=steps, learning_rate=lr, checkpoint_every=steps,
                        log_every=1, seed=1, **kwargs)
    return TrainingLoop(config, task).run()


@pytest.mark.parametrize("mode", ["frozen", "adapter", "full"])
def test_each_mode_learns_and_saves_a_task_model(mode, backbone, tmp_path):
    images, labels = disc_slices()
    before = {k: v.clone() for k, v in backbone.unet.state_dict().items()}
    task = DenseSegmentationTask(backbone, images, labels, {1: "Lesion"}, mode=mode, name=f"discs-{mode}")
    result = train(task, tmp_path / "run", steps=15)
    from lctfound.training.logs import MetricsLog

    losses = [float(r["loss"]) for r in MetricsLog.read(tmp_path / "run" / "metrics.csv")]
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    changed = any(not torch.equal(before[k], v) for k, v in backbone.unet.state_dict().items())
    assert changed == (mode == "full")

    task_model = load_task_model(result.model_folder, "segmentation")
    assert task_model.info["dense"]["mode"] == mode and task_model.info["labels"] == {"1": "Lesion"}
    assert set(task_model.parts) == ({"output_layer", "adapters"} if mode == "adapter" else {"output_layer"})
    assert (task_model.backbone_folder() is not None) == (mode == "full")
    # Rebuilt from disk twice, the model predicts the same labels (nothing random at inference).
    rebuilt = DenseBackbone.from_task_model(task_model, None if mode == "full" else backbone)
    again = DenseBackbone.from_task_model(task_model, None if mode == "full" else backbone)
    np.testing.assert_array_equal(predict_dense(rebuilt, np.stack(images[:2])), predict_dense(again, np.stack(images[:2])))


def test_adapters_train_few_parameters_and_leave_other_uses_of_the_unet_alone(backbone):
    full = DenseBackbone(tiny_model(64), 2, "full")
    adapter = DenseBackbone(backbone, 2, "adapter")
    count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    assert count(adapter) < 0.1 * count(full)
    x = torch.randn(1, 3, 64, 64)
    condition = backbone.condition("mediastinal")
    for part in adapter.adapters.values():
        torch.nn.init.normal_(part.up.weight)  # make the adapters non-trivial
    with torch.no_grad():
        plain = backbone.unet(x, torch.tensor([0]), encoder_hidden_states=condition).sample
        adapter(x)
        plain_again = backbone.unet(x, torch.tensor([0]), encoder_hidden_states=condition).sample
    torch.testing.assert_close(plain, plain_again)


def test_full_fine_tune_segments_discs(backbone, tmp_path):
    images, labels = disc_slices(8)
    task = DenseSegmentationTask(backbone, images[:6], labels[:6], {1: "Lesion"}, mode="full")
    result = train(task, tmp_path / "run", steps=40, lr=2e-3)
    dense = DenseBackbone.from_task_model(load_task_model(result.model_folder))
    prediction = predict_dense(dense, np.stack(images[6:]))
    truth = np.stack(labels[6:])
    dice = 2 * (prediction & truth).sum() / (prediction.sum() + truth.sum())
    assert dice > 0.6


def test_task_model_refuses_another_backbone_and_is_listed_once_registered(backbone, tmp_path, monkeypatch):
    images, labels = disc_slices(3)
    result = train(DenseSegmentationTask(backbone, images, labels, {1: "Lesion"}, mode="adapter"), tmp_path / "r", steps=2)
    other = tiny_model(64, seed=5)
    save_model(other, tmp_path / "other")
    from lctfound.models import load_model

    with pytest.raises(CheckpointError, match="trained on backbone"):
        DenseBackbone.from_task_model(load_task_model(result.model_folder), load_model(tmp_path / "other"))
    with pytest.raises(CheckpointError, match="not a classification model"):
        load_task_model(result.model_folder, "classification")
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    register_model(result.model_folder, "my-discs")
    entries = list_task_models("segmentation")
    assert [(e.name, e.task) for e in entries] == [("my-discs", "segmentation")]
    assert load_task_model(entries[0].path).info["name"] == "my-discs"


def test_cancelled_fine_tune_resumes_to_the_same_weights(backbone, tmp_path):
    images, labels = disc_slices(6)

    def task():
        return DenseSegmentationTask(backbone, images, labels, {1: "Lesion"}, mode="adapter", timestep=50)

    config = dict(batch_size=3, max_steps=6, learning_rate=3e-3, checkpoint_every=2, log_every=1, seed=1)
    TrainingLoop(LoopConfig(output=str(tmp_path / "ref"), **config), task()).run()
    progress = Progress()
    progress.add_callback(lambda done, total, message: progress.cancel_token.cancel() if done >= 3 else None)
    with pytest.raises(Cancelled):
        TrainingLoop(LoopConfig(output=str(tmp_path / "cut"), **config), task(), progress=progress).run()
    result = TrainingLoop(LoopConfig(output=str(tmp_path / "cut"), **config), task(), resume=True).run()
    assert result.resumed_from == 2 and result.steps == 6
    a = load_task_model(tmp_path / "ref" / "model").parts
    b = load_task_model(tmp_path / "cut" / "model").parts
    for part in a:
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)


def test_pixel_mlp_head_widths_follow_the_paper():
    official = PixelMLPHead(3840, 2)
    widths = [m.out_features for m in official.layers if isinstance(m, torch.nn.Linear)]
    assert widths == [256, 32, 2]
    many = PixelMLPHead(3840, 31)
    assert [m.out_features for m in many.layers if isinstance(m, torch.nn.Linear)] == [256, 128, 31]
    small = PixelMLPHead(832, 3)
    assert small(torch.randn(5, 832)).shape == (5, 3)
    with pytest.raises(LCTfoundError, match="at least two classes"):
        PixelMLPHead(832, 1)


def test_bad_dense_inputs(backbone):
    with pytest.raises(LCTfoundError, match="unknown backbone mode"):
        DenseBackbone(backbone, 2, "half")
    images, labels = disc_slices(2)
    with pytest.raises(LCTfoundError, match="does not match its image slice"):
        DenseSegmentationTask(backbone, images, [labels[0][:10], labels[1]], {1: "Lesion"})


def test_cli_finetune_segmentation_and_classification(tmp_path, run_cli):
    import data_factory
    from lctfound.io.volume import write_volume

    save_model(tiny_model(64), tmp_path / "backbone")
    ct = data_factory.synthetic_ct(seed=3)
    write_volume(ct, tmp_path / "ct.nrrd")
    label = data_factory.nodule_label(ct, value=14)
    write_volume(label, tmp_path / "ct_label.nrrd")
    (tmp_path / "pairs.csv").write_text("image,labels\nct.nrrd,ct_label.nrrd\n")
    code, out, err = run_cli(["train", "finetune", "--task", "segmentation", "--backbone", tmp_path / "backbone",
                              "--pairs", tmp_path / "pairs.csv", "--names", "14=Lesion", "--mode", "adapter",
                              "-o", tmp_path / "seg", "--max-steps", "2", "--batch-size", "2"])
    assert code == 0, err
    model = load_task_model(tmp_path / "seg" / "model", "segmentation")
    assert model.info["labels"] == {"14": "Lesion"} and model.info["dense"]["mode"] == "adapter"
    # Label value 14 trains as compact class 1 and is predicted back as 14.
    assert model.info["dense"]["class_values"] == [0, 14] and model.info["dense"]["out_channels"] == 2
    from lctfound.models import load_model

    dense = DenseBackbone.from_task_model(model, load_model(tmp_path / "backbone"))
    assert set(np.unique(predict_dense(dense, ct.array[:2].astype(np.float32)))) <= {0, 14}

    rows = ["image,label"]
    for index in range(4):
        volume = data_factory.synthetic_ct(shape=(6, 40, 48), seed=10 + index)
        if index % 2:
            volume.array[:, 10:30, 10:30] = 300  # the "disease" class: a dense block
        write_volume(volume, tmp_path / f"case{index}.nrrd")
        rows.append(f"case{index}.nrrd,{'disease' if index % 2 else 'normal'}")
    (tmp_path / "cases.csv").write_text("\n".join(rows) + "\n")
    code, out, err = run_cli(["train", "finetune", "--task", "classification", "--backbone", tmp_path / "backbone",
                              "--table", tmp_path / "cases.csv", "--slices-per-scan", "2", "-o", tmp_path / "cls",
                              "--max-steps", "3", "--batch-size", "4"])
    assert code == 0, err
    classifier_model = load_task_model(tmp_path / "cls" / "model", "classification")
    assert classifier_model.info["classes"] == ["disease", "normal"]
    from lctfound.training.finetune import SliceClassifier, classify_slices

    classifier = SliceClassifier.from_task_model(classifier_model, load_model(tmp_path / "backbone"))
    probabilities = classify_slices(classifier, np.stack([ct.array[0], ct.array[1]]).astype(np.float32))
    assert probabilities.shape == (2, 2) and np.allclose(probabilities.sum(1), 1, atol=1e-5)

    code, out, err = run_cli(["train", "finetune", "--task", "segmentation", "--backbone", tmp_path / "backbone",
                              "--image", tmp_path / "ct.nrrd", "-o", tmp_path / "bad"])
    assert code == 2 and "give each CT image with its label map" in err and "pass --image CT --labels LABELS" in err
    (tmp_path / "one.csv").write_text("image,label\ncase0.nrrd,normal\n")
    code, out, err = run_cli(["train", "finetune", "--task", "classification", "--backbone", tmp_path / "backbone",
                              "--table", tmp_path / "one.csv", "-o", tmp_path / "bad2"])
    assert code == 2 and "only one class" in err


def test_slice_classifier_learns_a_visible_difference(backbone, tmp_path):
    from lctfound.training.finetune import SliceClassificationTask, SliceClassifier, classify_slices

    rng = np.random.default_rng(0)
    slices, classes = [], []
    for index in range(16):
        image = rng.normal(-850, 30, (64, 64)).astype(np.float32)
        if index % 2:
            image[16:48, 16:48] = 60.0
        slices.append(image)
        classes.append(index % 2)
    task = SliceClassificationTask(backbone, slices[:12], classes[:12], [str(i) for i in range(12)],
                                   ["clear", "opacity"], mode="frozen")
    result = TrainingLoop(LoopConfig(output=str(tmp_path / "run"), batch_size=4, max_steps=30, learning_rate=3e-3,
                                     checkpoint_every=30, seed=2), task).run()
    classifier = SliceClassifier.from_task_model(load_task_model(result.model_folder), backbone)
    probabilities = classify_slices(classifier, np.stack(slices[12:]))
    assert (probabilities.argmax(1) == np.array(classes[12:])).all()

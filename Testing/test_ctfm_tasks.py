"""CT-FM task models: the linear probe (scan classification) and the segmentation decoder, through
the shared training loop, their task-model folders, backbone checks, exact label geometry and the
``lctfound ctfm probe-*/seg-*`` commands. Small random encoders on small synthetic volumes."""

from __future__ import annotations

import csv
import json

import data_factory
import numpy as np
import pytest
import torch
from model_factory import SMALL_CTFM, save_small_ctfm_encoder

from lctfound.ctfm.decoder import DecoderSegmenter, prepare_case, train_decoder
from lctfound.ctfm.features import WindowSettings
from lctfound.ctfm.model import load_model, new_model
from lctfound.ctfm.preprocess import prepare_volume
from lctfound.ctfm.probe import EmbeddingRecipe, LinearProbe, predict_probe, train_probe
from lctfound.ctfm.tasks import check_backbone, load_ctfm_task_model
from lctfound.errors import CheckpointError, LCTfoundError
from lctfound.hashing import sha256_file
from lctfound.io.volume import CTVolume, read_volume, volume_stem, write_volume
from lctfound.training.loop import LoopConfig

RECIPE = EmbeddingRecipe(WindowSettings((32, 32, 32), 0.5, 4))




pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctfm") / "encoder"
    return save_small_ctfm_encoder(folder)


@pytest.fixture(scope="module")
def encoder(encoder_folder):
    return load_model(encoder_folder)


def scan(seed: int, blob: bool, shape=(32, 64, 64), spacing=(1.0, 1.0, 3.0), direction=None, radius_mm=8.0):
    """Soft tissue with air in front (a plausible CT) and, optionally, a bright sphere; (image, label map)."""
    rng = np.random.default_rng(seed)
    array = 40.0 + 15.0 * rng.standard_normal(shape)
    array[:, :4] = -1000.0
    labels = np.zeros(shape, np.uint8)
    if blob:
        k, j, i = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
        centre = rng.uniform(0.35 * np.asarray(shape), 0.65 * np.asarray(shape))
        inside = (((k - centre[0]) * spacing[2]) ** 2 + ((j - centre[1]) * spacing[1]) ** 2
                  + ((i - centre[2]) * spacing[0]) ** 2) <= radius_mm ** 2
        array[inside], labels[inside] = 900.0, 1
    direction = np.eye(3) if direction is None else direction
    image = CTVolume(array.astype(np.float32), spacing, (4.0, -20.0, 33.0), direction)
    return image, image.with_array(labels)


def loop(output, **overrides):
    settings = dict(output=str(output), batch_size=2, max_steps=4, learning_rate=3e-3, checkpoint_every=1000,
                    device="cpu", log_every=1)
    settings.update(overrides)
    return LoopConfig(**settings)


# --------------------------------------------------------------------------- geometry of label maps

def test_label_maps_enter_the_prepared_space_exactly():
    """Nearest-neighbour resampling through the exact index mapping: each prepared voxel gets the label of
    the source voxel nearest to it, on an oblique, anisotropic volume."""
    volume = data_factory.oblique_ct(shape=(16, 40, 44))
    prepared = prepare_volume(volume)
    nk, nj, ni = volume.shape
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    code = (k * 10_000 + j * 100 + i).astype(np.int32)  # each source voxel names itself
    resampled = prepared.from_source_grid(code, fill=-1)
    assert resampled.shape == prepared.shape and resampled.dtype == np.int32
    index = np.stack(np.nonzero(resampled >= 0), axis=1)
    assert len(index) > 1000
    nearest = np.round(prepared.index_to_source_ijk(index.astype(np.float64))).astype(np.int64)  # (i, j, k)
    expected = nearest[:, 2] * 10_000 + nearest[:, 1] * 100 + nearest[:, 0]
    assert np.array_equal(resampled[tuple(index.T)], expected)
    outside = prepared.index_to_source_ijk(np.stack(np.nonzero(resampled < 0), axis=1).astype(np.float64))
    assert np.all(np.any((outside < -0.5) | (outside > np.array([ni, nj, nk]) - 0.5), axis=1))
    with pytest.raises(LCTfoundError, match="does not lie on the source grid"):
        prepared.from_source_grid(code[:-1])


# --------------------------------------------------------------------------- linear probe

def _probe_table(folder, seeds_and_classes):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed, blob in seeds_and_classes:
        name = f"scan{seed:02d}.nii.gz"
        write_volume(scan(seed, blob)[0], folder / name)
        rows.append((name, "lesion" if blob else "clear"))
    table = folder / "cases.csv"
    with open(table, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    return table


def test_probe_learns_a_separable_set_and_writes_the_predictions_table(encoder, encoder_folder, tmp_path):
    table = _probe_table(tmp_path / "train", [(s, s % 2 == 1) for s in range(6)])
    events = []
    result = train_probe(encoder, table, loop(tmp_path / "run", batch_size=6, max_steps=40, learning_rate=1e-2),
                         RECIPE, cache_root=tmp_path / "cache", validate=False, on_event=events.append)
    assert result.steps == 40 and result.extra["train_accuracy"] == 1.0
    embedded = [e for e in events if e["event"] == "embedding"]
    assert len(embedded) == 6 and not any(e["cached"] for e in embedded)
    task_model = load_ctfm_task_model(result.model_folder, "ctfm-probe")
    assert task_model.info["classes"] == ["clear", "lesion"] and task_model.info["mode"] == "frozen"
    weights = sha256_file(encoder_folder / "model.safetensors")
    assert task_model.backbone["weights_sha256"] == encoder.weights_sha256 == weights
    assert task_model.info["embedding"]["aggregation"] == "mean"

    # Retraining reuses every cached embedding (epochs cost a matrix product).
    events.clear()
    train_probe(encoder, table, loop(tmp_path / "run2", batch_size=6, max_steps=2), RECIPE,
                cache_root=tmp_path / "cache", validate=False, on_event=events.append)
    assert all(e["cached"] for e in events if e["event"] == "embedding")

    # Held-out scans: far above chance (0.5).
    held_out = _probe_table(tmp_path / "test", [(s, s % 2 == 0) for s in range(20, 28)])
    paths = sorted((tmp_path / "test").glob("*.nii.gz"))
    probe = LinearProbe.load(result.model_folder)  # the backbone is found through the reference
    rows = predict_probe(probe, paths, tmp_path / "predictions.csv", validate=False, cache_root=tmp_path / "cache")
    with open(held_out, newline="") as handle:
        truth = {volume_stem(row["image"]): row["label"] for row in csv.DictReader(handle)}
    accuracy = np.mean([row["predicted"] == truth[row["case"]] for row in rows])
    assert accuracy >= 0.75, rows
    with open(tmp_path / "predictions.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["case", "input", "predicted", "probability_clear", "probability_lesion", "model",
                                     "model_sha256", "backbone", "backbone_sha256", "note"]
        written = list(reader)
    assert [row["case"] for row in written] == [volume_stem(p) for p in paths]
    for row in written:
        assert float(row["probability_clear"]) + float(row["probability_lesion"]) == pytest.approx(1.0, abs=1e-5)
        assert row["model_sha256"] == sha256_file(result.model_folder / "probe.safetensors")
        assert row["backbone_sha256"] == encoder.weights_sha256 and "research use" in row["note"]
        assert row["model"] == "run"
    with pytest.raises(LCTfoundError, match="already exists"):
        predict_probe(probe, paths, tmp_path / "predictions.csv", validate=False)

    # Another backbone (or not a CT-FM one) is refused.
    other = new_model(SMALL_CTFM, seed=5)
    with pytest.raises(CheckpointError, match="trained on CT-FM weights"):
        LinearProbe.load(result.model_folder, other)
    with pytest.raises(CheckpointError, match="needs a CT-FM encoder"):
        check_backbone(task_model, object())
    with pytest.raises(CheckpointError, match="not a ctfm-segmentation model"):
        DecoderSegmenter.load(result.model_folder, encoder)


def test_probe_table_problems_are_one_line(encoder, tmp_path):
    one_class = _probe_table(tmp_path / "one", [(0, True), (1, True)])
    with pytest.raises(LCTfoundError, match="only one class"):
        train_probe(encoder, one_class, loop(tmp_path / "a"), RECIPE, validate=False)
    table = _probe_table(tmp_path / "two", [(0, True), (1, False)])
    with pytest.raises(LCTfoundError, match="batch size 4 exceeds the 2 scans"):
        train_probe(encoder, table, loop(tmp_path / "b", batch_size=4), RECIPE, validate=False)
    with pytest.raises(LCTfoundError, match="nothing to resume"):
        train_probe(encoder, table, loop(tmp_path / "c"), RECIPE, validate=False, resume=True)


# --------------------------------------------------------------------------- segmentation decoder

def _dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.slow
def test_frozen_decoder_learns_a_bright_blob(encoder, tmp_path):
    pairs = [(f"case{s}", *scan(s, True)) for s in range(2)]
    before = {k: v.clone() for k, v in encoder.encoder.state_dict().items()}
    result = train_decoder(encoder, pairs, loop(tmp_path / "run", max_steps=60, log_every=10), {1: "Blob"}, "frozen",
                           (32, 32, 32), patches_per_case=4)
    task_model = load_ctfm_task_model(result.model_folder, "ctfm-segmentation")
    assert sorted(task_model.parts) == ["decoder"] and task_model.info["labels"] == {"1": "Blob"}
    assert all(torch.equal(before[k], v) for k, v in encoder.encoder.state_dict().items())
    segmenter = DecoderSegmenter.load(result.model_folder, encoder)
    # held out, and oblique: the label map comes back on the input's own voxel grid
    image, truth = scan(11, True, direction=data_factory.rotation_matrix((0.0, 0.0, 25.0)))
    labels = segmenter.predict(image)
    assert labels.same_grid(image) and labels.array.dtype == np.uint8
    assert set(np.unique(labels.array).tolist()) <= {0, 1}
    assert _dice(labels.array, truth.array) > 0.5, _dice(labels.array, truth.array)


def test_full_fine_tuning_stores_the_encoder_and_resumes(encoder, encoder_folder, tmp_path):
    pairs = [("case0", *scan(0, True, shape=(16, 48, 48)))]
    config = loop(tmp_path / "run", max_steps=2, batch_size=1, learning_rate=1e-3, checkpoint_every=1)
    first = train_decoder(encoder, pairs, config, {1: "Blob"}, "full", (16, 32, 32), patches_per_case=2)
    task_model = load_ctfm_task_model(first.model_folder, "ctfm-segmentation")
    assert sorted(task_model.parts) == ["decoder", "encoder"] and task_model.info["mode"] == "full"
    changed = [k for k, v in encoder.encoder.state_dict().items()
               if v.is_floating_point() and not torch.equal(task_model.parts["encoder"][k], v)]
    assert changed  # the encoder was trained …
    assert all(torch.equal(task_model.parts["encoder"][k], v)  # … but not its BatchNorm statistics
               for k, v in encoder.encoder.state_dict().items() if "running_" in k)
    resumed = train_decoder(encoder, pairs, loop(tmp_path / "run", max_steps=3, batch_size=1, learning_rate=1e-3,
                                                 checkpoint_every=1), {1: "Blob"}, "full", (16, 32, 32),
                            patches_per_case=2, resume=True)
    assert resumed.resumed_from == 2 and resumed.steps == 3
    # A fully fine-tuned model runs without its original backbone.
    segmenter = DecoderSegmenter.load(first.model_folder, None)
    labels = segmenter.predict(pairs[0][1], overlap=0.25)
    assert labels.same_grid(pairs[0][1])
    with pytest.raises(LCTfoundError, match="label value 1 has no name"):
        train_decoder(encoder, pairs, loop(tmp_path / "x"), {2: "Other"}, "frozen", (16, 32, 32))
    with pytest.raises(LCTfoundError, match="multiple of 16"):
        train_decoder(encoder, pairs, loop(tmp_path / "y"), {1: "Blob"}, "frozen", (16, 30, 32))
    empty = pairs[0][2].with_array(np.zeros(pairs[0][2].shape, np.uint8))
    with pytest.raises(LCTfoundError, match="no labelled voxel"):
        prepare_case(pairs[0][1], empty, [0, 1], (16, 32, 32))


# --------------------------------------------------------------------------- command line

def test_cli_probe_and_decoder_round_trip(encoder_folder, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    groups = ["ctfm", "train", "evaluate"]
    table = _probe_table(tmp_path / "data", [(s, s % 2 == 1) for s in range(4)])
    code, out, err = run_cli(["ctfm", "probe-train", "--model", encoder_folder, "--table", table, "-o",
                              tmp_path / "probe", "--window", "32,32,32", "--max-steps", "3", "--device", "cpu",
                              "--events"], groups=groups)
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events].count("embedding") == 4 and events[-1]["event"] == "finished"
    code, out, err = run_cli(["ctfm", "probe-predict", table, "--probe", tmp_path / "probe" / "model", "-o",
                              tmp_path / "p.csv", "--device", "cpu"], groups=groups)
    assert code == 0, err
    assert "research use" in out and (tmp_path / "p.csv").is_file()
    code, out, err = run_cli(["evaluate", "classification", "--predictions", tmp_path / "p.csv", "--truth", table,
                              "--bootstrap", "100"], groups=groups)
    assert code == 0, err

    image, labels = scan(3, True)
    write_volume(image, tmp_path / "data" / "seg_image.nii.gz")
    write_volume(labels, tmp_path / "data" / "seg_label.nii.gz")
    code, out, err = run_cli(["ctfm", "seg-train", "--model", encoder_folder,
                              "--image", tmp_path / "data" / "seg_image.nii.gz",
                              "--labels", tmp_path / "data" / "seg_label.nii.gz",
                              "--names", "1=Blob", "--patch", "32,32,32", "--max-steps", "2", "--device", "cpu",
                              "-o", tmp_path / "seg"], groups=groups)
    assert code == 0, err
    assert "trained 2 steps" in out
    code, out, err = run_cli(["ctfm", "seg-predict", tmp_path / "data" / "seg_image.nii.gz", "--decoder",
                              tmp_path / "seg" / "model", "-o", tmp_path / "pred" / "seg_image_seg.nii.gz",
                              "--device", "cpu"], groups=groups)
    assert code == 0, err
    predicted = read_volume(tmp_path / "pred" / "seg_image_seg.nii.gz", labels=True)
    assert predicted.same_grid(image) and "Blob" in out
    code, out, err = run_cli(["evaluate", "segmentation", "-p", tmp_path / "pred" / "seg_image_seg.nii.gz", "-r",
                              tmp_path / "data" / "seg_label.nii.gz", "--model", tmp_path / "seg" / "model"],
                             groups=groups)
    assert code == 0, err
    assert "Blob" in out

    # one-line errors, exit code 2
    code, _, err = run_cli(["ctfm", "seg-predict", tmp_path / "data" / "seg_image.nii.gz", "--decoder",
                            tmp_path / "probe" / "model", "-o", tmp_path / "x.nii.gz"], groups=groups)
    assert code == 2 and "not a ctfm-segmentation model" in err and err.count("\n") == 1
    code, _, err = run_cli(["ctfm", "probe-predict", table, "--probe", tmp_path / "probe" / "model", "-o",
                            tmp_path / "p.csv"], groups=groups)
    assert code == 2 and "already exists" in err
    code, _, err = run_cli(["ctfm", "seg-train", "--model", encoder_folder, "-o", tmp_path / "z"], groups=groups)
    assert code == 2 and "at least one pair" in err

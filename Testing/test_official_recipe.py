"""The official few-shot recipe against golden outputs of the original LCTfound code.

The golden folder (``shared/golden/lctfound-official``, its README says which original file and
line made each array, and the tolerances used here) lies in ``../shared`` beside the repository
(CI), else under ``$LCTFOUND_SHARED`` or ``/work/shared``. Without it these tests skip.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lctfound.features import FeatureExtractor
from lctfound.models.bundle import add_prompt_cache, load_model
from lctfound.models.taps import tap_up_blocks
from lctfound.pipelines.recipes import (OFFICIAL_SETTINGS, official_augmentation, resolve_recipe,
                                        segmentation_loss, warmup_cosine_schedule)
from lctfound.pipelines.segmentation import UNLABELLED, FewShotConfig, FewShotSegmenter
from lctfound.preprocessing import official_uint8, prepare_slices, resize_images, resize_labels, window_to_unit
from lctfound.training.finetune import PixelMLPHead, official_head_widths
from lctfound.windows import get_window

REPO = Path(__file__).resolve().parents[1]
WINDOWS = ("lung", "mediastinal")


def _golden_folder() -> Path | None:
    candidates = [REPO.parent / "shared"]
    if os.environ.get("LCTFOUND_SHARED"):
        candidates.append(Path(os.environ["LCTFOUND_SHARED"]))
    candidates.append(Path("/work/shared"))
    for shared in candidates:
        folder = shared / "golden" / "lctfound-official"
        if (folder / "manifest.json").is_file():
            return folder
    return None


GOLDEN = _golden_folder()
pytestmark = pytest.mark.skipif(
    GOLDEN is None, reason="golden outputs of the original code not found: ../shared/golden/lctfound-official "
                           "beside the repository (or $LCTFOUND_SHARED/golden/lctfound-official)")


def npz(name: str) -> dict[str, np.ndarray]:
    with np.load(GOLDEN / name, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def manifest():
    return json.loads((GOLDEN / "manifest.json").read_text())


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory, manifest):
    """A copy of ``tiny_unet`` with the five prompts cached from the rebuilt tiny BERT."""
    from safetensors.numpy import save_file

    root = tmp_path_factory.mktemp("official")
    bert = root / "tiny_bert"
    shutil.copytree(GOLDEN / "tiny_bert", bert)
    recipe = json.loads((bert / "weights_recipe.json").read_text())
    draw = np.random.RandomState(recipe["seed"])
    tensors = {}
    for tensor in recipe["tensors"]:
        if tensor["name"].endswith("LayerNorm.weight"):
            value = np.ones(tensor["shape"], dtype=np.float32)
        else:
            value = (draw.randint(-1024, 1024, size=tensor["shape"], dtype=np.int64) / 32768).astype(np.float32)
        assert hashlib.sha256(value.astype("<f4").tobytes()).hexdigest() == tensor["sha256_float32_le"], tensor["name"]
        tensors[tensor["name"]] = value
    save_file(tensors, str(bert / recipe["file"]), metadata=recipe["safetensors_metadata"])
    unet = root / "tiny_unet"
    shutil.copytree(GOLDEN / "tiny_unet", unet)
    add_prompt_cache(unet, bert, [prompt["text"] for prompt in manifest["prompts"]["prompts"]])
    return unet


@pytest.fixture(scope="module")
def official_model(official_tiny):
    return load_model(official_tiny)


# --------------------------------------------------------------------------------------------- preprocessing


def test_window_and_uint8_quantisation_match_the_loader():
    golden = npz("preprocess.npz")
    for w, name in enumerate(WINDOWS):
        window = get_window(name)
        assert (window.low, window.high) == (golden["window_low"][w], golden["window_high"][w])
        for s in range(2):
            hu = torch.from_numpy(golden["hu"][s])
            np.testing.assert_array_equal(official_uint8(hu, window).numpy(), golden["unit_uint8"][w, s])
            np.testing.assert_array_equal(official_uint8(hu.float(), window).numpy(),
                                          golden["unit_uint8_float32_hu"][w, s])


def test_network_inputs_match_both_loaders():
    golden = npz("preprocess.npz")
    for w, name in enumerate(WINDOWS):
        pretrain = prepare_slices(golden["hu"], name, 256, "official", "area")
        segmentation = prepare_slices(golden["hu"], name, 256, "official-segmentation", "area")
        assert pretrain.shape == (2, 3, 256, 256)
        np.testing.assert_allclose(pretrain[:, 0].numpy(), golden["pretrain_input"][w], atol=1e-6, rtol=0)
        np.testing.assert_allclose(segmentation[:, 0].numpy(), golden["seg_input"][w], atol=1e-6, rtol=0)
    # The fast recipe's antialiased bilinear resize is a documented difference (docs/recipes.md).
    fast = prepare_slices(golden["hu"], "mediastinal", 256, "official", "antialias")
    assert np.abs(fast[:, 0].numpy() - golden["pretrain_input"][1]).max() > 0.05


def test_labels_match_the_segmentation_loader(sample_data):
    from lctfound.io.volume import read_volume

    golden = npz("preprocess.npz")
    slices = [int(s) for s in golden["slices"]]
    image = read_volume(sample_data.folder / "lung1_image.nrrd")
    label = read_volume(sample_data.folder / "lung1_label.nrrd", labels=True)
    np.testing.assert_array_equal(image.array[slices], golden["hu"])
    native = torch.from_numpy(label.array[slices].astype(np.int64))
    area = torch.nn.functional.interpolate(native[:, None].float(), size=(256, 256), mode="area")[:, 0]
    np.testing.assert_array_equal(area.numpy(), golden["seg_label"])
    np.testing.assert_array_equal(resize_labels(native, 256, "area").numpy(), golden["seg_target"])


# --------------------------------------------------------------------------------------------- backbone, prompts


def test_tiny_unet_loads_strictly_and_gets_the_official_recipe(official_model, manifest):
    assert sum(p.numel() for p in official_model.unet.parameters()) == manifest["tiny_unet"]["parameters"]
    assert len(official_model.unet.state_dict()) == manifest["tiny_unet"]["tensors"]
    assert resolve_recipe("auto", official_model) == "official"
    assert resolve_recipe("fast", official_model) == "fast"


def test_prompt_vectors_match(official_model, manifest):
    golden = npz("prompts.npz")
    for prompt in manifest["prompts"]["prompts"]:
        vector = official_model.encode_prompts([prompt["text"]]).float().cpu().numpy()
        np.testing.assert_allclose(vector.reshape(1, 1, 768), golden[prompt["key"]], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- features


def test_official_features_match(official_model):
    golden = npz("features.npz")
    config = FewShotConfig.for_model(official_model)
    spec = config.feature_spec(official_model)
    extractor = FeatureExtractor(official_model, spec)
    assert extractor.resolution == official_model.sample_size == 64  # every pixel of the input, not min(S, 128)
    assert list(spec.timesteps) == golden["timesteps"].tolist() and list(spec.blocks) == golden["up_blocks"].tolist()
    np.testing.assert_allclose(official_model.condition(spec.window).float().cpu().numpy(), golden["condition"],
                               atol=1e-5, rtol=0)
    hu = npz("preprocess.npz")["hu"]
    for w, name in enumerate(WINDOWS):
        # The segmentation loader at the model's size (512 → 64 area): the stored x0.
        x0 = prepare_slices(hu, name, 64, spec.normalization, spec.resize)
        np.testing.assert_allclose(x0.numpy(), golden["x0"][w], atol=1e-6, rtol=0)
        for s in range(2):
            features = extractor(torch.from_numpy(golden["x0"][w, s][None]),
                                 noise=torch.from_numpy(golden["noise"][w, s][None]))[0]
            assert features.shape == (512, 64, 64)
            rows = features.reshape(512, -1).T.numpy()
            np.testing.assert_allclose(rows[golden["pixel_index"]], golden["features_px"][w, s], atol=1e-4, rtol=1e-4)
            flat = features.reshape(512, -1).double()
            np.testing.assert_allclose(flat.mean(1).numpy(), golden["channel_mean"][w, s], atol=1e-5, rtol=0)
            np.testing.assert_allclose(flat.std(1, unbiased=False).numpy(), golden["channel_std"][w, s],
                                       atol=1e-5, rtol=0)


def test_native_block_outputs_match(official_model):
    golden = npz("features.npz")
    unet, scheduler = official_model.unet, official_model.scheduler
    x0 = torch.from_numpy(golden["x0"][1, 1][None])
    noise = torch.from_numpy(golden["noise"][1, 1][None])
    condition = official_model.condition("mediastinal")
    with torch.no_grad(), tap_up_blocks(unet, (1, 2)) as captured:
        for row, timestep in enumerate(golden["timesteps"].tolist()):
            t = torch.full((1,), timestep, dtype=torch.long)
            captured.clear()
            unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=condition)
            np.testing.assert_allclose(captured[1][0].numpy(), golden["native_up1"][row], atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(captured[2][0].numpy(), golden["native_up2"][row], atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------- head, loss, schedule


def official_head(channels: int, classes: int) -> PixelMLPHead:
    return PixelMLPHead(channels, classes, OFFICIAL_SETTINGS["dropout"], official_head_widths(classes))


def test_original_head_loads_strictly_and_gives_its_logits():
    from safetensors.torch import load_file

    golden, features = npz("head.npz"), npz("features.npz")
    head = official_head(512, 2)
    head.load_state_dict(load_file(str(GOLDEN / "head.safetensors")), strict=True)
    with torch.no_grad():
        logits = head.eval()(torch.from_numpy(features["features_px"].reshape(1000, 512)))
    np.testing.assert_allclose(logits.numpy(), golden["logits"], atol=1e-5, rtol=0)
    # The segmenter builds the same head for the official recipe, whatever the input width.
    for channels in (512, 3840):
        assert official_head(channels, 2).widths == (256, 32)


def test_many_class_head_has_the_original_layout():
    head = official_head(3840, 30)
    assert not any(isinstance(m, torch.nn.Dropout) for m in head.modules())
    assert [k for k in head.state_dict() if k.endswith(".weight")] == [f"layers.{i}.weight" for i in (0, 2, 3, 5, 6)]
    assert head.layers[3].out_features == 128
    assert [k for k in official_head(3840, 29).state_dict() if k.endswith(".weight")] == \
        [f"layers.{i}.weight" for i in (0, 3, 4, 7, 8)]
    # A fast-recipe head of ≥ 30 classes saved with Dropout(0) modules still loads.
    legacy = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Dropout(0), torch.nn.ReLU(), torch.nn.BatchNorm1d(32),
                                 torch.nn.Linear(32, 128), torch.nn.Dropout(0), torch.nn.ReLU(),
                                 torch.nn.BatchNorm1d(128), torch.nn.Linear(128, 31))
    current = PixelMLPHead(64, 31, widths=(32, 128))
    current.load_state_dict({f"layers.{k}": v for k, v in legacy.state_dict().items()}, strict=True)
    torch.testing.assert_close(current.layers[6].weight, legacy[8].weight)


def test_loss_matches_the_original():
    golden = npz("head.npz")

    def loss(logits, target):
        return float(segmentation_loss(torch.from_numpy(golden[logits]), torch.from_numpy(golden[target]),
                                       OFFICIAL_SETTINGS["focal_alpha"], OFFICIAL_SETTINGS["focal_gamma"]))

    np.testing.assert_allclose(loss("logits", "target_real"), golden["loss_real"], rtol=1e-6)
    np.testing.assert_allclose(loss("logits", "target_random"), golden["loss_random"], rtol=1e-6)
    np.testing.assert_allclose(loss("logits_random", "target_random"), golden["loss_logits_random"], rtol=1e-6)
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(golden["logits_random"]),
                                           torch.from_numpy(golden["target_random"]))
    np.testing.assert_allclose(float(ce), golden["ce_logits_random"], rtol=1e-6)


@pytest.mark.parametrize("batches_per_epoch", [1, 25])
def test_schedule_matches_the_original(batches_per_epoch):
    expected = npz("head.npz")[f"lr_{batches_per_epoch}_batches_per_epoch"]
    settings = FewShotConfig.for_recipe("official")
    head = official_head(512, 2)
    optimizer = torch.optim.AdamW(head.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay)
    schedule = warmup_cosine_schedule(optimizer, settings.warmup_steps, batches_per_epoch * settings.epochs)
    rates = []
    for _ in range(batches_per_epoch * settings.epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    np.testing.assert_allclose(rates, expected, rtol=1e-6, atol=0)


def test_official_settings_match_recipe_json():
    recipe = json.loads((GOLDEN / "recipe.json").read_text())
    config = FewShotConfig.for_recipe("official")
    training = recipe["training_config"]
    assert config.epochs == training["num_epochs"]
    assert config.batch_images == training["train_batch_size"] == recipe["batches"]["images_per_batch"]
    assert config.learning_rate == training["learning_rate"]
    assert config.warmup_steps == training["lr_warmup_steps"]
    assert config.seed == training["seed"] == recipe["seeding"]["value"]
    assert config.weight_decay == recipe["optimizer"]["param_groups"][1]["weight_decay"]
    assert config.grad_clip == recipe["gradient_clipping"]["max_norm"]
    assert (config.focal_alpha, config.focal_gamma) == (recipe["loss"]["alpha"], recipe["loss"]["gamma"])
    assert list(config.timesteps) == recipe["feature_extractor"]["steps"]
    assert list(config.blocks) == recipe["feature_extractor"]["blocks"][1]
    assert config.window == "mediastinal" and config.augment and config.min_steps == 0
    assert "Dropout(0.25)" in recipe["head"]["layers"] and OFFICIAL_SETTINGS["dropout"] == 0.25
    from monai.transforms import RandFlipd, RandRotated

    flips, rotation = official_augmentation().transforms[:2], official_augmentation().transforms[2]
    assert [type(t) for t in flips] == [RandFlipd, RandFlipd]
    assert [t.flipper.spatial_axis for t in flips] == [0, 1] and all(t.prob == 0.5 for t in flips)
    assert isinstance(rotation, RandRotated) and rotation.prob == 0.5
    assert rotation.rand_rotate.range_x == (-0.2, 0.2)


# --------------------------------------------------------------------------------------------- training


def test_official_fit_trains_on_every_pixel_in_batches_of_four(official_model, tmp_path):
    """5 labelled slices → one batch of 4 per epoch (the 5th dropped, as drop_last): each step runs the
    backbone on the 4 augmented images with fresh noise and classifies all 64² pixels of each."""
    rng = np.random.default_rng(0)
    volume = rng.integers(-1000, 400, size=(6, 96, 96)).astype(np.int16)
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[:5] = 0
    labels[:5, 30:60, 30:60] = 1
    config = FewShotConfig.for_model(official_model, epochs=3)
    assert config.recipe == "official" and config.batch_images == 4
    segmenter = FewShotSegmenter(official_model, {1: "Lesion"}, config)
    assert segmenter.head.widths == (256, 32)
    calls = []
    original_call = FeatureExtractor.__call__

    def spy(extractor, x0, slice_ids=None, out_dtype=torch.float32, noise=None):
        calls.append((tuple(x0.shape), noise is not None))
        return original_call(extractor, x0, slice_ids, out_dtype, noise=noise)

    steps = []
    original_loss = segmentation_loss

    def counting_loss(logits, targets, *args, **kwargs):
        steps.append(tuple(logits.shape))
        return original_loss(logits, targets, *args, **kwargs)

    import lctfound.pipelines.segmentation as segmentation_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FeatureExtractor, "__call__", spy)
        patch.setattr(segmentation_module, "segmentation_loss", counting_loss)
        report = segmenter.fit(volume, labels, cache_root=tmp_path / "cache")
    assert calls == [((4, 3, 64, 64), True)] * 3
    assert steps == [(4 * 64 * 64, 2)] * 3
    assert report.slices == [0, 1, 2, 3, 4] and report.pixels == 5 * 64 * 64 and len(report.losses) == 3
    assert not segmenter.head.training
    # Prediction computes the full-grid features per batch and caches nothing.
    prediction = segmenter(volume[:2], cache_root=tmp_path / "cache")
    assert prediction.shape == (2, 96, 96) and not (tmp_path / "cache").exists()
    saved = segmenter.save(tmp_path / "model")
    again = FewShotSegmenter.load(saved, official_model)
    assert again.config.recipe == "official" and again.head.widths == (256, 32)
    np.testing.assert_array_equal(again(volume[:2], cache_root=tmp_path / "cache"), prediction)


def test_official_augmentation_moves_image_and_label_together():
    unit = torch.zeros(2, 32, 32)
    unit[:, 4:12, 4:12] = 1.0
    cover = unit[:, None].clone()
    images, covers = FewShotSegmenter._augment(official_augmentation(), unit, cover, (0, 0, 0))
    torch.testing.assert_close(images, covers[:, 0])
    targets = FewShotSegmenter._full_cover_targets(covers)
    assert set(targets.unique().tolist()) <= {0, 1}


def test_fast_recipe_keeps_its_documented_differences(official_model):
    """docs/recipes.md: the fast recipe resizes with antialiased bilinear, uses a grid of at most 128²,
    a pixel subset and scaled head widths; it shares the original loss (α 0.25)."""
    config = FewShotConfig.for_recipe("fast")
    spec = config.feature_spec(official_model)
    assert (spec.resize, spec.normalization, spec.resolution) == ("antialias", "official", 64)
    assert config.focal_alpha == 0.25 and config.batch_images == 0 and config.min_steps > 0
    table = (REPO / "docs" / "recipes.md").read_text()
    for topic in ("antialias", "128", "subset", "identity operator", "cold diffusion", "fp16", "noise"):
        assert topic in table, topic


def test_segment_train_help_names_the_recipes(run_cli):
    code, out, _ = run_cli(["segment", "train", "--help"])
    assert code == 0 and "--recipe" in out and "official" in out and "fast" in out


def test_segmentation_panel_names_the_recipe(official_tiny, tmp_path):
    """The panel logic (Slicer and browser) says which recipe training runs, and passes it on."""
    from types import SimpleNamespace

    from lctfound.logic.segmentation import FEWSHOT, SegmentationModuleLogic, SegmentationParameters
    from lctfound.models import save_model

    from model_factory import tiny_model

    fast_folder = tmp_path / "tiny-backbone"
    save_model(tiny_model(64, seed=1), fast_folder)
    entries = [SimpleNamespace(name="release", path=official_tiny, source="folder", preset="custom", description=""),
               SimpleNamespace(name="tiny", path=fast_folder, source="user", preset="tiny", description="")]
    logic = SegmentationModuleLogic(list_models=lambda extra_folders=(): entries, available_devices=lambda: ["cpu"],
                                    runs_root=tmp_path / "runs")
    volume = SimpleNamespace(GetImageData=lambda: object(), GetID=lambda: "vtkMRMLScalarVolumeNode1")
    official = SegmentationParameters(task=FEWSHOT, input_volume=volume, model_name="release", device="cpu")
    assert logic.training_recipe(official) == ("official", 20)
    assert "official recipe" in logic.selection_summary(official) and "20 epochs" in logic.selection_summary(official)
    fast = SegmentationParameters(task=FEWSHOT, input_volume=volume, model_name="tiny", device="cpu")
    assert logic.training_recipe(fast) == ("fast", 30)
    assert "fast recipe" in logic.selection_summary(fast)
    fast.epochs = 7  # a changed field wins over the recipe's count
    assert logic.training_recipe(fast) == ("fast", 7)

"""Feature extraction: the paper's layout, determinism, streaming, cancellation, storage and the CLI."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from lctfound.errors import Cancelled, LCTfoundError
from lctfound.features import (FeatureExtractor, FeatureSpec, load_volume_features, parse_slices,
                               save_volume_features)
from lctfound.models import save_model
from lctfound.progress import Progress

from model_factory import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(sample_size=64)


@pytest.fixture(scope="module")
def volume():
    rng = np.random.default_rng(1)
    return rng.integers(-1024, 600, size=(5, 80, 80)).astype(np.int16)


def test_layout_follows_the_paper(model):
    extractor = FeatureExtractor(model)
    widths = list(reversed(model.unet.config.block_out_channels))
    per_timestep = sum(widths[b] for b in (1, 2, 3, 4))
    assert extractor.channels == 4 * per_timestep
    assert [(g.timestep, g.block) for g in extractor.layout[:5]] == [(0, 1), (0, 2), (0, 3), (0, 4), (50, 1)]
    assert extractor.layout[-1].stop == extractor.channels


def test_features_match_a_hand_written_forward(model, volume):
    extractor = FeatureExtractor(model, FeatureSpec(timesteps=(50,), blocks=(2, 4)))
    x0 = extractor.prepare(volume[[2]])
    features = extractor(x0, [2])
    # The same computation by hand: one forward at t=50 with the same noise, hooks replaced by a full forward.
    noise = extractor.noise_for([2], tuple(x0.shape[1:]))
    t = torch.tensor([50])
    noisy = model.scheduler.add_noise(x0, noise, t)
    outputs = {}
    hooks = [model.unet.up_blocks[b].register_forward_hook(lambda m, i, o, b=b: outputs.__setitem__(b, o))
             for b in (2, 4)]
    with torch.no_grad():
        model.unet(noisy, t, encoder_hidden_states=model.condition("mediastinal"))
    for hook in hooks:
        hook.remove()
    manual = torch.cat([torch.nn.functional.interpolate(outputs[b], size=(64, 64), mode="bilinear",
                                                         align_corners=False) for b in (2, 4)], dim=1)
    torch.testing.assert_close(features, manual, atol=1e-5, rtol=1e-4)


def test_slice_features_do_not_depend_on_batching(model, volume):
    extractor = FeatureExtractor(model, FeatureSpec(resolution=32))
    single = extractor(extractor.prepare(volume[[3]]), [3])
    batched = extractor(extractor.prepare(volume[[1, 3]]), [1, 3])
    torch.testing.assert_close(single[0], batched[1], atol=1e-4, rtol=1e-4)
    other_seed = FeatureExtractor(model, FeatureSpec(resolution=32, seed=7))(extractor.prepare(volume[[3]]), [3])
    assert not torch.allclose(single, other_seed)


def test_streaming_progress_and_cancel(model, volume):
    extractor = FeatureExtractor(model, FeatureSpec(timesteps=(0,), resolution=16))
    seen = []
    progress = Progress(lambda done, total, message: seen.append((done, total)))
    batches = list(extractor.iter_volume(volume, slices=[0, 2, 4], batch_size=2, progress=progress))
    assert [b for b, _ in batches] == [[0, 2], [4]]
    assert batches[0][1].dtype == torch.float16 and batches[0][1].shape[1:] == (extractor.channels, 16, 16)
    assert seen[-1] == (3, 3)

    cancelling = Progress(lambda done, total, message: progress_token.cancel() if done >= 1 else None)
    progress_token = cancelling.cancel_token
    with pytest.raises(Cancelled):
        list(extractor.iter_volume(volume, batch_size=1, progress=cancelling))


def test_saved_features_are_complete_or_absent(model, volume, tmp_path):
    extractor = FeatureExtractor(model, FeatureSpec(timesteps=(0, 100), resolution=16))
    folder = save_volume_features(extractor, volume, tmp_path / "f", slices=[1, 3], batch_size=2)
    array, metadata = load_volume_features(folder)
    assert array.shape == (2, extractor.channels, 16, 16) and array.dtype == np.float16
    assert metadata["slices"] == [1, 3] and metadata["layout"][0]["timestep"] == 0
    direct = extractor(extractor.prepare(volume[[3]]), [3], torch.float16)
    np.testing.assert_allclose(array[1].astype(np.float32), direct[0].float().numpy(), atol=2e-3)

    token = Progress()
    token.cancel_token.cancel()
    with pytest.raises(Cancelled):
        save_volume_features(extractor, volume, tmp_path / "g", progress=token)
    assert not (tmp_path / "g").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".g.")]


def test_bad_specs_and_slices(model, volume):
    with pytest.raises(LCTfoundError, match="timesteps must lie"):
        FeatureSpec(timesteps=(1000,))
    with pytest.raises(LCTfoundError, match="up blocks"):
        FeatureSpec(blocks=(5,))
    with pytest.raises(LCTfoundError, match="outside the volume"):
        list(FeatureExtractor(model).iter_volume(volume, slices=[9]))
    assert parse_slices("1,3-4", 10) == [1, 3, 4]
    with pytest.raises(LCTfoundError, match="cannot read slice list"):
        parse_slices("a-b", 10)


def test_cli_features_reports_size_and_writes(tmp_path, capsys, model):
    import SimpleITK as sitk

    from lctfound.cli import main

    folder = save_model(model, tmp_path / "model")
    rng = np.random.default_rng(0)
    image = sitk.GetImageFromArray(rng.integers(-1024, 400, size=(3, 48, 48)).astype(np.int16))
    image.SetSpacing((0.7, 0.7, 5.0))
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    args = ["features", str(tmp_path / "ct.nrrd"), "--model", str(folder), "-o", str(tmp_path / "out"),
            "--slices", "0,2", "--timesteps", "0,50", "--resolution", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    channels = FeatureExtractor(model, FeatureSpec(timesteps=(0, 50))).channels
    assert f"storing 2 slices × {channels} channels × 8×8 float16" in out
    array, metadata = load_volume_features(tmp_path / "out")
    assert array.shape == (2, channels, 8, 8)
    # Existing output is never overwritten without --overwrite; too-large output is refused.
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(args[:-6] + ["-o", str(tmp_path / "big"), "--resolution", "64", "--max-size", "1KB"]) == 2
    assert "more than --max-size" in capsys.readouterr().err
    assert not (tmp_path / "big").exists()

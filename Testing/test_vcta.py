"""Virtual CT angiography (`lctfound.pipelines.vcta`, `lctfound.training.enhancement.VCTATask`,
``lctfound enhance train-vcta|vcta``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_factory import tiny_model

from lctfound.errors import Cancelled, InputError, LCTfoundError
from lctfound.io.volume import CTVolume
from lctfound.pipelines.vcta import TASK, VCTANetwork, VCTAPipeline
from lctfound.progress import CancelToken, Progress

SIZE = 32
NC_VESSEL_HU, CE_VESSEL_HU, FAT_HU = 40.0, 180.0, -100.0


def vessel_pair(seed: int, slices: int = 6, size: int = SIZE):
    """(non-contrast, contrast-enhanced, vessel mask): a fat body with one vessel disc, 40 HU before and
    180 HU after contrast, constant along z."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    nc = np.full((size, size), -1000.0)
    nc[((yy - size / 2) / (0.45 * size)) ** 2 + ((xx - size / 2) / (0.4 * size)) ** 2 < 1] = FAT_HU
    cy, cx, r = rng.uniform(size / 3, 2 * size / 3, 2).tolist() + [rng.uniform(size / 10, size / 6)]
    vessel = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
    ce = nc.copy()
    nc[vessel], ce[vessel] = NC_VESSEL_HU, CE_VESSEL_HU
    stack = lambda image: np.repeat(image[None], slices, 0).astype(np.float32)  # noqa: E731
    return stack(nc), stack(ce), vessel


@pytest.fixture(scope="module")
def embedded():
    from lctfound.models import load_model, resolve_model

    return load_model(resolve_model("default"))


@pytest.fixture(scope="module")
def trained(embedded, tmp_path_factory):
    """Full fine-tuning of the embedded backbone for 250 steps on four toy vessel pairs (≈ 1 min on 2 cores)."""
    from lctfound.training.enhancement import VCTATask
    from lctfound.training.loop import LoopConfig, TrainingLoop

    torch.set_num_threads(1)
    pairs = [vessel_pair(seed) for seed in range(4)]
    task = VCTATask(embedded, [p[0] for p in pairs], [p[1] for p in pairs], resolution=SIZE, seed=0, name="toy-vcta")
    output = tmp_path_factory.mktemp("vcta") / "run"
    config = LoopConfig(output=str(output), batch_size=4, max_steps=250, learning_rate=3e-3, checkpoint_every=250,
                        log_every=50, device="cpu")
    return TrainingLoop(config, task).run()


def test_widened_conv_in_keeps_the_pretrained_output_at_init():
    model = tiny_model(SIZE)
    x, t = torch.randn(2, 3, SIZE, SIZE), torch.tensor([10, 700])
    prompt = model.condition("mediastinal").expand(2, -1, -1)
    with torch.no_grad():
        reference = model.unet(x, t, encoder_hidden_states=prompt).sample
        for mode in ("full", "adapter"):
            network = VCTANetwork(model, mode, SIZE)
            assert network.conv_in.in_channels == 6 and float(network.conv_in.weight[:, 3:].abs().max()) == 0
            for condition in (torch.zeros(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE) * 2 - 1):
                assert torch.allclose(network(x, t, condition), reference, atol=1e-5)
        # The caller's backbone is untouched (full mode copies it; hooks are gone after each forward).
        assert model.unet.conv_in.in_channels == 3
        assert torch.allclose(model.unet(x, t, encoder_hidden_states=prompt).sample, reference, atol=1e-6)


def test_adapter_mode_trains_only_conv_in_and_adapters(tmp_path):
    from lctfound.training.enhancement import VCTATask
    from lctfound.training.loop import LoopConfig, TrainingLoop

    model = tiny_model(SIZE)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    nc, ce, _ = vessel_pair(0, slices=4)
    task = VCTATask(model, [nc], [ce], mode="adapter", resolution=SIZE)
    result = TrainingLoop(LoopConfig(output=str(tmp_path / "run"), batch_size=2, max_steps=2, device="cpu",
                                     learning_rate=1e-2), task).run()
    assert all(torch.equal(before[k], v) for k, v in model.unet.state_dict().items())
    from lctfound.models.task_models import load_task_model

    task_model = load_task_model(result.model_folder, TASK)
    assert set(task_model.parts) == {"conv_in", "adapters"} and task_model.backbone_folder() is None
    assert float(task_model.parts["conv_in"]["weight"][:, 3:].abs().max()) > 0
    assert task_model.info["vcta"]["window_hu"] == [-200.0, 200.0]


def test_bad_pairs_are_refused(tmp_path):
    from lctfound.io.volume import write_volume
    from lctfound.training.enhancement import PairedVolumes, VCTATask, read_paired_volumes

    nc, ce, _ = vessel_pair(0, slices=4)
    with pytest.raises(LCTfoundError, match="no non-contrast/contrast-enhanced pairs"):
        VCTATask(tiny_model(SIZE), [], [], resolution=SIZE)
    with pytest.raises(InputError, match="differ in size"):
        PairedVolumes([nc], [ce[:2]], kinds=("non-contrast", "contrast-enhanced"))
    write_volume(CTVolume(nc.astype(np.int16), (0.8, 0.8, 2.0)), tmp_path / "nc.nrrd")
    write_volume(CTVolume(ce.astype(np.int16), (0.8, 0.8, 2.5)), tmp_path / "ce.nrrd")
    with pytest.raises(InputError, match="does not lie on the image's voxel grid .*spacing"):
        read_paired_volumes([(tmp_path / "nc.nrrd", tmp_path / "ce.nrrd")], ("non-contrast", "contrast-enhanced"))
    with pytest.raises(LCTfoundError, match="multiple of 16"):
        VCTANetwork(tiny_model(SIZE), "full", 40)


@pytest.mark.slow
def test_vcta_learns_to_brighten_the_vessel(trained, embedded):
    """On held-out pairs the trained model draws the vessel brighter than in the non-contrast input
    (and than the untrained model does) while the fat around it stays fat. Sampling starts from the
    non-contrast slice noised halfway (strength 0.5): 250 CPU steps teach the model the vessels, not
    yet the whole image from pure noise."""
    from lctfound.models.task_models import load_task_model

    pipeline = VCTAPipeline(VCTANetwork.from_task_model(load_task_model(trained.model_folder, TASK), embedded))
    untrained = VCTAPipeline(VCTANetwork(embedded, "full", SIZE))
    vessels, fats, before = [], [], []
    for case in (11, 12, 13):
        nc, _, vessel = vessel_pair(case, slices=1)
        body = (nc[0] > -500) & ~vessel
        out = pipeline(nc, steps=10, seed=case, strength=0.5)
        assert out.shape == nc.shape and out.dtype == np.float32
        vessels.append(out[:, vessel].mean())
        fats.append(out[:, body].mean())
        before.append(untrained(nc, steps=10, seed=case, strength=0.5)[:, vessel].mean())
    assert np.mean(vessels) > NC_VESSEL_HU + 40, vessels
    assert np.mean(vessels) > np.mean(before) + 60, (vessels, before)
    assert abs(np.mean(fats) - FAT_HU) < 30, fats


@pytest.mark.slow
def test_vcta_volume_provenance_progress_cancel_and_refusals(trained, tmp_path):
    from lctfound.models.task_models import save_task_model
    from lctfound.pipelines.cold_diffusion import ColdDiffusionEnhancer

    pipeline = VCTAPipeline.load(trained.model_folder, device="cpu")
    nc, _, _ = vessel_pair(5, slices=4)
    nc[:, 0, :] = -1000.0
    volume = CTVolume(nc.copy(), (0.7, 0.7, 2.0), metadata={"source": "/data/case3_nc.nii.gz"})
    calls = []
    result = pipeline(volume, steps=4, seed=3, slices=[2], progress=Progress(lambda d, t, m: calls.append((d, t))))
    assert result is not volume and result.same_grid(volume) and np.array_equal(volume.array, nc)
    assert np.array_equal(result.array[[0, 1, 3]], nc[[0, 1, 3]])
    assert np.all(result.array[2, 0, :] < -700)  # air below the window: carried over, not clipped to -200
    again = pipeline(volume, steps=4, seed=3, slices=[2])
    assert np.array_equal(again.array, result.array)  # seeded
    meta = result.metadata
    assert meta["task"] == TASK and meta["seed"] == 3 and meta["steps"] == 4 and meta["slices"] == "2"
    assert meta["name"] == "case3_nc_vcta-ddim4-seed3" and len(meta["model_sha256"]) == 64
    assert calls[-1] == (4, 4)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        pipeline(nc, steps=2, progress=Progress(cancel_token=token))
    with pytest.raises(LCTfoundError, match="is a vcta model, not a low-dose enhancement model"):
        ColdDiffusionEnhancer.load(trained.model_folder, device="cpu")
    segmentation = save_task_model(tmp_path / "seg", "segmentation", {}, {}, {})
    with pytest.raises(LCTfoundError, match="is a segmentation model, not a virtual CTA model"):
        VCTAPipeline.load(segmentation, device="cpu")


# ---------------------------------------------------------------------------------------------- command line

@pytest.mark.slow
def test_cli_train_vcta_and_translate(run_cli, tmp_path):
    import json

    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import write_volume

    nc, ce, _ = vessel_pair(2, slices=4)
    for folder, array in (("nc", nc), ("ce", ce)):
        (tmp_path / folder).mkdir()
        write_volume(CTVolume(array.astype(np.int16), (0.8, 0.8, 2.0)), tmp_path / folder / "case1.nrrd")
    code, out, err = run_cli(["enhance", "train-vcta", "--non-contrast", tmp_path / "nc", "--contrast", tmp_path / "ce",
                              "-o", tmp_path / "run", "--max-steps", 2, "--batch-size", 2, "--resolution", SIZE,
                              "--device", "cpu", "--events"])
    assert code == 0, err
    assert json.loads(out.strip().splitlines()[-1])["event"] == "finished"
    target = tmp_path / "vcta.nii.gz"
    code, out, err = run_cli(["enhance", "vcta", tmp_path / "nc" / "case1.nrrd", "--model", tmp_path / "run" / "model",
                              "-o", target, "--steps", 2, "--seed", 5, "--device", "cpu", "--events"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["event"] == "result" and result["name"] == "case1_vcta-ddim2-seed5"
    provenance = read_provenance(target)
    assert provenance["task"] == TASK and provenance["seed"] == 5 and provenance["mode"] == "full"


def test_cli_vcta_bad_inputs_exit_2(run_cli, tmp_path):
    from lctfound.io.volume import write_volume
    from lctfound.models.task_models import save_task_model

    nc, ce, _ = vessel_pair(2, slices=4)
    write_volume(CTVolume(nc.astype(np.int16), (0.8, 0.8, 2.0)), tmp_path / "nc.nrrd")
    write_volume(CTVolume(ce[:, :, :30].astype(np.int16), (0.8, 0.8, 2.0)), tmp_path / "ce.nrrd")
    code, _, err = run_cli(["enhance", "train-vcta", "--non-contrast", tmp_path / "nc.nrrd", "--contrast",
                            tmp_path / "ce.nrrd", "-o", tmp_path / "run", "--max-steps", 1])
    assert code == 2 and "does not lie on the image's voxel grid (size" in err
    code, _, err = run_cli(["enhance", "train-vcta", "--non-contrast", tmp_path / "nc.nrrd", "-o", tmp_path / "run"])
    assert code == 2 and "give them in pairs" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["enhance", "train-vcta", "--non-contrast", tmp_path / "empty", "--contrast",
                            tmp_path / "empty", "-o", tmp_path / "run"])
    assert code == 2 and "no CT volumes" in err
    low_dose = save_task_model(tmp_path / "ld", "low-dose-enhancement", {}, {}, {})
    code, _, err = run_cli(["enhance", "vcta", tmp_path / "nc.nrrd", "--model", low_dose, "-o", tmp_path / "x.nrrd"])
    assert code == 2 and "is a low-dose-enhancement model, not a virtual CTA model" in err

"""Low-dose enhancement by cold diffusion (`lctfound.pipelines.cold_diffusion`,
`lctfound.training.enhancement.LowDoseEnhancementTask`, ``lctfound enhance train-low-dose|low-dose``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from data_factory import chest_phantom
from model_factory import tiny_model

from lctfound.errors import Cancelled, CheckpointError, LCTfoundError
from lctfound.io.volume import CTVolume
from lctfound.pipelines.cold_diffusion import (
    TASK,
    ColdDiffusionEnhancer,
    ColdDiffusionNetwork,
    ColdDiffusionSchedule,
    hu_to_model,
)
from lctfound.progress import CancelToken, Progress

SHAPE = (6, 32, 32)
NOISE_HU = 80.0


def _pair(seed: int):
    """(low-dose, full-dose) float32 HU volumes: one phantom, independent 80 HU noise per voxel."""
    full = chest_phantom(SHAPE, noise_hu=0.0, seed=seed).astype(np.float32)
    low = full + np.random.default_rng(100 + seed).normal(0, NOISE_HU, SHAPE).astype(np.float32)
    return low, full


def _rmse(a, b, window=(-1250, 250)):
    return float(np.sqrt(np.mean((np.clip(a, *window) - np.clip(b, *window)) ** 2)))


@pytest.fixture(scope="module")
def embedded():
    from lctfound.models import load_model, resolve_model

    return load_model(resolve_model("default"))


@pytest.fixture(scope="module")
def trained(embedded, tmp_path_factory):
    """A task model trained for 50 steps on two synthetic pairs (the embedded, pretrained backbone:
    random tiny U-Net features cannot express a denoiser, a pretrained one's can)."""
    from lctfound.training.enhancement import LowDoseEnhancementTask
    from lctfound.training.loop import LoopConfig, TrainingLoop

    torch.set_num_threads(1)
    before = {k: v.clone() for k, v in embedded.unet.state_dict().items()}
    pairs = [_pair(0), _pair(1)]
    task = LowDoseEnhancementTask(embedded, [p[0] for p in pairs], [p[1] for p in pairs], names=["a", "b"],
                                  patch_size=32, seed=0, name="toy-ldct")
    output = tmp_path_factory.mktemp("ldct") / "run"
    config = LoopConfig(output=str(output), batch_size=8, max_steps=50, learning_rate=3e-3, checkpoint_every=50,
                        log_every=10, device="cpu")
    result = TrainingLoop(config, task).run()
    return {"result": result, "task": task, "before": before}


# ---------------------------------------------------------------------------------------------- schedule

def test_degradation_endpoints_and_improved_sampling_rule():
    schedule = ColdDiffusionSchedule(10)
    x0, x_ld = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    assert torch.equal(schedule.degrade(x0, x_ld, 0), x0)
    assert torch.allclose(schedule.degrade(x0, x_ld, 10), x_ld)
    mixed = schedule.degrade(x0, x_ld, torch.tensor([3, 7]))
    assert torch.allclose(mixed[0], 0.7 * x0[0] + 0.3 * x_ld[0])
    assert torch.allclose(mixed[1], 0.3 * x0[1] + 0.7 * x_ld[1])
    assert schedule.levels() == list(range(10, -1, -1))
    assert schedule.levels(5) == [10, 8, 6, 4, 2, 0]
    assert schedule.levels(1) == [10, 0]
    # With a perfect estimate the improved update walks the degradation path exactly to x0.
    state = x_ld
    for t in range(10, 0, -1):
        state = schedule.step(state, x0, x_ld, t, t - 1)
        assert torch.allclose(state, schedule.degrade(x0, x_ld, t - 1), atol=1e-6)
    with pytest.raises(LCTfoundError, match="steps must lie in 1..10"):
        schedule.levels(11)


def test_untrained_network_returns_its_input_and_backbone_is_frozen():
    model = tiny_model(32)
    network = ColdDiffusionNetwork(model, patch_size=32)
    assert not any(p.requires_grad for p in network.unet.parameters())
    trainable = {n for n, p in network.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("adjust.", "head.")) for n in trainable)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    out = network(x, torch.tensor([10, 4]), torch.rand(2, 2, 32, 32))
    assert torch.equal(out, x[:, 1:2])  # zero head: x̂0 = x_t


def test_hu_mapping_round_trip():
    from lctfound.pipelines.cold_diffusion import model_to_window_hu
    from lctfound.windows import get_window

    hu = torch.tensor([-1250.0, -500.0, 0.0, 250.0])
    assert torch.allclose(model_to_window_hu(hu_to_model(hu, get_window("lung")), get_window("lung")), hu, atol=1e-3)


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.slow
def test_training_denoises_and_trains_only_the_adjust_nets_and_head(trained, embedded):
    from lctfound.models.task_models import load_task_model

    assert all(torch.equal(trained["before"][k], v) for k, v in embedded.unet.state_dict().items())
    task_model = load_task_model(trained["result"].model_folder, TASK)
    assert task_model.info["cold_diffusion"]["steps"] == 10
    assert set(task_model.parts) == {"adjust", "head"}
    assert any(float(v.abs().max()) > 0 for k, v in task_model.parts["adjust"].items() if "scale_shift" in k)
    network = ColdDiffusionNetwork.from_task_model(task_model, embedded)

    # The trained model's loss on a fixed batch is below the untrained (identity) model's.
    from lctfound.training.enhancement import ColdDiffusionLoss

    batch = trained["task"].collate([trained["task"].data[i] for i in range(8)])
    batch["t"] = torch.tensor([10, 9, 8, 6, 5, 3, 2, 1])
    fresh = ColdDiffusionNetwork(embedded, patch_size=32)
    with torch.no_grad():
        assert float(ColdDiffusionLoss(network)(batch)) < 0.7 * float(ColdDiffusionLoss(fresh)(batch))

    # The error modulation changes the prediction once trained.
    low, _ = _pair(7)
    x = torch.stack([hu_to_model(low[[k - 1, k, k + 1]], network.window) for k in (2, 3)])
    with torch.no_grad():
        plain = network(x, torch.tensor([5, 5]))
        modulated = network(x, torch.tensor([5, 5]), torch.cat([plain, x[:, 1:2]], dim=1))
    assert float((plain - modulated).abs().max()) > 1e-4

    # On a held-out pair the enhanced volume is clearly closer to the full dose than the input.
    low, full = _pair(7)
    enhanced = ColdDiffusionEnhancer(network)(low)
    assert enhanced.shape == low.shape and enhanced.dtype == np.float32
    assert _rmse(enhanced, full) < 0.8 * _rmse(low, full), (_rmse(enhanced, full), _rmse(low, full))


@pytest.mark.slow
def test_enhanced_volume_is_new_with_provenance_progress_and_cancel(trained, embedded):
    enhancer = ColdDiffusionEnhancer.load(trained["result"].model_folder, device="cpu")
    low, _ = _pair(3)
    low[:, 12:17, 12:17] = 1500.0  # bone above the lung window: its excess over the window is carried over
    volume = CTVolume(low.copy(), (0.7, 0.7, 2.5), (1.0, 2.0, 3.0), metadata={"source": "/data/case7_ld.nrrd"})
    calls = []
    result = enhancer(volume, steps=5, slices=[1, 2], progress=Progress(lambda d, t, m: calls.append((d, t))))
    assert result is not volume and np.array_equal(volume.array, low)
    assert result.same_grid(volume)
    assert np.array_equal(result.array[[0, 3, 4, 5]], low[[0, 3, 4, 5]])  # unprocessed slices copied
    assert not np.allclose(result.array[1:3], low[1:3])
    assert np.all(result.array[1:3, 14, 14] > 1200)
    meta = result.metadata
    assert meta["task"] == TASK and meta["steps"] == 5 and meta["slices"] == "1-2"
    assert meta["name"] == "case7_ld_ldct-cold-diffusion-5steps"
    assert len(meta["model_sha256"]) == 64 and meta["backbone"] == "lctfound-cpu-tiny"
    assert calls[-1] == (2, 2)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        enhancer(low, progress=Progress(cancel_token=token))


@pytest.mark.slow
def test_wrong_backbone_wrong_task_and_backbone_folder_are_refused(trained, tmp_path):
    from lctfound.models.bundle import save_model
    from lctfound.models.task_models import save_task_model

    other = save_model(tiny_model(128, seed=3), tmp_path / "other-backbone")
    with pytest.raises(CheckpointError, match="trained on backbone"):
        ColdDiffusionEnhancer.load(trained["result"].model_folder, backbone=other, device="cpu")
    segmentation = save_task_model(tmp_path / "seg", "segmentation", {}, {}, {})
    with pytest.raises(LCTfoundError, match="is a segmentation model, not a low-dose enhancement model"):
        ColdDiffusionEnhancer.load(segmentation, device="cpu")
    with pytest.raises(LCTfoundError, match="is a backbone model, not a low-dose enhancement model"):
        ColdDiffusionEnhancer.load(other, device="cpu")


def test_bad_training_inputs():
    from lctfound.training.enhancement import LowDoseEnhancementTask

    model = tiny_model(32)
    low, full = _pair(0)
    with pytest.raises(LCTfoundError, match="no low-dose/full-dose pairs"):
        LowDoseEnhancementTask(model, [], [], patch_size=32)
    with pytest.raises(LCTfoundError, match="differ in size"):
        LowDoseEnhancementTask(model, [low], [full[:, :16]], patch_size=32)
    with pytest.raises(LCTfoundError, match="multiple of 16"):
        LowDoseEnhancementTask(model, [low], [full], patch_size=40)


def test_patches_are_seeded_and_cover_the_body():
    from lctfound.training.enhancement import LowDosePatches, PairedVolumes
    from lctfound.windows import get_window

    low, full = _pair(0)
    big_low, big_full = np.pad(low, ((0, 0), (0, 32), (0, 32)), constant_values=-1000), \
        np.pad(full, ((0, 0), (0, 32), (0, 32)), constant_values=-1000)
    data = LowDosePatches(PairedVolumes([big_low], [big_full]), get_window("lung"), 32, seed=4)
    first, again = data[2], data[2]
    assert torch.equal(first["low"], again["low"]) and first["low"].shape == (3, 32, 32)
    assert first["full"].shape == (1, 32, 32)
    assert float((first["full"] > hu_to_model(np.float32(-900), get_window("lung"))).float().mean()) > 0.3
    data.set_epoch(1)
    assert not torch.equal(data[2]["low"], first["low"])


# ---------------------------------------------------------------------------------------------- command line

def _write_pair(folder, spacing_full=(0.8, 0.8, 2.0)):
    from lctfound.io.volume import write_volume

    low, full = _pair(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_volume(CTVolume(np.round(low).astype(np.int16), (0.8, 0.8, 2.0)), folder / "case1.nrrd")
    write_volume(CTVolume(np.round(full).astype(np.int16), spacing_full), folder / "case1_full.nrrd")
    return folder / "case1.nrrd", folder / "case1_full.nrrd"


@pytest.mark.slow
def test_cli_train_and_enhance_end_to_end(run_cli, tmp_path):
    import json

    from lctfound.io.provenance import read_provenance

    low, full = _write_pair(tmp_path / "data")
    code, out, err = run_cli(["enhance", "train-low-dose", "--low-dose", low, "--full-dose", full, "-o",
                              tmp_path / "run", "--max-steps", 2, "--batch-size", 2, "--patch-size", 32, "--device",
                              "cpu", "--events"])
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events[0]["event"] == "start" and events[-1]["event"] == "finished"
    model = tmp_path / "run" / "model"
    target = tmp_path / "enhanced.nrrd"
    code, out, err = run_cli(["enhance", "low-dose", low, "--model", model, "-o", target, "--steps", 2,
                              "--slices", "1-2", "--device", "cpu", "--events"])
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["event"] == "result" and result["name"] == "case1_ldct-cold-diffusion-2steps"
    provenance = read_provenance(target)
    assert provenance["task"] == TASK and provenance["steps"] == 2 and provenance["slices"] == "1-2"
    code, _, err = run_cli(["enhance", "low-dose", low, "--model", model, "-o", target, "--device", "cpu"])
    assert code == 2 and "already exists" in err

    # Full-dose scans alone: low-dose partners simulated in the projection domain.
    code, out, err = run_cli(["enhance", "train-low-dose", "--full-dose", full, "--simulate-dose", 0.1, "-o",
                              tmp_path / "run-sim", "--max-steps", 1, "--batch-size", 2, "--patch-size", 32,
                              "--device", "cpu"])
    assert code == 0, err
    info = json.loads((tmp_path / "run-sim" / "model" / "task.json").read_text())
    assert info["task"] == TASK and "simulated at dose fraction 0.1" in info["data"]["low_dose"]


def test_cli_bad_inputs_exit_2(run_cli, tmp_path):
    from lctfound.models.task_models import save_task_model

    low, full = _write_pair(tmp_path / "data", spacing_full=(0.8, 0.8, 2.5))
    code, _, err = run_cli(["enhance", "train-low-dose", "--low-dose", low, "--full-dose", full, "-o", tmp_path / "r1",
                            "--max-steps", 1])
    assert code == 2 and "does not lie on the image's voxel grid" in err
    code, _, err = run_cli(["enhance", "train-low-dose", "-o", tmp_path / "r2", "--max-steps", 1])
    assert code == 2 and "no low-dose/full-dose pairs" in err
    (tmp_path / "pairs.csv").write_text("low_dose,full_dose\n")
    code, _, err = run_cli(["enhance", "train-low-dose", "--pairs", tmp_path / "pairs.csv", "-o", tmp_path / "r3"])
    assert code == 2 and "has no rows" in err
    code, _, err = run_cli(["enhance", "train-low-dose", "--low-dose", low, "--full-dose", full, "--simulate-dose",
                            0.1, "-o", tmp_path / "r4"])
    assert code == 2 and "give only --full-dose" in err
    segmentation = save_task_model(tmp_path / "seg", "segmentation", {}, {}, {})
    code, _, err = run_cli(["enhance", "low-dose", low, "--model", segmentation, "-o", tmp_path / "x.nrrd"])
    assert code == 2 and "is a segmentation model, not a low-dose enhancement model" in err
    code, _, err = run_cli(["enhance", "low-dose", low, "--model", "default", "-o", tmp_path / "x.nrrd"])
    assert code == 2 and "is a backbone model, not a low-dose enhancement model" in err


def test_loss_keeps_every_trainable_part_in_the_graph():
    """A batch of level-1 items (stage I only) still reaches the adjust nets (zero gradient), as
    distributed training requires; stage II items give them real gradients once the head is non-zero."""
    from lctfound.training.enhancement import ColdDiffusionLoss

    network = ColdDiffusionNetwork(tiny_model(32), patch_size=32)
    torch.nn.init.normal_(network.head.weight, std=0.05)
    loss_module = ColdDiffusionLoss(network)
    low, full = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 1, 32, 32) * 2 - 1
    loss_module({"low": low, "full": full, "t": torch.tensor([1, 1])}).backward()
    grads = [p.grad for p in network.adjust.parameters()]
    assert all(g is not None and float(g.abs().max()) == 0 for g in grads)
    network.zero_grad()
    loss_module({"low": low, "full": full, "t": torch.tensor([4, 9])}).backward()
    assert float(network.adjust["up4"].scale_shift.weight.grad.abs().max()) > 0

"""The sampling loop (DDIM, DPM-Solver++, DDPM) and guidance, checked with an oracle denoiser."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lctfound.errors import LCTfoundError
from lctfound.models.bundle import LCTfoundModel
from lctfound.models.conditioning import LearnedConditionEncoder
from lctfound.pipelines.generation import GenerationPipeline
from lctfound.scheduler import make_ddpm_scheduler


class OracleUNet(torch.nn.Module):
    """Predicts the exact noise that leads to a fixed target image (per prompt: lung ↔ target, null ↔ −target)."""

    def __init__(self, target: torch.Tensor, encoder: LearnedConditionEncoder):
        super().__init__()
        self.target = target
        self.null = encoder.encode(["freedom."])[0]
        self.alphas = make_ddpm_scheduler().alphas_cumprod
        self.config = SimpleNamespace(in_channels=3, sample_size=target.shape[-1])
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the module a device
        self.dtype = torch.float32

    def forward(self, x, t, encoder_hidden_states):
        alpha = self.alphas[int(t)]
        is_null = torch.isclose(encoder_hidden_states[:, 0], self.null).all(dim=-1)
        goal = torch.where(is_null[:, None, None, None], -self.target, self.target)
        eps = (x - alpha.sqrt() * goal) / (1 - alpha).sqrt()
        return SimpleNamespace(sample=eps)


@pytest.fixture
def oracle_model():
    encoder = LearnedConditionEncoder().eval()
    target = torch.linspace(-0.8, 0.8, 32 * 32).reshape(1, 1, 32, 32).expand(1, 3, 32, 32)
    return LCTfoundModel(OracleUNet(target, encoder), make_ddpm_scheduler(), encoder, {}), target


@pytest.mark.parametrize("sampler", ["ddim", "dpm-solver"])
def test_fast_samplers_reach_the_target(oracle_model, sampler):
    model, target = oracle_model
    images = GenerationPipeline(model, sampler)("lung", num_images=2, steps=20, seed=3, size=32)
    expected = ((target[0, 0] + 1) / 2).numpy()
    assert images.shape == (2, 32, 32)
    np.testing.assert_allclose(images[0], expected, atol=0.02)


def test_guidance_extrapolates_away_from_the_null_prediction(oracle_model):
    model, target = oracle_model
    plain = GenerationPipeline(model, "ddim")("lung", num_images=1, steps=10, size=32)
    guided = GenerationPipeline(model, "ddim")("lung", num_images=1, steps=10, size=32, guidance_scale=1.5)
    # With ε = ε_u + s(ε_c − ε_u) the target becomes 2.5·target (clipped): further from the null image.
    assert np.abs(guided - 0.5).mean() > np.abs(plain - 0.5).mean()


def test_bad_requests(oracle_model):
    model, _ = oracle_model
    with pytest.raises(LCTfoundError, match="multiple of 16"):
        GenerationPipeline(model)("lung", size=30)
    with pytest.raises(LCTfoundError, match="unknown sampler"):
        GenerationPipeline(model, "euler")


# ------------------------------------------------------------------ seeds, volumes and slices (tiny real model)


@pytest.fixture(scope="module")
def tiny():
    from model_factory import tiny_model

    return tiny_model(64)


@pytest.fixture(scope="module")
def tiny_model_folder(tiny, tmp_path_factory):
    from lctfound.models import save_model

    return save_model(tiny, tmp_path_factory.mktemp("models") / "tiny")


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_each_image_has_its_own_seed_whatever_the_batch(tiny, sampler):
    pipeline = GenerationPipeline(tiny, sampler)
    settings = dict(num_images=3, steps=2, size=32)
    together = pipeline("lung", seed=5, batch_size=3, **settings)
    one_by_one = pipeline("lung", seed=5, batch_size=1, **settings)
    np.testing.assert_allclose(together, one_by_one, atol=1e-4)
    np.testing.assert_allclose(pipeline("lung", seed=6, num_images=1, steps=2, size=32)[0], together[1], atol=1e-4)
    assert np.abs(pipeline("lung", seed=9, **settings) - together).max() > 1e-2


def test_generate_exports_a_new_volume_in_hu_with_provenance(run_cli, tiny_model_folder, tmp_path):
    import json

    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import read_volume

    output = tmp_path / "synthetic.nrrd"
    code, out, err = run_cli(["generate", "--model", tiny_model_folder, "-n", "3", "--steps", "2", "--size", "32",
                              "--window", "mediastinal", "--guidance-scale", "2", "--sampler", "dpm-solver",
                              "--seed", "4", "--spacing", "0.7,0.7,2.5", "--events", "-o", output], groups=["generate"])
    assert code == 0, err
    volume = read_volume(output, validate=False)
    assert volume.shape == (3, 32, 32) and volume.spacing == pytest.approx((0.7, 0.7, 2.5))
    assert -200 <= volume.array.min() and volume.array.max() <= 200  # the mediastinal window, in HU
    record = read_provenance(output)
    assert record["task"] == "synthetic-ct" and record["window"] == "mediastinal"
    assert record["prompt"] == "window width and window level is 400 and 0."
    assert record["guidance_scale"] == 2.0 and record["sampler"] == "dpm-solver" and record["steps"] == 2
    assert record["seed"] == 4 and record["seeds"] == "4-6"
    weights = json.loads((tiny_model_folder / "lctfound.json").read_text())["files"]
    assert record["model_sha256"] == weights["unet/diffusion_pytorch_model.safetensors"]
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert {e["event"] for e in events} == {"progress", "result"}
    assert events[-1]["provenance"] == str(tmp_path / "synthetic.json") and events[-1]["task"] == "synthetic-ct"
    assert [e for e in events if e["event"] == "progress"][-1]["done"] == 6  # 3 images × 2 steps
    # The same seed regenerates the same volume; an existing output is never replaced silently.
    code, _, err = run_cli(["generate", "--model", tiny_model_folder, "-n", "1", "-o", output], groups=["generate"])
    assert code == 2 and err.strip().count("\n") == 0 and "already exists" in err


def test_generate_nifti_sidecar_and_per_slice_folder(run_cli, tiny_model_folder, tmp_path):
    import json

    from lctfound.io.provenance import read_provenance

    common = ["generate", "--model", tiny_model_folder, "-n", "2", "--steps", "1", "--size", "32", "--seed", "3"]
    code, _, err = run_cli([*common, "-o", tmp_path / "g.nii.gz"], groups=["generate"])
    assert code == 0, err
    assert (tmp_path / "g.json").is_file() and read_provenance(tmp_path / "g.nii.gz")["seed"] == 3
    code, _, err = run_cli([*common, "-o", tmp_path / "slices"], groups=["generate"])
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "slices").iterdir()) == ["provenance.json", "slice_000.png",
                                                                       "slice_001.png"]
    assert json.loads((tmp_path / "slices" / "provenance.json").read_text())["window"] == "lung"
    code, _, err = run_cli([*common, "-o", tmp_path / "slices"], groups=["generate"])
    assert code == 2 and "already exists" in err
    code, _, err = run_cli([*common, "-o", tmp_path / "g.png"], groups=["generate"])  # beside g.nii.gz and g.json
    from PIL import Image

    assert code == 0 and json.loads(Image.open(tmp_path / "g.png").text["lctfound-provenance"])["seeds"] == "3-4"


def test_generate_refuses_bad_inputs_in_one_line(run_cli, tiny_model_folder, tmp_path):
    task = tmp_path / "task-model"
    task.mkdir()
    (task / "task.json").write_text('{"task": "segmentation"}')
    ctfm = tmp_path / "ctfm"
    ctfm.mkdir()
    (ctfm / "config.json").write_text('{"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "spatial_dims": 3}')
    from model_factory import save_official_layout

    official = save_official_layout(tmp_path / "official", sample_size=32)  # no prompt vectors yet
    cases = [(["--model", task], "task model (segmentation)"), (["--model", ctfm], "no diffusion U-Net"),
             (["--model", official], "has no prompt vectors"),
             (["--model", tiny_model_folder, "--spacing", "0,1,1"], "--spacing"),
             (["--model", tiny_model_folder, "-o", tmp_path / "x.jpg"], "choose a .png grid")]
    for extra, message in cases:
        args = ["generate", "-n", "1", "--steps", "1", "-o", tmp_path / "out.nrrd", *extra]
        code, _, err = run_cli(args, groups=["generate"])
        assert code == 2 and message in err and err.strip().count("\n") == 0, (extra, err)

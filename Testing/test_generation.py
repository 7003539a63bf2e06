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

"""CUDA paths (bf16 autocast, SDPA attention). Skipped cleanly on machines without a GPU, such as CI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lctfound.features import FeatureExtractor, FeatureSpec

from model_factory import tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_features_match_cpu_within_bf16_precision():
    volume = np.random.default_rng(0).integers(-1024, 400, size=(2, 64, 64)).astype(np.int16)
    cpu_model = tiny_model(64)
    cpu = FeatureExtractor(cpu_model, FeatureSpec(resolution=32))
    expected = cpu(cpu.prepare(volume), [0, 1])
    gpu_model = tiny_model(64).to("cuda")
    gpu = FeatureExtractor(gpu_model, FeatureSpec(resolution=32))
    actual = gpu(gpu.prepare(volume), [0, 1])
    assert actual.device.type == "cpu" and actual.dtype == torch.float32
    relative = (actual - expected).norm() / expected.norm()
    assert relative < 0.05  # bf16 autocast keeps ~3 significant digits


def test_cuda_uses_sdpa_attention():
    from diffusers.models.attention_processor import AttnProcessor2_0

    model = tiny_model(64).to("cuda")
    processors = set(type(p) for p in model.unet.attn_processors.values())
    assert processors == {AttnProcessor2_0}

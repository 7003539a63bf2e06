"""The backbone's forward precision: bf16 autocast on CUDA, fp32 on CPUs (bf16 moves the features
by ~2 %, over the 1 % a CPU default may cost), bf16 as an opt-in that warns where the CPU only
emulates it; stated in the provenance and in the feature-cache key (issue 13)."""

from __future__ import annotations

import pytest
import torch

from lctfound import devices
from lctfound.errors import LCTfoundError
from lctfound.features import FeatureExtractor, FeatureSpec
from lctfound.models import new_model

CPU = torch.device("cpu")


def capabilities(**flags):
    return lambda: {"amx_bf16": False, "avx512_bf16": False, **flags}


@pytest.mark.parametrize("flags", [{}, {"amx_bf16": True}, {"avx512_bf16": True}])
def test_auto_is_fp32_on_every_cpu(monkeypatch, flags):
    monkeypatch.delenv(devices.PRECISION_VARIABLE, raising=False)
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities(**flags))
    assert devices.cpu_has_native_bf16() is bool(flags)
    assert devices.resolve_precision(CPU) == "fp32"
    assert devices.compute_settings()["precision"] == "fp32"


def test_bf16_opt_in_warns_where_the_cpu_emulates_it(monkeypatch, caplog):
    monkeypatch.setenv(devices.PRECISION_VARIABLE, "bf16")
    monkeypatch.setattr(devices, "_warned", set())
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities(amx_bf16=True))
    with caplog.at_level("WARNING"):
        assert devices.resolve_precision(CPU) == "bf16"
    assert not caplog.records
    assert devices.compute_settings()["precision"] == "bf16"
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities())
    with caplog.at_level("WARNING"):
        assert devices.resolve_precision(CPU) == "bf16"
        devices.resolve_precision(CPU)
    assert [r.getMessage() for r in caplog.records] == [
        "bf16 on this CPU is emulated (no AMX or AVX-512 BF16): expect it ~90× slower than fp32; "
        "unset LCTFOUND_PRECISION to run fp32"]


def test_explicit_choice_and_environment_override(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", capabilities())
    assert devices.resolve_precision(CPU, "bf16") == "bf16"
    monkeypatch.setenv(devices.PRECISION_VARIABLE, "bf16")
    assert devices.resolve_precision(CPU) == "bf16"
    assert devices.resolve_precision(CPU, "fp32") == "fp32"  # the caller's choice wins over the variable
    monkeypatch.setenv(devices.PRECISION_VARIABLE, "fp8")
    with pytest.raises(LCTfoundError, match="unknown precision 'fp8'.*LCTFOUND_PRECISION"):
        devices.resolve_precision(CPU)


def test_mps_and_unsupported_devices_stay_fp32(monkeypatch):
    monkeypatch.delenv(devices.PRECISION_VARIABLE, raising=False)
    assert devices.resolve_precision(torch.device("meta")) == "fp32"


@pytest.fixture(scope="module")
def tiny():
    model = new_model("cpu-tiny", seed=0)
    model.unet.eval()
    return model


def test_bf16_features_run_under_autocast_and_stay_close(tiny, monkeypatch):
    monkeypatch.delenv(devices.PRECISION_VARIABLE, raising=False)
    x0 = torch.rand(1, 3, tiny.sample_size, tiny.sample_size) * 2 - 1
    spec = FeatureSpec(timesteps=(0, 100), resolution=16)
    reference = FeatureExtractor(tiny, spec, precision="fp32")(x0, [3])
    bf16 = FeatureExtractor(tiny, spec, precision="bf16")
    assert bf16.precision == "bf16" and bf16.describe()["precision"] == "bf16"
    features = bf16(x0, [3])
    error = float(torch.linalg.vector_norm(features - reference) / torch.linalg.vector_norm(reference))
    assert 0 < error < 0.05  # bf16 really ran (not bit-identical) and stays close to fp32


def test_bf16_features_have_their_own_cache_entry(tiny, tmp_path):
    import numpy as np

    from lctfound.pipelines.segmentation import FeatureCache

    volume = np.zeros((2, 32, 32), dtype=np.int16)
    spec = FeatureSpec(resolution=8)
    fp32 = FeatureCache(FeatureExtractor(tiny, spec, precision="fp32"), volume, tmp_path)
    bf16 = FeatureCache(FeatureExtractor(tiny, spec, precision="bf16"), volume, tmp_path)
    assert fp32.folder != bf16.folder


def test_unknown_precision_fails_before_any_work(tiny):
    with pytest.raises(LCTfoundError, match="unknown precision"):
        FeatureExtractor(tiny, FeatureSpec(), precision="half")

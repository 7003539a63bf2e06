"""Classical low-dose denoising (`lctfound enhance low-dose --method tv|nlm`): noise-adaptive strength,
denoising that works, provenance, and the CLI's default method."""

from __future__ import annotations

import data_factory
import numpy as np
import pytest

from lctfound.errors import LCTfoundError
from lctfound.io.provenance import read_provenance
from lctfound.io.volume import CTVolume, read_volume, write_volume
from lctfound.pipelines.classical_denoise import TV_WEIGHT_PER_SIGMA, denoise_volume, estimate_noise_hu


def noisy_pair(noise_hu: float, seed: int = 0, size: int = 64):
    clean = data_factory.chest_phantom((3, size, size), noise_hu=0.0, seed=seed).astype(np.float64)
    noisy = clean + np.random.default_rng(seed).normal(0.0, noise_hu, clean.shape)
    return clean, CTVolume(noisy.astype(np.float32), (0.8, 0.8, 2.0), (1.0, 2.0, 3.0))


@pytest.mark.parametrize("noise_hu", [20.0, 60.0])
def test_noise_estimate_follows_the_noise_level(noise_hu):
    clean, volume = noisy_pair(noise_hu, size=128)
    assert estimate_noise_hu(clean[1]) == 0.0  # piecewise-constant phantom: edges barely count
    # Edges still bias it up a little on a small phantom (about 10 % at 128²).
    assert estimate_noise_hu(volume.array[1]) == pytest.approx(noise_hu, rel=0.2)


def rmse(a, b):
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


@pytest.mark.parametrize("method", ["tv", "nlm"])
def test_adaptive_denoising_lowers_the_error_and_records_what_it_did(method):
    clean, volume = noisy_pair(50.0)
    result = denoise_volume(volume, method, slices=[0, 2])
    assert result is not volume and result.same_grid(volume)
    for k in (0, 2):
        assert rmse(result.array[k], clean[k]) < 0.7 * rmse(volume.array[k], clean[k])
    np.testing.assert_array_equal(result.array[1], volume.array[1])  # not chosen: copied
    meta = result.metadata
    key = "weight_per_slice" if method == "tv" else "h_per_slice"
    assert meta["method"] == method and meta["slices"] == [0, 2] and len(meta[key]) == 2
    assert "noise_hu" in meta["rule"]
    if method == "tv":  # the rule: 1.6 σ̂ / 1000
        assert meta[key][0] == pytest.approx(TV_WEIGHT_PER_SIGMA * meta["noise_hu_per_slice"][0] / 1000, rel=1e-3)


def test_stronger_noise_gets_a_stronger_weight_and_a_given_strength_is_used():
    weak = denoise_volume(noisy_pair(20.0)[1], "tv", slices=[1]).metadata["weight_per_slice"][0]
    strong = denoise_volume(noisy_pair(80.0)[1], "tv", slices=[1]).metadata["weight_per_slice"][0]
    assert strong > 2.5 * weak
    given = denoise_volume(noisy_pair(20.0)[1], "tv", strength=0.05, slices=[1]).metadata
    assert given["weight_per_slice"] == [0.05] and given["rule"] == "given weight"
    with pytest.raises(LCTfoundError, match="choose tv or nlm"):
        denoise_volume(noisy_pair(20.0)[1], "bm3d")


def test_cli_default_is_tv_and_model_options_need_cold_diffusion(run_cli, tmp_path):
    _, volume = noisy_pair(50.0)
    source = write_volume(volume, tmp_path / "low.nrrd")
    code, _, err = run_cli(["enhance", "low-dose", source, "--no-validate", "-o", tmp_path / "tv.nrrd"],
                           groups=["enhance"])
    assert code == 0, err
    record = read_provenance(tmp_path / "tv.nrrd")
    assert record["method"] == "tv" and record["task"] == "low-dose-enhancement"
    assert read_volume(tmp_path / "tv.nrrd", validate=False).same_grid(volume)
    code, _, err = run_cli(["enhance", "low-dose", source, "--method", "nlm", "--strength", "0.04", "--no-validate",
                            "-o", tmp_path / "nlm.nrrd"], groups=["enhance"])
    assert code == 0, err
    assert read_provenance(tmp_path / "nlm.nrrd")["h_per_slice"] == [0.04] * 3
    code, _, err = run_cli(["enhance", "low-dose", source, "--method", "tv", "--model", "x", "-o",
                            tmp_path / "x.nrrd"], groups=["enhance"])
    assert code == 2 and "cold-diffusion" in err
    code, _, err = run_cli(["enhance", "low-dose", source, "--method", "cold-diffusion", "-o", tmp_path / "y.nrrd"],
                           groups=["enhance"])
    assert code == 2 and "needs --model" in err


def test_simulated_training_pairs_report_every_slice_and_take_the_geometry(tmp_path):
    from lctfound.progress import Progress
    from lctfound.training.enhancement import simulated_pairs

    paths = [write_volume(data_factory.synthetic_ct(shape=(n, 32, 32), spacing=(3.0, 3.0, 4.0)), tmp_path / f"c{n}.nrrd")
             for n in (2, 3)]
    events = []
    progress = Progress(lambda done, total, message: events.append((done, total)))
    low, full, names = simulated_pairs(paths, 0.1, 0, progress, geometry_kind="parallel", views=30)
    assert [a.shape for a in low] == [(2, 32, 32), (3, 32, 32)] and names == ["c2", "c3"]
    assert all(total == 5 for _, total in events)
    assert {done for done, _ in events} >= {1, 2, 3, 4, 5}  # per slice, across volumes
    assert [done for done, _ in events] == sorted(done for done, _ in events)

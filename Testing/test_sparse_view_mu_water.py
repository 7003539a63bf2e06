"""μ_water of sparse-view reconstruction: a parameter, read from the sidecar, stated in the provenance;
the documented sinogram sidecar examples parse."""

from __future__ import annotations

import json
from pathlib import Path

import data_factory
import numpy as np
import pytest

from lctfound.errors import LCTfoundError
from lctfound.io.provenance import read_provenance
from lctfound.io.volume import read_volume, write_volume
from lctfound.pipelines.sparse_view import read_sinograms, reconstruct_sparse_view, simulate_sinograms
from lctfound.tomography import MU_WATER_PER_MM, Geometry

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["sinogram-parallel.json", "sinogram-fan.json"])
def test_documented_example_sidecars_parse(tmp_path, name):
    settings = json.loads((ROOT / "docs" / "examples" / name).read_text())
    geometry = Geometry.from_dict({k: v for k, v in settings.items()
                                   if k not in ("image_size", "pixel_mm", "slice_spacing_mm", "mu_water_per_mm",
                                                "units")})
    np.save(tmp_path / "sino.npy", np.zeros((2, geometry.views, geometry.detectors), dtype=np.float32))
    (tmp_path / "sino.json").write_text(json.dumps(settings))
    stack = read_sinograms(tmp_path / "sino.npy")
    assert stack.mu_water_per_mm == settings["mu_water_per_mm"] and stack.image_size == settings["image_size"]
    assert read_sinograms(tmp_path / "sino.npy", mu_water=0.02).mu_water_per_mm == 0.02  # the option wins


def test_mu_water_mismatch_biases_hu_and_matching_it_removes_the_bias():
    volume = data_factory.synthetic_ct(shape=(1, 48, 48), spacing=(3.0, 3.0, 4.0))
    made_with = simulate_sinograms(volume, kind="parallel", views=90, mu_water=0.0192)
    assert made_with.mu_water_per_mm == 0.0192 and made_with.sidecar()["mu_water_per_mm"] == 0.0192
    right = reconstruct_sparse_view(made_with, "fbp")
    made_with.mu_water_per_mm = MU_WATER_PER_MM  # the old fixed constant
    wrong = reconstruct_sparse_view(made_with, "fbp")
    assert right.metadata["mu_water_per_mm"] == 0.0192 and wrong.metadata["mu_water_per_mm"] == MU_WATER_PER_MM
    # HU_wrong + 1000 = (HU_right + 1000)·0.0192/0.0193: water (0 HU) moves by ≈ −5.2 HU.
    expected = (right.array.astype(np.float64) + 1000) * 0.0192 / 0.0193 - 1000
    np.testing.assert_allclose(wrong.array, expected, atol=1e-2)
    with pytest.raises(LCTfoundError, match="implausible"):
        simulate_sinograms(volume, views=8, mu_water=1.93)  # 1/cm given as 1/mm


def test_cli_mu_water_option_and_default_tv(run_cli, tmp_path):
    path = tmp_path / "case.nrrd"
    write_volume(data_factory.synthetic_ct(shape=(2, 48, 48), spacing=(3.0, 3.0, 4.0)), path)
    code, _, err = run_cli(["enhance", "sparse-view", path, "--views", "16", "--mu-water", "0.0192",
                            "--tv-iterations", "3", "--save-sinogram", tmp_path / "s.npy", "--no-validate",
                            "-o", tmp_path / "r.nrrd"], groups=["enhance"])
    assert code == 0, err
    record = read_provenance(tmp_path / "r.nrrd")
    assert record["method"] == "tv" and record["mu_water_per_mm"] == 0.0192
    assert json.loads((tmp_path / "s.json").read_text())["mu_water_per_mm"] == 0.0192
    code, _, err = run_cli(["enhance", "sparse-view", "--sinogram", tmp_path / "s.npy", "--method", "fbp",
                            "-o", tmp_path / "m.nrrd"], groups=["enhance"])
    assert code == 0, err
    assert read_provenance(tmp_path / "m.nrrd")["mu_water_per_mm"] == 0.0192  # from the sidecar
    assert read_volume(tmp_path / "m.nrrd", validate=False).shape[0] == 2

"""Through-plane acquisition models (average vs point sample): exact operators, world positions, CLI."""

from __future__ import annotations

import data_factory
import numpy as np
import pytest
import torch
from model_factory import tiny_model

from lctfound.errors import LCTfoundError
from lctfound.io.volume import read_volume, write_volume
from lctfound.pipelines.super_resolution import (
    SLICE_MODELS,
    SuperResolutionPipeline,
    make_operator,
    super_resolve_volume,
)


def through_plane_reduce(high: np.ndarray, operator) -> np.ndarray:
    """A applied to a (k, j, i) array through-plane (on its coronal (z, x) planes)."""
    x = torch.from_numpy(np.asarray(high, dtype=np.float64))
    return operator(x.permute(1, 0, 2)).permute(1, 0, 2).numpy()


def centres(volume, k_indices) -> np.ndarray:
    """World (LPS) centres of slices k of ``volume`` at voxel (i, j) = (0, 0)."""
    return np.stack([(volume.ijk_to_lps() @ np.array([0.0, 0.0, k, 1.0]))[:3] for k in k_indices])


@pytest.mark.parametrize("slice_model", SLICE_MODELS)
@pytest.mark.parametrize("factor", [2, 4])
def test_operator_is_exact_on_its_pseudo_inverse_and_projection(slice_model, factor):
    operator = make_operator(factor, "through-plane", slice_model)
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(3, 6, 7, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(operator(operator.pinv(y)), y, rtol=0, atol=1e-12)  # A A⁺ y = y
    x = torch.randn(3, *operator.high_shape((6, 7)), generator=generator, dtype=torch.float64)
    projected = operator.project(x, y)
    torch.testing.assert_close(operator(projected), y, rtol=0, atol=1e-12)  # A x̂ = y
    expected_rows = 6 * factor if slice_model == "average" else 5 * factor + 1
    assert projected.shape[-2] == expected_rows


@pytest.mark.parametrize("method", ["bicubic", "bspline"])
@pytest.mark.parametrize("slice_model", SLICE_MODELS)
def test_world_positions_match_the_input_under_each_model(oblique_ct, method, slice_model):
    factor = 2
    result = super_resolve_volume(oblique_ct, factor, "through-plane", method, slice_model=slice_model)
    count = oblique_ct.shape[0]
    thick = centres(oblique_ct, range(count))
    if slice_model == "average":
        assert result.shape[0] == count * factor
        thin = centres(result, range(result.shape[0])).reshape(count, factor, 3).mean(axis=1)
        np.testing.assert_allclose(thin, thick, atol=1e-9)  # a thick centre = mean of its thin centres
    else:
        assert result.shape[0] == (count - 1) * factor + 1
        np.testing.assert_allclose(centres(result, range(0, result.shape[0], factor)), thick, atol=1e-9)
        # Interpolators reproduce the samples where a thin slice lies on a thick one: A x = y.
        operator = make_operator(factor, "through-plane", "point")
        np.testing.assert_allclose(through_plane_reduce(result.array, operator), oblique_ct.array, atol=0.05)
    assert result.metadata["slice_model"] == slice_model
    assert "thick slice" in result.metadata["acquisition_model"]
    assert result.spacing[2] == pytest.approx(oblique_ct.spacing[2] / factor)


@pytest.mark.parametrize("slice_model", SLICE_MODELS)
def test_ddnm_result_is_exactly_consistent_under_each_model(slice_model):
    pipeline = SuperResolutionPipeline(tiny_model(64), window="lung", batch_size=4)
    low = data_factory.chest_phantom((17, 4, 40), seed=2).astype(np.float64)
    high = pipeline(low, 4, "through-plane", steps=2, seed=0, slice_model=slice_model)
    operator = make_operator(4, "through-plane", slice_model)
    assert high.shape == ((68 if slice_model == "average" else 65), 4, 40)
    assert np.abs(through_plane_reduce(high, operator) - low).max() < 1e-2


def test_partial_runs_of_point_model_land_on_their_thick_slices(synthetic_ct):
    result = super_resolve_volume(synthetic_ct, 2, "through-plane", "bspline", slices=[0, 1, 2, 6, 7],
                                  slice_model="point")
    assert result.shape[0] == (synthetic_ct.shape[0] - 1) * 2 + 1
    np.testing.assert_allclose(result.array[[0, 2, 4, 12, 14]], synthetic_ct.array[[0, 1, 2, 6, 7]], atol=0.05)
    assert np.all(result.array[6:12] == -1024)
    with pytest.raises(LCTfoundError, match="slice model"):
        super_resolve_volume(synthetic_ct, 2, "through-plane", "bspline", slice_model="gaussian")


def test_cli_slice_model_option_writes_the_point_grid(tmp_path, oblique_ct, run_cli):
    source = write_volume(oblique_ct, tmp_path / "thick.nrrd")
    out = tmp_path / "thin.nrrd"
    code, _, err = run_cli(["enhance", "super-resolution", source, "--axis", "through-plane", "--method", "bspline",
                            "--factor", "2", "--slice-model", "point", "--output", out])
    assert code == 0, err
    result = read_volume(out)
    assert result.shape[0] == (oblique_ct.shape[0] - 1) * 2 + 1
    np.testing.assert_allclose(centres(result, [0, 2]), centres(oblique_ct, [0, 1]), atol=1e-4)

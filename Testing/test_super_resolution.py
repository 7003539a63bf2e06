"""Zero-shot super-resolution: the block-average operator, DDNM data consistency, baselines, geometry, CLI."""

from __future__ import annotations

import data_factory
import numpy as np
import pytest
import torch
from model_factory import tiny_model

from lctfound.errors import LCTfoundError
from lctfound.io.volume import CTVolume
from lctfound.pipelines.super_resolution import (
    BlockAverage,
    SuperResolutionPipeline,
    interpolate,
    super_resolve_volume,
    super_resolved_geometry,
)
from lctfound.compat import strict_zip

AXES = ("in-plane", "through-plane")


def consistency_error(high: np.ndarray, low: np.ndarray, factor: int, axis: str) -> float:
    """max |A(x̂) − y| in HU, with A applied to (k, j, i) arrays."""
    operator = BlockAverage(factor, axis)
    x = torch.from_numpy(np.asarray(high, dtype=np.float64))
    if axis == "in-plane":
        reduced = operator(x)
    else:  # A acts on coronal (z, x) planes
        reduced = operator(x.permute(1, 0, 2)).permute(1, 0, 2)
    return float(np.abs(reduced.numpy() - low).max())


@pytest.fixture(scope="module")
def pipeline():
    return SuperResolutionPipeline(tiny_model(64), window="lung", batch_size=4)


# ------------------------------------------------------------------ the operator


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("factor", [2, 4, 8])
def test_pseudo_inverse_is_a_right_inverse(factor, axis):
    operator = BlockAverage(factor, axis)
    y = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    high = operator.pinv(y)
    assert high.shape[-2:] == operator.high_shape((5, 7))
    torch.testing.assert_close(operator(high), y, rtol=0, atol=1e-12)  # A A⁺ = I


@pytest.mark.parametrize("axis", AXES)
def test_projection_keeps_the_null_space_part_and_sets_the_range_part(axis):
    operator = BlockAverage(4, axis)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, generator=generator, dtype=torch.float64)
    y = torch.randn(1, *operator(x).shape[-2:], generator=generator, dtype=torch.float64)
    projected = operator.project(x, y)

    def null_part(v):
        return v - operator.pinv(operator(v))

    torch.testing.assert_close(operator(projected), y, rtol=0, atol=1e-12)  # range part = A⁺y
    torch.testing.assert_close(null_part(projected), null_part(x), rtol=0, atol=1e-12)
    consistent = operator.pinv(y) + null_part(x)  # already satisfies A x = y: left intact
    torch.testing.assert_close(operator.project(consistent, y), consistent, rtol=0, atol=1e-12)


# ------------------------------------------------------------------ DDNM


def test_ddnm_in_plane_is_exactly_consistent_on_a_tiled_grid(pipeline):
    low = data_factory.chest_phantom((1, 40, 36), seed=1)  # ×2 → 80×72: larger than the 64² model, tiled
    high = pipeline(low, 2, "in-plane", steps=2, seed=0)
    assert high.shape == (1, 80, 72) and high.dtype == np.float32
    # Bone (700 HU) lies outside the lung window; the final HU projection still restores every block mean.
    assert low.max() > 250
    assert consistency_error(high, low, 2, "in-plane") < 1e-3
    operator = BlockAverage(2)
    detail = high - operator.pinv(torch.from_numpy(low)).numpy()
    assert np.abs(detail).max() > 1.0  # the model filled the null space (not plain replication)


def test_ddnm_through_plane_is_exactly_consistent_along_z(pipeline):
    low = data_factory.chest_phantom((9, 3, 40), seed=2)  # 9 thick slices ×4 → 36 thin slices
    high = pipeline(low, 4, "through-plane", steps=2, seed=0)
    assert high.shape == (36, 3, 40)
    assert consistency_error(high, low, 4, "through-plane") < 1e-3


def test_ddnm_seeds_are_reproducible_and_independent_of_the_batch(pipeline):
    low = data_factory.chest_phantom((3, 32, 32), seed=3)  # ×2 → exactly the model size
    first = pipeline(low, 2, steps=2, eta=0.5, seed=7)
    again = pipeline(low, 2, steps=2, eta=0.5, seed=7)
    alone = pipeline(low[2:], 2, steps=2, eta=0.5, seed=7)
    other = pipeline(low, 2, steps=2, eta=0.5, seed=8)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_allclose(alone[0], first[2], atol=1e-2)
    assert np.abs(other - first).max() > 1.0


def test_both_intensity_mappings_are_exactly_consistent(pipeline):
    low = data_factory.chest_phantom((1, 32, 32), seed=5)
    fixed = SuperResolutionPipeline(pipeline.model, intensity="fixed")
    results = [p(low, 2, steps=1, seed=0) for p in (pipeline, fixed)]
    for high in results:
        assert consistency_error(high, low, 2, "in-plane") < 1e-3
    assert np.abs(results[0] - results[1]).max() > 1.0  # the model saw different inputs
    with pytest.raises(LCTfoundError, match="unknown intensity mapping"):
        SuperResolutionPipeline(pipeline.model, intensity="per-volume")


def test_ddnm_plus_does_not_force_noisy_measurements(pipeline):
    low = data_factory.chest_phantom((1, 32, 32), seed=4)
    noisy = pipeline(low, 2, steps=2, seed=0, noise_hu=50.0)
    assert noisy.shape == (1, 64, 64)
    assert consistency_error(noisy, low, 2, "in-plane") > 1.0  # σ_y > 0: the last step trusts the model


def test_ddnm_volume_result_shape_geometry_and_provenance(pipeline, synthetic_ct):
    volume = CTVolume(synthetic_ct.array[:6, :32, :32], synthetic_ct.spacing, (10.0, -5.0, 3.0),
                      metadata={"source": "/data/chest.nrrd"})
    result = super_resolve_volume(volume, 2, "in-plane", "ddnm", pipeline, steps=2, seed=1, slices=[2, 3])
    assert result.shape == (6, 64, 64) and result is not volume and volume.shape == (6, 32, 32)
    assert result.spacing == pytest.approx((0.375, 0.375, 2.5))
    # The first new voxel's corner is the corner of old voxel (0, 0, 0).
    corner_new = result.ijk_to_lps() @ np.array([-0.5, -0.5, -0.5, 1.0])
    corner_old = volume.ijk_to_lps() @ np.array([-0.5, -0.5, -0.5, 1.0])
    np.testing.assert_allclose(corner_new, corner_old, atol=1e-9)
    assert consistency_error(result.array[2:4], volume.array[2:4].astype(np.float64), 2, "in-plane") < 1e-3
    assert np.all(result.array[[0, 1, 4, 5]] == -1024)  # slices not asked for
    meta = result.metadata
    assert meta["task"] == "super-resolution" and meta["method"] == "ddnm" and meta["factor"] == 2
    assert meta["axis"] == "in-plane" and meta["steps"] == 2 and meta["seed"] == 1 and meta["slices"] == [2, 3]
    assert meta["name"] == "chest_sr-ddnm-x2-in-plane" and meta["model"] == "cpu-tiny"
    assert "model_sha256" in meta and meta["window"] == "lung" and meta["intensity"] == "official"
    assert meta["prompt"] == "window width and window level is 1500 and -500." and meta["seconds_per_slice"] > 0


def test_ddnm_can_be_cancelled(pipeline):
    from lctfound.errors import Cancelled
    from lctfound.progress import Progress

    progress = Progress()
    progress.cancel_token.cancel()
    with pytest.raises(Cancelled):
        pipeline(np.zeros((1, 32, 32)), 2, steps=2, progress=progress)


def test_through_plane_slice_runs_are_super_resolved_separately(synthetic_ct):
    events = []
    from lctfound.progress import Progress

    result = super_resolve_volume(synthetic_ct, 2, "through-plane", "bicubic", slices=[0, 1, 2, 6, 7],
                                  progress=Progress(lambda done, total, message: events.append((done, total))))
    assert result.shape == (24, 40, 48)
    np.testing.assert_allclose(result.array[0:6], interpolate(synthetic_ct.array[0:3], 2, "through-plane"))
    np.testing.assert_allclose(result.array[12:16], interpolate(synthetic_ct.array[6:8], 2, "through-plane"))
    assert np.all(result.array[6:12] == -1024) and np.all(result.array[16:] == -1024)
    assert events[-1][0] == events[-1][1] and all(a <= b for (a, _), (b, _) in zip(events, events[1:]))


def test_ddnm_refuses_grids_smaller_than_half_the_model(pipeline):
    with pytest.raises(LCTfoundError, match="too small for ×2 through-plane DDNM"):
        pipeline(np.zeros((12, 4, 40)), 2, "through-plane", steps=1)  # 24 thin slices < 33


# ------------------------------------------------------------------ baselines and geometry


@pytest.mark.parametrize("method", ["bicubic", "bspline"])
@pytest.mark.parametrize("axis", AXES)
def test_baselines_reproduce_a_linear_ramp_on_the_new_grid(method, axis):
    factor = 4
    shape = (20, 20, 20)
    k, j, i = np.meshgrid(*(np.arange(n, dtype=np.float64) for n in shape), indexing="ij")
    low = 3.0 * i - 2.0 * j + 5.0 * k
    high = interpolate(low, factor, axis, method)
    # New voxel centres at old index −½ + (m + ½)/f (see super_resolved_geometry).
    scale = (1, factor, factor) if axis == "in-plane" else (factor, 1, 1)
    coords = [(np.arange(n * s) + 0.5) / s - 0.5 for n, s in strict_zip(shape, scale)]
    kk, jj, ii = np.meshgrid(*coords, indexing="ij")
    expected = 3.0 * ii - 2.0 * jj + 5.0 * kk
    assert high.shape == expected.shape
    # Away from the borders (the B-spline prefilter's mirrored boundary decays as 0.268^n).
    inner = tuple(slice(6 * s, -6 * s) if s > 1 else slice(None) for s in scale)
    np.testing.assert_allclose(high[inner], expected[inner], atol=1e-2)


def test_the_two_baselines_are_different_interpolators():
    low = np.random.default_rng(0).normal(0, 100, (2, 16, 16))
    bicubic = interpolate(low, 2, "in-plane", "bicubic")
    bspline = interpolate(low, 2, "in-plane", "bspline")
    assert np.abs(bicubic - bspline).max() > 1.0


@pytest.mark.parametrize("axis,factor", [("in-plane", 2), ("through-plane", 4), ("in-plane", 8)])
def test_new_voxel_centres_average_to_the_old_centre(oblique_ct, axis, factor):
    spacing, origin = super_resolved_geometry(oblique_ct, factor, axis)
    new = CTVolume(np.zeros((1, 1, 1)), spacing, origin, oblique_ct.direction)
    old_index = np.array([3, 5, 2])  # (i, j, k)
    scale = np.array([factor, factor, 1]) if axis == "in-plane" else np.array([1, 1, factor])
    offsets = np.stack(np.meshgrid(*(np.arange(s) for s in scale), indexing="ij"), -1).reshape(-1, 3)
    centres = [(new.ijk_to_lps() @ np.append(old_index * scale + m, 1.0))[:3] for m in offsets]
    expected = (oblique_ct.ijk_to_lps() @ np.append(old_index, 1.0))[:3]
    np.testing.assert_allclose(np.mean(centres, axis=0), expected, atol=1e-9)
    # ... and the new voxels tile the old one: its corner is the first sub-voxel's corner.
    corner = (new.ijk_to_lps() @ np.append(old_index * scale - 0.5, 1.0))[:3]
    np.testing.assert_allclose(corner, (oblique_ct.ijk_to_lps() @ np.append(old_index - 0.5, 1.0))[:3], atol=1e-9)


def test_baseline_volume_keeps_direction_and_records_provenance(oblique_ct):
    result = super_resolve_volume(oblique_ct, 2, "through-plane", "bspline")
    assert result.shape == (24, 40, 48)
    np.testing.assert_allclose(result.direction, oblique_ct.direction)
    assert result.metadata["method"] == "bspline" and "model_sha256" not in result.metadata


def test_bad_requests(synthetic_ct):
    with pytest.raises(LCTfoundError, match="factor must be one of 2, 4, 8"):
        BlockAverage(3)
    with pytest.raises(LCTfoundError, match="unknown axis"):
        interpolate(np.zeros((2, 4, 4)), 2, "sideways")
    with pytest.raises(LCTfoundError, match="at least 2 slices"):
        interpolate(np.zeros((1, 4, 4)), 2, "through-plane")
    with pytest.raises(LCTfoundError, match="needs a model"):
        super_resolve_volume(synthetic_ct, 2, method="ddnm")
    with pytest.raises(LCTfoundError, match="choose fewer slices"):
        super_resolve_volume(synthetic_ct, 8, method="bicubic", max_output_bytes=1_000_000)  # 384×320×12: 5.9 MB
    with pytest.raises(LCTfoundError, match="inside the volume"):
        super_resolve_volume(synthetic_ct, 2, method="bicubic", slices=[3, 12])


# ------------------------------------------------------------------ command line


@pytest.fixture
def ct_file(synthetic_ct, tmp_path):
    from lctfound.io.volume import write_volume

    return write_volume(synthetic_ct, tmp_path / "ct.nrrd")  # 48×40×12 voxels, 0.75×0.75×2.5 mm


@pytest.fixture(scope="module")
def tiny_model_folder(pipeline, tmp_path_factory):
    from lctfound.models import save_model

    return save_model(pipeline.model, tmp_path_factory.mktemp("models") / "tiny")


def test_cli_writes_a_new_volume_with_provenance(run_cli, ct_file, tmp_path):
    import json

    from lctfound.hashing import sha256_file
    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import read_volume

    before = sha256_file(ct_file)
    output = tmp_path / "sr.nrrd"
    code, out, err = run_cli(["enhance", "super-resolution", ct_file, "--factor", "2", "--axis", "through-plane",
                              "--method", "bspline", "--events", "-o", output], groups=["enhance"])
    assert code == 0, err
    result = read_volume(output, validate=False)
    assert result.shape == (24, 40, 48) and result.spacing == pytest.approx((0.75, 0.75, 1.25))
    record = read_provenance(output)
    assert record["task"] == "super-resolution" and record["method"] == "bspline" and record["factor"] == 2
    assert record["axis"] == "through-plane" and record["name"] == "ct_sr-bspline-x2-through-plane"
    assert record["slices"] == "all" and record["output"] == str(output)
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert events[-1]["event"] == "result" and events[-1]["output"] == str(output)
    assert events[-1]["provenance"] == str(tmp_path / "sr.json")
    assert any(e["event"] == "progress" for e in events)
    assert sha256_file(ct_file) == before  # the input is never touched


def test_cli_ddnm_names_its_output_after_the_task(run_cli, ct_file, tiny_model_folder, tmp_path):
    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import read_volume

    folder = tmp_path / "results"
    folder.mkdir()
    code, out, err = run_cli(["enhance", "super-resolution", ct_file, "--factor", "2", "--steps", "1",
                              "--slices", "3-4", "--model", tiny_model_folder, "-o", folder], groups=["enhance"])
    assert code == 0, err
    output = folder / "ct_sr-ddnm-x2-in-plane.nrrd"
    result = read_volume(output, validate=False)
    assert result.shape == (12, 80, 96) and np.all(result.array[5:] == -1024)
    record = read_provenance(output)
    assert record["steps"] == 1 and record["seed"] == 0 and record["slices"] == [3, 4] and record["eta"] == 0.85
    assert len(record["model_sha256"]) == 64 and record["model_path"] == str(tiny_model_folder)


def test_cli_refuses_bad_inputs_in_one_line(run_cli, ct_file, tiny_model_folder, tmp_path):
    task = tmp_path / "task-model"
    task.mkdir()
    (task / "task.json").write_text('{"task": "segmentation"}')
    ctfm = tmp_path / "ctfm"
    ctfm.mkdir()
    (ctfm / "config.json").write_text('{"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "spatial_dims": 3}')
    (tmp_path / "taken.nrrd").write_bytes(b"x")
    cases = [
        (["--factor", "3"], "factor must be one of 2, 4, 8"),
        (["--axis", "through-plane", "--model", tiny_model_folder], "too small for ×2 through-plane DDNM"),
        (["-o", tmp_path / "taken.nrrd", "--method", "bicubic"], "already exists"),
        (["--model", task], "task model (segmentation)"),
        (["--model", ctfm], "no diffusion U-Net"),
        (["--method", "lanczos"], "unknown super-resolution method"),
        (["--slices", "40", "--method", "bicubic"], "outside the volume"),
        (["--axis", "sideways"], "unknown axis"),
    ]
    for extra, message in cases:
        args = ["enhance", "super-resolution", ct_file, "--factor", "2", "--steps", "1", *extra]
        if "-o" not in extra:
            args += ["-o", tmp_path / "out.nrrd"]
        code, _, err = run_cli(args, groups=["enhance"])
        assert code == 2 and message in err and err.strip().count("\n") == 0, (extra, err)
    assert not (tmp_path / "out.nrrd").exists()

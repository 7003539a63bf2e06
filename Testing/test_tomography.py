"""Projector, FBP and TV reconstruction (`lctfound.tomography`), low-dose simulation
(`lctfound.pipelines.low_dose`), sparse-view reconstruction (`lctfound.pipelines.sparse_view`) and
``lctfound enhance simulate-low-dose|sparse-view``."""

from __future__ import annotations

import json

import data_factory
import numpy as np
import pytest

from lctfound.errors import LCTfoundError
from lctfound.tomography import (
    MU_WATER_PER_MM,
    Geometry,
    Projector,
    hu_to_mu,
    mu_to_hu,
    tv_reconstruction,
)
from lctfound.compat import strict_zip

SIZE, PIXEL = 64, 2.0


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny U-Net runs 10-20x slower with two threads on a shared, loaded 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _rmse(a, b, mask=None):
    difference = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return float(np.sqrt(np.mean(difference[mask] ** 2 if mask is not None else difference ** 2)))


def _disc(size=SIZE, row=22, column=40, radius=10, mu=0.02, supersample=4):
    """A disc of attenuation ``mu`` (pixel-area weighted) and the analytic line integrals through it."""
    grid = (np.mgrid[: size * supersample, : size * supersample] + 0.5) / supersample - 0.5
    inside = (grid[0] - row) ** 2 + (grid[1] - column) ** 2 <= radius ** 2
    image = inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3)) * mu

    def analytic(geometry):
        theta, s = geometry.ray_coordinates()
        angle = np.deg2rad(theta)
        x0, y0 = column - size // 2, -(row - size // 2)  # the rotation axis is pixel (N//2, N//2)
        distance = s / PIXEL - (x0 * np.cos(angle) + y0 * np.sin(angle))
        return 2 * mu * np.sqrt(np.clip(radius ** 2 - distance ** 2, 0, None)) * PIXEL

    return image, analytic


@pytest.fixture(scope="module")
def phantom_hu():
    """A noise-free, piecewise-constant chest slice (air, fat, soft tissue, lungs, spine, nodule)."""
    return data_factory.chest_phantom((3, SIZE, SIZE), noise_hu=0.0)[1]


def test_hu_and_attenuation_convert_both_ways():
    assert hu_to_mu(0.0) == pytest.approx(MU_WATER_PER_MM)
    assert hu_to_mu(-1000.0) == 0.0 and hu_to_mu(-3024.0) == 0.0  # padding below air is air
    values = np.array([-1000.0, -500.0, 0.0, 400.0, 1500.0])
    assert mu_to_hu(hu_to_mu(values)) == pytest.approx(values)


@pytest.mark.parametrize("kind", ["parallel", "fan"])
def test_projector_matches_analytic_line_integrals_and_its_adjoint(kind):
    image, analytic = _disc()
    geometry = Geometry.for_image(kind, 60, SIZE, PIXEL)
    projector = Projector(geometry, SIZE, PIXEL)
    sinogram = projector.forward(image)
    expected = analytic(geometry)
    assert sinogram.shape == (geometry.views, geometry.detectors)
    # pixelised disc vs exact chords: 1.5 % of the peak RMS (a wrong angle or offset convention gives > 30 %)
    assert _rmse(sinogram, expected) < 0.015 * expected.max()
    rng = np.random.default_rng(0)
    x, y = rng.random((SIZE, SIZE)), rng.random(sinogram.shape)
    assert np.sum(projector.forward(x) * y) == pytest.approx(np.sum(x * projector.adjoint(y)), rel=0.01)


def test_fbp_round_trip_fan_and_parallel_agree(phantom_hu):
    water, _ = _disc(row=32, column=32, radius=24, mu=MU_WATER_PER_MM)
    inner = (slice(22, 42), slice(22, 42))
    results = {}
    for kind in ("parallel", "fan"):
        projector = Projector(Geometry.for_image(kind, 180, SIZE, PIXEL), SIZE, PIXEL)
        # a uniform water disc comes back at 0 HU; air around it at -1000 HU
        disc = mu_to_hu(projector.fbp(projector.forward(water)))
        assert disc[inner].mean() == pytest.approx(0.0, abs=10) and disc[inner].std() < 15
        assert disc[:4, :4].mean() == pytest.approx(-1000.0, abs=20)
        results[kind] = mu_to_hu(projector.fbp(projector.forward(hu_to_mu(phantom_hu))))
        assert _rmse(results[kind], phantom_hu) < 150  # edges of 1000-HU steps on 2-mm pixels dominate
    assert _rmse(results["fan"], results["parallel"]) < 60


def test_more_views_give_a_better_fbp_and_tv_beats_fbp_at_16_views(phantom_hu):
    mu = hu_to_mu(phantom_hu)
    errors = {}
    for views in (8, 16, 64):
        geometry = Geometry.for_image("parallel", views, SIZE, PIXEL)
        projector = Projector(geometry, SIZE, PIXEL)
        sinogram = projector.forward(mu)
        errors[views] = _rmse(mu_to_hu(projector.fbp(sinogram)), phantom_hu)
        if views == 16:
            tv = mu_to_hu(tv_reconstruction(sinogram, geometry, SIZE, PIXEL, iterations=40, projector=projector))
            errors["tv16"] = _rmse(tv, phantom_hu)
    assert errors[64] < 0.7 * errors[8], errors
    assert errors[16] < errors[8], errors
    assert errors["tv16"] < 0.8 * errors[16], errors


def test_geometry_and_sinogram_errors():
    with pytest.raises(LCTfoundError, match="at least one view"):
        Geometry("parallel", 0, 90, 1.0)
    with pytest.raises(LCTfoundError, match="at most 180° or exactly 360°"):
        Geometry("parallel", 10, 90, 1.0, angular_range_deg=270)
    with pytest.raises(LCTfoundError, match="source-to-isocentre"):
        Geometry("fan", 10, 90, 1.0, angular_range_deg=360)
    with pytest.raises(LCTfoundError, match="unknown geometry field"):
        Geometry.from_dict({"kind": "fan", "views": 4, "detectors": 8, "detector_spacing_mm": 1, "sid": 3})
    with pytest.raises(LCTfoundError, match="does not fit in a fan"):
        Geometry.for_image("fan", 16, 512, 2.0, source_to_isocentre_mm=300.0)
    projector = Projector(Geometry.for_image("parallel", 8, 32, 1.0), 32, 1.0)
    with pytest.raises(LCTfoundError, match="does not match the geometry"):
        projector.fbp(np.zeros((8, 10)))
    with pytest.raises(LCTfoundError, match="does not match the projector grid"):
        projector.forward(np.zeros((32, 30)))
    geometry = Geometry.for_image("fan", 16, 64, 1.0)
    assert Geometry.from_dict(json.loads(json.dumps(geometry.to_dict()))) == geometry


# --------------------------------------------------------------------------------------------
# Low-dose simulation
# --------------------------------------------------------------------------------------------


def test_low_dose_noise_grows_as_dose_falls_is_unbiased_and_seeded(phantom_hu):
    from lctfound.io.volume import CTVolume
    from lctfound.pipelines.low_dose import simulate_low_dose

    array = np.stack([phantom_hu, phantom_hu]).astype(np.float32)
    array[:, :2, :2] = -3024  # padding outside the field of view stays as it is
    volume = CTVolume(array, (PIXEL, PIXEL, 5.0), metadata={"source": "phantom.nrrd"})
    soft = phantom_hu == data_factory.SOFT_TISSUE_HU
    assert soft.sum() > 500
    spreads, biases = {}, {}
    for dose in (0.5, 0.1, 0.02):
        result = simulate_low_dose(volume, dose, geometry_kind="parallel", views=120, input_noise=False, seed=1)
        noise = result.array.astype(np.float64) - array
        spreads[dose] = float(noise[:, soft].std())
        biases[dose] = float(noise[:, phantom_hu > -900].mean())
        assert (result.array[:, :2, :2] == -3024).all()
    assert spreads[0.5] < spreads[0.1] < spreads[0.02]
    # noise variance ∝ 1/dose: the standard deviation grows by √5 from 10 % to 2 %
    assert spreads[0.02] / spreads[0.1] == pytest.approx(np.sqrt(5), rel=0.25)
    assert abs(biases[0.1]) < 0.1 * spreads[0.1], (biases, spreads)
    assert result.metadata["task"] == "simulate-low-dose" and result.metadata["dose_fraction"] == 0.02
    assert result.metadata["geometry"]["views"] == 120 and result.metadata["seed"] == 1
    again = simulate_low_dose(volume, 0.02, geometry_kind="parallel", views=120, input_noise=False, seed=1)
    other = simulate_low_dose(volume, 0.02, geometry_kind="parallel", views=120, input_noise=False, seed=2)
    assert np.array_equal(again.array, result.array) and not np.array_equal(other.array, result.array)
    assert volume.array is array  # the input is untouched; the result is a new volume


def test_low_dose_accounts_for_the_noise_already_in_the_input():
    from lctfound.pipelines.low_dose import effective_photons

    assert effective_photons(0.25, 1e5, input_noise=True) == pytest.approx(1e5 / 3)  # 1/d − 1 = 3
    assert effective_photons(0.25, 1e5, input_noise=False) == pytest.approx(2.5e4)
    with pytest.raises(LCTfoundError, match="between 0 and 1"):
        effective_photons(1.0, 1e5, True)


# --------------------------------------------------------------------------------------------
# Sparse view: diffusion
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from model_factory import tiny_model

    return tiny_model(64)


@pytest.fixture(scope="module")
def tiny_model_folder(tiny, tmp_path_factory):
    from lctfound.models import save_model

    return save_model(tiny, tmp_path_factory.mktemp("models") / "tiny")


def test_diffusion_reconstruction_runs_and_data_consistency_reduces_the_residual(tiny):
    from lctfound.pipelines.sparse_view import SparseViewDiffusionPipeline, simulate_sinograms
    from lctfound.progress import CancelToken, Progress

    volume = data_factory.synthetic_ct(shape=(2, 64, 64), spacing=(4.0, 4.0, 3.0))
    stack = simulate_sinograms(volume, kind="parallel", views=16)
    projector = Projector(stack.geometry, stack.image_size, stack.pixel_mm)

    def residual(images):
        return [np.linalg.norm(projector.forward(hu_to_mu(image)) - sinogram) / np.linalg.norm(sinogram)
                for image, sinogram in strict_zip(images, stack.sinograms)]

    free, _ = SparseViewDiffusionPipeline(tiny, steps=3, dc_iterations=0)(
        stack.sinograms, stack.geometry, stack.image_size, stack.pixel_mm, seed=0)
    calls = []
    guided, seconds = SparseViewDiffusionPipeline(tiny, steps=3, dc_iterations=5, batch_size=1)(
        stack.sinograms, stack.geometry, stack.image_size, stack.pixel_mm, seed=0,
        progress=Progress(lambda done, total, message: calls.append((done, total))))
    assert guided.shape == (2, 64, 64) and np.isfinite(guided).all() and len(seconds) == 2
    assert max(residual(guided)) < 0.5 * min(residual(free)), (residual(guided), residual(free))
    assert calls[-1][0] == calls[-1][1]
    # a finer volume grid than the model's: upsampled and refined against the projections
    fine = simulate_sinograms(data_factory.synthetic_ct(shape=(1, 80, 80), spacing=(3.2, 3.2, 3.0)), views=16)
    images, _ = SparseViewDiffusionPipeline(tiny, steps=2, dc_iterations=2, refine_iterations=3)(
        fine.sinograms, fine.geometry, fine.image_size, fine.pixel_mm)
    assert images.shape == (1, 80, 80) and np.isfinite(images).all()
    token = CancelToken()
    token.cancel()
    with pytest.raises(LCTfoundError, match="cancelled"):
        SparseViewDiffusionPipeline(tiny, steps=2)(stack.sinograms, stack.geometry, stack.image_size,
                                                   stack.pixel_mm, progress=Progress(cancel_token=token))


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


@pytest.fixture
def ct_file(tmp_path):
    from lctfound.io.volume import write_volume

    path = tmp_path / "case.nrrd"
    write_volume(data_factory.synthetic_ct(shape=(3, 48, 48), spacing=(3.0, 3.0, 4.0)), path)
    return path


def _events(out):
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_cli_simulate_low_dose_and_sparse_view_from_volume_and_from_sinograms(run_cli, ct_file, tmp_path):
    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import read_volume

    source = read_volume(ct_file, validate=False)
    code, out, err = run_cli(["enhance", "simulate-low-dose", ct_file, "--dose", "0.05", "--views", "90",
                              "--slices", "1", "--no-validate", "--events", "-o", tmp_path], groups=["enhance"])
    assert code == 0, err
    low = tmp_path / "case_lowdose5pct.nrrd"
    result = read_volume(low, validate=False)
    assert result.same_grid(source) and (result.array[[0, 2]] == -1024).all()
    assert 5 < _rmse(result.array[1], source.array[1]) < 500
    record = read_provenance(low)
    assert record["task"] == "simulate-low-dose" and record["slices"] == [1] and record["geometry"]["kind"] == "fan"
    assert _events(out)[-1]["event"] == "result" and _events(out)[-1]["output"] == str(low)

    sinogram = tmp_path / "views.npy"
    code, out, err = run_cli(["enhance", "sparse-view", ct_file, "--views", "16", "--geometry", "fan", "--method",
                              "fbp", "--save-sinogram", sinogram, "--no-validate", "-o", tmp_path / "fbp.nrrd"],
                             groups=["enhance"])
    assert code == 0, err
    assert json.loads((tmp_path / "views.json").read_text())["views"] == 16
    code, out, err = run_cli(["enhance", "sparse-view", "--sinogram", sinogram, "--method", "fbp",
                              "-o", tmp_path / "measured.nii.gz"], groups=["enhance"])
    assert code == 0, err
    simulated = read_volume(tmp_path / "fbp.nrrd", validate=False).array
    measured = read_volume(tmp_path / "measured.nii.gz", validate=False).array
    assert measured.shape == simulated.shape and np.abs(measured - simulated).max() < 1.0  # float32 sinogram file
    assert read_provenance(tmp_path / "measured.nii.gz")["input"] == "measured sinograms"

    code, out, err = run_cli(["enhance", "sparse-view", ct_file, "--views", "16", "--method", "tv",
                              "--tv-iterations", "10", "--no-validate", "-o", tmp_path / "tv.nrrd"], groups=["enhance"])
    assert code == 0, err
    tv = read_volume(tmp_path / "tv.nrrd", validate=False)
    assert tv.same_grid(source) and _rmse(tv.array, source.array) < 200
    assert read_provenance(tmp_path / "tv.nrrd")["tv_iterations"] == 10


def test_cli_diffusion_records_the_model(run_cli, ct_file, tiny_model_folder, tmp_path):
    from lctfound.io.provenance import read_provenance

    output = tmp_path / "diffusion.nrrd"
    code, out, err = run_cli(["enhance", "sparse-view", ct_file, "--views", "8", "--method", "diffusion", "--model",
                              tiny_model_folder, "--steps", "2", "--dc-iterations", "2", "--refine-iterations", "2",
                              "--slices", "0", "--no-validate", "--events", "-o", output], groups=["enhance"])
    assert code == 0, err
    record = read_provenance(output)
    weights = json.loads((tiny_model_folder / "lctfound.json").read_text())["files"]
    assert record["model_sha256"] == weights["unet/diffusion_pytorch_model.safetensors"]
    assert record["method"] == "diffusion" and record["steps"] == 2 and record["slices"] == [0]
    assert record["seconds_per_slice"] > 0
    assert {e["event"] for e in _events(out)} == {"progress", "result"}


def test_cli_bad_inputs_exit_2_in_one_line(run_cli, ct_file, tiny_model_folder, tmp_path):
    import shutil

    from lctfound.io.volume import CTVolume, write_volume

    np.save(tmp_path / "s.npy", np.zeros((2, 16, 70)))
    geometry = Geometry.for_image("parallel", 16, 48, 3.0).to_dict()
    (tmp_path / "s.json").write_text(json.dumps({**geometry, "image_size": 48, "pixel_mm": 3.0}))
    np.save(tmp_path / "nosidecar.npy", np.zeros((2, 16, 70)))
    np.save(tmp_path / "zero.npy", np.zeros((2, 0, 70)))
    (tmp_path / "zero.json").write_text(json.dumps({**geometry, "image_size": 48, "pixel_mm": 3.0}))
    task_model = tmp_path / "task-model"
    task_model.mkdir()
    (task_model / "task.json").write_text(json.dumps({"task": "few-shot-segmentation"}))
    no_prompts = tmp_path / "no-prompts"
    shutil.copytree(tiny_model_folder, no_prompts)
    shutil.rmtree(no_prompts / "conditioning")
    metadata = json.loads((no_prompts / "lctfound.json").read_text())
    metadata.pop("conditioning", None)
    metadata["files"] = {k: v for k, v in metadata["files"].items() if not k.startswith("conditioning")}
    (no_prompts / "lctfound.json").write_text(json.dumps(metadata))
    anisotropic = tmp_path / "aniso.nrrd"
    write_volume(CTVolume(np.full((2, 32, 32), -1000, np.int16), (1.0, 1.5, 2.0)), anisotropic)
    (tmp_path / "exists.nrrd").write_text("x")
    sparse = ["enhance", "sparse-view"]
    cases = [
        (["enhance", "simulate-low-dose", ct_file, "--dose", "1.5", "-o", tmp_path / "a.nrrd"], "> 0 and < 1"),
        (["enhance", "simulate-low-dose", ct_file, "--dose", "0.1", "--views", "0", "-o", tmp_path / "a.nrrd"],
         "whole number from 2"),
        ([*sparse, ct_file, "--views", "0", "-o", tmp_path / "a.nrrd"], "whole number from 2"),
        ([*sparse, ct_file, "-o", tmp_path / "a.nrrd"], "give --views"),
        ([*sparse, "--sinogram", tmp_path / "s.npy", "-o", tmp_path / "a.nrrd"], "16 views × 70 detectors"),
        ([*sparse, "--sinogram", tmp_path / "nosidecar.npy", "-o", tmp_path / "a.nrrd"], "no geometry"),
        ([*sparse, "--sinogram", tmp_path / "zero.npy", "-o", tmp_path / "a.nrrd"], "zero views"),
        ([*sparse, ct_file, "--views", "8", "--method", "diffusion", "--model", task_model, "--no-validate",
          "-o", tmp_path / "a.nrrd"], "task model"),
        ([*sparse, ct_file, "--views", "8", "--method", "diffusion", "--model", no_prompts, "--no-validate",
          "-o", tmp_path / "a.nrrd"], "prompt vectors"),
        ([*sparse, anisotropic, "--views", "8", "--no-validate", "-o", tmp_path / "a.nrrd"], "square pixels"),
        ([*sparse, ct_file, "--views", "8", "--no-validate", "-o", tmp_path / "exists.nrrd"], "already exists"),
        ([*sparse, ct_file, "--views", "8", "-o", tmp_path / "a.png"], "unsupported output format"),
    ]
    for args, message in cases:
        code, _, err = run_cli(args, groups=["enhance"])
        assert code == 2, (args, err)
        assert message in err and err.strip().count("\n") == 0, (message, err)
    assert not (tmp_path / "a.nrrd").exists()

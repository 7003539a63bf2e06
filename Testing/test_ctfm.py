"""CT-FM backbone: registry, preprocessing contract and geometry, strict loading, features,
retrieval and the ``lctfound ctfm`` commands. Random-init models only (no weights exist here)."""

from __future__ import annotations

import json
import struct

import data_factory
import nibabel
import numpy as np
import pytest
import torch
from model_factory import SMALL_CTFM

from lctfound.backbones import get_backbone, list_backbones, supports, tasks_for, unsupported_reason
from lctfound.ctfm import model as ctfm_model
from lctfound.ctfm.features import (
    WindowSettings,
    dense_features,
    embed_point,
    embed_region,
    embed_volume,
    run_windows,
    similarity_volume,
    window_count,
)
from lctfound.ctfm.model import (
    CTFM_CONFIG,
    REFERENCE_FILE_BYTES,
    REFERENCE_PARAMETERS,
    REFERENCE_TENSORS,
    expected_tensors,
    inspect_model,
    load_model,
    new_model,
    parameter_count,
    safetensors_size,
    save_model,
)
from lctfound.ctfm.preprocess import CTFMPreprocessing, prepare_volume
from lctfound.ctfm.retrieval import build_index, load_index
from lctfound.errors import Cancelled, CheckpointError, LCTfoundError
from lctfound.io.volume import CTVolume, read_volume, write_volume
from lctfound.progress import Progress

SMALL_WINDOWS = WindowSettings(window=(32, 32, 32), overlap=0.5, batch_size=4)




pytestmark = pytest.mark.usefixtures("one_torch_thread")

@pytest.fixture(scope="module")
def small_model():
    return new_model(SMALL_CTFM, seed=0)


@pytest.fixture(scope="module")
def small_folder(small_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ctfm") / "small"
    _randomise_bn(small_model.encoder)
    save_model(small_model, folder)
    return folder


def _randomise_bn(encoder, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    for module in encoder.modules():
        if isinstance(module, torch.nn.BatchNorm3d):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
            module.num_batches_tracked.fill_(225_000)


def _box_ct(shape=(32, 96, 96), spacing=(1.0, 1.0, 3.0), direction=None, origin=(5.0, -12.0, 30.0), seed=0):
    """Soft tissue filling the field of view with mild texture (every voxel > 0 HU)."""
    rng = np.random.default_rng(seed)
    array = 40.0 + 15.0 * rng.standard_normal(shape)
    return CTVolume(array.astype(np.float32), spacing, origin, np.eye(3) if direction is None else direction)


# --------------------------------------------------------------------------- backbones

def test_backbone_registry():
    assert [b.name for b in list_backbones()] == ["lctfound", "ctfm"]
    ctfm = get_backbone("CT-FM")
    assert ctfm.dimensionality == 3 and ctfm.embedding_dim == 512
    assert ctfm.preprocessing.orientation == "SPL" and ctfm.preprocessing.spacing_mm == (3.0, 1.0, 1.0)
    assert ctfm.preprocessing.size_multiple == 16 and ctfm.preprocessing.hu_window == (-1024.0, 2048.0)
    for task in ("embedding", "dense-features", "retrieval", "classification-probe", "segmentation-decoder"):
        assert supports("ctfm", task)
    for task in ("generation", "enhancement", "virtual-cta", "sparse-view-reconstruction"):
        assert not supports("ctfm", task) and supports("lctfound", task)
        assert "no image decoder" in unsupported_reason("ctfm", task)
    assert "generation" not in tasks_for("ctfm") and "retrieval" in tasks_for("ctfm")
    assert unsupported_reason("ctfm", "retrieval") == ""
    with pytest.raises(LCTfoundError, match="unknown task"):
        supports("ctfm", "generate")
    with pytest.raises(LCTfoundError, match="unknown backbone"):
        get_backbone("sam")


# --------------------------------------------------------------------------- architecture numbers

def test_reference_numbers_without_allocating():
    tensors = expected_tensors()
    assert len(tensors) == REFERENCE_TENSORS == 161
    assert parameter_count() == REFERENCE_PARAMETERS == 77_760_992
    assert safetensors_size(tensors) == REFERENCE_FILE_BYTES == 311_116_176
    assert tensors["conv_init.weight"][0] == (32, 1, 3, 3, 3)
    assert tensors["layers.4.blocks.3.conv2.weight"][0] == (512, 512, 3, 3, 3)
    assert tensors["layers.3.downsample.weight"][0] == (512, 256, 3, 3, 3)
    assert tensors["layers.2.blocks.1.norm1.running_var"][0] == (128,)
    assert tensors["layers.0.blocks.0.norm1.num_batches_tracked"] == ((), torch.int64)
    assert "layers.4.downsample.weight" not in tensors and "layers.4.blocks.4.conv1.weight" not in tensors
    # The published config.json is 123 bytes; ours is written the same way.
    assert len(json.dumps(CTFM_CONFIG, sort_keys=True, indent=2)) == 123


def test_saved_layout_matches_computed_size(small_folder):
    weights = small_folder / "model.safetensors"
    assert weights.stat().st_size == safetensors_size(expected_tensors(SMALL_CTFM))
    header_length = struct.unpack("<Q", weights.read_bytes()[:8])[0]
    header = json.loads(weights.read_bytes()[8:8 + header_length])
    assert "__metadata__" not in header and "conv_init.weight" in header  # unprefixed, like the published file
    assert json.loads((small_folder / "config.json").read_text()) == SMALL_CTFM


def test_full_size_encoder_outputs():
    model = new_model(seed=0)
    assert model.parameters_count() == REFERENCE_PARAMETERS and model.embedding_dim == 512
    with torch.inference_mode():
        maps = model.encoder(torch.rand(1, 1, 32, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(32, 32, 64, 64), (64, 16, 32, 32), (128, 8, 16, 16),
                                                 (256, 4, 8, 8), (512, 2, 4, 4)]
    assert ctfm_model.embed_tensor(model.encoder, torch.rand(2, 1, 32, 64, 64)).shape == (2, 512)


# --------------------------------------------------------------------------- preprocessing and geometry

@pytest.mark.parametrize("oblique", [False, True])
def test_preprocessing_contract(oblique):
    volume = data_factory.oblique_ct(shape=(20, 60, 70)) if oblique else \
        data_factory.synthetic_ct(shape=(20, 60, 70), spacing=(0.7, 0.8, 2.5), origin=(10, -20, 30))
    prepared = prepare_volume(volume)
    assert "".join(nibabel.aff2axcodes(prepared.affine)) == "SPL"
    assert np.allclose(prepared.spacing, (3.0, 1.0, 1.0))
    assert all(s % 16 == 0 for s in prepared.shape)
    assert prepared.array.dtype == np.float32 and prepared.array.min() >= 0.0 and prepared.array.max() <= 1.0
    assert prepared.steps["crop_box"] is not None  # the air around the body was cropped
    # padding is -1024 HU, i.e. 0 after scaling
    before = prepared.steps["pad_before"]
    if before[1]:
        assert np.all(prepared.array[:, : before[1]] == 0.0)
    assert CTFMPreprocessing().scale(-1024) == 0.0 and CTFMPreprocessing().scale(2048) == 1.0


@pytest.mark.parametrize("oblique", [False, True])
def test_geometry_round_trip_is_exact(oblique):
    volume = data_factory.oblique_ct(shape=(20, 60, 70)) if oblique else data_factory.synthetic_ct(shape=(20, 60, 70))
    prepared = prepare_volume(volume)
    rng = np.random.default_rng(0)
    source_ijk = rng.uniform(0, [69, 59, 19], size=(20, 3))
    ras = source_ijk @ volume.ijk_to_ras()[:3, :3].T + volume.ijk_to_ras()[:3, 3]
    index = prepared.ras_to_index(ras)
    assert np.allclose(prepared.index_to_ras(index), ras, atol=1e-9)
    assert np.allclose(prepared.source_ijk_to_index(source_ijk), index, atol=1e-9)
    assert np.allclose(prepared.index_to_source_ijk(index), source_ijk, atol=1e-9)
    # Slicer's side: IJK→RAS of the CTVolume and back through from_ijk_to_ras keeps the same mapping.
    rebuilt = CTVolume.from_ijk_to_ras(volume.array, volume.ijk_to_ras())
    assert np.allclose(rebuilt.ijk_to_ras(), volume.ijk_to_ras(), atol=1e-12)
    assert np.allclose(prepare_volume(rebuilt).affine, prepared.affine, atol=1e-9)


@pytest.mark.parametrize("oblique", [False, True])
def test_no_voxel_shift_in_the_data(oblique):
    """A smooth blob keeps its RAS position through orientation, resampling, crop and pad."""
    direction = data_factory.rotation_matrix() if oblique else None
    volume = _box_ct(shape=(24, 70, 64), spacing=(0.7, 0.8, 2.5), direction=direction, seed=1)
    volume.array[:] = 40.0
    centre_ijk = np.array([30.3, 33.6, 11.2])
    ijk = np.stack(np.meshgrid(np.arange(64), np.arange(70), np.arange(24), indexing="ij"), axis=-1)
    mm = (ijk - centre_ijk) * np.asarray(volume.spacing)
    blob = 900.0 * np.exp(-(mm ** 2).sum(-1) / (2 * 5.0 ** 2))
    volume.array += blob.transpose(2, 1, 0).astype(np.float32)
    prepared = prepare_volume(volume)
    weights = np.clip(prepared.array - CTFMPreprocessing().scale(40.0), 0, None)
    index = np.stack(np.nonzero(weights), axis=1)
    centroid = (index * weights[tuple(index.T)][:, None]).sum(0) / weights.sum()
    expected_ras = volume.ijk_to_ras()[:3, :3] @ centre_ijk + volume.ijk_to_ras()[:3, 3]
    assert np.abs(prepared.index_to_ras(centroid) - expected_ras).max() < 0.1  # mm; a voxel is 1-3 mm
    # and back onto the source grid, the resampled image matches the source image
    back = prepared.to_source_grid(prepared.array, fill=-1.0)
    scaled = np.clip((volume.array + 1024) / 3072, 0, 1)
    assert (back >= 0).mean() > 0.8
    inner = (slice(2, -2),) * 3  # away from the border, where resampling meets the padding
    assert np.abs(back[inner] - scaled[inner]).max() < 0.02


# --------------------------------------------------------------------------- loading

def _reference_output(model, x):
    with torch.inference_mode():
        return model.encoder(x)[-1]


@pytest.mark.parametrize("prefix,extra", [
    ("", {}),
    ("encoder.", {"up_layers.0.conv.weight": (8, 4, 1, 1, 1), "up_layers.0.head.weight": (2, 8, 1, 1, 1)}),
    ("model.backbone.", {"model.projection_head.layers.0.weight": (16, 64)}),
    ("backbone.", {}),
    ("trunk.encoder.", {"head.weight": (1, 64)}),
])
def test_load_prefix_variants(small_model, small_folder, tmp_path, prefix, extra):
    from safetensors.torch import save_file

    state = {prefix + k: v.contiguous() for k, v in small_model.encoder.state_dict().items()}
    state.update({k: torch.zeros(shape) for k, shape in extra.items()})
    folder = tmp_path / "variant"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(SMALL_CTFM))
    loaded = load_model(folder)
    assert loaded.metadata["key_prefix"] == prefix and not loaded.encoder.training
    x = torch.rand(1, 1, 32, 32, 32)
    assert torch.equal(_reference_output(loaded, x), _reference_output(small_model, x))
    bn = loaded.encoder.layers[0]["blocks"][0].norm1
    assert torch.equal(bn.running_mean, small_model.encoder.layers[0]["blocks"][0].norm1.running_mean)
    assert int(bn.num_batches_tracked) == 225_000
    assert inspect_model(folder)["key_prefix"] == prefix


def _variant(tmp_path, small_model, edit=None, config=SMALL_CTFM, name="bad"):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in small_model.encoder.state_dict().items()}
    if edit:
        edit(state)
    folder = tmp_path / name
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_strict_loading_errors(small_model, small_folder, tmp_path):
    def check(folder, pattern):
        with pytest.raises(CheckpointError, match=pattern) as info:
            load_model(folder)
        assert "\n" not in str(info.value)

    check(_variant(tmp_path, small_model, lambda s: s.pop("layers.2.blocks.0.norm1.running_var"), name="m"),
          "1 encoder tensor.s. missing, e.g. layers.2.blocks.0.norm1.running_var")
    check(_variant(tmp_path, small_model, lambda s: s.update({"layers.9.extra": torch.zeros(2)}), name="u"),
          "1 unexpected tensor.s., e.g. layers.9.extra")
    check(_variant(tmp_path, small_model, lambda s: s.update({"conv_init.weight": torch.zeros(4, 1, 1, 3, 3)}),
                   name="s"),
          r"conv_init.weight has shape \[4, 1, 1, 3, 3\], the config needs \[4, 1, 3, 3, 3\]")
    check(_variant(tmp_path, small_model, config=CTFM_CONFIG, name="c"), "missing|shape")
    foreign = _variant(tmp_path, small_model, lambda s: [s.clear(), s.update({"unet.conv_in.weight": torch.zeros(2)})],
                       name="f")
    check(foreign, "none of its 1 tensors belongs to a CT-FM")
    truncated = tmp_path / "t"
    truncated.mkdir()
    data = (small_folder / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    check(truncated, "not a readable safetensors file")
    pickled = tmp_path / "p"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    check(pickled, "pickled weights .* never loaded")
    check(tmp_path / "p" / "pytorch_model.bin", "pickled weights are never loaded")
    check(tmp_path / "nowhere", "no such model folder")
    check(_variant(tmp_path, small_model, config={**SMALL_CTFM, "norm": "instance"}, name="n"), "norm='instance'")
    check(_variant(tmp_path, small_model, config={**SMALL_CTFM, "foo": 1}, name="k"), "unknown key 'foo'")
    bad_json = _variant(tmp_path, small_model, name="j")
    (bad_json / "config.json").write_text("{")
    check(bad_json, "not valid JSON")
    check("someone/not-cached-ctfm", "not in the local Hugging Face cache")


def test_checksum_and_round_trip(small_model, small_folder, tmp_path):
    loaded = load_model(small_folder)
    assert loaded.weights_sha256 and loaded.path == small_folder
    for name, tensor in small_model.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], tensor), name
    import shutil

    changed = tmp_path / "changed"
    shutil.copytree(small_folder, changed)
    (changed / "config.json").write_text(json.dumps(SMALL_CTFM, indent=1))
    with pytest.raises(CheckpointError, match="sha256 .* differs"):
        load_model(changed)


# --------------------------------------------------------------------------- features

def test_embeddings_and_bounded_dense_features(small_folder):
    model = load_model(small_folder)
    volume = _box_ct(shape=(40, 100, 110), spacing=(0.8, 0.8, 2.0))
    prepared = prepare_volume(volume)
    calls = []
    progress = Progress(lambda done, total, message: calls.append((done, total)))
    result = run_windows(model, prepared, SMALL_WINDOWS, dense_stage=2, dense_downsample=2, progress=progress)
    windows = result["windows"]
    count = window_count(prepared.shape, SMALL_WINDOWS)
    assert windows.embeddings.shape == (count, model.embedding_dim) == (count, 64)
    assert calls[-1] == (count, count)
    assert np.all(windows.starts % 16 == 0)
    # window centres map back into the source volume
    centres_ijk = prepared.index_to_source_ijk(windows.centres_index)
    assert np.allclose(prepared.index_to_ras(windows.centres_index), windows.centres_ras)
    assert centres_ijk.shape == (count, 3)
    dense = result["dense"]
    assert dense.array.shape == (16, *(s // 8 for s in prepared.shape))
    # cell n of the stride-4, 2x-pooled map sits at index 8n + 2
    cells = np.array([[8, 0, 0, 2], [0, 8, 0, 2], [0, 0, 8, 2], [0, 0, 0, 1.0]])
    assert np.allclose(dense.affine, prepared.affine @ cells)
    with pytest.raises(LCTfoundError, match="GiB; raise the downsample"):
        dense_features(model, prepared, stage=0, settings=SMALL_WINDOWS, max_output_bytes=1 << 20)
    with pytest.raises(LCTfoundError, match="not a multiple of 16"):
        run_windows(model, prepared, WindowSettings((32, 32, 32), overlap=0.25))
    vector, per_window = embed_volume(model, prepared, "min", SMALL_WINDOWS)
    assert np.allclose(vector, per_window.embeddings.min(axis=0))
    whole, none = embed_volume(model, prepared, "whole")
    assert whole.shape == (64,) and none is None
    progress = Progress()
    progress.cancel_token.cancel()
    with pytest.raises(Cancelled):
        embed_volume(model, prepared, "mean", SMALL_WINDOWS, progress=progress)


def _blob_ct(centre_ijk, seed=0):
    volume = _box_ct(shape=(32, 96, 96), spacing=(1.0, 1.0, 3.0), seed=seed)
    ijk = np.stack(np.meshgrid(np.arange(96), np.arange(96), np.arange(32), indexing="ij"), axis=-1)
    mm = (ijk - np.asarray(centre_ijk)) * np.asarray(volume.spacing)
    sphere = ((mm ** 2).sum(-1) <= 8.0 ** 2).transpose(2, 1, 0)
    volume.array[sphere] = 1000.0
    return volume


def test_point_query_heatmap_peaks_at_the_point(small_folder):
    """The point is put at a sliding window's centre (near a sphere), so its query vector equals that
    window's vector exactly: the blended heat map must peak there, whatever the random weights."""
    model = load_model(small_folder)
    volume = _blob_ct((68.0, 30.0, 16.0))
    prepared = prepare_volume(volume)
    sphere_index = prepared.source_ijk_to_index(np.array([68.0, 30.0, 16.0]))
    start = np.round((sphere_index - 15.5) / 16) * 16
    point_ras = prepared.index_to_ras(start + 15.5)
    query, window_centre = embed_point(model, prepared, point_ras, SMALL_WINDOWS.window)
    assert np.allclose(window_centre, point_ras)
    heatmap, windows = similarity_volume(model, volume, query, SMALL_WINDOWS, prepared=prepared)
    assert heatmap.same_grid(volume) and heatmap.array.dtype == np.float32
    scores = windows.embeddings @ query / np.linalg.norm(windows.embeddings, axis=1) / np.linalg.norm(query)
    best = int(np.argmax(scores))
    assert scores[best] == pytest.approx(1.0, abs=1e-6) and np.allclose(windows.centres_ras[best], point_ras)
    # The map interpolates the window scores between window centres: its maximum is reached at the voxels
    # nearest the best window's centre (one window deep here, so the whole column along S ties).
    peak = np.argwhere(heatmap.array >= heatmap.array.max() - 1e-6)[:, ::-1]  # (i, j, k)
    peak_ras = peak @ volume.ijk_to_ras()[:3, :3].T + volume.ijk_to_ras()[:3, 3]
    assert np.abs(peak_ras - point_ras)[:, :2].max() <= 0.5 + 1e-6  # mm, in-plane: the 4 voxels around the point
    assert heatmap.array.max() > np.sort(scores)[-2]
    with pytest.raises(LCTfoundError, match="outside the body crop"):
        embed_point(model, prepared, point_ras + np.array([0.0, 0.0, 500.0]))
    # a region spanning exactly that window's voxels gives the same vector and centre
    vector, centre = embed_region(model, prepared, prepared.index_to_ras(start), prepared.index_to_ras(start + 31),
                                  SMALL_WINDOWS)
    assert np.allclose(vector, query, atol=1e-5) and np.allclose(centre, point_ras)


def test_index_ranks_identical_scan_first(small_folder, tmp_path):
    model = load_model(small_folder)
    folder = tmp_path / "cohort"
    folder.mkdir()
    for number, centre in enumerate([(30.0, 30.0, 10.0), (68.0, 64.0, 20.0), (50.0, 50.0, 16.0)]):
        write_volume(_blob_ct(centre, seed=number), folder / f"case{number}.nii.gz")
    index_path = build_index(model, sorted(folder.iterdir()), tmp_path / "index", SMALL_WINDOWS, validate=False)
    index = load_index(index_path)
    assert index.volumes.shape == (3, 64) and len(index.entries) == 3
    query = read_volume(folder / "case1.nii.gz", validate=False)
    vector, _ = embed_volume(model, query, "mean", SMALL_WINDOWS)
    matches = index.search(vector, "volume", 3)
    assert matches[0].name == "case1" and matches[0].score == pytest.approx(1.0, abs=1e-5)
    window_matches = index.search(index.windows[5], "window", 2)
    assert window_matches[0].score == pytest.approx(1.0, abs=1e-5) and window_matches[0].centre_ras is not None
    other = new_model(SMALL_CTFM, seed=3)
    other.metadata["weights_sha256"] = "0" * 64
    with pytest.raises(LCTfoundError, match="use the same model"):
        index.check_model(other)
    with pytest.raises(LCTfoundError, match="already exists"):
        build_index(model, sorted(folder.iterdir()), index_path, SMALL_WINDOWS, validate=False)


# --------------------------------------------------------------------------- command line

def test_cli_round_trip(small_folder, tmp_path, run_cli):
    code, out, _ = run_cli(["ctfm", "--help"], groups=["ctfm"])
    assert code == 0 and "never downloaded" in out
    code, out, err = run_cli(["ctfm", "inspect", small_folder], groups=["ctfm"])
    assert code == 0 and "check:          ok (strict)" in out and "tensors" in out, err
    folder = tmp_path / "cohort"
    folder.mkdir()
    for number, centre in enumerate([(30.0, 30.0, 10.0), (68.0, 64.0, 20.0)]):
        volume = _blob_ct(centre, seed=number)
        volume.array[:, :4] = -1000.0  # some air, so that the CT check passes
        write_volume(volume, folder / f"case{number}.nii.gz")
    window = ["--window", "32,32,32", "--batch-size", "4"]
    code, out, err = run_cli(["ctfm", "embed", folder / "case0.nii.gz", "--model", small_folder, "-o",
                              tmp_path / "e.json", *window, "--device", "cpu"], groups=["ctfm"])
    assert code == 0, err
    assert len(json.loads((tmp_path / "e.json").read_text())["embedding"]) == 64
    code, _, err = run_cli(["ctfm", "embed", folder / "case0.nii.gz", "--model", small_folder, "-o",
                            tmp_path / "e.safetensors", *window, "--device", "cpu"], groups=["ctfm"])
    assert code == 0, err
    code, out, err = run_cli(["ctfm", "index", folder, "--model", small_folder, "-o", tmp_path / "idx", *window,
                              "--device", "cpu", "--events"], groups=["ctfm"])
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]  # only JSON lines: a front end reads them
    volumes = len(list(folder.iterdir()))
    assert events[-1] == {"event": "progress", "done": volumes, "total": volumes, "message": "writing the index"}
    code, out, err = run_cli(["ctfm", "search", tmp_path / "idx", "--query", folder / "case1.nii.gz", "--model",
                              small_folder, "--json", "--device", "cpu"], groups=["ctfm"])
    assert code == 0, err
    assert json.loads(out)["matches"][0]["name"] == "case1"
    query = read_volume(folder / "case1.nii.gz")
    ras = query.ijk_to_ras()[:3, :3] @ np.array([68.0, 64.0, 20.0]) + query.ijk_to_ras()[:3, 3]
    code, out, err = run_cli(["ctfm", "search", tmp_path / "idx", "--query", folder / "case1.nii.gz", "--model",
                              small_folder, "--point=" + ",".join(f"{v:.2f}" for v in ras), "--heatmap",
                              tmp_path / "heat.nii.gz", "--device", "cpu"], groups=["ctfm"])
    assert code == 0, err
    assert "case1" in out.splitlines()[1]
    heat = read_volume(tmp_path / "heat.nii.gz", validate=False)
    assert heat.same_grid(query)
    # --events (the panel's search job): only JSON lines, progress then one result event with --json's content
    code, out, err = run_cli(["ctfm", "search", tmp_path / "idx", "--query", folder / "case1.nii.gz", "--model",
                              small_folder, "--heatmap", tmp_path / "heat2.nrrd", "--device", "cpu", "--events"],
                             groups=["ctfm"])
    assert code == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    assert {event["event"] for event in events[:-1]} == {"progress"} and events[-1]["event"] == "result"
    assert events[-1]["matches"][0]["name"] == "case1" and events[-1]["level"] == "volume"
    assert events[-1]["heatmap"] == str(tmp_path / "heat2.nrrd") and events[-1]["query_centre_ras"] is None
    # list: what the panel offers, checked without loading weights
    code, out, err = run_cli(["ctfm", "list", "--json", "--folder", small_folder, "--folder", folder], groups=["ctfm"])
    assert code == 0, err
    listed = json.loads(out)
    assert [entry["path"] for entry in listed["encoders"]] == [str(small_folder)]
    assert list(listed["rejected"]) == [str(folder)] and "cpu" in listed["devices"]
    # one-line errors, exit code 2
    code, _, err = run_cli(["ctfm", "inspect", tmp_path / "nowhere"], groups=["ctfm"])
    assert code == 2 and err.count("\n") == 1 and "no such model folder" in err
    code, _, err = run_cli(["ctfm", "search", tmp_path / "idx", "--query", folder / "case1.nii.gz", "--model",
                            small_folder, "--point", "1,2"], groups=["ctfm"])
    assert code == 2 and "three comma-separated numbers" in err
    code, _, err = run_cli(["ctfm", "embed", folder / "case0.nii.gz", "--model", small_folder, "-o",
                            tmp_path / "e.txt"], groups=["ctfm"])
    assert code == 2 and ".json or .safetensors" in err

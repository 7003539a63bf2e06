"""Rules 4–7 of issue 12: what a command is given is checked before any work, each in one shared place.

* headers against files (`lctfound.io.headers.check_volume_file`): lying and truncated NIfTI, NRRD
  (attached, detached, gzip) and MetaImage headers, a memory cap, no voxel size;
* non-finite voxels for every format (`lctfound.io.volume.check_finite`), DICOM series choice;
* label maps (`check_label_map`) and label names (`lctfound.validation.parse_label_names`);
* option values (`lctfound.validation` argparse types) and configs (`LoopConfig`, U-Net, scheduler);
* only safetensors (BERT folders).

Each bad input must give exit code 2 and one ``error: ...`` line without a traceback, leave its
input files byte-identical and create no output. The bad files come from ``bad_files.py``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

import bad_files
from lctfound.errors import CheckpointError, InputError, LCTfoundError
from lctfound.io.volume import read_label_volume, read_volume


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_error_line(code: int, err: str, phrase: str = "") -> str:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert phrase in lines[0], lines[0]
    return lines[0]


def _usage_error(code: int, err: str, phrase: str) -> str:
    """An argparse error: exit 2, no traceback, the message on the last line (one line with the
    CLI's one-line parser)."""
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error:" in last and phrase in last, err
    return last


# ---------------------------------------------------------------------------- volumes (rules 4, 5)

@pytest.mark.parametrize("case", list(bad_files.BAD_VOLUMES))
def test_bad_volume_refused_by_reader_and_cli(tmp_path, run_cli, case):
    build, phrase = bad_files.BAD_VOLUMES[case]
    path = build(tmp_path / "in")
    before = _digests(tmp_path / "in")
    for labels in (False, True):  # neither --no-validate nor reading as a label map lets it through
        with pytest.raises(InputError, match=None) as raised:
            read_volume(path, validate=False, labels=labels)
        assert phrase in str(raised.value) and "\n" not in str(raised.value)
    code, out, err = run_cli(["data", "info", path, "--no-validate"])
    _one_error_line(code, err, phrase)
    assert out == ""
    assert _digests(tmp_path / "in") == before


def test_lying_header_is_refused_before_itk_reads(tmp_path, monkeypatch):
    """The 512×512×10000 claim on a 2 KB file never reaches the ITK reader (no allocation)."""
    import lctfound.io.volume as volume_module

    def itk_read(path):
        raise AssertionError("ITK was asked to read a file whose header does not match it")

    monkeypatch.setattr(volume_module, "_read_image_file", itk_read)
    for build in (bad_files.nifti_header_claiming_huge_volume, bad_files.nrrd_header_claiming_huge_volume,
                  bad_files.mha_header_claiming_huge_volume, bad_files.truncated_nifti_gz):
        with pytest.raises(InputError):
            read_volume(build(tmp_path / build.__name__), validate=False)


def test_memory_cap(tmp_path, monkeypatch):
    import lctfound.io.headers as headers

    path = bad_files.good_ct(tmp_path)
    read_volume(path)  # fits
    monkeypatch.setattr(headers, "available_memory", lambda: 1000)
    with pytest.raises(InputError, match=r"needs about .* of memory to read, only 1\.0 KB is available"):
        read_volume(path)


def test_dicom_series_memory_cap(tmp_path, monkeypatch):
    import data_factory
    import lctfound.io.headers as headers

    folder = tmp_path / "series"
    data_factory.write_dicom_series(data_factory.synthetic_ct(shape=(4, 16, 20)), folder)
    monkeypatch.setattr(headers, "available_memory", lambda: 100)
    with pytest.raises(InputError, match=r"\(4 slices\) needs about .* of memory"):
        read_volume(folder)


def test_good_files_of_every_layout_still_read(tmp_path):
    """The checks accept what the writers make: NIfTI, NRRD and MHA, raw and compressed."""
    import data_factory
    from lctfound.io.volume import write_volume

    ct = data_factory.synthetic_ct(shape=(5, 12, 14))
    for name, compress in (("a.nii", False), ("b.nii.gz", True), ("c.nrrd", False), ("d.nrrd", True),
                           ("e.mha", False), ("f.mha", True)):
        volume = read_volume(write_volume(ct, tmp_path / name, compress=compress))
        np.testing.assert_array_equal(volume.array, ct.array)


def test_nan_refused_with_validation_off_and_as_label(tmp_path):
    path = bad_files.nan_nifti(tmp_path)
    for kwargs in ({}, {"validate": False}, {"labels": True}):
        with pytest.raises(InputError, match="2 NaN or infinite voxels"):
            read_volume(path, **kwargs)


def test_two_series_listed_with_how_to_choose(tmp_path, run_cli):
    folder = bad_files.dicom_two_series_same_size(tmp_path)
    code, _, err = run_cli(["data", "info", folder])
    line = _one_error_line(code, err, "1.2.826.0.1.3680043.8.498.1")
    assert "1.2.826.0.1.3680043.8.498.2" in line and "--series-uid UID" in line
    code, _, err = run_cli(["features", folder, "-o", tmp_path / "features"])
    assert "--series-uid UID" in _one_error_line(code, err, "pass a folder that holds only that series")
    # `segment train` has no --series-uid: its message must not send the user there.
    labels = bad_files.label_map_with_values(tmp_path, (1,))
    code, _, err = run_cli(["segment", "train", folder, "--labels", labels, "-o", tmp_path / "model"])
    assert "--series-uid" not in _one_error_line(code, err, "pass a folder that holds only that series")
    assert not (tmp_path / "features").exists() and not (tmp_path / "model").exists()
    chosen = read_volume(folder, series_uid="1.2.826.0.1.3680043.8.498.2")
    assert chosen.metadata["series_uid"] == "1.2.826.0.1.3680043.8.498.2"


# ---------------------------------------------------------------------------- the expected kind (rule 6)

@pytest.mark.parametrize("case", list(bad_files.LABEL_MAP_CASES))
def test_not_a_label_map(tmp_path, run_cli, case):
    build, phrase = bad_files.LABEL_MAP_CASES[case]
    path = build(tmp_path / "in")
    reference = bad_files.label_map_with_values(tmp_path / "ref", (1,))
    before = _digests(tmp_path)
    with pytest.raises(InputError, match=phrase):
        read_label_volume(path)
    code, _, err = run_cli(["evaluate", "segmentation", "-p", path, "-r", reference, "-o", tmp_path / "out.json"])
    line = _one_error_line(code, err, phrase)
    assert "has no name" not in line
    assert _digests(tmp_path) == before  # nothing written


def test_label_maps_with_many_structures_still_read(tmp_path):
    path = bad_files.label_map_with_values(tmp_path, tuple(range(1, 4)) + (200,))
    assert sorted(np.unique(read_label_volume(path).array)) == [0, 1, 2, 3, 200]


def test_label_names_must_match_the_label_values():
    from lctfound.validation import parse_label_names

    assert parse_label_names(None, {0, 2, 5}) == {2: "Label 2", 5: "Label 5"}
    assert parse_label_names("2=Lesion,5=Vessel", [0, 2, 5]) == {2: "Lesion", 5: "Vessel"}
    with pytest.raises(LCTfoundError, match=r"label value\(s\) 7 have no name and named value\(s\) 1 \(Lesion\) "
                                            r"have no voxels; its label values are 7"):
        parse_label_names("1=Lesion", {0, 7}, "labels.nrrd")
    for text in ("x=Lesion", "1=", "0=Background", "1=A,1=B"):
        with pytest.raises(LCTfoundError):
            parse_label_names(text, {1})


def test_segment_train_refuses_unnamed_and_empty_labels(tmp_path, run_cli):
    ct = bad_files.good_ct(tmp_path / "in")
    labels = bad_files.label_map_with_values(tmp_path / "in", (7,))
    before = _digests(tmp_path / "in")
    code, _, err = run_cli(["segment", "train", ct, "--labels", labels, "--names", "1=Lesion",
                            "-o", tmp_path / "model"])
    line = _one_error_line(code, err, "7 have no name")
    assert "1 (Lesion) have no voxels" in line
    assert not (tmp_path / "model").exists() and _digests(tmp_path / "in") == before


def test_pretrain_refuses_a_folder_of_mr(tmp_path, run_cli):
    data = bad_files.mr_folder(tmp_path / "in")
    code, _, err = run_cli(["train", "pretrain", data, "-o", tmp_path / "run", "--max-steps", "1",
                            "--resolution", "32", "--batch-size", "1", "--device", "cpu"])
    _one_error_line(code, err, "does not look like CT in Hounsfield units")
    assert not (tmp_path / "run").exists()


def test_pretraining_index_skips_mr_beside_ct(tmp_path):
    from lctfound.training.data import index_sources

    data = bad_files.mr_folder(tmp_path)
    bad_files.good_ct(data)
    index = index_sources(data)
    assert [s.path.name for s in index.sources] == ["good_ct.nii.gz"]
    assert sorted(Path(path).name for path, _ in index.skipped) == ["mr1.nii.gz", "mr2.nii.gz"]


# ---------------------------------------------------------------------------- option values (rule 6)

@pytest.mark.parametrize("case", list(bad_files.BAD_OPTIONS))
def test_bad_option_values_stop_before_any_work(tmp_path, run_cli, case):
    inputs = tmp_path / "in"
    argv, phrase = bad_files.bad_option_case(case, inputs)
    before = _digests(inputs)
    out = tmp_path / "out" / "result"
    code, _, err = run_cli(argv + ["-o", out])
    _usage_error(code, err, phrase)
    assert not (tmp_path / "out").exists()
    assert _digests(inputs) == before


def test_validators():
    from lctfound.validation import check_float, check_int, parse_slice_list

    assert check_int("7", "x", 1, 10) == 7 and check_int(np.int64(3), "x") == 3 and check_int(4.0, "x") == 4
    for value in ("0", "x", 2.5, True, None, "11"):
        with pytest.raises(LCTfoundError, match="x must be a whole number from 1 to 10"):
            check_int(value, "x", 1, 10)
    assert check_float("1e-4", "lr", above=0) == 1e-4
    for value in ("nan", "inf", float("nan"), "-1", 0):
        with pytest.raises(LCTfoundError, match="lr must be a finite number > 0"):
            check_float(value, "lr", above=0)
    assert parse_slice_list("3,5,10-12,5") == [3, 5, 10, 11, 12] and parse_slice_list(" ") is None
    for text, message in (("5-2", "runs backwards"), ("-3", "cannot read|negative"), ("a", "cannot read"),
                          ("1,,2", "cannot read")):
        with pytest.raises(LCTfoundError, match=message):
            parse_slice_list(text)
    with pytest.raises(LCTfoundError, match=r"slice 5 is outside the volume \(0..4\)"):
        parse_slice_list("2-9", 5)


def test_loop_configs_check_every_setting(tmp_path):
    from lctfound.training.loop import LoopConfig
    from lctfound.training.pretrain import PretrainConfig

    for settings, message in (({"epochs": 0}, "epochs"), ({"epochs": float("nan")}, "epochs"),
                              ({"learning_rate": -1}, "learning rate"), ({"num_workers": -1}, "num-workers"),
                              ({"warmup_steps": -5}, "warmup-steps"), ({"batch_size": 0}, "batch-size"),
                              ({"ema_decay": 1.0}, "EMA")):
        with pytest.raises(LCTfoundError, match=message):
            LoopConfig(output=str(tmp_path / "run"), **settings)
    with pytest.raises(LCTfoundError, match="resolution"):
        PretrainConfig(output=str(tmp_path / "run"), data=str(tmp_path), resolution=100_000)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------- model configs and weights (rules 6, 7)

@pytest.mark.parametrize("case", list(bad_files.BAD_UNET_CONFIGS))
def test_bad_unet_config_refused(tmp_path, run_cli, case):
    changes, phrase = bad_files.BAD_UNET_CONFIGS[case]
    folder = bad_files.unet_config_folder(tmp_path, **changes)
    code, _, err = run_cli(["model", "inspect", folder])
    _one_error_line(code, err, phrase)


def test_bad_scheduler_config_refused(tmp_path):
    import json

    import model_factory
    from lctfound.models.bundle import load_model

    folder = model_factory.save_official_layout(tmp_path / "model")
    config = folder / "scheduler" / "scheduler_config.json"
    good = json.loads(config.read_text())
    for changes, phrase in (({"beta_schedule": "bogus"}, "bogus"), ({"beta_start": 0.5, "beta_end": 2.0}, "between 0 and 1"),
                            ({"num_train_timesteps": 10 ** 9}, "num_train_timesteps")):
        config.write_text(json.dumps({**good, **changes}))
        with pytest.raises(CheckpointError, match=phrase):
            load_model(folder)
    config.write_text("{")
    with pytest.raises(CheckpointError, match="not a usable DDPM scheduler config"):
        load_model(folder)


def test_bert_pickle_is_never_loaded(tmp_path, run_cli, monkeypatch):
    import torch

    import model_factory

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    model = model_factory.save_official_layout(tmp_path / "model")
    bert = bad_files.bert_folder_with_pickle_only(tmp_path)
    before = _digests(tmp_path)
    code, _, err = run_cli(["model", "add-prompts", model, "--bert", bert])
    line = _one_error_line(code, err, "only pytorch_model.bin was found")
    assert "save_pretrained" in line and "safe_serialization=True" in line
    assert _digests(tmp_path) == before

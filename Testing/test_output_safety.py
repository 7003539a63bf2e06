"""Nothing is lost: the output-safety rules of `lctfound.atomic`, for the mechanism itself, every
command that writes, the module logic and the web export.

1. an output never resolves to an input (``..``, symlinks, hard links), with or without --overwrite;
2. an existing output needs --overwrite;
3. a write is published only when complete and verified; a full disk is one line and leaves nothing;
4. no traceback reaches a user (one ``error:`` line, exit 2; --debug shows it);
5. outputs follow the umask.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest

from bad_input_helpers import (assert_no_partial_outputs, assert_one_line_error, assert_unchanged, enospc,
                               fill_disk, read_only_mount, run_lctfound, small_tmpfs, snapshot, temporaries)
from data_factory import nodule_label, synthetic_ct
from lctfound import atomic
from lctfound.atomic import (DiskFullError, OutputError, atomic_directory, atomic_file, check_outputs, create_memmap,
                             input_conflict, remove_stale_temporaries)
from lctfound.errors import LCTfoundError
from lctfound.io.volume import read_volume, write_volume

# ---------------------------------------------------------------------------- fixtures


@pytest.fixture
def ct_file(tmp_path):
    path = tmp_path / "data" / "ct.nrrd"
    path.parent.mkdir()
    write_volume(synthetic_ct(), path)
    return path


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield
    os.umask(old)


# ---------------------------------------------------------------------------- rule 1: mechanism


def test_an_output_resolving_to_an_input_is_found_through_every_spelling(ct_file, tmp_path):
    data = ct_file.parent
    assert input_conflict(ct_file, [ct_file])
    assert input_conflict(data / ".." / "data" / "ct.nrrd", [ct_file])            # ./a/../a/ct.nrrd
    (tmp_path / "link.nrrd").symlink_to(ct_file)
    assert input_conflict(tmp_path / "link.nrrd", [ct_file])                       # symlink
    os.link(ct_file, tmp_path / "hard.nrrd")
    assert input_conflict(tmp_path / "hard.nrrd", [ct_file])                       # hard link: same inode
    assert input_conflict(data, [data])                                            # the input folder itself
    assert input_conflict(ct_file, [data])                                         # a file of an input folder
    assert input_conflict(data / "new.nrrd", [data]) is None                       # a new name there is fine
    assert input_conflict(tmp_path, [ct_file]) is None                             # writing into a parent
    assert input_conflict(tmp_path, [ct_file], replaces_folder=True)              # replacing it deletes the input
    assert input_conflict(tmp_path / "other.nrrd", [ct_file]) is None


def test_case_insensitive_names_compare_by_identity(ct_file, monkeypatch):
    # On a case-insensitive file system CT.NRRD *is* ct.nrrd: stat gives the same device and inode.
    real_stat = os.stat

    def insensitive_stat(path, *args, **kwargs):
        return real_stat(str(path).replace("CT.NRRD", "ct.nrrd"), *args, **kwargs)

    monkeypatch.setattr(atomic.os, "stat", insensitive_stat)
    monkeypatch.setattr(atomic.os.path, "lexists", lambda p: os.path.exists(str(p).replace("CT.NRRD", "ct.nrrd")))
    assert input_conflict(ct_file.with_name("CT.NRRD"), [ct_file])


def test_check_outputs_refuses_inputs_even_with_overwrite_and_existing_files_without(ct_file, tmp_path):
    with pytest.raises(OutputError, match="is the input"):
        check_outputs([ct_file], [ct_file], overwrite=True)
    existing = tmp_path / "reference_label.nrrd"
    existing.write_bytes(b"manual work")
    with pytest.raises(OutputError, match="already exists; choose a new name or pass --overwrite"):
        check_outputs([existing], [ct_file])
    assert check_outputs([existing], [ct_file], overwrite=True) == [existing]
    assert existing.read_bytes() == b"manual work"  # checking never writes


def test_check_outputs_refuses_a_folder_that_cannot_be_written(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_outputs([blocker / "out.nrrd"])
    with read_only_mount(tmp_path / "ro") as folder:
        with pytest.raises(OutputError, match="cannot write in"):
            check_outputs([folder / "sub" / "out.nrrd"])


def test_publishers_refuse_a_noted_input_of_the_running_command(ct_file, tmp_path):
    before = snapshot(ct_file)
    with atomic.command_inputs():
        read_volume(ct_file)  # readers note what they read
        with pytest.raises(OutputError, match="would replace|is the input"):
            write_volume(synthetic_ct(), ct_file)
        with pytest.raises(OutputError):
            with atomic_directory(ct_file.parent, overwrite=True):
                pass
    assert_unchanged(before)
    assert not temporaries(tmp_path)


# ---------------------------------------------------------------------------- rule 3: verified writes


def test_atomic_file_on_enospc_is_one_line_and_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "table.csv"
    target.parent.mkdir()
    target.write_text("old")
    with pytest.raises(DiskFullError, match=r"^no space left on .*out \(needs ~5 MB\)$"):
        with atomic_file(target, size_hint=5_000_000) as tmp:
            tmp.write_text("partial")
            enospc()
    assert target.read_text() == "old"
    assert not temporaries(tmp_path)


def test_atomic_file_refuses_an_empty_or_unverified_result(tmp_path):
    target = tmp_path / "x.nrrd"
    with pytest.raises(OutputError, match="empty"):
        with atomic_file(target):
            pass  # the writer wrote nothing (what SimpleITK leaves on a full disk)

    def fails(_path):
        raise ValueError("truncated")

    with pytest.raises(OutputError, match="does not read back"):
        with atomic_file(target, verify=fails) as tmp:
            tmp.write_bytes(b"1234")
    assert not target.exists() and not temporaries(tmp_path)


def test_a_library_error_that_says_disk_full_becomes_the_same_line(tmp_path):
    class SafetensorError(Exception):
        pass

    with pytest.raises(DiskFullError):
        with atomic_directory(tmp_path / "model"):
            raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                  "message: \"No space left on device\" })")
    assert not (tmp_path / "model").exists() and not temporaries(tmp_path)


def test_memmaps_reserve_their_blocks_so_a_full_disk_is_an_error_not_sigbus(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic.os, "posix_fallocate", enospc)
    with pytest.raises(DiskFullError, match="no space left"):
        create_memmap(tmp_path / "features.npy", np.float16, (100, 8, 64, 64))
    assert not (tmp_path / "features.npy").exists()


def test_memmap_on_a_real_full_tmpfs(tmp_path):
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        with pytest.raises(DiskFullError, match=r"needs ~\d+ MB"):
            create_memmap(disk / "features.npy", np.float32, (4, 64, 64, 64))  # 4 MB
        assert not list(disk.iterdir())
        array = create_memmap(disk / "small.npy", np.float32, (2, 8, 8))
        array[:] = 1
        del array


def test_write_volume_on_a_full_tmpfs_publishes_nothing(tmp_path):
    volume = synthetic_ct()
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        fill_disk(disk, leave_bytes=8_000)
        with pytest.raises(DiskFullError, match=r"^no space left on .*disk \(needs ~\d+ MB\)$"):
            write_volume(volume, disk / "seg.nrrd", compress=False)
        assert not (disk / "seg.nrrd").exists() and not temporaries(disk)


def test_stale_checkpoint_temporaries_are_removed_on_resume(tmp_path):
    from lctfound.training.loop import check_run_folder

    run = tmp_path / "run"
    complete = run / "checkpoints" / "step-0000002"
    (complete / "training").mkdir(parents=True)
    (complete / "training" / "trainer_state.json").write_text("{}")
    stale = run / "checkpoints" / ".step-0000004.ab12cd.tmp"
    (stale / "model").mkdir(parents=True)
    (stale / "model" / "big.safetensors").write_bytes(b"\0" * 1000)
    assert check_run_folder(run, resume=True)[0] == 2
    assert not stale.exists() and complete.exists()
    assert remove_stale_temporaries(run / "checkpoints") == []


# ---------------------------------------------------------------------------- rule 5: umask


def test_outputs_follow_the_umask(tmp_path, umask_027):
    with atomic_file(tmp_path / "a.json") as tmp:
        tmp.write_text("{}")
    with atomic_directory(tmp_path / "folder") as tmp:
        (tmp / "x").write_text("1")
    write_volume(synthetic_ct(), tmp_path / "v.nrrd")
    assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "v.nrrd").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750


# ---------------------------------------------------------------------------- the command line


def _table(folder: Path, ct: Path) -> Path:
    table = folder / "table.csv"
    table.write_text(f"image,label\n{ct},a\n")
    return table


# Every command that writes, with its output aimed at one of its inputs. The check runs before any
# model is loaded, so the model arguments need not exist.
OUTPUT_IS_INPUT = {
    "segment predict": ["segment", "predict", "{ct}", "--model", "{model}", "-o", "{ct}"],
    "segment predict --overwrite": ["segment", "predict", "{ct}", "--model", "{model}", "-o", "{ct}", "--overwrite"],
    "segment predict via ..": ["segment", "predict", "{ct}", "--model", "{model}", "-o", "{dotdot}"],
    "segment predict hard link": ["segment", "predict", "{ct}", "--model", "{model}", "-o", "{hard}"],
    "segment predict folder": ["segment", "predict", "{data}", "--model", "{model}", "-o", "{data}"],
    "segment train": ["segment", "train", "{ct}", "--labels", "{label}", "-o", "{data}", "--overwrite"],
    "segment distill": ["segment", "distill", "{ct}", "--teacher", "{model}", "-o", "{model}", "--overwrite"],
    "enhance simulate-low-dose": ["enhance", "simulate-low-dose", "{ct}", "--dose", "0.5", "-o", "{dotdot}",
                                  "--overwrite"],
    "enhance super-resolution": ["enhance", "super-resolution", "{ct}", "--method", "bicubic", "-o", "{ct}",
                                 "--overwrite"],
    "enhance sparse-view": ["enhance", "sparse-view", "{ct}", "--views", "30", "-o", "{ct}", "--overwrite"],
    "enhance sparse-view sinogram": ["enhance", "sparse-view", "{ct}", "--views", "30", "-o", "{tmp}/r.nrrd",
                                     "--save-sinogram", "{ct}", "--overwrite"],
    "enhance low-dose": ["enhance", "low-dose", "{ct}", "--model", "{model}", "-o", "{ct}", "--overwrite"],
    "enhance vcta": ["enhance", "vcta", "{ct}", "--model", "{model}", "-o", "{ct}", "--overwrite"],
    "enhance train-low-dose": ["enhance", "train-low-dose", "--full-dose", "{data}", "--simulate-dose", "0.5",
                               "-o", "{data}"],
    "generate": ["generate", "--model", "{model}", "-o", "{model}", "--overwrite"],
    "features": ["features", "{ct}", "-o", "{ct}", "--overwrite"],
    "classify predict": ["classify", "predict", "{table}", "--model", "{model}", "-o", "{table}"],
    "classify predict saliency": ["classify", "predict", "{ct}", "--model", "{model}", "-o", "{tmp}/r.csv",
                                  "--saliency", "{ct}"],
    "classify train": ["classify", "train", "--table", "{table}", "-o", "{data}"],
    "evaluate classification": ["evaluate", "classification", "--predictions", "{table}", "--truth", "{table}",
                                "-o", "{table}", "--overwrite"],
    "evaluate segmentation": ["evaluate", "segmentation", "--prediction", "{label}", "--reference", "{label}",
                              "-o", "{data}/../data/label.nrrd", "--overwrite"],
    "ctfm embed": ["ctfm", "embed", "{ct}", "--model", "{model}", "-o", "{ct}", "--overwrite"],
    "ctfm index": ["ctfm", "index", "{data}", "--model", "{model}", "-o", "{data}", "--overwrite"],
    "ctfm probe-predict": ["ctfm", "probe-predict", "{table}", "--probe", "{model}", "-o", "{table}", "--overwrite"],
    "ctfm seg-predict": ["ctfm", "seg-predict", "{ct}", "--decoder", "{model}", "-o", "{ct}", "--overwrite"],
    "train pretrain": ["train", "pretrain", "{data}", "-o", "{data}"],
    "train finetune": ["train", "finetune", "--task", "classification", "--table", "{table}", "-o", "{data}"],
}


@pytest.mark.parametrize("case", sorted(OUTPUT_IS_INPUT))
def test_no_command_writes_onto_its_input(case, ct_file, tmp_path, run_cli, monkeypatch):
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(tmp_path / "cache"))
    data = ct_file.parent
    write_volume(nodule_label(synthetic_ct()), data / "label.nrrd")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    os.link(ct_file, tmp_path / "hard.nrrd")
    values = {"ct": ct_file, "data": data, "label": data / "label.nrrd", "model": model,
              "dotdot": f"{data}/../data/ct.nrrd", "hard": tmp_path / "hard.nrrd", "table": _table(data, ct_file),
              "tmp": tmp_path}
    args = [part.format(**values) for part in OUTPUT_IS_INPUT[case]]
    before = snapshot(data, model)
    code, out, err = run_cli(args)
    line = assert_one_line_error(code, err)
    assert "input" in line, line
    assert_unchanged(before)
    assert not temporaries(tmp_path)


def test_segment_predict_refuses_an_existing_label_map_without_overwrite(ct_file, tmp_path, run_cli):
    reference = tmp_path / "manual_reference.nrrd"
    write_volume(nodule_label(synthetic_ct()), reference)
    before = snapshot(reference, ct_file)
    code, _, err = run_cli(["segment", "predict", ct_file, "--model", tmp_path / "no-model", "-o", reference])
    assert_one_line_error(code, err, contains="already exists; choose a new name or pass --overwrite")
    assert_unchanged(before)


@pytest.mark.parametrize("command", [
    ["features", "{ct}", "-o", "{out}"],
    ["enhance", "simulate-low-dose", "{ct}", "--dose", "0.5", "-o", "{out}.nrrd"],
    ["generate", "--model", "{tmp}/no-model", "-o", "{out}.png"],
    ["evaluate", "segmentation", "--prediction", "{ct}", "--reference", "{ct}", "-o", "{out}.json"],
    ["segment", "predict", "{ct}", "--model", "{tmp}/no-model", "-o", "{out}.nii.gz"],
])
def test_existing_outputs_need_overwrite(command, ct_file, tmp_path, run_cli):
    out = tmp_path / "existing"
    args = [part.format(ct=ct_file, out=out, tmp=tmp_path) for part in command]
    target = Path(args[args.index("-o") + 1])
    target.write_bytes(b"precious")
    code, _, err = run_cli(args)
    assert_one_line_error(code, err, contains="already exists")
    assert target.read_bytes() == b"precious"


def test_read_only_output_folder_is_refused_before_any_work(ct_file, tmp_path, run_cli):
    with read_only_mount(tmp_path / "ro") as folder:
        for args in (["enhance", "simulate-low-dose", ct_file, "--dose", "0.5", "-o", folder / "low.nrrd"],
                     ["segment", "predict", ct_file, "--model", tmp_path / "no-model", "-o", folder / "s.nii.gz"],
                     ["train", "pretrain", ct_file.parent, "-o", folder / "run", "--max-steps", "1"]):
            code, _, err = run_cli(args)
            assert_one_line_error(code, err, contains="Read-only file system")


def test_enhance_on_a_full_disk_is_one_line_and_publishes_nothing(ct_file, tmp_path, run_cli):
    before = snapshot(ct_file)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        filler = fill_disk(disk, leave_bytes=20_000)
        code, out, err = run_cli(["enhance", "simulate-low-dose", ct_file, "--dose", "0.5", "--views", "30",
                                  "-o", disk / "low.nrrd"])
        assert_one_line_error(code, err, contains="no space left on")
        assert_no_partial_outputs(disk, allowed=[filler])
    assert_unchanged(before)


# ---------------------------------------------------------------------------- no traceback


def test_cache_dir_that_is_a_file_is_one_line(tmp_path, run_cli, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(blocker))
    code, _, err = run_cli(["model", "list"])
    assert_one_line_error(code, err, contains="LCTFOUND_CACHE_DIR")


@pytest.mark.parametrize("exception, exit_code, text", [
    (KeyboardInterrupt(), 130, "interrupted"),
    (MemoryError(), 2, "out of memory"),
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.nrrd"), 2, "no space left on /data"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), 2, "permission denied"),
    (RuntimeError("a bug\nwith two lines"), 2, "internal error"),
    (BrokenPipeError(errno.EPIPE, "Broken pipe"), 2, "pipe"),
])
def test_every_exception_is_one_line_and_debug_shows_the_traceback(exception, exit_code, text, run_cli,
                                                                    monkeypatch):
    from lctfound.cli import doctor

    def boom(_args):
        raise exception

    monkeypatch.setattr(doctor, "run", boom)
    monkeypatch.setattr(atomic, "command_inputs", atomic.command_inputs)
    code, _, err = run_cli(["doctor"])
    assert_one_line_error(code, err, exit_code=exit_code, contains=text)
    for args, env in ((["doctor", "--debug"], None), (["--debug", "doctor"], None), (["doctor"], "1")):
        if env:
            monkeypatch.setenv("LCTFOUND_DEBUG", env)
        with pytest.raises(type(exception)):
            import lctfound.cli as cli

            cli.main(args)
        monkeypatch.delenv("LCTFOUND_DEBUG", raising=False)


def test_usage_errors_are_one_line(run_cli):
    code, _, err = run_cli(["segment", "predict"])
    assert_one_line_error(code, err, contains="required")


@pytest.mark.slow
def test_data_info_into_a_closed_pipe_has_no_traceback(ct_file):
    # 200 lines of JSON into `head -1`: the pipe closes while lctfound still writes.
    result = run_lctfound(["data", "info", ct_file, "--json", "--label"], shell_suffix="| head -c 10")
    assert "Traceback" not in result.stderr
    assert result.returncode in (0, 2), result.stderr


# ---------------------------------------------------------------------------- logic and web


def test_logic_run_folder_in_a_read_only_place_is_one_line(tmp_path):
    from lctfound.logic.base import ModuleLogicBase

    with read_only_mount(tmp_path / "ro") as folder:
        logic = ModuleLogicBase.__new__(ModuleLogicBase)
        logic._runs_root = folder / "runs"
        with pytest.raises(LCTfoundError, match="cannot write in"):
            logic.new_run_folder("segment")


def test_web_export_on_a_full_disk_leaves_no_partial_file(tmp_path):
    pytest.importorskip("slicer", reason="needs the slicer-core wheel")
    from lctfound import mrml
    from lctfound.web.export import export

    ct = tmp_path / "ct.nrrd"
    write_volume(synthetic_ct(), ct)
    node = mrml.load_volume(mrml.new_headless_scene(), ct)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        filler = fill_disk(disk, leave_bytes=4_000)
        with pytest.raises(LCTfoundError, match="no space left on"):
            export("volume_nrrd", node, None, disk)
        assert_no_partial_outputs(disk, allowed=[filler])


# ---------------------------------------------------------------------------- commands with a tiny model


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory):
    from lctfound.models import save_model
    from model_factory import tiny_model

    folder = tmp_path_factory.mktemp("backbone") / "tiny"
    save_model(tiny_model(64, seed=1), folder)
    return folder


def test_features_on_a_full_disk_is_one_line_not_sigbus(ct_file, tiny_backbone, tmp_path, run_cli):
    # The features are a memory map: without reserved blocks, filling it on a full disk is SIGBUS.
    before = snapshot(ct_file, tiny_backbone)
    with small_tmpfs(tmp_path / "disk", "2m") as disk:
        code, _, err = run_cli(["features", ct_file, "--model", tiny_backbone, "--device", "cpu",
                                "--timesteps", "0", "--blocks", "1", "-o", disk / "features"])
        assert_one_line_error(code, err, contains="no space left on")
        assert_no_partial_outputs(disk)
    assert_unchanged(before)


class ThresholdSegmenter:
    """A stand-in segmentation predictor (the batch bookkeeping is under test, not a model)."""

    label_names = {1: "Dense"}

    def predict(self, array, progress=None, postprocess=(), slices=None, annotation=None):
        return (array > 0).astype(np.uint8)

    def annotation_for(self, array):
        return None


def test_a_batch_rerun_redoes_empty_or_unreadable_outputs(tmp_path, run_cli, monkeypatch):
    from lctfound.pipelines import predictors

    monkeypatch.setattr(predictors, "load_segmentation_predictor", lambda *args: ThresholdSegmenter())
    ct = synthetic_ct()
    batch = tmp_path / "batch"
    batch.mkdir()
    for name in ("a", "b", "c"):
        write_volume(ct, batch / f"{name}.nrrd")
    before = snapshot(batch)
    out = tmp_path / "out"
    command = ["segment", "predict", batch, "--model", tmp_path / "m", "-o", out]
    code, _, err = run_cli(command)
    assert code == 0, err
    kept = (out / "a_seg.nii.gz").stat().st_mtime_ns
    (out / "b_seg.nii.gz").write_bytes(b"")                                        # a full disk's 0-byte file
    (out / "c_seg.nii.gz").write_bytes((out / "c_seg.nii.gz").read_bytes()[:40])   # a killed write
    code, _, err = run_cli(command)
    assert code == 0, err
    assert (out / "a_seg.nii.gz").stat().st_mtime_ns == kept                       # complete: skipped
    for name in ("b", "c"):                                                         # redone, readable
        assert read_volume(out / f"{name}_seg.nii.gz", labels=True).shape == ct.shape
    # Results in a sub-folder of the input folder are fine, and a re-run there too.
    for _ in range(2):
        code, _, err = run_cli(["segment", "predict", batch, "--model", tmp_path / "m", "-o", batch / "seg"])
        assert code == 0, err
    # An existing label map the batch did not make is not replaced without --overwrite.
    other = tmp_path / "other"
    other.mkdir()
    (other / "a_seg.nii.gz").write_bytes(b"manual")
    code, out_text, err = run_cli(["segment", "predict", batch, "--model", tmp_path / "m", "-o", other])
    assert code == 1 and (other / "a_seg.nii.gz").read_bytes() == b"manual"
    assert_unchanged(before)
    assert not temporaries(tmp_path)


def test_an_interrupt_during_a_write_leaves_the_old_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and not temporaries(tmp_path)


def test_free_text_arguments_are_not_taken_for_paths():
    from lctfound.cli import given_paths

    assert given_paths("x" * 5000, "a\0b", ["lung", None]) == []


def test_sub_command_names_and_choices_are_not_taken_for_input_paths(tmp_path, monkeypatch):
    """A run folder holding ``pretrain/`` (the Train panel resumes from inside it): the word of the
    sub-command, and words of options with fixed choices, are not inputs the output would overwrite."""
    import lctfound.cli as cli

    for word in ("pretrain", "train", "mediastinal"):
        (tmp_path / word).mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    parser = cli.build_parser()
    args = parser.parse_args(["train", "pretrain", "data", "-o", "pretrain", "--resume"])
    setattr(args, cli.WORD_ARGUMENTS_ATTRIBUTE, cli.word_arguments(parser))
    assert [path.name for path in cli.argument_inputs(args)] == ["data"]
    cli.refuse_outputs_onto_inputs(args)  # no error: "pretrain" is the command, not an input

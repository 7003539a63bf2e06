"""The bad-input corpus (issue 12, "Tests"): bad volumes, DICOM folders, label maps, models,
options, outputs that are inputs or exist, broken environments, full disks, interrupts and kills,
against the command line (in-process), the module logics and the web front end.

Each case asserts exit code 2 (130 for an interrupt), one ``error:`` line on stderr, no
traceback, every input byte-identical and no partial output (see `corpus.Outcome.check`); the
session prints the corpus's totals. Grow it with every bug: add a `Case` to the factory below.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import bad_files
from bad_input_helpers import fill_disk, small_tmpfs
import data_factory
from corpus import TOTALS, Case, Expect, Outcome, WorkStarted, compare, fill, install_tripwire, snapshot
from lctfound.io.volume import write_volume

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------
# Shared inputs: a tiny backbone and a few-shot segmentation model trained on it (built once)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def corpus_models(tmp_path_factory):
    from lctfound.models import load_model, save_model
    from lctfound.pipelines.segmentation import UNLABELLED, FewShotConfig, FewShotSegmenter
    from model_factory import tiny_model

    folder = tmp_path_factory.mktemp("corpus-models")
    # The smallest useful models (32² backbone, one timestep): a case that does run costs seconds.
    backbone = save_model(tiny_model(32, seed=1), folder / "backbone")
    volume, lesion, _ = data_factory.fewshot_phantom(2, 32, 0)
    labels = np.full(volume.shape, UNLABELLED, dtype=np.int16)
    labels[0] = lesion[0]
    config = FewShotConfig(timesteps=(0,), resolution=16, epochs=1, min_steps=2)
    segmenter = FewShotSegmenter(load_model(backbone), {1: "Lesion"}, config)
    segmenter.fit(volume, labels, cache_root=folder / "cache")
    segmenter.save(folder / "fewshot")
    shutil.rmtree(folder / "cache")
    return {"backbone": backbone, "segmodel": folder / "fewshot"}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """One torch thread: the corpus runs many tiny commands, often beside other work."""


@pytest.fixture(scope="session", autouse=True)
def corpus_totals(request):
    """The totals are printed after pytest's own summary (and written to $LCTFOUND_CORPUS_REPORT)."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")

    def report() -> None:
        if TOTALS.cases:
            if reporter is not None:
                reporter.write_line(TOTALS.line())
            TOTALS.write()

    request.config.add_cleanup(report)
    return TOTALS


def run_case(case: Case, tmp_path: Path, run_cli, monkeypatch, models: dict, extra: dict | None = None) -> Outcome:
    inputs, outdir, cache = tmp_path / "in", tmp_path / "out", tmp_path / "cache"
    inputs.mkdir()
    outdir.mkdir()
    values = {"in": inputs, "outdir": outdir, "out": outdir / "result", "cache": cache, **models, **(extra or {})}
    values.update(case.setup(inputs, values) or {})
    monkeypatch.setenv("LCTFOUND_CACHE_DIR", str(cache))
    for name, value in case.expect.env:
        monkeypatch.setenv(name, fill(value, values))
    watched = (inputs, outdir, *[Path(v) for k, v in (extra or {}).items() if k.startswith("full")])
    model_folders = tuple(Path(p) for p in models.values())
    before = snapshot(*watched, *model_folders)
    if case.expect.tripwire:
        install_tripwire(monkeypatch)
    try:
        argv = [part for arg in case.argv
                for part in (values["argv"] if arg == "{argv}" else [fill(arg, values)])]
        code, out, err = run_cli(argv)
    except WorkStarted:
        code, out, err = 0, "", "(stopped by the corpus: the command started work on this input)\n"
    after = snapshot(*watched, *model_folders)
    changed, created = compare(before, after, watched)
    outcome = Outcome(code, out, err, changed, created)
    TOTALS.record(case.name, outcome.category(case.expect.code))
    return outcome


def as_params(cases: list[Case]) -> list:
    params = []
    for case in cases:
        marks = []
        if case.expect.missing_fix:
            marks.append(pytest.mark.xfail(strict=True, reason=case.expect.missing_fix))
        if case.expect.slow:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


# --------------------------------------------------------------------------------------------
# The factory
# --------------------------------------------------------------------------------------------


def _with(builder, key: str = "vol", **kwargs):
    def setup(inputs: Path, values: dict) -> dict:
        return {key: builder(inputs, **kwargs)}

    return setup


def _good(inputs: Path, values: dict) -> dict:
    """A good CT and a label map on its grid (value 1 on slices 1–4)."""
    return {"ct": bad_files.good_ct(inputs), "label": bad_files.label_map_with_values(inputs, (1,), "label.nrrd")}


def _and(*setups):
    def setup(inputs: Path, values: dict) -> dict:
        found: dict = {}
        for one in setups:
            found.update(one(inputs, {**values, **found}) or {})
        return found

    return setup


#: Commands that read a CT, with ``{vol}`` the volume and ``{out}`` a new output.
CT_COMMANDS = {
    "data-info": ("data", "info", "{vol}"),
    "features": ("features", "{vol}", "--model", "{backbone}", "--timesteps", "0", "-o", "{out}"),
    "segment-predict": ("segment", "predict", "{vol}", "--model", "{segmodel}", "-o", "{out}.nrrd"),
    "simulate-low-dose": ("enhance", "simulate-low-dose", "{vol}", "--dose", "0.25", "-o", "{out}.nrrd"),
    "super-resolution": ("enhance", "super-resolution", "{vol}", "--method", "bicubic", "--factor", "2",
                         "-o", "{out}.nrrd"),
}


def volume_cases() -> list[Case]:
    """Every bad volume / DICOM folder of `bad_files.BAD_VOLUMES` against every CT-reading command."""
    cases = []
    for volume_name, (builder, phrase) in bad_files.BAD_VOLUMES.items():
        for command, argv in CT_COMMANDS.items():
            cases.append(Case(f"{command}-{volume_name}", _with(builder), argv, Expect(phrase=phrase)))
    extra = {
        "text-file": (lambda inputs: data_factory.write_text_file(inputs / "notes.nii.gz"), None),
        "empty-file": (lambda inputs: _empty(inputs / "empty.nrrd"), None),
        "missing-file": (lambda inputs: inputs / "missing.nrrd", "missing.nrrd"),
        "empty-folder": (lambda inputs: _mkdir(inputs / "nothing"), None),
        "mr-volume": (bad_files.mr_volume, None),
    }
    for volume_name, (builder, phrase) in extra.items():
        for command in ("segment-predict", "simulate-low-dose", "features"):
            if volume_name == "mr-volume" and command == "simulate-low-dose":
                continue  # simulating a low dose of any image is allowed; reading it as CT is checked below
            cases.append(Case(f"{command}-{volume_name}", _with(builder), CT_COMMANDS[command],
                              Expect(phrase=phrase)))
    return cases


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _mkdir_all(path: Path) -> Path:
    """An existing cache root (its folders are the cache's, not a command's output)."""
    path.mkdir(parents=True, exist_ok=True)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def label_cases() -> list[Case]:
    cases = []
    for name, (builder, phrase) in bad_files.LABEL_MAP_CASES.items():
        setup = _and(_good, _with(builder, "bad"))
        cases.append(Case(f"evaluate-prediction-{name}", setup,
                          ("evaluate", "segmentation", "--prediction", "{bad}", "--reference", "{label}",
                           "--names", "1=Lesion", "-o", "{out}.csv"), Expect(phrase=phrase)))
        cases.append(Case(f"segment-train-labels-{name}", setup,
                          ("segment", "train", "{ct}", "--labels", "{bad}", "--names", "1=Lesion", "--backbone",
                           "{backbone}", "--epochs", "1", "-o", "{out}"), Expect(phrase=phrase)))
    seven = _and(_good, _with(bad_files.label_map_with_values, "bad", values=(1, 7)))
    cases.append(Case("segment-train-unnamed-label-value", seven,
                      ("segment", "train", "{ct}", "--labels", "{bad}", "--names", "1=Lesion", "--backbone",
                       "{backbone}", "--epochs", "1", "-o", "{out}"), Expect(phrase="7")))
    cases.append(Case("segment-train-name-without-voxels", _good,
                      ("segment", "train", "{ct}", "--labels", "{label}", "--names", "1=Lesion,2=Nodule",
                       "--backbone", "{backbone}", "--epochs", "1", "-o", "{out}"), Expect(phrase="2")))
    cases.append(Case("segment-train-label-on-another-grid", _and(_good, _with(_small_label, "bad")),
                      ("segment", "train", "{ct}", "--labels", "{bad}", "--backbone", "{backbone}", "-o", "{out}"),
                      Expect(phrase="small_label.nrrd")))
    cases.append(Case("segment-train-empty-label", _and(_good, _with(_empty_label, "bad")),
                      ("segment", "train", "{ct}", "--labels", "{bad}", "--backbone", "{backbone}", "-o", "{out}"),
                      Expect(phrase="no labelled slice")))
    return cases


def _small_label(inputs: Path) -> Path:
    from lctfound.io.volume import CTVolume

    return write_volume(CTVolume(np.zeros((4, 8, 8), np.uint8)), inputs / "small_label.nrrd")


def _empty_label(inputs: Path) -> Path:
    ct = data_factory.synthetic_ct(shape=(6, 16, 20))
    return write_volume(ct.with_array(np.zeros(ct.shape, np.uint8)), inputs / "empty_label.nrrd")


# Outputs that are inputs (rule 1) or exist (rule 2)

def _link_to_ct(kind: str):
    def setup(inputs: Path, values: dict) -> dict:
        found = _good(inputs, values)
        target = values["outdir"] / "alias.nii.gz"
        (os.symlink if kind == "symlink" else os.link)(found["ct"], target)
        return {**found, "alias": target}

    return setup


def _existing_output(inputs: Path, values: dict) -> dict:
    found = _good(inputs, values)
    reference = write_volume(data_factory.nodule_label(data_factory.synthetic_ct(shape=(6, 16, 20))),
                             values["outdir"] / "reference_label.nrrd")
    folder = values["outdir"] / "existing"
    folder.mkdir()
    (folder / "keep.txt").write_text("earlier results\n")
    return {**found, "existing": reference, "existing_folder": folder}


OUTPUT_COMMANDS = {
    "segment-predict": ("segment", "predict", "{ct}", "--model", "{segmodel}"),
    "simulate-low-dose": ("enhance", "simulate-low-dose", "{ct}", "--dose", "0.25"),
    "super-resolution": ("enhance", "super-resolution", "{ct}", "--method", "bicubic", "--factor", "2"),
}


def output_cases() -> list[Case]:
    cases = []
    for command, argv in OUTPUT_COMMANDS.items():
        for overwrite in ((), ("--overwrite",)):
            flag = "-overwrite" if overwrite else ""
            for how, setup, target in (("same-path", _good, "{ct}"),
                                       ("dotdot-path", _good, "{in}/../in/good_ct.nii.gz"),
                                       ("symlink", _link_to_ct("symlink"), "{alias}"),
                                       ("hard-link", _link_to_ct("hardlink"), "{alias}")):
                cases.append(Case(f"{command}{flag}-output-is-input-{how}", setup,
                                  (*argv, "-o", target, *overwrite), Expect(phrase="input", tripwire=False)))
        cases.append(Case(f"{command}-existing-output-without-overwrite", _existing_output,
                          (*argv, "-o", "{existing}"), Expect(phrase="exists", tripwire=False)))
    cases.append(Case("features-existing-folder-without-overwrite", _existing_output,
                      ("features", "{ct}", "--model", "{backbone}", "-o", "{existing_folder}"),
                      Expect(phrase="exists")))
    cases.append(Case("generate-existing-folder-without-overwrite", _existing_output,
                      ("generate", "--model", "{backbone}", "--num-images", "1", "--steps", "2",
                       "-o", "{existing_folder}"), Expect(phrase="exists")))
    cases.append(Case("segment-train-output-is-input-folder", _existing_output,
                      ("segment", "train", "{ct}", "--labels", "{label}", "--backbone", "{backbone}",
                       "--epochs", "1", "-o", "{in}"), Expect(phrase="input")))
    return cases


# Options (rule 6): refused before any work, leaving no folder behind

def option_cases() -> list[Case]:
    cases = []
    train = ("segment", "train", "{ct}", "--labels", "{label}", "--names", "1=Lesion", "--backbone", "{backbone}",
             "-o", "{out}")
    # (More option values in `bad_files.BAD_OPTIONS`, run by `registry_cases`.)
    for epochs in ("-1", "nan", "many"):
        cases.append(Case(f"segment-train-epochs-{epochs}", _good, (*train, "--epochs", epochs)))
    cases.append(Case("segment-train-slices-reversed", _good, (*train, "--slices", "4-1")))
    cases.append(Case("segment-train-bad-window", _good, (*train, "--window", "bone-marrow")))
    features = ("features", "{ct}", "--model", "{backbone}", "-o", "{out}")
    for name, extra in (("slices-out-of-range", ("--slices", "999")),
                        ("slices-text", ("--slices", "all-of-them")), ("timesteps-text", ("--timesteps", "a,b")),
                        ("timesteps-negative", ("--timesteps", "-5")), ("window-unknown", ("--window", "sparkle")),
                        ("blocks-unknown", ("--blocks", "9")), ("resolution-zero", ("--resolution", "0")),
                        ("batch-size-zero", ("--batch-size", "0"))):
        cases.append(Case(f"features-{name}", _good, (*features, *extra)))
    low_dose = ("enhance", "simulate-low-dose", "{ct}", "-o", "{out}.nrrd")
    for dose in ("-1", "5", "inf"):
        cases.append(Case(f"simulate-low-dose-dose-{dose}", _good, (*low_dose, "--dose", dose)))
    cases.append(Case("simulate-low-dose-slices-reversed", _good, (*low_dose, "--dose", "0.25", "--slices", "5-2")))
    cases.append(Case("simulate-low-dose-photons-negative", _good, (*low_dose, "--dose", "0.25", "--photons", "-10")))
    sr = ("enhance", "super-resolution", "{ct}", "-o", "{out}.nrrd")
    for name, extra in (("factor-0", ("--factor", "0")), ("factor-3", ("--factor", "3")),
                        ("factor-negative", ("--factor", "-2")), ("method-unknown", ("--method", "magic")),
                        ("steps-0", ("--model", "{backbone}", "--steps", "0")),
                        ("steps-huge", ("--model", "{backbone}", "--steps", "100000")),
                        ("axis-unknown", ("--axis", "diagonal")),
                        ("slices-reversed", ("--method", "bicubic", "--factor", "2", "--slices", "5-2"))):
        cases.append(Case(f"super-resolution-{name}", _good, (*sr, *extra)))
    generate = ("generate", "--model", "{backbone}", "-o", "{out}")
    for name, extra in (("size-zero", ("--size", "0")), ("steps-zero", ("--steps", "0")),
                        ("steps-negative", ("--steps", "-3")),
                        ("num-images-negative", ("--num-images", "-1")), ("batch-size-zero", ("--batch-size", "0")),
                        ("window-unknown", ("--window", "sparkle")), ("spacing-negative", ("--spacing", "-1"))):
        cases.append(Case(f"generate-{name}", lambda inputs, values: {}, (*generate, *extra)))
    pretrain = ("train", "pretrain", "{data}", "--preset", "cpu-tiny", "--resolution", "32", "--max-steps", "1",
                "-o", "{out}")
    for name, extra in (("ema-above-one", ("--ema", "1.5")), ("resolution-zero", ("--resolution", "0")),
                        ("checkpoint-every-zero", ("--checkpoint-every", "0")),
                        ("preset-unknown", ("--preset", "giant")), ("windows-unknown", ("--windows", "sparkle"))):
        cases.append(Case(f"train-pretrain-{name}", _ct_folder, (*pretrain, *extra)))
    cases.append(Case("train-pretrain-mr-folder", _with(bad_files.mr_folder, "data"), pretrain))
    cases.append(Case("train-pretrain-empty-folder", _with(lambda inputs: _mkdir(inputs / "none"), "data"), pretrain))
    return cases


def _ct_folder(inputs: Path, values: dict) -> dict:
    folder = inputs / "cts"
    folder.mkdir()
    for seed in (0, 1):
        write_volume(data_factory.synthetic_ct(shape=(6, 16, 20), seed=seed), folder / f"ct{seed}.nii.gz")
    return {"data": folder}


# Models and weights (rule 7 and the strict loader)

def _copy_backbone(inputs: Path, values: dict) -> Path:
    return Path(shutil.copytree(values["backbone"], inputs / "model"))


def _damaged_weights(how: str):
    def setup(inputs: Path, values: dict) -> dict:
        model = _copy_backbone(inputs, values)
        weights = next(model.rglob("*.safetensors"))
        data = weights.read_bytes()
        weights.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "zeros": bytes(len(data)),
                             "pickle": b"\x80\x04\x95" + data[3:64]}[how])
        return {"model": model}

    return setup


def _pickle_bert(inputs: Path, values: dict) -> dict:
    from model_factory import save_official_layout

    return {"model": save_official_layout(inputs / "official", sample_size=32),
            "bert": bad_files.bert_folder_with_pickle_only(inputs)}


def model_cases() -> list[Case]:
    cases = [Case("model-add-prompts-pickle-bert", _pickle_bert,
                  ("model", "add-prompts", "{model}", "--bert", "{bert}"), Expect(phrase="pytorch_model.bin"))]
    for how in ("truncated", "empty", "zeros", "pickle"):
        cases.append(Case(f"model-inspect-weights-{how}", _damaged_weights(how), ("model", "inspect", "{model}")))
        cases.append(Case(f"features-model-weights-{how}", _and(_good, _damaged_weights(how)),
                          ("features", "{ct}", "--model", "{model}", "-o", "{out}")))
    for name, changes in (("negative-channels", {"block_out_channels": [-16, 32, 64, 128]}),
                          ("sample-size-zero", {"sample_size": 0})):
        setup = _with(bad_files.unet_config_folder, "model", **changes)
        cases.append(Case(f"model-inspect-config-{name}", setup, ("model", "inspect", "{model}")))
    cases.append(Case("model-inspect-missing-folder", lambda inputs, values: {},
                      ("model", "inspect", "{in}/no-such-model"), Expect(phrase="no-such-model")))
    cases.append(Case("model-inspect-a-ct-file", _good, ("model", "inspect", "{ct}")))
    cases.append(Case("segment-predict-model-is-a-ct", _good,
                      ("segment", "predict", "{ct}", "--model", "{ct}", "-o", "{out}.nrrd")))
    cases.append(Case("segment-predict-model-is-a-backbone", _good,
                      ("segment", "predict", "{ct}", "--model", "{backbone}", "-o", "{out}.nrrd")))
    cases.append(Case("segment-predict-model-empty-folder", _and(_good, _with(lambda i: _mkdir(i / "m"), "m")),
                      ("segment", "predict", "{ct}", "--model", "{m}", "-o", "{out}.nrrd")))
    return cases


# Environment (rule 10 and the feature cache, rule 9)

def _cache_is_a_file(inputs: Path, values: dict) -> dict:
    found = _good(inputs, values)
    blocker = inputs / "cache-file"
    blocker.write_text("not a folder\n")
    return {**found, "blocker": blocker}


def environment_cases() -> list[Case]:
    predict = ("segment", "predict", "{ct}", "--model", "{segmodel}", "-o", "{out}.nrrd")
    return [
        Case("segment-predict-cache-dir-is-a-file", _cache_is_a_file, predict,
             Expect(phrase="is a file", env=(("LCTFOUND_CACHE_DIR", "{blocker}"),))),
        Case("model-list-cache-dir-is-a-file", _cache_is_a_file,
             ("model", "list"), Expect(phrase="is a file", env=(("LCTFOUND_CACHE_DIR", "{blocker}"),))),
        Case("data-fetch-sample-cache-dir-is-a-file", _cache_is_a_file,
             ("data", "fetch-sample"), Expect(phrase="is a file", env=(("LCTFOUND_CACHE_DIR", "{blocker}"),))),
        # Training stores the labelled slices' features in the cache (prediction streams and keeps none).
        Case("segment-train-cache-limit-unreadable", _good,
             ("segment", "train", "{ct}", "--labels", "{label}", "--names", "1=Lesion", "--backbone", "{backbone}",
              "--epochs", "1", "-o", "{out}"),
             Expect(phrase="LCTFOUND_FEATURE_CACHE_LIMIT", env=(("LCTFOUND_FEATURE_CACHE_LIMIT", "lots"),))),
        Case("segment-predict-output-folder-missing-parent", _good,
             ("segment", "predict", "{ct}", "--model", "{segmodel}", "-o", "{ct}/inside/out.nrrd")),
        Case("data-info-series-uid-unknown", _with(lambda i: data_factory.write_dicom_series(
             data_factory.synthetic_ct(shape=(4, 16, 20)), i / "dicom")[0].parent, "vol"),
             ("data", "info", "{vol}", "--series-uid", "1.2.3.4"), Expect(phrase="1.2.3.4")),
    ]


def registry_cases() -> list[Case]:
    """`bad_files.BAD_OPTIONS` (options refused while parsing) and `bad_files.BAD_UNET_CONFIGS`."""
    cases = []
    for name, (argv, phrase) in bad_files.BAD_OPTIONS.items():
        def setup(inputs: Path, values: dict, name=name) -> dict:
            return {"argv": bad_files.bad_option_case(name, inputs / "option")[0]}

        cases.append(Case("option-" + name.replace(" ", "-"), setup, ("{argv}",), Expect(phrase=phrase)))
    for name, (changes, phrase) in bad_files.BAD_UNET_CONFIGS.items():
        cases.append(Case("unet-config-" + name.replace(" ", "-"),
                          _with(bad_files.unet_config_folder, "model", **changes),
                          ("model", "inspect", "{model}"), Expect(phrase=phrase)))
    return cases


CLI_CASES = (volume_cases() + label_cases() + output_cases() + option_cases() + model_cases() + environment_cases()
             + registry_cases())

# Cases whose fix was not in this branch when the corpus was last run; each names what is missing.
MISSING_FIXES: dict[str, str] = {
    "train-logic-table-row-mr": "Train logic: table rows are checked by their headers only; telling an MR scan from "
                                "a CT needs the voxels, which only the training job reads",
}


def _mark_missing(cases: list[Case]) -> list[Case]:
    return [Case(c.name, c.setup, c.argv, Expect(c.expect.code, c.expect.phrase, c.expect.env,
                                                 MISSING_FIXES[c.name], c.expect.slow))
            if c.name in MISSING_FIXES else c for c in cases]


@pytest.mark.parametrize("case", as_params(_mark_missing(CLI_CASES)))
def test_cli_refuses_bad_input_in_one_line(case, tmp_path, run_cli, monkeypatch, corpus_models):
    run_case(case, tmp_path, run_cli, monkeypatch, corpus_models).check(case.expect)


def test_the_corpus_is_large_and_names_are_unique():
    names = [case.name for case in CLI_CASES]
    assert len(names) == len(set(names))
    assert len(names) >= 150


# --------------------------------------------------------------------------------------------
# Full disks (a small tmpfs; needs root to mount, skipped otherwise)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path):
    """A 512 KB tmpfs with an empty folder ``space``, then filled up: every write on it fails."""
    with small_tmpfs(tmp_path / "full", "512k") as mount:
        (mount / "space").mkdir()
        fill_disk(mount)
        yield mount


DISK_FULL_CASES = [
    Case("disk-full-segment-predict", _good,
         ("segment", "predict", "{ct}", "--model", "{segmodel}", "-o", "{full}/space/pred.nrrd"),
         Expect(phrase="no space left", tripwire=False)),
    Case("disk-full-simulate-low-dose", _good,
         ("enhance", "simulate-low-dose", "{ct}", "--dose", "0.25", "-o", "{full}/space/low.nrrd"),
         Expect(phrase="no space left", tripwire=False)),
    Case("disk-full-super-resolution", _good,
         ("enhance", "super-resolution", "{ct}", "--method", "bicubic", "--factor", "2", "-o",
          "{full}/space/sr.nrrd"), Expect(phrase="no space left", tripwire=False)),
    Case("disk-full-features", _good, ("features", "{ct}", "--model", "{backbone}", "-o", "{full}/space/feat"),
         Expect(phrase="no space left", tripwire=False)),
    Case("disk-full-generate", lambda inputs, values: {},
         ("generate", "--model", "{backbone}", "--num-images", "1", "--steps", "2", "-o", "{full}/space/gen"),
         Expect(phrase="no space left", tripwire=False)),
    Case("disk-full-feature-cache", _and(_good, lambda inputs, values: {
         "cache_folder": _mkdir_all(values["full"] / "space" / "cache" / "features")}),
         ("segment", "train", "{ct}", "--labels", "{label}", "--names", "1=Lesion", "--backbone", "{backbone}",
          "--epochs", "1", "-o", "{out}"),
         Expect(phrase="no space left", tripwire=False, env=(("LCTFOUND_CACHE_DIR", "{full}/space/cache"),))),
]


@pytest.mark.parametrize("case", as_params(DISK_FULL_CASES))
def test_full_disk_is_one_line_and_leaves_nothing(case, tmp_path, run_cli, monkeypatch, corpus_models, full_disk):
    run_case(case, tmp_path, run_cli, monkeypatch, corpus_models, {"full": full_disk}).check(case.expect)


# --------------------------------------------------------------------------------------------
# Interrupts and kills (child processes; the signal is sent once the job reports progress)
# --------------------------------------------------------------------------------------------


def _spawn(argv: list[str], env: dict) -> subprocess.Popen:
    from server_helpers import interruptible

    return subprocess.Popen([sys.executable, "-m", "lctfound", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO, preexec_fn=interruptible)


def _wait_for_progress(process: subprocess.Popen, events: int = 2) -> None:
    seen = 0
    for line in process.stdout:
        if line.startswith("{") and '"progress"' in line:
            seen += 1
            if seen >= events:
                return
    raise AssertionError(f"the job ended before reporting progress: {process.stderr.read()}")


INTERRUPTS = {
    "generate": lambda v: ["generate", "--model", str(v["backbone"]), "--num-images", "2", "--steps", "200",
                           "--events", "-o", str(v["out"])],
    "segment-predict": lambda v: ["segment", "predict", str(v["bigct"]), "--model", str(v["segmodel"]), "--events",
                                  "-o", f"{v['out']}.nrrd"],
    "super-resolution": lambda v: ["enhance", "super-resolution", str(v["ct"]), "--model", str(v["backbone"]),
                                   "--steps", "200", "--factor", "2", "--events", "-o", f"{v['out']}.nrrd"],
}


@pytest.mark.slow
@pytest.mark.parametrize("how", ["interrupt", "kill"])
@pytest.mark.parametrize("command", sorted(INTERRUPTS))
def test_interrupts_and_kills_publish_nothing(command, how, tmp_path, corpus_models):
    inputs, outdir = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    outdir.mkdir()
    values = {**corpus_models, "out": outdir / "result", **_good(inputs, {}),
              "bigct": write_volume(data_factory.synthetic_ct(shape=(40, 32, 32)), inputs / "big.nrrd")}
    env = {**os.environ, "PYTHONPATH": str(REPO), "LCTFOUND_CACHE_DIR": str(tmp_path / "cache"),
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    before = snapshot(inputs, outdir, *[Path(p) for p in corpus_models.values()])
    process = _spawn(INTERRUPTS[command](values), env)
    try:
        _wait_for_progress(process)
        process.send_signal(signal.SIGINT if how == "interrupt" else signal.SIGKILL)
        stdout, stderr = process.communicate(timeout=600)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    after = snapshot(inputs, outdir, *[Path(p) for p in corpus_models.values()])
    changed, created = compare(before, after, (inputs, outdir))
    if how == "kill":
        # Nothing can run after SIGKILL: what counts is that no output was published (temporaries
        # are hidden dot-names that the next run or `remove_stale_temporaries` recognises).
        outcome = Outcome(2 if process.returncode == -signal.SIGKILL else process.returncode, "", "error: killed\n",
                          changed, [p for p in created if not Path(p).name.startswith(".")])
        TOTALS.record(f"{command}-{how}", outcome.category(2))
        assert not changed and not outcome.created, (changed, created)
        return
    outcome = Outcome(process.returncode, stdout, stderr, changed, created)
    TOTALS.record(f"{command}-{how}", outcome.category(130))
    outcome.check(Expect(code=130, phrase="interrupted"))


@pytest.mark.slow
def test_broken_pipe_is_one_line(tmp_path):
    ct = bad_files.good_ct(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LCTFOUND_CACHE_DIR": str(tmp_path / "cache")}
    process = subprocess.Popen([sys.executable, "-m", "lctfound", "data", "info", str(ct)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=env, cwd=REPO)
    process.stdout.close()  # as `| head -0` would
    stderr = process.stderr.read().decode()
    process.wait(timeout=300)
    outcome = Outcome(process.returncode, "", stderr)
    TOTALS.record("data-info-broken-pipe", outcome.category(2))
    outcome.check(Expect(phrase="pipe"))


# --------------------------------------------------------------------------------------------
# Module logic (lctfound.logic): the same rules for files given to the Train logic
# --------------------------------------------------------------------------------------------


def _table(rows: list[str], header: str = "image,label"):
    def setup(inputs: Path, values: dict) -> dict:
        cts = [bad_files.good_ct(inputs / "a"), write_volume(data_factory.synthetic_ct(shape=(6, 16, 20), seed=1),
                                                              inputs / "b" / "good_ct.nii.gz")]
        text = "\n".join([header, *rows]).format(a=cts[0], b=cts[1], inputs=inputs)
        table = inputs / "cases.csv"
        table.write_text(text + "\n")
        return {"table": table}

    return setup


def _pairs(image_builder, label_builder):
    def setup(inputs: Path, values: dict) -> dict:
        folder = inputs / "pairs"
        folder.mkdir()
        image = image_builder(inputs / "made-image")
        label = label_builder(inputs / "made-label")
        shutil.copy(image, folder / f"case1_image{''.join(image.suffixes)}")
        shutil.copy(label, folder / f"case1_label{''.join(label.suffixes)}")
        shutil.rmtree(inputs / "made-image")
        shutil.rmtree(inputs / "made-label")
        return {"folder": folder}

    return setup


def _label(folder):
    return bad_files.label_map_with_values(folder, (1,), "label.nrrd")


CLASSIFY = {"task": "finetune-classification", "data_source": "table", "table_path": "{table}", "new_model_name": "corpus",
            "backbone_model": "lctfound-cpu-tiny", "max_steps": 2, "batch_size": 2, "device": "cpu"}
SEGMENT = {"task": "finetune-segmentation", "data_source": "folder", "data_folder": "{folder}", "new_model_name": "corpus",
           "backbone_model": "lctfound-cpu-tiny", "max_steps": 2, "batch_size": 2, "device": "cpu"}
GOOD_ROWS = ["{a},cancer", "{b},clear"]


def logic_cases() -> list[Case]:
    cases = [
        Case("train-logic-table-missing-image", _table(["{inputs}/nothing.nrrd,cancer", "{b},clear"]),
             (), Expect(phrase="not found")),
        Case("train-logic-table-empty-label", _table(["{a},", "{b},clear"]), (), Expect(phrase="empty")),
        Case("train-logic-table-one-class", _table(["{a},cancer", "{b},cancer"]), (), Expect(phrase="two classes")),
        Case("train-logic-table-no-header", _table(GOOD_ROWS, header="path,class"), (), Expect(phrase="header")),
        Case("train-logic-table-no-rows", _table([]), (), Expect(phrase="no rows")),
        Case("train-logic-table-binary", lambda i, v: {"table": _binary(i / "cases.csv")}, ()),
        Case("train-logic-table-row-is-a-folder", _table(["{inputs},cancer", "{b},clear"]), ()),
        Case("train-logic-table-row-truncated-ct", _and(_table(["{inputs}/t/truncated.nii,cancer", "{b},clear"]),
                                                        lambda i, v: {"t": bad_files.truncated_nifti(i / "t")}),
             (), Expect(phrase="truncated")),
        Case("train-logic-table-row-mr", _and(_table(["{inputs}/mr/mr.nii.gz,cancer", "{b},clear"]),
                                              lambda i, v: {"m": bad_files.mr_volume(i / "mr")}), ()),
    ]
    for name, value in (("max-steps-negative", {"max_steps": -1}), ("batch-size-zero", {"batch_size": 0}),
                        ("learning-rate-nan", {"learning_rate": float("nan")}),
                        ("learning-rate-negative", {"learning_rate": -1.0}),
                        ("checkpoint-every-zero", {"checkpoint_every": 0}), ("ema-above-one", {"ema_decay": 1.5}),
                        ("slices-per-scan-negative", {"slices_per_scan": -2}),
                        ("backbone-unknown", {"backbone_model": "no-such-model"}),
                        ("device-unknown", {"device": "tpu9"}), ("mode-unknown", {"mode": "half-frozen"})):
        cases.append(Case(f"train-logic-{name}", _table(GOOD_ROWS), tuple(sorted(value.items()))))
    pair_cases = {
        "pairs-label-is-a-ct": (bad_files.good_ct, bad_files.ct_volume),
        "pairs-negative-label": (bad_files.good_ct, bad_files.negative_label_map),
        "pairs-image-truncated": (bad_files.truncated_nrrd, _label),
        "pairs-image-nan": (bad_files.nan_nifti, _label),
        "pairs-image-huge-header": (bad_files.nifti_header_claiming_huge_volume, _label),
        "pairs-label-on-another-grid": (bad_files.good_ct, lambda f: _small_label(_mkdir(f))),
        "pairs-empty-label": (bad_files.good_ct, lambda f: _empty_label(_mkdir(f))),
    }
    for name, (image, label) in pair_cases.items():
        cases.append(Case(f"train-logic-{name}", _pairs(image, label), (("segment", True),)))
    cases.append(Case("train-logic-pairs-unmatched", _and(_pairs(bad_files.good_ct, _label),
                                                          lambda i, v: {"x": _rename(i / "pairs")}),
                      (("segment", True),), Expect(phrase="no partner")))
    return cases


def _binary(path: Path) -> Path:
    path.write_bytes(bytes(range(256)) * 4)
    return path


def _rename(folder: Path) -> Path:
    label = next(folder.glob("case1_label*"))
    return label.rename(folder / label.name.replace("case1", "case2"))


def _parameters(case: Case, values: dict) -> dict:
    options = dict(case.argv)
    parameters = dict(SEGMENT if options.pop("segment", False) else CLASSIFY)
    parameters.update(options)
    return {k: fill(v, values) if isinstance(v, str) else v for k, v in parameters.items()}


@pytest.mark.parametrize("case", as_params(_mark_missing(logic_cases())))
def test_train_logic_refuses_bad_files_in_one_line(case, tmp_path, monkeypatch, empty_cache):
    from lctfound.errors import LCTfoundError
    from lctfound.logic.train import TrainModuleLogic

    inputs, runs = tmp_path / "in", tmp_path / "runs"
    inputs.mkdir()
    values = {"in": inputs}
    values.update(case.setup(inputs, values) or {})
    logic = TrainModuleLogic(runs_root=runs)
    before = snapshot(inputs)
    code, message = 0, ""
    try:
        logic.start(_parameters(case, values))
    except LCTfoundError as error:
        code, message = 2, f"error: {error}\n"
    except Exception as error:  # noqa: BLE001 - counted as a traceback
        code, message = 1, f"Traceback (most recent call last)\n{type(error).__name__}: {error}\n"
    finally:
        if logic.job is not None:
            logic.cancel()
            logic.job.wait(timeout=120)
    after = snapshot(inputs)
    changed, created = compare(before, after, (inputs,))
    leftovers = [str(p) for p in runs.rglob("*")] if runs.exists() else []
    outcome = Outcome(code, "", message, changed, created + leftovers)
    TOTALS.record(case.name, outcome.category(2))
    outcome.check(case.expect)


# --------------------------------------------------------------------------------------------
# The web front end: the file browser and the Train panel's tables and pair folders
# --------------------------------------------------------------------------------------------


@pytest.fixture
def web_app(tmp_path, empty_cache):
    pytest.importorskip("trame_slicer", reason="the web app needs trame-slicer (pip install 'lctfound[web]')")
    pytest.importorskip("slicer")
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkOSOpenGLRenderWindow")
    from trame.app import get_server

    from lctfound.web.app import LCTfoundWebApp
    from lctfound.web.config import WebConfig
    from lctfound.web.security import DataRoots

    root = tmp_path / "data"
    root.mkdir()
    config = WebConfig(data_roots=DataRoots([root]), max_upload_bytes=2_000_000, export_dir=tmp_path / "exports",
                       runs_root=tmp_path / "runs")
    return LCTfoundWebApp(config, get_server(f"lctfound-corpus-{tmp_path.name}", client_type="vue3")), root


def _web_outcome(name: str, app, root: Path, before: dict, message: str, accepted: bool) -> Outcome:
    after = snapshot(root)
    changed, created = compare(before, after, (root,))
    runs = app.config.runs_root
    leftovers = [str(p) for p in runs.rglob("*")] if runs.exists() else []
    code = 0 if accepted else (2 if message else 1)
    outcome = Outcome(code, "", f"error: {message}\n" if message else "", changed, created + leftovers)
    TOTALS.record(name, outcome.category(2))
    return outcome


@pytest.mark.slow
@pytest.mark.mrml
@pytest.mark.parametrize("volume_name", sorted(bad_files.BAD_VOLUMES))
def test_web_file_browser_refuses_bad_volumes(volume_name, web_app):
    from event_loop import run_coroutine

    app, root = web_app
    builder, phrase = bad_files.BAD_VOLUMES[volume_name]
    path = builder(root / "case")
    before = snapshot(root)

    async def body():
        import asyncio

        app.open_server_path(str(path.relative_to(root)))
        if app._load_task is not None:
            await asyncio.wait_for(asyncio.shield(app._load_task), 120)
        return app.state.lct_browse_error or app.state.lct_error

    message = run_coroutine(body())
    outcome = _web_outcome(f"web-browser-{volume_name}", app, root, before, message, app.volume_node is not None)
    outcome.check(Expect(phrase=None))
    assert "\n" not in message


WEB_TABLES = {
    "shadow-row": (["{a},cancer", "/etc/shadow,clear"], "outside the data folders"),
    "outside-row": (["{a},cancer", "{outside},clear"], "outside the data folders"),
    "traversal-row": (["{a},cancer", "../outside/ct.nii.gz,clear"], "outside the data folders"),
    "missing-image": (["{a},cancer", "nothing.nrrd,clear"], "not found"),
    "one-class": (["{a},cancer", "{a},cancer"], "two classes"),
}


@pytest.mark.slow
@pytest.mark.mrml
@pytest.mark.parametrize("table_name", sorted(WEB_TABLES) + ["pairs-link-out", "pairs-label-is-a-ct"])
def test_web_training_tables_refuse_bad_rows(table_name, web_app, tmp_path):
    from event_loop import run_coroutine

    app, root = web_app
    outside = write_volume(data_factory.synthetic_ct(shape=(6, 16, 20)), tmp_path / "outside" / "ct.nii.gz")
    inside = write_volume(data_factory.synthetic_ct(shape=(6, 16, 20)), root / "a.nii.gz")
    panel = app.train_panel
    if table_name.startswith("pairs"):
        pairs = root / "pairs"
        pairs.mkdir()
        shutil.copy(inside, pairs / "p_image.nii.gz")
        if table_name == "pairs-link-out":
            os.symlink(outside, pairs / "p_label.nii.gz")
        else:
            shutil.copy(inside, pairs / "p_label.nii.gz")
        fields = {"task": "finetune-segmentation", "data_source": "folder", "data_folder": "pairs"}
    else:
        rows, _ = WEB_TABLES[table_name]
        text = "\n".join(["image,label", *rows]).format(a=inside.name, outside=outside)
        (root / "cases.csv").write_text(text + "\n")
        fields = {"task": "finetune-classification", "data_source": "table", "table_path": "cases.csv"}
    before = snapshot(root)

    async def body():
        for name, value in fields.items():
            panel.set(name, value)
            panel.refresh()
        panel.start()
        return panel.busy

    busy = run_coroutine(body())
    if busy:
        app.shutdown()
    outcome = _web_outcome(f"web-train-{table_name}", app, root, before, app.state.lct_error, busy)
    phrase = WEB_TABLES[table_name][1] if table_name in WEB_TABLES else None
    outcome.check(Expect(phrase=phrase))

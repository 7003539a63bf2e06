"""Every enhancement task and generation on `lctfound serve` (issue 14): ``lctfound enhance ... --server``
and ``lctfound generate --server`` against one real server process on 127.0.0.1 with tiny models (a
32² backbone, a cold-diffusion and a vcta task model trained for one step on it).

Each remote result is compared voxel for voxel with the same command run locally (same models, seed,
device and CPU threads), and with the result's own grid (super-resolution changes it).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from server_helpers import ROOT, Server, base_env

SHAPE = (3, 32, 32)
SPACING = (0.8, 0.8, 2.0)

# name: (the command's words after the input, local-only words, remote-only words); models in {braces}
CASES = {
    "low-dose cold-diffusion": (["enhance", "low-dose", "{ct}"],  # the model's own steps (4), known on the server
                                ["--model", "{ldct}", "--device", "cpu"], ["--model", "ldct"]),
    "simulate-low-dose": (["enhance", "simulate-low-dose", "{ct}", "--dose", "0.25", "--views", "60", "--seed", "3"],
                          [], []),
    "sparse-view diffusion": (["enhance", "sparse-view", "{ct}", "--views", "12", "--method", "diffusion", "--steps",
                               "2", "--dc-iterations", "2", "--refine-iterations", "2", "--tv-iterations", "3"],
                              ["--model", "{tiny}", "--device", "cpu"], ["--model", "tiny"]),
    "super-resolution ddnm": (["enhance", "super-resolution", "{ct}", "--factor", "2", "--steps", "2", "--seed", "1"],
                              ["--model", "{tiny}", "--device", "cpu"], ["--model", "tiny"]),
    "vcta": (["enhance", "vcta", "{ct}", "--steps", "2", "--seed", "1"],
             ["--model", "{vcta}", "--device", "cpu"], ["--model", "vcta"]),
    "generate": (["generate", "-n", "2", "--steps", "2", "--size", "32", "--seed", "3", "--spacing", "0.5,0.6,2"],
                 ["--model", "{tiny}", "--device", "cpu"], ["--model", "tiny"]),
}


def _words(words, files: Path) -> list:
    places = {"ct": files / "ct.nrrd", "tiny": files / "tiny", "ldct": files / "ldct" / "model",
              "vcta": files / "vcta" / "model"}
    return [str(places[w[1:-1]]) if w.startswith("{") else w for w in words]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A 3×32×32 chest phantom, a tiny 32² backbone and two task models trained one step on it."""
    import torch
    from data_factory import chest_phantom
    from model_factory import tiny_model

    from lctfound.io.volume import CTVolume, write_volume
    from lctfound.models import load_model, save_model
    from lctfound.training.enhancement import LowDoseEnhancementTask, VCTATask
    from lctfound.training.loop import LoopConfig, TrainingLoop

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("serve-enhance")
    full = chest_phantom(SHAPE, noise_hu=0.0, seed=0).astype(np.float32)
    low = full + np.random.default_rng(1).normal(0, 60, SHAPE).astype(np.float32)
    write_volume(CTVolume(np.round(low).astype(np.int16), SPACING, (10.0, -20.0, 5.0)), folder / "ct.nrrd")
    backbone = load_model(save_model(tiny_model(32, seed=1), folder / "tiny"))  # knows its folder
    for name, task in (("ldct", LowDoseEnhancementTask(backbone, [low], [full], names=["a"], patch_size=32,
                                                       steps=4, name="toy-ldct")),
                       ("vcta", VCTATask(backbone, [low], [full], names=["a"], mode="adapter", resolution=32,
                                         name="toy-vcta"))):
        TrainingLoop(LoopConfig(output=str(folder / name), batch_size=2, max_steps=1, checkpoint_every=1,
                                log_every=1, device="cpu"), task).run()
    return folder


@pytest.fixture(scope="module")
def server(files):
    running = Server(files / "data", files / "server-cache",
                     ["--models", f"tiny={files / 'tiny'}", f"ldct={files / 'ldct' / 'model'}",
                      f"vcta={files / 'vcta' / 'model'}", "--max-jobs-per-client", "4"])
    yield running
    running.stop()


@pytest.fixture(scope="module")
def local(files):
    """Every case run locally, in ONE child process with the server jobs' environment (one CPU thread)."""
    commands = {case: [*_words(words + extra, files), "-o", str(files / f"local-{i}.nrrd")]
                for i, (case, (words, extra, _)) in enumerate(CASES.items())}
    script = ("import json, sys\nfrom lctfound.cli import main\n"
              "print(json.dumps([main(args) for args in json.loads(sys.argv[1])]))")
    run = subprocess.run([sys.executable, "-c", script, json.dumps(list(commands.values()))],
                         env=base_env(files / "local-cache"), capture_output=True, text=True)
    assert run.returncode == 0 and json.loads(run.stdout.strip().splitlines()[-1]) == [0] * len(CASES), run.stderr
    return {case: Path(args[-1]) for case, args in commands.items()}


def _light_cli(args, server, files) -> subprocess.CompletedProcess:
    """The command line where torch, diffusers, MONAI and scikit-image are missing (a CPU-only desk)."""
    script = ("import sys\nsys.path.insert(0, %r)\nfrom import_blocker import hidden_packages\n"
              "with hidden_packages('torch', 'diffusers', 'monai', 'transformers', 'scikit-image'):\n"
              "    from lctfound.cli import main\n    code = main(sys.argv[1:])\nsys.exit(code)" % str(ROOT / "Testing"))
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          env=dict(base_env(files / "cli-cache"), LCTFOUND_SERVER_TOKEN=server.token))


@pytest.mark.parametrize("case", list(CASES))
def test_each_task_on_the_server_equals_the_local_run(case, server, files, local, token_env, run_cli):
    from lctfound.io.provenance import read_provenance
    from lctfound.io.volume import read_volume

    words, _, remote_extra = CASES[case]
    output = files / f"remote-{case.replace(' ', '-')}.nrrd"
    args = [*_words(words + remote_extra, files), "-o", output, "--server", server.url, "--events"]
    if case == "super-resolution ddnm":  # one task through the thin client alone
        run = _light_cli(args, server, files)
        code, out, err = run.returncode, run.stdout, run.stderr
    else:
        code, out, err = run_cli(args)
    assert code == 0, err
    remote, here = read_volume(output, validate=False), read_volume(local[case], validate=False)
    # Same code, models, seeds, device (cpu) and threads (1) on both sides: the very same voxels.
    assert remote.array.dtype == here.array.dtype and np.array_equal(remote.array, here.array), case
    assert remote.spacing == here.spacing and np.allclose(remote.origin, here.origin)
    assert np.allclose(remote.direction, here.direction)
    if case == "super-resolution ddnm":  # the result's grid, not the input's
        assert remote.shape == (3, 64, 64) and remote.spacing == pytest.approx((0.4, 0.4, 2.0))
    if case == "generate":
        assert remote.shape == (2, 32, 32) and remote.spacing == pytest.approx((0.5, 0.6, 2.0))
    record, local_record = read_provenance(output), read_provenance(local[case])
    assert record["server"] == server.url and record["output"] == str(output)
    assert record["task"] == local_record["task"] and record.get("seed") == local_record.get("seed")
    if "source" in local_record:
        assert record["source"] == str(files / "ct.nrrd") and record["name"] == local_record["name"]
    assert str(server.data) not in json.dumps(record)  # the server's folders stay on the server
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(event["event"] == "progress" for event in events)
    assert [event for event in events if event["event"] == "result"] == [events[-1]]
    assert events[-1]["output"] == str(output) and events[-1]["provenance"] == str(output.with_suffix(".json"))


def test_a_bad_option_value_is_refused_by_the_server(server, files, token_env, run_cli):
    cases = [(["enhance", "super-resolution", files / "ct.nrrd", "--method", "bicubic", "--axis", "sideways"],
              "option 'axis' of enhance-super-resolution must be one of in-plane, through-plane"),
             (["enhance", "sparse-view", files / "ct.nrrd", "--views", "8", "--method", "diffusion", "--window",
               "lung;rm"], "option 'window' of enhance-sparse-view is not of the form"),
             (["generate", "--model", "tiny", "--disease", "a\nb"], "option 'disease' of generate is not of the form"),
             (["enhance", "vcta", files / "ct.nrrd", "--model", "../vcta"], "option 'model' of enhance-vcta")]
    for args, message in cases:
        output = files / "refused.nrrd"
        code, out, err = run_cli([*args, "-o", output, "--server", server.url])
        assert code == 2 and "(422)" in err and message in err and err.count("\n") == 1, (args, err)
        assert not output.exists() and not output.with_suffix(".json").exists()
    code, _, err = run_cli(["enhance", "vcta", files / "ct.nrrd", "--model", "nowhere", "-o", files / "refused.nrrd",
                            "--server", server.url])
    assert code == 2 and "(404)" in err and "no model 'nowhere'" in err and err.count("\n") == 1
    # A task without inputs (generate) takes none; one that needs a volume cannot go without.
    from lctfound.remote import RemoteError

    client = server.client("cli")
    upload = client.upload_volume(np.zeros((1, 16, 16), dtype=np.int16))
    with pytest.raises(RemoteError, match=r"\(422\): task generate takes no input volumes; 'volume' is not one"):
        client.submit("generate", {"volume": upload}, {"model": "tiny"})
    with pytest.raises(RemoteError, match=r"\(422\): task enhance-vcta takes the inputs volume; 'volume' is missing"):
        client.submit("enhance-vcta", {}, {"model": "vcta"})


def test_what_cannot_run_remotely_is_refused_before_anything_is_uploaded(server, files, monkeypatch, run_cli):
    monkeypatch.setenv("LCTFOUND_SERVER_TOKEN", server.token)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "careful")
    ct = files / "ct.nrrd"
    (files / "taken.nrrd").write_bytes(b"x")
    cases = [
        (["enhance", "vcta", ct, "--model", "vcta", "-o", ct, "--overwrite"], "never replaces an input"),
        (["enhance", "super-resolution", ct, "-o", files / "sr"], "unsupported output format"),
        (["enhance", "sparse-view", "--sinogram", files / "sino.npy", "-o", files / "x.nrrd"],
         "--sinogram is not available with --server"),
        (["enhance", "sparse-view", ct, "--views", "8", "--save-sinogram", files / "s.npy", "-o", files / "x.nrrd"],
         "--save-sinogram is not available with --server"),
        (["enhance", "low-dose", ct, "--model", "ldct", "-o", files], "an output folder needs --steps"),
        (["enhance", "simulate-low-dose", ct, "--dose", "0.5", "-o", files / "taken.nrrd"], "--overwrite"),
        (["enhance", "vcta", ct, "--model", "vcta", "--device", "cuda", "-o", files / "x.nrrd"],
         "--device is not available with --server"),
        (["generate", "-o", files / "grid.png"], "with --server, generate writes a volume"),
    ]
    for args, message in cases:
        code, _, err = run_cli([*args, "--server", server.url])
        assert code == 2 and message in err and err.count("\n") == 1, (args, err)
    assert not (server.data / "clients" / "careful").exists()  # nothing reached the server
    assert not (files / "x.nrrd").exists() and not (files / "grid.png").exists()


def test_a_panel_offers_the_server_models_its_task_can_use(server, token_env):
    """Test connection learns each model's kind (GET /models): the Enhance panel's backbone selector
    lists backbones, its vcta and cold-diffusion selectors the task models of that kind."""
    from lctfound.logic.enhance import EnhanceModuleLogic, EnhanceParameters

    logic = EnhanceModuleLogic()
    on_server = dict(server_url=server.url)
    logic.test_connection(EnhanceParameters(task="vcta", **on_server))
    assert {name: logic.server.kinds[name] for name in ("tiny", "ldct", "vcta")} == {
        "tiny": "backbone", "ldct": "low-dose-enhancement", "vcta": "vcta"}
    for p, field, offered in ((EnhanceParameters(task="vcta", **on_server), "task_model", ["vcta"]),
                              (EnhanceParameters(task="low-dose", denoiser="cold-diffusion", **on_server),
                               "task_model", ["ldct"]),
                              (EnhanceParameters(task="super-resolution", interpolation="ddnm", **on_server),
                               "model_name", ["default", "tiny"])):
        assert [choice.value for choice in logic.choices(field, parameters=p)] == offered, p.task
        chosen = EnhanceParameters(**{**p.__dict__, **logic.default_values(p)})
        assert getattr(chosen, field) == offered[0] if field == "task_model" else getattr(chosen, field) in offered
        assert logic.server_problem(chosen) == ""

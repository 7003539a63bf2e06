"""The LCTfoundEnhance module logic, headless on slicer-core, with real background jobs: each task's
result is a NEW volume node (the input is untouched) carrying its provenance."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("slicer")

from lctfound.io.volume import CTVolume  # noqa: E402
from lctfound.logic import RunState  # noqa: E402
from lctfound.logic.enhance import EnhanceModuleLogic, EnhanceParameters  # noqa: E402
from lctfound.models import save_model  # noqa: E402
from lctfound.mrml import ctvolume_from_volume_node, new_headless_scene, volume_node_from_ctvolume  # noqa: E402
from lctfound.mrml.volumes import get_provenance  # noqa: E402

from data_factory import fewshot_phantom  # noqa: E402
from model_factory import tiny_model  # noqa: E402

pytestmark = pytest.mark.mrml

SPACING, ORIGIN = (0.8, 0.8, 2.5), (-25.0, -30.0, 100.0)


@pytest.fixture
def world(empty_cache, tmp_path):
    folder = tmp_path / "tiny"
    save_model(tiny_model(32, seed=2), folder)
    entry = SimpleNamespace(name="tiny", path=folder, source="user", preset="tiny", description="")
    logic = EnhanceModuleLogic(list_models=lambda extra_folders=(): [entry], list_task_models=lambda extra_folders=(): [],
                               available_devices=lambda: ["cpu"], runs_root=tmp_path / "runs")
    scene = new_headless_scene()
    volume, _, _ = fewshot_phantom(slices=3, size=64)
    ct = CTVolume(np.round(volume).astype(np.int16), SPACING, ORIGIN, np.eye(3))
    node = volume_node_from_ctvolume(scene, ct, name="phantom")
    logic.set_scene(scene)
    return SimpleNamespace(logic=logic, scene=scene, node=node, ct=ct)


def run(logic, p, timeout: float = 300.0):
    logic.start(p)
    deadline = time.monotonic() + timeout
    while logic.state.busy:
        assert time.monotonic() < deadline, logic.status_summary()
        logic.poll()
        time.sleep(0.1)
    logic.poll()
    assert logic.state is RunState.FINISHED, logic.status_summary()
    return logic.result_volume


@pytest.mark.slow
def test_each_task_makes_a_new_volume_with_provenance(world):
    logic, node = world.logic, world.node
    before = ctvolume_from_volume_node(node).array.copy()

    noisy = run(logic, EnhanceParameters(task="simulate-low-dose", input_volume=node, dose=0.1, device="cpu"))
    assert noisy is not node and noisy.GetScene() is world.scene
    noisy_ct = ctvolume_from_volume_node(noisy)
    assert noisy_ct.same_grid(world.ct)
    assert np.std(noisy_ct.array - before) > 1.0  # noise was added
    provenance = get_provenance(noisy)
    assert provenance["task"] and "0.1" in noisy.GetName() or "10" in noisy.GetName()

    upscaled = run(logic, EnhanceParameters(task="super-resolution", input_volume=node, factor=2,
                                            interpolation="bicubic", device="cpu"))
    up = ctvolume_from_volume_node(upscaled)
    assert up.shape == (3, 128, 128) and np.allclose(up.spacing[:2], (0.4, 0.4))
    assert logic.comparison() == (node, upscaled)

    reconstructed = run(logic, EnhanceParameters(task="sparse-view", input_volume=node, views=16,
                                                 reconstruction="fbp", device="cpu"))
    assert ctvolume_from_volume_node(reconstructed).same_grid(world.ct)

    generated = run(logic, EnhanceParameters(task="synthetic", model_name="tiny", count=2, steps=2, device="cpu"))
    assert ctvolume_from_volume_node(generated).shape == (2, 32, 32)
    assert np.array_equal(ctvolume_from_volume_node(node).array, before), "the input must never change"
    assert len({n.GetName() for n in (noisy, upscaled, reconstructed, generated)}) == 4


def test_parameter_problems(world):
    logic, node = world.logic, world.node
    assert logic.first_problem(EnhanceParameters(task="simulate-low-dose", input_volume=node, dose=1.5)).startswith(
        "The dose fraction")
    assert "at least one view" in logic.first_problem(EnhanceParameters(task="sparse-view", input_volume=node, views=0))
    assert "2, 4 or 8" in logic.first_problem(EnhanceParameters(task="super-resolution", input_volume=node, factor=3,
                                                                interpolation="bicubic"))
    assert "vcta model" in logic.first_problem(EnhanceParameters(task="vcta", input_volume=node))
    assert logic.first_problem(EnhanceParameters(task="sparse-view", input_volume=node, reconstruction="diffusion")) \
        == "Select a model."
    p = EnhanceParameters(task="synthetic", model_name="tiny")
    assert logic.first_problem(p) == "" and "input_volume" not in logic.visible_fields(p)
    assert not logic.start_button_state(EnhanceParameters(task="nonsense")).enabled


# -- Run on a department server (issue 14) -----------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("httpx")
    from server_helpers import backbone_server

    running = backbone_server(tmp_path_factory.mktemp("enhance-server"), 32, seed=2)
    yield running
    running.stop()


@pytest.mark.slow
def test_low_dose_on_a_server_gives_the_local_result(world, server, monkeypatch):
    from lctfound.logic.server import ServerConnection

    monkeypatch.delenv("LCTFOUND_SERVER_TOKEN", raising=False)
    monkeypatch.setenv("LCTFOUND_CLIENT_ID", "enhance-desk")
    logic, node = world.logic, world.node
    local = run(logic, EnhanceParameters(task="low-dose", denoiser="tv", input_volume=node, device="cpu"))

    p = EnhanceParameters(task="low-dose", denoiser="tv", input_volume=node, server_url=server.url,
                          server_token_file=str(server.token_file))
    assert "device" not in logic.visible_fields(p)  # the server picks its device
    assert logic.first_problem(p) == f"Press Test connection to use the server at {server.url}."
    line = logic.test_connection(p)
    assert line.startswith(f"connected to {server.url}") and "enhance-low-dose" in line.split("; tasks ")[1]
    assert logic.server.runs("enhance-low-dose") and logic.first_problem(p) == ""
    assert logic.selection_summary(p) == f"Low-dose enhancement with no model on the server {server.url}."
    # The selectors list the server's backbones, not this computer's.
    offered = logic.choices("model_name", parameters=p)
    assert [c.value for c in offered] == logic.server.server_models and "tiny" in logic.server.server_models
    assert logic.server.kinds["tiny"] == "backbone"
    assert all(c.label.endswith("(on the server)") for c in offered)
    assert logic.choices("task_model", parameters=p) == []

    remote = run(logic, p)
    command = logic.job.command
    assert "--server" in command and server.url in command and server.token not in " ".join(command)
    assert remote is not local and remote is not node and remote.GetScene() is world.scene
    remote_ct, local_ct = ctvolume_from_volume_node(remote), ctvolume_from_volume_node(local)
    assert remote_ct.same_grid(local_ct) and np.array_equal(remote_ct.array, local_ct.array)
    assert remote.GetName().startswith(local.GetName())  # the same name (made unique in the scene)
    assert get_provenance(remote)["server"] == server.url

    # Each panel task maps to a server task; one the server does not list is refused in one sentence.
    logic.server = ServerConnection(server.url, str(server.token_file), tasks=["enhance-low-dose"])
    sparse = EnhanceParameters(task="sparse-view", input_volume=node, server_url=server.url,
                               server_token_file=str(server.token_file))
    problem = logic.first_problem(sparse)
    assert problem.startswith(f"The server at {server.url} does not run enhance-sparse-view;") and "\n" not in problem
    assert not logic.start_button_state(sparse).enabled
    logic.server.tasks.append("enhance-sparse-view")
    assert logic.first_problem(sparse) == ""
    cold = EnhanceParameters(task="low-dose", denoiser="cold-diffusion", input_volume=node, server_url=server.url,
                             server_token_file=str(server.token_file))
    # Cold diffusion is the server's low-dose task with a task model it has (none here).
    assert logic.first_problem(cold) == "Select a low-dose-enhancement model the server has (Test connection lists them)."

    # A task whose result has another grid (super-resolution x2 in-plane): the new node has the server's grid.
    logic.test_connection(p)
    for task in ("enhance-simulate-low-dose", "enhance-sparse-view", "enhance-super-resolution", "enhance-vcta",
                 "generate"):
        assert logic.server.runs(task), task
    options = dict(task="super-resolution", factor=2, axis="in-plane", interpolation="bicubic", input_volume=node)
    local_sr = ctvolume_from_volume_node(run(logic, EnhanceParameters(**options, device="cpu")))
    remote_sr = ctvolume_from_volume_node(run(logic, EnhanceParameters(**options, server_url=server.url,
                                                                       server_token_file=str(server.token_file))))
    source = ctvolume_from_volume_node(node)
    assert remote_sr.array.shape == (source.array.shape[0], 2 * source.array.shape[1], 2 * source.array.shape[2])
    assert remote_sr.same_grid(local_sr) and np.array_equal(remote_sr.array, local_sr.array)

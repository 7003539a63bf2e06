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

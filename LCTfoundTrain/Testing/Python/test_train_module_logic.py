"""Headless tests of the LCTfoundTrain module logic (`lctfound.logic.TrainModuleLogic`).

Written as `unittest.TestCase` so that the same file runs under pytest and inside Slicer
(``slicer_add_python_unittest`` in this folder's CMakeLists.txt). No torch, Qt or child process:
the registry and devices are injected; real training runs are tested in Testing/test_train_logic.py.
"""

import os
import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

from lctfound.logic import RunState, TrainModuleLogic, TrainParameters


class FakeVolumeNode:
    def __init__(self, name, imageData=object()):
        self._name, self._imageData = name, imageData

    def GetName(self):
        return self._name

    def GetImageData(self):
        return self._imageData


def parameterNode(**values):
    """What the module's @parameterNodeWrapper holds (camelCase; empty paths are Path('.'))."""
    defaults = TrainParameters()
    node = SimpleNamespace(
        dataSource=defaults.data_source, dataFolder=Path("."), trainingVolumes=[], task=defaults.task,
        preset=defaults.preset, resolution=defaults.resolution, patchSize=defaults.patch_size,
        batchSize=defaults.batch_size, maxSteps=defaults.max_steps, learningRate=defaults.learning_rate,
        checkpointEvery=defaults.checkpoint_every, emaDecay=defaults.ema_decay, device=defaults.device,
        runFolder=Path("."), newModelName="",
    )
    for key, value in values.items():
        setattr(node, key, value)
    return node


class TrainModuleLogicTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.root = Path(self._tmp.name)
        self._env = mock.patch.dict(os.environ, {"LCTFOUND_CACHE_DIR": str(self.root / "cache")})
        self._env.start()
        self.models = [SimpleNamespace(name="lctfound-pretrained", path=self.root, source="user", preset="cpu-tiny",
                                       description="")]
        self.logic = TrainModuleLogic(list_models=lambda extra_folders=(): list(self.models),
                                      available_devices=lambda: ["cpu"], runs_root=self.root / "runs")

    def tearDown(self):
        self._env.stop()
        self._tmp.cleanup()

    def test_defaults_fill_a_free_model_name(self):
        node = parameterNode()
        self.assertEqual(self.logic.fill_defaults(node), {"new_model_name": "lctfound-pretrained-2"})
        self.assertEqual(node.newModelName, "lctfound-pretrained-2")
        node.newModelName = "mine"  # a name the user typed is kept
        self.assertEqual(self.logic.fill_defaults(node), {})

    def test_start_needs_data(self):
        node = parameterNode(newModelName="mine")
        self.assertEqual(self.logic.first_problem(node), "Choose the folder with the training CT volumes.")
        node.dataFolder = self.root
        self.assertEqual(self.logic.parameter_problems(node), [])
        self.assertTrue(self.logic.start_button_state(node).enabled)
        node.dataSource = "volumes"
        self.assertEqual(self.logic.first_problem(node), "Select the loaded volumes to train on.")
        node.trainingVolumes = [FakeVolumeNode("ct"), FakeVolumeNode("empty", imageData=None)]
        self.assertEqual(self.logic.first_problem(node), "Volume 'empty' has no image data.")
        node.trainingVolumes = [FakeVolumeNode("ct")]
        self.assertEqual(self.logic.first_problem(node), "")

    def test_new_model_name_rules(self):
        node = parameterNode(dataFolder=self.root)
        for name, problem in (("", "Enter a name"), ("a b", "may only contain"), ("-x", "may only contain"),
                              ("lctfound-pretrained", "already exists"), ("ok_name-2.1", "")):
            node.newModelName = name
            reason = self.logic.first_problem(node)
            if problem:
                self.assertIn(problem, reason)
            else:
                self.assertEqual(reason, "")

    def test_buttons_while_idle(self):
        self.assertEqual(self.logic.state, RunState.IDLE)
        self.assertFalse(self.logic.cancel_button_state().enabled)
        resume = self.logic.resume_button_state(parameterNode())
        self.assertFalse(resume.enabled)
        self.assertEqual(resume.tooltip, "No run to resume: choose its run folder.")
        self.assertIsNone(self.logic.loss_curve_png())

    def test_new_run_folders_are_unique(self):
        first = self.logic.new_run_folder("m")
        first.mkdir(parents=True)
        second = self.logic.new_run_folder("m")
        self.assertEqual(first.parent, self.root / "runs")
        self.assertNotEqual(first, second)
        self.assertTrue(second.name.startswith(first.name))


if __name__ == "__main__":
    unittest.main()

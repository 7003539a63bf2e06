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

from lctfound.logic import RunState, TrainModuleLogic, TrainParameters, set_volume_class_name, volume_class_name


class FakeVolumeNode:
    def __init__(self, name, imageData=object()):
        self._name, self._imageData, self._attributes = name, imageData, {}

    def GetName(self):
        return self._name

    def GetID(self):
        return "vtkMRMLScalarVolumeNode" + self._name

    def GetImageData(self):
        return self._imageData

    def GetAttribute(self, name):
        return self._attributes.get(name)

    def SetAttribute(self, name, value):
        self._attributes[name] = value


class FakeSegmentationNode:
    """Only what pairing reads: the name and the source volume (reference image geometry node)."""

    def __init__(self, name, source=None):
        self._name, self._source = name, source

    def GetName(self):
        return self._name

    def GetID(self):
        return "vtkMRMLSegmentationNode" + self._name

    def GetReferenceImageGeometryReferenceRole(self):
        return "referenceImageGeometryRef"

    def GetNodeReference(self, role):
        return self._source if role == "referenceImageGeometryRef" else None


def parameterNode(**values):
    """What the module's @parameterNodeWrapper holds (camelCase; empty paths are Path('.'))."""
    defaults = TrainParameters()
    node = SimpleNamespace(
        dataSource=defaults.data_source, dataFolder=Path("."), trainingVolumes=[], trainingSegmentations=[],
        segmentFilter=defaults.segment_filter, tablePath=Path("."), task=defaults.task, backboneModel="", mode="",
        slicesPerScan=defaults.slices_per_scan, preset=defaults.preset, resolution=defaults.resolution, patchSize=defaults.patch_size,
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

    def test_switching_to_a_fine_tuning_task_fills_its_defaults(self):
        node = parameterNode(newModelName="mine", task="finetune-classification")
        self.assertEqual(self.logic.fill_defaults(node),
                         {"data_source": "table", "mode": "frozen", "backbone_model": "lctfound-pretrained"})
        self.assertEqual(self.logic.first_problem(node), "Choose the CSV table (columns image,label) of the training scans.")
        node.task = "finetune-segmentation"
        self.assertEqual(self.logic.fill_defaults(node), {"data_source": "volumes"})  # "frozen" fits segmentation too
        node.mode = "adapter"
        self.assertEqual(self.logic.fill_task_defaults(node), {"mode": "full"})  # the panel switched the task
        self.assertEqual(node.mode, "full")
        self.assertEqual(self.logic.first_problem(node), "Select the loaded volumes to train on.")
        self.assertEqual([c.value for c in self.logic.choices("dataSource", parameters=node)], ["volumes", "folder"])

    def test_volumes_pair_with_the_segmentations_drawn_on_them(self):
        from lctfound.logic.train import pair_volumes_with_segmentations

        a, b = FakeVolumeNode("a"), FakeVolumeNode("b")
        sa, sb, loose = FakeSegmentationNode("sa", a), FakeSegmentationNode("sb", b), FakeSegmentationNode("loose")
        self.assertEqual(pair_volumes_with_segmentations([a, b], [sb, sa]), ([(a, sa), (b, sb)], ""))
        self.assertEqual(pair_volumes_with_segmentations([a, b], [sa, loose]), ([(a, sa), (b, loose)], ""))
        pairs, problem = pair_volumes_with_segmentations([a], [sa, FakeSegmentationNode("again", a)])
        self.assertEqual(problem, "Volume 'a' has several selected segmentations ('sa', 'again'); select one per volume.")
        pairs, problem = pair_volumes_with_segmentations([a], [sb])
        self.assertTrue(problem.startswith("Segmentation 'sb' was drawn on volume 'b', which is not selected"))
        pairs, problem = pair_volumes_with_segmentations([a, b], [sa])
        self.assertTrue(problem.startswith("Volume 'b' has no selected segmentation"))
        node = parameterNode(newModelName="mine", task="finetune-segmentation", dataSource="volumes", trainingVolumes=[a, b],
                             trainingSegmentations=[sa])
        self.assertTrue(self.logic.first_problem(node).startswith("Volume 'b' has no selected segmentation"))
        node.trainingSegmentations = [sa, sb]
        self.assertEqual(self.logic.data_summary(node), "2 case(s): a + sa; b + sb")

    def test_classification_from_loaded_volumes_needs_two_named_classes(self):
        a, b = FakeVolumeNode("a"), FakeVolumeNode("b")
        node = parameterNode(newModelName="mine", task="finetune-classification", dataSource="volumes",
                             trainingVolumes=[a, b], backboneModel="lctfound-pretrained")
        self.assertEqual(self.logic.first_problem(node), "Enter a class name for volume 'a'.")
        set_volume_class_name(a, " emphysema ")
        set_volume_class_name(b, "emphysema")
        self.assertEqual(volume_class_name(a), "emphysema")
        self.assertEqual(self.logic.first_problem(node),
                         "All volumes have class 'emphysema'; classification needs at least two classes.")
        set_volume_class_name(b, "normal")
        self.assertEqual(self.logic.parameter_problems(node), [])
        self.assertEqual(self.logic.data_summary(node), "2 scan(s): emphysema (1), normal (1)")

    def test_new_run_folders_are_unique(self):
        first = self.logic.new_run_folder("m")
        first.mkdir(parents=True)
        second = self.logic.new_run_folder("m")
        self.assertEqual(first.parent, self.root / "runs")
        self.assertNotEqual(first, second)
        self.assertTrue(second.name.startswith(first.name))


if __name__ == "__main__":
    unittest.main()

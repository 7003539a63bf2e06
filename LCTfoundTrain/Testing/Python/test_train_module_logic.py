"""Headless tests of the LCTfoundTrain module logic (`lctfound.logic.TrainModuleLogic`).

Written as `unittest.TestCase` so that the same file runs under pytest and inside Slicer
(``slicer_add_python_unittest`` in this folder's CMakeLists.txt). No torch, Qt or models needed.
"""

import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

from lctfound.logic import TrainModuleLogic, TrainParameters, is_valid_model_name


class FakeVolumeNode:
    def GetID(self):
        return "vtkMRMLScalarVolumeNode1"

    def GetImageData(self):
        return object()


class FakeSegmentationNode:
    def __init__(self, segments):
        self._segmentation = SimpleNamespace(GetNumberOfSegments=lambda: segments)

    def GetSegmentation(self):
        return self._segmentation


class TrainModuleLogicTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        root = Path(self._tmp.name)
        self.models = []
        for name in ("lctfound-base", "lctfound-base-finetuned"):
            (root / name).mkdir()
            self.models.append(SimpleNamespace(name=name, path=root / name, source="user", preset="", description=""))
        self.logic = TrainModuleLogic(
            list_models=lambda extra_folders=(): list(self.models), available_devices=lambda: ["cpu"]
        )

    def tearDown(self):
        self._tmp.cleanup()

    def parameters(self, **values):
        base = dict(
            input_volume=FakeVolumeNode(),
            input_segmentation=FakeSegmentationNode(2),
            model_name="lctfound-base",
            device="cpu",
            new_model_name="airway-head",
        )
        base.update(values)
        return TrainParameters(**base)

    def test_complete_parameters_can_apply(self):
        self.assertEqual(self.logic.parameter_problems(self.parameters()), [])

    def test_training_needs_labels(self):
        self.assertEqual(
            self.logic.cannot_apply_reason(self.parameters(input_segmentation=None)),
            "Select a segmentation with the training labels.",
        )
        self.assertIn("no segments", self.logic.cannot_apply_reason(self.parameters(input_segmentation=FakeSegmentationNode(0))))

    def test_new_model_name_rules(self):
        self.assertEqual(self.logic.cannot_apply_reason(self.parameters(new_model_name="")), "Enter a name for the new model.")
        self.assertIn("may only contain", self.logic.cannot_apply_reason(self.parameters(new_model_name="my model/1")))
        self.assertIn("already exists", self.logic.cannot_apply_reason(self.parameters(new_model_name="lctfound-base")))
        self.assertTrue(is_valid_model_name("airway_head-2.1"))
        for bad in ("", ".", "..", "-x", "a b", "a/b", "x" * 101):
            self.assertFalse(is_valid_model_name(bad), bad)

    def test_problems_are_ordered_common_first(self):
        problems = self.logic.parameter_problems(
            TrainParameters(input_volume=None, input_segmentation=None, model_name="", device="cpu", new_model_name="")
        )
        self.assertEqual(problems[0], "Select an input volume.")
        self.assertEqual(problems[1], "Select a model.")
        self.assertEqual(problems[2:], ["Select a segmentation with the training labels.", "Enter a name for the new model."])

    def test_suggested_name_is_unique_and_valid(self):
        name = self.logic.suggest_model_name("lctfound-base")
        self.assertEqual(name, "lctfound-base-finetuned-2")
        self.assertTrue(is_valid_model_name(name))
        self.assertEqual(self.logic.suggest_model_name("my model"), "my-model-finetuned")

    def test_fill_defaults_on_a_parameter_node(self):
        node = SimpleNamespace(
            inputVolume=None, inputSegmentation=None, modelName="", device="auto", newModelName=""
        )
        defaults = self.logic.fill_defaults(node)
        self.assertEqual(node.modelName, "lctfound-base")
        self.assertEqual(node.newModelName, "lctfound-base-finetuned-2")
        self.assertEqual(set(defaults), {"model_name", "new_model_name"})
        # A name the user typed is kept.
        node.newModelName = "mine"
        self.assertEqual(self.logic.fill_defaults(node), {})
        self.assertEqual(node.newModelName, "mine")


if __name__ == "__main__":
    unittest.main()

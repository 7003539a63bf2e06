"""Headless tests of the LCTfoundSegmentation module logic (`lctfound.logic.SegmentationModuleLogic`).

Written as `unittest.TestCase` so that the same file runs under pytest and inside Slicer
(``slicer_add_python_unittest`` in this folder's CMakeLists.txt). No torch, Qt or models needed:
the model registry and the device list are injected.
"""

import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

from lctfound.errors import LCTfoundError
from lctfound.logic import RunState, SegmentationModuleLogic, SegmentationParameters


class FakeVolumeNode:
    def __init__(self, nodeId="vtkMRMLScalarVolumeNode1", imageData=object()):
        self._id = nodeId
        self._imageData = imageData

    def GetID(self):
        return self._id

    def GetImageData(self):
        return self._imageData


class SegmentationModuleLogicTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        folder = Path(self._tmp.name) / "lctfound-base"
        folder.mkdir()
        self.model = SimpleNamespace(
            name="lctfound-base", path=folder, source="embedded", preset="lctfound", description="Built-in"
        )
        self.logic = SegmentationModuleLogic(
            list_models=lambda extra_folders=(): [self.model], available_devices=lambda: ["cpu"]
        )

    def tearDown(self):
        self._tmp.cleanup()

    def test_parameters_have_an_optional_output_segmentation(self):
        parameters = SegmentationParameters()
        self.assertIsNone(parameters.output_segmentation)
        self.assertEqual(parameters.device, "auto")

    def test_reads_camel_case_parameter_node(self):
        segmentation = object()
        node = SimpleNamespace(
            inputVolume=FakeVolumeNode(), modelName="lctfound-base", device="cpu", outputSegmentation=segmentation
        )
        parameters = self.logic.parameters_from(node)
        self.assertIsInstance(parameters, SegmentationParameters)
        self.assertIs(parameters.output_segmentation, segmentation)
        self.assertEqual(parameters.model_name, "lctfound-base")

    def test_apply_needs_input_model_and_device_but_not_an_output(self):
        node = SimpleNamespace(inputVolume=None, modelName="", device="auto", outputSegmentation=None)
        self.assertEqual(self.logic.cannot_apply_reason(node), "Select an input volume.")
        node.inputVolume = FakeVolumeNode()
        self.assertEqual(self.logic.cannot_apply_reason(node), "Select a model.")
        self.logic.fill_defaults(node)
        self.assertEqual(node.modelName, "lctfound-base")
        self.assertEqual(self.logic.cannot_apply_reason(node), "")
        node.device = "cuda"
        self.assertIn("not available", self.logic.cannot_apply_reason(node))

    def test_apply_runs_process_through_the_state_machine(self):
        calls = []

        def process(parameters, progress):
            calls.append(parameters)
            progress.update(1, 2, "features")
            progress.update(2, 2, "labels")
            return "segmentation node"

        self.logic.process = process
        node = SimpleNamespace(inputVolume=FakeVolumeNode(), modelName="lctfound-base", device="cpu")
        self.assertEqual(self.logic.apply(node), "segmentation node")
        self.assertEqual(self.logic.state, RunState.FINISHED)
        self.assertEqual(len(calls), 1)
        self.assertIsNone(calls[0].output_segmentation)

    def test_skeleton_process_reports_that_the_task_is_not_available_yet(self):
        node = SimpleNamespace(inputVolume=FakeVolumeNode(), modelName="lctfound-base", device="cpu")
        with self.assertRaises(LCTfoundError):
            self.logic.apply(node)
        self.assertEqual(self.logic.state, RunState.FAILED)
        self.assertIn("segmentation", self.logic.status_summary())


if __name__ == "__main__":
    unittest.main()

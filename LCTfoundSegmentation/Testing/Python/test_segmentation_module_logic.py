"""Headless tests of the LCTfoundSegmentation module logic (`lctfound.logic.SegmentationModuleLogic`).

Written as `unittest.TestCase` so that the same file runs under pytest and inside Slicer
(``slicer_add_python_unittest`` in this folder's CMakeLists.txt). No torch, Qt or models needed:
the model registry and the device list are injected.
"""

import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

from lctfound.logic import DIAGNOSIS, RunState, SegmentationModuleLogic, SegmentationParameters


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
        # A model folder as the registry lists it (the panel reads its metadata to name the recipe).
        (folder / "unet").mkdir()
        (folder / "unet" / "config.json").write_text("{}")
        (folder / "lctfound.json").write_text('{"preset": "cpu-tiny"}')
        self.model = SimpleNamespace(
            name="lctfound-base", path=folder, source="embedded", preset="cpu-tiny", description="Built-in"
        )
        self.logic = SegmentationModuleLogic(
            list_models=lambda extra_folders=(): [self.model], available_devices=lambda: ["cpu"],
            list_task_models=lambda extra_folders=(): [],
        )

    def tearDown(self):
        self._tmp.cleanup()

    def test_reads_camel_case_parameter_node(self):
        volume = FakeVolumeNode()
        node = SimpleNamespace(inputVolume=volume, modelName="lctfound-base", device="cpu")
        parameters = self.logic.parameters_from(node)
        self.assertEqual(parameters, SegmentationParameters(volume, "lctfound-base", "cpu"))
        node.task, node.taskModel, node.keepLargest = DIAGNOSIS, "clf", True
        parameters = self.logic.parameters_from(node)
        self.assertEqual((parameters.task, parameters.task_model, parameters.keep_largest), (DIAGNOSIS, "clf", True))

    def test_status_line_says_what_is_missing_then_what_is_selected(self):
        node = SimpleNamespace(inputVolume=None, modelName="", device="auto")
        self.assertEqual(self.logic.selection_summary(node), "Select an input volume.")
        node.inputVolume = FakeVolumeNode()
        self.assertEqual(self.logic.selection_summary(node), "Select a model.")
        self.assertEqual(self.logic.fill_defaults(node), {"model_name": "lctfound-base"})
        self.assertEqual(
            self.logic.selection_summary(node),
            "Model lctfound-base (built-in, preset cpu-tiny) on Automatic (cpu). Training uses the fast recipe (cached "
            "features on a grid of at most 128², class-balanced pixel subset), 30 epochs. Select a few-shot model "
            "(train one first).",
        )
        node.device = "cuda"
        self.assertIn("not available", self.logic.selection_summary(node))
        node.inputVolume = FakeVolumeNode(imageData=None)
        self.assertEqual(self.logic.selection_summary(node), "The input volume has no image data.")

    def test_nothing_runs_yet(self):
        self.assertEqual(self.logic.state, RunState.IDLE)
        self.assertFalse(self.logic.cancel_button_state().enabled)
        self.assertFalse(self.logic.cancel())


if __name__ == "__main__":
    unittest.main()

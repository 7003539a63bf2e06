"""Headless tests of the LCTfoundEnhance module logic (`lctfound.logic.EnhanceModuleLogic`).

Written as `unittest.TestCase` so that the same file runs under pytest and inside Slicer
(``slicer_add_python_unittest`` in this folder's CMakeLists.txt). No torch, Qt or models needed.
"""

import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

from lctfound.logic import EnhanceModuleLogic


class FakeVolumeNode:
    def __init__(self, nodeId, imageData=object()):
        self._id = nodeId
        self._imageData = imageData

    def GetID(self):
        return self._id

    def GetImageData(self):
        return self._imageData


class EnhanceModuleLogicTest(unittest.TestCase):
    def setUp(self):
        self._tmp = tempfile.TemporaryDirectory()
        self.folder = Path(self._tmp.name)
        (self.folder / "denoiser").mkdir()
        model = SimpleNamespace(
            name="denoiser", path=self.folder / "denoiser", source="user", preset="cpu-base", description=""
        )
        self.logic = EnhanceModuleLogic(
            list_models=lambda extra_folders=(): [model], available_devices=lambda: ["cuda", "cpu"],
            list_task_models=lambda extra_folders=(): [],
        )

    def tearDown(self):
        self._tmp.cleanup()

    def test_fill_defaults_on_a_parameter_node(self):
        node = SimpleNamespace(task="super-resolution", inputVolume=None, modelName="", device="")
        self.assertEqual(self.logic.fill_defaults(node), {"model_name": "denoiser", "device": "auto"})
        self.assertEqual((node.modelName, node.device), ("denoiser", "auto"))

    def test_status_line(self):
        node = SimpleNamespace(task="super-resolution", inputVolume=FakeVolumeNode("vtkMRMLScalarVolumeNode1"),
                               modelName="denoiser", device="auto")
        self.assertEqual(self.logic.selection_summary(node), "Super-resolution with model denoiser on Automatic (cuda).")
        node.device = "cpu"
        self.assertEqual(self.logic.selection_summary(node), "Super-resolution with model denoiser on CPU.")
        node.modelName = "gone"
        self.assertEqual(self.logic.selection_summary(node), "Model 'gone' is not installed here.")
        node.task, node.interpolation = "super-resolution", "bicubic"  # no model needed
        self.assertEqual(self.logic.selection_summary(node), "Super-resolution with no model on CPU.")
        node.task = "low-dose"  # TV denoising by default: no model needed
        self.assertEqual(self.logic.selection_summary(node), "Low-dose enhancement with no model on CPU.")

    def test_input_file_paths_are_accepted(self):
        path = self.folder / "ct.nii.gz"
        node = SimpleNamespace(task="simulate-low-dose", inputVolume=str(path), modelName="denoiser", device="cpu")
        self.assertTrue(self.logic.selection_summary(node).startswith("Input file not found"))
        path.write_bytes(b"")
        self.assertEqual(self.logic.selection_summary(node), "Simulate low dose with no model on CPU.")


if __name__ == "__main__":
    unittest.main()

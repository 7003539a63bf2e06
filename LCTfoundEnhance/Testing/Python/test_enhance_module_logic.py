"""Headless tests of the LCTfoundEnhance module logic (`lctfound.logic.EnhanceModuleLogic`).

Written as `unittest.TestCase` so that the same file runs under pytest and inside Slicer
(``slicer_add_python_unittest`` in this folder's CMakeLists.txt). No torch, Qt or models needed.
"""

import tempfile
import unittest
from pathlib import Path
from types import SimpleNamespace

from lctfound.logic import EnhanceModuleLogic, EnhanceParameters


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
            name="denoiser", path=self.folder / "denoiser", source="user", preset="lctfound", description=""
        )
        self.logic = EnhanceModuleLogic(
            list_models=lambda extra_folders=(): [model], available_devices=lambda: ["cuda", "cpu"]
        )

    def tearDown(self):
        self._tmp.cleanup()

    def parameters(self, **values):
        base = dict(input_volume=FakeVolumeNode("vtkMRMLScalarVolumeNode1"), model_name="denoiser", device="auto")
        base.update(values)
        return EnhanceParameters(**base)

    def test_new_output_volume_is_allowed(self):
        self.assertEqual(self.logic.cannot_apply_reason(self.parameters(output_volume=None)), "")
        other = FakeVolumeNode("vtkMRMLScalarVolumeNode2")
        self.assertEqual(self.logic.cannot_apply_reason(self.parameters(output_volume=other)), "")

    def test_input_is_never_the_output(self):
        volume = FakeVolumeNode("vtkMRMLScalarVolumeNode1")
        same_node = self.parameters(input_volume=volume, output_volume=volume)
        self.assertIn("must differ", self.logic.cannot_apply_reason(same_node))
        same_id = self.parameters(output_volume=FakeVolumeNode("vtkMRMLScalarVolumeNode1"))
        self.assertIn("must differ", self.logic.cannot_apply_reason(same_id))

    def test_input_is_never_the_output_for_files(self):
        path = self.folder / "ct.nii.gz"
        path.write_bytes(b"")
        parameters = self.parameters(input_volume=str(path), output_volume=self.folder / "." / "ct.nii.gz")
        self.assertIn("must differ", self.logic.cannot_apply_reason(parameters))
        parameters.output_volume = self.folder / "enhanced.nii.gz"
        self.assertEqual(self.logic.cannot_apply_reason(parameters), "")

    def test_missing_input_is_reported_before_the_output_check(self):
        parameters = self.parameters(input_volume=None, output_volume=None)
        self.assertEqual(self.logic.cannot_apply_reason(parameters), "Select an input volume.")

    def test_reads_camel_case_parameter_node(self):
        output = FakeVolumeNode("vtkMRMLScalarVolumeNode9")
        node = SimpleNamespace(inputVolume=None, modelName="", device="", outputVolume=output)
        parameters = self.logic.parameters_from(node)
        self.assertIs(parameters.output_volume, output)
        self.assertEqual(self.logic.fill_defaults(node), {"model_name": "denoiser", "device": "auto"})
        self.assertEqual((node.modelName, node.device), ("denoiser", "auto"))


if __name__ == "__main__":
    unittest.main()

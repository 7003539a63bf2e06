"""Headless tests of the LCTfoundCTFM module logic (`lctfound.logic.CTFMLogic`) driven the way the
panel drives it: one parameters object, the CT-FM backbones and what they refuse, and a point query
with its heat map on a small synthetic volume (a tiny random CT-FM encoder saved in the published
layout; the real weights are not needed to check the plumbing), run as a job (re-placing the point
moves it), with Cancel.

Written as `unittest.TestCase` so that the same file runs under pytest (with the slicer-core wheel)
and inside Slicer (``slicer_add_python_unittest`` in this folder's CMakeLists.txt). Skipped without
torch or MRML.
"""

import os
import tempfile
import time
import unittest
from pathlib import Path

try:
    import numpy as np
    import torch

    from lctfound import mrml
    from lctfound.ctfm.features import WindowSettings
    from lctfound.ctfm.model import load_model, new_model, save_model
    from lctfound.ctfm.preprocess import prepare_volume
    from lctfound.ctfm.retrieval import build_index
    from lctfound.ctfm.tasks import inventory
    from lctfound.errors import LCTfoundError
    from lctfound.io.volume import CTVolume, write_volume
    from lctfound.logic import CTFMLogic, CTFMParameters, RunState

    mrml.new_headless_scene()
    MISSING = ""
except ImportError as error:  # torch (Slicer's PyTorch extension) or MRML (the slicer-core wheel)
    MISSING = str(error)

#: A CT-FM-shaped encoder small enough for a test (the real one has init_filters 32).
SMALL = {"blocks_down": [1, 1, 1, 1, 1], "in_channels": 1, "init_filters": 4, "spatial_dims": 3}
#: Windows of 32³ prepared voxels, half overlapping: 3 × 3 × 3 windows on a 64³ volume.
WINDOWS = (32, 32, 32)


def scan(seed):
    """64³ voxels of soft tissue (1 × 1 × 3 mm, CT-FM's own spacing) with a bright 6 mm sphere: in the
    middle for seed 0 (where the test queries), off-centre for the others."""
    rng = np.random.default_rng(seed)
    array = (40.0 + 15.0 * rng.standard_normal((64, 64, 64))).astype(np.float32)
    centre = np.array([31.5, 31.5, 31.5]) if seed == 0 else np.array([12.0, 50.0, 20.0])  # (k, j, i)
    k, j, i = np.meshgrid(*[np.arange(64)] * 3, indexing="ij")
    mm = (np.stack([k, j, i], -1) - centre) * np.array([3.0, 1.0, 1.0])
    array[(mm ** 2).sum(-1) <= 6.0 ** 2] = 900.0
    return CTVolume(array, (1.0, 1.0, 3.0), (10.0, -20.0, 30.0))


@unittest.skipIf(MISSING, f"needs torch and MRML: {MISSING}")
class CTFMModuleLogicTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls._threads = torch.get_num_threads()
        torch.set_num_threads(1)  # other work shares the CPU of test machines
        cls._tmp = tempfile.TemporaryDirectory()
        cls.folder = Path(cls._tmp.name)
        cls._cache = os.environ.get("LCTFOUND_CACHE_DIR")
        os.environ["LCTFOUND_CACHE_DIR"] = str(cls.folder / "cache")  # no task models of the user's
        cls.encoder = cls.folder / "encoder"
        save_model(new_model(SMALL, seed=0), cls.encoder)
        cohort = cls.folder / "cohort"
        cohort.mkdir()
        for seed in range(2):
            write_volume(scan(seed), cohort / f"case{seed}.nrrd")  # NRRD keeps the geometry exactly
        cls.index = build_index(load_model(cls.encoder), sorted(cohort.iterdir()), cls.folder / "index",
                                WindowSettings(WINDOWS, 0.5, 4), validate=False)
        cls.query_file = cohort / "case0.nrrd"

    @classmethod
    def tearDownClass(cls):
        torch.set_num_threads(cls._threads)
        if cls._cache is None:
            os.environ.pop("LCTFOUND_CACHE_DIR", None)
        else:
            os.environ["LCTFOUND_CACHE_DIR"] = cls._cache
        cls._tmp.cleanup()

    def setUp(self):
        # The inventory in this process (the panel runs it in a child: Testing/test_ctfm_logic.py checks that).
        self.logic = CTFMLogic(inventory=inventory, available_devices=lambda: ["cpu"], runs_root=self.folder / "runs")
        self.parameters = CTFMParameters(encoder_folder=str(self.encoder), device="cpu")

    def test_backbones_and_encoder_folder(self):
        self.assertEqual([choice.value for choice in self.logic.backbone_choices()], ["lctfound", "ctfm"])
        self.assertEqual(self.logic.use_encoder_folder(self.parameters.encoder_folder), "encoder")
        self.assertIn("encoder", [choice.value for choice in self.logic.choices("modelName")])
        self.assertEqual(self.logic.fill_defaults(self.parameters)["model_name"], "encoder")
        self.assertTrue(self.logic.selection_summary(self.parameters).startswith("Model encoder (folder, preset ctfm)"))
        self.parameters.encoder_folder = str(self.folder)  # not an encoder
        self.assertIn("not a CT-FM encoder", self.logic.selection_summary(self.parameters))

    def test_generative_tasks_are_refused(self):
        states = self.logic.task_states("ctfm")
        for task in ("generation", "enhancement", "virtual-cta", "sparse-view-reconstruction"):
            self.assertFalse(states[task].enabled)
            self.assertIn("no image decoder", states[task].tooltip)
            self.assertNotIn(task, self.logic.offered_tasks("ctfm"))
        self.assertTrue(states["retrieval"].enabled and states["segmentation-decoder"].enabled)
        with self.assertRaisesRegex(LCTfoundError, "unknown CT-FM action 'enhance'"):
            self.logic.action_state("enhance", self.parameters)

    def _query_scene(self):
        """A scene with the first indexed scan loaded and a fiducial at the centre of its middle window
        (neighbour windows on every side, so the heat map has a single peak there)."""
        scene = mrml.new_headless_scene()
        node = mrml.load_volume(scene, self.query_file, "query")
        point = prepare_volume(mrml.ctvolume_from_volume_node(node)).index_to_ras(np.array([31.5, 31.5, 31.5]))
        fiducial = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        self.logic.use_encoder_folder(self.parameters.encoder_folder)
        self.logic.fill_defaults(self.parameters)
        p = self.parameters
        p.input_volume, p.query_kind, p.query_point, p.top_k = node, "point", fiducial, 5
        self.assertEqual(self.logic.action_state("search", p).tooltip,
                         "Choose an index folder (or build one from a folder of volumes).")
        p.index_folder = str(self.index)
        self.assertIn("Place a point", self.logic.action_state("search", p).tooltip)
        fiducial.AddControlPointWorld([0.0, 0.0, 0.0])  # placed first, then placed again at the point
        fiducial.AddControlPointWorld([float(v) for v in point])
        self.assertEqual(self.logic.keep_last_point(fiducial), 1)  # what the panel does when a point is placed
        self.assertEqual(fiducial.GetNumberOfControlPoints(), 1)
        self.assertTrue(np.allclose(self.logic.point_from_markup(fiducial), point))
        self.assertTrue(self.logic.action_state("search", p).enabled)
        return scene, node, np.asarray(point)

    def _wait(self):
        deadline = time.monotonic() + 600  # a guard only: the loop ends when the job does
        while self.logic.state.busy and time.monotonic() < deadline:
            self.logic.poll()
            time.sleep(0.1)

    def test_point_query_with_heat_map(self):
        scene, node, point = self._query_scene()
        before = scene.GetNumberOfNodes()
        job = self.logic.start_search(self.parameters)
        self.assertEqual(job.command[3:5], ["ctfm", "search"])
        self.assertEqual(scene.GetNumberOfNodes(), before)  # results are added when the job has finished
        self._wait()
        self.assertIs(self.logic.state, RunState.FINISHED, job.stderr_tail)
        self.assertIn("best 'case0'", self.logic.status_summary())
        self.assertEqual(self.logic.apply_finished_job(self.parameters), {"results_table": self.logic.results_table})
        table, heatmap = self.parameters.results_table, self.logic.heatmap_node
        rows = table.GetTable()
        self.assertEqual(rows.GetNumberOfRows(), 2)
        self.assertEqual(rows.GetValueByName(0, "case").ToString(), "case0")  # the loaded scan itself …
        self.assertAlmostEqual(rows.GetValueByName(0, "score").ToDouble(), 1.0, places=4)
        centre = [rows.GetValueByName(0, f"centre_{axis}").ToDouble() for axis in "RAS"]
        self.assertLess(np.linalg.norm(np.asarray(centre) - point), 0.01)  # … at the queried window
        self.assertEqual(rows.GetValueByName(1, "case").ToString(), "case1")

        self.assertNotEqual(heatmap.GetID(), node.GetID())  # a new node on the input's grid
        self.assertTrue(np.allclose(mrml.volumes.ijk_to_ras_of(heatmap), mrml.volumes.ijk_to_ras_of(node)))
        values = mrml.ctvolume_from_volume_node(heatmap).array
        self.assertAlmostEqual(float(values.max()), 1.0, delta=0.01)
        # the peak is one of the 8 voxels around the window centre (which lies between voxels)
        self.assertLess(np.linalg.norm(np.asarray(self.logic.peak_ras(heatmap)) - point), 1.7)

        loaded, jump = self.logic.load_match(table, 1)  # the second scan, where its best window is
        self.assertEqual((loaded.GetName(), loaded.GetScene()), ("case1", scene))
        self.assertEqual(len(jump), 3)

    def test_cancel_adds_nothing(self):
        scene, _, _ = self._query_scene()
        before = scene.GetNumberOfNodes()
        self.logic.start_search(self.parameters)
        self.assertIs(self.logic.state, RunState.RUNNING)
        self.assertTrue(self.logic.cancel())  # Cancel clicked at once: the job's process tree ends
        self._wait()
        self.assertIs(self.logic.state, RunState.CANCELLED)
        self.assertEqual(scene.GetNumberOfNodes(), before)
        self.assertIsNone(self.logic.results_table)
        self.assertEqual(self.logic.apply_finished_job(self.parameters), {})
        self.assertFalse(self.logic.cancel())  # nothing runs any more


if __name__ == "__main__":
    unittest.main()

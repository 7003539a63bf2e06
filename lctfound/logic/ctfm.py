"""Qt-free logic of the CT-FM module: CT-FM as a second backbone inside Slicer (or a web panel).

`CTFMLogic` offers what the backbone registry says CT-FM can do, and says why the rest is
greyed out (`task_states`: generative tasks need LCTfound's image decoder). On loaded volume
nodes it

* embeds a volume (512-d, `embed_volume_node`);
* searches an index folder (`lctfound ctfm index`) by the whole scan, by a point (RAS, e.g. a
  markups fiducial: `point_from_markup`) or by a region (two RAS corners, e.g. an ROI node:
  `region_from_roi`), returning ranked rows ``rank, case, score, path`` (+ the best window's
  centre for point/region queries, to jump there);
* creates the similarity heat map of a query as a NEW scalar volume node on the query volume's
  own grid (same IJK→RAS matrix and parent transform; never overwriting a node), styled as a
  foreground overlay;
* classifies a volume with a linear probe (a row in the columns of ``lctfound classify predict``)
  and segments it with a trained decoder into a NEW segmentation node.

A panel (the Slicer module LCTfoundCTFM) drives it from one parameters object (`CTFMParameters`, a
dataclass or a parameter node): `choices`, `visible_fields`, `action_state`, then one job per action
(`lctfound.jobs`: a child process with ``--events``, progress, a real Cancel; `poll()` follows it):

* `start_index` → ``lctfound ctfm index``; `start_training` → ``ctfm probe-train`` / ``seg-train``;
* `start_search` → ``ctfm search``, `start_classify` → ``ctfm probe-predict``, `start_segment` →
  ``ctfm seg-predict``: the input volume (and the query point or box, in world RAS) is read from the
  scene when the button is clicked and exported into a new run folder; the command ends with a
  ``result`` event; when the job has finished, `poll()` (on the GUI thread) adds the results as NEW
  nodes: the ranked table and the heat map, the classification row, the segmentation.

"Run on" a department server (`lctfound serve`): Search is the same ``ctfm search`` job with ``--server``, on
an index the server's administrator offers by name (the index selector then lists the server's indexes, the
encoder selector its CT-FM encoders); the ranking comes back into the same results table, without the heat
map (made on this computer only) and without the indexed scans (they stay on the server). Building an index
runs on this computer: a server searches only the indexes its administrator offers, so there is no panel
action to send (`lctfound.cli.remote_tasks` says why). Classification, segmentation and training are no
server tasks.

The panel's process never imports PyTorch: the encoders, probes, decoders and devices are listed by
``lctfound ctfm list --json`` in a child process (`inventory`), and everything else runs in jobs.
`search`, `query`, `create_heatmap_node`, `classify_volume_node` and `segment_volume_node` do the same
work in this process, for scripts and tests.

Geometry: node → `CTVolume` (`lctfound.mrml.ctvolume_from_volume_node`, parent linear transform
applied, so points in world RAS match) → CT-FM's prepared space (`prepare_volume`, exact affine)
→ back onto the node's voxels (`PreparedVolume.to_source_grid`), without a voxel of shift.

Nothing here imports Qt, Slicer or torch at import time; MRML nodes are used through
`lctfound.mrml` inside the methods.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ..ctfm.layout import ENCODER_KIND, INDEX_KIND, missing_index_file
from ..errors import InputError, LCTfoundError
from .base import AUTO_DEVICE, ButtonState, Choice, ModuleLogicBase, RunState, _camel_case, _snake_case, export_volume_node
from .server import server_arguments
from .train import chosen_path

if TYPE_CHECKING:
    from ..jobs import Job

logger = logging.getLogger(__name__)

#: Node attribute naming the query of a heat map (JSON) and the model that made a result.
HEATMAP_ATTRIBUTE = "LCTfound.CTFMQuery"
MODEL_ATTRIBUTE = "LCTfound.CTFMModel"
#: Table attribute naming the server that ranked a search's results (its scans stay there).
SERVER_ATTRIBUTE = "LCTfound.CTFMServer"
QUERY_KINDS = (
    Choice("scan", "Whole scan", "Rank indexed scans by the whole-scan embedding."),
    Choice("point", "Point", "Rank indexed scans by their window most similar to the window around a point."),
    Choice("region", "Region", "Rank indexed scans by their window most similar to a box (ROI)."),
)
#: Slicer colour table of heat-map overlays (used when the scene has it; headless scenes do not).
HEATMAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"
TRAINING_KINDS = (
    Choice("probe", "Linear probe (scan classification)",
           "A linear layer on frozen CT-FM embeddings, trained from a CSV table with the columns image,label."),
    Choice("decoder", "Segmentation decoder",
           "A 3D decoder on the CT-FM encoder, trained from a CSV table with the columns image,labels and/or the "
           "input volume with a segmentation."),
)
DECODER_MODES = (
    Choice("frozen", "Frozen encoder", "Train the decoder only (faster, less memory)."),
    Choice("full", "Full fine-tune", "Fine-tune the encoder too; it is then stored in the task model."),
)
#: The panel's actions (one button each) and what they do.
ACTIONS = {
    "index": "Index every volume of the folder for search, in the background",
    "search": "Rank the indexed scans by similarity with the query and map the similarity over the input volume",
    "classify": "Classify the input volume with the probe",
    "segment": "Segment the input volume with the decoder (a new segmentation)",
    "train": "Train the task model in the background and register it under the new name",
}
#: Panel actions → the server task that runs them (`CTFMLogic.server_tasks`); the others are not server tasks.
SERVER_TASKS = {"search": "ctfm-search"}
#: What the panel says on a server about the heat map, Build index and Load match.
HEATMAP_NOT_ON_SERVER = ("The similarity heat map is made on this computer only: a search on a server brings back "
                         "the ranking.")
INDEX_NOT_ON_SERVER = ("Indexing runs on this computer (a server searches only the indexes its administrator offers); "
                       "clear the server address to build an index.")
MATCH_ON_SERVER = ("The scans of a server's index stay on the server: only the ranking comes back, so this result "
                   "cannot be loaded here.")
#: Parameters that name a server's model → its kind in the server's ``GET /models``.
SERVER_KINDS = {"model_name": ENCODER_KIND, "server_index": INDEX_KIND}
#: Task-model parameters → the task their models do.
TASK_MODEL_PARAMETERS = {"probe_model": "ctfm-probe", "decoder_model": "ctfm-segmentation"}
#: Window of indexes built from the panel: CT-FM's published window (multiples of 16).
INDEX_WINDOW = (32, 128, 128)
#: Files in the run folder of a search, classify or segment job.
INPUT_FILE = "volume.nrrd"  # the input volume node, exported (world geometry)
HEATMAP_FILE = "heatmap.nrrd"
PREDICTIONS_FILE = "predictions.csv"
SEGMENTATION_FILE = "segmentation.nrrd"
#: Seconds `lctfound ctfm list` may take (it imports PyTorch and MONAI, slow on a busy machine).
INVENTORY_TIMEOUT_S = 600


@dataclass
class CTFMParameters:
    """What the panel holds: the input volume (node, `CTVolume` or file path), the CT-FM encoder
    (a name from `models()` or a folder), the device and the query."""

    input_volume: Any = None
    model_name: str = ""
    device: str = AUTO_DEVICE
    index_folder: Any = ""
    #: On a server: the name of an index it offers (`lctfound serve --models NAME=INDEX_FOLDER`).
    server_index: str = ""
    query_kind: str = "scan"
    top_k: int = 10
    #: A CT-FM encoder folder (published layout) offered besides the listed ones.
    encoder_folder: Any = ""
    #: The folder of volumes `start_index` indexes.
    cohort_folder: Any = ""
    query_point: Any = None  # markups fiducial node: its first control point
    query_region: Any = None  # markups ROI node
    show_heatmap: bool = True
    results_table: Any = None  # the table node of the last search (front ends show it)
    probe_model: str = ""  # a ctfm-probe task model (its folder, as `task_model_choices` gives it)
    decoder_model: str = ""  # a ctfm-segmentation task model
    training_kind: str = "probe"
    training_table: Any = ""  # CSV: image,label (probe) or image,labels (decoder)
    training_segmentation: Any = None  # decoder: a segmentation of the input volume, exported as one more pair
    decoder_mode: str = "frozen"
    max_steps: int = 0  # 0: the command's default length
    new_model_name: str = ""
    #: "Run on" (see `lctfound.logic.server`).
    server_url: str = ""
    server_token_file: str = ""


@dataclass
class Query:
    """A query vector with where it came from (``centre_ras`` for point/region queries)."""

    vector: Any
    level: str  # "volume" or "window" (the index level it is compared with)
    kind: str  # scan, point or region
    centre_ras: Optional[list[float]] = None
    prepared: Any = None  # the query volume in CT-FM's space (reused by the heat map)
    volume: Any = None  # the query volume as a CTVolume


@dataclass
class SearchResult:
    query: Query
    rows: list[dict[str, Any]] = field(default_factory=list)
    settings: Any = None  # the index's window settings (a heat map of the query uses them too)


def _node_name(node: Any) -> str:
    get_name = getattr(node, "GetName", None)
    return get_name() if callable(get_name) else str(node)


def _device_arguments(device: str) -> list[str]:
    """The ``--device`` of a job; `device_environment` shows it only the chosen GPU."""
    return ["--device", "cpu" if device == "cpu" else "auto"]


def _coordinates(values: Sequence[float]) -> str:
    """``R,A,S`` for the command line, without rounding."""
    return ",".join(repr(float(value)) for value in values)


def _weights_missing(path: Path) -> str:
    """Why ``path`` cannot hold CT-FM weights at all (not there, no .safetensors file), else ``""``.
    Only a first sieve: the inventory checks the rest strictly."""
    if path.is_dir():
        return "" if any(child.suffix == ".safetensors" for child in path.iterdir()) else \
            f"{path}: no .safetensors weights in this folder"
    if path.is_file():
        return "" if path.suffix.lower() == ".safetensors" else f"{path}: not a folder or a .safetensors file"
    return f"{path}: no such folder or file"


class CTFMLogic(ModuleLogicBase):
    """Backbones and capabilities, retrieval, heat maps, probe and decoder on loaded volumes."""

    task_name = "CT-FM"
    parameters_class = CTFMParameters
    server_jobs = frozenset(SERVER_TASKS.values())

    def __init__(self, *, ctfm_folders: Sequence[Any] = (),
                 inventory: Optional[Callable[[list[str]], dict[str, Any]]] = None, **kwargs: Any) -> None:
        """``ctfm_folders``: CT-FM encoder folders to offer (besides the published repos already in
        the local Hugging Face cache); task models are found in the user model folder.
        ``inventory(folders)`` lists encoders, task models and devices (`lctfound.ctfm.tasks.inventory`'s
        answer); by default ``lctfound ctfm list --json`` answers in a child process, so that this process
        never imports PyTorch. ``list_models``, ``list_task_models`` and ``available_devices`` replace
        parts of it."""
        kwargs.setdefault("list_models", self._listed_encoders)
        kwargs.setdefault("list_task_models", self._listed_task_models)
        kwargs.setdefault("available_devices", self._listed_devices)
        super().__init__(extra_model_folders=ctfm_folders, **kwargs)
        self._inventory_source = inventory
        self._inventory: Optional[dict[str, Any]] = None
        #: Why the inventory could not be taken (empty when it worked).
        self.inventory_error = ""
        self._loaded: dict[tuple[str, str], Any] = {}
        self.run_output: Optional[Path] = None
        self.loss_history: list[tuple[int, float]] = []
        #: What the current (or last) job does: index, probe, decoder, search, classify or segment; the
        #: name a training job registers.
        self.job_kind = ""
        self.registered_name = ""
        #: The parameters a search, classify or segment job started with (its nodes are read at its end).
        self.job_parameters: Optional[CTFMParameters] = None
        #: The server the current (or last) job runs on ('' on this computer).
        self.job_server = ""
        self._job_model: Optional[Path] = None
        self._results: list[dict[str, Any]] = []  # the job's "result" events
        #: What the last finished search, classify or segment job added (NEW nodes) or predicted.
        self.results_table: Any = None
        self.heatmap_node: Any = None
        self.result_segmentation: Any = None
        self.classification_row: Optional[dict[str, str]] = None

    # -- what is installed here (listed in a child process) ----------------------------------

    def inventory(self) -> dict[str, Any]:
        """Encoders (with the reasons other offered folders are not), probes and decoders, devices:
        taken once for the offered folders (`refresh()` takes it again). On failure it is empty and
        `inventory_error` says why."""
        if self._inventory is None:
            folders = [str(folder) for folder in self.extra_model_folders]
            try:
                self._inventory = (self._inventory_source or self._inventory_in_child)(folders)
                self.inventory_error = ""
            except LCTfoundError as error:
                logger.warning("cannot list the CT-FM models: %s", error)
                self._inventory = {"encoders": [], "rejected": {}, "task_models": [], "devices": []}
                self.inventory_error = str(error)
        return self._inventory

    def _inventory_in_child(self, folders: list[str]) -> dict[str, Any]:
        from ..jobs import child_environment

        command = [str(self.python or sys.executable), "-m", "lctfound", "ctfm", "list", "--json",
                   *(f"--folder={folder}" for folder in folders)]
        options: dict[str, Any] = {}
        if os.name == "nt":
            options["creationflags"] = subprocess.CREATE_NO_WINDOW  # type: ignore[attr-defined]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8",
                                  errors="replace", env=child_environment(), timeout=INVENTORY_TIMEOUT_S, **options)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise LCTfoundError(f"cannot list the CT-FM models: {error}") from None
        if done.returncode != 0:
            lines = [line for line in done.stderr.splitlines() if line.strip()]
            errors = [line[len("error: "):] for line in lines if line.startswith("error: ")]
            reason = errors[-1] if errors else lines[-1] if lines else f"exit code {done.returncode}"
            raise LCTfoundError(f"cannot list the CT-FM models: {reason}")
        try:
            return json.loads(done.stdout)
        except ValueError:
            raise LCTfoundError(f"cannot list the CT-FM models: unexpected answer {done.stdout[:200]!r}") from None

    def _listed_encoders(self, extra_folders: Any = ()) -> list[Any]:
        from ..models.registry import ModelEntry

        inventory = self.inventory()
        if self.inventory_error:
            raise LCTfoundError(self.inventory_error)
        return [ModelEntry(entry["name"], Path(entry["path"]), entry["source"], entry["preset"], entry["description"])
                for entry in inventory["encoders"]]

    def _listed_task_models(self, extra_folders: Any = ()) -> list[Any]:
        return [types.SimpleNamespace(**{**entry, "path": Path(entry["path"])})
                for entry in self.inventory()["task_models"]]

    def _listed_devices(self) -> list[str]:
        inventory = self.inventory()
        if self.inventory_error:  # shown as the device problem (the usual cause: PyTorch missing)
            raise ImportError(self.inventory_error)
        return list(inventory["devices"])

    def refresh(self) -> None:
        super().refresh()
        self._inventory = None

    # -- backbones and what they can do ------------------------------------------------------

    @staticmethod
    def backbone_choices() -> list[Choice]:
        """Every backbone of the registry, with its capabilities in the tooltip."""
        from ..backbones import list_backbones, tasks_for

        return [Choice(b.name, b.title, f"{b.notes}. Offers: {', '.join(tasks_for(b))}") for b in list_backbones()]

    @staticmethod
    def task_states(backbone: str = "ctfm") -> dict[str, ButtonState]:
        """Every task of the registry → enabled or not for ``backbone``, with the reason as tooltip."""
        from ..backbones import TASKS, supports, unsupported_reason

        return {task: ButtonState(supports(backbone, task), unsupported_reason(backbone, task) or description)
                for task, description in TASKS.items()}

    @staticmethod
    def offered_tasks(backbone: str = "ctfm") -> tuple[str, ...]:
        from ..backbones import tasks_for

        return tasks_for(backbone)

    def task_model_choices(self, task: str) -> list[Choice]:
        """Trained CT-FM task models (``ctfm-probe`` / ``ctfm-segmentation``) in the user model folder."""
        return [Choice(str(entry.path), entry.name, entry.description or str(entry.path))
                for entry in self.task_models() if entry.task == task]

    # -- models ------------------------------------------------------------------------------

    def load_backbone(self, model: Any = None, device: Optional[str] = None) -> Any:
        """A loaded CT-FM encoder: ``model`` as a `CTFMModel`, a name from `models()` or a folder
        (loaded once per device and kept)."""
        from ..ctfm.model import CTFMModel, load_model
        from ..devices import resolve_device

        if isinstance(model, CTFMModel):
            return model
        name = str(model or self.default_model_name() or "")
        if not name:
            raise LCTfoundError("No CT-FM encoder is available: add the folder of a local copy of "
                                "project-lighter/ct_fm_feature_extractor (LCTfound never downloads weights).")
        entry = self.find_model(name)
        path = Path(entry.path) if entry is not None else Path(name).expanduser()
        torch_device = resolve_device(device or AUTO_DEVICE)
        key = (str(path), str(torch_device))
        if key not in self._loaded:
            self._loaded[key] = load_model(path, device=torch_device)
        return self._loaded[key]

    def model_path(self, model: Any = None) -> Path:
        """The folder of a CT-FM encoder (a `CTFMModel`, a name from `models()` or a folder), unloaded."""
        from ..ctfm.model import CTFMModel

        if isinstance(model, CTFMModel):
            if model.path is None:
                raise LCTfoundError("this CT-FM encoder has no folder; save it first (jobs load it from disk)")
            return Path(model.path)
        name = str(model or self.default_model_name() or "")
        entry = self.find_model(name)
        path = Path(entry.path) if entry is not None else Path(name).expanduser()
        if not name or not path.exists():
            raise LCTfoundError(f"CT-FM encoder {name!r} not found (not a listed model and not a folder)")
        return path

    # -- geometry helpers --------------------------------------------------------------------

    @staticmethod
    def point_from_markup(node: Any, index: int = -1) -> list[float]:
        """World RAS position of control point ``index`` of a markups node (transforms applied); by
        default the last one, the point placed most recently."""
        count = node.GetNumberOfControlPoints() if hasattr(node, "GetNumberOfControlPoints") else 0
        if index < 0:
            index += count
        if not 0 <= index < count:
            raise LCTfoundError(f"markups '{_node_name(node)}' has no control point {index + 1} (it has {count})")
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        return [float(v) for v in position]

    @staticmethod
    def keep_last_point(node: Any) -> int:
        """Remove every control point but the last (the one just placed): the query is one point, and
        placing it again moves it. Returns how many were removed."""
        removed = 0
        while node.GetNumberOfControlPoints() > 1:
            node.RemoveNthControlPoint(0)
            removed += 1
        return removed

    @staticmethod
    def region_from_roi(node: Any) -> tuple[list[float], list[float]]:
        """Two opposite world RAS corners of the axis-aligned box around an ROI node."""
        bounds = [0.0] * 6
        node.GetRASBounds(bounds)
        if bounds[1] < bounds[0] or bounds[3] < bounds[2] or bounds[5] < bounds[4]:
            raise LCTfoundError(f"ROI '{_node_name(node)}' is empty")
        return [bounds[0], bounds[2], bounds[4]], [bounds[1], bounds[3], bounds[5]]

    @staticmethod
    def volume_of(volume: Any, validate: bool = False) -> Any:
        """A `CTVolume` of a volume node (world geometry), a `CTVolume`, or a file path."""
        from ..io.volume import CTVolume, read_volume

        if isinstance(volume, CTVolume):
            return volume
        if isinstance(volume, (str, Path)):
            return read_volume(volume, validate=validate)
        from ..mrml import ctvolume_from_volume_node

        return ctvolume_from_volume_node(volume)

    # -- embeddings, search and heat maps ----------------------------------------------------

    def embed_volume_node(self, volume: Any, model: Any = None, aggregation: str = "mean", settings: Any = None,
                          progress: Any = None) -> Any:
        """The 512-d embedding (numpy) of a loaded volume."""
        from ..ctfm.features import WindowSettings, embed_volume

        vector, _ = embed_volume(self.load_backbone(model), self.volume_of(volume), aggregation,
                                 settings or WindowSettings(), progress=progress)
        return vector

    def query(self, volume: Any, model: Any = None, point_ras: Optional[Sequence[float]] = None,
              region: Optional[tuple[Sequence[float], Sequence[float]]] = None, settings: Any = None,
              aggregation: str = "mean", progress: Any = None) -> Query:
        """The query vector of a whole scan, of the window around a RAS point, or of a RAS box."""
        from ..ctfm.features import WindowSettings, embed_point, embed_region, embed_volume
        from ..ctfm.preprocess import prepare_volume

        if point_ras is not None and region is not None:
            raise LCTfoundError("query by a point or by a region, not both")
        encoder = self.load_backbone(model)
        settings = settings or WindowSettings()
        ct = self.volume_of(volume)
        prepared = prepare_volume(ct)
        if point_ras is not None:
            vector, centre = embed_point(encoder, prepared, point_ras, settings.window)
            return Query(vector, "window", "point", [float(v) for v in centre], prepared, ct)
        if region is not None:
            vector, centre = embed_region(encoder, prepared, region[0], region[1], settings)
            return Query(vector, "window", "region", [float(v) for v in centre], prepared, ct)
        vector, _ = embed_volume(encoder, prepared, aggregation, settings, progress=progress)
        return Query(vector, "volume", "scan", None, prepared, ct)

    def search(self, index_folder: Any, volume: Any, model: Any = None, point_ras: Optional[Sequence[float]] = None,
               region: Optional[tuple[Sequence[float], Sequence[float]]] = None, top_k: int = 10,
               progress: Any = None) -> SearchResult:
        """Rank the scans of an index by similarity with the query (whole scan, point or region);
        the window settings and aggregation come from the index, the model must be the index's."""
        from ..ctfm.retrieval import load_index

        if top_k < 1:
            raise LCTfoundError("the number of results must be at least 1")
        index = load_index(index_folder)
        encoder = self.load_backbone(model)
        index.check_model(encoder)
        query = self.query(volume, encoder, point_ras, region, index.settings, index.aggregation, progress)
        matches = index.search(query.vector, query.level, top_k)
        rows = [{"rank": m.rank, "case": m.name, "score": m.score, "path": m.path,
                 **({"centre_ras": m.centre_ras} if m.centre_ras is not None else {})} for m in matches]
        return SearchResult(query, rows, index.settings)

    def create_heatmap_node(self, volume_node: Any, query: Query, model: Any = None, settings: Any = None,
                            name: Optional[str] = None, progress: Any = None) -> Any:
        """A NEW scalar volume node with the cosine similarity of every window of ``volume_node`` with
        the query, on the node's own voxel grid (its IJK→RAS matrix and parent transform), styled as a
        foreground overlay (values −1..1; outside the body crop 0)."""
        import numpy as np

        from ..ctfm.features import WindowSettings, similarity_volume

        encoder = self.load_backbone(model)
        ct = self.volume_of(volume_node)
        same = query.volume is not None and query.prepared is not None and query.volume.same_grid(ct) \
            and np.array_equal(np.asarray(query.volume.array), np.asarray(ct.array))
        heatmap, _ = similarity_volume(encoder, ct, np.asarray(query.vector), settings or WindowSettings(),
                                       prepared=query.prepared if same else None, progress=progress)
        return self._heatmap_node(volume_node, heatmap.array, query, encoder.path, name)

    @classmethod
    def _heatmap_node(cls, volume_node: Any, similarity: Any, query: Query, model_path: Any,
                      name: Optional[str] = None) -> Any:
        """A NEW volume node of ``similarity`` (an array on ``volume_node``'s voxels), on the node's own
        grid and under its parent transform, styled as an overlay."""
        import numpy as np

        from ..io.volume import CTVolume
        from ..mrml import volume_node_from_ctvolume, volume_shape
        from ..mrml.volumes import ijk_to_ras_of

        similarity = np.asarray(similarity, dtype=np.float32)
        if similarity.shape != tuple(volume_shape(volume_node)):
            raise LCTfoundError(f"the similarity map ({similarity.shape}) is not on the voxels of "
                                f"'{_node_name(volume_node)}' ({tuple(volume_shape(volume_node))})")
        local = CTVolume.from_ijk_to_ras(similarity, ijk_to_ras_of(volume_node))
        node = volume_node_from_ctvolume(volume_node.GetScene(), local,
                                         name or f"{volume_node.GetName()} CT-FM similarity",
                                         provenance={"kind": "ctfm-similarity"})
        transform_id = volume_node.GetTransformNodeID()
        if transform_id:
            node.SetAndObserveTransformNodeID(transform_id)
        node.SetAttribute(HEATMAP_ATTRIBUTE, json.dumps({"kind": query.kind, "level": query.level,
                                                         "centre_ras": query.centre_ras}))
        node.SetAttribute(MODEL_ATTRIBUTE, str(model_path or ""))
        cls._style_overlay(node)
        return node

    @staticmethod
    def _style_overlay(node: Any) -> None:
        display = node.GetDisplayNode()
        if display is None:
            return
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)  # similarities below 0 show as the colour table's lowest
        scene = node.GetScene()
        if scene is not None and scene.GetNodeByID(HEATMAP_COLOR_NODE_ID) is not None:
            display.SetAndObserveColorNodeID(HEATMAP_COLOR_NODE_ID)

    @staticmethod
    def peak_ras(node: Any) -> list[float]:
        """World RAS of the voxel with the highest value of a (heat-map) volume node: where to jump."""
        import numpy as np

        from ..mrml import ctvolume_from_volume_node

        volume = ctvolume_from_volume_node(node)
        k, j, i = np.unravel_index(int(np.argmax(volume.array)), volume.shape)
        matrix = volume.ijk_to_ras()
        return [float(v) for v in matrix[:3, :3] @ np.array([i, j, k], dtype=np.float64) + matrix[:3, 3]]

    # -- task models on loaded volumes -------------------------------------------------------

    def classify_volume_node(self, volume: Any, probe: Any, model: Any = None, progress: Any = None) -> dict[str, str]:
        """One prediction row (the columns of ``lctfound classify predict``) for a loaded volume."""
        from ..ctfm.probe import LinearProbe

        probe_model = probe if isinstance(probe, LinearProbe) else LinearProbe.load(
            probe, self.load_backbone(model) if model is not None else None)
        ct = self.volume_of(volume)
        probabilities = probe_model.classify(ct, probe_model.cache(), progress)
        return probe_model.row(_node_name(volume), _node_name(volume), probabilities)

    def segment_volume_node(self, volume_node: Any, decoder: Any, model: Any = None, overlap: float = 0.5,
                            progress: Any = None) -> Any:
        """A NEW segmentation node on ``volume_node`` predicted by a ``ctfm-segmentation`` task model."""
        from ..ctfm.decoder import DecoderSegmenter

        segmenter = decoder if isinstance(decoder, DecoderSegmenter) else DecoderSegmenter.load(
            decoder, self.load_backbone(model) if model is not None else None)
        labels = segmenter.predict(self.volume_of(volume_node), overlap, 1, progress)
        return self._segmentation_node(volume_node, labels.array, segmenter.label_names, segmenter.task_model.folder)

    @staticmethod
    def _segmentation_node(volume_node: Any, labels: Any, names: dict[Any, str], decoder_folder: Any) -> Any:
        """A NEW segmentation node of a label array on ``volume_node``'s voxels."""
        from ..mrml import segmentation_node_from_labels

        node = segmentation_node_from_labels(volume_node.GetScene(), labels, volume_node,
                                             {int(k): v for k, v in names.items()},
                                             name=f"{volume_node.GetName()} CT-FM segmentation")
        node.SetAttribute(MODEL_ATTRIBUTE, str(decoder_folder))
        return node

    # -- training through jobs ---------------------------------------------------------------

    def _training_arguments(self, model: Any, output: Path, max_steps: Optional[int], learning_rate: Optional[float],
                            batch_size: Optional[int], register_as: str, device: str) -> list[str]:
        args = ["--model", str(self.model_path(model)), "-o", str(output), "--events", *_device_arguments(device)]
        if max_steps:
            args += ["--max-steps", str(int(max_steps))]
        if learning_rate:
            args += ["--lr", str(float(learning_rate))]
        if batch_size:
            args += ["--batch-size", str(int(batch_size))]
        if register_as:
            args += ["--register", register_as]
        return args

    def start_probe_training(self, table: Any, output: Any, model: Any = None, *, max_steps: Optional[int] = None,
                             learning_rate: Optional[float] = None, batch_size: Optional[int] = None,
                             window: Sequence[int] = (32, 128, 128), register_as: str = "",
                             device: str = AUTO_DEVICE) -> "Job":
        """Train a linear probe on a CSV table (image,label) as a job writing ``output``."""
        output = Path(output)
        args = ["ctfm", "probe-train", "--table", str(Path(table).resolve()),
                "--window", ",".join(str(int(v)) for v in window),
                *self._training_arguments(model, output, max_steps, learning_rate, batch_size, register_as, device)]
        return self._launch(args, output, device, "probe: embedding the scans", "probe", register_as)

    def start_decoder_training(self, pairs: Sequence[tuple[Any, Any]], output: Any, model: Any = None, *,
                               mode: str = "frozen", names: Optional[dict[int, str]] = None,
                               patch: Sequence[int] = (32, 128, 128), max_steps: Optional[int] = None,
                               learning_rate: Optional[float] = None, batch_size: Optional[int] = None,
                               register_as: str = "", device: str = AUTO_DEVICE) -> "Job":
        """Train a segmentation decoder on (image file, label map file) pairs as a job writing ``output``."""
        output = Path(output)
        args = ["ctfm", "seg-train", "--mode", mode, "--patch", ",".join(str(int(v)) for v in patch)]
        for image, labels in pairs:
            args += ["--image", str(Path(image).resolve()), "--labels", str(Path(labels).resolve())]
        if names:
            args += ["--names", ",".join(f"{int(k)}={v}" for k, v in sorted(names.items()))]
        args += self._training_arguments(model, output, max_steps, learning_rate, batch_size, register_as, device)
        return self._launch(args, output, device, f"decoder ({mode}): preparing the scans", "decoder", register_as)

    def start_indexing(self, folder: Any, output: Any, model: Any = None, *, window: Sequence[int] = INDEX_WINDOW,
                       aggregation: str = "mean", device: str = AUTO_DEVICE) -> "Job":
        """Index every volume of ``folder`` as a job (``lctfound ctfm index``) into the NEW folder ``output``,
        which appears only once the index is complete (Cancel stops the job before that)."""
        folder, output = Path(folder).resolve(), Path(output).resolve()
        if output.exists():
            raise LCTfoundError(f"{output}: already exists; choose a new index folder")
        args = ["ctfm", "index", str(folder), "--model", str(self.model_path(model)), "-o", str(output),
                "--window", ",".join(str(int(v)) for v in window), "--aggregation", aggregation,
                *_device_arguments(device), "--events"]
        return self._launch(args, output, device, f"indexing {folder.name}", "index", "")

    def _launch(self, args: list[str], output: Path, device: str, message: str, kind: str, register_as: str) -> "Job":
        if output.exists() and any(output.iterdir()):
            raise LCTfoundError(f"{output}: already holds a run; choose a new folder")
        output.parent.mkdir(parents=True, exist_ok=True)
        job = self.start_job(args, device=device, message=message, cwd=output.parent)
        self._began(kind, output, register_as)
        return job

    def _began(self, kind: str, output: Path, register_as: str = "", parameters: Optional[CTFMParameters] = None,
               model: Optional[Path] = None) -> None:
        """Remember what the job just started does (and forget the last one's results)."""
        self.run_output, self.loss_history, self._results = output, [], []
        self.job_kind, self.registered_name, self.job_server = kind, register_as, ""
        self.job_parameters, self._job_model = parameters, model
        self.results_table = self.heatmap_node = self.result_segmentation = self.classification_row = None

    def handle_event(self, event: dict[str, Any]) -> None:
        kind, at = event["event"], event.get("received_at")
        if kind in ("embedding", "progress"):
            message = str(event.get("message") or (f"embedding {event['case']}" if event.get("case")
                                                   else self.status().message))
            self.report_progress(int(event.get("done", 0)), int(event.get("total", 0)), message, at, rate_sample=False)
        elif kind == "result":
            self._results.append(event)
        elif kind == "start":
            message = f"training on {event.get('data', 'the data')}"
            self.report_progress(0, int(event.get("total_steps", 0)), message, at, rate_sample=False)
        elif kind == "metrics":
            step, total, loss = int(event["step"]), int(event.get("total_steps") or self._total), float(event["loss"])
            self.loss_history.append((step, loss))
            self.report_progress(step, total, f"step {step}/{total}, loss {loss:.4f}", at)
        elif kind == "warning":
            logger.warning("CT-FM training: %s", event.get("message"))

    def on_job_finished(self, job: "Job") -> str:
        """Runs in `poll()` (the GUI thread in Slicer): adds the results of a search, classify or
        segment job to the scene as NEW nodes; after training, lists the new model."""
        if self.job_kind == "index":
            return f"index in {self.run_output}"
        finish = {"search": self._finish_search, "classify": self._finish_classify,
                  "segment": self._finish_segment}.get(self.job_kind)
        if finish is not None:
            if not self._results:
                raise LCTfoundError(f"the {self.job_kind} job ended without a result")
            return finish(self.job_parameters, self._results[-1])
        self.refresh()  # the newly registered probe or decoder
        loss = f", loss {self.loss_history[-1][1]:.4f}" if self.loss_history else ""
        registered = f", registered as '{self.registered_name}'" if self.registered_name else ""
        return f"model in {self.run_output / 'model' if self.run_output else '?'}{registered}{loss}"

    # -- the panel: choices, checks and actions from one parameters object ------------------

    def choices(self, parameter_name: str, refresh: bool = False, parameters: Any = None) -> list[Choice]:
        """Items of the selector of ``parameter_name``: encoders and devices (the base's), query kinds,
        training kinds, decoder modes, and the installed probes and decoders."""
        name = _snake_case(parameter_name)
        fixed = {"query_kind": QUERY_KINDS, "training_kind": TRAINING_KINDS, "decoder_mode": DECODER_MODES}
        if name in fixed:
            return list(fixed[name])
        server = self.connected_server(parameters) if parameters is not None else None
        if name in SERVER_KINDS and server is not None:  # the server's encoders and indexes, by name
            return [Choice(model, f"{model} (on the server)", server.url)
                    for model in server.task_models(SERVER_KINDS[name])]
        if name == "server_index":
            return []  # only a server offers indexes by name
        if name in TASK_MODEL_PARAMETERS:
            return self.task_model_choices(TASK_MODEL_PARAMETERS[name])
        return super().choices(parameter_name, refresh)

    def visible_fields(self, parameters: Any) -> set[str]:
        """Parameters whose editors the panel shows for this query kind and training kind."""
        p = self.parameters_from(parameters)
        unused = {"point": {"query_region"}, "region": {"query_point"}}
        hidden = set(unused.get(p.query_kind, {"query_point", "query_region"}))
        if p.training_kind != "decoder":
            hidden |= {"decoder_mode", "training_segmentation"}
        # On a server: its encoders and indexes by name, its device; here: folders and this computer's devices.
        hidden |= {"device", "encoder_folder", "index_folder"} if self.on_server(p) else {"server_index"}
        return {f.name for f in dataclasses.fields(CTFMParameters)} - hidden

    def heatmap_state(self, parameters: Any) -> ButtonState:
        """The heat-map option: off on a server (it is made on this computer only), which its tooltip says."""
        if self.on_server(parameters):
            return ButtonState(False, HEATMAP_NOT_ON_SERVER)
        return ButtonState(True, "Also map the similarity of every window of the input volume with the query as a "
                                 "new overlay volume, and jump to its peak.")

    def default_values(self, parameters: Any) -> dict[str, Any]:
        p = self.parameters_from(parameters)
        server = self.connected_server(p)
        if server is not None:  # the server's encoder and index, not this computer's
            defaults: dict[str, Any] = {} if p.device else {"device": AUTO_DEVICE}
            for name, kind in SERVER_KINDS.items():
                offered = server.task_models(kind)
                if offered and getattr(p, name) not in offered:
                    defaults[name] = offered[0]
            return defaults
        defaults = super().default_values(parameters)
        for name in TASK_MODEL_PARAMETERS:
            if not getattr(p, name):
                choices = self.choices(name)
                if choices:
                    defaults[name] = choices[-1].value
        return defaults

    def use_encoder_folder(self, folder: Any) -> str:
        """Offer the CT-FM encoder in ``folder`` besides the listed ones; its model name, or ``""`` when
        ``folder`` is empty or not an encoder (`check_encoder_folder` says why)."""
        path = chosen_path(folder)
        if path is None or _weights_missing(path):
            return ""
        path = path.resolve()
        if path not in {Path(f).expanduser().resolve() for f in self.extra_model_folders}:
            self.extra_model_folders = (*self.extra_model_folders, path)
            self.refresh()  # the inventory checks it
        return next((m.name for m in self.models() if Path(m.path).resolve() == path), "")

    def check_encoder_folder(self, folder: Any) -> str:
        """Why ``folder`` is not a CT-FM encoder in the published layout, or ``""`` (also when empty).
        The folder is offered (`use_encoder_folder`) and checked strictly by the inventory, outside
        this process; one without weights is refused here (a path being typed lists nothing)."""
        path = chosen_path(folder)
        if path is None:
            return ""
        missing = _weights_missing(path)
        if missing:
            return f"The encoder folder is not a CT-FM encoder: {missing}"
        self.use_encoder_folder(path)
        rejected = {Path(folder).expanduser().resolve(): why for folder, why in self.inventory()["rejected"].items()}
        reason = rejected.get(path.resolve())
        return f"The encoder folder is not a CT-FM encoder: {reason}" if reason else ""

    def check_model(self, name: Optional[str]) -> str:
        if not name and not self.models() and not self.models_error:
            return ("No CT-FM encoder is available: choose the folder of a local copy of "
                    "project-lighter/ct_fm_feature_extractor as encoder folder (LCTfound never downloads weights).")
        return super().check_model(name)

    def server_tasks(self, parameters: Any, action: str = "") -> tuple[str, ...]:
        """Search ranks an index the server offers (``ctfm-search``); without an action, the panel's server
        tasks. Building an index is none: a server has no per-client indexes (`INDEX_NOT_ON_SERVER`)."""
        if not action:
            return tuple(SERVER_TASKS.values())
        return (SERVER_TASKS[action],) if action in SERVER_TASKS else ()

    def no_server_task(self, parameters: Any, action: str = "") -> str:
        if action == "index":
            return INDEX_NOT_ON_SERVER
        return ("CT-FM classification, segmentation and training run on this computer only (they are not server "
                "tasks); clear the server address.")

    def parameter_problems(self, parameters: Any) -> list[str]:
        """Problems every action shares (the encoder and the device); `action_problems` adds the rest."""
        p = self.parameters_from(parameters)
        problems = [self.server_problem(p)] + self._encoder_problems(p)
        return [problem for problem in problems if problem]

    def _encoder_problems(self, p: CTFMParameters) -> list[str]:
        """The encoder (and device) here, or the encoder the tested server offers."""
        if not self.on_server(p):
            return [self.check_encoder_folder(p.encoder_folder), self.check_model(p.model_name),
                    self.check_device(p.device)]
        return [self._server_model_problem(p, "model_name", "CT-FM encoder")]

    def _server_model_problem(self, p: CTFMParameters, name: str, what: str) -> str:
        """Why ``name`` (a parameter of `SERVER_KINDS`) is not one of the tested server's, or '' (also untested:
        `server_problem` says to test)."""
        server = self.connected_server(p)
        if server is None:
            return ""
        offered = server.task_models(SERVER_KINDS[name])
        if not offered:
            folder = "INDEX_FOLDER" if name == "server_index" else "ENCODER_FOLDER"
            return (f"The server at {server.url} offers no {what}; ask its administrator to offer one "
                    f"(lctfound serve --models NAME={folder}).")
        return "" if getattr(p, name) in offered else f"Select a {what} the server offers (Test connection lists them)."

    def selection_summary(self, parameters: Any) -> str:
        p = self.parameters_from(parameters)
        server = self.connected_server(p)
        if server is None or self.first_problem(p):
            return super().selection_summary(p)
        return f"CT-FM encoder {p.model_name} on the server {server.url}."

    def action_problems(self, action: str, parameters: Any) -> list[str]:
        """Every reason why ``action`` (one of `ACTIONS`) cannot run with these parameters."""
        if action not in ACTIONS:
            raise LCTfoundError(f"unknown CT-FM action {action!r}; choose one of: {', '.join(ACTIONS)}")
        p = self.parameters_from(parameters)
        problems = [self.server_problem(p, action)] + self._encoder_problems(p)  # this action's server reason
        if action in ("search", "classify", "segment"):
            problems.append(self.check_input_volume(p.input_volume))
        if action == "index":
            folder = chosen_path(p.cohort_folder)
            problems.append("Choose the folder of volumes to index." if folder is None
                            else "" if folder.is_dir() else f"Folder not found: {folder}")
        elif action == "search":
            problems += [self._index_problem(p), self._query_problem(p),
                         "" if int(p.top_k) >= 1 else "The number of results must be at least 1."]
        elif action in ("classify", "segment"):
            parameter = "probe_model" if action == "classify" else "decoder_model"
            value, task = getattr(p, parameter), TASK_MODEL_PARAMETERS[parameter]
            if not value:
                problems.append(f"Select a {task} model (train one below).")
            elif value not in {choice.value for choice in self.task_model_choices(task)}:
                problems.append(f"'{value}' is not an installed {task} model.")
        else:
            problems += self._training_problems(p)
        return [problem for problem in problems if problem]

    def _index_problem(self, p: CTFMParameters) -> str:
        if self.on_server(p):
            return self._server_model_problem(p, "server_index", "CT-FM index")
        folder = chosen_path(p.index_folder)
        if folder is None:
            return "Choose an index folder (or build one from a folder of volumes)."
        missing = missing_index_file(folder)
        return f"{folder} is not a CT-FM index (no {missing})." if missing else ""

    @staticmethod
    def _query_problem(p: CTFMParameters) -> str:
        if p.query_kind not in {kind.value for kind in QUERY_KINDS}:
            return f"Unknown query kind '{p.query_kind}'; choose one of: {', '.join(k.value for k in QUERY_KINDS)}."
        if p.query_kind == "point":
            if p.query_point is None:
                return "Choose the point (markups) to query by."
            if p.query_point.GetNumberOfControlPoints() < 1:
                return f"Place a point on '{_node_name(p.query_point)}' to query by."
        if p.query_kind == "region" and p.query_region is None:
            return "Choose the region (markups ROI) to query by."
        return ""

    def _training_problems(self, p: CTFMParameters) -> list[str]:
        from ..models.registry import check_new_model_name

        if p.training_kind not in {kind.value for kind in TRAINING_KINDS}:
            return [f"Unknown training kind '{p.training_kind}'; choose probe or decoder."]
        problems = []
        table = chosen_path(p.training_table)
        if table is not None and not table.is_file():
            problems.append(f"Table not found: {table}")
        if p.training_kind == "probe":
            if table is None:
                problems.append("Choose a CSV table with the columns image,label (one line per scan).")
        else:
            if p.decoder_mode not in {mode.value for mode in DECODER_MODES}:
                problems.append(f"Unknown decoder mode '{p.decoder_mode}'; choose frozen or full.")
            if table is None and p.training_segmentation is None:
                problems.append("Choose a CSV table with the columns image,labels, or a segmentation of the input "
                                "volume.")
            if p.training_segmentation is not None:
                problems.append(self.check_input_volume(p.input_volume))
        name = str(p.new_model_name or "").strip()
        if not name:
            problems.append("Name the new model (it is registered under that name).")
        else:
            try:
                check_new_model_name(name)
            except LCTfoundError as error:
                problems.append(str(error))
        return problems

    def action_state(self, action: str, parameters: Any) -> ButtonState:
        """Whether the button of ``action`` can be clicked, with the first problem (or what it does) as tooltip."""
        if self.state.busy:
            return ButtonState(False, f"{self.task_name} is running")
        problems = self.action_problems(action, parameters)
        return ButtonState(not problems, problems[0] if problems else ACTIONS[action])

    def cancel_button_state(self) -> ButtonState:
        return ButtonState(self.state.busy, "Stop the running work" if self.state.busy else "Nothing is running")

    def _ready(self, action: str, parameters: Any) -> CTFMParameters:
        p = self.parameters_from(parameters)
        if self.state.busy:
            raise LCTfoundError(f"{self.task_name} is already running; wait for it or cancel it first")
        problems = self.action_problems(action, p)
        if problems:
            raise LCTfoundError(problems[0])
        return p

    # -- panel actions: jobs -----------------------------------------------------------------

    def start_index(self, parameters: Any) -> "Job":
        """Index the cohort folder into a NEW folder under the runs folder (a job); `apply_finished_job`
        then makes it the index folder."""
        from ..io.volume import find_volumes

        p = self._ready("index", parameters)
        folder = chosen_path(p.cohort_folder)
        if not find_volumes(folder):
            raise InputError(f"{folder}: holds no CT volumes (NIfTI, NRRD, MHA files or DICOM series folders)")
        return self.start_indexing(folder, self.new_run_folder("ctfm-index"), p.model_name, device=p.device)

    def start_training(self, parameters: Any) -> "Job":
        """Train the chosen task model (a job) in a NEW run folder, registered under the new model name.
        A decoder's segmentation of the input volume is exported there (image and label map) first."""
        from ..training.tables import read_case_table, table_path

        p = self._ready("train", parameters)
        run = self.new_run_folder(f"ctfm-{p.training_kind}")
        name, steps = str(p.new_model_name).strip(), int(p.max_steps) or None
        table = chosen_path(p.training_table)
        if p.training_kind == "probe":
            return self.start_probe_training(table, run / "training", p.model_name, max_steps=steps,
                                             register_as=name, device=p.device)
        pairs: list[tuple[Any, Any]] = []
        if table is not None:
            pairs += [(table_path(table, row["image"]), table_path(table, row["labels"]))
                      for row in read_case_table(table, ("image", "labels"))]
        names = None
        try:
            if p.training_segmentation is not None:
                image, labels, names = self._export_pair(p.input_volume, p.training_segmentation, run / "data")
                pairs.append((image, labels))
            return self.start_decoder_training(pairs, run / "training", p.model_name, mode=p.decoder_mode, names=names,
                                               max_steps=steps, register_as=name, device=p.device)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise

    @staticmethod
    def _export_pair(volume_node: Any, segmentation_node: Any, folder: Path) -> tuple[Path, Path, dict[int, str]]:
        """The loaded volume and its segmentation (as a label map on the volume's grid) as files."""
        from ..io.volume import write_volume
        from ..mrml import ctvolume_from_volume_node, labels_from_segmentation

        labels, names = labels_from_segmentation(segmentation_node, volume_node)
        if not labels.any():
            raise LCTfoundError(f"segmentation '{_node_name(segmentation_node)}' has no labelled voxels on "
                                f"'{_node_name(volume_node)}'")
        folder.mkdir(parents=True)
        image = export_volume_node(volume_node, folder / "image.nrrd")
        return image, write_volume(ctvolume_from_volume_node(volume_node).with_array(labels), folder / "labels.nrrd"), names

    def apply_finished_job(self, target: Any) -> dict[str, Any]:
        """After a finished job, point ``target`` (parameters: a dataclass, dict or parameter node) at
        what it made: the new index folder, the new results table, or the newly registered probe or
        decoder. Returns what was set."""
        if self.state is not RunState.FINISHED or not self.job_kind:
            return {}
        values: dict[str, Any] = {}
        if self.job_kind == "index" and self.run_output is not None:
            values["index_folder"] = Path(self.run_output)
        elif self.job_kind == "search" and self.results_table is not None:
            values["results_table"] = self.results_table
        elif self.job_kind in ("probe", "decoder") and self.registered_name:
            parameter = "probe_model" if self.job_kind == "probe" else "decoder_model"
            found = [c.value for c in self.task_model_choices(TASK_MODEL_PARAMETERS[parameter])
                     if c.label == self.registered_name]
            if found:
                values[parameter], values["new_model_name"] = found[0], ""
        for name, value in values.items():
            if isinstance(target, dict):
                target[_camel_case(name) if _camel_case(name) in target and name not in target else name] = value
            elif dataclasses.is_dataclass(target) or hasattr(target, name):
                setattr(target, name, value)
            else:
                setattr(target, _camel_case(name), value)
        return values

    # -- panel actions on the scene's nodes: jobs, results added when they finish -------------

    def _node_job_folder(self, kind: str, p: CTFMParameters) -> tuple[Path, Path]:
        """A NEW run folder holding the input volume node, exported (world geometry: the parent
        transform applied, as points read from markups are)."""
        run = self.new_run_folder(f"ctfm-{kind}")
        run.mkdir(parents=True)
        try:
            return run, export_volume_node(p.input_volume, run / INPUT_FILE)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise

    def _start_node_job(self, kind: str, p: CTFMParameters, run: Path, args: list[str], model: Optional[Path],
                        message: str) -> "Job":
        """``args`` as a job in ``run``, here on the chosen device or, with a tested server, there (the server
        picks its device)."""
        server = self.connected_server(p)
        where = server_arguments(server) if server is not None else _device_arguments(p.device)
        try:
            job = self.start_job([*args, *where, "--no-validate", "--events"],
                                 device=p.device if server is None else AUTO_DEVICE,
                                 message=message + (f" on {server.url}" if server is not None else ""), cwd=run)
        except BaseException:
            shutil.rmtree(run, ignore_errors=True)
            raise
        self._began(kind, run, parameters=p, model=model)
        self.job_server = server.url if server is not None else ""
        return job

    def start_search(self, parameters: Any) -> "Job":
        """Search the index by the whole input volume, the query point (its last control point) or the
        ROI, as a job (``lctfound ctfm search``); when it has finished, `poll()` adds a NEW results table
        (`results_table`) and, with the heat map on, a NEW similarity overlay (`heatmap_node`). On a tested
        server: the same command with ``--server``, the server's index and encoder named as it lists them,
        no heat map."""
        p = self._ready("search", parameters)
        server = self.connected_server(p)
        point = self.point_from_markup(p.query_point) if p.query_kind == "point" else None
        region = self.region_from_roi(p.query_region) if p.query_kind == "region" else None
        model = self.model_path(p.model_name) if server is None else None
        index, encoder = (str(chosen_path(p.index_folder).resolve()), str(model)) if server is None else \
            (p.server_index, p.model_name)
        run, volume = self._node_job_folder("search", p)
        args = ["ctfm", "search", index, "--query", str(volume), "--model", encoder, "--top", str(int(p.top_k))]
        if point is not None:
            args.append("--point=" + _coordinates(point))  # "=": a coordinate may start with "-"
        if region is not None:
            args.append("--region=" + _coordinates([*region[0], *region[1]]))
        if p.show_heatmap and server is None:
            args += ["--heatmap", str(run / HEATMAP_FILE)]
        return self._start_node_job("search", p, run, args, model, f"{p.query_kind} query")

    def start_classify(self, parameters: Any) -> "Job":
        """Classify the input volume with the probe as a job (``lctfound ctfm probe-predict``); when it
        has finished, `classification_row` holds the prediction and the status line says it."""
        p = self._ready("classify", parameters)
        model = self.model_path(p.model_name)
        run, volume = self._node_job_folder("classify", p)
        args = ["ctfm", "probe-predict", str(volume), "--probe", str(p.probe_model), "--model", str(model),
                "-o", str(run / PREDICTIONS_FILE)]
        return self._start_node_job("classify", p, run, args, model, "classifying")

    def start_segment(self, parameters: Any) -> "Job":
        """Segment the input volume with the decoder as a job (``lctfound ctfm seg-predict``); when it
        has finished, `result_segmentation` is a NEW segmentation node on the input volume."""
        p = self._ready("segment", parameters)
        model = self.model_path(p.model_name)
        run, volume = self._node_job_folder("segment", p)
        args = ["ctfm", "seg-predict", str(volume), "--decoder", str(p.decoder_model), "--model", str(model),
                "-o", str(run / SEGMENTATION_FILE)]
        return self._start_node_job("segment", p, run, args, model, "segmenting")

    @staticmethod
    def _input_node(p: CTFMParameters) -> Any:
        node = p.input_volume
        if node is None or node.GetScene() is None:
            raise LCTfoundError("the input volume was removed from the scene while the job ran; nothing was added")
        return node

    def _finish_search(self, p: CTFMParameters, result: dict[str, Any]) -> str:
        from ..io.volume import read_volume

        node = self._input_node(p)
        query = Query(None, result["level"], p.query_kind, result.get("query_centre_ras"))
        # A server's ranking names no paths: its indexed scans stay there.
        rows = [{"rank": int(match["rank"]), "case": match["name"], "score": float(match["score"]),
                 "path": match.get("path", ""),
                 **({"centre_ras": match["centre_ras"]} if match.get("centre_ras") else {})}
                for match in result["matches"]]
        if result.get("heatmap"):
            self.heatmap_node = self._heatmap_node(node, read_volume(result["heatmap"], validate=False).array, query,
                                                   self._job_model)
        self.results_table = self.results_table_node(node.GetScene(), SearchResult(query, rows),
                                                     f"{_node_name(node)} CT-FM {p.query_kind} search")
        if self.job_server:
            self.results_table.SetAttribute(SERVER_ATTRIBUTE, self.job_server)
        best = rows[0] if rows else None
        summary = f"best '{best['case']}' (similarity {best['score']:.3f})" if best else "no indexed scan"
        if not self.job_server:
            return f"{len(rows)} result(s), {summary}"
        return f"{len(rows)} result(s) from {self.job_server}, {summary}" + \
            (f". {HEATMAP_NOT_ON_SERVER}" if p.show_heatmap else "")

    def _finish_classify(self, p: CTFMParameters, result: dict[str, Any]) -> str:
        row = {**result["row"], "case": _node_name(self._input_node(p))}
        self.classification_row = row
        probabilities = ", ".join(f"{key[len('probability_'):]} {float(value):.3f}"
                                  for key, value in row.items() if key.startswith("probability_"))
        return f"predicted '{row['predicted']}' ({probabilities}). {row.get('note', '')}".strip()

    def _finish_segment(self, p: CTFMParameters, result: dict[str, Any]) -> str:
        from ..io.volume import read_label_volume
        from ..mrml import ctvolume_from_volume_node

        node = self._input_node(p)
        labels = read_label_volume(result["output"], reference=ctvolume_from_volume_node(node))
        self.result_segmentation = self._segmentation_node(node, labels.array, result["labels"], result["decoder"])
        return f"new segmentation '{self.result_segmentation.GetName()}'"

    # -- results in the scene ----------------------------------------------------------------

    @staticmethod
    def results_table_node(scene: Any, result: SearchResult, name: str = "CT-FM search") -> Any:
        """A NEW table node of the ranked rows: rank, case, score, path and, for point/region queries,
        the best window's centre (centre_R, centre_A, centre_S in mm). The query is a node attribute."""
        import json

        from ..mrml._compat import vtk

        node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
        node.SetUseColumnTitleAsColumnHeader(True)  # the view's row N is the table's row N (`table_row`)
        columns = [("rank", vtk.vtkIntArray, lambda row: row["rank"]),
                   ("case", vtk.vtkStringArray, lambda row: row["case"]),
                   ("score", vtk.vtkDoubleArray, lambda row: row["score"]),
                   ("path", vtk.vtkStringArray, lambda row: row["path"])]
        if any("centre_ras" in row for row in result.rows):
            columns += [(f"centre_{axis}", vtk.vtkDoubleArray, lambda row, a=a: row["centre_ras"][a])
                        for a, axis in enumerate("RAS")]
        table = node.GetTable()
        for title, array_class, value in columns:
            column = array_class()
            column.SetName(title)
            for row in result.rows:
                column.InsertNextValue(value(row))
            table.AddColumn(column)
        query = result.query
        node.SetAttribute(HEATMAP_ATTRIBUTE, json.dumps({"kind": query.kind, "level": query.level,
                                                         "centre_ras": query.centre_ras}))
        node.Modified()
        return node

    @staticmethod
    def table_row(table_node: Any, model_row: int) -> int:
        """The table row shown in row ``model_row`` of a table view's model (qMRMLTableModel): the same
        row when the column titles are the header, else one less (the model's row 0 shows the titles);
        -1 for the titles or no row."""
        if model_row < 0:
            return -1
        return model_row if table_node.GetUseColumnTitleAsColumnHeader() else model_row - 1

    @staticmethod
    def load_match_state(table_node: Any) -> ButtonState:
        """Whether Load match can load the scans of a results table: not those a server ranked."""
        if table_node is None:
            return ButtonState(False, "Search first; then pick a result row to load its scan.")
        if table_node.GetAttribute(SERVER_ATTRIBUTE):
            return ButtonState(False, MATCH_ON_SERVER)
        return ButtonState(True, "Load the scan of the selected row as a new volume and, for point or region "
                                 "queries, jump to its best window.")

    @staticmethod
    def load_match(table_node: Any, row: int) -> tuple[Any, Optional[list[float]]]:
        """Load the scan of result ``row`` (0-based) of a results table into a NEW volume node; returns it
        with the matched window's centre (RAS, to jump to) for point/region queries, else None."""
        from ..io.volume import read_volume
        from ..mrml import volume_node_from_ctvolume

        table = table_node.GetTable()
        if table.GetColumnByName("path") is None or table.GetColumnByName("case") is None:
            raise LCTfoundError(f"table '{_node_name(table_node)}' is not a CT-FM search result")
        if not 0 <= row < table.GetNumberOfRows():
            raise LCTfoundError("select a result row first")
        path = table.GetValueByName(row, "path").ToString()
        if not path:
            raise LCTfoundError(MATCH_ON_SERVER)
        volume = read_volume(path, validate=False)
        node = volume_node_from_ctvolume(table_node.GetScene(), volume, table.GetValueByName(row, "case").ToString())
        if table.GetColumnByName("centre_R") is None:
            return node, None
        return node, [table.GetValueByName(row, f"centre_{axis}").ToDouble() for axis in "RAS"]

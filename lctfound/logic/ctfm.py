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

Training (probe, decoder) runs as a job (`lctfound.jobs`): ``lctfound ctfm probe-train`` /
``seg-train`` with ``--events``; `poll()` turns the events into progress and a loss history.

Geometry: node → `CTVolume` (`lctfound.mrml.ctvolume_from_volume_node`, parent linear transform
applied, so points in world RAS match) → CT-FM's prepared space (`prepare_volume`, exact affine)
→ back onto the node's voxels (`PreparedVolume.to_source_grid`), without a voxel of shift.

Nothing here imports Qt, Slicer or torch at import time; MRML nodes are used through
`lctfound.mrml` inside the methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

from ..errors import LCTfoundError
from .base import AUTO_DEVICE, ButtonState, Choice, ModuleLogicBase

if TYPE_CHECKING:
    from ..jobs import Job

logger = logging.getLogger(__name__)

#: Node attribute naming the query of a heat map (JSON) and the model that made a result.
HEATMAP_ATTRIBUTE = "LCTfound.CTFMQuery"
MODEL_ATTRIBUTE = "LCTfound.CTFMModel"
QUERY_KINDS = (
    Choice("scan", "Whole scan", "Rank indexed scans by the whole-scan embedding."),
    Choice("point", "Point", "Rank indexed scans by their window most similar to the window around a point."),
    Choice("region", "Region", "Rank indexed scans by their window most similar to a box (ROI)."),
)
#: Slicer colour table of heat-map overlays (used when the scene has it; headless scenes do not).
HEATMAP_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"


@dataclass
class CTFMParameters:
    """What the panel holds: the input volume (node, `CTVolume` or file path), the CT-FM encoder
    (a name from `models()` or a folder), the device and the query."""

    input_volume: Any = None
    model_name: str = ""
    device: str = AUTO_DEVICE
    index_folder: Any = ""
    query_kind: str = "scan"
    top_k: int = 10


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


def _node_name(node: Any) -> str:
    get_name = getattr(node, "GetName", None)
    return get_name() if callable(get_name) else str(node)


class CTFMLogic(ModuleLogicBase):
    """Backbones and capabilities, retrieval, heat maps, probe and decoder on loaded volumes."""

    task_name = "CT-FM"
    parameters_class = CTFMParameters

    def __init__(self, *, ctfm_folders: Sequence[Any] = (), **kwargs: Any) -> None:
        """``ctfm_folders``: CT-FM encoder folders to offer (besides the published repos already in
        the local Hugging Face cache); task models are found in the user model folder."""
        if "list_models" not in kwargs:
            def list_models(extra_folders=()):
                from ..ctfm.model import list_ctfm_models

                return list_ctfm_models(extra_folders)

            kwargs["list_models"] = list_models
        super().__init__(extra_model_folders=ctfm_folders, **kwargs)
        self._loaded: dict[tuple[str, str], Any] = {}
        self.run_output: Optional[Path] = None
        self.loss_history: list[tuple[int, float]] = []

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
        from ..models.task_models import list_task_models

        return [Choice(str(entry.path), entry.name, entry.description or str(entry.path))
                for entry in list_task_models(task)]

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
    def point_from_markup(node: Any, index: int = 0) -> list[float]:
        """World RAS position of control point ``index`` of a markups node (transforms applied)."""
        count = node.GetNumberOfControlPoints() if hasattr(node, "GetNumberOfControlPoints") else 0
        if not 0 <= index < count:
            raise LCTfoundError(f"markups '{_node_name(node)}' has no control point {index + 1} (it has {count})")
        position = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(index, position)
        return [float(v) for v in position]

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
        return SearchResult(query, rows)

    def create_heatmap_node(self, volume_node: Any, query: Query, model: Any = None, settings: Any = None,
                            name: Optional[str] = None, progress: Any = None) -> Any:
        """A NEW scalar volume node with the cosine similarity of every window of ``volume_node`` with
        the query, on the node's own voxel grid (its IJK→RAS matrix and parent transform), styled as a
        foreground overlay (values −1..1; outside the body crop 0)."""
        import json

        import numpy as np

        from ..ctfm.features import WindowSettings, similarity_volume
        from ..io.volume import CTVolume
        from ..mrml import volume_node_from_ctvolume
        from ..mrml.volumes import ijk_to_ras_of

        encoder = self.load_backbone(model)
        ct = self.volume_of(volume_node)
        same = query.volume is not None and query.prepared is not None and query.volume.same_grid(ct) \
            and np.array_equal(np.asarray(query.volume.array), np.asarray(ct.array))
        heatmap, _ = similarity_volume(encoder, ct, np.asarray(query.vector), settings or WindowSettings(),
                                       prepared=query.prepared if same else None, progress=progress)
        scene = volume_node.GetScene()
        local = CTVolume.from_ijk_to_ras(heatmap.array.astype(np.float32), ijk_to_ras_of(volume_node))
        node = volume_node_from_ctvolume(scene, local, name or f"{volume_node.GetName()} CT-FM similarity",
                                         provenance={"kind": "ctfm-similarity"})
        transform_id = volume_node.GetTransformNodeID()
        if transform_id:
            node.SetAndObserveTransformNodeID(transform_id)
        node.SetAttribute(HEATMAP_ATTRIBUTE, json.dumps({"kind": query.kind, "level": query.level,
                                                         "centre_ras": query.centre_ras}))
        node.SetAttribute(MODEL_ATTRIBUTE, str(encoder.path or ""))
        self._style_overlay(node)
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
        from ..mrml import segmentation_node_from_labels

        segmenter = decoder if isinstance(decoder, DecoderSegmenter) else DecoderSegmenter.load(
            decoder, self.load_backbone(model) if model is not None else None)
        labels = segmenter.predict(self.volume_of(volume_node), overlap, 1, progress)
        names = {int(k): v for k, v in segmenter.label_names.items()}
        node = segmentation_node_from_labels(volume_node.GetScene(), labels.array, volume_node, names,
                                             name=f"{volume_node.GetName()} CT-FM segmentation")
        node.SetAttribute(MODEL_ATTRIBUTE, str(segmenter.task_model.folder))
        return node

    # -- training through jobs ---------------------------------------------------------------

    def _training_arguments(self, model: Any, output: Path, max_steps: Optional[int], learning_rate: Optional[float],
                            batch_size: Optional[int], register_as: str, device: str) -> list[str]:
        args = ["--model", str(self.model_path(model)), "-o", str(output), "--events",
                "--device", "cpu" if device == "cpu" else "auto"]
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
        return self._launch(args, output, device, "probe: embedding the scans")

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
        return self._launch(args, output, device, f"decoder ({mode}): preparing the scans")

    def _launch(self, args: list[str], output: Path, device: str, message: str) -> "Job":
        if output.exists() and any(output.iterdir()):
            raise LCTfoundError(f"{output}: already holds a run; choose a new folder")
        output.parent.mkdir(parents=True, exist_ok=True)
        job = self.start_job(args, device=device, message=message, cwd=output.parent)
        self.run_output, self.loss_history = output, []
        return job

    def handle_event(self, event: dict[str, Any]) -> None:
        kind, at = event["event"], event.get("received_at")
        if kind in ("embedding", "progress"):
            message = str(event.get("message") or f"embedding {event.get('case', '')}")
            self.report_progress(int(event.get("done", 0)), int(event.get("total", 0)), message, at, rate_sample=False)
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
        self.refresh()
        loss = f", loss {self.loss_history[-1][1]:.4f}" if self.loss_history else ""
        return f"model in {self.run_output / 'model' if self.run_output else '?'}{loss}"

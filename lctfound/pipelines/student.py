"""A distilled student segmenter: a small 2D U-Net that needs no backbone (reference §6.1).

Once a teacher is trained (a `FewShotSegmenter`, or any segmentation predictor of
`lctfound.pipelines.predictors`), `distill` lets it predict soft probabilities for every slice of
some volumes and trains a small MONAI U-Net to reproduce them: KL divergence of the tempered
distributions (T = 3, ×T², as the paper's ``distillation_loss``) and a soft Dice loss against
the teacher's probabilities (our addition, for small structures) on every slice, plus
cross-entropy and focal loss on the slices an annotator labelled (−1 = not labelled, ignored).

The student sees three adjacent slices (k−1, k, k+1; the edge slice repeated) as its three
input channels, each windowed with the teacher's window and the official per-slice
normalisation, resized to a working resolution (default 256²); its logits are upsampled
bilinearly to the native grid. It is saved as a task model of task ``segmentation-student``
with the teacher's provenance, and predicts a whole volume slice batch by slice batch: memory
holds the input volume, the output label volume and one batch of logits.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, LCTfoundError
from ..models.task_models import TaskModel, load_task_model, require_parts, save_task_model
from ..preprocessing import resize_images, resize_labels, slice_batches, window_to_unit
from ..progress import Progress, ensure_progress
from ..compat import strict_zip

STUDENT_TASK = "segmentation-student"
UNLABELLED = -1
#: ``basic``: MONAI BasicUNet (two convolutions per level, max-pool down, transposed-conv up, instance
#: norm), the layout of the paper's student; ``residual``: MONAI UNet (strided convolutions, two
#: residual units per level), faster on a CPU for the same widths.
ARCHITECTURES = ("basic", "residual")


@dataclass
class StudentConfig:
    architecture: str = "basic"
    features: tuple[int, ...] = (16, 32, 64, 128, 256)  # the paper's student widths
    #: Working resolution (the logits are upsampled to the native grid); default: the teacher's input size,
    #: so the student sees the slices at the detail the teacher saw them.
    resolution: Optional[int] = None
    window: Optional[str] = None   # default: the teacher's window
    epochs: int = 20
    #: Wall-clock budget of the whole distillation in seconds (teacher pass + student training), None for
    #: none: after the first epoch the student trains only as many epochs (at most ``epochs``) as fit in
    #: what is left, its learning-rate schedule shortened to match. The default fits a coffee break.
    time_budget: Optional[float] = 600.0
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 3.0
    #: Weight of a soft Dice loss against the teacher's probabilities (not in the paper): a small lesion
    #: is ~0.1 % of a CT's pixels, and with pixel-averaged losses alone an all-background student wins.
    dice_weight: float = 1.0
    focal_gamma: float = 2.0
    grad_clip: float = 1.0
    flips: bool = True
    seed: int = 0

    def check(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise LCTfoundError(f"unknown student architecture {self.architecture!r}; choose one of: "
                                f"{', '.join(ARCHITECTURES)}")
        if len(self.features) != 5 or any(int(f) < 1 for f in self.features):
            raise LCTfoundError("a student needs five positive level widths, e.g. 16,32,64,128,256")
        multiple = 2 ** (len(self.features) - 1)
        if self.resolution is not None and (self.resolution < multiple or self.resolution % multiple):
            raise LCTfoundError(f"student resolution {self.resolution} must be a positive multiple of {multiple}")
        if self.epochs < 1 or self.batch_size < 1:
            raise LCTfoundError("epochs and batch size must be at least 1")
        if self.time_budget is not None and not self.time_budget > 0:
            raise LCTfoundError("the time budget must be positive (or none)")
        if not self.temperature > 0:
            raise LCTfoundError("the distillation temperature must be positive")


def build_student_network(architecture: str, features: Sequence[int], num_classes: int) -> nn.Module:
    """The student U-Net (3 input channels: slices k−1, k, k+1) with ``num_classes`` output logits."""
    from monai.networks.nets import BasicUNet, UNet

    features = tuple(int(f) for f in features)
    if architecture == "basic":
        return BasicUNet(spatial_dims=2, in_channels=3, out_channels=num_classes, features=(*features, features[0]))
    if architecture == "residual":
        return UNet(spatial_dims=2, in_channels=3, out_channels=num_classes, channels=features,
                    strides=(2,) * (len(features) - 1), num_res_units=2, norm="instance")
    raise LCTfoundError(f"unknown student architecture {architecture!r}; choose one of: {', '.join(ARCHITECTURES)}")


def context_indices(indices: Sequence[int], num_slices: int) -> np.ndarray:
    """(len(indices), 3) slice indices k−1, k, k+1 of each slice, the edge slice repeated."""
    k = np.asarray(indices, dtype=np.int64)[:, None]
    return np.clip(k + np.array([-1, 0, 1]), 0, num_slices - 1)


def working_slices(hu_volume: np.ndarray, first: int, stop: int, window: str, resolution: int) -> torch.Tensor:
    """Slices ``first:stop`` windowed (official per-slice normalisation) and resized: (n, R, R) in [0, 1]."""
    unit = window_to_unit(np.asarray(hu_volume[first:stop]), window, "official")
    return resize_images(unit[:, None], resolution)[:, 0]


def student_inputs(hu_volume: np.ndarray, batch: Sequence[int], window: str, resolution: int) -> torch.Tensor:
    """Student inputs (B, 3, R, R) in [−1, 1] for slice indices ``batch`` of a (N, H, W) HU volume.

    Each slice is normalised once even though it is a neighbour of up to three inputs.
    """
    context = context_indices(batch, hu_volume.shape[0])
    first, stop = int(context.min()), int(context.max()) + 1
    unit = working_slices(hu_volume, first, stop, window, resolution)
    return unit[torch.from_numpy(context - first)] * 2 - 1


@dataclass
class DistillReport:
    volumes: int
    slices: int
    annotated_slices: int
    epochs: int
    final_loss: float
    losses: list[float] = field(default_factory=list)
    teacher_seconds: float = 0.0
    training_seconds: float = 0.0
    #: Dice of the student's against the teacher's argmax per structure, on the distillation slices
    #: at the working resolution.
    agreement: dict[str, float] = field(default_factory=dict)


class StudentSegmenter:
    """A small 2D U-Net segmenter distilled from a teacher; ``predict(volume)`` needs no backbone."""

    task = STUDENT_TASK
    needs_backbone = False

    def __init__(self, label_names: dict[int, str], config: StudentConfig, window: str,
                 network: Optional[nn.Module] = None, teacher: Optional[dict[str, Any]] = None,
                 device: str | torch.device = "cpu"):
        config.check()
        if config.resolution is None:
            raise LCTfoundError("a student needs its working resolution")
        names = {int(k): v for k, v in label_names.items() if int(k) != 0}
        if not names:
            raise LCTfoundError("a student needs at least one structure (label 1 or above)")
        self.label_names, self.config, self.window = names, config, window
        self.class_values = [0] + sorted(names)
        self.device = torch.device(device)
        if network is None:
            # The start depends on ``config.seed`` only, not on what the process drew before (the teacher's
            # work): the same distillation gives the same student, here or on a server.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                network = build_student_network(config.architecture, config.features, len(self.class_values))
        self.network = network.to(self.device)
        #: Provenance of the teacher this student was distilled from (model, backbone).
        self.teacher = dict(teacher or {})
        self.report: Optional[DistillReport] = None

    @property
    def input_size(self) -> int:
        """The slice size the network reads: a student distilled from this one defaults to it."""
        return int(self.config.resolution)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def logits(self, hu_volume: np.ndarray, batch: Sequence[int]) -> torch.Tensor:
        """Logits (B, K, R, R) at the working resolution for slice indices ``batch``."""
        x = student_inputs(hu_volume, batch, self.window, self.config.resolution).to(self.device)
        return self.network.eval()(x).float().cpu()

    @torch.no_grad()
    def _native_logits(self, hu_volume: np.ndarray, progress: Optional[Progress], batch_size: int
                       ) -> Iterator[tuple[list[int], torch.Tensor]]:
        progress = ensure_progress(progress)
        if hu_volume.ndim != 3 or 0 in hu_volume.shape:
            raise LCTfoundError(f"expected a non-empty 3D volume, got shape {hu_volume.shape}")
        count = hu_volume.shape[0]
        done = 0
        for batch in slice_batches(range(count), batch_size):
            progress.check_cancelled()
            logits = F.interpolate(self.logits(hu_volume, batch), size=hu_volume.shape[1:], mode="bilinear",
                                   align_corners=False)
            yield batch, logits
            done += len(batch)
            progress.update(done, count, f"slice {batch[-1]}")

    def predict_probabilities(self, hu_volume: np.ndarray, progress: Optional[Progress] = None,
                              batch_size: int = 8) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(slice index, probabilities (K, H, W))`` on the native grid (so a student can teach)."""
        for batch, logits in self._native_logits(hu_volume, progress, batch_size):
            for index, probabilities in strict_zip(batch, torch.softmax(logits, dim=1).numpy()):
                yield index, probabilities

    def predict(self, hu_volume: np.ndarray, progress: Optional[Progress] = None, postprocess: Sequence[str] = (),
                batch_size: int = 8) -> np.ndarray:
        """Label values (N, H, W) on the native grid, computed batch by batch (``postprocess``: see
        `postprocess_labels`)."""
        from .segmentation import postprocess_labels

        values = np.asarray(self.class_values, dtype=np.uint8 if max(self.class_values) < 256 else np.uint16)
        out = np.zeros(hu_volume.shape, dtype=values.dtype)
        for batch, logits in self._native_logits(hu_volume, progress, batch_size):
            out[batch[0]:batch[-1] + 1] = values[logits.argmax(1).numpy()]
        return postprocess_labels(out, postprocess) if postprocess else out

    __call__ = predict

    # ------------------------------------------------------------------ storage
    def save(self, folder: str | Path, extra: Optional[dict[str, Any]] = None, overwrite: bool = False) -> Path:
        config = asdict(self.config)
        config["features"] = list(self.config.features)
        info: dict[str, Any] = {
            "labels": {str(k): v for k, v in self.label_names.items()}, "class_values": self.class_values,
            "student": {"architecture": self.config.architecture, "features": list(self.config.features),
                        "resolution": self.config.resolution, "window": self.window, "context_slices": 3},
            "preprocessing": {"window": self.window, "normalization": "official", "size": self.config.resolution,
                              "context_slices": 3},
            "teacher": self.teacher, "distillation": config,
        }
        if self.report is not None:
            info["distillation_report"] = asdict(self.report)
        info.update(extra or {})
        # The student runs without a backbone; the teacher's backbone is recorded as provenance only.
        backbone = {"required": False, "name": None, "teacher_backbone": self.teacher.get("backbone")}
        return save_task_model(folder, STUDENT_TASK, backbone, {"student": self.network}, info, overwrite=overwrite)

    @classmethod
    def from_task_model(cls, task_model: TaskModel, device: str | torch.device = "cpu") -> "StudentSegmenter":
        if task_model.task != STUDENT_TASK:
            raise CheckpointError(f"{task_model.folder}: a {task_model.task} model, not a {STUDENT_TASK} model")
        require_parts(task_model, ["student"])
        settings = task_model.info["student"]
        distillation = dict(task_model.info.get("distillation", {}))
        known = set(StudentConfig.__dataclass_fields__)
        config = StudentConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in distillation.items()
                                  if k in known})
        config.architecture, config.features = settings["architecture"], tuple(settings["features"])
        config.resolution = int(settings["resolution"])
        names = {int(k): v for k, v in task_model.info["labels"].items()}
        student = cls(names, config, settings["window"], teacher=task_model.info.get("teacher"), device="cpu")
        try:
            student.network.load_state_dict(task_model.parts["student"])
        except RuntimeError as error:
            raise CheckpointError(f"{task_model.folder}: the student weights do not fit its description "
                                  f"({str(error).splitlines()[0]})") from None
        student.network.to(device).eval()
        student.device = torch.device(device)
        return student

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> "StudentSegmenter":
        """Load a student task model; no backbone is read."""
        return cls.from_task_model(load_task_model(folder, STUDENT_TASK), device)


# ---------------------------------------------------------------------------------------------- distillation


def _teacher_input_size(teacher: Any) -> int:
    """The slice size the teacher's network reads (a student at this resolution sees what it saw)."""
    size = getattr(teacher, "input_size", None)
    if size is None and getattr(teacher, "model", None) is not None:
        size = teacher.model.sample_size
    if size is None:
        raise LCTfoundError("the teacher does not say its input size; pass a resolution in the student config")
    return max(16, int(np.ceil(int(size) / 16)) * 16)


def _teacher_window(teacher: Any) -> str:
    window = getattr(teacher, "window", None)
    if window is None and getattr(teacher, "config", None) is not None:
        window = getattr(teacher.config, "window", None)
    if window is None:
        raise LCTfoundError("the teacher does not say which window it reads; pass a window in the student config")
    return str(window)


def teacher_provenance(teacher: Any) -> dict[str, Any]:
    """What a student records about its teacher: a predictor's provenance, or (an unsaved
    `FewShotSegmenter`) its task and backbone reference."""
    provenance = getattr(teacher, "provenance", None)
    if provenance:
        return dict(provenance)
    from ..models.task_models import backbone_reference

    model = getattr(teacher, "model", None)
    reference = backbone_reference(model) if model is not None else None
    backbone = None
    if reference is not None:
        backbone = {"name": reference.get("name"), "path": reference.get("path"),
                    "sha256": reference.get("unet_sha256"), "preset": reference.get("preset")}
    return {"model": {"name": None, "path": None, "task": getattr(teacher, "task", None) or "fewshot-segmentation",
                      "sha256": None}, "backbone": backbone}


class DistillationSet:
    """Every slice of the distillation volumes at the working resolution: normalised grey slices,
    the teacher's probabilities and (where annotated) class indices. Volumes are added one at a
    time, so only the current one is held at native size."""

    def __init__(self, teacher: Any, class_values: list[int], window: str, resolution: int):
        self.teacher, self.class_values, self.window, self.resolution = teacher, class_values, window, resolution
        self.units: list[torch.Tensor] = []          # (n, R, R) float16 per volume
        self.probabilities: list[torch.Tensor] = []  # (n, K, R, R) float16 per volume
        self.labels: list[torch.Tensor] = []         # (n, R, R) int16 class indices, −1 not labelled
        self.contexts: list[np.ndarray] = []         # (n, 3) global indices of k−1, k, k+1
        self.annotated: list[np.ndarray] = []
        self.count = 0

    def add(self, hu_volume: np.ndarray, labels: Optional[np.ndarray], progress: Progress) -> None:
        hu_volume = np.asarray(hu_volume)
        if hu_volume.ndim != 3 or 0 in hu_volume.shape:
            raise LCTfoundError(f"volume {len(self.units) + 1}: expected a non-empty 3D volume, got shape "
                                f"{hu_volume.shape}")
        n = hu_volume.shape[0]
        compact = None
        if labels is not None:
            labels = np.asarray(labels)
            if labels.shape != hu_volume.shape:
                raise LCTfoundError(f"volume {len(self.units) + 1}: labels {labels.shape} are not on the volume's "
                                    f"grid {hu_volume.shape}")
            present = set(np.unique(labels).tolist()) - {UNLABELLED}
            unknown = sorted(present - set(self.class_values))
            if unknown:
                raise LCTfoundError(f"volume {len(self.units) + 1}: label value {unknown[0]} is not a structure "
                                    f"of the teacher ({', '.join(map(str, self.class_values[1:]))})")
            lookup = np.full(max(self.class_values + list(present) + [0]) + 2, UNLABELLED, dtype=np.int16)
            lookup[self.class_values] = np.arange(len(self.class_values))
            compact = lookup[labels.astype(np.int64)]  # −1 stays −1 (the last lookup entry)
        units = torch.cat([working_slices(hu_volume, first, min(first + 16, n), self.window, self.resolution)
                           for first in range(0, n, 16)]).half()
        probabilities = torch.zeros((n, len(self.class_values), self.resolution, self.resolution),
                                    dtype=torch.float16)
        seen = np.zeros(n, dtype=bool)
        for index, slice_probabilities in self.teacher.predict_probabilities(hu_volume, progress=progress):
            small = resize_images(torch.as_tensor(np.asarray(slice_probabilities), dtype=torch.float32)[None],
                                  self.resolution)[0]
            probabilities[index] = small.clamp_min(0).half()
            seen[index] = True
        if not seen.all():
            raise LCTfoundError(f"the teacher predicted {int(seen.sum())} of {n} slices")
        if probabilities.shape[1] != len(self.class_values):
            raise LCTfoundError("the teacher's probabilities do not match its label names")
        if compact is None:
            small_labels = torch.full((n, self.resolution, self.resolution), UNLABELLED, dtype=torch.int16)
            annotated = np.zeros(n, dtype=bool)
        else:
            small_labels = resize_labels(torch.from_numpy(compact), self.resolution).to(torch.int16)
            annotated = (compact.reshape(n, -1) >= 0).any(axis=1)
        self.units.append(units)
        self.probabilities.append(probabilities)
        self.labels.append(small_labels)
        self.contexts.append(context_indices(range(n), n) + self.count)
        self.annotated.append(annotated)
        self.count += n

    def tensors(self):
        return (torch.cat(self.units), torch.cat(self.probabilities), torch.cat(self.labels),
                np.concatenate(self.contexts), np.concatenate(self.annotated))


def distillation_loss(student_logits: torch.Tensor, teacher_probabilities: torch.Tensor, temperature: float
                      ) -> torch.Tensor:
    """KL divergence between the tempered teacher and student distributions, ×T², averaged over pixels.

    The teacher gives probabilities p, so its tempered distribution is softmax(log p / T).
    """
    log_teacher = torch.log_softmax(torch.log(teacher_probabilities.clamp_min(1e-6)) / temperature, dim=1)
    log_student = torch.log_softmax(student_logits / temperature, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="none", log_target=True).sum(dim=1)
    return kl.mean() * temperature ** 2


def distill(teacher: Any, volumes: Iterable[np.ndarray], labels: Optional[Iterable[Optional[np.ndarray]]] = None,
            config: Optional[StudentConfig] = None, progress: Optional[Progress] = None,
            device: str | torch.device = "cpu") -> StudentSegmenter:
    """Distil ``teacher`` into a `StudentSegmenter` on every slice of ``volumes`` (HU arrays).

    ``teacher``: a `FewShotSegmenter` or a segmentation predictor (anything with ``label_names``,
    ``class_values``, a window and ``predict_probabilities(volume, progress=...)``).
    ``labels``: optional label arrays aligned with ``volumes`` (``None`` for a volume without
    annotation; −1 = not labelled); slices holding any value ≥ 0 add cross-entropy and focal
    loss against the annotation. ``volumes`` and ``labels`` may be generators: each volume is
    read, passed through the teacher and reduced to the working resolution before the next.
    """
    config = config or StudentConfig()
    config.check()
    if config.resolution is None:
        config = replace(config, resolution=_teacher_input_size(teacher))
    progress = ensure_progress(progress)
    window = config.window or _teacher_window(teacher)
    student = StudentSegmenter(teacher.label_names, config, window, teacher=teacher_provenance(teacher),
                               device=device)
    if list(student.class_values) != [int(v) for v in teacher.class_values]:
        raise LCTfoundError("the teacher's class values and label names disagree")
    data = DistillationSet(teacher, student.class_values, window, config.resolution)
    start = time.perf_counter()
    labels_iter = iter(labels) if labels is not None else None
    for number, volume in enumerate(volumes, 1):
        volume_labels = None
        if labels_iter is not None:
            try:
                volume_labels = next(labels_iter)
            except StopIteration:
                raise LCTfoundError(f"labels are given for {number - 1} volume(s) but there are more volumes") from None

        def forward(done: int, total: int, message: str, number: int = number) -> None:
            progress.update(done, total, f"teacher, volume {number}: {message}")

        data.add(volume, volume_labels, Progress(forward, progress.cancel_token))
        progress.check_cancelled()
    if data.count == 0:
        raise LCTfoundError("no volume to distil on: give at least one volume")
    if labels_iter is not None and next(labels_iter, None) is not None:
        raise LCTfoundError("more label maps than volumes")
    teacher_seconds = time.perf_counter() - start

    start = time.perf_counter()
    budget = None if config.time_budget is None else config.time_budget - teacher_seconds
    losses = train_student(student, data, config, progress, budget)
    training_seconds = time.perf_counter() - start
    units, probabilities, _, contexts, annotated = data.tensors()
    student.report = DistillReport(len(data.units), len(units), int(annotated.sum()), len(losses), losses[-1],
                                   losses, teacher_seconds, training_seconds,
                                   _agreement(student, units, probabilities, contexts))
    return student


def budget_epochs(planned: int, epoch_seconds: float, seconds_left: Optional[float]) -> int:
    """Epochs to train in all, the first one done in ``epoch_seconds``: ``planned``, or fewer (at least
    one) if the rest would not fit in ``seconds_left`` (None: no budget)."""
    if seconds_left is None or epoch_seconds <= 0:
        return planned
    return max(1, min(planned, 1 + int(seconds_left // epoch_seconds)))


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(round(max(0.0, seconds))), 60)
    return f"{minutes}:{seconds:02d}"


def train_student(student: StudentSegmenter, data: DistillationSet, config: StudentConfig,
                  progress: Optional[Progress] = None, budget_seconds: Optional[float] = None) -> list[float]:
    """Train ``student.network`` on collected distillation data; the mean loss of each epoch.

    ``budget_seconds``: time for the training; after the first epoch the number of epochs is cut to
    what fits (`budget_epochs`) and the cosine schedule shortened to that. Progress messages carry an ETA.
    """
    from monai.losses import DiceLoss, FocalLoss

    from ..training.finetune import seeded_flips

    progress = ensure_progress(progress)
    units, probabilities, small_labels, contexts, annotated = data.tensors()
    total_slices = len(units)
    torch.manual_seed(config.seed)
    network = student.network.train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = int(np.ceil(total_slices / config.batch_size))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps_per_epoch * config.epochs)
    focal = FocalLoss(gamma=config.focal_gamma, use_softmax=True, to_onehot_y=True, reduction="none")
    # Structures over the whole batch; smoothing of one pixel so a batch without any structure costs ~0.
    dice = DiceLoss(include_background=False, softmax=True, batch=True, smooth_nr=1.0, smooth_dr=1.0)
    losses: list[float] = []
    epochs, started = config.epochs, time.perf_counter()
    epoch = 0
    while epoch < epochs:
        order = torch.randperm(total_slices, generator=torch.Generator().manual_seed(config.seed + epoch)).numpy()
        epoch_loss = 0.0
        for step, batch in enumerate(slice_batches(order, config.batch_size)):
            progress.check_cancelled()
            x = units[torch.from_numpy(contexts[batch])].float() * 2 - 1
            p = probabilities[batch].float()
            y = small_labels[batch].long()
            if config.flips:
                items = [seeded_flips((config.seed, epoch, int(i)), x[j], p[j], y[j]) for j, i in enumerate(batch)]
                x, p, y = (torch.stack(parts) for parts in strict_zip(*items))
            x, p, y = x.to(student.device), p.to(student.device), y.to(student.device)
            logits = network(x).float()
            loss = distillation_loss(logits, p, config.temperature)
            if config.dice_weight:
                loss = loss + config.dice_weight * dice(logits, p)
            valid = y >= 0
            if annotated[batch].any() and valid.any():
                target = y.clamp_min(0)[:, None]
                per_pixel = (F.cross_entropy(logits, target[:, 0], reduction="none")
                             + focal(logits, target).sum(dim=1))
                loss = loss + per_pixel[valid].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip:
                torch.nn.utils.clip_grad_norm_(network.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            epoch_loss += float(loss.detach()) * len(batch)
            done, total = epoch * steps_per_epoch + step + 1, steps_per_epoch * epochs
            remaining = (time.perf_counter() - started) / done * (total - done)
            progress.update(done, total, f"student epoch {epoch + 1}/{epochs}, ETA {_duration(remaining)}")
        losses.append(epoch_loss / total_slices)
        if epoch == 0 and budget_seconds is not None:
            elapsed = time.perf_counter() - started
            fitted = budget_epochs(epochs, elapsed, budget_seconds - elapsed)
            if fitted < epochs:
                epochs = fitted
                schedule.T_max = steps_per_epoch * epochs  # the cosine decays to the end of the shorter run
        epoch += 1
    network.eval()
    return losses


@torch.no_grad()
def _agreement(student: StudentSegmenter, units: torch.Tensor, probabilities: torch.Tensor, contexts: np.ndarray,
               batch_size: int = 16) -> dict[str, float]:
    """Dice of student against teacher argmax per structure over the distillation slices."""
    overlap = np.zeros(len(student.class_values), dtype=np.int64)
    sizes = np.zeros_like(overlap)
    for batch in slice_batches(range(len(units)), batch_size):
        x = (units[torch.from_numpy(contexts[batch])].float() * 2 - 1).to(student.device)
        mine = student.network(x).argmax(1).cpu().numpy()
        theirs = probabilities[batch].float().argmax(1).numpy()
        for c in range(1, len(student.class_values)):
            a, b = mine == c, theirs == c
            overlap[c] += int((a & b).sum())
            sizes[c] += int(a.sum()) + int(b.sum())
    return {student.label_names[value]: (1.0 if sizes[c] == 0 else float(2.0 * overlap[c] / sizes[c]))
            for c, value in enumerate(student.class_values) if c > 0}

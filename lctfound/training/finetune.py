"""Fine-tuning machinery shared by the task issues: the backbone in three modes, heads, and a
dense-prediction task for the shared `TrainingLoop`.

Modes of `DenseBackbone` (the LCTfound U-Net run once at a fixed timestep, its last decoder
features — the input of ``conv_out`` — mapped to K outputs by a new output layer):

* ``frozen``  — backbone frozen; only the new output layer trains (a trainable head);
* ``adapter`` — backbone frozen; zero-initialised residual adapters after chosen up blocks and
  the output layer train (a few % of the parameters; CoreDiff-style modulation for enhancement
  follows the same pattern);
* ``full``    — every backbone weight trains, with the replaced output layer (the paper's
  whole-lung structure models, AdamW 1e-4).

The original ``conv_out`` is left in place (and unused): a fully fine-tuned backbone is saved as a
normal model folder that loads with the strict checks of `load_model`.

`PixelMLPHead` is the paper's per-pixel classifier on frozen multi-timestep features
(reference §6.1), used by few-shot segmentation on cached features.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CheckpointError, LCTfoundError
from ..models.bundle import LCTfoundModel, load_model
from ..models.task_models import TaskModel, backbone_reference, require_parts, save_task_model
from ..preprocessing import prepare_slices, resize_labels, slice_batches
from ..progress import Progress, ensure_progress
from .loop import TrainingTask
from ..compat import strict_zip

BACKBONE_MODES = ("frozen", "adapter", "full")


class ResidualAdapter(nn.Module):
    """x + up(SiLU(down(norm(x)))), with ``up`` zero-initialised so training starts from the backbone."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        hidden = max(8, channels // reduction)
        self.norm = nn.GroupNorm(1, channels)
        self.down = nn.Conv2d(channels, hidden, 1)
        self.up = nn.Conv2d(hidden, channels, 1)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(F.silu(self.down(self.norm(x))))


class DenseBackbone(nn.Module):
    """The LCTfound U-Net as a dense predictor with K output channels (see the module docstring).

    In ``full`` mode the given model's U-Net weights are trained in place.
    """

    def __init__(self, model: LCTfoundModel, out_channels: int, mode: str = "full", timestep: int = 0,
                 window: str = "mediastinal", adapter_blocks: Sequence[int] = (1, 2, 3, 4),
                 adapter_reduction: int = 4, class_values: Optional[Sequence[int]] = None):
        super().__init__()
        # Output channel c predicts label value class_values[c] (compact channels, any label values).
        self.class_values = [int(v) for v in (class_values if class_values is not None else range(out_channels))]
        if len(self.class_values) != out_channels:
            raise LCTfoundError(f"{out_channels} output channels need {out_channels} label values")
        if mode not in BACKBONE_MODES:
            raise LCTfoundError(f"unknown backbone mode {mode!r}; choose one of: {', '.join(BACKBONE_MODES)}")
        if out_channels < 1:
            raise LCTfoundError("a dense head needs at least one output channel")
        self.mode, self.timestep, self.window = mode, int(timestep), window
        self.unet = model.unet
        self.unet.requires_grad_(mode == "full")
        self.register_buffer("condition", model.condition(window).detach().float().cpu(), persistent=False)
        self.output_layer = nn.Conv2d(self.unet.conv_out.in_channels, out_channels, 3, padding=1)
        widths = list(reversed(self.unet.config.block_out_channels))
        self.adapter_blocks = tuple(int(b) for b in adapter_blocks) if mode == "adapter" else ()
        self.adapters = nn.ModuleDict({str(b): ResidualAdapter(widths[b], adapter_reduction) for b in self.adapter_blocks})
        self._decoder_features: Optional[torch.Tensor] = None
        # The hooks act only inside this module's forward, so the same U-Net can still serve
        # feature extraction or other tasks unchanged.
        self._active = False
        self.unet.conv_out.register_forward_hook(self._capture)
        for block in self.adapter_blocks:
            self.unet.up_blocks[block].register_forward_hook(self._adapt(block))
        self.scheduler = model.scheduler

    def _capture(self, _module, inputs, _output):
        if self._active:
            self._decoder_features = inputs[0]

    def _adapt(self, block: int):
        def hook(_module, _inputs, output):
            return self.adapters[str(block)](output) if self._active else output
        return hook

    def train(self, mode: bool = True) -> "DenseBackbone":
        super().train(mode)
        if self.mode != "full":
            self.unet.eval()  # a frozen backbone keeps inference behaviour (no dropout / norm updates)
        return self

    def forward(self, x0: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Model inputs (B, 3, S, S) in [−1, 1] → logits (B, K, S, S)."""
        x = x0
        t = torch.full((x0.shape[0],), self.timestep, dtype=torch.long, device=x0.device)
        if self.timestep > 0:
            if noise is None:
                raise LCTfoundError("a timestep above 0 needs the noise image (drawn by the caller, seeded)")
            x = self.scheduler.add_noise(x0, noise, t)
        condition = self.condition.to(x.device, x.dtype).expand(x.shape[0], -1, -1)
        self._active = True
        try:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode != "frozen"):
                self.unet(x, t, encoder_hidden_states=condition)
        finally:
            self._active = False
        features = self._decoder_features
        self._decoder_features = None
        if self.mode == "frozen":
            features = features.detach()
        return self.output_layer(features)

    def trainable_parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"output_layer": self.output_layer}
        if self.adapters:
            parts["adapters"] = self.adapters
        return parts

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "timestep": self.timestep, "window": self.window,
                "adapter_blocks": list(self.adapter_blocks), "out_channels": self.output_layer.out_channels,
                "class_values": self.class_values}

    @classmethod
    def from_task_model(cls, task_model: TaskModel, base_model: Optional[LCTfoundModel] = None) -> "DenseBackbone":
        """Rebuild the trained dense model: the stored fine-tuned backbone, or ``base_model`` plus parts."""
        settings = task_model.info["dense"]
        dense = cls(task_model.resolve_backbone(base_model), settings["out_channels"], settings["mode"], settings["timestep"], settings["window"],
                    settings["adapter_blocks"], class_values=settings.get("class_values"))
        require_parts(task_model, dense.trainable_parts())
        for name, part in dense.trainable_parts().items():
            part.load_state_dict(task_model.parts[name])
        return dense.eval()


#: Hidden widths of the original ``pixel_classifier`` (segmentation/pixel_classifier.py:23-48),
#: fixed whatever the input width: below 30 classes with Dropout(0.25), from 30 on without Dropout.
OFFICIAL_HEAD_WIDTHS = (256, 32)
OFFICIAL_HEAD_WIDTHS_MANY_CLASSES = (256, 128)
MANY_CLASSES = 30


def scaled_head_widths(in_channels: int, num_classes: int) -> tuple[int, int]:
    """The fast recipe's widths: the paper's for 3,840 channels, scaled down for narrow backbones."""
    first = max(32, min(256, in_channels // 15))
    return first, (128 if num_classes >= MANY_CLASSES else max(16, min(32, first // 8)))


def official_head_widths(num_classes: int) -> tuple[int, int]:
    return OFFICIAL_HEAD_WIDTHS_MANY_CLASSES if num_classes >= MANY_CLASSES else OFFICIAL_HEAD_WIDTHS


class PixelMLPHead(nn.Module):
    """The paper's per-pixel classifier on frozen features: C → h1 → h2 → K (dropout, BatchNorm).

    Layer order and indices are the original's, so its heads load strictly: below 30 classes
    ``Linear, Dropout, ReLU, BatchNorm1d`` twice then ``Linear`` (weights at ``layers.{0,3,4,7,8}``);
    from 30 classes on the same without the Dropout modules (``layers.{0,2,3,5,6}``). ``widths``
    (h1, h2) default to `scaled_head_widths`; the official recipe passes `official_head_widths`.
    """

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.25,
                 widths: Optional[Sequence[int]] = None):
        super().__init__()
        if num_classes < 2:
            raise LCTfoundError("a pixel classifier needs at least two classes (background and one structure)")
        first, second = (int(w) for w in (widths or scaled_head_widths(in_channels, num_classes)))
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, (first, second)
        many = num_classes >= MANY_CLASSES

        def block(width_in: int, width_out: int) -> list[nn.Module]:
            return [nn.Linear(width_in, width_out), *([] if many else [nn.Dropout(dropout)]), nn.ReLU(),
                    nn.BatchNorm1d(width_out)]

        self.layers = nn.Sequential(*block(in_channels, first), *block(first, second), nn.Linear(second, num_classes))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, C) pixel feature rows → (N, K) logits."""
        return self.layers(pixels)

    def config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "num_classes": self.num_classes, "widths": list(self.widths)}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Heads of ≥ 30 classes saved before the Dropout-free layout held Dropout(0) modules at
        # layers.1 and .5: their weights sit at layers.{0,3,4,7,8}; move them to {0,2,3,5,6}.
        if self.num_classes >= MANY_CLASSES and f"{prefix}layers.8.weight" in state_dict:
            moves = {"3": "2", "4": "3", "7": "5", "8": "6"}
            moved = {}
            for key in [k for k in list(state_dict) if k.startswith(f"{prefix}layers.")]:
                index, _, rest = key[len(prefix) + len("layers."):].partition(".")
                if index in moves:
                    moved[f"{prefix}layers.{moves[index]}.{rest}"] = state_dict.pop(key)
            state_dict.update(moved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def seeded_flips(key: Sequence[int], *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Flip all ``tensors`` together along x and/or y, each with probability ½, drawn from ``key``
    (seed, epoch, item), so a resumed run sees the same augmentation."""
    rng = np.random.default_rng(list(key))
    for axis in (-1, -2):
        if rng.random() < 0.5:
            tensors = tuple(t.flip(axis) for t in tensors)
    return tensors


class LabelledSlices(torch.utils.data.Dataset):
    """(HU slice, label slice) pairs preprocessed for a backbone, with seeded flips per (epoch, item)."""

    def __init__(self, images: Sequence[np.ndarray], labels: Sequence[np.ndarray], size: int, window: str,
                 seed: int = 0, flips: bool = True):
        if len(images) != len(labels) or not images:
            raise LCTfoundError("need the same, non-zero number of image and label slices")
        for image, label in zip(images, labels):
            if image.shape != label.shape:
                raise LCTfoundError(f"label slice {label.shape} does not match its image slice {image.shape}")
        self.images, self.labels = list(images), list(labels)
        self.size, self.window, self.seed, self.flips = size, window, seed, flips
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: int) -> dict:
        x = prepare_slices(self.images[item][None], self.window, self.size)[0]
        y = resize_labels(torch.as_tensor(self.labels[item][None], dtype=torch.long), self.size)[0]
        if self.flips:
            x, y = seeded_flips((self.seed, self.epoch, item), x, y)
        return {"pixel_values": x, "labels": y, "index": item}


class DenseLossModule(nn.Module):
    """`DenseBackbone` + Dice-cross-entropy (MONAI) as one trainable module for the loop."""

    def __init__(self, dense: DenseBackbone):
        super().__init__()
        from monai.losses import DiceCELoss

        self.dense = dense
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, batch: dict) -> torch.Tensor:
        logits = self.dense(batch["pixel_values"], batch.get("noise"))
        return self.loss(logits.float(), batch["labels"][:, None])


class DenseSegmentationTask(TrainingTask):
    """Train a dense segmentation model on labelled slices in any backbone mode."""

    name = "segmentation-dense"

    def __init__(self, backbone: LCTfoundModel, images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                 label_names: dict[int, str], mode: str = "full", timestep: int = 0, window: str = "mediastinal",
                 seed: int = 0, name: Optional[str] = None, description: str = ""):
        self.backbone, self.mode, self.timestep, self.window = backbone, mode, timestep, window
        self.label_names = {int(k): v for k, v in label_names.items() if int(k) != 0}
        present = set().union(*(np.unique(label).tolist() for label in labels))
        unnamed = sorted(int(v) for v in present - set(self.label_names) - {0})
        if unnamed:
            raise LCTfoundError(f"label value {unnamed[0]} has no name; name every label value (e.g. {unnamed[0]}=Name)")
        # Train on compact classes 0..K; the task model maps them back to the label values.
        self.class_values = [0] + sorted(self.label_names)
        self.num_classes = len(self.class_values)
        lookup = np.zeros(max(self.class_values) + 1, dtype=np.int64)
        lookup[self.class_values] = np.arange(self.num_classes)
        compact = [lookup[np.asarray(label, dtype=np.int64)] for label in labels]
        self.data = LabelledSlices(images, compact, backbone.sample_size, window, seed)
        self.model_name, self.description = name, description
        self.reference = backbone_reference(backbone)

    def dataset(self) -> LabelledSlices:
        return self.data

    def describe(self) -> str:
        names = ", ".join(f"{v}={n}" for v, n in sorted(self.label_names.items()))
        return f"{len(self.data)} labelled slices; classes {names}"

    def build_module(self) -> DenseLossModule:
        return DenseLossModule(DenseBackbone(self.backbone, self.num_classes, self.mode, self.timestep, self.window,
                                             class_values=self.class_values))

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        if self.timestep > 0:
            pixels = batch["pixel_values"]
            batch = {**batch, "noise": torch.randn(pixels.shape, generator=generator).to(pixels.device)}
        return batch

    def resume_settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "timestep": self.timestep, "window": self.window,
                "backbone_sha256": self.reference.get("unet_sha256"), "class_values": self.class_values,
                "items": len(self.data)}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.model_name, "description": self.description,
                "labels": {str(k): v for k, v in self.label_names.items()}}

    def save_model(self, module: DenseLossModule, folder: Path, metadata: dict[str, Any]) -> None:
        dense = module.dense
        stored_backbone = None
        if dense.mode == "full":
            stored_backbone = LCTfoundModel(dense.unet, self.backbone.scheduler, self.backbone.condition_encoder,
                                            {k: v for k, v in self.backbone.metadata.items() if k != "files"})
        save_task_model(folder, "segmentation", self.reference, dense.trainable_parts(),
                        {**metadata, "dense": dense.settings(),
                         "preprocessing": {"window": self.window, "normalization": "official",
                                           "size": self.backbone.sample_size}},
                        backbone_model=stored_backbone)

    def load_weights(self, module: DenseLossModule, folder: Path) -> None:
        from ..models.task_models import load_task_model

        task_model = load_task_model(folder, "segmentation")
        for name, part in module.dense.trainable_parts().items():
            part.load_state_dict(task_model.parts[name])
        stored = task_model.backbone_folder()
        if stored is not None:
            module.dense.unet.load_state_dict(load_model(stored).unet.state_dict())


@torch.no_grad()
def predict_dense(dense: DenseBackbone, hu_slices: np.ndarray, batch_size: int = 4) -> np.ndarray:
    """Label maps (N, H, W) of label values for HU slices on their native grid (argmax of bilinear logits)."""
    size = dense.unet.config.sample_size
    values = np.asarray(dense.class_values, dtype=np.uint8 if max(dense.class_values) < 256 else np.uint16)
    outputs = []
    for first in range(0, len(hu_slices), batch_size):
        chunk = np.asarray(hu_slices[first:first + batch_size])
        x = prepare_slices(chunk, dense.window, size).to(next(dense.parameters()).device)
        noise = None
        if dense.timestep > 0:
            noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(first)).to(x.device)
        logits = dense(x, noise).float().cpu()
        logits = F.interpolate(logits, size=chunk.shape[-2:], mode="bilinear", align_corners=False)
        outputs.append(values[logits.argmax(1).numpy()])
    return np.concatenate(outputs)


CLASSIFIER_MODES = ("frozen", "full")

#: Layout of `ClassifierHead`, stored with every classification model; heads of another layout are refused.
CLASSIFIER_HEAD = "conv256-pool-mlp"


class ClassifierHead(nn.Module):
    """Conv 3×3 to ``width`` (256) channels → ReLU → global average pool → MLP (dropout, width → mlp_width → K).

    ``activation`` (the rectified convolution output) is the layer Grad-CAM explains.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 256, mlp_width: int = 64,
                 dropout: float = 0.5):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.activation = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.mlp = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(width, mlp_width), nn.ReLU(),
                                 nn.Linear(mlp_width, num_classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.pool(self.activation(self.conv(features))))


class SliceClassifier(nn.Module):
    """Slice-level classifier on deep LCTfound features (reference §6.2, without its bugs).

    The output of up block ``block`` at each of ``timesteps`` (one shared noise image) is
    concatenated and read by a `ClassifierHead` (convolution to 256 channels, pooling, MLP).
    Unlike the published code every timestep is used (not only the first), dropout is off at
    evaluation, inputs are in [−1, 1] as in pretraining, and the prompt is passed.
    ``mode="frozen"`` trains only the head; ``"full"`` fine-tunes the backbone too.
    """

    def __init__(self, model: LCTfoundModel, num_classes: int, timesteps: Sequence[int] = (0, 50, 100),
                 block: int = 1, mode: str = "frozen", window: str = "mediastinal", width: int = 256,
                 mlp_width: int = 64, dropout: float = 0.5):
        super().__init__()
        if mode not in CLASSIFIER_MODES:
            raise LCTfoundError(f"unknown classifier mode {mode!r}; choose one of: {', '.join(CLASSIFIER_MODES)}")
        if num_classes < 2:
            raise LCTfoundError("a classifier needs at least two classes")
        if not 0 <= block <= 4 or not timesteps or any(not 0 <= t < 1000 for t in timesteps):
            raise LCTfoundError("choose up block 0..4 and timesteps in 0..999")
        self.unet, self.scheduler = model.unet, model.scheduler
        self.mode, self.window, self.block = mode, window, int(block)
        self.timesteps = tuple(int(t) for t in timesteps)
        self.unet.requires_grad_(mode == "full")
        self.register_buffer("condition", model.condition(window).detach().float().cpu(), persistent=False)
        channels = list(reversed(self.unet.config.block_out_channels))[self.block] * len(self.timesteps)
        self.head = ClassifierHead(channels, num_classes, width, mlp_width, dropout)
        self.num_classes, self.width, self.mlp_width = num_classes, width, mlp_width

    def train(self, mode: bool = True) -> "SliceClassifier":
        super().train(mode)
        if self.mode != "full":
            self.unet.eval()
        return self

    def feature_maps(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The concatenated deep feature maps (B, C·T, h, w) the head sees."""
        from ..models.taps import tap_up_blocks

        condition = self.condition.to(x0.device, x0.dtype).expand(x0.shape[0], -1, -1)
        maps = []
        with tap_up_blocks(self.unet, [self.block], detach=self.mode == "frozen") as captured:
            for timestep in self.timesteps:
                t = torch.full((x0.shape[0],), timestep, dtype=torch.long, device=x0.device)
                with torch.set_grad_enabled(torch.is_grad_enabled() and self.mode == "full"):
                    self.unet(self.scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=condition)
                maps.append(captured[self.block])
        return torch.cat(maps, dim=1)

    def forward(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_maps(x0, noise))

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "window": self.window, "block": self.block, "timesteps": list(self.timesteps),
                "num_classes": self.num_classes, "head": CLASSIFIER_HEAD, "width": self.width,
                "mlp_width": self.mlp_width}

    @classmethod
    def from_task_model(cls, task_model: TaskModel, base_model: Optional[LCTfoundModel] = None) -> "SliceClassifier":
        settings = task_model.info["classifier"]
        if settings.get("head") != CLASSIFIER_HEAD:
            layout = settings.get("head") or "conv-pool-linear"
            raise CheckpointError(f"{task_model.folder}: its classifier head ({layout}) predates the {CLASSIFIER_HEAD} "
                                  "head of this lctfound; train the model again")
        classifier = cls(task_model.resolve_backbone(base_model), settings["num_classes"], settings["timesteps"],
                         settings["block"], settings["mode"], settings["window"], settings["width"],
                         settings["mlp_width"])
        require_parts(task_model, ["head"])
        classifier.head.load_state_dict(task_model.parts["head"])
        return classifier.eval()


def central_slices(num_slices: int, count: int) -> list[int]:
    """The ``count`` central slice indices of a scan (every slice for ``count`` ≤ 0), as classifiers train on."""
    count = num_slices if count <= 0 else min(count, num_slices)
    first = (num_slices - count) // 2
    return list(range(first, first + count))


def slice_noise(slice_ids: Sequence[int], shape: Sequence[int], seed: int = 0) -> torch.Tensor:
    """One ε per slice drawn from (seed, slice index) alone, on the CPU, so results do not depend on batching."""
    noise = torch.empty((len(slice_ids), *shape))
    for row, slice_id in enumerate(slice_ids):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + int(slice_id))
        noise[row] = torch.randn(tuple(shape), generator=generator)
    return noise


class LabelledScanSlices(torch.utils.data.Dataset):
    """(HU slice, class) items; each remembers its scan so slice probabilities can be averaged per scan."""

    def __init__(self, slices: Sequence[np.ndarray], classes: Sequence[int], scans: Sequence[str], size: int,
                 window: str, seed: int = 0, flips: bool = True):
        if not (len(slices) == len(classes) == len(scans)) or not slices:
            raise LCTfoundError("need the same, non-zero number of slices, classes and scan ids")
        self.slices, self.classes, self.scans = list(slices), [int(c) for c in classes], list(scans)
        self.size, self.window, self.seed, self.flips = size, window, seed, flips
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.slices)

    def __getitem__(self, item: int) -> dict:
        x = prepare_slices(self.slices[item][None], self.window, self.size)[0]
        if self.flips:
            (x,) = seeded_flips((self.seed, self.epoch, item), x)
        return {"pixel_values": x, "labels": torch.tensor(self.classes[item]), "index": item}


class ClassifierLossModule(nn.Module):
    def __init__(self, classifier: SliceClassifier, class_weights: Optional[torch.Tensor] = None):
        super().__init__()
        self.classifier = classifier
        self.loss = nn.CrossEntropyLoss(weight=class_weights)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(self.classifier(batch["pixel_values"], batch["noise"]).float(), batch["labels"])


class SliceClassificationTask(TrainingTask):
    """Train a slice classifier (frozen head or full fine-tune); classes balanced by weighting the loss."""

    name = "classification"

    def __init__(self, backbone: LCTfoundModel, slices: Sequence[np.ndarray], classes: Sequence[int],
                 scans: Sequence[str], class_names: Sequence[str], mode: str = "frozen",
                 timesteps: Sequence[int] = (0, 50, 100), block: int = 1, window: str = "mediastinal", seed: int = 0,
                 name: Optional[str] = None, description: str = "", slices_per_scan: Optional[int] = None):
        self.backbone, self.mode, self.timesteps, self.block = backbone, mode, tuple(timesteps), block
        self.window = window
        # How the slices were chosen from each scan (central N, 0 = all), so prediction chooses alike.
        self.slices_per_scan = slices_per_scan
        self.class_names = list(class_names)
        if len(self.class_names) < 2:
            raise LCTfoundError("classification needs at least two class names")
        if any(not 0 <= int(c) < len(self.class_names) for c in classes):
            raise LCTfoundError(f"class indices must lie in 0..{len(self.class_names) - 1}")
        self.data = LabelledScanSlices(slices, classes, scans, backbone.sample_size, window, seed)
        counts = np.bincount([int(c) for c in classes], minlength=len(self.class_names)).astype(np.float64)
        self.class_weights = torch.tensor(counts.sum() / np.maximum(counts, 1) / len(counts), dtype=torch.float32)
        self.model_name, self.description = name, description
        self.reference = backbone_reference(backbone)

    def dataset(self) -> LabelledScanSlices:
        return self.data

    def describe(self) -> str:
        counts = np.bincount(self.data.classes, minlength=len(self.class_names))
        return (f"{len(self.data)} slices of {len(set(self.data.scans))} scans; "
                + ", ".join(f"{name}: {count}" for name, count in strict_zip(self.class_names, counts)))

    def build_module(self) -> ClassifierLossModule:
        classifier = SliceClassifier(self.backbone, len(self.class_names), self.timesteps, self.block, self.mode,
                                     self.window)
        return ClassifierLossModule(classifier, self.class_weights)

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        pixels = batch["pixel_values"]
        return {**batch, "noise": torch.randn(pixels.shape, generator=generator).to(pixels.device)}

    def resume_settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "timesteps": list(self.timesteps), "block": self.block, "window": self.window,
                "backbone_sha256": self.reference.get("unet_sha256"), "classes": self.class_names,
                "items": len(self.data)}

    def metadata(self) -> dict[str, Any]:
        metadata = {"name": self.model_name, "description": self.description, "classes": self.class_names}
        if self.slices_per_scan is not None:
            metadata["slice_selection"] = {"slices_per_scan": int(self.slices_per_scan)}
        return metadata

    def save_model(self, module: ClassifierLossModule, folder: Path, metadata: dict[str, Any]) -> None:
        classifier = module.classifier
        stored_backbone = None
        if classifier.mode == "full":
            stored_backbone = LCTfoundModel(classifier.unet, self.backbone.scheduler, self.backbone.condition_encoder,
                                            {k: v for k, v in self.backbone.metadata.items() if k != "files"})
        save_task_model(folder, "classification", self.reference, {"head": classifier.head},
                        {**metadata, "classifier": classifier.settings(),
                         "preprocessing": {"window": self.window, "normalization": "official",
                                           "size": self.backbone.sample_size}},
                        backbone_model=stored_backbone)

    def load_weights(self, module: ClassifierLossModule, folder: Path) -> None:
        from ..models.task_models import load_task_model

        task_model = load_task_model(folder, "classification")
        module.classifier.head.load_state_dict(task_model.parts["head"])
        stored = task_model.backbone_folder()
        if stored is not None:
            module.classifier.unet.load_state_dict(load_model(stored).unet.state_dict())


@torch.no_grad()
def classify_slices(classifier: SliceClassifier, hu_slices: np.ndarray, slices: Optional[Sequence[int]] = None,
                    batch_size: int = 4, seed: int = 0, progress: Optional[Progress] = None) -> np.ndarray:
    """Class probabilities (len(slices), K) of ``hu_slices[slices]`` (default: all) of a (N, H, W) HU array.

    Each slice's noise comes from (seed, its index), so the result does not depend on batching;
    a scan's score is the mean over its slices.
    """
    progress = ensure_progress(progress)
    indices = list(range(len(hu_slices))) if slices is None else [int(s) for s in slices]
    bad = [i for i in indices if not 0 <= i < len(hu_slices)]
    if bad:
        raise LCTfoundError(f"slice {bad[0]} is outside the volume (0..{len(hu_slices) - 1})")
    size = classifier.unet.config.sample_size
    device = next(classifier.head.parameters()).device
    probabilities = np.zeros((len(indices), classifier.num_classes), dtype=np.float32)
    done = 0
    for batch in slice_batches(indices, batch_size):
        progress.check_cancelled()
        x = prepare_slices(np.asarray(hu_slices[batch]), classifier.window, size).to(device)
        noise = slice_noise(batch, x.shape[1:], seed).to(device)
        probabilities[done:done + len(batch)] = torch.softmax(classifier(x, noise).float(), dim=1).cpu().numpy()
        done += len(batch)
        progress.update(done, len(indices), f"slice {batch[-1]}")
    return probabilities

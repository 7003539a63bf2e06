"""A trainable 3D segmentation decoder on the CT-FM encoder (frozen or fully fine-tuned).

The network is MONAI's ``SegResNetDS`` — CT-FM's own downstream segmentation model: its encoder
is a ``SegResEncoder`` with CT-FM's configuration, initialised from the CT-FM weights, and its
decoder upsamples the stride-16 map level by level, adding the encoder's stride-8/4/2/1 maps as
skip connections (a residual block and a 1×1×1 head per level). Modes:

* ``frozen`` — the encoder keeps its weights and BatchNorm statistics (eval mode, no gradients);
  only the decoder trains (fast, few labelled scans);
* ``full``   — encoder and decoder weights train together (CT-FM's whole-body recipe); the
  encoder's BatchNorm statistics stay as pretrained (a batch of one or two 3D patches gives
  unusable statistics), and the decoder uses instance norm for the same reason.

Everything happens in CT-FM's preprocessing space (`prepare_volume`: SPL, 3×1×1 mm, body crop,
HU −1024..2048 → 0..1, padding to multiples of 16): label maps are resampled into it with
nearest neighbour through the exact index mapping (`PreparedVolume.from_source_grid`),
training uses random patches (multiples of 16) centred on labelled and unlabelled voxels in
equal shares (MONAI ``RandCropByPosNegLabel``, re-seeded per (seed, epoch, item) so a resumed run
draws the same patches), and the loss is MONAI's Dice + cross-entropy. Prediction runs MONAI's
``sliding_window_inference`` (Gaussian blending) over the prepared volume, takes the arg-max
class and resamples it back onto the input grid with nearest neighbour (`to_source_grid`), so
the label map lies exactly on the input volume's voxels.

Saved as a task model (task ``ctfm-segmentation``): ``decoder.safetensors`` (the ``up_layers``
of ``SegResNetDS``), plus ``encoder.safetensors`` after full fine-tuning; ``task.json`` names the
CT-FM backbone by the sha256 of its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError, LCTfoundError
from ..io.volume import CTVolume, read_label_volume, read_volume
from ..models.task_models import TaskModel, require_parts, save_task_model
from ..progress import Progress, ensure_progress
from ..training.loop import LoopConfig, TrainingLoop, TrainingResult, TrainingTask, check_run_folder
from .model import CTFMModel, build_encoder, check_config
from .preprocess import DEFAULT_PREPROCESSING, CTFMPreprocessing, PreparedVolume, prepare_volume
from .tasks import SEGMENTATION_TASK, backbone_for, backbone_reference, load_ctfm_task_model
from ..compat import strict_zip

MODES = ("frozen", "full")
DEFAULT_ROI = (32, 128, 128)  # CT-FM's pretraining patch: 96×128×128 mm at 3×1×1 mm
DECODER_PART, ENCODER_PART = "decoder", "encoder"


def check_roi(roi: Sequence[int], multiple: int = 16) -> tuple[int, int, int]:
    roi = tuple(int(v) for v in roi)
    if len(roi) != 3 or any(v < multiple or v % multiple for v in roi):
        raise LCTfoundError(f"patch {'x'.join(map(str, roi))}: each size must be a multiple of {multiple} voxels "
                            "(the encoder downsamples 4 times)")
    return roi


class CTFMSegmenter(nn.Module):
    """``SegResNetDS`` with a CT-FM encoder; output channel c predicts label value ``class_values[c]``."""

    def __init__(self, config: dict[str, Any], class_values: Sequence[int], mode: str = "frozen"):
        from monai.networks.nets import SegResNetDS

        super().__init__()
        if mode not in MODES:
            raise LCTfoundError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.class_values = [int(v) for v in class_values]
        if len(self.class_values) < 2 or self.class_values[0] != 0:
            raise LCTfoundError("a segmenter needs background (0) and at least one label value")
        self.config = check_config(dict(config))
        self.mode = mode
        # Instance norm in the decoder: small 3D batches make BatchNorm statistics differ between
        # training and inference. The encoder keeps CT-FM's BatchNorm layers and statistics.
        self.net = SegResNetDS(spatial_dims=3, init_filters=self.config["init_filters"], in_channels=1,
                               out_channels=len(self.class_values), blocks_down=tuple(self.config["blocks_down"]),
                               norm="instance", act="relu", dsdepth=1)
        self.net.encoder = build_encoder(self.config)
        self.net.encoder.requires_grad_(mode == "full")
        # Zero-initialised upsampling: every decoder level starts as its encoder skip map plus a residual
        # block, so training begins from the fine encoder features instead of noise from the coarse levels.
        for level in self.net.up_layers:
            for parameter in level["upsample"].parameters():
                nn.init.zeros_(parameter)

    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    @property
    def decoder(self) -> nn.Module:
        return self.net.up_layers

    def load_encoder(self, state: dict[str, torch.Tensor]) -> None:
        self.net.encoder.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> "CTFMSegmenter":
        super().train(mode)
        # CT-FM's BatchNorm statistics stay as pretrained in both modes (full fine-tuning trains the
        # weights only): batch statistics of one or two patches would replace them with noise.
        self.net.encoder.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 1, D, H, W] prepared input (sizes multiples of 16) → logits [B, K, D, H, W]."""
        return self.net(x)

    def trainable_parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {DECODER_PART: self.net.up_layers}
        if self.mode == "full":
            parts[ENCODER_PART] = self.net.encoder
        return parts

    def settings(self, roi: Sequence[int]) -> dict[str, Any]:
        return {"mode": self.mode, "class_values": self.class_values, "out_channels": len(self.class_values),
                "config": self.config, "roi": list(roi),
                "network": "monai SegResNetDS (dsdepth 1, instance-norm decoder) with the CT-FM SegResEncoder"}


def new_segmenter(model: CTFMModel, class_values: Sequence[int], mode: str = "frozen") -> CTFMSegmenter:
    """A segmenter whose encoder holds ``model``'s weights and a freshly initialised decoder."""
    segmenter = CTFMSegmenter(model.config, class_values, mode)
    segmenter.load_encoder({k: v.detach().cpu() for k, v in model.encoder.state_dict().items()})
    return segmenter


# --------------------------------------------------------------------------- training data

@dataclass
class PreparedCase:
    """A training case in CT-FM's input space: the image, the compact class map and where labels are."""

    name: str
    image: np.ndarray  # float32 (a0, a1, a2), padded to at least the patch
    classes: np.ndarray  # uint8 compact class indices on the same grid
    fg_indices: np.ndarray
    bg_indices: np.ndarray


def prepare_case(volume: CTVolume, labels: CTVolume, class_values: Sequence[int], roi: Sequence[int], name: str = "",
                 preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING) -> PreparedCase:
    """Preprocess an (image, label map) pair into a training case (labels resampled exactly, nearest)."""
    from monai.transforms.utils import map_binary_to_indices

    if labels.shape != volume.shape:
        raise InputError(f"{name or 'label map'}: does not lie on the image's voxel grid")
    prepared = prepare_volume(volume, preprocessing)
    lookup = np.zeros(int(max(class_values)) + 1, dtype=np.uint8)
    lookup[list(class_values)] = np.arange(len(class_values), dtype=np.uint8)
    values = np.asarray(labels.array)
    unknown = sorted(set(np.unique(values).tolist()) - set(int(v) for v in class_values))
    if unknown:
        raise InputError(f"{name or 'label map'}: label value {unknown[0]} has no name")
    classes = prepared.from_source_grid(lookup[values.astype(np.int64)], fill=0, order=0)
    if not classes.any():
        raise InputError(f"{name or 'label map'}: no labelled voxel inside the body crop of the image")
    pad = [(0, max(0, int(r) - s)) for s, r in strict_zip(classes.shape, roi)]
    image = np.pad(prepared.array, pad, constant_values=0.0)
    classes = np.pad(classes, pad, constant_values=0)
    fg, bg = map_binary_to_indices(torch.from_numpy(classes[None] > 0))
    return PreparedCase(name, image, classes, np.asarray(fg), np.asarray(bg))


class PatchDataset(torch.utils.data.Dataset):
    """``patches_per_case`` random patches of each case per epoch, drawn from (seed, epoch, item)."""

    def __init__(self, cases: Sequence[PreparedCase], roi: Sequence[int], patches_per_case: int = 4, seed: int = 0,
                 positive_fraction: float = 0.5):
        if not cases:
            raise LCTfoundError("need at least one labelled case")
        if patches_per_case < 1:
            raise LCTfoundError("patches per case must be at least 1")
        if not 0.0 <= positive_fraction <= 1.0:
            raise LCTfoundError("the share of patches centred on labels must lie between 0 and 1")
        self.cases, self.roi, self.per_case, self.seed = list(cases), check_roi(roi), patches_per_case, seed
        self.positive_fraction = positive_fraction
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.cases) * self.per_case

    def __getitem__(self, item: int) -> dict:
        from monai.transforms import RandCropByPosNegLabel

        case = self.cases[item // self.per_case]
        image = torch.from_numpy(case.image[None])
        classes = torch.from_numpy(case.classes[None].astype(np.int64))
        crop = RandCropByPosNegLabel(self.roi, pos=self.positive_fraction, neg=1.0 - self.positive_fraction,
                                     num_samples=1, fg_indices=case.fg_indices, bg_indices=case.bg_indices)
        crop.set_random_state(seed=int(np.random.SeedSequence([self.seed, self.epoch, item]).generate_state(1)[0]))
        crop.randomize(label=classes)
        patch = crop(image, randomize=False)[0]
        labels = crop(classes, randomize=False)[0]
        return {"image": _plain(patch).float().contiguous(), "labels": _plain(labels).long().contiguous(),
                "index": item}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor (MONAI crops return MetaTensors, whose metadata the loop does not need)."""
    return tensor.as_tensor() if hasattr(tensor, "as_tensor") else tensor


class SegmenterLossModule(nn.Module):
    """`CTFMSegmenter` + MONAI Dice-cross-entropy as one trainable module for the loop."""

    def __init__(self, segmenter: CTFMSegmenter):
        from monai.losses import DiceCELoss

        super().__init__()
        self.segmenter = segmenter
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss(self.segmenter(batch["image"]).float(), batch["labels"])


class DecoderTask(TrainingTask):
    """Train the segmentation decoder (frozen encoder) or the whole network (full) on prepared cases."""

    name = SEGMENTATION_TASK

    def __init__(self, model: CTFMModel, cases: Sequence[PreparedCase], label_names: dict[int, str],
                 mode: str = "frozen", roi: Sequence[int] = DEFAULT_ROI, patches_per_case: int = 4, seed: int = 0,
                 preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING, name: Optional[str] = None,
                 description: str = "", data_fingerprint: str = ""):
        if mode not in MODES:
            raise LCTfoundError(f"unknown mode {mode!r}; choose one of: {', '.join(MODES)}")
        self.model, self.mode, self.roi = model, mode, check_roi(roi)
        self.label_names = {int(k): str(v) for k, v in label_names.items() if int(k) != 0}
        self.class_values = [0] + sorted(self.label_names)
        self.data = PatchDataset(cases, self.roi, patches_per_case, seed)
        self.preprocessing, self.model_name, self.description = preprocessing, name, description
        self.reference = backbone_reference(model)
        self.data_fingerprint = data_fingerprint

    def dataset(self) -> PatchDataset:
        return self.data

    def describe(self) -> str:
        names = ", ".join(f"{v}={n}" for v, n in sorted(self.label_names.items()))
        return (f"{len(self.data.cases)} labelled scans, {self.data.per_case} patches of "
                f"{'x'.join(map(str, self.roi))} each per epoch; classes {names}")

    def build_module(self) -> SegmenterLossModule:
        return SegmenterLossModule(new_segmenter(self.model, self.class_values, self.mode))

    def resume_settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "roi": list(self.roi), "class_values": self.class_values,
                "patches_per_case": self.data.per_case, "items": len(self.data),
                "backbone_sha256": self.reference["weights_sha256"], "data_fingerprint": self.data_fingerprint}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.model_name, "description": self.description,
                "labels": {str(k): v for k, v in sorted(self.label_names.items())},
                "training_cases": [case.name for case in self.data.cases]}

    def save_model(self, module: SegmenterLossModule, folder: Path, metadata: dict[str, Any]) -> None:
        segmenter = module.segmenter
        save_task_model(folder, SEGMENTATION_TASK, self.reference, segmenter.trainable_parts(),
                        {**metadata, "segmentation": segmenter.settings(self.roi),
                         "preprocessing": self.preprocessing.as_dict(), "mode": self.mode})

    def load_weights(self, module: SegmenterLossModule, folder: Path) -> None:
        task_model = load_ctfm_task_model(folder, SEGMENTATION_TASK)
        for name, part in module.segmenter.trainable_parts().items():
            require_parts(task_model, [name])
            part.load_state_dict(task_model.parts[name])


def label_names_for(values: set[int], text: Optional[str] = None) -> dict[int, str]:
    """``{value: name}`` for every label value > 0; ``text`` like ``1=Lesion,2=Vessel`` names them
    (it must name exactly the values present; see `lctfound.validation.parse_label_names`)."""
    from ..validation import parse_label_names

    return parse_label_names(text, values, "the label maps")


def read_training_pairs(images: Sequence[str | Path], labels: Sequence[str | Path], validate: bool = True
                        ) -> list[tuple[str, CTVolume, CTVolume]]:
    """(case name, image, label map) of each pair; each label map must lie on its image's grid."""
    from ..io.volume import volume_stem

    if not images or len(images) != len(labels):
        raise LCTfoundError("give each image with its label map (at least one pair)")
    pairs = []
    for image_path, label_path in strict_zip(images, labels):
        image = read_volume(image_path, validate=validate)
        label = read_label_volume(label_path, reference=image)
        if not np.any(label.array):
            raise InputError(f"{label_path}: has no labelled voxel")
        pairs.append((volume_stem(image_path), image, label))
    return pairs


def train_decoder(model: CTFMModel, pairs: Sequence[tuple[str, CTVolume, CTVolume]], loop: LoopConfig,
                  label_names: Optional[dict[int, str]] = None, mode: str = "frozen", roi: Sequence[int] = DEFAULT_ROI,
                  patches_per_case: int = 4, preprocessing: CTFMPreprocessing = DEFAULT_PREPROCESSING,
                  name: Optional[str] = None, description: str = "", resume: bool = False,
                  progress: Optional[Progress] = None,
                  on_event: Optional[Callable[[dict], None]] = None) -> TrainingResult:
    """Preprocess the (image, label map) pairs and train the decoder with the `TrainingLoop`."""
    from ..hashing import fingerprint
    from .tasks import volume_fingerprint

    output = Path(loop.output).expanduser()
    check_run_folder(output, resume)  # before the costly preparation
    roi = check_roi(roi)
    values = set().union(*(set(np.unique(label.array).tolist()) for _, _, label in pairs)) if pairs else set()
    names = label_names_for(values) if label_names is None else {int(k): v for k, v in label_names.items() if int(k)}
    unnamed = sorted(v for v in values if v and v not in names)
    if unnamed:
        raise LCTfoundError(f"label value {unnamed[0]} has no name; name every label value (e.g. {unnamed[0]}=Name)")
    class_values = [0] + sorted(names)
    progress = ensure_progress(progress)
    cases = []
    for number, (case, image, label) in enumerate(pairs):
        progress.check_cancelled()
        progress.update(number, len(pairs), f"preparing {case}")
        cases.append(prepare_case(image, label, class_values, roi, case, preprocessing))
    data = fingerprint([(case, volume_fingerprint(image) + volume_fingerprint(label)) for case, image, label in pairs])
    task = DecoderTask(model, cases, names, mode, roi, patches_per_case, loop.seed, preprocessing, name, description,
                       data)
    return TrainingLoop(loop, task, resume, progress, on_event).run()


# --------------------------------------------------------------------------- prediction

class DecoderSegmenter:
    """A trained ``ctfm-segmentation`` task model, ready to segment volumes."""

    def __init__(self, segmenter: CTFMSegmenter, task_model: TaskModel):
        self.segmenter, self.task_model = segmenter.eval(), task_model
        settings = task_model.info["segmentation"]
        self.roi = check_roi(settings["roi"])
        self.label_names = {int(k): v for k, v in task_model.info.get("labels", {}).items()}
        self.preprocessing = CTFMPreprocessing.from_dict(task_model.info["preprocessing"])

    @classmethod
    def load(cls, spec: str | Path, model: Optional[CTFMModel | str | Path] = None,
             device: str | torch.device = "cpu") -> "DecoderSegmenter":
        """Load the task model; a frozen-encoder model needs its CT-FM backbone (``model`` or the
        folder it names, checked by sha256); a fully fine-tuned one carries its encoder."""
        task_model = load_ctfm_task_model(spec, SEGMENTATION_TASK)
        settings = task_model.info["segmentation"]
        segmenter = CTFMSegmenter(settings["config"], settings["class_values"], settings["mode"])
        require_parts(task_model, [DECODER_PART])
        if settings["mode"] == "full":
            require_parts(task_model, [ENCODER_PART])
            segmenter.load_encoder(task_model.parts[ENCODER_PART])
        else:
            backbone = backbone_for(task_model, model, "cpu")
            segmenter.load_encoder({k: v.detach().cpu() for k, v in backbone.encoder.state_dict().items()})
        segmenter.decoder.load_state_dict(task_model.parts[DECODER_PART])
        return cls(segmenter.to(device), task_model)

    @property
    def device(self) -> torch.device:
        return next(self.segmenter.parameters()).device

    def predict_prepared(self, prepared: PreparedVolume, overlap: float = 0.5, batch_size: int = 1,
                         progress: Optional[Progress] = None) -> np.ndarray:
        """Label values on the prepared grid (sliding windows of the training patch, Gaussian-blended)."""
        from monai.inferers import sliding_window_inference

        from .features import WindowSettings, window_count

        progress = ensure_progress(progress)
        if not 0.0 <= overlap < 1.0:
            raise LCTfoundError(f"overlap {overlap}: must be at least 0 and below 1")
        array = prepared.array
        pad = [(0, max(0, r - s)) for s, r in strict_zip(array.shape, self.roi)]
        inputs = torch.from_numpy(np.ascontiguousarray(np.pad(array, pad, constant_values=0.0)))[None, None]
        total = window_count(inputs.shape[2:], WindowSettings(self.roi, overlap, batch_size))
        done = 0
        device = self.device

        def predictor(batch: torch.Tensor) -> torch.Tensor:
            nonlocal done
            progress.check_cancelled()
            logits = self.segmenter(batch.to(device)).float().softmax(dim=1).cpu()
            done += batch.shape[0]
            progress.update(done, total, f"window {done}/{total}")
            return logits

        progress.update(0, total, f"{total} windows of {'x'.join(map(str, self.roi))}")
        with torch.inference_mode():
            probabilities = sliding_window_inference(inputs, self.roi, batch_size, predictor, overlap=overlap,
                                                     mode="gaussian", device=torch.device("cpu"))
        classes = probabilities[0].argmax(dim=0).numpy()[tuple(slice(0, s) for s in array.shape)]
        values = np.asarray(self.segmenter.class_values, dtype=np.int64)
        return values[classes]

    def predict(self, volume: CTVolume, overlap: float = 0.5, batch_size: int = 1,
                progress: Optional[Progress] = None) -> CTVolume:
        """A label map on ``volume``'s own voxel grid (outside the body crop: background)."""
        prepared = prepare_volume(volume, self.preprocessing)
        labels = self.predict_prepared(prepared, overlap, batch_size, progress)
        dtype = np.uint8 if max(self.segmenter.class_values) < 256 else np.uint16
        on_source = prepared.to_source_grid(labels.astype(np.float32), fill=0, order=0, dtype=dtype)
        result = volume.with_array(on_source, kind="label", task=SEGMENTATION_TASK)
        result.metadata["label_names"] = {str(k): v for k, v in self.label_names.items()}
        return result


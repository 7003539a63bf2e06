"""Backbones the engine can run, each with its preprocessing contract and what it can do.

Two backbones exist:

* ``lctfound`` — the LCTfound 2D diffusion U-Net (axial slices, denoising features, generative
  tasks such as enhancement);
* ``ctfm`` — CT-FM, a 3D MONAI ``SegResEncoder`` trained contrastively on whole-body CT: a
  discriminative encoder with no image decoder, so it has no generative tasks.

Front ends call `tasks_for` / `supports` to offer only what the chosen backbone can do, and
`unsupported_reason` to explain a greyed-out task in one line. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .errors import LCTfoundError

# Every task name any backbone may declare. A typo in a task name is a bug, so `supports`
# rejects unknown names instead of answering False.
TASKS: dict[str, str] = {
    "features": "feature extraction for downstream heads",
    "embedding": "one vector per volume (and per window)",
    "dense-features": "feature maps on the image grid",
    "retrieval": "similar-scan / similar-region search with cosine similarity",
    "classification-probe": "linear or MLP probe on features (diagnosis, prognosis)",
    "segmentation-decoder": "a trainable segmentation head on the backbone",
    "pretraining": "self-supervised pretraining of the backbone itself",
    "generation": "sampling new images",
    "enhancement": "image enhancement (denoising, artefact reduction)",
    "virtual-cta": "virtual CT angiography from plain CT",
    "sparse-view-reconstruction": "reconstruction from sparse-view CT",
}
GENERATIVE_TASKS = frozenset({"generation", "enhancement", "virtual-cta", "sparse-view-reconstruction"})


@dataclass(frozen=True)
class PreprocessingContract:
    """What a backbone expects its input to look like (documented and used by its pipeline)."""

    orientation: str  # MONAI axis codes of the array axes, or "axial slices" for 2D models
    spacing_mm: Optional[tuple[float, float, float]]  # per array axis; None: native spacing
    hu_window: tuple[float, float]  # clipped Hounsfield range
    scaled_range: tuple[float, float]  # the HU window maps linearly onto this range
    foreground_crop: str  # how the body is cropped ("" for none)
    pad_value_hu: float  # padding intensity, in HU before scaling
    size_multiple: int  # every spatial size must be a multiple of this
    window: tuple[int, ...]  # default patch / slice size fed to the network
    description: str = ""


@dataclass(frozen=True)
class Backbone:
    """A backbone: its name, dimensionality, preprocessing contract and capabilities."""

    name: str
    title: str
    dimensionality: int  # 2: slice by slice; 3: volumetric
    preprocessing: PreprocessingContract
    capabilities: frozenset[str]
    embedding_dim: Optional[int] = None
    feature_channels: tuple[int, ...] = ()
    feature_strides: tuple[int, ...] = ()
    weights: str = ""  # where official weights come from
    licence: str = ""
    notes: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def supports(self, task: str) -> bool:
        return supports(self, task)


LCTFOUND = Backbone(
    name="lctfound",
    title="LCTfound (2D diffusion U-Net, lung CT)",
    dimensionality=2,
    preprocessing=PreprocessingContract(
        orientation="axial slices (k, j, i) as stored",
        spacing_mm=None,
        hu_window=(-1250.0, 250.0),  # the lung window W1500/L-500 (mediastinal W400/L0 too)
        scaled_range=(-1.0, 1.0),
        foreground_crop="",
        pad_value_hu=-1024.0,
        size_multiple=8,
        window=(256, 256),
        description="axial slices resized to the model's sample size, each HU window (lung, mediastinal "
                    "or custom) mapped to [-1, 1], prompt-conditioned on the window",
    ),
    capabilities=frozenset({"features", "dense-features", "classification-probe", "segmentation-decoder",
                            "pretraining", "generation", "enhancement", "virtual-cta",
                            "sparse-view-reconstruction"}),
    weights="official LCTfound release (diffusers folder) or a model trained with `lctfound train`",
    notes="denoising features: timesteps x U-Net up blocks, slice by slice",
)

CTFM = Backbone(
    name="ctfm",
    title="CT-FM (3D SegResEncoder, whole-body CT)",
    dimensionality=3,
    preprocessing=PreprocessingContract(
        orientation="SPL",
        spacing_mm=(3.0, 1.0, 1.0),
        hu_window=(-1024.0, 2048.0),
        scaled_range=(0.0, 1.0),
        foreground_crop="bounding box of voxels > 0 HU (MONAI CropForeground on the resampled HU image)",
        pad_value_hu=-1024.0,
        size_multiple=16,
        window=(32, 128, 128),
        description="MONAI Orientation SPL, Spacing 3x1x1 mm (bilinear), body crop on HU > 0, "
                    "ScaleIntensityRange -1024..2048 -> 0..1 with clipping, padding to multiples of 16; "
                    "windows of 32x128x128 voxels (the pretraining patch)",
    ),
    capabilities=frozenset({"features", "embedding", "dense-features", "retrieval",
                            "classification-probe", "segmentation-decoder"}),
    embedding_dim=512,
    feature_channels=(32, 64, 128, 256, 512),
    feature_strides=(1, 2, 4, 8, 16),
    weights="project-lighter/ct_fm_feature_extractor (Hugging Face; model.safetensors 311,116,176 bytes), "
            "used from a local folder or the local Hugging Face cache only",
    licence="Apache-2.0",
    notes="discriminative encoder without an image decoder: no generative tasks",
)

BACKBONES: dict[str, Backbone] = {backbone.name: backbone for backbone in (LCTFOUND, CTFM)}


def list_backbones() -> list[Backbone]:
    """All backbones, LCTfound first."""
    return list(BACKBONES.values())


def get_backbone(name: str | Backbone) -> Backbone:
    """The backbone called ``name`` (case-insensitive; ``ct-fm`` is accepted for ``ctfm``)."""
    if isinstance(name, Backbone):
        return name
    key = str(name).strip().lower().replace("ct-fm", "ctfm").replace("_", "")
    if key not in BACKBONES:
        raise LCTfoundError(f"unknown backbone {name!r}; choose one of: {', '.join(BACKBONES)}")
    return BACKBONES[key]


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise LCTfoundError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")
    return task


def supports(backbone: str | Backbone, task: str) -> bool:
    """Whether ``backbone`` can do ``task`` (a name from `TASKS`)."""
    return _check_task(task) in get_backbone(backbone).capabilities


def tasks_for(backbone: str | Backbone) -> tuple[str, ...]:
    """The tasks ``backbone`` can do, in the order of `TASKS` (for menus that hide the rest)."""
    capabilities = get_backbone(backbone).capabilities
    return tuple(task for task in TASKS if task in capabilities)


def unsupported_reason(backbone: str | Backbone, task: str) -> str:
    """Empty when supported; otherwise one line saying why (for a greyed-out button's tooltip)."""
    backbone = get_backbone(backbone)
    if supports(backbone, task):
        return ""
    if task in GENERATIVE_TASKS:
        return (f"{backbone.title} is a discriminative encoder with no image decoder; "
                f"{TASKS[task]} needs the LCTfound backbone")
    others = [b.name for b in list_backbones() if task in b.capabilities]
    alternative = f"; use {', '.join(others)}" if others else ""
    return f"{backbone.title} does not provide {TASKS[task]}{alternative}"

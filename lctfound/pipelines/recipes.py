"""Few-shot segmentation recipes: ``official`` (the paper's code, number for number) and ``fast``.

The ``official`` recipe reproduces the original segmentation code (``segmentation/main_seg.py``,
``util.py``, ``fea_ex.py``, ``pixel_classifier.py``; pinned by the golden outputs in
``shared/golden/lctfound-official`` and Testing/test_official_recipe.py):

* input: window → uint8 as ``MDataset`` (`lctfound.preprocessing.official_uint8`) → /255 →
  ``ScaleIntensity(0, 1)`` → MONAI ``Resize`` (area) to the model's size → (x − 0.5)/0.5;
* labels: area-resized like the image and truncated (only fully covered pixels keep a structure);
* features at every pixel of the model's input size (256² for the official model);
* head: ``pixel_classifier`` with hidden widths 256 and 32 whatever the input width;
* loss: cross-entropy + mean(α (1 − p)^γ · ce), α 0.25, γ 2 (`segmentation_loss`);
* AdamW lr 1e-3, weight decay 0.01, cosine schedule with 100 warm-up steps over
  ``batches per epoch × 20`` steps, stepped per batch (`warmup_cosine_schedule`);
* batches of 4 images with every pixel, 20 epochs, gradient clipping 1.0, seed 123456, head in
  train mode (dropout on), flips along both axes and rotation ±0.2 rad (p 0.5 each) on image and
  label, fresh noise per batch: the backbone runs on every augmented batch, as in the original.

The ``fast`` recipe (the default for every other backbone) trains on cached features of a
coarser grid (at most 128²), on a class-balanced subset of pixels, for at least 600 steps; see
docs/recipes.md for every difference and its reason.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import LCTfoundError

RECIPES = ("official", "fast")
RECIPE_CHOICES = ("auto",) + RECIPES

#: The original training settings (segmentation/main_seg.py; shared/golden/lctfound-official/recipe.json).
OFFICIAL_SETTINGS = {
    "epochs": 20,                # main_seg.py:17-35 num_epochs
    "batch_images": 4,           # train_batch_size, every pixel of each image (util.py:185-186)
    "learning_rate": 1e-3,
    "weight_decay": 0.01,        # main_seg.py:230-237
    "warmup_steps": 100,         # lr_warmup_steps, main_seg.py:238-242
    "grad_clip": 1.0,            # main_seg.py:161
    "seed": 123456,              # main_seg.py:40-46
    "focal_alpha": 0.25,
    "focal_gamma": 2.0,          # main_seg.py:143-149
    "augment": True,             # util.py:164-182
    "dropout": 0.25,             # pixel_classifier.py:28-38
}


def is_official_backbone(model) -> bool:
    """The official architecture (preset ``official``) or a folder in the release layout."""
    return model.preset == "official" or model.metadata.get("source") == "official-layout"


def is_official_backbone_folder(folder) -> bool:
    """`is_official_backbone` for a model folder, from its metadata alone (no weights are read)."""
    from ..models.bundle import locate_unet_folder, read_metadata

    unet_folder = locate_unet_folder(folder)
    metadata = read_metadata(unet_folder.parent if unet_folder.name == "unet" else unet_folder)
    if not metadata:
        return True  # no lctfound.json: the release layout, which `load_model` marks "official-layout"
    return metadata.get("preset") == "official" or metadata.get("source") == "official-layout"


def resolve_recipe(name: Optional[str], model) -> str:
    """``auto`` (or None) → ``official`` for the official backbone, ``fast`` otherwise."""
    name = (name or "auto").strip().lower()
    if name == "auto":
        return "official" if is_official_backbone(model) else "fast"
    if name not in RECIPES:
        raise LCTfoundError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPE_CHOICES)}")
    return name


def describe_recipe(name: str) -> str:
    """One line for status texts and summaries."""
    if name == "official":
        return ("official recipe (the paper's code: area resize, every pixel at the model's input size, "
                "batches of 4 images, 20 epochs, augmentation)")
    return "fast recipe (cached features on a grid of at most 128², class-balanced pixel subset)"


def segmentation_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
                      weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The original loss (main_seg.py:143-149): ``cross_entropy + mean(α (1 − exp(−ce))^γ · ce)``.

    ``weights`` (per pixel) turns both means into one weighted mean (the fast recipe's correction weights).
    """
    ce = F.cross_entropy(logits, targets, reduction="none")
    focal = alpha * (1 - torch.exp(-ce)) ** gamma * ce
    if weights is None:
        # Two means, as the original sums them: keeps the value identical to the last bit.
        return F.cross_entropy(logits, targets) + focal.mean()
    return ((ce + focal) * weights).sum() / weights.sum()


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """diffusers' ``get_cosine_schedule_with_warmup`` (the original's), stepped once per batch."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    return get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps,
                                           num_training_steps=max(1, total_steps))


def official_augmentation():
    """The original training transforms after resizing (util.py:164-182): flips along each axis and a
    rotation up to ±0.2 rad, each with probability 0.5, applied alike to the image and the label
    channels (MONAI, default bilinear interpolation for both, as the original)."""
    from monai.transforms import Compose, RandFlipd, RandRotated

    keys = ["image", "label"]
    return Compose([RandFlipd(keys, prob=0.5, spatial_axis=0), RandFlipd(keys, prob=0.5, spatial_axis=1),
                    RandRotated(keys, range_x=0.2, prob=0.5)])

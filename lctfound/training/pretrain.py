"""DDPM pretraining of LCTfound, as the official code did it, runnable on one CPU or many GPUs.

Recipe (reference §4–5): ε-prediction MSE with t ~ U{0..999}; AdamW (lr 1e-4, weight decay
0.01); cosine schedule with linear warm-up (10,000 steps in the official run, capped here at
10 % of a shorter run); gradient clipping 1.0; bf16 autocast on GPUs that support it; both
windows of every slice with their prompt; 5 % null prompts; the official augmentations.

Checkpoints, exact resume after a crash, the OOM fallback, logs and scale-out under
``accelerate launch`` come from the shared `TrainingLoop`; this module only says what
pretraining trains: `PretrainTask`.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LCTfoundError
from ..models.bundle import LCTfoundModel, load_model, new_model, save_model
from ..models.conditioning import LearnedConditionEncoder
from ..progress import Progress
from ..scheduler import make_ddpm_scheduler
from ..windows import WINDOWS
from .data import DEFAULT_EXCLUDE, AugmentConfig, CTSliceDataset, collate, data_fingerprint, index_sources
from .loop import LoopConfig, TrainingLoop, TrainingResult, TrainingTask, list_checkpoints  # noqa: F401

log = logging.getLogger(__name__)


@dataclass
class PretrainConfig(LoopConfig):
    """The loop's settings (with the official defaults: 6 epochs, 10k warm-up, seed 421) plus pretraining's."""

    data: str = ""
    epochs: float = 6.0
    warmup_steps: int = 10_000
    seed: int = 421
    preset: str = "cpu-tiny"
    init_model: Optional[str] = None
    resolution: int = 256
    patch_size: Optional[int] = None
    condition_dropout: float = 0.05
    windows: tuple[str, ...] = tuple(WINDOWS)
    augment: bool = True
    num_samples: int = 4
    sample_steps: int = 25
    cache_bytes: int = 1 << 30
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    name: Optional[str] = None
    description: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.data:
            raise LCTfoundError("pretraining needs a data folder")
        from ..validation import MAX_DIFFUSION_STEPS, MAX_IMAGE_SIZE, check_float, check_int

        self.windows = tuple(self.windows)
        self.exclude = tuple(self.exclude)
        self.resolution = check_int(self.resolution, "resolution", 16, MAX_IMAGE_SIZE, multiple_of=16)
        if self.patch_size is not None and (self.patch_size % 16 or not 16 <= self.patch_size <= self.resolution):
            raise LCTfoundError(f"patch size must be a multiple of 16 between 16 and the resolution, got {self.patch_size}")
        self.condition_dropout = check_float(self.condition_dropout, "condition-dropout", 0, 1)
        self.num_samples = check_int(self.num_samples, "num-samples", 0, 256)
        self.sample_steps = check_int(self.sample_steps, "sample-steps", 1, MAX_DIFFUSION_STEPS)

    # Settings that must not change when a run is resumed.
    RESUME_KEYS = ("preset", "init_model", "resolution", "patch_size", "batch_size", "windows", "seed", "augment",
                   "condition_dropout", "exclude")


class DiffusionModule(nn.Module):
    """U-Net + condition encoder as one module (so DDP synchronises both); ``forward`` is the ε-MSE."""

    def __init__(self, unet: nn.Module, encoder):
        super().__init__()
        self.unet = unet
        # A prompt cache (official BERT vectors) is fixed data, not a module: only the U-Net trains then.
        self.encoder = encoder if isinstance(encoder, nn.Module) else None
        self._fixed_encoder = None if isinstance(encoder, nn.Module) else encoder
        self.noise_scheduler = make_ddpm_scheduler()

    def encode(self, prompts: list[str]) -> torch.Tensor:
        return (self.encoder or self._fixed_encoder).encode(prompts)

    def forward(self, batch: dict) -> torch.Tensor:
        pixels, noise, timesteps = batch["pixel_values"], batch["noise"], batch["timesteps"]
        noisy = self.noise_scheduler.add_noise(pixels, noise, timesteps)
        context = self.encode(batch["prompt"]).to(noisy.device, noisy.dtype)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(prediction.float(), noise.float())

    def as_model(self, scheduler, metadata: dict) -> LCTfoundModel:
        return LCTfoundModel(self.unet, scheduler, self.encoder or self._fixed_encoder, metadata)


class PretrainTask(TrainingTask):
    """DDPM ε-prediction on (slice, window) items of a CT folder."""

    name = "pretrain"

    def __init__(self, config: PretrainConfig):
        self.config = config
        self.index = index_sources(config.data, config.exclude)
        self.fingerprint = data_fingerprint(self.index)
        self._base_metadata: dict[str, Any] = {}

    def dataset(self) -> CTSliceDataset:
        config = self.config
        return CTSliceDataset(self.index, config.resolution, config.windows,
                              AugmentConfig(enabled=config.augment, patch_size=config.patch_size),
                              config.condition_dropout, config.seed, config.cache_bytes)

    def collate(self, items: list[dict]) -> dict:
        return collate(items)

    def describe(self) -> str:
        return self.index.summary()

    def build_module(self) -> DiffusionModule:
        config = self.config
        if config.init_model:
            from ..models.registry import resolve_model

            model = load_model(resolve_model(config.init_model))
            model.unet.requires_grad_(True)
            if model.condition_encoder is None:
                raise LCTfoundError(f"{config.init_model}: has no condition encoder or prompt cache to train with")
            encoder = model.condition_encoder
            if isinstance(encoder, LearnedConditionEncoder):
                missing = [w for w in config.windows if w not in encoder.windows]
                if missing:
                    raise LCTfoundError(f"{config.init_model}: its condition encoder has no window {missing[0]!r}")
        else:
            # Condition dropout happens in the data (seeded per item), not in the encoder.
            # A new model's native size is the one it is trained at (whole slices at --resolution).
            model = new_model(config.preset, config.windows, condition_dropout=config.condition_dropout,
                              seed=config.seed, sample_size=config.resolution)
        self._scheduler = model.scheduler
        self._base_metadata = {k: v for k, v in model.metadata.items() if k not in ("files", "training")}
        return DiffusionModule(model.unet, model.condition_encoder)

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        pixels = batch["pixel_values"]
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        timesteps = torch.randint(0, 1000, (pixels.shape[0],), generator=generator).to(pixels.device)
        return {**batch, "noise": noise, "timesteps": timesteps}

    def metadata(self) -> dict[str, Any]:
        config = self.config
        return {
            **self._base_metadata,
            "name": config.name or Path(config.output).name,
            "description": config.description or f"LCTfound {config.preset} pretrained by DDPM",
            "windows": list(config.windows),
            "training": {
                "data_root": str(self.index.root), "data_fingerprint": self.fingerprint,
                "sources": len(self.index.sources), "slices": self.index.num_slices,
                "skipped_sources": len(self.index.skipped), "config": dataclasses.asdict(config)},
        }

    def resume_settings(self) -> dict[str, Any]:
        settings = {key: _normal(getattr(self.config, key)) for key in PretrainConfig.RESUME_KEYS}
        return {**settings, "data_fingerprint": self.fingerprint}

    def save_model(self, module: DiffusionModule, folder: Path, metadata: dict[str, Any]) -> None:
        save_model(module.as_model(self._scheduler, {}), folder, extra_metadata=metadata)

    def load_weights(self, module: DiffusionModule, folder: Path) -> None:
        saved = load_model(folder)
        module.unet.load_state_dict(saved.unet.state_dict())
        if module.encoder is not None:
            module.encoder.load_state_dict(saved.condition_encoder.state_dict())

    def after_checkpoint(self, module: DiffusionModule, step: int, output: Path) -> None:
        if self.config.num_samples < 1:
            return
        from ..pipelines.generation import GenerationPipeline, save_image_grid

        snapshot = module.as_model(self._scheduler, {})
        was_training = module.training
        module.eval()
        try:
            pipeline = GenerationPipeline(snapshot, "ddim")
            images, labels = [], []
            for window in self.config.windows:
                images.append(pipeline(window, num_images=self.config.num_samples, steps=self.config.sample_steps,
                                       seed=self.config.seed, size=self.config.resolution))
                labels += [window] * self.config.num_samples
            save_image_grid(np.concatenate(images), output / "samples" / f"step-{step:07d}.png",
                            columns=self.config.num_samples, labels=labels)
        finally:
            module.train(was_training)


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def pretrain(config: PretrainConfig, resume: bool = False, progress: Optional[Progress] = None,
             on_event: Optional[Callable[[dict], None]] = None) -> TrainingResult:
    """Run (or with ``resume`` continue) DDPM pretraining; returns the run's `TrainingResult`."""
    task = PretrainTask(config)
    loop = TrainingLoop(config, task, resume, progress, on_event)
    if loop.accelerator.is_main_process:
        log.info("data: %s", task.index.summary())
    result = loop.run()
    result.extra["skipped_sources"] = task.index.skipped
    return result

"""Virtual CT angiography: a conditional diffusion model from non-contrast to contrast-enhanced CT.

The paper fine-tuned LCTfound into a conditional DDPM that takes the non-contrast slice as the
condition (reference §10: no code was published). Here:

* Intensities: −200..200 HU (the mediastinal window W400/L0) mapped linearly to [−1, 1] with the
  fixed, invertible mapping of `lctfound.preprocessing` — the target (contrast-enhanced slice,
  grey replicated to the 3 input channels as in pretraining) and the condition alike.
* Conditioning: the non-contrast slice and its two neighbours (edge slices replicated) are
  concatenated to the noisy image as 3 extra input channels. That widens ``conv_in`` from 3 to 6
  input channels; the new channels' weights start at ZERO, so at initialisation the network
  computes exactly what the pretrained U-Net computes (the condition is ignored) and fine-tuning
  starts from the pretrained model. The widened layer is a part of the task model (``conv_in``);
  the stored backbone stays a standard LCTfound U-Net.
* Fine-tuning: ``full`` (every U-Net weight and the widened ``conv_in``) or ``adapter`` (frozen
  backbone; the widened ``conv_in`` and zero-initialised residual adapters after up blocks 1–4).
  Loss: ε-MSE at t ~ U{0..999} on the model's DDPM schedule, as in pretraining.
* Sampling: DDIM (diffusers `DDIMScheduler` on the model's schedule), ``eta`` 0 by default. Every
  slice starts from the same noise image drawn from ``seed`` (and, for eta > 0, draws the same
  step noise), so neighbouring slices are coherent and a slice does not depend on its batch.
  ``strength`` 1 (default) is the plain conditional DDPM: sampling starts from pure noise.
  ``strength`` s < 1 starts instead from the non-contrast slice noised to the DDIM step at
  fraction s of the schedule (SDEdit-style, as diffusers' img2img pipelines do) and runs only
  the remaining steps: non-contrast and contrast CT share all anatomy, so the low frequencies
  the first steps would have to invent are taken from the input.
* Resolution: the model works at the resolution it was trained at (default the backbone's sample
  size); slices are resized to it. The result on the input grid is the input plus the predicted
  enhancement: ``out = in + up(gen − clip(in)_low)``, i.e. the generated minus the non-contrast
  image (both in the window, at the working resolution), upsampled. The input's detail finer than
  the working resolution and its values outside −200..200 HU are thereby kept; inside the window
  at native resolution this is exactly the generated image.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, LCTfoundError
from .names import vcta_name as result_name  # noqa: F401 - re-exported
from .choices import VCTA_MODES
from ..progress import Progress, ensure_progress
from ..windows import get_window
from .cold_diffusion import (
    _check_slices,
    _ranges,
    _source_name,
    context_slices,
    hu_to_model,
    load_task_network,
    model_to_window_hu,
)

TASK = "vcta"
TASK_LABEL = "virtual CTA"
WINDOW = get_window("mediastinal")  # −200..200 HU, as in the paper
MODES = VCTA_MODES
CONDITION_SLICES = 3
DEFAULT_STEPS = 50


def widen_conv_in(conv: nn.Conv2d, extra_channels: int) -> nn.Conv2d:
    """A copy of ``conv`` with ``extra_channels`` more input channels whose weights are zero."""
    wide = nn.Conv2d(conv.in_channels + extra_channels, conv.out_channels, conv.kernel_size, conv.stride,
                     conv.padding, conv.dilation, conv.groups, conv.bias is not None)
    wide.to(conv.weight.device, conv.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :conv.in_channels] = conv.weight
        if conv.bias is not None:
            wide.bias.copy_(conv.bias)
    return wide


class VCTANetwork(nn.Module):
    """ε̂ = U-Net([x_t, condition], t) with ``conv_in`` widened by the condition channels.

    ``forward(x_t, t, condition)``: x_t (B, 3, S, S) and condition (B, 3, S, S) in [−1, 1],
    t (B,) DDPM timesteps → ε̂ (B, 3, S, S). In ``full`` mode the U-Net is a private copy of the
    given backbone (the caller's model is never changed) unless ``copy_backbone=False``.
    """

    def __init__(self, model, mode: str = "full", resolution: Optional[int] = None,
                 adapter_blocks: Sequence[int] = (1, 2, 3, 4), copy_backbone: Optional[bool] = None):
        super().__init__()
        from ..training.finetune import ResidualAdapter

        if mode not in MODES:
            raise LCTfoundError(f"unknown VCTA mode {mode!r}; choose one of: {', '.join(MODES)}")
        if model.unet.config.in_channels != 3:
            raise LCTfoundError(f"the backbone takes {model.unet.config.in_channels} input channels; "
                                "VCTA needs a 3-channel LCTfound U-Net")
        self.mode = mode
        self.resolution = int(resolution or model.sample_size)
        if self.resolution < 16 or self.resolution % 16:
            raise LCTfoundError(f"VCTA resolution must be a multiple of 16 (at least 16), got {self.resolution}")
        copy_backbone = mode == "full" if copy_backbone is None else copy_backbone
        self.unet = copy.deepcopy(model.unet) if copy_backbone else model.unet
        self.unet.requires_grad_(mode == "full")
        self.scheduler = model.scheduler
        self.register_buffer("prompt", model.condition(WINDOW).detach().float().cpu(), persistent=False)
        self.conv_in = widen_conv_in(self.unet.conv_in, CONDITION_SLICES)
        self.conv_in.requires_grad_(True)
        widths = list(reversed(self.unet.config.block_out_channels))
        self.adapter_blocks = tuple(int(b) for b in adapter_blocks) if mode == "adapter" else ()
        self.adapters = nn.ModuleDict({str(b): ResidualAdapter(widths[b]) for b in self.adapter_blocks})

    def train(self, mode: bool = True) -> "VCTANetwork":
        super().train(mode)
        if self.mode != "full":
            self.unet.eval()
        return self

    @contextlib.contextmanager
    def _hooks(self, condition: torch.Tensor):
        # The widened conv_in replaces the U-Net's own for one forward; hooks are removed after it,
        # so a shared (frozen) backbone keeps serving other tasks unchanged.
        handles = [self.unet.conv_in.register_forward_hook(
            lambda _module, inputs, _output: self.conv_in(torch.cat([inputs[0], condition], dim=1)))]
        for block in self.adapter_blocks:
            adapter = self.adapters[str(block)]
            handles.append(self.unet.up_blocks[block].register_forward_hook(
                lambda _module, _inputs, output, adapter=adapter: adapter(output)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.dtype
        prompt = self.prompt.to(x_t.device, dtype).expand(x_t.shape[0], -1, -1)
        with self._hooks(condition.to(dtype)):
            return self.unet(x_t.to(dtype), t, encoder_hidden_states=prompt).sample

    def trainable_parts(self) -> dict[str, nn.Module]:
        parts: dict[str, nn.Module] = {"conv_in": self.conv_in}
        if self.adapters:
            parts["adapters"] = self.adapters
        return parts

    def settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "resolution": self.resolution, "window": "mediastinal",
                "window_hu": [WINDOW.low, WINDOW.high], "condition_slices": CONDITION_SLICES,
                "adapter_blocks": list(self.adapter_blocks), "normalization": "fixed",
                "conv_in": "widened 3→6 input channels, new channels initialised to zero"}

    @classmethod
    def from_task_model(cls, task_model, base_model=None) -> "VCTANetwork":
        from ..models.task_models import require_parts

        settings = task_model.info.get("vcta")
        if not settings:
            raise CheckpointError(f"{task_model.folder}: has no VCTA settings")
        backbone = task_model.resolve_backbone(base_model)
        # A stored fine-tuned backbone was loaded for this model alone: no second copy is needed.
        network = cls(backbone, settings["mode"], settings["resolution"],
                      settings.get("adapter_blocks") or (1, 2, 3, 4), copy_backbone=False)
        require_parts(task_model, network.trainable_parts())
        for name, part in network.trainable_parts().items():
            try:
                part.load_state_dict(task_model.parts[name])
            except RuntimeError as error:
                raise CheckpointError(f"{task_model.folder}: its {name} weights do not fit this backbone "
                                      f"({str(error).splitlines()[0]})") from None
        return network.eval()


def resize_slices(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """(B, C, H, W) → (B, C, size) bilinear, antialiased when shrinking."""
    from ..preprocessing import resize_images

    return resize_images(x, size)


class VCTAPipeline:
    """``pipeline(non_contrast_hu, steps=50, seed=0)`` → virtual contrast-enhanced HU (a (K, H, W)
    array, one slice, or a `CTVolume`, which gives a NEW `CTVolume` with provenance)."""

    def __init__(self, network: VCTANetwork, batch_size: int = 4, provenance: Optional[dict[str, Any]] = None):
        if batch_size < 1:
            raise LCTfoundError("batch_size must be at least 1")
        self.network = network.eval()
        self.batch_size = batch_size
        self.model_provenance = dict(provenance or {})

    @property
    def device(self) -> torch.device:
        return self.network.conv_in.weight.device

    @classmethod
    def load(cls, model: str | Path, backbone: Optional[str | Path] = None, device: str = "auto",
             **options: Any) -> "VCTAPipeline":
        """The pipeline of a VCTA task model (folder or registered name)."""
        network, record = load_task_network(VCTANetwork, model, TASK, TASK_LABEL, backbone, device)
        return cls(network, provenance=record, **options)

    def make_scheduler(self, steps: int):
        from diffusers import DDIMScheduler

        scheduler = DDIMScheduler.from_config(self.network.scheduler.config)
        scheduler.set_timesteps(steps)
        return scheduler

    @staticmethod
    def sampled_steps(steps: int, strength: float) -> int:
        """DDIM steps actually run for ``steps`` and ``strength`` (at least one)."""
        return max(1, min(steps, int(round(steps * strength))))

    @torch.no_grad()
    def translate_batch(self, context_hu: np.ndarray, steps: int = DEFAULT_STEPS, seed: int = 0,
                        eta: float = 0.0, strength: float = 1.0, report=None) -> np.ndarray:
        """(B, 3, H, W) non-contrast HU stacks (previous, current, next) → (B, H, W) virtual CTA HU."""
        hu = torch.as_tensor(np.asarray(context_hu, dtype=np.float32))
        size = self.network.resolution
        condition_native = hu_to_model(hu, WINDOW)
        condition = resize_slices(condition_native, size).clamp(-1, 1).to(self.device)
        count = hu.shape[0]
        shape = (3, size, size)
        generators = [torch.Generator().manual_seed(int(seed)) for _ in range(count)]
        x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        scheduler = self.make_scheduler(steps)
        timesteps = scheduler.timesteps[steps - self.sampled_steps(steps, strength):]
        if strength < 1:
            start = condition[:, 1:2].expand(-1, 3, -1, -1)
            x = scheduler.add_noise(start, x, timesteps[:1].repeat(count))
        else:
            x = x * scheduler.init_noise_sigma
        for index, t in enumerate(timesteps):
            timestep = torch.full((count,), int(t), dtype=torch.long, device=self.device)
            eps = self.network(x, timestep, condition).float()
            if eta > 0:
                noise = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
                x = scheduler.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            else:
                x = scheduler.step(eps, t, x, eta=0.0).prev_sample
            if report is not None:
                report(index + 1)
        generated = model_to_window_hu(x.float().mean(dim=1, keepdim=True).cpu(), WINDOW)
        non_contrast = model_to_window_hu(condition[:, 1:2].float().cpu(), WINDOW)
        enhancement = resize_slices(generated - non_contrast, tuple(hu.shape[-2:]))
        return (hu[:, 1] + enhancement[:, 0]).numpy()

    def __call__(self, non_contrast, steps: int = DEFAULT_STEPS, seed: int = 0, eta: float = 0.0,
                 strength: float = 1.0, slices: Optional[Sequence[int]] = None, progress: Optional[Progress] = None):
        from ..io.volume import CTVolume

        if isinstance(non_contrast, CTVolume):
            return self.translate_volume(non_contrast, steps, seed, eta, strength, slices, progress)
        array = np.asarray(non_contrast)
        if array.ndim == 2:
            return self.translate_array(array[None], steps, seed, eta, strength, None, progress)[0]
        return self.translate_array(array, steps, seed, eta, strength, slices, progress)

    def translate_array(self, non_contrast_hu: np.ndarray, steps: int = DEFAULT_STEPS, seed: int = 0,
                        eta: float = 0.0, strength: float = 1.0, slices: Optional[Sequence[int]] = None,
                        progress: Optional[Progress] = None) -> np.ndarray:
        """(K, H, W) HU → float32 (K, H, W) HU; slices outside ``slices`` (default: all) are copied unchanged."""
        array = np.asarray(non_contrast_hu)
        if array.ndim != 3:
            raise LCTfoundError(f"expected a (slices, rows, columns) HU array, got shape {array.shape}")
        if steps < 1:
            raise LCTfoundError(f"steps must be at least 1, got {steps}")
        if not 0 <= eta <= 1:
            raise LCTfoundError(f"eta must be in [0, 1], got {eta}")
        if not 0 < strength <= 1:
            raise LCTfoundError(f"strength must be in (0, 1], got {strength}")
        indices = _check_slices(slices, array.shape[0])
        progress = ensure_progress(progress)
        output = array.astype(np.float32, copy=True)
        steps_run = self.sampled_steps(steps, strength)
        total = len(indices) * steps_run
        progress.update(0, total, "starting")
        for first in range(0, len(indices), self.batch_size):
            batch = indices[first:first + self.batch_size]

            def report(step: int, first: int = first, batch: list = batch) -> None:
                progress.check_cancelled()
                progress.update(first * steps_run + step * len(batch), total, f"slice {batch[-1]}")

            progress.check_cancelled()
            stacks = np.stack([context_slices(array, k) for k in batch]).astype(np.float32)
            output[batch] = self.translate_batch(stacks, steps, seed, eta, strength, report)
        return output

    def translate_volume(self, volume, steps: int = DEFAULT_STEPS, seed: int = 0, eta: float = 0.0,
                         strength: float = 1.0, slices: Optional[Sequence[int]] = None,
                         progress: Optional[Progress] = None):
        """A NEW `CTVolume` on the input grid (float32 HU) whose metadata is its provenance."""
        from .. import __version__
        from ..io.volume import CTVolume

        start = time.perf_counter()
        array = self.translate_array(volume.array, steps, seed, eta, strength, slices, progress)
        indices = _check_slices(slices, volume.shape[0])
        source_name = _source_name(volume)
        record = {
            "name": result_name(source_name, steps, seed, strength), "task": TASK, "method": "conditional-ddim",
            "steps": int(steps), "seed": int(seed), "eta": float(eta), "strength": float(strength), "sampler": "ddim",
            "window": "mediastinal", "window_hu": "-200..200", "resolution": self.network.resolution,
            "mode": self.network.mode, "source": volume.metadata.get("source", source_name),
            "slices": "all" if len(indices) == volume.shape[0] else _ranges(indices),
            "seconds": round(time.perf_counter() - start, 2), **self.model_provenance,
            "lctfound_version": __version__,
        }
        return CTVolume(array, volume.spacing, volume.origin, volume.direction.copy(), record)


def check_pair(non_contrast, contrast, name: str = "contrast-enhanced volume") -> None:
    """Refuse a (non-contrast, contrast-enhanced) pair that does not share one voxel grid."""
    from ..io.volume import check_same_grid

    check_same_grid(contrast, non_contrast, name)


__all__ = ["VCTANetwork", "VCTAPipeline", "TASK", "WINDOW", "widen_conv_in", "check_pair", "result_name"]

"""Training tasks for image enhancement on the shared `TrainingLoop`: cold-diffusion low-dose
enhancement (task ``low-dose-enhancement``) and virtual CT angiography (task ``vcta``).

Both train from paired volumes on one voxel grid (low/full dose; non-contrast/contrast-enhanced),
one item per slice with its two neighbours as context. When only full-dose scans exist, the
low-dose partner is simulated in the projection domain by `lctfound.pipelines.low_dose`
(Poisson counts through a real projector), never by image-domain Gaussian noise.

Random draws — patch positions and flips per (seed, epoch, item); cold-diffusion levels and
DDPM noise/timesteps per (seed, step) — follow the loop's rules, so a resumed run ends with the
same weights as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import InputError, LCTfoundError
from ..pipelines.choices import DEFAULT_MIN_SNR_GAMMA, LOSSES  # noqa: F401 - re-exported
from ..models.bundle import LCTfoundModel, load_model
from ..models.task_models import backbone_reference, load_task_model, save_task_model
from ..pipelines.cold_diffusion import (
    DEFAULT_STEPS,
    DEFAULT_TIMESTEP_MAX,
    DEFAULT_WINDOW,
    ColdDiffusionNetwork,
    context_slices,
    hu_to_model,
)
from ..pipelines.cold_diffusion import TASK as LOW_DOSE_TASK
from ..pipelines.vcta import MODES as VCTA_MODES
from ..pipelines.vcta import TASK as VCTA_TASK
from ..pipelines.vcta import WINDOW as VCTA_WINDOW
from ..pipelines.vcta import VCTANetwork, resize_slices
from ..progress import Progress, ensure_progress
from ..windows import get_window
from .finetune import seeded_flips
from .loop import TrainingTask
from ..compat import strict_zip

#: Learning-rate factor of VCTA's widened input layer (its condition channels start at zero).
CONV_IN_LR_SCALE = 10.0
#: Patch centres are drawn among full-dose pixels above this (inside the body, lungs included).
BODY_HU = -900.0


# --------------------------------------------------------------------------------------------
# Paired volumes
# --------------------------------------------------------------------------------------------

class PairedVolumes:
    """Paired (source, target) (K, H, W) HU arrays; item i is one slice of one pair."""

    def __init__(self, sources: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                 names: Optional[Sequence[str]] = None, kinds: tuple[str, str] = ("source", "target")):
        if len(sources) != len(targets):
            raise LCTfoundError(f"{len(sources)} {kinds[0]} volume(s) for {len(targets)} {kinds[1]} volume(s)")
        if not sources:
            raise LCTfoundError(f"no {kinds[0]}/{kinds[1]} pairs to train on")
        self.names = list(names) if names is not None else [f"pair {i}" for i in range(len(sources))]
        for name, source, target in strict_zip(self.names, sources, targets):
            if np.ndim(source) != 3 or np.shape(source) != np.shape(target):
                raise InputError(f"{name}: the {kinds[0]} ({'×'.join(map(str, np.shape(source)))}) and {kinds[1]} "
                                 f"({'×'.join(map(str, np.shape(target)))}) volumes differ in size")
        self.sources, self.targets = list(sources), list(targets)
        self.index = [(v, k) for v, source in enumerate(self.sources) for k in range(source.shape[0])]

    def __len__(self) -> int:
        return len(self.index)

    def items_per_source(self) -> list[int]:
        return [source.shape[0] for source in self.sources]

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for source, target in strict_zip(self.sources, self.targets):
            for array in (source, target):
                digest.update(str((array.shape, str(array.dtype))).encode())
                digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()


def read_paired_volumes(pairs: Sequence[tuple[str | Path, str | Path]], kinds: tuple[str, str]):
    """Read (source, target) volume files; both must lie on one voxel grid. → (sources, targets, names)."""
    from ..io.volume import check_same_grid, read_volume, volume_stem

    if not pairs:
        raise LCTfoundError(f"no {kinds[0]}/{kinds[1]} pairs to train on")
    sources, targets, names = [], [], []
    for source_path, target_path in pairs:
        source = read_volume(source_path)
        target = read_volume(target_path)
        check_same_grid(target, source, f"{target_path} ({kinds[1]})")
        sources.append(source.array)
        targets.append(target.array)
        names.append(volume_stem(source_path))
    return sources, targets, names


def match_folders(first: str | Path, second: str | Path, kinds: tuple[str, str]) -> list[tuple[Path, Path]]:
    """Pair the volumes of two folders by case name (file name without its volume suffix)."""
    from ..io.volume import find_volumes, volume_stem

    left = {volume_stem(p): p for p in find_volumes(first)}
    right = {volume_stem(p): p for p in find_volumes(second)}
    unmatched = sorted(set(left) ^ set(right))
    if unmatched:
        side = kinds[1] if unmatched[0] in left else kinds[0]
        raise InputError(f"case {unmatched[0]!r} has no {side} partner (folders {first} and {second} are paired by "
                         "file name)")
    return [(left[name], right[name]) for name in sorted(left)]


def simulated_pairs(full_dose: Sequence[str | Path], dose_fraction: float, seed: int = 0,
                    progress: Optional[Progress] = None, **simulation: Any):
    """(low-dose, full-dose, names) with the low-dose partners simulated at ``dose_fraction`` in the
    projection domain (`lctfound.pipelines.low_dose.simulate_low_dose`; options passed through)."""
    from ..io.volume import read_volume, volume_stem
    from ..pipelines.low_dose import check_dose_fraction, simulate_low_dose

    check_dose_fraction(dose_fraction)
    if not full_dose:
        raise LCTfoundError("no full-dose volumes to simulate low-dose partners for")
    progress = ensure_progress(progress)
    volumes = [read_volume(path) for path in full_dose]  # all read first: progress counts every slice
    total = sum(volume.shape[0] for volume in volumes)
    lows, fulls, names = [], [], []
    done_before = 0
    for number, (path, volume) in enumerate(zip(full_dose, volumes)):
        name = volume_stem(path)
        progress.update(done_before, total, f"simulating {name} at {dose_fraction:g} dose")
        low = simulate_low_dose(volume, dose_fraction, seed=seed + number,
                                progress=_SliceProgress(progress, done_before, total, name), **simulation)
        done_before += volume.shape[0]
        lows.append(low.array)
        fulls.append(volume.array)
        names.append(name)
    progress.update(total, total, "simulated")
    return lows, fulls, names


class _SliceProgress(Progress):
    """A volume's per-slice counts as slices of all volumes (one bar over every slice); cancelling forwards."""

    def __init__(self, outer: Progress, done_before: int, total: int, name: str):
        super().__init__(cancel_token=outer.cancel_token)
        self.add_callback(lambda done, _total, message: outer.update(
            done_before + done, total, f"simulating {name}: slice {done}/{_total}"))


def _data_description(pairs: PairedVolumes, kinds: tuple[str, str]) -> str:
    return f"{len(pairs)} slices of {len(pairs.sources)} {kinds[0]}/{kinds[1]} pair(s)"


def _stored_backbone(unet, backbone: LCTfoundModel) -> LCTfoundModel:
    return LCTfoundModel(unet, backbone.scheduler, backbone.condition_encoder,
                         {k: v for k, v in backbone.metadata.items() if k != "files"})


# --------------------------------------------------------------------------------------------
# Low-dose enhancement (cold diffusion)
# --------------------------------------------------------------------------------------------

class LowDosePatches(torch.utils.data.Dataset):
    """Items: ``low`` (3, P, P) = previous/current/next low-dose slice and ``full`` (1, P, P) = the
    full-dose slice, in [−1, 1] under the fixed window mapping, cut at native resolution around a
    body pixel drawn per (seed, epoch, item), with seeded flips."""

    def __init__(self, pairs: PairedVolumes, window, patch_size: int, seed: int = 0, flips: bool = True):
        self.pairs, self.window, self.patch_size = pairs, get_window(window), int(patch_size)
        self.seed, self.flips, self.epoch = seed, flips, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def items_per_source(self) -> list[int]:
        return self.pairs.items_per_source()

    def __getitem__(self, item: int) -> dict:
        volume, k = self.pairs.index[item]
        low = context_slices(self.pairs.sources[volume], k).astype(np.float32)
        full = np.asarray(self.pairs.targets[volume][k], dtype=np.float32)[None]
        size = self.patch_size
        short = [max(0, size - n) for n in full.shape[-2:]]
        if any(short):
            pad = ((0, 0), (short[0] // 2, short[0] - short[0] // 2), (short[1] // 2, short[1] - short[1] // 2))
            low, full = np.pad(low, pad, mode="edge"), np.pad(full, pad, mode="edge")
        rng = np.random.default_rng([self.seed, self.epoch, item])
        height, width = full.shape[-2:]
        body = np.flatnonzero(full[0] > BODY_HU)
        centre = body[rng.integers(len(body))] if len(body) else rng.integers(height * width)
        row = int(np.clip(centre // width - size // 2, 0, height - size))
        column = int(np.clip(centre % width - size // 2, 0, width - size))
        window = (slice(None), slice(row, row + size), slice(column, column + size))
        x_low, x_full = hu_to_model(low[window], self.window), hu_to_model(full[window], self.window)
        if self.flips:
            x_low, x_full = seeded_flips((self.seed, self.epoch, item), x_low, x_full)
        return {"low": x_low.contiguous(), "full": x_full.contiguous(), "index": item}


def _pixel_loss(kind: str, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item loss (B,)."""
    error = prediction.float() - target.float()
    values = error.square() if kind == "mse" else error.abs()
    return values.flatten(1).mean(dim=1)


class ColdDiffusionLoss(nn.Module):
    """CoreDiff's two-stage objective on x̂0 (reference §7), without its target leak.

    Stage I: x_t = D(x0, t) for t ~ U{1..T}; x̂0⁽¹⁾ = f(x_t, t) without modulation. Stage II (t ≥ 2):
    the state the sampler would reach from that estimate, x'_{t−1} = D(x̂0⁽¹⁾, t−1), is denoised with
    the error modulation reading (x̂0⁽¹⁾, x_LD): x̂0⁽²⁾ = f(x'_{t−1}, t−1 | x̂0⁽¹⁾, x_LD).
    Loss = ½·L(x̂0⁽¹⁾, x0) + ½·L(x̂0⁽²⁾, x0) (only stage I where t = 1); L is MSE or L1.
    CoreDiff fed the ground truth to the modulation in stage I; here modulation only ever sees
    estimates, as in sampling.
    """

    def __init__(self, network: ColdDiffusionNetwork, loss: str = "mse"):
        super().__init__()
        if loss not in LOSSES:
            raise LCTfoundError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        self.network, self.kind = network, loss

    def forward(self, batch: dict) -> torch.Tensor:
        low, full, t = batch["low"], batch["full"], batch["t"]
        schedule = self.network.schedule
        x_end = low[:, 1:2]
        state = schedule.degrade(full, x_end, t)
        first = self.network(torch.cat([low[:, :1], state, low[:, 2:]], dim=1), t)
        losses = _pixel_loss(self.kind, first, full)
        later = t >= 2
        if not bool(later.any()):
            # Keep the adjust nets in the graph (zero gradient): distributed training requires every
            # trainable parameter to take part in each backward pass.
            return losses.mean() + 0.0 * sum(p.sum() for p in self.network.adjust.parameters())
        rows = later.nonzero().flatten()
        t2 = t[rows] - 1
        estimate, end = first[rows], x_end[rows]
        state2 = schedule.degrade(estimate, end, t2)
        second = self.network(torch.cat([low[rows, :1], state2, low[rows, 2:]], dim=1), t2,
                              torch.cat([estimate, end], dim=1))
        losses = losses.clone()
        losses[rows] = 0.5 * losses[rows] + 0.5 * _pixel_loss(self.kind, second, full[rows])
        return losses.mean()


class LowDoseEnhancementTask(TrainingTask):
    """Train the cold-diffusion enhancer (adjust nets + output head; backbone frozen) on paired slices."""

    name = LOW_DOSE_TASK

    def __init__(self, backbone: LCTfoundModel, low_dose: Sequence[np.ndarray], full_dose: Sequence[np.ndarray],
                 names: Optional[Sequence[str]] = None, window: str = DEFAULT_WINDOW,
                 patch_size: Optional[int] = None, steps: int = DEFAULT_STEPS,
                 timestep_max: int = DEFAULT_TIMESTEP_MAX, loss: str = "mse", seed: int = 0,
                 name: Optional[str] = None, description: str = "", data: Optional[dict[str, Any]] = None):
        if loss not in LOSSES:
            raise LCTfoundError(f"unknown loss {loss!r}; choose one of: {', '.join(LOSSES)}")
        self.backbone, self.window, self.loss = backbone, get_window(window), loss
        self.steps, self.timestep_max = int(steps), int(timestep_max)
        self.patch_size = int(patch_size or backbone.sample_size)
        # Built once here so bad settings fail before the loop starts.
        ColdDiffusionNetwork(backbone, self.window, self.steps, self.timestep_max, self.patch_size)
        self.pairs = PairedVolumes(low_dose, full_dose, names, ("low-dose", "full-dose"))
        self.data = LowDosePatches(self.pairs, self.window, self.patch_size, seed)
        self.model_name, self.description, self.data_info = name, description, dict(data or {})
        self.reference = backbone_reference(backbone)
        self._fingerprint: Optional[str] = None

    def dataset(self) -> LowDosePatches:
        return self.data

    def describe(self) -> str:
        return _data_description(self.pairs, ("low-dose", "full-dose")) + f"; {self.patch_size}² patches"

    def build_module(self) -> ColdDiffusionLoss:
        network = ColdDiffusionNetwork(self.backbone, self.window, self.steps, self.timestep_max, self.patch_size)
        return ColdDiffusionLoss(network, self.loss)

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        count = batch["low"].shape[0]
        t = torch.randint(1, self.steps + 1, (count,), generator=generator)
        return {**batch, "t": t.to(batch["low"].device)}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.pairs.fingerprint()
        return self._fingerprint

    def resume_settings(self) -> dict[str, Any]:
        return {"window": [self.window.width, self.window.level], "steps": self.steps,
                "timestep_max": self.timestep_max, "patch_size": self.patch_size, "loss": self.loss,
                "backbone_sha256": self.reference.get("unet_sha256"), "items": len(self.pairs),
                "data_fingerprint": self.fingerprint()}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.model_name, "description": self.description,
                "data": {**self.data_info, "pairs": self.pairs.names, "slices": len(self.pairs),
                         "fingerprint": self.fingerprint()}}

    def save_model(self, module: ColdDiffusionLoss, folder: Path, metadata: dict[str, Any]) -> None:
        network = module.network
        save_task_model(folder, LOW_DOSE_TASK, self.reference, network.trainable_parts(),
                        {**metadata, "mode": "frozen backbone + error modulation", "loss": self.loss,
                         "cold_diffusion": network.settings(),
                         "preprocessing": {"window": network.settings()["window"], "normalization": "fixed",
                                           "context_slices": 3}})

    def load_weights(self, module: ColdDiffusionLoss, folder: Path) -> None:
        task_model = load_task_model(folder, LOW_DOSE_TASK)
        for name, part in module.network.trainable_parts().items():
            part.load_state_dict(task_model.parts[name])


# --------------------------------------------------------------------------------------------
# Virtual CTA (conditional DDPM)
# --------------------------------------------------------------------------------------------

class VCTASlices(torch.utils.data.Dataset):
    """Items: ``condition`` (3, R, R) = previous/current/next non-contrast slice and ``target``
    (3, R, R) = the contrast-enhanced slice (grey in 3 channels), −200..200 HU → [−1, 1], resized
    to the working resolution R, with seeded flips."""

    def __init__(self, pairs: PairedVolumes, resolution: int, seed: int = 0, flips: bool = True):
        self.pairs, self.resolution, self.seed, self.flips, self.epoch = pairs, int(resolution), seed, flips, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.pairs)

    def items_per_source(self) -> list[int]:
        return self.pairs.items_per_source()

    def __getitem__(self, item: int) -> dict:
        volume, k = self.pairs.index[item]
        condition = hu_to_model(context_slices(self.pairs.sources[volume], k).astype(np.float32), VCTA_WINDOW)
        target = hu_to_model(np.asarray(self.pairs.targets[volume][k], dtype=np.float32), VCTA_WINDOW)
        condition = resize_slices(condition[None], self.resolution)[0].clamp(-1, 1)
        target = resize_slices(target[None, None], self.resolution)[0].clamp(-1, 1).expand(3, -1, -1)
        if self.flips:
            condition, target = seeded_flips((self.seed, self.epoch, item), condition, target)
        return {"condition": condition.contiguous(), "target": target.contiguous(), "index": item}


class VCTALoss(nn.Module):
    """ε-MSE of the conditional U-Net at the batch's DDPM timesteps, plain (as in pretraining) or
    with min-SNR-γ weights (Hang et al. 2023; diffusers ``compute_snr``): each item's ε error is
    weighted by min(SNR_t, γ)/SNR_t, which lowers the weight of nearly clean timesteps that the
    pretrained model already denoises and leaves the weight of the noisy ones — where only the
    condition tells the model what to draw — at 1."""

    def __init__(self, network: VCTANetwork, min_snr_gamma: Optional[float] = None):
        super().__init__()
        self.network, self.min_snr_gamma = network, min_snr_gamma

    def forward(self, batch: dict) -> torch.Tensor:
        target, noise, t = batch["target"], batch["noise"], batch["timesteps"]
        noisy = self.network.scheduler.add_noise(target, noise, t)
        errors = (self.network(noisy, t, batch["condition"]).float() - noise.float()).square().flatten(1).mean(1)
        if self.min_snr_gamma is None:
            return errors.mean()
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.network.scheduler, t).to(errors.device)
        return (errors * snr.clamp(max=self.min_snr_gamma) / snr).mean()


class VCTATask(TrainingTask):
    """Fine-tune LCTfound into a non-contrast → contrast-enhanced conditional diffusion model."""

    name = VCTA_TASK

    def __init__(self, backbone: LCTfoundModel, non_contrast: Sequence[np.ndarray], contrast: Sequence[np.ndarray],
                 names: Optional[Sequence[str]] = None, mode: str = "full", resolution: Optional[int] = None,
                 min_snr_gamma: Optional[float] = DEFAULT_MIN_SNR_GAMMA, seed: int = 0, name: Optional[str] = None,
                 description: str = "", data: Optional[dict[str, Any]] = None):
        if min_snr_gamma is not None and not min_snr_gamma > 0:
            raise LCTfoundError(f"the min-SNR gamma must be positive, got {min_snr_gamma}")
        self.min_snr_gamma = None if min_snr_gamma is None else float(min_snr_gamma)
        if mode not in VCTA_MODES:
            raise LCTfoundError(f"unknown VCTA mode {mode!r}; choose one of: {', '.join(VCTA_MODES)}")
        self.backbone, self.mode = backbone, mode
        self.resolution = int(resolution or backbone.sample_size)
        if self.resolution < 16 or self.resolution % 16:
            raise LCTfoundError(f"VCTA resolution must be a multiple of 16 (at least 16), got {self.resolution}")
        self.pairs = PairedVolumes(non_contrast, contrast, names, ("non-contrast", "contrast-enhanced"))
        self.data = VCTASlices(self.pairs, self.resolution, seed)
        self.model_name, self.description, self.data_info = name, description, dict(data or {})
        self.reference = backbone_reference(backbone)
        self._fingerprint: Optional[str] = None

    def dataset(self) -> VCTASlices:
        return self.data

    def describe(self) -> str:
        return (_data_description(self.pairs, ("non-contrast", "contrast-enhanced"))
                + f"; {self.resolution}² working resolution, {self.mode} fine-tuning")

    def build_module(self) -> VCTALoss:
        return VCTALoss(VCTANetwork(self.backbone, self.mode, self.resolution), self.min_snr_gamma)

    def parameter_groups(self, module: VCTALoss, learning_rate: float) -> list[dict]:
        # The condition channels start at zero: the widened input layer learns faster than the backbone.
        conv_in = list(module.network.conv_in.parameters())
        chosen = {id(p) for p in conv_in}
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in chosen]
        return [{"params": rest, "lr": learning_rate},
                {"params": conv_in, "lr": learning_rate * CONV_IN_LR_SCALE}]

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        target = batch["target"]
        steps = self.backbone.scheduler.config.num_train_timesteps
        noise = torch.randn(target.shape, generator=generator).to(target.device)
        t = torch.randint(0, steps, (target.shape[0],), generator=generator).to(target.device)
        return {**batch, "noise": noise, "timesteps": t}

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = self.pairs.fingerprint()
        return self._fingerprint

    def resume_settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "resolution": self.resolution, "min_snr_gamma": self.min_snr_gamma,
                "backbone_sha256": self.reference.get("unet_sha256"),
                "items": len(self.pairs), "data_fingerprint": self.fingerprint()}

    def metadata(self) -> dict[str, Any]:
        return {"name": self.model_name, "description": self.description,
                "data": {**self.data_info, "pairs": self.pairs.names, "slices": len(self.pairs),
                         "fingerprint": self.fingerprint()}}

    def loss_name(self) -> str:
        return "eps-mse" if self.min_snr_gamma is None else f"eps-mse, min-SNR-{self.min_snr_gamma:g} weights"

    def save_model(self, module: VCTALoss, folder: Path, metadata: dict[str, Any]) -> None:
        network = module.network
        stored = _stored_backbone(network.unet, self.backbone) if network.mode == "full" else None
        save_task_model(folder, VCTA_TASK, self.reference, network.trainable_parts(),
                        {**metadata, "vcta": {**network.settings(), "loss": self.loss_name()},
                         "preprocessing": {"window": "mediastinal", "window_hu": [VCTA_WINDOW.low, VCTA_WINDOW.high],
                                           "normalization": "fixed", "resolution": network.resolution}},
                        backbone_model=stored)

    def load_weights(self, module: VCTALoss, folder: Path) -> None:
        task_model = load_task_model(folder, VCTA_TASK)
        for name, part in module.network.trainable_parts().items():
            part.load_state_dict(task_model.parts[name])
        stored = task_model.backbone_folder()
        if stored is not None:
            module.network.unet.load_state_dict(load_model(stored).unet.state_dict())

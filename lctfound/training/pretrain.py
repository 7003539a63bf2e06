"""DDPM pretraining of LCTfound, as the official code did it, runnable on one CPU or many GPUs.

Recipe (reference §4–5): ε-prediction MSE with t ~ U{0..999}; AdamW (lr 1e-4, weight decay
0.01); cosine schedule with linear warm-up (10,000 steps in the official run, capped here at
10 % of a shorter run); gradient clipping 1.0; bf16 autocast on GPUs that support it; both
windows of every slice with their prompt; 5 % null prompts; the official augmentations.

Robustness: checkpoints every N steps as complete model folders, published atomically, so a
crash, ``kill -9`` or a full disk never destroys the previous one; ``resume=True`` continues
from the newest checkpoint with the same step count and the same data order (items, noise
and timesteps are seeded by (seed, epoch, item) and (seed, step, rank)). A CUDA
out-of-memory error halves the micro-batch and accumulates gradients instead, and says so.

Scale-out: the same function runs under ``accelerate launch`` on several processes (DDP);
each process reads a disjoint shard of every epoch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import atomic_directory
from ..errors import CheckpointError, LCTfoundError
from ..models.bundle import LCTfoundModel, load_model, new_model, save_model
from ..models.conditioning import LearnedConditionEncoder
from ..progress import Progress, ensure_progress
from ..windows import WINDOWS
from .data import DEFAULT_EXCLUDE, AugmentConfig, BlockShuffleSampler, CTSliceDataset, collate, data_fingerprint, index_sources
from .logs import MetricsLog, plot_loss_curve
from .state import load_state_dict, save_state_dict

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


@dataclass
class PretrainConfig:
    data: str
    output: str
    preset: str = "cpu-tiny"
    init_model: Optional[str] = None
    resolution: int = 256
    patch_size: Optional[int] = None
    batch_size: int = 24
    micro_batch_size: Optional[int] = None
    max_steps: Optional[int] = None
    epochs: float = 6.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 10_000
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    condition_dropout: float = 0.05
    windows: tuple[str, ...] = tuple(WINDOWS)
    augment: bool = True
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    ema_decay: Optional[float] = None
    num_samples: int = 4
    sample_steps: int = 25
    seed: int = 421
    num_workers: int = 0
    log_every: int = 10
    cache_bytes: int = 1 << 30
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    name: Optional[str] = None
    description: str = ""

    def __post_init__(self) -> None:
        self.windows = tuple(self.windows)
        self.exclude = tuple(self.exclude)
        for key in ("batch_size", "checkpoint_every", "log_every", "resolution"):
            if getattr(self, key) < 1:
                raise LCTfoundError(f"{key.replace('_', '-')} must be at least 1")
        if self.resolution % 16:
            raise LCTfoundError(f"resolution must be a multiple of 16, got {self.resolution}")
        if self.patch_size is not None and (self.patch_size % 16 or not 16 <= self.patch_size <= self.resolution):
            raise LCTfoundError(f"patch size must be a multiple of 16 between 16 and the resolution, got {self.patch_size}")
        if self.micro_batch_size is not None and not 1 <= self.micro_batch_size <= self.batch_size:
            raise LCTfoundError("micro-batch-size must lie between 1 and batch-size")
        if self.max_steps is not None and self.max_steps < 1:
            raise LCTfoundError("max-steps must be at least 1")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise LCTfoundError(f"mixed precision {self.mixed_precision!r}: choose auto, no, bf16 or fp16")

    # Settings that must not change when a run is resumed.
    RESUME_KEYS = ("preset", "init_model", "resolution", "patch_size", "batch_size", "windows", "seed", "augment",
                   "condition_dropout", "exclude")


@dataclass
class PretrainResult:
    output: Path
    model_folder: Path
    steps: int
    final_loss: float
    resumed_from: Optional[int] = None
    skipped_sources: list = field(default_factory=list)
    is_main_process: bool = True


class DiffusionModule(nn.Module):
    """U-Net + condition encoder as one module, so DDP synchronises both."""

    def __init__(self, unet: nn.Module, encoder: Optional[nn.Module]):
        super().__init__()
        self.unet = unet
        self.encoder = encoder

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        context = self.encoder.encode(prompts).to(noisy.device, noisy.dtype)
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample


def _rng_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    folder = output / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(CHECKPOINT_PREFIX) and (path / "training" / "trainer_state.json").is_file():
                try:
                    found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
                except ValueError:
                    continue
    return sorted(found)


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class Pretrainer:
    """One pretraining run; see the module docstring. ``run()`` returns a `PretrainResult`."""

    def __init__(self, config: PretrainConfig, resume: bool = False, progress: Optional[Progress] = None,
                 accelerator=None, on_event: Optional[Callable[[dict], None]] = None):
        from accelerate import Accelerator

        self.config = config
        self.resume = resume
        self.progress = ensure_progress(progress)
        self.on_event = on_event or (lambda event: None)
        self.output = Path(config.output).expanduser()
        self.accelerator = accelerator or Accelerator(mixed_precision=_mixed_precision(config.mixed_precision),
                                                      cpu=not torch.cuda.is_available())
        self.micro_batch = config.micro_batch_size or config.batch_size

    # ------------------------------------------------------------------ set-up
    def _prepare_output(self) -> Optional[tuple[int, Path]]:
        checkpoints = list_checkpoints(self.output)
        if self.resume:
            if not checkpoints:
                raise LCTfoundError(f"{self.output}: nothing to resume (no complete checkpoint in {self.output / 'checkpoints'})")
            return checkpoints[-1]
        if self.output.exists() and any(self.output.iterdir()):
            raise LCTfoundError(f"{self.output}: already holds a run; pass --resume to continue it or choose a new folder")
        return None

    def _build_model(self) -> LCTfoundModel:
        config = self.config
        if config.init_model:
            from ..models.registry import resolve_model

            model = load_model(resolve_model(config.init_model))
            model.unet.requires_grad_(True)
            if model.condition_encoder is None:
                raise LCTfoundError(f"{config.init_model}: has no condition encoder or prompt cache to train with")
            missing = [w for w in config.windows if isinstance(model.condition_encoder, LearnedConditionEncoder)
                       and w not in model.condition_encoder.windows]
            if missing:
                raise LCTfoundError(f"{config.init_model}: its condition encoder has no window {missing[0]!r}")
        else:
            # Condition dropout happens in the data (seeded per item), not in the encoder.
            model = new_model(config.preset, config.windows, condition_dropout=config.condition_dropout,
                              seed=config.seed)
        model.unet.train()
        if isinstance(model.condition_encoder, nn.Module):
            model.condition_encoder.train()
        return model

    # ------------------------------------------------------------------ the run
    def run(self) -> PretrainResult:
        config, accelerator = self.config, self.accelerator
        resume_from = self._prepare_output() if accelerator.is_main_process else None
        resume_from = self._broadcast(resume_from)
        index = index_sources(config.data, config.exclude)
        fingerprint = data_fingerprint(index)
        dataset = CTSliceDataset(index, config.resolution, config.windows, AugmentConfig(enabled=config.augment, patch_size=config.patch_size),
                                 config.condition_dropout, config.seed, config.cache_bytes)
        sampler = BlockShuffleSampler(dataset.items_per_source(), config.seed, accelerator.process_index,
                                      accelerator.num_processes)
        steps_per_epoch = sampler.per_rank // config.batch_size
        if steps_per_epoch == 0:
            raise LCTfoundError(f"batch size {config.batch_size} exceeds the {sampler.per_rank} items each process gets")
        total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        warmup = min(config.warmup_steps, max(1, total_steps // 10))
        self._emit("start", total_steps=total_steps, steps_per_epoch=steps_per_epoch, data=index.summary(),
                   processes=accelerator.num_processes, device=str(accelerator.device),
                   mixed_precision=accelerator.mixed_precision, warmup_steps=warmup)
        if accelerator.is_main_process:
            log.info("data: %s; %d steps (%d per epoch), warm-up %d", index.summary(), total_steps, steps_per_epoch, warmup)

        model = self._build_model()
        module = DiffusionModule(model.unet, model.condition_encoder if isinstance(model.condition_encoder, nn.Module) else None)
        if module.encoder is None:
            # A prompt cache (official BERT vectors) is fixed: only the U-Net trains.
            module.encoder = _FrozenEncoder(model.condition_encoder)
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad],
                                      lr=config.learning_rate, weight_decay=config.weight_decay)
        from diffusers.optimization import get_cosine_schedule_with_warmup

        lr_scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
        ema = None
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(module.parameters(), decay=config.ema_decay)

        step = 0
        if resume_from is not None:
            step = self._load_checkpoint(resume_from[1], module, optimizer, lr_scheduler, ema, fingerprint)
        module, optimizer = accelerator.prepare(module, optimizer)
        if ema is not None:
            ema.to(accelerator.device)
        metrics = MetricsLog(self.output, resume_step=step) if accelerator.is_main_process else None

        epoch, position = divmod(step, steps_per_epoch)
        start_time, last_log_time, images_since_log = time.perf_counter(), time.perf_counter(), 0
        recent_losses: list[float] = []
        seen_items: list[int] = []
        self.progress.update(step, total_steps, "resuming" if step else "starting")
        try:
            while step < total_steps:
                dataset.set_epoch(epoch)
                sampler.set_epoch(epoch, position * config.batch_size)
                loader = torch.utils.data.DataLoader(dataset, config.batch_size, sampler=sampler, drop_last=True,
                                                     collate_fn=collate, num_workers=config.num_workers)
                for batch in loader:
                    self.progress.check_cancelled()
                    loss, grad_norm = self._train_step(module, optimizer, batch, step)
                    seen_items.extend(batch["index"])
                    lr_scheduler.step()
                    if ema is not None:
                        ema.step(accelerator.unwrap_model(module).parameters())
                    step += 1
                    images_since_log += config.batch_size * accelerator.num_processes
                    recent_losses = (recent_losses + [loss])[-50:]
                    self.progress.update(step, total_steps, f"loss {loss:.4f}")
                    if metrics is not None and (step % config.log_every == 0 or step == total_steps):
                        now = time.perf_counter()
                        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr_scheduler.get_last_lr()[0],
                               "grad_norm": grad_norm, "images_per_second": images_since_log / max(now - last_log_time, 1e-9),
                               "elapsed_s": now - start_time, "micro_batch": self.micro_batch}
                        metrics.write(row)
                        self._emit("metrics", **row, total_steps=total_steps)
                        last_log_time, images_since_log = now, 0
                    if step % config.checkpoint_every == 0 or step == total_steps:
                        self._save_checkpoint(step, epoch, module, optimizer, lr_scheduler, ema, model, index,
                                              fingerprint, float(np.mean(recent_losses)))
                    if step >= total_steps:
                        break
                epoch, position = epoch + 1, 0
        finally:
            if metrics is not None:
                metrics.close()
        final_loss = float(np.mean(recent_losses)) if recent_losses else float("nan")
        model_folder = self.output / "model"
        self._write_rank_record(module, seen_items, step)
        accelerator.wait_for_everyone()
        self._emit("finished", step=step, final_loss=final_loss, model=str(model_folder))
        return PretrainResult(self.output, model_folder, step, final_loss,
                              resumed_from=resume_from[0] if resume_from else None, skipped_sources=index.skipped,
                              is_main_process=accelerator.is_main_process)

    def _write_rank_record(self, module, seen_items: list[int], step: int) -> None:
        """Per-process audit record: which items this process trained on and a digest of its weights.

        In a distributed run the records show that processes read disjoint data and ended with
        identical weights (DDP keeps them in step).
        """
        import hashlib

        digest = hashlib.sha256()
        for name, tensor in sorted(self.accelerator.unwrap_model(module).state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        record = {"rank": self.accelerator.process_index, "world_size": self.accelerator.num_processes,
                  "final_step": step, "items_seen_this_session": len(seen_items),
                  "items": seen_items[:100_000], "weights_sha256": digest.hexdigest()}
        folder = self.output / "ranks"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"rank-{record['rank']}.json").write_text(json.dumps(record))

    def _broadcast(self, value):
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _emit(self, kind: str, **payload) -> None:
        if self.accelerator.is_main_process:
            self.on_event({"event": kind, **payload})

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self, module, optimizer, batch: dict, step: int) -> tuple[float, float]:
        accelerator, config = self.accelerator, self.config
        pixels = batch["pixel_values"].to(accelerator.device)
        prompts = batch["prompt"]
        generator = torch.Generator().manual_seed(_rng_seed(config.seed, step, accelerator.process_index))
        noise = torch.randn(pixels.shape, generator=generator).to(pixels.device)
        timesteps = torch.randint(0, 1000, (pixels.shape[0],), generator=generator).to(pixels.device)
        while True:
            try:
                total_loss = self._accumulate(module, pixels, noise, timesteps, prompts)
                break
            except RuntimeError as error:
                if not _is_oom(error) or self.micro_batch == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                old = self.micro_batch
                self.micro_batch = max(1, old // 2)
                accumulation = math.ceil(config.batch_size / self.micro_batch)
                message = (f"out of GPU memory with micro-batch {old}; retrying with micro-batch {self.micro_batch} "
                           f"and gradient accumulation {accumulation} (same effective batch {config.batch_size})")
                log.warning(message)
                self._emit("warning", message=message)
        grad_norm = float("nan")
        if config.grad_clip:
            grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total_loss, grad_norm

    def _accumulate(self, module, pixels, noise, timesteps, prompts) -> float:
        accelerator = self.accelerator
        noise_scheduler = self._noise_scheduler
        batch = pixels.shape[0]
        chunks = range(0, batch, self.micro_batch)
        total = 0.0
        for number, first in enumerate(chunks):
            last = number == len(chunks) - 1
            part = slice(first, first + self.micro_batch)
            noisy = noise_scheduler.add_noise(pixels[part], noise[part], timesteps[part])
            sync = accelerator.no_sync(module) if not last and accelerator.num_processes > 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                prediction = module(noisy, timesteps[part], prompts[part])
                loss = F.mse_loss(prediction.float(), noise[part].float())
                # Weight by the chunk's share so the accumulated gradient equals the full-batch one.
                accelerator.backward(loss * (noisy.shape[0] / batch))
            total += float(loss.detach()) * noisy.shape[0] / batch
        return total

    @property
    def _noise_scheduler(self):
        if not hasattr(self, "_scheduler_instance"):
            from ..scheduler import make_ddpm_scheduler

            self._scheduler_instance = make_ddpm_scheduler()
        return self._scheduler_instance

    # ------------------------------------------------------------------ checkpoints
    def _metadata(self, step: int, index, fingerprint: str, loss: float) -> dict[str, Any]:
        config = self.config
        device = (torch.cuda.get_device_name(0) if torch.cuda.is_available() else
                  f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)")
        return {
            "name": config.name or self.output.name,
            "description": config.description or f"LCTfound {config.preset} pretrained by DDPM",
            "windows": list(config.windows),
            "training": {
                "task": "pretrain",
                "data_root": str(index.root),
                "data_fingerprint": fingerprint,
                "sources": len(index.sources),
                "slices": index.num_slices,
                "skipped_sources": len(index.skipped),
                "step": step,
                "loss_recent_mean": loss,
                "processes": self.accelerator.num_processes,
                "hardware": device,
                "config": dataclasses.asdict(config),
            },
        }

    def _save_checkpoint(self, step, epoch, module, optimizer, lr_scheduler, ema, model, index, fingerprint, loss):
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(module)
            weights = unwrapped
            if ema is not None:
                weights = copy.deepcopy(unwrapped)
                ema.copy_to(weights.parameters())
            encoder = weights.encoder.encoder if isinstance(weights.encoder, _FrozenEncoder) else weights.encoder
            snapshot = LCTfoundModel(weights.unet, model.scheduler, encoder,
                                     {k: v for k, v in model.metadata.items() if k != "files"})
            target = self.output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
            metadata = self._metadata(step, index, fingerprint, loss)
            with atomic_directory(target, overwrite=True) as tmp:
                save_model(snapshot, tmp / "model", extra_metadata=metadata)
                training = tmp / "training"
                training.mkdir()
                save_state_dict(optimizer.state_dict(), training, "optimizer")
                save_state_dict(lr_scheduler.state_dict(), training, "lr_scheduler")
                if ema is not None:
                    save_state_dict(ema.state_dict(), training, "ema")
                    save_state_dict(unwrapped.state_dict(), training, "raw_weights")
                (training / "trainer_state.json").write_text(json.dumps({
                    "step": step, "epoch": epoch, "micro_batch": self.micro_batch,
                    "data_fingerprint": fingerprint, "config": dataclasses.asdict(self.config)}, indent=2))
            # The newest complete checkpoint is also the run's model; older ones beyond the limit go.
            save_model(snapshot, self.output / "model", overwrite=True, extra_metadata=metadata)
            for _, old in list_checkpoints(self.output)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            plot_loss_curve(self.output / "metrics.csv", self.output / "loss_curve.png",
                            f"{metadata['name']} ({self.config.preset})")
            self._write_samples(snapshot, step)
            self._emit("checkpoint", step=step, path=str(target))
        accelerator.wait_for_everyone()

    def _write_samples(self, snapshot: LCTfoundModel, step: int) -> None:
        if self.config.num_samples < 1:
            return
        from ..pipelines.generation import GenerationPipeline, save_image_grid

        was_training = snapshot.unet.training
        snapshot.unet.eval()
        encoder = snapshot.condition_encoder
        if isinstance(encoder, nn.Module):
            encoder.eval()
        try:
            pipeline = GenerationPipeline(snapshot, "ddim")
            images, labels = [], []
            for window in self.config.windows:
                images.append(pipeline(window, num_images=self.config.num_samples, steps=self.config.sample_steps,
                                       seed=self.config.seed, size=self.config.resolution))
                labels += [window] * self.config.num_samples
            save_image_grid(np.concatenate(images), self.output / "samples" / f"step-{step:07d}.png",
                            columns=self.config.num_samples, labels=labels)
        finally:
            snapshot.unet.train(was_training)
            if isinstance(encoder, nn.Module):
                encoder.train(was_training)

    def _load_checkpoint(self, folder: Path, module, optimizer, lr_scheduler, ema, fingerprint: str) -> int:
        state = json.loads((folder / "training" / "trainer_state.json").read_text())
        saved = state["config"]
        current = dataclasses.asdict(self.config)
        for key in PretrainConfig.RESUME_KEYS:
            if _normal(saved.get(key)) != _normal(current.get(key)):
                raise LCTfoundError(f"{folder}: made with {key}={saved.get(key)!r}, this run asks for "
                                    f"{current.get(key)!r}; resume with the same settings or start a new run")
        if state.get("data_fingerprint") != fingerprint:
            raise LCTfoundError(f"{folder}: the training data changed since this checkpoint (fingerprint differs)")
        if ema is not None:
            module.load_state_dict(load_state_dict(folder / "training", "raw_weights"))
            ema.load_state_dict(load_state_dict(folder / "training", "ema"))
        else:
            saved_model = load_model(folder / "model")
            module.unet.load_state_dict(saved_model.unet.state_dict())
            if isinstance(module.encoder, LearnedConditionEncoder):
                module.encoder.load_state_dict(saved_model.condition_encoder.state_dict())
        try:
            optimizer.load_state_dict(load_state_dict(folder / "training", "optimizer"))
            lr_scheduler.load_state_dict(load_state_dict(folder / "training", "lr_scheduler"))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{folder}: optimizer state does not fit this model ({error})") from None
        self.micro_batch = min(self.micro_batch, int(state.get("micro_batch", self.micro_batch)))
        log.info("resumed from %s at step %d", folder, state["step"])
        self._emit("resumed", step=state["step"], checkpoint=str(folder))
        return int(state["step"])


class _FrozenEncoder(nn.Module):
    """Wraps a non-trainable prompt cache so that `DiffusionModule` can call it like the learned encoder."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def encode(self, prompts):
        return self.encoder.encode(prompts)


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def pretrain(config: PretrainConfig, resume: bool = False, progress: Optional[Progress] = None,
             on_event: Optional[Callable[[dict], None]] = None) -> PretrainResult:
    return Pretrainer(config, resume, progress, on_event=on_event).run()


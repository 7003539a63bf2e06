"""One resumable training loop for every task: pretraining, fine-tuning, heads, adapters, students.

A task says WHAT is trained (its module, data, loss and how its model folder is written); the
loop does the rest the same way for all of them: HF Accelerate (one CPU, one or many GPUs,
several nodes; bf16 autocast on GPUs that support it), AdamW with a cosine schedule and linear
warm-up, gradient clipping, gradient accumulation, optional EMA, CSV + TensorBoard logs,
progress and cancellation, and checkpoints that are complete model folders published
atomically every N steps.

Exact resume: data order, augmentation and random draws are functions of (seed, epoch, item)
and (seed, step, rank), and the optimizer, LR schedule and EMA states are stored (without
pickle), so a run resumed after a crash or ``kill -9`` ends with the same weights as an
uninterrupted one. A CUDA out-of-memory error halves the micro-batch and accumulates
gradients instead, and says so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_directory
from ..errors import CheckpointError, LCTfoundError
from ..progress import Progress, ensure_progress
from .data import BlockShuffleSampler
from .logs import MetricsLog, plot_loss_curve
from .state import load_state_dict, save_state_dict

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"


@dataclass
class LoopConfig:
    output: str
    batch_size: int = 24
    micro_batch_size: Optional[int] = None
    max_steps: Optional[int] = None
    epochs: float = 1.0
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    ema_decay: Optional[float] = None
    seed: int = 0
    num_workers: int = 0
    log_every: int = 10
    device: str = "auto"  # "cpu" forces the CPU even where CUDA is available

    def __post_init__(self) -> None:
        from ..validation import (
            MAX_BATCH, MAX_EPOCHS, MAX_SEED, MAX_STEPS, MAX_WORKERS, check_float, check_int, check_optional_float,
            check_optional_int,
        )

        # Every setting is checked here, before any folder is created (CLI, Slicer and web alike).
        self.batch_size = check_int(self.batch_size, "batch-size", 1, MAX_BATCH)
        self.micro_batch_size = check_optional_int(self.micro_batch_size, "micro-batch-size", minimum=1,
                                                   maximum=self.batch_size)
        self.max_steps = check_optional_int(self.max_steps, "max-steps", minimum=1, maximum=MAX_STEPS)
        self.epochs = check_float(self.epochs, "epochs", above=0, maximum=MAX_EPOCHS)
        self.learning_rate = check_float(self.learning_rate, "learning rate (lr)", above=0, maximum=10)
        self.weight_decay = check_float(self.weight_decay, "weight decay", minimum=0, maximum=10)
        self.warmup_steps = check_int(self.warmup_steps, "warmup-steps", 0, MAX_STEPS)
        self.grad_clip = check_float(self.grad_clip, "gradient clipping", above=0)
        self.checkpoint_every = check_int(self.checkpoint_every, "checkpoint-every", 1, MAX_STEPS)
        self.keep_checkpoints = check_int(self.keep_checkpoints, "keep-checkpoints", 1, 1000)
        self.log_every = check_int(self.log_every, "log-every", 1, MAX_STEPS)
        self.seed = check_int(self.seed, "seed", 0, MAX_SEED)
        self.num_workers = check_int(self.num_workers, "num-workers", 0, MAX_WORKERS)
        self.ema_decay = check_optional_float(self.ema_decay, "the EMA decay", above=0, below=1)
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise LCTfoundError(f"mixed precision {self.mixed_precision!r}: choose auto, no, bf16 or fp16")
        if self.device not in ("auto", "cpu", "cuda"):
            raise LCTfoundError(f"device {self.device!r}: choose auto, cpu or cuda")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise LCTfoundError("device cuda is not available here; choose the device cpu or auto")


class TrainingTask:
    """What a `TrainingLoop` trains. Subclasses implement the methods that raise here."""

    #: Recorded in logs and events.
    name = "task"

    def dataset(self):
        """A map-style dataset whose items are dicts; optional ``set_epoch(epoch)`` and ``items_per_source()``."""
        raise NotImplementedError

    def collate(self, items: list[dict]) -> dict:
        """Stack tensors, keep everything else as lists."""
        return {key: torch.stack([item[key] for item in items]) if isinstance(items[0][key], torch.Tensor)
                else [item[key] for item in items] for key in items[0]}

    def build_module(self) -> nn.Module:
        """The trainable module; its ``forward(batch) -> scalar loss`` (mean over the batch chunk)."""
        raise NotImplementedError

    def prepare_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """Add the step's random draws (noise, timesteps…) for the WHOLE batch before it is split."""
        return batch

    def save_model(self, module: nn.Module, folder: Path, metadata: dict[str, Any]) -> None:
        """Write the task's model folder (``module`` holds the weights to publish, EMA when enabled)."""
        raise NotImplementedError

    def load_weights(self, module: nn.Module, folder: Path) -> None:
        """Load the weights of a model folder written by `save_model` into ``module`` (used on resume)."""
        raise NotImplementedError

    def resume_settings(self) -> dict[str, Any]:
        """Settings that must be equal for a checkpoint to be resumed (data fingerprint included)."""
        return {}

    def metadata(self) -> dict[str, Any]:
        """Metadata stored with every checkpoint's model (name, description, data, task settings)."""
        return {}

    def after_checkpoint(self, module: nn.Module, step: int, output: Path) -> None:
        """Optional extras at each checkpoint (sample grids, validation), main process only."""

    def describe(self) -> str:
        """One line about the training data, for the start event and logs."""
        return ""

    def parameter_groups(self, module: nn.Module, learning_rate: float) -> list[dict]:
        return [{"params": [p for p in module.parameters() if p.requires_grad], "lr": learning_rate}]


@dataclass
class TrainingResult:
    output: Path
    model_folder: Path
    steps: int
    final_loss: float
    resumed_from: Optional[int] = None
    is_main_process: bool = True
    extra: dict = field(default_factory=dict)


def _rng_seed(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1)[0])


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run folder, oldest first."""
    folder = Path(output) / "checkpoints"
    found = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.name.startswith(CHECKPOINT_PREFIX) and (path / "training" / "trainer_state.json").is_file():
                with contextlib.suppress(ValueError):
                    found.append((int(path.name[len(CHECKPOINT_PREFIX):]), path))
    return sorted(found)


def check_run_folder(output: Path, resume: bool, inputs=()) -> Optional[tuple[int, Path]]:
    """The newest complete checkpoint to resume from (None for a new run), or a one-line error:
    resuming a folder without one, a new run in a folder that already holds a run, a run folder
    that is (or is inside, or holds) one of ``inputs``, or one that cannot be written. Trainers
    with costly preparation (embedding, preprocessing) call it first; the loop checks again.
    On resume, temporaries left by a checkpoint save that was killed are removed."""
    from ..atomic import check_writable, refuse_input_conflict, remove_stale_temporaries

    output = Path(output).expanduser()
    if output.exists() and not output.is_dir():
        raise LCTfoundError(f"{output}: is a file; give a folder for the run")
    refuse_input_conflict(output, inputs, replaces_folder=True)
    checkpoints = list_checkpoints(output)
    if resume:
        if not checkpoints:
            raise LCTfoundError(f"{output}: nothing to resume (no complete checkpoint in {output / 'checkpoints'})")
        remove_stale_temporaries(output / "checkpoints")
        remove_stale_temporaries(output)
        check_writable(output / "checkpoints" / "x")
        return checkpoints[-1]
    if output.exists() and any(output.iterdir()):
        raise LCTfoundError(f"{output}: already holds a run; choose a new folder",
                            option_hints={"resume": "or pass --resume to continue it"})
    check_writable(output / "x")
    return None


def _mixed_precision(choice: str) -> str:
    if choice != "auto":
        return choice
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def _normal(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _split(batch: dict, part: slice) -> dict:
    return {key: value[part] for key, value in batch.items()}


class TrainingLoop:
    """Runs a `TrainingTask` under a `LoopConfig`; ``run()`` returns a `TrainingResult`."""

    def __init__(self, config: LoopConfig, task: TrainingTask, resume: bool = False,
                 progress: Optional[Progress] = None, on_event: Optional[Callable[[dict], None]] = None,
                 accelerator=None):
        from accelerate import Accelerator

        self.config, self.task, self.resume = config, task, resume
        self.progress = ensure_progress(progress)
        self.on_event = on_event or (lambda event: None)
        self.output = Path(config.output).expanduser()
        use_cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.accelerator = accelerator or Accelerator(
            mixed_precision="no" if use_cpu else _mixed_precision(config.mixed_precision), cpu=use_cpu)
        self.micro_batch = config.micro_batch_size or config.batch_size

    # ------------------------------------------------------------------ helpers
    def emit(self, kind: str, **payload) -> None:
        if self.accelerator.is_main_process:
            self.on_event({"event": kind, "task": self.task.name, **payload})

    def _broadcast(self, value):
        if self.accelerator.num_processes == 1:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def _prepare_output(self) -> Optional[tuple[int, Path]]:
        return check_run_folder(self.output, self.resume)

    def _settings(self) -> dict[str, Any]:
        loop = {k: v for k, v in dataclasses.asdict(self.config).items()
                if k in ("batch_size", "seed", "learning_rate", "weight_decay", "warmup_steps", "ema_decay")}
        return {**loop, **self.task.resume_settings()}

    # ------------------------------------------------------------------ the run
    def run(self) -> TrainingResult:
        config, accelerator, task = self.config, self.accelerator, self.task
        resume_from = self._broadcast(self._prepare_output() if accelerator.is_main_process else None)
        dataset = task.dataset()
        sizes = dataset.items_per_source() if hasattr(dataset, "items_per_source") else [len(dataset)]
        sampler = BlockShuffleSampler(sizes, config.seed, accelerator.process_index, accelerator.num_processes)
        steps_per_epoch = sampler.per_rank // config.batch_size
        if steps_per_epoch == 0:
            raise LCTfoundError(f"batch size {config.batch_size} exceeds the {sampler.per_rank} items each process gets")
        total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        warmup = min(config.warmup_steps, max(0, total_steps // 10))
        self.emit("start", total_steps=total_steps, steps_per_epoch=steps_per_epoch, items=len(dataset),
                  data=task.describe() or f"{len(dataset)} items",
                  processes=accelerator.num_processes, device=str(accelerator.device),
                  mixed_precision=accelerator.mixed_precision, warmup_steps=warmup)

        torch.manual_seed(config.seed)  # new heads and layers start the same in every run with this seed
        module = task.build_module()
        module.train()
        optimizer = torch.optim.AdamW(task.parameter_groups(module, config.learning_rate),
                                      lr=config.learning_rate, weight_decay=config.weight_decay)
        from diffusers.optimization import get_cosine_schedule_with_warmup

        lr_scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
        ema = None
        if config.ema_decay:
            from diffusers.training_utils import EMAModel

            ema = EMAModel([p for p in module.parameters() if p.requires_grad], decay=config.ema_decay)
        step = 0
        if resume_from is not None:
            step = self._load_checkpoint(resume_from[1], module, optimizer, lr_scheduler, ema)
        module, optimizer = accelerator.prepare(module, optimizer)
        if ema is not None:
            ema.to(accelerator.device)
        metrics = MetricsLog(self.output, resume_step=step) if accelerator.is_main_process else None

        epoch, position = divmod(step, steps_per_epoch)
        start_time = last_log_time = time.perf_counter()
        images_since_log = 0
        recent_losses: list[float] = []
        seen_items: list[int] = []
        self.progress.update(step, total_steps, "resuming" if step else "starting")
        try:
            while step < total_steps:
                if hasattr(dataset, "set_epoch"):
                    dataset.set_epoch(epoch)
                sampler.set_epoch(epoch, position * config.batch_size)
                loader = torch.utils.data.DataLoader(dataset, config.batch_size, sampler=sampler, drop_last=True,
                                                     collate_fn=task.collate, num_workers=config.num_workers)
                for batch in loader:
                    self.progress.check_cancelled()
                    loss, grad_norm = self._train_step(module, optimizer, batch, step)
                    lr_scheduler.step()
                    if ema is not None:
                        ema.step([p for p in accelerator.unwrap_model(module).parameters() if p.requires_grad])
                    if "index" in batch:
                        seen_items.extend(int(i) for i in batch["index"])
                    step += 1
                    images_since_log += config.batch_size * accelerator.num_processes
                    recent_losses = (recent_losses + [loss])[-50:]
                    self.progress.update(step, total_steps, f"loss {loss:.4f}")
                    if metrics is not None and (step % config.log_every == 0 or step == total_steps):
                        now = time.perf_counter()
                        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr_scheduler.get_last_lr()[0],
                               "grad_norm": grad_norm,
                               "images_per_second": images_since_log / max(now - last_log_time, 1e-9),
                               "elapsed_s": now - start_time, "micro_batch": self.micro_batch}
                        metrics.write(row)
                        self.emit("metrics", **row, total_steps=total_steps)
                        last_log_time, images_since_log = now, 0
                    if step % config.checkpoint_every == 0 or step == total_steps:
                        self._save_checkpoint(step, epoch, module, optimizer, lr_scheduler, ema,
                                              float(np.mean(recent_losses)))
                    if step >= total_steps:
                        break
                epoch, position = epoch + 1, 0
        finally:
            if metrics is not None:
                metrics.close()
        final_loss = float(np.mean(recent_losses)) if recent_losses else float("nan")
        self._write_rank_record(module, seen_items, step)
        accelerator.wait_for_everyone()
        self.emit("finished", step=step, final_loss=final_loss, model=str(self.output / "model"))
        return TrainingResult(self.output, self.output / "model", step, final_loss,
                              resumed_from=resume_from[0] if resume_from else None,
                              is_main_process=accelerator.is_main_process)

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self, module, optimizer, batch: dict, step: int) -> tuple[float, float]:
        accelerator, config = self.accelerator, self.config
        batch = {key: value.to(accelerator.device) if isinstance(value, torch.Tensor) else value
                 for key, value in batch.items()}
        generator = torch.Generator().manual_seed(_rng_seed(config.seed, step, accelerator.process_index))
        batch = self.task.prepare_batch(batch, generator)
        while True:
            try:
                loss = self._accumulate(module, batch)
                break
            except RuntimeError as error:
                if not _is_oom(error) or self.micro_batch == 1:
                    raise
                optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                old, self.micro_batch = self.micro_batch, max(1, self.micro_batch // 2)
                message = (f"out of GPU memory with micro-batch {old}; retrying with micro-batch {self.micro_batch} "
                           f"and gradient accumulation {math.ceil(config.batch_size / self.micro_batch)} "
                           f"(same effective batch {config.batch_size})")
                log.warning(message)
                self.emit("warning", message=message)
        grad_norm = float("nan")
        if config.grad_clip:
            grad_norm = float(accelerator.clip_grad_norm_(module.parameters(), config.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def _accumulate(self, module, batch: dict) -> float:
        accelerator = self.accelerator
        size = len(next(iter(batch.values())))
        starts = range(0, size, self.micro_batch)
        total = 0.0
        for number, first in enumerate(starts):
            part = slice(first, first + self.micro_batch)
            chunk = _split(batch, part)
            share = len(range(size)[part]) / size
            last = number == len(starts) - 1
            sync = accelerator.no_sync(module) if not last and accelerator.num_processes > 1 else contextlib.nullcontext()
            with sync, accelerator.autocast():
                loss = module(chunk)
                # Weighted by the chunk's share, the accumulated gradient equals the full-batch one.
                accelerator.backward(loss * share)
            total += float(loss.detach()) * share
        return total

    # ------------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, step, epoch, module, optimizer, lr_scheduler, ema, loss: float) -> None:
        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(module)
            weights = unwrapped
            if ema is not None:
                weights = copy.deepcopy(unwrapped)
                ema.copy_to([p for p in weights.parameters() if p.requires_grad])
            metadata = {**self.task.metadata(), "training": {
                **self.task.metadata().get("training", {}), "task": self.task.name, "step": step,
                "loss_recent_mean": loss, "processes": accelerator.num_processes,
                "hardware": _hardware(), "loop": dataclasses.asdict(self.config)}}
            target = self.output / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:07d}"
            with atomic_directory(target, overwrite=True) as tmp:
                self.task.save_model(weights, tmp / "model", metadata)
                training = tmp / "training"
                training.mkdir()
                save_state_dict(optimizer.state_dict(), training, "optimizer")
                save_state_dict(lr_scheduler.state_dict(), training, "lr_scheduler")
                if ema is not None:
                    save_state_dict(ema.state_dict(), training, "ema")
                    save_state_dict(unwrapped.state_dict(), training, "raw_weights")
                (training / "trainer_state.json").write_text(json.dumps({
                    "step": step, "epoch": epoch, "micro_batch": self.micro_batch,
                    "settings": self._settings()}, indent=2, default=str))
            # The newest checkpoint's model is also the run's model; older checkpoints beyond the limit go.
            with atomic_directory(self.output / "model", overwrite=True) as tmp:
                shutil.copytree(target / "model", tmp, dirs_exist_ok=True)
            for _, old in list_checkpoints(self.output)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
            plot_loss_curve(self.output / "metrics.csv", self.output / "loss_curve.png",
                            f"{metadata.get('name', self.output.name)} ({self.task.name})")
            self.task.after_checkpoint(weights, step, self.output)
            self.emit("checkpoint", step=step, path=str(target))
        accelerator.wait_for_everyone()

    def _load_checkpoint(self, folder: Path, module, optimizer, lr_scheduler, ema) -> int:
        state = json.loads((folder / "training" / "trainer_state.json").read_text())
        saved, current = state.get("settings", {}), self._settings()
        for key in sorted(set(saved) | set(current)):
            if _normal(saved.get(key)) != _normal(json.loads(json.dumps(current.get(key), default=str))):
                if key == "data_fingerprint":
                    raise LCTfoundError(f"{folder}: the training data changed since this checkpoint (fingerprint differs)")
                raise LCTfoundError(f"{folder}: made with {key}={saved.get(key)!r}, this run asks for "
                                    f"{current.get(key)!r}; resume with the same settings or start a new run")
        if ema is not None:
            module.load_state_dict(load_state_dict(folder / "training", "raw_weights"))
            ema.load_state_dict(load_state_dict(folder / "training", "ema"))
        else:
            self.task.load_weights(module, folder / "model")
        try:
            optimizer.load_state_dict(load_state_dict(folder / "training", "optimizer"))
            lr_scheduler.load_state_dict(load_state_dict(folder / "training", "lr_scheduler"))
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{folder}: optimizer state does not fit this model ({error})") from None
        self.micro_batch = min(self.micro_batch, int(state.get("micro_batch", self.micro_batch)))
        log.info("resumed from %s at step %d", folder, state["step"])
        self.emit("resumed", step=state["step"], checkpoint=str(folder))
        return int(state["step"])

    def _write_rank_record(self, module, seen_items: list[int], step: int) -> None:
        """Per-process audit record: the items this process trained on and a digest of its weights.

        In a distributed run the records show that processes read disjoint data and ended with
        identical weights (DDP keeps them in step).
        """
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


def _hardware() -> str:
    import platform

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}× {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"

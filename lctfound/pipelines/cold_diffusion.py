"""Low-dose CT enhancement by cold diffusion on a frozen LCTfound U-Net (reference §7, CoreDiff design).

Degradation. With T steps (default 10) and ᾱ_t = 1 − t/T for t = 0..T, the state at level t is
the mean-preserving mix ``x_t = ᾱ_t·x0 + (1 − ᾱ_t)·x_LD`` of the full-dose slice x0 and the
low-dose slice x_LD: x_0 = x0 and x_T = x_LD exactly. This is CoreDiff's linear schedule with its
clean level made explicit (CoreDiff tabulates clip(1 − linspace(0, T, T)/T, 0, 0.999) for indices
0..T−1 and treats "index −1" as ᾱ = 1; here the T + 1 levels are evenly spaced, 1 … 0).

Network. The frozen LCTfound U-Net sees three adjacent slices as its three input channels —
previous low-dose slice, the current state x_t, next low-dose slice (edge slices replicated) — in
the fixed, invertible window mapping of `lctfound.preprocessing` ([−1, 1]). Its last decoder
features (the input of ``conv_out``) feed a new 3×3 output layer predicting a residual on the
middle channel: x̂0 = x_t + head(features). The head starts at zero, so an untrained enhancer
returns its input. The backbone's time embedding gets the DDPM timestep τ(t) = round(t·τ_max/T)
(τ_max = 20 by default: 10 %-dose noise in the lung window is about the noise of DDPM step 16–20),
instead of CoreDiff's raw t ∈ 0..9, which the official time embedding never saw as such.

Error modulation ("adjust" sub-networks, CoreDiff's EMM): for down blocks 0 and 1 and the last
two up blocks, a small conv net reads (previous estimate x̂0, x_LD) — conv 3×3 2→32, ReLU,
avg-pool 2, 32→64, ReLU, pool, 64→128, ReLU, pool, 1×1 → 2C, global mean → γ, β — and the block's
output becomes ``h + γ·W(GELU(temb)) + β`` (only the main path, not the skip tensors, as in the
reference). Fixed against the published code: the up-path expression ``sample + gamma1 * + beta1``
(which computed h + γ·β and dropped the time term) is h + γ·temb + β here; the forward call wiring
(prompt vector as ``encoder_hidden_states``, adjust inputs as such) is correct; the mid block keeps
its pretrained cross-attention (the published subclass silently re-initialised it). The final
1×1 layer of each adjust net starts at zero, so modulation starts as the identity. Only the
adjust nets and the output head train; every backbone weight stays frozen.

Sampling (cold diffusion's improved algorithm, Bansal et al. 2022 Alg. 2; CoreDiff's
``x0_step_down`` routine): start at x_T = x_LD; at each level t predict x̂0 (adjust off at the
first step, on afterwards with the previous x̂0), then ``x_{t−1} = x_t − D(x̂0, t) + D(x̂0, t−1)``
with D(x, s) = ᾱ_s·x + (1 − ᾱ_s)·x_LD. With the linear schedule the result is the mean of the
per-step estimates x̂0. Fewer steps than T skip levels evenly (steps = 1 is the one-shot x̂0).

Resolution: denoising needs the native pixel grid, so the network runs on overlapping tiles of
the training patch size (MONAI sliding-window, Gaussian blending) at every step.

HU out: inside the window the result is the enhanced image; outside it (clipped for the network)
the input's excess over the window is carried over unchanged: ``out = HU(x̂) + (in − clip(in))``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, LCTfoundError
from .names import cold_diffusion_name as result_name  # noqa: F401 - re-exported
from .choices import COLD_DIFFUSION_DEFAULT_STEPS, COLD_DIFFUSION_DEFAULT_TIMESTEP_MAX, COLD_DIFFUSION_DEFAULT_WINDOW
from ..progress import Progress, ensure_progress
from ..windows import Window, get_window
from ..compat import strict_zip

TASK = "low-dose-enhancement"
TASK_LABEL = "low-dose enhancement"
DEFAULT_STEPS = COLD_DIFFUSION_DEFAULT_STEPS
DEFAULT_TIMESTEP_MAX = COLD_DIFFUSION_DEFAULT_TIMESTEP_MAX
DEFAULT_WINDOW = COLD_DIFFUSION_DEFAULT_WINDOW
ADJUST_WIDTHS = (32, 64, 128)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------

class ColdDiffusionSchedule:
    """ᾱ_t = 1 − t/T (t = 0..T) and the degradation/sampling rules built on it (see the module doc)."""

    def __init__(self, steps: int = DEFAULT_STEPS):
        if int(steps) < 1:
            raise LCTfoundError(f"cold diffusion needs at least 1 step, got {steps}")
        self.steps = int(steps)
        self.alpha_bars = 1.0 - torch.arange(self.steps + 1, dtype=torch.float64) / self.steps

    def alpha_bar(self, t: torch.Tensor | int, like: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ᾱ_t shaped to broadcast over ``like`` (B, C, H, W) when given."""
        values = self.alpha_bars[torch.as_tensor(t, dtype=torch.long).cpu()]
        if like is None:
            return values
        values = values.to(like.device, like.dtype)
        return values.reshape(-1, *([1] * (like.dim() - 1))) if values.dim() else values

    def degrade(self, x0: torch.Tensor, x_end: torch.Tensor, t: torch.Tensor | int) -> torch.Tensor:
        """D(x0, t) = ᾱ_t·x0 + (1 − ᾱ_t)·x_end."""
        a = self.alpha_bar(t, x0)
        return a * x0 + (1 - a) * x_end

    def step(self, x_t: torch.Tensor, x0_hat: torch.Tensor, x_end: torch.Tensor, t: int, t_next: int) -> torch.Tensor:
        """The improved cold-diffusion update x_{t'} = x_t − D(x̂0, t) + D(x̂0, t')."""
        return x_t - self.degrade(x0_hat, x_end, t) + self.degrade(x0_hat, x_end, t_next)

    def levels(self, steps: Optional[int] = None) -> list[int]:
        """The levels visited by a sampler with ``steps`` network calls: T, …, 0 (evenly skipped)."""
        steps = self.steps if steps is None else int(steps)
        if not 1 <= steps <= self.steps:
            raise LCTfoundError(f"steps must lie in 1..{self.steps} (the model was trained with T = {self.steps})")
        levels = np.round(np.linspace(self.steps, 0, steps + 1)).astype(int)
        return [int(level) for level in levels]


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------

class ErrorModulation(nn.Module):
    """CoreDiff's adjust sub-network for one block of C channels: returns γ·W(GELU(temb)) + β, (B, C, 1, 1)."""

    def __init__(self, channels: int, time_dim: int, in_channels: int = 2, widths: Sequence[int] = ADJUST_WIDTHS):
        super().__init__()
        layers: list[nn.Module] = []
        previous = in_channels
        for width in widths:
            layers += [nn.Conv2d(previous, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.scale_shift = nn.Conv2d(previous, 2 * channels, 1)
        nn.init.zeros_(self.scale_shift.weight)  # modulation starts as the identity
        nn.init.zeros_(self.scale_shift.bias)
        self.time = nn.Sequential(nn.GELU(), nn.Linear(time_dim, channels))

    def forward(self, adjust_input: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.scale_shift(self.features(adjust_input)).mean(dim=(2, 3), keepdim=True).chunk(2, dim=1)
        return gamma * self.time(temb)[:, :, None, None] + beta


def context_slices(array: np.ndarray, index: int, radius: int = 1) -> np.ndarray:
    """Slices index−radius..index+radius of a (K, H, W) array, edge slices replicated → (2·radius+1, H, W)."""
    last = array.shape[0] - 1
    return np.stack([array[min(max(index + offset, 0), last)] for offset in range(-radius, radius + 1)])


def hu_to_model(hu: np.ndarray | torch.Tensor, window: Window) -> torch.Tensor:
    """HU → [−1, 1] under the fixed (invertible) window mapping, same shape, float32."""
    from ..preprocessing import window_to_unit

    return window_to_unit(hu, window, "fixed") * 2 - 1


def model_to_window_hu(x: torch.Tensor, window: Window) -> torch.Tensor:
    """[−1, 1] → HU inside the window (the inverse of `hu_to_model` on the window)."""
    return (x.clamp(-1, 1) + 1) / 2 * window.width + window.low


class ColdDiffusionNetwork(nn.Module):
    """x̂0 = x_t + head(U-Net decoder features), with CoreDiff error modulation (see the module doc).

    ``forward(x, t, adjust_input)``: x (B, 3, H, W) = [previous LD slice, x_t, next LD slice] in
    [−1, 1]; t (B,) cold-diffusion levels 1..T; adjust_input (B, 2, H, W) = [previous x̂0, x_LD]
    or None (no modulation) → x̂0 (B, 1, H, W).
    """

    def __init__(self, model, window: str | Window = DEFAULT_WINDOW, steps: int = DEFAULT_STEPS,
                 timestep_max: int = DEFAULT_TIMESTEP_MAX, patch_size: Optional[int] = None):
        super().__init__()
        self.window = get_window(window)
        self.schedule = ColdDiffusionSchedule(steps)
        if not 0 <= int(timestep_max) < model.scheduler.config.num_train_timesteps:
            raise LCTfoundError(f"timestep_max must lie in 0..{model.scheduler.config.num_train_timesteps - 1}")
        self.timestep_max = int(timestep_max)
        self.patch_size = int(patch_size or model.sample_size)
        if self.patch_size < 16 or self.patch_size % 16:
            raise LCTfoundError(f"patch size must be a multiple of 16 (at least 16), got {self.patch_size}")
        self.unet = model.unet
        self.unet.requires_grad_(False)
        if self.unet.config.in_channels != 3:
            raise LCTfoundError(f"the backbone takes {self.unet.config.in_channels} input channels; "
                                "cold diffusion needs a 3-channel LCTfound U-Net")
        self.register_buffer("condition", model.condition(self.window).detach().float().cpu(), persistent=False)
        widths = list(self.unet.config.block_out_channels)
        time_dim = self.unet.time_embedding.linear_2.out_features
        count = len(widths)
        # Down blocks 0, 1 output widths[0], widths[1]; the last two up blocks output widths[1], widths[0].
        self.down_blocks = (0, 1)
        self.up_blocks = (count - 2, count - 1)
        self.adjust = nn.ModuleDict({
            **{f"down{b}": ErrorModulation(widths[b], time_dim) for b in self.down_blocks},
            **{f"up{b}": ErrorModulation(widths[count - 1 - b], time_dim) for b in self.up_blocks},
        })
        self.head = nn.Conv2d(self.unet.conv_out.in_channels, 1, 3, padding=1)
        nn.init.zeros_(self.head.weight)  # an untrained enhancer returns its input
        nn.init.zeros_(self.head.bias)

    def train(self, mode: bool = True) -> "ColdDiffusionNetwork":
        super().train(mode)
        self.unet.eval()  # the frozen backbone keeps inference behaviour
        return self

    def backbone_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        return torch.round(t.float() * self.timestep_max / self.schedule.steps).long()

    @contextlib.contextmanager
    def _hooks(self, adjust_input: Optional[torch.Tensor], captured: dict):
        # Hooks live only for one forward, so the same U-Net object can serve other tasks unchanged.
        unet, handles = self.unet, []

        def keep_temb(_module, _inputs, output):
            captured["temb"] = output

        def keep_features(_module, inputs, _output):
            captured["features"] = inputs[0]

        def modulate_down(key):
            def hook(_module, _inputs, output):
                hidden, skips = output
                return hidden + self.adjust[key](adjust_input, captured["temb"]).to(hidden.dtype), skips
            return hook

        def modulate_up(key):
            def hook(_module, _inputs, output):
                return output + self.adjust[key](adjust_input, captured["temb"]).to(output.dtype)
            return hook

        handles.append(unet.time_embedding.register_forward_hook(keep_temb))
        handles.append(unet.conv_out.register_forward_hook(keep_features))
        if adjust_input is not None:
            for block in self.down_blocks:
                handles.append(unet.down_blocks[block].register_forward_hook(modulate_down(f"down{block}")))
            for block in self.up_blocks:
                handles.append(unet.up_blocks[block].register_forward_hook(modulate_up(f"up{block}")))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def forward(self, x: torch.Tensor, t: torch.Tensor, adjust_input: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = self.unet.dtype
        condition = self.condition.to(x.device, dtype).expand(x.shape[0], -1, -1)
        tau = self.backbone_timesteps(t.to(x.device))
        captured: dict[str, torch.Tensor] = {}
        # Without modulation nothing before the head trains, so the backbone runs without autograd.
        track = torch.is_grad_enabled() and adjust_input is not None
        with self._hooks(adjust_input.to(dtype) if adjust_input is not None else None, captured), \
                torch.set_grad_enabled(track):
            self.unet(x.to(dtype), tau, encoder_hidden_states=condition)
        features = captured["features"]
        if not track:
            features = features.detach()
        return x[:, 1:2] + self.head(features.to(self.head.weight.dtype)).to(x.dtype)

    def trainable_parts(self) -> dict[str, nn.Module]:
        return {"adjust": self.adjust, "head": self.head}

    def settings(self) -> dict[str, Any]:
        return {"steps": self.schedule.steps, "alpha_bar": "1 - t/T, t = 0..T",
                "window": _window_name(self.window), "timestep_max": self.timestep_max,
                "patch_size": self.patch_size, "context_slices": 3, "normalization": "fixed",
                "adjust_blocks": {"down": list(self.down_blocks), "up": list(self.up_blocks)},
                "adjust_widths": list(ADJUST_WIDTHS)}

    @classmethod
    def from_task_model(cls, task_model, base_model) -> "ColdDiffusionNetwork":
        from ..models.task_models import require_parts

        settings = task_model.info.get("cold_diffusion")
        if not settings:
            raise CheckpointError(f"{task_model.folder}: has no cold-diffusion settings")
        network = cls(task_model.resolve_backbone(base_model), settings["window"], settings["steps"],
                      settings["timestep_max"], settings["patch_size"])
        require_parts(task_model, network.trainable_parts())
        for name, part in network.trainable_parts().items():
            try:
                part.load_state_dict(task_model.parts[name])
            except RuntimeError as error:
                raise CheckpointError(f"{task_model.folder}: its {name} weights do not fit this backbone "
                                      f"({str(error).splitlines()[0]})") from None
        return network.eval()


def _window_name(window: Window) -> str:
    return window.name if window.name != "custom" else f"{window.width:g},{window.level:g}"


# --------------------------------------------------------------------------------------------
# Task models: loading with clear refusals
# --------------------------------------------------------------------------------------------

def open_task_model(spec: str | Path, task: str, label: str):
    """The `TaskModel` of a folder or registered name, refusing backbones and other tasks with one line
    (``… is a segmentation model, not a low-dose enhancement model``)."""
    from ..models import resolve_model
    from ..models.task_models import TASK_FILE, load_task_model, read_task_info

    folder = resolve_model(spec)
    if not (folder / TASK_FILE).is_file():
        if (folder / "unet").is_dir() or (folder / "config.json").is_file():
            raise LCTfoundError(f"{folder} is a backbone model, not a {label} model")
        raise CheckpointError(f"{folder}: not a task model ({TASK_FILE} missing)")
    found = read_task_info(folder).get("task")
    if found != task:
        raise LCTfoundError(f"{folder} is a {found} model, not a {label} model")
    return load_task_model(folder, task)


def backbone_for(task_model, backbone: Optional[str | Path], device):
    """The backbone a task model was trained on (its path if it still exists, else its name, else the
    embedded default) or the one the caller names; None when the task model carries its own."""
    from ..models import load_model, resolve_model

    if task_model.backbone_folder() is not None:
        return None
    if backbone is None:
        reference = task_model.backbone
        path = reference.get("path")
        backbone = path if path and Path(path).exists() else (reference.get("name") or "default")
    return load_model(resolve_model(backbone), device=device)


def task_model_provenance(task_model) -> dict[str, Any]:
    """Name, folder and sha256 of a task model (the sha256 of its task.json, which lists every file's)."""
    from ..hashing import sha256_file
    from ..models.task_models import TASK_FILE

    return {"model": task_model.info.get("name") or task_model.folder.name, "model_path": str(task_model.folder),
            "model_sha256": sha256_file(task_model.folder / TASK_FILE)}


def backbone_provenance(model) -> dict[str, Any]:
    from ..io.provenance import model_provenance

    record = model_provenance(model)
    return {"backbone": record["model"], "backbone_path": record["model_path"],
            "backbone_sha256": record["model_sha256"]}


def load_task_network(network_class, model: str | Path, task: str, label: str, backbone: Optional[str | Path],
                      device: str) -> tuple[nn.Module, dict[str, Any]]:
    """``network_class.from_task_model`` of a task model (folder or registered name) on ``device``, with the
    provenance record (task model and backbone checksums) of the pipelines built on it."""
    from ..devices import resolve_device

    torch_device = resolve_device(device)
    task_model = open_task_model(model, task, label)
    base = backbone_for(task_model, backbone, torch_device)
    network = network_class.from_task_model(task_model, base).to(torch_device)
    record = task_model_provenance(task_model)
    if base is not None:
        record.update(backbone_provenance(base))
    return network, record


# --------------------------------------------------------------------------------------------
# The enhancer
# --------------------------------------------------------------------------------------------

class ColdDiffusionEnhancer:
    """``enhancer(low_dose_hu, steps=10)`` → enhanced HU (a (K, H, W) array, one (H, W) slice, or a
    `CTVolume`, which gives a NEW `CTVolume` with provenance).

    ``batch_size`` slices are enhanced together; ``tile_batch`` network tiles run per call.
    """

    def __init__(self, network: ColdDiffusionNetwork, batch_size: int = 4, tile_batch: int = 8,
                 tile_overlap: float = 0.25, provenance: Optional[dict[str, Any]] = None):
        if batch_size < 1 or tile_batch < 1:
            raise LCTfoundError("batch_size and tile_batch must be at least 1")
        if not 0 <= tile_overlap < 1:
            raise LCTfoundError(f"tile_overlap must be in [0, 1), got {tile_overlap}")
        self.network = network.eval()
        self.batch_size, self.tile_batch, self.tile_overlap = batch_size, tile_batch, tile_overlap
        self.model_provenance = dict(provenance or {})

    @property
    def steps(self) -> int:
        return self.network.schedule.steps

    @property
    def window(self) -> Window:
        return self.network.window

    @property
    def device(self) -> torch.device:
        return self.network.head.weight.device

    @classmethod
    def load(cls, model: str | Path, backbone: Optional[str | Path] = None, device: str = "auto",
             **options: Any) -> "ColdDiffusionEnhancer":
        """The enhancer of a low-dose enhancement task model (folder or registered name)."""
        network, record = load_task_network(ColdDiffusionNetwork, model, TASK, TASK_LABEL, backbone, device)
        return cls(network, provenance=record, **options)

    # ------------------------------------------------------------------ one batch
    def _predict(self, x: torch.Tensor, level: int, adjust_input: Optional[torch.Tensor]) -> torch.Tensor:
        """x̂0 (B, 1, H, W) on overlapping tiles of the training patch size."""
        from monai.inferers import sliding_window_inference

        size = self.network.patch_size
        channels = x.shape[1]
        inputs = x if adjust_input is None else torch.cat([x, adjust_input], dim=1)

        def network(tiles: torch.Tensor) -> torch.Tensor:
            t = torch.full((tiles.shape[0],), level, dtype=torch.long, device=tiles.device)
            adjust = tiles[:, channels:] if adjust_input is not None else None
            return self.network(tiles[:, :channels], t, adjust)

        if tuple(x.shape[-2:]) == (size, size):
            return torch.cat([network(chunk) for chunk in inputs.split(self.tile_batch)])
        return sliding_window_inference(inputs, (size, size), self.tile_batch, network, overlap=self.tile_overlap,
                                        mode="gaussian", padding_mode="replicate")

    @torch.no_grad()
    def enhance_batch(self, context_hu: np.ndarray, steps: Optional[int] = None) -> np.ndarray:
        """(B, 3, H, W) HU context stacks (previous, current, next low-dose slice) → (B, H, W) enhanced HU."""
        schedule = self.network.schedule
        levels = schedule.levels(steps)
        hu = torch.as_tensor(np.asarray(context_hu, dtype=np.float32))
        x = hu_to_model(hu, self.window).to(self.device)
        x_end = x[:, 1:2]
        state, estimate = x_end, None
        for level, next_level in strict_zip(levels[:-1], levels[1:]):
            adjust_input = None if estimate is None else torch.cat([estimate, x_end], dim=1)
            estimate = self._predict(torch.cat([x[:, :1], state, x[:, 2:]], dim=1), level, adjust_input)
            state = schedule.step(state, estimate, x_end, level, next_level)
        middle = hu[:, 1]
        clipped = middle.clamp(self.window.low, self.window.high)
        return (model_to_window_hu(state[:, 0].float().cpu(), self.window) + (middle - clipped)).numpy()

    # ------------------------------------------------------------------ volumes
    def __call__(self, low_dose, steps: Optional[int] = None, slices: Optional[Sequence[int]] = None,
                 progress: Optional[Progress] = None):
        from ..io.volume import CTVolume

        if isinstance(low_dose, CTVolume):
            return self.enhance_volume(low_dose, steps=steps, slices=slices, progress=progress)
        array = np.asarray(low_dose)
        if array.ndim == 2:
            return self.enhance_array(array[None], steps, None, progress)[0]
        return self.enhance_array(array, steps, slices, progress)

    def enhance_array(self, low_dose_hu: np.ndarray, steps: Optional[int] = None,
                      slices: Optional[Sequence[int]] = None, progress: Optional[Progress] = None) -> np.ndarray:
        """(K, H, W) HU → float32 (K, H, W) HU; slices outside ``slices`` (default: all) are copied unchanged.

        Memory beyond input and output: one batch of slices and its tiles.
        """
        array = np.asarray(low_dose_hu)
        if array.ndim != 3:
            raise LCTfoundError(f"expected a (slices, rows, columns) HU array, got shape {array.shape}")
        if min(array.shape[1:]) < 8:
            raise LCTfoundError(f"slices of {array.shape[1]}×{array.shape[2]} pixels are too small to enhance")
        self.network.schedule.levels(steps)  # validate before any work
        indices = _check_slices(slices, array.shape[0])
        progress = ensure_progress(progress)
        output = array.astype(np.float32, copy=True)
        progress.update(0, len(indices), "starting")
        for first in range(0, len(indices), self.batch_size):
            progress.check_cancelled()
            batch = indices[first:first + self.batch_size]
            stacks = np.stack([context_slices(array, k) for k in batch]).astype(np.float32)
            output[batch] = self.enhance_batch(stacks, steps)
            progress.update(first + len(batch), len(indices), f"slice {batch[-1]}")
        return output

    def enhance_volume(self, volume, steps: Optional[int] = None, slices: Optional[Sequence[int]] = None,
                       progress: Optional[Progress] = None):
        """A NEW `CTVolume` on the input grid (float32 HU) whose metadata is its provenance."""
        from ..io.volume import CTVolume

        steps = self.steps if steps is None else int(steps)
        start = time.perf_counter()
        array = self.enhance_array(volume.array, steps, slices, progress)
        indices = _check_slices(slices, volume.shape[0])
        record = self.provenance(volume, steps, indices, time.perf_counter() - start)
        return CTVolume(array, volume.spacing, volume.origin, volume.direction.copy(), record)

    def provenance(self, volume, steps: int, indices: Sequence[int], seconds: float) -> dict[str, Any]:
        from .. import __version__

        source_name = _source_name(volume)
        return {
            "name": result_name(source_name, steps), "task": TASK, "method": "cold-diffusion",
            "steps": int(steps), "trained_steps": self.steps, "window": _window_name(self.window),
            "sampler": "cold-diffusion improved (x_t − D(x̂0, t) + D(x̂0, t−1))",
            "source": volume.metadata.get("source", source_name),
            "slices": "all" if len(indices) == volume.shape[0] else _ranges(indices),
            "seconds": round(float(seconds), 2), **self.model_provenance, "lctfound_version": __version__,
        }


def _check_slices(slices: Optional[Sequence[int]], count: int) -> list[int]:
    if slices is None:
        return list(range(count))
    indices = sorted({int(k) for k in slices})
    if not indices:
        raise LCTfoundError("no slices to process")
    if indices[0] < 0 or indices[-1] >= count:
        raise LCTfoundError(f"slice {indices[0] if indices[0] < 0 else indices[-1]} lies outside the volume "
                            f"(0..{count - 1})")
    return indices


def _ranges(indices: Sequence[int]) -> str:
    """[3, 4, 5, 9] → "3-5,9"."""
    parts, first = [], None
    for position, value in enumerate(indices):
        if first is None:
            first = value
        if position + 1 == len(indices) or indices[position + 1] != value + 1:
            parts.append(f"{first}-{value}" if value != first else str(value))
            first = None
    return ",".join(parts)


def _source_name(volume) -> str:
    from ..io.volume import volume_stem

    source = volume.metadata.get("source")
    return volume.metadata.get("name") or (volume_stem(source) if source else "volume")


__all__ = ["ColdDiffusionEnhancer", "ColdDiffusionNetwork", "ColdDiffusionSchedule", "ErrorModulation", "TASK",
           "context_slices", "hu_to_model", "model_to_window_hu", "open_task_model", "result_name"]

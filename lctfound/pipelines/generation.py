"""Synthetic CT slices from a prompt: fast sampling (DDIM or DPM-Solver++) with classifier-free guidance.

The official generator ran 1000 ancestral DDPM steps without guidance although 5 % of the
training prompts were null (reference §3); here the null prompt gives the unconditional
prediction ε_u and guidance mixes ε = ε_u + s·(ε_c − ε_u). ``guidance_scale=1`` is the plain
conditional model.

Seeds: image ``i`` of a run with ``seed`` starts from (and, for stochastic samplers, draws its
step noise from) its own generator seeded ``seed + i``, so an image does not depend on the batch
it was sampled in, and ``seed=s + i, num_images=1`` regenerates image ``i`` of a run with ``seed=s``.

Images are returned in [0, 1]; `images_to_volume` maps them back to HU with the inverse of the
fixed window mapping (``HU = low + unit × width``), as the training mapped the window to [0, 1].
The slices of a batch are independent samples, not a coherent 3D scan.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..errors import LCTfoundError
from ..models.bundle import LCTfoundModel
from ..models.conditioning import condition_prompt
from ..progress import Progress, ensure_progress
from ..windows import NULL_PROMPT, Window, get_window
from .choices import SAMPLERS

TASK = "synthetic-ct"


def make_sampler(model: LCTfoundModel, name: str):
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    config = model.scheduler.config
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm-solver":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
    if name == "ddpm":
        return DDPMScheduler.from_config(config)
    raise LCTfoundError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")


def load_diffusion_model(spec: str | Path = "default", device: str = "auto") -> LCTfoundModel:
    """`load_model` for the commands that sample the diffusion model (generation, DDNM), with a clear
    one-line refusal of other kinds of model folders: a task model (``task.json``), a folder whose
    ``config.json`` describes no diffusion U-Net (e.g. a CT-FM encoder), or a model without prompt
    vectors (an official-layout folder before `lctfound model add-prompts`)."""
    import json

    from ..devices import resolve_device
    from ..errors import CheckpointError
    from ..models import load_model, resolve_model
    from ..models.task_models import TASK_FILE

    folder = resolve_model(spec)
    if folder.is_dir() and (folder / TASK_FILE).is_file():
        try:
            task = json.loads((folder / TASK_FILE).read_text()).get("task", "unknown task")
        except (json.JSONDecodeError, AttributeError):
            task = "unknown task"
        raise CheckpointError(f"{spec}: is an LCTfound task model ({task}), not a diffusion model; "
                              "pass a backbone such as 'default'")
    config_path = folder / "config.json"
    if folder.is_dir() and not (folder / "unet" / "config.json").is_file() and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError:
            config = {}
        if not isinstance(config, dict) or "cross_attention_dim" not in config:
            raise CheckpointError(f"{spec}: config.json describes no diffusion U-Net (a CT-FM encoder or another "
                                  "network?); an LCTfound diffusion model is needed")
    model = load_model(folder, device=resolve_device(device))
    if model.condition_encoder is None:
        raise CheckpointError(f"{spec}: has no prompt vectors; cache them once with "
                              "`lctfound model add-prompts MODEL --bert BERT_FOLDER`")
    return model


class GenerationPipeline:
    """``pipeline(window="lung", num_images=4, steps=50, seed=0)`` → images (N, H, W) in [0, 1].

    ``prompt`` overrides the window/disease prompt with any prompt the model's conditioning knows
    (e.g. a prompt cached for the official BERT-conditioned model).
    """

    def __init__(self, model: LCTfoundModel, sampler: str = "ddim"):
        self.model = model
        self.sampler = sampler
        self.scheduler = make_sampler(model, sampler)

    @torch.no_grad()
    def __call__(self, window: str = "lung", disease: Optional[str] = None, num_images: int = 4, steps: int = 50,
                 guidance_scale: float = 1.0, seed: int = 0, size: Optional[int] = None, batch_size: int = 8,
                 progress: Optional[Progress] = None, prompt: Optional[str] = None) -> np.ndarray:
        from diffusers.utils.torch_utils import randn_tensor

        if num_images < 1 or steps < 1 or batch_size < 1:
            raise LCTfoundError("num_images, steps and batch_size must be at least 1")
        progress = ensure_progress(progress)
        unet = self.model.unet
        size = size or self.model.sample_size
        if size % 16:
            raise LCTfoundError(f"image size must be a multiple of 16, got {size}")
        prompt = prompt if prompt is not None else condition_prompt(window, disease)
        guided = guidance_scale != 1.0
        images = []
        total = num_images * steps
        for first in range(0, num_images, batch_size):
            count = min(batch_size, num_images - first)
            generators = [torch.Generator().manual_seed(seed + first + index) for index in range(count)]
            shape = (count, unet.config.in_channels, size, size)
            x = randn_tensor(shape, generator=generators, device=self.model.device, dtype=torch.float32)
            prompts = [prompt] * count + ([NULL_PROMPT] * count if guided else [])
            context = self.model.encode_prompts(prompts)
            self.scheduler.set_timesteps(steps)
            x = x * self.scheduler.init_noise_sigma
            for step, t in enumerate(self.scheduler.timesteps):
                progress.check_cancelled()
                model_input = torch.cat([x, x]) if guided else x
                model_input = self.scheduler.scale_model_input(model_input, t)
                eps = unet(model_input.to(unet.dtype), t, encoder_hidden_states=context).sample.float()
                if guided:
                    conditional, unconditional = eps.chunk(2)
                    eps = unconditional + guidance_scale * (conditional - unconditional)
                # A list of generators: each image draws its own step noise (batch-independent seeds).
                x = self.scheduler.step(eps, t, x, generator=generators if count > 1 else generators[0]).prev_sample
                progress.update(first * steps + (step + 1) * count, total, f"image {first + count}/{num_images}")
            images.append(((x.clamp(-1, 1) + 1) / 2).mean(dim=1).cpu())
        return torch.cat(images).numpy()

    def provenance(self, window: str | Window = "lung", disease: Optional[str] = None, num_images: int = 4,
                   steps: int = 50, guidance_scale: float = 1.0, seed: int = 0, size: Optional[int] = None,
                   prompt: Optional[str] = None) -> dict[str, Any]:
        """The record stored with generated images (keys as in `lctfound.io.provenance`)."""
        from .. import __version__
        from ..io.provenance import model_provenance

        window = get_window(window)
        window_name = window.name if window.name != "custom" else f"{window.width:g},{window.level:g}"
        return {
            "name": f"synthetic CT {window_name} seed {seed}", "task": TASK,
            "prompt": prompt if prompt is not None else condition_prompt(window, disease),
            "window": window_name, "window_width": window.width, "window_level": window.level,
            "disease": disease or "", "guidance_scale": guidance_scale, "sampler": self.sampler, "steps": steps,
            "seed": seed, "seeds": f"{seed}-{seed + num_images - 1}" if num_images > 1 else str(seed),
            "num_images": num_images, "size": size or self.model.sample_size, "intensity_mapping": "fixed",
            **model_provenance(self.model), "lctfound_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }


def images_to_volume(images: np.ndarray, window: str | Window, spacing: Sequence[float] = (1.0, 1.0, 1.0),
                     provenance: Optional[dict[str, Any]] = None):
    """Generated images (N, H, W) in [0, 1] → a NEW `CTVolume` in HU (the fixed mapping inverted).

    ``spacing`` is (i, j, k) in mm; the slices are stacked along k in generation order.
    """
    from ..io.volume import CTVolume

    window = get_window(window)
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise LCTfoundError(f"spacing must be three positive numbers (mm), got {spacing}")
    hu = np.clip(images, 0, 1).astype(np.float32) * np.float32(window.width) + np.float32(window.low)
    return CTVolume(hu, spacing, metadata=dict(provenance or {}))


def save_image_slices(images: np.ndarray, folder: str | Path, provenance: Optional[dict[str, Any]] = None,
                      prefix: str = "slice") -> Path:
    """Write (N, H, W) images in [0, 1] as one 8-bit PNG per slice (``slice_000.png`` ...) plus
    ``provenance.json`` into a NEW folder, published atomically (an existing folder is refused)."""
    import json

    from PIL import Image

    from ..atomic import atomic_directory

    folder = Path(folder)
    digits = max(3, len(str(len(images) - 1)))
    with atomic_directory(folder) as tmp:
        for index, image in enumerate(images):
            pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(tmp / f"{prefix}_{index:0{digits}d}.png", format="PNG")
        (tmp / "provenance.json").write_text(json.dumps(provenance or {}, indent=2, sort_keys=True,
                                                        default=str, ensure_ascii=False))
    return folder


#: PNG text-chunk key that holds a grid's provenance (JSON).
PNG_PROVENANCE_KEY = "lctfound-provenance"


def save_image_grid(images: np.ndarray, path, columns: int = 4, labels: Optional[list[str]] = None,
                    provenance: Optional[dict[str, Any]] = None) -> None:
    """Write (N, H, W) images in [0, 1] as one PNG grid, atomically; ``provenance`` goes into a PNG
    text chunk (``lctfound-provenance``, JSON)."""
    import json

    from PIL import Image, ImageDraw
    from PIL.PngImagePlugin import PngInfo

    from ..atomic import atomic_file

    count, height, width = images.shape
    columns = max(1, min(columns, count))
    rows = (count + columns - 1) // columns
    grid = Image.new("L", (columns * width, rows * height), 0)
    for index, image in enumerate(images):
        tile = Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8))
        if labels:
            ImageDraw.Draw(tile).text((3, 2), labels[index], fill=255)
        grid.paste(tile, ((index % columns) * width, (index // columns) * height))
    info = PngInfo()
    if provenance:
        info.add_text(PNG_PROVENANCE_KEY, json.dumps(provenance, default=str, ensure_ascii=False))
    with atomic_file(path) as tmp:
        grid.save(tmp, format="PNG", pnginfo=info)

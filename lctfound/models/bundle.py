"""Model folders: the official diffusers layout, plus our metadata, loaded with strict checks.

Layout (the official release is a `DDPMPipeline.save_pretrained` folder; ours adds the last
two entries)::

    model_index.json                       diffusers pipeline index (optional when loading)
    unet/config.json                       UNet2DConditionModel config
    unet/diffusion_pytorch_model.safetensors   weights, plain diffusers keys, no prefix
    scheduler/scheduler_config.json        DDPMScheduler (optional; official defaults otherwise)
    conditioning/...                       prompt cache or learned condition encoder
    lctfound.json                          metadata: preset, windows, conditioning, training-data
                                           fingerprint, versions, sha256 of every file

A path may also name the ``unet/`` folder itself (the official downstream code does), or a
Hugging Face repo id already in the local cache (loaded with ``local_files_only``).
Only safetensors are read: pickled ``.bin``/``.ckpt``/``.pt`` weights are refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .. import __version__
from ..atomic import atomic_directory
from ..errors import CheckpointError, LCTfoundError
from ..hashing import fingerprint, sha256_file  # noqa: F401  (re-exported for callers)
from ..windows import WINDOWS
from .conditioning import LearnedConditionEncoder, PromptCacheEncoder, condition_prompt
from .presets import PRESETS, build_unet, check_unet_config

METADATA_FILE = "lctfound.json"
FORMAT_VERSION = 1
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")


# --------------------------------------------------------------------------- locating

def locate_unet_folder(spec: str | Path) -> Path:
    """The folder holding ``config.json`` + weights for a model folder, a unet folder or a cached repo id."""
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_repo_id(str(spec)):
            path = _hf_cache_snapshot(str(spec))
        else:
            raise CheckpointError(f"{path}: no such model folder")
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickled weights are never loaded (unsafe); convert them to safetensors")
        raise CheckpointError(f"{path}: expected a model folder (with unet/config.json), got a file")
    for candidate in (path / "unet", path):
        if (candidate / "config.json").is_file():
            return candidate
    pickles = sorted(p.name for p in path.rglob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{path}: only pickled weights ({pickles[0]}) found; they are never loaded, use safetensors")
    raise CheckpointError(f"{path}: not a model folder (no unet/config.json)")


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _hf_cache_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # local_files_only: never contact the hub at run time (offline hospitals, reproducibility).
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # huggingface_hub raises several types for "not cached"
        raise CheckpointError(
            f"{repo_id}: not in the local Hugging Face cache ({type(error).__name__}); "
            "download it once on a connected machine or pass a local folder"
        ) from None


# --------------------------------------------------------------------------- checking

def read_unet_config(unet_folder: Path) -> dict[str, Any]:
    config_path = unet_folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a model config")
    class_name = config.get("_class_name", "UNet2DConditionModel")
    if class_name != "UNet2DConditionModel":
        raise CheckpointError(f"{config_path}: a {class_name} config, LCTfound needs a UNet2DConditionModel")
    check_unet_config(config, str(config_path))
    return config


def check_unet_weights(unet_folder: Path, config: dict[str, Any]) -> None:
    """Strictly compare the weight file's tensor names and shapes with the config's network.

    Reads only the safetensors header, so a 1.2 GB official file is checked in milliseconds;
    a truncated file fails here because the header promises more bytes than the file holds.
    """
    from safetensors import SafetensorError, safe_open

    weights = unet_folder / WEIGHTS_NAME
    if not weights.is_file():
        pickles = [p.name for p in unet_folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        hint = f" (found {pickles[0]}: pickled weights are never loaded, use safetensors)" if pickles else ""
        raise CheckpointError(f"{weights}: missing{hint}")
    expected = {name: tuple(t.shape) for name, t in build_unet(config, meta=True).state_dict().items()}
    try:
        with safe_open(str(weights), framework="pt") as handle:
            actual = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({_first_line(error)})") from None
    size = weights.stat().st_size
    missing = sorted(set(expected) - set(actual))
    unexpected = sorted(set(actual) - set(expected))
    if missing and not set(expected) & set(actual):
        raise CheckpointError(
            f"{weights}: none of its {len(actual)} tensors belongs to this U-Net (e.g. {next(iter(sorted(actual)), '-')}); "
            "a foreign file or a prefixed state dict"
        )
    if missing:
        raise CheckpointError(f"{weights}: {len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        raise CheckpointError(f"{weights}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]}")
    for name, shape in expected.items():
        if actual[name] != shape:
            raise CheckpointError(f"{weights}: tensor {name} has shape {actual[name]}, the config needs {shape}")
    if size == 0:
        raise CheckpointError(f"{weights}: empty file")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def verify_checksums(folder: Path, files: dict[str, str]) -> None:
    for relative, checksum in files.items():
        path = folder / relative
        if not path.is_file():
            raise CheckpointError(f"{path}: listed in {METADATA_FILE} but missing")
        actual = sha256_file(path)
        if actual != checksum:
            raise CheckpointError(f"{path}: sha256 {actual[:12]}… differs from {METADATA_FILE} ({checksum[:12]}…); the file is corrupt or was changed")


# --------------------------------------------------------------------------- the model

@dataclass
class LCTfoundModel:
    """A loaded backbone: U-Net, noise scheduler, condition encoder and metadata."""

    unet: Any
    scheduler: Any
    condition_encoder: Any = None
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def preset(self) -> str:
        return self.metadata.get("preset", "custom")

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: str | torch.device) -> "LCTfoundModel":
        self.unet.to(device)
        if isinstance(self.condition_encoder, torch.nn.Module):
            self.condition_encoder.to(device)
        return self

    def condition(self, window: str = "mediastinal", disease: Optional[str] = None, batch: int = 1) -> torch.Tensor:
        """(batch, 1, 768) condition vectors for a window/disease prompt, on the model's device."""
        if self.condition_encoder is None:
            raise LCTfoundError(
                f"model {self.path or self.preset} has no prompt vectors; cache them once with "
                "`lctfound model add-prompts MODEL --bert BERT_FOLDER`"
            )
        return self.encode_prompts([condition_prompt(window, disease)] * batch)

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        with torch.no_grad():
            vectors = self.condition_encoder.encode(list(prompts))
        return vectors.to(self.device, self.unet.dtype)


def new_model(preset: str, windows: Sequence[str] = tuple(WINDOWS), diseases: Sequence[str] = (),
              condition_dropout: float = 0.05, seed: Optional[int] = None,
              sample_size: Optional[int] = None) -> LCTfoundModel:
    """A randomly initialised model of a preset with a learned condition encoder (for pretraining).

    ``sample_size`` is the model's native input size (the preset's, 256, unless trained at another).
    """
    from ..scheduler import make_ddpm_scheduler

    if preset not in PRESETS:
        raise LCTfoundError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    if seed is not None:
        torch.manual_seed(seed)
    config = dict(PRESETS[preset].unet_config)
    if sample_size is not None:
        config["sample_size"] = int(sample_size)
    unet = build_unet(config)
    encoder = LearnedConditionEncoder(windows, diseases, dropout=condition_dropout)
    metadata = {"preset": preset, "windows": list(windows), "conditioning": {"type": "learned"}}
    return LCTfoundModel(unet, make_ddpm_scheduler(), encoder, metadata)


def save_model(model: LCTfoundModel, folder: str | Path, weights_dtype: torch.dtype = torch.float32,
               overwrite: bool = False, extra_metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` as a diffusers-layout folder plus ``lctfound.json``, atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        unet_dir = tmp / "unet"
        unet_dir.mkdir()
        model.unet.save_config(unet_dir)
        state = {name: tensor.detach().to("cpu", weights_dtype).contiguous()
                 for name, tensor in model.unet.state_dict().items()}
        save_file(state, str(unet_dir / WEIGHTS_NAME), metadata={"format": "pt"})
        model.scheduler.save_pretrained(tmp / "scheduler")
        (tmp / "model_index.json").write_text(json.dumps({
            "_class_name": "DDPMPipeline",
            "scheduler": ["diffusers", type(model.scheduler).__name__],
            "unet": ["diffusers", "UNet2DConditionModel"],
        }, indent=2))
        conditioning = dict(model.metadata.get("conditioning", {}))
        if model.condition_encoder is not None:
            (tmp / "conditioning").mkdir()
            if isinstance(model.condition_encoder, LearnedConditionEncoder):
                model.condition_encoder.save(tmp / "conditioning" / LearnedConditionEncoder.FILE)
                conditioning = {"type": "learned", **model.condition_encoder.config()}
            elif isinstance(model.condition_encoder, PromptCacheEncoder):
                model.condition_encoder.save(tmp / "conditioning" / PromptCacheEncoder.FILE)
                conditioning = {"type": "prompt-cache", "prompts": list(model.condition_encoder.table)}
        metadata = {
            **model.metadata,
            **(extra_metadata or {}),
            "format_version": FORMAT_VERSION,
            "conditioning": conditioning,
            "weights_dtype": str(weights_dtype).replace("torch.", ""),
            "lctfound_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        metadata["files"] = {
            str(path.relative_to(tmp)): sha256_file(path)
            for path in sorted(tmp.rglob("*")) if path.is_file()
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    model.path = folder
    model.metadata = metadata
    return folder


def read_metadata(root: Path) -> dict[str, Any]:
    path = root / METADATA_FILE
    if not path.is_file():
        return {}
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error.msg})") from None
    if not isinstance(metadata, dict) or metadata.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer LCTfound (format {metadata.get('format_version')}); upgrade lctfound")
    return metadata


def load_model(spec: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               verify_checksums_: bool = True) -> LCTfoundModel:
    """Load a model folder (ours or the official release) with strict key/shape checks.

    Raises `CheckpointError` with one line naming the file and the problem for: a missing
    folder or file, pickled weights, invalid config, truncated or foreign safetensors, a
    missing or unexpected tensor, a wrong shape, or a checksum mismatch.
    """
    from safetensors.torch import load_file

    from ..scheduler import make_ddpm_scheduler

    unet_folder = locate_unet_folder(spec)
    root = unet_folder.parent if unet_folder.name == "unet" else unet_folder
    metadata = read_metadata(root)
    if metadata and verify_checksums_:
        verify_checksums(root, metadata.get("files", {}))
    config = read_unet_config(unet_folder)
    check_unet_weights(unet_folder, config)
    unet = build_unet(config, meta=True)
    try:
        state = load_file(str(unet_folder / WEIGHTS_NAME))
    except Exception as error:  # safetensors raises its own error type for damaged data
        raise CheckpointError(f"{unet_folder / WEIGHTS_NAME}: cannot be read ({_first_line(error)})") from None
    unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    unet.to(device).eval()
    unet.requires_grad_(False)

    scheduler_config = root / "scheduler" / "scheduler_config.json"
    scheduler = load_scheduler(scheduler_config) if scheduler_config.is_file() else make_ddpm_scheduler()

    encoder = _load_condition_encoder(root, metadata)
    if isinstance(encoder, torch.nn.Module):
        encoder.to(device)
    if not metadata:
        metadata = {"preset": _match_preset(config), "source": "official-layout"}
    return LCTfoundModel(unet, scheduler, encoder, metadata, root)


def load_scheduler(config_path: Path):
    """The DDPM scheduler of a model folder; a config that does not load or gives an unusable noise
    schedule is refused in one line naming the file."""
    from diffusers import DDPMScheduler

    from ..validation import MAX_DIFFUSION_STEPS

    try:
        config = json.loads(config_path.read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
        steps = config.get("num_train_timesteps", MAX_DIFFUSION_STEPS)
        if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= MAX_DIFFUSION_STEPS:
            raise ValueError(f"num_train_timesteps {steps!r} must be from 1 to {MAX_DIFFUSION_STEPS}")
        scheduler = DDPMScheduler.from_pretrained(config_path.parent, local_files_only=True)
        alphas = scheduler.alphas_cumprod
        if not bool(torch.isfinite(alphas).all()) or not bool(((alphas > 0) & (alphas <= 1)).all()):
            raise ValueError("its noise schedule is not between 0 and 1 (check beta_start, beta_end, beta_schedule)")
    except Exception as error:  # noqa: BLE001 - diffusers raises many kinds for a bad config
        raise CheckpointError(f"{config_path}: not a usable DDPM scheduler config ({_first_line(error)})") from None
    return scheduler


def _load_condition_encoder(root: Path, metadata: dict[str, Any]):
    folder = root / "conditioning"
    learned = folder / LearnedConditionEncoder.FILE
    cache = folder / PromptCacheEncoder.FILE
    if learned.is_file():
        return LearnedConditionEncoder.load(learned)
    if cache.is_file():
        return PromptCacheEncoder.load(cache)
    if metadata.get("conditioning", {}).get("type") in ("learned", "prompt-cache"):
        raise CheckpointError(f"{folder}: conditioning files listed in {METADATA_FILE} are missing")
    return None


def _match_preset(config: dict[str, Any]) -> str:
    """Name of the preset whose architecture a config describes, or ``custom``."""
    def normal(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    keys = ("block_out_channels", "down_block_types", "up_block_types", "norm_num_groups",
            "cross_attention_dim", "layers_per_block", "mid_block_type", "encoder_hid_dim")
    for name, preset in PRESETS.items():
        if all(normal(config.get(key)) == normal(preset.unet_config[key]) for key in keys):
            return name
    return "custom"


def add_prompt_cache(spec: str | Path, bert_folder: str | Path, prompts: Sequence[str]) -> Path:
    """Encode ``prompts`` with a local BERT and store the vectors beside the model.

    After this the model needs no BERT at inference. Existing cached prompts are kept; the
    cache file is replaced atomically and ``lctfound.json`` (if any) records its checksum.
    """
    from ..atomic import atomic_file
    from .conditioning import BertPromptEncoder

    root = locate_unet_folder(spec)
    root = root.parent if root.name == "unet" else root
    metadata = read_metadata(root)
    if metadata.get("conditioning", {}).get("type") == "learned":
        raise LCTfoundError(f"{root}: this model uses learned condition embeddings, not BERT prompts")
    cache_path = root / "conditioning" / PromptCacheEncoder.FILE
    table = dict(PromptCacheEncoder.load(cache_path).table) if cache_path.is_file() else {}
    table.update(PromptCacheEncoder.build(BertPromptEncoder(bert_folder), prompts).table)
    cache_path.parent.mkdir(exist_ok=True)
    with atomic_file(cache_path) as tmp:
        PromptCacheEncoder(table).save(tmp)
    if metadata:
        metadata.setdefault("files", {})[str(cache_path.relative_to(root))] = sha256_file(cache_path)
        metadata["conditioning"] = {"type": "prompt-cache", "prompts": list(table)}
        with atomic_file(root / METADATA_FILE) as tmp:
            tmp.write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    return cache_path

"""CT-FM encoder: MONAI ``SegResEncoder`` in CT-FM's configuration, loaded strictly from safetensors.

Folder layout (the published Hugging Face layout of ``project-lighter/ct_fm_feature_extractor``;
our own folders add the last entry, which loading never needs)::

    config.json         {"blocks_down": [1,2,2,4,4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}
    model.safetensors   encoder tensors, unprefixed keys (conv_init.weight, layers.0.blocks.0.conv1.weight, ...)
    lctfound.json       our metadata: backbone, sha256 of the files, versions

A model spec is such a folder, a ``.safetensors`` file, or a Hugging Face repo id already in the
local cache (never downloaded). Prefixed state dicts are accepted: ``encoder.`` (the
``ct_fm_segresnet`` / ``whole_body_segmentation`` repos), ``model.backbone.`` (Lightning),
``backbone.`` and ``trunk.encoder.``; decoder / projection-head tensors beside them are dropped.
Every encoder tensor must be present with its exact shape, BatchNorm running statistics included
(they are used: the encoder always runs in eval mode). Pickled weights are never loaded.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from ..atomic import atomic_directory
from ..errors import CheckpointError
from ..hashing import sha256_file
from ..models.bundle import METADATA_FILE  # one metadata file name for every model folder
from .layout import CONFIG_NAME, WEIGHTS_NAME  # the published layout's file names (light: the server reads them)

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".torch")

# CT-FM's encoder configuration (config.json of project-lighter/ct_fm_feature_extractor).
CTFM_CONFIG: dict[str, Any] = {"blocks_down": [1, 2, 2, 4, 4], "in_channels": 1, "init_filters": 32, "spatial_dims": 3}
HF_REPO_FEATURE_EXTRACTOR = "project-lighter/ct_fm_feature_extractor"
HF_REPO_SEGRESNET = "project-lighter/ct_fm_segresnet"
# Reference numbers for the full encoder (see the CT-FM reference, section 1.1 / 1.4).
REFERENCE_PARAMETERS = 77_760_992
REFERENCE_TENSORS = 161
REFERENCE_FILE_BYTES = 311_116_176
EMBEDDING_DIM = 512

# Key prefixes of published and internal checkpoints, tried in this order.
PREFIXES = ("", "encoder.", "model.backbone.", "backbone.", "trunk.encoder.")
# Tensors that belong to heads around the encoder; dropped when only the encoder is loaded.
DROPPABLE = re.compile(r"^(?:model\.|trunk\.)?(?:up_layers|projection_head|head|decoder)\.")
# config.json keys: the encoder's own, and SegResNetDS keys that only describe the decoder.
ENCODER_KEYS = ("spatial_dims", "in_channels", "init_filters", "blocks_down")
DECODER_KEYS = ("out_channels", "dsdepth", "blocks_up", "upsample_mode", "resolution", "preprocess",
                "anisotropic_scales")
FIXED_KEYS = {"norm": "batch", "act": "relu"}  # accepted only with CT-FM's values


# --------------------------------------------------------------------------- config and network

def check_config(config: Any, source: str = "config") -> dict[str, Any]:
    """Validate a CT-FM/SegResEncoder config and return the encoder arguments (defaults: CT-FM's)."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: not a model config (a JSON object is needed)")
    unknown = sorted(set(config) - set(ENCODER_KEYS) - set(DECODER_KEYS) - set(FIXED_KEYS) - {"_class_name"})
    if unknown:
        raise CheckpointError(f"{source}: unknown key {unknown[0]!r}; not a SegResEncoder/SegResNetDS config")
    for key, value in FIXED_KEYS.items():
        if key in config and str(config[key]).lower() != value:
            raise CheckpointError(f"{source}: {key}={config[key]!r}; CT-FM needs {key}={value!r} "
                                  "(its BatchNorm running statistics are part of the model)")
    if config.get("anisotropic_scales"):
        raise CheckpointError(f"{source}: anisotropic_scales is not supported (CT-FM uses isotropic kernels)")
    arguments = {key: config.get(key, CTFM_CONFIG[key]) for key in ENCODER_KEYS}
    try:
        arguments["spatial_dims"] = int(arguments["spatial_dims"])
        arguments["in_channels"] = int(arguments["in_channels"])
        arguments["init_filters"] = int(arguments["init_filters"])
        arguments["blocks_down"] = [int(n) for n in arguments["blocks_down"]]
    except (TypeError, ValueError):
        raise CheckpointError(f"{source}: spatial_dims, in_channels, init_filters and blocks_down must be "
                              "integers") from None
    if arguments["spatial_dims"] != 3:
        raise CheckpointError(f"{source}: spatial_dims={arguments['spatial_dims']}; CT-FM is a 3D encoder")
    if arguments["in_channels"] != 1 or arguments["init_filters"] < 1 or not arguments["blocks_down"] \
            or min(arguments["blocks_down"]) < 1:
        raise CheckpointError(f"{source}: needs in_channels=1, init_filters>=1 and blocks_down of positive counts")
    return arguments


def build_encoder(config: Optional[dict[str, Any]] = None, meta: bool = False) -> torch.nn.Module:
    """A MONAI ``SegResEncoder`` (BatchNorm, ReLU, all five maps returned); ``meta`` allocates nothing."""
    from monai.networks.nets.segresnet_ds import SegResEncoder

    arguments = check_config(dict(CTFM_CONFIG if config is None else config))
    with torch.device("meta") if meta else _no_context():
        return SegResEncoder(spatial_dims=arguments["spatial_dims"], in_channels=arguments["in_channels"],
                             init_filters=arguments["init_filters"], blocks_down=tuple(arguments["blocks_down"]),
                             norm="batch", act="relu", head_module=None)


class _no_context:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def expected_tensors(config: Optional[dict[str, Any]] = None) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Encoder state-dict entries (name → (shape, dtype)), derived on the meta device."""
    return {name: (tuple(t.shape), t.dtype) for name, t in build_encoder(config, meta=True).state_dict().items()}


def parameter_count(config: Optional[dict[str, Any]] = None) -> int:
    return sum(p.numel() for p in build_encoder(config, meta=True).parameters())


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.int64: "I64", torch.int32: "I32", torch.uint8: "U8", torch.bool: "BOOL"}


def safetensors_size(tensors: dict[str, tuple[tuple[int, ...], torch.dtype]],
                     metadata: Optional[dict[str, str]] = None) -> int:
    """Exact byte size of the safetensors file holding ``tensors``, computed without allocating them.

    Mirrors the format: an 8-byte header length, a compact JSON header (``__metadata__`` first,
    tensors ordered by decreasing element size, then name) padded with spaces to 8 bytes, then
    the raw data.
    """
    order = sorted(tensors.items(), key=lambda item: (-_element_size(item[1][1]), item[0]))
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (shape, dtype) in order:
        nbytes = _element_size(dtype) * int(torch.Size(shape).numel())
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype, device="meta").element_size()


# --------------------------------------------------------------------------- locating and checking files

def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "/", "~"))


def _hf_cache_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # local_files_only: the hub is never contacted at run time
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as error:  # huggingface_hub raises several types for "not cached"
        raise CheckpointError(f"{repo_id}: not a folder and not in the local Hugging Face cache "
                              f"({type(error).__name__}); download it once on a connected machine "
                              "(huggingface-cli download) or pass the local folder") from None


def locate_weights(spec: str | Path) -> tuple[Path, Optional[Path]]:
    """``(weights file, config file or None)`` for a CT-FM folder, a safetensors file or a cached repo id."""
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_repo_id(str(spec)):
            path = _hf_cache_snapshot(str(spec))
        else:
            raise CheckpointError(f"{path}: no such model folder or file")
    if path.is_file():
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pickled weights are never loaded (unsafe); convert them to safetensors")
        if path.suffix.lower() != ".safetensors":
            raise CheckpointError(f"{path}: expected a CT-FM model folder or a .safetensors file")
        config = path.parent / CONFIG_NAME
        return path, config if config.is_file() else None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        others = sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors")
        pickles = sorted(p.name for p in path.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if len(others) == 1:
            weights = path / others[0]
        elif pickles:
            raise CheckpointError(f"{path}: only pickled weights ({pickles[0]}) found; they are never loaded, "
                                  "use safetensors")
        else:
            raise CheckpointError(f"{path}: not a CT-FM model folder (no {WEIGHTS_NAME})")
    config = path / CONFIG_NAME
    return weights, config if config.is_file() else None


def read_config(config_path: Optional[Path]) -> dict[str, Any]:
    if config_path is None:
        return dict(CTFM_CONFIG)
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path}: not valid JSON ({error.msg} at line {error.lineno})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{config_path}: cannot be read ({error})") from None
    return check_config(config, str(config_path))


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def read_header(weights: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Tensor names → (shape, dtype name) from the safetensors header only (fast; detects truncation)."""
    from safetensors import SafetensorError, safe_open

    if weights.stat().st_size == 0:
        raise CheckpointError(f"{weights}: empty file")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            result = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                result[name] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
            return result
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{weights}: not a readable safetensors file ({_first_line(error)}); "
                              "truncated, damaged or not safetensors") from None


def match_keys(actual: dict[str, tuple[tuple[int, ...], Any]], expected: dict[str, tuple[tuple[int, ...], Any]],
               source: str) -> str:
    """The key prefix under which ``actual`` holds exactly the ``expected`` encoder tensors.

    Raises a one-line `CheckpointError` for a foreign file, missing or unexpected tensors, or
    a wrong shape. Tensors of heads around the encoder (decoder, projection head) are allowed.
    """
    best, best_hits = "", -1
    for prefix in PREFIXES:
        hits = sum(1 for name in expected if prefix + name in actual)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if best_hits == 0:
        example = next(iter(sorted(actual)), "-")
        raise CheckpointError(f"{source}: none of its {len(actual)} tensors belongs to a CT-FM/SegResEncoder "
                              f"encoder (e.g. {example}); a foreign file")
    missing = [name for name in expected if best + name not in actual]
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} encoder tensor(s) missing, e.g. {best + missing[0]} "
                              f"(is the config right? {len(expected)} tensors expected)")
    unexpected = sorted(name for name in actual
                        if not (name.startswith(best) and name[len(best):] in expected) and not DROPPABLE.match(name))
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]} "
                              "(a different architecture or config)")
    for name, (shape, _) in expected.items():
        if tuple(actual[best + name][0]) != tuple(shape):
            raise CheckpointError(f"{source}: tensor {best + name} has shape {list(actual[best + name][0])}, "
                                  f"the config needs {list(shape)}")
    return best


# --------------------------------------------------------------------------- the model

@dataclass
class CTFMModel:
    """A loaded CT-FM encoder (eval mode, frozen) with its config and metadata."""

    encoder: torch.nn.Module
    config: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    path: Optional[Path] = None

    @property
    def embedding_dim(self) -> int:
        return int(self.config["init_filters"]) * 2 ** (len(self.config["blocks_down"]) - 1)

    @property
    def stages(self) -> int:
        return len(self.config["blocks_down"])

    @property
    def total_stride(self) -> int:
        return 2 ** (self.stages - 1)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    @property
    def weights_sha256(self) -> str:
        return str(self.metadata.get("weights_sha256", ""))

    def to(self, device: str | torch.device) -> "CTFMModel":
        self.encoder.to(device)
        return self

    def parameters_count(self) -> int:
        return sum(p.numel() for p in self.encoder.parameters())


def new_model(config: Optional[dict[str, Any]] = None, seed: Optional[int] = None) -> CTFMModel:
    """A randomly initialised encoder (tests, benchmarks, or the start of training)."""
    arguments = check_config(dict(CTFM_CONFIG if config is None else config))
    if seed is not None:
        torch.manual_seed(seed)
    encoder = build_encoder(arguments)
    encoder.eval().requires_grad_(False)
    return CTFMModel(encoder, arguments, {"source": "random-init"})


def save_model(model: CTFMModel, folder: str | Path, overwrite: bool = False,
               extra_metadata: Optional[dict[str, Any]] = None) -> Path:
    """Write ``model`` in the published layout (byte-compatible ``config.json`` + ``model.safetensors``).

    The weights file has no safetensors metadata and unprefixed float32 keys, like the published
    file; ``lctfound.json`` (never needed to load) records the backbone, checksums and versions.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_directory(folder, overwrite=overwrite) as tmp:
        (tmp / CONFIG_NAME).write_text(json.dumps(model.config, sort_keys=True, indent=2))
        state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.encoder.state_dict().items()}
        state = {name: t.float() if t.is_floating_point() else t for name, t in state.items()}
        save_file(state, str(tmp / WEIGHTS_NAME))
        metadata = {
            **{k: v for k, v in model.metadata.items() if k not in ("files", "weights_sha256", "path")},
            **(extra_metadata or {}),
            "backbone": "ctfm",
            "format": "huggingface model_hub_mixin layout (SegResEncoder)",
            "lctfound_version": __version__,
            "torch_version": torch.__version__,
            "python_version": platform.python_version(),
            "saved": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": {name: sha256_file(tmp / name) for name in (CONFIG_NAME, WEIGHTS_NAME)},
        }
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=2, ensure_ascii=False))
    model.path = folder
    model.metadata = {**metadata, "weights_sha256": metadata["files"][WEIGHTS_NAME]}
    return folder


def _read_our_metadata(folder: Path) -> dict[str, Any]:
    from ..models.bundle import read_metadata

    metadata = read_metadata(folder)
    if metadata.get("backbone", "ctfm") != "ctfm":
        raise CheckpointError(f"{folder}: an LCTfound {metadata.get('backbone')} model, not a CT-FM encoder")
    return metadata


def inspect_model(spec: str | Path) -> dict[str, Any]:
    """Strictly check a CT-FM model (header only, no weights loaded) and describe it."""
    weights, config_path = locate_weights(spec)
    config = read_config(config_path)
    expected = expected_tensors(config)
    actual = read_header(weights)
    prefix = match_keys(actual, expected, str(weights))
    shapes = {name: shape for name, (shape, _) in expected.items()}
    parameters = sum(int(torch.Size(shape).numel()) for name, shape in shapes.items()
                     if not name.endswith(("running_mean", "running_var", "num_batches_tracked")))
    bn_stats = sum(1 for name in expected if name.endswith(("running_mean", "running_var")))
    dropped = sorted(name for name in actual if not (name.startswith(prefix) and name[len(prefix):] in expected))
    dtypes = sorted({actual[prefix + name][1] for name in expected})
    return {
        "weights": str(weights),
        "config": config,
        "config_file": str(config_path) if config_path else None,
        "key_prefix": prefix,
        "encoder_tensors": len(expected),
        "dropped_tensors": len(dropped),
        "parameters": parameters,
        "batchnorm_statistics": bn_stats,
        "dtypes": dtypes,
        "embedding_dim": int(config["init_filters"]) * 2 ** (len(config["blocks_down"]) - 1),
        "file_bytes": weights.stat().st_size,
        "published_layout_bytes": safetensors_size(expected),
        "is_ctfm_architecture": config == check_config(dict(CTFM_CONFIG)),
    }


def load_model(spec: str | Path, device: str | torch.device = "cpu", verify_checksums: bool = True) -> CTFMModel:
    """Load a CT-FM encoder strictly (see the module docstring); eval mode, gradients off.

    Raises a one-line `CheckpointError` for a missing folder or file, pickled weights, a bad
    config, a truncated or foreign file, missing/unexpected tensors, a wrong shape, or a file
    that no longer matches the checksum in ``lctfound.json``.
    """
    from safetensors.torch import load_file

    weights, config_path = locate_weights(spec)
    folder = weights.parent
    ours = _read_our_metadata(folder)
    if ours and verify_checksums:
        for name, checksum in ours.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise CheckpointError(f"{path}: listed in {METADATA_FILE} but missing")
            if name == weights.name or name == CONFIG_NAME:
                actual = sha256_file(path)
                if actual != checksum:
                    raise CheckpointError(f"{path}: sha256 {actual[:12]}… differs from {METADATA_FILE} "
                                          f"({checksum[:12]}…); the file is corrupt or was changed")
    config = read_config(config_path)
    expected = expected_tensors(config)
    prefix = match_keys(read_header(weights), expected, str(weights))
    try:
        state = load_file(str(weights))
    except Exception as error:  # safetensors raises its own type for damaged data
        raise CheckpointError(f"{weights}: cannot be read ({_first_line(error)})") from None
    state = {name: state[prefix + name].to(dtype) for name, (_, dtype) in expected.items()}
    encoder = build_encoder(config, meta=True)
    encoder.load_state_dict(state, strict=True, assign=True)
    encoder.to(device).eval().requires_grad_(False)
    metadata = {**ours, "key_prefix": prefix,
                "weights_sha256": (ours.get("files", {}).get(weights.name) if ours else None) or sha256_file(weights)}
    return CTFMModel(encoder, config, metadata, folder if weights.name == WEIGHTS_NAME else weights)


def encode(encoder: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The encoder's five feature maps (strides 1..16) for ``x`` of shape [B, 1, D, H, W]."""
    with torch.inference_mode():
        return encoder(x)


def embed_tensor(encoder: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """[B, 512] embeddings: the global average pool of the last stage (CT-FM's embedding)."""
    return encode(encoder, x)[-1].float().mean(dim=(2, 3, 4))


def list_ctfm_models(extra_folders: Any = ()) -> list[Any]:
    """CT-FM encoders found here: the given folders (Slicer settings, command-line paths) and the
    published repos already in the local Hugging Face cache (never downloaded). Entries are
    `lctfound.models.registry.ModelEntry` (preset ``ctfm``); folders that fail the strict
    header check are skipped (loading them by path explains why)."""
    from ..models.registry import ModelEntry

    entries = []
    for folder in extra_folders:
        path = Path(folder).expanduser()
        try:
            info = inspect_model(path)
        except CheckpointError:
            continue
        size = "" if info["is_ctfm_architecture"] else f", init_filters {info['config']['init_filters']}"
        entries.append(ModelEntry(path.name, path, "folder", "ctfm",
                                  f"CT-FM encoder, {info['parameters']:,} parameters{size}"))
    for repo in (HF_REPO_FEATURE_EXTRACTOR, HF_REPO_SEGRESNET):
        try:
            path = _hf_cache_snapshot(repo)
            inspect_model(path)
        except CheckpointError:
            continue
        entries.append(ModelEntry(repo, path, "official", "ctfm", f"{repo} (local Hugging Face cache)"))
    return entries

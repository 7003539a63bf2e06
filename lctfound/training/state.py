"""Training state on disk without pickle: tensors in safetensors, structure in JSON.

An optimizer's ``state_dict`` is a nest of dicts, lists, numbers and tensors. It is split
into a flat ``{path: tensor}`` safetensors file and a JSON skeleton in which each tensor is
replaced by a reference to its path, so resuming never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

_TENSOR = "__tensor__"


def _flatten(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[path] = value.detach().to("cpu").contiguous()
        return {_TENSOR: path}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(k, f"{path}/k{i}", tensors), _flatten(v, f"{path}/{i}", tensors)]
                             for i, (k, v) in enumerate(value.items())]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} at {path}")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if "__dict__" in value:
            return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            items = [_unflatten(v, tensors) for v in value["__list__"]]
            return tuple(items) if value.get("tuple") else items
    return value


def save_state_dict(state: dict, folder: Path, name: str) -> None:
    """Write ``state`` as ``name.safetensors`` + ``name.json`` in ``folder``."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "s", tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state_dict(folder: Path, name: str) -> dict:
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / f"{name}.safetensors"))
        skeleton = json.loads((folder / f"{name}.json").read_text())
    except Exception as error:  # missing, truncated or damaged: one clear line
        raise CheckpointError(f"{folder}/{name}: training state cannot be read ({' '.join(str(error).split())[:160]})") from None
    return _unflatten(skeleton, tensors)

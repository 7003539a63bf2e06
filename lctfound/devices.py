"""Compute devices: what is available, and how to pick one from a user's choice."""

from __future__ import annotations

from .errors import LCTfoundError


def available_devices() -> list[str]:
    """Device names usable here, best first: ``cuda``, ``cuda:1``…, ``mps``, then ``cpu``."""
    import torch

    names: list[str] = []
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        names.extend(["cuda"] + [f"cuda:{index}" for index in range(1, count)])
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        names.append("mps")
    names.append("cpu")
    return names


def resolve_device(choice: str | None = "auto"):
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` into a `torch.device`, or fail clearly."""
    import torch

    choice = (choice or "auto").strip().lower()
    available = available_devices()
    if choice == "auto":
        return torch.device(available[0])
    base = choice.split(":")[0]
    if base not in ("cpu", "cuda", "mps"):
        raise LCTfoundError(f"unknown device {choice!r}; choose one of: auto, {', '.join(available)}")
    if choice != "cpu" and choice not in available and not (base == "cuda" and choice == "cuda:0" and "cuda" in available):
        raise LCTfoundError(f"device {choice!r} is not available here; available: {', '.join(available)}")
    return torch.device(choice)

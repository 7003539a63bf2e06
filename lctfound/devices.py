"""Compute devices: what is available, and how to pick one from a user's choice."""

from __future__ import annotations

import os
from typing import Any, Optional

from .errors import LCTfoundError

#: Environment variables that bound the CPU threads of torch's and NumPy's math libraries; set by
#: `set_threads` so that child jobs started from this process use the same number.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# The device a run's work was put on (the last `resolve_device` answer) and the backbone's forward
# precision there (the last `resolve_precision` answer), for its provenance.
_run_device: Optional[str] = None
_run_precision: Optional[str] = None


def cpu_count() -> int:
    """CPU cores this process may use (its affinity where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def set_threads(threads: Optional[int] = None) -> int:
    """Use ``threads`` CPU threads (default: every core) for torch in this process and, through
    `THREAD_VARIABLES`, for child processes. Returns the number set."""
    import sys

    explicit = bool(threads)
    if not threads and os.environ.get("OMP_NUM_THREADS", "").strip().isdigit():
        threads = int(os.environ["OMP_NUM_THREADS"])  # the user's own setting stands unless --threads
    count = int(threads) if threads else cpu_count()
    for name in THREAD_VARIABLES:
        os.environ[name] = str(count)
    # Otherwise torch reads OMP_NUM_THREADS when first imported (and a thin `--server` client never imports it).
    if "torch" in sys.modules or explicit:
        import torch

        torch.set_num_threads(count)
    return count


def compute_settings() -> dict[str, Any]:
    """What a run computed on, for its provenance: the device and the number of CPU threads."""
    import sys

    if "torch" in sys.modules:
        threads = sys.modules["torch"].get_num_threads()
    else:
        threads = int(os.environ.get("OMP_NUM_THREADS") or cpu_count())
    settings = {"device": _run_device or "cpu", "threads": threads}
    if _run_precision is not None:
        settings["precision"] = _run_precision
    return settings


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
    """Turn ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N`` / ``mps`` into a `torch.device`, or fail clearly
    (and remember it for the run's provenance, `compute_settings`)."""
    device = _resolve(choice)
    global _run_device
    _run_device = str(device)
    return device


def _resolve(choice: str | None):
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


#: Forward precision of the frozen backbone (features, few-shot prediction): ``auto`` (bf16 autocast
#: on CUDA, fp32 on CPUs and MPS; see `resolve_precision`), ``fp32`` or ``bf16``; the variable sets it.
PRECISIONS = ("auto", "fp32", "bf16")
PRECISION_VARIABLE = "LCTFOUND_PRECISION"


_warned: set = set()


def _warn_once(message: str) -> None:
    import logging

    if message not in _warned:
        _warned.add(message)
        logging.getLogger(__name__).warning(message)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AMX or AVX-512 BF16). Without it, bf16 is
    emulated: ~90× slower than fp32 (benchmarks/RESULTS.md, "Official features on the CPU")."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    found = capabilities()
    return bool(found.get("amx_bf16") or found.get("avx512_bf16"))


def resolve_precision(device, choice: Optional[str] = None) -> str:
    """``fp32`` or ``bf16`` for frozen-backbone forwards on ``device`` (a `torch.device`).

    ``choice`` (default: $LCTFOUND_PRECISION, else ``auto``): ``auto`` is bf16 autocast on CUDA devices
    that support it (as the original code ran reduced precision on GPUs) and fp32 on CPUs and MPS:
    bf16 changes the official features by ~2 % (relative), over the 1 % a CPU default may cost, and
    is only faster on CPUs with native bf16 (`cpu_has_native_bf16`); there ``bf16`` is an opt-in."""
    import torch

    choice = (choice or os.environ.get(PRECISION_VARIABLE) or "auto").strip().lower()
    if choice not in PRECISIONS:
        raise LCTfoundError(f"unknown precision {choice!r} (from {PRECISION_VARIABLE} or the caller); choose one "
                            f"of: {', '.join(PRECISIONS)}")
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    elif choice == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_once("bf16 on this CPU is emulated (no AMX or AVX-512 BF16): expect it ~90× slower than fp32; "
                   f"unset {PRECISION_VARIABLE} to run fp32")
    global _run_precision
    _run_precision = choice
    return choice

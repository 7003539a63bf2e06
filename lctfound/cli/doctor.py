"""``lctfound doctor``: what this installation has and can do."""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import platform


PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "monai", "SimpleITK", "safetensors",
            "numpy", "slicer-core")


def register(subparsers) -> None:
    parser = subparsers.add_parser("doctor", help="versions, devices, cache and models found",
                                   description="Report versions, compute devices, the cache and the models found.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    parser.set_defaults(func=run)


def collect() -> dict:
    import torch

    from .. import __version__
    from ..devices import available_devices
    from ..io.sample_data import verify_sample
    from ..models import list_models
    from ..cache import usage
    from ..paths import cache_root

    versions = {"lctfound": __version__, "python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    devices = {"available": available_devices(), "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        devices["cuda"] = [
            {"name": torch.cuda.get_device_name(i),
             "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
             "bf16": torch.cuda.is_bf16_supported()}
            for i in range(torch.cuda.device_count())
        ]
    return {
        "versions": versions,
        "devices": devices,
        "cache": {"root": str(cache_root()), "sample_data": _sample_status(verify_sample()),
                  "features": _feature_cache(usage())},
        "models": [{"name": e.name, "source": e.source, "preset": e.preset, "path": str(e.path)}
                   for e in list_models()],
    }


def _feature_cache(found) -> dict:
    return {"root": str(found.root), "size": found.size, "limit": found.limit, "entries": found.entries}


def _sample_status(problems: list[str]) -> str:
    if not problems:
        return "present, checksums verified"
    return f"missing or damaged: {', '.join(problems)} (run `lctfound data fetch-sample`)"


def run(args: argparse.Namespace) -> int:
    from ..features import human_bytes

    report = collect()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print("versions:")
    for name, version in report["versions"].items():
        print(f"  {name}: {version}")
    print(f"devices: {', '.join(report['devices']['available'])} "
          f"(CPU threads: {report['devices']['cpu_threads']})")
    for gpu in report["devices"].get("cuda", []):
        print(f"  {gpu['name']}: {gpu['memory_gb']} GB, bf16 {'yes' if gpu['bf16'] else 'no'}")
    print(f"cache: {report['cache']['root']}")
    print(f"  sample data: {report['cache']['sample_data']}")
    features = report["cache"]["features"]
    print(f"  feature cache: {features['root']}: {human_bytes(features['size'])} in {features['entries']} entries, "
          f"limit {human_bytes(features['limit'])} (set LCTFOUND_FEATURE_CACHE_LIMIT to change it)")
    print("models:" if report["models"] else "models: none found")
    for model in report["models"]:
        print(f"  {model['name']} ({model['source']}, {model['preset']}): {model['path']}")
    return 0

"""``lctfound model``: inspect, list and prepare models."""

from __future__ import annotations

import argparse
import json

from ..errors import LCTfoundError
from ..windows import NULL_PROMPT, WINDOWS


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="inspect, list and prepare models",
                                   description="Inspect, list and prepare LCTfound models.")
    commands = parser.add_subparsers(dest="model_command", metavar="SUBCOMMAND")
    commands.required = True

    inspect = commands.add_parser(
        "inspect", help="architecture, counts, metadata and checks of a model or preset",
        description="Load a model folder with strict checks (or build a preset) and print what it is.")
    source = inspect.add_mutually_exclusive_group(required=True)
    source.add_argument("model", nargs="?", help="model name, folder, or cached Hugging Face repo id")
    source.add_argument("--config", metavar="PRESET", help="build a preset instead (official, cpu-base, cpu-tiny)")
    inspect.add_argument("--meta", action="store_true",
                         help="with --config: build on PyTorch's meta device (no memory for weights)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of text")
    inspect.set_defaults(func=run_inspect)

    listing = commands.add_parser("list", help="models found (embedded, user, official, folders)",
                                  description="List the models every LCTfound front end can use.")
    listing.add_argument("--folder", action="append", default=[], help="also look at this model folder")
    listing.set_defaults(func=run_list)

    prompts = commands.add_parser(
        "add-prompts", help="cache BERT prompt vectors beside a model so inference needs no BERT",
        description="Encode prompts with a local BERT folder and store the 768-d vectors in "
                    "MODEL/conditioning/prompt_cache.safetensors (the official model needs this once).")
    prompts.add_argument("model", help="model folder (e.g. the official release)")
    prompts.add_argument("--bert", required=True, help="local BERT folder (config.json, vocab.txt, weights)")
    prompts.add_argument("--prompt", action="append", default=[],
                         help="prompt to add (repeatable); default: the lung and mediastinal window "
                              f"prompts and the null prompt {NULL_PROMPT!r}")
    prompts.set_defaults(func=run_add_prompts)


def run_inspect(args: argparse.Namespace) -> int:
    from ..models.presets import build_unet, describe_unet, get_preset

    if args.config:
        preset = get_preset(args.config)
        unet = build_unet(preset.name, meta=args.meta)
        info = {"preset": preset.name, "description": preset.description, **describe_unet(unet),
                "feature_channels": preset.feature_channels, "device": "meta" if args.meta else "cpu"}
    else:
        if args.meta:
            raise LCTfoundError("--meta goes with --config; a model folder is loaded with its weights")
        from ..models import load_model, resolve_model

        model = load_model(resolve_model(args.model))
        metadata = {k: v for k, v in model.metadata.items() if k != "files"}
        info = {"path": str(model.path), "preset": model.preset, **describe_unet(model.unet),
                "dtype": str(model.unet.dtype).replace("torch.", ""),
                "conditioning": type(model.condition_encoder).__name__ if model.condition_encoder else "none (add prompts)",
                "files_verified": len(model.metadata.get("files", {})), "metadata": metadata}
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        for key, value in info.items():
            print(f"{key}: {json.dumps(value, default=str) if isinstance(value, (dict, list)) else value}")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..models import list_models

    entries = list_models(args.folder)
    if not entries:
        print("no models found")
        return 0
    width = max(len(entry.name) for entry in entries)
    for entry in entries:
        print(f"{entry.name:<{width}}  {entry.source:<8}  {entry.preset:<9}  {entry.path}")
    return 0


def run_add_prompts(args: argparse.Namespace) -> int:
    from ..models import add_prompt_cache, resolve_model

    prompts = args.prompt or [window.prompt() for window in WINDOWS.values()] + [NULL_PROMPT]
    from ..atomic import check_writable, refuse_input_conflict

    folder = resolve_model(args.model)
    # The BERT folder is read, never written: it must not be the conditioning folder that is updated.
    refuse_input_conflict(folder / "conditioning", [args.bert], replaces_folder=True)
    check_writable(folder / "conditioning" / "prompt_cache.safetensors")  # before BERT is loaded
    path = add_prompt_cache(folder, args.bert, prompts)
    print(f"cached {len(prompts)} prompt vector(s) in {path}")
    return 0

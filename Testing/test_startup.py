"""Start-up cost of the command line (issue 15, item 6): building the parser and every ``--help``
must not import the heavy numeric libraries, which take seconds to load. Checked by what is in
``sys.modules`` in a fresh interpreter, not by timing (a loaded machine must not fail the test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = ("torch", "diffusers", "monai", "transformers", "SimpleITK", "scipy", "numpy")

# Builds the parser, then asks every command and subcommand for its --help (each exits), and prints
# which heavy modules got imported along the way.
SCRIPT = r"""
import argparse, contextlib, io, json, sys
from lctfound.cli import build_parser

def commands(parser, prefix):
    found = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += commands(sub, prefix + [name])
    return found

names = commands(build_parser(), [])
for words in names:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(words + ["--help"])
        except SystemExit:
            pass
print(json.dumps({"commands": len(names), "heavy": [m for m in HEAVY if m in sys.modules]}))
"""


def test_help_of_every_command_imports_no_heavy_library():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    result = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + SCRIPT], env=env,
                            capture_output=True, text=True, check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["commands"] > 30  # every group and subcommand was walked
    assert report["heavy"] == []


def test_version_imports_no_heavy_library():
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import sys\nfrom lctfound.cli import main\ntry:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"

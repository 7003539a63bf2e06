"""Rule 11: no error message sends a user to an option that does not exist.

Every ``--option`` named in an error raised by the code is checked against the parsers of the
commands that can raise it:

* in a command-line module, a handler's errors (and those of the module's helpers it calls) must
  name options of the command(s) whose handler it is;
* in the engine, a message may name an option only in ``option_hints`` (shown only where the
  running command has that option, see `lctfound.errors`) or after an explicit
  ``lctfound COMMAND`` that has it;
* an ``option_hints`` key must be the argparse destination of the option its text names.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import re
from pathlib import Path

import pytest

import lctfound
from lctfound.cli import build_parser
from lctfound.errors import LCTfoundError, set_command_options

PACKAGE = Path(lctfound.__file__).parent
OPTION = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)")
COMMAND = re.compile(r"`?lctfound((?: [a-z][a-z-]*)+)")


def _commands(parser: argparse.ArgumentParser, prefix: tuple = ()):
    yield prefix, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, prefix + (name,))


COMMANDS = dict(_commands(build_parser()))


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _handlers() -> dict:
    by_function: dict = {}
    for words, parser in COMMANDS.items():
        func = parser._defaults.get("func")
        if func is not None:
            by_function.setdefault((func.__module__, func.__name__), []).append(words)
    return by_function


def _error_calls(function: ast.AST):
    """(text, hint key or None, line) for every string in a raise statement or an *Error(...) call."""
    for node in ast.walk(function):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")).endswith("Error"):
            for keyword in node.keywords:
                if keyword.arg == "option_hints" and isinstance(keyword.value, ast.Dict):
                    for key, value in zip(keyword.value.keys, keyword.value.values):
                        for text in _strings(value):
                            yield text, getattr(key, "value", None), node.lineno
            for argument in node.args:
                for text in _strings(argument):
                    yield text, None, node.lineno


def _strings(node: ast.AST):
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        yield node.value
    elif isinstance(node, ast.JoinedStr):
        yield "".join(part.value for part in node.values if isinstance(part, ast.Constant))
    elif isinstance(node, ast.BinOp):
        yield from _strings(node.left)
        yield from _strings(node.right)
    elif isinstance(node, (ast.Dict, ast.Call, ast.IfExp, ast.Tuple, ast.List)):
        for child in ast.iter_child_nodes(node):
            yield from _strings(child)


def _explicit_command(text: str, position: int):
    """The command words of the last ``lctfound WORDS`` before ``position`` that name a command."""
    found = None
    for match in COMMAND.finditer(text[:position]):
        words = tuple(match.group(1).split())
        while words and words not in COMMANDS:
            words = words[:-1]
        if words:
            found = words
    return found


def _check_hint(text: str, key, where: str, problems: list) -> None:
    options = [option.replace("-", "_") for option in OPTION.findall(text)]
    if key not in options:
        problems.append(f"{where}: option_hints key {key!r} is not an option its text names ({options})")


def _module_functions(tree: ast.Module):
    return {node.name: node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _called_names(function: ast.AST) -> set[str]:
    """Functions called by plain name (helpers of the module or imported from another CLI module)."""
    return {node.func.id for node in ast.walk(function) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}


def _imported_from(tree: ast.Module, module: str) -> dict[str, str]:
    """name -> the CLI module it is imported from, for ``from .x import name`` anywhere in ``tree``."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            for alias in node.names:
                found[alias.asname or alias.name] = f"lctfound.cli.{node.module}"
    return found


def test_cli_errors_name_options_of_their_commands():
    handlers = _handlers()
    modules = {path: ast.parse(path.read_text()) for path in sorted((PACKAGE / "cli").glob("*.py"))}
    functions = []  # (module, name, node, {called name: module it resolves to})
    for path, tree in modules.items():
        module = f"lctfound.cli.{path.stem}"
        imported = _imported_from(tree, module)
        for name, node in _module_functions(tree).items():
            calls = {called: imported.get(called, module) for called in _called_names(node)}
            functions.append((module, name, node, calls))

    def commands_of(module: str, name: str, seen: frozenset = frozenset()) -> set:
        found = set(handlers.get((module, name), []))
        for caller_module, caller_name, _, calls in functions:
            key = (caller_module, caller_name)
            if calls.get(name) == module and key != (module, name) and key not in seen:
                found |= commands_of(caller_module, caller_name, seen | {(module, name)})
        return found

    problems, checked = [], 0
    for path, tree in modules.items():
        module = f"lctfound.cli.{path.stem}"
        for name, node in _module_functions(tree).items():
            for text, key, line in _error_calls(node):
                where = f"{path.name}:{line}"
                if key is not None:
                    _check_hint(text, key, where, problems)
                    continue
                for match in OPTION.finditer(text):
                    option = f"--{match.group(1)}"
                    explicit = _explicit_command(text, match.start())
                    commands = {explicit} if explicit else commands_of(module, name)
                    if not commands:
                        problems.append(f"{where}: {option} in {name}(), which no command reaches")
                    for words in sorted(commands):
                        checked += 1
                        if option not in _options(COMMANDS[words]):
                            problems.append(f"{where}: {option} is not an option of `lctfound {' '.join(words)}`")
    assert checked > 20  # the scan found the messages (not vacuous)
    assert not problems, "\n".join(problems)


def test_engine_errors_name_options_only_through_hints():
    problems, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "cli":
            continue
        tree = ast.parse(path.read_text())
        for text, key, line in _error_calls(tree):
            where = f"{path.relative_to(PACKAGE)}:{line}"
            if key is not None:
                checked += 1
                _check_hint(text, key, where, problems)
                continue
            for match in OPTION.finditer(text):
                checked += 1
                explicit = _explicit_command(text, match.start())
                if explicit is None:
                    problems.append(f"{where}: names --{match.group(1)} without option_hints or a `lctfound COMMAND`")
                elif f"--{match.group(1)}" not in _options(COMMANDS[explicit]):
                    problems.append(f"{where}: --{match.group(1)} is not an option of `lctfound {' '.join(explicit)}`")
    assert checked > 5
    assert not problems, "\n".join(problems)


@pytest.fixture
def command_options():
    yield set_command_options
    set_command_options(())


def test_hints_appear_only_where_the_option_exists(command_options):
    hint = {"no_validate": "pass --no-validate if it really is CT in HU"}
    command_options(())
    assert "--no-validate" not in str(LCTfoundError("x.nrrd: does not look like CT", hint))
    command_options({"no_validate", "output"})
    assert str(LCTfoundError("x.nrrd: does not look like CT", hint)).endswith("; pass --no-validate if it really is CT in HU")


def test_ct_check_hint_follows_the_command(tmp_path, run_cli):
    """`features` has no --no-validate: its message must not mention it; `data info` has it."""
    import data_factory
    from lctfound.io.volume import write_volume

    mr = write_volume(data_factory.synthetic_mr(), tmp_path / "mr.nii.gz")
    code, _, err = run_cli(["data", "info", mr])
    assert code == 2 and "pass --no-validate" in err
    code, _, err = run_cli(["features", mr, "-o", tmp_path / "features"])
    assert code == 2 and "does not look like CT" in err and "--no-validate" not in err
    assert not (tmp_path / "features").exists()
